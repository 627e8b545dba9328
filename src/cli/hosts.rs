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

/// The names of my VMs in the hosts file while a TUN-mode tunnel runs: a marked block (per profile) written when
/// the tunnel is up and removed when it ends, every other line kept. The file is rewritten in place, not
/// renamed over: /etc/hosts may be a bind mount (`ip netns exec` mounts /etc/netns/<ns>/hosts over it).
pub struct HostsBlock {
    path: std::path::PathBuf,
    profile: String,
}

fn begin_marker(profile: &str) -> String {
    format!("# >>> fcdev profile {profile}: the VMs while `fcdev tunnel` runs (removed when it ends) >>>")
}

fn end_marker(profile: &str) -> String {
    format!("# <<< fcdev profile {profile} <<<")
}

/// The hosts file: /etc/hosts, or `FCDEV_HOSTS_FILE`.
pub fn hosts_file() -> std::path::PathBuf {
    std::env::var_os("FCDEV_HOSTS_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/etc/hosts".into())
}

fn rewrite(path: &std::path::Path, profile: &str, block: Option<&str>) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let new =
        crate::cli::marked::splice(&text, &begin_marker(profile), &end_marker(profile), block)
            .ok_or_else(|| {
                std::io::Error::other("its fcdev block has no end marker: fix it by hand")
            })?;
    if new != text {
        std::fs::write(path, new)?;
    }
    Ok(())
}

impl HostsBlock {
    pub fn install(profile: &str, entries: &[api::HostEntry]) -> std::io::Result<HostsBlock> {
        let path = hosts_file();
        let mut block = begin_marker(profile);
        block.push('\n');
        for e in entries {
            block.push_str(&format!("{}\t{}\n", e.address, e.name));
        }
        block.push_str(&end_marker(profile));
        block.push('\n');
        rewrite(&path, profile, Some(&block))?;
        Ok(HostsBlock {
            path,
            profile: profile.to_string(),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for HostsBlock {
    fn drop(&mut self) {
        if let Err(e) = rewrite(&self.path, &self.profile, None) {
            eprintln!(
                "fcdev: could not remove the VMs from {}: {e}",
                self.path.display()
            );
        }
    }
}
