//! `fcdev status`: namespace, clusters with their VMs, and tunnel peers with handshake age and counters.

use serde::Serialize;

use crate::api;
use crate::cli::output::{print_json, table, vm_table};
use crate::cli::{CliError, Context};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Status {
    server: String,
    user: String,
    namespace: Option<api::Namespace>,
    clusters: Vec<api::Cluster>,
    peers: Vec<api::Peer>,
}

pub async fn run(args: StatusArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let me: api::Me = client.get("/me").await?;
    let clusters: Vec<api::Cluster> = client.get("/clusters").await?;
    // GET /clusters/{name} re-checks that the VMs still run.
    let mut fresh = Vec::new();
    for c in clusters {
        match client.get(&format!("/clusters/{}", c.name)).await {
            Ok(view) => fresh.push(view),
            // Deleted since the list was read.
            Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let peers: Vec<api::Peer> = client.get("/peers").await?;
    let status = Status {
        server: profile.server,
        user: me.user,
        namespace: me.namespace,
        clusters: fresh,
        peers,
    };
    if args.json {
        print_json(&status);
        return Ok(());
    }
    println!("Server:    {}", status.server);
    println!("User:      {}", status.user);
    match &status.namespace {
        Some(ns) => println!(
            "Namespace: {} ({}, gateway {})",
            ns.name, ns.subnet, ns.gateway
        ),
        None => println!("Namespace: none yet (`fcdev up` creates it)"),
    }
    if status.clusters.is_empty() {
        println!("\nNo clusters. Create one with `fcdev up`.");
    }
    for c in &status.clusters {
        println!(
            "\nCluster {} (image {}): {}{}",
            c.name,
            c.image,
            c.state.as_str(),
            c.start_mode
                .as_deref()
                .map(|m| format!(", started by {m}"))
                .unwrap_or_default()
        );
        if let Some(bytes) = c.disk_bytes {
            println!(
                "  {} on disk, no VM running; `fcdev start{}` resumes it",
                human_bytes(bytes),
                if c.name == crate::config::DEFAULT_CLUSTER {
                    String::new()
                } else {
                    format!(" --name {}", c.name)
                }
            );
        }
        if let Some(reason) = &c.reason {
            println!("  reason: {}", reason.lines().next().unwrap_or(reason));
        }
        print!("{}", vm_table(c));
    }
    if !status.peers.is_empty() {
        let rows: Vec<Vec<String>> = status
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    p.name.clone(),
                    p.address.clone(),
                    p.handshake_age_secs
                        .map(|s| format!("{s}s ago"))
                        .unwrap_or_else(|| "never".into()),
                    format!("{} / {}", human_bytes(p.rx_bytes), human_bytes(p.tx_bytes)),
                    p.dropped_packets.to_string(),
                ]
            })
            .collect();
        println!("\nTunnel peers:");
        print!(
            "{}",
            table(
                &["ID", "NAME", "ADDRESS", "HANDSHAKE", "RX / TX", "DROPPED"],
                &rows
            )
        );
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
