//! The engine handle: a backend, its limits, and the per-group log cache.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::backend::{Backend, Cf};
use crate::config::EngineConfig;
use crate::error::Result;
use crate::log::{load_group, GroupLog, LogBounds};
use crate::mem::MemBackend;
use crate::rocks::RocksBackend;
use crate::GroupId;

/// A node's storage engine: the Raft log store of every group on the node,
/// the KV state machine of every shard, client sessions and snapshots.
///
/// Cheap to clone (a shared handle); safe to use from several threads. Log
/// writes are serialised internally; applies to one group must come from one
/// caller at a time (the group's apply loop).
pub struct Engine<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Engine<B> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.inner.backend)
            .field("config", &self.inner.config)
            .finish()
    }
}

struct Inner<B> {
    backend: B,
    config: EngineConfig,
    groups: RwLock<HashMap<GroupId, GroupLog>>,
    log_writer: Mutex<()>,
    installs_finished_at_open: std::sync::atomic::AtomicU64,
    installs_discarded_at_open: std::sync::atomic::AtomicU64,
    apply_cache: Mutex<ApplyCache>,
}

/// The latest committed state of recently used `kv` and `dedup` keys
/// (`None`: known absent), for apply (see [`EngineConfig::apply_cache_bytes`]).
///
/// Only apply reads and fills it, and applies of one shard come from one
/// caller at a time, so it never holds a value older than the database's.
/// It is emptied by anything else that changes those column families: a
/// snapshot install, a simulated crash, a failed apply write.
#[derive(Debug, Default)]
pub(crate) struct ApplyCache {
    entries: HashMap<(crate::backend::Cf, Vec<u8>), Option<Vec<u8>>>,
    bytes: u64,
}

/// An exclusive scan end above every key of every column family
/// (`crate::keys`): each key starts with a tag byte below 0xFF, a group id
/// followed by a shard id below `u32::MAX` (`kv`, `dedup`), or a group id
/// followed by at most a log index, and only `raft_log`'s key of group
/// `u64::MAX`, index `u64::MAX` is not below this.
const ALL_KEYS_END: [u8; 17] = [0xFF; 17];

/// Bookkeeping bytes counted per cache entry on top of key and value.
const APPLY_CACHE_ENTRY_OVERHEAD_BYTES: u64 = 64;

impl ApplyCache {
    pub(crate) fn get(&self, cf: crate::backend::Cf, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        // A borrowed-key lookup would need a custom key type; keys are short.
        self.entries.get(&(cf, key.to_vec()))
    }

    /// Records `value` as the state of `key`, emptying the cache first if it
    /// would outgrow `budget` bytes.
    pub(crate) fn insert(
        &mut self,
        budget: u64,
        cf: crate::backend::Cf,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) {
        if budget == 0 {
            return;
        }
        let size = |k: &[u8], v: &Option<Vec<u8>>| {
            k.len() as u64
                + v.as_ref().map_or(0, |v| v.len() as u64)
                + APPLY_CACHE_ENTRY_OVERHEAD_BYTES
        };
        let added = size(&key, &value);
        if self.bytes + added > budget {
            self.clear();
            if added > budget {
                return;
            }
        }
        if let Some(old) = self.entries.get(&(cf, key.clone())) {
            self.bytes -= size(&key, old);
        }
        self.bytes += added;
        self.entries.insert((cf, key), value);
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// The on-disk format this build reads and writes, recorded in `meta` when
/// a data directory is created and checked on every open. 1: the first
/// format (no marker); 2: sessions without times, appends carrying their
/// size limit, the running log size in the raft state; 3: `kv` and `dedup`
/// keys start with the group, shard ownership records.
pub const FORMAT_VERSION: u32 = 3;

/// The engine on RocksDB: what a node runs.
pub type RocksEngine = Engine<RocksBackend>;
/// The engine on in-memory maps, with crash simulation: what simulation
/// tests run. Same code as [`RocksEngine`] above the [`Backend`] seam.
pub type MemStore = Engine<MemBackend>;

impl RocksEngine {
    /// Opens (creating if needed) the engine in directory `path`, finishing
    /// (or, if its files are gone before it cleared anything, discarding)
    /// any snapshot install a crash interrupted.
    pub fn open(path: impl AsRef<Path>, config: EngineConfig) -> Result<Self> {
        let backend = RocksBackend::open(path.as_ref(), &config)?;
        Engine::with_backend(backend, config)
    }
}

impl MemStore {
    /// A new, empty in-memory engine.
    pub fn new_in_memory(config: EngineConfig) -> Result<Self> {
        Engine::with_backend(MemBackend::new(), config)
    }

    /// Simulates a crash and restart: writes not made durable by a synced
    /// write are lost, caches are dropped, interrupted installs are finished.
    pub fn crash_and_recover(&self) -> Result<()> {
        self.inner.backend.crash();
        self.inner
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.apply_cache().clear();
        self.recover()
    }
}

impl<B: Backend> Engine<B> {
    /// Wraps a backend, validating `config` and running recovery.
    pub fn with_backend(backend: B, config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let engine = Engine {
            inner: Arc::new(Inner {
                backend,
                config,
                groups: RwLock::new(HashMap::new()),
                log_writer: Mutex::new(()),
                installs_finished_at_open: Default::default(),
                installs_discarded_at_open: Default::default(),
                apply_cache: Mutex::new(ApplyCache::default()),
            }),
        };
        engine.recover()?;
        Ok(engine)
    }

    fn recover(&self) -> Result<()> {
        self.check_format()?;
        let (finished, discarded) = self.finish_interrupted_installs()?;
        self.inner
            .installs_finished_at_open
            .fetch_add(finished, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .installs_discarded_at_open
            .fetch_add(discarded, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Refuses a data directory in another on-disk format, and marks a new
    /// one with [`FORMAT_VERSION`]. A directory with data but no marker was
    /// written by a build before markers existed.
    fn check_format(&self) -> Result<()> {
        use crate::backend::{Cf, WriteSet};
        let key = crate::keys::meta_format_key();
        let found = match self.inner.backend.get(Cf::Meta, &key)? {
            Some(bytes) => {
                crate::keys::decode_record::<u32>(&key, &bytes, &|| "format marker".into())?
            }
            None => {
                let mut empty = true;
                for cf in [Cf::RaftState, Cf::Meta, Cf::Kv] {
                    self.inner.backend.scan(cf, &[], &[0xff; 16], &mut |_, _| {
                        empty = false;
                        Ok(false)
                    })?;
                }
                if !empty {
                    0
                } else {
                    let mut set = WriteSet::new();
                    set.put(
                        Cf::Meta,
                        key.to_vec(),
                        crate::keys::encode_record(&key, &FORMAT_VERSION),
                    );
                    self.inner.backend.write(set, true)?;
                    FORMAT_VERSION
                }
            }
        };
        if found != FORMAT_VERSION {
            return Err(crate::error::EngineError::Format {
                found,
                expected: FORMAT_VERSION,
            });
        }
        Ok(())
    }

    /// How many snapshot installs a crash had interrupted and recovery
    /// discarded because their files were missing or corrupt before the
    /// shards were cleared (the old state was kept; see [`crate::snapshot`]).
    pub fn interrupted_installs_discarded(&self) -> u64 {
        self.inner
            .installs_discarded_at_open
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many snapshot installs a crash had interrupted and recovery
    /// finished (when opening, or in [`MemStore::crash_and_recover`]).
    pub fn interrupted_installs_finished(&self) -> u64 {
        self.inner
            .installs_finished_at_open
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes every write so far durable (applies and compactions are
    /// otherwise durable only with the next synced log write).
    pub fn sync(&self) -> Result<()> {
        let started = std::time::Instant::now();
        self.inner.backend.sync()?;
        crate::metrics::wal_sync(started.elapsed());
        Ok(())
    }

    /// Bytes of every key and value stored in every column family, read in
    /// one point-in-time view: all the state the node retains (Raft log and
    /// state, data, sessions, metadata), as a memory bound in a test would
    /// measure it. The backend's own overhead (RocksDB's files and
    /// memtables, the in-memory backend's undo log) is not counted. Reads
    /// everything: for tests and diagnostics, not for a hot path.
    pub fn stored_bytes(&self) -> Result<u64> {
        let mut bytes = 0u64;
        self.inner.backend.with_view(&mut |view| {
            for cf in Cf::ALL {
                view.scan(cf, &[], &ALL_KEYS_END, &mut |key, value| {
                    bytes += (key.len() + value.len()) as u64;
                    Ok(true)
                })?;
            }
            Ok(())
        })?;
        Ok(bytes)
    }

    /// The limits in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The backend, for code in this crate and for tests that inspect it.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    pub(crate) fn apply_cache(&self) -> MutexGuard<'_, ApplyCache> {
        self.inner
            .apply_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn log_write_lock(&self) -> MutexGuard<'_, ()> {
        self.inner
            .log_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn group_log(&self, group: GroupId) -> Result<GroupLog> {
        if let Some(g) = self
            .inner
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
        {
            return Ok(g.clone());
        }
        let loaded = load_group(&self.inner.backend, group)?;
        self.inner
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group)
            .or_insert_with(|| loaded.clone());
        Ok(loaded)
    }

    /// The cached log bounds of `group`, loading them on first use; cheaper
    /// than [`Self::group_log`] on the hot `term`/`entries` path.
    pub(crate) fn log_bounds(&self, group: GroupId) -> Result<LogBounds> {
        if let Some(g) = self
            .inner
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
        {
            return Ok(g.bounds());
        }
        Ok(self.group_log(group)?.bounds())
    }

    pub(crate) fn cache_group(&self, log: GroupLog) {
        self.inner
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(log.group, log);
    }

    pub(crate) fn forget_group(&self, group: GroupId) {
        self.inner
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }
}
