//! [`Db`]: the database in-process, on one node.
//!
//! A `Db` is a Raft group of ONE running the same node runtime
//! (`shoal_shard::node::Node`) as a cluster node, on a RocksDB engine in the
//! directory it was opened on; writes reach it by the same client a
//! cluster uses, through a `shoal_net::mem::LocalCaller` that hands each
//! request to the node's inbox (no encoding, no network). So the embedded database and the cluster share every line
//! from the client's retries down to the engine.
//!
//! # Many threads
//! A `Db` is `Send + Sync`; share it (`Arc<Db>`) between threads, or use
//! [`AsyncDb`] from tasks. Operations run concurrently:
//! - **Writes** each run on a client session of their own (a pool of at
//!   most [`DbBuilder::sessions_max`]), so each is applied exactly once
//!   even when retried. Writes that arrive together become one log write
//!   with one fsync (group commit), so durable write throughput grows with
//!   the number of writers.
//! - **Reads** (`get`, `scan`) go straight to the engine on the calling
//!   thread: they wait neither behind writes nor behind each other.
//!
//! # Why local reads are linearizable
//! In a group of one, a write is acknowledged only after it was applied to
//! the engine, and it is applied only once committed, which in a group of
//! one means written to this node's log (synced, by default). So when a
//! read starts, every write acknowledged before it is in the engine (the
//! read sees it), and everything the read can see is committed and can
//! never be rolled back (no other node can become leader and overwrite
//! it). The engine applies a whole log entry in one atomic RocksDB write,
//! so a read sees a batch entirely or not at all. Opening waits until the
//! group has applied every entry its log held, so a write acknowledged
//! before a crash is visible to the first read after reopening.
//! This holds only while the group has exactly one voter; a `Db` is opened
//! as a group of one and has no way to gain members. A database that grows
//! into a cluster must read through the group's ReadIndex, as
//! [`crate::Client`] does.
//!
//! # Durability
//! By default ([`Durability::Synced`]) a write returns only after its log
//! entry was written with a synced RocksDB write and applied, so every
//! acknowledged write survives a crash of the process (SIGKILL) or of the
//! machine; reopening replays the log past the applied index.
//! [`Durability::GroupCommit`] syncs at most once per window instead: a
//! crash of the process still loses nothing acknowledged, a crash of the
//! machine may lose the writes of the last window.
//!
//! # Log compaction
//! Every write goes to the Raft log and then to the key/value tables, so
//! the log is compacted: once it holds more than
//! [`DbBuilder::max_raft_state_bytes`] (default 64 MiB) it is cut through
//! the applied index. A group of one has nobody to send a snapshot to, so
//! nothing is exported: the tables already hold everything the cut entries
//! did. The log's size is a running count kept by the engine, so opening
//! never reads the whole log.
//!
//! # Closing
//! [`Db::close`] stops the node (every waiting caller is answered), syncs
//! what a group-commit window left unsynced, closes RocksDB and reports an
//! error if any; dropping the last handle does the same and logs the
//! error. [`AsyncDb`] handles keep the database open until the `Db` itself
//! is closed or dropped; after that their operations fail.
//!
//! # Layout of the directory
//! `db/` (RocksDB), `db/snapshots/` (log-compaction exports; inside the
//! engine's directory so an interrupted install always finds its files),
//! `net-files/` (unused by a group of one).
//!
//! # Example
//! ```no_run
//! let db = shoal::Db::open("./my-data")?;
//! let version = db.put("k", "v")?;
//! assert_eq!(db.get("k")?.map(|v| v.value), Some("v".into()));
//! assert_eq!(db.put_if_version("k", "w", version)?, version + 1);
//!
//! let mut batch = shoal::WriteBatch::new();
//! batch.check_version("k", version + 1).put("k", "x").put("other", "y");
//! db.write(batch)?;
//! for pair in db.scan("", "") {
//!     let (key, value) = pair?;
//!     println!("{key:?} = {:?}", value.value);
//! }
//! db.close()?;
//! # Ok::<(), shoal::DbError>(())
//! ```

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_engine::{BackupManifest, EngineConfig, EngineError, RocksEngine, Versioned};
use shoal_net::mem::{LocalCaller, MemConfig, MemNetwork};
use shoal_net::NodeId;
use shoal_shard::mapreduce::runtime::{self, AppResolver, ClientFactory, JobOptions, MrError};
use shoal_shard::mapreduce::wire::JobProgress;
use shoal_shard::mapreduce::{JobConfig, JobSpec, KeyRange, MapReduceApp};
use shoal_shard::node::{Node, NodeConfig, NodeError, NodeHandle, KV_GROUP, KV_SHARD};
use shoal_shard::protocol::KvProtocol;
use shoal_shard::{ClientConfig, ClientError, WriteBatch};

/// The node id of the one member of an embedded database's group.
pub const DB_NODE_ID: u64 = 1;

/// How long [`Db::open`] waits for the group of one to elect itself and
/// apply what its log holds.
pub const OPEN_READY_WAIT_MS_MAX: u64 = 10_000;

/// Pairs a [`Scan`] reads from the engine at a time.
pub const SCAN_PAGE_PAIRS: u64 = 1_000;

/// Default [`DbBuilder::worker_threads`].
pub const WORKER_THREADS_DEFAULT: usize = 2;

/// When a write is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every write is synced to disk before it returns (the default).
    /// Writers that arrive together share one sync.
    #[default]
    Synced,
    /// Writes return once written to the operating system; the log is
    /// synced at most `window` after an unsynced write. A crash of the
    /// process loses nothing acknowledged; a crash of the machine may lose
    /// the writes of the last window.
    GroupCommit {
        /// Longest a write stays unsynced (rounded up to the node's tick).
        window: Duration,
    },
}

/// Options of a [`Db`]; get one with [`Db::builder`].
///
/// ```no_run
/// use std::time::Duration;
/// let db = shoal::Db::builder("./my-data")
///     .durability(shoal::db::Durability::GroupCommit { window: Duration::from_millis(5) })
///     .block_cache_bytes(256 << 20)
///     .open()?;
/// # Ok::<(), shoal::DbError>(())
/// ```
#[derive(Debug, Clone)]
pub struct DbBuilder {
    dir: PathBuf,
    durability: Durability,
    max_raft_state_bytes: u64,
    engine: EngineConfig,
    worker_threads: usize,
    sessions_max: usize,
}

impl DbBuilder {
    /// When writes are durable (default [`Durability::Synced`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Compact the log once it holds more than this many bytes of entries
    /// (default 64 MiB).
    pub fn max_raft_state_bytes(mut self, bytes: u64) -> Self {
        self.max_raft_state_bytes = bytes;
        self
    }

    /// RocksDB's block cache (default 64 MiB).
    pub fn block_cache_bytes(mut self, bytes: u64) -> Self {
        self.engine.block_cache_bytes = bytes;
        self
    }

    /// RocksDB's memtable size per column family (default 64 MiB).
    pub fn write_buffer_bytes(mut self, bytes: u64) -> Self {
        self.engine.write_buffer_bytes = bytes;
        self
    }

    /// Longest key and value accepted (defaults 8 KiB and 4 MiB).
    pub fn limits(mut self, key_bytes_max: u64, value_bytes_max: u64) -> Self {
        self.engine.key_bytes_max = key_bytes_max;
        self.engine.value_bytes_max = value_bytes_max;
        self
    }

    /// Threads of the database's own runtime, which runs the node and the
    /// writes' clients (default [`WORKER_THREADS_DEFAULT`]).
    pub fn worker_threads(mut self, threads: usize) -> Self {
        self.worker_threads = threads.max(1);
        self
    }

    /// Most writes in flight at once (default
    /// [`shoal_shard::client::SESSIONS_MAX_DEFAULT`]); more wait for one to
    /// finish. Each holds a session record in the database.
    pub fn sessions_max(mut self, sessions: usize) -> Self {
        self.sessions_max = sessions.max(1);
        self
    }

    /// Opens (or creates) the database and waits until it serves. Another
    /// process (or `Db`) must not have it open.
    pub fn open(self) -> Result<Db, DbError> {
        Db::open_built(self)
    }
}

/// Why a [`Db`] operation failed. Expected outcomes (version mismatch, a
/// failed batch condition) are variants too.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// `put_if_version` found the key at another version.
    #[error("version mismatch (current version {current})")]
    VersionMismatch {
        /// The key's version.
        current: u64,
    },
    /// `put_if_version` with a non-zero version found no key.
    #[error("no such key")]
    NoKey,
    /// A batch's condition did not hold; nothing was written.
    #[error("condition {index} failed (the key is at version {current}); nothing was written")]
    ConditionFailed {
        /// Index of the first failed condition, in the order added.
        index: u32,
        /// That key's version (0: absent).
        current: u64,
    },
    /// The operation's deadline passed; a write may or may not have been
    /// applied.
    #[error("deadline exceeded; a write may or may not have been applied")]
    Timeout,
    /// The request was refused without effect (e.g. a key over the size
    /// limit).
    #[error("refused: {0}")]
    Refused(String),
    /// The database could not be opened (RocksDB, the directory).
    #[error("opening {path}: {source}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: EngineError,
    },
    /// Reading the engine failed (RocksDB, a corrupt record).
    #[error("reading: {0}")]
    Read(#[source] EngineError),
    /// The node runtime failed to start or stopped on an error.
    #[error("node: {0}")]
    Node(#[from] NodeError),
    /// The group did not become ready in time after opening.
    #[error("the database did not become ready within {0:?}")]
    NotReady(Duration),
    /// The database was closed (an [`AsyncDb`] or [`Scan`] outliving its
    /// `Db`).
    #[error("the database is closed")]
    Closed,
    /// An I/O error outside the engine (creating the directory, runtime).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A MapReduce job was refused or failed.
    #[error("mapreduce: {0}")]
    MapReduce(#[from] MrError),
    /// A backup failed; nothing was left at its target.
    #[error("backup: {0}")]
    Backup(#[from] shoal_engine::BackupError),
}

impl From<ClientError> for DbError {
    fn from(e: ClientError) -> DbError {
        match e {
            ClientError::VersionMismatch { current } => DbError::VersionMismatch { current },
            ClientError::NoKey => DbError::NoKey,
            ClientError::ConditionFailed { index, current } => {
                DbError::ConditionFailed { index, current }
            }
            ClientError::Maybe | ClientError::Timeout => DbError::Timeout,
            ClientError::Refused(reason) => DbError::Refused(reason),
            other => DbError::Refused(other.to_string()),
        }
    }
}

fn read_err(e: EngineError) -> DbError {
    match e {
        EngineError::LimitExceeded { .. } | EngineError::Invalid(_) => {
            DbError::Refused(e.to_string())
        }
        other => DbError::Read(other),
    }
}

/// What every handle of one open database shares.
#[derive(Debug)]
struct Shared {
    client: shoal_shard::Client<LocalCaller<KvProtocol>>,
    caller: LocalCaller<KvProtocol>,
    /// The engine, for local reads (see the module docs).
    engine: RocksEngine,
    /// Set when the `Db` closes: every operation fails from then on.
    closed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn check_open(&self) -> Result<(), DbError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            Err(DbError::Closed)
        } else {
            Ok(())
        }
    }
}

/// The async face of an open database; get it with [`Db::async_db`]. Its
/// futures must run on a tokio runtime (any: the node runs on the `Db`'s
/// own runtime). Cheap to clone; operations of all clones run
/// concurrently. Reads are local engine reads that block the calling
/// thread briefly, as a RocksDB read would.
#[derive(Debug, Clone)]
pub struct AsyncDb {
    shared: Arc<Shared>,
}

impl AsyncDb {
    fn client(&self) -> Result<&shoal_shard::Client<LocalCaller<KvProtocol>>, DbError> {
        self.shared.check_open()?;
        Ok(&self.shared.client)
    }

    /// Reads `key` (see the module docs on linearizability); `None` if
    /// absent.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Versioned>, DbError> {
        self.shared.check_open()?;
        self.shared
            .engine
            .get(KV_GROUP, KV_SHARD, key.as_ref())
            .map_err(read_err)
    }

    /// Writes `key`; returns the new version. Durable on return.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, DbError> {
        Ok(self.client()?.put(key, value).await?)
    }

    /// Writes `key` only if it is at `version` (0: absent); returns the new
    /// version. Durable on return.
    pub async fn put_if_version(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<u64, DbError> {
        Ok(self.client()?.put_if_version(key, value, version).await?)
    }

    /// Appends `value` to `key` (creating it); returns the new version.
    /// Durable on return.
    pub async fn append(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, DbError> {
        Ok(self.client()?.append(key, value).await?)
    }

    /// Deletes `key`; returns whether it existed. Durable on return.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, DbError> {
        Ok(self.client()?.delete(key).await?)
    }

    /// Applies `batch` atomically: every write if every condition holds,
    /// nothing otherwise ([`DbError::ConditionFailed`]). Returns each
    /// write's new version (0 for a delete). Durable on return.
    pub async fn write(&self, batch: WriteBatch) -> Result<Vec<u64>, DbError> {
        Ok(self.client()?.write(batch).await?)
    }

    /// Every pair with a key in `[start, end)` (empty `end`: no bound), in
    /// key order (see [`Scan`]).
    pub fn scan(&self, start: impl Into<Bytes>, end: impl Into<Bytes>) -> Scan {
        Scan {
            shared: self.shared.clone(),
            next: Some(start.into()),
            end: end.into(),
            page: VecDeque::new(),
        }
    }

    /// Every pair whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Scan {
        let prefix = prefix.as_ref();
        self.scan(
            Bytes::copy_from_slice(prefix),
            Bytes::from(prefix_end(prefix)),
        )
    }

    /// Writes a backup of the database into `dir`, a new directory whose
    /// parent exists: the key/value data with every version and the
    /// sessions, as SST files with a checksummed manifest
    /// ([`shoal_engine::backup`]), written under a staging name and renamed
    /// when complete. It is one point in time, taken without stopping
    /// writes: it holds every write acknowledged before the call and none
    /// acknowledged after it returns. Runs on the blocking pool.
    /// [`crate::backup::restore_db`] (or `shoal restore`) turns it into a
    /// directory [`Db::open`] opens.
    pub async fn backup(&self, dir: impl AsRef<Path>) -> Result<BackupManifest, DbError> {
        self.shared.check_open()?;
        let shared = self.shared.clone();
        let dir = dir.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || shared.engine.backup(&[KV_GROUP], &dir))
            .await
            .map_err(|e| DbError::Io(std::io::Error::other(e)))?
            .map_err(DbError::from)
    }

    /// Runs a MapReduce job over this database's keys in this process:
    /// `job.workers` workers and a coordinator on threads, the input read
    /// at one snapshot, the output written under the job's output prefix
    /// (see `shoal_shard::mapreduce::runtime` for the guarantees). The job
    /// record is kept under `__shoal/mapreduce/<name>`. Returns the final
    /// progress.
    pub async fn mapreduce(
        &self,
        job: &MapReduceJob,
        app: Arc<dyn MapReduceApp>,
    ) -> Result<JobProgress, DbError> {
        let caller = self.shared.caller.clone();
        let clients: ClientFactory<LocalCaller<KvProtocol>> = Arc::new(move || {
            shoal_shard::Client::new(
                caller.clone(),
                vec![NodeId(DB_NODE_ID)],
                ClientConfig::new(fresh_client_id()),
            )
        });
        let app_name = job.options.app.clone();
        let apps: AppResolver = Arc::new(move |name: &str| (name == app_name).then(|| app.clone()));
        std::fs::create_dir_all(&job.dir)?;
        let (progress, _) = tokio::sync::watch::channel(JobProgress::default());
        Ok(
            runtime::run_in_process(clients, &job.options, apps, job.workers, &job.dir, progress)
                .await?,
        )
    }
}

/// The first key after every key starting with `prefix` (empty: none).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// A fresh random session id (never 0): the session table is durable, and
/// sequence numbers restart at 1 with each client.
fn fresh_client_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// The pairs of a range in key order, read from the engine
/// [`SCAN_PAGE_PAIRS`] at a time: no cap on the range, memory of one page.
/// Each page is a linearizable read of its own; the whole is not one
/// snapshot if writes run meanwhile (a MapReduce job's pin is). An error
/// ends the iteration.
#[derive(Debug)]
pub struct Scan {
    shared: Arc<Shared>,
    /// Where the next page starts; `None` at the end (or after an error).
    next: Option<Bytes>,
    end: Bytes,
    page: VecDeque<(Bytes, Versioned)>,
}

impl Iterator for Scan {
    type Item = Result<(Bytes, Versioned), DbError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(pair) = self.page.pop_front() {
                return Some(Ok(pair));
            }
            let start = self.next.take()?;
            if let Err(e) = self.shared.check_open() {
                return Some(Err(e));
            }
            match self
                .shared
                .engine
                .scan(KV_GROUP, KV_SHARD, &start, &self.end, SCAN_PAGE_PAIRS)
            {
                Ok(page) => {
                    self.next = page.next;
                    self.page.extend(page.pairs);
                }
                Err(e) => return Some(Err(read_err(e))),
            }
        }
    }
}

/// A MapReduce job for [`Db::mapreduce`].
#[derive(Debug, Clone)]
pub struct MapReduceJob {
    /// Name, app name (any; it names the app passed in), input range,
    /// output prefix, reduce count, leases, split size.
    pub options: JobOptions,
    /// Worker threads' count.
    pub workers: u32,
    /// Scratch directory for map output (and `mr-out-*` files if asked).
    pub dir: PathBuf,
}

impl MapReduceJob {
    /// A job named `name` over the keys under `input`, writing under
    /// `output`, with `reduce_count` partitions, 2 workers, and scratch
    /// space in `dir`.
    pub fn new(
        name: &str,
        input: &[u8],
        output: &[u8],
        reduce_count: u32,
        dir: impl AsRef<Path>,
    ) -> MapReduceJob {
        MapReduceJob {
            options: JobOptions {
                name: name.to_string(),
                app: "app".into(),
                spec: JobSpec {
                    input: KeyRange::prefix(input),
                    output_prefix: output.to_vec(),
                    reduce_count,
                },
                config: JobConfig::default(),
                split_bytes: runtime::SPLIT_BYTES_DEFAULT,
                write_files: false,
            },
            workers: 2,
            dir: dir.as_ref().to_path_buf(),
        }
    }
}

/// An embedded Shoal database (see the module docs). Blocking: each write
/// runs to completion on the database's own runtime, so do not call it
/// (or drop it) from inside an async context (use [`Db::async_db`] there).
/// `Send + Sync`: share it between threads, whose operations run
/// concurrently.
#[derive(Debug)]
pub struct Db {
    runtime: Option<tokio::runtime::Runtime>,
    node: Option<NodeHandle>,
    db: AsyncDb,
    dir: PathBuf,
}

impl Db {
    /// Opens (or creates) the database in `dir` with the default options
    /// and waits until it serves. Another process (or `Db`) must not have
    /// it open.
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, DbError> {
        Db::builder(dir).open()
    }

    /// Options for opening the database in `dir`.
    pub fn builder(dir: impl AsRef<Path>) -> DbBuilder {
        DbBuilder {
            dir: dir.as_ref().to_path_buf(),
            durability: Durability::Synced,
            max_raft_state_bytes: shoal_shard::node::MAX_RAFT_STATE_BYTES_DEFAULT,
            engine: EngineConfig::default(),
            worker_threads: WORKER_THREADS_DEFAULT,
            sessions_max: shoal_shard::client::SESSIONS_MAX_DEFAULT,
        }
    }

    fn open_built(options: DbBuilder) -> Result<Db, DbError> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads)
            .enable_all()
            .thread_name("shoal-db")
            .build()?;
        let open_err = |source| DbError::Open {
            path: dir.clone(),
            source,
        };
        let engine = RocksEngine::open(dir.join("db"), options.engine.clone()).map_err(open_err)?;
        // Entries the log holds may be unapplied (a crash between the
        // synced log write and the apply): reads wait for them.
        let last_index = engine.last_index(KV_GROUP).map_err(open_err)?;
        let (node, shared) = runtime.block_on(async {
            let mut net_config = MemConfig::with_seed(DB_NODE_ID);
            net_config.files_dir = dir.join("net-files");
            let net = MemNetwork::<KvProtocol>::new(net_config);
            let (transport, inbox) = net.add_node(NodeId(DB_NODE_ID));
            let mut config = NodeConfig::new(
                DB_NODE_ID,
                vec![DB_NODE_ID],
                dir.join("db").join("snapshots"),
            );
            config.blocking_io = true;
            config.max_raft_state_bytes = Some(options.max_raft_state_bytes);
            config.log_sync_window_ms = match options.durability {
                Durability::Synced => None,
                Durability::GroupCommit { window } => Some(window.as_millis() as u64),
            };
            let node = Node::start(config, engine.clone(), transport, inbox)?;
            let caller = net
                .local_caller(NodeId(DB_NODE_ID), "db")
                .expect("the node was just added");
            let mut client_config = ClientConfig::new(fresh_client_id());
            client_config.sessions_max = options.sessions_max;
            let client =
                shoal_shard::Client::new(caller.clone(), vec![NodeId(DB_NODE_ID)], client_config);
            Ok::<_, DbError>((
                node,
                Shared {
                    client,
                    caller,
                    engine,
                    closed: std::sync::atomic::AtomicBool::new(false),
                },
            ))
        })?;
        let db = Db {
            runtime: Some(runtime),
            node: Some(node),
            db: AsyncDb {
                shared: Arc::new(shared),
            },
            dir,
        };
        db.wait_until_ready(last_index)?;
        Ok(db)
    }

    /// Waits until the group leads and has applied its log through
    /// `last_index` (what it held at open).
    fn wait_until_ready(&self, last_index: u64) -> Result<(), DbError> {
        let wait = Duration::from_millis(OPEN_READY_WAIT_MS_MAX);
        let deadline = std::time::Instant::now() + wait;
        let node = self.node.as_ref().expect("open");
        loop {
            let status = node.status(KV_GROUP);
            if node.is_leader() && status.applied >= last_index {
                return Ok(());
            }
            if !node.is_running() || std::time::Instant::now() >= deadline {
                return Err(DbError::NotReady(wait));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes of entries in the database's Raft log (the running count that
    /// decides compaction; an upper estimate).
    pub fn log_bytes(&self) -> u64 {
        self.node
            .as_ref()
            .map_or(0, |node| node.status(KV_GROUP).log_bytes)
    }

    /// The async face of this database, for use inside async code.
    pub fn async_db(&self) -> AsyncDb {
        self.db.clone()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("open").block_on(f)
    }

    /// Reads `key` (see the module docs on linearizability); `None` if
    /// absent. Served on the calling thread from the engine.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Versioned>, DbError> {
        self.db.get(key)
    }

    /// Writes `key`; returns the new version. Durable on return.
    pub fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<u64, DbError> {
        self.block_on(self.db.put(key, value))
    }

    /// Writes `key` only if it is at `version` (0: absent); returns the new
    /// version. Durable on return.
    pub fn put_if_version(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<u64, DbError> {
        self.block_on(self.db.put_if_version(key, value, version))
    }

    /// Appends `value` to `key` (creating it); returns the new version.
    /// Durable on return.
    pub fn append(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<u64, DbError> {
        self.block_on(self.db.append(key, value))
    }

    /// Deletes `key`; returns whether it existed. Durable on return.
    pub fn delete(&self, key: impl Into<Bytes>) -> Result<bool, DbError> {
        self.block_on(self.db.delete(key))
    }

    /// Applies `batch` atomically: every write if every condition holds,
    /// nothing otherwise ([`DbError::ConditionFailed`]). Returns each
    /// write's new version (0 for a delete). Durable on return.
    ///
    /// ```no_run
    /// let db = shoal::Db::open("./my-data")?;
    /// let a = db.get("account/a")?.map_or(0, |v| v.version);
    /// let mut batch = shoal::WriteBatch::new();
    /// batch.check_version("account/a", a).put("account/a", "70").put("log/1", "moved 30");
    /// match db.write(batch) {
    ///     Ok(versions) => println!("written: {versions:?}"),
    ///     Err(shoal::DbError::ConditionFailed { .. }) => println!("changed meanwhile; retry"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), shoal::DbError>(())
    /// ```
    pub fn write(&self, batch: WriteBatch) -> Result<Vec<u64>, DbError> {
        self.block_on(self.db.write(batch))
    }

    /// Every pair with a key in `[start, end)` (empty `end`: no bound), in
    /// key order, as an iterator paging through the engine (see [`Scan`]).
    pub fn scan(&self, start: impl Into<Bytes>, end: impl Into<Bytes>) -> Scan {
        self.db.scan(start, end)
    }

    /// Every pair whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Scan {
        self.db.scan_prefix(prefix)
    }

    /// Writes a backup of the database into `dir`, a new directory (see
    /// [`AsyncDb::backup`]). Runs on the calling thread; reads go on and
    /// writes go on meanwhile.
    ///
    /// ```no_run
    /// let db = shoal::Db::open("./my-data")?;
    /// db.put("k", "v")?;
    /// db.backup("./my-backup")?;
    /// db.close()?;
    /// shoal::backup::restore_db("./my-backup".as_ref(), "./restored".as_ref())
    ///     .expect("restored");
    /// assert_eq!(shoal::Db::open("./restored")?.get("k")?.map(|v| v.value), Some("v".into()));
    /// # Ok::<(), shoal::DbError>(())
    /// ```
    pub fn backup(&self, dir: impl AsRef<Path>) -> Result<BackupManifest, DbError> {
        self.db.shared.check_open()?;
        Ok(self.db.shared.engine.backup(&[KV_GROUP], dir.as_ref())?)
    }

    /// Runs a MapReduce job over this database's keys in this process (see
    /// [`AsyncDb::mapreduce`]).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// let db = shoal::Db::open("./my-data")?;
    /// db.put("doc/1", "a b a")?;
    /// let job = shoal::db::MapReduceJob::new("wc", b"doc/", b"count/", 4, "./mr-scratch");
    /// let wc = Arc::new(shoal::shard::mapreduce::WordCount);
    /// db.mapreduce(&job, wc)?;
    /// assert_eq!(db.get("count/a")?.map(|v| v.value), Some("2".into()));
    /// # Ok::<(), shoal::DbError>(())
    /// ```
    pub fn mapreduce(
        &self,
        job: &MapReduceJob,
        app: Arc<dyn MapReduceApp>,
    ) -> Result<JobProgress, DbError> {
        self.block_on(self.db.mapreduce(job, app))
    }

    /// Shuts the database down cleanly: the node answers every waiting
    /// caller, syncs what a group-commit window left unsynced and stops,
    /// RocksDB is closed once no [`AsyncDb`] or [`Scan`] holds it, and the
    /// directory may be opened again. (Dropping a `Db` does the same,
    /// logging an error instead of returning it.)
    pub fn close(mut self) -> Result<(), DbError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DbError> {
        let (Some(runtime), Some(node)) = (self.runtime.take(), self.node.take()) else {
            return Ok(());
        };
        self.db
            .shared
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let result = runtime.block_on(node.shutdown());
        // Waits for the blocking pool too, so the node's engine handle is
        // gone when this returns.
        runtime.shutdown_timeout(Duration::from_secs(10));
        Ok(result?)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "closing the database");
        }
    }
}
