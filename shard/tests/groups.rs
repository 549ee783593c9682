//! Several Raft groups on the same nodes, each serving its own shard: one
//! event loop drives them all, persisting every group's Ready with one
//! synced write per round. Not a lab test; Shoal's own.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seed, Clerk, Cluster, ELECTION_TIMEOUT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_shard::client::ClientError;
use shoal_shard::node::GroupSpec;
use tokio::time::sleep;

async fn put_loop(clerk: Clerk, key: String, done: Arc<AtomicBool>, seed: u64) -> (u64, u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut ok, mut maybe) = (0, 0);
    while !done.load(Ordering::Relaxed) {
        let (_, version) = clerk.get(&key).await.expect("get");
        match clerk
            .put(&key, &format!("{}-{version}", clerk.id), version)
            .await
        {
            Ok(_) => ok += 1,
            Err(ClientError::Maybe) => maybe += 1,
            Err(ClientError::VersionMismatch { .. }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
        sleep(Duration::from_millis(rng.random_range(1..=10))).await;
    }
    (ok, maybe)
}

// Goal: two groups (shards 0 and 1) on three nodes, concurrent clients on
// both over an unreliable network with log compaction, a crash of every
// node in the middle: each shard's history is linearizable, its versions
// account for its own puts only, and the shards' keys are isolated.
#[tokio::test(start_paused = true)]
async fn two_groups_on_one_node_set() {
    let seed = seed("two_groups_on_one_node_set");
    let groups = vec![
        GroupSpec {
            group: 1,
            static_shards: vec![0],
            voters: Vec::new(),
        },
        GroupSpec {
            group: 2,
            static_shards: vec![1],
            voters: Vec::new(),
        },
    ];
    let mut cluster = Cluster::with_groups(3, false, seed, Some(2000), groups);
    let mut totals = [(0u64, 0u64); 2];
    for round in 0..2 {
        let done = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for shard in 0..2u32 {
            for c in 0..3u64 {
                let clerk = cluster.clerk_for_shard(shard);
                let key = format!("s{shard}-k");
                let task_seed = seed ^ (round * 100 + shard as u64 * 10 + c);
                tasks.push((
                    shard,
                    tokio::spawn(put_loop(clerk, key, done.clone(), task_seed)),
                ));
            }
        }
        sleep(Duration::from_secs(2)).await;
        done.store(true, Ordering::Relaxed);
        for (shard, t) in tasks {
            let (ok, maybe) = t.await.expect("client");
            totals[shard as usize].0 += ok;
            totals[shard as usize].1 += maybe;
        }
        cluster.crash_all().await;
        sleep(ELECTION_TIMEOUT).await;
        cluster.start_all();
        for shard in 0..2u32 {
            let (_, version) = cluster
                .clerk_for_shard(shard)
                .get(&format!("s{shard}-k"))
                .await
                .expect("get");
            let (ok, maybe) = totals[shard as usize];
            assert!(ok >= 1, "seed {seed}: shard {shard} made no progress");
            assert!(
                version >= ok && version <= ok + maybe,
                "seed {seed}: shard {shard}: version {version}, ok {ok}, maybe {maybe}"
            );
        }
        cluster.check_linearizable();
    }
    // Isolation: a key of shard 0 does not exist in shard 1.
    assert_eq!(
        cluster.clerk_for_shard(1).get("s0-k").await.expect("get").1,
        0,
        "seed {seed}"
    );
    for i in 0..3 {
        for group in [1, 2] {
            let status = cluster.nodes[i].as_ref().expect("running").status(group);
            assert!(
                status.applied > 0,
                "seed {seed}: node {} group {group} applied nothing",
                i + 1
            );
        }
    }
    cluster.shutdown_all().await;
}

// Goal (issue 13): a log sync window (writes acknowledged before their
// fsync) is refused on a node whose group has other voters: a replica
// acknowledging unsynced entries could let a committed entry be lost. A
// group of one takes it.
#[tokio::test]
async fn a_log_sync_window_needs_a_group_of_one() {
    use shoal_engine::{EngineConfig, MemStore};
    use shoal_net::mem::{MemConfig, MemNetwork};
    use shoal_net::NodeId;
    use shoal_shard::node::{Node, NodeConfig, NodeError};

    let dir = tempfile::tempdir().expect("tempdir");
    let net = MemNetwork::<shoal_shard::KvProtocol>::new(MemConfig::with_seed(1));
    let start = |id: u64, voters: Vec<u64>| {
        let (transport, inbox) = net.add_node(NodeId(id));
        let mut config = NodeConfig::new(id, voters, dir.path().join(id.to_string()));
        config.blocking_io = false;
        config.log_sync_window_ms = Some(5);
        let engine = MemStore::new_in_memory(EngineConfig::default()).expect("engine");
        Node::start(config, engine, transport, inbox)
    };
    match start(1, vec![1, 2, 3]) {
        Err(NodeError::SyncWindow { group, voters }) => {
            assert_eq!(group, shoal_shard::node::KV_GROUP);
            assert_eq!(voters, vec![1, 2, 3]);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a sync window on a group of three was accepted"),
    }
    let node = start(4, vec![4]).expect("a group of one takes a sync window");
    node.shutdown().await.expect("shutdown");
}
