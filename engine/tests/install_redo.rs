//! Goal: a snapshot install that a crash interrupted can always be dealt
//! with when the engine is reopened (issue 10, item 6). Its redo marker
//! used to name the snapshot directory by absolute path, and reopening
//! failed for good if the files were gone. Now:
//! - the marker names the directory relative to the data directory, so a
//!   data directory moved (or restored) elsewhere still finishes the
//!   install; an install from outside the data directory is refused;
//! - files missing or corrupt before the group's shards were cleared: the
//!   install is discarded, the old data and applied index kept (the leader
//!   will send the snapshot again);
//! - missing or corrupt after they were cleared: opening fails with a typed
//!   error naming the file, rather than serving cleared shards. Files
//!   already ingested are not needed any more.
//!
//! Crashes are simulated with `install_snapshot_crashing_at`, which stops
//! the install where a crash would, leaving its marker; the engine is then
//! dropped (RocksDB) or crashed (MemStore) and reopened.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_engine::snapshot::{InstallCrashPoint, MANIFEST_FILE_NAME};
use shoal_engine::{
    ApplyEntry, Backend, Command, Engine, EngineConfig, EngineError, MemStore, Request,
    RocksEngine, Versioned,
};

const GROUP: u64 = 1;
const SHARD: u32 = 1;
/// Another shard of the group: the snapshot replaces it too.
const OTHER_SHARD: u32 = 2;
/// A group the snapshot does not cover, holding the same shard ids.
const OTHER_GROUP: u64 = 2;

fn put(shard: u32, client: u64, key: &str, value: &str) -> Request {
    Request {
        shard,
        client,
        seq: 1,
        command: Command::Put {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
        },
    }
}

/// Applies keys tagged `tag` at `index` to both shards of `GROUP`.
fn fill<B: Backend>(engine: &Engine<B>, index: u64, tag: &str) {
    fill_group(engine, GROUP, index, tag);
}

/// Applies keys tagged `tag` at `index` to both shards of `group`.
fn fill_group<B: Backend>(engine: &Engine<B>, group: u64, index: u64, tag: &str) {
    let mut requests: Vec<Request> = (0..50)
        .flat_map(|k| {
            [SHARD, OTHER_SHARD].map(|s| put(s, 0, &format!("k{k:02}"), &format!("{tag}-{k}")))
        })
        .collect();
    requests.push(put(SHARD, 7, &format!("only-{tag}"), tag));
    engine
        .apply(
            group,
            &[ApplyEntry {
                index,
                term: 1,
                requests,
            }],
        )
        .unwrap();
    engine.sync().unwrap();
}

fn shard_state<B: Backend>(engine: &Engine<B>, group: u64, shard: u32) -> Vec<(Bytes, Versioned)> {
    let page = engine.scan(group, shard, b"", b"", 1000).unwrap();
    assert!(page.next.is_none());
    page.pairs
}

/// The pairs of both shards of a group.
type GroupPairs = [Vec<(Bytes, Versioned)>; 2];

fn group_state<B: Backend>(engine: &Engine<B>, group: u64) -> GroupPairs {
    [SHARD, OTHER_SHARD].map(|s| shard_state(engine, group, s))
}

/// The data and state the test compares before and after.
struct Expect {
    new: GroupPairs,
    old: GroupPairs,
    /// The target's `OTHER_GROUP`, which no install touches.
    other_group: GroupPairs,
}

/// `source`, at applied index 50, exports `GROUP` into `snapshot` (inside
/// the target's data directory); the target holds other data in `GROUP` at
/// applied index 10, and in `OTHER_GROUP` at 20.
fn prepare<B: Backend>(source: &Engine<B>, target: &Engine<B>, snapshot: &Path) -> Expect {
    fill(source, 50, "new");
    fill(target, 10, "old");
    fill_group(target, OTHER_GROUP, 20, "other");
    let manifest = source.export_snapshot(GROUP, snapshot).unwrap();
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    // No shard records in the source: no meta file.
    assert_eq!(names, ["kv.sst", "dedup.sst"]);
    Expect {
        new: group_state(source, GROUP),
        old: group_state(target, GROUP),
        other_group: group_state(target, OTHER_GROUP),
    }
}

fn assert_other_group_untouched<B: Backend>(engine: &Engine<B>, expect: &Expect) {
    assert_eq!(group_state(engine, OTHER_GROUP), expect.other_group);
    assert_eq!(engine.applied(OTHER_GROUP).unwrap().index, 20);
    assert_eq!(engine.sessions(OTHER_GROUP, SHARD).unwrap(), vec![(7, 1)]);
}

fn assert_new<B: Backend>(engine: &Engine<B>, expect: &Expect) {
    assert_eq!(group_state(engine, GROUP), expect.new);
    assert_eq!(engine.applied(GROUP).unwrap().index, 50);
    assert_eq!(engine.sessions(GROUP, SHARD).unwrap(), vec![(7, 1)]);
    assert!(engine.get(GROUP, SHARD, b"only-old").unwrap().is_none());
    assert_other_group_untouched(engine, expect);
}

fn assert_old<B: Backend>(engine: &Engine<B>, expect: &Expect) {
    assert_eq!(group_state(engine, GROUP), expect.old);
    assert_eq!(engine.applied(GROUP).unwrap().index, 10);
    assert!(engine.get(GROUP, SHARD, b"only-old").unwrap().is_some());
    assert_other_group_untouched(engine, expect);
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

struct Rocks {
    _tmp: tempfile::TempDir,
    data: PathBuf,
}

impl Rocks {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        Rocks { _tmp: tmp, data }
    }
    fn open(&self) -> shoal_engine::Result<RocksEngine> {
        RocksEngine::open(&self.data, EngineConfig::default())
    }
    fn snapshot_dir(&self) -> PathBuf {
        self.data.join("snapshots").join("incoming")
    }
    /// Opens the target and fills it and a source engine (RocksDB too: a
    /// snapshot's files are in its backend's format), exporting into
    /// `snapshot`.
    fn prepare_at(&self, snapshot: &Path) -> (RocksEngine, Expect) {
        let engine = self.open().unwrap();
        let source =
            RocksEngine::open(self.data.with_file_name("source"), EngineConfig::default()).unwrap();
        let expect = prepare(&source, &engine, snapshot);
        (engine, expect)
    }
    fn prepare(&self) -> (RocksEngine, Expect) {
        self.prepare_at(&self.snapshot_dir())
    }
}

/// (a) Crashed at each point, the data directory moved, reopened: the
/// install is finished from the directory's new place.
#[test]
fn interrupted_install_finishes_after_the_data_dir_moved() {
    for at in [
        InstallCrashPoint::AfterMarker,
        InstallCrashPoint::AfterClear,
        InstallCrashPoint::AfterIngest(1),
    ] {
        let rocks = Rocks::new();
        let (engine, expect) = rocks.prepare();
        engine
            .install_snapshot_crashing_at(&rocks.snapshot_dir(), at)
            .unwrap();
        drop(engine);
        let moved = rocks.data.with_file_name("restored-elsewhere");
        std::fs::rename(&rocks.data, &moved).unwrap();
        let engine = RocksEngine::open(&moved, EngineConfig::default())
            .unwrap_or_else(|e| panic!("reopen after a crash at {at:?}: {e}"));
        assert_eq!(engine.interrupted_installs_finished(), 1, "{at:?}");
        assert_new(&engine, &expect);
        assert!(
            !moved.join("snapshots").join("incoming").exists(),
            "the finished install consumed its directory"
        );
        drop(engine);
        let engine = RocksEngine::open(&moved, EngineConfig::default()).unwrap();
        assert_eq!(engine.interrupted_installs_finished(), 0);
        assert_new(&engine, &expect);
    }
}

/// (b) Files gone (or corrupt) before the shards were cleared: reopening
/// discards the install and keeps the old state.
#[test]
fn install_whose_files_vanished_before_the_clear_is_discarded() {
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 3] = [
        ("directory deleted", |dir| {
            std::fs::remove_dir_all(dir).unwrap()
        }),
        ("file corrupt", |dir| flip_byte(&dir.join("kv.sst"))),
        ("manifest deleted", |dir| {
            std::fs::remove_file(dir.join(MANIFEST_FILE_NAME)).unwrap()
        }),
    ];
    for (what, damage) in damages {
        let rocks = Rocks::new();
        let (engine, expect) = rocks.prepare();
        engine
            .install_snapshot_crashing_at(&rocks.snapshot_dir(), InstallCrashPoint::AfterMarker)
            .unwrap();
        drop(engine);
        damage(&rocks.snapshot_dir());
        let engine = rocks
            .open()
            .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        assert_eq!(engine.interrupted_installs_discarded(), 1, "{what}");
        assert_eq!(engine.interrupted_installs_finished(), 0, "{what}");
        assert_old(&engine, &expect);
        drop(engine);
        // The marker is gone: the next open has nothing to do.
        let engine = rocks.open().unwrap();
        assert_eq!(engine.interrupted_installs_discarded(), 0, "{what}");
        assert_old(&engine, &expect);
    }
}

/// (c) A file still to ingest corrupt or missing after the clear: opening
/// fails, naming it. One already ingested is not needed any more.
#[test]
fn install_whose_files_broke_after_the_clear_fails_open_naming_the_file() {
    for (at, file, delete) in [
        (InstallCrashPoint::AfterClear, "kv.sst", false),
        (InstallCrashPoint::AfterIngest(1), "dedup.sst", false),
        (InstallCrashPoint::AfterIngest(1), "dedup.sst", true),
    ] {
        let rocks = Rocks::new();
        let (engine, _) = rocks.prepare();
        engine
            .install_snapshot_crashing_at(&rocks.snapshot_dir(), at)
            .unwrap();
        drop(engine);
        let path = rocks.snapshot_dir().join(file);
        if delete {
            std::fs::remove_file(&path).unwrap();
        } else {
            flip_byte(&path);
        }
        let err = rocks.open().unwrap_err();
        let msg = err.to_string();
        match &err {
            EngineError::SnapshotInstallUnrecoverable {
                group, file: named, ..
            } => {
                assert_eq!(*group, GROUP);
                assert_eq!(named, &path, "{msg}");
            }
            other => panic!("{at:?} {file}: expected an unrecoverable install, got {other:?}"),
        }
        assert!(msg.contains(file) && msg.contains("cleared"), "{msg}");
        // It stays refused: nothing was changed by the failed open.
        assert!(matches!(
            rocks.open().unwrap_err(),
            EngineError::SnapshotInstallUnrecoverable { .. }
        ));
    }
    // Every file ingested, then the whole directory lost: nothing needed.
    let rocks = Rocks::new();
    let (engine, expect) = rocks.prepare();
    engine
        .install_snapshot_crashing_at(&rocks.snapshot_dir(), InstallCrashPoint::AfterIngest(2))
        .unwrap();
    drop(engine);
    std::fs::remove_dir_all(rocks.snapshot_dir()).unwrap();
    let engine = rocks.open().unwrap();
    assert_eq!(engine.interrupted_installs_finished(), 1);
    assert_new(&engine, &expect);
    // The first file (kv) is lost after it was ingested: not needed. (Not
    // corrupted in place: ingestion hard-links it, so the database's table
    // file is the same inode and would be corrupted too.)
    let rocks = Rocks::new();
    let (engine, expect) = rocks.prepare();
    engine
        .install_snapshot_crashing_at(&rocks.snapshot_dir(), InstallCrashPoint::AfterIngest(1))
        .unwrap();
    drop(engine);
    std::fs::remove_file(rocks.snapshot_dir().join("kv.sst")).unwrap();
    let engine = rocks.open().unwrap();
    assert_eq!(engine.interrupted_installs_finished(), 1);
    assert_new(&engine, &expect);
}

#[test]
fn install_from_outside_the_data_dir_is_refused() {
    let rocks = Rocks::new();
    let outside = rocks.data.with_file_name("outside");
    let (engine, expect) = rocks.prepare_at(&outside);
    match engine.install_snapshot(&outside) {
        Err(EngineError::SnapshotDirOutsideDataDir { dir, data_dir }) => {
            assert_eq!(dir, outside);
            assert_eq!(data_dir, rocks.data);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The data directory itself is not a snapshot directory either.
    assert!(matches!(
        engine.install_snapshot(&rocks.data),
        Err(EngineError::SnapshotDirOutsideDataDir { .. })
    ));
    assert_old(&engine, &expect);
    assert!(
        outside.join(MANIFEST_FILE_NAME).exists(),
        "nothing consumed"
    );
}

/// The in-memory engine (no data directory) keeps the path as given, and
/// finishes or discards the same way after a simulated crash.
#[test]
fn memstore_finishes_or_discards_interrupted_installs() {
    let tmp = tempfile::tempdir().unwrap();
    for (n, at) in [
        InstallCrashPoint::AfterMarker,
        InstallCrashPoint::AfterClear,
        InstallCrashPoint::AfterIngest(2),
    ]
    .into_iter()
    .enumerate()
    {
        let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
        let source = MemStore::new_in_memory(EngineConfig::default()).unwrap();
        let dir = tmp.path().join(format!("finish-{n}"));
        let expect = prepare(&source, &engine, &dir);
        engine.install_snapshot_crashing_at(&dir, at).unwrap();
        engine.crash_and_recover().unwrap();
        assert_eq!(engine.interrupted_installs_finished(), 1, "{at:?}");
        assert_new(&engine, &expect);
    }
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let source = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let dir = tmp.path().join("discard");
    let expect = prepare(&source, &engine, &dir);
    engine
        .install_snapshot_crashing_at(&dir, InstallCrashPoint::AfterMarker)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    engine.crash_and_recover().unwrap();
    assert_eq!(engine.interrupted_installs_discarded(), 1);
    assert_old(&engine, &expect);
}
