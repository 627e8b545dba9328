//! One WireGuard peer: a boringtun `Tunn`, its current endpoint and its timers. This is the only file that
//! names boringtun (keys are plain `x25519-dalek` in `keys.rs`), so moving to a maintained fork is a
//! one-file change.
//!
//! What such a move touches, all in this file:
//! - **Imports and `make_tunn`**: `Tunn::new(secret, public, psk, keepalive, index, limiter)`. NepTUN keeps
//!   boringtun 0.6/0.7's API (rename the crate path). Mullvad's GotaTun takes an `Arc<RateLimiter>` (not an
//!   `Option`), so a client needs a limiter of its own.
//! - **The buffer model**: boringtun writes into a caller's `out` buffer and returns a `TunnResult` that
//!   borrows it; [`Outcome`] mirrors that (`Network(&[u8])`, `Ipv4(&[u8])`). GotaTun owns its packets
//!   (`Packet`/`WgKind` over `BytesMut`: `handle_outgoing_packet`, `handle_incoming_packet`,
//!   `get_queued_packets` instead of `flush`), so `encapsulate`, `decapsulate`, `flush`, `tick` and
//!   `initiate` would copy the result into `out` (or [`Outcome`] would carry an owned buffer, a change
//!   to its callers in `hub.rs`, `tun_mode.rs` and `rootless.rs`).
//! - **The index scheme**: [`Addressee::Index`] is our 24-bit local index, read from the upper 24 bits of
//!   the receiver index (`receiver_idx >> 8`). Both forks keep `index << 8`; a fork that changed it would
//!   change only [`addressee`].
//! - **The hub's pre-checks**: [`addressee`] uses `RateLimiter::verify_packet` and
//!   `handshake::parse_handshake_anon` (identify an initiator before any per-peer state). GotaTun parses
//!   into `WgKind` first and its rate limiter takes the parsed packet.
//! - **Stats and timers**: `Tunn::stats()` (tx/rx bytes) and `update_timers`; our own handshake clock and
//!   the recovery nudge stay as they are.
//!
//! Nothing else changes: [`Peer`], [`Outcome`], [`PeerStats`], [`HandshakeLimiter`] and [`addressee`] are the
//! boundary the hub and both clients use, and keys cross it as bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::keys::{PrivateKey, PublicKey};

/// Room an output buffer needs on top of the packet it carries (WireGuard data header + tag).
pub const OVERHEAD: usize = 32;
/// The smallest output buffer [`Peer`] accepts (a handshake initiation is 148 bytes).
pub const MIN_OUT: usize = 148;

/// Handshakes per second a hub answers before it demands cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 10;
/// How long a client waits for any answer after sending before it starts a new handshake itself
/// (boringtun alone waits 15 s; a restarted hub forgot the session, so recover faster).
const NUDGE_AFTER: Duration = Duration::from_secs(5);

/// What to do with the result of a peer operation.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Nothing to send.
    Done,
    /// Send this datagram to the peer's endpoint.
    Network(&'a [u8]),
    /// An IPv4 packet came out of the tunnel.
    Ipv4(&'a [u8]),
    /// The datagram was not valid for this peer (bad MAC, replay, IPv6, garbage), or the tunnel is down.
    Rejected,
}

/// Handshake age and byte counters of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub handshake_age: Option<Duration>,
    /// How long our handshake initiations have gone unanswered: since the first one sent after the last
    /// completed handshake (None: none waits). A hub that is gone, or holds another key now, never answers.
    pub handshake_unanswered: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

pub struct Peer {
    tunn: Tunn,
    /// What `tunn` was made from, to make it again (see [`Peer::decapsulate`]).
    private: PrivateKey,
    remote: PublicKey,
    index: u32,
    limiter: Option<HandshakeLimiter>,
    /// When the last handshake completed (our own clock, not boringtun's).
    last_handshake: Option<Instant>,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    last_rx: Instant,
    last_tx: Instant,
    last_nudge: Option<Instant>,
    recover: bool,
    /// The first handshake initiation sent since the last completed handshake.
    initiation_pending: Option<Instant>,
}

fn make_tunn(
    private: &PrivateKey,
    remote: PublicKey,
    keepalive: Option<u16>,
    index: u32,
    limiter: Option<&HandshakeLimiter>,
) -> Tunn {
    Tunn::new(
        x25519::StaticSecret::from(private.to_bytes()),
        x25519::PublicKey::from(remote.0),
        None,
        keepalive.filter(|k| *k > 0),
        index,
        limiter.map(|l| l.0.clone()),
    )
}

/// Message types of the WireGuard wire format.
const HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;

fn outcome(r: TunnResult<'_>) -> Outcome<'_> {
    match r {
        TunnResult::Done => Outcome::Done,
        TunnResult::WriteToNetwork(b) => Outcome::Network(b),
        TunnResult::WriteToTunnelV4(b, _) => Outcome::Ipv4(b),
        TunnResult::WriteToTunnelV6(..) | TunnResult::Err(_) => Outcome::Rejected,
    }
}

impl Peer {
    /// `index` is a 24-bit local index; the receiver index of every datagram the peer sends us carries it in
    /// its upper 24 bits, which is how a hub finds the peer of a data packet.
    pub fn new(
        private: &PrivateKey,
        remote: PublicKey,
        keepalive: Option<u16>,
        index: u32,
        limiter: Option<&HandshakeLimiter>,
    ) -> Peer {
        let index = index & 0x00ff_ffff;
        let limiter = limiter.cloned();
        let tunn = make_tunn(private, remote, keepalive, index, limiter.as_ref());
        let now = Instant::now();
        Peer {
            tunn,
            private: private.clone(),
            remote,
            index,
            limiter,
            last_handshake: None,
            endpoint: None,
            keepalive,
            last_rx: now,
            last_tx: now,
            last_nudge: None,
            recover: false,
            initiation_pending: None,
        }
    }

    /// Client side: re-handshake on its own after 5 s without an answer to what it sent, or when even the
    /// keepalives stopped (a restarted hub forgot the session). The hub leaves this off: a laptop that went
    /// away is not chased.
    pub fn set_recovery(&mut self, on: bool) {
        self.recover = on;
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    pub fn set_endpoint(&mut self, endpoint: SocketAddr) {
        self.endpoint = Some(endpoint);
    }

    /// Encrypts an IP packet. `out` must hold `packet.len() + OVERHEAD` and at least [`MIN_OUT`] bytes; a
    /// smaller buffer or a bigger packet is refused rather than panicking inside boringtun.
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> Outcome<'a> {
        if out.len() < MIN_OUT || out.len() < packet.len() + OVERHEAD {
            return Outcome::Rejected;
        }
        self.last_tx = Instant::now();
        let r = outcome(self.tunn.encapsulate(packet, out));
        self.note_initiation(r)
    }

    /// Decrypts a datagram received from `from`. When it authenticates, `from` becomes the peer's endpoint
    /// (roaming: the last authenticated source wins). After [`Outcome::Network`], call [`Peer::flush`] until
    /// it returns [`Outcome::Done`]: packets queued during a handshake go out then.
    pub fn decapsulate<'a>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Outcome<'a> {
        if datagram.is_empty() || out.len() < MIN_OUT || out.len() < datagram.len() {
            return Outcome::Rejected;
        }
        let kind = datagram[0];
        if self.endpoint.is_none() && kind == HANDSHAKE_INIT {
            // First contact. boringtun's clock (`TimeCurrent`) only moves in `update_timers`, which nobody
            // calls for a peer without an endpoint: a session established now would be stamped with the
            // time of the last tick (for a hub, when the peer was loaded) and expire at once if that was
            // more than 180 s ago. Nothing was ever authenticated on this `Tunn`, so start a fresh one whose
            // clock starts now.
            self.tunn = make_tunn(
                &self.private,
                self.remote,
                self.keepalive,
                self.index,
                self.limiter.as_ref(),
            );
        }
        let r = outcome(self.tunn.decapsulate(Some(from.ip()), datagram, out));
        // An initiation is authenticated only when answered with a response: a cookie reply (under load)
        // answers anyone.
        let (authenticated, handshake) = match (&r, kind) {
            (Outcome::Rejected, _) => (false, false),
            (Outcome::Network(reply), HANDSHAKE_INIT) => {
                let ok = reply.first() == Some(&HANDSHAKE_RESPONSE);
                (ok, ok)
            }
            // A response to our initiation was accepted (boringtun answers it with a keepalive).
            (Outcome::Network(_), HANDSHAKE_RESPONSE) => (true, true),
            _ => (true, false),
        };
        if authenticated {
            let now = Instant::now();
            self.endpoint = Some(from);
            self.last_rx = now;
            if handshake {
                self.last_handshake = Some(now);
                self.initiation_pending = None;
            }
        }
        r
    }

    /// Sends what was queued while there was no session.
    /// The receive path of every end of the tunnel (hub, TUN client, rootless client): decapsulate one
    /// datagram; what must go back to the peer (a handshake answer, then the packets queued behind it) goes
    /// to `send`, a packet that came out of the tunnel to `deliver` (which applies that end's isolation rule
    /// and queues it). Returns whether the datagram was valid for this peer.
    pub fn receive(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        mut send: impl FnMut(&[u8]),
        mut deliver: impl FnMut(&[u8]),
    ) -> bool {
        match self.decapsulate(from, datagram, out) {
            Outcome::Network(reply) => {
                send(reply);
                while let Outcome::Network(queued) = self.flush(out) {
                    send(queued);
                }
                true
            }
            Outcome::Ipv4(packet) => {
                deliver(packet);
                true
            }
            Outcome::Done => true,
            Outcome::Rejected => false,
        }
    }

    pub fn flush<'a>(&mut self, out: &'a mut [u8]) -> Outcome<'a> {
        if out.len() < 2048 {
            return Outcome::Rejected;
        }
        outcome(self.tunn.decapsulate(None, &[], out))
    }

    /// Runs the WireGuard timers (handshake retries, rekeying, keepalive). Call every ~250 ms.
    pub fn tick<'a>(&mut self, out: &'a mut [u8]) -> Outcome<'a> {
        if out.len() < MIN_OUT {
            return Outcome::Rejected;
        }
        let now = Instant::now();
        let silent = now.duration_since(self.last_rx);
        let keepalive = Duration::from_secs(u64::from(self.keepalive.unwrap_or(0)));
        let waiting = self.last_tx > self.last_rx && silent >= NUDGE_AFTER;
        let lost = !keepalive.is_zero() && silent >= keepalive + Duration::from_secs(10);
        let nudged_recently = self
            .last_nudge
            .is_some_and(|t| now.duration_since(t) < NUDGE_AFTER);
        if self.recover && self.endpoint.is_some() && (waiting || lost) && !nudged_recently {
            self.last_nudge = Some(now);
            let r = outcome(self.tunn.format_handshake_initiation(out, true));
            return self.note_initiation(r);
        }
        let r = outcome(self.tunn.update_timers(out));
        self.note_initiation(r)
    }

    /// Remember when an initiation we send started waiting for its answer.
    fn note_initiation<'a>(&mut self, r: Outcome<'a>) -> Outcome<'a> {
        if let Outcome::Network(d) = &r {
            if d.first() == Some(&HANDSHAKE_INIT) && self.initiation_pending.is_none() {
                self.initiation_pending = Some(Instant::now());
            }
        }
        r
    }

    /// Starts a handshake now (client start-up).
    pub fn initiate<'a>(&mut self, out: &'a mut [u8]) -> Outcome<'a> {
        if out.len() < MIN_OUT {
            return Outcome::Rejected;
        }
        self.last_nudge = Some(Instant::now());
        let r = outcome(self.tunn.format_handshake_initiation(out, false));
        self.note_initiation(r)
    }

    /// `handshake_age` is the time since the last completed handshake, measured on our own clock.
    pub fn stats(&self) -> PeerStats {
        let (_, tx, rx, _, _) = self.tunn.stats();
        PeerStats {
            handshake_age: self.last_handshake.map(|t| t.elapsed()),
            handshake_unanswered: self.initiation_pending.map(|t| t.elapsed()),
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
        }
    }
}

/// Handshake rate limiting (cookies under load) shared by all peers of a hub.
#[derive(Clone)]
pub struct HandshakeLimiter(Arc<RateLimiter>);

impl HandshakeLimiter {
    pub fn new(own: &PrivateKey) -> Self {
        let public = x25519::PublicKey::from(own.public_key().0);
        HandshakeLimiter(Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)))
    }

    /// Call once a second.
    pub fn reset(&self) {
        self.0.reset_count();
    }
}

/// Who a datagram arriving at a hub is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressee {
    /// A handshake initiation from the holder of this public key.
    Initiator(PublicKey),
    /// A datagram for the session whose local 24-bit index is this.
    Index(u32),
    /// The hub is under load: send back the cookie reply of this length written into `reply`.
    Cookie(usize),
}

/// Finds the peer a datagram is for without touching any peer state. Garbage gives `None`. Handshake
/// messages pass the MAC check and, under load, the cookie check of `limiter` first, so unauthenticated
/// floods never reach the Diffie-Hellman that identifies an initiator.
pub fn addressee(
    own: &PrivateKey,
    limiter: &HandshakeLimiter,
    from: SocketAddr,
    datagram: &[u8],
    reply: &mut [u8],
) -> Option<Addressee> {
    if reply.len() < MIN_OUT {
        return None;
    }
    let packet = match limiter.0.verify_packet(Some(from.ip()), datagram, reply) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => return Some(Addressee::Cookie(cookie.len())),
        Err(_) => return None,
    };
    match packet {
        Packet::HandshakeInit(init) => {
            let secret = x25519::StaticSecret::from(own.to_bytes());
            let public = x25519::PublicKey::from(own.public_key().0);
            let half = parse_handshake_anon(&secret, &public, &init).ok()?;
            Some(Addressee::Initiator(PublicKey(half.peer_static_public)))
        }
        Packet::HandshakeResponse(r) => Some(Addressee::Index(r.receiver_idx >> 8)),
        Packet::PacketCookieReply(r) => Some(Addressee::Index(r.receiver_idx >> 8)),
        Packet::PacketData(d) => Some(Addressee::Index(d.receiver_idx >> 8)),
    }
}
