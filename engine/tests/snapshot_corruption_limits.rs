//! Goal: snapshots move a group's data, sessions and applied index between
//! engines exactly; corrupt entries, snapshot files and manifests are
//! reported with a clear error naming what is corrupt and change nothing;
//! requests over a limit are refused with a typed error and write nothing.

use std::path::Path;

use bytes::Bytes;
use shoal_consensus::{Entry, HardState, StorageError};
use shoal_engine::backend::{View, WriteSet};
use shoal_engine::keys::log_key;
use shoal_engine::{
    ApplyEntry, Backend, Cf, Command, Engine, EngineConfig, EngineError, GroupWrite, LimitKind,
    LogBatch, MemStore, Reply, Request, RocksEngine, ScanPage, SnapshotScope,
};

fn put(shard: u32, client: u64, seq: u64, key: &str, value: &str) -> Request {
    Request {
        shard,
        client,
        seq,
        command: Command::Put {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
        },
    }
}

fn fill<B: Backend>(engine: &Engine<B>, group: u64, index: u64, tag: &str) {
    let mut requests = Vec::new();
    for shard in 1..=2 {
        for k in 0..200 {
            requests.push(put(
                shard,
                0,
                0,
                &format!("k{k:03}"),
                &format!("{tag}-{shard}-{k}"),
            ));
        }
        requests.push(put(shard, 7, 1, &format!("only-{tag}"), tag));
    }
    engine
        .apply(
            group,
            &[ApplyEntry {
                index,
                term: 2,
                requests,
            }],
        )
        .unwrap();
}

fn shard_pairs<B: Backend>(engine: &Engine<B>, group: u64, shard: u32) -> ScanPage {
    let page = engine.scan(group, shard, b"", b"", 1000).unwrap();
    assert!(page.next.is_none());
    page
}

fn roundtrip<B: Backend>(make: &dyn Fn(&Path) -> Engine<B>) {
    let tmp = tempfile::tempdir().unwrap();
    let a = make(&tmp.path().join("a"));
    let b = make(&tmp.path().join("b"));
    fill(&a, 1, 50, "A");
    fill(&b, 1, 10, "B");
    // Another group on b holding the same shard ids: not the snapshot's.
    fill(&b, 2, 30, "C");
    let other_group = [shard_pairs(&b, 2, 1), shard_pairs(&b, 2, 2)];
    let other_session = b.session(2, 1, 7).unwrap();
    assert!(other_session.is_some());
    // Inside b's data directory (RocksDB), where installs must come from.
    let export = tmp.path().join("b").join("export");
    let manifest = a.export_snapshot(1, &export).unwrap();
    assert_eq!(manifest.applied.index, 50);
    assert_eq!(manifest.scope, SnapshotScope::Group);
    assert!(
        manifest
            .files
            .iter()
            .any(|f| f.name == "kv.sst" && f.cf == "kv" && f.entries == 402),
        "one kv file with both shards: {manifest:?}"
    );
    b.install_snapshot(&export).unwrap();
    assert!(!export.exists(), "install consumes the snapshot directory");
    for shard in 1..=2 {
        assert_eq!(shard_pairs(&b, 1, shard), shard_pairs(&a, 1, shard));
        assert!(
            b.get(1, shard, b"only-B").unwrap().is_none(),
            "keys absent from the snapshot are removed"
        );
        assert_eq!(
            b.session(1, shard, 7).unwrap(),
            a.session(1, shard, 7).unwrap(),
            "sessions travel with the snapshot"
        );
    }
    assert_eq!(
        [shard_pairs(&b, 2, 1), shard_pairs(&b, 2, 2)],
        other_group,
        "other groups are untouched"
    );
    assert_eq!(b.session(2, 1, 7).unwrap(), other_session);
    assert_eq!(b.applied(2).unwrap().index, 30);
    assert_eq!(b.applied(1).unwrap().index, 50);
    // A retry of the request the session remembers is answered from it.
    let replies = b
        .apply(
            1,
            &[ApplyEntry {
                index: 51,
                term: 2,
                requests: vec![put(1, 7, 1, "only-A", "again")],
            }],
        )
        .unwrap();
    assert_eq!(replies[0][0], Reply::Written { version: 1 });
    assert_eq!(
        b.get(1, 1, b"only-A").unwrap().unwrap().value,
        "A",
        "the retry was not applied again"
    );
}

#[test]
fn snapshot_roundtrip_rocksdb() {
    roundtrip(&|p| RocksEngine::open(p, EngineConfig::default()).unwrap());
}

#[test]
fn snapshot_roundtrip_memstore() {
    roundtrip(&|_| MemStore::new_in_memory(EngineConfig::default()).unwrap());
}

fn flip_byte(path: &Path, offset_from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - offset_from_end;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_snapshot_file_is_rejected_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a = RocksEngine::open(tmp.path().join("a"), EngineConfig::default()).unwrap();
    let b = RocksEngine::open(tmp.path().join("b"), EngineConfig::default()).unwrap();
    fill(&a, 1, 50, "A");
    fill(&b, 1, 10, "B");
    let before = [shard_pairs(&b, 1, 1), shard_pairs(&b, 1, 2)];
    let after = |b: &RocksEngine| [shard_pairs(b, 1, 1), shard_pairs(b, 1, 2)];

    let export = tmp.path().join("b").join("export");
    a.export_snapshot(1, &export).unwrap();
    flip_byte(&export.join("kv.sst"), 100);
    let err = b.install_snapshot(&export).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Corrupt(_)), "{msg}");
    assert!(
        msg.contains("kv.sst") && msg.contains("checksum"),
        "error names the file: {msg}"
    );
    assert_eq!(after(&b), before);
    assert_eq!(b.applied(1).unwrap().index, 10);

    let export2 = tmp.path().join("b").join("export2");
    a.export_snapshot(1, &export2).unwrap();
    flip_byte(&export2.join("MANIFEST"), 3);
    let msg = b.install_snapshot(&export2).unwrap_err().to_string();
    assert!(msg.contains("MANIFEST"), "error names the manifest: {msg}");
    assert_eq!(after(&b), before);
    assert_eq!(b.applied(1).unwrap().index, 10);
}

#[test]
fn corrupt_log_entry_is_reported_with_group_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = RocksEngine::open(tmp.path(), EngineConfig::default()).unwrap();
    let entries: Vec<Entry> = (1..=5)
        .map(|i| Entry {
            term: 1,
            index: i,
            data: Bytes::from(vec![i as u8; 64]),
            ..Default::default()
        })
        .collect();
    engine
        .write_log(LogBatch {
            groups: vec![GroupWrite {
                group: 9,
                entries,
                ..Default::default()
            }],
        })
        .unwrap();
    // Flip one byte of entry 3's stored record, under the engine.
    let key = log_key(9, 3);
    let mut stored = engine.backend().get(Cf::RaftLog, &key).unwrap().unwrap();
    let last = stored.len() - 1;
    stored[last] ^= 1;
    let mut set = WriteSet::new();
    set.put(Cf::RaftLog, key.to_vec(), stored);
    engine.backend().write(set, true).unwrap();
    drop(engine);

    let engine = RocksEngine::open(tmp.path(), EngineConfig::default()).unwrap();
    let err = engine.entries(9, 1, 6, u64::MAX).unwrap_err();
    match &err {
        StorageError::Corrupt(msg) => {
            assert!(msg.contains("group 9") && msg.contains("index 3"), "{msg}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(engine.term(9, 3), Err(StorageError::Corrupt(_))));
    // Entries before the corrupt one still read.
    assert_eq!(engine.entries(9, 1, 3, u64::MAX).unwrap().len(), 2);
}

#[test]
fn limits_refuse_and_write_nothing() {
    let config = EngineConfig {
        key_bytes_max: 16,
        value_bytes_max: 64,
        batch_bytes_max: 1024,
        ..EngineConfig::default()
    };
    let engine = MemStore::new_in_memory(config).unwrap();
    let big_key = Request {
        shard: 0,
        client: 1,
        seq: 1,
        command: Command::Put {
            key: Bytes::from(vec![b'k'; 17]),
            value: Bytes::new(),
        },
    };
    match engine.validate_request(&big_key) {
        Err(EngineError::LimitExceeded {
            kind: LimitKind::KeyBytes,
            actual: 17,
            limit: 16,
        }) => {}
        other => panic!("expected a key limit error, got {other:?}"),
    }
    let big_value = Request {
        shard: 0,
        client: 1,
        seq: 2,
        command: Command::Put {
            key: Bytes::from("k"),
            value: Bytes::from(vec![0; 65]),
        },
    };
    assert!(matches!(
        engine.validate_request(&big_value),
        Err(EngineError::LimitExceeded {
            kind: LimitKind::ValueBytes,
            ..
        })
    ));
    // Limits are decided when proposing, not when applying: a committed
    // entry is applied whatever this replica's limits (its proposer's
    // were met), so replicas with other limits cannot diverge
    // (`apply_replicas.rs` holds them equal).
    let replies = engine
        .apply(
            1,
            &[ApplyEntry {
                index: 1,
                term: 1,
                requests: vec![big_key, big_value],
            }],
        )
        .unwrap();
    assert_eq!(
        replies[0],
        vec![Reply::Written { version: 1 }, Reply::Written { version: 1 }]
    );
    assert_eq!(engine.scan(1, 0, b"", b"", 10).unwrap().pairs.len(), 2);
    // Appends growing a value past the limit the proposer stamped into the
    // command are rejected, on every replica alike.
    let append = |seq| {
        let mut request = Request {
            shard: 0,
            client: 0,
            seq,
            command: Command::Append {
                key: Bytes::from("a"),
                value: Bytes::from(vec![1; 40]),
                value_bytes_max: 0,
            },
        };
        engine.stamp_request(&mut request);
        request
    };
    let replies = engine
        .apply(
            1,
            &[ApplyEntry {
                index: 2,
                term: 1,
                requests: vec![append(1), append(2)],
            }],
        )
        .unwrap();
    assert_eq!(replies[0][0], Reply::Written { version: 1 });
    assert!(matches!(replies[0][1], Reply::Rejected { .. }));
    assert_eq!(engine.get(1, 0, b"a").unwrap().unwrap().value.len(), 40);
    // An oversized log batch is refused whole.
    let entries: Vec<Entry> = (1..=20)
        .map(|i| Entry {
            term: 1,
            index: i,
            data: Bytes::from(vec![0; 100]),
            ..Default::default()
        })
        .collect();
    let err = engine
        .write_log(LogBatch {
            groups: vec![GroupWrite {
                group: 1,
                entries,
                hard_state: Some(HardState::default()),
                ..Default::default()
            }],
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::LimitExceeded {
                kind: LimitKind::BatchBytes,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(engine.last_index(1).unwrap(), 0);
    // One entry over the limit is taken: a leader with larger limits
    // proposed it, and this replica must persist what the group commits.
    let size = engine.config().batch_bytes_max as usize + 1;
    engine
        .write_log(LogBatch {
            groups: vec![GroupWrite {
                group: 1,
                entries: vec![Entry {
                    term: 1,
                    index: 1,
                    data: Bytes::from(vec![0; size]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
        .expect("a single oversized entry is persisted");
    assert_eq!(engine.last_index(1).unwrap(), 1);
    // Bad configurations are refused with the field named.
    let err = EngineConfig {
        batch_bytes_max: 10,
        ..EngineConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("batch_bytes_max"), "{err}");
}

#[test]
fn memstore_crash_loses_only_unsynced_writes() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let entry = Entry {
        term: 1,
        index: 1,
        ..Default::default()
    };
    engine
        .write_log(LogBatch {
            groups: vec![GroupWrite {
                group: 1,
                entries: vec![entry],
                ..Default::default()
            }],
        })
        .unwrap();
    engine
        .apply(
            1,
            &[ApplyEntry {
                index: 1,
                term: 1,
                requests: vec![put(0, 0, 0, "k", "v")],
            }],
        )
        .unwrap();
    engine.crash_and_recover().unwrap();
    assert_eq!(
        engine.last_index(1).unwrap(),
        1,
        "the synced log write survives"
    );
    assert_eq!(
        engine.applied(1).unwrap().index,
        0,
        "the unsynced apply is lost, to be replayed"
    );
    assert!(engine.get(1, 0, b"k").unwrap().is_none());
    engine
        .apply(
            1,
            &[ApplyEntry {
                index: 1,
                term: 1,
                requests: vec![put(0, 0, 0, "k", "v")],
            }],
        )
        .unwrap();
    engine.sync().unwrap();
    engine.crash_and_recover().unwrap();
    assert_eq!(engine.applied(1).unwrap().index, 1);
    // Re-applying an applied index is a caller bug, refused.
    assert!(engine
        .apply(
            1,
            &[ApplyEntry {
                index: 1,
                term: 1,
                requests: vec![]
            }]
        )
        .is_err());
}

/// Goal: applying committed entries never fails on the batch limit (that
/// would stop the group for good): repeated writes of one key count once,
/// and a catch-up larger than the limit is applied in several writes, each
/// at an entry boundary with its applied index.
#[test]
fn apply_splits_large_catch_up_and_never_refuses() {
    let config = EngineConfig {
        key_bytes_max: 16,
        value_bytes_max: 1000,
        batch_bytes_max: 4096,
        ..EngineConfig::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    catch_up(&RocksEngine::open(tmp.path(), config.clone()).unwrap());
    catch_up(&MemStore::new_in_memory(config).unwrap());
}

fn catch_up<B: Backend>(engine: &Engine<B>) {
    // 200 appends of 10 bytes to one key: per-put accounting would stage
    // ~200 KB, final-value accounting 2 KB.
    let append = |i: u64| Request {
        shard: 0,
        client: 0,
        seq: i,
        command: Command::Append {
            key: Bytes::from("k"),
            value: Bytes::from(vec![b'a'; 5]),
            value_bytes_max: 1000,
        },
    };
    let entries: Vec<ApplyEntry> = (1..=200)
        .map(|i| ApplyEntry {
            index: i,
            term: 1,
            requests: vec![append(i)],
        })
        .collect();
    let replies = engine.apply(1, &entries).unwrap();
    assert_eq!(replies.len(), 200);
    assert_eq!(engine.get(1, 0, b"k").unwrap().unwrap().value.len(), 1000);
    // 50 distinct 900-byte values: ~45 KB, more than ten times the limit.
    let puts: Vec<ApplyEntry> = (201..=250)
        .map(|i| ApplyEntry {
            index: i,
            term: 2,
            requests: vec![put(0, 0, 0, &format!("p{i}"), &"x".repeat(900))],
        })
        .collect();
    let replies = engine.apply(1, &puts).unwrap();
    assert!(replies
        .iter()
        .all(|r| r[0] == Reply::Written { version: 1 }));
    assert_eq!(
        engine.applied(1).unwrap(),
        shoal_engine::AppliedState {
            index: 250,
            term: 2
        }
    );
    assert_eq!(engine.scan(1, 0, b"p", b"q", 100).unwrap().pairs.len(), 50);
    // Out-of-order or repeated indexes are refused before anything is written.
    let bad = vec![
        ApplyEntry {
            index: 252,
            term: 2,
            requests: vec![put(0, 0, 0, "z", "z")],
        },
        ApplyEntry {
            index: 251,
            term: 2,
            requests: vec![],
        },
    ];
    assert!(engine.apply(1, &bad).is_err());
    assert!(engine.get(1, 0, b"z").unwrap().is_none());
}
