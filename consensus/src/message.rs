//! Messages exchanged between the nodes of one group.
//!
//! Plain serde data: the transport frames them, the shard layer wraps them
//! with a group id; the core knows neither.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::{Entry, Index, NodeId, Snapshot, Term};

/// One message from `from` to `to`, stamped with the sender's term (for a
/// pre-vote request and a granted pre-vote response: the term the sender
/// would campaign in).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// See the type's docs.
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// A (pre-)candidate asks for a vote.
    RequestVote {
        /// A pre-vote: nobody changes term or records a vote.
        pre_vote: bool,
        /// Index of the candidate's last entry.
        last_log_index: Index,
        /// Term of the candidate's last entry.
        last_log_term: Term,
        /// Sent after `TimeoutNow` (leadership transfer): voters ignore
        /// their leader lease.
        force: bool,
    },
    /// Answer to `RequestVote`.
    RequestVoteResponse {
        /// Answers a pre-vote.
        pre_vote: bool,
        /// The vote was granted.
        granted: bool,
    },
    /// Leader to follower: entries following `prev_log_index`, and the
    /// leader's commit index. With no entries it only carries the commit.
    Append {
        /// Index of the entry just before `entries`.
        prev_log_index: Index,
        /// Term of that entry.
        prev_log_term: Term,
        /// New entries (may be empty).
        entries: Vec<Entry>,
        /// Leader's commit index.
        commit: Index,
    },
    /// Follower to leader: result of an `Append` or `Snapshot`.
    AppendResponse {
        /// The follower's log did not contain `prev_log_index` at
        /// `prev_log_term`.
        reject: bool,
        /// On success: the follower's log matches the leader's up to here.
        /// On reject: the rejected `prev_log_index`.
        index: Index,
        /// On reject: the follower's largest index whose term is at most
        /// `prev_log_term` (fast back-tracking), or its last index.
        hint_index: Index,
        /// On reject: the term at `hint_index` (0 when unknown).
        hint_term: Term,
    },
    /// Leader to follower: "I am alive", the commit index known safe for
    /// this follower, and the context of a pending read-index round.
    Heartbeat {
        /// `min(leader commit, follower's match index)`.
        commit: Index,
        /// Read-index context being confirmed, if any.
        context: Option<Bytes>,
    },
    /// Follower to leader: answer to `Heartbeat`, echoing its context.
    HeartbeatResponse {
        /// The heartbeat's context.
        context: Option<Bytes>,
    },
    /// Leader to follower: install this snapshot (the follower is behind
    /// the leader's compacted prefix). Answered with `AppendResponse`.
    Snapshot {
        /// Metadata plus opaque bytes.
        snapshot: Snapshot,
    },
    /// Leader to its chosen successor: start an election now
    /// (leadership transfer).
    TimeoutNow,
    /// A joining member to the leader, answering an `Append`: it holds no
    /// log and no membership yet, so it takes the group's state as a
    /// snapshot taken at or after the change that added it, rather than
    /// replaying the log. Entries from before its membership may need what
    /// only the members of their time received (a shard install's files).
    SnapshotWanted,
}

impl MessageBody {
    /// True for messages that answer a request (the lab counts a request
    /// and its reply as one RPC).
    pub fn is_response(&self) -> bool {
        matches!(
            self,
            MessageBody::RequestVoteResponse { .. }
                | MessageBody::AppendResponse { .. }
                | MessageBody::HeartbeatResponse { .. }
                | MessageBody::SnapshotWanted
        )
    }
}

/// Fixed per-message overhead used by [`Message::size_bytes`].
pub const MESSAGE_OVERHEAD_BYTES: u64 = 40;

impl Message {
    /// An estimate of the encoded size: fixed header plus entries,
    /// snapshot bytes and contexts. Used for byte limits and accounting.
    pub fn size_bytes(&self) -> u64 {
        MESSAGE_OVERHEAD_BYTES
            + match &self.body {
                MessageBody::Append { entries, .. } => entries.iter().map(Entry::size_bytes).sum(),
                MessageBody::Heartbeat { context, .. }
                | MessageBody::HeartbeatResponse { context } => {
                    context.as_ref().map_or(0, |c| c.len() as u64)
                }
                MessageBody::Snapshot { snapshot } => {
                    snapshot.data.len() as u64 + 8 * snapshot.meta.conf_state.voters.len() as u64
                }
                _ => 0,
            }
    }
}
