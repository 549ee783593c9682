//! One Raft group on a node: its consensus core, the callers waiting on it
//! (proposals by index, reads by ReadIndex context), and its snapshot
//! bookkeeping.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use shoal_consensus::{Index, NodeId, RawNode, Term};
use shoal_engine::{
    Backend, Command, Engine, GroupId, GroupStorage, Reply, Request, ShardId, ShardRecord,
    ShardStatus,
};
use shoal_net::Responder;

use super::moves::{Entry, RECORD_NONE};
use super::persist::{entry_chunks, request_bytes};
use super::sessions::SessionTracker;
use super::telemetry::{GroupMetrics, RequestTrace};
use super::NodeError;
use crate::protocol::{KvRequest, KvResponse, MemberChange, MemberReply, Response, ShardCommand};

/// Whoever waits for a request's answer: a client RPC (with its trace:
/// latency, outcome, span), or nobody (the leader's own session-expiry
/// proposals).
pub(super) struct Waiter {
    reply: Option<Responder<Response>>,
    trace: Option<RequestTrace>,
}

impl Waiter {
    /// A client waiting on `reply`.
    pub(super) fn client(reply: Responder<Response>, trace: RequestTrace) -> Waiter {
        Waiter {
            reply: Some(reply),
            trace: Some(trace),
        }
    }

    /// Nobody: the answer is dropped.
    pub(super) fn nobody() -> Waiter {
        Waiter {
            reply: None,
            trace: None,
        }
    }

    /// The request's trace span, if a client waits.
    pub(super) fn span(&self) -> Option<&tracing::Span> {
        self.trace.as_ref().map(RequestTrace::span)
    }

    pub(super) fn send(self, response: KvResponse) {
        let outcome = response.outcome();
        if let Some(r) = self.reply {
            // A caller that gave up (deadline) is not an error.
            let _ = r.send(Response::Kv(response));
        }
        if let Some(trace) = self.trace {
            trace.finish(outcome);
        }
    }
}

/// A proposal waiting for its entry to apply.
struct Proposal {
    term: Term,
    responders: Vec<Waiter>,
}

type Waiting = Vec<(KvRequest, Waiter)>;

/// One Raft group on this node.
pub(super) struct Group<B: Backend> {
    pub(super) id: GroupId,
    /// Shards the group serves from its creation, without a config.
    pub(super) static_shards: Vec<ShardId>,
    /// The group's shard records (as of its applied index): which shards
    /// it serves, holds frozen, or gave away, by config number.
    pub(super) records: BTreeMap<ShardId, ShardRecord>,
    /// Sessions of the group's shards, as this node watches them.
    pub(super) sessions: SessionTracker,
    pub(super) raw: RawNode<GroupStorage<B>>,
    /// Writes received this turn, proposed at the start of the round.
    pub(super) queued_writes: Vec<(Request, Waiter)>,
    /// Shard move steps received this turn, one entry each.
    pub(super) queued_shard: Vec<(ShardCommand, Waiter)>,
    /// Membership changes received this turn (the core takes one at a
    /// time; the others are refused as pending).
    pub(super) queued_member: Vec<(MemberChange, Waiter)>,
    /// Reads received this turn, sent as one ReadIndex at the round start.
    pub(super) queued_reads: Waiting,
    /// A backup fence this leader holds (see [`super::backups::Fence`]):
    /// its export's directory and caller wait until the log is applied.
    pub(super) fence: Option<super::backups::Fence<(PathBuf, Responder<Response>)>>,
    /// Proposals by log index.
    proposals: BTreeMap<Index, Proposal>,
    /// Reads waiting for leadership confirmation, by context.
    pub(super) reads_unconfirmed: BTreeMap<Bytes, Waiting>,
    /// Confirmed reads waiting for the applied index to reach theirs.
    pub(super) reads_confirmed: Vec<(Index, Waiting)>,
    /// The leader term the waiters above belong to.
    leader_term: Option<Term>,
    /// The term this node led in as of the last round (waiters or not).
    led_term: Option<Term>,
    /// Index of the latest snapshot taken or installed (0: none).
    pub(super) snapshot_index: Index,
    /// Bytes of its files.
    pub(super) snapshot_bytes: u64,
    /// Received snapshot directories whose files verified, by snapshot
    /// index: when consensus restores a snapshot, its files are the ones
    /// at its index. Keyed by index, not "the latest message", because a
    /// message that consensus then ignores (an older term's) must not
    /// displace one it restores.
    pub(super) verified: BTreeMap<Index, PathBuf>,
    /// Pre-copies of shards this node started as the group's leader (see
    /// [`super::precopy`]), by shard.
    pub(super) precopies: BTreeMap<ShardId, super::precopy::Precopy>,
    /// An export of this group runs off the loop.
    pub(super) exporting: bool,
    /// An installed snapshot has no local export yet (needed to send it on).
    pub(super) export_pending: bool,
    pub(super) snapshots_installed: u64,
    /// Term and vote as last persisted by a synced write: a `Ready` whose
    /// hard state differs from them only in the commit index needs no sync.
    pub(super) durable_term_vote: (Term, NodeId),
    /// The group's metric handles (see [`super::telemetry`]).
    pub(super) metrics: GroupMetrics,
}

impl<B: Backend> Group<B> {
    pub(super) fn new(
        id: GroupId,
        static_shards: Vec<ShardId>,
        records: BTreeMap<ShardId, ShardRecord>,
        raw: RawNode<GroupStorage<B>>,
        snapshot_index: Index,
        snapshot_bytes: u64,
    ) -> Group<B> {
        Group {
            durable_term_vote: (raw.term(), raw.vote()),
            id,
            static_shards,
            records,
            sessions: SessionTracker::default(),
            raw,
            queued_writes: Vec::new(),
            queued_shard: Vec::new(),
            queued_member: Vec::new(),
            fence: None,
            queued_reads: Vec::new(),
            proposals: BTreeMap::new(),
            reads_unconfirmed: BTreeMap::new(),
            reads_confirmed: Vec::new(),
            leader_term: None,
            led_term: None,
            snapshot_index,
            snapshot_bytes,
            verified: BTreeMap::new(),
            precopies: BTreeMap::new(),
            exporting: false,
            export_pending: false,
            snapshots_installed: 0,
            metrics: GroupMetrics::new(id),
        }
    }

    /// The group's record of `shard` ([`RECORD_NONE`] if it has none).
    pub(super) fn record_of(&self, shard: ShardId) -> ShardRecord {
        self.records.get(&shard).copied().unwrap_or(RECORD_NONE)
    }

    /// Whether the group serves `shard`'s requests (as of its applied index).
    pub(super) fn serves(&self, shard: ShardId) -> bool {
        self.static_shards.contains(&shard) || self.record_of(shard).status == ShardStatus::Serving
    }

    /// Whether the group serves every shard `request` reads: its shard,
    /// and for a `Pin` every shard it pins.
    pub(super) fn serves_all(&self, request: &crate::protocol::KvRequest) -> bool {
        self.serves(request.shard)
            && match &request.command {
                crate::protocol::ClientCommand::Pin { shards, .. } => {
                    shards.iter().all(|s| self.serves(*s))
                }
                _ => true,
            }
    }

    /// Every shard the group serves.
    pub(super) fn served_shards(&self) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self
            .records
            .iter()
            .filter(|(_, r)| r.status == ShardStatus::Serving)
            .map(|(s, _)| *s)
            .chain(self.static_shards.iter().copied())
            .collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    pub(super) fn propose_queued(&mut self, next_context: &mut u64) -> Result<(), NodeError> {
        if self.fence.is_some() {
            // Nothing is written behind a backup fence: clients retry.
            for (_, waiter) in self.queued_shard.drain(..) {
                waiter.send(KvResponse::Busy);
            }
            for (_, waiter) in self.queued_member.drain(..) {
                waiter.send(KvResponse::Busy);
            }
            for (_, waiter) in self.queued_writes.drain(..) {
                waiter.send(KvResponse::Busy);
            }
        }
        for (command, waiter) in std::mem::take(&mut self.queued_shard) {
            if self.raw.is_leader() {
                self.propose(Entry::Shard(command), vec![waiter]);
            } else {
                waiter.send(KvResponse::NotLeader {
                    leader_hint: self.raw.leader_id(),
                });
            }
        }
        for (change, waiter) in std::mem::take(&mut self.queued_member) {
            self.propose_member(change, waiter);
        }
        if !self.queued_writes.is_empty() {
            let queued = std::mem::take(&mut self.queued_writes);
            if !self.raw.is_leader() {
                let hint = self.raw.leader_id();
                for (_, r) in queued {
                    r.send(KvResponse::NotLeader { leader_hint: hint });
                }
            } else {
                let sizes: Vec<u64> = queued.iter().map(|(r, _)| request_bytes(r)).collect();
                let mut queued = queued.into_iter();
                for count in entry_chunks(&sizes) {
                    let (requests, responders): (Vec<Request>, Vec<Waiter>) =
                        queued.by_ref().take(count).unzip();
                    self.propose(Entry::Requests(requests), responders);
                }
            }
        }
        if !self.queued_reads.is_empty() {
            let reads = std::mem::take(&mut self.queued_reads);
            if !self.raw.is_leader() {
                let hint = self.raw.leader_id();
                for (_, r) in reads {
                    r.send(KvResponse::NotLeader { leader_hint: hint });
                }
            } else {
                let context = Bytes::copy_from_slice(&next_context.to_be_bytes());
                *next_context += 1;
                match self.raw.read_index(context.clone()) {
                    Ok(()) => {
                        self.leader_term.get_or_insert(self.raw.term());
                        self.reads_unconfirmed.insert(context, reads);
                    }
                    Err(_) => {
                        for (_, r) in reads {
                            r.send(KvResponse::Busy);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn propose_member(&mut self, change: MemberChange, waiter: Waiter) {
        use shoal_consensus::ConfChangeKind;
        let (kind, node, context) = match change {
            MemberChange::AddLearner { node, addr } => {
                (ConfChangeKind::AddLearner, node, Bytes::from(addr))
            }
            MemberChange::Promote { node } => (ConfChangeKind::PromoteLearner, node, Bytes::new()),
            MemberChange::Remove { node } => (ConfChangeKind::Remove, node, Bytes::new()),
        };
        if kind == ConfChangeKind::Remove && node == self.raw.id() {
            // The leader leaves only as a follower: it hands leadership to
            // the voter with the longest log, and the caller, told to
            // retry, finds the new leader, which proposes the removal.
            let voters = self.raw.conf_state().voters.clone();
            let raw = &self.raw;
            let target = super::leaders::handoff_target(node, &voters, |v| {
                raw.progress(v)
                    .filter(|p| p.state == shoal_consensus::ProgressState::Replicate)
                    .map(|p| p.match_index)
            });
            if let Some(to) = target {
                if self.raw.lead_transferee().is_none() {
                    let _ = self.raw.transfer_leader(to);
                }
                waiter.send(KvResponse::Busy);
                return;
            }
        }
        // A retried change that is in force already is done (so retries
        // after a lost answer are harmless); "in force" is the membership
        // the core runs with, which a leader's own log decides.
        let conf = self.raw.conf_state();
        let done = match kind {
            ConfChangeKind::AddLearner => conf.learners.contains(&node),
            ConfChangeKind::PromoteLearner => conf.voters.contains(&node),
            ConfChangeKind::Remove => !conf.contains(node),
        };
        if done && self.raw.conf_state() == self.raw.conf_state_applied() {
            waiter.send(KvResponse::Member(MemberReply::Done {
                voters: conf.voters.clone(),
                learners: conf.learners.clone(),
            }));
            return;
        }
        match self.raw.propose_conf_change(kind, node, context) {
            Ok(index) => {
                self.leader_term.get_or_insert(self.raw.term());
                self.proposals.insert(
                    index,
                    Proposal {
                        term: self.raw.term(),
                        responders: vec![waiter],
                    },
                );
            }
            Err(shoal_consensus::Error::NotLeader { leader_hint }) => {
                waiter.send(KvResponse::NotLeader { leader_hint });
            }
            // Retryable: the earlier change or the learner's catch-up
            // finishes by itself.
            Err(shoal_consensus::Error::ConfChange(
                shoal_consensus::ConfChangeError::Pending { .. }
                | shoal_consensus::ConfChangeError::LearnerBehind { .. },
            )) => waiter.send(KvResponse::Busy),
            Err(shoal_consensus::Error::ConfChange(e)) => {
                waiter.send(KvResponse::Member(MemberReply::Refused {
                    reason: e.to_string(),
                }));
            }
            Err(_) => waiter.send(KvResponse::Busy),
        }
    }

    fn propose(&mut self, entry: Entry, responders: Vec<Waiter>) {
        let data = postcard::to_allocvec(&entry).expect("entries always encode");
        match self.raw.propose(Bytes::from(data)) {
            Ok(index) => {
                self.metrics.proposed();
                for span in responders.iter().filter_map(Waiter::span) {
                    tracing::debug!(parent: span, index, "proposed");
                }
                self.leader_term.get_or_insert(self.raw.term());
                self.proposals.insert(
                    index,
                    Proposal {
                        term: self.raw.term(),
                        responders,
                    },
                );
            }
            Err(e) => {
                self.metrics.proposal_dropped();
                let response = match e {
                    shoal_consensus::Error::NotLeader { leader_hint } => {
                        KvResponse::NotLeader { leader_hint }
                    }
                    _ => KvResponse::Busy,
                };
                for r in responders {
                    r.send(response.clone());
                }
            }
        }
    }

    /// The callers waiting on the entry at (`index`, `term`), if this node
    /// proposed it; callers of a lost proposal at that index (another
    /// term) or below are answered `NotLeader`.
    pub(super) fn take_waiters(&mut self, index: Index, term: Term) -> Option<Vec<Waiter>> {
        while let Some((&first, _)) = self.proposals.first_key_value() {
            if first >= index {
                break;
            }
            let (_, p) = self.proposals.pop_first().expect("non-empty");
            let hint = self.raw.leader_id();
            for r in p.responders {
                r.send(KvResponse::NotLeader { leader_hint: hint });
            }
        }
        let p = self.proposals.remove(&index)?;
        if p.term != term {
            let hint = self.raw.leader_id();
            for r in p.responders {
                r.send(KvResponse::NotLeader { leader_hint: hint });
            }
            return None;
        }
        Some(p.responders)
    }

    /// Answers the callers of the entry at (`index`, `term`), one reply
    /// per request in order.
    pub(super) fn answer_applied(&mut self, index: Index, term: Term, replies: Vec<KvResponse>) {
        let Some(responders) = self.take_waiters(index, term) else {
            return;
        };
        if responders.len() != replies.len() {
            let hint = self.raw.leader_id();
            for r in responders {
                r.send(KvResponse::NotLeader { leader_hint: hint });
            }
            return;
        }
        for (r, reply) in responders.into_iter().zip(replies) {
            r.send(reply);
        }
    }

    /// Serves the confirmed reads whose read index `applied` reached; the
    /// `Pin` reads among them are handed back for the node to start their
    /// holders (see `node::pins`), the shard's ownership checked.
    pub(super) fn serve_reads(&mut self, engine: &Engine<B>, applied: Index) -> Waiting {
        let mut pins = Vec::new();
        if self.reads_confirmed.is_empty() {
            return pins;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_confirmed)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.reads_confirmed = waiting;
        for (_, reads) in ready {
            for (request, responder) in reads {
                if !self.serves_all(&request) {
                    // Frozen or handed over at or before the read index.
                    responder.send(KvResponse::WrongGroup);
                    continue;
                }
                let reply = match &request.command {
                    crate::protocol::ClientCommand::Get { key } => {
                        match engine.get(self.id, request.shard, key) {
                            Ok(Some(v)) => Ok(Reply::Value(v)),
                            Ok(None) => Ok(Reply::NotFound),
                            Err(e) => Err(e),
                        }
                    }
                    crate::protocol::ClientCommand::Scan { start, end, limit } => engine
                        .scan(self.id, request.shard, start, end, *limit)
                        .map(Reply::Pairs),
                    crate::protocol::ClientCommand::Pin { .. } => {
                        pins.push((request, responder));
                        continue;
                    }
                    _ => unreachable!("only reads are queued as reads"),
                };
                responder.send(match reply {
                    Ok(r) => KvResponse::Done(r),
                    Err(e) => KvResponse::Refused {
                        reason: e.to_string(),
                    },
                });
            }
        }
        pins
    }

    /// Whether this node stopped leading (or led in another term) since
    /// the last call; the node then stops the group's snapshot transfers.
    pub(super) fn leadership_ended(&mut self) -> bool {
        let now = self.raw.is_leader().then(|| self.raw.term());
        let ended = self.led_term.is_some() && self.led_term != now;
        self.led_term = now;
        ended
    }

    /// Answers every waiter `NotLeader` once this node is no longer the
    /// leader of the term they were queued in. Returns whether leadership
    /// was lost (so the node stops this group's snapshot transfers).
    pub(super) fn check_leadership(&mut self) -> bool {
        let Some(term) = self.leader_term else {
            return false;
        };
        if self.raw.is_leader() && self.raw.term() == term {
            return false;
        }
        let hint = self.raw.leader_id();
        tracing::debug!(
            group = self.id,
            term,
            leader_hint = hint,
            "leadership lost: waiters answered"
        );
        self.fail_waiters(&|| KvResponse::NotLeader { leader_hint: hint });
        if self.raw.is_leader() {
            self.leader_term = Some(self.raw.term());
        }
        true
    }

    pub(super) fn fail_waiters(&mut self, response: &dyn Fn() -> KvResponse) {
        for (_, r) in self.queued_writes.drain(..) {
            r.send(response());
        }
        for (_, r) in self.queued_reads.drain(..) {
            r.send(response());
        }
        for (_, r) in self.queued_shard.drain(..) {
            r.send(response());
        }
        for (_, r) in self.queued_member.drain(..) {
            r.send(response());
        }
        // A pre-copy serves only the freeze its own node proposes as leader.
        for (_, p) in std::mem::take(&mut self.precopies) {
            for r in p.waiters {
                r.send(response());
            }
        }
        for (_, p) in std::mem::take(&mut self.proposals) {
            for r in p.responders {
                r.send(response());
            }
        }
        for (_, reads) in std::mem::take(&mut self.reads_unconfirmed) {
            for (_, r) in reads {
                r.send(response());
            }
        }
        for (_, reads) in self.reads_confirmed.drain(..) {
            for (_, r) in reads {
                r.send(response());
            }
        }
        self.leader_term = None;
    }
}

/// Decodes an entry; no-ops and config entries are empty requests.
pub(super) fn decode_entry(
    group: GroupId,
    index: Index,
    kind: shoal_consensus::EntryKind,
    data: &Bytes,
) -> Entry {
    if kind != shoal_consensus::EntryKind::Normal || data.is_empty() {
        return Entry::Requests(Vec::new());
    }
    match postcard::from_bytes::<Entry>(data) {
        Ok(entry) => entry,
        // Entries are written only by this runtime and checksummed by the
        // engine: an undecodable one is a bug, and applying around it would
        // make replicas diverge.
        Err(e) => panic!("group {group}: committed entry {index} does not decode as requests: {e}"),
    }
}

/// Whether applying `request` with `reply` leaves its session at the
/// request's sequence number (a write of a session that was not stale).
pub(super) fn updates_session(request: &Request, reply: &Reply) -> bool {
    request.client != 0
        && !matches!(request.command, Command::ExpireSessions { .. })
        && !request.command.is_read_only()
        && !matches!(reply, Reply::Stale)
}
