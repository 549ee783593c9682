//! What the node tells an operator: its metrics and the trace of a client
//! request.
//!
//! Series are recorded through the `metrics` facade. A program that
//! installs no recorder (an embedded `Db`, the simulation tests) records
//! nothing; `shoal node --status-addr` installs a Prometheus one and serves
//! it (the root README lists every series). Names carry their unit; labels
//! come from bounded sets: the group id (at most
//! [`super::GROUPS_PER_NODE_MAX`] per node), a role, a request kind
//! ([`ClientCommand::kind`](crate::protocol::ClientCommand::kind)), an
//! outcome ([`KvResponse::outcome`](crate::protocol::KvResponse::outcome)),
//! a snapshot kind. Never a key, a
//! client id or a session.
//!
//! The loop keeps one [`GroupMetrics`] per group: handles registered once,
//! so the per-round update ([`GroupMetrics::observe`], at every published
//! status) is a few atomic stores. Leader changes and elections are derived
//! from what consecutive observations saw ([`transitions`], a pure
//! function): consensus itself stays free of any global state.

use std::time::Instant;

use metrics::{Counter, Gauge};
use shoal_consensus::{Index, NodeId, Role, Term};
use shoal_engine::GroupId;
use tracing::Span;

/// Counter, by `group`: entries this node proposed as leader (one entry
/// carries a batch of client writes).
pub const PROPOSALS: &str = "shoal_raft_proposals_total";
/// Counter, by `group`: proposals consensus refused (not leader any more,
/// a leadership transfer, too many uncommitted entries); their callers
/// were answered at once.
pub const PROPOSALS_DROPPED: &str = "shoal_raft_proposals_dropped_total";
/// Counter, by `group`: how far this node saw the commit index advance (a
/// snapshot install counts the entries it covers).
pub const ENTRIES_COMMITTED: &str = "shoal_raft_entries_committed_total";
/// Counter, by `group`: committed entries applied to the state machine.
pub const ENTRIES_APPLIED: &str = "shoal_raft_entries_applied_total";
/// Gauge, by `group` and `role` (`follower`, `precandidate`, `candidate`,
/// `leader`): 1 for the role this node has, 0 for the others (all 0 once
/// the group left the node). `sum(shoal_raft_role{role="leader"})` over a
/// group's nodes is 1 in a healthy cluster.
pub const ROLE: &str = "shoal_raft_role";
/// Gauge, by `group`: the current term.
pub const TERM: &str = "shoal_raft_term";
/// Gauge, by `group`: the leader this node knows of (0: none).
pub const LEADER_ID: &str = "shoal_raft_leader_id";
/// Gauge, by `group`: the commit index.
pub const COMMIT_INDEX: &str = "shoal_raft_commit_index";
/// Gauge, by `group`: the applied index.
pub const APPLIED_INDEX: &str = "shoal_raft_applied_index";
/// Gauge, by `group`: bytes of entries in the stored log (what log
/// compaction is triggered by).
pub const LOG_BYTES: &str = "shoal_raft_log_bytes";
/// Counter, by `group`: times this node saw a new leader (a flapping leader
/// shows as a steady rise).
pub const LEADER_CHANGES: &str = "shoal_raft_leader_changes_total";
/// Counter, by `group`: elections this node started (it voted for itself
/// in a new term: its election timer fired, or a leader handed over).
pub const ELECTIONS_STARTED: &str = "shoal_raft_elections_started_total";
/// Counter, by `group`: snapshots received from a leader and installed.
pub const SNAPSHOTS_INSTALLED: &str = "shoal_raft_snapshots_installed_total";
/// Counter, by `kind` (`raft`: InstallSnapshot to a follower; `shard_move`:
/// a frozen shard shipped to its new group): bytes of snapshot files sent.
pub const SNAPSHOT_SENT_BYTES: &str = "shoal_snapshot_sent_bytes_total";
/// Counter, by `kind` (as [`SNAPSHOT_SENT_BYTES`]): bytes of snapshot files
/// received and verified by the transport.
pub const SNAPSHOT_RECEIVED_BYTES: &str = "shoal_snapshot_received_bytes_total";
/// Histogram, by `kind`: from a client request's arrival at the node to its
/// answer (a write: proposal, synced log write on a quorum, apply).
pub const CLIENT_REQUEST_SECONDS: &str = "shoal_client_request_duration_seconds";
/// Counter, by `kind` and `outcome`: client requests answered.
pub const CLIENT_REQUESTS: &str = "shoal_client_requests_total";
/// Histogram: one turn of the event loop, from its event to the end of its
/// round (draining events, proposing, persisting, applying). Every group
/// of the node waits while it runs.
pub const ROUND_SECONDS: &str = "shoal_node_round_duration_seconds";
/// Gauge: the groups this node hosts.
pub const GROUPS: &str = "shoal_node_groups";

/// The request kind of a shard move step (`Request::Shard`).
pub const SHARD_STEP_KIND: &str = "shard_step";
/// The request kind of a membership change (`Request::Member`).
pub const MEMBER_CHANGE_KIND: &str = "member_change";

/// Describes the node's series to the installed recorder (the `# HELP`
/// lines of a Prometheus scrape), and registers at zero those without a
/// group label, so they are present before their first event.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for kind in [snapshot_kind(false), snapshot_kind(true)] {
        ::metrics::counter!(SNAPSHOT_SENT_BYTES, "kind" => kind).absolute(0);
        ::metrics::counter!(SNAPSHOT_RECEIVED_BYTES, "kind" => kind).absolute(0);
    }
    describe_counter!(PROPOSALS, "Entries this node proposed as leader, by group");
    describe_counter!(
        PROPOSALS_DROPPED,
        "Proposals consensus refused (answered at once), by group"
    );
    describe_counter!(
        ENTRIES_COMMITTED,
        "Advance of the commit index seen by this node, by group"
    );
    describe_counter!(ENTRIES_APPLIED, "Committed entries applied, by group");
    describe_gauge!(
        ROLE,
        "1 for this node's role in the group, 0 for the other roles"
    );
    describe_gauge!(TERM, "Current Raft term, by group");
    describe_gauge!(
        LEADER_ID,
        "The leader this node knows of (0: none), by group"
    );
    describe_gauge!(COMMIT_INDEX, "Commit index, by group");
    describe_gauge!(APPLIED_INDEX, "Applied index, by group");
    describe_gauge!(
        LOG_BYTES,
        Unit::Bytes,
        "Bytes of entries in the stored Raft log, by group"
    );
    describe_counter!(LEADER_CHANGES, "New leaders this node learned of, by group");
    describe_counter!(
        ELECTIONS_STARTED,
        "Elections this node started (voted for itself in a new term), by group"
    );
    describe_counter!(
        SNAPSHOTS_INSTALLED,
        "Snapshots received from a leader and installed, by group"
    );
    describe_counter!(
        SNAPSHOT_SENT_BYTES,
        Unit::Bytes,
        "Bytes of snapshot files sent, by kind (raft, shard_move)"
    );
    describe_counter!(
        SNAPSHOT_RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes of snapshot files received and verified, by kind (raft, shard_move)"
    );
    describe_histogram!(
        CLIENT_REQUEST_SECONDS,
        Unit::Seconds,
        "Client requests from arrival at this node to answer, by kind"
    );
    describe_counter!(
        CLIENT_REQUESTS,
        "Client requests answered, by kind and outcome"
    );
    describe_histogram!(
        ROUND_SECONDS,
        Unit::Seconds,
        "Turns of the node's event loop (every group waits while one runs)"
    );
    describe_gauge!(GROUPS, "Raft groups this node hosts");
}

/// The `role` label of each role, in [`ROLE`]'s order.
const ROLES: [(Role, &str); 4] = [
    (Role::Follower, "follower"),
    (Role::PreCandidate, "precandidate"),
    (Role::Candidate, "candidate"),
    (Role::Leader, "leader"),
];

/// One group's state as the loop sees it after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Observed {
    pub(super) role: Role,
    pub(super) term: Term,
    pub(super) vote: NodeId,
    pub(super) leader: NodeId,
    pub(super) commit: Index,
}

/// What changed between two observations of a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Transitions {
    /// This node started an election: the term rose and it voted for
    /// itself (only a campaigning node does).
    pub(super) election_started: bool,
    /// This node learned of a leader other than the last one it knew.
    pub(super) leader_changed: bool,
    /// Entries the commit index advanced by.
    pub(super) committed: u64,
}

/// What changed from `before` (None: the first observation, which only
/// sets the baseline) to `now`, seen by node `me`.
pub(super) fn transitions(me: NodeId, before: Option<&Observed>, now: &Observed) -> Transitions {
    let Some(before) = before else {
        return Transitions::default();
    };
    Transitions {
        election_started: now.term > before.term && now.vote == me,
        leader_changed: now.leader != 0 && now.leader != before.leader,
        committed: now.commit.saturating_sub(before.commit),
    }
}

/// One group's metric handles and the last observation of it.
pub(super) struct GroupMetrics {
    proposals: Counter,
    proposals_dropped: Counter,
    committed: Counter,
    applied: Counter,
    leader_changes: Counter,
    elections: Counter,
    snapshots_installed: Counter,
    roles: [Gauge; 4],
    term: Gauge,
    leader: Gauge,
    commit: Gauge,
    applied_index: Gauge,
    log_bytes: Gauge,
    /// The last observation; a leader seen as 0 (none known) keeps the one
    /// before, so losing sight of a leader and finding it again is no
    /// change.
    last: Option<Observed>,
}

impl GroupMetrics {
    /// Registers `group`'s series with the installed recorder (no-op
    /// handles without one).
    pub(super) fn new(group: GroupId) -> GroupMetrics {
        let g = group.to_string();
        let counter = |name: &'static str| ::metrics::counter!(name, "group" => g.clone());
        let gauge = |name: &'static str| ::metrics::gauge!(name, "group" => g.clone());
        GroupMetrics {
            proposals: counter(PROPOSALS),
            proposals_dropped: counter(PROPOSALS_DROPPED),
            committed: counter(ENTRIES_COMMITTED),
            applied: counter(ENTRIES_APPLIED),
            leader_changes: counter(LEADER_CHANGES),
            elections: counter(ELECTIONS_STARTED),
            snapshots_installed: counter(SNAPSHOTS_INSTALLED),
            roles: ROLES
                .map(|(_, role)| ::metrics::gauge!(ROLE, "group" => g.clone(), "role" => role)),
            term: gauge(TERM),
            leader: gauge(LEADER_ID),
            commit: gauge(COMMIT_INDEX),
            applied_index: gauge(APPLIED_INDEX),
            log_bytes: gauge(LOG_BYTES),
            last: None,
        }
    }

    /// An entry was proposed.
    pub(super) fn proposed(&self) {
        self.proposals.increment(1);
    }

    /// Consensus refused a proposal.
    pub(super) fn proposal_dropped(&self) {
        self.proposals_dropped.increment(1);
    }

    /// `entries` committed entries were applied.
    pub(super) fn applied(&self, entries: usize) {
        self.applied.increment(entries as u64);
    }

    /// A snapshot from a leader was installed.
    pub(super) fn snapshot_installed(&self) {
        self.snapshots_installed.increment(1);
    }

    /// Updates the gauges from the group's state after a round, and counts
    /// what changed since the last call.
    pub(super) fn observe(&mut self, me: NodeId, now: Observed, applied: Index, log_bytes: u64) {
        let mut now = now;
        let changes = transitions(me, self.last.as_ref(), &now);
        if changes.election_started {
            self.elections.increment(1);
        }
        if changes.leader_changed {
            self.leader_changes.increment(1);
        }
        self.committed.increment(changes.committed);
        for ((role, _), gauge) in ROLES.iter().zip(&self.roles) {
            gauge.set(if *role == now.role { 1.0 } else { 0.0 });
        }
        self.term.set(now.term as f64);
        self.leader.set(now.leader as f64);
        self.commit.set(now.commit as f64);
        self.applied_index.set(applied as f64);
        self.log_bytes.set(log_bytes as f64);
        if now.leader == 0 {
            now.leader = self.last.map_or(0, |l| l.leader);
        }
        self.last = Some(now);
    }

    /// The group left this node: it holds no role in it any more.
    pub(super) fn retire(&self) {
        for gauge in &self.roles {
            gauge.set(0.0);
        }
    }
}

/// The `kind` label of snapshot files: a Raft snapshot or a moving shard.
pub(super) fn snapshot_kind(shard_move: bool) -> &'static str {
    if shard_move {
        "shard_move"
    } else {
        "raft"
    }
}

/// `bytes` of snapshot files were sent.
pub(super) fn snapshot_sent(kind: &'static str, bytes: u64) {
    ::metrics::counter!(SNAPSHOT_SENT_BYTES, "kind" => kind).increment(bytes);
}

/// `bytes` of snapshot files were received.
pub(super) fn snapshot_received(kind: &'static str, bytes: u64) {
    ::metrics::counter!(SNAPSHOT_RECEIVED_BYTES, "kind" => kind).increment(bytes);
}

/// One turn of the loop took `seconds`.
pub(super) fn round(seconds: f64) {
    ::metrics::histogram!(ROUND_SECONDS).record(seconds);
}

/// The node hosts `groups` groups.
pub(super) fn groups(groups: usize) {
    ::metrics::gauge!(GROUPS).set(groups as f64);
}

/// A client request in flight: its kind, when it arrived, and its trace
/// span (`client_request`, at debug level: disabled, as by default, it
/// costs a level check). Finished once, when the request is answered.
pub(super) struct RequestTrace {
    kind: &'static str,
    started: Instant,
    span: Span,
}

impl RequestTrace {
    /// A request of `kind` for `group` arrived at node `node`.
    pub(super) fn start(node: NodeId, group: GroupId, kind: &'static str) -> RequestTrace {
        RequestTrace {
            kind,
            started: Instant::now(),
            span: tracing::debug_span!("client_request", node, group, kind),
        }
    }

    /// The request's span (for events on its way: proposed, read index).
    pub(super) fn span(&self) -> &Span {
        &self.span
    }

    /// The request was answered with `outcome`
    /// ([`KvResponse::outcome`](crate::protocol::KvResponse::outcome)).
    pub(super) fn finish(self, outcome: &'static str) {
        let elapsed = self.started.elapsed();
        ::metrics::histogram!(CLIENT_REQUEST_SECONDS, "kind" => self.kind)
            .record(elapsed.as_secs_f64());
        ::metrics::counter!(CLIENT_REQUESTS, "kind" => self.kind, "outcome" => outcome)
            .increment(1);
        tracing::debug!(parent: &self.span, outcome, elapsed_us = elapsed.as_micros() as u64, "answered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(role: Role, term: Term, vote: NodeId, leader: NodeId, commit: Index) -> Observed {
        Observed {
            role,
            term,
            vote,
            leader,
            commit,
        }
    }

    #[test]
    fn the_first_observation_is_only_a_baseline() {
        let now = seen(Role::Leader, 5, 1, 1, 10);
        assert_eq!(transitions(1, None, &now), Transitions::default());
    }

    #[test]
    fn a_new_term_voted_for_oneself_is_an_election_started() {
        let before = seen(Role::Follower, 3, 2, 2, 7);
        let campaigning = seen(Role::Candidate, 4, 1, 0, 7);
        assert!(transitions(1, Some(&before), &campaigning).election_started);
        // Won within the same round (a group of one): still one election.
        let won = seen(Role::Leader, 4, 1, 1, 7);
        let t = transitions(1, Some(&before), &won);
        assert!(t.election_started && t.leader_changed);
        // A higher term learned from a peer, voting for it: not ours.
        let voted_other = seen(Role::Follower, 4, 3, 0, 7);
        assert!(!transitions(1, Some(&before), &voted_other).election_started);
        // Same term, still candidate (the next round): nothing new.
        assert!(!transitions(1, Some(&campaigning), &campaigning).election_started);
        // A pre-vote does not change the term: no election yet.
        let pre = seen(Role::PreCandidate, 3, 2, 0, 7);
        assert!(!transitions(1, Some(&before), &pre).election_started);
    }

    #[test]
    fn a_leader_change_is_a_different_known_leader() {
        let before = seen(Role::Follower, 3, 2, 2, 7);
        assert!(!transitions(1, Some(&before), &before).leader_changed);
        let unknown = seen(Role::Follower, 4, 0, 0, 7);
        assert!(!transitions(1, Some(&before), &unknown).leader_changed);
        let other = seen(Role::Follower, 4, 3, 3, 7);
        assert!(transitions(1, Some(&before), &other).leader_changed);
    }

    #[test]
    fn losing_sight_of_a_leader_and_finding_it_again_is_no_change() {
        let mut metrics = GroupMetrics::new(9);
        metrics.observe(1, seen(Role::Follower, 3, 2, 2, 7), 7, 0);
        metrics.observe(1, seen(Role::Follower, 3, 2, 0, 7), 7, 0);
        let last = metrics.last.expect("observed");
        assert_eq!(last.leader, 2, "an unknown leader keeps the last known");
        let again = seen(Role::Follower, 3, 2, 2, 7);
        assert!(!transitions(1, metrics.last.as_ref(), &again).leader_changed);
    }

    #[test]
    fn commits_count_the_advance_of_the_commit_index() {
        let before = seen(Role::Leader, 3, 1, 1, 7);
        let after = seen(Role::Leader, 3, 1, 1, 12);
        assert_eq!(transitions(1, Some(&before), &after).committed, 5);
        // A commit index never goes back; a restart starts a new baseline.
        assert_eq!(transitions(1, Some(&after), &before).committed, 0);
    }
}
