//! `fcdev server --role agent`: one per host. It registers with the control plane with its host token
//! (`fcdev server host add NAME`), then heartbeats: its hub's public endpoint and key and its capacity (memory,
//! CPUs, disk, the images it has). The control plane keeps a lease per host and marks a host `lost` when it
//! runs out.
//!
//! Work protocol (see docs/architecture.md): the agent calls the control plane, never the other way round, so an
//! agent needs no reachable API of its own (a host behind NAT or a firewall only needs outbound HTTP and its
//! hub's UDP port).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::api::{self, AgentHeartbeat, AgentLease, HostCapacity};

/// This agent's identity, kept in its data dir (a restarted agent is the same agent).
pub const AGENT_ID_FILE: &str = "agent.id";
/// Longest wait between tries while the control plane cannot be reached.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The control plane's URL (`http://host:7070`).
    pub control: String,
    /// This host's name (`fcdev server host add NAME`).
    pub name: String,
    /// The host token (FCDEV_HOST_TOKEN or `--host-token-file`).
    pub token: String,
    pub data_dir: PathBuf,
    pub images_dir: PathBuf,
    pub hub_listen: SocketAddr,
    pub hub_endpoint: Option<String>,
    pub hub_tun: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the control plane at {url} refused host `{name}`: {message} (HTTP {status})")]
    Refused {
        url: String,
        name: String,
        status: u16,
        message: String,
    },
}

/// The agent's instance id: read from the data dir, made (random) at its first start.
fn instance_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(AGENT_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo, in MiB.
fn memory_mb() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Free bytes (for an unprivileged user) of the filesystem holding `dir`.
fn disk_free(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return 0;
        }
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
    }
}

/// What this host offers now (blocking: reads /proc, the filesystem and the image catalog).
pub fn capacity(data_dir: &Path, images_dir: &Path) -> HostCapacity {
    let (memory_mb, free_memory_mb) = memory_mb();
    let mut images: Vec<String> = crate::server::images::Catalog::new(images_dir.to_path_buf())
        .list()
        .into_iter()
        .map(|i| i.spec.name)
        .collect();
    images.sort();
    HostCapacity {
        memory_mb,
        free_memory_mb,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        disk_free_bytes: disk_free(data_dir),
        images,
    }
}

pub fn run(opts: AgentOptions) -> anyhow::Result<()> {
    // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    crate::sys::create_private_dir(&opts.data_dir)
        .with_context(|| format!("cannot create the data dir {}", opts.data_dir.display()))?;
    let instance = instance_id(&opts.data_dir)?;
    let hub_socket = std::net::UdpSocket::bind(opts.hub_listen)
        .with_context(|| format!("cannot bind the hub's UDP socket on {}", opts.hub_listen))?;
    hub_socket.set_nonblocking(true)?;
    let hub_addr = hub_socket.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let key = crate::server::hub::load_or_create_key(
            &opts.data_dir.join(crate::server::run::HUB_KEY_FILE),
        )?;
        let endpoint = opts
            .hub_endpoint
            .clone()
            .unwrap_or_else(|| hub_addr.to_string());
        let hub =
            crate::server::hub::start(hub_socket, key, endpoint.clone(), opts.hub_tun.clone())
                .await?;
        let public_key = hub.public_key();
        tokio::select! {
            r = heartbeats(&opts, &instance, &endpoint, &public_key) => r,
            _ = crate::server::run::shutdown_signal() => {
                eprintln!("fcdev agent: stopped");
                Ok(())
            }
        }
    })
}

/// Heartbeat until refused (wrong or revoked token: 401; the name held by another agent: 409). A control
/// plane that cannot be reached (restarting, network) is tried again every second.
async fn heartbeats(
    opts: &AgentOptions,
    instance: &str,
    endpoint: &str,
    public_key: &str,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = format!(
        "{}{}/agent/heartbeat",
        opts.control.trim_end_matches('/'),
        api::API_PREFIX
    );
    let mut registered = false;
    loop {
        let (d, i) = (opts.data_dir.clone(), opts.images_dir.clone());
        let capacity = tokio::task::spawn_blocking(move || capacity(&d, &i))
            .await
            .unwrap_or_default();
        let beat = AgentHeartbeat {
            name: opts.name.clone(),
            instance: instance.to_string(),
            hub_endpoint: endpoint.to_string(),
            hub_public_key: public_key.to_string(),
            capacity,
        };
        let sent = client
            .post(&url)
            .bearer_auth(&opts.token)
            .json(&beat)
            .send()
            .await;
        let wait = match sent {
            Ok(resp) if resp.status().is_success() => match resp.json::<AgentLease>().await {
                Ok(lease) => {
                    if !registered {
                        registered = true;
                        println!(
                            "fcdev agent {}: registered with {} (hub {endpoint}, lease {} s)",
                            opts.name, opts.control, lease.lease_secs
                        );
                        use std::io::Write;
                        let _ = std::io::stdout().flush();
                    }
                    Duration::from_millis(lease.heartbeat_ms.max(100))
                }
                Err(e) => {
                    tracing::warn!("a heartbeat answer that does not parse: {e}");
                    RETRY
                }
            },
            Ok(resp) if matches!(resp.status().as_u16(), 400 | 401 | 403 | 409) => {
                let status = resp.status().as_u16();
                let message = resp
                    .json::<api::ErrorBody>()
                    .await
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "refused".into());
                return Err(AgentError::Refused {
                    url: opts.control.clone(),
                    name: opts.name.clone(),
                    status,
                    message,
                }
                .into());
            }
            Ok(resp) => {
                eprintln!(
                    "fcdev agent {}: the control plane answered {}; trying again",
                    opts.name,
                    resp.status()
                );
                RETRY
            }
            Err(e) => {
                eprintln!(
                    "fcdev agent {}: cannot reach the control plane at {}: {e}; trying again",
                    opts.name, opts.control
                );
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}
