//! Restoring a backup into a new data directory, for [`crate::Db`] and
//! for `shoal node`.
//!
//! A backup ([`crate::engine::backup`]) is a directory of groups' SST
//! exports with a checksummed manifest, made by [`crate::Db::backup`] or by
//! `shoal backup` against a running cluster. Restoring it creates a data
//! directory laid out as `Db::open` and `shoal node` expect (the engine in
//! `db/`), holding exactly the backed-up groups: data, versions, sessions
//! and shard records, each group at the applied index it was backed up at,
//! its log starting after it.
//!
//! Everything is verified before anything is created: a missing,
//! truncated or corrupt file, or a bad manifest, is a
//! [`RestoreError`] naming the file, and the data directory does not exist
//! afterwards. The directory is built under a staging name next to it
//! (`.<name>.restoring`) and renamed into place when complete.

use std::path::Path;

use shoal_engine::backup::{
    restore_verified_backup, verify_backup, RestoreOptions, RestoreSummary,
};
use shoal_shard::node::KV_GROUP;

pub use shoal_engine::backup::{BackupError, BackupManifest, RestoreError};

/// The engine's directory inside a data directory (as `Db::open` and
/// `shoal node` lay it out).
pub const ENGINE_DIR_NAME: &str = "db";

/// Restores `backup` into the new data directory `data_dir` (which must
/// not exist; its parent is created if needed) with `options` (which
/// groups, with which voters, for which node). Blocking.
pub fn restore_data_dir(
    backup: &Path,
    data_dir: &Path,
    options: &RestoreOptions,
) -> Result<RestoreSummary, RestoreError> {
    let manifest = verify_backup(backup)?;
    if data_dir.symlink_metadata().is_ok() {
        return Err(RestoreError::TargetExists {
            path: data_dir.to_path_buf(),
        });
    }
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { path, source }
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let staging = parent.join(format!(".{name}.restoring"));
    match std::fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&staging)(e)),
        _ => {}
    }
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    let result =
        restore_verified_backup(backup, &manifest, &staging.join(ENGINE_DIR_NAME), options)
            .and_then(|summary| {
                std::fs::File::open(&staging)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&staging))?;
                std::fs::rename(&staging, data_dir).map_err(io(data_dir))?;
                std::fs::File::open(&parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&parent))?;
                Ok(summary)
            });
    if result.is_err() {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %staging.display(), error = %e, "could not remove an unfinished restore");
            }
        }
    }
    result
}

/// Restores `backup` into the new directory `data_dir` for
/// [`crate::Db::open`]: its key/value group only, as a group of one.
/// The backup may come from a `Db` or from a cluster (whose other groups
/// are left out). Blocking.
pub fn restore_db(backup: &Path, data_dir: &Path) -> Result<RestoreSummary, RestoreError> {
    restore_data_dir(
        backup,
        data_dir,
        &RestoreOptions {
            voters: Some(vec![crate::db::DB_NODE_ID]),
            groups: Some(vec![KV_GROUP]),
            ..Default::default()
        },
    )
}
