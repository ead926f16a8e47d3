//! Message bus core: chunking, reassembly and acknowledgement of one message between two buses
//! (issue 6, item 1).
//!
//! Two sans-IO [`Bus`] cores exchange frames in memory with no loss and a fixed clock, so the
//! timed part is the bus's own work: cutting the payload into chunks (`poll_transmit`), parsing
//! and placing them on the other side (`handle_frame`), the acks flowing back, the whole-message
//! checksum, and taking the message out of the inbox. What the E2E encryption and the dataplane
//! add on a real path is measured elsewhere (`aead`, `forward`, the system benchmark).

use std::net::Ipv6Addr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use hypha_controlplane::bus::{Bus, BusConfig};
use hypha_proto::addr::OverlayAddr;
use hypha_proto::time::Instant;

const T0: Instant = Instant::from_secs(1_000);

fn addr(n: u16) -> OverlayAddr {
    OverlayAddr::new(Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, n)).expect("400::/7")
}

/// Sends `payload` from a fresh bus to another and returns the bytes that arrived.
fn transfer(payload: Vec<u8>) -> usize {
    let (a_addr, b_addr) = (addr(1), addr(2));
    let mut a = Bus::new(BusConfig::default(), T0);
    let mut b = Bus::new(BusConfig::default(), T0);
    a.push(T0, b_addr, b"bench", payload, None, None)
        .expect("within the default limits");
    let mut buf = Vec::with_capacity(2048);
    loop {
        let mut moved = false;
        while let Some(dst) = a.poll_transmit(T0, &mut buf) {
            debug_assert_eq!(dst, b_addr);
            b.handle_frame(T0, a_addr, &buf).expect("well-formed frame");
            moved = true;
        }
        while let Some(dst) = b.poll_transmit(T0, &mut buf) {
            debug_assert_eq!(dst, a_addr);
            a.handle_frame(T0, b_addr, &buf).expect("well-formed frame");
            moved = true;
        }
        if let Some(m) = b.pop_inbound(T0, None, false) {
            return m.payload.len();
        }
        assert!(moved, "the transfer stalled");
    }
}

fn bench_transfer(c: &mut Criterion) {
    let mut g = c.benchmark_group("bus_transfer");
    for size in [1_024usize, 64 * 1_024, 1_024 * 1_024] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |bch, &size| {
            bch.iter_batched(
                || (0..size).map(|i| (i * 31) as u8).collect::<Vec<u8>>(),
                |p| assert_eq!(transfer(p), size),
                BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench_transfer);
criterion_main!(benches);
