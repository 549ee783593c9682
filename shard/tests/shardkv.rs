//! Lab 5 (shardkv) of MIT 6.5840, re-expressed on the production runtime:
//! the controller group (group 0, the lab's kvsrv that stores configs) on
//! nodes 1–3, each replica group `g` on its own nodes `10g+1 ..= 10g+3`,
//! all on the in-memory network with virtual time. The controller is
//! `shard::controller::Controller` over `GroupStore` and `RpcMover`;
//! clerks are sharded `Client`s. Test names and thresholds follow
//! `TESTS-6.5840.md` §6 (12 shards, 60 keys, 3 servers per group).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Clerk;
use shoal_engine::{EngineConfig, GroupId, MemStore};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::{NodeId, ADMIN_CLIENT_NAME};
use shoal_shard::client::{Client, ClientConfig, ClientError};
use shoal_shard::controller::{
    join, leave, ChangeOutcome, Controller, ControllerConfig, GroupStore, InitOutcome, RpcMover,
    ShardConfig,
};
use shoal_shard::linearizability::{CheckOutcome, HistoryRecorder};
use shoal_shard::node::{
    GroupSpec, Node, NodeConfig, NodeHandle, CONTROLLER_GROUP, CONTROLLER_SHARD,
};
use shoal_shard::protocol::KvProtocol;
use tokio::time::Instant;

/// The lab's shard count.
const NSHARDS: u32 = 12;
/// The lab's key count.
const NKEYS: usize = 60;
/// The first replica group (owns every shard at config 1).
const GID1: GroupId = 1;

type Ctrl = Controller<GroupStore<MemClient<KvProtocol>>, RpcMover<MemClient<KvProtocol>>>;

/// The nodes of group `g` (the controller group is 0).
fn members(group: GroupId) -> Vec<u64> {
    (1..=3).map(|i| group * 10 + i).collect()
}

struct ShardCluster {
    net: MemNetwork<KvProtocol>,
    engines: HashMap<u64, MemStore>,
    nodes: HashMap<u64, NodeHandle>,
    dir: std::path::PathBuf,
    seed: u64,
    incarnation: u64,
    next_client: AtomicU64,
    recorder: Arc<HistoryRecorder>,
    start: Instant,
}

impl ShardCluster {
    fn new(seed: u64, reliable: bool) -> ShardCluster {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shoal-shardkv-{}-{seed}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let net = MemNetwork::new(config);
        net.set_reliable(reliable);
        let mut c = ShardCluster {
            net,
            engines: HashMap::new(),
            nodes: HashMap::new(),
            dir,
            seed,
            incarnation: 0,
            next_client: AtomicU64::new(1),
            recorder: Arc::new(HistoryRecorder::new()),
            start: Instant::now(),
        };
        c.start_group(CONTROLLER_GROUP);
        c
    }

    fn start_node(&mut self, group: GroupId, id: u64) {
        self.incarnation += 1;
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
        config.seed = self.seed ^ self.incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let handle = Node::start(config, engine, transport, inbox).expect("node starts");
        self.nodes.insert(id, handle);
    }

    /// Starts (or restarts) every node of `group`.
    fn start_group(&mut self, group: GroupId) {
        for id in members(group) {
            if !self.nodes.contains_key(&id) {
                self.start_node(group, id);
            }
        }
    }

    /// Crashes every node of `group` (the lab's ShutdownServer for each):
    /// unsynced writes are lost, links go.
    async fn shutdown_group(&mut self, group: GroupId) {
        for id in members(group) {
            if let Some(h) = self.nodes.remove(&id) {
                h.crash().await.expect("healthy until the crash");
            }
            self.net.remove_node(NodeId(id));
            if let Some(e) = self.engines.get(&id) {
                e.crash_and_recover().expect("recovers");
            }
        }
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
        let config = self.client_config();
        let store = GroupStore::new(Client::new(
            self.net.add_client(&format!("client-{}", config.client_id)),
            Self::controller_ids(),
            {
                let mut c = config.clone();
                c.group = CONTROLLER_GROUP;
                c.shard = CONTROLLER_SHARD;
                c
            },
        ));
        let mover = RpcMover::new(
            self.net.add_client(ADMIN_CLIENT_NAME),
            Duration::from_secs(1),
        );
        let timing = ControllerConfig {
            step_deadline: Duration::from_secs(60),
            ..Default::default()
        };
        Controller::new(store, mover, timing).expect("controller config")
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
    async fn init(&mut self, ctrl: &Ctrl) -> ShardConfig {
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

    async fn join(&mut self, ctrl: &Ctrl, groups: &[GroupId]) -> ShardConfig {
        for &g in groups {
            self.start_group(g);
        }
        let current = ctrl.query().await.expect("query");
        let next = join(&current, groups.iter().map(|&g| (g, members(g))).collect()).expect("join");
        assert_eq!(
            ctrl.change_config_to(next.clone()).await.expect("change"),
            ChangeOutcome::Changed
        );
        next
    }

    async fn leave(&mut self, ctrl: &Ctrl, groups: &[GroupId]) -> ShardConfig {
        let current = ctrl.query().await.expect("query");
        let next = leave(&current, groups).expect("leave");
        assert_eq!(
            ctrl.change_config_to(next.clone()).await.expect("change"),
            ChangeOutcome::Changed
        );
        next
    }

    fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Checks the recorded history; a check without a verdict fails too.
fn check_linearizable(c: &ShardCluster) {
    let outcome = c.recorder.check(common::CHECK_STEPS_PER_KEY);
    assert!(
        matches!(outcome, CheckOutcome::Linearizable { .. }),
        "seed {}: {outcome}",
        c.seed
    );
}

/// Puts `NKEYS` keys (version 0 → 1) and returns them with their values.
async fn spread_puts(clerk: &Clerk) -> Vec<(String, String)> {
    let mut kvs = Vec::new();
    for i in 0..NKEYS {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
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
async fn check_shutdown_sharding(c: &mut ShardCluster, down: GroupId, kvs: &[(String, String)]) {
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
            Err(ClientError::Timeout) => assert!(on_down, "key {k} on a live group timed out"),
            Err(e) => panic!("key {k}: {e}"),
        }
    }
    c.start_group(down);
}

// InitQuery5A: after InitConfig, Query returns config 1 with Gid1 owning
// every shard, balanced.
#[tokio::test(start_paused = true)]
async fn init_query_5a() {
    let mut c = ShardCluster::new(common::seed("init_query_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let config = ctrl.query().await.expect("query");
    assert_eq!(config.num, 1);
    assert_eq!(config.shards[0], GID1);
    assert!(config.shards.iter().all(|&g| g == GID1));
    c.cleanup();
}

// StaticOneShardGroup5A: 60 puts, gets with version 1; Gid1's Raft
// leader crashes; gets still correct.
#[tokio::test(start_paused = true)]
async fn static_one_shard_group_5a() {
    let mut c = ShardCluster::new(common::seed("static_one_shard_group_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    check_gets(&clerk, &kvs).await;
    let leader = members(GID1)
        .into_iter()
        .find(|id| c.nodes[id].status(GID1).role == Some(shoal_consensus::Role::Leader))
        .expect("a leader");
    let h = c.nodes.remove(&leader).expect("node");
    h.crash().await.expect("crash");
    c.net.remove_node(NodeId(leader));
    c.engines[&leader].crash_and_recover().expect("recover");
    check_gets(&clerk, &kvs).await;
    c.cleanup();
}

// JoinBasic5A: join gid 2: the config number grows by one and gid 2 owns
// shards; with either group shut down, only its keys are unavailable; all
// gets correct.
#[tokio::test(start_paused = true)]
async fn join_basic_5a() {
    let mut c = ShardCluster::new(common::seed("join_basic_5a"), true);
    let ctrl = c.controller();
    c.init(&ctrl).await;
    let clerk = c.clerk();
    let kvs = spread_puts(&clerk).await;
    let config = c.join(&ctrl, &[2]).await;
    assert_eq!(config.num, 2);
    assert!(!config.shards_of(2).is_empty());
    check_gets(&clerk, &kvs).await;
    check_shutdown_sharding(&mut c, GID1, &kvs).await;
    check_shutdown_sharding(&mut c, 2, &kvs).await;
    check_gets(&clerk, &kvs).await;
    c.cleanup();
}

// JoinLeaveBasic5A: join gid 2; Gid1 leaves and is shut down; its data is
// still readable (from gid 2); Gid1 restarts and re-joins.
#[tokio::test(start_paused = true)]
async fn join_leave_basic_5a() {
    let mut c = ShardCluster::new(common::seed("join_leave_basic_5a"), true);
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
    check_shutdown_sharding(&mut c, 2, &kvs).await;
    c.start_group(GID1);
    let config = c.join(&ctrl, &[GID1]).await;
    assert!(!config.shards_of(GID1).is_empty());
    check_gets(&clerk, &kvs).await;
    check_linearizable(&c);
    c.cleanup();
}
