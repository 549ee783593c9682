//! Goal: a corrupt record in the middle of RocksDB's write-ahead log makes
//! opening fail, instead of silently replaying only the writes before it
//! (issue 10, item 9: `PointInTime` recovery opened with every later write
//! lost, acknowledged log entries included); and a torn last record, what
//! a crash during a write leaves, still opens, with everything before it.
//!
//! The WAL outlives a clean close: RocksDB flushes memtables at shutdown
//! only for writes made without the WAL, so after a close the data is in
//! the WAL alone (checked below: no table file holds it yet).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_consensus::{Entry, HardState};
use shoal_engine::{EngineConfig, GroupWrite, LogBatch, RocksEngine};

const GROUP: u64 = 1;
const BATCHES: u64 = 20;
const ENTRIES_PER_BATCH: u64 = 4;
const ENTRY_BYTES: usize = 300;

fn entry(index: u64) -> Entry {
    Entry {
        term: 1,
        index,
        data: Bytes::from(vec![(index % 251) as u8; ENTRY_BYTES]),
        ..Default::default()
    }
}

/// Writes `BATCHES` synced log batches into a new engine at `dir`, closes
/// it, and returns the WAL file holding them.
fn write_and_close(dir: &Path) -> PathBuf {
    let engine = RocksEngine::open(dir, EngineConfig::default()).unwrap();
    for b in 0..BATCHES {
        let first = b * ENTRIES_PER_BATCH + 1;
        let last = first + ENTRIES_PER_BATCH - 1;
        engine
            .write_log(LogBatch {
                groups: vec![GroupWrite {
                    group: GROUP,
                    entries: (first..=last).map(entry).collect(),
                    hard_state: Some(HardState {
                        term: 1,
                        vote: 1,
                        commit: last,
                    }),
                    ..Default::default()
                }],
            })
            .unwrap();
    }
    drop(engine);
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        !files
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "sst")),
        "the close flushed the memtables: the test needs the data in the WAL only"
    );
    let wal = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a WAL file");
    let size = std::fs::metadata(&wal).unwrap().len();
    assert!(
        size > BATCHES * ENTRIES_PER_BATCH * ENTRY_BYTES as u64,
        "the WAL ({size} bytes) holds every batch"
    );
    wal
}

#[test]
fn corrupt_record_in_the_middle_of_the_wal_fails_open() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = write_and_close(tmp.path());
    let mut bytes = std::fs::read(&wal).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&wal, bytes).unwrap();
    match RocksEngine::open(tmp.path(), EngineConfig::default()) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.to_lowercase().contains("corrupt"), "{msg}");
        }
        Ok(engine) => panic!(
            "opened a database whose WAL is corrupt in the middle, with the log ending at {} of {}",
            engine.last_index(GROUP).unwrap(),
            BATCHES * ENTRIES_PER_BATCH
        ),
    }
}

#[test]
fn torn_last_record_of_the_wal_opens_with_the_writes_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = write_and_close(tmp.path());
    let size = std::fs::metadata(&wal).unwrap().len();
    // Cut into the last batch's record, as a crash while writing it would.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(size - 100)
        .unwrap();
    let engine = RocksEngine::open(tmp.path(), EngineConfig::default())
        .expect("a torn tail is what a crash leaves: it must open");
    let last = (BATCHES - 1) * ENTRIES_PER_BATCH;
    assert_eq!(
        engine.last_index(GROUP).unwrap(),
        last,
        "the torn batch alone is lost"
    );
    assert_eq!(engine.group_state(GROUP).unwrap().hard_state.commit, last);
    let entries = engine.entries(GROUP, 1, last + 1, u64::MAX).unwrap();
    assert_eq!(entries, (1..=last).map(entry).collect::<Vec<_>>());
}
