//! Snapshot files on a node: where exports and received files live, and the
//! blocking or long-running work done with them — exporting a group's
//! shards, verifying received files, streaming an export to a follower.
//! The event loop never runs this work itself (with
//! [`super::NodeConfig::blocking_io`]); it hands it to [`super::tasks`] and
//! hears back.
//!
//! # Layout under the snapshot directory
//! - `export-g<group>-i<index>/`: this node's latest export of a group, the
//!   snapshot it sends to followers (older ones are removed).
//! - `export-g<group>-tmp/`: an export being written (renamed when done).
//! - `recv-g<group>-i<index>-n<sender>/`: files received from a leader,
//!   installed once the `Snapshot` message for them verifies.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use shoal_consensus::{Index, NodeId};
use shoal_engine::snapshot::{read_manifest, sync_dir, verify_files};
use shoal_engine::{Backend, Engine, EngineError, GroupId, ShardId, SnapshotManifest};
use shoal_net::Transport;

use crate::protocol::{KvProtocol, SnapshotFileMeta};

/// Why snapshot file work failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotFileError {
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The engine failed to export, or found a file corrupt or missing.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A received snapshot is not the one its message announces.
    #[error("snapshot {dir}: manifest is of group {group_found} at index {index_found}, expected group {group} at {index} (or another term)")]
    NotAnnounced {
        /// The received directory.
        dir: PathBuf,
        /// Group the message names.
        group: GroupId,
        /// Index the message names.
        index: Index,
        /// Group the manifest names.
        group_found: GroupId,
        /// Index the manifest names.
        index_found: Index,
    },
    /// A shard's file could not be shipped to a node of its new group.
    #[error("shipping {file} to node {node}: {reason}")]
    Ship {
        /// The node.
        node: NodeId,
        /// The file.
        file: String,
        /// The transport's error.
        reason: String,
    },
    /// Shipped shard files are not the export the install names.
    #[error("{dir}: the shipped files are not the export the install entry names")]
    NotShipped {
        /// The incoming directory.
        dir: PathBuf,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotFileError + '_ {
    move |source| SnapshotFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory of this node's export of `group` at `index`.
pub fn export_dir(root: &Path, group: GroupId, index: Index) -> PathBuf {
    root.join(format!("export-g{group}-i{index}"))
}

/// The directory files of `group`'s snapshot at `index` from `from` go to.
pub fn recv_dir(root: &Path, group: GroupId, index: Index, from: NodeId) -> PathBuf {
    root.join(format!("recv-g{group}-i{index}-n{from}"))
}

/// Removes directories `<prefix><index>...` under `root` with an index at
/// or below `through` (best effort).
pub fn remove_dirs(root: &Path, prefix: &str, through: Index) {
    remove_dirs_except(root, prefix, through, &BTreeSet::new());
}

/// [`remove_dirs`], keeping the directories whose index is in `keep`.
pub fn remove_dirs_except(root: &Path, prefix: &str, through: Index, keep: &BTreeSet<Index>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let digits: String = rest
            .trim_start_matches('i')
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if digits
            .parse::<Index>()
            .is_ok_and(|i| i <= through && !keep.contains(&i))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Exports `group`'s `shards` at the group's applied index into
/// `export-g<group>-i<index>` (through a staging directory renamed when
/// complete, both directories synced). Blocking: runs off the event loop.
/// Returns the manifest; the caller records the snapshot and compacts.
pub fn export<B: Backend>(
    engine: &Engine<B>,
    root: &Path,
    group: GroupId,
) -> Result<SnapshotManifest, SnapshotFileError> {
    let staging = root.join(format!("export-g{group}-tmp"));
    let _ = std::fs::remove_dir_all(&staging);
    let manifest = engine.export_snapshot(group, &staging)?;
    let dir = export_dir(root, group, manifest.applied.index);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).map_err(io_error(&staging))?;
    sync_dir(root)?;
    Ok(manifest)
}

/// Whether `dir` holds the complete, intact snapshot of `group` at `index`
/// and `term` (manifest and every file's size and CRC32). Blocking: reads
/// every file.
pub fn verify(
    dir: &Path,
    group: GroupId,
    index: Index,
    term: shoal_consensus::Term,
) -> Result<(), SnapshotFileError> {
    let manifest = read_manifest(dir)?;
    if manifest.group != group || manifest.applied.index != index || manifest.applied.term != term {
        return Err(SnapshotFileError::NotAnnounced {
            dir: dir.to_path_buf(),
            group,
            index,
            group_found: manifest.group,
            index_found: manifest.applied.index,
        });
    }
    Ok(verify_files(dir, &manifest)?)
}

/// Streams every file of the export in `dir` to `to`; true once all
/// arrived (the receiver verified each chunk and renamed each file).
pub async fn transfer<T: Transport<KvProtocol>>(
    transport: &T,
    to: NodeId,
    dir: &Path,
    group: GroupId,
    index: Index,
) -> bool {
    // A directory listing is short; reading it here keeps a paused test
    // clock's runs deterministic (no blocking-pool hop).
    let listed = std::fs::read_dir(dir).and_then(|entries| {
        let mut names = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".tmp") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    });
    let Ok(names) = listed else {
        return false;
    };
    for name in names {
        let meta = SnapshotFileMeta {
            group,
            index,
            name: name.clone(),
            shard: None,
        };
        let sent = transport
            .send_file(shoal_net::NodeId(to), dir.join(&name), meta)
            .await;
        match sent {
            Ok(bytes) => {
                super::telemetry::snapshot_sent(super::telemetry::snapshot_kind(false), bytes)
            }
            Err(_) => return false,
        }
    }
    true
}

/// Ships the shard export in `dir` (export `export` made for `group`'s
/// `shard` at config `num`, see [`super::moves::export_id`]) to every node
/// of `to_nodes`, to all of them at once: over the net's bulk streams to
/// peers, each file's meta naming the export in its `index`, and by hard
/// link (or copy, across file systems) into [`super::moves::incoming_dir`]
/// for `me`. Each file resolves only once its receiver verified and stored
/// it. The first failure is the error (the other sends are stopped).
pub async fn ship<T: Transport<KvProtocol>>(
    transport: &T,
    me: NodeId,
    root: &Path,
    dir: &Path,
    (group, shard, num, export): (GroupId, ShardId, u64, u64),
    to_nodes: &[NodeId],
) -> Result<(), SnapshotFileError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let name = entry
            .map_err(io_error(dir))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        names.push(name);
    }
    names.sort();
    // Owned here: dropping the set (on the first error, or when the node
    // stops the task that ships) stops every send still running.
    let mut sends: tokio::task::JoinSet<Result<(), SnapshotFileError>> =
        tokio::task::JoinSet::new();
    for &to in to_nodes {
        let (transport, names, dir) = (transport.clone(), names.clone(), dir.to_path_buf());
        let incoming = super::moves::incoming_dir(root, group, shard, num, export);
        sends.spawn(async move {
            if to == me {
                let files: Vec<(PathBuf, String)> =
                    names.iter().map(|n| (dir.join(n), n.clone())).collect();
                // Inline: links are metadata operations (a copy only
                // across file systems), and the simulated nodes need this
                // to stay on their deterministic runtime.
                link_into(&files, &incoming)?;
                tracing::info!(
                    shard,
                    num,
                    to,
                    "shard files linked into this node's incoming directory"
                );
                return Ok(());
            }
            let started = std::time::Instant::now();
            let mut bytes = 0u64;
            for name in &names {
                let meta = SnapshotFileMeta {
                    group,
                    index: export,
                    name: name.clone(),
                    shard: Some((shard, num)),
                };
                bytes += transport
                    .send_file(shoal_net::NodeId(to), dir.join(name), meta)
                    .await
                    .map_err(|e| SnapshotFileError::Ship {
                        node: to,
                        file: name.clone(),
                        reason: e.to_string(),
                    })?;
            }
            super::telemetry::snapshot_sent(super::telemetry::snapshot_kind(true), bytes);
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                shard,
                num,
                to,
                bytes,
                ms = (secs * 1000.0) as u64,
                mb_per_s = if secs > 0.0 {
                    bytes as f64 / secs / 1e6
                } else {
                    0.0
                },
                "shipped a shard's files"
            );
            Ok(())
        });
    }
    while let Some(joined) = sends.join_next().await {
        joined.map_err(|e| SnapshotFileError::Ship {
            node: me,
            file: String::new(),
            reason: format!("ship task failed: {e}"),
        })??;
    }
    Ok(())
}

/// Exports a moving shard into `dir` (emptied first) with `export`, on the
/// blocking pool when `blocking` (this node is `me`, its snapshot
/// directory `root`), then ships the files to every node of `to_nodes`
/// ([`ship`]) as the export of `shard` for `to_group` at config `num`.
/// Returns the export's manifest once every node has the files.
pub async fn export_and_ship<B: Backend, T: Transport<KvProtocol>>(
    engine: &Engine<B>,
    transport: &T,
    (me, root, blocking): (NodeId, &Path, bool),
    dir: &Path,
    (to_group, shard, num): (GroupId, ShardId, u64),
    to_nodes: &[NodeId],
    export: impl FnOnce(&Engine<B>, &Path) -> Result<SnapshotManifest, EngineError> + Send + 'static,
) -> Result<SnapshotManifest, SnapshotFileError> {
    let (engine_copy, export_dir) = (engine.clone(), dir.to_path_buf());
    let run = move || -> Result<SnapshotManifest, SnapshotFileError> {
        let _ = std::fs::remove_dir_all(&export_dir);
        Ok(export(&engine_copy, &export_dir)?)
    };
    let manifest = if blocking {
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| SnapshotFileError::Ship {
                node: me,
                file: String::new(),
                reason: format!("export task failed: {e}"),
            })??
    } else {
        run()?
    };
    let export = super::moves::export_id(&manifest);
    ship(
        transport,
        me,
        root,
        dir,
        (to_group, shard, num, export),
        to_nodes,
    )
    .await?;
    Ok(manifest)
}

/// Puts files into `dir` (kept where they are), durably: a hard link where
/// the file system allows one (the export and the incoming directory are
/// both under the node's snapshot directory; a link shares the immutable
/// file instead of writing it again), a copy otherwise.
pub(super) fn link_into(files: &[(PathBuf, String)], dir: &Path) -> Result<(), SnapshotFileError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for (from, name) in files {
        let target = dir.join(name);
        let _ = std::fs::remove_file(&target);
        if std::fs::hard_link(from, &target).is_err() {
            std::fs::copy(from, &target)
                .and_then(|_| File::open(&target).and_then(|f| f.sync_all()))
                .map_err(io_error(&target))?;
        }
    }
    sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Whether a received file's name is a plain file name (no path parts).
pub fn file_name_ok(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != ".."
}

/// Moves received files (where the transport left them, file name) into
/// `dir` and makes that durable: the files' data was synced by the
/// transport, and the directory entries are synced here, so an install
/// that a crash interrupts finds its files after the restart.
pub fn file_into_place(files: &[(PathBuf, String)], dir: &Path) -> Result<(), SnapshotFileError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for (from, name) in files {
        let target = dir.join(name);
        std::fs::rename(from, &target)
            .or_else(|_| {
                std::fs::copy(from, &target)
                    .and_then(|_| File::open(&target).and_then(|f| f.sync_all()))
                    .and_then(|()| std::fs::remove_file(from))
            })
            .map_err(io_error(&target))?;
    }
    sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: only directories of the prefix at or below the index go.
    #[test]
    fn remove_dirs_keeps_newer_and_other_groups() {
        let root = tempfile::tempdir().unwrap();
        for name in [
            "export-g1-i5",
            "export-g1-i9",
            "export-g2-i3",
            "recv-g1-i4-n2",
        ] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        remove_dirs_except(root.path(), "export-g1-", 8, &BTreeSet::from([5]));
        remove_dirs(root.path(), "recv-g1-", 4);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["export-g1-i5", "export-g1-i9", "export-g2-i3"]);
    }

    #[test]
    fn file_names_with_path_parts_are_refused() {
        assert!(file_name_ok("kv-0.sst"));
        for bad in ["", ".", "..", "a/b", "..\\x", "/etc/passwd"] {
            assert!(!file_name_ok(bad), "{bad:?}");
        }
    }
}
