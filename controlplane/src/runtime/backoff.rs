//! Reconnect backoff for configured peers: jittered exponential, capped, reset on success.
//!
//! Why jitter: after a partition heals, every node would otherwise retry its peers in lockstep.
//! The delay for attempt `n` is drawn uniformly from `[d/2, d]` with `d = min(base · 2^n, cap)`
//! (“equal jitter”), so retries spread out but never wait less than half the nominal delay.

use std::time::Duration;

use rand::Rng;

/// Backoff state of one peer.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delay before the first retry after a failure, nominally.
    pub const DEFAULT_BASE: Duration = Duration::from_millis(500);
    /// Longest delay between two attempts.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(30);

    /// A fresh backoff.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; each call doubles the nominal delay up to the cap.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let nominal = self
            .base
            .checked_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1).min(31);
        let half = nominal / 2;
        let micros = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(rng.random_range(0..=micros))
    }

    /// Back to the first delay (after a link came up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Self::DEFAULT_BASE, Self::DEFAULT_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut nominal = Duration::from_secs(1);
        for _ in 0..12 {
            let d = b.next_delay(&mut rng);
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(30));
        }
        for _ in 0..100 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(30));
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                Backoff::new(Duration::from_secs(8), Duration::from_secs(30)).next_delay(&mut rng)
            })
            .collect();
        assert!(delays.len() > 10);
    }
}
