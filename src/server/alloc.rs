//! Address plan (DESIGN.md, "Network plan"): pool 10.240.0.0/12, one /24 per namespace; in a /24, `.1` is the
//! host gateway, `.2`–`.9` are tunnel peers, VMs start at `.10`.
//!
//! Allocation is "lowest free number", computed inside the store's write transaction, so it never hands out one
//! twice and survives restarts (the numbers are the rows).

use std::net::Ipv4Addr;

use crate::api::Subnet;

pub const POOL_BASE: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 0);
pub const POOL_PREFIX: u8 = 12;
/// /24s in a /12.
pub const NAMESPACE_COUNT: u32 = 1 << (24 - POOL_PREFIX);
pub const GATEWAY_HOST: u32 = 1;
pub const FIRST_PEER_HOST: u32 = 2;
pub const LAST_PEER_HOST: u32 = 9;
pub const FIRST_VM_HOST: u32 = 10;
pub const LAST_VM_HOST: u32 = 254;

pub fn pool() -> Subnet {
    Subnet::new(POOL_BASE, POOL_PREFIX)
}

/// The /24 of namespace number `index`.
pub fn namespace_subnet(index: u32) -> Subnet {
    Subnet::new(Ipv4Addr::from(u32::from(POOL_BASE) + (index << 8)), 24)
}

/// The lowest number in `0..count` not in `used` (sorted).
pub fn lowest_free(used: &[u32], count: u32) -> Option<u32> {
    lowest_free_from(used, 0, count.checked_sub(1)?)
}

/// The lowest number in `first..=last` not in `used` (sorted ascending).
pub fn lowest_free_from(used: &[u32], first: u32, last: u32) -> Option<u32> {
    let mut candidate = first;
    for &u in used {
        if u < candidate {
            continue;
        }
        if u > candidate {
            break;
        }
        candidate += 1;
    }
    (candidate <= last).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_tile_the_pool() {
        assert_eq!(namespace_subnet(0).to_string(), "10.240.0.0/24");
        assert_eq!(namespace_subnet(1).to_string(), "10.240.1.0/24");
        assert_eq!(namespace_subnet(256).to_string(), "10.241.0.0/24");
        let last = namespace_subnet(NAMESPACE_COUNT - 1);
        assert_eq!(last.to_string(), "10.255.255.0/24");
        assert!(pool().contains(last.base));
    }

    #[test]
    fn lowest_free_fills_gaps() {
        assert_eq!(lowest_free(&[], 4), Some(0));
        assert_eq!(lowest_free(&[0, 1, 3], 4), Some(2));
        assert_eq!(lowest_free(&[0, 1, 2, 3], 4), None);
        assert_eq!(lowest_free_from(&[2, 3, 10], 2, 9), Some(4));
        assert_eq!(lowest_free_from(&[10, 11], 10, 254), Some(12));
        assert_eq!(lowest_free_from(&[], 10, 9), None);
    }
}
