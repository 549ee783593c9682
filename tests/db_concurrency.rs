//! Goal (issue 13): one `Db` used by many threads at once stays
//! linearizable and its batches atomic. Threads mix gets (served from the
//! engine on the calling thread), puts, conditional puts, deletes, atomic
//! conditional batches and scans on a few keys, so operations contend.
//! Every operation is recorded and the history is checked per key:
//! - a batch counts, on each key it writes, as the write it did there (a
//!   `PutIfVersion` on its condition's key, a `Put` on the other), or, if
//!   its condition failed, as the failed `PutIfVersion` only;
//! - a scan counts as a get of every pair it saw (one scan page is one
//!   engine read, so the pairs are from one moment inside its interval).
//!
//! A batch writes the same token to both keys of a pair, and only batches
//! write pair keys, so every scan must see both keys of a pair with the
//! same token: a scan that sees a half-applied batch fails the test.
//!
//! Seeded: the seed is printed, `SHOAL_SEED=<n>` replays the same choices
//! (thread timing still varies); `SHOAL_SEEDS=<n>` runs n seeds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal::{Db, DbError, WriteBatch};
use shoal_shard::linearizability::{HistoryRecorder, Input, Output};

const THREADS: u64 = 12;
const OPS_PER_THREAD: u64 = 150;
const SINGLE_KEYS: u64 = 4;
const PAIRS: u64 = 3;
const CHECK_STEPS_MAX: u64 = 5_000_000;

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SHOAL_SEED") {
        return vec![s.parse().expect("SHOAL_SEED must be a number")];
    }
    let n = std::env::var("SHOAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2u64);
    (0..n).map(|_| rand::rng().random()).collect()
}

fn single(n: u64) -> Bytes {
    Bytes::from(format!("s{n}"))
}

fn pair(n: u64, side: char) -> Bytes {
    Bytes::from(format!("p{n}{side}"))
}

fn output_of(result: Result<u64, DbError>) -> Output {
    match result {
        Ok(version) => Output::Written { version },
        Err(DbError::VersionMismatch { .. }) => Output::VersionMismatch,
        Err(DbError::NoKey) => Output::NoKey,
        Err(DbError::Timeout) => Output::Unknown,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Logical time shared by the threads: read before each call and after
/// each return, so a recorded interval contains the real one.
struct Clock(AtomicU64);

impl Clock {
    fn now(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

fn record(history: &HistoryRecorder, thread: u64, input: Input, output: Output, at: (u64, u64)) {
    let token = history.begin_at(thread, input, at.0);
    history.end_at(token, output, at.1);
}

/// One thread's operations.
fn client(db: &Db, history: &HistoryRecorder, clock: &Clock, seed: u64, thread: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ thread.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // Versions this thread last saw, to aim conditional writes well.
    let mut seen: BTreeMap<Bytes, u64> = BTreeMap::new();
    for i in 0..OPS_PER_THREAD {
        let value = Bytes::from(format!("t{thread}-{i}"));
        let called = clock.now();
        match rng.random_range(0..100) {
            0..=34 => {
                let key = single(rng.random_range(0..SINGLE_KEYS));
                let got = db.get(&key).expect("get");
                let at = (called, clock.now());
                let output = match got {
                    Some(v) => {
                        seen.insert(key.clone(), v.version);
                        Output::Value {
                            value: v.value,
                            version: v.version,
                        }
                    }
                    None => Output::NotFound,
                };
                record(history, thread, Input::Get { key }, output, at);
            }
            35..=54 => {
                let key = single(rng.random_range(0..SINGLE_KEYS));
                let result = db.put(key.clone(), value.clone());
                let at = (called, clock.now());
                let input = Input::Put { key, value };
                record(history, thread, input, output_of(result), at);
            }
            55..=64 => {
                let key = single(rng.random_range(0..SINGLE_KEYS));
                let version = seen.get(&key).copied().unwrap_or(0);
                let result = db.put_if_version(key.clone(), value.clone(), version);
                let at = (called, clock.now());
                let input = Input::PutIfVersion {
                    key,
                    value,
                    version,
                };
                record(history, thread, input, output_of(result), at);
            }
            65..=69 => {
                let key = single(rng.random_range(0..SINGLE_KEYS));
                let result = db.delete(key.clone());
                let at = (called, clock.now());
                let output = match result {
                    Ok(existed) => Output::Deleted { existed },
                    Err(DbError::Timeout) => Output::Unknown,
                    Err(e) => panic!("unexpected error {e}"),
                };
                record(history, thread, Input::Delete { key }, output, at);
            }
            70..=89 => {
                // A batch: both keys of a pair get the same token, under a
                // condition on the first key's version.
                let n = rng.random_range(0..PAIRS);
                let (a, b) = (pair(n, 'a'), pair(n, 'b'));
                let version = seen.get(&a).copied().unwrap_or(0);
                let mut batch = WriteBatch::new();
                batch
                    .check_version(a.clone(), version)
                    .put(a.clone(), value.clone())
                    .put(b.clone(), value.clone());
                let result = db.write(batch);
                let at = (called, clock.now());
                let on_a = Input::PutIfVersion {
                    key: a.clone(),
                    value: value.clone(),
                    version,
                };
                let on_b = Input::Put {
                    key: b,
                    value: value.clone(),
                };
                match result {
                    Ok(versions) => {
                        assert_eq!(versions.len(), 2, "one version per write");
                        let written = |version| Output::Written { version };
                        record(history, thread, on_a, written(versions[0]), at);
                        record(history, thread, on_b, written(versions[1]), at);
                        seen.insert(a, versions[0]);
                    }
                    Err(DbError::ConditionFailed { index, current }) => {
                        assert_eq!(index, 0);
                        assert_ne!(current, version);
                        // Nothing was written to b: no operation on b
                        // (reads of b check that nothing was).
                        let failed = if current == 0 {
                            Output::NoKey
                        } else {
                            Output::VersionMismatch
                        };
                        record(history, thread, on_a, failed, at);
                        seen.insert(a, current);
                    }
                    Err(DbError::Timeout) => {
                        record(history, thread, on_a, Output::Unknown, at);
                        record(history, thread, on_b, Output::Unknown, at);
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            _ => {
                // A scan of every pair and single key: one engine page.
                let pairs: BTreeMap<Bytes, shoal::engine::Versioned> =
                    db.scan("", "").collect::<Result<_, _>>().expect("scan");
                let at = (called, clock.now());
                let keys = (0..PAIRS)
                    .flat_map(|n| [pair(n, 'a'), pair(n, 'b')])
                    .chain((0..SINGLE_KEYS).map(single));
                for key in keys {
                    let output = match pairs.get(&key) {
                        Some(v) => Output::Value {
                            value: v.value.clone(),
                            version: v.version,
                        },
                        None => Output::NotFound,
                    };
                    record(history, thread, Input::Get { key }, output, at);
                }
                for n in 0..PAIRS {
                    let a = pairs.get(&pair(n, 'a')).map(|v| &v.value);
                    let b = pairs.get(&pair(n, 'b')).map(|v| &v.value);
                    assert_eq!(a, b, "pair {n} seen half-written by a scan");
                }
            }
        }
    }
}

#[test]
fn many_threads_on_one_db_are_linearizable_and_batches_atomic() {
    for seed in seeds() {
        eprintln!("SHOAL_SEED={seed}");
        let result = std::panic::catch_unwind(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = Arc::new(Db::open(dir.path()).expect("open"));
            let history = Arc::new(HistoryRecorder::new());
            let clock = Clock(AtomicU64::new(0));
            std::thread::scope(|scope| {
                for thread in 0..THREADS {
                    let (db, history, clock) = (db.clone(), history.clone(), &clock);
                    scope.spawn(move || client(&db, &history, clock, seed, thread));
                }
            });
            let outcome = history.check(CHECK_STEPS_MAX);
            assert!(
                outcome.is_linearizable(),
                "history of {} operations: {outcome:?}",
                history.history().len()
            );
            Arc::into_inner(db)
                .expect("threads ended")
                .close()
                .expect("close");
        });
        if let Err(e) = result {
            eprintln!("FAILED: replay with SHOAL_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}
