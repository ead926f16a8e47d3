//! One measurement at a time: iperf3 (TCP, UDP), ping (RTT histogram) and CPU accounting.
//!
//! Every child process runs under coreutils `timeout` (and is a `hypha-testnet` process that the
//! net kills at drop), so a wedged tunnel costs a bounded wait, never a hang.
//!
//! # CPU per GB
//! Processes are put into cgroup-v1 `cpuacct` groups when the machine has them
//! (`/sys/fs/cgroup/cpuacct`): one for the tunnel's processes (hypha-dp, boringtun), one for the
//! traffic endpoints (iperf3 client and server). `cpuacct.usage` is the scheduler's exact runtime
//! of every task that was ever in the group, threads and exited children included, kernel time in
//! their context (syscalls, the softirqs run on their way out of the kernel) included. Softirq work
//! deferred to `ksoftirqd` is added from those threads' `/proc/<pid>/stat` times. So
//! *tunnel CPU* = the tunnel group, and *total CPU* = tunnel + endpoints + ksoftirqd, per GB the
//! receiver counted. Other jobs on the machine do not enter either number (unlike `/proc/stat`
//! deltas, which are recorded too, as machine-wide busy time, but are only meaningful on an idle
//! machine). Without cpuacct the tunnel's CPU comes from `/proc/<pid>/stat` of its processes and
//! the total is left out.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hypha_testnet::{wait_until, Node, ProcHandle, Signal};

use super::BenchError;

const CPUACCT: &str = "/sys/fs/cgroup/cpuacct";

/// A cgroup-v1 cpuacct group that is removed at drop (after its processes have gone).
#[derive(Debug)]
pub struct CpuGroup {
    dir: PathBuf,
}

impl CpuGroup {
    /// A fresh group, or `None` if this machine has no cpuacct hierarchy.
    pub fn new(label: &str) -> Option<CpuGroup> {
        static N: AtomicU32 = AtomicU32::new(0);
        if !Path::new(CPUACCT).join("cpuacct.usage").exists() {
            return None;
        }
        let dir = Path::new(CPUACCT).join(format!(
            "hypha-bench-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).ok()?;
        Some(CpuGroup { dir })
    }

    /// CPU time used by everything that was ever in the group.
    pub fn usage(&self) -> Duration {
        std::fs::read_to_string(self.dir.join("cpuacct.usage"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }

    fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // The processes were killed by the TestNet before; reaping may lag a little.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("hypha-bench: could not remove {}", self.dir.display());
    }
}

/// Starts `args` in `node` (inside `group` from its first instruction when given), with its
/// output in the net's log directory.
pub fn spawn(
    node: &Node,
    name: &str,
    group: Option<&CpuGroup>,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<ProcHandle, BenchError> {
    let (prog, rest) = args
        .split_first()
        .ok_or_else(|| BenchError::Tool("empty command".into()))?;
    let mut cmd = match group {
        Some(g) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("echo $$ > \"$0\" && exec \"$@\"")
                .arg(g.procs_file())
                .arg(prog)
                .args(rest);
            c
        }
        None => {
            let mut c = Command::new(prog);
            c.args(rest);
            c
        }
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(node.spawn(name, cmd)?)
}

/// `timeout -k 2 SECS args...` as an argument list.
pub fn with_timeout(secs: u64, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "timeout".to_string(),
        "-k".into(),
        "2".into(),
        secs.to_string(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// Waits for `p` to end within `limit`; kills its group if it does not.
pub fn finish(p: &ProcHandle, limit: Duration) -> Result<(), BenchError> {
    if p.wait_exit(limit).is_err() {
        let _ = p.kill(Signal::SIGKILL);
        let _ = p.wait_exit(Duration::from_secs(3));
        return Err(BenchError::Tool(format!(
            "{} did not finish within {limit:?}",
            p.name()
        )));
    }
    Ok(())
}

/// Clock ticks per second for `/proc` times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of one process (all its threads), in seconds.
pub fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state (field 3).
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// PIDs of the `ksoftirqd/N` kernel threads.
fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// Machine-wide busy time (everything but idle, iowait and steal) from `/proc/stat`, seconds.
fn machine_busy() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0usize, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum();
    busy as f64 / clk_tck()
}

/// Where the CPU time is read from for one system.
pub struct CpuProbe<'a> {
    /// The tunnel's processes' group.
    pub tunnel: Option<&'a CpuGroup>,
    /// The iperf3 processes' group.
    pub endpoints: Option<&'a CpuGroup>,
    /// The tunnel's processes (fallback when there is no cpuacct).
    pub tunnel_pids: Vec<u32>,
    ksoftirqd: Vec<u32>,
}

/// A CPU reading.
#[derive(Debug, Clone, Copy)]
struct CpuSnap {
    tunnel: f64,
    endpoints: Option<f64>,
    ksoftirqd: f64,
    machine: f64,
}

/// CPU seconds spent during one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// The tunnel's processes.
    pub tunnel_s: f64,
    /// Tunnel + endpoints + ksoftirqd (`None` without cpuacct).
    pub total_s: Option<f64>,
    /// Machine-wide busy time (includes unrelated jobs).
    pub machine_s: f64,
}

impl<'a> CpuProbe<'a> {
    /// A probe over the given groups and processes.
    pub fn new(
        tunnel: Option<&'a CpuGroup>,
        endpoints: Option<&'a CpuGroup>,
        tunnel_pids: Vec<u32>,
    ) -> Self {
        CpuProbe {
            tunnel,
            endpoints,
            tunnel_pids,
            ksoftirqd: ksoftirqd_pids(),
        }
    }

    fn snap(&self) -> CpuSnap {
        let tunnel = match self.tunnel {
            Some(g) => g.usage().as_secs_f64(),
            None => self.tunnel_pids.iter().filter_map(|&p| proc_cpu(p)).sum(),
        };
        CpuSnap {
            tunnel,
            endpoints: self.endpoints.map(|g| g.usage().as_secs_f64()),
            ksoftirqd: self.ksoftirqd.iter().filter_map(|&p| proc_cpu(p)).sum(),
            machine: machine_busy(),
        }
    }
}

fn cpu_between(a: CpuSnap, b: CpuSnap) -> CpuUse {
    let tunnel_s = (b.tunnel - a.tunnel).max(0.0);
    let soft = (b.ksoftirqd - a.ksoftirqd).max(0.0);
    CpuUse {
        tunnel_s,
        total_s: match (a.endpoints, b.endpoints) {
            (Some(x), Some(y)) => Some(tunnel_s + (y - x).max(0.0) + soft),
            _ => None,
        },
        machine_s: (b.machine - a.machine).max(0.0),
    }
}

/// One iperf3 TCP run.
#[derive(Debug, Clone, Copy)]
pub struct TcpRun {
    /// Receiver's bits per second.
    pub bps: f64,
    /// Receiver's bytes.
    pub bytes: u64,
    /// CPU used meanwhile.
    pub cpu: CpuUse,
}

/// One iperf3 UDP run.
#[derive(Debug, Clone, Copy)]
pub struct UdpRun {
    /// Received bits per second.
    pub bps: f64,
    /// Lost datagrams, percent.
    pub loss_pct: f64,
}

/// A ping run: RTTs in microseconds and how many were lost.
#[derive(Debug, Clone)]
pub struct PingRun {
    /// RTT samples (µs).
    pub hist: Histogram<u64>,
    /// Requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u64,
}

impl PingRun {
    /// The RTT at quantile `q` in µs (NaN without samples).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            f64::NAN
        } else {
            self.hist.value_at_quantile(q) as f64
        }
    }
}

/// Parses `time=0.045 ms` from each reply line of iputils ping.
pub fn parse_ping_times(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let t = l.split("time=").nth(1)?;
            let num = t.split_whitespace().next()?;
            let v: f64 = num.parse().ok()?;
            let unit_ms = t.contains("ms");
            Some(if unit_ms { v * 1000.0 } else { v * 1e6 })
        })
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect()
}

/// The receiver's bytes and bits per second from `iperf3 -J` output (TCP), or the loss for UDP.
fn iperf_json(log: &str) -> Result<serde_json::Value, BenchError> {
    let start = log.find('{');
    let end = log.rfind('}');
    let (Some(s), Some(e)) = (start, end) else {
        return Err(BenchError::Tool(format!(
            "iperf3 printed no JSON: {}",
            log.chars().take(400).collect::<String>()
        )));
    };
    let text = log.get(s..=e).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| BenchError::Parse(format!("iperf3 JSON: {e}")))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(BenchError::Tool(format!("iperf3: {err}")));
    }
    Ok(v)
}

/// Runs measurements from `client` to `dst` (served by `server`).
pub struct Runner<'a> {
    /// Sender of the traffic, where ping runs.
    pub client: &'a Node,
    /// Receiver (iperf3 server).
    pub server: &'a Node,
    /// The receiver's address on the path under test.
    pub dst: IpAddr,
    /// Seconds per iperf3 run.
    pub secs: u32,
    /// CPU accounting.
    pub cpu: CpuProbe<'a>,
}

static PORT: AtomicU16 = AtomicU16::new(0);

fn next_port() -> u16 {
    5201 + PORT.fetch_add(1, Ordering::Relaxed) % 2000
}

impl Runner<'_> {
    fn start_server(&self, port: u16) -> Result<ProcHandle, BenchError> {
        let ps = port.to_string();
        let srv = spawn(
            self.server,
            "iperf3-s",
            self.cpu.endpoints,
            &with_timeout(
                u64::from(self.secs) + 40,
                &["iperf3", "-s", "-1", "-p", &ps],
            ),
            &[],
        )?;
        let filter = format!("sport = :{port}");
        wait_until(Duration::from_secs(5), Duration::from_millis(30), || {
            self.server
                .exec(["ss", "-Hltn", &filter])
                .is_ok_and(|o| !o.stdout.is_empty())
        })
        .map_err(|_| BenchError::Tool("iperf3 server did not start listening".into()))?;
        Ok(srv)
    }

    fn client_args(&self, port: u16, secs: u32, extra: &[&str]) -> Vec<String> {
        let dst = self.dst.to_string();
        let ps = port.to_string();
        let t = secs.to_string();
        let mut a = vec![
            "iperf3",
            "-c",
            &dst,
            "-p",
            &ps,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        a.extend_from_slice(extra);
        with_timeout(u64::from(secs) + 20, &a)
    }

    /// `iperf3 -c` with `extra` arguments; returns its JSON and the CPU used.
    fn iperf(&self, secs: u32, extra: &[&str]) -> Result<(serde_json::Value, CpuUse), BenchError> {
        let port = next_port();
        let srv = self.start_server(port)?;
        let before = self.cpu.snap();
        let cli = spawn(
            self.client,
            "iperf3-c",
            self.cpu.endpoints,
            &self.client_args(port, secs, extra),
            &[],
        )?;
        let r = finish(&cli, Duration::from_secs(u64::from(secs) + 25));
        let srv_done = finish(&srv, Duration::from_secs(5));
        let after = self.cpu.snap();
        r?;
        let v = iperf_json(&cli.log()?)?;
        srv_done?;
        Ok((v, cpu_between(before, after)))
    }

    /// TCP with `streams` parallel streams.
    pub fn tcp(&self, streams: u32) -> Result<TcpRun, BenchError> {
        let p = streams.to_string();
        let (v, cpu) = self.iperf(self.secs, &["-P", &p])?;
        let sum = &v["end"]["sum_received"];
        let bytes = sum["bytes"].as_u64().unwrap_or(0);
        let bps = sum["bits_per_second"].as_f64().unwrap_or(0.0);
        if bytes == 0 {
            return Err(BenchError::Tool("iperf3 TCP moved no bytes".into()));
        }
        Ok(TcpRun { bps, bytes, cpu })
    }

    /// UDP at `rate` (iperf3 syntax, e.g. `300M`) with 1200-byte datagrams, for at most 5 s.
    pub fn udp(&self, rate: &str) -> Result<UdpRun, BenchError> {
        let (v, _) = self.iperf(self.secs.min(5), &["-u", "-b", rate, "-l", "1200"])?;
        let end = &v["end"];
        let sum = if end["sum_received"].is_object() {
            &end["sum_received"]
        } else {
            &end["sum"]
        };
        let loss_pct = end["sum"]["lost_percent"]
            .as_f64()
            .or_else(|| sum["lost_percent"].as_f64())
            .unwrap_or(f64::NAN);
        Ok(UdpRun {
            bps: sum["bits_per_second"].as_f64().unwrap_or(0.0),
            loss_pct,
        })
    }

    /// `count` pings every `interval`.
    pub fn ping(&self, count: u32, interval: Duration) -> Result<PingRun, BenchError> {
        let limit = (interval.as_secs_f64() * f64::from(count)).ceil() as u64 + 5;
        let dst = self.dst.to_string();
        let i = format!("{:.3}", interval.as_secs_f64());
        let c = count.to_string();
        let args = with_timeout(limit, &["ping", "-n", "-i", &i, "-c", &c, "-W", "1", &dst]);
        let out = self.client.exec(&args)?;
        let times = parse_ping_times(&String::from_utf8_lossy(&out.stdout));
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| BenchError::Parse(e.to_string()))?;
        for t in &times {
            // ≥ 1 µs so a sub-microsecond reading still counts.
            let _ = hist.record((t.round() as u64).max(1));
        }
        Ok(PingRun {
            received: hist.len(),
            hist,
            sent: count,
        })
    }

    /// Ping while one iperf3 TCP stream saturates the path: the pings start 1 s into the run
    /// and end about 1 s before it. Returns the pings and the iperf3 throughput meanwhile.
    pub fn ping_under_load(&self) -> Result<(PingRun, f64), BenchError> {
        let port = next_port();
        let srv = self.start_server(port)?;
        let cli = spawn(
            self.client,
            "iperf3-load",
            self.cpu.endpoints,
            &self.client_args(port, self.secs, &[]),
            &[],
        )?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let span = self.secs.saturating_sub(2).max(1);
        let ping = self.ping(span * 100, Duration::from_millis(10));
        let remaining = Duration::from_secs(u64::from(self.secs) + 25).saturating_sub(t0.elapsed());
        let r = finish(&cli, remaining);
        let _ = finish(&srv, Duration::from_secs(5));
        r?;
        let v = iperf_json(&cli.log()?)?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        Ok((ping?, bps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_lines_are_parsed_in_microseconds() {
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
                   64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.045 ms\n\
                   64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=1.50 ms\n\
                   From 10.0.0.1 icmp_seq=3 Destination Host Unreachable\n\
                   \n--- 10.0.0.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33% packet loss, time 2003ms\n\
                   rtt min/avg/max/mdev = 0.045/0.772/1.500/0.727 ms\n";
        let t = parse_ping_times(out);
        assert_eq!(t.len(), 2);
        assert!((t[0] - 45.0).abs() < 1e-9);
        assert!((t[1] - 1500.0).abs() < 1e-9);
    }

    #[test]
    fn iperf_errors_and_missing_json_are_errors() {
        assert!(iperf_json("iperf3: error - unable to connect").is_err());
        assert!(iperf_json("{\"error\": \"unable to connect to server\"}").is_err());
        let v = iperf_json("warning\n{\"end\": {\"sum_received\": {\"bytes\": 5}}}\n").unwrap();
        assert_eq!(v["end"]["sum_received"]["bytes"].as_u64(), Some(5));
    }

    #[test]
    fn own_process_cpu_is_readable() {
        // Burn a little CPU so the reading is positive on any tick rate.
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let cpu = proc_cpu(std::process::id()).unwrap();
        assert!(cpu > 0.0);
        assert!(proc_cpu(u32::MAX).is_none());
    }
}
