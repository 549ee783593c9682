//! Goal: the engine keeps a running size of each group's log that needs no
//! log read (issue 10, item 5: the node read every entry to decide when to
//! compact), equal to the real sum of the stored entries' sizes, across
//! appends, compactions, snapshot resets and restarts (a MemStore crash
//! and a RocksDB reopen). Only a replaced suffix may be over-counted, and
//! only until the next compaction.

use bytes::Bytes;
use shoal_consensus::{ConfState, Entry, HardState, Snapshot, SnapshotMeta};
use shoal_engine::{
    ApplyEntry, Backend, Engine, EngineConfig, GroupWrite, LogBatch, MemStore, RocksEngine,
};

const GROUP: u64 = 4;
const OTHER: u64 = 5;

/// The real size of `group`'s log, read entry by entry.
fn stored_bytes<B: Backend>(engine: &Engine<B>, group: u64) -> u64 {
    let first = engine.first_index(group).unwrap();
    let last = engine.last_index(group).unwrap();
    if last < first {
        return 0;
    }
    engine
        .entries(group, first, last + 1, u64::MAX)
        .unwrap()
        .iter()
        .map(Entry::size_bytes)
        .sum()
}

fn append<B: Backend>(engine: &Engine<B>, group: u64, from: u64, to: u64, term: u64) {
    let entries = (from..=to)
        .map(|index| Entry {
            term,
            index,
            data: Bytes::from(vec![index as u8; (index as usize * 37) % 500]),
            ..Default::default()
        })
        .collect();
    engine
        .write_log(LogBatch {
            groups: vec![GroupWrite {
                group,
                entries,
                hard_state: None,
                ..Default::default()
            }],
        })
        .unwrap();
}

/// Runs the scenario; `restart` restarts the engine (and returns it).
fn scenario<B: Backend>(mut engine: Engine<B>, restart: &dyn Fn(Engine<B>) -> Engine<B>) {
    let check = |engine: &Engine<B>, what: &str| {
        for group in [GROUP, OTHER] {
            assert_eq!(
                engine.log_bytes(group).unwrap(),
                stored_bytes(engine, group),
                "group {group} after {what}"
            );
        }
    };
    assert_eq!(engine.log_bytes(GROUP).unwrap(), 0);
    append(&engine, GROUP, 1, 10, 1);
    append(&engine, OTHER, 1, 3, 1);
    append(&engine, GROUP, 11, 40, 1);
    check(&engine, "appends");
    engine = restart(engine);
    check(&engine, "appends and a restart");

    // A conflicting append replaces 31..=40: the old suffix stays counted.
    append(&engine, GROUP, 31, 35, 2);
    let over = engine.log_bytes(GROUP).unwrap();
    assert!(over > stored_bytes(&engine, GROUP));
    engine = restart(engine);
    assert_eq!(engine.log_bytes(GROUP).unwrap(), over, "persisted as is");

    // Compaction recounts exactly what remains.
    engine
        .apply(
            GROUP,
            &[ApplyEntry {
                index: 30,
                term: 1,
                requests: vec![],
            }],
        )
        .unwrap();
    engine.compact_log(GROUP, 25).unwrap();
    check(&engine, "a compaction");
    engine.sync().unwrap();
    engine = restart(engine);
    check(&engine, "a compaction and a restart");
    append(&engine, GROUP, 36, 50, 2);
    engine = restart(engine);
    check(&engine, "more appends and a restart");

    // A snapshot resets the log, and the count, before the entries after it.
    engine
        .write_log(LogBatch {
            groups: vec![GroupWrite {
                group: GROUP,
                snapshot: Some(Snapshot {
                    meta: SnapshotMeta {
                        index: 100,
                        term: 3,
                        conf_state: ConfState {
                            voters: vec![1],
                            learners: vec![],
                        },
                    },
                    data: Bytes::new(),
                }),
                entries: (101..=103)
                    .map(|index| Entry {
                        term: 3,
                        index,
                        data: Bytes::from(vec![1; 100]),
                        ..Default::default()
                    })
                    .collect(),
                hard_state: Some(HardState {
                    term: 3,
                    vote: 1,
                    commit: 100,
                }),
                ..Default::default()
            }],
        })
        .unwrap();
    check(&engine, "a snapshot");
    assert_eq!(
        engine.log_bytes(GROUP).unwrap(),
        3 * (100 + shoal_consensus::ENTRY_OVERHEAD_BYTES)
    );
    engine = restart(engine);
    check(&engine, "a snapshot and a restart");
}

#[test]
fn log_bytes_match_the_stored_entries_memstore() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    scenario(engine, &|engine| {
        engine.crash_and_recover().unwrap();
        engine
    });
}

#[test]
fn log_bytes_match_the_stored_entries_rocksdb() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().to_path_buf();
    let engine = RocksEngine::open(&path, EngineConfig::default()).unwrap();
    scenario(engine, &|engine| {
        drop(engine);
        RocksEngine::open(&path, EngineConfig::default()).unwrap()
    });
}
