//! A tiny IPv4 subnet type (the namespace /24s and the pool they come from).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an IPv4 subnet like 10.240.0.0/24")]
pub struct SubnetParseError(String);

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        let mask = Self::mask_bits(prefix);
        Subnet {
            base: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        }
    }

    fn mask_bits(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask_bits(self.prefix) == u32::from(self.base)
    }

    /// The n-th address of the subnet (`.1` is `host(1)`).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(n))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SubnetParseError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if prefix > 32 {
            return Err(err());
        }
        Ok(Subnet::new(addr, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_contains() {
        let s: Subnet = "10.240.3.7/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.240.3.0/24");
        assert!(s.contains("10.240.3.200".parse().unwrap()));
        assert!(!s.contains("10.240.4.1".parse().unwrap()));
        assert_eq!(s.host(1), Ipv4Addr::new(10, 240, 3, 1));
        assert!("10.0.0.0/33".parse::<Subnet>().is_err());
        assert!("nonsense".parse::<Subnet>().is_err());
    }
}
