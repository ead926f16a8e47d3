//! # hypha-testnet — network namespaces for integration tests
//!
//! Hypha's integration tests run real processes over real veth links (DESIGN.md, principle 6).
//! This crate builds such a network for one test and takes it down again, even when the test
//! panics, so tests can run in parallel with each other and with other users of the machine.
//! Needs root, iproute2, nftables and iputils-ping.
//!
//! Use it as a dev-dependency: `hypha-testnet.workspace = true` under `[dev-dependencies]` (the
//! controlplane also uses it as a normal one, for `hypha demo`; it must not depend on any of ours).
//!
//! ```no_run
//! use std::net::IpAddr;
//! use std::time::Duration;
//! use hypha_testnet::{wait_until, LinkOpts, TestNet};
//!
//! # fn main() -> hypha_testnet::Result<()> {
//! let net = TestNet::new("my_test")?;            // names: hy<pid>-<n>-a, ...
//! let a = net.add_node("a")?;                    // a namespace with lo up
//! let b = net.add_node("b")?;
//! let ab = net.link(&a, &b, LinkOpts::default().with_loss_to_b(10.0))?;
//! // a: 10.0.0.1/24 + fd00::1/64 on ab.a().ifname(); b: 10.0.0.2 + fd00::2 on ab.b().ifname()
//! let stats = a.ping(IpAddr::V4(ab.b().ipv4()), 20, Duration::from_millis(10))?;
//! println!("lost {:.0} %", 100.0 * stats.loss_ratio());
//!
//! // A daemon: stdout+stderr to <net.log_dir()>/hypha-b.log, stopped at drop.
//! // (In the crate that builds the binary: `env!("CARGO_BIN_EXE_hypha")`.)
//! let mut cmd = std::process::Command::new("/path/to/hypha");
//! cmd.args(["--peers", &format!("udp://{}:9651", ab.a().ipv4())]);
//! let daemon = b.spawn("hypha-b", cmd)?;
//! daemon.wait_for_log("listening", Duration::from_secs(10))?;
//! wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
//!     a.ping(IpAddr::V4(ab.b().ipv4()), 1, Duration::from_millis(10))
//!         .is_ok_and(|s| s.received == 1)
//! })?;
//!
//! // Rust code inside a namespace (sockets stay in it afterwards):
//! let sock = a.run_in(|| std::net::UdpSocket::bind("0.0.0.0:0")).map(|r| r.ok())?;
//! # let _ = sock;
//! let tag = net.tag().to_string();
//! drop(net); // stops daemon, deletes veths and namespaces
//! assert!(TestNet::leftovers(&tag)?.is_empty());
//! # Ok(()) }
//! ```
//!
//! ## What is where
//! - [`TestNet`]: [`new`](TestNet::new), [`with_prefix`](TestNet::with_prefix), [`add_node`](TestNet::add_node),
//!   [`link`](TestNet::link), [`udp_delay_relay`](TestNet::udp_delay_relay),
//!   [`tag`](TestNet::tag), [`log_dir`](TestNet::log_dir), [`leftovers`](TestNet::leftovers).
//! - [`Node`]: [`exec`](Node::exec), [`exec_ok`](Node::exec_ok),
//!   [`exec_command`](Node::exec_command), [`spawn`](Node::spawn),
//!   [`spawn_args`](Node::spawn_args), [`run_in`](Node::run_in), [`ping`](Node::ping),
//!   [`sysctl`](Node::sysctl), [`enable_forwarding`](Node::enable_forwarding).
//! - [`Link`] / [`LinkEnd`]: addresses and interface names of each end,
//!   [`set_up`](Link::set_up) to cut and restore, [`set_loss`](Link::set_loss).
//! - [`ProcHandle`]: [`pid`](ProcHandle::pid), [`kill`](ProcHandle::kill),
//!   [`wait_exit`](ProcHandle::wait_exit), [`wait_for_log`](ProcHandle::wait_for_log),
//!   [`stop`](ProcHandle::stop), [`log`](ProcHandle::log).
//! - [`Relay`], [`wait_until`], [`retry_interrupted`], [`parse_ping`], [`ensure_bpffs`].
//!
//! ## Names
//! Every kernel object gets the net's [`tag`](TestNet::tag), `hy<pid base36>-<counter base36>`
//! (e.g. `hy2n9c-3`; [`TestNet::with_prefix`] replaces the `hy`): namespaces are `<tag>-<node>`, veth ends `<tag>-<link><a|b>` (at most 15
//! bytes), the hidden middle namespace of a delayed link `<tag>_d<link>`. veths are created
//! directly inside the namespaces, never in the default one. Only objects with the tag are ever
//! deleted; [`TestNet::leftovers`] lists what is left of a tag.
//!
//! ## Teardown (in `Drop`)
//! Relays and delay bridges stop; every spawned process gets SIGTERM (its whole process group),
//! then SIGKILL after [`STOP_GRACE`], and is reaped; any other process still inside one of the
//! namespaces is killed by PID; the veths and namespaces are deleted. If the thread is panicking,
//! the tail of every process log is printed to stderr and the log directory is kept; otherwise it
//! is removed. Teardown errors are printed, never panicked on. A test process killed outright
//! (SIGKILL) cannot run `Drop`: its namespaces and processes stay until removed by hand
//! (`ip netns list | grep ^hy`).
//!
//! ## Loss and delay
//! No `sch_netem` on this kernel. Loss is an nftables `numgen random` drop rule in the receiving
//! namespace ([`LinkOpts::loss_to_a`]/[`loss_to_b`](LinkOpts::loss_to_b), [`Link::set_loss`]);
//! it drops IPv4/IPv6 packets, not ARP. Delay comes in two kinds:
//! - [`LinkOpts::delay`]: the whole link is delayed (every frame, every protocol, ping included)
//!   by a user-space layer-2 bridge in a hidden middle namespace. Nothing to configure in the
//!   nodes; use this by default.
//! - [`TestNet::udp_delay_relay`]: a UDP-only relay between one listening address and one target,
//!   for delaying a single peering (point node A's peer address at the relay instead of at B).
//!
//! Both hold each packet for a fixed time on a thread of the test process, so the delay is a
//! lower bound (plus scheduling noise on a busy machine): assert `rtt >= 2 * delay`, never an
//! upper bound.
#![warn(missing_docs)]

mod bridge;
pub mod dp;
mod error;
mod link;
mod node;
mod ns;
mod ping;
mod process;
mod relay;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use error::{Error, Result};
pub use link::{Link, LinkEnd, LinkOpts, Side};
pub use nix::sys::signal::Signal;
pub use node::Node;
pub use ping::{parse_ping, PingStats};
pub use process::{ProcExit, ProcHandle, STOP_GRACE};
pub use relay::Relay;

/// Lines of each process log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;
/// Linux's limit on interface names (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;
/// Node names: `[a-z0-9]`, at most this long.
const NODE_NAME_MAX: usize = 16;
/// The tag prefix of [`TestNet::new`]; [`TestNet::with_prefix`] takes others of at most its length.
const DEFAULT_PREFIX: &str = "hy";

/// A veth pair to delete at teardown: deleting one end removes both.
struct VethRecord {
    netns: String,
    ifname: String,
}

pub(crate) struct State {
    pub(crate) torn_down: bool,
    /// Namespaces in creation order (nodes and delay middles).
    namespaces: Vec<String>,
    node_names: Vec<String>,
    veths: Vec<VethRecord>,
    next_link: u32,
    pub(crate) procs: Vec<ProcHandle>,
    relays: Vec<Relay>,
    bridges: Vec<bridge::Bridge>,
    log_names: Vec<String>,
}

/// What nodes, links and handles share with their `TestNet`.
pub(crate) struct Shared {
    tag: String,
    hint: String,
    log_dir: PathBuf,
    state: Mutex<State>,
}

impl Shared {
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere mid-update; the lists stay usable for teardown.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_torn_down(&self) -> bool {
        self.lock_state().torn_down
    }

    /// A fresh log file path for a process called `name` (`name.log`, `name-2.log`, …).
    pub(crate) fn new_log_path(&self, name: &str) -> Result<PathBuf> {
        let clean = sanitize(name, 64);
        let mut state = self.lock_state();
        let count = state.log_names.iter().filter(|n| **n == clean).count();
        state.log_names.push(clean.clone());
        let file = if count == 0 {
            format!("{clean}.log")
        } else {
            format!("{clean}-{}.log", count + 1)
        };
        Ok(self.log_dir.join(file))
    }
}

/// A test's private network: namespaces, links, processes and relays, all removed on drop.
///
/// `TestNet` is `Send + Sync`; its methods take `&self`, so it can be shared with helper threads.
/// [`Node`], [`Link`], [`ProcHandle`] and [`Relay`] are cheap handles that do not borrow it; they
/// stop working once it is dropped.
pub struct TestNet {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TestNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNet")
            .field("tag", &self.shared.tag)
            .field("hint", &self.shared.hint)
            .finish()
    }
}

static NET_COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The start of the tag of every net a process with `pid` makes with tag prefix `prefix`:
/// `<prefix><pid in base 36>-` (e.g. `hy2n9c-`); the net's counter follows it.
pub fn tag_prefix(prefix: &str, pid: u32) -> String {
    format!("{prefix}{}-", base36(u64::from(pid)))
}

fn sanitize(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if clean.is_empty() {
        "x".into()
    } else {
        clean
    }
}

/// True if kernel object `name` belongs to the net tagged `tag`.
fn owned_by(name: &str, tag: &str) -> bool {
    name.strip_prefix(tag)
        .is_some_and(|rest| rest.starts_with(['-', '_']))
}

/// `ip netns add`, one at a time per process: the first call on a fresh machine sets up the
/// shared `/run/netns` mount, and two first calls racing could stack two such mounts.
fn add_netns(name: &str) -> Result<()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    ns::host_ok(["ip", "netns", "add", name]).map(drop)
}

fn netns_names() -> Result<Vec<String>> {
    match std::fs::read_dir(ns::NETNS_DIR) {
        Ok(dir) => Ok(dir
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(format!("list {}", ns::NETNS_DIR), e)),
    }
}

/// Interface names in the test process's own (default) namespace, from `ip -o link`.
fn host_link_names() -> Result<Vec<String>> {
    let out = ns::host_ok(["ip", "-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect())
}

/// What is left in the kernel of a tag; see [`TestNet::leftovers`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Namespaces (`ip netns list`) carrying the tag.
    pub namespaces: Vec<String>,
    /// Interfaces in the default namespace (`ip -o link`) carrying the tag.
    pub links: Vec<String>,
}

impl Leftovers {
    /// True when nothing of the tag remains.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.links.is_empty()
    }
}

impl TestNet {
    /// Creates an empty net. `name_hint` (e.g. the test's name) only names the log directory,
    /// `$TMPDIR/hypha-testnet/<tag>-<hint>/`, and messages.
    pub fn new(name_hint: &str) -> Result<TestNet> {
        TestNet::with_prefix(DEFAULT_PREFIX, name_hint)
    }

    /// Like [`new`](TestNet::new), with another prefix than `hy` in the tag: 1–2 lowercase ASCII
    /// letters (longer ones would push veth names past 15 bytes). `hypha demo` uses `hd`, so its
    /// objects are told apart from the tests' at a glance.
    pub fn with_prefix(prefix: &str, name_hint: &str) -> Result<TestNet> {
        if prefix.is_empty()
            || prefix.len() > DEFAULT_PREFIX.len()
            || !prefix.bytes().all(|c| c.is_ascii_lowercase())
        {
            return Err(Error::InvalidArgument(format!(
                "tag prefix `{prefix}`: use 1-2 lowercase ASCII letters"
            )));
        }
        let pid = std::process::id();
        let existing = netns_names()?;
        let tag = loop {
            let n = NET_COUNTER.fetch_add(1, Ordering::Relaxed);
            let tag = format!("{}{}", tag_prefix(prefix, pid), base36(u64::from(n)));
            // A namespace with this tag can only be a leftover of a dead process with our PID.
            if !existing.iter().any(|name| owned_by(name, &tag)) {
                break tag;
            }
        };
        let hint = sanitize(name_hint, 48);
        let log_dir = std::env::temp_dir()
            .join("hypha-testnet")
            .join(format!("{tag}-{hint}"));
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)
                .map_err(|e| Error::io(format!("remove stale {}", log_dir.display()), e))?;
        }
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| Error::io(format!("create {}", log_dir.display()), e))?;
        Ok(TestNet {
            shared: Arc::new(Shared {
                tag,
                hint,
                log_dir,
                state: Mutex::new(State {
                    torn_down: false,
                    namespaces: Vec::new(),
                    node_names: Vec::new(),
                    veths: Vec::new(),
                    next_link: 0,
                    procs: Vec::new(),
                    relays: Vec::new(),
                    bridges: Vec::new(),
                    log_names: Vec::new(),
                }),
            }),
        })
    }

    /// The prefix of every kernel object of this net (e.g. `hy2n9c-3`); pass it to
    /// [`TestNet::leftovers`] after the drop.
    pub fn tag(&self) -> &str {
        &self.shared.tag
    }

    /// Where process logs go. Removed at drop unless the test panicked.
    pub fn log_dir(&self) -> &Path {
        &self.shared.log_dir
    }

    /// Creates a namespace `<tag>-<name>` with `lo` up, IPv6 DAD off (addresses and link-local
    /// addresses are usable at once) and `keep_addr_on_down` on. `name` is 1–16 characters of
    /// `[a-z0-9]`, unique in this net.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        let valid = !name.is_empty()
            && name.len() <= NODE_NAME_MAX
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let netns = format!("{}-{name}", self.shared.tag);
        {
            let mut state = self.shared.lock_state();
            if state.torn_down {
                return Err(Error::InvalidArgument(
                    "the TestNet has been dropped".into(),
                ));
            }
            if !valid || state.node_names.iter().any(|n| n == name) {
                return Err(Error::BadNodeName(name.to_string()));
            }
            // Recorded before creation so that a half-made namespace is still deleted at drop.
            state.node_names.push(name.to_string());
            state.namespaces.push(netns.clone());
        }
        add_netns(&netns)?;
        let node = Node {
            shared: self.shared.clone(),
            name: name.to_string(),
            netns,
        };
        ns::host_ok(["ip", "-n", &node.netns, "link", "set", "lo", "up"])?;
        node.exec_ok([
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.keep_addr_on_down=1",
            "net.ipv6.conf.default.keep_addr_on_down=1",
        ])?;
        Ok(node)
    }

    fn check_node(&self, node: &Node) -> Result<()> {
        if Arc::ptr_eq(&node.shared, &self.shared) {
            Ok(())
        } else {
            Err(Error::Foreign(format!("node {}", node.netns)))
        }
    }

    /// Connects two nodes with a veth pair. Link number `i` (0, 1, … in creation order) gets
    /// `10.H.L.1/24` and `fd00:0:0:i::1/64` on end `a` and `.2`/`::2` on end `b` (`H.L` = `i` as
    /// two bytes); both ends are up when this returns. Loss and delay per [`LinkOpts`].
    pub fn link(&self, a: &Node, b: &Node, opts: LinkOpts) -> Result<Link> {
        self.check_node(a)?;
        self.check_node(b)?;
        if a.netns == b.netns {
            return Err(Error::InvalidArgument(format!(
                "cannot link node {} to itself",
                a.name
            )));
        }
        for loss in [opts.loss_to_a, opts.loss_to_b] {
            if !(0.0..=100.0).contains(&loss) {
                return Err(Error::InvalidArgument(format!(
                    "loss {loss} % is outside 0..=100"
                )));
            }
        }
        let index = {
            let mut state = self.shared.lock_state();
            if state.torn_down {
                return Err(Error::InvalidArgument(
                    "the TestNet has been dropped".into(),
                ));
            }
            let index = state.next_link;
            state.next_link += 1;
            index
        };
        let (v4a, v4b, v6a, v6b) = link::link_addrs(index)?;
        let idx = base36(u64::from(index));
        let tag = &self.shared.tag;
        let if_a = format!("{tag}-{idx}a");
        let if_b = format!("{tag}-{idx}b");
        if if_a.len() > IFNAME_MAX {
            return Err(Error::NameTooLong(if_a));
        }
        let end_a = LinkEnd {
            node: a.name.clone(),
            netns: a.netns.clone(),
            ifname: if_a,
            ipv4: v4a,
            ipv6: v6a,
        };
        let end_b = LinkEnd {
            node: b.name.clone(),
            netns: b.netns.clone(),
            ifname: if_b,
            ipv4: v4b,
            ipv6: v6b,
        };
        match opts.delay {
            None => self.veth_pair(&end_a.netns, &end_a.ifname, &end_b.netns, &end_b.ifname)?,
            Some(delay) => self.delayed_pair(&idx, &end_a, &end_b, delay)?,
        }
        link::configure_end(&end_a, opts.mtu)?;
        link::configure_end(&end_b, opts.mtu)?;
        if opts.loss_to_a > 0.0 {
            link::set_loss_rule(&end_a, opts.loss_to_a)?;
        }
        if opts.loss_to_b > 0.0 {
            link::set_loss_rule(&end_b, opts.loss_to_b)?;
        }
        Ok(Link {
            shared: self.shared.clone(),
            index,
            a: end_a,
            b: end_b,
        })
    }

    /// Creates a veth pair directly inside two namespaces (it never appears in the default one).
    fn veth_pair(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) -> Result<()> {
        ns::host_ok([
            "ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b,
        ])?;
        self.shared.lock_state().veths.push(VethRecord {
            netns: ns_a.to_string(),
            ifname: if_a.to_string(),
        });
        Ok(())
    }

    /// a ⇄ middle ⇄ b, with a frame-delaying bridge in the middle namespace.
    fn delayed_pair(&self, idx: &str, a: &LinkEnd, b: &LinkEnd, delay: Duration) -> Result<()> {
        let tag = &self.shared.tag;
        let middle = format!("{tag}_d{idx}");
        let (mx, my) = (format!("{tag}-{idx}x"), format!("{tag}-{idx}y"));
        if mx.len() > IFNAME_MAX {
            return Err(Error::NameTooLong(mx));
        }
        self.shared.lock_state().namespaces.push(middle.clone());
        add_netns(&middle)?;
        // The middle must stay silent: no IPv6 (no router solicitations, no NDP), no addresses.
        let mut cmd = std::process::Command::new("sysctl");
        cmd.args([
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        ns::command_in_netns(&mut cmd, &middle)?;
        ns::output_ok(cmd)?;
        self.veth_pair(&a.netns, &a.ifname, &middle, &mx)?;
        self.veth_pair(&middle, &my, &b.netns, &b.ifname)?;
        for dev in [&mx, &my] {
            ns::host_ok(["ip", "-n", &middle, "link", "set", dev, "up"])?;
        }
        let bridge = bridge::Bridge::start(&middle, &mx, &my, delay)?;
        self.shared.lock_state().bridges.push(bridge);
        Ok(())
    }

    /// Starts a UDP delay relay in `node`'s namespace: datagrams sent to `listen` are forwarded to
    /// `target` after `delay`, and replies come back to the sender after another `delay`. UDP
    /// only; see [`Relay`] for how to put it between two hypha nodes.
    /// `listen` may have port 0; [`Relay::local_addr`] tells the real one.
    pub fn udp_delay_relay(
        &self,
        node: &Node,
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
    ) -> Result<Relay> {
        self.check_node(node)?;
        let mut state = self.shared.lock_state();
        if state.torn_down {
            return Err(Error::InvalidArgument(
                "the TestNet has been dropped".into(),
            ));
        }
        let relay = relay::start(&node.netns, listen, target, delay)?;
        state.relays.push(relay.clone());
        Ok(relay)
    }

    /// The namespaces and default-namespace interfaces still carrying `tag`. Empty after a
    /// `TestNet` with that tag has been dropped; tests assert this.
    pub fn leftovers(tag: &str) -> Result<Leftovers> {
        let mut namespaces: Vec<String> = netns_names()?
            .into_iter()
            .filter(|n| owned_by(n, tag))
            .collect();
        namespaces.sort();
        let links = host_link_names()?
            .into_iter()
            .filter(|n| owned_by(n, tag))
            .collect();
        Ok(Leftovers { namespaces, links })
    }
}

impl Shared {
    /// Takes everything down; returns the errors met on the way (teardown always continues).
    fn teardown(&self, panicking: bool) -> Vec<Error> {
        let mut errors = Vec::new();
        let (relays, bridges, procs, veths, namespaces) = {
            let mut state = self.lock_state();
            state.torn_down = true;
            (
                std::mem::take(&mut state.relays),
                std::mem::take(&mut state.bridges),
                std::mem::take(&mut state.procs),
                std::mem::take(&mut state.veths),
                std::mem::take(&mut state.namespaces),
            )
        };
        for relay in &relays {
            relay.stop();
        }
        for bridge in &bridges {
            bridge.stop();
        }

        // SIGTERM everyone first so they shut down in parallel, then wait, then SIGKILL the rest.
        for proc in &procs {
            if let Err(e) = proc.kill(Signal::SIGTERM) {
                errors.push(e);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && procs.iter().any(|p| p.is_running()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for proc in &procs {
            if let Err(e) = proc.stop_with_grace(Duration::ZERO) {
                errors.push(e);
            }
        }

        if panicking {
            self.print_logs(&procs);
        }

        // Anything else inside our namespaces (a daemon that double-forked) is ours by construction.
        let me = std::process::id().to_string();
        for netns in &namespaces {
            if let Ok(pids) = ns::host_ok(["ip", "netns", "pids", netns]) {
                for pid in pids.split_whitespace().filter(|p| *p != me) {
                    if let Ok(raw) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(raw),
                            Signal::SIGKILL,
                        );
                    }
                }
            }
        }

        let existing = netns_names().unwrap_or_default();
        for veth in &veths {
            if !existing.contains(&veth.netns) {
                continue;
            }
            if let Err(e) = ns::host_ok(["ip", "-n", &veth.netns, "link", "del", &veth.ifname]) {
                // Already gone with its peer (e.g. the other end's record came first) is fine.
                let gone = matches!(&e, Error::Command { stderr, .. } if stderr.contains("Cannot find device"));
                if !gone {
                    errors.push(e);
                }
            }
        }
        for netns in namespaces.iter().rev() {
            if !existing.contains(netns) {
                continue;
            }
            if let Err(e) = ns::host_ok(["ip", "netns", "del", netns]) {
                errors.push(e);
            }
        }

        if panicking {
            eprintln!(
                "hypha-testnet {} ({}): logs kept in {}",
                self.tag,
                self.hint,
                self.log_dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.log_dir) {
            errors.push(Error::io(format!("remove {}", self.log_dir.display()), e));
        }
        errors
    }

    fn print_logs(&self, procs: &[ProcHandle]) {
        for proc in procs {
            let exit = proc
                .known_exit()
                .map_or_else(|| "still running".to_string(), |e| e.to_string());
            eprintln!(
                "----- hypha-testnet {}: {} on node {} (pid {}, {exit}): `{}` — last {LOG_TAIL_LINES} lines of {} -----",
                self.tag,
                proc.name(),
                proc.node_name(),
                proc.pid(),
                proc.cmdline(),
                proc.log_path().display()
            );
            match proc.log_tail(LOG_TAIL_LINES) {
                Ok(tail) => eprintln!("{tail}"),
                Err(e) => eprintln!("(cannot read log: {e})"),
            }
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for e in self.shared.teardown(panicking) {
            eprintln!("hypha-testnet {}: teardown: {e}", self.shared.tag);
        }
    }
}

/// Polls `cond` every `poll_interval` until it returns true ([`Ok`]) or `timeout` has passed
/// ([`Error::Timeout`]). `cond` is always checked at least once, and once more at the deadline.
///
/// ```
/// # use std::time::{Duration, Instant};
/// let start = Instant::now();
/// hypha_testnet::wait_until(Duration::from_secs(5), Duration::from_millis(5), || {
///     start.elapsed() > Duration::from_millis(20)
/// })?;
/// # Ok::<(), hypha_testnet::Error>(())
/// ```
pub fn wait_until(
    timeout: Duration,
    poll_interval: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout(timeout));
        }
        std::thread::sleep(poll_interval.min(deadline - now));
    }
}

/// Repeats `f` while it fails with [`std::io::ErrorKind::Interrupted`].
///
/// Blocking socket calls with a timeout (`recv_from` after `set_read_timeout`, for instance) fail
/// with `EINTR` when the process is stopped and continued, even without signal handlers
/// (signal(7)); on the shared test machines that happens under load. Wrap such calls in tests:
///
/// ```no_run
/// # let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
/// let mut buf = [0u8; 1500];
/// let (n, from) = hypha_testnet::retry_interrupted(|| sock.recv_from(&mut buf))?;
/// # let _ = (n, from); Ok::<(), std::io::Error>(())
/// ```
pub fn retry_interrupted<T>(mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Where eBPF objects are pinned.
pub const BPFFS: &str = "/sys/fs/bpf";

fn bpffs_mounted() -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    // Fields: id parent major:minor root MOUNTPOINT options ... - FSTYPE source superoptions
    Ok(info.lines().any(|line| {
        let mountpoint = line.split_whitespace().nth(4);
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next());
        mountpoint == Some(BPFFS) && fstype == Some("bpf")
    }))
}

/// Mounts bpffs at [`BPFFS`] unless it is mounted already (it is not after boot on the test
/// machines). Processes from [`Node::spawn`] and threads in [`Node::run_in`] share the host's
/// mounts, so pins made there are visible to the test and to each other.
pub fn ensure_bpffs() -> Result<()> {
    static ONCE: Mutex<()> = Mutex::new(());
    let _serialise = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if bpffs_mounted()? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::sys(format!("mount bpffs at {BPFFS}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TestNet>();
        send_sync::<Node>();
        send_sync::<Link>();
        send_sync::<ProcHandle>();
        send_sync::<Relay>();
        send_sync::<Error>();
    }

    #[test]
    fn bpffs_is_mounted_after_ensure() {
        let mounts = || {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            info.lines()
                .filter(|l| l.split_whitespace().nth(4) == Some(BPFFS))
                .count()
        };
        ensure_bpffs().unwrap();
        assert!(bpffs_mounted().unwrap());
        // Idempotent: a second call does not stack another mount.
        let before = mounts();
        ensure_bpffs().unwrap();
        assert_eq!(mounts(), before);
    }

    #[test]
    fn prefixes_are_short_lowercase_letters() {
        for bad in ["", "abc", "H", "h1", "h-"] {
            assert!(
                matches!(
                    TestNet::with_prefix(bad, "x"),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304), "2hwcg");
        assert_eq!(tag_prefix("hd", 4_194_304), "hd2hwcg-");
    }

    #[test]
    fn ownership_needs_a_separator_after_the_tag() {
        assert!(owned_by("hy2n9c-3-a", "hy2n9c-3"));
        assert!(owned_by("hy2n9c-3_d0", "hy2n9c-3"));
        assert!(!owned_by("hy2n9c-30-a", "hy2n9c-3"));
        assert!(!owned_by("hy2n9c-3", "hy2n9c-3"));
        assert!(!owned_by("eth0", "hy2n9c-3"));
    }

    #[test]
    fn longest_names_fit_ifnamsiz() {
        // pid_max is 2^22; 1296 nets and 1296 links per process keep names within 15 bytes.
        let tag = format!("hy{}-{}", base36(4_194_304), base36(1295));
        let ifname = format!("{tag}-{}a", base36(1295));
        assert!(ifname.len() <= IFNAME_MAX, "{ifname}");
    }

    #[test]
    fn link_addresses_are_distinct_per_index() {
        let (a4, b4, a6, b6) = link::link_addrs(258).unwrap();
        assert_eq!(a4.to_string(), "10.1.2.1");
        assert_eq!(b4.to_string(), "10.1.2.2");
        assert_eq!(a6.to_string(), "fd00:0:0:102::1");
        assert_eq!(b6.to_string(), "fd00:0:0:102::2");
        assert!(link::link_addrs(65_536).is_err());
    }

    #[test]
    fn sanitize_keeps_names_usable_as_files() {
        assert_eq!(sanitize("a/b c", 10), "a_b_c");
        assert_eq!(sanitize("", 10), "x");
        assert_eq!(sanitize("abcdef", 3), "abc");
    }
}
