//! Groups created and dropped at runtime, and leaders spread over nodes,
//! on the in-memory network with virtual time: the production node
//! runtime on the in-memory engine, driven through the admin RPCs
//! `HostGroup` / `DropGroup` and the shard move steps.
//!
//! Checked: a group hosted through the admin RPC elects a leader, serves
//! `Create` and KV writes, and is hosted again (with its data) after every
//! node crashed; it is dropped only once its shards moved away, and then
//! nothing of it remains and it cannot come back; non-admins and bad
//! requests change nothing; groups of one node may have different voters;
//! three groups on three nodes end with three different leaders and stay
//! so.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::seeds_or;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::config::VOTERS_MAX;
use shoal_consensus::Role;
use shoal_engine::{EngineConfig, GroupId, MemStore, Reply, ShardId};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::{NodeId, RpcCaller, ADMIN_CLIENT_NAME};
use shoal_shard::node::{GroupSpec, Node, NodeConfig, NodeHandle};
use shoal_shard::protocol::{
    ClientCommand, Denied, GroupRefusal, KvProtocol, KvRequest, KvResponse, Request, Response,
    ShardCommand, ShardReply, ShardRequest,
};
use tokio::time::{sleep, Instant};

const RPC_DEADLINE: Duration = Duration::from_millis(500);
/// How long a request is retried before the test gives up.
const RETRY_FOR: Duration = Duration::from_secs(120);
/// Within this (virtual) time of hosting, three groups on three nodes
/// have three different leaders: a first election (at most ~2 s with
/// retries) and two hand-overs, each at most one balance period (2 s)
/// apart, with ample room.
const SPREAD_WITHIN: Duration = Duration::from_secs(60);
/// How long leaders, once spread, are watched for a change.
const STABLE_FOR: Duration = Duration::from_secs(30);

/// `n` nodes (ids 1..=n) with the groups `statics(id)` from their
/// configuration and whatever the admin RPCs host.
struct Nodes {
    net: MemNetwork<KvProtocol>,
    engines: Vec<MemStore>,
    nodes: Vec<Option<NodeHandle>>,
    dir: std::path::PathBuf,
    seed: u64,
    incarnation: u64,
    statics: fn(u64) -> Vec<GroupSpec>,
    /// Every group's members, for routing.
    members: BTreeMap<GroupId, Vec<u64>>,
    admin: MemClient<KvProtocol>,
    client: MemClient<KvProtocol>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            for (i, h) in self.nodes.iter().enumerate() {
                if let Some(h) = h {
                    assert!(
                        h.is_running(),
                        "seed {}: node {} stopped on its own",
                        self.seed,
                        i + 1
                    );
                }
            }
        }
    }
}

fn no_statics(_: u64) -> Vec<GroupSpec> {
    Vec::new()
}

impl Nodes {
    fn new(n: usize, seed: u64, statics: fn(u64) -> Vec<GroupSpec>) -> Nodes {
        Nodes::with_network(n, seed, statics, true)
    }

    fn with_network(
        n: usize,
        seed: u64,
        statics: fn(u64) -> Vec<GroupSpec>,
        reliable: bool,
    ) -> Nodes {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shoal-host-groups-{}-{seed}-{}",
            std::process::id(),
            RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let net = MemNetwork::new(config);
        net.set_reliable(reliable);
        let mut members = BTreeMap::new();
        for id in 1..=n as u64 {
            for spec in statics(id) {
                members.insert(spec.group, spec.voters.clone());
            }
        }
        let mut s = Nodes {
            admin: net.add_client(ADMIN_CLIENT_NAME),
            client: net.add_client("client-1"),
            net,
            engines: (0..n)
                .map(|_| MemStore::new_in_memory(EngineConfig::default()).expect("engine"))
                .collect(),
            nodes: (0..n).map(|_| None).collect(),
            dir,
            seed,
            incarnation: 0,
            statics,
            members,
        };
        for i in 0..n {
            s.start(i);
        }
        s
    }

    fn start(&mut self, i: usize) {
        let id = i as u64 + 1;
        self.incarnation += 1;
        let (transport, inbox) = self.net.add_node(NodeId(id));
        let all: Vec<u64> = (1..=self.nodes.len() as u64).collect();
        let mut config = NodeConfig::new(id, all, self.dir.join(format!("node-{id}")));
        config.groups = (self.statics)(id);
        config.blocking_io = false;
        config.seed = self.seed ^ self.incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        config.max_raft_state_bytes = Some(4096);
        let handle =
            Node::start(config, self.engines[i].clone(), transport, inbox).expect("node starts");
        self.nodes[i] = Some(handle);
    }

    async fn crash(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.crash().await.expect("healthy until the crash");
        }
        self.net.remove_node(NodeId(i as u64 + 1));
        self.engines[i].crash_and_recover().expect("recovers");
    }

    async fn crash_all_and_restart(&mut self) {
        for i in 0..self.nodes.len() {
            self.crash(i).await;
        }
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    fn node(&self, id: u64) -> &NodeHandle {
        self.nodes[id as usize - 1].as_ref().expect("running")
    }

    /// One admin call to node `id` (retried only if the call itself fails).
    async fn admin_call(
        &self,
        caller: &MemClient<KvProtocol>,
        id: u64,
        request: Request,
    ) -> Response {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < RETRY_FOR,
                "seed {}: node {id} never answered {request:?}",
                self.seed
            );
            match caller
                .call_with_deadline(NodeId(id), request.clone(), RPC_DEADLINE)
                .await
            {
                Ok(response) => return response,
                Err(_) => sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Hosts `group` with `voters` on every voter through the admin RPC.
    async fn host(&mut self, group: GroupId, voters: &[u64]) {
        for &id in voters {
            let request = Request::HostGroup {
                group,
                voters: voters.to_vec(),
            };
            let response = self.admin_call(&self.admin, id, request).await;
            assert_eq!(
                response,
                Response::AdminDone,
                "seed {}: hosting group {group} on node {id}",
                self.seed
            );
        }
        self.members.insert(group, voters.to_vec());
    }

    /// Sends `request` to `group`'s members until one answers with
    /// something other than "not the leader / busy / unreachable".
    async fn call(
        &self,
        caller: &MemClient<KvProtocol>,
        group: GroupId,
        request: Request,
    ) -> KvResponse {
        let members = &self.members[&group];
        let start = Instant::now();
        let mut i = 0usize;
        loop {
            assert!(
                start.elapsed() < RETRY_FOR,
                "seed {}: no answer to {request:?} within {RETRY_FOR:?}",
                self.seed
            );
            let to = members[i % members.len()];
            i += 1;
            match caller
                .call_with_deadline(NodeId(to), request.clone(), RPC_DEADLINE)
                .await
            {
                Ok(Response::Kv(
                    KvResponse::NotLeader { .. } | KvResponse::Busy | KvResponse::ShuttingDown,
                ))
                | Err(_) => {
                    if i % members.len() == 0 {
                        sleep(Duration::from_millis(50)).await;
                    }
                }
                Ok(Response::Kv(answer)) => return answer,
                Ok(other) => panic!("seed {}: unexpected response {other:?}", self.seed),
            }
        }
    }

    async fn step(&self, group: GroupId, command: ShardCommand) -> ShardReply {
        let request = Request::Shard(ShardRequest {
            group,
            command,
            holders: self.members[&group].clone(),
            to_addrs: Vec::new(),
        });
        match self.call(&self.admin, group, request).await {
            KvResponse::Shard(reply) => reply,
            other => panic!("seed {}: a shard step answered {other:?}", self.seed),
        }
    }

    async fn kv(
        &self,
        group: GroupId,
        shard: ShardId,
        seq: u64,
        command: ClientCommand,
    ) -> KvResponse {
        let request = Request::Kv(KvRequest {
            group,
            shard,
            client: 7,
            seq,
            command,
        });
        self.call(&self.client, group, request).await
    }

    /// The one node that believes it leads `group` (None: none or several).
    fn leader(&self, group: GroupId) -> Option<(u64, u64)> {
        let leaders: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .flatten()
            .map(|h| (h.id(), h.status(group)))
            .filter(|(_, s)| s.role == Some(Role::Leader))
            .map(|(id, s)| (id, s.term))
            .collect();
        match leaders[..] {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Waits until `group`'s members all applied what its leader has.
    async fn wait_applied(&self, group: GroupId) {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < RETRY_FOR,
                "seed {}: group {group} never caught up",
                self.seed
            );
            if let Some((leader, _)) = self.leader(group) {
                let target = self.node(leader).status(group).applied;
                if self.members[&group]
                    .iter()
                    .all(|&m| self.node(m).status(group).applied >= target)
                {
                    return;
                }
            }
            sleep(Duration::from_millis(20)).await;
        }
    }
}

fn append(key: &str, value: &str) -> ClientCommand {
    ClientCommand::Append {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(value.to_string()),
    }
}

fn get(key: &str) -> ClientCommand {
    ClientCommand::Get {
        key: Bytes::from(key.to_string()),
    }
}

fn value(response: KvResponse) -> Option<Bytes> {
    match response {
        KvResponse::Done(Reply::Value(v)) => Some(v.value),
        KvResponse::Done(Reply::NotFound) => None,
        other => panic!("a get answered {other:?}"),
    }
}

fn host(group: GroupId, voters: &[u64]) -> Request {
    Request::HostGroup {
        group,
        voters: voters.to_vec(),
    }
}

// Goal: a group hosted through the admin RPC on three running nodes
// elects a leader, serves `Create` and KV writes, answers a repeated
// request as done and one with other voters as refused, and after a crash
// of every node is hosted again with its data.
#[tokio::test(start_paused = true)]
async fn hosted_group_serves_and_survives_a_restart() {
    for seed in seeds_or("hosted_group_serves_and_survives_a_restart", 3) {
        let mut s = Nodes::new(3, seed, no_statics);
        for id in 1..=3 {
            assert!(s.node(id).groups().is_empty());
        }
        s.host(7, &[1, 2, 3]).await;
        let create = ShardCommand::Create {
            shards: vec![0, 1],
            num: 1,
        };
        assert_eq!(s.step(7, create).await, ShardReply::Done, "seed {seed}");
        assert_eq!(
            s.kv(7, 0, 1, append("a", "x")).await,
            KvResponse::Done(Reply::Written { version: 1 }),
            "seed {seed}"
        );
        assert_eq!(value(s.kv(7, 0, 0, get("a")).await), Some(Bytes::from("x")));
        // Same voters in another order: done; other voters: refused.
        assert_eq!(
            s.admin_call(&s.admin, 2, host(7, &[3, 1, 2])).await,
            Response::AdminDone
        );
        assert_eq!(
            s.admin_call(&s.admin, 1, host(7, &[1, 2])).await,
            Response::GroupRefused(GroupRefusal::OtherVoters {
                voters: vec![1, 2, 3]
            })
        );
        s.crash_all_and_restart().await;
        for id in 1..=3 {
            assert_eq!(s.node(id).groups(), vec![7], "seed {seed}: node {id}");
            assert_eq!(
                s.engines[id as usize - 1].hosted_groups().expect("read"),
                BTreeMap::from([(7, vec![1, 2, 3])])
            );
        }
        assert_eq!(value(s.kv(7, 0, 0, get("a")).await), Some(Bytes::from("x")));
        assert_eq!(
            s.kv(7, 0, 2, append("a", "y")).await,
            KvResponse::Done(Reply::Written { version: 2 }),
            "seed {seed}"
        );
        // A retried write is still a copy: the session survived too.
        assert_eq!(
            s.kv(7, 0, 2, append("a", "y")).await,
            KvResponse::Done(Reply::Written { version: 2 })
        );
        assert_eq!(
            value(s.kv(7, 0, 0, get("a")).await),
            Some(Bytes::from("xy"))
        );
    }
}

// Goal: `DropGroup` is refused (and changes nothing) while the group holds
// a serving shard, accepted once the shard moved to another group; then
// nothing of the group remains on any node, it stays dropped across a
// restart, cannot be hosted again, and the moved data is intact.
#[tokio::test(start_paused = true)]
async fn drop_group_only_once_its_shards_moved_away() {
    for seed in seeds_or("drop_group_only_once_its_shards_moved_away", 3) {
        let mut s = Nodes::new(3, seed, no_statics);
        s.host(7, &[1, 2, 3]).await;
        s.host(8, &[1, 2, 3]).await;
        let create = ShardCommand::Create {
            shards: vec![0],
            num: 1,
        };
        assert_eq!(s.step(7, create).await, ShardReply::Done);
        assert_eq!(
            s.kv(7, 0, 1, append("a", "x")).await,
            KvResponse::Done(Reply::Written { version: 1 })
        );
        s.wait_applied(7).await;
        for id in 1..=3 {
            assert_eq!(
                s.admin_call(&s.admin, id, Request::DropGroup { group: 7 })
                    .await,
                Response::GroupRefused(GroupRefusal::HoldsShards {
                    held: 1,
                    shards: vec![0]
                }),
                "seed {seed}: node {id}"
            );
        }
        assert_eq!(value(s.kv(7, 0, 0, get("a")).await), Some(Bytes::from("x")));
        // Move shard 0 to group 8: Freeze → Install → Delete.
        let manifest = match s
            .step(
                7,
                ShardCommand::Freeze {
                    shard: 0,
                    num: 2,
                    to_group: 8,
                    to_nodes: vec![1, 2, 3],
                },
            )
            .await
        {
            ShardReply::Frozen { manifest } => manifest,
            other => panic!("seed {seed}: freeze answered {other:?}"),
        };
        // Frozen is held too.
        assert!(matches!(
            s.admin_call(
                &s.admin,
                s.leader(7).map_or(1, |l| l.0),
                Request::DropGroup { group: 7 }
            )
            .await,
            Response::GroupRefused(
                GroupRefusal::HoldsShards { .. } | GroupRefusal::CatchingUp { .. }
            )
        ));
        let install = ShardCommand::Install {
            shard: 0,
            num: 2,
            manifest,
        };
        assert_eq!(s.step(8, install).await, ShardReply::Done);
        let delete = ShardCommand::Delete { shard: 0, num: 2 };
        assert_eq!(s.step(7, delete).await, ShardReply::Done);
        // Each replica drops once it applied the delete.
        for id in 1..=3 {
            let start = Instant::now();
            loop {
                match s
                    .admin_call(&s.admin, id, Request::DropGroup { group: 7 })
                    .await
                {
                    Response::AdminDone => break,
                    Response::GroupRefused(
                        GroupRefusal::HoldsShards { .. } | GroupRefusal::CatchingUp { .. },
                    ) if start.elapsed() < RETRY_FOR => sleep(Duration::from_millis(50)).await,
                    other => panic!("seed {seed}: node {id} answered the drop {other:?}"),
                }
            }
            assert_eq!(s.node(id).groups(), vec![8], "seed {seed}: node {id}");
        }
        let check_gone = |s: &Nodes| {
            for (i, engine) in s.engines.iter().enumerate() {
                assert!(engine.group_dropped(7).expect("read"), "node {}", i + 1);
                assert!(!engine.hosted_groups().expect("read").contains_key(&7));
                assert_eq!(engine.group_state(7).expect("read"), Default::default());
                assert_eq!(engine.last_index(7).expect("read"), 0);
                assert_eq!(engine.applied(7).expect("read").index, 0);
                assert!(engine.shard_records(7).expect("read").is_empty());
                assert_eq!(engine.get(7, 0, b"a").expect("read"), None);
            }
        };
        check_gone(&s);
        assert_eq!(s.kv(7, 0, 0, get("a")).await, KvResponse::UnknownGroup);
        assert_eq!(value(s.kv(8, 0, 0, get("a")).await), Some(Bytes::from("x")));
        s.crash_all_and_restart().await;
        check_gone(&s);
        for id in 1..=3 {
            assert_eq!(s.node(id).groups(), vec![8]);
            // Dropped again: done; hosted again: refused for good.
            assert_eq!(
                s.admin_call(&s.admin, id, Request::DropGroup { group: 7 })
                    .await,
                Response::AdminDone
            );
            assert_eq!(
                s.admin_call(&s.admin, id, host(7, &[1, 2, 3])).await,
                Response::GroupRefused(GroupRefusal::Dropped)
            );
        }
        assert_eq!(
            s.kv(8, 0, 2, append("a", "y")).await,
            KvResponse::Done(Reply::Written { version: 2 })
        );
        assert_eq!(
            value(s.kv(8, 0, 0, get("a")).await),
            Some(Bytes::from("xy"))
        );
    }
}

/// Node 1 hosts static group 1 serving shard 0.
fn static_group_one(_: u64) -> Vec<GroupSpec> {
    vec![GroupSpec {
        group: 1,
        static_shards: vec![0],
        voters: vec![1],
    }]
}

// Goal: a non-admin cannot host or drop a group, and malformed or
// contradictory requests are refused with their reason; nothing changes
// and the node keeps running.
#[tokio::test(start_paused = true)]
async fn group_admin_requests_are_checked() {
    let mut s = Nodes::new(1, 1, static_group_one);
    for request in [
        host(5, &[1]),
        Request::DropGroup { group: 1 },
        Request::DropRemoved { group: 1 },
        Request::ShardSizes { group: 1 },
    ] {
        assert_eq!(
            s.admin_call(&s.client, 1, request).await,
            Response::Denied(Denied::NotAdmin)
        );
    }
    let too_many: Vec<u64> = (1..=VOTERS_MAX as u64 + 1).collect();
    for (request, refusal) in [
        (host(0, &[1]), GroupRefusal::ReservedGroup),
        (host(5, &[1, 1]), GroupRefusal::DuplicateVoter { node: 1 }),
        (host(5, &[0, 1]), GroupRefusal::ZeroVoter),
        (host(5, &[2, 3]), GroupRefusal::NotAVoter { node: 1 }),
        (
            host(5, &too_many),
            GroupRefusal::TooManyVoters {
                count: VOTERS_MAX as u64 + 1,
                max: VOTERS_MAX as u64,
            },
        ),
        (
            host(1, &[1, 2]),
            GroupRefusal::OtherVoters { voters: vec![1] },
        ),
        (Request::DropGroup { group: 1 }, GroupRefusal::Static),
        (Request::DropGroup { group: 5 }, GroupRefusal::NotHosted),
        (Request::DropRemoved { group: 1 }, GroupRefusal::Static),
        (Request::DropRemoved { group: 5 }, GroupRefusal::NotHosted),
        (Request::ShardSizes { group: 5 }, GroupRefusal::NotHosted),
    ] {
        assert_eq!(
            s.admin_call(&s.admin, 1, request.clone()).await,
            Response::GroupRefused(refusal),
            "{request:?}"
        );
    }
    assert_eq!(s.node(1).groups(), vec![1]);
    assert!(s.engines[0].hosted_groups().expect("read").is_empty());
    // The static group is hosted already with these voters: done.
    assert_eq!(
        s.admin_call(&s.admin, 1, host(1, &[1])).await,
        Response::AdminDone
    );
    // And the node still serves.
    assert_eq!(
        s.kv(1, 0, 1, append("k", "v")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    s.host(5, &[1]).await;
    assert_eq!(s.node(1).groups(), vec![1, 5]);
}

/// Group 1 on nodes 1–3 and group 2 on nodes 2–4, from the configuration.
fn overlapping_groups(id: u64) -> Vec<GroupSpec> {
    let specs = [
        GroupSpec {
            group: 1,
            static_shards: vec![0],
            voters: vec![1, 2, 3],
        },
        GroupSpec {
            group: 2,
            static_shards: vec![1],
            voters: vec![2, 3, 4],
        },
    ];
    specs
        .into_iter()
        .filter(|s| s.voters.contains(&id))
        .collect()
}

// Goal: groups on one node may have different members (`GroupSpec::voters`):
// each elects a leader among its own voters and serves writes, and a
// node outside a group never hosts it.
#[tokio::test(start_paused = true)]
async fn configured_groups_with_their_own_voters() {
    for seed in seeds_or("configured_groups_with_their_own_voters", 3) {
        let s = Nodes::new(4, seed, overlapping_groups);
        assert_eq!(s.node(1).groups(), vec![1]);
        assert_eq!(s.node(2).groups(), vec![1, 2]);
        assert_eq!(s.node(4).groups(), vec![2]);
        for (group, shard) in [(1, 0), (2, 1)] {
            assert_eq!(
                s.kv(group, shard, group, append("k", "v")).await,
                KvResponse::Done(Reply::Written { version: 1 }),
                "seed {seed}"
            );
        }
        let (l1, _) = s.leader(1).expect("group 1 leads");
        let (l2, _) = s.leader(2).expect("group 2 leads");
        assert!([1, 2, 3].contains(&l1) && [2, 3, 4].contains(&l2));
        assert_eq!(
            s.engines[0].group_state(2).expect("read"),
            Default::default()
        );
    }
}

/// Retries `DropGroup { group }` at node `id` until done (refusals that a
/// replica catching up explains are retried).
async fn drop_until_done(s: &Nodes, id: u64, group: GroupId) {
    let start = Instant::now();
    loop {
        match s
            .admin_call(&s.admin, id, Request::DropGroup { group })
            .await
        {
            Response::AdminDone => return,
            Response::GroupRefused(
                GroupRefusal::HoldsShards { .. } | GroupRefusal::CatchingUp { .. },
            ) if start.elapsed() < RETRY_FOR => sleep(Duration::from_millis(50)).await,
            other => panic!("seed {}: node {id} answered the drop {other:?}", s.seed),
        }
    }
}

/// Five appends to key "k" of shard 0 at `group`, each retried (same
/// seq) until acknowledged, noted in `expected`.
async fn append_five(s: &Nodes, group: GroupId, seq: &mut u64, expected: &mut String) {
    for _ in 0..5 {
        *seq += 1;
        let piece = format!("{seq},");
        let r = s.kv(group, 0, *seq, append("k", &piece)).await;
        assert!(
            matches!(r, KvResponse::Done(Reply::Written { .. })),
            "seed {}: append at group {group} answered {r:?}",
            s.seed
        );
        expected.push_str(&piece);
    }
}

// Goal: hosting, a shard move and dropping on an unreliable network
// (admin replies lost and retried, so both requests must be idempotent)
// with a node crashed and restarted between every step: each
// acknowledged append is present exactly once at the end, and the
// dropped group is gone from every node.
#[tokio::test(start_paused = true)]
async fn host_move_drop_under_faults() {
    for seed in seeds_or("host_move_drop_under_faults", 4) {
        let mut s = Nodes::with_network(3, seed, no_statics, false);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        s.host(7, &[1, 2, 3]).await;
        s.host(8, &[1, 2, 3]).await;
        let create = ShardCommand::Create {
            shards: vec![0],
            num: 1,
        };
        assert_eq!(s.step(7, create).await, ShardReply::Done, "seed {seed}");
        let mut expected = String::new();
        let mut seq = 0;
        append_five(&s, 7, &mut seq, &mut expected).await;
        let crash = |rng: &mut ChaCha8Rng| rng.random_range(0..3usize);
        let i = crash(&mut rng);
        s.crash(i).await;
        s.start(i);
        let manifest = match s
            .step(
                7,
                ShardCommand::Freeze {
                    shard: 0,
                    num: 2,
                    to_group: 8,
                    to_nodes: vec![1, 2, 3],
                },
            )
            .await
        {
            ShardReply::Frozen { manifest } => manifest,
            other => panic!("seed {seed}: freeze answered {other:?}"),
        };
        let i = crash(&mut rng);
        s.crash(i).await;
        s.start(i);
        let install = ShardCommand::Install {
            shard: 0,
            num: 2,
            manifest,
        };
        assert_eq!(s.step(8, install).await, ShardReply::Done, "seed {seed}");
        let delete = ShardCommand::Delete { shard: 0, num: 2 };
        assert_eq!(s.step(7, delete).await, ShardReply::Done, "seed {seed}");
        append_five(&s, 8, &mut seq, &mut expected).await;
        let first = crash(&mut rng) as u64 + 1;
        drop_until_done(&s, first, 7).await;
        let i = crash(&mut rng);
        s.crash(i).await;
        s.start(i);
        for id in 1..=3 {
            drop_until_done(&s, id, 7).await;
        }
        s.crash_all_and_restart().await;
        for (i, engine) in s.engines.iter().enumerate() {
            assert!(
                engine.group_dropped(7).expect("read"),
                "seed {seed}: node {}",
                i + 1
            );
            assert_eq!(engine.group_state(7).expect("read"), Default::default());
            assert_eq!(s.node(i as u64 + 1).groups(), vec![8]);
        }
        let got = value(s.kv(8, 0, 0, get("k")).await).unwrap_or_default();
        assert_eq!(got, Bytes::from(expected), "seed {seed}: every append once");
    }
}

/// Hosts `groups` groups on nodes 1–3 and waits until no node leads more
/// than `ceil(groups / 3)` of them; then watches that no leader or term
/// changes for [`STABLE_FOR`]. Returns each group's (leader, term).
async fn spread_and_hold(s: &mut Nodes, groups: u64) -> Vec<(u64, u64)> {
    let seed = s.seed;
    for group in 1..=groups {
        s.host(group, &[1, 2, 3]).await;
    }
    let share = groups.div_ceil(3) as usize;
    let start = Instant::now();
    let spread = loop {
        let leaders: Vec<Option<(u64, u64)>> = (1..=groups).map(|g| s.leader(g)).collect();
        if let Some(leaders) = leaders.iter().copied().collect::<Option<Vec<_>>>() {
            let most = (1..=3)
                .map(|n| leaders.iter().filter(|l| l.0 == n).count())
                .max()
                .unwrap_or(0);
            if most <= share {
                break leaders;
            }
        }
        assert!(
            start.elapsed() < SPREAD_WITHIN,
            "seed {seed}: leaders {leaders:?} not spread within {SPREAD_WITHIN:?}"
        );
        sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "seed {seed}: leaders (node, term) {spread:?} after {:?}",
        start.elapsed()
    );
    let watched = Instant::now();
    while watched.elapsed() < STABLE_FOR {
        sleep(Duration::from_millis(50)).await;
        for (i, expected) in spread.iter().enumerate() {
            let group = i as GroupId + 1;
            assert_eq!(
                s.leader(group),
                Some(*expected),
                "seed {seed}: group {group} changed leader after {:?} of stability",
                watched.elapsed()
            );
        }
    }
    spread
}

// Goal: three groups hosted on the same three nodes end with three
// different leaders within a bounded time, and then stay put: no leader
// or term changes for a long while (the balancing proposes nothing once
// balanced, and nothing ping-pongs); every group still serves.
#[tokio::test(start_paused = true)]
async fn three_groups_on_three_nodes_get_three_leaders() {
    for seed in seeds_or("three_groups_on_three_nodes_get_three_leaders", 8) {
        let mut s = Nodes::new(3, seed, no_statics);
        let spread = spread_and_hold(&mut s, 3).await;
        let mut nodes: Vec<u64> = spread.iter().map(|l| l.0).collect();
        nodes.sort_unstable();
        assert_eq!(nodes, vec![1, 2, 3], "seed {seed}");
        for group in 1..=3 {
            let create = ShardCommand::Create {
                shards: vec![group as ShardId],
                num: 1,
            };
            assert_eq!(s.step(group, create).await, ShardReply::Done);
            assert_eq!(
                s.kv(group, group as ShardId, group, append("k", "v")).await,
                KvResponse::Done(Reply::Written { version: 1 })
            );
        }
    }
}

// Goal: six groups on three nodes settle at two leaderships per node and
// stay so.
#[tokio::test(start_paused = true)]
async fn six_groups_on_three_nodes_settle_at_two_each() {
    for seed in seeds_or("six_groups_on_three_nodes_settle_at_two_each", 4) {
        let mut s = Nodes::new(3, seed, no_statics);
        let spread = spread_and_hold(&mut s, 6).await;
        for node in 1..=3 {
            assert_eq!(
                spread.iter().filter(|l| l.0 == node).count(),
                2,
                "seed {seed}: {spread:?}"
            );
        }
    }
}
