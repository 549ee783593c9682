//! [`MemStorage`]: an in-memory [`Storage`] for tests, the simulator and
//! the shard layer's simulations (like etcd's `MemoryStorage`).

use bytes::Bytes;

use crate::raw_node::Ready;
use crate::storage::{Storage, StorageError};
use crate::types::{ConfState, Entry, HardState, Index, RaftState, Snapshot, SnapshotMeta, Term};

/// An in-memory Raft log. Everything written to it counts as persisted.
///
/// Invariant: `entries[0]` is a placeholder holding the snapshot's index
/// and term (index 0, term 0 for a fresh log), so `term(first_index - 1)`
/// always answers.
#[derive(Clone, Debug)]
pub struct MemStorage {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl Default for MemStorage {
    fn default() -> Self {
        MemStorage::new()
    }
}

impl MemStorage {
    /// An empty log.
    pub fn new() -> MemStorage {
        MemStorage {
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: Snapshot::default(),
            entries: vec![Entry::default()],
        }
    }

    /// An empty log whose membership is `voters`.
    pub fn with_voters(voters: Vec<u64>) -> MemStorage {
        let mut s = MemStorage::new();
        s.conf_state = ConfState {
            voters,
            learners: Vec::new(),
        };
        s
    }

    fn offset(&self) -> Index {
        self.entries[0].index
    }

    /// Persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Persists the hard state.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// Persists the membership.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    /// Appends entries, replacing the stored suffix from the first one's
    /// index on. Entries at or below the snapshot index are skipped.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let offset = self.offset();
        let last = self.last_index()?;
        if first.index > last + 1 {
            return Err(StorageError::Corrupt(format!(
                "append at {} leaves a gap after last index {}",
                first.index, last
            )));
        }
        let skip = (offset + 1).saturating_sub(first.index) as usize;
        if skip >= entries.len() {
            return Ok(());
        }
        let entries = &entries[skip..];
        let keep = (entries[0].index - offset) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Replaces the whole log with `snapshot` (from a leader), raising the
    /// persisted commit index to the snapshot's. A snapshot not newer than
    /// the current one is refused with `Compacted`.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        if snapshot.meta.index <= self.snapshot.meta.index {
            return Err(StorageError::Compacted);
        }
        self.entries = vec![Entry {
            term: snapshot.meta.term,
            index: snapshot.meta.index,
            ..Entry::default()
        }];
        self.hard_state.commit = self.hard_state.commit.max(snapshot.meta.index);
        self.conf_state = snapshot.meta.conf_state.clone();
        self.snapshot = snapshot;
        Ok(())
    }

    /// Records a snapshot of the caller's state machine at `index` (which
    /// must be applied, hence committed and stored) and returns it. Does not
    /// compact; call [`compact`](Self::compact) for that. `conf_state` is the
    /// membership as of `index` (e.g. [`crate::RawNode::conf_state`]); it is
    /// also persisted as the current membership.
    pub fn create_snapshot(
        &mut self,
        index: Index,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<Snapshot, StorageError> {
        if index <= self.snapshot.meta.index {
            return Err(StorageError::Compacted);
        }
        if index > self.last_index()? {
            return Err(StorageError::Unavailable);
        }
        let term = self.term(index)?;
        self.conf_state = conf_state.clone();
        self.snapshot = Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                conf_state,
            },
            data,
        };
        Ok(self.snapshot.clone())
    }

    /// Drops the entries up to and including `index` (which must be covered
    /// by the current snapshot, or the log could not be rebuilt).
    pub fn compact(&mut self, index: Index) -> Result<(), StorageError> {
        let offset = self.offset();
        if index <= offset {
            return Ok(());
        }
        if index > self.snapshot.meta.index {
            return Err(StorageError::Unavailable);
        }
        let pos = (index - offset) as usize;
        let term = self.entries[pos].term;
        self.entries.drain(..pos);
        self.entries[0] = Entry {
            term,
            index,
            ..Entry::default()
        };
        Ok(())
    }

    /// Persists what a [`Ready`] asks for, in the documented order:
    /// snapshot, entries, hard state.
    pub fn persist_ready(&mut self, ready: &Ready) -> Result<(), StorageError> {
        if let Some(s) = &ready.snapshot {
            self.apply_snapshot(s.clone())?;
        }
        self.append(&ready.entries)?;
        if let Some(hs) = ready.hard_state {
            self.hard_state = hs;
        }
        Ok(())
    }

    /// Bytes the persisted Raft state takes: hard state plus stored entries
    /// (the lab's `RaftStateSize`; the snapshot is counted separately).
    pub fn raft_state_size_bytes(&self) -> u64 {
        24 + self.entries[1..].iter().map(Entry::size_bytes).sum::<u64>()
    }

    /// The current snapshot (empty if none).
    pub fn current_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> Result<RaftState, StorageError> {
        Ok(RaftState {
            hard_state: self.hard_state,
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(&self, low: Index, high: Index, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        let offset = self.offset();
        if low <= offset {
            return Err(StorageError::Compacted);
        }
        if high > self.last_index()? + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut size = 0;
        for e in &self.entries[(low - offset) as usize..(high - offset) as usize] {
            let s = e.size_bytes();
            if !out.is_empty() && size + s > max_bytes {
                break;
            }
            size += s;
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, index: Index) -> Result<Term, StorageError> {
        let offset = self.offset();
        if index < offset {
            return Err(StorageError::Compacted);
        }
        self.entries
            .get((index - offset) as usize)
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable)
    }

    fn first_index(&self) -> Result<Index, StorageError> {
        Ok(self.offset() + 1)
    }

    fn last_index(&self) -> Result<Index, StorageError> {
        Ok(self.offset() + self.entries.len() as u64 - 1)
    }

    fn snapshot(&self, request_index: Index) -> Result<Snapshot, StorageError> {
        if self.snapshot.meta.index < request_index {
            return Err(StorageError::SnapshotTemporarilyUnavailable);
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ENTRY_OVERHEAD_BYTES;

    fn e(index: Index, term: Term) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    #[test]
    fn append_replaces_conflicting_suffix_and_refuses_gaps() {
        let mut s = MemStorage::new();
        s.append(&[e(1, 1), e(2, 1), e(3, 1)]).unwrap();
        s.append(&[e(2, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert!(matches!(
            s.append(&[e(5, 2)]),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn compact_keeps_boundary_term_and_reports_compacted() {
        let mut s = MemStorage::new();
        s.append(&[e(1, 1), e(2, 1), e(3, 2), e(4, 2)]).unwrap();
        s.create_snapshot(
            3,
            ConfState {
                voters: vec![1],
                learners: vec![],
            },
            Bytes::from_static(b"sm"),
        )
        .unwrap();
        s.compact(3).unwrap();
        assert_eq!(s.first_index().unwrap(), 4);
        assert_eq!(
            s.term(3).unwrap(),
            2,
            "term of the last compacted entry stays readable"
        );
        assert_eq!(s.term(2), Err(StorageError::Compacted));
        assert_eq!(s.entries(3, 5, u64::MAX), Err(StorageError::Compacted));
        assert_eq!(s.entries(4, 6, u64::MAX), Err(StorageError::Unavailable));
        assert_eq!(s.entries(4, 5, u64::MAX).unwrap(), vec![e(4, 2)]);
        assert_eq!(s.snapshot(0).unwrap().meta.index, 3);
    }

    #[test]
    fn entries_respect_byte_limit_but_return_at_least_one() {
        let mut s = MemStorage::new();
        s.append(&[e(1, 1), e(2, 1), e(3, 1)]).unwrap();
        assert_eq!(s.entries(1, 4, 0).unwrap().len(), 1);
        assert_eq!(s.entries(1, 4, 2 * ENTRY_OVERHEAD_BYTES).unwrap().len(), 2);
    }

    #[test]
    fn apply_snapshot_replaces_log_and_raises_commit() {
        let mut s = MemStorage::new();
        s.append(&[e(1, 1)]).unwrap();
        let snap = Snapshot {
            meta: SnapshotMeta {
                index: 10,
                term: 3,
                conf_state: ConfState {
                    voters: vec![1, 2, 3],
                    learners: vec![],
                },
            },
            data: Bytes::new(),
        };
        s.apply_snapshot(snap.clone()).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (11, 10)
        );
        assert_eq!(s.hard_state().commit, 10);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.apply_snapshot(snap), Err(StorageError::Compacted));
    }
}
