//! The message bus between nodes: real `hypha` + `hypha-dp` processes in network namespaces,
//! driven only from outside, as any client would: plain HTTP to each node's API and the `hypha`
//! CLI (`message`, `peers`).
//!
//! Needs root and `hypha-dp` built next to `hypha` (`cargo build -p hypha-dataplane`). Run with
//! `cargo test -p hypha-controlplane --test bus_network`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{Overlay, PORT};
use hypha_testnet::{wait_until, LinkOpts};
use serde_json::{json, Value};

/// Nodes in namespaces, each running `hypha run` with its dataplane (no TUN: the bus needs none).
fn net(test: &str, names: &[&str]) -> Overlay {
    let mut n = Overlay::new(test, names);
    n.extra = vec!["--no-tun".into(), "--xdp".into(), "off".into()];
    n.api_wait = Duration::from_secs(15);
    n
}

/// The bus tests' own helpers.
impl Overlay {
    /// Starts `name` and waits for its API (address and key learnt).
    fn start_node(&mut self, name: &str) {
        self.start(name);
        self.learn(name);
    }

    fn has_route(&self, from: &str, to: &str) -> bool {
        let want = &self.subnets[to];
        self.get::<Value>(from, "/api/v1/admin/routes/selected")
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|rs| rs.iter().any(|r| r["subnet"] == want.as_str()))
    }

    fn wait_route(&self, from: &str, to: &str, limit: Duration) {
        wait_until(limit, Duration::from_millis(200), || {
            self.has_route(from, to)
        })
        .unwrap_or_else(|_| panic!("no route {from} → {to}: {}", self.log(from)));
    }

    fn bus_stat(&self, name: &str, key: &str) -> Option<u64> {
        self.get::<Value>(name, "/api/v1/admin/stats")?["bus"][key].as_u64()
    }

    /// Pushes a message; returns its id.
    fn push(&self, from: &str, dst: Value, topic: &[u8], payload: &[u8]) -> String {
        let body = json!({
            "dst": dst,
            "topic": B64.encode(topic),
            "payload": B64.encode(payload),
        });
        let r = self
            .http(from, "POST", "/api/v1/messages", Some(body))
            .expect("push answered");
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let v: Value = serde_json::from_slice(&r.body).expect("json");
        v["id"].as_str().expect("id").to_string()
    }

    /// Long-polls `name`'s inbox until a message arrives or `limit` passes.
    fn receive(&self, name: &str, limit: Duration) -> Option<Value> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let r = self.http(name, "GET", "/api/v1/messages?timeout=5", None)?;
            if r.status == 200 {
                return serde_json::from_slice(&r.body).ok();
            }
            assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        }
        None
    }

    fn state(&self, name: &str, id: &str) -> Value {
        self.get::<Value>(name, &format!("/api/v1/messages/status/{id}"))
            .map(|v| v["state"].clone())
            .unwrap_or(Value::Null)
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The command name may contain spaces: fields count from after its closing parenthesis.
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

#[test]
fn lossy_delayed_line_carries_a_mebibyte_and_a_reply() {
    let mut n = net("busline", &["a", "b", "c"]);
    let lossy = LinkOpts::default()
        .with_loss(5.0)
        .with_delay(Duration::from_millis(20));
    n.link_with("b", "a", lossy.clone());
    n.link_with("b", "c", lossy);
    for x in ["b", "a", "c"] {
        n.start_node(x);
    }
    n.wait_route("a", "c", Duration::from_secs(40));
    n.wait_route("c", "a", Duration::from_secs(40));

    // c is no neighbour of a: its key comes from the route (Babel's origin key).
    let c_ip = n.addrs["c"].to_string();
    let pk = n
        .get::<Value>("a", &format!("/api/v1/pubkey/{c_ip}"))
        .expect("a knows c's key");
    assert_eq!(pk["NodePubKey"], n.keys["c"].as_str());

    // 1 MiB of random bytes, addressed by c's public key.
    let payload: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    let sent_sum = blake3::hash(&payload);
    let t0 = Instant::now();
    let id = n.push("a", json!({ "pk": n.keys["c"] }), b"bulk", &payload);
    let m = n
        .receive("c", Duration::from_secs(80))
        .unwrap_or_else(|| panic!("c got nothing; a: {}\nc: {}", n.log("a"), n.log("c")));
    eprintln!(
        "1 MiB a → c over 2 lossy, delayed hops in {:?}",
        t0.elapsed()
    );
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["srcIp"], n.addrs["a"].to_string().as_str());
    assert_eq!(m["srcPk"], n.keys["a"].as_str());
    assert_eq!(m["topic"], B64.encode(b"bulk").as_str());
    let got = B64
        .decode(m["payload"].as_str().expect("payload"))
        .expect("base64");
    assert_eq!(got.len(), payload.len());
    assert_eq!(blake3::hash(&got), sent_sum, "payload checksum");
    // Mycelium's name for "the receiver has it" is `received`.
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        n.state("a", &id) == "received"
    })
    .unwrap_or_else(|_| panic!("status on a: {}", n.state("a", &id)));
    // Diagnostics for the log: how hard the bus had to work.
    let stats = n
        .get::<Value>("a", "/api/v1/admin/stats")
        .unwrap_or_default();
    eprintln!(
        "a: bus {}\nruntime {}\ndataplane {}",
        stats["bus"], stats["runtime"], stats["dataplane"]
    );
    let stats = n
        .get::<Value>("c", "/api/v1/admin/stats")
        .unwrap_or_default();
    eprintln!("c: bus {}", stats["bus"]);

    // `hypha message send --wait` on a gets the reply c sends through the API.
    let reply = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            n.cli(
                "a",
                &[
                    "--json",
                    "message",
                    "send",
                    "--topic",
                    "ask",
                    "--wait",
                    "--timeout",
                    "60",
                    &c_ip,
                    "ping",
                ],
            )
        });
        let q = n
            .receive("c", Duration::from_secs(60))
            .expect("c gets the question");
        assert_eq!(
            B64.decode(q["payload"].as_str().expect("payload"))
                .expect("b64"),
            b"ping"
        );
        let qid = q["id"].as_str().expect("id").to_string();
        let body = json!({
            "dst": { "ip": n.addrs["a"].to_string() },
            "payload": B64.encode(b"pong"),
        });
        let r = n
            .http(
                "c",
                "POST",
                &format!("/api/v1/messages/reply/{qid}"),
                Some(body),
            )
            .expect("reply answered");
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        sender.join().expect("sender thread")
    });
    assert!(
        reply.status.success(),
        "send --wait failed: {}",
        String::from_utf8_lossy(&reply.stderr)
    );
    let v: Value = serde_json::from_slice(&reply.stdout).expect("--json output");
    assert_eq!(
        B64.decode(v["payload"].as_str().expect("payload"))
            .expect("b64"),
        b"pong"
    );
    assert_eq!(v["srcIp"], c_ip.as_str());
}

#[test]
fn idle_long_poll_is_cheap_and_undeliverable_messages_expire() {
    let mut n = net("busidle", &["a"]);
    n.extra.extend(["--message-deadline".into(), "3s".into()]);
    n.start_node("a");
    // Let start-up settle before measuring.
    std::thread::sleep(Duration::from_secs(1));
    let pid = n.pid("a");

    // An empty inbox: `hypha message receive --timeout 5` waits it out without spinning.
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let out = n.cli("a", &["message", "receive", "--timeout", "5"]);
    let waited = t0.elapsed();
    let cpu = cpu_seconds(pid) - cpu0;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "no message expected");
    assert!(
        waited >= Duration::from_millis(4500),
        "returned after {waited:?}"
    );
    eprintln!("5 s long poll: {cpu:.3} s CPU in the node");
    assert!(
        cpu < 0.5,
        "the node used {cpu:.3} s CPU during a 5 s idle wait"
    );

    // A valid key nobody has: the message is aborted at its deadline and its memory released.
    let idle = n.bus_stat("a", "outbound_bytes").expect("bus stats");
    let nobody = hex::encode([0x5au8; 32]);
    let id = n.push("a", json!({ "pk": nobody }), b"", &[7u8; 50_000]);
    assert!(n.bus_stat("a", "outbound_bytes").expect("bus stats") > idle);
    wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        n.state("a", &id) == "aborted"
    })
    .unwrap_or_else(|_| panic!("status: {}; {}", n.state("a", &id), n.log("a")));
    assert_eq!(n.bus_stat("a", "outbound_bytes"), Some(idle));
    assert_eq!(n.bus_stat("a", "aborted"), Some(1));
}

#[test]
fn peers_removed_and_added_back_over_the_api() {
    let mut n = net("buspeers", &["a", "b", "c"]);
    let to_b = SocketAddr::new(n.link("b", "a").a().ip(false), PORT);
    n.link("b", "c");
    for x in ["b", "a", "c"] {
        n.start_node(x);
    }
    n.wait_route("a", "c", Duration::from_secs(30));
    let b_ep = format!("udp://{to_b}");
    let c_ip = n.addrs["c"].to_string();
    let send_and_receive = |what: &[u8]| {
        let id = n.push("a", json!({ "ip": c_ip }), b"p", what);
        let m = n
            .receive("c", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("nothing at c; a: {}", n.log("a")));
        assert_eq!(m["id"], id.as_str());
        assert_eq!(
            B64.decode(m["payload"].as_str().expect("payload"))
                .expect("b64"),
            what
        );
    };
    send_and_receive(b"before");

    // Remove: the CLI, then the API for the codes.
    let out = n.cli("a", &["peers", "remove", &b_ep]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("peer {b_ep} removed")
    );
    let enc: String = b_ep
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == b'.' {
                char::from(c).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    let del = n
        .http("a", "DELETE", &format!("/api/v1/admin/peers/{enc}"), None)
        .expect("answer");
    assert_eq!(del.status, 404);
    let out = n.cli("a", &["peers", "remove", &b_ep]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no peer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Routes via b disappear, and b is no peer of a any more.
    wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        !n.has_route("a", "c") && !n.has_route("a", "b")
    })
    .unwrap_or_else(|_| panic!("routes via b stayed: {}", n.log("a")));
    let peers = n.get::<Value>("a", "/api/v1/admin/peers").expect("peers");
    assert_eq!(peers.as_array().map(Vec::len), Some(0), "{peers}");

    // Bad and duplicate adds, then the real one through the CLI.
    let bad = n
        .http(
            "a",
            "POST",
            "/api/v1/admin/peers",
            Some(json!({ "endpoint": "tcp://1.2.3.4:9651" })),
        )
        .expect("answer");
    assert_eq!(bad.status, 400);
    let out = n.cli("a", &["--json", "peers", "add", &b_ep]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(v["result"], "added");
    let dup = n
        .http(
            "a",
            "POST",
            "/api/v1/admin/peers",
            Some(json!({ "endpoint": b_ep })),
        )
        .expect("answer");
    assert_eq!(dup.status, 409);
    let out = n.cli("a", &["peers", "add", &b_ep]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"));

    n.wait_route("a", "c", Duration::from_secs(30));
    send_and_receive(b"after");
}
