//! Rust mirrors of `maps.h`: the XDP program's map keys and values.
//!
//! `#[repr(C)]`, no implicit padding, sizes pinned by `const` asserts to the same numbers the C
//! header's `_Static_assert`s use; the tests also read those asserts out of `maps.h` and compare
//! them with `size_of`/`offset_of!` here, so neither side can drift alone. Ports are in host
//! byte order, addresses as on the wire (IPv4 in the first 4 bytes). With the `user` feature the
//! types are `aya::Pod`, for the loader's typed map handles.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `HYPHA_FAMILY_V4`.
pub const FAMILY_V4: u16 = 4;
/// `HYPHA_FAMILY_V6`.
pub const FAMILY_V6: u16 = 6;
/// `HYPHA_MAX_PEERS`: capacity of the allowed-peers map.
pub const MAX_PEERS: u32 = 4096;
/// `HYPHA_MAX_TRANSIT`: capacity of the transit map.
pub const MAX_TRANSIT: u32 = 65536;

fn addr_bytes(ip: IpAddr) -> ([u8; 16], u16) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // The kernel delivers v4-mapped traffic as IPv4: key it as IPv4.
            Some(v4) => addr_bytes(IpAddr::V4(v4)),
            None => (v6.octets(), FAMILY_V6),
        },
    }
}

fn bytes_addr(bytes: &[u8; 16], family: u16) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// `struct peer_key`: a neighbour's underlay address and port.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PeerKey {
    /// Address (IPv4 in `[0..4]`).
    pub addr: [u8; 16],
    /// UDP port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 20);

impl PeerKey {
    /// The key for `addr` (v4-mapped IPv6 is keyed as IPv4, as the kernel delivers it).
    pub fn new(addr: SocketAddr) -> Self {
        let (bytes, family) = addr_bytes(addr.ip());
        PeerKey {
            addr: bytes,
            port: addr.port(),
            family,
        }
    }

    /// The socket address, if the family is known.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(
            bytes_addr(&self.addr, self.family)?,
            self.port,
        ))
    }
}

/// `struct peer_value`.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PeerValue {
    /// Reserved, 0.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PeerValue>() == 4);

/// `struct transit_key`: the upper 64 bits of a destination overlay address, wire order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct TransitKey {
    /// The /64, big-endian.
    pub prefix: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<TransitKey>() == 8);

impl TransitKey {
    /// The key of the /64 whose upper 64 bits are `upper` (as a number).
    pub fn from_upper64(upper: u64) -> Self {
        TransitKey {
            prefix: upper.to_be_bytes(),
        }
    }
}

/// `struct transit_value`: where a transit /64 goes next.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct TransitValue {
    /// The next hop's underlay address.
    pub addr: [u8; 16],
    /// Our underlay source address towards it (same family).
    pub src: [u8; 16],
    /// The next hop's UDP port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
}
const _: () = assert!(core::mem::size_of::<TransitValue>() == 36);

impl TransitValue {
    /// Next hop `to`, sent from `src`; `None` if the families differ.
    pub fn new(to: SocketAddr, src: IpAddr) -> Option<Self> {
        let (addr, family) = addr_bytes(to.ip());
        let (src, src_family) = addr_bytes(src);
        (family == src_family).then_some(TransitValue {
            addr,
            src,
            port: to.port(),
            family,
        })
    }
}

/// `struct xdp_counters`: the value of the per-CPU counters map's single entry. Field names
/// are the counter names (`bpftool map dump` prints them; the dataplane's JSON uses them with an
/// `xdp_` prefix).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct XdpCounters {
    /// Not UDP to our port (or neither IPv4 nor IPv6): passed.
    pub pass_not_ours: u64,
    /// Truncated headers, IP options, fragments: passed.
    pub malformed: u64,
    /// To our port from a non-peer: dropped.
    pub drop_unknown_peer: u64,
    /// Link handshake frames from a non-peer: passed to the control plane.
    pub pass_handshake: u64,
    /// From a peer, not transit: passed.
    pub pass: u64,
    /// Transit with hop limit ≤ 1: passed (user space sends ICMPv6).
    pub pass_hop_limit: u64,
    /// Next hop's address family differs from the packet's: passed.
    pub pass_family: u64,
    /// Neighbour of the next hop not resolved: passed.
    pub pass_no_neigh: u64,
    /// Any other `bpf_fib_lookup` failure (no route, forwarding disabled, MTU): passed.
    pub pass_fib_other: u64,
    /// Transit forwarded with `bpf_redirect`.
    pub redirect: u64,
    /// Transit sent back out of the receiving interface (`XDP_TX`).
    pub tx: u64,
    /// A transit GSO/GRO super-packet (longer than the ingress MTU): passed on to the TC program.
    pub pass_gso: u64,
    /// TC program: a super-packet forwarded with `bpf_redirect`.
    pub gso_redirect: u64,
    /// TC program: a super-packet to our port left to user space (not transit, a segment with
    /// hop limit ≤ 1 or another destination, fib lookup failed).
    pub gso_pass: u64,
    /// TC program: a super-packet dropped because a rewrite helper failed.
    pub gso_drop: u64,
}
/// `HYPHA_XDP_COUNTERS`.
pub const COUNTERS: usize = 15;
const _: () = assert!(core::mem::size_of::<XdpCounters>() == COUNTERS * 8);

impl XdpCounters {
    /// Counter names, in field order.
    pub const NAMES: [&'static str; COUNTERS] = [
        "pass_not_ours",
        "malformed",
        "drop_unknown_peer",
        "pass_handshake",
        "pass",
        "pass_hop_limit",
        "pass_family",
        "pass_no_neigh",
        "pass_fib_other",
        "redirect",
        "tx",
        "pass_gso",
        "gso_redirect",
        "gso_pass",
        "gso_drop",
    ];

    /// The values, in field order.
    pub fn values(&self) -> [u64; COUNTERS] {
        [
            self.pass_not_ours,
            self.malformed,
            self.drop_unknown_peer,
            self.pass_handshake,
            self.pass,
            self.pass_hop_limit,
            self.pass_family,
            self.pass_no_neigh,
            self.pass_fib_other,
            self.redirect,
            self.tx,
            self.pass_gso,
            self.gso_redirect,
            self.gso_pass,
            self.gso_drop,
        ]
    }

    /// `(name, value)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        Self::NAMES.into_iter().zip(self.values())
    }

    /// Adds `other` field by field (summing the per-CPU values).
    pub fn accumulate(&mut self, other: &XdpCounters) {
        let a = self.as_mut_bytes();
        let b = other.as_bytes();
        for (x, y) in a.chunks_exact_mut(8).zip(b.chunks_exact(8)) {
            let mut xa = [0u8; 8];
            xa.copy_from_slice(x);
            let mut ya = [0u8; 8];
            ya.copy_from_slice(y);
            let sum = u64::from_ne_bytes(xa).wrapping_add(u64::from_ne_bytes(ya));
            x.copy_from_slice(&sum.to_ne_bytes());
        }
    }
}

// SAFETY: plain-old-data: #[repr(C)], integers and byte arrays only, no padding (the size
// asserts above and zerocopy's IntoBytes derive prove it), valid for any bit pattern.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerValue {}
    unsafe impl aya::Pod for TransitKey {}
    unsafe impl aya::Pod for TransitValue {}
    unsafe impl aya::Pod for XdpCounters {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::String;
    use std::vec::Vec;

    use super::*;
    use core::mem::{offset_of, size_of};

    /// Every `_Static_assert(sizeof(struct X) == N` / `offsetof(struct X, f) == N` in maps.h, as
    /// `("X", Some("f") or None, N)`.
    fn c_asserts() -> Vec<(String, Option<String>, usize)> {
        let header = include_str!("maps.h");
        let mut out = Vec::new();
        for line in header.lines() {
            let Some(rest) = line.trim().strip_prefix("_Static_assert(") else {
                continue;
            };
            let Some((expr, _)) = rest.rsplit_once(',') else {
                continue;
            };
            let expr: String = expr.chars().filter(|c| *c != ' ').collect();
            if let Some(r) = expr.strip_prefix("sizeof(struct") {
                let (name, n) = r.split_once(")==").unwrap();
                if let Ok(n) = n.parse() {
                    out.push((String::from(name), None, n));
                }
            } else if let Some(r) = expr.strip_prefix("offsetof(struct") {
                let (inner, n) = r.split_once(")==").unwrap();
                let (name, field) = inner.split_once(',').unwrap();
                out.push((
                    String::from(name),
                    Some(String::from(field)),
                    n.parse().unwrap(),
                ));
            }
        }
        out
    }

    fn rust_layout(strukt: &str, field: Option<&str>) -> usize {
        match (strukt, field) {
            ("peer_key", None) => size_of::<PeerKey>(),
            ("peer_key", Some("addr")) => offset_of!(PeerKey, addr),
            ("peer_key", Some("port")) => offset_of!(PeerKey, port),
            ("peer_key", Some("family")) => offset_of!(PeerKey, family),
            ("peer_value", None) => size_of::<PeerValue>(),
            ("transit_key", None) => size_of::<TransitKey>(),
            ("transit_value", None) => size_of::<TransitValue>(),
            ("transit_value", Some("addr")) => offset_of!(TransitValue, addr),
            ("transit_value", Some("src")) => offset_of!(TransitValue, src),
            ("transit_value", Some("port")) => offset_of!(TransitValue, port),
            ("transit_value", Some("family")) => offset_of!(TransitValue, family),
            ("xdp_counters", Some(f)) => {
                let i = XdpCounters::NAMES
                    .iter()
                    .position(|n| *n == f)
                    .unwrap_or_else(|| panic!("C counter {f} has no Rust name"));
                i * 8
            }
            other => panic!("maps.h asserts {other:?}, which maps.rs does not mirror"),
        }
    }

    #[test]
    fn layouts_match_the_c_header() {
        let asserts = c_asserts();
        // 4 structs with a literal size (xdp_counters' is in terms of HYPHA_XDP_COUNTERS) and
        // every field offset.
        assert_eq!(asserts.len(), 4 + 3 + 4 + COUNTERS, "{asserts:?}");
        for (s, f, n) in &asserts {
            assert_eq!(rust_layout(s, f.as_deref()), *n, "{s}.{f:?}");
        }
        // The counters' order in C is the order of NAMES, which is the field order in Rust.
        let fields = [
            offset_of!(XdpCounters, pass_not_ours),
            offset_of!(XdpCounters, malformed),
            offset_of!(XdpCounters, drop_unknown_peer),
            offset_of!(XdpCounters, pass_handshake),
            offset_of!(XdpCounters, pass),
            offset_of!(XdpCounters, pass_hop_limit),
            offset_of!(XdpCounters, pass_family),
            offset_of!(XdpCounters, pass_no_neigh),
            offset_of!(XdpCounters, pass_fib_other),
            offset_of!(XdpCounters, redirect),
            offset_of!(XdpCounters, tx),
            offset_of!(XdpCounters, pass_gso),
            offset_of!(XdpCounters, gso_redirect),
            offset_of!(XdpCounters, gso_pass),
            offset_of!(XdpCounters, gso_drop),
        ];
        for (i, off) in fields.iter().enumerate() {
            assert_eq!(*off, i * 8, "{}", XdpCounters::NAMES[i]);
        }
        let header = include_str!("maps.h");
        assert!(header.contains(&std::format!("#define HYPHA_XDP_COUNTERS {COUNTERS}")));
        assert!(header.contains(&std::format!("#define HYPHA_MAX_PEERS {MAX_PEERS}")));
        assert!(header.contains(&std::format!("#define HYPHA_MAX_TRANSIT {MAX_TRANSIT}")));
        assert!(header.contains(&std::format!("#define HYPHA_FAMILY_V4 {FAMILY_V4}")));
        assert!(header.contains(&std::format!("#define HYPHA_FAMILY_V6 {FAMILY_V6}")));
    }

    #[test]
    fn keys_from_socket_addresses() {
        let v4: SocketAddr = "10.1.2.3:9651".parse().unwrap();
        let k = PeerKey::new(v4);
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(&k.addr[..4], &[10, 1, 2, 3]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(k.port, 9651);
        assert_eq!(k.socket_addr(), Some(v4));
        // v4-mapped is keyed as IPv4.
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:9651".parse().unwrap();
        assert_eq!(PeerKey::new(mapped), k);
        let v6: SocketAddr = "[fd00::1]:7".parse().unwrap();
        let k6 = PeerKey::new(v6);
        assert_eq!(k6.family, FAMILY_V6);
        assert_eq!(k6.socket_addr(), Some(v6));

        assert_eq!(
            TransitKey::from_upper64(0x04aa_0001_0002_0003).prefix,
            [0x04, 0xaa, 0, 1, 0, 2, 0, 3]
        );
        let t = TransitValue::new(v4, "10.9.9.9".parse().unwrap()).unwrap();
        assert_eq!(&t.src[..4], &[10, 9, 9, 9]);
        assert_eq!((t.port, t.family), (9651, FAMILY_V4));
        assert!(TransitValue::new(v4, "fd00::2".parse().unwrap()).is_none());
    }

    #[test]
    fn counters_accumulate_by_field() {
        let mut a = XdpCounters {
            redirect: 5,
            ..XdpCounters::default()
        };
        let b = XdpCounters {
            redirect: 2,
            drop_unknown_peer: 7,
            ..XdpCounters::default()
        };
        a.accumulate(&b);
        assert_eq!(a.redirect, 7);
        assert_eq!(a.drop_unknown_peer, 7);
        let named: Vec<_> = a.iter().filter(|(_, v)| *v != 0).collect();
        assert_eq!(named, [("drop_unknown_peer", 7), ("redirect", 7)]);
    }
}
