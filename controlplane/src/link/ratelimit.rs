//! Per-source rate limit for handshake initiations.
//!
//! A LINK_INIT is the only frame that makes the responder allocate state and do Diffie-Hellman, so it is
//! the one an attacker would flood. Each source gets a token bucket; sources are keyed by IPv4 address
//! or by IPv6 /64 (anyone holding one IPv6 address holds the whole /64). The table is bounded: when it
//! is full the oldest entry is evicted (FIFO). Evicting a source only ever gives it a fresh, full bucket,
//! so a flood of spoofed sources cannot lock a legitimate peer out through this table.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use hypha_proto::time::Instant;

/// One token, in the bucket's fixed-point unit (micro-tokens).
const TOKEN: u64 = 1_000_000;

/// The key a source is limited under.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum SourceKey {
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl SourceKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Micro-tokens available at `last`.
    tokens: u64,
    last: Instant,
}

/// Token buckets per source, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Tokens added per second.
    rate: u64,
    /// Bucket size in micro-tokens.
    burst: u64,
    capacity: usize,
    buckets: HashMap<SourceKey, Bucket>,
    /// Insertion order, for eviction. Holds exactly the keys of `buckets`.
    order: VecDeque<SourceKey>,
}

impl RateLimiter {
    /// `rate` initiations per second per source, bursts of up to `burst`, at most `capacity` sources
    /// remembered (at least one).
    pub(crate) fn new(rate: u32, burst: u32, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RateLimiter {
            rate: u64::from(rate),
            burst: u64::from(burst.max(1)).saturating_mul(TOKEN),
            capacity,
            buckets: HashMap::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
        }
    }

    /// Takes one token for `ip`; `false` if its bucket is empty (the initiation must be dropped).
    pub(crate) fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        let key = SourceKey::of(ip);
        if let Some(bucket) = self.buckets.get_mut(&key) {
            let elapsed = u64::try_from((now - bucket.last).as_micros()).unwrap_or(u64::MAX);
            // rate tokens per second = rate micro-tokens per microsecond.
            let refill = elapsed.saturating_mul(self.rate);
            bucket.tokens = bucket.tokens.saturating_add(refill).min(self.burst);
            bucket.last = now;
            if bucket.tokens >= TOKEN {
                bucket.tokens -= TOKEN;
                return true;
            }
            return false;
        }
        while self.buckets.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.buckets.remove(&old);
                }
                None => break,
            }
        }
        self.buckets.insert(
            key,
            Bucket {
                tokens: self.burst.saturating_sub(TOKEN),
                last: now,
            },
        );
        self.order.push_back(key);
        true
    }

    /// Number of sources currently remembered (never more than the capacity).
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn bucket_empties_and_refills() {
        let mut rl = RateLimiter::new(2, 3, 16);
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let t = Instant::from_secs(10);
        assert!(rl.allow(t, ip));
        assert!(rl.allow(t, ip));
        assert!(rl.allow(t, ip));
        assert!(!rl.allow(t, ip));
        // Half a second at 2/s refills one token.
        let t = t + core::time::Duration::from_millis(500);
        assert!(rl.allow(t, ip));
        assert!(!rl.allow(t, ip));
        // Another source is independent.
        assert!(rl.allow(t, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))));
    }

    #[test]
    fn ipv6_limited_per_64() {
        let mut rl = RateLimiter::new(1, 1, 16);
        let t = Instant::from_secs(1);
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().expect("addr");
        let b: Ipv6Addr = "2001:db8:1:2::ffff".parse().expect("addr");
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().expect("addr");
        assert!(rl.allow(t, IpAddr::V6(a)));
        assert!(!rl.allow(t, IpAddr::V6(b)));
        assert!(rl.allow(t, IpAddr::V6(c)));
    }

    #[test]
    fn table_is_bounded() {
        let mut rl = RateLimiter::new(1, 1, 8);
        let t = Instant::from_secs(1);
        for i in 0..1000u32 {
            assert!(rl.allow(t, IpAddr::V4(Ipv4Addr::from(i))));
            assert!(rl.len() <= 8);
            assert_eq!(rl.len(), rl.order.len());
        }
        assert_eq!(rl.len(), 8);
    }
}
