//! Client TUN mode: a TUN device holding the peer address with the namespace's prefix (so the namespace is
//! routed to it; set up through tun-rs, no `ip` command), and two threads moving packets between it and the
//! UDP socket. The device and its routes vanish when it closes.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::keys::PrivateKey;
use super::packet::ipv4_addrs;
use super::peer::{Outcome, Peer, PeerStats};
use super::plan::Plan;
use super::tun_dev::{TunDevice, TunReader};
use super::udp::{RecvBatch, SendBatch};
use super::TunnelError;

const POLL: Duration = Duration::from_millis(100);
const BUF: usize = 65536 + 64;

struct Shared {
    plan: Plan,
    peer: Mutex<Peer>,
    udp: RwLock<Arc<UdpSocket>>,
    tun: TunDevice,
    stop: AtomicBool,
}

pub struct TunClient {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn bind_udp(bind: SocketAddr) -> Result<Arc<UdpSocket>, TunnelError> {
    let s = UdpSocket::bind(bind).map_err(TunnelError::io(format!("binding UDP {bind}")))?;
    super::udp::enlarge_buffers(&s);
    s.set_read_timeout(Some(POLL))
        .map_err(TunnelError::io("UDP socket"))?;
    Ok(Arc::new(s))
}

impl TunClient {
    pub fn start(
        key: &PrivateKey,
        plan: Plan,
        tun_name: &str,
        bind: SocketAddr,
    ) -> Result<TunClient, TunnelError> {
        // The peer address with the namespace's prefix: the system routes the namespace to the device.
        let tun = TunDevice::create(
            tun_name,
            super::MTU,
            Some((plan.address, plan.subnet.prefix)),
        )?;
        let peer = plan.client_peer(key);
        let shared = Arc::new(Shared {
            udp: RwLock::new(bind_udp(bind)?),
            peer: Mutex::new(peer),
            plan,
            tun,
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for (name, f) in [
            ("fcdev-tun-udp", udp_loop as fn(&Shared)),
            ("fcdev-tun-dev", tun_loop),
            ("fcdev-tun-timers", timer_loop),
        ] {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || f(&s))
                    .map_err(TunnelError::io("spawning tunnel thread"))?,
            );
        }
        Ok(TunClient { shared, threads })
    }

    pub fn device_name(&self) -> &str {
        self.shared.tun.name()
    }

    pub fn stats(&self) -> PeerStats {
        lock(&self.shared.peer).stats()
    }

    /// Moves to a new local UDP socket (a laptop changing networks); the hub follows the new source.
    pub fn rebind(&self, bind: SocketAddr) -> Result<(), TunnelError> {
        let s = bind_udp(bind)?;
        *self.shared.udp.write().unwrap_or_else(|e| e.into_inner()) = s;
        let mut out = [0u8; 256];
        let mut peer = lock(&self.shared.peer);
        if let Outcome::Network(d) = peer.initiate(&mut out) {
            send(&self.shared, d);
        }
        Ok(())
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TunClient {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(m: &Mutex<Peer>) -> std::sync::MutexGuard<'_, Peer> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn socket(shared: &Shared) -> Arc<UdpSocket> {
    shared.udp.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn send(shared: &Shared, datagram: &[u8]) {
    if let Err(e) = socket(shared).send_to(datagram, shared.plan.endpoint) {
        tracing::debug!("UDP send: {e}");
    }
}

fn udp_loop(shared: &Shared) {
    let mut batch = RecvBatch::new();
    let mut out = vec![0u8; BUF];
    // Decrypting here, writing into the TUN (the laptop's TCP receive) on the writer's own thread.
    let mut writer = shared.tun.writer();
    while !shared.stop.load(Ordering::Relaxed) {
        writer.flush(&shared.tun);
        let udp = socket(shared);
        if batch.recv(&*udp).is_err() {
            continue;
        }
        let mut peer = lock(&shared.peer);
        for i in 0..batch.len() {
            let Some((datagram, from)) = batch.get(i) else {
                continue;
            };
            if from != shared.plan.endpoint || datagram.is_empty() {
                continue;
            }
            peer.receive(
                from,
                datagram,
                &mut out,
                |d| send(shared, d),
                |packet| {
                    // Only the namespace may come out of the tunnel.
                    if ipv4_addrs(packet).is_some_and(|(src, _)| shared.plan.subnet.contains(src)) {
                        writer.push(packet);
                        if writer.is_full() {
                            writer.flush(&shared.tun);
                        }
                    }
                },
            );
        }
    }
}

fn tun_loop(shared: &Shared) {
    if let Err(e) = shared.tun.set_nonblocking() {
        tracing::warn!("{e}");
        return;
    }
    let mut reader = TunReader::new();
    let mut out = vec![0u8; BUF];
    let mut batch = SendBatch::new();
    let mut udp = socket(shared);
    while !shared.stop.load(Ordering::Relaxed) {
        match reader.read(&shared.tun) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                batch.flush(&*udp);
                shared.tun.wait_readable(POLL);
                udp = socket(shared);
                continue;
            }
            Err(_) => continue,
        }
        let mut peer = lock(&shared.peer);
        for i in 0..reader.len() {
            if let Some(packet) = reader.get(i) {
                batch.encapsulate(&mut peer, packet, shared.plan.endpoint, &mut out, &*udp);
            }
        }
    }
}

fn timer_loop(shared: &Shared) {
    let mut out = vec![0u8; 2048];
    {
        let mut peer = lock(&shared.peer);
        if let Outcome::Network(d) = peer.initiate(&mut out) {
            send(shared, d);
        }
    }
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let mut peer = lock(&shared.peer);
        if let Outcome::Network(d) = peer.tick(&mut out) {
            send(shared, d);
        }
    }
}
