//! The few netlink requests the guest agent needs, by system call (no `ip` or `ss` program: under TCG each
//! program started in a restored guest costs ~0.1–0.3 s of CPU): set the NIC's MAC and bring it up, replace its
//! IPv4 addresses, replace the default route, forget the neighbours, and destroy the TCP sockets of an old
//! address (`ss -K`, through sock_diag).

use std::io;
use std::net::Ipv4Addr;

const NETLINK_ROUTE: i32 = 0;
const NETLINK_SOCK_DIAG: i32 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

const IFLA_ADDRESS: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// One netlink socket to the kernel.
struct Socket {
    fd: i32,
    seq: u32,
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: fd is a socket this value owns.
        unsafe { libc::close(self.fd) };
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink attribute: length, type, value, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

impl Socket {
    fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, seq: 1 })
    }

    fn send(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<u32> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and addr outlive the call; lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Read replies to `seq` until its ack or the end of its dump; returns the payloads of the other messages
    /// (type, payload).
    fn replies(&mut self, seq: u32) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(self.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let data = &buf[..n as usize];
            let mut pos = 0;
            while pos + 16 <= data.len() {
                let len =
                    u32::from_ne_bytes(data[pos..pos + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([data[pos + 4], data[pos + 5]]);
                let mseq =
                    u32::from_ne_bytes(data[pos + 8..pos + 12].try_into().unwrap_or_default());
                if len < 16 || pos + len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                let payload = &data[pos + 16..pos + len];
                pos += align4(len);
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0);
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => out.push((kind, payload.to_vec())),
                }
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        let seq = self.send(kind, flags | NLM_F_ACK, payload)?;
        self.replies(seq).map(|_| ())
    }

    fn dump(&mut self, kind: u16, payload: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let seq = self.send(kind, NLM_F_DUMP, payload)?;
        self.replies(seq)
    }
}

/// The index of a network interface by name.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// What a re-address changes on one interface.
pub struct Readdress {
    pub index: u32,
    pub mac: Option<[u8; 6]>,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// `ip link set DEV address MAC up; ip addr flush dev DEV; ip addr add A/P dev DEV; ip route replace default
/// via GW; ip neigh flush all`, as one function.
pub fn readdress(r: &Readdress) -> io::Result<()> {
    let mut s = Socket::open(NETLINK_ROUTE)?;
    // The link: ifinfomsg (family, pad, type, index, flags, change) and the MAC.
    let mut link = Vec::new();
    link.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    link.extend_from_slice(&(r.index as i32).to_ne_bytes());
    link.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    link.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    if let Some(mac) = r.mac {
        attr(&mut link, IFLA_ADDRESS, &mac);
    }
    s.request(RTM_NEWLINK, 0, &link)?;
    // Every IPv4 address of the interface goes (each delete repeats the address as the dump gave it).
    let query = [libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0];
    for (_, msg) in s.dump(RTM_GETADDR, &query)? {
        if msg.len() >= 8 && u32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]) == r.index {
            match s.request(RTM_DELADDR, 0, &msg) {
                Ok(()) => {}
                // A secondary address goes with its primary.
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let mut add = vec![libc::AF_INET as u8, r.prefix, 0, 0];
    add.extend_from_slice(&r.index.to_ne_bytes());
    attr(&mut add, IFA_LOCAL, &r.addr.octets());
    attr(&mut add, IFA_ADDRESS, &r.addr.octets());
    s.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &add)?;
    if let Some(gw) = r.gateway {
        // rtmsg: family, dst_len, src_len, tos, table main, protocol boot, scope universe, type unicast, flags.
        let mut route = vec![libc::AF_INET as u8, 0, 0, 0, 254, 3, 0, 1];
        route.extend_from_slice(&0u32.to_ne_bytes());
        attr(&mut route, RTA_GATEWAY, &gw.octets());
        attr(&mut route, RTA_OIF, &r.index.to_ne_bytes());
        s.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &route)?;
    }
    // Forget the neighbours (the snapshot network's MACs), except permanent and no-ARP entries.
    let query = [libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for (_, msg) in s.dump(RTM_GETNEIGH, &query)? {
        if msg.len() < 12 {
            continue;
        }
        let state = u16::from_ne_bytes([msg[8], msg[9]]);
        if state & (NUD_NOARP | NUD_PERMANENT) != 0 {
            continue;
        }
        match s.request(RTM_DELNEIGH, 0, &msg) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Announce `addr` at `mac` on the interface with a gratuitous ARP (a request for our own address): the peers
/// and the host bridge that already asked for this address (an ARP entry still incomplete: they sent to it
/// before this VM had it) learn it now instead of at their next ARP retry, up to a second later.
pub fn announce(index: u32, mac: [u8; 6], addr: Ipv4Addr) -> io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = Socket { fd, seq: 0 };
    // ARP over Ethernet for IPv4: htype 1, ptype 0x0800, hlen 6, plen 4, request; sender = target = addr.
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&addr.octets());
    arp.extend_from_slice(&[0u8; 6]);
    arp.extend_from_slice(&addr.octets());
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set are the ones a send needs.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: arp and to outlive the call; lengths are theirs.
    let n = unsafe {
        libc::sendto(
            sock.fd,
            arp.as_ptr().cast(),
            arp.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The MAC address of an interface (`/sys/class/net/NAME/address`).
pub fn mac_of(name: &str) -> io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    bytes
        .try_into()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Destroy every TCP socket whose local address is `addr` (`ss -K -t src ADDR`): their owners see the error
/// and reconnect at once, to names resolved afresh. Returns how many went.
pub fn destroy_tcp_from(addr: Ipv4Addr) -> io::Result<usize> {
    let mut s = Socket::open(NETLINK_SOCK_DIAG)?;
    // inet_diag_req_v2: family, protocol, ext, pad, states, then an empty inet_diag_sockid (48 bytes).
    let mut req = vec![libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]);
    let mut destroyed = 0;
    for (_, msg) in s.dump(SOCK_DIAG_BY_FAMILY, &req)? {
        // inet_diag_msg: family, state, timer, retrans, then the sockid (sport, dport, src[16], dst[16], if,
        // cookie[8]).
        if msg.len() < 4 + 48 {
            continue;
        }
        let id = &msg[4..52];
        if id[4..8] != addr.octets() {
            continue;
        }
        let mut kill = vec![libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0];
        kill.extend_from_slice(&u32::MAX.to_ne_bytes());
        kill.extend_from_slice(id);
        if s.request(SOCK_DESTROY, 0, &kill).is_ok() {
            destroyed += 1;
        }
    }
    Ok(destroyed)
}
