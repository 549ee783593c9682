//! Shoal: an embedded key/value database that grows into a cluster —
//! linearizable storage replicated by Raft, stored in RocksDB, split into
//! shards, peers linked by QUIC.
//!
//! # Layout
//! This facade re-exports the workspace's crates and adds the database's
//! front doors:
//! - [`consensus`]: the Raft core (no I/O).
//! - [`engine`]: RocksDB storage — Raft log store, KV state machine,
//!   sessions, SST snapshots.
//! - [`net`]: QUIC with mutual TLS, and the in-memory network.
//! - [`shard`]: the node runtime, KV protocol and client.
//! - [`certs`]: the certificate directory `shoal certs init` writes.
//! - [`db`]: [`Db`], the database in-process — a Raft group of one on
//!   RocksDB, durable on return of every write.
//! - [`cluster`]: member lists, the node runner behind `shoal node`, and the
//!   cluster [`Client`] / [`BlockingClient`] (QUIC, mutual TLS).
//! - [`jsonl`]: the JSON-lines protocol of `shoal client`.
//! - [`local_cluster`]: `shoal node` processes on loopback run by this
//!   process (the demo, the load generator).
//! - [`mapreduce`]: `shoal load` and `shoal mapreduce` (jobs over the
//!   stored keys; the runtime is `shard::mapreduce`).
//! - [`mrbench`]: `shoal bench-mapreduce` (word count: the job against
//!   a sequential run and coreutils).
//! - [`bench`]: the load generator behind `shoal bench` (Shoal and etcd).
//! - [`crashtest`]: the deterministic crash workload behind `shoal demo --engine`
//!   and the crash tests.

pub mod bench;
pub mod certs;
pub mod cluster;
pub mod crashtest;
pub mod db;
pub mod embench;
pub mod jsonl;
pub mod local_cluster;
pub mod mapreduce;
pub mod mrbench;
pub mod sharding;

pub use cluster::{BlockingClient, Client, ClientError, ConnectError};
pub use db::{AsyncDb, Db, DbBuilder, DbError, Durability, MapReduceJob, Scan};
pub use shoal_shard::WriteBatch;

pub use shoal_consensus as consensus;
pub use shoal_engine as engine;
pub use shoal_net as net;
pub use shoal_shard as shard;
