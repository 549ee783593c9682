//! Persistence and batching decisions, as pure functions: what a round's
//! log write holds, whether it must be synced, how an oversized one is
//! split, and how queued requests are cut into log entries. The event loop
//! (`super`) only carries them out.

use std::collections::BTreeMap;

use shoal_consensus::{Entry, HardState, NodeId, Term};
use shoal_engine::{BatchWrite, Command, GroupId, GroupWrite, LogBatch, Request};

/// Most requests proposed as one log entry.
pub const ENTRY_REQUESTS_MAX: usize = 256;
/// Payload bytes above which no further request joins a log entry (a
/// single larger request still gets an entry of its own).
pub const ENTRY_BYTES_MAX: u64 = 1 << 20;

/// Per-request bytes counted on top of keys and values when sizing an
/// entry (session ids, enum tags, lengths).
const REQUEST_OVERHEAD_BYTES: u64 = 48;

/// Whether a round's log write must be synced before anyone hears of it.
///
/// Entries, snapshots, terms and votes must be durable before they are
/// acknowledged or acted on. A hard state that only moves the commit index
/// need not be: Raft may forget a commit index, and every later write
/// (applies included) is lost with it if at all — the write-ahead log is one
/// ordered log — so the applied index never passes the stored commit index.
/// Skipping that sync saves an fsync per round on every node once entries
/// commit. `durable_term_vote` gives each group's term and vote as last
/// synced (a group missing from it is treated as changed).
pub fn must_sync(batch: &LogBatch, durable_term_vote: &BTreeMap<GroupId, (Term, NodeId)>) -> bool {
    batch.groups.iter().any(|g| {
        g.snapshot.is_some()
            || !g.entries.is_empty()
            || g.conf_state.is_some()
            || g.hard_state.is_some_and(|hs: HardState| {
                durable_term_vote.get(&g.group) != Some(&(hs.term, hs.vote))
            })
    })
}

/// How a round's log write reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Synced before anyone hears of it.
    Now,
    /// Written unsynced; synced within the node's sync window
    /// (`NodeConfig::log_sync_window_ms`).
    Deferred,
    /// Written unsynced and never needs a sync of its own (only a commit
    /// index moved; see [`must_sync`]).
    NotNeeded,
}

/// How to write `batch`: [`must_sync`] decides whether it needs a sync;
/// with a sync window (`window`), one that only adds entries (and moves
/// the commit index) defers it. Terms, votes, snapshots and membership are
/// synced at once whatever the window, so an election never rests on an
/// unsynced vote.
pub fn sync_mode(
    batch: &LogBatch,
    durable_term_vote: &BTreeMap<GroupId, (Term, NodeId)>,
    window: bool,
) -> SyncMode {
    if !must_sync(batch, durable_term_vote) {
        return SyncMode::NotNeeded;
    }
    let entries_only = batch.groups.iter().all(|g| {
        g.snapshot.is_none()
            && g.conf_state.is_none()
            && g.hard_state.is_none_or(|hs: HardState| {
                durable_term_vote.get(&g.group) == Some(&(hs.term, hs.vote))
            })
    });
    if window && entries_only {
        SyncMode::Deferred
    } else {
        SyncMode::Now
    }
}

/// Whether deferred writes made at `unsynced_since` must be synced now,
/// at `now`, with a sync window of `window`.
pub fn sync_due(
    unsynced_since: Option<std::time::Instant>,
    now: std::time::Instant,
    window: std::time::Duration,
) -> bool {
    unsynced_since.is_some_and(|since| now.saturating_duration_since(since) >= window)
}

/// Splits a round's log write that exceeds the engine's batch limit into
/// several synced writes, in order: a group's snapshot goes with its first
/// piece, its hard state and membership with its last, so no prefix of the
/// writes records a commit index beyond the entries stored. Group commit is
/// given up only for such oversized rounds.
pub fn split_batch(batch: LogBatch, limit_bytes: u64) -> Vec<LogBatch> {
    if batch.size_bytes() <= limit_bytes {
        return vec![batch];
    }
    let mut out = Vec::new();
    for write in batch.groups {
        let GroupWrite {
            group,
            snapshot,
            entries,
            hard_state,
            conf_state,
        } = write;
        let mut pieces: Vec<Vec<Entry>> = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for entry in entries {
            if !current.is_empty() && bytes + entry.size_bytes() > limit_bytes {
                pieces.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += entry.size_bytes();
            current.push(entry);
        }
        pieces.push(current);
        let last = pieces.len() - 1;
        let mut snapshot = snapshot;
        for (i, entries) in pieces.into_iter().enumerate() {
            let write = GroupWrite {
                group,
                snapshot: snapshot.take(),
                entries,
                hard_state: if i == last { hard_state } else { None },
                conf_state: if i == last { conf_state.clone() } else { None },
            };
            out.push(LogBatch {
                groups: vec![write],
            });
        }
    }
    out
}

/// Estimated encoded size of a request, for sizing entries.
pub fn request_bytes(request: &Request) -> u64 {
    let payload = match &request.command {
        Command::Put { key, value }
        | Command::PutIfVersion { key, value, .. }
        | Command::Append { key, value, .. } => key.len() + value.len(),
        Command::Get { key } | Command::Delete { key } => key.len(),
        Command::Scan { start, end, .. } => start.len() + end.len(),
        Command::ExpireSessions { sessions } => sessions.len() * 16,
        Command::Batch { conditions, writes } => {
            conditions.iter().map(|c| c.key.len() + 8).sum::<usize>()
                + writes
                    .iter()
                    .map(|w| match w {
                        BatchWrite::Put { key, value } => key.len() + value.len() + 2,
                        BatchWrite::Delete { key } => key.len() + 2,
                    })
                    .sum::<usize>()
        }
    };
    payload as u64 + REQUEST_OVERHEAD_BYTES
}

/// How many of `sizes` (the queued requests' [`request_bytes`], in order)
/// go into each log entry: at most [`ENTRY_REQUESTS_MAX`] requests and
/// [`ENTRY_BYTES_MAX`] bytes per entry, except that a single larger request
/// gets an entry of its own. The counts add up to `sizes.len()`.
pub fn entry_chunks(sizes: &[u64]) -> Vec<usize> {
    let mut chunks = Vec::new();
    let (mut count, mut bytes) = (0usize, 0u64);
    for &size in sizes {
        if count > 0 && (count >= ENTRY_REQUESTS_MAX || bytes + size > ENTRY_BYTES_MAX) {
            chunks.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += size;
    }
    if count > 0 {
        chunks.push(count);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit }
    }

    /// A round's write of group 1.
    fn write(hard_state: Option<HardState>, entries: Vec<Entry>) -> LogBatch {
        LogBatch {
            groups: vec![GroupWrite {
                group: 1,
                entries,
                hard_state,
                ..Default::default()
            }],
        }
    }

    fn entry(index: u64) -> Entry {
        Entry {
            term: 1,
            index,
            data: Bytes::from(vec![0u8; 100]),
            ..Default::default()
        }
    }

    // Goal: an oversized round is split so that every piece fits and the
    // hard state travels with the last piece only.
    #[test]
    fn split_batch_keeps_hard_state_last() {
        let hard_state = Some(HardState {
            term: 1,
            vote: 1,
            commit: 3,
        });
        let batch = LogBatch {
            groups: vec![GroupWrite {
                group: 1,
                entries: (1..=3).map(entry).collect(),
                hard_state,
                ..Default::default()
            }],
        };
        let pieces = split_batch(batch.clone(), 150);
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.size_bytes() <= 150));
        assert_eq!(pieces[2].groups[0].hard_state, hard_state);
        assert!(pieces[..2].iter().all(|p| p.groups[0].hard_state.is_none()));
        assert_eq!(split_batch(batch.clone(), 1 << 20), vec![batch]);
    }

    // Goal: only a commit-index move skips the sync; entries, a new term or
    // vote, a snapshot or a membership change are synced.
    #[test]
    fn must_sync_only_skips_commit_only_rounds() {
        let durable = BTreeMap::from([(1, (3, 2))]);
        assert!(!must_sync(&write(Some(hs(3, 2, 9)), vec![]), &durable));
        assert!(must_sync(&write(Some(hs(4, 2, 9)), vec![]), &durable));
        assert!(must_sync(&write(Some(hs(3, 1, 9)), vec![]), &durable));
        assert!(must_sync(&write(None, vec![entry(1)]), &durable));
        assert!(must_sync(
            &write(Some(hs(3, 2, 9)), vec![]),
            &BTreeMap::new()
        ));
        let mut conf = write(None, vec![]);
        conf.groups[0].conf_state = Some(Default::default());
        assert!(must_sync(&conf, &durable));
    }

    // Goal: a sync window defers only rounds of entries and commit moves;
    // a new term or vote, a snapshot or membership is synced at once, and
    // without a window nothing is deferred.
    #[test]
    fn sync_mode_defers_only_entries_within_a_window() {
        let durable = BTreeMap::from([(1, (3, 2))]);
        let entries = write(Some(hs(3, 2, 9)), vec![entry(10)]);
        assert_eq!(sync_mode(&entries, &durable, true), SyncMode::Deferred);
        assert_eq!(sync_mode(&entries, &durable, false), SyncMode::Now);
        let commit_only = write(Some(hs(3, 2, 10)), vec![]);
        assert_eq!(sync_mode(&commit_only, &durable, true), SyncMode::NotNeeded);
        let new_term = write(Some(hs(4, 1, 9)), vec![entry(10)]);
        assert_eq!(sync_mode(&new_term, &durable, true), SyncMode::Now);
        let mut conf = write(None, vec![entry(10)]);
        conf.groups[0].conf_state = Some(Default::default());
        assert_eq!(sync_mode(&conf, &durable, true), SyncMode::Now);

        let t0 = std::time::Instant::now();
        let window = std::time::Duration::from_millis(5);
        assert!(!sync_due(None, t0 + window, window));
        assert!(!sync_due(Some(t0), t0 + window / 2, window));
        assert!(sync_due(Some(t0), t0 + window, window));
    }

    // Goal: entries respect both caps, a lone oversized request still gets
    // an entry, and nothing is lost or reordered.
    #[test]
    fn entry_chunks_respect_both_caps() {
        assert_eq!(entry_chunks(&[]), Vec::<usize>::new());
        assert_eq!(entry_chunks(&[10; 600]), vec![256, 256, 88]);
        let big = ENTRY_BYTES_MAX;
        assert_eq!(entry_chunks(&[big * 2, 10, 10]), vec![1, 2]);
        assert_eq!(entry_chunks(&[10, big, 10]), vec![1, 1, 1]);
        let sizes = [ENTRY_BYTES_MAX / 2; 5];
        assert_eq!(entry_chunks(&sizes), vec![2, 2, 1]);
    }
}
