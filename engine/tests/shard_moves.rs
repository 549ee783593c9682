//! Goal: two groups on one node can hold the same shard without seeing
//! each other's keys or sessions (format 3: `kv` and `dedup` keys start
//! with the group), and a shard moves between groups exactly and
//! crash-atomically:
//! - a group snapshot replaces the whole group (shards it lacks included,
//!   and the shard records) and nothing of another group;
//! - `export_shard` + `install_shard` copy one shard's pairs and sessions
//!   into another group's key range, with the record and applied index the
//!   caller gives, replacing only that shard; a directory for another
//!   target or shard, a damaged file or an `at` already applied is refused
//!   and changes nothing;
//! - a crash anywhere inside `install_shard` leaves, after recovery, the
//!   old state or the new one entirely, never a mix;
//! - `apply_shard_change` with `clear` drops one group's copy of a shard.
//!
//! Each runs on MemStore and on RocksEngine (whose installs must come from
//! inside its data directory: every snapshot directory here is).

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use shoal_engine::keys::{group_range, meta_applied_key, meta_install_key, meta_shard_group_range};
use shoal_engine::snapshot::{InstallCrashPoint, MANIFEST_FILE_NAME};
use shoal_engine::{
    AppliedState, ApplyEntry, Backend, Cf, ClientId, Command, Engine, EngineConfig, EngineError,
    MemStore, Reply, Request, RocksEngine, Session, ShardId, ShardRecord, ShardStatus,
    SnapshotScope, Versioned,
};

/// The source of a move.
const G1: u64 = 1;
/// The destination of a move.
const G2: u64 = 2;
/// A third group, for exports meant for someone else.
const G3: u64 = 3;
/// The shard that moves (held by G1 and G2 alike).
const S: ShardId = 4;
/// Another shard of both groups, which no move touches.
const OTHER: ShardId = 6;

// ---------- helpers ----------

fn put(shard: ShardId, client: ClientId, seq: u64, key: &str, value: &str) -> Request {
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

fn put_if(shard: ShardId, client: ClientId, seq: u64, key: &str, version: u64) -> Request {
    Request {
        shard,
        client,
        seq,
        command: Command::PutIfVersion {
            key: Bytes::from(key.to_string()),
            value: Bytes::from_static(b"cas"),
            version,
        },
    }
}

/// Applies one entry of `requests` at `index` (term 1) to `group`.
fn apply<B: Backend>(
    engine: &Engine<B>,
    group: u64,
    index: u64,
    requests: Vec<Request>,
) -> Vec<Reply> {
    engine
        .apply(
            group,
            &[ApplyEntry {
                index,
                term: 1,
                requests,
            }],
        )
        .unwrap()
        .remove(0)
}

/// Every pair of a shard of a group, in key order.
fn pairs<B: Backend>(engine: &Engine<B>, group: u64, shard: ShardId) -> Vec<(Bytes, Versioned)> {
    let page = engine.scan(group, shard, b"", b"", 1000).unwrap();
    assert!(page.next.is_none());
    page.pairs
}

/// Every session of a shard of a group, with its stored reply.
fn sessions<B: Backend>(
    engine: &Engine<B>,
    group: u64,
    shard: ShardId,
) -> Vec<(ClientId, Session)> {
    engine
        .sessions(group, shard)
        .unwrap()
        .into_iter()
        .map(|(client, seq)| {
            let session = engine.session(group, shard, client).unwrap().unwrap();
            assert_eq!(session.seq, seq);
            (client, session)
        })
        .collect()
}

/// A shard of a group as the API reads it.
#[derive(Debug, Clone, PartialEq)]
struct ShardState {
    pairs: Vec<(Bytes, Versioned)>,
    sessions: Vec<(ClientId, Session)>,
}

fn shard_state<B: Backend>(engine: &Engine<B>, group: u64, shard: ShardId) -> ShardState {
    ShardState {
        pairs: pairs(engine, group, shard),
        sessions: sessions(engine, group, shard),
    }
}

/// Raw pairs of `kv`, `dedup` and `meta`.
type Dump = Vec<(Cf, Vec<u8>, Vec<u8>)>;

fn scan_into<B: Backend>(engine: &Engine<B>, cf: Cf, start: &[u8], end: &[u8], out: &mut Dump) {
    engine
        .backend()
        .scan(cf, start, end, &mut |k, v| {
            out.push((cf, k.to_vec(), v.to_vec()));
            Ok(true)
        })
        .unwrap();
}

/// Everything of the state machines on the engine, raw: every group's data,
/// sessions, shard records, applied states and install markers.
fn dump<B: Backend>(engine: &Engine<B>) -> Dump {
    let mut out = Vec::new();
    for cf in [Cf::Kv, Cf::Dedup, Cf::Meta] {
        scan_into(engine, cf, &[], &[0xff; 17], &mut out);
    }
    out
}

/// Everything of one group's state machine, raw: its data, sessions,
/// shard records, applied state and install marker.
fn dump_group<B: Backend>(engine: &Engine<B>, group: u64) -> Dump {
    let mut out = Vec::new();
    let (start, end) = group_range(group);
    scan_into(engine, Cf::Kv, &start, &end, &mut out);
    scan_into(engine, Cf::Dedup, &start, &end, &mut out);
    let (start, end) = meta_shard_group_range(group);
    scan_into(engine, Cf::Meta, &start, &end, &mut out);
    for key in [meta_applied_key(group), meta_install_key(group)] {
        if let Some(v) = engine.backend().get(Cf::Meta, &key).unwrap() {
            out.push((Cf::Meta, key.to_vec(), v));
        }
    }
    out
}

fn record(num: u64, status: ShardStatus) -> ShardRecord {
    ShardRecord { num, status }
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

/// Runs `check` on a MemStore, then on a RocksEngine in a fresh data
/// directory; `check` gets the engine and the directory to put snapshot
/// directories in (inside the RocksEngine's data directory, where its
/// installs must come from).
fn on_both(check: fn(&MemStore, &Path), check_rocks: fn(&RocksEngine, &Path)) {
    let tmp = tempfile::tempdir().unwrap();
    check(
        &MemStore::new_in_memory(EngineConfig::default()).unwrap(),
        &tmp.path().join("mem"),
    );
    let data = tmp.path().join("rocks");
    check_rocks(
        &RocksEngine::open(&data, EngineConfig::default()).unwrap(),
        &data,
    );
}

// ---------- two groups, one shard id ----------

/// G1 and G2 both write shard `S` (same keys, same clients), each from its
/// own log.
fn fill_two_groups<B: Backend>(engine: &Engine<B>) {
    apply(
        engine,
        G1,
        1,
        vec![put(S, 7, 1, "a", "g1"), put(S, 0, 0, "only-g1", "x")],
    );
    apply(
        engine,
        G2,
        1,
        vec![
            put(S, 7, 5, "a", "g2"),
            put(S, 0, 0, "a", "g2-again"),
            put(S, 8, 1, "only-g2", "y"),
        ],
    );
}

fn groups_are_isolated<B: Backend>(engine: &Engine<B>) {
    fill_two_groups(engine);
    assert_eq!(
        engine.get(G1, S, b"a").unwrap(),
        Some(Versioned {
            value: Bytes::from_static(b"g1"),
            version: 1
        })
    );
    assert_eq!(
        engine.get(G2, S, b"a").unwrap(),
        Some(Versioned {
            value: Bytes::from_static(b"g2-again"),
            version: 2
        })
    );
    assert!(engine.get(G1, S, b"only-g2").unwrap().is_none());
    assert!(engine.get(G2, S, b"only-g1").unwrap().is_none());
    let keys = |group| {
        pairs(engine, group, S)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(G1), ["a", "only-g1"]);
    assert_eq!(keys(G2), ["a", "only-g2"]);
    assert_eq!(engine.sessions(G1, S).unwrap(), vec![(7, 1)]);
    assert_eq!(engine.sessions(G2, S).unwrap(), vec![(7, 5), (8, 1)]);
    assert!(engine.session(G1, S, 8).unwrap().is_none());
    assert_eq!(engine.session_footprint(G1, S).unwrap().0, 1);
    assert_eq!(engine.session_footprint(G2, S).unwrap().0, 2);
    assert!(engine.sessions(G3, S).unwrap().is_empty());
    assert!(pairs(engine, G3, S).is_empty());

    // Client 7's seq 5 is a retry in G2 only: in G1 it is new, and applied.
    let g2_before = dump_group(engine, G2);
    assert_eq!(
        apply(engine, G1, 2, vec![put(S, 7, 5, "a", "g1-5")]),
        vec![Reply::Written { version: 2 }]
    );
    assert_eq!(
        apply(engine, G2, 2, vec![put(S, 7, 5, "a", "ignored")]),
        vec![Reply::Written { version: 1 }],
        "G2's own session answers the retry"
    );
    assert_eq!(engine.get(G2, S, b"a").unwrap().unwrap().version, 2);
    // Expiring G2's sessions leaves G1's.
    let expired = apply(
        engine,
        G2,
        3,
        vec![Request {
            shard: S,
            client: 0,
            seq: 0,
            command: Command::ExpireSessions {
                sessions: vec![(7, 5), (8, 1)],
            },
        }],
    );
    assert_eq!(expired, vec![Reply::SessionsExpired { count: 2 }]);
    assert_eq!(engine.sessions(G1, S).unwrap(), vec![(7, 5)]);
    assert!(engine.sessions(G2, S).unwrap().is_empty());
    // G2's data did not move: only its applied index and sessions changed.
    let data = |d: Dump| {
        d.into_iter()
            .filter(|(cf, _, _)| *cf == Cf::Kv)
            .collect::<Dump>()
    };
    assert_eq!(data(dump_group(engine, G2)), data(g2_before));
}

#[test]
fn groups_holding_the_same_shard_are_isolated() {
    groups_are_isolated(&MemStore::new_in_memory(EngineConfig::default()).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    groups_are_isolated(&RocksEngine::open(tmp.path(), EngineConfig::default()).unwrap());
}

// ---------- group snapshots ----------

/// The exporter: G1 at applied index 40 with shards `S` and `OTHER`, and
/// records for `S` (frozen) and 7 (serving). The target: G1 at 10 with
/// shards `S` and 5, records for `S` and 5; and G2 holding `S` too.
fn group_snapshot_case<B: Backend>(source: &Engine<B>, target: &Engine<B>, dir: &Path) {
    const LACKED: ShardId = 5;
    for i in 1..=39 {
        apply(
            source,
            G1,
            i,
            vec![put(S, 0, 0, &format!("k{}", i % 10), "new")],
        );
    }
    apply(
        source,
        G1,
        40,
        vec![put(S, 7, 3, "k1", "new"), put(OTHER, 9, 1, "o", "new")],
    );
    source
        .apply_shard_change(
            G1,
            AppliedState { index: 41, term: 2 },
            S,
            record(3, ShardStatus::Frozen),
            false,
        )
        .unwrap();
    source
        .apply_shard_change(
            G1,
            AppliedState { index: 42, term: 2 },
            7,
            record(2, ShardStatus::Serving),
            false,
        )
        .unwrap();

    apply(
        target,
        G1,
        9,
        vec![
            put(S, 7, 1, "k1", "old"),
            put(S, 8, 1, "only-old", "old"),
            put(LACKED, 8, 2, "lacked", "old"),
            put(LACKED, 0, 0, "lacked-2", "old"),
        ],
    );
    for shard in [S, LACKED] {
        let at = target.applied(G1).unwrap().index + 1;
        target
            .apply_shard_change(
                G1,
                AppliedState { index: at, term: 1 },
                shard,
                record(1, ShardStatus::Serving),
                false,
            )
            .unwrap();
    }
    apply(target, G2, 1, vec![put(S, 7, 1, "k1", "g2")]);
    target
        .apply_shard_change(
            G2,
            AppliedState { index: 2, term: 1 },
            S,
            record(1, ShardStatus::Serving),
            false,
        )
        .unwrap();
    let g2_before = dump_group(target, G2);
    assert_eq!(target.shard_records(G1).unwrap().len(), 2);

    let manifest = source.export_snapshot(G1, dir).unwrap();
    assert_eq!(manifest.scope, SnapshotScope::Group);
    assert_eq!(manifest.group, G1);
    assert_eq!(manifest.applied, AppliedState { index: 42, term: 2 });
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["kv.sst", "dedup.sst", "meta.sst"]);
    let meta = &manifest.files[2];
    assert_eq!((meta.cf.as_str(), meta.entries), ("meta", 2));

    target.install_snapshot(dir).unwrap();
    assert!(!dir.exists(), "the install consumed its directory");
    // G1 is the exporter's, whole: the lacked shard is gone, data,
    // sessions and records alike.
    assert_eq!(dump_group(target, G1), dump_group(source, G1));
    for shard in [S, OTHER, LACKED] {
        assert_eq!(
            shard_state(target, G1, shard),
            shard_state(source, G1, shard)
        );
    }
    assert!(pairs(target, G1, LACKED).is_empty());
    assert!(target.sessions(G1, LACKED).unwrap().is_empty());
    assert_eq!(target.session_footprint(G1, LACKED).unwrap(), (0, 0));
    assert!(target.get(G1, S, b"only-old").unwrap().is_none());
    assert_eq!(
        target.shard_records(G1).unwrap(),
        source.shard_records(G1).unwrap()
    );
    assert_eq!(
        target.shard_records(G1).unwrap(),
        BTreeMap::from([
            (S, record(3, ShardStatus::Frozen)),
            (7, record(2, ShardStatus::Serving)),
        ])
    );
    assert_eq!(target.applied(G1).unwrap(), manifest.applied);
    // G2, holding the same shard id, is untouched.
    assert_eq!(dump_group(target, G2), g2_before);
    assert_eq!(target.get(G2, S, b"k1").unwrap().unwrap().value, "g2");
    // Client 7's seq 3 came with the snapshot: a retry, answered from it.
    assert_eq!(
        apply(target, G1, 43, vec![put(S, 7, 3, "k1", "retry")]),
        vec![source.session(G1, S, 7).unwrap().unwrap().reply]
    );
    assert_eq!(target.get(G1, S, b"k1").unwrap().unwrap().value, "new");
}

#[test]
fn group_snapshot_replaces_the_group_and_only_it() {
    let tmp = tempfile::tempdir().unwrap();
    let source = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let target = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    group_snapshot_case(&source, &target, &tmp.path().join("mem-snapshot"));

    let source = RocksEngine::open(tmp.path().join("source"), EngineConfig::default()).unwrap();
    let target = RocksEngine::open(tmp.path().join("target"), EngineConfig::default()).unwrap();
    group_snapshot_case(
        &source,
        &target,
        &tmp.path().join("target").join("snapshot"),
    );
}

/// A shard export is not a group snapshot, and the other way round.
fn scopes_case<B: Backend>(e: &Engine<B>, snapshots: &Path) {
    setup_move(e);
    let before = dump(e);
    let dir = snapshots.join("shard-export");
    e.export_shard(G1, S, G1, &dir).unwrap();
    let err = e.install_snapshot(&dir).unwrap_err();
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    assert!(dir.join(MANIFEST_FILE_NAME).exists(), "nothing consumed");
    let dir = snapshots.join("group-export");
    e.export_snapshot(G2, &dir).unwrap();
    let err = e.install_shard(G2, AT, S, RECORD, &dir).unwrap_err();
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    assert!(dir.join(MANIFEST_FILE_NAME).exists(), "nothing consumed");
    assert_eq!(dump(e), before);
}

#[test]
fn scopes_are_not_interchangeable() {
    on_both(scopes_case, scopes_case);
}

// ---------- shard moves ----------

/// The entry of G2 that installs the shard.
const AT: AppliedState = AppliedState { index: 31, term: 2 };
/// G2's record of `S` once it is installed.
const RECORD: ShardRecord = ShardRecord {
    num: 4,
    status: ShardStatus::Serving,
};

/// One engine hosting both ends of a move (deterministic, so two engines
/// set up alike hold the same bytes): G1 at applied index 40 with shards
/// `S` (pairs of several versions, sessions with different replies) and
/// `OTHER`, its record of `S` frozen; G2 at 30 with its own, older, copy
/// of `S` (a session G1 lacks) and of `OTHER`, its record of `S` absent.
/// Synced.
fn setup_move<B: Backend>(engine: &Engine<B>) {
    for i in 1..=36 {
        apply(
            engine,
            G1,
            i,
            vec![put(S, 0, 0, &format!("k{:02}", i % 12), &format!("v{i}"))],
        );
    }
    apply(
        engine,
        G1,
        37,
        vec![
            put(S, 7, 1, "k00", "client-7"),
            put_if(S, 8, 3, "k01", 1),
            put_if(S, 9, 1, "k02", 3),
            put(OTHER, 7, 2, "o", "g1"),
        ],
    );
    apply(engine, G1, 38, vec![]);
    apply(engine, G1, 39, vec![]);
    engine
        .apply_shard_change(
            G1,
            AppliedState { index: 40, term: 1 },
            S,
            record(3, ShardStatus::Frozen),
            false,
        )
        .unwrap();

    apply(
        engine,
        G2,
        28,
        vec![
            put(S, 5, 1, "old-only", "g2"),
            put(S, 0, 0, "k00", "g2"),
            put(OTHER, 5, 2, "o", "g2"),
            put(OTHER, 0, 0, "p", "g2"),
        ],
    );
    apply(engine, G2, 29, vec![]);
    engine
        .apply_shard_change(
            G2,
            AppliedState { index: 30, term: 1 },
            S,
            record(2, ShardStatus::Absent),
            false,
        )
        .unwrap();
    engine.sync().unwrap();
}

/// What the move test compares.
struct MoveExpect {
    source_s: ShardState,
    source_group: Dump,
    g2_other: ShardState,
    g2_records: BTreeMap<ShardId, ShardRecord>,
    /// The whole engine before and after the install.
    old: Dump,
    new: Dump,
}

/// The states before and after a move, from a reference MemStore (the
/// RocksEngine's dumps must be the very same bytes).
fn move_expect() -> MoveExpect {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    setup_move(&engine);
    let old = dump(&engine);
    let expect = MoveExpect {
        source_s: shard_state(&engine, G1, S),
        source_group: dump_group(&engine, G1),
        g2_other: shard_state(&engine, G2, OTHER),
        g2_records: engine.shard_records(G2).unwrap(),
        old,
        new: Vec::new(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("move");
    engine.export_shard(G1, S, G2, &dir).unwrap();
    engine.install_shard(G2, AT, S, RECORD, &dir).unwrap();
    MoveExpect {
        new: dump(&engine),
        ..expect
    }
}

/// G2 holds the moved shard exactly, and nothing else changed.
fn assert_moved<B: Backend>(engine: &Engine<B>, expect: &MoveExpect) {
    assert_eq!(shard_state(engine, G2, S), expect.source_s);
    assert_eq!(engine.applied(G2).unwrap(), AT);
    let mut records = expect.g2_records.clone();
    records.insert(S, RECORD);
    assert_eq!(engine.shard_records(G2).unwrap(), records);
    assert_eq!(shard_state(engine, G2, OTHER), expect.g2_other);
    assert_eq!(dump_group(engine, G1), expect.source_group, "G1 unchanged");
    assert!(engine.get(G2, S, b"old-only").unwrap().is_none());
    assert!(engine.session(G2, S, 5).unwrap().is_none());
    assert_eq!(dump(engine), expect.new);
}

/// G2 is as before the move (and so is everything else).
fn assert_not_moved<B: Backend>(engine: &Engine<B>, expect: &MoveExpect) {
    assert_eq!(
        engine.applied(G2).unwrap(),
        AppliedState { index: 30, term: 1 }
    );
    assert_eq!(engine.shard_records(G2).unwrap(), expect.g2_records);
    assert!(engine.get(G2, S, b"old-only").unwrap().is_some());
    assert_eq!(dump(engine), expect.old);
}

fn move_case<B: Backend>(e: &Engine<B>, snapshots: &Path) {
    let expect = move_expect();
    assert_ne!(expect.old, expect.new);
    assert_eq!(expect.source_s.sessions.len(), 3);
    assert!(
        expect.source_s.pairs.iter().any(|(_, v)| v.version > 1),
        "versions above 1 travel"
    );
    setup_move(e);
    assert_eq!(dump(e), expect.old, "same setup, same bytes");
    let dir = snapshots.join("move");
    let manifest = e.export_shard(G1, S, G2, &dir).unwrap();
    assert_eq!(
        manifest.scope,
        SnapshotScope::Shard {
            shard: S,
            target: G2
        }
    );
    assert_eq!(manifest.group, G1);
    assert_eq!(manifest.applied, AppliedState { index: 40, term: 1 });
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["kv.sst", "dedup.sst"]);
    assert_eq!(manifest.files[1].entries, 3);
    // The export changed nothing.
    assert_eq!(dump(e), expect.old);

    e.install_shard(G2, AT, S, RECORD, &dir).unwrap();
    assert!(!dir.exists(), "the install consumed its directory");
    assert_moved(e, &expect);
    // Sessions answer retries in their new group: client 8's conditional
    // put is not applied again.
    let reply = expect.source_s.sessions[1].1.reply.clone();
    assert_eq!(
        apply(e, G2, AT.index + 1, vec![put_if(S, 8, 3, "k01", 1)]),
        vec![reply]
    );
    assert_eq!(e.get(G2, S, b"k01").unwrap(), e.get(G1, S, b"k01").unwrap());
    // And the moved shard is G2's to write, apart from G1's copy.
    let version = e.get(G1, S, b"k01").unwrap().unwrap().version;
    assert_eq!(
        apply(e, G2, AT.index + 2, vec![put(S, 8, 4, "k01", "g2")]),
        vec![Reply::Written {
            version: version + 1
        }]
    );
    assert_eq!(expect.source_s.pairs[1].0, "k01");
    assert_eq!(
        e.get(G1, S, b"k01").unwrap().unwrap(),
        expect.source_s.pairs[1].1,
        "G1's copy is its own"
    );
}

#[test]
fn shard_move_copies_the_shard_exactly() {
    on_both(move_case, move_case);
}

/// The move works across engines too (the usual case: another node).
#[test]
fn shard_move_between_engines() {
    let expect = move_expect();
    let tmp = tempfile::tempdir().unwrap();
    let source = RocksEngine::open(tmp.path().join("source"), EngineConfig::default()).unwrap();
    let target = RocksEngine::open(tmp.path().join("target"), EngineConfig::default()).unwrap();
    setup_move(&source);
    setup_move(&target);
    let dir = tmp.path().join("target").join("incoming");
    source.export_shard(G1, S, G2, &dir).unwrap();
    target.install_shard(G2, AT, S, RECORD, &dir).unwrap();
    assert_moved(&target, &expect);
    assert_eq!(dump(&source), expect.old, "the source is unchanged");
}

/// An empty shard moves too: the target's copy is emptied.
fn empty_move_case<B: Backend>(e: &Engine<B>, snapshots: &Path) {
    const EMPTY: ShardId = 9;
    setup_move(e);
    apply(e, G2, 31, vec![put(EMPTY, 1, 1, "x", "g2")]);
    let dir = snapshots.join("empty");
    let manifest = e.export_shard(G1, EMPTY, G2, &dir).unwrap();
    assert!(manifest.files.is_empty());
    let other = shard_state(e, G2, OTHER);
    let at = AppliedState { index: 32, term: 2 };
    e.install_shard(G2, at, EMPTY, RECORD, &dir).unwrap();
    assert_eq!(
        shard_state(e, G2, EMPTY),
        ShardState {
            pairs: vec![],
            sessions: vec![]
        }
    );
    assert_eq!(e.shard_records(G2).unwrap()[&EMPTY], RECORD);
    assert_eq!(e.applied(G2).unwrap(), at);
    assert_eq!(shard_state(e, G2, OTHER), other);
}

#[test]
fn moving_an_empty_shard_clears_the_target_copy() {
    on_both(empty_move_case, empty_move_case);
}

fn bad_installs_case<B: Backend>(e: &Engine<B>, snapshots: &Path) {
    let expect = move_expect();
    setup_move(e);
    let fresh = |name: &str, shard: ShardId, to: u64| {
        let dir = snapshots.join(name);
        e.export_shard(G1, shard, to, &dir).unwrap();
        dir
    };
    let refused = |what: &str, dir: &Path, at: AppliedState| {
        let err = e.install_shard(G2, at, S, RECORD, dir).unwrap_err();
        assert_not_moved(e, &expect);
        assert!(dir.exists(), "{what}: the directory is not consumed");
        err
    };
    // Exported for another target group, or for another shard.
    let err = refused("another target", &fresh("for-g3", S, G3), AT);
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    let err = refused("another shard", &fresh("other-shard", OTHER, G2), AT);
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    // Damaged files.
    let dir = fresh("flipped", S, G2);
    flip_byte(&dir.join("kv.sst"));
    let err = refused("corrupt kv", &dir, AT);
    assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("kv.sst"), "{err}");
    let dir = fresh("truncated", S, G2);
    truncate(&dir.join("dedup.sst"));
    let err = refused("truncated dedup", &dir, AT);
    assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("dedup.sst"), "{err}");
    let dir = fresh("manifest", S, G2);
    truncate(&dir.join(MANIFEST_FILE_NAME));
    let err = refused("truncated manifest", &dir, AT);
    assert!(err.to_string().contains(MANIFEST_FILE_NAME), "{err}");
    let dir = fresh("missing", S, G2);
    std::fs::remove_file(dir.join("kv.sst")).unwrap();
    refused("missing kv", &dir, AT);
    // An entry already applied.
    let dir = fresh("stale", S, G2);
    for index in [30, 29, 0] {
        let err = refused("at applied", &dir, AppliedState { index, term: 2 });
        assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    }
    // The same directory installs once the entry is right.
    e.install_shard(G2, AT, S, RECORD, &dir).unwrap();
    assert_moved(e, &expect);
}

#[test]
fn bad_shard_installs_are_refused_and_change_nothing() {
    on_both(bad_installs_case, bad_installs_case);
}

// ---------- crash atomicity ----------

const CRASH_POINTS: [InstallCrashPoint; 4] = [
    InstallCrashPoint::AfterMarker,
    InstallCrashPoint::AfterClear,
    InstallCrashPoint::AfterIngest(1),
    InstallCrashPoint::AfterIngest(2),
];

#[test]
fn interrupted_shard_install_is_finished_by_memstore_recovery() {
    let expect = move_expect();
    let tmp = tempfile::tempdir().unwrap();
    for (n, at) in CRASH_POINTS.into_iter().enumerate() {
        let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
        setup_move(&engine);
        let dir = tmp.path().join(format!("crash-{n}"));
        engine.export_shard(G1, S, G2, &dir).unwrap();
        engine
            .install_shard_crashing_at(G2, AT, S, RECORD, &dir, at)
            .unwrap();
        engine.crash_and_recover().unwrap();
        assert_eq!(engine.interrupted_installs_finished(), 1, "{at:?}");
        assert_moved(&engine, &expect);
        assert!(!dir.exists(), "{at:?}: the finished install consumed it");
        // Recovering again finds nothing to do, and keeps the new state.
        engine.crash_and_recover().unwrap();
        assert_eq!(engine.interrupted_installs_finished(), 1, "{at:?}");
        assert_moved(&engine, &expect);
    }
}

#[test]
fn interrupted_shard_install_without_its_files_is_discarded_or_refused() {
    let expect = move_expect();
    let tmp = tempfile::tempdir().unwrap();
    // Before the clear: discarded, the old state kept whole.
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    setup_move(&engine);
    let dir = tmp.path().join("discard");
    engine.export_shard(G1, S, G2, &dir).unwrap();
    engine
        .install_shard_crashing_at(G2, AT, S, RECORD, &dir, InstallCrashPoint::AfterMarker)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    engine.crash_and_recover().unwrap();
    assert_eq!(engine.interrupted_installs_discarded(), 1);
    assert_eq!(engine.interrupted_installs_finished(), 0);
    assert_not_moved(&engine, &expect);
    // After the clear: recovery refuses, naming the group.
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    setup_move(&engine);
    let dir = tmp.path().join("unrecoverable");
    engine.export_shard(G1, S, G2, &dir).unwrap();
    engine
        .install_shard_crashing_at(G2, AT, S, RECORD, &dir, InstallCrashPoint::AfterClear)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    match engine.crash_and_recover() {
        Err(EngineError::SnapshotInstallUnrecoverable { group, .. }) => assert_eq!(group, G2),
        other => panic!("expected an unrecoverable install, got {other:?}"),
    }
}

#[test]
fn interrupted_shard_install_is_finished_when_rocksdb_reopens() {
    let expect = move_expect();
    for at in CRASH_POINTS {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data");
        let engine = RocksEngine::open(&path, EngineConfig::default()).unwrap();
        setup_move(&engine);
        let dir = path.join("incoming");
        engine.export_shard(G1, S, G2, &dir).unwrap();
        engine
            .install_shard_crashing_at(G2, AT, S, RECORD, &dir, at)
            .unwrap();
        drop(engine);
        let engine = RocksEngine::open(&path, EngineConfig::default())
            .unwrap_or_else(|e| panic!("reopen after a crash at {at:?}: {e}"));
        assert_eq!(engine.interrupted_installs_finished(), 1, "{at:?}");
        assert_moved(&engine, &expect);
        assert!(!dir.exists(), "{at:?}");
    }
    // The directory lost: before the clear, discarded; after, refused.
    for (at, discarded) in [
        (InstallCrashPoint::AfterMarker, true),
        (InstallCrashPoint::AfterClear, false),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data");
        let engine = RocksEngine::open(&path, EngineConfig::default()).unwrap();
        setup_move(&engine);
        let dir = path.join("incoming");
        engine.export_shard(G1, S, G2, &dir).unwrap();
        engine
            .install_shard_crashing_at(G2, AT, S, RECORD, &dir, at)
            .unwrap();
        drop(engine);
        std::fs::remove_dir_all(&dir).unwrap();
        let reopened = RocksEngine::open(&path, EngineConfig::default());
        if discarded {
            let engine = reopened.unwrap();
            assert_eq!(engine.interrupted_installs_discarded(), 1);
            assert_not_moved(&engine, &expect);
        } else {
            match reopened {
                Err(EngineError::SnapshotInstallUnrecoverable { group, .. }) => {
                    assert_eq!(group, G2)
                }
                other => panic!("expected an unrecoverable install, got {other:?}"),
            }
        }
    }
}

// ---------- apply_shard_change ----------

/// `crash` simulates a crash and recovery where the backend can.
fn shard_change_case<B: Backend>(engine: &Engine<B>, crash: fn(&Engine<B>)) {
    setup_move(engine);
    let g1_other = shard_state(engine, G1, OTHER);
    let g2 = dump_group(engine, G2);
    assert!(!pairs(engine, G1, S).is_empty());
    assert!(!engine.sessions(G1, S).unwrap().is_empty());
    let before = dump(engine);

    // Not above the applied index: refused, nothing written.
    for index in [40, 39] {
        let err = engine
            .apply_shard_change(
                G1,
                AppliedState { index, term: 1 },
                S,
                record(5, ShardStatus::Absent),
                true,
            )
            .unwrap_err();
        assert!(matches!(err, EngineError::Invalid(_)), "{err}");
        assert_eq!(dump(engine), before);
    }

    // The apply cache has `S`'s keys: the clear must drop them too.
    let version = engine.get(G1, S, b"k00").unwrap().unwrap().version;
    assert_eq!(
        apply(engine, G1, 41, vec![put(S, 0, 0, "k00", "cached")]),
        vec![Reply::Written {
            version: version + 1
        }]
    );
    let at = AppliedState { index: 42, term: 3 };
    let absent = record(5, ShardStatus::Absent);
    engine.apply_shard_change(G1, at, S, absent, true).unwrap();
    assert!(pairs(engine, G1, S).is_empty());
    assert!(engine.sessions(G1, S).unwrap().is_empty());
    assert_eq!(engine.session_footprint(G1, S).unwrap(), (0, 0));
    assert_eq!(engine.shard_records(G1).unwrap()[&S], absent);
    assert_eq!(engine.applied(G1).unwrap(), at);
    assert_eq!(shard_state(engine, G1, OTHER), g1_other);
    assert_eq!(dump_group(engine, G2), g2, "G2's copy of the shard stays");
    // Durable with the next synced write, like an apply.
    engine.sync().unwrap();
    crash(engine);
    assert!(pairs(engine, G1, S).is_empty());
    assert_eq!(engine.shard_records(G1).unwrap()[&S], absent);
    assert_eq!(engine.applied(G1).unwrap(), at);
    // Written afresh: version 1, and client 7's old seq is new again.
    assert_eq!(
        apply(
            engine,
            G1,
            43,
            vec![put(S, 0, 0, "k00", "fresh"), put(S, 7, 1, "k05", "fresh")]
        ),
        vec![Reply::Written { version: 1 }, Reply::Written { version: 1 }]
    );

    // Without `clear`: only the record (and applied index) change.
    let data = pairs(engine, G1, S);
    let serving = record(6, ShardStatus::Serving);
    engine
        .apply_shard_change(G1, AppliedState { index: 44, term: 3 }, S, serving, false)
        .unwrap();
    assert_eq!(pairs(engine, G1, S), data);
    assert_eq!(engine.sessions(G1, S).unwrap(), vec![(7, 1)]);
    assert_eq!(engine.shard_records(G1).unwrap()[&S], serving);
    assert_eq!(engine.applied(G1).unwrap().index, 44);
    assert_eq!(dump_group(engine, G2), g2);
}

#[test]
fn apply_shard_change_clears_one_groups_copy() {
    shard_change_case(
        &MemStore::new_in_memory(EngineConfig::default()).unwrap(),
        |mem| mem.crash_and_recover().unwrap(),
    );
    let tmp = tempfile::tempdir().unwrap();
    shard_change_case(
        &RocksEngine::open(tmp.path(), EngineConfig::default()).unwrap(),
        |_| {},
    );
}

/// A session record's checksum covers its shard and client (not its group,
/// so a moved shard's records stay valid): one copied under another client
/// or shard is reported corrupt.
#[test]
fn session_records_copied_under_another_key_are_caught() {
    use shoal_engine::backend::{View, WriteSet};
    use shoal_engine::keys::dedup_key;
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    apply(&engine, G1, 1, vec![put(S, 7, 1, "a", "v")]);
    let record = engine
        .backend()
        .get(Cf::Dedup, &dedup_key(G1, S, 7))
        .unwrap()
        .unwrap();
    let mut set = WriteSet::new();
    set.put(Cf::Dedup, dedup_key(G2, S, 7).to_vec(), record.clone());
    set.put(Cf::Dedup, dedup_key(G1, S, 8).to_vec(), record.clone());
    set.put(Cf::Dedup, dedup_key(G1, OTHER, 7).to_vec(), record);
    engine.backend().write(set, true).unwrap();
    assert_eq!(
        engine.session(G2, S, 7).unwrap(),
        engine.session(G1, S, 7).unwrap()
    );
    for (shard, client) in [(S, 8), (OTHER, 7)] {
        let err = engine.session(G1, shard, client).unwrap_err();
        assert!(matches!(err, EngineError::Corrupt(_)), "{err}");
    }
}

// ---------- copy before freeze ----------

/// The move of `precopy_case` in two parts: what G1's shard `S` holds when
/// the pre-copy is taken (part 1), then what happens to it before the
/// freeze (part 2: keys updated, deleted, created, sessions written, then
/// the freeze). G2 holds an older copy of `S` of its own. Returns the user
/// keys part 2 writes.
fn precopy_script<B: Backend>(engine: &Engine<B>, part: u8) -> Vec<Bytes> {
    let keys = |requests: &[Request]| -> Vec<Bytes> {
        requests
            .iter()
            .filter(|r| r.shard == S)
            .filter_map(|r| match &r.command {
                Command::Put { key, .. }
                | Command::PutIfVersion { key, .. }
                | Command::Delete { key } => Some(key.clone()),
                _ => None,
            })
            .collect()
    };
    let delete = |key: &str| Request {
        shard: S,
        client: 0,
        seq: 0,
        command: Command::Delete {
            key: Bytes::from(key.to_string()),
        },
    };
    if part == 1 {
        for i in 1..=20 {
            apply(
                engine,
                G1,
                i,
                vec![put(S, 0, 0, &format!("k{:02}", i % 12), &format!("v{i}"))],
            );
        }
        apply(
            engine,
            G1,
            21,
            vec![put(S, 0, 0, "doomed", "x"), put(S, 7, 1, "k00", "client-7")],
        );
        apply(engine, G2, 28, vec![put(S, 5, 1, "old-only", "g2")]);
        return Vec::new();
    }
    let mut written = Vec::new();
    let steps: Vec<Vec<Request>> = vec![
        vec![put(S, 0, 0, "k03", "after"), delete("doomed")],
        vec![put(S, 0, 0, "fresh", "new"), put(OTHER, 0, 0, "o", "g1")],
        vec![put_if(S, 8, 1, "k05", 2), put(S, 7, 2, "k00", "again")],
        vec![delete("never-was")],
    ];
    for (i, requests) in steps.into_iter().enumerate() {
        written.extend(keys(&requests));
        apply(engine, G1, 22 + i as u64, requests);
    }
    engine
        .apply_shard_change(
            G1,
            AppliedState { index: 30, term: 1 },
            S,
            record(3, ShardStatus::Frozen),
            false,
        )
        .unwrap();
    written
}

/// A move copied before its freeze (a pre-copy, then what changed since)
/// installs exactly what a move of the whole shard at the freeze does.
fn precopy_case<B: Backend>(e: &Engine<B>, snapshots: &Path) {
    // The reference: the whole shard exported at the freeze (a MemStore;
    // the RocksEngine's bytes must be the same).
    let reference = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    precopy_script(&reference, 1);
    precopy_script(&reference, 2);
    let tmp = tempfile::tempdir().unwrap();
    reference
        .export_shard(G1, S, G2, &tmp.path().join("full"))
        .unwrap();
    reference
        .install_shard(G2, AT, S, RECORD, &tmp.path().join("full"))
        .unwrap();

    precopy_script(e, 1);
    let base_dir = snapshots.join("precopy-base");
    let base = e.export_shard_base(G1, S, G2, &base_dir).unwrap();
    let names: Vec<&str> = base.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["kv.sst"], "a pre-copy carries data, not sessions");
    assert_eq!(base.applied, AppliedState { index: 21, term: 1 });
    let written = precopy_script(e, 2);
    let dir = snapshots.join("precopy-final");
    // A base for another shard is refused.
    let mut wrong = base.clone();
    wrong.scope = SnapshotScope::Shard {
        shard: OTHER,
        target: G2,
    };
    assert!(e
        .export_shard_delta(G1, S, G2, &dir, &wrong, "base.sst", &written)
        .is_err());
    let _ = std::fs::remove_dir_all(&dir);
    let manifest = e
        .export_shard_delta(G1, S, G2, &dir, &base, "base.sst", &written)
        .unwrap();
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["base.sst", "kv-delta.sst", "dedup.sst"]);
    assert_eq!(manifest.files[0].crc32, base.files[0].crc32);
    // "k03", "doomed", "fresh", "k05", "k00", "never-was".
    assert_eq!(manifest.files[1].entries, 6);
    assert!(
        !dir.join("base.sst").exists(),
        "the base is not copied again"
    );
    // The destination puts the pre-copied file in place, then installs.
    std::fs::hard_link(base_dir.join("kv.sst"), dir.join("base.sst")).unwrap();
    e.install_shard(G2, AT, S, RECORD, &dir).unwrap();
    assert_eq!(shard_state(e, G2, S), shard_state(&reference, G2, S));
    assert!(e.get(G2, S, b"doomed").unwrap().is_none());
    assert!(e.get(G2, S, b"old-only").unwrap().is_none());
    assert_eq!(
        e.get(G2, S, b"fresh").unwrap().unwrap().value,
        Bytes::from_static(b"new")
    );
    assert_eq!(dump(e), dump(&reference), "the very same bytes");
}

#[test]
fn a_shard_copied_before_its_freeze_moves_exactly() {
    on_both(precopy_case, precopy_case);
}

/// Files the caller vouches for (`install_shard_verified`: checksummed
/// when they arrived) skip only their checksum: a wrong size is still
/// refused, every other file is still verified in full, and a refused
/// install changes nothing.
fn verified_case<B: Backend>(e: &Engine<B>, snapshots: &Path) {
    let expect = move_expect();
    setup_move(e);
    let vouched = ["dedup.sst".to_string()];
    let dir = snapshots.join("short");
    e.export_shard(G1, S, G2, &dir).unwrap();
    truncate(&dir.join("dedup.sst"));
    assert!(e
        .install_shard_verified(G2, AT, S, RECORD, &dir, &vouched)
        .is_err());
    assert_not_moved(e, &expect);
    let dir = snapshots.join("flipped");
    e.export_shard(G1, S, G2, &dir).unwrap();
    flip_byte(&dir.join("kv.sst"));
    assert!(e
        .install_shard_verified(G2, AT, S, RECORD, &dir, &vouched)
        .is_err());
    assert_not_moved(e, &expect);
    let dir = snapshots.join("good");
    e.export_shard(G1, S, G2, &dir).unwrap();
    let all = ["kv.sst".to_string(), "dedup.sst".to_string()];
    e.install_shard_verified(G2, AT, S, RECORD, &dir, &all)
        .unwrap();
    assert_moved(e, &expect);
}

#[test]
fn vouched_files_skip_only_their_checksum() {
    on_both(verified_case, verified_case);
}
