//! The lab-test harness: a cluster of nodes on the in-memory network and
//! engine, under tokio's paused clock, with seeded randomness and recorded
//! client histories.
//!
//! Crash = abort the node's task, remove it from the network, and
//! `MemStore::crash_and_recover()` its engine (unsynced writes are lost);
//! restart = a new node built from that engine alone.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::{EngineConfig, MemStore};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::NodeId;
use shoal_shard::client::{Client, ClientConfig, ClientError};
use shoal_shard::linearizability::{CheckOutcome, HistoryRecorder, Input, Output};
use shoal_shard::node::{
    GroupSpec, Node, NodeConfig, NodeHandle, KV_GROUP, SESSION_IDLE_MS_DEFAULT,
};
use shoal_shard::protocol::KvProtocol;
use tokio::time::Instant;

/// The lab's election timeout bound used in its sleeps.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Step budget per key for the linearizability checker. Running out fails
/// the test ([`Cluster::check_linearizable`]). The lab suites' histories
/// need far less: at most 17,598 steps in one check over four runs of
/// kvraft and one each of kvsrv, stale_reads and groups (884 checks, up to
/// 88 unknown outcomes in one history), so the budget leaves 100x room.
pub const CHECK_STEPS_PER_KEY: u64 = 2_000_000;

/// The test's seed: `SHOAL_SEED` if set, else derived from the clock.
/// Printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("SHOAL_SEED") {
        Ok(s) => s.parse().expect("SHOAL_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    eprintln!("{test}: seed {seed} (replay with SHOAL_SEED={seed})");
    seed
}

/// The seeds a seed-sweeping test runs: `SHOAL_SEED` alone, else
/// `SHOAL_SEED_BASE..SHOAL_SEED_BASE + SHOAL_SEEDS` (`SHOAL_SEEDS` defaults to `default`).
#[allow(dead_code)] // not every test binary sweeps seeds
pub fn seeds_or(test: &str, default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SHOAL_SEED") {
        let seed = s.parse().expect("SHOAL_SEED must be a u64");
        eprintln!("{test}: seed {seed}");
        return vec![seed];
    }
    let n = std::env::var("SHOAL_SEEDS")
        .map(|s| s.parse().expect("SHOAL_SEEDS must be a u64"))
        .unwrap_or(default);
    let base: u64 = std::env::var("SHOAL_SEED_BASE")
        .map(|s| s.parse().expect("SHOAL_SEED_BASE must be a u64"))
        .unwrap_or(0);
    eprintln!(
        "{test}: seeds {base}..{} (replay one with SHOAL_SEED=s)",
        base + n
    );
    (base..base + n).collect()
}

/// A cluster of `n` nodes (ids 1..=n).
pub struct Cluster {
    pub net: MemNetwork<KvProtocol>,
    pub n: usize,
    pub engines: Vec<MemStore>,
    pub nodes: Vec<Option<NodeHandle>>,
    pub seed: u64,
    pub rng: ChaCha8Rng,
    next_client: AtomicU64,
    pub recorder: Arc<HistoryRecorder>,
    pub start: Instant,
    incarnation: u64,
    /// The lab's maxraftstate (`None` for -1).
    pub max_raft_state: Option<u64>,
    pub dir: std::path::PathBuf,
    /// Groups every node hosts (default: the one KV group).
    pub groups: Vec<GroupSpec>,
    /// The nodes' session idle time (`NodeConfig::session_idle_ms`).
    pub session_idle_ms: u64,
    /// The last this many nodes are not members at first: they start
    /// joining (`NodeConfig::join`), and the group's voters are the others.
    pub joiners: usize,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            for (i, node) in self.nodes.iter().enumerate() {
                if let Some(h) = node {
                    assert!(
                        h.is_running(),
                        "seed {}: node {} stopped on its own (error or panic)",
                        self.seed,
                        i + 1
                    );
                }
            }
        }
    }
}

/// The one KV group every node hosts by default, serving shard 0.
fn kv_group() -> Vec<GroupSpec> {
    vec![GroupSpec {
        group: KV_GROUP,
        static_shards: vec![0],
        voters: Vec::new(),
    }]
}

impl Cluster {
    pub fn new(n: usize, reliable: bool, seed: u64) -> Cluster {
        Cluster::with_max_raft_state(n, reliable, seed, None)
    }

    pub fn with_max_raft_state(
        n: usize,
        reliable: bool,
        seed: u64,
        max_raft_state: Option<u64>,
    ) -> Cluster {
        let groups = kv_group();
        Cluster::with_groups(n, reliable, seed, max_raft_state, groups)
    }

    pub fn with_groups(
        n: usize,
        reliable: bool,
        seed: u64,
        max_raft_state: Option<u64>,
        groups: Vec<GroupSpec>,
    ) -> Cluster {
        Cluster::build(
            n,
            reliable,
            seed,
            max_raft_state,
            groups,
            SESSION_IDLE_MS_DEFAULT,
            0,
        )
    }

    /// A cluster of `n` nodes of which the last `joiners` start joining
    /// (not members until added); the log is cut beyond `max_raft_state`.
    #[allow(dead_code)]
    pub fn with_joiners(
        n: usize,
        joiners: usize,
        reliable: bool,
        seed: u64,
        max_raft_state: Option<u64>,
    ) -> Cluster {
        let groups = kv_group();
        Cluster::build(
            n,
            reliable,
            seed,
            max_raft_state,
            groups,
            SESSION_IDLE_MS_DEFAULT,
            joiners,
        )
    }

    /// A reliable cluster whose nodes expire sessions idle `session_idle_ms`.
    pub fn with_session_idle_ms(n: usize, seed: u64, session_idle_ms: u64) -> Cluster {
        let groups = kv_group();
        Cluster::build(n, true, seed, None, groups, session_idle_ms, 0)
    }

    fn build(
        n: usize,
        reliable: bool,
        seed: u64,
        max_raft_state: Option<u64>,
        groups: Vec<GroupSpec>,
        session_idle_ms: u64,
        joiners: usize,
    ) -> Cluster {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        // Snapshot exports fsync every file; on tmpfs that costs nothing.
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!(
            "shoal-shard-test-{}-{seed}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let net = MemNetwork::new(config);
        net.set_reliable(reliable);
        let engines = (0..n)
            .map(|_| MemStore::new_in_memory(EngineConfig::default()).expect("engine"))
            .collect();
        let mut cluster = Cluster {
            net,
            n,
            engines,
            nodes: (0..n).map(|_| None).collect(),
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_client: AtomicU64::new(1),
            recorder: Arc::new(HistoryRecorder::new()),
            start: Instant::now(),
            incarnation: 0,
            max_raft_state,
            dir,
            groups,
            session_idle_ms,
            joiners,
        };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.n as u64).map(NodeId).collect()
    }

    pub fn id(&self, i: usize) -> NodeId {
        NodeId(i as u64 + 1)
    }

    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        self.incarnation += 1;
        let (transport, inbox) = self.net.add_node(self.id(i));
        let mut config = NodeConfig::new(
            i as u64 + 1,
            (1..=(self.n - self.joiners) as u64).collect(),
            self.dir.join(format!("node-{}", i + 1)),
        );
        config.join = i >= self.n - self.joiners;
        config.seed = self
            .seed
            .wrapping_add(self.incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        config.blocking_io = false;
        config.max_raft_state_bytes = self.max_raft_state;
        config.groups = self.groups.clone();
        config.session_idle_ms = self.session_idle_ms;
        let handle =
            Node::start(config, self.engines[i].clone(), transport, inbox).expect("node starts");
        self.nodes[i] = Some(handle);
    }

    /// Crashes node `i`: its task dies, its links go, unsynced writes are lost.
    pub async fn crash_node(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.crash()
                .await
                .expect("the node was healthy until the crash");
        }
        self.net.remove_node(self.id(i));
        self.engines[i]
            .crash_and_recover()
            .expect("engine recovers");
    }

    pub async fn crash_all(&mut self) {
        for i in 0..self.n {
            self.crash_node(i).await;
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.n {
            if self.nodes[i].is_none() {
                self.start_node(i);
            }
        }
    }

    /// Shuts node `i` down gracefully (a leader hands off first).
    #[allow(dead_code)]
    pub async fn shutdown_node(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.shutdown().await.expect("clean shutdown");
        }
        self.net.remove_node(self.id(i));
    }

    /// Shuts every node down gracefully.
    pub async fn shutdown_all(&mut self) {
        for i in 0..self.n {
            if let Some(h) = self.nodes[i].take() {
                h.shutdown().await.expect("clean shutdown");
            }
            self.net.remove_node(self.id(i));
        }
    }

    /// Waits (virtual time) until some node leads; panics after `bound`.
    pub async fn wait_for_leader(&self, bound: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(
                start.elapsed() < bound,
                "seed {}: no leader within {bound:?}",
                self.seed
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The index of a node that believes it leads, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.n).find(|&i| self.nodes[i].as_ref().is_some_and(|h| h.is_leader()))
    }

    /// The largest raft state (stored log bytes) over the running nodes.
    pub fn max_log_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .flatten()
            .map(|h| h.status(KV_GROUP).log_bytes)
            .max()
            .unwrap_or(0)
    }

    /// The largest snapshot over the running nodes.
    pub fn max_snapshot_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .flatten()
            .map(|h| h.status(KV_GROUP).snapshot_bytes)
            .max()
            .unwrap_or(0)
    }

    pub fn applied(&self, i: usize) -> u64 {
        self.nodes[i]
            .as_ref()
            .map_or(0, |h| h.status(KV_GROUP).applied)
    }

    pub fn client_config(&self) -> ClientConfig {
        let id = (self.seed << 16) | self.next_client.fetch_add(1, Ordering::Relaxed);
        let mut c = ClientConfig::new(id.max(1));
        c.session_idle_ms = self.session_idle_ms;
        // The lab's clerks retry forever; a generous deadline stands in,
        // within the longest a session allows (half its idle time).
        c.op_deadline =
            Duration::from_secs(600).min(Duration::from_millis(self.session_idle_ms / 2));
        c
    }

    pub fn client(&self) -> Client<MemClient<KvProtocol>> {
        let config = self.client_config();
        let name = format!("client-{}", config.client_id);
        Client::new(self.net.add_client(&name), self.ids(), config)
    }

    /// A client whose operations are recorded into the cluster's history.
    pub fn clerk(&self) -> Clerk {
        self.clerk_for_shard(0)
    }

    /// A recorded client of shard `shard`.
    pub fn clerk_for_shard(&self, shard: u32) -> Clerk {
        let mut config = self.client_config();
        config.shard = shard;
        config.group = self
            .groups
            .iter()
            .find(|g| g.static_shards.contains(&shard))
            .map_or(KV_GROUP, |g| g.group);
        let name = format!("client-{}", config.client_id);
        let client = Client::new(self.net.add_client(&name), self.ids(), config);
        Clerk {
            id: client.id(),
            client,
            recorder: self.recorder.clone(),
            start: self.start,
        }
    }

    /// Checks the recorded history: panics with the explanation on a
    /// violation, and also when the checker runs out of its step budget
    /// before a verdict, because a check that decided nothing is not a
    /// pass. Tests keep their histories within reach of a verdict: keys
    /// spread the operations (the search is per key) and unknown outcomes
    /// stay rare (each widens the search on its key).
    pub fn check_linearizable(&self) {
        let history = self.recorder.history();
        let outcome = self.recorder.check(CHECK_STEPS_PER_KEY);
        match &outcome {
            CheckOutcome::Linearizable { .. } => eprintln!(
                "seed {}: {} operations ({} unknown): {outcome}",
                self.seed,
                history.len(),
                history.iter().filter(|op| op.is_unknown()).count()
            ),
            CheckOutcome::NotLinearizable { .. } => {
                panic!("seed {}: history is not linearizable: {outcome}", self.seed)
            }
            CheckOutcome::BudgetExhausted { .. } => panic!(
                "seed {}: the linearizability check reached no verdict ({outcome}) on a \
                 history of {} operations ({} unknown): the test's history is too big for \
                 CHECK_STEPS_PER_KEY; spread it over more keys or make it shorter",
                self.seed,
                history.len(),
                history.iter().filter(|op| op.is_unknown()).count()
            ),
        }
    }

    /// Random halves for a partition: (majority, minority) of node indexes.
    pub fn random_halves(&mut self) -> (Vec<NodeId>, Vec<NodeId>) {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..self.n {
            if self.rng.random_bool(0.5) {
                a.push(self.id(i));
            } else {
                b.push(self.id(i));
            }
        }
        (a, b)
    }
}

/// A client whose operations go into the shared history.
#[derive(Clone)]
pub struct Clerk {
    pub id: u64,
    pub client: Client<MemClient<KvProtocol>>,
    pub recorder: Arc<HistoryRecorder>,
    pub start: Instant,
}

impl Clerk {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Get, recorded. Returns (value, version), version 0 if absent.
    pub async fn get(&self, key: &str) -> Result<(Bytes, u64), ClientError> {
        let key_bytes = Bytes::copy_from_slice(key.as_bytes());
        let token = self.recorder.begin_at(
            self.id,
            Input::Get {
                key: key_bytes.clone(),
            },
            self.now(),
        );
        let t0 = Instant::now();
        let r = self.client.get(key_bytes).await;
        if std::env::var("SHOAL_DEBUG_SLOW").is_ok() && t0.elapsed() > Duration::from_millis(200) {
            eprintln!("slow get: {:?} -> {r:?}", t0.elapsed());
        }
        match &r {
            Ok(v) => self.recorder.end_at(
                token,
                Output::Value {
                    value: v.value.clone(),
                    version: v.version,
                },
                self.now(),
            ),
            Err(ClientError::NotFound) => self.recorder.end_at(token, Output::NotFound, self.now()),
            Err(_) => self.recorder.end_unknown_at(token, self.now()),
        }
        match r {
            Ok(v) => Ok((v.value, v.version)),
            Err(ClientError::NotFound) => Ok((Bytes::new(), 0)),
            Err(e) => Err(e),
        }
    }

    /// The lab's versioned Put, recorded.
    pub async fn put(&self, key: &str, value: &str, version: u64) -> Result<u64, ClientError> {
        let key_bytes = Bytes::copy_from_slice(key.as_bytes());
        let value_bytes = Bytes::copy_from_slice(value.as_bytes());
        let input = Input::PutIfVersion {
            key: key_bytes.clone(),
            value: value_bytes.clone(),
            version,
        };
        let token = self.recorder.begin_at(self.id, input, self.now());
        let t0 = Instant::now();
        let r = self
            .client
            .put_if_version(key_bytes, value_bytes, version)
            .await;
        if std::env::var("SHOAL_DEBUG_SLOW").is_ok() && t0.elapsed() > Duration::from_millis(200) {
            eprintln!("slow put: {:?} -> {r:?}", t0.elapsed());
        }
        let output = match &r {
            Ok(v) => Output::Written { version: *v },
            Err(ClientError::VersionMismatch { .. }) => Output::VersionMismatch,
            Err(ClientError::NoKey) => Output::NoKey,
            Err(_) => Output::Unknown,
        };
        self.recorder.end_at(token, output, self.now());
        r
    }
}
