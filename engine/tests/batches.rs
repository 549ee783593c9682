//! Goal: a `Command::Batch` is all or nothing. Its conditions are judged
//! against the state before the batch; if any fails nothing is written and
//! the reply names it; otherwise every write applies in order, and a
//! retry of the same (client, seq) is answered from the session, not
//! applied again. Limits are checked when proposing.

use bytes::Bytes;
use shoal_engine::{
    ApplyEntry, BatchWrite, Command, Condition, EngineConfig, EngineError, LimitKind, MemStore,
    Reply, Request, RocksEngine,
};

const GROUP: u64 = 1;
const SHARD: u32 = 0;

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn put(key: &str, value: &str) -> BatchWrite {
    BatchWrite::Put {
        key: b(key),
        value: b(value),
    }
}

fn cond(key: &str, version: u64) -> Condition {
    Condition {
        key: b(key),
        version,
    }
}

fn batch(conditions: Vec<Condition>, writes: Vec<BatchWrite>) -> Command {
    Command::Batch { conditions, writes }
}

/// Applies `commands` (client 7, sequence numbers from `seq`) as one entry
/// at `index`; returns the replies.
fn apply<B: shoal_engine::Backend>(
    engine: &shoal_engine::Engine<B>,
    index: u64,
    seq: u64,
    commands: Vec<Command>,
) -> Vec<Reply> {
    let requests = commands
        .into_iter()
        .enumerate()
        .map(|(i, command)| Request {
            shard: SHARD,
            client: 7,
            seq: seq + i as u64,
            command,
        })
        .collect();
    engine
        .apply(
            GROUP,
            &[ApplyEntry {
                index,
                term: 1,
                requests,
            }],
        )
        .unwrap()
        .remove(0)
}

fn value(engine: &MemStore, key: &str) -> Option<(String, u64)> {
    engine
        .get(GROUP, SHARD, key.as_bytes())
        .unwrap()
        .map(|v| (String::from_utf8(v.value.to_vec()).unwrap(), v.version))
}

#[test]
fn a_batch_writes_all_keys_when_its_conditions_hold() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let replies = apply(
        &engine,
        1,
        1,
        vec![batch(
            vec![cond("a", 0), cond("b", 0)],
            vec![put("a", "1"), put("b", "2"), put("a", "3")],
        )],
    );
    assert_eq!(
        replies,
        vec![Reply::BatchWritten {
            versions: vec![1, 1, 2]
        }]
    );
    assert_eq!(value(&engine, "a"), Some(("3".into(), 2)));
    assert_eq!(value(&engine, "b"), Some(("2".into(), 1)));

    // A delete and a put conditioned on the current versions.
    let replies = apply(
        &engine,
        2,
        2,
        vec![batch(
            vec![cond("a", 2), cond("b", 1), cond("c", 0)],
            vec![BatchWrite::Delete { key: b("a") }, put("c", "x")],
        )],
    );
    assert_eq!(
        replies,
        vec![Reply::BatchWritten {
            versions: vec![0, 1]
        }]
    );
    assert_eq!(value(&engine, "a"), None);
    assert_eq!(value(&engine, "c"), Some(("x".into(), 1)));
}

#[test]
fn a_failed_condition_writes_nothing_and_names_itself() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    apply(&engine, 1, 1, vec![batch(vec![], vec![put("a", "1")])]);
    // Condition 1 fails (a is at version 1): neither write happens, not
    // even the one before the failing condition's key.
    let replies = apply(
        &engine,
        2,
        2,
        vec![batch(
            vec![cond("b", 0), cond("a", 5)],
            vec![put("b", "new"), put("a", "new")],
        )],
    );
    assert_eq!(
        replies,
        vec![Reply::ConditionFailed {
            index: 1,
            current: 1
        }]
    );
    assert_eq!(value(&engine, "a"), Some(("1".into(), 1)));
    assert_eq!(value(&engine, "b"), None);
    // A condition that the key be absent fails on a present key.
    let replies = apply(
        &engine,
        3,
        3,
        vec![batch(vec![cond("a", 0)], vec![put("z", "z")])],
    );
    assert_eq!(
        replies,
        vec![Reply::ConditionFailed {
            index: 0,
            current: 1
        }]
    );
    assert_eq!(value(&engine, "z"), None);
}

#[test]
fn conditions_see_earlier_requests_of_the_same_entry_and_retries_are_not_reapplied() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    // Two batches in one entry: the second's condition sees the first's
    // write (staged, not yet written).
    let first = batch(vec![cond("k", 0)], vec![put("k", "1")]);
    let second = batch(vec![cond("k", 1)], vec![put("k", "2")]);
    let replies = apply(&engine, 1, 1, vec![first, second.clone()]);
    assert_eq!(
        replies,
        vec![
            Reply::BatchWritten { versions: vec![1] },
            Reply::BatchWritten { versions: vec![2] }
        ]
    );
    // The second batch again with the same sequence number: the cached
    // reply, no third write (its condition would fail now if it ran).
    let replies = apply(&engine, 2, 2, vec![second]);
    assert_eq!(replies, vec![Reply::BatchWritten { versions: vec![2] }]);
    assert_eq!(value(&engine, "k"), Some(("2".into(), 2)));
}

#[test]
fn batch_limits_are_checked_when_proposing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = RocksEngine::open(
        dir.path().join("db"),
        EngineConfig {
            key_bytes_max: 8,
            value_bytes_max: 16,
            batch_bytes_max: 4096,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let request = |command| Request {
        shard: SHARD,
        client: 1,
        seq: 1,
        command,
    };
    let too_many = batch(
        vec![],
        (0..=shoal_engine::kv::BATCH_OPS_MAX)
            .map(|i| put(&i.to_string(), "v"))
            .collect(),
    );
    let limit = |command| match engine.validate_request(&request(command)) {
        Err(EngineError::LimitExceeded { kind, .. }) => Some(kind),
        Err(other) => panic!("unexpected error {other}"),
        Ok(()) => None,
    };
    assert_eq!(limit(too_many), Some(LimitKind::BatchOps));
    assert_eq!(
        limit(batch(vec![cond("a-long-key", 0)], vec![])),
        Some(LimitKind::KeyBytes)
    );
    assert_eq!(
        limit(batch(vec![], vec![put("a", "a value of 24 bytes......")])),
        Some(LimitKind::ValueBytes)
    );
    assert_eq!(
        limit(batch(
            vec![],
            vec![BatchWrite::Delete {
                key: b("a-long-key")
            }]
        )),
        Some(LimitKind::KeyBytes)
    );
    assert_eq!(limit(batch(vec![cond("a", 1)], vec![put("a", "v")])), None);
    // Within every per-key limit, over the batch's byte limit in all.
    let value = "v".repeat(16);
    let big = batch(
        vec![],
        (0..300).map(|i| put(&format!("k{i}"), &value)).collect(),
    );
    assert_eq!(limit(big), Some(LimitKind::BatchBytes));
}
