//! `fcdev server --role agent`: one per host. It registers with the control plane with its host token
//! (`fcdev server host add NAME`), then heartbeats: its hub's public endpoint and key and its capacity (memory,
//! CPUs, disk, the images it has). The control plane keeps a lease per host and marks a host `lost` when it
//! runs out.
//!
//! Work protocol (see docs/architecture.md): the agent calls the control plane, never the other way round, so an
//! agent needs no reachable API of its own (a host behind NAT or a firewall only needs outbound HTTP and its
//! hub's UDP port).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

use crate::api::{self, AgentHeartbeat, AgentLease, AgentWork, ClusterState, HostCapacity};
use crate::server::control::MAX_WORK_WAIT_SECS;
use crate::server::hub_control::{HubControl, HubPeerEntry};
use crate::server::orchestrator::Orchestrator;
use crate::server::store::{ClusterRow, Store, User};

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
    /// The backend running the VMs of the namespaces placed on this host.
    pub backend: crate::server::run::BackendChoice,
    pub accel: String,
    pub max_starts: usize,
    pub snapshot_quota: u64,
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
        let hub: Arc<dyn HubControl> =
            crate::server::hub::start(hub_socket, key, endpoint.clone(), opts.hub_tun.clone())
                .await?;
        let public_key = hub.public_key();
        // The VMs of the namespaces placed here: the same orchestrator as a single-host server, on a local
        // SQLite store (this host's copy: its namespaces with the control plane's /24s, its clusters' VMs).
        let store = Arc::new(
            Store::open(&opts.data_dir.join(crate::server::run::STATE_FILE))
                .context("cannot open the agent's local state")?,
        );
        let backend = crate::server::run::backend_for(opts.backend, &opts.accel)?;
        let orchestrator = crate::server::run::start_orchestrator(
            store.clone(),
            backend,
            &opts.images_dir,
            &opts.data_dir,
            opts.max_starts,
            opts.snapshot_quota,
        )?;
        let runner = Arc::new(Runner {
            store,
            orchestrator,
            hub,
            work: Mutex::new(None),
            hub_peers: Mutex::new(HashMap::new()),
            sent: Mutex::new(HashMap::new()),
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(MAX_WORK_WAIT_SECS + 10))
            .build()?;
        tokio::select! {
            r = heartbeats(&opts, &instance, &endpoint, &public_key) => r,
            r = work_loop(&opts, &client, runner.clone()) => r,
            r = report_loop(&opts, &client, runner.clone()) => r,
            r = exec_loop(&opts, &client, runner.clone()) => r,
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

// ---- the work: what the control plane placed on this host ----

/// How long a poll for work is held at the control plane when nothing changes: the agent also re-applies its
/// work this often (a cluster whose delete was still running is made at the next round).
const WORK_WAIT_SECS: u64 = 5;
/// How often the clusters' state goes to the control plane (only what changed).
const REPORT_EVERY: Duration = Duration::from_millis(300);

/// The agent's side of the work: the local store and orchestrator, the hub, the last work received.
struct Runner {
    store: Arc<Store>,
    orchestrator: Arc<Orchestrator>,
    hub: Arc<dyn HubControl>,
    work: Mutex<Option<AgentWork>>,
    /// The peers the hub has: control plane id → (public key, address).
    hub_peers: Mutex<HashMap<i64, (String, String)>>,
    /// What was last reported of each cluster (by its control plane id).
    sent: Mutex<HashMap<i64, Sent>>,
}

#[derive(Clone, PartialEq)]
struct Sent {
    local_id: i64,
    last_seq: i64,
    summary: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runner {
    /// The local user of an engineer (made at first sight: the local store is this host's copy).
    fn local_user(&self, name: &str) -> anyhow::Result<User> {
        if let Some(u) = self
            .store
            .list_users()?
            .into_iter()
            .find(|u| u.name == name)
        {
            return Ok(u);
        }
        Ok(self.store.add_user(name)?.0)
    }

    /// Make this host match the work (blocking; the orchestrator spawns its drives on the runtime): bring up
    /// what is requested or missing, delete what is not listed (a namespace moved to another host while this
    /// one was lost: its VMs stop here), give the hub exactly the listed peers.
    fn apply(&self, work: &AgentWork) -> anyhow::Result<()> {
        let mut wanted_clusters: HashMap<(String, String), ()> = HashMap::new();
        let mut wanted_peers: HashMap<i64, (String, String, api::Subnet)> = HashMap::new();
        for ns in &work.namespaces {
            let user = self.local_user(&ns.user)?;
            let local = self.store.adopt_namespace(&user, ns.index)?;
            if local.subnet.to_string() != ns.subnet {
                tracing::warn!(
                    "namespace {}: here {} but the control plane says {}",
                    ns.user,
                    local.subnet,
                    ns.subnet
                );
                continue;
            }
            if !ns.ssh_keys.is_empty() {
                self.store.add_ssh_keys(
                    local.id,
                    &ns.ssh_keys,
                    crate::server::service::MAX_SSH_KEYS,
                )?;
            }
            for p in &ns.peers {
                wanted_peers.insert(
                    p.id,
                    (p.public_key.clone(), p.address.clone(), local.subnet),
                );
            }
            for c in &ns.clusters {
                wanted_clusters.insert((ns.user.clone(), c.name.clone()), ());
                let row = self.store.cluster(local.id, &c.name)?;
                match &row {
                    None => match self.orchestrator.up(&local, &c.name, &c.image) {
                        // Made from its image: as new as any reset asked for so far.
                        Ok((made, _)) => self.store.set_applied_gen(made.id, c.gen)?,
                        Err(e) => tracing::warn!("cluster {}/{}: {e}", ns.user, c.name),
                    },
                    Some(r) if r.image != c.image => {
                        // Another cluster of that name: this one goes first.
                        if r.state != ClusterState::Deleting {
                            drop(self.orchestrator.spawn_delete(r.clone()));
                        }
                    }
                    Some(r) => {
                        let applied = self
                            .store
                            .cluster_intent(r.id)?
                            .map_or(0, |i| i.applied_gen);
                        if c.gen > applied {
                            if let Err(e) = self.apply_intent(&local, r, c) {
                                tracing::warn!("cluster {}/{}: {e}", ns.user, c.name);
                            }
                        } else if c.state == ClusterState::Requested
                            && !r.state.is_transient()
                            && r.state != ClusterState::Ready
                        {
                            if let Err(e) = self.orchestrator.up(&local, &c.name, &c.image) {
                                tracing::warn!("cluster {}/{}: {e}", ns.user, c.name);
                            }
                        }
                    }
                }
            }
        }
        for user in self.store.list_users()? {
            let Some(ns) = self.store.namespace_of(user.id)? else {
                continue;
            };
            for c in self.store.clusters_in(ns.id)? {
                if !wanted_clusters.contains_key(&(user.name.clone(), c.name.clone()))
                    && c.state != ClusterState::Deleting
                {
                    tracing::info!(
                        "cluster {}/{} is not placed here (any more): deleting it",
                        user.name,
                        c.name
                    );
                    drop(self.orchestrator.spawn_delete(c));
                }
            }
        }
        let mut have = lock(&self.hub_peers);
        have.retain(|id, (key, addr)| {
            let keep = wanted_peers
                .get(id)
                .is_some_and(|(k, a, _)| k == key && a == addr);
            if !keep {
                self.hub.remove_peer(*id);
            }
            keep
        });
        for (id, (key, addr, subnet)) in wanted_peers {
            if have.contains_key(&id) {
                continue;
            }
            let Ok(address) = addr.parse() else {
                continue;
            };
            match self.hub.add_peer(HubPeerEntry {
                id,
                public_key: key.clone(),
                address,
                subnet,
            }) {
                Ok(()) => {
                    have.insert(id, (key, addr));
                }
                Err(e) => tracing::warn!("the hub refused peer {id}: {e:?}"),
            }
        }
        Ok(())
    }

    /// Act on a new wanted-state generation of a cluster: a reset when `reset_gen` is above the generation
    /// applied here, else stop or run it to match `want_running`. The generation is noted as applied (in the
    /// local store: an agent restart does not reset twice) once the orchestrator took the request; a cluster
    /// busy with something else (booting, stopping) is left for the next round (every poll answer: its next
    /// state change, or `WORK_WAIT_SECS`).
    fn apply_intent(
        &self,
        ns: &crate::server::store::NamespaceRow,
        r: &ClusterRow,
        c: &api::AgentCluster,
    ) -> anyhow::Result<()> {
        let applied = self
            .store
            .cluster_intent(r.id)?
            .map_or(0, |i| i.applied_gen);
        if r.state.is_transient() {
            return Ok(());
        }
        if c.reset_gen > applied {
            tracing::info!(
                "cluster {}/{}: reset (generation {})",
                ns.name,
                r.name,
                c.reset_gen
            );
            self.orchestrator.reset(r)?;
        } else if !c.want_running {
            if r.state == ClusterState::Ready {
                self.orchestrator.stop(r)?;
            }
            // Stopped already, or failed: nothing runs to stop.
        } else {
            // Resumes a stopped cluster, repairs a failed one, leaves a healthy one.
            self.orchestrator.up(ns, &r.name, &r.image)?;
        }
        self.store.set_applied_gen(r.id, c.gen)?;
        Ok(())
    }

    /// What changed since the last report (blocking).
    fn report(&self) -> anyhow::Result<(api::AgentReport, Vec<(i64, Sent)>)> {
        let Some(work) = lock(&self.work).clone() else {
            return Ok((api::AgentReport::default(), Vec::new()));
        };
        let sent = lock(&self.sent).clone();
        let users = self.store.list_users()?;
        let mut report = api::AgentReport::default();
        let mut next = Vec::new();
        for ns in &work.namespaces {
            let Some(user) = users.iter().find(|u| u.name == ns.user) else {
                continue;
            };
            let Some(local) = self.store.namespace_of(user.id)? else {
                continue;
            };
            for c in &ns.clusters {
                let Some(row) = self.store.cluster(local.id, &c.name)? else {
                    continue;
                };
                let before = sent.get(&c.id).filter(|s| s.local_id == row.id);
                let after_seq = match sent.get(&c.id) {
                    Some(s) if s.local_id == row.id => s.last_seq,
                    Some(_) => 0,
                    // Nothing sent since this agent started: on from what the control plane has, unless that
                    // number is past this copy's events (another copy of the cluster reported it).
                    None if c.reported_seq <= self.store.last_event_seq(row.id)? => c.reported_seq,
                    None => 0,
                };
                let events = self.store.events_after(row.id, after_seq)?;
                let view = self.orchestrator.view(&local, &row)?;
                let applied = self
                    .store
                    .cluster_intent(row.id)?
                    .map_or(0, |i| i.applied_gen);
                let summary = serde_json::to_string(&(
                    &view.state,
                    &view.reason,
                    &view.start_mode,
                    &view.vms,
                    view.disk_bytes,
                    applied,
                ))?;
                let unchanged = before.is_some_and(|s| s.summary == summary);
                // A state the control plane does not have yet is sent again until it has it, unless the
                // control plane waits for a newer generation (it would not take the state).
                if unchanged && events.is_empty() && (view.state == c.state || applied < c.gen) {
                    continue;
                }
                next.push((
                    c.id,
                    Sent {
                        local_id: row.id,
                        last_seq: events.last().map_or(after_seq, |e| e.seq),
                        summary,
                    },
                ));
                report.clusters.push(api::ClusterReport {
                    id: c.id,
                    state: view.state,
                    reason: view.reason,
                    start_mode: view.start_mode,
                    vms: view.vms,
                    disk_bytes: view.disk_bytes,
                    applied_gen: Some(applied),
                    last_seq: events.last().map(|e| e.seq),
                    events: events
                        .into_iter()
                        .map(|e| api::ReportedEvent {
                            vm: e.vm,
                            state: e.state,
                            message: e.message,
                        })
                        .collect(),
                });
            }
        }
        Ok((report, next))
    }
}

/// Long-poll the control plane for this host's work and apply it (again every `WORK_WAIT_SECS`).
async fn work_loop(
    opts: &AgentOptions,
    client: &reqwest::Client,
    runner: Arc<Runner>,
) -> anyhow::Result<()> {
    let url = format!(
        "{}{}/agent/jobs",
        opts.control.trim_end_matches('/'),
        api::API_PREFIX
    );
    let mut version: Option<String> = None;
    loop {
        let mut req = client
            .get(&url)
            .bearer_auth(&opts.token)
            .query(&[("wait", WORK_WAIT_SECS.to_string())]);
        if let Some(v) = &version {
            req = req.query(&[("after", v.as_str())]);
        }
        let work = match req.send().await {
            Ok(resp) if resp.status().is_success() => resp.json::<AgentWork>().await.ok(),
            Ok(resp) => {
                tracing::warn!("work poll: the control plane answered {}", resp.status());
                None
            }
            Err(e) => {
                tracing::debug!("work poll: {e}");
                None
            }
        };
        let Some(work) = work else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        version = Some(work.version.clone());
        *lock(&runner.work) = Some(work.clone());
        let r = runner.clone();
        match tokio::task::spawn_blocking(move || r.apply(&work)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot apply the work: {e:#}"),
            Err(e) => tracing::warn!("cannot apply the work: {e}"),
        }
    }
}

/// Send what changed in the clusters placed here, every `REPORT_EVERY`.
async fn report_loop(
    opts: &AgentOptions,
    client: &reqwest::Client,
    runner: Arc<Runner>,
) -> anyhow::Result<()> {
    let url = format!(
        "{}{}/agent/report",
        opts.control.trim_end_matches('/'),
        api::API_PREFIX
    );
    loop {
        tokio::time::sleep(REPORT_EVERY).await;
        let r = runner.clone();
        let (report, next) = match tokio::task::spawn_blocking(move || r.report()).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!("cannot read the clusters' state: {e:#}");
                continue;
            }
            Err(_) => continue,
        };
        if report.clusters.is_empty() {
            continue;
        }
        let sent = client
            .post(&url)
            .bearer_auth(&opts.token)
            .json(&report)
            .send()
            .await;
        if matches!(&sent, Ok(resp) if resp.status().is_success()) {
            lock(&runner.sent).extend(next);
        }
    }
}

// ---- `fcdev exec` sessions (see `server/exec_relay.rs`) ----

/// How long a poll for exec sessions is held at the control plane when none waits.
const EXEC_WAIT_SECS: u64 = 25;
/// How long a piece of output is tried again while the control plane cannot be reached.
const EXEC_POST_RETRY_FOR: Duration = Duration::from_secs(10);

/// Long-poll the control plane for `fcdev exec` sessions on this host and run each in a task of its own.
async fn exec_loop(
    opts: &AgentOptions,
    client: &reqwest::Client,
    runner: Arc<Runner>,
) -> anyhow::Result<()> {
    let base = format!(
        "{}{}/agent/execs",
        opts.control.trim_end_matches('/'),
        api::API_PREFIX
    );
    loop {
        let answer = client
            .get(&base)
            .bearer_auth(&opts.token)
            .query(&[("wait", EXEC_WAIT_SECS.to_string())])
            .send()
            .await;
        let execs = match answer {
            Ok(resp) if resp.status().is_success() => resp.json::<api::AgentExecs>().await.ok(),
            Ok(resp) => {
                tracing::warn!("exec poll: the control plane answered {}", resp.status());
                None
            }
            Err(e) => {
                tracing::debug!("exec poll: {e}");
                None
            }
        };
        let Some(execs) = execs else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        for job in execs.execs {
            let (client, runner) = (client.clone(), runner.clone());
            let url = format!("{base}/{}", job.id);
            let token = opts.token.clone();
            tokio::spawn(async move { run_session(client, url, token, runner, job).await });
        }
    }
}

impl Runner {
    /// The backend and the VM of a session's command (blocking).
    fn exec_target(
        &self,
        job: &api::AgentExec,
    ) -> anyhow::Result<(
        Arc<dyn crate::server::backend::Backend>,
        crate::server::backend::VmSpec,
    )> {
        let user = self
            .store
            .list_users()?
            .into_iter()
            .find(|u| u.name == job.user)
            .with_context(|| format!("no namespace of {} on this host", job.user))?;
        let ns = self
            .store
            .namespace_of(user.id)?
            .with_context(|| format!("no namespace of {} on this host", job.user))?;
        let row = self
            .store
            .cluster(ns.id, &job.cluster)?
            .with_context(|| format!("no cluster `{}` on this host", job.cluster))?;
        let spec = self.orchestrator.spec_of(&ns, &row, &job.vm)?;
        Ok((self.orchestrator.backend().clone(), spec))
    }
}

/// Run one session's command with this host's backend, as a single-host server does, and post its output to
/// the control plane piece by piece (numbered), then the exit code or an error. A 410 (the laptop went away, or
/// the control plane restarted) or a control plane unreachable for `EXEC_POST_RETRY_FOR` stops the command.
async fn run_session(
    client: reqwest::Client,
    url: String,
    token: String,
    runner: Arc<Runner>,
    job: api::AgentExec,
) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let j = job.clone();
    let target = tokio::task::spawn_blocking(move || runner.exec_target(&j)).await;
    let mut rx = match target {
        Ok(Ok((backend, spec))) => {
            crate::server::service::run_exec(backend, spec, job.command.clone())
        }
        Ok(Err(e)) => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.try_send(crate::server::service::ExecLine::Error(format!("{e:#}")));
            rx
        }
        Err(e) => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.try_send(crate::server::service::ExecLine::Error(e.to_string()));
            rx
        }
    };
    let keepalive = crate::server::exec_relay::AGENT_KEEPALIVE;
    let mut seq = 0u64;
    loop {
        use crate::server::service::ExecLine;
        let line = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(Some(ExecLine::Out(mut bytes))) => {
                // What else is already there goes in the same piece (up to 64 KB).
                while bytes.len() < 64 * 1024 {
                    match rx.try_recv() {
                        Ok(ExecLine::Out(more)) => bytes.extend_from_slice(&more),
                        Ok(other) => {
                            // The end came too: send the output first, then it.
                            let piece = api::ExecLine::Out {
                                out: b64.encode(&bytes),
                            };
                            if !post_piece(&client, &url, &token, seq, piece).await {
                                return;
                            }
                            seq += 1;
                            let last = end_line(other);
                            let _ = post_piece(&client, &url, &token, seq, last).await;
                            return;
                        }
                        Err(_) => break,
                    }
                }
                api::ExecLine::Out {
                    out: b64.encode(&bytes),
                }
            }
            Ok(Some(other)) => {
                let _ = post_piece(&client, &url, &token, seq, end_line(other)).await;
                return;
            }
            Ok(None) => {
                let last = api::ExecLine::Error {
                    error: "the command's runner ended without an exit code".into(),
                };
                let _ = post_piece(&client, &url, &token, seq, last).await;
                return;
            }
            // Nothing printed for a while: a keepalive, which also learns whether the laptop is still there.
            Err(_) => api::ExecLine::Out { out: String::new() },
        };
        if !post_piece(&client, &url, &token, seq, line).await {
            // Dropping the receiver stops the command.
            return;
        }
        seq += 1;
    }
}

fn end_line(line: crate::server::service::ExecLine) -> api::ExecLine {
    use crate::server::service::ExecLine;
    match line {
        ExecLine::Exit(exit) => api::ExecLine::Exit { exit },
        ExecLine::Error(error) => api::ExecLine::Error { error },
        ExecLine::Out(_) => api::ExecLine::Error {
            error: "output after the end".into(),
        },
    }
}

/// Post one piece; false when the session is over (any answer but success, or no answer for
/// `EXEC_POST_RETRY_FOR`).
async fn post_piece(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    seq: u64,
    line: api::ExecLine,
) -> bool {
    let piece = api::AgentExecOutput { seq, line };
    let started = tokio::time::Instant::now();
    loop {
        match client
            .post(url)
            .bearer_auth(token)
            .json(&piece)
            .send()
            .await
        {
            Ok(resp) if resp.status().is_success() => return true,
            Ok(resp) if resp.status().is_server_error() => {}
            Ok(resp) => {
                tracing::debug!("exec session {url}: {}", resp.status());
                return false;
            }
            Err(e) => tracing::debug!("exec session {url}: {e}"),
        }
        if started.elapsed() >= EXEC_POST_RETRY_FOR {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
