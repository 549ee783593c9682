//! Errors of the storage engine.
//!
//! Expected outcomes of a command (a version mismatch, a missing key) are not
//! errors: they are [`crate::Reply`] variants. Errors here mean the request
//! was refused before anything was written (limits), or storage failed.

use shoal_consensus::StorageError;

/// Which limit a request exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// A user key longer than [`crate::EngineConfig::key_bytes_max`].
    KeyBytes,
    /// A value longer than [`crate::EngineConfig::value_bytes_max`].
    ValueBytes,
    /// A log or apply batch larger than [`crate::EngineConfig::batch_bytes_max`].
    BatchBytes,
    /// A scan asking for more than [`crate::EngineConfig::scan_limit_max`] pairs.
    ScanLimit,
    /// A [`crate::Command::ExpireSessions`] naming more than
    /// [`crate::kv::EXPIRE_SESSIONS_PER_ENTRY_MAX`] sessions.
    ExpireSessions,
    /// A [`crate::Command::Batch`] with more than
    /// [`crate::kv::BATCH_OPS_MAX`] conditions and writes.
    BatchOps,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::KeyBytes => "key size",
            LimitKind::ValueBytes => "value size",
            LimitKind::BatchBytes => "batch size",
            LimitKind::ScanLimit => "scan limit",
            LimitKind::ExpireSessions => "sessions named by one expiry",
            LimitKind::BatchOps => "conditions and writes of one batch",
        })
    }
}

/// An error from the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A request exceeded a configured limit; nothing was written.
    #[error("{kind} {actual} exceeds the limit of {limit}")]
    LimitExceeded {
        /// Which limit.
        kind: LimitKind,
        /// The offending size or count.
        actual: u64,
        /// The configured maximum.
        limit: u64,
    },
    /// Stored data failed its checksum or did not decode.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A request is inconsistent with what is stored (e.g. appending with a
    /// gap after the last index, compacting past the last index).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(String),
    /// A file-system operation failed.
    #[error("I/O error at {path}: {source}")]
    Io {
        /// What was being accessed.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The data directory was written in an on-disk format this build does
    /// not read (`found` 0: an older build that wrote no format marker).
    /// Nothing was changed.
    #[error(
        "the data directory is in on-disk format {found}, this build reads format {expected} \
         (0: written by a build before format markers); use a matching build"
    )]
    Format {
        /// The format the directory holds.
        found: u32,
        /// The format this build reads and writes.
        expected: u32,
    },
    /// [`crate::Engine::install_snapshot`] was given a directory outside
    /// the engine's data directory. The install marker names the directory
    /// relative to the data directory (so a data directory moved or
    /// restored elsewhere still finishes an interrupted install), which
    /// needs it inside. Nothing was written.
    #[error(
        "snapshot directory {dir} is not inside the data directory {data_dir}: \
         keep snapshots to install inside the data directory"
    )]
    SnapshotDirOutsideDataDir {
        /// The snapshot directory given.
        dir: std::path::PathBuf,
        /// The engine's data directory.
        data_dir: std::path::PathBuf,
    },
    /// An interrupted snapshot install cannot be finished: the shards'
    /// ranges were already cleared, and a file still to ingest is missing
    /// or corrupt. Raised when opening; the engine refuses to open rather
    /// than serve cleared shards at the old applied index (see
    /// [`crate::snapshot`] for why the state cannot be rebuilt locally).
    #[error(
        "group {group}: an interrupted snapshot install cannot be finished: {file} is \
         missing or corrupt after the shards were cleared ({source}); the old data is \
         gone and the new cannot be rebuilt locally: restore the snapshot directory \
         or rebuild this replica from the cluster"
    )]
    SnapshotInstallUnrecoverable {
        /// The group being installed.
        group: crate::GroupId,
        /// The file (or manifest) that failed.
        file: std::path::PathBuf,
        /// What was wrong with it.
        #[source]
        source: Box<EngineError>,
    },
}

impl From<rocksdb::Error> for EngineError {
    fn from(e: rocksdb::Error) -> Self {
        EngineError::Rocks(e.into_string())
    }
}

impl EngineError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<EngineError> for StorageError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Corrupt(m) => StorageError::Corrupt(m),
            other => StorageError::Io(other.to_string()),
        }
    }
}

/// Shorthand for engine results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
