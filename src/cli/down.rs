//! `fcdev down`: delete a cluster (VMs, disks) and this machine's tunnel peer.

use crate::api;
use crate::cli::output::print_json;
use crate::cli::{confirm, CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// Keep this machine's tunnel peer registered.
    #[arg(long)]
    pub keep_peer: bool,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: DownArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let name = args.name.unwrap_or(profile.cluster);
    if !confirm(
        &format!("Delete cluster `{name}` with its VMs and disks?"),
        args.yes,
    )? {
        return Err(CliError::new(ExitKind::Failure, "down cancelled"));
    }
    let _: serde_json::Value = client.delete(&format!("/clusters/{name}")).await?;
    let mut removed_peers = Vec::new();
    if !args.keep_peer {
        // This machine's peer is the one whose public key we hold.
        if let Ok(public) =
            crate::tunnel::keys::public_key_of_file(&ctx.store.key_path(&ctx.profile_name))
        {
            let peers: Vec<api::Peer> = client.get("/peers").await?;
            for peer in peers.iter().filter(|p| p.public_key == public) {
                let _: serde_json::Value = client.delete(&format!("/peers/{}", peer.id)).await?;
                removed_peers.push(peer.id);
            }
        }
    }
    if args.json {
        print_json(&serde_json::json!({ "deleted": name, "peers_removed": removed_peers }));
    } else {
        println!("Cluster `{name}` deleted.");
        if !removed_peers.is_empty() {
            println!("Removed this machine's tunnel peer.");
        }
    }
    Ok(())
}
