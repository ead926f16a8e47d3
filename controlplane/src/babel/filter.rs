//! Route filters: which announced prefixes a router accepts.
//!
//! In overlay mode every node owns exactly the /64 derived from its public key, so an Update is
//! only believed if it is for a /64 inside `400::/7` and carries (in our origin-key sub-TLV) a key
//! that derives to that /64. A neighbour that announces anything else is misbehaving: the Update is
//! dropped and counted. Lab mode accepts any prefix, as babeld does without filters.

use std::net::{IpAddr, Ipv6Addr};

use hypha_proto::addr::Subnet;
use hypha_proto::babel::Prefix;
use hypha_proto::key::PublicKey;

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
                let subnet = to_subnet(prefix)
                    .filter(Subnet::is_overlay_64)
                    .ok_or(PeerMisbehaved::ForbiddenPrefix { prefix: *prefix })?;
                if retraction {
                    return Ok(());
                }
                let key = origin_key.ok_or(PeerMisbehaved::MissingOriginKey { prefix: *prefix })?;
                if !PublicKey::from_bytes(*key).owns(&subnet) {
                    return Err(PeerMisbehaved::KeyDoesNotOwnPrefix { prefix: *prefix });
                }
                Ok(())
            }
        }
    }
}

/// An IPv6 Babel prefix as an identity [`Subnet`]; `None` for IPv4.
fn to_subnet(prefix: &Prefix) -> Option<Subnet> {
    match prefix.addr() {
        IpAddr::V6(a) => Subnet::new(a, prefix.len()).ok(),
        IpAddr::V4(_) => None,
    }
}

/// The overlay address of a public key (`hypha_proto::addr::OverlayAddr::from_public_key`, the
/// Mycelium derivation), as a plain address.
pub fn overlay_address(key: &[u8; 32]) -> Ipv6Addr {
    PublicKey::from_bytes(*key).address().ip()
}

/// The /64 a public key owns, as a Babel [`Prefix`].
pub fn overlay_subnet(key: &[u8; 32]) -> Prefix {
    let s = PublicKey::from_bytes(*key).subnet();
    // A /64 of an IPv6 address is always a valid prefix.
    Prefix::new(IpAddr::V6(s.addr()), s.prefix_len()).unwrap_or_else(|| unreachable!())
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
