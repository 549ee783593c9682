//! Bad input from authenticated and unauthenticated peers: garbage, truncated
//! and oversized frames, undecodable messages, wrong ALPN, a forged node id, and
//! a peer that stops reading. In every case the node closes only the offending
//! connection, logs a warning, and keeps serving everyone else.

mod common;

use std::time::Duration;

use common::*;
use shoal_net::quic::{codes, KIND_RPC};
use shoal_net::{Limits, NodeId, RpcCaller, Transport};

/// Opens a unidirectional stream on a raw connection from node 2 to node 1,
/// writes `bytes`, and checks that node 1 closes that connection with `code`
/// and still serves node 3.
async fn feed_message_stream(bytes: Vec<u8>, code: u32) {
    let mut c = Cluster::start(
        3,
        Limits {
            max_frame_bytes: 64 << 10,
            chunk_bytes: 32 << 10,
            ..Limits::default()
        },
    );
    let identity = c.ca.issue_node(NodeId(2)).unwrap();
    let (_endpoint, conn) = raw_connect(
        &identity,
        c.nodes[0].addr,
        NodeId(1),
        shoal_net::config::ALPN,
    )
    .await;
    let conn = conn.expect("a valid node certificate connects");
    let mut stream = conn.open_uni().await.unwrap();
    let _ = stream.write_all(&bytes).await;
    let _ = stream.finish();
    assert_eq!(close_code(&conn).await, Some(code as u64));
    let stats = c.nodes[0].node.stats();
    assert!(
        stats.malformed_inputs + stats.connections_refused >= 1,
        "{stats:?}"
    );
    // Node 1 still serves others.
    assert_eq!(
        c.nodes[2]
            .node
            .call(NodeId(1), Req::Echo("still".into()))
            .await
            .unwrap(),
        "1:still"
    );
    c.nodes[2].node.send(NodeId(1), msg(5, 10));
    let (from, m) = within("message after bad input", LONG, c.nodes[0].messages.recv())
        .await
        .unwrap();
    assert_eq!((from, m.seq), (NodeId(3), 5));
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() {
    feed_message_stream(
        b"GET / HTTP/1.1\r\nHost: shoal\r\n\r\n".to_vec(),
        codes::PROTOCOL,
    )
    .await;
}

#[tokio::test]
async fn a_truncated_frame_is_refused() {
    let mut bytes = hello(NodeId(2));
    bytes.extend_from_slice(&100u32.to_be_bytes());
    bytes.extend_from_slice(&[1; 10]);
    feed_message_stream(bytes, codes::PROTOCOL).await;
}

#[tokio::test]
async fn an_oversized_frame_is_refused_before_buffering() {
    let mut bytes = hello(NodeId(2));
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    feed_message_stream(bytes, codes::PROTOCOL).await;
}

#[tokio::test]
async fn a_frame_with_a_cut_record_is_refused() {
    let mut bytes = hello(NodeId(2));
    let body = [0, 0, 0, 50, 1, 2, 3];
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&body);
    feed_message_stream(bytes, codes::PROTOCOL).await;
}

#[tokio::test]
async fn an_undecodable_message_is_refused() {
    let mut bytes = hello(NodeId(2));
    let body = [0, 0, 0, 3, 0xff, 0xff, 0xff];
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&body);
    feed_message_stream(bytes, codes::PROTOCOL).await;
}

#[tokio::test]
async fn a_node_claiming_another_nodes_id_is_refused() {
    // Node 2's certificate, but the hello claims node 3.
    feed_message_stream(hello(NodeId(3)), codes::REFUSED).await;
}

#[tokio::test]
async fn an_undecodable_rpc_and_an_unknown_stream_kind_are_refused() {
    let c = Cluster::start(1, Limits::default());
    let identity = c.ca.issue_client("fuzzer").unwrap();
    for payload in [
        vec![KIND_RPC, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![b'Z', 1, 2, 3],
        vec![KIND_RPC, 0, 0],
    ] {
        let (_endpoint, conn) = raw_connect(
            &identity,
            c.nodes[0].addr,
            NodeId(1),
            shoal_net::config::ALPN,
        )
        .await;
        let conn = conn.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
        assert_eq!(close_code(&conn).await, Some(codes::PROTOCOL as u64));
    }
    assert_eq!(c.nodes[0].node.stats().malformed_inputs, 3);
    let client = shoal_net::quic::QuicClient::<TestProto>::new(
        &c.ca.issue_client("ok").unwrap(),
        c.addrs(),
        Limits::default(),
    )
    .unwrap();
    assert_eq!(
        client.call(NodeId(1), Req::Echo("x".into())).await.unwrap(),
        "1:x"
    );
}

#[tokio::test]
async fn a_client_may_not_send_peer_messages() {
    let c = Cluster::start(1, Limits::default());
    let identity = c.ca.issue_client("sneaky").unwrap();
    let (_endpoint, conn) = raw_connect(
        &identity,
        c.nodes[0].addr,
        NodeId(1),
        shoal_net::config::ALPN,
    )
    .await;
    let conn = conn.unwrap();
    let mut stream = conn.open_uni().await.unwrap();
    stream.write_all(&hello(NodeId(1))).await.unwrap();
    stream.finish().unwrap();
    assert_eq!(close_code(&conn).await, Some(codes::REFUSED as u64));
}

#[tokio::test]
async fn a_wrong_alpn_fails_the_handshake() {
    let c = Cluster::start(1, Limits::default());
    let identity = c.ca.issue_node(NodeId(2)).unwrap();
    let (_endpoint, conn) = raw_connect(&identity, c.nodes[0].addr, NodeId(1), b"shoal/0").await;
    assert!(conn.is_err(), "a handshake offering only shoal/0 must fail");
    wait_until("refusal counted", LONG, || {
        c.nodes[0].node.stats().connections_refused >= 1
    })
    .await;
    let identity = c.ca.issue_client("ok").unwrap();
    let (_endpoint, conn) = raw_connect(
        &identity,
        c.nodes[0].addr,
        NodeId(1),
        shoal_net::config::ALPN,
    )
    .await;
    assert!(conn.is_ok());
}

#[tokio::test]
async fn a_peer_that_stops_reading_costs_bounded_memory() {
    // Goal: node 2 never reads its inbox. Its stream stops, QUIC flow control
    // stops node 1's sender, node 1's queue stays at its bound and drops the
    // oldest messages (counted). Meanwhile node 1 and node 2 keep serving node 3,
    // and once node 2 reads again, the newest messages arrive.
    let limits = Limits {
        peer_queue_messages_max: 64,
        inbox_capacity: 16,
        ..Limits::default()
    };
    let mut c = Cluster::start(3, limits);
    let n1 = c.nodes[0].node.clone();
    let payload = 32 << 10;
    let total = 3_000u64; // 96 MiB, far above the flow-control windows
    for seq in 0..total {
        n1.send(NodeId(2), msg(seq, payload));
        if seq % 64 == 0 {
            tokio::task::yield_now().await;
        }
        assert!(n1.queued_messages(NodeId(2)) <= 64);
    }
    assert!(n1.stats().messages_dropped_overflow > 0);
    // Flow control holds the sender: it stops writing frames while node 2 is not reading.
    let mut frames = n1.stats().frames_sent;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = n1.stats().frames_sent;
        if now == frames {
            break;
        }
        frames = now;
    }
    assert!(
        n1.queued_messages(NodeId(2)) > 0,
        "the sender is blocked with messages queued"
    );
    // Everyone else is still served.
    n1.send(NodeId(3), msg(7, 10));
    assert_eq!(
        within(
            "node 3 gets node 1's message",
            LONG,
            c.nodes[2].messages.recv()
        )
        .await
        .unwrap()
        .1
        .seq,
        7
    );
    assert_eq!(
        c.nodes[2]
            .node
            .call(NodeId(2), Req::Echo("busy?".into()))
            .await
            .unwrap(),
        "2:busy?"
    );
    assert_eq!(
        c.nodes[2]
            .node
            .call(NodeId(1), Req::Echo("busy?".into()))
            .await
            .unwrap(),
        "1:busy?"
    );
    // Node 2 reads again: everything queued flows, ending with the newest message.
    let mut last = 0;
    while last != total - 1 {
        let (_, m) = within("drain", LONG, c.nodes[1].messages.recv())
            .await
            .unwrap();
        last = m.seq;
    }
    let stats = n1.stats();
    assert_eq!(stats.messages_sent, total + 1);
    assert!(stats.messages_dropped_overflow > total / 2, "{stats:?}");
}
