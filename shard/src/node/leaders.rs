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
//! A node leading `c` of the groups it hosts hands one of them to a member
//! (a voter of that group, able to take over now: heard from recently,
//! replicating) that leads at most `c - 2`: the one leading the fewest
//! (ties: the lowest id), and its lowest-numbered group that member votes
//! in. So leadership ends even — every two nodes' counts within one of
//! each other — wherever a group lets it move: three groups on three
//! nodes end with three leaders, and with the controller group beside
//! them (four groups) 2/1/1.
//!
//! # Why it settles and cannot ping-pong
//! A transfer from a node leading `c` to one leading `d <= c - 2` changes
//! the sum of squares of the counts by `2(d - c) + 2 <= -2`; two nodes
//! handing a group to the same receiver at once lower it too (by at least
//! 2). The sum is a non-negative integer, so transfers stop, and a node
//! never hands a group to one that would end up leading more than it does,
//! so nothing is handed back (unit-tested exhaustively on small clusters).
//!
//! Nodes hosting different sets of groups judge by different views; the
//! rule still only moves a group to a node that, as far as the sender
//! knows, leads at least two fewer, at most one per node per period.
//!
//! # Handing off at shutdown
//! A node asked to stop first hands every group it leads to another voter
//! ([`handoff_target`]), so a rolling restart costs no election timeout:
//! the new leader campaigns at once on the old one's `TimeoutNow`.

use std::collections::BTreeMap;

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

/// Ticks a stopping node spends handing off its groups' leadership before
/// it stops anyway (2 s at the default 50 ms tick: two transfers, each
/// given up by the core after one election timeout, 10 to 20 ticks).
pub const SHUTDOWN_HANDOFF_TICKS_MAX: u64 = 40;

/// The voter a stopping leader hands a group to: among the voters other
/// than `me` that can take over (`match_of` gives the highest log index a
/// voter is known to hold, None for one that cannot take over now: not
/// heard from recently, or not replicating), the one with the longest log,
/// so the transfer waits least for it to catch up; ties go to the lowest
/// id. None if no voter can.
pub fn handoff_target(
    me: NodeId,
    voters: &[NodeId],
    match_of: impl Fn(NodeId) -> Option<u64>,
) -> Option<NodeId> {
    voters
        .iter()
        .filter(|&&v| v != me)
        .filter_map(|&v| match_of(v).map(|m| (m, v)))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, v)| v)
}

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
    let led = led_counts(groups);
    let count = |node: NodeId| led.get(&node).copied().unwrap_or(0);
    let mine_led = count(me);
    if mine_led < 2 {
        return None;
    }
    let mut mine: Vec<&GroupLeadership> = groups.iter().filter(|g| g.leader == me).collect();
    mine.sort_by_key(|g| g.group);
    // The receiver: fewest led, then lowest id; then its lowest group.
    let mut best: Option<(u64, NodeId, GroupId)> = None;
    for g in mine {
        for &member in &g.voters {
            if member == me || count(member) + 2 > mine_led || !can_take_over(g.group, member) {
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

    #[test]
    fn handoff_goes_to_the_longest_log_that_can_take_over() {
        let matches = |m: &'static [(NodeId, Option<u64>)]| {
            move |v: NodeId| m.iter().find(|(id, _)| *id == v).and_then(|(_, m)| *m)
        };
        let m = matches(&[(2, Some(7)), (3, Some(9)), (4, None)]);
        assert_eq!(handoff_target(1, &[1, 2, 3, 4], m), Some(3));
        let tie = matches(&[(2, Some(9)), (3, Some(9))]);
        assert_eq!(handoff_target(1, &[1, 3, 2], tie), Some(2));
        let dead = matches(&[(2, None), (3, None)]);
        assert_eq!(handoff_target(1, &[1, 2, 3], dead), None);
        assert_eq!(handoff_target(1, &[1], matches(&[])), None);
        // Never itself, even if it has the longest log.
        let me = matches(&[(1, Some(99)), (2, Some(1))]);
        assert_eq!(handoff_target(1, &[1, 2], me), Some(2));
    }

    /// The sum of squares of the counts: every transfer lowers it.
    fn potential(groups: &[GroupLeadership]) -> u64 {
        led_counts(groups).values().map(|&c| c * c).sum()
    }

    /// Every two voters' counts within one of each other.
    fn even(groups: &[GroupLeadership], voters: &[NodeId]) -> bool {
        let led = led_counts(groups);
        let counts: Vec<u64> = voters
            .iter()
            .map(|v| led.get(v).copied().unwrap_or(0))
            .collect();
        counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0) <= 1
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
    // an even assignment proposes nothing; otherwise applying every
    // node's proposal in turn lowers the sum of squared counts with each
    // transfer and settles, within G * G transfers, even.
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
                    let balanced = even(&groups, &voters);
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
                            let before = potential(&groups);
                            groups
                                .iter_mut()
                                .find(|x| x.group == t.group)
                                .unwrap()
                                .leader = t.to;
                            assert!(potential(&groups) < before, "{leaders:?}: {t:?}");
                            transfers += 1;
                            moved = true;
                        }
                        if !moved {
                            break;
                        }
                    }
                    assert!(transfers <= g * g, "{leaders:?}: {transfers} transfers");
                    assert!(
                        even(&groups, &voters),
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
        // Node 1 leads 3, nodes 2 and 3 nothing: node 2, the lowest, gets
        // the one group it is a voter of.
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
