//! Stale-read tests: a node that is no longer (or not yet) the majority's
//! leader must never answer a read with a value older than a write the
//! majority has acknowledged.
//!
//! The scenarios are built to catch a node serving reads from its local
//! state: a leader answering without a ReadIndex (no lease either), or a
//! ReadIndex confirmed without a heartbeat quorum. Each test runs many
//! seeds on the in-memory network under tokio's paused clock:
//! `SHOAL_SEED=s` replays one seed; otherwise seeds `b..b+n` run, with
//! `b` = `SHOAL_SEED_BASE` (default 0) and `n` = `SHOAL_SEEDS` (default
//! [`SEEDS_DEFAULT`], 50 for the slow leader-change test).
//!
//! - [`isolated_leader_never_serves_stale_reads`]: the leader is cut off
//!   alone; a reader that can reach only it reads from the moment of the
//!   partition (before check-quorum makes it step down) while a writer that
//!   can reach only the majority overwrites the key. No read that began
//!   after the overwrite was acknowledged may return the old value; in fact
//!   an isolated node can confirm no read at all.
//! - [`reads_during_leader_changes_are_linearizable`]: the leader is
//!   isolated and healed again and again while writers go anywhere and one
//!   reader per node is pinned to that node; the history must be
//!   linearizable.
//! - [`rejoining_follower_never_serves_stale_reads`]: a follower misses
//!   writes behind a partition, rejoins, and the old leader is then cut off
//!   so the rejoined node may win the next election; a reader pinned to it
//!   must never see a value older than an acknowledged write.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{seeds_or, Clerk, Cluster, ELECTION_TIMEOUT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_net::NodeId;
use shoal_shard::client::{Client, ClientError};
use tokio::time::{sleep, Instant};

/// Seeds each test runs unless `SHOAL_SEEDS` or `SHOAL_SEED` says otherwise.
const SEEDS_DEFAULT: u64 = 200;
/// Deadline of one read by a pinned reader: short, so a reader stuck on a
/// node that cannot answer gives up and tries again.
const PINNED_READ_DEADLINE: Duration = Duration::from_millis(300);
/// Longest wait for the cluster to elect a leader and acknowledge a write.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// The seeds to run: `SHOAL_SEED` alone, else `0..SHOAL_SEEDS`.
fn seeds(test: &str) -> Vec<u64> {
    seeds_or(test, SEEDS_DEFAULT)
}

/// A recorded client that can reach only `reachable` (all nodes: `None`),
/// with the given per-operation deadline.
fn pinned_clerk(
    c: &Cluster,
    reachable: Option<&[NodeId]>,
    op_deadline: Duration,
) -> (Clerk, String) {
    let mut config = c.client_config();
    config.op_deadline = op_deadline;
    config.rpc_deadline = op_deadline.min(config.rpc_deadline);
    let name = format!("client-{}", config.client_id);
    let net_client = c.net.add_client(&name);
    c.net.set_client_reachable(&name, reachable);
    let clerk = Clerk {
        id: config.client_id,
        client: Client::new(net_client, c.ids(), config),
        recorder: c.recorder.clone(),
        start: c.start,
    };
    (clerk, name)
}

/// A logical clock for ordering events within one virtual instant: under
/// the paused clock a read can begin at the same `Instant` as a write is
/// acknowledged, and only program order (one thread) tells which came first.
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// The next logical time.
fn event() -> u64 {
    EVENTS.fetch_add(1, Ordering::SeqCst)
}

/// One read by a reader: when it began, and what it returned (the value
/// read, or `None` for an error).
#[derive(Debug, Clone)]
struct Read {
    /// Logical time the read began (see [`EVENTS`]).
    began_event: u64,
    began: Instant,
    ended: Instant,
    value: Option<Bytes>,
    error: Option<ClientError>,
}

/// Reads `key` through `clerk` over and over (pausing 1–20 ms) until `stop`.
fn spawn_reader(
    clerk: Clerk,
    key: &'static str,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> tokio::task::JoinHandle<Vec<Read>> {
    tokio::spawn(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut reads = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let began = Instant::now();
            let began_event = event();
            let r = clerk.get(key).await;
            let ended = Instant::now();
            reads.push(match r {
                Ok((value, _)) => Read {
                    began_event,
                    began,
                    ended,
                    value: Some(value),
                    error: None,
                },
                Err(e) => Read {
                    began_event,
                    began,
                    ended,
                    value: None,
                    error: Some(e),
                },
            });
            sleep(Duration::from_millis(rng.random_range(1..=20))).await;
        }
        reads
    })
}

/// Writes `value` at `version` through `clerk`; it must be acknowledged.
async fn must_put(seed: u64, clerk: &Clerk, key: &str, value: &str, version: u64) {
    let r = clerk.put(key, value, version).await;
    assert_eq!(
        r,
        Ok(version + 1),
        "seed {seed}: put {key}={value} at version {version}"
    );
}

async fn isolated_leader_case(n: usize, seed: u64, window: &mut u64) {
    let mut c = Cluster::new(n, true, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
    let (writer, writer_name) = pinned_clerk(&c, None, WRITE_DEADLINE);
    must_put(seed, &writer, "k", "old", 0).await;
    // Let heartbeats spread the commit, then some random time in the
    // heartbeat cycle so the partition lands at different phases.
    sleep(Duration::from_millis(rng.random_range(0..300))).await;
    let old = c.wait_for_leader(WRITE_DEADLINE).await;
    let old_id = c.id(old);
    let majority: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != old_id).collect();
    c.net.partition(&[&[old_id], &majority]);
    let partitioned_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (reader, _) = pinned_clerk(&c, Some(&[old_id]), PINNED_READ_DEADLINE);
    let reads = spawn_reader(reader, "k", stop.clone(), seed);
    c.net.set_client_reachable(&writer_name, Some(&majority));
    must_put(seed, &writer, "k", "new", 1).await;
    let acked_event = event();
    let acked = Instant::now();
    if c.nodes[old].as_ref().is_some_and(|h| h.is_leader()) {
        // The interesting window: the majority has acknowledged a newer
        // write, yet the isolated node still believes it leads.
        *window += 1;
    }
    sleep(ELECTION_TIMEOUT * 2).await;
    stop.store(true, Ordering::Relaxed);
    let reads = reads.await.expect("reader task");
    assert!(
        !c.nodes[old].as_ref().is_some_and(|h| h.is_leader()),
        "seed {seed}: the isolated node {old_id} still leads after {:?}",
        partitioned_at.elapsed()
    );
    for read in &reads {
        assert!(
            !(read.began_event > acked_event && read.value.as_deref() == Some(b"old".as_slice())),
            "seed {seed}, {n} nodes: stale read from isolated leader {old_id}: began {:?} after \
             the partition, {:?} after the newer write was acknowledged, returned the old value",
            read.began - partitioned_at,
            read.began.saturating_duration_since(acked)
        );
    }
    for read in &reads {
        // Stronger: a node cut off from every peer cannot confirm leadership
        // for a read issued after the cut, whatever its value.
        assert!(
            read.value.is_none(),
            "seed {seed}, {n} nodes: isolated node {old_id} answered a read issued {:?} after the \
             partition ({:?} later) with {:?}",
            read.began - partitioned_at,
            read.ended - read.began,
            read.value
        );
        assert!(
            matches!(read.error, Some(ClientError::Timeout)),
            "seed {seed}: read from isolated node: {:?}",
            read.error
        );
    }
    assert!(!reads.is_empty(), "seed {seed}: the reader never ran");
    c.net.heal();
    c.check_linearizable();
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn isolated_leader_never_serves_stale_reads() {
    for n in [3, 5] {
        let mut window = 0;
        let seeds = seeds("isolated_leader_never_serves_stale_reads");
        for &seed in &seeds {
            isolated_leader_case(n, seed, &mut window).await;
        }
        eprintln!(
            "{n} nodes: in {window} of {} seeds the majority acknowledged the write while the \
             isolated node still believed it led",
            seeds.len()
        );
    }
}

/// The lab's versioned-put client loop, recorded: read a key, put at the
/// version read; stops when told.
async fn writer_loop(clerk: Clerk, id: usize, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, version)) = clerk.get("k").await {
            let _ = clerk.put("k", &format!("w{id}-{version}"), version).await;
        }
        sleep(Duration::from_millis(rng.random_range(1..=10))).await;
    }
}

/// What the pinned readers saw: per read, when it began and ended (since
/// the cluster started) and its outcome.
type ReadTrace = Vec<(Duration, Duration, Option<Bytes>, Option<ClientError>)>;

async fn leader_changes_case(seed: u64) -> ReadTrace {
    let n = if seed % 2 == 0 { 3 } else { 5 };
    let mut c = Cluster::new(n, true, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC4A1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..2 {
        let (clerk, _) = pinned_clerk(&c, None, Duration::from_secs(2));
        tasks.push(tokio::spawn(writer_loop(
            clerk,
            w,
            stop.clone(),
            seed.wrapping_mul(31) + w as u64,
        )));
    }
    let mut readers = Vec::new();
    for i in 0..n {
        let (clerk, _) = pinned_clerk(&c, Some(&[c.id(i)]), PINNED_READ_DEADLINE);
        readers.push(spawn_reader(
            clerk,
            "k",
            stop.clone(),
            seed ^ (i as u64 + 1),
        ));
    }
    for _ in 0..4 {
        let l = c.wait_for_leader(WRITE_DEADLINE).await;
        let lid = c.id(l);
        let rest: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != lid).collect();
        c.net.partition(&[&[lid], &rest]);
        sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        c.net.heal();
        sleep(Duration::from_millis(rng.random_range(0..500))).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer task");
    }
    let mut trace = ReadTrace::new();
    for r in readers {
        for read in r.await.expect("reader task") {
            trace.push((
                read.began - c.start,
                read.ended - c.start,
                read.value,
                read.error,
            ));
        }
    }
    c.check_linearizable();
    c.shutdown_all().await;
    trace
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_replays_the_same_reads() {
    // Goal: a seed is a replay: the leader-change scenario run twice on one
    // seed sees the same reads at the same virtual times (this depends on
    // every select in the runtime and the in-memory network being biased).
    for seed in seeds_or("the_same_seed_replays_the_same_reads", 5) {
        let first = leader_changes_case(seed).await;
        let second = leader_changes_case(seed).await;
        assert!(!first.is_empty(), "seed {seed}: no reads");
        assert!(
            first == second,
            "seed {seed}: two runs differ: {} vs {} reads; first difference: {:?}",
            first.len(),
            second.len(),
            first.iter().zip(&second).find(|(a, b)| a != b)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn reads_during_leader_changes_are_linearizable() {
    // The slowest of the three (about 0.3 s per seed): fewer seeds by default.
    for seed in seeds_or("reads_during_leader_changes_are_linearizable", 50) {
        let _ = leader_changes_case(seed).await;
    }
}

async fn rejoining_follower_case(seed: u64) {
    let n = 3;
    let mut c = Cluster::new(n, true, seed);
    let (writer, writer_name) = pinned_clerk(&c, None, WRITE_DEADLINE);
    must_put(seed, &writer, "k", "v0", 0).await;
    let leader = c.wait_for_leader(WRITE_DEADLINE).await;
    let follower = (leader + 1 + (seed as usize % (n - 1))) % n;
    let (fid, lid) = (c.id(follower), c.id(leader));
    let others: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != fid).collect();
    c.net.partition(&[&[fid], &others]);
    // The latest acknowledged version, and when it was acknowledged.
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::new(Mutex::new(vec![(event(), 1)]));
    c.net.set_client_reachable(&writer_name, Some(&others));
    for version in 1..4 {
        must_put(seed, &writer, "k", &format!("v{version}"), version).await;
        acked.lock().unwrap().push((event(), version + 1));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (reader, _) = pinned_clerk(&c, Some(&[fid]), PINNED_READ_DEADLINE);
    // The follower rejoins; then the old leader is cut off, so the rejoined
    // follower may win the next election.
    c.net.heal();
    let reads = spawn_reader(reader, "k", stop.clone(), seed);
    sleep(Duration::from_millis(seed % 200)).await;
    let rest: Vec<NodeId> = c.ids().into_iter().filter(|&id| id != lid).collect();
    c.net.partition(&[&[lid], &rest]);
    c.net.set_client_reachable(&writer_name, Some(&rest));
    for version in 4..6 {
        must_put(seed, &writer, "k", &format!("v{version}"), version).await;
        acked.lock().unwrap().push((event(), version + 1));
    }
    sleep(ELECTION_TIMEOUT).await;
    stop.store(true, Ordering::Relaxed);
    let reads = reads.await.expect("reader task");
    let acked = acked.lock().unwrap().clone();
    for read in &reads {
        let Some(value) = &read.value else { continue };
        let read_version: u64 = std::str::from_utf8(&value[1..])
            .expect("utf-8")
            .parse::<u64>()
            .expect("v<n>")
            + 1;
        let floor = acked
            .iter()
            .filter(|(at, _)| *at < read.began_event)
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0);
        assert!(
            read_version >= floor,
            "seed {seed}: rejoined node {fid} served version {read_version} although version \
             {floor} was acknowledged before the read began"
        );
    }
    c.net.heal();
    c.check_linearizable();
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn rejoining_follower_never_serves_stale_reads() {
    for seed in seeds("rejoining_follower_never_serves_stale_reads") {
        rejoining_follower_case(seed).await;
    }
}
