//! Goal: every config the controller can reach satisfies the lab's
//! `CheckConfig` (the expected group set, no shard on an unknown group,
//! max ≤ min + 1) and our stronger promises (numbers advance by one, the
//! result is deterministic, no more shards move than any even assignment
//! needs, joins only move shards to new groups and leaves only from leaving
//! ones, `moves` is the diff). Checked on the lab's scenario shapes and on
//! random sequences of joins, leaves, moves and rebalances (proptest).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use shoal_consensus::NodeId;
use shoal_engine::{GroupId, ShardId};

use super::*;

/// The lab's `CheckConfig`: `config` names exactly `expected` groups, puts
/// no shard on an unknown group (nor leaves one unassigned while groups
/// exist), and, if `balanced`, no group holds more than one shard more than
/// another.
fn check_config(config: &ShardConfig, expected: &BTreeSet<GroupId>, balanced: bool) {
    assert_eq!(config.validate(), Ok(()), "config {config:?}");
    let names: BTreeSet<GroupId> = config.groups.keys().copied().collect();
    assert_eq!(&names, expected, "groups of config {}", config.num);
    for (shard, &group) in config.shards.iter().enumerate() {
        if expected.is_empty() {
            assert_eq!(group, GROUP_UNASSIGNED, "shard {shard}");
        } else {
            assert!(expected.contains(&group), "shard {shard} on {group}");
        }
    }
    if balanced {
        assert!(
            is_even(config),
            "config {} is uneven: {config:?}",
            config.num
        );
    }
}

/// Whether no group holds more than one shard more than another.
fn is_even(config: &ShardConfig) -> bool {
    let loads = config
        .groups
        .keys()
        .map(|&group| config.shards_of(group).len());
    let (min, max) = loads.fold((usize::MAX, 0), |(min, max), load| {
        (min.min(load), max.max(load))
    });
    config.groups.is_empty() || max <= min + 1
}

/// The fewest shards any even assignment of `from`'s shards to the groups
/// of `to` must move, computed independently of `balance`: every shard on a
/// departed (or no) group, plus what each group holds above `s / g`, less
/// the `s % g` extra shares given to groups above `s / g`.
fn moves_needed(from: &ShardConfig, to: &ShardConfig) -> usize {
    if to.groups.is_empty() {
        return 0;
    }
    let shards = from.shards.len();
    let orphans = from
        .shards
        .iter()
        .filter(|group| !to.groups.contains_key(group))
        .count();
    let base = shards / to.groups.len();
    let extra = shards % to.groups.len();
    let loads: Vec<usize> = to
        .groups
        .keys()
        .map(|&group| from.shards_of(group).len())
        .collect();
    let above: usize = loads.iter().map(|&load| load.saturating_sub(base)).sum();
    let groups_above = loads.iter().filter(|&&load| load > base).count();
    orphans + above - extra.min(groups_above)
}

/// Three members per group, derived from the group id.
fn members(group: GroupId) -> Vec<NodeId> {
    (1..=3).map(|i| group * 10 + i).collect()
}

fn joining(ids: impl IntoIterator<Item = GroupId>) -> BTreeMap<GroupId, Vec<NodeId>> {
    ids.into_iter()
        .map(|group| (group, members(group)))
        .collect()
}

/// Goal: the lab's ManyJoinLeave5A shape: Gid1 owns everything (num 1),
/// then groups 2..=9 join one by one and leave one by one. Every step is
/// even, moves only what it must, in the right direction, and the last
/// leave gives everything back to Gid1.
#[test]
fn many_join_leave_shape() {
    for shards in [12, SHARDS_DEFAULT] {
        let mut config = join(&ShardConfig::initial(shards).unwrap(), joining([1])).unwrap();
        let mut expected = BTreeSet::from([1]);
        check_config(&config, &expected, true);
        assert_eq!((config.num, config.group_of(0)), (1, Some(1)));
        for group in 2..=9 {
            let next = join(&config, joining([group])).unwrap();
            expected.insert(group);
            check_config(&next, &expected, true);
            let moved = moves(&config, &next);
            assert_eq!(moved.len(), next.shards_of(group).len());
            assert!(moved.iter().all(|m| m.to_group == group));
            config = next;
        }
        for group in 2..=9 {
            let next = leave(&config, &[group]).unwrap();
            expected.remove(&group);
            check_config(&next, &expected, true);
            let moved = moves(&config, &next);
            assert_eq!(moved.len(), config.shards_of(group).len());
            assert!(moved.iter().all(|m| m.from_group == group));
            config = next;
        }
        assert_eq!(config.num, 17);
        assert_eq!(config.shards_of(1).len(), shards as usize);
    }
}

/// Goal: the lab's JoinLeaveBasic5A shape: gid 2 joins, Gid1 leaves (gid 2
/// owns everything), Gid1 re-joins and takes half back.
#[test]
fn join_leave_rejoin_shape() {
    let one = join(&ShardConfig::initial(12).unwrap(), joining([1])).unwrap();
    let two = join(&one, joining([2])).unwrap();
    assert_eq!(two.num, 2);
    assert_eq!(two.shards_of(2).len(), 6);
    let without_one = leave(&two, &[1]).unwrap();
    check_config(&without_one, &BTreeSet::from([2]), true);
    assert_eq!(without_one.shards_of(2).len(), 12);
    let again = join(&without_one, joining([1])).unwrap();
    check_config(&again, &BTreeSet::from([1, 2]), true);
    assert_eq!(moves(&without_one, &again).len(), 6);
}

/// One step of a random sequence. Indices pick among the current groups
/// (modulo their count), so most steps are meaningful; some are meant to
/// be refused.
#[derive(Debug, Clone)]
enum Op {
    /// `count` fresh groups join.
    Join { count: usize },
    /// An existing group joins again (refused).
    JoinExisting { pick: usize },
    /// Up to three existing groups leave (refused if that is all of them).
    Leave { picks: Vec<usize> },
    /// A group that never joined leaves (refused).
    LeaveUnknown,
    /// A shard moves to an existing group; `past_end` names a shard out of
    /// range instead (refused).
    Move {
        shard: u32,
        pick: usize,
        past_end: bool,
    },
    /// Rebalance.
    Rebalance,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..=3).prop_map(|count| Op::Join { count }),
        1 => any::<usize>().prop_map(|pick| Op::JoinExisting { pick }),
        3 => proptest::collection::vec(any::<usize>(), 1..=3).prop_map(|picks| Op::Leave { picks }),
        1 => Just(Op::LeaveUnknown),
        3 => (any::<u32>(), any::<usize>(), proptest::bool::weighted(0.1))
            .prop_map(|(shard, pick, past_end)| Op::Move { shard, pick, past_end }),
        2 => Just(Op::Rebalance),
    ]
}

/// Replays with `PROPTEST_RNG_SEED=<seed>`; a failure prints the seed (and
/// proptest prints the shrunk operations).
fn seeded_config() -> ProptestConfig {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("controller proptest: replay with PROPTEST_RNG_SEED={seed}");
    ProptestConfig {
        cases: 256,
        rng_seed: RngSeed::Fixed(seed),
        // The seed replays a failure; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `ops` from the initial config of `shards` shards, checking every
/// step against a model of the expected group set.
fn run_sequence(shards: u32, ops: &[Op]) {
    let mut config = ShardConfig::initial(shards).unwrap();
    let mut expected: BTreeSet<GroupId> = BTreeSet::new();
    let mut next_group: GroupId = 1;
    let pick = |expected: &BTreeSet<GroupId>, index: usize| -> Option<GroupId> {
        (!expected.is_empty()).then(|| *expected.iter().nth(index % expected.len()).unwrap())
    };

    for op in ops {
        // Each arm returns the result, whether it must be even, and the
        // groups a join added / a leave removed.
        let (result, even, joined, left) = match op {
            Op::Join { count } => {
                let ids: Vec<GroupId> = (next_group..next_group + *count as u64).collect();
                next_group += *count as u64;
                let result = join(&config, joining(ids.iter().copied()));
                assert_eq!(result, join(&config, joining(ids.iter().copied())));
                (result, true, ids, vec![])
            }
            Op::JoinExisting { pick: index } => {
                let Some(group) = pick(&expected, *index) else {
                    continue;
                };
                let result = join(&config, joining([group]));
                assert_eq!(result, Err(RebalanceError::GroupExists { group }));
                continue;
            }
            Op::Leave { picks } => {
                let ids: Vec<GroupId> = picks.iter().filter_map(|&i| pick(&expected, i)).collect();
                let result = leave(&config, &ids);
                assert_eq!(result, leave(&config, &ids));
                let distinct: BTreeSet<GroupId> = ids.iter().copied().collect();
                if expected.is_empty() {
                    assert_eq!(result, Err(RebalanceError::NoGroups));
                    continue;
                }
                if distinct.len() == expected.len() {
                    assert_eq!(result, Err(RebalanceError::LeaveAll { shards }));
                    continue;
                }
                (result, true, vec![], ids)
            }
            Op::LeaveUnknown => {
                let result = leave(&config, &[next_group]);
                assert_eq!(
                    result,
                    Err(RebalanceError::UnknownGroup { group: next_group })
                );
                continue;
            }
            Op::Move {
                shard,
                pick: index,
                past_end,
            } => {
                let Some(group) = pick(&expected, *index) else {
                    let result = move_shard(&config, 0, next_group);
                    assert_eq!(
                        result,
                        Err(RebalanceError::UnknownGroup { group: next_group })
                    );
                    continue;
                };
                if *past_end {
                    let past = shards + shard % 4;
                    assert_eq!(
                        move_shard(&config, past, group),
                        Err(RebalanceError::ShardOutOfRange {
                            shard: past,
                            shards
                        })
                    );
                    continue;
                }
                let shard: ShardId = shard % shards;
                let result = move_shard(&config, shard, group);
                assert_eq!(result, move_shard(&config, shard, group));
                assert_eq!(result.as_ref().unwrap().group_of(shard), Some(group));
                (result, false, vec![], vec![])
            }
            Op::Rebalance => {
                let result = rebalance(&config);
                assert_eq!(result, rebalance(&config));
                (result, true, vec![], vec![])
            }
        };

        let next = result.unwrap_or_else(|error| panic!("{op:?} on {config:?}: {error}"));
        expected.extend(&joined);
        for group in &left {
            expected.remove(group);
        }
        check_config(&next, &expected, even);
        assert_eq!(next.num, config.num + 1, "{op:?}");

        let moved = moves(&config, &next);
        let diff: Vec<ShardMove> = (0..shards)
            .filter(|&s| config.shards[s as usize] != next.shards[s as usize])
            .map(|s| ShardMove {
                shard: s,
                from_group: config.shards[s as usize],
                to_group: next.shards[s as usize],
            })
            .collect();
        assert_eq!(moved, diff, "{op:?}");

        if even {
            assert_eq!(moved.len(), moves_needed(&config, &next), "{op:?}");
            if is_even(&config) {
                match op {
                    Op::Join { .. } => assert!(
                        moved.iter().all(|m| joined.contains(&m.to_group)),
                        "{op:?}: a shard moved to a group that did not join: {moved:?}"
                    ),
                    Op::Leave { .. } => assert!(
                        moved.iter().all(|m| left.contains(&m.from_group)),
                        "{op:?}: a shard moved from a group that did not leave: {moved:?}"
                    ),
                    _ => assert_eq!(moved, vec![], "{op:?} of an even config"),
                }
            }
        }
        config = next;
    }
}

proptest! {
    #![proptest_config(seeded_config())]

    /// Goal: any sequence of joins, leaves, moves and rebalances keeps every
    /// config valid, checked, minimal and deterministic.
    #[test]
    fn random_sequences_keep_configs_checked(
        shards in prop_oneof![1u32..=40, Just(12u32), Just(SHARDS_DEFAULT)],
        ops in proptest::collection::vec(op_strategy(), 1..40),
    ) {
        run_sequence(shards, &ops);
    }
}
