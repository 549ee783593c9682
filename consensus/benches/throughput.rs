//! Throughput of the core: entries committed per second by a 3-node
//! in-memory group with no faults (proposal batches of 1 and 64), and the
//! cost of one `step` of an append message on a follower.
//!
//! The group is driven directly (no simulator): every `Ready` is persisted
//! into `MemStorage`, its messages delivered at once, committed entries
//! counted. Logs are compacted every `COMPACT_EVERY` entries so memory
//! stays flat.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shoal_consensus::{Config, Entry, MemStorage, Message, MessageBody, RawNode};

const COMPACT_EVERY: u64 = 100_000;
const PAYLOAD_BYTES: usize = 64;

struct Group {
    nodes: Vec<RawNode<MemStorage>>,
    queue: VecDeque<Message>,
}

impl Group {
    fn new() -> Group {
        let nodes = (1..=3u64)
            .map(|id| {
                let mut c = Config::new(id, vec![1, 2, 3]);
                c.max_inflight_msgs = 4096;
                c.max_inflight_bytes = 1 << 30;
                RawNode::new(c, MemStorage::new()).unwrap()
            })
            .collect();
        let mut g = Group {
            nodes,
            queue: VecDeque::new(),
        };
        while !g.nodes[0].is_leader() {
            g.nodes[0].tick().unwrap();
            g.pump();
        }
        g.pump();
        g
    }

    fn handle_ready(&mut self, i: usize) -> u64 {
        let mut applied = 0;
        let n = &mut self.nodes[i];
        while n.has_ready() {
            let rd = n.ready().unwrap();
            n.storage_mut().persist_ready(&rd).unwrap();
            self.queue.extend(rd.messages.iter().cloned());
            self.queue.extend(rd.persisted_messages.iter().cloned());
            applied += rd.committed_entries.len() as u64;
            let last_applied = rd.committed_entries.last().map(|e| e.index);
            n.advance(rd).unwrap();
            if let Some(a) = last_applied {
                let snap = n.storage().current_snapshot().meta.index;
                if a >= snap + COMPACT_EVERY {
                    let conf = n.conf_state().clone();
                    let st = n.storage_mut();
                    st.create_snapshot(a, conf, Bytes::new()).unwrap();
                    st.compact(a).unwrap();
                }
            }
        }
        applied
    }

    /// Runs until quiet; returns entries applied by the leader.
    fn pump(&mut self) -> u64 {
        let mut leader_applied = 0;
        loop {
            for i in 0..3 {
                let a = self.handle_ready(i);
                if i == 0 {
                    leader_applied += a;
                }
            }
            if self.queue.is_empty() {
                return leader_applied;
            }
            while let Some(m) = self.queue.pop_front() {
                let to = m.to as usize - 1;
                self.nodes[to].step(m).unwrap();
            }
        }
    }
}

fn commit_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("commit_3_nodes");
    group.measurement_time(Duration::from_secs(5));
    for batch in [1u64, 64] {
        group.throughput(Throughput::Elements(batch));
        let mut g = Group::new();
        let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter(|| {
                g.nodes[0]
                    .propose_batch((0..batch).map(|_| payload.clone()))
                    .unwrap();
                let mut applied = 0;
                while applied < batch {
                    applied += g.pump();
                }
            })
        });
    }
    group.finish();
}

fn step_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    for entries in [1u64, 64] {
        let mut cfg = Config::new(2, vec![1, 2, 3]);
        cfg.seed = 2;
        let mut follower = RawNode::new(cfg, MemStorage::new()).unwrap();
        let mut last = 0u64;
        let payload = Bytes::from(vec![7u8; PAYLOAD_BYTES]);
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("append_{entries}_entries"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let es: Vec<Entry> = (1..=entries)
                        .map(|k| Entry {
                            term: 1,
                            index: last + k,
                            data: payload.clone(),
                            ..Entry::default()
                        })
                        .collect();
                    let m = Message {
                        from: 1,
                        to: 2,
                        term: 1,
                        body: MessageBody::Append {
                            prev_log_index: last,
                            prev_log_term: if last == 0 { 0 } else { 1 },
                            entries: es,
                            commit: last,
                        },
                    };
                    let t = Instant::now();
                    follower.step(m).unwrap();
                    total += t.elapsed();
                    last += entries;
                    let rd = follower.ready().unwrap();
                    follower.storage_mut().persist_ready(&rd).unwrap();
                    follower.advance(rd).unwrap();
                    if last % COMPACT_EVERY < entries && last > COMPACT_EVERY {
                        let a = follower.applied_index();
                        let conf = follower.conf_state().clone();
                        let st = follower.storage_mut();
                        if a > st.current_snapshot().meta.index {
                            st.create_snapshot(a, conf, Bytes::new()).unwrap();
                            st.compact(a).unwrap();
                        }
                    }
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, commit_throughput, step_append);
criterion_main!(benches);
