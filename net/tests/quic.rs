//! Real QUIC on 127.0.0.1: round trips, mutual-TLS refusals, shutdown drain,
//! reconnect after a restart, and the fault filter.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use shoal_net::certs::ClusterCa;
use shoal_net::quic::{QuicClient, QuicNode};
use shoal_net::{Limits, NodeId, Peer, RpcCaller, RpcError, Transport};

#[tokio::test]
async fn peer_messages_round_trip_in_order() {
    // Goal: messages between nodes arrive, in order per sender, with the sender's id.
    let mut c = Cluster::start(3, Limits::default());
    for seq in 0..500 {
        c.nodes[0].node.send(NodeId(2), msg(seq, 256));
        c.nodes[2].node.send(NodeId(2), msg(seq, 10));
    }
    let mut from1 = Vec::new();
    let mut from3 = Vec::new();
    while from1.len() + from3.len() < 1000 {
        let (from, m) = within("messages", LONG, c.nodes[1].messages.recv())
            .await
            .unwrap();
        match from.0 {
            1 => from1.push(m.seq),
            3 => from3.push(m.seq),
            other => panic!("unexpected sender {other}"),
        }
    }
    assert_eq!(from1, (0..500).collect::<Vec<_>>());
    assert_eq!(from3, (0..500).collect::<Vec<_>>());
    let stats = c.nodes[0].node.stats();
    assert_eq!(stats.messages_sent, 500);
    assert!(
        stats.frames_sent < 500,
        "small messages are batched: {stats:?}"
    );
    assert_eq!(c.nodes[1].node.stats().messages_received, 1000);
}

#[tokio::test]
async fn rpc_round_trips_from_nodes_and_clients() {
    // Goal: node->node and client->node RPCs work; the server sees the caller's certificate identity.
    let c = Cluster::start(2, Limits::default());
    let reply = c.nodes[0]
        .node
        .call(NodeId(2), Req::Echo("hi".into()))
        .await
        .unwrap();
    assert_eq!(reply, "2:hi");
    let client: QuicClient<TestProto> = QuicClient::new(
        &c.ca.issue_client("alice").unwrap(),
        c.addrs(),
        Limits::default(),
    )
    .unwrap();
    for i in 0..50 {
        let reply = client
            .call(NodeId(1 + i % 2), Req::Echo(format!("{i}")))
            .await
            .unwrap();
        assert_eq!(reply, format!("{}:{i}", 1 + i % 2));
    }
    // Concurrent calls share the one connection.
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call(NodeId(1), Req::Echo(format!("{i}"))).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), format!("1:{i}"));
    }
    client.close().await;
}

#[tokio::test]
async fn rpc_caller_identity_is_read_from_the_certificate() {
    // Goal: the handler's `from` is the identity in the caller's certificate.
    let ca = ClusterCa::generate().unwrap();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let (node, mut inbox) = QuicNode::<TestProto>::bind(
        node_config(NodeId(1), dir.path(), Limits::default()),
        &ca.issue_node(NodeId(1)).unwrap(),
    )
    .unwrap();
    let addr = node.local_addr().unwrap();
    let client = QuicClient::<TestProto>::new(
        &ca.issue_client("bob").unwrap(),
        [(NodeId(1), addr)].into_iter().collect(),
        Limits::default(),
    )
    .unwrap();
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(NodeId(1), Req::Echo("x".into())).await }
    });
    let rpc = within("rpc", LONG, inbox.rpcs.recv()).await.unwrap();
    assert_eq!(rpc.from, Peer::Client("bob".into()));
    rpc.reply.send("ok".into());
    assert_eq!(call.await.unwrap().unwrap(), "ok");
}

#[tokio::test]
async fn rpc_deadline_and_dropped_responder_fail_the_call() {
    let c = Cluster::start(1, Limits::default());
    let client: QuicClient<TestProto> = QuicClient::new(
        &c.ca.issue_client("c").unwrap(),
        c.addrs(),
        Limits::default(),
    )
    .unwrap();
    let err = client
        .call_with_deadline(NodeId(1), Req::Slow(2_000), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(err, RpcError::Timeout);
    let err = client.call(NodeId(1), Req::NoReply).await.unwrap_err();
    assert!(matches!(err, RpcError::Lost(_)), "{err:?}");
    assert!(matches!(
        client.call(NodeId(9), Req::Echo("x".into())).await,
        Err(RpcError::UnknownNode(NodeId(9)))
    ));
    // The connection is still fine afterwards.
    assert_eq!(
        client.call(NodeId(1), Req::Echo("x".into())).await.unwrap(),
        "1:x"
    );
}

#[tokio::test]
async fn mtls_refuses_a_foreign_ca() {
    // Goal: a client or a node whose certificate is signed by another CA is refused both ways.
    let c = Cluster::start(1, Limits::default());
    let other = ClusterCa::generate().unwrap();
    let client: QuicClient<TestProto> = QuicClient::new(
        &other.issue_client("mallory").unwrap(),
        c.addrs(),
        Limits::default(),
    )
    .unwrap();
    let err = client
        .call(NodeId(1), Req::Echo("x".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::Unreachable { .. } | RpcError::Lost(_)),
        "{err:?}"
    );
    // A node of the other CA posing as node 2: node 1 refuses to trust its server cert either.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let fake = start_node(
        node_config(NodeId(2), dir.path(), Limits::default()),
        &other.issue_node(NodeId(2)).unwrap(),
        dir,
    );
    c.nodes[0].node.set_member(NodeId(2), fake.addr);
    let err = c.nodes[0]
        .node
        .call(NodeId(2), Req::Echo("x".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unreachable { .. }), "{err:?}");
    wait_until("refusals counted", LONG, || {
        c.nodes[0].node.stats().connections_refused >= 1
    })
    .await;
    // The node still serves a legitimate client.
    let good: QuicClient<TestProto> = QuicClient::new(
        &c.ca.issue_client("alice").unwrap(),
        c.addrs(),
        Limits::default(),
    )
    .unwrap();
    assert_eq!(
        good.call(NodeId(1), Req::Echo("x".into())).await.unwrap(),
        "1:x"
    );
}

#[tokio::test]
async fn mtls_refuses_expired_certificates() {
    let c = Cluster::start(1, Limits::default());
    let now = time::OffsetDateTime::now_utc();
    let day = Duration::from_secs(86_400);
    let expired =
        c.ca.issue(&Peer::Client("old".into()), now - day * 10, now - day)
            .unwrap();
    let client: QuicClient<TestProto> =
        QuicClient::new(&expired, c.addrs(), Limits::default()).unwrap();
    assert!(client.call(NodeId(1), Req::Echo("x".into())).await.is_err());
    // An expired *server* certificate is refused by the dialer too.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let expired_node =
        c.ca.issue(&Peer::Node(NodeId(2)), now - day * 10, now - day)
            .unwrap();
    let stale = start_node(
        node_config(NodeId(2), dir.path(), Limits::default()),
        &expired_node,
        dir,
    );
    c.nodes[0].node.set_member(NodeId(2), stale.addr);
    let err = c.nodes[0]
        .node
        .call(NodeId(2), Req::Echo("x".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn a_server_with_another_nodes_certificate_is_refused() {
    // Goal: dialing node 2's address while expecting node 1 fails (the server's cert names node 2).
    let c = Cluster::start(2, Limits::default());
    let client: QuicClient<TestProto> = QuicClient::new(
        &c.ca.issue_client("alice").unwrap(),
        [(NodeId(1), c.nodes[1].addr)].into_iter().collect(),
        Limits::default(),
    )
    .unwrap();
    let err = client
        .call(NodeId(1), Req::Echo("x".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn a_node_not_in_the_membership_is_refused() {
    let c = Cluster::start(1, Limits::default());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut stranger = start_node(
        node_config(NodeId(7), dir.path(), Limits::default()),
        &c.ca.issue_node(NodeId(7)).unwrap(),
        dir,
    );
    stranger.node.set_member(NodeId(1), c.nodes[0].addr);
    stranger.node.send(NodeId(1), msg(1, 8));
    assert!(stranger
        .node
        .call(NodeId(1), Req::Echo("x".into()))
        .await
        .is_err());
    wait_until("refusal", LONG, || {
        c.nodes[0].node.stats().connections_refused >= 1
    })
    .await;
    assert!(stranger.messages.try_recv().is_err());
}

#[tokio::test]
async fn shutdown_drains_accepted_messages_and_rpcs() {
    // Goal: everything handed to `send` before `shutdown` is delivered, and an RPC in progress gets its reply.
    let mut c = Cluster::start(2, Limits::default());
    let client: QuicClient<TestProto> = QuicClient::new(
        &c.ca.issue_client("c").unwrap(),
        c.addrs(),
        Limits::default(),
    )
    .unwrap();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.call(NodeId(1), Req::Slow(300)).await }
    });
    wait_until("slow rpc accepted", LONG, || {
        c.nodes[0].node.stats().rpcs_received == 1
    })
    .await;
    for seq in 0..2_000 {
        c.nodes[0].node.send(NodeId(2), msg(seq, 100));
    }
    within("shutdown", LONG, c.nodes[0].node.shutdown()).await;
    for seq in 0..2_000 {
        let (from, m) = within("drained messages", LONG, c.nodes[1].messages.recv())
            .await
            .unwrap();
        assert_eq!((from, m.seq), (NodeId(1), seq));
    }
    assert_eq!(slow.await.unwrap().unwrap(), "slept 300");
}

#[tokio::test]
async fn reconnects_after_the_peer_restarts() {
    // Goal: after node 2 stops and comes back on the same address, node 1's queue reaches it again.
    let limits = Limits {
        reconnect_backoff_min_ms: 5,
        reconnect_backoff_max_ms: 100,
        ..Limits::default()
    };
    let mut c = Cluster::start(2, limits.clone());
    c.nodes[0].node.send(NodeId(2), msg(0, 8));
    assert_eq!(
        within("first", LONG, c.nodes[1].messages.recv())
            .await
            .unwrap()
            .1
            .seq,
        0
    );
    let old = c.nodes.pop().unwrap();
    let addr = old.addr;
    old.node.shutdown().await;
    drop(old);
    // Node 1 sends while node 2 is down; those messages may be lost.
    for seq in 1..10 {
        c.nodes[0].node.send(NodeId(2), msg(seq, 8));
    }
    let identity = c.ca.issue_node(NodeId(2)).unwrap();
    let mut config = node_config(NodeId(2), c.dir.path(), limits);
    config.listen_addr = addr;
    config.members = [(NodeId(1), c.nodes[0].addr)].into_iter().collect();
    let mut restarted = None;
    for _ in 0..200 {
        match QuicNode::<TestProto>::bind(config.clone(), &identity) {
            Ok(pair) => {
                restarted = Some(pair);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (node2, mut inbox2) = restarted.expect("rebind on the same port");
    spawn_rpc_server(NodeId(2), inbox2.rpcs);
    let mut seq = 100;
    loop {
        c.nodes[0].node.send(NodeId(2), msg(seq, 8));
        seq += 1;
        match tokio::time::timeout(Duration::from_millis(50), inbox2.messages.recv()).await {
            Ok(Some((from, _))) => {
                assert_eq!(from, NodeId(1));
                break;
            }
            _ => assert!(seq < 100 + 400, "node 1 never reconnected"),
        }
    }
    assert_eq!(
        c.nodes[0]
            .node
            .call(NodeId(2), Req::Echo("back".into()))
            .await
            .unwrap(),
        "2:back"
    );
    node2.shutdown().await;
}

#[tokio::test]
async fn fault_filter_cuts_and_restores_traffic() {
    let mut c = Cluster::start(2, Limits::default());
    let n1 = c.nodes[0].node.clone();
    n1.set_fault_filter(&[NodeId(2)]).unwrap();
    assert!(n1.call(NodeId(2), Req::Echo("x".into())).await.is_err());
    n1.send(NodeId(2), msg(1, 8));
    c.nodes[1].node.send(NodeId(1), msg(2, 8));
    wait_until("both directions dropped", LONG, || {
        n1.stats().messages_dropped_other >= 2
    })
    .await;
    assert!(c.nodes[1].messages.try_recv().is_err());
    assert!(c.nodes[0].messages.try_recv().is_err());
    assert_eq!(n1.fault_filter(), vec![NodeId(2)]);
    n1.clear_fault_filter().unwrap();
    assert!(n1.fault_filter().is_empty());
    n1.send(NodeId(2), msg(3, 8));
    assert_eq!(
        within("after heal", LONG, c.nodes[1].messages.recv())
            .await
            .unwrap()
            .1
            .seq,
        3
    );
    assert_eq!(
        n1.call(NodeId(2), Req::Echo("x".into())).await.unwrap(),
        "2:x"
    );
}

#[tokio::test]
async fn fault_filter_is_off_by_default() {
    let ca = ClusterCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(NodeId(1), dir.path(), Limits::default());
    config.fault_injection_enabled = false;
    let (node, _inbox) =
        QuicNode::<TestProto>::bind(config, &ca.issue_node(NodeId(1)).unwrap()).unwrap();
    assert_eq!(
        node.set_fault_filter(&[NodeId(2)]),
        Err(shoal_net::FaultFilterError::Disabled)
    );
    assert_eq!(
        node.clear_fault_filter(),
        Err(shoal_net::FaultFilterError::Disabled)
    );
}

#[tokio::test]
async fn bind_refuses_a_certificate_for_another_id_and_bad_limits() {
    let ca = ClusterCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(NodeId(1), dir.path(), Limits::default());
    assert!(
        QuicNode::<TestProto>::bind(config.clone(), &ca.issue_node(NodeId(2)).unwrap()).is_err()
    );
    let mut bad = config;
    bad.limits.chunk_bytes = bad.limits.max_frame_bytes;
    assert!(QuicNode::<TestProto>::bind(bad, &ca.issue_node(NodeId(1)).unwrap()).is_err());
}

#[tokio::test]
async fn rpc_concurrency_is_limited_per_connection() {
    // Goal: with rpc_concurrency_max = 4, a client firing 20 slow calls at once
    // has at most 4 in the server's hands at any time; the rest wait their turn.
    let limits = Limits {
        rpc_concurrency_max: 4,
        ..Limits::default()
    };
    let ca = ClusterCa::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (node, mut inbox) = QuicNode::<TestProto>::bind(
        node_config(NodeId(1), dir.path(), limits.clone()),
        &ca.issue_node(NodeId(1)).unwrap(),
    )
    .unwrap();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let (active, peak) = (active.clone(), peak.clone());
        async move {
            while let Some(rpc) = inbox.rpcs.recv().await {
                let now = active.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                let active = active.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    rpc.reply.send("done".into());
                });
            }
        }
    });
    let client: QuicClient<TestProto> = QuicClient::new(
        &ca.issue_client("c").unwrap(),
        [(NodeId(1), node.local_addr().unwrap())]
            .into_iter()
            .collect(),
        limits,
    )
    .unwrap();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.call(NodeId(1), Req::NoReply).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "done");
    }
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=4).contains(&peak), "peak concurrency {peak}");
}

#[tokio::test]
async fn a_ca_reloaded_from_its_key_issues_certificates_the_cluster_trusts() {
    // Goal: `shoal certs` can reload the CA from its key file and issue more
    // certificates that nodes holding the original CA certificate accept.
    let c = Cluster::start(1, Limits::default());
    let reloaded = ClusterCa::from_pem(&c.ca.key_pem()).unwrap();
    let mut identity = reloaded.issue_client("later").unwrap();
    identity.ca_cert_pem = c.ca.cert_pem();
    let client: QuicClient<TestProto> =
        QuicClient::new(&identity, c.addrs(), Limits::default()).unwrap();
    assert_eq!(
        client.call(NodeId(1), Req::Echo("x".into())).await.unwrap(),
        "1:x"
    );
}

/// A UDP relay standing between a node and one peer: while `up` it forwards
/// datagrams both ways; once down it swallows them, so the peer looks like
/// a process that died (or a network that black-holes it) without closing
/// anything. Returns the address to use for the peer.
fn udp_relay(
    peer: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    let front = Arc::new(
        tokio::net::UdpSocket::from_std({
            let s = std::net::UdpSocket::bind(loopback()).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .unwrap(),
    );
    let back = Arc::new(
        tokio::net::UdpSocket::from_std({
            let s = std::net::UdpSocket::bind(loopback()).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .unwrap(),
    );
    let addr = front.local_addr().unwrap();
    let client: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
    tokio::spawn({
        let (front, back, up, client) = (front.clone(), back.clone(), up.clone(), client.clone());
        async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if up.load(Ordering::Relaxed) {
                    let _ = back.send_to(&buf[..n], peer).await;
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = back.recv_from(&mut buf).await {
            let to = *client.lock().unwrap();
            if let (true, Some(to)) = (up.load(Ordering::Relaxed), to) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn shutdown_with_a_dead_peer_is_prompt() {
    // Goal: shutdown does not wait on peers that will never answer. Node 1
    // has a live peer (node 2), a peer that was connected and then went
    // silent (node 3, behind a relay that starts dropping everything), and a
    // peer that never answered at all (node 4: an address nobody serves).
    // Messages queued for all three at shutdown: the live peer gets them,
    // and shutdown returns within the drain bound, not after the handshake
    // or idle timeouts (10 s).
    let mut c = Cluster::start(3, Limits::default());
    let relay_up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relay = udp_relay(c.nodes[2].addr, relay_up.clone());
    c.nodes[0].node.set_member(NodeId(3), relay);
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    c.nodes[0]
        .node
        .set_member(NodeId(4), silent.local_addr().unwrap());
    // Node 3 is reachable through the relay at first.
    c.nodes[0].node.send(NodeId(3), msg(0, 8));
    assert_eq!(
        within("through the relay", LONG, c.nodes[2].messages.recv())
            .await
            .unwrap()
            .1
            .seq,
        0
    );
    relay_up.store(false, std::sync::atomic::Ordering::Relaxed);
    for seq in 1..=100 {
        c.nodes[0].node.send(NodeId(2), msg(seq, 100));
        c.nodes[0].node.send(NodeId(3), msg(seq, 100));
        c.nodes[0].node.send(NodeId(4), msg(seq, 100));
    }
    let started = std::time::Instant::now();
    within("shutdown", LONG, c.nodes[0].node.shutdown()).await;
    let took = started.elapsed();
    eprintln!("shutdown with a dead peer took {took:?}");
    assert!(
        took < Duration::from_millis(
            Limits::default().shutdown_drain_ms + shoal_net::quic::CLOSE_LINGER_MS
        ) + Duration::from_secs(1),
        "shutdown took {took:?} with dead peers"
    );
    for seq in 1..=100 {
        let (from, m) = within("drained to the live peer", LONG, c.nodes[1].messages.recv())
            .await
            .unwrap();
        assert_eq!((from, m.seq), (NodeId(1), seq));
    }
    drop(silent);
}
