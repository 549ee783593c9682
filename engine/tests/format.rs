//! Goal: a data directory written in another on-disk format is refused
//! with a clear error naming both formats, and nothing is changed. Format 2
//! changed the session record, appends and the raft state record; reading a
//! format-1 directory with it would report corruption or panic on an
//! unapplied entry, so the format is marked and checked at open.

use shoal_engine::backend::{Backend, Cf, WriteSet};
use shoal_engine::keys::{encode_record, meta_format_key};
use shoal_engine::{EngineConfig, EngineError, RocksEngine, FORMAT_VERSION};

#[test]
fn another_format_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    // A new directory is marked, and reopens.
    let engine = RocksEngine::open(&path, EngineConfig::default()).expect("create");
    let key = meta_format_key();
    let mut set = WriteSet::new();
    set.put(
        Cf::Kv,
        b"\0\0\0\0k".to_vec(),
        b"\0\0\0\0\0\0\0\x01v".to_vec(),
    );
    engine.backend().write(set, true).expect("write data");
    drop(engine);
    drop(RocksEngine::open(&path, EngineConfig::default()).expect("reopen"));

    // Another format's marker.
    let engine = RocksEngine::open(&path, EngineConfig::default()).expect("reopen");
    let mut set = WriteSet::new();
    set.put(Cf::Meta, key.to_vec(), encode_record(&key, &1u32));
    engine.backend().write(set, true).expect("write marker");
    drop(engine);
    let err = RocksEngine::open(&path, EngineConfig::default()).unwrap_err();
    assert!(
        matches!(err, EngineError::Format { found: 1, expected } if expected == FORMAT_VERSION),
        "{err}"
    );
    // Refused again: nothing was rewritten.
    let err = RocksEngine::open(&path, EngineConfig::default()).unwrap_err();
    assert!(matches!(err, EngineError::Format { found: 1, .. }), "{err}");
}

#[test]
fn data_without_a_marker_is_an_older_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let engine = RocksEngine::open(&path, EngineConfig::default()).expect("create");
    let mut set = WriteSet::new();
    set.put(
        Cf::Kv,
        b"\0\0\0\0k".to_vec(),
        b"\0\0\0\0\0\0\0\x01v".to_vec(),
    );
    set.delete(Cf::Meta, meta_format_key().to_vec());
    engine.backend().write(set, true).expect("write");
    drop(engine);
    let err = RocksEngine::open(&path, EngineConfig::default()).unwrap_err();
    assert!(matches!(err, EngineError::Format { found: 0, .. }), "{err}");
    assert!(err.to_string().contains("before format markers"), "{err}");
}
