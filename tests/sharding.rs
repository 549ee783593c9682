//! Goal: a sharded cluster of real processes, operated with the commands a
//! newcomer runs (README): six `shoal node --controller 1,2,3` processes,
//! `shoal shard init` / `join` / `move` / `leave` / `status`, and a sharded
//! client whose writes all survive the moves and a SIGKILL of a group's
//! leader in between.

mod common;

use std::time::Duration;

use common::Cluster;
use serde_json::Value;
use shoal::cluster::{BlockingClient, ClientOptions};

const CONTROLLER: &str = "1,2,3";

/// Runs `shoal shard ARGS` as the admin; returns its JSON lines.
fn shard(cluster: &Cluster, args: &[&str]) -> Vec<Value> {
    cluster.shard(CONTROLLER, 60_000, args)
}

fn client(cluster: &Cluster) -> BlockingClient {
    let options = ClientOptions {
        op_deadline: Duration::from_secs(60),
        controller: Some(vec![1, 2, 3]),
        ..ClientOptions::default()
    };
    BlockingClient::connect_with(&cluster.members, &cluster.tls, options).expect("client")
}

/// The groups serving each shard, from `shoal shard status`.
fn owners(cluster: &Cluster) -> Vec<u64> {
    let lines = shard(cluster, &["status"]);
    lines[1..]
        .iter()
        .map(|l| l["group"].as_u64().expect("group"))
        .collect()
}

#[test]
fn six_nodes_three_groups_moves_and_a_leader_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start_args(dir.path(), 6, &["--controller", CONTROLLER]);
    // Group 1 on nodes 1-3 (beside the controller group), all 12 shards.
    let first = shard(&cluster, &["init", "--shards", "12", "--group", "1=1,2,3"]);
    assert_eq!(first[0]["num"], 1);
    let kv = client(&cluster);
    for i in 0..60 {
        assert_eq!(kv.put(format!("k{i}"), format!("v{i}")).expect("put"), 1);
    }
    // Group 2 on nodes 4-6 joins: half the shards move there.
    let second = shard(&cluster, &["join", "--group", "2=4,5,6"]);
    assert_eq!(second[0]["num"], 2);
    let groups = owners(&cluster);
    assert_eq!(groups.iter().filter(|&&g| g == 2).count(), 6, "{groups:?}");
    // Status sizes each shard as its group's leader holds it: the 60 keys,
    // each counted once, wherever it moved.
    let status = shard(&cluster, &["status"]);
    let keys: u64 = status[1..]
        .iter()
        .map(|l| l["keys"].as_u64().expect("every leader answered"))
        .sum();
    assert_eq!(keys, 60, "{status:?}");
    assert!(status[1..]
        .iter()
        .all(|l| l["bytes"].as_u64() >= l["keys"].as_u64()));
    for i in 0..60 {
        let v = kv.get(format!("k{i}")).expect("get");
        assert_eq!(v.value, format!("v{i}").as_bytes(), "k{i}");
    }
    // Writes go on while a shard moves back, and group 2's leader dies.
    let moving = groups
        .iter()
        .position(|&g| g == 2)
        .expect("a shard on group 2") as u32;
    let status = shard(&cluster, &["status"]);
    let leader2 = status[1..]
        .iter()
        .find(|l| l["group"] == 2)
        .and_then(|l| l["leader"].as_u64())
        .filter(|&l| l != 0)
        .expect("group 2 has a leader");
    shard(
        &cluster,
        &["move", "--shard", &moving.to_string(), "--to", "1"],
    );
    cluster.kill(leader2);
    for i in 0..60 {
        assert_eq!(kv.append(format!("k{i}"), "+").expect("append"), 2, "k{i}");
    }
    cluster.start_node(leader2);
    assert_eq!(owners(&cluster)[moving as usize], 1);
    // Group 1 leaves while its node 3 is down: the shards move (a majority
    // of group 1 carries the steps), but the replicas cannot all be
    // dropped, so the command fails after the change.
    cluster.kill(3);
    let cut_short = cluster
        .shard_command(CONTROLLER, 60_000, &["leave", "--group", "1"])
        .output()
        .expect("run shoal shard leave");
    assert!(!cut_short.status.success(), "a leave with node 3 down");
    assert!(
        String::from_utf8_lossy(&cut_short.stderr).contains("drop it later"),
        "{}",
        String::from_utf8_lossy(&cut_short.stderr)
    );
    cluster.start_node(3);
    assert!(owners(&cluster).iter().all(|&g| g == 2));
    // Running it again finishes it: every replica of group 1 is dropped.
    let last = shard(&cluster, &["leave", "--group", "1"]);
    assert!(last[0]["groups"].get("1").is_none(), "{:?}", last[0]);
    let admin = cluster.admin();
    for node in 1..=6 {
        let report = admin.node_status(shoal_net::NodeId(node)).expect("status");
        assert!(
            report.groups.iter().all(|g| g.group != 1),
            "node {node} still hosts group 1"
        );
    }
    for i in 0..60 {
        let v = kv.get(format!("k{i}")).expect("get");
        assert_eq!(v.value, format!("v{i}+").as_bytes(), "k{i}");
        assert_eq!(v.version, 2, "k{i}");
    }
    // A scan over every shard returns the keys in order.
    let pairs = kv.scan("", "", 1000).expect("scan");
    assert_eq!(pairs.len(), 60);
    assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
    kv.close();
}

/// The groups' members in the configuration `shoal shard status` prints.
fn config_members(cluster: &Cluster, group: u64) -> Value {
    shard(cluster, &["status"])[0]["groups"][group.to_string()].clone()
}

/// Goal (issue 14 on a sharded cluster): a replica group's membership
/// changes reach the shard configuration. Node 7, which no other node
/// knows at first (not in their `--peers`), joins group 2 through `shoal
/// member add --group 2 --controller ...`, node 4 is removed and
/// SIGKILLed, a shard moves into group 2 (its source ships to node 7 at the
/// address the admin passes on), node 5 is SIGKILLed, and every key is
/// read back through the sharded client from nodes 6 and 7.
#[test]
fn a_replica_group_changes_members_in_a_sharded_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster =
        Cluster::start_joining_args(dir.path(), 7, &[7], &["--controller", CONTROLLER], |_| {});
    shard(&cluster, &["init", "--shards", "12", "--group", "1=1,2,3"]);
    shard(&cluster, &["join", "--group", "2=4,5,6"]);
    let kv = client(&cluster);
    for i in 0..60 {
        assert_eq!(kv.put(format!("k{i}"), format!("v{i}")).expect("put"), 1);
    }
    let member = |args: &[&str]| {
        let mut all = vec!["--group", "2", "--controller", CONTROLLER];
        all.extend_from_slice(args);
        cluster.member(&all)
    };
    let addr7 = cluster.members[6].1.to_string();
    let added = member(&["add", "7", &addr7]);
    assert_eq!(
        added[0]["voters"],
        serde_json::json!([4, 5, 6, 7]),
        "{added:?}"
    );
    assert_eq!(config_members(&cluster, 2), serde_json::json!([4, 5, 6, 7]));
    let removed = member(&["remove", "4"]);
    assert_eq!(
        removed[0]["voters"],
        serde_json::json!([5, 6, 7]),
        "{removed:?}"
    );
    assert_eq!(config_members(&cluster, 2), serde_json::json!([5, 6, 7]));
    assert!(
        removed[0]["config"].as_u64().expect("a config number")
            > added[0]["config"].as_u64().expect("a config number")
    );
    // The removed node dropped its replica (a stale copy).
    assert_eq!(removed[0]["dropped"], true, "{removed:?}");
    let report = cluster
        .admin()
        .node_status(shoal_net::NodeId(4))
        .expect("status");
    assert!(report.groups.iter().all(|g| g.group != 2), "{report:?}");
    cluster.kill(4);
    // A shard of group 1 moves to group 2: shipped to 5, 6 and 7.
    let groups = owners(&cluster);
    let moving = groups
        .iter()
        .position(|&g| g == 1)
        .expect("a shard on group 1") as u32;
    shard(
        &cluster,
        &["move", "--shard", &moving.to_string(), "--to", "2"],
    );
    assert_eq!(owners(&cluster)[moving as usize], 2);
    // Group 2 runs on 6 and 7 alone: node 7 holds every shard it serves.
    cluster.kill(5);
    for i in 0..60 {
        assert_eq!(kv.append(format!("k{i}"), "+").expect("append"), 2, "k{i}");
    }
    for i in 0..60 {
        let v = kv.get(format!("k{i}")).expect("get");
        assert_eq!(v.value, format!("v{i}+").as_bytes(), "k{i}");
    }
    kv.close();
}
