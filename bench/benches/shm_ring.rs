//! Records per second through the shared-memory ring between two processes.
//!
//! This process is the control plane (producer of the down ring); `hypha-bench-shm-peer` is the
//! dataplane, a separate process that inherits the region. Each measured iteration pushes `iters`
//! records in batches, then a `Resync::End` marker, and stops the clock when the peer echoes the
//! marker on the up ring, i.e. when every record has been consumed and decoded.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hypha_proto::shm::{
    Consumer, PeerId, Producer, Record, Region, RegionConfig, Resync, Role, SendTo,
};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Peer {
    child: Child,
    down: Producer,
    up: Consumer,
    generation: u64,
}

impl Peer {
    fn start(batch: usize) -> Peer {
        let region = Region::create(&RegionConfig::default()).expect("create region");
        let (down, up) = region
            .split(Role::ControlPlane)
            .expect("control-plane ends");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypha-bench-shm-peer"));
        cmd.env("HYPHA_BENCH_BATCH", batch.to_string())
            .stdin(Stdio::null());
        region.share_with(&mut cmd);
        let child = cmd.spawn().expect("spawn hypha-bench-shm-peer");
        Peer {
            child,
            down,
            up,
            generation: 0,
        }
    }

    /// Pushes `count` records, `batch` per publish, and waits until the peer consumed them all.
    fn run(&mut self, records: &[Record<'_>], count: u64) -> Duration {
        let start = Instant::now();
        let mut pushed = 0u64;
        while pushed < count {
            let n = records.len().min((count - pushed) as usize);
            let done = self.down.try_push_batch(&records[..n]).expect("push");
            if done == 0 {
                self.down
                    .wait_space(Instant::now() + TIMEOUT)
                    .expect("space");
            }
            pushed += done as u64;
        }
        self.generation += 1;
        let marker = Record::Resync(Resync::End {
            generation: self.generation,
        });
        self.down.push(&marker, TIMEOUT).expect("push marker");
        loop {
            if let Some(r) = self.up.pop().expect("up ring") {
                assert_eq!(r.expect("valid ack").record, marker, "ack");
                break;
            }
            assert!(
                self.up.wait(TIMEOUT).expect("wait"),
                "peer stopped answering"
            );
        }
        start.elapsed()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shm_ring(c: &mut Criterion) {
    let packet = vec![0x60u8; 1400];
    let mut group = c.benchmark_group("shm_ring");
    group.throughput(Throughput::Elements(1));
    let cases: [(&str, usize); 4] = [
        ("peer_down_40B", 1),
        ("peer_down_40B", 16),
        ("peer_down_40B", 256),
        ("packet_1400B", 16),
    ];
    for (name, batch) in cases {
        let records: Vec<Record<'_>> = (0..batch as u64)
            .map(|i| {
                if name.starts_with("packet") {
                    Record::PacketToSend {
                        to: SendTo::Peer(PeerId(i)),
                        bytes: &packet,
                    }
                } else {
                    Record::PeerDown(PeerId(i))
                }
            })
            .collect();
        let mut peer = Peer::start(batch);
        group.bench_function(format!("{name}/batch_{batch}"), |b| {
            b.iter_custom(|iters| peer.run(&records, iters))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = shm_ring
}
criterion_main!(benches);
