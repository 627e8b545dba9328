//! What the control API needs from the WireGuard hub: its identity, and peers added, removed and counted.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::api::Subnet;

#[derive(Debug, Clone)]
pub struct HubPeerEntry {
    pub id: i64,
    pub public_key: String,
    pub address: Ipv4Addr,
    /// The peer's namespace /24: the only place its packets may go.
    pub subnet: Subnet,
}

#[derive(Debug, Clone, Default)]
pub struct HubPeerCounters {
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub dropped_packets: u64,
    pub endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubPeerError {
    /// Not a key the hub may accept (not 32 bytes, or a point of small order).
    #[error("{0}")]
    InvalidKey(String),
    /// Another peer holds the address or key.
    #[error("{0}")]
    Refused(String),
}

pub trait HubControl: Send + Sync {
    /// The hub's x25519 public key, base64.
    fn public_key(&self) -> String;
    /// `host:port` the peers send to.
    fn endpoint(&self) -> String;
    /// Accepts the peer; the same peer again is a no-op that keeps its session.
    fn add_peer(&self, peer: HubPeerEntry) -> Result<(), HubPeerError>;
    fn remove_peer(&self, id: i64);
    /// The ids of the peers the hub accepts now.
    fn peer_ids(&self) -> Vec<i64>;
    fn counters(&self, id: i64) -> Option<HubPeerCounters>;
}
