//! The membership of a group as of its applied index, and the node-local
//! address book of members added at runtime.
//!
//! A membership change is a log entry (`shoal_consensus::ConfChange`).
//! Applying it is ONE write with the applied index: the membership it
//! results in (with the index of its entry), and for an added member the
//! address it was added with. So after any crash the stored membership is
//! the one as of the applied index, as the consensus core requires of
//! `Storage::initial_state`; the core replays the changes above it from the
//! log. The group's raft-state record keeps the membership of its creation
//! or of its last installed snapshot; [`Engine::conf_state`] returns
//! whichever of the two is at the higher index.
//!
//! The address book is routing information of this node, not replicated
//! state: it maps a member's id to the address (`host:port`) the change
//! named, so a restarted node can reach members its command line does not
//! list.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_consensus::{ConfState, Index, NodeId};

use crate::backend::{Backend, Cf, WriteSet};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::keys::{
    decode_record, encode_record, meta_applied_key, meta_conf_key, meta_member_addr_key,
    meta_member_addr_range, meta_tagged_id,
};
use crate::kv::AppliedState;
use crate::GroupId;

/// Longest member address accepted (`host:port`), in bytes.
pub const MEMBER_ADDR_BYTES_MAX: usize = 255;

/// A group's membership and the index of the entry that set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedConf {
    /// Index of the change's entry.
    pub index: Index,
    /// The membership from then on.
    pub conf: ConfState,
}

impl<B: Backend> Engine<B> {
    /// Applies the committed membership change at `at` of `group`: records
    /// `conf` (and, for a member added with an address, `addr` in the
    /// address book) with the applied state, in one write. Not synced, like
    /// every apply.
    pub fn apply_conf_change(
        &self,
        group: GroupId,
        at: AppliedState,
        conf: &ConfState,
        addr: Option<(NodeId, &str)>,
    ) -> Result<()> {
        self.check_above_applied(group, at)?;
        let mut set = WriteSet::new();
        let key = meta_conf_key(group);
        let record = AppliedConf {
            index: at.index,
            conf: conf.clone(),
        };
        set.put(Cf::Meta, key.to_vec(), encode_record(&key, &record));
        if let Some((id, addr)) = addr {
            if addr.len() > MEMBER_ADDR_BYTES_MAX {
                return Err(EngineError::Invalid(format!(
                    "address of member {id}: {} bytes exceed {MEMBER_ADDR_BYTES_MAX}",
                    addr.len()
                )));
            }
            let key = meta_member_addr_key(id);
            set.put(
                Cf::Meta,
                key.to_vec(),
                encode_record(&key, &addr.to_owned()),
            );
        }
        let applied_key = meta_applied_key(group);
        set.put(
            Cf::Meta,
            applied_key.to_vec(),
            encode_record(&applied_key, &at),
        );
        self.backend().write(set, false)
    }

    /// The membership of `group` as of its applied index: the last applied
    /// change's, or the one its raft state records (creation, snapshot),
    /// whichever is at the higher index.
    pub fn conf_state(&self, group: GroupId) -> Result<ConfState> {
        let state = self.group_state(group)?;
        let state_index = state.snapshot.as_ref().map_or(0, |s| s.meta.index);
        Ok(match self.applied_conf(group)? {
            Some(c) if c.index > state_index => c.conf,
            _ => state.conf_state,
        })
    }

    /// The last membership change applied to `group`, if any.
    pub fn applied_conf(&self, group: GroupId) -> Result<Option<AppliedConf>> {
        let key = meta_conf_key(group);
        match self.backend().get(Cf::Meta, &key)? {
            Some(b) => Ok(Some(decode_record(&key, &b, &|| {
                format!("membership of group {group}")
            })?)),
            None => Ok(None),
        }
    }

    /// Empties the address book (a restored backup names the addresses
    /// of the cluster it came from). Synced.
    pub fn clear_member_addrs(&self) -> Result<()> {
        let (start, end) = meta_member_addr_range();
        let mut set = WriteSet::new();
        set.delete_range(Cf::Meta, start, end);
        self.backend().write(set, true)
    }

    /// The address book: every member's address recorded by an applied
    /// change.
    pub fn member_addrs(&self) -> Result<BTreeMap<NodeId, String>> {
        let (start, end) = meta_member_addr_range();
        let mut out = BTreeMap::new();
        self.backend().scan(Cf::Meta, &start, &end, &mut |k, v| {
            let id = meta_tagged_id(k).ok_or_else(|| {
                EngineError::Corrupt(format!("a member address key of {} bytes", k.len()))
            })?;
            let addr: String = decode_record(k, v, &|| format!("address of member {id}"))?;
            out.insert(id, addr);
            Ok(true)
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{GroupWrite, LogBatch};
    use crate::{EngineConfig, MemStore};
    use shoal_consensus::{Snapshot, SnapshotMeta};

    fn conf(voters: &[NodeId], learners: &[NodeId]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
        }
    }

    #[test]
    fn applied_membership_wins_until_a_newer_snapshot_is_installed() {
        let e = MemStore::new_in_memory(EngineConfig::default()).unwrap();
        let write = |w: GroupWrite| e.write_log(LogBatch { groups: vec![w] }).unwrap();
        write(GroupWrite {
            group: 3,
            conf_state: Some(conf(&[1, 2, 3], &[])),
            ..Default::default()
        });
        assert_eq!(e.conf_state(3).unwrap(), conf(&[1, 2, 3], &[]));
        let at = AppliedState { index: 5, term: 1 };
        e.apply_conf_change(
            3,
            at,
            &conf(&[1, 2, 3], &[4]),
            Some((4, "node4.example:7000")),
        )
        .unwrap();
        assert_eq!(e.conf_state(3).unwrap(), conf(&[1, 2, 3], &[4]));
        assert_eq!(e.applied(3).unwrap(), at);
        assert_eq!(
            e.member_addrs().unwrap(),
            BTreeMap::from([(4, "node4.example:7000".to_owned())])
        );
        assert!(e.apply_conf_change(3, at, &conf(&[1], &[]), None).is_err());
        // A snapshot at a higher index carries a newer membership.
        write(GroupWrite {
            group: 3,
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    index: 9,
                    term: 2,
                    conf_state: conf(&[1, 2, 3, 4], &[]),
                },
                data: Default::default(),
            }),
            ..Default::default()
        });
        assert_eq!(e.conf_state(3).unwrap(), conf(&[1, 2, 3, 4], &[]));
        let long = "x".repeat(MEMBER_ADDR_BYTES_MAX + 1);
        let at = AppliedState { index: 10, term: 2 };
        assert!(e
            .apply_conf_change(3, at, &conf(&[1], &[]), Some((5, &long)))
            .is_err());
        assert_eq!(e.conf_state(3).unwrap(), conf(&[1, 2, 3, 4], &[]));
    }
}
