//! The MIT 6.5840 lab-4B kvraft tests, same names and thresholds, on the
//! in-memory network and engine under tokio's paused clock.
//!
//! Virtual time: the network delivers instantly when reliable, so a test
//! client pauses 1–10 ms (virtual) between operations, standing in for the
//! lab's real per-operation latency; otherwise a reliable round would never
//! let the paused clock advance. Every test is seeded (`SHOAL_SEED` replays)
//! and every concurrent history is checked by the linearizability checker.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seed, Clerk, Cluster, ELECTION_TIMEOUT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_net::NodeId;
use shoal_shard::client::ClientError;
use tokio::time::{sleep, Instant};

/// Rounds of the generic test.
const NITER: usize = 3;
/// Seconds the clients run per round.
const NSEC: u64 = 1;

#[derive(Clone, Copy)]
struct Generic {
    nclients: usize,
    nservers: usize,
    reliable: bool,
    crash: bool,
    partitions: bool,
    randomkeys: bool,
    /// The lab's maxraftstate; `None` for -1 (never snapshot).
    maxraftstate: Option<u64>,
}

/// Per-key counts of one client: successful and maybe-applied puts.
#[derive(Default, Clone)]
struct Counts {
    ok: Vec<u64>,
    maybe: Vec<u64>,
}

/// The lab's OneClientPut: until `done`, pick a key, read it, then put
/// `{id, version}` at the version read. OK, ErrVersion and ErrMaybe are
/// allowed outcomes.
async fn one_client_put(
    cli: usize,
    clerk: Clerk,
    keys: Arc<Vec<String>>,
    done: Arc<AtomicBool>,
    seed: u64,
) -> Counts {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut counts = Counts {
        ok: vec![0; keys.len()],
        maybe: vec![0; keys.len()],
    };
    while !done.load(Ordering::Relaxed) {
        let n = rng.random_range(0..keys.len());
        let key = &keys[n];
        let (_, version) = clerk.get(key).await.expect("get retries until it succeeds");
        let value = format!("{{\"Id\":{cli},\"Ver\":{version}}}");
        match clerk.put(key, &value, version).await {
            Ok(_) => counts.ok[n] += 1,
            Err(ClientError::Maybe) => counts.maybe[n] += 1,
            Err(ClientError::VersionMismatch { .. }) => {}
            Err(e) => panic!("client {cli}: unexpected put error {e:?}"),
        }
        sleep(Duration::from_millis(rng.random_range(1..=10))).await;
    }
    counts
}

/// The lab's Partitioner: repeatedly split the servers at random into two
/// sides, every election timeout plus up to 200 ms, until told to stop.
async fn partitioner(
    net: shoal_net::mem::MemNetwork<shoal_shard::KvProtocol>,
    ids: Vec<NodeId>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for id in &ids {
            if rng.random_bool(0.5) {
                a.push(*id)
            } else {
                b.push(*id)
            }
        }
        net.partition(&[&a, &b]);
        sleep(ELECTION_TIMEOUT + Duration::from_millis(rng.random_range(0..200))).await;
    }
}

async fn generic_test(name: &str, g: Generic) {
    generic_test_clerks(name, g, false).await
}

/// The generic test; with `one_client`, the `nclients` clerks are clones
/// of ONE client, whose operations then run concurrently, each write on a
/// session of its own from the client's pool.
async fn generic_test_clerks(name: &str, g: Generic, one_client: bool) {
    let seed = seed(name);
    let mut cluster = Cluster::with_max_raft_state(g.nservers, g.reliable, seed, g.maxraftstate);
    let keys: Arc<Vec<String>> = Arc::new(if g.randomkeys {
        (0..100).map(|i| format!("k{i}")).collect()
    } else {
        vec!["k".to_string()]
    });
    let clerks: Vec<Clerk> = if one_client {
        let clerk = cluster.clerk();
        vec![clerk; g.nclients]
    } else {
        (0..g.nclients).map(|_| cluster.clerk()).collect()
    };
    let mut total = Counts {
        ok: vec![0; keys.len()],
        maybe: vec![0; keys.len()],
    };
    for round in 0..NITER {
        let done = Arc::new(AtomicBool::new(false));
        let stop_partitioner = Arc::new(AtomicBool::new(false));
        let partitioner_task = g.partitions.then(|| {
            tokio::spawn(partitioner(
                cluster.net.clone(),
                cluster.ids(),
                stop_partitioner.clone(),
                seed ^ (round as u64 + 1) << 20,
            ))
        });
        let tasks: Vec<_> = clerks
            .iter()
            .enumerate()
            .map(|(cli, clerk)| {
                let client_seed = seed ^ ((round * 1000 + cli) as u64).wrapping_mul(0x9E37_79B9);
                tokio::spawn(one_client_put(
                    cli,
                    clerk.clone(),
                    keys.clone(),
                    done.clone(),
                    client_seed,
                ))
            })
            .collect();
        sleep(Duration::from_secs(NSEC)).await;
        done.store(true, Ordering::Relaxed);
        for t in tasks {
            let c = t.await.expect("client task");
            for k in 0..keys.len() {
                total.ok[k] += c.ok[k];
                total.maybe[k] += c.maybe[k];
            }
        }
        if let Some(t) = partitioner_task {
            stop_partitioner.store(true, Ordering::Relaxed);
            t.await.expect("partitioner");
            cluster.net.heal();
            sleep(ELECTION_TIMEOUT).await;
        }
        if g.crash {
            cluster.crash_all().await;
            sleep(ELECTION_TIMEOUT).await;
            cluster.start_all();
        }
        // Version check, through a client that is not recorded.
        let checker = cluster.client();
        for (k, key) in keys.iter().enumerate() {
            let version = match checker.get(key.clone()).await {
                Ok(v) => v.version,
                Err(ClientError::NotFound) => 0,
                Err(e) => panic!("seed {seed}: final get of {key}: {e:?}"),
            };
            if g.reliable && !g.crash && !g.partitions {
                assert_eq!(
                    version, total.ok[k],
                    "seed {seed}: key {key}: version != number of successful puts"
                );
            } else {
                assert!(
                    version <= total.ok[k] + total.maybe[k],
                    "seed {seed}: key {key}: version {version} > ok {} + maybe {}",
                    total.ok[k],
                    total.maybe[k]
                );
                assert!(
                    version >= total.ok[k],
                    "seed {seed}: key {key}: version {version} < ok {}",
                    total.ok[k]
                );
            }
        }
        // Size checks: the log stays within 8x maxraftstate; without one,
        // no snapshot is ever taken.
        match g.maxraftstate {
            Some(max) => {
                let size = cluster.max_log_bytes();
                assert!(
                    size <= 8 * max,
                    "seed {seed}: raft state {size} bytes > 8 x maxraftstate {max}"
                );
            }
            None => assert_eq!(
                cluster.max_snapshot_bytes(),
                0,
                "seed {seed}: snapshot taken without maxraftstate"
            ),
        }
        let history = cluster.recorder.history();
        eprintln!(
            "{name}: round {round}: {} ops recorded ({} unknown), {} puts ok, {} maybe",
            history.len(),
            history.iter().filter(|o| o.is_unknown()).count(),
            total.ok.iter().sum::<u64>(),
            total.maybe.iter().sum::<u64>()
        );
        cluster.check_linearizable();
    }
    cluster.shutdown_all().await;
}

// Goal: one client, five reliable servers, versioned puts and gets work
// and the history is linearizable.
#[tokio::test(start_paused = true)]
async fn test_basic_4b() {
    generic_test(
        "TestBasic4B",
        Generic {
            nclients: 1,
            nservers: 5,
            reliable: true,
            crash: false,
            partitions: false,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: operations do not wait for a heartbeat to commit: 1000 sequential
// puts average at most a third of the 100 ms heartbeat interval (virtual
// time), and the final version is 1000.
#[tokio::test(start_paused = true)]
async fn test_speed_4b() {
    let seed = seed("TestSpeed4B");
    let mut cluster = Cluster::new(3, true, seed);
    let clerk = cluster.clerk();
    // Wait for a leader.
    clerk.get("x").await.expect("first get");
    const NOPS: u64 = 1000;
    let start = Instant::now();
    for i in 0..NOPS {
        clerk.put("x", "x 0 1 y", i).await.expect("put succeeds");
    }
    let per_op = start.elapsed() / NOPS as u32;
    let heartbeat = Duration::from_millis(100);
    assert!(
        per_op <= heartbeat / 3,
        "seed {seed}: operations too slow: {per_op:?} per op (limit {:?})",
        heartbeat / 3
    );
    let (_, version) = clerk.get("x").await.expect("get");
    assert_eq!(version, NOPS, "seed {seed}");
    cluster.shutdown_all().await;
}

// Goal: five concurrent clients on reliable servers.
#[tokio::test(start_paused = true)]
async fn test_concurrent_4b() {
    generic_test(
        "TestConcurrent4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: true,
            crash: false,
            partitions: false,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: five concurrent clients on an unreliable network.
#[tokio::test(start_paused = true)]
async fn test_unreliable_4b() {
    generic_test(
        "TestUnreliable4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: false,
            partitions: false,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: concurrent clients each complete 10 versioned puts on one key over
// an unreliable network; the history is linearizable and the final version
// lies between the acknowledged and the possibly-applied puts.
#[tokio::test(start_paused = true)]
async fn test_unreliable_one_key_4b() {
    let seed = seed("TestUnreliableOneKey4B");
    let mut cluster = Cluster::new(5, false, seed);
    const NCLIENT: usize = 5;
    const UPTO: usize = 10;
    let tasks: Vec<_> = (0..NCLIENT)
        .map(|cli| {
            let clerk = cluster.clerk();
            tokio::spawn(async move {
                let (mut ok, mut maybe) = (0u64, 0u64);
                for j in 0..UPTO {
                    loop {
                        let (_, version) = clerk.get("k").await.expect("get");
                        match clerk.put("k", &format!("x {cli} {j} y"), version).await {
                            Ok(_) => {
                                ok += 1;
                                break;
                            }
                            Err(ClientError::Maybe) => {
                                maybe += 1;
                                break;
                            }
                            Err(ClientError::VersionMismatch { .. }) => continue,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                }
                (ok, maybe)
            })
        })
        .collect();
    let (mut ok, mut maybe) = (0, 0);
    for t in tasks {
        let (o, m) = t.await.expect("client");
        ok += o;
        maybe += m;
    }
    let (_, version) = cluster.clerk().get("k").await.expect("get");
    assert!(
        version >= ok && version <= ok + maybe,
        "seed {seed}: version {version}, ok {ok}, maybe {maybe}"
    );
    cluster.check_linearizable();
    cluster.shutdown_all().await;
}

// Goal: a leader cut off in a minority of two cannot complete a put or a
// get for a second, while the majority keeps working; after healing, the
// minority's put finishes within 3 s and is visible.
#[tokio::test(start_paused = true)]
async fn test_one_partition_4b() {
    let seed = seed("TestOnePartition4B");
    let mut cluster = Cluster::new(5, false, seed);
    let ck = cluster.clerk();
    ck.put("1", "13", 0).await.expect("first put");
    let leader = loop {
        if let Some(l) = cluster.leader() {
            break l;
        }
        sleep(Duration::from_millis(50)).await;
    };
    let minority: Vec<NodeId> = vec![cluster.id(leader), cluster.id((leader + 1) % 5)];
    let majority: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|id| !minority.contains(id))
        .collect();
    cluster.net.partition(&[&majority, &minority]);
    let ckp1 = cluster.clerk();
    let ckp2a = cluster.clerk();
    let ckp2b = cluster.clerk();
    let name = |c: &Clerk| format!("client-{}", c.id);
    cluster
        .net
        .set_client_reachable(&name(&ckp1), Some(&majority));
    cluster
        .net
        .set_client_reachable(&name(&ckp2a), Some(&minority));
    cluster
        .net
        .set_client_reachable(&name(&ckp2b), Some(&minority));

    // The majority makes progress.
    assert_eq!(
        ckp1.put("1", "14", 1).await,
        Ok(2),
        "seed {seed}: majority put"
    );
    assert_eq!(ckp1.get("1").await.expect("get").0, "14", "seed {seed}");

    // The minority does not.
    let put = tokio::spawn({
        let c = ckp2a.clone();
        async move { c.put("1", "15", 2).await }
    });
    let get = tokio::spawn({
        let c = ckp2b.clone();
        async move { c.get("1").await }
    });
    sleep(Duration::from_secs(1)).await;
    assert!(
        !put.is_finished(),
        "seed {seed}: put in the minority completed"
    );
    assert!(
        !get.is_finished(),
        "seed {seed}: get in the minority completed"
    );

    // Heal: both finish within 3 s.
    cluster.net.heal();
    cluster.net.set_client_reachable(&name(&ckp2a), None);
    cluster.net.set_client_reachable(&name(&ckp2b), None);
    sleep(ELECTION_TIMEOUT).await;
    let r = tokio::time::timeout(Duration::from_secs(3), put)
        .await
        .expect("put finishes after healing")
        .expect("task");
    assert!(
        matches!(r, Ok(3) | Err(ClientError::Maybe)),
        "seed {seed}: minority put after heal: {r:?}"
    );
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .expect("get finishes after healing")
        .expect("task")
        .expect("get");
    assert_eq!(ck.get("1").await.expect("get").0, "15", "seed {seed}");
    cluster.check_linearizable();
    cluster.shutdown_all().await;
}

// Goal: one client while the servers are repeatedly partitioned.
#[tokio::test(start_paused = true)]
async fn test_many_partitions_one_client_4b() {
    generic_test(
        "TestManyPartitionsOneClient4B",
        Generic {
            nclients: 1,
            nservers: 5,
            reliable: true,
            crash: false,
            partitions: true,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: five clients while the servers are repeatedly partitioned.
#[tokio::test(start_paused = true)]
async fn test_many_partitions_many_clients_4b() {
    generic_test(
        "TestManyPartitionsManyClients4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: true,
            crash: false,
            partitions: true,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: state survives every server crashing after each round (one client).
#[tokio::test(start_paused = true)]
async fn test_persist_one_client_4b() {
    generic_test(
        "TestPersistOneClient4B",
        Generic {
            nclients: 1,
            nservers: 5,
            reliable: true,
            crash: true,
            partitions: false,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: state survives crashes, five clients.
#[tokio::test(start_paused = true)]
async fn test_persist_concurrent_4b() {
    generic_test(
        "TestPersistConcurrent4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: true,
            crash: true,
            partitions: false,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: crashes on an unreliable network, five clients.
#[tokio::test(start_paused = true)]
async fn test_persist_concurrent_unreliable_4b() {
    generic_test(
        "TestPersistConcurrentUnreliable4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: true,
            partitions: false,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: crashes and partitions, five clients.
#[tokio::test(start_paused = true)]
async fn test_persist_partition_4b() {
    generic_test(
        "TestPersistPartition4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: true,
            crash: true,
            partitions: true,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: crashes, partitions and an unreliable network, five clients.
#[tokio::test(start_paused = true)]
async fn test_persist_partition_unreliable_4b() {
    generic_test(
        "TestPersistPartitionUnreliable4B",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: true,
            partitions: true,
            randomkeys: false,
            maxraftstate: None,
        },
    )
    .await;
}

// Goal: fifteen clients on seven servers, random keys, crashes,
// partitions and an unreliable network; every round linearizable.
#[tokio::test(start_paused = true)]
async fn test_persist_partition_unreliable_linearizable_4b() {
    generic_test(
        "TestPersistPartitionUnreliableLinearizable4B",
        Generic {
            nclients: 15,
            nservers: 7,
            reliable: false,
            crash: true,
            partitions: true,
            randomkeys: true,
            maxraftstate: None,
        },
    )
    .await;
}

/// The lab's maxraftstate for the 4C tests.
const MAXRAFTSTATE: u64 = 1000;

// Goal: snapshots do not slow operations down: 1000 sequential puts with
// maxraftstate 1000 average at most a third of a heartbeat interval.
#[tokio::test(start_paused = true)]
async fn test_speed_4c() {
    let seed = seed("TestSpeed4C");
    let mut cluster = Cluster::with_max_raft_state(3, true, seed, Some(MAXRAFTSTATE));
    let clerk = cluster.clerk();
    clerk.get("x").await.expect("first get");
    const NOPS: u64 = 1000;
    let start = Instant::now();
    for i in 0..NOPS {
        clerk.put("x", "x 0 1 y", i).await.expect("put succeeds");
    }
    let per_op = start.elapsed() / NOPS as u32;
    let heartbeat = Duration::from_millis(100);
    assert!(
        per_op <= heartbeat / 3,
        "seed {seed}: operations too slow: {per_op:?} per op"
    );
    assert_eq!(clerk.get("x").await.expect("get").1, NOPS, "seed {seed}");
    assert!(
        cluster.max_log_bytes() <= 8 * MAXRAFTSTATE,
        "seed {seed}: raft state {}",
        cluster.max_log_bytes()
    );
    cluster.shutdown_all().await;
}

// Goal: a server that fell behind the leaders' compacted logs catches up by
// InstallSnapshot (SST files over the bulk stream) and serves the data.
#[tokio::test(start_paused = true)]
async fn test_snapshot_rpc_4c() {
    let seed = seed("TestSnapshotRPC4C");
    let mut cluster = Cluster::with_max_raft_state(3, true, seed, Some(MAXRAFTSTATE));
    let ck = cluster.clerk();
    ck.put("a", "A", 0).await.expect("put a");
    assert_eq!(ck.get("a").await.expect("get").0, "A");
    let (n1, n2, n3) = (cluster.id(0), cluster.id(1), cluster.id(2));

    // A bunch of puts into the majority partition.
    cluster.net.partition(&[&[n1, n2], &[n3]]);
    let ck1 = cluster.clerk();
    cluster
        .net
        .set_client_reachable(&format!("client-{}", ck1.id), Some(&[n1, n2]));
    for i in 0..50 {
        ck1.put(&i.to_string(), &i.to_string(), 0)
            .await
            .expect("put");
    }
    sleep(ELECTION_TIMEOUT).await;
    ck1.put("b", "B", 0).await.expect("put b");
    // Check that the majority's raft state is bounded by snapshots.
    assert!(
        cluster.max_log_bytes() <= 8 * MAXRAFTSTATE,
        "seed {seed}: raft state {} too big",
        cluster.max_log_bytes()
    );

    // Now make a group that requires participation of the lagging server:
    // it must catch up by InstallSnapshot.
    cluster.net.partition(&[&[n1, n3], &[n2]]);
    let ck2 = cluster.clerk();
    cluster
        .net
        .set_client_reachable(&format!("client-{}", ck2.id), Some(&[n1, n3]));
    ck2.put("c", "C", 0).await.expect("put c");
    ck2.put("d", "D", 0).await.expect("put d");
    assert_eq!(ck2.get("a").await.expect("get").0, "A", "seed {seed}");
    assert_eq!(ck2.get("b").await.expect("get").0, "B", "seed {seed}");
    assert_eq!(ck2.get("1").await.expect("get").0, "1", "seed {seed}");
    assert_eq!(ck2.get("49").await.expect("get").0, "49", "seed {seed}");
    let installed = cluster.nodes[2]
        .as_ref()
        .expect("running")
        .status(shoal_shard::node::KV_GROUP)
        .snapshots_installed;
    assert!(
        installed >= 1,
        "seed {seed}: the lagging server did not install a snapshot"
    );

    // Now everybody.
    cluster.net.heal();
    let ck3 = cluster.clerk();
    ck3.put("e", "E", 0).await.expect("put e");
    assert_eq!(ck3.get("c").await.expect("get").0, "C", "seed {seed}");
    assert_eq!(ck3.get("e").await.expect("get").0, "E", "seed {seed}");
    assert_eq!(ck3.get("1").await.expect("get").0, "1", "seed {seed}");
    cluster.check_linearizable();
    cluster.shutdown_all().await;
}

// Goal: with few distinct keys the snapshot stays small (<= 500 bytes) and
// the raft state bounded (<= 8 x maxraftstate).
#[tokio::test(start_paused = true)]
async fn test_snapshot_size_4c() {
    let seed = seed("TestSnapshotSize4C");
    let mut cluster = Cluster::with_max_raft_state(3, true, seed, Some(MAXRAFTSTATE));
    let ck = cluster.clerk();
    let mut version = 0;
    for _ in 0..200 {
        version = ck.put("x", "0", version).await.expect("put");
        assert_eq!(ck.get("x").await.expect("get").0, "0");
        version = ck.put("x", "1", version).await.expect("put");
        assert_eq!(ck.get("x").await.expect("get").0, "1");
    }
    assert!(
        cluster.max_log_bytes() <= 8 * MAXRAFTSTATE,
        "seed {seed}: raft state {}",
        cluster.max_log_bytes()
    );
    let snapshot = cluster.max_snapshot_bytes();
    assert!(snapshot > 0, "seed {seed}: no snapshot was taken");
    assert!(
        snapshot <= 500,
        "seed {seed}: snapshot of {snapshot} bytes > 500"
    );
    cluster.shutdown_all().await;
}

// Goal: snapshots survive crashes (one client).
#[tokio::test(start_paused = true)]
async fn test_snapshot_recover_4c() {
    generic_test(
        "TestSnapshotRecover4C",
        Generic {
            nclients: 1,
            nservers: 5,
            reliable: true,
            crash: true,
            partitions: false,
            randomkeys: false,
            maxraftstate: Some(MAXRAFTSTATE),
        },
    )
    .await;
}

// Goal: snapshots survive crashes with twenty clients.
#[tokio::test(start_paused = true)]
async fn test_snapshot_recover_many_clients_4c() {
    generic_test(
        "TestSnapshotRecoverManyClients4C",
        Generic {
            nclients: 20,
            nservers: 5,
            reliable: true,
            crash: true,
            partitions: false,
            randomkeys: false,
            maxraftstate: Some(MAXRAFTSTATE),
        },
    )
    .await;
}

// Goal: snapshots on an unreliable network.
#[tokio::test(start_paused = true)]
async fn test_snapshot_unreliable_4c() {
    generic_test(
        "TestSnapshotUnreliable4C",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: false,
            partitions: false,
            randomkeys: false,
            maxraftstate: Some(MAXRAFTSTATE),
        },
    )
    .await;
}

// Goal: snapshots, crashes and an unreliable network.
#[tokio::test(start_paused = true)]
async fn test_snapshot_unreliable_recover_4c() {
    generic_test(
        "TestSnapshotUnreliableRecover4C",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: true,
            partitions: false,
            randomkeys: false,
            maxraftstate: Some(MAXRAFTSTATE),
        },
    )
    .await;
}

// Goal: snapshots, crashes, partitions and an unreliable network.
#[tokio::test(start_paused = true)]
async fn test_snapshot_unreliable_recover_concurrent_partition_4c() {
    generic_test(
        "TestSnapshotUnreliableRecoverConcurrentPartition4C",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: true,
            partitions: true,
            randomkeys: false,
            maxraftstate: Some(MAXRAFTSTATE),
        },
    )
    .await;
}

// Goal: fifteen clients on seven servers with random keys, snapshots,
// crashes, partitions and an unreliable network; linearizable throughout.
#[tokio::test(start_paused = true)]
async fn test_snapshot_unreliable_recover_concurrent_partition_linearizable_4c() {
    generic_test(
        "TestSnapshotUnreliableRecoverConcurrentPartitionLinearizable4C",
        Generic {
            nclients: 15,
            nservers: 7,
            reliable: false,
            crash: true,
            partitions: true,
            randomkeys: true,
            maxraftstate: Some(MAXRAFTSTATE),
        },
    )
    .await;
}

// Beyond the lab (issue 13): five clerks that are clones of ONE client
// run their operations at once (each write on its own session from the
// client's pool) under an unreliable network, partitions and crashes:
// every put still applies at most once (ok <= version <= ok + maybe) and
// the history is linearizable.
#[tokio::test(start_paused = true)]
async fn concurrent_clones_of_one_client_unreliable_partitions_crash() {
    generic_test_clerks(
        "concurrent_clones_of_one_client",
        Generic {
            nclients: 5,
            nservers: 5,
            reliable: false,
            crash: true,
            partitions: true,
            randomkeys: true,
            maxraftstate: Some(1000),
        },
        true,
    )
    .await;
}

/// Not a lab test: a leader asked to stop hands leadership to another voter
/// first, so the group has a new leader (one term later) within a few
/// ticks of the old one stopping, instead of after an election timeout.
#[tokio::test(start_paused = true)]
async fn a_stopping_leader_hands_off_leadership() {
    use shoal_shard::node::KV_GROUP;
    /// A few ticks: well below the shortest election timeout.
    const AFTER_STOP_MS_MAX: u64 = 150;
    assert!(Duration::from_millis(AFTER_STOP_MS_MAX) < ELECTION_TIMEOUT / 2);
    for seed in common::seeds_or("a_stopping_leader_hands_off_leadership", 10) {
        let mut c = Cluster::new(3, true, seed);
        let clerk = c.clerk();
        clerk.put("k", "v", 0).await.expect("put");
        let l = c.wait_for_leader(ELECTION_TIMEOUT).await;
        let term = c.nodes[l].as_ref().expect("running").status(KV_GROUP).term;
        c.shutdown_node(l).await;
        let stopped = Instant::now();
        let new = loop {
            if let Some(n) = c.leader() {
                break n;
            }
            assert!(
                stopped.elapsed() <= Duration::from_millis(AFTER_STOP_MS_MAX),
                "seed {seed}: no leader {AFTER_STOP_MS_MAX} ms after the old one stopped"
            );
            sleep(Duration::from_millis(5)).await;
        };
        assert_ne!(new, l);
        let new_term = c.nodes[new]
            .as_ref()
            .expect("running")
            .status(KV_GROUP)
            .term;
        assert_eq!(new_term, term + 1, "seed {seed}: one campaign, no election");
        assert_eq!(clerk.get("k").await.expect("get").0, "v");
        c.shutdown_all().await;
    }
}
