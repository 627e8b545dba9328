//! `fcdev reset`: put a cluster back to its onboarding snapshot.

use crate::api;
use crate::cli::output::{print_json, vm_table};
use crate::cli::{confirm, progress, CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// Print the cluster as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ResetArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let name = args.name.unwrap_or(profile.cluster);
    if !confirm(
        &format!("Reset cluster `{name}`? Everything written inside its VMs is lost"),
        args.yes,
    )? {
        return Err(CliError::new(ExitKind::Failure, "reset cancelled"));
    }
    let cluster: api::Cluster = client
        .post(&format!("/clusters/{name}/reset"), &serde_json::json!({}))
        .await?;
    use std::io::IsTerminal;
    let quiet = args.json || !std::io::stderr().is_terminal();
    let cluster = progress::follow(&client, &cluster, quiet).await?;
    if args.json {
        print_json(&cluster);
    } else {
        print!("\n{}", vm_table(&cluster));
    }
    progress::ensure_ready(&cluster)
}
