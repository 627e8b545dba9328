//! `fcdev hosts`: `/etc/hosts` lines for the VMs of your namespace (for TUN mode).

use crate::api;
use crate::cli::output::print_json;
use crate::cli::{CliError, Context};

#[derive(Debug, clap::Args)]
pub struct HostsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: HostsArgs, ctx: Context) -> Result<(), CliError> {
    let (_, client) = ctx.client()?;
    let clusters: Vec<api::Cluster> = client.get("/clusters").await?;
    let entries: Vec<api::HostEntry> = clusters
        .iter()
        .flat_map(|c| c.vms.iter())
        .map(|vm| api::HostEntry {
            name: vm.hostname.clone(),
            address: vm.address.clone(),
        })
        .collect();
    if args.json {
        print_json(&entries);
    } else {
        println!("# fcdev VMs (add to /etc/hosts while `fcdev tunnel` runs in TUN mode)");
        for e in entries {
            println!("{}\t{}", e.address, e.name);
        }
    }
    Ok(())
}
