//! Spreading leadership over nodes: which group, if any, a node hands to
//! another member, decided by a pure function of what the node sees.
//!
//! Every group elects its leader on its own, so several groups on the same
//! nodes may well all elect one node, which then carries every group's
//! writes and replication alone. Every [`LEADER_BALANCE_EVERY_TICKS`] ticks
//! a node runs [`choose_transfer`] over the groups it hosts (each group's
//! voters and the leader it knows of) and hands at most one group to
//! another member with `RawNode::transfer_leader`.
//!
//! # The rule
//! Let `N` be the nodes in the union of the hosted groups' voters, `G` the
//! hosted groups, and `share = ceil(G / N)`. A node leading more than
//! `share` groups hands one of them to the member that leads the fewest
//! groups (ties: the lowest id) among those leading fewer than `share`
//! and able to take over now (heard from recently, replicating); the group
//! is the lowest-numbered it leads with that member as a voter.
//!
//! # Why it settles and cannot ping-pong
//! A transfer only goes from a node above `share` to one below it, and the
//! receiver ends at most at `share`. So the total excess
//! `sum over nodes of max(0, led - share)` drops by one with every
//! transfer, and a node at or below `share` never gives a group away: when
//! the nodes host the same groups (the same view), leadership settles
//! after at most `G` transfers with nobody above `share`, and then nothing
//! more is proposed (unit-tested exhaustively on small clusters). Two
//! nodes handing a group to the same receiver at once can push it above
//! `share`, but only by less than they shed, so the excess still drops.
//!
//! Nodes hosting different sets of groups judge by different views; the
//! rule still moves a group only from a node above its share, at most one
//! per node per period, but settling is then not guaranteed.

use std::collections::{BTreeMap, BTreeSet};

use shoal_consensus::NodeId;
use shoal_engine::GroupId;

/// Ticks between a node's leadership checks (2 s at the default 50 ms
/// tick): longer than a transfer may take (it gives up after one election
/// timeout, 10 to 20 ticks), so each check sees the previous transfer's
/// outcome.
pub const LEADER_BALANCE_EVERY_TICKS: u64 = 40;

/// A member counts as able to take over leadership if this node heard
/// from it within this many ticks (5 heartbeat intervals at the default
/// ticks): a crashed member is not handed a group it could not lead.
pub const PEER_HEARD_WITHIN_TICKS: u64 = 10;

/// What a node knows about one group it hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLeadership {
    /// The group.
    pub group: GroupId,
    /// Its voters.
    pub voters: Vec<NodeId>,
    /// The leader this node knows of (0: none known).
    pub leader: NodeId,
}

/// A leadership hand-over: this node asks `group` to elect `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderTransfer {
    /// The group this node leads.
    pub group: GroupId,
    /// The member to lead it.
    pub to: NodeId,
}

/// The most groups a node should lead: `ceil(groups / nodes)` over the
/// union of the groups' voters (0 without groups).
pub fn fair_share(groups: &[GroupLeadership]) -> u64 {
    let nodes: BTreeSet<NodeId> = groups
        .iter()
        .flat_map(|g| g.voters.iter().copied())
        .collect();
    if nodes.is_empty() {
        return 0;
    }
    (groups.len() as u64).div_ceil(nodes.len() as u64)
}

/// How many of `groups` each node leads, as far as known.
pub fn led_counts(groups: &[GroupLeadership]) -> BTreeMap<NodeId, u64> {
    let mut led = BTreeMap::new();
    for g in groups.iter().filter(|g| g.leader != 0) {
        *led.entry(g.leader).or_insert(0) += 1;
    }
    led
}

/// The transfer node `me` should start, if any (see the module docs).
/// `can_take_over(group, member)` says whether `member` may be handed
/// `group` now (the caller's liveness and replication check). Pure and
/// deterministic.
pub fn choose_transfer(
    me: NodeId,
    groups: &[GroupLeadership],
    can_take_over: impl Fn(GroupId, NodeId) -> bool,
) -> Option<LeaderTransfer> {
    let share = fair_share(groups);
    let led = led_counts(groups);
    let count = |node: NodeId| led.get(&node).copied().unwrap_or(0);
    if count(me) <= share {
        return None;
    }
    let mut mine: Vec<&GroupLeadership> = groups.iter().filter(|g| g.leader == me).collect();
    mine.sort_by_key(|g| g.group);
    // The receiver: fewest led, then lowest id; then its lowest group.
    let mut best: Option<(u64, NodeId, GroupId)> = None;
    for g in mine {
        for &member in &g.voters {
            if member == me || count(member) >= share || !can_take_over(g.group, member) {
                continue;
            }
            let candidate = (count(member), member, g.group);
            if best.is_none_or(|b| candidate < b) {
                best = Some(candidate);
            }
        }
    }
    best.map(|(_, to, group)| LeaderTransfer { group, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(leaders: &[NodeId], voters: &[NodeId]) -> Vec<GroupLeadership> {
        leaders
            .iter()
            .enumerate()
            .map(|(i, &leader)| GroupLeadership {
                group: i as GroupId + 1,
                voters: voters.to_vec(),
                leader,
            })
            .collect()
    }

    fn anyone(_: GroupId, _: NodeId) -> bool {
        true
    }

    fn excess(groups: &[GroupLeadership]) -> u64 {
        let share = fair_share(groups);
        led_counts(groups)
            .values()
            .map(|&c| c.saturating_sub(share))
            .sum()
    }

    // Goal: the lab-style case, three groups on three nodes all led by
    // node 1, ends with three leaders in two transfers, lowest ids first.
    #[test]
    fn three_groups_on_one_leader_spread_in_two_transfers() {
        let mut groups = view(&[1, 1, 1], &[1, 2, 3]);
        let first = choose_transfer(1, &groups, anyone).unwrap();
        assert_eq!(first, LeaderTransfer { group: 1, to: 2 });
        assert_eq!(choose_transfer(2, &groups, anyone), None);
        groups[0].leader = 2;
        let second = choose_transfer(1, &groups, anyone).unwrap();
        assert_eq!(second, LeaderTransfer { group: 2, to: 3 });
        groups[1].leader = 3;
        for me in 1..=3 {
            assert_eq!(choose_transfer(me, &groups, anyone), None);
        }
    }

    // Goal: no ping-pong. For every assignment of leaders (unknown
    // included) of up to 6 groups over up to 4 nodes hosting them all:
    // a balanced assignment proposes nothing; otherwise applying every
    // node's proposal in turn lowers the total excess with each transfer
    // and settles within G transfers with nobody above its share.
    #[test]
    fn every_assignment_settles_and_balanced_ones_stay() {
        for nodes in 1..=4u64 {
            let voters: Vec<NodeId> = (1..=nodes).collect();
            let max_groups = if nodes <= 3 { 6 } else { 5 };
            for g in 0..=max_groups {
                let options = nodes + 1;
                for code in 0..options.pow(g as u32) {
                    let mut leaders = Vec::new();
                    let mut c = code;
                    for _ in 0..g {
                        leaders.push(c % options);
                        c /= options;
                    }
                    let mut groups = view(&leaders, &voters);
                    let share = fair_share(&groups);
                    let balanced = led_counts(&groups).values().all(|&c| c <= share);
                    let mut transfers = 0;
                    loop {
                        let mut moved = false;
                        for me in 1..=nodes {
                            let Some(t) = choose_transfer(me, &groups, anyone) else {
                                continue;
                            };
                            assert!(!balanced, "{leaders:?}: balanced, yet {me} proposes {t:?}");
                            let g = groups.iter_mut().find(|x| x.group == t.group).unwrap();
                            assert_eq!(g.leader, me);
                            assert!(g.voters.contains(&t.to) && t.to != me);
                            let before = excess(&groups);
                            groups
                                .iter_mut()
                                .find(|x| x.group == t.group)
                                .unwrap()
                                .leader = t.to;
                            assert!(excess(&groups) < before, "{leaders:?}: {t:?}");
                            transfers += 1;
                            moved = true;
                        }
                        if !moved {
                            break;
                        }
                    }
                    assert!(transfers <= g, "{leaders:?}: {transfers} transfers");
                    assert!(
                        led_counts(&groups).values().all(|&c| c <= share),
                        "{leaders:?} settled unbalanced: {groups:?}"
                    );
                }
            }
        }
    }

    // Goal: a member that cannot take over (down, behind) is not chosen,
    // and with no other candidate nothing is proposed.
    #[test]
    fn only_members_able_to_take_over_are_chosen() {
        let groups = view(&[1, 1, 1], &[1, 2, 3]);
        let t = choose_transfer(1, &groups, |_, m| m != 2).unwrap();
        assert_eq!(t, LeaderTransfer { group: 1, to: 3 });
        assert_eq!(choose_transfer(1, &groups, |_, _| false), None);
    }

    // Goal: the receiver is always a voter of the group handed over, and
    // a group of one (an embedded database) is never handed anywhere.
    #[test]
    fn receivers_are_voters_of_the_group() {
        let groups = vec![
            GroupLeadership {
                group: 5,
                voters: vec![1, 2],
                leader: 1,
            },
            GroupLeadership {
                group: 6,
                voters: vec![1, 3],
                leader: 1,
            },
            GroupLeadership {
                group: 7,
                voters: vec![1, 3],
                leader: 1,
            },
        ];
        // share = ceil(3 / 3) = 1; nodes 2 and 3 lead nothing: node 2,
        // the lowest, gets the one group it is a voter of.
        assert_eq!(
            choose_transfer(1, &groups, anyone),
            Some(LeaderTransfer { group: 5, to: 2 })
        );
        let alone = vec![
            GroupLeadership {
                group: 1,
                voters: vec![1],
                leader: 1,
            };
            1
        ];
        assert_eq!(choose_transfer(1, &alone, anyone), None);
        // Unknown leaders count for nobody.
        let groups = view(&[0, 0, 1], &[1, 2, 3]);
        assert_eq!(choose_transfer(1, &groups, anyone), None);
    }
}
