//! Shard moves under faults, seeded, with the safety invariants checked
//! after every event.
//!
//! Goal: show that moving shards between replica groups stays safe while
//! everything around the moves fails. Per seed: the controller group
//! (group 0, nodes 1–3) and three replica groups (group `g` on nodes
//! `10g+1 ..= 10g+3`) on the in-memory network, unreliable for some seeds
//! (drops, delays, reordering), with a random log-compaction threshold.
//! Sharded clerks append unique values to, and read, a handful of keys
//! spread over every shard, while a driver task changes the config again
//! and again (join, leave, move_shard, rebalance) through a `Controller`.
//! At random points the test
//! - crashes (losing unsynced writes) and later restarts the leader of a
//!   moving shard's source group, of its destination group, a whole
//!   replica group, or a controller-group node;
//! - aborts the driver in the middle of a change and starts a new one,
//!   which first finishes the pending change with `init_controller`;
//! - sends old move steps again, straight to the groups as admin
//!   `Request::Shard`s: exactly as sent before (a repeat: `Done` or
//!   `Stale`, and nothing changes) and with a lower config number (stale:
//!   `Stale`, and nothing changes).
//!
//! Then the faults stop, every node comes back, and the cluster must
//! finish the driver's changes (liveness).
//!
//! Invariants (see [`Lab::check`] for the exact statements and why they
//! hold): checked every [`POLL_EVERY`] of virtual time and before and
//! after every fault,
//! 1. no double serving: per shard and config number at most one group
//!    ever records the shard Serving; at most one group's most advanced
//!    state serves a shard; at most one group has a leader able to serve
//!    (its own term's entries applied) whose state serves a shard; a shard
//!    served at config `n` is on the group config `n` gives it;
//!
//! and at the end,
//! 2. no acknowledged append lost or doubled: each is in the final value
//!    exactly once, each with an unknown outcome at most once, nothing
//!    else is;
//! 3. the recorded history is linearizable (within the checker's budget).
//!
//! Replay one seed with `SHOAL_SEED=s`; sweep with `SHOAL_SEEDS=n` (from
//! `SHOAL_SEED_BASE`); `SHOAL_TRACE=1` prints every event as it happens.
//!
//! # What it found
//! - An install of an older config than a group had seen for the shard was
//!   refused for its missing files instead of answered `Stale`, so a
//!   stalled controller read it as a permanent failure (fixed in the
//!   node's install check; `moves.rs` checks it too).
//! - A freeze carried out again (a new controller finishing a change, a
//!   retry) re-exported the shard over the files an earlier install named;
//!   a replica that applied that install later stopped on the mismatch,
//!   after every restart (fixed: a directory per export,
//!   `node::moves::export_id`; `moves.rs` reproduces it).
//! - A shipped file counted as delivered once it was queued at the
//!   receiving node; a crash before the node moved it into the incoming
//!   directory lost it, the freeze was answered anyway, and that replica
//!   stopped when it applied the install (with this file's parameters at
//!   the time, `SHOAL_SEED=41`). Fixed: a moving shard's file is delivered
//!   only once the receiving node has it in its incoming directory,
//!   synced (`Protocol::file_needs_ack`, `FileAck`).

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Clerk;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::Role;
use shoal_engine::{
    AppliedState, EngineConfig, GroupId, MemStore, ShardId, ShardRecord, ShardStatus,
};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::{NodeId, RpcCaller, ADMIN_CLIENT_NAME};
use shoal_shard::client::{Client, ClientConfig, ClientError};
use shoal_shard::controller::{
    join, leave, move_shard, moves, rebalance, ChangeError, ChangeOutcome, Controller,
    ControllerConfig, FreezeOutcome, GroupRef, GroupStore, InitOutcome, MoveError, RecoverError,
    RpcMover, ShardConfig, ShardMover, StepOutcome, GROUP_UNASSIGNED,
};
use shoal_shard::linearizability::{CheckOutcome, HistoryRecorder, Input, Output};
use shoal_shard::node::{
    GroupSpec, Node, NodeConfig, NodeHandle, CONTROLLER_GROUP, CONTROLLER_SHARD,
};
use shoal_shard::protocol::{
    KvProtocol, KvResponse, Request, Response, ShardCommand, ShardReply, ShardRequest,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Shards in the cluster: few, so that every change moves some of them
/// and every shard holds keys.
const SHARDS: u32 = 6;
/// The replica groups (group 0 is the controller's).
const GROUPS: [GroupId; 3] = [1, 2, 3];
/// Concurrent sharded clerks.
const CLERKS: usize = 4;
/// Keys the clerks use: at least one per shard, so that every move
/// carries data; enough that each key's history stays within the
/// linearizability checker's budget.
const KEYS: usize = 2 * SHARDS as usize;
/// Config changes the driver makes after the first config.
const CHANGES: u64 = 15;
/// The driver's pause between changes: uniform in this range, in ms.
const DRIVER_PAUSE_MS: RangeInclusive<u64> = 100..=1200;
/// How often the invariants are checked while the workload runs.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Longest pause of the controller before a move step, in ms.
const STEP_PAUSE_MS_MAX: u64 = 150;
/// Pause between faults: uniform in this range, in milliseconds.
const FAULT_GAP_MS: RangeInclusive<u64> = 100..=1500;
/// How long a fault meant for the middle of a change waits for one.
const MID_CHANGE_WAIT_MAX: Duration = Duration::from_secs(5);
/// How far into a change such a fault strikes: up to this many ms.
const MID_CHANGE_DELAY_MS_MAX: u64 = 60;
/// How long a crashed leader or controller node stays down, in ms.
const NODE_DOWN_MS: RangeInclusive<u64> = 0..=1500;
/// How long a crashed whole group stays down, in ms.
const GROUP_DOWN_MS: RangeInclusive<u64> = 200..=3000;
/// Faults stop after this much virtual time even if the driver is behind.
const FAULT_PHASE_MAX: Duration = Duration::from_secs(90);
/// Once faults stop, the driver must finish its changes within this.
const LIVENESS_MAX: Duration = Duration::from_secs(120);
/// How long the controller's store client and the final reads retry one
/// operation.
const OP_DEADLINE: Duration = Duration::from_secs(30);
/// The workload clerks' deadline for half the seeds: shorter than some
/// faults last, so that some appends end with an unknown outcome.
const CLERK_OP_DEADLINE_SHORT: Duration = Duration::from_secs(5);
/// The controller's per-step deadline: far longer than any fault lasts,
/// so a change fails only on a bug.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// One admin call of a replayed step.
const REPLAY_RPC_DEADLINE: Duration = Duration::from_millis(500);
/// Most steps remembered for replays.
const STEPS_REMEMBERED_MAX: usize = 1024;
/// Events shown in a failure report.
const TRACE_EVENTS_SHOWN: usize = 80;

type Ctrl = Controller<GroupStore<MemClient<KvProtocol>>, RecordingMover>;

/// The nodes of `group`.
fn members(group: GroupId) -> Vec<u64> {
    (1..=3).map(|i| group * 10 + i).collect()
}

fn controller_ids() -> Vec<NodeId> {
    members(CONTROLLER_GROUP).into_iter().map(NodeId).collect()
}

/// One move step a group answered with success, as the controller sent it.
#[derive(Debug, Clone)]
struct PastStep {
    group: GroupId,
    command: ShardCommand,
}

/// State the driver tasks, their mover and the test loop share. Never
/// held across an await.
struct Shared {
    start: Instant,
    trace_live: bool,
    /// Every published config a driver saw, by number.
    configs: BTreeMap<u64, ShardConfig>,
    /// The change a driver is carrying out: (from, to).
    changing: Option<(ShardConfig, ShardConfig)>,
    /// Steps the groups answered with success, for replays.
    steps: Vec<PastStep>,
    /// Controller errors a retry cannot fix.
    fatal: Vec<String>,
    /// The latest events with their virtual time, for a failure report.
    trace: VecDeque<String>,
    stop_driver: bool,
}

impl Shared {
    fn note(&mut self, event: impl Into<String>) {
        let line = format!(
            "{:>9.3}s {}",
            self.start.elapsed().as_secs_f64(),
            event.into()
        );
        if self.trace_live {
            eprintln!("{line}");
        }
        if self.trace.len() == TRACE_EVENTS_SHOWN {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn published(&self) -> u64 {
        self.configs.keys().next_back().copied().unwrap_or(0)
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// The controller's mover: [`RpcMover`], remembering every step a group
/// answered with success so the test can send it again later, and pausing
/// a random while before each step, as a slow controller would, so that a
/// change lasts long enough for faults to land in its middle (between a
/// freeze and its install, say).
struct RecordingMover {
    inner: RpcMover<MemClient<KvProtocol>>,
    shared: Arc<Mutex<Shared>>,
    rng: Mutex<ChaCha8Rng>,
}

impl RecordingMover {
    async fn pause(&self) {
        let ms = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .random_range(0..=STEP_PAUSE_MS_MAX);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn remember(&self, group: GroupId, command: ShardCommand) {
        let mut shared = lock(&self.shared);
        if shared.steps.len() < STEPS_REMEMBERED_MAX {
            shared.steps.push(PastStep { group, command });
        }
    }
}

impl ShardMover for RecordingMover {
    async fn create(
        &self,
        group: GroupRef<'_>,
        shards: &[ShardId],
        num: u64,
    ) -> Result<StepOutcome, MoveError> {
        self.pause().await;
        let outcome = self.inner.create(group, shards, num).await;
        if let Ok(StepOutcome::Done) = outcome {
            let shards = shards.to_vec();
            self.remember(group.id, ShardCommand::Create { shards, num });
        }
        outcome
    }

    async fn precopy(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> Result<(), MoveError> {
        self.pause().await;
        let outcome = self.inner.precopy(from, shard, num, to).await;
        if outcome.is_ok() {
            let command = ShardCommand::Precopy {
                shard,
                num,
                to_group: to.id,
                to_nodes: to.members.to_vec(),
            };
            self.remember(from.id, command);
        }
        outcome
    }

    async fn freeze(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> Result<FreezeOutcome, MoveError> {
        self.pause().await;
        let outcome = self.inner.freeze(from, shard, num, to).await;
        if let Ok(FreezeOutcome::Frozen { .. }) = outcome {
            let command = ShardCommand::Freeze {
                shard,
                num,
                to_group: to.id,
                to_nodes: to.members.to_vec(),
            };
            self.remember(from.id, command);
        }
        outcome
    }

    async fn install(
        &self,
        to: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        from: GroupRef<'_>,
        token: Bytes,
    ) -> Result<StepOutcome, MoveError> {
        self.pause().await;
        let outcome = self
            .inner
            .install(to, shard, num, from, token.clone())
            .await;
        // The token is RpcMover's: the freeze's manifest, or none when the
        // freeze was a repeat (then there is nothing worth replaying).
        let manifest: Option<shoal_engine::SnapshotManifest> =
            postcard::from_bytes(&token).expect("RpcMover's own token decodes");
        if let (Ok(StepOutcome::Done), Some(manifest)) = (&outcome, manifest) {
            let command = ShardCommand::Install {
                shard,
                num,
                manifest,
            };
            self.remember(to.id, command);
        }
        outcome
    }

    async fn delete(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
    ) -> Result<StepOutcome, MoveError> {
        self.pause().await;
        let outcome = self.inner.delete(from, shard, num).await;
        if let Ok(StepOutcome::Done) = outcome {
            self.remember(from.id, ShardCommand::Delete { shard, num });
        }
        outcome
    }
}

/// The same step for config `num - 1`: a step of an older config.
fn older(command: &ShardCommand) -> ShardCommand {
    let mut command = command.clone();
    match &mut command {
        ShardCommand::Create { num, .. }
        | ShardCommand::Precopy { num, .. }
        | ShardCommand::Freeze { num, .. }
        | ShardCommand::Install { num, .. }
        | ShardCommand::Delete { num, .. } => *num -= 1,
    }
    command
}

/// The shards a step is about.
fn step_shards(command: &ShardCommand) -> Vec<ShardId> {
    match command {
        ShardCommand::Create { shards, .. } => shards.clone(),
        ShardCommand::Precopy { shard, .. }
        | ShardCommand::Freeze { shard, .. }
        | ShardCommand::Install { shard, .. }
        | ShardCommand::Delete { shard, .. } => vec![*shard],
    }
}

/// Sends `command` to `group` as an admin request, to each member in turn
/// (a leader hint first), twice round: the group's reply, or `None` if no
/// member answered.
async fn admin_step(
    caller: &MemClient<KvProtocol>,
    group: GroupId,
    command: ShardCommand,
) -> Option<ShardReply> {
    let request = Request::Shard(ShardRequest {
        group,
        command,
        holders: members(group),
        to_addrs: Vec::new(),
    });
    let mut next = 0usize;
    let group_members = members(group);
    for _ in 0..2 * group_members.len() {
        let to = group_members[next % group_members.len()];
        next += 1;
        match caller
            .call_with_deadline(NodeId(to), request.clone(), REPLAY_RPC_DEADLINE)
            .await
        {
            Ok(Response::Kv(KvResponse::Shard(reply))) => return Some(reply),
            Ok(Response::Kv(KvResponse::NotLeader { leader_hint })) => {
                if let Some(i) = group_members.iter().position(|&m| m == leader_hint) {
                    next = i;
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    None
}

/// The faults the test injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// Crash the leader of a moving shard's source group.
    SourceLeader,
    /// Crash the leader of a moving shard's destination group.
    DestinationLeader,
    /// Crash a whole replica group (one in a move, if any).
    Group,
    /// Crash a controller-group node.
    ControllerNode,
    /// Abort the driver in the middle of a change; a new one finishes it.
    AbortDriver,
    /// Send old steps again.
    Replay,
}

impl Fault {
    fn pick(rng: &mut ChaCha8Rng) -> Fault {
        match rng.random_range(0..100) {
            0..=19 => Fault::SourceLeader,
            20..=39 => Fault::DestinationLeader,
            40..=54 => Fault::Group,
            55..=69 => Fault::ControllerNode,
            70..=84 => Fault::AbortDriver,
            _ => Fault::Replay,
        }
    }

    /// Whether the fault is meant for the middle of a change.
    fn mid_change(self) -> bool {
        matches!(
            self,
            Fault::SourceLeader | Fault::DestinationLeader | Fault::Group | Fault::AbortDriver
        )
    }
}

/// A replayed step in flight, with what the group had recorded for its
/// shards when it was sent.
struct Replay {
    group: GroupId,
    command: ShardCommand,
    /// Whether the step is an exact repeat (else its number was lowered).
    repeat: bool,
    before: BTreeMap<ShardId, ShardRecord>,
    task: JoinHandle<Option<ShardReply>>,
}

/// A group's most advanced state seen so far.
#[derive(Debug, Clone, Default)]
struct Frontier {
    /// Its applied index (entries of a group's log apply in one order, so
    /// the state at an index is the same on every replica).
    index: u64,
    /// The replica it was seen on.
    node: u64,
    records: BTreeMap<ShardId, ShardRecord>,
}

fn record(records: &BTreeMap<ShardId, ShardRecord>, shard: ShardId) -> ShardRecord {
    records
        .get(&shard)
        .copied()
        .unwrap_or(shoal_shard::node::moves::RECORD_NONE)
}

/// What the invariant checks remember between polls.
#[derive(Default)]
struct Watch {
    frontier: BTreeMap<GroupId, Frontier>,
    /// The highest term any member of a group reported.
    term_max: BTreeMap<GroupId, u64>,
    /// (shard, num) → the group seen serving the shard at that num.
    serving: BTreeMap<(ShardId, u64), GroupId>,
    polls: u64,
    /// Views of leaders able to serve, taken by check (c): the check is
    /// not vacuous.
    able_views: u64,
}

/// What one clerk did.
#[derive(Default)]
struct ClerkLog {
    /// (key, value) of appends acknowledged.
    acked: Vec<(String, String)>,
    /// (key, value) of appends whose outcome is unknown.
    unknown: Vec<(String, String)>,
    ops: u64,
    errors: Vec<String>,
}

/// The cluster, the shared state and the invariant checker of one seed.
struct Lab {
    seed: u64,
    net: MemNetwork<KvProtocol>,
    engines: BTreeMap<u64, MemStore>,
    nodes: BTreeMap<u64, NodeHandle>,
    /// Crashed nodes and when they restart.
    down: BTreeMap<u64, Instant>,
    dir: PathBuf,
    incarnation: u64,
    next_client: u64,
    max_raft_state: Option<u64>,
    /// How long a workload clerk retries one operation.
    clerk_op_deadline: Duration,
    recorder: Arc<HistoryRecorder>,
    start: Instant,
    shared: Arc<Mutex<Shared>>,
    watch: Watch,
    rng: ChaCha8Rng,
    admin: MemClient<KvProtocol>,
    replays: Vec<Replay>,
    drivers: u64,
    /// Nodes whose task ended without being crashed (an error or a panic).
    stopped: BTreeSet<u64>,
}

impl Lab {
    fn new(seed: u64) -> Lab {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Swarm testing: each seed draws its own network, log compaction
        // and client patience.
        let reliable = rng.random_bool(0.5);
        let max_raft_state = rng.random_bool(0.5).then_some(16 << 10);
        let clerk_op_deadline = if rng.random_bool(0.5) {
            CLERK_OP_DEADLINE_SHORT
        } else {
            OP_DEADLINE
        };
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!("shoal-move-faults-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let net = MemNetwork::new(config);
        net.set_reliable(reliable);
        let start = Instant::now();
        let shared = Arc::new(Mutex::new(Shared {
            start,
            trace_live: std::env::var("SHOAL_TRACE").is_ok(),
            configs: BTreeMap::new(),
            changing: None,
            steps: Vec::new(),
            fatal: Vec::new(),
            trace: VecDeque::new(),
            stop_driver: false,
        }));
        lock(&shared).note(format!(
            "seed {seed}: reliable {reliable}, max raft state {max_raft_state:?}, clerk \
             deadline {clerk_op_deadline:?}"
        ));
        let mut lab = Lab {
            seed,
            admin: net.add_client(ADMIN_CLIENT_NAME),
            net,
            engines: BTreeMap::new(),
            nodes: BTreeMap::new(),
            down: BTreeMap::new(),
            dir,
            incarnation: 0,
            next_client: 1,
            max_raft_state,
            clerk_op_deadline,
            recorder: Arc::new(HistoryRecorder::new()),
            start,
            shared,
            watch: Watch::default(),
            rng,
            replays: Vec::new(),
            drivers: 0,
            stopped: BTreeSet::new(),
        };
        for group in [CONTROLLER_GROUP].into_iter().chain(GROUPS) {
            for id in members(group) {
                lab.start_node(id);
            }
        }
        lab
    }

    fn note(&self, event: impl Into<String>) {
        lock(&self.shared).note(event);
    }

    /// Panics with the seed, `what`, and the latest events.
    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let shared = lock(&self.shared);
        let trace = Vec::from(shared.trace.clone()).join("\n");
        let frontier: Vec<String> = self
            .watch
            .frontier
            .iter()
            .map(|(g, f)| {
                format!(
                    "group {g}: index {} on node {}: {:?}",
                    f.index, f.node, f.records
                )
            })
            .collect();
        drop(shared);
        panic!(
            "seed {} (replay with SHOAL_SEED={}): {what}\nfrontiers:\n{}\nlast events:\n{trace}",
            self.seed,
            self.seed,
            frontier.join("\n")
        );
    }

    fn group_of_node(id: u64) -> GroupId {
        id / 10
    }

    fn start_node(&mut self, id: u64) {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        self.incarnation += 1;
        let group = Self::group_of_node(id);
        let engine = self
            .engines
            .entry(id)
            .or_insert_with(|| MemStore::new_in_memory(EngineConfig::default()).expect("engine"))
            .clone();
        let (transport, inbox) = self.net.add_node(NodeId(id));
        let mut config = NodeConfig::new(id, members(group), self.dir.join(format!("node-{id}")));
        config.groups = vec![GroupSpec {
            group,
            static_shards: if group == CONTROLLER_GROUP {
                vec![CONTROLLER_SHARD]
            } else {
                Vec::new()
            },
            voters: Vec::new(),
        }];
        config.blocking_io = false;
        config.max_raft_state_bytes = self.max_raft_state;
        config.seed = self.seed ^ self.incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let handle = Node::start(config, engine, transport, inbox).expect("node starts");
        self.nodes.insert(id, handle);
    }

    /// Crashes node `id` (unsynced writes lost) and schedules its restart
    /// `down_ms` from now. The invariants are checked just before, so the
    /// state the crash loses has been seen.
    async fn crash(&mut self, id: u64, down_ms: u64, why: &str) {
        if !self.nodes.contains_key(&id) {
            return;
        }
        self.check("before a crash");
        let handle = self.nodes.remove(&id).expect("running");
        if let Err(e) = handle.crash().await {
            self.fail(format!("node {id} had stopped on its own: {e}"));
        }
        self.net.remove_node(NodeId(id));
        self.engines[&id]
            .crash_and_recover()
            .expect("engine recovers");
        self.down
            .insert(id, Instant::now() + Duration::from_millis(down_ms));
        self.note(format!("crash node {id} ({why}), down {down_ms} ms"));
        self.check("after a crash");
    }

    /// Restarts the crashed nodes whose time has come (all with `all`).
    fn restart_due(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .down
            .iter()
            .filter(|(_, at)| all || **at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.down.remove(&id);
            self.start_node(id);
            self.note(format!("restart node {id}"));
            self.check("after a restart");
        }
    }

    fn client_config(&mut self) -> ClientConfig {
        let id = self.seed.wrapping_shl(16) | self.next_client;
        self.next_client += 1;
        let mut config = ClientConfig::new(id.max(1));
        config.op_deadline = OP_DEADLINE;
        config
    }

    /// A new controller (a new session and admin client) over `shared`.
    fn controller(&mut self) -> Ctrl {
        let mut config = self.client_config();
        config.group = CONTROLLER_GROUP;
        config.shard = CONTROLLER_SHARD;
        let name = format!("client-{}", config.client_id);
        let store = GroupStore::new(Client::new(
            self.net.add_client(&name),
            controller_ids(),
            config,
        ));
        let mover = RecordingMover {
            inner: RpcMover::new(
                self.net.add_client(ADMIN_CLIENT_NAME),
                Duration::from_secs(1),
            ),
            shared: self.shared.clone(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(
                self.seed ^ self.next_client.wrapping_mul(0xE703_7ED1_A0B4_28DB),
            )),
        };
        let timing = ControllerConfig {
            step_deadline: STEP_DEADLINE,
            ..Default::default()
        };
        Controller::new(store, mover, timing).expect("controller config")
    }

    /// A sharded clerk whose operations are recorded, retrying each for
    /// `op_deadline`.
    fn clerk(&mut self, op_deadline: Duration) -> Clerk {
        let mut config = self.client_config();
        config.op_deadline = op_deadline;
        let name = format!("client-{}", config.client_id);
        let client = Client::sharded(self.net.add_client(&name), controller_ids(), config)
            .expect("client config");
        Clerk {
            id: client.id(),
            client,
            recorder: self.recorder.clone(),
            start: self.start,
        }
    }

    /// Starts a driver task with a new controller.
    fn spawn_driver(&mut self) -> JoinHandle<()> {
        self.drivers += 1;
        let ctrl = self.controller();
        let shared = self.shared.clone();
        let seed = self.seed ^ self.drivers.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let name = self.drivers;
        tokio::spawn(drive(ctrl, shared, seed, name))
    }

    /// The member of `group` that leads in the highest term, if any runs.
    fn leader_of(&self, group: GroupId) -> Option<u64> {
        members(group)
            .into_iter()
            .filter_map(|id| self.nodes.get(&id).map(|h| (id, h.status(group))))
            .filter(|(_, s)| s.role == Some(Role::Leader))
            .max_by_key(|(_, s)| s.term)
            .map(|(id, _)| id)
    }

    /// Checks the safety invariants on every running node's state now.
    ///
    /// What a replica's view is: `MemStore::shard_records(g)` on its engine
    /// is the group's shard table as of the replica's applied index (a
    /// shard step writes its records and the applied index in one batch;
    /// the test runs on one thread, between the nodes' rounds), and a
    /// group's applied entries are a prefix of its one committed log. So
    /// every view is the group's table at some point of one history, and
    /// a group's *frontier*, the view with the highest applied index ever
    /// seen, is its latest known table. (Crashes lose unsynced applies, but
    /// every crash is preceded by a check, so the frontier never misses a
    /// state a replica had.)
    ///
    /// Why not "no two groups with a replica that says Serving": a lagging
    /// replica of the old owner may still say Serving at an older number
    /// while the new owner serves, and so may a deposed leader that has not
    /// heard of its successor yet, or a leader elected a moment ago that
    /// has not applied the entries of earlier terms (the freeze among
    /// them). None of them can serve: a read needs a read index confirmed
    /// by a quorum in the leader's current term and is answered from a
    /// state at or past it; a write is checked against the table when it
    /// applies, in log order, after the freeze. The checks:
    ///
    /// a. For every shard and number n, at most one group ever has a
    ///    replica recording (n, Serving): only a Create or an Install of
    ///    config n makes that record, and config n gives the shard to one
    ///    group. Where config n is known, that group is the one.
    /// b. For every shard, at most one group's frontier says Serving. A
    ///    destination installs config n only after the source answered its
    ///    freeze, which the source's leader does after applying it; from
    ///    then on the source's frontier is Frozen at n or later, and it can
    ///    serve again only after an install that follows the other group's
    ///    freeze. Two Serving frontiers mean both groups' latest committed
    ///    state serves the shard: once each has a leader past those states,
    ///    both answer requests for it.
    /// c. For every shard, at most one group has a leader able to serve
    ///    now whose own state says Serving: role Leader, its term the
    ///    highest any member of the group reported, and an applied entry
    ///    of that term (its engine's applied term). Such a leader has
    ///    applied everything committed before its term (Leader
    ///    Completeness: the freeze included); anything committed in its
    ///    term it committed and applied itself, the freeze before shipping
    ///    it; and a freeze committed in a later term would have given some
    ///    member a higher term. This is what serves clients, checked
    ///    directly.
    ///
    /// Besides: two replicas at the same applied index hold the same table,
    /// a frontier's numbers never go down, and no node stops on its own.
    fn check(&mut self, why: &str) {
        self.watch.polls += 1;
        let configs = lock(&self.shared).configs.clone();
        // (group, node, table) of the leaders able to serve now.
        let mut able: Vec<(GroupId, u64, BTreeMap<ShardId, ShardRecord>)> = Vec::new();
        for group in GROUPS {
            let mut views = Vec::new();
            for id in members(group) {
                let Some(handle) = self.nodes.get(&id) else {
                    continue;
                };
                if !handle.is_running() {
                    // `tick` reports it with the node's error.
                    self.stopped.insert(id);
                    continue;
                }
                let engine = &self.engines[&id];
                let applied = engine.applied(group).expect("applied state");
                let records = engine.shard_records(group).expect("shard records");
                views.push((id, handle.status(group), applied, records));
            }
            let term_max = views
                .iter()
                .map(|(_, s, _, _)| s.term)
                .chain(self.watch.term_max.get(&group).copied())
                .max()
                .unwrap_or(0);
            self.watch.term_max.insert(group, term_max);
            let leaders: Vec<(u64, u64)> = views
                .iter()
                .filter(|(_, s, _, _)| s.role == Some(Role::Leader))
                .map(|(id, s, _, _)| (*id, s.term))
                .collect();
            for (i, (a, term)) in leaders.iter().enumerate() {
                if let Some((b, _)) = leaders[i + 1..].iter().find(|(_, t)| t == term) {
                    self.fail(format!(
                        "group {group}: nodes {a} and {b} both lead term {term} ({why})"
                    ));
                }
            }
            for (id, status, applied, records) in views {
                if let Err(violation) = self.observe(group, id, &configs, applied, &records) {
                    self.fail(format!("{violation} ({why})"));
                }
                if status.role == Some(Role::Leader)
                    && status.term == term_max
                    && applied.term == status.term
                {
                    self.watch.able_views += 1;
                    able.push((group, id, records));
                }
            }
        }
        for shard in 0..SHARDS {
            let serving: Vec<GroupId> = self
                .watch
                .frontier
                .iter()
                .filter(|(_, f)| record(&f.records, shard).status == ShardStatus::Serving)
                .map(|(g, _)| *g)
                .collect();
            if serving.len() > 1 {
                self.fail(format!(
                    "(b) shard {shard} is served by the latest state of groups {serving:?} ({why})"
                ));
            }
            let leaders: Vec<(GroupId, u64, ShardRecord)> = able
                .iter()
                .map(|(g, id, records)| (*g, *id, record(records, shard)))
                .filter(|(_, _, r)| r.status == ShardStatus::Serving)
                .collect();
            if leaders.len() > 1 {
                self.fail(format!(
                    "(c) shard {shard} is served by the current leaders (group, node, record) \
                     {leaders:?} ({why})"
                ));
            }
        }
    }

    /// Takes in replica `id`'s view of `group` (its table `records` as of
    /// `applied`): checks (a), moves the frontier, checks that it only
    /// moves forward and that replicas agree at the same index.
    fn observe(
        &mut self,
        group: GroupId,
        id: u64,
        configs: &BTreeMap<u64, ShardConfig>,
        applied: AppliedState,
        records: &BTreeMap<ShardId, ShardRecord>,
    ) -> Result<(), String> {
        for (&shard, r) in records {
            if r.status != ShardStatus::Serving {
                continue;
            }
            let owner = *self.watch.serving.entry((shard, r.num)).or_insert(group);
            if owner != group {
                return Err(format!(
                    "(a) shard {shard} is Serving at config {} on group {owner} and on group \
                     {group} (node {id})",
                    r.num
                ));
            }
            if let Some(config) = configs.get(&r.num) {
                if config.group_of(shard) != Some(group) {
                    return Err(format!(
                        "(a) node {id} of group {group} serves shard {shard} at config {}, which \
                         gives it to group {:?}",
                        r.num,
                        config.group_of(shard)
                    ));
                }
            }
        }
        let frontier = self.watch.frontier.entry(group).or_default();
        if applied.index > frontier.index {
            for (&shard, old) in &frontier.records {
                let new = record(records, shard);
                if new.num < old.num {
                    return Err(format!(
                        "group {group}: shard {shard} went back from {old:?} (node {} at index \
                         {}) to {new:?} (node {id} at index {})",
                        frontier.node, frontier.index, applied.index
                    ));
                }
            }
            *frontier = Frontier {
                index: applied.index,
                node: id,
                records: records.clone(),
            };
        } else if applied.index == frontier.index && *records != frontier.records {
            return Err(format!(
                "group {group}: nodes {} and {id} applied index {} but hold different tables: \
                 {:?} and {records:?}",
                frontier.node, applied.index, frontier.records
            ));
        }
        Ok(())
    }

    /// Waits `POLL_EVERY`, restarts due nodes, checks the invariants and
    /// finished replays.
    async fn tick(&mut self) {
        tokio::time::sleep(POLL_EVERY).await;
        self.restart_due(false);
        self.check("poll");
        if let Some(&id) = self.stopped.iter().next() {
            let handle = self.nodes.remove(&id).expect("a stopped node has a handle");
            let error = handle.crash().await;
            self.fail(format!("node {id} stopped on its own: {error:?}"));
        }
        self.finish_replays().await;
        let fatal = lock(&self.shared).fatal.clone();
        if let Some(error) = fatal.first() {
            self.fail(format!("a controller failed for good: {error}"));
        }
    }

    /// Polls until `task` ends.
    async fn wait_for<T>(&mut self, task: JoinHandle<T>, what: &str, bound: Duration) -> T {
        let deadline = Instant::now() + bound;
        while !task.is_finished() {
            if Instant::now() > deadline {
                self.fail(format!("{what} did not end within {bound:?}"));
            }
            self.tick().await;
        }
        match task.await {
            Ok(value) => value,
            Err(e) => self.fail(format!("{what} panicked: {e}")),
        }
    }

    /// The groups and shards of a move in progress, if any: (shard, from, to).
    fn moving(&mut self) -> Option<(ShardId, GroupId, GroupId)> {
        let changing = lock(&self.shared).changing.clone()?;
        let transfers: Vec<_> = moves(&changing.0, &changing.1)
            .into_iter()
            .filter(|m| m.from_group != GROUP_UNASSIGNED)
            .collect();
        if transfers.is_empty() {
            return None;
        }
        let m = transfers[self.rng.random_range(0..transfers.len())];
        Some((m.shard, m.from_group, m.to_group))
    }

    /// Injects fault `kind` (see [`Fault`]).
    async fn fault(&mut self, kind: Fault, driver: &mut JoinHandle<()>) {
        let node_down = self.rng.random_range(NODE_DOWN_MS);
        match kind {
            Fault::SourceLeader | Fault::DestinationLeader => {
                let (group, why) = match self.moving() {
                    Some((shard, from, _)) if kind == Fault::SourceLeader => {
                        (from, format!("source of shard {shard}, group {from}"))
                    }
                    Some((shard, _, to)) => {
                        (to, format!("destination of shard {shard}, group {to}"))
                    }
                    None => {
                        let g = GROUPS[self.rng.random_range(0..GROUPS.len())];
                        (g, format!("no move in progress, group {g}"))
                    }
                };
                if let Some(id) = self.leader_of(group) {
                    self.crash(id, node_down, &format!("leader: {why}")).await;
                }
            }
            Fault::Group => {
                // One group down at a time, so each move has a way through.
                if self.down.keys().any(|id| Self::group_of_node(*id) != 0) {
                    return;
                }
                let group = match self.moving() {
                    Some((_, from, to)) => {
                        if self.rng.random_bool(0.5) {
                            from
                        } else {
                            to
                        }
                    }
                    None => GROUPS[self.rng.random_range(0..GROUPS.len())],
                };
                let down = self.rng.random_range(GROUP_DOWN_MS);
                for id in members(group) {
                    self.crash(id, down, &format!("all of group {group}")).await;
                }
            }
            Fault::ControllerNode => {
                if self.down.keys().any(|id| Self::group_of_node(*id) == 0) {
                    return;
                }
                let id = match self.leader_of(CONTROLLER_GROUP) {
                    Some(id) if self.rng.random_bool(0.5) => id,
                    _ => members(CONTROLLER_GROUP)[self.rng.random_range(0..3)],
                };
                self.crash(id, node_down, "controller group").await;
            }
            Fault::AbortDriver => {
                let changing = lock(&self.shared).changing.clone();
                let Some((from, to)) = changing else {
                    return;
                };
                driver.abort();
                let _ = (&mut *driver).await;
                lock(&self.shared).changing = None;
                self.note(format!(
                    "abort the driver while changing config {} to {}",
                    from.num, to.num
                ));
                *driver = self.spawn_driver();
            }
            Fault::Replay => {
                let published = lock(&self.shared).published();
                let steps: Vec<PastStep> = lock(&self.shared)
                    .steps
                    .iter()
                    .filter(|s| s.command.num() <= published)
                    .cloned()
                    .collect();
                for _ in 0..3 {
                    if steps.is_empty() {
                        break;
                    }
                    let step = steps[self.rng.random_range(0..steps.len())].clone();
                    let repeat = self.rng.random_bool(0.5);
                    let command = if repeat {
                        step.command.clone()
                    } else {
                        older(&step.command)
                    };
                    self.replay(step.group, command, repeat);
                }
            }
        }
    }

    /// Sends `command` to `group` again, in a task; its reply is checked
    /// by [`Lab::finish_replays`].
    ///
    /// The step's config is published, so all of its steps were applied:
    /// every shard it touches has a record at its number or newer in the
    /// group, already seen by the checks (on a replica still running, or
    /// before a crash). Records only go forward in log order, and the
    /// replay applies after them, so the group must answer `Stale` (for a
    /// record with a higher number) or, for an exact repeat at a record of
    /// its own number, `Done` without changing anything.
    fn replay(&mut self, group: GroupId, command: ShardCommand, repeat: bool) {
        let frontier = self.watch.frontier.get(&group).cloned().unwrap_or_default();
        let before: BTreeMap<ShardId, ShardRecord> = step_shards(&command)
            .into_iter()
            .map(|s| (s, record(&frontier.records, s)))
            .collect();
        let floor = if repeat {
            command.num()
        } else {
            command.num() + 1
        };
        if let Some((shard, r)) = before.iter().find(|(_, r)| r.num < floor) {
            self.fail(format!(
                "test bug: replaying {command:?} on group {group}, whose config is published, \
                 but the group's record of shard {shard} is {r:?}"
            ));
        }
        self.note(format!(
            "replay on group {group} ({}): {}",
            if repeat { "repeat" } else { "older number" },
            describe(&command)
        ));
        let caller = self.admin.clone();
        let sent = command.clone();
        let task = tokio::spawn(async move { admin_step(&caller, group, sent).await });
        self.replays.push(Replay {
            group,
            command,
            repeat,
            before,
            task,
        });
    }

    /// Checks the replies of the replays that finished.
    async fn finish_replays(&mut self) {
        let (done, waiting): (Vec<Replay>, Vec<Replay>) = std::mem::take(&mut self.replays)
            .into_iter()
            .partition(|r| r.task.is_finished());
        self.replays = waiting;
        for replay in done {
            let reply = match replay.task.await {
                Ok(reply) => reply,
                Err(e) => self.fail(format!("a replay task failed: {e}")),
            };
            let num = replay.command.num();
            let what = format!(
                "replayed {} on group {}",
                describe(&replay.command),
                replay.group
            );
            let ok = match &reply {
                // No leader answered: nothing to check.
                None => true,
                Some(ShardReply::Stale { num: newer }) => {
                    *newer > num && replay.before.values().any(|r| r.num <= *newer)
                }
                Some(ShardReply::Done) => {
                    replay.repeat && replay.before.values().all(|r| r.num == num)
                }
                Some(ShardReply::Frozen { .. } | ShardReply::Refused { .. }) => false,
            };
            if !ok {
                self.fail(format!(
                    "{what}: answered {reply:?}, the group's records before: {:?}",
                    replay.before
                ));
            }
            // And nothing changed: a record still at the step's number is
            // the one from before.
            let frontier = self.watch.frontier.get(&replay.group).cloned();
            for (&shard, before) in &replay.before {
                let now = frontier
                    .as_ref()
                    .map_or(shoal_shard::node::moves::RECORD_NONE, |f| {
                        record(&f.records, shard)
                    });
                if now.num == num && now != *before {
                    self.fail(format!(
                        "{what}: shard {shard} went from {before:?} to {now:?}"
                    ));
                }
            }
            self.note(format!("{what}: {reply:?}"));
        }
    }

    async fn shutdown(&mut self) {
        for (id, handle) in std::mem::take(&mut self.nodes) {
            if let Err(e) = handle.crash().await {
                self.fail(format!("node {id} had stopped on its own: {e}"));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A step in a line.
fn describe(command: &ShardCommand) -> String {
    match command {
        ShardCommand::Create { shards, num } => format!("create {shards:?} at {num}"),
        ShardCommand::Precopy {
            shard,
            num,
            to_group,
            ..
        } => format!("pre-copy {shard} at {num} for group {to_group}"),
        ShardCommand::Freeze {
            shard,
            num,
            to_group,
            ..
        } => format!("freeze {shard} at {num} for group {to_group}"),
        ShardCommand::Install { shard, num, .. } => format!("install {shard} at {num}"),
        ShardCommand::Delete { shard, num } => format!("delete {shard} at {num}"),
    }
}

/// The next config: a join, a leave, a move of one shard or a rebalance,
/// one that moves at least one shard.
fn next_config(current: &ShardConfig, rng: &mut ChaCha8Rng) -> (String, ShardConfig) {
    let joined: Vec<GroupId> = current.groups.keys().copied().collect();
    let absent: Vec<GroupId> = GROUPS
        .into_iter()
        .filter(|g| !current.groups.contains_key(g))
        .collect();
    loop {
        let (what, next) = match rng.random_range(0..100) {
            0..=29 if !absent.is_empty() => {
                let g = absent[rng.random_range(0..absent.len())];
                let next = join(current, BTreeMap::from([(g, members(g))])).expect("join");
                (format!("join group {g}"), next)
            }
            30..=54 if joined.len() >= 2 => {
                let g = joined[rng.random_range(0..joined.len())];
                (
                    format!("leave group {g}"),
                    leave(current, &[g]).expect("leave"),
                )
            }
            55..=84 => {
                let shard = rng.random_range(0..SHARDS);
                let g = joined[rng.random_range(0..joined.len())];
                let next = move_shard(current, shard, g).expect("move");
                (format!("move shard {shard} to group {g}"), next)
            }
            85..=99 => ("rebalance".into(), rebalance(current).expect("rebalance")),
            _ => continue,
        };
        if !moves(current, &next).is_empty() {
            return (what, next);
        }
    }
}

/// Whether a controller error can be fixed by trying again later.
fn change_error_is_transient(e: &ChangeError) -> bool {
    match e {
        ChangeError::Store { source, .. } => source.is_transient(),
        ChangeError::Move { source, .. } => source.is_transient(),
        ChangeError::Unresolved { .. } => true,
        _ => false,
    }
}

fn recover_error_is_transient(e: &RecoverError) -> bool {
    match e {
        RecoverError::Store { source, .. } => source.is_transient(),
        RecoverError::Move { source, .. } => source.is_transient(),
        RecoverError::Unresolved { .. } => true,
        _ => false,
    }
}

/// The driver: finishes any pending change, learns the current config,
/// and changes it, until the last change or until told to stop.
async fn drive(ctrl: Ctrl, shared: Arc<Mutex<Shared>>, seed: u64, name: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let target = 1 + CHANGES;
    loop {
        if lock(&shared).stop_driver {
            return;
        }
        match ctrl.init_controller().await {
            Ok(outcome) => {
                if !matches!(
                    outcome,
                    shoal_shard::controller::RecoverOutcome::Idle { .. }
                ) {
                    lock(&shared).note(format!("driver {name}: init_controller: {outcome:?}"));
                }
            }
            Err(e) => {
                let mut s = lock(&shared);
                s.note(format!("driver {name}: init_controller failed: {e:?}"));
                if !recover_error_is_transient(&e) {
                    s.fatal.push(format!("init_controller: {e:?}"));
                    return;
                }
                continue;
            }
        }
        let current = match ctrl.query().await {
            Ok(config) => config,
            Err(e) => {
                lock(&shared).note(format!("driver {name}: query failed: {e:?}"));
                continue;
            }
        };
        {
            let mut s = lock(&shared);
            if !s.configs.contains_key(&current.num) {
                s.note(format!(
                    "driver {name}: config {} is current: {:?}",
                    current.num, current.shards
                ));
                s.configs.insert(current.num, current.clone());
            }
        }
        if current.num >= target {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let (what, next) = next_config(&current, &mut rng);
        {
            let mut s = lock(&shared);
            s.note(format!(
                "driver {name}: change to config {} ({what}): {:?}",
                next.num, next.shards
            ));
            s.changing = Some((current.clone(), next.clone()));
        }
        let outcome = ctrl.change_config_to(next.clone()).await;
        {
            let mut s = lock(&shared);
            s.changing = None;
            match outcome {
                Ok(ChangeOutcome::Changed) => {
                    s.note(format!("driver {name}: config {} published", next.num));
                    s.configs.insert(next.num, next);
                }
                Ok(other) => s.note(format!("driver {name}: config {}: {other:?}", next.num)),
                Err(e) => {
                    s.note(format!("driver {name}: config {} failed: {e:?}", next.num));
                    if !change_error_is_transient(&e) {
                        s.fatal
                            .push(format!("change to config {}: {e:?}", next.num));
                        return;
                    }
                }
            }
        }
        let pause = rng.random_range(DRIVER_PAUSE_MS);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// An append, recorded in the clerk's history.
async fn append(clerk: &Clerk, key: &str, value: &str) -> Result<u64, ClientError> {
    let now = || clerk.start.elapsed().as_nanos() as u64;
    let key = Bytes::copy_from_slice(key.as_bytes());
    let value = Bytes::copy_from_slice(value.as_bytes());
    let input = Input::Append {
        key: key.clone(),
        value: value.clone(),
    };
    let token = clerk.recorder.begin_at(clerk.id, input, now());
    let result = clerk.client.append(key, value).await;
    match &result {
        Ok(version) => clerk
            .recorder
            .end_at(token, Output::Written { version: *version }, now()),
        Err(_) => clerk.recorder.end_unknown_at(token, now()),
    }
    result
}

/// One clerk's loop: appends of unique values and gets on random keys.
async fn clerk_loop(
    clerk: Clerk,
    number: usize,
    keys: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> ClerkLog {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut log = ClerkLog::default();
    while !stop.load(Ordering::Relaxed) {
        let key = &keys[rng.random_range(0..keys.len())];
        log.ops += 1;
        if rng.random_bool(0.5) {
            let value = format!("{number}.{};", log.ops);
            match append(&clerk, key, &value).await {
                Ok(_) => log.acked.push((key.clone(), value)),
                Err(ClientError::Maybe | ClientError::Timeout) => {
                    log.unknown.push((key.clone(), value))
                }
                Err(e) => {
                    log.unknown.push((key.clone(), value));
                    log.errors.push(format!("append to {key}: {e}"));
                }
            }
        } else {
            match clerk.get(key).await {
                Ok(_) | Err(ClientError::Timeout) => {}
                Err(e) => log.errors.push(format!("get {key}: {e}")),
            }
        }
        let pause = rng.random_range(0..30);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    log
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Also after a failure: the trace and the seed tell the story.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// [`KEYS`] keys covering every shard.
fn keys() -> Vec<String> {
    let mut keys = Vec::new();
    let mut covered = BTreeSet::new();
    for i in 0.. {
        let key = format!("k{i}");
        let shard = shoal_shard::controller::shard_of(key.as_bytes(), SHARDS);
        if covered.insert(shard) || covered.len() == SHARDS as usize {
            keys.push(key);
        }
        if keys.len() == KEYS && covered.len() == SHARDS as usize {
            break;
        }
    }
    keys
}

/// One seed's run; see the module docs.
async fn run(seed: u64) {
    let mut lab = Lab::new(seed);
    let wall = std::time::Instant::now();

    // The first config: group 1 serves every shard.
    let first = join(
        &ShardConfig::initial(SHARDS).expect("initial"),
        BTreeMap::from([(GROUPS[0], members(GROUPS[0]))]),
    )
    .expect("join");
    let ctrl = lab.controller();
    let init = tokio::spawn(async move { ctrl.init_config(first).await });
    let outcome = lab
        .wait_for(init, "the first config", Duration::from_secs(60))
        .await;
    match outcome {
        Ok(InitOutcome::Posted) => {}
        other => lab.fail(format!("init_config answered {other:?}")),
    }

    let keys = Arc::new(keys());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clerks = Vec::new();
    for number in 0..CLERKS {
        let clerk = lab.clerk(lab.clerk_op_deadline);
        clerks.push(tokio::spawn(clerk_loop(
            clerk,
            number,
            keys.clone(),
            stop.clone(),
            seed ^ (number as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F),
        )));
    }
    let mut driver = lab.spawn_driver();

    // Faults, while the driver works.
    let target = 1 + CHANGES;
    let fault_phase_end = Instant::now() + FAULT_PHASE_MAX;
    let mut next_fault = Instant::now() + gap(&mut lab.rng);
    // A fault meant for the middle of a change waits for one to start,
    // then strikes a moment into it (or gives up waiting).
    let mut pending: Option<(Fault, Instant, Option<Instant>)> = None;
    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    while lock(&lab.shared).published() < target && Instant::now() < fault_phase_end {
        lab.tick().await;
        let now = Instant::now();
        if pending.is_none() && now >= next_fault {
            let kind = Fault::pick(&mut lab.rng);
            pending = Some((kind, now + MID_CHANGE_WAIT_MAX, None));
        }
        let Some((kind, give_up, strike)) = pending else {
            continue;
        };
        let changing = lock(&lab.shared).changing.is_some();
        let strike = match strike {
            Some(at) => at,
            None if !kind.mid_change() || now >= give_up => now,
            None if changing => {
                let at =
                    now + Duration::from_millis(lab.rng.random_range(0..=MID_CHANGE_DELAY_MS_MAX));
                pending = Some((kind, give_up, Some(at)));
                at
            }
            None => continue,
        };
        if now >= strike {
            lab.fault(kind, &mut driver).await;
            *faults.entry(kind).or_default() += 1;
            pending = None;
            next_fault = Instant::now() + gap(&mut lab.rng);
        }
    }

    // Liveness: every node back, no more faults; the changes finish.
    lab.note("faults stop");
    lab.restart_due(true);
    let deadline = Instant::now() + LIVENESS_MAX;
    while lock(&lab.shared).published() < target {
        if Instant::now() > deadline {
            lab.fail(format!(
                "no progress: config {} of {target} published {LIVENESS_MAX:?} after the faults \
                 stopped",
                lock(&lab.shared).published()
            ));
        }
        lab.tick().await;
    }
    lock(&lab.shared).stop_driver = true;
    lab.wait_for(driver, "the driver", LIVENESS_MAX).await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for clerk in clerks {
        logs.push(
            lab.wait_for(clerk, "a clerk", Duration::from_secs(60))
                .await,
        );
    }
    while !lab.replays.is_empty() {
        lab.tick().await;
    }

    // No change is pending; the final config is the last published.
    let ctrl = lab.controller();
    let last = tokio::spawn(async move { (ctrl.init_controller().await, ctrl.query().await) });
    let (recovered, final_config) = lab
        .wait_for(last, "the last query", Duration::from_secs(60))
        .await;
    let recovered = recovered.unwrap_or_else(|e| lab.fail(format!("init_controller: {e:?}")));
    let final_config = final_config.unwrap_or_else(|e| lab.fail(format!("query: {e:?}")));
    lab.note(format!("final: {recovered:?}, config {}", final_config.num));
    if final_config.num != target {
        lab.fail(format!(
            "the final config is {}, not {target}",
            final_config.num
        ));
    }

    // Final reads, recorded too.
    let reader = lab.clerk(OP_DEADLINE);
    let read_keys = keys.clone();
    let reads = tokio::spawn(async move {
        let mut values = BTreeMap::new();
        for key in read_keys.iter() {
            values.insert(key.clone(), reader.get(key).await);
        }
        values
    });
    let values = lab
        .wait_for(reads, "the final reads", Duration::from_secs(120))
        .await;
    // Settle, so every replica applies the last steps, and check the
    // final ownership: each shard served by the final config's group.
    for _ in 0..100 {
        lab.tick().await;
    }
    for shard in 0..SHARDS {
        let owner = final_config.group_of(shard).expect("assigned");
        let r = record(&lab.watch.frontier[&owner].records, shard);
        if r.status != ShardStatus::Serving {
            lab.fail(format!(
                "shard {shard}: the final config gives it to group {owner}, which records {r:?}"
            ));
        }
    }
    // Every Serving record seen names the group its config gave the shard.
    let configs = lock(&lab.shared).configs.clone();
    for (&(shard, num), &group) in &lab.watch.serving {
        let Some(config) = configs.get(&num) else {
            lab.fail(format!(
                "shard {shard} was Serving at config {num} on group {group}, a config never \
                 published"
            ));
        };
        if config.group_of(shard) != Some(group) {
            lab.fail(format!(
                "shard {shard} was Serving at config {num} on group {group}; config {num} gives \
                 it to {:?}",
                config.group_of(shard)
            ));
        }
    }

    // 2. Every acknowledged append once, every unknown one at most once,
    // nothing else.
    let errors: Vec<&String> = logs.iter().flat_map(|l| &l.errors).collect();
    if !errors.is_empty() {
        lab.fail(format!("clerk errors: {errors:?}"));
    }
    let mut acked: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut unknown: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for log in &logs {
        for (k, v) in &log.acked {
            acked.entry(k).or_default().insert(v);
        }
        for (k, v) in &log.unknown {
            unknown.entry(k).or_default().insert(v);
        }
    }
    for key in keys.iter() {
        let value = match &values[key] {
            Ok((value, _)) => String::from_utf8(value.to_vec()).expect("utf-8"),
            Err(e) => lab.fail(format!("the final read of {key}: {e}")),
        };
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for piece in value.split_inclusive(';') {
            *seen.entry(piece).or_default() += 1;
        }
        for v in acked.get(key.as_str()).into_iter().flatten() {
            if seen.get(v).copied() != Some(1) {
                lab.fail(format!(
                    "key {key}: acknowledged append {v:?} is there {} times in {value:?}",
                    seen.get(v).copied().unwrap_or(0)
                ));
            }
        }
        for (piece, count) in &seen {
            let known = acked.get(key.as_str()).is_some_and(|s| s.contains(piece));
            let maybe = unknown.get(key.as_str()).is_some_and(|s| s.contains(piece));
            if (!known && !maybe) || *count > 1 {
                lab.fail(format!(
                    "key {key}: {piece:?} is there {count} times, never appended once"
                ));
            }
        }
    }

    // 3. Linearizable.
    let history = lab.recorder.history();
    let unknown_ops = history.iter().filter(|op| op.is_unknown()).count();
    let outcome = lab.recorder.check(common::CHECK_STEPS_PER_KEY);
    if !matches!(outcome, CheckOutcome::Linearizable { .. }) {
        lab.fail(format!(
            "the history of {} operations ({unknown_ops} unknown) is not linearizable: {outcome}",
            history.len()
        ));
    }
    let (steps, drivers) = (lock(&lab.shared).steps.len(), lab.drivers);
    eprintln!(
        "seed {seed}: {} changes, faults {faults:?}, {drivers} drivers, {steps} steps, {} polls \
         ({} able-leader views), {} ops ({unknown_ops} unknown), {:.1}s virtual, {:.1}s wall",
        target - 1,
        lab.watch.polls,
        lab.watch.able_views,
        history.len(),
        lab.start.elapsed().as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    lab.shutdown().await;
}

fn gap(rng: &mut ChaCha8Rng) -> Duration {
    Duration::from_millis(rng.random_range(FAULT_GAP_MS))
}

// Goal: the module's scenario for each seed, invariants 1–3 as above.
// Each seed gets a runtime of its own (a paused clock from zero, no task
// left over from the previous seed), so `SHOAL_SEED` replays it exactly.
#[test]
fn moves_stay_safe_under_faults() {
    for seed in common::seeds_or("moves_stay_safe_under_faults", 4) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
            .block_on(run(seed));
    }
}
