//! A wg-quick configuration for stock WireGuard clients (wg-quick, the macOS/Windows/iOS apps) from this
//! machine's key and its `PeerConfig`: the same peer, address and key as `fcdev tunnel`, so the two must not run
//! at once (one key is one endpoint at the hub).

use std::fmt::Write as _;

use crate::api::PeerConfig;

use super::keys::PrivateKey;
use super::MTU;

/// The peer address with its prefix (`10.240.0.2/32`).
fn with_prefix(address: &str) -> String {
    if address.contains('/') {
        address.to_string()
    } else {
        format!("{address}/32")
    }
}

/// The file's text. `profile` only goes into the comment at the top.
pub fn render(key: &PrivateKey, cfg: &PeerConfig, profile: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# fcdev: WireGuard configuration of profile `{profile}`, namespace `{}` (written by `fcdev tunnel --wg-config`).",
        cfg.namespace
    );
    s.push_str(
        "# The private key is this machine's fcdev key (keys/<profile>.key): do not run `fcdev tunnel` at the same\n\
         # time (and after it, give the hub ~30 s before this client's first handshake is accepted).\n\
         # Keep this file private (0600). The VMs (add them to /etc/hosts to use the names):\n",
    );
    for h in &cfg.hosts {
        let _ = writeln!(s, "#   {}  {}", h.address, h.name);
    }
    let _ = writeln!(s, "\n[Interface]");
    let _ = writeln!(s, "PrivateKey = {}", key.to_base64());
    let _ = writeln!(s, "Address = {}", with_prefix(&cfg.address));
    let _ = writeln!(s, "MTU = {MTU}");
    let _ = writeln!(s, "\n[Peer]");
    let _ = writeln!(s, "PublicKey = {}", cfg.server_public_key);
    let _ = writeln!(s, "Endpoint = {}", cfg.endpoint);
    let _ = writeln!(s, "AllowedIPs = {}", cfg.allowed_ips.join(", "));
    if cfg.keepalive > 0 {
        let _ = writeln!(s, "PersistentKeepalive = {}", cfg.keepalive);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::HostEntry;

    #[test]
    fn config_has_the_key_address_and_hub() {
        let key = PrivateKey::generate();
        let hub = PrivateKey::generate().public_key().to_base64();
        let cfg = PeerConfig {
            id: 1,
            name: "laptop".into(),
            address: "10.240.0.2".into(),
            server_public_key: hub.clone(),
            endpoint: "host.example:51820".into(),
            allowed_ips: vec!["10.240.0.0/24".into()],
            keepalive: 25,
            namespace: "alice".into(),
            dns_suffix: "alice.fcdev".into(),
            hosts: vec![HostEntry {
                name: "n1.alice.fcdev".into(),
                address: "10.240.0.10".into(),
            }],
        };
        let text = render(&key, &cfg, "default");
        for line in [
            format!("PrivateKey = {}", key.to_base64()),
            "Address = 10.240.0.2/32".to_string(),
            format!("PublicKey = {hub}"),
            "Endpoint = host.example:51820".to_string(),
            "AllowedIPs = 10.240.0.0/24".to_string(),
            "PersistentKeepalive = 25".to_string(),
            "#   10.240.0.10  n1.alice.fcdev".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        let interface = text.find("[Interface]").unwrap();
        let peer = text.find("[Peer]").unwrap();
        assert!(interface < text.find("PrivateKey").unwrap() && peer > interface);
    }
}
