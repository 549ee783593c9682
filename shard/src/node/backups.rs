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

use shoal_engine::GroupBackup;
use shoal_engine::GroupId;
use tokio::time::Instant;

use shoal_consensus::{Index, Term};

use crate::protocol::{BackupRefusal, BACKUP_CHUNK_BYTES_MAX, BACKUP_FENCE_MS_MAX};

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
    outcome: Option<Result<GroupBackup, String>>,
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
                outcome: None,
                last_used: now,
            },
        );
        Ok((id, dir))
    }

    /// The export `id` finished with `backup`, or failed (`Err`, why);
    /// false if it was released meanwhile (the caller removes its
    /// directory).
    pub(super) fn exported(
        &mut self,
        id: u64,
        backup: Result<GroupBackup, String>,
        now: Instant,
    ) -> bool {
        match self.held.get_mut(&id) {
            Some(held) => {
                held.outcome = Some(backup);
                held.last_used = now;
                true
            }
            None => false,
        }
    }

    /// What export `id` holds: `Running` until it finishes, `Failed` (and
    /// released: the caller removes the directory returned) if it failed.
    pub(super) fn contents(
        &mut self,
        id: u64,
        now: Instant,
    ) -> Result<GroupBackup, (BackupRefusal, Option<PathBuf>)> {
        let held = self.held.get_mut(&id).ok_or((BackupRefusal::Gone, None))?;
        held.last_used = now;
        match &held.outcome {
            None => Err((BackupRefusal::Running, None)),
            Some(Ok(backup)) => Ok(backup.clone()),
            Some(Err(reason)) => {
                let reason = reason.clone();
                Err((BackupRefusal::Failed { reason }, self.release(id)))
            }
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
        let Some(Ok(backup)) = held.outcome.as_ref() else {
            return Err(BackupRefusal::Gone);
        };
        let files = &backup.files;
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
            .filter(|(_, h)| h.outcome.is_some() && now.duration_since(h.last_used) >= idle)
            .map(|(&id, _)| id)
            .collect();
        gone.into_iter().filter_map(|id| self.release(id)).collect()
    }
}

/// A fence a group's leader holds for a backup of several groups at one
/// point in time ([`crate::protocol::BackupRequest::FencedExport`]): while
/// it holds, the leader proposes no writes, shard steps or membership
/// changes, so nothing is written to the group between its export's view
/// and the moment every group's view is taken.
#[derive(Debug)]
pub(super) struct Fence<W> {
    /// The export it was set for.
    pub(super) id: u64,
    /// The leader's term when it was set: it ends with the leadership.
    pub(super) term: Term,
    /// When it ends on its own (a coordinator that went away).
    pub(super) until: Instant,
    /// The export, until it starts (the node keeps its directory and the
    /// caller waiting for its view): it starts once the leader's whole log
    /// is applied.
    pub(super) waiting: Option<W>,
}

impl<W> Fence<W> {
    /// A fence for export `id` set by the leader of `term` at `now`,
    /// holding at most `hold_ms` (capped at [`BACKUP_FENCE_MS_MAX`]).
    pub(super) fn new(id: u64, term: Term, now: Instant, hold_ms: u64, waiting: W) -> Fence<W> {
        Fence {
            id,
            term,
            until: now + Duration::from_millis(hold_ms.min(BACKUP_FENCE_MS_MAX)),
            waiting: Some(waiting),
        }
    }

    /// Whether the fence still holds for a node that leads (`leading`) in
    /// `term` at `now`.
    pub(super) fn holds(&self, leading: bool, term: Term, now: Instant) -> bool {
        leading && term == self.term && now < self.until
    }

    /// Whether the export may start: the leader's whole log is applied, so
    /// its view holds every write proposed before the fence.
    pub(super) fn may_export(&self, applied: Index, last: Index) -> bool {
        self.waiting.is_some() && applied >= last
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

    fn backup(files: &[(&str, u64)]) -> Result<GroupBackup, String> {
        Ok(GroupBackup {
            group: 1,
            applied: Default::default(),
            conf_state: Default::default(),
            hosted: false,
            shards: Default::default(),
            dir: "group-1".into(),
            files: files
                .iter()
                .map(|&(name, size_bytes)| shoal_engine::backup::BackupFile {
                    name: name.into(),
                    size_bytes,
                    crc32: 0,
                })
                .collect(),
        })
    }

    // Goal: a fence ends with the leadership, the term or its time, and
    // lets the export start only once the leader's log is applied.
    #[test]
    fn a_fence_holds_for_one_leader_term_and_a_bounded_time() {
        let now = Instant::now();
        let fence = Fence::new(9, 4, now, u64::MAX, ());
        let max = Duration::from_millis(BACKUP_FENCE_MS_MAX);
        assert!(fence.holds(true, 4, now));
        assert!(fence.holds(true, 4, now + max - Duration::from_millis(1)));
        assert!(
            !fence.holds(true, 4, now + max),
            "capped at BACKUP_FENCE_MS_MAX"
        );
        assert!(!fence.holds(false, 4, now), "not the leader any more");
        assert!(!fence.holds(true, 5, now), "a later term");
        assert!(!fence.may_export(10, 11), "an entry is not applied yet");
        assert!(fence.may_export(11, 11));
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
        assert_eq!(b.contents(id, now), Err((BackupRefusal::Running, None)));
        assert!(b.exported(id, backup(&[("kv.sst", big)]), now));
        assert_eq!(
            b.contents(id, now),
            backup(&[("kv.sst", big)]).map_err(|_| unreachable!())
        );
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
        assert!(
            !b.exported(id, backup(&[]), later),
            "released while running"
        );
        // A failed export answers why once, then is gone.
        assert!(b.exported(ids[2], Err("disk full".into()), later));
        let failed = b.contents(ids[2], later);
        assert!(
            matches!(&failed, Err((BackupRefusal::Failed { reason }, Some(_))) if reason == "disk full"),
            "{failed:?}"
        );
        assert_eq!(b.contents(ids[2], later), Err((BackupRefusal::Gone, None)));
        assert!(b.release(ids[1]).is_some());
        assert!(b.release(ids[1]).is_none());
        assert!(b.admit(2, root, later).is_ok());
    }
}
