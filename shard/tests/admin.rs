//! Goal: the node's status and admin RPCs behave as the protocol promises,
//! on the in-memory network with virtual time:
//! - any client gets a status report (node id, pid, per-group role, term,
//!   leader, commit, applied, fault filter);
//! - admin requests from a client other than `admin` are refused
//!   (`Denied::NotAdmin`) and change nothing;
//! - admin requests on a node without fault injection are refused
//!   (`Denied::FaultInjectionDisabled`) and the node keeps serving;
//! - with fault injection, the admin's filter really cuts the leader off
//!   (the others elect a new leader and commit without it), and clearing it
//!   lets the old leader follow and catch up.

use std::time::Duration;

use shoal_consensus::Role;
use shoal_engine::{EngineConfig, MemStore};
use shoal_net::mem::{MemConfig, MemNetwork};
use shoal_net::{NodeId, ADMIN_CLIENT_NAME};
use shoal_shard::{
    AdminError, Client, ClientConfig, Denied, KvProtocol, Node, NodeConfig, NodeHandle,
};
use tokio::time::{sleep, Instant};

const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];

fn start(fault_injection: bool) -> (MemNetwork<KvProtocol>, Vec<NodeHandle>) {
    let mut config = MemConfig::with_seed(11);
    config.fault_injection_enabled = fault_injection;
    let net = MemNetwork::<KvProtocol>::new(config);
    let nodes = NODES
        .iter()
        .map(|id| {
            let engine = MemStore::new_in_memory(EngineConfig::default()).expect("engine");
            let (transport, inbox) = net.add_node(*id);
            let snapshot_dir = std::env::temp_dir().join(format!(
                "shoal-admin-test-{}-{}",
                std::process::id(),
                id.0
            ));
            let mut config = NodeConfig::new(id.0, vec![1, 2, 3], snapshot_dir);
            config.blocking_io = false;
            Node::start(config, engine, transport, inbox).expect("node starts")
        })
        .collect();
    (net, nodes)
}

fn client(
    net: &MemNetwork<KvProtocol>,
    name: &str,
    id: u64,
) -> Client<shoal_net::mem::MemClient<KvProtocol>> {
    let mut config = ClientConfig::new(id);
    config.op_deadline = Duration::from_secs(20);
    Client::new(net.add_client(name), NODES.to_vec(), config)
}

/// Polls `condition` every 10 ms of virtual time until `timeout`.
async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn leader(nodes: &[NodeHandle]) -> Option<usize> {
    nodes.iter().position(|n| n.is_leader())
}

#[tokio::test(start_paused = true)]
async fn status_rpc_answers_any_client() {
    let (net, nodes) = start(false);
    wait_until("a leader", Duration::from_secs(10), || {
        leader(&nodes).is_some()
    })
    .await;
    let client = client(&net, "alice", 1);
    assert_eq!(client.put("k", "v").await, Ok(1));
    let l = leader(&nodes).expect("leader");
    let report = client.node_status(NODES[l]).await.expect("status");
    assert_eq!(report.id, NODES[l].0);
    assert_eq!(report.pid, std::process::id());
    assert!(report.blocked.is_empty());
    assert_eq!(report.groups.len(), 1);
    let group = report.groups[0].clone();
    assert_eq!(group.role, Role::Leader);
    assert_eq!(group.leader, NODES[l].0);
    assert!(group.term >= 1);
    assert!(group.commit >= 2 && group.applied >= 2, "{group:?}");
    for (i, id) in NODES.iter().enumerate() {
        let report = client.node_status(*id).await.expect("status");
        assert_eq!(report.groups[0].leader, NODES[l].0);
        if i != l {
            assert_eq!(report.groups[0].role, Role::Follower);
        }
    }
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn admin_requests_refused_without_admin_or_fault_injection() {
    // Fault injection on, but not the admin client.
    let (net, nodes) = start(true);
    wait_until("a leader", Duration::from_secs(10), || {
        leader(&nodes).is_some()
    })
    .await;
    let mallory = client(&net, "mallory", 1);
    assert_eq!(
        mallory.set_fault_filter(NodeId(1), vec![NodeId(2)]).await,
        Err(AdminError::Denied(Denied::NotAdmin))
    );
    assert_eq!(
        mallory.clear_fault_filter(NodeId(1)).await,
        Err(AdminError::Denied(Denied::NotAdmin))
    );
    assert!(mallory
        .node_status(NodeId(1))
        .await
        .expect("status")
        .blocked
        .is_empty());
    assert_eq!(mallory.put("k", "v").await, Ok(1));
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }

    // The admin client, but fault injection off.
    let (net, nodes) = start(false);
    wait_until("a leader", Duration::from_secs(10), || {
        leader(&nodes).is_some()
    })
    .await;
    let admin = client(&net, ADMIN_CLIENT_NAME, 2);
    assert_eq!(
        admin.set_fault_filter(NodeId(1), vec![NodeId(2)]).await,
        Err(AdminError::Denied(Denied::FaultInjectionDisabled))
    );
    assert_eq!(
        admin.clear_fault_filter(NodeId(1)).await,
        Err(AdminError::Denied(Denied::FaultInjectionDisabled))
    );
    // The node is up and unchanged.
    assert!(admin
        .node_status(NodeId(1))
        .await
        .expect("status")
        .blocked
        .is_empty());
    assert_eq!(admin.put("k", "v").await, Ok(1));
    assert!(nodes.iter().all(|n| n.is_running()));
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(start_paused = true)]
async fn admin_fault_filter_isolates_the_leader_then_heals() {
    let (net, nodes) = start(true);
    wait_until("a leader", Duration::from_secs(10), || {
        leader(&nodes).is_some()
    })
    .await;
    let admin = client(&net, ADMIN_CLIENT_NAME, 3);
    assert_eq!(admin.put("k", "1").await, Ok(1));
    let old = leader(&nodes).expect("leader");
    let old_term = nodes[old].status(1).term;
    let others: Vec<NodeId> = NODES
        .iter()
        .copied()
        .filter(|id| *id != NODES[old])
        .collect();
    admin
        .set_fault_filter(NODES[old], others.clone())
        .await
        .expect("admin may set the filter");
    assert_eq!(
        admin.node_status(NODES[old]).await.expect("status").blocked,
        others
    );

    // The others elect a leader in a higher term and commit without it.
    wait_until("a new leader", Duration::from_secs(10), || {
        nodes
            .iter()
            .enumerate()
            .any(|(i, n)| i != old && n.is_leader() && n.status(1).term > old_term)
    })
    .await;
    assert_eq!(admin.put("k", "2").await, Ok(2));
    let new = nodes
        .iter()
        .enumerate()
        .position(|(i, n)| i != old && n.is_leader())
        .expect("new leader");
    let target = nodes[new].status(1).commit;
    // Give the cut-off node time to hear of it, were the filter leaky.
    sleep(Duration::from_secs(2)).await;
    assert!(nodes[old].status(1).commit < target, "the filter leaked");

    admin
        .clear_fault_filter(NODES[old])
        .await
        .expect("admin may clear");
    assert!(admin
        .node_status(NODES[old])
        .await
        .expect("status")
        .blocked
        .is_empty());
    wait_until(
        "the old leader to follow and catch up",
        Duration::from_secs(10),
        || {
            let s = nodes[old].status(1);
            s.role == Some(Role::Follower) && s.applied >= target
        },
    )
    .await;
    for node in nodes {
        node.shutdown().await.expect("shutdown");
    }
}
