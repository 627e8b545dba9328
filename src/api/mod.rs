//! Wire types shared by the client and the server (JSON over HTTP, versioned under `/v1`).

use serde::{Deserialize, Serialize};

pub mod error;
pub mod net;

pub use error::{ApiError, ErrorBody};
pub use net::Subnet;

/// The API version prefix every route lives under.
pub const API_PREFIX: &str = "/v1";

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
        )
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
    /// How the VMs were started: "restore" (onboarding snapshot) or "boot".
    pub start_mode: Option<String>,
    pub vms: Vec<Vm>,
    /// The newest progress event when this view was taken: follow `/events?after=event_seq` for what comes next.
    #[serde(default)]
    pub event_seq: i64,
    pub created_at: String,
    pub updated_at: String,
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
