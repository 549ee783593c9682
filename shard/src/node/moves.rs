//! Shard moves on a replica group: what each step does to a shard's record,
//! decided by a pure function every replica runs alike on the committed
//! entry, and where a moving shard's files live on a node.
//!
//! A move of shard `s` from group A to group B for config `n` is three
//! entries (the lab's Freeze → Install → Delete), each fenced by `n`:
//! 1. A applies `Freeze { s, n }`: it stops serving `s` (reads and writes
//!    get `WrongGroup` from then on, in log order). A's leader then exports
//!    `s` (kv and sessions at one point in time, renamed into B's key range)
//!    and streams the files to every node of B, which keep them under
//!    [`incoming_dir`]; only then is the freeze answered. A repeated
//!    freeze exports and ships again: each export has its own directory
//!    ([`export_id`]), so a later one never replaces the files an install
//!    of an earlier one names.
//! 2. B applies `Install { s, n, manifest }`: each replica ingests the
//!    files of that export (crash-atomic, with the applied index and the
//!    new record) and serves `s`. The sessions moved with the data, so a
//!    write retried across the move is still applied once.
//! 3. A applies `Delete { s, n }`: it drops `s`'s data.
//!
//! Before step 1, the controller may have A's leader pre-copy the shard
//! while it still serves (see [`super::precopy`]): then the freeze's export
//! holds only what changed since, and the pre-copied file, which each node
//! of B links in from the pre-copy's directory.
//!
//! Every group keeps, per shard, the highest config number it has seen:
//! a step of an older config is answered `Stale` and changes nothing, and a
//! step repeated with the same number is a success that changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shoal_consensus::NodeId;
use shoal_engine::{GroupId, Request, ShardId, ShardRecord, ShardStatus, SnapshotManifest};

use crate::protocol::{ShardCommand, ShardReply};

/// What one log entry of a group holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Client requests (and the leader's session expiries), applied in order.
    Requests(Vec<Request>),
    /// A shard move step.
    Shard(ShardCommand),
}

/// What applying a shard step does to the shard's storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing (a repeat, a stale or refused step).
    None,
    /// The shard's record becomes `record`; with `clear`, its data and
    /// sessions are dropped too (they start empty, or were handed over).
    Record {
        /// One shard's new record.
        shard: ShardId,
        /// The record.
        record: ShardRecord,
        /// Drop the shard's data and sessions.
        clear: bool,
    },
    /// Several shards become served and empty (a `Create`).
    Create {
        /// The shards.
        shards: Vec<ShardId>,
        /// Their record.
        record: ShardRecord,
    },
    /// The shard's data becomes the shipped files', its record `record`.
    Ingest {
        /// The shard.
        shard: ShardId,
        /// The record.
        record: ShardRecord,
    },
}

/// The outcome of one shard step: the effect on storage and the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to store.
    pub effect: Effect,
    /// What the step's caller is told (a `Freeze` that took effect is
    /// answered later, once its files are shipped).
    pub reply: ShardReply,
}

/// The record a group has for a shard it was never told about.
pub const RECORD_NONE: ShardRecord = ShardRecord {
    num: 0,
    status: ShardStatus::Absent,
};

/// Decides what `command` does in `group` given the group's records
/// (`record_of` returns [`RECORD_NONE`] for an unknown shard). A pure
/// function of the entry and the state: every replica decides alike.
pub fn decide(
    group: GroupId,
    command: &ShardCommand,
    record_of: impl Fn(ShardId) -> ShardRecord,
) -> Decision {
    let done = |effect| Decision {
        effect,
        reply: ShardReply::Done,
    };
    let stale = |num| Decision {
        effect: Effect::None,
        reply: ShardReply::Stale { num },
    };
    let refused = |reason: String| Decision {
        effect: Effect::None,
        reply: ShardReply::Refused { reason },
    };
    let num = command.num();
    match command {
        ShardCommand::Create { shards, .. } => {
            let mut created = Vec::new();
            for &shard in shards {
                let r = record_of(shard);
                if r.num > num {
                    return stale(r.num);
                }
                match r.status {
                    ShardStatus::Serving if r.num == num => {}
                    ShardStatus::Absent if r.num < num => created.push(shard),
                    ShardStatus::Absent if r.num == num => {
                        return refused(format!(
                            "shard {shard} was handed over at config {num}; it cannot be created"
                        ))
                    }
                    _ => {
                        return refused(format!(
                            "shard {shard} holds data here ({:?} at config {}); only a shard that never did can be created",
                            r.status, r.num
                        ))
                    }
                }
            }
            if created.is_empty() {
                return done(Effect::None);
            }
            done(Effect::Create {
                shards: created,
                record: ShardRecord {
                    num,
                    status: ShardStatus::Serving,
                },
            })
        }
        ShardCommand::Freeze { shard, .. } => {
            let r = record_of(*shard);
            if r.num > num {
                return stale(r.num);
            }
            let frozen = ShardRecord {
                num,
                status: ShardStatus::Frozen,
            };
            match r.status {
                ShardStatus::Serving => done(Effect::Record {
                    shard: *shard,
                    record: frozen,
                    clear: false,
                }),
                ShardStatus::Frozen if r.num == num => done(Effect::None),
                // Frozen by an older config whose move a new controller
                // now redoes as part of this one.
                ShardStatus::Frozen => done(Effect::Record {
                    shard: *shard,
                    record: frozen,
                    clear: false,
                }),
                // Already handed over and deleted for this config: the
                // destination installed it before the delete.
                ShardStatus::Absent if r.num == num => done(Effect::None),
                ShardStatus::Absent => refused(format!(
                    "shard {shard} is not held by this group (config {})",
                    r.num
                )),
            }
        }
        // Carried out by a leader alone (`super::precopy`), never proposed;
        // an entry holding one changes nothing.
        ShardCommand::Precopy { .. } => refused("a pre-copy is not a log entry".to_string()),
        ShardCommand::Install {
            shard, manifest, ..
        } => {
            let r = record_of(*shard);
            if r.num > num {
                return stale(r.num);
            }
            match r.status {
                ShardStatus::Serving if r.num == num => done(Effect::None),
                ShardStatus::Serving => refused(format!(
                    "shard {shard} is served here already (config {})",
                    r.num
                )),
                _ if manifest.scope
                    != (shoal_engine::SnapshotScope::Shard {
                        shard: *shard,
                        target: group,
                    }) =>
                {
                    refused(format!("the manifest is not an export of shard {shard}"))
                }
                _ => done(Effect::Ingest {
                    shard: *shard,
                    record: ShardRecord {
                        num,
                        status: ShardStatus::Serving,
                    },
                }),
            }
        }
        ShardCommand::Delete { shard, .. } => {
            let r = record_of(*shard);
            if r.num > num {
                return stale(r.num);
            }
            match r.status {
                ShardStatus::Frozen => done(Effect::Record {
                    shard: *shard,
                    record: ShardRecord {
                        num,
                        status: ShardStatus::Absent,
                    },
                    clear: true,
                }),
                ShardStatus::Absent => done(Effect::None),
                ShardStatus::Serving => refused(format!(
                    "shard {shard} is served here (config {}); only a frozen shard can be deleted",
                    r.num
                )),
            }
        }
    }
}

/// The identity of one export of a moving shard: a digest of its manifest
/// (which names each file's checksum and the source's applied index). A
/// shard can be exported more than once for the same config: a repeated
/// freeze (a controller retrying, or several controllers carrying out the
/// same change) ships a fresh export, possibly from another leader. Each
/// export lives in its own directory on the destination, so one never
/// overwrites the files of another that an install already names.
pub fn export_id(manifest: &SnapshotManifest) -> u64 {
    // FNV-1a over the manifest's postcard bytes: deterministic, and the
    // same on the shipping and the installing side.
    let bytes = postcard::to_stdvec(manifest).expect("a manifest always serializes");
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Where a node keeps the files of export `export` ([`export_id`]) of
/// `shard`, shipped to `group` for config `num`, until the install applies.
pub fn incoming_dir(root: &Path, group: GroupId, shard: ShardId, num: u64, export: u64) -> PathBuf {
    root.join(format!("move-in-g{group}-s{shard}-n{num}-e{export:016x}"))
}

/// Where a source leader exports `shard` of `group` for config `num`,
/// answering the freeze at log index `index`: each freeze, repeats
/// included, exports into a directory of its own, so two ships of the same
/// shard never share (and delete) each other's files.
pub fn outgoing_dir(root: &Path, group: GroupId, shard: ShardId, num: u64, index: u64) -> PathBuf {
    root.join(format!("move-out-g{group}-s{shard}-n{num}-i{index}"))
}

/// Whether the files of the export `manifest` names are in place in
/// `dir` (its incoming directory): the manifest there is the same and
/// every file has its size. Reads only the small manifest and the files'
/// metadata (the files are verified when ingested). Blocking.
pub fn files_in_place(dir: &Path, manifest: &SnapshotManifest) -> bool {
    shoal_engine::snapshot::read_manifest(dir).is_ok_and(|m| {
        &m == manifest
            && m.files.iter().all(|f| {
                std::fs::metadata(dir.join(&f.name)).is_ok_and(|meta| meta.len() == f.size_bytes)
            })
    })
}

/// One export of a moving shard on its destination group: (group, shard,
/// config number, [`export_id`]).
pub type ExportKey = (GroupId, ShardId, u64, u64);

/// Which members of the destination group still lack an install's files,
/// as its leader decides before it proposes the install: every member of
/// the membership in force (`members`, learners included) but the leader
/// itself (`me`, which checked its own copy), the nodes the freeze shipped
/// to (`holders`, the group's members in the config) and those the leader
/// forwarded its copy to already (`forwarded`). Each replica ingests the
/// files when it applies the install, so none may be missing: a member
/// added after the config was written (`shoal member add --group`) is not
/// among the holders.
pub fn install_files_missing(
    members: impl IntoIterator<Item = NodeId>,
    me: NodeId,
    holders: &[NodeId],
    forwarded: &BTreeSet<NodeId>,
) -> Vec<NodeId> {
    let mut missing: Vec<NodeId> = members
        .into_iter()
        .filter(|m| *m != me && !holders.contains(m) && !forwarded.contains(m))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

/// The install files a destination leader forwards to members that the
/// freeze did not ship to (see [`install_files_missing`]): what has been
/// forwarded, and what is being forwarded now (one task per export).
#[derive(Debug, Default)]
pub struct Forwards {
    done: BTreeMap<ExportKey, BTreeSet<NodeId>>,
    running: BTreeSet<ExportKey>,
}

impl Forwards {
    /// The members `key`'s files were forwarded to.
    pub fn forwarded(&self, key: &ExportKey) -> BTreeSet<NodeId> {
        self.done.get(key).cloned().unwrap_or_default()
    }

    /// Starts forwarding `key`'s files unless a forward of it runs already;
    /// true if the caller is to start it.
    pub fn start(&mut self, key: ExportKey) -> bool {
        self.running.insert(key)
    }

    /// A forward of `key` ended; `to` got the files if `ok`.
    pub fn finish(&mut self, key: ExportKey, to: &[NodeId], ok: bool) {
        self.running.remove(&key);
        if ok {
            self.done.entry(key).or_default().extend(to.iter().copied());
        }
    }

    /// Forgets the exports whose install is done or superseded, by the
    /// group's record of the shard ([`move_dir_done`] of the incoming side).
    pub fn retain_pending(&mut self, record: impl Fn(GroupId, ShardId) -> Option<ShardRecord>) {
        self.done.retain(|&(group, shard, num, _), _| {
            !move_dir_done(MoveDir::Incoming, num, record(group, shard))
        });
    }
}

/// Which side of a move a directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveDir {
    /// Files shipped here, waiting for the install ([`incoming_dir`]).
    Incoming,
    /// This node's export for a destination ([`outgoing_dir`]).
    Outgoing,
}

/// Parses (side, group, shard, num) back out of a move directory's name
/// (also one without the export or freeze suffix, as earlier builds named
/// them, so that those are swept too).
pub fn parse_move_dir(name: &str) -> Option<(MoveDir, GroupId, ShardId, u64)> {
    let (side, rest, tag) = if let Some(rest) = name.strip_prefix("move-in-g") {
        (MoveDir::Incoming, rest, "-e")
    } else {
        (MoveDir::Outgoing, name.strip_prefix("move-out-g")?, "-i")
    };
    let (group, rest) = rest.split_once("-s")?;
    let (shard, rest) = rest.split_once("-n")?;
    let num = rest.split_once(tag).map_or(rest, |(num, _)| num);
    Some((
        side,
        group.parse().ok()?,
        shard.parse().ok()?,
        num.parse().ok()?,
    ))
}

/// Whether a move directory is no longer needed, given the group's record
/// of its shard (`None`: the node does not host the group): incoming files
/// once installed or superseded, an export once its shard was deleted or a
/// newer config touched it.
pub fn move_dir_done(side: MoveDir, num: u64, record: Option<ShardRecord>) -> bool {
    let Some(r) = record else {
        return true;
    };
    if r.num != num {
        return r.num > num;
    }
    match side {
        MoveDir::Incoming => r.status == ShardStatus::Serving,
        MoveDir::Outgoing => r.status == ShardStatus::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_engine::{AppliedState, SnapshotManifest, SnapshotScope};
    use ShardStatus::*;

    fn rec(num: u64, status: ShardStatus) -> ShardRecord {
        ShardRecord { num, status }
    }

    fn manifest(shard: ShardId, target: GroupId) -> SnapshotManifest {
        SnapshotManifest {
            format_version: shoal_engine::snapshot::SNAPSHOT_FORMAT_VERSION,
            group: 1,
            applied: AppliedState::default(),
            scope: SnapshotScope::Shard { shard, target },
            files: Vec::new(),
        }
    }

    fn freeze(num: u64) -> ShardCommand {
        ShardCommand::Freeze {
            shard: 3,
            num,
            to_group: 2,
            to_nodes: vec![4],
        }
    }

    fn install(num: u64) -> ShardCommand {
        ShardCommand::Install {
            shard: 3,
            num,
            manifest: manifest(3, 2),
        }
    }

    fn delete(num: u64) -> ShardCommand {
        ShardCommand::Delete { shard: 3, num }
    }

    #[test]
    fn a_full_move_changes_each_record_once() {
        // Source: Serving@1 → Frozen@2 → Absent@2.
        let d = decide(2, &freeze(2), |_| rec(1, Serving));
        assert_eq!(
            d.effect,
            Effect::Record {
                shard: 3,
                record: rec(2, Frozen),
                clear: false
            }
        );
        let d = decide(2, &delete(2), |_| rec(2, Frozen));
        assert_eq!(
            d.effect,
            Effect::Record {
                shard: 3,
                record: rec(2, Absent),
                clear: true
            }
        );
        // Destination: never had it → Serving@2 from the files.
        let d = decide(2, &install(2), |_| RECORD_NONE);
        assert_eq!(
            d.effect,
            Effect::Ingest {
                shard: 3,
                record: rec(2, Serving)
            }
        );
        assert_eq!(d.reply, ShardReply::Done);
    }

    #[test]
    fn repeats_change_nothing_and_succeed() {
        for (command, state) in [
            (freeze(2), rec(2, Frozen)),
            (freeze(2), rec(2, Absent)),
            (install(2), rec(2, Serving)),
            (delete(2), rec(2, Absent)),
            (
                ShardCommand::Create {
                    shards: vec![3],
                    num: 1,
                },
                rec(1, Serving),
            ),
        ] {
            let d = decide(2, &command, |_| state);
            assert_eq!(d.effect, Effect::None, "{command:?} on {state:?}");
            assert_eq!(d.reply, ShardReply::Done, "{command:?} on {state:?}");
        }
    }

    #[test]
    fn older_configs_are_stale_whatever_the_state() {
        for status in [Serving, Frozen, Absent] {
            for command in [
                freeze(4),
                install(4),
                delete(4),
                ShardCommand::Create {
                    shards: vec![3],
                    num: 4,
                },
            ] {
                let d = decide(2, &command, |_| rec(5, status));
                assert_eq!(d.effect, Effect::None);
                assert_eq!(d.reply, ShardReply::Stale { num: 5 });
            }
        }
    }

    #[test]
    fn contradictions_are_refused_and_change_nothing() {
        for (command, state) in [
            // Deleting a served shard would lose it.
            (delete(3), rec(2, Serving)),
            // Installing over a served shard would make two servers.
            (install(3), rec(2, Serving)),
            // Freezing a shard this group never held.
            (freeze(3), rec(2, Absent)),
            // Creating (empty) a shard that holds data.
            (
                ShardCommand::Create {
                    shards: vec![3],
                    num: 3,
                },
                rec(2, Frozen),
            ),
        ] {
            let d = decide(2, &command, |_| state);
            assert_eq!(d.effect, Effect::None, "{command:?} on {state:?}");
            assert!(
                matches!(d.reply, ShardReply::Refused { .. }),
                "{command:?} on {state:?}: {:?}",
                d.reply
            );
        }
        // A manifest exported for another shard or group.
        for wrong in [manifest(4, 2), manifest(3, 9)] {
            let command = ShardCommand::Install {
                shard: 3,
                num: 2,
                manifest: wrong,
            };
            let d = decide(2, &command, |_| RECORD_NONE);
            assert!(matches!(d.reply, ShardReply::Refused { .. }));
        }
        // ... or applied by another group than the one it was made for.
        let d = decide(5, &install(2), |_| RECORD_NONE);
        assert!(matches!(d.reply, ShardReply::Refused { .. }));
    }

    #[test]
    fn create_makes_only_new_shards() {
        let d = decide(
            2,
            &ShardCommand::Create {
                shards: vec![1, 2, 3],
                num: 1,
            },
            |s| if s == 2 { rec(1, Serving) } else { RECORD_NONE },
        );
        assert_eq!(
            d.effect,
            Effect::Create {
                shards: vec![1, 3],
                record: rec(1, Serving)
            }
        );
    }

    #[test]
    fn move_dir_names_parse_back() {
        let name = |p: PathBuf| p.file_name().unwrap().to_str().unwrap().to_string();
        let incoming = name(incoming_dir(Path::new("/x"), 7, 12, 40, u64::MAX));
        let outgoing = name(outgoing_dir(Path::new("/x"), 7, 12, 40, 99));
        assert_eq!(
            parse_move_dir(&incoming),
            Some((MoveDir::Incoming, 7, 12, 40))
        );
        assert_eq!(
            parse_move_dir(&outgoing),
            Some((MoveDir::Outgoing, 7, 12, 40))
        );
        assert_eq!(parse_move_dir("move-in-g7-s12"), None);
        assert_eq!(
            parse_move_dir("move-in-g7-s12-n40"),
            Some((MoveDir::Incoming, 7, 12, 40))
        );
        assert_eq!(parse_move_dir("move-out-g7-s12-n40-e1"), None);
        assert_eq!(parse_move_dir("recv-g1-i2-n3"), None);
    }

    #[test]
    fn each_export_has_its_own_identity() {
        let first = manifest(3, 2);
        let mut again = first.clone();
        again.applied.index += 1;
        assert_eq!(export_id(&first), export_id(&first.clone()));
        assert_ne!(export_id(&first), export_id(&again));
        let root = Path::new("/x");
        assert_ne!(
            incoming_dir(root, 2, 3, 5, export_id(&first)),
            incoming_dir(root, 2, 3, 5, export_id(&again))
        );
    }

    #[test]
    fn move_dirs_go_once_done_or_superseded() {
        use MoveDir::*;
        // Waiting for its install / its delete: kept.
        assert!(!move_dir_done(Incoming, 5, Some(rec(4, Absent))));
        assert!(!move_dir_done(Incoming, 5, Some(RECORD_NONE)));
        assert!(!move_dir_done(Outgoing, 5, Some(rec(5, Frozen))));
        // Installed, deleted, superseded, or the group is gone: removed.
        assert!(move_dir_done(Incoming, 5, Some(rec(5, Serving))));
        assert!(move_dir_done(Outgoing, 5, Some(rec(5, Absent))));
        assert!(move_dir_done(Incoming, 5, Some(rec(6, Absent))));
        assert!(move_dir_done(Outgoing, 5, Some(rec(7, Serving))));
        assert!(move_dir_done(Outgoing, 5, None));
    }

    #[test]
    fn install_files_go_to_every_member_the_freeze_missed() {
        let none = BTreeSet::new();
        // The config's members got them; the leader checked its own copy.
        assert!(install_files_missing([4, 5, 6], 4, &[4, 5, 6], &none).is_empty());
        // A learner added since the config was written, and a voter that
        // replaced a member the config still names.
        assert_eq!(
            install_files_missing([4, 5, 7, 8], 5, &[4, 5, 6], &none),
            vec![7, 8]
        );
        // Forwarded already: nothing more to do.
        let forwarded: BTreeSet<NodeId> = [7].into();
        assert_eq!(
            install_files_missing([4, 5, 7, 8], 5, &[4, 5, 6], &forwarded),
            vec![8]
        );
        // No holders known (a caller that did not say): every other member.
        assert_eq!(install_files_missing([1, 2, 3], 2, &[], &none), vec![1, 3]);
    }

    #[test]
    fn forwards_run_once_per_export_and_are_forgotten_once_installed() {
        let mut f = Forwards::default();
        let key = (2, 9, 5, 0xabc);
        assert!(f.start(key));
        assert!(!f.start(key), "one forward of an export at a time");
        f.finish(key, &[7], false);
        assert!(
            f.forwarded(&key).is_empty(),
            "a failed forward delivered nothing"
        );
        assert!(f.start(key));
        f.finish(key, &[7], true);
        assert_eq!(f.forwarded(&key), [7].into());
        f.retain_pending(|_, _| Some(rec(3, Absent)));
        assert_eq!(
            f.forwarded(&key),
            [7].into(),
            "still waiting for the install"
        );
        f.retain_pending(|_, _| Some(rec(5, Serving)));
        assert!(f.forwarded(&key).is_empty(), "installed: forgotten");
    }
}
