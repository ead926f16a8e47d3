//! Processes and code inside nodes: exec, spawn with logs, signals, process-group cleanup, run_in.

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use hypha_testnet::{wait_until, Error, LinkOpts, ProcExit, Signal, TestNet};

fn gone(pid: u32) -> bool {
    // Gone, or a zombie waiting for its new parent (init) to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn exec_runs_inside_the_namespace() {
    let net = TestNet::new("exec").unwrap();
    let a = net.add_node("a").unwrap();
    let links = a.exec_ok(["ip", "-o", "link"]).unwrap();
    // A fresh namespace: only lo, and it is up.
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    let out = a
        .exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    match a.exec_ok(["sh", "-c", "echo why >&2; exit 1"]) {
        Err(Error::Command { stderr, .. }) => assert_eq!(stderr, "why"),
        other => panic!("expected a command error, got {other:?}"),
    }
    assert!(matches!(net.add_node("a"), Err(Error::BadNodeName(_))));
    assert!(matches!(
        net.add_node("Bad-Name"),
        Err(Error::BadNodeName(_))
    ));
}

#[test]
fn spawned_processes_log_exit_and_die_by_signal() {
    let net = TestNet::new("spawn").unwrap();
    let a = net.add_node("a").unwrap();

    let echo = a
        .spawn_args("echo", ["sh", "-c", "echo to-stdout; echo to-stderr >&2"])
        .unwrap();
    assert_eq!(
        echo.wait_exit(Duration::from_secs(10)).unwrap(),
        ProcExit::Code(0)
    );
    let log = echo.log().unwrap();
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log}"
    );
    assert!(echo.log_path().starts_with(net.log_dir()));
    assert_eq!(echo.log_tail(1).unwrap(), log.lines().last().unwrap());

    let sleeper = a.spawn_args("sleeper", ["sleep", "1000"]).unwrap();
    assert!(sleeper.is_running());
    assert!(matches!(
        sleeper.wait_exit(Duration::from_millis(50)),
        Err(Error::Timeout(_))
    ));
    sleeper.kill(Signal::SIGTERM).unwrap();
    assert_eq!(
        sleeper.wait_exit(Duration::from_secs(10)).unwrap(),
        ProcExit::Signal(Signal::SIGTERM as i32)
    );
    assert!(!sleeper.is_running());
    // Signalling a reaped process is a no-op, never a stranger.
    sleeper.kill(Signal::SIGKILL).unwrap();

    // Waiting for a log line: found, or the process ended first.
    let talker = a
        .spawn_args("talker", ["sh", "-c", "sleep 0.2; echo ready; sleep 1000"])
        .unwrap();
    talker
        .wait_for_log("ready", Duration::from_secs(10))
        .unwrap();
    talker.stop().unwrap();
    let quitter = a.spawn_args("quitter", ["sh", "-c", "exit 7"]).unwrap();
    match quitter.wait_for_log("never", Duration::from_secs(10)) {
        Err(Error::Exited { exit, .. }) => assert_eq!(exit, ProcExit::Code(7)),
        other => panic!("expected Exited, got {other:?}"),
    }

    // Two processes with the same name get separate logs.
    let again = a.spawn_args("echo", ["true"]).unwrap();
    assert_ne!(again.log_path(), echo.log_path());
    again.wait_exit(Duration::from_secs(10)).unwrap();
}

#[test]
fn stop_kills_the_whole_process_group() {
    let net = TestNet::new("group").unwrap();
    let a = net.add_node("a").unwrap();
    // A shell that ignores SIGTERM and whose background child prints its PID.
    let shell = a
        .spawn_args(
            "shell",
            ["sh", "-c", "trap '' TERM; sleep 1000 & echo child=$!; wait"],
        )
        .unwrap();
    let mut child = 0u32;
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        child = shell
            .log()
            .ok()
            .and_then(|l| l.trim().strip_prefix("child=").and_then(|p| p.parse().ok()))
            .unwrap_or(0);
        child != 0
    })
    .unwrap();
    assert!(!gone(child));
    let exit = shell.stop().unwrap();
    assert_eq!(
        exit,
        ProcExit::Signal(Signal::SIGKILL as i32),
        "TERM was trapped"
    );
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        gone(child)
    })
    .unwrap();
}

#[test]
fn drop_stops_processes_and_namespaces_go() {
    let net = TestNet::new("dropstop").unwrap();
    let tag = net.tag().to_string();
    let a = net.add_node("a").unwrap();
    let p = a.spawn_args("sleeper", ["sleep", "1000"]).unwrap();
    let pid = p.pid();
    drop(net);
    assert!(!p.is_running());
    assert!(gone(pid));
    assert!(TestNet::leftovers(&tag).unwrap().is_empty());
    // Handles outlive the net but refuse to act.
    assert!(a.exec(["true"]).is_err());
    assert!(a.spawn_args("late", ["true"]).is_err());
}

#[test]
fn run_in_uses_the_nodes_addresses() {
    let net = TestNet::new("run_in").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let a_ip = IpAddr::V4(ab.a().ipv4());
    // The address exists only inside a's namespace.
    assert!(UdpSocket::bind((a_ip, 0)).is_err());
    let rx = a
        .run_in(move || UdpSocket::bind((a_ip, 0)))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let to = rx.local_addr().unwrap();
    b.run_in(move || {
        let tx = UdpSocket::bind("0.0.0.0:0").unwrap();
        tx.send_to(b"hi", to).unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 8];
    let (n, from) = hypha_testnet::retry_interrupted(|| rx.recv_from(&mut buf)).unwrap();
    assert_eq!(&buf[..n], b"hi");
    assert_eq!(from.ip(), IpAddr::V4(ab.b().ipv4()));
    // A panic inside run_in reaches the caller.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.run_in(|| panic!("inside")).unwrap();
    }));
    assert!(caught.is_err());
}

#[test]
fn nodes_route_when_forwarding_is_on() {
    let net = TestNet::new("route").unwrap();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let c = net.add_node("c").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    let bc = net.link(&b, &c, LinkOpts::default()).unwrap();
    b.enable_forwarding().unwrap();
    let via_b = ab.b().ipv4().to_string();
    let c_net = format!("{}/32", bc.b().ipv4());
    a.exec_ok(["ip", "route", "add", &c_net, "via", &via_b])
        .unwrap();
    let back = format!("{}/32", ab.a().ipv4());
    c.exec_ok([
        "ip",
        "route",
        "add",
        &back,
        "via",
        &bc.a().ipv4().to_string(),
    ])
    .unwrap();
    let stats = a
        .ping(IpAddr::V4(bc.b().ipv4()), 5, Duration::from_millis(20))
        .unwrap();
    assert!(stats.received >= 4, "{stats:?}");
}
