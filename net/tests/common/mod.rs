//! Shared helpers for the net integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_net::certs::{ClusterCa, Identity};
use shoal_net::quic::QuicNode;
use shoal_net::{IncomingRpc, Limits, NodeConfig, NodeId, Protocol};
use tokio::sync::mpsc;

/// The protocol the tests speak.
pub struct TestProto;

/// A peer message: a sequence number and a payload.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub seq: u64,
    pub body: Vec<u8>,
}

/// RPC request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Req {
    Echo(String),
    /// Reply after this many milliseconds.
    Slow(u64),
    /// The handler drops the responder.
    NoReply,
}

impl Protocol for TestProto {
    type Message = Msg;
    type Request = Req;
    type Response = String;
    type FileMeta = String;

    /// Files whose meta starts with "ack:" are delivered only once the
    /// receiver says they are stored.
    fn file_needs_ack(meta: &String) -> bool {
        meta.starts_with("ack:")
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Polls `cond` every 5 ms until it holds; panics after `limit`.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, limit: Duration, mut cond: F) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `fut`, panicking after `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

pub const LONG: Duration = Duration::from_secs(20);

/// Answers RPCs: Echo(s) -> "<id>:<s>", Slow(ms) -> after ms, NoReply -> drops.
pub fn spawn_rpc_server(id: NodeId, mut rpcs: mpsc::Receiver<IncomingRpc<TestProto>>) {
    tokio::spawn(async move {
        while let Some(rpc) = rpcs.recv().await {
            match rpc.request {
                Req::Echo(s) => {
                    rpc.reply.send(format!("{}:{s}", id.0));
                }
                Req::Slow(ms) => {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        rpc.reply.send(format!("slept {ms}"));
                    });
                }
                Req::NoReply => drop(rpc.reply),
            }
        }
    });
}

pub struct TestNode {
    pub id: NodeId,
    pub node: QuicNode<TestProto>,
    pub messages: mpsc::Receiver<(NodeId, Msg)>,
    pub files: mpsc::Receiver<shoal_net::ReceivedFile<String>>,
    pub addr: SocketAddr,
    pub dir: Arc<tempfile::TempDir>,
}

pub fn node_config(id: NodeId, dir: &std::path::Path, limits: Limits) -> NodeConfig {
    let mut config = NodeConfig::new(
        id,
        loopback(),
        HashMap::new(),
        dir.join(format!("files-{}", id.0)),
    );
    config.limits = limits;
    config.fault_injection_enabled = true;
    config
}

/// Binds a node (serving echo RPCs) with the given identity.
pub fn start_node(
    config: NodeConfig,
    identity: &Identity,
    dir: Arc<tempfile::TempDir>,
) -> TestNode {
    let id = config.id;
    let (node, inbox) = QuicNode::<TestProto>::bind(config, identity).expect("bind");
    spawn_rpc_server(id, inbox.rpcs);
    let addr = node.local_addr().unwrap();
    TestNode {
        id,
        node,
        messages: inbox.messages,
        files: inbox.files,
        addr,
        dir,
    }
}

/// `n` nodes (ids 1..=n) that all know each other.
pub struct Cluster {
    pub ca: ClusterCa,
    pub nodes: Vec<TestNode>,
    pub dir: Arc<tempfile::TempDir>,
}

impl Cluster {
    pub fn start(n: u64, limits: Limits) -> Cluster {
        let ca = ClusterCa::generate().unwrap();
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut nodes = Vec::new();
        for i in 1..=n {
            let id = NodeId(i);
            let identity = ca.issue_node(id).unwrap();
            nodes.push(start_node(
                node_config(id, dir.path(), limits.clone()),
                &identity,
                dir.clone(),
            ));
        }
        for a in &nodes {
            for b in &nodes {
                a.node.set_member(b.id, b.addr);
            }
        }
        Cluster { ca, nodes, dir }
    }

    pub fn addrs(&self) -> HashMap<NodeId, SocketAddr> {
        self.nodes.iter().map(|n| (n.id, n.addr)).collect()
    }
}

pub fn msg(seq: u64, len: usize) -> Msg {
    Msg {
        seq,
        body: vec![(seq % 251) as u8; len],
    }
}

/// A raw QUIC connection to `addr`, expecting the server to be `server`,
/// presenting `identity` and offering `alpn`. For feeding nodes bad input.
pub async fn raw_connect(
    identity: &Identity,
    addr: SocketAddr,
    server: NodeId,
    alpn: &[u8],
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let config = shoal_net::certs::client_config(
        identity,
        &[alpn],
        Arc::new(quinn::TransportConfig::default()),
    )
    .unwrap();
    let connecting = endpoint
        .connect_with(config, addr, &format!("node-{}.shoal", server.0))
        .unwrap();
    let conn = connecting.await;
    (endpoint, conn)
}

/// The hello that opens a message stream, claiming `id`.
pub fn hello(id: NodeId) -> Vec<u8> {
    let mut h = vec![
        shoal_net::quic::KIND_MESSAGES,
        shoal_net::quic::HELLO_VERSION,
    ];
    h.extend_from_slice(&id.0.to_be_bytes());
    h.extend_from_slice(&7u64.to_be_bytes()); // incarnation
    h
}

/// Waits until `conn` is closed and returns the application close code, if any.
pub async fn close_code(conn: &quinn::Connection) -> Option<u64> {
    match within("connection close", LONG, conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}
