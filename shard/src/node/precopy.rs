//! Copy before freeze: how a shard move ships the bulk of a shard while
//! the shard still serves, so that the time it refuses writes does not
//! grow with its size.
//!
//! Before it freezes a shard, the controller asks the source group's
//! leader to *pre-copy* it ([`crate::protocol::ShardCommand::Precopy`], not
//! a log entry: one node's work, which changes no replicated state). The
//! leader starts a [`Precopy`] record for the shard, then, off the loop,
//! exports the shard's data at one point in time
//! ([`shoal_engine::Engine::export_shard_base`]) and ships the files to
//! every destination node, as a freeze ships its export. From the moment
//! the record exists, every write this node applies to the shard adds its
//! keys to the record ([`written_keys`]); the record exists before the
//! export's view is taken, so the keys cover every write the export lacks
//! (and perhaps a few it has, which does no harm).
//!
//! When this node then applies the freeze as the leader, it exports only
//! those keys as they are at the freeze, with the shard's sessions
//! ([`shoal_engine::Engine::export_shard_delta`]): the final export names
//! the pre-copied data file under [`base_file_name`], which the source does
//! not ship again; each destination node links it in from the pre-copy's
//! incoming directory ([`link_precopied`]) before it checks or ingests the
//! files. Installed in order (base, then the changed keys with deletions,
//! then the sessions), the shard is exactly what a full export at the
//! freeze gives.
//!
//! Whenever the record cannot vouch for every write (it outgrew its
//! bounds, this node installed a group snapshot, restarted, or another node
//! leads at the freeze), the freeze exports the whole shard, as without a
//! pre-copy: the pre-copy only ever saves work, never decides what moves.

use std::collections::BTreeSet;
use std::path::Path;

use bytes::Bytes;
use shoal_engine::{Command, GroupId, ShardId, SnapshotManifest};

use super::group::Waiter;
use super::moves;

/// Most distinct keys a pre-copy record tracks; beyond, the record gives
/// up and the freeze exports the whole shard (a shard written that much
/// since its pre-copy gains little from it).
pub const PRECOPY_KEYS_MAX: usize = 262_144;

/// Most bytes of tracked keys one pre-copy record holds (with
/// [`PRECOPY_KEYS_MAX`], this bounds its memory).
pub const PRECOPY_KEY_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// Most pre-copies one group keeps at a time (the controller moves at most
/// `MOVES_CONCURRENT_MAX` shards at once); a pre-copy asked beyond is
/// refused, and the move goes on without it.
pub const PRECOPIES_PER_GROUP_MAX: usize = 16;

/// A pre-copy of one shard of a group this node leads (see the module
/// docs).
pub(super) struct Precopy {
    /// This node's number for it: the export that finishes is this
    /// record's only if the numbers match (a record dropped and made again
    /// meanwhile noted writes from a later point than an older export's).
    pub(super) id: u64,
    /// The config that moves the shard.
    pub(super) num: u64,
    /// Where it moves.
    pub(super) to_group: GroupId,
    /// Keys written to the shard since the record was made.
    keys: BTreeSet<Bytes>,
    /// Their bytes.
    key_bytes: u64,
    /// Set once the keys outgrew the bounds (and dropped): the record can
    /// no longer vouch for every write.
    overflowed: bool,
    /// The pre-copy's export, once shipped.
    pub(super) base: Option<SnapshotManifest>,
    /// Callers waiting for the pre-copy to be shipped.
    pub(super) waiters: Vec<Waiter>,
}

impl Precopy {
    /// A record for a pre-copy about to start.
    pub(super) fn new(id: u64, num: u64, to_group: GroupId, waiter: Waiter) -> Self {
        Precopy {
            id,
            num,
            to_group,
            keys: BTreeSet::new(),
            key_bytes: 0,
            overflowed: false,
            base: None,
            waiters: vec![waiter],
        }
    }

    /// Notes the keys `command` writes.
    pub(super) fn note(&mut self, command: &Command) {
        if self.overflowed {
            return;
        }
        for key in written_keys(command) {
            if self.keys.contains(key) {
                continue;
            }
            self.key_bytes += key.len() as u64;
            self.keys.insert(key.clone());
            if self.keys.len() > PRECOPY_KEYS_MAX || self.key_bytes > PRECOPY_KEY_BYTES_MAX {
                self.overflowed = true;
                self.keys = BTreeSet::new();
                self.key_bytes = 0;
                return;
            }
        }
    }

    /// What a freeze of the shard for `num` to `to_group` can export on
    /// top of this pre-copy: its shipped export and the keys written since;
    /// `None` if the record does not cover that freeze (another config or
    /// destination, not shipped yet, or overflowed).
    pub(super) fn delta_for(
        self,
        num: u64,
        to_group: GroupId,
    ) -> Option<(SnapshotManifest, Vec<Bytes>)> {
        if self.num != num || self.to_group != to_group || self.overflowed {
            return None;
        }
        Some((self.base?, self.keys.into_iter().collect()))
    }
}

/// The keys a command writes (none for reads and session expiries).
pub fn written_keys(command: &Command) -> Vec<&Bytes> {
    match command {
        Command::Put { key, .. }
        | Command::PutIfVersion { key, .. }
        | Command::Append { key, .. }
        | Command::Delete { key } => vec![key],
        Command::Batch { writes, .. } => writes.iter().map(|w| w.key()).collect(),
        Command::Get { .. } | Command::Scan { .. } | Command::ExpireSessions { .. } => Vec::new(),
    }
}

/// The name a final export gives the data file of its pre-copy, the export
/// [`moves::export_id`] `base`: what tells a destination node to link the
/// file in from that pre-copy's incoming directory.
pub fn base_file_name(base: u64) -> String {
    format!("precopy-{base:016x}.sst")
}

/// The pre-copy export a file name of [`base_file_name`] names.
pub fn parse_base_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("precopy-")?.strip_suffix(".sst")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Puts the pre-copied files that `manifest` (an export of `shard` for
/// `group` at config `num`, kept in `dir`) names into `dir`, by hard link
/// from their pre-copy's incoming directory (a copy across file systems).
/// Files in place already, or whose pre-copy is not here, are left: the
/// caller's check (or the install's verification) sees what is missing.
/// Blocking.
pub fn link_precopied(
    root: &Path,
    (group, shard, num): (GroupId, ShardId, u64),
    dir: &Path,
    manifest: &SnapshotManifest,
) {
    for f in &manifest.files {
        let Some(base) = parse_base_file_name(&f.name) else {
            continue;
        };
        let target = dir.join(&f.name);
        if std::fs::metadata(&target).is_ok_and(|m| m.len() == f.size_bytes) {
            continue;
        }
        let source = precopied_file(root, (group, shard, num), base);
        if !source.exists() {
            continue;
        }
        if let Err(e) = super::snapshots::link_into(&[(source.clone(), f.name.clone())], dir) {
            tracing::warn!(from = %source.display(), to = %target.display(), error = %e, "could not put a pre-copied file in place");
        }
    }
}

/// Where a destination node keeps the data file of pre-copy `base` of
/// `shard` for `group` at config `num`, as it arrived.
fn precopied_file(
    root: &Path,
    (group, shard, num): (GroupId, ShardId, u64),
    base: u64,
) -> std::path::PathBuf {
    moves::incoming_dir(root, group, shard, num, base).join(shoal_engine::snapshot::KV_FILE_NAME)
}

/// Most shipped files whose checksums a node remembers (see
/// [`checked_files`]); the oldest by path go first. Forgetting one only
/// costs a read at its install.
pub const PLACED_CHECKSUMS_MAX: usize = 4096;

/// A shipped file as it was checksummed when it arrived: its size, CRC32,
/// and inode (the install trusts the checksum only for that very file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Bytes.
    pub size_bytes: u64,
    /// CRC32 of the whole file.
    pub crc32: u32,
    /// Its inode number.
    pub inode: u64,
}

impl Checked {
    /// Checksums the file at `path`; `None` if it cannot be read. Blocking.
    pub fn of(path: &Path) -> Option<Checked> {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(path).ok()?.ino();
        let (crc32, size_bytes) = shoal_engine::snapshot::file_checksum(path).ok()?;
        Some(Checked {
            size_bytes,
            crc32,
            inode,
        })
    }
}

/// Which files of an install's `manifest` (an export of `shard` for
/// `group` at config `num`, kept in `dir`) were checksummed as they
/// arrived, with the manifest's size and CRC32 (`placed`, by path): a
/// pre-copied file under its pre-copy's path, any other in `dir`. Their
/// names, with the inode each must still be ([`still_checked`]).
pub fn checked_files(
    root: &Path,
    (group, shard, num): (GroupId, ShardId, u64),
    dir: &Path,
    manifest: &SnapshotManifest,
    placed: &std::collections::BTreeMap<std::path::PathBuf, Checked>,
) -> Vec<(String, u64)> {
    manifest
        .files
        .iter()
        .filter_map(|f| {
            let path = match parse_base_file_name(&f.name) {
                Some(base) => precopied_file(root, (group, shard, num), base),
                None => dir.join(&f.name),
            };
            let c = placed.get(&path)?;
            (c.size_bytes == f.size_bytes && c.crc32 == f.crc32).then(|| (f.name.clone(), c.inode))
        })
        .collect()
}

/// The names of `checked` ([`checked_files`]) that are, in `dir`, still
/// the inode that was checksummed (a hard link of it). Blocking.
pub fn still_checked(dir: &Path, checked: &[(String, u64)]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    checked
        .iter()
        .filter(|(name, inode)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.ino() == *inode))
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_engine::{AppliedState, BatchWrite, SnapshotScope};

    fn put(key: &str) -> Command {
        Command::Put {
            key: Bytes::from(key.to_string()),
            value: Bytes::from_static(b"v"),
        }
    }

    fn manifest() -> SnapshotManifest {
        SnapshotManifest {
            format_version: shoal_engine::snapshot::SNAPSHOT_FORMAT_VERSION,
            group: 1,
            applied: AppliedState::default(),
            scope: SnapshotScope::Shard {
                shard: 3,
                target: 2,
            },
            files: Vec::new(),
        }
    }

    #[test]
    fn written_keys_are_the_keys_a_command_changes() {
        assert_eq!(written_keys(&put("a")), vec![&Bytes::from_static(b"a")]);
        let batch = Command::Batch {
            conditions: vec![shoal_engine::Condition {
                key: Bytes::from_static(b"c"),
                version: 1,
            }],
            writes: vec![
                BatchWrite::Put {
                    key: Bytes::from_static(b"x"),
                    value: Bytes::new(),
                },
                BatchWrite::Delete {
                    key: Bytes::from_static(b"y"),
                },
            ],
        };
        // A condition reads its key; only the writes change keys.
        assert_eq!(
            written_keys(&batch),
            vec![&Bytes::from_static(b"x"), &Bytes::from_static(b"y")]
        );
        assert!(written_keys(&Command::Get {
            key: Bytes::from_static(b"a")
        })
        .is_empty());
        assert!(written_keys(&Command::ExpireSessions { sessions: vec![] }).is_empty());
    }

    #[test]
    fn a_record_covers_only_its_own_shipped_move() {
        let mut p = Precopy::new(1, 5, 2, Waiter::nobody());
        p.note(&put("a"));
        p.note(&put("b"));
        p.note(&put("a"));
        // Not shipped yet: nothing to build on.
        let unshipped = Precopy {
            waiters: Vec::new(),
            base: None,
            keys: p.keys.clone(),
            ..Precopy::new(1, 5, 2, Waiter::nobody())
        };
        assert!(unshipped.delta_for(5, 2).is_none());
        p.base = Some(manifest());
        let again = |p: &Precopy| Precopy {
            waiters: Vec::new(),
            base: p.base.clone(),
            keys: p.keys.clone(),
            key_bytes: p.key_bytes,
            overflowed: p.overflowed,
            id: p.id,
            num: p.num,
            to_group: p.to_group,
        };
        assert!(again(&p).delta_for(6, 2).is_none(), "another config");
        assert!(again(&p).delta_for(5, 3).is_none(), "another destination");
        let (base, keys) = again(&p).delta_for(5, 2).unwrap();
        assert_eq!(base, manifest());
        assert_eq!(
            keys,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
    }

    #[test]
    fn a_record_that_outgrows_its_bounds_gives_up() {
        let mut p = Precopy::new(1, 5, 2, Waiter::nobody());
        p.base = Some(manifest());
        for i in 0..=PRECOPY_KEYS_MAX {
            p.note(&put(&format!("k{i}")));
        }
        assert!(p.overflowed);
        assert!(p.keys.is_empty(), "its memory is given back");
        p.note(&put("later"));
        assert!(p.keys.is_empty());
        assert!(p.delta_for(5, 2).is_none());

        let mut big = Precopy::new(1, 5, 2, Waiter::nobody());
        big.base = Some(manifest());
        let key = "k".repeat(1024 * 1024);
        for i in 0..=PRECOPY_KEY_BYTES_MAX / (1024 * 1024) {
            big.note(&put(&format!("{key}{i}")));
        }
        assert!(big.delta_for(5, 2).is_none(), "bounded by bytes too");
    }

    #[test]
    fn base_file_names_round_trip() {
        for id in [0, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(parse_base_file_name(&base_file_name(id)), Some(id));
        }
        for name in [
            "kv.sst",
            "precopy-12.sst",
            "precopy-zzzzzzzzzzzzzzzz.sst",
            "dedup.sst",
        ] {
            assert_eq!(parse_base_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn pre_copied_files_are_linked_into_the_final_export() {
        let root = tempfile::tempdir().unwrap();
        let base_id = 0x1234;
        let pre = moves::incoming_dir(root.path(), 2, 3, 5, base_id);
        std::fs::create_dir_all(&pre).unwrap();
        std::fs::write(pre.join("kv.sst"), b"base data").unwrap();
        let mut m = manifest();
        m.files.push(shoal_engine::snapshot::SnapshotFile {
            name: base_file_name(base_id),
            cf: "kv".into(),
            entries: 1,
            size_bytes: 9,
            crc32: 0,
        });
        m.files.push(shoal_engine::snapshot::SnapshotFile {
            name: base_file_name(0x9999),
            cf: "kv".into(),
            entries: 1,
            size_bytes: 9,
            crc32: 0,
        });
        let dir = moves::incoming_dir(root.path(), 2, 3, 5, 0x5678);
        link_precopied(root.path(), (2, 3, 5), &dir, &m);
        assert_eq!(
            std::fs::read(dir.join(base_file_name(base_id))).unwrap(),
            b"base data"
        );
        assert!(
            !dir.join(base_file_name(0x9999)).exists(),
            "a pre-copy that is not here is left missing"
        );
        // Linking again changes nothing.
        link_precopied(root.path(), (2, 3, 5), &dir, &m);
        assert_eq!(
            std::fs::read(dir.join(base_file_name(base_id))).unwrap(),
            b"base data"
        );

        // The pre-copied file was checksummed when it arrived: the install
        // may take it as verified, if the manifest agrees and the file in
        // the export is that very inode.
        let checked = Checked::of(&pre.join("kv.sst")).unwrap();
        m.files[0].crc32 = checked.crc32;
        let placed = std::collections::BTreeMap::from([(pre.join("kv.sst"), checked)]);
        let names = checked_files(root.path(), (2, 3, 5), &dir, &m, &placed);
        assert_eq!(names, vec![(base_file_name(base_id), checked.inode)]);
        assert_eq!(still_checked(&dir, &names), vec![base_file_name(base_id)]);
        // Another checksum in the manifest: not vouched for.
        let mut other = m.clone();
        other.files[0].crc32 ^= 1;
        assert!(checked_files(root.path(), (2, 3, 5), &dir, &other, &placed).is_empty());
        // Replaced by another file since: not vouched for.
        std::fs::remove_file(dir.join(base_file_name(base_id))).unwrap();
        std::fs::write(dir.join(base_file_name(base_id)), b"base data").unwrap();
        assert!(still_checked(&dir, &names).is_empty());
    }
}
