//! Groups hosted and dropped at runtime: the pure checks behind the admin
//! requests `HostGroup` and `DropGroup`, and where a dropped group's files
//! are.
//!
//! # Persistence and crash ordering
//! A node hosts the groups of its configuration ([`super::NodeConfig::groups`])
//! plus those recorded in the engine ([`shoal_engine::Engine::hosted_groups`]),
//! which [`super::Node::start`] opens again. Each change is ONE synced engine
//! write, made before the loop changes and before the caller is answered:
//! - hosting writes the hosted record with the group's membership
//!   (`Engine::host_group`), then the group is opened and joins the loop:
//!   a crash before the write leaves nothing, after it a restart opens the
//!   group;
//! - dropping first takes the group out of the loop (so no later round can
//!   write its raft state back), then deletes its log, raft state, data and
//!   hosted record and writes a tombstone in one write
//!   (`Engine::drop_group`): a crash before the write leaves the group
//!   hosted whole (a restart opens it), after it leaves nothing. Its
//!   snapshot and move files go afterwards, off the loop; if a crash
//!   comes first, the next start removes them ([`remove_unhosted_dirs`]).
//!
//! A dropped group is never hosted again by the same node (the tombstone):
//! its replica's vote and log are gone, and rejoining the group with an
//! empty state could let it vote twice in one term.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use shoal_consensus::config::VOTERS_MAX;
use shoal_consensus::{Index, NodeId};
use shoal_engine::{GroupId, ShardId, ShardRecord, ShardStatus};

use crate::protocol::GroupRefusal;

/// Most groups one node hosts, static and runtime ones together: the most
/// a shard config names (`controller::GROUPS_MAX`). Every hosted group is
/// ticked by the node's one loop every tick.
pub const GROUPS_PER_NODE_MAX: usize = crate::controller::GROUPS_MAX;

/// Most shards a [`GroupRefusal::HoldsShards`] lists (it counts them all).
pub const REFUSAL_SHARDS_LISTED_MAX: usize = 8;

/// What a valid `HostGroup` asks of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDecision {
    /// The node hosts the group with these voters already: nothing to do.
    AlreadyHosted,
    /// Host it with these voters (sorted).
    Host {
        /// The voters, sorted.
        voters: Vec<NodeId>,
    },
    /// Host it with no membership (no voters named): the node joins the
    /// group once its leader adds it as a learner.
    Join,
}

/// Checks a `HostGroup { group, voters }` on node `me`, which hosts
/// `hosted` groups, with `current` the voters it hosts `group` with (if it
/// does). What only the engine knows (a tombstone, a stored membership) is
/// checked when the group is written.
pub fn check_host(
    me: NodeId,
    group: GroupId,
    voters: &[NodeId],
    current: Option<&[NodeId]>,
    hosted: usize,
) -> Result<HostDecision, GroupRefusal> {
    if group == 0 {
        return Err(GroupRefusal::ReservedGroup);
    }
    if voters.is_empty() {
        if current.is_some() {
            return Ok(HostDecision::AlreadyHosted);
        }
        if hosted >= GROUPS_PER_NODE_MAX {
            return Err(GroupRefusal::TooManyGroups {
                max: GROUPS_PER_NODE_MAX as u64,
            });
        }
        return Ok(HostDecision::Join);
    }
    let voters = check_voters(me, voters)?;
    if let Some(current) = current {
        let mut current = current.to_vec();
        current.sort_unstable();
        return if current == voters {
            Ok(HostDecision::AlreadyHosted)
        } else {
            Err(GroupRefusal::OtherVoters { voters: current })
        };
    }
    if hosted >= GROUPS_PER_NODE_MAX {
        return Err(GroupRefusal::TooManyGroups {
            max: GROUPS_PER_NODE_MAX as u64,
        });
    }
    Ok(HostDecision::Host { voters })
}

/// Checks a voter list for node `me`: 1 to [`VOTERS_MAX`] distinct non-zero
/// ids including `me`. Returns it sorted.
pub fn check_voters(me: NodeId, voters: &[NodeId]) -> Result<Vec<NodeId>, GroupRefusal> {
    if voters.is_empty() {
        return Err(GroupRefusal::NoVoters);
    }
    if voters.len() > VOTERS_MAX {
        return Err(GroupRefusal::TooManyVoters {
            count: voters.len() as u64,
            max: VOTERS_MAX as u64,
        });
    }
    let mut sorted = voters.to_vec();
    sorted.sort_unstable();
    if sorted[0] == 0 {
        return Err(GroupRefusal::ZeroVoter);
    }
    if let Some(pair) = sorted.windows(2).find(|p| p[0] == p[1]) {
        return Err(GroupRefusal::DuplicateVoter { node: pair[0] });
    }
    if !sorted.contains(&me) {
        return Err(GroupRefusal::NotAVoter { node: me });
    }
    Ok(sorted)
}

/// Checks a `DropGroup` of a group this node hosts at runtime: it must
/// hold no shard here (no static shards, every record `Absent`) as of an
/// applied index that has reached the last index of its log.
///
/// Why the last index and not the commit index: a replica may hold an
/// entry that is committed before it learns so. Every committed entry is
/// in the logs of a majority, and none of them passes this check before
/// applying it; so even a drop sent to a group that still serves a shard
/// (a controller's mistake) can delete a minority of its replicas at
/// most, never the shard's last majority.
pub fn check_drop(
    static_shards: &[ShardId],
    records: &BTreeMap<ShardId, ShardRecord>,
    applied: Index,
    last: Index,
) -> Result<(), GroupRefusal> {
    let held: Vec<ShardId> = static_shards
        .iter()
        .copied()
        .chain(
            records
                .iter()
                .filter(|(_, r)| r.status != ShardStatus::Absent)
                .map(|(s, _)| *s),
        )
        .collect();
    if !held.is_empty() {
        return Err(GroupRefusal::HoldsShards {
            held: held.len() as u64,
            shards: held.into_iter().take(REFUSAL_SHARDS_LISTED_MAX).collect(),
        });
    }
    if applied < last {
        return Err(GroupRefusal::CatchingUp { applied, last });
    }
    Ok(())
}

/// Checks a drop of a replica whose node a membership change removed from
/// the group (the caller saw the group's leader apply the removal): the
/// members hold everything, so the replica may go even while it holds
/// shards, but never while this node leads the group (a leader is a
/// member: the removal is not in force here, and the caller is wrong).
pub fn check_drop_removed(leads: bool) -> Result<(), GroupRefusal> {
    if leads {
        return Err(GroupRefusal::Leads);
    }
    Ok(())
}

/// How the names of a group's directories under the snapshot directory
/// start, before the group id: exports, received snapshots, shard moves.
const GROUP_DIR_KINDS: [&str; 4] = ["export-g", "recv-g", "move-in-g", "move-out-g"];

/// The group a directory under the snapshot directory belongs to, from its
/// name (`export-g<group>-...` and the like); `None` for other names.
pub fn dir_group(name: &str) -> Option<GroupId> {
    let rest = GROUP_DIR_KINDS
        .iter()
        .find_map(|kind| name.strip_prefix(kind))?;
    let (group, _) = rest.split_once('-')?;
    group.parse().ok()
}

/// Removes every directory of `group` under `root` (blocking; best effort).
pub fn remove_group_dirs(root: &Path, group: GroupId) {
    remove_dirs_where(root, |g| g == group);
}

/// Removes the directories under `root` of every group not in `hosted`
/// (blocking; best effort): what a drop left when a crash came before its
/// files were removed. Files for a group not hosted are never used (a
/// shipped shard's files for such a group are refused on arrival).
pub fn remove_unhosted_dirs(root: &Path, hosted: &BTreeSet<GroupId>) {
    remove_dirs_where(root, |g| !hosted.contains(&g));
}

fn remove_dirs_where(root: &Path, remove: impl Fn(GroupId) -> bool) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dir_group(&name).is_some_and(&remove) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: every malformed voter list is refused with its own reason,
    // before anything else is looked at.
    #[test]
    fn bad_voters_are_refused_with_their_reason() {
        use GroupRefusal::*;
        let many: Vec<NodeId> = (1..=VOTERS_MAX as u64 + 1).collect();
        for (group, voters, refusal) in [
            (0, vec![1, 2, 3], ReservedGroup),
            (
                5,
                many,
                TooManyVoters {
                    count: VOTERS_MAX as u64 + 1,
                    max: VOTERS_MAX as u64,
                },
            ),
            (5, vec![1, 0, 2], ZeroVoter),
            (5, vec![1, 2, 2], DuplicateVoter { node: 2 }),
            (5, vec![2, 3, 4], NotAVoter { node: 1 }),
        ] {
            assert_eq!(
                check_host(1, group, &voters, None, 0),
                Err(refusal),
                "{group} {voters:?}"
            );
        }
    }

    // Goal: hosting is idempotent for the same voters in any order and
    // refused for other voters; the per-node limit holds.
    #[test]
    fn hosting_again_is_done_or_refused() {
        assert_eq!(
            check_host(1, 5, &[3, 1, 2], None, 0),
            Ok(HostDecision::Host {
                voters: vec![1, 2, 3]
            })
        );
        assert_eq!(
            check_host(1, 5, &[3, 1, 2], Some(&[2, 3, 1]), 1),
            Ok(HostDecision::AlreadyHosted)
        );
        assert_eq!(
            check_host(1, 5, &[1, 2], Some(&[1, 2, 3]), 1),
            Err(GroupRefusal::OtherVoters {
                voters: vec![1, 2, 3]
            })
        );
        assert_eq!(
            check_host(1, 5, &[1], None, GROUPS_PER_NODE_MAX),
            Err(GroupRefusal::TooManyGroups {
                max: GROUPS_PER_NODE_MAX as u64
            })
        );
        // Already hosted wins over the limit (a retry of a done request).
        assert_eq!(
            check_host(1, 5, &[1], Some(&[1]), GROUPS_PER_NODE_MAX),
            Ok(HostDecision::AlreadyHosted)
        );
        // No voters: join; done if hosted already; the limit holds.
        assert_eq!(check_host(1, 5, &[], None, 0), Ok(HostDecision::Join));
        assert_eq!(
            check_host(1, 5, &[], Some(&[1, 2]), 1),
            Ok(HostDecision::AlreadyHosted)
        );
        assert_eq!(
            check_host(1, 5, &[], None, GROUPS_PER_NODE_MAX),
            Err(GroupRefusal::TooManyGroups {
                max: GROUPS_PER_NODE_MAX as u64
            })
        );
    }

    // Goal: a group is dropped only once it holds nothing here and its
    // replica has applied its whole log.
    #[test]
    fn drop_needs_an_empty_caught_up_group() {
        let rec = |num, status| ShardRecord { num, status };
        let empty = BTreeMap::from([(1, rec(2, ShardStatus::Absent))]);
        assert_eq!(check_drop_removed(false), Ok(()));
        assert_eq!(check_drop_removed(true), Err(GroupRefusal::Leads));
        assert_eq!(check_drop(&[], &empty, 9, 9), Ok(()));
        assert_eq!(check_drop(&[], &BTreeMap::new(), 0, 0), Ok(()));
        for status in [ShardStatus::Serving, ShardStatus::Frozen] {
            let held = BTreeMap::from([(1, rec(2, ShardStatus::Absent)), (4, rec(2, status))]);
            assert_eq!(
                check_drop(&[], &held, 9, 9),
                Err(GroupRefusal::HoldsShards {
                    held: 1,
                    shards: vec![4]
                })
            );
        }
        assert!(matches!(
            check_drop(&[0], &empty, 9, 9),
            Err(GroupRefusal::HoldsShards { held: 1, .. })
        ));
        let many: BTreeMap<ShardId, ShardRecord> =
            (0..20).map(|s| (s, rec(1, ShardStatus::Serving))).collect();
        assert_eq!(
            check_drop(&[], &many, 9, 9),
            Err(GroupRefusal::HoldsShards {
                held: 20,
                shards: (0..REFUSAL_SHARDS_LISTED_MAX as ShardId).collect()
            })
        );
        assert_eq!(
            check_drop(&[], &empty, 8, 9),
            Err(GroupRefusal::CatchingUp {
                applied: 8,
                last: 9
            })
        );
    }

    // Goal: a group's directories are told apart from those of groups
    // whose id starts with the same digits.
    #[test]
    fn group_dirs_are_removed_and_only_those() {
        let root = tempfile::tempdir().unwrap();
        for name in [
            "export-g1-i5",
            "export-g1-tmp",
            "recv-g1-i4-n2",
            "move-in-g1-s3-n2",
            "move-out-g1-s3-n2",
            "export-g12-i5",
            "move-in-g12-s3-n2",
        ] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        std::fs::create_dir(root.path().join("unrelated")).unwrap();
        let left = || {
            let mut left: Vec<String> = std::fs::read_dir(root.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            left
        };
        remove_group_dirs(root.path(), 1);
        assert_eq!(
            left(),
            vec!["export-g12-i5", "move-in-g12-s3-n2", "unrelated"]
        );
        remove_unhosted_dirs(root.path(), &BTreeSet::from([12]));
        assert_eq!(
            left(),
            vec!["export-g12-i5", "move-in-g12-s3-n2", "unrelated"]
        );
        remove_unhosted_dirs(root.path(), &BTreeSet::from([1]));
        assert_eq!(left(), vec!["unrelated"]);
        assert_eq!(dir_group("export-g7-tmp"), Some(7));
        assert_eq!(dir_group("recv-g7-i4-n2"), Some(7));
        assert_eq!(dir_group("export-g-i4"), None);
        assert_eq!(dir_group("move-in-g7"), None);
    }
}
