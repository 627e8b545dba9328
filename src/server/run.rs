//! `fcdev server`: bind the API and hub sockets, enter the VM network namespace, start the orchestrator, the hub
//! and the HTTP API, and stop cleanly on Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::server::backend::Backend;
use crate::server::hub_control::HubControl;
use crate::server::images::Catalog;
use crate::server::orchestrator::Orchestrator;
use crate::server::store::Store;

pub const STATE_FILE: &str = "state.db";
pub const HUB_KEY_FILE: &str = "hub.key";
/// The running server's pid (`fcdev server stop --local` reads it); removed when the server stops.
pub const PID_FILE: &str = "server.pid";

/// The pid file, removed on drop (the server's normal exit).
struct PidFile(PathBuf);

impl PidFile {
    fn write(data_dir: &std::path::Path) -> anyhow::Result<PidFile> {
        let path = data_dir.join(PID_FILE);
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Real VMs with qemu-system-x86_64.
    Qemu,
    /// Test backend: local processes serving HTTP on loopback. For tests only.
    Process,
}

/// What one `fcdev server` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// API, VMs and hub in one process (one host).
    All,
    /// API, auth, allocation and the hosts' leases; no VMs, no hub.
    Control,
    /// One per host: registers with the control plane and heartbeats.
    Agent,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub dev: bool,
    pub listen: SocketAddr,
    pub hub_listen: SocketAddr,
    pub hub_endpoint: Option<String>,
    pub hub_tun: Option<String>,
    pub data_dir: PathBuf,
    /// The state: SQLite in the data dir, or PostgreSQL (`--database`).
    pub database: crate::server::store::Location,
    pub images_dir: PathBuf,
    pub backend: BackendChoice,
    pub accel: String,
    /// VMs starting at once (admission control); 0: four per core, at least 8.
    pub max_starts: usize,
    /// Bytes of named snapshots one engineer may keep (0: no limit).
    pub snapshot_quota: u64,
    /// Stop clusters idle this long (`server/idle.rs`); None: never.
    pub idle_stop: Option<Duration>,
    pub netns: Option<String>,
    pub dev_user: String,
    /// `all` or `control` (an agent runs `server::agent`).
    pub role: Role,
    /// How long a host's lease lasts.
    pub host_lease: Duration,
}

fn make_backend(opts: &ServerOptions) -> anyhow::Result<Arc<dyn Backend>> {
    backend_for(opts.backend, &opts.accel)
}

/// The VM backend of a server or an agent.
pub fn backend_for(choice: BackendChoice, accel: &str) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match choice {
        BackendChoice::Process => {
            eprintln!(
                "warning: using the *test* backend: VMs are local processes, not virtual machines"
            );
            Arc::new(crate::server::backend::process::ProcessBackend::new())
        }
        BackendChoice::Qemu => crate::server::backend::qemu::make(accel)?,
    })
}

/// The orchestrator of a server or an agent (VMs under `DATA_DIR/vms`, snapshots under `DATA_DIR/snapshots`):
/// it drives on what a previous run left half done and watches its VMs (call inside the runtime).
pub fn start_orchestrator(
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    images_dir: &std::path::Path,
    data_dir: &std::path::Path,
    max_starts: usize,
    snapshot_quota: u64,
) -> anyhow::Result<Arc<Orchestrator>> {
    let orchestrator = Orchestrator::new(
        store,
        backend,
        Catalog::new(images_dir.to_path_buf()),
        data_dir.join("vms"),
        max_starts,
        data_dir.join("snapshots"),
        snapshot_quota,
    );
    orchestrator.recover()?;
    orchestrator.spawn_watchdog(Duration::from_secs(2));
    Ok(orchestrator)
}

pub fn serve(opts: ServerOptions) -> anyhow::Result<()> {
    // Everything the server and its children (qemu, qemu-img, test VMs) create is private to the owner: VM folders,
    // overlays, console logs, sockets, the state database. The umask is per process and inherited.
    // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    crate::sys::create_private_dir(&opts.data_dir)
        .with_context(|| format!("cannot create the data dir {}", opts.data_dir.display()))?;
    // Before the server enters its VM network namespace: the PostgreSQL engine's worker threads stay in this
    // one, where the database is reachable.
    let store = Arc::new(
        Store::open_at(&opts.database)
            .with_context(|| format!("cannot open {}", opts.database.describe()))?,
    );
    let _lock = crate::server::follow::hold_server_lock(&opts.data_dir)
        .with_context(|| format!("cannot lock {}", opts.data_dir.display()))?;
    let _pid_file = PidFile::write(&opts.data_dir)?;
    let login_token = if opts.dev {
        Some(match store.add_user(&opts.dev_user) {
            Ok((_, token)) => token,
            Err(crate::server::store::StoreError::Exists(_)) => {
                store.issue_token(&opts.dev_user)?
            }
            Err(e) => return Err(e.into()),
        })
    } else {
        None
    };

    // Public sockets first, in the namespace we were started in.
    let api_listener = std::net::TcpListener::bind(opts.listen).with_context(|| {
        format!(
            "cannot listen on {} (is another fcdev server running?)",
            opts.listen
        )
    })?;
    api_listener.set_nonblocking(true)?;
    if opts.role == Role::Control {
        return serve_control(opts, store, api_listener, login_token);
    }
    let hub_socket = std::net::UdpSocket::bind(opts.hub_listen)
        .with_context(|| format!("cannot bind the hub's UDP socket on {}", opts.hub_listen))?;
    hub_socket.set_nonblocking(true)?;
    let api_addr = api_listener.local_addr()?;
    let hub_addr = hub_socket.local_addr()?;

    if let Some(ns) = &opts.netns {
        crate::server::netns_enter::enter(ns).with_context(|| {
            "fcdev server needs root (CAP_NET_ADMIN) for its VM network; run it with sudo, or pass --netns none"
        })?;
    }
    let backend = make_backend(&opts)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let hub_key = crate::server::hub::load_or_create_key(&opts.data_dir.join(HUB_KEY_FILE))?;
        let endpoint = opts
            .hub_endpoint
            .clone()
            .unwrap_or_else(|| hub_addr.to_string());
        let hub: Arc<dyn HubControl> =
            crate::server::hub::start(hub_socket, hub_key, endpoint, opts.hub_tun.clone()).await?;
        let orchestrator = start_orchestrator(
            store.clone(),
            backend.clone(),
            &opts.images_dir,
            &opts.data_dir,
            opts.max_starts,
            opts.snapshot_quota,
        )?;
        // The hub gets the stored peers now; admin changes made by other processes reach it later.
        crate::server::follow::start(store.clone(), hub.clone(), orchestrator.clone()).await?;
        if let Some(after) = opts.idle_stop {
            crate::server::idle::spawn(store.clone(), hub.clone(), orchestrator.clone(), after);
        }
        let state = crate::server::service::Service::new(
            store.clone(),
            Some(crate::server::service::Local { orchestrator, hub }),
            opts.host_lease.as_secs(),
        );
        state.spawn_host_reaper();
        let app = crate::server::http::router(state);
        let listener = tokio::net::TcpListener::from_std(api_listener)?;
        let url = format!("http://{api_addr}");
        println!(
            "fcdev server {} listening on {url} (hub udp {hub_addr}, backend {}, accelerator {}, store {}{})",
            env!("CARGO_PKG_VERSION"),
            backend.kind(),
            backend.accelerator(),
            store.kind(),
            opts.netns
                .as_deref()
                .map(|n| format!(", VMs in netns {n}"))
                .unwrap_or_default()
        );
        println!("images: {}", opts.images_dir.display());
        if let Some(token) = &login_token {
            println!("Log in as `{}` with:", opts.dev_user);
            println!("  echo {token} | fcdev login --server {url} --token-stdin");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the API server failed")?;
        eprintln!("fcdev server: stopped (VMs keep running and are re-adopted at the next start)");
        anyhow::Ok(())
    })
}

/// `--role control`: the API, auth, allocation and the hosts' leases; no backend, no hub, no VM network.
fn serve_control(
    opts: ServerOptions,
    store: Arc<Store>,
    api_listener: std::net::TcpListener,
    login_token: Option<String>,
) -> anyhow::Result<()> {
    let api_addr = api_listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let state =
            crate::server::service::Service::new(store.clone(), None, opts.host_lease.as_secs());
        state.spawn_host_reaper();
        let app = crate::server::http::router(state);
        let listener = tokio::net::TcpListener::from_std(api_listener)?;
        let url = format!("http://{api_addr}");
        println!(
            "fcdev server {} listening on {url} (role control: no VMs, no hub; store {}, host lease {} s)",
            env!("CARGO_PKG_VERSION"),
            store.kind(),
            opts.host_lease.as_secs()
        );
        if let Some(token) = &login_token {
            println!("Log in as `{}` with:", opts.dev_user);
            println!("  echo {token} | fcdev login --server {url} --token-stdin");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the API server failed")?;
        eprintln!("fcdev server: stopped");
        anyhow::Ok(())
    })
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
