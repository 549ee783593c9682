//! What nodes and clients say to each other: the [`KvProtocol`] carried by
//! `shoal-net`.
//!
//! - Peer messages are consensus messages tagged with their Raft group
//!   ([`PeerMessage`]), so one connection serves every group on a node.
//! - Client RPCs are [`KvRequest`]s answered by [`KvResponse`]s. A request
//!   names its shard (keys are always shard-tagged) and carries the client's
//!   session (client id, sequence number) for exactly-once writes.

use serde::{Deserialize, Serialize};
use shoal_consensus::{Message, NodeId};
use shoal_engine::{ClientId, Command, GroupId, Reply, ShardId};
use shoal_net::Protocol;

/// The protocol bundle of the KV service.
#[derive(Debug)]
pub struct KvProtocol;

impl Protocol for KvProtocol {
    type Message = PeerMessage;
    type Request = KvRequest;
    type Response = KvResponse;
    type FileMeta = SnapshotFileMeta;
}

/// A consensus message for one Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMessage {
    /// The group the message belongs to.
    pub group: GroupId,
    /// The message itself.
    pub message: Message,
}

/// Metadata of a bulk file: one file of a snapshot export on its way to a
/// follower (see `node`'s module docs on InstallSnapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFileMeta {
    /// Group whose snapshot the file belongs to.
    pub group: GroupId,
    /// Snapshot index.
    pub index: u64,
    /// File name inside the snapshot directory.
    pub name: String,
}

/// A client operation sent to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRequest {
    /// Shard the command addresses.
    pub shard: ShardId,
    /// Session owner; 0 means no session (writes are then at-least-once).
    pub client: ClientId,
    /// Per-client sequence number, increasing from 1; a retry reuses it.
    pub seq: u64,
    /// The operation. Reads (`Get`, `Scan`) go through ReadIndex, writes
    /// through the log.
    pub command: Command,
}

/// A node's answer to a [`KvRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// The operation ran (or, for a retried write, had already run); this is
    /// its reply from the state machine.
    Done(Reply),
    /// This node cannot serve the request; try `leader_hint` (0: unknown).
    NotLeader {
        /// The leader this node knows of, or 0.
        leader_hint: NodeId,
    },
    /// The node does not host the request's shard.
    WrongShard,
    /// The node is shutting down; the write may or may not have been
    /// committed (a retry with the same sequence number is safe).
    ShuttingDown,
    /// The node is overloaded (too many uncommitted proposals or pending
    /// reads, or a leadership transfer); retry later.
    Busy,
    /// The request was refused without being proposed (it breaks a limit).
    Refused {
        /// Why.
        reason: String,
    },
}
