//! The stack task: smoltcp over the WireGuard peer, one thread with its own runtime. `Link` is the smoltcp
//! device (packets in from the tunnel, out through the batched UDP socket); `Stack` moves data between
//! smoltcp sockets and the local connections.

use super::seal::{lock, Sealer};
use super::*;
use crate::tunnel::packet::{is_dsack_ack, tcp_ack};

struct Conn {
    handle: SocketHandle,
    from_local: mpsc::Receiver<Vec<u8>>,
    pending: Option<(Vec<u8>, usize)>,
    local_eof: bool,
    to_local: Option<mpsc::Sender<Vec<u8>>>,
    ready: Option<oneshot::Sender<bool>>,
}

/// Everything the smoltcp device needs to move packets: received packets, recycled buffers, and the sealer
/// (the peer and the worker thread that encrypts and sends).
struct Link {
    sealer: Sealer,
    udp: UdpSocket,
    endpoint: SocketAddr,
    rx: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
    out: Vec<u8>,
}

/// Sends with a plain `sendto`: tokio's `try_send_to` refuses until the reactor has seen the socket
/// writable, which drops the very first handshake initiation.
fn send_to(udp: &UdpSocket, endpoint: SocketAddr, datagram: &[u8]) {
    crate::tunnel::udp::send_to(udp, datagram, endpoint);
}

pub(super) struct Stack {
    plan: Arc<Plan>,
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    next_port: u16,
    stats: Arc<Mutex<PeerStats>>,
    inbatch: RecvBatch,
    /// The last acknowledgement number handed to smoltcp, per flow (ports), for the D-SACK filter.
    acks: std::collections::HashMap<u32, u32>,
}

impl Stack {
    pub(super) fn new(
        key: &PrivateKey,
        plan: Arc<Plan>,
        udp: std::net::UdpSocket,
        stats: Arc<Mutex<PeerStats>>,
        wake: Arc<Notify>,
    ) -> Result<Stack, TunnelError> {
        let peer = plan.client_peer(key);
        let sealer = Sealer::start(Arc::new(Mutex::new(peer)), plan.endpoint, &udp, wake)
            .map_err(TunnelError::io("starting the sealing thread"))?;
        let mut link = Link {
            sealer,
            udp: UdpSocket::from_std(udp).map_err(TunnelError::io("UDP socket"))?,
            endpoint: plan.endpoint,
            rx: VecDeque::new(),
            free: Vec::new(),
            out: vec![0u8; BUF],
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
        Ok(Stack {
            plan,
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            next_port: 49152 + rand::random::<u16>() % 8192,
            stats,
            inbatch: RecvBatch::new(),
            acks: std::collections::HashMap::new(),
        })
    }

    pub(super) async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>, wake: Arc<Notify>) {
        let mut next_tick = tokio::time::Instant::now();
        if let Outcome::Network(d) = lock(self.link.sealer.peer()).initiate(&mut self.link.out) {
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
                if self.link.sealer.take_submitted() {
                    self.pump();
                }
            }
            self.link.sealer.submit();
            self.link.sealer.take_submitted();
            if tokio::time::Instant::now() >= next_tick {
                next_tick = tokio::time::Instant::now() + TICK;
                let mut peer = lock(self.link.sealer.peer());
                if let Outcome::Network(d) = peer.tick(&mut self.link.out) {
                    send_to(&self.link.udp, self.link.endpoint, d);
                }
                *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = peer.stats();
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
                let (free, rx, acks) = (&mut link.free, &mut link.rx, &mut self.acks);
                lock(link.sealer.peer()).receive(
                    from,
                    datagram,
                    &mut link.out,
                    |d| send_to(udp, endpoint, d),
                    |packet| {
                        let inside = ipv4_addrs(packet).is_some_and(|(src, dst)| {
                            plan.subnet.contains(src) && dst == plan.address
                        });
                        // smoltcp has no SACK: on three duplicate ACKs it sends again everything in
                        // flight. The receiver answers each of those duplicates with a D-SACK ACK, which
                        // smoltcp would count as duplicate ACKs again: one loss became a storm of
                        // go-back-N rounds (hundreds of MB of duplicates a second, measured). Drop such an
                        // ACK when it acknowledges nothing beyond the last ACK of its flow that smoltcp saw
                        // (one that moves the ACK on always goes through, or smoltcp would stall).
                        let ack = if inside { tcp_ack(packet) } else { None };
                        let duplicate = ack.is_some_and(|(flow, ack)| {
                            let old = acks
                                .get(&flow)
                                .is_some_and(|last| ack.wrapping_sub(*last) as i32 <= 0);
                            old && is_dsack_ack(packet)
                        });
                        if let (Some((flow, ack)), false) = (ack, duplicate) {
                            if acks.len() >= 4096 {
                                acks.clear();
                            }
                            acks.insert(flow, ack);
                        }
                        if inside && !duplicate {
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
                let r = self.rebind(addr).map(|()| {
                    let mut peer = lock(self.link.sealer.peer());
                    if let Outcome::Network(d) = peer.initiate(&mut self.link.out) {
                        send_to(&self.link.udp, self.link.endpoint, d);
                    }
                });
                let _ = reply.send(r);
            }
            Cmd::Shutdown => {}
        }
    }

    /// A new local UDP socket for the stack and the sealing worker.
    fn rebind(&mut self, addr: SocketAddr) -> Result<(), TunnelError> {
        let std = bind_std_udp(addr)?;
        self.link
            .sealer
            .set_socket(&std)
            .map_err(TunnelError::io("UDP socket"))?;
        self.link.udp = UdpSocket::from_std(std).map_err(TunnelError::io("UDP socket"))?;
        Ok(())
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
            tcp::SocketBuffer::new(vec![0u8; tcp_txbuf()]),
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
        let Link { sealer, free, .. } = self;
        Some((RxToken { buf, free }, TxToken { sealer }))
    }

    /// No token while every batch is at the sealing worker: smoltcp keeps the data until it wakes us.
    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        if !self.sealer.has_room() {
            return None;
        }
        Some(TxToken {
            sealer: &mut self.sealer,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = crate::tunnel::MTU as usize;
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
    sealer: &'a mut Sealer,
}

impl phy::TxToken for TxToken<'_> {
    /// smoltcp writes the packet straight into a slot of the batch going to the sealing worker.
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.sealer.send(len, f)
    }
}
