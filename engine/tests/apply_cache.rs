//! The apply cache (`EngineConfig::apply_cache_bytes`) must never answer
//! with a state older or newer than the database's: it is emptied when a
//! snapshot replaces a shard and when a crash drops unsynced applies, and a
//! tiny budget (constant eviction) changes no result.

use bytes::Bytes;
use shoal_engine::{ApplyEntry, Command, EngineConfig, MemStore, Reply, Request, RocksEngine};

const GROUP: u64 = 1;
const SHARD: u32 = 1;

fn put(index: u64, client: u64, seq: u64, value: &str) -> ApplyEntry {
    ApplyEntry {
        index,
        term: 1,
        requests: vec![Request {
            shard: SHARD,
            client,
            seq,
            command: Command::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(value.to_string()),
            },
        }],
    }
}

fn written(replies: Vec<Vec<Reply>>) -> u64 {
    match &replies[0][0] {
        Reply::Written { version } => *version,
        other => panic!("expected a write, got {other:?}"),
    }
}

#[test]
fn snapshot_install_replaces_cached_state() {
    let dir = tempfile::tempdir().unwrap();
    let a = RocksEngine::open(dir.path().join("a"), EngineConfig::default()).unwrap();
    let b = RocksEngine::open(dir.path().join("b"), EngineConfig::default()).unwrap();
    // b writes k three times (version 3, cached); a writes it once, at a later index.
    for i in 1..=3 {
        assert_eq!(written(b.apply(GROUP, &[put(i, 7, i, "b")]).unwrap()), i);
    }
    for i in 1..=5 {
        a.apply(
            GROUP,
            &[ApplyEntry {
                index: i,
                term: 1,
                requests: vec![],
            }],
        )
        .unwrap();
    }
    assert_eq!(written(a.apply(GROUP, &[put(6, 9, 1, "a")]).unwrap()), 1);
    // Inside b's data directory, where installs must come from.
    let export = dir.path().join("b").join("export");
    a.export_snapshot(GROUP, &export).unwrap();
    b.install_snapshot(&export).unwrap();
    // The next write sees a's state: version 2, and client 7's session is gone
    // (its seq 4 is new, not a duplicate of anything).
    assert_eq!(written(b.apply(GROUP, &[put(7, 7, 4, "b2")]).unwrap()), 2);
    // Client 9's session came with the snapshot: its seq 1 is a duplicate.
    assert_eq!(written(b.apply(GROUP, &[put(8, 9, 1, "a")]).unwrap()), 1);
    assert_eq!(
        b.get(GROUP, SHARD, b"k").unwrap().unwrap().value,
        Bytes::from_static(b"b2")
    );
}

#[test]
fn crash_drops_cached_unsynced_applies() {
    let mem = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    assert_eq!(
        written(mem.apply(GROUP, &[put(1, 7, 1, "one")]).unwrap()),
        1
    );
    mem.sync().unwrap();
    // Applied but never synced: a crash loses it, and the cache must forget it.
    assert_eq!(
        written(mem.apply(GROUP, &[put(2, 7, 2, "two")]).unwrap()),
        2
    );
    mem.crash_and_recover().unwrap();
    assert_eq!(mem.applied(GROUP).unwrap().index, 1);
    // Replayed from the log after the crash: same version as the lost apply.
    assert_eq!(
        written(mem.apply(GROUP, &[put(2, 7, 2, "two")]).unwrap()),
        2
    );
    assert_eq!(mem.get(GROUP, SHARD, b"k").unwrap().unwrap().version, 2);
}

#[test]
fn tiny_and_disabled_caches_give_the_same_results() {
    let configs = [0, 200, 2_000, EngineConfig::default().apply_cache_bytes];
    let mut results = Vec::new();
    for apply_cache_bytes in configs {
        let mem = MemStore::new_in_memory(EngineConfig {
            apply_cache_bytes,
            ..EngineConfig::default()
        })
        .unwrap();
        let mut replies = Vec::new();
        for i in 1..=200u64 {
            let key = Bytes::from(format!("k{}", i % 7));
            let command = match i % 4 {
                0 => Command::Append {
                    key,
                    value: Bytes::from(format!("{i};")),
                    value_bytes_max: 64,
                },
                1 => Command::Put {
                    key,
                    value: Bytes::from(vec![b'x'; (i % 50) as usize]),
                },
                2 => Command::PutIfVersion {
                    key,
                    value: Bytes::from_static(b"c"),
                    version: i % 5,
                },
                _ => Command::Delete { key },
            };
            let request = Request {
                shard: SHARD,
                client: i % 3 + 1,
                seq: i,
                command,
            };
            replies.push(
                mem.apply(
                    GROUP,
                    &[ApplyEntry {
                        index: i,
                        term: 1,
                        requests: vec![request],
                    }],
                )
                .unwrap(),
            );
        }
        results.push((replies, mem.scan(GROUP, SHARD, b"", b"", 100).unwrap()));
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
}
