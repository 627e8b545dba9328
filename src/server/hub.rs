//! Glue between the control plane and the WireGuard hub (placeholder until the tunnel lands: keeps the hub's
//! identity and the peer list, forwards no packets).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::server::hub_control::{HubControl, HubPeerCounters, HubPeerEntry};

/// The hub's private key, kept 0600 in the data dir and created on first start.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<StaticSecret> {
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Ok(text) = std::fs::read_to_string(path) {
        let bytes = b64
            .decode(text.trim())
            .map_err(|e| anyhow::anyhow!("{} is not a base64 key: {e}", path.display()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} does not hold a 32-byte key", path.display()))?;
        return Ok(StaticSecret::from(arr));
    }
    let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
    crate::config::write_private(path, &format!("{}\n", b64.encode(secret.to_bytes())), 0o600)?;
    Ok(secret)
}

pub struct PlaceholderHub {
    public_key: String,
    endpoint: String,
    peers: Mutex<HashMap<i64, HubPeerEntry>>,
    _socket: std::net::UdpSocket,
}

pub async fn start(
    socket: std::net::UdpSocket,
    key: StaticSecret,
    endpoint: String,
    _tun: Option<String>,
) -> anyhow::Result<Arc<dyn HubControl>> {
    Ok(Arc::new(PlaceholderHub {
        public_key: base64::engine::general_purpose::STANDARD
            .encode(PublicKey::from(&key).as_bytes()),
        endpoint,
        peers: Mutex::new(HashMap::new()),
        _socket: socket,
    }))
}

impl HubControl for PlaceholderHub {
    fn public_key(&self) -> String {
        self.public_key.clone()
    }
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
    fn add_peer(&self, peer: HubPeerEntry) -> Result<(), String> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.id, peer);
        Ok(())
    }
    fn remove_peer(&self, id: i64) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    fn counters(&self, _id: i64) -> Option<HubPeerCounters> {
        None
    }
}
