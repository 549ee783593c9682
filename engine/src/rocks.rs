//! [`Backend`] on RocksDB: one database per node, one column family per
//! [`Cf`].
//!
//! # Options, and why
//! - **WAL on, synced on demand.** Raft log appends and hard states are
//!   written with `sync = true` (one `fdatasync` per group-commit round);
//!   state-machine applies are not synced: the log they come from is durable,
//!   the WAL is one ordered log so the next synced write makes them durable
//!   too, and recovery replays the log from the applied index + 1.
//! - **WAL recovery: tolerate a torn tail, fail on anything else**
//!   (`TolerateCorruptedTailRecords`): a crash can leave the last record of
//!   a WAL incomplete, which is dropped (it was never acknowledged: synced
//!   writes are whole); a corrupt record anywhere else makes open fail
//!   instead of silently replaying only the writes before it. The reasons,
//!   and why this means no WAL recycling, are on `WAL_RECOVERY_MODE` in
//!   this module's source.
//! - **Paranoid checks** on: a corrupt SST or WAL makes open fail loudly
//!   instead of serving wrong data.
//! - **Block cache** (LRU, [`EngineConfig::block_cache_bytes`]) shared by all
//!   column families, with index and filter blocks cached in it so memory is
//!   bounded by one number.
//! - **Bloom filters** (10 bits/key, ~1% false positives) on `kv`, `dedup`
//!   and `raft_log`: gets of absent keys and `term(i)` lookups skip files.
//! - **Compaction**: levelled with dynamic level sizes (the default in
//!   current RocksDB, set explicitly), LZ4 on every level — cheap enough that
//!   it saves more I/O than CPU. The Raft log is compacted with range
//!   deletes, which compaction drops wholesale.
//! - **Background jobs** = [`EngineConfig::background_jobs`] (2 on a 2-core
//!   machine) so flushes and compactions never starve the foreground.
//! - **Ingestion** moves files (hard links, no copy) and lets RocksDB assign
//!   them a sequence number newer than every write before, so an installed
//!   snapshot supersedes the range delete written just before it.
//! - **Incremental writeback** of large files: RocksDB's own table files
//!   with `bytes_per_sync` ([`WRITEBACK_INTERVAL_BYTES`]), and exported
//!   files (which `SstFileWriter` writes with default `EnvOptions`, so
//!   `bytes_per_sync` does not reach them) with an `fdatasync` every
//!   [`WRITEBACK_INTERVAL_BYTES`] ([`Writeback`]). One `fsync` at the end
//!   of a 1 GiB file queues a gigabyte of writeback at once, and every
//!   synced Raft-log write on the same disk waits behind it (measured on
//!   this project's machine: 3 such files at once held a 300-byte
//!   `fdatasync` up to 350 ms; syncing every 8 MiB, 23 ms, in the same
//!   total time).

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, DBRecoveryMode,
    IngestExternalFileOptions, Options, ReadOptions, SnapshotWithThreadMode, SstFileWriter,
    WriteBatch, WriteOptions, DB,
};

use crate::backend::{renamed_into, Backend, Cf, ExportedFile, View, Visitor, WriteOp, WriteSet};
use crate::config::EngineConfig;
use crate::error::{EngineError, Result};

/// How RocksDB replays its WAL when opening (read in RocksDB 11.8's
/// `db/log_reader.cc` and `db/db_impl/db_impl_open.cc`).
///
/// - `PointInTime` (what we used before) stops replay at the first bad
///   record *anywhere* and opens with the writes before it: a flipped byte
///   in the middle of the WAL silently loses every later write, synced and
///   acknowledged ones included. Our promise is that corruption makes open
///   fail.
/// - `AbsoluteConsistency` fails on any bad record, including a truncated
///   header or record body at the end of the file (it reports "truncated
///   header" / "truncated record body"). That is exactly what a crash in
///   the middle of an unsynced write (an apply, an unsynced commit index)
///   leaves, so a node killed at the wrong moment could never reopen.
/// - `TolerateCorruptedTailRecords` drops an incomplete record at the end
///   of a WAL (never acknowledged: a synced write is whole on disk before
///   it returns) and fails on a bad checksum or length anywhere else. That
///   is the promise; `engine/tests/wal_recovery.rs` checks both halves.
///
/// RocksDB disables WAL recycling (`recycle_log_file_num`) under this
/// mode, silently: a recycled file's old records past the new data look
/// like a corrupt tail the mode could not tell from real corruption. So we
/// do not ask for it. Recycling saved the file-size metadata commit of
/// each fdatasync; durability comes first.
const WAL_RECOVERY_MODE: DBRecoveryMode = DBRecoveryMode::TolerateCorruptedTailRecords;

/// Bytes written to a large file between two syncs of it (see the module
/// docs): small enough that no sync queues much writeback ahead of a Raft
/// log sync, large enough that the syncs cost little.
pub const WRITEBACK_INTERVAL_BYTES: u64 = 8 * 1024 * 1024;

/// Syncs a file being written every `interval_bytes`: `note` the bytes
/// handed to the writer, and each time another interval's worth has gone
/// by the file's data is synced (through a descriptor of its own: Linux
/// syncs the inode, whichever descriptor asks).
#[derive(Debug)]
pub struct Writeback {
    interval_bytes: u64,
    unsynced_bytes: u64,
    file: Option<std::fs::File>,
}

impl Writeback {
    /// Syncs every `interval_bytes` (0: never).
    pub fn new(interval_bytes: u64) -> Self {
        Writeback {
            interval_bytes,
            unsynced_bytes: 0,
            file: None,
        }
    }

    /// Counts `bytes` more written; true when a sync is due (the count
    /// then starts again).
    pub fn due(&mut self, bytes: u64) -> bool {
        self.unsynced_bytes = self.unsynced_bytes.saturating_add(bytes);
        if self.interval_bytes == 0 || self.unsynced_bytes < self.interval_bytes {
            return false;
        }
        self.unsynced_bytes = 0;
        true
    }

    /// Counts `bytes` more written to `path` and syncs it when due.
    pub fn note(&mut self, path: &Path, bytes: u64) -> Result<()> {
        if !self.due(bytes) {
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some(std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?);
        }
        let file = self.file.as_ref().expect("opened above");
        file.sync_data().map_err(|e| EngineError::io(path, e))
    }
}

/// RocksDB behind the [`Backend`] seam.
pub struct RocksBackend {
    db: DB,
    sst_options: Options,
}

impl std::fmt::Debug for RocksBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksBackend")
            .field("path", &self.db.path())
            .finish()
    }
}

fn cf_options(config: &EngineConfig, cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    opts.set_compression_type(DBCompressionType::Lz4);
    opts.set_level_compaction_dynamic_level_bytes(true);
    opts.set_write_buffer_size(config.write_buffer_bytes as usize);
    opts.set_bytes_per_sync(WRITEBACK_INTERVAL_BYTES);
    opts
}

impl RocksBackend {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, config: &EngineConfig) -> Result<Self> {
        config.validate()?;
        let cache = Cache::new_lru_cache(config.block_cache_bytes as usize);
        let mut db_opts = cf_options(config, &cache);
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_wal_recovery_mode(WAL_RECOVERY_MODE);
        db_opts.set_paranoid_checks(true);
        db_opts.set_max_background_jobs(config.background_jobs as i32);
        let descriptors = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(config, &cache)));
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors)?;
        Ok(RocksBackend {
            db,
            sst_options: cf_options(config, &cache),
        })
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every family is created at open; a missing one is a bug.
        self.db
            .cf_handle(cf.name())
            .unwrap_or_else(|| panic!("column family {} missing", cf.name()))
    }

    fn view(&self) -> RocksView<'_> {
        RocksView {
            backend: self,
            snapshot: None,
        }
    }
}

struct RocksView<'a> {
    backend: &'a RocksBackend,
    snapshot: Option<&'a SnapshotWithThreadMode<'a, DB>>,
}

impl RocksView<'_> {
    fn read_options(&self, upper: Option<&[u8]>) -> ReadOptions {
        let mut opts = ReadOptions::default();
        if let Some(s) = self.snapshot {
            opts.set_snapshot(s);
        }
        if let Some(u) = upper {
            opts.set_iterate_upper_bound(u.to_vec());
        }
        opts
    }
}

impl View for RocksView<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let b = self.backend;
        Ok(b.db
            .get_pinned_cf_opt(b.handle(cf), key, &self.read_options(None))?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visitor<'_>) -> Result<()> {
        let b = self.backend;
        let mut it =
            b.db.raw_iterator_cf_opt(b.handle(cf), self.read_options(Some(end)));
        it.seek(start);
        while it.valid() {
            let (k, v) = (it.key().unwrap_or_default(), it.value().unwrap_or_default());
            if !visit(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }

    fn last_in(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let b = self.backend;
        let mut opts = self.read_options(Some(end));
        opts.set_iterate_lower_bound(start.to_vec());
        let mut it = b.db.raw_iterator_cf_opt(b.handle(cf), opts);
        it.seek_to_last();
        if it.valid() {
            return Ok(Some((
                it.key().unwrap_or_default().to_vec(),
                it.value().unwrap_or_default().to_vec(),
            )));
        }
        it.status()?;
        Ok(None)
    }

    fn export_range(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        let b = self.backend;
        let mut renamed = Vec::new();
        let mut writer = SstFileWriter::create(&b.sst_options);
        let mut writeback = Writeback::new(WRITEBACK_INTERVAL_BYTES);
        let mut entries = 0u64;
        let mut opened = false;
        let mut it =
            b.db.raw_iterator_cf_opt(b.handle(cf), self.read_options(Some(end)));
        it.seek(start);
        while it.valid() {
            if !opened {
                writer.open(path)?;
                opened = true;
            }
            let key = renamed_into(it.key().unwrap_or_default(), prefix, &mut renamed);
            let value = it.value().unwrap_or_default();
            writer.put(key, value)?;
            writeback.note(path, (key.len() + value.len()) as u64)?;
            entries += 1;
            it.next();
        }
        it.status()?;
        if !opened {
            return Ok(None);
        }
        finish_export(writer, path, entries).map(Some)
    }

    fn export_keys(
        &self,
        cf: Cf,
        keys: &[Vec<u8>],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        if keys.is_empty() {
            return Ok(None);
        }
        let b = self.backend;
        let mut writer = SstFileWriter::create(&b.sst_options);
        writer.open(path)?;
        let mut writeback = Writeback::new(WRITEBACK_INTERVAL_BYTES);
        let mut renamed = Vec::new();
        let options = self.read_options(None);
        for key in keys {
            let value = b.db.get_pinned_cf_opt(b.handle(cf), key, &options)?;
            let out = renamed_into(key, prefix, &mut renamed);
            let value_bytes = value.as_ref().map_or(0, |v| v.len());
            match value {
                Some(v) => writer.put(out, &v[..])?,
                None => writer.delete(out)?,
            }
            writeback.note(path, (out.len() + value_bytes) as u64)?;
        }
        finish_export(writer, path, keys.len() as u64).map(Some)
    }
}

/// Finishes an exported file of `entries` entries at `path`.
fn finish_export(mut writer: SstFileWriter<'_>, path: &Path, entries: u64) -> Result<ExportedFile> {
    writer.finish()?;
    let size_bytes = std::fs::metadata(path)
        .map_err(|e| EngineError::io(path, e))?
        .len();
    Ok(ExportedFile {
        entries,
        size_bytes,
    })
}

impl View for RocksBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.view().get(cf, key)
    }
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visitor<'_>) -> Result<()> {
        self.view().scan(cf, start, end, visit)
    }
    fn last_in(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.view().last_in(cf, start, end)
    }
    fn export_range(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        self.view().export_range(cf, start, end, prefix, path)
    }

    fn export_keys(
        &self,
        cf: Cf,
        keys: &[Vec<u8>],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        self.view().export_keys(cf, keys, prefix, path)
    }
}

impl Backend for RocksBackend {
    fn write(&self, set: WriteSet, sync: bool) -> Result<()> {
        // Room for every key and value plus RocksDB's per-record framing.
        let mut batch =
            WriteBatch::with_capacity_bytes(set.bytes as usize + set.ops.len() * 16 + 64);
        for op in set.ops {
            match op {
                WriteOp::Put(cf, k, v) => batch.put_cf(self.handle(cf), k, v),
                WriteOp::Delete(cf, k) => batch.delete_cf(self.handle(cf), k),
                WriteOp::DeleteRange(cf, s, e) => batch.delete_range_cf(self.handle(cf), s, e),
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn View) -> Result<()>) -> Result<()> {
        let snapshot = self.db.snapshot();
        f(&RocksView {
            backend: self,
            snapshot: Some(&snapshot),
        })
    }

    fn ingest(&self, cf: Cf, path: &Path) -> Result<()> {
        let mut opts = IngestExternalFileOptions::default();
        opts.set_move_files(true);
        self.db
            .ingest_external_file_cf_opts(self.handle(cf), &opts, vec![path])?;
        Ok(())
    }

    fn data_dir(&self) -> Option<&Path> {
        Some(self.db.path())
    }
}

#[cfg(test)]
mod tests {
    use super::Writeback;

    #[test]
    fn writeback_is_due_once_per_interval() {
        let mut w = Writeback::new(10);
        assert!(!w.due(4));
        assert!(!w.due(5));
        assert!(w.due(1), "the tenth byte completes the interval");
        assert!(!w.due(9), "the count starts again after a sync");
        assert!(w.due(25), "one large write is one sync");
        assert!(!w.due(0));
    }

    #[test]
    fn writeback_interval_zero_never_syncs() {
        let mut w = Writeback::new(0);
        assert!(!w.due(u64::MAX));
        assert!(!w.due(u64::MAX));
    }
}
