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
//! - [`backup`]: restoring a backup ([`Db::backup`], `shoal backup`) into
//!   a new data directory for a `Db` or a `shoal node`.
//! - [`cluster`]: member lists, the node runner behind `shoal node`, and the
//!   cluster [`Client`] / [`BlockingClient`] (QUIC, mutual TLS).
//!
//! # The `cli` feature
//! Off by default: a program that links Shoal gets the modules above and
//! none of the command line's crates (clap, indicatif, h2, http, hyper,
//! metrics-exporter-prometheus, anyhow). The libraries record metrics through
//! the `metrics` facade, which records nothing until a program installs a
//! recorder.
//! The feature builds the `shoal` binary and the tool modules behind its
//! commands, which its tests and benchmarks use too:
//! - `jsonl`: the JSON-lines protocol of `shoal client`.
//! - `local_cluster`: `shoal node` processes on loopback run by this
//!   process (the demo, the load generator, the cluster tests).
//! - `sharding`: `shoal shard`, the admin client of a sharded cluster.
//! - `mapreduce`: `shoal load` and `shoal mapreduce` (jobs over the
//!   stored keys; the runtime is `shard::mapreduce`, and [`Db::mapreduce`]
//!   runs one in-process without the feature).
//! - `mrbench`: `shoal bench-mapreduce` (word count: the job against
//!   a sequential run and coreutils).
//! - `movebench`: `shoal bench-move` (a live shard move on local
//!   nodes: move rate, writes held up, cost to the other shards).
//! - `bench`: the load generator behind `shoal bench` (Shoal and etcd).
//! - `embench`: `shoal bench --embedded` ([`Db`] beside RocksDB used
//!   directly and redb; `benches/embedded.rs` too).
//! - `crashtest`: the deterministic crash workload behind `shoal demo
//!   --engine` and the crash tests.
//! - `status`: `shoal node --status-addr`, the node's Prometheus metrics,
//!   `/health` and `/ready` over HTTP (hyper, metrics-exporter-prometheus).
//!
//! Errors: the always-on modules return typed errors (`thiserror` enums);
//! the tool modules return `anyhow`, as the binary does.

pub mod backup;
#[cfg(feature = "cli")]
pub mod bench;
pub mod certs;
pub mod cluster;
#[cfg(feature = "cli")]
pub mod crashtest;
pub mod db;
#[cfg(feature = "cli")]
pub mod embench;
#[cfg(feature = "cli")]
pub mod jsonl;
#[cfg(feature = "cli")]
pub mod local_cluster;
#[cfg(feature = "cli")]
pub mod mapreduce;
#[cfg(feature = "cli")]
pub mod movebench;
#[cfg(feature = "cli")]
pub mod mrbench;
#[cfg(feature = "cli")]
pub mod sharding;
#[cfg(feature = "cli")]
pub mod status;

pub use cluster::{BlockingClient, Client, ClientError, ConnectError};
pub use db::{AsyncDb, Db, DbBuilder, DbError, Durability, MapReduceJob, Scan};
pub use shoal_shard::WriteBatch;

pub use shoal_consensus as consensus;
pub use shoal_engine as engine;
pub use shoal_net as net;
pub use shoal_shard as shard;
