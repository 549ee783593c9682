//! Criterion benchmark of the embedded `Db` beside RocksDB used directly
//! (synced writes) and redb (one durable write transaction per put):
//! durable puts by 1, 8 and 64 threads and gets by 8 threads, 16-byte keys
//! and 256-byte values, in operations per second. `shoal bench --embedded`
//! measures the same table in alternating rounds with medians of ratios
//! (see `shoal::embench`); this group is for profiling and regressions.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shoal::embench::{key, Store, System, VALUE_BYTES};

const SYSTEMS: [System; 3] = [System::Shoal, System::RocksDb, System::Redb];
const GET_KEYS: u64 = 20_000;
const GET_THREADS: usize = 8;

/// `iters` operations spread over `threads` threads; the wall time.
fn spread(threads: usize, iters: u64, op: &(dyn Fn(u64) + Sync)) -> Duration {
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= iters {
                    break;
                }
                op(i);
            });
        }
    });
    started.elapsed()
}

fn embedded(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = vec![b'v'; VALUE_BYTES];
    let mut group = c.benchmark_group("embedded");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for system in SYSTEMS {
        let store = Store::open(system, &dir.path().join(system.name())).expect("open");
        for threads in [1usize, 8, 64] {
            let base = AtomicU64::new(0);
            group.bench_function(format!("{}/durable_put/{threads}", system.name()), |b| {
                b.iter_custom(|iters| {
                    let offset = base.fetch_add(iters, Ordering::Relaxed);
                    spread(threads, iters, &|i| {
                        store.put(&key(offset + i), &value).expect("put")
                    })
                })
            });
        }
        store.load(GET_KEYS).expect("load");
        group.bench_function(format!("{}/get/{GET_THREADS}", system.name()), |b| {
            b.iter_custom(|iters| {
                spread(GET_THREADS, iters, &|i| {
                    let n = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % GET_KEYS;
                    assert!(store.get(n).expect("get"), "key {n} loaded");
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, embedded);
criterion_main!(benches);
