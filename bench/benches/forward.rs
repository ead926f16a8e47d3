//! The dataplane's per-packet work without the I/O: `forward::outbound` (FIB + session lookup,
//! header, in-place seal) and `forward::inbound` (checks, replay window, in-place open) on
//! 1400-byte packets, and `gso::TcpRun` merging 45 decrypted segments into one TUN super-packet.

use std::hint::black_box;
use std::net::Ipv6Addr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hypha_dataplane::fib::{Fib, FibHasherBuilder, NextHop, Prefix};
use hypha_dataplane::forward::{inbound, outbound, Inbound, Outbound, Tables};
use hypha_dataplane::gso::TcpRun;
use hypha_dataplane::pool::{BufLayout, PacketPool};
use hypha_dataplane::session::{Cipher, Session, SessionParams, SessionTable};
use hypha_dataplane::state::{upper64, PeerTable};
use hypha_dataplane::vnet::{self, Segments, VnetHdr};
use hypha_proto::time::Instant;

const A: &str = "4aa:1:2:3::1";
const B: &str = "5bb:4:5:6::2";

fn addr(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
}

struct Node {
    fib: Fib,
    sessions: SessionTable,
    peers: PeerTable,
    prefix: u64,
}

fn node(me: &str, other: &str, local: u32, remote: u32, send: [u8; 32], recv: [u8; 32]) -> Node {
    let sessions = SessionTable::new();
    let params = SessionParams {
        local_index: local,
        remote_index: remote,
        remote_prefix: upper64(&addr(other)),
        cipher: Cipher::Aes256Gcm,
        send_key: send,
        recv_key: recv,
        initiator: false,
        send_counter: 0,
        replay_base: 0,
    };
    let session = Session::new(&params, Instant::from_micros(0)).expect("valid key");
    sessions.insert(Arc::new(session), true);
    // 10k other /64s in the FIB, as a mid-sized overlay would have.
    let routes = (0..10_000u64)
        .map(|i| {
            (
                Prefix::slash64(0x0500_0000_0000_0000 + i),
                NextHop { peer: 2, metric: 1 },
            )
        })
        .chain([(
            Prefix::slash64(upper64(&addr(other))),
            NextHop { peer: 1, metric: 1 },
        )]);
    let mut peers = PeerTable::default();
    peers.set(1, "10.0.0.2:9651".parse().ok());
    Node {
        fib: Fib::from_routes(FibHasherBuilder::with_seed(1), routes),
        sessions,
        peers,
        prefix: upper64(&addr(me)),
    }
}

fn ipv6_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p[6] = 59;
    p[7] = 64;
    p[8..24].copy_from_slice(&addr(A).octets());
    p[24..40].copy_from_slice(&addr(B).octets());
    p
}

fn per_packet(c: &mut Criterion) {
    let a = node(A, B, 10, 20, [1; 32], [2; 32]);
    let b = node(B, A, 20, 10, [2; 32], [1; 32]);
    let ip = ipv6_packet(1400);
    let mut pool = PacketPool::new(2, BufLayout::MTU).expect("pool");
    let mut group = c.benchmark_group("forward");
    group.throughput(Throughput::Bytes(ip.len() as u64));

    let sa = a.sessions.load();
    let ta = Tables {
        fib: &a.fib,
        sessions: &sa,
        peers: &a.peers,
        prefix: a.prefix,
        now: Instant::from_micros(1),
    };
    group.bench_function("outbound_seal_1400", |bench| {
        let Some(mut buf) = pool.alloc() else { return };
        bench.iter(|| {
            buf.reset(hypha_dataplane::pool::HEADROOM);
            if let Ok(room) = buf.extend_tail(ip.len()) {
                room.copy_from_slice(&ip);
            }
            black_box(matches!(outbound(&ta, &mut buf), Outbound::Send(_)))
        });
        let _ = pool.free(buf);
    });

    let sb = b.sessions.load();
    let tb = Tables {
        fib: &b.fib,
        sessions: &sb,
        peers: &b.peers,
        prefix: b.prefix,
        now: Instant::from_micros(2),
    };
    group.bench_function("inbound_open_1400", |bench| {
        let Some(mut buf) = pool.alloc() else { return };
        bench.iter_batched_ref(
            || {
                // A freshly sealed datagram (new counter) for every iteration; setup is not timed.
                buf.reset(hypha_dataplane::pool::HEADROOM);
                if let Ok(room) = buf.extend_tail(ip.len()) {
                    room.copy_from_slice(&ip);
                }
                let _ = outbound(&ta, &mut buf);
                buf.data().to_vec()
            },
            |dgram| black_box(matches!(inbound(&tb, dgram), Inbound::ToTun { .. })),
            BatchSize::SmallInput,
        );
        let _ = pool.free(buf);
    });
    group.finish();
}

fn coalescing(c: &mut Criterion) {
    // 45 segments of a 64 KiB TSO super-packet, as a GRO receive delivers them decrypted.
    let payload = 45 * 1300;
    let mut sup = vec![0u8; 60 + payload];
    sup[0] = 0x60;
    sup[4..6].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
    sup[6] = 6;
    sup[8..24].copy_from_slice(&addr(A).octets());
    sup[24..40].copy_from_slice(&addr(B).octets());
    sup[52] = 5 << 4;
    sup[53] = 0x10;
    let hdr = VnetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: vnet::GSO_TCPV6,
        hdr_len: 60,
        gso_size: 1300,
        csum_start: 40,
        csum_offset: 16,
    };
    let mut segs = Vec::new();
    if let Ok(mut s) = Segments::new(&hdr, &sup) {
        let mut out = vec![0u8; 2048];
        while let Some(Ok(n)) = s.next_into(&mut out) {
            segs.push(out[..n].to_vec());
        }
    }
    let mut out = vec![0u8; 70_000];
    let mut group = c.benchmark_group("gso");
    group.throughput(Throughput::Bytes(payload as u64));
    group.bench_function("coalesce_45x1300", |bench| {
        bench.iter(|| {
            let Some(first) = segs.first() else { return 0 };
            let Some(mut run) = TcpRun::start(first) else {
                return 0;
            };
            for s in &segs[1..] {
                run.try_push(first, s);
            }
            black_box(
                run.write(segs.iter().map(|v| &v[..]), &mut out)
                    .unwrap_or(0),
            )
        })
    });
    // The worker's path: the headers rewritten in place, the payloads gathered by the kernel
    // (`writev`); here only the user-space part, the head and the iovec list.
    let mut iov: Vec<(usize, usize)> = Vec::with_capacity(segs.len());
    let mut head = vec![0u8; 10 + segs.first().map_or(0, Vec::len)];
    group.bench_function("coalesce_45x1300_gathered", |bench| {
        bench.iter(|| {
            let Some(first) = segs.first() else { return 0 };
            let Some(mut run) = TcpRun::start(first) else {
                return 0;
            };
            for s in &segs[1..] {
                run.try_push(first, s);
            }
            head[10..].copy_from_slice(first);
            let last = segs.last().and_then(|s| TcpRun::flags_of(s)).unwrap_or(0);
            iov.clear();
            iov.push((0, head.len()));
            for s in &segs[1..] {
                iov.push((run.hdr_len(), s.len()));
            }
            black_box(run.write_head(&mut head, last));
            black_box(iov.len())
        })
    });
    group.finish();
}

criterion_group!(benches, per_packet, coalescing);
criterion_main!(benches);
