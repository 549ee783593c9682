//! Input pins (`Client::pin`, `scan_pinned`, `unpin`): a key range read at
//! one point in time, page by page, while clients keep writing — the input
//! of a MapReduce job. Every test runs on the in-memory network and engine
//! under tokio's paused clock, seeded (`SHOAL_SEED` replays one seed,
//! `SHOAL_SEEDS` sweeps more).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, ELECTION_TIMEOUT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::{EngineConfig, GroupId, MemStore};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::{NodeId, ADMIN_CLIENT_NAME};
use shoal_shard::client::{Client, ClientConfig, ClientError, PinnedShard};
use shoal_shard::controller::{
    join, leave, ChangeOutcome, Controller, ControllerConfig, GroupStore, InitOutcome, RpcMover,
    ShardConfig,
};
use shoal_shard::node::{
    GroupSpec, Node, NodeConfig, NodeHandle, CONTROLLER_GROUP, CONTROLLER_SHARD, KV_GROUP,
    PINS_MAX, PIN_IDLE_MS_DEFAULT,
};
use shoal_shard::protocol::KvProtocol;
use tokio::time::sleep;

type Data = BTreeMap<Bytes, Bytes>;

fn key(i: usize) -> Bytes {
    Bytes::from(format!("k{i:04}"))
}

/// Reads a whole pin through `scan_pinned` in pages of `page` pairs,
/// running `between` after every page (writes racing the reader).
async fn read_pin<F, Fut>(
    client: &Client<MemClient<KvProtocol>>,
    pin: &PinnedShard,
    (start, end): (Bytes, Bytes),
    page: u64,
    mut between: F,
) -> Data
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut out = Data::new();
    let mut from = start;
    loop {
        let got = client
            .scan_pinned(pin, from, end.clone(), page)
            .await
            .expect("scan_pinned");
        assert!(got.pairs.len() as u64 <= page);
        for (k, v) in got.pairs {
            assert!(out.insert(k, v.value).is_none(), "a key returned twice");
        }
        between().await;
        match got.next {
            Some(next) => from = next,
            None => return out,
        }
    }
}

/// Puts `n` keys with values of a few dozen bytes; returns the data.
async fn fill(client: &Client<MemClient<KvProtocol>>, n: usize, rng: &mut ChaCha8Rng) -> Data {
    let mut data = Data::new();
    for i in 0..n {
        let value = Bytes::from(format!("v{i}-{}", "x".repeat(rng.random_range(0..40))));
        client.put(key(i), value.clone()).await.expect("put");
        data.insert(key(i), value);
    }
    data
}

/// Key + value bytes of `data`, as a pin counts them.
fn bytes_of(data: &Data) -> u64 {
    data.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
}

// Goal: a pin's pages, read while puts, deletes and new keys land in the
// range between every page, are exactly the data as of the pin; its size
// and split keys describe that same data. A second, narrower pin reads
// only its range, and a ScanPin outside the pin is refused.
#[tokio::test(start_paused = true)]
async fn a_pin_reads_one_point_while_writes_go_on() {
    for seed in common::seeds_or("a_pin_reads_one_point_while_writes_go_on", 3) {
        let c = Cluster::new(3, false, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        c.wait_for_leader(10 * ELECTION_TIMEOUT).await;
        let client = c.client();
        let writer = c.client();
        let data = fill(&client, 120, &mut rng).await;

        let split_bytes = 300;
        let pins = client
            .pin(Bytes::new(), Bytes::new(), split_bytes)
            .await
            .expect("pin");
        assert_eq!(
            pins.len(),
            1,
            "seed {seed}: an unsharded client pins one shard"
        );
        let pin = &pins[0];
        assert_eq!(pin.group, KV_GROUP);
        assert_eq!(pin.info.keys, data.len() as u64, "seed {seed}");
        assert_eq!(pin.info.bytes, bytes_of(&data), "seed {seed}");
        let split = &pin.info.split_keys;
        assert!(
            split.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: {split:?}"
        );
        assert!(split.iter().all(|k| data.contains_key(k)));
        let expected_splits = bytes_of(&data) / split_bytes;
        assert!(
            (split.len() as u64).abs_diff(expected_splits) <= 1,
            "seed {seed}: {} split keys for {} bytes every {split_bytes}",
            split.len(),
            bytes_of(&data)
        );

        // Between pages: overwrite, delete and add keys all over the range.
        let live = std::sync::Mutex::new(data.clone());
        let written = AtomicU64::new(0);
        let mut write_rng = ChaCha8Rng::seed_from_u64(seed ^ 1);
        let read = read_pin(
            &client,
            pin,
            (Bytes::new(), Bytes::new()),
            rng.random_range(3..=11),
            || {
                let i = write_rng.random_range(0..150usize);
                let op = write_rng.random_range(0..3);
                let (writer, written, live) = (&writer, &written, &live);
                async move {
                    let k = key(i);
                    if op == 0 {
                        writer.delete(k.clone()).await.expect("delete");
                        live.lock().unwrap().remove(&k);
                    } else {
                        let v = Bytes::from(format!("new-{i}"));
                        writer.put(k.clone(), v.clone()).await.expect("put");
                        live.lock().unwrap().insert(k, v);
                    }
                    // A key between two existing ones, too.
                    let mid = Bytes::from(format!("k{i:04}m"));
                    writer.put(mid.clone(), "mid").await.expect("put");
                    live.lock().unwrap().insert(mid, Bytes::from("mid"));
                    written.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .await;
        assert_eq!(
            read, data,
            "seed {seed}: the pin's pages are the data as of the pin"
        );
        let live = live.into_inner().unwrap();
        assert!(written.load(Ordering::Relaxed) > 5);
        // The live state moved on: a plain scan sees the writes.
        let now: Data = client
            .scan(Bytes::new(), Bytes::new(), 10_000)
            .await
            .expect("scan")
            .into_iter()
            .map(|(k, v)| (k, v.value))
            .collect();
        assert_eq!(now, live, "seed {seed}");
        assert_ne!(now, data);

        // A narrower pin, taken now, reads only its range, as of now.
        let (lo, hi) = (key(10), key(30));
        let narrow = client.pin(lo.clone(), hi.clone(), 0).await.expect("pin");
        assert!(narrow[0].info.split_keys.is_empty(), "split_bytes 0: none");
        let in_range: Data = live
            .range(lo.clone()..hi.clone())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(narrow[0].info.keys, in_range.len() as u64);
        writer.put(key(15), "after").await.expect("put");
        let read = read_pin(
            &client,
            &narrow[0],
            (lo.clone(), Bytes::new()),
            4,
            || async {},
        )
        .await;
        assert_eq!(read, in_range, "seed {seed}");
        for (start, end) in [(key(9), Bytes::new()), (lo.clone(), key(31))] {
            match client.scan_pinned(&narrow[0], start, end, 10).await {
                Err(ClientError::Refused(reason)) => {
                    assert!(reason.contains("pinned range"), "{reason}")
                }
                other => panic!("seed {seed}: a scan outside the pin: {other:?}"),
            }
        }
        for p in pins.iter().chain(&narrow) {
            client.unpin(p).await.expect("unpin");
        }
    }
}

// Goal: a pin lives on the node that served it, not with the leadership:
// once that leader is cut off and another takes over (and it has rejoined
// as a follower), it still serves the pin's pages as of the pin; after it
// restarts, the pin is gone.
#[tokio::test(start_paused = true)]
async fn a_pin_survives_a_leadership_change_not_a_restart() {
    for seed in common::seeds_or("a_pin_survives_a_leadership_change_not_a_restart", 3) {
        let mut c = Cluster::new(3, true, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        c.wait_for_leader(10 * ELECTION_TIMEOUT).await;
        let client = c.client();
        let data = fill(&client, 40, &mut rng).await;
        let pins = client
            .pin(Bytes::new(), Bytes::new(), 100)
            .await
            .expect("pin");
        let pin = &pins[0];
        let holder = pin.info.node as usize - 1;

        // Cut the holder off; the others elect a leader and take writes.
        let others: Vec<NodeId> = c
            .ids()
            .into_iter()
            .filter(|id| id.0 != pin.info.node)
            .collect();
        c.net.partition(&[&[c.id(holder)], &others]);
        let start = tokio::time::Instant::now();
        loop {
            let new_leader = (0..c.n)
                .find(|&i| i != holder && c.nodes[i].as_ref().is_some_and(|h| h.is_leader()));
            if new_leader.is_some() {
                break;
            }
            assert!(
                start.elapsed() < 10 * ELECTION_TIMEOUT,
                "seed {seed}: no new leader"
            );
            sleep(Duration::from_millis(10)).await;
        }
        for i in 0..10 {
            client.put(key(i), "after").await.expect("put");
        }
        c.net.heal();
        // The holder rejoins as a follower.
        let start = tokio::time::Instant::now();
        while c.nodes[holder].as_ref().unwrap().is_leader() {
            assert!(
                start.elapsed() < 10 * ELECTION_TIMEOUT,
                "seed {seed}: still leading"
            );
            sleep(Duration::from_millis(10)).await;
        }
        let read = read_pin(&client, pin, (Bytes::new(), Bytes::new()), 7, || async {}).await;
        assert_eq!(
            read, data,
            "seed {seed}: a follower serves the pin as of the pin"
        );

        c.crash_node(holder).await;
        c.start_node(holder);
        assert_eq!(
            client
                .scan_pinned(pin, Bytes::new(), Bytes::new(), 10)
                .await,
            Err(ClientError::PinGone),
            "seed {seed}: a restart loses the pin"
        );
        // Releasing a lost pin is not an error.
        client.unpin(pin).await.expect("unpin");
    }
}

// Goal: `unpin` releases a pin (then `PinGone`, and unpinning again is
// fine), and a pin no `ScanPin` used for `pin_idle_ms` expires, judged on
// the paused clock, while one used often enough stays.
#[tokio::test(start_paused = true)]
async fn unpin_and_idle_expiry_release_a_pin() {
    let seed = common::seed("unpin_and_idle_expiry_release_a_pin");
    let c = Cluster::new(3, true, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    c.wait_for_leader(10 * ELECTION_TIMEOUT).await;
    let client = c.client();
    let data = fill(&client, 10, &mut rng).await;
    let all = || (Bytes::new(), Bytes::new());

    let pins = client
        .pin(Bytes::new(), Bytes::new(), 0)
        .await
        .expect("pin");
    client.unpin(&pins[0]).await.expect("unpin");
    assert_eq!(
        client.scan_pinned(&pins[0], all().0, all().1, 10).await,
        Err(ClientError::PinGone)
    );
    client.unpin(&pins[0]).await.expect("unpin twice");

    let idle = Duration::from_millis(PIN_IDLE_MS_DEFAULT);
    let pins = client
        .pin(Bytes::new(), Bytes::new(), 0)
        .await
        .expect("pin");
    client.put(key(0), "after").await.expect("put");
    for _ in 0..3 {
        // Used every two thirds of the idle time: it stays.
        sleep(idle * 2 / 3).await;
        let page = client
            .scan_pinned(&pins[0], all().0, all().1, 100)
            .await
            .expect("a pin in use stays");
        assert_eq!(page.pairs.len(), data.len());
        assert_eq!(page.pairs[0].1.value, data[&key(0)]);
    }
    sleep(idle + Duration::from_secs(1)).await;
    assert_eq!(
        client.scan_pinned(&pins[0], all().0, all().1, 10).await,
        Err(ClientError::PinGone),
        "seed {seed}: an idle pin expires"
    );
}

// Goal: a node holds at most PINS_MAX pins and says so clearly beyond; a
// release makes room; shutdown with every pin held ends promptly.
#[tokio::test(start_paused = true)]
async fn pins_max_is_enforced_and_shutdown_releases_all() {
    let seed = common::seed("pins_max_is_enforced_and_shutdown_releases_all");
    let mut c = Cluster::new(3, true, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    c.wait_for_leader(10 * ELECTION_TIMEOUT).await;
    let client = c.client();
    fill(&client, 5, &mut rng).await;
    let mut pins = Vec::new();
    for _ in 0..PINS_MAX {
        pins.extend(
            client
                .pin(Bytes::new(), Bytes::new(), 0)
                .await
                .expect("pin"),
        );
    }
    let node = pins[0].info.node;
    assert!(
        pins.iter().all(|p| p.info.node == node),
        "seed {seed}: the leader changed while pinning; the limit is per node"
    );
    let mut ids: Vec<u64> = pins.iter().map(|p| p.info.pin).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), PINS_MAX, "pin ids are unique");
    match client.pin(Bytes::new(), Bytes::new(), 0).await {
        Err(ClientError::Refused(reason)) => assert!(reason.contains("PINS_MAX"), "{reason}"),
        other => panic!("seed {seed}: pin {} of a node: {other:?}", PINS_MAX + 1),
    }
    let released = pins.pop().unwrap();
    client.unpin(&released).await.expect("unpin");
    assert_eq!(
        client
            .scan_pinned(&released, Bytes::new(), Bytes::new(), 1)
            .await,
        Err(ClientError::PinGone)
    );
    pins.extend(
        client
            .pin(Bytes::new(), Bytes::new(), 0)
            .await
            .expect("room again"),
    );
    for p in &pins[..3] {
        let page = client
            .scan_pinned(p, Bytes::new(), Bytes::new(), 100)
            .await
            .expect("scan");
        assert_eq!(page.pairs.len(), 5);
    }
    tokio::time::timeout(Duration::from_secs(30), c.shutdown_all())
        .await
        .expect("shutdown with pins held ends");
}

// --- a sharded cluster: controller group 0 on nodes 1-3, replica groups
// 1 and 2 on nodes 11-13 and 21-23 (the shardkv tests' layout).

const NSHARDS: u32 = 12;

fn members(group: GroupId) -> Vec<u64> {
    (1..=3).map(|i| group * 10 + i).collect()
}

struct Sharded {
    net: MemNetwork<KvProtocol>,
    nodes: HashMap<u64, NodeHandle>,
    dir: std::path::PathBuf,
    seed: u64,
    /// Every node's [`NodeConfig::pins_max`].
    pins_max: usize,
    /// Group 2 is hosted through the admin RPC (so it may be dropped),
    /// not configured.
    hosted_group_2: bool,
    next_client: u64,
}

impl Drop for Sharded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Sharded {
    fn new(seed: u64, pins_max: usize) -> Sharded {
        Sharded::with_group_2_hosted(seed, pins_max, false)
    }

    /// Group 2 hosted through the admin RPC if `hosted_group_2` (call
    /// [`Sharded::host_group_2`] before use).
    fn with_group_2_hosted(seed: u64, pins_max: usize, hosted_group_2: bool) -> Sharded {
        // One directory per harness: tests with the same seed run side by
        // side in one process.
        static HARNESSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "shoal-pins-{}-{seed}-{pins_max}-{}",
            std::process::id(),
            HARNESSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut config = MemConfig::with_seed(seed);
        config.files_dir = dir.join("net");
        let mut s = Sharded {
            net: MemNetwork::new(config),
            nodes: HashMap::new(),
            dir,
            seed,
            pins_max,
            hosted_group_2,
            next_client: 1,
        };
        for group in [CONTROLLER_GROUP, 1, 2] {
            for id in members(group) {
                s.start_node(group, id);
            }
        }
        s
    }

    fn start_node(&mut self, group: GroupId, id: u64) {
        let engine = MemStore::new_in_memory(EngineConfig::default()).expect("engine");
        let (transport, inbox) = self.net.add_node(NodeId(id));
        let mut config = NodeConfig::new(id, members(group), self.dir.join(format!("node-{id}")));
        config.groups = if group == 2 && self.hosted_group_2 {
            Vec::new()
        } else {
            vec![GroupSpec {
                group,
                static_shards: if group == CONTROLLER_GROUP {
                    vec![CONTROLLER_SHARD]
                } else {
                    Vec::new()
                },
                voters: Vec::new(),
            }]
        };
        config.blocking_io = false;
        config.seed = self.seed ^ id;
        config.pins_max = self.pins_max;
        let handle = Node::start(config, engine, transport, inbox).expect("node starts");
        self.nodes.insert(id, handle);
    }

    fn client_config(&mut self) -> ClientConfig {
        self.next_client += 1;
        let mut c = ClientConfig::new((self.seed << 16) | self.next_client);
        c.op_deadline = Duration::from_secs(600);
        c
    }

    fn controller_ids() -> Vec<NodeId> {
        members(CONTROLLER_GROUP).into_iter().map(NodeId).collect()
    }

    fn controller(
        &mut self,
    ) -> Controller<GroupStore<MemClient<KvProtocol>>, RpcMover<MemClient<KvProtocol>>> {
        let mut config = self.client_config();
        let link = self.net.add_client(&format!("client-{}", config.client_id));
        config.group = CONTROLLER_GROUP;
        config.shard = CONTROLLER_SHARD;
        let store = GroupStore::new(Client::new(link, Self::controller_ids(), config));
        let mover = RpcMover::new(
            self.net.add_client(ADMIN_CLIENT_NAME),
            Duration::from_secs(1),
        );
        let timing = ControllerConfig {
            step_deadline: Duration::from_secs(60),
            ..Default::default()
        };
        Controller::new(store, mover, timing).expect("controller config")
    }

    fn client(&mut self) -> Client<MemClient<KvProtocol>> {
        let config = self.client_config();
        let link = self.net.add_client(&format!("client-{}", config.client_id));
        Client::sharded(link, Self::controller_ids(), config).expect("client config")
    }

    /// A client for the admin RPCs (hosting and dropping groups).
    fn admin(&mut self) -> Client<MemClient<KvProtocol>> {
        let config = self.client_config();
        Client::new(
            self.net.add_client(ADMIN_CLIENT_NAME),
            Self::controller_ids(),
            config,
        )
    }

    /// Hosts group 2 on its members through the admin RPC.
    async fn host_group_2(&mut self) {
        let admin = self.admin();
        for id in members(2) {
            admin
                .host_group(NodeId(id), 2, members(2))
                .await
                .expect("host group 2");
        }
    }

    /// Posts a first configuration of `shards` shards on group 1, then
    /// joins group 2 (half of them move); returns the configuration.
    async fn two_groups(&mut self, shards: u32) -> ShardConfig {
        let ctrl = self.controller();
        let first = join(
            &ShardConfig::initial(shards).expect("initial"),
            BTreeMap::from([(1, members(1))]),
        )
        .expect("join");
        assert_eq!(
            ctrl.init_config(first).await.expect("init"),
            InitOutcome::Posted
        );
        let current = ctrl.query().await.expect("query");
        let next = join(&current, BTreeMap::from([(2, members(2))])).expect("join");
        assert_eq!(
            ctrl.change_config_to(next.clone()).await.expect("change"),
            ChangeOutcome::Changed
        );
        next
    }

    async fn shutdown(mut self) {
        for (_, h) in self.nodes.drain() {
            h.shutdown().await.expect("clean shutdown");
        }
    }
}

/// Checks that `pins` are one group pin per group of `config`: one entry
/// per shard in shard order, each from the group serving it, the shards
/// of a group sharing its pin id and node; returns the distinct pins.
fn check_group_pins(config: &ShardConfig, pins: &[PinnedShard]) -> Vec<(u64, u64)> {
    assert_eq!(pins.len(), config.shard_count() as usize);
    let mut by_group: BTreeMap<GroupId, (u64, u64)> = BTreeMap::new();
    for (shard, p) in pins.iter().enumerate() {
        assert_eq!(p.shard, shard as u32);
        assert_eq!(Some(p.group), config.group_of(p.shard));
        assert!(members(p.group).contains(&p.info.node));
        let id = *by_group.entry(p.group).or_insert((p.info.node, p.info.pin));
        assert_eq!(id, (p.info.node, p.info.pin), "one pin per group");
    }
    let ids: std::collections::BTreeSet<(u64, u64)> = by_group.values().copied().collect();
    assert_eq!(ids.len(), by_group.len(), "groups do not share a pin");
    ids.into_iter().collect()
}

// Goal: on a sharded cluster (shards hash-partitioned over two groups,
// half of them moved from group 1 to group 2), `pin` gives one entry per
// shard in shard order, each from the group serving it, with ONE pin per
// group (two pin ids for 12 shards); the union of their pages is exactly
// the data as of the pins, whatever is written after. A page of a shard
// the pin does not cover is refused; unpinning each shard in turn
// releases the group pin once and is fine after.
#[tokio::test(start_paused = true)]
async fn a_sharded_pin_covers_every_shard() {
    for seed in common::seeds_or("a_sharded_pin_covers_every_shard", 2) {
        let mut s = Sharded::new(seed, PINS_MAX);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let next = s.two_groups(NSHARDS).await;
        let client = s.client();
        let data = fill(&client, 80, &mut rng).await;

        let pins = client
            .pin(Bytes::new(), Bytes::new(), 64)
            .await
            .expect("pin");
        assert_eq!(pins.len(), NSHARDS as usize, "seed {seed}");
        let group_pins = check_group_pins(&next, &pins);
        assert_eq!(group_pins.len(), 2, "seed {seed}: one pin per group");
        assert!(pins.iter().any(|p| p.group == 1) && pins.iter().any(|p| p.group == 2));
        assert_eq!(
            pins.iter().map(|p| p.info.keys).sum::<u64>(),
            data.len() as u64
        );
        assert_eq!(
            pins.iter().map(|p| p.info.bytes).sum::<u64>(),
            bytes_of(&data)
        );
        // The pins are a job's table entry: they travel as serde values.
        let stored = round_trip(&pins);
        assert_eq!(stored, pins);

        for i in 0..40 {
            client.put(key(i), "after").await.expect("put");
            client.delete(key(79 - i)).await.expect("delete");
        }
        let mut union = Data::new();
        for p in &pins {
            let part = read_pin(&client, p, (Bytes::new(), Bytes::new()), 5, || async {}).await;
            assert!(
                part.keys().all(|k| next.shard_of_key(k) == p.shard),
                "seed {seed}"
            );
            assert_eq!(part.len() as u64, p.info.keys);
            union.extend(part);
        }
        assert_eq!(
            union, data,
            "seed {seed}: the pins' union is the data as of the pins"
        );

        // A shard of the other group, under group 1's pin: not covered.
        let g1 = pins.iter().find(|p| p.group == 1).unwrap();
        let g2 = pins.iter().find(|p| p.group == 2).unwrap();
        let stray = PinnedShard {
            shard: g2.shard,
            ..g1.clone()
        };
        match client
            .scan_pinned(&stray, Bytes::new(), Bytes::new(), 5)
            .await
        {
            Err(ClientError::Refused(reason)) => {
                assert!(reason.contains("does not cover"), "{reason}")
            }
            other => panic!("seed {seed}: a shard the pin does not cover: {other:?}"),
        }

        // Unpinning the first shard releases its whole group pin.
        client.unpin(g1).await.expect("unpin");
        for p in pins.iter().filter(|p| p.group == 1) {
            assert_eq!(
                client.scan_pinned(p, Bytes::new(), Bytes::new(), 5).await,
                Err(ClientError::PinGone),
                "seed {seed}: shard {} of the released pin",
                p.shard
            );
        }
        assert!(client
            .scan_pinned(g2, Bytes::new(), Bytes::new(), 5)
            .await
            .is_ok());
        for p in &pins {
            client.unpin(p).await.expect("unpin each shard in turn");
        }
        assert_eq!(
            client.scan_pinned(g2, Bytes::new(), Bytes::new(), 5).await,
            Err(ClientError::PinGone)
        );
        s.shutdown().await;
    }
}

// Goal: the pin limit counts group pins, not shards: with 128 shards over
// two groups and nodes that hold at most 2 pins each, `pin` takes the
// whole range (two pins, 64 shards each) twice, and is refused the third
// time; a release makes room again.
#[tokio::test(start_paused = true)]
async fn more_shards_than_pins_max_are_pinned_whole() {
    let seed = common::seed("more_shards_than_pins_max_are_pinned_whole");
    let pins_max = 2;
    let shards = 128;
    let mut s = Sharded::new(seed, pins_max);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let config = s.two_groups(shards).await;
    assert!(shards as usize > pins_max && shards as usize > PINS_MAX);
    let client = s.client();
    let data = fill(&client, 300, &mut rng).await;

    let first = client
        .pin(Bytes::new(), Bytes::new(), 100)
        .await
        .expect("pin");
    assert_eq!(check_group_pins(&config, &first).len(), 2, "seed {seed}");
    assert_eq!(
        first.iter().map(|p| p.info.keys).sum::<u64>(),
        data.len() as u64
    );
    let second = client
        .pin(key(100), key(200), 0)
        .await
        .expect("a second pin fits");
    check_group_pins(&config, &second);
    for i in 0..300 {
        client.delete(key(i)).await.expect("delete");
    }
    let mut union = Data::new();
    for p in &second {
        union.extend(read_pin(&client, p, (key(100), Bytes::new()), 7, || async {}).await);
    }
    let expected: Data = data
        .range(key(100)..key(200))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(union, expected, "seed {seed}");

    // Each group leader holds two pins now.
    match client.pin(Bytes::new(), Bytes::new(), 0).await {
        Err(ClientError::Refused(reason)) => assert!(reason.contains("PINS_MAX"), "{reason}"),
        other => panic!("seed {seed}: a third pin: {other:?}"),
    }
    for p in &first {
        client.unpin(p).await.expect("unpin");
    }
    let third = client
        .pin(Bytes::new(), Bytes::new(), 0)
        .await
        .expect("room again");
    assert_eq!(
        third.iter().map(|p| p.info.keys).sum::<u64>(),
        0,
        "seed {seed}: every key deleted"
    );
    s.shutdown().await;
}

// Goal: a pin is released when its group is dropped from the node
// holding it: once group 2's shards moved back to group 1 and the holder
// dropped group 2, its pin is gone, while group 1's pin still serves.
#[tokio::test(start_paused = true)]
async fn a_pin_is_released_when_its_group_is_dropped() {
    let seed = common::seed("a_pin_is_released_when_its_group_is_dropped");
    let mut s = Sharded::with_group_2_hosted(seed, PINS_MAX, true);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    s.host_group_2().await;
    let config = s.two_groups(NSHARDS).await;
    let client = s.client();
    let data = fill(&client, 40, &mut rng).await;
    let pins = client
        .pin(Bytes::new(), Bytes::new(), 0)
        .await
        .expect("pin");
    check_group_pins(&config, &pins);
    let g2 = pins.iter().find(|p| p.group == 2).unwrap().clone();

    // Group 2 leaves: its shards move back to group 1.
    let ctrl = s.controller();
    let without = leave(&config, &[2]).expect("leave");
    assert_eq!(
        ctrl.change_config_to(without).await.expect("change"),
        ChangeOutcome::Changed
    );
    // The pin outlives the move (it is a view of before it).
    assert!(client
        .scan_pinned(&g2, Bytes::new(), Bytes::new(), 100)
        .await
        .is_ok());
    let admin = s.admin();
    let start = tokio::time::Instant::now();
    loop {
        match admin.drop_group(NodeId(g2.info.node), 2).await {
            Ok(()) => break,
            // Still applying the move's last step.
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(60),
                "seed {seed}: dropping group 2: {e}"
            ),
        }
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        client
            .scan_pinned(&g2, Bytes::new(), Bytes::new(), 10)
            .await,
        Err(ClientError::PinGone),
        "seed {seed}: a dropped group's pin is gone"
    );
    let mut union = Data::new();
    for p in pins.iter().filter(|p| p.group == 1) {
        union.extend(read_pin(&client, p, (Bytes::new(), Bytes::new()), 50, || async {}).await);
    }
    assert!(union.iter().all(|(k, v)| data.get(k) == Some(v)));
    client
        .unpin(&g2)
        .await
        .expect("unpin a dropped group's pin");
    s.shutdown().await;
}

/// A round trip through a serde format (postcard, as the wire uses).
fn round_trip(pins: &[PinnedShard]) -> Vec<PinnedShard> {
    let bytes = postcard::to_allocvec(pins).expect("encodes");
    postcard::from_bytes(&bytes).expect("decodes")
}

// Goal: on RocksDB, with holders on tokio's blocking pool (real time), a
// pin is a RocksDB snapshot: its pages ignore later overwrites and
// deletes; the blocking client's pin calls work; shutdown with a pin held
// ends (the holder is released and awaited).
#[test]
fn a_pin_on_rocksdb_is_a_snapshot() {
    let root = std::env::temp_dir().join(format!("shoal-pins-rocks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let net = runtime.block_on(async {
        let mut config = MemConfig::with_seed(1);
        config.files_dir = root.join("net");
        MemNetwork::<KvProtocol>::new(config)
    });
    let nodes: Vec<NodeHandle> = runtime.block_on(async {
        (1..=3u64)
            .map(|i| {
                let dir = root.join(format!("db-{i}"));
                let engine = shoal_engine::RocksEngine::open(&dir, EngineConfig::default())
                    .expect("open rocksdb");
                let (transport, inbox) = net.add_node(NodeId(i));
                let config = NodeConfig::new(i, vec![1, 2, 3], dir.join("snapshots"));
                assert!(config.blocking_io);
                Node::start(config, engine, transport, inbox).expect("node starts")
            })
            .collect()
    });
    let servers = vec![NodeId(1), NodeId(2), NodeId(3)];
    let mut config = ClientConfig::new(42);
    config.op_deadline = Duration::from_secs(20);
    let client = shoal_shard::BlockingClient::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime"),
        runtime.block_on(async { Client::new(net.add_client("pins"), servers, config) }),
    );
    let mut data = Data::new();
    for i in 0..50 {
        let value = Bytes::from(format!("v{i}"));
        client.put(key(i), value.clone()).expect("put");
        data.insert(key(i), value);
    }
    let pins = client.pin(Bytes::new(), Bytes::new(), 100).expect("pin");
    assert_eq!(pins[0].info.keys, 50);
    for i in 0..25 {
        client.put(key(i), "after").expect("put");
        client.delete(key(49 - i)).expect("delete");
    }
    let mut read = Data::new();
    let mut from = Bytes::new();
    loop {
        let page = client
            .scan_pinned(&pins[0], from, Bytes::new(), 8)
            .expect("scan_pinned");
        read.extend(page.pairs.into_iter().map(|(k, v)| (k, v.value)));
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(read, data, "the pin is the data as of the pin");
    // A second pin, held through shutdown.
    let held = client.pin(Bytes::new(), Bytes::new(), 0).expect("pin");
    assert_eq!(held[0].info.keys, 25);
    client.unpin(&pins[0]).expect("unpin");
    assert_eq!(
        client.scan_pinned(&pins[0], Bytes::new(), Bytes::new(), 8),
        Err(ClientError::PinGone)
    );
    runtime.block_on(async {
        for node in nodes {
            tokio::time::timeout(Duration::from_secs(20), node.shutdown())
                .await
                .expect("shutdown with a pin held ends")
                .expect("clean shutdown");
        }
    });
    drop(client);
    let _ = std::fs::remove_dir_all(&root);
}
