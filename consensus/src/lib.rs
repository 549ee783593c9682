//! Raft consensus core for Shoal: a pure state machine with no I/O.
//!
//! The core does no I/O, reads no clock, starts no thread and uses no
//! global random number generator: time is [`RawNode::tick`], randomness
//! comes from [`Config::seed`], persistence and transport are the caller's
//! job, driven by [`Ready`].
//!
//! # Layout
//! - [`types`]: entries, hard state, membership, snapshots.
//! - [`storage`]: the read-side [`Storage`] trait the core reads the log through.
//! - [`config`]: [`Config`], its limits and [`Config::validate`]; the tick length.
//! - [`message`]: [`Message`] and [`MessageBody`], the wire vocabulary.
//! - [`raw_node`]: [`RawNode`] (the state machine), [`Ready`], [`ReadState`].
//! - [`progress`]: the leader's per-follower flow control.
//! - [`mem_storage`]: [`MemStorage`], an in-memory [`Storage`].
//! - [`error`]: the [`Error`] enum every fallible call returns.
//! - `sim` (cargo feature `sim`): the deterministic cluster simulator used by
//!   this crate's tests and reusable by other crates' tests.
//!
//! # Example
//!
//! ```
//! use shoal_consensus::{Config, MemStorage, RawNode};
//!
//! let mut node = RawNode::new(Config::new(1, vec![1]), MemStorage::new()).unwrap();
//! // A single voter elects itself after an election timeout.
//! while !node.is_leader() {
//!     node.tick().unwrap();
//! }
//! let index = node.propose(bytes::Bytes::from_static(b"hello")).unwrap();
//! let mut applied = Vec::new();
//! while node.has_ready() {
//!     let ready = node.ready().unwrap();
//!     node.storage_mut().persist_ready(&ready).unwrap();
//!     // send ready.messages and ready.persisted_messages to peers here
//!     applied.extend(ready.committed_entries.iter().map(|e| e.index));
//!     node.advance(ready).unwrap();
//! }
//! assert!(applied.contains(&index));
//! ```

pub mod config;
pub mod error;
mod log;
pub mod mem_storage;
pub mod message;
pub mod progress;
pub mod raw_node;
#[cfg(feature = "sim")]
pub mod sim;
pub mod storage;
pub mod types;

pub use config::{Config, ConfigError};
pub use error::{ConfChangeError, Error};
pub use mem_storage::MemStorage;
pub use message::{Message, MessageBody};
pub use progress::{Progress, ProgressState};
pub use raw_node::{next_conf, RawNode, ReadState, Ready, Role, SoftState};
pub use storage::{Storage, StorageError};
pub use types::*;
