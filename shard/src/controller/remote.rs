//! The controller's store and mover on a real cluster: [`GroupStore`] keeps
//! the configs in the controller group through the KV client, and
//! [`RpcMover`] sends each move step to the leader of a replica group as an
//! admin [`Request::Shard`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use shoal_engine::{GroupId, ShardId, SnapshotManifest};
use shoal_net::{NodeId, RpcCaller};

use super::ctrler::{
    ConfigStore, FreezeOutcome, GroupRef, MoveError, PutOutcome, ShardMover, StepOutcome,
    StoreError,
};
use crate::client::{Client, ClientError};
use crate::protocol::{
    KvProtocol, KvResponse, Request, Response, ShardCommand, ShardReply, ShardRequest,
};

/// [`ConfigStore`] on the controller group, through a KV [`Client`] whose
/// configuration addresses that group (`node::CONTROLLER_GROUP`).
#[derive(Debug, Clone)]
pub struct GroupStore<C: RpcCaller<KvProtocol>> {
    client: Client<C>,
}

impl<C: RpcCaller<KvProtocol>> GroupStore<C> {
    /// A store over `client`.
    pub fn new(client: Client<C>) -> Self {
        GroupStore { client }
    }
}

/// A client error as the controller sees it: only a refusal is final.
fn store_error(e: ClientError) -> StoreError {
    match e {
        ClientError::Refused(_) => StoreError::Refused(Box::new(e)),
        _ => StoreError::Unavailable(Box::new(e)),
    }
}

impl<C: RpcCaller<KvProtocol>> ConfigStore for GroupStore<C> {
    async fn get(&self, key: &[u8]) -> Result<Option<(Bytes, u64)>, StoreError> {
        match self.client.get(Bytes::copy_from_slice(key)).await {
            Ok(v) => Ok(Some((v.value, v.version))),
            Err(ClientError::NotFound) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn put_if_version(
        &self,
        key: &[u8],
        value: Bytes,
        version: u64,
    ) -> Result<PutOutcome, StoreError> {
        match self
            .client
            .put_if_version(Bytes::copy_from_slice(key), value, version)
            .await
        {
            Ok(version) => Ok(PutOutcome::Written { version }),
            Err(ClientError::VersionMismatch { current }) => {
                Ok(PutOutcome::VersionMismatch { current })
            }
            Err(ClientError::NoKey) => Ok(PutOutcome::VersionMismatch { current: 0 }),
            Err(ClientError::Maybe) => Ok(PutOutcome::Maybe),
            Err(e) => Err(store_error(e)),
        }
    }
}

/// Why a group answered a step in a way the mover cannot use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// No member answered (or none led the group) within the attempt.
    #[error("no member of group {group} answered")]
    NoAnswer {
        /// The group.
        group: GroupId,
    },
    /// The group refused the step; nothing changed.
    #[error("group {group} refused: {reason}")]
    Refused {
        /// The group.
        group: GroupId,
        /// Its reason.
        reason: String,
    },
    /// The freeze's token is not a manifest this build can read.
    #[error("the freeze token does not decode: {0}")]
    Token(#[source] postcard::Error),
    /// The group answered something no step expects.
    #[error("group {group} answered {answer}")]
    Unexpected {
        /// The group.
        group: GroupId,
        /// The answer.
        answer: String,
    },
}

/// [`ShardMover`] over admin RPCs: each step goes to the members of its
/// group in turn (the leader hint first) until one answers it. Retrying is
/// the controller's: an attempt that finds no leader is
/// [`MoveError::Unavailable`].
#[derive(Debug, Clone)]
pub struct RpcMover<C> {
    caller: C,
    rpc_deadline: Duration,
    /// Node addresses a freeze passes on to the source (see
    /// [`ShardRequest::to_addrs`]).
    addrs: BTreeMap<u64, String>,
}

impl<C: RpcCaller<KvProtocol>> RpcMover<C> {
    /// A mover calling through `caller` (the admin client: nodes refuse
    /// move steps from anybody else), waiting `rpc_deadline` per call.
    pub fn new(caller: C, rpc_deadline: Duration) -> Self {
        RpcMover {
            caller,
            rpc_deadline,
            addrs: BTreeMap::new(),
        }
    }

    /// The same mover, telling a freeze's source the addresses of its
    /// destination's nodes among `addrs` (what the caller reaches them at),
    /// so the source can ship to members added since its nodes started.
    pub fn with_addrs(mut self, addrs: BTreeMap<u64, String>) -> Self {
        self.addrs = addrs;
        self
    }

    /// One pass over the group's members (a leader hint is followed at
    /// once); the first definite answer.
    async fn step(
        &self,
        group: GroupRef<'_>,
        command: ShardCommand,
    ) -> Result<ShardReply, MoveError> {
        // An install's files went to the destination's members in the
        // config (the freeze's `to_nodes`); its leader forwards them to
        // any other member.
        let holders = match command {
            ShardCommand::Install { .. } => group.members.to_vec(),
            _ => Vec::new(),
        };
        let to_addrs = match &command {
            ShardCommand::Freeze { to_nodes, .. } | ShardCommand::Precopy { to_nodes, .. } => {
                to_nodes
                    .iter()
                    .filter_map(|n| self.addrs.get(n).map(|a| (*n, a.clone())))
                    .collect()
            }
            _ => Vec::new(),
        };
        let request = Request::Shard(ShardRequest {
            group: group.id,
            command,
            holders,
            to_addrs,
        });
        let mut queue: Vec<NodeId> = group.members.iter().copied().map(NodeId).collect();
        let mut tried = 0usize;
        while let Some(node) = queue.first().copied() {
            queue.remove(0);
            tried += 1;
            if tried > 2 * group.members.len() {
                break;
            }
            let answer = self
                .caller
                .call_with_deadline(node, request.clone(), self.rpc_deadline)
                .await;
            match answer {
                Ok(Response::Kv(KvResponse::Shard(reply))) => return Ok(reply),
                Ok(Response::Kv(KvResponse::NotLeader { leader_hint })) => {
                    if leader_hint != 0 && group.members.contains(&leader_hint) {
                        queue.retain(|n| n.0 != leader_hint);
                        queue.insert(0, NodeId(leader_hint));
                    }
                }
                Ok(Response::Kv(
                    KvResponse::Busy | KvResponse::ShuttingDown | KvResponse::UnknownGroup,
                ))
                | Err(_) => {}
                Ok(other) => {
                    return Err(MoveError::Refused(Box::new(StepError::Unexpected {
                        group: group.id,
                        answer: format!("{other:?}"),
                    })))
                }
            }
        }
        Err(MoveError::Unavailable(Box::new(StepError::NoAnswer {
            group: group.id,
        })))
    }
}

fn step_outcome(group: GroupId, reply: ShardReply) -> Result<StepOutcome, MoveError> {
    match reply {
        ShardReply::Done => Ok(StepOutcome::Done),
        ShardReply::Stale { num } => Ok(StepOutcome::Stale { num }),
        ShardReply::Refused { reason } => Err(MoveError::Refused(Box::new(StepError::Refused {
            group,
            reason,
        }))),
        other => Err(MoveError::Refused(Box::new(StepError::Unexpected {
            group,
            answer: format!("{other:?}"),
        }))),
    }
}

impl<C: RpcCaller<KvProtocol>> ShardMover for RpcMover<C> {
    async fn create(
        &self,
        group: GroupRef<'_>,
        shards: &[ShardId],
        num: u64,
    ) -> Result<StepOutcome, MoveError> {
        let command = ShardCommand::Create {
            shards: shards.to_vec(),
            num,
        };
        step_outcome(group.id, self.step(group, command).await?)
    }

    async fn precopy(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> Result<(), MoveError> {
        let command = ShardCommand::Precopy {
            shard,
            num,
            to_group: to.id,
            to_nodes: to.members.to_vec(),
        };
        // `Stale` too: the freeze after it finds out and stops the move.
        match self.step(from, command).await? {
            ShardReply::Done | ShardReply::Stale { .. } => Ok(()),
            other => step_outcome(from.id, other).map(|_| ()),
        }
    }

    async fn freeze(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> Result<FreezeOutcome, MoveError> {
        let command = ShardCommand::Freeze {
            shard,
            num,
            to_group: to.id,
            to_nodes: to.members.to_vec(),
        };
        match self.step(from, command).await? {
            ShardReply::Frozen { manifest } => Ok(FreezeOutcome::Frozen {
                token: Bytes::from(
                    postcard::to_allocvec(&Some(manifest)).expect("a manifest always encodes"),
                ),
            }),
            // Frozen and deleted before, by this config: the destination
            // installed it already and needs no files.
            ShardReply::Done => Ok(FreezeOutcome::Frozen {
                token: Bytes::from(
                    postcard::to_allocvec(&None::<SnapshotManifest>).expect("encodes"),
                ),
            }),
            ShardReply::Stale { num } => Ok(FreezeOutcome::Stale { num }),
            ShardReply::Refused { reason } => {
                Err(MoveError::Refused(Box::new(StepError::Refused {
                    group: from.id,
                    reason,
                })))
            }
        }
    }

    async fn install(
        &self,
        to: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        from: GroupRef<'_>,
        token: Bytes,
    ) -> Result<StepOutcome, MoveError> {
        let manifest: Option<SnapshotManifest> = postcard::from_bytes(&token)
            .map_err(|e| MoveError::Refused(Box::new(StepError::Token(e))))?;
        let manifest = manifest.unwrap_or_else(|| SnapshotManifest {
            // No files: only a repeat (the shard is installed) succeeds.
            format_version: shoal_engine::snapshot::SNAPSHOT_FORMAT_VERSION,
            group: from.id,
            applied: Default::default(),
            scope: shoal_engine::SnapshotScope::Shard {
                shard,
                target: to.id,
            },
            files: Vec::new(),
        });
        let command = ShardCommand::Install {
            shard,
            num,
            manifest,
        };
        step_outcome(to.id, self.step(to, command).await?)
    }

    async fn delete(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
    ) -> Result<StepOutcome, MoveError> {
        step_outcome(
            from.id,
            self.step(from, ShardCommand::Delete { shard, num }).await?,
        )
    }
}
