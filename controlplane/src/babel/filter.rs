//! Route filters: which announced prefixes a router accepts.
//!
//! In overlay mode every node owns exactly the /64 derived from its public key, so an Update is
//! only believed if it is for a /64 inside `400::/7` and carries (in our origin-key sub-TLV) a key
//! that derives to that /64. A neighbour that announces anything else is misbehaving: the Update is
//! dropped and counted. Lab mode accepts any prefix, as babeld does without filters.

use std::net::{IpAddr, Ipv6Addr};

use hypha_proto::babel::Prefix;

use super::PeerMisbehaved;

/// Which prefixes a [`Router`](super::Router) accepts in Updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RouteFilter {
    /// Overlay mode: only /64s in `400::/7`, each only from the key that owns it.
    #[default]
    Overlay,
    /// Lab mode: everything (IPv4 and IPv6).
    Any,
}

impl RouteFilter {
    /// Checks an Update for `prefix` with `origin_key`. Retractions need no key: they can only take
    /// away routes through the neighbour that sends them.
    pub fn check(
        &self,
        prefix: &Prefix,
        origin_key: Option<&[u8; 32]>,
        retraction: bool,
    ) -> Result<(), PeerMisbehaved> {
        match self {
            RouteFilter::Any => Ok(()),
            RouteFilter::Overlay => {
                let overlay = Prefix::new(IpAddr::V6(Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0)), 7);
                let inside = prefix.len() == 64 && overlay.is_some_and(|o| o.covers(prefix));
                if !inside {
                    return Err(PeerMisbehaved::ForbiddenPrefix { prefix: *prefix });
                }
                if retraction {
                    return Ok(());
                }
                let key = origin_key.ok_or(PeerMisbehaved::MissingOriginKey { prefix: *prefix })?;
                if overlay_subnet(key) != *prefix {
                    return Err(PeerMisbehaved::KeyDoesNotOwnPrefix { prefix: *prefix });
                }
                Ok(())
            }
        }
    }
}

/// The overlay address of a public key, as Mycelium derives it (issue 2): blake3's extendable
/// output of the key fills 16 bytes, then the first byte becomes `0x04 | (popcount(first) mod 2)`.
///
/// A local copy until `hypha_proto::addr` (branch `ident`) provides `PublicKey::owns`.
pub fn overlay_address(key: &[u8; 32]) -> Ipv6Addr {
    let mut out = [0u8; 16];
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.finalize_xof().fill(&mut out);
    let p = u8::from(out[0].count_ones() % 2 == 1);
    out[0] = 0x04 | p;
    Ipv6Addr::from(out)
}

/// The /64 a public key owns: the one around its [`overlay_address`].
pub fn overlay_subnet(key: &[u8; 32]) -> Prefix {
    let a = overlay_address(key);
    let mut o = a.octets();
    o[8..].fill(0);
    // A /64 of a valid IPv6 address always exists.
    Prefix::new(IpAddr::V6(Ipv6Addr::from(o)), 64).unwrap_or_else(|| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hex: &str) -> [u8; 32] {
        let mut k = [0u8; 32];
        hex::decode_to_slice(hex, &mut k).unwrap();
        k
    }

    #[test]
    fn mycelium_compatible_address() {
        // The known answer from issue 2.
        let k = key("a47c1d6f2a15b2c670d3a88fbe0aeb301ced12f7bcb4c8e3aa877b20f8559c02");
        assert_eq!(
            overlay_address(&k),
            "548:c783:d7ce:74a3:9ba1:a0cb:ae21:338d"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(overlay_subnet(&k).to_string(), "548:c783:d7ce:74a3::/64");
    }

    #[test]
    fn overlay_filter() {
        let k = key("a47c1d6f2a15b2c670d3a88fbe0aeb301ced12f7bcb4c8e3aa877b20f8559c02");
        let mine = overlay_subnet(&k);
        let other: Prefix = "548:c783:d7ce:74a4::/64".parse().unwrap();
        let f = RouteFilter::Overlay;
        assert_eq!(f.check(&mine, Some(&k), false), Ok(()));
        assert_eq!(
            f.check(&other, Some(&k), false),
            Err(PeerMisbehaved::KeyDoesNotOwnPrefix { prefix: other })
        );
        assert_eq!(
            f.check(&mine, None, false),
            Err(PeerMisbehaved::MissingOriginKey { prefix: mine })
        );
        assert_eq!(f.check(&other, None, true), Ok(()));
        let outside: Prefix = "2001:db8::/64".parse().unwrap();
        assert_eq!(
            f.check(&outside, Some(&k), false),
            Err(PeerMisbehaved::ForbiddenPrefix { prefix: outside })
        );
        let short: Prefix = "400::/48".parse().unwrap();
        assert!(f.check(&short, None, true).is_err());
        let v4: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(f.check(&v4, None, false).is_err());
        assert_eq!(RouteFilter::Any.check(&v4, None, false), Ok(()));
    }
}
