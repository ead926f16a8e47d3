//! Retransmission timeout per destination, computed as in RFC 6298 §2 (SRTT, RTTVAR, RTO =
//! SRTT + max(G, 4·RTTVAR)), with a lower bound configurable below the RFC's 1 s: bus frames ride
//! inside an overlay whose paths are usually fast, and Mycelium retransmits after about 100 ms.

use std::time::Duration;

/// Smoothed RTT state for one destination.
#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    initial: Duration,
    min: Duration,
    max: Duration,
}

impl RttEstimator {
    pub(crate) fn new(initial: Duration, min: Duration, max: Duration) -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            initial,
            min,
            max,
        }
    }

    /// Feeds one sample (only from chunks sent once: Karn's algorithm, RFC 6298 §3).
    pub(crate) fn on_sample(&mut self, r: Duration) {
        match self.srtt {
            // §2.2: first measurement.
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            // §2.3: beta = 1/4, alpha = 1/8.
            Some(srtt) => {
                let diff = srtt.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    /// The current RTO, clamped to [min, max].
    pub(crate) fn rto(&self) -> Duration {
        let rto = match self.srtt {
            None => self.initial,
            Some(srtt) => srtt + (self.rttvar * 4).max(Duration::from_millis(1)),
        };
        rto.clamp(self.min, self.max)
    }

    /// The RTO after `retries` expirations (exponential backoff, §5.5), capped at max.
    pub(crate) fn backed_off(&self, retries: u32) -> Duration {
        let factor = 1u32 << retries.min(16);
        self.rto().saturating_mul(factor).min(self.max)
    }

    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rfc6298() {
        let ms = Duration::from_millis;
        let mut r = RttEstimator::new(ms(500), ms(100), ms(10_000));
        assert_eq!(r.rto(), ms(500));
        r.on_sample(ms(200));
        // SRTT 200, RTTVAR 100, RTO 600.
        assert_eq!(r.rto(), ms(600));
        r.on_sample(ms(200));
        // RTTVAR = 3/4·100 + 1/4·0 = 75; RTO = 200 + 300.
        assert_eq!(r.rto(), ms(500));
        assert_eq!(r.backed_off(2), ms(2000));
        assert_eq!(r.backed_off(30), ms(10_000));
        for _ in 0..50 {
            r.on_sample(ms(1));
        }
        assert_eq!(r.rto(), ms(100), "clamped to the minimum");
    }
}
