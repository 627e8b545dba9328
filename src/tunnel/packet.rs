//! Just enough IPv4 header reading for routing and isolation decisions, and the one TCP check rootless mode
//! needs (duplicate-segment reports).

use std::net::Ipv4Addr;

/// Source and destination of an IPv4 packet, or `None` when it is not a plausible IPv4 packet.
pub fn ipv4_addrs(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let header = packet.get(..20)?;
    if header[0] >> 4 != 4 || usize::from(header[0] & 0x0f) * 4 < 20 {
        return None;
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    Some((src, dst))
}

/// The flow (source and destination port) and acknowledgement number of an IPv4 TCP segment with ACK set.
pub fn tcp_ack(p: &[u8]) -> Option<(u32, u32)> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 || *p.get(9)? != 6 || *p.get(ihl + 13)? & 0x10 == 0 {
        return None;
    }
    let tcp = p.get(ihl..ihl + 12)?;
    let flow = u32::from_be_bytes(tcp[0..4].try_into().ok()?);
    Some((flow, u32::from_be_bytes(tcp[8..12].try_into().ok()?)))
}

/// True for a pure TCP acknowledgement (no data, no SYN/FIN/RST) whose first SACK block is a D-SACK
/// (RFC 2883): the receiver reporting a segment it already had. Such an ACK repeats the last acknowledgement
/// number, so a sender counts it as a duplicate ACK, though it says nothing was lost: the duplicate was ours.
pub fn is_dsack_ack(packet: &[u8]) -> bool {
    dsack_ack(packet).unwrap_or(false)
}

fn dsack_ack(p: &[u8]) -> Option<bool> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 || *p.get(9)? != 6 {
        return Some(false);
    }
    let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
    let tcp = p.get(ihl..total.min(p.len()))?;
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    const FIN_SYN_RST: u8 = 0x07;
    const ACK: u8 = 0x10;
    if doff < 20 || tcp.len() != doff || flags & FIN_SYN_RST != 0 || flags & ACK == 0 {
        return Some(false);
    }
    let be32 = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let ack = be32(tcp, 8)?;
    let mut opts = tcp.get(20..doff)?;
    while let Some(&kind) = opts.first() {
        match kind {
            0 => break,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1)?);
                if len < 2 {
                    return Some(false);
                }
                let opt = opts.get(..len)?;
                if kind == 5 && len >= 10 {
                    let (left, right) = (be32(opt, 2)?, be32(opt, 6)?);
                    // Below the cumulative ACK, or inside the next block: a D-SACK.
                    let below = ack.wrapping_sub(right) as i32 >= 0;
                    let inside = len >= 18 && {
                        let (l2, r2) = (be32(opt, 10)?, be32(opt, 14)?);
                        left.wrapping_sub(l2) as i32 >= 0 && r2.wrapping_sub(right) as i32 >= 0
                    };
                    return Some(below || inside);
                }
                opts = &opts[len..];
            }
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_and_rejects_garbage() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 240, 1, 2]);
        p[16..20].copy_from_slice(&[10, 240, 1, 10]);
        assert_eq!(
            ipv4_addrs(&p),
            Some((Ipv4Addr::new(10, 240, 1, 2), Ipv4Addr::new(10, 240, 1, 10)))
        );
        assert_eq!(ipv4_addrs(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_addrs(&p), None);
    }

    /// An IPv4+TCP header with `flags`, acknowledging `ack`, carrying these TCP options and `data` bytes.
    fn tcp(flags: u8, ack: u32, options: &[u8], data: usize) -> Vec<u8> {
        let doff = 20 + options.len();
        let total = 20 + doff + data;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = 6;
        p[20 + 8..20 + 12].copy_from_slice(&ack.to_be_bytes());
        p[20 + 12] = ((doff / 4) as u8) << 4;
        p[20 + 13] = flags;
        p[40..40 + options.len()].copy_from_slice(options);
        p
    }

    fn sack(blocks: &[(u32, u32)]) -> Vec<u8> {
        let mut o = vec![1, 1, 5, (2 + 8 * blocks.len()) as u8];
        for (l, r) in blocks {
            o.extend_from_slice(&l.to_be_bytes());
            o.extend_from_slice(&r.to_be_bytes());
        }
        o
    }

    #[test]
    fn tells_duplicate_reports_from_loss_reports() {
        // A duplicate below the cumulative ACK (also across the sequence wrap).
        assert!(is_dsack_ack(&tcp(0x10, 5000, &sack(&[(3000, 4000)]), 0)));
        assert!(is_dsack_ack(&tcp(
            0x10,
            100,
            &sack(&[(u32::MAX - 999, 50)]),
            0
        )));
        // A duplicate above it, inside the next (ordinary) SACK block.
        assert!(is_dsack_ack(&tcp(
            0x10,
            5000,
            &sack(&[(7000, 8000), (6000, 9000)]),
            0
        )));
        // An ordinary SACK (a hole before 6000: a real loss) and a plain ACK are not.
        assert!(!is_dsack_ack(&tcp(0x10, 5000, &sack(&[(6000, 9000)]), 0)));
        assert!(!is_dsack_ack(&tcp(
            0x10,
            5000,
            &sack(&[(9000, 10000), (6000, 8000)]),
            0
        )));
        assert!(!is_dsack_ack(&tcp(0x10, 5000, &[], 0)));
        // Data, FIN or RST: never.
        assert!(!is_dsack_ack(&tcp(0x18, 5000, &sack(&[(3000, 4000)]), 10)));
        assert!(!is_dsack_ack(&tcp(0x11, 5000, &sack(&[(3000, 4000)]), 0)));
        assert!(!is_dsack_ack(&tcp(0x14, 5000, &sack(&[(3000, 4000)]), 0)));
        // Garbage and truncation.
        let p = tcp(0x10, 5000, &sack(&[(3000, 4000)]), 0);
        for n in 0..p.len() {
            assert!(!is_dsack_ack(&p[..n]));
        }
        assert!(!is_dsack_ack(&[0x45, 0, 0, 0, 0, 0, 0, 0, 0, 6]));
        assert_eq!(tcp_ack(&p).map(|(_, ack)| ack), Some(5000));
        assert_eq!(tcp_ack(&tcp(0x02, 5000, &[], 0)), None);
        assert_eq!(tcp_ack(&p[..30]), None);
    }
}
