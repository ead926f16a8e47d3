//! TSO segmentation benchmark: cutting a 64 KiB TCP/IPv6 super-packet (as a TUN read with
//! IFF_VNET_HDR returns it) into MSS-sized segments with full checksums, into one reused buffer;
//! `_partial_csum`: the same with the TCP checksums left partial, as the worker cuts them.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hypha_dataplane::vnet::{self, Segments, VnetHdr};

fn super_packet(payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 60 + payload];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
    p[6] = 6;
    p[7] = 64;
    p[8] = 0x04;
    p[24] = 0x05;
    p[52] = 5 << 4;
    p[53] = 0x18;
    for (i, b) in p[60..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn segmentation(c: &mut Criterion) {
    let mut group = c.benchmark_group("tso_segment");
    for (payload, mss) in [(65_000usize, 1300u16), (65_000, 8_940), (14_000, 1300)] {
        let pkt = super_packet(payload);
        let hdr = VnetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_TCPV6,
            hdr_len: 60,
            gso_size: mss,
            csum_start: 40,
            csum_offset: 16,
        };
        let mut out = vec![0u8; 65_536];
        group.throughput(Throughput::Bytes(payload as u64));
        group.bench_function(BenchmarkId::new(format!("mss{mss}"), payload), |b| {
            b.iter(|| {
                let mut segs =
                    Segments::new(&hdr, black_box(&pkt)).unwrap_or_else(|e| panic!("{e}"));
                let mut total = 0usize;
                while let Some(Ok(n)) = segs.next_into(&mut out) {
                    total += n;
                }
                black_box(total)
            })
        });
        // What the worker does: TCP checksums left partial (the receiver's TUN completes them).
        group.bench_function(
            BenchmarkId::new(format!("mss{mss}_partial_csum"), payload),
            |b| {
                b.iter(|| {
                    let mut segs = Segments::new(&hdr, black_box(&pkt))
                        .unwrap_or_else(|e| panic!("{e}"))
                        .partial_tcp_checksum();
                    let mut total = 0usize;
                    while let Some(Ok(n)) = segs.next_into(&mut out) {
                        total += n;
                    }
                    black_box(total)
                })
            },
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = segmentation
}
criterion_main!(benches);
