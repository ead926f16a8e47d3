//! Where selected routes go: the [`FibSink`] the runtime feeds with the Babel core's install and
//! uninstall events.
//!
//! Why a trait: today (`--no-dataplane`) the only consumer is the status API, through
//! [`FibTable`]; the dataplane issue adds a second sink that pushes the same changes over shared
//! memory, and lab mode one that programs the kernel through netlink (DESIGN.md: the two modes differ
//! only in their adapters). The runtime does not care which.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hypha_proto::babel::Prefix;

/// The next hop of an installed route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    /// The neighbour's underlay endpoint (what the dataplane sends to).
    pub endpoint: SocketAddr,
    /// The neighbour's address as Babel knows it (its overlay address on overlay links).
    pub neighbour: IpAddr,
}

/// One installed route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FibEntry {
    /// Where packets for the prefix go.
    pub next_hop: NextHop,
    /// The route's metric (RFC 8966 §3.5.2).
    pub metric: u16,
    /// The route's sequence number.
    pub seqno: u16,
}

/// A consumer of route selections.
pub trait FibSink {
    /// `prefix` is now reached through `entry` (replaces any previous entry).
    fn install(&mut self, prefix: Prefix, entry: FibEntry);
    /// `prefix` has no selected route any more.
    fn uninstall(&mut self, prefix: Prefix);
}

/// The FIB as a table, for the status API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FibTable {
    entries: BTreeMap<Prefix, FibEntry>,
}

impl FibTable {
    /// An empty table.
    pub fn new() -> Self {
        FibTable::default()
    }

    /// The installed routes in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (&Prefix, &FibEntry)> + '_ {
        self.entries.iter()
    }

    /// The entry for exactly `prefix`.
    pub fn get(&self, prefix: &Prefix) -> Option<&FibEntry> {
        self.entries.get(prefix)
    }

    /// Number of installed routes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no route is installed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest installed prefix containing `ip` (what a dataplane lookup would pick).
    pub fn lookup(&self, ip: IpAddr) -> Option<(&Prefix, &FibEntry)> {
        self.entries
            .iter()
            .filter(|(p, _)| p.contains(ip))
            .max_by_key(|(p, _)| p.len())
    }
}

impl FibSink for FibTable {
    fn install(&mut self, prefix: Prefix, entry: FibEntry) {
        self.entries.insert(prefix, entry);
    }

    fn uninstall(&mut self, prefix: Prefix) {
        self.entries.remove(&prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, len: u8) -> Prefix {
        Prefix::new(s.parse().unwrap(), len).unwrap()
    }

    fn entry(port: u16, metric: u16) -> FibEntry {
        FibEntry {
            next_hop: NextHop {
                endpoint: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
                neighbour: "400::1".parse().unwrap(),
            },
            metric,
            seqno: 1,
        }
    }

    #[test]
    fn install_replace_uninstall_lookup() {
        let mut t = FibTable::new();
        let sink: &mut dyn FibSink = &mut t;
        sink.install(p("400:1::", 64), entry(1, 96));
        sink.install(p("400:1::", 64), entry(2, 200));
        sink.install(p("400::", 7), entry(3, 50));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(&p("400:1::", 64)), Some(&entry(2, 200)));
        let (hit, e) = t.lookup("400:1::99".parse().unwrap()).unwrap();
        assert_eq!((hit.len(), e.metric), (64, 200));
        let (hit, _) = t.lookup("401::1".parse().unwrap()).unwrap();
        assert_eq!(hit.len(), 7);
        assert!(t.lookup("2001:db8::1".parse().unwrap()).is_none());
        t.uninstall(p("400:1::", 64));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup("400:1::99".parse().unwrap()).unwrap().0.len(), 7);
        t.uninstall(p("400::", 7));
        assert!(t.is_empty());
    }
}
