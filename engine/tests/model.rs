//! Goal: the engine's log store and KV state machine behave exactly like
//! simple models (a `Vec` of entries, a `BTreeMap` of keys with a session
//! table), and the RocksDB engine and the in-memory `MemStore` give the same
//! result for the same operations. Scans are paged by count and bytes, with
//! a budget small enough that appends (whose limit comes from the log, not
//! the configuration) make values cross it. Property-based (proptest); a
//! failure prints the minimal operation sequence.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;
use shoal_consensus::{Entry, HardState, StorageError};
use shoal_engine::{
    ApplyEntry, Backend, BatchWrite, Command, Condition, Engine, EngineConfig, GroupWrite,
    LogBatch, MemStore, Reply, Request, RocksEngine, ScanPage, Versioned,
};

const GROUP: u64 = 3;

/// Limits of the KV check: the smallest scan page budget validation allows
/// for keys of up to 2 bytes and values of up to 8, so pages end on bytes as
/// well as on count. Apply does not check the configured limits (they are
/// the proposer's business), so the generated values go past them, up to
/// 30 bytes, and appends up to the limit in their command: a few pairs fill
/// a page, and some are larger than one.
fn kv_config(apply_cache_bytes: u64) -> EngineConfig {
    EngineConfig {
        key_bytes_max: 2,
        value_bytes_max: 8,
        scan_bytes_max: SCAN_BYTES_MAX,
        apply_cache_bytes,
        ..EngineConfig::default()
    }
}
const SCAN_BYTES_MAX: u64 = 2 + 8 + 64;

// ---------- KV model ----------

#[derive(Default)]
struct KvModel {
    kv: BTreeMap<(u32, Vec<u8>), Versioned>,
    sessions: HashMap<(u32, u64), (u64, Reply)>,
}

impl KvModel {
    fn apply(&mut self, r: &Request) -> Reply {
        let tracked =
            r.client != 0 && !matches!(r.command, Command::Get { .. } | Command::Scan { .. });
        if tracked {
            if let Some((seq, reply)) = self.sessions.get(&(r.shard, r.client)) {
                if r.seq == *seq {
                    return reply.clone();
                }
                if r.seq < *seq {
                    return Reply::Stale;
                }
            }
        }
        let reply = self.execute(r);
        if tracked {
            self.sessions
                .insert((r.shard, r.client), (r.seq, reply.clone()));
        }
        reply
    }

    fn execute(&mut self, r: &Request) -> Reply {
        let s = r.shard;
        match &r.command {
            Command::Get { key } => self
                .kv
                .get(&(s, key.to_vec()))
                .map_or(Reply::NotFound, |v| Reply::Value(v.clone())),
            Command::Put { key, value } => {
                let version = self.kv.get(&(s, key.to_vec())).map_or(1, |v| v.version + 1);
                self.kv.insert(
                    (s, key.to_vec()),
                    Versioned {
                        value: value.clone(),
                        version,
                    },
                );
                Reply::Written { version }
            }
            Command::PutIfVersion {
                key,
                value,
                version,
            } => match self.kv.get(&(s, key.to_vec())) {
                None if *version == 0 => {
                    self.kv.insert(
                        (s, key.to_vec()),
                        Versioned {
                            value: value.clone(),
                            version: 1,
                        },
                    );
                    Reply::Written { version: 1 }
                }
                None => Reply::NoKey,
                Some(v) if v.version == *version => {
                    self.kv.insert(
                        (s, key.to_vec()),
                        Versioned {
                            value: value.clone(),
                            version: version + 1,
                        },
                    );
                    Reply::Written {
                        version: version + 1,
                    }
                }
                Some(v) => Reply::VersionMismatch { current: v.version },
            },
            Command::Append {
                key,
                value,
                value_bytes_max,
            } => {
                let (version, mut bytes) = self
                    .kv
                    .get(&(s, key.to_vec()))
                    .map_or((1, Vec::new()), |v| (v.version + 1, v.value.to_vec()));
                let grown = (bytes.len() + value.len()) as u64;
                if grown > *value_bytes_max {
                    return Reply::Rejected {
                        reason: format!(
                            "value size {grown} exceeds the limit of {value_bytes_max}"
                        ),
                    };
                }
                bytes.extend_from_slice(value);
                self.kv.insert(
                    (s, key.to_vec()),
                    Versioned {
                        value: bytes.into(),
                        version,
                    },
                );
                Reply::Written { version }
            }
            Command::Delete { key } => Reply::Deleted {
                existed: self.kv.remove(&(s, key.to_vec())).is_some(),
            },
            Command::Scan { start, end, limit } => Reply::Pairs(self.page(s, start, end, *limit)),
            Command::Batch { conditions, writes } => {
                for (index, c) in conditions.iter().enumerate() {
                    let current = self.kv.get(&(s, c.key.to_vec())).map_or(0, |v| v.version);
                    if current != c.version {
                        return Reply::ConditionFailed {
                            index: index as u32,
                            current,
                        };
                    }
                }
                let mut versions = Vec::new();
                for w in writes {
                    match w {
                        BatchWrite::Put { key, value } => {
                            let version =
                                self.kv.get(&(s, key.to_vec())).map_or(1, |v| v.version + 1);
                            self.kv.insert(
                                (s, key.to_vec()),
                                Versioned {
                                    value: value.clone(),
                                    version,
                                },
                            );
                            versions.push(version);
                        }
                        BatchWrite::Delete { key } => {
                            self.kv.remove(&(s, key.to_vec()));
                            versions.push(0);
                        }
                    }
                }
                Reply::BatchWritten { versions }
            }
            Command::ExpireSessions { sessions } => {
                let mut count = 0;
                for (client, seq) in sessions {
                    if self
                        .sessions
                        .get(&(s, *client))
                        .is_some_and(|(last, _)| last == seq)
                    {
                        self.sessions.remove(&(s, *client));
                        count += 1;
                    }
                }
                Reply::SessionsExpired { count }
            }
        }
    }

    /// Every pair of shard `s` in `[start, end)` (empty `end`: no bound).
    fn range(&self, s: u32, start: &[u8], end: &[u8]) -> Vec<(Bytes, Versioned)> {
        self.kv
            .iter()
            .filter(|((shard, k), _)| {
                *shard == s && k.as_slice() >= start && (end.is_empty() || k.as_slice() < end)
            })
            .map(|((_, k), v)| (Bytes::from(k.clone()), v.clone()))
            .collect()
    }

    /// The page a scan returns: pairs while under `limit` and, past the
    /// first, within [`SCAN_BYTES_MAX`] key + value bytes; `next` the first
    /// pair left out.
    fn page(&self, s: u32, start: &[u8], end: &[u8], limit: u64) -> ScanPage {
        let mut page = ScanPage::default();
        let mut bytes = 0;
        for (k, v) in self.range(s, start, end) {
            let size = (k.len() + v.value.len()) as u64;
            let fits = (page.pairs.len() as u64) < limit
                && (page.pairs.is_empty() || bytes + size <= SCAN_BYTES_MAX);
            if !fits {
                page.next = Some(k);
                break;
            }
            bytes += size;
            page.pairs.push((k, v));
        }
        page
    }
}

/// Follows a shard's scan pages from the start, checking each against the
/// model's; returns their concatenation.
fn scan_all<B: Backend>(
    engine: &Engine<B>,
    model: &KvModel,
    shard: u32,
    limit: u64,
) -> Result<Vec<(Bytes, Versioned)>, TestCaseError> {
    let mut all = Vec::new();
    let mut start = Bytes::new();
    loop {
        let page = engine.scan(GROUP, shard, &start, b"", limit).unwrap();
        prop_assert_eq!(&page, &model.page(shard, &start, b"", limit));
        all.extend(page.pairs);
        match page.next {
            Some(next) => start = next,
            None => return Ok(all),
        }
    }
}

fn key_strategy() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        (0u8..6).prop_map(|k| Bytes::from(vec![b'a' + k])),
        (0u8..6).prop_map(|k| Bytes::from(vec![b'a' + k, b'x']))
    ]
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let value = proptest::collection::vec(any::<u8>(), 0..30).prop_map(Bytes::from);
    prop_oneof![
        key_strategy().prop_map(|key| Command::Get { key }),
        (key_strategy(), value.clone()).prop_map(|(key, value)| Command::Put { key, value }),
        (key_strategy(), value.clone(), 0u64..4).prop_map(|(key, value, version)| {
            Command::PutIfVersion {
                key,
                value,
                version,
            }
        }),
        (key_strategy(), value.clone(), 0u64..100).prop_map(|(key, value, value_bytes_max)| {
            Command::Append {
                key,
                value,
                value_bytes_max,
            }
        }),
        key_strategy().prop_map(|key| Command::Delete { key }),
        (key_strategy(), key_strategy(), 0u64..5).prop_map(|(start, end, limit)| Command::Scan {
            start,
            end,
            limit
        }),
        proptest::collection::vec((0u64..3, 0u64..6), 0..4)
            .prop_map(|sessions| Command::ExpireSessions { sessions }),
        (
            proptest::collection::vec((key_strategy(), 0u64..3), 0..3),
            proptest::collection::vec((key_strategy(), proptest::option::of(value)), 0..4)
        )
            .prop_map(|(conditions, writes)| Command::Batch {
                conditions: conditions
                    .into_iter()
                    .map(|(key, version)| Condition { key, version })
                    .collect(),
                writes: writes
                    .into_iter()
                    .map(|(key, value)| match value {
                        Some(value) => BatchWrite::Put { key, value },
                        None => BatchWrite::Delete { key },
                    })
                    .collect(),
            }),
    ]
}

fn request_strategy() -> impl Strategy<Value = Request> {
    (0u32..3, 0u64..3, 0u64..6, command_strategy()).prop_map(|(shard, client, seq, command)| {
        Request {
            shard,
            client,
            seq,
            command,
        }
    })
}

fn kv_check(entries: Vec<Vec<Request>>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let rocks = RocksEngine::open(dir.path(), kv_config(1024 * 1024)).unwrap();
    // A tiny apply cache on one side: evicted all the time, it must not
    // change a single reply.
    let mem = MemStore::new_in_memory(kv_config(300)).unwrap();
    let mut model = KvModel::default();
    // Apply in chunks of up to 3 entries, so one atomic write carries several
    // entries and later commands must see earlier ones in the same batch.
    let mut index = 0;
    for chunk in entries.chunks(3) {
        let batch: Vec<ApplyEntry> = chunk
            .iter()
            .map(|requests| {
                index += 1;
                ApplyEntry {
                    index,
                    term: 1,
                    requests: requests.clone(),
                }
            })
            .collect();
        let want: Vec<Vec<Reply>> = chunk
            .iter()
            .map(|rs| rs.iter().map(|r| model.apply(r)).collect())
            .collect();
        prop_assert_eq!(&rocks.apply(GROUP, &batch).unwrap(), &want);
        prop_assert_eq!(&mem.apply(GROUP, &batch).unwrap(), &want);
    }
    for shard in 0..3 {
        let want = model.range(shard, b"", b"");
        for limit in [1, 2, 1000] {
            prop_assert_eq!(&scan_all(&rocks, &model, shard, limit)?, &want);
            prop_assert_eq!(&scan_all(&mem, &model, shard, limit)?, &want);
        }
        for client in 0..3 {
            let want = model.sessions.get(&(shard, client)).cloned();
            let got = rocks
                .session(GROUP, shard, client)
                .unwrap()
                .map(|s| (s.seq, s.reply));
            prop_assert_eq!(&got, &want);
            let got = mem
                .session(GROUP, shard, client)
                .unwrap()
                .map(|s| (s.seq, s.reply));
            prop_assert_eq!(&got, &want);
        }
        let mut want: Vec<(u64, u64)> = model
            .sessions
            .iter()
            .filter(|((s, _), _)| *s == shard)
            .map(|((_, client), (seq, _))| (*client, *seq))
            .collect();
        want.sort_unstable();
        prop_assert_eq!(&rocks.sessions(GROUP, shard).unwrap(), &want);
        prop_assert_eq!(&mem.sessions(GROUP, shard).unwrap(), &want);
    }
    prop_assert_eq!(rocks.applied(GROUP).unwrap().index, index);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn kv_matches_model(entries in proptest::collection::vec(proptest::collection::vec(request_strategy(), 0..4), 1..24)) {
        kv_check(entries)?;
    }
}

// ---------- log model ----------

#[derive(Debug, Clone)]
enum LogOp {
    /// Append `count` entries of `term` starting `back` entries before the end.
    Append { back: u64, count: u64, term: u64 },
    /// Compact through `applied` minus `keep` (the state machine is applied up to the end first).
    Compact { keep: u64 },
    /// Read `[lo, hi)` with a byte budget.
    Read { lo: u64, len: u64, max_bytes: u64 },
    /// Close and reopen (RocksDB) / crash and recover (MemStore, after a synced write nothing is lost).
    Reopen,
}

fn log_op_strategy() -> impl Strategy<Value = LogOp> {
    prop_oneof![
        4 => (0u64..4, 1u64..6, 1u64..4).prop_map(|(back, count, term)| LogOp::Append { back, count, term }),
        1 => (0u64..6).prop_map(|keep| LogOp::Compact { keep }),
        3 => (0u64..30, 0u64..8, 0u64..200).prop_map(|(lo, len, max_bytes)| LogOp::Read { lo, len, max_bytes }),
        1 => Just(LogOp::Reopen),
    ]
}

struct LogModel {
    entries: Vec<Entry>,
    truncated: (u64, u64),
    applied: u64,
    /// The engine's running log size: every appended entry counts (a
    /// replaced suffix too) until a compaction recounts what remains.
    log_bytes: u64,
}

impl LogModel {
    fn last(&self) -> u64 {
        self.entries.last().map_or(self.truncated.0, |e| e.index)
    }
    fn first(&self) -> u64 {
        self.truncated.0 + 1
    }
    fn read(&self, lo: u64, hi: u64, max: u64) -> Result<Vec<Entry>, StorageError> {
        if lo < self.first() {
            return Err(StorageError::Compacted);
        }
        if hi > self.last() + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self
            .entries
            .iter()
            .filter(|e| e.index >= lo && e.index < hi)
        {
            bytes += e.size_bytes();
            if !out.is_empty() && bytes > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }
}

fn log_check(ops: Vec<LogOp>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut rocks = Some(RocksEngine::open(dir.path(), EngineConfig::default()).unwrap());
    let mem = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let mut model = LogModel {
        entries: Vec::new(),
        truncated: (0, 0),
        applied: 0,
        log_bytes: 0,
    };
    for op in ops {
        let r = rocks.as_ref().unwrap();
        match op {
            LogOp::Append { back, count, term } => {
                let start = (model.last() + 1)
                    .saturating_sub(back)
                    .max(model.first())
                    .max(model.applied + 1);
                let entries: Vec<Entry> = (start..start + count)
                    .map(|index| Entry {
                        term,
                        index,
                        data: Bytes::from(format!("{index}@{term}").repeat((index % 4) as usize)),
                        ..Default::default()
                    })
                    .collect();
                let batch = LogBatch {
                    groups: vec![GroupWrite {
                        group: GROUP,
                        entries: entries.clone(),
                        hard_state: Some(HardState {
                            term,
                            vote: 1,
                            commit: model.applied,
                        }),
                        ..Default::default()
                    }],
                };
                r.write_log(batch.clone()).unwrap();
                mem.write_log(batch).unwrap();
                model.entries.retain(|e| e.index < start);
                model.log_bytes += entries.iter().map(Entry::size_bytes).sum::<u64>();
                model.entries.extend(entries);
            }
            LogOp::Compact { keep } => {
                // Apply everything (no-op entries) so compaction is allowed.
                let last = model.last();
                if last > model.applied {
                    let batch: Vec<ApplyEntry> = vec![ApplyEntry {
                        index: last,
                        term: 1,
                        requests: vec![],
                    }];
                    r.apply(GROUP, &batch).unwrap();
                    mem.apply(GROUP, &batch).unwrap();
                    model.applied = last;
                }
                let through = model.applied.saturating_sub(keep);
                if through > model.truncated.0 {
                    let term = model
                        .entries
                        .iter()
                        .find(|e| e.index == through)
                        .map(|e| e.term)
                        .unwrap();
                    r.compact_log(GROUP, through).unwrap();
                    mem.compact_log(GROUP, through).unwrap();
                    model.entries.retain(|e| e.index > through);
                    model.truncated = (through, term);
                    model.log_bytes = model.entries.iter().map(Entry::size_bytes).sum();
                }
            }
            LogOp::Read { lo, len, max_bytes } => {
                let want = model.read(lo, lo + len, max_bytes);
                prop_assert_eq!(&r.entries(GROUP, lo, lo + len, max_bytes), &want);
                prop_assert_eq!(&mem.entries(GROUP, lo, lo + len, max_bytes), &want);
                let want_term = if lo == model.truncated.0 {
                    Ok(model.truncated.1)
                } else if lo < model.truncated.0 {
                    Err(StorageError::Compacted)
                } else {
                    model
                        .entries
                        .iter()
                        .find(|e| e.index == lo)
                        .map(|e| e.term)
                        .ok_or(StorageError::Unavailable)
                };
                prop_assert_eq!(&r.term(GROUP, lo), &want_term);
                prop_assert_eq!(&mem.term(GROUP, lo), &want_term);
            }
            LogOp::Reopen => {
                r.sync().unwrap();
                mem.sync().unwrap();
                drop(rocks.take());
                rocks = Some(RocksEngine::open(dir.path(), EngineConfig::default()).unwrap());
                // Log writes are synced: a crash loses none of them.
                mem.crash_and_recover().unwrap();
            }
        }
        let r = rocks.as_ref().unwrap();
        prop_assert_eq!(r.last_index(GROUP).unwrap(), model.last());
        prop_assert_eq!(r.first_index(GROUP).unwrap(), model.first());
        prop_assert_eq!(mem.last_index(GROUP).unwrap(), model.last());
        prop_assert_eq!(mem.first_index(GROUP).unwrap(), model.first());
        prop_assert_eq!(r.log_bytes(GROUP).unwrap(), model.log_bytes);
        prop_assert_eq!(mem.log_bytes(GROUP).unwrap(), model.log_bytes);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(log_op_strategy(), 1..40)) {
        log_check(ops)?;
    }
}

/// Goal: one `write_log` spanning many groups is one synced write, and each
/// group's log is independent.
#[test]
fn group_commit_spans_groups() {
    let dir = tempfile::tempdir().unwrap();
    let engine = RocksEngine::open(dir.path(), EngineConfig::default()).unwrap();
    let groups = (1..=50u64)
        .map(|g| GroupWrite {
            group: g,
            entries: (1..=g)
                .map(|i| Entry {
                    term: 1,
                    index: i,
                    data: Bytes::from(vec![g as u8; 10]),
                    ..Default::default()
                })
                .collect(),
            hard_state: Some(HardState {
                term: 1,
                vote: g,
                commit: 0,
            }),
            ..Default::default()
        })
        .collect();
    engine.write_log(LogBatch { groups }).unwrap();
    drop(engine);
    let engine = RocksEngine::open(dir.path(), EngineConfig::default()).unwrap();
    for g in 1..=50u64 {
        assert_eq!(engine.last_index(g).unwrap(), g);
        assert_eq!(engine.group_state(g).unwrap().hard_state.vote, g);
        let entries = engine.entries(g, 1, g + 1, u64::MAX).unwrap();
        assert!(entries
            .iter()
            .all(|e| e.data.as_ref() == vec![g as u8; 10].as_slice()));
    }
}
