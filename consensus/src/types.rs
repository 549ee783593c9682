//! Values shared by the Raft core, its storage and the transport that carries
//! its messages. Everything here is plain data with fixed-width integers so it
//! can be written to disk and to the wire unchanged.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identifies a member of a Raft group. `0` is reserved for "nobody"
/// (no vote, no known leader).
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// A position in the replicated log; the first real entry has index 1.
pub type Index = u64;

/// The "nobody" node id: no vote cast, no leader known.
pub const NO_NODE: NodeId = 0;

/// What an entry's payload means to the layer above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// Application data (an empty payload is the leader's no-op).
    #[default]
    Normal,
    /// A membership change (reserved for the membership issue).
    ConfigChange,
}

/// One log entry. The payload is opaque to the core.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// Term in which the leader created the entry.
    pub term: Term,
    /// Position in the log.
    pub index: Index,
    /// How the payload is interpreted.
    pub kind: EntryKind,
    /// Opaque payload.
    pub data: Bytes,
}

/// Bytes of fixed overhead counted per entry when sizing batches
/// (term + index + kind + length prefix, rounded up).
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

impl Entry {
    /// Size used for every byte limit (batches, reads, messages).
    pub fn size_bytes(&self) -> u64 {
        self.data.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// The state that must be durable before a node answers anybody:
/// Raft's `currentTerm`, `votedFor`, and the commit index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate voted for in `term`, or [`NO_NODE`].
    pub vote: NodeId,
    /// Highest index known to be committed.
    pub commit: Index,
}

/// The membership of a group. Kept as a value inside the core's state so
/// that membership changes (a later issue) need no restructuring.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConfState {
    /// Members that vote and count towards quorums.
    pub voters: Vec<NodeId>,
    /// Members that receive the log but do not vote.
    pub learners: Vec<NodeId>,
}

/// Where a snapshot sits in the log, and the membership at that point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Last index the snapshot covers.
    pub index: Index,
    /// Term of the entry at `index`.
    pub term: Term,
    /// Membership as of `index`.
    pub conf_state: ConfState,
}

/// A snapshot as the core sees it: metadata plus opaque bytes. For the
/// RocksDB engine the bytes are a small descriptor (manifest) and the SST
/// files themselves travel over a bulk stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    /// Position and membership.
    pub meta: SnapshotMeta,
    /// Opaque to the core.
    pub data: Bytes,
}

impl Snapshot {
    /// True for the empty snapshot (index 0), which means "none".
    pub fn is_empty(&self) -> bool {
        self.meta.index == 0
    }
}

/// What a node recovers from storage when it starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftState {
    /// Persisted term, vote and commit.
    pub hard_state: HardState,
    /// Persisted membership.
    pub conf_state: ConfState,
}
