//! `fcdev status`: namespace, clusters with their VMs, and tunnel peers with handshake age and counters.

use serde::Serialize;

use crate::api;
use crate::cli::output::{print_json, table, vm_table};
use crate::cli::{CliError, Context};

/// Whether an API URL points at this machine (`fcdev up --local` uses 127.0.0.1).
#[cfg_attr(not(feature = "server"), allow(dead_code))]
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map_or_else(
            || host.rsplit_once(':').map_or(host, |(h, _)| h),
            |(h, _)| h,
        );
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a server runs on this machine's data dir, and its pid when it left one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocalServer {
    pub running: bool,
    pub pid: Option<i32>,
    pub data_dir: std::path::PathBuf,
}

/// The local server's state, when the profile's server is on this machine.
#[cfg(feature = "server")]
async fn local_of(server_url: &str) -> Result<Option<LocalServer>, CliError> {
    use crate::cli::server::local::local_server;
    if !is_loopback(server_url) {
        return Ok(None);
    }
    let dir = crate::config::data_dir()?;
    tokio::task::spawn_blocking(move || local_server(&dir))
        .await
        .map(Some)
        .map_err(|e| CliError::new(crate::cli::ExitKind::Failure, e.to_string()))
}

/// The laptop-only build runs no server, so it reports none.
#[cfg(not(feature = "server"))]
async fn local_of(_server_url: &str) -> Result<Option<LocalServer>, CliError> {
    Ok(None)
}

fn describe_local(l: &LocalServer) -> String {
    match (l.running, l.pid) {
        (true, Some(pid)) => format!(
            "running (pid {pid}, data {}; `fcdev server stop --local` stops it)",
            l.data_dir.display()
        ),
        (true, None) => format!("running (data {})", l.data_dir.display()),
        (false, _) => format!(
            "none runs on {} (`fcdev up --local` starts one)",
            l.data_dir.display()
        ),
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Status {
    server: String,
    /// When the profile's server is on this machine: whether a server runs on the local data dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    local_server: Option<LocalServer>,
    user: String,
    namespace: Option<api::Namespace>,
    clusters: Vec<api::Cluster>,
    peers: Vec<api::Peer>,
    /// This machine's running `fcdev tunnel` of the profile (pid, mode, SOCKS5 address; `background` when
    /// `fcdev ssh` started it), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnel: Option<crate::cli::tunnel_state::TunnelState>,
    /// A wg-config this machine exported that names another hub than the namespace's now (it moved to
    /// another host): export it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    stale_wg_config: Option<StaleWgConfig>,
}

#[derive(Serialize)]
struct StaleWgConfig {
    file: std::path::PathBuf,
    endpoint: String,
    hub_endpoint: String,
}

/// The exported wg-config, when it names another hub than the namespace's.
fn stale_export(
    export: Option<crate::cli::tunnel_state::ExportedConfig>,
    ns: Option<&api::Namespace>,
) -> Option<StaleWgConfig> {
    let (export, ns) = (export?, ns?);
    let (endpoint, key) = (ns.hub_endpoint.as_ref()?, ns.hub_public_key.as_ref()?);
    (export.endpoint != *endpoint || export.server_public_key != *key).then(|| StaleWgConfig {
        file: export.file,
        endpoint: export.endpoint,
        hub_endpoint: endpoint.clone(),
    })
}

pub async fn run(args: StatusArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let local = local_of(&profile.server).await?;
    let me: api::Me = match client.get("/me").await {
        Ok(me) => me,
        Err(e) => {
            if let Some(l) = local.as_ref().filter(|l| !l.running && !args.json) {
                println!("Local server: {}", describe_local(l));
            }
            return Err(e.into());
        }
    };
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
    let stale_wg_config = stale_export(
        crate::cli::tunnel_state::read_export(&ctx),
        me.namespace.as_ref(),
    );
    let status = Status {
        stale_wg_config,
        server: profile.server,
        local_server: local,
        user: me.user,
        namespace: me.namespace,
        clusters: fresh,
        peers,
        tunnel: crate::cli::tunnel_state::read_live(&ctx),
    };
    if args.json {
        print_json(&status);
        return Ok(());
    }
    println!("Server:    {}", status.server);
    if let Some(l) = &status.local_server {
        println!("Local:     {}", describe_local(l));
    }
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
    match &status.tunnel {
        Some(t) => println!(
            "\nTunnel:    running here ({} mode{}, pid {}{}), this machine is {}",
            t.mode,
            t.socks.map(|s| format!(", SOCKS5 {s}")).unwrap_or_default(),
            t.pid,
            if t.background {
                "; started by `fcdev ssh`, ends when idle"
            } else {
                ""
            },
            t.address
        ),
        None => println!(
            "\nTunnel:    not running here (`fcdev tunnel`; `fcdev ssh` starts one by itself)"
        ),
    }
    if let Some(w) = &status.stale_wg_config {
        println!(
            "WireGuard: the config exported to {} names the hub at {}, but your namespace's hub is now {} \
             (it moved to another host): export it again with `fcdev tunnel --wg-config {}` and reload it",
            w.file.display(),
            w.endpoint,
            w.hub_endpoint,
            w.file.display()
        );
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

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_urls() {
        for url in [
            "http://127.0.0.1:7070",
            "http://localhost:7070/",
            "http://[::1]:7070",
            "http://127.0.0.1",
        ] {
            assert!(super::is_loopback(url), "{url}");
        }
        for url in ["http://host.example:7070", "http://10.0.0.1:7070"] {
            assert!(!super::is_loopback(url), "{url}");
        }
    }
}
