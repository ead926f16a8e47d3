//! Babel core: the time to take in a full route table from one neighbour (issue 6, item 1).
//!
//! A neighbour (already up: two Hellos and an IHU) sends 10,000 Updates, one per originating node,
//! the way a full dump arrives when a link comes up: packets of at most 1,400 bytes built with
//! `proto::babel::PacketBuilder`, each Update with its Router-Id and, in overlay mode, the
//! origin-key sub-TLV whose key must derive to the /64 (one blake3 per Update). The timed part is
//! `Router::handle_packet` on every packet plus draining the route events the daemon turns into
//! FIB updates. Three cases:
//! - `new/overlay`: an empty router learns 10k routes (overlay filter, keys checked);
//! - `new/any`: the same with lab mode's accept-all filter (no key check), to show its cost;
//! - `refresh/overlay`: the same packets again into a router that already holds them (the
//!   periodic full update of a stable network: no route changes, no events).

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hypha_controlplane::babel::{
    overlay_subnet, InterfaceConfig, InterfaceId, RouteFilter, Router, RouterConfig, RouterId,
};
use hypha_proto::babel::{Hello, Ihu, PacketBuilder, Tlv, Update};
use hypha_proto::time::Instant;

const ROUTES: usize = 10_000;
const MTU: usize = 1_400;
const T0: Instant = Instant::from_secs(1_000);
const IFACE: InterfaceId = InterfaceId(0);

fn neighbour() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2))
}

/// A distinct, deterministic 32-byte "public key" per originating node.
fn node_key(i: usize) -> [u8; 32] {
    *blake3::hash(&(i as u64).to_le_bytes()).as_bytes()
}

/// Packets (each ≤ MTU) carrying `tlvs` in order.
fn packets(tlvs: &[Tlv]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut b = PacketBuilder::new(&mut buf, MTU);
    for t in tlvs {
        if b.push(t).is_err() {
            b.finish();
            out.push(buf.clone());
            b = PacketBuilder::new(&mut buf, MTU);
            b.push(t).expect("one Update fits an empty packet");
        }
    }
    if !b.is_empty() {
        b.finish();
        out.push(buf);
    }
    out
}

/// The 10k-route dump: one Update per node, each for the /64 its key owns.
fn full_dump() -> Vec<Vec<u8>> {
    let updates: Vec<Tlv> = (0..ROUTES)
        .map(|i| {
            let key = node_key(i);
            let mut rid = [0u8; 8];
            rid.copy_from_slice(&key[..8]);
            Tlv::Update(Update {
                prefix: Some(overlay_subnet(&key)),
                v4_via_v6: false,
                interval: 400,
                seqno: 7,
                metric: 256,
                router_id: Some(RouterId(rid)),
                next_hop: None,
                origin_key: Some(key),
            })
        })
        .collect();
    packets(&updates)
}

fn hello_ihu(seqno: u16) -> Vec<u8> {
    let tlvs = [
        Tlv::Hello(Hello {
            flags: 0,
            seqno,
            interval: 100,
            timestamp: None,
        }),
        Tlv::Ihu(Ihu {
            rxcost: 96,
            interval: 300,
            addr: None,
            timestamp: None,
        }),
    ];
    let mut p = packets(&tlvs);
    p.pop().expect("two TLVs make one packet")
}

/// A router with one point-to-point interface and the neighbour up (link cost 96).
fn router(filter: RouteFilter) -> Router {
    let mut cfg = RouterConfig::new([1, 2, 3, 4], 1).with_filter(filter);
    cfg.max_routes = 4 * ROUTES;
    let mut r = Router::new(cfg, T0);
    r.add_interface(
        T0,
        IFACE,
        InterfaceConfig::point_to_point()
            .with_intervals(Duration::from_secs(4), Duration::from_secs(16))
            .with_rtt(None),
    );
    for seqno in [1, 2] {
        r.handle_packet(T0, IFACE, neighbour(), &hello_ihu(seqno))
            .expect("hello/ihu accepted");
    }
    while r.poll_event().is_some() {}
    r
}

/// Feeds the dump and drains the events; returns the number of events (routes installed).
fn take_in(r: &mut Router, dump: &[Vec<u8>]) -> usize {
    let now = T0.checked_add(Duration::from_millis(10)).unwrap_or(T0);
    for p in dump {
        // A refused Update would be counted by the router; the count is checked once below.
        let _ = r.handle_packet(now, IFACE, neighbour(), p);
    }
    std::iter::from_fn(|| r.poll_event()).count()
}

fn bench(c: &mut Criterion) {
    let dump = full_dump();
    // Sanity: the dump installs every route (else the benchmark would time rejections).
    {
        let mut r = router(RouteFilter::Overlay);
        let events = take_in(&mut r, &dump);
        let selected = r.routes().count();
        assert!(
            events >= ROUTES && selected >= ROUTES,
            "dump installed {selected} routes ({events} events)"
        );
    }
    let bytes: usize = dump.iter().map(Vec::len).sum();
    eprintln!(
        "babel: {ROUTES} Updates in {} packets, {bytes} bytes",
        dump.len()
    );

    let mut g = c.benchmark_group("babel_full_update_10k");
    g.throughput(Throughput::Elements(ROUTES as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    for (name, filter) in [
        ("new/overlay", RouteFilter::Overlay),
        ("new/any", RouteFilter::Any),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || router(filter),
                |mut r| {
                    let n = take_in(&mut r, &dump);
                    (r, n)
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.bench_function("refresh/overlay", |b| {
        b.iter_batched(
            || {
                let mut r = router(RouteFilter::Overlay);
                take_in(&mut r, &dump);
                r
            },
            |mut r| {
                let n = take_in(&mut r, &dump);
                (r, n)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
