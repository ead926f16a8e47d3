//! Integration tests of `hypha run` with its dataplane: real daemons and `hypha-dp` processes in
//! network namespaces, real TUN devices, `ping` and `iperf3` over the overlay.
//!
//! Needs root, `iperf3`, and `hypha-dp` built next to `hypha` (`cargo build -p hypha-dataplane`).
//! Run with `cargo test -p hypha-controlplane --test overlay_dataplane`.

mod common;

use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Overlay, BIN, PORT};
use hypha_controlplane::api::{RouteInfo, Stats};
use hypha_testnet::{wait_until, LinkOpts, Node};

/// Nodes with their dataplanes, TUN devices and XDP as `hypha run` defaults them.
fn overlay(test: &str, names: &[&str]) -> Overlay {
    let mut o = Overlay::new(test, names);
    o.log_lines = 60;
    o
}

/// The dataplane tests' own helpers.
impl Overlay {
    fn stats(&self, name: &str) -> Stats {
        self.get(name, "/api/v1/admin/stats").unwrap_or_default()
    }

    fn dp_counter(&self, name: &str, key: &str) -> Option<u64> {
        self.stats(name).get("dataplane")?.get(key).copied()
    }
}

fn wait_ping(o: &Overlay, from: &str, to: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if o.ping(from, to, 1) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn iperf(o: &Overlay, from: &str, to: &str, secs: u32, streams: u32) -> Option<serde_json::Value> {
    let server = o
        .node(to)
        .spawn_args(&format!("iperf3-s-{to}"), ["iperf3", "-s", "-1"])
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let dst = o.addrs[to].to_string();
    let out = o
        .node(from)
        .exec([
            "timeout",
            &(secs + 15).to_string(),
            "iperf3",
            "--connect-timeout",
            "3000",
            "-c",
            &dst,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .ok()?;
    let _ = server.stop();
    serde_json::from_slice(&out.stdout).ok()
}

fn bits_per_second(v: &serde_json::Value) -> f64 {
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
}

/// Captures UDP payloads sent to `port` on every interface of the namespace (AF_PACKET).
fn capture_data_packets(node: &Node, port: u16, dst: Ipv6Addr, dur: Duration) -> Vec<Vec<u8>> {
    node.run_in(move || {
        // SAFETY: plain socket(2); the fd is closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                (libc::ETH_P_IP as u16).to_be() as i32,
            )
        };
        assert!(fd >= 0, "AF_PACKET socket");
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a correctly sized timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut out = Vec::new();
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < dur {
            // SAFETY: recv into a buffer of the given length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let pkt = &buf[..n as usize];
            // IPv4 header, then UDP.
            if pkt.len() < 28 || pkt[9] != 17 {
                continue;
            }
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let Some(udp) = pkt.get(ihl..) else { continue };
            if udp.len() < 8 + 48 || u16::from_be_bytes([udp[2], udp[3]]) != port {
                continue;
            }
            let payload = &udp[8..];
            // DATA frame, TRANSPORT kind, to `dst`.
            if payload[0] == 0x01 && payload[2] == 0x00 && payload[32..48] == dst.octets() {
                out.push(payload.to_vec());
            }
        }
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        out
    })
    .expect("capture in namespace")
}

/// A UDP socket bound to `addr` with SO_REUSEPORT (joining the dataplane's port group).
fn reuseport_socket(addr: SocketAddr) -> UdpSocket {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket(2); ownership goes to the UdpSocket below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket");
    let one: libc::c_int = 1;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: setsockopt with an int option and bind with a sockaddr_in of the right length, on
    // the fd we just opened.
    unsafe {
        assert_eq!(
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEPORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            ),
            0
        );
        assert_eq!(
            libc::bind(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            ),
            0,
            "bind {addr}: {}",
            std::io::Error::last_os_error()
        );
        UdpSocket::from_raw_fd(fd)
    }
}

#[test]
fn line_forwarding_replay_and_restarts() {
    let t0 = Instant::now();
    let mut o = overlay("ovdp", &["a", "b", "c"]);
    o.link("a", "b");
    o.link("b", "c");
    for n in ["a", "b", "c"] {
        o.start(n);
    }
    let started = Instant::now();
    for n in ["a", "b", "c"] {
        o.learn(n);
    }
    let t = wait_ping(&o, "a", "c", Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "no ping a→c within 10 s\na: {}\nb: {}\nc: {}",
            o.log("a"),
            o.log("b"),
            o.log("c")
        )
    });
    eprintln!(
        "first ping a→c after {:?} (nodes started {:?} before)",
        t,
        started.elapsed()
    );

    for n in ["a", "b", "c"] {
        assert!(
            o.procs[n].is_running(),
            "{n} exited: {:?}\n{}",
            o.procs[n].try_exit(),
            o.log(n)
        );
    }
    // iperf3 TCP a→c over the overlay, 5 s.
    let v = iperf(&o, "a", "c", 5, 1).expect("iperf3 result");
    let bps = bits_per_second(&v);
    eprintln!("iperf3 a→c: {:.1} Mbit/s", bps / 1e6);
    assert!(bps > 1e6, "iperf3 moved too little: {v}");

    assert!(
        o.procs["b"].is_running(),
        "b exited after iperf: {:?}\n{}",
        o.procs["b"].try_exit(),
        o.log("b")
    );
    // Replay and bit flip: capture data packets to c on c's side while pinging, then replay.
    let c_addr = o.addrs["c"];
    let cap = {
        let node = o.node("c").clone();
        std::thread::spawn(move || {
            capture_data_packets(&node, PORT, c_addr, Duration::from_secs(2))
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(o.ping("a", "c", 3));
    let captured = cap.join().expect("capture thread");
    assert!(!captured.is_empty(), "no data packet to c captured");
    std::thread::sleep(Duration::from_secs(2));
    let replay0 = o
        .dp_counter("c", "dropped_replay")
        .expect("c's dataplane counters");
    let auth0 = o.dp_counter("c", "dropped_auth").expect("dropped_auth");
    let tun0 = o.dp_counter("c", "tun_tx_packets").expect("tun_tx_packets");
    let c_ip = o.links[&("b".to_string(), "c".to_string())].b().ipv4();
    let pkt = captured[0].clone();
    let mut flipped = pkt.clone();
    // A counter never used yet (past the replay check, which comes first), and one ciphertext
    // bit flipped: only the AEAD can refuse it.
    let counter = u64::from_be_bytes(flipped[8..16].try_into().expect("8 bytes")) + 1_000_000;
    flipped[8..16].copy_from_slice(&counter.to_be_bytes());
    flipped[48 + 3] ^= 0x10;
    // Sent from b's own endpoint (b's link address, port 9651, shared through SO_REUSEPORT), as
    // an on-path attacker would spoof it: a packet from an unknown source would already be
    // dropped by the XDP program, before the replay window could see it.
    let b_ip = o.links[&("b".to_string(), "c".to_string())].a().ipv4();
    o.node("b")
        .run_in(move || {
            let s = reuseport_socket(SocketAddr::new(b_ip.into(), PORT));
            s.send_to(&pkt, (c_ip, PORT)).expect("send replay");
            s.send_to(&flipped, (c_ip, PORT)).expect("send flipped");
        })
        .expect("in b");
    assert!(
        o.procs["b"].is_running(),
        "b exited after replay: {:?}\n{}",
        o.procs["b"].try_exit(),
        o.log("b")
    );
    let ok = wait_until(Duration::from_secs(6), Duration::from_millis(200), || {
        o.dp_counter("c", "dropped_replay").unwrap_or(0) > replay0
            && o.dp_counter("c", "dropped_auth").unwrap_or(0) > auth0
    });
    assert!(
        ok.is_ok(),
        "replay/auth drops not counted: {:?}",
        o.stats("c").get("dataplane")
    );
    assert_eq!(
        o.dp_counter("c", "tun_tx_packets"),
        Some(tun0),
        "a replayed or forged packet reached c's TUN"
    );

    // SIGKILL b's control plane during an iperf3 run and start it again at once (as a service
    // manager would): b's dataplane keeps forwarding, the new control plane attaches to it.
    let b_dp = o.dp_pid("b").expect("b's dataplane pid");
    let b_cp = o.procs["b"].pid();
    let (b_node, b_cmd) = (o.node("b").clone(), o.command("b"));
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        // SAFETY: kill(2) on the pid of the process we spawned.
        unsafe { libc::kill(b_cp as i32, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
        b_node.spawn("hypha-b-restarted", b_cmd).expect("restart b")
    });
    let v = iperf(&o, "a", "c", 5, 1).expect("iperf3 across b's control-plane restart");
    let restarted = killer.join().expect("killer");
    let old_b = o.procs.insert("b".to_string(), restarted);
    if let Some(old) = old_b {
        let _ = old.try_exit();
    }
    let bps = bits_per_second(&v);
    let intervals: Vec<f64> = v["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "iperf3 a→c with b's control plane killed at 1 s: {:.1} Mbit/s, intervals {:?}",
        bps / 1e6,
        intervals
            .iter()
            .map(|b| (b / 1e6) as u64)
            .collect::<Vec<_>>()
    );
    assert!(intervals.len() >= 5, "{v}");
    assert!(
        intervals.iter().all(|b| *b > 0.0),
        "the transfer stalled: {intervals:?}"
    );
    assert_eq!(o.dp_pid("b"), Some(b_dp), "b's dataplane was replaced");
    // b's new control plane attached to the running dataplane and resyncs.
    o.procs["b"]
        .wait_for_log("attached to the running dataplane", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}: {}", o.log("b")));
    o.procs["b"]
        .wait_for_log("resync complete", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}: {}", o.log("b")));
    assert!(
        wait_ping(&o, "a", "c", Duration::from_secs(10)).is_some(),
        "no route via b after b's resync: {}",
        o.log("b")
    );

    // Kill b's dataplane: the supervisor restarts it with a full replay.
    // SAFETY: kill(2) on the dataplane pid from b's pid file.
    unsafe { libc::kill(b_dp, libc::SIGKILL) };
    let back = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        o.dp_pid("b").is_some_and(|p| p != b_dp)
    });
    assert!(back.is_ok(), "b's dataplane not restarted: {}", o.log("b"));
    let t = wait_ping(&o, "a", "c", Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no forwarding after b's dataplane restart: {}", o.log("b")));
    eprintln!("forwarding through b's restarted dataplane after {t:?}");
    eprintln!("test took {:?}", t0.elapsed());
}

#[test]
fn pings_resume_over_a_second_path() {
    let t0 = Instant::now();
    let mut o = overlay("ovdp2", &["a", "b", "c", "d"]);
    o.link("a", "b");
    o.link("b", "c");
    o.link("a", "d");
    // 10 ms each way on d–c: Babel's RTT-based cost makes a prefer the path through b.
    o.link_with(
        "d",
        "c",
        LinkOpts::default().with_delay(Duration::from_millis(10)),
    );
    for n in ["a", "b", "c", "d"] {
        o.start(n);
    }
    for n in ["a", "b", "c", "d"] {
        o.learn(n);
    }
    assert!(
        wait_ping(&o, "a", "c", Duration::from_secs(15)).is_some(),
        "no ping a→c: {}",
        o.log("a")
    );
    let s = o.addrs["c"].segments();
    let c_subnet = format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0));
    let route_via = |o: &Overlay, table: &str, hop: &str| {
        let ip = o.links[&("a".to_string(), hop.to_string())].b().ipv4();
        o.get::<Vec<RouteInfo>>("a", &format!("/api/v1/admin/routes/{table}"))
            .unwrap_or_default()
            .iter()
            .any(|r| r.subnet == c_subnet && r.next_hop.contains(&ip.to_string()))
    };
    let via = |o: &Overlay, hop: &str| route_via(o, "selected", hop);
    // d learns c's route over the new link and offers a feasible alternative to a.
    wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        route_via(&o, "fallback", "d")
    })
    .unwrap_or_else(|_| {
        panic!(
            "a never learns the second path: {:?}",
            o.get::<Vec<RouteInfo>>("a", "/api/v1/admin/routes/fallback")
        )
    });
    assert!(via(&o, "b"), "a's route to c is not via b before the cut");
    // A steady ping run; cut b–c in the middle of it.
    let node = o.node("a").clone();
    let (src, dst) = (o.addrs["a"].to_string(), o.addrs["c"].to_string());
    let pinger = std::thread::spawn(move || {
        node.exec([
            "ping", "-6", "-D", "-c", "100", "-i", "0.1", "-W", "1", "-I", &src, &dst,
        ])
        .expect("ping")
    });
    std::thread::sleep(Duration::from_secs(2));
    o.links[&("b".to_string(), "c".to_string())]
        .set_up(false)
        .expect("cut b–c");
    let out = pinger.join().expect("pinger");
    assert!(via(&o, "d"), "a's route to c is not via d after the cut");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // Sequence numbers answered; the longest run of missing ones is the outage.
    let mut got: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    got.sort_unstable();
    got.dedup();
    let mut longest = 0;
    for w in got.windows(2) {
        longest = longest.max(w[1] - w[0] - 1);
    }
    let last = got.last().copied().unwrap_or(0);
    eprintln!(
        "{} of 100 answered, longest gap {} pings ({} ms), last seq {last}",
        got.len(),
        longest,
        longest * 100
    );
    assert!(last >= 95, "pings did not resume: {text}");
    assert!(longest <= 50, "outage over 5 s: {longest} pings\n{text}");
    eprintln!("test took {:?}", t0.elapsed());
}

/// Median RTT in ms of `count` pings from `from` to `dst` (`src`: bind address).
fn ping_rtt(node: &Node, src: &str, dst: &str, count: u32) -> Option<f64> {
    let out = node
        .exec([
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            "-I",
            src,
            dst,
        ])
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    rtts.get(rtts.len() / 2).copied()
}

fn iperf_to(node: &Node, server: &Node, dst: &str, secs: u32, streams: u32) -> f64 {
    let s = server
        .spawn_args("iperf3-bench-s", ["iperf3", "-s", "-1"])
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = node
        .exec([
            "timeout",
            &(secs + 15).to_string(),
            "iperf3",
            "-c",
            dst,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .expect("iperf3");
    let _ = s.stop();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map(|v| bits_per_second(&v))
        .unwrap_or(0.0)
}

/// The system benchmark of bench/RESULTS.md ("Integrated node"): a–b–c through Hypha next to the same
/// three namespaces routed by the kernel over the bare veths. Run with
/// `cargo test --release -p hypha-controlplane --test overlay_dataplane -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run by hand in release mode"]
fn bench_line_through_hypha_vs_bare_veth() {
    let mut o = overlay("ovbench", &["a", "b", "c"]);
    // HYPHA_BENCH_XDP=off|generic|driver|tc|auto picks hypha-dp's XDP mode (default: its own).
    if let Ok(mode) = std::env::var("HYPHA_BENCH_XDP") {
        o.extra = vec!["--xdp".into(), mode];
    }
    o.link("a", "b");
    o.link("b", "c");
    for n in ["a", "b", "c"] {
        o.start(n);
    }
    for n in ["a", "b", "c"] {
        o.learn(n);
    }
    assert!(wait_ping(&o, "a", "c", Duration::from_secs(10)).is_some());
    // The bare path: kernel routing over the same veths, b forwarding.
    let ab = &o.links[&("a".to_string(), "b".to_string())];
    let bc = &o.links[&("b".to_string(), "c".to_string())];
    let (a_ip, b_on_ab, b_on_bc, c_ip) = (
        ab.a().ipv4().to_string(),
        ab.b().ipv4().to_string(),
        bc.a().ipv4().to_string(),
        bc.b().ipv4().to_string(),
    );
    o.node("b").enable_forwarding().expect("forwarding on b");
    o.node("a")
        .exec_ok(["ip", "route", "add", &format!("{c_ip}/32"), "via", &b_on_ab])
        .expect("route a→c");
    o.node("c")
        .exec_ok(["ip", "route", "add", &format!("{a_ip}/32"), "via", &b_on_bc])
        .expect("route c→a");
    let (ha, hc) = (o.addrs["a"].to_string(), o.addrs["c"].to_string());
    let rows = [
        (
            "iperf3 TCP a→c, 1 stream (Gbit/s)",
            iperf_to(o.node("a"), o.node("c"), &c_ip, 5, 1) / 1e9,
            iperf_to(o.node("a"), o.node("c"), &hc, 5, 1) / 1e9,
        ),
        (
            "iperf3 TCP a→c, 4 streams (Gbit/s)",
            iperf_to(o.node("a"), o.node("c"), &c_ip, 5, 4) / 1e9,
            iperf_to(o.node("a"), o.node("c"), &hc, 5, 4) / 1e9,
        ),
        (
            "ping RTT a→c, median of 100 (ms)",
            ping_rtt(o.node("a"), &a_ip, &c_ip, 100).unwrap_or(f64::NAN),
            ping_rtt(o.node("a"), &ha, &hc, 100).unwrap_or(f64::NAN),
        ),
    ];
    println!("| measurement | bare veth | Hypha | Hypha / bare |");
    println!("|---|---:|---:|---:|");
    for (name, bare, hypha) in rows {
        println!("| {name} | {bare:.3} | {hypha:.3} | {:.3} |", hypha / bare);
    }
}

/// The XDP fast path's counters reach `GET /api/v1/admin/stats` and `hypha stats` (through the
/// hand-over stats the control plane polls): b's veth is attached in `tc` mode (`--xdp auto`,
/// the default, puts the TC ingress program alone on veth), and junk datagrams to b's port from a
/// non-peer source (a's address, another port) are dropped in the kernel and counted under
/// `xdp.drop_unknown_peer`.
#[test]
fn xdp_counters_in_stats_api_and_cli() {
    let mut o = overlay("ovxdp", &["a", "b"]);
    o.link("a", "b");
    for n in ["a", "b"] {
        o.start(n);
    }
    for n in ["a", "b"] {
        o.learn(n);
    }
    assert!(
        wait_ping(&o, "a", "b", Duration::from_secs(15)).is_some(),
        "no ping a→b\na: {}\nb: {}",
        o.log("a"),
        o.log("b")
    );
    let b_iface = o.links[&("a".to_string(), "b".to_string())]
        .b()
        .ifname()
        .to_string();
    let iface_group = format!("xdp_iface_{b_iface}");
    let attached = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let s = o.stats("b");
        s.get("xdp").and_then(|g| g.get("mode_tc")) == Some(&1)
            && s.get(&iface_group).and_then(|g| g.get("tc")) == Some(&1)
    });
    assert!(
        attached.is_ok(),
        "b's fast path not shown attached in tc mode: {:?}\n{}",
        o.stats("b"),
        o.log("b")
    );
    let s = o.stats("b");
    let xdp = &s["xdp"];
    assert_eq!(xdp.get("loaded"), Some(&1), "{xdp:?}");
    assert_eq!(xdp.get("interfaces"), Some(&1), "{xdp:?}");
    for name in hypha_ebpf::maps::XdpCounters::NAMES {
        assert!(xdp.contains_key(name), "xdp.{name} missing: {xdp:?}");
    }
    assert!(
        !s["dataplane"].keys().any(|k| k.starts_with("xdp_")),
        "XDP counters doubled in the dataplane group: {:?}",
        s["dataplane"]
    );

    // Junk to b's port from a's address but another port: not a peer, dropped in XDP.
    let drops0 = xdp["drop_unknown_peer"];
    let b_ip = o.links[&("a".to_string(), "b".to_string())].b().ipv4();
    const JUNK: u64 = 20;
    o.node("a")
        .run_in(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            for i in 0..JUNK {
                // First byte 0x01 (DATA): not a link handshake, which would pass.
                let junk = [0x01, i as u8, 0xde, 0xad, 0xbe, 0xef];
                s.send_to(&junk, (b_ip, PORT)).expect("send junk");
            }
        })
        .expect("in a");
    let counted = wait_until(Duration::from_secs(5), Duration::from_millis(200), || {
        o.stats("b")
            .get("xdp")
            .and_then(|g| g.get("drop_unknown_peer"))
            .is_some_and(|d| *d >= drops0 + JUNK)
    });
    assert!(
        counted.is_ok(),
        "junk drops not counted in xdp.drop_unknown_peer (was {drops0}): {:?}",
        o.stats("b").get("xdp")
    );

    // The CLI shows the same group, as JSON and as text.
    let out = o
        .node("b")
        .exec([BIN, "stats", "--json"])
        .expect("hypha stats --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hypha stats --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let cli_drops = v["xdp"]["drop_unknown_peer"].as_u64().unwrap_or(0);
    assert!(cli_drops >= drops0 + JUNK, "{}", v["xdp"]);
    assert_eq!(v["xdp"]["mode_tc"], 1, "{}", v["xdp"]);
    assert_eq!(v[&iface_group]["tc"], 1, "{v}");
    let text = o.node("b").exec_ok([BIN, "stats"]).expect("hypha stats");
    assert!(
        text.lines()
            .any(|l| l.starts_with("xdp.drop_unknown_peer ") || l.contains("xdp.drop_unknown_peer")),
        "{text}"
    );
}
