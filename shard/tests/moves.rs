//! Shard moves between replica groups on the in-memory network with
//! virtual time: Freeze → Install → Delete through the admin RPC, the
//! production node runtime on the in-memory engine.
//!
//! Two groups on disjoint node sets (group 1 on nodes 1–3, group 2 on
//! nodes 4–6), as the lab runs them. Checked: the moved shard's data and
//! sessions arrive whole (a write retried across the move is applied once),
//! the source answers `WrongGroup` from its freeze on and drops the data at
//! its delete, other shards keep serving, steps are fenced by config
//! number and idempotent, and all of it survives crashes of every node.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::seeds_or;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::{EngineConfig, GroupId, MemStore, Reply, ShardId, ShardStatus};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::{NodeId, RpcCaller, ADMIN_CLIENT_NAME};
use shoal_shard::node::{GroupSpec, Node, NodeConfig, NodeHandle};
use shoal_shard::protocol::{
    ClientCommand, KvProtocol, KvRequest, KvResponse, MemberChange, Request, Response,
    ShardCommand, ShardReply, ShardRequest,
};
use shoal_shard::{Client, ClientConfig};

const RPC_DEADLINE: Duration = Duration::from_millis(500);
/// How long a step or a request is retried before the test gives up.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// Six nodes, two groups of three, no static shards.
struct Sharded {
    net: MemNetwork<KvProtocol>,
    engines: Vec<MemStore>,
    nodes: Vec<Option<NodeHandle>>,
    dir: std::path::PathBuf,
    seed: u64,
    incarnation: u64,
    admin: MemClient<KvProtocol>,
    client: MemClient<KvProtocol>,
}

fn members(group: GroupId) -> Vec<u64> {
    match group {
        1 => vec![1, 2, 3],
        2 => vec![4, 5, 6],
        _ => panic!("no group {group}"),
    }
}

impl Sharded {
    fn new(seed: u64, reliable: bool) -> Sharded {
        // One directory per harness: tests run side by side in one
        // process, and two with the same seed must not share files.
        static HARNESSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shoal-moves-{}-{seed}-{}-{}",
            std::process::id(),
            reliable,
            HARNESSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let net = MemNetwork::new(config);
        net.set_reliable(reliable);
        let mut s = Sharded {
            admin: net.add_client(ADMIN_CLIENT_NAME),
            client: net.add_client("client-1"),
            net,
            engines: (0..6)
                .map(|_| MemStore::new_in_memory(EngineConfig::default()).expect("engine"))
                .collect(),
            nodes: (0..6).map(|_| None).collect(),
            dir,
            seed,
            incarnation: 0,
        };
        for i in 0..6 {
            s.start(i);
        }
        s
    }

    /// Starts node `i + 1`: nodes 1-6 host their group, node 7 (see
    /// [`Sharded::start_spare`]) none.
    fn start(&mut self, i: usize) {
        let id = i as u64 + 1;
        self.incarnation += 1;
        let (transport, inbox) = self.net.add_node(NodeId(id));
        let dir = self.dir.join(format!("node-{id}"));
        let mut config = if id <= 6 {
            let group = if id <= 3 { 1 } else { 2 };
            let mut config = NodeConfig::new(id, members(group), dir);
            config.groups = vec![GroupSpec {
                group,
                static_shards: Vec::new(),
                voters: Vec::new(),
            }];
            config
        } else {
            let mut config = NodeConfig::new(id, vec![id], dir);
            config.groups = Vec::new();
            config
        };
        config.blocking_io = false;
        config.seed = self.seed ^ self.incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        config.max_raft_state_bytes = Some(4096);
        let handle =
            Node::start(config, self.engines[i].clone(), transport, inbox).expect("node starts");
        self.nodes[i] = Some(handle);
    }

    /// Starts node 7, which hosts no group: a spare to add to one.
    fn start_spare(&mut self) {
        self.engines
            .push(MemStore::new_in_memory(EngineConfig::default()).expect("engine"));
        self.nodes.push(None);
        self.start(6);
    }

    async fn crash(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].take() {
            h.crash().await.expect("healthy until the crash");
        }
        self.net.remove_node(NodeId(i as u64 + 1));
        self.engines[i].crash_and_recover().expect("recovers");
    }

    /// Sends `request` to `group`'s members until one answers with
    /// something other than "not the leader / busy / unreachable".
    async fn call(
        &self,
        caller: &MemClient<KvProtocol>,
        group: GroupId,
        request: Request,
    ) -> KvResponse {
        let start = tokio::time::Instant::now();
        let mut i = 0usize;
        loop {
            assert!(
                start.elapsed() < RETRY_FOR,
                "seed {}: no answer to {request:?} within {RETRY_FOR:?}",
                self.seed
            );
            let to = members(group)[i % 3];
            i += 1;
            match caller
                .call_with_deadline(NodeId(to), request.clone(), RPC_DEADLINE)
                .await
            {
                Ok(Response::Kv(
                    KvResponse::NotLeader { .. } | KvResponse::Busy | KvResponse::ShuttingDown,
                ))
                | Err(_) => {
                    if i % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Ok(Response::Kv(answer)) => return answer,
                Ok(other) => panic!("unexpected response {other:?}"),
            }
        }
    }

    async fn step(&self, group: GroupId, command: ShardCommand) -> ShardReply {
        // An install's files went to the group's members (the freezes
        // here ship to `members(2)`).
        let request = Request::Shard(ShardRequest {
            group,
            command,
            holders: members(group),
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

    /// Freeze at `from`, install at `to`, delete at `from`, for config `num`.
    async fn move_shard(&self, shard: ShardId, num: u64, from: GroupId, to: GroupId) {
        let manifest = match self
            .step(
                from,
                ShardCommand::Freeze {
                    shard,
                    num,
                    to_group: to,
                    to_nodes: members(to),
                },
            )
            .await
        {
            ShardReply::Frozen { manifest } => manifest,
            other => panic!("seed {}: freeze answered {other:?}", self.seed),
        };
        assert_eq!(
            self.step(
                to,
                ShardCommand::Install {
                    shard,
                    num,
                    manifest
                }
            )
            .await,
            ShardReply::Done
        );
        assert_eq!(
            self.step(from, ShardCommand::Delete { shard, num }).await,
            ShardReply::Done
        );
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

// Goal: one move, every step checked, including fencing, repeats, the
// exactly-once of a write retried across the move, and a full restart.
#[tokio::test(start_paused = true)]
async fn move_one_shard_between_groups() {
    let mut s = Sharded::new(1, true);
    assert_eq!(
        s.step(
            1,
            ShardCommand::Create {
                shards: vec![0, 1, 2, 3],
                num: 1
            }
        )
        .await,
        ShardReply::Done
    );
    // Group 2 serves nothing yet; group 1 serves shard 2.
    assert_eq!(s.kv(2, 2, 0, get("a")).await, KvResponse::WrongGroup);
    assert_eq!(
        s.kv(1, 2, 1, append("a", "x")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    assert_eq!(
        s.kv(1, 3, 2, append("b", "y")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    // Freeze: group 1 refuses shard 2 from now on, still serves shard 3.
    let manifest = match s
        .step(
            1,
            ShardCommand::Freeze {
                shard: 2,
                num: 2,
                to_group: 2,
                to_nodes: members(2),
            },
        )
        .await
    {
        ShardReply::Frozen { manifest } => manifest,
        other => panic!("freeze answered {other:?}"),
    };
    assert_eq!(
        s.kv(1, 2, 3, append("a", "z")).await,
        KvResponse::WrongGroup
    );
    assert_eq!(s.kv(1, 2, 0, get("a")).await, KvResponse::WrongGroup);
    assert_eq!(
        s.kv(1, 3, 4, append("b", "y")).await,
        KvResponse::Done(Reply::Written { version: 2 })
    );
    // A manifest made for another group is refused and changes nothing.
    let mut wrong = manifest.clone();
    wrong.scope = shoal_engine::SnapshotScope::Shard {
        shard: 2,
        target: 9,
    };
    assert!(matches!(
        s.step(
            2,
            ShardCommand::Install {
                shard: 2,
                num: 2,
                manifest: wrong
            }
        )
        .await,
        ShardReply::Refused { .. }
    ));
    assert_eq!(s.kv(2, 2, 0, get("a")).await, KvResponse::WrongGroup);
    assert_eq!(
        s.step(
            2,
            ShardCommand::Install {
                shard: 2,
                num: 2,
                manifest
            }
        )
        .await,
        ShardReply::Done
    );
    assert_eq!(value(s.kv(2, 2, 0, get("a")).await), Some(Bytes::from("x")));
    assert_eq!(
        s.step(1, ShardCommand::Delete { shard: 2, num: 2 }).await,
        ShardReply::Done
    );
    assert_eq!(
        value(s.kv(1, 3, 0, get("b")).await),
        Some(Bytes::from("yy"))
    );
    s.crash(0).await;
    let _ = std::fs::remove_dir_all(&s.dir);
}

// Goal: the same move done right: install, delete, then fencing and
// repeats, exactly-once across the move, and a restart of every node.
#[tokio::test(start_paused = true)]
async fn move_then_fence_repeat_and_restart() {
    let mut s = Sharded::new(2, true);
    assert_eq!(
        s.step(
            1,
            ShardCommand::Create {
                shards: vec![0, 1, 2, 3],
                num: 1
            }
        )
        .await,
        ShardReply::Done
    );
    assert_eq!(
        s.kv(1, 2, 1, append("a", "x")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    s.move_shard(2, 2, 1, 2).await;
    // The data and the session moved: a retry of seq 1 (a client whose
    // reply was lost during the move) gets the first reply, not a second
    // append.
    assert_eq!(
        s.kv(2, 2, 1, append("a", "x")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    assert_eq!(value(s.kv(2, 2, 0, get("a")).await), Some(Bytes::from("x")));
    assert_eq!(
        s.kv(2, 2, 2, append("a", "w")).await,
        KvResponse::Done(Reply::Written { version: 2 })
    );
    assert_eq!(s.kv(1, 2, 0, get("a")).await, KvResponse::WrongGroup);
    // Repeats succeed and change nothing; older configs are stale; a
    // contradiction is refused.
    assert_eq!(
        s.step(1, ShardCommand::Delete { shard: 2, num: 2 }).await,
        ShardReply::Done
    );
    assert_eq!(
        s.step(
            1,
            ShardCommand::Freeze {
                shard: 2,
                num: 1,
                to_group: 2,
                to_nodes: members(2)
            }
        )
        .await,
        ShardReply::Stale { num: 2 }
    );
    assert!(matches!(
        s.step(2, ShardCommand::Delete { shard: 2, num: 2 }).await,
        ShardReply::Refused { .. }
    ));
    // The source dropped the shard's data on every replica once applied.
    for i in 0..3 {
        let engine = &s.engines[i];
        let records = engine.shard_records(1).expect("records");
        if records.get(&2).map(|r| r.status) == Some(ShardStatus::Absent) {
            assert_eq!(engine.get(1, 2, b"a").expect("get"), None, "node {}", i + 1);
        }
    }
    // Everything survives a crash of every node.
    for i in 0..6 {
        s.crash(i).await;
    }
    for i in 0..6 {
        s.start(i);
    }
    assert_eq!(
        value(s.kv(2, 2, 0, get("a")).await),
        Some(Bytes::from("xw"))
    );
    assert_eq!(s.kv(1, 2, 0, get("a")).await, KvResponse::WrongGroup);
    // And it moves back.
    s.move_shard(2, 3, 2, 1).await;
    assert_eq!(
        value(s.kv(1, 2, 0, get("a")).await),
        Some(Bytes::from("xw"))
    );
    assert_eq!(s.kv(2, 2, 0, get("a")).await, KvResponse::WrongGroup);
}

// Goal: moves back and forth on an unreliable network, with a node of
// each group crashed and restarted between steps, while every write to the
// moving shard is retried until acknowledged at whichever group serves
// it: afterwards each acknowledged append is present exactly once.
#[tokio::test(start_paused = true)]
async fn moves_under_faults_keep_every_write_once() {
    for seed in seeds_or("moves_under_faults_keep_every_write_once", 4) {
        let mut s = Sharded::new(seed, false);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        assert_eq!(
            s.step(
                1,
                ShardCommand::Create {
                    shards: vec![0, 1],
                    num: 1
                }
            )
            .await,
            ShardReply::Done
        );
        let mut owner: BTreeMap<ShardId, GroupId> = BTreeMap::from([(0, 1), (1, 1)]);
        let mut seq = 0u64;
        let mut expected = String::new();
        for num in 2..8u64 {
            let from = owner[&1];
            let to = 3 - from;
            // Every other move copies the shard first, so the writes below
            // land after its pre-copy (and the crashes below may take the
            // pre-copy's record with them: then the freeze ships the whole
            // shard). A pre-copy whose files the network lost is refused,
            // and the move goes on without it.
            if num % 2 == 0 {
                let reply = s.step(from, precopy(1, num, to)).await;
                assert!(
                    matches!(reply, ShardReply::Done | ShardReply::Refused { .. }),
                    "seed {seed}: pre-copy answered {reply:?}"
                );
            }
            // Writes, each retried (same seq) by `kv` until answered.
            for _ in 0..5 {
                seq += 1;
                let piece = format!("{seq},");
                let group = owner[&1];
                match s.kv(group, 1, seq, append("k", &piece)).await {
                    KvResponse::Done(Reply::Written { .. }) => {}
                    other => panic!("seed {seed}: append at group {group} answered {other:?}"),
                }
                expected.push_str(&piece);
            }
            // Crash and restart one node of each group.
            for group in [1usize, 2] {
                let i = (group - 1) * 3 + rng.random_range(0..3);
                s.crash(i).await;
                s.start(i);
            }
            s.move_shard(1, num, from, to).await;
            owner.insert(1, to);
            // A write retried with an old seq at the new owner is a copy.
            let retried = s.kv(to, 1, seq, append("k", "dup")).await;
            assert!(
                matches!(retried, KvResponse::Done(Reply::Written { .. })),
                "seed {seed}: retry answered {retried:?}"
            );
        }
        let got = value(s.kv(owner[&1], 1, 0, get("k")).await).unwrap_or_default();
        assert_eq!(
            got,
            Bytes::from(expected),
            "seed {seed}: every acknowledged append once"
        );
        // Shard 0 never moved and kept serving at group 1.
        assert_eq!(
            s.kv(1, 0, 0, get("zz")).await,
            KvResponse::Done(Reply::NotFound)
        );
        let _ = std::fs::remove_dir_all(&s.dir);
    }
}

/// A pre-copy of `shard` for config `num` to group `to`.
fn precopy(shard: ShardId, num: u64, to: GroupId) -> ShardCommand {
    ShardCommand::Precopy {
        shard,
        num,
        to_group: to,
        to_nodes: members(to),
    }
}

fn delete(key: &str) -> ClientCommand {
    ClientCommand::Delete {
        key: Bytes::from(key.to_string()),
    }
}

// Goal: copy before freeze. A shard pre-copied while it serves, then
// written (keys updated, deleted, created), moves exactly: the freeze
// ships only the keys written since the pre-copy and the sessions, the
// destination puts the pre-copied file in place, and every replica there
// holds what a full export would have given, exactly-once included. A
// pre-copy is not a log entry, is fenced by config number, and is
// optional: one whose record a restart of the source lost leaves the
// freeze to ship the whole shard.
#[tokio::test(start_paused = true)]
async fn a_shard_copied_before_its_freeze_moves_exactly() {
    let mut s = Sharded::new(7, true);
    assert_eq!(
        s.step(
            1,
            ShardCommand::Create {
                shards: vec![0, 1, 2, 3],
                num: 1
            }
        )
        .await,
        ShardReply::Done
    );
    for (seq, key) in [(1, "a"), (2, "b"), (3, "c")] {
        assert_eq!(
            s.kv(1, 2, seq, append(key, "1")).await,
            KvResponse::Done(Reply::Written { version: 1 })
        );
    }
    assert_eq!(s.step(1, precopy(2, 2, 2)).await, ShardReply::Done);
    assert_eq!(
        s.step(1, precopy(2, 2, 2)).await,
        ShardReply::Done,
        "a repeat waits for (or finds) the same pre-copy"
    );
    // The shard still serves after its pre-copy.
    assert_eq!(
        s.kv(1, 2, 4, append("a", "2")).await,
        KvResponse::Done(Reply::Written { version: 2 })
    );
    assert_eq!(
        s.kv(1, 2, 5, delete("b")).await,
        KvResponse::Done(Reply::Deleted { existed: true })
    );
    assert_eq!(
        s.kv(1, 2, 6, append("d", "new")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    let manifest = freeze_to_2(&s, 2, 2).await;
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[0].starts_with("precopy-"), "{names:?}");
    assert_eq!(names[1..], ["kv-delta.sst", "dedup.sst"]);
    assert_eq!(manifest.files[1].entries, 3, "a, b and d changed since");
    // A pre-copy of a shard no longer served below the config is moot,
    // and one of an older config is stale.
    assert_eq!(s.step(1, precopy(2, 2, 2)).await, ShardReply::Done);
    assert_eq!(
        s.step(
            2,
            ShardCommand::Install {
                shard: 2,
                num: 2,
                manifest
            }
        )
        .await,
        ShardReply::Done
    );
    assert_eq!(
        s.step(1, ShardCommand::Delete { shard: 2, num: 2 }).await,
        ShardReply::Done
    );
    assert_eq!(
        s.step(1, precopy(2, 1, 2)).await,
        ShardReply::Stale { num: 2 }
    );
    assert_eq!(
        value(s.kv(2, 2, 0, get("a")).await),
        Some(Bytes::from("12"))
    );
    assert_eq!(value(s.kv(2, 2, 0, get("b")).await), None);
    assert_eq!(value(s.kv(2, 2, 0, get("c")).await), Some(Bytes::from("1")));
    assert_eq!(
        value(s.kv(2, 2, 0, get("d")).await),
        Some(Bytes::from("new"))
    );
    // The sessions came with the delta: the last write, retried at the
    // destination, is answered as it was and not applied again.
    assert_eq!(
        s.kv(2, 2, 6, append("d", "new")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    assert_eq!(
        value(s.kv(2, 2, 0, get("d")).await),
        Some(Bytes::from("new"))
    );
    // Every replica of the destination holds the same shard: each reads it
    // as its own leader after the others' crash and restart.
    for i in 3..6 {
        s.crash(i).await;
        s.start(i);
    }
    assert_eq!(
        value(s.kv(2, 2, 0, get("a")).await),
        Some(Bytes::from("12"))
    );

    // Back to group 1, pre-copied, but group 1's nodes restart before the
    // freeze: the record is gone, and the freeze ships the whole shard.
    assert_eq!(s.step(2, precopy(2, 3, 1)).await, ShardReply::Done);
    assert_eq!(
        s.kv(2, 2, 7, append("c", "2")).await,
        KvResponse::Done(Reply::Written { version: 2 })
    );
    for i in 3..6 {
        s.crash(i).await;
        s.start(i);
    }
    let freeze = ShardCommand::Freeze {
        shard: 2,
        num: 3,
        to_group: 1,
        to_nodes: members(1),
    };
    let manifest = match s.step(2, freeze).await {
        ShardReply::Frozen { manifest } => manifest,
        other => panic!("freeze answered {other:?}"),
    };
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["kv.sst", "dedup.sst"], "the whole shard");
    let install = ShardCommand::Install {
        shard: 2,
        num: 3,
        manifest,
    };
    assert_eq!(s.step(1, install).await, ShardReply::Done);
    assert_eq!(
        value(s.kv(1, 2, 0, get("c")).await),
        Some(Bytes::from("12"))
    );
    assert_eq!(value(s.kv(1, 2, 0, get("b")).await), None);
    s.crash(0).await;
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// Freezes `shard` at group 1 for config `num` (to group 2) and returns
/// the export's manifest.
async fn freeze_to_2(s: &Sharded, shard: ShardId, num: u64) -> shoal_engine::SnapshotManifest {
    let freeze = ShardCommand::Freeze {
        shard,
        num,
        to_group: 2,
        to_nodes: members(2),
    };
    match s.step(1, freeze).await {
        ShardReply::Frozen { manifest } => manifest,
        other => panic!("seed {}: freeze answered {other:?}", s.seed),
    }
}

// Goal: two controllers carrying out the same change both freeze the
// shard, and each freeze ships an export of its own (the source's applied
// index differs). The install naming the first export still finds its
// files after the second was shipped, and the second install is a repeat.
// (Both exports used to share one directory on the destination: the
// second's manifest replaced the first's, and the first controller's
// install was refused as "files not on node"; lab test
// ConcurrentReliable5C, seed 1.)
#[tokio::test(start_paused = true)]
async fn an_install_finds_its_export_after_a_repeated_freeze() {
    let s = Sharded::new(3, true);
    assert_eq!(
        s.step(
            1,
            ShardCommand::Create {
                shards: vec![0, 1, 2, 3],
                num: 1
            }
        )
        .await,
        ShardReply::Done
    );
    assert_eq!(
        s.kv(1, 2, 1, append("a", "x")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    let first = freeze_to_2(&s, 2, 2).await;
    let second = freeze_to_2(&s, 2, 2).await;
    assert_ne!(first, second, "a repeated freeze exports anew");
    for manifest in [first, second] {
        let install = ShardCommand::Install {
            shard: 2,
            num: 2,
            manifest,
        };
        assert_eq!(s.step(2, install).await, ShardReply::Done);
    }
    assert_eq!(value(s.kv(2, 2, 0, get("a")).await), Some(Bytes::from("x")));
    assert_eq!(
        s.step(1, ShardCommand::Delete { shard: 2, num: 2 }).await,
        ShardReply::Done
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}

// Goal: an install of a config the destination has since moved past (a
// stale controller's late step, its files pruned meanwhile) is answered
// `Stale`, which fences that controller, rather than refused for missing
// files, which the controller takes for a permanent error (lab test
// ConcurrentReliable5C, seed 1, before the fix).
#[tokio::test(start_paused = true)]
async fn a_late_install_without_its_files_is_stale() {
    let s = Sharded::new(4, true);
    assert_eq!(
        s.step(
            1,
            ShardCommand::Create {
                shards: vec![0, 1, 2, 3],
                num: 1
            }
        )
        .await,
        ShardReply::Done
    );
    let manifest = freeze_to_2(&s, 2, 2).await;
    let install = ShardCommand::Install {
        shard: 2,
        num: 2,
        manifest: manifest.clone(),
    };
    assert_eq!(s.step(2, install.clone()).await, ShardReply::Done);
    assert_eq!(
        s.step(1, ShardCommand::Delete { shard: 2, num: 2 }).await,
        ShardReply::Done
    );
    s.move_shard(2, 3, 2, 1).await;
    // Group 2's nodes prune the move's files every PRUNE_EVERY_TICKS.
    let export = shoal_shard::node::moves::export_id(&manifest);
    let tick = Duration::from_millis(shoal_consensus::config::DEFAULT_TICK_MS);
    tokio::time::sleep(tick * (shoal_shard::node::PRUNE_EVERY_TICKS as u32 + 10)).await;
    for id in members(2) {
        let dir = shoal_shard::node::moves::incoming_dir(
            &s.dir.join(format!("node-{id}")),
            2,
            2,
            2,
            export,
        );
        assert!(!dir.exists(), "node {id} still has {}", dir.display());
    }
    assert_eq!(s.step(2, install).await, ShardReply::Stale { num: 3 });
    let _ = std::fs::remove_dir_all(&s.dir);
}

// Goal: a replica whose shipped files are gone when it applies the install
// (lost in a crash between the net storing them and the node filing them)
// stops alone: its node keeps running, the group keeps serving the moved
// shard from its other replicas, and nothing is installed half.
#[tokio::test(start_paused = true)]
async fn a_replica_without_its_files_stops_alone() {
    let s = Sharded::new(3, true);
    assert_eq!(
        s.step(
            1,
            ShardCommand::Create {
                shards: vec![0, 1],
                num: 1
            }
        )
        .await,
        ShardReply::Done
    );
    assert_eq!(
        s.kv(1, 1, 1, append("a", "x")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    let manifest = match s
        .step(
            1,
            ShardCommand::Freeze {
                shard: 1,
                num: 2,
                to_group: 2,
                to_nodes: members(2),
            },
        )
        .await
    {
        ShardReply::Frozen { manifest } => manifest,
        other => panic!("freeze answered {other:?}"),
    };
    // Remove the files on a follower of group 2.
    let leader = loop {
        let leaders: Vec<u64> = members(2)
            .into_iter()
            .filter(|&id| {
                s.nodes[id as usize - 1].as_ref().unwrap().status(2).role
                    == Some(shoal_consensus::Role::Leader)
            })
            .collect();
        if let [leader] = leaders[..] {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim = members(2).into_iter().find(|&id| id != leader).unwrap();
    let incoming = shoal_shard::node::moves::incoming_dir(
        &s.dir.join(format!("node-{victim}")),
        2,
        1,
        2,
        shoal_shard::node::moves::export_id(&manifest),
    );
    std::fs::remove_dir_all(&incoming).expect("the shipped files were there");
    assert_eq!(
        s.step(
            2,
            ShardCommand::Install {
                shard: 1,
                num: 2,
                manifest
            }
        )
        .await,
        ShardReply::Done
    );
    assert_eq!(value(s.kv(2, 1, 0, get("a")).await), Some(Bytes::from("x")));
    // The victim's replica stopped once it reached the install; its node
    // did not.
    let handle = s.nodes[victim as usize - 1].as_ref().unwrap();
    let start = tokio::time::Instant::now();
    while handle.groups().contains(&2) {
        assert!(
            start.elapsed() < RETRY_FOR,
            "the replica never reached the install"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(handle.is_running());
    let records = s.engines[victim as usize - 1]
        .shard_records(2)
        .expect("records");
    assert!(
        records
            .get(&1)
            .is_none_or(|r| r.status != ShardStatus::Serving),
        "nothing installed half: {records:?}"
    );
    assert_eq!(
        s.kv(2, 1, 2, append("a", "y")).await,
        KvResponse::Done(Reply::Written { version: 2 })
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}

// Goal: a member added to a group after the config named its members (so
// no freeze ships to it) still gets every install's files: it joins from a
// snapshot rather than replaying entries from before its membership, the
// leader forwards an install's files to it before proposing the install,
// and its replica ingests the moved shard instead of stopping.
#[tokio::test(start_paused = true)]
async fn a_member_added_since_the_config_gets_the_install_files() {
    let mut s = Sharded::new(5, true);
    s.start_spare();
    let create = |shards: Vec<ShardId>| ShardCommand::Create { shards, num: 1 };
    assert_eq!(s.step(1, create(vec![0, 1])).await, ShardReply::Done);
    assert_eq!(s.step(2, create(vec![2, 3])).await, ShardReply::Done);
    assert_eq!(
        s.kv(1, 1, 1, append("a", "x")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    assert_eq!(
        s.kv(2, 2, 2, append("b", "y")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    // Shard 0 moves to group 2 before node 7 joins: an install entry in
    // group 2's log whose files node 7 never gets, so it must not replay
    // it (it starts from a snapshot instead).
    assert_eq!(
        s.kv(1, 0, 3, append("c", "w")).await,
        KvResponse::Done(Reply::Written { version: 1 })
    );
    let before = freeze_to_2(&s, 0, 2).await;
    let install = |shard, manifest| ShardCommand::Install {
        shard,
        num: 2,
        manifest,
    };
    assert_eq!(s.step(2, install(0, before)).await, ShardReply::Done);
    // Node 7 joins group 2 as a learner; the config still names 4, 5, 6.
    let everyone: Vec<NodeId> = (1..=7).map(NodeId).collect();
    let admin = Client::new(s.admin.clone(), everyone.clone(), ClientConfig::new(0x5eed));
    admin
        .host_group(NodeId(7), 2, Vec::new())
        .await
        .expect("node 7 hosts group 2 to join it");
    admin
        .change_members(
            2,
            MemberChange::AddLearner {
                node: 7,
                addr: "127.0.0.1:7007".into(),
            },
            &everyone,
        )
        .await
        .expect("add node 7");
    // It catches up (from a snapshot) before the move, so it meets the
    // install as a log entry.
    let node7 = &s.engines[6];
    let start = tokio::time::Instant::now();
    while node7.get(2, 2, b"b").expect("read").is_none() {
        assert!(start.elapsed() < RETRY_FOR, "node 7 never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let manifest = freeze_to_2(&s, 1, 2).await;
    assert_eq!(s.step(2, install(1, manifest)).await, ShardReply::Done);
    // Node 7's replica reaches the install and ingests the shard (without
    // the forward it would stop there), and it holds what group 2 had
    // before it joined (from its snapshot).
    let start = tokio::time::Instant::now();
    while node7.get(2, 1, b"a").expect("read").is_none() {
        assert!(
            s.nodes[6].as_ref().unwrap().groups().contains(&2),
            "seed {}: node 7's replica of group 2 stopped",
            s.seed
        );
        assert!(
            start.elapsed() < RETRY_FOR,
            "node 7 never installed shard 1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        node7.get(2, 1, b"a").expect("read").map(|v| v.value),
        Some(Bytes::from("x"))
    );
    assert_eq!(
        node7.get(2, 2, b"b").expect("read").map(|v| v.value),
        Some(Bytes::from("y"))
    );
    assert_eq!(
        node7.get(2, 0, b"c").expect("read").map(|v| v.value),
        Some(Bytes::from("w"))
    );
    // It can vote now: promoted, it counts in group 2's majority.
    let (voters, _) = admin
        .change_members(2, MemberChange::Promote { node: 7 }, &everyone)
        .await
        .expect("promote node 7");
    assert_eq!(voters, vec![4, 5, 6, 7]);
    assert_eq!(
        s.kv(2, 1, 4, append("a", "z")).await,
        KvResponse::Done(Reply::Written { version: 2 })
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}
