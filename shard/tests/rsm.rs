//! The MIT 6.5840 lab-4A rsm tests, re-expressed on the KV service.
//!
//! The lab's counter state machine maps onto the KV state machine: `Inc` is
//! an `Append` to key "counter" (its reply's version is the counter after
//! it), `Dec` an `Append` to key "dec", and `Null` an `Append` to key
//! "null". The lab's `Submit` on one server is a direct RPC to that node
//! with no session; its `ErrWrongLeader` is our `NotLeader`.
//!
//! One deliberate difference: our leaders run check-quorum, so a leader cut
//! off in a minority steps down after an election timeout and answers its
//! waiting submissions `NotLeader` right then, instead of holding them until
//! the partition heals (the lab's Raft has no check-quorum). The
//! LeaderPartition test therefore asserts that no minority submission
//! succeeds and that all are answered by one second after healing, but not
//! that they are still pending one second into the partition.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{seed, Cluster, ELECTION_TIMEOUT};
use shoal_engine::Reply;
use shoal_net::{NodeId, RpcCaller};
use shoal_shard::protocol::{ClientCommand, KvRequest, KvResponse, Response};
use tokio::time::{sleep, timeout, Instant};

/// How long a test waits for a leader.
const LEADER_WAIT: Duration = Duration::from_secs(60);
/// How long `check_counter` waits for every server to apply.
const CHECK_COUNTER_WAIT: Duration = Duration::from_secs(30);

fn append(key: &'static str) -> ClientCommand {
    ClientCommand::Append {
        key: Bytes::from_static(key.as_bytes()),
        value: Bytes::from_static(b"."),
    }
}

/// The lab's oneInc: an `Inc` through a client that retries until a
/// leader applies it; returns the counter after it.
async fn one_inc(cluster: &Cluster) -> u64 {
    cluster
        .client()
        .append("counter", ".")
        .await
        .expect("inc succeeds")
}

/// The lab's checkCounter: every running server's counter reaches `n`.
async fn check_counter(cluster: &Cluster, n: u64) {
    let deadline = Instant::now() + CHECK_COUNTER_WAIT;
    for (i, engine) in cluster.engines.iter().enumerate() {
        loop {
            let value = engine
                .get(shoal_shard::node::KV_GROUP, 0, b"counter")
                .expect("get")
                .map_or(0, |v| v.version);
            if value == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {}: server {i} counter {value}, want {n}",
                cluster.seed
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

// Goal: ten sequential increments each return the next count, and every
// server applies all ten.
#[tokio::test(start_paused = true)]
async fn test_basic_4a() {
    let cluster = Cluster::new(3, true, seed("TestBasic4A"));
    for i in 0..10 {
        assert_eq!(one_inc(&cluster).await, i + 1, "seed {}", cluster.seed);
    }
    check_counter(&cluster, 10).await;
}

// Goal: fifty concurrent increments all apply, on every server.
#[tokio::test(start_paused = true)]
async fn test_concurrent_4a() {
    let cluster = Cluster::new(3, true, seed("TestConcurrent4A"));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let client = cluster.client();
            tokio::spawn(async move { client.append("counter", ".").await.expect("inc") })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    check_counter(&cluster, 50).await;
}

// Goal: with the leader disconnected the other two still commit; after it
// rejoins all three converge.
#[tokio::test(start_paused = true)]
async fn test_leader_failure_4a() {
    let cluster = Cluster::new(3, true, seed("TestLeaderFailure4A"));
    assert_eq!(one_inc(&cluster).await, 1);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    cluster.net.disconnect(cluster.id(leader));
    assert_eq!(one_inc(&cluster).await, 2);
    cluster.net.connect(cluster.id(leader));
    check_counter(&cluster, 2).await;
}

// Goal: submissions to a leader cut off in a minority never succeed; the
// majority commits meanwhile; after healing every minority submission is
// answered within a second and all counters agree.
#[tokio::test(start_paused = true)]
async fn test_leader_partition_4a() {
    let cluster = Cluster::new(3, true, seed("TestLeaderPartition4A"));
    assert_eq!(one_inc(&cluster).await, 1);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let old = cluster.id(leader);
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    cluster.net.partition(&[&[old], &others]);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let caller = cluster.net.add_client("minority");
            tokio::spawn(async move {
                let request = KvRequest {
                    group: shoal_shard::node::KV_GROUP,
                    shard: 0,
                    client: 0,
                    seq: 0,
                    command: append("dec"),
                };
                caller
                    .call_with_deadline(old, request.into(), Duration::from_secs(60))
                    .await
                    .map(kv_response)
            })
        })
        .collect();
    // The majority elects a leader and commits an Inc.
    assert_eq!(one_inc(&cluster).await, 2, "seed {}", cluster.seed);
    sleep(Duration::from_secs(1)).await;
    cluster.net.heal();
    let healed = Instant::now();
    for t in tasks {
        let r = timeout(
            Duration::from_secs(1).saturating_sub(healed.elapsed()) + Duration::from_millis(1),
            t,
        )
        .await
        .expect("minority submission answered within 1 s of healing")
        .expect("task");
        assert!(
            !matches!(r, Ok(KvResponse::Done(_))),
            "seed {}: a minority submission succeeded: {r:?}",
            cluster.seed
        );
    }
    check_counter(&cluster, 2).await;
    assert_eq!(
        cluster.engines[leader]
            .get(shoal_shard::node::KV_GROUP, 0, b"dec")
            .expect("get"),
        None,
        "seed {}: a Dec applied",
        cluster.seed
    );
}

// Goal: after a full shutdown and restart the state comes back from the
// log alone: the next Inc returns 101.
#[tokio::test(start_paused = true)]
async fn test_restart_replay_4a() {
    let mut cluster = Cluster::new(3, true, seed("TestRestartReplay4A"));
    for i in 0..100 {
        assert_eq!(one_inc(&cluster).await, i + 1);
    }
    cluster.shutdown_all().await;
    sleep(ELECTION_TIMEOUT).await;
    cluster.start_all();
    assert_eq!(one_inc(&cluster).await, 101, "seed {}", cluster.seed);
    check_counter(&cluster, 101).await;
}

/// The KV answer inside a node's response (these tests send KV requests only).
fn kv_response(response: Response) -> KvResponse {
    match response {
        Response::Kv(kv) => kv,
        other => panic!("a KV request answered with {other:?}"),
    }
}

/// 100 concurrent `Null` submissions to node `to` from clients named
/// `client`, then a shutdown of every server 20 ms later; every submission
/// must return within 11 s. Returns their outcomes.
async fn null_submissions_then_shutdown(
    cluster: &mut Cluster,
    to: NodeId,
    client: &str,
) -> Vec<Result<KvResponse, shoal_net::RpcError>> {
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let caller = cluster.net.add_client(client);
            tokio::spawn(async move {
                let request = KvRequest {
                    group: shoal_shard::node::KV_GROUP,
                    shard: 0,
                    client: 0,
                    seq: 0,
                    command: append("null"),
                };
                caller
                    .call_with_deadline(to, request.into(), Duration::from_secs(60))
                    .await
                    .map(kv_response)
            })
        })
        .collect();
    sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    cluster.shutdown_all().await;
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        let left = Duration::from_secs(11).saturating_sub(started.elapsed());
        outcomes.push(
            timeout(left, t)
                .await
                .expect("every submission returns within 11 s of shutdown")
                .expect("task"),
        );
    }
    outcomes
}

/// [`null_submissions_then_shutdown`] to the leader; whatever succeeded
/// was applied as a write.
async fn submit_then_shutdown(cluster: &mut Cluster) {
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let to = cluster.id(leader);
    for r in null_submissions_then_shutdown(cluster, to, "nuller").await {
        if let Ok(KvResponse::Done(reply)) = &r {
            assert!(
                matches!(reply, Reply::Written { .. }),
                "unexpected {reply:?}"
            );
        }
    }
}

// Goal: shutting the servers down answers every waiting submission. A
// second phase makes sure submissions are really waiting: the leader is
// cut off from its followers first, so none can commit, and every one must
// be answered (not successfully) by the shutdown.
#[tokio::test(start_paused = true)]
async fn test_shutdown_4a() {
    let mut cluster = Cluster::new(3, true, seed("TestShutdown4A"));
    assert_eq!(one_inc(&cluster).await, 1);
    submit_then_shutdown(&mut cluster).await;

    cluster.start_all();
    assert_eq!(one_inc(&cluster).await, 2);
    let leader = cluster.wait_for_leader(LEADER_WAIT).await;
    let to = cluster.id(leader);
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|id| *id != to).collect();
    cluster.net.partition(&[&[to], &others]);
    for r in null_submissions_then_shutdown(&mut cluster, to, "stuck").await {
        assert!(
            matches!(
                r,
                Ok(KvResponse::ShuttingDown) | Ok(KvResponse::NotLeader { .. }) | Err(_)
            ),
            "seed {}: a submission to a cut-off leader got {r:?}",
            cluster.seed
        );
    }
}

// Goal: restarts interleaved with submissions cut short by shutdown; the
// submissions from before a restart are never confused with later ones,
// so the counter counts exactly the increments.
#[tokio::test(start_paused = true)]
async fn test_restart_submit_4a() {
    let mut cluster = Cluster::new(3, true, seed("TestRestartSubmit4A"));
    const NINC: u64 = 10;
    const NRESTART: u64 = 3;
    let mut count = 0;
    for _ in 0..NRESTART {
        for _ in 0..NINC {
            count += 1;
            assert_eq!(one_inc(&cluster).await, count, "seed {}", cluster.seed);
        }
        submit_then_shutdown(&mut cluster).await;
        sleep(ELECTION_TIMEOUT).await;
        cluster.start_all();
        count += 1;
        assert_eq!(one_inc(&cluster).await, count, "seed {}", cluster.seed);
    }
    check_counter(&cluster, count).await;
}

// Goal: with maxraftstate 1000 the log stays within twice that through 100
// increments, and after a full restart (state from the snapshot plus the
// log) the next Inc returns 101 on all three servers.
#[tokio::test(start_paused = true)]
async fn test_snapshot_4c() {
    const MAXRAFTSTATE: u64 = 1000;
    let mut cluster =
        Cluster::with_max_raft_state(3, true, seed("TestSnapshot4C"), Some(MAXRAFTSTATE));
    for i in 0..100 {
        assert_eq!(one_inc(&cluster).await, i + 1);
        let size = cluster.max_log_bytes();
        assert!(
            size <= 2 * MAXRAFTSTATE,
            "seed {}: raft state {size} > 2 x {MAXRAFTSTATE}",
            cluster.seed
        );
    }
    assert!(
        cluster.max_snapshot_bytes() > 0,
        "seed {}: no snapshot taken",
        cluster.seed
    );
    cluster.shutdown_all().await;
    sleep(ELECTION_TIMEOUT).await;
    cluster.start_all();
    assert_eq!(one_inc(&cluster).await, 101, "seed {}", cluster.seed);
    check_counter(&cluster, 101).await;
}
