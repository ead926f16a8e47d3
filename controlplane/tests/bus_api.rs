//! The bus's HTTP API through plain HTTP over TCP, the way an outside client uses it. The node
//! messages itself (frames to its own address loop back through the full bus protocol).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hypha_controlplane::bus::api::{not_found, ApiServer, MessageApi};
use hypha_controlplane::bus::client::request;
use hypha_controlplane::bus::shared::{BusDriver, NoTransport, SharedBus};
use hypha_controlplane::bus::BusConfig;
use hypha_proto::key::SecretKey;
use serde_json::{json, Value};

struct Node {
    addr: SocketAddr,
    ip: String,
    pk: String,
    _server: ApiServer,
    _driver: BusDriver,
}

fn node(cfg: BusConfig) -> Node {
    let sk = SecretKey::generate();
    let pk = sk.public_key();
    let ip = pk.address();
    let bus = SharedBus::new(cfg, ip);
    let driver = bus
        .spawn_driver(Box::new(NoTransport::default()))
        .expect("thread");
    let api = Arc::new(MessageApi::new(Arc::clone(&bus), pk, Box::new(|_| None)));
    let server =
        ApiServer::start("127.0.0.1:0".parse().expect("addr"), api, not_found()).expect("listen");
    Node {
        addr: server.local_addr(),
        ip: ip.to_string(),
        pk: hex::encode(pk.as_bytes()),
        _server: server,
        _driver: driver,
    }
}

fn call(n: &Node, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let r = request(
        n.addr,
        method,
        path,
        body.as_deref().map(str::as_bytes),
        Duration::from_secs(30),
    )
    .expect("HTTP");
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&r.body).into()))
    };
    (r.status, v)
}

#[test]
fn push_receive_status_reply() {
    let n = node(BusConfig::default());
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (s, v) = call(
        &n,
        "POST",
        "/api/v1/messages",
        Some(
            &json!({"dst": {"ip": n.ip}, "topic": B64.encode("t1"), "payload": B64.encode(&payload)}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 16);
    let topic = B64.encode("t1").replace('=', "%3D");
    let (s, m) = call(
        &n,
        "GET",
        &format!("/api/v1/messages?timeout=5&peek=true&topic={topic}"),
        None,
    );
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["srcIp"], n.ip.as_str());
    assert_eq!(m["srcPk"], n.pk.as_str());
    assert_eq!(m["dstIp"], n.ip.as_str());
    assert_eq!(m["dstPk"], n.pk.as_str());
    assert_eq!(m["topic"], B64.encode("t1"));
    let got = B64
        .decode(m["payload"].as_str().expect("payload"))
        .expect("b64");
    assert_eq!(blake3::hash(&got), blake3::hash(&payload));
    // Peeked, so still there; now take it.
    let (s, _) = call(&n, "GET", "/api/v1/messages", None);
    assert_eq!(s, 200);
    let (s, _) = call(&n, "GET", "/api/v1/messages", None);
    assert_eq!(s, 204, "taken");

    let (s, st) = call(&n, "GET", &format!("/api/v1/messages/status/{id}"), None);
    assert_eq!(s, 200);
    assert_eq!(st["state"], "received");
    assert_eq!(st["dst"], n.ip.as_str());
    assert_eq!(st["msgLen"], 100_000);
    assert!(st["deadline"].as_u64().expect("n") >= st["created"].as_u64().expect("n") + 299);

    // Reply flow: a sender waits with reply_timeout while the receiver answers.
    let n = Arc::new(n);
    let n2 = Arc::clone(&n);
    let asker = std::thread::spawn(move || {
        call(
            &n2,
            "POST",
            "/api/v1/messages?reply_timeout=10",
            Some(&json!({"dst": {"pk": n2.pk}, "payload": B64.encode("question")})),
        )
    });
    let (s, q) = call(&n, "GET", "/api/v1/messages?timeout=10", None);
    assert_eq!(s, 200);
    assert_eq!(q["payload"], B64.encode("question"));
    let qid = q["id"].as_str().expect("id");
    let (s, _) = call(
        &n,
        "POST",
        &format!("/api/v1/messages/reply/{qid}"),
        Some(&json!({"dst": {"ip": n.ip}, "payload": B64.encode("answer")})),
    );
    assert_eq!(s, 204);
    let (s, r) = asker.join().expect("thread");
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["payload"], B64.encode("answer"));

    let (s, k) = call(&n, "GET", &format!("/api/v1/pubkey/{}", n.ip), None);
    assert_eq!((s, k["NodePubKey"].as_str()), (200, Some(n.pk.as_str())));
    let (s, _) = call(&n, "GET", "/api/v1/pubkey/400::77", None);
    assert_eq!(s, 404);

    let r = request(n.addr, "GET", "/metrics", None, Duration::from_secs(5)).expect("HTTP");
    let text = String::from_utf8(r.body).expect("utf8");
    assert_eq!(r.status, 200);
    assert!(text.contains("hypha_bus_delivered_total 3"), "{text}");
    assert!(text.contains("hypha_bus_outbound_bytes 0"), "{text}");
}

#[test]
fn reply_timeout_expires_with_408() {
    let n = node(BusConfig::default());
    let t0 = Instant::now();
    let (s, v) = call(
        &n,
        "POST",
        "/api/v1/messages?reply_timeout=1",
        Some(&json!({"dst": {"ip": n.ip}, "payload": ""})),
    );
    assert_eq!(s, 408);
    assert_eq!(v["id"].as_str().map(str::len), Some(16));
    assert!(t0.elapsed() >= Duration::from_secs(1));
}

#[test]
fn malformed_requests_get_4xx_json() {
    let n = node(BusConfig {
        max_message_size: 100,
        max_outbound_per_dst: 700,
        max_inbound_per_src: 1000,
        ..BusConfig::default()
    });
    let ip = n.ip.clone();
    let bad: Vec<(&str, String, String, u16)> = vec![
        ("POST", "/api/v1/messages".into(), "".into(), 400),
        ("POST", "/api/v1/messages".into(), "{".into(), 400),
        ("POST", "/api/v1/messages".into(), "[]".into(), 400),
        (
            "POST",
            "/api/v1/messages".into(),
            r#"{"payload":"aGk="}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            r#"{"dst":{},"payload":"aGk="}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            format!(r#"{{"dst":{{"ip":"{ip}","pk":"00"}},"payload":""}}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            r#"{"dst":{"ip":"10.0.0.1"},"payload":""}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            r#"{"dst":{"ip":"fe80::1"},"payload":""}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            r#"{"dst":{"pk":"xyz"},"payload":""}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            format!(r#"{{"dst":{{"ip":"{ip}"}},"payload":"!!!"}}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            format!(r#"{{"dst":{{"ip":"{ip}"}},"topic":"%%","payload":""}}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            format!(r#"{{"dst":{{"ip":"{ip}"}},"payload":5}}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            format!(
                r#"{{"dst":{{"ip":"{ip}"}},"payload":"{}"}}"#,
                B64.encode([0u8; 101])
            ),
            413,
        ),
        (
            "POST",
            "/api/v1/messages".into(),
            format!(
                r#"{{"dst":{{"ip":"{ip}"}},"topic":"{}","payload":""}}"#,
                B64.encode([0u8; 256])
            ),
            400,
        ),
        (
            "POST",
            "/api/v1/messages?reply_timeout=x".into(),
            format!(r#"{{"dst":{{"ip":"{ip}"}},"payload":""}}"#),
            400,
        ),
        ("GET", "/api/v1/messages?timeout=-1".into(), "".into(), 400),
        ("GET", "/api/v1/messages?peek=maybe".into(), "".into(), 400),
        ("GET", "/api/v1/messages?topic=***".into(), "".into(), 400),
        ("GET", "/api/v1/messages/status/xyz".into(), "".into(), 400),
        (
            "GET",
            "/api/v1/messages/status/0123456789abcdef".into(),
            "".into(),
            404,
        ),
        (
            "POST",
            "/api/v1/messages/reply/0123456789abcdef".into(),
            r#"{"dst":{"ip":"400::1"},"payload":""}"#.into(),
            404,
        ),
        ("POST", "/api/v1/messages/reply/zz".into(), "{}".into(), 400),
        ("GET", "/api/v1/pubkey/notanip".into(), "".into(), 400),
        ("GET", "/api/v1/pubkey/10.0.0.1".into(), "".into(), 400),
        ("DELETE", "/api/v1/messages".into(), "".into(), 405),
        ("GET", "/api/v1/nothing".into(), "".into(), 404),
    ];
    for (method, path, body, want) in bad {
        let r = request(
            n.addr,
            method,
            &path,
            Some(body.as_bytes()),
            Duration::from_secs(10),
        )
        .expect("HTTP");
        assert_eq!(r.status, want, "{method} {path} {body}");
        let v: Value = serde_json::from_slice(&r.body).expect("JSON error body");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {v}"
        );
    }
    // Limits: unread messages are charged to the receiver (1000 bytes: two messages with their
    // 256-byte overhead); a third waits unacknowledged in the sender's 700 bytes, and the next push
    // finds the destination full: 503, nothing accepted is dropped.
    let body = json!({"dst": {"ip": ip}, "payload": B64.encode([1u8; 100])});
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(call(&n, "POST", "/api/v1/messages", Some(&body)).0);
    }
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 503),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "the destination limit must be reached: {statuses:?}"
    );
}

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("proc");
    // Fields after the command name (which is in parentheses): utime is 14th, stime 15th overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("stat format");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn long_poll_waits_without_burning_cpu() {
    let n = node(BusConfig::default());
    let before = cpu_ticks();
    let t0 = Instant::now();
    let (s, _) = call(&n, "GET", "/api/v1/messages?timeout=5", None);
    let took = t0.elapsed();
    let used = cpu_ticks() - before;
    assert_eq!(s, 204);
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(7),
        "{took:?}"
    );
    // The server runs in this process: 5 s of busy polling would be ~500 ticks.
    assert!(used < 30, "used {used} ticks of CPU during a 5 s long poll");
}

fn hypha(n: &Node, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypha"))
        .arg("message")
        .args(["--api-addr", &n.addr.to_string()])
        .args(args)
        .output()
        .expect("run hypha");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn cli_send_receive_status_wait() {
    let n = Arc::new(node(BusConfig::default()));
    let (ok, id) = hypha(&n, &["send", &n.ip, "--topic", "greet", "hello there"]);
    assert!(ok);
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 16);
    let (ok, raw) = hypha(
        &n,
        &["receive", "--topic", "greet", "--timeout", "5", "--raw"],
    );
    assert!(ok);
    assert_eq!(raw, "hello there");
    let (ok, st) = hypha(&n, &["--json", "status", &id]);
    assert!(ok);
    let st: Value = serde_json::from_str(&st).expect("json");
    assert_eq!(st["state"], "received");
    let (ok, _) = hypha(&n, &["status", "0123456789abcdef"]);
    assert!(!ok, "unknown id fails");

    // --file and --wait: a responder answers through the HTTP API.
    let dir = std::env::temp_dir().join(format!("hypha-bus-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("payload.bin");
    std::fs::write(&file, [0u8, 1, 2, 255]).expect("write");
    let n2 = Arc::clone(&n);
    let responder = std::thread::spawn(move || {
        let (s, q) = call(&n2, "GET", "/api/v1/messages?timeout=10", None);
        assert_eq!(s, 200);
        assert_eq!(q["payload"], B64.encode([0u8, 1, 2, 255]));
        let qid = q["id"].as_str().expect("id").to_owned();
        let (s, _) = call(
            &n2,
            "POST",
            &format!("/api/v1/messages/reply/{qid}"),
            Some(&json!({"dst": {"ip": n2.ip}, "payload": B64.encode("got it")})),
        );
        assert_eq!(s, 204);
    });
    let pk = n.pk.clone();
    let (ok, reply) = hypha(
        &n,
        &[
            "--json",
            "send",
            &pk,
            "--wait",
            "--timeout",
            "10",
            "--file",
            file.to_str().expect("utf8"),
        ],
    );
    responder.join().expect("responder");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok);
    let reply: Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["payload"], B64.encode("got it"));
    let (ok, none) = hypha(&n, &["--json", "receive", "--timeout", "1"]);
    assert!(ok);
    assert_eq!(none.trim(), "null");
}
