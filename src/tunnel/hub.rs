//! The server end: one UDP socket for every peer, one [`Peer`] per engineer device, cryptokey routing
//! (outbound packets pick the peer by destination /32) and namespace isolation, with a host TUN device.
//!
//! Data path: one thread reads UDP and writes the TUN, one reads the TUN and writes UDP, one runs timers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::Subnet;

use super::keys::{PrivateKey, PublicKey};
use super::packet::ipv4_addrs;
use super::peer::{self, Addressee, HandshakeLimiter, Outcome, Peer};
use super::tun_dev::{self, TunDevice, TunReader, TunWriter};
use super::udp::{RecvBatch, SendBatch};
use super::TunnelError;

const POLL: Duration = Duration::from_millis(200);
const TICK: Duration = Duration::from_millis(250);
const BUF: usize = 65536 + 64;

pub struct HubConfig {
    pub listen: SocketAddr,
    pub private_key: PrivateKey,
    /// Host-side TUN device, or None when only the crypto is wanted (tests): decrypted packets are then
    /// checked and counted, then discarded.
    pub tun_name: Option<String>,
    /// Persistent keepalive towards peers, seconds (0 = off).
    pub keepalive: u16,
}

/// A peer the hub accepts.
#[derive(Debug, Clone)]
pub struct HubPeer {
    pub id: i64,
    pub public_key: PublicKey,
    /// The peer's own tunnel address (a /32 inside `subnet`).
    pub address: Ipv4Addr,
    /// The namespace subnet the peer may talk to.
    pub subnet: Subnet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubPeerStats {
    pub id: i64,
    pub public_key: PublicKey,
    pub address: Ipv4Addr,
    pub handshake_age: Option<Duration>,
    /// Bytes of inner packets received from the peer and delivered.
    pub rx_bytes: u64,
    /// Bytes of inner packets sent to the peer.
    pub tx_bytes: u64,
    /// Packets dropped by isolation (wrong source, destination outside the namespace) or for want of an
    /// endpoint.
    pub dropped: u64,
    pub endpoint: Option<SocketAddr>,
}

struct Slot {
    id: i64,
    public_key: PublicKey,
    address: Ipv4Addr,
    subnet: Subnet,
    index: u32,
    peer: Mutex<Peer>,
    rx: AtomicU64,
    tx: AtomicU64,
    dropped: AtomicU64,
}

impl Slot {
    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Table {
    by_id: HashMap<i64, Arc<Slot>>,
    by_addr: HashMap<Ipv4Addr, Arc<Slot>>,
    by_index: HashMap<u32, Arc<Slot>>,
    by_key: HashMap<PublicKey, Arc<Slot>>,
}

impl Table {
    fn remove(&mut self, id: i64) -> Option<Arc<Slot>> {
        let slot = self.by_id.remove(&id)?;
        self.by_addr.remove(&slot.address);
        self.by_index.remove(&slot.index);
        self.by_key.remove(&slot.public_key);
        Some(slot)
    }
}

struct Shared {
    key: PrivateKey,
    udp: UdpSocket,
    tun: Option<TunDevice>,
    table: RwLock<Table>,
    limiter: HandshakeLimiter,
    keepalive: u16,
    stop: AtomicBool,
    next_index: AtomicU32,
    /// Datagrams that matched no peer (garbage, unknown keys, stale sessions).
    unknown: AtomicU64,
}

pub struct Hub {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Binds `cfg.listen` and starts the data path.
    pub async fn start(cfg: HubConfig) -> Result<Hub, TunnelError> {
        let udp = UdpSocket::bind(cfg.listen)
            .map_err(TunnelError::io(format!("binding hub UDP {}", cfg.listen)))?;
        Self::with_socket(udp, cfg).await
    }

    /// Starts the data path on a socket bound by the caller (e.g. in the public network namespace before the
    /// server moved into the VM namespace); `cfg.listen` is ignored. The TUN device is created in the
    /// current namespace.
    pub async fn with_socket(udp: UdpSocket, cfg: HubConfig) -> Result<Hub, TunnelError> {
        super::udp::enlarge_buffers(&udp);
        udp.set_nonblocking(false)
            .map_err(TunnelError::io("hub UDP socket"))?;
        udp.set_read_timeout(Some(POLL))
            .map_err(TunnelError::io("hub UDP socket"))?;
        let local_addr = udp
            .local_addr()
            .map_err(TunnelError::io("hub UDP socket"))?;
        let tun = match &cfg.tun_name {
            Some(name) => {
                let dev = TunDevice::create(name, super::MTU, None)?;
                // Peers and VMs talk through this host: it must forward.
                if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                    tracing::warn!("could not enable ip_forward: {e}");
                }
                Some(dev)
            }
            None => None,
        };
        let limiter = HandshakeLimiter::new(&cfg.private_key);
        let shared = Arc::new(Shared {
            key: cfg.private_key,
            udp,
            tun,
            table: RwLock::new(Table::default()),
            limiter,
            keepalive: cfg.keepalive,
            stop: AtomicBool::new(false),
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            unknown: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        let spawn = |name: &str, f: fn(&Shared)| {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(&s))
                .map_err(TunnelError::io("spawning hub thread"))
        };
        threads.push(spawn("fcdev-hub-udp", udp_loop)?);
        threads.push(spawn("fcdev-hub-timers", timer_loop)?);
        if shared.tun.is_some() {
            threads.push(spawn("fcdev-hub-tun", tun_loop)?);
        }
        Ok(Hub {
            shared,
            local_addr,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn public_key(&self) -> PublicKey {
        self.shared.key.public_key()
    }

    pub fn public_key_base64(&self) -> String {
        self.public_key().to_base64()
    }

    /// The host TUN device's name, when there is one.
    pub fn tun_name(&self) -> Option<&str> {
        self.shared.tun.as_ref().map(|t| t.name())
    }

    /// Accepts a peer (or replaces the peer with the same id) and routes its /32 to the TUN device. A peer
    /// that is already there unchanged keeps its session. A public key of small order is refused: anyone
    /// could complete a handshake with it.
    pub fn add_peer(&self, p: HubPeer) -> Result<(), TunnelError> {
        p.public_key.check_not_low_order()?;
        if !p.subnet.contains(p.address) {
            return Err(TunnelError::PeerConflict(
                p.id,
                format!("address {} is outside its subnet {}", p.address, p.subnet),
            ));
        }
        {
            let mut table = self.write_table();
            if let Some(other) = table.by_addr.get(&p.address).filter(|s| s.id != p.id) {
                return Err(TunnelError::PeerConflict(
                    p.id,
                    format!("address {} belongs to peer {}", p.address, other.id),
                ));
            }
            if let Some(other) = table.by_key.get(&p.public_key).filter(|s| s.id != p.id) {
                return Err(TunnelError::PeerConflict(
                    p.id,
                    format!("public key belongs to peer {}", other.id),
                ));
            }
            if let Some(same) = table.by_id.get(&p.id) {
                if same.public_key == p.public_key
                    && same.address == p.address
                    && same.subnet == p.subnet
                {
                    return Ok(());
                }
            }
            table.remove(p.id);
            let index = loop {
                let i = self.shared.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                if !table.by_index.contains_key(&i) {
                    break i;
                }
            };
            let keepalive = Some(self.shared.keepalive).filter(|k| *k > 0);
            let peer = Peer::new(&self.shared.key, p.public_key, keepalive, index, None);
            let slot = Arc::new(Slot {
                id: p.id,
                public_key: p.public_key,
                address: p.address,
                subnet: p.subnet,
                index,
                peer: Mutex::new(peer),
                rx: AtomicU64::new(0),
                tx: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            });
            table.by_id.insert(p.id, slot.clone());
            table.by_addr.insert(p.address, slot.clone());
            table.by_index.insert(index, slot.clone());
            table.by_key.insert(p.public_key, slot);
        }
        if let Some(tun) = &self.shared.tun {
            let dst = format!("{}/32", p.address);
            tun_dev::ip(&["route", "replace", &dst, "dev", tun.name()])?;
        }
        Ok(())
    }

    pub fn remove_peer(&self, id: i64) {
        let removed = self.write_table().remove(id);
        if let (Some(slot), Some(tun)) = (removed, &self.shared.tun) {
            let dst = format!("{}/32", slot.address);
            if let Err(e) = tun_dev::ip(&["route", "del", &dst, "dev", tun.name()]) {
                tracing::debug!("removing route for peer {id}: {e}");
            }
        }
    }

    /// The ids of the peers the hub accepts.
    pub fn peer_ids(&self) -> Vec<i64> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<i64> = table.by_id.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    pub fn stats(&self) -> Vec<HubPeerStats> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<HubPeerStats> = table
            .by_id
            .values()
            .map(|s| {
                let (age, endpoint) = {
                    let p = s.peer.lock().unwrap_or_else(|e| e.into_inner());
                    (p.stats().handshake_age, p.endpoint())
                };
                HubPeerStats {
                    id: s.id,
                    public_key: s.public_key,
                    address: s.address,
                    handshake_age: age,
                    rx_bytes: s.rx.load(Ordering::Relaxed),
                    tx_bytes: s.tx.load(Ordering::Relaxed),
                    dropped: s.dropped.load(Ordering::Relaxed),
                    endpoint,
                }
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Datagrams that matched no peer.
    pub fn unknown_datagrams(&self) -> u64 {
        self.shared.unknown.load(Ordering::Relaxed)
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.shared.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the data path and waits for its threads; the UDP port and the TUN device are released.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn lookup(shared: &Shared, from: SocketAddr, datagram: &[u8], out: &mut [u8]) -> Option<Arc<Slot>> {
    let who = peer::addressee(&shared.key, &shared.limiter, from, datagram, out)?;
    let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
    match who {
        Addressee::Initiator(key) => table.by_key.get(&key).cloned(),
        Addressee::Index(i) => table.by_index.get(&i).cloned(),
        Addressee::Cookie(len) => {
            if let Some(cookie) = out.get(..len) {
                send(shared, cookie, from);
            }
            None
        }
    }
}

fn udp_loop(shared: &Shared) {
    let mut batch = RecvBatch::new();
    let mut out = vec![0u8; BUF];
    // Written here, not on a writer thread (`TunDevice::writer`): measured A/B, a thread of its own did not
    // speed up uploads through the hub on 2 cores and cost CPU per GB (the client's TUN mode uses one).
    let mut writer = TunWriter::new();
    while !shared.stop.load(Ordering::Relaxed) {
        if let Err(e) = batch.recv(&shared.udp) {
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) {
                tracing::debug!("hub UDP receive: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        for i in 0..batch.len() {
            if let Some((datagram, from)) = batch.get(i) {
                if !datagram.is_empty() {
                    handle_datagram(shared, datagram, from, &mut out, &mut writer);
                }
            }
            if writer.is_full() {
                flush_tun(shared, &mut writer);
            }
        }
        flush_tun(shared, &mut writer);
    }
}

fn flush_tun(shared: &Shared, writer: &mut TunWriter) {
    if let Some(tun) = &shared.tun {
        writer.flush(tun);
    }
}

fn handle_datagram(
    shared: &Shared,
    datagram: &[u8],
    from: SocketAddr,
    out: &mut [u8],
    writer: &mut TunWriter,
) {
    let Some(slot) = lookup(shared, from, datagram, out) else {
        shared.unknown.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut peer = slot.peer.lock().unwrap_or_else(|e| e.into_inner());
    peer.receive(
        from,
        datagram,
        out,
        |d| send(shared, d, from),
        |packet| {
            if deliver(&slot, packet) && shared.tun.is_some() {
                writer.push(packet);
            }
        },
    );
}

/// Isolation for packets coming out of the tunnel: the peer's own source, its own namespace. True when
/// the packet may be delivered (and is counted).
fn deliver(slot: &Slot, packet: &[u8]) -> bool {
    let allowed = ipv4_addrs(packet)
        .is_some_and(|(src, dst)| src == slot.address && slot.subnet.contains(dst));
    if allowed {
        slot.rx.fetch_add(packet.len() as u64, Ordering::Relaxed);
    } else {
        slot.drop_one();
    }
    allowed
}

fn send(shared: &Shared, datagram: &[u8], to: SocketAddr) {
    if let Err(e) = shared.udp.send_to(datagram, to) {
        tracing::debug!("hub UDP send to {to}: {e}");
    }
}

fn tun_loop(shared: &Shared) {
    let Some(tun) = &shared.tun else { return };
    if let Err(e) = tun.set_nonblocking() {
        tracing::warn!("hub TUN: {e}");
        return;
    }
    let mut reader = TunReader::new();
    let mut out = vec![0u8; BUF];
    let mut batch = SendBatch::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match reader.read(tun) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                batch.flush(&shared.udp);
                tun.wait_readable(POLL);
                continue;
            }
            Err(e) => {
                tracing::debug!("hub TUN read: {e}");
                continue;
            }
        }
        for i in 0..reader.len() {
            if let Some(packet) = reader.get(i) {
                route_out(shared, packet, &mut batch, &mut out);
            }
        }
    }
}

/// Cryptokey routing for one packet from the host: the peer owning the destination /32, if the source
/// may reach it.
fn route_out(shared: &Shared, packet: &[u8], batch: &mut SendBatch, out: &mut [u8]) {
    let Some((src, dst)) = ipv4_addrs(packet) else {
        return;
    };
    let slot = {
        let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.by_addr.get(&dst).cloned()
    };
    let Some(slot) = slot else { return };
    // Isolation for packets going into the tunnel: only the peer's own namespace may reach it.
    if !slot.subnet.contains(src) {
        slot.drop_one();
        return;
    }
    let mut peer = slot.peer.lock().unwrap_or_else(|e| e.into_inner());
    let Some(endpoint) = peer.endpoint() else {
        slot.drop_one();
        return;
    };
    slot.tx.fetch_add(packet.len() as u64, Ordering::Relaxed);
    batch.encapsulate(&mut peer, packet, endpoint, out, &shared.udp);
}

fn timer_loop(shared: &Shared) {
    let mut out = vec![0u8; BUF];
    let mut last_reset = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        if last_reset.elapsed() >= Duration::from_secs(1) {
            shared.limiter.reset();
            last_reset = Instant::now();
        }
        let slots: Vec<Arc<Slot>> = {
            let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
            table.by_id.values().cloned().collect()
        };
        for slot in slots {
            let mut peer = slot.peer.lock().unwrap_or_else(|e| e.into_inner());
            let Some(endpoint) = peer.endpoint() else {
                continue;
            };
            if let Outcome::Network(datagram) = peer.tick(&mut out) {
                send(shared, datagram, endpoint);
            }
        }
    }
}
