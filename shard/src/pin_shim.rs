//! TEMPORARY compile shim for the pins API (replaced by branch `pins`).
#![allow(missing_docs, clippy::all)]
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_engine::ScanPage;
use shoal_net::{NodeId, RpcCaller};

use crate::client::{Client, ClientError};
use crate::protocol::KvProtocol;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    pub pin: u64,
    pub node: NodeId,
    pub bytes: u64,
    pub keys: u64,
    pub split_keys: Vec<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedShard {
    pub group: u64,
    pub shard: u32,
    pub info: PinInfo,
}

impl<C: RpcCaller<KvProtocol>> Client<C> {
    pub async fn pin(&self, _s: Bytes, _e: Bytes, _b: u64) -> Result<Vec<PinnedShard>, ClientError> {
        unimplemented!()
    }
    pub async fn scan_pinned(&self, _p: &PinnedShard, _s: Bytes, _e: Bytes, _l: u64) -> Result<ScanPage, ClientError> {
        unimplemented!()
    }
    pub async fn unpin(&self, _p: &PinnedShard) -> Result<(), ClientError> {
        unimplemented!()
    }
}
