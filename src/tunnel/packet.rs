//! Just enough IPv4 header reading for routing and isolation decisions.

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
}
