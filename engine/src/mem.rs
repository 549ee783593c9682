//! [`Backend`] on ordered in-memory maps, for simulation and model tests.
//!
//! Writes are applied at once and visible to readers; writes not yet made
//! durable by a synced write are remembered in an undo log so that
//! [`MemBackend::crash`] can drop them, the way a process crash drops
//! RocksDB writes that never reached a synced WAL record.
//!
//! Each column family's map sits behind an `Arc`, copied on write while a
//! point-in-time view ([`Backend::with_view`]) still shares it, so a view
//! holds no lock: a view kept for minutes (a node's input pin) does not
//! stop writers, as a RocksDB snapshot does not. Views taken and dropped
//! between writes, as apply's are, never cause a copy.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::backend::{renamed_into, Backend, Cf, ExportedFile, View, Visitor, WriteOp, WriteSet};
use crate::error::{EngineError, Result};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
struct State {
    /// Shared with the views taken since the last write (copy on write).
    maps: BTreeMap<Cf, Arc<Map>>,
    /// Previous values of every key touched since the last sync, newest last.
    undo: Vec<(Cf, Vec<u8>, Option<Vec<u8>>)>,
}

impl State {
    fn map(&mut self, cf: Cf) -> &mut Map {
        Arc::make_mut(self.maps.entry(cf).or_default())
    }

    fn set(&mut self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
        let old = match value {
            Some(v) => self.map(cf).insert(key.clone(), v),
            None => self.map(cf).remove(&key),
        };
        self.undo.push((cf, key, old));
    }
}

/// An in-memory backend with crash semantics. Cloning is not offered: share
/// it behind an `Arc`.
#[derive(Default)]
pub struct MemBackend {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemBackend")
    }
}

fn range<'a>(
    map: &'a Map,
    start: &[u8],
    end: &[u8],
) -> impl DoubleEndedIterator<Item = (&'a Vec<u8>, &'a Vec<u8>)> + 'a {
    let valid = start < end;
    // An inverted or empty range reads nothing (BTreeMap::range would panic).
    let end = if valid { end } else { start };
    let bounds = (
        Bound::Included(start.to_vec()),
        Bound::Excluded(end.to_vec()),
    );
    map.range(bounds).filter(move |_| valid)
}

impl MemBackend {
    /// A new, empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a process crash: every write since the last synced write is
    /// undone.
    pub fn crash(&self) {
        let mut st = self.lock();
        while let Some((cf, key, old)) = st.undo.pop() {
            match old {
                Some(v) => st.map(cf).insert(key, v),
                None => st.map(cf).remove(&key),
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads at one point: the maps as they were when the view was taken.
struct MemView<'a>(&'a BTreeMap<Cf, Arc<Map>>);

impl View for MemView<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(&cf).and_then(|m| m.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visitor<'_>) -> Result<()> {
        if let Some(m) = self.0.get(&cf) {
            for (k, v) in range(m, start, end) {
                if !visit(k, v)? {
                    break;
                }
            }
        }
        Ok(())
    }

    fn last_in(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self.0.get(&cf).and_then(|m| {
            range(m, start, end)
                .next_back()
                .map(|(k, v)| (k.clone(), v.clone()))
        }))
    }

    fn export_range(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        let mut renamed = Vec::new();
        let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = match self.0.get(&cf) {
            Some(m) => range(m, start, end)
                .map(|(k, v)| {
                    (
                        renamed_into(k, prefix, &mut renamed).to_vec(),
                        Some(v.clone()),
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        write_file(&pairs, path)
    }

    fn export_keys(
        &self,
        cf: Cf,
        keys: &[Vec<u8>],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        let mut renamed = Vec::new();
        let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys
            .iter()
            .map(|k| {
                let value = self.0.get(&cf).and_then(|m| m.get(k).cloned());
                (renamed_into(k, prefix, &mut renamed).to_vec(), value)
            })
            .collect();
        write_file(&pairs, path)
    }
}

/// Writes an exported file: its pairs, a `None` value being a deletion
/// (what an SST's delete entry is to RocksDB). `None` (no file) if empty.
fn write_file(pairs: &[(Vec<u8>, Option<Vec<u8>>)], path: &Path) -> Result<Option<ExportedFile>> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let bytes = postcard::to_stdvec(pairs).map_err(|e| EngineError::Corrupt(e.to_string()))?;
    std::fs::write(path, &bytes).map_err(|e| EngineError::io(path, e))?;
    Ok(Some(ExportedFile {
        entries: pairs.len() as u64,
        size_bytes: bytes.len() as u64,
    }))
}

impl View for MemBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        MemView(&self.lock().maps).get(cf, key)
    }
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], visit: &mut Visitor<'_>) -> Result<()> {
        MemView(&self.lock().maps).scan(cf, start, end, visit)
    }
    fn last_in(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        MemView(&self.lock().maps).last_in(cf, start, end)
    }
    fn export_range(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        MemView(&self.lock().maps).export_range(cf, start, end, prefix, path)
    }

    fn export_keys(
        &self,
        cf: Cf,
        keys: &[Vec<u8>],
        prefix: Option<&[u8]>,
        path: &Path,
    ) -> Result<Option<ExportedFile>> {
        MemView(&self.lock().maps).export_keys(cf, keys, prefix, path)
    }
}

impl Backend for MemBackend {
    fn write(&self, set: WriteSet, sync: bool) -> Result<()> {
        let mut st = self.lock();
        for op in set.ops {
            match op {
                WriteOp::Put(cf, k, v) => st.set(cf, k, Some(v)),
                WriteOp::Delete(cf, k) => st.set(cf, k, None),
                WriteOp::DeleteRange(cf, s, e) => {
                    let keys: Vec<Vec<u8>> =
                        range(st.map(cf), &s, &e).map(|(k, _)| k.clone()).collect();
                    for k in keys {
                        st.set(cf, k, None);
                    }
                }
            }
        }
        if sync {
            st.undo.clear();
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.lock().undo.clear();
        Ok(())
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn View) -> Result<()>) -> Result<()> {
        // The maps as of now, without the lock: writers copy what they
        // change while this view lives.
        let maps = self.lock().maps.clone();
        f(&MemView(&maps))
    }

    fn ingest(&self, cf: Cf, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = postcard::from_bytes(&bytes)
            .map_err(|e| EngineError::Corrupt(format!("snapshot file {}: {e}", path.display())))?;
        let mut st = self.lock();
        for (k, v) in pairs {
            st.set(cf, k, v);
        }
        // Ingestion is durable on return, as RocksDB's is.
        st.undo.clear();
        drop(st);
        std::fs::remove_file(path).map_err(|e| EngineError::io(path, e))
    }

    fn data_dir(&self) -> Option<&Path> {
        None
    }
}
