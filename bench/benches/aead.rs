//! AEAD benchmarks: seal and open in place at 64, 512, 1400 and 65536 bytes with both ciphers, as
//! the dataplane does it (48-byte AAD, 96-bit counter nonce, tag into the tailroom), plus the full
//! session receive path (replay check, open, replay accept) at 1400 bytes.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use hypha_dataplane::session::{
    Cipher, OpeningKey, SealingKey, Session, SessionParams, AAD_LEN, TAG_LEN,
};
use hypha_proto::time::Instant;

const SIZES: [usize; 4] = [64, 512, 1400, 65_536];
const CIPHERS: [Cipher; 2] = [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305];

fn seal_open(c: &mut Criterion) {
    let aad = [0x42u8; AAD_LEN];
    for cipher in CIPHERS {
        let mut group = c.benchmark_group(format!("aead_{}", cipher.name()));
        let seal = SealingKey::new(cipher, &[7; 32]).unwrap_or_else(|e| panic!("key: {e}"));
        let open = OpeningKey::new(cipher, &[7; 32]).unwrap_or_else(|e| panic!("key: {e}"));
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0x5au8; size + TAG_LEN];
            let mut counter = 0u64;
            group.bench_with_input(BenchmarkId::new("seal", size), &size, |b, &size| {
                b.iter(|| {
                    counter += 1;
                    let n = seal
                        .seal_in_place_append(counter, &aad, black_box(&mut buf), size)
                        .unwrap_or(0);
                    black_box(n)
                })
            });
            let mut sealed = vec![0x5au8; size + TAG_LEN];
            if seal
                .seal_in_place_append(1, &aad, &mut sealed, size)
                .is_err()
            {
                panic!("seal failed");
            }
            // Each open needs a fresh copy of the ciphertext (decryption is in place); the copy is
            // made in the untimed setup.
            group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, sealed| {
                b.iter_batched_ref(
                    || sealed.clone(),
                    |buf| {
                        let ok = open.open_in_place(1, &aad, buf).is_ok();
                        assert!(ok);
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        group.finish();
    }
}

fn session_receive(c: &mut Criterion) {
    let mut group = c.benchmark_group("session_open");
    let aad = [0x42u8; AAD_LEN];
    const SIZE: usize = 1400;
    group.throughput(Throughput::Bytes(SIZE as u64));
    for cipher in CIPHERS {
        let params = SessionParams {
            local_index: 1,
            remote_index: 2,
            remote_prefix: 0x0400_0000_0000_0001,
            cipher,
            send_key: [1; 32],
            recv_key: [1; 32],
            initiator: true,
            send_counter: 0,
            replay_base: 0,
        };
        let session = Session::new(&params, Instant::ZERO).unwrap_or_else(|e| panic!("{e}"));
        let now = Instant::from_secs(1);
        group.bench_function(BenchmarkId::new(cipher.name(), SIZE), |b| {
            b.iter_batched_ref(
                || {
                    // Send and receive keys are equal here, so the session opens what it seals.
                    let counter = session.next_counter(now).unwrap_or(0);
                    let mut buf = vec![0x5au8; SIZE + TAG_LEN];
                    let _ = session.seal_in_place_append(counter, &aad, &mut buf, SIZE);
                    (counter, buf)
                },
                |(counter, buf)| {
                    let ok = session.open_in_place(now, *counter, &aad, buf).is_ok();
                    assert!(ok);
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = seal_open, session_receive
}
criterion_main!(benches);
