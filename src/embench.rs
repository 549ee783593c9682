//! `shoal bench --embedded`: the embedded [`Db`](crate::Db) side by side
//! with RocksDB used directly and with redb, in one run.
//!
//! # Workload
//! 16-byte keys, 256-byte values. *Durable puts*: each thread writes its
//! own fresh keys for the cell's duration, every put durable before it
//! returns — Shoal's default, RocksDB with `WriteOptions::set_sync(true)`,
//! redb with one write transaction per put at its default (immediate)
//! durability. *Gets*: [`BenchOptions::get_keys`] keys loaded first, then
//! threads read uniformly random ones (every read finds its key).
//!
//! # Rounds
//! This disk's fsync rate drifts by 2× within minutes, so one pass of A
//! then B compares the moment, not the systems. Every round measures each
//! cell for every system back to back (A B C, then the next cell), each on
//! a fresh directory; the report gives per cell the median rate of each
//! system and the median of the per-round ratios of Shoal to the others.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use crate::{Db, DbError};

/// Key bytes of every operation.
pub const KEY_BYTES: usize = 16;
/// Value bytes of every put.
pub const VALUE_BYTES: usize = 256;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Scratch directory (each system and round gets a fresh one below it).
    pub dir: PathBuf,
    /// Thread counts of the durable put cells.
    pub put_threads: Vec<usize>,
    /// Thread count of the get cell.
    pub get_threads: usize,
    /// Keys loaded before the get cell.
    pub get_keys: u64,
    /// How long each cell runs, per system and round.
    pub cell: Duration,
    /// Rounds (A B C, A B C, ...).
    pub rounds: u32,
    /// Which systems to run.
    pub systems: Vec<System>,
}

impl BenchOptions {
    /// The table: puts at 1, 8 and 64 threads, gets at 8, three
    /// rounds of 3 s cells, all three systems.
    pub fn new(dir: impl AsRef<Path>) -> BenchOptions {
        BenchOptions {
            dir: dir.as_ref().to_path_buf(),
            put_threads: vec![1, 8, 64],
            get_threads: 8,
            get_keys: 100_000,
            cell: Duration::from_secs(3),
            rounds: 3,
            systems: vec![System::Shoal, System::RocksDb, System::Redb],
        }
    }
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// `shoal::Db`.
    Shoal,
    /// RocksDB used directly, synced writes.
    RocksDb,
    /// redb, one durable write transaction per put.
    Redb,
}

impl System {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            System::Shoal => "shoal",
            System::RocksDb => "rocksdb",
            System::Redb => "redb",
        }
    }
}

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The Shoal database failed.
    #[error("shoal: {0}")]
    Shoal(#[from] DbError),
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// redb failed.
    #[error("redb: {0}")]
    Redb(String),
    /// The scratch directory.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A get did not find a key that was loaded.
    #[error("{system}: loaded key {key} not found")]
    Missing {
        /// Which system.
        system: &'static str,
        /// The key's number.
        key: u64,
    },
}

fn redb_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Redb(e.to_string())
}

/// One system's store, opened on a directory of its own: what a
/// benchmark calls.
pub enum Store {
    /// A `shoal::Db` with its default (synced) durability.
    Shoal(Db),
    /// RocksDB with default options, and write options that sync.
    RocksDb(rocksdb::DB, rocksdb::WriteOptions),
    /// redb with its default (immediate) durability.
    Redb(redb::Database),
}

const REDB_TABLE: redb::TableDefinition<'static, &'static [u8], &'static [u8]> =
    redb::TableDefinition::new("kv");

impl Store {
    /// Opens (creating) `system`'s store in `dir`.
    pub fn open(system: System, dir: &Path) -> Result<Store, BenchError> {
        std::fs::create_dir_all(dir)?;
        Ok(match system {
            System::Shoal => Store::Shoal(Db::open(dir)?),
            System::RocksDb => {
                let mut opts = rocksdb::Options::default();
                opts.create_if_missing(true);
                let mut write = rocksdb::WriteOptions::default();
                write.set_sync(true);
                Store::RocksDb(rocksdb::DB::open(&opts, dir)?, write)
            }
            System::Redb => {
                let db = redb::Database::create(dir.join("redb")).map_err(redb_err)?;
                let txn = db.begin_write().map_err(redb_err)?;
                txn.open_table(REDB_TABLE).map_err(redb_err)?;
                txn.commit().map_err(redb_err)?;
                Store::Redb(db)
            }
        })
    }

    /// The system's name.
    pub fn name(&self) -> &'static str {
        match self {
            Store::Shoal(_) => "shoal",
            Store::RocksDb(..) => "rocksdb",
            Store::Redb(_) => "redb",
        }
    }

    /// One durable put.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), BenchError> {
        match self {
            Store::Shoal(db) => {
                db.put(key.to_vec(), value.to_vec())?;
            }
            Store::RocksDb(db, write) => db.put_opt(key, value, write)?,
            Store::Redb(db) => {
                let txn = db.begin_write().map_err(redb_err)?;
                {
                    let mut table = txn.open_table(REDB_TABLE).map_err(redb_err)?;
                    table.insert(key, value).map_err(redb_err)?;
                }
                txn.commit().map_err(redb_err)?;
            }
        }
        Ok(())
    }

    /// Loads keys `0..count` (batched; not measured).
    pub fn load(&self, count: u64) -> Result<(), BenchError> {
        let value = vec![b'v'; VALUE_BYTES];
        const CHUNK: u64 = 1_000;
        for start in (0..count).step_by(CHUNK as usize) {
            let end = (start + CHUNK).min(count);
            match self {
                Store::Shoal(db) => {
                    let mut batch = crate::WriteBatch::new();
                    for n in start..end {
                        batch.put(key(n).to_vec(), value.clone());
                    }
                    db.write(batch)?;
                }
                Store::RocksDb(db, write) => {
                    let mut batch = rocksdb::WriteBatch::default();
                    for n in start..end {
                        batch.put(key(n), &value);
                    }
                    db.write_opt(batch, write)?;
                }
                Store::Redb(db) => {
                    let txn = db.begin_write().map_err(redb_err)?;
                    {
                        let mut table = txn.open_table(REDB_TABLE).map_err(redb_err)?;
                        for n in start..end {
                            table.insert(&key(n)[..], &value[..]).map_err(redb_err)?;
                        }
                    }
                    txn.commit().map_err(redb_err)?;
                }
            }
        }
        Ok(())
    }

    /// Reads key `n`; whether it was found.
    pub fn get(&self, n: u64) -> Result<bool, BenchError> {
        let k = key(n);
        Ok(match self {
            Store::Shoal(db) => db.get(k)?.is_some(),
            Store::RocksDb(db, _) => db.get_pinned(k)?.is_some(),
            Store::Redb(db) => {
                let txn = db.begin_read().map_err(redb_err)?;
                let table = txn.open_table(REDB_TABLE).map_err(redb_err)?;
                let found = table.get(&k[..]).map_err(redb_err)?.is_some();
                found
            }
        })
    }
}

/// The 16-byte key numbered `n`: `key` and the low 52 bits of `n` in 13
/// hex digits (written by hand: the harness must cost next to nothing
/// beside the systems it measures).
pub fn key(n: u64) -> [u8; KEY_BYTES] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = [0u8; KEY_BYTES];
    k[..3].copy_from_slice(b"key");
    for (i, byte) in k[3..].iter_mut().enumerate() {
        let shift = 4 * (12 - i);
        *byte = HEX[((n >> shift) & 0xf) as usize];
    }
    k
}

/// Operations per second of `threads` threads running `op` (given the
/// thread's index and its operation count so far) for `cell`.
pub fn rate(
    threads: usize,
    cell: Duration,
    op: &(dyn Fn(usize, u64) -> Result<(), BenchError> + Sync),
) -> Result<f64, BenchError> {
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let result = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (done, stop) = (&done, &stop);
                scope.spawn(move || -> Result<(), BenchError> {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        op(t, i)?;
                        i += 1;
                        if i % 64 == 0 {
                            done.fetch_add(64, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(i % 64, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(cell);
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("bench thread"))
            .collect::<Result<Vec<()>, BenchError>>()
    });
    let elapsed = started.elapsed().as_secs_f64();
    result?;
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Durable puts per second by `threads` threads on a fresh `system`.
pub fn put_rate(
    system: System,
    dir: &Path,
    threads: usize,
    cell: Duration,
) -> Result<f64, BenchError> {
    let store = Store::open(system, dir)?;
    let value = vec![b'v'; VALUE_BYTES];
    let rate = rate(threads, cell, &|t, i| {
        // Thread-private keys: no two threads write the same key.
        store.put(&key(((t as u64) << 40) | i), &value)
    })?;
    drop(store);
    std::fs::remove_dir_all(dir)?;
    Ok(rate)
}

/// Gets per second by `threads` threads over `keys` loaded keys on a fresh
/// `system`.
pub fn get_rate(
    system: System,
    dir: &Path,
    threads: usize,
    keys: u64,
    cell: Duration,
) -> Result<f64, BenchError> {
    let store = Store::open(system, dir)?;
    store.load(keys)?;
    let rngs: Vec<std::sync::Mutex<rand_chacha::ChaCha8Rng>> = (0..threads)
        .map(|t| std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(t as u64)))
        .collect();
    let rate = rate(threads, cell, &|t, _| {
        let n = rngs[t].lock().expect("rng").random_range(0..keys);
        if store.get(n)? {
            Ok(())
        } else {
            Err(BenchError::Missing {
                system: store.name(),
                key: n,
            })
        }
    })?;
    drop(store);
    std::fs::remove_dir_all(dir)?;
    Ok(rate)
}

/// One cell of the table: an operation at a thread count.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// `"put"` (durable) or `"get"`.
    pub op: &'static str,
    /// Threads.
    pub threads: usize,
    /// Per system, its operations per second in each round.
    pub rates: Vec<(System, Vec<f64>)>,
}

impl Cell {
    /// Median rate of `system`.
    pub fn median(&self, system: System) -> Option<f64> {
        self.rates
            .iter()
            .find(|(s, _)| *s == system)
            .map(|(_, r)| median(r.clone()))
    }

    /// Median over rounds of Shoal's rate divided by `other`'s.
    pub fn ratio(&self, other: System) -> Option<f64> {
        let shoal = &self.rates.iter().find(|(s, _)| *s == System::Shoal)?.1;
        let theirs = &self.rates.iter().find(|(s, _)| *s == other)?.1;
        let ratios: Vec<f64> = shoal
            .iter()
            .zip(theirs)
            .filter(|(_, t)| **t > 0.0)
            .map(|(s, t)| s / t)
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    }
}

/// The median of `values` (0 for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Runs the whole table, calling `progress` after every measurement.
pub fn run(
    options: &BenchOptions,
    progress: &mut dyn FnMut(&str, System, usize, u32, f64),
) -> Result<Vec<Cell>, BenchError> {
    let mut cells: Vec<Cell> = options
        .put_threads
        .iter()
        .map(|&threads| ("put", threads))
        .chain(std::iter::once(("get", options.get_threads)))
        .map(|(op, threads)| Cell {
            op,
            threads,
            rates: options.systems.iter().map(|s| (*s, Vec::new())).collect(),
        })
        .collect();
    for round in 0..options.rounds {
        for cell in &mut cells {
            for (system, rates) in &mut cell.rates {
                let dir = options.dir.join(format!(
                    "{}-{}-{}-{round}",
                    system.name(),
                    cell.op,
                    cell.threads
                ));
                let r = if cell.op == "put" {
                    put_rate(*system, &dir, cell.threads, options.cell)?
                } else {
                    get_rate(*system, &dir, cell.threads, options.get_keys, options.cell)?
                };
                progress(cell.op, *system, cell.threads, round, r);
                rates.push(r);
            }
        }
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sixteen_bytes_and_distinct() {
        assert_eq!(&key(7), b"key0000000000007");
        assert_eq!(&key(0xabc_1234_5678), b"key00abc12345678");
        assert_ne!(key(1 << 40), key(0));
        assert_eq!(key((3 << 40) | 5).len(), KEY_BYTES);
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let cell = Cell {
            op: "put",
            threads: 1,
            rates: vec![
                (System::Shoal, vec![1.0, 2.0, 9.0]),
                (System::RocksDb, vec![2.0, 2.0, 3.0]),
            ],
        };
        // Ratios 0.5, 1.0, 3.0: the median of ratios, not of rates.
        assert_eq!(cell.ratio(System::RocksDb), Some(1.0));
        assert_eq!(cell.median(System::Shoal), Some(2.0));
        assert_eq!(cell.ratio(System::Redb), None);
    }
}
