//! Key layouts of the column families, and the checksummed record codec.
//!
//! Every integer is big-endian so that byte order is numeric order: a group's
//! log is one contiguous range, and so is a group's (and each of its shards')
//! data in `kv` and `dedup`.

use serde::{de::DeserializeOwned, Serialize};
use shoal_consensus::Index;

use crate::error::{EngineError, Result};
use crate::{GroupId, ShardId};

/// Shard ids are `0 ..= SHARD_ID_MAX`; `u32::MAX` is reserved so that every
/// shard's key range has an exclusive end of the same width.
pub const SHARD_ID_MAX: ShardId = u32::MAX - 1;

/// Key of entry `index` of `group` in `raft_log`.
pub fn log_key(group: GroupId, index: Index) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Splits a `raft_log` key.
pub fn parse_log_key(key: &[u8]) -> Result<(GroupId, Index)> {
    let bytes: [u8; 16] = key
        .try_into()
        .map_err(|_| EngineError::Corrupt(format!("raft_log key of {} bytes", key.len())))?;
    let (g, i) = bytes.split_at(8);
    Ok((
        u64::from_be_bytes(g.try_into().unwrap_or_default()),
        u64::from_be_bytes(i.try_into().unwrap_or_default()),
    ))
}

/// Key of `group` in `raft_state`.
pub fn group_key(group: GroupId) -> [u8; 8] {
    group.to_be_bytes()
}

fn check_shard(shard: ShardId) {
    assert!(shard <= SHARD_ID_MAX, "shard id {shard} is reserved");
}

/// Bytes before a user key in `kv` (and before the client id in `dedup`):
/// the group, then the shard.
pub const SHARD_PREFIX_BYTES: usize = 12;

/// The `kv`/`dedup` key prefix of `shard` of `group`.
pub fn shard_prefix(group: GroupId, shard: ShardId) -> [u8; SHARD_PREFIX_BYTES] {
    check_shard(shard);
    let mut k = [0u8; SHARD_PREFIX_BYTES];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&shard.to_be_bytes());
    k
}

/// Key of `user_key` of `shard` of `group` in `kv`. Each group keeps its
/// own copy of a shard (a node may host the source and the destination of
/// a shard move), so the group comes first.
pub fn kv_key(group: GroupId, shard: ShardId, user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(SHARD_PREFIX_BYTES + user_key.len());
    k.extend_from_slice(&shard_prefix(group, shard));
    k.extend_from_slice(user_key);
    k
}

/// `[start, end)` covering every key of `shard` of `group` (in `kv` and in
/// `dedup`).
pub fn shard_range(group: GroupId, shard: ShardId) -> (Vec<u8>, Vec<u8>) {
    let start = shard_prefix(group, shard);
    let mut end = start;
    // `shard` is at most SHARD_ID_MAX, so `shard + 1` fits.
    end[8..].copy_from_slice(&(shard + 1).to_be_bytes());
    (start.to_vec(), end.to_vec())
}

/// `[start, end)` covering every shard of `group` (in `kv` and in `dedup`).
pub fn group_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let start = group.to_be_bytes().to_vec();
    let end = match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    };
    (start, end)
}

/// Key of a client's session of `shard` of `group` in `dedup`.
pub fn dedup_key(group: GroupId, shard: ShardId, client: u64) -> [u8; SHARD_PREFIX_BYTES + 8] {
    let mut k = [0u8; SHARD_PREFIX_BYTES + 8];
    k[..SHARD_PREFIX_BYTES].copy_from_slice(&shard_prefix(group, shard));
    k[SHARD_PREFIX_BYTES..].copy_from_slice(&client.to_be_bytes());
    k
}

/// What the checksum of the session record at `dedup` key `key` covers
/// besides the record ([`encode_record`]'s context): the key less the
/// group, that is the shard and the client. A record under another shard
/// or client is caught; the group is left out so that a shard moving to
/// another group (`Engine::export_shard`) is its records copied as they
/// are under keys renamed into the target group.
pub fn session_context(key: &[u8]) -> &[u8] {
    key.get(8..).unwrap_or(key)
}

/// Tags of the `meta` column family's keys.
const META_APPLIED: u8 = b'a';
const META_INSTALL: u8 = b'i';
const META_SHARD: u8 = b's';
const META_FORMAT: u8 = b'f';
const META_HOSTED: u8 = b'h';
const META_DROPPED: u8 = b'd';
const META_CONF: u8 = b'c';
const META_MEMBER_ADDR: u8 = b'm';

/// Key of the on-disk format marker in `meta`.
pub fn meta_format_key() -> [u8; 1] {
    [META_FORMAT]
}

/// Key of `group`'s applied state in `meta`.
pub fn meta_applied_key(group: GroupId) -> [u8; 9] {
    let mut k = [META_APPLIED; 9];
    k[1..].copy_from_slice(&group.to_be_bytes());
    k
}

/// Key of `group`'s pending-install marker in `meta`.
pub fn meta_install_key(group: GroupId) -> [u8; 9] {
    let mut k = [META_INSTALL; 9];
    k[1..].copy_from_slice(&group.to_be_bytes());
    k
}

/// `[start, end)` of every pending-install marker.
pub fn meta_install_range() -> (Vec<u8>, Vec<u8>) {
    (vec![META_INSTALL], vec![META_INSTALL + 1])
}

/// Key of the record saying this node hosts `group` (beyond its static
/// configuration), in `meta`.
pub fn meta_hosted_key(group: GroupId) -> [u8; 9] {
    let mut k = [META_HOSTED; 9];
    k[1..].copy_from_slice(&group.to_be_bytes());
    k
}

/// `[start, end)` of every hosted-group record.
pub fn meta_hosted_range() -> (Vec<u8>, Vec<u8>) {
    (vec![META_HOSTED], vec![META_HOSTED + 1])
}

/// Key of the tombstone saying `group` was dropped on this node, in `meta`.
pub fn meta_dropped_key(group: GroupId) -> [u8; 9] {
    let mut k = [META_DROPPED; 9];
    k[1..].copy_from_slice(&group.to_be_bytes());
    k
}

/// The id (group or node) of a `meta` key made of a tag byte and a
/// big-endian u64 (`meta_hosted_key`, `meta_member_addr_key`), or None for
/// a key of another length.
pub fn meta_tagged_id(key: &[u8]) -> Option<u64> {
    let id: [u8; 8] = key.get(1..)?.try_into().ok()?;
    Some(u64::from_be_bytes(id))
}

/// Key of `group`'s last applied membership change in `meta`.
pub fn meta_conf_key(group: GroupId) -> [u8; 9] {
    let mut k = [META_CONF; 9];
    k[1..].copy_from_slice(&group.to_be_bytes());
    k
}

/// Key of a member's address in this node's address book, in `meta`.
pub fn meta_member_addr_key(node: u64) -> [u8; 9] {
    let mut k = [META_MEMBER_ADDR; 9];
    k[1..].copy_from_slice(&node.to_be_bytes());
    k
}

/// `[start, end)` of the address book.
pub fn meta_member_addr_range() -> (Vec<u8>, Vec<u8>) {
    (vec![META_MEMBER_ADDR], vec![META_MEMBER_ADDR + 1])
}

/// Key of the ownership record of `shard` of `group` in `meta`.
pub fn meta_shard_key(group: GroupId, shard: ShardId) -> Vec<u8> {
    let mut k = vec![META_SHARD];
    k.extend_from_slice(&shard_prefix(group, shard));
    k
}

/// `[start, end)` of every shard ownership record of `group` in `meta`.
pub fn meta_shard_group_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let (start, end) = group_range(group);
    let tagged = |mut k: Vec<u8>| {
        k.insert(0, META_SHARD);
        k
    };
    (tagged(start), tagged(end))
}

/// Encodes `value` as `crc32 (4 bytes BE) | postcard`, the checksum also
/// covering `context` (normally the record's key) so a record copied under
/// the wrong key is caught.
pub fn encode_record<T: Serialize>(context: &[u8], value: &T) -> Vec<u8> {
    let body =
        postcard::to_stdvec(value).expect("postcard encoding of an in-memory value cannot fail");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&checksum(context, &body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a record made by [`encode_record`]; `what` names it in errors.
pub fn decode_record<T: DeserializeOwned>(
    context: &[u8],
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<T> {
    if bytes.len() < 4 {
        return Err(EngineError::Corrupt(format!(
            "{}: record of {} bytes is truncated",
            what(),
            bytes.len()
        )));
    }
    let (crc, body) = bytes.split_at(4);
    let stored = u32::from_be_bytes(crc.try_into().unwrap_or_default());
    if stored != checksum(context, body) {
        return Err(EngineError::Corrupt(format!(
            "{}: checksum mismatch",
            what()
        )));
    }
    postcard::from_bytes(body)
        .map_err(|e| EngineError::Corrupt(format!("{}: undecodable record: {e}", what())))
}

/// CRC32 of `context` followed by `body`.
pub fn checksum(context: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(context);
    h.update(body);
    h.finalize()
}
