//! Overlay addresses and subnets.
//!
//! Every node's IPv6 address lies in `400::/7` and is derived from its public key exactly as Mycelium
//! derives it, so an existing Mycelium key keeps its address ([`OverlayAddr::from_public_key`]). The
//! node owns the /64 around that address; routing only accepts /64s inside `400::/7`, and only from the
//! key that owns them ([`crate::key::PublicKey::owns`]). The derivation and the text forms are written
//! down in `docs/protocol.md`, "Identity and addresses".

use core::fmt;
use core::net::Ipv6Addr;
use core::str::FromStr;

use crate::key::PublicKey;

/// Why an address or subnet was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    /// The text is not an IPv6 address.
    #[error("invalid IPv6 address {0:?}")]
    InvalidAddress(String),
    /// A valid IPv6 address outside the overlay range `400::/7`.
    #[error("{0} is not an overlay address (outside 400::/7)")]
    NotOverlay(Ipv6Addr),
    /// A subnet without `/prefix-length`.
    #[error("subnet {0:?} has no prefix length (expected e.g. 400::/7)")]
    MissingPrefixLength(String),
    /// A prefix length that is not a number from 0 to 128.
    #[error("invalid prefix length {0:?} (expected 0 to 128)")]
    InvalidPrefixLength(String),
}

/// A node's address in the overlay: an IPv6 address in `400::/7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OverlayAddr(Ipv6Addr);

impl OverlayAddr {
    /// The address Mycelium derives for `pk`: the first 16 bytes of blake3's extendable output of the
    /// public key, with the first byte replaced by `0x04 | (popcount(first byte) % 2)`.
    pub fn from_public_key(pk: &PublicKey) -> OverlayAddr {
        let mut octets = [0u8; 16];
        blake3::Hasher::new()
            .update(pk.as_bytes())
            .finalize_xof()
            .fill(&mut octets);
        let parity = (octets[0].count_ones() % 2) as u8;
        octets[0] = 0x04 | parity;
        OverlayAddr(Ipv6Addr::from(octets))
    }

    /// `addr` as an overlay address, if it lies in `400::/7`.
    pub fn new(addr: Ipv6Addr) -> Result<OverlayAddr, AddrError> {
        if Subnet::OVERLAY.contains(addr) {
            Ok(OverlayAddr(addr))
        } else {
            Err(AddrError::NotOverlay(addr))
        }
    }

    /// The IPv6 address.
    pub const fn ip(&self) -> Ipv6Addr {
        self.0
    }

    /// The 16 address bytes.
    pub const fn octets(&self) -> [u8; 16] {
        self.0.octets()
    }

    /// The /64 this address lies in: the subnet its node owns.
    pub fn subnet(&self) -> Subnet {
        Subnet::from_normalised(self.0, 64)
    }
}

impl TryFrom<Ipv6Addr> for OverlayAddr {
    type Error = AddrError;

    fn try_from(addr: Ipv6Addr) -> Result<Self, AddrError> {
        OverlayAddr::new(addr)
    }
}

impl From<OverlayAddr> for Ipv6Addr {
    fn from(addr: OverlayAddr) -> Ipv6Addr {
        addr.0
    }
}

impl fmt::Display for OverlayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for OverlayAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        let addr = s
            .parse::<Ipv6Addr>()
            .map_err(|_| AddrError::InvalidAddress(s.to_owned()))?;
        OverlayAddr::new(addr)
    }
}

impl serde::Serialize for OverlayAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for OverlayAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv6 prefix: an address with its host bits zero, and a prefix length from 0 to 128.
///
/// Ordered by address, then prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    addr: Ipv6Addr,
    prefix_len: u8,
}

impl Subnet {
    /// The overlay range, `400::/7`.
    pub const OVERLAY: Subnet = Subnet {
        addr: Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0),
        prefix_len: 7,
    };

    /// The prefix `addr/prefix_len`, with the host bits of `addr` cleared.
    pub fn new(addr: Ipv6Addr, prefix_len: u8) -> Result<Subnet, AddrError> {
        if prefix_len > 128 {
            return Err(AddrError::InvalidPrefixLength(prefix_len.to_string()));
        }
        Ok(Subnet::from_normalised(addr, prefix_len))
    }

    /// `new` for a prefix length known to be at most 128.
    fn from_normalised(addr: Ipv6Addr, prefix_len: u8) -> Subnet {
        Subnet {
            addr: Ipv6Addr::from(u128::from(addr) & mask(prefix_len)),
            prefix_len,
        }
    }

    /// The network address (host bits zero).
    pub const fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The netmask as a number: `prefix_len` leading one bits.
    pub fn netmask(&self) -> u128 {
        mask(self.prefix_len)
    }

    /// Whether `addr` lies in this subnet.
    pub fn contains(&self, addr: impl Into<Ipv6Addr>) -> bool {
        u128::from(addr.into()) & self.netmask() == u128::from(self.addr)
    }

    /// Whether every address of `other` lies in this subnet (a subnet contains itself).
    pub fn contains_subnet(&self, other: &Subnet) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.addr)
    }

    /// Whether the two subnets share an address. Prefixes nest, so they overlap exactly when one
    /// contains the other.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains_subnet(other) || other.contains_subnet(self)
    }

    /// Whether this is a /64 inside `400::/7`: the only kind of prefix the overlay routes.
    pub fn is_overlay_64(&self) -> bool {
        self.prefix_len == 64 && Subnet::OVERLAY.contains_subnet(self)
    }
}

/// `prefix_len` leading one bits (`prefix_len` ≤ 128).
fn mask(prefix_len: u8) -> u128 {
    match u32::from(prefix_len) {
        0 => 0,
        n => u128::MAX << (128u32.saturating_sub(n)),
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = AddrError;

    /// Parses `address/prefix-length`; host bits in the address are cleared.
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| AddrError::MissingPrefixLength(s.to_owned()))?;
        let addr = addr
            .parse::<Ipv6Addr>()
            .map_err(|_| AddrError::InvalidAddress(addr.to_owned()))?;
        // Only plain decimal digits: `u8::from_str` would also take a leading '+'.
        let prefix_len = match len.bytes().all(|b| b.is_ascii_digit()) {
            true => len.parse::<u8>().ok(),
            false => None,
        }
        .ok_or_else(|| AddrError::InvalidPrefixLength(len.to_owned()))?;
        Subnet::new(addr, prefix_len)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn known_key() -> PublicKey {
        "a47c1d6f2a15b2c670d3a88fbe0aeb301ced12f7bcb4c8e3aa877b20f8559c02"
            .parse()
            .unwrap()
    }

    #[test]
    fn mycelium_known_address() {
        let addr = OverlayAddr::from_public_key(&known_key());
        assert_eq!(addr.to_string(), "548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d");
        assert_eq!(addr.subnet().to_string(), "548:c783:d7ce:74a3::/64");
        assert!(addr.subnet().is_overlay_64());
        assert!(known_key().owns(&"548:c783:d7ce:74a3::/64".parse().unwrap()));
        assert!(!known_key().owns(&"548:c783:d7ce:74a4::/64".parse().unwrap()));
        assert!(!known_key().owns(&"548:c783:d7ce::/48".parse().unwrap()));
    }

    #[test]
    fn overlay_addr_bounds() {
        assert!("400::".parse::<OverlayAddr>().is_ok());
        assert!("5ff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            .parse::<OverlayAddr>()
            .is_ok());
        assert_eq!(
            "3ff:ffff::1".parse::<OverlayAddr>(),
            Err(AddrError::NotOverlay("3ff:ffff::1".parse().unwrap()))
        );
        assert_eq!(
            "600::".parse::<OverlayAddr>(),
            Err(AddrError::NotOverlay("600::".parse().unwrap()))
        );
        assert_eq!(
            "10.0.0.1".parse::<OverlayAddr>(),
            Err(AddrError::InvalidAddress("10.0.0.1".into()))
        );
    }

    #[test]
    fn subnet_parse_and_normalise() {
        let s: Subnet = "548:c783:d7ce:74a3:9ba1::1/64".parse().unwrap();
        assert_eq!(s.to_string(), "548:c783:d7ce:74a3::/64");
        assert_eq!(s.prefix_len(), 64);
        assert_eq!(Subnet::OVERLAY.to_string(), "400::/7");
        assert_eq!("500::/7".parse::<Subnet>(), Ok(Subnet::OVERLAY));
        assert_eq!("::/0".parse::<Subnet>().unwrap().netmask(), 0);
        assert_eq!("::1/128".parse::<Subnet>().unwrap().netmask(), u128::MAX);
        for bad in [
            "400::",
            "400::/129",
            "400::/+7",
            "400::/",
            "400::/-1",
            "x/7",
            "400::/7/7",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} parsed");
        }
        assert_eq!(
            Subnet::new(Ipv6Addr::UNSPECIFIED, 129),
            Err(AddrError::InvalidPrefixLength("129".into()))
        );
    }

    #[test]
    fn containment() {
        let o = Subnet::OVERLAY;
        let s: Subnet = "548:c783:d7ce:74a3::/64".parse().unwrap();
        let other: Subnet = "600::/64".parse().unwrap();
        assert!(o.contains_subnet(&s));
        assert!(!s.contains_subnet(&o));
        assert!(o.overlaps(&s) && s.overlaps(&o));
        assert!(!o.contains_subnet(&other) && !o.overlaps(&other));
        assert!(!other.is_overlay_64());
        assert!(!o.is_overlay_64());
        assert!(s.contains("548:c783:d7ce:74a3:ffff::".parse::<Ipv6Addr>().unwrap()));
        assert!(!s.contains("548:c783:d7ce:74a4::".parse::<Ipv6Addr>().unwrap()));
    }

    #[test]
    fn serde_as_strings() {
        let addr = OverlayAddr::from_public_key(&known_key());
        let json = serde_json::to_string(&(addr, addr.subnet())).unwrap();
        assert_eq!(
            json,
            r#"["548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d","548:c783:d7ce:74a3::/64"]"#
        );
        let back: (OverlayAddr, Subnet) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (addr, addr.subnet()));
        assert!(serde_json::from_str::<OverlayAddr>(r#""::1""#).is_err());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn any_subnet() -> impl Strategy<Value = Subnet> {
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| Subnet::new(Ipv6Addr::from(a), l).unwrap())
    }

    /// Subnets drawn from a small space so that containment and overlap actually happen.
    fn near_subnet() -> impl Strategy<Value = Subnet> {
        (any::<u8>(), 0u8..=8)
            .prop_map(|(a, l)| Subnet::new(Ipv6Addr::from(u128::from(a) << 120), l).unwrap())
    }

    proptest! {
        #[test]
        fn address_in_overlay_and_own_64(bytes in any::<[u8; 32]>()) {
            let pk = PublicKey::from_bytes(bytes);
            let addr = OverlayAddr::from_public_key(&pk);
            prop_assert!(Subnet::OVERLAY.contains(addr));
            prop_assert!(addr.subnet().contains(addr));
            prop_assert!(addr.subnet().is_overlay_64());
            prop_assert!(pk.owns(&addr.subnet()));
            // Cross-check against blake3's plain hash: the first 32 bytes of the XOF.
            let hash = blake3::hash(&bytes);
            let h = hash.as_bytes();
            prop_assert_eq!(addr.octets()[0], 0x04 | (h[0].count_ones() % 2) as u8);
            prop_assert_eq!(&addr.octets()[1..], &h[1..16]);
        }

        #[test]
        fn addr_text_roundtrip(a in any::<u128>()) {
            let ip = Ipv6Addr::from(a);
            match OverlayAddr::new(ip) {
                Ok(addr) => {
                    prop_assert_eq!(addr.to_string().parse::<OverlayAddr>(), Ok(addr));
                    prop_assert_eq!(a >> 121, 0x400 >> 9);
                }
                Err(e) => {
                    prop_assert_eq!(e, AddrError::NotOverlay(ip));
                    prop_assert_ne!(a >> 121, 0x400 >> 9);
                }
            }
        }

        #[test]
        fn subnet_text_roundtrip(s in any_subnet()) {
            prop_assert_eq!(s.to_string().parse::<Subnet>(), Ok(s));
            // Normalised: re-normalising changes nothing, and the network address is inside.
            prop_assert_eq!(Subnet::new(s.addr(), s.prefix_len()), Ok(s));
            prop_assert!(s.contains(s.addr()));
        }

        #[test]
        fn normalisation_keeps_members(a in any::<u128>(), l in 0u8..=128, x in any::<u128>()) {
            let s = Subnet::new(Ipv6Addr::from(a), l).unwrap();
            prop_assert!(s.contains(Ipv6Addr::from(a)));
            // x is inside exactly when it agrees with a on the first l bits.
            let agree = l == 0 || (a ^ x) >> (128 - u32::from(l)) == 0;
            prop_assert_eq!(s.contains(Ipv6Addr::from(x)), agree);
        }

        #[test]
        fn containment_laws(a in near_subnet(), b in near_subnet(), c in near_subnet()) {
            // Reflexive, antisymmetric, transitive.
            prop_assert!(a.contains_subnet(&a));
            if a.contains_subnet(&b) && b.contains_subnet(&a) {
                prop_assert_eq!(a, b);
            }
            if a.contains_subnet(&b) && b.contains_subnet(&c) {
                prop_assert!(a.contains_subnet(&c));
            }
            // Overlap is symmetric, implied by containment, and means a shared address.
            prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
            if a.contains_subnet(&b) {
                prop_assert!(a.overlaps(&b));
                prop_assert!(a.contains(b.addr()));
            }
            let longer = if a.prefix_len() >= b.prefix_len() { a } else { b };
            prop_assert_eq!(a.overlaps(&b), a.contains(longer.addr()) && b.contains(longer.addr()));
        }
    }
}
