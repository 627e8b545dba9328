//! What the client needs from a `PeerConfig`, parsed and checked once: addresses, keys, endpoint, names.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};

use crate::api::{PeerConfig, Subnet};

use super::keys::PublicKey;
use super::TunnelError;

#[derive(Debug, Clone)]
pub struct Plan {
    pub address: Ipv4Addr,
    pub server_key: PublicKey,
    pub endpoint: SocketAddr,
    /// The namespace subnet (routed through the tunnel).
    pub subnet: Subnet,
    pub keepalive: u16,
    pub namespace: String,
    pub dns_suffix: String,
    /// `n1`, `n1.<namespace>` and `n1.<namespace>.<suffix>` all map to the VM's address.
    pub hosts: HashMap<String, Ipv4Addr>,
}

/// The names a VM answers to: its full name as the server gives it (`n1.alice.fcdev`, or
/// `n1.web.alice.fcdev` outside the default cluster) and that name without `.fcdev` and without
/// `.<namespace>.fcdev` (`n1`, `n1.web`).
fn aliases(full: &str, namespace: &str) -> Vec<String> {
    let full = full.trim_end_matches('.').to_ascii_lowercase();
    let mut out = vec![full.clone()];
    let suffix = format!(".{}", crate::names::DNS_SUFFIX);
    if let Some(no_suffix) = full.strip_suffix(&suffix) {
        out.push(no_suffix.to_string());
        if let Some(short) = no_suffix.strip_suffix(&format!(".{namespace}")) {
            out.push(short.to_string());
        }
    } else {
        // A bare VM name.
        out.push(format!("{full}.{namespace}"));
        out.push(format!("{full}.{namespace}{suffix}"));
    }
    out
}

impl Plan {
    /// The laptop's side of the tunnel to this plan's hub: its key, keepalive and endpoint, recovering by
    /// itself when the hub forgets the session (both clients, TUN and rootless, start from this).
    pub fn client_peer(&self, key: &super::keys::PrivateKey) -> super::peer::Peer {
        let mut peer = super::peer::Peer::new(
            key,
            self.server_key,
            Some(self.keepalive).filter(|k| *k > 0),
            rand::random::<u32>(),
            None,
        );
        peer.set_endpoint(self.endpoint);
        peer.set_recovery(true);
        peer
    }

    pub fn from_config(cfg: &PeerConfig) -> Result<Plan, TunnelError> {
        let bad = |what: &str, v: &str| TunnelError::Config(format!("{what} `{v}`"));
        let address: Ipv4Addr = cfg
            .address
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| bad("peer address", &cfg.address))?;
        let server_key = PublicKey::from_base64(&cfg.server_public_key)?;
        let endpoint = cfg
            .endpoint
            .to_socket_addrs()
            .map_err(|_| bad("endpoint", &cfg.endpoint))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| bad("endpoint (no IPv4 address)", &cfg.endpoint))?;
        let first = cfg
            .allowed_ips
            .first()
            .ok_or_else(|| TunnelError::Config("no allowed_ips".into()))?;
        let subnet: Subnet = first.parse().map_err(|_| bad("allowed_ips", first))?;
        let mut hosts = HashMap::new();
        for h in &cfg.hosts {
            let ip: Ipv4Addr = h
                .address
                .parse()
                .map_err(|_| bad("host address", &h.address))?;
            for name in aliases(&h.name, &cfg.namespace) {
                hosts.insert(name, ip);
            }
        }
        Ok(Plan {
            address,
            server_key,
            endpoint,
            subnet,
            keepalive: cfg.keepalive,
            namespace: cfg.namespace.clone(),
            dns_suffix: cfg.dns_suffix.clone(),
            hosts,
        })
    }

    /// A VM name (`n1`, `n1.alice`, `n1.alice.fcdev`) or a dotted IPv4 address.
    pub fn resolve(&self, host: &str) -> Option<Ipv4Addr> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        host.parse().ok().or_else(|| self.hosts.get(&host).copied())
    }
}
