//! What the workers share: the published tables, the counters and the way up to the control plane.
//!
//! Synchronisation (STYLE.md, dataplane): the FIB, the session table and the [`PeerTable`] are
//! immutable snapshots behind `arc-swap`, loaded once per batch by each worker and replaced by the
//! single writer (the control thread). Counters are per-worker atomics. The only lock is the
//! shm up-ring producer ([`UpLink`]), taken for a slot write per punted control packet or event —
//! never per data packet.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use hypha_proto::shm::{Producer, Record, TryPushError};
use hypha_proto::time::Clock;

use crate::counters::{Counter, CounterSet, WorkerCounters};
use crate::fib::{FibHandle, PeerId};
use crate::session::SessionTable;
use crate::udp::to_sockaddr;

/// A neighbour's underlay address, also in the form `sendmsg` wants.
#[derive(Clone, Copy)]
pub struct PeerAddr {
    /// The neighbour's FIB peer number.
    pub id: PeerId,
    /// The address.
    pub addr: SocketAddr,
    /// The same, as a (v4-mapped) `sockaddr_in6`.
    pub raw: libc::sockaddr_in6,
}

impl core::fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.addr.fmt(f)
    }
}

impl PartialEq for PeerAddr {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}

impl Eq for PeerAddr {}

impl PeerAddr {
    /// Peer `id` at `addr`.
    pub fn new(id: PeerId, addr: SocketAddr) -> Self {
        PeerAddr {
            id,
            addr,
            raw: to_sockaddr(&addr),
        }
    }
}

/// Per-neighbour traffic counters (relaxed atomics, shared by the workers; one add per send or
/// receive operation, not per packet of a GSO/GRO batch).
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Datagrams sent to the neighbour.
    pub tx_packets: AtomicU64,
    /// Bytes of them.
    pub tx_bytes: AtomicU64,
    /// Datagrams received from the neighbour's address.
    pub rx_packets: AtomicU64,
    /// Bytes of them.
    pub rx_bytes: AtomicU64,
}

impl PeerStats {
    /// Counts `packets` datagrams of `bytes` in total sent.
    #[inline]
    pub fn tx(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `packets` datagrams of `bytes` in total received.
    #[inline]
    pub fn rx(&self, packets: u64, bytes: u64) {
        self.rx_packets.fetch_add(packets, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Underlay addresses of the neighbours, indexed by the FIB's [`PeerId`], with their counters
/// (which survive address changes: the table is copied on write, the counters are shared).
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    addrs: Vec<Option<PeerAddr>>,
    stats: Vec<Arc<PeerStats>>,
    by_addr: HashMap<SocketAddr, PeerId>,
}

impl PeerTable {
    /// The address of `peer`, if it is up.
    #[inline]
    pub fn get(&self, peer: PeerId) -> Option<&PeerAddr> {
        self.addrs.get(peer as usize)?.as_ref()
    }

    /// Sets (or with `None` clears) the address of `peer`.
    pub fn set(&mut self, peer: PeerId, addr: Option<SocketAddr>) {
        let i = peer as usize;
        if self.addrs.len() <= i {
            self.addrs.resize(i + 1, None);
        }
        while self.stats.len() <= i {
            self.stats.push(Arc::default());
        }
        if let Some(slot) = self.addrs.get_mut(i) {
            if let Some(old) = slot.take() {
                self.by_addr.remove(&old.addr);
            }
            *slot = addr.map(|a| PeerAddr::new(peer, a));
        }
        if let Some(a) = addr {
            self.by_addr.insert(a, peer);
        }
    }

    /// The counters of `peer` (present for every peer ever set).
    #[inline]
    pub fn stats(&self, peer: PeerId) -> Option<&PeerStats> {
        self.stats.get(peer as usize).map(|s| &**s)
    }

    /// The peer whose underlay address is `addr`.
    #[inline]
    pub fn by_addr(&self, addr: &SocketAddr) -> Option<PeerId> {
        self.by_addr.get(addr).copied()
    }

    /// The peers that are up.
    pub fn iter(&self) -> impl Iterator<Item = (PeerId, &PeerAddr)> {
        self.addrs
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i as PeerId, a.as_ref()?)))
    }
}

/// The shm up-ring, shared by the workers and the control thread (see the module doc).
pub struct UpLink {
    producer: Mutex<Producer>,
}

impl core::fmt::Debug for UpLink {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UpLink").finish_non_exhaustive()
    }
}

impl UpLink {
    /// Wraps the up-ring producer.
    pub fn new(producer: Producer) -> Self {
        UpLink {
            producer: Mutex::new(producer),
        }
    }

    /// Pushes `record` without waiting; false if the ring is full or the record doesn't fit.
    pub fn try_push(&self, record: &Record<'_>) -> bool {
        let mut p = self.producer.lock().unwrap_or_else(PoisonError::into_inner);
        match p.try_push(record) {
            Ok(()) => true,
            Err(TryPushError::Full) | Err(_) => false,
        }
    }
}

/// Everything the workers and the control thread share.
#[derive(Debug)]
pub struct Shared {
    /// This node's overlay address (on the TUN; source of ICMPv6 errors).
    pub addr: Ipv6Addr,
    /// The upper 64 bits of it: the node's /64.
    pub prefix: u64,
    /// The published FIB.
    pub fib: FibHandle,
    /// The published sessions.
    pub sessions: Arc<SessionTable>,
    /// The published neighbour addresses.
    pub peers: ArcSwap<PeerTable>,
    /// Counters: one row per worker, then one for the control thread.
    pub counters: CounterSet,
    /// The clock every session timestamp comes from.
    pub clock: Clock,
    /// The way up to the control plane (absent with `--static-config`).
    pub up: Option<UpLink>,
    /// Set to stop every thread.
    pub stop: AtomicBool,
    /// What the stats readers see of the XDP fast path (none: not loaded); republished by the
    /// control thread when its attachments or maps change.
    pub xdp: arc_swap::ArcSwapOption<crate::xdp::XdpView>,
}

/// The upper 64 bits of an address.
#[inline]
pub fn upper64(addr: &Ipv6Addr) -> u64 {
    (u128::from(*addr) >> 64) as u64
}

/// The upper 64 bits of an address given as 16 bytes.
#[inline]
pub fn upper64_octets(addr: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(addr.get(..8)?.try_into().ok()?))
}

impl Shared {
    /// Punts `record` to the control plane; counts it, or counts the drop if it can't go up.
    pub fn punt(&self, counters: &WorkerCounters, record: &Record<'_>) {
        match &self.up {
            Some(up) if up.try_push(record) => counters.inc(Counter::punted),
            _ => counters.inc(Counter::dropped_punt),
        }
    }

    /// Whether every thread should stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}
