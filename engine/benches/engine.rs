//! Engine benchmarks, with the disk's own yardsticks measured in the same run.
//!
//! - `log_append_synced/{1,8,64,512}`: synced appends of 256-byte entries,
//!   one fsync per batch (entries/s).
//! - `apply/64_puts`: state-machine apply of 64 puts per write (ops/s).
//! - `snapshot/export_install_100MB`: export a 100 MB shard to SST files and
//!   install it into another engine (MB/s).
//! - `yardstick/fdatasync_4k_{overwrite,append}`: raw 4 KiB write +
//!   fdatasync, in place and appending (ops/s).
//! - `yardstick/sequential_write_fsync_64MiB`: 1 MiB writes + one fsync (MB/s).
//!
//! `db_bench fillrandom --sync=1`, the third yardstick, is an external tool:
//! `benches/yardsticks.sh` runs it.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::io::Write;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shoal_consensus::{Entry, HardState};
use shoal_engine::{ApplyEntry, Command, EngineConfig, GroupWrite, LogBatch, Request, RocksEngine};

const ENTRY_BYTES: usize = 256;

fn bench_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shoal-bench")
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

fn log_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_append_synced");
    for batch in [1u64, 8, 64, 512] {
        let dir = bench_dir();
        let engine = RocksEngine::open(dir.path(), EngineConfig::default()).unwrap();
        let payload = Bytes::from(vec![7u8; ENTRY_BYTES]);
        let mut next = 1u64;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(batch.to_string(), |b| {
            b.iter(|| {
                let entries: Vec<Entry> = (next..next + batch)
                    .map(|index| Entry {
                        term: 1,
                        index,
                        data: payload.clone(),
                        ..Default::default()
                    })
                    .collect();
                next += batch;
                let hard_state = HardState {
                    term: 1,
                    vote: 1,
                    commit: next - 1,
                };
                engine
                    .write_log(LogBatch {
                        groups: vec![GroupWrite {
                            group: 1,
                            entries,
                            hard_state: Some(hard_state),
                            ..Default::default()
                        }],
                    })
                    .unwrap();
            })
        });
    }
    group.finish();
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    let dir = bench_dir();
    let engine = RocksEngine::open(dir.path(), EngineConfig::default()).unwrap();
    let mut index = 0u64;
    let mut key = 0u64;
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_puts", |b| {
        b.iter(|| {
            index += 1;
            let requests = (0..64)
                .map(|n| {
                    key += 1;
                    Request {
                        shard: (key % 16) as u32,
                        client: n + 1,
                        seq: index,
                        command: Command::Put {
                            key: Bytes::from(format!("key{:08}", key % 100_000)),
                            value: Bytes::from(vec![1u8; 256]),
                        },
                    }
                })
                .collect();
            engine
                .apply(
                    1,
                    &[ApplyEntry {
                        index,
                        term: 1,
                        requests,
                    }],
                )
                .unwrap();
        })
    });
    group.finish();
}

fn snapshot(c: &mut Criterion) {
    const SHARD_BYTES: u64 = 100 * 1024 * 1024;
    const VALUE_BYTES: usize = 1024;
    let dir = bench_dir();
    let source = RocksEngine::open(dir.path().join("source"), EngineConfig::default()).unwrap();
    let keys = SHARD_BYTES / VALUE_BYTES as u64;
    for (i, chunk) in (0..keys).collect::<Vec<_>>().chunks(1000).enumerate() {
        let requests = chunk
            .iter()
            .map(|k| Request {
                shard: 3,
                client: 0,
                seq: 0,
                command: Command::Put {
                    key: Bytes::from(format!("key{k:010}")),
                    value: Bytes::from(vec![(*k % 251) as u8; VALUE_BYTES]),
                },
            })
            .collect();
        source
            .apply(
                1,
                &[ApplyEntry {
                    index: i as u64 + 1,
                    term: 1,
                    requests,
                }],
            )
            .unwrap();
    }
    let target = RocksEngine::open(dir.path().join("target"), EngineConfig::default()).unwrap();
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SHARD_BYTES));
    let mut n = 0;
    // Installs name directories inside the target's data directory.
    let staging = dir.path().join("target");
    group.bench_function("export_install_100MB", |b| {
        b.iter(|| {
            n += 1;
            let export = staging.join(format!("export-{n}"));
            source.export_snapshot(1, &export).unwrap();
            target.install_snapshot(&export).unwrap();
        })
    });
    // A shard move: export renamed into group 2's keys, ingest at an entry.
    group.bench_function("move_shard_export_ingest_100MB", |b| {
        b.iter(|| {
            n += 1;
            let export = staging.join(format!("move-{n}"));
            source.export_shard(1, 3, 2, &export).unwrap();
            let at = shoal_engine::AppliedState { index: n, term: 1 };
            let record = shoal_engine::ShardRecord {
                num: n,
                status: shoal_engine::ShardStatus::Serving,
            };
            target.install_shard(2, at, 3, record, &export).unwrap();
        })
    });
    group.finish();
}

fn yardsticks(c: &mut Criterion) {
    let mut group = c.benchmark_group("yardstick");
    let dir = bench_dir();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.path().join("raw"))
        .unwrap();
    // Overwrite a preallocated, synced file in place, as a WAL does: then
    // fdatasync flushes data only, no file-size metadata.
    const RAW_FILE_BYTES: u64 = 64 * 1024 * 1024;
    let block = vec![3u8; 4096];
    for chunk in 0..RAW_FILE_BYTES / 4096 {
        file.write_all_at(&block, chunk * 4096).unwrap();
    }
    file.sync_all().unwrap();
    let mut offset = 0u64;
    group.throughput(Throughput::Elements(1));
    // Overwrite in place: fdatasync flushes data only (the best case; what a
    // recycled WAL file would see; ours are not recycled, see `rocks.rs`).
    group.bench_function("fdatasync_4k_overwrite", |b| {
        b.iter(|| {
            file.write_all_at(&block, offset).unwrap();
            offset = (offset + 4096) % RAW_FILE_BYTES;
            // File::sync_data is fdatasync(2) on Linux.
            file.sync_data().unwrap();
        })
    });
    // Append, growing the file: fdatasync also commits the new size (what
    // `dd oflag=dsync` measures, and what a fresh WAL file sees).
    let append_path = dir.path().join("append");
    let mut appender = std::fs::File::create(&append_path).unwrap();
    let mut appended_bytes = 0u64;
    group.bench_function("fdatasync_4k_append", |b| {
        b.iter(|| {
            if appended_bytes >= RAW_FILE_BYTES {
                appender = std::fs::File::create(&append_path).unwrap();
                appended_bytes = 0;
            }
            appender.write_all(&block).unwrap();
            appended_bytes += 4096;
            appender.sync_data().unwrap();
        })
    });
    const SEQ_BYTES: u64 = 64 * 1024 * 1024;
    let chunk = vec![5u8; 1024 * 1024];
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SEQ_BYTES));
    group.bench_function("sequential_write_fsync_64MiB", |b| {
        b.iter_batched(
            || std::fs::File::create(dir.path().join("seq")).unwrap(),
            |mut f| {
                for _ in 0..SEQ_BYTES / chunk.len() as u64 {
                    f.write_all(&chunk).unwrap();
                }
                f.sync_all().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(5)).warm_up_time(std::time::Duration::from_secs(1));
    targets = yardsticks, log_append, apply, snapshot
}
criterion_main!(benches);
