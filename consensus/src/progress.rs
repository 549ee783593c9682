//! The leader's view of each follower's log: match and next index, and the
//! flow control (probe / pipelined replicate / snapshot) that bounds what is
//! in flight.

use std::collections::VecDeque;

use crate::types::Index;

/// How the leader currently sends to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Position unknown: one append per heartbeat interval until one is
    /// accepted.
    Probe,
    /// Position known: appends are pipelined optimistically (next index is
    /// advanced on send), bounded by the in-flight limits.
    Replicate,
    /// A snapshot is on its way; nothing else is sent until it is acked or
    /// times out.
    Snapshot,
}

/// Append messages sent but not yet acknowledged: `(last index, bytes)`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Inflights {
    queue: VecDeque<(Index, u64)>,
    bytes: u64,
}

impl Inflights {
    pub(crate) fn add(&mut self, last: Index, bytes: u64) {
        self.queue.push_back((last, bytes));
        self.bytes += bytes;
    }
    /// Frees every message whose last index is `<= index`.
    pub(crate) fn free_le(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.queue.front() {
            if last > index {
                break;
            }
            self.queue.pop_front();
            self.bytes -= bytes;
        }
    }
    pub(crate) fn free_first(&mut self) {
        if let Some((_, bytes)) = self.queue.pop_front() {
            self.bytes -= bytes;
        }
    }
    pub(crate) fn full(&self, max_msgs: usize, max_bytes: u64) -> bool {
        self.queue.len() >= max_msgs || self.bytes >= max_bytes
    }
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The leader's record of one peer.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known replicated on the peer.
    pub match_index: Index,
    /// Next index to send.
    pub next_index: Index,
    /// Flow-control state.
    pub state: ProgressState,
    /// Probe state: an append was sent this heartbeat interval.
    pub(crate) probe_sent: bool,
    /// Snapshot state: index of the snapshot sent.
    pub(crate) pending_snapshot: Index,
    /// Ticks spent in snapshot state (resent after a timeout, see
    /// `snapshot_backoff`).
    pub(crate) snapshot_ticks: u32,
    /// Snapshot state: the peer answered since the snapshot was sent, so it
    /// is reachable and the transfer may still be running.
    pub(crate) snapshot_heard: bool,
    /// Snapshot resends that timed out while the peer kept answering. After
    /// a few, the resend timeout doubles with each, so a long out-of-band
    /// transfer is not restarted every election timeout; reset when the
    /// peer catches up. Survives state changes.
    pub(crate) snapshot_backoff: u32,
    /// Heard from the peer since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// A peer that joined with nothing ([`crate::MessageBody::SnapshotWanted`]):
    /// until it acknowledges something, it gets a snapshot at or after this
    /// index, never entries. 0: none asked for.
    pub(crate) snapshot_floor: Index,
    /// Commit index last sent.
    pub(crate) sent_commit: Index,
    /// Match index at the previous heartbeat response.
    pub(crate) heartbeat_match: Index,
    /// Heartbeat responses in a row without progress while behind.
    pub(crate) stalled_heartbeats: u32,
    pub(crate) inflights: Inflights,
}

impl Progress {
    pub(crate) fn new(next_index: Index) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            pending_snapshot: 0,
            snapshot_ticks: 0,
            snapshot_heard: false,
            snapshot_backoff: 0,
            recent_active: false,
            snapshot_floor: 0,
            sent_commit: 0,
            heartbeat_match: 0,
            stalled_heartbeats: 0,
            inflights: Inflights::default(),
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.state = state;
        self.probe_sent = false;
        self.pending_snapshot = 0;
        self.snapshot_ticks = 0;
        self.snapshot_heard = false;
        self.stalled_heartbeats = 0;
        self.inflights.clear();
    }

    pub(crate) fn become_probe(&mut self) {
        if self.state == ProgressState::Snapshot {
            let pending = self.pending_snapshot;
            self.reset_state(ProgressState::Probe);
            self.next_index = (self.match_index + 1).max(pending + 1);
        } else {
            self.reset_state(ProgressState::Probe);
            self.next_index = self.match_index + 1;
        }
    }

    pub(crate) fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.snapshot_backoff = 0;
        self.next_index = self.match_index + 1;
    }

    pub(crate) fn become_snapshot(&mut self, index: Index) {
        self.reset_state(ProgressState::Snapshot);
        self.pending_snapshot = index;
    }

    /// Records an acknowledgement up to `index`; false if stale.
    pub(crate) fn maybe_update(&mut self, index: Index) -> bool {
        let mut updated = false;
        if self.match_index < index {
            self.match_index = index;
            updated = true;
            self.probe_sent = false;
            self.snapshot_floor = 0;
        }
        self.next_index = self.next_index.max(index + 1);
        updated
    }

    /// Handles a rejection of the append at `rejected` with the follower's
    /// hint `match_hint`; false if the rejection is stale.
    pub(crate) fn maybe_decr_to(&mut self, rejected: Index, match_hint: Index) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.match_index {
                return false;
            }
            self.next_index = self.match_index + 1;
            return true;
        }
        if self.next_index == 0 || self.next_index - 1 != rejected {
            return false;
        }
        self.next_index = rejected
            .min(match_hint + 1)
            .max(self.match_index + 1)
            .max(1);
        self.probe_sent = false;
        true
    }

    /// Append messages in flight (sent, not acknowledged).
    pub fn inflight_msgs(&self) -> usize {
        self.inflights.len()
    }

    /// Bytes of entries in flight.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflights.bytes()
    }

    /// The peer joined with nothing and still waits for its first snapshot
    /// (see [`Progress::snapshot_floor`]).
    pub(crate) fn wants_snapshot(&self) -> bool {
        self.snapshot_floor > 0 && self.match_index == 0
    }

    pub(crate) fn is_paused(&self, max_msgs: usize, max_bytes: u64) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(max_msgs, max_bytes),
            ProgressState::Snapshot => true,
        }
    }
}
