//! Sharding: what a shard configuration is, how it changes, and the
//! controller that installs each change on the replica groups.
//!
//! The core is pure (no I/O, no clock, no randomness): the controller group
//! stores these configs (a current and a next one, written with versioned
//! puts and fenced by [`ShardConfig::num`]), replica groups compare `num`s
//! to reject stale moves, and routing clients map keys to shards and shards
//! to groups, all through these types and functions. The runtime,
//! [`ctrler`], is generic over its two seams, so the same code runs on the
//! cluster and on in-memory models.
//!
//! - [`config`]: the key → shard hash ([`shard_of`]), the default and
//!   maximum shard counts, [`ShardConfig`] with its queries and
//!   [`ShardConfig::validate`].
//! - [`rebalance`](mod@rebalance): [`join`], [`leave`], [`move_shard`] and [`rebalance()`],
//!   each returning the next config (`num + 1`), by a deterministic, even,
//!   minimal-movement rule; [`moves`] lists what changes between two
//!   configs.
//! - [`ctrler`]: the [`Controller`] runtime (lab 5's `shardctrler`):
//!   [`Controller::init_config`], [`Controller::query`],
//!   [`Controller::change_config_to`] (claim NEXT, Freeze / Install /
//!   Delete or Create per moved shard, publish CURRENT) and
//!   [`Controller::init_controller`] (finish a pending change), over a
//!   [`ConfigStore`] (the controller group) and a [`ShardMover`] (the
//!   replica groups), safe against crashed and stale controllers.
//!
//! # Example
//! ```
//! use std::collections::BTreeMap;
//! use shoal_shard::controller::{join, leave, moves, ShardConfig};
//!
//! let initial = ShardConfig::initial(12).unwrap();
//! let one = join(&initial, BTreeMap::from([(1, vec![1, 2, 3])])).unwrap();
//! assert_eq!((one.num, one.shards_of(1).len()), (1, 12));
//! let two = join(&one, BTreeMap::from([(2, vec![4, 5, 6])])).unwrap();
//! assert_eq!(moves(&one, &two).len(), 6); // half the shards, all to group 2
//! let back = leave(&two, &[1]).unwrap();
//! assert_eq!(back.shards_of(2).len(), 12);
//! let shard = back.shard_of_key(b"user:42");
//! assert_eq!(back.group_of(shard), Some(2));
//! ```

pub mod config;
pub mod ctrler;
pub mod rebalance;
pub mod remote;

#[cfg(test)]
mod tests;

pub use config::{
    shard_of, ConfigError, ShardConfig, GROUPS_MAX, GROUP_MEMBERS_MAX, GROUP_UNASSIGNED,
    SHARDS_DEFAULT, SHARDS_MAX,
};
pub use ctrler::{
    decode_config, encode_config, BoxError, ChangeError, ChangeOutcome, ConfigKey, ConfigStore,
    Controller, ControllerConfig, ControllerConfigError, DecodeError, FreezeOutcome, GroupRef,
    InitError, InitOutcome, MoveError, PutOutcome, QueryError, RecoverError, RecoverOutcome,
    ShardMover, Step, StepOutcome, StoreError, TransitionError, CONFIG_FORMAT_V1,
    CONFIG_RECORD_BYTES_MAX, CURRENT_CONFIG_KEY, MOVES_CONCURRENT_MAX, NEXT_CONFIG_KEY,
};
pub use rebalance::{
    join, leave, move_shard, moves, rebalance, set_members, RebalanceError, ShardMove,
};
pub use remote::{GroupStore, RpcMover, StepError};
