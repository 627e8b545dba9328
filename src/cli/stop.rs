//! `fcdev stop` / `fcdev start`: put a cluster's VMs to disk (memory, processes and disks; no qemu left, the
//! host's RAM back) and resume them where they were.

use crate::api;
use crate::cli::output::{print_json, vm_table};
use crate::cli::status::human_bytes;
use crate::cli::{progress, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// Print the cluster as JSON.
    #[arg(long)]
    pub json: bool,
}

fn quiet(json: bool) -> bool {
    use std::io::IsTerminal;
    json || !std::io::stderr().is_terminal()
}

pub async fn stop(args: StopArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let name = args.name.unwrap_or(profile.cluster);
    let cluster: api::Cluster = client
        .post(&format!("/clusters/{name}/stop"), &serde_json::json!({}))
        .await?;
    let cluster = if cluster.state == api::ClusterState::Stopped {
        cluster
    } else {
        progress::follow(&client, &cluster, quiet(args.json)).await?
    };
    if args.json {
        print_json(&cluster);
    }
    progress::ensure_state(&cluster, api::ClusterState::Stopped)?;
    if !args.json {
        println!(
            "Cluster `{name}` is stopped ({} on disk). `fcdev start{}` resumes it.",
            human_bytes(cluster.disk_bytes.unwrap_or(0)),
            if name == crate::config::DEFAULT_CLUSTER {
                String::new()
            } else {
                format!(" --name {name}")
            }
        );
    }
    Ok(())
}

pub async fn start(args: StopArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let name = args.name.unwrap_or(profile.cluster);
    let cluster: api::Cluster = client
        .post(&format!("/clusters/{name}/start"), &serde_json::json!({}))
        .await?;
    let cluster = if cluster.state == api::ClusterState::Ready {
        cluster
    } else {
        progress::follow(&client, &cluster, quiet(args.json)).await?
    };
    if args.json {
        print_json(&cluster);
    } else {
        print!("\n{}", vm_table(&cluster));
    }
    progress::ensure_ready(&cluster)
}
