//! Per-worker, per-reason packet counters.
//!
//! Every worker owns one [`WorkerCounters`] (a row of relaxed `AtomicU64`s on its own cache lines),
//! increments it without contention, and readers sum the rows ([`CounterSet::snapshot`]). Nothing
//! on the hot path takes a lock or shares a cache line with another worker.
//!
//! The same snapshot feeds the JSON stats endpoint of `hypha-dp` ([`Snapshot::to_json`], the
//! shape `hypha stats --json` reuses) and the shm `Counters` events sent up to the control plane.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// What a counter counts. `Counter::ALL` lists them in JSON order.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        #[repr(usize)]
        pub enum Counter {
            $( $(#[$doc])* $name, )*
        }

        impl Counter {
            /// Every counter, in declaration order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// The counter's name (its JSON key).
            pub const fn name(self) -> &'static str {
                match self {
                    $( Counter::$name => stringify!($name), )*
                }
            }
        }
    };
}

counters! {
    /// Datagrams received on the UDP socket (after GRO splitting).
    udp_rx_packets,
    /// Bytes of those datagrams.
    udp_rx_bytes,
    /// Datagrams sent on the UDP socket.
    udp_tx_packets,
    /// Bytes of those datagrams.
    udp_tx_bytes,
    /// Packets read from the TUN device.
    tun_rx_packets,
    /// Bytes of those packets (without the virtio header).
    tun_rx_bytes,
    /// Packets written to the TUN device (decrypted data and ICMPv6 errors).
    tun_tx_packets,
    /// Bytes of those packets.
    tun_tx_bytes,
    /// Data packets for this node that authenticated and were delivered.
    delivered,
    /// Transit data packets forwarded unchanged (hop limit − 1).
    forwarded,
    /// Packets handed to the control plane (control frames, handshakes, message-bus frames).
    punted,
    /// Punts and events dropped because the shm up-ring was full or absent.
    dropped_punt,
    /// Outbound or transit packets without a route.
    dropped_no_route,
    /// Outbound packets dropped because the per-destination or total no-session queue was full,
    /// or timed out waiting for a session.
    dropped_no_session,
    /// Outbound packets queued while waiting for a session.
    queued_no_session,
    /// Routes pointing at a peer whose underlay address is unknown.
    dropped_no_peer,
    /// Inbound data for an unknown receiver index.
    dropped_unknown_session,
    /// Inbound data refused by the replay window.
    dropped_replay,
    /// Inbound data whose AEAD tag did not verify.
    dropped_auth,
    /// Sessions past their time or message limit.
    dropped_expired,
    /// Decrypted packets whose inner source is not the session peer's /64.
    dropped_spoofed,
    /// Malformed datagrams or TUN packets (bad frame type, short header, not IPv6, …).
    dropped_malformed,
    /// Transit packets whose hop limit ran out.
    dropped_hop_limit,
    /// Packets dropped because no submission slot or buffer was free (backpressure).
    dropped_backpressure,
    /// Send or write completions that reported an error.
    io_errors,
    /// Decrypted TCP segments merged into super-packets before the TUN write.
    coalesced,
    /// ICMPv6 errors written to the TUN device.
    icmp_sent,
    /// Times the submission queue was full and had to be flushed before pushing.
    sq_full,
}

/// Number of counters.
pub const COUNT: usize = Counter::ALL.len();

/// One worker's counters, padded so two workers never share a cache line.
#[repr(align(128))]
#[derive(Debug)]
pub struct WorkerCounters {
    values: [AtomicU64; COUNT],
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters {
            values: [const { AtomicU64::new(0) }; COUNT],
        }
    }
}

impl WorkerCounters {
    /// Adds `n` to `c`.
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        // The index is a declared variant, always in range.
        if let Some(v) = self.values.get(c as usize) {
            v.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds one to `c`.
    #[inline]
    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    /// The current value of `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.values
            .get(c as usize)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }
}

/// Every worker's counters (plus one row for the control thread), shared by `Arc`.
#[derive(Debug, Clone)]
pub struct CounterSet {
    rows: Arc<[WorkerCounters]>,
}

impl CounterSet {
    /// `rows` rows of zeroed counters.
    pub fn new(rows: usize) -> Self {
        CounterSet {
            rows: (0..rows.max(1))
                .map(|_| WorkerCounters::default())
                .collect(),
        }
    }

    /// Row `i` (the last row if `i` is out of range).
    pub fn row(&self, i: usize) -> &WorkerCounters {
        let last = self.rows.len() - 1;
        &self.rows[i.min(last)]
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// The sum over all rows.
    pub fn snapshot(&self) -> Snapshot {
        let mut values = [0u64; COUNT];
        for row in self.rows.iter() {
            for (acc, c) in values.iter_mut().zip(Counter::ALL) {
                *acc += row.get(*c);
            }
        }
        Snapshot { values }
    }

    /// The counters of row `i` alone.
    pub fn row_snapshot(&self, i: usize) -> Snapshot {
        let row = self.row(i);
        let mut values = [0u64; COUNT];
        for (acc, c) in values.iter_mut().zip(Counter::ALL) {
            *acc = row.get(*c);
        }
        Snapshot { values }
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    values: [u64; COUNT],
}

impl Snapshot {
    /// The value of `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.values.get(c as usize).copied().unwrap_or(0)
    }

    /// A JSON object `{"udp_rx_packets": n, …}` with every counter.
    pub fn to_json(&self) -> serde_json::Value {
        let map = Counter::ALL
            .iter()
            .map(|c| (c.name().to_owned(), serde_json::Value::from(self.get(*c))))
            .collect();
        serde_json::Value::Object(map)
    }

    /// The shm ABI's (smaller) counters record for worker `worker`.
    pub fn to_shm(&self, worker: u32) -> hypha_proto::shm::Counters {
        use Counter as C;
        hypha_proto::shm::Counters {
            worker,
            rx_packets: self.get(C::udp_rx_packets) + self.get(C::tun_rx_packets),
            rx_bytes: self.get(C::udp_rx_bytes) + self.get(C::tun_rx_bytes),
            tx_packets: self.get(C::udp_tx_packets) + self.get(C::tun_tx_packets),
            tx_bytes: self.get(C::udp_tx_bytes) + self.get(C::tun_tx_bytes),
            forwarded_packets: self.get(C::forwarded),
            punted_packets: self.get(C::punted),
            dropped_no_route: self.get(C::dropped_no_route),
            dropped_no_session: self.get(C::dropped_no_session)
                + self.get(C::dropped_unknown_session),
            dropped_replay: self.get(C::dropped_replay),
            dropped_malformed: self.get(C::dropped_malformed)
                + self.get(C::dropped_auth)
                + self.get(C::dropped_spoofed),
            dropped_ring_full: self.get(C::dropped_punt) + self.get(C::dropped_backpressure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_summed_and_named() {
        let set = CounterSet::new(3);
        set.row(0).inc(Counter::dropped_replay);
        set.row(2).add(Counter::dropped_replay, 4);
        set.row(1).add(Counter::udp_rx_bytes, 1500);
        let s = set.snapshot();
        assert_eq!(s.get(Counter::dropped_replay), 5);
        assert_eq!(s.get(Counter::udp_rx_bytes), 1500);
        assert_eq!(set.row_snapshot(2).get(Counter::dropped_replay), 4);
        let json = s.to_json();
        assert_eq!(json["dropped_replay"], 5);
        assert_eq!(json["dropped_auth"], 0);
        assert_eq!(json.as_object().map(|m| m.len()), Some(COUNT));
        assert_eq!(s.to_shm(7).dropped_replay, 5);
        assert_eq!(s.to_shm(7).worker, 7);
    }
}
