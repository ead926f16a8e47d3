//! The forwarding information base: IPv6 longest-prefix match, read by every worker, written by one
//! updater.
//!
//! **Shape.** A [`Fib`] is an immutable snapshot with one hash table per prefix length that has at
//! least one route. The overlay's routes are all /64s (DESIGN.md, "Routing"), so /64 has its own
//! table keyed on the upper 64 bits of the address; the other lengths are probed from longest to
//! shortest, and only lengths that exist are probed. With only /64 routes (plus maybe a /0 default) a
//! lookup is one hash probe, or two on a miss. Lookups allocate nothing.
//!
//! **Hashing.** Keys are masked addresses. Routes arrive from the network (Babel), and overlay
//! addresses are a hash of a public key, so an attacker can grind keys whose /64s collide under a
//! fixed hash function and turn a table probe into a list walk. Every table is therefore keyed with a
//! random 64-bit seed chosen when the [`FibUpdater`] is created (a folded 64×64→128 multiply, as in
//! foldhash/ahash's fallback). Lookups never insert, so lookup keys can't degrade the table.
//!
//! **Publication** (DESIGN.md Principle 3: readers never wait for writers). [`FibHandle`] wraps an
//! `arc_swap::ArcSwap<Fib>`: workers call [`FibHandle::load`] once per batch and look up through the
//! guard; the updater builds the next snapshot off the hot path and swaps one pointer.
//!
//! **Updates: copy-on-write patching, with snapshot reuse.** [`FibUpdater::apply`] takes a batch of
//! adds and removes (as the control plane sends them over shm). It
//! 1. takes back the snapshot it published *two* batches ago if no reader still holds it
//!    (`Arc::get_mut` succeeds once every guard is gone; workers drop theirs at the end of a batch),
//!    replays the previous batch onto it and then applies the new batch: O(batch) work, no copy.
//!    It does so only when the previous batch is small next to the table (≤ 1/16 of the routes):
//!    replaying costs ~100 ns per update, copying 5–25 ns per route;
//! 2. otherwise clones the current snapshot (a hash-table clone copies control bytes and buckets
//!    slot for slot, without re-hashing) and patches it: O(routes) copy + O(batch) hashing.
//!
//! Rebuilding from the route set instead would re-hash every route on every batch (O(routes) hash
//! inserts plus allocation), which is several times the memcpy of a clone; see
//! bench/benches/fib.rs for measured update rates. Memory: at most two snapshots of the table,
//! plus any snapshot a slow reader still holds.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv6Addr;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

/// A neighbour of this node as the dataplane numbers it: a dense slot index into the workers'
/// peer table (underlay address, socket), assigned when the control plane announces the peer over
/// shm. The shm ABI's own, opaque peer id is mapped to it there, which keeps FIB entries at 16 bytes.
pub type PeerId = u32;

/// Where a packet goes: the neighbour to send it to, and the route's metric (informational: the
/// control plane has already selected the route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop {
    /// The neighbour that forwards the packet.
    pub peer: PeerId,
    /// The selected route's metric (RFC 8966 §3.5.2 units; u32 as in the shm route record).
    pub metric: u32,
}

/// An IPv6 prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: u128,
    len: u8,
}

/// A prefix length above 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv6 prefix length {0}")]
pub struct InvalidPrefixLen(pub u8);

/// The mask that keeps the upper `len` bits of an address (`len` ≤ 128).
const fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    }
}

/// The mask that keeps the upper `len` bits of a 64-bit key (`len` ≤ 64).
const fn mask64(len: u8) -> u64 {
    if len == 0 {
        0
    } else {
        u64::MAX << (64 - len as u32)
    }
}

impl Prefix {
    /// The prefix `addr/len`; bits of `addr` beyond `len` are cleared.
    pub fn new(addr: Ipv6Addr, len: u8) -> Result<Self, InvalidPrefixLen> {
        Self::from_bits(u128::from(addr), len)
    }

    /// Like [`Prefix::new`], with the address as a big-endian `u128`.
    pub fn from_bits(addr: u128, len: u8) -> Result<Self, InvalidPrefixLen> {
        if len > 128 {
            return Err(InvalidPrefixLen(len));
        }
        Ok(Prefix {
            addr: addr & mask128(len),
            len,
        })
    }

    /// The /64 whose upper 64 bits are `upper` (the overlay's route shape).
    pub const fn slash64(upper: u64) -> Self {
        Prefix {
            addr: (upper as u128) << 64,
            len: 64,
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr)
    }

    /// The network address as a big-endian `u128`.
    pub const fn bits(&self) -> u128 {
        self.addr
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` lies inside this prefix.
    pub const fn contains(&self, addr: u128) -> bool {
        addr & mask128(self.len) == self.addr
    }

    /// The upper 64 bits (the whole prefix when `len` ≤ 64).
    const fn upper(&self) -> u64 {
        (self.addr >> 64) as u64
    }
}

/// One change to the route set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteUpdate {
    /// Install or replace the route to a prefix.
    Add(Prefix, NextHop),
    /// Remove the route to a prefix (a no-op if there is none).
    Remove(Prefix),
}

/// The seeded hasher of the FIB tables (see the module doc, "Hashing").
#[derive(Debug, Clone, Copy)]
pub struct FibHasherBuilder {
    seed: u64,
}

impl FibHasherBuilder {
    /// A builder with a seed from the system's secure random source.
    pub fn random() -> Self {
        let mut seed = [0u8; 8];
        // ring's SystemRandom reads getrandom(2). If that ever fails, std's RandomState (also
        // randomly keyed per process) still keeps hash flooding from being free.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).is_err() {
            seed = std::collections::hash_map::RandomState::new()
                .hash_one(0u64)
                .to_le_bytes();
        }
        FibHasherBuilder {
            seed: u64::from_le_bytes(seed),
        }
    }

    /// A builder with a fixed seed (tests, reproducible benchmarks).
    pub const fn with_seed(seed: u64) -> Self {
        FibHasherBuilder { seed }
    }
}

impl BuildHasher for FibHasherBuilder {
    type Hasher = FibHasher;
    fn build_hasher(&self) -> FibHasher {
        FibHasher { state: self.seed }
    }
}

/// The hasher built by [`FibHasherBuilder`]: a folded multiply per 64-bit word.
#[derive(Debug, Clone, Copy)]
pub struct FibHasher {
    state: u64,
}

const MUL: u64 = 0x5851_f42d_4c95_7f2d;
const MUL2: u64 = 0x2d35_8dcc_aa6c_78a5;

#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

impl Hasher for FibHasher {
    #[inline]
    fn finish(&self) -> u64 {
        folded_multiply(self.state, MUL2)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.state = folded_multiply(self.state ^ i, MUL);
    }

    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.write_u64(i as u64);
        self.write_u64((i >> 64) as u64);
    }
}

type Table<K> = HashMap<K, NextHop, FibHasherBuilder>;

/// An immutable, compiled FIB snapshot.
#[derive(Debug, Clone)]
pub struct Fib {
    /// Tables for lengths 65..=128, longest first; keys are masked addresses.
    longer: Vec<(u8, Table<u128>)>,
    /// The /64 table, keyed on the upper 64 bits.
    slash64: Table<u64>,
    /// Tables for lengths 0..=63, longest first; keys are the masked upper 64 bits.
    shorter: Vec<(u8, Table<u64>)>,
    hasher: FibHasherBuilder,
}

impl Fib {
    /// An empty FIB whose tables hash with `hasher`.
    pub fn empty(hasher: FibHasherBuilder) -> Self {
        Fib {
            longer: Vec::new(),
            slash64: HashMap::with_hasher(hasher),
            shorter: Vec::new(),
            hasher,
        }
    }

    /// A FIB holding `routes` (later entries for the same prefix win).
    pub fn from_routes(
        hasher: FibHasherBuilder,
        routes: impl IntoIterator<Item = (Prefix, NextHop)>,
    ) -> Self {
        let mut fib = Fib::empty(hasher);
        for (p, nh) in routes {
            fib.insert(p, nh);
        }
        fib
    }

    /// The longest-prefix match for `dst` (a big-endian `u128` address).
    #[inline]
    pub fn lookup_bits(&self, dst: u128) -> Option<NextHop> {
        for (len, table) in &self.longer {
            if let Some(nh) = table.get(&(dst & mask128(*len))) {
                return Some(*nh);
            }
        }
        let upper = (dst >> 64) as u64;
        if !self.slash64.is_empty() {
            if let Some(nh) = self.slash64.get(&upper) {
                return Some(*nh);
            }
        }
        for (len, table) in &self.shorter {
            if let Some(nh) = table.get(&(upper & mask64(*len))) {
                return Some(*nh);
            }
        }
        None
    }

    /// The longest-prefix match for `dst`.
    #[inline]
    pub fn lookup(&self, dst: &Ipv6Addr) -> Option<NextHop> {
        self.lookup_bits(u128::from(*dst))
    }

    /// The longest-prefix match for a destination address as 16 wire bytes.
    #[inline]
    pub fn lookup_octets(&self, dst: &[u8; 16]) -> Option<NextHop> {
        self.lookup_bits(u128::from_be_bytes(*dst))
    }

    /// The exact route to `prefix`, if installed.
    pub fn get(&self, prefix: &Prefix) -> Option<NextHop> {
        match prefix.len {
            64 => self.slash64.get(&prefix.upper()).copied(),
            l if l > 64 => self
                .longer
                .iter()
                .find(|(len, _)| *len == l)
                .and_then(|(_, t)| t.get(&prefix.addr).copied()),
            l => self
                .shorter
                .iter()
                .find(|(len, _)| *len == l)
                .and_then(|(_, t)| t.get(&prefix.upper()).copied()),
        }
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.slash64.len()
            + self.longer.iter().map(|(_, t)| t.len()).sum::<usize>()
            + self.shorter.iter().map(|(_, t)| t.len()).sum::<usize>()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every route, in no particular order (control-plane dumps and tests, not the hot path).
    pub fn routes(&self) -> impl Iterator<Item = (Prefix, NextHop)> + '_ {
        let longer = self.longer.iter().flat_map(|(len, t)| {
            t.iter().map(move |(k, nh)| {
                (
                    Prefix {
                        addr: *k,
                        len: *len,
                    },
                    *nh,
                )
            })
        });
        let s64 = self
            .slash64
            .iter()
            .map(|(k, nh)| (Prefix::slash64(*k), *nh));
        let shorter = self.shorter.iter().flat_map(|(len, t)| {
            t.iter().map(move |(k, nh)| {
                (
                    Prefix {
                        addr: u128::from(*k) << 64,
                        len: *len,
                    },
                    *nh,
                )
            })
        });
        longer.chain(s64).chain(shorter)
    }

    /// Apply one update in place (the updater's patch step).
    pub fn apply(&mut self, update: &RouteUpdate) {
        match *update {
            RouteUpdate::Add(p, nh) => self.insert(p, nh),
            RouteUpdate::Remove(p) => self.remove(&p),
        }
    }

    fn insert(&mut self, p: Prefix, nh: NextHop) {
        let hasher = self.hasher;
        match p.len {
            64 => {
                self.slash64.insert(p.upper(), nh);
            }
            l if l > 64 => {
                table_for(&mut self.longer, l, hasher).insert(p.addr, nh);
            }
            l => {
                table_for(&mut self.shorter, l, hasher).insert(p.upper(), nh);
            }
        }
    }

    fn remove(&mut self, p: &Prefix) {
        match p.len {
            64 => {
                self.slash64.remove(&p.upper());
            }
            l if l > 64 => remove_from(&mut self.longer, l, &p.addr),
            l => remove_from(&mut self.shorter, l, &p.upper()),
        }
    }
}

/// The table for `len` in a longest-first list, created (in order) if missing.
fn table_for<K: std::hash::Hash + Eq>(
    tables: &mut Vec<(u8, Table<K>)>,
    len: u8,
    hasher: FibHasherBuilder,
) -> &mut Table<K> {
    // Longest first: the first entry whose length is ≤ len is either it or the insertion point.
    let pos = tables
        .iter()
        .position(|(l, _)| *l <= len)
        .unwrap_or(tables.len());
    let exists = matches!(tables.get(pos), Some((l, _)) if *l == len);
    if !exists {
        tables.insert(pos, (len, HashMap::with_hasher(hasher)));
    }
    // `pos` is in bounds: it either held `len` already or we just inserted there.
    &mut tables[pos].1
}

/// Remove `key` from the table for `len`, dropping the table when it becomes empty so lookups stop
/// probing that length.
fn remove_from<K: std::hash::Hash + Eq>(tables: &mut Vec<(u8, Table<K>)>, len: u8, key: &K) {
    if let Some(pos) = tables.iter().position(|(l, _)| *l == len) {
        let now_empty = match tables.get_mut(pos) {
            Some((_, t)) => {
                t.remove(key);
                t.is_empty()
            }
            None => false,
        };
        if now_empty {
            tables.remove(pos);
        }
    }
}

/// The readers' side of the published FIB: cheap to clone, one per worker.
///
/// Synchronisation: an `ArcSwap` pointer. [`FibHandle::load`] is lock-free for readers (arc-swap's
/// debt slots); the only writer is the [`FibUpdater`]. Hold the guard for one batch, not longer: a
/// held guard keeps an old snapshot alive and forces the updater onto its copying path.
#[derive(Debug, Clone)]
pub struct FibHandle {
    current: Arc<ArcSwap<Fib>>,
}

impl FibHandle {
    /// The current snapshot; look up through the returned guard for the whole batch.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Fib>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc` (slower than [`FibHandle::load`]; for control paths).
    pub fn load_full(&self) -> Arc<Fib> {
        self.current.load_full()
    }
}

/// The updater replays the previous batch onto its spare snapshot only if that batch has at most
/// 1/`REPLAY_RATIO` as many updates as the FIB has routes; otherwise it copies.
const REPLAY_RATIO: usize = 16;

/// The writer's side: applies route batches and publishes snapshots. There is exactly one (it is not
/// `Clone`), owned by the thread that consumes the control plane's route ring.
#[derive(Debug)]
pub struct FibUpdater {
    handle: FibHandle,
    /// The snapshot published before the current one: replaying `prev_batch` (the batch that
    /// turned it into the current one) brings it up to date without a copy.
    spare: Option<Arc<Fib>>,
    /// The last applied batch (its buffer is reused from batch to batch).
    prev_batch: Vec<RouteUpdate>,
    stats: UpdateStats,
}

/// How the updater has produced snapshots so far (for counters and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Batches applied by patching the reclaimed spare snapshot (no copy).
    pub reused: u64,
    /// Batches applied by cloning the current snapshot.
    pub copied: u64,
}

impl FibUpdater {
    /// An updater publishing an empty FIB with a random hash seed, and the readers' handle.
    pub fn new() -> (FibUpdater, FibHandle) {
        Self::with_fib(Fib::empty(FibHasherBuilder::random()))
    }

    /// An updater that starts by publishing `fib`.
    pub fn with_fib(fib: Fib) -> (FibUpdater, FibHandle) {
        let handle = FibHandle {
            current: Arc::new(ArcSwap::from_pointee(fib)),
        };
        let updater = FibUpdater {
            handle: handle.clone(),
            spare: None,
            prev_batch: Vec::new(),
            stats: UpdateStats::default(),
        };
        (updater, handle)
    }

    /// Another readers' handle.
    pub fn handle(&self) -> FibHandle {
        self.handle.clone()
    }

    /// Counts of reused and copied snapshots.
    pub fn stats(&self) -> UpdateStats {
        self.stats
    }

    /// Apply a batch of updates (in order) and publish the result.
    pub fn apply(&mut self, batch: &[RouteUpdate]) {
        // Replaying costs ~100 ns per update, copying ~5 ns (100k routes) to ~25 ns (1M, page
        // faults included) per route (bench/RESULTS.md, "FIB updates"): replay only small batches.
        let replay_cheaper =
            self.prev_batch.len().saturating_mul(REPLAY_RATIO) <= self.handle.current.load().len();
        let spare = self.spare.take().filter(|_| replay_cheaper);
        let mut next = match spare {
            Some(mut old) => match Arc::get_mut(&mut old) {
                Some(fib) => {
                    for u in &self.prev_batch {
                        fib.apply(u);
                    }
                    self.stats.reused += 1;
                    old
                }
                None => self.copy_current(),
            },
            None => self.copy_current(),
        };
        // `next` is unshared (reclaimed above or freshly cloned), so this never copies again.
        let fib = Arc::make_mut(&mut next);
        for u in batch {
            fib.apply(u);
        }
        let prev = self.handle.current.swap(next);
        self.spare = Some(prev);
        self.prev_batch.clear();
        self.prev_batch.extend_from_slice(batch);
    }

    /// Replace the whole route set (a resync after a control-plane restart: full replay).
    pub fn replace(&mut self, routes: impl IntoIterator<Item = (Prefix, NextHop)>) {
        let hasher = self.handle.current.load().hasher;
        self.handle
            .current
            .store(Arc::new(Fib::from_routes(hasher, routes)));
        self.spare = None;
    }

    fn copy_current(&mut self) -> Arc<Fib> {
        self.stats.copied += 1;
        Arc::new(Fib::clone(&self.handle.current.load()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nh(peer: u32) -> NextHop {
        NextHop { peer, metric: 96 }
    }

    fn p(s: &str, len: u8) -> Prefix {
        Prefix::new(s.parse().unwrap(), len).unwrap()
    }

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// The obviously correct LPM: scan every route.
    fn naive(routes: &[(Prefix, NextHop)], dst: u128) -> Option<NextHop> {
        routes
            .iter()
            .filter(|(p, _)| p.contains(dst))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, nh)| *nh)
    }

    #[test]
    fn prefix_masks_host_bits_and_rejects_long_lengths() {
        let x = p("400:1:2:3:4:5:6:7", 64);
        assert_eq!(x.addr(), a("400:1:2:3::"));
        assert_eq!(Prefix::new(a("::"), 129), Err(InvalidPrefixLen(129)));
        assert_eq!(p("ffff::", 0).bits(), 0);
        assert_eq!(Prefix::slash64(0x0400_0001_0002_0003), x);
    }

    #[test]
    fn default_route_and_overlaps() {
        let fib = Fib::from_routes(
            FibHasherBuilder::with_seed(1),
            [
                (p("::", 0), nh(1)),
                (p("400::", 7), nh(2)),
                (p("400:1:2:3::", 64), nh(3)),
                (p("400:1:2:3:8000::", 65), nh(4)),
                (p("400:1:2:3::1", 128), nh(5)),
            ],
        );
        assert_eq!(fib.len(), 5);
        assert_eq!(fib.lookup(&a("2001:db8::1")), Some(nh(1)));
        assert_eq!(fib.lookup(&a("5ff::1")), Some(nh(2)));
        assert_eq!(fib.lookup(&a("400:1:2:3::2")), Some(nh(3)));
        assert_eq!(fib.lookup(&a("400:1:2:3:8000::2")), Some(nh(4)));
        assert_eq!(fib.lookup(&a("400:1:2:3::1")), Some(nh(5)));
        assert_eq!(fib.lookup(&a("400:1:2:4::1")), Some(nh(2)));
        assert_eq!(fib.get(&p("400::", 7)), Some(nh(2)));
        assert_eq!(fib.get(&p("400::", 8)), None);
    }

    #[test]
    fn removal_falls_back_to_shorter_prefix_and_drops_empty_lengths() {
        let (mut up, h) = FibUpdater::new();
        up.apply(&[
            RouteUpdate::Add(p("::", 0), nh(1)),
            RouteUpdate::Add(p("400:1:2:3::", 64), nh(3)),
            RouteUpdate::Add(p("400:1:2:3::1", 128), nh(5)),
        ]);
        assert_eq!(h.load().lookup(&a("400:1:2:3::1")), Some(nh(5)));
        up.apply(&[RouteUpdate::Remove(p("400:1:2:3::1", 128))]);
        assert_eq!(h.load().lookup(&a("400:1:2:3::1")), Some(nh(3)));
        assert!(h.load().longer.is_empty());
        up.apply(&[RouteUpdate::Remove(p("400:1:2:3::", 64))]);
        assert_eq!(h.load().lookup(&a("400:1:2:3::1")), Some(nh(1)));
        up.apply(&[RouteUpdate::Remove(p("::", 0))]);
        assert_eq!(h.load().lookup(&a("400:1:2:3::1")), None);
        assert!(h.load().is_empty());
        // Removing what isn't there is a no-op.
        up.apply(&[RouteUpdate::Remove(p("400::", 7))]);
        assert!(h.load().is_empty());
    }

    #[test]
    fn readers_keep_their_snapshot_and_updater_copies_while_held() {
        let (mut up, h) = FibUpdater::new();
        // Enough routes that replaying one-update batches beats copying.
        let filler: Vec<RouteUpdate> = (1..=64u64)
            .map(|i| RouteUpdate::Add(Prefix::slash64(0x0500_0000_0000_0000 | i), nh(9)))
            .collect();
        up.apply(&filler);
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(1))]);
        let held = h.load_full();
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(2))]);
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(3))]);
        // The snapshot from the first batch is still held, so the third batch had to copy.
        assert_eq!(held.lookup(&a("400::1")), Some(nh(1)));
        assert_eq!(h.load().lookup(&a("400::1")), Some(nh(3)));
        let before = up.stats();
        drop(held);
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(4))]);
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(5))]);
        assert_eq!(up.stats().reused, before.reused + 2);
        assert_eq!(h.load().lookup(&a("400::1")), Some(nh(5)));
        assert_eq!(h.load().len(), 65);
        // A batch as large as the table is not replayed: the next one copies.
        let before = up.stats();
        let big: Vec<RouteUpdate> = (1..=64u64)
            .map(|i| RouteUpdate::Add(Prefix::slash64(0x0600_0000_0000_0000 | i), nh(8)))
            .collect();
        up.apply(&big);
        up.apply(&[RouteUpdate::Remove(p("400::", 64))]);
        assert_eq!(up.stats().copied, before.copied + 1);
        assert_eq!(h.load().len(), 128);
    }

    #[test]
    fn replace_is_a_full_resync() {
        let (mut up, h) = FibUpdater::new();
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(1))]);
        up.replace([(p("500::", 64), nh(2))]);
        assert_eq!(h.load().lookup(&a("400::1")), None);
        assert_eq!(h.load().lookup(&a("500::1")), Some(nh(2)));
        up.apply(&[RouteUpdate::Add(p("400::", 64), nh(3))]);
        up.apply(&[RouteUpdate::Remove(p("500::", 64))]);
        let fib = h.load();
        assert_eq!(fib.lookup(&a("400::1")), Some(nh(3)));
        assert_eq!(fib.lookup(&a("500::1")), None);
    }

    #[test]
    fn hasher_spreads_slash64_keys() {
        let b = FibHasherBuilder::with_seed(7);
        let h1 = b.hash_one(0x0400_0000_0000_0001u64);
        let h2 = b.hash_one(0x0400_0000_0000_0002u64);
        assert_ne!(h1, h2);
        assert_ne!(
            FibHasherBuilder::with_seed(8).hash_one(0x0400_0000_0000_0001u64),
            h1
        );
    }

    /// Prefixes concentrated in a small address space so that random lookups hit overlaps.
    fn arb_prefix() -> impl Strategy<Value = Prefix> {
        (any::<u128>(), 0u8..=128, 0u8..4).prop_map(|(bits, len, zone)| {
            // Share the upper 8 bits among a few zones and sometimes the next 56 bits too, so that
            // /0../64 and /65../128 prefixes nest.
            let top = u128::from(zone) << 120;
            let bits = if bits & 1 == 0 {
                top | (bits & ((1u128 << 64) - 1)) | (0x0000_1234_5678_9a00u128 << 64)
            } else {
                top | (bits >> 8)
            };
            Prefix::from_bits(bits, len).unwrap()
        })
    }

    fn arb_dst(routes: Vec<(Prefix, NextHop)>) -> impl Strategy<Value = Vec<u128>> {
        let n = routes.len().max(1);
        prop::collection::vec((any::<u128>(), 0..n, any::<bool>()), 1..64).prop_map(move |v| {
            v.into_iter()
                .map(|(r, i, inside)| match routes.get(i) {
                    // A random address inside a route's prefix, or a fully random one.
                    Some((p, _)) if inside => p.bits() | (r & !mask128(p.prefix_len())),
                    _ => r,
                })
                .collect()
        })
    }

    fn arb_routes() -> impl Strategy<Value = Vec<(Prefix, NextHop)>> {
        prop::collection::vec(
            (arb_prefix(), any::<u32>()).prop_map(|(p, peer)| (p, nh(peer))),
            0..80,
        )
    }

    proptest! {
        #[test]
        fn matches_naive_lpm(
            (routes, dsts) in arb_routes().prop_flat_map(|r| (Just(r.clone()), arb_dst(r)))
        ) {
            // Deduplicate: later entries win, as in `from_routes`.
            let mut dedup: Vec<(Prefix, NextHop)> = Vec::new();
            for (p, nh) in &routes {
                dedup.retain(|(q, _)| q != p);
                dedup.push((*p, *nh));
            }
            let fib = Fib::from_routes(FibHasherBuilder::with_seed(3), routes.iter().copied());
            prop_assert_eq!(fib.len(), dedup.len());
            for d in dsts {
                prop_assert_eq!(fib.lookup_bits(d), naive(&dedup, d));
            }
        }

        #[test]
        fn batches_match_naive_after_adds_and_removes(
            batches in prop::collection::vec(
                prop::collection::vec((arb_prefix(), any::<u32>(), any::<bool>()), 0..20),
                1..8,
            ),
            dsts in prop::collection::vec(any::<u128>(), 1..32),
            hold in any::<bool>(),
        ) {
            let (mut up, h) = FibUpdater::new();
            let mut model: Vec<(Prefix, NextHop)> = Vec::new();
            let mut held = Vec::new();
            for batch in batches {
                let updates: Vec<RouteUpdate> = batch
                    .iter()
                    .map(|(p, peer, add)| if *add {
                        RouteUpdate::Add(*p, nh(*peer))
                    } else {
                        RouteUpdate::Remove(*p)
                    })
                    .collect();
                for u in &updates {
                    match u {
                        RouteUpdate::Add(p, n) => {
                            model.retain(|(q, _)| q != p);
                            model.push((*p, *n));
                        }
                        RouteUpdate::Remove(p) => model.retain(|(q, _)| q != p),
                    }
                }
                up.apply(&updates);
                if hold {
                    held.push(h.load_full());
                }
                let fib = h.load();
                prop_assert_eq!(fib.len(), model.len());
                let probes = dsts.iter().copied().chain(batch.iter().map(|(p, _, _)| p.bits()));
                for d in probes {
                    prop_assert_eq!(fib.lookup_bits(d), naive(&model, d));
                }
            }
        }
    }
}
