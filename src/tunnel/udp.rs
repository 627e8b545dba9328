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

/// Linux's UDP segmentation offload options (<linux/udp.h>; not in the libc crate for glibc targets).
#[cfg(target_os = "linux")]
mod offload {
    pub const SOL_UDP: libc::c_int = 17;
    pub const UDP_SEGMENT: libc::c_int = 103;
    pub const UDP_GRO: libc::c_int = 104;
    /// The kernel's limit of segments in one GSO send (UDP_MAX_SEGMENTS).
    pub const MAX_SEGMENTS: usize = 64;
    /// The payload one UDP send can carry (64 KiB less the IP and UDP headers).
    pub const MAX_PAYLOAD: usize = 65_507;
}

/// Whether sends may use UDP GSO (one `sendmsg` carrying many same-sized datagrams); cleared for good the first
/// time the kernel refuses it (an old kernel, a device without checksum offload).
#[cfg(target_os = "linux")]
static GSO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The socket setup of every end of the tunnel: bigger send and receive buffers (the *FORCE options pass
/// net.core.{r,w}mem_max when privileged, else the plain options get what the system allows), and on Linux UDP
/// GRO, so that datagrams of one sender arrive coalesced in one buffer ([`RecvBatch`] splits them; every
/// reader of these sockets goes through it). Best effort.
pub fn enlarge_buffers(socket: &impl AsRawFd) {
    let fd = socket.as_raw_fd();
    #[cfg(target_os = "linux")]
    {
        let one: libc::c_int = 1;
        // SAFETY: a socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                offload::SOL_UDP,
                offload::UDP_GRO,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
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

    /// Sends everything collected (what the socket cannot take now is dropped, like a full queue would). Runs of
    /// datagrams to one address, all of one size but the last, go out as one UDP GSO send each (one skb through
    /// the kernel instead of one per datagram); the runs together are one `sendmmsg`.
    #[cfg(target_os = "linux")]
    pub fn flush(&mut self, socket: &impl AsRawFd) {
        use std::sync::atomic::Ordering;
        let n = self.n;
        self.n = 0;
        if n == 0 {
            return;
        }
        let gso = GSO.load(Ordering::Relaxed);
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        for (i, iov) in iovs.iter_mut().enumerate().take(n) {
            *iov = libc::iovec {
                iov_base: self.buf[i * SLOT..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
        }
        // One message per run: (first datagram, datagrams, segment size).
        let mut runs: Vec<(usize, usize, usize)> = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let (size, to) = (self.lens[i], self.addrs[i]);
            let mut j = i + 1;
            let mut total = size;
            while gso
                && j < n
                && j - i < offload::MAX_SEGMENTS
                && same_addr(&self.addrs[j], &to)
                && self.lens[j] <= size
                && self.lens[j] > 0
                && total + self.lens[j] <= offload::MAX_PAYLOAD
            {
                total += self.lens[j];
                j += 1;
                if self.lens[j - 1] < size {
                    break; // a shorter datagram ends a run
                }
            }
            runs.push((i, j - i, size));
            i = j;
        }
        const CMSG: usize = 32;
        let mut controls = vec![[0u8; CMSG]; runs.len()];
        // SAFETY: plain old data.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; runs.len()];
        for (m, &(first, count, size)) in runs.iter().enumerate() {
            let hdr = &mut msgs[m].msg_hdr;
            hdr.msg_name = (&mut self.addrs[first] as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[first];
            hdr.msg_iovlen = count as _;
            if count > 1 {
                hdr.msg_control = controls[m].as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE of a u16 fits the 32-byte control buffer; the header and its data are
                // written inside it.
                unsafe {
                    hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(hdr);
                    (*c).cmsg_level = offload::SOL_UDP;
                    (*c).cmsg_type = offload::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
                }
            }
        }
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: msgs[done..] point at live iovecs/addresses/buffers/controls owned by self and this frame.
            let r = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (msgs.len() - done) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                done += r as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            tracing::debug!("sendmmsg of {} messages: {e}", msgs.len() - done);
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => break,
                _ => {
                    let (first, count, _) = runs[done];
                    if count > 1 && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) {
                        // The kernel or the device cannot segment: no GSO from now on; this run one by one.
                        GSO.store(false, Ordering::Relaxed);
                        tracing::info!("UDP GSO refused ({e}): sending datagram by datagram");
                        for k in first..first + count {
                            if let Some(d) = self.buf.get(k * SLOT..k * SLOT + self.lens[k]) {
                                send_to(socket, d, from_sockaddr(&self.addrs[k]));
                            }
                        }
                    }
                    // Skip the message the kernel refused (e.g. unreachable) and go on.
                    done += 1;
                }
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn same_addr(a: &libc::sockaddr_in, b: &libc::sockaddr_in) -> bool {
    a.sin_addr.s_addr == b.sin_addr.s_addr && a.sin_port == b.sin_port
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

/// Messages per `recvmmsg` call, and the room of each: with UDP GRO one message holds up to 64 KiB of one
/// sender's datagrams (elsewhere one datagram).
#[cfg(target_os = "linux")]
const RECV_MSGS: usize = 32;
#[cfg(target_os = "linux")]
const RECV_SLOT: usize = 1 << 16;
#[cfg(not(target_os = "linux"))]
const RECV_MSGS: usize = 1;
#[cfg(not(target_os = "linux"))]
const RECV_SLOT: usize = SLOT;

/// The datagrams of one receive call: up to [`RECV_MSGS`] messages, each split into its datagrams by the
/// segment size GRO reports.
pub struct RecvBatch {
    buf: Vec<u8>,
    addrs: [libc::sockaddr_in; RECV_MSGS],
    /// Each datagram: offset in `buf`, length, and the message (source address) it came in.
    segs: Vec<(usize, usize, usize)>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0u8; RECV_MSGS * RECV_SLOT],
            // SAFETY: plain old data.
            addrs: [unsafe { std::mem::zeroed() }; RECV_MSGS],
            segs: Vec::with_capacity(RECV_MSGS * 8),
        }
    }

    /// Receives one datagram (blocking sockets honour their read timeout): the portable path, no batching.
    #[cfg(not(target_os = "linux"))]
    pub fn recv(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        self.segs.clear();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: our buffer (RECV_SLOT bytes) and a sockaddr_in with its length; both outlive the call.
        let r = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                RECV_SLOT,
                0,
                (&mut self.addrs[0] as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if len as usize == std::mem::size_of::<libc::sockaddr_in>() {
            self.segs.push((0, (r as usize).min(RECV_SLOT), 0));
        }
        Ok(self.segs.len())
    }

    /// Receives at least one message (blocking sockets honour their read timeout), at most [`RECV_MSGS`], and
    /// splits coalesced (GRO) messages into their datagrams. Oversized datagrams arrive truncated and fail
    /// authentication later; non-IPv4 sources are skipped. Returns the number of datagrams.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, socket: &impl AsRawFd) -> std::io::Result<usize> {
        self.segs.clear();
        const CMSG: usize = 64;
        let mut controls = [[0u8; CMSG]; RECV_MSGS];
        let mut iovs: [libc::iovec; RECV_MSGS] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; RECV_MSGS];
        // SAFETY: plain old data.
        let mut msgs: [libc::mmsghdr; RECV_MSGS] = unsafe { std::mem::zeroed() };
        for i in 0..RECV_MSGS {
            iovs[i] = libc::iovec {
                iov_base: self.buf[i * RECV_SLOT..].as_mut_ptr().cast(),
                iov_len: RECV_SLOT,
            };
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = controls[i].as_mut_ptr().cast();
            hdr.msg_controllen = CMSG as _;
        }
        // SAFETY: RECV_MSGS messages pointing at buffers owned by self and this frame, live for the call.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                RECV_MSGS as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (m, msg) in msgs.iter().enumerate().take(r as usize) {
            let hdr = &msg.msg_hdr;
            if hdr.msg_namelen as usize != std::mem::size_of::<libc::sockaddr_in>() {
                continue;
            }
            let len = (msg.msg_len as usize).min(RECV_SLOT);
            let seg = gro_segment(hdr).filter(|s| *s > 0).unwrap_or(len);
            let mut off = 0;
            while off < len {
                let n = seg.min(len - off);
                self.segs.push((m * RECV_SLOT + off, n, m));
                off += n;
            }
        }
        Ok(self.segs.len())
    }

    pub fn len(&self) -> usize {
        self.segs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// The i-th datagram and its source.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let &(off, len, m) = self.segs.get(i)?;
        let d = self.buf.get(off..off + len)?;
        Some((d, from_sockaddr(self.addrs.get(m)?)))
    }
}

/// The segment size of a coalesced message (the UDP_GRO control message), if the kernel put one.
#[cfg(target_os = "linux")]
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: walking the control messages the kernel wrote into the buffer `hdr` describes.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == offload::SOL_UDP && (*c).cmsg_type == offload::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

#[cfg(test)]
mod offload_tests {
    use super::*;

    /// `count` datagrams of `size` bytes (the last one shorter), each filled with its own number, sent in one
    /// flush; the receiver gets every one, whole and in order, GRO or not.
    fn roundtrip(gro: bool, count: usize, size: usize) {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if gro {
            enlarge_buffers(&rx);
        }
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enlarge_buffers(&tx);
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new();
        let mut want = Vec::new();
        for k in 0..count {
            let len = if k + 1 == count { size / 2 } else { size };
            let d = vec![k as u8; len];
            batch.slot().unwrap()[..len].copy_from_slice(&d);
            assert!(batch.commit(len, to));
            want.push(d);
        }
        batch.flush(&tx);
        let mut got = Vec::new();
        let mut rb = RecvBatch::new();
        let mut coalesced = false;
        while got.len() < want.len() {
            rb.recv(&rx).expect("datagrams");
            // Several datagrams in the first message: the kernel kept the GSO send as one and GRO handed it over.
            coalesced |= rb.segs.iter().filter(|s| s.2 == 0).count() > 1;
            for i in 0..rb.len() {
                let (d, from) = rb.get(i).unwrap();
                assert_eq!(from, tx.local_addr().unwrap());
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, want);
        assert_eq!(coalesced, gro && count > 1, "coalesced");
    }

    #[test]
    fn a_gso_batch_arrives_whole_with_gro() {
        roundtrip(true, BATCH, 1452);
    }

    #[test]
    fn a_gso_batch_arrives_whole_without_gro() {
        roundtrip(false, BATCH, 1452);
    }

    #[test]
    fn datagrams_of_many_sizes_and_one_alone() {
        roundtrip(true, 1, 1452);
        roundtrip(true, 3, 100);
        roundtrip(true, 50, 1200);
    }
}
