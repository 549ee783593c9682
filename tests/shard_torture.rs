//! Goal: shard moves between replica groups of real processes never lose an
//! acknowledged write, never apply one twice and keep the history
//! linearizable while the processes carrying them out are SIGKILLed in the
//! middle: the source group's leader, the destination group's leader, the
//! controller group's leader and the `shoal shard` command itself. A change
//! whose command died is finished by the next command, whatever it is
//! (every command first runs the controller's recovery).
//!
//! Layout: six `shoal node --controller 1,2,3` processes. The controller
//! group runs on nodes 1-3; replica groups 1 (nodes 1,2,3), 2 (4,5,6) and 3
//! (1,4,5) serve [`SHARDS`] shards, created with `shoal shard init` and
//! `join`. Concurrent clients route by key (the crash tests' workload) and
//! record a history.
//!
//! Schedule: one `shoal shard` command per round — a move of a shard that
//! holds workload keys to another group, a rebalance, or a group's `leave`
//! followed next round by a `join` of its nodes as a new group (a node never
//! hosts a dropped group id again). Once the command's change is claimed
//! (the controller's NEXT config is ahead of the round's start), the
//! round's kills fire at seeded delays; killed nodes are restarted after a
//! seeded pause. Every round has at least one node kill and the run at
//! least [`NODE_KILLS_MIN`]. Between rounds the clients must make progress
//! (unless a killed command left a change pending, which may keep a shard
//! frozen until the next command finishes it).
//! After every command the controller must hold exactly the config the
//! driver expects (computed with the same pure functions), and nothing
//! pending. At the end, every acknowledged append is in its key's value
//! exactly once, an unknown one at most once, and the history is
//! linearizable.
//!
//! The seed (printed first; `SHOAL_SEED=<n>` replays it) decides every
//! change, every victim's kind and every delay; which node leads a group
//! at that moment, and so which process dies, still varies.
//! `SHOAL_MOVE_ROUNDS=<n>` sets the number of rounds for a longer soak.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::workload::{with_seed, Workload, WorkloadConfig};
use common::Cluster;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use shoal::cluster::{fresh_client_id, BlockingClient, ClientError, ClientOptions};
use shoal_consensus::Role;
use shoal_engine::{GroupId, ShardId};
use shoal_net::quic::QuicClient;
use shoal_net::{Limits, NodeId, Peer};
use shoal_shard::controller::{
    decode_config, join, leave, move_shard, moves, rebalance, shard_of, ShardConfig,
    CURRENT_CONFIG_KEY, NEXT_CONFIG_KEY,
};
use shoal_shard::node::{CONTROLLER_GROUP, CONTROLLER_SHARD};
use shoal_shard::protocol::KvProtocol;
use shoal_shard::ClientConfig;

/// The controller group's nodes, as `--controller` takes them.
const CONTROLLER: &str = "1,2,3";
const CONTROLLER_NODES: [u64; 3] = [1, 2, 3];
const NODES: u64 = 6;
/// Few shards, so that most of them hold workload keys.
const SHARDS: u32 = 6;
/// The replica groups `init` and `join` create.
const INITIAL_GROUPS: [(GroupId, [u64; 3]); 3] = [(1, [1, 2, 3]), (2, [4, 5, 6]), (3, [1, 4, 5])];
/// Rounds per run (`SHOAL_MOVE_ROUNDS` overrides).
const ROUNDS_DEFAULT: usize = 32;
/// Node kills per run at least (every round has one or two).
const NODE_KILLS_MIN: usize = 20;
/// Rounds per put key (at least 3 keys; see the workload's `put_keys`).
const ROUNDS_PER_PUT_KEY: usize = 10;
/// Leave + join pairs per run (each two rounds).
const LEAVES_PER_RUN: usize = 2;
/// Acknowledged client operations required between rounds.
const OPS_BETWEEN_ROUNDS: u64 = 10;
/// Latest kill after the claim: moves on loopback take a few hundred ms.
const KILL_DELAY_MS_MAX: u64 = 400;
/// How long killed nodes stay down.
const DOWN_MS_MIN: u64 = 200;
const DOWN_MS_MAX: u64 = 1500;
/// Chance (percent) that a round also kills the `shoal shard` command.
const COMMAND_KILL_PERCENT: u32 = 30;
/// Chance (percent) that a round kills a second node.
const SECOND_KILL_PERCENT: u32 = 30;
const WAIT: Duration = Duration::from_secs(30);
/// One command may take this long: a step's deadline is 60 s, and a leave
/// waits up to 30 s for the group's replicas before dropping them.
const COMMAND_WAIT: Duration = Duration::from_secs(150);
const POLL: Duration = Duration::from_millis(5);

/// Whom a kill is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// The leader of the group a shard moves from.
    SourceLeader,
    /// The leader of the group a shard moves to.
    DestinationLeader,
    /// The leader of the controller group.
    ControllerLeader,
    /// The `shoal shard` process (the controller side of the move).
    Command,
}

/// What a round asks of `shoal shard`; resolved against the config when
/// the round starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Move,
    Rebalance,
    Leave,
    /// The nodes of the group that left last round join as a new group.
    Rejoin,
}

#[derive(Debug, Clone)]
struct Round {
    kind: Kind,
    /// Kills in firing order, each with its delay after the claim.
    kills: Vec<(Victim, Duration)>,
    /// How long the killed nodes stay down after the last kill.
    down: Duration,
}

fn rounds() -> usize {
    std::env::var("SHOAL_MOVE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS_DEFAULT)
}

/// The run's rounds: `count` of them (at least room for the leaves), the
/// node victims' kinds spread evenly and shuffled, extra kills drawn.
fn schedule(rng: &mut ChaCha8Rng, count: usize) -> Vec<Round> {
    let count = count.max(2 * LEAVES_PER_RUN + 1);
    // Units of one round, or two for a leave and its rejoin (adjacent).
    let mut units: Vec<Vec<Kind>> = (0..count - 2 * LEAVES_PER_RUN)
        .map(|_| {
            vec![if rng.random_range(0..100) < 70 {
                Kind::Move
            } else {
                Kind::Rebalance
            }]
        })
        .collect();
    for _ in 0..LEAVES_PER_RUN {
        let at = rng.random_range(0..=units.len());
        units.insert(at, vec![Kind::Leave, Kind::Rejoin]);
    }
    let kinds: Vec<Kind> = units.into_iter().flatten().collect();
    let node_victims = [
        Victim::SourceLeader,
        Victim::DestinationLeader,
        Victim::ControllerLeader,
    ];
    let mut firsts: Vec<Victim> = (0..count).map(|i| node_victims[i % 3]).collect();
    firsts.shuffle(rng);
    let delay =
        |rng: &mut ChaCha8Rng| Duration::from_millis(rng.random_range(0..=KILL_DELAY_MS_MAX));
    let mut rounds: Vec<Round> = kinds
        .into_iter()
        .zip(firsts)
        .map(|(kind, first)| {
            let mut kills = vec![(first, delay(rng))];
            if rng.random_range(0..100) < SECOND_KILL_PERCENT {
                kills.push((*node_victims.choose(rng).expect("victims"), delay(rng)));
            }
            if rng.random_range(0..100) < COMMAND_KILL_PERCENT {
                kills.push((Victim::Command, delay(rng)));
            }
            Round {
                kind,
                kills,
                down: Duration::from_millis(rng.random_range(DOWN_MS_MIN..=DOWN_MS_MAX)),
            }
        })
        .collect();
    let node_kills = |rounds: &[Round]| {
        rounds
            .iter()
            .flat_map(|r| &r.kills)
            .filter(|(v, _)| *v != Victim::Command)
            .count()
    };
    // At most two node kills per round: two nodes down at once may be two
    // of one group, which then has no leader to kill until they are back.
    let single = |rounds: &[Round]| -> Vec<usize> {
        (0..rounds.len())
            .filter(|&i| {
                rounds[i]
                    .kills
                    .iter()
                    .filter(|(v, _)| *v != Victim::Command)
                    .count()
                    < 2
            })
            .collect()
    };
    while node_kills(&rounds) < NODE_KILLS_MIN && !single(&rounds).is_empty() {
        let round = *single(&rounds).choose(rng).expect("a round");
        let victim = *node_victims.choose(rng).expect("victims");
        let at = delay(rng);
        rounds[round].kills.push((victim, at));
    }
    for round in &mut rounds {
        round.kills.sort_by_key(|&(_, at)| at);
    }
    rounds
}

/// A resolved change, as `shoal shard` arguments and as the config it
/// should produce.
#[derive(Debug, Clone)]
enum Change {
    Move { shard: ShardId, to: GroupId },
    Rebalance,
    Leave { group: GroupId },
    Join { group: GroupId, nodes: Vec<u64> },
}

impl Change {
    fn args(&self) -> Vec<String> {
        let list = |nodes: &[u64]| {
            nodes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Change::Move { shard, to } => vec![
                "move".into(),
                "--shard".into(),
                shard.to_string(),
                "--to".into(),
                to.to_string(),
            ],
            Change::Rebalance => vec!["rebalance".into()],
            Change::Leave { group } => vec!["leave".into(), "--group".into(), group.to_string()],
            Change::Join { group, nodes } => vec![
                "join".into(),
                "--group".into(),
                format!("{group}={}", list(nodes)),
            ],
        }
    }

    /// The config the command posts on top of `config` (the admin's rules:
    /// a rebalance of an even config posts nothing).
    fn apply(&self, config: &ShardConfig) -> ShardConfig {
        match self {
            Change::Move { shard, to } => move_shard(config, *shard, *to).expect("move"),
            Change::Rebalance => {
                let next = rebalance(config).expect("rebalance");
                if next.shards == config.shards {
                    config.clone()
                } else {
                    next
                }
            }
            Change::Leave { group } => leave(config, &[*group]).expect("leave"),
            Change::Join { group, nodes } => {
                join(config, BTreeMap::from([(*group, nodes.clone())])).expect("join")
            }
        }
    }
}

/// Runs `shoal shard ARGS` to completion; returns its JSON lines.
fn shard(cluster: &Cluster, args: &[&str]) -> Vec<Value> {
    cluster.shard(CONTROLLER, SHARD_TIMEOUT_MS, args)
}

fn shard_command(cluster: &Cluster, args: &[&str]) -> Command {
    cluster.shard_command(CONTROLLER, SHARD_TIMEOUT_MS, args)
}

/// How long each `shoal shard` step is retried.
const SHARD_TIMEOUT_MS: u64 = 20_000;

/// Reads the controller group's two configs directly (linearizable reads
/// of the controller's store), to see whether a change is pending.
struct Probe {
    client: shoal_shard::BlockingClient<QuicClient<KvProtocol>>,
    quic: QuicClient<KvProtocol>,
}

impl Probe {
    fn connect(cluster: &Cluster) -> Probe {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let identity =
            shoal::certs::load(&cluster.tls, &Peer::Client("client".into())).expect("certificate");
        let addresses = cluster
            .members
            .iter()
            .map(|&(id, a)| (NodeId(id), a))
            .collect();
        let mut config = ClientConfig::new(fresh_client_id());
        config.group = CONTROLLER_GROUP;
        config.shard = CONTROLLER_SHARD;
        config.op_deadline = Duration::from_secs(5);
        config.rpc_deadline = Duration::from_millis(300);
        let (client, quic) = runtime.block_on(async {
            let quic = QuicClient::new(&identity, addresses, Limits::default()).expect("quic");
            let client = shoal_shard::Client::try_new(
                quic.clone(),
                CONTROLLER_NODES.iter().copied().map(NodeId).collect(),
                config,
            )
            .expect("client");
            (client, quic)
        });
        Probe {
            client: shoal_shard::BlockingClient::new(runtime, client),
            quic,
        }
    }

    fn read(&self, key: &'static [u8]) -> ShardConfig {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.client.get(Bytes::from_static(key)) {
                Ok(v) => return decode_config(&v.value).expect("a stored config decodes"),
                Err(e) if Instant::now() >= deadline => {
                    panic!("reading {:?}: {e}", String::from_utf8_lossy(key))
                }
                Err(_) => {}
            }
        }
    }

    /// NEXT, then CURRENT (in that order: see the controller's protocol).
    fn configs(&self) -> (ShardConfig, ShardConfig) {
        let next = self.read(NEXT_CONFIG_KEY);
        let current = self.read(CURRENT_CONFIG_KEY);
        (next, current)
    }

    fn next(&self) -> ShardConfig {
        self.read(NEXT_CONFIG_KEY)
    }

    fn close(self) {
        self.client.block_on(self.quic.close());
    }
}

/// The running node that leads `group` (among `members`) in the highest
/// term any of them reports; waits for one. None once no member hosts the
/// group any more (it left and was dropped), or once too few running
/// members host it to elect a leader (a leave dropped it on some replicas
/// while another is down: its drop waits for that member's restart, which
/// comes after this round's kills).
fn leader_of(
    cluster: &Cluster,
    admin: &BlockingClient,
    group: GroupId,
    members: &[u64],
) -> Option<u64> {
    shoal::local_cluster::wait_for(&format!("a leader of group {group}"), WAIT, || {
        let mut best: Option<(u64, u64)> = None;
        let mut hosted = 0;
        let mut unanswered = false;
        for &node in members.iter().filter(|&&n| cluster.is_running(n)) {
            let Ok(report) = admin.node_status(NodeId(node)) else {
                unanswered = true;
                continue;
            };
            let Some(g) = report.groups.iter().find(|g| g.group == group) else {
                continue;
            };
            hosted += 1;
            if g.role == Role::Leader && best.is_none_or(|(term, _)| g.term > term) {
                best = Some((g.term, node));
            }
        }
        match best {
            Some((_, node)) => Some(Some(node)),
            None if hosted * 2 <= members.len() && !unanswered => Some(None),
            None => None,
        }
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Prints every running node's view of its groups.
fn dump(cluster: &Cluster, admin: &BlockingClient) {
    for node in cluster.running() {
        match admin.node_status(NodeId(node)) {
            Ok(report) => {
                for g in report.groups {
                    eprintln!(
                        "node {node} group {}: {:?} term {} leader {} commit {} applied {}",
                        g.group, g.role, g.term, g.leader, g.commit, g.applied
                    );
                }
            }
            Err(e) => eprintln!("node {node}: no status: {e}"),
        }
    }
}

/// What a run did, for the final report.
#[derive(Debug, Default)]
struct Tally {
    node_kills: usize,
    /// Node kills while the command was still running (mid-change).
    node_kills_mid_change: usize,
    source_kills: usize,
    destination_kills: usize,
    controller_kills: usize,
    /// `shoal shard` processes killed while running.
    command_kills: usize,
    /// Of those, how many left a change pending that the next command
    /// finished.
    pending_finished: usize,
    changes: usize,
}

/// The round's command as it runs.
struct Running {
    child: Child,
    stderr: std::path::PathBuf,
    killed: bool,
}

impl Running {
    fn spawn(cluster: &Cluster, dir: &Path, round: usize, args: &[String]) -> Running {
        let stdout = dir.join(format!("shard-{round}.out"));
        let stderr = dir.join(format!("shard-{round}.err"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = shard_command(cluster, &args)
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn shoal shard");
        Running {
            child,
            stderr,
            killed: false,
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILLs the command if it still runs; whether it did.
    fn kill(&mut self) -> bool {
        if self.exited().is_some() {
            return false;
        }
        self.child.kill().expect("kill shoal shard");
        self.child.wait().expect("reap shoal shard");
        self.killed = true;
        true
    }

    fn wait(&mut self, what: &str) -> ExitStatus {
        let deadline = Instant::now() + COMMAND_WAIT;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{what} still running after {COMMAND_WAIT:?}; its stderr:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn shard_moves_survive_sigkills_of_leaders_and_the_controller() {
    with_seed(
        "shard_moves_survive_sigkills_of_leaders_and_the_controller",
        torture,
    );
}

fn torture(seed: u64) {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rounds = schedule(&mut rng, rounds());
    for (i, round) in rounds.iter().enumerate() {
        eprintln!(
            "plan {i}: {:?}, kills {:?}, down {:?}",
            round.kind, round.kills, round.down
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start_args(dir.path(), NODES, &["--controller", CONTROLLER]);
    let spec = |(group, nodes): (GroupId, [u64; 3])| {
        format!("{group}={}", nodes.map(|n| n.to_string()).join(","))
    };
    shard(
        &cluster,
        &[
            "init",
            "--shards",
            &SHARDS.to_string(),
            "--group",
            &spec(INITIAL_GROUPS[0]),
        ],
    );
    for group in &INITIAL_GROUPS[1..] {
        shard(&cluster, &["join", "--group", &spec(*group)]);
    }
    let probe = Probe::connect(&cluster);
    let admin = cluster.admin();
    // Every put of unknown outcome widens the checker's search on its key:
    // longer runs spread their puts over more keys.
    let config = WorkloadConfig {
        put_keys: (rounds.len() / ROUNDS_PER_PUT_KEY).max(3) as u64,
        op_deadline: Duration::from_secs(3),
        rpc_deadline: Duration::from_millis(300),
        controller: Some(CONTROLLER_NODES.to_vec()),
        ..WorkloadConfig::default()
    };
    // The shards the clients write to: moves pick among them.
    let mut hot: Vec<ShardId> = config
        .keys()
        .iter()
        .map(|k| shard_of(k.as_bytes(), SHARDS))
        .collect();
    hot.sort_unstable();
    hot.dedup();
    eprintln!("workload keys on shards {hot:?}");
    let workload = Workload::start(&cluster, config, seed);
    let mut tally = Tally::default();
    let mut next_group: GroupId = INITIAL_GROUPS.iter().map(|g| g.0).max().unwrap_or(0) + 1;
    let mut left_nodes: Vec<u64> = Vec::new();
    // A change a killed command left pending: the next command must
    // finish it.
    let mut pending: Option<u64> = None;

    for (i, round) in rounds.iter().enumerate() {
        // A pending change may hold a shard frozen until a command
        // finishes it: then this round's command is what makes progress
        // possible.
        if pending.is_none() {
            workload.wait_progress("progress before a round", OPS_BETWEEN_ROUNDS, WAIT);
        }
        let t = Instant::now();
        // The config the command starts from once its recovery has
        // finished whatever is pending.
        let base = probe.next();
        let change = match round.kind {
            Kind::Rebalance if rebalance(&base).expect("rebalance").shards != base.shards => {
                Change::Rebalance
            }
            Kind::Move | Kind::Rebalance => {
                let shard = if rng.random_range(0..100) < 80 {
                    *hot.choose(&mut rng).expect("a hot shard")
                } else {
                    rng.random_range(0..SHARDS)
                };
                let from = base.group_of(shard).expect("every shard has a group");
                let others: Vec<GroupId> =
                    base.groups.keys().copied().filter(|&g| g != from).collect();
                Change::Move {
                    shard,
                    to: *others.choose(&mut rng).expect("another group"),
                }
            }
            Kind::Leave => {
                let groups: Vec<GroupId> = base.groups.keys().copied().collect();
                let group = *groups.choose(&mut rng).expect("a group");
                left_nodes = base.members(group).expect("members").to_vec();
                Change::Leave { group }
            }
            Kind::Rejoin => {
                let group = next_group;
                next_group += 1;
                Change::Join {
                    group,
                    nodes: std::mem::take(&mut left_nodes),
                }
            }
        };
        let expected = change.apply(&base);
        // The kills' groups: the first shard that changes hands (a leave of
        // a group with no shards moves none: then the leaving group and
        // another one).
        let (source, destination) = match moves(&base, &expected).first() {
            Some(m) => (m.from_group, m.to_group),
            None => {
                let a = *base.groups.keys().next().expect("a group");
                let b = *expected.groups.keys().find(|&&g| g != a).unwrap_or(&a);
                match &change {
                    Change::Leave { group } => (*group, b),
                    _ => (a, b),
                }
            }
        };
        let members_of = |group: GroupId| -> Vec<u64> {
            expected
                .members(group)
                .or_else(|| base.members(group))
                .expect("the group's members")
                .to_vec()
        };
        eprintln!(
            "round {i}: {change:?} (config {} -> {}: shards on {:?}, group {source} -> {destination}), {:?} since start",
            base.num,
            expected.num,
            expected.shards,
            started.elapsed()
        );
        let mut command = Running::spawn(&cluster, dir.path(), i, &change.args());
        // The claim: NEXT moves past the round's base (or the command ends
        // first: a change too quick to catch).
        let claim_wait = Instant::now() + COMMAND_WAIT;
        let claimed = loop {
            if probe.next().num > base.num || command.exited().is_some() {
                break Instant::now();
            }
            assert!(
                Instant::now() < claim_wait,
                "round {i}: the change was never claimed"
            );
            std::thread::sleep(POLL);
        };
        let mut killed: Vec<u64> = Vec::new();
        for &(victim, delay) in &round.kills {
            std::thread::sleep((claimed + delay).saturating_duration_since(Instant::now()));
            let group = match victim {
                Victim::Command => {
                    if command.kill() {
                        tally.command_kills += 1;
                        eprintln!("round {i}: SIGKILL shoal shard after {delay:?}");
                    } else {
                        eprintln!("round {i}: shoal shard had finished before its kill");
                    }
                    continue;
                }
                Victim::SourceLeader => source,
                Victim::DestinationLeader => destination,
                Victim::ControllerLeader => CONTROLLER_GROUP,
            };
            let members = if group == CONTROLLER_GROUP {
                CONTROLLER_NODES.to_vec()
            } else {
                members_of(group)
            };
            // A group that left and was dropped has no leader: its first
            // running member dies instead.
            let (node, role) = match leader_of(&cluster, &admin, group, &members) {
                Some(node) => (node, "leads"),
                None => (
                    *members
                        .iter()
                        .find(|&&n| cluster.is_running(n))
                        .expect("a running member"),
                    "was a member of dropped",
                ),
            };
            let mid_change = command.exited().is_none();
            eprintln!(
                "round {i}: {victim:?}: SIGKILL node {node} ({role} group {group}) after {:?}{}",
                claimed.elapsed(),
                if mid_change { ", mid-change" } else { "" }
            );
            cluster.kill(node);
            killed.push(node);
            tally.node_kills += 1;
            tally.node_kills_mid_change += usize::from(mid_change);
            match victim {
                Victim::SourceLeader => tally.source_kills += 1,
                Victim::DestinationLeader => tally.destination_kills += 1,
                _ => tally.controller_kills += 1,
            }
        }
        std::thread::sleep(round.down);
        cluster.start_nodes(&killed);
        let status = command.wait(&format!("round {i}: shoal shard {change:?}"));
        let (next, current) = probe.configs();
        // Whatever the command's fate, it ran the recovery before its own
        // claim (and it is killed only once it claimed or ended).
        if let Some(num) = pending.take() {
            assert!(
                current.num >= num,
                "round {i}: config {num}, left pending by a killed command, was not finished"
            );
            tally.pending_finished += 1;
        }
        if command.killed {
            if next.num > current.num {
                eprintln!(
                    "round {i}: config {} left pending by the killed command",
                    next.num
                );
                pending = Some(next.num);
            }
        } else {
            assert!(
                status.success(),
                "round {i}: shoal shard {change:?} failed ({status:?}); its stderr:\n{}",
                std::fs::read_to_string(&command.stderr).unwrap_or_default()
            );
            assert_eq!(
                next.num, current.num,
                "round {i}: a change is pending after the command returned"
            );
            assert_eq!(
                (current.num, &current.shards, &current.groups),
                (expected.num, &expected.shards, &expected.groups),
                "round {i}: the controller holds another config than {change:?} should post"
            );
        }
        let exited = cluster.exited();
        assert!(
            exited.is_empty(),
            "round {i}: nodes exited on their own: {exited:?}"
        );
        tally.changes += 1;
        eprintln!("round {i}: done in {:?}", t.elapsed());
    }

    // A last command finishes whatever the last round left pending.
    let last = shard(&cluster, &["rebalance"]);
    eprintln!("final config {}", last[0]);
    let (next, current) = probe.configs();
    assert_eq!(next.num, current.num, "a change is pending at the end");
    if let Some(num) = pending.take() {
        assert!(
            current.num >= num,
            "config {num}, left pending, was not finished"
        );
        tally.pending_finished += 1;
    }
    for shard in 0..SHARDS {
        let group = current.group_of(shard).expect("every shard has a group");
        assert!(
            current.members(group).is_some(),
            "shard {shard} on unknown group {group}"
        );
    }
    assert_eq!(
        cluster.running().len(),
        NODES as usize,
        "every node is back"
    );
    // Every workload key readable, with the nodes' view if one is not.
    let reader = BlockingClient::connect_with(
        &cluster.members,
        &cluster.tls,
        ClientOptions {
            op_deadline: WAIT,
            controller: Some(CONTROLLER_NODES.to_vec()),
            ..ClientOptions::default()
        },
    )
    .expect("client");
    for key in workload.config().keys() {
        match reader.get(key.clone()) {
            Ok(_) | Err(ClientError::NotFound) => {}
            Err(e) => {
                dump(&cluster, &admin);
                panic!(
                    "{key} (shard {}, group {:?}) unreadable: {e}",
                    shard_of(key.as_bytes(), SHARDS),
                    current.group_of(shard_of(key.as_bytes(), SHARDS))
                );
            }
        }
    }
    reader.close();
    workload.wait_progress("progress after the last round", OPS_BETWEEN_ROUNDS, WAIT);
    admin.close();
    probe.close();
    let summary = workload.finish(&cluster, WAIT);
    eprintln!(
        "{} rounds, {tally:?}, {summary:?}, {:?}",
        rounds.len(),
        started.elapsed()
    );
    assert!(tally.node_kills >= NODE_KILLS_MIN, "{tally:?}");
}
