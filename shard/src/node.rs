//! The node runtime: one event loop per node driving every Raft group the
//! node hosts, persisting through the engine, talking through the net.
//!
//! # The loop
//! [`Node::start`] spawns one tokio task. Each turn it waits for an event —
//! a tick (every [`NodeConfig::tick_ms`]), peer messages, client RPCs, or
//! shutdown — drains whatever else is already queued, and then runs one
//! *round* over all groups:
//!
//! 1. queued client writes of each group become log entries (a batch of
//!    [`Request`]s per entry, stamped with the leader's clock so sessions
//!    expire deterministically from the log); queued reads become one
//!    ReadIndex request with a unique context;
//! 2. every group's `Ready` is collected; its `messages` go out at once;
//! 3. the snapshots, entries and hard states of ALL groups are persisted with
//!    ONE synced [`Engine::write_log`] (off the async thread when
//!    [`NodeConfig::blocking_io`] is set, as for RocksDB); a round whose
//!    only change is a commit index writes it unsynced
//!    ([`Engine::write_log_unsynced`]): Raft may forget a commit index, and
//!    the write-ahead log's order keeps the applied index at or below it;
//! 4. only then the `persisted_messages` go out;
//! 5. committed entries are applied through [`Engine::apply`] and each
//!    waiting caller is answered: a caller waits on (index, term), and an
//!    entry of another term at its index means its proposal was lost, so it
//!    gets `NotLeader`;
//! 6. confirmed reads are served from the engine once the applied index
//!    reaches their read index;
//! 7. every `Ready` is handed back with `advance`.
//!
//! When a group stops being leader (or its term changes), every write and
//! read waiting on it is answered `NotLeader { leader_hint }` at once; a
//! client retrying a write with the same sequence number is deduplicated by
//! the engine's session table, so this never applies a write twice.
//!
//! # Shutdown
//! [`NodeHandle::shutdown`] signals the loop, which stops taking events,
//! answers every waiting caller with [`KvResponse::ShuttingDown`], drops its
//! inbox (RPCs still queued there fail at the caller with a lost reply) and
//! returns. Nothing is left to persist: every round's log write is synced
//! before anybody is answered. [`NodeHandle::crash`] instead aborts the task
//! at its next await point, dropping every waiter unanswered (what a process
//! crash does); tests pair it with `MemStore::crash_and_recover`.
//!
//! # Restart
//! A node is rebuilt from the engine alone: the group's hard state,
//! membership and log come from [`GroupStorage`], and the consensus
//! `Config::applied` is the engine's applied index, which is written
//! atomically with the applied data, so nothing is replayed twice.
//!
//! # Log compaction and InstallSnapshot
//! With [`NodeConfig::max_raft_state_bytes`] set (the lab's maxraftstate),
//! once a group's log holds more entry bytes than that, the node exports
//! its shards at the applied index to SST files
//! ([`Engine::export_snapshot`], directory `export-g<group>-i<index>` under
//! [`NodeConfig::snapshot_dir`]), records that snapshot as the one to send
//! ([`Engine::set_snapshot`]) and compacts the log through it.
//!
//! When consensus decides a follower needs the snapshot, the node does not
//! send the `Snapshot` message directly: a task first streams every file of
//! the export to the follower over the net's bulk file transfer, and sends
//! the message only once all arrived (on failure it tells consensus with
//! `report_snapshot`, which retries later). The follower files what it
//! receives under `recv-g<group>-i<index>-n<sender>`, and steps a
//! `Snapshot` message only if those files are complete and verified
//! (manifest and per-file CRC32); otherwise it drops it and the leader
//! retries. When the `Ready` carries the snapshot, the follower installs the
//! files ([`Engine::install_snapshot`], crash-atomic) and then persists the
//! log reset in the round's synced write. A crash between the two leaves the
//! state machine ahead of the log; [`Node::start`] repairs that by resetting
//! the log to the applied index (which is committed by definition).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use shoal_consensus::{
    Config, EntryKind, Index, Message, MessageBody, NodeId, RawNode, Role, Snapshot, SnapshotMeta,
    Term,
};
use shoal_engine::Engine;
use shoal_engine::{
    ApplyEntry, Backend, Command, EngineError, GroupId, GroupStorage, GroupWrite, LogBatch, Reply,
    Request, ShardId,
};
use shoal_net::{Inbox, IncomingRpc, ReceivedFile, Responder, Transport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::protocol::{
    Denied, GroupReport, KvProtocol, KvRequest, KvResponse, NodeReport, PeerMessage,
    Request as RpcRequest, Response, SnapshotFileMeta,
};

/// The Raft group that holds the KV service's data (for now, one group).
pub const KV_GROUP: GroupId = 1;
/// The shard group [`KV_GROUP`] serves.
pub const KV_SHARD: ShardId = 0;
/// Most requests proposed as one log entry.
pub const ENTRY_REQUESTS_MAX: usize = 256;
/// Payload bytes above which no further request joins a log entry (a
/// single larger request still gets an entry of its own).
pub const ENTRY_BYTES_MAX: u64 = 1 << 20;
/// Most events (messages plus RPCs) drained before a round runs.
pub const EVENTS_PER_ROUND_MAX: usize = 1024;
/// Most `Ready` rounds run back to back before the loop looks at events again.
pub const READY_ROUNDS_MAX: usize = 16;

/// Configuration of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (also its Raft id in every group).
    pub id: NodeId,
    /// Every voter of the node's groups, this node included (every group
    /// has the same members for now).
    pub voters: Vec<NodeId>,
    /// The Raft groups this node hosts and the shard each serves. Default:
    /// [`KV_GROUP`] serving [`KV_SHARD`].
    pub groups: Vec<GroupSpec>,
    /// Tick length; consensus timeouts are counted in ticks.
    pub tick_ms: u64,
    /// Seed of this node's consensus RNG (mixed with the node id).
    pub seed: u64,
    /// Sessions idle this long are expired (by an entry the leader proposes
    /// every quarter of it). Clients must not retry one operation for
    /// longer; see `ClientConfig::session_idle_ms`.
    pub session_idle_ms: u64,
    /// Run engine writes on tokio's blocking pool (RocksDB) rather than on
    /// the event loop (the in-memory engine under a paused test clock).
    pub blocking_io: bool,
    /// Compact a group's log once it holds more entry bytes than this (the
    /// lab's maxraftstate); `None`: never compact.
    pub max_raft_state_bytes: Option<u64>,
    /// Directory for exported snapshots and snapshot files received from
    /// leaders. One per node.
    pub snapshot_dir: PathBuf,
}

/// Default session idle time: one hour.
pub const SESSION_IDLE_MS_DEFAULT: u64 = 60 * 60 * 1000;

impl NodeConfig {
    /// Defaults for node `id` of a group of `voters`.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> NodeConfig {
        NodeConfig {
            id,
            voters,
            groups: vec![GroupSpec {
                group: KV_GROUP,
                shard: KV_SHARD,
            }],
            tick_ms: shoal_consensus::config::DEFAULT_TICK_MS,
            seed: id,
            session_idle_ms: SESSION_IDLE_MS_DEFAULT,
            blocking_io: true,
            max_raft_state_bytes: None,
            snapshot_dir: std::env::temp_dir().join(format!("shoal-node-{id}-snapshots")),
        }
    }
}

/// One Raft group a node hosts, and the shard its state machine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpec {
    /// The group.
    pub group: GroupId,
    /// The shard whose keys it holds (requests name it).
    pub shard: ShardId,
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
        source: shoal_consensus::Error,
    },
    /// The engine failed.
    #[error("group {group}: engine: {source}")]
    Engine {
        /// The group.
        group: GroupId,
        /// The error.
        source: EngineError,
    },
    /// The node's task panicked or was aborted.
    #[error("node task ended abnormally: {0}")]
    Task(String),
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

/// A proposal waiting for its entry to apply.
struct Proposal {
    term: Term,
    responders: Vec<Waiter>,
}

type Waiting = Vec<(KvRequest, Waiter)>;

/// One Raft group on this node.
struct Group<B: Backend> {
    id: GroupId,
    /// Shards whose data the group's state machine holds.
    shards: Vec<ShardId>,
    raw: RawNode<GroupStorage<B>>,
    /// Writes received this turn, proposed at the start of the round.
    queued_writes: Vec<(Request, Waiter)>,
    /// Reads received this turn, sent as one ReadIndex at the round start.
    queued_reads: Waiting,
    /// Proposals by log index.
    proposals: BTreeMap<Index, Proposal>,
    /// Reads waiting for leadership confirmation, by context.
    reads_unconfirmed: BTreeMap<Bytes, Waiting>,
    /// Confirmed reads waiting for the applied index to reach theirs.
    reads_confirmed: Vec<(Index, Waiting)>,
    /// The leader term the waiters above belong to.
    leader_term: Option<Term>,
    log_bytes: u64,
    snapshot_index: Index,
    snapshot_bytes: u64,
    /// A verified snapshot directory received for this index, to install
    /// when consensus hands the snapshot out in a `Ready`.
    pending_install: Option<(Index, PathBuf)>,
    /// An installed snapshot has no local export yet (needed to send it on).
    export_pending: bool,
    snapshots_installed: u64,
    /// Term and vote as last persisted by a synced write: a `Ready` whose
    /// hard state differs from them only in the commit index needs no sync.
    durable_term_vote: (Term, NodeId),
}

/// The node runtime; see the module docs.
pub struct Node<B: Backend, T: Transport<KvProtocol>> {
    config: NodeConfig,
    engine: Engine<B>,
    transport: T,
    groups: BTreeMap<GroupId, Group<B>>,
    shard_groups: BTreeMap<ShardId, GroupId>,
    next_read_context: u64,
    clock_origin: Instant,
    clock_origin_ms: u64,
    last_expiry: Instant,
    status: Arc<Mutex<HashMap<GroupId, GroupStatus>>>,
    /// Outcomes of snapshot transfers: (group, peer, delivered).
    snapshot_results_tx: mpsc::UnboundedSender<(GroupId, NodeId, bool)>,
    snapshot_results: Option<mpsc::UnboundedReceiver<(GroupId, NodeId, bool)>>,
}

fn consensus_err(group: GroupId) -> impl Fn(shoal_consensus::Error) -> NodeError {
    move |source| NodeError::Consensus { group, source }
}

fn engine_err(group: GroupId) -> impl Fn(EngineError) -> NodeError {
    move |source| NodeError::Engine { group, source }
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
        let node = Node::open(config, engine, transport)?;
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
    fn open_group(
        config: &NodeConfig,
        engine: &Engine<B>,
        spec: GroupSpec,
    ) -> Result<Group<B>, NodeError> {
        let group_id = spec.group;
        let state = engine.group_state(group_id).map_err(engine_err(group_id))?;
        if state.conf_state.voters.is_empty() {
            // A brand-new group: record its membership so a restart does not
            // depend on the configuration again.
            let conf = shoal_consensus::ConfState {
                voters: config.voters.clone(),
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
                .map_err(engine_err(group_id))?;
        }
        std::fs::create_dir_all(&config.snapshot_dir).map_err(|e| {
            engine_err(group_id)(EngineError::Invalid(format!(
                "snapshot dir {}: {e}",
                config.snapshot_dir.display()
            )))
        })?;
        let mut applied = engine.applied(group_id).map_err(engine_err(group_id))?;
        let state = engine.group_state(group_id).map_err(engine_err(group_id))?;
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
                    conf_state: state.conf_state.clone(),
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
                .map_err(engine_err(group_id))?;
        }
        let state = engine.group_state(group_id).map_err(engine_err(group_id))?;
        let mut snapshot_bytes = 0;
        if let Some(snapshot) = &state.snapshot {
            // The files of the snapshot to send must exist; if they do not
            // (an install, or a crash), export afresh at the applied index.
            let dir = export_dir(&config.snapshot_dir, group_id, snapshot.meta.index);
            match shoal_engine::snapshot::read_manifest(&dir) {
                Ok(m) => snapshot_bytes = m.size_bytes(),
                Err(_) => {
                    let conf = state.conf_state.clone();
                    snapshot_bytes =
                        take_snapshot(engine, &config.snapshot_dir, group_id, &[spec.shard], conf)?
                            .1;
                }
            }
            applied = engine.applied(group_id).map_err(engine_err(group_id))?;
        }
        let log_bytes = stored_log_bytes(engine, group_id)?;
        let snapshot_index = engine
            .group_state(group_id)
            .map_err(engine_err(group_id))?
            .snapshot
            .map_or(0, |s| s.meta.index);
        let mut raft_config = Config::new(config.id, config.voters.clone());
        raft_config.applied = applied.index;
        raft_config.seed = config.seed ^ config.id.rotate_left(32) ^ group_id.rotate_left(16);
        let raw = RawNode::new(raft_config, engine.group_storage(group_id))
            .map_err(consensus_err(group_id))?;
        let durable_term_vote = (raw.term(), raw.vote());
        Ok(Group {
            durable_term_vote,
            id: group_id,
            shards: vec![spec.shard],
            raw,
            queued_writes: Vec::new(),
            queued_reads: Vec::new(),
            proposals: BTreeMap::new(),
            reads_unconfirmed: BTreeMap::new(),
            reads_confirmed: Vec::new(),
            leader_term: None,
            log_bytes,
            snapshot_index,
            snapshot_bytes,
            pending_install: None,
            export_pending: false,
            snapshots_installed: 0,
        })
    }

    fn open(config: NodeConfig, engine: Engine<B>, transport: T) -> Result<Self, NodeError> {
        let mut groups = BTreeMap::new();
        let mut shard_groups = BTreeMap::new();
        for spec in &config.groups {
            let group = Self::open_group(&config, &engine, *spec)?;
            groups.insert(spec.group, group);
            shard_groups.insert(spec.shard, spec.group);
        }
        let (snapshot_results_tx, snapshot_results) = mpsc::unbounded_channel();
        let clock_origin_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(Node {
            config,
            engine,
            transport,
            groups,
            shard_groups,
            next_read_context: 1,
            clock_origin: Instant::now(),
            clock_origin_ms,
            last_expiry: Instant::now(),
            status: Arc::new(Mutex::new(HashMap::new())),
            snapshot_results_tx,
            snapshot_results: Some(snapshot_results),
        })
    }

    /// Milliseconds for `time_ms` stamps: wall time at start plus tokio's
    /// monotonic elapsed time (so a paused test clock drives it).
    fn now_ms(&self) -> u64 {
        self.clock_origin_ms + self.clock_origin.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut inbox: Inbox<KvProtocol>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NodeError> {
        let mut snapshot_results = self.snapshot_results.take().expect("run once");
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                _ = ticker.tick() => {
                    if let Err(e) = self.tick() {
                        break Err(e);
                    }
                }
                message = inbox.messages.recv() => match message {
                    Some((from, m)) => self.on_peer_message(from.0, m),
                    None => break Ok(()),
                },
                rpc = inbox.rpcs.recv() => match rpc {
                    Some(rpc) => self.on_rpc(rpc),
                    None => break Ok(()),
                },
                file = inbox.files.recv() => match file {
                    Some(file) => self.on_file(file),
                    None => break Ok(()),
                },
                Some((group, peer, delivered)) = snapshot_results.recv() => {
                    if !delivered {
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.raw.report_snapshot(peer, false);
                        }
                    }
                }
            }
            // Take everything else already queued, so one round serves it all.
            for _ in 0..EVENTS_PER_ROUND_MAX {
                if let Ok((from, m)) = inbox.messages.try_recv() {
                    self.on_peer_message(from.0, m);
                } else if let Ok(rpc) = inbox.rpcs.try_recv() {
                    self.on_rpc(rpc);
                } else {
                    break;
                }
            }
            if let Err(e) = self.round().await {
                break Err(e);
            }
        };
        if let Err(e) = &result {
            tracing::error!(node = self.config.id, error = %e, "node stopped on an error");
        }
        self.answer_all(|| KvResponse::ShuttingDown);
        result
    }

    fn tick(&mut self) -> Result<(), NodeError> {
        let expire = self.last_expiry.elapsed()
            >= Duration::from_millis((self.config.session_idle_ms / 4).max(1));
        if expire {
            self.last_expiry = Instant::now();
        }
        for (gid, group) in &mut self.groups {
            group.raw.tick().map_err(consensus_err(*gid))?;
        }
        if expire {
            // The leader proposes session expiry; its outcome needs no answer.
            let shards: Vec<(ShardId, GroupId)> =
                self.shard_groups.iter().map(|(s, g)| (*s, *g)).collect();
            for (shard, gid) in shards {
                if let Some(group) = self.groups.get_mut(&gid) {
                    if group.raw.is_leader() {
                        let request = Request {
                            shard,
                            client: 0,
                            seq: 0,
                            time_ms: 0,
                            command: Command::ExpireSessions {
                                idle_ms: self.config.session_idle_ms,
                            },
                        };
                        group.queued_writes.push((request, Waiter(None)));
                    }
                }
            }
        }
        Ok(())
    }

    fn on_peer_message(&mut self, from: NodeId, m: PeerMessage) {
        let Some(group) = self.groups.get_mut(&m.group) else {
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
            let index = snapshot.meta.index;
            if index > group.raw.commit_index() {
                // Step it only if its files arrived complete and intact.
                let dir = recv_dir(&self.config.snapshot_dir, m.group, index, from);
                let valid = shoal_engine::snapshot::read_manifest(&dir)
                    .and_then(|manifest| {
                        shoal_engine::snapshot::verify_files(&dir, &manifest).map(|()| manifest)
                    })
                    .map(|manifest| manifest.applied.index == index && manifest.group == m.group);
                if !matches!(valid, Ok(true)) {
                    tracing::debug!(
                        node = self.config.id,
                        from,
                        index,
                        "snapshot message before its files; dropped"
                    );
                    return;
                }
                group.pending_install = Some((index, dir));
            }
        }
        if let Err(e) = group.raw.step(m.message) {
            tracing::debug!(node = self.config.id, group = m.group, error = %e, "step failed");
        }
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
        };
        let reply = Waiter(Some(reply));
        let Some(gid) = self.shard_groups.get(&request.shard).copied() else {
            reply.send(KvResponse::WrongShard);
            return;
        };
        let Some(group) = self.groups.get_mut(&gid) else {
            reply.send(KvResponse::WrongShard);
            return;
        };
        if !group.raw.is_leader() {
            reply.send(KvResponse::NotLeader {
                leader_hint: group.raw.leader_id(),
            });
            return;
        }
        let engine_request = Request {
            shard: request.shard,
            client: request.client,
            seq: request.seq,
            time_ms: 0,
            command: request.command.clone(),
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

    /// Proposes queued writes and reads, then runs `Ready` rounds until no
    /// group has anything more (or [`READY_ROUNDS_MAX`]).
    async fn round(&mut self) -> Result<(), NodeError> {
        let now_ms = self.now_ms();
        for group in self.groups.values_mut() {
            group.propose_queued(now_ms, &mut self.next_read_context)?;
        }
        for _ in 0..READY_ROUNDS_MAX {
            if !self.groups.values().any(|g| g.raw.has_ready()) {
                break;
            }
            self.ready_round().await?;
        }
        for group in self.groups.values_mut() {
            group.check_leadership();
        }
        self.publish_status();
        Ok(())
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
        // One synced write for every group.
        let mut batch = LogBatch::default();
        for (gid, ready) in &readies {
            if let Some(snapshot) = &ready.snapshot {
                self.install(*gid, snapshot).await?;
            }
        }
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
            // Entries, snapshots, terms and votes must be on disk before
            // anyone hears of them. A commit index alone need not be: Raft
            // may forget it, and every later write (applies included) is
            // lost with it if at all, so the applied index never passes
            // the stored commit index. Skipping the sync saves an fsync per
            // round on every node once entries commit.
            let must_sync = batch.groups.iter().any(|g| {
                g.snapshot.is_some()
                    || !g.entries.is_empty()
                    || g.hard_state.is_some_and(|hs| {
                        self.groups
                            .get(&g.group)
                            .is_none_or(|group| group.durable_term_vote != (hs.term, hs.vote))
                    })
            });
            let synced_term_votes: Vec<(GroupId, (Term, NodeId))> = if must_sync {
                batch
                    .groups
                    .iter()
                    .filter_map(|g| g.hard_state.map(|hs| (g.group, (hs.term, hs.vote))))
                    .collect()
            } else {
                Vec::new()
            };
            let sizes: Vec<(GroupId, u64)> = batch
                .groups
                .iter()
                .map(|g| (g.group, g.entries.iter().map(|e| e.size_bytes()).sum()))
                .collect();
            let first = batch.groups[0].group;
            let batches = split_batch(batch, self.engine.config().batch_bytes_max);
            if must_sync {
                self.with_engine(move |engine| {
                    batches.into_iter().try_for_each(|b| engine.write_log(b))
                })
                .await
                .map_err(engine_err(first))?;
            } else {
                batches
                    .into_iter()
                    .try_for_each(|b| self.engine.write_log_unsynced(b))
                    .map_err(engine_err(first))?;
            }
            for (gid, term_vote) in synced_term_votes {
                if let Some(g) = self.groups.get_mut(&gid) {
                    g.durable_term_vote = term_vote;
                }
            }
            for (gid, bytes) in sizes {
                if let Some(g) = self.groups.get_mut(&gid) {
                    g.log_bytes += bytes;
                }
            }
        }
        for (gid, ready) in &mut readies {
            for message in std::mem::take(&mut ready.persisted_messages) {
                self.send_message(*gid, message);
            }
        }
        // Apply, answer, serve reads, advance.
        for (gid, ready) in readies {
            let apply: Vec<ApplyEntry> = ready
                .committed_entries
                .iter()
                .map(|e| ApplyEntry {
                    index: e.index,
                    term: e.term,
                    requests: decode_entry(gid, e.index, e.kind, &e.data),
                })
                .collect();
            // Applying is unsynced CPU work (memtable inserts and a buffered
            // WAL append), short next to the synced log write, so it runs
            // inline: a hop to the blocking pool and back would cost more
            // than the apply itself.
            let replies = if apply.is_empty() {
                Vec::new()
            } else {
                self.engine.apply(gid, &apply).map_err(engine_err(gid))?
            };
            let group = self
                .groups
                .get_mut(&gid)
                .expect("a group with a Ready exists");
            for (entry, replies) in apply.iter().zip(replies) {
                group.answer_applied(entry.index, entry.term, replies);
            }
            let applied = apply
                .last()
                .map(|e| e.index)
                .unwrap_or_else(|| group.raw.applied_index());
            for rs in &ready.read_states {
                if let Some(waiting) = group.reads_unconfirmed.remove(&rs.context) {
                    group.reads_confirmed.push((rs.index, waiting));
                }
            }
            group.raw.advance(ready).map_err(consensus_err(gid))?;
            group.serve_reads(&self.engine, applied.max(group.raw.applied_index()));
            self.maybe_compact(gid).await?;
        }
        Ok(())
    }

    /// Sends a consensus message; a `Snapshot` goes after its files (see
    /// the module docs).
    fn send_message(&self, group: GroupId, message: Message) {
        let to = shoal_net::NodeId(message.to);
        let MessageBody::Snapshot { snapshot } = &message.body else {
            self.transport.send(to, PeerMessage { group, message });
            return;
        };
        let dir = export_dir(&self.config.snapshot_dir, group, snapshot.meta.index);
        let index = snapshot.meta.index;
        let transport = self.transport.clone();
        let results = self.snapshot_results_tx.clone();
        let peer = message.to;
        tokio::spawn(async move {
            let delivered = async {
                let mut names: Vec<String> = std::fs::read_dir(&dir)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .filter(|n| !n.ends_with(".tmp"))
                    .collect();
                names.sort();
                for name in names {
                    let meta = SnapshotFileMeta {
                        group,
                        index,
                        name: name.clone(),
                    };
                    transport.send_file(to, dir.join(&name), meta).await.ok()?;
                }
                Some(())
            }
            .await
            .is_some();
            if delivered {
                transport.send(to, PeerMessage { group, message });
            }
            let _ = results.send((group, peer, delivered));
        });
    }

    /// Files a received snapshot file under its (group, index, sender).
    fn on_file(&mut self, file: ReceivedFile<SnapshotFileMeta>) {
        let meta = &file.meta;
        let name_ok = !meta.name.is_empty()
            && !meta.name.contains(['/', '\\'])
            && meta.name != "."
            && meta.name != "..";
        if !name_ok || !self.groups.contains_key(&meta.group) {
            tracing::warn!(node = self.config.id, from = %file.from, name = %meta.name, "unexpected bulk file dropped");
            let _ = std::fs::remove_file(&file.path);
            return;
        }
        let dir = recv_dir(
            &self.config.snapshot_dir,
            meta.group,
            meta.index,
            file.from.0,
        );
        let target = dir.join(&meta.name);
        let moved = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::rename(&file.path, &target).or_else(|_| {
                std::fs::copy(&file.path, &target).and_then(|_| std::fs::remove_file(&file.path))
            })
        });
        if let Err(e) = moved {
            tracing::warn!(node = self.config.id, error = %e, "could not file a received snapshot file");
        }
    }

    /// Restores the state machine from the verified files of `snapshot`.
    async fn install(&mut self, gid: GroupId, snapshot: &Snapshot) -> Result<(), NodeError> {
        let group = self.groups.get_mut(&gid).expect("group exists");
        let index = snapshot.meta.index;
        // The snapshot message was stepped only after its files were
        // verified, which recorded them here; anything else is a bug.
        let pending = group.pending_install.take().filter(|(i, _)| *i == index);
        let Some((_, dir)) = pending else {
            let node = self.config.id;
            panic!("node {node} group {gid}: restored snapshot {index} has no verified files");
        };
        let manifest = self
            .with_engine(move |engine| engine.install_snapshot(&dir))
            .await
            .map_err(engine_err(gid))?;
        let group = self.groups.get_mut(&gid).expect("group exists");
        group.snapshot_index = index;
        group.snapshot_bytes = manifest.size_bytes();
        group.log_bytes = 0;
        group.export_pending = true;
        group.snapshots_installed += 1;
        // Received files of this or older snapshots are no longer needed.
        remove_dirs(&self.config.snapshot_dir, &format!("recv-g{gid}-"), index);
        Ok(())
    }

    /// Takes a snapshot and compacts the log once it outgrows the limit.
    async fn maybe_compact(&mut self, gid: GroupId) -> Result<(), NodeError> {
        let limit = self.config.max_raft_state_bytes.unwrap_or(u64::MAX);
        let group = self.groups.get_mut(&gid).expect("group exists");
        let due = group.log_bytes > limit && group.raw.applied_index() > group.snapshot_index;
        if !due && !group.export_pending {
            return Ok(());
        }
        group.export_pending = false;
        let conf = group.raw.conf_state().clone();
        let shards = group.shards.clone();
        let dir = self.config.snapshot_dir.clone();
        let (index, bytes) = if self.config.blocking_io {
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || take_snapshot(&engine, &dir, gid, &shards, conf))
                .await
                .map_err(|e| NodeError::Task(e.to_string()))??
        } else {
            take_snapshot(&self.engine, &dir, gid, &shards, conf)?
        };
        let log_bytes = stored_log_bytes(&self.engine, gid)?;
        let group = self.groups.get_mut(&gid).expect("group exists");
        group.snapshot_index = index;
        group.snapshot_bytes = bytes;
        group.log_bytes = log_bytes;
        Ok(())
    }

    /// Runs engine work inline or on the blocking pool ([`NodeConfig::blocking_io`]).
    async fn with_engine<R: Send + 'static>(
        &self,
        work: impl FnOnce(&Engine<B>) -> Result<R, EngineError> + Send + 'static,
    ) -> Result<R, EngineError> {
        if self.config.blocking_io {
            let engine = self.engine.clone();
            match tokio::task::spawn_blocking(move || work(&engine)).await {
                Ok(r) => r,
                Err(e) => Err(EngineError::Invalid(format!("engine task failed: {e}"))),
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

    fn publish_status(&self) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        for (gid, g) in &self.groups {
            status.insert(
                *gid,
                GroupStatus {
                    role: Some(g.raw.role()),
                    term: g.raw.term(),
                    leader: g.raw.leader_id(),
                    commit: g.raw.commit_index(),
                    applied: g.raw.applied_index(),
                    log_bytes: g.log_bytes,
                    snapshot_index: g.snapshot_index,
                    snapshot_bytes: g.snapshot_bytes,
                    snapshots_installed: g.snapshots_installed,
                },
            );
        }
    }
}

/// Whoever waits for a request's answer: a client RPC, or nobody (the
/// leader's own session-expiry proposals).
struct Waiter(Option<Responder<Response>>);

impl Waiter {
    fn send(self, response: KvResponse) {
        if let Some(r) = self.0 {
            // A caller that gave up (deadline) is not an error.
            let _ = r.send(Response::Kv(response));
        }
    }
}

fn export_dir(root: &Path, group: GroupId, index: Index) -> PathBuf {
    root.join(format!("export-g{group}-i{index}"))
}

fn recv_dir(root: &Path, group: GroupId, index: Index, from: NodeId) -> PathBuf {
    root.join(format!("recv-g{group}-i{index}-n{from}"))
}

/// Removes directories `<prefix><index>...` under `root` with an index at
/// or below `through` (best effort).
fn remove_dirs(root: &Path, prefix: &str, through: Index) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let digits: String = rest
            .trim_start_matches('i')
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if digits.parse::<Index>().is_ok_and(|i| i <= through) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Exports `group`'s shard at its applied index, records it as the snapshot
/// to send, compacts the log through it and drops older exports. Returns
/// the snapshot's index and size.
fn take_snapshot<B: Backend>(
    engine: &Engine<B>,
    root: &Path,
    group: GroupId,
    shards: &[ShardId],
    conf: shoal_consensus::ConfState,
) -> Result<(Index, u64), NodeError> {
    let err = engine_err(group);
    let staging = root.join(format!("export-g{group}-tmp"));
    let _ = std::fs::remove_dir_all(&staging);
    let manifest = engine
        .export_snapshot(group, shards, &staging)
        .map_err(&err)?;
    let index = manifest.applied.index;
    let dir = export_dir(root, group, index);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).map_err(|e| {
        err(EngineError::Invalid(format!(
            "rename {}: {e}",
            staging.display()
        )))
    })?;
    let snapshot = Snapshot {
        meta: SnapshotMeta {
            index,
            term: manifest.applied.term,
            conf_state: conf,
        },
        data: Bytes::new(),
    };
    engine.set_snapshot(group, snapshot).map_err(&err)?;
    engine.compact_log(group, index).map_err(&err)?;
    if index > 0 {
        remove_dirs(root, &format!("export-g{group}-"), index - 1);
    }
    Ok((index, manifest.size_bytes()))
}

/// Entry bytes currently stored in `group`'s log.
fn stored_log_bytes<B: Backend>(engine: &Engine<B>, group: GroupId) -> Result<u64, NodeError> {
    let err = engine_err(group);
    let first = engine.first_index(group).map_err(&err)?;
    let last = engine.last_index(group).map_err(&err)?;
    if last < first {
        return Ok(0);
    }
    let entries = engine
        .entries(group, first, last + 1, u64::MAX)
        .map_err(|e| err(EngineError::Invalid(format!("reading the log: {e}"))))?;
    Ok(entries.iter().map(|e| e.size_bytes()).sum())
}

/// Estimated encoded size of a request, for sizing entries.
fn request_bytes(request: &Request) -> u64 {
    let payload = match &request.command {
        Command::Put { key, value }
        | Command::PutIfVersion { key, value, .. }
        | Command::Append { key, value } => key.len() + value.len(),
        Command::Get { key } | Command::Delete { key } => key.len(),
        Command::Scan { start, end, .. } => start.len() + end.len(),
        Command::ExpireSessions { .. } => 0,
    };
    payload as u64 + 48
}

/// Splits a round's log write that exceeds the engine's batch limit into
/// several synced writes, in order: a group's snapshot goes with its first
/// piece, its hard state and membership with its last, so no prefix of the
/// writes records a commit index beyond the entries stored. Group commit is
/// given up only for such oversized rounds.
fn split_batch(batch: LogBatch, limit_bytes: u64) -> Vec<LogBatch> {
    if batch.size_bytes() <= limit_bytes {
        return vec![batch];
    }
    let mut out = Vec::new();
    for write in batch.groups {
        let GroupWrite {
            group,
            snapshot,
            entries,
            hard_state,
            conf_state,
        } = write;
        let mut pieces: Vec<Vec<shoal_consensus::Entry>> = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for entry in entries {
            if !current.is_empty() && bytes + entry.size_bytes() > limit_bytes {
                pieces.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += entry.size_bytes();
            current.push(entry);
        }
        pieces.push(current);
        let last = pieces.len() - 1;
        let mut snapshot = snapshot;
        for (i, entries) in pieces.into_iter().enumerate() {
            let write = GroupWrite {
                group,
                snapshot: snapshot.take(),
                entries,
                hard_state: if i == last { hard_state } else { None },
                conf_state: if i == last { conf_state.clone() } else { None },
            };
            out.push(LogBatch {
                groups: vec![write],
            });
        }
    }
    out
}

/// Decodes an entry's requests; empty for no-ops and config entries.
fn decode_entry(group: GroupId, index: Index, kind: EntryKind, data: &Bytes) -> Vec<Request> {
    if kind != EntryKind::Normal || data.is_empty() {
        return Vec::new();
    }
    match postcard::from_bytes::<Vec<Request>>(data) {
        Ok(requests) => requests,
        // Entries are written only by this runtime and checksummed by the
        // engine: an undecodable one is a bug, and applying around it would
        // make replicas diverge.
        Err(e) => panic!("group {group}: committed entry {index} does not decode as requests: {e}"),
    }
}

impl<B: Backend> Group<B> {
    fn propose_queued(&mut self, now_ms: u64, next_context: &mut u64) -> Result<(), NodeError> {
        if !self.queued_writes.is_empty() {
            let queued = std::mem::take(&mut self.queued_writes);
            if !self.raw.is_leader() {
                let hint = self.raw.leader_id();
                for (_, r) in queued {
                    r.send(KvResponse::NotLeader { leader_hint: hint });
                }
            } else {
                let mut queued = queued.into_iter().peekable();
                while queued.peek().is_some() {
                    let mut chunk = Vec::new();
                    let mut chunk_bytes = 0u64;
                    while let Some((request, _)) = queued.peek() {
                        let bytes = request_bytes(request);
                        if !chunk.is_empty()
                            && (chunk.len() >= ENTRY_REQUESTS_MAX
                                || chunk_bytes + bytes > ENTRY_BYTES_MAX)
                        {
                            break;
                        }
                        chunk_bytes += bytes;
                        chunk.push(queued.next().expect("peeked"));
                    }
                    let (mut requests, responders): (Vec<Request>, Vec<_>) =
                        chunk.into_iter().unzip();
                    for r in &mut requests {
                        r.time_ms = now_ms;
                    }
                    let data = postcard::to_allocvec(&requests).expect("requests always encode");
                    match self.raw.propose(Bytes::from(data)) {
                        Ok(index) => {
                            self.leader_term.get_or_insert(self.raw.term());
                            self.proposals.insert(
                                index,
                                Proposal {
                                    term: self.raw.term(),
                                    responders,
                                },
                            );
                        }
                        Err(e) => {
                            let response = match e {
                                shoal_consensus::Error::NotLeader { leader_hint } => {
                                    KvResponse::NotLeader { leader_hint }
                                }
                                _ => KvResponse::Busy,
                            };
                            for r in responders {
                                r.send(response.clone());
                            }
                        }
                    }
                }
            }
        }
        if !self.queued_reads.is_empty() {
            let reads = std::mem::take(&mut self.queued_reads);
            if !self.raw.is_leader() {
                let hint = self.raw.leader_id();
                for (_, r) in reads {
                    r.send(KvResponse::NotLeader { leader_hint: hint });
                }
            } else {
                let context = Bytes::copy_from_slice(&next_context.to_be_bytes());
                *next_context += 1;
                match self.raw.read_index(context.clone()) {
                    Ok(()) => {
                        self.leader_term.get_or_insert(self.raw.term());
                        self.reads_unconfirmed.insert(context, reads);
                    }
                    Err(_) => {
                        for (_, r) in reads {
                            r.send(KvResponse::Busy);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn answer_applied(&mut self, index: Index, term: Term, replies: Vec<Reply>) {
        // Proposals at lower indexes were overwritten by another leader's
        // entries; they were answered when leadership was lost, but be sure.
        while let Some((&first, _)) = self.proposals.first_key_value() {
            if first >= index {
                break;
            }
            let (_, p) = self.proposals.pop_first().expect("non-empty");
            let hint = self.raw.leader_id();
            for r in p.responders {
                r.send(KvResponse::NotLeader { leader_hint: hint });
            }
        }
        let Some(p) = self.proposals.remove(&index) else {
            return;
        };
        if p.term != term || p.responders.len() != replies.len() {
            let hint = self.raw.leader_id();
            for r in p.responders {
                r.send(KvResponse::NotLeader { leader_hint: hint });
            }
            return;
        }
        for (r, reply) in p.responders.into_iter().zip(replies) {
            r.send(KvResponse::Done(reply));
        }
    }

    fn serve_reads<Bk: Backend>(&mut self, engine: &Engine<Bk>, applied: Index) {
        if self.reads_confirmed.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_confirmed)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.reads_confirmed = waiting;
        for (_, reads) in ready {
            for (request, responder) in reads {
                let reply = match &request.command {
                    Command::Get { key } => match engine.get(request.shard, key) {
                        Ok(Some(v)) => Ok(Reply::Value(v)),
                        Ok(None) => Ok(Reply::NotFound),
                        Err(e) => Err(e),
                    },
                    Command::Scan { start, end, limit } => engine
                        .scan(request.shard, start, end, *limit)
                        .map(Reply::Pairs),
                    _ => unreachable!("only reads are queued as reads"),
                };
                responder.send(match reply {
                    Ok(r) => KvResponse::Done(r),
                    Err(e) => KvResponse::Refused {
                        reason: e.to_string(),
                    },
                });
            }
        }
    }

    /// Answers every waiter `NotLeader` once this node is no longer the
    /// leader of the term they were queued in.
    fn check_leadership(&mut self) {
        let Some(term) = self.leader_term else { return };
        if self.raw.is_leader() && self.raw.term() == term {
            return;
        }
        let hint = self.raw.leader_id();
        tracing::debug!(
            group = self.id,
            term,
            leader_hint = hint,
            "leadership lost: waiters answered"
        );
        self.fail_waiters(&|| KvResponse::NotLeader { leader_hint: hint });
        if self.raw.is_leader() {
            self.leader_term = Some(self.raw.term());
        }
    }

    fn fail_waiters(&mut self, response: &dyn Fn() -> KvResponse) {
        for (_, r) in self.queued_writes.drain(..) {
            r.send(response());
        }
        for (_, r) in self.queued_reads.drain(..) {
            r.send(response());
        }
        for (_, p) in std::mem::take(&mut self.proposals) {
            for r in p.responders {
                r.send(response());
            }
        }
        for (_, reads) in std::mem::take(&mut self.reads_unconfirmed) {
            for (_, r) in reads {
                r.send(response());
            }
        }
        for (_, reads) in self.reads_confirmed.drain(..) {
            for (_, r) in reads {
                r.send(response());
            }
        }
        self.leader_term = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_consensus::{Entry, HardState};

    // Goal: an oversized round is split so that every piece fits and the
    // hard state travels with the last piece only.
    #[test]
    fn split_batch_keeps_hard_state_last() {
        let entry = |index| Entry {
            term: 1,
            index,
            data: Bytes::from(vec![0u8; 100]),
            ..Default::default()
        };
        let hard_state = Some(HardState {
            term: 1,
            vote: 1,
            commit: 3,
        });
        let batch = LogBatch {
            groups: vec![GroupWrite {
                group: 1,
                entries: (1..=3).map(entry).collect(),
                hard_state,
                ..Default::default()
            }],
        };
        let pieces = split_batch(batch.clone(), 150);
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.size_bytes() <= 150));
        assert_eq!(pieces[2].groups[0].hard_state, hard_state);
        assert!(pieces[..2].iter().all(|p| p.groups[0].hard_state.is_none()));
        assert_eq!(split_batch(batch.clone(), 1 << 20), vec![batch]);
    }
}
