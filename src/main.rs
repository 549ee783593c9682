//! The `shoal` command.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use shoal::cluster::{self, ClientOptions, NodeOptions};
use shoal::{bench, crashtest, jsonl};

mod cluster_demo;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a replicated, sharded key/value database"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster demo (3 node processes, leader SIGKILLed); --engine: the engine demo.
    ///
    /// Cluster demo: 3 node processes, a workload, the leader SIGKILLed,
    /// a new leader, the node restarted and caught up, nothing lost.
    /// With --engine: the engine demo (SIGKILL a writer mid-write, reopen,
    /// check that everything acknowledged survived).
    Demo {
        /// Run the engine demo instead of the cluster demo.
        #[arg(long)]
        engine: bool,
        /// Where to keep the demo's data (wiped first).
        #[arg(long, default_value = "./demo-data")]
        dir: PathBuf,
        /// (Engine demo) how many times to kill the writer.
        #[arg(long, default_value_t = 5)]
        kills: u32,
        /// (Engine demo) workload seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Cluster certificates (mutual TLS).
    Certs {
        #[command(subcommand)]
        command: CertsCmd,
    },
    /// Run a cluster node until SIGTERM (graceful) or SIGKILL (a crash).
    Node {
        /// This node's id (its certificate is node-<id>.pem in --tls).
        #[arg(long)]
        id: u64,
        /// Data directory (RocksDB, snapshots, status.json).
        #[arg(long)]
        data: PathBuf,
        /// UDP address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Every member, this node included: 1=ADDR,2=ADDR,... (with
        /// --join: the members to reach).
        #[arg(long)]
        peers: String,
        /// Start empty and join the cluster of --peers: serves once
        /// `shoal member add` has added this node and it has caught up.
        #[arg(long)]
        join: bool,
        /// Certificate directory (from `shoal certs init`).
        #[arg(long)]
        tls: PathBuf,
        /// Snapshot the state machine (SST files) and compact the Raft log
        /// once the log holds more than this many bytes; 0: never.
        #[arg(long, default_value_t = cluster::MAX_RAFT_STATE_BYTES_DEFAULT)]
        max_raft_state_bytes: u64,
        /// QUIC idle timeout in ms (default 10000): how long a silent peer
        /// is waited for. A restarted peer is noticed at once regardless.
        #[arg(long)]
        io_timeout_ms: Option<u64>,
        /// Most megabytes per second (10^6 bytes) this node sends in bulk
        /// files, all together: shard moves, snapshots and MapReduce runs
        /// then leave CPU and network to client traffic. Default: no limit.
        #[arg(long)]
        bulk_mb_per_sec_max: Option<u64>,
        /// Threads of the node's async runtime.
        #[arg(long, default_value_t = cluster::WORKER_THREADS_DEFAULT)]
        worker_threads: usize,
        /// Enable the transport's fault filter (tests only).
        #[arg(long, hide = true)]
        fault_injection: bool,
        /// A sharded cluster: the controller group's nodes, e.g. 1,2,3
        /// (see `shoal shard`). Without it every node serves one KV group.
        #[arg(long, value_delimiter = ',')]
        controller: Option<Vec<u64>>,
        /// Serve Prometheus metrics (/metrics), liveness (/health) and
        /// readiness (/ready) over plain HTTP on this TCP address, e.g.
        /// 127.0.0.1:9100. Off by default.
        #[arg(long)]
        status_addr: Option<std::net::SocketAddr>,
    },
    /// Operate a sharded cluster (admin certificate): create groups, post
    /// the first configuration, join, leave, move a shard, rebalance, and
    /// print where every shard is.
    Shard {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(subcommand)]
        command: ShardCmd,
    },
    /// Membership of a group (admin certificate): list, add, promote,
    /// remove. One member changes at a time. With --controller (a sharded
    /// cluster), a change is also written into the shard configuration.
    Member {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The group (the single-group cluster's KV group by default).
        #[arg(long, default_value_t = shoal_shard::node::KV_GROUP)]
        group: u64,
        #[command(subcommand)]
        command: MemberCmd,
    },
    /// Read JSON requests from stdin, one per line; write one JSON answer
    /// per line to stdout (schema in README.md).
    Client {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Read a key: prints {"ok":true,"value":..,"version":..}.
    Get {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
    },
    /// Write a key: prints {"ok":true,"version":..}.
    Put {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        value: String,
        /// Write only if the key is at this version (0: only if absent).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Append to a key: prints {"ok":true,"version":..}.
    Append {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
        value: String,
    },
    /// Delete a key: prints {"ok":true,"existed":..}.
    Del {
        #[command(flatten)]
        cluster: ClusterArgs,
        key: String,
    },
    /// List keys in [START, END): prints {"ok":true,"pairs":[..]}.
    Scan {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(default_value = "")]
        start: String,
        /// Empty: no upper bound.
        #[arg(default_value = "")]
        end: String,
        #[arg(long, default_value_t = jsonl::SCAN_LIMIT_DEFAULT)]
        limit: u64,
    },
    /// Load generator: put/get throughput, latency and server CPU per
    /// operation of a 3-node Shoal cluster and, back to back, of etcd.
    Bench {
        /// Systems to measure, comma-separated: shoal, etcd.
        #[arg(long, value_delimiter = ',', default_value = "shoal,etcd")]
        systems: Vec<String>,
        /// Working directory for the clusters (wiped first).
        #[arg(long, default_value = "./bench-data")]
        dir: PathBuf,
        /// Client counts of the put phases.
        #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
        clients: Vec<usize>,
        /// Clients of the linearizable get phase (0: none).
        #[arg(long, default_value_t = 64)]
        get_clients: usize,
        /// Unmeasured seconds at the start of each phase.
        #[arg(long, default_value_t = 2.0)]
        warmup_secs: f64,
        /// Measured seconds of each phase.
        #[arg(long, default_value_t = 8.0)]
        measure_secs: f64,
        /// Distinct keys (each written once before the phases).
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
        /// Connections the clients share.
        #[arg(long, default_value_t = 8)]
        conns: usize,
        /// Benchmark a running Shoal cluster (1=ADDR,...) instead of starting one.
        #[arg(long, requires = "tls")]
        cluster: Option<String>,
        /// Certificate directory of --cluster.
        #[arg(long)]
        tls: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// An extra argument for every `shoal node` started (repeatable),
        /// e.g. --node-arg=--worker-threads=1.
        #[arg(long, allow_hyphen_values = true)]
        node_arg: Vec<String>,
        /// Replica groups of the Shoal cluster: 1, one group; more, a
        /// sharded cluster with that many groups on the 3 nodes (leaders
        /// spread) and keys routed by shard.
        #[arg(long, default_value_t = 1)]
        groups: u64,
        /// Benchmark the embedded `Db` against RocksDB used directly and
        /// redb instead (durable puts by --threads, gets by --get-threads;
        /// --systems defaults to shoal,rocksdb,redb; --measure-secs per
        /// cell; --keys loaded for the gets).
        #[arg(long)]
        embedded: bool,
        /// (--embedded) thread counts of the durable put cells.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        threads: Vec<usize>,
        /// (--embedded) threads of the get cell.
        #[arg(long, default_value_t = 8)]
        get_threads: usize,
        /// (--embedded) rounds; every round measures each cell on every
        /// system in turn.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Store files as keys: PREFIX + file name (a file over 1 MiB becomes
    /// keys NAME/000000, NAME/000001, ... cut at line ends). Prints
    /// {"ok":true,"files","keys","bytes","secs"}.
    Load {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Key prefix.
        #[arg(long)]
        prefix: String,
        /// Files to store.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// MapReduce jobs over stored keys: run (the coordinator), worker,
    /// status.
    Mapreduce {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(subcommand)]
        command: MapreduceCmd,
    },
    /// Word count over generated text: a MapReduce job on a local cluster
    /// against the same code run sequentially and against
    /// tr | sort | uniq -c, alternating in rounds.
    BenchMapreduce {
        /// Working directory (wiped first).
        #[arg(long, default_value = "./bench-mr")]
        dir: PathBuf,
        /// Text to generate, MiB.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Worker processes.
        #[arg(long, default_value_t = 2)]
        workers: u64,
        /// Reduce partitions.
        #[arg(long, default_value_t = 8)]
        reduce: u32,
    },
    /// A live shard move on local nodes, measured: one shard filled to
    /// --shard-mib MiB moves between two replica groups (1 -> 2, 2 -> 1,
    /// ...) while writers write to it and to the other shards. Per round:
    /// move rate, latency of the moving shard's writes and the longest gap
    /// of one writer, other shards' throughput during the move against
    /// just before it; then medians, and every key read back.
    BenchMove {
        /// Working directory (wiped first).
        #[arg(long, default_value = "./bench-move")]
        dir: PathBuf,
        /// Nodes: 6 (group 1 and the controller on nodes 1-3, group 2 on
        /// 4-6) or 3 (both groups on nodes 1-3).
        #[arg(long, default_value_t = 6)]
        nodes: u64,
        /// Size of the moving shard's values, MiB.
        #[arg(long, default_value_t = 1024)]
        shard_mib: u64,
        /// Size of each value the shard is filled with, KiB.
        #[arg(long, default_value_t = 64)]
        value_kib: u64,
        /// Moves measured.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Closed-loop writers to the moving shard, and as many to the
        /// other shards.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// An extra argument for every `shoal node` started (repeatable).
        #[arg(long, allow_hyphen_values = true)]
        node_arg: Vec<String>,
    },
    /// Ask every node for its status: one JSON line per node,
    /// {"id","role","term","leader","commit","applied","pid"} (the status
    /// file's schema) or {"id","error"}; exits 4 if no node answered.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Back up a running cluster into a new directory (admin certificate):
    /// every group the nodes report, all at one point in time (with
    /// several groups, each leader holds writes back for the moment it
    /// takes to pin every group's export; every write acknowledged before
    /// the command started is in it), fetched in checksummed chunks.
    /// Prints one JSON line.
    Backup {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// The backup directory to create (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Longest one group's export may take, in milliseconds.
        #[arg(long, default_value_t = 600_000)]
        export_timeout_ms: u64,
    },
    /// Create a new data directory from a backup (`Db::backup` or
    /// `shoal backup`): for an embedded `Db` (default), or with --node-id
    /// for `shoal node`. Verifies every file first; a bad backup creates
    /// nothing. Prints one JSON line: the groups restored and their applied
    /// index.
    Restore {
        /// The backup directory.
        backup: PathBuf,
        /// The data directory to create (must not exist).
        #[arg(long)]
        data: PathBuf,
        /// Restore for `shoal node --id N`: the groups with N among their
        /// voters. Without it: the KV group, for `Db::open`.
        #[arg(long)]
        node_id: Option<u64>,
        /// With --node-id: the new cluster's members (the `--peers` list of
        /// `shoal node`), which become every restored group's voters.
        /// Without it each group keeps the voters it had (a sharded
        /// cluster restored onto nodes of the same ids).
        #[arg(long, requires = "node_id")]
        peers: Option<String>,
    },
    /// (Crash workload) append and apply until killed; prints `ack N`.
    #[command(hide = true)]
    EngineWriter {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        stop_after: Option<u64>,
    },
    /// (Crash workload) open a `Db` and write from --threads threads until
    /// killed; prints `ack t i` once thread t's i-th write returned.
    #[command(hide = true)]
    DbWriter {
        #[arg(long)]
        dir: PathBuf,
        /// Concurrent writer threads.
        #[arg(long, default_value_t = 1)]
        threads: u64,
        /// Open with `Durability::GroupCommit` of this window instead of
        /// syncing every write.
        #[arg(long)]
        group_commit_ms: Option<u64>,
    },
    /// (Crash workload) install snapshots until killed; prints `installed W`.
    #[command(hide = true)]
    EngineInstaller {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        rounds: Option<u64>,
    },
}

/// How a client finds and authenticates to the cluster.
#[derive(Args)]
struct ClusterArgs {
    /// The nodes: 1=ADDR,2=ADDR,...
    #[arg(long, env = "SHOAL_CLUSTER")]
    cluster: String,
    /// Certificate directory (from `shoal certs init`).
    #[arg(long, env = "SHOAL_TLS")]
    tls: PathBuf,
    /// Client certificate to use (client-<name>.pem).
    #[arg(long, default_value = cluster::CLIENT_NAME_DEFAULT)]
    name: String,
    /// Deadline of one operation, retries included, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// A sharded cluster: its controller group's nodes (e.g. 1,2,3); keys
    /// are routed by the configuration it publishes.
    #[arg(long, value_delimiter = ',')]
    controller: Option<Vec<u64>>,
}

#[derive(Subcommand)]
enum MapreduceCmd {
    /// Plan a job over the keys under --input and coordinate it to the end
    /// (a progress bar on stderr, a JSON summary on stdout).
    Run {
        /// Application: wc, indexer, grep:PATTERN (or a lab test app).
        #[arg(long)]
        app: String,
        /// Input: every key with this prefix (or, with --input-end, the
        /// keys in [INPUT, INPUT_END)).
        #[arg(long)]
        input: String,
        /// Exclusive end of the input range (instead of a prefix).
        #[arg(long)]
        input_end: Option<String>,
        /// Output keys: this prefix followed by each intermediate key.
        #[arg(long)]
        output: String,
        /// Reduce partitions.
        #[arg(long, default_value_t = 10)]
        reduce: u32,
        /// The job's name (its record's key); default: the output prefix.
        #[arg(long)]
        job: Option<String>,
        /// Take over the stored job --job (after its coordinator died).
        #[arg(long)]
        resume: bool,
        /// The coordinator's node id (certificate node-<id>.pem).
        #[arg(long, default_value_t = 100)]
        id: u64,
        /// Where the coordinator listens.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Scratch directory (also where spawned workers keep their runs).
        #[arg(long, default_value = "./mapreduce-data")]
        dir: PathBuf,
        /// Target input bytes per map task.
        #[arg(long, default_value_t = shoal_shard::mapreduce::runtime::SPLIT_BYTES_DEFAULT)]
        split_bytes: u64,
        /// Workers also write mr-out-<partition> files ("%v %v\n" lines).
        #[arg(long)]
        files: bool,
        /// A task not finished this long is handed out again.
        #[arg(long, default_value_t = shoal_shard::mapreduce::TASK_LEASE_MS_DEFAULT)]
        task_lease_ms: u64,
        /// Also start this many `shoal mapreduce worker` processes, with
        /// node ids --id + 1, + 2, ...
        #[arg(long, default_value_t = 0)]
        workers: u64,
    },
    /// Work for a coordinator until its job is done.
    Worker {
        /// This worker's node id (certificate node-<id>.pem).
        #[arg(long)]
        id: u64,
        /// Where it listens (reducers fetch map output here).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The coordinator: ID@HOST:PORT.
        #[arg(long)]
        coordinator: String,
        /// Map output and received files.
        #[arg(long, default_value = "./mapreduce-worker")]
        dir: PathBuf,
        /// Where mr-out-<partition> files go (jobs run with --files).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// Exit after the coordinator was unreachable this long.
        #[arg(long, default_value_t = shoal::mapreduce::WORKER_COORDINATOR_SILENCE_MS_DEFAULT)]
        coordinator_silence_ms: u64,
    },
    /// Print a stored job's progress as one JSON line.
    Status {
        /// The job's name.
        #[arg(long)]
        job: String,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Print the membership as the group's nodes see it: one JSON line per
    /// member, {"id","role","voter","matched"}.
    List,
    /// Add node ID at ADDR (HOST:PORT or IP:PORT, resolved here; a
    /// `shoal node --join` there): it joins
    /// as a learner, catches up (from a snapshot if the log was cut), and
    /// is then promoted to voter (unless --learner).
    Add {
        /// The new member's id.
        id: u64,
        /// Its address.
        addr: String,
        /// Leave it a learner.
        #[arg(long)]
        learner: bool,
    },
    /// Promote a caught-up learner to voter.
    Promote {
        /// The learner's id.
        id: u64,
    },
    /// Remove a member (to remove the leader, it first hands leadership
    /// to another voter).
    Remove {
        /// The member's id.
        id: u64,
    },
}

#[derive(Subcommand)]
enum ShardCmd {
    /// Post the first configuration: SHARDS shards, all on GROUP=NODES
    /// (whose nodes start hosting it).
    Init {
        /// Shard count, fixed for the cluster's life.
        #[arg(long, default_value_t = shoal_shard::controller::SHARDS_DEFAULT)]
        shards: u32,
        /// The first replica group: GROUP=NODE,NODE,...
        #[arg(long)]
        group: String,
    },
    /// A new replica group GROUP=NODES joins; shards rebalance onto it.
    Join {
        /// GROUP=NODE,NODE,...
        #[arg(long)]
        group: String,
    },
    /// A replica group leaves; its shards move to the others first.
    Leave {
        /// The group.
        #[arg(long)]
        group: u64,
    },
    /// Move one shard to a group.
    Move {
        /// The shard.
        #[arg(long)]
        shard: u32,
        /// The group it moves to.
        #[arg(long)]
        to: u64,
    },
    /// Even the shards out over the groups, moving as few as possible.
    Rebalance,
    /// Print the configuration, then one JSON line per shard:
    /// {"shard","group","leader","keys","bytes"} (the size as the group's
    /// leader holds it).
    Status,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a cluster CA and certificates for the given nodes and clients.
    Init {
        /// Directory to write (must not hold a CA yet): what nodes and
        /// clients read.
        #[arg(long)]
        out: PathBuf,
        /// Where the CA's private key goes (with a copy of ca.pem), apart
        /// from --out; default: <out>-ca next to it.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Node ids, comma-separated (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Client names, comma-separated (`admin` may set fault filters).
        #[arg(long, value_delimiter = ',', default_value = "client,admin")]
        clients: Vec<String>,
    },
    /// List the certificates of a directory: one JSON line each,
    /// {"file","peer","key"}.
    List {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue certificates for more nodes (e.g. MapReduce workers) with the
    /// CA of an existing directory.
    AddNode {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
        /// The directory holding ca-key.pem; default: <dir>-ca if it holds
        /// one, else <dir>.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Node ids.
        #[arg(required = true, value_delimiter = ',')]
        ids: Vec<u64>,
    },
    /// Issue certificates for more clients with the CA of an existing
    /// directory.
    AddClient {
        /// The certificate directory.
        #[arg(long)]
        dir: PathBuf,
        /// The directory holding ca-key.pem; default: <dir>-ca if it holds
        /// one, else <dir>.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Client names (`[a-z0-9-]`).
        #[arg(required = true, value_delimiter = ',')]
        names: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // A node logs at info unless RUST_LOG says otherwise; the tools, whose
    // output is on stdout, only report errors by default.
    let default_level = match cli.command {
        Cmd::Node { .. } => tracing_subscriber::filter::LevelFilter::INFO,
        _ => tracing_subscriber::filter::LevelFilter::ERROR,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(default_level.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Cmd::Demo {
            engine: false, dir, ..
        } => cluster_demo::run(&dir),
        Cmd::Demo {
            engine: true,
            dir,
            kills,
            seed,
        } => demo(&dir, kills, seed),
        Cmd::Certs {
            command:
                CertsCmd::Init {
                    out,
                    ca_dir,
                    nodes,
                    clients,
                },
        } => {
            let ca_dir = ca_dir.unwrap_or_else(|| default_ca_dir(&out));
            shoal::certs::init_with_ca_dir(&out, &ca_dir, &nodes, &clients)?;
            println!(
                "wrote a cluster CA and certificates for nodes {nodes:?} and clients {clients:?} to {}; the CA's key is in {} (keep it off the nodes)",
                out.display(),
                ca_dir.display()
            );
            Ok(())
        }
        Cmd::Certs {
            command: CertsCmd::List { dir },
        } => {
            for entry in shoal::certs::list(&dir)? {
                println!("{}", serde_json::to_string(&entry)?);
            }
            Ok(())
        }
        Cmd::Certs {
            command: CertsCmd::AddNode { dir, ca_dir, ids },
        } => {
            let ca_dir = ca_dir.unwrap_or_else(|| existing_ca_dir(&dir));
            shoal::certs::add_with_ca_dir(&dir, &ca_dir, &ids, &[])?;
            println!("wrote certificates for nodes {ids:?} to {}", dir.display());
            Ok(())
        }
        Cmd::Certs {
            command: CertsCmd::AddClient { dir, ca_dir, names },
        } => {
            let ca_dir = ca_dir.unwrap_or_else(|| existing_ca_dir(&dir));
            shoal::certs::add_with_ca_dir(&dir, &ca_dir, &[], &names)?;
            println!(
                "wrote certificates for clients {names:?} to {}",
                dir.display()
            );
            Ok(())
        }
        Cmd::Node {
            id,
            data,
            listen,
            peers,
            tls,
            max_raft_state_bytes,
            io_timeout_ms,
            bulk_mb_per_sec_max,
            worker_threads,
            fault_injection,
            controller,
            status_addr,
            join,
        } => {
            let options = NodeOptions {
                id,
                data_dir: data,
                listen,
                join,
                peers: cluster::parse_members(&peers)?,
                tls_dir: tls,
                max_raft_state_bytes: (max_raft_state_bytes > 0).then_some(max_raft_state_bytes),
                fault_injection,
                io_timeout_ms,
                bulk_send_bytes_per_sec_max: bulk_mb_per_sec_max.map(|mb| mb * 1_000_000),
                worker_threads,
                controller,
            };
            let ready = |addr| {
                println!("node {id} listening on {addr}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            };
            match status_addr {
                Some(addr) => {
                    let listener = shoal::status::bind(addr)?;
                    let metrics = shoal::status::install_recorder()?;
                    cluster::run_node_with(options, ready, move |probe| {
                        shoal::status::serve(listener, metrics, probe)
                    })?
                }
                None => cluster::run_node(options, ready)?,
            }
            Ok(())
        }
        Cmd::Client { cluster } => run_client(&cluster),
        Cmd::Backup {
            cluster,
            out,
            export_timeout_ms,
        } => backup_cluster(&cluster, &out, Duration::from_millis(export_timeout_ms)),
        Cmd::Restore {
            backup,
            data,
            node_id,
            peers,
        } => restore(&backup, &data, node_id, peers.as_deref()),
        Cmd::Load {
            cluster,
            prefix,
            files,
        } => with_client(&cluster, |client| async move {
            let summary = shoal::mapreduce::load(&client, &prefix, &files).await?;
            let mut json = serde_json::to_value(summary)?;
            json["ok"] = true.into();
            println!("{json}");
            Ok(())
        }),
        Cmd::Mapreduce { cluster, command } => mapreduce(&cluster, command),
        Cmd::BenchMapreduce {
            dir,
            mib,
            rounds,
            workers,
            reduce,
        } => {
            shoal::mrbench::run(&shoal::mrbench::MrBenchOptions {
                exe: std::env::current_exe()?,
                dir,
                mib,
                rounds,
                workers,
                reduce,
            })?;
            Ok(())
        }
        Cmd::BenchMove {
            dir,
            nodes,
            shard_mib,
            value_kib,
            rounds,
            writers,
            node_arg,
        } => {
            shoal::movebench::run(&shoal::movebench::MoveBenchOptions {
                exe: std::env::current_exe()?,
                dir,
                nodes,
                shard_mib,
                value_kib,
                rounds,
                writers,
                node_args: node_arg,
            })?;
            Ok(())
        }
        Cmd::Shard { cluster, command } => shard_admin(&cluster, command),
        Cmd::Member {
            cluster,
            group,
            command,
        } => member_admin(&cluster, group, command),
        Cmd::Get { cluster, key } => one_shot(&cluster, jsonl::Request::Get { key }),
        Cmd::Put {
            cluster,
            key,
            value,
            if_version,
        } => one_shot(
            &cluster,
            jsonl::Request::Put {
                key,
                value,
                if_version,
            },
        ),
        Cmd::Append {
            cluster,
            key,
            value,
        } => one_shot(&cluster, jsonl::Request::Append { key, value }),
        Cmd::Del { cluster, key } => one_shot(&cluster, jsonl::Request::Del { key }),
        Cmd::Scan {
            cluster,
            start,
            end,
            limit,
        } => one_shot(&cluster, jsonl::Request::Scan { start, end, limit }),
        Cmd::Bench {
            systems,
            dir,
            clients,
            get_clients,
            warmup_secs,
            measure_secs,
            keys,
            value_bytes,
            conns,
            cluster,
            tls,
            json,
            node_arg,
            groups,
            embedded,
            threads,
            get_threads,
            rounds,
        } => {
            if embedded {
                return embedded_bench(EmbeddedBenchArgs {
                    systems,
                    dir,
                    threads,
                    get_threads,
                    keys,
                    measure_secs,
                    rounds,
                    json,
                });
            }
            let systems = systems
                .iter()
                .map(|s| match s.as_str() {
                    "shoal" => Ok(bench::System::Shoal),
                    "etcd" => Ok(bench::System::Etcd),
                    other => bail!("unknown system {other:?} (want shoal or etcd)"),
                })
                .collect::<Result<Vec<_>>>()?;
            let external = match (cluster, tls) {
                (Some(c), Some(t)) => Some((cluster::parse_members(&c)?, t)),
                _ => None,
            };
            let options = bench::RunOptions {
                exe: std::env::current_exe()?,
                dir,
                systems,
                external,
                node_args: node_arg,
                groups,
                bench: bench::BenchOptions {
                    put_clients: clients,
                    get_clients,
                    warmup: std::time::Duration::from_secs_f64(warmup_secs),
                    measure: std::time::Duration::from_secs_f64(measure_secs),
                    keys,
                    value_bytes,
                    conns,
                    ..bench::BenchOptions::default()
                },
            };
            let results = bench::run(&options)?;
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&results)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Cmd::Status { cluster } => status(&cluster),
        Cmd::DbWriter {
            dir,
            threads,
            group_commit_ms,
        } => db_writer(&dir, threads, group_commit_ms),
        Cmd::EngineWriter {
            dir,
            seed,
            stop_after,
        } => crashtest::run_writer(&dir, seed, stop_after),
        Cmd::EngineInstaller { dir, rounds } => crashtest::run_installer(&dir, rounds),
    }
}

/// `<dir>-ca`, beside `dir`: where `certs init` keeps the CA's key.
fn default_ca_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push("-ca");
    dir.with_file_name(name)
}

/// Where `certs add-*` finds the CA's key: `<dir>-ca` if it holds one
/// (`certs init`'s default), else `dir` (a directory made before the key
/// was kept apart, or by `shoal::certs::init`).
fn existing_ca_dir(dir: &Path) -> PathBuf {
    let apart = default_ca_dir(dir);
    if apart.join("ca-key.pem").exists() {
        apart
    } else {
        dir.to_path_buf()
    }
}

fn connect(args: &ClusterArgs) -> Result<(tokio::runtime::Runtime, cluster::Client)> {
    connect_as(args, &args.name)
}

/// [`connect`] with the certificate `client-<name>` whatever `--name` says.
fn connect_as(
    args: &ClusterArgs,
    name: &str,
) -> Result<(tokio::runtime::Runtime, cluster::Client)> {
    connect_to(args, name, &cluster::parse_members(&args.cluster)?)
}

/// [`connect_as`] to `members` rather than `--cluster`'s.
fn connect_to(
    args: &ClusterArgs,
    name: &str,
    members: &[(u64, std::net::SocketAddr)],
) -> Result<(tokio::runtime::Runtime, cluster::Client)> {
    let options = ClientOptions {
        name: name.to_string(),
        op_deadline: std::time::Duration::from_millis(args.timeout_ms),
        controller: args.controller.clone(),
        ..ClientOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client =
        runtime.block_on(async { cluster::Client::connect_with(members, &args.tls, options) })?;
    Ok((runtime, client))
}

/// `shoal client`: JSON lines in, JSON lines out, until end of input.
fn run_client(args: &ClusterArgs) -> Result<()> {
    use std::io::Write;
    let (runtime, client) = connect(args)?;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match jsonl::parse(&line) {
            Ok(request) => runtime.block_on(jsonl::execute(&client, request)),
            Err(answer) => answer,
        };
        writeln!(stdout, "{}", jsonl::render(&answer))?;
        stdout.flush()?;
    }
    runtime.block_on(client.close());
    Ok(())
}

/// A one-shot command: prints the answer; exits with
/// [`jsonl::exit_code`] if it is not ok.
fn one_shot(args: &ClusterArgs, request: jsonl::Request) -> Result<()> {
    let (runtime, client) = connect(args)?;
    let answer = runtime.block_on(jsonl::execute(&client, request));
    runtime.block_on(client.close());
    println!("{}", jsonl::render(&answer));
    match jsonl::exit_code(&answer) {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}

/// Most attempts `shoal backup` makes at fencing every group at once
/// (one fails if a fence lapses: a leader changed, or a group took too
/// long to fence).
const BACKUP_FENCE_ATTEMPTS_MAX: u32 = 5;

/// How long each group's fence may hold writes back, in milliseconds: an
/// upper bound in case this command dies; normally a fence ends once every
/// group's export view is taken.
const BACKUP_FENCE_HOLD_MS: u64 = 5_000;

/// `shoal backup`: every group of a running cluster, at one point in time.
///
/// A single group's export is one point in time by itself. With several,
/// each group's leader fences the group (it proposes no writes, which
/// clients retry) and takes its export's view once its whole log is
/// applied; when every group's view is taken, the fences end, each
/// reporting whether it held throughout. So no write is applied in any
/// group between the views, and a write acknowledged before another began
/// is in the backup whenever the other is: the groups form one consistent
/// cut. A fence that lapsed (a leader change) makes the attempt start over.
/// Then each export's files are fetched in checksummed chunks.
fn backup_cluster(args: &ClusterArgs, out: &Path, export_timeout: Duration) -> Result<()> {
    let members = cluster::parse_members(&args.cluster)?;
    // Backups are admin requests (they read every key and session).
    let (runtime, client) = connect_as(args, shoal_net::ADMIN_CLIENT_NAME)?;
    let deadline = std::time::Instant::now() + Duration::from_millis(args.timeout_ms);
    let result = runtime.block_on(async {
        let mut writer = shoal::engine::backup::BackupWriter::create(out)?;
        let reports = node_reports(&client, &members).await;
        let groups: Vec<u64> = reports
            .iter()
            .flat_map(|r| r.groups.iter().map(|g| g.group))
            .collect::<std::collections::BTreeSet<u64>>()
            .into_iter()
            .collect();
        anyhow::ensure!(!groups.is_empty(), "no node answered with a group");
        let leaders = group_leaders(&reports);
        // One group is one point in time by itself: no fence, no pause.
        let pinned = match groups[..] {
            [group] => {
                let target = (group, leaders.get(&group).copied());
                vec![export_group(&client, &members, target, export_timeout, deadline).await?]
            }
            _ => fence_every_group(&client, &members, &groups, &leaders, deadline).await?,
        };
        let mut lines = Vec::new();
        let mut fetched_all = Ok(());
        for &(group, node, id, applied_index) in &pinned {
            if fetched_all.is_ok() {
                fetched_all = fetch_group(&client, &mut writer, (group, node, id), export_timeout)
                    .await
                    .map(|backup| {
                        debug_assert_eq!(backup.applied.index, applied_index);
                        lines.push(serde_json::json!({
                            "group": group,
                            "node": node,
                            "applied_index": backup.applied.index,
                            "applied_term": backup.applied.term,
                            "bytes": backup.size_bytes(),
                        }));
                    });
            }
            if let Err(e) = client.backup_release(shoal_net::NodeId(node), id).await {
                tracing::warn!(node, id, error = %e, "could not release the export (it expires)");
            }
        }
        fetched_all?;
        writer.finish()?;
        Ok(lines)
    });
    runtime.block_on(client.close());
    let groups = result?;
    println!(
        "{}",
        serde_json::json!({ "ok": true, "out": out.display().to_string(), "groups": groups })
    );
    Ok(())
}

/// Fences and exports every group of `groups` at one point in time (see
/// [`backup_cluster`]): (group, node, export id, applied index) each.
async fn fence_every_group(
    client: &cluster::Client,
    members: &[(u64, std::net::SocketAddr)],
    groups: &[u64],
    leaders: &BTreeMap<u64, u64>,
    deadline: std::time::Instant,
) -> Result<Vec<(u64, u64, u64, u64)>> {
    // One group may take this long to fence before the attempt gives up,
    // well inside the fences already held.
    let group_wait = Duration::from_millis(BACKUP_FENCE_HOLD_MS / 2);
    for attempt in 1..=BACKUP_FENCE_ATTEMPTS_MAX {
        let mut pinned = Vec::new();
        let mut failure = None;
        for &group in groups {
            // The leaders of the first sweep are tried first, in the
            // first attempt only (a later one follows a leader change).
            let first = leaders.get(&group).copied().filter(|_| attempt == 1);
            match fence_group(
                client,
                members,
                (group, first),
                group_wait.min(deadline.saturating_duration_since(std::time::Instant::now())),
            )
            .await
            {
                Ok((node, id, applied)) => pinned.push((group, node, id, applied)),
                Err(e) => {
                    failure = Some(e.context(format!("fencing group {group}")));
                    break;
                }
            }
        }
        let mut held = failure.is_none();
        for &(group, node, id, _) in &pinned {
            match client
                .backup_unfence(shoal_net::NodeId(node), group, id)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    held = false;
                    tracing::info!(group, node, "a backup fence lapsed; starting over");
                }
                Err(e) => {
                    held = false;
                    tracing::info!(group, node, error = %e, "ending a backup fence failed");
                }
            }
        }
        if held {
            return Ok(pinned);
        }
        for &(_, node, id, _) in &pinned {
            let _ = client.backup_release(shoal_net::NodeId(node), id).await;
        }
        if attempt == BACKUP_FENCE_ATTEMPTS_MAX || std::time::Instant::now() >= deadline {
            return Err(failure.unwrap_or_else(|| anyhow::anyhow!("a fence lapsed"))).context(
                format!("no consistent cut of every group after {attempt} attempts"),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!("the last attempt returns")
}

/// Exports `group` at its leader without a fence (a backup of one group),
/// retrying until `deadline`, `first` tried first: (group, node, export id,
/// applied index).
async fn export_group(
    client: &cluster::Client,
    members: &[(u64, std::net::SocketAddr)],
    (group, first): (u64, Option<u64>),
    export_timeout: Duration,
    deadline: std::time::Instant,
) -> Result<(u64, u64, u64, u64)> {
    let step = |node| client.backup_export(shoal_net::NodeId(node), group, export_timeout);
    let pause = Duration::from_millis(50);
    at_group_leader(
        client,
        members,
        (group, first),
        (deadline, pause),
        "the export",
        step,
    )
    .await
    .map(|(node, (id, backup))| (group, node, id, backup.applied.index))
    .map_err(|e| e.context(format!("exporting group {group}")))
}

/// Fences `group` at its leader and starts its export, retrying for up to
/// `wait`, `first` tried first: (node, export id, applied index).
async fn fence_group(
    client: &cluster::Client,
    members: &[(u64, std::net::SocketAddr)],
    (group, first): (u64, Option<u64>),
    wait: Duration,
) -> Result<(u64, u64, u64)> {
    let step =
        |node| client.backup_fenced_export(shoal_net::NodeId(node), group, BACKUP_FENCE_HOLD_MS);
    let until = (std::time::Instant::now() + wait, Duration::from_millis(20));
    at_group_leader(client, members, (group, first), until, "the fence", step)
        .await
        .map(|(node, (id, applied))| (node, id, applied))
}

/// Runs `step` at `group`'s leader, retrying every `pause` (a leader
/// change, a leader still catching up) until `until`: the leader and its
/// answer. `first` is the leader to try before asking every node (from a
/// status sweep made already).
async fn at_group_leader<T, Fut>(
    client: &cluster::Client,
    members: &[(u64, std::net::SocketAddr)],
    (group, mut first): (u64, Option<u64>),
    (until, pause): (std::time::Instant, Duration),
    what: &str,
    step: impl Fn(u64) -> Fut,
) -> Result<(u64, T)>
where
    Fut: std::future::Future<Output = Result<T, shoal::shard::AdminError>>,
{
    loop {
        let leader = match first.take() {
            Some(node) => Some(node),
            None => group_leaders(&node_reports(client, members).await)
                .get(&group)
                .copied(),
        };
        let attempt = match leader {
            Some(node) => step(node)
                .await
                .map(|answer| (node, answer))
                .map_err(anyhow::Error::from),
            None => Err(anyhow::anyhow!("group {group} has no leader")),
        };
        match attempt {
            Ok(found) => return Ok(found),
            Err(e) if std::time::Instant::now() < until => {
                tracing::debug!(group, error = %e, "retrying {what}");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Each group's leader in `reports`: the node that leads it in the highest
/// term any reports.
fn group_leaders(reports: &[shoal::shard::protocol::NodeReport]) -> BTreeMap<u64, u64> {
    let mut leaders: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for r in reports {
        for g in &r.groups {
            let newer = leaders.get(&g.group).is_none_or(|&(_, term)| g.term > term);
            if g.role == shoal::consensus::Role::Leader && newer {
                leaders.insert(g.group, (r.id, g.term));
            }
        }
    }
    leaders
        .into_iter()
        .map(|(group, (node, _))| (group, node))
        .collect()
}

/// Waits (up to `timeout`) for export `id` of `group` on `node` to be
/// written, then fetches its files into the backup.
async fn fetch_group(
    client: &cluster::Client,
    writer: &mut shoal::engine::backup::BackupWriter,
    (group, node, id): (u64, u64, u64),
    timeout: Duration,
) -> Result<shoal::engine::GroupBackup> {
    use shoal_shard::client::AdminError;
    use shoal_shard::protocol::BackupRefusal;
    let until = std::time::Instant::now() + timeout;
    let backup = loop {
        match client.backup_files(shoal_net::NodeId(node), id).await {
            Ok(backup) => break backup,
            Err(AdminError::BackupRefused(BackupRefusal::Running))
                if std::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!("exporting group {group}")))
            }
        }
    };
    fetch_backup_files(client, node, id, &backup, &writer.group_dir(group)?).await?;
    writer.add_received(backup.clone())?;
    Ok(backup)
}

/// Every member's status report that answered.
async fn node_reports(
    client: &cluster::Client,
    members: &[(u64, std::net::SocketAddr)],
) -> Vec<shoal::shard::protocol::NodeReport> {
    let mut reports = Vec::new();
    for &(id, _) in members {
        if let Ok(report) = client.node_status(shoal_net::NodeId(id)).await {
            reports.push(report);
        }
    }
    reports
}

/// Reads every file of export `id` from `node` into `dir`, in chunks.
async fn fetch_backup_files(
    client: &cluster::Client,
    node: u64,
    id: u64,
    backup: &shoal::engine::GroupBackup,
    dir: &Path,
) -> Result<()> {
    use std::io::Write;
    for f in &backup.files {
        let path = dir.join(&f.name);
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut offset = 0;
        loop {
            let chunk = client
                .backup_read(shoal_net::NodeId(node), id, &f.name, offset)
                .await
                .with_context(|| format!("reading {} from node {node}", f.name))?;
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            anyhow::ensure!(
                offset <= f.size_bytes,
                "node {node} sent more of {} than its {} bytes",
                f.name,
                f.size_bytes
            );
            file.write_all(&chunk)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `shoal restore`: a new data directory from a backup.
fn restore(backup: &Path, data: &Path, node_id: Option<u64>, peers: Option<&str>) -> Result<()> {
    let summary = match node_id {
        None => shoal::backup::restore_db(backup, data)?,
        Some(node) => {
            let voters = peers
                .map(cluster::parse_members)
                .transpose()?
                .map(|members| members.into_iter().map(|(id, _)| id).collect::<Vec<_>>());
            if let Some(voters) = voters.as_ref().filter(|v| !v.contains(&node)) {
                anyhow::bail!("--peers {voters:?} does not include --node-id {node}");
            }
            let options = shoal::engine::RestoreOptions {
                voters,
                node: Some(node),
                ..Default::default()
            };
            shoal::backup::restore_data_dir(backup, data, &options)?
        }
    };
    let groups: Vec<_> = summary
        .groups
        .iter()
        .map(|(group, applied, voters)| {
            serde_json::json!({
                "group": group,
                "applied_index": applied.index,
                "applied_term": applied.term,
                "voters": voters,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({ "ok": true, "data": data.display().to_string(), "groups": groups })
    );
    Ok(())
}

/// `shoal status`: every member's status RPC, one JSON line each.
fn status(args: &ClusterArgs) -> Result<()> {
    let (runtime, client) = connect(args)?;
    let mut answered = 0;
    for (id, _) in cluster::parse_members(&args.cluster)? {
        let line = match runtime.block_on(client.node_status(shoal_net::NodeId(id))) {
            Ok(report) => match cluster::NodeStatus::from_report(&report) {
                Some(status) => {
                    answered += 1;
                    serde_json::to_value(status)?
                }
                None => serde_json::json!({ "id": id, "error": "the node hosts no KV group" }),
            },
            Err(e) => serde_json::json!({ "id": id, "error": e.to_string() }),
        };
        println!("{line}");
    }
    runtime.block_on(client.close());
    if answered == 0 {
        std::process::exit(jsonl::EXIT_UNAVAILABLE);
    }
    Ok(())
}

/// `shoal member ...`: prints the membership after the change as one JSON
/// line ({"ok","voters","learners"}); `list`: one line per member.
fn member_admin(args: &ClusterArgs, group: u64, command: MemberCmd) -> Result<()> {
    use shoal_shard::protocol::MemberChange;
    let mut members = cluster::parse_members(&args.cluster)?;
    let nodes: Vec<shoal_net::NodeId> = members
        .iter()
        .map(|&(id, _)| shoal_net::NodeId(id))
        .collect();
    // The node being added is asked to host the group first: reach it at
    // the address it is added with, whether or not --cluster names it.
    let added = match &command {
        MemberCmd::Add { id, addr, .. } => {
            let addr =
                cluster::resolve_addr(addr).with_context(|| format!("the address of node {id}"))?;
            members.retain(|&(m, _)| m != *id);
            members.push((*id, addr));
            Some(addr)
        }
        _ => None,
    };
    let (runtime, client) = connect_to(args, &args.name, &members)?;
    let result = runtime.block_on(async {
        let inner: &shoal_shard::Client<_> = &client;
        let change = |change| inner.change_members(group, change, &nodes);
        let removed = match &command {
            MemberCmd::Remove { id } => Some(*id),
            _ => None,
        };
        let (voters, learners) = match command {
            MemberCmd::List => {
                for line in cluster::member_lines(inner, group, &nodes).await? {
                    println!("{}", serde_json::to_string(&line)?);
                }
                return anyhow::Ok(());
            }
            MemberCmd::Add { id, learner, .. } => {
                let addr = added.expect("resolved above");
                // The new node hosts the group with no membership first (a
                // no-op for a node started with --join on its static group).
                inner
                    .host_group(shoal_net::NodeId(id), group, Vec::new())
                    .await
                    .with_context(|| format!("node {id} to host group {group} as a joiner"))?;
                let (voters, learners) = change(MemberChange::AddLearner {
                    node: id,
                    addr: addr.to_string(),
                })
                .await?;
                if learner {
                    (voters, learners)
                } else {
                    eprintln!("node {id} added as a learner; promoting it once caught up");
                    change(MemberChange::Promote { node: id }).await?
                }
            }
            MemberCmd::Promote { id } => change(MemberChange::Promote { node: id }).await?,
            MemberCmd::Remove { id } => change(MemberChange::Remove { node: id }).await?,
        };
        // A sharded cluster routes by the configuration: write the group's
        // members into it (a rerun of the command finishes this too).
        let mut config = serde_json::Value::Null;
        let mut dropped = serde_json::Value::Null;
        let sharded = args.controller.as_ref();
        if let Some(controller) = sharded.filter(|_| group != shoal_shard::node::CONTROLLER_GROUP) {
            let admin = connect_admin(args, &members, controller)?;
            let all: Vec<u64> = voters.iter().chain(&learners).copied().collect();
            let written = admin.set_members(group, &all).await;
            admin.close().await;
            if let Some(written) =
                written.context("writing the group's members into the shard configuration")?
            {
                config = written.num.into();
            }
            // A removed member's replica is a stale copy: drop it (the
            // group's replicas are hosted at runtime). Best effort: a node
            // that is down keeps it until the command is run again.
            if let Some(node) = removed {
                let result = inner.drop_removed(shoal_net::NodeId(node), group).await;
                if let Err(e) = &result {
                    eprintln!(
                        "node {node} still holds a replica of group {group} ({e}); \
                         run the removal again once it is up"
                    );
                }
                dropped = result.is_ok().into();
            }
        }
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "voters": voters,
                "learners": learners,
                "config": config,
                "dropped": dropped,
            })
        );
        anyhow::Ok(())
    });
    runtime.block_on(client.close());
    // The exit codes of the one-shot commands: refused 2, unavailable 4.
    if let Err(e) = &result {
        use shoal_shard::client::MemberError;
        let code = match e.downcast_ref::<MemberError>() {
            Some(MemberError::Refused(_) | MemberError::Denied(_)) => jsonl::EXIT_BAD_INPUT,
            Some(MemberError::Unavailable(_)) => jsonl::EXIT_UNAVAILABLE,
            _ => jsonl::EXIT_FAILED,
        };
        eprintln!("Error: {e:#}");
        println!(
            "{}",
            serde_json::json!({ "ok": false, "error": format!("{e:#}") })
        );
        std::process::exit(code);
    }
    result
}

/// The shard admin of the cluster `members` whose controller group is on
/// `controller`, with `args`' certificates and operation deadline.
fn connect_admin(
    args: &ClusterArgs,
    members: &[(u64, std::net::SocketAddr)],
    controller: &[u64],
) -> Result<shoal::sharding::Admin> {
    shoal::sharding::Admin::connect(
        members,
        controller,
        &args.tls,
        Duration::from_millis(args.timeout_ms),
    )
}

/// `shoal shard ...`: one admin operation; prints the resulting
/// configuration as one JSON line (`status`: then one line per shard).
fn shard_admin(args: &ClusterArgs, command: ShardCmd) -> Result<()> {
    let members = cluster::parse_members(&args.cluster)?;
    let Some(controller) = &args.controller else {
        anyhow::bail!("--controller is required: the controller group's nodes");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = connect_admin(args, &members, controller)?;
        let result = async {
            let config = match command {
                ShardCmd::Init { shards, group } => {
                    let (group, nodes) = shoal::sharding::parse_group(&group)?;
                    admin.init(shards, group, &nodes).await?
                }
                ShardCmd::Join { group } => {
                    let (group, nodes) = shoal::sharding::parse_group(&group)?;
                    admin.join(group, &nodes).await?
                }
                ShardCmd::Leave { group } => admin.leave(group).await?,
                ShardCmd::Move { shard, to } => admin.move_shard(shard, to).await?,
                ShardCmd::Rebalance => admin.rebalance().await?,
                ShardCmd::Status => {
                    let config = admin.query().await?;
                    println!("{}", serde_json::to_string(&config)?);
                    for line in admin.shard_lines(&config).await {
                        println!("{}", serde_json::to_string(&line)?);
                    }
                    return Ok(());
                }
            };
            println!("{}", serde_json::to_string(&config)?);
            anyhow::Ok(())
        }
        .await;
        admin.close().await;
        result
    })
}

/// The options of `shoal bench --embedded`.
struct EmbeddedBenchArgs {
    systems: Vec<String>,
    dir: PathBuf,
    threads: Vec<usize>,
    get_threads: usize,
    keys: u64,
    measure_secs: f64,
    rounds: u32,
    json: Option<PathBuf>,
}

/// `shoal bench --embedded`: the table of `shoal::embench`, one JSON line
/// per measurement on stderr and the summary (medians, ratios) on stdout.
fn embedded_bench(args: EmbeddedBenchArgs) -> Result<()> {
    use shoal::embench::{self, System};
    let mut options = embench::BenchOptions::new(&args.dir);
    // The cluster bench's default list means "not chosen".
    if args.systems != ["shoal", "etcd"] {
        options.systems = args
            .systems
            .iter()
            .map(|s| match s.as_str() {
                "shoal" => Ok(System::Shoal),
                "rocksdb" => Ok(System::RocksDb),
                "redb" => Ok(System::Redb),
                other => bail!("unknown system {other:?} (want shoal, rocksdb or redb)"),
            })
            .collect::<Result<Vec<_>>>()?;
    }
    options.put_threads = args.threads;
    options.get_threads = args.get_threads;
    options.get_keys = args.keys.max(1);
    options.cell = std::time::Duration::from_secs_f64(args.measure_secs);
    options.rounds = args.rounds.max(1);
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)?;
    }
    let cells = embench::run(&options, &mut |op, system, threads, round, rate| {
        eprintln!(
            "{}",
            serde_json::json!({"round": round, "op": op, "threads": threads,
                "system": system.name(), "ops_per_sec": rate.round()})
        );
    })?;
    let mut summary = Vec::new();
    for cell in &cells {
        let mut line = serde_json::json!({"op": cell.op, "threads": cell.threads});
        for system in &options.systems {
            line[format!("{}_ops_per_sec", system.name())] =
                serde_json::json!(cell.median(*system).map(f64::round));
        }
        for other in [System::RocksDb, System::Redb] {
            if let Some(ratio) = cell.ratio(other) {
                line[format!("shoal_vs_{}", other.name())] =
                    serde_json::json!((ratio * 1000.0).round() / 1000.0);
            }
        }
        println!("{line}");
        summary.push(line);
    }
    if let Some(path) = args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    std::fs::remove_dir_all(&args.dir).ok();
    Ok(())
}

/// `shoal db-writer`: `threads` threads write to one `Db` until killed.
/// Thread t's i-th write puts `k<t>-<i>` = `v<i>`, and every third is an
/// atomic batch that also puts `m<t>-<i>`; once it returned, the thread
/// prints `ack <t> <i>` (one line, written whole).
fn db_writer(dir: &Path, threads: u64, group_commit_ms: Option<u64>) -> Result<()> {
    let durability = match group_commit_ms {
        Some(ms) => shoal::Durability::GroupCommit {
            window: std::time::Duration::from_millis(ms),
        },
        None => shoal::Durability::Synced,
    };
    let db = shoal::Db::builder(dir).durability(durability).open()?;
    let stdout = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (db, stdout) = (&db, &stdout);
                scope.spawn(move || -> Result<()> {
                    use std::io::Write;
                    for i in 0u64.. {
                        if i % 3 == 2 {
                            let mut batch = shoal::WriteBatch::new();
                            batch
                                .put(format!("k{t}-{i}"), format!("v{i}"))
                                .put(format!("m{t}-{i}"), format!("v{i}"));
                            db.write(batch)?;
                        } else {
                            db.put(format!("k{t}-{i}"), format!("v{i}"))?;
                        }
                        let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
                        writeln!(out, "ack {t} {i}")?;
                        out.flush()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("writer thread")?;
        }
        Ok(())
    })
}

fn spawn_self(args: &[&str]) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    Process::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the writer")
}

/// Reads the child's lines until `stop(line)` is true; returns the lines seen.
fn read_until(child: &mut Child, mut stop: impl FnMut(&str) -> bool) -> Result<()> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if stop(&line?) {
            return Ok(());
        }
    }
    bail!("the writer exited before it was killed")
}

fn demo(dir: &Path, kills: u32, seed: u64) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let log_dir = dir.join("engine");
    let log_dir_arg = log_dir.display().to_string();
    println!("Shoal engine demo: a writer appends Raft log batches (synced) and applies them to the KV state machine;");
    println!("we SIGKILL it mid-write {kills} times, reopen the database each time, and check what survived.\n");
    let bar = indicatif::ProgressBar::new(u64::from(kills));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} kills  {msg}")
            .expect("static template"),
    );
    let mut acked = 0;
    let mut summary = Vec::new();
    for round in 0..kills {
        let target = acked + 2_000 + u64::from(round) * 750;
        let mut child = spawn_self(&[
            "engine-writer",
            "--dir",
            &log_dir_arg,
            "--seed",
            &seed.to_string(),
        ])?;
        read_until(&mut child, |line| {
            if let Some(n) = line
                .strip_prefix("ack ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                acked = n;
                bar.set_message(format!("acknowledged index {acked}"));
            }
            acked >= target
        })?;
        child.kill()?;
        child.wait()?;
        let check = crashtest::check_writer(&log_dir, seed, acked)?;
        bar.inc(1);
        summary.push(format!(
            "  kill {}: acknowledged {acked:>6}, log holds [{}, {}], applied {} -> consistent",
            round + 1,
            check.first_index,
            check.last_index,
            check.applied_index
        ));
        acked = check.last_index;
    }
    bar.finish_and_clear();
    for line in &summary {
        println!("{line}");
    }
    println!(
        "\nSnapshot install: killing an installer that alternates two SST snapshots of one shard."
    );
    let install_dir = dir.join("install");
    std::fs::create_dir_all(&install_dir)?;
    let install_arg = install_dir.display().to_string();
    for round in 0..3 {
        let mut child = spawn_self(&["engine-installer", "--dir", &install_arg])?;
        let mut installs = 0;
        read_until(&mut child, |line| {
            installs += u32::from(line.starts_with("installed"));
            installs > round
        })?;
        child.kill()?;
        child.wait()?;
        let check = crashtest::check_installer(&install_dir)?;
        let interrupted = if check.finished_interrupted_install {
            ", an interrupted install was finished on reopen"
        } else {
            ""
        };
        println!(
            "  kill {}: shard holds snapshot {} entirely{interrupted} (never a mix)",
            round + 1,
            check.template.map_or("none".into(), |w| w.to_string())
        );
    }
    println!("\nEvery acknowledged entry survived {kills} SIGKILLs; the state machine always equalled a replay of the log.");
    println!("Data is in {}.", dir.display());
    Ok(())
}

/// Runs `f` with a client of the cluster on a multi-threaded runtime, then
/// closes the client.
fn with_client<F, Fut>(args: &ClusterArgs, f: F) -> Result<()>
where
    F: FnOnce(cluster::Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let members = cluster::parse_members(&args.cluster)?;
    let options = ClientOptions {
        name: args.name.clone(),
        op_deadline: std::time::Duration::from_millis(args.timeout_ms),
        controller: args.controller.clone(),
        ..ClientOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = cluster::Client::connect_with(&members, &args.tls, options)?;
        let outcome = f(client.clone()).await;
        client.close().await;
        outcome
    })
}

/// `shoal mapreduce run | worker | status`.
fn mapreduce(args: &ClusterArgs, command: MapreduceCmd) -> Result<()> {
    use shoal::mapreduce as mr;
    use shoal_shard::mapreduce::{JobConfig, JobSpec, KeyRange};
    match command {
        MapreduceCmd::Run {
            app,
            input,
            input_end,
            output,
            reduce,
            job,
            resume,
            id,
            listen,
            dir,
            split_bytes,
            files,
            task_lease_ms,
            workers,
        } => {
            let range = match input_end {
                Some(end) => KeyRange::new(input.into_bytes(), end.into_bytes()),
                None => KeyRange::prefix(input.as_bytes()),
            };
            let name = job.unwrap_or_else(|| output.clone());
            let options = mr::RunOptions {
                job: shoal_shard::mapreduce::runtime::JobOptions {
                    name,
                    app,
                    spec: JobSpec {
                        input: range,
                        output_prefix: output.into_bytes(),
                        reduce_count: reduce,
                    },
                    config: JobConfig {
                        task_lease_ms,
                        ..JobConfig::default()
                    },
                    split_bytes,
                    write_files: files,
                },
                resume,
                id,
                listen,
                tls_dir: args.tls.clone(),
                dir: dir.clone(),
                progress_bar: true,
            };
            std::fs::create_dir_all(&dir)?;
            let children = std::sync::Mutex::new(Vec::new());
            let children_ref = &children;
            let spawned = with_client(args, |client| async move {
                let (progress, secs) = mr::run(&client, &options, |addr| {
                    eprintln!("coordinator {id} listening on {addr}");
                    for w in 1..=workers {
                        let worker_dir = dir.join(format!("worker-{}", id + w));
                        let spawned = Process::new(std::env::current_exe().expect("own path"))
                            .args(["mapreduce", "--cluster", &args.cluster, "--tls"])
                            .arg(&args.tls)
                            .args(["--name", &args.name])
                            .args(args.controller.as_ref().map(|c| {
                                let list: Vec<String> = c.iter().map(u64::to_string).collect();
                                format!("--controller={}", list.join(","))
                            }))
                            .args(["worker", "--id", &(id + w).to_string()])
                            .arg(format!("--coordinator={id}@{addr}"))
                            .arg("--dir")
                            .arg(&worker_dir)
                            .arg("--out-dir")
                            .arg(&dir)
                            .stdout(Stdio::null())
                            .spawn();
                        match spawned {
                            Ok(child) => children_ref.lock().expect("children").push(child),
                            Err(e) => eprintln!("could not start worker {}: {e}", id + w),
                        }
                    }
                })
                .await?;
                let mb = progress.bytes_read as f64 / 1e6;
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "maps": progress.maps,
                        "reduces": progress.reduces,
                        "attempts": progress.attempts,
                        "bytes_read": progress.bytes_read,
                        "times_ms": progress.times,
                        "secs": secs,
                        "mb_per_s": mb / secs.max(1e-9),
                    })
                );
                Ok(())
            });
            for mut child in children.into_inner().expect("children") {
                let _ = child.wait();
            }
            spawned
        }
        MapreduceCmd::Worker {
            id,
            listen,
            coordinator,
            dir,
            out_dir,
            coordinator_silence_ms,
        } => {
            let options = mr::WorkerRunOptions {
                id,
                listen,
                tls_dir: args.tls.clone(),
                coordinator: mr::parse_endpoint(&coordinator)?,
                dir,
                out_dir,
                coordinator_silence_ms,
            };
            with_client(args, |client| async move {
                let summary = mr::work(&client, &options).await?;
                eprintln!(
                    "worker {id} done: {} maps, {} reduces, {} failed attempts",
                    summary.maps, summary.reduces, summary.failures
                );
                Ok(())
            })
        }
        MapreduceCmd::Status { job } => with_client(args, |client| async move {
            let progress = mr::status(&client, &job).await?;
            let mut json = serde_json::to_value(progress)?;
            json["ok"] = true.into();
            println!("{json}");
            Ok(())
        }),
    }
}
