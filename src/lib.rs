//! Shoal: an embedded key/value database that grows into a cluster —
//! linearizable storage replicated by Raft, stored in RocksDB, split into
//! shards, peers linked by QUIC.
//!
//! # Layout
//! This facade re-exports the workspace's crates:
//! - [`consensus`]: the Raft core (no I/O).
//! - [`engine`]: RocksDB storage — Raft log store, KV state machine,
//!   sessions, SST snapshots.
//! - [`certs`]: the certificate directory `shoal certs init` writes.
//! - [`crashtest`]: the deterministic crash workload behind `shoal demo` and
//!   the crash tests.
//!
//! The networked node runtime, client and embedded `Db` API arrive with the
//! node-runtime work (see ARCHITECTURE.md).

pub mod certs;
pub mod crashtest;

pub use shoal_consensus as consensus;
pub use shoal_engine as engine;
