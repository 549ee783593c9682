//! Simulator scenarios for the features beyond lab 3: ReadIndex across
//! leader changes, leadership transfer, and crashes between taking a
//! `Ready` and persisting it. The simulator's checker validates every
//! confirmed read (its index covers everything committed before the read
//! started) and the persistence contract at every send.
//!
//! `SHOAL_FEATURE_SEEDS` scales the seed count (default 20–50 per test);
//! `SHOAL_SEED` replays one seed.

fn run_seeds(default_count: u64, f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    run_seed_list(seeds_from_env("SHOAL_FEATURE_SEEDS", default_count), f)
}

use bytes::Bytes;
use shoal_consensus::sim::{run_seed_list, seeds_from_env, Cluster, NetFaults, SimOptions};
use shoal_consensus::Role;

#[test]
fn read_index_is_linearizable_across_leader_changes() {
    run_seeds(20, |seed| {
        let mut o = SimOptions::new(5, seed);
        o.faults = NetFaults::unreliable();
        let mut c = Cluster::new(o);
        for round in 0..10u64 {
            let leader = c.check_one_leader();
            for k in 0..5u64 {
                c.propose(leader, Bytes::from(format!("{round}/{k}")));
                c.read_index(leader);
                c.run_for(10);
            }
            // Leader in the minority: its pending reads must never confirm
            // with a stale index; the majority elects a new leader.
            let n = c.len();
            let mut sides = vec![0u8; n];
            sides[leader] = 1;
            sides[(leader + 1) % n] = 1;
            c.partition(&sides);
            for _ in 0..5 {
                c.read_index(leader);
                let others: Vec<usize> = (0..n).filter(|&i| sides[i] == 0).collect();
                for i in others {
                    c.read_index(i);
                }
                c.run_for(200);
            }
            c.heal();
            c.run_for(500);
        }
        assert!(
            c.checker.reads_confirmed >= 10,
            "only {} reads confirmed (SHOAL_SEED={seed})",
            c.checker.reads_confirmed
        );
    });
}

#[test]
fn leadership_transfer_moves_leadership_quickly() {
    run_seeds(20, |seed| {
        let mut c = Cluster::new(SimOptions::new(3, seed));
        let mut leader = c.check_one_leader();
        for step in 0..6 {
            let target = (leader + 1 + step % 2) % 3;
            c.one(Bytes::from(format!("before{step}")), 3, true)
                .expect("commit");
            assert!(c.transfer_leader(leader, target));
            c.run_for(200);
            assert_eq!(
                c.raft(target).map(|r| r.role()),
                Some(Role::Leader),
                "transfer to {target} (SHOAL_SEED={seed})"
            );
            leader = target;
        }
        c.one(Bytes::from_static(b"after"), 3, true)
            .expect("commit after transfers");
    });
}

#[test]
fn crashes_before_persisting_lose_nothing_committed() {
    run_seeds(50, |seed| {
        let mut o = SimOptions::new(3 + 2 * (seed as usize % 2), seed);
        o.snapshot_interval = if seed % 3 == 0 { Some(7) } else { None };
        let mut c = Cluster::new(o);
        c.crash_before_persist_per_mille = 30;
        for k in 0..300u64 {
            let leader = c
                .leaders()
                .first()
                .map(|&(l, _)| l)
                .unwrap_or(k as usize % c.len());
            c.propose(leader, Bytes::from(format!("{k}")));
            c.run_for(15);
            for i in 0..c.len() {
                if !c.is_alive(i) && c.rand(0..10) == 0 {
                    c.restart(i);
                    c.connect(i);
                }
            }
        }
        c.crash_before_persist_per_mille = 0;
        for i in 0..c.len() {
            c.restart(i);
            c.connect(i);
        }
        c.one(Bytes::from_static(b"final"), c.len(), true)
            .expect("liveness after crashes");
        assert!(
            c.checker.committed_len() > 10,
            "too little progress (SHOAL_SEED={seed})"
        );
    });
}
