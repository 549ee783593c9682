//! The read side of the Raft log, as the core needs it.
//!
//! The core never writes storage: it hands entries, hard state and snapshots
//! to the caller in a `Ready`, the caller persists them (for the RocksDB
//! engine, one synced write per round) and then calls `advance`. What the
//! core reads back through this trait must include everything persisted
//! before that `advance`.
//!
//! The shape follows etcd-raft's `Storage`: indexes `first_index() ..=
//! last_index()` are readable; `term(first_index() - 1)` is the term of the
//! last compacted entry (the snapshot's), so the core can still check log
//! matching at the boundary.

use crate::types::{Entry, Index, RaftState, Snapshot, Term};

/// Why a storage read could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The index lies in the compacted prefix; send a snapshot instead.
    #[error("log index is compacted")]
    Compacted,
    /// The index lies past the last stored entry.
    #[error("log index is not yet available")]
    Unavailable,
    /// A snapshot is being produced; ask again later.
    #[error("snapshot temporarily unavailable")]
    SnapshotTemporarilyUnavailable,
    /// Stored data failed its checksum or did not decode. The message names
    /// the group and index.
    #[error("corrupt log storage: {0}")]
    Corrupt(String),
    /// The storage layer failed (disk error, closed database).
    #[error("log storage I/O error: {0}")]
    Io(String),
}

/// Read access to a group's persisted log.
///
/// Implementations: the RocksDB log store (`shoal-engine`), and
/// [`crate::MemStorage`] for tests and simulation.
pub trait Storage {
    /// Hard state and membership as last persisted.
    fn initial_state(&self) -> Result<RaftState, StorageError>;

    /// Entries with indexes in `[low, high)`, stopping once their total
    /// [`Entry::size_bytes`] would exceed `max_bytes` — but always at least
    /// one entry when `low < high`, so progress is never blocked by one large
    /// entry. `Compacted` if `low < first_index()`, `Unavailable` if
    /// `high > last_index() + 1`.
    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError>;

    /// Term of the entry at `index`, for `first_index() - 1 <= index <=
    /// last_index()`.
    fn term(&self, index: Index) -> Result<Term, StorageError>;

    /// Index of the first entry still stored (snapshot index + 1).
    fn first_index(&self) -> Result<Index, StorageError>;

    /// Index of the last stored entry (the snapshot index if none follow).
    fn last_index(&self) -> Result<Index, StorageError>;

    /// The most recent snapshot, to send to a follower that needs entries
    /// of the compacted prefix, or a joining member that takes its first
    /// state as a snapshot. Its index must be at least `request_index`;
    /// `SnapshotTemporarilyUnavailable` if the latest one is older (the
    /// caller takes a newer one: see [`crate::RawNode::snapshot_wanted`]).
    fn snapshot(&self, request_index: Index) -> Result<Snapshot, StorageError>;
}
