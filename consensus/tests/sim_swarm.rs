//! Swarm simulation: every seed draws its own cluster size, fault rates and
//! config, runs a chaos phase (drops, duplicates, delays, long reordering,
//! partitions with the leader in the minority, crashes that lose unpersisted
//! state, restarts, leadership transfers, reads), then a calm phase in which
//! a leader must appear and a new proposal must commit everywhere within a
//! bounded time. The simulator checks safety after every event.
//!
//! `SHOAL_SIM_SEEDS=<n>` sets the number of seeds (default 2,000),
//! `SHOAL_SEED=<n>` replays one, `SHOAL_SEED_BASE` shifts the range.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::sim::{run_seeds, Cluster, NetFaults, SimOptions};

/// Virtual time the calm phase may take before liveness fails.
const LIVENESS_MS_MAX: u64 = 20_000;

fn swarm(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nodes = [1, 2, 3, 3, 3, 4, 5, 5, 5][rng.random_range(0..9)];
    let mut opts = SimOptions::new(nodes, seed);
    let long = if rng.random_bool(0.3) {
        rng.random_range(0..700)
    } else {
        0
    };
    let faults = NetFaults {
        drop_request_per_mille: rng.random_range(0..300),
        drop_response_per_mille: rng.random_range(0..300),
        duplicate_per_mille: rng.random_range(0..150),
        delay_ms_max: rng.random_range(0..80),
        long_delay_per_mille: long,
    };
    opts.faults = faults.clone();
    opts.snapshot_interval = if rng.random_bool(0.5) {
        Some(rng.random_range(2..30))
    } else {
        None
    };
    if rng.random_bool(0.3) {
        opts.config.heartbeat_tick = rng.random_range(1..4);
        opts.config.election_tick = opts.config.heartbeat_tick * rng.random_range(3..8);
    }
    opts.config.pre_vote = rng.random_bool(0.7);
    opts.config.check_quorum = rng.random_bool(0.7);
    opts.config.max_inflight_msgs = rng.random_range(1..8);
    opts.config.max_size_per_msg_bytes = 24 + rng.random_range(0..100);
    opts.config.max_inflight_bytes = opts.config.max_size_per_msg_bytes * rng.random_range(1..6);
    opts.config.max_committed_size_per_ready_bytes = rng.random_range(1..200);
    let crash_per_mille = rng.random_range(0..15);
    let partition_per_mille = rng.random_range(0..20);
    if std::env::var("SHOAL_SIM_VERBOSE").is_ok() {
        eprintln!(
            "seed {seed}: knobs nodes {nodes} {faults:?} snapshot {:?} pre_vote {} check_quorum {} \
             heartbeat/election ticks {}/{} inflight {} msgs {} bytes, crash {crash_per_mille}‰ \
             partition {partition_per_mille}‰",
            opts.snapshot_interval,
            opts.config.pre_vote,
            opts.config.check_quorum,
            opts.config.heartbeat_tick,
            opts.config.election_tick,
            opts.config.max_inflight_msgs,
            opts.config.max_inflight_bytes,
        );
    }
    let mut c = Cluster::new(opts);
    c.crash_before_persist_per_mille = if rng.random_bool(0.5) {
        rng.random_range(0..50)
    } else {
        0
    };
    let mut value = 0u64;
    let chaos_ms = rng.random_range(2_000..6_000);
    let step_ms_max = rng.random_range(2..40);
    let end = c.now_ms + chaos_ms;
    while c.now_ms < end {
        c.run_for(rng.random_range(1..step_ms_max));
        let n = c.len();
        // Crashed nodes come back soon (crash-before-persist kills often).
        if rng.random_bool(0.05) {
            let i = rng.random_range(0..n);
            if !c.is_alive(i) {
                c.restart(i);
                c.connect(i);
            }
        }
        let roll = rng.random_range(0..1000);
        if roll < crash_per_mille {
            let i = rng.random_range(0..n);
            if c.is_alive(i) {
                c.crash(i);
            } else {
                c.restart(i);
                c.connect(i);
            }
        } else if roll < crash_per_mille + partition_per_mille {
            match rng.random_range(0..4) {
                0 => c.heal(),
                1 => {
                    let sides: Vec<u8> = (0..n).map(|_| rng.random_range(0..2)).collect();
                    c.partition(&sides);
                }
                2 => {
                    // Leader in the minority.
                    if let Some(&(l, _)) = c.leaders().first() {
                        let mut sides = vec![0u8; n];
                        sides[l] = 1;
                        for _ in 0..(n.saturating_sub(1)) / 2 {
                            let j = rng.random_range(0..n);
                            sides[j] = 1;
                        }
                        c.partition(&sides);
                    }
                }
                _ => {
                    let i = rng.random_range(0..n);
                    if c.is_connected(i) {
                        c.disconnect(i);
                    } else if c.is_alive(i) {
                        c.connect(i);
                    }
                }
            }
        } else if roll < 700 {
            // Clients mostly find the leader; sometimes they ask anyone.
            let leader = c.leaders().iter().max_by_key(|(_, t)| *t).map(|&(l, _)| l);
            let i = match leader {
                Some(l) if rng.random_bool(0.7) => l,
                _ => rng.random_range(0..n),
            };
            value += 1;
            c.propose(i, Bytes::from(format!("v{value}")));
        } else if roll < 800 {
            let i = rng.random_range(0..n);
            c.read_index(i);
        } else if roll < 810 {
            let (i, to) = (rng.random_range(0..n), rng.random_range(0..n));
            c.transfer_leader(i, to);
        }
    }

    // Calm phase: everything back, reliable network.
    c.crash_before_persist_per_mille = 0;
    c.faults = NetFaults::reliable();
    for i in 0..c.len() {
        c.restart(i);
    }
    c.heal();
    let start = c.now_ms;
    let mut committed = false;
    while c.now_ms < start + LIVENESS_MS_MAX {
        c.run_for(50);
        let leaders = c.leaders();
        if let Some(&(l, _)) = leaders.iter().max_by_key(|(_, t)| *t) {
            value += 1;
            let data = Bytes::from(format!("final{value}"));
            if let Some((index, _)) = c.propose(l, data.clone()) {
                let t = c.now_ms;
                while c.now_ms < t + 3_000 {
                    c.run_for(20);
                    let (count, v) = c.n_committed(index);
                    if count == c.len() && v == Some(data.clone()) {
                        committed = true;
                        break;
                    }
                }
                if committed {
                    break;
                }
            }
        }
    }
    if std::env::var("SHOAL_SIM_VERBOSE").is_ok() {
        eprintln!(
            "seed {seed}: nodes {} committed {} reads {} rpcs {} now {} ms",
            c.len(),
            c.checker.committed_len(),
            c.checker.reads_confirmed,
            c.stats.rpcs,
            c.now_ms
        );
    }
    assert!(
        committed,
        "liveness: no proposal committed on all {} nodes within {LIVENESS_MS_MAX} ms after faults stopped \
         (faults {faults:?})\nreplay with SHOAL_SEED={seed}",
        c.len()
    );
}

#[test]
fn swarm_seeds() {
    run_seeds(2_000, swarm);
}
