//! [`Db`]: the database in-process, on one node.
//!
//! A `Db` is a Raft group of ONE running the same node runtime
//! (`shoal_shard::node::Node`) as a cluster node, on a RocksDB engine in the
//! directory it was opened on, reached through the in-memory transport
//! (`shoal_net::mem`, with no faults) by the same client a cluster uses. So
//! the embedded database and the cluster share every line from the client's
//! retries down to the engine.
//!
//! # Durability
//! A write returns only after its log entry was written with a synced
//! RocksDB write and applied (a group of one commits what it has persisted),
//! so every acknowledged write survives a crash of the process (SIGKILL) or
//! of the machine; reopening replays the log past the applied index.
//!
//! # Log compaction
//! Every write goes to the Raft log and then to the key/value tables, so
//! the log is compacted: once it holds more than
//! [`DbOptions::max_raft_state_bytes`] (default 64 MiB) it is cut through
//! the applied index. A group of one has nobody to send a snapshot to, so
//! nothing is exported: the tables already hold everything the cut entries
//! did. The log's size is a running count kept by the engine, so opening
//! never reads the whole log.
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
//! assert_eq!(db.get("k")?.value, "v");
//! assert_eq!(db.put_if_version("k", "w", version)?, version + 1);
//! db.close()?;
//! # Ok::<(), shoal::DbError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use shoal_engine::{EngineConfig, EngineError, RocksEngine, Versioned};
use shoal_net::mem::{MemClient, MemConfig, MemNetwork};
use shoal_net::NodeId;
use shoal_shard::mapreduce::runtime::{self, AppResolver, ClientFactory, JobOptions, MrError};
use shoal_shard::mapreduce::wire::JobProgress;
use shoal_shard::mapreduce::{JobConfig, JobSpec, KeyRange, MapReduceApp};
use shoal_shard::node::{Node, NodeConfig, NodeError, NodeHandle};
use shoal_shard::protocol::KvProtocol;
use shoal_shard::{ClientConfig, ClientError};
use std::sync::Arc;

/// The node id of the one member of an embedded database's group.
const DB_NODE_ID: u64 = 1;

/// How long [`Db::open`] waits for the group of one to elect itself.
pub const OPEN_LEADER_WAIT_MS_MAX: u64 = 10_000;

/// Settings of a [`Db`]; [`DbOptions::default`] is what [`Db::open`] uses.
/// Build one with `DbOptions { field: value, ..Default::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbOptions {
    /// Compact the log once it holds more than this many bytes of entries.
    pub max_raft_state_bytes: u64,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_raft_state_bytes: shoal_shard::node::MAX_RAFT_STATE_BYTES_DEFAULT,
        }
    }
}

/// Why a [`Db`] operation failed. Expected outcomes (missing key, version
/// mismatch) are variants too.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// `get` found no such key.
    #[error("key not found")]
    NotFound,
    /// `put_if_version` found the key at another version.
    #[error("version mismatch (current version {current})")]
    VersionMismatch {
        /// The key's version.
        current: u64,
    },
    /// `put_if_version` with a non-zero version found no key.
    #[error("no such key")]
    NoKey,
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
        source: EngineError,
    },
    /// The node runtime failed to start or stopped on an error.
    #[error("node: {0}")]
    Node(#[from] NodeError),
    /// The group did not elect itself in time after opening.
    #[error("the database did not become ready within {0:?}")]
    NotReady(Duration),
    /// An I/O error outside the engine (creating the directory, runtime).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A MapReduce job was refused or failed.
    #[error("mapreduce: {0}")]
    MapReduce(#[from] MrError),
}

impl From<ClientError> for DbError {
    fn from(e: ClientError) -> DbError {
        match e {
            ClientError::NotFound => DbError::NotFound,
            ClientError::VersionMismatch { current } => DbError::VersionMismatch { current },
            ClientError::NoKey => DbError::NoKey,
            ClientError::Maybe | ClientError::Timeout => DbError::Timeout,
            ClientError::Refused(reason) => DbError::Refused(reason),
            other => DbError::Refused(other.to_string()),
        }
    }
}

/// The async face of an open database; get it with [`Db::async_db`]. Its
/// futures must run on a tokio runtime (any: the node runs on the `Db`'s
/// own runtime). Cheap to clone; operations of all clones run one at a time.
#[derive(Debug, Clone)]
pub struct AsyncDb {
    client: shoal_shard::Client<MemClient<KvProtocol>>,
    caller: MemClient<KvProtocol>,
}

impl AsyncDb {
    /// Reads `key`.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Versioned, DbError> {
        Ok(self.client.get(key).await?)
    }

    /// Writes `key`; returns the new version. Durable on return.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, DbError> {
        Ok(self.client.put(key, value).await?)
    }

    /// Writes `key` only if it is at `version` (0: absent); returns the new
    /// version. Durable on return.
    pub async fn put_if_version(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<u64, DbError> {
        Ok(self.client.put_if_version(key, value, version).await?)
    }

    /// Appends `value` to `key` (creating it); returns the new version.
    /// Durable on return.
    pub async fn append(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, DbError> {
        Ok(self.client.append(key, value).await?)
    }

    /// Deletes `key`; returns whether it existed. Durable on return.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, DbError> {
        Ok(self.client.delete(key).await?)
    }

    /// Up to `limit` pairs with keys in `[start, end)` (empty `end`: no
    /// bound), in key order.
    pub async fn scan(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u64,
    ) -> Result<Vec<(Bytes, Versioned)>, DbError> {
        Ok(self.client.scan(start, end, limit).await?)
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
        let caller = self.caller.clone();
        let clients: ClientFactory<MemClient<KvProtocol>> = Arc::new(move || {
            shoal_shard::Client::new(
                caller.clone(),
                vec![NodeId(DB_NODE_ID)],
                ClientConfig::new(crate::cluster::fresh_client_id()),
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

/// An embedded Shoal database (see the module docs). Blocking: each call
/// runs to completion on the database's own runtime, so do not call it (or
/// drop it) from inside an async context (use [`Db::async_db`] there).
/// `Db` is `Send + Sync`, but operations from all threads run one at a time
/// through one client session, each waiting for its own synced log write.
#[derive(Debug)]
pub struct Db {
    runtime: Option<tokio::runtime::Runtime>,
    node: Option<NodeHandle>,
    db: AsyncDb,
    dir: PathBuf,
}

impl Db {
    /// Opens (or creates) the database in `dir` and waits until it serves.
    /// Another process (or `Db`) must not have it open.
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, DbError> {
        Db::open_with(dir, DbOptions::default())
    }

    /// [`Db::open`] with `options`.
    pub fn open_with(dir: impl AsRef<Path>, options: DbOptions) -> Result<Db, DbError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("shoal-db")
            .build()?;
        let engine =
            RocksEngine::open(dir.join("db"), EngineConfig::default()).map_err(|source| {
                DbError::Open {
                    path: dir.clone(),
                    source,
                }
            })?;
        let (node, client, caller) = runtime.block_on(async {
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
            let node = Node::start(config, engine, transport, inbox)?;
            // A fresh session id every open: the session table is durable,
            // and sequence numbers restart at 1 with each client.
            let caller = net.add_client("db");
            let client = shoal_shard::Client::new(
                caller.clone(),
                vec![NodeId(DB_NODE_ID)],
                ClientConfig::new(crate::cluster::fresh_client_id()),
            );
            Ok::<_, DbError>((node, client, caller))
        })?;
        let db = Db {
            runtime: Some(runtime),
            node: Some(node),
            db: AsyncDb { client, caller },
            dir,
        };
        db.wait_until_leader()?;
        Ok(db)
    }

    fn wait_until_leader(&self) -> Result<(), DbError> {
        let wait = Duration::from_millis(OPEN_LEADER_WAIT_MS_MAX);
        let deadline = std::time::Instant::now() + wait;
        let node = self.node.as_ref().expect("open");
        while !node.is_leader() {
            if !node.is_running() || std::time::Instant::now() >= deadline {
                return Err(DbError::NotReady(wait));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
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
            .map_or(0, |node| node.status(shoal_shard::node::KV_GROUP).log_bytes)
    }

    /// The async face of this database, for use inside async code.
    pub fn async_db(&self) -> AsyncDb {
        self.db.clone()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().expect("open").block_on(f)
    }

    /// Reads `key`.
    pub fn get(&self, key: impl Into<Bytes>) -> Result<Versioned, DbError> {
        self.block_on(self.db.get(key))
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

    /// Up to `limit` pairs with keys in `[start, end)` (empty `end`: no
    /// bound), in key order.
    pub fn scan(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u64,
    ) -> Result<Vec<(Bytes, Versioned)>, DbError> {
        self.block_on(self.db.scan(start, end, limit))
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
    /// assert_eq!(db.get("count/a")?.value, "2");
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
    /// caller and stops, RocksDB is closed, and the directory may be opened
    /// again. (Dropping a `Db` does the same, ignoring errors.)
    pub fn close(mut self) -> Result<(), DbError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DbError> {
        let (Some(runtime), Some(node)) = (self.runtime.take(), self.node.take()) else {
            return Ok(());
        };
        let result = runtime.block_on(node.shutdown());
        // Waits for the blocking pool too, so RocksDB (owned by the node)
        // is closed when this returns.
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
