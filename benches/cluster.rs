//! Criterion benchmark of a 3-node Shoal cluster on loopback (`shoal node`
//! processes, QUIC + mutual TLS, RocksDB with fsync): puts by 1 and 64
//! concurrent clients and linearizable gets by 64 clients, 16-byte keys and
//! 256-byte values. Throughput is in operations per second. The load
//! generator `shoal bench` measures the same cluster with latency
//! percentiles, server CPU per operation and etcd beside it.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shoal::bench::{key, load_keys, start_shoal, Driver, Op};

/// Keys written before measuring; every get finds its key.
const KEYS: u64 = 2_000;
const VALUE_BYTES: usize = 256;
/// QUIC clients the bench's clients share (as `shoal bench --conns`).
const CONNS: usize = 8;

/// `iters` operations per client, all clients at once; returns the wall time.
fn run_concurrent(
    rt: &tokio::runtime::Runtime,
    driver: &Driver,
    clients: usize,
    op: Op,
    iters: u64,
    round: &mut u64,
) -> Duration {
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    *round += 1;
    let base = *round * 7919;
    rt.block_on(async {
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (driver, value) = (driver.clone(), value.clone());
                tokio::spawn(async move {
                    for i in 0..iters {
                        let n = (base + i * clients as u64 + c as u64) % KEYS;
                        driver
                            .run(c, op, key(n), value.clone())
                            .await
                            .expect("operation");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client task");
        }
        started.elapsed()
    })
}

fn cluster(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster =
        start_shoal(env!("CARGO_BIN_EXE_shoal").as_ref(), dir.path(), &[]).expect("cluster");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let members = cluster.members().to_vec();
    let tls = cluster.tls_dir().to_path_buf();
    let one = rt
        .block_on(async { Driver::shoal(&members, &tls, 1, 1, None) })
        .expect("client");
    let many = rt
        .block_on(async { Driver::shoal(&members, &tls, 64, CONNS, None) })
        .expect("clients");
    rt.block_on(load_keys(&many, KEYS, Bytes::from(vec![b'v'; VALUE_BYTES])))
        .expect("load");

    let mut group = c.benchmark_group("cluster");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    let mut round = 0;
    group.throughput(Throughput::Elements(1));
    group.bench_function("put/1_client", |b| {
        b.iter_custom(|iters| run_concurrent(&rt, &one, 1, Op::Put, iters, &mut round))
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("put/64_clients", |b| {
        b.iter_custom(|iters| run_concurrent(&rt, &many, 64, Op::Put, iters, &mut round))
    });
    group.bench_function("get/64_clients", |b| {
        b.iter_custom(|iters| run_concurrent(&rt, &many, 64, Op::Get, iters, &mut round))
    });
    group.finish();
    rt.block_on(async {
        one.close().await;
        many.close().await;
    });
    drop(cluster);
}

criterion_group!(benches, cluster);
criterion_main!(benches);
