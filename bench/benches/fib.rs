//! FIB benchmarks: longest-prefix-match lookups per second at 1k, 100k and 1M /64 routes, and the
//! cost of publishing a batch of route updates.
//!
//! Lookups are timed in batches of 1024 destinations (a worker's batch), through one `load()` of the
//! published snapshot, as workers do. Destination patterns:
//! - `uniform`: every installed /64 equally likely (cache-hostile at 1M routes);
//! - `skewed`: Zipf-like, index = N·u⁴, so a few prefixes get most lookups (a busy gateway);
//! - `miss`: addresses outside every route (the probe that ends in "no route").
//!
//! Updates: `FibUpdater::apply` of a batch that adds N new routes, then of a batch that removes them
//! again (each iteration publishes two snapshots). `free`: no reader holds an old snapshot, so the
//! updater may patch its spare copy (it still copies when a batch is over 1/16 of the table);
//! `held`: a reader holds the last two snapshots, forcing a full clone every time.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hypha_dataplane::fib::{Fib, FibHasherBuilder, FibUpdater, NextHop, Prefix, RouteUpdate};

/// xorshift64*: deterministic, dependency-free destinations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A random /64 inside 400::/7.
fn overlay_upper(rng: &mut Rng) -> u64 {
    0x0400_0000_0000_0000 | (rng.next() & 0x01ff_ffff_ffff_ffff)
}

fn routes(n: usize, rng: &mut Rng) -> Vec<u64> {
    (0..n).map(|_| overlay_upper(rng)).collect()
}

fn fib_with(uppers: &[u64]) -> Fib {
    Fib::from_routes(
        FibHasherBuilder::with_seed(0x5eed),
        uppers.iter().enumerate().map(|(i, u)| {
            (
                Prefix::slash64(*u),
                NextHop {
                    peer: i as u32 % 64,
                    metric: 256,
                },
            )
        }),
    )
}

const BATCH: usize = 1024;

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("fib_lookup");
    group.throughput(Throughput::Elements(BATCH as u64));
    for n in [1_000usize, 100_000, 1_000_000] {
        let mut rng = Rng(0x1234_5678 ^ n as u64);
        let uppers = routes(n, &mut rng);
        let (_updater, handle) = FibUpdater::with_fib(fib_with(&uppers));
        let host = |rng: &mut Rng, upper: u64| (u128::from(upper) << 64) | u128::from(rng.next());
        let uniform: Vec<u128> = (0..BATCH * 64)
            .map(|_| {
                let i = (rng.next() % n as u64) as usize;
                host(&mut rng, uppers[i])
            })
            .collect();
        let skewed: Vec<u128> = (0..BATCH * 64)
            .map(|_| {
                let i = ((n as f64) * rng.unit().powi(4)) as usize;
                host(&mut rng, uppers[i.min(n - 1)])
            })
            .collect();
        // 0x0200::/7 is outside 400::/7, so none of these match.
        let miss: Vec<u128> = (0..BATCH * 64)
            .map(|_| u128::from((rng.next() & 0x01ff_ffff_ffff_ffff) | 0x0200_0000_0000_0000) << 64)
            .collect();
        for (name, dsts) in [("uniform", &uniform), ("skewed", &skewed), ("miss", &miss)] {
            group.bench_with_input(BenchmarkId::new(name, n), dsts, |b, dsts| {
                let mut chunk = dsts.chunks_exact(BATCH).cycle();
                b.iter(|| {
                    let fib = handle.load();
                    let mut found = 0u32;
                    for d in chunk.next().unwrap_or(&[]) {
                        if let Some(nh) = fib.lookup_bits(black_box(*d)) {
                            found = found.wrapping_add(nh.peer);
                        }
                    }
                    black_box(found)
                })
            });
        }
    }
    group.finish();
}

fn updates(c: &mut Criterion) {
    let mut group = c.benchmark_group("fib_update");
    for n in [100_000usize, 1_000_000] {
        let mut rng = Rng(0xabcd ^ n as u64);
        let uppers = routes(n, &mut rng);
        for batch in [1usize, 100, 10_000] {
            let fresh = routes(batch, &mut rng);
            let adds: Vec<RouteUpdate> = fresh
                .iter()
                .map(|u| {
                    RouteUpdate::Add(
                        Prefix::slash64(*u),
                        NextHop {
                            peer: 1,
                            metric: 96,
                        },
                    )
                })
                .collect();
            let removes: Vec<RouteUpdate> = fresh
                .iter()
                .map(|u| RouteUpdate::Remove(Prefix::slash64(*u)))
                .collect();
            // Two published batches per iteration, each of `batch` updates.
            group.throughput(Throughput::Elements(2 * batch as u64));
            for mode in ["free", "held"] {
                let (mut updater, handle) = FibUpdater::with_fib(fib_with(&uppers));
                let mut held = Vec::new();
                group.bench_function(BenchmarkId::new(format!("{mode}/batch{batch}"), n), |b| {
                    b.iter(|| {
                        updater.apply(&adds);
                        if mode == "held" {
                            held.push(handle.load_full());
                        }
                        updater.apply(&removes);
                        if mode == "held" {
                            held.push(handle.load_full());
                            // Keep only the latest two so memory stays bounded; the updater's
                            // spare is always among the held ones, so it must copy.
                            if held.len() > 2 {
                                held.drain(..held.len() - 2);
                            }
                        }
                    })
                });
                black_box(updater.stats());
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = lookups, updates
}
criterion_main!(benches);
