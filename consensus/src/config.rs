//! Configuration of one Raft node, and its validation.
//!
//! # Tick length
//!
//! The core has no clock: the caller calls [`crate::RawNode::tick`] at a
//! fixed interval, the *tick length*. Every timeout here is a number of
//! ticks. The defaults assume [`DEFAULT_TICK_MS`] = 50 ms per tick:
//! a heartbeat every [`DEFAULT_HEARTBEAT_TICK`] = 2 ticks (100 ms, so at most
//! 10 heartbeats per second per follower, the lab's limit) and an election
//! timeout drawn uniformly from `[election_tick, 2 * election_tick)` =
//! 10..20 ticks (0.5–1 s), which elects a new leader well within the lab's
//! 5 seconds.

use crate::types::{NodeId, ENTRY_OVERHEAD_BYTES, NO_NODE};

/// Tick length the defaults are tuned for, in milliseconds.
pub const DEFAULT_TICK_MS: u64 = 50;
/// Default ticks between heartbeats (100 ms at the default tick length).
pub const DEFAULT_HEARTBEAT_TICK: u32 = 2;
/// Default minimum election timeout in ticks (500 ms at the default tick).
pub const DEFAULT_ELECTION_TICK: u32 = 10;
/// Upper bound accepted for `election_tick`: beyond this a typo is likelier
/// than intent.
pub const ELECTION_TICK_MAX: u32 = 100_000;
/// Upper bound accepted for `max_inflight_msgs`.
pub const INFLIGHT_MSGS_MAX: usize = 65_536;
/// Upper bound accepted for `max_size_per_msg_bytes` (64 MiB).
pub const SIZE_PER_MSG_BYTES_MAX: u64 = 64 << 20;
/// Upper bound accepted for the number of voters, and of members (voters
/// and learners) after a membership change.
pub const VOTERS_MAX: usize = 64;
/// A learner is promoted only when its log is at most this many entries
/// behind the leader's commit index, so a new voter does not stall commits
/// while it catches up.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 1_000;

/// Configuration of one node. Build with [`Config::new`] and adjust fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's id; must not be [`NO_NODE`].
    pub id: NodeId,
    /// Voters of a brand-new group. Ignored when storage already holds a
    /// membership ([`crate::RaftState::conf_state`] with voters).
    pub voters: Vec<NodeId>,
    /// The node joins an existing group: it may start with no membership
    /// at all (empty `voters` and storage), and learns it from the log or a
    /// snapshot once the group's leader replicates to it (after the group
    /// added it as a learner). Until then it never campaigns.
    pub join: bool,
    /// Minimum election timeout in ticks; the actual timeout is drawn from
    /// `[election_tick, 2 * election_tick)` after every reset. Also the
    /// check-quorum period and the leadership-transfer timeout.
    pub election_tick: u32,
    /// Ticks between heartbeats sent by a leader.
    pub heartbeat_tick: u32,
    /// Run a pre-vote round (no term change) before a real election, so a
    /// partitioned node cannot disrupt the group when it rejoins.
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a majority within an
    /// election timeout; followers then ignore votes while their leader's
    /// lease holds.
    pub check_quorum: bool,
    /// Maximum bytes of entries ([`crate::Entry::size_bytes`]) in one append
    /// message (at least one entry is always sent).
    pub max_size_per_msg_bytes: u64,
    /// Maximum append messages in flight to one follower (pipelining).
    pub max_inflight_msgs: usize,
    /// Maximum bytes of entries in flight to one follower.
    pub max_inflight_bytes: u64,
    /// Maximum bytes of committed entries handed out in one `Ready`.
    pub max_committed_size_per_ready_bytes: u64,
    /// Maximum entries a leader holds beyond its commit index; further
    /// proposals are dropped ([`crate::Error::ProposalDropped`]).
    pub max_uncommitted_entries: u64,
    /// Maximum read-index requests waiting for confirmation.
    pub max_pending_read_index: usize,
    /// Index the caller's state machine has applied (on restart). Must be at
    /// least the storage's snapshot index and at most its commit index.
    pub applied: u64,
    /// Seed of the node's random number generator (election timeouts).
    /// Give each node a different seed.
    pub seed: u64,
}

impl Config {
    /// A configuration with defaults for node `id` of a group of `voters`.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Config {
        Config {
            id,
            voters,
            join: false,
            election_tick: DEFAULT_ELECTION_TICK,
            heartbeat_tick: DEFAULT_HEARTBEAT_TICK,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg_bytes: 1 << 20,
            max_inflight_msgs: 256,
            max_inflight_bytes: 32 << 20,
            max_committed_size_per_ready_bytes: 16 << 20,
            max_uncommitted_entries: 100_000,
            max_pending_read_index: 4096,
            applied: 0,
            seed: id,
        }
    }

    /// A configuration for node `id` joining an existing group (see
    /// [`Config::join`]).
    pub fn joining(id: NodeId) -> Config {
        Config {
            join: true,
            ..Config::new(id, Vec::new())
        }
    }

    /// Checks every field and limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == NO_NODE {
            return Err(ConfigError::ZeroId);
        }
        if self.voters.len() > VOTERS_MAX {
            return Err(ConfigError::TooManyVoters {
                count: self.voters.len(),
                max: VOTERS_MAX,
            });
        }
        let mut seen = self.voters.clone();
        seen.sort_unstable();
        for pair in seen.windows(2) {
            if pair[0] == pair[1] {
                return Err(ConfigError::DuplicateVoter(pair[0]));
            }
        }
        if seen.contains(&NO_NODE) {
            return Err(ConfigError::ZeroVoter);
        }
        if self.heartbeat_tick == 0 {
            return Err(ConfigError::ZeroHeartbeatTick);
        }
        if self.election_tick <= self.heartbeat_tick {
            return Err(ConfigError::ElectionTickNotAboveHeartbeat {
                election_tick: self.election_tick,
                heartbeat_tick: self.heartbeat_tick,
            });
        }
        if self.election_tick > ELECTION_TICK_MAX {
            return Err(ConfigError::ElectionTickTooLarge {
                value: self.election_tick,
                max: ELECTION_TICK_MAX,
            });
        }
        if self.max_inflight_msgs == 0 || self.max_inflight_msgs > INFLIGHT_MSGS_MAX {
            return Err(ConfigError::InflightMsgsOutOfRange {
                value: self.max_inflight_msgs,
                max: INFLIGHT_MSGS_MAX,
            });
        }
        if self.max_size_per_msg_bytes < ENTRY_OVERHEAD_BYTES
            || self.max_size_per_msg_bytes > SIZE_PER_MSG_BYTES_MAX
        {
            return Err(ConfigError::SizePerMsgOutOfRange {
                value: self.max_size_per_msg_bytes,
                min: ENTRY_OVERHEAD_BYTES,
                max: SIZE_PER_MSG_BYTES_MAX,
            });
        }
        if self.max_inflight_bytes < self.max_size_per_msg_bytes {
            return Err(ConfigError::InflightBytesBelowMsgSize {
                inflight_bytes: self.max_inflight_bytes,
                msg_bytes: self.max_size_per_msg_bytes,
            });
        }
        if self.max_committed_size_per_ready_bytes == 0 {
            return Err(ConfigError::ZeroLimit("max_committed_size_per_ready_bytes"));
        }
        if self.max_uncommitted_entries == 0 {
            return Err(ConfigError::ZeroLimit("max_uncommitted_entries"));
        }
        if self.max_pending_read_index == 0 {
            return Err(ConfigError::ZeroLimit("max_pending_read_index"));
        }
        Ok(())
    }
}

/// Why a [`Config`] (or the state it starts from) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `id` is 0, which means "nobody".
    #[error("node id must not be 0")]
    ZeroId,
    /// A voter id is 0.
    #[error("voter id must not be 0")]
    ZeroVoter,
    /// A voter appears twice.
    #[error("voter {0} listed twice")]
    DuplicateVoter(NodeId),
    /// Too many voters.
    #[error("{count} voters exceed the maximum of {max}")]
    TooManyVoters {
        /// Voters given.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Neither the config nor storage names any voter, and the node is not
    /// joining ([`Config::join`]).
    #[error("no voters: neither the config nor storage names any")]
    NoVoters,
    /// `heartbeat_tick` is 0.
    #[error("heartbeat_tick must be at least 1")]
    ZeroHeartbeatTick,
    /// `election_tick` must exceed `heartbeat_tick`, or followers time out
    /// between heartbeats.
    #[error(
        "election_tick ({election_tick}) must be greater than heartbeat_tick ({heartbeat_tick})"
    )]
    ElectionTickNotAboveHeartbeat {
        /// Given election tick.
        election_tick: u32,
        /// Given heartbeat tick.
        heartbeat_tick: u32,
    },
    /// `election_tick` is implausibly large.
    #[error("election_tick {value} exceeds the maximum of {max}")]
    ElectionTickTooLarge {
        /// Given value.
        value: u32,
        /// Limit.
        max: u32,
    },
    /// `max_inflight_msgs` is 0 or too large.
    #[error("max_inflight_msgs {value} must be in 1..={max}")]
    InflightMsgsOutOfRange {
        /// Given value.
        value: usize,
        /// Limit.
        max: usize,
    },
    /// `max_size_per_msg_bytes` is out of range.
    #[error("max_size_per_msg_bytes {value} must be in {min}..={max}")]
    SizePerMsgOutOfRange {
        /// Given value.
        value: u64,
        /// Lower limit.
        min: u64,
        /// Upper limit.
        max: u64,
    },
    /// In-flight byte budget smaller than one message.
    #[error("max_inflight_bytes ({inflight_bytes}) is below max_size_per_msg_bytes ({msg_bytes})")]
    InflightBytesBelowMsgSize {
        /// Given in-flight budget.
        inflight_bytes: u64,
        /// Given message size.
        msg_bytes: u64,
    },
    /// A limit that must be positive is 0.
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// `applied` lies outside `[snapshot index, commit index]` of storage.
    #[error("applied index {applied} outside [{snapshot_index}, {commit}] of storage")]
    AppliedOutOfRange {
        /// Given applied index.
        applied: u64,
        /// Storage's snapshot index.
        snapshot_index: u64,
        /// Storage's commit index.
        commit: u64,
    },
}
