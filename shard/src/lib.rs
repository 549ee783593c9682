//! Shoal's node runtime, KV service and client.
//!
//! # Layout
//! - [`protocol`]: [`protocol::KvProtocol`], what nodes and clients send
//!   over `shoal-net`: group-tagged consensus messages, KV requests and
//!   responses, the status RPC and the admin fault-filter RPCs.
//! - [`node`]: the node runtime — one event loop per node driving every Raft
//!   group on it (ticks, the `Ready` loop with one synced log write per round
//!   for all groups, apply, waking callers, ReadIndex reads, shutdown).
//! - [`client`]: the async KV [`client::Client`] (leader cache, retries with
//!   capped backoff within a deadline, exactly-once sessions, input pins)
//!   and its blocking wrapper.
//! - [`controller`]: sharding — the key → shard hash,
//!   [`controller::ShardConfig`] (number, shard → group, group → members),
//!   the deterministic, even, minimal-movement `join` / `leave` /
//!   `move_shard` / `rebalance` that produce the next config, and the
//!   [`controller::Controller`] runtime that installs each config on the
//!   groups (generic over its store and mover seams).
//! - [`mapreduce`]: the pure core of MapReduce over stored keys (issue 12):
//!   the app trait and built-in apps, planning (shard-aligned splits, the
//!   partition hash, validation), the coordinator's task table as a state
//!   machine driven by explicit time, and the worker's map/reduce steps.
//! - [`linearizability`]: a Wing & Gong / porcupine-style checker for KV
//!   histories, used by the tests.
//!
//! # Example
//! Three nodes on the in-memory network and engine, and a client:
//!
//! ```
//! use shoal_engine::{EngineConfig, MemStore};
//! use shoal_net::mem::{MemConfig, MemNetwork};
//! use shoal_net::NodeId;
//! use shoal_shard::{Client, ClientConfig, ClientError, KvProtocol, Node, NodeConfig};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
//! let net = MemNetwork::<KvProtocol>::new(MemConfig::with_seed(1));
//! let mut nodes = Vec::new();
//! for id in 1..=3 {
//!     let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
//!     let (transport, inbox) = net.add_node(NodeId(id));
//!     let mut config = NodeConfig::new(id, vec![1, 2, 3], std::env::temp_dir().join("shoal-doc"));
//!     config.blocking_io = false; // the in-memory engine never blocks
//!     nodes.push(Node::start(config, engine, transport, inbox).unwrap());
//! }
//! let servers = vec![NodeId(1), NodeId(2), NodeId(3)];
//! let client = Client::new(net.add_client("example"), servers, ClientConfig::new(7));
//! assert_eq!(client.put_if_version("k", "v", 0).await, Ok(1));
//! assert_eq!(client.get("k").await.unwrap().value, "v");
//! assert_eq!(client.put_if_version("k", "w", 0).await, Err(ClientError::VersionMismatch { current: 1 }));
//! for node in nodes {
//!     node.shutdown().await.unwrap();
//! }
//! # });
//! ```

pub mod client;
pub mod controller;
pub mod linearizability;
pub mod mapreduce;
pub mod node;
pub mod protocol;

pub use client::{
    AdminError, BlockingClient, Client, ClientConfig, ClientError, PinnedShard, Scanner, ShardPin,
    WriteBatch,
};
pub use node::{GroupSpec, Node, NodeConfig, NodeError, NodeHandle};
pub use protocol::{
    Denied, GroupReport, KvProtocol, KvRequest, KvResponse, NodeReport, PeerMessage, PinInfo,
    PinnedShardInfo, Request, Response,
};
