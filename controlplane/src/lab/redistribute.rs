//! Which local addresses lab mode announces (babeld's `redistribute local ip PREFIX`): every
//! address on any interface — `lo` and `ifb` devices included — whose prefix lies inside one of the
//! configured filters. Link-local, loopback and multicast addresses never qualify, nor addresses
//! still undergoing duplicate address detection.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hypha_proto::babel::Prefix;

use super::netlink::InterfaceAddress;

/// The prefixes to originate for `addresses` under `filters`. An address is announced with its
/// own prefix length (`2001:db8:1::1/128` on `lo` as that /128, `10.1.2.3/24` as `10.1.2.0/24`).
pub fn redistributable(addresses: &[InterfaceAddress], filters: &[Prefix]) -> BTreeSet<Prefix> {
    addresses
        .iter()
        .filter(|a| !a.tentative && !excluded(a.addr))
        .filter_map(|a| Prefix::new(a.addr, a.prefix_len))
        .filter(|p| filters.iter().any(|f| f.covers(p)))
        .collect()
}

fn excluded(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V6(a) => a.is_unicast_link_local() || a.is_loopback() || a.is_multicast(),
        IpAddr::V4(a) => a.is_loopback() || a.is_link_local() || a.is_multicast(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(addr: &str, len: u8, tentative: bool) -> InterfaceAddress {
        InterfaceAddress {
            ifindex: 1,
            addr: addr.parse().unwrap(),
            prefix_len: len,
            tentative,
        }
    }

    #[test]
    fn filters_and_exclusions() {
        let addrs = [
            a("2001:db8:1::1", 128, false),
            a("2001:db8:2::1", 64, false),
            a("2001:db9::1", 64, false),
            a("2001:db8:3::1", 128, true),
            a("fe80::1", 64, false),
            a("::1", 128, false),
            a("127.0.0.1", 8, false),
            a("10.1.2.3", 24, false),
            a("169.254.1.1", 16, false),
        ];
        let filters: Vec<Prefix> = ["2001:db8::/32", "10.0.0.0/8", "::/0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let got: Vec<String> = redistributable(&addrs, &filters)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "10.1.2.0/24",
                "2001:db8:1::1/128",
                "2001:db8:2::/64",
                "2001:db9::/64"
            ]
        );
        let only_v4: Vec<Prefix> = vec!["10.1.0.0/16".parse().unwrap()];
        assert_eq!(redistributable(&addrs, &only_v4).len(), 1);
        assert!(redistributable(&addrs, &[]).is_empty());
    }
}
