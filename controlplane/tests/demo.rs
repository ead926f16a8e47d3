//! `hypha demo` end to end: the real binary, run to completion and interrupted half-way; either
//! way nothing it created may remain (namespaces, veths, `hypha`/`hypha-dp` processes).
//!
//! Needs root and `hypha-dp` built next to `hypha` (`cargo build -p hypha-dataplane`). The demo's
//! kernel objects are named `hd<its pid in base 36>-<n>...`; other tests make `hy...` ones, so
//! only `hd` names are compared, and the two tests here run one after the other.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{dp_bin, BIN};
use serde_json::Value;

/// One demo at a time: both build namespaces and start 8 processes on a 2-CPU machine, and the
/// before/after comparison of `hd` names must only see one demo's.
static ONE_DEMO: Mutex<()> = Mutex::new(());

/// The prefix of every name a demo with this PID creates (`hd<pid>-`).
fn demo_prefix(pid: u32) -> String {
    hypha_testnet::tag_prefix("hd", pid)
}

/// What of the demo's kind exists now: `hd` namespaces, `hd` interfaces in this namespace, and
/// processes running our `hypha` or `hypha-dp` binaries (as `pid cmdline`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Snapshot {
    namespaces: BTreeSet<String>,
    links: BTreeSet<String>,
    procs: BTreeSet<String>,
}

fn snapshot() -> Snapshot {
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("hd"))
        .map(String::from)
        .collect();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("hd"))
        .collect();
    let ours = [PathBuf::from(BIN), dp_bin()];
    let mut procs = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if !ours.iter().any(|o| same_file(o, &exe)) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        procs.insert(format!("{name} {}", cmdline.trim()));
    }
    Snapshot {
        namespaces,
        links,
        procs,
    }
}

fn same_file(ours: &Path, exe: &Path) -> bool {
    let ours = std::fs::canonicalize(ours).unwrap_or_else(|_| ours.to_path_buf());
    // A binary rebuilt while running shows as "path (deleted)".
    let exe = exe.to_string_lossy();
    let exe = exe.trim_end_matches(" (deleted)");
    Path::new(exe) == ours
}

/// Waits for `child` up to `limit`; past it, SIGINT (the demo cleans up), then SIGKILL.
fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("hypha demo took longer than {limit:?} (stopped with SIGINT: {status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("hypha demo took longer than {limit:?} and ignored SIGINT");
}

/// The names in `after` that have the demo's `prefix` or were not there `before`.
fn left_over<'a>(
    after: &'a BTreeSet<String>,
    before: &BTreeSet<String>,
    prefix: &str,
) -> Vec<&'a String> {
    after
        .iter()
        .filter(|n| n.starts_with(prefix) || !before.contains(*n))
        .collect()
}

/// Asserts that nothing with the demo's prefix is left and that no process of our binaries has
/// appeared since `before` (processes of a stopped node may take a moment to be reaped).
fn assert_nothing_left(before: &Snapshot, pid: u32) {
    let prefix = demo_prefix(pid);
    let mut after = snapshot();
    let end = Instant::now() + Duration::from_secs(10);
    while !after.procs.is_subset(&before.procs) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        after = snapshot();
    }
    let new_procs: Vec<&String> = after.procs.difference(&before.procs).collect();
    assert!(
        new_procs.is_empty(),
        "processes left by the demo: {new_procs:?}"
    );
    let ns = left_over(&after.namespaces, &before.namespaces, &prefix);
    assert!(ns.is_empty(), "namespaces left by the demo: {ns:?}");
    let links = left_over(&after.links, &before.links, &prefix);
    assert!(links.is_empty(), "links left by the demo: {links:?}");
    let stray: Vec<&String> = after.procs.iter().filter(|p| p.contains(&prefix)).collect();
    assert!(stray.is_empty(), "processes of the demo's nodes: {stray:?}");
}

/// Takes the one-demo lock, checks that `hypha-dp` is built, records what exists, then starts
/// `hypha ARGS` with stdout and stderr piped. Hold the guard until the test ends.
fn start_demo(args: &[&str]) -> (MutexGuard<'static, ()>, Snapshot, Child) {
    let one = ONE_DEMO.lock().unwrap_or_else(|p| p.into_inner());
    dp_bin();
    let before = snapshot();
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hypha demo");
    (one, before, child)
}

#[test]
fn demo_runs_to_completion_and_leaves_nothing_behind() {
    let (_one, before, mut child) = start_demo(&["demo", "--json"]);
    let pid = child.id();
    // Read both pipes while it runs, so a full pipe can never block it.
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait_bounded(&mut child, Duration::from_secs(240));
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    eprintln!("hypha demo --json ({status}), stderr:\n{stderr}\nstdout:\n{stdout}");

    assert_nothing_left(&before, pid);

    let v: Value = serde_json::from_str(&stdout).expect("the JSON summary on stdout");
    assert!(
        v["tag"]
            .as_str()
            .is_some_and(|t| t.starts_with(&demo_prefix(pid))),
        "{v}"
    );
    assert_eq!(v["nodes"], 4);
    assert_eq!(v["links"].as_array().map(Vec::len), Some(4), "a ring of 4");
    assert_eq!(v["addresses"].as_object().map(|a| a.len()), Some(4));
    assert_eq!(v["converge"]["routes"], 12);
    assert!(v["ping"]["received"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(
        v["ping"]["path"].as_array().is_some_and(|p| p.len() == 3),
        "a → c is two hops in a ring of 4: {v}"
    );
    assert_eq!(v["reroute"]["ok"], true, "{v}");
    assert_ne!(
        v["reroute"]["path_before"], v["reroute"]["path_after"],
        "the cut must change the path: {v}"
    );
    assert_eq!(v["cleanup"]["leftovers"], serde_json::json!([]), "{v}");
    assert_eq!(v["cleanup"]["processes"], 8, "4 × hypha + hypha-dp: {v}");
    assert_eq!(
        v["message"]["ok"], true,
        "the message step failed (is the bus carried between nodes?): {}",
        v["message"]
    );
    assert_eq!(v["ok"], true, "{v}");
    assert!(status.success(), "hypha demo exited with {status}");
}

#[test]
fn demo_interrupted_after_start_cleans_up() {
    let (_one, before, mut child) = start_demo(&["demo"]);
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut signalled = false;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        seen.push(line.clone());
        // The nodes are running (their processes and namespaces exist): stop it here.
        if line.contains(" nodes ") && line.starts_with('✔') {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            )
            .expect("SIGINT the demo");
            signalled = true;
            break;
        }
    }
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let status = wait_bounded(&mut child, Duration::from_secs(60));
    seen.extend(rest.join().unwrap());
    let stderr = err.join().unwrap();
    let out = seen.join("\n");
    eprintln!("hypha demo ({status}), stdout:\n{out}\nstderr:\n{stderr}");
    assert!(signalled, "the nodes step never reported success");

    assert_nothing_left(&before, pid);
    assert_eq!(status.signal(), None, "it must exit, not die of the signal");
    assert_eq!(status.code(), Some(130), "128 + SIGINT");
    assert!(out.contains("interrupted by SIGINT"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with('✔') && l.contains("cleanup")),
        "{out}"
    );
}

#[test]
fn demo_refuses_a_bad_node_count() {
    for n in ["1", "17", "x"] {
        let out = Command::new(BIN)
            .args(["demo", "--nodes", n])
            .output()
            .expect("run hypha demo");
        assert_eq!(out.status.code(), Some(2), "--nodes {n}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--nodes"), "--nodes {n}: {err}");
    }
}
