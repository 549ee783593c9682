//! The KV state machine: applying committed commands to `kv`, `dedup` and
//! the applied index in one atomic write, and reading it back.
//!
//! # Exactly-once
//! A request carries a client id and a sequence number. The `dedup` table
//! keeps, per (shard, client), the last sequence number applied and its
//! reply. A request whose sequence number equals the stored one is a retry:
//! it gets the cached reply and is not applied again. Sessions expire by
//! what the log names, never by a clock: the leader decides by its own
//! monotonic clock which sessions are idle and proposes a
//! [`Command::ExpireSessions`] naming each one with the sequence number it
//! saw; applying it removes a session only if that is still its sequence
//! number, so a client active since the decision keeps its session. Every
//! replica applies the same entries and so expires the same sessions,
//! whatever its clock says.
//!
//! # Apply depends on the log and the state only
//! Limits from [`EngineConfig`] are decided when a request is proposed
//! ([`Engine::validate_request`], [`Engine::stamp_request`]), never when it
//! is applied: replicas may run with different limits, and a committed
//! `Written` on one must not be `Rejected` on another. The one limit that
//! depends on the state, the size an `Append` grows a value to, travels in
//! the log ([`Command::Append::value_bytes_max`]). Apply reads the local
//! configuration only to split its writes (`batch_bytes_max`), for its
//! cache, and to bound the page of a `Scan`, whose reply is never stored.

use std::collections::HashMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_consensus::{Index, Term};

use crate::backend::{Backend, Cf, View, WriteSet};
use crate::config::EngineConfig;
use crate::engine::{ApplyCache, Engine};
use crate::error::{EngineError, LimitKind, Result};
use crate::keys::{
    decode_record, dedup_key, encode_record, kv_key, meta_applied_key, meta_shard_key,
    session_context, shard_range, SHARD_PREFIX_BYTES,
};
use crate::shards::ShardRecord;
use crate::{GroupId, ShardId};

/// A client id; `0` means "no session" (the request is not deduplicated).
pub type ClientId = u64;

/// An operation on one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Read a key.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Write a key unconditionally.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// The lab's versioned put: write only if the key's version is
    /// `version` (0: only if the key does not exist).
    PutIfVersion {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// Expected current version.
        version: u64,
    },
    /// Append to a key's value (creating it if absent), unless the value
    /// would grow past `value_bytes_max` (then `Rejected`, nothing written).
    Append {
        /// The key.
        key: Bytes,
        /// Bytes to append.
        value: Bytes,
        /// Longest value the append may produce, decided by the proposer
        /// ([`Engine::stamp_request`]) and carried in the log, so every
        /// replica gives the same outcome whatever its own limits.
        value_bytes_max: u64,
    },
    /// Remove a key.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Read keys in `[start, end)` in order, one page of at most `limit`
    /// pairs and about [`EngineConfig::scan_bytes_max`] bytes (an empty
    /// `end` means "to the end of the shard"); see [`ScanPage`].
    Scan {
        /// First key.
        start: Bytes,
        /// Exclusive end; empty for no bound.
        end: Bytes,
        /// Most pairs to return.
        limit: u64,
    },
    /// An atomic write of several keys under conditions, like an etcd
    /// `Txn` compare-and-write: if every condition holds in the state
    /// before the batch, every write is applied in order
    /// ([`Reply::BatchWritten`]); otherwise nothing is
    /// ([`Reply::ConditionFailed`] names the first failed condition). At
    /// most [`BATCH_OPS_MAX`] conditions and writes together.
    Batch {
        /// Versions keys must have (0: the key must be absent).
        conditions: Vec<Condition>,
        /// The writes, in order.
        writes: Vec<BatchWrite>,
    },
    /// Remove the named sessions of this shard, each only if its last
    /// sequence number is still the one named (a client that sent another
    /// request since keeps its session). At most
    /// [`EXPIRE_SESSIONS_PER_ENTRY_MAX`] of them.
    ExpireSessions {
        /// (client, last sequence number) of each session to remove.
        sessions: Vec<(ClientId, u64)>,
    },
}

/// A condition of a [`Command::Batch`]: `key` is at `version` (0: absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// The key.
    pub key: Bytes,
    /// Its expected version; 0 means the key must not exist.
    pub version: u64,
}

/// A write of a [`Command::Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchWrite {
    /// Write a key.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Remove a key (nothing if absent).
    Delete {
        /// The key.
        key: Bytes,
    },
}

impl BatchWrite {
    /// The key written.
    pub fn key(&self) -> &Bytes {
        match self {
            BatchWrite::Put { key, .. } | BatchWrite::Delete { key } => key,
        }
    }
}

/// Most conditions and writes one [`Command::Batch`] may hold together.
/// Its bytes are bounded by the message size; this bounds the work of
/// applying it.
pub const BATCH_OPS_MAX: usize = 10_000;

/// Most sessions one [`Command::ExpireSessions`] may name: bounds the entry
/// (about 20 bytes each: 80 KiB) and the work of applying it.
pub const EXPIRE_SESSIONS_PER_ENTRY_MAX: usize = 4096;

impl Command {
    /// True for commands that change nothing (they skip the session table).
    pub fn is_read_only(&self) -> bool {
        matches!(self, Command::Get { .. } | Command::Scan { .. })
    }
}

/// A command with its shard and session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Shard the command addresses.
    pub shard: ShardId,
    /// Session owner (0: none).
    pub client: ClientId,
    /// Per-client sequence number, increasing from 1.
    pub seq: u64,
    /// What to do.
    pub command: Command,
}

/// A key's value with its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The value.
    pub value: Bytes,
    /// Starts at 1 when the key is created, +1 on every write.
    pub version: u64,
}

/// The outcome of one applied command. Expected outcomes are variants,
/// not errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// `Get` found the key.
    Value(Versioned),
    /// `Get` did not find the key.
    NotFound,
    /// A write succeeded; the key now has this version.
    Written {
        /// The new version.
        version: u64,
    },
    /// `PutIfVersion` found another version (the lab's ErrVersion).
    VersionMismatch {
        /// The key's current version.
        current: u64,
    },
    /// `PutIfVersion` with a non-zero version on a missing key (ErrNoKey).
    NoKey,
    /// `Delete` ran; `existed` says whether the key was there.
    Deleted {
        /// Whether there was a key to delete.
        existed: bool,
    },
    /// `Scan` results: one page in key order.
    Pairs(ScanPage),
    /// A `Batch` was applied: per write, the key's new version (0 for a
    /// delete).
    BatchWritten {
        /// One per write, in order.
        versions: Vec<u64>,
    },
    /// A `Batch` condition did not hold; nothing was written.
    ConditionFailed {
        /// Index of the first failed condition.
        index: u32,
        /// The key's version then (0: absent).
        current: u64,
    },
    /// `ExpireSessions` removed this many sessions.
    SessionsExpired {
        /// Sessions removed.
        count: u64,
    },
    /// The request's sequence number is older than the session's last one:
    /// the client already had a newer reply, so this one is a stale copy.
    Stale,
    /// The request broke a limit and was not applied.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// One page of a scan: pairs in key order, and where the next page starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPage {
    /// The pairs, in key order: at most the scan's `limit`, and at most
    /// [`EngineConfig::scan_bytes_max`] key + value bytes unless the page
    /// is a single pair larger than that.
    pub pairs: Vec<(Bytes, Versioned)>,
    /// The first key of the range not returned, to scan on from; `None`
    /// when the range is exhausted.
    pub next: Option<Bytes>,
}

/// A session's record in `dedup`. Nothing else: the per-client state a
/// server keeps is bounded by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Last sequence number applied.
    pub seq: u64,
    /// Its reply, returned again for a retry.
    pub reply: Reply,
}

/// The group's position in its log as far as the state machine goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    /// Index of the last applied entry (0: none).
    pub index: Index,
    /// Its term.
    pub term: Term,
}

/// The requests of one committed log entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyEntry {
    /// Log index of the entry.
    pub index: Index,
    /// Its term.
    pub term: Term,
    /// Requests, applied in order (empty for no-ops and config entries).
    pub requests: Vec<Request>,
}

fn decode_versioned(bytes: &[u8], what: &dyn Fn() -> String) -> Result<Versioned> {
    if bytes.len() < 8 {
        return Err(EngineError::Corrupt(format!(
            "{}: value of {} bytes",
            what(),
            bytes.len()
        )));
    }
    let (v, value) = bytes.split_at(8);
    Ok(Versioned {
        version: u64::from_be_bytes(v.try_into().unwrap_or_default()),
        value: Bytes::copy_from_slice(value),
    })
}

fn encode_versioned(version: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Writes staged by one apply write, readable before they are written so
/// later commands of the same batch see earlier ones. Only each key's final
/// state is kept, and becomes the write set at the end.
struct Txn<'a> {
    view: &'a dyn View,
    /// Latest committed states of keys, consulted before `view`.
    cache: &'a mut ApplyCache,
    cache_budget: u64,
    overlay: HashMap<(Cf, Vec<u8>), Option<Vec<u8>>>,
    /// Bytes of keys and values in `overlay`, what the write will carry.
    overlay_bytes: u64,
}

impl Txn<'_> {
    fn get(&mut self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(&(cf, key.to_vec())) {
            return Ok(v.clone());
        }
        if let Some(v) = self.cache.get(cf, key) {
            return Ok(v.clone());
        }
        let value = self.view.get(cf, key)?;
        self.cache
            .insert(self.cache_budget, cf, key.to_vec(), value.clone());
        Ok(value)
    }
    fn stage(&mut self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
        let added = (key.len() + value.as_ref().map_or(0, Vec::len)) as u64;
        if let Some(old) = self.overlay.insert((cf, key.clone()), value) {
            self.overlay_bytes -= (key.len() + old.as_ref().map_or(0, Vec::len)) as u64;
        }
        self.overlay_bytes += added;
    }
    fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.stage(cf, key, Some(value));
    }
    fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.stage(cf, key, None);
    }
    /// The staged writes as one write set; the cache takes their values
    /// too (the caller empties it if the write then fails).
    fn into_write_set(self) -> WriteSet {
        let mut set = WriteSet::new();
        for ((cf, key), value) in self.overlay {
            self.cache
                .insert(self.cache_budget, cf, key.clone(), value.clone());
            match value {
                Some(v) => set.put(cf, key, v),
                None => set.delete(cf, key),
            }
        }
        set
    }
    /// Fills `page` from the `kv` pairs in `[from, to)` as the batch so
    /// far sees them: the view's pairs merged with the staged writes, in
    /// key order, reading only as far as the page takes.
    fn scan_page(&self, from: &[u8], to: &[u8], page: &mut PageBuilder) -> Result<()> {
        let mut pending: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .overlay
            .iter()
            .filter(|((cf, k), _)| *cf == Cf::Kv && k.as_slice() >= from && k.as_slice() < to)
            .map(|((_, k), v)| (k, v))
            .collect();
        pending.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut pending = pending.into_iter().peekable();
        self.view.scan(Cf::Kv, from, to, &mut |key, value| {
            // Staged keys before this one come first.
            while let Some((staged, staged_value)) = pending.next_if(|(k, _)| k.as_slice() < key) {
                if let Some(v) = staged_value {
                    if !page.offer(staged, v)? {
                        return Ok(false);
                    }
                }
            }
            // A staged write of this very key replaces the view's value.
            match pending.next_if(|(k, _)| k.as_slice() == key) {
                Some((_, Some(v))) => page.offer(key, v),
                Some((_, None)) => Ok(true),
                None => page.offer(key, value),
            }
        })?;
        for (staged, staged_value) in pending {
            if page.is_full() {
                break;
            }
            if let Some(v) = staged_value {
                page.offer(staged, v)?;
            }
        }
        Ok(())
    }
}

/// Builds one [`ScanPage`] from `kv` pairs offered in key order, holding
/// only what the page keeps: at most `limit` pairs and, past the first,
/// at most `bytes_max` key + value bytes.
struct PageBuilder {
    shard: ShardId,
    limit: u64,
    bytes_max: u64,
    bytes: u64,
    page: ScanPage,
}

impl PageBuilder {
    fn new(shard: ShardId, limit: u64, bytes_max: u64) -> Self {
        PageBuilder {
            shard,
            limit,
            bytes_max,
            bytes: 0,
            page: ScanPage::default(),
        }
    }

    fn is_full(&self) -> bool {
        self.page.next.is_some()
    }

    /// Offers the next pair (a `kv` key and stored value); `false` once the
    /// page is full, the pair's key then being its continuation.
    fn offer(&mut self, key: &[u8], stored: &[u8]) -> Result<bool> {
        let shard = self.shard;
        let user_key = key.get(SHARD_PREFIX_BYTES..).ok_or_else(|| {
            EngineError::Corrupt(format!("a key of {} bytes in shard {shard}", key.len()))
        })?;
        // Key and value bytes; the stored value has an 8-byte version first.
        let size = (user_key.len() + stored.len().saturating_sub(8)) as u64;
        let fits = (self.page.pairs.len() as u64) < self.limit
            && (self.page.pairs.is_empty() || self.bytes + size <= self.bytes_max);
        if !fits {
            self.page.next = Some(Bytes::copy_from_slice(user_key));
            return Ok(false);
        }
        let versioned = decode_versioned(stored, &|| format!("value of a key in shard {shard}"))?;
        self.page
            .pairs
            .push((Bytes::copy_from_slice(user_key), versioned));
        self.bytes += size;
        Ok(true)
    }

    fn finish(self) -> ScanPage {
        self.page
    }
}

/// The `kv` keys `[from, to)` a scan of `shard` over user keys `[start,
/// end)` covers (empty `end`: to the end of the shard); `None` if empty.
fn scan_bounds(
    group: GroupId,
    shard: ShardId,
    start: &[u8],
    end: &[u8],
) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, shard_end) = shard_range(group, shard);
    let from = kv_key(group, shard, start);
    let to = if end.is_empty() {
        shard_end
    } else {
        kv_key(group, shard, end)
    };
    (from < to).then_some((from, to))
}

impl<B: Backend> Engine<B> {
    /// Checks a request against the limits, for callers to refuse it before
    /// proposing it.
    pub fn validate_request(&self, request: &Request) -> Result<()> {
        let c = self.config();
        let key_check =
            |k: &[u8]| EngineConfig::check(LimitKind::KeyBytes, k.len() as u64, c.key_bytes_max);
        let value_check = |v: &[u8]| {
            EngineConfig::check(LimitKind::ValueBytes, v.len() as u64, c.value_bytes_max)
        };
        if request.shard > crate::keys::SHARD_ID_MAX {
            return Err(EngineError::Invalid(format!(
                "shard id {} is reserved",
                request.shard
            )));
        }
        match &request.command {
            Command::Get { key } | Command::Delete { key } => key_check(key),
            Command::Put { key, value }
            | Command::PutIfVersion { key, value, .. }
            | Command::Append { key, value, .. } => {
                key_check(key)?;
                value_check(value)
            }
            Command::Scan { start, end, limit } => {
                key_check(start)?;
                key_check(end)?;
                EngineConfig::check(LimitKind::ScanLimit, *limit, c.scan_limit_max)
            }
            Command::Batch { conditions, writes } => {
                EngineConfig::check(
                    LimitKind::BatchOps,
                    (conditions.len() + writes.len()) as u64,
                    BATCH_OPS_MAX as u64,
                )?;
                for c in conditions {
                    key_check(&c.key)?;
                }
                let mut bytes = 0u64;
                for w in writes {
                    key_check(w.key())?;
                    bytes += w.key().len() as u64;
                    if let BatchWrite::Put { value, .. } = w {
                        value_check(value)?;
                        bytes += value.len() as u64;
                    }
                }
                // Keys and values of one batch become one log entry and
                // one apply write: within one write's limit.
                EngineConfig::check(LimitKind::BatchBytes, bytes, c.batch_bytes_max)
            }
            Command::ExpireSessions { sessions } => EngineConfig::check(
                LimitKind::ExpireSessions,
                sessions.len() as u64,
                EXPIRE_SESSIONS_PER_ENTRY_MAX as u64,
            ),
        }
    }

    /// Stamps into `request` the limits its proposer decides and the log
    /// carries, so that every replica applies it with the same outcome: an
    /// `Append`'s `value_bytes_max` becomes this engine's
    /// [`EngineConfig::value_bytes_max`]. The leader calls it (after
    /// [`Self::validate_request`]) on every request it proposes.
    pub fn stamp_request(&self, request: &mut Request) {
        if let Command::Append {
            value_bytes_max, ..
        } = &mut request.command
        {
            *value_bytes_max = self.config().value_bytes_max;
        }
    }

    /// Applies committed entries of `group`, in order. Each write records
    /// the new applied index together with the data, so a crash leaves the
    /// state machine at an entry boundary, never inside an entry. Normally
    /// that is ONE write for the whole call; once the staged writes reach
    /// [`EngineConfig::batch_bytes_max`] (a follower catching up on many
    /// large entries) the call continues in a new write, so memory stays
    /// bounded and a committed entry is never refused — refusing one would
    /// stop the group for good. A key written several times in one write is
    /// written once, with its final value. Entries must have indexes above
    /// the applied index, increasing. Returns each entry's replies. Not
    /// synced: the log is the durable record (see the crate docs).
    pub fn apply(&self, group: GroupId, entries: &[ApplyEntry]) -> Result<Vec<Vec<Reply>>> {
        let started = std::time::Instant::now();
        let replies = self.apply_entries(group, entries)?;
        crate::metrics::apply(started.elapsed());
        Ok(replies)
    }

    fn apply_entries(&self, group: GroupId, entries: &[ApplyEntry]) -> Result<Vec<Vec<Reply>>> {
        let mut applied = self.applied(group)?;
        let mut previous = applied.index;
        for entry in entries {
            if entry.index <= previous {
                return Err(EngineError::Invalid(format!(
                    "group {group}: entry {} applied again or out of order (applied index {}, previous entry {previous})",
                    entry.index, applied.index
                )));
            }
            previous = entry.index;
        }
        let mut replies = Vec::with_capacity(entries.len());
        let mut rest = entries;
        while !rest.is_empty() {
            let mut taken = 0;
            let mut set = WriteSet::new();
            let mut cache = self.apply_cache();
            let cache_budget = self.config().apply_cache_bytes;
            self.backend().with_view(&mut |view| {
                let mut txn = Txn {
                    view,
                    cache: &mut cache,
                    cache_budget,
                    overlay: HashMap::new(),
                    overlay_bytes: 0,
                };
                for entry in rest {
                    let mut out = Vec::with_capacity(entry.requests.len());
                    for request in &entry.requests {
                        out.push(self.apply_request(&mut txn, group, request)?);
                    }
                    replies.push(out);
                    applied = AppliedState {
                        index: entry.index,
                        term: entry.term,
                    };
                    taken += 1;
                    if txn.overlay_bytes >= self.config().batch_bytes_max {
                        break;
                    }
                }
                set = txn.into_write_set();
                Ok(())
            })?;
            let key = meta_applied_key(group);
            set.put(Cf::Meta, key.to_vec(), encode_record(&key, &applied));
            if let Err(e) = self.backend().write(set, false) {
                cache.clear();
                return Err(e);
            }
            drop(cache);
            rest = &rest[taken..];
        }
        Ok(replies)
    }

    fn apply_request(&self, txn: &mut Txn<'_>, group: GroupId, request: &Request) -> Result<Reply> {
        // No limits from the configuration here (see the module docs). A
        // reserved shard id has no key range: refused the same way on every
        // replica, since it depends on a constant of the format only.
        if request.shard > crate::keys::SHARD_ID_MAX {
            return Ok(Reply::Rejected {
                reason: format!("shard id {} is reserved", request.shard),
            });
        }
        let shard = request.shard;
        let session_key = dedup_key(group, shard, request.client);
        let tracked = request.client != 0 && !request.command.is_read_only();
        if tracked {
            if let Some(bytes) = txn.get(Cf::Dedup, &session_key)? {
                let session: Session =
                    decode_record(session_context(&session_key), &bytes, &|| {
                        format!("session of client {} in shard {shard}", request.client)
                    })?;
                if request.seq == session.seq {
                    return Ok(session.reply);
                }
                if request.seq < session.seq {
                    return Ok(Reply::Stale);
                }
            }
        }
        let reply = self.execute(txn, group, request)?;
        if tracked {
            let session = Session {
                seq: request.seq,
                reply: reply.clone(),
            };
            txn.put(
                Cf::Dedup,
                session_key.to_vec(),
                encode_record(session_context(&session_key), &session),
            );
        }
        Ok(reply)
    }

    fn execute(&self, txn: &mut Txn<'_>, group: GroupId, request: &Request) -> Result<Reply> {
        let shard = request.shard;
        let read = |txn: &mut Txn<'_>, key: &[u8]| -> Result<Option<Versioned>> {
            match txn.get(Cf::Kv, &kv_key(group, shard, key))? {
                Some(b) => Ok(Some(decode_versioned(&b, &|| {
                    format!("value of a key in shard {shard}")
                })?)),
                None => Ok(None),
            }
        };
        // An unconditional write: the key's new version.
        let put = |txn: &mut Txn<'_>, key: &[u8], value: &[u8]| -> Result<u64> {
            let version = read(txn, key)?.map_or(1, |v| v.version + 1);
            txn.put(
                Cf::Kv,
                kv_key(group, shard, key),
                encode_versioned(version, value),
            );
            Ok(version)
        };
        // A delete: whether the key existed.
        let delete = |txn: &mut Txn<'_>, key: &[u8]| -> Result<bool> {
            let existed = read(txn, key)?.is_some();
            if existed {
                txn.delete(Cf::Kv, kv_key(group, shard, key));
            }
            Ok(existed)
        };
        Ok(match &request.command {
            Command::Get { key } => match read(txn, key)? {
                Some(v) => Reply::Value(v),
                None => Reply::NotFound,
            },
            Command::Put { key, value } => Reply::Written {
                version: put(txn, key, value)?,
            },
            Command::PutIfVersion {
                key,
                value,
                version,
            } => match (read(txn, key)?, *version) {
                (None, 0) => {
                    txn.put(
                        Cf::Kv,
                        kv_key(group, shard, key),
                        encode_versioned(1, value),
                    );
                    Reply::Written { version: 1 }
                }
                (None, _) => Reply::NoKey,
                (Some(current), expected) if current.version == expected => {
                    txn.put(
                        Cf::Kv,
                        kv_key(group, shard, key),
                        encode_versioned(expected + 1, value),
                    );
                    Reply::Written {
                        version: expected + 1,
                    }
                }
                (Some(current), _) => Reply::VersionMismatch {
                    current: current.version,
                },
            },
            Command::Append {
                key,
                value,
                value_bytes_max,
            } => {
                let (version, mut bytes) = match read(txn, key)? {
                    Some(v) => (v.version + 1, v.value.to_vec()),
                    None => (1, Vec::new()),
                };
                let grown = bytes.len() as u64 + value.len() as u64;
                // The limit from the log, not this replica's configuration.
                if grown > *value_bytes_max {
                    return Ok(Reply::Rejected {
                        reason: EngineError::LimitExceeded {
                            kind: LimitKind::ValueBytes,
                            actual: grown,
                            limit: *value_bytes_max,
                        }
                        .to_string(),
                    });
                }
                bytes.extend_from_slice(value);
                txn.put(
                    Cf::Kv,
                    kv_key(group, shard, key),
                    encode_versioned(version, &bytes),
                );
                Reply::Written { version }
            }
            Command::Delete { key } => Reply::Deleted {
                existed: delete(txn, key)?,
            },
            Command::Scan { start, end, limit } => {
                // Bounded by this replica's limits although it is applied:
                // a scan is read-only, its reply is never stored (no
                // session), so another page on another replica changes no
                // state; only the replica answering the client matters.
                let config = self.config();
                let mut page = PageBuilder::new(
                    shard,
                    (*limit).min(config.scan_limit_max),
                    config.scan_bytes_max,
                );
                if let Some((from, to)) = scan_bounds(group, shard, start, end) {
                    txn.scan_page(&from, &to, &mut page)?;
                }
                Reply::Pairs(page.finish())
            }
            Command::Batch { conditions, writes } => {
                // Every condition against the state before the batch; only
                // then any write, so a failed one leaves nothing staged.
                for (index, condition) in conditions.iter().enumerate() {
                    let current = read(txn, &condition.key)?.map_or(0, |v| v.version);
                    if current != condition.version {
                        return Ok(Reply::ConditionFailed {
                            index: index as u32,
                            current,
                        });
                    }
                }
                let mut versions = Vec::with_capacity(writes.len());
                for write in writes {
                    match write {
                        BatchWrite::Put { key, value } => versions.push(put(txn, key, value)?),
                        BatchWrite::Delete { key } => {
                            delete(txn, key)?;
                            versions.push(0);
                        }
                    }
                }
                Reply::BatchWritten { versions }
            }
            Command::ExpireSessions { sessions } => {
                let mut count = 0u64;
                for &(client, seq) in sessions {
                    let key = dedup_key(group, shard, client);
                    let Some(bytes) = txn.get(Cf::Dedup, &key)? else {
                        continue;
                    };
                    let session: Session = decode_record(session_context(&key), &bytes, &|| {
                        format!("session of client {client} in shard {shard}")
                    })?;
                    // Only the session as the leader saw it: a client that
                    // sent a request since then is active, and keeps it.
                    if session.seq == seq {
                        txn.delete(Cf::Dedup, key.to_vec());
                        count += 1;
                    }
                }
                Reply::SessionsExpired { count }
            }
        })
    }

    /// Refuses an entry `at` that is not above `group`'s applied index (an
    /// entry applied again, or out of order).
    pub(crate) fn check_above_applied(&self, group: GroupId, at: AppliedState) -> Result<()> {
        let applied = self.applied(group)?;
        if at.index <= applied.index {
            return Err(EngineError::Invalid(format!(
                "group {group}: entry {} applied again (applied index {})",
                at.index, applied.index
            )));
        }
        Ok(())
    }

    /// The applied state of `group`.
    pub fn applied(&self, group: GroupId) -> Result<AppliedState> {
        let key = meta_applied_key(group);
        match self.backend().get(Cf::Meta, &key)? {
            Some(b) => decode_record(&key, &b, &|| format!("applied index of group {group}")),
            None => Ok(AppliedState::default()),
        }
    }

    /// Reads a key of the local state machine (linearizable only when the
    /// caller established a read index first).
    pub fn get(&self, group: GroupId, shard: ShardId, key: &[u8]) -> Result<Option<Versioned>> {
        EngineConfig::check(
            LimitKind::KeyBytes,
            key.len() as u64,
            self.config().key_bytes_max,
        )?;
        match self.backend().get(Cf::Kv, &kv_key(group, shard, key))? {
            Some(b) => Ok(Some(decode_versioned(&b, &|| {
                format!("value of a key in shard {shard}")
            })?)),
            None => Ok(None),
        }
    }

    /// One page of the pairs of `shard` in `[start, end)` (empty `end`: no
    /// bound), in key order: at most `limit` pairs and at most
    /// [`EngineConfig::scan_bytes_max`] key + value bytes (at least one pair
    /// if the range has any, and `limit` > 0). [`ScanPage::next`] is where
    /// the next page starts. Reads only as far as the page takes, so memory
    /// stays about `scan_bytes_max` however large the range.
    pub fn scan(
        &self,
        group: GroupId,
        shard: ShardId,
        start: &[u8],
        end: &[u8],
        limit: u64,
    ) -> Result<ScanPage> {
        scan_page_in(
            self.backend(),
            self.config(),
            group,
            shard,
            start,
            end,
            limit,
        )
    }

    /// Runs `f` over a consistent point-in-time view of the state machine
    /// ([`Backend::with_view`]): every read through the [`EngineView`]
    /// sees the state as of the moment the view was taken, whatever is
    /// written meanwhile, for as long as `f` runs. Holding a view keeps
    /// the versions it sees alive (RocksDB: a snapshot, whose overwritten
    /// and deleted pairs compaction keeps), so long-lived views must be
    /// few and bounded in time.
    pub fn with_view(&self, f: &mut dyn FnMut(&EngineView<'_>) -> Result<()>) -> Result<()> {
        let config = self.config();
        self.backend()
            .with_view(&mut |view| f(&EngineView { view, config }))
    }
}

/// One page of `shard`'s pairs in `[start, end)` read through `view`,
/// bounded by `config` (see [`Engine::scan`]).
fn scan_page_in(
    view: &dyn View,
    config: &EngineConfig,
    group: GroupId,
    shard: ShardId,
    start: &[u8],
    end: &[u8],
    limit: u64,
) -> Result<ScanPage> {
    EngineConfig::check(LimitKind::ScanLimit, limit, config.scan_limit_max)?;
    let mut page = PageBuilder::new(shard, limit, config.scan_bytes_max);
    if let Some((from, to)) = scan_bounds(group, shard, start, end) {
        view.scan(Cf::Kv, &from, &to, &mut |k, v| page.offer(k, v))?;
    }
    Ok(page.finish())
}

/// A point-in-time view of the state machine ([`Engine::with_view`]),
/// read by (group, shard) and user key: the key layout stays inside the
/// engine.
pub struct EngineView<'a> {
    view: &'a dyn View,
    config: &'a EngineConfig,
}

impl std::fmt::Debug for EngineView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineView").finish_non_exhaustive()
    }
}

impl EngineView<'_> {
    /// One page of `shard`'s pairs in `[start, end)` as of the view, with
    /// the limits and continuation of [`Engine::scan`].
    pub fn scan(
        &self,
        group: GroupId,
        shard: ShardId,
        start: &[u8],
        end: &[u8],
        limit: u64,
    ) -> Result<ScanPage> {
        scan_page_in(self.view, self.config, group, shard, start, end, limit)
    }

    /// Visits `shard`'s pairs in `[start, end)` (empty `end`: to the end
    /// of the shard) in key order with each user key and its size (key +
    /// value bytes, as [`ScanPage`] counts them), until `visit` returns
    /// `false`. Holds one pair at a time, however large the range.
    pub fn visit_sizes(
        &self,
        group: GroupId,
        shard: ShardId,
        start: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], u64) -> Result<bool>,
    ) -> Result<()> {
        let Some((from, to)) = scan_bounds(group, shard, start, end) else {
            return Ok(());
        };
        self.view.scan(Cf::Kv, &from, &to, &mut |key, stored| {
            let user_key = key.get(SHARD_PREFIX_BYTES..).ok_or_else(|| {
                EngineError::Corrupt(format!("a key of {} bytes in shard {shard}", key.len()))
            })?;
            // The stored value has an 8-byte version first.
            let size = (user_key.len() + stored.len().saturating_sub(8)) as u64;
            visit(user_key, size)
        })
    }

    /// The applied state of `group` as of the view.
    pub fn applied(&self, group: GroupId) -> Result<AppliedState> {
        let key = meta_applied_key(group);
        match self.view.get(Cf::Meta, &key)? {
            Some(b) => decode_record(&key, &b, &|| format!("applied index of group {group}")),
            None => Ok(AppliedState::default()),
        }
    }

    /// `group`'s record of `shard` as of the view (`None`: it has none).
    pub fn shard_record(&self, group: GroupId, shard: ShardId) -> Result<Option<ShardRecord>> {
        let key = meta_shard_key(group, shard);
        match self.view.get(Cf::Meta, &key)? {
            Some(b) => Ok(Some(decode_record(&key, &b, &|| {
                format!("record of shard {shard} in group {group}")
            })?)),
            None => Ok(None),
        }
    }
}

impl<B: Backend> Engine<B> {
    /// How many client sessions `shard` holds, and their stored bytes (keys
    /// and records): the per-client state the server keeps.
    pub fn session_footprint(&self, group: GroupId, shard: ShardId) -> Result<(u64, u64)> {
        let (start, end) = shard_range(group, shard);
        let (mut count, mut bytes) = (0u64, 0u64);
        self.backend().with_view(&mut |view| {
            view.scan(Cf::Dedup, &start, &end, &mut |k, v| {
                count += 1;
                bytes += (k.len() + v.len()) as u64;
                Ok(true)
            })
        })?;
        Ok((count, bytes))
    }

    /// The client id and last sequence number of every session of `shard`,
    /// in client order: what the leader needs to decide, by its own clock,
    /// which sessions to expire (loaded when a node starts and after a
    /// snapshot install).
    pub fn sessions(&self, group: GroupId, shard: ShardId) -> Result<Vec<(ClientId, u64)>> {
        let (start, end) = shard_range(group, shard);
        let mut out = Vec::new();
        self.backend().scan(Cf::Dedup, &start, &end, &mut |k, v| {
            let client = k
                .get(SHARD_PREFIX_BYTES..)
                .and_then(|c| <[u8; 8]>::try_from(c).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| {
                    EngineError::Corrupt(format!(
                        "a session key of {} bytes in shard {shard}",
                        k.len()
                    ))
                })?;
            let session: Session = decode_record(session_context(k), v, &|| {
                format!("session of client {client} in shard {shard}")
            })?;
            out.push((client, session.seq));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The session of `client` in `shard`, if any.
    pub fn session(
        &self,
        group: GroupId,
        shard: ShardId,
        client: ClientId,
    ) -> Result<Option<Session>> {
        let key = dedup_key(group, shard, client);
        match self.backend().get(Cf::Dedup, &key)? {
            Some(b) => Ok(Some(decode_record(session_context(&key), &b, &|| {
                format!("session of client {client} in shard {shard}")
            })?)),
            None => Ok(None),
        }
    }
}
