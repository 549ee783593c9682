//! Backup fences on the node runtime (in-memory network and engine,
//! tokio's paused clock): a fenced export holds the group's writes back
//! until it is ended, its export holds the state at its view, a second
//! fence is refused, and a fence nobody ends, or whose leader is gone,
//! lapses: writes go on and ending it reports that it did not hold.

mod common;

use std::time::Duration;

use common::{Cluster, ELECTION_TIMEOUT};
use shoal_net::mem::MemClient;
use shoal_net::NodeId;
use shoal_shard::client::AdminError;
use shoal_shard::node::KV_GROUP;
use shoal_shard::protocol::{BackupRefusal, KvProtocol, BACKUP_FENCE_MS_MAX};
use shoal_shard::{Client, ClientConfig};
use tokio::time::sleep;

/// An admin client of the cluster (backups need it).
fn admin(c: &Cluster) -> Client<MemClient<KvProtocol>> {
    let mut config = ClientConfig::new(c.seed.max(1) << 8);
    config.op_deadline = Duration::from_secs(30);
    Client::new(c.net.add_client("admin"), c.ids(), config)
}

/// The group's leader, by node id.
async fn leader(c: &Cluster) -> NodeId {
    c.id(c.wait_for_leader(ELECTION_TIMEOUT * 10).await)
}

/// Fences the group at its leader (retrying while a new leader catches
/// up): (leader, export id, applied index of its view).
async fn fence(c: &Cluster, admin: &Client<MemClient<KvProtocol>>) -> (NodeId, u64, u64) {
    for _ in 0..200 {
        let node = leader(c).await;
        match admin.backup_fenced_export(node, KV_GROUP, 5_000).await {
            Ok((id, applied)) => return (node, id, applied),
            Err(e) => {
                eprintln!("fence at node {}: {e}; retrying", node.0);
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("seed {}: no fence", c.seed);
}

#[tokio::test(start_paused = true)]
async fn a_fence_holds_writes_until_ended_and_lapses_without_its_leader() {
    let mut c = Cluster::new(3, true, 11);
    let admin = admin(&c);
    let client = c.client();
    client.put("a", "1").await.expect("put");

    let (node, id, applied) = fence(&c, &admin).await;
    // A write waits behind the fence.
    let pending = tokio::spawn({
        let client = c.client();
        async move { client.put("b", "2").await }
    });
    sleep(Duration::from_millis(1_000)).await;
    assert!(!pending.is_finished(), "a write got past the fence");
    // One fence per group at a time.
    assert!(matches!(
        admin.backup_fenced_export(node, KV_GROUP, 5_000).await,
        Err(AdminError::BackupRefused(BackupRefusal::Fenced))
    ));
    assert!(admin
        .backup_unfence(node, KV_GROUP, id)
        .await
        .expect("unfence"));
    pending.await.expect("task").expect("the write goes on");
    // The export holds the state at its view, without the later write.
    let backup = loop {
        match admin.backup_files(node, id).await {
            Ok(backup) => break backup,
            Err(AdminError::BackupRefused(BackupRefusal::Running)) => {
                sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("files: {e}"),
        }
    };
    assert_eq!(backup.applied.index, applied);
    admin.backup_release(node, id).await.expect("release");
    // Ending it twice: there is no fence any more.
    assert!(!admin
        .backup_unfence(node, KV_GROUP, id)
        .await
        .expect("unfence"));

    // A fence nobody ends lapses on its own.
    let (node, id, _) = fence(&c, &admin).await;
    sleep(Duration::from_millis(BACKUP_FENCE_MS_MAX + 500)).await;
    client
        .put("c", "3")
        .await
        .expect("writes go on after the lapse");
    assert!(!admin
        .backup_unfence(node, KV_GROUP, id)
        .await
        .expect("unfence"));

    // A fence ends with its leader: the group goes on under another.
    let (node, id, _) = fence(&c, &admin).await;
    let i = (node.0 - 1) as usize;
    c.crash_node(i).await;
    client
        .put("d", "4")
        .await
        .expect("a new leader takes writes");
    c.start_node(i);
    assert!(!admin
        .backup_unfence(node, KV_GROUP, id)
        .await
        .expect("unfence"));
    c.shutdown_all().await;
}
