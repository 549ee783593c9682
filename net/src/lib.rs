//! Shoal's network layer: QUIC with mutual TLS between nodes and clients,
//! and an in-memory twin with a lab-style fault model for tests.
//!
//! # Layout
//!
//! - [`Protocol`]: the bundle of serde types carried (peer message, RPC
//!   request and response, bulk file metadata). The crate is generic over it.
//! - [`Transport`] (a node's side: fire-and-forget peer messages, bulk files)
//!   and [`RpcCaller`] (request/response, used by clients and nodes). Both are
//!   implemented by [`quic::QuicNode`] / [`quic::QuicClient`] and by
//!   [`mem::MemNode`] / [`mem::MemClient`].
//! - [`Inbox`]: the receiving side of a node, the same type for both
//!   transports: channels of peer messages, incoming RPCs (each with a
//!   [`Responder`]) and verified received files.
//! - [`certs`]: cluster CA, node and client certificates (rcgen), rustls configs.
//! - [`frame`]: length-prefixed frames and batch records.
//! - [`config`]: [`Limits`] (named, unit-suffixed, checked by `validate()`) and
//!   [`NodeConfig`].
//! - [`mem`]: [`mem::MemNetwork`], seeded faults (delay, drops, long
//!   reordering, disconnect, partition, heal), works on tokio's paused clock.
//! - [`error`]: one error enum per area.
//! - [`metrics`]: the series the QUIC transport records (drops by reason,
//!   malformed input, refused connections) through the `metrics` facade.
//!
//! Wire format: ALPN [`config::ALPN`] (`shoal/8`) is the version. Every stream
//! starts with one kind byte. Peer messages travel on one long-lived
//! unidirectional stream per connection, which opens with a hello naming the
//! sender's node id (checked against its certificate) and then carries frames,
//! each a batch of `u32`-length-prefixed postcard records. RPCs and bulk files
//! use one bidirectional stream each.
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use shoal_net::mem::{MemConfig, MemNetwork};
//! use shoal_net::{NodeId, Peer, Protocol, RpcCaller, Transport};
//!
//! struct Kv;
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Ping(u64);
//! impl Protocol for Kv {
//!     type Message = Ping;
//!     type Request = String;
//!     type Response = String;
//!     type FileMeta = u64;
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
//! let net = MemNetwork::<Kv>::new(MemConfig::with_seed(7));
//! let (a, _a_inbox) = net.add_node(NodeId(1));
//! let (_b, mut b_inbox) = net.add_node(NodeId(2));
//! a.send(NodeId(2), Ping(1));
//! assert_eq!(b_inbox.messages.recv().await, Some((NodeId(1), Ping(1))));
//!
//! // A node serves RPCs from its inbox; a client calls it.
//! tokio::spawn(async move {
//!     while let Some(rpc) = b_inbox.rpcs.recv().await {
//!         assert_eq!(rpc.from, Peer::Client("alice".into()));
//!         let answer = format!("hello {}", rpc.request);
//!         rpc.reply.send(answer);
//!     }
//! });
//! let client = net.add_client("alice");
//! assert_eq!(client.call(NodeId(2), "you".to_string()).await.unwrap(), "hello you");
//! net.partition(&[&[NodeId(1)], &[NodeId(2)]]);
//! net.heal();
//! # });
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub mod certs;
pub mod config;
pub mod error;
pub mod frame;
pub mod mem;
pub mod metrics;
pub mod quic;

mod bulk;

pub use config::{Limits, NodeConfig};
pub use error::{
    BulkError, CertError, ConfigError, FaultFilterError, FrameError, RpcError, SetupError,
};

/// A node's id in the cluster; it is also the name in its certificate (`node-<id>.shoal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

/// The authenticated identity of the other side of a connection, read from
/// its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A cluster node.
    Node(NodeId),
    /// A client, by the name in its certificate (`client-<name>.shoal`).
    Client(String),
}

/// Client name whose certificate authorizes admin calls (e.g. setting the
/// fault filter through the node runtime's admin RPC).
pub const ADMIN_CLIENT_NAME: &str = "admin";

impl Peer {
    /// Whether this is the admin client (`client-admin.shoal`). Only the
    /// cluster CA can issue that certificate, so this is an authenticated check.
    pub fn is_admin(&self) -> bool {
        matches!(self, Peer::Client(name) if name == ADMIN_CLIENT_NAME)
    }
}

/// The serde types one deployment of the transport carries.
pub trait Protocol: Send + Sync + 'static {
    /// Fire-and-forget message between nodes (e.g. a Raft message).
    type Message: Serialize + DeserializeOwned + Send + 'static;
    /// RPC request (client -> node, or node -> node).
    type Request: Serialize + DeserializeOwned + Send + 'static;
    /// RPC response.
    type Response: Serialize + DeserializeOwned + Send + 'static;
    /// Metadata sent with a bulk file (e.g. shard id, snapshot index, part number).
    type FileMeta: Serialize + DeserializeOwned + Send + 'static;

    /// Whether the receiving node must say a file with `meta` is stored
    /// ([`ReceivedFile::ack`], [`FileAck::stored`]) before the sender's
    /// `send_file` resolves: for a file the sender then counts on (it
    /// reports the file delivered to others), so that a crash of the
    /// receiver between the transfer and storing the file cannot lose a
    /// file the sender was told is there. Default: no, the file counts as
    /// delivered once it is handed to the receiver's inbox.
    fn file_needs_ack(meta: &Self::FileMeta) -> bool {
        let _ = meta;
        false
    }
}

/// Longest a sender waits for the receiver's [`FileAck`] of a file that
/// needs one ([`Protocol::file_needs_ack`]), on top of the transfer.
pub const FILE_ACK_WAIT_MS_MAX: u64 = 60_000;

/// The receiver's word on a [`ReceivedFile`] whose protocol asks for one
/// ([`Protocol::file_needs_ack`]): `send_file` resolves with it. Dropped
/// without a word, the transfer fails (the sender sends again).
#[derive(Debug, Default)]
pub struct FileAck(Option<oneshot::Sender<Result<(), String>>>);

impl FileAck {
    /// The acknowledgement of a file received with `meta`, and what the
    /// sender's side waits on if `P` asks for one
    /// ([`Protocol::file_needs_ack`]). (`FileAck::default()` expects none:
    /// the stand-in left when one is taken out of a [`ReceivedFile`].)
    pub(crate) fn for_file<P: Protocol>(
        meta: &P::FileMeta,
    ) -> (Self, Option<oneshot::Receiver<Result<(), String>>>) {
        if !P::file_needs_ack(meta) {
            return (FileAck::default(), None);
        }
        let (tx, rx) = oneshot::channel();
        (FileAck(Some(tx)), Some(rx))
    }

    /// Whether the sender waits for this acknowledgement.
    pub fn expected(&self) -> bool {
        self.0.is_some()
    }

    /// The file is stored for good (e.g. moved and synced where it is
    /// used): the sender's `send_file` succeeds.
    pub fn stored(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Ok(()));
        }
    }

    /// The file could not be stored: the sender's `send_file` fails with
    /// `reason`.
    pub fn failed(mut self, reason: String) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err(reason));
        }
    }
}

/// Waits for a receiver's acknowledgement of a file (see [`FileAck`]).
pub(crate) async fn wait_file_ack(
    ack: oneshot::Receiver<Result<(), String>>,
) -> Result<(), String> {
    match tokio::time::timeout(std::time::Duration::from_millis(FILE_ACK_WAIT_MS_MAX), ack).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(_)) => Err("the receiver dropped the file before storing it".into()),
        Err(_) => Err(format!(
            "the receiver did not store the file within {FILE_ACK_WAIT_MS_MAX} ms"
        )),
    }
}

/// Replies to one incoming RPC. Dropping it without replying makes the
/// caller's call fail with [`RpcError::Lost`].
#[derive(Debug)]
pub struct Responder<R>(oneshot::Sender<R>);

impl<R> Responder<R> {
    /// Sends the response. Returns false if the caller is gone (deadline, fault).
    pub fn send(self, response: R) -> bool {
        self.0.send(response).is_ok()
    }

    pub(crate) fn new() -> (Self, oneshot::Receiver<R>) {
        let (tx, rx) = oneshot::channel();
        (Responder(tx), rx)
    }
}

/// One incoming RPC, handed to the node through [`Inbox::rpcs`].
pub struct IncomingRpc<P: Protocol> {
    /// Who called, from its certificate (or the in-memory network's naming).
    pub from: Peer,
    /// The request.
    pub request: P::Request,
    /// Where to send the response.
    pub reply: Responder<P::Response>,
}

impl<P: Protocol> std::fmt::Debug for IncomingRpc<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingRpc")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// A bulk file that arrived complete and verified (chunk and whole-file CRC32,
/// length). It has been renamed to its final `path` in the node's files
/// directory; the receiver owns it now (move or delete it).
#[derive(Debug)]
pub struct ReceivedFile<Meta> {
    /// Sending node.
    pub from: NodeId,
    /// Final path of the verified file.
    pub path: PathBuf,
    /// Metadata given by the sender.
    pub meta: Meta,
    /// File length.
    pub bytes: u64,
    /// Where the receiver says the file is stored, if its protocol asks
    /// for it ([`Protocol::file_needs_ack`]).
    pub ack: FileAck,
}

/// The receiving side of a node: the same type for the QUIC and the in-memory
/// transports. Each channel is bounded by `Limits::inbox_capacity`.
pub struct Inbox<P: Protocol> {
    /// Peer messages, with the sending node.
    pub messages: mpsc::Receiver<(NodeId, P::Message)>,
    /// RPCs from clients and nodes.
    pub rpcs: mpsc::Receiver<IncomingRpc<P>>,
    /// Verified bulk files.
    pub files: mpsc::Receiver<ReceivedFile<P::FileMeta>>,
}

impl<P: Protocol> std::fmt::Debug for Inbox<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

pub(crate) struct InboxSenders<P: Protocol> {
    pub(crate) messages: mpsc::Sender<(NodeId, P::Message)>,
    pub(crate) rpcs: mpsc::Sender<IncomingRpc<P>>,
    pub(crate) files: mpsc::Sender<ReceivedFile<P::FileMeta>>,
}

impl<P: Protocol> Clone for InboxSenders<P> {
    fn clone(&self) -> Self {
        InboxSenders {
            messages: self.messages.clone(),
            rpcs: self.rpcs.clone(),
            files: self.files.clone(),
        }
    }
}

pub(crate) fn inbox<P: Protocol>(capacity: usize) -> (InboxSenders<P>, Inbox<P>) {
    let (mt, mr) = mpsc::channel(capacity);
    let (rt, rr) = mpsc::channel(capacity);
    let (ft, fr) = mpsc::channel(capacity.min(1024));
    (
        InboxSenders {
            messages: mt,
            rpcs: rt,
            files: ft,
        },
        Inbox {
            messages: mr,
            rpcs: rr,
            files: fr,
        },
    )
}

/// Request/response calls to a node. Implemented by nodes and clients of both
/// transports; handles are cheap to clone and share one endpoint.
pub trait RpcCaller<P: Protocol>: Clone + Send + Sync + 'static {
    /// Calls `to` and waits for its response, at most `deadline`.
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> impl Future<Output = Result<P::Response, RpcError>> + Send;

    /// The deadline [`RpcCaller::call`] uses (`Limits::rpc_deadline_ms`).
    fn default_deadline(&self) -> Duration;

    /// Calls `to` with the default deadline.
    fn call(
        &self,
        to: NodeId,
        request: P::Request,
    ) -> impl Future<Output = Result<P::Response, RpcError>> + Send {
        let deadline = self.default_deadline();
        self.call_with_deadline(to, request, deadline)
    }
}

/// A node's sending side. Receiving is through the [`Inbox`] returned when the
/// node was created.
pub trait Transport<P: Protocol>: RpcCaller<P> {
    /// This node's id.
    fn local_id(&self) -> NodeId;

    /// Queues `message` for `to` and returns at once; it never blocks. Delivery
    /// is best effort: messages can be dropped (full queue: the oldest goes,
    /// counted; unknown peer; link down; injected fault) and the protocol above
    /// must tolerate that, as Raft does.
    fn send(&self, to: NodeId, message: P::Message);

    /// Streams the file at `path` to `to` in checksummed chunks, with bounded
    /// memory. Resolves when the receiver has verified and renamed it.
    fn send_file(
        &self,
        to: NodeId,
        path: PathBuf,
        meta: P::FileMeta,
    ) -> impl Future<Output = Result<u64, BulkError>> + Send;

    /// A snapshot of this node's counters.
    fn stats(&self) -> Stats;

    /// Adds a member's address unless this node knows one already (from
    /// its peer list or an earlier call): an address heard second-hand (a
    /// caller's view of the cluster) never replaces one the node uses. The
    /// default does nothing, as for [`Transport::set_member_addr`].
    fn add_member_addr_if_unknown(&self, id: NodeId, addr: std::net::SocketAddr) {
        let _ = (id, addr);
    }

    /// Adds a member that joined at runtime, or changes a member's address.
    /// A transport whose peers need no address (the in-memory one) ignores
    /// it, which is the default.
    fn set_member_addr(&self, id: NodeId, addr: std::net::SocketAddr) {
        let _ = (id, addr);
    }

    /// Test and admin hook: drops all traffic between this node and
    /// `blocked` (messages, RPCs, files, both directions), as a partition
    /// would; replaces the previous set. Clients are never blocked. Refused
    /// unless the transport enables fault injection; the node runtime
    /// exposes it only through its authenticated admin RPC. The default
    /// implementation has no filter.
    fn set_fault_filter(&self, blocked: &[NodeId]) -> Result<(), FaultFilterError> {
        let _ = blocked;
        Err(FaultFilterError::Unsupported)
    }

    /// Removes the fault filter (same conditions as
    /// [`Transport::set_fault_filter`]).
    fn clear_fault_filter(&self) -> Result<(), FaultFilterError> {
        Err(FaultFilterError::Unsupported)
    }

    /// The peers the fault filter blocks now, sorted (empty: none).
    fn fault_filter(&self) -> Vec<NodeId> {
        Vec::new()
    }
}

/// Counters of one endpoint (monotonic since creation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handed to `send`.
    pub messages_sent: u64,
    /// Messages delivered into this node's inbox.
    pub messages_received: u64,
    /// Messages dropped because a peer queue was full (oldest dropped).
    pub messages_dropped_overflow: u64,
    /// Messages dropped for other reasons (unknown peer, oversized, connection
    /// lost with the message in flight, fault filter or injected fault, full
    /// in-memory inbox).
    pub messages_dropped_other: u64,
    /// Frames written on message streams.
    pub frames_sent: u64,
    /// RPCs handed to this node's inbox.
    pub rpcs_received: u64,
    /// RPCs served (a response was written).
    pub rpcs_served: u64,
    /// Malformed or oversized input from a peer (connection closed, logged).
    pub malformed_inputs: u64,
    /// Connections refused after the handshake (wrong id, not a member).
    pub connections_refused: u64,
    /// Bulk files received and verified.
    pub files_received: u64,
    /// Bulk files rejected (checksum, size, I/O).
    pub files_rejected: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) messages_sent: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) messages_dropped_overflow: AtomicU64,
    pub(crate) messages_dropped_other: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) rpcs_received: AtomicU64,
    pub(crate) rpcs_served: AtomicU64,
    pub(crate) malformed_inputs: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) files_received: AtomicU64,
    pub(crate) files_rejected: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            messages_sent: g(&self.messages_sent),
            messages_received: g(&self.messages_received),
            messages_dropped_overflow: g(&self.messages_dropped_overflow),
            messages_dropped_other: g(&self.messages_dropped_other),
            frames_sent: g(&self.frames_sent),
            rpcs_received: g(&self.rpcs_received),
            rpcs_served: g(&self.rpcs_served),
            malformed_inputs: g(&self.malformed_inputs),
            connections_refused: g(&self.connections_refused),
            files_received: g(&self.files_received),
            files_rejected: g(&self.files_rejected),
        }
    }
}
