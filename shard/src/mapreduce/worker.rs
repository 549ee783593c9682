//! The pure part of a worker: running a map task over its input pairs into
//! one sorted run per reduce partition ([`map_task`]), and a reduce task
//! over the runs of every map task ([`reduce_task`]). Reading the split,
//! storing runs (temporary, then atomically renamed), fetching them and
//! writing the output are the runtime's.
//!
//! Both work in memory: a map task's input is bounded by the split size
//! target of [`split_range`](super::split_range), a reduce task's by the
//! job's intermediate data over its partition count.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::app::MapReduceApp;
use super::plan::partition;

/// Intermediate pairs of one partition from one map task, sorted by key
/// (pairs of equal keys in emission order).
pub type Run = Vec<(Vec<u8>, Vec<u8>)>;

/// Maps every pair of `inputs` with `app` and partitions the intermediate
/// pairs by [`partition`]: element `p` of the result is partition `p`'s run
/// (empty if nothing was emitted for it), `reduce_count` in all.
///
/// # Panics
/// If `reduce_count` is 0.
pub fn map_task<K, V>(
    app: &dyn MapReduceApp,
    inputs: impl IntoIterator<Item = (K, V)>,
    reduce_count: u32,
) -> Vec<Run>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    assert!(
        reduce_count > 0,
        "map_task: the reduce count must be positive"
    );
    if app.has_combiner() {
        return map_combining(app, inputs, reduce_count);
    }
    let mut runs: Vec<Run> = vec![Vec::new(); reduce_count as usize];
    for (key, value) in inputs {
        app.map(key.as_ref(), value.as_ref(), &mut |k, v| {
            runs[partition(k, reduce_count) as usize].push((k.to_vec(), v.to_vec()));
        });
    }
    for run in &mut runs {
        // Stable: values of a key keep their emission order.
        run.sort_by(|a, b| a.0.cmp(&b.0));
    }
    runs
}

/// [`map_task`] for an app with a combiner: one table per partition from
/// key to its combined value, so memory follows the distinct keys, not the
/// emitted pairs; each emission combines into its key's value at once.
fn map_combining<K, V>(
    app: &dyn MapReduceApp,
    inputs: impl IntoIterator<Item = (K, V)>,
    reduce_count: u32,
) -> Vec<Run>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut tables: Vec<CombineTable> = vec![CombineTable::default(); reduce_count as usize];
    for (key, value) in inputs {
        app.map(key.as_ref(), value.as_ref(), &mut |k, v| {
            let table = &mut tables[partition(k, reduce_count) as usize];
            match table.get_mut(k) {
                Some(acc) => {
                    let combined = app.combine(k, &mut [acc.as_slice(), v].into_iter());
                    *acc = combined;
                }
                None => {
                    table.insert(k.to_vec(), v.to_vec());
                }
            }
        });
    }
    tables
        .into_iter()
        .map(|table| {
            let mut run: Run = table.into_iter().collect();
            run.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            run
        })
        .collect()
}

/// A combining map task's table: key → value combined so far, hashed by
/// [`KeyHasher`].
type CombineTable = HashMap<Vec<u8>, Vec<u8>, BuildHasherDefault<KeyHasher>>;

/// A fast non-cryptographic hash for the combining tables (FxHash's
/// multiply-rotate over 8-byte words). The keys are the job's own
/// intermediate keys, hashed in a batch worker, so resistance to chosen
/// collisions (what std's SipHash buys) is not needed, and it costs about
/// a third of a word count's map time.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(SEED);
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.write(&[byte]);
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0.rotate_left(5) ^ n as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Reduces one partition from the runs of every map task (in map task
/// order): one output pair per distinct intermediate key, sorted by key.
/// The values of a key reach `reduce` in map task order, then emission
/// order.
pub fn reduce_task(app: &dyn MapReduceApp, runs: impl IntoIterator<Item = Run>) -> Run {
    let mut pairs: Run = runs.into_iter().flatten().collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut output = Vec::new();
    let mut rest = pairs.as_slice();
    while let Some((first, _)) = rest.first() {
        let same = rest.iter().take_while(|(key, _)| key == first).count();
        let (group, tail) = rest.split_at(same);
        let value = app.reduce(first, &mut group.iter().map(|(_, value)| value.as_slice()));
        output.push((first.clone(), value));
        rest = tail;
    }
    output
}

#[cfg(test)]
mod tests {
    //! Goal: planning, the task table and the worker functions together
    //! compute exactly what [`run_sequential`](crate::mapreduce::run_sequential)
    //! computes (the lab's `sort mr-out* == mr-correct` check), here with
    //! every piece real and only I/O simulated in memory.

    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::controller::shard_of;
    use crate::mapreduce::{
        app_by_name, run_sequential, split_range, Assignment, JobConfig, JobTable, KeyRange,
        ShardInput, WorkerId,
    };

    /// Runs `app` over `data` (in `shards` hash shards) with `workers`
    /// workers taking turns, returning the merged output.
    fn run_distributed(
        app: &dyn MapReduceApp,
        data: &BTreeMap<Vec<u8>, Vec<u8>>,
        input: &KeyRange,
        shards: u32,
        reduce_count: u32,
    ) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let shard_inputs: Vec<ShardInput> = (0..shards)
            .map(|shard| {
                let keys: Vec<&Vec<u8>> = data
                    .keys()
                    .filter(|k| shard_of(k, shards) == shard && input.contains(k))
                    .collect();
                ShardInput {
                    shard,
                    approx_bytes: keys.len() as u64 * 10,
                    split_keys: keys.iter().step_by(2).map(|k| k.to_vec()).collect(),
                }
            })
            .collect();
        let splits = split_range(input, &shard_inputs, 25).unwrap();
        assert!(
            splits.len() > shards as usize,
            "large shards split more than once"
        );
        let mut table = JobTable::new(splits, reduce_count, JobConfig::default()).unwrap();
        // Map outputs by location; each worker's location is its id.
        let mut stored: HashMap<Vec<u8>, Vec<Run>> = HashMap::new();
        let mut output = BTreeMap::new();
        let mut now_ms = 0;
        for turn in 0.. {
            assert!(turn < 10_000, "no progress");
            let worker = WorkerId(turn % 3);
            match table.request_task(worker, now_ms).unwrap() {
                Assignment::Map {
                    task,
                    attempt,
                    split,
                } => {
                    let pairs = data.iter().filter(|(k, _)| {
                        shard_of(k, shards) == split.shard && split.range.contains(k)
                    });
                    let location = format!("w{}/m{task}", worker.0).into_bytes();
                    stored.insert(location.clone(), map_task(app, pairs, reduce_count));
                    table.map_finished(worker, task, attempt, location).unwrap();
                }
                Assignment::Reduce {
                    partition,
                    attempt,
                    map_outputs,
                } => {
                    let runs = map_outputs
                        .iter()
                        .map(|m| stored[&m.location][partition as usize].clone());
                    output.extend(reduce_task(app, runs));
                    table.reduce_finished(worker, partition, attempt).unwrap();
                }
                Assignment::Wait => now_ms += 1_000,
                Assignment::Done => break,
            }
        }
        output
    }

    fn documents() -> BTreeMap<Vec<u8>, Vec<u8>> {
        let texts = [
            "the quick brown fox jumps over the lazy dog",
            "a dog is not a cat; a cat is not a fox",
            "Sherlock Holmes and Dr Watson",
            "Tom Sawyer and Huckleberry Finn",
            "the end",
        ];
        (0..40)
            .map(|i| {
                let key = format!("doc/{i:03}").into_bytes();
                let value = format!("{} {i}", texts[i % texts.len()]).into_bytes();
                (key, value)
            })
            .collect()
    }

    #[test]
    fn distributed_wc_and_indexer_equal_sequential() {
        let mut data = documents();
        data.insert(b"other/x".to_vec(), b"outside the input".to_vec());
        let input = KeyRange::prefix(b"doc/");
        let in_range = data.iter().filter(|(k, _)| input.contains(k));
        for name in ["wc", "indexer", "grep:dog"] {
            let app = app_by_name(name).unwrap();
            let want = run_sequential(app.as_ref(), in_range.clone());
            let got = run_distributed(app.as_ref(), &data, &input, 4, 3);
            assert_eq!(got, want, "app {name}");
        }
    }

    /// Goal: runs are partitioned by the contract hash and sorted, with
    /// equal keys in emission order, and the reduce groups across runs.
    #[test]
    fn combiner_shrinks_runs_and_keeps_the_result() {
        let wc = app_by_name("wc").unwrap();
        let text = "b a b c ".repeat(5_000);
        let runs = map_task(wc.as_ref(), [("k", text.as_str())], 2);
        let pairs: usize = runs.iter().map(Vec::len).sum();
        assert_eq!(pairs, 3, "one pair per distinct word: {runs:?}");
        let reduced: BTreeMap<Vec<u8>, Vec<u8>> =
            reduce_task(wc.as_ref(), runs).into_iter().collect();
        assert_eq!(reduced, run_sequential(wc.as_ref(), [("k", text.as_str())]));
        assert_eq!(reduced[&b"b".to_vec()], b"10000");
    }

    #[test]
    fn map_runs_are_partitioned_and_sorted() {
        let wc = app_by_name("wc").unwrap();
        let runs = map_task(wc.as_ref(), [("k", "b a b c")], 2);
        assert_eq!(runs.len(), 2);
        for (p, run) in runs.iter().enumerate() {
            assert!(run.windows(2).all(|w| w[0].0 <= w[1].0));
            assert!(run.iter().all(|(k, _)| partition(k, 2) as usize == p));
        }
        let reduced = reduce_task(wc.as_ref(), runs.clone().into_iter().chain(runs));
        let counts: Vec<(&[u8], &[u8])> = {
            let mut all: Vec<_> = reduced.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            all.sort();
            all
        };
        assert_eq!(
            counts,
            vec![(&b"a"[..], &b"2"[..]), (b"b", b"4"), (b"c", b"2")]
        );
    }
}
