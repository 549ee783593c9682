//! The shard controller's runtime (MIT 6.5840 lab 5's `shardctrler`): it
//! keeps numbered [`ShardConfig`]s in the controller group, a linearizable
//! key/value store with versioned puts ([`ConfigStore`]), and carries out
//! the shard moves between two consecutive configs on the replica groups
//! ([`ShardMover`]). Both are traits, so the same [`Controller`] runs on the
//! real cluster and on the in-memory models of its tests.
//!
//! # Protocol
//! The store holds two configs, each under its own key:
//! [`CURRENT_CONFIG_KEY`], the config clients route by, and
//! [`NEXT_CONFIG_KEY`], the config being installed (equal to the current
//! one when no change is pending). A change from config `k` to config
//! `k + 1` ([`Controller::change_config_to`]) takes three steps:
//! 1. **Claim.** Read NEXT, then CURRENT. If NEXT already holds a config
//!    numbered `k + 1` (or more), another controller owns this change: the
//!    caller *lost* and does nothing. Otherwise put `k + 1` into NEXT iff
//!    NEXT's version is still the one read: for each number exactly one
//!    controller's claim succeeds.
//! 2. **Move.** For every shard that changes hands ([`moves`]), at most
//!    [`MOVES_CONCURRENT_MAX`] at a time: a shard that had no group is
//!    created on its new group; any other is frozen at its source, installed
//!    at its destination (with the token the freeze returned), then deleted
//!    at its source. Every step carries `k + 1`.
//! 3. **Publish.** Put `k + 1` into CURRENT iff CURRENT's version is still
//!    the one read in step 1.
//!
//! The first config ([`Controller::init_config`]) follows the same steps
//! from "no config" (NEXT and CURRENT written only if absent; every shard is
//! created). [`Controller::init_controller`] finishes a claimed but
//! unpublished change: steps 2 and 3 from the stored NEXT.
//!
//! # Crashes and stale controllers
//! **Invariant:** once a config exists, `CURRENT.num ≤ NEXT.num ≤
//! CURRENT.num + 1`, and both numbers only grow: NEXT is claimed only while
//! it equals CURRENT, CURRENT is published only from a claimed NEXT. That
//! is why every operation reads NEXT *before* CURRENT: if it then finds
//! `NEXT.num == CURRENT.num + 1`, NEXT cannot have changed in between (it
//! changes only once CURRENT has caught up), so the pair is a consistent
//! snapshot; read the other way round, a pending change could be mistaken
//! for one that started from an older CURRENT (with no CURRENT at all, for
//! a first config: its shards would be created on top of live ones). If
//! CURRENT has overtaken the NEXT read, others made progress in between,
//! and the controller reads again.
//!
//! A controller may crash or stall between any two steps:
//! - before its claim lands, it has done nothing;
//! - after it, NEXT holds the change, and `init_controller` (any
//!   controller's) redoes steps 2 and 3. The steps of config `k + 1` depend
//!   only on configs `k` and `k + 1`, so every controller that carries out
//!   that change sends the same steps, and groups treat a repeat as a
//!   success that changes nothing;
//! - a stalled controller that wakes up later is fenced twice: a group
//!   answers `Stale` to a step older than the newest config it has seen for
//!   the shard, which proves a newer config was published, so the
//!   controller stops ([`ChangeOutcome::Superseded`]); and its conditional
//!   puts fail, since the versions it read are gone. The steps it can still
//!   get through are repeats of steps that were already done.
//!
//! # Failures
//! A [`StoreError::Unavailable`] store operation or [`MoveError::Unavailable`]
//! step is retried with capped exponential backoff
//! ([`ControllerConfig::backoff_min`] to [`ControllerConfig::backoff_max`])
//! for up to [`ControllerConfig::step_deadline`]; then, or on a permanent
//! error, the operation returns the error and leaves the rest to
//! `init_controller`. While a step waits to be retried, the controller
//! looks at CURRENT: once the config it installs (or a newer one) is
//! current, another controller has finished the change, and it stops
//! retrying steps that are moot and may address a group that has left and
//! is gone. A put whose outcome is unknown ([`PutOutcome::Maybe`])
//! is resolved by reading the key back. Time is tokio's, so tests can pause
//! it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use shoal_consensus::NodeId;
use shoal_engine::{GroupId, ShardId};
use tokio::time::Instant;

use super::config::{ConfigError, ShardConfig, GROUP_UNASSIGNED};
use super::rebalance::{moves, ShardMove};
use crate::node::ENTRY_BYTES_MAX;

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

/// The store key of the current config: the one clients route by.
pub const CURRENT_CONFIG_KEY: &[u8] = b"shoal/config/current";

/// The store key of the next config: the one being installed, or the
/// current one again when no change is pending.
pub const NEXT_CONFIG_KEY: &[u8] = b"shoal/config/next";

/// The format byte in front of a stored config: postcard of [`ShardConfig`].
/// A reader refuses any other ([`DecodeError::UnknownFormat`]), so a later
/// format can be introduced without old controllers misreading it.
pub const CONFIG_FORMAT_V1: u8 = 1;

/// Largest stored config record: one Raft entry of the node
/// ([`ENTRY_BYTES_MAX`], 1 MiB). A valid config encodes to at most about
/// 710 KiB (4096 shards and 1024 × 64 member ids at up to 10 bytes each).
pub const CONFIG_RECORD_BYTES_MAX: usize = ENTRY_BYTES_MAX as usize;

/// Most shard moves (or batched creations) in flight at once during a
/// change. Each move holds a frozen shard unavailable until its install, so
/// running them side by side shortens that window for a join or leave that
/// moves many shards, while the bound keeps the load on source and
/// destination groups (every install copies a shard's data) predictable.
pub const MOVES_CONCURRENT_MAX: usize = 8;

/// The error type that store and mover implementations wrap: whatever
/// their transport or engine reports.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A linearizable key/value store with versioned puts: the controller group.
///
/// Every version is positive; an absent key has version 0. Operations are
/// linearizable: a `get` after a `Written` put sees it (or a later one).
///
/// The futures must be `Send`, so a [`Controller`] can run in a spawned task.
pub trait ConfigStore {
    /// The value and version of `key`, or `None` if it is absent.
    ///
    /// # Errors
    /// [`StoreError`]; a get has no effect, so any error may be retried.
    fn get(
        &self,
        key: &[u8],
    ) -> impl Future<Output = Result<Option<(Bytes, u64)>, StoreError>> + Send;

    /// Writes `value` under `key` iff the key's version is `version`
    /// (0: iff the key is absent).
    ///
    /// # Errors
    /// A [`StoreError`] only if the put certainly had no effect; when it may
    /// have been applied (a timeout after sending it, a lost reply), the
    /// answer is `Ok(PutOutcome::Maybe)` instead.
    fn put_if_version(
        &self,
        key: &[u8],
        value: Bytes,
        version: u64,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send;
}

/// What a [`ConfigStore::put_if_version`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The value was written and the key now has `version`.
    Written {
        /// The key's new version.
        version: u64,
    },
    /// Nothing was written: the key's version is `current` (0 if absent).
    VersionMismatch {
        /// The key's version.
        current: u64,
    },
    /// The put may or may not have been applied (and may still be). The
    /// controller reads the key back to learn which.
    Maybe,
}

/// Why a [`ConfigStore`] operation failed. In both cases the operation had
/// no effect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot answer right now (unreachable, no leader, busy);
    /// retrying may succeed. The controller retries until the step deadline.
    #[error("the config store is unavailable")]
    Unavailable(#[source] BoxError),
    /// The store refused the operation for a reason a retry cannot fix.
    #[error("the config store refused the operation")]
    Refused(#[source] BoxError),
}

impl StoreError {
    /// Whether a retry may succeed ([`StoreError::Unavailable`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A replica group as a step addresses it: its id and its members (from
/// the config that names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRef<'a> {
    /// The group's id.
    pub id: GroupId,
    /// The group's member nodes.
    pub members: &'a [NodeId],
}

/// The replica groups' side of a shard move.
///
/// Every step carries `num`, the number of the config being installed. The
/// contract each group must keep, per shard:
/// - it remembers the largest `num` it has seen in a step for the shard,
///   durably, and answers `Stale { num }` (with that number) to a step with
///   a smaller one, changing nothing;
/// - a repeated step (same shard, same `num`) succeeds and changes nothing.
///   In particular, repeating an install keeps the data installed the first
///   time, with every write since;
/// - it serves the shard (accepts reads and writes) only between a create
///   or install and the next freeze.
///
/// An error does not say whether the step took effect (a reply may be
/// lost); the controller may send the step again, which the rules above
/// make harmless.
///
/// The futures must be `Send`, so a [`Controller`] can run in a spawned task.
pub trait ShardMover {
    /// `group` starts serving `shards`, which hold no data yet (they had no
    /// group in the previous config).
    ///
    /// # Errors
    /// [`MoveError`]; [`MoveError::Unavailable`] is retried.
    fn create(
        &self,
        group: GroupRef<'_>,
        shards: &[ShardId],
        num: u64,
    ) -> impl Future<Output = Result<StepOutcome, MoveError>> + Send;

    /// `from` copies `shard`'s data to `to` while it still serves it (copy
    /// before freeze), so that the freeze after it has less to ship. Only
    /// ever saves work: a move whose pre-copy failed or was never made is
    /// carried out all the same. The default copies nothing.
    ///
    /// # Errors
    /// [`MoveError`]; [`MoveError::Unavailable`] is retried, anything else
    /// ends the pre-copy (not the move).
    fn precopy(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> impl Future<Output = Result<(), MoveError>> + Send {
        let _ = (from, shard, num, to);
        async { Ok(()) }
    }

    /// `from` stops serving `shard` (refuses further writes) and makes its
    /// data available to `to`; the returned token is what `to`'s install
    /// needs to fetch it (a file manifest, say). A repeat returns a token
    /// that serves the same purpose.
    ///
    /// # Errors
    /// [`MoveError`]; [`MoveError::Unavailable`] is retried.
    fn freeze(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> impl Future<Output = Result<FreezeOutcome, MoveError>> + Send;

    /// `to` takes `shard`'s data as frozen by `from` (described by `token`)
    /// and starts serving it.
    ///
    /// # Errors
    /// [`MoveError`]; [`MoveError::Unavailable`] is retried.
    fn install(
        &self,
        to: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        from: GroupRef<'_>,
        token: Bytes,
    ) -> impl Future<Output = Result<StepOutcome, MoveError>> + Send;

    /// `from` drops its frozen copy of `shard`, now installed elsewhere.
    ///
    /// # Errors
    /// [`MoveError`]; [`MoveError::Unavailable`] is retried.
    fn delete(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
    ) -> impl Future<Output = Result<StepOutcome, MoveError>> + Send;
}

/// What a group answered to a create, install or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The step is done (now, or by an earlier request with the same num).
    Done,
    /// The group has seen config `num`, newer than the step's, for the
    /// shard: the step was refused.
    Stale {
        /// The newest config number the group has seen for the shard.
        num: u64,
    },
}

/// What a group answered to a freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// The shard is frozen; `token` lets the destination install it.
    Frozen {
        /// Opaque to the controller, passed to [`ShardMover::install`].
        token: Bytes,
    },
    /// The group has seen config `num`, newer than the step's, for the
    /// shard: the step was refused.
    Stale {
        /// The newest config number the group has seen for the shard.
        num: u64,
    },
}

/// Why a [`ShardMover`] step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The group cannot answer right now (unreachable, no leader, busy);
    /// retrying may succeed. The controller retries until the step deadline.
    #[error("the group is unavailable")]
    Unavailable(#[source] BoxError),
    /// The group refused the step for a reason a retry cannot fix (a bug,
    /// or a token it cannot use).
    #[error("the group refused the step")]
    Refused(#[source] BoxError),
}

impl MoveError {
    /// Whether a retry may succeed ([`MoveError::Unavailable`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, MoveError::Unavailable(_))
    }
}

/// One step of a change, as reported in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// [`ShardMover::create`] of `shard_count` shards on `group`.
    Create {
        /// The group.
        group: GroupId,
        /// How many shards the call created.
        shard_count: usize,
    },
    /// [`ShardMover::freeze`] of `shard` on `group`.
    Freeze {
        /// The source group.
        group: GroupId,
        /// The shard.
        shard: ShardId,
    },
    /// [`ShardMover::install`] of `shard` on `group`.
    Install {
        /// The destination group.
        group: GroupId,
        /// The shard.
        shard: ShardId,
    },
    /// [`ShardMover::delete`] of `shard` on `group`.
    Delete {
        /// The source group.
        group: GroupId,
        /// The shard.
        shard: ShardId,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::Create { group, shard_count } => {
                write!(f, "creating {shard_count} shards on group {group}")
            }
            Step::Freeze { group, shard } => write!(f, "freezing shard {shard} on group {group}"),
            Step::Install { group, shard } => {
                write!(f, "installing shard {shard} on group {group}")
            }
            Step::Delete { group, shard } => write!(f, "deleting shard {shard} on group {group}"),
        }
    }
}

/// Which of the two stored configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKey {
    /// [`CURRENT_CONFIG_KEY`].
    Current,
    /// [`NEXT_CONFIG_KEY`].
    Next,
}

impl ConfigKey {
    /// The store key.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            ConfigKey::Current => CURRENT_CONFIG_KEY,
            ConfigKey::Next => NEXT_CONFIG_KEY,
        }
    }
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigKey::Current => "current config",
            ConfigKey::Next => "next config",
        })
    }
}

/// Why a stored config record cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record has no bytes, not even the format byte.
    #[error("the record is empty")]
    Empty,
    /// The record is longer than [`CONFIG_RECORD_BYTES_MAX`].
    #[error("the record has {bytes} bytes: at most {CONFIG_RECORD_BYTES_MAX} are allowed")]
    TooLarge {
        /// The record's length.
        bytes: usize,
    },
    /// The format byte is not [`CONFIG_FORMAT_V1`].
    #[error("unknown config format {format}")]
    UnknownFormat {
        /// The format byte found.
        format: u8,
    },
    /// The bytes after the format byte are not a postcard [`ShardConfig`].
    #[error("the config does not decode")]
    Postcard(#[source] postcard::Error),
    /// Bytes follow the encoded config.
    #[error("{bytes} bytes follow the config")]
    TrailingBytes {
        /// How many.
        bytes: usize,
    },
    /// The config decodes but breaks an invariant.
    #[error("the config is invalid")]
    Invalid(#[source] ConfigError),
}

/// The stored record of `config`: [`CONFIG_FORMAT_V1`], then postcard.
///
/// # Panics
/// If the record would exceed [`CONFIG_RECORD_BYTES_MAX`], which no valid
/// config does (callers validate first).
pub fn encode_config(config: &ShardConfig) -> Bytes {
    // Serializing plain integers, vectors and maps into a Vec cannot fail.
    let record = postcard::to_extend(config, vec![CONFIG_FORMAT_V1])
        .expect("a ShardConfig always serializes");
    assert!(
        record.len() <= CONFIG_RECORD_BYTES_MAX,
        "config {} encodes to {} bytes, over {CONFIG_RECORD_BYTES_MAX}",
        config.num,
        record.len()
    );
    Bytes::from(record)
}

/// The config in a stored record, checked with [`ShardConfig::validate`].
///
/// # Errors
/// A [`DecodeError`] naming the first problem found.
pub fn decode_config(record: &[u8]) -> Result<ShardConfig, DecodeError> {
    if record.len() > CONFIG_RECORD_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            bytes: record.len(),
        });
    }
    let (&format, body) = record.split_first().ok_or(DecodeError::Empty)?;
    if format != CONFIG_FORMAT_V1 {
        return Err(DecodeError::UnknownFormat { format });
    }
    let (config, rest) =
        postcard::take_from_bytes::<ShardConfig>(body).map_err(DecodeError::Postcard)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { bytes: rest.len() });
    }
    config.validate().map_err(DecodeError::Invalid)?;
    Ok(config)
}

/// Why a config cannot follow the current one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The new config breaks an invariant ([`ShardConfig::validate`]).
    #[error("the new config is invalid")]
    Invalid(#[source] ConfigError),
    /// The new config's number is more than one above the current one's.
    #[error("config {new} cannot follow config {current}: numbers advance by one")]
    NumGap {
        /// The current config's number.
        current: u64,
        /// The new config's number.
        new: u64,
    },
    /// The configs have different shard counts (fixed for a cluster's life).
    #[error("the new config has {new_shards} shards, the current one {current_shards}")]
    ShardCount {
        /// The current config's shard count.
        current_shards: usize,
        /// The new config's shard count.
        new_shards: usize,
    },
    /// A shard that has a group would have none, which would drop its data.
    #[error("the new config leaves shard {shard} without a group")]
    ShardUnassigned {
        /// The shard.
        shard: ShardId,
    },
}

/// Checks that `new` may follow `current` (whose number is `new.num - 1`
/// or more; the caller handles older `new`s).
fn check_transition(current: &ShardConfig, new: &ShardConfig) -> Result<(), TransitionError> {
    new.validate().map_err(TransitionError::Invalid)?;
    if new.num > current.num + 1 {
        return Err(TransitionError::NumGap {
            current: current.num,
            new: new.num,
        });
    }
    if new.shards.len() != current.shards.len() {
        return Err(TransitionError::ShardCount {
            current_shards: current.shards.len(),
            new_shards: new.shards.len(),
        });
    }
    let dropped = (0..)
        .zip(current.shards.iter().zip(&new.shards))
        .find(|(_, (&from, &to))| from != GROUP_UNASSIGNED && to == GROUP_UNASSIGNED);
    if let Some((shard, _)) = dropped {
        return Err(TransitionError::ShardUnassigned { shard });
    }
    Ok(())
}

/// Timing of a [`Controller`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// How long one store operation or one move step may take, retries of
    /// transient errors included.
    pub step_deadline: Duration,
    /// First pause after a transient error; it doubles with each retry.
    pub backoff_min: Duration,
    /// Longest pause between retries.
    pub backoff_max: Duration,
}

impl Default for ControllerConfig {
    /// 10 s per step, backoff from 10 ms to 500 ms (as the KV client's).
    fn default() -> Self {
        Self {
            step_deadline: Duration::from_secs(10),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
        }
    }
}

/// Why a [`ControllerConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerConfigError {
    /// `step_deadline` is zero: no step could ever run.
    #[error("step_deadline must be positive")]
    StepDeadlineZero,
    /// `backoff_min` is zero: retries would spin.
    #[error("backoff_min must be positive")]
    BackoffMinZero,
    /// `backoff_min` exceeds `backoff_max`.
    #[error("backoff_min ({backoff_min:?}) exceeds backoff_max ({backoff_max:?})")]
    BackoffInverted {
        /// The first pause.
        backoff_min: Duration,
        /// The longest pause.
        backoff_max: Duration,
    },
}

impl ControllerConfig {
    /// Checks the timings: a positive deadline and backoff, and
    /// `backoff_min ≤ backoff_max`.
    ///
    /// # Errors
    /// The first [`ControllerConfigError`] found.
    pub fn validate(&self) -> Result<(), ControllerConfigError> {
        if self.step_deadline.is_zero() {
            return Err(ControllerConfigError::StepDeadlineZero);
        }
        if self.backoff_min.is_zero() {
            return Err(ControllerConfigError::BackoffMinZero);
        }
        if self.backoff_min > self.backoff_max {
            return Err(ControllerConfigError::BackoffInverted {
                backoff_min: self.backoff_min,
                backoff_max: self.backoff_max,
            });
        }
        Ok(())
    }
}

/// What [`Controller::init_config`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// The given config is current: this call posted it, or an earlier call
    /// with the same config did.
    Posted,
    /// Another config (number `num`) was posted first; the given one was
    /// not posted and nothing of it was done. (If posting that other config
    /// had been interrupted, this call finished it.)
    Exists {
        /// The current config's number.
        num: u64,
    },
}

/// What [`Controller::change_config_to`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// The new config is current: this controller claimed it, carried out
    /// its moves and published it.
    Changed,
    /// Another controller had claimed this config number (or holds a
    /// pending claim for it): this controller did nothing. If that
    /// controller died, [`Controller::init_controller`] finishes its change.
    Lost,
    /// Config `num`, at least as new as the requested one, was current
    /// already, or appeared while this controller worked (a group answered
    /// `Stale`, or the publish found a newer config): it stopped.
    Superseded {
        /// The newer config number seen.
        num: u64,
    },
}

/// What [`Controller::init_controller`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoverOutcome {
    /// No config has been posted or claimed.
    Empty,
    /// No change was pending; config `num` is current.
    Idle {
        /// The current config's number.
        num: u64,
    },
    /// The pending change to config `num` was finished and published.
    Finished {
        /// The published config's number.
        num: u64,
    },
    /// While finishing the pending change, config `num` turned out to have
    /// superseded it (another controller finished it and went on).
    Superseded {
        /// The newer config number seen.
        num: u64,
    },
}

/// Why [`Controller::query`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// No config has been posted yet.
    #[error("no config has been posted")]
    NotInitialized,
    /// The store failed, or stayed unavailable for the step deadline.
    #[error("reading the {key}")]
    Store {
        /// The key read.
        key: ConfigKey,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The stored config is corrupt.
    #[error("the stored {key} is corrupt")]
    Corrupt {
        /// The key read.
        key: ConfigKey,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
}

/// Why [`Controller::init_config`] failed. The first config may be partly
/// created; [`Controller::init_controller`] or a repeated `init_config`
/// finishes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The config breaks an invariant.
    #[error("the initial config is invalid")]
    Invalid(#[source] ConfigError),
    /// The store failed, or stayed unavailable for the step deadline.
    #[error("accessing the {key}")]
    Store {
        /// The key accessed.
        key: ConfigKey,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A stored config is corrupt.
    #[error("the stored {key} is corrupt")]
    Corrupt {
        /// The key read.
        key: ConfigKey,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A put's outcome stayed unknown until the step deadline.
    #[error("whether the {key} was written is unknown")]
    Unresolved {
        /// The key written.
        key: ConfigKey,
    },
    /// A step failed permanently, or stayed unavailable for the step deadline.
    #[error("{step} for config {num}")]
    Move {
        /// The step.
        step: Step,
        /// The number of the config being installed.
        num: u64,
        /// The mover's error.
        #[source]
        source: MoveError,
    },
    /// The stored configs break the controller's invariant (a bug, or a
    /// store that is not linearizable).
    #[error("inconsistent store: current config {current:?}, next config {next}")]
    Inconsistent {
        /// CURRENT's number, if present.
        current: Option<u64>,
        /// NEXT's number (or the config being published).
        next: u64,
    },
}

/// Why [`Controller::change_config_to`] failed. The change may be claimed
/// and partly carried out; [`Controller::init_controller`] finishes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// No config has been posted yet: use [`Controller::init_config`].
    #[error("no config has been posted")]
    NotInitialized,
    /// The new config cannot follow the current one. Nothing was done.
    #[error("the new config cannot follow the current one")]
    Invalid(#[source] TransitionError),
    /// The store failed, or stayed unavailable for the step deadline.
    #[error("accessing the {key}")]
    Store {
        /// The key accessed.
        key: ConfigKey,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A stored config is corrupt.
    #[error("the stored {key} is corrupt")]
    Corrupt {
        /// The key read.
        key: ConfigKey,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A put's outcome stayed unknown until the step deadline.
    #[error("whether the {key} was written is unknown")]
    Unresolved {
        /// The key written.
        key: ConfigKey,
    },
    /// A step failed permanently, or stayed unavailable for the step deadline.
    #[error("{step} for config {num}")]
    Move {
        /// The step.
        step: Step,
        /// The number of the config being installed.
        num: u64,
        /// The mover's error.
        #[source]
        source: MoveError,
    },
    /// The stored configs break the controller's invariant (a bug, or a
    /// store that is not linearizable).
    #[error("inconsistent store: current config {current:?}, next config {next}")]
    Inconsistent {
        /// CURRENT's number, if present.
        current: Option<u64>,
        /// NEXT's number (or the config being published).
        next: u64,
    },
}

/// Why [`Controller::init_controller`] failed. A pending change stays
/// pending; calling it again continues.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The pending config cannot follow the current one (a bug upstream:
    /// changes are checked before they are claimed).
    #[error("the pending config cannot follow the current one")]
    InvalidPending(#[source] TransitionError),
    /// The store failed, or stayed unavailable for the step deadline.
    #[error("accessing the {key}")]
    Store {
        /// The key accessed.
        key: ConfigKey,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A stored config is corrupt.
    #[error("the stored {key} is corrupt")]
    Corrupt {
        /// The key read.
        key: ConfigKey,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A put's outcome stayed unknown until the step deadline.
    #[error("whether the {key} was written is unknown")]
    Unresolved {
        /// The key written.
        key: ConfigKey,
    },
    /// A step failed permanently, or stayed unavailable for the step deadline.
    #[error("{step} for config {num}")]
    Move {
        /// The step.
        step: Step,
        /// The number of the config being installed.
        num: u64,
        /// The mover's error.
        #[source]
        source: MoveError,
    },
    /// The stored configs break the controller's invariant (a bug, or a
    /// store that is not linearizable).
    #[error("inconsistent store: current config {current:?}, next config {next}")]
    Inconsistent {
        /// CURRENT's number, if present.
        current: Option<u64>,
        /// NEXT's number (or the config being published).
        next: u64,
    },
}

/// A failed read, common to every operation.
#[derive(Debug)]
enum ReadFailure {
    Store { key: ConfigKey, source: StoreError },
    Corrupt { key: ConfigKey, source: DecodeError },
}

/// A failure while writing or moving, common to the operations that do.
#[derive(Debug)]
enum Failure {
    Read(ReadFailure),
    Unresolved {
        key: ConfigKey,
    },
    Move {
        step: Step,
        num: u64,
        source: MoveError,
    },
    Inconsistent {
        current: Option<u64>,
        next: u64,
    },
}

impl From<ReadFailure> for Failure {
    fn from(failure: ReadFailure) -> Self {
        Failure::Read(failure)
    }
}

/// Why carrying out a change stopped.
#[derive(Debug)]
enum Halt {
    /// Config `num`, newer than the one being installed, exists.
    Superseded { num: u64 },
    /// The config being installed is current already: another controller
    /// carried out the change and published it.
    Published,
    /// An error the caller reports.
    Failed(Failure),
}

impl From<Failure> for Halt {
    fn from(failure: Failure) -> Self {
        Halt::Failed(failure)
    }
}

impl From<ReadFailure> for Halt {
    fn from(failure: ReadFailure) -> Self {
        Halt::Failed(Failure::Read(failure))
    }
}

impl From<ReadFailure> for QueryError {
    fn from(failure: ReadFailure) -> Self {
        match failure {
            ReadFailure::Store { key, source } => QueryError::Store { key, source },
            ReadFailure::Corrupt { key, source } => QueryError::Corrupt { key, source },
        }
    }
}

/// `From<ReadFailure>` and `From<Failure>` for the errors of the
/// operations that write: they share these variants.
macro_rules! from_failure {
    ($($error:ident),*) => {$(
        impl From<ReadFailure> for $error {
            fn from(failure: ReadFailure) -> Self {
                match failure {
                    ReadFailure::Store { key, source } => $error::Store { key, source },
                    ReadFailure::Corrupt { key, source } => $error::Corrupt { key, source },
                }
            }
        }

        impl From<Failure> for $error {
            fn from(failure: Failure) -> Self {
                match failure {
                    Failure::Read(read) => read.into(),
                    Failure::Unresolved { key } => $error::Unresolved { key },
                    Failure::Move { step, num, source } => $error::Move { step, num, source },
                    Failure::Inconsistent { current, next } => {
                        $error::Inconsistent { current, next }
                    }
                }
            }
        }
    )*};
}

from_failure!(InitError, ChangeError, RecoverError);

/// A config as read from the store, with its record and version.
#[derive(Debug, Clone)]
struct Stored {
    config: ShardConfig,
    record: Bytes,
    version: u64,
}

/// What a conditional put did, once any `Maybe` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Put {
    Written,
    Mismatch,
}

/// One unit of a change's work, run concurrently with the others.
#[derive(Debug, Clone)]
enum Task {
    /// Shards that had no group, created on their new group in one call.
    Create {
        group: GroupId,
        shards: Vec<ShardId>,
    },
    /// Freeze, install, delete.
    Transfer(ShardMove),
}

/// Capped exponential backoff within one step's deadline.
struct Backoff {
    deadline: Instant,
    pause: Duration,
    pause_max: Duration,
}

impl Backoff {
    fn new(config: &ControllerConfig) -> Self {
        Self {
            deadline: Instant::now() + config.step_deadline,
            pause: config.backoff_min,
            pause_max: config.backoff_max,
        }
    }

    /// Sleeps before the next attempt (never past the deadline, so the last
    /// attempt happens at it); `false` once the deadline has passed.
    async fn pause(&mut self) -> bool {
        match self.next_pause() {
            Some(pause) => {
                tokio::time::sleep(pause).await;
                true
            }
            None => false,
        }
    }

    /// How long to wait before the next attempt (never past the deadline),
    /// doubling the pause after; `None` once the deadline has passed.
    fn next_pause(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        let pause = self.pause.min(self.deadline - now);
        self.pause = self.pause.saturating_mul(2).min(self.pause_max);
        Some(pause)
    }
}

/// Polls the futures of `tasks`, at most `limit` at once, until all have
/// succeeded or one has failed; on failure the others are dropped (every
/// step is idempotent, so an abandoned step is no worse than a crash).
async fn run_bounded<F, E>(tasks: impl IntoIterator<Item = F>, limit: usize) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    assert!(limit > 0, "run_bounded: the limit must be positive");
    let mut waiting = tasks.into_iter();
    let mut running: Vec<Pin<Box<F>>> = Vec::with_capacity(limit);
    poll_fn(|cx| loop {
        while running.len() < limit {
            match waiting.next() {
                Some(task) => running.push(Box::pin(task)),
                None => break,
            }
        }
        if running.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let before = running.len();
        let mut index = 0;
        while index < running.len() {
            match running[index].as_mut().poll(cx) {
                Poll::Ready(Ok(())) => {
                    running.swap_remove(index);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => index += 1,
            }
        }
        // Every running future is pending and has registered the waker:
        // wait. Otherwise start the next tasks.
        if running.len() == before {
            return Poll::Pending;
        }
    })
    .await
}

/// The shard controller: posts, changes and recovers configs through a
/// [`ConfigStore`] and a [`ShardMover`]. See the [module docs](self) for the
/// protocol. Several controllers may run at once against the same store and
/// groups; they never corrupt each other's work.
#[derive(Debug)]
pub struct Controller<S, M> {
    store: S,
    mover: M,
    config: ControllerConfig,
}

impl<S: ConfigStore, M: ShardMover> Controller<S, M> {
    /// A controller over `store` and `mover`.
    ///
    /// # Errors
    /// [`ControllerConfigError`] if `config` does not validate.
    pub fn new(
        store: S,
        mover: M,
        config: ControllerConfig,
    ) -> Result<Self, ControllerConfigError> {
        config.validate()?;
        Ok(Self {
            store,
            mover,
            config,
        })
    }

    /// The config store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The shard mover.
    pub fn mover(&self) -> &M {
        &self.mover
    }

    /// The timing settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The current config (lab: `Query`).
    ///
    /// # Errors
    /// [`QueryError::NotInitialized`] before the first config is published;
    /// [`QueryError::Store`], [`QueryError::Corrupt`].
    pub async fn query(&self) -> Result<ShardConfig, QueryError> {
        match self.read(ConfigKey::Current).await? {
            Some(current) => Ok(current.config),
            None => Err(QueryError::NotInitialized),
        }
    }

    /// Posts `config` as the first config (lab: `InitConfig`, with config 1
    /// from a join on [`ShardConfig::initial`]), if no config exists: claims
    /// NEXT, creates every assigned shard on its group (at `config.num`),
    /// then publishes CURRENT.
    ///
    /// If a config exists already, this is a no-op: [`InitOutcome::Posted`]
    /// if it is `config` (so retrying after an error is safe),
    /// [`InitOutcome::Exists`] if it is another one. If another first config
    /// is claimed but not yet published (its poster died), this finishes
    /// posting *that* one and returns `Exists`.
    ///
    /// # Errors
    /// [`InitError::Invalid`] if `config` breaks an invariant (nothing is
    /// done); otherwise an [`InitError`] from the store or a group, after
    /// which a retry or [`Controller::init_controller`] finishes the work.
    pub async fn init_config(&self, config: ShardConfig) -> Result<InitOutcome, InitError> {
        config.validate().map_err(InitError::Invalid)?;
        let record = encode_config(&config);
        // Each round either returns or moves the store on: a lost claim
        // means another first config is pending (finished in round two), a
        // finished one is current (returned in round three).
        const ROUNDS_MAX: usize = 3;
        for _ in 0..ROUNDS_MAX {
            let next = self.read(ConfigKey::Next).await?;
            if let Some(current) = self.read(ConfigKey::Current).await? {
                return Ok(if current.config == config {
                    InitOutcome::Posted
                } else {
                    InitOutcome::Exists {
                        num: current.config.num,
                    }
                });
            }
            // NEXT was read first and CURRENT is still absent, so NEXT (if
            // present) is a first config nobody has published.
            let pending = match next {
                Some(pending) => pending,
                None => match self.put(ConfigKey::Next, &record, 0).await? {
                    Put::Written => Stored {
                        config: config.clone(),
                        record: record.clone(),
                        version: 0,
                    },
                    Put::Mismatch => continue,
                },
            };
            let base = ShardConfig::initial(pending.config.shard_count())
                .expect("a validated config has a valid shard count");
            match self
                .finish(&base, 0, &pending.config, &pending.record)
                .await
            {
                Ok(()) | Err(Halt::Superseded { .. } | Halt::Published) => continue,
                Err(Halt::Failed(failure)) => return Err(failure.into()),
            }
        }
        let current = self.read(ConfigKey::Current).await?;
        let next = self.read(ConfigKey::Next).await?;
        Err(InitError::Inconsistent {
            current: current.map(|stored| stored.config.num),
            next: next.map_or(0, |stored| stored.config.num),
        })
    }

    /// Makes `new` the current config (lab: `ChangeConfigTo`): claims it in
    /// NEXT, carries out the shard moves, publishes it in CURRENT. `new.num`
    /// must be the current number + 1.
    ///
    /// Only one controller wins the claim for a number; the others return
    /// [`ChangeOutcome::Lost`] having done nothing. A `new` no newer than
    /// the current config returns [`ChangeOutcome::Superseded`], as does a
    /// controller that learns mid-way (from a group or the store) that a
    /// newer config exists: it stops at once.
    ///
    /// # Errors
    /// [`ChangeError::NotInitialized`], [`ChangeError::Invalid`] (nothing
    /// done); otherwise an error from the store or a group, after which
    /// the claimed change is pending and [`Controller::init_controller`]
    /// finishes it.
    pub async fn change_config_to(&self, new: ShardConfig) -> Result<ChangeOutcome, ChangeError> {
        new.validate()
            .map_err(|error| ChangeError::Invalid(TransitionError::Invalid(error)))?;
        let (current, next_num, next_version) = loop {
            let next = self.read(ConfigKey::Next).await?;
            let Some(current) = self.read(ConfigKey::Current).await? else {
                return Err(ChangeError::NotInitialized);
            };
            let current_num = current.config.num;
            let (next_num, next_version) = next
                .as_ref()
                .map_or((current_num, 0), |next| (next.config.num, next.version));
            if next_num > current_num + 1 {
                return Err(ChangeError::Inconsistent {
                    current: Some(current_num),
                    next: next_num,
                });
            }
            // CURRENT overtook the NEXT we read: other controllers made
            // progress in between. Read again (each round sees a higher
            // CURRENT, so `new` is soon superseded or the reads agree).
            if next_num >= current_num || new.num <= current_num {
                break (current, next_num, next_version);
            }
        };
        let current_num = current.config.num;
        if new.num <= current_num {
            return Ok(ChangeOutcome::Superseded { num: current_num });
        }
        check_transition(&current.config, &new).map_err(ChangeError::Invalid)?;
        if next_num >= new.num {
            tracing::debug!(num = new.num, "config change lost: already claimed");
            return Ok(ChangeOutcome::Lost);
        }
        let record = encode_config(&new);
        if self.put(ConfigKey::Next, &record, next_version).await? == Put::Mismatch {
            tracing::debug!(num = new.num, "config change lost: claimed meanwhile");
            return Ok(ChangeOutcome::Lost);
        }
        tracing::info!(num = new.num, "config change claimed");
        match self
            .finish(&current.config, current.version, &new, &record)
            .await
        {
            Ok(()) | Err(Halt::Published) => Ok(ChangeOutcome::Changed),
            Err(Halt::Superseded { num }) => Ok(ChangeOutcome::Superseded { num }),
            Err(Halt::Failed(failure)) => Err(failure.into()),
        }
    }

    /// Finishes a change that was claimed but not published, e.g. by a
    /// controller that crashed (lab 5B's `InitController`): if NEXT holds a
    /// config numbered CURRENT's + 1 (or no CURRENT exists yet), carries out
    /// its moves and publishes it. Safe to run at any time, by any number
    /// of controllers.
    ///
    /// # Errors
    /// [`RecoverError::InvalidPending`], or an error from the store or a
    /// group; the change stays pending and a later call continues it.
    pub async fn init_controller(&self) -> Result<RecoverOutcome, RecoverError> {
        let Some(next) = self.read(ConfigKey::Next).await? else {
            // NEXT is written before CURRENT ever is.
            return Ok(match self.read(ConfigKey::Current).await? {
                Some(current) => RecoverOutcome::Idle {
                    num: current.config.num,
                },
                None => RecoverOutcome::Empty,
            });
        };
        let current = self.read(ConfigKey::Current).await?;
        let num = next.config.num;
        let (base, base_version) = match &current {
            None => (
                ShardConfig::initial(next.config.shard_count())
                    .expect("a validated config has a valid shard count"),
                0,
            ),
            Some(current) if num <= current.config.num => {
                return Ok(RecoverOutcome::Idle {
                    num: current.config.num,
                })
            }
            Some(current) if num == current.config.num + 1 => {
                check_transition(&current.config, &next.config)
                    .map_err(RecoverError::InvalidPending)?;
                (current.config.clone(), current.version)
            }
            Some(current) => {
                return Err(RecoverError::Inconsistent {
                    current: Some(current.config.num),
                    next: num,
                })
            }
        };
        tracing::info!(num, "finishing a pending config change");
        match self
            .finish(&base, base_version, &next.config, &next.record)
            .await
        {
            Ok(()) | Err(Halt::Published) => Ok(RecoverOutcome::Finished { num }),
            Err(Halt::Superseded { num }) => Ok(RecoverOutcome::Superseded { num }),
            Err(Halt::Failed(failure)) => Err(failure.into()),
        }
    }

    /// Steps 2 and 3 of a claimed change from `base` (stored at
    /// `base_version`, 0 if absent) to `target`: the moves, then the
    /// publish.
    async fn finish(
        &self,
        base: &ShardConfig,
        base_version: u64,
        target: &ShardConfig,
        target_record: &Bytes,
    ) -> Result<(), Halt> {
        let num = target.num;
        let mut creates: BTreeMap<GroupId, Vec<ShardId>> = BTreeMap::new();
        let mut transfers = Vec::new();
        for shard_move in moves(base, target) {
            if shard_move.from_group == GROUP_UNASSIGNED {
                creates
                    .entry(shard_move.to_group)
                    .or_default()
                    .push(shard_move.shard);
            } else {
                transfers.push(Task::Transfer(shard_move));
            }
        }
        let tasks = creates
            .into_iter()
            .map(|(group, shards)| Task::Create { group, shards })
            .chain(transfers);
        run_bounded(
            tasks.map(|task| self.run_task(base, target, task)),
            MOVES_CONCURRENT_MAX,
        )
        .await?;

        if self
            .put(ConfigKey::Current, target_record, base_version)
            .await?
            == Put::Written
        {
            tracing::info!(num, "config published");
            return Ok(());
        }
        // Someone else published first: this config (a controller finishing
        // the same claim) or, since, a newer one.
        let current = self.read(ConfigKey::Current).await?;
        match current {
            Some(current) if current.config.num == num && current.record == *target_record => {
                Ok(())
            }
            Some(current) if current.config.num > num => Err(Halt::Superseded {
                num: current.config.num,
            }),
            other => Err(Halt::Failed(Failure::Inconsistent {
                current: other.map(|stored| stored.config.num),
                next: num,
            })),
        }
    }

    /// Carries out one task of the change from `base` to `target`.
    async fn run_task(
        &self,
        base: &ShardConfig,
        target: &ShardConfig,
        task: Task,
    ) -> Result<(), Halt> {
        let num = target.num;
        match task {
            Task::Create { group, shards } => {
                let group = group_ref(target, group);
                let step = Step::Create {
                    group: group.id,
                    shard_count: shards.len(),
                };
                let outcome = self
                    .retry(step, target, || self.mover.create(group, &shards, num))
                    .await?;
                done(outcome)
            }
            Task::Transfer(ShardMove {
                shard,
                from_group,
                to_group,
            }) => {
                let from = group_ref(base, from_group);
                let to = group_ref(target, to_group);
                self.precopy(from, shard, num, to).await;
                let step = Step::Freeze {
                    group: from.id,
                    shard,
                };
                let token = match self
                    .retry(step, target, || self.mover.freeze(from, shard, num, to))
                    .await?
                {
                    FreezeOutcome::Frozen { token } => token,
                    FreezeOutcome::Stale { num } => return Err(Halt::Superseded { num }),
                };
                let step = Step::Install {
                    group: to.id,
                    shard,
                };
                let outcome = self
                    .retry(step, target, || {
                        self.mover.install(to, shard, num, from, token.clone())
                    })
                    .await?;
                done(outcome)?;
                let step = Step::Delete {
                    group: from.id,
                    shard,
                };
                let outcome = self
                    .retry(step, target, || self.mover.delete(from, shard, num))
                    .await?;
                done(outcome)
            }
        }
    }

    /// Has `from` pre-copy `shard` to `to` ([`ShardMover::precopy`]),
    /// retrying transient errors (a call that timed out while a large shard
    /// ships joins the copy that runs) until the step deadline. Best
    /// effort: whatever happens, the move goes on with its freeze.
    async fn precopy(&self, from: GroupRef<'_>, shard: ShardId, num: u64, to: GroupRef<'_>) {
        let mut backoff = Backoff::new(&self.config);
        loop {
            match self.mover.precopy(from, shard, num, to).await {
                Ok(()) => return,
                Err(e) if e.is_transient() && backoff.pause().await => {
                    tracing::debug!(shard, num, error = %e, "pre-copy not done yet; asking again");
                }
                Err(e) => {
                    tracing::info!(shard, num, error = %e, "no pre-copy; the freeze ships the whole shard");
                    return;
                }
            }
        }
    }

    /// Runs `attempt`, a step of the change to `target`, until it answers,
    /// a permanent error, or the step deadline, pausing between transient
    /// errors. While it pauses, it looks once at CURRENT: if `target` (or a
    /// newer config) is current, another controller finished the change,
    /// and the step is moot; the group it waits for may even be gone for
    /// good (a group that left is shut down once its leave is published).
    /// The look lasts no longer than the pause, so a controller cut off
    /// from the store retries its step all the same.
    async fn retry<T, F>(
        &self,
        step: Step,
        target: &ShardConfig,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, Halt>
    where
        F: Future<Output = Result<T, MoveError>>,
    {
        let num = target.num;
        let mut backoff = Backoff::new(&self.config);
        loop {
            let error = match attempt().await {
                Ok(outcome) => return Ok(outcome),
                Err(error) => error,
            };
            let pause = match backoff.next_pause() {
                Some(pause) if error.is_transient() => pause,
                _ => {
                    return Err(Halt::Failed(Failure::Move {
                        step,
                        num,
                        source: error,
                    }))
                }
            };
            tracing::debug!(%step, num, %error, "retrying");
            let resume = Instant::now() + pause;
            let current = tokio::time::timeout(pause, self.store.get(CURRENT_CONFIG_KEY)).await;
            if let Ok(Ok(Some((record, _)))) = current {
                if let Some(halt) = moot(target, &record) {
                    return Err(halt);
                }
            }
            tokio::time::sleep_until(resume).await;
        }
    }

    /// Reads and decodes the config under `key`, retrying transient errors
    /// within one step deadline.
    async fn read(&self, key: ConfigKey) -> Result<Option<Stored>, ReadFailure> {
        let mut backoff = Backoff::new(&self.config);
        let Some((record, version)) = self.get(key, &mut backoff).await? else {
            return Ok(None);
        };
        let config =
            decode_config(&record).map_err(|source| ReadFailure::Corrupt { key, source })?;
        Ok(Some(Stored {
            config,
            record,
            version,
        }))
    }

    /// A raw get of `key`, retrying transient errors until `backoff`'s
    /// deadline.
    async fn get(
        &self,
        key: ConfigKey,
        backoff: &mut Backoff,
    ) -> Result<Option<(Bytes, u64)>, ReadFailure> {
        loop {
            let source = match self.store.get(key.bytes()).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if !source.is_transient() || !backoff.pause().await {
                return Err(ReadFailure::Store { key, source });
            }
        }
    }

    /// Writes `record` under `key` iff its version is `version`, retrying
    /// transient errors within one step deadline and resolving `Maybe` by
    /// reading the key back: if it holds `record` at a newer version, the
    /// put landed (or another controller wrote the same record, which is as
    /// good: a config's steps and publication do not depend on who
    /// performs them); if its version is unchanged, the conditional put is
    /// simply sent again.
    async fn put(&self, key: ConfigKey, record: &Bytes, version: u64) -> Result<Put, Failure> {
        let mut backoff = Backoff::new(&self.config);
        let mut maybe_sent = false;
        loop {
            match self
                .store
                .put_if_version(key.bytes(), record.clone(), version)
                .await
            {
                Ok(PutOutcome::Written { .. }) => return Ok(Put::Written),
                Ok(PutOutcome::VersionMismatch { .. }) if !maybe_sent => return Ok(Put::Mismatch),
                // Possibly our own earlier attempt: read back below.
                Ok(PutOutcome::VersionMismatch { .. }) => {}
                Ok(PutOutcome::Maybe) => maybe_sent = true,
                Err(source) => {
                    if !source.is_transient() {
                        return Err(Failure::Read(ReadFailure::Store { key, source }));
                    }
                    if !backoff.pause().await {
                        return Err(if maybe_sent {
                            Failure::Unresolved { key }
                        } else {
                            Failure::Read(ReadFailure::Store { key, source })
                        });
                    }
                    continue;
                }
            }
            match self.get(key, &mut backoff).await {
                Ok(Some((stored, stored_version))) if stored_version != version => {
                    return Ok(if stored == *record {
                        Put::Written
                    } else {
                        Put::Mismatch
                    });
                }
                // Version unchanged: not applied (yet); the put is
                // conditional, so sending it again cannot apply it twice.
                Ok(_) => {}
                Err(ReadFailure::Store { .. }) => return Err(Failure::Unresolved { key }),
                Err(failure) => return Err(failure.into()),
            }
            if !backoff.pause().await {
                return Err(Failure::Unresolved { key });
            }
        }
    }
}

/// `id` with its members in `config`.
///
/// # Panics
/// If `config` does not name `id`: the caller takes `id` from the shard
/// table of a validated config, which names every group it assigns.
fn group_ref(config: &ShardConfig, id: GroupId) -> GroupRef<'_> {
    let members = config.members(id).unwrap_or_else(|| {
        panic!(
            "config {} assigns a shard to group {id} but does not name it",
            config.num
        )
    });
    GroupRef { id, members }
}

/// Whether CURRENT (as `record`) makes the change to `target` moot: it is
/// `target` (published, by whichever controller) or newer. A record that
/// does not decode is left to the reads that report it.
fn moot(target: &ShardConfig, record: &[u8]) -> Option<Halt> {
    let current = decode_config(record).ok()?;
    if current.num > target.num {
        Some(Halt::Superseded { num: current.num })
    } else if current.num < target.num {
        None
    } else if current == *target {
        Some(Halt::Published)
    } else {
        Some(Halt::Failed(Failure::Inconsistent {
            current: Some(current.num),
            next: target.num,
        }))
    }
}

/// Turns a group's `Stale` answer into a halt.
fn done(outcome: StepOutcome) -> Result<(), Halt> {
    match outcome {
        StepOutcome::Done => Ok(()),
        StepOutcome::Stale { num } => Err(Halt::Superseded { num }),
    }
}
