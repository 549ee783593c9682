//! The Raft log store: entries and hard state of every group on the node,
//! written together with one synced write per round (group commit).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_consensus::{
    ConfState, Entry, EntryKind, HardState, Index, RaftState, Snapshot, Storage, StorageError,
    Term, ENTRY_OVERHEAD_BYTES,
};

use crate::backend::{Backend, Cf, View, WriteSet};
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::{EngineError, LimitKind, Result};
use crate::keys::{checksum, decode_record, encode_record, group_key, log_key};
use crate::GroupId;

/// What `raft_state` holds for a group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Term, vote, commit.
    pub hard_state: HardState,
    /// Membership.
    pub conf_state: ConfState,
    /// Last index removed from the log by compaction or a snapshot (0: none).
    pub truncated_index: Index,
    /// Term of the entry at `truncated_index`.
    pub truncated_term: Term,
    /// The latest snapshot this group can send (descriptor; see
    /// [`shoal_consensus::Snapshot`]).
    pub snapshot: Option<Snapshot>,
    /// Running size of the log: the [`Entry::size_bytes`] of every entry
    /// appended since the last compaction or snapshot, kept so the node
    /// can decide to compact without reading the log. An upper estimate:
    /// a suffix replaced by a conflicting append stays counted until the
    /// next compaction, which recounts the entries that remain.
    pub log_bytes: u64,
}

/// Stored entry layout: `crc32 (4, BE) | term (8, BE) | kind (1) | data`;
/// the index is in the key, and the CRC covers the key too, so an entry
/// copied under the wrong index is caught. Hand-laid rather than postcard:
/// this is the hottest write path, one allocation and one copy per entry.
const ENTRY_HEADER_BYTES: usize = 4 + 8 + 1;

fn kind_byte(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Normal => 0,
        EntryKind::ConfigChange => 1,
    }
}

fn encode_entry(key: &[u8], entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENTRY_HEADER_BYTES + entry.data.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&entry.term.to_be_bytes());
    out.push(kind_byte(entry.kind));
    out.extend_from_slice(&entry.data);
    let crc = checksum(key, &out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    out
}

/// One group's part of a [`LogBatch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupWrite {
    /// The group.
    pub group: GroupId,
    /// A snapshot received from the leader: the log is reset to start after
    /// it (applied before `entries`).
    pub snapshot: Option<Snapshot>,
    /// Entries to append; they must be contiguous. Entries at or below the
    /// current last index replace the conflicting suffix.
    pub entries: Vec<Entry>,
    /// New hard state, if it changed.
    pub hard_state: Option<HardState>,
    /// New membership, if it changed.
    pub conf_state: Option<ConfState>,
}

/// Appends and hard states of any number of groups, persisted by
/// [`Engine::write_log`] with one synced write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogBatch {
    /// Per-group writes; a group may appear once.
    pub groups: Vec<GroupWrite>,
}

impl LogBatch {
    /// Total payload bytes, as counted against `batch_bytes_max`.
    pub fn size_bytes(&self) -> u64 {
        self.groups
            .iter()
            .flat_map(|g| &g.entries)
            .map(Entry::size_bytes)
            .sum()
    }
}

/// Where a group's log starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogBounds {
    pub(crate) truncated_index: Index,
    pub(crate) truncated_term: Term,
    pub(crate) last_index: Index,
}

impl GroupLog {
    pub(crate) fn bounds(&self) -> LogBounds {
        LogBounds {
            truncated_index: self.state.truncated_index,
            truncated_term: self.state.truncated_term,
            last_index: self.last_index,
        }
    }
}

/// What the engine caches per group: the persisted state and the last index.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupLog {
    pub(crate) group: GroupId,
    pub(crate) state: GroupState,
    pub(crate) last_index: Index,
}

/// [`Entry::size_bytes`] of a stored entry, checked against its CRC32
/// without copying its data.
fn stored_entry_size(group: GroupId, key: &[u8], value: &[u8], index: Index) -> Result<u64> {
    if value.len() < ENTRY_HEADER_BYTES {
        return Err(EngineError::Corrupt(format!(
            "raft log entry group {group} index {index}: record is truncated"
        )));
    }
    let (crc, body) = value.split_at(4);
    if u32::from_be_bytes(crc.try_into().unwrap_or_default()) != checksum(key, body) {
        return Err(EngineError::Corrupt(format!(
            "raft log entry group {group} index {index}: checksum mismatch"
        )));
    }
    Ok((value.len() - ENTRY_HEADER_BYTES) as u64 + ENTRY_OVERHEAD_BYTES)
}

fn decode_entry(group: GroupId, key: &[u8], value: &[u8], index: Index) -> Result<Entry> {
    let corrupt = |what: &str| {
        EngineError::Corrupt(format!(
            "raft log entry group {group} index {index}: {what}"
        ))
    };
    if value.len() < ENTRY_HEADER_BYTES {
        return Err(corrupt("record is truncated"));
    }
    let (crc, body) = value.split_at(4);
    if u32::from_be_bytes(crc.try_into().unwrap_or_default()) != checksum(key, body) {
        return Err(corrupt("checksum mismatch"));
    }
    let term = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
    let kind = match body[8] {
        0 => EntryKind::Normal,
        1 => EntryKind::ConfigChange,
        other => return Err(corrupt(&format!("unknown entry kind {other}"))),
    };
    Ok(Entry {
        term,
        index,
        kind,
        data: Bytes::copy_from_slice(&body[9..]),
    })
}

pub(crate) fn load_group(view: &dyn View, group: GroupId) -> Result<GroupLog> {
    let key = group_key(group);
    let state: GroupState = match view.get(Cf::RaftState, &key)? {
        Some(bytes) => decode_record(&key, &bytes, &|| format!("raft state of group {group}"))?,
        None => GroupState::default(),
    };
    let last = view.last_in(Cf::RaftLog, &log_key(group, 0), &log_key(group, u64::MAX))?;
    let last_index = match last {
        Some((k, _)) => crate::keys::parse_log_key(&k)?.1,
        None => state.truncated_index,
    };
    Ok(GroupLog {
        group,
        last_index: last_index.max(state.truncated_index),
        state,
    })
}

impl<B: Backend> Engine<B> {
    /// Persists `batch` with ONE synced write, however many groups it spans.
    /// On return every entry and hard state in it is durable.
    pub fn write_log(&self, batch: LogBatch) -> Result<()> {
        self.write_log_with(batch, true)
    }

    /// Writes `batch` without waiting for the disk: it becomes durable with
    /// the next synced write, and a crash before that loses it only together
    /// with every later write (the database's write-ahead log is one ordered
    /// log). For batches no message depends on: hard states that only move
    /// the commit index, which Raft may forget.
    pub fn write_log_unsynced(&self, batch: LogBatch) -> Result<()> {
        self.write_log_with(batch, false)
    }

    fn write_log_with(&self, batch: LogBatch, sync: bool) -> Result<()> {
        // A batch of one entry is always taken, whatever its size: its size
        // was bounded by the limits of the leader that proposed it, and a
        // replica with a smaller limit must still persist what the group
        // committed (refusing would stop it for good). Larger batches are
        // split by the caller to fit.
        let entries: usize = batch.groups.iter().map(|g| g.entries.len()).sum();
        if entries > 1 {
            EngineConfig::check(
                LimitKind::BatchBytes,
                batch.size_bytes(),
                self.config().batch_bytes_max,
            )?;
        }
        let _writer = self.log_write_lock();
        let mut set = WriteSet::new();
        let mut updated = Vec::with_capacity(batch.groups.len());
        for write in batch.groups {
            let mut log = self.group_log(write.group)?;
            stage_group_write(&mut set, &mut log, write)?;
            updated.push(log);
        }
        let bytes = set.bytes;
        let started = std::time::Instant::now();
        self.backend().write(set, sync)?;
        crate::metrics::log_write(sync, started.elapsed(), bytes);
        for log in updated {
            self.cache_group(log);
        }
        Ok(())
    }

    /// Removes entries up to and including `through` from `group`'s log,
    /// remembering its term. Only entries already applied to the state
    /// machine may be compacted, so recovery can always replay from the
    /// applied index. Recounts [`GroupState::log_bytes`] from the entries
    /// that remain (reading only those, checked against their CRC32s).
    pub fn compact_log(&self, group: GroupId, through: Index) -> Result<()> {
        let _writer = self.log_write_lock();
        let mut log = self.group_log(group)?;
        if through <= log.state.truncated_index {
            return Ok(());
        }
        let applied = self.applied(group)?.index;
        if through > applied || through > log.last_index {
            return Err(EngineError::Invalid(format!(
                "group {group}: cannot compact through {through}: applied {applied}, last index {}",
                log.last_index
            )));
        }
        let term = self.term(group, through).map_err(storage_to_engine)?;
        let mut remaining_bytes = 0u64;
        let mut expected = through + 1;
        self.backend().scan(
            Cf::RaftLog,
            &log_key(group, through + 1),
            &log_key(group, log.last_index + 1),
            &mut |k, v| {
                let index = crate::keys::parse_log_key(k)?.1;
                if index != expected {
                    return Err(EngineError::Corrupt(format!(
                        "group {group}: log has a hole at index {expected}"
                    )));
                }
                remaining_bytes += stored_entry_size(group, k, v, index)?;
                expected += 1;
                Ok(true)
            },
        )?;
        if expected != log.last_index + 1 {
            return Err(EngineError::Corrupt(format!(
                "group {group}: entry {expected} missing from the log"
            )));
        }
        let mut set = WriteSet::new();
        set.delete_range(
            Cf::RaftLog,
            log_key(group, 0).to_vec(),
            log_key(group, through + 1).to_vec(),
        );
        log.state.truncated_index = through;
        log.state.truncated_term = term;
        log.state.log_bytes = remaining_bytes;
        set.put(
            Cf::RaftState,
            group_key(group).to_vec(),
            encode_record(&group_key(group), &log.state),
        );
        // Not synced: losing a compaction only brings back valid entries.
        self.backend().write(set, false)?;
        self.cache_group(log);
        Ok(())
    }

    /// Records the snapshot this group will send to followers that are
    /// behind its compacted prefix.
    pub fn set_snapshot(&self, group: GroupId, snapshot: Snapshot) -> Result<()> {
        let _writer = self.log_write_lock();
        let mut log = self.group_log(group)?;
        log.state.snapshot = Some(snapshot);
        let mut set = WriteSet::new();
        set.put(
            Cf::RaftState,
            group_key(group).to_vec(),
            encode_record(&group_key(group), &log.state),
        );
        self.backend().write(set, true)?;
        self.cache_group(log);
        Ok(())
    }

    /// Running size of `group`'s log ([`GroupState::log_bytes`]), from the
    /// cached state: no log read (one state read the first time a group is
    /// used after opening).
    pub fn log_bytes(&self, group: GroupId) -> Result<u64> {
        Ok(self.group_log(group)?.state.log_bytes)
    }

    /// The persisted group state (hard state, membership, compaction point).
    pub fn group_state(&self, group: GroupId) -> Result<GroupState> {
        Ok(self.group_log(group)?.state)
    }

    /// Entries of `group` in `[low, high)`, at most `max_bytes` of them but
    /// at least one. Each is checked against its CRC32.
    pub fn entries(
        &self,
        group: GroupId,
        low: Index,
        high: Index,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds = self.log_bounds(group)?;
        if low <= bounds.truncated_index {
            return Err(StorageError::Compacted);
        }
        if high > bounds.last_index + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut expected = low;
        let mut failure = None;
        self.backend().scan(
            Cf::RaftLog,
            &log_key(group, low),
            &log_key(group, high),
            &mut |k, v| {
                if crate::keys::parse_log_key(k)?.1 != expected {
                    failure = Some(EngineError::Corrupt(format!(
                        "group {group}: log has a hole at index {expected}"
                    )));
                    return Ok(false);
                }
                let entry = match decode_entry(group, k, v, expected) {
                    Ok(e) => e,
                    Err(e) => {
                        failure = Some(e);
                        return Ok(false);
                    }
                };
                bytes += entry.size_bytes();
                if !out.is_empty() && bytes > max_bytes {
                    return Ok(false);
                }
                out.push(entry);
                expected += 1;
                Ok(true)
            },
        )?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        if out.is_empty() && low < high {
            return Err(StorageError::Corrupt(format!(
                "group {group}: entry {low} missing from the log"
            )));
        }
        Ok(out)
    }

    /// Term of entry `index` of `group`.
    pub fn term(&self, group: GroupId, index: Index) -> Result<Term, StorageError> {
        let bounds = self.log_bounds(group)?;
        if index == bounds.truncated_index {
            return Ok(bounds.truncated_term);
        }
        if index < bounds.truncated_index {
            return Err(StorageError::Compacted);
        }
        if index > bounds.last_index {
            return Err(StorageError::Unavailable);
        }
        let key = log_key(group, index);
        match self.backend().get(Cf::RaftLog, &key)? {
            Some(v) => Ok(decode_entry(group, &key, &v, index)?.term),
            None => Err(StorageError::Corrupt(format!(
                "group {group}: entry {index} missing from the log"
            ))),
        }
    }

    /// First index still in `group`'s log.
    pub fn first_index(&self, group: GroupId) -> Result<Index> {
        Ok(self.log_bounds(group)?.truncated_index + 1)
    }

    /// Last index in `group`'s log (the compaction point if it is empty).
    pub fn last_index(&self, group: GroupId) -> Result<Index> {
        Ok(self.log_bounds(group)?.last_index)
    }

    /// A handle implementing the consensus core's read-side [`Storage`] for
    /// one group.
    pub fn group_storage(&self, group: GroupId) -> GroupStorage<B> {
        GroupStorage {
            engine: self.clone(),
            group,
        }
    }
}

fn storage_to_engine(e: StorageError) -> EngineError {
    match e {
        StorageError::Corrupt(m) => EngineError::Corrupt(m),
        other => EngineError::Invalid(other.to_string()),
    }
}

pub(crate) fn stage_group_write(
    set: &mut WriteSet,
    log: &mut GroupLog,
    write: GroupWrite,
) -> Result<()> {
    let group = write.group;
    let mut state_changed = false;
    if let Some(snapshot) = write.snapshot {
        let meta = &snapshot.meta;
        set.delete_range(
            Cf::RaftLog,
            log_key(group, 0).to_vec(),
            log_key(group, u64::MAX).to_vec(),
        );
        log.state.truncated_index = meta.index;
        log.state.truncated_term = meta.term;
        log.state.conf_state = meta.conf_state.clone();
        log.state.hard_state.commit = log.state.hard_state.commit.max(meta.index);
        log.last_index = meta.index;
        log.state.snapshot = Some(snapshot);
        log.state.log_bytes = 0;
        state_changed = true;
    }
    if let Some(first) = write.entries.first() {
        let first_index = first.index;
        for (offset, entry) in write.entries.iter().enumerate() {
            if entry.index != first_index + offset as u64 {
                return Err(EngineError::Invalid(format!(
                    "group {group}: entries not contiguous at index {}",
                    entry.index
                )));
            }
        }
        if first_index <= log.state.truncated_index || first_index > log.last_index + 1 {
            return Err(EngineError::Invalid(format!(
                "group {group}: append at {first_index} but the log holds ({}, {}]",
                log.state.truncated_index, log.last_index
            )));
        }
        if first_index <= log.last_index {
            // Replace the conflicting suffix.
            set.delete_range(
                Cf::RaftLog,
                log_key(group, first_index).to_vec(),
                log_key(group, log.last_index + 1).to_vec(),
            );
        }
        for entry in &write.entries {
            let key = log_key(group, entry.index);
            set.put(Cf::RaftLog, key.to_vec(), encode_entry(&key, entry));
            log.last_index = entry.index;
            log.state.log_bytes += entry.size_bytes();
        }
        // The running size changed: the state record goes in the same
        // write, so it always matches the entries on disk.
        state_changed = true;
    }
    if let Some(hs) = write.hard_state {
        log.state.hard_state = hs;
        state_changed = true;
    }
    if let Some(cs) = write.conf_state {
        log.state.conf_state = cs;
        state_changed = true;
    }
    if state_changed {
        set.put(
            Cf::RaftState,
            group_key(group).to_vec(),
            encode_record(&group_key(group), &log.state),
        );
    }
    Ok(())
}

/// One group's log seen through the consensus core's [`Storage`] trait.
#[derive(Debug, Clone)]
pub struct GroupStorage<B: Backend> {
    engine: Engine<B>,
    group: GroupId,
}

impl<B: Backend> Storage for GroupStorage<B> {
    fn initial_state(&self) -> Result<RaftState, StorageError> {
        let state = self.engine.group_state(self.group)?;
        Ok(RaftState {
            hard_state: state.hard_state,
            conf_state: self.engine.conf_state(self.group)?,
        })
    }
    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.engine.entries(self.group, low, high, max_bytes)
    }
    fn term(&self, index: Index) -> Result<Term, StorageError> {
        self.engine.term(self.group, index)
    }
    fn first_index(&self) -> Result<Index, StorageError> {
        Ok(self.engine.first_index(self.group)?)
    }
    fn last_index(&self) -> Result<Index, StorageError> {
        Ok(self.engine.last_index(self.group)?)
    }
    fn snapshot(&self, request_index: Index) -> Result<Snapshot, StorageError> {
        match self.engine.group_state(self.group)?.snapshot {
            Some(s) if s.meta.index >= request_index => Ok(s),
            _ => Err(StorageError::SnapshotTemporarilyUnavailable),
        }
    }
}
