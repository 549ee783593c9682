//! Backups served to the admin client ([`crate::protocol::Request::Backup`]).
//!
//! `shoal backup` asks each group's leader to `Export` the group: the
//! leader checks it may (it has committed an entry of its term and applied
//! everything committed, so every write acknowledged before the request,
//! by it or an earlier leader, is in the export), then exports on the
//! blocking pool ([`shoal_engine::Engine::export_group_backup`]: one
//! point-in-time view, taken while writes go on) into
//! `<snapshot dir>/backup-<id>`, and answers the files' names, sizes and
//! CRC32s. The client then `Read`s each file in chunks of at most
//! [`BACKUP_CHUNK_BYTES_MAX`] (read on the blocking pool), checks them
//! against the checksums, and `Release`s the export.
//!
//! Limits: at most [`BACKUPS_HELD_MAX`] exports held (running or done);
//! one unused for [`BACKUP_IDLE_MS_MAX`] is released (its client went
//! away); ids are drawn per start, and a restart removes every export
//! directory, so a client that outlives the node gets `Gone`.
//!
//! The bookkeeping here is pure; the node does the I/O.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_engine::backup::BackupFile;
use shoal_engine::GroupId;
use tokio::time::Instant;

use crate::protocol::{BackupRefusal, BACKUP_CHUNK_BYTES_MAX};

/// Most exports a node holds at once (running or done, not released).
pub const BACKUPS_HELD_MAX: usize = 4;
/// An export nobody read or released for this long is released.
pub const BACKUP_IDLE_MS_MAX: u64 = 60_000;
/// Prefix of export directories in the snapshot directory.
pub(super) const BACKUP_DIR_PREFIX: &str = "backup-";

/// One export held for reading.
#[derive(Debug)]
struct Held {
    /// The group exported (for logs).
    group: GroupId,
    dir: PathBuf,
    /// `None` while the export runs.
    files: Option<Vec<BackupFile>>,
    last_used: Instant,
}

/// The exports a node holds.
#[derive(Debug)]
pub(super) struct Backups {
    held: BTreeMap<u64, Held>,
    next_id: u64,
}

impl Backups {
    /// No exports; ids start at a number drawn from `seed` and the clock
    /// of this start, so a client of an earlier start gets `Gone`.
    pub(super) fn new(seed: u64) -> Backups {
        let drawn = seed ^ rand::random::<u64>();
        Backups {
            held: BTreeMap::new(),
            next_id: (drawn >> 16).max(1),
        }
    }

    /// Admits an export of `group` into a new directory under `root`:
    /// its id and directory, or `TooMany`.
    pub(super) fn admit(
        &mut self,
        group: GroupId,
        root: &Path,
        now: Instant,
    ) -> Result<(u64, PathBuf), BackupRefusal> {
        if self.held.len() >= BACKUPS_HELD_MAX {
            return Err(BackupRefusal::TooMany);
        }
        let id = self.next_id;
        self.next_id += 1;
        let dir = root.join(format!("{BACKUP_DIR_PREFIX}{id}"));
        self.held.insert(
            id,
            Held {
                group,
                dir: dir.clone(),
                files: None,
                last_used: now,
            },
        );
        Ok((id, dir))
    }

    /// The export `id` finished with `files`; false if it was released
    /// meanwhile (the caller removes its directory).
    pub(super) fn exported(&mut self, id: u64, files: Vec<BackupFile>, now: Instant) -> bool {
        match self.held.get_mut(&id) {
            Some(held) => {
                held.files = Some(files);
                held.last_used = now;
                true
            }
            None => false,
        }
    }

    /// Where to read `file` of export `id` from `offset`, and how many
    /// bytes: at most [`BACKUP_CHUNK_BYTES_MAX`], 0 at the end.
    pub(super) fn read(
        &mut self,
        id: u64,
        file: &str,
        offset: u64,
        now: Instant,
    ) -> Result<(PathBuf, u64), BackupRefusal> {
        let held = self.held.get_mut(&id).ok_or(BackupRefusal::Gone)?;
        let files = held.files.as_ref().ok_or(BackupRefusal::Gone)?;
        // Only names the export lists: no path from a client is opened.
        let f = files
            .iter()
            .find(|f| f.name == file)
            .ok_or(BackupRefusal::BadRead)?;
        if offset > f.size_bytes {
            return Err(BackupRefusal::BadRead);
        }
        held.last_used = now;
        Ok((
            held.dir.join(&f.name),
            (f.size_bytes - offset).min(BACKUP_CHUNK_BYTES_MAX),
        ))
    }

    /// Releases export `id`: its directory, to remove (`None`: unknown).
    pub(super) fn release(&mut self, id: u64) -> Option<PathBuf> {
        let held = self.held.remove(&id)?;
        tracing::debug!(id, group = held.group, "backup export released");
        Some(held.dir)
    }

    /// Releases the finished exports unused for `idle`: their
    /// directories, to remove.
    pub(super) fn expire(&mut self, idle: Duration, now: Instant) -> Vec<PathBuf> {
        let gone: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, h)| h.files.is_some() && now.duration_since(h.last_used) >= idle)
            .map(|(&id, _)| id)
            .collect();
        gone.into_iter().filter_map(|id| self.release(id)).collect()
    }
}

/// Reads `len` bytes of `path` from `offset` (blocking).
pub(super) fn read_chunk(path: &Path, offset: u64, len: u64) -> std::io::Result<bytes::Bytes> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len).read_to_end(&mut buf)?;
    if (buf.len() as u64) < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} ended early", path.display()),
        ));
    }
    Ok(buf.into())
}

/// Removes every export directory under `root` (at start: ids are drawn
/// per start, so none can be read again).
pub(super) fn remove_all(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(BACKUP_DIR_PREFIX)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size_bytes: u64) -> BackupFile {
        BackupFile {
            name: name.into(),
            size_bytes,
            crc32: 0,
        }
    }

    // Goal: the held set is bounded, reads name only listed files within
    // their size in bounded chunks, and idle or released exports are gone.
    #[test]
    fn exports_are_bounded_read_in_chunks_and_expire() {
        let now = Instant::now();
        let root = Path::new("/snap");
        let mut b = Backups::new(7);
        let ids: Vec<u64> = (0..BACKUPS_HELD_MAX)
            .map(|_| b.admit(1, root, now).unwrap().0)
            .collect();
        assert_eq!(b.admit(1, root, now), Err(BackupRefusal::TooMany));
        let id = ids[0];
        // Not readable while running.
        assert_eq!(b.read(id, "kv.sst", 0, now), Err(BackupRefusal::Gone));
        let big = 3 * BACKUP_CHUNK_BYTES_MAX + 5;
        assert!(b.exported(id, vec![file("kv.sst", big)], now));
        let (path, len) = b.read(id, "kv.sst", 0, now).unwrap();
        assert_eq!(path, root.join(format!("{BACKUP_DIR_PREFIX}{id}/kv.sst")));
        assert_eq!(len, BACKUP_CHUNK_BYTES_MAX);
        assert_eq!(b.read(id, "kv.sst", big - 5, now).unwrap().1, 5);
        assert_eq!(b.read(id, "kv.sst", big, now).unwrap().1, 0);
        assert_eq!(
            b.read(id, "kv.sst", big + 1, now),
            Err(BackupRefusal::BadRead)
        );
        assert_eq!(b.read(id, "../x", 0, now), Err(BackupRefusal::BadRead));
        // Idle: only finished exports expire.
        let idle = Duration::from_millis(BACKUP_IDLE_MS_MAX);
        let later = now + idle;
        assert_eq!(b.expire(idle, later).len(), 1);
        assert_eq!(b.read(id, "kv.sst", 0, later), Err(BackupRefusal::Gone));
        assert!(!b.exported(id, vec![], later), "released while running");
        assert!(b.release(ids[1]).is_some());
        assert!(b.release(ids[1]).is_none());
        assert!(b.admit(2, root, later).is_ok());
    }
}
