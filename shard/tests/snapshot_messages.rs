//! Goal (issue 10, item 2): a follower installs exactly the snapshot
//! consensus restores, whatever other `Snapshot` messages arrive around it.
//!
//! The story: a leader of term 5 sends node 3 its snapshot at index 10, and
//! a deposed leader of term 4, whose transfer task kept running, sends one
//! at index 12. Both arrive in one batch of events. Consensus restores the
//! first and ignores the second (an older term). The runtime used to record
//! "the snapshot to install" for every verified message *before* stepping
//! it, so the ignored one displaced the restored one and the install
//! panicked ("restored snapshot 10 has no verified files"). Verified files
//! are now kept by snapshot index.
//!
//! Nodes 1 and 2 are played by the test through their in-memory transports;
//! node 3 runs the real runtime on the in-memory engine.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use shoal_consensus::{ConfState, Message, MessageBody, Snapshot, SnapshotMeta};
use shoal_engine::{ApplyEntry, Command, EngineConfig, MemStore, Request};
use shoal_net::mem::{MemConfig, MemNetwork, MemNode};
use shoal_net::{NodeId, Transport};
use shoal_shard::node::{Node, NodeConfig, KV_GROUP, KV_SHARD};
use shoal_shard::protocol::{KvProtocol, PeerMessage, SnapshotFileMeta};

/// A state machine whose entries 1..=`index` (term 4) were applied, with
/// key `k<i>` written by entry i, exported to `dir`.
fn export_at(index: u64, dir: &Path) {
    let engine = MemStore::new_in_memory(EngineConfig::default()).expect("engine");
    let entries: Vec<ApplyEntry> = (1..=index)
        .map(|i| ApplyEntry {
            index: i,
            term: 4,
            requests: vec![Request {
                shard: KV_SHARD,
                client: 0,
                seq: 0,
                command: Command::Put {
                    key: Bytes::from(format!("k{i}")),
                    value: Bytes::from_static(b"v"),
                },
            }],
        })
        .collect();
    engine.apply(KV_GROUP, &entries).expect("apply");
    engine.export_snapshot(KV_GROUP, dir).expect("export");
}

/// Streams the export in `dir` from `sender` to node 3 as the files of
/// snapshot `index`.
async fn send_files(sender: &MemNode<KvProtocol>, dir: &Path, index: u64) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("export dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let meta = SnapshotFileMeta {
            group: KV_GROUP,
            index,
            name: name.clone(),
            shard: None,
        };
        sender
            .send_file(NodeId(3), dir.join(&name), meta)
            .await
            .expect("file sent");
    }
}

fn snapshot_message(from: u64, term: u64, index: u64) -> PeerMessage {
    PeerMessage {
        group: KV_GROUP,
        message: Message {
            from,
            to: 3,
            term,
            body: MessageBody::Snapshot {
                snapshot: Snapshot {
                    meta: SnapshotMeta {
                        index,
                        term: 4,
                        conf_state: ConfState {
                            voters: vec![1, 2, 3],
                            learners: Vec::new(),
                        },
                    },
                    data: Bytes::new(),
                },
            },
        },
    }
}

#[tokio::test(start_paused = true)]
async fn an_ignored_stale_snapshot_does_not_displace_the_restored_one() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut net_config = MemConfig::with_seed(3);
    net_config.files_dir = root.path().join("net");
    let net = MemNetwork::<KvProtocol>::new(net_config);
    let (leader, _leader_inbox) = net.add_node(NodeId(1));
    let (deposed, _deposed_inbox) = net.add_node(NodeId(2));
    let engine = MemStore::new_in_memory(EngineConfig::default()).expect("engine");
    let (transport, inbox) = net.add_node(NodeId(3));
    let mut config = NodeConfig::new(3, vec![1, 2, 3], root.path().join("node-3"));
    config.blocking_io = false;
    let node = Node::start(config, engine.clone(), transport, inbox).expect("node starts");

    let (current, stale) = (root.path().join("export-10"), root.path().join("export-12"));
    export_at(10, &current);
    export_at(12, &stale);
    send_files(&leader, &current, 10).await;
    send_files(&deposed, &stale, 12).await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    // Delivered at once (a reliable network), so one batch holds both.
    leader.send(NodeId(3), snapshot_message(1, 5, 10));
    deposed.send(NodeId(3), snapshot_message(2, 4, 12));
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert!(node.is_running(), "the node stopped (panicked?)");
    let status = node.status(KV_GROUP);
    assert_eq!(
        (status.term, status.applied, status.snapshots_installed),
        (5, 10, 1),
        "{status:?}"
    );
    assert!(engine
        .get(KV_GROUP, KV_SHARD, b"k10")
        .expect("get")
        .is_some());
    assert!(
        engine
            .get(KV_GROUP, KV_SHARD, b"k11")
            .expect("get")
            .is_none(),
        "the stale snapshot's data was installed"
    );
    node.shutdown().await.expect("clean shutdown");
}
