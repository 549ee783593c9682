//! How a configuration changes: [`join`], [`leave`], [`move_shard`] and
//! [`rebalance`] each take a config and return the next one (`num + 1`) or a
//! [`RebalanceError`], never changing their input; [`moves`] lists the shards
//! that change hands between two configs, for the move protocol to carry
//! out (Freeze at the source, Install at the destination, Delete at the
//! source).
//!
//! # The balance rule
//! With `g` groups and `s` shards, every group's fair share is `s / g`, and
//! the `s % g` groups already holding the most shards (ties: lower group id)
//! may keep one more. Then:
//! 1. A shard moves only if its group left (or it was unassigned), or its
//!    group holds more than its share; such a group gives up its
//!    highest-numbered shards.
//! 2. The freed shards, in shard order, go one at a time to the least-loaded
//!    group below its share (ties: lower group id).
//!
//! The result is even (max − min ≤ 1 over the groups), deterministic (it
//! depends only on the input), and moves as few shards as any even
//! assignment could: every group must shed what it holds above its share,
//! and handing the extra shards to the groups holding the most makes that
//! excess as small as it can be. From an even config, a join therefore only
//! moves shards *to* the new groups, and a leave only moves shards *from*
//! the leaving ones. With no groups, every shard is unassigned.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_consensus::NodeId;
use shoal_engine::{GroupId, ShardId};

use super::config::{validate_group, ConfigError, ShardConfig, GROUPS_MAX, GROUP_UNASSIGNED};

/// Why a configuration change was refused. The input config is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RebalanceError {
    /// The config to change is itself invalid (a bug or corrupted state
    /// upstream: configs are validated where they are read).
    #[error("the current config is invalid: {0}")]
    InvalidConfig(#[source] ConfigError),
    /// A join or a leave named no group.
    #[error("the request names no group")]
    NoGroups,
    /// A joining group is already in the config.
    #[error("group {group} is already in the config")]
    GroupExists {
        /// The group.
        group: GroupId,
    },
    /// A joining group is invalid (reserved id, no members, too many or
    /// duplicate members), or there would be too many groups.
    #[error("invalid joining group: {0}")]
    InvalidGroup(#[source] ConfigError),
    /// A leaving group, or the target of a move, is not in the config.
    #[error("group {group} is not in the config")]
    UnknownGroup {
        /// The group.
        group: GroupId,
    },
    /// Every group would leave, and no group would serve the shards.
    #[error("every group would leave: {shards} shards would be unserved")]
    LeaveAll {
        /// The cluster's shard count.
        shards: u32,
    },
    /// A move names a shard the cluster does not have.
    #[error("shard {shard} is out of range: the cluster has {shards} shards")]
    ShardOutOfRange {
        /// The shard.
        shard: ShardId,
        /// The cluster's shard count.
        shards: u32,
    },
}

/// One shard changing hands between two configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMove {
    /// The shard.
    pub shard: ShardId,
    /// Its group in the older config; [`GROUP_UNASSIGNED`] if none served
    /// it (a shard that never held data: nothing to freeze or copy).
    pub from_group: GroupId,
    /// Its group in the newer config.
    pub to_group: GroupId,
}

/// The next config with `new_groups` added and the shards rebalanced.
///
/// # Errors
/// [`RebalanceError::InvalidConfig`], [`RebalanceError::NoGroups`],
/// [`RebalanceError::GroupExists`], or [`RebalanceError::InvalidGroup`] for a
/// group with id 0, no members, too many or duplicate members, or one group
/// too many.
pub fn join(
    config: &ShardConfig,
    new_groups: BTreeMap<GroupId, Vec<NodeId>>,
) -> Result<ShardConfig, RebalanceError> {
    config.validate().map_err(RebalanceError::InvalidConfig)?;
    if new_groups.is_empty() {
        return Err(RebalanceError::NoGroups);
    }
    let mut groups = config.groups.clone();
    for (group, members) in new_groups {
        if groups.contains_key(&group) {
            return Err(RebalanceError::GroupExists { group });
        }
        validate_group(group, &members).map_err(RebalanceError::InvalidGroup)?;
        groups.insert(group, members);
    }
    if groups.len() > GROUPS_MAX {
        return Err(RebalanceError::InvalidGroup(ConfigError::TooManyGroups {
            groups: groups.len(),
        }));
    }
    let shards = balance(&config.shards, &groups);
    Ok(next(config, shards, groups))
}

/// The next config without `groups`, their shards handed to the remaining
/// groups. A group listed twice leaves once.
///
/// # Errors
/// [`RebalanceError::InvalidConfig`], [`RebalanceError::NoGroups`],
/// [`RebalanceError::UnknownGroup`], or [`RebalanceError::LeaveAll`] if no
/// group would remain.
pub fn leave(config: &ShardConfig, groups: &[GroupId]) -> Result<ShardConfig, RebalanceError> {
    config.validate().map_err(RebalanceError::InvalidConfig)?;
    if groups.is_empty() {
        return Err(RebalanceError::NoGroups);
    }
    let mut remaining = config.groups.clone();
    for &group in groups {
        if !config.groups.contains_key(&group) {
            return Err(RebalanceError::UnknownGroup { group });
        }
        remaining.remove(&group);
    }
    if remaining.is_empty() {
        return Err(RebalanceError::LeaveAll {
            shards: config.shard_count(),
        });
    }
    let shards = balance(&config.shards, &remaining);
    Ok(next(config, shards, remaining))
}

/// The next config with `shard` on `to_group` and nothing else changed (an
/// operator's override: the result may be uneven until a [`rebalance`]).
/// Moving a shard to the group that has it still gives a new number.
///
/// # Errors
/// [`RebalanceError::InvalidConfig`], [`RebalanceError::ShardOutOfRange`],
/// [`RebalanceError::UnknownGroup`].
pub fn move_shard(
    config: &ShardConfig,
    shard: ShardId,
    to_group: GroupId,
) -> Result<ShardConfig, RebalanceError> {
    config.validate().map_err(RebalanceError::InvalidConfig)?;
    if shard >= config.shard_count() {
        return Err(RebalanceError::ShardOutOfRange {
            shard,
            shards: config.shard_count(),
        });
    }
    if !config.groups.contains_key(&to_group) {
        return Err(RebalanceError::UnknownGroup { group: to_group });
    }
    let mut shards = config.shards.clone();
    shards[shard as usize] = to_group;
    Ok(next(config, shards, config.groups.clone()))
}

/// The next config with `group`'s members replaced by `members` (its
/// replica group's membership changed, `shoal member add | remove
/// --group`), every shard where it was: clients, moves and leaves then
/// address the group's nodes as they are. Writing the members a config
/// already has still gives a new number.
///
/// # Errors
/// [`RebalanceError::InvalidConfig`], [`RebalanceError::UnknownGroup`], or
/// [`RebalanceError::InvalidGroup`] for no, too many or duplicate members.
pub fn set_members(
    config: &ShardConfig,
    group: GroupId,
    members: Vec<NodeId>,
) -> Result<ShardConfig, RebalanceError> {
    config.validate().map_err(RebalanceError::InvalidConfig)?;
    if !config.groups.contains_key(&group) {
        return Err(RebalanceError::UnknownGroup { group });
    }
    validate_group(group, &members).map_err(RebalanceError::InvalidGroup)?;
    let mut groups = config.groups.clone();
    groups.insert(group, members);
    Ok(next(config, config.shards.clone(), groups))
}

/// The next config with the same groups and the shards balanced by the
/// module's rule (no shard moves if the config is already even).
///
/// # Errors
/// [`RebalanceError::InvalidConfig`].
pub fn rebalance(config: &ShardConfig) -> Result<ShardConfig, RebalanceError> {
    config.validate().map_err(RebalanceError::InvalidConfig)?;
    let shards = balance(&config.shards, &config.groups);
    Ok(next(config, shards, config.groups.clone()))
}

/// The shards whose group differs between `from` and `to`, in shard order.
///
/// # Panics
/// If the configs have different shard counts: they cannot belong to one
/// cluster.
pub fn moves(from: &ShardConfig, to: &ShardConfig) -> Vec<ShardMove> {
    assert_eq!(
        from.shards.len(),
        to.shards.len(),
        "moves: config {} and config {} have different shard counts",
        from.num,
        to.num
    );
    (0..)
        .zip(from.shards.iter().zip(&to.shards))
        .filter(|(_, (from_group, to_group))| from_group != to_group)
        .map(|(shard, (&from_group, &to_group))| ShardMove {
            shard,
            from_group,
            to_group,
        })
        .collect()
}

/// Builds the successor of `config` and checks it: every function above
/// must produce a valid config from a valid one.
fn next(
    config: &ShardConfig,
    shards: Vec<GroupId>,
    groups: BTreeMap<GroupId, Vec<NodeId>>,
) -> ShardConfig {
    let next = ShardConfig {
        num: config.num + 1,
        shards,
        groups,
    };
    if let Err(error) = next.validate() {
        panic!(
            "config {} derived from config {} is invalid: {error}",
            next.num, config.num
        );
    }
    next
}

/// The shard table that assigns every shard to one of `groups` by the
/// module's balance rule, starting from the assignment `owners` (shards on
/// groups not in `groups` count as unassigned).
fn balance(owners: &[GroupId], groups: &BTreeMap<GroupId, Vec<NodeId>>) -> Vec<GroupId> {
    if groups.is_empty() {
        return vec![GROUP_UNASSIGNED; owners.len()];
    }
    // What each group keeps for now; every other shard is free.
    let mut held: BTreeMap<GroupId, Vec<ShardId>> =
        groups.keys().map(|&group| (group, Vec::new())).collect();
    let mut free: Vec<ShardId> = Vec::new();
    for (shard, owner) in (0..).zip(owners) {
        match held.get_mut(owner) {
            Some(shards) => shards.push(shard),
            None => free.push(shard),
        }
    }

    // Shares: the `extra` groups holding the most get one more.
    let base = owners.len() / groups.len();
    let extra = owners.len() % groups.len();
    let mut ranked: Vec<(GroupId, usize)> = held
        .iter()
        .map(|(&group, shards)| (group, shards.len()))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let share: BTreeMap<GroupId, usize> = ranked
        .iter()
        .enumerate()
        .map(|(rank, &(group, _))| (group, base + usize::from(rank < extra)))
        .collect();

    // Groups above their share give up their highest-numbered shards.
    for (group, shards) in &mut held {
        let keep = share[group];
        if shards.len() > keep {
            free.extend(shards.drain(keep..));
        }
    }
    free.sort_unstable();

    // Free shards go to the least-loaded group below its share.
    let mut below: BTreeSet<(usize, GroupId)> = held
        .iter()
        .filter(|(group, shards)| shards.len() < share[*group])
        .map(|(&group, shards)| (shards.len(), group))
        .collect();
    let mut table = owners.to_vec();
    for shard in free {
        let (load, group) = below
            .pop_first()
            .expect("the shares add up to the shard count");
        table[shard as usize] = group;
        if load + 1 < share[&group] {
            below.insert((load + 1, group));
        }
    }
    assert!(below.is_empty(), "every group reached its share");
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::config::SHARDS_DEFAULT;

    fn groups(ids: impl IntoIterator<Item = GroupId>) -> BTreeMap<GroupId, Vec<NodeId>> {
        ids.into_iter()
            .map(|group| (group, vec![group * 10 + 1, group * 10 + 2, group * 10 + 3]))
            .collect()
    }

    fn counts(config: &ShardConfig) -> BTreeMap<GroupId, usize> {
        config
            .groups
            .keys()
            .map(|&group| (group, config.shards_of(group).len()))
            .collect()
    }

    /// Goal: the lab's InitQuery5A shape: the first join gives Gid1 every
    /// shard, and that config is number 1.
    #[test]
    fn first_join_assigns_every_shard_as_num_1() {
        let initial = ShardConfig::initial(12).unwrap();
        let first = join(&initial, groups([1])).unwrap();
        assert_eq!(first.num, 1);
        assert_eq!(first.shards, vec![1; 12]);
        assert_eq!(moves(&initial, &first).len(), 12);
        assert!(moves(&initial, &first)
            .iter()
            .all(|m| m.from_group == GROUP_UNASSIGNED && m.to_group == 1));
    }

    /// Goal: joining a second group moves exactly half the shards, all of
    /// them to the new group (12 shards: 6; the default 256: 128).
    #[test]
    fn second_join_moves_half_to_the_new_group() {
        for (shards, expected) in [(12, 6), (SHARDS_DEFAULT, 128)] {
            let one = join(&ShardConfig::initial(shards).unwrap(), groups([1])).unwrap();
            let two = join(&one, groups([2])).unwrap();
            let moved = moves(&one, &two);
            assert_eq!(moved.len(), expected);
            assert!(moved.iter().all(|m| m.from_group == 1 && m.to_group == 2));
            assert_eq!(two.shards_of(1).len(), expected);
        }
    }

    /// Goal: the remainder stays with the groups already holding the most
    /// (ties by lower gid), so no shard moves just to reshuffle the +1s.
    #[test]
    fn extra_shards_stay_with_the_fullest_groups() {
        // 10 shards over {1, 2, 3}: shares 4/3/3, group 1 (lowest gid) gets the 4.
        let three = join(&ShardConfig::initial(10).unwrap(), groups([1, 2, 3])).unwrap();
        assert_eq!(counts(&three), BTreeMap::from([(1, 4), (2, 3), (3, 3)]));
        // Move one shard of 1 to 3: 3 now holds the most and keeps the +1.
        let shard = three.shards_of(1)[0];
        let moved = move_shard(&three, shard, 3).unwrap();
        let balanced = rebalance(&moved).unwrap();
        assert_eq!(moves(&moved, &balanced), vec![]);
        assert_eq!(counts(&balanced), BTreeMap::from([(1, 3), (2, 3), (3, 4)]));
    }

    /// Goal: a leaving group's shards go to the least-loaded groups, and
    /// nothing else moves.
    #[test]
    fn leave_hands_shards_to_the_least_loaded() {
        // 7 shards over {1, 2, 3}: 3/2/2. Group 1 leaves: 3 shards over {2, 3}.
        let three = join(&ShardConfig::initial(7).unwrap(), groups([1, 2, 3])).unwrap();
        assert_eq!(counts(&three), BTreeMap::from([(1, 3), (2, 2), (3, 2)]));
        let two = leave(&three, &[1]).unwrap();
        assert_eq!(counts(&two), BTreeMap::from([(2, 4), (3, 3)]));
        let moved = moves(&three, &two);
        assert_eq!(moved.len(), 3);
        assert!(moved.iter().all(|m| m.from_group == 1));
    }

    /// Goal: with more groups than shards, each shard has its own group and
    /// the others hold nothing (max − min = 1).
    #[test]
    fn more_groups_than_shards() {
        let config = join(&ShardConfig::initial(3).unwrap(), groups(1..=5)).unwrap();
        assert_eq!(config.shards, vec![1, 2, 3]);
        let config = leave(&config, &[2]).unwrap();
        assert_eq!(config.shards, vec![1, 4, 3]);
    }

    /// Goal: an operator's move is applied as asked, and a rebalance then
    /// undoes only the imbalance it caused.
    #[test]
    fn move_then_rebalance() {
        let two = join(&ShardConfig::initial(12).unwrap(), groups([1, 2])).unwrap();
        let mut config = two.clone();
        for shard in two.shards_of(1).into_iter().take(3) {
            config = move_shard(&config, shard, 2).unwrap();
        }
        assert_eq!(config.num, two.num + 3);
        assert_eq!(counts(&config), BTreeMap::from([(1, 3), (2, 9)]));
        let balanced = rebalance(&config).unwrap();
        assert_eq!(moves(&config, &balanced).len(), 3);
        assert_eq!(counts(&balanced), BTreeMap::from([(1, 6), (2, 6)]));
        // Moving a shard where it already is still makes a new config.
        let same = move_shard(&balanced, 0, balanced.shards[0]).unwrap();
        assert_eq!(
            (same.num, moves(&balanced, &same)),
            (balanced.num + 1, vec![])
        );
    }

    /// Goal: `moves` lists exactly the changed shards, in shard order.
    #[test]
    fn moves_lists_changes_in_shard_order() {
        let from = ShardConfig {
            num: 4,
            shards: vec![1, 1, 2, 2, 3],
            groups: groups([1, 2, 3]),
        };
        let to = ShardConfig {
            num: 5,
            shards: vec![3, 1, 1, 2, 3],
            ..from.clone()
        };
        let expected = vec![
            ShardMove {
                shard: 0,
                from_group: 1,
                to_group: 3,
            },
            ShardMove {
                shard: 2,
                from_group: 2,
                to_group: 1,
            },
        ];
        assert_eq!(moves(&from, &to), expected);
        assert_eq!(moves(&to, &to), vec![]);
    }

    /// Goal: each refused request names its cause and the input is kept.
    /// Goal: a replica group's new membership is written into the next
    /// config with no shard moving; bad member lists are refused.
    #[test]
    fn set_members_replaces_one_groups_members_and_moves_nothing() {
        let two = join(&ShardConfig::initial(12).unwrap(), groups([1, 2])).unwrap();
        let next = set_members(&two, 2, vec![22, 23, 24]).unwrap();
        assert_eq!(next.num, two.num + 1);
        assert_eq!(next.members(2), Some(&[22, 23, 24][..]));
        assert_eq!(next.members(1), two.members(1));
        assert_eq!(next.shards, two.shards);
        assert!(moves(&two, &next).is_empty());
        assert_eq!(
            set_members(&two, 3, vec![1]),
            Err(RebalanceError::UnknownGroup { group: 3 })
        );
        assert_eq!(
            set_members(&two, 2, vec![]),
            Err(RebalanceError::InvalidGroup(ConfigError::NoMembers {
                group: 2
            }))
        );
        assert_eq!(
            set_members(&two, 2, vec![7, 7]),
            Err(RebalanceError::InvalidGroup(ConfigError::DuplicateMember {
                group: 2,
                node: 7
            }))
        );
    }

    #[test]
    fn refusals() {
        let initial = ShardConfig::initial(12).unwrap();
        let two = join(&initial, groups([1, 2])).unwrap();
        let before = two.clone();

        assert_eq!(join(&two, groups([])), Err(RebalanceError::NoGroups));
        assert_eq!(
            join(&two, groups([3, 2])),
            Err(RebalanceError::GroupExists { group: 2 })
        );
        assert_eq!(
            join(&two, BTreeMap::from([(3, vec![])])),
            Err(RebalanceError::InvalidGroup(ConfigError::NoMembers {
                group: 3
            }))
        );
        assert_eq!(
            join(&two, BTreeMap::from([(3, vec![5, 5])])),
            Err(RebalanceError::InvalidGroup(ConfigError::DuplicateMember {
                group: 3,
                node: 5
            }))
        );
        assert_eq!(
            join(&two, groups([0])),
            Err(RebalanceError::InvalidGroup(ConfigError::ReservedGroup))
        );
        assert_eq!(
            join(&initial, groups(1..=GROUPS_MAX as u64 + 1)),
            Err(RebalanceError::InvalidGroup(ConfigError::TooManyGroups {
                groups: GROUPS_MAX + 1
            }))
        );

        assert_eq!(leave(&two, &[]), Err(RebalanceError::NoGroups));
        assert_eq!(
            leave(&two, &[1, 3]),
            Err(RebalanceError::UnknownGroup { group: 3 })
        );
        assert_eq!(
            leave(&two, &[1, 2]),
            Err(RebalanceError::LeaveAll { shards: 12 })
        );
        assert_eq!(
            leave(&initial, &[1]),
            Err(RebalanceError::UnknownGroup { group: 1 })
        );

        assert_eq!(
            move_shard(&two, 12, 1),
            Err(RebalanceError::ShardOutOfRange {
                shard: 12,
                shards: 12
            })
        );
        assert_eq!(
            move_shard(&two, 0, 3),
            Err(RebalanceError::UnknownGroup { group: 3 })
        );
        assert_eq!(
            move_shard(&two, 0, GROUP_UNASSIGNED),
            Err(RebalanceError::UnknownGroup { group: 0 })
        );

        let mut broken = two.clone();
        broken.shards[5] = 9;
        let invalid = Err(RebalanceError::InvalidConfig(ConfigError::UnknownGroup {
            shard: 5,
            group: 9,
        }));
        assert_eq!(join(&broken, groups([3])), invalid);
        assert_eq!(leave(&broken, &[1]), invalid);
        assert_eq!(move_shard(&broken, 0, 1), invalid);
        assert_eq!(rebalance(&broken), invalid);

        assert_eq!(two, before);
    }

    /// Goal: a leave that names a group twice removes it once.
    #[test]
    fn leave_tolerates_repeats() {
        let three = join(&ShardConfig::initial(12).unwrap(), groups([1, 2, 3])).unwrap();
        assert_eq!(leave(&three, &[2, 2]), leave(&three, &[2]));
    }

    /// Goal: rebalancing the initial config (no groups) keeps every shard
    /// unassigned and still advances the number.
    #[test]
    fn rebalance_without_groups() {
        let initial = ShardConfig::initial(12).unwrap();
        let next = rebalance(&initial).unwrap();
        assert_eq!(next.num, 1);
        assert_eq!(next.shards, initial.shards);
    }
}
