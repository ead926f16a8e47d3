//! Neighbours (RFC 8966 §3.2.4, Appendix A): Hello history, rxcost, txcost, RTT and link cost.
//!
//! A neighbour is keyed by interface and address. Its link cost follows §A.2.1 ("2 out of 3")
//! plus, when timestamps are on, the RTT penalty of RFC 9616 §4 / babeld, with a floor of 1 so a
//! zero-cost link cannot make long paths look free.
//!
//! Memory: a neighbour is 168 bytes with its key, plus its `BTreeMap` slot and, while unicast
//! output to it is pending, one `Buffered` (~200 bytes plus at most 64 requests and 16 acks).

use std::net::IpAddr;
use std::time::Duration;

use hypha_proto::babel::INFINITY;
use hypha_proto::time::Instant;

use super::interface::{InterfaceId, RttConfig};
use super::seqno::SeqNo;

/// A neighbour's identity: the interface it is on and its address there. Ordered by interface,
/// then address (IPv4 first), compared as integers since tables compare keys all the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NeighbourKey {
    /// The interface.
    pub iface: InterfaceId,
    /// Its address (link-local in lab mode, the overlay address on overlay links).
    pub addr: IpAddr,
}

impl NeighbourKey {
    fn sort_key(&self) -> (u32, bool, u128) {
        match self.addr {
            IpAddr::V4(a) => (self.iface.0, false, u128::from(u32::from(a))),
            IpAddr::V6(a) => (self.iface.0, true, u128::from(a)),
        }
    }
}

impl Ord for NeighbourKey {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.sort_key().cmp(&other.sort_key())
    }
}

impl PartialOrd for NeighbourKey {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The Hello history of §A.1: a 16-bit window of received (1) and missed (0) Hellos, newest in the
/// top bit, and when the next Hello is due.
#[derive(Debug, Clone, Default)]
pub(crate) struct HelloHistory {
    pub(crate) reach: u16,
    /// The last seqno received.
    seqno: Option<SeqNo>,
    interval: Duration,
    /// When to count the next Hello as missed.
    pub(crate) expect_at: Option<Instant>,
}

impl HelloHistory {
    /// A Hello with `seqno` arrived, announcing the next one in `interval` (§A.1). Returns true if
    /// the history was reset (the neighbour probably restarted).
    pub(crate) fn update(&mut self, now: Instant, seqno: SeqNo, interval: Duration) -> bool {
        let mut reset = false;
        match self.seqno {
            Some(last) => {
                // As babeld: how many Hellos were skipped, as a signed 16-bit difference.
                let missed = seqno.0.wrapping_sub(last.plus(1).0) as i16;
                if !(-8..=16).contains(&missed) {
                    // A big jump either way: the neighbour restarted; start over.
                    self.reach = 0;
                    reset = true;
                } else if missed < 0 {
                    // Late or repeated Hellos: undo the misses the timer counted.
                    self.reach = self
                        .reach
                        .checked_shl(u32::from(missed.unsigned_abs()))
                        .unwrap_or(0);
                } else {
                    self.reach = self
                        .reach
                        .checked_shr(u32::from(missed.unsigned_abs()))
                        .unwrap_or(0);
                }
            }
            None => self.reach = 0,
        }
        self.reach = (self.reach >> 1) | 0x8000;
        self.seqno = Some(seqno);
        self.interval = interval;
        // §A.1: allow for jitter: a Hello counts as missed 1.5 intervals after the last one.
        self.expect_at = (!interval.is_zero()).then(|| now + interval.mul_f32(1.5));
        reset
    }

    /// Counts the expected Hello as missed if its time has come. Returns true if it did.
    pub(crate) fn check(&mut self, now: Instant) -> bool {
        match self.expect_at {
            Some(t) if t <= now => {
                self.reach >>= 1;
                self.seqno = self.seqno.map(|s| s.plus(1));
                self.expect_at = (self.reach != 0).then(|| now + self.interval);
                true
            }
            _ => false,
        }
    }

    /// §A.2.1, as babeld: the nominal cost if the last two Hellos arrived, or one of them and the
    /// one before; otherwise infinity.
    fn rxcost(&self, nominal: u16) -> u16 {
        let r = self.reach;
        if r & 0xC000 == 0xC000 || (r & 0xC000 != 0 && r & 0x2000 != 0) {
            nominal
        } else {
            INFINITY
        }
    }
}

/// One neighbour's state.
#[derive(Debug, Clone)]
pub(crate) struct Neighbour {
    /// Multicast Hellos.
    pub(crate) hello: HelloHistory,
    /// Unicast Hellos (flag U), kept apart as §3.4.1 requires.
    pub(crate) uhello: HelloHistory,
    /// The rxcost it reported for us in its last IHU; infinite when none is current.
    pub(crate) txcost: u16,
    pub(crate) ihu_expires: Option<Instant>,
    /// Smoothed RTT in microseconds, when measured (RFC 9616 §3.3).
    pub(crate) rtt: Option<u32>,
    pub(crate) rtt_time: Option<Instant>,
    /// Transmit timestamp of its last Hello and when we got it, echoed in our IHUs.
    pub(crate) hello_ts: Option<(u32, u32)>,
    /// The link cost as last computed.
    pub(crate) cost: u16,
    /// The link cost when the routes through the neighbour were last re-examined.
    pub(crate) cost_reselected: u16,
    /// Our rxcost as last advertised; a change triggers an early IHU.
    pub(crate) rxcost: u16,
}

impl Neighbour {
    pub(crate) fn new() -> Self {
        Neighbour {
            hello: HelloHistory::default(),
            uhello: HelloHistory::default(),
            txcost: INFINITY,
            ihu_expires: None,
            rtt: None,
            rtt_time: None,
            hello_ts: None,
            cost: INFINITY,
            cost_reselected: INFINITY,
            rxcost: INFINITY,
        }
    }

    /// The cost we advertise for hearing this neighbour (§A.2.1).
    pub(crate) fn compute_rxcost(&self, nominal: u16) -> u16 {
        self.hello.rxcost(nominal).min(self.uhello.rxcost(nominal))
    }

    /// The RTT penalty (babeld `neighbour_rttcost`): 0 up to `min`, linear to `max_penalty` at `max`.
    /// A sample older than 3 minutes no longer counts.
    pub(crate) fn rttcost(&self, now: Instant, rtt: Option<&RttConfig>) -> u16 {
        let (Some(cfg), Some(r), Some(t)) = (rtt, self.rtt, self.rtt_time) else {
            return 0;
        };
        if now - t > Duration::from_secs(180) {
            return 0;
        }
        let (min, max) = (cfg.min.as_micros() as u64, cfg.max.as_micros() as u64);
        let r = u64::from(r);
        if r <= min || cfg.max_penalty == 0 {
            0
        } else if r >= max || max <= min {
            cfg.max_penalty
        } else {
            let p = u64::from(cfg.max_penalty) * (r - min) / (max - min);
            u16::try_from(p).unwrap_or(cfg.max_penalty)
        }
    }

    /// The link cost (§A.3, babeld `neighbour_cost`): infinite unless both directions work, else
    /// txcost plus the RTT penalty, never below 1 and never infinite by addition.
    pub(crate) fn compute_cost(&self, now: Instant, nominal: u16, rtt: Option<&RttConfig>) -> u16 {
        if self.txcost == INFINITY || self.compute_rxcost(nominal) == INFINITY {
            return INFINITY;
        }
        let c = u32::from(self.txcost) + u32::from(self.rttcost(now, rtt));
        u16::try_from(c.clamp(1, u32::from(INFINITY - 1))).unwrap_or(INFINITY - 1)
    }

    /// A new RTT sample in microseconds (RFC 9616 §3.3; babeld's smoothing: the first sample
    /// counts double, to be conservative with new neighbours).
    pub(crate) fn add_rtt_sample(&mut self, now: Instant, sample: u32, decay: u8) {
        let smoothed = match self.rtt {
            Some(old) => {
                let d = u64::from(decay);
                let s = d * u64::from(sample) + (256 - d) * u64::from(old);
                let v = if old >= sample {
                    s / 256
                } else {
                    s.div_ceil(256)
                };
                u32::try_from(v).unwrap_or(u32::MAX)
            }
            None => sample.saturating_mul(2),
        };
        self.rtt = Some(smoothed);
        self.rtt_time = Some(now);
    }

    /// Applies due timers (missed Hellos, IHU expiry). Returns true if anything changed.
    pub(crate) fn check(&mut self, now: Instant) -> bool {
        let mut changed = self.hello.check(now);
        changed |= self.uhello.check(now);
        if let Some(t) = self.ihu_expires {
            if t <= now {
                self.ihu_expires = None;
                self.txcost = INFINITY;
                changed = true;
            }
        }
        changed
    }

    /// The earliest of this neighbour's timers.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        [
            self.hello.expect_at,
            self.uhello.expect_at,
            self.ihu_expires,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Nothing heard for 16 Hello intervals and no IHU: forget it (babeld `check_neighbours`).
    pub(crate) fn is_dead(&self) -> bool {
        self.hello.reach == 0 && self.uhello.reach == 0 && self.ihu_expires.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn two_out_of_three() {
        let mut n = Neighbour::new();
        let t0 = Instant::from_secs(100);
        n.hello.update(t0, SeqNo(10), S);
        assert_eq!(n.compute_rxcost(96), INFINITY, "one Hello is not enough");
        n.hello.update(t0 + S, SeqNo(11), S);
        assert_eq!(n.compute_rxcost(96), 96);
        // Hello 12 lost, 13 arrives: 1011 → the last two? no, but the last and the third: fine.
        n.hello.update(t0 + 3 * S, SeqNo(13), S);
        assert_eq!(n.hello.reach >> 12, 0b1011);
        assert_eq!(n.compute_rxcost(96), 96);
        n.hello.update(t0 + 4 * S, SeqNo(14), S);
        // Missed by timer, 1.5 intervals after the last one.
        assert!(!n.hello.check(t0 + 5 * S));
        assert!(n.hello.check(t0 + 5 * S + S / 2));
        assert_eq!(n.hello.reach >> 12, 0b0110);
        assert_eq!(
            n.compute_rxcost(96),
            96,
            "0110: one of the last two and the third"
        );
        assert!(n.hello.check(t0 + 7 * S));
        assert_eq!(n.compute_rxcost(96), INFINITY, "0011");
        // A late Hello 15 undoes the two misses counted (15 and 16), as babeld does.
        n.hello.update(t0 + 7 * S, SeqNo(15), S);
        assert_eq!(n.hello.reach >> 12, 0b1110);
        // A restart (seqno far back) resets the history.
        assert!(n.hello.update(t0 + 7 * S, SeqNo(2), S));
        assert_eq!(n.hello.reach, 0x8000);
    }

    #[test]
    fn cost_needs_both_directions_and_adds_rtt() {
        let now = Instant::from_secs(10);
        let mut n = Neighbour::new();
        n.hello.update(now, SeqNo(1), S);
        n.hello.update(now, SeqNo(2), S);
        assert_eq!(n.compute_cost(now, 96, None), INFINITY);
        n.txcost = 96;
        assert_eq!(n.compute_cost(now, 96, None), 96);
        let rtt = RttConfig::default();
        n.add_rtt_sample(now, 32_500, rtt.decay); // first sample doubled: 65 ms
        assert_eq!(n.rtt, Some(65_000));
        // (65 - 10) / (120 - 10) * 150 = 75
        assert_eq!(n.compute_cost(now, 96, Some(&rtt)), 96 + 75);
        n.add_rtt_sample(now, 200_000, rtt.decay);
        assert!(n.rtt.unwrap() > 65_000);
        n.txcost = 0;
        n.rtt = Some(0);
        assert_eq!(n.compute_cost(now, 96, Some(&rtt)), 1, "at least 1 per hop");
        n.txcost = INFINITY - 1;
        n.rtt = Some(1_000_000);
        assert_eq!(n.compute_cost(now, 96, Some(&rtt)), INFINITY - 1);
    }
}
