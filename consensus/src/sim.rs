//! Deterministic simulation of a Raft group (cargo feature `sim`).
//!
//! One seed drives everything: the network (drops, duplicates, delays,
//! the lab's long reordering), partitions, crashes (which lose everything
//! not persisted) and restarts from persisted state. Time is virtual
//! (milliseconds), so a test simulating minutes runs in milliseconds.
//!
//! After every event the [`Checker`] verifies Raft's safety properties:
//! at most one leader per term, log matching, leader completeness,
//! committed entries never change, every node applies a prefix of one
//! sequence (also across snapshots), terms and persisted commit indexes
//! never move back, and read-index results are linearizable. A violation
//! panics with the seed (`SHOAL_SEED=<n>` replays it).
//!
//! Reuse from another crate's tests: depend on `shoal-consensus` with
//! `features = ["sim"]` and drive a [`Cluster`]. Node `i` (0-based) has id
//! `i + 1`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, DEFAULT_TICK_MS};
use crate::mem_storage::MemStorage;
use crate::message::{Message, MessageBody};
use crate::raw_node::{RawNode, Role};
use crate::storage::Storage;
use crate::types::{ConfChange, ConfChangeKind, ConfState, Entry, EntryKind, Index, NodeId, Term};

/// Network fault rates (per mille) and delays (ms).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetFaults {
    /// Requests dropped, per mille (the lab's unreliable net: 100).
    pub drop_request_per_mille: u32,
    /// Responses dropped, per mille (lab: 100).
    pub drop_response_per_mille: u32,
    /// Messages delivered twice, per mille.
    pub duplicate_per_mille: u32,
    /// Every message is delayed uniformly in `0..=delay_ms_max` (lab: 27).
    pub delay_ms_max: u64,
    /// Responses given a long delay (`200 + rand(0..rand(0..2000))` ms, the
    /// lab's LongReordering), per mille (lab: 667).
    pub long_delay_per_mille: u32,
}

impl NetFaults {
    /// A reliable network: no drops, a little delay.
    pub fn reliable() -> NetFaults {
        NetFaults {
            delay_ms_max: 2,
            ..NetFaults::default()
        }
    }
    /// The lab's unreliable network.
    pub fn unreliable() -> NetFaults {
        NetFaults {
            drop_request_per_mille: 100,
            drop_response_per_mille: 100,
            delay_ms_max: 27,
            ..NetFaults::default()
        }
    }
}

/// Options of a simulated cluster.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Number of nodes (ids `1..=nodes`).
    pub nodes: usize,
    /// How many of them (the first) form the group at the start; the others
    /// start empty, joining ([`Config::join`]), until a membership change
    /// adds them.
    pub voters_initial: usize,
    /// Seed of everything.
    pub seed: u64,
    /// Virtual milliseconds per tick.
    pub tick_ms: u64,
    /// Network faults.
    pub faults: NetFaults,
    /// Snapshot and compact the log every this many applied entries.
    pub snapshot_interval: Option<u64>,
    /// Config template (id, voters, seed and applied are filled in).
    pub config: Config,
}

impl SimOptions {
    /// Defaults: reliable network, default config, no snapshots.
    pub fn new(nodes: usize, seed: u64) -> SimOptions {
        SimOptions {
            nodes,
            voters_initial: nodes,
            seed,
            tick_ms: DEFAULT_TICK_MS,
            faults: NetFaults::reliable(),
            snapshot_interval: None,
            config: Config::new(1, Vec::new()),
        }
    }
}

/// Counters in the lab's sense: a request and its response are one RPC.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Requests sent (responses not counted).
    pub rpcs: u64,
    /// Bytes of every message sent.
    pub bytes: u64,
}

#[derive(Debug)]
enum Event {
    Deliver(Message),
    Tick { node: usize, incarnation: u64 },
}

/// The global record safety is checked against.
#[derive(Debug, Default)]
pub struct Checker {
    seed: u64,
    /// `committed[i - 1]` = (term, data) of the entry committed at index i.
    committed: Vec<(Term, Bytes)>,
    /// `chain[i]` = state-machine hash after applying index i (chain[0] = 0).
    chain: Vec<u64>,
    leaders: HashMap<Term, NodeId>,
    /// (index, term) -> (data hash, previous entry's term): log matching.
    entries: HashMap<(Index, Term), (u64, Term)>,
    /// Read context -> commit index that the read must reflect.
    reads: HashMap<Bytes, Index>,
    /// Reads confirmed.
    pub reads_confirmed: u64,
}

/// How many voters one membership has that the other has not.
fn voters_moved(a: &ConfState, b: &ConfState) -> usize {
    let gone = a.voters.iter().filter(|v| !b.voters.contains(v)).count();
    let came = b.voters.iter().filter(|v| !a.voters.contains(v)).count();
    gone + came
}

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn chain_step(h: u64, index: Index, data: &[u8]) -> u64 {
    fnv(h ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15), data)
}

impl Checker {
    fn fail(&self, msg: String) -> ! {
        panic!(
            "safety violation: {msg}\nreplay with SHOAL_SEED={}",
            self.seed
        )
    }

    /// Highest committed index observed anywhere.
    pub fn committed_len(&self) -> Index {
        self.committed.len() as Index
    }

    /// The committed entry at `index`, if known.
    pub fn committed_at(&self, index: Index) -> Option<&(Term, Bytes)> {
        self.committed.get((index as usize).checked_sub(1)?)
    }

    fn on_leader(&mut self, id: NodeId, term: Term, node: &RawNode<MemStorage>) {
        if let Some(&other) = self.leaders.get(&term) {
            if other != id {
                self.fail(format!("two leaders in term {term}: {other} and {id}"));
            }
        }
        self.leaders.insert(term, id);
        // Leader completeness: every committed entry is in the new leader's log.
        let first = node.storage().first_index().unwrap_or(1);
        for index in first..=self.committed_len() {
            let want = self.committed[index as usize - 1].0;
            match node.term_at(index) {
                Ok(t) if t == want => {}
                got => self.fail(format!(
                    "leader {id} of term {term} lacks committed index {index} (term {want}), has {got:?}"
                )),
            }
        }
    }

    fn on_persist(&mut self, id: NodeId, entries: &[Entry], storage: &MemStorage) {
        for e in entries {
            let Ok(prev_term) = storage.term(e.index - 1) else {
                continue;
            };
            let key = (e.index, e.term);
            let value = (fnv(0xcbf2_9ce4_8422_2325, &e.data), prev_term);
            match self.entries.get(&key) {
                Some(v) if *v != value => self.fail(format!(
                    "log matching: node {id} has a different entry or predecessor at index {} term {}",
                    e.index, e.term
                )),
                Some(_) => {}
                None => {
                    self.entries.insert(key, value);
                }
            }
        }
    }

    fn on_apply(&mut self, id: NodeId, e: &Entry, sm: &mut StateMachine) {
        if e.index != sm.applied + 1 {
            self.fail(format!(
                "node {id} applied index {} after {}",
                e.index, sm.applied
            ));
        }
        sm.hash = chain_step(sm.hash, e.index, &e.data);
        sm.applied = e.index;
        let pos = e.index as usize - 1;
        if pos < self.committed.len() {
            let (t, d) = &self.committed[pos];
            if *t != e.term || *d != e.data {
                self.fail(format!(
                    "committed entry changed: node {id} applied index {} term {} but term {} was applied before",
                    e.index, e.term, t
                ));
            }
            if self.chain[e.index as usize] != sm.hash {
                self.fail(format!(
                    "node {id}: applied sequence diverges at index {}",
                    e.index
                ));
            }
        } else if pos == self.committed.len() {
            self.committed.push((e.term, e.data.clone()));
            self.chain.push(sm.hash);
        } else {
            self.fail(format!(
                "node {id} applied index {} beyond the known prefix",
                e.index
            ));
        }
    }

    fn on_restore(&mut self, id: NodeId, index: Index, hash: u64) {
        if self.chain.get(index as usize) != Some(&hash) {
            self.fail(format!(
                "node {id}: snapshot at {index} does not match the applied sequence"
            ));
        }
    }
}

/// A simulated state machine: the index applied and a hash chain of the
/// applied payloads (what a snapshot stores).
#[derive(Clone, Debug, Default)]
pub struct StateMachine {
    /// Last applied index.
    pub applied: Index,
    /// Hash chain over applied entries.
    pub hash: u64,
}

impl StateMachine {
    fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.applied.to_le_bytes());
        v.extend_from_slice(&self.hash.to_le_bytes());
        Bytes::from(v)
    }
    fn decode(data: &[u8]) -> StateMachine {
        if data.len() < 16 {
            return StateMachine::default();
        }
        StateMachine {
            applied: u64::from_le_bytes(data[0..8].try_into().expect("8 bytes")),
            hash: u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// One simulated node.
pub struct SimNode {
    /// The running Raft node, or `None` while crashed.
    pub raft: Option<RawNode<MemStorage>>,
    /// Persisted state while crashed.
    storage: Option<MemStorage>,
    /// State machine (volatile: rebuilt from the snapshot on restart).
    pub sm: StateMachine,
    /// What the tester saw this node apply (survives crashes, like the
    /// lab's `logs[i]`).
    pub applied_log: BTreeMap<Index, Bytes>,
    incarnation: u64,
    /// Highest persisted commit index seen.
    persisted_commit: Index,
    /// Highest persisted term seen.
    persisted_term: Term,
    /// Vote persisted in `persisted_term`.
    persisted_vote: NodeId,
    /// Highest in-memory commit index seen in this incarnation.
    commit_seen: Index,
    /// The membership as of the applied index, replayed by the simulator
    /// to check that every change moves one member.
    conf_applied: ConfState,
}

/// A simulated cluster.
pub struct Cluster {
    /// Options it was built with.
    pub opts: SimOptions,
    /// Virtual time in ms.
    pub now_ms: u64,
    /// Network fault rates (may be changed at any time).
    pub faults: NetFaults,
    /// Lab-style counters.
    pub stats: Stats,
    /// The safety checker.
    pub checker: Checker,
    /// Probability (per mille) that a node crashes after taking a `Ready`
    /// and sending its immediate messages but before persisting it.
    pub crash_before_persist_per_mille: u32,
    /// Nodes, index `i` has id `i + 1`.
    pub nodes: Vec<SimNode>,
    connected: Vec<bool>,
    side: Vec<u8>,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_seq: u64,
    read_seq: u64,
}

impl Cluster {
    /// Builds and starts a cluster.
    pub fn new(opts: SimOptions) -> Cluster {
        let n = opts.nodes;
        let mut c = Cluster {
            now_ms: 0,
            faults: opts.faults.clone(),
            stats: Stats::default(),
            checker: Checker {
                seed: opts.seed,
                chain: vec![0],
                ..Checker::default()
            },
            crash_before_persist_per_mille: 0,
            nodes: Vec::new(),
            connected: vec![true; n],
            side: vec![0; n],
            rng: ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5eed_5eed),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_seq: 0,
            read_seq: 0,
            opts,
        };
        let voters: Vec<NodeId> = (1..=c.opts.voters_initial as NodeId).collect();
        for _ in 0..n {
            let storage = if c.nodes.len() < c.opts.voters_initial {
                MemStorage::with_voters(voters.clone())
            } else {
                MemStorage::new()
            };
            c.nodes.push(SimNode {
                raft: None,
                storage: Some(storage),
                sm: StateMachine::default(),
                applied_log: BTreeMap::new(),
                incarnation: 0,
                persisted_commit: 0,
                persisted_term: 0,
                persisted_vote: 0,
                commit_seen: 0,
                conf_applied: ConfState::default(),
            });
        }
        for i in 0..n {
            c.start(i);
        }
        c
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false (a cluster has nodes); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.opts.seed
    }

    /// Random number from the cluster's generator (for tests' choices).
    pub fn rand(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.rng.random_range(range)
    }

    fn schedule(&mut self, at: u64, e: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Reverse((at, seq)));
        self.events.insert(seq, e);
    }

    fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let storage = node.storage.take().expect("starting a running node");
        node.incarnation += 1;
        let snap = storage.current_snapshot().clone();
        node.sm = if snap.is_empty() {
            StateMachine::default()
        } else {
            StateMachine::decode(&snap.data)
        };
        let mut cfg = self.opts.config.clone();
        cfg.id = i as NodeId + 1;
        cfg.join = i >= self.opts.voters_initial;
        cfg.voters = if cfg.join {
            Vec::new()
        } else {
            (1..=self.opts.voters_initial as NodeId).collect()
        };
        cfg.seed = self
            .opts
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(cfg.id * 7919 + node.incarnation);
        cfg.applied = node.sm.applied;
        let raft = RawNode::new(cfg, storage).unwrap_or_else(|e| {
            panic!(
                "node {} failed to restart: {e}\nreplay with SHOAL_SEED={}",
                i + 1,
                self.opts.seed
            )
        });
        node.commit_seen = raft.commit_index();
        node.conf_applied = raft.conf_state_applied().clone();
        node.raft = Some(raft);
        if !snap.is_empty() {
            let (idx, hash) = (self.nodes[i].sm.applied, self.nodes[i].sm.hash);
            self.checker.on_restore(i as NodeId + 1, idx, hash);
            self.fill_applied_log(i, idx);
        }
        let incarnation = self.nodes[i].incarnation;
        let phase = self.rng.random_range(1..=self.opts.tick_ms);
        self.schedule(
            self.now_ms + phase,
            Event::Tick {
                node: i,
                incarnation,
            },
        );
    }

    fn fill_applied_log(&mut self, i: usize, upto: Index) {
        for index in 1..=upto {
            if let Some((_, d)) = self.checker.committed_at(index) {
                self.nodes[i]
                    .applied_log
                    .entry(index)
                    .or_insert_with(|| d.clone());
            }
        }
    }

    /// True if node `i` is running.
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].raft.is_some()
    }

    /// True if node `i` is connected (lab's `connected[i]`).
    pub fn is_connected(&self, i: usize) -> bool {
        self.connected[i]
    }

    fn link(&self, a: usize, b: usize) -> bool {
        self.connected[a] && self.connected[b] && self.side[a] == self.side[b]
    }

    /// Cuts every link of node `i`.
    pub fn disconnect(&mut self, i: usize) {
        self.connected[i] = false;
    }

    /// Restores node `i`'s links (to connected nodes on its side).
    pub fn connect(&mut self, i: usize) {
        self.connected[i] = true;
    }

    /// Assigns each node a partition side; links exist only within a side.
    pub fn partition(&mut self, sides: &[u8]) {
        self.side.copy_from_slice(sides);
    }

    /// Removes partitions and connects everyone.
    pub fn heal(&mut self) {
        self.side.iter_mut().for_each(|s| *s = 0);
        self.connected.iter_mut().for_each(|c| *c = true);
    }

    /// Crashes node `i`: everything not persisted is lost, and it is
    /// disconnected (as the lab's `ShutdownServer`).
    pub fn crash(&mut self, i: usize) {
        if let Some(raft) = self.nodes[i].raft.take() {
            self.nodes[i].storage = Some(raft.into_storage());
        }
        self.connected[i] = false;
    }

    /// Restarts a crashed node from its persisted state (not connecting
    /// it; call [`connect`](Self::connect)).
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].raft.is_none() {
            self.start(i);
        }
    }

    /// The running Raft node `i`.
    pub fn raft(&self, i: usize) -> Option<&RawNode<MemStorage>> {
        self.nodes[i].raft.as_ref()
    }

    /// Lab's `Start`: proposes on node `i`; `(index, term)` if it leads.
    pub fn propose(&mut self, i: usize, data: Bytes) -> Option<(Index, Term)> {
        let raft = self.nodes[i].raft.as_mut()?;
        let term = raft.term();
        let index = raft.propose(data).ok()?;
        self.process(i);
        Some((index, term))
    }

    /// Issues a read-index request on node `i`; returns its context.
    pub fn read_index(&mut self, i: usize) -> Option<Bytes> {
        self.read_seq += 1;
        let ctx = Bytes::from(self.read_seq.to_le_bytes().to_vec());
        let raft = self.nodes[i].raft.as_mut()?;
        raft.read_index(ctx.clone()).ok()?;
        // The read must reflect everything committed before it started.
        let max_commit = self
            .nodes
            .iter()
            .filter_map(|n| n.raft.as_ref().map(|r| r.commit_index()))
            .max()
            .unwrap_or(0)
            .max(self.checker.committed_len());
        self.checker.reads.insert(ctx.clone(), max_commit);
        self.process(i);
        Some(ctx)
    }

    /// Proposes a membership change of node `node` (0-based) at node `i`;
    /// the result of [`RawNode::propose_conf_change`].
    pub fn propose_conf_change(
        &mut self,
        i: usize,
        kind: ConfChangeKind,
        node: usize,
    ) -> Option<Result<Index, crate::Error>> {
        let raft = self.nodes[i].raft.as_mut()?;
        let r = raft.propose_conf_change(kind, node as NodeId + 1, Bytes::new());
        self.process(i);
        Some(r)
    }

    /// The membership node `i` runs with (None while it is down).
    pub fn conf_state(&self, i: usize) -> Option<&ConfState> {
        self.raft(i).map(|r| r.conf_state())
    }

    /// The term of the entry at `index` in node `i`'s persisted log (alive
    /// or crashed); an index covered by its snapshot counts as held (0).
    fn persisted_term(&self, i: usize, index: Index) -> Option<Term> {
        let node = &self.nodes[i];
        let st = match (&node.raft, &node.storage) {
            (Some(r), _) => r.storage(),
            (None, Some(s)) => s,
            (None, None) => return None,
        };
        let snap = &st.current_snapshot().meta;
        if index <= snap.index {
            return Some(0);
        }
        st.term(index).ok()
    }

    /// A leader's commit index must be held by a majority of the voters of
    /// the membership it runs with.
    fn check_commit_quorum(&self, i: usize) {
        let Some(raft) = self.raft(i) else { return };
        let commit = raft.commit_index();
        if !raft.is_leader() || commit <= self.nodes[i].commit_seen {
            return;
        }
        let Ok(term) = raft.term_at(commit) else {
            return;
        };
        let voters = &raft.conf_state().voters;
        let holding = voters
            .iter()
            .filter(|&&v| {
                self.persisted_term(v as usize - 1, commit)
                    .is_some_and(|t| t == term || t == 0)
            })
            .count();
        if holding < voters.len() / 2 + 1 {
            self.checker.fail(format!(
                "node {} committed index {commit} held by only {holding} of its voters {voters:?}",
                i + 1
            ));
        }
    }

    /// Asks node `i` to transfer leadership to node `to` (0-based).
    pub fn transfer_leader(&mut self, i: usize, to: usize) -> bool {
        let Some(raft) = self.nodes[i].raft.as_mut() else {
            return false;
        };
        let ok = raft.transfer_leader(to as NodeId + 1).is_ok();
        self.process(i);
        ok
    }

    /// Drains node `i`'s `Ready`s: persist, send, apply, check.
    fn process(&mut self, i: usize) {
        let id = i as NodeId + 1;
        loop {
            let Some(raft) = self.nodes[i].raft.as_mut() else {
                return;
            };
            if !raft.has_ready() {
                break;
            }
            let ready = raft.ready().expect("ready");
            if let Some(ss) = ready.soft_state {
                if ss.role == Role::Leader {
                    let raft = self.nodes[i].raft.as_ref().expect("alive");
                    let term = raft.term();
                    self.checker.on_leader(id, term, raft);
                }
            }
            for m in &ready.messages {
                self.check_send_contract(i, m);
                self.send(m.clone());
            }
            let p = self.crash_before_persist_per_mille;
            if p > 0 && self.rng.random_range(0..1000) < p {
                drop(ready);
                self.crash(i);
                return;
            }
            self.check_commit_quorum(i);
            let raft = self.nodes[i].raft.as_mut().expect("alive");
            let commit = raft.commit_index();
            let node = &mut self.nodes[i];
            if commit < node.commit_seen {
                self.checker.fail(format!(
                    "node {id}: commit index moved back from {} to {commit}",
                    node.commit_seen
                ));
            }
            node.commit_seen = commit;
            let raft = node.raft.as_mut().expect("alive");
            raft.storage_mut().persist_ready(&ready).expect("persist");
            let hs = raft.storage().hard_state();
            if hs.commit < node.persisted_commit || hs.term < node.persisted_term {
                let msg = format!("node {id}: persisted hard state moved back: {hs:?}");
                self.checker.fail(msg);
            }
            if hs.term == node.persisted_term
                && node.persisted_vote != 0
                && hs.vote != node.persisted_vote
            {
                let msg = format!(
                    "node {id}: changed its vote in term {} from {} to {}",
                    hs.term, node.persisted_vote, hs.vote
                );
                self.checker.fail(msg);
            }
            node.persisted_vote = hs.vote;
            node.persisted_commit = hs.commit;
            node.persisted_term = hs.term;
            self.checker.on_persist(
                id,
                &ready.entries,
                node.raft.as_ref().expect("alive").storage(),
            );
            for m in &ready.persisted_messages {
                self.check_send_contract(i, m);
                self.send(m.clone());
            }
            let node = &mut self.nodes[i];
            if let Some(snap) = &ready.snapshot {
                let sm = StateMachine::decode(&snap.data);
                self.checker.on_restore(id, snap.meta.index, sm.hash);
                node.sm = sm;
                node.conf_applied = snap.meta.conf_state.clone();
                let idx = node.sm.applied;
                self.fill_applied_log(i, idx);
            }
            let node = &mut self.nodes[i];
            let joiner = i >= self.opts.voters_initial;
            for e in &ready.committed_entries {
                if joiner && node.sm.applied == 0 {
                    // A member that joined with nothing starts from a
                    // snapshot taken once it was a member, never by
                    // replaying entries proposed before it was one.
                    self.checker.fail(format!(
                        "node {id}: joined with nothing but applies entry {} before any snapshot",
                        e.index
                    ));
                }
                self.checker.on_apply(id, e, &mut node.sm);
                node.applied_log.insert(e.index, e.data.clone());
                if e.kind == EntryKind::ConfigChange {
                    let change = ConfChange::decode(&e.data).unwrap_or_else(|err| {
                        self.checker
                            .fail(format!("node {id}: entry {}: {err}", e.index))
                    });
                    let before = &node.conf_applied;
                    if !before.voters.is_empty() && voters_moved(before, &change.conf_after) > 1 {
                        self.checker.fail(format!(
                            "node {id}: change at {} moves more than one voter: {before:?} -> {:?}",
                            e.index, change.conf_after
                        ));
                    }
                    node.conf_applied = change.conf_after;
                }
            }
            for rs in &ready.read_states {
                self.checker.reads_confirmed += 1;
                if let Some(&need) = self.checker.reads.get(&rs.context) {
                    if rs.index < need {
                        self.checker.fail(format!(
                            "node {id}: read index {} misses commit {need} that preceded the read",
                            rs.index
                        ));
                    }
                }
            }
            let node = &mut self.nodes[i];
            let raft = node.raft.as_mut().expect("alive");
            raft.advance(ready).expect("advance");
            if raft.conf_state_applied() != &node.conf_applied {
                self.checker.fail(format!(
                    "node {id}: core's applied membership {:?} differs from the applied log's {:?}",
                    raft.conf_state_applied(),
                    node.conf_applied
                ));
            }
            let snap_index = raft.storage().current_snapshot().meta.index;
            // A joining member waits for a snapshot at or after `floor`.
            let wanted = raft
                .snapshot_wanted()
                .is_some_and(|floor| snap_index < floor && floor <= node.sm.applied);
            let due = self
                .opts
                .snapshot_interval
                .is_some_and(|interval| node.sm.applied >= snap_index + interval);
            if wanted || due {
                let data = node.sm.encode();
                let applied = node.sm.applied;
                let conf = raft.conf_state_applied().clone();
                let st = raft.storage_mut();
                st.create_snapshot(applied, conf, data).expect("snapshot");
                st.compact(applied).expect("compact");
            }
        }
    }

    /// The persistence contract, checked at the moment a message leaves:
    /// what it promises must already be durable on the sender.
    fn check_send_contract(&self, i: usize, m: &Message) {
        let Some(raft) = self.nodes[i].raft.as_ref() else {
            return;
        };
        let st = raft.storage();
        let hs = st.hard_state();
        let ok = match &m.body {
            MessageBody::AppendResponse {
                reject: false,
                index,
                ..
            } if *index > 0 => hs.term >= m.term && st.last_index().is_ok_and(|l| l >= *index),
            MessageBody::AppendResponse { .. } | MessageBody::HeartbeatResponse { .. } => {
                hs.term >= m.term
            }
            MessageBody::RequestVoteResponse {
                pre_vote: false,
                granted: true,
            } => hs.term == m.term && hs.vote == m.to,
            MessageBody::RequestVote {
                pre_vote: false, ..
            } => hs.term == m.term && hs.vote == m.from,
            _ => true,
        };
        if !ok {
            self.checker.fail(format!(
                "persistence contract: node {} sent {:?} before persisting what it promises (persisted {hs:?}, last {:?})",
                m.from,
                m.body,
                st.last_index()
            ));
        }
    }

    fn send(&mut self, m: Message) {
        let (from, to) = (m.from as usize - 1, m.to as usize - 1);
        let response = m.body.is_response();
        if !response {
            self.stats.rpcs += 1;
        }
        self.stats.bytes += m.size_bytes();
        if !self.link(from, to) {
            return;
        }
        let f = &self.faults;
        let drop = if response {
            f.drop_response_per_mille
        } else {
            f.drop_request_per_mille
        };
        let (dup, delay_max, long) = (
            f.duplicate_per_mille,
            f.delay_ms_max,
            f.long_delay_per_mille,
        );
        if drop > 0 && self.rng.random_range(0..1000) < drop {
            return;
        }
        let copies = if dup > 0 && self.rng.random_range(0..1000) < dup {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = if delay_max > 0 {
                self.rng.random_range(0..=delay_max)
            } else {
                0
            };
            if response && long > 0 && self.rng.random_range(0..1000) < long {
                let inner = self.rng.random_range(0..2000u64);
                delay += 200
                    + if inner > 0 {
                        self.rng.random_range(0..inner)
                    } else {
                        0
                    };
            }
            self.schedule(self.now_ms + delay, Event::Deliver(m.clone()));
        }
    }

    /// Runs events up to `now + ms`.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now_ms = at;
            let e = self.events.remove(&seq).expect("event");
            self.handle(e);
        }
        self.now_ms = until;
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].raft.is_none() {
                    return;
                }
                self.nodes[node]
                    .raft
                    .as_mut()
                    .expect("alive")
                    .tick()
                    .expect("tick");
                self.process(node);
                let at = self.now_ms + self.opts.tick_ms;
                self.schedule(at, Event::Tick { node, incarnation });
            }
            Event::Deliver(m) => {
                let (from, to) = (m.from as usize - 1, m.to as usize - 1);
                if !self.link(from, to) {
                    return;
                }
                let Some(raft) = self.nodes[to].raft.as_mut() else {
                    return;
                };
                raft.step(m).expect("step");
                self.process(to);
            }
        }
    }

    // ----- lab-style checks -----

    /// Leaders among connected, running nodes: `(index, term)`.
    pub fn leaders(&self) -> Vec<(usize, Term)> {
        (0..self.len())
            .filter(|&i| self.connected[i])
            .filter_map(|i| {
                self.raft(i)
                    .filter(|r| r.is_leader())
                    .map(|r| (i, r.term()))
            })
            .collect()
    }

    /// Lab's `checkOneLeader`: up to 10 rounds of 450–550 ms; fails on two
    /// connected leaders in one term; returns the leader of the highest term.
    pub fn check_one_leader(&mut self) -> usize {
        for _ in 0..10 {
            let ms = self.rand(450..551);
            self.run_for(ms);
            let mut by_term: BTreeMap<Term, Vec<usize>> = BTreeMap::new();
            for (i, t) in self.leaders() {
                by_term.entry(t).or_default().push(i);
            }
            for (t, ls) in &by_term {
                assert!(
                    ls.len() <= 1,
                    "term {t} has {} leaders (seed {})",
                    ls.len(),
                    self.seed()
                );
            }
            if let Some((_, ls)) = by_term.iter().next_back() {
                return ls[0];
            }
        }
        panic!("expected one leader, got none (SHOAL_SEED={})", self.seed())
    }

    /// Lab's `checkNoLeader`.
    pub fn check_no_leader(&self) {
        assert!(
            self.leaders().is_empty(),
            "expected no leader (SHOAL_SEED={})",
            self.seed()
        );
    }

    /// Lab's `checkTerms`: connected nodes agree on a term.
    pub fn check_terms(&self) -> Term {
        let mut term = 0;
        for i in 0..self.len() {
            if !self.connected[i] {
                continue;
            }
            if let Some(r) = self.raft(i) {
                if term == 0 {
                    term = r.term();
                } else {
                    assert_eq!(
                        term,
                        r.term(),
                        "servers disagree on term (SHOAL_SEED={})",
                        self.seed()
                    );
                }
            }
        }
        term
    }

    /// Lab's `nCommitted`: how many nodes applied `index`, and its value.
    pub fn n_committed(&self, index: Index) -> (usize, Option<Bytes>) {
        let mut count = 0;
        let mut value: Option<Bytes> = None;
        for n in &self.nodes {
            if let Some(d) = n.applied_log.get(&index) {
                if let Some(v) = &value {
                    assert_eq!(
                        v,
                        d,
                        "committed values differ at {index} (SHOAL_SEED={})",
                        self.seed()
                    );
                }
                value = Some(d.clone());
                count += 1;
            }
        }
        (count, value)
    }

    /// Lab's `one(cmd, n, retry)`: for 10 s, offers `cmd` to connected
    /// nodes in rotation; after one accepts, waits 2 s for `n` nodes to
    /// apply it at its index. Returns the index, or `None` on failure.
    pub fn one(&mut self, cmd: Bytes, expected: usize, retry: bool) -> Option<Index> {
        let start = self.now_ms;
        let mut starts = 0;
        while self.now_ms < start + 10_000 {
            let mut index = None;
            for _ in 0..self.len() {
                starts = (starts + 1) % self.len();
                if self.connected[starts] {
                    if let Some((i, _)) = self.propose(starts, cmd.clone()) {
                        index = Some(i);
                        break;
                    }
                }
            }
            if let Some(index) = index {
                let t1 = self.now_ms;
                while self.now_ms < t1 + 2000 {
                    let (nd, v) = self.n_committed(index);
                    if nd >= expected && v.as_ref() == Some(&cmd) {
                        return Some(index);
                    }
                    self.run_for(20);
                }
                if !retry {
                    return None;
                }
            } else {
                self.run_for(50);
            }
        }
        None
    }

    /// Lab's `wait(index, n, term)`: waits (about 1.3 s) for `n` nodes to
    /// apply `index`; `None` if a node's term passes `term` first.
    pub fn wait(&mut self, index: Index, n: usize, term: Option<Term>) -> Option<Bytes> {
        let mut to = 10;
        for _ in 0..30 {
            let (nd, _) = self.n_committed(index);
            if nd >= n {
                break;
            }
            self.run_for(to);
            if to < 1000 {
                to *= 2;
            }
            if let Some(t) = term {
                if self
                    .nodes
                    .iter()
                    .filter_map(|n| n.raft.as_ref())
                    .any(|r| r.term() > t)
                {
                    return None;
                }
            }
        }
        let (nd, v) = self.n_committed(index);
        assert!(
            nd >= n,
            "only {nd} decided for index {index}; wanted {n} (SHOAL_SEED={})",
            self.seed()
        );
        v
    }

    /// The lab's command index of the entry at raft `index` in node `i`'s
    /// log: leaders' no-op entries (empty payloads) are not counted.
    pub fn command_index(&self, i: usize, index: Index) -> Index {
        let Some(raft) = self.raft(i) else { return 0 };
        let first = raft.storage().first_index().unwrap_or(1);
        let mut n = 0;
        for j in 1..first.min(index + 1) {
            if self
                .checker
                .committed_at(j)
                .is_some_and(|(_, d)| !d.is_empty())
            {
                n += 1;
            }
        }
        if index >= first {
            let entries = raft.entries(first, index + 1, u64::MAX).expect("entries");
            n += entries.iter().filter(|e| !e.data.is_empty()).count() as Index;
        }
        n
    }

    /// A one-line-per-node description, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = format!("t={}ms seed={}\n", self.now_ms, self.seed());
        for i in 0..self.len() {
            match self.raft(i) {
                None => out += &format!("  node {}: crashed\n", i + 1),
                Some(r) => {
                    out += &format!(
                        "  node {}: {:?} term {} leader {} commit {} applied {} last {} first {} connected {}\n",
                        i + 1,
                        r.role(),
                        r.term(),
                        r.leader_id(),
                        r.commit_index(),
                        self.nodes[i].sm.applied,
                        r.last_index().unwrap_or(0),
                        r.storage().first_index().unwrap_or(0),
                        self.connected[i]
                    );
                    if r.is_leader() {
                        for p in 1..=self.len() as NodeId {
                            if let Some(pr) = r.progress(p) {
                                out += &format!(
                                    "      peer {p}: match {} next {} {:?} inflight {}\n",
                                    pr.match_index,
                                    pr.next_index,
                                    pr.state,
                                    pr.inflight_msgs()
                                );
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Largest persisted Raft state over running and crashed nodes
    /// (the lab's `LogSize`).
    pub fn log_size_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| match (&n.raft, &n.storage) {
                (Some(r), _) => r.storage().raft_state_size_bytes(),
                (None, Some(s)) => s.raft_state_size_bytes(),
                (None, None) => 0,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Seed list for randomized tests: `SHOAL_SEED=<n>` runs that one seed,
/// otherwise `SHOAL_SIM_SEEDS` (default `default_count`) seeds starting at
/// `SHOAL_SEED_BASE` (default 0).
pub fn seeds(default_count: u64) -> Vec<u64> {
    seeds_from_env("SHOAL_SIM_SEEDS", default_count)
}

/// Like [`seeds`], with the count read from the environment variable
/// `count_var` (so scenario tests can scale apart from the swarm soak).
pub fn seeds_from_env(count_var: &str, default_count: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("SHOAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let count = std::env::var(count_var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_count);
    let base: u64 = std::env::var("SHOAL_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (base..base + count).collect()
}

/// Runs `f(seed)` for every seed of [`seeds`], printing `SHOAL_SEED=<n>`
/// for a failure before propagating the panic.
pub fn run_seeds(default_count: u64, f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    run_seed_list(seeds(default_count), f)
}

/// Runs `f(seed)` for every seed in `list`, printing `SHOAL_SEED=<n>` for a
/// failure before propagating the panic.
pub fn run_seed_list(list: Vec<u64>, f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    for seed in list {
        if let Err(e) = std::panic::catch_unwind(|| f(seed)) {
            eprintln!("failed: SHOAL_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}
