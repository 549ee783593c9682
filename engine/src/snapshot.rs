//! Snapshots as SST files: export at one point in time, install
//! atomically.
//!
//! # Scopes
//! A snapshot covers a [`SnapshotScope`], named in its manifest:
//! - [`SnapshotScope::Group`] ([`Engine::export_snapshot`], a Raft
//!   snapshot): the whole state machine of one group, that is its `kv` and
//!   `dedup` ranges (every shard's data and sessions) and its shard
//!   ownership records in `meta`. Installing it
//!   ([`Engine::install_snapshot`]) into the same group (on another node)
//!   replaces all of that, shards the snapshot holds nothing of included,
//!   and sets the group's applied state to the snapshot's. Other groups on
//!   the node are not touched.
//! - [`SnapshotScope::Shard`] ([`Engine::export_shard`], a shard moving
//!   between groups): one shard's `kv` and `dedup` ranges of the exporting
//!   group, each key's group and shard prefix rewritten to the target
//!   group's (the `prefix` of [`View::export_range`]), so the files hold
//!   keys of the target's range. Installing it ([`Engine::install_shard`])
//!   into that target replaces that one shard's data and sessions, sets its
//!   ownership record and the applied state to the caller's (the target's
//!   committed entry that installs it), and leaves the target's other
//!   shards alone. Files exported for another group or shard are refused
//!   before anything is written.
//! - A shard move copied before its freeze: [`Engine::export_shard_base`]
//!   exports the shard's data while it serves; at the freeze,
//!   [`Engine::export_shard_delta`] exports the keys written since (values,
//!   and deletions for keys now absent) and the sessions, under a manifest
//!   that names the base's file first. Installed in order by
//!   [`Engine::install_shard`] (each file is ingested on its own, so later
//!   files win), they leave the shard as a full export would.
//!
//! # Export
//! Inside one point-in-time view: the exporting group's applied state,
//! then each range of the scope into its own file (RocksDB's
//! SstFileWriter): `kv.sst`, `dedup.sst` and, for a group, `meta.sst` with
//! its shard records, `meta-conf.sst` with its last applied membership
//! change and `meta-members.sst` with the node's address book (an empty
//! range has no file); then a `MANIFEST`
//! naming the scope and every file with its size and CRC32, itself
//! checksummed.
//!
//! # Install, and why a crash cannot leave a mix
//! 1. Check the directory is inside the engine's data directory, verify the
//!    manifest and every file's size and CRC32 (streamed, so a large shard
//!    never sits in memory), then fsync the files, the directory and its
//!    parent: what the redo log below names is on disk before it is named.
//!    A bad file is an error naming it; nothing has been written yet.
//! 2. Write an *install marker* to `meta`, synced: the group, the applied
//!    state it ends at (and for a shard install, the shard's record), the
//!    manifest, the directory RELATIVE to the data directory (as given for
//!    an engine without one, in memory), and the phase, `cleared: false`.
//!    From here on the install is a redo log entry.
//! 3. Range-delete the scope's ranges in the group's key space (the whole
//!    group's, or the one shard's) in the same synced write that rewrites
//!    the marker with `cleared: true`.
//! 4. Ingest each file (via a hard link, so the original survives for a
//!    redo), recording in the marker how many are in. Ingested files get
//!    sequence numbers newer than the range delete.
//! 5. Record the applied state (and the shard's record) and delete the
//!    marker in one synced write.
//!
//! A crash before 2 leaves the old state untouched. A crash after 2 is
//! finished when the engine is next opened, before anything reads it:
//! the manifest and each file not yet ingested are verified again, then
//! 3 (if not done), 4 and 5 run (each idempotent): the new state. Nobody
//! ever observes a mix.
//!
//! If at that point the files are missing or corrupt:
//! - *not yet cleared*: the install is discarded (marker deleted, a
//!   warning naming the directory): the old data, records and applied
//!   index are intact and consistent with the log, so the replica is
//!   merely behind (its leader sends the snapshot again; a shard install's
//!   entry is not applied yet, and is applied again).
//! - *cleared*: opening fails with
//!   [`EngineError::SnapshotInstallUnrecoverable`] naming the file. The old
//!   data is gone, and the new cannot be rebuilt locally: the log before
//!   the snapshot was compacted away (by the leader, and the group's log
//!   is reset after the install), so replaying it from the old applied
//!   index onto cleared shards would make this replica a state no
//!   committed prefix of the log produces, and it would answer and vote
//!   on that state as if it held every entry it acknowledged. Restoring
//!   the directory, or rebuilding the replica from the cluster, is an
//!   operator's decision.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Cf, View, WriteSet};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::keys::{
    decode_record, encode_record, group_range, meta_applied_key, meta_conf_key, meta_install_key,
    meta_install_range, meta_member_addr_range, meta_shard_group_range, meta_shard_key,
    shard_prefix, shard_range,
};
use crate::kv::AppliedState;
use crate::shards::{read_shard_records, ShardRecord};
use crate::{GroupId, ShardId};

/// Name of the manifest file inside a snapshot directory.
pub const MANIFEST_FILE_NAME: &str = "MANIFEST";
/// The data file of a shard export (and of a pre-copy).
pub const KV_FILE_NAME: &str = "kv.sst";
/// The file of a shard move's final export holding the keys written since
/// its pre-copy ([`Engine::export_shard_delta`]).
pub const KV_DELTA_FILE_NAME: &str = "kv-delta.sst";
/// The sessions file of a shard export.
pub const DEDUP_FILE_NAME: &str = "dedup.sst";
/// Format version written into every manifest.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;
/// Read buffer for checksumming snapshot files.
const CHECKSUM_BUFFER_BYTES: usize = 1024 * 1024;
const MANIFEST_CONTEXT: &[u8] = b"shoal-snapshot-manifest";

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Column family it is ingested into.
    pub cf: String,
    /// Key/value pairs in it.
    pub entries: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// CRC32 of the whole file.
    pub crc32: u32,
}

/// What a snapshot directory holds, written as its `MANIFEST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// [`SNAPSHOT_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Group that exported it.
    pub group: GroupId,
    /// Applied index and term of the exporting group the data is at.
    pub applied: AppliedState,
    /// What it covers.
    pub scope: SnapshotScope,
    /// Files, in ingestion order.
    pub files: Vec<SnapshotFile>,
}

impl SnapshotManifest {
    /// Total bytes of the snapshot's files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// What a snapshot covers, and so what installing it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotScope {
    /// Everything of the group's state machine: every shard's data and
    /// sessions and the shard ownership records (a Raft snapshot). An
    /// install replaces all of it, shards the snapshot lacks included.
    Group,
    /// One shard's data and sessions, its keys already renamed into
    /// `target`'s key range (a shard moving between groups). An install
    /// into `target` replaces that shard only.
    Shard {
        /// The shard.
        shard: ShardId,
        /// The group the files are for.
        target: GroupId,
    },
}

/// The redo record of an install in progress (see the module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstallMarker {
    /// The group installed into.
    group: GroupId,
    /// The applied state the group has once the install is done.
    applied: AppliedState,
    /// For a shard install: the shard's ownership record afterwards.
    record: Option<(ShardId, ShardRecord)>,
    /// The snapshot directory, relative to the data directory (as given
    /// when the backend has none).
    dir: String,
    /// What is being installed.
    manifest: SnapshotManifest,
    /// Whether the shards' ranges have been cleared; written in the same
    /// synced write as the range delete.
    cleared: bool,
    /// How many of `manifest.files`, in order, are ingested.
    ingested: u64,
}

/// Where a test stops an install, as a crash there would (the install
/// marker stays behind, to be finished or discarded when reopening).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallCrashPoint {
    /// The marker is written (`cleared: false`); nothing else.
    AfterMarker,
    /// The shards' ranges are cleared (`cleared: true`), no file ingested.
    AfterClear,
    /// This many files are ingested.
    AfterIngest(u64),
}

fn cf_by_name(name: &str) -> Result<Cf> {
    Cf::ALL
        .into_iter()
        .find(|cf| cf.name() == name)
        .ok_or_else(|| {
            EngineError::Corrupt(format!("snapshot names unknown column family {name:?}"))
        })
}

/// A column family, the name of the file its range is exported to, and a
/// `[start, end)` key range in it.
type CfRange = (Cf, &'static str, (Vec<u8>, Vec<u8>));

/// Every range a scope covers in `group`'s key space. A whole group also
/// carries its last applied membership change and the node's address book
/// (`crate::membership`): a member that catches up from a snapshot never
/// applied the changes before it, and needs the addresses they named.
fn scope_ranges(group: GroupId, scope: SnapshotScope) -> Vec<CfRange> {
    match scope {
        SnapshotScope::Group => {
            let conf = meta_conf_key(group).to_vec();
            let mut conf_end = conf.clone();
            conf_end.push(0);
            vec![
                (Cf::Kv, KV_FILE_NAME, group_range(group)),
                (Cf::Dedup, DEDUP_FILE_NAME, group_range(group)),
                (Cf::Meta, "meta.sst", meta_shard_group_range(group)),
                (Cf::Meta, "meta-conf.sst", (conf, conf_end)),
                (Cf::Meta, "meta-members.sst", meta_member_addr_range()),
            ]
        }
        SnapshotScope::Shard { shard, .. } => vec![
            (Cf::Kv, KV_FILE_NAME, shard_range(group, shard)),
            (Cf::Dedup, DEDUP_FILE_NAME, shard_range(group, shard)),
        ],
    }
}

/// CRC32 and size of a file, read in bounded chunks.
pub fn file_checksum(path: &Path) -> Result<(u32, u64)> {
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHECKSUM_BUFFER_BYTES];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finalize(), size))
}

/// Makes `dir`'s entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io(dir, e))
}

/// Reads and verifies a snapshot directory's manifest (not yet its files).
pub fn read_manifest(dir: &Path) -> Result<SnapshotManifest> {
    let path = dir.join(MANIFEST_FILE_NAME);
    let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
    let manifest: SnapshotManifest = decode_record(MANIFEST_CONTEXT, &bytes, &|| {
        format!("snapshot manifest {}", path.display())
    })?;
    if manifest.format_version != SNAPSHOT_FORMAT_VERSION {
        return Err(EngineError::Corrupt(format!(
            "snapshot manifest {}: format version {} (this build reads {})",
            path.display(),
            manifest.format_version,
            SNAPSHOT_FORMAT_VERSION
        )));
    }
    Ok(manifest)
}

/// Verifies every file a manifest names: present, right size, right CRC32.
pub fn verify_files(dir: &Path, manifest: &SnapshotManifest) -> Result<()> {
    manifest.files.iter().try_for_each(|f| verify_file(dir, f))
}

/// Verifies one file of a snapshot: present, right size, right CRC32.
fn verify_file(dir: &Path, f: &SnapshotFile) -> Result<()> {
    cf_by_name(&f.cf)?;
    let path = dir.join(&f.name);
    let (crc, size) = file_checksum(&path)?;
    check_size(&path, size, f)?;
    if crc != f.crc32 {
        return Err(EngineError::Corrupt(format!(
            "snapshot file {}: checksum mismatch (manifest {:08x}, file {crc:08x})",
            path.display(),
            f.crc32
        )));
    }
    Ok(())
}

/// Checks that a file of a snapshot is present with the size the manifest
/// gives (for a file whose checksum the caller verified already).
fn verify_size(dir: &Path, f: &SnapshotFile) -> Result<()> {
    cf_by_name(&f.cf)?;
    let path = dir.join(&f.name);
    let size = std::fs::metadata(&path)
        .map_err(|e| EngineError::io(&path, e))?
        .len();
    check_size(&path, size, f)
}

/// The file at `path` has `size` bytes: the manifest's, or corrupt.
fn check_size(path: &Path, size: u64, f: &SnapshotFile) -> Result<()> {
    if size != f.size_bytes {
        return Err(EngineError::Corrupt(format!(
            "snapshot file {}: {size} bytes, manifest says {}",
            path.display(),
            f.size_bytes
        )));
    }
    Ok(())
}

/// Checks, before an interrupted install is redone, that its directory
/// still holds the manifest the marker names and every file not yet
/// ingested, intact (nothing, once every file is in). On failure: the path
/// at fault, and why.
fn verify_for_redo(dir: &Path, marker: &InstallMarker) -> Result<(), (PathBuf, EngineError)> {
    let done = usize::try_from(marker.ingested).unwrap_or(usize::MAX);
    if done >= marker.manifest.files.len() {
        return Ok(());
    }
    let manifest_path = dir.join(MANIFEST_FILE_NAME);
    let manifest = read_manifest(dir).map_err(|e| (manifest_path.clone(), e))?;
    if manifest != marker.manifest {
        return Err((
            manifest_path.clone(),
            EngineError::Corrupt(format!(
                "snapshot manifest {}: differs from the one the install began with",
                manifest_path.display()
            )),
        ));
    }
    for f in marker.manifest.files.iter().skip(done) {
        verify_file(dir, f).map_err(|e| (dir.join(&f.name), e))?;
    }
    Ok(())
}

/// The group's applied state as `view` has it (the default before any).
fn read_applied(view: &dyn View, group: GroupId) -> Result<AppliedState> {
    let key = meta_applied_key(group);
    match view.get(Cf::Meta, &key)? {
        Some(b) => decode_record(&key, &b, &|| format!("applied index of group {group}")),
        None => Ok(AppliedState::default()),
    }
}

/// A manifest's entry for a file just exported (checksum still to come:
/// [`seal_export`]).
fn exported(name: &str, cf: Cf, file: crate::backend::ExportedFile) -> SnapshotFile {
    SnapshotFile {
        name: name.to_string(),
        cf: cf.name().to_string(),
        entries: file.entries,
        size_bytes: file.size_bytes,
        crc32: 0,
    }
}

/// Finishes an export in `dir`: checksums and syncs each file of
/// `manifest` from the `skip`th on (the ones before are named but live
/// elsewhere), then writes and syncs the `MANIFEST` and the directory.
fn seal_export(dir: &Path, manifest: &mut SnapshotManifest, skip: usize) -> Result<()> {
    for f in manifest.files.iter_mut().skip(skip) {
        let path = dir.join(&f.name);
        let (crc, size) = file_checksum(&path)?;
        f.crc32 = crc;
        f.size_bytes = size;
        sync_file(&path)?;
    }
    let path = dir.join(MANIFEST_FILE_NAME);
    let mut file = File::create(&path).map_err(|e| EngineError::io(&path, e))?;
    file.write_all(&encode_record(MANIFEST_CONTEXT, &*manifest))
        .map_err(|e| EngineError::io(&path, e))?;
    file.sync_all().map_err(|e| EngineError::io(&path, e))?;
    sync_dir(dir)
}

/// fsyncs a file's data (opened read-only: Linux syncs the inode anyway).
fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|e| EngineError::io(path, e))
}

impl<B: Backend> Engine<B> {
    /// Exports every shard of `group` (a Raft snapshot; see
    /// [`SnapshotScope::Group`]) into the empty or new directory `dir`, at
    /// one point in time. Returns the manifest (also written to `dir`).
    pub fn export_snapshot(&self, group: GroupId, dir: &Path) -> Result<SnapshotManifest> {
        self.export_scope(group, SnapshotScope::Group, dir, None, &mut |_| {})
    }

    /// [`Self::export_snapshot`], also returning the group's shard records
    /// read in the same point-in-time view as the files (for a backup's
    /// manifest).
    pub(crate) fn export_snapshot_with_records(
        &self,
        group: GroupId,
        dir: &Path,
        on_view: &mut dyn FnMut(AppliedState),
    ) -> Result<(SnapshotManifest, BTreeMap<ShardId, ShardRecord>)> {
        let mut records = BTreeMap::new();
        let manifest = self.export_scope(
            group,
            SnapshotScope::Group,
            dir,
            Some(&mut records),
            on_view,
        )?;
        Ok((manifest, records))
    }

    /// Exports `shard` of `group`, renamed into `target`'s key range, for
    /// `target` to install ([`Self::install_shard`]): its data and sessions
    /// at one point in time, into the empty or new directory `dir`.
    pub fn export_shard(
        &self,
        group: GroupId,
        shard: ShardId,
        target: GroupId,
        dir: &Path,
    ) -> Result<SnapshotManifest> {
        self.export_scope(
            group,
            SnapshotScope::Shard { shard, target },
            dir,
            None,
            &mut |_| {},
        )
    }

    /// Exports the data of `shard` of `group` (not its sessions), renamed
    /// into `target`'s key range, into the empty or new directory `dir`, at
    /// one point in time: the bulk of a shard move, copied while the shard
    /// still serves (a *pre-copy*). Not installable by itself: its
    /// manifest is the `base` of [`Self::export_shard_delta`].
    pub fn export_shard_base(
        &self,
        group: GroupId,
        shard: ShardId,
        target: GroupId,
        dir: &Path,
    ) -> Result<SnapshotManifest> {
        let (start, end) = shard_range(group, shard);
        let prefix = shard_prefix(target, shard);
        let scope = SnapshotScope::Shard { shard, target };
        self.export_with(group, scope, dir, Vec::new(), &mut |view, manifest| {
            let path = dir.join(KV_FILE_NAME);
            if let Some(file) = view.export_range(Cf::Kv, &start, &end, Some(&prefix), &path)? {
                manifest.files.push(exported(KV_FILE_NAME, Cf::Kv, file));
            }
            Ok(())
        })
    }

    /// Exports what the pre-copy `base` ([`Self::export_shard_base`] of the
    /// same shard for the same target) lacks for the shard to move as it
    /// is now: `keys` (user keys, every one written since `base`'s view; a
    /// superset does no harm) as they are now, values and deletions
    /// ([`View::export_keys`]), and every session of the shard, into the
    /// empty or new directory `dir`. The manifest names `base`'s data file
    /// first, as `base_name` (not written into `dir`: the destination got
    /// it from the pre-copy and puts it there), then `kv-delta.sst` and
    /// `dedup.sst`: installed in that order ([`Self::install_shard`]), they
    /// give the shard exactly what a full [`Self::export_shard`] now would.
    #[allow(clippy::too_many_arguments)]
    pub fn export_shard_delta(
        &self,
        group: GroupId,
        shard: ShardId,
        target: GroupId,
        dir: &Path,
        base: &SnapshotManifest,
        base_name: &str,
        keys: &[bytes::Bytes],
    ) -> Result<SnapshotManifest> {
        let scope = SnapshotScope::Shard { shard, target };
        if base.scope != scope || base.group != group {
            return Err(EngineError::Corrupt(format!(
                "a pre-copy of {:?} from group {} is not the base of shard {shard} from group {group} for group {target}",
                base.scope, base.group
            )));
        }
        let mut stored: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| crate::keys::kv_key(group, shard, k))
            .collect();
        stored.sort_unstable();
        stored.dedup();
        let prefix = shard_prefix(target, shard);
        let (start, end) = shard_range(group, shard);
        let from_base = base
            .files
            .iter()
            .filter(|f| f.name == KV_FILE_NAME)
            .map(|f| SnapshotFile {
                name: base_name.to_string(),
                ..f.clone()
            })
            .collect();
        self.export_with(group, scope, dir, from_base, &mut |view, manifest| {
            let path = dir.join(KV_DELTA_FILE_NAME);
            if let Some(file) = view.export_keys(Cf::Kv, &stored, Some(&prefix), &path)? {
                manifest
                    .files
                    .push(exported(KV_DELTA_FILE_NAME, Cf::Kv, file));
            }
            let path = dir.join(DEDUP_FILE_NAME);
            if let Some(file) = view.export_range(Cf::Dedup, &start, &end, Some(&prefix), &path)? {
                manifest
                    .files
                    .push(exported(DEDUP_FILE_NAME, Cf::Dedup, file));
            }
            Ok(())
        })
    }

    /// Exports `scope` of `group` into `dir`; `on_view` is called with the
    /// applied state as soon as the point-in-time view is taken (before any
    /// file is written): writes after that are not in the export.
    fn export_scope(
        &self,
        group: GroupId,
        scope: SnapshotScope,
        dir: &Path,
        mut records: Option<&mut BTreeMap<ShardId, ShardRecord>>,
        on_view: &mut dyn FnMut(AppliedState),
    ) -> Result<SnapshotManifest> {
        let prefix = match scope {
            SnapshotScope::Group => None,
            SnapshotScope::Shard { shard, target } => Some(shard_prefix(target, shard)),
        };
        self.export_with(group, scope, dir, Vec::new(), &mut |view, manifest| {
            on_view(manifest.applied);
            if let Some(records) = records.as_deref_mut() {
                *records = read_shard_records(view, group)?;
            }
            for (cf, name, (start, end)) in scope_ranges(group, scope) {
                let name = name.to_string();
                let path = dir.join(&name);
                // Only kv and dedup keys start with the shard prefix.
                let rename = prefix.as_ref().map(|p| &p[..]).filter(|_| cf != Cf::Meta);
                if let Some(file) = view.export_range(cf, &start, &end, rename, &path)? {
                    manifest.files.push(exported(&name, cf, file));
                }
            }
            Ok(())
        })
    }

    /// The frame of every export: `dir` made, a manifest of `scope` whose
    /// files begin with `named` (named by it, kept elsewhere) and whose
    /// applied state is read in the one view `write` exports from, then
    /// the written files checksummed and everything sealed
    /// ([`seal_export`]).
    fn export_with(
        &self,
        group: GroupId,
        scope: SnapshotScope,
        dir: &Path,
        named: Vec<SnapshotFile>,
        write: &mut dyn FnMut(&dyn View, &mut SnapshotManifest) -> Result<()>,
    ) -> Result<SnapshotManifest> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let skip = named.len();
        let mut manifest = SnapshotManifest {
            format_version: SNAPSHOT_FORMAT_VERSION,
            group,
            applied: AppliedState::default(),
            scope,
            files: named,
        };
        self.backend().with_view(&mut |view: &dyn View| {
            manifest.applied = read_applied(view, group)?;
            write(view, &mut manifest)
        })?;
        seal_export(dir, &mut manifest, skip)?;
        Ok(manifest)
    }

    /// Installs the snapshot in `dir` (made by [`Self::export_snapshot`])
    /// into its group: its shards' data replaces theirs and the group's
    /// applied state becomes the snapshot's. `dir` must be inside the
    /// engine's data directory ([`EngineError::SnapshotDirOutsideDataDir`]
    /// otherwise, before anything is written). Verifies every checksum
    /// first. Consumes `dir` (removed on success). Atomic across crashes;
    /// see the module docs for what reopening does with an install a crash
    /// interrupted.
    pub fn install_snapshot(&self, dir: &Path) -> Result<SnapshotManifest> {
        self.install_snapshot_until(dir, None)
    }

    /// Installs the shard export in `dir` (made by [`Self::export_shard`]
    /// for this group) into `group` as the effect of its committed entry
    /// `at`: the shard's data and sessions are replaced by the files', its
    /// ownership record becomes `record`, and the applied state becomes
    /// `at`, all crash-atomic like [`Self::install_snapshot`] (the same redo
    /// marker). `at` must be above the applied index. Consumes `dir`.
    pub fn install_shard(
        &self,
        group: GroupId,
        at: AppliedState,
        shard: ShardId,
        record: ShardRecord,
        dir: &Path,
    ) -> Result<SnapshotManifest> {
        self.install_shard_until(group, at, shard, record, dir, &[], None)
    }

    /// [`Self::install_shard`], taking the caller's word that the files of
    /// the manifest named in `verified` have the CRC32 the manifest gives
    /// (it checked them since they were written, e.g. a pre-copied file
    /// when it arrived, and they are the same inodes): of those, only the
    /// size is checked here, so a large file already checked is not read
    /// again while its shard refuses writes. Every other file is verified
    /// in full, as always; an install a crash interrupts is verified in
    /// full when it is redone.
    pub fn install_shard_verified(
        &self,
        group: GroupId,
        at: AppliedState,
        shard: ShardId,
        record: ShardRecord,
        dir: &Path,
        verified: &[String],
    ) -> Result<SnapshotManifest> {
        self.install_shard_until(group, at, shard, record, dir, verified, None)
    }

    /// [`Self::install_shard`] stopped at `crash` as a crash there would
    /// stop it, for crash tests: the marker stays, and reopening the engine
    /// (or [`crate::MemStore::crash_and_recover`]) finishes or discards it.
    #[doc(hidden)]
    pub fn install_shard_crashing_at(
        &self,
        group: GroupId,
        at: AppliedState,
        shard: ShardId,
        record: ShardRecord,
        dir: &Path,
        crash: InstallCrashPoint,
    ) -> Result<SnapshotManifest> {
        self.install_shard_until(group, at, shard, record, dir, &[], Some(crash))
    }

    #[allow(clippy::too_many_arguments)]
    fn install_shard_until(
        &self,
        group: GroupId,
        at: AppliedState,
        shard: ShardId,
        record: ShardRecord,
        dir: &Path,
        verified: &[String],
        crash: Option<InstallCrashPoint>,
    ) -> Result<SnapshotManifest> {
        // A directory outside the data directory is refused before anything
        // in it is read.
        self.marker_dir(dir)?;
        let manifest = read_manifest(dir)?;
        if manifest.scope
            != (SnapshotScope::Shard {
                shard,
                target: group,
            })
        {
            return Err(EngineError::Invalid(format!(
                "{}: holds {:?} exported by group {}, not shard {shard} for group {group}",
                dir.display(),
                manifest.scope,
                manifest.group
            )));
        }
        self.check_above_applied(group, at)?;
        self.install_until(
            dir,
            manifest,
            group,
            at,
            Some((shard, record)),
            verified,
            crash,
        )
    }

    /// [`Self::install_snapshot`] stopped at `at` as a crash there would
    /// stop it, for crash tests: the marker stays, and reopening the engine
    /// (or [`crate::MemStore::crash_and_recover`]) finishes or discards it.
    #[doc(hidden)]
    pub fn install_snapshot_crashing_at(
        &self,
        dir: &Path,
        at: InstallCrashPoint,
    ) -> Result<SnapshotManifest> {
        self.install_snapshot_until(dir, Some(at))
    }

    fn install_snapshot_until(
        &self,
        dir: &Path,
        crash: Option<InstallCrashPoint>,
    ) -> Result<SnapshotManifest> {
        // A directory outside the data directory is refused before anything
        // in it is read.
        self.marker_dir(dir)?;
        let manifest = read_manifest(dir)?;
        if manifest.scope != SnapshotScope::Group {
            return Err(EngineError::Invalid(format!(
                "{}: a shard export ({:?}) is not a group snapshot",
                dir.display(),
                manifest.scope
            )));
        }
        let (group, applied) = (manifest.group, manifest.applied);
        self.install_until(dir, manifest, group, applied, None, &[], crash)
    }

    #[allow(clippy::too_many_arguments)]
    fn install_until(
        &self,
        dir: &Path,
        manifest: SnapshotManifest,
        group: GroupId,
        applied: AppliedState,
        record: Option<(ShardId, ShardRecord)>,
        verified: &[String],
        crash: Option<InstallCrashPoint>,
    ) -> Result<SnapshotManifest> {
        let marker_dir = self.marker_dir(dir)?;
        for f in &manifest.files {
            if verified.contains(&f.name) {
                verify_size(dir, f)?;
            } else {
                verify_file(dir, f)?;
            }
        }
        // What the marker will name must be durable before it is named:
        // the files, their names in the directory, and the directory's name
        // in its parent, up to the data directory (at least the parent).
        for f in &manifest.files {
            sync_file(&dir.join(&f.name))?;
        }
        sync_file(&dir.join(MANIFEST_FILE_NAME))?;
        sync_dir(dir)?;
        let levels = match self.backend().data_dir() {
            // The marker names the directory relative to the data directory.
            Some(_) => Path::new(&marker_dir).components().count(),
            None => 1,
        };
        for ancestor in dir
            .ancestors()
            .skip(1)
            .take(levels)
            .filter(|p| !p.as_os_str().is_empty())
        {
            sync_dir(ancestor)?;
        }
        let mut marker = InstallMarker {
            group,
            applied,
            record,
            dir: marker_dir,
            manifest: manifest.clone(),
            cleared: false,
            ingested: 0,
        };
        let mut set = WriteSet::new();
        put_marker(&mut set, &marker);
        self.backend().write(set, true)?;
        if crash == Some(InstallCrashPoint::AfterMarker) {
            return Ok(manifest);
        }
        self.redo_install(&mut marker, dir, crash)?;
        Ok(manifest)
    }

    /// How the install marker names `dir`: relative to the data directory,
    /// which must contain it (as given when the backend has none).
    fn marker_dir(&self, dir: &Path) -> Result<String> {
        let stored = match self.backend().data_dir() {
            None => dir.to_path_buf(),
            Some(data_dir) => {
                let outside = || EngineError::SnapshotDirOutsideDataDir {
                    dir: dir.to_path_buf(),
                    data_dir: data_dir.to_path_buf(),
                };
                let data = data_dir
                    .canonicalize()
                    .map_err(|e| EngineError::io(data_dir, e))?;
                let full = dir.canonicalize().map_err(|e| EngineError::io(dir, e))?;
                match full.strip_prefix(&data) {
                    Ok(relative) if !relative.as_os_str().is_empty() => relative.to_path_buf(),
                    _ => return Err(outside()),
                }
            }
        };
        stored.to_str().map(str::to_string).ok_or_else(|| {
            EngineError::Invalid(format!(
                "snapshot directory {} is not valid UTF-8",
                stored.display()
            ))
        })
    }

    /// The directory an install marker names.
    fn marker_path(&self, marker: &InstallMarker) -> PathBuf {
        match self.backend().data_dir() {
            Some(data_dir) => data_dir.join(&marker.dir),
            None => PathBuf::from(&marker.dir),
        }
    }

    /// Runs an install from where `marker` says it is (steps 3 to 5 of the
    /// module docs), keeping the marker up to date.
    fn redo_install(
        &self,
        marker: &mut InstallMarker,
        dir: &Path,
        crash: Option<InstallCrashPoint>,
    ) -> Result<()> {
        self.apply_cache().clear();
        if !marker.cleared {
            marker.cleared = true;
            let mut clear = WriteSet::new();
            for (cf, _, (start, end)) in scope_ranges(marker.group, marker.manifest.scope) {
                clear.delete_range(cf, start, end);
            }
            put_marker(&mut clear, marker);
            self.backend().write(clear, true)?;
        }
        if crash == Some(InstallCrashPoint::AfterClear) {
            return Ok(());
        }
        let files = marker.manifest.files.clone();
        let done = usize::try_from(marker.ingested).unwrap_or(usize::MAX);
        for f in files.iter().skip(done) {
            let source = dir.join(&f.name);
            let link = dir.join(format!("{}.ingest", f.name));
            match std::fs::remove_file(&link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io(&link, e)),
            }
            std::fs::hard_link(&source, &link).map_err(|e| EngineError::io(&source, e))?;
            self.backend().ingest(cf_by_name(&f.cf)?, &link)?;
            // A crash before this write ingests the file again on redo:
            // the same pairs, still newer than the range delete.
            marker.ingested += 1;
            let mut progress = WriteSet::new();
            put_marker(&mut progress, marker);
            self.backend().write(progress, true)?;
            if crash == Some(InstallCrashPoint::AfterIngest(marker.ingested)) {
                return Ok(());
            }
        }
        let group = marker.group;
        let mut finish = WriteSet::new();
        let applied_key = meta_applied_key(group);
        finish.put(
            Cf::Meta,
            applied_key.to_vec(),
            encode_record(&applied_key, &marker.applied),
        );
        if let Some((shard, record)) = &marker.record {
            let key = meta_shard_key(group, *shard);
            finish.put(Cf::Meta, key.clone(), encode_record(&key, record));
        }
        finish.delete(Cf::Meta, meta_install_key(group).to_vec());
        self.backend().write(finish, true)?;
        self.forget_group(group);
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove an installed snapshot directory")
            }
        }
        Ok(())
    }

    /// Finishes, or discards, installs that a crash interrupted (run when
    /// opening); returns how many were finished and how many discarded.
    /// Fails with [`EngineError::SnapshotInstallUnrecoverable`] if one can
    /// be neither (see the module docs).
    pub(crate) fn finish_interrupted_installs(&self) -> Result<(u64, u64)> {
        let (start, end) = meta_install_range();
        let mut markers = Vec::new();
        self.backend().scan(Cf::Meta, &start, &end, &mut |k, v| {
            markers.push(decode_record::<InstallMarker>(k, v, &|| {
                "snapshot install marker".to_string()
            })?);
            Ok(true)
        })?;
        let (mut finished, mut discarded) = (0, 0);
        for mut marker in markers {
            let group = marker.group;
            let dir = self.marker_path(&marker);
            match verify_for_redo(&dir, &marker) {
                Ok(()) => {
                    tracing::info!(group, dir = %dir.display(), "finishing an interrupted snapshot install");
                    self.redo_install(&mut marker, &dir, None)?;
                    finished += 1;
                }
                Err((file, problem)) if !marker.cleared => {
                    tracing::warn!(
                        group,
                        dir = %dir.display(),
                        file = %file.display(),
                        error = %problem,
                        "discarding an interrupted snapshot install: its files are missing or \
                         corrupt, and its shards were not yet cleared, so they keep their old \
                         data and applied index; the leader will send the snapshot again"
                    );
                    let mut set = WriteSet::new();
                    set.delete(Cf::Meta, meta_install_key(group).to_vec());
                    self.backend().write(set, true)?;
                    discarded += 1;
                }
                Err((file, problem)) => {
                    return Err(EngineError::SnapshotInstallUnrecoverable {
                        group,
                        file,
                        source: Box::new(problem),
                    })
                }
            }
        }
        Ok((finished, discarded))
    }
}

fn put_marker(set: &mut WriteSet, marker: &InstallMarker) {
    let key = meta_install_key(marker.group);
    set.put(Cf::Meta, key.to_vec(), encode_record(&key, marker));
}
