//! Goal: a backup restores to exactly the state its groups were in when it
//! was taken (data, versions, sessions, shard records, applied index,
//! membership, hosting), and a damaged backup — any one file with a
//! flipped byte, truncated or missing, or a bad manifest — is refused with
//! an error naming the file, creating nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use shoal_consensus::ConfState;
use shoal_engine::backup::{
    restore_backup, verify_backup, BackupError, ManifestProblem, RestoreError, RestoreOptions,
    BACKUP_MANIFEST_FILE_NAME,
};
use shoal_engine::{
    AppliedState, ApplyEntry, Command, EngineConfig, GroupWrite, LogBatch, Request, RocksEngine,
    ShardRecord, ShardStatus, Versioned,
};

/// A static group and a hosted one, as on a sharded node.
const STATIC_GROUP: u64 = 1;
const HOSTED_GROUP: u64 = 5;
const VOTERS: [u64; 3] = [1, 2, 3];

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

fn open(dir: &Path) -> RocksEngine {
    RocksEngine::open(dir, EngineConfig::default()).unwrap()
}

/// Writes `group`'s membership (and hosts it if `hosted`), sets records
/// for shards 1 and 2 at index 1, then applies `entries` entries of puts
/// (several versions of some keys, sessions of two clients).
fn fill(engine: &RocksEngine, group: u64, hosted: bool, entries: u64, tag: &str) {
    if hosted {
        engine.host_group(group, &VOTERS).unwrap();
    } else {
        engine
            .write_log(LogBatch {
                groups: vec![GroupWrite {
                    group,
                    conf_state: Some(ConfState {
                        voters: VOTERS.to_vec(),
                        learners: Vec::new(),
                    }),
                    ..Default::default()
                }],
            })
            .unwrap();
    }
    let record = |num, status| ShardRecord { num, status };
    engine
        .apply_shard_changes(
            group,
            AppliedState { index: 1, term: 1 },
            &[
                (1, record(3, ShardStatus::Serving), false),
                (2, record(4, ShardStatus::Frozen), false),
                (9, record(5, ShardStatus::Absent), false),
            ],
        )
        .unwrap();
    extend(engine, group, 2, entries, tag);
}

/// Applies entries `first..first + count` of puts to `group`.
fn extend(engine: &RocksEngine, group: u64, first: u64, count: u64, tag: &str) {
    for index in first..first + count {
        let mut requests = Vec::new();
        for shard in 1..=2 {
            for k in 0..20 {
                requests.push(put(
                    shard,
                    0,
                    0,
                    &format!("k{:03}", (index * 7 + k) % 50),
                    &format!("{tag}-{index}-{k}"),
                ));
            }
            requests.push(put(shard, 100 + index % 2, index, "session-key", tag));
        }
        engine
            .apply(
                group,
                &[ApplyEntry {
                    index,
                    term: 2 + index / 10,
                    requests,
                }],
            )
            .unwrap();
    }
}

/// Everything a group's state machine holds, comparable.
#[derive(Debug, PartialEq, Eq)]
struct GroupImage {
    applied: AppliedState,
    records: BTreeMap<u32, ShardRecord>,
    pairs: Vec<(u32, Vec<(Bytes, Versioned)>)>,
    sessions: Vec<(u32, Vec<(u64, u64)>)>,
}

fn image(engine: &RocksEngine, group: u64) -> GroupImage {
    let mut pairs = Vec::new();
    let mut sessions = Vec::new();
    for shard in [1, 2, 9] {
        let page = engine.scan(group, shard, b"", b"", 10_000).unwrap();
        assert!(page.next.is_none());
        pairs.push((shard, page.pairs));
        sessions.push((shard, engine.sessions(group, shard).unwrap()));
    }
    GroupImage {
        applied: engine.applied(group).unwrap(),
        records: engine.shard_records(group).unwrap(),
        pairs,
        sessions,
    }
}

/// A source engine with both groups filled, backed up into `backup`;
/// returns the images at the backup point. Writes more afterwards, which
/// the backup must not hold.
fn source_and_backup(root: &Path) -> (PathBuf, BTreeMap<u64, GroupImage>) {
    let source = open(&root.join("source"));
    fill(&source, STATIC_GROUP, false, 30, "s");
    fill(&source, HOSTED_GROUP, true, 12, "h");
    let images: BTreeMap<u64, GroupImage> = [STATIC_GROUP, HOSTED_GROUP]
        .into_iter()
        .map(|g| (g, image(&source, g)))
        .collect();
    let backup = root.join("backup");
    let manifest = source
        .backup(&[STATIC_GROUP, HOSTED_GROUP], &backup)
        .unwrap();
    assert_eq!(manifest.groups.len(), 2);
    assert_eq!(manifest.groups[0].applied, images[&STATIC_GROUP].applied);
    assert_eq!(manifest.groups[0].shards.len(), 3);
    assert!(manifest.groups[1].hosted && !manifest.groups[0].hosted);
    // Changes after the backup point.
    extend(&source, STATIC_GROUP, 32, 5, "after");
    assert_ne!(image(&source, STATIC_GROUP), images[&STATIC_GROUP]);
    (backup, images)
}

#[test]
fn restore_equals_the_source_at_the_backup_point() {
    let tmp = tempfile::tempdir().unwrap();
    let (backup, images) = source_and_backup(tmp.path());
    let target = tmp.path().join("restored");
    let summary = restore_backup(&backup, &target, &RestoreOptions::default()).unwrap();
    assert_eq!(summary.groups.len(), 2);
    let restored = open(&target);
    for (&group, expected) in &images {
        assert_eq!(&image(&restored, group), expected, "group {group}");
        let state = restored.group_state(group).unwrap();
        assert_eq!(state.conf_state.voters, VOTERS.to_vec());
        assert_eq!(state.truncated_index, expected.applied.index);
        assert_eq!(state.truncated_term, expected.applied.term);
        assert_eq!(state.hard_state.commit, expected.applied.index);
        assert_eq!(restored.last_index(group).unwrap(), expected.applied.index);
    }
    let hosted = restored.hosted_groups().unwrap();
    assert_eq!(
        hosted.keys().copied().collect::<Vec<_>>(),
        vec![HOSTED_GROUP]
    );
    // Nothing staged is left next to the target.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn restore_for_one_node_of_a_new_membership() {
    let tmp = tempfile::tempdir().unwrap();
    let (backup, images) = source_and_backup(tmp.path());
    let target = tmp.path().join("node-7");
    let options = RestoreOptions {
        voters: Some(vec![7, 8, 9]),
        node: Some(7),
        ..Default::default()
    };
    restore_backup(&backup, &target, &options).unwrap();
    let restored = open(&target);
    for (&group, expected) in &images {
        assert_eq!(&image(&restored, group), expected);
        assert_eq!(
            restored.group_state(group).unwrap().conf_state.voters,
            vec![7, 8, 9]
        );
    }
    assert_eq!(
        restored.hosted_groups().unwrap()[&HOSTED_GROUP],
        vec![7, 8, 9]
    );
    // A node in no group's membership restores nothing.
    let none = RestoreOptions {
        node: Some(4),
        ..Default::default()
    };
    let err = restore_backup(&backup, &tmp.path().join("node-4"), &none).unwrap_err();
    assert!(
        matches!(err, RestoreError::NothingToRestore { node: Some(4), .. }),
        "{err}"
    );
    assert!(!tmp.path().join("node-4").exists());
}

#[test]
fn backup_and_restore_refuse_existing_targets_and_unknown_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let (backup, _) = source_and_backup(tmp.path());
    let source = open(&tmp.path().join("source-2"));
    fill(&source, STATIC_GROUP, false, 3, "x");
    let err = source.backup(&[STATIC_GROUP], &backup).unwrap_err();
    assert!(matches!(err, BackupError::Exists { .. }), "{err}");
    let fresh = tmp.path().join("fresh-backup");
    let err = source.backup(&[STATIC_GROUP, 77], &fresh).unwrap_err();
    assert!(
        matches!(err, BackupError::NoSuchGroup { group: 77 }),
        "{err}"
    );
    assert!(!fresh.exists());
    assert!(!tmp.path().join(".fresh-backup.partial").exists());
    let target = tmp.path().join("occupied");
    std::fs::create_dir(&target).unwrap();
    let err = restore_backup(&backup, &target, &RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, RestoreError::TargetExists { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}

/// Every file of a backup, relative to it.
fn backup_files(backup: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in walk(backup) {
        out.push(entry.strip_prefix(backup).unwrap().to_path_buf());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// How a test damages one file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    FlipByte,
    Truncate,
    Remove,
}

fn damage(path: &Path, how: Damage) {
    match how {
        Damage::FlipByte => {
            let mut bytes = std::fs::read(path).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x5a;
            std::fs::write(path, bytes).unwrap();
        }
        Damage::Truncate => {
            let len = std::fs::metadata(path).unwrap().len();
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.set_len(len - 1).unwrap();
        }
        Damage::Remove => std::fs::remove_file(path).unwrap(),
    }
}

/// Asserts a restore of `backup` fails naming `bad`, and creates nothing.
fn assert_refused(root: &Path, backup: &Path, bad: &Path, label: &str) {
    let target = root.join("target");
    let err = restore_backup(backup, &target, &RestoreOptions::default())
        .expect_err(&format!("{label}: restored"));
    let named = match &err {
        RestoreError::BadFile { path, .. } | RestoreError::BadManifest { path, .. } => path,
        other => panic!("{label}: unexpected error {other}"),
    };
    assert_eq!(named, bad, "{label}: {err}");
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "{label}: the message names the file: {err}"
    );
    assert!(!target.exists(), "{label}: the target was created");
    assert!(
        !root.join(".target.restoring").exists(),
        "{label}: a staging directory was left"
    );
    // Verification alone reports the same file.
    assert!(verify_backup(backup).is_err(), "{label}");
}

#[test]
fn any_damaged_file_is_refused_naming_it_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (backup, _) = source_and_backup(tmp.path());
    verify_backup(&backup).unwrap();
    let files = backup_files(&backup);
    // Both groups' SST files and snapshot manifests, and the backup manifest.
    assert!(files.len() >= 7, "{files:?}");
    for file in &files {
        for how in [Damage::FlipByte, Damage::Truncate, Damage::Remove] {
            let label = format!("{} {how:?}", file.display());
            let case = tempfile::tempdir().unwrap();
            let copy = case.path().join("backup");
            copy_dir(&backup, &copy);
            damage(&copy.join(file), how);
            assert_refused(case.path(), &copy, &copy.join(file), &label);
        }
    }
}

#[test]
fn a_bad_manifest_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (backup, _) = source_and_backup(tmp.path());
    let manifest = backup.join(BACKUP_MANIFEST_FILE_NAME);
    // Not a manifest at all; empty; a directory that is not a backup.
    for (label, bytes) in [
        ("garbage", b"not a manifest at all".to_vec()),
        ("empty", Vec::new()),
    ] {
        let case = tempfile::tempdir().unwrap();
        let copy = case.path().join("backup");
        copy_dir(&backup, &copy);
        std::fs::write(copy.join(BACKUP_MANIFEST_FILE_NAME), bytes).unwrap();
        assert_refused(
            case.path(),
            &copy,
            &copy.join(BACKUP_MANIFEST_FILE_NAME),
            label,
        );
    }
    let case = tempfile::tempdir().unwrap();
    let empty = case.path().join("backup");
    std::fs::create_dir(&empty).unwrap();
    let err = restore_backup(
        &empty,
        &case.path().join("target"),
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            RestoreError::BadManifest {
                problem: ManifestProblem::Missing,
                ..
            }
        ),
        "{err}"
    );
    assert!(!case.path().join("target").exists());
    // The original is untouched and still restores.
    assert!(manifest.exists());
    restore_backup(&backup, &tmp.path().join("ok"), &RestoreOptions::default()).unwrap();
}

/// Files received from elsewhere (a node, for `shoal backup`) are checked
/// against the sender's sizes and CRC32s before they join a backup, and a
/// writer dropped unfinished leaves nothing behind.
#[test]
fn received_files_are_checked_and_an_unfinished_backup_leaves_nothing() {
    use shoal_engine::backup::{BackupWriter, FileProblem};
    let tmp = tempfile::tempdir().unwrap();
    let source = open(&tmp.path().join("source"));
    fill(&source, STATIC_GROUP, false, 5, "s");
    // What a node sends: an export somewhere else, and its record.
    let exported_dir = tmp.path().join("exported");
    let record = source
        .export_group_backup(STATIC_GROUP, &exported_dir)
        .unwrap();
    let target = tmp.path().join("backup");
    let copy_into = |writer: &BackupWriter| {
        let dir = writer.group_dir(STATIC_GROUP).unwrap();
        for f in &record.files {
            std::fs::copy(exported_dir.join(&f.name), dir.join(&f.name)).unwrap();
        }
        dir
    };
    // A corrupt file: refused naming it; nothing at the target afterwards.
    let mut writer = BackupWriter::create(&target).unwrap();
    let dir = copy_into(&writer);
    let bad = dir.join(&record.files[0].name);
    damage(&bad, Damage::FlipByte);
    let err = writer.add_received(record.clone()).unwrap_err();
    match &err {
        BackupError::BadFile {
            path,
            problem: FileProblem::Checksum { .. },
        } => assert_eq!(path, &bad),
        other => panic!("unexpected {other}"),
    }
    drop(writer);
    assert!(!target.exists());
    assert!(!tmp.path().join(".backup.partial").exists());
    // Intact: a backup that restores to the source's state.
    let mut writer = BackupWriter::create(&target).unwrap();
    copy_into(&writer);
    writer.add_received(record.clone()).unwrap();
    let err = writer.add_received(record).unwrap_err();
    assert!(
        matches!(
            err,
            BackupError::DuplicateGroup {
                group: STATIC_GROUP
            }
        ),
        "{err}"
    );
    writer.finish().unwrap();
    let restored_dir = tmp.path().join("restored");
    restore_backup(&target, &restored_dir, &RestoreOptions::default()).unwrap();
    assert_eq!(
        image(&open(&restored_dir), STATIC_GROUP),
        image(&source, STATIC_GROUP)
    );
}
