//! The systems under test: each builds its own namespaces (hypha-testnet) and returns where to
//! send traffic. Everything is torn down when the returned [`Scenario`] is dropped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hypha_testnet::dp::{
    self, net64, static_config, StaticSession, A as HA, B as HB, C as HC, PORT,
};
use hypha_testnet::{wait_until, LinkOpts, Node, ProcHandle, TestNet};

use super::measure::{spawn, CpuGroup};
use super::BenchError;

/// Which path carries the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// a–b over one veth: the ceiling.
    Veth,
    /// a–b–c over two veths with kernel IP forwarding in b (reference for transit).
    VethRouted,
    /// a–b, kernel VXLAN over the veth (no crypto).
    Vxlan,
    /// a–b, boringtun (userspace WireGuard) on both ends.
    Boringtun,
    /// hypha-dp --static-config.
    Hypha {
        /// Worker threads per node.
        workers: usize,
        /// a–b–c with b forwarding (transit) instead of a–b.
        transit: bool,
        /// `--xdp` on the transit node (`None`: `off`, as on every other node).
        xdp: Option<&'static str>,
    },
}

impl System {
    /// Row label.
    pub fn label(&self) -> String {
        match self {
            System::Veth => "veth (a–b)".into(),
            System::VethRouted => "veth routed (a–b–c)".into(),
            System::Vxlan => "VXLAN (a–b)".into(),
            System::Boringtun => "boringtun (a–b)".into(),
            System::Hypha {
                workers,
                transit,
                xdp,
            } => format!(
                "Hypha {} worker{} ({}{})",
                workers,
                if *workers == 1 { "" } else { "s" },
                if *transit { "a–b–c" } else { "a–b" },
                match xdp {
                    None => String::new(),
                    Some("auto") => ", XDP transit".to_owned(),
                    Some(m) => format!(", XDP transit, --xdp {m}"),
                }
            ),
        }
    }

    /// Short name for logs and `--only`.
    pub fn key(&self) -> String {
        match self {
            System::Veth => "veth".into(),
            System::VethRouted => "veth-routed".into(),
            System::Vxlan => "vxlan".into(),
            System::Boringtun => "boringtun".into(),
            System::Hypha {
                workers,
                transit,
                xdp,
            } => format!(
                "hypha-{}w{}{}",
                workers,
                if *transit { "-transit" } else { "" },
                match xdp {
                    None => String::new(),
                    Some("auto") => "-xdp".to_owned(),
                    Some(m) => format!("-xdp-{m}"),
                }
            ),
        }
    }
}

/// A built system: the net (dropped first), the endpoints and the CPU groups.
pub struct Scenario {
    /// The namespaces and processes.
    pub net: TestNet,
    /// Traffic source.
    pub client: Node,
    /// Traffic sink.
    pub server: Node,
    /// The sink's address on the path under test.
    pub dst: IpAddr,
    /// The tunnel's processes.
    pub tunnel_procs: Vec<ProcHandle>,
    /// What the report should say about the setup.
    pub note: String,
    /// cpuacct group of the tunnel's processes (dropped after `net`).
    pub tunnel_group: Option<CpuGroup>,
    /// cpuacct group of the iperf3 processes.
    pub endpoint_group: Option<CpuGroup>,
    /// A Hypha transit node whose dataplane serves its stats on [`TRANSIT_STATS`]
    /// ([`dp::stats`] reads them): read before and after the measurements, to show which path (XDP/TC or user space) carried the transit traffic.
    pub transit_stats: Option<Node>,
}

/// Where a Hypha transit node's `hypha-dp --stats-listen` answers (inside its namespace).
pub const TRANSIT_STATS: &str = dp::STATS;

/// Counter deltas of a transit node's stats (`hypha-dp --stats-listen` JSON) between two
/// readings: how much transit the kernel (XDP frames, TC super-packets) and user space carried.
pub fn transit_summary(before: &serde_json::Value, after: &serde_json::Value) -> String {
    let d = |name: &str| {
        let get = |v: &serde_json::Value| v["counters"][name].as_u64().unwrap_or(0);
        get(after).saturating_sub(get(before))
    };
    format!(
        "transit node b during the run: XDP redirected {} frames, TC {} GSO super-packets; user \
         space forwarded {} datagrams (XDP {})",
        d("xdp_redirect") + d("xdp_tx"),
        d("xdp_gso_redirect"),
        d("forwarded"),
        after["xdp"]["mode"].as_str().unwrap_or("?"),
    )
}

/// Why a system was not measured.
#[derive(Debug)]
pub enum Unavailable {
    /// A tool is missing: the line for the report.
    Skipped(String),
    /// Setting it up failed.
    Failed(BenchError),
}

impl From<BenchError> for Unavailable {
    fn from(e: BenchError) -> Self {
        Unavailable::Failed(e)
    }
}

impl From<hypha_testnet::Error> for Unavailable {
    fn from(e: hypha_testnet::Error) -> Self {
        Unavailable::Failed(e.into())
    }
}

/// True if `prog` is found in `PATH`.
pub fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(prog);
            f.is_file()
        })
    })
}

/// Runs a host command with a timeout and returns stdout (trimmed).
fn host(args: &[&str], stdin: Option<&str>) -> Result<String, BenchError> {
    use std::io::Write;
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", "10"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError::Tool(format!("{}: {e}", args.join(" "))))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes())
            .map_err(|e| BenchError::Tool(format!("{}: {e}", args.join(" "))))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| BenchError::Tool(format!("{}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(BenchError::Tool(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until `node` reaches `dst` with ping.
fn wait_reachable(node: &Node, dst: IpAddr, what: &str) -> Result<(), BenchError> {
    let d = dst.to_string();
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        node.exec(["timeout", "3", "ping", "-n", "-c", "1", "-W", "1", &d])
            .is_ok_and(|o| o.status.success())
    })
    .map_err(|_| BenchError::Tool(format!("{what}: {dst} not reachable from {}", node.name())))
}

fn groups() -> (Option<CpuGroup>, Option<CpuGroup>) {
    (CpuGroup::new("tunnel"), CpuGroup::new("endpoints"))
}

/// Builds `system`. `hypha_dp` is the dataplane binary (for Hypha rows).
pub fn build(system: System, hypha_dp: Option<&Path>) -> Result<Scenario, Unavailable> {
    match system {
        System::Veth => veth(),
        System::VethRouted => veth_routed(),
        System::Vxlan => vxlan(),
        System::Boringtun => boringtun(),
        System::Hypha {
            workers,
            transit,
            xdp,
        } => {
            let Some(bin) = hypha_dp else {
                return Err(Unavailable::Skipped(
                    "hypha-dp not found (build it: `cargo build --release -p hypha-dataplane`, \
                     or pass --hypha-dp PATH)"
                        .into(),
                ));
            };
            hypha(bin, workers, transit, xdp)
        }
    }
}

fn veth() -> Result<Scenario, Unavailable> {
    let net = TestNet::new("sysbench-veth")?;
    let a = net.add_node("a")?;
    let b = net.add_node("b")?;
    let ab = net.link(&a, &b, LinkOpts::default())?;
    let dst = IpAddr::V4(ab.b().ipv4());
    wait_reachable(&a, dst, "veth")?;
    let (tunnel_group, endpoint_group) = groups();
    Ok(Scenario {
        net,
        client: a,
        server: b,
        dst,
        tunnel_procs: Vec::new(),
        note: "one veth pair, MTU 1500, IPv4".into(),
        tunnel_group,
        endpoint_group,
        transit_stats: None,
    })
}

fn veth_routed() -> Result<Scenario, Unavailable> {
    let net = TestNet::new("sysbench-routed")?;
    let a = net.add_node("a")?;
    let b = net.add_node("b")?;
    let c = net.add_node("c")?;
    let ab = net.link(&a, &b, LinkOpts::default())?;
    let bc = net.link(&b, &c, LinkOpts::default())?;
    b.enable_forwarding()?;
    let c_ip = bc.b().ipv4().to_string();
    let a_ip = ab.a().ipv4().to_string();
    a.exec_ok([
        "ip",
        "route",
        "add",
        &format!("{c_ip}/32"),
        "via",
        &ab.b().ipv4().to_string(),
    ])?;
    c.exec_ok([
        "ip",
        "route",
        "add",
        &format!("{a_ip}/32"),
        "via",
        &bc.a().ipv4().to_string(),
    ])?;
    let dst = IpAddr::V4(bc.b().ipv4());
    wait_reachable(&a, dst, "veth routed")?;
    let (tunnel_group, endpoint_group) = groups();
    Ok(Scenario {
        net,
        client: a,
        server: c,
        dst,
        tunnel_procs: Vec::new(),
        note: "two veth pairs, kernel IPv4 forwarding in b".into(),
        tunnel_group,
        endpoint_group,
        transit_stats: None,
    })
}

fn vxlan() -> Result<Scenario, Unavailable> {
    let net = TestNet::new("sysbench-vxlan")?;
    let a = net.add_node("a")?;
    let b = net.add_node("b")?;
    let ab = net.link(&a, &b, LinkOpts::default())?;
    let inner = [Ipv4Addr::new(10, 250, 0, 1), Ipv4Addr::new(10, 250, 0, 2)];
    for (node, local, remote, ifname, ip) in [
        (&a, ab.a().ipv4(), ab.b().ipv4(), ab.a().ifname(), inner[0]),
        (&b, ab.b().ipv4(), ab.a().ipv4(), ab.b().ifname(), inner[1]),
    ] {
        node.exec_ok([
            "ip",
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "remote",
            &remote.to_string(),
            "local",
            &local.to_string(),
            "dstport",
            "4789",
            "dev",
            ifname,
        ])?;
        node.exec_ok(["ip", "addr", "add", &format!("{ip}/24"), "dev", "vx0"])?;
        node.exec_ok(["ip", "link", "set", "vx0", "up"])?;
    }
    let dst = IpAddr::V4(inner[1]);
    wait_reachable(&a, dst, "vxlan")?;
    let (tunnel_group, endpoint_group) = groups();
    Ok(Scenario {
        net,
        client: a,
        server: b,
        dst,
        tunnel_procs: Vec::new(),
        note: "kernel VXLAN (id 42, UDP 4789) over the veth, MTU 1450, no encryption".into(),
        tunnel_group,
        endpoint_group,
        transit_stats: None,
    })
}

fn boringtun() -> Result<Scenario, Unavailable> {
    for tool in ["boringtun-cli", "wg"] {
        if !in_path(tool) {
            return Err(Unavailable::Skipped(format!(
                "`{tool}` not installed (`cargo install boringtun-cli --locked` and \
                 `apt-get install --no-install-recommends wireguard-tools`)"
            )));
        }
    }
    let net = TestNet::new("sysbench-bt")?;
    let a = net.add_node("a")?;
    let b = net.add_node("b")?;
    let ab = net.link(&a, &b, LinkOpts::default())?;
    let (tunnel_group, endpoint_group) = groups();
    // The UAPI socket is /var/run/wireguard/<ifname>.sock on the shared filesystem: names must be
    // unique across namespaces and concurrent runs.
    let names = [format!("{}wa", net.tag()), format!("{}wb", net.tag())];
    let keys = [
        host(&["wg", "genkey"], None)?,
        host(&["wg", "genkey"], None)?,
    ];
    let pubs = [
        host(&["wg", "pubkey"], Some(&keys[0]))?,
        host(&["wg", "pubkey"], Some(&keys[1]))?,
    ];
    let inner = [Ipv4Addr::new(10, 251, 0, 1), Ipv4Addr::new(10, 251, 0, 2)];
    let under = [ab.a().ipv4(), ab.b().ipv4()];
    let mut procs = Vec::new();
    for (i, node) in [&a, &b].into_iter().enumerate() {
        let other = 1 - i;
        let name = &names[i];
        let log: PathBuf = net.log_dir().join(format!("boringtun-{i}.out"));
        let p = spawn(
            node,
            &format!("boringtun-{}", node.name()),
            tunnel_group.as_ref(),
            &[
                "boringtun-cli".to_string(),
                "--foreground".into(),
                "--disable-drop-privileges".into(),
                "--log".into(),
                log.display().to_string(),
                name.clone(),
            ],
            &[("WG_SUDO", "1")],
        )?;
        let sock = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            sock.exists()
        })
        .map_err(|_| {
            BenchError::Tool(format!(
                "boringtun did not create {}: {}",
                sock.display(),
                p.log().unwrap_or_default()
            ))
        })?;
        let keyfile = net.log_dir().join(format!("wg-{i}.key"));
        std::fs::write(&keyfile, &keys[i])
            .map_err(|e| BenchError::Tool(format!("write {}: {e}", keyfile.display())))?;
        node.exec_ok([
            "wg",
            "set",
            name,
            "private-key",
            &keyfile.display().to_string(),
            "listen-port",
            "51820",
            "peer",
            &pubs[other],
            "allowed-ips",
            &format!("{}/32", inner[other]),
            "endpoint",
            &SocketAddr::new(IpAddr::V4(under[other]), 51820).to_string(),
        ])?;
        node.exec_ok([
            "ip",
            "addr",
            "add",
            &format!("{}/24", inner[i]),
            "dev",
            name,
        ])?;
        node.exec_ok(["ip", "link", "set", name, "up"])?;
        procs.push(p);
    }
    let dst = IpAddr::V4(inner[1]);
    wait_reachable(&a, dst, "boringtun")?;
    Ok(Scenario {
        net,
        client: a,
        server: b,
        dst,
        tunnel_procs: procs,
        note: "boringtun-cli 0.7 (default 4 threads), configured with wg; MTU 1420".into(),
        tunnel_group,
        endpoint_group,
        transit_stats: None,
    })
}

/// True if this hypha-dp has the `--xdp` flag.
pub fn hypha_has_xdp(bin: &Path) -> bool {
    Command::new("timeout")
        .args(["5"])
        .arg(bin)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--xdp"))
}

fn hypha(
    bin: &Path,
    workers: usize,
    transit: bool,
    xdp: Option<&'static str>,
) -> Result<Scenario, Unavailable> {
    if xdp.is_some() && !hypha_has_xdp(bin) {
        return Err(Unavailable::Skipped(
            "XDP transit pending: this hypha-dp has no --xdp (branch `xdp` not merged yet)".into(),
        ));
    }
    let net = TestNet::new("sysbench-hypha")?;
    let a = net.add_node("a")?;
    let b = net.add_node("b")?;
    let (tunnel_group, endpoint_group) = groups();
    let ep = |ip: Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), PORT);
    let s_ac = |peer, rx_index, tx_index, tx, rx| StaticSession {
        peer,
        rx_index,
        tx_index,
        tx_key: dp::key(tx),
        rx_key: dp::key(rx),
    };
    let (na, nb, nc) = (net64(HA), net64(HB), net64(HC));
    let mut configs: Vec<(Node, String, Option<&'static str>)> = Vec::new();
    let (server, dst_addr) = if transit {
        let c = net.add_node("c")?;
        // bpf_fib_lookup forwards only with IP forwarding on; on in both transit rows, so the
        // XDP row differs from the others in `--xdp` alone.
        b.enable_forwarding()?;
        let ab = net.link(&a, &b, LinkOpts::default())?;
        let bc = net.link(&b, &c, LinkOpts::default())?;
        configs.push((
            a.clone(),
            static_config(
                HA,
                &[(1, ep(ab.b().ipv4()))],
                &[(&nc, 1), (&nb, 1)],
                &[s_ac(HC, 7, 9, 0x33, 0x44)],
            ),
            None,
        ));
        configs.push((
            b.clone(),
            static_config(
                HB,
                &[(1, ep(ab.a().ipv4())), (2, ep(bc.b().ipv4()))],
                &[(&na, 1), (&nc, 2)],
                &[],
            ),
            xdp,
        ));
        configs.push((
            c.clone(),
            static_config(
                HC,
                &[(1, ep(bc.a().ipv4()))],
                &[(&na, 1)],
                &[s_ac(HA, 9, 7, 0x44, 0x33)],
            ),
            None,
        ));
        (c, HC)
    } else {
        let ab = net.link(&a, &b, LinkOpts::default())?;
        configs.push((
            a.clone(),
            static_config(
                HA,
                &[(1, ep(ab.b().ipv4()))],
                &[(&nb, 1)],
                &[s_ac(HB, 100, 200, 0x11, 0x22)],
            ),
            None,
        ));
        configs.push((
            b.clone(),
            static_config(
                HB,
                &[(1, ep(ab.a().ipv4()))],
                &[(&na, 1)],
                &[s_ac(HA, 200, 100, 0x22, 0x11)],
            ),
            None,
        ));
        (b.clone(), HB)
    };
    let mut procs = Vec::new();
    for (node, cfg, with_xdp) in &configs {
        let path = net.log_dir().join(format!("hypha-{}.toml", node.name()));
        std::fs::write(&path, cfg)
            .map_err(|e| BenchError::Tool(format!("write {}: {e}", path.display())))?;
        let mut args = vec![
            bin.display().to_string(),
            "--static-config".into(),
            path.display().to_string(),
            "--workers".into(),
            workers.to_string(),
        ];
        // hypha-dp's default is `--xdp auto`: the rows without XDP say `off`.
        args.push("--xdp".into());
        args.push(with_xdp.unwrap_or("off").into());
        if transit && node.name() == "b" {
            args.push("--stats-listen".into());
            args.push(TRANSIT_STATS.into());
        }
        let p = spawn(
            node,
            &format!("hypha-dp-{}", node.name()),
            tunnel_group.as_ref(),
            &args,
            &[("RUST_LOG", "info")],
        )?;
        p.wait_for_log("hypha-dp running", Duration::from_secs(15))
            .map_err(|e| {
                BenchError::Tool(format!(
                    "hypha-dp in {} did not start: {e}: {}",
                    node.name(),
                    p.log().unwrap_or_default()
                ))
            })?;
        procs.push(p);
    }
    let dst: IpAddr = dst_addr
        .parse()
        .map_err(|_| BenchError::Parse("overlay address".into()))?;
    wait_reachable(&a, dst, "hypha")?;
    Ok(Scenario {
        net,
        client: a,
        server,
        dst,
        tunnel_procs: procs,
        note: format!(
            "hypha-dp --static-config (no control plane), {workers} worker(s) per node, \
             AES-256-GCM, TUN MTU 1380, IPv6 overlay over IPv4 underlay{}",
            match (transit, xdp) {
                (true, Some("auto")) => {
                    ", b forwards without decrypting, in the kernel: `--xdp auto` on b (on veth: \
                     the TC ingress program alone), IP forwarding on"
                        .to_owned()
                }
                (true, Some(m)) => format!(
                    ", b forwards without decrypting, in the kernel: `--xdp {m}` on b, IP \
                     forwarding on"
                ),
                (true, None) => {
                    ", b forwards without decrypting, `--xdp off`, IP forwarding on".to_owned()
                }
                _ => String::new(),
            }
        ),
        tunnel_group,
        endpoint_group,
        transit_stats: transit.then_some(b),
    })
}
