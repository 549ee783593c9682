//! Lab 5 (shardkv) of MIT 6.5840, re-expressed on the production runtime:
//! the controller group (group 0, the lab's kvsrv that stores configs) on
//! nodes 1–3, each replica group `g` on its own nodes `10g+1 ..= 10g+3`,
//! all on the in-memory network with virtual time. The controller is
//! `shard::controller::Controller` over `GroupStore` and `RpcMover`;
//! clerks are sharded `Client`s. Test names and thresholds follow
//! `TESTS-6.5840.md` §6 (12 shards, 60 keys, 3 servers per group, 8 extra
//! groups, joins and leaves 200 ms apart, new gids counting up from 2).
//!
//! Virtual time: a reliable network delivers at once, so an operation can
//! take no virtual time at all, and a clerk that loops pauses between
//! operations, standing in for the lab's real per-operation latency;
//! otherwise the paused clock would never move. Short loops pause 1–10 ms,
//! as in the lab-4 tests; the clerks that run for the lab's 20 s and 60 s
//! pause [`CLERK_PAUSE_MS`], about the latency of a lab Raft that
//! replicates on its heartbeats (10 per second), which keeps those tests'
//! histories (thousands of operations on one key) and wall time in bounds. A partitioned controller is one whose
//! two network handles (store client and mover, `MemClient::set_connected`)
//! are cut: its task keeps running and its steps land late, once it is
//! reconnected. Every test is seeded (`SHOAL_SEED` replays it).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Clerk, ELECTION_TIMEOUT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::backend::View;
use shoal_engine::{Backend, Cf, EngineConfig, GroupId, MemStore, ShardStatus};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::{NodeId, ADMIN_CLIENT_NAME};
use shoal_shard::client::{Client, ClientConfig, ClientError};
use shoal_shard::controller::{
    join, leave, ChangeError, ChangeOutcome, Controller, ControllerConfig, GroupStore, InitOutcome,
    RecoverOutcome, RpcMover, ShardConfig,
};
use shoal_shard::linearizability::CheckOutcome;
use shoal_shard::linearizability::HistoryRecorder;
use shoal_shard::node::{
    GroupSpec, Node, NodeConfig, NodeHandle, CONTROLLER_GROUP, CONTROLLER_SHARD,
};
use shoal_shard::protocol::KvProtocol;
use tokio::time::{sleep, timeout, Instant};

/// The lab's shard count.
const NSHARDS: u32 = 12;
/// The lab's key count.
const NKEYS: usize = 60;
/// The first replica group (owns every shard at config 1).
const GID1: GroupId = 1;
/// Groups the many-group tests join (the lab's NGRP).
const NGRP: usize = 8;
/// Pause after each join and each leave (the lab's INTERGRPDELAY).
const INTERGRPDELAY: Duration = Duration::from_millis(200);
/// Pause (virtual ms, drawn uniformly) of a long-running clerk between
/// its get-and-put rounds (see the module docs).
const CLERK_PAUSE_MS: std::ops::RangeInclusive<u64> = 20..=200;

type Ctrl = Controller<GroupStore<MemClient<KvProtocol>>, RpcMover<MemClient<KvProtocol>>>;

/// The nodes of group `g` (the controller group is 0).
fn members(group: GroupId) -> Vec<u64> {
    (1..=3).map(|i| group * 10 + i).collect()
}

/// A controller with its two network handles, so a test can partition it
/// (the lab's `makeShardCtrlerClnt`).
struct PartitionableCtrl {
    ctrl: Ctrl,
    links: Vec<MemClient<KvProtocol>>,
}

impl PartitionableCtrl {
    /// Cuts (`false`) or restores (`true`) every link of this controller
    /// (the lab's `clnt.DisconnectAll` / `ConnectAll`).
    fn set_connected(&self, connected: bool) {
        for link in &self.links {
            link.set_connected(connected);
        }
    }
}

/// The cluster. Its methods take `&self`, so tasks (controllers, clerks)
/// can share it in an `Arc` and start and stop groups concurrently.
struct ShardCluster {
    net: MemNetwork<KvProtocol>,
    engines: Mutex<HashMap<u64, MemStore>>,
    nodes: Mutex<HashMap<u64, NodeHandle>>,
    dir: std::path::PathBuf,
    seed: u64,
    incarnation: AtomicU64,
    next_client: AtomicU64,
    /// The next new gid (the lab's `newGid`, counting up from 2).
    next_gid: AtomicU64,
    /// The nodes' maxraftstate (`None`: the runtime's default).
    max_raft_state: Option<u64>,
    recorder: Arc<HistoryRecorder>,
    start: Instant,
}

impl Drop for ShardCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            for (id, h) in nodes.iter() {
                assert!(
                    h.is_running(),
                    "seed {}: node {id} stopped on its own (error or panic)",
                    self.seed
                );
            }
        }
    }
}

impl ShardCluster {
    fn new(seed: u64, reliable: bool) -> ShardCluster {
        ShardCluster::with_max_raft_state(seed, reliable, None)
    }

    fn with_max_raft_state(seed: u64, reliable: bool, max_raft_state: Option<u64>) -> ShardCluster {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        // Shard moves export and ship files; on tmpfs that costs nothing.
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!(
            "shoal-shardkv-{}-{seed}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let net = MemNetwork::new(config);
        net.set_reliable(reliable);
        let c = ShardCluster {
            net,
            engines: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
            dir,
            seed,
            incarnation: AtomicU64::new(0),
            next_client: AtomicU64::new(1),
            next_gid: AtomicU64::new(GID1 + 1),
            max_raft_state,
            recorder: Arc::new(HistoryRecorder::new()),
            start: Instant::now(),
        };
        c.start_group(CONTROLLER_GROUP);
        c
    }

    fn start_node(&self, group: GroupId, id: u64) {
        let incarnation = self.incarnation.fetch_add(1, Ordering::Relaxed) + 1;
        let engine = self
            .engines
            .lock()
            .unwrap()
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
        if self.max_raft_state.is_some() {
            config.max_raft_state_bytes = self.max_raft_state;
        }
        config.seed = self.seed ^ incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let handle = Node::start(config, engine, transport, inbox).expect("node starts");
        self.nodes.lock().unwrap().insert(id, handle);
    }

    /// Starts (or restarts) every node of `group` that is not running.
    fn start_group(&self, group: GroupId) {
        for id in members(group) {
            if !self.nodes.lock().unwrap().contains_key(&id) {
                self.start_node(group, id);
            }
        }
    }

    /// Crashes every node of `group` (the lab's ShutdownServer for each):
    /// unsynced writes are lost, links go. A restart finds the rest.
    async fn shutdown_group(&self, group: GroupId) {
        for id in members(group) {
            let handle = self.nodes.lock().unwrap().remove(&id);
            if let Some(h) = handle {
                h.crash().await.expect("healthy until the crash");
            }
            self.net.remove_node(NodeId(id));
            let engine = self.engines.lock().unwrap().get(&id).cloned();
            if let Some(e) = engine {
                e.crash_and_recover().expect("recovers");
            }
        }
    }

    /// The lab's ExitGroup: `group` left for good; its nodes and state
    /// (engines, snapshot and received files) go. Starting it again starts
    /// a new, empty group.
    async fn exit_group(&self, group: GroupId) {
        self.shutdown_group(group).await;
        for id in members(group) {
            self.engines.lock().unwrap().remove(&id);
            let _ = std::fs::remove_dir_all(self.dir.join(format!("node-{id}")));
            let _ = std::fs::remove_dir_all(self.dir.join("net").join(format!("node-{id}")));
        }
    }

    /// A new gid (the lab's `newGid`).
    fn new_gid(&self) -> GroupId {
        self.next_gid.fetch_add(1, Ordering::Relaxed)
    }

    /// The engine of node `id`.
    fn engine(&self, id: u64) -> MemStore {
        self.engines.lock().unwrap()[&id].clone()
    }

    fn client_config(&self) -> ClientConfig {
        let id = (self.seed << 16) | self.next_client.fetch_add(1, Ordering::Relaxed);
        let mut c = ClientConfig::new(id.max(1));
        c.op_deadline = Duration::from_secs(600);
        c
    }

    fn controller_ids() -> Vec<NodeId> {
        members(CONTROLLER_GROUP).into_iter().map(NodeId).collect()
    }

    /// A controller (the lab's shardctrler) acting as the admin client.
    fn controller(&self) -> Ctrl {
        self.partitionable_controller().ctrl
    }

    /// A controller whose links a test can cut.
    fn partitionable_controller(&self) -> PartitionableCtrl {
        let mut config = self.client_config();
        let store_link = self.net.add_client(&format!("client-{}", config.client_id));
        config.group = CONTROLLER_GROUP;
        config.shard = CONTROLLER_SHARD;
        let store = GroupStore::new(Client::new(
            store_link.clone(),
            Self::controller_ids(),
            config,
        ));
        // Every controller's mover is `admin` (nodes take move steps from
        // nobody else); each has its own handle, cut apart from the others.
        let mover_link = self.net.add_client(ADMIN_CLIENT_NAME);
        let mover = RpcMover::new(mover_link.clone(), Duration::from_secs(1));
        let timing = ControllerConfig {
            step_deadline: Duration::from_secs(60),
            ..Default::default()
        };
        PartitionableCtrl {
            ctrl: Controller::new(store, mover, timing).expect("controller config"),
            links: vec![store_link, mover_link],
        }
    }

    /// A sharded clerk whose operations are recorded.
    fn clerk(&self) -> Clerk {
        let config = self.client_config();
        let name = format!("client-{}", config.client_id);
        let client = Client::sharded(self.net.add_client(&name), Self::controller_ids(), config)
            .expect("client config");
        Clerk {
            id: client.id(),
            client,
            recorder: self.recorder.clone(),
            start: self.start,
        }
    }

    /// The lab's InitConfig: Gid1 owns every shard, config 1.
    async fn init(&self, ctrl: &Ctrl) -> ShardConfig {
        self.start_group(GID1);
        let first = join(
            &ShardConfig::initial(NSHARDS).expect("initial"),
            BTreeMap::from([(GID1, members(GID1))]),
        )
        .expect("join");
        assert_eq!(first.num, 1);
        let outcome = ctrl.init_config(first.clone()).await.expect("init");
        assert_eq!(outcome, InitOutcome::Posted);
        first
    }

    /// The lab's `join`: `group` (started first) joins the queried config.
    /// Racing controllers may lose; the outcome says.
    async fn try_join(&self, ctrl: &Ctrl, group: GroupId) -> Result<ChangeOutcome, ChangeError> {
        self.start_group(group);
        let current = ctrl.query().await.expect("query");
        let next = join(&current, BTreeMap::from([(group, members(group))])).expect("join");
        ctrl.change_config_to(next).await
    }

    /// The lab's `leave` of `group` from the queried config.
    async fn try_leave(&self, ctrl: &Ctrl, group: GroupId) -> Result<ChangeOutcome, ChangeError> {
        let current = ctrl.query().await.expect("query");
        let next = leave(&current, &[group]).expect("leave");
        ctrl.change_config_to(next).await
    }

    /// Joins `groups` in one change (the controller is alone: it changes).
    async fn join(&self, ctrl: &Ctrl, groups: &[GroupId]) -> ShardConfig {
        for &g in groups {
            self.start_group(g);
        }
        let current = ctrl.query().await.expect("query");
        let next = join(&current, groups.iter().map(|&g| (g, members(g))).collect()).expect("join");
        assert_eq!(
            ctrl.change_config_to(next.clone()).await.expect("change"),
            ChangeOutcome::Changed,
            "seed {}",
            self.seed
        );
        next
    }

    /// `groups` leave in one change (the controller is alone: it changes).
    async fn leave(&self, ctrl: &Ctrl, groups: &[GroupId]) -> ShardConfig {
        let current = ctrl.query().await.expect("query");
        let next = leave(&current, groups).expect("leave");
        assert_eq!(
            ctrl.change_config_to(next.clone()).await.expect("change"),
            ChangeOutcome::Changed,
            "seed {}",
            self.seed
        );
        next
    }

    /// The lab's joinGroups: each group joins in turn, 200 ms apart.
    async fn join_groups(&self, ctrl: &Ctrl, groups: &[GroupId]) {
        for &g in groups {
            self.join(ctrl, &[g]).await;
            sleep(INTERGRPDELAY).await;
        }
    }

    /// The lab's leaveGroups: each group leaves in turn and exits, 200 ms
    /// apart.
    async fn leave_groups(&self, ctrl: &Ctrl, groups: &[GroupId]) {
        for &g in groups {
            self.leave(ctrl, &[g]).await;
            self.exit_group(g).await;
            sleep(INTERGRPDELAY).await;
        }
    }

    /// Bytes of `group`'s state machine on its largest replica: data,
    /// sessions and shard records, what a snapshot of the group holds (the
    /// Raft log and hard state are left out, as in the lab's snapshot).
    fn state_bytes(&self, group: GroupId) -> u64 {
        members(group)
            .into_iter()
            .map(|id| {
                let mut bytes = 0u64;
                self.engine(id)
                    .backend()
                    .with_view(&mut |view: &dyn View| {
                        for cf in [Cf::Kv, Cf::Dedup, Cf::Meta] {
                            view.scan(cf, &[], &[0xFF; 17], &mut |k, v| {
                                bytes += (k.len() + v.len()) as u64;
                                Ok(true)
                            })?;
                        }
                        Ok(())
                    })
                    .expect("engine view");
                bytes
            })
            .max()
            .unwrap_or(0)
    }
}

/// Checks the recorded history; a check without a verdict fails too.
fn check_linearizable(c: &ShardCluster) {
    let history = c.recorder.history();
    let outcome = c.recorder.check(common::CHECK_STEPS_PER_KEY);
    eprintln!(
        "seed {}: {} operations ({} unknown): {outcome}",
        c.seed,
        history.len(),
        history.iter().filter(|op| op.is_unknown()).count()
    );
    assert!(
        matches!(outcome, CheckOutcome::Linearizable { .. }),
        "seed {}: {outcome}",
        c.seed
    );
}

/// Puts `NKEYS` keys (version 0 → 1) and returns them with their values.
async fn spread_puts(clerk: &Clerk) -> Vec<(String, String)> {
    spread_puts_size(clerk, 0).await
}

/// Puts `NKEYS` keys with values of `size` bytes (at least their name).
async fn spread_puts_size(clerk: &Clerk, size: usize) -> Vec<(String, String)> {
    let mut kvs = Vec::new();
    for i in 0..NKEYS {
        let k = format!("k{i}");
        let mut v = format!("v{i}");
        while v.len() < size {
            v.push(char::from(b'a' + (v.len() % 26) as u8));
        }
        assert_eq!(clerk.put(&k, &v, 0).await.expect("put"), 1);
        kvs.push((k, v));
    }
    kvs
}

async fn check_gets(clerk: &Clerk, kvs: &[(String, String)]) {
    for (k, v) in kvs {
        let (value, version) = clerk.get(k).await.expect("get");
        assert_eq!((value, version), (Bytes::from(v.clone()), 1), "key {k}");
    }
}

/// The lab's checkShutdownSharding: with `down` shut down, gets of keys on
/// other groups finish and are right, gets of keys on `down` do not finish
/// (the data really is sharded); then `down` restarts.
async fn check_shutdown_sharding(c: &ShardCluster, down: GroupId, kvs: &[(String, String)]) {
    let config = c.controller().query().await.expect("query");
    c.shutdown_group(down).await;
    let mut tasks = Vec::new();
    for (k, v) in kvs.iter().cloned() {
        let mut cc = c.client_config();
        cc.op_deadline = Duration::from_secs(2);
        let client = Client::sharded(
            c.net.add_client(&format!("client-{}", cc.client_id)),
            ShardCluster::controller_ids(),
            cc,
        )
        .expect("client");
        tasks.push(tokio::spawn(
            async move { (k.clone(), v, client.get(k).await) },
        ));
    }
    for t in tasks {
        let (k, v, got) = t.await.expect("task");
        let on_down = config.group_of(config.shard_of_key(k.as_bytes())) == Some(down);
        match got {
            Ok(got) => {
                assert!(!on_down, "key {k} of shut-down group {down} was served");
                assert_eq!(got.value, Bytes::from(v), "key {k}");
            }
            Err(ClientError::Timeout) => assert!(
                on_down,
                "seed {}: key {k} on a live group timed out",
                c.seed
            ),
            Err(e) => panic!("key {k}: {e}"),
        }
    }
    c.start_group(down);
}

/// The lab's OneClientPut on `key` until `done`: read the key, then put
/// `{id, version}` at the version read. OK, ErrVersion and ErrMaybe are
/// the allowed outcomes. Returns how many puts succeeded.
async fn one_client_put(
    cli: usize,
    clerk: Clerk,
    key: &str,
    done: Arc<AtomicBool>,
    seed: u64,
) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ok = 0;
    while !done.load(Ordering::Relaxed) {
        let (_, version) = clerk.get(key).await.expect("get retries until it succeeds");
        let value = format!("{{\"Id\":{cli},\"Ver\":{version}}}");
        match clerk.put(key, &value, version).await {
            Ok(_) => ok += 1,
            Err(ClientError::Maybe | ClientError::VersionMismatch { .. }) => {}
            Err(e) => panic!("client {cli}: unexpected put error {e:?}"),
        }
        sleep(Duration::from_millis(rng.random_range(CLERK_PAUSE_MS))).await;
    }
    ok
}

/// The lab's SpawnClientsAndWait with OneClientPut on "k0": `n` recorded
/// clerks run until `done`; the handles return each one's successful puts.
fn spawn_clerks_on_k0(
    c: &ShardCluster,
    n: usize,
    done: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..n)
        .map(|cli| {
            let clerk = c.clerk();
            let done = done.clone();
            let seed = c.seed ^ (cli as u64 + 1).wrapping_mul(0x9E37_79B9);
            tokio::spawn(async move { one_client_put(cli, clerk, "k0", done, seed).await })
        })
        .collect()
}

// InitQuery5A: after InitConfig, Query returns config 1 with Gid1 owning
// every shard, balanced.
#[tokio::test(start_paused = true)]
async fn init_query_5a() {
    let c = ShardCluster::new(common::seed("init_query_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let config = ctrl.query().await.expect("query");
    assert_eq!(config.num, 1);
    assert_eq!(config.shards[0], GID1);
    assert!(config.shards.iter().all(|&g| g == GID1));
}

// StaticOneShardGroup5A: 60 puts, gets with version 1; Gid1's Raft
// leader crashes; gets still correct.
#[tokio::test(start_paused = true)]
async fn static_one_shard_group_5a() {
    let c = ShardCluster::new(common::seed("static_one_shard_group_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    check_gets(&clerk, &kvs).await;
    let leader = members(GID1)
        .into_iter()
        .find(|id| {
            c.nodes.lock().unwrap()[id].status(GID1).role == Some(shoal_consensus::Role::Leader)
        })
        .expect("a leader");
    let h = c.nodes.lock().unwrap().remove(&leader).expect("node");
    h.crash().await.expect("crash");
    c.net.remove_node(NodeId(leader));
    c.engine(leader).crash_and_recover().expect("recover");
    check_gets(&clerk, &kvs).await;
}

// JoinBasic5A: join gid 2: the config number grows by one and gid 2 owns
// shards; with either group shut down, only its keys are unavailable; all
// gets correct.
#[tokio::test(start_paused = true)]
async fn join_basic_5a() {
    let c = ShardCluster::new(common::seed("join_basic_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let config = c.join(&ctrl, &[2]).await;
    assert_eq!(config.num, 2);
    assert!(!config.shards_of(2).is_empty());
    check_gets(&clerk, &kvs).await;
    check_shutdown_sharding(&c, GID1, &kvs).await;
    check_shutdown_sharding(&c, 2, &kvs).await;
    check_gets(&clerk, &kvs).await;
}

// DeleteBasic5A: with maxraftstate 10000 and 60 values of 1000 bytes, gid 2
// joins and takes half the shards; gid 1 must drop the data of the shards
// it handed over (the lab: snapshot(g1) + snapshot(g2) ≤ snapshot₀(g1) +
// 10000).
//
// The bound, here: a group's snapshot is its state machine (data, sessions,
// shard records), so that is what is measured, on each group's largest
// replica (`ShardCluster::state_bytes`), directly rather than through the
// last snapshot's files, which a group only retakes when its log next
// outgrows maxraftstate (gets are ReadIndex reads and do not grow it). The
// 60 values are 60 KB; if gid 1 kept the 6 shards it handed over, the sum
// would be about 90 KB, 30 KB over the bound, whereas the 10000 bytes of
// slack cover what legitimately grows: the moved shards' sessions and
// records on gid 2. The test also checks the cause directly: on every
// replica of gid 1, each moved shard is Absent and has no rows.
#[tokio::test(start_paused = true)]
async fn delete_basic_5a() {
    const MAX_RAFT_STATE_BYTES: u64 = 10_000;
    const VALUE_BYTES: usize = 1000;
    let seed = common::seed("delete_basic_5a");
    let c = ShardCluster::with_max_raft_state(seed, true, Some(MAX_RAFT_STATE_BYTES));
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts_size(&clerk, VALUE_BYTES).await;
    // Followers apply what the leader committed with its next heartbeats.
    sleep(ELECTION_TIMEOUT).await;
    let before = c.state_bytes(GID1);
    assert!(
        before >= (NKEYS * VALUE_BYTES) as u64,
        "seed {seed}: gid 1 holds {before} bytes, less than its data"
    );
    let snapshot_bytes = |g: GroupId| {
        let nodes = c.nodes.lock().unwrap();
        members(g)
            .iter()
            .map(|id| nodes[id].status(g).snapshot_bytes)
            .max()
            .unwrap_or(0)
    };
    assert!(
        snapshot_bytes(GID1) > 0,
        "seed {seed}: 60 KB of puts through a 10000-byte maxraftstate took no snapshot"
    );
    let gid2 = c.new_gid();
    c.join_groups(&ctrl, &[gid2]).await;
    for _ in 0..5 {
        check_gets(&clerk, &kvs).await;
    }
    sleep(ELECTION_TIMEOUT).await;
    let (after1, after2) = (c.state_bytes(GID1), c.state_bytes(gid2));
    eprintln!(
        "seed {seed}: state bytes gid1 {before} -> {after1}, gid2 {after2}; \
         snapshot bytes gid1 {}, gid2 {}",
        snapshot_bytes(GID1),
        snapshot_bytes(gid2)
    );
    assert!(
        after1 + after2 <= before + MAX_RAFT_STATE_BYTES,
        "seed {seed}: old state {before} bytes, new {after1} + {after2}: moved shards kept"
    );
    let config = ctrl.query().await.expect("query");
    let moved = config.shards_of(gid2);
    assert_eq!(moved.len(), NSHARDS as usize / 2);
    for id in members(GID1) {
        let engine = c.engine(id);
        let records = engine.shard_records(GID1).expect("records");
        for &shard in &moved {
            assert_eq!(
                records.get(&shard).map(|r| r.status),
                Some(ShardStatus::Absent),
                "seed {seed}: node {id}, shard {shard}"
            );
            let rows = engine.scan(GID1, shard, b"", b"", 1).expect("scan");
            assert!(
                rows.pairs.is_empty(),
                "seed {seed}: node {id} still holds rows of moved shard {shard}"
            );
        }
    }
}

// JoinLeaveBasic5A: join gid 2; Gid1 leaves and is shut down; its data is
// still readable (from gid 2); Gid1 restarts and re-joins.
#[tokio::test(start_paused = true)]
async fn join_leave_basic_5a() {
    let c = ShardCluster::new(common::seed("join_leave_basic_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    c.join(&ctrl, &[2]).await;
    check_gets(&clerk, &kvs).await;
    let config = c.leave(&ctrl, &[GID1]).await;
    assert!(!config.groups.contains_key(&GID1));
    c.shutdown_group(GID1).await;
    check_gets(&clerk, &kvs).await;
    check_shutdown_sharding(&c, 2, &kvs).await;
    c.start_group(GID1);
    let config = c.join(&ctrl, &[GID1]).await;
    assert!(!config.shards_of(GID1).is_empty());
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
}

/// ManyJoinLeave{Reliable,Unreliable}5A: 8 groups join one by one (the
/// data spreads over 9 groups; with the first new one shut down, only its
/// keys are unavailable), then all 8 leave one by one, each exiting; all
/// gets stay correct.
async fn many_join_leave(name: &str, reliable: bool) {
    let c = ShardCluster::new(common::seed(name), reliable);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let groups: Vec<GroupId> = (0..NGRP).map(|_| c.new_gid()).collect();
    c.join_groups(&ctrl, &groups).await;
    let config = ctrl.query().await.expect("query");
    assert_eq!(config.groups.len(), NGRP + 1);
    check_shutdown_sharding(&c, groups[0], &kvs).await;
    check_gets(&clerk, &kvs).await;
    c.leave_groups(&ctrl, &groups).await;
    let config = ctrl.query().await.expect("query");
    assert_eq!(config.shards_of(GID1).len(), NSHARDS as usize);
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
}

#[tokio::test(start_paused = true)]
async fn many_join_leave_reliable_5a() {
    many_join_leave("many_join_leave_reliable_5a", true).await;
}

#[tokio::test(start_paused = true)]
async fn many_join_leave_unreliable_5a() {
    many_join_leave("many_join_leave_unreliable_5a", false).await;
}

// Shutdown5A: two groups join; every replica group is shut down and
// restarted; the shards' state (data, records) survived: gets correct.
#[tokio::test(start_paused = true)]
async fn shutdown_5a() {
    const NJOIN: usize = 2;
    let c = ShardCluster::new(common::seed("shutdown_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let groups: Vec<GroupId> = (0..NJOIN).map(|_| c.new_gid()).collect();
    c.join_groups(&ctrl, &groups).await;
    check_shutdown_sharding(&c, groups[0], &kvs).await;
    check_gets(&clerk, &kvs).await;
    let all: Vec<GroupId> = std::iter::once(GID1).chain(groups).collect();
    for &g in &all {
        c.shutdown_group(g).await;
    }
    for &g in &all {
        c.start_group(g);
    }
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
}

// ProgressShutdown5A: four groups join, two of them are shut down; gets of
// the keys on the live groups all finish within 2 s.
#[tokio::test(start_paused = true)]
async fn progress_shutdown_5a() {
    const NJOIN: usize = 4;
    const BOUND: Duration = Duration::from_secs(2);
    let seed = common::seed("progress_shutdown_5a");
    let c = ShardCluster::new(seed, true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let groups: Vec<GroupId> = (0..NJOIN).map(|_| c.new_gid()).collect();
    c.join_groups(&ctrl, &groups).await;
    let down = &groups[..2];
    for &g in down {
        c.shutdown_group(g).await;
    }
    let config = ctrl.query().await.expect("query");
    let live: Vec<(String, String)> = kvs
        .iter()
        .filter(|(k, _)| {
            let g = config.group_of(config.shard_of_key(k.as_bytes()));
            g.is_some_and(|g| !down.contains(&g))
        })
        .cloned()
        .collect();
    assert!(!live.is_empty() && live.len() < kvs.len());
    let started = Instant::now();
    timeout(BOUND, check_gets(&clerk, &live))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: gets on live groups did not finish in {BOUND:?}"));
    eprintln!(
        "seed {seed}: {} gets on live groups in {:?}",
        live.len(),
        started.elapsed()
    );
    check_linearizable(&c);
}

// ProgressJoin5A: four groups join; then a controller keeps joining and
// leaving gid 7 while a clerk gets the keys of shards that stay put: at
// least 100 gets complete in 4 s, and the loop ends within 8 s.
#[tokio::test(start_paused = true)]
async fn progress_join_5a() {
    const NJOIN: usize = 4;
    const NSEC: Duration = Duration::from_secs(4);
    const NCNT: u64 = 100;
    const CHURN_GID: GroupId = 7;
    let seed = common::seed("progress_join_5a");
    let c = Arc::new(ShardCluster::new(seed, true));
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let groups: Vec<GroupId> = (0..NJOIN).map(|_| c.new_gid()).collect();
    assert!(!groups.contains(&CHURN_GID));
    c.join_groups(&ctrl, &groups).await;
    let config = ctrl.query().await.expect("query");
    // The shards that no step of the churn moves: the same group before,
    // with and after gid 7 (a join and a leave from this config return to
    // it, so every round of the churn moves the same shards).
    let joined = join(&config, BTreeMap::from([(CHURN_GID, members(CHURN_GID))])).expect("join");
    let left = leave(&joined, &[CHURN_GID]).expect("leave");
    assert_eq!(
        left.shards, config.shards,
        "a join and leave of gid 7 return to the config"
    );
    let stable: BTreeSet<u32> = (0..NSHARDS)
        .filter(|&s| config.group_of(s) == joined.group_of(s))
        .collect();
    let keys: Vec<(String, String)> = kvs
        .iter()
        .filter(|(k, _)| stable.contains(&config.shard_of_key(k.as_bytes())))
        .cloned()
        .collect();
    assert!(!keys.is_empty());

    let done = Arc::new(AtomicBool::new(false));
    let churn = tokio::spawn({
        let (c, done) = (c.clone(), done.clone());
        async move {
            let ctrl = c.controller();
            let mut rounds = 0u64;
            while !done.load(Ordering::Relaxed) {
                c.join_groups(&ctrl, &[CHURN_GID]).await;
                c.leave_groups(&ctrl, &[CHURN_GID]).await;
                rounds += 1;
            }
            rounds
        }
    });
    let gets = async {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let started = Instant::now();
        let mut count = 0u64;
        'outer: loop {
            for (k, v) in &keys {
                if started.elapsed() >= NSEC {
                    break 'outer;
                }
                let (value, version) = clerk.get(k).await.expect("get");
                assert_eq!((value, version), (Bytes::from(v.clone()), 1), "key {k}");
                count += 1;
                sleep(Duration::from_millis(rng.random_range(1..=10))).await;
            }
        }
        count
    };
    let count = timeout(2 * NSEC, gets)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: gets did not finish in {:?}", 2 * NSEC));
    done.store(true, Ordering::Relaxed);
    let rounds = churn.await.expect("churn");
    eprintln!("seed {seed}: {count} gets during {rounds} join/leave rounds of gid {CHURN_GID}");
    assert!(
        rounds > 0,
        "seed {seed}: gid {CHURN_GID} never joined and left"
    );
    assert!(count >= NCNT, "seed {seed}: only {count} gets completed");
    check_gets(&clerk, &kvs).await;
}

/// {One,Many}ConcurrentClerk{Reliable,Unreliable}5A: `nclerks` clerks run
/// the lab's OneClientPut on "k0" for 20 s while 8 groups join one by one
/// and then leave one by one; the history must be linearizable.
async fn concurrent_clerk(name: &str, nclerks: usize, reliable: bool) {
    const NSEC: Duration = Duration::from_secs(20);
    let c = ShardCluster::new(common::seed(name), reliable);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let done = Arc::new(AtomicBool::new(false));
    let clerks = spawn_clerks_on_k0(&c, nclerks, &done);
    let started = Instant::now();
    let groups: Vec<GroupId> = (0..NGRP).map(|_| c.new_gid()).collect();
    c.join_groups(&ctrl, &groups).await;
    c.leave_groups(&ctrl, &groups).await;
    let churn = started.elapsed();
    sleep(NSEC.saturating_sub(churn)).await;
    done.store(true, Ordering::Relaxed);
    let mut ok = 0;
    for t in clerks {
        ok += t.await.expect("clerk");
    }
    eprintln!(
        "seed {}: joins and leaves took {churn:?}; {ok} puts succeeded",
        c.seed
    );
    assert!(ok > 0, "seed {}: no put succeeded", c.seed);
    check_linearizable(&c);
}

#[tokio::test(start_paused = true)]
async fn one_concurrent_clerk_reliable_5a() {
    concurrent_clerk("one_concurrent_clerk_reliable_5a", 1, true).await;
}

#[tokio::test(start_paused = true)]
async fn many_concurrent_clerk_reliable_5a() {
    concurrent_clerk("many_concurrent_clerk_reliable_5a", 10, true).await;
}

#[tokio::test(start_paused = true)]
async fn one_concurrent_clerk_unreliable_5a() {
    concurrent_clerk("one_concurrent_clerk_unreliable_5a", 1, false).await;
}

#[tokio::test(start_paused = true)]
async fn many_concurrent_clerk_unreliable_5a() {
    concurrent_clerk("many_concurrent_clerk_unreliable_5a", 10, false).await;
}

// JoinLeave5B: with Gid1 down, a join of gid 2 cannot finish (it must
// freeze Gid1's shards); once Gid1 restarts it finishes within 2 s, one
// config later. Then, with gid 2 down, Gid1's leave cannot finish within
// 2 s; once gid 2 restarts it finishes within 2 s. Gets correct.
//
// The lab's first wait is 2 ns (a typo for 2 s, TESTS-6.5840.md §8); this
// test waits the full 2 s, which is stricter.
#[tokio::test(start_paused = true)]
async fn join_leave_5b() {
    const NSEC: Duration = Duration::from_secs(2);
    let seed = common::seed("join_leave_5b");
    let c = Arc::new(ShardCluster::new(seed, true));
    let ctrl = Arc::new(c.controller());
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let num = ctrl.query().await.expect("query").num;

    c.shutdown_group(GID1).await;
    let gid2 = c.new_gid();
    let mut change = tokio::spawn({
        let (c, ctrl) = (c.clone(), ctrl.clone());
        async move { c.try_join(&ctrl, gid2).await }
    });
    assert!(
        timeout(NSEC, &mut change).await.is_err(),
        "seed {seed}: the join finished without gid 1"
    );
    c.start_group(GID1);
    let outcome = timeout(NSEC, &mut change)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the join did not finish within {NSEC:?}"))
        .expect("task")
        .expect("join");
    assert_eq!(outcome, ChangeOutcome::Changed);
    assert_eq!(ctrl.query().await.expect("query").num, num + 1);

    c.shutdown_group(gid2).await;
    let mut change = tokio::spawn({
        let (c, ctrl) = (c.clone(), ctrl.clone());
        async move { c.try_leave(&ctrl, GID1).await }
    });
    assert!(
        timeout(NSEC, &mut change).await.is_err(),
        "seed {seed}: the leave finished without gid 2"
    );
    c.start_group(gid2);
    let outcome = timeout(NSEC, &mut change)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the leave did not finish within {NSEC:?}"))
        .expect("task")
        .expect("leave");
    assert_eq!(outcome, ChangeOutcome::Changed);
    let config = ctrl.query().await.expect("query");
    assert_eq!(config.num, num + 2);
    assert!(!config.groups.contains_key(&GID1));
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
}

/// How soon a reconnected stale controller must have stopped: a few of
/// its retry pauses (at most 500 ms each) and step round trips, and its
/// 200 ms pause between changes; far below its 60 s step deadline, so it
/// stops because it is fenced or done, not because it gave up.
const STALE_CONTROLLER_STOP: Duration = Duration::from_secs(5);

/// Where the lab's partitioned controller was when it was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Joining its new group.
    Join,
    /// Making its new group leave.
    Leave,
}

/// The lab's partitionCtrler, one round: controller A loops join(new gid) /
/// leave(it); after 1 s + rand(0..400 ms) Gid1 is shut down, so A gets
/// stuck in a move; 1 s later A is cut off (`fence`, the 5C variant: and
/// 1 s more passes). Gid1 restarts, and controller B's InitController
/// finishes A's pending change: the config moved past the round's start,
/// and A's group is a member iff A was joining it. B then makes it leave
/// if it joined (the next round starts from Gid1 alone). With `fence`, A
/// is reconnected and must stop at once: its late steps are repeats of
/// done ones or are fenced by a newer config number, and it changes no
/// config. Gets of `kvs` are correct throughout.
async fn partition_ctrler(
    c: &Arc<ShardCluster>,
    clerk: &Clerk,
    kvs: &[(String, String)],
    fence: bool,
    rng: &mut ChaCha8Rng,
) {
    let seed = c.seed;
    let a = Arc::new(c.partitionable_controller());
    a.ctrl.init_controller().await.expect("init controller");
    let num = a.ctrl.query().await.expect("query").num;
    let phase = Arc::new(Mutex::new((Phase::Join, 0)));
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let (c, a, phase, stop) = (c.clone(), a.clone(), phase.clone(), stop.clone());
        async move {
            loop {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                let ngid = c.new_gid();
                *phase.lock().unwrap() = (Phase::Join, ngid);
                match c.try_join(&a.ctrl, ngid).await {
                    Ok(ChangeOutcome::Changed) => {}
                    other => return Some((Phase::Join, other)),
                }
                sleep(INTERGRPDELAY).await;
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                *phase.lock().unwrap() = (Phase::Leave, ngid);
                match c.try_leave(&a.ctrl, ngid).await {
                    Ok(ChangeOutcome::Changed) => {}
                    other => return Some((Phase::Leave, other)),
                }
                c.exit_group(ngid).await;
                sleep(INTERGRPDELAY).await;
            }
        }
    });
    sleep(ELECTION_TIMEOUT + Duration::from_millis(rng.random_range(0..400))).await;
    c.shutdown_group(GID1).await;
    // A gets stuck in a join or leave: every change moves shards of Gid1.
    sleep(Duration::from_secs(1)).await;
    a.set_connected(false);
    let (phase, ngid) = *phase.lock().unwrap();
    assert!(
        !task.is_finished(),
        "seed {seed}: controller A stopped early"
    );
    if fence {
        sleep(Duration::from_secs(1)).await;
    }
    c.start_group(GID1);

    let b = c.controller();
    let recovered = b.init_controller().await.expect("init controller");
    let config = b.query().await.expect("query");
    eprintln!(
        "seed {seed}: A cut off in {phase:?} of gid {ngid} (round from config {num}); B: {recovered:?}"
    );
    assert!(
        config.num > num,
        "seed {seed}: didn't recover: config {} after {num}",
        config.num
    );
    let present = config.groups.contains_key(&ngid);
    assert_eq!(
        present,
        phase == Phase::Join,
        "seed {seed}: gid {ngid} membership after A was cut off in {phase:?}"
    );
    if present {
        assert_eq!(
            c.try_leave(&b, ngid).await.expect("leave"),
            ChangeOutcome::Changed
        );
    }
    check_gets(clerk, kvs).await;
    let settled = b.query().await.expect("query");

    if fence {
        // A runs its remaining steps late; it must stop by itself, long
        // before its 60 s step deadline, and leave the config as it was.
        // Joining, it finds B's newer config (B made its group leave):
        // fenced, it stops. Leaving, it finds its own change published by
        // B, nothing newer: done, it stops before another round.
        stop.store(true, Ordering::Relaxed);
        a.set_connected(true);
        let reconnected = Instant::now();
        sleep(Duration::from_millis(100)).await;
        let ended = timeout(STALE_CONTROLLER_STOP, task)
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: the reconnected controller did not stop"))
            .expect("controller task");
        eprintln!(
            "seed {seed}: reconnected controller A ended with {ended:?} after {:?}",
            reconnected.elapsed()
        );
        match (phase, ended) {
            (Phase::Join, Some((Phase::Join, Ok(ChangeOutcome::Superseded { num }))))
                if num > config.num => {}
            (Phase::Leave, None) => {}
            (phase, ended) => {
                panic!(
                    "seed {seed}: cut off in {phase:?}, the stale controller ended with {ended:?}"
                )
            }
        }
        assert_eq!(
            b.query().await.expect("query"),
            settled,
            "seed {seed}: the stale controller changed the config"
        );
    } else {
        // The lab never reconnects it (5B): it stays cut off; stop it.
        task.abort();
    }
    c.exit_group(ngid).await;
    check_gets(clerk, kvs).await;
}

// RecoverCtrler5B: five rounds of partitionCtrler, without reconnecting
// the old controller.
#[tokio::test(start_paused = true)]
async fn recover_ctrler_5b() {
    const NPARTITION: usize = 5;
    let seed = common::seed("recover_ctrler_5b");
    let c = Arc::new(ShardCluster::new(seed, true));
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..NPARTITION {
        partition_ctrler(&c, &clerk, &kvs, false, &mut rng).await;
    }
    check_linearizable(&c);
}

/// ConcurrentReliable5C / AcquireLockConcurrentUnreliable5C (the lab's
/// concurCtrler): 4 controllers for 2 s, each looping: a new controller,
/// InitController, join a new gid, and if it is a member, leave it. They
/// race for every config number; afterwards every key still has its value
/// at version 1.
async fn concur_ctrler(name: &str, reliable: bool) {
    const NCTRL: usize = 4;
    const NSEC: Duration = Duration::from_secs(2);
    let seed = common::seed(name);
    let c = Arc::new(ShardCluster::new(seed, reliable));
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let done = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..NCTRL)
        .map(|_| {
            let (c, done) = (c.clone(), done.clone());
            tokio::spawn(async move {
                let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
                while !done.load(Ordering::Relaxed) {
                    let ctrl = c.controller();
                    match ctrl.init_controller().await.expect("init controller") {
                        RecoverOutcome::Finished { .. } => {
                            *outcomes.entry("recovered".into()).or_default() += 1
                        }
                        RecoverOutcome::Empty => panic!("seed {}: no config", c.seed),
                        _ => {}
                    }
                    let ngid = c.new_gid();
                    let joined = c.try_join(&ctrl, ngid).await.expect("join");
                    *outcomes.entry(format!("join {joined:?}")).or_default() += 1;
                    sleep(INTERGRPDELAY).await;
                    // Only this controller names `ngid`, and its claim is
                    // settled (won and published, or lost): once the
                    // current config lacks it, no later one has it.
                    let member = ctrl
                        .query()
                        .await
                        .expect("query")
                        .groups
                        .contains_key(&ngid);
                    if !member {
                        c.exit_group(ngid).await;
                        continue;
                    }
                    let left = c.try_leave(&ctrl, ngid).await.expect("leave");
                    *outcomes.entry(format!("leave {left:?}")).or_default() += 1;
                    if left == ChangeOutcome::Changed {
                        c.exit_group(ngid).await;
                        sleep(INTERGRPDELAY).await;
                    }
                }
                outcomes
            })
        })
        .collect();
    sleep(NSEC).await;
    done.store(true, Ordering::Relaxed);
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        for (k, n) in t.await.expect("controller task") {
            *outcomes.entry(k).or_default() += n;
        }
    }
    eprintln!("seed {seed}: controller outcomes {outcomes:?}");
    let config = ctrl.query().await.expect("query");
    config.validate().expect("a valid config");
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
}

#[tokio::test(start_paused = true)]
async fn concurrent_reliable_5c() {
    concur_ctrler("concurrent_reliable_5c", true).await;
}

#[tokio::test(start_paused = true)]
async fn acquire_lock_concurrent_unreliable_5c() {
    concur_ctrler("acquire_lock_concurrent_unreliable_5c", false).await;
}

// PartitionControllerJoin5C: controller A is stuck joining a group that is
// down, then is partitioned; the group restarts and controller B's
// InitController finishes the join (the group is a member). A is then
// reconnected: it runs its remaining steps late, must not corrupt anything,
// and must stop. Gets correct.
#[tokio::test(start_paused = true)]
async fn partition_controller_join_5c() {
    let seed = common::seed("partition_controller_join_5c");
    let c = Arc::new(ShardCluster::new(seed, true));
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;

    let a = Arc::new(c.partitionable_controller());
    a.ctrl.init_controller().await.expect("init controller");
    let num = a.ctrl.query().await.expect("query").num;
    let ngid = c.new_gid();
    c.start_group(ngid);
    c.shutdown_group(ngid).await;
    let task = tokio::spawn({
        let a = a.clone();
        async move {
            let current = a.ctrl.query().await.expect("query");
            let next = join(&current, BTreeMap::from([(ngid, members(ngid))])).expect("join");
            a.ctrl.change_config_to(next).await
        }
    });
    // A gets stuck in the join: the new group is down.
    sleep(Duration::from_secs(1)).await;
    a.set_connected(false);
    sleep(ELECTION_TIMEOUT).await;
    assert!(
        !task.is_finished(),
        "seed {seed}: the join finished with its group down"
    );
    c.start_group(ngid);

    let b = c.controller();
    let recovered = b.init_controller().await.expect("init controller");
    assert_eq!(recovered, RecoverOutcome::Finished { num: num + 1 });
    let config = b.query().await.expect("query");
    assert!(
        config.groups.contains_key(&ngid),
        "seed {seed}: didn't recover gid {ngid}"
    );
    assert!(!task.is_finished(), "seed {seed}: A finished while cut off");

    // Reconnected, A runs its remaining steps late: repeats of steps B
    // did (freeze, install, delete), each answered as done and changing
    // nothing, then its publish finds its own config published by B. It
    // reports `Changed` (its config is current, whoever finished it),
    // where the lab's controller reports an error; what matters, and is
    // checked, is that it stopped and changed nothing.
    a.set_connected(true);
    let outcome = timeout(STALE_CONTROLLER_STOP, task)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the reconnected controller did not stop"))
        .expect("task");
    eprintln!("seed {seed}: the reconnected controller returned {outcome:?}");
    assert!(
        matches!(outcome, Ok(ChangeOutcome::Changed)),
        "seed {seed}: {outcome:?}"
    );
    sleep(ELECTION_TIMEOUT).await;
    assert_eq!(b.query().await.expect("query"), config);
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
}

/// PartitionRecovery{Reliable,Unreliable}{NoClerk,Clerks}5C: `npart`
/// rounds of partitionCtrler with the stale controller reconnected; with
/// `nclerks`, that many clerks run OneClientPut on "k0" for 60 s meanwhile
/// (their history must be linearizable), else 60 keys are checked.
async fn partition_recovery(name: &str, reliable: bool, npart: usize, nclerks: usize) {
    const NSEC: Duration = Duration::from_secs(60);
    let seed = common::seed(name);
    let c = Arc::new(ShardCluster::new(seed, reliable));
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = if nclerks == 0 {
        spread_puts(&clerk).await
    } else {
        Vec::new()
    };
    let done = Arc::new(AtomicBool::new(false));
    let clerks = spawn_clerks_on_k0(&c, nclerks, &done);
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..npart {
        partition_ctrler(&c, &clerk, &kvs, true, &mut rng).await;
    }
    if nclerks > 0 {
        sleep(NSEC.saturating_sub(started.elapsed())).await;
        done.store(true, Ordering::Relaxed);
        let mut ok = 0;
        for t in clerks {
            ok += t.await.expect("clerk");
        }
        eprintln!("seed {seed}: {ok} puts succeeded");
        assert!(ok > 0, "seed {seed}: no put succeeded");
    }
    check_linearizable(&c);
}

#[tokio::test(start_paused = true)]
async fn partition_recovery_reliable_no_clerk_5c() {
    partition_recovery("partition_recovery_reliable_no_clerk_5c", true, 5, 0).await;
}

#[tokio::test(start_paused = true)]
async fn partition_recovery_unreliable_no_clerk_5c() {
    partition_recovery("partition_recovery_unreliable_no_clerk_5c", false, 3, 0).await;
}

#[tokio::test(start_paused = true)]
async fn partition_recovery_reliable_clerks_5c() {
    partition_recovery("partition_recovery_reliable_clerks_5c", true, 5, 5).await;
}

#[tokio::test(start_paused = true)]
async fn partition_recovery_unreliable_clerks_5c() {
    partition_recovery("partition_recovery_unreliable_clerks_5c", false, 3, 5).await;
}

// Beyond the lab (issue 13): an atomic batch on a sharded cluster. Keys of
// one shard are written together, under a version condition, and a
// failed condition writes nothing; keys of two shards are refused before
// anything is sent (`CrossShard`). After the shard moves to another group
// (a join), the versions moved with it: a batch conditioned on them
// applies there, and a stale condition still fails.
#[tokio::test(start_paused = true)]
async fn batches_stay_in_one_shard_and_move_with_it() {
    let c = ShardCluster::new(common::seed("batches_stay_in_one_shard"), true);
    let ctrl = c.controller();
    let config = c.init(&ctrl).await;
    let client = c.clerk().client;
    // Two keys of one shard, and one of another.
    let keys: Vec<Bytes> = (0..200).map(|i| Bytes::from(format!("key-{i}"))).collect();
    let shard = config.shard_of_key(&keys[0]);
    let same = keys[1..]
        .iter()
        .find(|k| config.shard_of_key(k) == shard)
        .expect("a second key of the shard")
        .clone();
    let other = keys
        .iter()
        .find(|k| config.shard_of_key(k) != shard)
        .expect("a key of another shard")
        .clone();
    let a = keys[0].clone();

    let mut batch = shoal_shard::WriteBatch::new();
    batch
        .check_version(a.clone(), 0)
        .put(a.clone(), "1")
        .put(same.clone(), "1");
    assert_eq!(client.write(batch).await.expect("batch"), vec![1, 1]);

    let mut stale = shoal_shard::WriteBatch::new();
    stale.check_version(a.clone(), 0).put(same.clone(), "lost");
    assert_eq!(
        client.write(stale.clone()).await,
        Err(ClientError::ConditionFailed {
            index: 0,
            current: 1
        })
    );
    assert_eq!(client.get(same.clone()).await.expect("get").value, "1");

    let mut across = shoal_shard::WriteBatch::new();
    across.put(a.clone(), "x").put(other.clone(), "x");
    assert!(matches!(
        client.write(across).await,
        Err(ClientError::CrossShard { .. })
    ));
    assert_eq!(client.get(a.clone()).await.expect("get").value, "1");
    assert_eq!(client.get(other).await, Err(ClientError::NotFound));

    // Group 2 joins; half the shards move to it, with their versions.
    let moved = c.join(&ctrl, &[2]).await;
    let mut next = shoal_shard::WriteBatch::new();
    next.check_version(a.clone(), 1)
        .check_version(same.clone(), 1)
        .put(a.clone(), "2")
        .delete(same.clone());
    assert_eq!(
        client.write(next).await.expect("batch after the move"),
        vec![2, 0]
    );
    assert_eq!(
        client.write(stale).await,
        Err(ClientError::ConditionFailed {
            index: 0,
            current: 2
        })
    );
    assert_eq!(client.get(same).await, Err(ClientError::NotFound));
    eprintln!(
        "shard {shard} is served by group {:?} after the join",
        moved.group_of(shard)
    );
}
