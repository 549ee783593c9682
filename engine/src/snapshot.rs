//! Shard snapshots as SST files: export at one point in time, install
//! atomically.
//!
//! # Export
//! Inside one point-in-time view: the group's applied state, then for each
//! shard its `kv`, `dedup` and `meta` ranges, each into its own file
//! (RocksDB's SstFileWriter), then a `MANIFEST` naming every file with its
//! size and CRC32, itself checksummed. The same export carries Raft
//! InstallSnapshot and, later, shard migration.
//!
//! # Install, and why a crash cannot leave a mix
//! 1. Verify the manifest and every file's size and CRC32 (streamed, so a
//!    large shard never sits in memory). A bad file is an error naming it;
//!    nothing has been written yet.
//! 2. Write an *install marker* (the manifest and directory) to `meta`,
//!    synced. From here on the install is a redo log entry.
//! 3. Range-delete the shards' ranges, then ingest each file (via a hard
//!    link, so the original survives for a redo). Ingested files get
//!    sequence numbers newer than the range delete.
//! 4. Record the applied state and delete the marker in one synced write.
//!
//! A crash before 2 leaves the old shards untouched. A crash after 2 is
//! finished when the engine is next opened (steps 3 and 4 are idempotent),
//! before anything reads it: the new shards. Nobody ever observes a mix.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Cf, View, WriteSet};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::keys::{
    decode_record, encode_record, meta_applied_key, meta_install_key, meta_install_range,
    meta_shard_range, shard_range,
};
use crate::kv::AppliedState;
use crate::{GroupId, ShardId};

/// Name of the manifest file inside a snapshot directory.
pub const MANIFEST_FILE_NAME: &str = "MANIFEST";
/// Format version written into every manifest.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
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
    /// Shard whose range it holds.
    pub shard: ShardId,
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
    /// Applied index and term the data is at.
    pub applied: AppliedState,
    /// Shards it covers (empty ones included: installing clears them).
    pub shards: Vec<ShardId>,
    /// Files, in ingestion order.
    pub files: Vec<SnapshotFile>,
}

impl SnapshotManifest {
    /// Total bytes of the snapshot's files.
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstallMarker {
    dir: String,
    manifest: SnapshotManifest,
}

fn cf_by_name(name: &str) -> Result<Cf> {
    Cf::ALL
        .into_iter()
        .find(|cf| cf.name() == name)
        .ok_or_else(|| {
            EngineError::Corrupt(format!("snapshot names unknown column family {name:?}"))
        })
}

/// A column family and a `[start, end)` key range in it.
type CfRange = (Cf, (Vec<u8>, Vec<u8>));

/// Every range a shard owns.
fn shard_ranges(shard: ShardId) -> [CfRange; 3] {
    [
        (Cf::Kv, shard_range(shard)),
        (Cf::Dedup, shard_range(shard)),
        (Cf::Meta, meta_shard_range(shard)),
    ]
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

fn sync_dir(dir: &Path) -> Result<()> {
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
    for f in &manifest.files {
        cf_by_name(&f.cf)?;
        let path = dir.join(&f.name);
        let (crc, size) = file_checksum(&path)?;
        if size != f.size_bytes {
            return Err(EngineError::Corrupt(format!(
                "snapshot file {}: {size} bytes, manifest says {}",
                path.display(),
                f.size_bytes
            )));
        }
        if crc != f.crc32 {
            return Err(EngineError::Corrupt(format!(
                "snapshot file {}: checksum mismatch (manifest {:08x}, file {crc:08x})",
                path.display(),
                f.crc32
            )));
        }
    }
    Ok(())
}

impl<B: Backend> Engine<B> {
    /// Exports `shards` of `group` into the empty or new directory `dir`, at
    /// one point in time. Returns the manifest (also written to `dir`).
    pub fn export_snapshot(
        &self,
        group: GroupId,
        shards: &[ShardId],
        dir: &Path,
    ) -> Result<SnapshotManifest> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let mut manifest = SnapshotManifest {
            format_version: SNAPSHOT_FORMAT_VERSION,
            group,
            applied: AppliedState::default(),
            shards: shards.to_vec(),
            files: Vec::new(),
        };
        self.backend().with_view(&mut |view: &dyn View| {
            let key = meta_applied_key(group);
            if let Some(b) = view.get(Cf::Meta, &key)? {
                manifest.applied =
                    decode_record(&key, &b, &|| format!("applied index of group {group}"))?;
            }
            for &shard in shards {
                for (cf, (start, end)) in shard_ranges(shard) {
                    let name = format!("{}-{shard}.sst", cf.name());
                    let path = dir.join(&name);
                    if let Some(file) = view.export_range(cf, &start, &end, &path)? {
                        manifest.files.push(SnapshotFile {
                            name,
                            cf: cf.name().to_string(),
                            shard,
                            entries: file.entries,
                            size_bytes: file.size_bytes,
                            crc32: 0,
                        });
                    }
                }
            }
            Ok(())
        })?;
        for f in &mut manifest.files {
            let path = dir.join(&f.name);
            let (crc, size) = file_checksum(&path)?;
            f.crc32 = crc;
            f.size_bytes = size;
            File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(|e| EngineError::io(&path, e))?;
        }
        let path = dir.join(MANIFEST_FILE_NAME);
        let mut file = File::create(&path).map_err(|e| EngineError::io(&path, e))?;
        file.write_all(&encode_record(MANIFEST_CONTEXT, &manifest))
            .map_err(|e| EngineError::io(&path, e))?;
        file.sync_all().map_err(|e| EngineError::io(&path, e))?;
        sync_dir(dir)?;
        Ok(manifest)
    }

    /// Installs the snapshot in `dir` (made by [`Self::export_snapshot`])
    /// into its group: its shards' data replaces theirs and the group's
    /// applied state becomes the snapshot's. Verifies every checksum first.
    /// Consumes `dir` (removed on success). Atomic across crashes.
    pub fn install_snapshot(&self, dir: &Path) -> Result<SnapshotManifest> {
        let manifest = read_manifest(dir)?;
        verify_files(dir, &manifest)?;
        let dir_name = dir
            .canonicalize()
            .map_err(|e| EngineError::io(dir, e))?
            .display()
            .to_string();
        let marker = InstallMarker {
            dir: dir_name,
            manifest: manifest.clone(),
        };
        let key = meta_install_key(manifest.group);
        let mut set = WriteSet::new();
        set.put(Cf::Meta, key.to_vec(), encode_record(&key, &marker));
        self.backend().write(set, true)?;
        self.redo_install(&marker)?;
        Ok(manifest)
    }

    fn redo_install(&self, marker: &InstallMarker) -> Result<()> {
        let manifest = &marker.manifest;
        let dir = PathBuf::from(&marker.dir);
        self.apply_cache().clear();
        let mut clear = WriteSet::new();
        for &shard in &manifest.shards {
            for (cf, (start, end)) in shard_ranges(shard) {
                clear.delete_range(cf, start, end);
            }
        }
        self.backend().write(clear, true)?;
        for f in &manifest.files {
            let source = dir.join(&f.name);
            let link = dir.join(format!("{}.ingest", f.name));
            match std::fs::remove_file(&link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io(&link, e)),
            }
            std::fs::hard_link(&source, &link).map_err(|e| EngineError::io(&source, e))?;
            self.backend().ingest(cf_by_name(&f.cf)?, &link)?;
        }
        let mut finish = WriteSet::new();
        let applied_key = meta_applied_key(manifest.group);
        finish.put(
            Cf::Meta,
            applied_key.to_vec(),
            encode_record(&applied_key, &manifest.applied),
        );
        finish.delete(Cf::Meta, meta_install_key(manifest.group).to_vec());
        self.backend().write(finish, true)?;
        self.forget_group(manifest.group);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove an installed snapshot directory");
        }
        Ok(())
    }

    /// Finishes installs that a crash interrupted (run when opening);
    /// returns how many there were.
    pub(crate) fn finish_interrupted_installs(&self) -> Result<u64> {
        let (start, end) = meta_install_range();
        let mut markers = Vec::new();
        self.backend().scan(Cf::Meta, &start, &end, &mut |k, v| {
            markers.push(decode_record::<InstallMarker>(k, v, &|| {
                "snapshot install marker".to_string()
            })?);
            Ok(true)
        })?;
        for marker in &markers {
            tracing::info!(group = marker.manifest.group, dir = %marker.dir, "finishing an interrupted snapshot install");
            self.redo_install(marker)?;
        }
        Ok(markers.len() as u64)
    }
}
