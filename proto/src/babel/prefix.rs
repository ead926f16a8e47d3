//! The two value types Babel routes are keyed by: a [`Prefix`] (IPv4 or IPv6, host bits zero) and a
//! [`RouterId`] (§3.2.2: 8 opaque bytes).

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 prefix with its host bits cleared. Ordered by family (IPv4 first), then
/// address, then length, so route tables iterate deterministically. Stored as integers so that the
/// comparisons route tables make all the time are cheap.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// 0 for IPv4, 1 for IPv6.
    family: u8,
    /// The address, right-aligned for IPv4.
    bits: u128,
    len: u8,
}

impl Prefix {
    /// The prefix `addr/len` with host bits cleared, or `None` if `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        match addr {
            IpAddr::V4(a) => {
                if len > 32 {
                    return None;
                }
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Some(Prefix {
                    family: 0,
                    bits: u128::from(u32::from(a) & mask),
                    len,
                })
            }
            IpAddr::V6(a) => {
                if len > 128 {
                    return None;
                }
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                Some(Prefix {
                    family: 1,
                    bits: u128::from(a) & mask,
                    len,
                })
            }
        }
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        if self.family == 0 {
            // Built from a u32 in `new`.
            IpAddr::V4(Ipv4Addr::from(self.bits as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.bits))
        }
    }

    /// The prefix length in bits.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for an IPv4 prefix.
    pub fn is_ipv4(&self) -> bool {
        self.family == 0
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Prefix::new(ip, self.len).is_some_and(|p| p == *self)
    }

    /// Whether `other` lies entirely inside this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains(other.addr())
    }

    /// The address bytes: 4 for IPv4, 16 for IPv6.
    pub(crate) fn octets(&self) -> ([u8; 16], usize) {
        let mut out = [0u8; 16];
        match self.addr() {
            IpAddr::V4(a) => {
                out[..4].copy_from_slice(&a.octets());
                (out, 4)
            }
            IpAddr::V6(a) => (a.octets(), 16),
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A prefix string was not `ADDR/LEN` with a length the family allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid prefix (expected ADDR/LEN)")]
pub struct ParsePrefixError;

impl FromStr for Prefix {
    type Err = ParsePrefixError;
    fn from_str(s: &str) -> Result<Prefix, ParsePrefixError> {
        let (a, l) = s.split_once('/').ok_or(ParsePrefixError)?;
        let addr: IpAddr = a.parse().map_err(|_| ParsePrefixError)?;
        let len: u8 = l.parse().map_err(|_| ParsePrefixError)?;
        Prefix::new(addr, len).ok_or(ParsePrefixError)
    }
}

/// A Babel router-id (§3.2.2): 8 bytes, unique per router. Hypha builds it from 4 stable bytes of
/// the node key and 4 random bytes chosen at each start (see `controlplane::babel`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RouterId(pub [u8; 8]);

impl RouterId {
    /// The all-zero router-id, which §4.6.7 forbids on the wire.
    pub const ZERO: RouterId = RouterId([0; 8]);
    /// The all-ones router-id, also forbidden.
    pub const ONES: RouterId = RouterId([0xff; 8]);

    /// The bytes.
    pub fn octets(&self) -> [u8; 8] {
        self.0
    }
}

impl fmt::Display for RouterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
        )
    }
}

impl fmt::Debug for RouterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks_and_parses() {
        let p: Prefix = "2001:db8::1/32".parse().unwrap();
        assert_eq!(p.to_string(), "2001:db8::/32");
        let q: Prefix = "10.1.2.3/8".parse().unwrap();
        assert_eq!(q.to_string(), "10.0.0.0/8");
        assert!(q.contains("10.9.9.9".parse().unwrap()));
        assert!(!q.contains("11.0.0.1".parse().unwrap()));
        assert!(!q.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("::/129".parse::<Prefix>().is_err());
        let z: Prefix = "::/0".parse().unwrap();
        assert!(z.covers(&p));
        assert!(!p.covers(&z));
        assert_eq!(
            "1.2.3.4/32".parse::<Prefix>().unwrap().addr(),
            IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))
        );
        assert_eq!(
            RouterId([1, 2, 3, 4, 5, 6, 7, 8]).to_string(),
            "0102:0304:0506:0708"
        );
    }
}
