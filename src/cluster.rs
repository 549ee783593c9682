//! A cluster of `shoal node` processes: the member list format, the node
//! runner behind `shoal node`, and the client of a cluster over QUIC with
//! mutual TLS ([`Client`], [`BlockingClient`]).
//!
//! # Member lists
//! Nodes and clients name the cluster as `1=127.0.0.1:7001,2=127.0.0.1:7002`:
//! each member's id (it is the name in its certificate, `node-<id>.shoal`)
//! and its UDP address ([`parse_members`]).
//!
//! # Status file
//! A running node rewrites `<data>/status.json` (atomically, by rename)
//! every [`STATUS_INTERVAL_MS`] with its view of the KV group: role, term,
//! leader, commit and applied index ([`NodeStatus`]). Tools on the same
//! machine (the demo, tests) read this file; remote tools ask the node's
//! status RPC instead ([`shoal_shard::Client::node_status`], `shoal
//! status`), which [`NodeStatus::from_report`] turns into the same schema.
//!
//! # Readiness and services beside the node
//! [`run_node_with`] runs a service next to the node on its runtime (the
//! `shoal` binary's status endpoint, `--status-addr`), handing it a
//! [`NodeProbe`]: the node's [`Readiness`], re-judged with every status
//! file write, and the signal to stop. The service only reads what the
//! runner publishes; it never touches the node's event loop.
//!
//! # Admin client
//! A [`Client`] connected with the `admin` certificate
//! ([`ClientOptions::name`] = [`shoal_net::ADMIN_CLIENT_NAME`]) may also set
//! and clear a node's fault filter ([`shoal_shard::Client::set_fault_filter`])
//! on nodes started with fault injection (`shoal node --fault-injection`),
//! which is how the real-process tests partition a cluster.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_consensus::Role;
use shoal_engine::{EngineConfig, EngineError, GroupId, RocksEngine};
use shoal_net::quic::{QuicClient, QuicNode};
use shoal_net::{Limits, NodeId, Peer, SetupError};
use shoal_shard::node::{
    GroupSpec, Node, NodeConfig, NodeError, NodeHandle, CONTROLLER_GROUP, CONTROLLER_SHARD,
    KV_GROUP,
};
use shoal_shard::protocol::{KvProtocol, NodeReport};
pub use shoal_shard::ClientError;

/// How often a node rewrites its status file (and re-judges its
/// [`Readiness`]).
pub const STATUS_INTERVAL_MS: u64 = 100;

/// How long a service run beside the node ([`run_node_with`]) has to
/// return once told to stop, before it is aborted.
pub const SERVICE_STOP_MS: u64 = 1_000;

/// Whether a node can serve, as its status endpoint's `/ready` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Readiness {
    /// The node is opening its engine or starting its groups.
    Starting,
    /// The engine is open and every group the node hosts knows its leader
    /// (a node hosting no group yet is ready too: it answers what it can).
    Ready {
        /// The groups hosted.
        groups: usize,
    },
    /// A group the node hosts knows no leader: an election is under way,
    /// or this node is cut off from a majority.
    NoLeader {
        /// The first such group.
        group: GroupId,
    },
    /// The node is shutting down (SIGTERM or SIGINT).
    ShuttingDown,
    /// The node's loop stopped on an error; the process is exiting.
    Stopped,
}

impl Readiness {
    /// Whether the node can serve.
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready { .. })
    }

    /// Judges a running node from the status its loop last published.
    pub fn of(handle: &NodeHandle) -> Readiness {
        if !handle.is_running() {
            return Readiness::Stopped;
        }
        let groups = handle.groups();
        for &group in &groups {
            let status = handle.status(group);
            if status.leader == 0 && status.role != Some(Role::Leader) {
                return Readiness::NoLeader { group };
            }
        }
        Readiness::Ready {
            groups: groups.len(),
        }
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::Starting => write!(f, "starting: opening the engine and the groups"),
            Readiness::Ready { groups } => {
                write!(f, "ready: every group hosted ({groups}) knows its leader")
            }
            Readiness::NoLeader { group } => write!(f, "not ready: group {group} knows no leader"),
            Readiness::ShuttingDown => write!(f, "not ready: shutting down"),
            Readiness::Stopped => write!(f, "not ready: the node stopped on an error"),
        }
    }
}

/// What a service run beside a node ([`run_node_with`]) may see of it.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeProbe {
    readiness: tokio::sync::watch::Receiver<Readiness>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl NodeProbe {
    /// The node's readiness as last judged (every [`STATUS_INTERVAL_MS`]).
    pub fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    /// Resolves once the service should stop: the node has shut down.
    pub async fn stopped(&mut self) {
        // A dropped sender means the runner is gone: stop too.
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}

/// Why [`parse_members`] refused a member list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MembersError {
    /// An item is not `ID=ADDRESS`.
    #[error("member {item:?} is not ID=ADDRESS")]
    NotIdEqualsAddress {
        /// The item as written.
        item: String,
    },
    /// An item's id is not a number.
    #[error("member {item:?}: bad node id")]
    BadId {
        /// The item as written.
        item: String,
        /// Why it is not a number.
        #[source]
        source: std::num::ParseIntError,
    },
    /// An item's id is 0, which means "nobody" to Raft.
    #[error("member {item:?}: node ids start at 1")]
    IdZero {
        /// The item as written.
        item: String,
    },
    /// An item's address is not `HOST:PORT` (or `IP:PORT`).
    #[error("member {item:?}: bad address (want HOST:PORT or IP:PORT)")]
    BadAddress {
        /// The item as written.
        item: String,
    },
    /// An item's host name did not resolve to an address.
    #[error("member {item:?}: host {host:?} does not resolve ({reason})")]
    Unresolved {
        /// The item as written.
        item: String,
        /// The host name.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// Two items have the same id.
    #[error("node id {id} is listed twice")]
    Duplicate {
        /// The id.
        id: u64,
    },
    /// The list names nobody.
    #[error("the member list is empty")]
    Empty,
}

/// Why [`resolve_addr`] found no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// Not `HOST:PORT`.
    #[error("not HOST:PORT")]
    Syntax,
    /// The host name did not resolve.
    #[error("host {host:?} does not resolve ({reason})")]
    Lookup {
        /// The host name.
        host: String,
        /// What the resolver said.
        reason: String,
    },
}

/// `IP:PORT` as it is, or `HOST:PORT` resolved now (the system resolver;
/// its first IPv4 address, else its first). Blocking: call it where a command starts,
/// never on a node's event loop. A member whose name later resolves
/// elsewhere is reached at the new address after a restart.
pub fn resolve_addr(addr: &str) -> Result<SocketAddr, ResolveError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let (host, port) = addr.rsplit_once(':').ok_or(ResolveError::Syntax)?;
    let port: u16 = port.parse().map_err(|_| ResolveError::Syntax)?;
    if host.is_empty() {
        return Err(ResolveError::Syntax);
    }
    let lookup = |reason: String| ResolveError::Lookup {
        host: host.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| lookup(e.to_string()))?
        .collect();
    // IPv4 first: endpoints bind IPv4 sockets unless told otherwise.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| lookup("no address".into()))
}

/// Parses a member list `1=host:port,2=host:port` into (id, address) pairs,
/// sorted by id, resolving host names ([`resolve_addr`]). Ids must be
/// distinct and non-zero.
pub fn parse_members(list: &str) -> Result<Vec<(u64, SocketAddr)>, MembersError> {
    let mut members = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| MembersError::NotIdEqualsAddress { item: item.into() })?;
        let id: u64 = id.trim().parse().map_err(|source| MembersError::BadId {
            item: item.into(),
            source,
        })?;
        if id == 0 {
            return Err(MembersError::IdZero { item: item.into() });
        }
        let addr = resolve_addr(addr.trim()).map_err(|e| match e {
            ResolveError::Syntax => MembersError::BadAddress { item: item.into() },
            ResolveError::Lookup { host, reason } => MembersError::Unresolved {
                item: item.into(),
                host,
                reason,
            },
        })?;
        if members.iter().any(|&(other, _)| other == id) {
            return Err(MembersError::Duplicate { id });
        }
        members.push((id, addr));
    }
    if members.is_empty() {
        return Err(MembersError::Empty);
    }
    members.sort_by_key(|&(id, _)| id);
    Ok(members)
}

/// Formats a member list the way [`parse_members`] reads it.
pub fn format_members(members: &[(u64, SocketAddr)]) -> String {
    members
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What `shoal node` runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// This node's id.
    pub id: u64,
    /// Data directory: RocksDB under `db/`, snapshots under `snapshots/`,
    /// received files under `net-files/`, and `status.json`.
    pub data_dir: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Every member, this node included (with [`Self::join`]: the members
    /// to reach; this node need not be listed).
    pub peers: Vec<(u64, SocketAddr)>,
    /// Join the existing cluster of `peers` (see `NodeConfig::join`): the
    /// node starts with no state and serves once `shoal member add` has
    /// added it and it has caught up. Ignored once it holds state.
    pub join: bool,
    /// Certificate directory (`ca.pem`, `node-<id>.pem`, `node-<id>-key.pem`).
    pub tls_dir: PathBuf,
    /// Compact the log beyond this many bytes (None: never).
    pub max_raft_state_bytes: Option<u64>,
    /// Enable the transport's fault filter (tests only).
    pub fault_injection: bool,
    /// QUIC idle timeout (`Limits::io_timeout_ms`; None: the net default).
    /// A peer that was SIGKILLed and restarted on the same address is only
    /// redialed once the old connection idles out, so a short timeout
    /// shortens how long a restarted node waits to hear from the leader.
    pub io_timeout_ms: Option<u64>,
    /// Most bytes per second the node sends in bulk files
    /// (`Limits::bulk_send_bytes_per_sec_max`; None: no limit).
    pub bulk_send_bytes_per_sec_max: Option<u64>,
    /// Threads of the node's async runtime (the event loop, QUIC); synced
    /// writes run on a separate blocking thread either way.
    pub worker_threads: usize,
    /// A sharded cluster: the nodes of its controller group. The node
    /// hosts the controller group if it is among them, and whatever
    /// replica groups `shoal shard` creates on it; no static KV group.
    /// `None`: the single-group cluster (every node hosts the KV group).
    pub controller: Option<Vec<u64>>,
}

/// Default log size beyond which `shoal node` snapshots and compacts: 64 MiB.
pub const MAX_RAFT_STATE_BYTES_DEFAULT: u64 = 64 << 20;

/// Default of [`NodeOptions::worker_threads`].
pub const WORKER_THREADS_DEFAULT: usize = 2;

/// One node's view of the KV group, as written to its status file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `precandidate` or `unknown`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows of (0: none).
    pub leader: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Process id of the node.
    pub pid: u32,
}

impl NodeStatus {
    /// The KV group's line of a node's status RPC answer, in the status
    /// file's schema (None if the node does not host the KV group).
    pub fn from_report(report: &NodeReport) -> Option<NodeStatus> {
        let g = report.groups.iter().find(|g| g.group == KV_GROUP)?;
        Some(NodeStatus {
            id: report.id,
            role: role_name(Some(g.role)),
            term: g.term,
            leader: g.leader,
            commit: g.commit,
            applied: g.applied,
            pid: report.pid,
        })
    }
}

/// A role as the status schema names it.
fn role_name(role: Option<Role>) -> String {
    match role {
        Some(role) => format!("{role:?}").to_lowercase(),
        None => "unknown".into(),
    }
}

/// Path of a node's status file inside its data directory.
pub fn status_path(data_dir: &Path) -> PathBuf {
    data_dir.join("status.json")
}

/// Reads a node's status file (None if it is missing or half-written).
pub fn read_status(data_dir: &Path) -> Option<NodeStatus> {
    let text = std::fs::read_to_string(status_path(data_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_status(data_dir: &Path, status: &NodeStatus) -> std::io::Result<()> {
    let tmp = data_dir.join("status.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(status).expect("status serializes"))?;
    std::fs::rename(tmp, status_path(data_dir))
}

/// Why [`run_node`] could not start a node, or how it stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeRunError {
    /// [`NodeOptions::peers`] does not list the node itself.
    #[error("--peers must list every member, this node ({id}) included")]
    NotAMember {
        /// The node's id.
        id: u64,
    },
    /// The data directory could not be created.
    #[error("creating {}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The node's certificate could not be loaded.
    #[error("loading the node's certificate")]
    Certificates(#[source] crate::certs::LoadError),
    /// The transport limits are inconsistent.
    #[error("transport limits")]
    Limits(#[source] shoal_net::ConfigError),
    /// The QUIC endpoint could not be bound.
    #[error("binding the QUIC endpoint")]
    Bind(#[source] SetupError),
    /// RocksDB could not be opened.
    #[error("opening RocksDB")]
    Engine(#[source] EngineError),
    /// The node runtime refused to start (e.g. its stored state).
    #[error("starting the node")]
    Start(#[source] NodeError),
    /// The async runtime, a signal handler or the bound address: what the
    /// operating system refused.
    #[error("{what}")]
    Os {
        /// What was being set up.
        what: &'static str,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The node stopped on an error (before or during shutdown).
    #[error("the node stopped on an error")]
    Stopped(#[source] NodeError),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> NodeRunError {
    move |source| NodeRunError::Os { what, source }
}

/// Runs a node until SIGTERM or SIGINT, then shuts it down gracefully (the
/// node answers every waiting caller, then the transport drains its queues).
/// `ready` is called once the node serves, with its bound address.
pub fn run_node(options: NodeOptions, ready: impl FnOnce(SocketAddr)) -> Result<(), NodeRunError> {
    run_node_with(options, ready, |_| async {})
}

/// [`run_node`], with `service` run beside the node on its runtime: it is
/// started first (before the engine opens, so it can report
/// [`Readiness::Starting`]), given a [`NodeProbe`], and owned by the
/// runner: once the node and its transport have shut down (or failed to
/// start), the probe's [`NodeProbe::stopped`] resolves and the service has
/// [`SERVICE_STOP_MS`] to return before it is aborted. A service must not
/// block its thread.
pub fn run_node_with<S, F>(
    options: NodeOptions,
    ready: impl FnOnce(SocketAddr),
    service: S,
) -> Result<(), NodeRunError>
where
    S: FnOnce(NodeProbe) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    if !options.join && !options.peers.iter().any(|&(id, _)| id == options.id) {
        return Err(NodeRunError::NotAMember { id: options.id });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.worker_threads.max(1))
        .enable_all()
        .thread_name("shoal-node")
        .build()
        .map_err(os("starting the runtime"))?;
    runtime.block_on(async move {
        let (readiness, readiness_rx) = tokio::sync::watch::channel(Readiness::Starting);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut services = tokio::task::JoinSet::new();
        services.spawn(service(NodeProbe {
            readiness: readiness_rx,
            stop: stop_rx,
        }));
        let result = serve_node(options, ready, &readiness).await;
        if result.is_err() {
            readiness.send_replace(Readiness::Stopped);
        }
        let _ = stop.send(true);
        let stopped = tokio::time::timeout(Duration::from_millis(SERVICE_STOP_MS), async {
            while services.join_next().await.is_some() {}
        })
        .await;
        if stopped.is_err() {
            tracing::warn!("a service beside the node did not stop in time; aborted");
            services.abort_all();
            while services.join_next().await.is_some() {}
        }
        result
    })
}

/// The node itself: opens everything, serves until a signal, shuts down.
async fn serve_node(
    options: NodeOptions,
    ready: impl FnOnce(SocketAddr),
    readiness: &tokio::sync::watch::Sender<Readiness>,
) -> Result<(), NodeRunError> {
    let identity = crate::certs::load(&options.tls_dir, &Peer::Node(NodeId(options.id)))
        .map_err(NodeRunError::Certificates)?;
    std::fs::create_dir_all(&options.data_dir).map_err(|source| NodeRunError::DataDir {
        path: options.data_dir.clone(),
        source,
    })?;
    let members: HashMap<NodeId, SocketAddr> = options
        .peers
        .iter()
        .map(|&(id, addr)| (NodeId(id), addr))
        .collect();
    let mut net_config = shoal_net::NodeConfig::new(
        NodeId(options.id),
        options.listen,
        members,
        options.data_dir.join("net-files"),
    );
    net_config.fault_injection_enabled = options.fault_injection;
    if let Some(ms) = options.io_timeout_ms {
        net_config.limits.io_timeout_ms = ms;
    }
    if let Some(rate) = options.bulk_send_bytes_per_sec_max {
        net_config.limits.bulk_send_bytes_per_sec_max = rate;
    }
    net_config.validate().map_err(NodeRunError::Limits)?;
    let (quic, inbox) =
        QuicNode::<KvProtocol>::bind(net_config, &identity).map_err(NodeRunError::Bind)?;
    let engine = RocksEngine::open(options.data_dir.join("db"), EngineConfig::default())
        .map_err(NodeRunError::Engine)?;
    let mut config = NodeConfig::new(
        options.id,
        options.peers.iter().map(|&(id, _)| id).collect(),
        options.data_dir.join("db").join("snapshots"),
    );
    config.blocking_io = true;
    config.join = options.join;
    config.max_raft_state_bytes = options.max_raft_state_bytes;
    if let Some(controller) = &options.controller {
        config.groups = if controller.contains(&options.id) {
            vec![GroupSpec {
                group: CONTROLLER_GROUP,
                static_shards: vec![CONTROLLER_SHARD],
                voters: controller.clone(),
            }]
        } else {
            Vec::new()
        };
    }
    let handle = Node::start(config, engine, quic.clone(), inbox).map_err(NodeRunError::Start)?;
    ready(quic.local_addr().map_err(os("local address"))?);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(os("handling SIGTERM"))?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(os("handling SIGINT"))?;
    let mut ticker = tokio::time::interval(Duration::from_millis(STATUS_INTERVAL_MS));
    let pid = std::process::id();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            _ = ticker.tick() => {
                readiness.send_replace(Readiness::of(&handle));
                if !handle.is_running() {
                    break;
                }
                let s = handle.status(KV_GROUP);
                let role = role_name(s.role);
                let status = NodeStatus { id: options.id, role, term: s.term, leader: s.leader, commit: s.commit, applied: s.applied, pid };
                if let Err(e) = write_status(&options.data_dir, &status) {
                    tracing::warn!(error = %e, "writing the status file");
                }
            }
        }
    }
    tracing::info!(id = options.id, "shutting down");
    if handle.is_running() {
        readiness.send_replace(Readiness::ShuttingDown);
    }
    let stopped = handle.shutdown().await;
    quic.shutdown().await;
    stopped.map_err(NodeRunError::Stopped)
}

/// Which certificate a client presents: `client-<name>.pem` from the TLS
/// directory. `shoal certs init` issues `client` and `admin` by default.
pub const CLIENT_NAME_DEFAULT: &str = "client";

/// A fresh session id for a client: random, never 0. Sessions are how a
/// cluster deduplicates retried writes, so two live clients must not share
/// one; 64 random bits make a collision negligible.
pub fn fresh_client_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// Settings of a cluster [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name of the client certificate to present (`client-<name>.pem`).
    pub name: String,
    /// How long one operation may take, retries included.
    pub op_deadline: Duration,
    /// How long one attempt at one node may take.
    pub rpc_deadline: Duration,
    /// A sharded cluster: the nodes of its controller group; keys are then
    /// routed by the configuration it publishes. `None`: one KV group.
    pub controller: Option<Vec<u64>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: CLIENT_NAME_DEFAULT.into(),
            op_deadline: Duration::from_secs(10),
            rpc_deadline: Duration::from_secs(1),
            controller: None,
        }
    }
}

/// Why a client could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The certificate directory could not be read or names someone else.
    #[error("loading the client certificate")]
    Certificates(#[source] crate::certs::LoadError),
    /// The QUIC endpoint could not be set up.
    #[error("setting up the QUIC client")]
    Transport(#[from] SetupError),
    /// No member was given.
    #[error("no cluster member given")]
    NoMembers,
    /// The client options cannot be used (e.g. a deadline longer than half
    /// the session idle time).
    #[error("client options")]
    Options(#[from] shoal_shard::client::ClientConfigError),
}

/// A client of a Shoal cluster over QUIC with mutual TLS: linearizable
/// reads and writes, exactly-once writes through a session, leader
/// discovery and retries within a deadline (see `shoal_shard::client`).
/// Cheap to clone; clones share the session and run one operation at a
/// time. Must be created and used inside a tokio runtime.
#[derive(Debug, Clone)]
pub struct Client {
    inner: shoal_shard::Client<QuicClient<KvProtocol>>,
    quic: QuicClient<KvProtocol>,
    members: Vec<u64>,
    options: ClientOptions,
}

impl Client {
    /// Connects to the cluster `members` (id and address of every node)
    /// with the certificate `client-<name>` from `tls_dir`. Connections are
    /// dialed lazily, on the first operation.
    pub fn connect(members: &[(u64, SocketAddr)], tls_dir: &Path) -> Result<Client, ConnectError> {
        Client::connect_with(members, tls_dir, ClientOptions::default())
    }

    /// [`Client::connect`] with explicit options.
    pub fn connect_with(
        members: &[(u64, SocketAddr)],
        tls_dir: &Path,
        options: ClientOptions,
    ) -> Result<Client, ConnectError> {
        if members.is_empty() {
            return Err(ConnectError::NoMembers);
        }
        let identity = crate::certs::load(tls_dir, &Peer::Client(options.name.clone()))
            .map_err(ConnectError::Certificates)?;
        let nodes: HashMap<NodeId, SocketAddr> = members
            .iter()
            .map(|&(id, addr)| (NodeId(id), addr))
            .collect();
        let quic = QuicClient::new(&identity, nodes, Limits::default())?;
        let members: Vec<u64> = members.iter().map(|&(id, _)| id).collect();
        let inner = session(&quic, &members, &options)?;
        Ok(Client {
            inner,
            quic,
            members,
            options,
        })
    }

    /// Another client on the same connections with a session of its own,
    /// so that it can have an operation in flight while this one does.
    pub fn new_session(&self) -> shoal_shard::Client<QuicClient<KvProtocol>> {
        session(&self.quic, &self.members, &self.options)
            .expect("options that made this client make another")
    }

    /// Closes the connections (waits briefly for the nodes to be told).
    pub async fn close(&self) {
        self.quic.close().await;
    }
}

fn session(
    quic: &QuicClient<KvProtocol>,
    members: &[u64],
    options: &ClientOptions,
) -> Result<shoal_shard::Client<QuicClient<KvProtocol>>, shoal_shard::client::ClientConfigError> {
    let mut config = shoal_shard::ClientConfig::new(fresh_client_id());
    config.op_deadline = options.op_deadline;
    config.rpc_deadline = options.rpc_deadline;
    match &options.controller {
        Some(controller) => shoal_shard::Client::sharded(
            quic.clone(),
            controller.iter().copied().map(NodeId).collect(),
            config,
        ),
        None => shoal_shard::Client::try_new(
            quic.clone(),
            members.iter().copied().map(NodeId).collect(),
            config,
        ),
    }
}

/// The shard client this wraps: every KV operation (`get`, `put`,
/// `put_if_version`, `append`, `delete`, `scan`, `id`) is
/// [`shoal_shard::Client`]'s.
impl std::ops::Deref for Client {
    type Target = shoal_shard::Client<QuicClient<KvProtocol>>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

/// A blocking [`Client`] for synchronous programs: it owns a small tokio
/// runtime. Do not call it from inside an async context.
#[derive(Debug)]
pub struct BlockingClient {
    inner: shoal_shard::BlockingClient<QuicClient<KvProtocol>>,
    quic: QuicClient<KvProtocol>,
}

impl BlockingClient {
    /// See [`Client::connect`].
    pub fn connect(
        members: &[(u64, SocketAddr)],
        tls_dir: &Path,
    ) -> Result<BlockingClient, ConnectError> {
        BlockingClient::connect_with(members, tls_dir, ClientOptions::default())
    }

    /// See [`Client::connect_with`].
    pub fn connect_with(
        members: &[(u64, SocketAddr)],
        tls_dir: &Path,
        options: ClientOptions,
    ) -> Result<BlockingClient, ConnectError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        let Client { inner, quic, .. } =
            runtime.block_on(async { Client::connect_with(members, tls_dir, options) })?;
        Ok(BlockingClient {
            inner: shoal_shard::BlockingClient::new(runtime, inner),
            quic,
        })
    }

    /// Closes the connections (waits briefly for the nodes to be told).
    pub fn close(self) {
        self.inner.block_on(self.quic.close());
    }
}

/// Every KV operation is [`shoal_shard::BlockingClient`]'s.
impl std::ops::Deref for BlockingClient {
    type Target = shoal_shard::BlockingClient<QuicClient<KvProtocol>>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lists_parse_sorted_or_name_what_is_wrong() {
        let members = parse_members(" 2=127.0.0.1:7002, 1=127.0.0.1:7001,").unwrap();
        assert_eq!(
            format_members(&members),
            "1=127.0.0.1:7001,2=127.0.0.1:7002"
        );
        let refused = |list: &str| parse_members(list).unwrap_err();
        assert!(matches!(
            refused("1"),
            MembersError::NotIdEqualsAddress { .. }
        ));
        assert!(matches!(
            refused("x=127.0.0.1:1"),
            MembersError::BadId { .. }
        ));
        assert!(matches!(
            refused("0=127.0.0.1:1"),
            MembersError::IdZero { .. }
        ));
        assert!(matches!(
            refused("1=localhost"),
            MembersError::BadAddress { .. }
        ));
        assert!(matches!(
            refused("1=:7001"),
            MembersError::BadAddress { .. }
        ));
        // Host names resolve (`localhost` needs no DNS server).
        let named = parse_members("1=localhost:7001").unwrap();
        assert!(named[0].1.ip().is_loopback() && named[0].1.port() == 7001);
        assert!(matches!(
            refused("1=no-such-host.invalid:7001"),
            MembersError::Unresolved { .. }
        ));
        assert_eq!(
            refused("1=127.0.0.1:1,1=127.0.0.1:2"),
            MembersError::Duplicate { id: 1 }
        );
        assert_eq!(refused(" , "), MembersError::Empty);
    }
}

/// One member of a group as `shoal member list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberLine {
    /// The member's id.
    pub id: u64,
    /// `voter` or `learner`.
    pub member: String,
    /// Whether it leads the group.
    pub leader: bool,
    /// The highest log index the leader knows it holds (None: the leader's
    /// own line, or no leader answered).
    pub matched: Option<u64>,
}

/// The membership of `group` as the leader among `nodes` reports it (or,
/// without an answering leader, the node of the highest term): one line
/// per member.
pub async fn member_lines(
    client: &shoal_shard::Client<QuicClient<KvProtocol>>,
    group: u64,
    nodes: &[NodeId],
) -> Result<Vec<MemberLine>, shoal_shard::client::AdminError> {
    let mut best: Option<shoal_shard::protocol::GroupReport> = None;
    let mut last_error = None;
    for &node in nodes {
        match client.node_status(node).await {
            Ok(report) => {
                let Some(g) = report.groups.into_iter().find(|g| g.group == group) else {
                    continue;
                };
                let better = best.as_ref().is_none_or(|b| {
                    (g.role == Role::Leader, g.term) > (b.role == Role::Leader, b.term)
                });
                if better {
                    best = Some(g);
                }
            }
            Err(e) => last_error = Some(e),
        }
    }
    let Some(g) = best else {
        return Err(last_error.unwrap_or_else(|| {
            shoal_shard::client::AdminError::Unexpected(format!("no node hosts group {group}"))
        }));
    };
    let line = |id: u64, member: &str| MemberLine {
        id,
        member: member.into(),
        leader: g.leader == id,
        matched: g.matched.iter().find(|(m, _)| *m == id).map(|(_, i)| *i),
    };
    Ok(g.voters
        .iter()
        .map(|&v| line(v, "voter"))
        .chain(g.learners.iter().map(|&l| line(l, "learner")))
        .collect())
}
