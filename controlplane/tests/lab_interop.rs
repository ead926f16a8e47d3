//! Lab mode against babeld and BIRD, in network namespaces (issue 8's acceptance tests).
//!
//! Every node gets a /128 (and a /32) on `lo` — 2001:db8:N::1 and 10.255.N.1 — announced by whatever
//! router runs there. Timers are short (1 s Hellos, 4 s updates) so that a chain converges in a
//! few seconds. Needs root, babeld, bird2 and tshark.

use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hypha_controlplane::lab::dump::Dump;
use hypha_testnet::{wait_until, Link, LinkOpts, Node, ProcHandle, Signal, TestNet};

const HYPHA: &str = env!("CARGO_BIN_EXE_hypha");
/// The issue's bound for a three-node chain.
const CONVERGE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hypha,
    Babeld,
    Bird,
}

fn v6_of(n: u8) -> String {
    format!("2001:db8:{n}::1")
}

fn v4_of(n: u8) -> String {
    format!("10.255.{n}.1")
}

/// A file in the net's log directory (kept when a test fails).
fn file(net: &TestNet, name: &str) -> PathBuf {
    net.log_dir().join(name)
}

/// Puts node `n`'s addresses on `lo` and turns forwarding on.
fn prepare(node: &Node, n: u8) {
    node.enable_forwarding().unwrap();
    node.exec_ok([
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/128", v6_of(n)),
        "dev",
        "lo",
    ])
    .unwrap();
    node.exec_ok([
        "ip",
        "addr",
        "add",
        &format!("{}/32", v4_of(n)),
        "dev",
        "lo",
    ])
    .unwrap();
}

/// Waits until `ifname` in `node` has a non-tentative link-local address (babeld and BIRD only send
/// from one) and returns it.
fn link_local(node: &Node, ifname: &str) -> Ipv6Addr {
    let mut found = None;
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let out = node
            .exec_ok([
                "ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "link",
            ])
            .unwrap_or_default();
        found = out
            .lines()
            .filter(|l| !l.contains("tentative"))
            .find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "inet6")?;
                w.get(i + 1)?.split('/').next()?.parse().ok()
            });
        found.is_some()
    })
    .unwrap_or_else(|_| panic!("no link-local address on {ifname}"));
    found.unwrap()
}

/// Starts router `kind` on `node` (number `n`) over `ifaces`.
fn start(
    net: &TestNet,
    node: &Node,
    n: u8,
    kind: Kind,
    ifaces: &[&str],
    extra: &[&str],
) -> ProcHandle {
    for i in ifaces {
        link_local(node, i);
    }
    match kind {
        Kind::Hypha => {
            let mut cmd = Command::new(HYPHA);
            cmd.arg("lab");
            for i in ifaces {
                cmd.args(["-i", i]);
            }
            cmd.args([
                "--redistribute",
                "2001:db8::/32",
                "--redistribute",
                "10.255.0.0/16",
                "--hello-interval",
                "1",
                "--update-interval",
                "4",
                "--seed",
                &n.to_string(),
            ]);
            cmd.args(extra);
            cmd.env("RUST_LOG", "hypha_controlplane=debug");
            node.spawn(&format!("hypha{n}"), cmd).unwrap()
        }
        Kind::Babeld => {
            let conf = file(net, &format!("babeld{n}.conf"));
            // Extra lines first, so that `default ...` lines apply to the interfaces below.
            let mut text = String::new();
            for l in extra {
                text.push_str(l);
                text.push('\n');
            }
            for i in ifaces {
                text.push_str(&format!(
                    "interface {i} type wired hello-interval 1 update-interval 4\n"
                ));
            }
            std::fs::write(&conf, text).unwrap();
            let pid = file(net, &format!("babeld{n}.pid"));
            let state = file(net, &format!("babeld{n}.state"));
            node.spawn_args(
                &format!("babeld{n}"),
                [
                    "babeld",
                    "-d",
                    "1",
                    "-c",
                    conf.to_str().unwrap(),
                    "-I",
                    pid.to_str().unwrap(),
                    "-S",
                    state.to_str().unwrap(),
                ],
            )
            .unwrap()
        }
        Kind::Bird => {
            let conf = file(net, &format!("bird{n}.conf"));
            let sock = file(net, &format!("bird{n}.ctl"));
            // Extra arguments are lines inside every interface block (e.g. authentication).
            let inner: String = extra.iter().map(|l| format!(" {l}")).collect();
            let mut ifs = String::new();
            for i in ifaces {
                ifs.push_str(&format!(
                    "  interface \"{i}\" {{ type wired; hello interval 1 s; update interval 4 s;{inner} }};\n"
                ));
            }
            let text = format!(
                "router id {v4};\n\
                 protocol device {{ scan time 1; }}\n\
                 protocol direct {{ ipv4; ipv6; interface \"lo\"; }}\n\
                 protocol kernel {{ ipv6 {{ export where source = RTS_BABEL; }}; }}\n\
                 protocol kernel {{ ipv4 {{ export where source = RTS_BABEL; }}; }}\n\
                 protocol babel {{\n{ifs}  ipv6 {{ import all; export all; }};\n  ipv4 {{ import all; export all; }};\n}}\n",
                v4 = v4_of(n)
            );
            std::fs::write(&conf, text).unwrap();
            node.spawn_args(
                &format!("bird{n}"),
                [
                    "bird",
                    "-f",
                    "-c",
                    conf.to_str().unwrap(),
                    "-s",
                    sock.to_str().unwrap(),
                ],
            )
            .unwrap()
        }
    }
}

/// The kernel's route to `dst` in `node`, if it goes through a gateway.
fn route_to(node: &Node, dst: &str) -> Option<String> {
    let fam = if dst.contains(':') { "-6" } else { "-4" };
    let out = node.exec_ok(["ip", fam, "route", "show", dst]).ok()?;
    let line = out.lines().next()?.to_string();
    line.contains("via").then_some(line)
}

fn wait_route(node: &Node, dst: &str, what: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut last = None;
    if wait_until(CONVERGE, POLL, || {
        last = route_to(node, dst);
        last.is_some()
    })
    .is_err()
    {
        panic!(
            "{what}: no route to {dst} in {} after {CONVERGE:?}",
            node.name()
        );
    }
    (last.unwrap(), start.elapsed())
}

fn ping(node: &Node, src: &str, dst: &str) -> bool {
    node.exec(["ping", "-c", "1", "-W", "1", "-I", src, dst])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn wait_ping(node: &Node, src: &str, dst: &str) {
    wait_until(Duration::from_secs(15), POLL, || ping(node, src, dst))
        .unwrap_or_else(|_| panic!("ping {src} -> {dst} from {} fails", node.name()));
}

fn dump(node: &Node) -> Dump {
    let out = node
        .exec_ok([HYPHA, "lab", "dump", "--json"])
        .expect("hypha lab dump");
    serde_json::from_str(&out).expect("dump JSON")
}

/// A line n1 – n2 – n3 with the given routers; returns the net, nodes, links and processes.
struct Line {
    /// Dropping it tears the whole network down.
    net: TestNet,
    nodes: Vec<Node>,
    links: Vec<Link>,
    procs: Vec<ProcHandle>,
}

fn line(name: &str, kinds: [Kind; 3]) -> Line {
    line_with(name, kinds, [&[], &[], &[]], |_| {})
}

/// [`line`] with extra arguments (hypha) or configuration lines (babeld) per node, and a hook that
/// runs on the nodes before any router starts.
fn line_with(
    name: &str,
    kinds: [Kind; 3],
    extra: [&[&str]; 3],
    before: impl FnOnce(&[Node]),
) -> Line {
    let net = TestNet::new(name).unwrap();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| net.add_node(&format!("n{i}")).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        prepare(n, i as u8 + 1);
    }
    let l12 = net.link(&nodes[0], &nodes[1], LinkOpts::default()).unwrap();
    let l23 = net.link(&nodes[1], &nodes[2], LinkOpts::default()).unwrap();
    let ifs: [Vec<&str>; 3] = [
        vec![l12.a().ifname()],
        vec![l12.b().ifname(), l23.a().ifname()],
        vec![l23.b().ifname()],
    ];
    before(&nodes);
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(start(
            &net,
            &nodes[i],
            i as u8 + 1,
            kinds[i],
            &ifs[i],
            extra[i],
        ));
    }
    Line {
        net,
        nodes,
        links: vec![l12, l23],
        procs,
    }
}

/// n1 learns n3's /128 via n2 (within 30 s) and pings it; and the other way round.
fn check_line(l: &Line, what: &str) {
    let (r, took) = wait_route(&l.nodes[0], &v6_of(3), what);
    let via_if = l.links[0].a().ifname();
    assert!(r.contains(via_if), "{what}: {r}");
    eprintln!("{what}: n1 got {} after {took:?}: {r}", v6_of(3));
    wait_route(&l.nodes[2], &v6_of(1), what);
    wait_ping(&l.nodes[0], &v6_of(1), &v6_of(3));
    for p in &l.procs {
        assert!(p.is_running(), "{what}: {} died", p.name());
    }
}

#[test]
fn babeld_hypha_babeld_line() {
    // babeld at both ends sends RFC 9616 timestamps, so hypha measures RTT to both.
    let ts: &[&str] = &["default enable-timestamps true"];
    let l = line_with(
        "lab_bhb",
        [Kind::Babeld, Kind::Hypha, Kind::Babeld],
        [ts, &[], ts],
        |_| {},
    );
    check_line(&l, "babeld-hypha-babeld");
    // Hypha installed both ends' prefixes with its protocol number.
    let ours = l.nodes[1]
        .exec_ok(["ip", "-6", "route", "show", "proto", "104"])
        .unwrap();
    assert!(
        ours.contains(&v6_of(1)) && ours.contains(&v6_of(3)),
        "{ours}"
    );
    let mut d = dump(&l.nodes[1]);
    assert!(d
        .routes
        .iter()
        .any(|r| r.prefix == format!("{}/128", v6_of(3)) && r.selected));
    assert!(
        d.xroutes.contains(&format!("{}/128", v6_of(2))),
        "{:?}",
        d.xroutes
    );
    wait_until(Duration::from_secs(10), POLL, || {
        d = dump(&l.nodes[1]);
        d.neighbours.len() == 2 && d.neighbours.iter().all(|n| n.rtt_ms.is_some())
    })
    .unwrap_or_else(|_| panic!("no RTT to both babeld neighbours: {:?}", d.neighbours));
    // tshark decodes what hypha sends while timestamps are on (Hello and IHU sub-TLVs).
    let if_n1 = l.links[0].b().ifname();
    let capture = Capture::start(&l.net, &l.nodes[1], if_n1);
    // Hellos every second: at least three of ours in the capture.
    std::thread::sleep(Duration::from_secs(4));
    let text = capture.decode_ours(&l.net, link_local(&l.nodes[1], if_n1));
    assert!(text.contains("Timestamp"), "no timestamp sub-TLV decoded");
    // The text form, as `hypha lab dump` prints it.
    let text = l.nodes[1].exec_ok([HYPHA, "lab", "dump"]).unwrap();
    assert!(
        text.contains("neighbour fe80::") && text.contains(" selected"),
        "{text}"
    );
}

#[test]
fn babeld_hypha_babeld_line_ipv4() {
    let l = line("lab_bhb4", [Kind::Babeld, Kind::Hypha, Kind::Babeld]);
    wait_route(&l.nodes[0], &v4_of(3), "ipv4 through hypha");
    wait_ping(&l.nodes[0], &v4_of(1), &v4_of(3));
}

/// IPv4 prefixes over links without IPv4 addresses: Updates with AE 4 and routes installed as
/// `via inet6 fe80::…` (RFC 9229), both by babeld and by hypha.
#[test]
fn babeld_hypha_babeld_line_v4_via_v6() {
    let v4v6: &[&str] = &["default v4-via-v6 true"];
    let l = line_with(
        "lab_bhb46",
        [Kind::Babeld, Kind::Hypha, Kind::Babeld],
        [v4v6, &[], v4v6],
        |nodes| {
            for n in nodes {
                let out = n.exec_ok(["ip", "-o", "link", "show"]).unwrap();
                for name in out.lines().filter_map(|l| l.split(':').nth(1)) {
                    let name = name.trim().split('@').next().unwrap_or("");
                    if name != "lo" {
                        n.exec_ok(["ip", "-4", "addr", "flush", "dev", name])
                            .unwrap();
                    }
                }
            }
        },
    );
    let (r, _) = wait_route(&l.nodes[0], &v4_of(3), "v4-via-v6 through hypha");
    assert!(r.contains("via inet6 fe80::"), "{r}");
    let (r2, _) = wait_route(&l.nodes[1], &v4_of(3), "hypha's own v4-via-v6 route");
    assert!(
        r2.contains("via inet6 fe80::") && r2.contains("proto 104"),
        "{r2}"
    );
    wait_ping(&l.nodes[0], &v4_of(1), &v4_of(3));
}

#[test]
fn hypha_babeld_babeld_line() {
    let l = line_with(
        "lab_hbb",
        [Kind::Hypha, Kind::Babeld, Kind::Babeld],
        [&[], &[], &[]],
        |nodes| {
            // A route of ours left by a "previous run": flushed when hypha starts.
            nodes[0]
                .exec_ok([
                    "ip",
                    "route",
                    "add",
                    "10.123.0.0/24",
                    "dev",
                    "lo",
                    "proto",
                    "104",
                ])
                .unwrap();
        },
    );
    check_line(&l, "hypha-babeld-babeld");
    let ours = l.nodes[0]
        .exec_ok(["ip", "-6", "route", "show", "proto", "104"])
        .unwrap();
    assert!(ours.contains(&v6_of(3)), "{ours}");
    let ours4 = l.nodes[0]
        .exec_ok(["ip", "route", "show", "proto", "104"])
        .unwrap();
    assert!(!ours4.contains("10.123.0.0"), "stale route kept: {ours4}");
    // SIGTERM: hypha exits cleanly and takes its kernel routes with it.
    l.procs[0].kill(Signal::SIGTERM).unwrap();
    let exit = l.procs[0].wait_exit(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit:?}");
    for fam in ["-4", "-6"] {
        let left = l.nodes[0]
            .exec_ok(["ip", fam, "route", "show", "proto", "104"])
            .unwrap();
        assert!(left.trim().is_empty(), "routes left after exit: {left}");
    }
}

/// Three hypha routers; the middle one configured from a TOML file (`-c`) with per-interface
/// timers, no flags.
#[test]
fn hypha_hypha_hypha_line_with_config_file() {
    let net = TestNet::new("lab_hhh").unwrap();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| net.add_node(&format!("n{i}")).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        prepare(n, i as u8 + 1);
    }
    let l12 = net.link(&nodes[0], &nodes[1], LinkOpts::default()).unwrap();
    let l23 = net.link(&nodes[1], &nodes[2], LinkOpts::default()).unwrap();
    let _p1 = start(&net, &nodes[0], 1, Kind::Hypha, &[l12.a().ifname()], &[]);
    // n3 also owns a prefix on an ifb device (no dummy module here), redistributed like `lo`'s.
    for cmd in [
        &["ip", "link", "add", "hyifb3", "type", "ifb"][..],
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:33::1/128",
            "dev",
            "hyifb3",
        ],
        &["ip", "link", "set", "hyifb3", "up"],
    ] {
        nodes[2].exec_ok(cmd.iter().copied()).unwrap();
    }
    let _p3 = start(&net, &nodes[2], 3, Kind::Hypha, &[l23.b().ifname()], &[]);
    let conf = file(&net, "hypha2.toml");
    std::fs::write(
        &conf,
        format!(
            "redistribute = [\"2001:db8::/32\"]\n\
             update-interval = 4.0\n\
             [[interface]]\nname = \"{}\"\nhello-interval = 1.0\n\
             [[interface]]\nname = \"{}\"\nhello-interval = 0.5\n",
            l12.b().ifname(),
            l23.a().ifname()
        ),
    )
    .unwrap();
    link_local(&nodes[1], l12.b().ifname());
    link_local(&nodes[1], l23.a().ifname());
    let mut cmd = Command::new(HYPHA);
    cmd.args(["lab", "-c", conf.to_str().unwrap()]);
    let _p2 = nodes[1].spawn("hypha2", cmd).unwrap();
    wait_route(&nodes[0], &v6_of(3), "hypha-hypha-hypha");
    wait_route(&nodes[2], &v6_of(1), "hypha-hypha-hypha");
    wait_ping(&nodes[0], &v6_of(1), &v6_of(3));
    wait_route(&nodes[0], "2001:db8:33::1", "prefix on an ifb device");
    let d = dump(&nodes[1]);
    let hellos: Vec<u64> = d.interfaces.iter().map(|i| i.hello_interval_ms).collect();
    assert_eq!(hellos, [1000, 500]);
    // Only IPv6 was asked for: no IPv4 prefix of n2 announced.
    assert!(d.xroutes.iter().all(|x| x.contains(':')), "{:?}", d.xroutes);
}

#[test]
fn bird_hypha_bird_line() {
    let l = line("lab_rhr", [Kind::Bird, Kind::Hypha, Kind::Bird]);
    check_line(&l, "bird-hypha-bird");
    wait_route(&l.nodes[0], &v4_of(3), "bird-hypha-bird ipv4");
    wait_ping(&l.nodes[0], &v4_of(1), &v4_of(3));
}

#[test]
fn hypha_bird_bird_line() {
    let l = line("lab_hrr", [Kind::Hypha, Kind::Bird, Kind::Bird]);
    check_line(&l, "hypha-bird-bird");
}

/// An interface deleted and re-created under the same name (new index, new link-local address):
/// hypha drops it, then picks it up again and routes over it.
#[test]
fn recreated_interface_is_picked_up_again() {
    let net = TestNet::new("lab_recr").unwrap();
    let n1 = net.add_node("n1").unwrap();
    let n2 = net.add_node("n2").unwrap();
    prepare(&n1, 1);
    prepare(&n2, 2);
    let l = net.link(&n1, &n2, LinkOpts::default()).unwrap();
    let (a, b) = (l.a().ifname(), l.b().ifname());
    let h = start(&net, &n1, 1, Kind::Hypha, &[a], &[]);
    let _b = start(&net, &n2, 2, Kind::Babeld, &[b], &[]);
    wait_route(&n1, &v6_of(2), "before re-creation");
    let old_ll = link_local(&n1, a);
    n1.exec_ok(["ip", "link", "del", a]).unwrap();
    let mut d = dump(&n1);
    wait_until(Duration::from_secs(10), POLL, || {
        d = dump(&n1);
        !d.interfaces[0].up
    })
    .unwrap_or_else(|_| panic!("deleted interface still up: {:?}", d.interfaces));
    n1.exec_ok([
        "ip",
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        l.b().netns(),
    ])
    .unwrap();
    n1.exec_ok(["ip", "link", "set", a, "up"]).unwrap();
    n2.exec_ok(["ip", "link", "set", b, "up"]).unwrap();
    wait_route(&n1, &v6_of(2), "after re-creation");
    wait_ping(&n1, &v6_of(1), &v6_of(2));
    d = dump(&n1);
    assert!(d.interfaces[0].up);
    assert_ne!(d.interfaces[0].link_local, old_ll.to_string());
    assert!(h.is_running());
}

/// A square a–b–c–d–a of hypha, babeld, hypha, babeld. Cutting the link a's route to c uses makes
/// a reroute through the other neighbour within the hold time.
#[test]
fn square_reroutes_when_a_link_is_cut() {
    let net = TestNet::new("lab_sq").unwrap();
    let nodes: Vec<Node> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| net.add_node(n).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        prepare(n, i as u8 + 1);
    }
    let ab = net.link(&nodes[0], &nodes[1], LinkOpts::default()).unwrap();
    let bc = net.link(&nodes[1], &nodes[2], LinkOpts::default()).unwrap();
    let cd = net.link(&nodes[2], &nodes[3], LinkOpts::default()).unwrap();
    let da = net.link(&nodes[3], &nodes[0], LinkOpts::default()).unwrap();
    let kinds = [Kind::Hypha, Kind::Babeld, Kind::Hypha, Kind::Babeld];
    let ifs: [Vec<&str>; 4] = [
        vec![ab.a().ifname(), da.b().ifname()],
        vec![ab.b().ifname(), bc.a().ifname()],
        vec![bc.b().ifname(), cd.a().ifname()],
        vec![cd.b().ifname(), da.a().ifname()],
    ];
    let _procs: Vec<ProcHandle> = (0..4)
        .map(|i| start(&net, &nodes[i], i as u8 + 1, kinds[i], &ifs[i], &[]))
        .collect();
    let c = v6_of(3);
    let (r, took) = wait_route(&nodes[0], &c, "square");
    eprintln!("square: a got {c} after {took:?}: {r}");
    wait_ping(&nodes[0], &v6_of(1), &c);
    // Cut the link the route uses.
    let (cut, other_if) = if r.contains(ab.a().ifname()) {
        (&ab, da.b().ifname())
    } else {
        (&da, ab.a().ifname())
    };
    cut.set_up(false).unwrap();
    let t0 = Instant::now();
    let cut_if = if std::ptr::eq(cut, &ab) {
        ab.a().ifname()
    } else {
        da.b().ifname()
    };
    // Hold time with 1 s Hellos: the neighbour is lost after a few missed Hellos and the route is
    // switched; allow the route expiry bound (3.5 update intervals = 14 s) as the worst case.
    wait_until(Duration::from_secs(14), Duration::from_millis(100), || {
        route_to(&nodes[0], &c).is_some_and(|r| r.contains(other_if))
    })
    .unwrap_or_else(|_| panic!("no reroute: {:?}", route_to(&nodes[0], &c)));
    eprintln!("square: rerouted via {other_if} after {:?}", t0.elapsed());
    wait_ping(&nodes[0], &v6_of(1), &c);
    // The neighbour behind the cut is unreachable now (cost infinite or gone from the table).
    wait_until(Duration::from_secs(15), POLL, || {
        !dump(&nodes[0])
            .neighbours
            .iter()
            .any(|n| n.iface == cut_if && n.cost < 0xffff)
    })
    .expect("neighbour behind the cut link still has a finite cost");
    // Restoring the link brings the neighbour back (multicast membership survives down/up).
    cut.set_up(true).unwrap();
    let mut d = dump(&nodes[0]);
    wait_until(Duration::from_secs(15), POLL, || {
        d = dump(&nodes[0]);
        d.neighbours.len() == 2 && d.neighbours.iter().all(|n| n.cost < 0xffff)
    })
    .unwrap_or_else(|_| {
        panic!(
            "neighbour not back after the link returned: {:?}",
            d.neighbours
        )
    });
}

/// A packet whose body is a Router-Id TLV (so that Updates after it have an originator) and `tlvs`.
fn with_router_id(tlvs: &[u8]) -> Vec<u8> {
    let mut body = vec![6, 10, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    body.extend_from_slice(tlvs);
    let len = u16::try_from(body.len()).unwrap().to_be_bytes();
    let mut p = vec![42, 2, len[0], len[1]];
    p.extend_from_slice(&body);
    p
}

/// Malformed Babel packets, each as a UDP payload sent to hypha's port from a link-local address.
/// Each must move one of the core's drop counters.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("bad magic", vec![43, 2, 0, 0]),
        ("bad version", vec![42, 3, 0, 0]),
        ("short header", vec![42]),
        (
            "body length past end",
            vec![42, 2, 0, 40, 4, 6, 0, 0, 0, 1, 0, 100],
        ),
        ("truncated TLV", vec![42, 2, 0, 1, 4]),
        ("TLV length past end", vec![42, 2, 0, 4, 8, 30, 0, 0]),
        // Update, AE 7 (no such address encoding).
        (
            "update bad AE",
            with_router_id(&[8, 10, 7, 0, 0, 0, 0, 100, 0, 1, 0, 96]),
        ),
        // Update, AE 2 (IPv6), prefix length 129.
        (
            "update bad plen",
            with_router_id(&[
                8, 14, 2, 0, 129, 0, 0, 100, 0, 1, 0, 96, 0x20, 0x01, 0x0d, 0xb8,
            ]),
        ),
        // Update for 2001:db8:77::/48 carrying sub-TLV 0x80 (unknown, mandatory): §4.4 says the
        // whole TLV is ignored.
        (
            "unknown mandatory sub-TLV",
            with_router_id(&[
                8, 18, 2, 0, 48, 0, 0, 100, 0, 1, 0, 96, 0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 0x80, 0,
            ]),
        ),
    ]
}

/// The core's counters of dropped input: invalid packets, invalid TLVs, TLVs ignored for an
/// unknown mandatory sub-TLV.
fn dropped(d: &Dump) -> u64 {
    ["packets_invalid", "tlvs_invalid", "tlvs_ignored"]
        .iter()
        .map(|k| d.router_counters.get(*k).copied().unwrap_or(0))
        .sum()
}

/// tshark capturing Babel on one interface of a node, into the net's log directory.
struct Capture {
    proc: ProcHandle,
    file: PathBuf,
}

impl Capture {
    fn start(net: &TestNet, node: &Node, ifname: &str) -> Capture {
        link_local(node, ifname);
        let file = file(net, &format!("{}-{ifname}.pcapng", node.name()));
        let proc = node
            .spawn_args(
                &format!("tshark-{ifname}"),
                [
                    "tshark",
                    "-i",
                    ifname,
                    "-w",
                    file.to_str().unwrap(),
                    "-f",
                    "udp port 6696",
                ],
            )
            .unwrap();
        // tshark prints "Capturing on" once it is ready.
        wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
            proc.log().unwrap_or_default().contains("Capturing on")
        })
        .expect("tshark did not start");
        Capture { proc, file }
    }

    /// Stops capturing and decodes the packets sent from `src` with `tshark -V`: they must all be
    /// Babel, none malformed or with an error-level expert note, and all with hop limit 1.
    /// Returns the decoded text.
    fn decode_ours(self, net: &TestNet, src: Ipv6Addr) -> String {
        self.proc.stop().unwrap();
        let filter = format!("ipv6.src == {src}");
        let out = Command::new("tshark")
            .args(["-r", self.file.to_str().unwrap(), "-Y", &filter, "-V"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::write(file(net, "tshark.txt"), text.as_bytes()).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let frames = text.matches("\nFrame ").count() + usize::from(text.starts_with("Frame "));
        let packets = text.matches("Babel Routing Protocol").count();
        assert!(packets >= 3, "too few of our packets decoded ({packets})");
        assert_eq!(packets, frames, "some of our packets are not Babel");
        // Link-local scope only: hop limit 1 on everything we send.
        let hops: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("Hop Limit:"))
            .collect();
        assert_eq!(hops.len(), packets);
        assert!(hops.iter().all(|l| *l == "Hop Limit: 1"), "{hops:?}");
        assert!(!text.contains("Malformed"), "tshark: malformed\n{text}");
        assert!(
            !text.contains("Expert Info (Error"),
            "tshark: error\n{text}"
        );
        text
    }
}

/// Malformed packets are dropped and counted; hypha keeps routing. Also: tshark decodes hypha's
/// own packets as Babel without malformed-packet or error expert info.
#[test]
fn malformed_packets_are_counted_and_tshark_decodes_ours() {
    let net = TestNet::new("lab_mal").unwrap();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| net.add_node(&format!("n{i}")).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        prepare(n, i as u8 + 1);
    }
    let l12 = net.link(&nodes[0], &nodes[1], LinkOpts::default()).unwrap();
    let l23 = net.link(&nodes[1], &nodes[2], LinkOpts::default()).unwrap();
    let if2 = l12.b().ifname();
    let capture = Capture::start(&net, &nodes[1], if2);
    let _p1 = start(&net, &nodes[0], 1, Kind::Babeld, &[l12.a().ifname()], &[]);
    let _p2 = start(
        &net,
        &nodes[1],
        2,
        Kind::Hypha,
        &[if2, l23.a().ifname()],
        &[],
    );
    let _p3 = start(&net, &nodes[2], 3, Kind::Babeld, &[l23.b().ifname()], &[]);
    wait_route(&nodes[0], &v6_of(3), "before malformed");
    wait_ping(&nodes[0], &v6_of(1), &v6_of(3));
    let hypha_ll = link_local(&nodes[1], if2);
    let n1_ll = link_local(&nodes[0], l12.a().ifname());
    let before = dump(&nodes[1]);

    // Send the list from n1's link-local address to hypha's, unicast.
    let ifindex = nodes[0]
        .run_in(|| nix::net::if_::if_nametoindex(l12.a().ifname()).unwrap())
        .unwrap();
    let sock = nodes[0]
        .run_in(|| UdpSocket::bind(SocketAddrV6::new(n1_ll, 0, 0, ifindex)).unwrap())
        .unwrap();
    let to = SocketAddrV6::new(hypha_ll, 6696, 0, ifindex);
    let mut after = before.clone();
    for (what, bytes) in malformed() {
        let base = dropped(&after);
        sock.send_to(&bytes, to).unwrap();
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            after = dump(&nodes[1]);
            dropped(&after) > base
        })
        .unwrap_or_else(|_| panic!("{what}: not counted ({:?})", after.router_counters));
    }
    // From a non-link-local source (the link's fd00:: address): dropped before the core.
    let global = nodes[0]
        .run_in(|| UdpSocket::bind(SocketAddrV6::new(l12.a().ipv6(), 0, 0, 0)).unwrap())
        .unwrap();
    global
        .send_to(
            &[42, 2, 0, 0],
            SocketAddrV6::new(l12.b().ipv6(), 6696, 0, 0),
        )
        .unwrap();
    wait_until(Duration::from_secs(5), POLL, || {
        after = dump(&nodes[1]);
        after.socket.not_link_local > before.socket.not_link_local
    })
    .expect("non-link-local source not counted");
    for ((k, a), (_, b)) in after.router_counters.iter().zip(&before.router_counters) {
        if a != b {
            eprintln!("counter {k}: {b} -> {a}");
        }
    }
    eprintln!("socket {:?} -> {:?}", before.socket, after.socket);
    // Still routing.
    assert!(wait_until(Duration::from_secs(10), POLL, || ping(
        &nodes[0],
        &v6_of(1),
        &v6_of(3)
    ))
    .is_ok());
    assert!(_p2.is_running());
    let text = capture.decode_ours(&net, hypha_ll);
    for tlv in ["hello (4)", "ihu (5)", "update (8)"] {
        assert!(
            text.contains(&format!("Message Type: {tlv}")),
            "no {tlv} decoded"
        );
    }
}

/// RFC 8967 with BIRD: the same HMAC-SHA256 key (BIRD's password string, hex-encoded for hypha).
#[test]
fn mac_authentication_with_bird() {
    let password = "hypha-lab-bird-secret-0123456789";
    let key: String = password.bytes().map(|b| format!("{b:02x}")).collect();
    let net = TestNet::new("lab_macr").unwrap();
    let n1 = net.add_node("n1").unwrap();
    let n2 = net.add_node("n2").unwrap();
    prepare(&n1, 1);
    prepare(&n2, 2);
    let l = net.link(&n1, &n2, LinkOpts::default()).unwrap();
    let auth = format!("authentication mac; password \"{password}\" {{ algorithm hmac sha256; }};");
    let _b = start(&net, &n1, 1, Kind::Bird, &[l.a().ifname()], &[&auth]);
    let m = format!("{}={key}", l.b().ifname());
    let _h = start(
        &net,
        &n2,
        2,
        Kind::Hypha,
        &[l.b().ifname()],
        &["--mac-key", &m],
    );
    wait_route(&n1, &v6_of(2), "mac: BIRD learns from hypha");
    wait_route(&n2, &v6_of(1), "mac: hypha learns from BIRD");
    let mac = dump(&n2).interfaces[0].mac.expect("mac counters");
    assert!(mac.accepted > 0 && mac.bad_mac == 0, "{mac:?}");
}

/// RFC 8967: hypha and babeld with the same HMAC-SHA256 key exchange routes (after the challenge
/// exchange both ways); a babeld with another key is not believed.
#[test]
fn mac_authentication_with_babeld() {
    // 32 bytes, babeld's usual key size (64-byte keys interoperate as well).
    let key = "8f".repeat(32);
    let wrong = "8e".repeat(32);
    let net = TestNet::new("lab_mac").unwrap();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| net.add_node(&format!("n{i}")).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        prepare(n, i as u8 + 1);
    }
    let l12 = net.link(&nodes[0], &nodes[1], LinkOpts::default()).unwrap();
    let l23 = net.link(&nodes[1], &nodes[2], LinkOpts::default()).unwrap();
    let babeld_conf = |k: &str, ifname: &str| {
        vec![
            format!("key id k1 type hmac-sha256 value {k}"),
            format!("interface {ifname} key k1"),
        ]
    };
    let c1 = babeld_conf(&key, l12.a().ifname());
    let c3 = babeld_conf(&wrong, l23.b().ifname());
    let c1: Vec<&str> = c1.iter().map(String::as_str).collect();
    let c3: Vec<&str> = c3.iter().map(String::as_str).collect();
    let _b1 = start(&net, &nodes[0], 1, Kind::Babeld, &[l12.a().ifname()], &c1);
    let _b3 = start(&net, &nodes[2], 3, Kind::Babeld, &[l23.b().ifname()], &c3);
    let capture = Capture::start(&net, &nodes[1], l12.b().ifname());
    let m12 = format!("{}={key}", l12.b().ifname());
    let m23 = format!("{}={key}", l23.a().ifname());
    let h = start(
        &net,
        &nodes[1],
        2,
        Kind::Hypha,
        &[l12.b().ifname(), l23.a().ifname()],
        &["--mac-key", &m12, "--mac-key", &m23],
    );
    wait_route(&nodes[0], &v6_of(2), "mac: babeld learns from hypha");
    wait_route(&nodes[1], &v6_of(1), "mac: hypha learns from babeld");
    // Give n3 the time n1 needed, and more: nothing from it may be believed.
    std::thread::sleep(Duration::from_secs(3));
    let d = dump(&nodes[1]);
    let good = d.interfaces[0].mac.expect("mac counters");
    assert!(
        good.accepted > 0 && good.challenge_replies_sent > 0,
        "{good:?}"
    );
    let bad = d.interfaces[1].mac.expect("mac counters");
    assert!(bad.bad_mac > 0 && bad.accepted == 0, "{bad:?}");
    assert!(route_to(&nodes[1], &v6_of(3)).is_none());
    assert!(
        !d.neighbours.iter().any(|n| n.iface == l23.a().ifname()),
        "{:?}",
        d.neighbours
    );

    // tshark decodes our signed packets (PC TLV in the body, MAC TLV in the trailer) cleanly.
    let hypha_ll = link_local(&nodes[1], l12.b().ifname());
    let text = capture.decode_ours(&net, hypha_ll);
    // (The challenge exchange happens in hypha's first milliseconds, possibly before tshark
    // really captures; the counters above show it took place.)
    for tlv in ["pc (17)", "hmac (16)"] {
        assert!(
            text.contains(&format!("Message Type: {tlv}")),
            "no {tlv} decoded"
        );
    }

    // A restarted hypha (same --seed, Packet Counter from zero again) is believed again: a prefix
    // added after the restart reaches n1, and n1's reaches hypha.
    h.kill(Signal::SIGTERM).unwrap();
    assert!(h.wait_exit(Duration::from_secs(10)).unwrap().success());
    nodes[1]
        .exec_ok(["ip", "-6", "addr", "add", "2001:db8:2::99/128", "dev", "lo"])
        .unwrap();
    let _h2 = start(
        &net,
        &nodes[1],
        2,
        Kind::Hypha,
        &[l12.b().ifname(), l23.a().ifname()],
        &["--mac-key", &m12, "--mac-key", &m23],
    );
    wait_route(
        &nodes[0],
        "2001:db8:2::99",
        "mac: babeld believes the restarted hypha",
    );
    wait_route(&nodes[1], &v6_of(1), "mac: restarted hypha believes babeld");
}
