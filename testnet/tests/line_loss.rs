//! Issue 2's "Done when" for the harness: three namespaces in a line a–b–c with 10 % loss on b–c
//! (in c's namespace, incoming). Neighbours a–b ping fine, b→c shows the loss, and after the drop
//! nothing of the test is left in the kernel. Plus: cleanup also happens when the body panics.

use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use hypha_testnet::{LinkOpts, TestNet};

/// Asserts with the raw tools (not the harness's own `leftovers`) that `tag` is gone.
fn assert_nothing_left(tag: &str) {
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(netns.status.success() && links.status.success());
    let prefix_dash = format!("{tag}-");
    let prefix_us = format!("{tag}_");
    for (what, out) in [("namespace", &netns.stdout), ("link", &links.stdout)] {
        let text = String::from_utf8_lossy(out);
        let left: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&prefix_dash) || l.contains(&prefix_us))
            .collect();
        assert!(left.is_empty(), "{what} of {tag} left behind: {left:?}");
    }
    let left = TestNet::leftovers(tag).unwrap();
    assert!(left.is_empty(), "leftovers: {left:?}");
}

#[test]
fn line_with_loss_on_one_link() {
    let net = TestNet::new("line_loss").unwrap();
    let tag = net.tag().to_string();
    let a = net.add_node("a").unwrap();
    let b = net.add_node("b").unwrap();
    let c = net.add_node("c").unwrap();
    let ab = net.link(&a, &b, LinkOpts::default()).unwrap();
    // Loss on packets arriving at c (end `b` of this link), in c's namespace.
    let bc = net
        .link(&b, &c, LinkOpts::default().with_loss_to_b(10.0))
        .unwrap();
    assert_eq!(bc.b().netns(), c.netns());

    // Both namespaces and all four veth ends exist while the net lives.
    let left = TestNet::leftovers(&tag).unwrap();
    assert_eq!(left.namespaces.len(), 3, "{left:?}");
    let links_in = |node: &hypha_testnet::Node| node.exec_ok(["ip", "-o", "link"]).unwrap();
    assert!(links_in(&b).contains(ab.b().ifname()) && links_in(&b).contains(bc.a().ifname()));

    // Neighbours without loss: (near) all pings come back, over IPv4 and IPv6.
    let v4 = a
        .ping(IpAddr::V4(ab.b().ipv4()), 50, Duration::from_millis(10))
        .unwrap();
    assert!(v4.received >= 45, "a→b IPv4: {v4:?}");
    let v6 = a
        .ping(IpAddr::V6(ab.b().ipv6()), 20, Duration::from_millis(10))
        .unwrap();
    assert!(v6.received >= 18, "a→b IPv6: {v6:?}");

    // 10 % configured on the way into c: over 200 pings expect 2 %..25 % lost. (Binomial(200, 0.1)
    // is below 4 or above 50 with probability < 1e-5.)
    let bc_stats = b
        .ping(IpAddr::V4(bc.b().ipv4()), 200, Duration::from_millis(10))
        .unwrap();
    let loss = bc_stats.loss_ratio();
    eprintln!("b→c with 10 % configured: {bc_stats:?}");
    assert_eq!(bc_stats.transmitted, 200);
    assert!(
        (0.02..=0.25).contains(&loss),
        "b→c loss {loss} outside 2..25 %: {bc_stats:?}"
    );

    // The reverse direction has no rule: c→b replies may be lost only because requests were not.
    // Removing the rule restores the link.
    bc.set_loss(hypha_testnet::Side::B, 0.0).unwrap();
    let clean = b
        .ping(IpAddr::V4(bc.b().ipv4()), 50, Duration::from_millis(10))
        .unwrap();
    assert!(clean.received >= 45, "b→c after removing loss: {clean:?}");

    drop(net);
    assert_nothing_left(&tag);
}

#[test]
fn cleanup_happens_when_the_test_body_panics() {
    let seen: Mutex<Option<(String, u32, std::path::PathBuf)>> = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let net = TestNet::new("panicking").unwrap();
        let x = net.add_node("x").unwrap();
        let y = net.add_node("y").unwrap();
        net.link(&x, &y, LinkOpts::default().with_loss(5.0))
            .unwrap();
        let proc = x
            .spawn_args(
                "sleeper",
                ["sh", "-c", "echo hello-from-sleeper; exec sleep 1000"],
            )
            .unwrap();
        hypha_testnet::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            proc.log().is_ok_and(|l| l.contains("hello-from-sleeper"))
        })
        .unwrap();
        *seen.lock().unwrap() = Some((net.tag().to_string(), proc.pid(), proc.log_path().into()));
        panic!("deliberate panic inside a TestNet");
    }));
    assert!(result.is_err(), "the body must have panicked");
    let (tag, pid, log) = seen.lock().unwrap().take().expect("body ran");

    assert_nothing_left(&tag);
    // The process was killed and reaped: its PID is gone (or, after reuse, is not our sleeper).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("1000"),
        "sleeper {pid} still alive"
    );
    // On failure the logs are kept for the reader.
    let text = std::fs::read_to_string(&log).expect("log kept after a panic");
    assert!(text.contains("hello-from-sleeper"));
    if let Some(dir) = log.parent() {
        std::fs::remove_dir_all(dir).unwrap();
    }
}
