//! Error enums, one per area of the crate.

use std::path::PathBuf;

use crate::NodeId;

/// A configuration value is out of its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config field `{field}`: {reason}")]
pub struct ConfigError {
    /// Name of the offending field.
    pub field: &'static str,
    /// Why it is refused.
    pub reason: String,
}

/// Creating or loading certificates and keys failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM text could not be parsed.
    #[error("bad PEM input: {0}")]
    Pem(String),
    /// rustls refused the certificates or keys when building a TLS config.
    #[error("TLS configuration rejected: {0}")]
    Tls(String),
    /// A client name contains characters that cannot go into a DNS name.
    #[error("invalid client name {0:?}: use [a-z0-9-], 1..=63 characters")]
    InvalidClientName(String),
}

/// Setting up an endpoint (node or client) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The configuration failed [`crate::Limits::validate`] or similar checks.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS identity could not be used.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// Binding the UDP socket or creating a directory failed.
    #[error("I/O error during setup: {0}")]
    Io(#[from] std::io::Error),
}

/// Reading or writing one frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the maximum frame size.
    #[error("frame of {bytes} bytes exceeds the maximum of {max_bytes} bytes")]
    TooLarge {
        /// Announced size.
        bytes: u64,
        /// Configured maximum.
        max_bytes: u64,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame (truncated input)")]
    Truncated,
    /// The frame's content did not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// A request/response call failed. The request may or may not have run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No address is known for this node.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The node could not be reached (connection refused, TLS failure, link down).
    #[error("node {node} unreachable: {reason}")]
    Unreachable {
        /// Target node.
        node: NodeId,
        /// Cause, for logs.
        reason: String,
    },
    /// The deadline passed before a reply arrived.
    #[error("deadline exceeded")]
    Timeout,
    /// The request or the reply was lost (connection reset, injected fault,
    /// or the handler dropped its responder).
    #[error("request or reply lost: {0}")]
    Lost(String),
    /// The request or the reply did not fit in a frame or did not decode.
    #[error("codec error: {0}")]
    Codec(String),
    /// The local endpoint is shutting down.
    #[error("endpoint is shutting down")]
    ShuttingDown,
}

/// Sending or receiving a bulk file failed. The receiver never keeps a partial file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BulkError {
    /// Reading the source file or writing the destination failed.
    #[error("file I/O error on {path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The target could not be reached or the transfer was cut.
    #[error("transfer failed: {0}")]
    Transport(#[from] RpcError),
    /// The receiver refused the file (checksum, size, disk); its reason.
    #[error("receiver rejected the file: {0}")]
    Rejected(String),
    /// The file is larger than `bulk_file_bytes_max`.
    #[error("file of {bytes} bytes exceeds the maximum of {max_bytes} bytes")]
    TooLarge {
        /// File size.
        bytes: u64,
        /// Configured maximum.
        max_bytes: u64,
    },
}

/// Why a transport's fault filter could not be changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultFilterError {
    /// Fault injection is off on this node.
    #[error("fault injection is disabled on this node (set NodeConfig::fault_injection_enabled)")]
    Disabled,
    /// This transport has no fault filter.
    #[error("this transport has no fault filter")]
    Unsupported,
}
