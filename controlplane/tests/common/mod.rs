//! The harness the multi-node integration tests share: `hypha run` daemons (with or without their
//! `hypha-dp` dataplanes) in the network namespaces of a [`TestNet`], driven from outside through
//! each node's HTTP API and the `hypha` CLI. Each test file adds its own helpers in an
//! `impl Overlay` block of its own.
//!
//! Needs root; the dataplane tests also need `hypha-dp` built next to `hypha`
//! (`cargo build -p hypha-dataplane`).

// Not every test file uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use hypha_controlplane::api::AdminInfo;
use hypha_controlplane::bus::client::{request, Response};
use hypha_testnet::{wait_until, Link, LinkOpts, Node, ProcHandle, Signal, TestNet};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_hypha");
/// The underlay port every node listens on.
pub const PORT: u16 = 9651;
pub const HELLO: &str = "200ms";
/// The default API address; every namespace has its own 127.0.0.1.
pub const API: &str = "127.0.0.1:8989";

/// `hypha-dp` next to `hypha`; panics with a hint if it was not built.
pub fn dp_bin() -> PathBuf {
    let p = PathBuf::from(BIN).with_file_name("hypha-dp");
    assert!(
        p.exists(),
        "{} missing: build it first (cargo build -p hypha-dataplane)",
        p.display()
    );
    p
}

/// The daemons of one test and what the test knows about them.
pub struct Overlay {
    pub net: TestNet,
    pub nodes: BTreeMap<String, Node>,
    pub procs: BTreeMap<String, ProcHandle>,
    /// Node name → its peers (endpoints of the other ends of its links that it dials).
    pub dials: BTreeMap<String, Vec<SocketAddr>>,
    /// Underlay endpoint (`ip:9651` of a link end) → node name.
    pub endpoints: HashMap<SocketAddr, String>,
    /// `(x, y)` of every [`link`](Overlay::link) → the link.
    pub links: BTreeMap<(String, String), Link>,
    /// Node name → its overlay address, its public key (hex) and its /64 as the API prints it,
    /// once [`learn`](Overlay::learn)t.
    pub addrs: BTreeMap<String, Ipv6Addr>,
    pub keys: BTreeMap<String, String>,
    pub subnets: BTreeMap<String, String>,
    /// `hypha run` with its dataplane (`--dataplane-bin`, `--workers 1`), or `--no-dataplane`.
    pub dataplane: bool,
    /// More `hypha run` flags for every node.
    pub extra: Vec<String>,
    /// `RUST_LOG` of the daemons.
    pub rust_log: &'static str,
    /// How many lines of a daemon's log [`log`](Overlay::log) shows.
    pub log_lines: usize,
    /// How long [`learn`](Overlay::learn) waits for a node's API.
    pub api_wait: Duration,
}

impl Overlay {
    /// Nodes `names` in a fresh net, each to run `hypha run` with its dataplane (TUN and XDP as
    /// `hypha run` defaults them; add flags to [`extra`](Overlay::extra)).
    pub fn new(test: &str, names: &[&str]) -> Overlay {
        let net = TestNet::new(test).expect("create test net (needs root)");
        let mut nodes = BTreeMap::new();
        for n in names {
            nodes.insert(n.to_string(), net.add_node(n).expect("add node"));
        }
        Overlay {
            net,
            nodes,
            procs: BTreeMap::new(),
            dials: BTreeMap::new(),
            endpoints: HashMap::new(),
            links: BTreeMap::new(),
            addrs: BTreeMap::new(),
            keys: BTreeMap::new(),
            subnets: BTreeMap::new(),
            dataplane: true,
            extra: Vec::new(),
            rust_log: "info,hypha_controlplane=debug",
            log_lines: 40,
            api_wait: Duration::from_secs(10),
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    /// Links `x`–`y`; `y` dials `x` over IPv4.
    pub fn link(&mut self, x: &str, y: &str) -> Link {
        self.link_full(x, y, LinkOpts::default(), false)
    }

    /// Like [`link`](Overlay::link), with `opts` (loss, delay, …).
    pub fn link_with(&mut self, x: &str, y: &str, opts: LinkOpts) -> Link {
        self.link_full(x, y, opts, false)
    }

    /// Links `x`–`y`; `y` dials `x` over IPv6 (`v6`) or IPv4.
    pub fn link_over(&mut self, x: &str, y: &str, v6: bool) -> Link {
        self.link_full(x, y, LinkOpts::default(), v6)
    }

    fn link_full(&mut self, x: &str, y: &str, opts: LinkOpts, v6: bool) -> Link {
        let l = self
            .net
            .link(self.node(x), self.node(y), opts)
            .expect("link");
        let ex = SocketAddr::new(l.a().ip(v6), PORT);
        let ey = SocketAddr::new(l.b().ip(v6), PORT);
        self.endpoints.insert(ex, x.to_string());
        self.endpoints.insert(ey, y.to_string());
        self.dials.entry(y.to_string()).or_default().push(ex);
        self.links.insert((x.to_string(), y.to_string()), l.clone());
        l
    }

    pub fn key_file(&self, name: &str) -> PathBuf {
        self.net.log_dir().join(format!("{name}.key"))
    }

    /// Starts `hypha run` on `name` (see [`command`](Overlay::command)).
    pub fn start(&mut self, name: &str) {
        self.start_with(name, &[]);
    }

    /// Like [`start`](Overlay::start), with more flags for this node only.
    pub fn start_with(&mut self, name: &str, more: &[OsString]) {
        let mut cmd = self.command(name);
        cmd.args(more);
        let h = self
            .node(name)
            .spawn(&format!("hypha-{name}"), cmd)
            .expect("spawn hypha");
        self.procs.insert(name.to_string(), h);
    }

    /// `hypha run` for `name`: its key file, the dataplane (or none), `--hello-interval`, a
    /// `--peers` for every endpoint it dials, then [`extra`](Overlay::extra).
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("-k").arg(self.key_file(name));
        if self.dataplane {
            cmd.arg("--dataplane-bin")
                .arg(dp_bin())
                .args(["--workers", "1"]);
        } else {
            cmd.arg("--no-dataplane");
        }
        cmd.args(["--hello-interval", HELLO])
            .env("RUST_LOG", self.rust_log);
        for p in self.dials.get(name).into_iter().flatten() {
            cmd.arg("--peers").arg(format!("udp://{p}"));
        }
        cmd.args(&self.extra);
        cmd
    }

    /// A GET on the node's API from inside its namespace, through the crate's own client.
    pub fn get<T: serde::de::DeserializeOwned + Send>(&self, name: &str, path: &str) -> Option<T> {
        let path = path.to_string();
        self.node(name)
            .run_in(move || {
                let addr = API.parse().ok()?;
                let v = hypha_controlplane::client::get_json(addr, &path).ok()?;
                serde_json::from_value(v).ok()
            })
            .ok()
            .flatten()
    }

    /// Any request to the node's API from inside its namespace (waits up to 90 s for the answer).
    pub fn http(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Option<Response> {
        let (method, path) = (method.to_string(), path.to_string());
        let body = body.map(|b| b.to_string());
        self.node(name)
            .run_in(move || {
                let addr: SocketAddr = API.parse().ok()?;
                request(
                    addr,
                    &method,
                    &path,
                    body.as_deref().map(str::as_bytes),
                    Duration::from_secs(90),
                )
                .ok()
            })
            .ok()
            .flatten()
    }

    /// Waits for `name`'s API and records its address, key and /64; returns the address.
    pub fn learn(&mut self, name: &str) -> Ipv6Addr {
        let mut info = None;
        wait_until(self.api_wait, Duration::from_millis(50), || {
            info = self.get::<AdminInfo>(name, "/api/v1/admin");
            info.as_ref()
                .is_some_and(|i| i.node_ip.parse::<Ipv6Addr>().is_ok())
        })
        .unwrap_or_else(|_| panic!("{name}'s API never answered: {}", self.log(name)));
        let info = info.expect("checked");
        let a: Ipv6Addr = info.node_ip.parse().expect("node_ip");
        self.addrs.insert(name.to_string(), a);
        self.keys.insert(name.to_string(), info.node_pubkey);
        self.subnets.insert(name.to_string(), info.node_subnet);
        a
    }

    /// Runs the `hypha` CLI in `name`'s namespace.
    pub fn cli(&self, name: &str, args: &[&str]) -> Output {
        let mut argv = vec![BIN];
        argv.extend_from_slice(args);
        self.node(name).exec(argv).expect("run hypha CLI")
    }

    /// Runs `hypha ARGS --json` in `name`'s namespace and parses its output.
    pub fn cli_json<T: serde::de::DeserializeOwned>(&self, name: &str, args: &[&str]) -> Option<T> {
        let mut argv = vec![BIN];
        argv.extend_from_slice(args);
        argv.push("--json");
        let out = self.node(name).exec(&argv).ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The tail of `name`'s log.
    pub fn log(&self, name: &str) -> String {
        self.procs
            .get(name)
            .and_then(|p| p.log_tail(self.log_lines).ok())
            .unwrap_or_default()
    }

    /// The pid of `name`'s control plane.
    pub fn pid(&self, name: &str) -> u32 {
        self.procs[name].pid()
    }

    /// The pid of `name`'s dataplane, from its runtime directory.
    pub fn dp_pid(&self, name: &str) -> Option<i32> {
        let a = self.addrs.get(name)?;
        let s = std::fs::read_to_string(format!("/run/hypha/{a}/dp.pid")).ok()?;
        s.trim().parse().ok()
    }

    /// `ping` from `from`'s overlay address to `to`'s: true if any reply came.
    pub fn ping(&self, from: &str, to: &str, count: u32) -> bool {
        let dst = self.addrs[to].to_string();
        let src = self.addrs[from].to_string();
        let out = self
            .node(from)
            .exec([
                "ping",
                "-6",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                &src,
                &dst,
            ])
            .expect("run ping");
        out.status.success()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // hypha-dp runs in its own process group (it must survive its control plane), so the
        // harness does not kill it: stop the control planes first, then every dataplane by pid.
        for p in self.procs.values() {
            let _ = p.kill(Signal::SIGKILL);
        }
        if !self.dataplane {
            return;
        }
        for name in self.addrs.keys() {
            if let Some(pid) = self.dp_pid(name) {
                // SAFETY: kill(2) on a pid we read from our own node's pid file.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        for a in self.addrs.values() {
            let _ = std::fs::remove_dir_all(format!("/run/hypha/{a}"));
        }
    }
}
