//! Membership changes: learners, promotion, removal and replacement of
//! voters, one member at a time, in the simulator (which checks safety after
//! every event, including that a leader's commit index is held by a majority
//! of the voters it runs with and that every applied change moves at most one
//! voter). The last test is the soak: random membership changes under every
//! fault the simulator has.
//!
//! `SHOAL_SIM_SEEDS=<n>` sets the soak's number of seeds (default 2,000;
//! `make test-long` runs 100,000), `SHOAL_SEED=<n>` replays one.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::config::PROMOTE_LAG_ENTRIES_MAX;
use shoal_consensus::sim::{run_seeds, Cluster, NetFaults, SimOptions};
use shoal_consensus::{next_conf, ConfChangeError, ConfChangeKind, ConfState, Error, NodeId, Role};

/// Virtual time the soak's calm phase may take before liveness fails.
const LIVENESS_MS_MAX: u64 = 20_000;

fn conf(voters: &[NodeId], learners: &[NodeId]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        learners: learners.to_vec(),
    }
}

/// Runs until `f` holds, at most `ms_max` virtual milliseconds.
fn run_until(c: &mut Cluster, ms_max: u64, mut f: impl FnMut(&Cluster) -> bool) -> bool {
    let end = c.now_ms + ms_max;
    while c.now_ms < end {
        if f(c) {
            return true;
        }
        c.run_for(10);
    }
    f(c)
}

/// The current leader (highest term), once there is one.
fn leader(c: &mut Cluster) -> usize {
    assert!(
        run_until(c, 10_000, |c| !c.leaders().is_empty()),
        "no leader (SHOAL_SEED={})",
        c.seed()
    );
    c.leaders()
        .iter()
        .max_by_key(|(_, t)| *t)
        .expect("a leader")
        .0
}

/// Proposes a change at the leader, retrying while an earlier change or the
/// leader's first entry is pending, and waits until `members` (0-based) all
/// run with the result.
fn change(c: &mut Cluster, kind: ConfChangeKind, node: usize, members: &[usize]) {
    let end = c.now_ms + 10_000;
    loop {
        assert!(c.now_ms < end, "change {kind:?} {node} not accepted");
        let l = leader(c);
        match c.propose_conf_change(l, kind, node) {
            Some(Ok(_)) => break,
            Some(Err(Error::ConfChange(ConfChangeError::Pending { .. })))
            | Some(Err(Error::NotLeader { .. }))
            | Some(Err(Error::ConfChange(ConfChangeError::LearnerBehind { .. })))
            | None => c.run_for(20),
            Some(Err(e)) => panic!("change {kind:?} {node} refused: {e}"),
        }
    }
    let id = node as NodeId + 1;
    let done = |cs: &ConfState| match kind {
        ConfChangeKind::AddLearner => cs.learners.contains(&id),
        ConfChangeKind::PromoteLearner => cs.voters.contains(&id),
        ConfChangeKind::Remove => !cs.contains(id),
    };
    assert!(
        run_until(c, 10_000, |c| members
            .iter()
            .all(|&m| c.conf_state(m).is_some_and(done))),
        "change {kind:?} {node} not applied by {members:?}"
    );
}

/// Commits `data` and waits until every node of `nodes` applied it.
fn commit_on(c: &mut Cluster, data: &str, nodes: &[usize]) {
    let data = Bytes::from(data.to_owned());
    let index = c
        .one(data.clone(), 1, true)
        .unwrap_or_else(|| panic!("{data:?} did not commit (SHOAL_SEED={})", c.seed()));
    assert!(
        run_until(c, 10_000, |c| nodes
            .iter()
            .all(|&n| c.nodes[n].applied_log.get(&index) == Some(&data))),
        "{data:?} at {index} not applied by all of {nodes:?}"
    );
}

#[test]
fn next_conf_moves_one_member_and_refuses_the_rest() {
    use ConfChangeKind::*;
    let c = conf(&[1, 2, 3], &[5]);
    assert_eq!(
        next_conf(&c, AddLearner, 4, 1, 0, 10),
        Ok(conf(&[1, 2, 3], &[4, 5]))
    );
    assert_eq!(
        next_conf(&c, AddLearner, 2, 1, 0, 10),
        Err(ConfChangeError::AlreadyMember(2))
    );
    assert_eq!(
        next_conf(&c, AddLearner, 5, 1, 0, 10),
        Err(ConfChangeError::AlreadyMember(5))
    );
    assert_eq!(
        next_conf(&c, AddLearner, 0, 1, 0, 10),
        Err(ConfChangeError::ZeroNode)
    );
    assert_eq!(
        next_conf(&c, PromoteLearner, 5, 1, 10, 10),
        Ok(conf(&[1, 2, 3, 5], &[]))
    );
    assert_eq!(
        next_conf(&c, PromoteLearner, 2, 1, 10, 10),
        Err(ConfChangeError::NotLearner(2))
    );
    assert_eq!(
        next_conf(&c, PromoteLearner, 4, 1, 10, 10),
        Err(ConfChangeError::NotLearner(4))
    );
    let far = PROMOTE_LAG_ENTRIES_MAX + 11;
    assert_eq!(
        next_conf(&c, PromoteLearner, 5, 1, 10, far),
        Err(ConfChangeError::LearnerBehind {
            node: 5,
            matched: 10,
            committed: far
        })
    );
    assert!(next_conf(&c, PromoteLearner, 5, 1, 11, far).is_ok());
    assert_eq!(next_conf(&c, Remove, 2, 1, 0, 10), Ok(conf(&[1, 3], &[5])));
    assert_eq!(
        next_conf(&c, Remove, 5, 1, 0, 10),
        Ok(conf(&[1, 2, 3], &[]))
    );
    assert_eq!(
        next_conf(&c, Remove, 1, 1, 0, 10),
        Err(ConfChangeError::RemoveLeader(1))
    );
    assert_eq!(
        next_conf(&c, Remove, 4, 1, 0, 10),
        Err(ConfChangeError::NotMember(4))
    );
    assert_eq!(
        next_conf(&conf(&[2], &[1]), Remove, 2, 1, 0, 10),
        Err(ConfChangeError::LastVoter(2))
    );
    let full: Vec<NodeId> = (1..=64).collect();
    assert!(matches!(
        next_conf(&conf(&full, &[]), AddLearner, 65, 1, 0, 10),
        Err(ConfChangeError::TooManyMembers { count: 65, .. })
    ));
}

/// One voter grows to three: each new member joins with no state, as a
/// learner, catches up, and is promoted; then the first node's crash leaves
/// a quorum that keeps committing.
#[test]
fn a_group_of_one_grows_to_three() {
    let mut opts = SimOptions::new(3, 1);
    opts.voters_initial = 1;
    let mut c = Cluster::new(opts);
    commit_on(&mut c, "alone", &[0]);
    for n in [1, 2] {
        change(&mut c, ConfChangeKind::AddLearner, n, &[0]);
        commit_on(&mut c, &format!("learner {n}"), &[0, n]);
        change(&mut c, ConfChangeKind::PromoteLearner, n, &[0, n]);
    }
    commit_on(&mut c, "three", &[0, 1, 2]);
    c.crash(0);
    commit_on(&mut c, "two of three", &[1, 2]);
    let l = leader(&mut c);
    assert_ne!(l, 0);
    assert_eq!(c.conf_state(l), Some(&conf(&[1, 2, 3], &[])));
}

/// A learner added after the log was compacted catches up from a snapshot.
#[test]
fn a_learner_catches_up_from_a_snapshot() {
    let mut opts = SimOptions::new(4, 2);
    opts.voters_initial = 3;
    opts.snapshot_interval = Some(5);
    let mut c = Cluster::new(opts);
    for i in 0..30 {
        commit_on(&mut c, &format!("v{i}"), &[0, 1, 2]);
    }
    change(&mut c, ConfChangeKind::AddLearner, 3, &[0, 1, 2]);
    commit_on(&mut c, "after", &[0, 1, 2, 3]);
    let raft = c.raft(3).expect("alive");
    assert!(
        raft.storage().current_snapshot().meta.index > 0,
        "the learner should have installed a snapshot"
    );
    assert_eq!(raft.conf_state(), &conf(&[1, 2, 3], &[4]));
    assert_eq!(raft.role(), Role::Follower);
}

/// A learner neither campaigns nor counts: a voter alone with a learner on
/// its side of a partition cannot commit or win, while the other side can.
#[test]
fn a_learner_neither_votes_nor_counts() {
    let mut opts = SimOptions::new(4, 3);
    opts.voters_initial = 3;
    let mut c = Cluster::new(opts);
    change(&mut c, ConfChangeKind::AddLearner, 3, &[0, 1, 2, 3]);
    commit_on(&mut c, "before", &[0, 1, 2, 3]);
    let l = leader(&mut c);
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let mut sides = vec![1u8; 4];
    for &o in &others {
        sides[o] = 0;
    }
    c.partition(&sides);
    let before_term = c.raft(3).expect("alive").term();
    let (index, _) = c
        .propose(l, Bytes::from_static(b"minority"))
        .expect("still leads");
    c.run_for(5_000);
    assert_ne!(
        c.n_committed(index).1.as_deref(),
        Some(&b"minority"[..]),
        "a voter and a learner are no quorum"
    );
    assert!(
        !c.raft(l).expect("alive").is_leader(),
        "check-quorum steps it down"
    );
    let learner = c.raft(3).expect("alive");
    assert_eq!(learner.role(), Role::Follower);
    assert_eq!(learner.term(), before_term, "a learner never campaigns");
    let majority_leader = leader(&mut c);
    assert!(others.contains(&majority_leader));
    c.heal();
    commit_on(&mut c, "healed", &[0, 1, 2, 3]);
}

/// A voter removed while it was cut off comes back: it does not know it was
/// removed and keeps trying to campaign, but pre-vote and the leader's lease
/// keep it from moving the group's term, and the group keeps committing.
#[test]
fn a_removed_member_cannot_disrupt_the_group() {
    let mut c = Cluster::new(SimOptions::new(4, 4));
    let l = leader(&mut c);
    let gone = (0..4).find(|&i| i != l).expect("a follower");
    let rest: Vec<usize> = (0..4).filter(|&i| i != gone).collect();
    c.disconnect(gone);
    change(&mut c, ConfChangeKind::Remove, gone, &rest);
    commit_on(&mut c, "without it", &rest);
    c.run_for(3_000);
    c.connect(gone);
    let l = leader(&mut c);
    let term = c.raft(l).expect("alive").term();
    for i in 0..20 {
        commit_on(&mut c, &format!("after {i}"), &rest);
        c.run_for(500);
    }
    let now = leader(&mut c);
    assert_eq!((now, c.raft(now).expect("alive").term()), (l, term));
    assert!(!c.raft(gone).expect("alive").is_leader());
}

/// A dead voter is replaced by a new node with a new id: the new node joins
/// as a learner, is promoted, the dead one is removed, and the group then
/// survives one more failure.
#[test]
fn a_dead_voter_is_replaced_by_a_new_node() {
    let mut opts = SimOptions::new(4, 5);
    opts.voters_initial = 3;
    opts.faults = NetFaults::unreliable();
    let mut c = Cluster::new(opts);
    commit_on(&mut c, "start", &[0, 1, 2]);
    let l = leader(&mut c);
    let dead = (0..3).find(|&i| i != l).expect("a follower");
    c.crash(dead);
    let alive: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
    change(&mut c, ConfChangeKind::AddLearner, 3, &alive);
    commit_on(&mut c, "learner", &[alive[0], alive[1], 3]);
    let mut with_new = alive.clone();
    with_new.push(3);
    change(&mut c, ConfChangeKind::PromoteLearner, 3, &with_new);
    change(&mut c, ConfChangeKind::Remove, dead, &with_new);
    let l = leader(&mut c);
    let other = *alive.iter().find(|&&i| i != l).expect("two alive");
    c.crash(l);
    commit_on(&mut c, "replaced", &[other, 3]);
}

/// One change at a time, and a new leader proposes none until it has
/// applied its own term's first entry.
#[test]
fn changes_wait_for_the_previous_one_and_for_the_leaders_first_entry() {
    let mut opts = SimOptions::new(5, 6);
    opts.voters_initial = 3;
    let mut c = Cluster::new(opts);
    commit_on(&mut c, "start", &[0, 1, 2]);
    let l = leader(&mut c);
    let first = c.propose_conf_change(l, ConfChangeKind::AddLearner, 3);
    assert!(matches!(first, Some(Ok(_))));
    let second = c.propose_conf_change(l, ConfChangeKind::AddLearner, 4);
    assert!(
        matches!(
            second,
            Some(Err(Error::ConfChange(ConfChangeError::Pending { .. })))
        ),
        "{second:?}"
    );
    change(&mut c, ConfChangeKind::AddLearner, 4, &[0, 1, 2]);
    assert!(matches!(
        c.propose_conf_change(l, ConfChangeKind::Remove, l),
        Some(Err(Error::ConfChange(ConfChangeError::RemoveLeader(_))))
    ));
    // A follower cannot propose at all.
    let f = (0..3).find(|&i| i != l).expect("a follower");
    assert!(matches!(
        c.propose_conf_change(f, ConfChangeKind::Remove, 4),
        Some(Err(Error::NotLeader { .. }))
    ));
    // A fresh leader: its first proposal attempt comes before its no-op is
    // applied (nothing has been processed since it won).
    c.crash(l);
    let end = c.now_ms + 10_000;
    let new_leader = loop {
        assert!(c.now_ms < end, "no new leader");
        c.run_for(1);
        if let Some(&(n, _)) = c.leaders().iter().find(|&&(n, _)| n != l) {
            break n;
        }
    };
    let raft = c.raft(new_leader).expect("alive");
    assert!(raft.applied_index() < raft.last_index().expect("last"));
    assert!(matches!(
        c.propose_conf_change(new_leader, ConfChangeKind::Remove, 4),
        Some(Err(Error::ConfChange(ConfChangeError::Pending { .. })))
    ));
}

/// The soak: every seed draws a number of nodes, how many form the group
/// at first, and fault rates, then runs a chaos phase in which membership
/// changes (adding learners, promoting them, removing voters and learners,
/// removed nodes sometimes added back) happen among drops, duplicates,
/// delays, long reordering, partitions, crashes that lose unpersisted state,
/// restarts, leadership transfers, proposals and reads; then a calm phase in
/// which a leader must appear and a new entry must reach every member. The
/// simulator checks safety after every event.
fn membership_soak(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nodes = rng.random_range(3..=7);
    let mut opts = SimOptions::new(nodes, seed);
    opts.voters_initial = rng.random_range(1..=3);
    let faults = NetFaults {
        drop_request_per_mille: rng.random_range(0..250),
        drop_response_per_mille: rng.random_range(0..250),
        duplicate_per_mille: rng.random_range(0..150),
        delay_ms_max: rng.random_range(0..60),
        long_delay_per_mille: if rng.random_bool(0.3) {
            rng.random_range(0..600)
        } else {
            0
        },
    };
    opts.faults = faults.clone();
    opts.snapshot_interval = if rng.random_bool(0.5) {
        Some(rng.random_range(2..30))
    } else {
        None
    };
    // Removed members are kept from disrupting by pre-vote and the leader's
    // lease (check-quorum), the product's defaults: both stay on here.
    opts.config.max_inflight_msgs = rng.random_range(1..8);
    opts.config.max_size_per_msg_bytes = 24 + rng.random_range(0..100);
    opts.config.max_inflight_bytes = opts.config.max_size_per_msg_bytes * rng.random_range(1..6);
    let crash_per_mille = rng.random_range(0..15);
    let partition_per_mille = rng.random_range(0..20);
    let change_per_mille = rng.random_range(20..200);
    let mut c = Cluster::new(opts);
    c.crash_before_persist_per_mille = if rng.random_bool(0.5) {
        rng.random_range(0..40)
    } else {
        0
    };
    let mut value = 0u64;
    let mut changes = 0u32;
    let end = c.now_ms + rng.random_range(3_000..8_000);
    let step_ms_max = rng.random_range(2..40);
    while c.now_ms < end {
        c.run_for(rng.random_range(1..step_ms_max));
        let n = c.len();
        if rng.random_bool(0.05) {
            let i = rng.random_range(0..n);
            if !c.is_alive(i) {
                c.restart(i);
                c.connect(i);
            }
        }
        let roll = rng.random_range(0..1000);
        let leader = c.leaders().iter().max_by_key(|(_, t)| *t).map(|&(l, _)| l);
        if roll < crash_per_mille {
            let i = rng.random_range(0..n);
            if c.is_alive(i) {
                c.crash(i);
            } else {
                c.restart(i);
                c.connect(i);
            }
        } else if roll < crash_per_mille + partition_per_mille {
            match rng.random_range(0..3) {
                0 => c.heal(),
                1 => {
                    let sides: Vec<u8> = (0..n).map(|_| rng.random_range(0..2)).collect();
                    c.partition(&sides);
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
        } else if roll < crash_per_mille + partition_per_mille + change_per_mille {
            if let Some(l) = leader {
                let cs = c.conf_state(l).cloned().unwrap_or_default();
                let node = rng.random_range(0..n);
                let id = node as NodeId + 1;
                let kind = if cs.learners.contains(&id) && rng.random_bool(0.7) {
                    ConfChangeKind::PromoteLearner
                } else if cs.contains(id) {
                    ConfChangeKind::Remove
                } else {
                    ConfChangeKind::AddLearner
                };
                if let Some(Ok(_)) = c.propose_conf_change(l, kind, node) {
                    changes += 1;
                }
            }
        } else if roll < 700 {
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

    c.crash_before_persist_per_mille = 0;
    c.faults = NetFaults::reliable();
    for i in 0..c.len() {
        c.restart(i);
    }
    c.heal();
    let start = c.now_ms;
    let mut done = false;
    while !done && c.now_ms < start + LIVENESS_MS_MAX {
        c.run_for(50);
        let Some(&(l, _)) = c.leaders().iter().max_by_key(|(_, t)| *t) else {
            continue;
        };
        value += 1;
        let data = Bytes::from(format!("final{value}"));
        let Some((index, _)) = c.propose(l, data.clone()) else {
            continue;
        };
        let t = c.now_ms;
        while c.now_ms < t + 3_000 {
            c.run_for(20);
            let Some(cs) = c.conf_state(l).cloned() else {
                break;
            };
            let reached = cs
                .members()
                .all(|m| c.nodes[m as usize - 1].applied_log.get(&index) == Some(&data));
            if reached && c.checker.committed_at(index).is_some() {
                done = true;
                break;
            }
        }
    }
    if std::env::var("SHOAL_SIM_VERBOSE").is_ok() {
        for i in 0..c.len() {
            if let Some(r) = c.raft(i) {
                eprintln!(
                    "  node {}: {:?} term {} leader {} commit {} applied {} last {:?} conf {:?} progress-to {:?}",
                    i + 1,
                    r.role(),
                    r.term(),
                    r.leader_id(),
                    r.commit_index(),
                    r.applied_index(),
                    r.last_index(),
                    r.conf_state(),
                    (1..=c.len() as u64).map(|p| r.progress(p).map(|pr| (pr.match_index, pr.next_index, pr.state))).collect::<Vec<_>>()
                );
            }
        }
        eprintln!(
            "seed {seed}: nodes {} changes {changes} committed {} now {} ms",
            c.len(),
            c.checker.committed_len(),
            c.now_ms
        );
    }
    assert!(
        done,
        "liveness: no entry reached every member within {LIVENESS_MS_MAX} ms after faults \
         stopped (faults {faults:?}, {changes} changes)\nreplay with SHOAL_SEED={seed}"
    );
}

#[test]
fn membership_soak_seeds() {
    run_seeds(2_000, membership_soak);
}

/// A node runs with a change as soon as it is in its log, committed or not:
/// here node 2 of {1, 2} holds the removal of node 1 but never learned that
/// it committed (node 1, the leader that proposed it, is gone). Running
/// with {2}, node 2 elects itself; had it waited to apply the change, it
/// would wait forever for node 1's vote.
#[test]
fn a_change_is_in_force_once_in_the_log() {
    use shoal_consensus::{
        ConfChange, Config, Entry, EntryKind, HardState, MemStorage, MessageBody, RawNode,
    };
    let mut storage = MemStorage::with_voters(vec![1, 2]);
    let change = ConfChange {
        kind: ConfChangeKind::Remove,
        node: 1,
        conf_after: conf(&[2], &[]),
        context: Bytes::new(),
    };
    let entry = |index, kind, data| Entry {
        term: 1,
        index,
        kind,
        data,
    };
    storage
        .append(&[
            entry(1, EntryKind::Normal, Bytes::new()),
            entry(2, EntryKind::ConfigChange, change.encode()),
        ])
        .unwrap();
    storage.set_hard_state(HardState {
        term: 1,
        vote: 1,
        commit: 1,
    });
    let mut node = RawNode::new(Config::new(2, vec![1, 2]), storage).unwrap();
    assert_eq!(node.conf_state(), &conf(&[2], &[]));
    assert_eq!(node.conf_state_applied(), &conf(&[1, 2], &[]));
    let mut to_node_1 = 0;
    for _ in 0..100 {
        node.tick().unwrap();
        while node.has_ready() {
            let ready = node.ready().unwrap();
            node.storage_mut().persist_ready(&ready).unwrap();
            to_node_1 += ready
                .messages
                .iter()
                .chain(&ready.persisted_messages)
                .filter(|m| m.to == 1 && matches!(m.body, MessageBody::RequestVote { .. }))
                .count();
            node.advance(ready).unwrap();
        }
    }
    assert!(node.is_leader(), "node 2 alone is a quorum of {{2}}");
    assert_eq!(to_node_1, 0, "node 1 is no voter any more");
    assert_eq!(node.commit_index(), 3, "the removal and the no-op commit");
    assert_eq!(node.conf_state_applied(), &conf(&[2], &[]));
}
