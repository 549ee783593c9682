//! Goal: a real cluster under a storm of crashes and partitions never loses
//! an acknowledged write, never applies one twice, and stays linearizable;
//! and it always recovers: once a killed majority (or every node) is back,
//! clients make progress again.
//!
//! `shoal node` processes (5, and a 3-node variant) on loopback with QUIC,
//! mutual TLS and RocksDB, started with `--fault-injection`. Concurrent
//! clients record a history. A seeded schedule of faults runs, each one
//! healed before the next: SIGKILL of a random node, of the leader, of a
//! majority at once and of every node at once, each followed by restarts;
//! and partitions set through the admin RPC (the leader isolated, a random
//! minority/majority split), then healed. After each fault the test waits
//! for progress (acknowledged operations, not time) and for every node to
//! catch up. At the end every acknowledged append is in its key's value
//! exactly once, an unknown one at most once, and the whole history is
//! linearizable.
//!
//! Every wait polls a condition with a deadline; nothing sleeps a fixed
//! time. The fault schedule and victims come from a seed printed first
//! (`SHOAL_SEED=<n>` replays them; the leader's identity and timing still
//! vary). `SHOAL_CRASH_ROUNDS=<n>` sets the number of kill faults (default
//! 20) for a longer soak (`make test-long`).
//!
//! A smaller test checks the admin RPC over QUIC on its own: isolating the
//! leader makes the others elect a new one, the status RPC reports the
//! filter, and after healing the old leader catches up.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::workload::{with_seed, Workload, WorkloadConfig};
use common::{wait_for, Cluster};
use rand::seq::{IteratorRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_net::NodeId;

/// Acknowledged operations required around each fault (progress, not time).
const OPS_BETWEEN_FAULTS: u64 = 10;
/// Default number of kill faults per run (`SHOAL_CRASH_ROUNDS` overrides).
const KILL_FAULTS_DEFAULT: usize = 20;
/// Partitions per run: one per this many kill faults (at least two).
const KILLS_PER_PARTITION: usize = 3;
const WAIT: Duration = Duration::from_secs(30);
/// Kill faults per put key (see the workload's `put_keys`).
const KILLS_PER_PUT_KEY: u64 = 8;

/// The tests here each run a whole cluster; on 2 cores they run one at a
/// time rather than starving each other's elections.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One fault, healed before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL one random node, restart it.
    KillRandom,
    /// SIGKILL the leader, restart it.
    KillLeader,
    /// SIGKILL a majority at once: no progress is possible until restart.
    KillMajority,
    /// SIGKILL every node at once, restart them all.
    KillAll,
    /// Cut the leader off from every other node, then heal.
    IsolateLeader,
    /// Split the nodes into a random minority and majority, then heal.
    Split,
}

impl Fault {
    fn is_kill(self) -> bool {
        !matches!(self, Fault::IsolateLeader | Fault::Split)
    }
}

fn kill_faults() -> usize {
    std::env::var("SHOAL_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(KILL_FAULTS_DEFAULT)
}

/// The run's faults: every kind at least once, `kills` kill faults, then
/// shuffled.
fn schedule(rng: &mut ChaCha8Rng, kills: usize) -> Vec<Fault> {
    let mut faults = vec![
        Fault::KillRandom,
        Fault::KillLeader,
        Fault::KillMajority,
        Fault::KillAll,
    ];
    while faults.len() < kills {
        faults.push(match rng.random_range(0..100) {
            0..35 => Fault::KillRandom,
            35..65 => Fault::KillLeader,
            65..85 => Fault::KillMajority,
            _ => Fault::KillAll,
        });
    }
    faults.truncate(kills.max(4));
    for i in 0..(kills / KILLS_PER_PARTITION).max(2) {
        faults.push(if i % 2 == 0 {
            Fault::IsolateLeader
        } else {
            Fault::Split
        });
    }
    faults.shuffle(rng);
    faults
}

#[test]
fn torture_five_nodes_sigkill_and_partitions() {
    let _serial = one_at_a_time();
    with_seed("torture_five_nodes_sigkill_and_partitions", |seed| {
        torture(seed, 5)
    });
}

#[test]
fn torture_three_nodes_sigkill_and_partitions() {
    let _serial = one_at_a_time();
    with_seed("torture_three_nodes_sigkill_and_partitions", |seed| {
        torture(seed, 3)
    });
}

fn torture(seed: u64, n: u64) {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let faults = schedule(&mut rng, kill_faults());
    eprintln!("{n} nodes, faults: {faults:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start_with(dir.path(), n, true);
    let admin = cluster.admin();
    cluster.wait_for_leader(WAIT);
    // Short deadlines: operations caught by a fault give up, so the history
    // holds writes of unknown outcome, which the checks must tolerate (an
    // unknown append at most once) without ever counting them as lost.
    // A put of unknown outcome stays open to the end of the history, and
    // the checker's search on its key grows with every such put: longer
    // runs spread their puts over more keys.
    let config = WorkloadConfig {
        put_keys: (kill_faults() as u64 / KILLS_PER_PUT_KEY).max(2),
        op_deadline: Duration::from_secs(2),
        rpc_deadline: Duration::from_millis(300),
        ..WorkloadConfig::default()
    };
    let workload = Workload::start(&cluster, config, seed);
    let majority = (n / 2 + 1) as usize;
    let mut processes_killed = 0;

    for (round, &fault) in faults.iter().enumerate() {
        workload.wait_progress("progress before a fault", OPS_BETWEEN_FAULTS, WAIT);
        let t = Instant::now();
        match fault {
            Fault::KillRandom | Fault::KillLeader => {
                let victim = if fault == Fault::KillLeader {
                    cluster.wait_for_leader(WAIT)
                } else {
                    rng.random_range(1..=n)
                };
                eprintln!("round {round}: {fault:?}: SIGKILL node {victim}");
                cluster.kill(victim);
                processes_killed += 1;
                // The others are a majority and must keep serving.
                workload.wait_progress("progress with one node down", OPS_BETWEEN_FAULTS, WAIT);
                cluster.start_node(victim);
            }
            Fault::KillMajority | Fault::KillAll => {
                let count = if fault == Fault::KillAll {
                    n as usize
                } else {
                    majority
                };
                let mut victims = (1..=n).choose_multiple(&mut rng, count);
                victims.sort();
                eprintln!("round {round}: {fault:?}: SIGKILL nodes {victims:?}");
                cluster.kill_many(&victims);
                processes_killed += victims.len();
                // Counted only once every victim is dead: while the kills
                // are under way a quorum may still be alive and serving.
                let acked = workload.acked_ops();
                let unknown = workload.unknown_ops();
                // No quorum is left: nothing can complete until they are
                // back. Wait for an operation to give up, then check that
                // at most the ones in flight when the last victim died (one
                // per client, committed just before) completed meanwhile.
                wait_for(
                    "an operation to time out with no quorum",
                    workload.config().op_deadline * 3,
                    || workload.unknown_ops() > unknown,
                );
                let completed = workload.acked_ops() - acked;
                assert!(
                    completed <= workload.config().clients,
                    "{completed} operations completed with a majority down"
                );
                cluster.start_nodes(&victims);
                workload.wait_progress(
                    "progress after restarting the killed nodes",
                    OPS_BETWEEN_FAULTS,
                    WAIT,
                );
            }
            Fault::IsolateLeader => {
                let leader = cluster.wait_for_leader(WAIT);
                let others: Vec<u64> = (1..=n).filter(|&id| id != leader).collect();
                eprintln!("round {round}: {fault:?}: node {leader} cut off from {others:?}");
                cluster.partition(&admin, &[vec![leader], others], WAIT);
                wait_for("a new leader on the majority side", WAIT, || {
                    cluster.leader().is_some_and(|l| l != leader)
                });
                workload.wait_progress(
                    "progress with the old leader cut off",
                    OPS_BETWEEN_FAULTS,
                    WAIT,
                );
                cluster.heal(&admin, WAIT);
            }
            Fault::Split => {
                let size = rng.random_range(1..=(n as usize - majority));
                let mut minority = (1..=n).choose_multiple(&mut rng, size);
                minority.sort();
                let rest: Vec<u64> = (1..=n).filter(|id| !minority.contains(id)).collect();
                eprintln!("round {round}: {fault:?}: {minority:?} | {rest:?}");
                cluster.partition(&admin, &[minority, rest.clone()], WAIT);
                wait_for("a leader on the majority side", WAIT, || {
                    cluster.leader().is_some_and(|l| rest.contains(&l))
                });
                workload.wait_progress("progress on the majority side", OPS_BETWEEN_FAULTS, WAIT);
                cluster.heal(&admin, WAIT);
            }
        }
        // Every node back in step before the next fault.
        cluster.wait_caught_up(WAIT);
        eprintln!("round {round}: healed in {:?}", t.elapsed());
    }
    workload.wait_progress("progress after the last fault", OPS_BETWEEN_FAULTS, WAIT);
    admin.close();
    let summary = workload.finish(&cluster, WAIT);
    eprintln!(
        "{n} nodes: {} faults, {processes_killed} processes SIGKILLed, {summary:?}, {:?}",
        faults.len(),
        started.elapsed()
    );
    assert!(faults.iter().filter(|f| f.is_kill()).count() >= kill_faults().min(4));
}

// Goal: the admin RPC really partitions a QUIC cluster and heals it:
// isolating the leader makes the other two elect a new leader in a higher
// term, the old leader's status RPC reports its filter, and after the
// filters are cleared the old leader follows and catches up.
#[test]
fn admin_partition_and_heal_over_quic() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start_with(dir.path(), 3, true);
    let admin = cluster.admin();
    let old = cluster.wait_for_leader(WAIT);
    let old_term = cluster.status(old).expect("status").term;
    let others: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    cluster.partition(&admin, &[vec![old], others.clone()], WAIT);
    let report = admin.node_status(NodeId(old)).expect("status rpc");
    assert_eq!(
        report.blocked,
        others.iter().map(|&id| NodeId(id)).collect::<Vec<_>>()
    );
    let mut new = 0;
    wait_for("a new leader among the others", WAIT, || {
        new = cluster.leader().unwrap_or(0);
        others.contains(&new)
    });
    let new_term = cluster.status(new).expect("status").term;
    assert!(
        new_term > old_term,
        "new leader in term {new_term}, old {old_term}"
    );
    // The majority commits; the cut-off node cannot learn about it.
    let written = admin.put("k", "v").expect("write on the majority side");
    assert!(written >= 1);
    let target = cluster.status(new).expect("status").commit;
    assert!(cluster.status(old).expect("status").commit < target);

    cluster.heal(&admin, WAIT);
    assert!(admin
        .node_status(NodeId(old))
        .expect("status rpc")
        .blocked
        .is_empty());
    wait_for("the old leader to follow and catch up", WAIT, || {
        cluster
            .status(old)
            .is_some_and(|s| s.role == "follower" && s.term >= new_term && s.applied >= target)
    });
    admin.close();
}

// Goal: a client whose connection reached a node process that was SIGKILLed
// reaches the restarted process at once, not after the QUIC idle timeout
// (10 s): the new process resets the old connection (stable stateless
// reset key, see `shoal_net::quic`) and the client redials.
#[test]
fn client_reaches_a_restarted_node_at_once() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start_with(dir.path(), 3, true);
    let admin = cluster.admin();
    cluster.wait_for_leader(WAIT);
    for id in cluster.ids() {
        admin.node_status(NodeId(id)).expect("status rpc");
    }
    for round in 0..3 {
        cluster.kill_many(&[1, 2]);
        cluster.start_nodes(&[1, 2]);
        let restarted = Instant::now();
        let pid = loop {
            if let Ok(report) = admin.node_status(NodeId(1)) {
                break report.pid;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(3),
                "round {round}: the restarted node is still unreachable"
            );
        };
        // The answer must come from the restarted process: the pid in the
        // status file that process writes (`status` keeps only a file
        // whose pid is that of the child we started).
        let status = shoal::local_cluster::wait_for(
            &format!("round {round}: node 1's status file from its new process"),
            WAIT,
            || cluster.status(1),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pid, status.pid,
            "round {round}: the status RPC was answered by another process than the restarted one"
        );
        eprintln!(
            "round {round}: reached the restarted node after {:?}",
            restarted.elapsed()
        );
    }
    admin.close();
}
