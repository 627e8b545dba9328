//! `fcdev server`: run the control plane, and manage its engineers (`fcdev server user …`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::server::run::{BackendChoice, Role, ServerOptions};
use crate::server::store::{Location, Store, StoreError};

pub mod local;

pub use crate::api::DEV_API_PORT;
pub const DEV_HUB_PORT: u16 = 51820;
/// The network namespace `fcdev server --dev` puts its VMs, bridges and hub TUN in.
pub const DEV_NETNS: &str = "fcdev-dev";

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The embedded default for one machine: API and hub on loopback, VMs in their own network namespace
    /// (`fcdev-dev`), and a fresh login token printed for the first engineer.
    #[arg(long)]
    pub dev: bool,
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Where the WireGuard hub listens (UDP). Port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:51820")]
    pub hub_listen: SocketAddr,
    /// The endpoint peers are told to send to (default: the hub's listen address).
    #[arg(long)]
    pub hub_endpoint: Option<String>,
    /// The hub's TUN device towards the VM bridges, or `none` to run the hub without one.
    #[arg(long, default_value = "fcdev-hub")]
    pub hub_tun: String,
    /// State, images and VM folders (default: the user data dir, or FCDEV_DATA_DIR).
    #[arg(long, env = "FCDEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep the state in this PostgreSQL database (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, or a unix socket:
    /// `postgres:///DB?host=/run/postgresql`) instead of the SQLite file DATA_DIR/state.db. The admin commands
    /// (`fcdev server user …`) take the same flag.
    #[arg(long, env = "FCDEV_DATABASE")]
    pub database: Option<String>,
    /// The image catalog (default: DATA_DIR/images).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// How VMs run: `qemu` (real VMs), or `process` (a test backend of local processes, for tests only).
    #[arg(long, default_value = "qemu")]
    pub backend: BackendChoice,
    /// QEMU accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg.
    #[arg(long, default_value = "auto", env = "FCDEV_ACCEL")]
    pub accel: String,
    /// How many VMs may be starting at once (restoring until configured, booting until ready); the others
    /// wait in a queue and `fcdev up` shows "queued (n ahead)". 0: four per core, at least 8.
    #[arg(long, default_value_t = 0)]
    pub max_starts: usize,
    /// Disk that one engineer's named snapshots may take (`fcdev snapshot save`), e.g. `20G`, `512M`; `0`: no
    /// limit. A save that would go over is refused with the snapshots to remove.
    #[arg(long, default_value = "20G", value_parser = parse_size)]
    pub snapshot_quota: u64,
    /// Stop (`fcdev stop`) a ready cluster left alone this long: no state change and no tunnel handshake of its
    /// engineer, e.g. `8h`, `30m`; `0`: never (the default). `fcdev start` or `up` resumes it.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub idle_stop: std::time::Duration,
    /// Run VMs, bridges and the hub's TUN inside this network namespace (created if missing); the API and hub
    /// sockets stay in the namespace the server was started in. `none` keeps everything where it is.
    /// Default: `fcdev-dev` with --dev, else none.
    #[arg(long)]
    pub netns: Option<String>,
    /// With --dev: the first engineer's name (default: your login name).
    #[arg(long)]
    pub user: Option<String>,
    /// What this process does: `all` (API, VMs and hub in one process: the default), `control` (API, auth,
    /// allocation and the hosts' leases; no VMs, no hub; use --database postgres://…), or `agent` (one per
    /// host: registers with --control and heartbeats; the token comes from FCDEV_HOST_TOKEN or
    /// --host-token-file).
    #[arg(long, default_value = "all")]
    pub role: Role,
    /// With --role agent: the control plane's URL (`http://control:7070`).
    #[arg(long)]
    pub control: Option<String>,
    /// With --role agent: this host's name, as added with `fcdev server host add NAME`.
    #[arg(long)]
    pub host_name: Option<String>,
    /// With --role agent: a file holding the host token (instead of FCDEV_HOST_TOKEN).
    #[arg(long)]
    pub host_token_file: Option<PathBuf>,
    /// Seconds a host's lease lasts: a host whose agent sent no heartbeat for that long is `lost` (agents send
    /// one every third of it).
    #[arg(long, default_value_t = crate::server::service::DEFAULT_HOST_LEASE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub host_lease: u64,
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Manage engineers and their tokens.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane.
    #[command(subcommand)]
    Host(HostCommand),
    /// Stop the server running on this machine's data dir (the one `fcdev up --local` started). Its VMs keep
    /// running and are re-adopted at the next start.
    Stop {
        /// The server of this machine (the only kind `stop` knows).
        #[arg(long, required = true)]
        local: bool,
        #[arg(long, env = "FCDEV_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add an engineer and print their token (shown once; the server keeps only its hash).
    Add {
        name: String,
        #[command(flatten)]
        at: StoreArgs,
    },
    /// Print a fresh extra token for an engineer.
    Token {
        name: String,
        #[command(flatten)]
        at: StoreArgs,
    },
    /// Revoke every token of an engineer and drop their WireGuard peers (a running server's hub drops
    /// them within a second).
    Revoke {
        name: String,
        #[command(flatten)]
        at: StoreArgs,
    },
    /// Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens.
    Remove {
        name: String,
        #[command(flatten)]
        at: StoreArgs,
    },
    /// List engineers.
    List {
        #[command(flatten)]
        at: StoreArgs,
        /// Print JSON: `[{"name": …}]`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from
    /// FCDEV_HOST_TOKEN or --host-token-file.
    Add {
        name: String,
        #[command(flatten)]
        at: StoreArgs,
        /// Print JSON: `{"name": …, "token": …}`.
        #[arg(long)]
        json: bool,
    },
    /// List the hosts: state (new, live, lost), last heartbeat, hub, capacity.
    List {
        #[command(flatten)]
        at: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a host's token: its agent is refused (401) from its next heartbeat.
    Revoke {
        name: String,
        #[command(flatten)]
        at: StoreArgs,
    },
}

/// Where an admin command finds the store: the server's data dir, and its `--database` if it uses one.
#[derive(Debug, Args)]
pub struct StoreArgs {
    #[arg(long, env = "FCDEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db).
    #[arg(long, env = "FCDEV_DATABASE")]
    pub database: Option<String>,
}

/// Hidden: the process behind one test-backend VM.
#[derive(Debug, Args)]
pub struct TestVmArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub run_dir: PathBuf,
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub cmdline: String,
}

fn data_dir(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match explicit {
        Some(d) => d,
        None => crate::config::data_dir()?,
    })
}

pub fn open_store(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    open_store_at(data_dir, None)
}

/// The store of `--database`, else the SQLite file of the data dir (created when missing).
pub fn open_store_at(data_dir: &std::path::Path, database: Option<&str>) -> anyhow::Result<Store> {
    let location = Location::from_args(database, data_dir)?;
    if let Location::Sqlite(_) = location {
        crate::config::create_private_dir(data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
    }
    Store::open_at(&location)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", location.describe()))
}

/// The data dir and store of an admin command.
fn admin_store(at: StoreArgs) -> anyhow::Result<(PathBuf, Store)> {
    let dir = data_dir(at.data_dir)?;
    let store = open_store_at(&dir, at.database.as_deref())?;
    Ok((dir, store))
}

/// The engineer name for this machine's login (`$SUDO_USER`/`$USER` as a DNS label, else `dev`).
pub fn default_user_name() -> String {
    let raw = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_default()
        .to_lowercase();
    let cleaned: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .chars()
        .take(63)
        .collect();
    if cleaned.is_empty() || cleaned == "root" || !crate::names::is_dns_label(&cleaned) {
        "dev".to_string()
    } else {
        cleaned
    }
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    match args.command {
        Some(ServerCommand::User(cmd)) => user(cmd),
        Some(ServerCommand::Host(cmd)) => host(cmd),
        Some(ServerCommand::Stop { data_dir: d, .. }) => local::stop(&data_dir(d)?),
        None => {
            let r = args.run;
            if let Some(user) = &r.user {
                if !crate::names::is_dns_label(user) {
                    anyhow::bail!("`{user}` is not a valid engineer name: use lowercase letters, digits and `-` (it names the namespace)");
                }
            }
            let data_dir = data_dir(r.data_dir.clone())?;
            if r.role == Role::Agent {
                return run_agent(&r, data_dir);
            }
            let database = Location::from_args(r.database.as_deref(), &data_dir)?;
            let netns = match r.netns.as_deref() {
                Some("none") | Some("") => None,
                Some(name) => Some(name.to_string()),
                None if r.dev => Some(DEV_NETNS.to_string()),
                None => None,
            };
            let opts = ServerOptions {
                dev: r.dev,
                listen: r.listen,
                hub_listen: r.hub_listen,
                hub_endpoint: r.hub_endpoint,
                hub_tun: (r.hub_tun != "none").then_some(r.hub_tun),
                images_dir: r.images.unwrap_or_else(|| data_dir.join("images")),
                data_dir,
                database,
                backend: r.backend,
                accel: r.accel,
                max_starts: r.max_starts,
                snapshot_quota: r.snapshot_quota,
                idle_stop: (!r.idle_stop.is_zero()).then_some(r.idle_stop),
                netns,
                dev_user: r.user.unwrap_or_else(default_user_name),
                role: r.role,
                host_lease: std::time::Duration::from_secs(r.host_lease),
            };
            crate::server::run::serve(opts)
        }
    }
}

fn host(cmd: HostCommand) -> anyhow::Result<()> {
    match cmd {
        HostCommand::Add { name, at, json } => {
            if !crate::names::is_dns_label(&name) {
                anyhow::bail!(
                    "`{name}` is not a valid host name: use lowercase letters, digits and `-`"
                );
            }
            let (_, store) = admin_store(at)?;
            match store.add_host(&name) {
                Ok((_, token)) => {
                    if json {
                        crate::cli::output::print_json(
                            &serde_json::json!({ "name": name, "token": token }),
                        );
                    } else {
                        eprintln!("Host `{name}` added. Its token (shown once; give it to its agent as FCDEV_HOST_TOKEN):");
                        println!("{token}");
                    }
                    Ok(())
                }
                Err(StoreError::Exists(_)) => anyhow::bail!(
                    "host `{name}` already exists; `fcdev server host list` shows the hosts"
                ),
                Err(e) => Err(e.into()),
            }
        }
        HostCommand::List { at, json } => {
            let (_, store) = admin_store(at)?;
            let hosts = store.hosts()?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let state = |h: &crate::server::store::HostRow| {
                if h.revoked {
                    "revoked"
                } else {
                    h.state.as_str()
                }
            };
            if json {
                let list: Vec<serde_json::Value> = hosts
                    .iter()
                    .map(|h| {
                        serde_json::json!({
                            "name": h.name,
                            "state": state(h),
                            "reason": h.reason,
                            "created_at": h.created_at,
                            "heartbeat_age_ms": h.heartbeat_ms.map(|t| (now_ms - t).max(0)),
                            "hub_endpoint": h.hub_endpoint,
                            "hub_public_key": h.hub_public_key,
                            "capacity": h.capacity,
                        })
                    })
                    .collect();
                crate::cli::output::print_json(&list);
                return Ok(());
            }
            for h in &hosts {
                let seen = h.heartbeat_ms.map_or("never heard from".to_string(), |t| {
                    format!("heartbeat {:.1} s ago", (now_ms - t).max(0) as f64 / 1000.0)
                });
                let cap = h.capacity.as_ref().map_or(String::new(), |c| {
                    format!(
                        ", {} MiB free of {}, {} CPUs, images: {}",
                        c.free_memory_mb,
                        c.memory_mb,
                        c.cpus,
                        if c.images.is_empty() {
                            "none".to_string()
                        } else {
                            c.images.join(" ")
                        }
                    )
                });
                let why = h
                    .reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(" ({r})"));
                println!("{}\t{}{why}\t{seen}{cap}", h.name, state(h));
            }
            Ok(())
        }
        HostCommand::Revoke { name, at } => {
            let (_, store) = admin_store(at)?;
            match store.revoke_host(&name) {
                Ok(true) => println!("Revoked the token of host `{name}`: its agent is refused from its next heartbeat."),
                Ok(false) => println!("Host `{name}` was already revoked."),
                Err(StoreError::NotFound(_)) => {
                    anyhow::bail!("no host `{name}`; `fcdev server host list` shows them")
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
    }
}

/// `fcdev server --role agent`: its options, its token from FCDEV_HOST_TOKEN or --host-token-file.
fn run_agent(r: &RunArgs, data_dir: PathBuf) -> anyhow::Result<()> {
    let control = r.control.clone().ok_or_else(|| {
        anyhow::anyhow!("--role agent needs --control URL (the control plane's API)")
    })?;
    let name = r.host_name.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "--role agent needs --host-name NAME (as added with `fcdev server host add NAME`)"
        )
    })?;
    let token = match &r.host_token_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read the host token from {}: {e}", path.display())
        })?,
        None => std::env::var("FCDEV_HOST_TOKEN").map_err(|_| {
            anyhow::anyhow!(
                "--role agent needs its host token in FCDEV_HOST_TOKEN or --host-token-file \
                 (`fcdev server host add {name}` prints it)"
            )
        })?,
    };
    crate::server::agent::run(crate::server::agent::AgentOptions {
        control,
        name,
        token: token.trim().to_string(),
        images_dir: r.images.clone().unwrap_or_else(|| data_dir.join("images")),
        data_dir,
        hub_listen: r.hub_listen,
        hub_endpoint: r.hub_endpoint.clone(),
        hub_tun: (r.hub_tun != "none").then(|| r.hub_tun.clone()),
        backend: r.backend,
        accel: r.accel.clone(),
        max_starts: r.max_starts,
        snapshot_quota: r.snapshot_quota,
    })
}

/// `8h`, `30m`, `90s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let unit = |c: char| match c {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3600),
        'd' => Some(86400),
        _ => None,
    };
    number_with_unit(s, unit, "s, m, h or d", "a duration (e.g. 8h, 30m, 0)")
        .map(std::time::Duration::from_secs)
}

/// `20G`, `512M`, `100K` or plain bytes (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let unit = |c: char| match c.to_ascii_uppercase() {
        'K' => Some(1 << 10),
        'M' => Some(1 << 20),
        'G' => Some(1 << 30),
        'T' => Some(1 << 40),
        _ => None,
    };
    number_with_unit(s, unit, "K, M, G or T", "a size (e.g. 20G, 512M, 0)")
}

/// A whole number with an optional one-letter unit (`unit` gives its multiplier); `units` and `what` word the
/// errors.
fn number_with_unit(
    s: &str,
    unit: impl Fn(char) -> Option<u64>,
    units: &str,
    what: &str,
) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => match unit(c) {
            Some(mult) => (&s[..i], mult),
            None => return Err(format!("`{s}`: use a number with {units}")),
        },
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not {what}"))
}

/// How long `user remove` waits for the running server to stop the engineer's clusters.
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

fn remove_user(at: StoreArgs, name: &str) -> anyhow::Result<()> {
    use crate::server::follow::server_running;
    let (data_dir, store) = admin_store(at)?;
    let data_dir = data_dir.as_path();
    let r = match store.begin_user_removal(name) {
        Err(StoreError::NotFound(_)) => {
            anyhow::bail!("no engineer `{name}`; `fcdev server user list` shows them")
        }
        r => r?,
    };
    if r.clusters > 0 {
        if !server_running(data_dir) {
            anyhow::bail!(
                "`{name}` has {} cluster(s) and no server runs on {}: their tokens and peers are gone, \
                 and the server stops the clusters and finishes the removal when it starts",
                r.clusters,
                data_dir.display()
            );
        }
        eprintln!(
            "Stopping {} cluster(s) of `{name}` through the running server…",
            r.clusters
        );
        let start = std::time::Instant::now();
        while store.user_exists(name)? {
            if start.elapsed() > REMOVE_WAIT {
                anyhow::bail!(
                    "the server has not finished removing `{name}` after {} s (a VM did not stop?): \
                     see its log; it retries on its own",
                    REMOVE_WAIT.as_secs()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    println!(
        "Removed `{name}`: {} cluster(s), {} WireGuard peer(s), their namespace and tokens.",
        r.clusters, r.peers
    );
    Ok(())
}

fn user(cmd: UserCommand) -> anyhow::Result<()> {
    let check = |name: &str| -> anyhow::Result<()> {
        if crate::names::is_dns_label(name) {
            Ok(())
        } else {
            anyhow::bail!("`{name}` is not a valid engineer name: use lowercase letters, digits and `-` (it names the namespace)")
        }
    };
    match cmd {
        UserCommand::Add { name, at } => {
            check(&name)?;
            let (_, store) = admin_store(at)?;
            match store.add_user(&name) {
                Ok((_, token)) => {
                    eprintln!("Engineer `{name}` added. Their token (shown once):");
                    println!("{token}");
                    Ok(())
                }
                Err(StoreError::Exists(_)) => anyhow::bail!(
                    "engineer `{name}` already exists; `fcdev server user token {name}` prints a fresh token"
                ),
                Err(e) => Err(e.into()),
            }
        }
        UserCommand::Token { name, at } => {
            let (_, store) = admin_store(at)?;
            println!("{}", store.issue_token(&name)?);
            Ok(())
        }
        UserCommand::Revoke { name, at } => {
            let (_, store) = admin_store(at)?;
            let (tokens, peers) = store.revoke_user(&name)?;
            println!("Revoked {tokens} token(s) and {peers} WireGuard peer(s) of `{name}`.");
            Ok(())
        }
        UserCommand::Remove { name, at } => remove_user(at, &name),
        UserCommand::List { at, json } => {
            let (_, store) = admin_store(at)?;
            let users = store.list_users()?;
            if json {
                let list: Vec<serde_json::Value> = users
                    .iter()
                    .map(|u| serde_json::json!({ "name": u.name }))
                    .collect();
                crate::cli::output::print_json(&list);
                return Ok(());
            }
            for u in users {
                println!("{}", u.name);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(super::parse_size("20G"), Ok(20 << 30));
        assert_eq!(super::parse_size("512m"), Ok(512 << 20));
        assert_eq!(super::parse_size("0"), Ok(0));
        assert!(super::parse_size("12X").is_err());
        assert!(super::parse_size("G").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        use std::time::Duration;
        assert_eq!(
            super::parse_duration("8h"),
            Ok(Duration::from_secs(8 * 3600))
        );
        assert_eq!(super::parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(super::parse_duration("0"), Ok(Duration::ZERO));
        assert!(super::parse_duration("5x").is_err());
    }
}
