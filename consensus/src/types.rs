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
    /// A membership change: the payload is an encoded [`ConfChange`].
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

/// The membership of a group. Lists are kept sorted and disjoint: a member
/// is a voter or a learner, never both.
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

impl ConfState {
    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Voters and learners, in that order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }
}

/// What a membership change asks for. One member changes per change (the
/// single-server changes of the Raft dissertation, §4.1), so the majorities
/// of the configurations before and after always intersect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConfChangeKind {
    /// Add a member that receives the log but neither votes nor counts
    /// towards quorums. A new member always joins this way.
    AddLearner,
    /// Make a caught-up learner a voter.
    PromoteLearner,
    /// Remove a voter or a learner.
    Remove,
}

impl ConfChangeKind {
    fn to_byte(self) -> u8 {
        match self {
            ConfChangeKind::AddLearner => 1,
            ConfChangeKind::PromoteLearner => 2,
            ConfChangeKind::Remove => 3,
        }
    }

    fn from_byte(b: u8) -> Option<ConfChangeKind> {
        match b {
            1 => Some(ConfChangeKind::AddLearner),
            2 => Some(ConfChangeKind::PromoteLearner),
            3 => Some(ConfChangeKind::Remove),
            _ => None,
        }
    }
}

/// The payload of a [`EntryKind::ConfigChange`] entry: the change, the whole
/// membership it results in (so a member that replays the log from its
/// start, or from a snapshot, never needs the configuration before), and an
/// opaque context for the layer above (e.g. the new member's address).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConfChange {
    /// What changes.
    pub kind: ConfChangeKind,
    /// The member it changes.
    pub node: NodeId,
    /// The membership once the change is applied.
    pub conf_after: ConfState,
    /// Opaque to the core.
    pub context: Bytes,
}

/// Why a [`ConfChange`] payload did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed configuration change entry: {0}")]
pub struct ConfChangeDecodeError(&'static str);

/// Format version of an encoded [`ConfChange`] (its first byte).
const CONF_CHANGE_FORMAT: u8 = 1;

impl ConfChange {
    /// The entry payload: format byte, kind byte, node (u64 LE), voter and
    /// learner counts (u16 LE each) followed by their ids (u64 LE), then the
    /// context's remaining bytes.
    pub fn encode(&self) -> Bytes {
        let ids = self.conf_after.voters.len() + self.conf_after.learners.len();
        let mut v = Vec::with_capacity(14 + 8 * ids + self.context.len());
        v.push(CONF_CHANGE_FORMAT);
        v.push(self.kind.to_byte());
        v.extend_from_slice(&self.node.to_le_bytes());
        for list in [&self.conf_after.voters, &self.conf_after.learners] {
            let n = u16::try_from(list.len()).expect("member lists are bounded by VOTERS_MAX");
            v.extend_from_slice(&n.to_le_bytes());
            for id in list {
                v.extend_from_slice(&id.to_le_bytes());
            }
        }
        v.extend_from_slice(&self.context);
        Bytes::from(v)
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(data: &Bytes) -> Result<ConfChange, ConfChangeDecodeError> {
        fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], ConfChangeDecodeError> {
            if buf.len() < n {
                return Err(ConfChangeDecodeError("truncated"));
            }
            let (head, rest) = buf.split_at(n);
            *buf = rest;
            Ok(head)
        }
        fn u64_at(buf: &mut &[u8]) -> Result<u64, ConfChangeDecodeError> {
            Ok(u64::from_le_bytes(
                take(buf, 8)?.try_into().expect("8 bytes"),
            ))
        }
        let mut buf: &[u8] = data;
        if take(&mut buf, 1)?[0] != CONF_CHANGE_FORMAT {
            return Err(ConfChangeDecodeError("unknown format version"));
        }
        let kind = ConfChangeKind::from_byte(take(&mut buf, 1)?[0])
            .ok_or(ConfChangeDecodeError("unknown kind"))?;
        let node = u64_at(&mut buf)?;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = u16::from_le_bytes(take(&mut buf, 2)?.try_into().expect("2 bytes"));
            for _ in 0..n {
                list.push(u64_at(&mut buf)?);
            }
        }
        let [voters, learners] = lists;
        let context = data.slice(data.len() - buf.len()..);
        Ok(ConfChange {
            kind,
            node,
            conf_after: ConfState { voters, learners },
            context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_change_round_trips_and_refuses_malformed_payloads() {
        let cc = ConfChange {
            kind: ConfChangeKind::PromoteLearner,
            node: 4,
            conf_after: ConfState {
                voters: vec![1, 2, 3, 4],
                learners: vec![9],
            },
            context: Bytes::from_static(b"10.0.0.4:7000"),
        };
        let bytes = cc.encode();
        assert_eq!(ConfChange::decode(&bytes), Ok(cc));
        for cut in 0..bytes.len() - 13 {
            assert!(
                ConfChange::decode(&bytes.slice(..cut)).is_err(),
                "cut {cut}"
            );
        }
        let mut bad = bytes.to_vec();
        bad[0] = 9;
        assert!(ConfChange::decode(&Bytes::from(bad)).is_err());
        let mut bad = bytes.to_vec();
        bad[1] = 0;
        assert!(ConfChange::decode(&Bytes::from(bad)).is_err());
    }
}
