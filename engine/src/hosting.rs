//! Which Raft groups a node hosts beyond its static configuration, and the
//! removal of a group's whole storage when it stops hosting one.
//!
//! A node's configuration names the groups it always hosts; groups created
//! at runtime are recorded here, one `meta` record per group (its voters),
//! so that a restarted node opens them again. Both changes are ONE synced
//! write each, so a crash leaves a group either fully hosted or fully gone:
//! - [`Engine::host_group`] writes the hosted record together with the
//!   group's membership (for a brand-new group), so no crash can leave a
//!   membership without the record that reopens it, nor the reverse;
//! - [`Engine::drop_group`] deletes the group's log, raft state, data,
//!   sessions, applied state and shard records together with its hosted
//!   record, and writes a *tombstone*. A dropped group is never hosted
//!   again on this node: its vote and log are gone, and a voter that
//!   rejoined its group with an empty state could vote twice in one term.

use std::collections::BTreeMap;

use shoal_consensus::{ConfState, NodeId};

use crate::backend::{Backend, Cf, WriteSet};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::keys::{
    decode_record, encode_record, group_key, group_range, log_key, meta_applied_key, meta_conf_key,
    meta_dropped_key, meta_hosted_key, meta_hosted_range, meta_install_key, meta_shard_group_range,
    meta_tagged_id,
};
use crate::log::{stage_group_write, GroupWrite};
use crate::GroupId;

impl<B: Backend> Engine<B> {
    /// Every group recorded by [`Self::host_group`] and not dropped since,
    /// with the voters it was hosted with.
    pub fn hosted_groups(&self) -> Result<BTreeMap<GroupId, Vec<NodeId>>> {
        let (start, end) = meta_hosted_range();
        let mut out = BTreeMap::new();
        self.backend().scan(Cf::Meta, &start, &end, &mut |k, v| {
            let group = meta_tagged_id(k).ok_or_else(|| {
                EngineError::Corrupt(format!("a hosted-group key of {} bytes", k.len()))
            })?;
            let voters: Vec<NodeId> =
                decode_record(k, v, &|| format!("hosted record of group {group}"))?;
            out.insert(group, voters);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Whether `group` was dropped on this node ([`Self::drop_group`]).
    pub fn group_dropped(&self, group: GroupId) -> Result<bool> {
        Ok(self
            .backend()
            .get(Cf::Meta, &meta_dropped_key(group))?
            .is_some())
    }

    /// Records that this node hosts `group` with `voters`, and writes the
    /// group's membership if it has none yet (a brand-new group), in one
    /// synced write. Refused ([`EngineError::Invalid`], nothing written) if
    /// the group was dropped here, or already has a membership with other
    /// voters. Recording it again with the same voters changes nothing.
    pub fn host_group(&self, group: GroupId, voters: &[NodeId]) -> Result<()> {
        let _writer = self.log_write_lock();
        if self.group_dropped(group)? {
            return Err(EngineError::Invalid(format!(
                "group {group} was dropped on this node and cannot be hosted again"
            )));
        }
        let mut log = self.group_log(group)?;
        let mut set = WriteSet::new();
        let stored = sorted(&log.state.conf_state.voters);
        if voters.is_empty() {
            // Joining: the membership comes from the group's leader.
            if !stored.is_empty() {
                return Err(EngineError::Invalid(format!(
                    "group {group} has voters {stored:?} here: it cannot join it anew"
                )));
            }
        } else if stored.is_empty() {
            stage_group_write(
                &mut set,
                &mut log,
                GroupWrite {
                    group,
                    conf_state: Some(ConfState {
                        voters: voters.to_vec(),
                        learners: Vec::new(),
                    }),
                    ..Default::default()
                },
            )?;
        } else if stored != sorted(voters) {
            return Err(EngineError::Invalid(format!(
                "group {group} has voters {stored:?} here, not {voters:?}"
            )));
        }
        let key = meta_hosted_key(group);
        set.put(
            Cf::Meta,
            key.to_vec(),
            encode_record(&key, &voters.to_vec()),
        );
        self.backend().write(set, true)?;
        self.cache_group(log);
        Ok(())
    }

    /// Removes everything `group` stored on this node — log, raft state,
    /// data and sessions of every shard, applied state, shard records,
    /// install marker, hosted record — and writes its tombstone, in one
    /// synced write. The caller stops using the group first: a later log
    /// write for it would bring its raft state back.
    pub fn drop_group(&self, group: GroupId) -> Result<()> {
        let _writer = self.log_write_lock();
        let mut set = WriteSet::new();
        set.delete_range(
            Cf::RaftLog,
            log_key(group, 0).to_vec(),
            log_key(group, u64::MAX).to_vec(),
        );
        // The one log key the range above leaves out.
        set.delete(Cf::RaftLog, log_key(group, u64::MAX).to_vec());
        set.delete(Cf::RaftState, group_key(group).to_vec());
        let (start, end) = group_range(group);
        set.delete_range(Cf::Kv, start.clone(), end.clone());
        set.delete_range(Cf::Dedup, start, end);
        let (start, end) = meta_shard_group_range(group);
        set.delete_range(Cf::Meta, start, end);
        set.delete(Cf::Meta, meta_applied_key(group).to_vec());
        set.delete(Cf::Meta, meta_conf_key(group).to_vec());
        set.delete(Cf::Meta, meta_install_key(group).to_vec());
        set.delete(Cf::Meta, meta_hosted_key(group).to_vec());
        let tombstone = meta_dropped_key(group);
        set.put(Cf::Meta, tombstone.to_vec(), encode_record(&tombstone, &()));
        // The cache may hold the group's keys.
        self.apply_cache().clear();
        self.backend().write(set, true)?;
        self.forget_group(group);
        Ok(())
    }
}

fn sorted(voters: &[NodeId]) -> Vec<NodeId> {
    let mut v = voters.to_vec();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use shoal_consensus::{Entry, HardState};

    use crate::kv::{ApplyEntry, Command, Request};
    use crate::log::LogBatch;
    use crate::shards::{ShardRecord, ShardStatus};
    use crate::{AppliedState, EngineConfig, MemStore};

    use super::*;

    fn engine() -> MemStore {
        MemStore::new_in_memory(EngineConfig::default()).unwrap()
    }

    /// Gives `group` a log entry, a hard state, a key, a session and a
    /// shard record, all applied.
    fn fill<B: Backend>(engine: &Engine<B>, group: GroupId) {
        let entry = Entry {
            term: 1,
            index: 1,
            data: Bytes::from_static(b"x"),
            ..Default::default()
        };
        engine
            .write_log(LogBatch {
                groups: vec![GroupWrite {
                    group,
                    entries: vec![entry],
                    hard_state: Some(HardState {
                        term: 1,
                        vote: 1,
                        commit: 1,
                    }),
                    ..Default::default()
                }],
            })
            .unwrap();
        let put = Request {
            shard: 3,
            client: 9,
            seq: 1,
            command: Command::Put {
                key: "k".into(),
                value: "v".into(),
            },
        };
        engine
            .apply(
                group,
                &[ApplyEntry {
                    index: 1,
                    term: 1,
                    requests: vec![put],
                }],
            )
            .unwrap();
        let record = ShardRecord {
            num: 1,
            status: ShardStatus::Serving,
        };
        engine
            .apply_shard_change(group, AppliedState { index: 2, term: 1 }, 4, record, false)
            .unwrap();
        engine.sync().unwrap();
    }

    // Goal: hosting is durable at once and writes a brand-new group's
    // membership with it; hosting again with the same voters is a no-op,
    // with other voters a refusal.
    #[test]
    fn hosting_is_durable_and_writes_the_membership() {
        let e = engine();
        e.host_group(7, &[3, 1, 2]).unwrap();
        e.crash_and_recover().unwrap();
        assert_eq!(
            e.hosted_groups().unwrap(),
            BTreeMap::from([(7, vec![3, 1, 2])])
        );
        assert_eq!(e.group_state(7).unwrap().conf_state.voters, vec![3, 1, 2]);
        e.host_group(7, &[1, 2, 3]).unwrap();
        assert!(matches!(
            e.host_group(7, &[1, 2]),
            Err(EngineError::Invalid(_))
        ));
        assert_eq!(e.hosted_groups().unwrap().len(), 1);
        assert!(!e.group_dropped(7).unwrap());
    }

    // Goal: dropping a group leaves nothing of it (stored bytes back to an
    // engine that never had it, plus the tombstone), leaves other groups
    // alone, survives a crash, and the group cannot be hosted again.
    #[test]
    fn drop_removes_everything_of_the_group_only() {
        let e = engine();
        let reference = engine();
        check_drop(&e, &reference, || e.crash_and_recover().unwrap());
    }

    // Goal: the same on RocksDB (its range deletes), across a reopen.
    #[test]
    fn drop_removes_everything_of_the_group_only_on_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let reference =
            crate::RocksEngine::open(dir.path().join("r"), EngineConfig::default()).unwrap();
        let e = crate::RocksEngine::open(dir.path().join("e"), EngineConfig::default()).unwrap();
        check_drop(&e, &reference, || {});
        drop(e);
        let e = crate::RocksEngine::open(dir.path().join("e"), EngineConfig::default()).unwrap();
        assert!(e.group_dropped(7).unwrap());
        assert_eq!(
            e.hosted_groups()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(e.get(7, 3, b"k").unwrap(), None);
    }

    fn check_drop<B: Backend>(e: &Engine<B>, reference: &Engine<B>, crash: impl FnOnce()) {
        for engine in [e, reference] {
            engine.host_group(2, &[1, 2, 3]).unwrap();
            fill(engine, 2);
        }
        e.host_group(7, &[1, 2, 3]).unwrap();
        fill(e, 7);
        assert!(e.stored_bytes().unwrap() > reference.stored_bytes().unwrap());
        e.drop_group(7).unwrap();
        crash();
        let tombstone = meta_dropped_key(7);
        let tombstone_bytes = (tombstone.len() + encode_record(&tombstone, &()).len()) as u64;
        assert_eq!(
            e.stored_bytes().unwrap(),
            reference.stored_bytes().unwrap() + tombstone_bytes
        );
        assert!(e.group_dropped(7).unwrap());
        assert_eq!(
            e.hosted_groups()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(e.group_state(7).unwrap(), Default::default());
        assert_eq!(e.last_index(7).unwrap(), 0);
        assert_eq!(e.get(7, 3, b"k").unwrap(), None);
        assert_eq!(e.get(2, 3, b"k").unwrap().unwrap().value, "v");
        assert!(matches!(
            e.host_group(7, &[1, 2, 3]),
            Err(EngineError::Invalid(_))
        ));
    }
}
