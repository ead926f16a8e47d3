//! `hypha-bench system`: the comparative system benchmark (issue 6, items 2 and 3).
//!
//! One run measures, one system after another on the same machine: the bare veth path (the
//! ceiling), veth with kernel forwarding through a middle namespace, kernel VXLAN (the no-crypto
//! tunnel), boringtun (userspace WireGuard), and Hypha's dataplane alone (`hypha-dp
//! --static-config`: static keys, no control plane) with 1 worker and one per core, direct
//! (a–b) and through a transit node (a–b–c). Each system gets fresh namespaces; each measurement
//! is repeated and the median reported, with throughput as a ratio to the veth ceiling so that
//! results survive a noisy machine. See [`measure`] for how CPU per GB is counted.
//!
//! Systems whose tools are missing are skipped with a line in the report, and every child has a
//! timeout, so `--quick` (used by CI) neither fails on a bare machine nor hangs.

pub mod measure;
pub mod report;
pub mod setup;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use measure::{CpuProbe, PingRun, Runner};
use setup::{Scenario, System, Unavailable};

/// Errors of the system benchmark.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The namespace harness failed.
    #[error(transparent)]
    Testnet(#[from] hypha_testnet::Error),
    /// A tool failed or misbehaved.
    #[error("{0}")]
    Tool(String),
    /// A tool's output could not be read.
    #[error("parse: {0}")]
    Parse(String),
    /// Writing the report failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Drawing the chart failed.
    #[error("chart: {0}")]
    Chart(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Few seconds per system, one repeat (CI).
    pub quick: bool,
    /// Markdown report path.
    pub out: PathBuf,
    /// SVG chart path.
    pub svg: PathBuf,
    /// Repeats per measurement.
    pub repeat: u32,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// UDP rate for the loss measurement (iperf3 syntax).
    pub udp_rate: String,
    /// Pings per idle RTT measurement (every 10 ms).
    pub pings: u32,
    /// The hypha-dp binary.
    pub hypha_dp: Option<PathBuf>,
    /// Only systems whose key contains one of these.
    pub only: Vec<String>,
    /// More `--xdp` modes for b, each an extra transit row (`hypha-<n>w-transit-xdp-<mode>`)
    /// beside the `--xdp auto` one.
    pub xdp_extra: Vec<&'static str>,
}

/// The medians of one system.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Label.
    pub label: String,
    /// Key.
    pub key: String,
    /// Setup note.
    pub note: String,
    /// TCP 1 stream, bit/s, per repeat.
    pub tcp1: Vec<f64>,
    /// TCP 4 streams, bit/s, per repeat.
    pub tcp4: Vec<f64>,
    /// UDP loss %, per repeat.
    pub udp_loss: Vec<f64>,
    /// UDP received bit/s, per repeat.
    pub udp_bps: Vec<f64>,
    /// Idle RTT p50 / p99 (µs), per repeat.
    pub rtt_p50: Vec<f64>,
    /// Idle RTT p99 (µs), per repeat.
    pub rtt_p99: Vec<f64>,
    /// Ping replies lost (idle), summed.
    pub ping_lost: u64,
    /// RTT under load p50 (µs), per repeat.
    pub load_p50: Vec<f64>,
    /// RTT under load p99 (µs), per repeat.
    pub load_p99: Vec<f64>,
    /// Tunnel CPU s/GB (TCP 1 stream), per repeat.
    pub cpu_tunnel: Vec<f64>,
    /// Total CPU s/GB, per repeat.
    pub cpu_total: Vec<f64>,
    /// Machine-wide busy s/GB, per repeat.
    pub cpu_machine: Vec<f64>,
    /// Measurement errors (a failed repeat is left out of the medians).
    pub errors: Vec<String>,
}

/// Median of the finite values (NaN if none).
pub fn median(v: &[f64]) -> f64 {
    let mut x: Vec<f64> = v.iter().copied().filter(|f| f.is_finite()).collect();
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(f64::total_cmp);
    let n = x.len();
    if n % 2 == 1 {
        x[n / 2]
    } else {
        (x[n / 2 - 1] + x[n / 2]) / 2.0
    }
}

/// A system that was not measured.
#[derive(Debug, Clone)]
pub struct Skip {
    /// Label.
    pub label: String,
    /// Why.
    pub reason: String,
}

/// Everything the report needs.
#[derive(Debug, Clone)]
pub struct Results {
    /// Measured systems in order.
    pub rows: Vec<Row>,
    /// Skipped or failed systems.
    pub skipped: Vec<Skip>,
    /// The options used.
    pub options: Options,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Load average before and after.
    pub load: (String, String),
}

/// The systems, in report order; `xdp_extra`: more `--xdp` modes for the transit row.
pub fn systems(cores: usize, xdp_extra: &[&'static str]) -> Vec<System> {
    let mut v = vec![
        System::Veth,
        System::VethRouted,
        System::Vxlan,
        System::Boringtun,
    ];
    let mut worker_counts = vec![1];
    if cores > 1 {
        worker_counts.push(cores);
    }
    for transit in [false, true] {
        for &workers in &worker_counts {
            v.push(System::Hypha {
                workers,
                transit,
                xdp: None,
            });
        }
    }
    for mode in std::iter::once(&"auto").chain(xdp_extra) {
        v.push(System::Hypha {
            workers: cores.max(1),
            transit: true,
            xdp: Some(mode),
        });
    }
    v
}

/// Finds hypha-dp: the given path, else next to this executable.
pub fn find_hypha_dp(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return p.is_file().then(|| p.to_path_buf());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("hypha-dp"), dir.join("../hypha-dp")]
        .into_iter()
        .find(|p| p.is_file())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn per_gb(cpu_s: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        f64::NAN
    } else {
        cpu_s / (bytes as f64 / 1e9)
    }
}

fn measure_system(s: &Scenario, opts: &Options, row: &mut Row) {
    let pids: Vec<u32> = s.tunnel_procs.iter().map(|p| p.pid()).collect();
    let runner = Runner {
        client: &s.client,
        server: &s.server,
        dst: s.dst,
        secs: opts.seconds,
        cpu: CpuProbe::new(s.tunnel_group.as_ref(), s.endpoint_group.as_ref(), pids),
    };
    let mut err = |what: &str, e: BenchError| {
        let line = format!("{what}: {e}");
        eprintln!("hypha-bench:   {line}");
        row.errors.push(line);
    };
    // Warm-up (ARP/ND, TCP metrics, first-packet paths).
    let _ = runner.ping(3, Duration::from_millis(10));
    for r in 0..opts.repeat {
        eprintln!("hypha-bench:   repeat {}/{}", r + 1, opts.repeat);
        match runner.tcp(1) {
            Ok(t) => {
                row.tcp1.push(t.bps);
                row.cpu_tunnel.push(per_gb(t.cpu.tunnel_s, t.bytes));
                row.cpu_total
                    .push(t.cpu.total_s.map_or(f64::NAN, |c| per_gb(c, t.bytes)));
                row.cpu_machine.push(per_gb(t.cpu.machine_s, t.bytes));
            }
            Err(e) => err("TCP 1 stream", e),
        }
        match runner.tcp(4) {
            Ok(t) => row.tcp4.push(t.bps),
            Err(e) => err("TCP 4 streams", e),
        }
        match runner.udp(&opts.udp_rate) {
            Ok(u) => {
                row.udp_loss.push(u.loss_pct);
                row.udp_bps.push(u.bps);
            }
            Err(e) => err("UDP", e),
        }
        match runner.ping(opts.pings, Duration::from_millis(10)) {
            Ok(p) => push_ping(&p, &mut row.rtt_p50, &mut row.rtt_p99, &mut row.ping_lost),
            Err(e) => err("ping", e),
        }
        match runner.ping_under_load() {
            Ok((p, _bps)) => {
                let mut lost = 0;
                push_ping(&p, &mut row.load_p50, &mut row.load_p99, &mut lost);
            }
            Err(e) => err("ping under load", e),
        }
    }
}

fn push_ping(p: &PingRun, p50: &mut Vec<f64>, p99: &mut Vec<f64>, lost: &mut u64) {
    *lost += u64::from(p.sent).saturating_sub(p.received);
    p50.push(p.quantile_us(0.50));
    p99.push(p.quantile_us(0.99));
}

/// Runs the benchmark and writes the report and chart.
pub fn run(opts: Options) -> Result<Results, BenchError> {
    let t0 = Instant::now();
    let load_before = load_average();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let hypha_dp = find_hypha_dp(opts.hypha_dp.as_deref());
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for system in systems(cores, &opts.xdp_extra) {
        let key = system.key();
        if !opts.only.is_empty() && !opts.only.iter().any(|o| key.contains(o.as_str())) {
            continue;
        }
        eprintln!("hypha-bench: {} ...", system.label());
        let scenario = match setup::build(system, hypha_dp.as_deref()) {
            Ok(s) => s,
            Err(Unavailable::Skipped(reason)) => {
                eprintln!("hypha-bench:   skipped: {reason}");
                skipped.push(Skip {
                    label: system.label(),
                    reason,
                });
                continue;
            }
            Err(Unavailable::Failed(e)) => {
                eprintln!("hypha-bench:   setup failed: {e}");
                skipped.push(Skip {
                    label: system.label(),
                    reason: format!("setup failed: {e}"),
                });
                continue;
            }
        };
        let mut row = Row {
            label: system.label(),
            key,
            note: scenario.note.clone(),
            ..Row::default()
        };
        let transit_before = scenario
            .transit_stats
            .as_ref()
            .and_then(hypha_testnet::dp::stats);
        measure_system(&scenario, &opts, &mut row);
        if let (Some(before), Some(after)) = (
            transit_before,
            scenario
                .transit_stats
                .as_ref()
                .and_then(hypha_testnet::dp::stats),
        ) {
            let summary = setup::transit_summary(&before, &after);
            eprintln!("hypha-bench:   {summary}");
            row.note = format!("{}; {summary}", row.note);
        }
        // A dead tunnel process is worth saying.
        for p in &scenario.tunnel_procs {
            if !p.is_running() {
                row.errors.push(format!(
                    "{} exited during the run: {}",
                    p.name(),
                    p.log_tail(5).unwrap_or_default()
                ));
            }
        }
        drop(scenario);
        eprintln!(
            "hypha-bench:   TCP1 {:.2} Gbit/s, TCP4 {:.2} Gbit/s, RTT p50 {:.0} µs",
            median(&row.tcp1) / 1e9,
            median(&row.tcp4) / 1e9,
            median(&row.rtt_p50)
        );
        rows.push(row);
    }
    let results = Results {
        rows,
        skipped,
        options: opts,
        elapsed: t0.elapsed(),
        load: (load_before, load_average()),
    };
    report::write(&results)?;
    Ok(results)
}

/// The address family of a destination, for the report.
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_ignores_nan_and_averages_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, f64::NAN, 2.0, 3.0]), 2.5);
        assert!(median(&[f64::NAN]).is_nan());
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn systems_cover_every_row_of_the_issue() {
        let keys: Vec<String> = systems(2, &["generic"]).iter().map(System::key).collect();
        for k in [
            "veth",
            "veth-routed",
            "vxlan",
            "boringtun",
            "hypha-1w",
            "hypha-2w",
            "hypha-1w-transit",
            "hypha-2w-transit",
            "hypha-2w-transit-xdp",
            "hypha-2w-transit-xdp-generic",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        // One core: no duplicate Hypha rows.
        let one: Vec<String> = systems(1, &[]).iter().map(System::key).collect();
        let mut dedup = one.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(one.len(), dedup.len());
    }
}
