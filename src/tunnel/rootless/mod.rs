//! Client proxy mode: no TUN device and no privileges. A smoltcp TCP/IP stack in userspace speaks to the
//! namespace through the tunnel; local programs reach it through a SOCKS5 proxy on loopback (which resolves
//! `<vm>.<namespace>.fcdev` itself), an HTTP proxy (CONNECT and plain requests, names resolved the same way;
//! the protocol in `http_proxy.rs`) and `-L local:vm:port` forwards. All three open their streams the same way.
//!
//! One task (the "stack") owns the WireGuard peer, the UDP socket and the smoltcp interface; it drains all
//! pending datagrams, polls smoltcp once, then moves data between smoltcp sockets and per-connection
//! channels. Local connections are two small tasks each (reader, writer). Received packets live in recycled
//! buffers: no allocation per packet once warm.
//!
//! Modules by job: this one is the runtime (the client, its thread and single-threaded runtime, the listeners
//! and the stream handle local connections use); `stack` the smoltcp device and stack task; `socks`, `http` and
//! `forward` the three local front ends.

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

use crate::tunnel::keys::PrivateKey;
use crate::tunnel::packet::ipv4_addrs;
use crate::tunnel::peer::{Outcome, PeerStats};
use crate::tunnel::plan::Plan;
use crate::tunnel::udp::RecvBatch;
use crate::tunnel::TunnelError;

mod forward;
mod http;
mod seal;
mod socks;
mod stack;

use forward::serve_forward;
use http::serve_http;
use socks::serve_socks;
use stack::Stack;

const BUF: usize = 65536 + 64;
/// Per-connection TCP receive buffer: large enough for window scaling to keep a fast link busy.
const TCP_BUF: usize = 2 << 20;
/// Per-connection TCP send buffer, which is also the most smoltcp keeps in flight. smoltcp answers a loss
/// (three duplicate ACKs, or its 10 ms minimum retransmission timeout on a busy machine) by sending again
/// everything in flight from the first unacknowledged byte (go-back-N: it has no SACK), so a large window
/// turns one loss into megabytes of duplicates. `FCDEV_TCP_TXBUF` (bytes) overrides it (benchmarks).
const TCP_TXBUF: usize = 1 << 20;

fn tcp_txbuf() -> usize {
    std::env::var("FCDEV_TCP_TXBUF")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 16 << 10)
        .unwrap_or(TCP_TXBUF)
}
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
                    for (l, target) in listeners {
                        let Ok(l) = TcpListener::from_std(l) else {
                            continue;
                        };
                        let h = thread_handle.clone();
                        match target {
                            Serve::Socks => tokio::spawn(accept_loop(l, h, serve_socks)),
                            Serve::Http => tokio::spawn(accept_loop(l, h, serve_http)),
                            Serve::Forward(t) => {
                                tokio::spawn(accept_loop(l, h, move |s, h| serve_forward(s, t, h)))
                            }
                        };
                    }
                    match Stack::new(&key, plan, udp, thread_stats, wake.clone()) {
                        Ok(stack) => stack.run(cmd_rx, wake).await,
                        Err(e) => tracing::error!("proxy: {e}"),
                    }
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

/// Accept local connections forever: each runs `session` on a task of its own and counts as open (for the
/// idle exit) until it ends. The one accept loop of the SOCKS5 proxy, the HTTP proxy and the forwards.
async fn accept_loop<F, Fut>(listener: TcpListener, stack: StackHandle, session: F)
where
    F: Fn(TcpStream, StackHandle) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let open = stack.activity.enter();
        let run = session(stream, stack.clone());
        tokio::spawn(async move {
            let _open = open;
            run.await;
        });
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
    crate::tunnel::udp::enlarge_buffers(&std);
    std.set_nonblocking(true)
        .map_err(TunnelError::io("UDP socket"))?;
    Ok(std)
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
