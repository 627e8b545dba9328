//! Glue between the control plane and the WireGuard hub (`crate::tunnel::Hub`): the server's key file and
//! the `HubControl` the HTTP API calls.

use std::path::Path;
use std::sync::Arc;

use crate::server::hub_control::{HubControl, HubPeerCounters, HubPeerEntry, HubPeerError};
use crate::tunnel::{Hub, HubConfig, HubPeer, PrivateKey, PublicKey, TunnelError};

/// Persistent keepalive the hub sends to peers (seconds).
pub const HUB_KEEPALIVE: u16 = 25;

/// The hub's private key, kept 0600 in the data dir and created on first start.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    Ok(PrivateKey::load_or_generate(path)?)
}

pub struct TunnelHub {
    hub: Hub,
    endpoint: String,
}

/// Starts the hub on `socket` (already bound), with its TUN device `tun` in the current network namespace.
pub async fn start(
    socket: std::net::UdpSocket,
    key: PrivateKey,
    endpoint: String,
    tun: Option<String>,
) -> anyhow::Result<Arc<dyn HubControl>> {
    let cfg = HubConfig {
        listen: socket.local_addr()?,
        private_key: key,
        tun_name: tun,
        keepalive: HUB_KEEPALIVE,
    };
    let hub = Hub::with_socket(socket, cfg).await?;
    Ok(Arc::new(TunnelHub { hub, endpoint }))
}

impl HubControl for TunnelHub {
    fn public_key(&self) -> String {
        self.hub.public_key_base64()
    }
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
    fn add_peer(&self, peer: HubPeerEntry) -> Result<(), HubPeerError> {
        let error = |e: TunnelError| match e {
            TunnelError::InvalidKey(m) => HubPeerError::InvalidKey(m),
            e => HubPeerError::Refused(e.to_string()),
        };
        let public_key = PublicKey::from_base64(&peer.public_key).map_err(error)?;
        self.hub
            .add_peer(HubPeer {
                id: peer.id,
                public_key,
                address: peer.address,
                subnet: peer.subnet,
            })
            .map_err(error)
    }
    fn remove_peer(&self, id: i64) {
        self.hub.remove_peer(id);
    }
    fn peer_ids(&self) -> Vec<i64> {
        self.hub.peer_ids()
    }
    fn counters(&self, id: i64) -> Option<HubPeerCounters> {
        self.hub
            .stats()
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| HubPeerCounters {
                handshake_age: s.handshake_age,
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
                dropped_packets: s.dropped,
                endpoint: s.endpoint.map(|e| e.to_string()),
            })
    }
}
