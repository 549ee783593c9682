//! Goal (issue 10, item 8): heavy snapshot work never runs on the event loop
//! that ticks every Raft group. Three nodes on RocksDB (real time, the
//! in-memory network) with a short election timeout write a state far
//! larger than the compaction threshold, so every node exports an SST
//! snapshot of it (and the lagging-free cluster compacts); throughout, no
//! election may happen. When the export, its checksums or a scan of the
//! log ran on the loop, heartbeats stalled past the election timeout and a
//! follower took over.

use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::{EngineConfig, RocksEngine};
use shoal_net::mem::{MemConfig, MemNetwork};
use shoal_net::NodeId;
use shoal_shard::client::{Client, ClientConfig};
use shoal_shard::node::{GroupStatus, Node, NodeConfig, NodeHandle, KV_GROUP};
use shoal_shard::protocol::KvProtocol;

/// Tick length: the election timeout is 10 to 20 ticks (200-400 ms), long
/// enough that a slow fsync does not look like a stall.
const TICK_MS: u64 = 20;
/// Values written, each incompressible.
const VALUES: usize = 64;
const VALUE_BYTES: usize = 1 << 20;
/// Compaction threshold: well below the state, so every node exports.
const MAX_RAFT_STATE_BYTES: u64 = 16 << 20;

fn start(net: &MemNetwork<KvProtocol>, root: &std::path::Path, i: u64) -> NodeHandle {
    let dir = root.join(format!("db-{i}"));
    let engine = RocksEngine::open(&dir, EngineConfig::default()).expect("open rocksdb");
    let (transport, inbox) = net.add_node(NodeId(i));
    let mut config = NodeConfig::new(i, vec![1, 2, 3], dir.join("snapshots"));
    config.tick_ms = TICK_MS;
    config.max_raft_state_bytes = Some(MAX_RAFT_STATE_BYTES);
    Node::start(config, engine, transport, inbox).expect("node starts")
}

fn statuses(nodes: &[NodeHandle]) -> Vec<GroupStatus> {
    nodes.iter().map(|n| n.status(KV_GROUP)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_snapshot_export_causes_no_leader_change() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut net_config = MemConfig::with_seed(1);
    net_config.files_dir = root.path().join("net");
    let net = MemNetwork::<KvProtocol>::new(net_config);
    let nodes: Vec<NodeHandle> = (1..=3).map(|i| start(&net, root.path(), i)).collect();
    let mut config = ClientConfig::new(7);
    config.op_deadline = Duration::from_secs(30);
    let client = Client::new(
        net.add_client("offloop"),
        vec![NodeId(1), NodeId(2), NodeId(3)],
        config,
    );
    client.put("warm", "up").await.expect("first put");
    // Wait until every node knows the leader of the first term.
    let start = tokio::time::Instant::now();
    let (term, leader) = loop {
        let s = statuses(&nodes);
        if s[0].leader != 0
            && s.iter()
                .all(|x| x.leader == s[0].leader && x.term == s[0].term)
        {
            break (s[0].term, s[0].leader);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no stable leader: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for i in 0..VALUES {
        let mut value = vec![0u8; VALUE_BYTES];
        rng.fill_bytes(&mut value);
        client
            .put(format!("k{i:03}"), value)
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
    }
    // Every node exports (the state is 4x the threshold) and compacts.
    let start = tokio::time::Instant::now();
    loop {
        let s = statuses(&nodes);
        if s.iter().all(|x| x.snapshot_index > 0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no snapshot on every node: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client
        .put("after", "export")
        .await
        .expect("put after the export");

    let s = statuses(&nodes);
    for (i, x) in s.iter().enumerate() {
        assert_eq!(
            (x.term, x.leader),
            (term, leader),
            "node {}: a leader change happened during the export: {s:?}",
            i + 1
        );
    }
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }
}
