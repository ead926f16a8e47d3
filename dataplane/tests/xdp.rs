//! The XDP fast path in network namespaces (root only; skipped otherwise).
//!
//! - `transit_line_driver_mode`: a line a–b–c of `hypha-dp --static-config`, XDP on b forced
//!   to driver mode (`--xdp driver`; auto picks tc on veth) with the interfaces detected from the peers: iperf3 a→c is
//!   forwarded by b's XDP program (redirect counter) while b's user space sees almost none of
//!   it; datagrams to b's port from a non-peer are dropped in XDP and never reach b's dataplane,
//!   handshake initiations pass; `bpftool map dump pinned` shows the counters by name; after a
//!   SIGKILL of b's dataplane and a restart exactly one (new) program is attached per interface
//!   and forwarding resumes; a clean stop detaches and unpins.
//! - `reroute_updates_the_transit_map_generic_mode`: the loader alone on b (IPv6 underlay,
//!   generic mode, explicit interfaces) forwards a→c over one of two b–c links; the FIB moves
//!   the route to the other link, [`XdpFastPath::sync`] rewrites the transit map, and pings keep
//!   flowing over the new next hop; a crafted frame forwarded to a plain socket arrives with
//!   only its hop limit changed (checksums right), and at hop limit 1 it is passed up instead.
//!   `reroute_updates_the_transit_map_tc_mode`: the same with the TC ingress program alone.
//!
//! - `transit_line_auto_mode_is_tc_on_veth`: the same line with IP forwarding on b and no
//!   ethtool tweaks, over an IPv4 and an IPv6 underlay: `--xdp auto` attaches only the TC
//!   ingress program to b's veths (mode `tc`), and a→c traffic crosses b through its redirects
//!   (counter `redirect`, as XDP's); then `--xdp generic` over IPv4; an iperf3 run's GSO
//!   super-packets cross b through the TC ingress program (`gso_redirect`) while b's user space
//!   forwards (almost) none of it, also with b's tx checksum offload off, where c's kernel
//!   verifies every segment's UDP checksum and a capture at c (tshark, if installed) shows every
//!   DATA frame's hop limit decremented once.
//!
//! Native XDP redirect between veths needs GRO on the redirect target's peer and TX checksum
//! offload off on the sending veths (ENVIRONMENT.md); test 1 sets both.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hypha_dataplane::fib::{Fib, FibHasherBuilder, NextHop, Prefix};
use hypha_dataplane::state::PeerTable;
use hypha_dataplane::xdp::{node_dir_name, XdpConfig, XdpFastPath, XdpSetting};
use hypha_testnet::dp::{
    have, is_root, key, net64, static_config as config, stats, StaticSession as Sess, A, B, C,
    PORT, STATS,
};
use hypha_testnet::{wait_until, LinkOpts, Node, ProcHandle, TestNet};

/// A bpffs pin root of this test's own (tests run in parallel and reuse node addresses).
fn pin_root(net: &TestNet) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/hypha-test-{}", net.tag()))
}

/// Removes the test's pin root (empty after a clean stop) on drop, even on panic.
struct PinRootGuard(PathBuf);

impl Drop for PinRootGuard {
    fn drop(&mut self) {
        if let Ok(dirs) = std::fs::read_dir(&self.0) {
            for d in dirs.flatten() {
                if let Ok(files) = std::fs::read_dir(d.path()) {
                    for f in files.flatten() {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
                let _ = std::fs::remove_dir(d.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn start(net: &TestNet, node: &Node, name: &str, cfg: &str, xdp: &str) -> ProcHandle {
    let path: PathBuf = net.log_dir().join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypha-dp"));
    cmd.args([
        "--static-config",
        path.to_str().unwrap(),
        "--workers",
        "2",
        "--stats-listen",
        STATS,
        "--xdp",
        xdp,
        "--xdp-pin-root",
        pin_root(net).to_str().unwrap(),
    ])
    .env("RUST_LOG", "info");
    let p = node.spawn(name, cmd).unwrap();
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        stats(node).is_some()
    })
    .unwrap_or_else(|e| {
        panic!(
            "{name} did not come up: {e}\n{}",
            p.log().unwrap_or_default()
        )
    });
    p
}

fn counter(node: &Node, name: &str) -> u64 {
    stats(node)
        .and_then(|v| v["counters"][name].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} from {}", node.name()))
}

/// iperf3 TCP `client` → `dst` for `secs`; the receiver's byte count.
fn iperf(server: &Node, client: &Node, dst: &str, secs: u32) -> (u64, f64) {
    let srv = server
        .spawn_args("iperf3-s", ["iperf3", "-s", "-1", "-B", dst, "-p", "5201"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = client
        .exec([
            "iperf3",
            "-c",
            dst,
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "iperf3 JSON: {e}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = srv.wait_exit(Duration::from_secs(5));
    let sum = &v["end"]["sum_received"];
    (
        sum["bytes"].as_u64().unwrap_or(0),
        sum["bits_per_second"].as_f64().unwrap_or(0.0),
    )
}

/// XDP program ids attached to `iface` in `node` (from `ip -j link show`).
fn xdp_prog_ids(node: &Node, iface: &str) -> Vec<u64> {
    let out = node
        .exec_ok(["ip", "-j", "-d", "link", "show", "dev", iface])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ids = Vec::new();
    if let Some(x) = v[0].get("xdp") {
        if let Some(id) = x["prog"]["id"].as_u64() {
            ids.push(id);
        }
        if let Some(progs) = x["attached"].as_array() {
            for p in progs {
                if let Some(id) = p["prog"]["id"].as_u64() {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
    }
    ids
}

fn ethtool(node: &Node, iface: &str, feature: &str, on: bool) {
    node.exec_ok([
        "ethtool",
        "-K",
        iface,
        feature,
        if on { "on" } else { "off" },
    ])
    .unwrap();
}

#[test]
fn transit_line_driver_mode() {
    if !is_root() || !have("iperf3") || !have("bpftool") || !have("ethtool") {
        eprintln!("skipped: needs root, iperf3, bpftool and ethtool");
        return;
    }
    hypha_testnet::ensure_bpffs().unwrap();
    let t0 = Instant::now();
    let net = TestNet::new("xdp3").unwrap();
    let _pins = PinRootGuard(pin_root(&net));
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let c = net.add_node("c").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let bc = net.link(&b, &c, LinkOpts::default()).unwrap();
    b.enable_forwarding().unwrap();
    // Native redirect between veths: senders without TX checksum offload, GRO on the targets.
    for (node, end) in [(&a, ab.a()), (&c, bc.b())] {
        ethtool(node, end.ifname(), "tx", false);
        ethtool(node, end.ifname(), "gro", true);
    }
    let ep = |ip: std::net::Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), PORT);
    let cfg_a = config(
        A,
        &[(1, ep(ab.b().ipv4()))],
        &[(&net64(C), 1), (&net64(B), 1)],
        &[Sess {
            peer: C,
            rx_index: 7,
            tx_index: 9,
            tx_key: key(0x33),
            rx_key: key(0x44),
        }],
    );
    let cfg_b = config(
        B,
        &[(1, ep(ab.a().ipv4())), (2, ep(bc.b().ipv4()))],
        &[(&net64(A), 1), (&net64(C), 2)],
        &[],
    );
    let cfg_c = config(
        C,
        &[(1, ep(bc.a().ipv4()))],
        &[(&net64(A), 1)],
        &[Sess {
            peer: A,
            rx_index: 9,
            tx_index: 7,
            tx_key: key(0x44),
            rx_key: key(0x33),
        }],
    );
    let _pa = start(&net, &a, "dp-a", &cfg_a, "off");
    let pb = start(&net, &b, "dp-b", &cfg_b, "driver");
    let _pc = start(&net, &c, "dp-c", &cfg_c, "off");

    // b attached to both links (detected from its peers), in driver mode.
    let s = stats(&b).unwrap();
    let ifaces = s["xdp"]["interfaces"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        ifaces.len(),
        2,
        "b's XDP attachments: {s}\n{}",
        pb.log().unwrap()
    );
    assert_eq!(ifaces[ab.b().ifname()], "driver", "{s}");
    assert_eq!(ifaces[bc.a().ifname()], "driver", "{s}");
    assert_eq!(s["xdp"]["transit_entries"], 2, "{s}");
    assert_eq!(s["xdp"]["allowed_peers"], 2, "{s}");
    let old_ids = xdp_prog_ids(&b, ab.b().ifname());
    assert_eq!(old_ids.len(), 1, "{old_ids:?}");

    // Warm up (neighbours resolve; the first packets may take the user-space path).
    let p = a
        .ping(
            IpAddr::V6(C.parse().unwrap()),
            10,
            Duration::from_millis(100),
        )
        .unwrap();
    assert!(p.received >= 8, "ping a->c via b: {p:?}");

    let fwd0 = counter(&b, "forwarded");
    let rx0 = counter(&b, "udp_rx_packets");
    let redirect0 = counter(&b, "xdp_redirect");
    let delivered0 = counter(&c, "delivered");
    let (bytes, bps) = iperf(&c, &a, C, 3);
    eprintln!(
        "iperf3 a->c through b's XDP (driver): {bytes} bytes, {:.2} Gbit/s",
        bps / 1e9
    );
    assert!(bytes > 1_000_000, "iperf3 moved only {bytes} bytes");
    let redirected = counter(&b, "xdp_redirect") - redirect0;
    let user_fwd = counter(&b, "forwarded") - fwd0;
    let user_rx = counter(&b, "udp_rx_packets") - rx0;
    let delivered = counter(&c, "delivered") - delivered0;
    eprintln!("b: xdp_redirect +{redirected}, user-space forwarded +{user_fwd}, udp_rx +{user_rx}; c delivered +{delivered}");
    // Every packet c delivered (data a->c) and every ACK (c->a) crossed b: all but a handful
    // in XDP.
    assert!(
        redirected >= delivered,
        "redirected {redirected} < delivered {delivered}"
    );
    assert!(
        user_fwd * 100 <= redirected && user_rx * 100 <= redirected,
        "b's user space saw too much: forwarded {user_fwd}, rx {user_rx}, XDP {redirected}"
    );

    // Non-peer datagrams to b's port: a's address but another port is not a peer.
    let sender = a
        .run_in(|| UdpSocket::bind((ab.a().ipv4(), 0)))
        .unwrap()
        .unwrap();
    let b_ep = ep(ab.b().ipv4());
    let rx1 = counter(&b, "udp_rx_packets");
    let drop1 = counter(&b, "xdp_drop_unknown_peer");
    let mut junk = [0u8; 100];
    junk[0] = 0x01;
    for _ in 0..50 {
        sender.send_to(&junk, b_ep).unwrap();
    }
    wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        counter(&b, "xdp_drop_unknown_peer") >= drop1 + 50
    })
    .expect("junk from a non-peer not dropped in XDP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counter(&b, "udp_rx_packets"),
        rx1,
        "junk reached b's dataplane"
    );
    // A link handshake initiation from the same non-peer passes to user space.
    let hs1 = counter(&b, "xdp_pass_handshake");
    let mut init = [0u8; 52];
    init[0] = 0x02;
    init[1] = 1;
    init[3] = 32;
    sender.send_to(&init, b_ep).unwrap();
    wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        counter(&b, "xdp_pass_handshake") > hs1 && counter(&b, "udp_rx_packets") > rx1
    })
    .expect("LINK_INIT from a non-peer did not reach user space");

    // bpftool shows the counters by name, summed per CPU here.
    let dir = pin_root(&net).join(node_dir_name(&B.parse().unwrap()));
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(dir.join("counters"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let per_cpu = dump[0]["formatted"]["values"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!per_cpu.is_empty(), "bpftool dump: {dump}");
    let sum = |name: &str| -> u64 {
        per_cpu
            .iter()
            .map(|v| v["value"][name].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(sum("redirect") >= redirected, "bpftool dump: {dump}");
    assert!(sum("drop_unknown_peer") >= 50, "bpftool dump: {dump}");
    for name in hypha_ebpf::maps::XdpCounters::NAMES {
        assert!(
            per_cpu[0]["value"].get(name).is_some(),
            "no {name} in {dump}"
        );
    }

    // SIGKILL: the pinned link keeps the old program attached; a restart replaces it.
    pb.kill(hypha_testnet::Signal::SIGKILL).unwrap();
    let _ = pb.wait_exit(Duration::from_secs(5));
    assert_eq!(
        xdp_prog_ids(&b, ab.b().ifname()),
        old_ids,
        "pinned link gone after SIGKILL"
    );
    // The killed process's TUN device goes away asynchronously (slowly under load).
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        b.exec_ok(["ip", "link", "show", "dev", "hypha0"]).is_err()
    })
    .expect("b's old TUN device did not go away");
    let pb2 = start(&net, &b, "dp-b2", &cfg_b, "driver");
    for iface in [ab.b().ifname(), bc.a().ifname()] {
        let ids = xdp_prog_ids(&b, iface);
        assert_eq!(ids.len(), 1, "{iface}: {ids:?}");
        assert_ne!(ids, old_ids, "{iface}: the stale program is still attached");
    }
    assert!(pb2
        .log()
        .unwrap()
        .contains("detached XDP left by an earlier run"));
    let r0 = counter(&b, "xdp_redirect");
    let p = a
        .ping(
            IpAddr::V6(C.parse().unwrap()),
            10,
            Duration::from_millis(100),
        )
        .unwrap();
    assert!(p.received >= 9, "ping a->c after b's restart: {p:?}");
    assert!(
        counter(&b, "xdp_redirect") >= r0 + 18,
        "forwarding did not resume in XDP"
    );

    // Clean stop: detached and unpinned.
    pb2.stop().unwrap();
    for iface in [ab.b().ifname(), bc.a().ifname()] {
        assert!(
            xdp_prog_ids(&b, iface).is_empty(),
            "{iface} still has XDP after a clean stop"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    eprintln!("XDP transit line test took {:?}", t0.elapsed());
}

/// `--xdp auto` on a transit node whose underlay is veth, with IP forwarding on (so
/// `bpf_fib_lookup` succeeds and the program redirects): the TC ingress program alone (`tc`),
/// and traffic flows without the ethtool tweaks native veth redirect needs. `--xdp generic`
/// (generic XDP in front of the TC program, which then forwards only super-packets) over IPv4
/// too.
#[test]
fn transit_line_auto_mode_is_tc_on_veth() {
    if !is_root() || !have("iperf3") || !have("ethtool") {
        eprintln!("skipped: needs root, iperf3 and ethtool");
        return;
    }
    hypha_testnet::ensure_bpffs().unwrap();
    for v6 in [false, true] {
        auto_line(v6, "auto");
    }
    auto_line(false, "generic");
}

fn auto_line(v6: bool, xdp: &str) {
    let net = TestNet::new(match (v6, xdp) {
        (false, "auto") => "xdpa4",
        (true, "auto") => "xdpa6",
        _ => "xdpg4",
    })
    .unwrap();
    let _pins = PinRootGuard(pin_root(&net));
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let c = net.add_node("c").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let bc = net.link(&b, &c, LinkOpts::default()).unwrap();
    b.enable_forwarding().unwrap();
    let ep = |end: &hypha_testnet::LinkEnd| {
        let ip = if v6 {
            IpAddr::V6(end.ipv6())
        } else {
            IpAddr::V4(end.ipv4())
        };
        SocketAddr::new(ip, PORT)
    };
    let cfg_a = config(
        A,
        &[(1, ep(ab.b()))],
        &[(&net64(C), 1), (&net64(B), 1)],
        &[Sess {
            peer: C,
            rx_index: 7,
            tx_index: 9,
            tx_key: key(0x33),
            rx_key: key(0x44),
        }],
    );
    let cfg_b = config(
        B,
        &[(1, ep(ab.a())), (2, ep(bc.b()))],
        &[(&net64(A), 1), (&net64(C), 2)],
        &[],
    );
    let cfg_c = config(
        C,
        &[(1, ep(bc.a()))],
        &[(&net64(A), 1)],
        &[Sess {
            peer: A,
            rx_index: 9,
            tx_index: 7,
            tx_key: key(0x44),
            rx_key: key(0x33),
        }],
    );
    let _pa = start(&net, &a, "dp-a", &cfg_a, "off");
    let pb = start(&net, &b, "dp-b", &cfg_b, xdp);
    let _pc = start(&net, &c, "dp-c", &cfg_c, "off");

    let s = stats(&b).unwrap();
    let log = pb.log().unwrap_or_default();
    let mode = if xdp == "auto" { "tc" } else { xdp };
    for iface in [ab.b().ifname(), bc.a().ifname()] {
        assert_eq!(
            s["xdp"]["interfaces"][iface], mode,
            "v6 {v6}: {iface}: {s}\n{log}"
        );
    }
    if xdp == "auto" {
        assert!(log.contains("veth: using the TC program alone"), "{log}");
    }

    // Warm up (neighbours resolve), then 20 pings: each request and reply crosses b once.
    let p = a
        .ping(
            IpAddr::V6(C.parse().unwrap()),
            5,
            Duration::from_millis(100),
        )
        .unwrap();
    assert!(p.received >= 3, "v6 {v6}: ping a->c via b: {p:?}");
    let redirect0 = counter(&b, "xdp_redirect");
    let p = a
        .ping(
            IpAddr::V6(C.parse().unwrap()),
            20,
            Duration::from_millis(50),
        )
        .unwrap();
    let redirected = counter(&b, "xdp_redirect") - redirect0;
    assert_eq!(p.received, 20, "v6 {v6}: ping a->c via b: {p:?}");
    assert!(
        redirected >= 40,
        "v6 {v6}: pings crossed b's XDP only {redirected} times"
    );
    // Bulk: a's dataplane sends UDP GSO super-packets, which cross the veth whole. Generic XDP
    // passes them on (`pass_gso`), or isn't there (`tc`), and the TC ingress program forwards
    // them (`gso_redirect`): b's user space sees (almost) none of the transfer.
    let bulk = |label: &str| {
        let c0 = |n: &str| counter(&b, n);
        let (redirect0, gso0, fwd0) = (c0("xdp_redirect"), c0("xdp_gso_redirect"), c0("forwarded"));
        let (bytes, bps) = iperf(&c, &a, C, 2);
        let s = stats(&b).unwrap();
        let redirect = counter(&b, "xdp_redirect") - redirect0;
        let gso = counter(&b, "xdp_gso_redirect") - gso0;
        let fwd = counter(&b, "forwarded") - fwd0;
        eprintln!(
            "v6 {v6} ({label}): iperf3 a->c through b (--xdp {xdp}): {bytes} bytes, \
             {:.2} Gbit/s; b: xdp_redirect +{redirect}, gso_redirect +{gso}, user-space \
             forwarded +{fwd}; XDP counters {}",
            bps / 1e9,
            s["xdp"]["counters"]
        );
        assert!(
            bytes > 1_000_000,
            "v6 {v6} ({label}): iperf3 moved only {bytes} bytes"
        );
        assert!(
            gso > 0,
            "v6 {v6} ({label}): no super-packet forwarded in TC: {s}"
        );
        // Every super-packet carries several datagrams: user space forwarding more than a
        // twentieth as many datagrams as the kernel forwarded frames means the fast path missed.
        assert!(
            fwd * 20 <= redirect + gso,
            "v6 {v6} ({label}): b's user space forwarded {fwd} datagrams, the kernel \
             {redirect} frames + {gso} super-packets: {s}"
        );
        assert_eq!(counter(&b, "xdp_gso_drop"), 0, "v6 {v6} ({label}): {s}");
    };
    bulk("veth offloads on");
    // With tx checksum offload off on b's veth towards c, the super-packets are segmented and
    // checksummed in software on the way out, and c's kernel verifies every UDP checksum: the
    // rewritten pseudo-header seed must be right.
    let csum_errors = || {
        let snmp = c
            .exec_ok(["cat", "/proc/net/snmp", "/proc/net/snmp6"])
            .unwrap();
        snmp_in_csum_errors(&snmp)
    };
    ethtool(&b, bc.a().ifname(), "tx", false);
    let errors0 = csum_errors();
    // The datagrams now reach c one by one: capture them, to see every segment's hop limit.
    let pcap = net.log_dir().join(format!("c-{v6}.pcap"));
    let capture = have("tshark").then(|| {
        let cap = c
            .spawn_args(
                "tshark",
                [
                    "tshark",
                    "-i",
                    bc.b().ifname(),
                    "-a",
                    "duration:4",
                    "-c",
                    "5000",
                    "-f",
                    "udp dst port 9651",
                    "-w",
                    pcap.to_str().unwrap(),
                ],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        cap
    });
    bulk("b's tx checksum offload off");
    assert_eq!(
        csum_errors(),
        errors0,
        "v6 {v6}: c's kernel saw UDP checksum errors on what b's TC program forwarded"
    );
    if let Some(cap) = capture {
        let _ = cap.wait_exit(Duration::from_secs(10));
        let hops = data_hop_limits(&c, &pcap, &net64(C));
        eprintln!("v6 {v6}: hop limits of DATA frames to c at c: {hops:?}");
        let total: usize = hops.values().sum();
        assert!(
            total > 100,
            "v6 {v6}: only {total} DATA frames captured at c"
        );
        // a sends with hop limit 64; b (XDP, TC for every segment of a super-packet) takes one.
        assert_eq!(
            hops.keys().copied().collect::<Vec<_>>(),
            vec![63],
            "v6 {v6}: hop limits at c: {hops:?}"
        );
    }
    pb.stop().unwrap();
}

/// Hop limit → count of the DATA frames to `dst64` (a /64 as `net64` gives it) in a capture.
fn data_hop_limits(
    node: &Node,
    pcap: &std::path::Path,
    dst64: &str,
) -> std::collections::BTreeMap<u8, usize> {
    let prefix = dst64.parse::<Ipv6Addr>().unwrap().octets();
    let out = node
        .exec_ok([
            "tshark",
            "-r",
            pcap.to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "udp.payload",
        ])
        .unwrap();
    let mut hops = std::collections::BTreeMap::new();
    for line in out.lines() {
        let hex: String = line.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect();
        if bytes.len() >= 48 && bytes[0] == 0x01 && bytes[32..40] == prefix[..8] {
            *hops.entry(bytes[1]).or_insert(0) += 1;
        }
    }
    hops
}

/// The sum of `Udp: InCsumErrors` (/proc/net/snmp) and `Udp6InCsumErrors` (/proc/net/snmp6).
fn snmp_in_csum_errors(text: &str) -> u64 {
    let mut total = 0;
    let mut udp_header: Option<Vec<&str>> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Udp: ") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            match &udp_header {
                None => udp_header = Some(fields),
                Some(h) => {
                    if let Some(i) = h.iter().position(|f| *f == "InCsumErrors") {
                        total += fields
                            .get(i)
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0);
                    }
                }
            }
        } else if let Some(v) = line.strip_prefix("Udp6InCsumErrors") {
            total += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    total
}

/// XDP that can't attach (loopback has no native XDP): a clear log line, and the dataplane runs
/// without it.
#[test]
fn dataplane_runs_without_xdp_when_it_cannot_attach() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let net = TestNet::new("xdpno").unwrap();
    let _pins = PinRootGuard(pin_root(&net));
    let a = net.add_node("a").unwrap();
    let path = net.log_dir().join("a.toml");
    std::fs::write(&path, config(A, &[], &[], &[])).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypha-dp"));
    cmd.args(["--static-config", path.to_str().unwrap(), "--workers", "1"])
        .args([
            "--stats-listen",
            STATS,
            "--xdp",
            "driver",
            "--xdp-iface",
            "lo",
        ])
        .arg("--xdp-pin-root")
        .arg(pin_root(&net));
    let p = a.spawn("dp-a", cmd).unwrap();
    p.wait_for_log("hypha-dp running", Duration::from_secs(10))
        .unwrap();
    let log = p.log().unwrap();
    assert!(
        log.contains("XDP fast path not used") && log.contains("attaching XDP to lo"),
        "{log}"
    );
    let s = stats(&a).expect("dataplane not serving stats");
    assert_eq!(s["xdp"]["loaded"], false, "{s}");
    assert_eq!(s["xdp"]["mode"], "off", "{s}");
    assert!(xdp_prog_ids(&a, "lo").is_empty());
    // The failed start left no pins behind.
    let node_dir = pin_root(&net).join(node_dir_name(&A.parse().unwrap()));
    assert!(!node_dir.exists(), "{} left behind", node_dir.display());
}

fn fib_of(routes: &[(&str, u32)]) -> Fib {
    Fib::from_routes(
        FibHasherBuilder::random(),
        routes.iter().map(|(a, peer)| {
            (
                Prefix::new(net64(a).parse().unwrap(), 64).unwrap(),
                NextHop {
                    peer: *peer,
                    metric: 1,
                },
            )
        }),
    )
}

#[test]
fn reroute_updates_the_transit_map_generic_mode() {
    reroute(XdpSetting::Generic, "xdpre");
}

/// The same with the TC ingress program alone (`--xdp tc`): single datagrams forwarded and
/// counted under `redirect`, the map follows the FIB, hop limit 1 passes up.
#[test]
fn reroute_updates_the_transit_map_tc_mode() {
    reroute(XdpSetting::Tc, "xdprt");
}

fn reroute(setting: XdpSetting, name: &str) {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    hypha_testnet::ensure_bpffs().unwrap();
    let t0 = Instant::now();
    let net = TestNet::new(name).unwrap();
    let _pins = PinRootGuard(pin_root(&net));
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let c = net.add_node("c").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let bc1 = net.link(&b, &c, LinkOpts::default()).unwrap();
    let bc2 = net.link(&b, &c, LinkOpts::default()).unwrap();
    b.enable_forwarding().unwrap();
    let ep = |ip: Ipv6Addr| SocketAddr::new(IpAddr::V6(ip), PORT);
    // IPv6 underlay. c answers over the second link from the start, so cutting the first one
    // only moves the a->c direction.
    let cfg_a = config(
        A,
        &[(1, ep(ab.b().ipv6()))],
        &[(&net64(C), 1)],
        &[Sess {
            peer: C,
            rx_index: 7,
            tx_index: 9,
            tx_key: key(0x33),
            rx_key: key(0x44),
        }],
    );
    let cfg_c = config(
        C,
        &[(1, ep(bc2.a().ipv6()))],
        &[(&net64(A), 1)],
        &[Sess {
            peer: A,
            rx_index: 9,
            tx_index: 7,
            tx_key: key(0x44),
            rx_key: key(0x33),
        }],
    );
    let _pa = start(&net, &a, "dp-a", &cfg_a, "off");
    let _pc = start(&net, &c, "dp-c", &cfg_c, "off");

    // No dataplane on b: the loader alone, in b's namespace. b resolves its neighbours once
    // (nobody on b sends to them otherwise, and bpf_fib_lookup does not resolve).
    for ip in [ab.a().ipv6(), bc1.b().ipv6(), bc2.b().ipv6()] {
        let p = b
            .ping(IpAddr::V6(ip), 1, Duration::from_millis(10))
            .unwrap();
        assert_eq!(p.received, 1, "b -> {ip}");
    }
    let mut cfg = XdpConfig::new(B.parse().unwrap(), PORT);
    cfg.setting = setting;
    cfg.ifaces = [ab.b(), bc1.a(), bc2.a()]
        .iter()
        .map(|e| e.ifname().to_owned())
        .collect();
    cfg.pin_root = pin_root(&net);
    let mut fp = b.run_in(|| XdpFastPath::start(&cfg)).unwrap().unwrap();
    let mut peers = PeerTable::default();
    peers.set(1, Some(ep(ab.a().ipv6())));
    peers.set(2, Some(ep(bc1.b().ipv6())));
    peers.set(3, Some(ep(bc2.b().ipv6())));
    let before = fib_of(&[(A, 1), (C, 2)]);
    let (written, removed) = b.run_in(|| fp.sync(&before, &peers)).unwrap().unwrap();
    assert_eq!((written, removed), (3 + 2, 0));

    let ping_c = || {
        a.ping(
            IpAddr::V6(C.parse().unwrap()),
            10,
            Duration::from_millis(50),
        )
        .unwrap()
    };
    let packets_via = |end: &hypha_testnet::LinkEnd| -> u64 {
        let out = c
            .exec_ok(["ip", "-j", "-s", "link", "show", "dev", end.ifname()])
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    };
    let p = ping_c();
    assert!(p.received >= 9, "ping a->c via b (link 1): {p:?}");
    let c0 = fp.counters().unwrap();
    assert!(c0.redirect >= 18, "{c0:?}");
    let link2_before = packets_via(bc2.b());

    // Reroute: link 1 goes down, the FIB moves c's /64 to peer 3 (link 2).
    bc1.set_up(false).unwrap();
    let after = fib_of(&[(A, 1), (C, 3)]);
    let (written, removed) = b.run_in(|| fp.sync(&after, &peers)).unwrap().unwrap();
    assert_eq!((written, removed), (1, 0), "only c's entry changes");
    let p = ping_c();
    assert!(p.received >= 9, "ping a->c via b after the reroute: {p:?}");
    let c1 = fp.counters().unwrap();
    assert!(c1.redirect >= c0.redirect + 18, "{c1:?}");
    // The requests now arrive at c over link 2 (its replies went that way all along).
    assert!(packets_via(bc2.b()) >= link2_before + 9);

    // The route disappears: the entry goes, packets pass up (nobody listens on b: lost).
    let gone = fib_of(&[(A, 1)]);
    let (_, removed) = b.run_in(|| fp.sync(&gone, &peers)).unwrap().unwrap();
    assert_eq!(removed, 1);
    let p = a
        .ping(IpAddr::V6(C.parse().unwrap()), 3, Duration::from_millis(50))
        .unwrap();
    assert_eq!(p.received, 0);
    assert!(fp.counters().unwrap().pass >= c1.pass + 3);

    // Crafted DATA frames from a peer (a test socket on a) to a /64 whose next hop is a plain
    // UDP socket on c: the frame arrives with the hop limit decremented, everything else intact,
    // from b's address and port (so the rewritten IPv6 and UDP checksums are right: c's kernel
    // checks the UDP one); at hop limit 1 it passes up to b instead.
    let injector = a
        .run_in(|| UdpSocket::bind((ab.a().ipv6(), 0)))
        .unwrap()
        .unwrap();
    let sink = c
        .run_in(|| UdpSocket::bind((bc2.b().ipv6(), 0)))
        .unwrap()
        .unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    peers.set(4, Some(injector.local_addr().unwrap()));
    peers.set(5, Some(sink.local_addr().unwrap()));
    let probe = fib_of(&[(A, 1), ("4ee:1:1:1::5", 5)]);
    let (written, _) = b.run_in(|| fp.sync(&probe, &peers)).unwrap().unwrap();
    assert_eq!(written, 3, "two peers and the 4ee /64");
    let mut frame = [0u8; 48 + 64];
    frame[0] = 0x01;
    frame[1] = 5;
    frame[16..32].copy_from_slice(&A.parse::<Ipv6Addr>().unwrap().octets());
    frame[32..48].copy_from_slice(&"4ee:1:1:1::5".parse::<Ipv6Addr>().unwrap().octets());
    for (i, byte) in frame[48..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    injector.send_to(&frame, ep(ab.b().ipv6())).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = hypha_testnet::retry_interrupted(|| sink.recv_from(&mut buf))
        .expect("the rewritten frame did not arrive (or arrived with a bad checksum)");
    assert_eq!(
        from,
        ep(bc2.a().ipv6()),
        "outer source: b's address towards c, b's port"
    );
    assert_eq!(n, frame.len());
    assert_eq!(buf[1], 4, "hop limit not decremented");
    assert_eq!(buf[0], frame[0]);
    assert_eq!(
        &buf[2..n],
        &frame[2..],
        "frame changed beyond the hop limit"
    );
    let before_hl = fp.counters().unwrap();
    frame[1] = 1;
    injector.send_to(&frame, ep(ab.b().ipv6())).unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "hop limit 1 was forwarded"
    );
    let after_hl = fp.counters().unwrap();
    assert_eq!(
        after_hl.pass_hop_limit,
        before_hl.pass_hop_limit + 1,
        "{after_hl:?}"
    );
    assert_eq!(after_hl.redirect, before_hl.redirect);

    let dir = fp.pin_dir().to_owned();
    fp.shutdown();
    assert!(!dir.exists());
    assert!(xdp_prog_ids(&b, ab.b().ifname()).is_empty());
    eprintln!("XDP reroute test ({setting:?}) took {:?}", t0.elapsed());
}

/// Not a test but a measurement (run with `cargo test --release -p hypha-dataplane --test xdp
/// -- --ignored --nocapture measure`): iperf3 TCP a→c through b, b's XDP off and on (driver),
/// alternating in one run; prints the medians and their ratio (bench/RESULTS.md, "XDP fast path"). Asserts
/// only that traffic flowed.
#[test]
#[ignore]
fn measure_transit_xdp_on_vs_off() {
    if !is_root() || !have("iperf3") || !have("ethtool") {
        eprintln!("skipped: needs root, iperf3 and ethtool");
        return;
    }
    hypha_testnet::ensure_bpffs().unwrap();
    let rounds: usize = std::env::var("XDP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let secs: u32 = std::env::var("XDP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let net = TestNet::new("xdpbench").unwrap();
    let _pins = PinRootGuard(pin_root(&net));
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let c = net.add_node("c").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let bc = net.link(&b, &c, LinkOpts::default()).unwrap();
    b.enable_forwarding().unwrap();
    // The same veth settings for both modes (native redirect needs them, see the module doc).
    for (node, end) in [(&a, ab.a()), (&c, bc.b())] {
        ethtool(node, end.ifname(), "tx", false);
        ethtool(node, end.ifname(), "gro", true);
    }
    let ep = |ip: std::net::Ipv4Addr| SocketAddr::new(IpAddr::V4(ip), PORT);
    let cfg_a = config(
        A,
        &[(1, ep(ab.b().ipv4()))],
        &[(&net64(C), 1), (&net64(B), 1)],
        &[Sess {
            peer: C,
            rx_index: 7,
            tx_index: 9,
            tx_key: key(0x33),
            rx_key: key(0x44),
        }],
    );
    let cfg_b = config(
        B,
        &[(1, ep(ab.a().ipv4())), (2, ep(bc.b().ipv4()))],
        &[(&net64(A), 1), (&net64(C), 2)],
        &[],
    );
    let cfg_c = config(
        C,
        &[(1, ep(bc.a().ipv4()))],
        &[(&net64(A), 1)],
        &[Sess {
            peer: A,
            rx_index: 9,
            tx_index: 7,
            tx_key: key(0x44),
            rx_key: key(0x33),
        }],
    );
    let _pa = start(&net, &a, "dp-a", &cfg_a, "off");
    let _pc = start(&net, &c, "dp-c", &cfg_c, "off");
    let mut results: Vec<(&str, f64, u64, u64)> = Vec::new();
    for round in 0..rounds {
        for mode in ["off", "driver"] {
            let pb = start(&net, &b, &format!("dp-b-{mode}-{round}"), &cfg_b, mode);
            let _ = a.ping(IpAddr::V6(C.parse().unwrap()), 3, Duration::from_millis(50));
            let (bytes, bps) = iperf(&c, &a, C, secs);
            assert!(bytes > 0, "no traffic with XDP {mode}");
            let redirect = stats(&b)
                .and_then(|v| v["counters"]["xdp_redirect"].as_u64())
                .unwrap_or(0);
            let user = counter(&b, "forwarded");
            eprintln!(
                "round {round} xdp={mode}: {:.3} Gbit/s (b: xdp_redirect {redirect}, user-space forwarded {user})",
                bps / 1e9
            );
            results.push((mode, bps, redirect, user));
            pb.stop().unwrap();
        }
    }
    let median = |mode: &str| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == mode)
            .map(|r| r.1)
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median("off"), median("driver"));
    eprintln!(
        "median a->c through b: XDP off {:.3} Gbit/s, XDP on {:.3} Gbit/s, ratio on/off {:.2}",
        off / 1e9,
        on / 1e9,
        on / off
    );
}
