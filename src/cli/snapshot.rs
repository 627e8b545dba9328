//! `fcdev snapshot save|restore|list|rm`: named snapshots of a cluster (memory, devices and disks of every VM).

use clap::Subcommand;

use crate::api;
use crate::cli::output::{print_json, table, vm_table};
use crate::cli::status::human_bytes;
use crate::cli::{confirm, progress, CliError, Context, ExitKind};
use crate::names;

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save the whole cluster as it is now: every VM's memory, processes and disk (taken together).
    Save(NamedArgs),
    /// Bring the whole cluster back to a snapshot (what happened since is lost).
    Restore(RestoreArgs),
    /// List the cluster's snapshots: name, when, size on disk, image.
    List(ListArgs),
    /// Remove a snapshot.
    Rm(NamedArgs),
}

#[derive(Debug, clap::Args)]
pub struct NamedArgs {
    /// The snapshot's name (lowercase letters, digits and `-`, like cluster names).
    pub snapshot: String,
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot's name.
    pub snapshot: String,
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

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn check_snapshot_name(name: &str) -> Result<(), CliError> {
    if names::is_dns_label(name) {
        return Ok(());
    }
    Err(CliError::new(
        ExitKind::Invalid,
        format!("`{name}` is not a valid snapshot name"),
    )
    .hint("use 1–63 lowercase letters, digits and `-`, not starting or ending with `-`"))
}

fn quiet(json: bool) -> bool {
    use std::io::IsTerminal;
    json || !std::io::stderr().is_terminal()
}

pub async fn run(args: SnapshotArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    match args.command {
        SnapshotCommand::Save(a) => {
            check_snapshot_name(&a.snapshot)?;
            let cluster = a.name.unwrap_or(profile.cluster);
            let req = api::CreateSnapshot {
                name: a.snapshot.clone(),
            };
            let path = format!("/clusters/{cluster}/snapshots");
            let snap: api::Snapshot = progress::spin(
                &format!("saving snapshot {} of {cluster}", a.snapshot),
                quiet(a.json),
                client.post(&path, &req),
            )
            .await?;
            if a.json {
                print_json(&snap);
            } else {
                println!(
                    "Snapshot `{}` of cluster `{cluster}` saved ({} on disk).",
                    snap.name,
                    human_bytes(snap.size_bytes)
                );
            }
            Ok(())
        }
        SnapshotCommand::Restore(a) => {
            check_snapshot_name(&a.snapshot)?;
            let name = a.name.unwrap_or(profile.cluster);
            if !confirm(
                &format!(
                    "Restore cluster `{name}` to snapshot `{}`? What happened in its VMs since is lost",
                    a.snapshot
                ),
                a.yes,
            )? {
                return Err(CliError::new(ExitKind::Failure, "restore cancelled"));
            }
            let cluster: api::Cluster = client
                .post(
                    &format!("/clusters/{name}/snapshots/{}/restore", a.snapshot),
                    &serde_json::json!({}),
                )
                .await?;
            let cluster = progress::follow(&client, &cluster, quiet(a.json)).await?;
            if a.json {
                print_json(&cluster);
            } else {
                print!("\n{}", vm_table(&cluster));
            }
            progress::ensure_ready(&cluster)
        }
        SnapshotCommand::List(a) => {
            let cluster = a.name.unwrap_or(profile.cluster);
            let snaps: Vec<api::Snapshot> = client
                .get(&format!("/clusters/{cluster}/snapshots"))
                .await?;
            if a.json {
                print_json(&snaps);
                return Ok(());
            }
            if snaps.is_empty() {
                println!(
                    "Cluster `{cluster}` has no snapshots. Save one with `fcdev snapshot save NAME`."
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = snaps
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.created_at.clone(),
                        human_bytes(s.size_bytes),
                        s.image.clone(),
                    ]
                })
                .collect();
            print!("{}", table(&["NAME", "SAVED", "SIZE", "IMAGE"], &rows));
            Ok(())
        }
        SnapshotCommand::Rm(a) => {
            check_snapshot_name(&a.snapshot)?;
            let cluster = a.name.unwrap_or(profile.cluster);
            let _: serde_json::Value = client
                .delete(&format!("/clusters/{cluster}/snapshots/{}", a.snapshot))
                .await?;
            if a.json {
                print_json(&serde_json::json!({ "deleted": a.snapshot, "cluster": cluster }));
            } else {
                println!("Snapshot `{}` of cluster `{cluster}` removed.", a.snapshot);
            }
            Ok(())
        }
    }
}
