//! The log as the core sees it: the persisted part (through [`Storage`])
//! followed by the not-yet-persisted part (`unstable`).

use crate::storage::{Storage, StorageError};
use crate::types::{Entry, Index, Snapshot, Term};

/// Persisted log plus the entries and snapshot not yet handed to storage.
pub(crate) struct RaftLog<S: Storage> {
    pub(crate) storage: S,
    /// Received snapshot not yet persisted; when set, storage's content is
    /// superseded up to and including its index.
    pub(crate) unstable_snapshot: Option<Snapshot>,
    /// Entries not yet persisted; `unstable[0].index == offset`.
    pub(crate) unstable: Vec<Entry>,
    /// Index of the first unstable entry.
    pub(crate) offset: Index,
    /// Highest index known committed.
    pub(crate) committed: Index,
    /// Highest index handed out as committed in a `Ready`.
    pub(crate) applying: Index,
    /// Highest index the caller confirmed applied (via `advance`).
    pub(crate) applied: Index,
    /// Node id, for panic messages.
    pub(crate) id: u64,
}

impl<S: Storage> RaftLog<S> {
    pub(crate) fn new(
        storage: S,
        id: u64,
        committed: Index,
        applied: Index,
    ) -> Result<Self, StorageError> {
        let last = storage.last_index()?;
        Ok(RaftLog {
            storage,
            unstable_snapshot: None,
            unstable: Vec::new(),
            offset: last + 1,
            committed,
            applying: applied,
            applied,
            id,
        })
    }

    pub(crate) fn first_index(&self) -> Result<Index, StorageError> {
        match &self.unstable_snapshot {
            Some(s) => Ok(s.meta.index + 1),
            None => self.storage.first_index(),
        }
    }

    pub(crate) fn last_index(&self) -> Result<Index, StorageError> {
        if let Some(e) = self.unstable.last() {
            return Ok(e.index);
        }
        match &self.unstable_snapshot {
            Some(s) => Ok(s.meta.index),
            None => self.storage.last_index(),
        }
    }

    pub(crate) fn last_term(&self) -> Result<Term, StorageError> {
        let last = self.last_index()?;
        self.term(last)
    }

    /// Term of the entry at `index`: `Compacted` below `first_index() - 1`,
    /// `Unavailable` past `last_index()`.
    pub(crate) fn term(&self, index: Index) -> Result<Term, StorageError> {
        if index >= self.offset {
            let pos = (index - self.offset) as usize;
            return match self.unstable.get(pos) {
                Some(e) => Ok(e.term),
                None => Err(StorageError::Unavailable),
            };
        }
        if let Some(s) = &self.unstable_snapshot {
            if index == s.meta.index {
                return Ok(s.meta.term);
            }
            return Err(if index < s.meta.index {
                StorageError::Compacted
            } else {
                StorageError::Unavailable
            });
        }
        if index == 0 {
            return Ok(0);
        }
        self.storage.term(index)
    }

    /// Whether the entry at `index` has term `term`; `Ok(false)` when the
    /// index is compacted or missing.
    pub(crate) fn match_term(&self, index: Index, term: Term) -> Result<bool, StorageError> {
        match self.term(index) {
            Ok(t) => Ok(t == term),
            Err(StorageError::Compacted | StorageError::Unavailable) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Raft's election restriction (§5.4.1).
    pub(crate) fn is_up_to_date(
        &self,
        last_index: Index,
        last_term: Term,
    ) -> Result<bool, StorageError> {
        let our_term = self.last_term()?;
        Ok(last_term > our_term || (last_term == our_term && last_index >= self.last_index()?))
    }

    /// Entries `[low, high)`, at most `max_bytes` (but at least one).
    pub(crate) fn entries(
        &self,
        low: Index,
        high: Index,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if low >= high {
            return Ok(Vec::new());
        }
        if low < self.first_index()? {
            return Err(StorageError::Compacted);
        }
        if high > self.last_index()? + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        if low < self.offset {
            let stored_high = high.min(self.offset);
            out = self.storage.entries(low, stored_high, max_bytes)?;
            size = out.iter().map(Entry::size_bytes).sum();
            if (out.len() as u64) < stored_high - low {
                return Ok(out);
            }
        }
        let start = low.max(self.offset);
        if start < high {
            for e in &self.unstable[(start - self.offset) as usize..(high - self.offset) as usize] {
                let s = e.size_bytes();
                if !out.is_empty() && size + s > max_bytes {
                    break;
                }
                size += s;
                out.push(e.clone());
            }
        }
        Ok(out)
    }

    /// Appends `entries` (contiguous) to the unstable part, replacing any
    /// suffix they conflict with. Panics if that would cut a committed entry.
    pub(crate) fn append(&mut self, entries: &[Entry]) -> Result<Index, StorageError> {
        let Some(first) = entries.first() else {
            return self.last_index();
        };
        let first_index = first.index;
        assert!(
            first_index > self.committed,
            "node {}: appending at index {} would overwrite committed index {}",
            self.id,
            first_index,
            self.committed
        );
        let unstable_end = self.offset + self.unstable.len() as u64;
        if first_index == unstable_end {
            self.unstable.extend_from_slice(entries);
        } else if first_index <= self.offset {
            // Replaces the whole unstable part and truncates storage from
            // here when persisted.
            self.offset = first_index;
            self.unstable = entries.to_vec();
        } else {
            self.unstable.truncate((first_index - self.offset) as usize);
            self.unstable.extend_from_slice(entries);
        }
        self.last_index()
    }

    /// Index of the first entry of `entries` that is missing or conflicts
    /// with the log, or 0 if all match.
    fn find_conflict(&self, entries: &[Entry]) -> Result<Index, StorageError> {
        for e in entries {
            if !self.match_term(e.index, e.term)? {
                return Ok(e.index);
            }
        }
        Ok(0)
    }

    /// Largest index `<= index` whose term is `<= term` (fast
    /// back-tracking); term 0 when it falls in the compacted prefix.
    pub(crate) fn find_conflict_by_term(
        &self,
        mut index: Index,
        term: Term,
    ) -> Result<(Index, Term), StorageError> {
        loop {
            match self.term(index) {
                Ok(t) if t <= term => return Ok((index, t)),
                Ok(_) => {
                    if index == 0 {
                        return Ok((0, 0));
                    }
                    index -= 1;
                }
                Err(StorageError::Compacted | StorageError::Unavailable) => return Ok((index, 0)),
                Err(e) => return Err(e),
            }
        }
    }

    /// The follower's append rule (Figure 2, AppendEntries 2–5). Returns
    /// the index of the last new entry and the index from which the log was
    /// replaced by `entries` (0 if it already held them all), or `None`
    /// when the log does not contain `prev_index` at `prev_term`.
    pub(crate) fn maybe_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        entries: &[Entry],
    ) -> Result<Option<(Index, Index)>, StorageError> {
        if !self.match_term(prev_index, prev_term)? {
            return Ok(None);
        }
        let last_new = prev_index + entries.len() as u64;
        let conflict = self.find_conflict(entries)?;
        if conflict != 0 {
            assert!(
                conflict > self.committed,
                "node {}: entry {} conflicts with committed prefix (commit {})",
                self.id,
                conflict,
                self.committed
            );
            let start = (conflict - prev_index - 1) as usize;
            self.append(&entries[start..])?;
        }
        self.commit_to(commit.min(last_new));
        Ok(Some((last_new, conflict)))
    }

    pub(crate) fn commit_to(&mut self, commit: Index) {
        if commit > self.committed {
            let last = self.last_index().unwrap_or(0);
            assert!(
                commit <= last,
                "node {}: commit {} is past the last index {}",
                self.id,
                commit,
                last
            );
            self.committed = commit;
        }
    }

    /// Commits `index` if it is newer and of `term` (Figure 8 rule).
    pub(crate) fn maybe_commit(&mut self, index: Index, term: Term) -> Result<bool, StorageError> {
        if index > self.committed && self.match_term(index, term)? {
            self.commit_to(index);
            return Ok(true);
        }
        Ok(false)
    }

    /// Replaces the log with `snapshot` (not yet persisted).
    pub(crate) fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        assert!(
            index > self.committed,
            "node {}: restoring snapshot {} at or below commit {}",
            self.id,
            index,
            self.committed
        );
        self.committed = index;
        self.applying = index;
        self.unstable.clear();
        self.offset = index + 1;
        self.unstable_snapshot = Some(snapshot);
    }

    /// Entries `[offset, index]` are persisted, if the entry at `index`
    /// still has `term` (it may have been replaced meanwhile).
    pub(crate) fn stable_to(&mut self, index: Index, term: Term) {
        if index < self.offset || self.unstable_snapshot.is_some() {
            return;
        }
        let pos = (index - self.offset) as usize;
        if self.unstable.get(pos).map(|e| e.term) == Some(term) {
            self.unstable.drain(..=pos);
            self.offset = index + 1;
        }
    }

    pub(crate) fn stable_snapshot_to(&mut self, index: Index) {
        if self.unstable_snapshot.as_ref().map(|s| s.meta.index) == Some(index) {
            self.unstable_snapshot = None;
        }
    }

    /// Last persisted index (the leader counts itself only up to here).
    pub(crate) fn persisted_index(&self) -> Index {
        self.offset - 1
    }

    pub(crate) fn has_next_committed(&self) -> bool {
        self.committed > self.applying
    }

    /// Committed entries not yet handed out, at most `max_bytes`.
    pub(crate) fn next_committed(&self, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if !self.has_next_committed() {
            return Ok(Vec::new());
        }
        self.entries(self.applying + 1, self.committed + 1, max_bytes)
    }
}
