//! The QUIC transport: [`QuicNode`] (a cluster member) and [`QuicClient`].
//!
//! Each node has one quinn endpoint and keeps one outbound connection per
//! peer, dialed lazily and reused for peer messages, RPCs and bulk files. A
//! pair of nodes thus shares two connections, one dialed by each side, which
//! avoids simultaneous-open races. A per-peer sender task drains the bounded
//! queue into batched frames and redials with capped exponential backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::certs::{self, Identity};
use crate::config::ALPN;
use crate::error::{BulkError, FaultFilterError, RpcError, SetupError};
use crate::frame::{push_record, read_frame, split_records, write_frame};
use crate::metrics::{self, DropReason};
use crate::{
    bump, inbox, Counters, Inbox, InboxSenders, IncomingRpc, Limits, NodeConfig, NodeId, Peer,
    Protocol, ReceivedFile, Responder, RpcCaller, Stats, Transport,
};

/// First byte of a unidirectional peer-message stream.
pub const KIND_MESSAGES: u8 = b'M';
/// First byte of an RPC bidirectional stream.
pub const KIND_RPC: u8 = b'R';
/// First byte of a bulk-file bidirectional stream.
pub const KIND_FILE: u8 = b'F';
/// Version byte in the message-stream hello (the ALPN carries the wire version too).
pub const HELLO_VERSION: u8 = 2;
/// Bytes of the message-stream hello: kind, version, node id (u64 BE),
/// incarnation (u64 BE, drawn at random each time a node starts).
pub const HELLO_BYTES: usize = 18;

/// At shutdown, a peer from which no datagram at all arrived for this long
/// is taken for dead (crashed, or cut off): its queue is given up instead of
/// waiting for acknowledgements that will never come. A live peer
/// acknowledges data within a round trip plus its ACK delay (25 ms), and a
/// handshake within a few round trips, so this is generous on a LAN.
pub const PEER_SILENCE_MS: u64 = 250;

/// After the endpoint is closed, how long shutdown lets it send its
/// CONNECTION_CLOSE frames before returning. Peers learn of the close from
/// the first of them; the draining period that follows (three probe
/// timeouts, seconds towards a dead peer) need not be waited out.
pub const CLOSE_LINGER_MS: u64 = 200;

/// Application close/reset codes.
pub mod codes {
    /// Clean shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// Identity refused (not a member, or the claimed id differs from the certificate).
    pub const REFUSED: u32 = 1;
    /// Malformed input.
    pub const PROTOCOL: u32 = 2;
    /// The handler gave no reply.
    pub const NO_REPLY: u32 = 3;
    /// The peer this connection was dialed to has restarted since.
    pub const PEER_RESTARTED: u32 = 4;
}

fn transport_config(limits: &Limits) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits.rpc_concurrency_max));
    t.max_concurrent_uni_streams(VarInt::from_u32(8));
    // Flow-control windows bound what one connection can buffer in memory
    // (receive: 2x the stream window per connection). Keeping data in flight
    // near the UDP receive buffer (`udp_socket_buffer_bytes`) limits drops at
    // the socket, which QUIC reads as congestion (and, for large packets, as
    // an MTU black hole that sends it back to 1200-byte packets for a while).
    let window = (limits.udp_socket_buffer_bytes / 2).clamp(256 << 10, 16 << 20) as u32;
    t.stream_receive_window(VarInt::from_u32(window));
    t.receive_window(VarInt::from_u32(window * 2));
    t.send_window(u64::from(window) * 2);
    let idle = Duration::from_millis(limits.io_timeout_ms);
    t.max_idle_timeout(idle.try_into().ok());
    t.keep_alive_interval(Some(idle / 4));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(limits.udp_payload_bytes_max);
    t.mtu_discovery_config(Some(mtu));
    t.initial_mtu(limits.udp_payload_bytes_min);
    t.min_mtu(limits.udp_payload_bytes_min);
    Arc::new(t)
}

/// The stateless reset key of a node's endpoint, derived from its private
/// key so that it is the same in every incarnation of the node.
///
/// Why: a client (or peer) whose connection reached a node process that was
/// SIGKILLed and restarted on the same address keeps sending on that
/// connection. The new process can end it at the first packet with a QUIC
/// stateless reset, but (1) quinn's default connection-id generator only
/// lets through ids signed with a random per-process key, so the new
/// process silently dropped its predecessor's packets, and (2) a caller
/// believes a reset only if its token matches the one the *old* process
/// handed out, an HMAC of the connection id under the endpoint's reset key,
/// random per process by default. So every caller waited for the idle
/// timeout (`io_timeout_ms`, 10 s) before it redialed: 10 s in which no
/// client reached a restarted node. With this key and [`RandomCids`] the
/// reset is sent and believed, and the next call dials the new process.
/// The key stays secret: an HMAC of a fixed label under the node's private
/// key.
fn stable_reset_key(identity: &Identity) -> Arc<dyn quinn::crypto::HmacKey> {
    use ring::hmac;
    let root = hmac::Key::new(hmac::HMAC_SHA256, identity.key_pem.as_bytes());
    let secret = hmac::sign(&root, b"shoal/1 QUIC stateless reset key");
    Arc::new(hmac::Key::new(hmac::HMAC_SHA256, secret.as_ref()))
}

/// Random 8-byte connection ids that a node accepts from any incarnation
/// (no per-process check), so a packet for a predecessor's connection is
/// answered with a stateless reset (see [`stable_reset_key`]). Resets are
/// rate-limited by quinn and never larger than the packet that caused them.
struct RandomCids;

impl RandomCids {
    const BYTES: usize = 8;
}

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let bytes: [u8; RandomCids::BYTES] = rand::random();
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        RandomCids::BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn endpoint(
    limits: &Limits,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: Option<Arc<dyn quinn::crypto::HmacKey>>,
) -> std::io::Result<Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    if let Some(key) = reset_key {
        config.reset_key(key);
        config.cid_generator(|| Box::new(RandomCids));
    }
    config
        .max_udp_payload_size(limits.udp_payload_bytes_max)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel caps the sizes, and a smaller buffer still works.
    if let Err(e) = socket.set_recv_buffer_size(limits.udp_socket_buffer_bytes) {
        debug!(error = %e, "could not set the UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(limits.udp_socket_buffer_bytes) {
        debug!(error = %e, "could not set the UDP send buffer size");
    }
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime found (call inside tokio)"))?;
    Endpoint::new(config, server, socket, runtime)
}

fn server_name(id: NodeId) -> String {
    certs::peer_dns_name(&Peer::Node(id))
}

/// The identity in the certificate the other side presented.
fn peer_of(conn: &Connection) -> Option<Peer> {
    let any = conn.peer_identity()?;
    let chain = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs::peer_from_cert_der(chain.first()?)
}

fn lost(e: impl std::fmt::Display) -> RpcError {
    RpcError::Lost(e.to_string())
}

/// What a node and a client share: the endpoint and the dialer.
struct Dialer {
    endpoint: Endpoint,
    addrs: RwLock<HashMap<NodeId, SocketAddr>>,
    conns: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
    limits: Limits,
    /// Paces this node's bulk sends ([`Limits::bulk_send_bytes_per_sec_max`]).
    pacer: crate::bulk::SendPacer,
    shutting_down: AtomicBool,
}

impl Dialer {
    /// Closes and forgets the connection dialed to `to` (it reached a
    /// process that has since died), so the next use dials afresh.
    async fn forget(&self, to: NodeId) {
        let slot = self.conns.lock().expect("conns lock").get(&to).cloned();
        if let Some(slot) = slot {
            if let Some(conn) = slot.lock().await.take() {
                conn.close(VarInt::from_u32(codes::PEER_RESTARTED), b"peer restarted");
            }
        }
    }

    /// The live connection to `to`, dialing (once at a time) if there is none.
    async fn connection(&self, to: NodeId) -> Result<Connection, RpcError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(RpcError::ShuttingDown);
        }
        let slot = self
            .conns
            .lock()
            .expect("conns lock")
            .entry(to)
            .or_default()
            .clone();
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let addr = self
            .addrs
            .read()
            .expect("addrs lock")
            .get(&to)
            .copied()
            .ok_or(RpcError::UnknownNode(to))?;
        let unreachable = |reason: String| RpcError::Unreachable { node: to, reason };
        let connecting = self
            .endpoint
            .connect(addr, &server_name(to))
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = timeout(self.limits.io_timeout(), connecting)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        debug!(peer = %to, %addr, "connected");
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn call<P: Protocol>(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> Result<P::Response, RpcError> {
        let body = postcard::to_stdvec(&request).map_err(|e| RpcError::Codec(e.to_string()))?;
        if body.len() > self.limits.max_frame_bytes {
            return Err(RpcError::Codec(format!(
                "request of {} bytes exceeds max_frame_bytes {}",
                body.len(),
                self.limits.max_frame_bytes
            )));
        }
        let exchange = async {
            let conn = self.connection(to).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
            let mut wire = Vec::with_capacity(body.len() + 5);
            wire.push(KIND_RPC);
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(&body);
            send.write_all(&wire).await.map_err(lost)?;
            let _ = send.finish();
            let mut buf = Vec::new();
            match read_frame(&mut recv, &mut buf, self.limits.max_frame_bytes).await {
                Ok(true) => postcard::from_bytes(&buf).map_err(|e| RpcError::Codec(e.to_string())),
                Ok(false) => Err(RpcError::Lost("stream closed without a reply".into())),
                Err(e) => Err(lost(e)),
            }
        };
        timeout(deadline, exchange)
            .await
            .map_err(|_| RpcError::Timeout)?
    }

    async fn send_file<P: Protocol>(
        &self,
        to: NodeId,
        path: PathBuf,
        meta: P::FileMeta,
    ) -> Result<u64, BulkError> {
        let conn = self.connection(to).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
        send.write_all(&[KIND_FILE]).await.map_err(lost)?;
        let bytes =
            crate::bulk::send_file(&mut send, &path, meta, &self.limits, &self.pacer).await?;
        let _ = send.finish();
        let mut buf = Vec::new();
        let verdict = timeout(
            self.limits.io_timeout(),
            read_frame(&mut recv, &mut buf, self.limits.max_frame_bytes),
        )
        .await
        .map_err(|_| RpcError::Timeout)?;
        match verdict {
            Ok(true) => {}
            Ok(false) => {
                return Err(BulkError::Transport(RpcError::Lost(
                    "no verdict from receiver".into(),
                )))
            }
            Err(e) => return Err(BulkError::Transport(lost(e))),
        }
        let verdict: Result<(), String> =
            postcard::from_bytes(&buf).map_err(|e| RpcError::Codec(e.to_string()))?;
        verdict.map_err(BulkError::Rejected)?;
        Ok(bytes)
    }
}

struct PeerLink {
    queue: Mutex<VecDeque<Vec<u8>>>,
    notify: Notify,
}

struct NodeInner<P: Protocol> {
    id: NodeId,
    /// Random per start of this node; sent in every hello so peers notice a
    /// restart at once (see [`read_messages`]).
    incarnation: u64,
    /// The incarnation each peer last announced.
    peer_incarnations: Mutex<HashMap<NodeId, u64>>,
    config: NodeConfig,
    dialer: Dialer,
    counters: Counters,
    links: RwLock<HashMap<NodeId, Arc<PeerLink>>>,
    inbox: InboxSenders<P>,
    blocked: RwLock<HashSet<NodeId>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    in_flight: AtomicUsize,
    in_flight_done: Notify,
    shutdown: watch::Sender<bool>,
}

impl<P: Protocol> NodeInner<P> {
    fn is_blocked(&self, peer: NodeId) -> bool {
        self.blocked.read().expect("blocked lock").contains(&peer)
    }

    fn is_member(&self, peer: NodeId) -> bool {
        self.dialer
            .addrs
            .read()
            .expect("addrs lock")
            .contains_key(&peer)
    }
}

/// A cluster node on QUIC. Cheap to clone (all clones share the endpoint).
/// Call [`QuicNode::shutdown`] to stop it; dropping the handles does not.
pub struct QuicNode<P: Protocol> {
    inner: Arc<NodeInner<P>>,
}

impl<P: Protocol> Clone for QuicNode<P> {
    fn clone(&self) -> Self {
        QuicNode {
            inner: self.inner.clone(),
        }
    }
}

impl<P: Protocol> std::fmt::Debug for QuicNode<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicNode")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

struct InFlight<'a>(&'a AtomicUsize, &'a Notify);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.notify_waiters();
        }
    }
}

impl<P: Protocol> QuicNode<P> {
    /// Binds the endpoint and starts accepting. `identity` must be a node
    /// certificate for `config.id` issued by the cluster CA. Must be called
    /// inside a tokio runtime.
    pub fn bind(config: NodeConfig, identity: &Identity) -> Result<(Self, Inbox<P>), SetupError> {
        config.validate()?;
        if identity.peer() != Some(Peer::Node(config.id)) {
            return Err(SetupError::Config(crate::ConfigError {
                field: "id",
                reason: format!("certificate names {:?}, not {}", identity.peer(), config.id),
            }));
        }
        std::fs::create_dir_all(&config.files_dir)?;
        let transport = transport_config(&config.limits);
        let server = certs::server_config(identity, transport.clone())?;
        let client = certs::client_config(identity, &[ALPN], transport)?;
        let mut endpoint = endpoint(
            &config.limits,
            config.listen_addr,
            Some(server),
            Some(stable_reset_key(identity)),
        )?;
        endpoint.set_default_client_config(client);
        let (senders, inbox) = inbox::<P>(config.limits.inbox_capacity);
        let mut members = config.members.clone();
        members.remove(&config.id);
        let inner = Arc::new(NodeInner {
            id: config.id,
            incarnation: rand::random(),
            peer_incarnations: Mutex::new(HashMap::new()),
            dialer: Dialer {
                endpoint,
                addrs: RwLock::new(members.clone()),
                conns: Mutex::new(HashMap::new()),
                limits: config.limits.clone(),
                pacer: crate::bulk::SendPacer::new(&config.limits),
                shutting_down: AtomicBool::new(false),
            },
            config,
            counters: Counters::default(),
            links: RwLock::new(HashMap::new()),
            inbox: senders,
            blocked: RwLock::new(HashSet::new()),
            tasks: Mutex::new(Vec::new()),
            accept_task: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            in_flight_done: Notify::new(),
            shutdown: watch::channel(false).0,
        });
        let node = QuicNode { inner };
        for (id, _) in members {
            node.add_link(id);
        }
        let accept = tokio::spawn(accept_loop(node.inner.clone()));
        *node.inner.accept_task.lock().expect("accept lock") = Some(accept);
        info!(node = %node.inner.id, addr = ?node.local_addr().ok(), "QUIC node listening");
        Ok((node, inbox))
    }

    fn add_link(&self, id: NodeId) {
        let link = Arc::new(PeerLink {
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
        });
        let mut links = self.inner.links.write().expect("links lock");
        if links.contains_key(&id) {
            return;
        }
        links.insert(id, link.clone());
        let task = tokio::spawn(run_sender(self.inner.clone(), id, link));
        self.inner.tasks.lock().expect("tasks lock").push(task);
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.dialer.endpoint.local_addr()
    }

    /// Messages waiting in the outbound queue to `peer` (at most
    /// `Limits::peer_queue_messages_max`).
    pub fn queued_messages(&self, peer: NodeId) -> usize {
        let links = self.inner.links.read().expect("links lock");
        links
            .get(&peer)
            .map_or(0, |l| l.queue.lock().expect("queue lock").len())
    }

    /// Statistics (RTT, path MTU, congestion window, losses) of the live
    /// outbound connection to `peer`, if there is one.
    pub fn connection_stats(&self, peer: NodeId) -> Option<quinn::ConnectionStats> {
        let slot = self
            .inner
            .dialer
            .conns
            .lock()
            .expect("conns lock")
            .get(&peer)
            .cloned()?;
        let guard = slot.try_lock().ok()?;
        guard
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .map(|c| c.stats())
    }

    /// Adds a member or changes its address (e.g. after it restarted elsewhere).
    pub fn set_member(&self, id: NodeId, addr: SocketAddr) {
        if id == self.inner.id {
            return;
        }
        self.inner
            .dialer
            .addrs
            .write()
            .expect("addrs lock")
            .insert(id, addr);
        self.add_link(id);
    }

    /// Clean shutdown: refuse new connections, flush the peer queues (each
    /// sender waits until the peer acknowledged its stream), let accepted RPCs
    /// finish, then close the endpoint.
    ///
    /// Bounded and prompt: all of it takes at most
    /// `Limits::shutdown_drain_ms` plus [`CLOSE_LINGER_MS`]. A peer that is
    /// not connected is dialed for at most [`PEER_SILENCE_MS`], and a
    /// connected peer that stays silent that long is given up, so dead or
    /// unreachable peers cost a fraction of a second, not the handshake or
    /// idle timeout. Senders still running at the bound are aborted and
    /// their messages lost (messages are best effort anyway).
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(inner.config.limits.shutdown_drain_ms);
        inner.dialer.endpoint.set_server_config(None);
        let _ = inner.shutdown.send(true);
        let mut tasks = std::mem::take(&mut *inner.tasks.lock().expect("tasks lock"));
        let _ = timeout_at(deadline, async {
            for task in &mut tasks {
                let _ = task.await;
            }
        })
        .await;
        for task in &tasks {
            if !task.is_finished() {
                debug!(node = %inner.id, "a peer sender outlived the shutdown drain; aborted");
                task.abort();
            }
        }
        let _ = timeout_at(deadline, async {
            loop {
                let done = inner.in_flight_done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if inner.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                done.await;
            }
        })
        .await;
        inner.dialer.shutting_down.store(true, Ordering::Relaxed);
        inner
            .dialer
            .endpoint
            .close(VarInt::from_u32(codes::SHUTDOWN), b"shutdown");
        if let Some(task) = inner.accept_task.lock().expect("accept lock").take() {
            task.abort();
        }
        let linger = Duration::from_millis(CLOSE_LINGER_MS);
        let _ = timeout(linger, inner.dialer.endpoint.wait_idle()).await;
        info!(node = %inner.id, "QUIC node stopped");
    }
}

impl<P: Protocol> RpcCaller<P> for QuicNode<P> {
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> impl std::future::Future<Output = Result<P::Response, RpcError>> + Send {
        let inner = self.inner.clone();
        async move {
            if inner.is_blocked(to) {
                return Err(RpcError::Unreachable {
                    node: to,
                    reason: "fault filter".into(),
                });
            }
            inner.dialer.call::<P>(to, request, deadline).await
        }
    }

    fn default_deadline(&self) -> Duration {
        self.inner.config.limits.rpc_deadline()
    }
}

impl<P: Protocol> Transport<P> for QuicNode<P> {
    fn local_id(&self) -> NodeId {
        self.inner.id
    }

    fn set_member_addr(&self, id: NodeId, addr: SocketAddr) {
        self.set_member(id, addr);
    }

    fn add_member_addr_if_unknown(&self, id: NodeId, addr: SocketAddr) {
        let known = self
            .inner
            .dialer
            .addrs
            .read()
            .expect("addrs lock")
            .contains_key(&id);
        if !known {
            self.set_member(id, addr);
        }
    }

    fn set_fault_filter(&self, blocked: &[NodeId]) -> Result<(), FaultFilterError> {
        if !self.inner.config.fault_injection_enabled {
            return Err(FaultFilterError::Disabled);
        }
        let set: HashSet<NodeId> = blocked.iter().copied().collect();
        warn!(node = %self.inner.id, blocked = ?set, "fault filter set");
        *self.inner.blocked.write().expect("blocked lock") = set;
        Ok(())
    }

    fn clear_fault_filter(&self) -> Result<(), FaultFilterError> {
        if !self.inner.config.fault_injection_enabled {
            return Err(FaultFilterError::Disabled);
        }
        warn!(node = %self.inner.id, "fault filter cleared");
        self.inner.blocked.write().expect("blocked lock").clear();
        Ok(())
    }

    fn fault_filter(&self) -> Vec<NodeId> {
        let mut blocked: Vec<NodeId> = self
            .inner
            .blocked
            .read()
            .expect("blocked lock")
            .iter()
            .copied()
            .collect();
        blocked.sort();
        blocked
    }

    fn send(&self, to: NodeId, message: P::Message) {
        let inner = &self.inner;
        bump(&inner.counters.messages_sent);
        let link = inner.links.read().expect("links lock").get(&to).cloned();
        let Some(link) = link else {
            debug!(node = %inner.id, peer = %to, "message to unknown peer dropped");
            bump(&inner.counters.messages_dropped_other);
            metrics::dropped(DropReason::UnknownPeer, 1);
            return;
        };
        if inner.dialer.shutting_down.load(Ordering::Relaxed) || *inner.shutdown.borrow() {
            bump(&inner.counters.messages_dropped_other);
            metrics::dropped(DropReason::Shutdown, 1);
            return;
        }
        let bytes = match postcard::to_stdvec(&message) {
            Ok(bytes) if bytes.len() + 4 <= inner.config.limits.max_frame_bytes => bytes,
            Ok(bytes) => {
                warn!(node = %inner.id, peer = %to, bytes = bytes.len(), "message larger than max_frame_bytes dropped");
                bump(&inner.counters.messages_dropped_other);
                metrics::dropped(DropReason::TooLarge, 1);
                return;
            }
            Err(e) => {
                warn!(node = %inner.id, peer = %to, error = %e, "message failed to encode; dropped");
                bump(&inner.counters.messages_dropped_other);
                metrics::dropped(DropReason::Unencodable, 1);
                return;
            }
        };
        {
            let mut queue = link.queue.lock().expect("queue lock");
            if queue.len() >= inner.config.limits.peer_queue_messages_max {
                queue.pop_front();
                bump(&inner.counters.messages_dropped_overflow);
                metrics::dropped(DropReason::QueueFull, 1);
            }
            queue.push_back(bytes);
        }
        link.notify.notify_one();
    }

    fn send_file(
        &self,
        to: NodeId,
        path: PathBuf,
        meta: P::FileMeta,
    ) -> impl std::future::Future<Output = Result<u64, BulkError>> + Send {
        let inner = self.inner.clone();
        async move {
            if inner.is_blocked(to) {
                return Err(BulkError::Transport(RpcError::Unreachable {
                    node: to,
                    reason: "fault filter".into(),
                }));
            }
            inner.dialer.send_file::<P>(to, path, meta).await
        }
    }

    fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }
}

/// Drains one peer's queue into batched frames on a unidirectional stream,
/// redialing with capped exponential backoff.
async fn run_sender<P: Protocol>(inner: Arc<NodeInner<P>>, to: NodeId, link: Arc<PeerLink>) {
    let limits = inner.config.limits.clone();
    let mut shutdown = inner.shutdown.subscribe();
    let backoff_min = Duration::from_millis(limits.reconnect_backoff_min_ms);
    let backoff_max = Duration::from_millis(limits.reconnect_backoff_max_ms);
    let mut backoff = backoff_min;
    let mut body = Vec::with_capacity(limits.batch_bytes_max + 64);
    let drop_queue = |inner: &NodeInner<P>, reason: DropReason| {
        let n = std::mem::take(&mut *link.queue.lock().expect("queue lock")).len();
        inner
            .counters
            .messages_dropped_other
            .fetch_add(n as u64, Ordering::Relaxed);
        metrics::dropped(reason, n as u64);
    };
    'connect: loop {
        let stopping = *shutdown.borrow();
        if link.queue.lock().expect("queue lock").is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                _ = link.notify.notified() => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            continue;
        }
        if inner.is_blocked(to) {
            drop_queue(&inner, DropReason::FaultFilter);
            continue;
        }
        let attempt = async {
            let conn = inner
                .dialer
                .connection(to)
                .await
                .map_err(|e| e.to_string())?;
            let mut stream = conn.open_uni().await.map_err(|e| e.to_string())?;
            let mut hello = [0u8; HELLO_BYTES];
            hello[0] = KIND_MESSAGES;
            hello[1] = HELLO_VERSION;
            hello[2..10].copy_from_slice(&inner.id.0.to_be_bytes());
            hello[10..].copy_from_slice(&inner.incarnation.to_be_bytes());
            stream.write_all(&hello).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, stream))
        };
        tokio::pin!(attempt);
        let silence = Duration::from_millis(PEER_SILENCE_MS);
        let silent_at_shutdown = || Err("no answer from the peer at shutdown".to_string());
        let attempted = if stopping {
            timeout(silence, &mut attempt)
                .await
                .unwrap_or_else(|_| silent_at_shutdown())
        } else {
            tokio::select! {
                r = &mut attempt => r,
                // Shutdown while dialing: give the dial only a little longer
                // (a dead peer would hold it for the handshake timeout).
                () = async {
                    // (The `Ref` it returns is not `Send`: drop it here.)
                    let _ = shutdown.wait_for(|s| *s).await;
                } => timeout(silence, &mut attempt)
                    .await
                    .unwrap_or_else(|_| silent_at_shutdown()),
            }
        };
        let (conn, mut stream) = match attempted {
            Ok(ok) => ok,
            Err(reason) => {
                if stopping || *shutdown.borrow() {
                    debug!(node = %inner.id, peer = %to, %reason, "peer unreachable at shutdown; its queue is dropped");
                    drop_queue(&inner, DropReason::Shutdown);
                    return;
                }
                debug!(node = %inner.id, peer = %to, %reason, ?backoff, "dial failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        backoff = backoff_min;
        loop {
            body.clear();
            let mut count = 0u64;
            {
                let mut queue = link.queue.lock().expect("queue lock");
                while let Some(front) = queue.front() {
                    if count > 0 && body.len() + 4 + front.len() > limits.batch_bytes_max {
                        break;
                    }
                    let message = queue.pop_front().expect("front exists");
                    push_record(&mut body, &message);
                    count += 1;
                }
            }
            if count == 0 {
                if *shutdown.borrow() {
                    let _ = stream.finish();
                    wait_acknowledged(&inner, to, &conn, &stream).await;
                    return;
                }
                tokio::select! {
                    _ = link.notify.notified() => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                    _ = conn.closed() => continue 'connect,
                }
                continue;
            }
            if inner.is_blocked(to) {
                inner
                    .counters
                    .messages_dropped_other
                    .fetch_add(count, Ordering::Relaxed);
                metrics::dropped(DropReason::FaultFilter, count);
                continue;
            }
            if let Err(e) = write_frame(&mut stream, &body, limits.max_frame_bytes).await {
                debug!(node = %inner.id, peer = %to, error = %e, "message stream broke; reconnecting");
                inner
                    .counters
                    .messages_dropped_other
                    .fetch_add(count, Ordering::Relaxed);
                metrics::dropped(DropReason::ConnectionLost, count);
                continue 'connect;
            }
            bump(&inner.counters.frames_sent);
        }
    }
}

/// Waits until `to` acknowledged everything on the finished `stream`, or
/// until it has been silent (no datagram at all) for [`PEER_SILENCE_MS`]:
/// a live peer acknowledges within a round trip, a dead one never does.
/// The caller's shutdown deadline bounds a peer that keeps talking slowly.
async fn wait_acknowledged<P: Protocol>(
    inner: &NodeInner<P>,
    to: NodeId,
    conn: &Connection,
    stream: &SendStream,
) {
    let silence = Duration::from_millis(PEER_SILENCE_MS);
    let mut heard = conn.stats().udp_rx.datagrams;
    loop {
        if timeout(silence, stream.stopped()).await.is_ok() {
            return;
        }
        let now_heard = conn.stats().udp_rx.datagrams;
        if now_heard == heard {
            debug!(node = %inner.id, peer = %to, "peer silent at shutdown; not waiting for its acknowledgements");
            return;
        }
        heard = now_heard;
    }
}

async fn accept_loop<P: Protocol>(inner: Arc<NodeInner<P>>) {
    while let Some(incoming) = inner.dialer.endpoint.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match timeout(inner.config.limits.io_timeout(), incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    warn!(node = %inner.id, %remote, error = %e, "refused connection: handshake failed");
                    bump(&inner.counters.connections_refused);
                    metrics::refused();
                    return;
                }
                Err(_) => {
                    warn!(node = %inner.id, %remote, "refused connection: handshake timed out");
                    bump(&inner.counters.connections_refused);
                    metrics::refused();
                    return;
                }
            };
            serve_connection(inner, conn).await;
        });
    }
}

fn refuse<P: Protocol>(inner: &NodeInner<P>, conn: &Connection, reason: &str) {
    warn!(node = %inner.id, remote = %conn.remote_address(), reason, "refused connection");
    bump(&inner.counters.connections_refused);
    metrics::refused();
    conn.close(VarInt::from_u32(codes::REFUSED), reason.as_bytes());
}

fn malformed<P: Protocol>(
    inner: &NodeInner<P>,
    conn: &Connection,
    peer: &Peer,
    error: &dyn std::fmt::Display,
) {
    warn!(node = %inner.id, ?peer, remote = %conn.remote_address(), %error, "malformed input; closing connection");
    bump(&inner.counters.malformed_inputs);
    metrics::malformed();
    conn.close(VarInt::from_u32(codes::PROTOCOL), b"malformed input");
}

async fn serve_connection<P: Protocol>(inner: Arc<NodeInner<P>>, conn: Connection) {
    let Some(peer) = peer_of(&conn) else {
        refuse(&inner, &conn, "certificate names no cluster identity");
        return;
    };
    if let Peer::Node(id) = peer {
        if !inner.config.members_open && !inner.is_member(id) {
            refuse(
                &inner,
                &conn,
                "certificate names a node that is not a member",
            );
            return;
        }
    }
    debug!(node = %inner.id, ?peer, "accepted connection");
    {
        let inner = inner.clone();
        let conn = conn.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            while let Ok(recv) = conn.accept_uni().await {
                tokio::spawn(read_messages(
                    inner.clone(),
                    conn.clone(),
                    peer.clone(),
                    recv,
                ));
            }
        });
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(
            inner.clone(),
            conn.clone(),
            peer.clone(),
            send,
            recv,
        ));
    }
}

async fn read_messages<P: Protocol>(
    inner: Arc<NodeInner<P>>,
    conn: Connection,
    peer: Peer,
    mut recv: RecvStream,
) {
    let Peer::Node(from) = peer else {
        refuse(&inner, &conn, "clients may not send peer messages");
        return;
    };
    let limits = &inner.config.limits;
    let mut hello = [0u8; HELLO_BYTES];
    match timeout(
        limits.io_timeout(),
        tokio::io::AsyncReadExt::read_exact(&mut recv, &mut hello),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return malformed(&inner, &conn, &peer, &format!("hello: {e}")),
        Err(_) => return malformed(&inner, &conn, &peer, &"hello timed out"),
    }
    if hello[0] != KIND_MESSAGES || hello[1] != HELLO_VERSION {
        return malformed(
            &inner,
            &conn,
            &peer,
            &format!("bad hello kind/version {:?}", &hello[..2]),
        );
    }
    let claimed = NodeId(u64::from_be_bytes(
        hello[2..10].try_into().expect("8 bytes"),
    ));
    if claimed != from {
        warn!(node = %inner.id, certificate = %from, %claimed, "peer claims another node's id");
        refuse(
            &inner,
            &conn,
            "claimed node id does not match the certificate",
        );
        return;
    }
    // A new incarnation means the peer restarted: the connection we dialed
    // to its previous process is dead, though QUIC would only notice at the
    // idle timeout. Drop it now so our messages reach the new process.
    let incarnation = u64::from_be_bytes(hello[10..].try_into().expect("8 bytes"));
    let previous = inner
        .peer_incarnations
        .lock()
        .expect("incarnations lock")
        .insert(from, incarnation);
    if previous.is_some_and(|p| p != incarnation) {
        info!(node = %inner.id, peer = %from, "peer restarted; redialing it");
        inner.dialer.forget(from).await;
    }
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut recv, &mut buf, limits.max_frame_bytes).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(crate::FrameError::Io(e)) if conn.close_reason().is_some() => {
                debug!(node = %inner.id, peer = %from, error = %e, "message stream ended with the connection");
                return;
            }
            Err(e) => return malformed(&inner, &conn, &peer, &e),
        }
        let records = match split_records(&buf) {
            Ok(records) => records,
            Err(e) => return malformed(&inner, &conn, &peer, &e),
        };
        let mut messages = Vec::with_capacity(records.len());
        for record in records {
            match postcard::from_bytes::<P::Message>(record) {
                Ok(message) => messages.push(message),
                Err(e) => {
                    return malformed(
                        &inner,
                        &conn,
                        &peer,
                        &format!("message does not decode: {e}"),
                    )
                }
            }
        }
        if inner.is_blocked(from) {
            inner
                .counters
                .messages_dropped_other
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            metrics::dropped(DropReason::FaultFilter, messages.len() as u64);
            continue;
        }
        for message in messages {
            // Awaiting here is the back-pressure: a full inbox stops reading,
            // QUIC flow control stops the sender, its bounded queue drops.
            if inner.inbox.messages.send((from, message)).await.is_err() {
                return;
            }
            bump(&inner.counters.messages_received);
        }
    }
}

async fn serve_stream<P: Protocol>(
    inner: Arc<NodeInner<P>>,
    conn: Connection,
    peer: Peer,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let limits = inner.config.limits.clone();
    if let Peer::Node(id) = peer {
        if inner.is_blocked(id) {
            let _ = send.reset(VarInt::from_u32(codes::REFUSED));
            return;
        }
    }
    let mut kind = [0u8; 1];
    match timeout(
        limits.io_timeout(),
        tokio::io::AsyncReadExt::read_exact(&mut recv, &mut kind),
    )
    .await
    {
        Ok(Ok(_)) => {}
        _ => return malformed(&inner, &conn, &peer, &"stream ended before its kind byte"),
    }
    inner.in_flight.fetch_add(1, Ordering::AcqRel);
    let _guard = InFlight(&inner.in_flight, &inner.in_flight_done);
    match kind[0] {
        KIND_RPC => {
            let mut buf = Vec::new();
            let read = timeout(
                limits.io_timeout(),
                read_frame(&mut recv, &mut buf, limits.max_frame_bytes),
            )
            .await;
            match read {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    return malformed(&inner, &conn, &peer, &"RPC stream ended before its request")
                }
                Ok(Err(e)) => return malformed(&inner, &conn, &peer, &e),
                Err(_) => return malformed(&inner, &conn, &peer, &"RPC request timed out"),
            }
            let request = match postcard::from_bytes::<P::Request>(&buf) {
                Ok(request) => request,
                Err(e) => {
                    return malformed(
                        &inner,
                        &conn,
                        &peer,
                        &format!("request does not decode: {e}"),
                    )
                }
            };
            let (reply, rx) = Responder::new();
            if inner
                .inbox
                .rpcs
                .send(IncomingRpc {
                    from: peer.clone(),
                    request,
                    reply,
                })
                .await
                .is_err()
            {
                let _ = send.reset(VarInt::from_u32(codes::NO_REPLY));
                return;
            }
            bump(&inner.counters.rpcs_received);
            let response = match timeout(limits.rpc_deadline(), rx).await {
                Ok(Ok(response)) => response,
                _ => {
                    let _ = send.reset(VarInt::from_u32(codes::NO_REPLY));
                    return;
                }
            };
            let body = match postcard::to_stdvec(&response) {
                Ok(body) => body,
                Err(e) => {
                    warn!(node = %inner.id, error = %e, "response failed to encode");
                    let _ = send.reset(VarInt::from_u32(codes::NO_REPLY));
                    return;
                }
            };
            if write_frame(&mut send, &body, limits.max_frame_bytes)
                .await
                .is_ok()
            {
                let _ = send.finish();
                bump(&inner.counters.rpcs_served);
            } else {
                let _ = send.reset(VarInt::from_u32(codes::NO_REPLY));
            }
        }
        KIND_FILE => {
            let Peer::Node(from) = peer else {
                refuse(&inner, &conn, "clients may not send bulk files");
                return;
            };
            let result = crate::bulk::receive_file::<_, P::FileMeta>(
                &mut recv,
                &inner.config.files_dir,
                from,
                &limits,
            )
            .await;
            let verdict: Result<(), String> = match result {
                Ok((path, meta, bytes)) => {
                    bump(&inner.counters.files_received);
                    let (ack, stored) = crate::FileAck::for_file::<P>(&meta);
                    let file = ReceivedFile {
                        from,
                        path,
                        meta,
                        bytes,
                        ack,
                    };
                    if let Err(e) = inner.inbox.files.send(file).await {
                        let _ = std::fs::remove_file(&e.0.path);
                        Err("receiver is shutting down".into())
                    } else if let Some(stored) = stored {
                        crate::wait_file_ack(stored).await
                    } else {
                        Ok(())
                    }
                }
                Err(reason) => {
                    warn!(node = %inner.id, peer = %from, %reason, "bulk file rejected; partial file removed");
                    bump(&inner.counters.files_rejected);
                    let _ = recv.stop(VarInt::from_u32(codes::PROTOCOL));
                    Err(reason)
                }
            };
            let body = postcard::to_stdvec(&verdict).expect("verdict encodes");
            if write_frame(&mut send, &body, limits.max_frame_bytes)
                .await
                .is_ok()
            {
                let _ = send.finish();
                let _ = timeout(limits.io_timeout(), send.stopped()).await;
            }
        }
        other => malformed(
            &inner,
            &conn,
            &peer,
            &format!("unknown stream kind {other:#04x}"),
        ),
    }
}

/// A client of the cluster: makes RPCs to nodes with a client certificate.
pub struct QuicClient<P: Protocol> {
    dialer: Arc<Dialer>,
    _protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol> Clone for QuicClient<P> {
    fn clone(&self) -> Self {
        QuicClient {
            dialer: self.dialer.clone(),
            _protocol: PhantomData,
        }
    }
}

impl<P: Protocol> std::fmt::Debug for QuicClient<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicClient").finish_non_exhaustive()
    }
}

impl<P: Protocol> QuicClient<P> {
    /// Creates a client endpoint (bound to an ephemeral port on 0.0.0.0, or
    /// `[::]` if the first node address is IPv6). `identity` is normally a
    /// client certificate; a node certificate works too.
    pub fn new(
        identity: &Identity,
        nodes: HashMap<NodeId, SocketAddr>,
        limits: Limits,
    ) -> Result<Self, SetupError> {
        limits.validate()?;
        let transport = transport_config(&limits);
        let client = certs::client_config(identity, &[ALPN], transport)?;
        let v6 = nodes.values().next().is_some_and(|a| a.is_ipv6());
        let bind: SocketAddr = if v6 {
            "[::]:0".parse().expect("addr")
        } else {
            "0.0.0.0:0".parse().expect("addr")
        };
        let mut endpoint = endpoint(&limits, bind, None, None)?;
        endpoint.set_default_client_config(client);
        Ok(QuicClient {
            dialer: Arc::new(Dialer {
                endpoint,
                addrs: RwLock::new(nodes),
                conns: Mutex::new(HashMap::new()),
                pacer: crate::bulk::SendPacer::new(&limits),
                limits,
                shutting_down: AtomicBool::new(false),
            }),
            _protocol: PhantomData,
        })
    }

    /// Adds a node or changes its address.
    pub fn set_node(&self, id: NodeId, addr: SocketAddr) {
        self.dialer
            .addrs
            .write()
            .expect("addrs lock")
            .insert(id, addr);
    }

    /// Closes every connection and waits briefly for the peers to be told.
    pub async fn close(&self) {
        self.dialer.shutting_down.store(true, Ordering::Relaxed);
        self.dialer
            .endpoint
            .close(VarInt::from_u32(codes::SHUTDOWN), b"client closed");
        let _ = timeout(Duration::from_secs(1), self.dialer.endpoint.wait_idle()).await;
    }
}

impl<P: Protocol> RpcCaller<P> for QuicClient<P> {
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> impl std::future::Future<Output = Result<P::Response, RpcError>> + Send {
        let dialer = self.dialer.clone();
        async move { dialer.call::<P>(to, request, deadline).await }
    }

    fn default_deadline(&self) -> Duration {
        self.dialer.limits.rpc_deadline()
    }
}
