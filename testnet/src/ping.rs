//! Running iputils `ping` in a node and reading its summary, the measure most tests use.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::node::Node;

/// The summary lines of an iputils `ping` run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingStats {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// Minimum round-trip time, if any reply came back.
    pub rtt_min: Option<Duration>,
    /// Average round-trip time.
    pub rtt_avg: Option<Duration>,
    /// Maximum round-trip time.
    pub rtt_max: Option<Duration>,
}

impl PingStats {
    /// Fraction of requests without a reply, 0.0–1.0 (1.0 if nothing was sent).
    pub fn loss_ratio(&self) -> f64 {
        if self.transmitted == 0 {
            1.0
        } else {
            1.0 - f64::from(self.received) / f64::from(self.transmitted)
        }
    }
}

fn millis(s: &str) -> Option<Duration> {
    let ms: f64 = s.trim().parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

/// Parses ping's output: `N packets transmitted, M received, …` and
/// `rtt min/avg/max/mdev = a/b/c/d ms`. `None` if the counts line is missing.
pub fn parse_ping(stdout: &str) -> Option<PingStats> {
    let counts = stdout.lines().find(|l| l.contains("packets transmitted"))?;
    let mut fields = counts.split(',');
    let transmitted = fields.next()?.split_whitespace().next()?.parse().ok()?;
    let received = fields.next()?.split_whitespace().next()?.parse().ok()?;
    let rtt: Vec<Option<Duration>> = stdout
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .map(|v| {
            v.trim()
                .trim_end_matches("ms")
                .split('/')
                .map(millis)
                .collect()
        })
        .unwrap_or_default();
    Some(PingStats {
        transmitted,
        received,
        rtt_min: rtt.first().copied().flatten(),
        rtt_avg: rtt.get(1).copied().flatten(),
        rtt_max: rtt.get(2).copied().flatten(),
    })
}

impl Node {
    /// Pings `dst` `count` times, `interval` apart (root may go down to 2 ms), waiting at most 1 s
    /// for each reply, and returns the summary. Loss is not an error. A ping that cannot run or
    /// prints no summary is an [`Error::Command`] with ping's stderr — for example
    /// `connect: Network is unreachable` when no route leads to `dst` (a cut link).
    pub fn ping(&self, dst: IpAddr, count: u32, interval: Duration) -> Result<PingStats> {
        let out = self.exec([
            "ping".to_string(),
            "-n".into(),
            "-q".into(),
            "-c".into(),
            count.to_string(),
            "-i".into(),
            format!("{:.3}", interval.as_secs_f64()),
            "-W".into(),
            "1".into(),
            dst.to_string(),
        ])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        parse_ping(&stdout).ok_or_else(|| Error::Command {
            cmd: format!("ping {dst} (in {})", self.netns()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iputils_summary() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\n\
                   --- 10.0.0.2 ping statistics ---\n\
                   200 packets transmitted, 181 received, 9.5% packet loss, time 2189ms\n\
                   rtt min/avg/max/mdev = 0.031/0.052/0.213/0.019 ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!((s.transmitted, s.received), (200, 181));
        assert_eq!(s.rtt_min, Some(Duration::from_micros(31)));
        assert_eq!(s.rtt_max, Some(Duration::from_micros(213)));
        assert!((s.loss_ratio() - 0.095).abs() < 1e-9);
    }

    #[test]
    fn total_loss_has_no_rtt() {
        let out = "5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 4080ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!(s.received, 0);
        assert_eq!(s.rtt_min, None);
        assert_eq!(s.loss_ratio(), 1.0);
        assert_eq!(parse_ping("garbage"), None);
    }
}
