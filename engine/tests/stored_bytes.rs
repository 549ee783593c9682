//! `Engine::stored_bytes` counts every key and value of every column family
//! (the bound of the kvsrv memory test rests on it): data at the very end of
//! the key space included, and the same on RocksDB as in memory.

use bytes::Bytes;
use shoal_engine::keys::SHARD_ID_MAX;
use shoal_engine::{ApplyEntry, Command, EngineConfig, MemStore, Request, RocksEngine};

/// The last group: its last shard's keys are at the end of the key space.
const GROUP: u64 = u64::MAX;
const VALUE_BYTES: usize = 1000;

/// Entry `index`: a session-less put of a 1000-byte value to the last key
/// of the last shard of the last group (all 0xFF but the shard id: the end
/// of the key space).
fn put_at_the_end(index: u64) -> ApplyEntry {
    ApplyEntry {
        index,
        term: 1,
        requests: vec![Request {
            shard: SHARD_ID_MAX,
            client: 0,
            seq: 0,
            command: Command::Put {
                key: Bytes::from(vec![0xFF; 64]),
                value: Bytes::from(vec![b'v'; VALUE_BYTES]),
            },
        }],
    }
}

#[test]
fn stored_bytes_counts_data_at_the_end_of_the_key_space() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let rocks = RocksEngine::open(dir.path(), EngineConfig::default()).unwrap();
    let mem_empty = mem.stored_bytes().unwrap();
    assert_eq!(mem_empty, rocks.stored_bytes().unwrap());
    mem.apply(GROUP, &[put_at_the_end(1)]).unwrap();
    rocks.apply(GROUP, &[put_at_the_end(1)]).unwrap();
    let mem_after = mem.stored_bytes().unwrap();
    // The value and its key (12-byte group and shard prefix, 64-byte user
    // key), plus the applied index in `meta`.
    assert!(
        mem_after >= mem_empty + (VALUE_BYTES + 12 + 64) as u64,
        "{mem_empty} -> {mem_after} bytes"
    );
    assert_eq!(mem_after, rocks.stored_bytes().unwrap());
}
