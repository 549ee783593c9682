//! Shard ownership: which shards a group's state machine serves, by config
//! number, and the storage side of a shard moving between groups.
//!
//! A group keeps one [`ShardRecord`] per shard it has ever been told about,
//! in `meta`, in its own key range (so a Raft snapshot of the group carries
//! them). The rules that change records (the lab's Freeze → Install →
//! Delete, fenced by config number) are the shard layer's; this module only
//! stores their outcome atomically with the applied index:
//! [`Engine::apply_shard_change`] for a new record (optionally dropping the
//! shard's data and sessions), and [`Engine::install_shard`] (in
//! [`crate::snapshot`]) for a record that comes with files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Cf, View, WriteSet};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::keys::{
    decode_record, encode_record, group_range, meta_applied_key, meta_shard_group_range,
    meta_shard_key, shard_range, SHARD_PREFIX_BYTES,
};
use crate::kv::AppliedState;
use crate::{GroupId, ShardId};

/// Where a shard stands in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardStatus {
    /// The group serves the shard's reads and writes.
    Serving,
    /// The group holds the shard's data but refuses its requests: it is
    /// being handed to another group.
    Frozen,
    /// The group holds nothing of the shard.
    Absent,
}

/// A group's record of one shard: its status as of config `num`, the
/// highest config number the group has seen for the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Highest config number seen for the shard.
    pub num: u64,
    /// What the group does with it.
    pub status: ShardStatus,
}

/// How much of one shard a group holds: its stored keys and their bytes
/// (keys and records as stored, before compression).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSize {
    /// Keys stored.
    pub keys: u64,
    /// Bytes of the stored keys and records.
    pub bytes: u64,
}

/// Adds one stored `kv` pair to the sizes, by the shard its key names (a
/// key too short to name one is not a shard's and is skipped).
fn count_kv_pair(sizes: &mut BTreeMap<ShardId, ShardSize>, key: &[u8], value: &[u8]) {
    let Some(shard) = key
        .get(8..SHARD_PREFIX_BYTES)
        .and_then(|b| b.try_into().ok())
        .map(ShardId::from_be_bytes)
    else {
        return;
    };
    let size = sizes.entry(shard).or_default();
    size.keys += 1;
    size.bytes += (key.len() + value.len()) as u64;
}

impl<B: Backend> Engine<B> {
    /// Every shard's size in `group` (see [`ShardSize`]), read in one view;
    /// shards holding no key are absent. Blocking: reads all of the group's
    /// data, so never call it on an event loop.
    pub fn shard_sizes(&self, group: GroupId) -> Result<BTreeMap<ShardId, ShardSize>> {
        let (start, end) = group_range(group);
        let mut sizes = BTreeMap::new();
        self.backend()
            .scan(Cf::Kv, &start, &end, &mut |key, value| {
                count_kv_pair(&mut sizes, key, value);
                Ok(true)
            })?;
        Ok(sizes)
    }

    /// Every shard record of `group`, by shard.
    pub fn shard_records(&self, group: GroupId) -> Result<BTreeMap<ShardId, ShardRecord>> {
        read_shard_records(self.backend(), group)
    }

    /// Applies committed entry `at` of `group` whose effect is that
    /// `shard`'s record becomes `record`, removing the shard's data and
    /// sessions too if `clear` (a shard handed over). One write, with the
    /// applied state; `at` must be above the applied index. Not synced,
    /// like every apply.
    pub fn apply_shard_change(
        &self,
        group: GroupId,
        at: AppliedState,
        shard: ShardId,
        record: ShardRecord,
        clear: bool,
    ) -> Result<()> {
        self.apply_shard_changes(group, at, &[(shard, record, clear)])
    }

    /// [`Self::apply_shard_change`] for several shards in one entry: each
    /// (shard, record, clear) in one write with the applied state.
    pub fn apply_shard_changes(
        &self,
        group: GroupId,
        at: AppliedState,
        changes: &[(ShardId, ShardRecord, bool)],
    ) -> Result<()> {
        self.check_above_applied(group, at)?;
        let mut set = WriteSet::new();
        for &(shard, record, clear) in changes {
            if clear {
                let (start, end) = shard_range(group, shard);
                set.delete_range(Cf::Kv, start.clone(), end.clone());
                set.delete_range(Cf::Dedup, start, end);
            }
            let key = meta_shard_key(group, shard);
            set.put(Cf::Meta, key.clone(), encode_record(&key, &record));
        }
        let applied_key = meta_applied_key(group);
        set.put(
            Cf::Meta,
            applied_key.to_vec(),
            encode_record(&applied_key, &at),
        );
        let mut cache = self.apply_cache();
        // The cache may hold the cleared keys.
        cache.clear();
        self.backend().write(set, false)
    }
}

/// Every shard record of `group` as `view` holds it, by shard.
pub(crate) fn read_shard_records(
    view: &(impl View + ?Sized),
    group: GroupId,
) -> Result<BTreeMap<ShardId, ShardRecord>> {
    let (start, end) = meta_shard_group_range(group);
    let mut out = BTreeMap::new();
    view.scan(Cf::Meta, &start, &end, &mut |k, v| {
        let shard = k
            .get(1 + 8..1 + SHARD_PREFIX_BYTES)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| {
                EngineError::Corrupt(format!(
                    "a shard record key of {} bytes in group {group}",
                    k.len()
                ))
            })?;
        let record: ShardRecord = decode_record(k, v, &|| {
            format!("record of shard {shard} in group {group}")
        })?;
        out.insert(shard, record);
        Ok(true)
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::kv_key;

    // Goal: pairs count towards the shard their key names; a key too short
    // to name a shard counts nowhere.
    #[test]
    fn kv_pairs_count_by_the_shard_their_key_names() {
        let mut sizes = BTreeMap::new();
        count_kv_pair(&mut sizes, &kv_key(7, 3, b"a"), b"12345");
        count_kv_pair(&mut sizes, &kv_key(7, 3, b"bb"), b"1");
        count_kv_pair(&mut sizes, &kv_key(7, 255, b""), b"");
        count_kv_pair(&mut sizes, &[0; 5], b"x");
        assert_eq!(
            sizes,
            BTreeMap::from([
                (
                    3,
                    ShardSize {
                        keys: 2,
                        bytes: (13 + 5) + (14 + 1)
                    }
                ),
                (255, ShardSize { keys: 1, bytes: 12 }),
            ])
        );
    }
}
