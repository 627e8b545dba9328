//! Wire types shared by the client and the server (JSON over HTTP, versioned under `/v1`).

use serde::{Deserialize, Serialize};

pub mod error;
pub mod net;

pub use error::{ApiError, ErrorBody};
pub use net::Subnet;

/// The API version prefix every route lives under.
pub const API_PREFIX: &str = "/v1";

/// The API port of a server on this machine (`fcdev server --dev`, `fcdev up --local`).
pub const DEV_API_PORT: u16 = 7070;

/// The response header carrying the server's fcdev version (on every response, errors included).
pub const VERSION_HEADER: &str = "fcdev-version";

/// `(major, minor)` of a version string (`0.1.0` → `("0", "1")`): clients and servers of one minor version
/// speak the same API.
pub fn minor_version(version: &str) -> (&str, &str) {
    let mut parts = version.trim().split('.');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub backend: String,
    pub accelerator: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Me {
    pub user: String,
    pub namespace: Option<Namespace>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub subnet: String,
    pub gateway: String,
    /// The hub tunnel traffic of this namespace goes to (`host:port`): the server's own, or on a control plane
    /// the hub of the namespace's host. A wg-config exported for another hub must be exported again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_endpoint: Option<String>,
    /// That hub's public key (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_public_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    pub description: String,
    pub vms: Vec<ImageVm>,
    pub has_snapshot: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageVm {
    pub name: String,
    pub role: String,
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// `POST /clusters/{name}/vms/{vm}/exec`: a shell command line, run with `sh -c` in the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    pub command: String,
}

/// One line of an exec's answer (NDJSON): output bytes (base64) as they come, then the exit code or an error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ExecLine {
    Out { out: String },
    Exit { exit: i32 },
    Error { error: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateCluster {
    pub name: String,
    pub image: String,
    /// ssh public keys to authorize in the VMs (`fcdev ssh`); kept for the namespace, given to each VM at boot or
    /// restore, never baked into the shared image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    Requested,
    Cloning,
    Booting,
    Ready,
    Resetting,
    Deleting,
    Failed,
    /// A named snapshot is being saved (the VMs are paused for a moment).
    Saving,
    /// A named snapshot is being restored.
    Restoring,
    /// `fcdev stop`: the VMs' state is being saved to disk.
    Stopping,
    /// The VMs' memory and disks are on disk, no qemu runs; `fcdev start` (or `up`) resumes them.
    Stopped,
    /// The host it ran on is lost (a control plane with agents); `fcdev up` re-creates it on another host.
    Lost,
}

impl ClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::Requested => "requested",
            ClusterState::Cloning => "cloning",
            ClusterState::Booting => "booting",
            ClusterState::Ready => "ready",
            ClusterState::Resetting => "resetting",
            ClusterState::Deleting => "deleting",
            ClusterState::Failed => "failed",
            ClusterState::Saving => "saving",
            ClusterState::Restoring => "restoring",
            ClusterState::Stopping => "stopping",
            ClusterState::Stopped => "stopped",
            ClusterState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => ClusterState::Requested,
            "cloning" => ClusterState::Cloning,
            "booting" => ClusterState::Booting,
            "ready" => ClusterState::Ready,
            "resetting" => ClusterState::Resetting,
            "deleting" => ClusterState::Deleting,
            "failed" => ClusterState::Failed,
            "saving" => ClusterState::Saving,
            "restoring" => ClusterState::Restoring,
            "stopping" => ClusterState::Stopping,
            "stopped" => ClusterState::Stopped,
            "lost" => ClusterState::Lost,
            _ => return None,
        })
    }

    /// A state the orchestrator will move on from by itself.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ClusterState::Requested
                | ClusterState::Cloning
                | ClusterState::Booting
                | ClusterState::Resetting
                | ClusterState::Deleting
                | ClusterState::Saving
                | ClusterState::Restoring
                | ClusterState::Stopping
        )
    }

    /// A state whose event ends a progress stream (`/events`).
    pub fn ends_stream(state: &str) -> bool {
        matches!(state, "ready" | "failed" | "deleted" | "stopped" | "lost")
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Pending,
    Starting,
    Ready,
    Stopped,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Starting => "starting",
            VmState::Ready => "ready",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => VmState::Pending,
            "starting" => VmState::Starting,
            "ready" => VmState::Ready,
            "stopped" => VmState::Stopped,
            "failed" => VmState::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub image: String,
    pub namespace: String,
    pub state: ClusterState,
    /// Why the cluster failed, with the backend's log tail when there is one.
    pub reason: Option<String>,
    /// How the VMs were started: "restore" (onboarding snapshot), "boot", or "resume" (a named snapshot, or
    /// `start` after `stop`).
    pub start_mode: Option<String>,
    /// Bytes on disk of a stopped cluster (its disks and saved memory); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    pub vms: Vec<Vm>,
    /// The host it runs on (a control plane with agents); absent on a single-host server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The newest progress event when this view was taken: follow `/events?after=event_seq` for what comes next.
    #[serde(default)]
    pub event_seq: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// `POST /v1/clusters/{name}/snapshots`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateSnapshot {
    pub name: String,
}

/// A named snapshot of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub cluster: String,
    /// The image the cluster (and the snapshot) came from.
    pub image: String,
    /// Bytes it added on disk: its saved memory and the disk layers frozen for it.
    pub size_bytes: u64,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    pub name: String,
    pub role: String,
    pub address: String,
    /// `<vm>.<namespace>.fcdev`
    pub hostname: String,
    pub state: VmState,
    pub detail: Option<String>,
    /// The VM's ssh host public key (`ssh-ed25519 AAAA…`) when the server made it (restored VMs): what
    /// `fcdev ssh` and the ssh config of `fcdev ssh-config` check the VM against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

/// One progress event of a cluster, sent over `GET /v1/clusters/{name}/events` (server-sent events).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterEvent {
    pub seq: i64,
    pub cluster: String,
    /// The VM the event is about, or None for the cluster as a whole.
    pub vm: Option<String>,
    pub state: String,
    pub message: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreatePeer {
    pub name: String,
    /// The peer's x25519 public key, base64 (like `wg`). The private key never leaves the laptop.
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerConfig {
    pub id: i64,
    pub name: String,
    pub address: String,
    pub server_public_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub keepalive: u16,
    pub namespace: String,
    pub dns_suffix: String,
    /// VM name -> address, so the client can resolve `<vm>.<namespace>.fcdev` itself.
    pub hosts: Vec<HostEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostEntry {
    pub name: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    pub id: i64,
    pub name: String,
    pub public_key: String,
    pub address: String,
    /// Seconds since the last completed handshake, None when there was none.
    pub handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub dropped_packets: u64,
    pub endpoint: Option<String>,
}

/// What a host offers (`fcdev server --role agent` reports it with every heartbeat).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostCapacity {
    pub memory_mb: u64,
    /// Memory not in use now (MemAvailable): what placement compares.
    pub free_memory_mb: u64,
    pub cpus: u32,
    /// Free disk under the agent's data dir.
    pub disk_free_bytes: u64,
    /// The images the agent has (names).
    pub images: Vec<String>,
}

/// `POST /v1/agent/heartbeat`: an agent registers (its first heartbeat) and renews its lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentHeartbeat {
    /// The host's name (`fcdev server host add NAME`); must be the name of the token's host.
    pub name: String,
    /// This agent's identity, kept in its data dir: a restarted agent is the same agent, a second one on
    /// another machine with the same name is not.
    pub instance: String,
    /// `host:port` laptops send WireGuard to, on this host.
    pub hub_endpoint: String,
    /// The host hub's x25519 public key, base64.
    pub hub_public_key: String,
    pub capacity: HostCapacity,
}

/// `GET /v1/agent/jobs?after=VERSION&wait=SECS`: what the agent's host must run. The answer comes at once when
/// it differs from `after`, else when it changes or after `wait` seconds (a long poll).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentWork {
    /// Changes whenever anything below does; the agent sends it back as `after`.
    pub version: String,
    /// The namespaces placed on this host, with their clusters and WireGuard peers.
    pub namespaces: Vec<AgentNamespace>,
}

/// One namespace placed on a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentNamespace {
    /// Its engineer (and the namespace's name).
    pub user: String,
    /// Its number in the pool (its /24 is `subnet`).
    pub index: u32,
    pub subnet: String,
    pub ssh_keys: Vec<String>,
    pub clusters: Vec<AgentCluster>,
    pub peers: Vec<AgentPeer>,
}

/// A cluster the host must run (one it runs that is not listed must go).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentCluster {
    /// The control plane's id (reports name it).
    pub id: i64,
    pub name: String,
    pub image: String,
    /// Its state at the control plane: `requested` asks the agent to bring it up (a new, failed, stopped or
    /// moved cluster).
    pub state: ClusterState,
    /// The wanted-state generation: bumped by every request the agent must act on (`up` of a cluster that is
    /// not ready, reset, stop, start). The agent acts when it is above the one it applied, and reports that.
    #[serde(default)]
    pub gen: i64,
    /// The `gen` of the last reset: the agent resets its copy when this is above the `gen` it applied.
    #[serde(default)]
    pub reset_gen: i64,
    /// Stopped (`fcdev stop`) or running.
    #[serde(default = "yes")]
    pub want_running: bool,
    /// The agent's own number of the last event of this cluster the control plane has: a restarted agent
    /// reports the events after it (not all of them again).
    #[serde(default)]
    pub reported_seq: i64,
}

fn yes() -> bool {
    true
}

/// A laptop's WireGuard peer the host's hub must accept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentPeer {
    pub id: i64,
    pub public_key: String,
    pub address: String,
}

/// `POST /v1/agent/report`: the state of the clusters an agent runs, with their new events.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentReport {
    pub clusters: Vec<ClusterReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterReport {
    /// The control plane's id of the cluster.
    pub id: i64,
    pub state: ClusterState,
    pub reason: Option<String>,
    pub start_mode: Option<String>,
    pub vms: Vec<Vm>,
    /// Events since the last report (the control plane numbers them again).
    pub events: Vec<ReportedEvent>,
    /// Bytes on disk while stopped.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// The wanted-state generation (`AgentCluster::gen`) applied to this cluster: the control plane takes the
    /// state only from a report at its current one. None (an older agent): taken as it is.
    #[serde(default)]
    pub applied_gen: Option<i64>,
    /// The agent's own number of the last event in `events` (None: no events).
    #[serde(default)]
    pub last_seq: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReportedEvent {
    pub vm: Option<String>,
    pub state: String,
    pub message: String,
}

/// The answer to a heartbeat: how long the lease lasts and when to send the next one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentLease {
    pub name: String,
    pub lease_secs: u64,
    /// Send the next heartbeat after this many milliseconds (a third of the lease).
    pub heartbeat_ms: u64,
}

/// `GET /v1/agent/execs`: the `fcdev exec` sessions waiting for this agent's host (each is handed out once).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentExecs {
    pub execs: Vec<AgentExec>,
}

/// One `fcdev exec` to run on the agent's host: a shell line in a VM of an engineer's cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentExec {
    /// The session's id (random): the agent posts the output to `/v1/agent/execs/{id}`.
    pub id: String,
    /// The engineer (the namespace's name).
    pub user: String,
    pub cluster: String,
    pub vm: String,
    pub command: String,
}

/// `POST /v1/agent/execs/{id}`: the next piece of a session's answer, numbered from 0 (a retried piece is taken
/// once). `{"seq": 4, "out": ""}` is a keepalive: nothing for the laptop, but the answer says whether it is still
/// there (410 when not).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentExecOutput {
    pub seq: u64,
    #[serde(flatten)]
    pub line: ExecLine,
}
