//! The narrow key/value seam the engine is written against.
//!
//! The log store, the state machine and snapshots are written once, over
//! [`Backend`]; [`crate::rocks`] implements it on RocksDB and [`crate::mem`]
//! on ordered maps (for simulation, with crash semantics). That keeps
//! `MemStore` and the RocksDB store the same code above this line, and the
//! property test holding them equal only has to cover this seam.
//!
//! Contract shared by both implementations:
//! - `write` applies all of a [`WriteSet`] or none of it.
//! - `write(.., sync = true)` returns only once that write *and every write
//!   before it* are durable (RocksDB's WAL is one ordered log, so a synced
//!   write also makes earlier unsynced writes durable).
//! - A crash may lose unsynced writes, only as a suffix: never one write
//!   while keeping a later one.

use std::path::Path;

use crate::error::Result;

/// The column families of a node's database (see DESIGN.md for key layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries: group (u64 BE) + index (u64 BE).
    RaftLog,
    /// Per-group Raft state: hard state, membership, compaction point.
    RaftState,
    /// User data: group (u64 BE) + shard (u32 BE) + user key.
    Kv,
    /// Client sessions: group (u64 BE) + shard (u32 BE) + client id (u64 BE).
    Dedup,
    /// Applied index per group, shard ownership records, install markers.
    Meta,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 5] = [Cf::RaftLog, Cf::RaftState, Cf::Kv, Cf::Dedup, Cf::Meta];

    /// The column family's name in RocksDB.
    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::Kv => "kv",
            Cf::Dedup => "dedup",
            Cf::Meta => "meta",
        }
    }
}

/// One mutation of a [`WriteSet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put(Cf, Vec<u8>, Vec<u8>),
    /// Remove `key`.
    Delete(Cf, Vec<u8>),
    /// Remove every key in `[start, end)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// Mutations applied atomically by one [`Backend::write`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSet {
    pub(crate) ops: Vec<WriteOp>,
    pub(crate) bytes: u64,
}

impl WriteSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a put.
    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.bytes += (key.len() + value.len()) as u64;
        self.ops.push(WriteOp::Put(cf, key, value));
    }
    /// Adds a delete.
    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.bytes += key.len() as u64;
        self.ops.push(WriteOp::Delete(cf, key));
    }
    /// Adds a range delete of `[start, end)`.
    pub fn delete_range(&mut self, cf: Cf, start: Vec<u8>, end: Vec<u8>) {
        self.bytes += (start.len() + end.len()) as u64;
        self.ops.push(WriteOp::DeleteRange(cf, start, end));
    }
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Bytes of keys and values in the set.
    pub fn size_bytes(&self) -> u64 {
        self.bytes
    }
}

/// What one exported file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedFile {
    /// Pairs written.
    pub entries: u64,
    /// Size of the file.
    pub size_bytes: u64,
}

/// The visitor [`View::scan`] calls with each key and value; returning
/// `false` stops the scan.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

/// Reads at one point in time.
pub trait View {
    /// The value at `key`, if any.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Visits the pairs with keys in `[start, end)` in key order until
    /// `visit` returns `false`.
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visitor<'_>) -> Result<()>;
    /// The pair with the greatest key in `[start, end)`.
    fn last_in(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Writes the pairs in `[start, end)` to a new file at `path` in the
    /// backend's ingestible format; `None` (and no file) when the range is
    /// empty. With `prefix`, each key's first `prefix.len()` bytes are
    /// replaced by it (a shard moving to another group's key range); order
    /// is kept because every key of the range shares those bytes.
    fn export_range(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>>;
    /// Writes `keys` (sorted and distinct) as they are in this view to a
    /// new file at `path` in the backend's ingestible format: each key's
    /// value, or a deletion for a key that has none, so that ingesting the
    /// file over an older copy of those keys brings them to this view's
    /// state. `None` (and no file) when `keys` is empty. `prefix` renames
    /// as in [`View::export_range`] (every key must share its length of
    /// leading bytes).
    fn export_keys(
        &self,
        cf: Cf,
        keys: &[Vec<u8>],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>>;
}

/// `key` with its first `prefix.len()` bytes replaced by `prefix` (a key
/// moving to another group's key range), into `out`.
pub(crate) fn renamed_into<'a>(
    key: &'a [u8],
    prefix: Option<&[u8]>,
    out: &'a mut Vec<u8>,
) -> &'a [u8] {
    match prefix {
        Some(p) => {
            out.clear();
            out.extend_from_slice(p);
            out.extend_from_slice(key.get(p.len()..).unwrap_or_default());
            &out[..]
        }
        None => key,
    }
}

/// A storage backend: a [`View`] of the latest state, atomic writes, point-
/// in-time views and file ingestion.
pub trait Backend: View + Send + Sync + std::fmt::Debug + 'static {
    /// Applies `set` atomically; durable on return when `sync`.
    fn write(&self, set: WriteSet, sync: bool) -> Result<()>;
    /// Makes every write so far durable.
    fn sync(&self) -> Result<()>;
    /// Runs `f` over a consistent point-in-time view.
    fn with_view(&self, f: &mut dyn FnMut(&dyn View) -> Result<()>) -> Result<()>;
    /// Adds the pairs of a file made by [`View::export_range`] to `cf`,
    /// newer than every existing write, atomically. The file is consumed.
    fn ingest(&self, cf: Cf, path: &Path) -> Result<()>;
    /// The directory the backend keeps its files in (`None`: it has none,
    /// as in memory). Snapshot installs name their directory relative to
    /// it, so a data directory moved or restored elsewhere stays whole.
    fn data_dir(&self) -> Option<&Path>;
}
