//! Bulk file streams over QUIC: a verified transfer lands under its final name;
//! a corrupted chunk, a wrong whole-file checksum, a wrong length or a cut
//! transfer is rejected and leaves no file behind.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use rand::{RngCore, SeedableRng};
use shoal_net::quic::KIND_FILE;
use shoal_net::{BulkError, Limits, NodeId, Transport};

fn limits() -> Limits {
    Limits {
        chunk_bytes: 64 << 10,
        max_frame_bytes: 1 << 20,
        bulk_file_bytes_max: 16 << 20,
        ..Limits::default()
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn random_file(dir: &Path, bytes: usize) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; bytes];
    rand_chacha::ChaCha8Rng::seed_from_u64(bytes as u64).fill_bytes(&mut data);
    let path = dir.join(format!("source-{bytes}.sst"));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    (path, data)
}

#[tokio::test]
async fn a_file_arrives_verified_under_its_final_name() {
    let mut c = Cluster::start(2, limits());
    let (path, data) = random_file(c.dir.path(), 3 * (64 << 10) + 123);
    let sent = within(
        "send_file",
        LONG,
        c.nodes[0]
            .node
            .send_file(NodeId(2), path, "shard-7/part-1".into()),
    )
    .await
    .unwrap();
    assert_eq!(sent, data.len() as u64);
    let file = within("received", LONG, c.nodes[1].files.recv())
        .await
        .unwrap();
    assert_eq!(
        (file.from, file.meta.as_str(), file.bytes),
        (NodeId(1), "shard-7/part-1", data.len() as u64)
    );
    assert_eq!(std::fs::read(&file.path).unwrap(), data);
    let dir = c.dir.path().join("files-2");
    assert_eq!(
        files_in(&dir).len(),
        1,
        "no temporary file left: {:?}",
        files_in(&dir)
    );
    // An empty file works too.
    let (empty, _) = random_file(c.dir.path(), 0);
    c.nodes[0]
        .node
        .send_file(NodeId(2), empty, "empty".into())
        .await
        .unwrap();
    assert_eq!(
        within("empty", LONG, c.nodes[1].files.recv())
            .await
            .unwrap()
            .bytes,
        0
    );
}

#[tokio::test]
async fn sender_side_errors_are_reported() {
    let c = Cluster::start(2, limits());
    let missing = c.dir.path().join("missing");
    assert!(matches!(
        c.nodes[0]
            .node
            .send_file(NodeId(2), missing, "x".into())
            .await,
        Err(BulkError::Io { .. })
    ));
    let (big, _) = random_file(c.dir.path(), (16 << 20) + 1);
    assert!(matches!(
        c.nodes[0].node.send_file(NodeId(2), big, "x".into()).await,
        Err(BulkError::TooLarge { .. })
    ));
}

/// Streams a hand-made transfer from node 1 to node 2 and returns node 2's verdict.
async fn raw_transfer(
    c: &Cluster,
    announced: u64,
    chunks: &[(Vec<u8>, u32)],
    whole_crc: Option<u32>,
) -> Option<Result<(), String>> {
    let identity = c.ca.issue_node(NodeId(1)).unwrap();
    let (_endpoint, conn) = raw_connect(
        &identity,
        c.nodes[1].addr,
        NodeId(2),
        shoal_net::config::ALPN,
    )
    .await;
    let conn = conn.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut header = announced.to_be_bytes().to_vec();
    header.extend_from_slice(&postcard::to_stdvec(&"meta".to_string()).unwrap());
    let mut wire = vec![KIND_FILE];
    wire.extend_from_slice(&(header.len() as u32).to_be_bytes());
    wire.extend_from_slice(&header);
    for (data, crc) in chunks {
        wire.extend_from_slice(&(data.len() as u32).to_be_bytes());
        wire.extend_from_slice(&crc.to_be_bytes());
        wire.extend_from_slice(data);
    }
    if let Some(crc) = whole_crc {
        wire.extend_from_slice(&0u32.to_be_bytes());
        wire.extend_from_slice(&crc.to_be_bytes());
    }
    let _ = send.write_all(&wire).await;
    if whole_crc.is_none() {
        // Cut the transfer in the middle, once the receiver has started its
        // `.part` file: reset the stream and go away.
        let dir = c.dir.path().join("files-2");
        wait_until("part file created", LONG, || !files_in(&dir).is_empty()).await;
        let _ = send.reset(quinn::VarInt::from_u32(9));
        conn.close(quinn::VarInt::from_u32(9), b"gone");
        return None;
    }
    let _ = send.finish();
    let mut buf = Vec::new();
    within(
        "verdict",
        LONG,
        shoal_net::frame::read_frame(&mut recv, &mut buf, 1 << 20),
    )
    .await
    .unwrap();
    Some(postcard::from_bytes(&buf).unwrap())
}

async fn assert_rejected_without_trace(c: &mut Cluster, rejected: u64) {
    wait_until("rejection counted", LONG, || {
        c.nodes[1].node.stats().files_rejected == rejected
    })
    .await;
    assert_eq!(
        files_in(&c.dir.path().join("files-2")),
        Vec::<String>::new()
    );
    assert!(c.nodes[1].files.try_recv().is_err());
}

#[tokio::test]
async fn a_corrupted_chunk_is_rejected_and_leaves_no_file() {
    let mut c = Cluster::start(2, limits());
    let a = vec![1u8; 1000];
    let mut b = vec![2u8; 1000];
    let (crc_a, crc_b) = (crc32fast::hash(&a), crc32fast::hash(&b));
    let mut whole = crc32fast::Hasher::new();
    whole.update(&a);
    whole.update(&b);
    let whole = whole.finalize();
    b[500] ^= 0x40; // flipped bit in transit
    let verdict = raw_transfer(&c, 2000, &[(a.clone(), crc_a), (b, crc_b)], Some(whole))
        .await
        .unwrap();
    assert_eq!(verdict, Err("CRC32 mismatch in chunk 1".to_string()));
    assert_rejected_without_trace(&mut c, 1).await;
    // Whole-file checksum wrong while every chunk is right.
    let verdict = raw_transfer(&c, 1000, &[(a.clone(), crc_a)], Some(whole))
        .await
        .unwrap();
    assert_eq!(verdict, Err("whole-file CRC32 mismatch".to_string()));
    assert_rejected_without_trace(&mut c, 2).await;
    // Fewer bytes than announced.
    let verdict = raw_transfer(&c, 5000, &[(a.clone(), crc_a)], Some(crc_a))
        .await
        .unwrap();
    assert!(verdict
        .unwrap_err()
        .contains("does not match the announced"));
    assert_rejected_without_trace(&mut c, 3).await;
    // More than announced, and more than the limit.
    let verdict = raw_transfer(&c, 10, &[(a.clone(), crc_a)], Some(crc_a))
        .await
        .unwrap();
    assert!(verdict.unwrap_err().contains("more data than"));
    assert_rejected_without_trace(&mut c, 4).await;
    let verdict = raw_transfer(&c, 1 << 40, &[(a.clone(), crc_a)], Some(crc_a))
        .await
        .unwrap();
    assert!(verdict.unwrap_err().contains("exceeds the maximum"));
    assert_rejected_without_trace(&mut c, 5).await;
    // Cut in the middle.
    raw_transfer(&c, 2000, &[(a, crc_a)], None).await;
    assert_rejected_without_trace(&mut c, 6).await;
    // The receiver still accepts a good file afterwards.
    let (path, data) = random_file(c.dir.path(), 200_000);
    c.nodes[0]
        .node
        .send_file(NodeId(2), path, "ok".into())
        .await
        .unwrap();
    let file = within("good file", LONG, c.nodes[1].files.recv())
        .await
        .unwrap();
    assert_eq!(std::fs::read(file.path).unwrap(), data);
}

// Goal: over QUIC too, a file that needs an acknowledgement is delivered
// only once the receiver stores it, and a refusal fails the sender's
// `send_file`.
#[tokio::test]
async fn a_file_that_needs_an_ack_waits_for_it() {
    let mut c = Cluster::start(2, limits());
    let (path, data) = random_file(c.dir.path(), 100_000);
    let node = c.nodes[0].node.clone();
    let sending = {
        let (node, path) = (node.clone(), path.clone());
        tokio::spawn(async move { node.send_file(NodeId(2), path, "ack:one".into()).await })
    };
    let file = within("received", LONG, c.nodes[1].files.recv())
        .await
        .unwrap();
    assert!(file.ack.expected());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!sending.is_finished(), "not delivered before it is stored");
    file.ack.stored();
    assert_eq!(
        within("send", LONG, sending).await.unwrap().unwrap(),
        data.len() as u64
    );
    let sending =
        tokio::spawn(async move { node.send_file(NodeId(2), path, "ack:two".into()).await });
    let file = within("received", LONG, c.nodes[1].files.recv())
        .await
        .unwrap();
    file.ack.failed("no room".into());
    assert!(within("send", LONG, sending).await.unwrap().is_err());
}
