//! What nodes and clients say to each other: the [`KvProtocol`] carried by
//! `shoal-net`.
//!
//! - Peer messages are consensus messages tagged with their Raft group
//!   ([`PeerMessage`]), so one connection serves every group on a node.
//! - Client RPCs are [`Request`]s answered by [`Response`]s:
//!   - [`Request::Kv`]: a [`KvRequest`] answered by [`Response::Kv`]. It
//!     names its shard (keys are always shard-tagged) and carries the
//!     client's session (client id, sequence number) for exactly-once writes.
//!   - [`Request::Status`]: any authenticated client may ask a node for its
//!     view of every group it hosts ([`Response::Status`]).
//!   - [`Request::SetFaultFilter`] / [`Request::ClearFaultFilter`]: admin
//!     requests that cut (or restore) a node's traffic with some peers, for
//!     partition tests. A node accepts them only from the admin client
//!     (`Peer::is_admin`) and only with fault injection enabled; otherwise
//!     it answers [`Response::Denied`] and carries on.

use serde::{Deserialize, Serialize};
use shoal_consensus::{Index, Message, NodeId, Role, Term};
use shoal_engine::{ClientId, Command, GroupId, Reply, ShardId};
use shoal_net::Protocol;

/// The protocol bundle of the KV service.
#[derive(Debug)]
pub struct KvProtocol;

impl Protocol for KvProtocol {
    type Message = PeerMessage;
    type Request = Request;
    type Response = Response;
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

/// A client RPC to a node (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A KV operation.
    Kv(KvRequest),
    /// The node's view of its groups; any authenticated client may ask.
    Status,
    /// Admin: drop all traffic between this node and `blocked` (replaces the
    /// previous set). Needs the admin client and fault injection enabled.
    SetFaultFilter {
        /// Peers cut off from this node, both directions.
        blocked: Vec<shoal_net::NodeId>,
    },
    /// Admin: restore all traffic. Needs the admin client and fault
    /// injection enabled.
    ClearFaultFilter,
}

impl From<KvRequest> for Request {
    fn from(request: KvRequest) -> Request {
        Request::Kv(request)
    }
}

/// A node's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The answer to [`Request::Kv`].
    Kv(KvResponse),
    /// The answer to [`Request::Status`].
    Status(NodeReport),
    /// An admin request was carried out.
    AdminDone,
    /// The request was refused; the node is unchanged.
    Denied(Denied),
}

/// Why a node refused a request that is not a KV operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// Admin requests need the admin client's certificate (`client-admin`).
    #[error("admin requests need the admin client certificate")]
    NotAdmin,
    /// The node runs without fault injection (`shoal node --fault-injection`).
    #[error("fault injection is disabled on this node")]
    FaultInjectionDisabled,
    /// The node's transport has no fault filter.
    #[error("the transport does not support a fault filter")]
    Unsupported,
}

/// What a node reports about itself ([`Request::Status`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node's id.
    pub id: NodeId,
    /// Its process id (for tools that signal it; nodes sharing a process,
    /// as in tests, share it).
    pub pid: u32,
    /// Peers its fault filter currently blocks (empty: none).
    pub blocked: Vec<shoal_net::NodeId>,
    /// Every group it hosts, by group id.
    pub groups: Vec<GroupReport>,
}

/// One group's state as a node sees it (part of a [`NodeReport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The group.
    pub group: GroupId,
    /// The node's role in it.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// The leader it knows of (0: none).
    pub leader: NodeId,
    /// Commit index.
    pub commit: Index,
    /// Applied index.
    pub applied: Index,
}
