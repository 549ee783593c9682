//! Errors returned by the core to its caller.

use crate::config::ConfigError;
use crate::storage::StorageError;
use crate::types::NodeId;

/// Why a call into [`crate::RawNode`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or the recovered state is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// This node is not the leader; `leader_hint` is the leader it knows
    /// of, or [`crate::NO_NODE`].
    #[error("not the leader (leader hint: {leader_hint})")]
    NotLeader {
        /// Last known leader, or 0.
        leader_hint: NodeId,
    },
    /// The leader refused the proposal for now (a leadership transfer is
    /// in progress, or too many entries are uncommitted). Retry later.
    #[error("proposal dropped")]
    ProposalDropped,
    /// Too many read-index requests are pending; retry later.
    #[error("too many pending read-index requests")]
    ReadIndexDropped,
    /// The node is not a member of the group.
    #[error("node {0} is not a member of the group")]
    UnknownPeer(NodeId),
    /// Storage failed (corruption or I/O). The node must not continue;
    /// rebuild it from storage once the cause is fixed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}
