//! `hypha run`, `hypha peers` and `hypha routes` as a user meets them: exit codes, messages, the
//! config file and flags over it, the API, and a clean exit on SIGTERM. Runs in the host namespace on
//! ports picked free by the kernel; every process started here is killed by PID in `Drop`.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hypha_controlplane::api::AdminInfo;

const BIN: &str = env!("CARGO_BIN_EXE_hypha");

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("hypha-cli-run-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon that is SIGKILLed and reaped when dropped (unless it was waited for).
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run hypha")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("[::]:0").expect("bind udp");
    s.local_addr().expect("addr").port()
}

fn free_api_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("addr")
}

#[test]
fn run_with_a_missing_dataplane_names_it_and_exits_1() {
    let dir = Dir::new("nodp");
    let key = dir.0.join("k.bin");
    let port = free_udp_port().to_string();
    let api = free_api_addr().to_string();
    let runtime = dir.0.join("run");
    let o = run(&[
        "run",
        "-k",
        key.to_str().expect("utf-8 path"),
        "-p",
        &port,
        "--api-addr",
        &api,
        "--runtime-dir",
        runtime.to_str().expect("utf-8 path"),
        "--dataplane-bin",
        "/nonexistent/hypha-dp",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/hypha-dp"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_settings_exit_2_with_the_reason() {
    for (args, needle) in [
        (
            vec![
                "run",
                "--no-dataplane",
                "--peers",
                "udp://node.example:9651",
            ],
            "host names",
        ),
        (
            vec!["run", "--no-dataplane", "--peers", "udp://::1:9651"],
            "brackets",
        ),
        (
            vec!["run", "--no-dataplane", "--peers", "tcp://10.0.0.1:9651"],
            "only udp",
        ),
        (
            vec!["run", "--no-dataplane", "--hello-interval", "fast"],
            "invalid duration",
        ),
        (
            vec!["run", "--no-dataplane", "-c", "/nonexistent/hypha.toml"],
            "cannot read config",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    let dir = Dir::new("bad");
    let cfg = dir.0.join("bad.toml");
    std::fs::write(&cfg, "no_dataplane = true\nhello = 3\n").expect("write config");
    let o = run(&["run", "-c", cfg.to_str().expect("utf-8 path")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("hello"), "{}", stderr(&o));
    let key = dir.0.join("net.key");
    std::fs::write(&key, [1u8; 16]).expect("write key");
    let o = run(&[
        "run",
        "--no-dataplane",
        "--network-key",
        key.to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("exactly 32"), "{}", stderr(&o));
}

#[test]
fn clients_without_a_node_exit_1() {
    let addr = free_api_addr().to_string();
    for cmd in [["peers", "--api-addr"], ["routes", "--api-addr"]] {
        let o = run(&[cmd[0], cmd[1], &addr]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("is `hypha run` running?"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn config_file_flags_over_it_api_and_sigterm() {
    let dir = Dir::new("cfg");
    let port = free_udp_port();
    let api = free_api_addr();
    let cfg = dir.0.join("hypha.toml");
    let file_key = dir.0.join("file.key");
    let flag_key = dir.0.join("flag.key");
    std::fs::write(
        &cfg,
        format!(
            "key_file = {file_key:?}\nport = {port}\napi_addr = \"127.0.0.1:1\"\nno_dataplane = true\n\
             hello_interval = \"300ms\"\npeers = [\"udp://127.0.0.1:9\"]\n"
        ),
    )
    .expect("write config");
    // -k and --api-addr on the command line override the file.
    let child = Command::new(BIN)
        .args(["run", "-c", cfg.to_str().expect("utf-8 path")])
        .args(["-k", flag_key.to_str().expect("utf-8 path")])
        .args(["--api-addr", &api.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hypha run");
    let mut daemon = Daemon(Some(child));
    let pid = daemon.0.as_ref().map(Child::id).expect("child");

    let deadline = Instant::now() + Duration::from_secs(10);
    let admin: AdminInfo = loop {
        if let Ok(v) = hypha_controlplane::client::get_json(api, "/api/v1/admin") {
            break serde_json::from_value(v).expect("admin JSON");
        }
        assert!(Instant::now() < deadline, "the API never came up");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(flag_key.exists(), "the -k key file is used");
    assert!(
        !file_key.exists(),
        "the config file's key_file is overridden"
    );
    assert!(admin.node_subnet.ends_with("::/64"), "{admin:?}");
    assert_eq!(admin.node_pubkey.len(), 64);

    // The configured peer (nothing listens there) is listed and not alive.
    let o = run(&["peers", "--json", "--api-addr", &api.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let peers: serde_json::Value = serde_json::from_slice(&o.stdout).expect("peers JSON");
    assert_eq!(peers[0]["endpoint"]["socketAddr"], "127.0.0.1:9");
    assert_eq!(peers[0]["endpoint"]["proto"], "udp");
    assert_eq!(peers[0]["type"], "static");
    assert_ne!(peers[0]["connectionState"], "alive");
    let o = run(&["routes", "fallback", "--api-addr", &api.to_string()]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "no routes\n");
    // The message bus through the real daemon: a message to ourselves, then `hypha stats` shows it.
    let apis = api.to_string();
    let o = run(&[
        "message",
        "--api-addr",
        &apis,
        "send",
        &admin.node_ip,
        "--topic",
        "t",
        "hi",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run(&[
        "message",
        "--api-addr",
        &apis,
        "receive",
        "--topic",
        "t",
        "--timeout",
        "5",
        "--raw",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi", "{}", stderr(&o));
    let o = run(&["stats", "--json", "--api-addr", &apis]);
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stats JSON");
    assert_eq!(stats["bus"]["delivered"], 1, "{stats}");
    assert_eq!(stats["bus"]["read"], 1, "{stats}");
    assert!(stats["babel"].is_object());
    let o = run(&["stats", "--api-addr", &apis]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("bus.pushed"));
    // A long poll on an empty inbox returns 204 after 5 s, and the daemon process sleeps meanwhile.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc");
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r.to_owned())
            .expect("stat");
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().expect("ticks"))
            .collect();
        f.iter().sum::<u64>()
    };
    let before = cpu();
    let t0 = Instant::now();
    let o = run(&[
        "message",
        "--api-addr",
        &apis,
        "--json",
        "receive",
        "--timeout",
        "5",
    ]);
    let took = t0.elapsed();
    let used = cpu() - before;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "null");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(7),
        "{took:?}"
    );
    // Babel hellos every 300 ms cost a little; busy polling would be ~500 ticks.
    assert!(
        used < 40,
        "the daemon used {used} ticks during a 5 s long poll"
    );

    // The UDP port from the file is taken.
    assert!(
        UdpSocket::bind(("::", port)).is_err(),
        "port {port} should be in use"
    );

    // SIGTERM: clean exit with status 0.
    // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let mut child = daemon.0.take().expect("child");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hypha did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut log);
    }
    assert!(log.contains("shutting down"), "{log}");
}
