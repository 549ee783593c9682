//! Interleaving fuzz: drives `RawNode`s directly and, unlike the simulator
//! (which always persists and advances a `Ready` at once), lets steps, ticks,
//! proposals, reads, transfers, crashes and partitions happen between
//! `ready()`, persisting and `advance()`. Checks committed-entry agreement,
//! one leader per term, leader completeness, the persistence contract at
//! every send, that applied entries are persisted locally, read-index
//! linearizability, and finally liveness on a healed network.
//!
//! `SHOAL_INTERLEAVE_SEEDS=<n>` sets the number of seeds (default 200),
//! `SHOAL_SEED=<n>` replays one.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::sim::{run_seed_list, seeds_from_env};
use shoal_consensus::{
    Config, Index, MemStorage, Message, MessageBody, NodeId, RawNode, Ready, Storage, Term,
};

struct Node {
    raft: Option<RawNode<MemStorage>>,
    crashed_storage: Option<MemStorage>,
    /// Taken, not yet persisted.
    taken: Option<Ready>,
    /// Persisted and applied, not yet advanced.
    persisted: Option<Ready>,
    applied: Index,
}

struct World {
    seed: u64,
    rng: ChaCha8Rng,
    n: usize,
    cfg: Config,
    nodes: Vec<Node>,
    net: Vec<Message>,
    committed: BTreeMap<Index, (Term, Bytes)>,
    leaders: HashMap<Term, NodeId>,
    reads: HashMap<Bytes, Index>,
    next_cmd: u64,
    read_seq: u64,
    snapshots: bool,
    lossy: bool,
    /// Partition side of each node; messages cross sides only when healed.
    side: Vec<u8>,
}

impl World {
    fn fail(&self, msg: String) -> ! {
        panic!("{msg}\nreplay with SHOAL_SEED={}", self.seed)
    }

    fn start(&mut self, i: usize, storage: MemStorage) {
        let mut cfg = self.cfg.clone();
        cfg.id = i as NodeId + 1;
        cfg.voters = (1..=self.n as NodeId).collect();
        cfg.seed = self.rng.random();
        let snap = storage.current_snapshot().meta.index;
        // Either the state machine is rebuilt from the snapshot, or it is
        // durable (like the engine's) and keeps what it applied.
        if self.rng.random_bool(0.5) || self.nodes[i].applied < snap {
            self.nodes[i].applied = snap;
        }
        cfg.applied = self.nodes[i].applied;
        self.nodes[i].raft = Some(RawNode::new(cfg, storage).expect("restart"));
    }

    fn send_checked(&mut self, i: usize, m: Message, persisted: bool) {
        let raft = self.nodes[i].raft.as_ref().expect("alive");
        let st = raft.storage();
        let hs = st.hard_state();
        let ok = match &m.body {
            MessageBody::AppendResponse {
                reject: false,
                index,
                ..
            } if *index > 0 => {
                // An ack queued before the node moved to a newer term may
                // go out after a later leader truncated the acked entries:
                // it is stale: only the old term's leader counts it, and a
                // leader lacking those entries was elected since, so no
                // quorum of that old term can hold them (as in etcd).
                persisted
                    && (hs.term > m.term
                        || (hs.term == m.term && st.last_index().is_ok_and(|l| l >= *index)))
            }
            MessageBody::AppendResponse { .. } | MessageBody::HeartbeatResponse { .. } => {
                persisted && hs.term >= m.term
            }
            MessageBody::RequestVoteResponse {
                pre_vote: false,
                granted: true,
            } => persisted && (hs.term > m.term || (hs.term == m.term && hs.vote == m.to)),
            MessageBody::RequestVote {
                pre_vote: false, ..
            } => persisted && (hs.term > m.term || (hs.term == m.term && hs.vote == m.from)),
            _ => true,
        };
        if !ok {
            self.fail(format!(
                "persistence contract: node {} sent {:?} (term {}) with persisted {hs:?}, last {:?}",
                m.from,
                m.body,
                m.term,
                st.last_index()
            ));
        }
        if self.lossy && self.rng.random_range(0..100) < 10 {
            return;
        }
        if self.lossy && self.rng.random_range(0..100) < 5 {
            self.net.push(m.clone());
        }
        self.net.push(m);
    }

    fn check_leaders(&mut self) {
        for i in 0..self.n {
            let Some(r) = self.nodes[i].raft.as_ref() else {
                continue;
            };
            if r.is_leader() {
                let (t, id) = (r.term(), r.id());
                if let Some(&o) = self.leaders.get(&t) {
                    if o != id {
                        self.fail(format!("two leaders in term {t}: {o} and {id}"));
                    }
                }
                if self.leaders.insert(t, id).is_none() {
                    // Leader completeness: it holds every entry applied
                    // anywhere so far.
                    let first = r.storage().first_index().unwrap();
                    for (&idx, (term, _)) in self.committed.range(first..) {
                        if r.term_at(idx).ok() != Some(*term) {
                            self.fail(format!(
                                "leader {id} of term {t} lacks committed index {idx} (term {term})"
                            ));
                        }
                    }
                }
            }
        }
    }

    fn take_ready(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(raft) = node.raft.as_mut() else {
            return;
        };
        if node.taken.is_some() || node.persisted.is_some() || !raft.has_ready() {
            return;
        }
        let mut rd = raft.ready().expect("ready");
        let msgs = std::mem::take(&mut rd.messages);
        self.nodes[i].taken = Some(rd);
        for m in msgs {
            self.send_checked(i, m, false);
        }
    }

    fn persist(&mut self, i: usize) {
        let Some(mut rd) = self.nodes[i].taken.take() else {
            return;
        };
        let id = i as NodeId + 1;
        let raft = self.nodes[i].raft.as_mut().expect("alive");
        raft.storage_mut().persist_ready(&rd).expect("persist");
        for m in std::mem::take(&mut rd.persisted_messages) {
            self.send_checked(i, m, true);
        }
        if let Some(s) = &rd.snapshot {
            let idx = u64::from_le_bytes(s.data[..8].try_into().unwrap());
            if idx != s.meta.index {
                self.fail(format!("snapshot data {idx} != index {}", s.meta.index));
            }
            self.nodes[i].applied = s.meta.index;
        }
        for e in &rd.committed_entries {
            let node = &self.nodes[i];
            if e.index != node.applied + 1 {
                self.fail(format!(
                    "node {id} applied {} after {}",
                    e.index, node.applied
                ));
            }
            let st = node.raft.as_ref().unwrap().storage();
            if st.last_index().unwrap() < e.index || st.term(e.index) != Ok(e.term) {
                self.fail(format!(
                    "node {id} applies {} (term {}) not persisted locally",
                    e.index, e.term
                ));
            }
            match self.committed.get(&e.index) {
                Some((t, d)) if *t != e.term || *d != e.data => self.fail(format!(
                    "node {id} applied index {} term {} but term {t} was applied before",
                    e.index, e.term
                )),
                Some(_) => {}
                None => {
                    self.committed.insert(e.index, (e.term, e.data.clone()));
                }
            }
            self.nodes[i].applied = e.index;
        }
        for rs in &rd.read_states {
            if let Some(&need) = self.reads.get(&rs.context) {
                if rs.index < need {
                    self.fail(format!(
                        "node {id}: read index {} misses commit {need}",
                        rs.index
                    ));
                }
            }
        }
        self.nodes[i].persisted = Some(rd);
    }

    fn advance(&mut self, i: usize) {
        let Some(rd) = self.nodes[i].persisted.take() else {
            return;
        };
        let applied = self.nodes[i].applied;
        let snap = self.snapshots && self.rng.random_range(0..100) < 20;
        let raft = self.nodes[i].raft.as_mut().expect("alive");
        raft.advance(rd).expect("advance");
        if snap && applied > raft.storage().current_snapshot().meta.index {
            let conf = raft.conf_state().clone();
            let st = raft.storage_mut();
            st.create_snapshot(applied, conf, Bytes::from(applied.to_le_bytes().to_vec()))
                .expect("snapshot");
            st.compact(applied).expect("compact");
        }
    }

    fn step(&mut self) {
        let roll = self.rng.random_range(0..100);
        let i = self.rng.random_range(0..self.n);
        if self.rng.random_range(0..1000) < 3 {
            let heal = self.rng.random_bool(0.5);
            for s in self.side.iter_mut() {
                *s = if heal { 0 } else { self.rng.random_range(0..2) };
            }
        }
        if self.nodes[i].raft.is_none() && self.rng.random_range(0..100) < 3 {
            let s = self.nodes[i].crashed_storage.take().expect("crashed");
            self.start(i, s);
        }
        if roll < 35 {
            if self.net.is_empty() {
                return;
            }
            let k = self.rng.random_range(0..self.net.len());
            let m = self.net.swap_remove(k);
            let to = m.to as usize - 1;
            if self.side[to] != self.side[m.from as usize - 1] {
                return;
            }
            if let Some(r) = self.nodes[to].raft.as_mut() {
                r.step(m).expect("step");
            }
        } else if roll < 39 {
            if let Some(r) = self.nodes[i].raft.as_mut() {
                r.tick().expect("tick");
            }
        } else if roll < 50 {
            // Run the whole Ready cycle of one node.
            self.take_ready(i);
            self.persist(i);
            self.advance(i);
        } else if roll < 58 {
            self.next_cmd += 1;
            let cmd = Bytes::from(self.next_cmd.to_le_bytes().to_vec());
            if let Some(r) = self.nodes[i].raft.as_mut() {
                let _ = r.propose(cmd);
            }
        } else if roll < 61 {
            self.read_seq += 1;
            let ctx = Bytes::from(self.read_seq.to_le_bytes().to_vec());
            let need = self
                .nodes
                .iter()
                .filter_map(|n| n.raft.as_ref().map(|r| r.commit_index()))
                .max()
                .unwrap_or(0)
                .max(self.committed.keys().next_back().copied().unwrap_or(0));
            if let Some(r) = self.nodes[i].raft.as_mut() {
                if r.read_index(ctx.clone()).is_ok() {
                    self.reads.insert(ctx, need);
                }
            }
        } else if roll < 75 {
            self.take_ready(i);
        } else if roll < 86 {
            self.persist(i);
        } else if roll < 96 {
            self.advance(i);
        } else if roll < 97 {
            let to = self.rng.random_range(0..self.n) as NodeId + 1;
            if let Some(r) = self.nodes[i].raft.as_mut() {
                let _ = r.transfer_leader(to);
            }
        } else if roll < 98 {
            if let Some(r) = self.nodes[i].raft.as_mut() {
                let peer = self.rng.random_range(0..self.n) as NodeId + 1;
                if self.rng.random_bool(0.5) {
                    r.report_unreachable(peer);
                } else {
                    r.report_snapshot(peer, self.rng.random_bool(0.5));
                }
            }
        } else if self.rng.random_range(0..100) < 20 {
            // Crash, losing what was not persisted.
            let node = &mut self.nodes[i];
            if let Some(r) = node.raft.take() {
                node.taken = None;
                node.persisted = None;
                node.crashed_storage = Some(r.into_storage());
            }
        }
        self.check_leaders();
    }
}

fn run(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = [1, 2, 3, 3, 5][rng.random_range(0..5)];
    let mut cfg = Config::new(1, Vec::new());
    cfg.election_tick = rng.random_range(4..10);
    cfg.heartbeat_tick = 1;
    cfg.pre_vote = rng.random_bool(0.6);
    cfg.check_quorum = rng.random_bool(0.6);
    cfg.max_inflight_msgs = rng.random_range(1..5);
    cfg.max_size_per_msg_bytes = 24 + rng.random_range(0..40);
    cfg.max_inflight_bytes = cfg.max_size_per_msg_bytes * rng.random_range(1..4);
    cfg.max_committed_size_per_ready_bytes = rng.random_range(1..100);
    let snapshots = rng.random_bool(0.5);
    let mut w = World {
        seed,
        rng,
        n,
        cfg,
        nodes: (0..n)
            .map(|_| Node {
                raft: None,
                crashed_storage: None,
                taken: None,
                persisted: None,
                applied: 0,
            })
            .collect(),
        net: Vec::new(),
        committed: BTreeMap::new(),
        leaders: HashMap::new(),
        reads: HashMap::new(),
        next_cmd: 0,
        read_seq: 0,
        snapshots,
        lossy: true,
        side: vec![0; n],
    };
    for i in 0..n {
        w.start(i, MemStorage::with_voters((1..=n as NodeId).collect()));
    }
    for _ in 0..20_000 {
        w.step();
    }
    // Calm phase: everyone up, no loss; a new proposal must reach every
    // node within a bounded number of rounds.
    w.lossy = false;
    w.side = vec![0; n];
    for i in 0..n {
        if w.nodes[i].raft.is_none() {
            let s = w.nodes[i].crashed_storage.take().expect("crashed");
            w.start(i, s);
        }
    }
    let mut target: Option<Index> = None;
    let mut target_term = 0;
    let mut ok = false;
    for _round in 0..400 {
        for i in 0..n {
            w.persist(i);
            w.advance(i);
            for _ in 0..10_000 {
                if !w.nodes[i].raft.as_ref().unwrap().has_ready() {
                    break;
                }
                w.take_ready(i);
                w.persist(i);
                w.advance(i);
            }
            if let Some(r) = w.nodes[i].raft.as_mut() {
                r.tick().expect("tick");
            }
        }
        let msgs = std::mem::take(&mut w.net);
        for m in msgs {
            let to = m.to as usize - 1;
            w.nodes[to].raft.as_mut().unwrap().step(m).expect("step");
        }
        w.check_leaders();
        if target.is_none() {
            for i in 0..n {
                let r = w.nodes[i].raft.as_mut().unwrap();
                if r.is_leader() {
                    if let Ok(idx) = r.propose(Bytes::from_static(b"calm")) {
                        target = Some(idx);
                        target_term = r.term();
                    }
                }
            }
        }
        if let Some(t) = target {
            if w.nodes.iter().all(|nd| nd.applied >= t)
                && w.committed.get(&t).is_some_and(|(_, d)| d == "calm")
            {
                ok = true;
                break;
            }
            // A proposal lost to a leader change is retried.
            if w.nodes.iter().all(|nd| nd.applied >= t)
                || w.nodes
                    .iter()
                    .any(|nd| nd.raft.as_ref().unwrap().term() > target_term)
            {
                target = None;
            }
        }
    }
    if !ok {
        for (i, nd) in w.nodes.iter().enumerate() {
            let r = nd.raft.as_ref().unwrap();
            eprintln!(
                "  node {} {:?} term {} commit {} last {:?} applied {} progress {:?}",
                i + 1,
                r.role(),
                r.term(),
                r.commit_index(),
                r.last_index(),
                nd.applied,
                (1..=n as u64)
                    .map(|p| r
                        .progress(p)
                        .map(|p| (p.match_index, p.next_index, p.state)))
                    .collect::<Vec<_>>()
            );
        }
        w.fail(format!("no progress in the calm phase (target {target:?})"));
    }
    if std::env::var("SHOAL_INTERLEAVE_VERBOSE").is_ok() {
        eprintln!(
            "seed {seed}: n {n} committed {} leaders {} reads {}",
            w.committed.len(),
            w.leaders.len(),
            w.reads.len()
        );
        for (i, nd) in w.nodes.iter().enumerate() {
            if let Some(r) = nd.raft.as_ref() {
                eprintln!(
                    "  node {} {:?} term {} commit {} last {:?} applied {} taken {} persisted {} progress {:?}",
                    i + 1,
                    r.role(),
                    r.term(),
                    r.commit_index(),
                    r.last_index(),
                    nd.applied,
                    nd.taken.is_some(),
                    nd.persisted.is_some(),
                    (1..=n as u64).map(|p| r.progress(p).map(|p| (p.match_index, p.next_index, p.state))).collect::<Vec<_>>()
                );
            } else {
                eprintln!("  node {} crashed", i + 1);
            }
        }
        eprintln!("  net {}", w.net.len());
    }
}

#[test]
fn interleaved_ready_advance_is_safe() {
    run_seed_list(seeds_from_env("SHOAL_INTERLEAVE_SEEDS", 200), run);
}
