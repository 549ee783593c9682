//! In-memory transport with a seeded fault model like the 6.5840 lab's
//! `labrpc` network. Implements the same [`Transport`] and [`RpcCaller`] traits
//! as the QUIC transport and hands out the same [`Inbox`].
//!
//! Fault model (all randomness from one ChaCha8 RNG seeded by
//! [`MemConfig::seed`]; on a current-thread runtime with tokio's paused clock a
//! seed replays exactly):
//! - **Unreliable** ([`MemNetwork::set_reliable`]`(false)`): each request and
//!   each peer message waits `0..=26` ms, then 10% are dropped; 10% of RPC
//!   replies are dropped after the handler ran.
//! - **Long reordering** ([`MemNetwork::set_long_reordering`]): 2/3 of replies
//!   (and of peer messages) are delayed `200 + rand(0..rand(0..2000))` ms.
//! - **Links**: a link is up when both ends are running and connected
//!   ([`MemNetwork::disconnect`], [`MemNetwork::connect`]), on the same side of
//!   the current [`MemNetwork::partition`] (clients are not subject to
//!   partitions) and, for clients, allowed by [`MemNetwork::set_client_reachable`]
//!   and not cut by [`MemClient::set_connected`].
//!   A call over a link that is down fails after `rand(0..100)` ms, or
//!   `rand(0..7000)` ms with [`MemNetwork::set_long_delays`].
//! - While a handler runs, every 100 ms the call checks that the server is
//!   still the same incarnation and its link is up; if not it fails even if
//!   the handler later replies (a crashed server cannot acknowledge).
//! - [`MemNetwork::remove_node`] is a crash: the node's inbox is dropped and
//!   everything in flight to it is lost; [`MemNetwork::add_node`] again is a
//!   restart with a new inbox.
//!
//! On a reliable network without long reordering, peer messages are
//! delivered synchronously inside `send`, so they arrive in send order.
//! Messages and RPCs are postcard-encoded and decoded on the way, as on the
//! wire, and counted in [`MemNetwork::bytes_total`].

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::sleep;

use crate::error::{BulkError, FaultFilterError, RpcError};
use crate::{
    bump, inbox, Counters, Inbox, InboxSenders, IncomingRpc, Limits, NodeId, Peer, Protocol,
    ReceivedFile, Responder, RpcCaller, Stats, Transport,
};

/// Configuration of an in-memory network.
#[derive(Debug, Clone)]
pub struct MemConfig {
    /// Seed of the fault model's RNG.
    pub seed: u64,
    /// Limits (inbox capacity, RPC deadline, frame size, file size).
    pub limits: Limits,
    /// Where received files are placed, in one subdirectory per node.
    pub files_dir: PathBuf,
    /// Enables the nodes' [`Transport::set_fault_filter`] (off by
    /// default, as on QUIC; the network's own partitions need no flag).
    pub fault_injection_enabled: bool,
}

impl MemConfig {
    /// Default limits, files under the system temp directory.
    pub fn with_seed(seed: u64) -> Self {
        MemConfig {
            seed,
            limits: Limits::default(),
            files_dir: std::env::temp_dir()
                .join(format!("shoal-mem-{}-{seed}", std::process::id())),
            fault_injection_enabled: false,
        }
    }
}

struct NodeSlot<P: Protocol> {
    generation: u64,
    inbox: InboxSenders<P>,
    counters: Arc<Counters>,
    /// The node's fault filter: peers cut off in both directions. A
    /// restart starts with none, as a restarted process would.
    blocked: HashSet<NodeId>,
}

#[derive(Default)]
struct ClientSlot {
    disconnected: bool,
    reachable: Option<HashSet<NodeId>>,
}

/// Which handle of a client a call comes from: every
/// [`MemNetwork::add_client`] makes a new one (clones share it).
type ClientHandle = u64;

struct State<P: Protocol> {
    rng: ChaCha8Rng,
    reliable: bool,
    long_reordering: bool,
    long_delays: bool,
    nodes: HashMap<NodeId, NodeSlot<P>>,
    disconnected: HashSet<NodeId>,
    sides: Option<HashMap<NodeId, usize>>,
    clients: HashMap<String, ClientSlot>,
    /// Client handles cut off by [`MemClient::set_connected`].
    cut_handles: HashSet<ClientHandle>,
    next_client_handle: ClientHandle,
    next_generation: u64,
    rpc_count: HashMap<NodeId, u64>,
    rpc_total: u64,
    bytes_total: u64,
    messages_delivered: u64,
}

impl<P: Protocol> State<P> {
    fn node_up(&self, id: NodeId, generation: Option<u64>) -> bool {
        match self.nodes.get(&id) {
            Some(slot) => {
                generation.is_none_or(|g| g == slot.generation) && !self.disconnected.contains(&id)
            }
            None => false,
        }
    }

    /// Whether either node's fault filter blocks the other.
    fn filtered(&self, a: NodeId, b: NodeId) -> bool {
        let blocks =
            |x: NodeId, y: NodeId| self.nodes.get(&x).is_some_and(|s| s.blocked.contains(&y));
        blocks(a, b) || blocks(b, a)
    }

    fn same_side(&self, a: NodeId, b: NodeId) -> bool {
        match &self.sides {
            None => true,
            Some(sides) => match (sides.get(&a), sides.get(&b)) {
                (Some(x), Some(y)) => x == y,
                _ => false,
            },
        }
    }

    /// Whether `from` can reach `to` (this incarnation). `from_instance` is
    /// the sender's incarnation for a node, its [`ClientHandle`] for a client.
    fn link_up(
        &self,
        from: &Peer,
        from_instance: Option<u64>,
        to: NodeId,
        to_generation: Option<u64>,
    ) -> bool {
        if !self.node_up(to, to_generation) {
            return false;
        }
        match from {
            Peer::Node(f) => {
                self.node_up(*f, from_instance) && self.same_side(*f, to) && !self.filtered(*f, to)
            }
            Peer::Client(name) => match self.clients.get(name) {
                Some(c) => {
                    !c.disconnected
                        && c.reachable.as_ref().is_none_or(|r| r.contains(&to))
                        && from_instance.is_none_or(|h| !self.cut_handles.contains(&h))
                }
                None => false,
            },
        }
    }

    fn short_delay_and_drop(&mut self) -> (Duration, bool) {
        if self.reliable {
            return (Duration::ZERO, false);
        }
        let delay = Duration::from_millis(self.rng.random_range(0..27));
        let dropped = self.rng.random_range(0..1000) < 100;
        (delay, dropped)
    }

    fn reply_drop(&mut self) -> bool {
        !self.reliable && self.rng.random_range(0..1000) < 100
    }

    fn long_reorder_delay(&mut self) -> Duration {
        if self.long_reordering && self.rng.random_range(0..900) < 600 {
            let upper = 1 + self.rng.random_range(0..2000u64);
            Duration::from_millis(200 + self.rng.random_range(0..upper))
        } else {
            Duration::ZERO
        }
    }

    fn down_link_delay(&mut self) -> Duration {
        let max = if self.long_delays { 7000 } else { 100 };
        Duration::from_millis(self.rng.random_range(0..max))
    }
}

/// The in-memory network: creates nodes and clients and controls faults.
/// Cheap to clone.
pub struct MemNetwork<P: Protocol> {
    state: Arc<Mutex<State<P>>>,
    config: Arc<MemConfig>,
}

impl<P: Protocol> Clone for MemNetwork<P> {
    fn clone(&self) -> Self {
        MemNetwork {
            state: self.state.clone(),
            config: self.config.clone(),
        }
    }
}

impl<P: Protocol> std::fmt::Debug for MemNetwork<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNetwork")
            .field("seed", &self.config.seed)
            .finish_non_exhaustive()
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RpcError> {
    postcard::to_stdvec(value).map_err(|e| RpcError::Codec(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    postcard::from_bytes(bytes).map_err(|e| RpcError::Codec(e.to_string()))
}

impl<P: Protocol> MemNetwork<P> {
    /// A reliable network (no faults until told otherwise).
    pub fn new(config: MemConfig) -> Self {
        let state = State {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            reliable: true,
            long_reordering: false,
            long_delays: false,
            nodes: HashMap::new(),
            disconnected: HashSet::new(),
            sides: None,
            clients: HashMap::new(),
            cut_handles: HashSet::new(),
            next_client_handle: 1,
            next_generation: 1,
            rpc_count: HashMap::new(),
            rpc_total: 0,
            bytes_total: 0,
            messages_delivered: 0,
        };
        MemNetwork {
            state: Arc::new(Mutex::new(state)),
            config: Arc::new(config),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<P>> {
        self.state.lock().expect("mem network lock")
    }

    /// Starts (or restarts) node `id` with a fresh inbox, connected.
    /// A previous incarnation's handles become zombies whose traffic is dropped.
    pub fn add_node(&self, id: NodeId) -> (MemNode<P>, Inbox<P>) {
        let (senders, inbox) = inbox::<P>(self.config.limits.inbox_capacity);
        let counters = Arc::new(Counters::default());
        let mut st = self.lock();
        let generation = st.next_generation;
        st.next_generation += 1;
        st.nodes.insert(
            id,
            NodeSlot {
                generation,
                inbox: senders,
                counters: counters.clone(),
                blocked: HashSet::new(),
            },
        );
        st.disconnected.remove(&id);
        drop(st);
        (
            MemNode {
                net: self.clone(),
                id,
                generation,
                counters,
            },
            inbox,
        )
    }

    /// Crashes node `id`: its inbox is dropped, in-flight traffic to it is lost.
    pub fn remove_node(&self, id: NodeId) {
        self.lock().nodes.remove(&id);
    }

    /// Cuts every link to and from node `id`.
    pub fn disconnect(&self, id: NodeId) {
        self.lock().disconnected.insert(id);
    }

    /// Restores node `id`'s links (to nodes that are connected and on its side).
    pub fn connect(&self, id: NodeId) {
        self.lock().disconnected.remove(&id);
    }

    /// Splits the nodes into groups that can talk only within themselves, and
    /// connects every listed node. A node listed nowhere is isolated.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let mut st = self.lock();
        let mut sides = HashMap::new();
        for (side, group) in groups.iter().enumerate() {
            for id in group.iter() {
                sides.insert(*id, side);
                st.disconnected.remove(id);
            }
        }
        st.sides = Some(sides);
    }

    /// Removes the partition and reconnects every node.
    pub fn heal(&self) {
        let mut st = self.lock();
        st.sides = None;
        st.disconnected.clear();
    }

    /// Turns the unreliable-network faults on (`false`) or off (`true`, the default).
    pub fn set_reliable(&self, reliable: bool) {
        self.lock().reliable = reliable;
    }

    /// Turns long reply reordering on or off (default off).
    pub fn set_long_reordering(&self, on: bool) {
        self.lock().long_reordering = on;
    }

    /// Calls over a down link fail after up to 7 s instead of up to 100 ms.
    pub fn set_long_delays(&self, on: bool) {
        self.lock().long_delays = on;
    }

    /// Creates a client named `name` (its [`Peer::Client`] identity), connected
    /// to every node. Several handles may share a name (every admin tool is
    /// `admin`): the name's settings below apply to all of them, and each
    /// handle (with its clones) can also be cut off alone
    /// ([`MemClient::set_connected`]).
    pub fn add_client(&self, name: &str) -> MemClient<P> {
        let mut st = self.lock();
        st.clients.insert(name.to_string(), ClientSlot::default());
        let handle = st.next_client_handle;
        st.next_client_handle += 1;
        drop(st);
        MemClient {
            net: self.clone(),
            name: name.to_string(),
            handle,
        }
    }

    /// Cuts (`false`) or restores (`true`) all of a client's links, for
    /// every handle with that name.
    pub fn set_client_connected(&self, name: &str, connected: bool) {
        if let Some(c) = self.lock().clients.get_mut(name) {
            c.disconnected = !connected;
        }
    }

    /// Limits the nodes a client can reach (`None`: all nodes).
    pub fn set_client_reachable(&self, name: &str, nodes: Option<&[NodeId]>) {
        if let Some(c) = self.lock().clients.get_mut(name) {
            c.reachable = nodes.map(|n| n.iter().copied().collect());
        }
    }

    /// RPCs dispatched to node `id`'s handlers so far.
    pub fn rpc_count(&self, id: NodeId) -> u64 {
        self.lock().rpc_count.get(&id).copied().unwrap_or(0)
    }

    /// RPC calls made so far (including failed ones).
    pub fn rpc_total(&self) -> u64 {
        self.lock().rpc_total
    }

    /// Request bytes sent plus reply bytes delivered, plus peer message bytes.
    pub fn bytes_total(&self) -> u64 {
        self.lock().bytes_total
    }

    /// Peer messages delivered into inboxes so far.
    pub fn messages_delivered(&self) -> u64 {
        self.lock().messages_delivered
    }

    /// The RNG seed.
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    fn deliver_message(
        &self,
        from: NodeId,
        to: NodeId,
        to_generation: u64,
        bytes: &[u8],
        counters: &Counters,
    ) {
        let mut st = self.lock();
        let Some(slot) = st.nodes.get(&to).filter(|s| s.generation == to_generation) else {
            bump(&counters.messages_dropped_other);
            return;
        };
        let message: P::Message = match decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%from, %to, error = %e, "in-memory message failed to decode");
                bump(&counters.messages_dropped_other);
                return;
            }
        };
        let receiver_counters = slot.counters.clone();
        match slot.inbox.messages.try_send((from, message)) {
            Ok(()) => {
                st.messages_delivered += 1;
                bump(&receiver_counters.messages_received);
            }
            Err(_) => bump(&counters.messages_dropped_overflow),
        }
    }

    async fn call(
        &self,
        from: Peer,
        from_instance: Option<u64>,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> Result<P::Response, RpcError> {
        let bytes = encode(&request)?;
        drop(request);
        if bytes.len() > self.config.limits.max_frame_bytes {
            return Err(RpcError::Codec(format!(
                "request of {} bytes exceeds max_frame_bytes",
                bytes.len()
            )));
        }
        let exchange = async {
            let (link_up, delay, dropped) = {
                let mut st = self.lock();
                st.rpc_total += 1;
                st.bytes_total += bytes.len() as u64;
                if st.link_up(&from, from_instance, to, None) {
                    let (delay, dropped) = st.short_delay_and_drop();
                    (true, delay, dropped)
                } else {
                    (false, st.down_link_delay(), true)
                }
            };
            if !link_up {
                sleep(delay).await;
                return Err(RpcError::Unreachable {
                    node: to,
                    reason: "link down".into(),
                });
            }
            if !delay.is_zero() {
                sleep(delay).await;
            }
            if dropped {
                return Err(RpcError::Lost("request dropped".into()));
            }
            let (rpcs, to_generation, receiver_counters) = {
                let mut st = self.lock();
                if !st.link_up(&from, from_instance, to, None) {
                    return Err(RpcError::Unreachable {
                        node: to,
                        reason: "link down".into(),
                    });
                }
                *st.rpc_count.entry(to).or_default() += 1;
                let slot = &st.nodes[&to];
                (
                    slot.inbox.rpcs.clone(),
                    slot.generation,
                    slot.counters.clone(),
                )
            };
            let (reply, rx) = Responder::new();
            let request = decode(&bytes)?;
            rpcs.send(IncomingRpc {
                from: from.clone(),
                request,
                reply,
            })
            .await
            .map_err(|_| RpcError::Lost("server stopped".into()))?;
            bump(&receiver_counters.rpcs_received);
            drop(rpcs);
            tokio::pin!(rx);
            let alive = || {
                self.lock()
                    .link_up(&from, from_instance, to, Some(to_generation))
            };
            let response = loop {
                // Biased: when the reply and a liveness tick are ready at the
                // same instant, the reply wins, so a seed replays the same
                // way every time (an unbiased select picks at random).
                tokio::select! {
                    biased;
                    r = &mut rx => break r.map_err(|_| RpcError::Lost("handler dropped the reply".into()))?,
                    _ = sleep(Duration::from_millis(100)) => {
                        if !alive() {
                            return Err(RpcError::Lost("server crashed or link cut during the call".into()));
                        }
                    }
                }
            };
            if !alive() {
                return Err(RpcError::Lost(
                    "server crashed or link cut during the call".into(),
                ));
            }
            let reply_bytes = encode(&response)?;
            let (dropped, delay) = {
                let mut st = self.lock();
                let dropped = st.reply_drop();
                let delay = st.long_reorder_delay();
                (dropped, delay)
            };
            if dropped {
                return Err(RpcError::Lost("reply dropped".into()));
            }
            if !delay.is_zero() {
                sleep(delay).await;
            }
            self.lock().bytes_total += reply_bytes.len() as u64;
            bump(&receiver_counters.rpcs_served);
            decode(&reply_bytes)
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| RpcError::Timeout)?
    }
}

/// A node on the in-memory network. Cheap to clone.
pub struct MemNode<P: Protocol> {
    net: MemNetwork<P>,
    id: NodeId,
    generation: u64,
    counters: Arc<Counters>,
}

impl<P: Protocol> Clone for MemNode<P> {
    fn clone(&self) -> Self {
        MemNode {
            net: self.net.clone(),
            id: self.id,
            generation: self.generation,
            counters: self.counters.clone(),
        }
    }
}

impl<P: Protocol> std::fmt::Debug for MemNode<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNode")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish()
    }
}

impl<P: Protocol> MemNode<P> {
    /// The network this node is on.
    pub fn network(&self) -> &MemNetwork<P> {
        &self.net
    }
}

impl<P: Protocol> RpcCaller<P> for MemNode<P> {
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> impl std::future::Future<Output = Result<P::Response, RpcError>> + Send {
        let net = self.net.clone();
        let (id, generation) = (self.id, self.generation);
        async move {
            net.call(Peer::Node(id), Some(generation), to, request, deadline)
                .await
        }
    }

    fn default_deadline(&self) -> Duration {
        self.net.config.limits.rpc_deadline()
    }
}

impl<P: Protocol> Transport<P> for MemNode<P> {
    fn local_id(&self) -> NodeId {
        self.id
    }

    fn set_fault_filter(&self, blocked: &[NodeId]) -> Result<(), FaultFilterError> {
        if !self.net.config.fault_injection_enabled {
            return Err(FaultFilterError::Disabled);
        }
        let mut st = self.net.lock();
        if let Some(slot) = st.nodes.get_mut(&self.id) {
            if slot.generation == self.generation {
                slot.blocked = blocked.iter().copied().collect();
            }
        }
        Ok(())
    }

    fn clear_fault_filter(&self) -> Result<(), FaultFilterError> {
        self.set_fault_filter(&[])
    }

    fn fault_filter(&self) -> Vec<NodeId> {
        let st = self.net.lock();
        let mut blocked: Vec<NodeId> = st
            .nodes
            .get(&self.id)
            .filter(|slot| slot.generation == self.generation)
            .map(|slot| slot.blocked.iter().copied().collect())
            .unwrap_or_default();
        blocked.sort();
        blocked
    }

    fn send(&self, to: NodeId, message: P::Message) {
        bump(&self.counters.messages_sent);
        let bytes = match encode(&message) {
            Ok(b) if b.len() + 4 <= self.net.config.limits.max_frame_bytes => b,
            _ => {
                bump(&self.counters.messages_dropped_other);
                return;
            }
        };
        drop(message);
        let (delay, to_generation) = {
            let mut st = self.net.lock();
            if !st.link_up(&Peer::Node(self.id), Some(self.generation), to, None) {
                bump(&self.counters.messages_dropped_other);
                return;
            }
            let (delay, dropped) = st.short_delay_and_drop();
            if dropped {
                bump(&self.counters.messages_dropped_other);
                return;
            }
            st.bytes_total += bytes.len() as u64;
            (delay + st.long_reorder_delay(), st.nodes[&to].generation)
        };
        if delay.is_zero() {
            self.net
                .deliver_message(self.id, to, to_generation, &bytes, &self.counters);
            return;
        }
        let net = self.net.clone();
        let (from, generation, counters) = (self.id, self.generation, self.counters.clone());
        tokio::spawn(async move {
            sleep(delay).await;
            let up =
                net.lock()
                    .link_up(&Peer::Node(from), Some(generation), to, Some(to_generation));
            if up {
                net.deliver_message(from, to, to_generation, &bytes, &counters);
            } else {
                bump(&counters.messages_dropped_other);
            }
        });
    }

    fn send_file(
        &self,
        to: NodeId,
        path: PathBuf,
        meta: P::FileMeta,
    ) -> impl std::future::Future<Output = Result<u64, BulkError>> + Send {
        let node = self.clone();
        let meta_bytes = encode(&meta);
        drop(meta);
        async move {
            let meta_bytes = meta_bytes?;
            let from = Peer::Node(node.id);
            let (delay, dropped, sender, to_generation) = {
                let mut st = node.net.lock();
                if !st.link_up(&from, Some(node.generation), to, None) {
                    return Err(RpcError::Unreachable {
                        node: to,
                        reason: "link down".into(),
                    }
                    .into());
                }
                let (delay, dropped) = st.short_delay_and_drop();
                let slot = &st.nodes[&to];
                (delay, dropped, slot.inbox.files.clone(), slot.generation)
            };
            sleep(delay).await;
            if dropped {
                return Err(RpcError::Lost("file transfer dropped".into()).into());
            }
            let bytes = std::fs::metadata(&path)
                .map_err(|source| BulkError::Io {
                    path: path.clone(),
                    source,
                })?
                .len();
            let max = node.net.config.limits.bulk_file_bytes_max;
            if bytes > max {
                return Err(BulkError::TooLarge {
                    bytes,
                    max_bytes: max,
                });
            }
            let dir = node.net.config.files_dir.join(format!("node-{}", to.0));
            let name = crate::bulk::unique_name(node.id);
            let part = dir.join(format!(".incoming-{name}.part"));
            let final_path = dir.join(format!("{name}.bulk"));
            let io = |p: &PathBuf| {
                let p = p.clone();
                move |source| BulkError::Io { path: p, source }
            };
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            if let Err(e) =
                std::fs::copy(&path, &part).and_then(|_| std::fs::rename(&part, &final_path))
            {
                let _ = std::fs::remove_file(&part);
                return Err(BulkError::Io {
                    path: part,
                    source: e,
                });
            }
            let meta = decode(&meta_bytes)?;
            let (ack, stored) = crate::FileAck::for_file::<P>(&meta);
            let up = node
                .net
                .lock()
                .link_up(&from, Some(node.generation), to, Some(to_generation));
            if !up
                || sender
                    .send(ReceivedFile {
                        from: node.id,
                        path: final_path.clone(),
                        meta,
                        bytes,
                        ack,
                    })
                    .await
                    .is_err()
            {
                let _ = std::fs::remove_file(&final_path);
                return Err(RpcError::Lost("receiver crashed or link cut".into()).into());
            }
            if let Some(stored) = stored {
                crate::wait_file_ack(stored).await.map_err(RpcError::Lost)?;
            }
            Ok(bytes)
        }
    }

    fn stats(&self) -> Stats {
        self.counters.snapshot()
    }
}

/// A caller that hands requests straight to one node's inbox, in this
/// process: no encoding, no fault injection, no lock shared with other
/// callers. For a client that lives beside its node (the embedded
/// database), where the simulated network's per-call costs would be the
/// larger part of an operation. It calls only that node; any other is
/// [`RpcError::Unreachable`]. Requests are not framed, so nothing bounds
/// their size but what the node checks. Get one with
/// [`MemNetwork::local_caller`].
pub struct LocalCaller<P: Protocol> {
    node: NodeId,
    from: Peer,
    rpcs: tokio::sync::mpsc::Sender<IncomingRpc<P>>,
    deadline_default: Duration,
}

impl<P: Protocol> Clone for LocalCaller<P> {
    fn clone(&self) -> Self {
        LocalCaller {
            node: self.node,
            from: self.from.clone(),
            rpcs: self.rpcs.clone(),
            deadline_default: self.deadline_default,
        }
    }
}

impl<P: Protocol> std::fmt::Debug for LocalCaller<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCaller")
            .field("node", &self.node)
            .field("from", &self.from)
            .finish()
    }
}

impl<P: Protocol> MemNetwork<P> {
    /// A [`LocalCaller`] of node `node` (which must have been added),
    /// calling as the client `name`; `None` if there is no such node.
    pub fn local_caller(&self, node: NodeId, name: &str) -> Option<LocalCaller<P>> {
        let st = self.lock();
        let slot = st.nodes.get(&node)?;
        Some(LocalCaller {
            node,
            from: Peer::Client(name.to_string()),
            rpcs: slot.inbox.rpcs.clone(),
            deadline_default: self.config.limits.rpc_deadline(),
        })
    }
}

impl<P: Protocol> RpcCaller<P> for LocalCaller<P> {
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> impl std::future::Future<Output = Result<P::Response, RpcError>> + Send {
        let (node, from, rpcs) = (self.node, self.from.clone(), self.rpcs.clone());
        async move {
            if to != node {
                return Err(RpcError::Unreachable {
                    node: to,
                    reason: "a local caller reaches its own node only".into(),
                });
            }
            let (reply, rx) = Responder::new();
            let exchange = async {
                rpcs.send(IncomingRpc {
                    from,
                    request,
                    reply,
                })
                .await
                .map_err(|_| RpcError::Lost("the node stopped".into()))?;
                rx.await
                    .map_err(|_| RpcError::Lost("the node dropped the reply".into()))
            };
            tokio::time::timeout(deadline, exchange)
                .await
                .map_err(|_| RpcError::Timeout)?
        }
    }

    fn default_deadline(&self) -> Duration {
        self.deadline_default
    }
}

/// A client on the in-memory network, identified as [`Peer::Client`].
/// Clones are the same handle: they share its link state.
pub struct MemClient<P: Protocol> {
    net: MemNetwork<P>,
    name: String,
    handle: ClientHandle,
}

impl<P: Protocol> Clone for MemClient<P> {
    fn clone(&self) -> Self {
        MemClient {
            net: self.net.clone(),
            name: self.name.clone(),
            handle: self.handle,
        }
    }
}

impl<P: Protocol> std::fmt::Debug for MemClient<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemClient")
            .field("name", &self.name)
            .finish()
    }
}

impl<P: Protocol> MemClient<P> {
    /// This client's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cuts (`false`) or restores (`true`) the links of this handle and its
    /// clones only, like the lab's `Clnt.DisconnectAll`/`ConnectAll`: other
    /// handles with the same name keep theirs. A call in flight on a cut
    /// handle fails as over a cut link (a reply that arrives later is lost).
    /// Use it to partition one of several processes that share a name,
    /// such as one shard controller among others (all are `admin`).
    pub fn set_connected(&self, connected: bool) {
        let mut st = self.net.lock();
        if connected {
            st.cut_handles.remove(&self.handle);
        } else {
            st.cut_handles.insert(self.handle);
        }
    }
}

impl<P: Protocol> RpcCaller<P> for MemClient<P> {
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: P::Request,
        deadline: Duration,
    ) -> impl std::future::Future<Output = Result<P::Response, RpcError>> + Send {
        let net = self.net.clone();
        let from = Peer::Client(self.name.clone());
        let handle = self.handle;
        async move { net.call(from, Some(handle), to, request, deadline).await }
    }

    fn default_deadline(&self) -> Duration {
        self.net.config.limits.rpc_deadline()
    }
}
