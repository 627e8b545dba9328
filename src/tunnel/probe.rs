//! One WireGuard handshake with the hub and nothing else (for `fcdev doctor`): the same [`Peer`] the tunnel uses,
//! from a fresh UDP socket. The hub then knows this socket as the peer's endpoint until the next handshake of a
//! tunnel (which re-handshakes on its own within seconds).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::keys::PrivateKey;
use super::peer::{Outcome, Peer};
use super::plan::Plan;
use super::TunnelError;

/// How often the initiation is sent again while no answer came (UDP may drop it).
const RESEND: Duration = Duration::from_secs(1);

/// Completes one handshake with the hub of `plan` within `timeout`; returns how long it took.
pub async fn handshake(
    key: &PrivateKey,
    plan: &Plan,
    timeout: Duration,
) -> Result<Duration, TunnelError> {
    let sock = tokio::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await
        .map_err(TunnelError::io("binding a UDP socket"))?;
    let mut peer = Peer::new(key, plan.server_key, None, rand::random::<u32>(), None);
    peer.set_endpoint(plan.endpoint);
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let unanswered = || {
        TunnelError::Config(format!(
            "no handshake answer from the hub at {} within {} s",
            plan.endpoint,
            timeout.as_secs()
        ))
    };
    loop {
        if let Outcome::Network(init) = peer.initiate(&mut out) {
            sock.send_to(init, plan.endpoint)
                .await
                .map_err(TunnelError::io(format!("sending to {}", plan.endpoint)))?;
        }
        let resend = tokio::time::Instant::now() + RESEND;
        loop {
            let wait = resend.min(deadline);
            let received = tokio::time::timeout_at(wait, sock.recv_from(&mut buf)).await;
            let (n, from) = match received {
                Ok(r) => r.map_err(TunnelError::io("receiving from the hub"))?,
                Err(_) if tokio::time::Instant::now() >= deadline => return Err(unanswered()),
                Err(_) => break,
            };
            if from != plan.endpoint {
                continue;
            }
            if let Outcome::Network(reply) = peer.decapsulate(from, &buf[..n], &mut out) {
                // The keepalive that confirms the session to the hub.
                let _ = sock.send_to(reply, from).await;
            }
            if peer.stats().handshake_age.is_some() {
                return Ok(start.elapsed());
            }
        }
    }
}
