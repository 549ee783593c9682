//! Shoal's storage engine: one RocksDB per node holding the Raft log of every
//! group on the node, the KV state machine of every group's shards, client
//! sessions, and SST snapshots of groups and shards.
//!
//! # Layout
//! - [`backend`]: the narrow key/value seam ([`Backend`]) everything else is
//!   written over; [`rocks`] implements it on RocksDB (all RocksDB options
//!   are set and explained there), [`mem`] on ordered maps with crash
//!   simulation.
//! - [`engine`]: the [`Engine`] handle; [`RocksEngine`] and [`MemStore`].
//! - [`log`]: the Raft log store — group-committed appends with hard state,
//!   suffix truncation, prefix compaction, CRC32-checked reads, a running
//!   log size ([`Engine::log_bytes`]); implements the consensus core's
//!   [`shoal_consensus::Storage`] per group.
//! - [`kv`]: the state machine — commands, atomic apply with sessions and the
//!   applied index, reads, and scans paged by count and bytes
//!   ([`ScanPage`]). Apply depends only on the log and the state: limits
//!   are checked when proposing, and session expiry names sessions.
//! - [`snapshot`]: export to SST files (a whole group, or one shard renamed
//!   for another group) and crash-atomic install, redo-logged relative to
//!   the data directory.
//! - [`backup`]: backups of groups (their snapshot files and a checksummed
//!   manifest, written atomically) and restoring one into a new engine.
//! - [`shards`]: each group's shard ownership records, changed atomically
//!   with the applied index.
//! - [`hosting`]: the groups a node hosts beyond its configuration, and
//!   dropping a group's whole storage (each one synced write).
//! - [`keys`]: key layouts and the checksummed record codec.
//! - [`metrics`]: the names of the series the engine records (log write
//!   and sync latency, apply) through the `metrics` facade.
//!
//! # Durability
//! [`Engine::write_log`] is synced: on return the entries and hard state are
//! on disk. [`Engine::apply`] is not: the applied state can be rebuilt by
//! replaying the log from the applied index + 1, and the next synced write
//! makes it durable anyway (one ordered WAL). Compaction never removes
//! entries above the applied index. A torn last WAL record (a crash while
//! writing) is dropped on open; a corrupt record anywhere else makes open
//! fail ([`rocks`]).
//!
//! # Example
//! ```
//! use shoal_engine::{ApplyEntry, Command, EngineConfig, LogBatch, GroupWrite, MemStore, Reply, Request};
//! use shoal_consensus::{Entry, HardState};
//!
//! let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
//! let entry = Entry { term: 1, index: 1, data: bytes::Bytes::from_static(b"cmd"), ..Default::default() };
//! engine.write_log(LogBatch { groups: vec![GroupWrite {
//!     group: 7, entries: vec![entry], hard_state: Some(HardState { term: 1, vote: 1, commit: 1 }), ..Default::default()
//! }] }).unwrap();
//! assert_eq!(engine.last_index(7).unwrap(), 1);
//!
//! let put = Request { shard: 0, client: 9, seq: 1,
//!     command: Command::Put { key: "k".into(), value: "v".into() } };
//! let replies = engine.apply(7, &[ApplyEntry { index: 1, term: 1, requests: vec![put] }]).unwrap();
//! assert_eq!(replies[0][0], Reply::Written { version: 1 });
//! assert_eq!(engine.get(7, 0, b"k").unwrap().unwrap().value, "v");
//! ```

pub mod backend;
pub mod backup;
pub mod config;
pub mod engine;
pub mod error;
pub mod hosting;
pub mod keys;
pub mod kv;
pub mod log;
pub mod mem;
pub mod membership;
pub mod metrics;
pub mod rocks;
pub mod shards;
pub mod snapshot;

/// Identifies a Raft group on a node.
pub type GroupId = u64;
/// Identifies a shard (in each group holding it, a contiguous key range in
/// `kv` and `dedup`).
pub type ShardId = u32;

pub use backend::{Backend, Cf};
pub use backup::{BackupError, BackupManifest, GroupBackup, RestoreError, RestoreOptions};
pub use config::EngineConfig;
pub use engine::{Engine, MemStore, RocksEngine, FORMAT_VERSION};
pub use error::{EngineError, LimitKind, Result};
pub use kv::{
    AppliedState, ApplyEntry, BatchWrite, ClientId, Command, Condition, EngineView, Reply, Request,
    ScanPage, Session, Versioned, EXPIRE_SESSIONS_PER_ENTRY_MAX,
};
pub use log::{GroupState, GroupStorage, GroupWrite, LogBatch};
pub use membership::{AppliedConf, MEMBER_ADDR_BYTES_MAX};
pub use shards::{ShardRecord, ShardSize, ShardStatus};
pub use snapshot::{SnapshotFile, SnapshotManifest, SnapshotScope};
