//! Membership changes through the node runtime, on the in-memory network
//! and engine under tokio's paused clock: a node that starts empty joins as
//! a learner, catches up (from a snapshot when the log was cut), is
//! promoted, and replaces a crashed voter, which is removed; the group then
//! survives the loss of another node, and every acknowledged write is read
//! back (the history is checked for linearizability); odd seeds on the
//! unreliable network. Seeded: `SHOAL_SEED`
//! replays one, `SHOAL_SEEDS` sets how many.

mod common;

use std::time::Duration;

use common::{Cluster, ELECTION_TIMEOUT};
use shoal_net::NodeId;
use shoal_shard::client::MemberError;
use shoal_shard::node::KV_GROUP;
use shoal_shard::protocol::MemberChange;
use shoal_shard::{Client, ClientConfig};
use tokio::time::{sleep, Instant};

/// An admin client of the cluster (membership changes need it).
fn admin(c: &Cluster) -> Client<shoal_net::mem::MemClient<shoal_shard::KvProtocol>> {
    let mut config = ClientConfig::new(c.seed.max(1) << 8);
    config.op_deadline = Duration::from_secs(30);
    Client::new(c.net.add_client("admin"), c.ids(), config)
}

async fn change(
    admin: &Client<shoal_net::mem::MemClient<shoal_shard::KvProtocol>>,
    c: &Cluster,
    change: MemberChange,
) -> (Vec<u64>, Vec<u64>) {
    admin
        .change_members(KV_GROUP, change.clone(), &c.ids())
        .await
        .unwrap_or_else(|e| panic!("seed {}: {change:?}: {e}", c.seed))
}

async fn replace_a_crashed_voter(seed: u64, max_raft_state: Option<u64>) {
    // Odd seeds run on the lab's unreliable network (drops, delays).
    let mut c = Cluster::with_joiners(4, 1, seed % 2 == 0, seed, max_raft_state);
    let clerk = c.clerk();
    let mut written = Vec::new();
    for i in 0..40 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        clerk.put(&k, &v, 0).await.expect("put");
        written.push((k, v));
    }
    if max_raft_state.is_some() {
        // The log is cut before node 4 joins, so it needs a snapshot.
        let deadline = Instant::now() + ELECTION_TIMEOUT * 10;
        while !(0..3).all(|i| c.nodes[i].as_ref().unwrap().status(KV_GROUP).snapshot_index > 0) {
            assert!(Instant::now() < deadline, "seed {seed}: no snapshot taken");
            sleep(Duration::from_millis(20)).await;
        }
    }
    let admin = admin(&c);
    // Node 4 is no member yet: it neither leads nor answers for the group.
    assert_eq!(c.nodes[3].as_ref().unwrap().status(KV_GROUP).leader, 0);
    let leader = c.wait_for_leader(ELECTION_TIMEOUT * 5).await;
    let dead = (0..3).find(|&i| i != leader).expect("a follower");
    c.crash_node(dead).await;
    let (voters, learners) = change(
        &admin,
        &c,
        MemberChange::AddLearner {
            node: 4,
            addr: "127.0.0.1:7004".into(),
        },
    )
    .await;
    assert_eq!((voters.len(), learners), (3, vec![4]));
    let (voters, _) = change(&admin, &c, MemberChange::Promote { node: 4 }).await;
    assert!(voters.contains(&4));
    let gone = dead as u64 + 1;
    let (voters, learners) = change(&admin, &c, MemberChange::Remove { node: gone }).await;
    assert!(!voters.contains(&gone) && learners.is_empty(), "{voters:?}");
    assert_eq!(voters.len(), 3);
    // The new member holds everything: it applied what the group applied.
    let deadline = Instant::now() + ELECTION_TIMEOUT * 10;
    loop {
        let leader = c.leader().expect("a leader");
        if c.applied(3) >= c.applied(leader) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: node 4 did not catch up"
        );
        sleep(Duration::from_millis(20)).await;
    }
    if max_raft_state.is_some() {
        assert!(
            c.nodes[3].as_ref().unwrap().status(KV_GROUP).snapshot_index > 0,
            "seed {seed}: node 4 should have caught up from a snapshot"
        );
    }
    // Lose one more of the three: two of {the survivors, 4} still commit.
    let leader = c.leader().expect("a leader");
    let other = [0, 1, 2]
        .into_iter()
        .find(|&i| i != dead && i != leader)
        .expect("another old member");
    c.crash_node(other).await;
    for i in 40..50 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        clerk
            .put(&k, &v, 0)
            .await
            .expect("put after the replacement");
        written.push((k, v));
    }
    for (k, v) in &written {
        assert_eq!(
            clerk.get(k).await.expect("get").0,
            v.as_str(),
            "seed {seed}: {k}"
        );
    }
    c.check_linearizable();
    // Refusals change nothing.
    let refused = admin
        .change_members(KV_GROUP, MemberChange::Promote { node: 9 }, &c.ids())
        .await;
    assert!(
        matches!(refused, Err(MemberError::Refused(_))),
        "{refused:?}"
    );
    let clerk_only = Client::new(c.net.add_client("client-9"), c.ids(), ClientConfig::new(99));
    let denied = clerk_only
        .change_members(KV_GROUP, MemberChange::Remove { node: 1 }, &c.ids())
        .await;
    assert!(matches!(denied, Err(MemberError::Denied(_))), "{denied:?}");
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_node_replaces_a_crashed_voter() {
    for seed in common::seeds_or("a_new_node_replaces_a_crashed_voter", 5) {
        replace_a_crashed_voter(seed, None).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_node_catches_up_from_a_snapshot() {
    for seed in common::seeds_or("a_new_node_catches_up_from_a_snapshot", 5) {
        replace_a_crashed_voter(seed, Some(1_000)).await;
    }
}

/// Removing the leader: it hands leadership to another voter first, and
/// the new leader removes it.
#[tokio::test(start_paused = true)]
async fn removing_the_leader_hands_off_first() {
    for seed in common::seeds_or("removing_the_leader_hands_off_first", 5) {
        let mut c = Cluster::new(3, true, seed);
        let clerk = c.clerk();
        clerk.put("a", "1", 0).await.expect("put");
        let leader = c.wait_for_leader(ELECTION_TIMEOUT * 5).await;
        let admin = admin(&c);
        let id = leader as u64 + 1;
        let (voters, _) = change(&admin, &c, MemberChange::Remove { node: id }).await;
        assert_eq!(voters.len(), 2);
        assert!(!voters.contains(&id));
        clerk.put("b", "2", 0).await.expect("put without it");
        assert_eq!(clerk.get("a").await.expect("get").0, "1");
        let now = c.wait_for_leader(ELECTION_TIMEOUT * 5).await;
        assert_ne!(now, leader, "seed {seed}");
        c.check_linearizable();
        c.shutdown_all().await;
        let _ = NodeId(id);
    }
}

/// A replica group hosted at runtime (a sharded cluster's) changes members
/// too: node 4 hosts group 7 with no membership (`HostGroup` without
/// voters), is added and promoted, node 3 is removed, and after node 1
/// crashes nodes 2 and 4 still elect a leader of group 7.
#[tokio::test(start_paused = true)]
async fn a_hosted_group_gains_and_loses_members() {
    const GROUP: u64 = 7;
    for seed in common::seeds_or("a_hosted_group_gains_and_loses_members", 5) {
        let mut c = Cluster::new(4, true, seed);
        let admin = admin(&c);
        for node in 1..=3 {
            admin
                .host_group(NodeId(node), GROUP, vec![1, 2, 3])
                .await
                .expect("host group 7");
        }
        admin
            .host_group(NodeId(4), GROUP, Vec::new())
            .await
            .expect("node 4 hosts group 7 to join it");
        let nodes = c.ids();
        let change = |change: MemberChange| {
            let (admin, nodes) = (&admin, nodes.clone());
            async move {
                admin
                    .change_members(GROUP, change.clone(), &nodes)
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: {change:?}: {e}"))
            }
        };
        change(MemberChange::AddLearner {
            node: 4,
            addr: "127.0.0.1:7004".into(),
        })
        .await;
        change(MemberChange::Promote { node: 4 }).await;
        let (voters, _) = change(MemberChange::Remove { node: 3 }).await;
        assert_eq!(voters, vec![1, 2, 4], "seed {seed}");
        c.crash_node(0).await;
        let deadline = Instant::now() + ELECTION_TIMEOUT * 10;
        loop {
            let mut leaders = Vec::new();
            for node in [2, 4] {
                if let Ok(report) = admin.node_status(NodeId(node)).await {
                    if let Some(g) = report.groups.iter().find(|g| g.group == GROUP) {
                        if g.role == shoal_consensus::Role::Leader {
                            leaders.push((node, g.voters.clone()));
                        }
                    }
                }
            }
            if let Some((_, voters)) = leaders.first() {
                assert_eq!(voters, &vec![1, 2, 4], "seed {seed}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {seed}: group 7 has no leader"
            );
            sleep(Duration::from_millis(50)).await;
        }
        c.shutdown_all().await;
    }
}
