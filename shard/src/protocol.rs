//! What nodes and clients say to each other: the [`KvProtocol`] carried by
//! `shoal-net`.
//!
//! - Peer messages are consensus messages tagged with their Raft group
//!   ([`PeerMessage`]), so one connection serves every group on a node.
//! - Client RPCs are [`Request`]s answered by [`Response`]s:
//!   - [`Request::Kv`]: a [`KvRequest`] answered by [`Response::Kv`]. It
//!     names its shard (keys are always shard-tagged) and carries the
//!     client's session (client id, sequence number) for exactly-once
//!     writes. Its [`ClientCommand`] can express only the public KV
//!     operations, never the node's internal log commands. The pin
//!     commands (`Pin`, `ScanPin`, `Unpin`) never reach the log either:
//!     a `Pin` is a ReadIndex read that leaves a point-in-time view on the
//!     serving node, which then serves `ScanPin` pages of it at once,
//!     whatever its role (see `node::pins`).
//!   - [`Request::Status`]: any authenticated client may ask a node for its
//!     view of every group it hosts ([`Response::Status`]).
//!   - [`Request::Shard`]: an admin request carrying one step of a shard
//!     move ([`ShardCommand`]) to a group's leader, answered
//!     [`KvResponse::Shard`] once applied.
//!   - [`Request::SetFaultFilter`] / [`Request::ClearFaultFilter`]: admin
//!     requests that cut (or restore) a node's traffic with some peers, for
//!     partition tests. A node accepts them only from the admin client
//!     (`Peer::is_admin`) and only with fault injection enabled; otherwise
//!     it answers [`Response::Denied`] and carries on.
//!   - [`Request::Member`]: an admin request (the admin client only) for
//!     a group's leader to add a learner, promote one or remove a member,
//!     answered [`KvResponse::Member`] once applied.
//!   - [`Request::HostGroup`] / [`Request::DropGroup`]: admin requests
//!     (the admin client only, fault injection or not) that make a node
//!     start or stop hosting a replica of a group, answered
//!     [`Response::AdminDone`] or [`Response::GroupRefused`] with a
//!     [`GroupRefusal`] (nothing changed).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_consensus::{Index, Message, NodeId, Role, Term};
use shoal_engine::{
    BatchWrite, ClientId, Command, Condition, GroupId, Reply, ShardId, SnapshotManifest,
};
use shoal_net::Protocol;

/// The protocol bundle of the KV service.
#[derive(Debug)]
pub struct KvProtocol;

impl Protocol for KvProtocol {
    type Message = PeerMessage;
    type Request = Request;
    type Response = Response;
    type FileMeta = SnapshotFileMeta;

    /// A moving shard's files: a freeze (or pre-copy) is answered once
    /// every destination node holds them, so each must be in its incoming
    /// directory, durably, before the transfer counts as done (a node that
    /// crashed between the transfer and filing it would lose a file its
    /// group's install then needs).
    fn file_needs_ack(meta: &SnapshotFileMeta) -> bool {
        meta.shard.is_some()
    }
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
/// follower (see `node`'s module docs on InstallSnapshot), or of a shard
/// export on its way to the shard's new group (`node::moves`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFileMeta {
    /// Group whose snapshot the file belongs to.
    pub group: GroupId,
    /// Snapshot index.
    pub index: u64,
    /// File name inside the snapshot directory.
    pub name: String,
    /// For a shard move's file instead: the shard and the config number
    /// moving it (`group` is then the destination, `index` the export's
    /// identity, `node::moves::export_id` of its manifest).
    pub shard: Option<(ShardId, u64)>,
}

/// A client operation sent to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRequest {
    /// The replica group the client believes serves the shard (a node may
    /// host several groups).
    pub group: GroupId,
    /// Shard the command addresses.
    pub shard: ShardId,
    /// Session owner; 0 means no session (writes are then at-least-once).
    pub client: ClientId,
    /// Per-client sequence number, increasing from 1; a retry reuses it.
    pub seq: u64,
    /// The operation. Reads (`Get`, `Scan`) go through ReadIndex, writes
    /// through the log.
    pub command: ClientCommand,
}

/// What a client may ask of a shard. The node's own log commands (session
/// expiry) are not among them: a client cannot even express them, so no
/// certificate lets a client put one in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientCommand {
    /// Read a key.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Write a key unconditionally.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Write only if the key's version is `version` (0: only if absent).
    PutIfVersion {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// Expected current version.
        version: u64,
    },
    /// Append to a key's value (creating it if absent).
    Append {
        /// The key.
        key: Bytes,
        /// Bytes to append.
        value: Bytes,
    },
    /// Remove a key.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// An atomic write of keys of the request's shard under version
    /// conditions (see `shoal_engine::Command::Batch`).
    Batch {
        /// Versions keys must have (0: absent).
        conditions: Vec<Condition>,
        /// The writes, in order.
        writes: Vec<BatchWrite>,
    },
    /// Keys in `[start, end)` in order (empty `end`: to the end of the
    /// shard), at most `limit` of them and at most the node's scan byte
    /// limit; the reply says where to continue.
    Scan {
        /// First key.
        start: Bytes,
        /// Exclusive end; empty for no bound.
        end: Bytes,
        /// Most pairs to return.
        limit: u64,
    },
    /// Pin `[start, end)` (empty `end`: to the end of each shard) in
    /// every shard of `shards`, all at one point in time of the request's
    /// group, for later [`ClientCommand::ScanPin`]s: a read, through
    /// ReadIndex at the group's leader, answered [`KvResponse::Pinned`]
    /// with one pin id and each shard's size and split keys. The group
    /// must serve every shard listed (else [`KvResponse::WrongGroup`]:
    /// nothing is pinned). The pin lives on the node that served it (see
    /// `node::pins`). The request's own `shard` is only checked like any
    /// other request's; `shards` is what is pinned.
    Pin {
        /// First key.
        start: Bytes,
        /// Exclusive end; empty for no bound.
        end: Bytes,
        /// About how many key + value bytes apart the reply's split keys
        /// are (0: no split keys).
        split_bytes: u64,
        /// The shards of the group to pin: at least one, at most
        /// [`PIN_SHARDS_MAX`], strictly increasing (else `Refused`).
        shards: Vec<ShardId>,
    },
    /// One page of the request's shard in a pin's range as of the pin:
    /// keys in `[start, end)` (empty `end`: the pin's end), inside the
    /// pinned range, with the limits and continuation of `Scan`. Served
    /// at once by the node holding the pin, whatever its role (no
    /// ReadIndex: the pin fixed the point in time); [`KvResponse::PinGone`]
    /// if it holds no such pin of the request's group, `Refused` if the
    /// pin does not cover the request's shard.
    ScanPin {
        /// The pin ([`PinInfo::pin`]).
        pin: u64,
        /// First key.
        start: Bytes,
        /// Exclusive end; empty for the pin's end.
        end: Bytes,
        /// Most pairs to return.
        limit: u64,
    },
    /// Releases a pin (every shard of it) on the node holding it, served
    /// at once like `ScanPin`: answered `Done(Reply::Deleted { existed:
    /// true })`, or [`KvResponse::PinGone`] if it was gone already (or is
    /// not a pin of the request's group and shard).
    Unpin {
        /// The pin.
        pin: u64,
    },
}

impl ClientCommand {
    /// The command's name in snake case (`get`, `put_if_version`, ...): a
    /// fixed set, used as a metrics label and in trace spans.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientCommand::Get { .. } => "get",
            ClientCommand::Put { .. } => "put",
            ClientCommand::PutIfVersion { .. } => "put_if_version",
            ClientCommand::Append { .. } => "append",
            ClientCommand::Delete { .. } => "delete",
            ClientCommand::Batch { .. } => "batch",
            ClientCommand::Scan { .. } => "scan",
            ClientCommand::Pin { .. } => "pin",
            ClientCommand::ScanPin { .. } => "scan_pin",
            ClientCommand::Unpin { .. } => "unpin",
        }
    }

    /// True for reads served through ReadIndex and never logged: `Get`,
    /// `Scan` and `Pin`. (`ScanPin` and `Unpin` use no ReadIndex.)
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            ClientCommand::Get { .. } | ClientCommand::Scan { .. } | ClientCommand::Pin { .. }
        )
    }

    /// True for the pin commands the node serves itself, outside Raft
    /// (`ScanPin`, `Unpin`): neither ReadIndex nor the log.
    pub fn is_pin_local(&self) -> bool {
        matches!(
            self,
            ClientCommand::ScanPin { .. } | ClientCommand::Unpin { .. }
        )
    }

    /// The log command this request becomes; `None` for the pin commands,
    /// which never reach the log (`Pin` is a ReadIndex read served by the
    /// node, `ScanPin` and `Unpin` are served by the pin's node at once).
    /// `value_bytes_max` is the proposing leader's value limit, carried in
    /// the log so that every replica decides an append the same way
    /// whatever its own limits.
    pub fn to_command(&self, value_bytes_max: u64) -> Option<Command> {
        Some(match self.clone() {
            ClientCommand::Get { key } => Command::Get { key },
            ClientCommand::Put { key, value } => Command::Put { key, value },
            ClientCommand::PutIfVersion {
                key,
                value,
                version,
            } => Command::PutIfVersion {
                key,
                value,
                version,
            },
            ClientCommand::Append { key, value } => Command::Append {
                key,
                value,
                value_bytes_max,
            },
            ClientCommand::Delete { key } => Command::Delete { key },
            ClientCommand::Batch { conditions, writes } => Command::Batch { conditions, writes },
            ClientCommand::Scan { start, end, limit } => Command::Scan { start, end, limit },
            ClientCommand::Pin { .. }
            | ClientCommand::ScanPin { .. }
            | ClientCommand::Unpin { .. } => return None,
        })
    }
}

/// Most shards one [`ClientCommand::Pin`] names; beyond, `Refused`. A
/// group of the default sharded cluster serves a few hundred shards at
/// most (256 in all); the bound keeps the request and the holder's first
/// scan (one pass per shard) finite.
pub const PIN_SHARDS_MAX: usize = 4096;

/// Most split keys a [`PinInfo`] carries in all, shared evenly by its
/// shards ([`pin_split_keys_max`] each): with more, they are spaced
/// further apart than asked. A 4096-way split of a pin is finer than any
/// job needs, and the reply stays well inside a frame for keys of a few
/// hundred bytes, however many shards the pin covers.
pub const PIN_SPLIT_KEYS_MAX: usize = 4096;

/// Most split keys each shard of a pin of `shards` shards gets: an even
/// share of [`PIN_SPLIT_KEYS_MAX`], at least one.
pub fn pin_split_keys_max(shards: usize) -> usize {
    (PIN_SPLIT_KEYS_MAX / shards.max(1)).max(1)
}

/// What a node answers a [`ClientCommand::Pin`]: the pin (one for all its
/// shards) and each shard's part of the pinned range as of the pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    /// The pin's id on its node (never 0).
    pub pin: u64,
    /// The node holding it: send `ScanPin` and `Unpin` there.
    pub node: NodeId,
    /// Every shard pinned, in the request's order.
    pub shards: Vec<PinnedShardInfo>,
}

/// One shard's part of a pinned range, as of the pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedShardInfo {
    /// The shard.
    pub shard: ShardId,
    /// Key + value bytes of the range in the shard.
    pub bytes: u64,
    /// Pairs of the range in the shard.
    pub keys: u64,
    /// Keys of the shard's part, in order, about `split_bytes` of pairs
    /// apart (further if there would be more than
    /// [`pin_split_keys_max`]): each starts a piece, for splitting a scan
    /// of the pin into jobs.
    pub split_keys: Vec<Bytes>,
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
    /// The group does not serve the request's shard (it never did, it
    /// handed it to another group, or it is handing it over now): ask the
    /// shard controller for the current configuration and retry there.
    WrongGroup,
    /// The node does not host the request's group.
    UnknownGroup,
    /// The outcome of a shard move step ([`Request::Shard`]).
    Shard(ShardReply),
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
    /// The outcome of a membership change ([`Request::Member`]).
    Member(MemberReply),
    /// The range is pinned: the answer to [`ClientCommand::Pin`].
    Pinned(PinInfo),
    /// The node holds no such pin: never made, released (`Unpin`, idle
    /// expiry, its group dropped) or lost with a restart of the node.
    PinGone,
}

impl KvResponse {
    /// The answer's kind in snake case (`done`, `not_leader`, ...): a
    /// fixed set, used as a metrics label.
    pub fn outcome(&self) -> &'static str {
        match self {
            KvResponse::Done(_) => "done",
            KvResponse::NotLeader { .. } => "not_leader",
            KvResponse::WrongGroup => "wrong_group",
            KvResponse::UnknownGroup => "unknown_group",
            KvResponse::Shard(_) => "shard",
            KvResponse::ShuttingDown => "shutting_down",
            KvResponse::Busy => "busy",
            KvResponse::Refused { .. } => "refused",
            KvResponse::Member(_) => "member",
            KvResponse::Pinned(_) => "pinned",
            KvResponse::PinGone => "pin_gone",
        }
    }
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
    /// Admin: a step of a shard move, for the group's leader to propose.
    /// Needs the admin client (the shard controller runs as it).
    Shard(ShardRequest),
    /// Admin: start hosting a replica of `group` whose voters are `voters`
    /// (this node among them), durably: a restarted node hosts it again.
    /// No voters: host it with no membership, to join it once its leader
    /// adds this node ([`Request::Member`]).
    /// A group this node hosts already with the same voters (in any order)
    /// is done at once. Needs the admin client; answered
    /// [`Response::AdminDone`] or [`Response::GroupRefused`].
    HostGroup {
        /// The group (not 0, which names no group).
        group: GroupId,
        /// Its voters: 1 to `VOTERS_MAX` distinct, non-zero node ids,
        /// including this node's; or none, to join.
        voters: Vec<NodeId>,
    },
    /// Admin: a membership change of `group` (one member at a time), for
    /// the group's leader to propose; answered [`KvResponse::Member`] once
    /// applied, or refused unproposed. Needs the admin client.
    Member(MemberRequest),
    /// Admin: stop hosting `group` and delete its log, raft state and data
    /// on this node. Refused while the group holds any shard here (a shard
    /// record that is not `Absent`, or static shards) and for a group of
    /// the node's configuration. A group dropped before is done at once;
    /// it can never be hosted again on this node. Needs the admin client.
    DropGroup {
        /// The group.
        group: GroupId,
    },
    /// Admin: a backup of a group, in steps (see `node::backups`). Needs
    /// the admin client: a backup reads every key and session.
    Backup(BackupRequest),
    /// Admin: drop this node's replica of `group` after a membership change
    /// removed the node from the group (`shoal member remove`, once the
    /// group's leader applied it). The replica is a stale copy of what the
    /// members hold, so it is dropped even while it holds shards; refused
    /// ([`GroupRefusal::Leads`]) if this node leads the group, and like
    /// [`Request::DropGroup`] for a static group. Needs the admin client.
    DropRemoved {
        /// The group.
        group: GroupId,
    },
    /// Admin: how much of each shard this node's replica of `group` holds
    /// (`shoal shard status`), counted off the event loop: answered
    /// [`Response::ShardSizes`], or [`Response::GroupRefused`] with
    /// `NotHosted`. Needs the admin client (it reads the group's data).
    ShardSizes {
        /// The group.
        group: GroupId,
    },
}

/// The steps of backing up one group from a node ([`Request::Backup`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupRequest {
    /// Export `group` (its snapshot files, at one point in time) and hold
    /// the files for reading: answered [`Response::BackupExported`] by the
    /// group's leader once it has committed an entry of its term and
    /// applied everything committed (so the export holds every write
    /// acknowledged before the request), [`BackupRefusal::NotLeader`] or
    /// [`BackupRefusal::NotReady`] otherwise.
    Export {
        /// The group.
        group: GroupId,
    },
    /// Bytes of a file of a held export from `offset`: at most
    /// [`BACKUP_CHUNK_BYTES_MAX`], empty at the end of the file
    /// ([`Response::BackupChunk`]).
    Read {
        /// The export ([`Response::BackupExported`]'s id).
        id: u64,
        /// A file name of the export's [`shoal_engine::GroupBackup`].
        file: String,
        /// Where to start.
        offset: u64,
    },
    /// Release a held export (its files are removed): [`Response::AdminDone`].
    Release {
        /// The export.
        id: u64,
    },
    /// Export `group` behind a fence, for a backup of several groups at one
    /// point in time: the leader (ready as for `Export`) stops proposing
    /// writes, shard steps and membership changes (answered `Busy`, which
    /// clients retry) for at most `hold_ms` (capped at
    /// [`BACKUP_FENCE_MS_MAX`]), waits until its whole log is applied,
    /// and starts the export; answered [`Response::BackupPinned`] as soon
    /// as the export's view is taken. The files follow ([`Self::Files`]);
    /// [`Self::Unfence`] ends the fence.
    FencedExport {
        /// The group.
        group: GroupId,
        /// Longest the fence may hold, in milliseconds.
        hold_ms: u64,
    },
    /// Whether the fence of export `id` on `group` held from its view on:
    /// answered [`Response::BackupUnfenced`] (`held` false if the node lost
    /// the leadership, the fence timed out, or there is no such fence), and
    /// the fence ends.
    Unfence {
        /// The group.
        group: GroupId,
        /// The export ([`Response::BackupPinned`]'s id).
        id: u64,
    },
    /// The contents of export `id`: [`Response::BackupExported`] once its
    /// files are written, [`BackupRefusal::Running`] until then.
    Files {
        /// The export.
        id: u64,
    },
}

/// Longest a [`BackupRequest::FencedExport`] may hold a group's writes
/// back: 10 s (a fence normally lasts a few round trips: until every
/// group's export view is taken).
pub const BACKUP_FENCE_MS_MAX: u64 = 10_000;

/// Most bytes one [`BackupRequest::Read`] answers: well below the frame
/// limit.
pub const BACKUP_CHUNK_BYTES_MAX: u64 = 1 << 20;

/// Why a node refused a [`BackupRequest`]. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum BackupRefusal {
    /// The node does not host the group.
    #[error("the node does not host the group")]
    UnknownGroup,
    /// The node does not lead the group; try `leader_hint` (0: unknown).
    #[error("not the group's leader (leader hint {leader_hint})")]
    NotLeader {
        /// The leader this node knows of, or 0.
        leader_hint: NodeId,
    },
    /// The leader has not yet committed an entry of its term or applied
    /// everything committed; retry shortly.
    #[error("the leader is catching up; retry")]
    NotReady,
    /// The node holds as many exports as it may (`BACKUPS_HELD_MAX`).
    #[error("too many backups held on this node; release one or wait")]
    TooMany,
    /// No such held export (never made, released, idle too long, or lost
    /// with a restart).
    #[error("no such backup export on this node")]
    Gone,
    /// The file is not one of the export's, or the offset is past its end.
    #[error("no such file or offset in the export")]
    BadRead,
    /// Exporting or reading failed on the node.
    #[error("the node failed: {reason}")]
    Failed {
        /// What failed.
        reason: String,
    },
    /// The export's files are still being written; ask again.
    #[error("the export is still running")]
    Running,
    /// The group holds a fence for another backup already.
    #[error("the group is fenced for another backup")]
    Fenced,
}

/// A membership change addressed to one group ([`Request::Member`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRequest {
    /// The group.
    pub group: GroupId,
    /// The change.
    pub change: MemberChange,
}

/// One member joins, is promoted or leaves (see
/// `shoal_consensus::ConfChangeKind`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// `node` joins as a learner, reachable at `addr` (`ip:port`, at most
    /// `shoal_engine::MEMBER_ADDR_BYTES_MAX` bytes), which every member
    /// records in its address book when it applies the change.
    AddLearner {
        /// The new member.
        node: NodeId,
        /// Its address.
        addr: String,
    },
    /// The learner `node`, caught up, becomes a voter.
    Promote {
        /// The learner.
        node: NodeId,
    },
    /// `node` (a voter other than the leader, or a learner) leaves.
    Remove {
        /// The member.
        node: NodeId,
    },
}

/// How a membership change ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberReply {
    /// Applied; the group's membership from then on.
    Done {
        /// Its voters.
        voters: Vec<NodeId>,
        /// Its learners.
        learners: Vec<NodeId>,
    },
    /// Refused without being proposed (another change pending, a learner
    /// behind, the leader's own removal, a bad address...).
    Refused {
        /// Why.
        reason: String,
    },
}

/// A step of a shard move (the lab's Freeze → Install → Delete), addressed
/// to one group and fenced by the config number it belongs to: a group
/// that has seen a higher number for the shard answers
/// [`ShardReply::Stale`], and repeating a step is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRequest {
    /// The group that carries it out.
    pub group: GroupId,
    /// The step.
    pub command: ShardCommand,
    /// For an [`ShardCommand::Install`]: the nodes the freeze shipped the
    /// files to (the destination's members in the config). Before it
    /// proposes the install, the destination's leader forwards its own copy
    /// to every other member of the group (one added since the config was
    /// written); empty: to every other member. Unused by other steps.
    pub holders: Vec<NodeId>,
    /// For a [`ShardCommand::Freeze`]: the addresses (`ip:port`) of
    /// destination nodes the caller knows, at most
    /// [`crate::controller::config::GROUP_MEMBERS_MAX`], so that the source
    /// can ship to members it has never met (added to the destination group
    /// after the source's nodes started). Unused by other steps.
    pub to_addrs: Vec<(NodeId, String)>,
}

/// What a group does with a shard; each is one log entry of the group and
/// applied by every replica alike (see `node::moves`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// Start serving `shards`, which have never held data (the first
    /// config that assigns them).
    Create {
        /// The shards.
        shards: Vec<ShardId>,
        /// The config that assigns them.
        num: u64,
    },
    /// Stop serving `shard` and ship its data (kv and sessions, at one
    /// point in time, as SST files) to every node of the destination group.
    /// Answered [`ShardReply::Frozen`] once every destination node holds
    /// the files.
    Freeze {
        /// The shard.
        shard: ShardId,
        /// The config that moves it.
        num: u64,
        /// The destination group.
        to_group: GroupId,
        /// Its members, each of which gets the files.
        to_nodes: Vec<NodeId>,
    },
    /// Ship `shard`'s data to every node of the destination group while
    /// the shard still serves (copy before freeze, see
    /// `node::precopy`), so that the freeze after it ships only what
    /// changed since. Not a log entry: the source's leader carries it out
    /// alone and it changes no replicated state. Answered
    /// [`ShardReply::Done`] once shipped, or when there is nothing to copy
    /// (the shard is not served here below `num`); [`ShardReply::Stale`]
    /// for a newer config. Optional: a move whose pre-copy failed (or was
    /// never asked) exports the whole shard at its freeze.
    Precopy {
        /// The shard.
        shard: ShardId,
        /// The config that moves it.
        num: u64,
        /// The destination group.
        to_group: GroupId,
        /// Its members, each of which gets the files.
        to_nodes: Vec<NodeId>,
    },
    /// Serve `shard` from the files a freeze shipped here (`manifest` names
    /// and checksums them): every replica ingests them when it applies the
    /// entry.
    Install {
        /// The shard.
        shard: ShardId,
        /// The config that moves it.
        num: u64,
        /// What the source's freeze answered.
        manifest: SnapshotManifest,
    },
    /// Drop a frozen shard's data and sessions (it is served elsewhere).
    Delete {
        /// The shard.
        shard: ShardId,
        /// The config that moved it.
        num: u64,
    },
}

impl ShardCommand {
    /// The config number the step belongs to.
    pub fn num(&self) -> u64 {
        match self {
            ShardCommand::Create { num, .. }
            | ShardCommand::Precopy { num, .. }
            | ShardCommand::Freeze { num, .. }
            | ShardCommand::Install { num, .. }
            | ShardCommand::Delete { num, .. } => *num,
        }
    }
}

/// How a group answered a [`ShardRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardReply {
    /// Done (or done before: a repeated step).
    Done,
    /// The shard is frozen and its files are on every destination node.
    Frozen {
        /// The files, for the destination's install.
        manifest: SnapshotManifest,
    },
    /// The group has seen config `num`, newer than the step's: a newer
    /// controller took over, and this step changed nothing.
    Stale {
        /// The newest config number the group has seen for the shard.
        num: u64,
    },
    /// The step contradicts the shard's state here (e.g. deleting a shard
    /// that is being served, installing one whose files are missing);
    /// nothing changed.
    Refused {
        /// Why.
        reason: String,
    },
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
    /// A [`Request::HostGroup`] or [`Request::DropGroup`] was refused; the
    /// node is unchanged.
    GroupRefused(GroupRefusal),
    /// A [`BackupRequest::Export`] is done: the export's id and contents.
    BackupExported {
        /// Names the export in [`BackupRequest::Read`] / `Release`.
        id: u64,
        /// The group's backup record (files with sizes and CRC32s).
        backup: Box<shoal_engine::GroupBackup>,
    },
    /// Bytes of a file ([`BackupRequest::Read`]); empty: end of file.
    BackupChunk(bytes::Bytes),
    /// A [`BackupRequest::FencedExport`]'s view is taken: the export's id
    /// and the applied index it holds.
    BackupPinned {
        /// Names the export in `Files` / `Read` / `Release` / `Unfence`.
        id: u64,
        /// The group's applied index in the export.
        applied_index: u64,
    },
    /// A [`Request::ShardSizes`]: each shard holding any key, in shard
    /// order (at most the cluster's shard count).
    ShardSizes(Vec<(ShardId, shoal_engine::ShardSize)>),
    /// A [`BackupRequest::Unfence`]: whether the fence held.
    BackupUnfenced {
        /// True if nothing was written to the group from the export's view
        /// until now.
        held: bool,
    },
    /// A [`Request::Backup`] was refused.
    BackupRefused(BackupRefusal),
}

/// Why a node refused to host, drop or size a group. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum GroupRefusal {
    /// Group id 0 names no group (it marks unassigned shards).
    #[error("group id 0 is reserved")]
    ReservedGroup,
    /// A group needs at least one voter.
    #[error("a group needs at least one voter")]
    NoVoters,
    /// More voters than consensus accepts.
    #[error("{count} voters: at most {max} are allowed")]
    TooManyVoters {
        /// Voters given.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A voter is listed twice.
    #[error("node {node} is listed twice")]
    DuplicateVoter {
        /// The node.
        node: NodeId,
    },
    /// Node id 0 names no node.
    #[error("node id 0 cannot be a voter")]
    ZeroVoter,
    /// The node asked to host the group is not among its voters.
    #[error("this node ({node}) is not among the voters")]
    NotAVoter {
        /// This node's id.
        node: NodeId,
    },
    /// The node hosts as many groups as it may.
    #[error("this node hosts {max} groups, the most it may")]
    TooManyGroups {
        /// The limit.
        max: u64,
    },
    /// The node hosts the group (or holds its state) with other voters.
    #[error("the group is hosted here with voters {voters:?}")]
    OtherVoters {
        /// The voters it has here.
        voters: Vec<NodeId>,
    },
    /// The group was dropped on this node; a group id is never hosted again
    /// on a node that dropped it (the replica's vote and log are gone, and
    /// rejoining with an empty state could elect two leaders in one term).
    #[error("the group was dropped on this node and cannot be hosted again")]
    Dropped,
    /// The group is part of the node's configuration
    /// (`NodeConfig::groups`): remove it there instead.
    #[error("the group is in the node's configuration")]
    Static,
    /// The node does not host the group (and never dropped it).
    #[error("the group is not hosted on this node")]
    NotHosted,
    /// The group still holds shards here: move them away first.
    #[error("the group holds {held} shards here (first: {shards:?}); move them away first")]
    HoldsShards {
        /// How many shards are not `Absent`.
        held: u64,
        /// The first of them (at most a few).
        shards: Vec<ShardId>,
    },
    /// The replica has not applied its whole log, so its shard records
    /// may be out of date; retry once the group has caught up.
    #[error("the replica is catching up (applied {applied}, last log index {last}); retry")]
    CatchingUp {
        /// Applied index.
        applied: Index,
        /// Last index of the replica's log.
        last: Index,
    },
    /// The node leads the group, so it is a member: a removed member's
    /// replica is never the leader.
    #[error("this node leads the group: it is a member")]
    Leads,
    /// The node failed to read the group (a storage error).
    #[error("the node failed: {reason}")]
    Failed {
        /// What failed.
        reason: String,
    },
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Last index of its log, committed or not (`Index::MAX` if it could
    /// not be read): a replica whose applied index is below it holds
    /// entries it has not applied, and refuses to be dropped.
    pub last: Index,
    /// The voters it runs with (the last membership change in its log).
    pub voters: Vec<NodeId>,
    /// The learners it runs with.
    pub learners: Vec<NodeId>,
    /// On the leader: the highest index each other member is known to
    /// hold (a learner is caught up once this nears `commit`). Empty on
    /// other nodes.
    pub matched: Vec<(NodeId, Index)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request a client could send before the client command type
    /// existed: the engine's log command, session expiry included.
    #[derive(Serialize)]
    struct LogCommandRequest {
        group: GroupId,
        shard: ShardId,
        client: ClientId,
        seq: u64,
        command: Command,
    }

    // Goal (issue 10, item 1): no bytes a client sends decode as a request
    // carrying the node's session-expiry command. The bytes of the old
    // attack (any client expiring every session) are a malformed request.
    #[test]
    fn session_expiry_cannot_be_sent_by_a_client() {
        let attack = LogCommandRequest {
            group: 1,
            shard: 0,
            client: 0,
            seq: 0,
            command: Command::ExpireSessions {
                sessions: vec![(7, 1)],
            },
        };
        let bytes = postcard::to_allocvec(&Request::Kv(KvRequest {
            group: 1,
            shard: 0,
            client: 0,
            seq: 0,
            command: ClientCommand::Get { key: Bytes::new() },
        }))
        .unwrap();
        // Same framing as a Kv request, with the log command in place.
        let mut forged = bytes[..1].to_vec();
        forged.extend(postcard::to_allocvec(&attack).unwrap());
        assert!(postcard::from_bytes::<Request>(&forged).is_err());
        // Every client command maps onto the same-named log command.
        let put = ClientCommand::Append {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
        };
        assert_eq!(
            put.to_command(9),
            Some(Command::Append {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
                value_bytes_max: 9
            })
        );
    }

    // Goal: no pin command becomes a log command, and only `Pin` goes
    // through ReadIndex.
    #[test]
    fn pin_commands_never_reach_the_log() {
        let pin = ClientCommand::Pin {
            start: Bytes::new(),
            end: Bytes::new(),
            split_bytes: 1,
            shards: vec![0, 1],
        };
        let scan = ClientCommand::ScanPin {
            pin: 1,
            start: Bytes::new(),
            end: Bytes::new(),
            limit: 1,
        };
        let unpin = ClientCommand::Unpin { pin: 1 };
        for c in [&pin, &scan, &unpin] {
            assert_eq!(c.to_command(9), None, "{c:?}");
        }
        assert!(pin.is_read_only() && !pin.is_pin_local());
        assert!(!scan.is_read_only() && scan.is_pin_local());
        assert!(!unpin.is_read_only() && unpin.is_pin_local());
    }

    // Goal: a pin's split keys stay within PIN_SPLIT_KEYS_MAX in all,
    // however many shards it covers, and every shard may have one.
    #[test]
    fn pin_split_keys_are_shared_by_the_shards() {
        assert_eq!(pin_split_keys_max(1), PIN_SPLIT_KEYS_MAX);
        assert_eq!(pin_split_keys_max(0), PIN_SPLIT_KEYS_MAX);
        for shards in [2, 3, 128, 256, PIN_SHARDS_MAX] {
            let each = pin_split_keys_max(shards);
            assert!(each >= 1 && each * shards <= PIN_SPLIT_KEYS_MAX.max(shards));
        }
        assert_eq!(pin_split_keys_max(256), 16);
    }
}
