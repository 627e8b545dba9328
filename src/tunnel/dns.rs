//! A DNS responder for the VM names of a TUN-mode tunnel: A records for `<vm>.<namespace>.fcdev` (and the
//! other names of [`Plan::hosts`]), NXDOMAIN for other names under the namespace's domain, REFUSED for the rest.
//! It listens on the tunnel's own address, port 53; where systemd-resolved runs, the TUN link is given it as its
//! DNS server for `~<namespace>.fcdev`, so names resolve with nothing else changed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;

use super::plan::Plan;

const TTL_SECS: u32 = 10;
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u16 = 3;
const RCODE_REFUSED: u16 = 5;
const RCODE_FORMERR: u16 = 1;

/// The question of a query: its name (lowercase, no trailing dot), type, and where it ends in the packet.
fn question(query: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        // No compression in a question; labels are at most 63 bytes.
        if len > 63 {
            return None;
        }
        let label = query.get(i..i + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(i + 2)?, *query.get(i + 3)?]);
    if qclass != CLASS_IN {
        return None;
    }
    Some((labels.join("."), qtype, i + 4))
}

/// The reply to one DNS query, or None for a packet that is not a query (never answer a reply).
pub fn answer(query: &[u8], plan: &Plan) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let flags_in = u16::from_be_bytes([query[2], query[3]]);
    let opcode = (flags_in >> 11) & 0xf;
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    let reply = |rcode: u16, question_end: usize, answer: Option<Ipv4Addr>| {
        // QR, the query's opcode and RD, RA; AA for our own names.
        let aa = if rcode == RCODE_REFUSED { 0 } else { 0x0400 };
        let flags = 0x8000 | (opcode << 11) | aa | (flags_in & 0x0100) | 0x0080 | rcode;
        let mut out = Vec::with_capacity(question_end + 16);
        out.extend_from_slice(&query[..2]);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&u16::from(question_end > 12).to_be_bytes());
        out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&query[12..question_end]);
        if let Some(ip) = answer {
            out.extend_from_slice(&[0xc0, 12]);
            out.extend_from_slice(&TYPE_A.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&TTL_SECS.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        out
    };
    if opcode != 0 || qdcount != 1 {
        return Some(reply(RCODE_FORMERR, 12, None));
    }
    let Some((name, qtype, end)) = question(query) else {
        return Some(reply(RCODE_FORMERR, 12, None));
    };
    let domain = format!("{}.{}", plan.namespace, crate::names::DNS_SUFFIX);
    if name != domain && !name.ends_with(&format!(".{domain}")) {
        return Some(reply(RCODE_REFUSED, end, None));
    }
    match plan.hosts.get(&name) {
        // A known name: its address for A, no records (NOERROR) for other types such as AAAA.
        Some(ip) => Some(reply(0, end, (qtype == TYPE_A).then_some(*ip))),
        None if name == domain => Some(reply(0, end, None)),
        None => Some(reply(RCODE_NXDOMAIN, end, None)),
    }
}

/// Answer queries on `addr` (the tunnel's own address, port 53) on a thread of its own, for as long as the
/// process runs.
pub fn serve(addr: SocketAddr, plan: Arc<Plan>) -> std::io::Result<SocketAddr> {
    let socket = UdpSocket::bind(addr)?;
    let local = socket.local_addr()?;
    std::thread::Builder::new()
        .name("fcdev-dns".into())
        .spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..n], &plan) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HostEntry, PeerConfig};

    fn plan() -> Plan {
        Plan::from_config(&PeerConfig {
            id: 1,
            name: "laptop".into(),
            address: "10.240.0.2".into(),
            server_public_key: crate::tunnel::PrivateKey::generate()
                .public_key()
                .to_base64(),
            endpoint: "127.0.0.1:51820".into(),
            allowed_ips: vec!["10.240.0.0/24".into()],
            keepalive: 25,
            namespace: "alice".into(),
            dns_suffix: "alice.fcdev".into(),
            hosts: vec![HostEntry {
                name: "n1.alice.fcdev".into(),
                address: "10.240.0.10".into(),
            }],
        })
        .unwrap()
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn a_vm_name_gets_its_address() {
        let r = answer(&query("N1.alice.fcdev", TYPE_A), &plan()).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34], "same id");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 240, 0, 10]);
    }

    #[test]
    fn unknown_names_and_other_domains_and_other_types() {
        let p = plan();
        let r = answer(&query("x9.alice.fcdev", TYPE_A), &p).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN as u8);
        let r = answer(&query("example.com", TYPE_A), &p).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_REFUSED as u8);
        let r = answer(&query("n1.bob.fcdev", TYPE_A), &p).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_REFUSED as u8, "another namespace");
        let r = answer(&query("n1.alice.fcdev", 28), &p).unwrap();
        assert_eq!(
            (r[3] & 0x0f, r[7]),
            (0, 0),
            "AAAA of a known name: no records"
        );
    }

    #[test]
    fn garbage_and_replies_get_no_crash() {
        let p = plan();
        assert!(answer(&[1, 2, 3], &p).is_none());
        let mut reply = query("n1.alice.fcdev", TYPE_A);
        reply[2] |= 0x80;
        assert!(answer(&reply, &p).is_none(), "never answer a reply");
        let mut cut = query("n1.alice.fcdev", TYPE_A);
        cut.truncate(20);
        assert_eq!(answer(&cut, &p).unwrap()[3] & 0x0f, RCODE_FORMERR as u8);
        let mut long = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 200];
        long.extend_from_slice(&[b'a'; 300]);
        assert_eq!(answer(&long, &p).unwrap()[3] & 0x0f, RCODE_FORMERR as u8);
    }
}
