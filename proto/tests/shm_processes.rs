//! The shared-memory ring between two real processes.
//!
//! The parent creates a region and re-executes this test binary as the child, running only the
//! ignored `shm_child` entry point with `HYPHA_SHM_TEST_ROLE` saying what to do; the memfd and the
//! eventfds reach the child by inheritance (`Region::share_with`), exactly as they reach the
//! dataplane.

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use hypha_proto::shm::{
    Direction, PeerId, PopError, PuntReason, Received, Record, Region, RegionConfig, RegionFds,
    Resync, SendTo, ShmError, ABI_VERSION,
};

const ROLE_ENV: &str = "HYPHA_SHM_TEST_ROLE";
const COUNT_ENV: &str = "HYPHA_SHM_TEST_COUNT";
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Every this many records the producer sends a packet record instead of a small one.
const PACKET_EVERY: u64 = 1024;

/// The record the producer child sends as its `i`-th. `buf` is scratch for packet bytes.
fn nth_record(i: u64, buf: &mut [u8; 1500]) -> Record<'_> {
    if i % PACKET_EVERY == PACKET_EVERY - 1 {
        let len = (i % 1500) as usize;
        for (j, b) in buf.iter_mut().enumerate().take(len) {
            *b = (i as usize + j) as u8;
        }
        Record::PuntedPacket {
            from: SocketAddr::from(([127, 0, 0, 1], (i % 65536) as u16)),
            reason: PuntReason::LocalDelivery,
            bytes: &buf[..len],
        }
    } else {
        Record::PeerDown(PeerId(i))
    }
}

/// Kills the child on drop unless it was waited for: no process outlives a failed test.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn wait(mut self) -> Output {
        let child = self.0.take().expect("child present");
        child.wait_with_output().expect("wait for child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_child(region: &Region, role: &str, count: u64) -> ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([
        "--exact",
        "shm_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE_ENV, role)
    .env(COUNT_ENV, count.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    region.share_with(&mut cmd);
    ChildGuard(Some(cmd.spawn().expect("spawn child")))
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "child failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child's side. Ignored in normal runs; the tests below run it in a child process.
#[test]
#[ignore = "child-process entry point, run by the two-process tests"]
fn shm_child() {
    let role = std::env::var(ROLE_ENV).expect("child role");
    let count: u64 = std::env::var(COUNT_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: the parent passed these descriptors to us, and nothing else here owns them.
    let fds = unsafe { RegionFds::from_env() };
    let region = fds.and_then(Region::attach);
    match role.as_str() {
        "attach" => match region {
            Ok(_) => println!("ATTACH_RESULT ok"),
            Err(e) => println!("ATTACH_RESULT {e:?} | {e}"),
        },
        "produce" => {
            let region = region.expect("attach");
            let mut p = region.producer(Direction::Up).expect("producer");
            let mut buf = [0u8; 1500];
            for i in 0..count {
                p.push(&nth_record(i, &mut buf), PUSH_TIMEOUT)
                    .expect("push");
            }
            eprintln!(
                "producer epoch {} done, {} wakeups",
                p.epoch(),
                p.wakeups_sent()
            );
        }
        "echo" => {
            let region = region.expect("attach");
            let mut down = region.consumer(Direction::Down).expect("consumer");
            let mut up = region.producer(Direction::Up).expect("producer");
            let mut done = false;
            while !done {
                if !down.wait(Duration::from_secs(30)).expect("wait") {
                    panic!("no record from the parent for 30 s");
                }
                while let Some(r) = down.pop().expect("ring") {
                    let r = r.expect("valid record");
                    up.push(&r.record, PUSH_TIMEOUT).expect("echo");
                    done |= matches!(r.record, Record::Resync(Resync::End { .. }));
                }
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

/// Checks the `expected`-th record from a "produce" child.
fn check_nth(
    r: Result<Received<'_>, PopError>,
    expected: u64,
    first_seq: u64,
    buf: &mut [u8; 1500],
) {
    let got = r.unwrap_or_else(|e| panic!("record {expected}: {e}"));
    assert_eq!(got.meta.seq, first_seq + expected, "ring position");
    let want = nth_record(expected, buf);
    assert_eq!(got.record, want, "record {expected}");
}

/// Consumes `count` records of a "produce" child; returns the epochs seen.
fn consume_stream(c: &mut hypha_proto::shm::Consumer, count: u64, first_seq: u64) -> Vec<u64> {
    let mut next = 0u64;
    let mut buf = [0u8; 1500];
    let mut epochs = vec![];
    while next < count {
        let n = c
            .drain(256, |r| {
                if let Ok(r) = &r {
                    if epochs.last() != Some(&r.meta.epoch) {
                        epochs.push(r.meta.epoch);
                    }
                }
                check_nth(r, next, first_seq, &mut buf);
                next += 1;
            })
            .expect("ring positions");
        if n == 0 {
            assert!(
                c.wait(Duration::from_secs(30)).expect("wait"),
                "stream stalled after {next} of {count} records"
            );
        }
    }
    epochs
}

#[test]
fn ten_million_records_in_order_across_processes() {
    const N: u64 = 10_000_000;
    let region = Region::create(&RegionConfig::default()).expect("create region");
    let mut c = region.consumer(Direction::Up).expect("consumer");
    let child = spawn_child(&region, "produce", N);
    let epochs = consume_stream(&mut c, N, 0);
    assert_eq!(epochs, vec![1], "one producer, one epoch");
    assert_eq!(c.position(), N);
    assert!(
        c.pop().expect("ring").is_none(),
        "nothing beyond the stream"
    );
    assert_success(&child.wait());
}

#[test]
fn both_rings_with_back_pressure() {
    // Tiny rings so both producers block on full rings again and again.
    let region = Region::create(&RegionConfig {
        down_capacity: 4,
        up_capacity: 2,
        slot_size: 2048,
    })
    .expect("create region");
    let (mut down, mut up) = region
        .split(hypha_proto::shm::Role::ControlPlane)
        .expect("control-plane ends");
    let child = spawn_child(&region, "echo", 0);
    let payload: Vec<u8> = (0..1500u32).map(|i| (i * 7) as u8).collect();
    const N: u64 = 20_000;
    let mut sent = 0u64;
    let mut received = 0u64;
    let record = |i: u64| -> Record<'_> {
        match i {
            _ if i == N => Record::Resync(Resync::End { generation: 9 }),
            _ if i.is_multiple_of(3) => Record::PacketToSend {
                to: SendTo::Overlay(std::net::Ipv6Addr::from(u128::from(i))),
                bytes: &payload[..(i % 1500) as usize],
            },
            _ => Record::PeerDown(PeerId(i)),
        }
    };
    while received <= N {
        // Keep the down ring busy without ever blocking on it while the up ring is full (the child
        // would block on us, and we on it).
        while sent <= N && sent - received < 3 {
            match down.try_push(&record(sent)) {
                Ok(()) => sent += 1,
                Err(hypha_proto::shm::TryPushError::Full) => break,
                Err(e) => panic!("push: {e}"),
            }
        }
        let n = up
            .drain(16, |r| {
                let r = r.expect("valid echo");
                assert_eq!(r.record, record(received), "echo {received}");
                assert_eq!(r.meta.seq, received);
                received += 1;
            })
            .expect("ring");
        if n == 0 {
            up.wait(Duration::from_millis(100)).expect("wait");
        }
    }
    assert_success(&child.wait());
}

fn attach_result(region: &Region) -> String {
    let out = spawn_child(region, "attach", 0).wait();
    assert_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout
        .lines()
        .find_map(|l| l.split_once("ATTACH_RESULT ").map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| panic!("no result line in {stdout}"))
}

#[test]
fn a_good_region_attaches_in_the_child() {
    let region = Region::create(&RegionConfig::default()).expect("create region");
    assert_eq!(attach_result(&region), "ok");
}

#[test]
fn wrong_magic_is_a_clear_error() {
    let region = Region::create(&RegionConfig::default()).expect("create region");
    rustix::io::pwrite(region.memfd(), b"NOTHYPHA", 0).expect("overwrite magic");
    let found = *b"NOTHYPHA";
    let expected = ShmError::BadMagic { found };
    assert_eq!(attach_result(&region), format!("{expected:?} | {expected}"));
    assert!(expected
        .to_string()
        .contains("not a Hypha shared-memory region"));
}

#[test]
fn wrong_abi_version_is_a_clear_error() {
    let region = Region::create(&RegionConfig::default()).expect("create region");
    rustix::io::pwrite(region.memfd(), &(ABI_VERSION + 1).to_le_bytes(), 8)
        .expect("overwrite version");
    let expected = ShmError::AbiVersion {
        found: ABI_VERSION + 1,
        expected: ABI_VERSION,
    };
    assert_eq!(attach_result(&region), format!("{expected:?} | {expected}"));
    assert!(expected.to_string().contains("ABI version 2"));
}

#[test]
fn producer_restart_is_detected() {
    let region = Region::create(&RegionConfig::default()).expect("create region");
    let mut c = region.consumer(Direction::Up).expect("consumer");
    assert_eq!(c.poll_epoch(), None);

    // First producer process: 1000 records, then it exits.
    assert_success(&spawn_child(&region, "produce", 1000).wait());
    let first = c.poll_epoch().expect("first start seen");
    assert_eq!(first.previous, 0);
    assert_eq!(c.poll_epoch(), None, "reported once");
    // Read only half, so records of the old epoch are still queued at the restart.
    let mut buf = [0u8; 1500];
    let mut next = 0;
    while next < 500 {
        if let Some(r) = c.pop().expect("ring") {
            assert_eq!(r.as_ref().map(|r| r.meta.epoch).ok(), Some(first.current));
            check_nth(r, next, 0, &mut buf);
            next += 1;
        }
    }

    // The restarted producer: a new process, a new epoch, continuing at the ring's head.
    assert_success(&spawn_child(&region, "produce", 1000).wait());
    let second = c.poll_epoch().expect("restart seen");
    assert_eq!(second.previous, first.current);
    assert_ne!(second.current, first.current);

    let mut epochs = vec![];
    for expected in 500..1000 {
        let r = c.pop().expect("ring").expect("old record still queued");
        epochs.push(r.as_ref().map(|r| r.meta.epoch).ok());
        check_nth(r, expected, 0, &mut buf);
    }
    assert!(epochs.iter().all(|e| *e == Some(first.current)));
    // The new producer's records follow, numbered on from the ring position it found.
    let tail = consume_stream(&mut c, 1000, 1000);
    assert_eq!(tail, vec![second.current]);
}
