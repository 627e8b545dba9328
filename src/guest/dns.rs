//! A name server for the cluster's names on 127.0.0.1:53 inside the guest, answered from the name map the agent
//! keeps (`/run/fcdev/hosts`, what /etc/hosts points at). The press proxy's nginx resolves its upstream through it
//! per request (`resolver 127.0.0.1`), so a re-address needs no nginx reload: a reload re-parses the whole
//! configuration and forks new workers, ~0.1 s of CPU under TCG right after a restore, while the cluster starts.
//!
//! Only what that needs: one question per query, `A` records (other types of a known name: no answer, no error),
//! `NXDOMAIN` for unknown names, answers valid for a few seconds.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;

/// Where it listens (inside the guest only).
pub const LISTEN: &str = "127.0.0.1:53";
/// Seconds an answer may be cached.
const TTL: u32 = 5;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const NXDOMAIN: u8 = 3;

/// Answer queries on `listen` in a thread of its own, each from the current contents of `hosts` (`ADDRESS NAME…`
/// lines). Returns the address it listens on.
pub fn serve(listen: &str, hosts: PathBuf) -> std::io::Result<SocketAddr> {
    let sock = UdpSocket::bind(listen)?;
    let at = sock.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let map = std::fs::read_to_string(&hosts).unwrap_or_default();
            if let Some(reply) = answer(&buf[..n], |name| lookup(&map, name)) {
                let _ = sock.send_to(&reply, from);
            }
        }
    });
    Ok(at)
}

/// The address of `name` in a hosts file's text (the first line naming it).
fn lookup(map: &str, name: &str) -> Option<Ipv4Addr> {
    map.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let addr = words.next()?.parse().ok()?;
        words.any(|n| n.eq_ignore_ascii_case(name)).then_some(addr)
    })
}

/// The reply to one DNS query, or None for what is not a plain query (dropped).
fn answer(query: &[u8], lookup: impl Fn(&str) -> Option<Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[2] & 0x78 != 0 {
        return None; // too short, a response, or not a standard query
    }
    if u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None; // exactly one question
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a compression pointer or a reserved label type: not in a question we ask for
        }
        labels.push(std::str::from_utf8(query.get(pos..pos + len)?).ok()?);
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    let question = query.get(12..question_end)?;
    let found = lookup(&labels.join("."));

    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    reply.push(0x84 | (query[2] & 0x01)); // response, authoritative, recursion desired as asked
    reply.push(if found.is_some() { 0 } else { NXDOMAIN });
    let answers = match found {
        Some(_) if qtype == TYPE_A || qtype == TYPE_ANY => 1u16,
        _ => 0,
    };
    for count in [1u16, answers, 0, 0] {
        reply.extend_from_slice(&count.to_be_bytes());
    }
    reply.extend_from_slice(question);
    if let (1, Some(addr)) = (answers, found) {
        reply.extend_from_slice(&[0xc0, 0x0c]); // the name: the question's
        reply.extend_from_slice(&TYPE_A.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes()); // IN
        reply.extend_from_slice(&TTL.to_be_bytes());
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    const MAP: &str = "127.0.0.1 localhost\n127.0.1.1 n1\n10.240.3.10 n1\n10.240.3.11 f1\n";

    #[test]
    fn a_cluster_name_resolves_to_its_address_in_the_map() {
        let q = query(0x1234, "F1", TYPE_A);
        let r = answer(&q, |n| lookup(MAP, n)).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "a response");
        assert_eq!(r[3] & 0x0f, 0, "no error");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[12..q.len()], &q[12..], "the question is echoed");
        assert_eq!(&r[r.len() - 4..], &[10, 240, 3, 11]);
    }

    #[test]
    fn an_unknown_name_is_nxdomain_and_another_type_gets_no_answer() {
        let r = answer(&query(1, "m9", TYPE_A), |n| lookup(MAP, n)).unwrap();
        assert_eq!(r[3] & 0x0f, NXDOMAIN);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0);
        let aaaa = answer(&query(2, "f1", 28), |n| lookup(MAP, n)).unwrap();
        assert_eq!(aaaa[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([aaaa[6], aaaa[7]]), 0);
    }

    #[test]
    fn malformed_queries_are_dropped() {
        assert!(answer(&[0u8; 5], |n| lookup(MAP, n)).is_none());
        let mut truncated = query(3, "f1", TYPE_A);
        truncated.truncate(truncated.len() - 3);
        assert!(answer(&truncated, |n| lookup(MAP, n)).is_none());
        let mut response = query(4, "f1", TYPE_A);
        response[2] |= 0x80;
        assert!(answer(&response, |n| lookup(MAP, n)).is_none());
    }

    #[test]
    fn the_server_answers_over_udp_from_the_current_map() {
        // On an ephemeral loopback port (53 needs root and may be taken).
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, MAP).unwrap();
        let at = serve("127.0.0.1:0", hosts.clone()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let ask = |id: u16, name: &str| {
            client.send_to(&query(id, name, TYPE_A), at).unwrap();
            let mut buf = [0u8; 512];
            let n = client.recv(&mut buf).unwrap();
            buf[n - 4..n].to_vec()
        };
        assert_eq!(
            ask(7, "n1"),
            [127, 0, 1, 1],
            "the first line naming n1 wins"
        );
        // A re-address rewrites the map: the next query gets the new address.
        std::fs::write(&hosts, "10.240.9.11 f1\n").unwrap();
        assert_eq!(ask(8, "f1"), [10, 240, 9, 11]);
    }
}
