//! `shoal bench-move`: a live shard move end to end on real `shoal node`
//! processes on loopback, measured for issue 11's yardsticks — how fast a
//! shard moves, how long writes to it are held up, and what the move costs
//! the writes to every other shard.
//!
//! # Layout
//! Six nodes (`nodes = 6`): the controller group and replica group 1 on
//! nodes 1-3, replica group 2 on nodes 4-6. With `nodes = 3` both replica
//! groups run on nodes 1-3, as `shoal bench --groups 2` lays them out. The
//! cluster starts with [`SHARDS_DEFAULT`] shards on group 1, then group 2
//! joins and half of them move to it (setup, not measured).
//!
//! # Workload
//! One shard `S` of group 1 is filled with `value_kib` KiB values of random
//! (incompressible) bytes under keys `move-N` that hash to `S`, until the
//! values reach `shard_mib` MiB, [`FILL_IN_FLIGHT_MAX`] puts in flight.
//! Then each round moves `S` to the other group (1 → 2, 2 → 1, ...) with
//! [`Admin::move_shard`] while `writers` closed-loop *moving-shard writers*
//! put [`WRITE_VALUE_BYTES`]-byte values to keys of `S`
//! ([`MOVING_KEYS_PER_WRITER`] each) and `writers` *other-shard writers*
//! put to keys of every other shard ([`OTHER_KEYS_PER_WRITER`] each). A
//! round runs the writers for [`WARMUP_MS`] (unmeasured), then the *steady
//! window*, then the move, then [`TAIL_MS`] more.
//!
//! # Metrics (per round)
//! - **shard bytes**: `S`'s keys plus values as its new group's leader
//!   holds them after the move ([`Admin::shard_lines`]).
//! - **move seconds**: the wall time of [`Admin::move_shard`]: claim,
//!   freeze, export + ship to every destination node, install (ingest on
//!   every replica), delete at the source, publish.
//! - **move rate**: shard bytes / move seconds, in MB/s (10^6 bytes).
//! - **moving-shard latency** p50 / p99 / max: the latency (issue to
//!   acknowledgement) of every acknowledged moving-shard write *issued*
//!   while the move ran; writes whose outcome is unknown are counted apart.
//! - **longest gap**: for each moving-shard writer, the longest interval
//!   that overlaps the move without an acknowledged write of that writer —
//!   from its last acknowledgement at or before the move started to its
//!   first at or after the move ended (or to when it stopped, if none), and
//!   every gap between acknowledgements in between; the maximum over the
//!   writers.
//! - **other-shard throughput**: acknowledgements of the other-shard
//!   writers that arrived in a window, per second of it: in the steady
//!   window just before the move (as long as the previous round's move,
//!   at least [`STEADY_MS_MIN`], at most [`STEADY_MS_MAX`]) and during the
//!   move; the ratio is during / steady.
//!
//! # Correctness
//! After the last round every key written is read back (linearizably,
//! through the key's current group): each fill key must hold its value,
//! each writer key its last acknowledged value (or a value of a later write
//! whose outcome was unknown; absent only if no write of it was
//! acknowledged), and `S` must hold exactly the fill keys and the writer
//! keys found. Any difference fails the run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use shoal_engine::{GroupId, ShardId};
use shoal_net::quic::QuicClient;
use shoal_net::{Limits, NodeId, Peer};
use shoal_shard::controller::{ShardConfig, SHARDS_DEFAULT};
use shoal_shard::protocol::KvProtocol;
use shoal_shard::ClientError;

use crate::bench::{percentile, shard_cluster, BENCH_CONTROLLER};
use crate::cluster::fresh_client_id;
use crate::local_cluster::LocalCluster;
use crate::sharding::Admin;

/// A sharded KV client over QUIC.
type ShardClient = shoal_shard::Client<QuicClient<KvProtocol>>;

/// Fill puts in flight at once.
pub const FILL_IN_FLIGHT_MAX: usize = 32;
/// Read-back gets in flight at once.
pub const READ_IN_FLIGHT_MAX: usize = 32;
/// Value size of the writers' puts.
pub const WRITE_VALUE_BYTES: usize = 256;
/// Keys of `S` each moving-shard writer cycles through.
pub const MOVING_KEYS_PER_WRITER: usize = 16;
/// Keys of other shards each other-shard writer cycles through.
pub const OTHER_KEYS_PER_WRITER: usize = 64;
/// Writers run this long in each round before the steady window opens
/// (sessions opened, routes cached).
pub const WARMUP_MS: u64 = 1_000;
/// Shortest steady window.
pub const STEADY_MS_MIN: u64 = 2_000;
/// Longest steady window (a very slow move does not make the steady
/// window as long).
pub const STEADY_MS_MAX: u64 = 60_000;
/// Writers keep running this long after the move, so every writer's first
/// acknowledgement after it is seen.
pub const TAIL_MS: u64 = 1_000;
/// One operation's deadline, retries included. A write to the moving shard
/// waits for the whole move (the source answers `WrongGroup` from its
/// freeze until the new configuration is published), so this is generous:
/// a write that runs out is an unknown outcome, not a measurement.
pub const OP_DEADLINE_MS: u64 = 300_000;
/// Deadline of the admin client's own calls.
const ADMIN_OP_DEADLINE_MS: u64 = 60_000;
/// QUIC connections the clients share.
const QUIC_CLIENTS: usize = 4;
/// Longest wait for the nodes to exit at the end.
const STOP_WAIT_MS_MAX: u64 = 60_000;
/// How long to ask for the moved shard's size before giving up.
const SIZE_WAIT_MS_MAX: u64 = 30_000;
/// Mismatches the data check prints before it fails.
const MISMATCHES_SHOWN_MAX: usize = 10;
/// The replica groups the shard moves between.
const GROUPS: [GroupId; 2] = [1, 2];

/// Settings of a `shoal bench-move` run.
#[derive(Debug, Clone)]
pub struct MoveBenchOptions {
    /// The `shoal` binary the nodes run.
    pub exe: PathBuf,
    /// Working directory (wiped first): the nodes' data and logs.
    pub dir: PathBuf,
    /// Nodes: 6 (group 2 on nodes 4-6) or 3 (both groups on nodes 1-3).
    pub nodes: u64,
    /// Size of the moving shard's values, MiB.
    pub shard_mib: u64,
    /// Size of each fill value, KiB.
    pub value_kib: u64,
    /// Moves measured.
    pub rounds: u32,
    /// Moving-shard writers, and as many other-shard writers.
    pub writers: usize,
    /// Extra arguments of every `shoal node`.
    pub node_args: Vec<String>,
}

impl MoveBenchOptions {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.nodes != 3 && self.nodes != 6 {
            bail!("--nodes must be 3 or 6, not {}", self.nodes);
        }
        if self.shard_mib == 0 || self.rounds == 0 || self.writers == 0 {
            bail!("--shard-mib, --rounds and --writers must be positive");
        }
        let value_kib_max = shoal_engine::config::VALUE_BYTES_MAX_DEFAULT / 1024;
        if self.value_kib == 0 || self.value_kib > value_kib_max {
            bail!("--value-kib must be 1..={value_kib_max}");
        }
        Ok(())
    }

    /// Fill keys needed to reach `shard_mib` MiB of values.
    fn fill_keys(&self) -> u64 {
        (self.shard_mib * 1024).div_ceil(self.value_kib)
    }
}

/// What one round measured (see the module docs for each definition).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoveRound {
    /// Round number, from 1.
    pub round: u32,
    /// Group the shard left.
    pub from_group: GroupId,
    /// Group the shard moved to.
    pub to_group: GroupId,
    /// Keys of the shard after the move.
    pub shard_keys: u64,
    /// Bytes (keys + values) of the shard after the move.
    pub shard_bytes: u64,
    /// Wall time of the move.
    pub move_secs: f64,
    /// `shard_bytes / move_secs`, in MB/s.
    pub move_mb_per_sec: f64,
    /// Acknowledged moving-shard writes issued during the move.
    pub moving_writes: u64,
    /// Moving-shard writes issued during the move whose outcome is unknown.
    pub moving_writes_unknown: u64,
    /// Median latency of those acknowledged writes, µs.
    pub moving_latency_us_p50: u64,
    /// Their 99th percentile latency, µs.
    pub moving_latency_us_p99: u64,
    /// Their longest latency, µs.
    pub moving_latency_us_max: u64,
    /// Longest gap between acknowledgements of one moving-shard writer
    /// across the move, µs.
    pub moving_gap_us_max: u64,
    /// Length of the steady window, seconds.
    pub steady_secs: f64,
    /// Other-shard acknowledgements per second in the steady window.
    pub other_ops_per_sec_steady: f64,
    /// Other-shard acknowledgements per second during the move.
    pub other_ops_per_sec_moving: f64,
    /// `other_ops_per_sec_moving / other_ops_per_sec_steady`.
    pub other_ratio: f64,
    /// Writes of any writer that failed (refused) in this round.
    pub writes_failed: u64,
}

/// The header of [`format_round`]'s table.
pub const TABLE_HEADER: &str = "round  move  shard MB  move s    MB/s  writes  unk  p50 ms   p99 ms   max ms   gap ms  steady s  other/s steady  moving  ratio";

/// Formats a round as one table row.
pub fn format_round(r: &MoveRound) -> String {
    format!(
        "{:<5} {}->{} {:>9.1} {:>7.2} {:>7.1} {:>7} {:>4} {:>7.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>15.0} {:>7.0} {:>6.2}",
        r.round,
        r.from_group,
        r.to_group,
        r.shard_bytes as f64 / 1e6,
        r.move_secs,
        r.move_mb_per_sec,
        r.moving_writes,
        r.moving_writes_unknown,
        r.moving_latency_us_p50 as f64 / 1e3,
        r.moving_latency_us_p99 as f64 / 1e3,
        r.moving_latency_us_max as f64 / 1e3,
        r.moving_gap_us_max as f64 / 1e3,
        r.steady_secs,
        r.other_ops_per_sec_steady,
        r.other_ops_per_sec_moving,
        r.other_ratio,
    )
}

/// The median of `values` (NaN when empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The medians over `rounds` in [`format_round`]'s columns.
pub fn format_medians(rounds: &[MoveRound]) -> String {
    let m = |f: fn(&MoveRound) -> f64| median(rounds.iter().map(f).collect());
    format!(
        "{:<10} {:>9.1} {:>7.2} {:>7.1} {:>7.0} {:>4.0} {:>7.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>15.0} {:>7.0} {:>6.2}",
        "median",
        m(|r| r.shard_bytes as f64 / 1e6),
        m(|r| r.move_secs),
        m(|r| r.move_mb_per_sec),
        m(|r| r.moving_writes as f64),
        m(|r| r.moving_writes_unknown as f64),
        m(|r| r.moving_latency_us_p50 as f64 / 1e3),
        m(|r| r.moving_latency_us_p99 as f64 / 1e3),
        m(|r| r.moving_latency_us_max as f64 / 1e3),
        m(|r| r.moving_gap_us_max as f64 / 1e3),
        m(|r| r.steady_secs),
        m(|r| r.other_ops_per_sec_steady),
        m(|r| r.other_ops_per_sec_moving),
        m(|r| r.other_ratio),
    )
}

// ---------------------------------------------------------------------------
// Keys and values.

/// Fill key number `n` (kept if it hashes to the moving shard).
fn fill_key(n: u64) -> Bytes {
    Bytes::from(format!("move-{n}"))
}

/// Fill key `n`'s value: `bytes` random bytes seeded by `n`, so the check
/// regenerates it instead of keeping the shard in memory, and compression
/// cannot shrink what moves.
fn fill_value(n: u64, bytes: usize) -> Bytes {
    let mut value = vec![0u8; bytes];
    rand_chacha::ChaCha8Rng::seed_from_u64(n).fill_bytes(&mut value);
    Bytes::from(value)
}

/// The value of a writer's write number `seq`: the number, zero-padded,
/// then filler up to [`WRITE_VALUE_BYTES`].
fn write_value(seq: u64) -> Bytes {
    let mut value = format!("{seq:020}").into_bytes();
    value.resize(WRITE_VALUE_BYTES, b'.');
    Bytes::from(value)
}

/// The first `count` keys `{prefix}-{n}` for which `keep(shard)` holds.
fn keys_where(
    config: &ShardConfig,
    prefix: &str,
    count: usize,
    keep: impl Fn(ShardId) -> bool,
) -> Vec<Bytes> {
    (0u64..)
        .map(|n| Bytes::from(format!("{prefix}-{n}")))
        .filter(|k| keep(config.shard_of_key(k)))
        .take(count)
        .collect()
}

// ---------------------------------------------------------------------------
// Writers.

/// Which keys a writer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Keys of the moving shard.
    Moving,
    /// Keys of every other shard.
    Other,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged.
    Acked,
    /// May or may not have been applied (`ClientError::Maybe`).
    Unknown,
    /// Refused: not applied.
    Failed,
}

/// One write: when it was issued and answered, and how it ended.
#[derive(Debug, Clone, Copy)]
struct WriteRecord {
    issued: Instant,
    answered: Instant,
    outcome: Outcome,
}

/// What a read of a writer's key may find.
#[derive(Debug, Clone, Default)]
struct Expected {
    /// The write number of the last acknowledged write.
    acked: Option<u64>,
    /// Write numbers of writes after it whose outcome is unknown.
    unknown: Vec<u64>,
}

impl Expected {
    /// Whether a read that found `value` (`None`: no key) is consistent
    /// with the writes made.
    fn admits(&self, value: Option<&[u8]>) -> bool {
        match value {
            None => self.acked.is_none(),
            Some(v) => self
                .acked
                .iter()
                .chain(&self.unknown)
                .any(|&seq| write_value(seq)[..] == *v),
        }
    }
}

/// A closed-loop writer: its keys, what each must hold, its client.
struct Writer {
    target: Target,
    client: ShardClient,
    keys: Vec<Bytes>,
    expected: Vec<Expected>,
    /// Write number of the last write issued.
    seq: u64,
    /// The first refusal met, for the report.
    first_error: Option<String>,
}

impl Writer {
    /// Writes until `stop`, one write at a time; returns itself and the
    /// round's log.
    async fn write_until(mut self, stop: Arc<AtomicBool>) -> (Writer, Vec<WriteRecord>) {
        let mut log = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            self.seq += 1;
            let seq = self.seq;
            let slot = (seq % self.keys.len() as u64) as usize;
            let issued = Instant::now();
            let result = self
                .client
                .put(self.keys[slot].clone(), write_value(seq))
                .await;
            let answered = Instant::now();
            let outcome = match result {
                Ok(_) => {
                    self.expected[slot] = Expected {
                        acked: Some(seq),
                        unknown: Vec::new(),
                    };
                    Outcome::Acked
                }
                Err(ClientError::Maybe) => {
                    self.expected[slot].unknown.push(seq);
                    Outcome::Unknown
                }
                Err(e) => {
                    if self.first_error.is_none() {
                        tracing::warn!(key = ?self.keys[slot], error = %e, "write failed");
                        self.first_error = Some(format!("{:?}: {e}", self.keys[slot]));
                    }
                    Outcome::Failed
                }
            };
            log.push(WriteRecord {
                issued,
                answered,
                outcome,
            });
        }
        (self, log)
    }
}

/// The writers' figures of one round (see the module docs).
#[derive(Debug, Clone, PartialEq)]
struct WriterStats {
    moving_latencies_us: Vec<u64>,
    moving_writes_unknown: u64,
    moving_gap_us_max: u64,
    other_ops_steady: u64,
    other_ops_moving: u64,
    writes_failed: u64,
}

/// The longest interval without an acknowledgement in `log` that overlaps
/// `[start, end]`: from the last acknowledgement at or before `start` (or
/// `start`) to the first at or after `end` (or the last answer, at least
/// `end`, if none came), through every acknowledgement in between.
fn longest_ack_gap(log: &[WriteRecord], start: Instant, end: Instant) -> Duration {
    let acks: Vec<Instant> = log
        .iter()
        .filter(|w| w.outcome == Outcome::Acked)
        .map(|w| w.answered)
        .collect();
    let from = acks
        .iter()
        .copied()
        .filter(|&t| t <= start)
        .max()
        .unwrap_or(start);
    let to = acks
        .iter()
        .copied()
        .filter(|&t| t >= end)
        .min()
        .unwrap_or_else(|| log.iter().map(|w| w.answered).fold(end, Instant::max));
    let mut points: Vec<Instant> = acks.into_iter().filter(|&t| t > from && t < to).collect();
    points.push(from);
    points.push(to);
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Acknowledgements in `logs` answered within `[start, end)`.
fn acks_within(logs: &[Vec<WriteRecord>], start: Instant, end: Instant) -> u64 {
    logs.iter()
        .flatten()
        .filter(|w| w.outcome == Outcome::Acked && w.answered >= start && w.answered < end)
        .count() as u64
}

/// The round's figures from the writers' logs, the steady window and the
/// move's `[start, end)`.
fn writer_stats(
    moving: &[Vec<WriteRecord>],
    other: &[Vec<WriteRecord>],
    steady: (Instant, Instant),
    moved: (Instant, Instant),
) -> WriterStats {
    let during: Vec<&WriteRecord> = moving
        .iter()
        .flatten()
        .filter(|w| w.issued >= moved.0 && w.issued < moved.1)
        .collect();
    let mut moving_latencies_us: Vec<u64> = during
        .iter()
        .filter(|w| w.outcome == Outcome::Acked)
        .map(|w| (w.answered - w.issued).as_micros() as u64)
        .collect();
    moving_latencies_us.sort_unstable();
    WriterStats {
        moving_latencies_us,
        moving_writes_unknown: during
            .iter()
            .filter(|w| w.outcome == Outcome::Unknown)
            .count() as u64,
        moving_gap_us_max: moving
            .iter()
            .map(|log| longest_ack_gap(log, moved.0, moved.1).as_micros() as u64)
            .max()
            .unwrap_or(0),
        other_ops_steady: acks_within(other, steady.0, steady.1),
        other_ops_moving: acks_within(other, moved.0, moved.1),
        writes_failed: moving
            .iter()
            .chain(other)
            .flatten()
            .filter(|w| w.outcome == Outcome::Failed)
            .count() as u64,
    }
}

// ---------------------------------------------------------------------------
// The run.

/// Sharded clients, one session pool each, over [`QUIC_CLIENTS`] shared
/// connections. Not `bench::Driver::shoal`: its clients give up after the
/// load generator's 10 s, and a write to a moving shard may wait for the
/// whole move ([`OP_DEADLINE_MS`]).
fn connect_clients(
    members: &[(u64, SocketAddr)],
    tls_dir: &Path,
    count: usize,
) -> Result<(Vec<ShardClient>, Vec<QuicClient<KvProtocol>>)> {
    let identity = crate::certs::load(tls_dir, &Peer::Client("client".into()))?;
    let addresses: std::collections::HashMap<NodeId, SocketAddr> =
        members.iter().map(|&(id, a)| (NodeId(id), a)).collect();
    let quics = (0..QUIC_CLIENTS.min(count.max(1)))
        .map(|_| QuicClient::new(&identity, addresses.clone(), Limits::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = (0..count)
        .map(|i| {
            let mut config = shoal_shard::ClientConfig::new(fresh_client_id());
            config.op_deadline = Duration::from_millis(OP_DEADLINE_MS);
            shoal_shard::Client::sharded(
                quics[i % quics.len()].clone(),
                BENCH_CONTROLLER.iter().copied().map(NodeId).collect(),
                config,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((clients, quics))
}

/// Runs the benchmark: prints the layout, one row per round and the
/// medians; fails if the data check finds any difference.
pub fn run(options: &MoveBenchOptions) -> Result<Vec<MoveRound>> {
    options.validate()?;
    let _ = std::fs::remove_dir_all(&options.dir);
    std::fs::create_dir_all(&options.dir)?;
    let dir = options.dir.canonicalize()?;
    let mut args: Vec<&str> = options.node_args.iter().map(String::as_str).collect();
    args.extend(["--controller", "1,2,3"]);
    let mut cluster = LocalCluster::create(&options.exe, &dir.join("nodes"), options.nodes, &args)?;
    cluster.start_all()?;
    let group_two_nodes: Vec<u64> = if options.nodes == 6 {
        vec![4, 5, 6]
    } else {
        // Both groups on nodes 1-3, leaders spread, as `shoal bench --groups 2`.
        shard_cluster(&cluster, 2)?;
        BENCH_CONTROLLER.to_vec()
    };
    println!(
        "shoal bench-move: {} nodes on loopback, controller + group 1 on nodes 1-3, group 2 on nodes {group_two_nodes:?}; {SHARDS_DEFAULT} shards; data in {}",
        options.nodes,
        dir.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let members = cluster.members().to_vec();
    let tls = cluster.tls_dir().to_path_buf();
    let rounds = runtime.block_on(async {
        let admin = Admin::connect(
            &members,
            &BENCH_CONTROLLER,
            &tls,
            Duration::from_millis(ADMIN_OP_DEADLINE_MS),
        )?;
        let (clients, quics) = connect_clients(&members, &tls, 2 * options.writers + 1)?;
        let result = bench_moves(options, &admin, &group_two_nodes, clients).await;
        for quic in &quics {
            quic.close().await;
        }
        admin.close().await;
        result
    })?;
    cluster.stop_all(Duration::from_millis(STOP_WAIT_MS_MAX))?;
    Ok(rounds)
}

/// Sets the groups up, fills the shard, runs the rounds and checks the
/// data. `clients`: one per writer, then one for the fill and the check.
async fn bench_moves(
    options: &MoveBenchOptions,
    admin: &Admin,
    group_two_nodes: &[u64],
    mut clients: Vec<ShardClient>,
) -> Result<Vec<MoveRound>> {
    if options.nodes == 6 {
        admin
            .init(SHARDS_DEFAULT, GROUPS[0], &BENCH_CONTROLLER)
            .await
            .context("posting the first configuration")?;
        let started = Instant::now();
        admin
            .join(GROUPS[1], group_two_nodes)
            .await
            .context("group 2 joining")?;
        println!(
            "group 2 joined in {:.1} s (half the shards moved to it; not measured)",
            started.elapsed().as_secs_f64()
        );
    }
    let config = admin.query().await?;
    let shard = *config
        .shards_of(GROUPS[0])
        .first()
        .context("group 1 serves no shard")?;
    let check_client = clients.pop().context("no client")?;

    // Fill the shard.
    let value_bytes = (options.value_kib * 1024) as usize;
    let fill_numbers: Vec<u64> = (0u64..)
        .filter(|&n| config.shard_of_key(&fill_key(n)) == shard)
        .take(options.fill_keys() as usize)
        .collect();
    println!(
        "filling shard {shard} (group 1) with {} keys of {} KiB = {} MiB, {FILL_IN_FLIGHT_MAX} puts in flight",
        fill_numbers.len(),
        options.value_kib,
        options.shard_mib
    );
    let fill_secs = fill(&check_client, &fill_numbers, value_bytes).await?;
    let fill_bytes = fill_numbers.len() as u64 * value_bytes as u64;
    println!(
        "filled in {fill_secs:.1} s ({:.1} MB/s)",
        fill_bytes as f64 / 1e6 / fill_secs
    );

    // The writers.
    let mut writers: Vec<Writer> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let (target, keys) = if i < options.writers {
                let keys = keys_where(&config, &format!("hot-{i}"), MOVING_KEYS_PER_WRITER, |s| {
                    s == shard
                });
                (Target::Moving, keys)
            } else {
                let keys = keys_where(&config, &format!("cold-{i}"), OTHER_KEYS_PER_WRITER, |s| {
                    s != shard
                });
                (Target::Other, keys)
            };
            Writer {
                target,
                client,
                expected: vec![Expected::default(); keys.len()],
                keys,
                seq: 0,
                first_error: None,
            }
        })
        .collect();
    println!(
        "{} moving-shard writers ({MOVING_KEYS_PER_WRITER} keys of shard {shard} each) and {} other-shard writers ({OTHER_KEYS_PER_WRITER} keys each), {WRITE_VALUE_BYTES}-byte values\n",
        options.writers, options.writers
    );
    println!("{TABLE_HEADER}");

    let mut rounds = Vec::new();
    let mut steady = Duration::from_millis(STEADY_MS_MIN);
    for round in 1..=options.rounds {
        let from = admin
            .query()
            .await?
            .group_of(shard)
            .context("the shard has no group")?;
        let to = if from == GROUPS[0] {
            GROUPS[1]
        } else {
            GROUPS[0]
        };
        let (measured, back) = move_round(admin, writers, shard, (from, to), steady).await?;
        writers = back;
        let measured = MoveRound { round, ..measured };
        println!("{}", format_round(&measured));
        steady = Duration::from_secs_f64(measured.move_secs).clamp(
            Duration::from_millis(STEADY_MS_MIN),
            Duration::from_millis(STEADY_MS_MAX),
        );
        rounds.push(measured);
    }
    println!("{}", format_medians(&rounds));
    println!(
        "(MB = 10^6 bytes; latencies of moving-shard writes issued during the move; gap: longest time one moving-shard writer went without an acknowledgement across the move; ratio: other-shard throughput during the move / steady)"
    );

    verify(
        admin,
        &check_client,
        shard,
        &fill_numbers,
        value_bytes,
        &writers,
    )
    .await?;
    let failed: u64 = rounds.iter().map(|r| r.writes_failed).sum();
    if failed > 0 {
        let first = writers.iter().find_map(|w| w.first_error.clone());
        bail!(
            "{failed} writes were refused; the first: {}",
            first.unwrap_or_default()
        );
    }
    Ok(rounds)
}

/// Puts every fill key, [`FILL_IN_FLIGHT_MAX`] at a time, printing progress
/// to stderr; returns the seconds it took.
async fn fill(client: &ShardClient, numbers: &[u64], value_bytes: usize) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut done = 0usize;
    let mut shown = Instant::now();
    let mut progress = |done: usize| {
        if shown.elapsed() >= Duration::from_secs(1) || done == numbers.len() {
            shown = Instant::now();
            let mb = (done * value_bytes) as f64 / 1e6;
            eprint!(
                "\r  {done}/{} keys, {mb:.0} MB, {:.1} MB/s   ",
                numbers.len(),
                mb / started.elapsed().as_secs_f64()
            );
        }
    };
    for &n in numbers {
        if tasks.len() >= FILL_IN_FLIGHT_MAX {
            tasks.join_next().await.context("no fill task")???;
            done += 1;
            progress(done);
        }
        let client = client.clone();
        tasks.spawn(async move {
            client
                .put(fill_key(n), fill_value(n, value_bytes))
                .await
                .with_context(|| format!("fill put {:?}", fill_key(n)))
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
        done += 1;
        progress(done);
    }
    eprintln!();
    Ok(started.elapsed().as_secs_f64())
}

/// One round: the writers run through the warm-up, the steady window, the
/// move of `shard` from `groups.0` to `groups.1` and the tail. Returns the
/// figures (round number 0) and the writers.
async fn move_round(
    admin: &Admin,
    writers: Vec<Writer>,
    shard: ShardId,
    (from, to): (GroupId, GroupId),
    steady: Duration,
) -> Result<(MoveRound, Vec<Writer>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|w| tokio::spawn(w.write_until(stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(WARMUP_MS)).await;
    let steady_start = Instant::now();
    tokio::time::sleep(steady).await;
    let steady_end = Instant::now();
    let move_start = Instant::now();
    let moved = admin.move_shard(shard, to).await;
    let move_end = Instant::now();
    if let Err(e) = moved {
        // Writes to the shard may be held up until their deadline now.
        for task in &tasks {
            task.abort();
        }
        return Err(e).with_context(|| format!("moving shard {shard} to group {to}"));
    }
    tokio::time::sleep(Duration::from_millis(TAIL_MS)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writers = Vec::new();
    let (mut moving, mut other) = (Vec::new(), Vec::new());
    for task in tasks {
        let (writer, log) = task.await.context("a writer panicked")?;
        match writer.target {
            Target::Moving => moving.push(log),
            Target::Other => other.push(log),
        }
        writers.push(writer);
    }
    let config = moved?;
    if config.group_of(shard) != Some(to) {
        bail!(
            "after the move, shard {shard} is on {:?}",
            config.group_of(shard)
        );
    }
    let (shard_keys, shard_bytes) = shard_size(admin, &config, shard).await?;
    let stats = writer_stats(
        &moving,
        &other,
        (steady_start, steady_end),
        (move_start, move_end),
    );
    let move_secs = (move_end - move_start).as_secs_f64();
    let steady_secs = (steady_end - steady_start).as_secs_f64();
    let other_ops_per_sec_steady = stats.other_ops_steady as f64 / steady_secs;
    let other_ops_per_sec_moving = stats.other_ops_moving as f64 / move_secs;
    let latencies = &stats.moving_latencies_us;
    Ok((
        MoveRound {
            round: 0,
            from_group: from,
            to_group: to,
            shard_keys,
            shard_bytes,
            move_secs,
            move_mb_per_sec: shard_bytes as f64 / 1e6 / move_secs,
            moving_writes: latencies.len() as u64,
            moving_writes_unknown: stats.moving_writes_unknown,
            moving_latency_us_p50: percentile(latencies, 0.50),
            moving_latency_us_p99: percentile(latencies, 0.99),
            moving_latency_us_max: latencies.last().copied().unwrap_or(0),
            moving_gap_us_max: stats.moving_gap_us_max,
            steady_secs,
            other_ops_per_sec_steady,
            other_ops_per_sec_moving,
            other_ratio: other_ops_per_sec_moving / other_ops_per_sec_steady.max(f64::MIN_POSITIVE),
            writes_failed: stats.writes_failed,
        },
        writers,
    ))
}

/// `shard`'s keys and bytes as its group's leader holds them, asked until
/// the leader answers (at most [`SIZE_WAIT_MS_MAX`]).
async fn shard_size(admin: &Admin, config: &ShardConfig, shard: ShardId) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_millis(SIZE_WAIT_MS_MAX);
    loop {
        let line = admin
            .shard_lines(config)
            .await
            .into_iter()
            .find(|l| l.shard == shard)
            .context("no such shard")?;
        if let (Some(keys), Some(bytes)) = (line.keys, line.bytes) {
            return Ok((keys, bytes));
        }
        if Instant::now() >= deadline {
            bail!(
                "group {}'s leader did not report shard {shard}'s size",
                line.group
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads back every fill key and writer key (see the module docs) and
/// checks the shard's key count; fails on any difference.
async fn verify(
    admin: &Admin,
    client: &ShardClient,
    shard: ShardId,
    fill_numbers: &[u64],
    value_bytes: usize,
    writers: &[Writer],
) -> Result<()> {
    let started = Instant::now();
    let mut mismatches: Vec<String> = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut fill_ok = 0u64;
    for &n in fill_numbers {
        if tasks.len() >= READ_IN_FLIGHT_MAX {
            let r = tasks.join_next().await.context("no read task")?;
            tally(r?, &mut mismatches, &mut fill_ok)?;
        }
        let client = client.clone();
        tasks.spawn(async move {
            let key = fill_key(n);
            let want = fill_value(n, value_bytes);
            anyhow::Ok(match client.get(key.clone()).await {
                Ok(got) if got.value == want => None,
                Ok(got) => Some(format!(
                    "{key:?}: holds {} bytes that differ from the {} written",
                    got.value.len(),
                    want.len()
                )),
                Err(ClientError::NotFound) => Some(format!("{key:?}: lost (not found)")),
                Err(e) => return Err(e).with_context(|| format!("reading {key:?}")),
            })
        });
    }
    while let Some(r) = tasks.join_next().await {
        tally(r?, &mut mismatches, &mut fill_ok)?;
    }
    let (mut writer_ok, mut moving_found) = (0u64, 0u64);
    for writer in writers {
        for (key, expected) in writer.keys.iter().zip(&writer.expected) {
            let found = match client.get(key.clone()).await {
                Ok(got) => Some(got.value),
                Err(ClientError::NotFound) => None,
                Err(e) => return Err(e).with_context(|| format!("reading {key:?}")),
            };
            if writer.target == Target::Moving && found.is_some() {
                moving_found += 1;
            }
            if expected.admits(found.as_deref()) {
                writer_ok += 1;
            } else {
                mismatches.push(format!(
                    "{key:?}: read {:?}, last acknowledged write {:?}, unknown {:?}",
                    found.map(|v| String::from_utf8_lossy(&v[..20.min(v.len())]).into_owned()),
                    expected.acked,
                    expected.unknown
                ));
            }
        }
    }
    let config = admin.query().await?;
    let (shard_keys, _) = shard_size(admin, &config, shard).await?;
    let keys_want = fill_numbers.len() as u64 + moving_found;
    if shard_keys != keys_want {
        mismatches.push(format!(
            "shard {shard} holds {shard_keys} keys, expected {keys_want} ({} fill + {moving_found} writer keys)",
            fill_numbers.len()
        ));
    }
    if !mismatches.is_empty() {
        for m in mismatches.iter().take(MISMATCHES_SHOWN_MAX) {
            eprintln!("MISMATCH {m}");
        }
        bail!(
            "data check FAILED: {} differences ({fill_ok} fill keys and {writer_ok} writer keys matched)",
            mismatches.len()
        );
    }
    let unknown: usize = writers
        .iter()
        .flat_map(|w| &w.expected)
        .map(|e| e.unknown.len())
        .sum();
    println!(
        "data check passed in {:.1} s: {fill_ok} fill keys and {writer_ok} writer keys read back as written ({unknown} writes of unknown outcome outstanding); shard {shard} holds exactly {shard_keys} keys",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Counts one read-back: a match in `ok`, a difference in `mismatches`.
fn tally(result: Result<Option<String>>, mismatches: &mut Vec<String>, ok: &mut u64) -> Result<()> {
    match result? {
        None => *ok += 1,
        Some(m) => mismatches.push(m),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn write(base: Instant, issued_ms: u64, answered_ms: u64, outcome: Outcome) -> WriteRecord {
        WriteRecord {
            issued: at(base, issued_ms),
            answered: at(base, answered_ms),
            outcome,
        }
    }

    // The gap spans the move: from the last ack before it to the first
    // after it, even when neither falls inside it.
    #[test]
    fn the_longest_gap_reaches_across_the_move() {
        let t = Instant::now();
        let log = vec![
            write(t, 0, 10, Outcome::Acked),
            write(t, 10, 90, Outcome::Acked),
            write(t, 90, 400, Outcome::Acked),
            write(t, 400, 410, Outcome::Acked),
        ];
        // Move from 100 to 300: the write answered at 400 was the first after it.
        assert_eq!(
            longest_ack_gap(&log, at(t, 100), at(t, 300)),
            Duration::from_millis(310)
        );
        // Acks inside the move split it.
        let log = vec![
            write(t, 0, 50, Outcome::Acked),
            write(t, 50, 150, Outcome::Acked),
            write(t, 150, 400, Outcome::Acked),
        ];
        assert_eq!(
            longest_ack_gap(&log, at(t, 100), at(t, 300)),
            Duration::from_millis(250)
        );
        // Unacknowledged answers are not acks; with none after the move the
        // gap runs to the last answer.
        let log = vec![
            write(t, 0, 50, Outcome::Acked),
            write(t, 50, 500, Outcome::Unknown),
        ];
        assert_eq!(
            longest_ack_gap(&log, at(t, 100), at(t, 300)),
            Duration::from_millis(450)
        );
    }

    // Latencies count writes issued during the move, whenever answered;
    // throughput counts acks answered within each window.
    #[test]
    fn stats_use_the_windows_as_documented() {
        let t = Instant::now();
        let moving = vec![vec![
            write(t, 90, 95, Outcome::Acked),   // before the move
            write(t, 95, 250, Outcome::Acked),  // issued before, answered during
            write(t, 250, 260, Outcome::Acked), // during
            write(t, 260, 400, Outcome::Acked), // issued during, answered after
            write(t, 400, 410, Outcome::Unknown),
        ]];
        let other = vec![vec![
            write(t, 0, 10, Outcome::Acked),
            write(t, 10, 20, Outcome::Acked),
            write(t, 20, 150, Outcome::Acked),
            write(t, 150, 160, Outcome::Failed),
        ]];
        let stats = writer_stats(&moving, &other, (t, at(t, 100)), (at(t, 100), at(t, 300)));
        assert_eq!(stats.moving_latencies_us, vec![10_000, 140_000]);
        assert_eq!(stats.moving_writes_unknown, 0);
        assert_eq!(stats.moving_gap_us_max, 155_000);
        assert_eq!(stats.other_ops_steady, 2);
        assert_eq!(stats.other_ops_moving, 1);
        assert_eq!(stats.writes_failed, 1);
    }

    #[test]
    fn a_read_is_checked_against_the_acked_and_unknown_writes() {
        let none = Expected::default();
        assert!(none.admits(None));
        assert!(!none.admits(Some(&write_value(1))));
        let acked = Expected {
            acked: Some(3),
            unknown: vec![4],
        };
        assert!(acked.admits(Some(&write_value(3))));
        assert!(acked.admits(Some(&write_value(4))));
        assert!(!acked.admits(Some(&write_value(2))));
        assert!(!acked.admits(None));
        assert_eq!(write_value(7).len(), WRITE_VALUE_BYTES);
    }

    #[test]
    fn fill_values_are_deterministic_and_distinct() {
        assert_eq!(fill_value(5, 1024), fill_value(5, 1024));
        assert_ne!(fill_value(5, 1024), fill_value(6, 1024));
        assert_eq!(fill_value(5, 65536).len(), 65536);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
