//! The node runtime: one event loop per node driving every Raft group the
//! node hosts, persisting through the engine, talking through the net.
//!
//! # Layout
//! - this module: configuration, the handle, the event loop and its rounds;
//! - [`group`]: one group's consensus core and the callers waiting on it;
//! - [`hosting`]: groups hosted and dropped at runtime — the pure checks,
//!   persistence and crash ordering;
//! - [`leaders`]: the pure rule that spreads leadership over nodes;
//! - [`moves`]: shard moves between groups (Freeze → Install → Delete);
//! - [`persist`]: pure decisions — what a round writes, whether it syncs,
//!   how batches and entries are cut;
//! - [`pins`]: input pins — a key range read at one point in time, page by
//!   page, by a holder off the loop;
//! - [`sessions`]: which client sessions a leader may expire, by its own
//!   monotonic clock;
//! - [`snapshots`]: snapshot files — export, verification, transfer — the
//!   blocking work the loop hands to owned tasks;
//! - [`telemetry`]: the node's metrics (through the `metrics` facade) and
//!   the trace span of a client request.
//!
//! # The loop
//! [`Node::start`] spawns one tokio task. Each turn it waits for an event —
//! a tick (every [`NodeConfig::tick_ms`]), peer messages, client RPCs, a
//! finished background task, or shutdown — drains whatever else is already
//! queued, and then runs one *round* over all groups:
//!
//! 0. queued `HostGroup` / `DropGroup` requests are carried out (see
//!    *Groups* below): between rounds no group holds a `Ready`, so a group
//!    joins or leaves the loop here;
//! 1. queued client writes of each group become log entries (a batch of
//!    [`Request`]s per entry, cut by [`persist::entry_chunks`]); queued
//!    reads become one ReadIndex request with a unique context;
//! 2. every group's `Ready` is collected; its `messages` go out at once;
//! 3. the snapshots, entries and hard states of ALL groups are persisted with
//!    ONE synced [`Engine::write_log`] (off the async thread when
//!    [`NodeConfig::blocking_io`] is set, as for RocksDB); a round whose
//!    only change is a commit index writes it unsynced
//!    ([`persist::must_sync`] says why that is safe);
//! 4. only then the `persisted_messages` go out;
//! 5. committed entries are applied through [`Engine::apply`] and each
//!    waiting caller is answered: a caller waits on (index, term), and an
//!    entry of another term at its index means its proposal was lost, so it
//!    gets `NotLeader`;
//! 6. confirmed reads are served from the engine once the applied index
//!    reaches their read index (a `Pin` read starts its holder instead,
//!    see [`pins`]);
//! 7. every `Ready` is handed back with `advance`.
//!
//! When a group stops being leader (or its term changes), every write and
//! read waiting on it is answered `NotLeader { leader_hint }` at once and
//! its snapshot transfers are stopped; a client retrying a write with the
//! same sequence number is deduplicated by the engine's session table, so
//! this never applies a write twice.
//!
//! # Groups
//! A node hosts the groups of [`NodeConfig::groups`] (each with its own
//! voters, [`GroupSpec::voters`], or the node's [`NodeConfig::voters`])
//! and those an admin added at runtime with `Request::HostGroup`, which
//! the engine records so a restart opens them again. `Request::DropGroup`
//! removes a runtime group that holds no shard here, with its log, raft
//! state and data; it can never be hosted again on this node. Each change
//! is one synced engine write, ordered against the loop so that a crash
//! leaves the group either fully hosted or gone ([`hosting`]). Only the
//! admin client may ask (`Denied::NotAdmin` otherwise); a request that
//! cannot be carried out is answered `Response::GroupRefused` with its
//! reason and changes nothing.
//!
//! # Leaders spread over nodes
//! Groups elect leaders independently, so one node may end up leading
//! them all. Every [`NodeConfig::leader_balance_every_ticks`] ticks
//! (staggered by node id) a node that leads at least two more of the
//! groups it hosts than some member hands one to the member leading the fewest, by
//! `transfer_leader`, at most one at a time; the decision is the pure
//! [`leaders::choose_transfer`], which settles and never ping-pongs when
//! nodes host the same groups ([`leaders`] says why). A member is handed
//! a group only if this node heard from it lately and replicates to it.
//!
//! # Work off the loop
//! The loop ticks every group, so nothing slow runs on it: exporting a
//! snapshot (SST files, checksums), verifying received snapshot files and
//! streaming files to followers run as tasks in one [`JoinSet`] the node
//! owns; their results come back as events. Shutdown aborts the async ones
//! and waits for the blocking ones. With `blocking_io` off (the in-memory
//! engine under a paused test clock) the blocking work runs at once, so a
//! seed replays exactly, and its result still arrives as an event.
//!
//! # Sessions
//! Client sessions expire when idle for [`NodeConfig::session_idle_ms`],
//! judged by each leader's own monotonic clock, never a wall clock (see
//! [`sessions`]). Clients may not retry one write for that long: a client's
//! operation deadline must stay well below it.
//!
//! # Shutdown
//! [`NodeHandle::shutdown`] signals the loop. A node that leads a group
//! with other voters first hands it off (`leaders::handoff_target`: the
//! voter that can take over with the longest log is told to campaign at
//! once), serving as usual meanwhile, until it leads none or
//! `SHUTDOWN_HANDOFF_TICKS_MAX` ticks have passed; so a rolling restart
//! costs no election timeout. Then the loop stops taking events,
//! answers every waiting caller with [`KvResponse::ShuttingDown`], stops its
//! tasks, drops its inbox (RPCs still queued there fail at the caller with
//! a lost reply) and returns. Nothing is left to persist: every round's log
//! write is synced before anybody is answered. [`NodeHandle::crash`]
//! instead aborts the task at its next await point, dropping every waiter
//! unanswered (what a process crash does); tests pair it with
//! `MemStore::crash_and_recover`.
//!
//! # Restart
//! A node is rebuilt from the engine alone: the group's hard state,
//! membership and log come from [`shoal_engine::GroupStorage`], and the consensus
//! `Config::applied` is the engine's applied index, which is written
//! atomically with the applied data, so nothing is replayed twice.
//!
//! # Log compaction and InstallSnapshot
//! Once a group's log holds more entry bytes than
//! [`NodeConfig::max_raft_state_bytes`] (the lab's maxraftstate; the engine
//! keeps a running count, [`Engine::log_bytes`]), a task exports the
//! group's shards at the applied index to SST files
//! ([`snapshots::export`], directory `export-g<group>-i<index>` under
//! [`NodeConfig::snapshot_dir`]); when it is done the loop records that
//! snapshot as the one to send ([`Engine::set_snapshot`]) and compacts the
//! log through it, unless an installed snapshot overtook it meanwhile.
//!
//! When consensus decides a follower needs the snapshot, the node does not
//! send the `Snapshot` message directly: a task first streams every file of
//! the export to the follower over the net's bulk file transfer, and sends
//! the message only once all arrived (on failure it tells consensus with
//! `report_snapshot`, which retries later). The follower files what it
//! receives under `recv-g<group>-i<index>-n<sender>` (directory entries
//! synced), and on the `Snapshot` message verifies those files (manifest
//! and per-file CRC32) in a task, stepping the message only once they
//! verify; the verified directory is recorded by snapshot index. When a
//! `Ready` carries a restored snapshot, the follower installs the files at
//! its index ([`Engine::install_snapshot`], crash-atomic) and then persists
//! the log reset in the round's synced write. A crash between the two
//! leaves the state machine ahead of the log; [`Node::start`] repairs that
//! by resetting the log to the applied index (which is committed by
//! definition).

pub mod backups;
pub mod group;
pub mod hosting;
pub mod leaders;
pub mod moves;
pub mod persist;
pub mod pins;
pub mod precopy;
pub mod sessions;
pub mod snapshots;
pub mod telemetry;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use shoal_consensus::{
    Config, Index, Message, MessageBody, NodeId, ProgressState, RawNode, Role, Snapshot,
    SnapshotMeta, Term,
};
use shoal_engine::{
    AppliedState, ApplyEntry, Backend, Command, Engine, EngineError, GroupId, GroupWrite, LogBatch,
    Request, ShardId, ShardRecord, ShardStatus, SnapshotManifest,
};
use shoal_net::{Inbox, IncomingRpc, ReceivedFile, Responder, Transport};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use self::group::{decode_entry, updates_session, Group, Waiter};
use self::hosting::HostDecision;
use self::leaders::{GroupLeadership, PEER_HEARD_WITHIN_TICKS, SHUTDOWN_HANDOFF_TICKS_MAX};
use self::moves::{Effect, Entry};
use self::pins::{PinSpec, Pins};
use self::sessions::SessionTracker;
use self::snapshots::{export_dir, recv_dir, remove_dirs, SnapshotFileError};
use self::telemetry::{Observed, RequestTrace};
use crate::protocol::{
    BackupRefusal, BackupRequest, Denied, GroupRefusal, GroupReport, KvProtocol, KvResponse,
    MemberChange, MemberReply, NodeReport, PeerMessage, Request as RpcRequest, Response,
    ShardCommand, ShardReply, ShardRequest, SnapshotFileMeta,
};

pub use self::hosting::GROUPS_PER_NODE_MAX;
pub use self::leaders::LEADER_BALANCE_EVERY_TICKS;
pub use self::persist::{ENTRY_BYTES_MAX, ENTRY_REQUESTS_MAX};
pub use self::pins::{PINS_MAX, PIN_IDLE_MS_DEFAULT, PIN_QUEUE_MAX};

/// The Raft group that holds the KV service's data (for now, one group).
pub const KV_GROUP: GroupId = 1;
/// The shard group [`KV_GROUP`] serves.
pub const KV_SHARD: ShardId = 0;
/// The group of the shard controller: it stores the shard configurations
/// (the lab's group 0) and is never a replica group of a configuration.
pub const CONTROLLER_GROUP: GroupId = 0;
/// The shard the controller group serves (statically).
pub const CONTROLLER_SHARD: ShardId = 0;
/// Most events (messages plus RPCs) drained before a round runs.
pub const EVENTS_PER_ROUND_MAX: usize = 1024;
/// Most `Ready` rounds run back to back before the loop looks at events again.
pub const READY_ROUNDS_MAX: usize = 16;
/// Most verified received snapshot directories remembered per group (the
/// lowest indexes are forgotten first).
pub const VERIFIED_SNAPSHOTS_MAX: usize = 4;
/// Default session idle time: one hour.
pub const SESSION_IDLE_MS_DEFAULT: u64 = 60 * 60 * 1000;
/// Ticks between sweeps of received snapshot files no longer needed.
pub const PRUNE_EVERY_TICKS: u64 = 100;
/// Default log size beyond which a group compacts its log into a snapshot.
pub const MAX_RAFT_STATE_BYTES_DEFAULT: u64 = 64 << 20;

/// Configuration of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (also its Raft id in every group).
    pub id: NodeId,
    /// The voters of every group in [`Self::groups`] that names none of
    /// its own, this node included.
    pub voters: Vec<NodeId>,
    /// The node joins the groups of [`Self::groups`] that it holds nothing
    /// of yet: it starts them with no membership and waits until their
    /// leader adds it as a learner (`Request::Member`) and replicates to
    /// it (`shoal_consensus::Config::join`). Default: false.
    pub join: bool,
    /// The Raft groups this node always hosts. Default: [`KV_GROUP`]
    /// serving [`KV_SHARD`] without a shard controller. Groups hosted at
    /// runtime (`Request::HostGroup`) are recorded in the engine and
    /// opened too (see [`hosting`]).
    pub groups: Vec<GroupSpec>,
    /// Tick length; consensus timeouts are counted in ticks.
    pub tick_ms: u64,
    /// Seed of this node's consensus RNG (mixed with the node id).
    pub seed: u64,
    /// Sessions a leader has seen idle this long (on its own monotonic
    /// clock) are expired, by an entry it proposes every quarter of it.
    /// Clients must not retry one operation for longer; see
    /// `ClientConfig::session_idle_ms`.
    pub session_idle_ms: u64,
    /// Run engine writes and snapshot file work on tokio's blocking pool
    /// (RocksDB) rather than on the event loop (the in-memory engine under
    /// a paused test clock).
    pub blocking_io: bool,
    /// Compact a group's log once it holds more entry bytes than this (the
    /// lab's maxraftstate); `None`: never compact. Default
    /// [`MAX_RAFT_STATE_BYTES_DEFAULT`].
    pub max_raft_state_bytes: Option<u64>,
    /// Directory for exported snapshots and snapshot files received from
    /// leaders. One per node; keep it inside the node's data directory
    /// (an interrupted install is finished from it after a crash), e.g.
    /// `<engine dir>/snapshots`.
    pub snapshot_dir: PathBuf,
    /// Every this many ticks the node hands leadership of one group it
    /// leads to a member leading fewer, if it leads more than its share
    /// (see [`leaders`]); `None`: never. Default
    /// [`LEADER_BALANCE_EVERY_TICKS`].
    pub leader_balance_every_ticks: Option<u64>,
    /// A pin no `ScanPin` used for this long is released (see [`pins`]),
    /// judged at the loop's ticks on tokio's clock. Default
    /// [`PIN_IDLE_MS_DEFAULT`].
    pub pin_idle_ms: u64,
    /// Most pins this node holds at once (each one holder, one engine
    /// view, one long-lived task, whatever its number of shards); a `Pin`
    /// beyond is refused (0: no pins at all). Default [`PINS_MAX`].
    pub pins_max: usize,
    /// `None` (the default): every round that adds entries is synced
    /// before anyone hears of it. `Some(ms)`: such rounds are written
    /// unsynced and synced at the first round at least `ms` after the
    /// first unsynced one (the next tick at the latest), so a crash of
    /// the machine may lose writes acknowledged in the last window (a
    /// crash of the process alone loses nothing: the writes are in the
    /// OS). Terms, votes, snapshots and membership are still synced at
    /// once ([`persist::sync_mode`]). Only for a node whose every group
    /// has it as the only voter (an embedded `Db`): a replica
    /// acknowledging unsynced entries to a leader would let a committed
    /// entry be lost. [`Node::start`] refuses it otherwise.
    pub log_sync_window_ms: Option<u64>,
}

impl NodeConfig {
    /// Defaults for node `id` of a group of `voters`, keeping snapshot
    /// files in `snapshot_dir`.
    pub fn new(id: NodeId, voters: Vec<NodeId>, snapshot_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            id,
            voters,
            join: false,
            groups: vec![GroupSpec::new(KV_GROUP, vec![KV_SHARD])],
            tick_ms: shoal_consensus::config::DEFAULT_TICK_MS,
            seed: id,
            session_idle_ms: SESSION_IDLE_MS_DEFAULT,
            blocking_io: true,
            max_raft_state_bytes: Some(MAX_RAFT_STATE_BYTES_DEFAULT),
            snapshot_dir: snapshot_dir.into(),
            leader_balance_every_ticks: Some(LEADER_BALANCE_EVERY_TICKS),
            pin_idle_ms: PIN_IDLE_MS_DEFAULT,
            pins_max: PINS_MAX,
            log_sync_window_ms: None,
        }
    }
}

/// One Raft group a node hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// The group.
    pub group: GroupId,
    /// Shards the group serves from its creation, without a shard
    /// controller (an embedded `Db`, a single-group cluster, the
    /// controller's own group). A group of a sharded cluster lists none:
    /// it serves the shards its `Create` and `Install` entries gave it
    /// (see [`moves`]).
    pub static_shards: Vec<ShardId>,
    /// The group's voters when it is created; empty: the node's
    /// [`NodeConfig::voters`]. Once created, the membership stored with
    /// the group is the one in force.
    pub voters: Vec<NodeId>,
}

impl GroupSpec {
    /// Group `group` serving `static_shards`, with the node's voters.
    pub fn new(group: GroupId, static_shards: Vec<ShardId>) -> GroupSpec {
        GroupSpec {
            group,
            static_shards,
            voters: Vec::new(),
        }
    }

    /// The voters the group is created with, given the node's `default`.
    pub fn voters_or(&self, default: &[NodeId]) -> Vec<NodeId> {
        if self.voters.is_empty() {
            default.to_vec()
        } else {
            self.voters.clone()
        }
    }
}

/// Why a node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The consensus core refused its configuration or recovered state, or
    /// failed on storage.
    #[error("group {group}: consensus: {source}")]
    Consensus {
        /// The group.
        group: GroupId,
        /// The error.
        #[source]
        source: shoal_consensus::Error,
    },
    /// The engine failed.
    #[error("group {group}: engine: {source}")]
    Engine {
        /// The group.
        group: GroupId,
        /// The error.
        #[source]
        source: EngineError,
    },
    /// Snapshot files could not be written or read.
    #[error("group {group}: snapshot files: {source}")]
    SnapshotFiles {
        /// The group.
        group: GroupId,
        /// The error.
        #[source]
        source: SnapshotFileError,
    },
    /// The node's task panicked or was aborted.
    #[error("node task ended abnormally: {0}")]
    Task(String),
    /// `log_sync_window_ms` is set on a node with a group of several
    /// voters (see [`NodeConfig::log_sync_window_ms`]).
    #[error(
        "group {group} has voters {voters:?}: a log sync window needs this node as the only voter"
    )]
    SyncWindow {
        /// The group.
        group: GroupId,
        /// Its voters.
        voters: Vec<NodeId>,
    },
    /// A replica could not apply a committed shard install: the files the
    /// freeze shipped to this node are missing or corrupt (lost in a crash
    /// between the net storing them and the node filing them, or damaged
    /// on disk). The replica stops (the node and its other groups carry
    /// on); the group serves from its other replicas. An operator restores
    /// the files or rebuilds the replica.
    #[error("group {group}: cannot install shard {shard} of config {num}: {source}")]
    ShardInstall {
        /// The group.
        group: GroupId,
        /// The shard.
        shard: ShardId,
        /// The config number of the install.
        num: u64,
        /// What went wrong.
        #[source]
        source: Box<NodeError>,
    },
    /// The record of the groups hosted at runtime could not be read.
    #[error("reading the groups hosted at runtime: {source}")]
    HostedGroups {
        /// The error.
        #[source]
        source: EngineError,
    },
    /// The configuration lists a group this node dropped (see [`hosting`]):
    /// its replica is gone for good, and starting it afresh could elect
    /// two leaders in one term.
    #[error("group {group} was dropped on this node and cannot be hosted again")]
    Dropped {
        /// The group.
        group: GroupId,
    },
}

/// What a node reports about a group (for tests, metrics and tools).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// Role in the group.
    pub role: Option<Role>,
    /// Current term.
    pub term: Term,
    /// Known leader, or 0.
    pub leader: NodeId,
    /// Commit index.
    pub commit: Index,
    /// Applied index.
    pub applied: Index,
    /// Bytes of entries in the stored log (an upper estimate: overwritten
    /// suffixes are counted until the next compaction): the lab's raft state
    /// size.
    pub log_bytes: u64,
    /// Index of the latest snapshot this node took or installed (0: none).
    pub snapshot_index: Index,
    /// Bytes of that snapshot's files (for the lab's snapshot size check).
    pub snapshot_bytes: u64,
    /// Snapshots received from a leader and installed since the start.
    pub snapshots_installed: u64,
    /// Client sessions this node tracks in the group's shards.
    pub sessions: u64,
}

/// A running node. Dropping the handle leaves the node running; call
/// [`NodeHandle::shutdown`] or [`NodeHandle::crash`].
#[derive(Debug)]
pub struct NodeHandle {
    id: NodeId,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), NodeError>>,
    status: Arc<Mutex<HashMap<GroupId, GroupStatus>>>,
}

impl NodeHandle {
    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The status of `group` as of the last round.
    pub fn status(&self, group: GroupId) -> GroupStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
            .unwrap_or_default()
    }

    /// Whether the node's task is still running (false after it stopped on
    /// an error or panicked).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// The groups the node hosts (as of the last round), in order.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        groups.sort_unstable();
        groups
    }

    /// Whether the node leads the KV group (as of the last round).
    pub fn is_leader(&self) -> bool {
        self.status(KV_GROUP).role == Some(Role::Leader)
    }

    /// Stops the node gracefully (see the module docs): every waiting caller
    /// is answered before this returns.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(NodeError::Task(e.to_string())),
        }
    }

    /// Kills the node like a process crash: the task is aborted, waiting
    /// callers are dropped unanswered. Unsynced engine writes survive in the
    /// engine until the caller simulates the crash there too. Returns the
    /// error the node had already stopped on, or a panic of its task.
    pub async fn crash(self) -> Result<(), NodeError> {
        self.task.abort();
        match self.task.await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(NodeError::Task(e.to_string())),
        }
    }
}

/// A running snapshot transfer.
struct Transfer {
    number: u64,
    index: Index,
    task: AbortHandle,
}

/// What a task the loop handed work to reports back.
enum Done {
    /// A snapshot's files were streamed to `peer` (or not) and, if they
    /// were, its `Snapshot` message sent.
    Transferred {
        group: GroupId,
        peer: NodeId,
        transfer: u64,
        delivered: bool,
    },
    /// Received snapshot files were verified (or not); `message` is the
    /// `Snapshot` message that waits for them.
    Verified {
        group: GroupId,
        index: Index,
        dir: PathBuf,
        message: Box<Message>,
        result: Result<(), SnapshotFileError>,
    },
    /// An export finished.
    Exported {
        group: GroupId,
        result: Result<SnapshotManifest, SnapshotFileError>,
    },
    /// Files no longer needed were removed.
    Pruned,
    /// A frozen shard was exported and shipped to its new group (or not);
    /// the freeze's callers wait in `Node::shipping`.
    Shipped {
        group: GroupId,
        shard: ShardId,
        num: u64,
        result: Result<SnapshotManifest, SnapshotFileError>,
    },
    /// A pre-copy of a shard was exported and shipped (or not); its callers
    /// wait in the group's record of it ([`precopy::Precopy`]).
    Precopied {
        group: GroupId,
        shard: ShardId,
        id: u64,
        result: Result<SnapshotManifest, SnapshotFileError>,
    },
    /// A shipped shard file was moved into its incoming directory, and
    /// checksummed there (`None`: it could not be).
    Placed {
        checked: Option<(PathBuf, precopy::Checked)>,
    },
    /// Whether an install's files are in place here was read (see
    /// `Node::on_shard_step`).
    InstallChecked {
        request: ShardRequest,
        reply: Waiter,
        shipped: bool,
    },
    /// A destination leader forwarded an install's files to members the
    /// freeze did not ship to (or not).
    Forwarded {
        key: moves::ExportKey,
        to: Vec<NodeId>,
        result: Result<(), SnapshotFileError>,
    },
    /// A backup export ([`backups`]) finished (or failed); `reply` waits
    /// for it (none for a fenced export: its files are asked for).
    BackupExported {
        id: u64,
        dir: PathBuf,
        result: Result<shoal_engine::GroupBackup, shoal_engine::BackupError>,
        reply: Option<Responder<Response>>,
    },
    /// A fenced backup export's view was taken at `applied_index` (`None`:
    /// the export failed before it).
    BackupPinned {
        group: GroupId,
        id: u64,
        applied_index: Option<Index>,
        reply: Responder<Response>,
    },
}

/// The node runtime; see the module docs.
pub struct Node<B: Backend, T: Transport<KvProtocol>> {
    config: NodeConfig,
    engine: Engine<B>,
    transport: T,
    groups: BTreeMap<GroupId, Group<B>>,
    next_read_context: u64,
    last_expiry: Instant,
    /// When the first log write not yet synced was made (with
    /// [`NodeConfig::log_sync_window_ms`] only).
    unsynced_since: Option<std::time::Instant>,
    status: Arc<Mutex<HashMap<GroupId, GroupStatus>>>,
    /// Every task the loop started (transfers, verifications, exports).
    tasks: JoinSet<Done>,
    /// Running snapshot transfers by (group, follower): the transfer's
    /// number, the export it streams (kept until it ends) and its task, to
    /// stop it when the group's leadership is lost.
    transfers: HashMap<(GroupId, NodeId), Transfer>,
    /// Number of the next snapshot transfer.
    next_transfer: u64,
    /// Ticks since the start.
    ticks: u64,
    /// Received snapshot directories being verified.
    verifying: HashSet<PathBuf>,
    /// Received snapshot files not yet moved into their directory, by
    /// (group, index, sender): (where the transport left it, file name).
    received: BTreeMap<(GroupId, Index, NodeId), Vec<(PathBuf, String)>>,
    /// `HostGroup` / `DropGroup` requests received this turn, carried out
    /// at the start of the round (at most [`EVENTS_PER_ROUND_MAX`]).
    queued_admin: Vec<(GroupAdmin, Responder<Response>)>,
    /// The tick at which each peer was last heard from (any message).
    peers_heard: HashMap<NodeId, u64>,
    /// Input pins held here (see [`pins`]).
    pins: Pins,
    /// Every pin holder, on the blocking pool; without `blocking_io`,
    /// holders run on threads of their own and this set runs their
    /// [`pins::PinWork`] instead (joining them, awaiting their answers).
    /// A holder ends once its pin is released; shutdown releases every pin
    /// and waits for them all.
    pin_tasks: JoinSet<()>,
    /// Backup exports held for the admin client (see [`backups`]).
    backups: backups::Backups,
    /// Install files forwarded by this node as a destination leader.
    forwards: moves::Forwards,
    /// Freezes whose export is being shipped, by (group, shard, config),
    /// with their callers: a repeated freeze joins the ship that runs.
    shipping: BTreeMap<(GroupId, ShardId, u64), Vec<Waiter>>,
    /// The number of the last pre-copy started ([`precopy::Precopy::id`]).
    next_precopy: u64,
    /// Shipped shard files checksummed as they arrived, by path (see
    /// [`precopy::checked_files`]).
    placed: BTreeMap<PathBuf, precopy::Checked>,
}

/// A change to the set of groups the node hosts.
enum GroupAdmin {
    Host {
        group: GroupId,
        voters: Vec<NodeId>,
    },
    /// `removed`: after this node's removal from the group (see
    /// [`RpcRequest::DropRemoved`]).
    Drop {
        group: GroupId,
        removed: bool,
    },
}

fn consensus_err(group: GroupId) -> impl Fn(shoal_consensus::Error) -> NodeError {
    move |source| NodeError::Consensus { group, source }
}

fn engine_err(group: GroupId) -> impl Fn(EngineError) -> NodeError {
    move |source| NodeError::Engine { group, source }
}

fn files_err(group: GroupId) -> impl Fn(SnapshotFileError) -> NodeError {
    move |source| NodeError::SnapshotFiles { group, source }
}

impl<B: Backend, T: Transport<KvProtocol>> Node<B, T> {
    /// Builds the node from what `engine` holds and spawns its event loop on
    /// the current tokio runtime.
    pub fn start(
        config: NodeConfig,
        engine: Engine<B>,
        transport: T,
        inbox: Inbox<KvProtocol>,
    ) -> Result<NodeHandle, NodeError> {
        let mut node = Node::open(config, engine, transport)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let status = node.status.clone();
        let id = node.config.id;
        node.publish_status();
        let task = tokio::spawn(async move { node.run(inbox, shutdown_rx).await });
        Ok(NodeHandle {
            id,
            shutdown: shutdown_tx,
            task,
            status,
        })
    }

    /// Opens one group from what the engine holds (a new group if nothing).
    /// Runs before the loop starts, so it may block.
    fn open_group(
        config: &NodeConfig,
        engine: &Engine<B>,
        spec: &GroupSpec,
        join: bool,
    ) -> Result<Group<B>, NodeError> {
        let group_id = spec.group;
        let err = engine_err(group_id);
        let stored = engine.conf_state(group_id).map_err(&err)?;
        if stored.voters.is_empty() && !join {
            // A brand-new group: record its membership so a restart does not
            // depend on the configuration again.
            let conf = shoal_consensus::ConfState {
                voters: spec.voters_or(&config.voters),
                learners: Vec::new(),
            };
            engine
                .write_log(LogBatch {
                    groups: vec![GroupWrite {
                        group: group_id,
                        conf_state: Some(conf),
                        ..Default::default()
                    }],
                })
                .map_err(&err)?;
        }
        std::fs::create_dir_all(&config.snapshot_dir).map_err(|source| {
            files_err(group_id)(SnapshotFileError::Io {
                path: config.snapshot_dir.clone(),
                source,
            })
        })?;
        // Files received before a restart are not remembered as verified:
        // a leader sends them again if still needed.
        remove_dirs(
            &config.snapshot_dir,
            &format!("recv-g{group_id}-"),
            Index::MAX,
        );
        let applied = engine.applied(group_id).map_err(&err)?;
        let state = engine.group_state(group_id).map_err(&err)?;
        if applied.index > state.hard_state.commit.max(state.truncated_index) {
            // A crash between installing a snapshot and persisting the log
            // reset: finish the reset at the applied (committed) index.
            tracing::info!(
                node = config.id,
                group = group_id,
                applied = applied.index,
                "finishing an interrupted snapshot install"
            );
            let snapshot = Snapshot {
                meta: SnapshotMeta {
                    index: applied.index,
                    term: applied.term,
                    // The membership as of the applied index as far as this
                    // node recorded it: an install does not carry the
                    // snapshot's membership into `meta`.
                    conf_state: engine.conf_state(group_id).map_err(&err)?,
                },
                data: Bytes::new(),
            };
            engine
                .write_log(LogBatch {
                    groups: vec![GroupWrite {
                        group: group_id,
                        snapshot: Some(snapshot),
                        ..Default::default()
                    }],
                })
                .map_err(&err)?;
        }
        let state = engine.group_state(group_id).map_err(&err)?;
        let mut snapshot_bytes = 0;
        if let Some(snapshot) = &state.snapshot {
            // The files of the snapshot to send must exist; if they do not
            // (an install, or a crash), export afresh at the applied index.
            let dir = export_dir(&config.snapshot_dir, group_id, snapshot.meta.index);
            match shoal_engine::snapshot::read_manifest(&dir) {
                Ok(m) => snapshot_bytes = m.size_bytes(),
                Err(_) => {
                    let manifest = snapshots::export(engine, &config.snapshot_dir, group_id)
                        .map_err(files_err(group_id))?;
                    let conf = engine.conf_state(group_id).map_err(&err)?;
                    record_snapshot(engine, group_id, &manifest, conf)?;
                    remove_dirs(
                        &config.snapshot_dir,
                        &format!("export-g{group_id}-"),
                        manifest.applied.index.saturating_sub(1),
                    );
                    snapshot_bytes = manifest.size_bytes();
                }
            }
        }
        let applied = engine.applied(group_id).map_err(&err)?;
        let snapshot_index = engine
            .group_state(group_id)
            .map_err(&err)?
            .snapshot
            .map_or(0, |s| s.meta.index);
        let voters = if join {
            Vec::new()
        } else {
            spec.voters_or(&config.voters)
        };
        let mut raft_config = Config::new(config.id, voters);
        raft_config.join = join;
        raft_config.applied = applied.index;
        raft_config.seed = config.seed ^ config.id.rotate_left(32) ^ group_id.rotate_left(16);
        let raw = RawNode::new(raft_config, engine.group_storage(group_id))
            .map_err(consensus_err(group_id))?;
        let records = engine.shard_records(group_id).map_err(&err)?;
        let mut group = Group::new(
            group_id,
            spec.static_shards.clone(),
            records,
            raw,
            snapshot_index,
            snapshot_bytes,
        );
        let now = Instant::now();
        for shard in group.served_shards() {
            let known = engine.sessions(group_id, shard).map_err(&err)?;
            group.sessions.reload(shard, known, now);
        }
        Ok(group)
    }

    fn open(config: NodeConfig, engine: Engine<B>, transport: T) -> Result<Self, NodeError> {
        // Members added at runtime: their addresses are in the book.
        let addrs = engine.member_addrs().map_err(engine_err(KV_GROUP))?;
        learn_member_addrs(&transport, config.id, addrs);
        // Backup exports of an earlier start can never be read again.
        backups::remove_all(&config.snapshot_dir);
        let mut groups = BTreeMap::new();
        let now = Instant::now();
        for spec in &config.groups {
            let dropped = engine
                .group_dropped(spec.group)
                .map_err(engine_err(spec.group))?;
            if dropped {
                return Err(NodeError::Dropped { group: spec.group });
            }
            let group = Self::open_group(&config, &engine, spec, config.join)?;
            groups.insert(spec.group, group);
        }
        // Groups hosted at runtime (see `hosting`); the configuration's
        // spec wins for a group listed in both.
        let hosted = engine
            .hosted_groups()
            .map_err(|source| NodeError::HostedGroups { source })?;
        for (gid, voters) in hosted {
            if groups.contains_key(&gid) {
                continue;
            }
            // Hosted with no voters: joining (see `HostDecision::Join`).
            let join = voters.is_empty();
            let spec = GroupSpec {
                group: gid,
                static_shards: Vec::new(),
                voters,
            };
            let group = Self::open_group(&config, &engine, &spec, join)?;
            groups.insert(gid, group);
        }
        if config.log_sync_window_ms.is_some() {
            for (gid, group) in &groups {
                let voters = &group.raw.conf_state().voters;
                if voters.as_slice() != [config.id] {
                    return Err(NodeError::SyncWindow {
                        group: *gid,
                        voters: voters.clone(),
                    });
                }
            }
        }
        // Files of groups no longer hosted: a drop that a crash cut short.
        let hosted: BTreeSet<GroupId> = groups.keys().copied().collect();
        hosting::remove_unhosted_dirs(&config.snapshot_dir, &hosted);
        Ok(Node {
            engine,
            transport,
            groups,
            next_read_context: 1,
            last_expiry: now,
            unsynced_since: None,
            status: Arc::new(Mutex::new(HashMap::new())),
            tasks: JoinSet::new(),
            transfers: HashMap::new(),
            next_transfer: 1,
            ticks: 0,
            verifying: HashSet::new(),
            received: BTreeMap::new(),
            forwards: moves::Forwards::default(),
            shipping: BTreeMap::new(),
            next_precopy: 0,
            placed: BTreeMap::new(),
            queued_admin: Vec::new(),
            peers_heard: HashMap::new(),
            pins: Pins::new(config.id, config.seed, config.pins_max, !config.blocking_io),
            pin_tasks: JoinSet::new(),
            backups: backups::Backups::new(config.seed ^ config.id),
            config,
        })
    }

    async fn run(
        mut self,
        mut inbox: Inbox<KvProtocol>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Set once asked to stop: the tick by which the node stops even if
        // it still leads a group it could not hand off.
        let mut handoff_until: Option<u64> = None;
        let result = loop {
            let event = tokio::select! {
                biased;
                changed = shutdown.changed(), if handoff_until.is_none() => {
                    if changed.is_err() || *shutdown.borrow() {
                        if !self.hand_off_leadership() {
                            break Ok(());
                        }
                        tracing::info!(node = self.config.id, "handing off leadership before stopping");
                        handoff_until = Some(self.ticks + SHUTDOWN_HANDOFF_TICKS_MAX);
                    }
                    Ok(())
                }
                // Finished tasks and files first: under steady load a
                // message or RPC is nearly always waiting, and these must
                // not wait behind them (a file is also queued before the
                // message that announces it).
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.on_joined(joined).await
                }
                Some(joined) = self.pin_tasks.join_next(), if !self.pin_tasks.is_empty() => {
                    if let Err(e) = joined {
                        // Its pin answers `PinGone` from now on.
                        tracing::error!(node = self.config.id, error = %e, "a pin holder failed");
                    }
                    Ok(())
                }
                file = inbox.files.recv() => match file {
                    Some(file) => {
                        self.on_file(file);
                        Ok(())
                    }
                    None => break Ok(()),
                },
                _ = ticker.tick() => self.tick(),
                message = inbox.messages.recv() => match message {
                    Some((from, m)) => {
                        self.on_peer_message(from.0, m);
                        Ok(())
                    }
                    None => break Ok(()),
                },
                rpc = inbox.rpcs.recv() => match rpc {
                    Some(rpc) => {
                        self.on_rpc(rpc);
                        Ok(())
                    }
                    None => break Ok(()),
                },
            };
            let turn = std::time::Instant::now();
            if let Err(e) = event {
                break Err(e);
            }
            if let Err(e) = self.drain(&mut inbox).await {
                break Err(e);
            }
            if let Err(e) = self.round().await {
                break Err(e);
            }
            telemetry::round(turn.elapsed().as_secs_f64());
            if let Some(until) = handoff_until {
                if !self.hand_off_leadership() || self.ticks >= until {
                    break Ok(());
                }
            }
        };
        if let Err(e) = &result {
            tracing::error!(node = self.config.id, error = %e, "node stopped on an error");
        }
        // A clean stop leaves nothing a sync window deferred unsynced.
        if self.unsynced_since.is_some() {
            if let Err(e) = self.sync_deferred().await {
                tracing::error!(node = self.config.id, error = %e, "syncing the log at shutdown");
            }
        }
        self.answer_all(|| KvResponse::ShuttingDown);
        // Stop what runs on our behalf: async tasks are aborted, blocking
        // ones (an export) are waited for. Released pins' holders end at
        // once (their channel closes, their first scan stops early).
        self.pins.clear();
        self.run_pin_work();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        while self.pin_tasks.join_next().await.is_some() {}
        result
    }

    /// Takes everything else already queued, so one round serves it all:
    /// finished tasks, then (files before each message, as a file is queued
    /// before the message announcing it) messages and RPCs, at most
    /// [`EVENTS_PER_ROUND_MAX`].
    async fn drain(&mut self, inbox: &mut Inbox<KvProtocol>) -> Result<(), NodeError> {
        while let Some(joined) = self.tasks.try_join_next() {
            self.on_joined(joined).await?;
        }
        for _ in 0..EVENTS_PER_ROUND_MAX {
            while let Ok(file) = inbox.files.try_recv() {
                self.on_file(file);
            }
            if let Ok((from, m)) = inbox.messages.try_recv() {
                self.on_peer_message(from.0, m);
            } else if let Ok(rpc) = inbox.rpcs.try_recv() {
                self.on_rpc(rpc);
            } else {
                break;
            }
        }
        Ok(())
    }

    async fn on_joined(
        &mut self,
        joined: Result<Done, tokio::task::JoinError>,
    ) -> Result<(), NodeError> {
        match joined {
            Ok(done) => self.on_done(done).await,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(NodeError::Task(format!("a node task failed: {e}"))),
        }
    }

    fn tick(&mut self) -> Result<(), NodeError> {
        for (gid, group) in &mut self.groups {
            group.raw.tick().map_err(consensus_err(*gid))?;
        }
        self.end_lapsed_fences();
        self.ticks += 1;
        if self.ticks % PRUNE_EVERY_TICKS == 0 {
            self.prune_received();
            self.prune_moves();
        }
        let idle_backups = self.backups.expire(
            Duration::from_millis(backups::BACKUP_IDLE_MS_MAX),
            Instant::now(),
        );
        for dir in idle_backups {
            tracing::info!(node = self.config.id, dir = %dir.display(), "idle backup export released");
            self.prune(move || drop(std::fs::remove_dir_all(dir)));
        }
        let released = self.pins.expire(
            Duration::from_millis(self.config.pin_idle_ms),
            Instant::now(),
        );
        if released > 0 {
            tracing::debug!(node = self.config.id, released, "idle pins released");
        }
        if let Some(every) = self.config.leader_balance_every_ticks.filter(|e| *e > 0) {
            // Staggered by node id, so nodes seldom decide at once.
            if (self.ticks + self.config.id) % every == 0 {
                self.balance_leaders();
            }
        }
        let idle = Duration::from_millis(self.config.session_idle_ms);
        let now = Instant::now();
        if now.duration_since(self.last_expiry) < (idle / 4).max(Duration::from_millis(1)) {
            return Ok(());
        }
        self.last_expiry = now;
        // A leader proposes the expiry of sessions it has itself seen idle
        // for the whole period; its outcome needs no answer.
        for group in self.groups.values_mut() {
            if !group.raw.is_leader() {
                continue;
            }
            for shard in group.served_shards() {
                let sessions = group.sessions.idle(shard, idle, now);
                if sessions.is_empty() {
                    continue;
                }
                let request = Request {
                    shard,
                    client: 0,
                    seq: 0,
                    command: Command::ExpireSessions { sessions },
                };
                group.queued_writes.push((request, Waiter::nobody()));
            }
        }
        Ok(())
    }

    /// Hands leadership of one group to a member leading fewer, if this
    /// node leads more than its share ([`leaders::choose_transfer`]). A
    /// member may take over if it was heard from lately and its log is
    /// being replicated (not probed, not waiting for a snapshot).
    /// Stopping: asks every group this node leads, with other voters, to
    /// elect the voter [`leaders::handoff_target`] picks (again for a group
    /// whose earlier transfer ran out). Returns whether the node still
    /// leads such a group.
    fn hand_off_leadership(&mut self) -> bool {
        let me = self.config.id;
        let (heard, ticks) = (&self.peers_heard, self.ticks);
        let mut leads = false;
        for (gid, group) in &mut self.groups {
            let voters = group.raw.conf_state().voters.clone();
            if !group.raw.is_leader() || voters.len() < 2 {
                continue;
            }
            leads = true;
            if group.raw.lead_transferee().is_some() {
                continue;
            }
            let target = leaders::handoff_target(me, &voters, |v| {
                takeover_match(&group.raw, heard, ticks, v)
            });
            if let Some(to) = target {
                tracing::info!(node = me, group = gid, to, "handing off leadership");
                if let Err(e) = group.raw.transfer_leader(to) {
                    tracing::warn!(node = me, group = gid, error = %e, "leadership hand-off");
                }
            }
        }
        leads
    }

    fn balance_leaders(&mut self) {
        let me = self.config.id;
        if self
            .groups
            .values()
            .any(|g| g.raw.lead_transferee().is_some())
        {
            // One transfer at a time: wait for its outcome.
            return;
        }
        // The controller group carries little traffic: it is left out, so
        // the replica groups' leaders spread over every node (three groups
        // on three nodes: three leaders, wherever the controller's is).
        let views: Vec<GroupLeadership> = self
            .groups
            .iter()
            .filter(|(gid, _)| **gid != CONTROLLER_GROUP)
            .map(|(gid, g)| GroupLeadership {
                group: *gid,
                voters: g.raw.conf_state().voters.clone(),
                leader: if g.raw.is_leader() {
                    me
                } else {
                    g.raw.leader_id()
                },
            })
            .collect();
        let (groups, heard, ticks) = (&self.groups, &self.peers_heard, self.ticks);
        let can_take_over = |gid: GroupId, peer: NodeId| {
            groups
                .get(&gid)
                .is_some_and(|g| takeover_match(&g.raw, heard, ticks, peer).is_some())
        };
        let Some(transfer) = leaders::choose_transfer(me, &views, can_take_over) else {
            return;
        };
        tracing::info!(
            node = me,
            group = transfer.group,
            to = transfer.to,
            "handing over leadership: this node leads more than its share"
        );
        let group = self
            .groups
            .get_mut(&transfer.group)
            .expect("chosen among hosted groups");
        if let Err(e) = group.raw.transfer_leader(transfer.to) {
            tracing::debug!(node = me, group = transfer.group, error = %e, "leadership transfer refused");
        }
    }

    fn on_peer_message(&mut self, from: NodeId, m: PeerMessage) {
        self.peers_heard.insert(from, self.ticks);
        let Some(group) = self.groups.get(&m.group) else {
            tracing::debug!(
                node = self.config.id,
                from,
                group = m.group,
                "message for a group not hosted here"
            );
            return;
        };
        if m.message.from != from || m.message.to != self.config.id {
            tracing::warn!(
                node = self.config.id,
                from,
                "misaddressed peer message dropped"
            );
            return;
        }
        if let MessageBody::Snapshot { snapshot } = &m.message.body {
            let (index, term) = (snapshot.meta.index, snapshot.meta.term);
            if index > group.raw.commit_index() {
                // Step it only once its files verify, off the loop.
                let gid = m.group;
                let dir = recv_dir(&self.config.snapshot_dir, gid, index, from);
                let verified = group.verified.get(&index) == Some(&dir);
                let files = self
                    .received
                    .remove(&(gid, index, from))
                    .unwrap_or_default();
                if verified {
                    // Verified before: files sent again are copies.
                    self.prune(move || {
                        for (path, _) in files {
                            let _ = std::fs::remove_file(path);
                        }
                    });
                } else if self.verifying.insert(dir.clone()) {
                    let message = Box::new(m.message);
                    self.run_blocking(move || Done::Verified {
                        group: gid,
                        index,
                        result: snapshots::file_into_place(&files, &dir)
                            .and_then(|()| snapshots::verify(&dir, gid, index, term)),
                        dir,
                        message,
                    });
                    return;
                } else {
                    // This directory is being verified: these files wait
                    // for the message that follows them.
                    self.received.insert((gid, index, from), files);
                    return;
                }
            }
        }
        let group = self.groups.get_mut(&m.group).expect("checked above");
        if let Err(e) = group.raw.step(m.message) {
            tracing::debug!(node = self.config.id, group = m.group, error = %e, "step failed");
        }
    }

    /// Runs blocking work on the blocking pool (or at once without
    /// [`NodeConfig::blocking_io`]); its result comes back to the loop.
    fn run_blocking(&mut self, work: impl FnOnce() -> Done + Send + 'static) {
        if self.config.blocking_io {
            self.tasks.spawn_blocking(work);
        } else {
            let done = work();
            self.tasks.spawn(async move { done });
        }
    }

    /// Serves one step of a backup (see [`backups`]); the caller is the
    /// admin client. The export and every read run on the blocking pool.
    fn on_backup(&mut self, request: BackupRequest, reply: Responder<Response>) {
        let refuse = |reply: Responder<Response>, refusal| {
            let _ = reply.send(Response::BackupRefused(refusal));
        };
        match request {
            BackupRequest::Export { group: gid } => {
                if let Err(refusal) = self.backup_ready(gid) {
                    return refuse(reply, refusal);
                }
                let (id, dir) =
                    match self
                        .backups
                        .admit(gid, &self.config.snapshot_dir, Instant::now())
                    {
                        Ok(admitted) => admitted,
                        Err(refusal) => return refuse(reply, refusal),
                    };
                let engine = self.engine.clone();
                self.run_blocking(move || {
                    let result = engine.export_group_backup(gid, &dir);
                    Done::BackupExported {
                        id,
                        dir,
                        result,
                        reply: Some(reply),
                    }
                });
            }
            BackupRequest::FencedExport {
                group: gid,
                hold_ms,
            } => {
                if let Err(refusal) = self.backup_ready(gid) {
                    return refuse(reply, refusal);
                }
                if self.groups[&gid].fence.is_some() {
                    return refuse(reply, BackupRefusal::Fenced);
                }
                let now = Instant::now();
                let (id, dir) = match self.backups.admit(gid, &self.config.snapshot_dir, now) {
                    Ok(admitted) => admitted,
                    Err(refusal) => return refuse(reply, refusal),
                };
                let group = self.groups.get_mut(&gid).expect("checked ready");
                let term = group.raw.term();
                group.fence = Some(backups::Fence::new(id, term, now, hold_ms, (dir, reply)));
                tracing::info!(node = self.config.id, group = gid, id, "backup fence set");
                self.maybe_start_fenced_export(gid);
            }
            BackupRequest::Unfence { group: gid, id } => {
                let now = Instant::now();
                let held = match self.groups.get_mut(&gid) {
                    Some(group) if group.fence.as_ref().is_some_and(|f| f.id == id) => {
                        let fence = group.fence.take().expect("checked");
                        fence.waiting.is_none()
                            && fence.holds(group.raw.is_leader(), group.raw.term(), now)
                    }
                    _ => false,
                };
                tracing::info!(
                    node = self.config.id,
                    group = gid,
                    id,
                    held,
                    "backup fence ended"
                );
                let _ = reply.send(Response::BackupUnfenced { held });
            }
            BackupRequest::Files { id } => match self.backups.contents(id, Instant::now()) {
                Ok(backup) => {
                    let _ = reply.send(Response::BackupExported {
                        id,
                        backup: Box::new(backup),
                    });
                }
                Err((refusal, dir)) => {
                    if let Some(dir) = dir {
                        self.prune(move || drop(std::fs::remove_dir_all(dir)));
                    }
                    refuse(reply, refusal);
                }
            },
            BackupRequest::Read { id, file, offset } => {
                let (path, len) = match self.backups.read(id, &file, offset, Instant::now()) {
                    Ok(found) => found,
                    Err(refusal) => return refuse(reply, refusal),
                };
                self.run_blocking(move || {
                    let answer = match backups::read_chunk(&path, offset, len) {
                        Ok(bytes) => Response::BackupChunk(bytes),
                        Err(e) => Response::BackupRefused(BackupRefusal::Failed {
                            reason: format!("reading {}: {e}", path.display()),
                        }),
                    };
                    let _ = reply.send(answer);
                    Done::Pruned
                });
            }
            BackupRequest::Release { id } => match self.backups.release(id) {
                Some(dir) => {
                    self.prune(move || drop(std::fs::remove_dir_all(dir)));
                    let _ = reply.send(Response::AdminDone);
                }
                None => refuse(reply, BackupRefusal::Gone),
            },
        }
    }

    /// Whether this node may export `gid` for a backup now: it leads the
    /// group, has committed an entry of its term (so its commit index
    /// covers everything any leader acknowledged) and applied through it
    /// (so the export, a later view, holds all of that).
    fn backup_ready(&self, gid: GroupId) -> Result<(), BackupRefusal> {
        let Some(group) = self.groups.get(&gid) else {
            return Err(BackupRefusal::UnknownGroup);
        };
        let raw = &group.raw;
        if !raw.is_leader() {
            let leader_hint = raw.leader_id();
            return Err(BackupRefusal::NotLeader { leader_hint });
        }
        let commit = raw.commit_index();
        let ready =
            raw.term_at(commit).is_ok_and(|t| t == raw.term()) && raw.applied_index() >= commit;
        if !ready {
            return Err(BackupRefusal::NotReady);
        }
        Ok(())
    }

    /// Starts the export a backup fence of `gid` waits for, once the
    /// leader's whole log is applied (nothing is proposed behind the
    /// fence, so the log stops growing): the caller is answered when the
    /// export's view is taken ([`Done::BackupPinned`]), the files are
    /// recorded when written ([`Done::BackupExported`]).
    fn maybe_start_fenced_export(&mut self, gid: GroupId) {
        let Some(group) = self.groups.get_mut(&gid) else {
            return;
        };
        let Some(fence) = group.fence.as_mut() else {
            return;
        };
        let applied = group.raw.applied_index();
        let Ok(last) = group.raw.last_index() else {
            return;
        };
        if !fence.may_export(applied, last) {
            return;
        }
        let (dir, reply) = fence.waiting.take().expect("may_export checked");
        let id = fence.id;
        let (pinned, view) = tokio::sync::oneshot::channel();
        self.tasks.spawn(async move {
            Done::BackupPinned {
                group: gid,
                id,
                applied_index: view.await.ok(),
                reply,
            }
        });
        let engine = self.engine.clone();
        self.run_blocking(move || {
            let mut pinned = Some(pinned);
            let result = engine.export_group_backup_pinned(gid, &dir, &mut |applied| {
                if let Some(pinned) = pinned.take() {
                    let _ = pinned.send(applied.index);
                }
            });
            Done::BackupExported {
                id,
                dir,
                result,
                reply: None,
            }
        });
    }

    /// Ends the backup fences that no longer hold (the leadership or the
    /// term changed, or the time ran out): writes go on, and the backup
    /// that set one learns at `Unfence` that it did not hold.
    fn end_lapsed_fences(&mut self) {
        let now = Instant::now();
        for (gid, group) in &mut self.groups {
            let lapsed = group
                .fence
                .as_ref()
                .is_some_and(|f| !f.holds(group.raw.is_leader(), group.raw.term(), now));
            if lapsed {
                let fence = group.fence.take().expect("checked");
                tracing::warn!(
                    node = self.config.id,
                    group = gid,
                    id = fence.id,
                    "backup fence lapsed"
                );
                if let Some((_, reply)) = fence.waiting {
                    let _ = reply.send(Response::BackupRefused(BackupRefusal::NotReady));
                }
            }
        }
    }

    /// Removes files off the loop (a large snapshot takes a while to
    /// delete).
    fn prune(&mut self, work: impl FnOnce() + Send + 'static) {
        self.run_blocking(move || {
            work();
            Done::Pruned
        });
    }

    /// Removes `group`'s exports other than the current one and those that
    /// running transfers still stream.
    fn prune_exports(&mut self, group: GroupId) {
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        let mut keep: BTreeSet<Index> = self
            .transfers
            .iter()
            .filter(|((tg, _), _)| *tg == group)
            .map(|(_, t)| t.index)
            .collect();
        keep.insert(g.snapshot_index);
        let root = self.config.snapshot_dir.clone();
        self.prune(move || {
            snapshots::remove_dirs_except(&root, &format!("export-g{group}-"), Index::MAX, &keep);
        });
    }

    /// Drops received snapshot files that consensus can no longer restore
    /// (their index is below the commit index), in memory and on disk.
    fn prune_received(&mut self) {
        let commits: Vec<(GroupId, Index)> = self
            .groups
            .iter()
            .map(|(gid, g)| (*gid, g.raw.commit_index()))
            .collect();
        for (gid, commit) in commits {
            if commit > 0 {
                self.prune_received_through(gid, commit - 1);
            }
        }
    }

    /// Removes move directories no longer needed ([`moves::move_dir_done`]),
    /// judged by the records as of now, off the loop.
    fn prune_moves(&mut self) {
        let records: HashMap<GroupId, BTreeMap<ShardId, ShardRecord>> = self
            .groups
            .iter()
            .map(|(gid, g)| (*gid, g.records.clone()))
            .collect();
        self.forwards.retain_pending(|group, shard| {
            records
                .get(&group)
                .map(|r| r.get(&shard).copied().unwrap_or(moves::RECORD_NONE))
        });
        let root = self.config.snapshot_dir.clone();
        self.prune(move || {
            let Ok(entries) = std::fs::read_dir(&root) else {
                return;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((side, group, shard, num)) = moves::parse_move_dir(&name) else {
                    continue;
                };
                let record = records
                    .get(&group)
                    .map(|r| r.get(&shard).copied().unwrap_or(moves::RECORD_NONE));
                if moves::move_dir_done(side, num, record) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        });
    }

    /// Drops `group`'s received snapshot files at or below `index`.
    fn prune_received_through(&mut self, group: GroupId, index: Index) {
        let mut files = Vec::new();
        self.received.retain(|(g, i, _), received| {
            let keep = *g != group || *i > index;
            if !keep {
                files.append(received);
            }
            keep
        });
        if let Some(g) = self.groups.get_mut(&group) {
            g.verified.retain(|i, _| *i > index);
        }
        let root = self.config.snapshot_dir.clone();
        self.prune(move || {
            for (path, _) in files {
                let _ = std::fs::remove_file(path);
            }
            remove_dirs(&root, &format!("recv-g{group}-"), index);
        });
    }

    async fn on_done(&mut self, done: Done) -> Result<(), NodeError> {
        match done {
            Done::Transferred {
                group,
                peer,
                transfer,
                delivered,
            } => {
                // A transfer that was replaced or stopped meanwhile says
                // nothing about the current one.
                let current = self
                    .transfers
                    .get(&(group, peer))
                    .is_some_and(|t| t.number == transfer);
                if current {
                    self.transfers.remove(&(group, peer));
                    if !delivered {
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.raw.report_snapshot(peer, false);
                        }
                    }
                    self.prune_exports(group);
                }
            }
            Done::Pruned => {}
            Done::Placed { checked } => {
                if let Some((path, checked)) = checked {
                    self.placed.insert(path, checked);
                    while self.placed.len() > precopy::PLACED_CHECKSUMS_MAX {
                        self.placed.pop_first();
                    }
                }
            }
            Done::BackupExported {
                id,
                dir,
                result,
                reply,
            } => {
                let answer = match result {
                    Ok(backup) => {
                        if self
                            .backups
                            .exported(id, Ok(backup.clone()), Instant::now())
                        {
                            Response::BackupExported {
                                id,
                                backup: Box::new(backup),
                            }
                        } else {
                            // Released meanwhile (shutdown of the client).
                            self.prune(move || drop(std::fs::remove_dir_all(dir)));
                            Response::BackupRefused(BackupRefusal::Gone)
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = self.config.id, id, error = %e, "backup export failed");
                        if reply.is_some() {
                            self.backups.release(id);
                            self.prune(move || drop(std::fs::remove_dir_all(dir)));
                        } else {
                            // Asked for later (`Files`), which answers why.
                            self.backups
                                .exported(id, Err(e.to_string()), Instant::now());
                        }
                        Response::BackupRefused(BackupRefusal::Failed {
                            reason: e.to_string(),
                        })
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            Done::BackupPinned {
                group,
                id,
                applied_index,
                reply,
            } => {
                let answer = match applied_index {
                    Some(applied_index) => Response::BackupPinned { id, applied_index },
                    None => {
                        // Failed before its view: writes need not wait.
                        if let Some(g) = self.groups.get_mut(&group) {
                            if g.fence.as_ref().is_some_and(|f| f.id == id) {
                                g.fence = None;
                            }
                        }
                        Response::BackupRefused(BackupRefusal::Failed {
                            reason: "the export failed before its view was taken".into(),
                        })
                    }
                };
                let _ = reply.send(answer);
            }
            Done::InstallChecked {
                request,
                reply,
                shipped,
            } => self.on_shard_step(request, reply, Some(shipped)),
            Done::Forwarded { key, to, result } => {
                if let Err(e) = &result {
                    // Transient (a member down): the controller retries the
                    // install, which forwards again.
                    tracing::warn!(node = self.config.id, group = key.0, shard = key.1, error = %e, "forwarding an install's files failed");
                }
                self.forwards.finish(key, &to, result.is_ok());
            }
            Done::Precopied {
                group: gid,
                shard,
                id,
                result,
            } => {
                let Some(group) = self.groups.get_mut(&gid) else {
                    return Ok(());
                };
                let ours = group
                    .precopies
                    .get(&shard)
                    .is_some_and(|p| p.id == id && p.base.is_none());
                if !ours {
                    // Consumed by a freeze (which exported the whole shard)
                    // or superseded meanwhile.
                    return Ok(());
                }
                let response = match result {
                    Ok(manifest) => {
                        let p = group.precopies.get_mut(&shard).expect("checked above");
                        tracing::info!(
                            node = self.config.id,
                            group = gid,
                            shard,
                            num = p.num,
                            bytes = manifest.size_bytes(),
                            "shard pre-copied"
                        );
                        p.base = Some(manifest);
                        KvResponse::Shard(ShardReply::Done)
                    }
                    Err(e) => {
                        tracing::warn!(node = self.config.id, group = gid, shard, error = %e, "pre-copying a shard failed; its freeze will export all of it");
                        let p = group.precopies.remove(&shard).expect("checked above");
                        // Not retried: the move goes on without it.
                        let reason = format!("pre-copy failed: {e}");
                        for w in p.waiters {
                            w.send(KvResponse::Shard(ShardReply::Refused {
                                reason: reason.clone(),
                            }));
                        }
                        return Ok(());
                    }
                };
                let p = group.precopies.get_mut(&shard).expect("checked above");
                for w in std::mem::take(&mut p.waiters) {
                    w.send(response.clone());
                }
            }
            Done::Shipped {
                group,
                shard,
                num,
                result,
            } => {
                let waiters = self
                    .shipping
                    .remove(&(group, shard, num))
                    .unwrap_or_default();
                let response = match result {
                    Ok(manifest) => KvResponse::Shard(ShardReply::Frozen { manifest }),
                    Err(e) => {
                        // Transient (a destination node down): the
                        // controller retries the freeze, which ships again.
                        tracing::warn!(node = self.config.id, group, shard, error = %e, "shipping a frozen shard failed");
                        KvResponse::Busy
                    }
                };
                for w in waiters {
                    w.send(response.clone());
                }
            }
            Done::Verified {
                group: gid,
                index,
                dir,
                message,
                result,
            } => {
                self.verifying.remove(&dir);
                let Some(group) = self.groups.get_mut(&gid) else {
                    // Dropped meanwhile.
                    self.prune(move || {
                        let _ = std::fs::remove_dir_all(dir);
                    });
                    return Ok(());
                };
                if let Err(e) = result {
                    tracing::warn!(
                        node = self.config.id,
                        group = gid,
                        index,
                        error = %e,
                        "received snapshot files do not verify; the snapshot message is dropped and the leader will resend"
                    );
                    return Ok(());
                }
                group.verified.insert(index, dir);
                while group.verified.len() > VERIFIED_SNAPSHOTS_MAX {
                    group.verified.pop_first();
                }
                if let Err(e) = group.raw.step(*message) {
                    tracing::debug!(node = self.config.id, group = gid, error = %e, "step failed");
                }
            }
            Done::Exported { group: gid, result } => {
                let Some(group) = self.groups.get_mut(&gid) else {
                    // Dropped meanwhile: its export goes too.
                    if let Ok(manifest) = result {
                        let dir =
                            export_dir(&self.config.snapshot_dir, gid, manifest.applied.index);
                        self.prune(move || {
                            let _ = std::fs::remove_dir_all(dir);
                        });
                    }
                    return Ok(());
                };
                group.exporting = false;
                let manifest = match result {
                    Ok(manifest) => manifest,
                    Err(e) => {
                        tracing::warn!(node = self.config.id, group = gid, error = %e, "snapshot export failed; it is retried");
                        group.export_pending = true;
                        return Ok(());
                    }
                };
                let index = manifest.applied.index;
                let changed_since = self
                    .engine
                    .applied_conf(gid)
                    .map_err(engine_err(gid))?
                    .is_some_and(|c| c.index > index);
                if changed_since {
                    // A membership change was applied after the export's
                    // index: its membership is not known here; export anew.
                    group.export_pending = true;
                    return Ok(());
                }
                if index > group.snapshot_index {
                    let conf = self.engine.conf_state(gid).map_err(engine_err(gid))?;
                    let recorded = manifest.clone();
                    self.with_engine(move |engine| record_snapshot(engine, gid, &recorded, conf))
                        .await?;
                    let group = self.groups.get_mut(&gid).expect("group exists");
                    group.snapshot_index = index;
                    group.snapshot_bytes = manifest.size_bytes();
                }
                // Otherwise an installed snapshot overtook it. Either way,
                // older exports go, and a pending one may start.
                self.prune_exports(gid);
                self.maybe_compact(gid)?;
            }
        }
        Ok(())
    }

    fn on_rpc(&mut self, rpc: IncomingRpc<KvProtocol>) {
        let IncomingRpc {
            from,
            request,
            reply,
        } = rpc;
        let request = match request {
            RpcRequest::Kv(request) => request,
            RpcRequest::Status => {
                let _ = reply.send(Response::Status(self.report()));
                return;
            }
            RpcRequest::SetFaultFilter { blocked } => {
                let _ = reply.send(self.admin(&from, |t| t.set_fault_filter(&blocked)));
                return;
            }
            RpcRequest::ClearFaultFilter => {
                let _ = reply.send(self.admin(&from, |t| t.clear_fault_filter()));
                return;
            }
            RpcRequest::HostGroup { .. }
            | RpcRequest::DropGroup { .. }
            | RpcRequest::Member(_)
            | RpcRequest::Backup(_)
            | RpcRequest::Shard(_)
            | RpcRequest::ShardSizes { .. }
            | RpcRequest::DropRemoved { .. }
                if !from.is_admin() =>
            {
                tracing::warn!(
                    node = self.config.id,
                    ?from,
                    "admin request (group, membership, backup or shard step) from a non-admin refused"
                );
                let _ = reply.send(Response::Denied(Denied::NotAdmin));
                return;
            }
            RpcRequest::HostGroup { group, voters } => {
                self.queued_admin
                    .push((GroupAdmin::Host { group, voters }, reply));
                return;
            }
            RpcRequest::DropGroup { group } => {
                let drop = GroupAdmin::Drop {
                    group,
                    removed: false,
                };
                self.queued_admin.push((drop, reply));
                return;
            }
            RpcRequest::DropRemoved { group } => {
                let drop = GroupAdmin::Drop {
                    group,
                    removed: true,
                };
                self.queued_admin.push((drop, reply));
                return;
            }
            RpcRequest::Member(request) => {
                let trace = RequestTrace::start(
                    self.config.id,
                    request.group,
                    telemetry::MEMBER_CHANGE_KIND,
                );
                let reply = Waiter::client(reply, trace);
                let addr = match &request.change {
                    // The leader replicates to the learner as soon as the
                    // change is in its log: it needs the address now.
                    MemberChange::AddLearner { node, addr } => match member_addr(addr) {
                        Ok(a) => Some((shoal_net::NodeId(*node), a)),
                        Err(reason) => {
                            reply.send(KvResponse::Member(MemberReply::Refused { reason }));
                            return;
                        }
                    },
                    _ => None,
                };
                let Some((group, reply)) = leading_group(&mut self.groups, request.group, reply)
                else {
                    return;
                };
                if let Some((node, a)) = addr {
                    self.transport.set_member_addr(node, a);
                }
                group.queued_member.push((request.change, reply));
                return;
            }
            RpcRequest::Backup(request) => {
                self.on_backup(request, reply);
                return;
            }
            RpcRequest::ShardSizes { group } => {
                if !self.groups.contains_key(&group) {
                    let _ = reply.send(Response::GroupRefused(GroupRefusal::NotHosted));
                    return;
                }
                let engine = self.engine.clone();
                self.run_blocking(move || {
                    let answer = match engine.shard_sizes(group) {
                        Ok(sizes) => Response::ShardSizes(sizes.into_iter().collect()),
                        Err(e) => Response::GroupRefused(GroupRefusal::Failed {
                            reason: e.to_string(),
                        }),
                    };
                    let _ = reply.send(answer);
                    Done::Pruned
                });
                return;
            }
            RpcRequest::Shard(request) => {
                let trace =
                    RequestTrace::start(self.config.id, request.group, telemetry::SHARD_STEP_KIND);
                let reply = Waiter::client(reply, trace);
                if let ShardCommand::Freeze { to_nodes, .. }
                | ShardCommand::Precopy { to_nodes, .. } = &request.command
                {
                    // The destination's nodes as the caller reaches them:
                    // members added since this node started are in no
                    // address list here.
                    if let Err(reason) =
                        learn_freeze_addrs(&self.transport, to_nodes, &request.to_addrs)
                    {
                        reply.send(KvResponse::Shard(ShardReply::Refused { reason }));
                        return;
                    }
                }
                if let ShardCommand::Precopy { .. } = &request.command {
                    self.on_precopy(request, reply);
                } else {
                    self.on_shard_step(request, reply, None);
                }
                return;
            }
        };
        let trace = RequestTrace::start(self.config.id, request.group, request.command.kind());
        let reply = Waiter::client(reply, trace);
        if request.command.is_pin_local() {
            self.on_pin_command(request, reply);
            return;
        }
        if let crate::protocol::ClientCommand::Pin { shards, .. } = &request.command {
            if let Err(reason) = pins::pin_shards_check(shards) {
                reply.send(KvResponse::Refused { reason });
                return;
            }
        }
        let Some(group) = self.groups.get_mut(&request.group) else {
            reply.send(KvResponse::UnknownGroup);
            return;
        };
        if !group.raw.is_leader() {
            reply.send(KvResponse::NotLeader {
                leader_hint: group.raw.leader_id(),
            });
            return;
        }
        if !group.serves_all(&request) {
            // Checked again when applied (or read), in log order.
            reply.send(KvResponse::WrongGroup);
            return;
        }
        // A scan asks for at most this node's page size, whatever the
        // client wants (it follows the continuation for more).
        let mut request = request;
        if let crate::protocol::ClientCommand::Scan { limit, .. } = &mut request.command {
            *limit = (*limit).min(self.engine.config().scan_limit_max);
        }
        // Limits are decided here, at proposal, by this leader's config;
        // apply never consults local limits.
        let command = match &request.command {
            // Checked as the scan its holder runs.
            crate::protocol::ClientCommand::Pin { start, end, .. } => Command::Scan {
                start: start.clone(),
                end: end.clone(),
                limit: 1,
            },
            other => other
                .to_command(self.engine.config().value_bytes_max)
                .expect("only pin commands have no log command, and they are served above"),
        };
        let engine_request = Request {
            shard: request.shard,
            client: request.client,
            seq: request.seq,
            command,
        };
        if let Err(e) = self.engine.validate_request(&engine_request) {
            reply.send(KvResponse::Refused {
                reason: e.to_string(),
            });
            return;
        }
        if request.command.is_read_only() {
            group.queued_reads.push((request, reply));
        } else {
            group.queued_writes.push((engine_request, reply));
        }
    }

    /// Serves a `ScanPin` or `Unpin` at once, whatever this node's role in
    /// the group (see [`pins`]).
    fn on_pin_command(&mut self, request: crate::protocol::KvRequest, reply: Waiter) {
        use crate::protocol::ClientCommand;
        match request.command {
            ClientCommand::ScanPin {
                pin,
                start,
                end,
                limit,
            } => {
                let limit = limit.min(self.engine.config().scan_limit_max);
                self.pins.scan(
                    pin,
                    request.group,
                    request.shard,
                    (start, end, limit),
                    reply,
                    Instant::now(),
                );
            }
            ClientCommand::Unpin { pin } => {
                reply.send(if self.pins.release(pin, request.group, request.shard) {
                    KvResponse::Done(shoal_engine::Reply::Deleted { existed: true })
                } else {
                    KvResponse::PinGone
                });
            }
            other => unreachable!("not a pin command: {other:?}"),
        }
    }

    /// Starts one holder for each `Pin` read `gid` served (the group
    /// served every shard of it at the read index), or refuses it beyond
    /// [`NodeConfig::pins_max`].
    fn start_pins(&mut self, gid: GroupId, reads: Vec<(crate::protocol::KvRequest, Waiter)>) {
        for (request, waiter) in reads {
            let crate::protocol::ClientCommand::Pin {
                start,
                end,
                split_bytes,
                shards,
            } = request.command
            else {
                unreachable!("only pins are handed back by serve_reads");
            };
            // Holders of released pins end at once; this bounds the
            // threads even if pins are released faster than that.
            if self.pin_tasks.len() >= 2 * self.pins.max().max(1) {
                waiter.send(KvResponse::Busy);
                continue;
            }
            let admitted = self.pins.admit(
                gid,
                shards.clone(),
                start.clone(),
                end.clone(),
                Instant::now(),
            );
            let Ok(admitted) = admitted else {
                waiter.send(KvResponse::Refused {
                    reason: format!(
                        "node {} holds {} pins, the most it may (PINS_MAX, NodeConfig::pins_max); unpin some or let idle ones expire",
                        self.config.id,
                        self.pins.len()
                    ),
                });
                continue;
            };
            let static_shards = self.groups.get(&gid).map_or_else(Vec::new, |g| {
                shards
                    .iter()
                    .copied()
                    .filter(|s| g.static_shards.contains(s))
                    .collect()
            });
            let pin = admitted.pin;
            let first_shard = shards[0];
            let spec = PinSpec {
                pin,
                node: self.config.id,
                group: gid,
                shards,
                static_shards,
                start,
                end,
                split_bytes,
            };
            let engine = self.engine.clone();
            let work = move || pins::hold(engine, spec, waiter, admitted);
            if self.config.blocking_io {
                self.pin_tasks.spawn_blocking(work);
                continue;
            }
            // A holder lives for minutes, and tokio's paused test clock
            // does not auto-advance while a `spawn_blocking` task runs: a
            // thread of its own, joined once released (`pins::PinWork`).
            let spawned = std::thread::Builder::new()
                .name(format!("pin-{}", self.config.id))
                .spawn(work);
            match spawned {
                Ok(thread) => self.pins.set_thread(pin, thread),
                Err(e) => {
                    // The waiter went with the closure: the caller sees a
                    // lost reply and retries.
                    tracing::warn!(node = self.config.id, error = %e, "no thread for a pin holder");
                    self.pins.release(pin, gid, first_shard);
                }
            }
        }
    }

    /// Runs the blocking work the pins queued ([`pins::PinWork`]) in the
    /// pin task set.
    fn run_pin_work(&mut self) {
        for work in self.pins.take_work() {
            self.pin_tasks.spawn_blocking(move || work.run());
        }
    }

    /// This node's view of its groups, for [`RpcRequest::Status`].
    fn report(&self) -> NodeReport {
        NodeReport {
            id: self.config.id,
            pid: std::process::id(),
            blocked: self.transport.fault_filter(),
            groups: self
                .groups
                .iter()
                .map(|(gid, g)| GroupReport {
                    group: *gid,
                    role: g.raw.role(),
                    term: g.raw.term(),
                    leader: g.raw.leader_id(),
                    commit: g.raw.commit_index(),
                    applied: g.raw.applied_index(),
                    last: g.raw.last_index().unwrap_or(Index::MAX),
                    voters: g.raw.conf_state().voters.clone(),
                    learners: g.raw.conf_state().learners.clone(),
                    matched: g
                        .raw
                        .conf_state()
                        .members()
                        .filter(|&m| m != self.config.id)
                        .filter_map(|m| g.raw.progress(m).map(|p| (m, p.match_index)))
                        .collect(),
                })
                .collect(),
        }
    }

    /// Runs an admin request for `from`: only the admin client may, and
    /// only where the transport enables fault injection. A refusal changes
    /// nothing.
    fn admin(
        &self,
        from: &shoal_net::Peer,
        work: impl FnOnce(&T) -> Result<(), shoal_net::FaultFilterError>,
    ) -> Response {
        if !from.is_admin() {
            tracing::warn!(
                node = self.config.id,
                ?from,
                "admin request from a non-admin refused"
            );
            return Response::Denied(Denied::NotAdmin);
        }
        match work(&self.transport) {
            Ok(()) => Response::AdminDone,
            Err(shoal_net::FaultFilterError::Disabled) => {
                Response::Denied(Denied::FaultInjectionDisabled)
            }
            Err(_) => Response::Denied(Denied::Unsupported),
        }
    }

    /// Carries out queued `HostGroup` / `DropGroup` requests, proposes
    /// queued writes and reads, then runs `Ready` rounds until no group has
    /// anything more (or [`READY_ROUNDS_MAX`]).
    async fn round(&mut self) -> Result<(), NodeError> {
        // Between rounds no group has a `Ready` in hand: a group can join
        // or leave the loop here.
        for (admin, reply) in std::mem::take(&mut self.queued_admin) {
            let response = match admin {
                GroupAdmin::Host { group, voters } => self.host_group(group, voters).await?,
                GroupAdmin::Drop { group, removed } => self.drop_group(group, removed).await?,
            };
            let _ = reply.send(response);
        }
        for group in self.groups.values_mut() {
            group.propose_queued(&mut self.next_read_context)?;
        }
        for _ in 0..READY_ROUNDS_MAX {
            if !self.groups.values().any(|g| g.raw.has_ready()) {
                break;
            }
            self.ready_round().await?;
        }
        let mut deposed = Vec::new();
        for (gid, group) in &mut self.groups {
            let waiters_failed = group.check_leadership();
            if group.leadership_ended() || waiters_failed {
                deposed.push(*gid);
            }
        }
        for gid in deposed {
            self.stop_transfers(gid);
        }
        self.run_pin_work();
        self.sync_if_due().await?;
        self.publish_status();
        Ok(())
    }

    /// Starts hosting `group` with `voters` (see [`hosting`]): checks the
    /// request, records the group and its membership in one synced write,
    /// opens it (off the loop) and adds it to the loop.
    async fn host_group(
        &mut self,
        group: GroupId,
        voters: Vec<NodeId>,
    ) -> Result<Response, NodeError> {
        let current = self
            .groups
            .get(&group)
            .map(|g| g.raw.conf_state().voters.clone());
        let voters = match hosting::check_host(
            self.config.id,
            group,
            &voters,
            current.as_deref(),
            self.groups.len(),
        ) {
            Ok(HostDecision::AlreadyHosted) => return Ok(Response::AdminDone),
            Ok(HostDecision::Host { voters }) => voters,
            Ok(HostDecision::Join) => Vec::new(),
            Err(refusal) => return Ok(Response::GroupRefused(refusal)),
        };
        let config = self.config.clone();
        let spec = GroupSpec {
            group,
            static_shards: Vec::new(),
            voters: voters.clone(),
        };
        let opened = self
            .with_engine(move |engine| {
                let err = engine_err(group);
                if engine.group_dropped(group).map_err(&err)? {
                    return Ok(Err(GroupRefusal::Dropped));
                }
                // State left by a static group no longer configured: only
                // its own membership may host it.
                let mut stored = engine.group_state(group).map_err(&err)?.conf_state.voters;
                stored.sort_unstable();
                if !stored.is_empty() && stored != voters {
                    return Ok(Err(GroupRefusal::OtherVoters { voters: stored }));
                }
                engine.host_group(group, &voters).map_err(&err)?;
                let join = voters.is_empty();
                Self::open_group(&config, engine, &spec, join).map(Ok)
            })
            .await?;
        match opened {
            Ok(opened) => {
                let voters = &opened.raw.conf_state().voters;
                tracing::info!(node = self.config.id, group, ?voters, "hosting a group");
                self.groups.insert(group, opened);
                Ok(Response::AdminDone)
            }
            Err(refusal) => Ok(Response::GroupRefused(refusal)),
        }
    }

    /// Stops hosting `group` and deletes its replica (see [`hosting`]): out
    /// of the loop first, its waiters answered `UnknownGroup`, then one
    /// synced engine write, then its files off the loop. `removed`: the
    /// node was removed from the group ([`hosting::check_drop_removed`]
    /// instead of [`hosting::check_drop`]).
    async fn drop_group(&mut self, group: GroupId, removed: bool) -> Result<Response, NodeError> {
        if self.config.groups.iter().any(|s| s.group == group) {
            return Ok(Response::GroupRefused(GroupRefusal::Static));
        }
        let Some(g) = self.groups.get(&group) else {
            let dropped = self
                .with_engine(move |engine| engine.group_dropped(group).map_err(engine_err(group)))
                .await?;
            return Ok(if dropped {
                Response::AdminDone
            } else {
                Response::GroupRefused(GroupRefusal::NotHosted)
            });
        };
        let last = g.raw.last_index().map_err(consensus_err(group))?;
        let check = if removed {
            hosting::check_drop_removed(g.raw.is_leader())
        } else {
            hosting::check_drop(&g.static_shards, &g.records, g.raw.applied_index(), last)
        };
        if let Err(refusal) = check {
            return Ok(Response::GroupRefused(refusal));
        }
        let mut dropped = self.groups.remove(&group).expect("checked above");
        dropped.fail_waiters(&|| KvResponse::UnknownGroup);
        dropped.metrics.retire();
        drop(dropped);
        self.pins.release_group(group);
        self.stop_transfers(group);
        self.prune_received_through(group, Index::MAX);
        self.with_engine(move |engine| engine.drop_group(group).map_err(engine_err(group)))
            .await?;
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        let root = self.config.snapshot_dir.clone();
        self.prune(move || hosting::remove_group_dirs(&root, group));
        tracing::info!(node = self.config.id, group, "dropped a group");
        Ok(Response::AdminDone)
    }

    /// Takes a replica that cannot go on out of the loop (its data stays):
    /// its waiters are answered, its transfers stopped, its status gone.
    /// The node and its other groups carry on; a restart tries again.
    fn stop_replica(&mut self, group: GroupId, error: &NodeError) {
        tracing::error!(
            node = self.config.id,
            group,
            error = %error,
            "this replica stops; the node and its other groups carry on"
        );
        if let Some(mut g) = self.groups.remove(&group) {
            g.fail_waiters(&|| KvResponse::UnknownGroup);
            g.metrics.retire();
        }
        self.pins.release_group(group);
        self.stop_transfers(group);
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }

    /// Stops `group`'s snapshot transfers: a deposed leader sends nothing
    /// more on behalf of its old term.
    fn stop_transfers(&mut self, group: GroupId) {
        self.transfers.retain(|(g, _), transfer| {
            if *g == group {
                transfer.task.abort();
                false
            } else {
                true
            }
        });
        self.prune_exports(group);
    }

    async fn ready_round(&mut self) -> Result<(), NodeError> {
        let mut readies = Vec::new();
        for (gid, group) in &mut self.groups {
            if group.raw.has_ready() {
                readies.push((*gid, group.raw.ready().map_err(consensus_err(*gid))?));
            }
        }
        // Messages that do not depend on this round's write go out now.
        for (gid, ready) in &mut readies {
            for message in std::mem::take(&mut ready.messages) {
                self.send_message(*gid, message);
            }
        }
        for (gid, ready) in &readies {
            if let Some(snapshot) = &ready.snapshot {
                self.install(*gid, snapshot).await?;
            }
        }
        // One synced write for every group.
        let mut batch = LogBatch::default();
        for (gid, ready) in &readies {
            if ready.snapshot.is_some() || !ready.entries.is_empty() || ready.hard_state.is_some() {
                batch.groups.push(GroupWrite {
                    group: *gid,
                    snapshot: ready.snapshot.clone(),
                    entries: ready.entries.clone(),
                    hard_state: ready.hard_state,
                    conf_state: None,
                });
            }
        }
        if !batch.groups.is_empty() {
            self.persist(batch).await?;
        }
        for (gid, ready) in &mut readies {
            for message in std::mem::take(&mut ready.persisted_messages) {
                self.send_message(*gid, message);
            }
        }
        // Apply, answer, serve reads, advance.
        for (gid, ready) in readies {
            // Applying is unsynced CPU work (memtable inserts and a buffered
            // WAL append), short next to the synced log write, so it runs
            // inline: a hop to the blocking pool and back would cost more
            // than the apply itself. (Ingesting a moved shard's files is
            // the exception; see `apply_shard`.)
            match self.apply_committed(gid, &ready.committed_entries).await {
                Ok(()) => {
                    if let Some(group) = self.groups.get(&gid) {
                        group.metrics.applied(ready.committed_entries.len());
                    }
                }
                Err(e @ NodeError::ShardInstall { .. }) => {
                    self.stop_replica(gid, &e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let group = self
                .groups
                .get_mut(&gid)
                .expect("a group with a Ready exists");
            let applied = ready
                .committed_entries
                .last()
                .map(|e| e.index)
                .unwrap_or_else(|| group.raw.applied_index());
            for rs in &ready.read_states {
                if let Some(waiting) = group.reads_unconfirmed.remove(&rs.context) {
                    group.reads_confirmed.push((rs.index, waiting));
                }
            }
            group.raw.advance(ready).map_err(consensus_err(gid))?;
            let pins = group.serve_reads(&self.engine, applied.max(group.raw.applied_index()));
            self.start_pins(gid, pins);
            self.maybe_compact(gid)?;
            self.maybe_start_fenced_export(gid);
        }
        Ok(())
    }

    /// Applies committed entries of `gid` in log order: runs of request
    /// entries through one [`Engine::apply`] each, a request on a shard the
    /// group does not serve (as of the entries before it) answered
    /// `WrongGroup` without applying, and each shard step on its own.
    async fn apply_committed(
        &mut self,
        gid: GroupId,
        entries: &[shoal_consensus::Entry],
    ) -> Result<(), NodeError> {
        let mut run = Vec::new();
        let mut kept = Vec::new();
        for e in entries {
            if e.kind == shoal_consensus::EntryKind::ConfigChange {
                self.apply_run(gid, std::mem::take(&mut run), std::mem::take(&mut kept))?;
                self.apply_membership(gid, e)?;
                continue;
            }
            match decode_entry(gid, e.index, e.kind, &e.data) {
                Entry::Requests(requests) => {
                    let group = &self.groups[&gid];
                    let served: Vec<bool> =
                        requests.iter().map(|r| group.serves(r.shard)).collect();
                    let requests = requests
                        .into_iter()
                        .zip(&served)
                        .filter(|(_, s)| **s)
                        .map(|(r, _)| r)
                        .collect();
                    run.push(ApplyEntry {
                        index: e.index,
                        term: e.term,
                        requests,
                    });
                    kept.push(served);
                }
                Entry::Shard(command) => {
                    self.apply_run(gid, std::mem::take(&mut run), std::mem::take(&mut kept))?;
                    self.apply_shard(gid, e.index, e.term, command).await?;
                }
            }
        }
        self.apply_run(gid, run, kept)
    }

    /// Applies a membership change (see `shoal_engine::membership`): the
    /// membership it results in and the added member's address are stored
    /// with the applied index, the transport learns the address, and the
    /// caller that proposed it is answered. (The consensus core runs with
    /// the change since it entered the log.)
    fn apply_membership(
        &mut self,
        gid: GroupId,
        e: &shoal_consensus::Entry,
    ) -> Result<(), NodeError> {
        let change = match shoal_consensus::ConfChange::decode(&e.data) {
            Ok(c) => c,
            // Written only by the core and checksummed by the engine (see
            // `decode_entry`): applying around it would diverge replicas.
            Err(err) => panic!(
                "group {gid}: committed entry {} does not decode: {err}",
                e.index
            ),
        };
        let addr = (change.kind == shoal_consensus::ConfChangeKind::AddLearner)
            .then(|| String::from_utf8_lossy(&change.context).into_owned())
            .filter(|a| !a.is_empty());
        let at = AppliedState {
            index: e.index,
            term: e.term,
        };
        self.engine
            .apply_conf_change(
                gid,
                at,
                &change.conf_after,
                addr.as_deref().map(|a| (change.node, a)),
            )
            .map_err(engine_err(gid))?;
        if let Some(a) = addr.as_deref().and_then(|a| member_addr(a).ok()) {
            self.transport
                .set_member_addr(shoal_net::NodeId(change.node), a);
        }
        tracing::info!(
            node = self.config.id,
            group = gid,
            index = e.index,
            kind = ?change.kind,
            member = change.node,
            conf = ?change.conf_after,
            "membership change applied"
        );
        // A log cut without an export (a group of one never exports) has
        // no snapshot to send a new member: export one.
        let truncated = self
            .engine
            .first_index(gid)
            .map_err(engine_err(gid))?
            .saturating_sub(1);
        if let Some(group) = self.groups.get_mut(&gid) {
            if truncated > group.snapshot_index {
                group.export_pending = true;
            }
        }
        let reply = KvResponse::Member(MemberReply::Done {
            voters: change.conf_after.voters,
            learners: change.conf_after.learners,
        });
        if let Some(group) = self.groups.get_mut(&gid) {
            group.answer_applied(e.index, e.term, vec![reply]);
        }
        Ok(())
    }

    /// Applies request entries and answers their callers; `served[i][j]`
    /// says whether entry i's request j is in `run` (else it is answered
    /// `WrongGroup`).
    fn apply_run(
        &mut self,
        gid: GroupId,
        run: Vec<ApplyEntry>,
        served: Vec<Vec<bool>>,
    ) -> Result<(), NodeError> {
        if run.is_empty() {
            return Ok(());
        }
        let replies = self.engine.apply(gid, &run).map_err(engine_err(gid))?;
        let now = Instant::now();
        let group = self.groups.get_mut(&gid).expect("group exists");
        if !group.precopies.is_empty() {
            for request in run.iter().flat_map(|e| &e.requests) {
                if let Some(p) = group.precopies.get_mut(&request.shard) {
                    p.note(&request.command);
                }
            }
        }
        for ((entry, replies), served) in run.iter().zip(replies).zip(served) {
            for (request, reply) in entry.requests.iter().zip(&replies) {
                track_session(&mut group.sessions, request, reply, now);
            }
            let mut replies = replies.into_iter();
            let answers = served
                .into_iter()
                .map(|s| match s.then(|| replies.next()).flatten() {
                    Some(reply) => KvResponse::Done(reply),
                    None => KvResponse::WrongGroup,
                })
                .collect();
            group.answer_applied(entry.index, entry.term, answers);
        }
        Ok(())
    }

    /// Applies one shard move step (see [`moves`]): decides its effect from
    /// the group's records, stores it with the applied index, and answers
    /// its caller (a freeze that took effect once its files are shipped).
    async fn apply_shard(
        &mut self,
        gid: GroupId,
        index: Index,
        term: Term,
        command: ShardCommand,
    ) -> Result<(), NodeError> {
        let at = AppliedState { index, term };
        let decision = {
            let group = &self.groups[&gid];
            moves::decide(gid, &command, |s| group.record_of(s))
        };
        let err = engine_err(gid);
        let mut changed: Vec<(ShardId, ShardRecord)> = Vec::new();
        match decision.effect {
            Effect::None => {
                self.engine
                    .apply(
                        gid,
                        &[ApplyEntry {
                            index,
                            term,
                            requests: Vec::new(),
                        }],
                    )
                    .map_err(&err)?;
            }
            Effect::Record {
                shard,
                record,
                clear,
            } => {
                self.engine
                    .apply_shard_changes(gid, at, &[(shard, record, clear)])
                    .map_err(&err)?;
                changed.push((shard, record));
            }
            Effect::Create { shards, record } => {
                let changes: Vec<_> = shards.iter().map(|&s| (s, record, true)).collect();
                self.engine
                    .apply_shard_changes(gid, at, &changes)
                    .map_err(&err)?;
                changed.extend(shards.into_iter().map(|s| (s, record)));
            }
            Effect::Ingest { shard, record } => {
                let ShardCommand::Install { num, manifest, .. } = &command else {
                    unreachable!("only an install ingests")
                };
                let dir = moves::incoming_dir(
                    &self.config.snapshot_dir,
                    gid,
                    shard,
                    *num,
                    moves::export_id(manifest),
                );
                let expected = manifest.clone();
                let num = *num;
                let root = self.config.snapshot_dir.clone();
                let checked =
                    precopy::checked_files(&root, (gid, shard, num), &dir, manifest, &self.placed);
                self.with_engine(move |engine| {
                    precopy::link_precopied(&root, (gid, shard, num), &dir, &expected);
                    let shipped = shoal_engine::snapshot::read_manifest(&dir)
                        .map_err(|e| files_err(gid)(e.into()))?;
                    if shipped != expected {
                        return Err(files_err(gid)(SnapshotFileError::NotShipped { dir }));
                    }
                    let verified = precopy::still_checked(&dir, &checked);
                    let started = std::time::Instant::now();
                    let manifest = engine
                        .install_shard_verified(gid, at, shard, record, &dir, &verified)
                        .map_err(engine_err(gid))?;
                    tracing::info!(
                        group = gid,
                        shard,
                        num,
                        bytes = manifest.size_bytes(),
                        files = manifest.files.len(),
                        verified_before = verified.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "shard installed"
                    );
                    Ok(())
                })
                .await
                .map_err(|e| NodeError::ShardInstall {
                    group: gid,
                    shard,
                    num,
                    source: Box::new(e),
                })?;
                changed.push((shard, record));
            }
        }
        let now = Instant::now();
        for (shard, record) in changed {
            let known = if record.status == ShardStatus::Serving {
                self.engine.sessions(gid, shard).map_err(&err)?
            } else {
                Vec::new()
            };
            let group = self.groups.get_mut(&gid).expect("group exists");
            group.records.insert(shard, record);
            group.sessions.reload(shard, known, now);
        }
        let group = self.groups.get_mut(&gid).expect("group exists");
        // A freeze ends the pre-copies of its shard up to its config: the
        // one it ships on top of, and any older one.
        let precopy = match &command {
            ShardCommand::Freeze { shard, num, .. }
                if group.precopies.get(shard).is_some_and(|p| p.num <= *num) =>
            {
                group.precopies.remove(shard)
            }
            _ => None,
        };
        let precopy = precopy.and_then(|mut p| {
            // Callers of a pre-copy still running: the freeze overtook it
            // (and exports the whole shard); nothing is left to wait for.
            for w in std::mem::take(&mut p.waiters) {
                w.send(KvResponse::Shard(ShardReply::Done));
            }
            p.base.is_some().then_some(p)
        });
        let Some(waiters) = group.take_waiters(index, term) else {
            return Ok(());
        };
        if let (
            ShardCommand::Freeze {
                shard,
                num,
                to_group,
                to_nodes,
            },
            ShardReply::Done,
        ) = (&command, &decision.reply)
        {
            let frozen = ShardRecord {
                num: *num,
                status: ShardStatus::Frozen,
            };
            if group.record_of(*shard) == frozen {
                // One ship per shard and config at a time: a repeated
                // freeze (a controller whose call timed out while a large
                // shard shipped) waits for the ship that runs.
                let key = (gid, *shard, *num);
                if let Some(waiting) = self.shipping.get_mut(&key) {
                    waiting.extend(waiters);
                    return Ok(());
                }
                self.shipping.insert(key, waiters);
                let delta = precopy.and_then(|p| p.delta_for(*num, *to_group));
                self.ship(
                    gid,
                    (*shard, *num, index),
                    *to_group,
                    to_nodes.clone(),
                    delta,
                );
                return Ok(());
            }
        }
        for w in waiters {
            w.send(KvResponse::Shard(decision.reply.clone()));
        }
        Ok(())
    }

    /// Exports a frozen shard for its new group and ships the files to
    /// every node of it, in a task; the freeze's callers (in
    /// `self.shipping`) are answered when it is done ([`Done::Shipped`]).
    /// `index` is the freeze's log index (see [`moves::outgoing_dir`]).
    /// With `delta` (a pre-copy's shipped export and the keys written
    /// since), only those keys and the sessions are exported and shipped
    /// ([`precopy`]); otherwise the whole shard.
    fn ship(
        &mut self,
        gid: GroupId,
        (shard, num, index): (ShardId, u64, Index),
        to_group: GroupId,
        to_nodes: Vec<NodeId>,
        delta: Option<(SnapshotManifest, Vec<bytes::Bytes>)>,
    ) {
        let engine = self.engine.clone();
        let transport = self.transport.clone();
        let root = self.config.snapshot_dir.clone();
        let me = self.config.id;
        let blocking = self.config.blocking_io;
        self.tasks.spawn(async move {
            let dir = moves::outgoing_dir(&root, gid, shard, num, index);
            let result = snapshots::export_and_ship(
                &engine,
                &transport,
                (me, &root, blocking),
                &dir,
                (to_group, shard, num),
                &to_nodes,
                move |engine, dir| match delta {
                    Some((base, keys)) => {
                        let name = precopy::base_file_name(moves::export_id(&base));
                        tracing::info!(
                            node = me,
                            group = gid,
                            shard,
                            num,
                            keys = keys.len(),
                            "exporting what changed since the pre-copy"
                        );
                        engine.export_shard_delta(gid, shard, to_group, dir, &base, &name, &keys)
                    }
                    None => engine.export_shard(gid, shard, to_group, dir),
                },
            )
            .await;
            Done::Shipped {
                group: gid,
                shard,
                num,
                result,
            }
        });
    }

    /// A pre-copy asked of a group this node leads (see [`precopy`]):
    /// starts one unless the shard is not served here below the step's
    /// config (nothing to copy: `Done`, or `Stale` for a newer config) or
    /// one for the same move runs or is done (the caller waits for it).
    fn on_precopy(&mut self, request: ShardRequest, reply: Waiter) {
        let ShardCommand::Precopy {
            shard,
            num,
            to_group,
            ref to_nodes,
        } = request.command
        else {
            unreachable!("only a pre-copy comes here")
        };
        let Some((group, reply)) = leading_group(&mut self.groups, request.group, reply) else {
            return;
        };
        let record = group.record_of(shard);
        if record.num > num {
            reply.send(KvResponse::Shard(ShardReply::Stale { num: record.num }));
            return;
        }
        if record.status != ShardStatus::Serving || record.num == num {
            reply.send(KvResponse::Shard(ShardReply::Done));
            return;
        }
        if let Some(p) = group.precopies.get_mut(&shard) {
            if p.num == num && p.to_group == to_group {
                if p.base.is_some() {
                    reply.send(KvResponse::Shard(ShardReply::Done));
                } else {
                    p.waiters.push(reply);
                }
                return;
            }
        }
        if group.precopies.len() >= precopy::PRECOPIES_PER_GROUP_MAX
            && !group.precopies.contains_key(&shard)
        {
            // Not retried: the move goes on without it.
            reply.send(KvResponse::Shard(ShardReply::Refused {
                reason: format!(
                    "{} pre-copies run in group {} already",
                    precopy::PRECOPIES_PER_GROUP_MAX,
                    request.group
                ),
            }));
            return;
        }
        // The record first: it notes every write applied from now on, so
        // it covers whatever the export's view (taken later) lacks.
        self.next_precopy += 1;
        let id = self.next_precopy;
        if let Some(old) = group
            .precopies
            .insert(shard, precopy::Precopy::new(id, num, to_group, reply))
        {
            for w in old.waiters {
                w.send(KvResponse::Shard(ShardReply::Done));
            }
        }
        let gid = request.group;
        let to_nodes = to_nodes.clone();
        let engine = self.engine.clone();
        let transport = self.transport.clone();
        let root = self.config.snapshot_dir.clone();
        let me = self.config.id;
        let blocking = self.config.blocking_io;
        self.tasks.spawn(async move {
            // Index 0: no freeze is at index 0, so no freeze's export
            // shares this directory.
            let dir = moves::outgoing_dir(&root, gid, shard, num, 0);
            let result = snapshots::export_and_ship(
                &engine,
                &transport,
                (me, &root, blocking),
                &dir,
                (to_group, shard, num),
                &to_nodes,
                move |engine, dir| engine.export_shard_base(gid, shard, to_group, dir),
            )
            .await;
            Done::Precopied {
                group: gid,
                shard,
                id,
                result,
            }
        });
    }

    /// A shard move step for a group this node leads, queued for the next
    /// round's proposal. An install that ingests is proposed only with its
    /// files here (the freeze shipped them to every node of the group), so
    /// no replica applies one it cannot carry out, and on every member (see
    /// below). Whether they are here is read off the loop: `checked` is
    /// that answer (`None` before the check). The files themselves are
    /// verified when ingested. An install this group has done, or one a
    /// newer config has overtaken, ingests nothing (record numbers only
    /// grow): it goes to the log without its files, whose directory may be
    /// pruned already, and is answered `Done` or `Stale` there.
    fn on_shard_step(&mut self, request: ShardRequest, reply: Waiter, checked: Option<bool>) {
        let Some((group, reply)) = leading_group(&mut self.groups, request.group, reply) else {
            return;
        };
        if let ShardCommand::Install {
            shard,
            num,
            manifest,
        } = &request.command
        {
            let (shard, num) = (*shard, *num);
            let record = group.record_of(shard);
            let ingests =
                record.num < num || (record.num == num && record.status != ShardStatus::Serving);
            if ingests {
                let for_here = manifest.scope
                    == (shoal_engine::SnapshotScope::Shard {
                        shard,
                        target: request.group,
                    });
                if !for_here {
                    // No shipping can make this token usable.
                    reply.send(KvResponse::Shard(ShardReply::Refused {
                        reason: format!(
                            "the manifest is not an export of shard {shard} for group {}",
                            request.group
                        ),
                    }));
                    return;
                }
                let export = moves::export_id(manifest);
                let Some(shipped) = checked else {
                    let dir = moves::incoming_dir(
                        &self.config.snapshot_dir,
                        request.group,
                        shard,
                        num,
                        export,
                    );
                    let manifest = manifest.clone();
                    let root = self.config.snapshot_dir.clone();
                    let at = (request.group, shard, num);
                    self.run_blocking(move || {
                        precopy::link_precopied(&root, at, &dir, &manifest);
                        Done::InstallChecked {
                            shipped: moves::files_in_place(&dir, &manifest),
                            request,
                            reply,
                        }
                    });
                    return;
                };
                // The freeze is answered once every receiver's transport
                // has stored the files, but this loop files them into the
                // incoming directory later, off the loop, one task per
                // file: an install can overtake them. So missing files are
                // `Busy`, which the controller retries, not a refusal,
                // which would fail the whole change. (Files lost by a
                // crash before they were filed make those retries run out;
                // the next recovery freezes again, which ships them again.)
                if !shipped {
                    tracing::info!(
                        node = self.config.id,
                        shard,
                        num,
                        "install before its files are in place: busy"
                    );
                    reply.send(KvResponse::Busy);
                    return;
                }
                // Every replica ingests the files when it applies the
                // install: members the freeze did not ship to get this
                // leader's copy first (one forward per export at a time;
                // the controller retries `Busy`).
                let key = (request.group, shard, num, export);
                let missing = moves::install_files_missing(
                    group.raw.conf_state().members(),
                    self.config.id,
                    &request.holders,
                    &self.forwards.forwarded(&key),
                );
                if !missing.is_empty() {
                    if self.forwards.start(key) {
                        self.forward_install(key, missing);
                    }
                    reply.send(KvResponse::Busy);
                    return;
                }
            }
        }
        group.queued_shard.push((request.command, reply));
    }

    /// Forwards the files of an install (export `key`) that this leader
    /// holds to members of its group the freeze did not ship to, in a task
    /// ([`Done::Forwarded`]).
    fn forward_install(&mut self, key: moves::ExportKey, to: Vec<NodeId>) {
        let transport = self.transport.clone();
        let root = self.config.snapshot_dir.clone();
        let me = self.config.id;
        self.tasks.spawn(async move {
            let (group, shard, num, export) = key;
            let dir = moves::incoming_dir(&root, group, shard, num, export);
            let result = snapshots::ship(&transport, me, &root, &dir, key, &to).await;
            Done::Forwarded { key, to, result }
        });
    }

    /// Persists a round's log write: synced unless only commit indexes
    /// moved, split if it outgrows the engine's batch limit.
    async fn persist(&mut self, batch: LogBatch) -> Result<(), NodeError> {
        let durable: BTreeMap<GroupId, (Term, NodeId)> = self
            .groups
            .iter()
            .map(|(gid, g)| (*gid, g.durable_term_vote))
            .collect();
        let mode = persist::sync_mode(&batch, &durable, self.config.log_sync_window_ms.is_some());
        let term_votes: Vec<(GroupId, (Term, NodeId))> = batch
            .groups
            .iter()
            .filter_map(|g| g.hard_state.map(|hs| (g.group, (hs.term, hs.vote))))
            .collect();
        let first = batch.groups[0].group;
        let batches = persist::split_batch(batch, self.engine.config().batch_bytes_max);
        if mode == persist::SyncMode::Now {
            self.with_engine(move |engine| {
                batches
                    .into_iter()
                    .try_for_each(|b| engine.write_log(b))
                    .map_err(engine_err(first))
            })
            .await?;
            // One ordered WAL: every earlier unsynced write is durable too.
            self.unsynced_since = None;
            for (gid, term_vote) in term_votes {
                if let Some(g) = self.groups.get_mut(&gid) {
                    g.durable_term_vote = term_vote;
                }
            }
        } else {
            batches
                .into_iter()
                .try_for_each(|b| self.engine.write_log_unsynced(b))
                .map_err(engine_err(first))?;
            if mode == persist::SyncMode::Deferred {
                self.unsynced_since
                    .get_or_insert_with(std::time::Instant::now);
            }
        }
        Ok(())
    }

    /// Syncs the log writes deferred by a sync window once it has passed.
    async fn sync_if_due(&mut self) -> Result<(), NodeError> {
        let Some(window_ms) = self.config.log_sync_window_ms else {
            return Ok(());
        };
        let window = Duration::from_millis(window_ms);
        if persist::sync_due(self.unsynced_since, std::time::Instant::now(), window) {
            self.sync_deferred().await?;
        }
        Ok(())
    }

    /// Syncs every log write so far (those a sync window deferred).
    async fn sync_deferred(&mut self) -> Result<(), NodeError> {
        self.with_engine(|engine| engine.sync().map_err(engine_err(KV_GROUP)))
            .await?;
        self.unsynced_since = None;
        Ok(())
    }

    /// Sends a consensus message; a `Snapshot` goes after its files (see
    /// the module docs), from a task stopped if leadership is lost.
    fn send_message(&mut self, group: GroupId, message: Message) {
        let to = shoal_net::NodeId(message.to);
        let MessageBody::Snapshot { snapshot } = &message.body else {
            self.transport.send(to, PeerMessage { group, message });
            return;
        };
        let index = snapshot.meta.index;
        let dir = export_dir(&self.config.snapshot_dir, group, index);
        let transport = self.transport.clone();
        let peer = message.to;
        if let Some(previous) = self.transfers.remove(&(group, peer)) {
            previous.task.abort();
        }
        let transfer = self.next_transfer;
        self.next_transfer += 1;
        let handle = self.tasks.spawn(async move {
            let delivered = snapshots::transfer(&transport, peer, &dir, group, index).await;
            if delivered {
                transport.send(to, PeerMessage { group, message });
            }
            Done::Transferred {
                group,
                peer,
                transfer,
                delivered,
            }
        });
        self.transfers.insert(
            (group, peer),
            Transfer {
                number: transfer,
                index,
                task: handle,
            },
        );
    }

    /// Notes a received snapshot file under its (group, index, sender); it
    /// is moved into place by the verification of that snapshot, so the
    /// move and the check run in order and off the loop.
    fn on_file(&mut self, mut file: ReceivedFile<SnapshotFileMeta>) {
        // Answered below for a moving shard's file (the only kind that
        // asks); any other drops it unanswered, which is fine for them.
        let ack = std::mem::take(&mut file.ack);
        let meta = &file.meta;
        telemetry::snapshot_received(telemetry::snapshot_kind(meta.shard.is_some()), file.bytes);
        if let Some((shard, num)) = meta.shard {
            // A moving shard's file for a group hosted here: into its
            // incoming directory (off the loop), where the install finds it.
            if !snapshots::file_name_ok(&meta.name) || !self.groups.contains_key(&meta.group) {
                tracing::warn!(node = self.config.id, from = %file.from, name = %meta.name, group = meta.group, "unexpected shard file dropped");
                let _ = std::fs::remove_file(&file.path);
                ack.failed(format!(
                    "node {} does not take shard file {:?} for group {}",
                    self.config.id, meta.name, meta.group
                ));
                return;
            }
            let dir = moves::incoming_dir(
                &self.config.snapshot_dir,
                meta.group,
                shard,
                num,
                meta.index,
            );
            let files = vec![(file.path, meta.name.clone())];
            let node = self.config.id;
            let placed = dir.join(&meta.name);
            self.run_blocking(move || {
                if let Err(e) = snapshots::file_into_place(&files, &dir) {
                    tracing::warn!(node, error = %e, "could not store a shipped shard file");
                    ack.failed(format!("node {node} could not store the file: {e}"));
                    return Done::Placed { checked: None };
                }
                // Checked here, as it arrives, so that the install (while
                // the shard refuses writes) need not read it again; before
                // the transfer counts as done, so that a pre-copy is over
                // only once every destination has read its file (else the
                // install, on a slow replica, reads it in its stead).
                let checked = precopy::Checked::of(&placed).map(|c| (placed, c));
                // In place and synced: only now is the transfer done.
                ack.stored();
                Done::Placed { checked }
            });
            return;
        }
        if !snapshots::file_name_ok(&meta.name) || !self.groups.contains_key(&meta.group) {
            tracing::warn!(node = self.config.id, from = %file.from, name = %meta.name, "unexpected bulk file dropped");
            let _ = std::fs::remove_file(&file.path);
            return;
        }
        let commit = self.groups[&meta.group].raw.commit_index();
        if meta.index <= commit {
            // Consensus would not restore it: the log already reaches past.
            let path = file.path;
            self.prune(move || {
                let _ = std::fs::remove_file(path);
            });
            return;
        }
        self.received
            .entry((meta.group, meta.index, file.from.0))
            .or_default()
            .push((file.path, meta.name.clone()));
    }

    /// Restores the state machine from the verified files of `snapshot`.
    async fn install(&mut self, gid: GroupId, snapshot: &Snapshot) -> Result<(), NodeError> {
        let group = self.groups.get_mut(&gid).expect("group exists");
        let index = snapshot.meta.index;
        // Consensus restores only a snapshot message it was given, and a
        // message above the commit index is stepped only once its files
        // verified, which recorded them at its index.
        let Some(dir) = group.verified.remove(&index) else {
            let node = self.config.id;
            panic!("node {node} group {gid}: restored snapshot {index} has no verified files");
        };
        group.verified.retain(|i, _| *i > index);
        let static_shards = group.static_shards.clone();
        let (manifest, records, sessions, addrs) = self
            .with_engine(move |engine| {
                let err = engine_err(gid);
                let manifest = engine.install_snapshot(&dir).map_err(&err)?;
                let records = engine.shard_records(gid).map_err(&err)?;
                let mut sessions = Vec::new();
                for (shard, record) in &records {
                    if record.status == ShardStatus::Serving {
                        sessions.push((*shard, engine.sessions(gid, *shard).map_err(&err)?));
                    }
                }
                for &shard in &static_shards {
                    sessions.push((shard, engine.sessions(gid, shard).map_err(&err)?));
                }
                // The snapshot carries the sender's address book.
                let addrs = engine.member_addrs().map_err(&err)?;
                Ok((manifest, records, sessions, addrs))
            })
            .await?;
        learn_member_addrs(&self.transport, self.config.id, addrs);
        let now = Instant::now();
        let group = self.groups.get_mut(&gid).expect("group exists");
        group.records = records;
        group.sessions = SessionTracker::default();
        // Their records missed the writes the snapshot brings.
        for (_, p) in std::mem::take(&mut group.precopies) {
            for w in p.waiters {
                w.send(KvResponse::Busy);
            }
        }
        for (shard, known) in sessions {
            group.sessions.reload(shard, known, now);
        }
        group.snapshot_index = index;
        group.snapshot_bytes = manifest.size_bytes();
        group.export_pending = true;
        group.snapshots_installed += 1;
        group.metrics.snapshot_installed();
        // Received files of this or older snapshots are no longer needed.
        self.prune_received_through(gid, index);
        Ok(())
    }

    /// Starts an export (off the loop) once the log outgrows the limit,
    /// after an install left no export to send on, or when a joining member
    /// waits for a newer snapshot than the last export.
    fn maybe_compact(&mut self, gid: GroupId) -> Result<(), NodeError> {
        let limit = self.config.max_raft_state_bytes.unwrap_or(u64::MAX);
        let log_bytes = self.engine.log_bytes(gid).map_err(engine_err(gid))?;
        let group = self.groups.get_mut(&gid).expect("group exists");
        let due = log_bytes > limit && group.raw.applied_index() > group.snapshot_index;
        // A member that joined with nothing waits for a snapshot taken at
        // or after the change that added it (see `RawNode::snapshot_wanted`).
        let wanted = group.raw.snapshot_wanted().is_some_and(|floor| {
            group.snapshot_index < floor && floor <= group.raw.applied_index()
        });
        if group.exporting || (!due && !wanted && !group.export_pending) {
            return Ok(());
        }
        let conf = group.raw.conf_state();
        if conf.voters == [self.config.id] && conf.learners.is_empty() {
            // A group of one (an embedded `Db`) never sends a snapshot:
            // cutting the log through the applied index is enough. The
            // applies before it are durable whenever the cut is (one
            // ordered write-ahead log). A member added later needs an
            // export first.
            group.export_pending = false;
            let applied = group.raw.applied_index();
            return self
                .engine
                .compact_log(gid, applied)
                .map_err(engine_err(gid));
        }
        group.exporting = true;
        group.export_pending = false;
        let engine = self.engine.clone();
        let root = self.config.snapshot_dir.clone();
        self.run_blocking(move || Done::Exported {
            group: gid,
            result: snapshots::export(&engine, &root, gid),
        });
        Ok(())
    }

    /// Runs engine work inline or on the blocking pool ([`NodeConfig::blocking_io`]).
    async fn with_engine<R: Send + 'static>(
        &self,
        work: impl FnOnce(&Engine<B>) -> Result<R, NodeError> + Send + 'static,
    ) -> Result<R, NodeError> {
        if self.config.blocking_io {
            let engine = self.engine.clone();
            match tokio::task::spawn_blocking(move || work(&engine)).await {
                Ok(r) => r,
                Err(e) => Err(NodeError::Task(format!("engine task failed: {e}"))),
            }
        } else {
            work(&self.engine)
        }
    }

    fn answer_all(&mut self, response: impl Fn() -> KvResponse) {
        for group in self.groups.values_mut() {
            group.fail_waiters(&response);
        }
    }

    /// Publishes every group's status (for [`NodeHandle::status`]) and
    /// updates its metrics (a few atomic stores per group).
    fn publish_status(&mut self) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        telemetry::groups(self.groups.len());
        for (gid, g) in &mut self.groups {
            let log_bytes = self.engine.log_bytes(*gid).unwrap_or(0);
            let observed = Observed {
                role: g.raw.role(),
                term: g.raw.term(),
                vote: g.raw.vote(),
                leader: g.raw.leader_id(),
                commit: g.raw.commit_index(),
            };
            g.metrics
                .observe(self.config.id, observed, g.raw.applied_index(), log_bytes);
            status.insert(
                *gid,
                GroupStatus {
                    role: Some(g.raw.role()),
                    term: g.raw.term(),
                    leader: g.raw.leader_id(),
                    commit: g.raw.commit_index(),
                    applied: g.raw.applied_index(),
                    log_bytes,
                    snapshot_index: g.snapshot_index,
                    snapshot_bytes: g.snapshot_bytes,
                    snapshots_installed: g.snapshots_installed,
                    sessions: g.sessions.len() as u64,
                },
            );
        }
    }
}

/// Keeps the session tracker in step with an applied request.
fn track_session(
    sessions: &mut SessionTracker,
    request: &Request,
    reply: &shoal_engine::Reply,
    now: Instant,
) {
    if let Command::ExpireSessions { sessions: expired } = &request.command {
        for &(client, seq) in expired {
            sessions.expired(request.shard, client, seq);
        }
    } else if updates_session(request, reply) {
        sessions.observe(request.shard, request.client, request.seq, now);
    }
}

/// Records an export as the snapshot `group` sends to followers and
/// compacts the log through it.
fn record_snapshot<B: Backend>(
    engine: &Engine<B>,
    group: GroupId,
    manifest: &SnapshotManifest,
    conf: shoal_consensus::ConfState,
) -> Result<(), NodeError> {
    let err = engine_err(group);
    let snapshot = Snapshot {
        meta: SnapshotMeta {
            index: manifest.applied.index,
            term: manifest.applied.term,
            conf_state: conf,
        },
        data: Bytes::new(),
    };
    engine.set_snapshot(group, snapshot).map_err(&err)?;
    engine
        .compact_log(group, manifest.applied.index)
        .map_err(&err)
}

/// A member's address as a change names it: `ip:port`. (Host names are not
/// resolved: the node's loop must not wait on a resolver.)
fn member_addr(addr: &str) -> Result<std::net::SocketAddr, String> {
    if addr.len() > shoal_engine::MEMBER_ADDR_BYTES_MAX {
        return Err(format!(
            "the address is {} bytes, over {}",
            addr.len(),
            shoal_engine::MEMBER_ADDR_BYTES_MAX
        ));
    }
    addr.parse()
        .map_err(|e| format!("the address {addr:?} is not ip:port: {e}"))
}

/// Tells the transport the addresses a freeze names for its destination's
/// nodes it has none for (see [`crate::protocol::ShardRequest::to_addrs`]):
/// only for nodes
/// among `to_nodes`, at most [`crate::controller::config::GROUP_MEMBERS_MAX`]
/// of them, each a valid `ip:port`; otherwise the reason it is refused.
fn learn_freeze_addrs<T: Transport<KvProtocol>>(
    transport: &T,
    to_nodes: &[NodeId],
    to_addrs: &[(NodeId, String)],
) -> Result<(), String> {
    let max = crate::controller::config::GROUP_MEMBERS_MAX;
    if to_addrs.len() > max {
        return Err(format!(
            "{} destination addresses, over {max}",
            to_addrs.len()
        ));
    }
    let mut parsed = Vec::with_capacity(to_addrs.len());
    for (node, addr) in to_addrs {
        if !to_nodes.contains(node) {
            return Err(format!(
                "an address for node {node}, which is not a destination node"
            ));
        }
        parsed.push((*node, member_addr(addr)?));
    }
    for (node, addr) in parsed {
        transport.add_member_addr_if_unknown(shoal_net::NodeId(node), addr);
    }
    Ok(())
}

/// Tells the transport the address of every member in `addrs` (the
/// engine's address book).
fn learn_member_addrs<T: Transport<KvProtocol>>(
    transport: &T,
    me: NodeId,
    addrs: BTreeMap<NodeId, String>,
) {
    for (id, addr) in addrs {
        match member_addr(&addr) {
            Ok(a) => transport.set_member_addr(shoal_net::NodeId(id), a),
            Err(reason) => {
                tracing::warn!(node = me, member = id, reason, "unusable member address")
            }
        }
    }
}

/// The group `gid` of `groups`, with `reply` handed back, if this node
/// leads it; otherwise `reply` is answered (`UnknownGroup`, or `NotLeader`
/// with the leader it knows) and None returned. For admin steps only the
/// leader proposes.
fn leading_group<B: Backend>(
    groups: &mut BTreeMap<GroupId, Group<B>>,
    gid: GroupId,
    reply: Waiter,
) -> Option<(&mut Group<B>, Waiter)> {
    let Some(group) = groups.get_mut(&gid) else {
        reply.send(KvResponse::UnknownGroup);
        return None;
    };
    if !group.raw.is_leader() {
        reply.send(KvResponse::NotLeader {
            leader_hint: group.raw.leader_id(),
        });
        return None;
    }
    Some((group, reply))
}

/// The highest log index `peer` is known to hold, if it can take over
/// leadership of `raw`'s group now: heard from within
/// [`PEER_HEARD_WITHIN_TICKS`] of `ticks`, and replicating. None otherwise
/// (also on a node that does not lead the group).
fn takeover_match<S: shoal_consensus::Storage>(
    raw: &RawNode<S>,
    heard: &HashMap<NodeId, u64>,
    ticks: u64,
    peer: NodeId,
) -> Option<Index> {
    let recent = heard
        .get(&peer)
        .is_some_and(|&t| ticks.saturating_sub(t) <= PEER_HEARD_WITHIN_TICKS);
    raw.progress(peer)
        .filter(|p| recent && p.state == ProgressState::Replicate)
        .map(|p| p.match_index)
}
