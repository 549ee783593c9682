//! The node runtime on the real RocksDB engine (engine work on tokio's
//! blocking pool, real time), over the in-memory network: writes, reads,
//! scans, deletes, log compaction with SST snapshots streamed to a lagging
//! node, and a full restart from disk. A smoke test; the lab suites run on
//! the in-memory engine.

use std::time::Duration;

use shoal_engine::{EngineConfig, RocksEngine};
use shoal_net::mem::{MemConfig, MemNetwork};
use shoal_net::NodeId;
use shoal_shard::client::{BlockingClient, Client, ClientConfig, ClientError};
use shoal_shard::node::{Node, NodeConfig, NodeHandle, KV_GROUP};
use shoal_shard::protocol::KvProtocol;

fn start(net: &MemNetwork<KvProtocol>, root: &std::path::Path, i: u64) -> NodeHandle {
    let engine = RocksEngine::open(root.join(format!("db-{i}")), EngineConfig::default())
        .expect("open rocksdb");
    let (transport, inbox) = net.add_node(NodeId(i));
    let dir = root.join(format!("db-{i}"));
    let mut config = NodeConfig::new(i, vec![1, 2, 3], dir.join("snapshots"));
    config.max_raft_state_bytes = Some(2048);
    Node::start(config, engine, transport, inbox).expect("node starts")
}

// Goal: the runtime works end to end on RocksDB, including InstallSnapshot
// from real SST files and recovery from disk after a full restart.
#[test]
fn rocks_cluster_end_to_end() {
    let root = std::env::temp_dir().join(format!("shoal-shard-rocks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let net = runtime.block_on(async {
        {
            let mut config = MemConfig::with_seed(1);
            config.files_dir = root.join("net");
            MemNetwork::<KvProtocol>::new(config)
        }
    });
    let mut nodes: Vec<Option<NodeHandle>> =
        runtime.block_on(async { (1..=3).map(|i| Some(start(&net, &root, i))).collect() });
    let servers = vec![NodeId(1), NodeId(2), NodeId(3)];
    let mut config = ClientConfig::new(42);
    config.op_deadline = Duration::from_secs(20);
    let client = BlockingClient::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
        runtime.block_on(async { Client::new(net.add_client("rocks"), servers.clone(), config) }),
    );

    assert_eq!(client.put("a", "1"), Ok(1));
    assert_eq!(client.append("a", "2"), Ok(2));
    assert_eq!(client.get("a").expect("get").value, "12");
    assert_eq!(
        client.put_if_version("a", "x", 1),
        Err(ClientError::VersionMismatch { current: 2 })
    );
    assert_eq!(client.put_if_version("b", "x", 3), Err(ClientError::NoKey));

    // Node 3 falls behind while the log is compacted, then catches up by
    // InstallSnapshot.
    net.disconnect(NodeId(3));
    for i in 0..100 {
        client
            .put(format!("k{i:03}"), format!("v{i}"))
            .expect("put");
    }
    net.connect(NodeId(3));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let leader_applied = |nodes: &Vec<Option<NodeHandle>>| {
        nodes
            .iter()
            .flatten()
            .map(|h| h.status(KV_GROUP).applied)
            .max()
            .unwrap_or(0)
    };
    while nodes[2].as_ref().expect("running").status(KV_GROUP).applied < leader_applied(&nodes) {
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 did not catch up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        nodes[2]
            .as_ref()
            .expect("running")
            .status(KV_GROUP)
            .snapshots_installed
            >= 1,
        "node 3 caught up without a snapshot: {:?}",
        nodes
            .iter()
            .flatten()
            .map(|h| h.status(KV_GROUP))
            .collect::<Vec<_>>()
    );

    let pairs = client.scan("k", "k050", 1000).expect("scan");
    assert_eq!(pairs.len(), 50);
    assert_eq!(client.delete("k000"), Ok(true));
    assert_eq!(client.get("k000"), Err(ClientError::NotFound));

    // Full restart from disk.
    runtime.block_on(async {
        for (i, node) in nodes.iter_mut().enumerate() {
            node.take()
                .expect("running")
                .shutdown()
                .await
                .expect("clean shutdown");
            net.remove_node(NodeId(i as u64 + 1));
        }
    });
    runtime.block_on(async {
        for i in 1..=3 {
            nodes[i as usize - 1] = Some(start(&net, &root, i));
        }
    });
    assert_eq!(client.get("a").expect("get").value, "12");
    assert_eq!(client.get("k099").expect("get").value, "v99");
    assert_eq!(client.put("a", "z"), Ok(3));
    runtime.block_on(async {
        for node in nodes.iter_mut() {
            node.take()
                .expect("running")
                .shutdown()
                .await
                .expect("clean shutdown");
        }
    });
    drop(runtime);
    let _ = std::fs::remove_dir_all(&root);
}
