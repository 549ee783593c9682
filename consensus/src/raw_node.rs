//! The Raft state machine: [`RawNode`], its inputs (`tick`, `step`,
//! `propose`, `read_index`, `transfer_leader`) and its output ([`Ready`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, ConfigError, PROMOTE_LAG_ENTRIES_MAX, VOTERS_MAX};
use crate::error::{ConfChangeError, Error};
use crate::log::RaftLog;
use crate::message::{Message, MessageBody};
use crate::progress::{Progress, ProgressState};
use crate::storage::{Storage, StorageError};
use crate::types::{
    ConfChange, ConfChangeKind, ConfState, Entry, EntryKind, HardState, Index, NodeId, Snapshot,
    Term, NO_NODE,
};

/// A node's role in its group. Serializable: nodes report it to tools
/// (the shard protocol's status RPC).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Role {
    /// Follows a leader (or waits for one).
    #[default]
    Follower,
    /// Runs a pre-vote round; its term has not changed.
    PreCandidate,
    /// Runs an election in its (incremented) term.
    Candidate,
    /// Leads the group in its term.
    Leader,
}

/// Volatile state the caller may want to observe (not persisted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SoftState {
    /// Known leader, or [`NO_NODE`].
    pub leader_id: NodeId,
    /// This node's role.
    pub role: Role,
}

/// A confirmed linearizable read: once the state machine has applied
/// `index`, a read issued with `context` may be served locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// Serve the read once `applied >= index`.
    pub index: Index,
    /// The context passed to [`RawNode::read_index`].
    pub context: Bytes,
}

/// Everything the caller must do after driving the node. Handle the fields
/// in this order, then give the `Ready` back with [`RawNode::advance`]:
///
/// 1. persist `snapshot` (if any), then append `entries` (truncating any
///    conflicting stored suffix), then `hard_state` — ideally one atomic,
///    synced write;
/// 2. send `messages` (these may also go *before* or *during* step 1);
/// 3. send `persisted_messages` — only *after* step 1 is durable;
/// 4. restore the state machine from `snapshot`, then apply
///    `committed_entries` in order (after step 1). An entry of kind
///    [`EntryKind::ConfigChange`] carries a [`ConfChange`]: applying it means
///    persisting its `conf_after` as the group's membership together with
///    the applied index (so [`Storage::initial_state`] returns the
///    membership as of the applied index), and a snapshot's membership is
///    the one as of its index ([`RawNode::conf_state_applied`]). The core
///    itself runs with a change as soon as the entry is in its log (see
///    [`RawNode::propose_conf_change`]);
/// 5. serve `read_states` once the applied index reaches each one's index.
///
/// `ready()` may not be called again before `advance()`. If a `Ready` has
/// no `snapshot`, no `entries` and no `hard_state`, nothing is pending and
/// `persisted_messages` may go out at once.
#[derive(Debug, Default)]
#[must_use = "a Ready must be persisted, sent, applied and passed to advance()"]
pub struct Ready {
    /// Changed role or leader, if any. Informational.
    pub soft_state: Option<SoftState>,
    /// Changed term, vote or commit: persist before sending
    /// `persisted_messages`.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: persist it (replacing the whole
    /// log) before everything else, and restore the state machine from it.
    pub snapshot: Option<Snapshot>,
    /// Entries to append to the log, persisted before sending
    /// `persisted_messages`. Their first index may be at or below the stored
    /// last index: the stored suffix from there on is replaced.
    pub entries: Vec<Entry>,
    /// Messages that may be sent at once (they do not depend on this
    /// `Ready`'s unpersisted state), e.g. the leader's appends, which go out
    /// in parallel with its own disk write.
    pub messages: Vec<Message>,
    /// Messages that may only be sent once `snapshot`, `entries` and
    /// `hard_state` are durable: votes, vote requests, acknowledgements.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in order, after persisting.
    pub committed_entries: Vec<Entry>,
    /// Confirmed read-index requests.
    pub read_states: Vec<ReadState>,
}

/// A pending read-index request at the leader.
#[derive(Debug)]
struct ReadRequest {
    context: Bytes,
    index: Index,
    acks: BTreeSet<NodeId>,
}

enum VoteResult {
    Pending,
    Won,
    Lost,
}

/// One Raft node: a pure state machine over a read-only [`Storage`].
///
/// Inputs: [`tick`](Self::tick), [`step`](Self::step),
/// [`propose`](Self::propose), [`read_index`](Self::read_index),
/// [`transfer_leader`](Self::transfer_leader). Output:
/// [`ready`](Self::ready), handed back by [`advance`](Self::advance).
/// The caller owns persistence: it writes what a `Ready` says into the
/// storage (reachable through [`storage_mut`](Self::storage_mut)).
pub struct RawNode<S: Storage> {
    id: NodeId,
    term: Term,
    vote: NodeId,
    role: Role,
    leader_id: NodeId,
    log: RaftLog<S>,
    /// The membership in force: that of the last change in the log,
    /// committed or not (the Raft dissertation, §4.1).
    conf: ConfState,
    /// The membership as of the applied index.
    conf_applied: ConfState,
    /// The changes in the log above the applied index, in log order, with
    /// the membership each results in.
    conf_log: Vec<(Index, ConfState)>,
    progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_election_timeout: u32,
    cfg: Config,
    lead_transferee: Option<NodeId>,
    reads: VecDeque<ReadRequest>,
    reads_waiting_commit: Vec<Bytes>,
    msgs: Vec<Message>,
    persisted_msgs: Vec<Message>,
    read_states: Vec<ReadState>,
    rng: ChaCha8Rng,
    prev_hard: HardState,
    prev_soft: SoftState,
    broadcast_pending: bool,
    /// A read-index round awaits its heartbeat (sent at the next `ready`,
    /// so reads issued between two `ready` calls share one round).
    read_heartbeat_pending: bool,
    ready_in_progress: bool,
    /// Leader: index of the last membership change proposed (or of its
    /// term's first entry); no other change is proposed until it is applied.
    pending_conf_index: Index,
    fatal: Option<StorageError>,
}

/// How many snapshot resends to a peer that keeps answering still come one
/// election timeout apart (so a lost `Snapshot` message is retried quickly);
/// after that the wait doubles with each resend.
const SNAPSHOT_FAST_RETRIES: u32 = 4;
/// Cap of the snapshot resend backoff exponent: later resends wait up to
/// `2^10` election timeouts.
const SNAPSHOT_BACKOFF_MAX: u32 = 10;

/// Whether a message depends on state that must be durable first.
fn needs_persist(body: &MessageBody) -> bool {
    match body {
        MessageBody::RequestVote { pre_vote, .. }
        | MessageBody::RequestVoteResponse { pre_vote, .. } => !pre_vote,
        MessageBody::AppendResponse { .. } | MessageBody::HeartbeatResponse { .. } => true,
        _ => false,
    }
}

impl<S: Storage> RawNode<S> {
    /// Creates a node from `config` and whatever `storage` holds (a fresh
    /// group when it is empty). The caller's state machine must already
    /// reflect `config.applied` (e.g. restored from storage's snapshot).
    pub fn new(config: Config, storage: S) -> Result<RawNode<S>, Error> {
        config.validate()?;
        let state = storage.initial_state()?;
        let conf_applied = if state.conf_state.voters.is_empty() {
            ConfState {
                voters: config.voters.clone(),
                learners: Vec::new(),
            }
        } else {
            state.conf_state.clone()
        };
        if conf_applied.voters.is_empty() && !config.join {
            return Err(ConfigError::NoVoters.into());
        }
        let snapshot_index = storage.first_index()? - 1;
        let last = storage.last_index()?;
        let hs = state.hard_state;
        let committed = hs.commit.max(snapshot_index);
        if committed > last {
            return Err(Error::Storage(StorageError::Corrupt(format!(
                "node {}: hard state commit {} is past the last stored index {}",
                config.id, committed, last
            ))));
        }
        if config.applied < snapshot_index || config.applied > committed {
            return Err(ConfigError::AppliedOutOfRange {
                applied: config.applied,
                snapshot_index,
                commit: committed,
            }
            .into());
        }
        let log = RaftLog::new(storage, config.id, committed, config.applied)?;
        let mut node = RawNode {
            id: config.id,
            term: hs.term,
            vote: hs.vote,
            role: Role::Follower,
            leader_id: NO_NODE,
            log,
            conf: conf_applied.clone(),
            conf_applied,
            conf_log: Vec::new(),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: config.election_tick,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            cfg: config,
            lead_transferee: None,
            reads: VecDeque::new(),
            reads_waiting_commit: Vec::new(),
            msgs: Vec::new(),
            persisted_msgs: Vec::new(),
            read_states: Vec::new(),
            prev_hard: HardState {
                term: hs.term,
                vote: hs.vote,
                commit: committed,
            },
            prev_soft: SoftState::default(),
            broadcast_pending: false,
            read_heartbeat_pending: false,
            ready_in_progress: false,
            pending_conf_index: 0,
            fatal: None,
        };
        node.become_follower(hs.term, NO_NODE);
        // Changes in the log above the applied index are in force already.
        let mut next = node.log.applied + 1;
        while next <= last {
            let entries = node
                .log
                .entries(next, last + 1, node.cfg.max_size_per_msg_bytes)?;
            next = entries.last().map_or(last + 1, |e| e.index + 1);
            node.track_conf_entries(&entries)?;
        }
        Ok(node)
    }

    // ----- accessors -----

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }
    /// Vote cast in the current term, or [`NO_NODE`].
    pub fn vote(&self) -> NodeId {
        self.vote
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// True when this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    /// Known leader, or [`NO_NODE`].
    pub fn leader_id(&self) -> NodeId {
        self.leader_id
    }
    /// Highest index known committed (may exceed what was persisted yet).
    pub fn commit_index(&self) -> Index {
        self.log.committed
    }
    /// Highest index the caller confirmed applied through `advance`.
    pub fn applied_index(&self) -> Index {
        self.log.applied
    }
    /// Last index of the log, persisted or not.
    pub fn last_index(&self) -> Result<Index, Error> {
        Ok(self.log.last_index()?)
    }
    /// Entries `[low, high)` of the log (persisted or not), at most
    /// `max_bytes` (but at least one).
    pub fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, Error> {
        Ok(self.log.entries(low, high, max_bytes)?)
    }
    /// Term of the entry at `index` (persisted or not).
    pub fn term_at(&self, index: Index) -> Result<Term, Error> {
        Ok(self.log.term(index)?)
    }
    /// Hard state as it is now (not necessarily persisted).
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }
    /// Role and leader as they are now.
    pub fn soft_state(&self) -> SoftState {
        SoftState {
            leader_id: self.leader_id,
            role: self.role,
        }
    }
    /// The membership in force: that of the last change in the log,
    /// committed or not.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf
    }
    /// The membership as of the applied index: the one a snapshot taken at
    /// the applied index records.
    pub fn conf_state_applied(&self) -> &ConfState {
        &self.conf_applied
    }
    /// The leader's view of `peer` (None on non-leaders and unknown peers).
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        if self.role == Role::Leader {
            self.progress.get(&peer)
        } else {
            None
        }
    }
    /// The persisted log.
    pub fn storage(&self) -> &S {
        &self.log.storage
    }
    /// The persisted log, to write a `Ready` into, or to create snapshots
    /// and compact (at an index the caller has applied).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.log.storage
    }
    /// Consumes the node, returning its storage (what a crash leaves).
    pub fn into_storage(self) -> S {
        self.log.storage
    }
    /// The leader-transfer target in progress, if any.
    pub fn lead_transferee(&self) -> Option<NodeId> {
        self.lead_transferee
    }

    // ----- inputs -----

    /// Advances the logical clock by one tick (see the tick length in
    /// [`crate::config`]).
    pub fn tick(&mut self) -> Result<(), Error> {
        self.check_fatal()?;
        let r = if self.role == Role::Leader {
            self.tick_leader()
        } else {
            self.tick_election()
        };
        self.record(r)
    }

    /// Handles a message from a peer. Misrouted messages are ignored.
    pub fn step(&mut self, m: Message) -> Result<(), Error> {
        self.check_fatal()?;
        if m.to != self.id || m.from == self.id || m.from == NO_NODE {
            return Ok(());
        }
        let r = self.step_inner(m);
        self.record(r)
    }

    /// Proposes `data` as a new entry; returns the index it will have if it
    /// commits. Appends go out on the next [`ready`](Self::ready), so
    /// proposals made between two `ready` calls travel as one batch.
    pub fn propose(&mut self, data: Bytes) -> Result<Index, Error> {
        self.propose_batch(std::iter::once(data))
    }

    /// Proposes several entries at once; returns the index of the last
    /// (or the last index if `data` is empty).
    pub fn propose_batch<I: IntoIterator<Item = Bytes>>(
        &mut self,
        data: I,
    ) -> Result<Index, Error> {
        self.check_can_propose()?;
        let mut last = self.log.last_index()?;
        let mut entries = Vec::new();
        for d in data {
            last += 1;
            entries.push(Entry {
                term: self.term,
                index: last,
                kind: EntryKind::Normal,
                data: d,
            });
        }
        if last - self.log.committed > self.cfg.max_uncommitted_entries {
            return Err(Error::ProposalDropped);
        }
        if !entries.is_empty() {
            let r = self.log.append(&entries);
            self.record(r)?;
            self.broadcast_pending = true;
        }
        Ok(last)
    }

    /// Proposes a membership change of one member; returns the index of its
    /// entry. Every member runs with the change as soon as the entry is in
    /// its log, committed or not, and falls back to the previous membership
    /// if the entry is replaced (the Raft dissertation's single-server
    /// changes: the majorities of two memberships one change apart always
    /// intersect). Refused, with nothing proposed,
    /// while an earlier change is not applied, before this leader has
    /// applied its own term's first entry (so a change never follows one
    /// that a previous leader left uncommitted), for a learner that is
    /// behind ([`PROMOTE_LAG_ENTRIES_MAX`]), or for the leader itself.
    /// `context` travels in the entry for the layer above.
    pub fn propose_conf_change(
        &mut self,
        kind: ConfChangeKind,
        node: NodeId,
        context: Bytes,
    ) -> Result<Index, Error> {
        self.check_can_propose()?;
        if self.pending_conf_index > self.log.applied {
            return Err(ConfChangeError::Pending {
                pending_index: self.pending_conf_index,
                applied: self.log.applied,
            }
            .into());
        }
        let matched = self.progress.get(&node).map_or(0, |pr| pr.match_index);
        let conf_after = next_conf(&self.conf, kind, node, self.id, matched, self.log.committed)?;
        let last = self.log.last_index()?;
        if last - self.log.committed >= self.cfg.max_uncommitted_entries {
            return Err(Error::ProposalDropped);
        }
        let change = ConfChange {
            kind,
            node,
            conf_after,
            context,
        };
        let entry = Entry {
            term: self.term,
            index: last + 1,
            kind: EntryKind::ConfigChange,
            data: change.encode(),
        };
        let r = self.log.append(std::slice::from_ref(&entry));
        self.record(r)?;
        let r = self.track_conf_entries(&[entry]);
        self.record(r)?;
        self.pending_conf_index = last + 1;
        self.broadcast_pending = true;
        Ok(last + 1)
    }

    /// Requests a linearizable read. When leadership is confirmed (a quorum
    /// answered a heartbeat sent after the request) a [`ReadState`] with
    /// this `context` appears in a `Ready`. Contexts must be unique: never
    /// reuse one while this node leads in the same term, not even after its
    /// request was confirmed — a delayed answer to a heartbeat that carried
    /// the earlier request's context would confirm the new request without
    /// a heartbeat round sent after it (a possibly stale read). Requests are
    /// dropped silently if this node loses leadership first; callers retry
    /// on a timeout.
    pub fn read_index(&mut self, context: Bytes) -> Result<(), Error> {
        self.check_fatal()?;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader_hint: self.leader_id,
            });
        }
        if self.reads.len() + self.reads_waiting_commit.len() >= self.cfg.max_pending_read_index {
            return Err(Error::ReadIndexDropped);
        }
        let r = self.committed_in_term();
        if !self.record(r)? {
            // A new leader does not know the commit index until an entry of
            // its own term commits (the no-op); wait for that.
            self.reads_waiting_commit.push(context);
            return Ok(());
        }
        self.start_read(context);
        Ok(())
    }

    /// Asks the leader to hand leadership to `to`. Proposals are dropped
    /// until the transfer succeeds or times out (one election timeout).
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), Error> {
        self.check_fatal()?;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader_hint: self.leader_id,
            });
        }
        if to == self.id {
            return Ok(());
        }
        if !self.conf.voters.contains(&to) {
            return Err(Error::UnknownPeer(to));
        }
        if self.lead_transferee == Some(to) {
            return Ok(());
        }
        self.lead_transferee = Some(to);
        self.election_elapsed = 0;
        let r = self.send_timeout_now_or_append(to);
        self.record(r)
    }

    /// Tells the leader that the last message to `peer` may have been lost
    /// (transport error), so it stops pipelining and probes.
    pub fn report_unreachable(&mut self, peer: NodeId) {
        if self.role == Role::Leader {
            if let Some(pr) = self.progress.get_mut(&peer) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
            }
        }
    }

    /// Tells the leader how sending a snapshot to `peer` went (for runtimes
    /// that stream snapshots out of band). On failure the snapshot is
    /// retried after the next heartbeat. Without a report, a snapshot that
    /// is not acknowledged is sent again after an election timeout; while
    /// the peer keeps answering (so a long transfer may still be running),
    /// that wait doubles after a few resends, up to 1024 election timeouts.
    /// A runtime should still not start a second transfer of the same
    /// snapshot to the same peer while one is running.
    pub fn report_snapshot(&mut self, peer: NodeId, success: bool) {
        if self.role == Role::Leader {
            if let Some(pr) = self.progress.get_mut(&peer) {
                if pr.state == ProgressState::Snapshot {
                    if !success {
                        pr.pending_snapshot = 0;
                    }
                    pr.become_probe();
                    pr.probe_sent = true;
                }
            }
        }
    }

    // ----- output -----

    /// Whether [`ready`](Self::ready) has anything to hand out.
    pub fn has_ready(&self) -> bool {
        if self.ready_in_progress || self.fatal.is_some() {
            return false;
        }
        self.soft_state() != self.prev_soft
            || self.hard_state() != self.prev_hard
            || self.log.unstable_snapshot.is_some()
            || !self.log.unstable.is_empty()
            || !self.msgs.is_empty()
            || !self.persisted_msgs.is_empty()
            || self.log.has_next_committed()
            || !self.read_states.is_empty()
            || ((self.broadcast_pending || self.read_heartbeat_pending)
                && self.role == Role::Leader)
    }

    /// Collects what must be persisted, sent and applied. Panics if the
    /// previous `Ready` was not given back through `advance`.
    pub fn ready(&mut self) -> Result<Ready, Error> {
        self.check_fatal()?;
        assert!(
            !self.ready_in_progress,
            "node {}: ready() called before advance() of the previous Ready",
            self.id
        );
        let r = self.flush_broadcast();
        self.record(r)?;
        let committed = self
            .log
            .next_committed(self.cfg.max_committed_size_per_ready_bytes);
        let committed_entries = self.record(committed)?;
        if let Some(e) = committed_entries.last() {
            self.log.applying = e.index;
        }
        let soft = self.soft_state();
        let hard = self.hard_state();
        let ready = Ready {
            soft_state: (soft != self.prev_soft).then_some(soft),
            hard_state: (hard != self.prev_hard).then_some(hard),
            snapshot: self.log.unstable_snapshot.clone(),
            entries: self.log.unstable.clone(),
            messages: std::mem::take(&mut self.msgs),
            persisted_messages: std::mem::take(&mut self.persisted_msgs),
            committed_entries,
            read_states: std::mem::take(&mut self.read_states),
        };
        self.prev_soft = soft;
        self.prev_hard = hard;
        self.ready_in_progress = true;
        Ok(ready)
    }

    /// Takes back a `Ready` whose persistence (and application) is done.
    pub fn advance(&mut self, ready: Ready) -> Result<(), Error> {
        assert!(
            self.ready_in_progress,
            "node {}: advance() without ready()",
            self.id
        );
        self.ready_in_progress = false;
        self.check_fatal()?;
        if let Some(s) = &ready.snapshot {
            self.log.stable_snapshot_to(s.meta.index);
            self.log.applied = self.log.applied.max(s.meta.index);
        }
        if let Some(s) = &ready.snapshot {
            if !s.meta.conf_state.voters.is_empty() {
                self.conf_applied = s.meta.conf_state.clone();
            }
        }
        if let Some(e) = ready.committed_entries.last() {
            self.log.applied = self.log.applied.max(e.index);
        }
        let applied = self.log.applied;
        let done = self.conf_log.partition_point(|(i, _)| *i <= applied);
        if let Some((_, conf)) = self.conf_log.drain(..done).next_back() {
            self.conf_applied = conf;
        }
        if let Some(e) = ready.entries.last() {
            self.log.stable_to(e.index, e.term);
            if self.role == Role::Leader {
                let persisted = self.log.persisted_index();
                let updated = self
                    .progress
                    .get_mut(&self.id)
                    .is_some_and(|pr| pr.maybe_update(persisted));
                if updated {
                    let r = self.maybe_commit();
                    self.record(r)?;
                }
            }
        }
        Ok(())
    }

    // ----- internals -----

    /// Proposals need a healthy leader with no transfer under way.
    fn check_can_propose(&self) -> Result<(), Error> {
        self.check_fatal()?;
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader_hint: self.leader_id,
            });
        }
        if self.lead_transferee.is_some() {
            return Err(Error::ProposalDropped);
        }
        Ok(())
    }

    fn check_fatal(&self) -> Result<(), Error> {
        match &self.fatal {
            Some(e) => Err(Error::Storage(e.clone())),
            None => Ok(()),
        }
    }

    /// Converts a storage result; remembers fatal errors so the node refuses
    /// further work.
    fn record<T>(&mut self, r: Result<T, StorageError>) -> Result<T, Error> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if matches!(e, StorageError::Corrupt(_) | StorageError::Io(_)) {
                    self.fatal = Some(e.clone());
                }
                Err(Error::Storage(e))
            }
        }
    }

    fn quorum(&self) -> usize {
        self.conf.voters.len() / 2 + 1
    }

    /// Records the membership changes among `entries`, which the log now
    /// ends with (everything from their first index on was replaced by
    /// them), and switches to the membership in force.
    fn track_conf_entries(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        let before = self.conf_log.len();
        self.conf_log.retain(|(i, _)| *i < first);
        let mut changed = self.conf_log.len() != before;
        for e in entries {
            if e.kind != EntryKind::ConfigChange || e.index <= self.log.applied {
                continue;
            }
            let change = ConfChange::decode(&e.data).map_err(|err| {
                StorageError::Corrupt(format!(
                    "node {}: entry {} term {}: {err}",
                    self.id, e.index, e.term
                ))
            })?;
            self.conf_log.push((e.index, change.conf_after));
            changed = true;
        }
        if changed {
            self.switch_conf()?;
        }
        Ok(())
    }

    /// Runs with the membership of the last change in the log (or the
    /// applied one). A leader starts or stops replicating to the members
    /// that came or went, and counts its commit index anew.
    fn switch_conf(&mut self) -> Result<(), StorageError> {
        let conf = match self.conf_log.last() {
            Some((_, c)) => c.clone(),
            None => self.conf_applied.clone(),
        };
        if conf.voters.is_empty() || conf == self.conf {
            // No proposal produces an empty membership (`next_conf` refuses
            // it); keep one that can still elect a leader.
            return Ok(());
        }
        self.conf = conf;
        if self.role != Role::Leader {
            return Ok(());
        }
        if !self.conf.voters.contains(&self.id) {
            // Unreachable while a leader never proposes its own removal;
            // stepping down keeps a non-member from leading.
            let term = self.term;
            self.become_follower(term, NO_NODE);
            return Ok(());
        }
        let last = self.log.last_index()?;
        let conf = &self.conf;
        self.progress.retain(|&id, _| conf.contains(id));
        for id in conf.members() {
            self.progress
                .entry(id)
                .or_insert_with(|| Progress::new(last + 1));
        }
        if self
            .lead_transferee
            .is_some_and(|t| !self.conf.voters.contains(&t))
        {
            self.lead_transferee = None;
        }
        // A smaller quorum may already hold more entries.
        self.maybe_commit()?;
        self.broadcast_pending = true;
        Ok(())
    }

    fn promotable(&self) -> bool {
        self.conf.voters.contains(&self.id)
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        let term = self.term;
        self.send_with_term(to, term, body);
    }

    fn send_with_term(&mut self, to: NodeId, term: Term, body: MessageBody) {
        let persist = needs_persist(&body);
        let m = Message {
            from: self.id,
            to,
            term,
            body,
        };
        if persist {
            self.persisted_msgs.push(m);
        } else {
            self.msgs.push(m);
        }
    }

    fn reset_randomized_election_timeout(&mut self) {
        let base = self.cfg.election_tick;
        self.randomized_election_timeout = self.rng.random_range(base..2 * base);
    }

    fn reset(&mut self, term: Term) {
        if self.term != term {
            assert!(
                term > self.term,
                "node {}: term moving back from {} to {}",
                self.id,
                self.term,
                term
            );
            self.term = term;
            self.vote = NO_NODE;
        }
        self.leader_id = NO_NODE;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.lead_transferee = None;
        self.votes.clear();
        self.progress.clear();
        self.reads.clear();
        self.reads_waiting_commit.clear();
        self.broadcast_pending = false;
        self.read_heartbeat_pending = false;
    }

    fn become_follower(&mut self, term: Term, leader: NodeId) {
        self.reset(term);
        self.leader_id = leader;
        self.role = Role::Follower;
    }

    fn become_pre_candidate(&mut self) {
        assert!(
            self.role != Role::Leader,
            "node {} term {}: leader cannot become pre-candidate",
            self.id,
            self.term
        );
        self.votes.clear();
        self.leader_id = NO_NODE;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        assert!(
            self.role != Role::Leader,
            "node {} term {}: leader cannot become candidate",
            self.id,
            self.term
        );
        let term = self.term + 1;
        self.reset(term);
        self.vote = self.id;
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) -> Result<(), StorageError> {
        assert!(
            self.role == Role::Candidate,
            "node {} term {}: only a candidate can become leader",
            self.id,
            self.term
        );
        let term = self.term;
        self.reset(term);
        self.leader_id = self.id;
        self.role = Role::Leader;
        let last = self.log.last_index()?;
        for id in self.conf.members() {
            self.progress.insert(id, Progress::new(last + 1));
        }
        let persisted = self.log.persisted_index();
        if let Some(pr) = self.progress.get_mut(&self.id) {
            pr.match_index = persisted;
            pr.become_replicate();
            pr.next_index = last + 1;
            pr.recent_active = true;
        }
        // The no-op lets the leader commit (and so learn the commit index
        // of) everything before its term (§5.4.2, §8).
        let noop = Entry {
            term,
            index: last + 1,
            kind: EntryKind::Normal,
            data: Bytes::new(),
        };
        self.log.append(&[noop])?;
        // No membership change until everything up to the no-op is
        // applied: a change proposed by an earlier leader and not yet
        // committed is settled first (the dissertation's fix for
        // single-server changes across leader changes).
        self.pending_conf_index = last + 1;
        self.broadcast_pending = true;
        Ok(())
    }

    fn tick_election(&mut self) -> Result<(), StorageError> {
        self.election_elapsed += 1;
        if self.promotable() && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.hup(false)?;
        }
        Ok(())
    }

    fn tick_leader(&mut self) -> Result<(), StorageError> {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        let election_tick = self.cfg.election_tick;
        for pr in self.progress.values_mut() {
            if pr.state == ProgressState::Snapshot {
                pr.snapshot_ticks = pr.snapshot_ticks.saturating_add(1);
                let exp = pr
                    .snapshot_backoff
                    .saturating_sub(SNAPSHOT_FAST_RETRIES)
                    .min(SNAPSHOT_BACKOFF_MAX);
                let timeout = u64::from(election_tick) << exp;
                if u64::from(pr.snapshot_ticks) >= timeout {
                    // The snapshot or its answer was probably lost: resend.
                    // If the peer kept answering, the runtime may still be
                    // streaming it: wait longer before the next attempt.
                    if pr.snapshot_heard {
                        pr.snapshot_backoff = pr.snapshot_backoff.saturating_add(1);
                    }
                    pr.pending_snapshot = 0;
                    pr.become_probe();
                }
            }
        }
        if self.election_elapsed >= election_tick {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_active() {
                let term = self.term;
                self.become_follower(term, NO_NODE);
                return Ok(());
            }
            self.lead_transferee = None;
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            let context = self.reads.back().map(|r| r.context.clone());
            self.broadcast_heartbeat(context);
        }
        Ok(())
    }

    /// Whether a quorum was heard from since the last call; resets the marks.
    fn quorum_active(&mut self) -> bool {
        let mut active = 0;
        for (&id, pr) in self.progress.iter_mut() {
            if (id == self.id || pr.recent_active) && self.conf.voters.contains(&id) {
                active += 1;
            }
            if id != self.id {
                pr.recent_active = false;
            }
        }
        active >= self.quorum()
    }

    fn hup(&mut self, transfer: bool) -> Result<(), StorageError> {
        if self.role == Role::Leader || !self.promotable() {
            return Ok(());
        }
        self.campaign(self.cfg.pre_vote && !transfer, transfer)
    }

    fn campaign(&mut self, pre_vote: bool, force: bool) -> Result<(), StorageError> {
        let vote_term = if pre_vote {
            self.become_pre_candidate();
            self.term + 1
        } else {
            self.become_candidate();
            self.term
        };
        match self.poll(self.id, true) {
            VoteResult::Won => {
                return if pre_vote {
                    self.campaign(false, force)
                } else {
                    self.become_leader()
                };
            }
            VoteResult::Lost | VoteResult::Pending => {}
        }
        let last_log_index = self.log.last_index()?;
        let last_log_term = self.log.term(last_log_index)?;
        let voters: Vec<NodeId> = self
            .conf
            .voters
            .iter()
            .copied()
            .filter(|&v| v != self.id)
            .collect();
        for v in voters {
            self.send_with_term(
                v,
                vote_term,
                MessageBody::RequestVote {
                    pre_vote,
                    last_log_index,
                    last_log_term,
                    force,
                },
            );
        }
        Ok(())
    }

    fn poll(&mut self, from: NodeId, granted: bool) -> VoteResult {
        if !self.conf.voters.contains(&from) {
            return VoteResult::Pending;
        }
        self.votes.entry(from).or_insert(granted);
        // Only current voters count (the membership may change while a
        // campaign runs, when the node applies a change).
        let voters = &self.conf.voters;
        let counted = self.votes.iter().filter(|(id, _)| voters.contains(id));
        let (yes, no) = counted.fold(
            (0, 0),
            |(y, n), (_, &g)| if g { (y + 1, n) } else { (y, n + 1) },
        );
        if yes >= self.quorum() {
            VoteResult::Won
        } else if no > self.conf.voters.len() - self.quorum() {
            VoteResult::Lost
        } else {
            VoteResult::Pending
        }
    }

    fn step_inner(&mut self, m: Message) -> Result<(), StorageError> {
        if m.term > self.term {
            if let MessageBody::RequestVote { force, .. } = m.body {
                // Leader lease (check-quorum): a node that recently heard
                // from a leader does not help unseat it.
                let in_lease = self.cfg.check_quorum
                    && self.leader_id != NO_NODE
                    && self.election_elapsed < self.cfg.election_tick;
                if !force && in_lease {
                    return Ok(());
                }
            }
            match &m.body {
                MessageBody::RequestVote { pre_vote: true, .. } => {}
                MessageBody::RequestVoteResponse {
                    pre_vote: true,
                    granted: true,
                } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. } => self.become_follower(m.term, m.from),
                _ => self.become_follower(m.term, NO_NODE),
            }
        } else if m.term < self.term {
            match &m.body {
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. }
                    if self.cfg.check_quorum || self.cfg.pre_vote =>
                {
                    // A stale leader must learn the new term, or with
                    // pre-vote it could block elections forever.
                    self.send(
                        m.from,
                        MessageBody::AppendResponse {
                            reject: false,
                            index: 0,
                            hint_index: 0,
                            hint_term: 0,
                        },
                    );
                }
                MessageBody::RequestVote { pre_vote: true, .. } => {
                    self.send(
                        m.from,
                        MessageBody::RequestVoteResponse {
                            pre_vote: true,
                            granted: false,
                        },
                    );
                }
                _ => {}
            }
            return Ok(());
        }

        if let MessageBody::RequestVote {
            pre_vote,
            last_log_index,
            last_log_term,
            ..
        } = m.body
        {
            let can_vote = self.vote == m.from
                || (self.vote == NO_NODE && self.leader_id == NO_NODE)
                || (pre_vote && m.term > self.term);
            if can_vote && self.log.is_up_to_date(last_log_index, last_log_term)? {
                self.send_with_term(
                    m.from,
                    m.term,
                    MessageBody::RequestVoteResponse {
                        pre_vote,
                        granted: true,
                    },
                );
                if !pre_vote {
                    self.election_elapsed = 0;
                    self.vote = m.from;
                }
            } else {
                self.send(
                    m.from,
                    MessageBody::RequestVoteResponse {
                        pre_vote,
                        granted: false,
                    },
                );
            }
            return Ok(());
        }

        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
    }

    fn step_leader(&mut self, m: Message) -> Result<(), StorageError> {
        match m.body {
            MessageBody::AppendResponse {
                reject,
                index,
                hint_index,
                hint_term,
            } => self.handle_append_response(m.from, reject, index, hint_index, hint_term),
            MessageBody::HeartbeatResponse { context } => {
                self.handle_heartbeat_response(m.from, context)
            }
            MessageBody::SnapshotWanted => self.handle_snapshot_wanted(m.from),
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. } => {
                panic!(
                    "node {} term {}: leader got a leader's message from {} in its own term",
                    self.id, self.term, m.from
                )
            }
            _ => Ok(()),
        }
    }

    fn step_candidate(&mut self, m: Message) -> Result<(), StorageError> {
        match m.body {
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. } => {
                let term = self.term;
                self.become_follower(term, m.from);
                self.step_follower(m)
            }
            MessageBody::RequestVoteResponse { pre_vote, granted } => {
                if pre_vote != (self.role == Role::PreCandidate) {
                    return Ok(());
                }
                match self.poll(m.from, granted) {
                    VoteResult::Won => {
                        if pre_vote {
                            self.campaign(false, false)
                        } else {
                            self.become_leader()
                        }
                    }
                    VoteResult::Lost => {
                        let term = self.term;
                        self.become_follower(term, NO_NODE);
                        Ok(())
                    }
                    VoteResult::Pending => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn step_follower(&mut self, m: Message) -> Result<(), StorageError> {
        match m.body {
            MessageBody::Append {
                prev_log_index,
                prev_log_term,
                entries,
                commit,
            } => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                if self.awaits_first_snapshot()? {
                    self.send(m.from, MessageBody::SnapshotWanted);
                    return Ok(());
                }
                self.handle_append(m.from, prev_log_index, prev_log_term, &entries, commit)
            }
            MessageBody::Heartbeat { commit, context } => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                let last = self.log.last_index()?;
                self.log.commit_to(commit.min(last));
                self.send(m.from, MessageBody::HeartbeatResponse { context });
                Ok(())
            }
            MessageBody::Snapshot { snapshot } => {
                self.election_elapsed = 0;
                self.leader_id = m.from;
                self.handle_snapshot(m.from, snapshot)
            }
            MessageBody::TimeoutNow => self.hup(true),
            _ => Ok(()),
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
        commit: Index,
    ) -> Result<(), StorageError> {
        if prev_index < self.log.committed {
            let committed = self.log.committed;
            self.send(
                from,
                MessageBody::AppendResponse {
                    reject: false,
                    index: committed,
                    hint_index: 0,
                    hint_term: 0,
                },
            );
            return Ok(());
        }
        match self
            .log
            .maybe_append(prev_index, prev_term, commit, entries)?
        {
            Some((last_new, conflict)) => {
                if conflict != 0 {
                    self.track_conf_entries(&entries[(conflict - prev_index - 1) as usize..])?;
                }
                self.send(
                    from,
                    MessageBody::AppendResponse {
                        reject: false,
                        index: last_new,
                        hint_index: 0,
                        hint_term: 0,
                    },
                );
            }
            None => {
                let hint = prev_index.min(self.log.last_index()?);
                let (hint_index, hint_term) = self.log.find_conflict_by_term(hint, prev_term)?;
                self.send(
                    from,
                    MessageBody::AppendResponse {
                        reject: true,
                        index: prev_index,
                        hint_index,
                        hint_term,
                    },
                );
            }
        }
        Ok(())
    }

    fn handle_snapshot(&mut self, from: NodeId, snapshot: Snapshot) -> Result<(), StorageError> {
        let (index, term) = (snapshot.meta.index, snapshot.meta.term);
        let ack = if index <= self.log.committed {
            self.log.committed
        } else if self.log.match_term(index, term)? {
            // We already hold the snapshot's last entry: just commit.
            self.log.commit_to(index);
            index
        } else {
            // A snapshot without voters carries no membership (a caller
            // that did not record it); keep ours rather than lose quorum.
            if !snapshot.meta.conf_state.voters.is_empty() {
                self.conf_applied = snapshot.meta.conf_state.clone();
            }
            self.conf_log.clear();
            self.log.restore(snapshot);
            self.switch_conf()?;
            index
        };
        self.send(
            from,
            MessageBody::AppendResponse {
                reject: false,
                index: ack,
                hint_index: 0,
                hint_term: 0,
            },
        );
        Ok(())
    }

    /// A joiner that has nothing yet ([`Config::join`], no membership, no
    /// log): it takes its first state as a snapshot (see
    /// [`MessageBody::SnapshotWanted`]).
    fn awaits_first_snapshot(&self) -> Result<bool, StorageError> {
        Ok(self.cfg.join && self.conf.voters.is_empty() && self.log.last_index()? == 0)
    }

    /// Leader: `from` joined with nothing and wants a snapshot. It must be
    /// taken at or after the change that made `from` a member, so that
    /// every entry `from` replays afterwards was proposed with `from` in the
    /// membership ([`RawNode::member_since`]). The floor is fixed at the
    /// first request, so a busy group's export does not chase it.
    fn handle_snapshot_wanted(&mut self, from: NodeId) -> Result<(), StorageError> {
        let floor = self.member_since(from);
        let Some(pr) = self.progress.get_mut(&from) else {
            return Ok(());
        };
        pr.recent_active = true;
        if pr.match_index > 0 || pr.state == ProgressState::Snapshot {
            // Stale: it acknowledged something, or a snapshot is on its way.
            return Ok(());
        }
        if pr.snapshot_floor == 0 {
            pr.snapshot_floor = floor;
        }
        self.send_snapshot(from)?;
        Ok(())
    }

    /// An index at or after the change from which `node` has been a member
    /// without a break, in this node's log: the change's own index if it is
    /// above the applied index, else the applied index (the applied
    /// membership is known, not when it began). At least 1.
    fn member_since(&self, node: NodeId) -> Index {
        let mut since = if self.conf_applied.contains(node) {
            self.log.applied
        } else {
            0
        };
        for (index, conf) in &self.conf_log {
            if !conf.contains(node) {
                since = 0;
            } else if since == 0 {
                since = *index;
            }
        }
        since.max(1)
    }

    /// Leader: the least snapshot index a joining peer waits for that the
    /// storage could not give yet ([`Storage::snapshot`] answered
    /// `SnapshotTemporarilyUnavailable`), if any. The caller takes a
    /// snapshot at or after it (once applied that far); consensus sends it
    /// at the next heartbeat.
    pub fn snapshot_wanted(&self) -> Option<Index> {
        if self.role != Role::Leader {
            return None;
        }
        self.progress
            .values()
            .filter(|pr| pr.wants_snapshot() && pr.state != ProgressState::Snapshot)
            .map(|pr| pr.snapshot_floor)
            .max()
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        reject: bool,
        index: Index,
        hint_index: Index,
        hint_term: Term,
    ) -> Result<(), StorageError> {
        if !self.progress.contains_key(&from) {
            return Ok(());
        }
        if reject {
            let next_probe = if hint_term > 0 {
                self.log.find_conflict_by_term(hint_index, hint_term)?.0
            } else {
                hint_index
            };
            let pr = self.progress.get_mut(&from).expect("checked above");
            pr.recent_active = true;
            pr.snapshot_heard |= pr.state == ProgressState::Snapshot;
            if pr.maybe_decr_to(index, next_probe) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.send_append(from, true)?;
            }
            return Ok(());
        }
        let first_index = self.log.first_index()?;
        let pr = self.progress.get_mut(&from).expect("checked above");
        pr.recent_active = true;
        pr.snapshot_heard |= pr.state == ProgressState::Snapshot;
        if !pr.maybe_update(index) {
            return Ok(());
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Snapshot => {
                if pr.match_index + 1 >= first_index {
                    pr.become_probe();
                    pr.become_replicate();
                }
            }
            ProgressState::Replicate => pr.inflights.free_le(index),
        }
        let match_index = pr.match_index;
        self.maybe_commit()?;
        if self.lead_transferee == Some(from) && match_index == self.log.last_index()? {
            self.send(from, MessageBody::TimeoutNow);
        }
        while self.send_append(from, false)? {}
        Ok(())
    }

    fn handle_heartbeat_response(
        &mut self,
        from: NodeId,
        context: Option<Bytes>,
    ) -> Result<(), StorageError> {
        let last = self.log.last_index()?;
        let (max_msgs, max_bytes) = (self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes);
        let Some(pr) = self.progress.get_mut(&from) else {
            return Ok(());
        };
        pr.recent_active = true;
        pr.snapshot_heard |= pr.state == ProgressState::Snapshot;
        pr.probe_sent = false;
        if pr.state == ProgressState::Replicate && pr.match_index < last {
            // No progress over two heartbeat rounds while appends are in
            // flight: assume they were lost and resend from the match index.
            if pr.match_index == pr.heartbeat_match {
                pr.stalled_heartbeats += 1;
            } else {
                pr.stalled_heartbeats = 0;
            }
            if pr.stalled_heartbeats >= 2 {
                pr.become_probe();
            } else if pr.inflights.full(max_msgs, max_bytes) {
                pr.inflights.free_first();
            }
        }
        pr.heartbeat_match = pr.match_index;
        if pr.match_index < last {
            self.send_append(from, true)?;
        }
        if let Some(ctx) = context {
            self.ack_read(from, ctx);
        }
        Ok(())
    }

    /// Sends an append (or a snapshot) to `to` if flow control allows.
    /// Returns true if entries were sent (the caller may loop to pipeline).
    fn send_append(&mut self, to: NodeId, send_if_empty: bool) -> Result<bool, StorageError> {
        let (max_msgs, max_bytes) = (self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes);
        let Some(pr) = self.progress.get(&to) else {
            return Ok(false);
        };
        if pr.is_paused(max_msgs, max_bytes) {
            return Ok(false);
        }
        if pr.wants_snapshot() {
            return self.send_snapshot(to);
        }
        let next = pr.next_index;
        let last = self.log.last_index()?;
        let prev_term = match self.log.term(next - 1) {
            Ok(t) => t,
            Err(StorageError::Compacted) => return self.send_snapshot(to),
            Err(e) => return Err(e),
        };
        let entries = match self
            .log
            .entries(next, last + 1, self.cfg.max_size_per_msg_bytes)
        {
            Ok(e) => e,
            Err(StorageError::Compacted) => return self.send_snapshot(to),
            Err(e) => return Err(e),
        };
        if entries.is_empty() && !send_if_empty {
            return Ok(false);
        }
        let committed = self.log.committed;
        let pr = self.progress.get_mut(&to).expect("checked above");
        let last_sent = next - 1 + entries.len() as u64;
        if let Some(e) = entries.last() {
            match pr.state {
                ProgressState::Replicate => {
                    pr.next_index = e.index + 1;
                    pr.inflights
                        .add(e.index, entries.iter().map(Entry::size_bytes).sum());
                }
                ProgressState::Probe => pr.probe_sent = true,
                ProgressState::Snapshot => unreachable!("paused"),
            }
        } else if pr.state == ProgressState::Probe {
            pr.probe_sent = true;
        }
        pr.sent_commit = pr.sent_commit.max(committed.min(last_sent));
        let sent = !entries.is_empty();
        self.send(
            to,
            MessageBody::Append {
                prev_log_index: next - 1,
                prev_log_term: prev_term,
                entries,
                commit: committed,
            },
        );
        Ok(sent)
    }

    fn send_snapshot(&mut self, to: NodeId) -> Result<bool, StorageError> {
        let pr = &self.progress[&to];
        // A joiner holds nothing, so any snapshot at or after its floor
        // serves; anyone else needs the compacted prefix below `next`.
        let request = if pr.wants_snapshot() {
            pr.snapshot_floor
        } else {
            pr.next_index - 1
        };
        let snapshot = match self.log.storage.snapshot(request) {
            Ok(s) => s,
            Err(StorageError::SnapshotTemporarilyUnavailable) => return Ok(false),
            Err(e) => return Err(e),
        };
        assert!(
            !snapshot.is_empty(),
            "node {} term {}: peer {} needs a snapshot at or after {} but storage has none",
            self.id,
            self.term,
            to,
            request
        );
        self.progress
            .get_mut(&to)
            .expect("caller checked")
            .become_snapshot(snapshot.meta.index);
        self.send(to, MessageBody::Snapshot { snapshot });
        Ok(false)
    }

    /// Leader: sends what accumulated since the last `ready` — new entries
    /// and commit-index advances — to every follower.
    fn flush_broadcast(&mut self) -> Result<(), StorageError> {
        if self.role != Role::Leader {
            return Ok(());
        }
        if self.read_heartbeat_pending {
            self.read_heartbeat_pending = false;
            let context = self.reads.back().map(|r| r.context.clone());
            self.broadcast_heartbeat(context);
        }
        if !self.broadcast_pending {
            return Ok(());
        }
        self.broadcast_pending = false;
        let committed = self.log.committed;
        let peers: Vec<NodeId> = self
            .progress
            .keys()
            .copied()
            .filter(|&p| p != self.id)
            .collect();
        for p in peers {
            let pr = &self.progress[&p];
            let commit_stale = pr.sent_commit < committed.min(pr.match_index);
            let mut first = true;
            while self.send_append(p, first && commit_stale)? {
                first = false;
            }
        }
        Ok(())
    }

    fn broadcast_heartbeat(&mut self, context: Option<Bytes>) {
        let committed = self.log.committed;
        let peers: Vec<(NodeId, Index)> = self
            .progress
            .iter()
            .filter(|(&p, _)| p != self.id)
            .map(|(&p, pr)| (p, pr.match_index))
            .collect();
        for (p, match_index) in peers {
            let commit = committed.min(match_index);
            if let Some(pr) = self.progress.get_mut(&p) {
                pr.sent_commit = pr.sent_commit.max(commit);
            }
            self.send(
                p,
                MessageBody::Heartbeat {
                    commit,
                    context: context.clone(),
                },
            );
        }
    }

    fn send_timeout_now_or_append(&mut self, to: NodeId) -> Result<(), StorageError> {
        let last = self.log.last_index()?;
        if self
            .progress
            .get(&to)
            .is_some_and(|pr| pr.match_index == last)
        {
            self.send(to, MessageBody::TimeoutNow);
        } else {
            self.send_append(to, true)?;
        }
        Ok(())
    }

    /// Commits the highest index a quorum has persisted, if it is of the
    /// current term (§5.4.2: never commit an older term's entry by counting).
    fn maybe_commit(&mut self) -> Result<bool, StorageError> {
        let mut matched: Vec<Index> = self
            .conf
            .voters
            .iter()
            .map(|v| self.progress.get(v).map_or(0, |pr| pr.match_index))
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_index = matched[self.quorum() - 1];
        let advanced = self.log.maybe_commit(quorum_index, self.term)?;
        if advanced {
            self.broadcast_pending = true;
            if !self.reads_waiting_commit.is_empty() && self.committed_in_term()? {
                for ctx in std::mem::take(&mut self.reads_waiting_commit) {
                    self.start_read(ctx);
                }
            }
        }
        Ok(advanced)
    }

    fn committed_in_term(&self) -> Result<bool, StorageError> {
        Ok(self.log.term(self.log.committed)? == self.term)
    }

    fn start_read(&mut self, context: Bytes) {
        let index = self.log.committed;
        if self.quorum() == 1 {
            self.read_states.push(ReadState { index, context });
            return;
        }
        let mut acks = BTreeSet::new();
        acks.insert(self.id);
        self.reads.push_back(ReadRequest {
            context,
            index,
            acks,
        });
        self.read_heartbeat_pending = true;
    }

    fn ack_read(&mut self, from: NodeId, context: Bytes) {
        let quorum = self.quorum();
        let Some(pos) = self.reads.iter().position(|r| r.context == context) else {
            return;
        };
        let voters = &self.conf.voters;
        let req = &mut self.reads[pos];
        req.acks.insert(from);
        if req.acks.iter().filter(|id| voters.contains(id)).count() >= quorum {
            // The quorum answered a heartbeat sent after every earlier
            // request too, so those are confirmed as well.
            for r in self.reads.drain(..=pos) {
                self.read_states.push(ReadState {
                    index: r.index,
                    context: r.context,
                });
            }
        }
    }
}

/// The membership after one change, or why the change is refused. Pure:
/// `leader` is the proposing leader, `matched` the highest index `node` is
/// known to hold, `committed` the leader's commit index.
pub fn next_conf(
    conf: &ConfState,
    kind: ConfChangeKind,
    node: NodeId,
    leader: NodeId,
    matched: Index,
    committed: Index,
) -> Result<ConfState, ConfChangeError> {
    if node == NO_NODE {
        return Err(ConfChangeError::ZeroNode);
    }
    let mut after = conf.clone();
    match kind {
        ConfChangeKind::AddLearner => {
            if conf.contains(node) {
                return Err(ConfChangeError::AlreadyMember(node));
            }
            let count = conf.voters.len() + conf.learners.len() + 1;
            if count > VOTERS_MAX {
                return Err(ConfChangeError::TooManyMembers {
                    count,
                    max: VOTERS_MAX,
                });
            }
            after.learners.push(node);
            after.learners.sort_unstable();
        }
        ConfChangeKind::PromoteLearner => {
            if !conf.learners.contains(&node) {
                return Err(ConfChangeError::NotLearner(node));
            }
            // A learner that has acknowledged nothing is not caught up,
            // however short the log: it may be waiting for its snapshot.
            if matched == 0 || matched.saturating_add(PROMOTE_LAG_ENTRIES_MAX) < committed {
                return Err(ConfChangeError::LearnerBehind {
                    node,
                    matched,
                    committed,
                });
            }
            after.learners.retain(|&l| l != node);
            after.voters.push(node);
            after.voters.sort_unstable();
        }
        ConfChangeKind::Remove => {
            if !conf.contains(node) {
                return Err(ConfChangeError::NotMember(node));
            }
            if node == leader {
                return Err(ConfChangeError::RemoveLeader(node));
            }
            if conf.voters == [node] {
                return Err(ConfChangeError::LastVoter(node));
            }
            after.voters.retain(|&v| v != node);
            after.learners.retain(|&l| l != node);
        }
    }
    Ok(after)
}
