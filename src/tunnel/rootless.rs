//! Client proxy mode: no TUN device and no privileges. A smoltcp TCP/IP stack in userspace speaks to the
//! namespace through the tunnel; local programs reach it through a SOCKS5 proxy on loopback (which resolves
//! `<vm>.<namespace>.fcdev` itself), an HTTP proxy (CONNECT and plain requests, names resolved the same way;
//! the protocol in `http_proxy.rs`) and `-L local:vm:port` forwards. All three open their streams the same way.
//!
//! One task (the "stack") owns the WireGuard peer, the UDP socket and the smoltcp interface; it drains all
//! pending datagrams, polls smoltcp once, then moves data between smoltcp sockets and per-connection
//! channels. Local connections are two small tasks each (reader, writer). Received packets live in recycled
//! buffers: no allocation per packet once warm.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Notify};

use super::keys::PrivateKey;
use super::packet::ipv4_addrs;
use super::peer::{Outcome, Peer, PeerStats};
use super::plan::Plan;
use super::udp::{RecvBatch, SendBatch};
use super::TunnelError;

const BUF: usize = 65536 + 64;
/// Per-connection TCP buffers: large enough for window scaling to keep a fast link busy.
const TCP_BUF: usize = 2 << 20;
/// Chunks in flight between a local connection and the stack, each way.
const CHANNEL_DEPTH: usize = 32;
const CHUNK: usize = 64 * 1024;
/// Egress rounds per wake-up (each sends at most one segment per connection).
const EGRESS_ROUNDS: usize = 512;
const TICK: Duration = Duration::from_millis(250);

/// A local TCP forward: connections to `local` go to `host:port` inside the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub local: SocketAddr,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for Forward {
    type Err = TunnelError;
    /// `8080:n1:80` (loopback) or `0.0.0.0:8080:n1:80`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TunnelError::Config(format!("forward `{s}`: want LOCALPORT:VM:PORT"));
        let parts: Vec<&str> = s.split(':').collect();
        let (bind, lport, host, rport) = match parts.as_slice() {
            [l, h, r] => ("127.0.0.1", *l, *h, *r),
            [b, l, h, r] => (*b, *l, *h, *r),
            _ => return Err(bad()),
        };
        let ip: std::net::IpAddr = bind.parse().map_err(|_| bad())?;
        let lport: u16 = lport.parse().map_err(|_| bad())?;
        let port: u16 = rport.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Forward {
            local: SocketAddr::new(ip, lport),
            host: host.to_string(),
            port,
        })
    }
}

enum Cmd {
    Connect {
        dst: SocketAddrV4,
        to_remote: mpsc::Receiver<Vec<u8>>,
        to_local: mpsc::Sender<Vec<u8>>,
        ready: oneshot::Sender<bool>,
    },
    Rebind(SocketAddr, oneshot::Sender<Result<(), TunnelError>>),
    Shutdown,
}

/// A handle on the running stack, used by the SOCKS and forward listeners.
#[derive(Clone)]
struct StackHandle {
    cmd: mpsc::UnboundedSender<Cmd>,
    wake: Arc<Notify>,
    plan: Arc<Plan>,
    activity: Arc<Activity>,
}

/// The local connections being served (SOCKS5, HTTP, forwards) and when the last one ended: what a background
/// tunnel's idle exit looks at.
struct Activity {
    open: std::sync::atomic::AtomicUsize,
    last_end: Mutex<std::time::Instant>,
}

/// One open local connection; dropping it ends it.
struct Open(Arc<Activity>);

impl Activity {
    fn enter(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Open(self.clone())
    }

    /// How long no local connection has been open (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.open.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub struct RootlessClient {
    stack: StackHandle,
    stats: Arc<Mutex<PeerStats>>,
    thread: Option<std::thread::JoinHandle<()>>,
    socks: Option<SocketAddr>,
    http: Option<SocketAddr>,
    forwards: Vec<SocketAddr>,
}

/// What a local listener serves.
enum Serve {
    Socks,
    Http,
    Forward(SocketAddrV4),
}

impl RootlessClient {
    /// Binds the UDP socket and the listeners here (so errors surface now), then runs the stack and the
    /// listeners on one thread with its own single-threaded runtime: packets, smoltcp and local sockets never
    /// wait for a wake-up from another core.
    pub async fn start(
        key: &PrivateKey,
        plan: Plan,
        bind: SocketAddr,
        socks: Option<SocketAddr>,
        http: Option<SocketAddr>,
        forwards: &[Forward],
    ) -> Result<RootlessClient, TunnelError> {
        let udp = bind_std_udp(bind)?;
        let plan = Arc::new(plan);
        let mut listeners = Vec::new();
        let mut socks_addr = None;
        if let Some(addr) = socks {
            let l = std_listener(addr, "SOCKS5 proxy")?;
            socks_addr = l.local_addr().ok();
            listeners.push((l, Serve::Socks));
        }
        let mut http_addr = None;
        if let Some(addr) = http {
            let l = std_listener(addr, "HTTP proxy")?;
            http_addr = l.local_addr().ok();
            listeners.push((l, Serve::Http));
        }
        let mut forward_addrs = Vec::new();
        for f in forwards {
            let dst = plan.resolve(&f.host).ok_or_else(|| {
                TunnelError::Config(format!("forward {}: unknown VM `{}`", f.local, f.host))
            })?;
            let l = std_listener(f.local, "forward")?;
            forward_addrs.push(l.local_addr().unwrap_or(f.local));
            listeners.push((l, Serve::Forward(SocketAddrV4::new(dst, f.port))));
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        let stats = Arc::new(Mutex::new(PeerStats::default()));
        let handle = StackHandle {
            cmd: cmd_tx,
            wake: wake.clone(),
            plan: plan.clone(),
            activity: Arc::new(Activity {
                open: 0.into(),
                last_end: Mutex::new(std::time::Instant::now()),
            }),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TunnelError::io("starting the proxy runtime"))?;
        let key = key.clone();
        let (thread_stats, thread_handle) = (stats.clone(), handle.clone());
        let thread = std::thread::Builder::new()
            .name("fcdev-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let udp = match UdpSocket::from_std(udp) {
                        Ok(u) => u,
                        Err(e) => return tracing::error!("proxy UDP socket: {e}"),
                    };
                    for (l, target) in listeners {
                        let Ok(l) = TcpListener::from_std(l) else {
                            continue;
                        };
                        let h = thread_handle.clone();
                        match target {
                            Serve::Socks => tokio::spawn(serve_socks(l, h)),
                            Serve::Http => tokio::spawn(serve_http(l, h)),
                            Serve::Forward(t) => tokio::spawn(serve_forward(l, t, h)),
                        };
                    }
                    let stack = Stack::new(&key, plan, udp, thread_stats);
                    stack.run(cmd_rx, wake).await;
                });
            })
            .map_err(TunnelError::io("spawning the proxy thread"))?;
        Ok(RootlessClient {
            stack: handle,
            stats,
            thread: Some(thread),
            socks: socks_addr,
            http: http_addr,
            forwards: forward_addrs,
        })
    }

    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn forward_addrs(&self) -> &[SocketAddr] {
        &self.forwards
    }

    /// How long no local connection (SOCKS5, HTTP proxy, forward) has been open; zero while one is.
    pub fn idle_for(&self) -> Duration {
        self.stack.activity.idle_for()
    }

    /// False once the stack task ended (shut down, or failed).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn stats(&self) -> PeerStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn rebind(&self, bind: SocketAddr) -> Result<(), TunnelError> {
        let (tx, rx) = oneshot::channel();
        let _ = self.stack.cmd.send(Cmd::Rebind(bind, tx));
        rx.await
            .unwrap_or_else(|_| Err(TunnelError::Config("tunnel stopped".into())))
    }

    pub async fn shutdown(mut self) {
        let _ = self.stack.cmd.send(Cmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for RootlessClient {
    fn drop(&mut self) {
        let _ = self.stack.cmd.send(Cmd::Shutdown);
    }
}

fn std_listener(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener, TunnelError> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(TunnelError::io(format!("binding {what} on {addr}")))?;
    l.set_nonblocking(true)
        .map_err(TunnelError::io(format!("{what} on {addr}")))?;
    Ok(l)
}

fn bind_std_udp(bind: SocketAddr) -> Result<std::net::UdpSocket, TunnelError> {
    let std =
        std::net::UdpSocket::bind(bind).map_err(TunnelError::io(format!("binding UDP {bind}")))?;
    super::udp::enlarge_buffers(&std);
    std.set_nonblocking(true)
        .map_err(TunnelError::io("UDP socket"))?;
    Ok(std)
}

/// Inside the proxy runtime (rebinding).
fn bind_udp(bind: SocketAddr) -> Result<UdpSocket, TunnelError> {
    UdpSocket::from_std(bind_std_udp(bind)?).map_err(TunnelError::io("UDP socket"))
}

/// Congestion control for connections smoltcp sends on (uploads): without it smoltcp sends the whole
/// peer window at once and the hub's queue overflows. `FCDEV_TCP_CC=none|reno|cubic` overrides (benchmarks).
fn congestion() -> tcp::CongestionControl {
    match std::env::var("FCDEV_TCP_CC").as_deref() {
        Ok("none") => tcp::CongestionControl::None,
        Ok("reno") => tcp::CongestionControl::Reno,
        _ => tcp::CongestionControl::Cubic,
    }
}

// ---------------------------------------------------------------------------------------------------------
// The stack task.

struct Conn {
    handle: SocketHandle,
    from_local: mpsc::Receiver<Vec<u8>>,
    pending: Option<(Vec<u8>, usize)>,
    local_eof: bool,
    to_local: Option<mpsc::Sender<Vec<u8>>>,
    ready: Option<oneshot::Sender<bool>>,
}

/// Everything the smoltcp device needs to move packets: received packets, recycled buffers, the peer.
struct Link {
    peer: Peer,
    udp: UdpSocket,
    endpoint: SocketAddr,
    rx: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    out: Vec<u8>,
    batch: SendBatch,
}

/// Sends with a plain `sendto`: tokio's `try_send_to` refuses until the reactor has seen the socket
/// writable, which drops the very first handshake initiation.
fn send_to(udp: &UdpSocket, endpoint: SocketAddr, datagram: &[u8]) {
    super::udp::send_to(udp, datagram, endpoint);
}

struct Stack {
    plan: Arc<Plan>,
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    next_port: u16,
    stats: Arc<Mutex<PeerStats>>,
    inbatch: RecvBatch,
}

impl Stack {
    fn new(
        key: &PrivateKey,
        plan: Arc<Plan>,
        udp: UdpSocket,
        stats: Arc<Mutex<PeerStats>>,
    ) -> Stack {
        let mut peer = Peer::new(
            key,
            plan.server_key,
            Some(plan.keepalive).filter(|k| *k > 0),
            rand::random::<u32>(),
            None,
        );
        peer.set_endpoint(plan.endpoint);
        peer.set_recovery(true);
        let mut link = Link {
            peer,
            udp,
            endpoint: plan.endpoint,
            rx: VecDeque::new(),
            free: Vec::new(),
            scratch: vec![0u8; BUF],
            out: vec![0u8; BUF],
            batch: SendBatch::new(),
        };
        let config = Config::new(HardwareAddress::Ip);
        let mut iface = Interface::new(config, &mut link, SmolInstant::now());
        let prefix = plan.subnet.prefix;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(plan.address), prefix));
        });
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(plan.subnet.host(1));
        Stack {
            plan,
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            next_port: 49152 + rand::random::<u16>() % 8192,
            stats,
            inbatch: RecvBatch::new(),
        }
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>, wake: Arc<Notify>) {
        let mut next_tick = tokio::time::Instant::now();
        if let Outcome::Network(d) = self.link.peer.initiate(&mut self.link.out) {
            send_to(&self.link.udp, self.link.endpoint, d);
        }
        loop {
            self.drain_udp();
            loop {
                match cmds.try_recv() {
                    Ok(Cmd::Shutdown) | Err(mpsc::error::TryRecvError::Disconnected) => return,
                    Ok(cmd) => self.command(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            let now = SmolInstant::now();
            self.iface.poll(now, &mut self.link, &mut self.sockets);
            self.pump();
            // smoltcp's poll sends one segment per socket; keep egressing while it has more (a window's
            // worth of upload goes out in one wake-up, in batches of datagrams).
            for _ in 0..EGRESS_ROUNDS {
                let now = SmolInstant::now();
                if self
                    .iface
                    .poll_egress(now, &mut self.link, &mut self.sockets)
                    == PollResult::None
                {
                    break;
                }
                if self.link.batch.is_full() {
                    self.link.batch.flush(&self.link.udp);
                    self.pump();
                }
            }
            self.link.batch.flush(&self.link.udp);
            if tokio::time::Instant::now() >= next_tick {
                next_tick = tokio::time::Instant::now() + TICK;
                if let Outcome::Network(d) = self.link.peer.tick(&mut self.link.out) {
                    send_to(&self.link.udp, self.link.endpoint, d);
                }
                *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.link.peer.stats();
            }
            let delay = self
                .iface
                .poll_delay(SmolInstant::now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(TICK);
            let deadline = (tokio::time::Instant::now() + delay).min(next_tick);
            tokio::select! {
                _ = self.link.udp.readable() => {}
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Shutdown) | None => return,
                    Some(cmd) => self.command(cmd),
                },
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Decrypts every datagram waiting on the socket into the device's receive queue.
    fn drain_udp(&mut self) {
        for _ in 0..16 {
            let batch = &mut self.inbatch;
            let udp = &self.link.udp;
            // try_io clears tokio's readiness when the socket runs dry.
            if udp
                .try_io(tokio::io::Interest::READABLE, || batch.recv(udp))
                .is_err()
            {
                return;
            }
            for i in 0..self.inbatch.len() {
                let Some((datagram, from)) = self.inbatch.get(i) else {
                    continue;
                };
                if from != self.link.endpoint || datagram.is_empty() {
                    continue;
                }
                let link = &mut self.link;
                let (udp, endpoint, plan) = (&link.udp, link.endpoint, &self.plan);
                let (free, rx) = (&mut link.free, &mut link.rx);
                link.peer.receive(
                    from,
                    datagram,
                    &mut link.out,
                    |d| send_to(udp, endpoint, d),
                    |packet| {
                        let inside = ipv4_addrs(packet).is_some_and(|(src, dst)| {
                            plan.subnet.contains(src) && dst == plan.address
                        });
                        if inside {
                            let mut buf = free.pop().unwrap_or_else(|| Vec::with_capacity(2048));
                            buf.clear();
                            buf.extend_from_slice(packet);
                            rx.push_back(buf);
                        }
                    },
                );
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Connect {
                dst,
                to_remote,
                to_local,
                ready,
            } => self.connect(dst, to_remote, to_local, ready),
            Cmd::Rebind(addr, reply) => {
                let r = bind_udp(addr).map(|udp| {
                    self.link.udp = udp;
                    if let Outcome::Network(d) = self.link.peer.initiate(&mut self.link.out) {
                        send_to(&self.link.udp, self.link.endpoint, d);
                    }
                });
                let _ = reply.send(r);
            }
            Cmd::Shutdown => {}
        }
    }

    fn connect(
        &mut self,
        dst: SocketAddrV4,
        from_local: mpsc::Receiver<Vec<u8>>,
        to_local: mpsc::Sender<Vec<u8>>,
        ready: oneshot::Sender<bool>,
    ) {
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
            tcp::SocketBuffer::new(vec![0u8; TCP_BUF]),
        );
        sock.set_nagle_enabled(false);
        sock.set_congestion_control(congestion());
        sock.set_ack_delay(None);
        sock.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
        self.next_port = if self.next_port >= 65000 {
            49152
        } else {
            self.next_port + 1
        };
        let remote = (IpAddress::Ipv4(*dst.ip()), dst.port());
        if sock
            .connect(self.iface.context(), remote, self.next_port)
            .is_err()
        {
            let _ = ready.send(false);
            return;
        }
        let handle = self.sockets.add(sock);
        self.conns.push(Conn {
            handle,
            from_local,
            pending: None,
            local_eof: false,
            to_local: Some(to_local),
            ready: Some(ready),
        });
    }

    /// Moves data between smoltcp sockets and local connections; true when something was queued to send.
    fn pump(&mut self) -> bool {
        let mut queued = false;
        let mut i = 0;
        while i < self.conns.len() {
            let conn = &mut self.conns[i];
            let sock = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            let done = pump_one(conn, sock, &mut queued);
            if done {
                let conn = self.conns.swap_remove(i);
                self.sockets.remove(conn.handle);
            } else {
                i += 1;
            }
        }
        queued
    }
}

/// One connection's share of [`Stack::pump`]; true when the connection is finished.
fn pump_one(conn: &mut Conn, sock: &mut tcp::Socket<'_>, queued: &mut bool) -> bool {
    use tcp::State;
    if conn.ready.is_some() {
        match sock.state() {
            State::Established | State::CloseWait => {
                if let Some(r) = conn.ready.take() {
                    let _ = r.send(true);
                }
            }
            State::Closed | State::TimeWait => {
                if let Some(r) = conn.ready.take() {
                    let _ = r.send(false);
                }
                return true;
            }
            _ => return false,
        }
    }
    // Remote -> local.
    if let Some(tx) = &conn.to_local {
        while sock.can_recv() {
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    sock.abort();
                    return true;
                }
            };
            match sock.recv(|b| {
                let n = b.len().min(CHUNK);
                (n, b[..n].to_vec())
            }) {
                Ok(chunk) => permit.send(chunk),
                Err(_) => break,
            }
        }
        if !sock.may_recv() {
            conn.to_local = None; // EOF for the local writer
        }
    }
    // Local -> remote.
    while sock.can_send() {
        if conn.pending.is_none() {
            match conn.from_local.try_recv() {
                Ok(chunk) => conn.pending = Some((chunk, 0)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    conn.local_eof = true;
                    break;
                }
            }
        }
        let Some((chunk, off)) = conn.pending.as_mut() else {
            break;
        };
        match sock.send_slice(&chunk[*off..]) {
            Ok(n) => {
                *off += n;
                *queued |= n > 0;
                if *off >= chunk.len() {
                    conn.pending = None;
                } else {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if conn.local_eof && conn.pending.is_none() && sock.may_send() {
        sock.close();
        *queued = true;
    }
    matches!(sock.state(), State::Closed | State::TimeWait)
        || (conn.local_eof && conn.to_local.is_none() && !sock.is_open())
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.rx.pop_front()?;
        let Link {
            peer,
            udp,
            endpoint,
            free,
            scratch,
            out,
            batch,
            ..
        } = self;
        Some((
            RxToken { buf, free },
            TxToken {
                peer,
                udp,
                endpoint: *endpoint,
                scratch,
                out,
                batch,
            },
        ))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        Some(TxToken {
            peer: &mut self.peer,
            udp: &self.udp,
            endpoint: self.endpoint,
            scratch: &mut self.scratch,
            out: &mut self.out,
            batch: &mut self.batch,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = super::MTU as usize;
        // The tunnel authenticates every packet; checking inner checksums again buys nothing.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

struct RxToken<'a> {
    buf: Vec<u8>,
    free: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf);
        self.free.push(self.buf);
        r
    }
}

struct TxToken<'a> {
    peer: &'a mut Peer,
    udp: &'a UdpSocket,
    endpoint: SocketAddr,
    scratch: &'a mut Vec<u8>,
    out: &'a mut Vec<u8>,
    batch: &'a mut SendBatch,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        let r = f(&mut self.scratch[..len]);
        self.batch.encapsulate(
            self.peer,
            &self.scratch[..len],
            self.endpoint,
            self.out,
            self.udp,
        );
        r
    }
}

// ---------------------------------------------------------------------------------------------------------
// Local side: SOCKS5 and forwards.

impl StackHandle {
    /// Opens a TCP connection to `dst` through the tunnel; on success returns the channels of the stream.
    async fn open(
        &self,
        dst: SocketAddrV4,
    ) -> Option<(mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>)> {
        let (to_remote_tx, to_remote_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (to_local_tx, to_local_rx) = mpsc::channel(CHANNEL_DEPTH);
        let (ready_tx, ready_rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Connect {
                dst,
                to_remote: to_remote_rx,
                to_local: to_local_tx,
                ready: ready_tx,
            })
            .ok()?;
        match tokio::time::timeout(Duration::from_secs(20), ready_rx).await {
            Ok(Ok(true)) => Some((to_remote_tx, to_local_rx)),
            _ => None,
        }
    }

    async fn splice(
        &self,
        stream: TcpStream,
        to_remote: mpsc::Sender<Vec<u8>>,
        mut to_local: mpsc::Receiver<Vec<u8>>,
    ) {
        let _ = stream.set_nodelay(true);
        let (mut r, mut w) = stream.into_split();
        let wake = self.wake.clone();
        let reader = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if to_remote.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
                wake.notify_one();
            }
            drop(to_remote);
            wake.notify_one();
        };
        let wake = self.wake.clone();
        let writer = async move {
            while let Some(chunk) = to_local.recv().await {
                wake.notify_one();
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
            drop(to_local);
            wake.notify_one();
        };
        tokio::join!(reader, writer);
    }
}

async fn serve_forward(listener: TcpListener, target: SocketAddrV4, stack: StackHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stack = stack.clone();
        let open = stack.activity.enter();
        tokio::spawn(async move {
            let _open = open;
            if let Some((tx, rx)) = stack.open(target).await {
                stack.splice(stream, tx, rx).await;
            }
        });
    }
}

async fn serve_socks(listener: TcpListener, stack: StackHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stack = stack.clone();
        let open = stack.activity.enter();
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = socks_session(stream, stack).await {
                tracing::debug!("SOCKS5: {e}");
            }
        });
    }
}

async fn serve_http(listener: TcpListener, stack: StackHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let stack = stack.clone();
        let open = stack.activity.enter();
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = http_session(stream, stack).await {
                tracing::debug!("HTTP proxy: {e}");
            }
        });
    }
}

/// One HTTP proxy connection: read the request head, resolve the VM like SOCKS5 does, open the stream through
/// the stack, then either answer a CONNECT or send the rewritten request on, and splice.
async fn http_session(mut stream: TcpStream, stack: StackHandle) -> std::io::Result<()> {
    use super::http_proxy::{self, Request};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = http_proxy::head_end(&buf) {
            break end;
        }
        if buf.len() > http_proxy::MAX_HEAD {
            let answer = http_proxy::error_response(400, "request head too large");
            return stream.write_all(&answer).await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (host, port, first) = match http_proxy::parse(&buf[..end]) {
        Ok(Request::Connect { host, port }) => (host, port, None),
        Ok(Request::Forward { host, port, head }) => (host, port, Some(head)),
        Err(r) => {
            return stream
                .write_all(&http_proxy::error_response(r.status, &r.reason))
                .await
        }
    };
    let Some(ip) = stack.plan.resolve(&host) else {
        let reason = format!(
            "unknown host `{host}`: VMs are <vm>.{}.fcdev (or their addresses)",
            stack.plan.namespace
        );
        return stream
            .write_all(&http_proxy::error_response(502, &reason))
            .await;
    };
    if !stack.plan.subnet.contains(ip) {
        let reason = format!("{ip} is outside this namespace ({})", stack.plan.subnet);
        return stream
            .write_all(&http_proxy::error_response(403, &reason))
            .await;
    }
    let Some((tx, rx)) = stack.open(SocketAddrV4::new(ip, port)).await else {
        let reason = format!("{host}:{port} refused the connection or did not answer");
        return stream
            .write_all(&http_proxy::error_response(502, &reason))
            .await;
    };
    // What goes first: the rewritten request, or for CONNECT the answer; then what the client sent after the head.
    let mut ahead = match first {
        Some(head) => head,
        None => {
            stream.write_all(http_proxy::CONNECTED).await?;
            Vec::new()
        }
    };
    ahead.extend_from_slice(&buf[end..]);
    if !ahead.is_empty() {
        if tx.send(ahead).await.is_err() {
            return Ok(());
        }
        stack.wake.notify_one();
    }
    stack.splice(stream, tx, rx).await;
    Ok(())
}

const SOCKS_OK: u8 = 0x00;
const SOCKS_FAIL: u8 = 0x01;
const SOCKS_UNREACHABLE: u8 = 0x04;
const SOCKS_REFUSED: u8 = 0x05;
const SOCKS_BAD_COMMAND: u8 = 0x07;
const SOCKS_BAD_ADDRESS: u8 = 0x08;

async fn socks_reply(stream: &mut TcpStream, code: u8) -> std::io::Result<()> {
    stream
        .write_all(&[0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
        .await
}

/// RFC 1928, no authentication, CONNECT only; names resolve against the namespace's VMs.
async fn socks_session(mut stream: TcpStream, stack: StackHandle) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    if head[0] != 0x05 {
        return Ok(());
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&0x00) {
        stream.write_all(&[0x05, 0xff]).await?;
        return Ok(());
    }
    stream.write_all(&[0x05, 0x00]).await?;
    let mut req = [0u8; 4];
    stream.read_exact(&mut req).await?;
    if req[0] != 0x05 {
        return Ok(());
    }
    let host: Option<Ipv4Addr> = match req[3] {
        0x01 => {
            let mut a = [0u8; 4];
            stream.read_exact(&mut a).await?;
            Some(Ipv4Addr::from(a))
        }
        0x03 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            stream.read_exact(&mut name).await?;
            std::str::from_utf8(&name)
                .ok()
                .and_then(|n| stack.plan.resolve(n))
        }
        0x04 => {
            let mut a = [0u8; 16];
            stream.read_exact(&mut a).await?;
            None
        }
        _ => return socks_reply(&mut stream, SOCKS_BAD_ADDRESS).await,
    };
    let mut port = [0u8; 2];
    stream.read_exact(&mut port).await?;
    if req[1] != 0x01 {
        return socks_reply(&mut stream, SOCKS_BAD_COMMAND).await;
    }
    let Some(ip) = host else {
        return socks_reply(&mut stream, SOCKS_UNREACHABLE).await;
    };
    if !stack.plan.subnet.contains(ip) {
        return socks_reply(&mut stream, SOCKS_FAIL).await;
    }
    let dst = SocketAddrV4::new(ip, u16::from_be_bytes(port));
    match stack.open(dst).await {
        Some((tx, rx)) => {
            socks_reply(&mut stream, SOCKS_OK).await?;
            stack.splice(stream, tx, rx).await;
            Ok(())
        }
        None => socks_reply(&mut stream, SOCKS_REFUSED).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forwards() {
        let f: Forward = "8080:n1:80".parse().unwrap();
        assert_eq!(f.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((f.host.as_str(), f.port), ("n1", 80));
        let f: Forward = "0.0.0.0:2222:10.240.1.10:22".parse().unwrap();
        assert_eq!(f.local.port(), 2222);
        assert!("8080:n1".parse::<Forward>().is_err());
        assert!("x:n1:80".parse::<Forward>().is_err());
    }
}
