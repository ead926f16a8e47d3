//! `hypha demo`: a small Hypha network on this machine, shown working and taken down again.
//!
//! The network is built with the integration tests' harness (`hypha-testnet`): one network
//! namespace per node, veth links in a ring (plus chords for larger N), and the real `hypha run`
//! with its `hypha-dp` in each namespace. The demo then walks through what a newcomer wants to
//! see — routes converging, a ping across the overlay, a message and its reply through the bus,
//! a link cut and the reroute — one result line per step, and removes everything at the end, on
//! a failed step, and on Ctrl-C or SIGTERM (a signal thread sets a flag that every wait checks;
//! dropping the harness stops the processes and deletes the namespaces and links).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::Args;
use hypha_controlplane::api::{AdminInfo, Metric, RouteInfo};
use hypha_controlplane::bus::client::request;
use hypha_testnet::{parse_ping, Link, LinkOpts, Node, ProcHandle, TestNet};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{SigSet, Signal};
use serde::Serialize;
use serde_json::{json, Value};

/// Smallest and largest `--nodes`: two nodes still get a redundant (double) link; more than 16
/// namespaces with a dataplane each only crowd a small machine.
const MIN_NODES: u8 = 2;
const MAX_NODES: u8 = 16;
/// The tag prefix of the demo's namespaces and veths (`hd<pid>-0-a`, ...), so they are told apart
/// from the tests' (`hy...`).
const TAG_PREFIX: &str = "hd";
/// Every node's API, inside its own namespace.
const API: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8989);
/// Every node's underlay port.
const PORT: u16 = 9651;
/// Short hellos, so that convergence and the reroute take a second or two instead of ~20 s.
const HELLO: &str = "200ms";
/// How long the message step waits for the message and for its reply.
const MESSAGE_WAIT: Duration = Duration::from_secs(5);
/// Pings of the measured ping step.
const PING_COUNT: u32 = 5;
/// How long a probing ping waits for its reply: RTTs here are around a millisecond, and a lost
/// probe should not hide a working path for a whole second.
const PROBE_WAIT: Duration = Duration::from_millis(250);
/// Lines of each node's log shown when a step fails.
const LOG_TAIL_LINES: usize = 10;
/// The bus topic of the demo's message.
const TOPIC: &str = "hypha-demo";

/// Arguments of `hypha demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many nodes to start (2-16). They are linked in a ring (two parallel links for 2
    /// nodes, chords added from 7), so every link can be cut without splitting the network.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(i64::from(MIN_NODES)..=i64::from(MAX_NODES)))]
    pub nodes: u8,
}

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Namespaces and veths need CAP_NET_ADMIN.
    #[error("hypha demo builds network namespaces and must run as root (try: sudo {0} demo)")]
    NotRoot(String),
    /// `hypha-dp` is not where `hypha` looks for it.
    #[error("the dataplane binary {0} is missing: build it next to hypha (cargo build --release --bins)")]
    NoDataplane(PathBuf),
    /// Where this binary lives could not be found out.
    #[error("cannot locate the hypha binary: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] nix::errno::Errno),
    /// The thread that waits for signals could not be started.
    #[error("cannot start the signal thread: {0}")]
    SignalThread(#[source] std::io::Error),
    /// Building or using the namespaces failed.
    #[error(transparent)]
    Net(#[from] hypha_testnet::Error),
    /// A node process ended on its own.
    #[error("node {node}'s hypha exited early; last lines of its log:\n{log}")]
    NodeExited {
        /// The node's name.
        node: String,
        /// The tail of its log.
        log: String,
    },
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// Ctrl-C or SIGTERM.
    #[error("interrupted by {0}")]
    Interrupted(Signal),
}

// ---------------------------------------------------------------------------------------------
// Signals

/// The first SIGINT/SIGTERM/SIGHUP received (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Blocks the stop signals in this thread (and so in every thread started after it; `Command`
/// resets the mask for children) and waits for them on a thread of its own, which only records
/// them: the steps notice at their next check and unwind, and dropping the harness then cleans
/// up. A second Ctrl-C during the cleanup is ignored, so the cleanup always finishes.
fn watch_signals() -> Result<(), DemoError> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().map_err(DemoError::Signals)?;
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                let _ = SIGNAL.compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst);
            }
        })
        .map_err(DemoError::SignalThread)?;
    Ok(())
}

fn check_stop() -> Result<(), DemoError> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        raw => Err(DemoError::Interrupted(
            Signal::try_from(raw).unwrap_or(Signal::SIGINT),
        )),
    }
}

/// Sleeps `d` in short slices, returning early with an error on a stop signal.
fn pause(d: Duration) -> Result<(), DemoError> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Calls `f` every `every` until it returns `Some`, for at most `limit`; `None` on timeout.
fn poll<T>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>, DemoError>,
) -> Result<Option<T>, DemoError> {
    let end = Instant::now() + limit;
    loop {
        check_stop()?;
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        pause(every)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Topology

/// The demo's links as pairs of node indices `(x, y)` with `x < y`; `y` dials `x`.
///
/// A ring, so that every link has a detour; two parallel links for two nodes; from seven nodes on,
/// chords across the ring keep paths short.
fn topology(n: usize) -> Vec<(usize, usize)> {
    if n < 2 {
        return Vec::new();
    }
    if n == 2 {
        return vec![(0, 1), (0, 1)];
    }
    let mut links: Vec<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
    links.push((0, n - 1));
    if n >= 7 {
        for i in (1..n / 2).step_by(3) {
            links.push((i, i + n / 2));
        }
    }
    links
}

/// Hop counts from node 0 (breadth-first search over `links`).
fn hops_from_first(n: usize, links: &[(usize, usize)]) -> Vec<Option<usize>> {
    let mut dist = vec![None; n];
    let mut queue = VecDeque::new();
    if let Some(d) = dist.first_mut() {
        *d = Some(0);
        queue.push_back(0);
    }
    while let Some(u) = queue.pop_front() {
        let du = dist.get(u).copied().flatten().unwrap_or(0);
        for &(x, y) in links {
            let v = if x == u {
                y
            } else if y == u {
                x
            } else {
                continue;
            };
            if let Some(slot) = dist.get_mut(v) {
                if slot.is_none() {
                    *slot = Some(du + 1);
                    queue.push_back(v);
                }
            }
        }
    }
    dist
}

/// The node farthest (in hops) from node 0; the lowest index among equals.
fn farthest(n: usize, links: &[(usize, usize)]) -> usize {
    let dist = hops_from_first(n, links);
    let mut best = 0;
    for (i, d) in dist.iter().enumerate() {
        if d.unwrap_or(0) > dist.get(best).copied().flatten().unwrap_or(0) {
            best = i;
        }
    }
    best
}

fn node_name(i: usize) -> String {
    // Indices stay below MAX_NODES (16), so this is a letter a..p.
    char::from(b'a' + u8::try_from(i % 26).unwrap_or(0)).to_string()
}

fn ring_text(n: usize, links: &[(usize, usize)]) -> String {
    match n {
        2 => "a=b (two parallel links)".into(),
        _ => {
            let mut s: Vec<String> = (0..n).map(node_name).collect();
            s.push(node_name(0));
            let ring = s.join("-");
            let chords: Vec<String> = links
                .iter()
                .skip(n)
                .map(|&(x, y)| format!("{}-{}", node_name(x), node_name(y)))
                .collect();
            if chords.is_empty() {
                format!("ring {ring}")
            } else {
                format!("ring {ring}, chords {}", chords.join(" "))
            }
        }
    }
}

fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn hops_text<T>(path: &[T]) -> String {
    counted(path.len().saturating_sub(1), "hop", "hops")
}

fn path_text(p: &[usize]) -> String {
    p.iter()
        .map(|&i| node_name(i))
        .collect::<Vec<_>>()
        .join("→")
}

// ---------------------------------------------------------------------------------------------
// Output

/// One spinner per step on a terminal (stderr), and one result line per step: on stdout, or on
/// stderr with `--json` (stdout then carries only the summary).
struct Ui {
    json: bool,
    spinner: Option<ProgressBar>,
}

impl Ui {
    fn start(&mut self, name: &str, what: &str) {
        let pb = ProgressBar::new_spinner().with_prefix(name.to_string());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix:<9} {msg} ({elapsed})") {
            pb.set_style(style);
        }
        pb.set_message(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(100));
        self.spinner = Some(pb);
    }

    fn progress(&self, msg: String) {
        if let Some(pb) = &self.spinner {
            pb.set_message(msg);
        }
    }

    fn line(&mut self, ok: bool, name: &str, text: &str) {
        if let Some(pb) = self.spinner.take() {
            pb.finish_and_clear();
        }
        let mark = if ok { "✔" } else { "✘" };
        let line = format!("{mark} {name:<9} {text}");
        // A closed stdout (`hypha demo | head`) must not stop the cleanup.
        if self.json {
            let _ = writeln!(std::io::stderr(), "{line}");
        } else {
            let _ = writeln!(std::io::stdout(), "{line}");
            let _ = std::io::stdout().flush();
        }
    }

    fn note(&mut self, text: &str) {
        if self.json {
            let _ = writeln!(std::io::stderr(), "{text}");
        } else {
            let _ = writeln!(std::io::stdout(), "{text}");
            let _ = std::io::stdout().flush();
        }
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Summary (the `--json` output)

/// What the demo measured; every step's part is absent until the step has run.
#[derive(Debug, Default, Serialize)]
struct Summary {
    ok: bool,
    /// Why the demo stopped early (a failed step or a signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    nodes: usize,
    /// Prefix of every namespace and veth the demo created.
    tag: String,
    links: Vec<[String; 2]>,
    /// Node name -> overlay address.
    addresses: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    converge: Option<ConvergeSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ping: Option<PingSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<MessageSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reroute: Option<RerouteSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cleanup: Option<CleanupSummary>,
}

#[derive(Debug, Serialize)]
struct ConvergeSummary {
    routes: usize,
    /// From the start of the first node until every node had every route.
    secs_since_start: f64,
}

#[derive(Debug, Serialize)]
struct PingSummary {
    from: String,
    to: String,
    path: Vec<String>,
    /// Until the first reply (includes the end-to-end session handshake).
    first_reply_secs: f64,
    sent: u32,
    received: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    rtt_avg_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct MessageSummary {
    ok: bool,
    from: String,
    to: String,
    /// The receiver got the message.
    delivered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    round_trip_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct RerouteSummary {
    ok: bool,
    cut: [String; 2],
    path_before: Vec<String>,
    path_after: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route_changed_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ping_restored_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct CleanupSummary {
    processes: usize,
    namespaces: usize,
    links: usize,
    secs: f64,
    /// Names or PIDs still there afterwards (empty when all went).
    leftovers: Vec<String>,
}

fn names(p: &[usize]) -> Vec<String> {
    p.iter().map(|&i| node_name(i)).collect()
}

// ---------------------------------------------------------------------------------------------
// The network

struct DemoNode {
    name: String,
    node: Node,
    proc: Option<ProcHandle>,
    addr: Option<Ipv6Addr>,
    subnet: Option<(Ipv6Addr, u8)>,
}

struct DemoLink {
    x: usize,
    y: usize,
    link: Link,
}

struct Demo {
    net: TestNet,
    nodes: Vec<DemoNode>,
    links: Vec<DemoLink>,
    hypha: PathBuf,
    dataplane: PathBuf,
}

/// `"4a5:1::/64"` as address and length, so route subnets compare whatever their spelling.
fn parse_subnet(s: &str) -> Option<(Ipv6Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    Some((a.parse().ok()?, l.parse().ok()?))
}

/// The IP of a `udp://ip:port` next hop.
fn next_hop_ip(next_hop: &str) -> Option<IpAddr> {
    let rest = next_hop.strip_prefix("udp://").unwrap_or(next_hop);
    rest.parse::<SocketAddr>().ok().map(|s| s.ip())
}

impl Demo {
    fn node(&self, i: usize) -> Result<&DemoNode, DemoError> {
        self.nodes.get(i).ok_or_else(|| {
            DemoError::Net(hypha_testnet::Error::InvalidArgument(format!(
                "no node {i}"
            )))
        })
    }

    /// A GET on node `i`'s API from inside its namespace; `None` if it does not answer (yet).
    fn get<T: serde::de::DeserializeOwned + Send>(&self, i: usize, path: &str) -> Option<T> {
        let node = &self.nodes.get(i)?.node;
        let path = path.to_string();
        node.run_in(move || {
            let v = hypha_controlplane::client::get_json(API, &path).ok()?;
            serde_json::from_value(v).ok()
        })
        .ok()
        .flatten()
    }

    fn routes(&self, i: usize) -> Option<Vec<RouteInfo>> {
        // A busy machine can make one request miss its timeout; one retry keeps a path lookup
        // from failing on that alone.
        self.get(i, "/api/v1/admin/routes/selected")
            .or_else(|| self.get(i, "/api/v1/admin/routes/selected"))
    }

    /// Node `from`'s selected, finite route to node `to`'s /64.
    fn route(&self, routes: &[RouteInfo], to: usize) -> Option<RouteInfo> {
        let want = self.nodes.get(to)?.subnet?;
        routes
            .iter()
            .find(|r| parse_subnet(&r.subnet) == Some(want) && matches!(r.metric, Metric::Value(_)))
            .cloned()
    }

    fn index_of_addr(&self, a: Ipv6Addr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == Some(a))
    }

    /// The link whose end has underlay address `ip` (a next hop's endpoint).
    fn link_of_ip(&self, ip: IpAddr) -> Option<&DemoLink> {
        self.links
            .iter()
            .find(|l| IpAddr::V4(l.link.a().ipv4()) == ip || IpAddr::V4(l.link.b().ipv4()) == ip)
    }

    /// The path packets from `from` to `to` take now, following each hop's selected route.
    fn path(&self, from: usize, to: usize) -> Option<Vec<usize>> {
        let mut path = vec![from];
        let mut at = from;
        while at != to {
            let routes = self.routes(at)?;
            let r = self.route(&routes, to)?;
            let next = self.index_of_addr(r.next_hop_ip.as_deref()?.parse().ok()?)?;
            if path.contains(&next) || path.len() > self.nodes.len() {
                return None;
            }
            path.push(next);
            at = next;
        }
        Some(path)
    }

    /// A next hop for people: the neighbour's name and the underlay address used to reach it.
    fn hop_text(&self, next_hop: &str) -> String {
        let Some(ip) = next_hop_ip(next_hop) else {
            return next_hop.to_string();
        };
        let owner = self.links.iter().find_map(|l| {
            if IpAddr::V4(l.link.a().ipv4()) == ip {
                Some(l.x)
            } else if IpAddr::V4(l.link.b().ipv4()) == ip {
                Some(l.y)
            } else {
                None
            }
        });
        match owner {
            Some(i) => format!("{} ({ip})", node_name(i)),
            None => ip.to_string(),
        }
    }

    fn check_alive(&self) -> Result<(), DemoError> {
        for n in &self.nodes {
            if let Some(p) = &n.proc {
                if !p.is_running() {
                    return Err(DemoError::NodeExited {
                        node: n.name.clone(),
                        log: p.log_tail(15).unwrap_or_default(),
                    });
                }
            }
        }
        Ok(())
    }

    /// `count` pings (`ping -6`, 0.2 s apart, each waiting up to `wait`) from `from`'s overlay
    /// address to `to`'s; the parsed summary, if ping ran.
    fn ping(
        &self,
        from: usize,
        to: usize,
        count: u32,
        wait: Duration,
    ) -> Result<Option<hypha_testnet::PingStats>, DemoError> {
        let (Some(src), Some(dst)) = (self.node(from)?.addr, self.node(to)?.addr) else {
            return Ok(None);
        };
        let out = self.node(from)?.node.exec([
            "ping".to_string(),
            "-6".into(),
            "-n".into(),
            "-q".into(),
            "-c".into(),
            count.to_string(),
            "-i".into(),
            "0.2".into(),
            "-W".into(),
            format!("{:.2}", wait.as_secs_f64()),
            "-I".into(),
            src.to_string(),
            dst.to_string(),
        ])?;
        Ok(parse_ping(&String::from_utf8_lossy(&out.stdout)))
    }

    fn command(&self, i: usize, peers: &[SocketAddr]) -> Command {
        let name = node_name(i);
        let dir = self.net.log_dir();
        let mut cmd = Command::new(&self.hypha);
        cmd.arg("run")
            .arg("-k")
            .arg(dir.join(format!("{name}.key")))
            .arg("--dataplane-bin")
            .arg(&self.dataplane)
            // Its own runtime directory in the demo's temporary directory (removed at the end)
            // instead of /run/hypha/<address>.
            .arg("--runtime-dir")
            .arg(dir.join(format!("{name}.run")))
            // One worker: up to 16 dataplanes share this machine. No XDP: nothing pinned in
            // bpffs that a killed run could leave behind.
            .args(["--workers", "1", "--xdp", "off", "--hello-interval", HELLO])
            .env("RUST_LOG", "info")
            // The logs are files, shown on failure: no colour codes (hypha-dp inherits this).
            .env("NO_COLOR", "1");
        for p in peers {
            cmd.arg("--peers").arg(format!("udp://{p}"));
        }
        cmd
    }
}

// ---------------------------------------------------------------------------------------------
// Steps

fn preflight() -> Result<(PathBuf, PathBuf), DemoError> {
    let hypha = std::env::current_exe().map_err(DemoError::CurrentExe)?;
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot(hypha.display().to_string()));
    }
    let dataplane = hypha.with_file_name("hypha-dp");
    if !dataplane.is_file() {
        return Err(DemoError::NoDataplane(dataplane));
    }
    Ok((hypha, dataplane))
}

fn step_network<'a>(
    ui: &mut Ui,
    n: usize,
    hypha: PathBuf,
    dataplane: PathBuf,
    summary: &mut Summary,
    slot: &'a mut Option<Demo>,
) -> Result<&'a mut Demo, DemoError> {
    ui.start("network", "creating namespaces and links");
    let t = Instant::now();
    let net = TestNet::with_prefix(TAG_PREFIX, "demo")?;
    summary.tag = net.tag().to_string();
    // In the caller's hands from here on, so that a failure half-way is cleaned up (and reported)
    // like any other.
    let demo = slot.insert(Demo {
        net,
        nodes: Vec::new(),
        links: Vec::new(),
        hypha,
        dataplane,
    });
    for i in 0..n {
        check_stop()?;
        let name = node_name(i);
        let node = demo.net.add_node(&name)?;
        demo.nodes.push(DemoNode {
            name,
            node,
            proc: None,
            addr: None,
            subnet: None,
        });
    }
    let topo = topology(n);
    for &(x, y) in &topo {
        check_stop()?;
        let link = demo.net.link(
            &demo.node(x)?.node,
            &demo.node(y)?.node,
            LinkOpts::default(),
        )?;
        summary.links.push([node_name(x), node_name(y)]);
        demo.links.push(DemoLink { x, y, link });
    }
    ui.line(
        true,
        "network",
        &format!(
            "{n} namespaces {tag}-{{a..{last}}}, {} veth links: {} ({:.1} s)",
            topo.len(),
            ring_text(n, &topo),
            t.elapsed().as_secs_f64(),
            tag = demo.net.tag(),
            last = node_name(n - 1),
        ),
    );
    Ok(demo)
}

fn step_start(ui: &mut Ui, demo: &mut Demo, summary: &mut Summary) -> Result<Instant, DemoError> {
    let n = demo.nodes.len();
    ui.start("nodes", "starting hypha run + hypha-dp in every namespace");
    let started = Instant::now();
    for i in 0..n {
        check_stop()?;
        let peers: Vec<SocketAddr> = demo
            .links
            .iter()
            .filter(|l| l.y == i)
            .map(|l| SocketAddr::new(IpAddr::V4(l.link.a().ipv4()), PORT))
            .collect();
        let cmd = demo.command(i, &peers);
        let name = node_name(i);
        let proc = demo.node(i)?.node.spawn(&format!("hypha-{name}"), cmd)?;
        if let Some(slot) = demo.nodes.get_mut(i) {
            slot.proc = Some(proc);
        }
    }
    let mut up = 0;
    let done = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        demo.check_alive()?;
        let mut infos = Vec::new();
        for i in 0..n {
            match demo.get::<AdminInfo>(i, "/api/v1/admin") {
                Some(info) => infos.push(info),
                None => break,
            }
        }
        up = infos.len();
        ui.progress(format!("{up}/{n} node APIs answer"));
        Ok((infos.len() == n).then_some(infos))
    })?;
    let Some(infos) = done else {
        return Err(DemoError::Timeout(format!(
            "only {up} of {n} nodes answered on their API within 30 s"
        )));
    };
    for (slot, info) in demo.nodes.iter_mut().zip(infos) {
        slot.addr = info.node_ip.parse().ok();
        slot.subnet = parse_subnet(&info.node_subnet);
        summary
            .addresses
            .insert(slot.name.clone(), info.node_ip.clone());
    }
    let took = started.elapsed();
    summary.start_secs = Some(secs(took));
    let a = demo.node(0)?;
    ui.line(
        true,
        "nodes",
        &format!(
            "{n} × hypha run (+ hypha-dp) up in {:.1} s; a is {}",
            took.as_secs_f64(),
            a.addr.map(|x| x.to_string()).unwrap_or_default()
        ),
    );
    Ok(started)
}

fn step_converge(
    ui: &mut Ui,
    demo: &Demo,
    started: Instant,
    summary: &mut Summary,
) -> Result<(), DemoError> {
    let n = demo.nodes.len();
    let want = n * (n - 1);
    ui.start(
        "routes",
        "waiting for every node to select a route to every other",
    );
    let mut have = 0;
    let done = poll(Duration::from_secs(60), Duration::from_millis(100), || {
        demo.check_alive()?;
        have = 0;
        for i in 0..n {
            let routes = demo.routes(i).unwrap_or_default();
            have += (0..n)
                .filter(|&j| j != i && demo.route(&routes, j).is_some())
                .count();
        }
        ui.progress(format!("{have}/{want} routes selected"));
        Ok((have == want).then_some(()))
    })?;
    if done.is_none() {
        return Err(DemoError::Timeout(format!(
            "routes did not converge within 60 s: {have} of {want} selected"
        )));
    }
    let took = started.elapsed();
    summary.converge = Some(ConvergeSummary {
        routes: want,
        secs_since_start: secs(took),
    });
    ui.line(
        true,
        "routes",
        &format!(
            "converged: {want} routes ({n} nodes × {} destinations) selected {:.1} s after start",
            n - 1,
            took.as_secs_f64()
        ),
    );
    Ok(())
}

fn step_ping(ui: &mut Ui, demo: &Demo, far: usize, summary: &mut Summary) -> Result<(), DemoError> {
    let (from, to) = (node_name(0), node_name(far));
    let dst = demo
        .node(far)?
        .addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    ui.start("ping", &format!("ping -6 {dst} from {from}"));
    let t = Instant::now();
    // The first packet waits for the end-to-end session handshake.
    let first = poll(Duration::from_secs(20), Duration::from_millis(100), || {
        Ok(demo.ping(0, far, 1, PROBE_WAIT)?.filter(|s| s.received > 0))
    })?;
    if first.is_none() {
        return Err(DemoError::Timeout(format!(
            "no ping reply from {to} ({dst}) within 20 s"
        )));
    }
    let first_reply = t.elapsed();
    ui.progress(format!("{PING_COUNT} pings {from} → {to}"));
    let stats = demo.ping(0, far, PING_COUNT, Duration::from_secs(1))?;
    let path = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        Ok(demo.path(0, far))
    })?
    .unwrap_or_default();
    let (sent, received, avg) = stats
        .map(|s| (s.transmitted, s.received, s.rtt_avg))
        .unwrap_or((PING_COUNT, 0, None));
    summary.ping = Some(PingSummary {
        from: from.clone(),
        to: to.clone(),
        path: names(&path),
        first_reply_secs: secs(first_reply),
        sent,
        received,
        rtt_avg_ms: avg.map(ms),
    });
    if received == 0 {
        return Err(DemoError::Timeout(format!(
            "{from} → {to}: the first ping was answered, the next {sent} were not"
        )));
    }
    ui.line(
        true,
        "ping",
        &format!(
            "{from} → {to} ({dst}), {} {}: {received}/{sent} replies, RTT avg {} (first reply after {:.1} s)",
            hops_text(&path),
            path_text(&path),
            avg.map(ms).map_or("-".into(), |m| format!("{m:.2} ms")),
            first_reply.as_secs_f64()
        ),
    );
    Ok(())
}

/// Percent-encodes base64 for a query string.
fn query_b64(s: &str) -> String {
    B64.encode(s)
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// The receiver's side: take the demo's message (long poll) and answer it. Returns the payload.
fn answer_message(node: &Node, reply_to: String) -> Result<String, String> {
    node.run_in(move || {
        let wait = MESSAGE_WAIT.as_secs();
        let path = format!("/api/v1/messages?timeout={wait}&topic={}", query_b64(TOPIC));
        let r = request(
            API,
            "GET",
            &path,
            None,
            MESSAGE_WAIT + Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())?;
        match r.status {
            200 => {}
            204 => return Err(format!("received nothing within {wait} s")),
            s => return Err(format!("receive answered {s}")),
        }
        let m: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        let id = m["id"].as_str().ok_or("no id in the received message")?;
        let payload = B64
            .decode(m["payload"].as_str().unwrap_or_default())
            .map_err(|_| "payload is not base64".to_string())?;
        let body = json!({
            "dst": { "ip": reply_to },
            "topic": B64.encode(TOPIC),
            "payload": B64.encode(format!("pong: {}", String::from_utf8_lossy(&payload))),
        });
        let r = request(
            API,
            "POST",
            &format!("/api/v1/messages/reply/{id}"),
            Some(body.to_string().as_bytes()),
            Duration::from_secs(5),
        )
        .map_err(|e| e.to_string())?;
        if r.status != 204 {
            return Err(format!("reply answered {}", r.status));
        }
        Ok(String::from_utf8_lossy(&payload).into_owned())
    })
    .map_err(|e| e.to_string())?
}

fn step_message(
    ui: &mut Ui,
    demo: &Demo,
    far: usize,
    summary: &mut Summary,
) -> Result<bool, DemoError> {
    check_stop()?;
    let (from, to) = (node_name(0), node_name(far));
    let src = demo
        .node(0)?
        .addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    let dst = demo
        .node(far)?
        .addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    ui.start(
        "message",
        &format!("{from} → {to} through the bus, waiting for the reply"),
    );
    let receiver = {
        let node = demo.node(far)?.node.clone();
        let src = src.clone();
        std::thread::spawn(move || answer_message(&node, src))
    };
    let text = format!("hello from {from}");
    let body = json!({
        "dst": { "ip": dst },
        "topic": B64.encode(TOPIC),
        "payload": B64.encode(&text),
    });
    let t = Instant::now();
    let sent = demo.node(0)?.node.run_in(move || {
        request(
            API,
            "POST",
            &format!("/api/v1/messages?reply_timeout={}", MESSAGE_WAIT.as_secs()),
            Some(body.to_string().as_bytes()),
            MESSAGE_WAIT + Duration::from_secs(5),
        )
    })?;
    let rtt = t.elapsed();
    // The receiver gives up after MESSAGE_WAIT as well, so this join is bounded.
    let received = receiver
        .join()
        .unwrap_or_else(|_| Err("the receiving thread panicked".into()));
    let (reply, error) = match sent {
        Ok(r) if r.status == 200 => {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let p = B64
                .decode(v["payload"].as_str().unwrap_or_default())
                .map(|p| String::from_utf8_lossy(&p).into_owned())
                .ok();
            (p, None)
        }
        Ok(r) if r.status == 408 => (
            None,
            Some(format!("no reply within {} s", MESSAGE_WAIT.as_secs())),
        ),
        Ok(r) => (
            None,
            Some(format!(
                "the API answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body).trim()
            )),
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    check_stop()?;
    let ok = reply.is_some();
    let line = match (&reply, &received) {
        (Some(reply), _) => format!(
            "{from} → {to}: sent {text:?}, reply {reply:?} after {:.1} ms round trip",
            rtt.as_secs_f64() * 1000.0
        ),
        (None, Ok(_)) => format!(
            "{from} → {to}: {to} got the message and answered, but {}",
            error.clone().unwrap_or_default()
        ),
        (None, Err(why)) => format!(
            "{from} → {to}: {}; {to} {why}",
            error.clone().unwrap_or_default()
        ),
    };
    ui.line(ok, "message", &line);
    summary.message = Some(MessageSummary {
        ok,
        from,
        to,
        delivered: received.is_ok(),
        round_trip_ms: ok.then(|| ms(rtt)),
        reply,
        error: if ok {
            None
        } else {
            Some(match received {
                Ok(_) => error.unwrap_or_default(),
                Err(why) => format!("{}; {} {why}", error.unwrap_or_default(), node_name(far)),
            })
        },
    });
    Ok(ok)
}

fn step_reroute(
    ui: &mut Ui,
    demo: &Demo,
    far: usize,
    summary: &mut Summary,
) -> Result<bool, DemoError> {
    check_stop()?;
    let (from, to) = (node_name(0), node_name(far));
    ui.start("reroute", &format!("finding {from}'s path to {to}"));
    let found = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let routes = demo.routes(0).unwrap_or_default();
        let Some(route) = demo.route(&routes, far) else {
            return Ok(None);
        };
        let link = next_hop_ip(&route.next_hop).and_then(|ip| demo.link_of_ip(ip));
        Ok(link.zip(demo.path(0, far)).map(|(l, p)| (route, l, p)))
    })?;
    let Some((before_route, cut, path_before)) = found else {
        let msg = format!("{from} has no route to {to} to cut");
        ui.line(false, "reroute", &msg);
        summary.reroute = Some(RerouteSummary {
            ok: false,
            cut: [from, to],
            path_before: Vec::new(),
            path_after: Vec::new(),
            route_changed_secs: None,
            ping_restored_secs: None,
            error: Some(msg),
        });
        return Ok(false);
    };
    let link = cut;
    let cut_names = [node_name(link.x), node_name(link.y)];
    ui.progress(format!(
        "cutting {}–{} (both veth ends down)",
        cut_names[0], cut_names[1]
    ));
    let t = Instant::now();
    link.link.set_up(false)?;
    let old_hop = before_route.next_hop.clone();
    let mut new_hop = String::new();
    let changed = poll(Duration::from_secs(30), Duration::from_millis(50), || {
        let routes = demo.routes(0).unwrap_or_default();
        Ok(demo
            .route(&routes, far)
            .filter(|r| r.next_hop != old_hop)
            .map(|r| {
                new_hop = r.next_hop;
                t.elapsed()
            }))
    })?;
    let mut restored = None;
    if changed.is_some() {
        ui.progress("route changed; pinging until replies come back".into());
        restored = poll(Duration::from_secs(30), Duration::from_millis(50), || {
            Ok(demo
                .ping(0, far, 1, PROBE_WAIT)?
                .filter(|s| s.received > 0)
                .map(|_| t.elapsed()))
        })?;
    }
    let path_after = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        Ok(demo.path(0, far))
    })?
    .unwrap_or_default();
    let ok = changed.is_some() && restored.is_some();
    let error = match (changed, restored) {
        (None, _) => Some(format!("{from}'s route to {to} did not change within 30 s")),
        (Some(_), None) => Some(format!(
            "no ping reply {from} → {to} within 30 s of the new route"
        )),
        _ => None,
    };
    let line = match (changed, restored) {
        (Some(c), Some(r)) => format!(
            "cut {}–{}: {from}'s route to {to} moved after {:.1} s (next hop {} → {}), ping answered again after {:.1} s; path {} → {}",
            cut_names[0],
            cut_names[1],
            c.as_secs_f64(),
            demo.hop_text(&old_hop),
            demo.hop_text(&new_hop),
            r.as_secs_f64(),
            path_text(&path_before),
            path_text(&path_after)
        ),
        _ => format!(
            "cut {}–{}: {}",
            cut_names[0],
            cut_names[1],
            error.clone().unwrap_or_default()
        ),
    };
    ui.line(ok, "reroute", &line);
    summary.reroute = Some(RerouteSummary {
        ok,
        cut: cut_names,
        path_before: names(&path_before),
        path_after: names(&path_after),
        route_changed_secs: changed.map(secs),
        ping_restored_secs: restored.map(secs),
        error,
    });
    Ok(ok)
}

/// The last lines of every node's log, on stderr.
fn print_log_tails(demo: &Demo) {
    for n in &demo.nodes {
        let Some(p) = &n.proc else { continue };
        eprintln!(
            "----- last lines of node {}'s log ({}) -----",
            n.name,
            p.log_path().display()
        );
        match p.log_tail(LOG_TAIL_LINES) {
            Ok(tail) => eprintln!("{tail}"),
            Err(e) => eprintln!("(cannot read it: {e})"),
        }
    }
}

/// PIDs of every process inside the demo's namespaces (the `hypha run`s and their `hypha-dp`s).
fn namespace_pids(demo: &Demo) -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    for n in &demo.nodes {
        // Its own process group: a second Ctrl-C must not cut the cleanup short.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", n.node.netns()])
            .process_group(0)
            .output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter(|p| *p != me)
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

/// True while `pid` exists and is not a zombie.
fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn step_cleanup(ui: &mut Ui, demo: Demo, summary: &mut Summary) -> bool {
    ui.start("cleanup", "stopping nodes, removing namespaces and links");
    let t = Instant::now();
    let pids = namespace_pids(&demo);
    let tag = demo.net.tag().to_string();
    let namespaces = demo.nodes.len();
    let links = demo.links.len();
    // The harness's Drop: SIGTERM to every node (which stops its dataplane), SIGKILL after a
    // grace period, anything left in the namespaces killed by PID, veths and namespaces deleted.
    drop(demo);
    let mut leftovers = Vec::new();
    match TestNet::leftovers(&tag) {
        Ok(l) => {
            leftovers.extend(l.namespaces.into_iter().map(|n| format!("namespace {n}")));
            leftovers.extend(l.links.into_iter().map(|n| format!("link {n}")));
        }
        Err(e) => leftovers.push(format!("cannot check: {e}")),
    }
    // A SIGKILLed process lingers until its parent (or init) reaps it; give that a moment.
    let end = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&p| pid_alive(p)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    leftovers.extend(
        pids.iter()
            .filter(|&&p| pid_alive(p))
            .map(|p| format!("process {p}")),
    );
    let ok = leftovers.is_empty();
    let took = t.elapsed();
    ui.line(
        ok,
        "cleanup",
        &if ok {
            format!(
                "stopped {}, removed {} and {} in {:.1} s; nothing left",
                counted(pids.len(), "process", "processes"),
                counted(namespaces, "namespace", "namespaces"),
                counted(links, "link", "links"),
                took.as_secs_f64()
            )
        } else {
            format!("left behind: {}", leftovers.join(", "))
        },
    );
    summary.cleanup = Some(CleanupSummary {
        processes: pids.len(),
        namespaces,
        links,
        secs: secs(took),
        leftovers,
    });
    ok
}

fn summary_lines(s: &Summary) -> Vec<String> {
    let mut out = vec![format!(
        "summary: {} nodes, {} links",
        s.nodes,
        s.links.len()
    )];
    if let (Some(start), Some(c)) = (s.start_secs, &s.converge) {
        out.push(format!(
            "  up in {start:.1} s, {} routes converged {:.1} s after start",
            c.routes, c.secs_since_start
        ));
    }
    if let Some(p) = &s.ping {
        out.push(format!(
            "  ping {} → {} over {}: {}/{} replies, RTT avg {}",
            p.from,
            p.to,
            hops_text(&p.path),
            p.received,
            p.sent,
            p.rtt_avg_ms.map_or("-".into(), |m| format!("{m:.2} ms"))
        ));
    }
    if let Some(m) = &s.message {
        out.push(match m.round_trip_ms {
            Some(rt) => format!(
                "  message {} → {} and reply: {rt:.1} ms round trip",
                m.from, m.to
            ),
            None => format!(
                "  message {} → {}: FAILED ({})",
                m.from,
                m.to,
                m.error.clone().unwrap_or_default()
            ),
        });
    }
    if let Some(r) = &s.reroute {
        out.push(match (r.route_changed_secs, r.ping_restored_secs) {
            (Some(c), Some(p)) => format!(
                "  cut {}–{}: rerouted in {c:.1} s, traffic flowing again after {p:.1} s",
                r.cut[0], r.cut[1]
            ),
            _ => format!(
                "  cut {}–{}: FAILED ({})",
                r.cut[0],
                r.cut[1],
                r.error.clone().unwrap_or_default()
            ),
        });
    }
    out
}

/// Runs `hypha demo`; prints its own errors. Exit code 0 when every step worked, 1 when one
/// failed, 128 + signal number when interrupted, 2 when it could not start.
pub fn run(args: &DemoArgs, json: bool) -> ExitCode {
    let (hypha, dataplane) = match preflight() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = watch_signals() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let n = usize::from(args.nodes);
    let mut ui = Ui {
        json,
        spinner: None,
    };
    let mut summary = Summary {
        nodes: n,
        ..Summary::default()
    };
    ui.note(&format!(
        "hypha demo: {n} nodes in network namespaces on this machine (Ctrl-C stops and cleans up)"
    ));

    let mut demo = None;
    let mut checks_ok = true;
    let result = (|| -> Result<(), DemoError> {
        let d = step_network(&mut ui, n, hypha, dataplane, &mut summary, &mut demo)?;
        let started = step_start(&mut ui, d, &mut summary)?;
        step_converge(&mut ui, d, started, &mut summary)?;
        let far = farthest(n, &topology(n));
        step_ping(&mut ui, d, far, &mut summary)?;
        // The message and the reroute are shown even if the other one fails.
        checks_ok &= step_message(&mut ui, d, far, &mut summary)?;
        checks_ok &= step_reroute(&mut ui, d, far, &mut summary)?;
        Ok(())
    })();
    if let Err(e) = &result {
        let step = ui
            .spinner
            .as_ref()
            .map(|pb| pb.prefix().trim().to_string())
            .unwrap_or_else(|| "demo".into());
        ui.line(false, &step, &e.to_string());
        summary.error = Some(e.to_string());
        // The logs go with the temporary directory at cleanup: show their ends while they exist.
        if !matches!(e, DemoError::Interrupted(_) | DemoError::NodeExited { .. }) {
            if let Some(d) = &demo {
                print_log_tails(d);
            }
        }
    }
    let clean = match demo {
        Some(d) => step_cleanup(&mut ui, d, &mut summary),
        None => true,
    };
    summary.ok = result.is_ok() && checks_ok && clean;
    if json {
        match serde_json::to_string_pretty(&summary) {
            Ok(s) => {
                let _ = writeln!(std::io::stdout(), "{s}");
            }
            Err(e) => eprintln!("error: cannot encode the summary: {e}"),
        }
    } else if result.is_ok() {
        for l in summary_lines(&summary) {
            ui.note(&l);
        }
    }
    match result {
        Err(DemoError::Interrupted(sig)) => {
            ExitCode::from(128 + u8::try_from(sig as i32).unwrap_or(0))
        }
        _ if summary.ok => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connected after removing `skip` (an index into `links`, or none).
    fn connected(n: usize, links: &[(usize, usize)], skip: Option<usize>) -> bool {
        let kept: Vec<(usize, usize)> = links
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, l)| *l)
            .collect();
        hops_from_first(n, &kept).iter().all(Option::is_some)
    }

    #[test]
    fn every_topology_survives_any_single_cut() {
        for n in usize::from(MIN_NODES)..=usize::from(MAX_NODES) {
            let links = topology(n);
            assert!(connected(n, &links, None), "n={n}");
            for cut in 0..links.len() {
                assert!(
                    connected(n, &links, Some(cut)),
                    "n={n} cut {:?}",
                    links[cut]
                );
            }
            for &(x, y) in &links {
                assert!(x < y && y < n, "n={n} {x}-{y}");
            }
        }
    }

    #[test]
    fn the_ping_goes_to_the_far_side() {
        assert_eq!(farthest(2, &topology(2)), 1);
        assert_eq!(farthest(4, &topology(4)), 2);
        assert_eq!(farthest(5, &topology(5)), 2);
        let links = topology(16);
        let far = farthest(16, &links);
        let dist = hops_from_first(16, &links);
        assert!(dist.iter().all(|d| d.unwrap() <= dist[far].unwrap()));
        assert!(dist[far].unwrap() >= 2);
    }

    #[test]
    fn names_and_texts() {
        assert_eq!(node_name(0), "a");
        assert_eq!(node_name(15), "p");
        assert_eq!(ring_text(4, &topology(4)), "ring a-b-c-d-a");
        assert_eq!(ring_text(2, &topology(2)), "a=b (two parallel links)");
        assert!(ring_text(8, &topology(8)).contains("chords b-f"));
        assert_eq!(path_text(&[0, 3, 2]), "a→d→c");
        assert_eq!(
            next_hop_ip("udp://10.0.3.2:9651"),
            Some("10.0.3.2".parse().unwrap())
        );
        assert_eq!(next_hop_ip("nonsense"), None);
        assert_eq!(
            parse_subnet("4a5:1::/64"),
            Some(("4a5:1::".parse().unwrap(), 64))
        );
        assert_eq!(query_b64(TOPIC), "aHlwaGEtZGVtbw%3D%3D");
    }
}
