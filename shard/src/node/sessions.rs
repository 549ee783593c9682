//! Which client sessions a leader may expire, decided by this node's own
//! monotonic clock.
//!
//! # Why not the log's times
//! Sessions used to expire by times the leader stamped into the log from
//! its wall clock. A leader whose clock ran ahead (started before NTP
//! synced) then expired sessions another leader had stamped minutes ago,
//! and a client's in-flight retry of an applied write ran a second time.
//!
//! Now every node watches the sessions itself: each time it applies a
//! write of a session (or loads one at start or from a snapshot) it notes
//! the session's sequence number and *its own* monotonic time. A leader
//! proposes `ExpireSessions` naming only (client, seq) pairs it has itself
//! seen unchanged for the whole idle period, and the entry removes a
//! session only if its sequence number is still the named one. So no
//! session is ever expired before some node watched it idle for the full
//! period on a clock that never jumps, whatever the wall clocks say, and a
//! session used after the decision survives it. Apply uses no time at all.
//!
//! What remains assumed: a client's request is proposed within the session
//! idle time of being sent (a copy held up in a queue longer than that, and
//! proposed after its session expired, would run again). Clients keep their
//! operation deadline at most half the idle time (one hour by default), and
//! every queue on the way is bounded, so nothing waits nearly that long.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use shoal_engine::kv::EXPIRE_SESSIONS_PER_ENTRY_MAX;
use shoal_engine::{ClientId, ShardId};
use tokio::time::Instant;

/// The sessions of the shards one node holds, with when it last saw each
/// change.
#[derive(Debug, Default)]
pub struct SessionTracker {
    /// (shard, client) → (last sequence number, when this node saw it).
    seen: HashMap<(ShardId, ClientId), (u64, Instant)>,
}

impl SessionTracker {
    /// Notes that `client`'s session in `shard` is at `seq` as of `now`.
    /// Only a change of sequence number restarts its idle time (a retry of
    /// the same request does too, as it proves the client alive).
    pub fn observe(&mut self, shard: ShardId, client: ClientId, seq: u64, now: Instant) {
        if client == 0 {
            return;
        }
        self.seen.insert((shard, client), (seq, now));
    }

    /// Forgets a session an applied `ExpireSessions` removed (only if it is
    /// still at `seq`: otherwise it was used since and was kept).
    pub fn expired(&mut self, shard: ShardId, client: ClientId, seq: u64) {
        if self
            .seen
            .get(&(shard, client))
            .is_some_and(|(s, _)| *s == seq)
        {
            self.seen.remove(&(shard, client));
        }
    }

    /// Replaces what is known of `shard` by `sessions` (client, seq), all
    /// seen `now`: after a start or a snapshot install, nothing is known of
    /// how long they have been idle, so their idle time starts over.
    pub fn reload(&mut self, shard: ShardId, sessions: Vec<(ClientId, u64)>, now: Instant) {
        self.seen.retain(|(s, _), _| *s != shard);
        for (client, seq) in sessions {
            self.observe(shard, client, seq, now);
        }
    }

    /// Sessions of `shard` this node has seen unchanged for at least `idle`
    /// as of `now`, as (client, seq), at most
    /// [`EXPIRE_SESSIONS_PER_ENTRY_MAX`] (the rest wait for the next
    /// expiry round), in client order so every run picks the same ones.
    pub fn idle(&self, shard: ShardId, idle: Duration, now: Instant) -> Vec<(ClientId, u64)> {
        let idle: BTreeMap<ClientId, u64> = self
            .seen
            .iter()
            .filter(|((s, _), (_, at))| *s == shard && now.saturating_duration_since(*at) >= idle)
            .map(|((_, client), (seq, _))| (*client, *seq))
            .collect();
        idle.into_iter()
            .take(EXPIRE_SESSIONS_PER_ENTRY_MAX)
            .collect()
    }

    /// Sessions tracked in all shards.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no session is tracked.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    // Goal: a session is idle only once this node saw it unchanged for the
    // whole period; use restarts the period; other shards are separate.
    #[test]
    fn idle_needs_the_full_period_on_this_clock() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::default();
        tracker.observe(0, 7, 1, t0);
        tracker.observe(0, 8, 4, t0);
        tracker.observe(1, 7, 2, t0);
        assert!(tracker.idle(0, IDLE, t0 + IDLE / 2).is_empty());
        tracker.observe(0, 8, 5, t0 + IDLE / 2);
        assert_eq!(tracker.idle(0, IDLE, t0 + IDLE), vec![(7, 1)]);
        assert_eq!(tracker.idle(0, IDLE, t0 + IDLE * 2), vec![(7, 1), (8, 5)]);
        assert_eq!(tracker.idle(1, IDLE, t0 + IDLE), vec![(7, 2)]);
        // Client 0 has no session.
        tracker.observe(0, 0, 1, t0);
        assert_eq!(tracker.len(), 3);
    }

    // Goal: an expiry only forgets a session still at the expired seq.
    #[test]
    fn expired_keeps_a_session_used_since() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::default();
        tracker.observe(0, 7, 1, t0);
        tracker.observe(0, 7, 2, t0 + IDLE);
        tracker.expired(0, 7, 1);
        assert_eq!(tracker.idle(0, IDLE, t0 + IDLE * 2), vec![(7, 2)]);
        tracker.expired(0, 7, 2);
        assert!(tracker.is_empty());
    }

    // Goal: after a reload (start, snapshot install) nothing is idle until a
    // full period has passed on this node, however old the sessions are.
    #[test]
    fn reload_restarts_every_idle_time() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::default();
        tracker.observe(0, 7, 1, t0);
        tracker.observe(1, 9, 1, t0);
        let later = t0 + IDLE * 10;
        tracker.reload(0, vec![(7, 1), (8, 3)], later);
        assert!(tracker.idle(0, IDLE, later + IDLE / 2).is_empty());
        assert_eq!(tracker.idle(0, IDLE, later + IDLE), vec![(7, 1), (8, 3)]);
        assert_eq!(tracker.idle(1, IDLE, later), vec![(9, 1)]);
    }

    // Goal: one expiry entry names a bounded number of sessions.
    #[test]
    fn idle_is_bounded_per_entry() {
        let t0 = Instant::now();
        let mut tracker = SessionTracker::default();
        for client in 1..=(EXPIRE_SESSIONS_PER_ENTRY_MAX as u64 + 10) {
            tracker.observe(0, client, 1, t0);
        }
        let idle = tracker.idle(0, IDLE, t0 + IDLE);
        assert_eq!(idle.len(), EXPIRE_SESSIONS_PER_ENTRY_MAX);
        assert_eq!(idle[0], (1, 1));
    }
}
