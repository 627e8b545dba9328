//! UDP socket tuning and batched send/receive, shared by every end of the tunnel. On Linux a batch is one
//! `sendmmsg`/`recvmmsg` call and the buffers may pass the system maximum (`SO_*BUFFORCE`); elsewhere (macOS)
//! the same types loop over plain `sendto`/`recvfrom`.

use std::os::fd::AsRawFd;

/// Socket buffer size asked for; bursts from a fast sender must not overflow the receiver's queue.
pub const SOCKET_BUF: usize = 8 << 20;

fn setsockopt_int(fd: i32, opt: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: a socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Bigger send and receive buffers: the *FORCE options pass net.core.{r,w}mem_max when privileged, else
/// the plain options get what the system allows. Best effort.
pub fn enlarge_buffers(socket: &impl AsRawFd) {
    let fd = socket.as_raw_fd();
    let size = SOCKET_BUF as libc::c_int;
    #[cfg(target_os = "linux")]
    let (snd_force, rcv_force) = (
        setsockopt_int(fd, libc::SO_SNDBUFFORCE, size),
        setsockopt_int(fd, libc::SO_RCVBUFFORCE, size),
    );
    #[cfg(not(target_os = "linux"))]
    let (snd_force, rcv_force) = (false, false);
    if !snd_force {
        setsockopt_int(fd, libc::SO_SNDBUF, size);
    }
    if !rcv_force {
        setsockopt_int(fd, libc::SO_RCVBUF, size);
    }
}

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::peer::{Outcome, Peer};

/// Datagrams per batch (one `sendmmsg`/`recvmmsg`).
pub const BATCH: usize = 64;
/// Room per datagram: an [`MTU`](super::MTU)-sized packet plus WireGuard overhead, with margin.
pub const SLOT: usize = 2048;

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

fn from_sockaddr(sa: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Datagrams collected for one `sendmmsg` call, each in a fixed slot (no allocation per packet).
pub struct SendBatch {
    buf: Vec<u8>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_in; BATCH],
    n: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch {
            buf: vec![0u8; BATCH * SLOT],
            lens: [0; BATCH],
            // SAFETY: plain old data.
            addrs: [unsafe { std::mem::zeroed() }; BATCH],
            n: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn is_full(&self) -> bool {
        self.n == BATCH
    }

    /// The next free slot to write a datagram into (None when full: flush first).
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        let i = self.n;
        self.buf.get_mut(i * SLOT..(i + 1) * SLOT)
    }

    /// Keeps the first `len` bytes of the slot just written, for `to`. IPv6 destinations are not batched:
    /// the caller sends those itself.
    pub fn commit(&mut self, len: usize, to: SocketAddr) -> bool {
        let SocketAddr::V4(v4) = to else {
            return false;
        };
        if self.n >= BATCH || len > SLOT {
            return false;
        }
        self.lens[self.n] = len;
        self.addrs[self.n] = to_sockaddr(v4);
        self.n += 1;
        true
    }

    /// Encrypts `packet` for `peer` straight into the next slot; flushes first when full. A packet too
    /// big for a slot (or an IPv6 endpoint) is encrypted into `out` and sent on its own.
    pub fn encapsulate(
        &mut self,
        peer: &mut Peer,
        packet: &[u8],
        endpoint: SocketAddr,
        out: &mut [u8],
        socket: &impl AsRawFd,
    ) {
        if self.is_full() {
            self.flush(socket);
        }
        if let Some(slot) = self.slot() {
            let len = match peer.encapsulate(packet, slot) {
                Outcome::Network(d) => Some(d.len()),
                Outcome::Rejected => None,
                _ => return,
            };
            if let Some(len) = len {
                if !self.commit(len, endpoint) {
                    if let Some(d) = self.slot().and_then(|s| s.get(..len)) {
                        send_to(socket, d, endpoint);
                    }
                }
                return;
            }
        }
        if let Outcome::Network(d) = peer.encapsulate(packet, out) {
            send_to(socket, d, endpoint);
        }
    }

    /// Sends everything collected (what the socket cannot take now is dropped, like a full queue would).
    #[cfg(not(target_os = "linux"))]
    pub fn flush(&mut self, socket: &impl AsRawFd) {
        let n = self.n;
        self.n = 0;
        for i in 0..n {
            let Some(d) = self.buf.get(i * SLOT..i * SLOT + self.lens[i]) else {
                continue;
            };
            send_to(socket, d, from_sockaddr(&self.addrs[i]));
        }
    }

    /// Sends everything collected (what the socket cannot take now is dropped, like a full queue would).
    #[cfg(target_os = "linux")]
    pub fn flush(&mut self, socket: &impl AsRawFd) {
        let n = self.n;
        self.n = 0;
        if n == 0 {
            return;
        }
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: plain old data.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iovs[i] = libc::iovec {
                iov_base: self.buf[i * SLOT..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            msgs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: msgs[done..n] point at live iovecs/addresses/buffers owned by self and this frame.
            let r = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let e = std::io::Error::last_os_error();
                tracing::debug!("sendmmsg of {} datagrams: {e}", n - done);
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    // Skip the datagram the kernel refused (e.g. unreachable) and go on.
                    done += 1;
                    continue;
                }
                break;
            }
            done += r as usize;
        }
    }
}

/// One datagram, best effort (a full socket queue drops it, as the network would).
pub fn send_to(socket: &impl AsRawFd, datagram: &[u8], to: SocketAddr) {
    let sock = socket2_addr(to);
    // SAFETY: a valid buffer and a sockaddr of the given length.
    unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            datagram.as_ptr().cast(),
            datagram.len(),
            0,
            (&sock.0 as *const libc::sockaddr_storage).cast(),
            sock.1,
        );
    }
}

fn socket2_addr(to: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain old data.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match to {
        SocketAddr::V4(v4) => {
            let sa = to_sockaddr(v4);
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sa) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            // SAFETY: plain old data.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = v6.port().to_be();
            sa.sin6_addr.s6_addr = v6.ip().octets();
            sa.sin6_scope_id = v6.scope_id();
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sa) };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// Up to [`BATCH`] datagrams received by one `recvmmsg` call.
pub struct RecvBatch {
    buf: Vec<u8>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_in; BATCH],
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0u8; BATCH * SLOT],
            lens: [0; BATCH],
            // SAFETY: plain old data.
            addrs: [unsafe { std::mem::zeroed() }; BATCH],
            n: 0,
        }
    }

    /// Receives one datagram (blocking sockets honour their read timeout): the portable path, no batching.
    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: slot 0 of our buffer (SLOT bytes) and a sockaddr_in with its length; both outlive the call.
        let r = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                SLOT,
                0,
                (&mut self.addrs[0] as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if r < 0 {
            self.n = 0;
            return Err(std::io::Error::last_os_error());
        }
        let ipv4 = len as usize == std::mem::size_of::<libc::sockaddr_in>();
        self.lens[0] = if ipv4 { (r as usize).min(SLOT) } else { 0 };
        self.n = 1;
        Ok(1)
    }

    /// Receives at least one datagram (blocking sockets honour their read timeout), at most [`BATCH`].
    /// Oversized datagrams arrive truncated and fail authentication later.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: plain old data.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                iov_base: self.buf[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            msgs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: BATCH messages pointing at buffers owned by self, live for the call.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            self.n = 0;
            return Err(std::io::Error::last_os_error());
        }
        self.n = r as usize;
        for (len, msg) in self.lens.iter_mut().zip(&msgs).take(self.n) {
            let ipv4 = msg.msg_hdr.msg_namelen as usize == std::mem::size_of::<libc::sockaddr_in>();
            // Not IPv4: length 0, ignored.
            *len = if ipv4 {
                (msg.msg_len as usize).min(SLOT)
            } else {
                0
            };
        }
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The i-th datagram and its source.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.n {
            return None;
        }
        let d = self.buf.get(i * SLOT..i * SLOT + self.lens[i])?;
        Some((d, from_sockaddr(&self.addrs[i])))
    }
}
