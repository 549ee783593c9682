//! Backups: groups' state machines as SST files with a checksummed
//! manifest, and restoring them into a new data directory.
//!
//! # What a backup is
//! A directory holding, per group, the group's Raft snapshot export
//! ([`crate::snapshot`], scope [`SnapshotScope::Group`]: every shard's data
//! and sessions, the shard records) in a subdirectory `group-<id>`, and a
//! [`BACKUP_MANIFEST_FILE_NAME`] ([`BackupManifest`]) naming, per group,
//! the applied index and term the files are at, the membership, the shard
//! records, and every file (the snapshot's own `MANIFEST` included) with
//! its size and CRC32. The manifest is itself checksummed.
//!
//! # Consistency
//! Each group is exported inside one point-in-time view of the engine (a
//! RocksDB snapshot), so a group's files are exactly its state at its
//! applied index, taken while writes go on. Different groups are exported
//! one after another: each is at its own applied index (and in a cluster,
//! from whichever node answered), so a backup of several groups is not one
//! cross-group point in time. Within a group, every write acknowledged
//! before the backup began is in it (it was applied before the view was
//! taken, for a group of one; for a cluster see the node's docs).
//!
//! # Written atomically
//! [`BackupWriter`] builds the backup in a staging directory next to the
//! target (`.<name>.partial`), fsyncs every file and directory, writes the
//! manifest last, and renames the staging directory to the target: a
//! directory with the target's name is always a complete backup. A writer
//! dropped before [`BackupWriter::finish`] removes its staging directory.
//!
//! # Restore
//! [`restore_backup`] verifies the manifest and every file (present, size,
//! CRC32) before creating anything: a bad one is a [`RestoreError`] naming
//! it, and the target does not exist afterwards. Then, in a staging
//! directory next to the target, it opens a new engine and for each group
//! installs the snapshot ([`Engine::install_snapshot`], the same
//! crash-atomic install a follower runs), resets the group's log to start
//! after the applied index with the membership the caller chose (so the
//! group starts as a member that just installed a snapshot: nothing to
//! replay), records hosted groups as hosted, closes the engine and renames
//! the staging directory to the target.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use shoal_consensus::{ConfState, HardState, NodeId, Snapshot, SnapshotMeta};

use crate::backend::Backend;
use crate::config::EngineConfig;
use crate::engine::{Engine, RocksEngine};
use crate::error::EngineError;
use crate::keys::{decode_record, encode_record};
use crate::kv::AppliedState;
use crate::log::{GroupWrite, LogBatch};
use crate::shards::ShardRecord;
use crate::snapshot::{file_checksum, read_manifest, SnapshotScope, MANIFEST_FILE_NAME};
use crate::{GroupId, ShardId};

/// Name of the manifest file at the top of a backup directory.
pub const BACKUP_MANIFEST_FILE_NAME: &str = "BACKUP";
/// Format version written into every backup manifest.
pub const BACKUP_FORMAT_VERSION: u32 = 1;
/// Largest backup manifest read: a manifest names a few files per group,
/// so anything larger is not one (and is not read into memory).
pub const BACKUP_MANIFEST_BYTES_MAX: u64 = 16 << 20;
/// Checksum context of the backup manifest.
const BACKUP_MANIFEST_CONTEXT: &[u8] = b"shoal-backup-manifest";
/// Copy buffer for restoring files into the engine's directory.
const COPY_BUFFER_BYTES: usize = 1024 * 1024;
/// Where restore puts a group's files inside the new engine directory
/// before installing them (install needs them inside it, and removes them).
const RESTORE_SNAPSHOTS_DIR: &str = "snapshots";

/// One file of a group's backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// File name inside the group's directory.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// CRC32 of the whole file.
    pub crc32: u32,
}

/// One group in a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBackup {
    /// The group.
    pub group: GroupId,
    /// Applied index and term the group's files are at.
    pub applied: AppliedState,
    /// The group's membership when it was backed up.
    pub conf_state: ConfState,
    /// Whether the node recorded the group as hosted at runtime (a replica
    /// group of a sharded cluster) rather than configured statically.
    pub hosted: bool,
    /// The group's shard records, read in the same view as the files.
    pub shards: BTreeMap<ShardId, ShardRecord>,
    /// Subdirectory of the backup holding the files.
    pub dir: String,
    /// Every file of the group: the snapshot's SST files and its `MANIFEST`.
    pub files: Vec<BackupFile>,
}

impl GroupBackup {
    /// Total bytes of the group's files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// What a backup directory holds, written as its [`BACKUP_MANIFEST_FILE_NAME`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// [`BACKUP_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The engine's on-disk format ([`crate::FORMAT_VERSION`]) the files
    /// were exported from.
    pub engine_format_version: u32,
    /// The groups, in increasing group order.
    pub groups: Vec<GroupBackup>,
}

impl BackupManifest {
    /// Total bytes of every group's files.
    pub fn size_bytes(&self) -> u64 {
        self.groups.iter().map(GroupBackup::size_bytes).sum()
    }
}

/// The name of a group's directory inside a backup.
pub fn group_dir_name(group: GroupId) -> String {
    format!("group-{group}")
}

/// What is wrong with one file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileProblem {
    /// The file is not there.
    #[error("missing")]
    Missing,
    /// The file has another size than the manifest says (truncated, or
    /// grown).
    #[error("{actual} bytes, the manifest says {expected}")]
    Size {
        /// The manifest's size.
        expected: u64,
        /// The file's.
        actual: u64,
    },
    /// The file's CRC32 differs from the manifest's.
    #[error("checksum {actual:08x}, the manifest says {expected:08x}")]
    Checksum {
        /// The manifest's CRC32.
        expected: u32,
        /// The file's.
        actual: u32,
    },
    /// The file could not be read.
    #[error("unreadable")]
    Unreadable(#[source] std::io::Error),
}

/// What is wrong with a backup's manifest (or a group's snapshot manifest).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestProblem {
    /// There is none (not a backup directory, or an unfinished one).
    #[error("missing")]
    Missing,
    /// Larger than [`BACKUP_MANIFEST_BYTES_MAX`].
    #[error("{bytes} bytes, more than a manifest can be ({BACKUP_MANIFEST_BYTES_MAX})")]
    TooLarge {
        /// Its size.
        bytes: u64,
    },
    /// Its checksum does not match, or it does not decode.
    #[error("corrupt")]
    Corrupt(#[source] EngineError),
    /// Written by a build with another backup or engine format.
    #[error("format {found}, this build reads {expected}")]
    Version {
        /// What it says.
        found: u32,
        /// What this build reads.
        expected: u32,
    },
    /// It names a file or directory outside the backup directory.
    #[error("names the path {path:?}, which is not a plain name inside the backup")]
    UnsafePath {
        /// The name.
        path: String,
    },
    /// It names a group twice.
    #[error("names group {group} twice")]
    DuplicateGroup {
        /// The group.
        group: GroupId,
    },
    /// A group's snapshot manifest does not match the backup manifest.
    #[error("does not match the backup manifest for group {group}")]
    Mismatch {
        /// The group.
        group: GroupId,
    },
    /// The file could not be read.
    #[error("unreadable")]
    Unreadable(#[source] std::io::Error),
}

/// Why a backup failed. Nothing is left at the target when it does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The target exists; a backup is written only into a new directory.
    #[error("{path} already exists; a backup is written only into a new directory")]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// The engine holds no such group (no membership recorded).
    #[error("group {group} is not on this node")]
    NoSuchGroup {
        /// The group.
        group: GroupId,
    },
    /// The backup would name a group twice.
    #[error("group {group} is in the backup twice")]
    DuplicateGroup {
        /// The group.
        group: GroupId,
    },
    /// Exporting a group failed.
    #[error("exporting group {group}: {source}")]
    Export {
        /// The group.
        group: GroupId,
        /// What failed.
        #[source]
        source: EngineError,
    },
    /// A file received for the backup does not match what its sender said.
    #[error("backup file {path}: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: FileProblem,
    },
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a restore failed. Nothing is left at the target when it does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// A manifest is missing, corrupt, or of another format.
    #[error("backup manifest {path}: {problem}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: ManifestProblem,
    },
    /// A file of the backup is missing, truncated or corrupt.
    #[error("backup file {path}: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: FileProblem,
    },
    /// The target exists; a restore creates a new directory.
    #[error("{path} already exists; restore only into a new directory")]
    TargetExists {
        /// The target.
        path: PathBuf,
    },
    /// No group of the backup is one the restore was asked for (by group,
    /// or by having the restoring node among its voters), or the backup
    /// holds no group.
    #[error("the backup holds no group to restore (asked for groups {groups:?} of node {node:?})")]
    NothingToRestore {
        /// The restoring node, if the restore was for one.
        node: Option<NodeId>,
        /// The groups asked for, if only some.
        groups: Option<Vec<GroupId>>,
    },
    /// Voters given for the restored groups are empty.
    #[error("the restored groups need at least one voter")]
    NoVoters,
    /// Installing a group into the new engine failed.
    #[error("restoring group {group}: {source}")]
    Engine {
        /// The group.
        group: GroupId,
        /// What failed.
        #[source]
        source: EngineError,
    },
    /// Opening or closing the new engine failed.
    #[error("creating the engine in {path}: {source}")]
    Open {
        /// Its directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: EngineError,
    },
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err<E>(
    path: &Path,
    make: impl FnOnce(PathBuf, std::io::Error) -> E,
) -> impl FnOnce(std::io::Error) -> E {
    let path = path.to_path_buf();
    move |source| make(path, source)
}

fn backup_io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    io_err(path, |path, source| BackupError::Io { path, source })
}

fn restore_io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError {
    io_err(path, |path, source| RestoreError::Io { path, source })
}

/// Checks one file against its size and CRC32, reading it in bounded chunks.
pub fn check_file(path: &Path, size_bytes: u64, crc32: u32) -> Result<(), FileProblem> {
    let (actual_crc, actual_size) = match file_checksum(path) {
        Ok(found) => found,
        Err(EngineError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(FileProblem::Missing)
        }
        Err(EngineError::Io { source, .. }) => return Err(FileProblem::Unreadable(source)),
        Err(other) => {
            return Err(FileProblem::Unreadable(std::io::Error::other(
                other.to_string(),
            )))
        }
    };
    if actual_size != size_bytes {
        return Err(FileProblem::Size {
            expected: size_bytes,
            actual: actual_size,
        });
    }
    if actual_crc != crc32 {
        return Err(FileProblem::Checksum {
            expected: crc32,
            actual: actual_crc,
        });
    }
    Ok(())
}

/// Whether `name` is one plain path component (no separator, no `..`).
fn is_plain_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(c)), None) if c == std::ffi::OsStr::new(name)
    )
}

/// A backup being written: a staging directory renamed to the target by
/// [`Self::finish`] (see the module docs). Dropped unfinished, it removes
/// the staging directory.
#[derive(Debug)]
pub struct BackupWriter {
    target: PathBuf,
    staging: PathBuf,
    groups: BTreeMap<GroupId, GroupBackup>,
    finished: bool,
}

impl BackupWriter {
    /// Starts a backup that [`Self::finish`] will leave at `target`, which
    /// must not exist; its parent must.
    pub fn create(target: &Path) -> Result<BackupWriter, BackupError> {
        if target.symlink_metadata().is_ok() {
            return Err(BackupError::Exists {
                path: target.to_path_buf(),
            });
        }
        let staging = staging_path(target, "partial");
        remove_if_present(&staging).map_err(backup_io(&staging))?;
        std::fs::create_dir(&staging).map_err(backup_io(&staging))?;
        Ok(BackupWriter {
            target: target.to_path_buf(),
            staging,
            groups: BTreeMap::new(),
            finished: false,
        })
    }

    /// The directory `group`'s files go into (created on first use).
    pub fn group_dir(&self, group: GroupId) -> Result<PathBuf, BackupError> {
        let dir = self.staging.join(group_dir_name(group));
        std::fs::create_dir_all(&dir).map_err(backup_io(&dir))?;
        Ok(dir)
    }

    /// Adds a group exported straight into [`Self::group_dir`] by
    /// [`Engine::export_group_backup`] (its sizes and checksums computed
    /// from the files themselves).
    pub fn add_exported(&mut self, group: GroupBackup) -> Result<(), BackupError> {
        if self.groups.contains_key(&group.group) {
            return Err(BackupError::DuplicateGroup { group: group.group });
        }
        self.groups.insert(group.group, group);
        Ok(())
    }

    /// Adds a group whose files were received into [`Self::group_dir`]
    /// from elsewhere (a node): each file is checked against the sizes and
    /// checksums of `group` first, and a mismatch is an error naming it.
    pub fn add_received(&mut self, group: GroupBackup) -> Result<(), BackupError> {
        let dir = self.staging.join(group_dir_name(group.group));
        for f in &group.files {
            let path = dir.join(&f.name);
            check_file(&path, f.size_bytes, f.crc32)
                .map_err(|problem| BackupError::BadFile { path, problem })?;
        }
        self.add_exported(group)
    }

    /// Writes the manifest, makes everything durable and renames the
    /// staging directory to the target.
    pub fn finish(mut self) -> Result<BackupManifest, BackupError> {
        let manifest = BackupManifest {
            format_version: BACKUP_FORMAT_VERSION,
            engine_format_version: crate::FORMAT_VERSION,
            groups: self.groups.values().cloned().collect(),
        };
        for group in &manifest.groups {
            let dir = self.staging.join(&group.dir);
            for f in &group.files {
                let path = dir.join(&f.name);
                File::open(&path)
                    .and_then(|file| file.sync_all())
                    .map_err(backup_io(&path))?;
            }
            sync_dir_io(&dir).map_err(backup_io(&dir))?;
        }
        let path = self.staging.join(BACKUP_MANIFEST_FILE_NAME);
        let mut file = File::create(&path).map_err(backup_io(&path))?;
        file.write_all(&encode_record(BACKUP_MANIFEST_CONTEXT, &manifest))
            .and_then(|()| file.sync_all())
            .map_err(backup_io(&path))?;
        sync_dir_io(&self.staging).map_err(backup_io(&self.staging))?;
        if self.target.symlink_metadata().is_ok() {
            return Err(BackupError::Exists {
                path: self.target.clone(),
            });
        }
        std::fs::rename(&self.staging, &self.target).map_err(backup_io(&self.target))?;
        self.finished = true;
        let parent = parent_dir(&self.target);
        sync_dir_io(&parent).map_err(backup_io(&parent))?;
        Ok(manifest)
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = remove_if_present(&self.staging) {
                tracing::warn!(dir = %self.staging.display(), error = %e, "could not remove an unfinished backup");
            }
        }
    }
}

/// `.<name>.<what>` next to `target`.
fn staging_path(target: &Path, what: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".to_string());
    parent_dir(target).join(format!(".{name}.{what}"))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir_io(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

impl<B: Backend> Engine<B> {
    /// Exports `group` into the new or empty directory `dir` for a backup:
    /// its snapshot files at one point in time, their sizes and checksums,
    /// the shard records read in the same view, the membership. Blocking
    /// (reads the whole group): never call it on an event loop.
    pub fn export_group_backup(
        &self,
        group: GroupId,
        dir: &Path,
    ) -> Result<GroupBackup, BackupError> {
        self.export_group_backup_pinned(group, dir, &mut |_| {})
    }

    /// [`Self::export_group_backup`], calling `on_view` with the applied
    /// state the export holds as soon as its point-in-time view is taken,
    /// before the files are written (a caller that holds writes back for a
    /// backup of several groups at one point in time may let them go then).
    pub fn export_group_backup_pinned(
        &self,
        group: GroupId,
        dir: &Path,
        on_view: &mut dyn FnMut(AppliedState),
    ) -> Result<GroupBackup, BackupError> {
        let export = |source| BackupError::Export { group, source };
        let state = self.group_state(group).map_err(export)?;
        if state.conf_state.voters.is_empty() {
            return Err(BackupError::NoSuchGroup { group });
        }
        let hosted = self.hosted_groups().map_err(export)?.contains_key(&group);
        let (snapshot, shards) = self
            .export_snapshot_with_records(group, dir, on_view)
            .map_err(export)?;
        let mut files: Vec<BackupFile> = snapshot
            .files
            .iter()
            .map(|f| BackupFile {
                name: f.name.clone(),
                size_bytes: f.size_bytes,
                crc32: f.crc32,
            })
            .collect();
        let manifest_path = dir.join(MANIFEST_FILE_NAME);
        let (crc32, size_bytes) = file_checksum(&manifest_path).map_err(export)?;
        files.push(BackupFile {
            name: MANIFEST_FILE_NAME.to_string(),
            size_bytes,
            crc32,
        });
        Ok(GroupBackup {
            group,
            applied: snapshot.applied,
            conf_state: state.conf_state,
            hosted,
            shards,
            dir: group_dir_name(group),
            files,
        })
    }

    /// Backs up `groups` into `target`, a new directory (see the module
    /// docs: each group at its own point in time, written atomically).
    /// Blocking: never call it on an event loop.
    pub fn backup(&self, groups: &[GroupId], target: &Path) -> Result<BackupManifest, BackupError> {
        let mut writer = BackupWriter::create(target)?;
        for &group in groups {
            if writer.groups.contains_key(&group) {
                return Err(BackupError::DuplicateGroup { group });
            }
            let dir = writer.group_dir(group)?;
            let exported = self.export_group_backup(group, &dir)?;
            writer.add_exported(exported)?;
        }
        writer.finish()
    }
}

/// Reads and checks a backup's manifest (not yet its files).
pub fn read_backup_manifest(backup: &Path) -> Result<BackupManifest, RestoreError> {
    let path = backup.join(BACKUP_MANIFEST_FILE_NAME);
    let bad = |problem| RestoreError::BadManifest {
        path: path.clone(),
        problem,
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(ManifestProblem::Missing))
        }
        Err(e) => return Err(bad(ManifestProblem::Unreadable(e))),
    };
    let mut bytes = Vec::new();
    file.take(BACKUP_MANIFEST_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(ManifestProblem::Unreadable(e)))?;
    if bytes.len() as u64 > BACKUP_MANIFEST_BYTES_MAX {
        return Err(bad(ManifestProblem::TooLarge {
            bytes: bytes.len() as u64,
        }));
    }
    let manifest: BackupManifest = decode_record(BACKUP_MANIFEST_CONTEXT, &bytes, &|| {
        format!("backup manifest {}", path.display())
    })
    .map_err(|e| bad(ManifestProblem::Corrupt(e)))?;
    if manifest.format_version != BACKUP_FORMAT_VERSION {
        return Err(bad(ManifestProblem::Version {
            found: manifest.format_version,
            expected: BACKUP_FORMAT_VERSION,
        }));
    }
    if manifest.engine_format_version != crate::FORMAT_VERSION {
        return Err(bad(ManifestProblem::Version {
            found: manifest.engine_format_version,
            expected: crate::FORMAT_VERSION,
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for group in &manifest.groups {
        if !seen.insert(group.group) {
            return Err(bad(ManifestProblem::DuplicateGroup { group: group.group }));
        }
        for name in std::iter::once(&group.dir).chain(group.files.iter().map(|f| &f.name)) {
            if !is_plain_name(name) {
                return Err(bad(ManifestProblem::UnsafePath { path: name.clone() }));
            }
        }
    }
    Ok(manifest)
}

/// Verifies a whole backup: its manifest, every file (present, size,
/// CRC32), and each group's snapshot manifest against the backup's. Reads
/// every byte; creates and changes nothing.
pub fn verify_backup(backup: &Path) -> Result<BackupManifest, RestoreError> {
    let manifest = read_backup_manifest(backup)?;
    for group in &manifest.groups {
        let dir = backup.join(&group.dir);
        for f in &group.files {
            let path = dir.join(&f.name);
            check_file(&path, f.size_bytes, f.crc32)
                .map_err(|problem| RestoreError::BadFile { path, problem })?;
        }
        let snapshot_path = dir.join(MANIFEST_FILE_NAME);
        let mismatch = |problem| RestoreError::BadManifest {
            path: snapshot_path.clone(),
            problem,
        };
        let snapshot = read_manifest(&dir).map_err(|e| mismatch(ManifestProblem::Corrupt(e)))?;
        let names_match = snapshot.files.iter().all(|s| {
            group
                .files
                .iter()
                .any(|f| f.name == s.name && f.crc32 == s.crc32)
        });
        if snapshot.group != group.group
            || snapshot.applied != group.applied
            || snapshot.scope != SnapshotScope::Group
            || !names_match
            || !group.files.iter().any(|f| f.name == MANIFEST_FILE_NAME)
        {
            return Err(mismatch(ManifestProblem::Mismatch { group: group.group }));
        }
    }
    Ok(manifest)
}

/// How [`restore_backup`] shapes the new engine.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Limits and tuning of the engine opened to install the files.
    pub engine: EngineConfig,
    /// The voters every restored group gets; `None`: each keeps the
    /// voters it had when backed up.
    pub voters: Option<Vec<NodeId>>,
    /// Restore only the groups with this node among their voters (after
    /// `voters` applies); `None`: every group.
    pub node: Option<NodeId>,
    /// Restore only these groups; `None`: every group.
    pub groups: Option<Vec<GroupId>>,
}

/// What [`restore_backup`] restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The backup's manifest.
    pub manifest: BackupManifest,
    /// The groups restored (all, or those of the node), with their voters.
    pub groups: Vec<(GroupId, AppliedState, Vec<NodeId>)>,
}

/// Restores the backup at `backup` into `engine_dir`, a new directory
/// (its parent must exist): verifies everything first, builds the engine
/// in a staging directory next to it, renames it into place. See the
/// module docs. Blocking.
pub fn restore_backup(
    backup: &Path,
    engine_dir: &Path,
    options: &RestoreOptions,
) -> Result<RestoreSummary, RestoreError> {
    let manifest = verify_backup(backup)?;
    restore_verified_backup(backup, &manifest, engine_dir, options)
}

/// [`restore_backup`] of a backup the caller verified with
/// [`verify_backup`] (which returned `manifest`), so that it can create
/// directories of its own between the two. The files are verified again
/// as they are installed.
pub fn restore_verified_backup(
    backup: &Path,
    manifest: &BackupManifest,
    engine_dir: &Path,
    options: &RestoreOptions,
) -> Result<RestoreSummary, RestoreError> {
    if engine_dir.symlink_metadata().is_ok() {
        return Err(RestoreError::TargetExists {
            path: engine_dir.to_path_buf(),
        });
    }
    if options.voters.as_ref().is_some_and(Vec::is_empty) {
        return Err(RestoreError::NoVoters);
    }
    let chosen: Vec<(&GroupBackup, Vec<NodeId>)> = manifest
        .groups
        .iter()
        .map(|g| {
            let voters = options
                .voters
                .clone()
                .unwrap_or_else(|| g.conf_state.voters.clone());
            (g, voters)
        })
        .filter(|(g, voters)| {
            options.node.is_none_or(|n| voters.contains(&n))
                && options
                    .groups
                    .as_ref()
                    .is_none_or(|gs| gs.contains(&g.group))
        })
        .collect();
    if chosen.is_empty() {
        return Err(RestoreError::NothingToRestore {
            node: options.node,
            groups: options.groups.clone(),
        });
    }
    let staging = staging_path(engine_dir, "restoring");
    remove_if_present(&staging).map_err(restore_io(&staging))?;
    let result = build_engine(backup, &staging, &chosen, options);
    let result = result.and_then(|()| {
        sync_dir_io(&staging).map_err(restore_io(&staging))?;
        std::fs::rename(&staging, engine_dir).map_err(restore_io(engine_dir))?;
        let parent = parent_dir(engine_dir);
        sync_dir_io(&parent).map_err(restore_io(&parent))
    });
    if let Err(e) = result {
        if let Err(cleanup) = remove_if_present(&staging) {
            tracing::warn!(dir = %staging.display(), error = %cleanup, "could not remove an unfinished restore");
        }
        return Err(e);
    }
    Ok(RestoreSummary {
        groups: chosen
            .iter()
            .map(|(g, voters)| (g.group, g.applied, voters.clone()))
            .collect(),
        manifest: manifest.clone(),
    })
}

/// Opens an engine in `dir` and installs each chosen group; the engine is
/// closed on return.
fn build_engine(
    backup: &Path,
    dir: &Path,
    chosen: &[(&GroupBackup, Vec<NodeId>)],
    options: &RestoreOptions,
) -> Result<(), RestoreError> {
    let engine =
        RocksEngine::open(dir, options.engine.clone()).map_err(|source| RestoreError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
    let snapshots = dir.join(RESTORE_SNAPSHOTS_DIR);
    std::fs::create_dir_all(&snapshots).map_err(restore_io(&snapshots))?;
    for (group, voters) in chosen {
        let engine_err = |source| RestoreError::Engine {
            group: group.group,
            source,
        };
        let install_dir = snapshots.join(format!("restore-g{}", group.group));
        std::fs::create_dir_all(&install_dir).map_err(restore_io(&install_dir))?;
        for f in &group.files {
            copy_file(
                &backup.join(&group.dir).join(&f.name),
                &install_dir.join(&f.name),
            )?;
        }
        // Verifies the copies again, and installs crash-atomically.
        engine.install_snapshot(&install_dir).map_err(engine_err)?;
        let conf_state = ConfState {
            voters: voters.clone(),
            learners: Vec::new(),
        };
        // The group starts as a member that has just installed a snapshot
        // at the applied index: a log starting after it, committed through
        // it, in the term of its last entry, having voted for nobody.
        engine
            .write_log(LogBatch {
                groups: vec![GroupWrite {
                    group: group.group,
                    snapshot: Some(Snapshot {
                        meta: SnapshotMeta {
                            index: group.applied.index,
                            term: group.applied.term,
                            conf_state,
                        },
                        data: bytes::Bytes::new(),
                    }),
                    hard_state: Some(HardState {
                        term: group.applied.term,
                        vote: 0,
                        commit: group.applied.index,
                    }),
                    ..Default::default()
                }],
            })
            .map_err(engine_err)?;
        if group.hosted {
            engine.host_group(group.group, voters).map_err(engine_err)?;
        }
    }
    // Member addresses came with the group snapshots: those of the cluster
    // backed up, not of the one restored (its nodes' `--peers` say).
    engine
        .clear_member_addrs()
        .map_err(|source| RestoreError::Open {
            path: dir.to_path_buf(),
            source,
        })?;
    engine.sync().map_err(|source| RestoreError::Open {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Copies `from` to `to` and fsyncs the copy.
fn copy_file(from: &Path, to: &Path) -> Result<(), RestoreError> {
    let mut source = File::open(from).map_err(restore_io(from))?;
    let mut dest = File::create(to).map_err(restore_io(to))?;
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = source.read(&mut buf).map_err(restore_io(from))?;
        if n == 0 {
            break;
        }
        dest.write_all(&buf[..n]).map_err(restore_io(to))?;
    }
    dest.sync_all().map_err(restore_io(to))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_only() {
        assert!(is_plain_name("kv.sst"));
        assert!(is_plain_name("group-3"));
        for bad in ["", "..", ".", "a/b", "/etc", "../x", "a/"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }
}
