//! Errors returned by the core to its caller.

use crate::config::ConfigError;
use crate::storage::StorageError;
use crate::types::{Index, NodeId};

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
    /// The leader refused a membership change
    /// ([`crate::RawNode::propose_conf_change`]).
    #[error("membership change refused: {0}")]
    ConfChange(#[from] ConfChangeError),
    /// Storage failed (corruption or I/O). The node must not continue;
    /// rebuild it from storage once the cause is fixed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// Why the leader refused a membership change. Nothing was proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfChangeError {
    /// An earlier change (or, for a new leader, any entry before its own
    /// term's first) is not applied yet: one change at a time.
    #[error(
        "a membership change is in progress (pending at index {pending_index}, applied {applied})"
    )]
    Pending {
        /// Index of the change (or the leader's first entry) still pending.
        pending_index: Index,
        /// What this node has applied.
        applied: Index,
    },
    /// Node id 0 means "nobody".
    #[error("node id must not be 0")]
    ZeroNode,
    /// The node is a member already.
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    /// The node is not a member.
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    /// Only a learner can be promoted (a new member joins as a learner).
    #[error("node {0} is not a learner")]
    NotLearner(NodeId),
    /// The learner's log is too far behind to vote yet.
    #[error("learner {node} is behind: it has {matched} of {committed} committed entries")]
    LearnerBehind {
        /// The learner.
        node: NodeId,
        /// The highest index it is known to hold.
        matched: Index,
        /// The leader's commit index.
        committed: Index,
    },
    /// The leader cannot remove itself: transfer leadership first.
    #[error("node {0} leads the group: transfer leadership before removing it")]
    RemoveLeader(NodeId),
    /// The group would have no voter left.
    #[error("node {0} is the last voter")]
    LastVoter(NodeId),
    /// The group would have more members than allowed.
    #[error("{count} members exceed the maximum of {max}")]
    TooManyMembers {
        /// Members after the change.
        count: usize,
        /// Limit ([`crate::config::VOTERS_MAX`]).
        max: usize,
    },
}
