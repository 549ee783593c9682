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
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::KeyBytes => "key size",
            LimitKind::ValueBytes => "value size",
            LimitKind::BatchBytes => "batch size",
            LimitKind::ScanLimit => "scan limit",
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
