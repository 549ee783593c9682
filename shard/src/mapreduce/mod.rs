//! MapReduce over the keys stored in Shoal (issue 12): the pure, I/O-free
//! core. A job reads a key range (or prefix) of the database, runs map tasks
//! over splits of it aligned to shards, partitions the intermediate pairs
//! into `R` reduce partitions by hash, and writes each partition's output
//! under an output prefix. The coordinator's task table is a pure state
//! machine the runtime stores in the database, so a job survives a
//! coordinator crash; the runtime (not here) does the reads, writes, RPCs
//! and clocks.
//!
//! - [`app`]: the [`MapReduceApp`] trait, the built-in apps by name
//!   ([`app_by_name`]: `wc`, `indexer`, `grep:PATTERN`) and
//!   [`run_sequential`], the reference output.
//! - [`plan`]: [`KeyRange`], [`JobSpec::validate`], [`split_range`] (map
//!   tasks aligned to shards, sized by a target) and [`partition`] (the
//!   intermediate key → partition hash, a contract).
//! - [`coordinator`]: [`JobTable`], the task table driven by explicit time:
//!   leases (10 s), backup attempts (no earlier than 10 s), lost workers'
//!   map outputs re-run, bounded attempts, done only when every reduce is.
//! - [`worker`]: [`map_task`] and [`reduce_task`], a worker's computation
//!   between reading its input and storing its output.
//!
//! # Example
//! One worker runs a word count over two documents:
//!
//! ```
//! use std::collections::BTreeMap;
//! use shoal_shard::mapreduce::*;
//!
//! let data = BTreeMap::from([(b"doc/1".to_vec(), b"a b a".to_vec()), (b"doc/2".to_vec(), b"b".to_vec())]);
//! let spec = JobSpec { input: KeyRange::prefix(b"doc/"), output_prefix: b"out/".to_vec(), reduce_count: 2 };
//! spec.validate().unwrap();
//! // One shard here; a cluster lists each shard with its size and sampled keys.
//! let shard = ShardInput { shard: 0, approx_bytes: 12, split_keys: vec![b"doc/2".to_vec()] };
//! let splits = split_range(&spec.input, &[shard], 6).unwrap();
//! assert_eq!(splits.len(), 2);
//! let mut table = JobTable::new(splits, spec.reduce_count, JobConfig::default()).unwrap();
//! let app = app_by_name("wc").unwrap();
//! let (worker, mut runs, mut output) = (WorkerId(1), Vec::new(), BTreeMap::new());
//! loop {
//!     match table.request_task(worker, 0).unwrap() {
//!         Assignment::Map { task, attempt, split } => {
//!             let pairs = data.iter().filter(|(k, _)| split.range.contains(k));
//!             runs.push(map_task(app.as_ref(), pairs, spec.reduce_count));
//!             table.map_finished(worker, task, attempt, b"local".to_vec()).unwrap();
//!         }
//!         Assignment::Reduce { partition, attempt, .. } => {
//!             let mine = runs.iter().map(|r: &Vec<Run>| r[partition as usize].clone());
//!             output.extend(reduce_task(app.as_ref(), mine));
//!             table.reduce_finished(worker, partition, attempt).unwrap();
//!         }
//!         Assignment::Wait => unreachable!("one worker never waits"),
//!         Assignment::Done => break,
//!     }
//! }
//! assert_eq!(output, run_sequential(app.as_ref(), &data));
//! assert_eq!(output[&b"a".to_vec()], b"2");
//! ```

pub mod app;
pub mod coordinator;
pub mod labapps;
pub mod plan;
pub mod runtime;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod tests;

pub use app::{app_by_name, run_sequential, Grep, Indexer, MapReduceApp, WordCount};
pub use coordinator::{
    table_bytes_max, Assignment, Attempt, AttemptStatus, ConfigError, Finish, JobConfig,
    JobFailure, JobTable, MapOutput, ReportError, TaskRef, TaskState, WorkerId, WorkerLoss,
    ATTEMPTS_DEFAULT, BACKUP_AFTER_MS_MIN, MAP_OUTPUT_LOCATION_BYTES_MAX, TASK_ATTEMPTS_MAX,
    TASK_LEASE_MS_DEFAULT,
};
pub use plan::{
    partition, prefix_end, split_range, JobSpec, KeyRange, MapSplit, PlanError, ShardInput,
    MAP_TASKS_MAX, REDUCE_PARTITIONS_MAX,
};
pub use worker::{map_task, reduce_task, Run};
