//! Rule-by-rule tests of the core, each named after the sentence of the
//! Raft paper (or of the issue) it checks, in the spirit of etcd's
//! `raft_paper_test.go`. A tiny in-test network moves messages by hand so
//! every step is visible.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use bytes::Bytes;
use shoal_consensus::{
    Config, ConfigError, Entry, Error, HardState, Index, MemStorage, Message, MessageBody,
    ProgressState, RaftState, RawNode, Ready, Role, Snapshot, Storage, StorageError, Term, NO_NODE,
};

fn config(id: u64, n: u64) -> Config {
    Config::new(id, (1..=n).collect())
}

/// A hand-driven network of nodes.
struct Net {
    nodes: BTreeMap<u64, RawNode<MemStorage>>,
    cut: BTreeSet<u64>,
}

impl Net {
    fn new(n: u64, tweak: impl Fn(&mut Config)) -> Net {
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let mut cfg = config(id, n);
            tweak(&mut cfg);
            nodes.insert(id, RawNode::new(cfg, MemStorage::new()).unwrap());
        }
        Net {
            nodes,
            cut: BTreeSet::new(),
        }
    }

    fn node(&mut self, id: u64) -> &mut RawNode<MemStorage> {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Handles every node's Readies; returns the messages they send.
    fn drain(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        for node in self.nodes.values_mut() {
            while node.has_ready() {
                let rd = node.ready().unwrap();
                node.storage_mut().persist_ready(&rd).unwrap();
                out.extend(rd.messages.iter().cloned());
                out.extend(rd.persisted_messages.iter().cloned());
                node.advance(rd).unwrap();
            }
        }
        out
    }

    fn deliver_all(&mut self) {
        for _ in 0..1000 {
            let msgs = self.drain();
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if self.cut.contains(&m.from) || self.cut.contains(&m.to) {
                    continue;
                }
                self.node(m.to).step(m).unwrap();
            }
        }
        panic!("network did not quiesce");
    }

    /// Ticks node `id` until it campaigns, then lets the election finish.
    fn elect(&mut self, id: u64) {
        for _ in 0..100 {
            if self.node(id).role() != Role::Follower {
                break;
            }
            self.node(id).tick().unwrap();
        }
        self.deliver_all();
        assert_eq!(
            self.node(id).role(),
            Role::Leader,
            "node {id} failed to win"
        );
    }
}

fn single(tweak: impl Fn(&mut Config)) -> RawNode<MemStorage> {
    let mut cfg = config(1, 3);
    tweak(&mut cfg);
    RawNode::new(cfg, MemStorage::new()).unwrap()
}

fn take_ready(node: &mut RawNode<MemStorage>) -> Ready {
    let rd = node.ready().unwrap();
    node.storage_mut().persist_ready(&rd).unwrap();
    rd
}

fn msg(from: u64, to: u64, term: Term, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

fn entry(index: Index, term: Term) -> Entry {
    Entry {
        index,
        term,
        data: Bytes::from(format!("{index}/{term}")),
        ..Entry::default()
    }
}

/// Storage with a preset log, to build followers with particular logs.
fn storage_with(entries: &[Entry], hs: HardState) -> MemStorage {
    let mut s = MemStorage::new();
    s.append(entries).unwrap();
    s.set_hard_state(hs);
    s
}

// §5.1 "Servers start up as followers."
#[test]
fn servers_start_as_followers() {
    let n = single(|_| {});
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.term(), 0);
    assert_eq!(n.leader_id(), NO_NODE);
}

// §5.1 "If one server's current term is smaller than the other's, then it
// updates its current term to the larger value. If a candidate or leader
// discovers that its term is out of date, it immediately reverts to
// follower state."
#[test]
fn leader_and_candidate_revert_to_follower_on_higher_term() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    let term = net.node(1).term();
    net.node(1)
        .step(msg(
            2,
            1,
            term + 5,
            MessageBody::AppendResponse {
                reject: false,
                index: 0,
                hint_index: 0,
                hint_term: 0,
            },
        ))
        .unwrap();
    assert_eq!(net.node(1).role(), Role::Follower);
    assert_eq!(net.node(1).term(), term + 5);
}

// §5.1 "If a server receives a request with a stale term number, it rejects
// the request." With check-quorum the stale leader is told the new term.
#[test]
fn stale_term_requests_are_rejected() {
    let mut n = single(|_| {});
    n.step(msg(
        2,
        1,
        5,
        MessageBody::Heartbeat {
            commit: 0,
            context: None,
        },
    ))
    .unwrap();
    let _ = take_ready(&mut n);
    n.advance(Ready::default()).ok();
    let mut n = single(|_| {});
    n.step(msg(
        2,
        1,
        5,
        MessageBody::Heartbeat {
            commit: 0,
            context: None,
        },
    ))
    .unwrap();
    let rd = take_ready(&mut n);
    n.advance(rd).unwrap();
    n.step(msg(
        3,
        1,
        2,
        MessageBody::Append {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![entry(1, 2)],
            commit: 0,
        },
    ))
    .unwrap();
    let rd = take_ready(&mut n);
    assert!(rd.entries.is_empty(), "stale append must not be accepted");
    let reply = rd
        .persisted_messages
        .iter()
        .find(|m| m.to == 3)
        .expect("stale leader gets an answer");
    assert_eq!(reply.term, 5);
}

// §5.2 "Leaders send periodic heartbeats ... to all followers" — at most
// 10 per second at the default tick length (lab rule).
#[test]
fn leader_heartbeats_at_most_ten_per_second() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.drain();
    let ticks_per_second = 1000 / shoal_consensus::config::DEFAULT_TICK_MS;
    let mut heartbeats = 0;
    for _ in 0..ticks_per_second {
        net.node(1).tick().unwrap();
        for m in net.drain() {
            if matches!(m.body, MessageBody::Heartbeat { .. }) && m.to == 2 {
                heartbeats += 1;
            }
        }
    }
    assert!(
        (1..=10).contains(&heartbeats),
        "{heartbeats} heartbeats per second"
    );
}

// §5.2 "If a follower receives no communication over a period of time
// called the election timeout, then it ... begins an election": it
// increments its term, votes for itself and requests votes — and (the
// persistence contract) the requests leave only after term and vote are
// persisted.
#[test]
fn follower_times_out_and_campaigns_after_persisting_vote() {
    let mut n = single(|c| c.pre_vote = false);
    for _ in 0..2 * n_election_tick() {
        n.tick().unwrap();
    }
    assert_eq!(n.role(), Role::Candidate);
    assert_eq!(n.term(), 1);
    assert_eq!(n.vote(), 1);
    let rd = take_ready(&mut n);
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 1,
            vote: 1,
            commit: 0
        })
    );
    assert!(
        rd.messages.is_empty(),
        "vote requests must wait for persistence"
    );
    let to: BTreeSet<u64> = rd
        .persisted_messages
        .iter()
        .filter(|m| {
            matches!(
                m.body,
                MessageBody::RequestVote {
                    pre_vote: false,
                    ..
                }
            )
        })
        .map(|m| m.to)
        .collect();
    assert_eq!(to, BTreeSet::from([2, 3]));
}

fn n_election_tick() -> u32 {
    Config::new(1, vec![1]).election_tick
}

// §9.6 pre-vote: "a candidate first asks ... whether its log is up-to-date
// enough"; the term does not change until a majority would vote.
#[test]
fn pre_vote_does_not_change_term_while_partitioned() {
    let mut n = single(|_| {});
    for _ in 0..20 * n_election_tick() {
        n.tick().unwrap();
        let rd = take_ready(&mut n);
        n.advance(rd).unwrap();
    }
    assert_eq!(
        n.term(),
        0,
        "a partitioned pre-candidate must not inflate its term"
    );
    assert_eq!(n.role(), Role::PreCandidate);
}

// §5.2 "Each server will vote for at most one candidate in a given term,
// on a first-come-first-served basis."
#[test]
fn at_most_one_vote_per_term() {
    let mut n = single(|c| c.pre_vote = false);
    let req = |from| {
        msg(
            from,
            1,
            1,
            MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: 0,
                last_log_term: 0,
                force: false,
            },
        )
    };
    n.step(req(2)).unwrap();
    n.step(req(3)).unwrap();
    let rd = take_ready(&mut n);
    let grants: Vec<(u64, bool)> = rd
        .persisted_messages
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::RequestVoteResponse { granted, .. } => Some((m.to, granted)),
            _ => None,
        })
        .collect();
    assert_eq!(grants, vec![(2, true), (3, false)]);
    assert_eq!(rd.hard_state.unwrap().vote, 2);
}

// §5.4.1 "the voter denies its vote if its own log is more up-to-date than
// that of the candidate."
#[test]
fn election_restriction() {
    let s = storage_with(
        &[entry(1, 1), entry(2, 2)],
        HardState {
            term: 2,
            vote: 0,
            commit: 0,
        },
    );
    let mut n = RawNode::new(config(1, 3), s).unwrap();
    let cases = [(3, 1, false), (1, 2, false), (2, 2, true), (1, 3, true)];
    for (i, (last_index, last_term, want)) in cases.into_iter().enumerate() {
        let from = 2 + (i as u64 % 2);
        let mut n2 = RawNode::new(config(1, 3), n.storage().clone()).unwrap();
        n2.step(msg(
            from,
            1,
            3,
            MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: last_index,
                last_log_term: last_term,
                force: false,
            },
        ))
        .unwrap();
        let rd = take_ready(&mut n2);
        let granted = rd.persisted_messages.iter().any(|m| {
            matches!(
                m.body,
                MessageBody::RequestVoteResponse { granted: true, .. }
            )
        });
        assert_eq!(granted, want, "candidate log ({last_index}, {last_term})");
    }
    let _ = take_ready(&mut n);
}

// §5.2 "A candidate wins an election if it receives votes from a majority";
// §8 a new leader appends a no-op entry of its term.
#[test]
fn candidate_wins_with_majority_and_appends_noop() {
    let mut net = Net::new(5, |_| {});
    net.cut.insert(4);
    net.cut.insert(5);
    net.elect(1);
    let n = net.node(1);
    assert_eq!(n.last_index().unwrap(), 1);
    assert_eq!(n.term_at(1).unwrap(), n.term());
    assert_eq!(n.commit_index(), 1, "the no-op commits with a majority");
}

// §5.2 "If the AppendEntries RPC is from a leader whose term is at least as
// large as the candidate's current term, the candidate ... returns to
// follower state."
#[test]
fn candidate_steps_down_on_append_of_same_term() {
    let mut n = single(|c| c.pre_vote = false);
    for _ in 0..2 * n_election_tick() {
        n.tick().unwrap();
    }
    assert_eq!(n.role(), Role::Candidate);
    let term = n.term();
    n.step(msg(
        2,
        1,
        term,
        MessageBody::Heartbeat {
            commit: 0,
            context: None,
        },
    ))
    .unwrap();
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.leader_id(), 2);
}

// §5.3 "If a follower's log is inconsistent with the leader's, the
// AppendEntries consistency check will fail": the follower rejects with a
// hint (the lab's fast back-up), and replies only after persisting.
#[test]
fn follower_rejects_mismatch_with_conflict_hint() {
    let s = storage_with(
        &[
            entry(1, 1),
            entry(2, 2),
            entry(3, 2),
            entry(4, 2),
            entry(5, 2),
        ],
        HardState {
            term: 2,
            vote: 0,
            commit: 1,
        },
    );
    let mut n = RawNode::new(config(1, 3), s).unwrap();
    n.step(msg(
        2,
        1,
        4,
        MessageBody::Append {
            prev_log_index: 6,
            prev_log_term: 3,
            entries: vec![],
            commit: 1,
        },
    ))
    .unwrap();
    let rd = take_ready(&mut n);
    assert!(rd.messages.is_empty());
    let reply = &rd.persisted_messages[0];
    // Nothing at 6; the last index whose term is <= 3 is 5 (term 2).
    assert_eq!(
        reply.body,
        MessageBody::AppendResponse {
            reject: true,
            index: 6,
            hint_index: 5,
            hint_term: 2
        }
    );
}

// Figure 2 "If an existing entry conflicts with a new one (same index but
// different terms), delete the existing entry and all that follow it."
#[test]
fn follower_truncates_conflicting_suffix() {
    let s = storage_with(
        &[entry(1, 1), entry(2, 1), entry(3, 1)],
        HardState {
            term: 1,
            vote: 0,
            commit: 1,
        },
    );
    let mut n = RawNode::new(config(1, 3), s).unwrap();
    n.step(msg(
        2,
        1,
        2,
        MessageBody::Append {
            prev_log_index: 1,
            prev_log_term: 1,
            entries: vec![entry(2, 2)],
            commit: 2,
        },
    ))
    .unwrap();
    let rd = take_ready(&mut n);
    assert_eq!(rd.entries, vec![entry(2, 2)]);
    assert_eq!(rd.hard_state.unwrap().commit, 2);
    n.advance(rd).unwrap();
    assert_eq!(n.storage().last_index().unwrap(), 2);
    assert_eq!(n.storage().term(2).unwrap(), 2);
}

// §5.4.2 / Figure 8: "Raft never commits log entries from previous terms by
// counting replicas. Only log entries from the leader's current term are
// committed by counting replicas."
#[test]
fn leader_commits_only_current_term_entries_by_counting() {
    // Node 1 has an entry of term 2 at index 2 that nobody else has.
    let s = storage_with(
        &[entry(1, 1), entry(2, 2)],
        HardState {
            term: 3,
            vote: 0,
            commit: 1,
        },
    );
    let mut cfg = config(1, 3);
    cfg.pre_vote = false;
    let mut leader = RawNode::new(cfg, s).unwrap();
    for _ in 0..2 * n_election_tick() {
        leader.tick().unwrap();
    }
    let rd = take_ready(&mut leader);
    leader.advance(rd).unwrap();
    let term = leader.term();
    leader
        .step(msg(
            2,
            1,
            term,
            MessageBody::RequestVoteResponse {
                pre_vote: false,
                granted: true,
            },
        ))
        .unwrap();
    assert!(leader.is_leader());
    // Persist the no-op (index 3) but let follower 2 ack only index 2.
    let rd = take_ready(&mut leader);
    leader.advance(rd).unwrap();
    leader
        .step(msg(
            2,
            1,
            term,
            MessageBody::AppendResponse {
                reject: false,
                index: 2,
                hint_index: 0,
                hint_term: 0,
            },
        ))
        .unwrap();
    assert_eq!(
        leader.commit_index(),
        1,
        "index 2 (term 2) must not commit by counting"
    );
    leader
        .step(msg(
            2,
            1,
            term,
            MessageBody::AppendResponse {
                reject: false,
                index: 3,
                hint_index: 0,
                hint_term: 0,
            },
        ))
        .unwrap();
    assert_eq!(
        leader.commit_index(),
        3,
        "the current-term entry commits, and 2 with it"
    );
}

// Persistence contract: a leader counts itself only once its entries are
// persisted (advance), so a single-node group commits after advance.
#[test]
fn leader_counts_itself_only_after_persisting() {
    let mut n = RawNode::new(Config::new(1, vec![1]), MemStorage::new()).unwrap();
    while !n.is_leader() {
        n.tick().unwrap();
    }
    let rd = n.ready().unwrap();
    assert_eq!(rd.entries.len(), 1, "the no-op");
    assert_eq!(n.commit_index(), 0);
    n.storage_mut().persist_ready(&rd).unwrap();
    n.advance(rd).unwrap();
    assert_eq!(n.commit_index(), 1);
}

// Check-quorum: "a leader that lost its majority steps down".
#[test]
fn check_quorum_leader_steps_down() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.cut.insert(2);
    net.cut.insert(3);
    let term = net.node(1).term();
    for _ in 0..n_election_tick() * 2 {
        net.node(1).tick().unwrap();
        net.deliver_all();
    }
    assert_ne!(net.node(1).role(), Role::Leader);
    assert_eq!(
        net.node(1).term(),
        term,
        "stepping down does not change the term"
    );
}

// Check-quorum lease: a follower that hears from its leader ignores vote
// requests, so a rejoining node cannot depose a healthy leader.
#[test]
fn lease_ignores_disruptive_vote_requests() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    let term = net.node(1).term();
    net.node(2)
        .step(msg(
            3,
            2,
            term + 1,
            MessageBody::RequestVote {
                pre_vote: false,
                last_log_index: 9,
                last_log_term: 9,
                force: false,
            },
        ))
        .unwrap();
    assert_eq!(net.node(2).term(), term);
    assert_eq!(net.node(2).leader_id(), 1);
}

// Pipelining: in replicate state the leader sends without waiting for acks,
// bounded by max_inflight_msgs.
#[test]
fn pipelining_is_bounded_by_inflight_limit() {
    let mut net = Net::new(2, |c| {
        c.max_inflight_msgs = 3;
        c.max_size_per_msg_bytes = 30;
        c.max_inflight_bytes = 1000;
    });
    net.elect(1);
    net.drain();
    for i in 0..10 {
        net.node(1).propose(Bytes::from(vec![i; 4])).unwrap();
    }
    let appends = net
        .drain()
        .into_iter()
        .filter(|m| matches!(m.body, MessageBody::Append { .. }))
        .count();
    assert_eq!(appends, 3);
    let pr = net.node(1).progress(2).unwrap();
    assert_eq!(pr.state, ProgressState::Replicate);
    assert_eq!(pr.inflight_msgs(), 3);
}

// Batching: proposals made between two ready() calls travel in one message.
#[test]
fn proposals_between_readies_are_batched() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.drain();
    for i in 0..12u8 {
        net.node(1).propose(Bytes::from(vec![i])).unwrap();
    }
    let appends: Vec<usize> = net
        .drain()
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Append { entries, .. } => Some(entries.len()),
            _ => None,
        })
        .collect();
    assert_eq!(appends, vec![12, 12]);
}

// Backup3B: a leader repairs a long divergent follower log in few rounds.
#[test]
fn leader_backs_up_quickly_over_conflicting_terms() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    // Follower 3 is replaced by one holding 50 entries of a stale term 1.
    let stale: Vec<Entry> = (1..=50).map(|i| entry(i, 1)).collect();
    let s = storage_with(
        &stale,
        HardState {
            term: 1,
            vote: 0,
            commit: 0,
        },
    );
    net.nodes.insert(3, RawNode::new(config(3, 3), s).unwrap());
    for _ in 0..50 {
        net.node(1).propose(Bytes::from_static(b"x")).unwrap();
    }
    let mut rounds = 0;
    let mut rejects = 0;
    while rounds < 100 {
        rounds += 1;
        let msgs = net.drain();
        if msgs.is_empty() {
            net.node(1).tick().unwrap();
            continue;
        }
        for m in msgs {
            if matches!(m.body, MessageBody::AppendResponse { reject: true, .. }) {
                rejects += 1;
            }
            net.node(m.to).step(m).unwrap();
        }
        if net.node(3).commit_index() == net.node(1).last_index().unwrap() {
            break;
        }
    }
    assert_eq!(
        net.node(3).commit_index(),
        net.node(1).last_index().unwrap()
    );
    assert!(
        rejects <= 2,
        "{rejects} rejections to back up over one conflicting term"
    );
}

// ReadIndex: a read is confirmed only after a quorum answers a heartbeat,
// at the commit index of the request time, and needs no log write.
#[test]
fn read_index_needs_heartbeat_quorum_and_no_log_write() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.drain();
    let last = net.node(1).last_index().unwrap();
    net.node(1).read_index(Bytes::from_static(b"r1")).unwrap();
    let rd = net.node(1).ready().unwrap();
    assert!(rd.read_states.is_empty());
    assert!(rd.entries.is_empty(), "read index must not write the log");
    let hbs: Vec<Message> = rd
        .messages
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .cloned()
        .collect();
    assert_eq!(hbs.len(), 2);
    net.node(1).advance(rd).unwrap();
    net.node(2).step(hbs[0].clone()).unwrap();
    let rd2 = net.node(2).ready().unwrap();
    net.node(2).storage_mut().persist_ready(&rd2).unwrap();
    let resp = rd2.persisted_messages[0].clone();
    net.node(2).advance(rd2).unwrap();
    net.node(1).step(resp).unwrap();
    let rd = net.node(1).ready().unwrap();
    assert_eq!(rd.read_states.len(), 1);
    assert_eq!(rd.read_states[0].index, net.node(1).commit_index());
    assert_eq!(rd.read_states[0].context, Bytes::from_static(b"r1"));
    assert_eq!(net.node(1).last_index().unwrap(), last);
}

// ReadIndex on a new leader waits until an entry of its term commits.
#[test]
fn read_index_waits_for_first_commit_in_term() {
    let mut n = RawNode::new(config(1, 3), MemStorage::new()).unwrap();
    let mut cfg = config(1, 3);
    cfg.pre_vote = false;
    n = RawNode::new(cfg, n.into_storage()).unwrap();
    for _ in 0..2 * n_election_tick() {
        n.tick().unwrap();
    }
    let term = n.term();
    n.step(msg(
        2,
        1,
        term,
        MessageBody::RequestVoteResponse {
            pre_vote: false,
            granted: true,
        },
    ))
    .unwrap();
    assert!(n.is_leader());
    n.read_index(Bytes::from_static(b"early")).unwrap();
    let rd = take_ready(&mut n);
    assert!(!rd.messages.iter().any(|m| matches!(
        &m.body,
        MessageBody::Heartbeat {
            context: Some(_),
            ..
        }
    )));
    n.advance(rd).unwrap();
    n.step(msg(
        2,
        1,
        term,
        MessageBody::AppendResponse {
            reject: false,
            index: 1,
            hint_index: 0,
            hint_term: 0,
        },
    ))
    .unwrap();
    let rd = take_ready(&mut n);
    assert!(rd.messages.iter().any(
        |m| matches!(&m.body, MessageBody::Heartbeat { context: Some(c), .. } if c == "early")
    ));
}

// Leadership transfer: the target receives TimeoutNow once caught up and
// wins an election immediately; proposals are refused meanwhile.
#[test]
fn leadership_transfer_via_timeout_now() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1).transfer_leader(3).unwrap();
    assert_eq!(
        net.node(1).propose(Bytes::from_static(b"x")),
        Err(Error::ProposalDropped)
    );
    net.deliver_all();
    assert!(net.node(3).is_leader());
    assert_eq!(net.node(1).role(), Role::Follower);
    assert_eq!(net.node(1).leader_id(), 3);
}

#[test]
fn proposals_on_followers_name_the_leader() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    assert_eq!(
        net.node(2).propose(Bytes::from_static(b"x")),
        Err(Error::NotLeader { leader_hint: 1 })
    );
    assert_eq!(
        net.node(2).read_index(Bytes::from_static(b"x")),
        Err(Error::NotLeader { leader_hint: 1 })
    );
}

// §7 InstallSnapshot: a follower behind the compacted prefix gets the
// snapshot (bytes opaque to the core) and resumes from it.
#[test]
fn follower_behind_compaction_gets_snapshot() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.cut.insert(3);
    for i in 0..10u8 {
        net.node(1).propose(Bytes::from(vec![i])).unwrap();
        net.deliver_all();
    }
    let commit = net.node(1).commit_index();
    let conf = net.node(1).conf_state().clone();
    let st = net.node(1).storage_mut();
    st.create_snapshot(commit, conf, Bytes::from_static(b"opaque"))
        .unwrap();
    st.compact(commit).unwrap();
    net.cut.clear();
    let mut saw_snapshot = false;
    for _ in 0..10 {
        net.node(1).tick().unwrap();
        for m in net.drain() {
            if let MessageBody::Snapshot { snapshot } = &m.body {
                assert_eq!(snapshot.data, Bytes::from_static(b"opaque"));
                saw_snapshot = true;
            }
            net.node(m.to).step(m).unwrap();
        }
    }
    assert!(saw_snapshot);
    assert_eq!(net.node(3).commit_index(), net.node(1).commit_index());
    assert_eq!(net.node(3).storage().current_snapshot().meta.index, commit);
}

#[test]
fn config_validate_names_each_problem() {
    let base = config(1, 3);
    let check = |f: fn(&mut Config), want: ConfigError| {
        let mut c = base.clone();
        f(&mut c);
        assert_eq!(c.validate(), Err(want));
    };
    assert_eq!(base.validate(), Ok(()));
    check(|c| c.id = 0, ConfigError::ZeroId);
    check(|c| c.voters = vec![1, 2, 2], ConfigError::DuplicateVoter(2));
    check(|c| c.voters = vec![0, 1], ConfigError::ZeroVoter);
    check(|c| c.heartbeat_tick = 0, ConfigError::ZeroHeartbeatTick);
    check(
        |c| c.election_tick = 2,
        ConfigError::ElectionTickNotAboveHeartbeat {
            election_tick: 2,
            heartbeat_tick: 2,
        },
    );
    check(
        |c| c.max_inflight_msgs = 0,
        ConfigError::InflightMsgsOutOfRange {
            value: 0,
            max: 65_536,
        },
    );
    check(
        |c| c.max_inflight_bytes = 1,
        ConfigError::InflightBytesBelowMsgSize {
            inflight_bytes: 1,
            msg_bytes: 1 << 20,
        },
    );
    check(
        |c| c.max_uncommitted_entries = 0,
        ConfigError::ZeroLimit("max_uncommitted_entries"),
    );
    let mut c = base.clone();
    c.voters.clear();
    assert!(matches!(
        RawNode::new(c, MemStorage::new()),
        Err(Error::Config(ConfigError::NoVoters))
    ));
}

/// Storage that fails with an I/O error on demand.
struct Flaky {
    inner: MemStorage,
    fail: Rc<Cell<bool>>,
}

impl Storage for Flaky {
    fn initial_state(&self) -> Result<RaftState, StorageError> {
        self.inner.initial_state()
    }
    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.inner.entries(low, high, max_bytes)
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        if self.fail.get() {
            return Err(StorageError::Io("disk on fire".into()));
        }
        self.inner.term(index)
    }
    fn first_index(&self) -> Result<Index, StorageError> {
        self.inner.first_index()
    }
    fn last_index(&self) -> Result<Index, StorageError> {
        self.inner.last_index()
    }
    fn snapshot(&self, request_index: Index) -> Result<Snapshot, StorageError> {
        self.inner.snapshot(request_index)
    }
}

// Storage Io/Corrupt errors surface to the caller and the node refuses
// further work instead of panicking or limping on.
#[test]
fn storage_errors_surface_and_stop_the_node() {
    let fail = Rc::new(Cell::new(false));
    let s = Flaky {
        inner: storage_with(
            &[entry(1, 1)],
            HardState {
                term: 1,
                vote: 0,
                commit: 0,
            },
        ),
        fail: fail.clone(),
    };
    let mut n = RawNode::new(config(1, 3), s).unwrap();
    fail.set(true);
    let vote = msg(
        2,
        1,
        2,
        MessageBody::RequestVote {
            pre_vote: false,
            last_log_index: 1,
            last_log_term: 1,
            force: false,
        },
    );
    assert!(matches!(
        n.step(vote),
        Err(Error::Storage(StorageError::Io(_)))
    ));
    fail.set(false);
    assert!(matches!(n.tick(), Err(Error::Storage(StorageError::Io(_)))));
    assert!(!n.has_ready());
}

#[test]
#[should_panic(expected = "before advance")]
fn ready_twice_without_advance_is_a_bug() {
    let mut n = single(|_| {});
    let _a = n.ready().unwrap();
    let _b = n.ready().unwrap();
}

// Messages are plain serde data (the transport encodes them).
#[test]
fn messages_are_serde_serializable() {
    fn assert_serde<T: serde::Serialize + for<'de> serde::Deserialize<'de>>() {}
    assert_serde::<Message>();
    assert_serde::<Entry>();
}

// Snapshot state (§7 / etcd's StateSnapshot): while a snapshot is on its way
// the leader sends nothing else. The runtime streams snapshot files out of
// band and only sends the `Snapshot` message once they arrived, which for a
// large snapshot takes far longer than an election timeout. The leader must
// not keep starting new full transfers every election timeout meanwhile (each
// would be another concurrent stream of the whole snapshot): retries back
// off, so a follower that stays reachable sees few duplicates.
#[test]
fn snapshot_resends_back_off_while_transfer_is_in_flight() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.cut.insert(3);
    for i in 0..10u8 {
        net.node(1).propose(Bytes::from(vec![i])).unwrap();
        net.deliver_all();
    }
    let commit = net.node(1).commit_index();
    let conf = net.node(1).conf_state().clone();
    let st = net.node(1).storage_mut();
    st.create_snapshot(commit, conf, Bytes::from_static(b"big"))
        .unwrap();
    st.compact(commit).unwrap();
    net.cut.clear();
    // 100 election timeouts during which node 3 answers heartbeats but its
    // snapshot never completes (the runtime is still streaming it).
    let ticks = 100 * n_election_tick();
    let mut sent = 0;
    for _ in 0..ticks {
        net.node(1).tick().unwrap();
        for m in net.drain() {
            if matches!(m.body, MessageBody::Snapshot { .. }) {
                sent += 1;
                continue;
            }
            net.node(m.to).step(m).unwrap();
        }
    }
    assert!(sent >= 2, "a lost snapshot is still retried ({sent} sent)");
    assert!(
        sent <= 12,
        "{sent} full snapshot transfers started in {ticks} ticks for one follower"
    );
    // The next copy that is delivered lets the follower catch up.
    let mut caught_up = false;
    for _ in 0..200 * n_election_tick() {
        net.node(1).tick().unwrap();
        for m in net.drain() {
            net.node(m.to).step(m).unwrap();
        }
        if net.node(3).commit_index() == net.node(1).commit_index() {
            caught_up = true;
            break;
        }
    }
    assert!(caught_up, "follower never installed the snapshot");
    net.deliver_all();
    assert_eq!(
        net.node(1).progress(3).unwrap().state,
        ProgressState::Replicate
    );
}
