//! Engine limits and tuning, with defaults and validation.

use crate::error::{EngineError, LimitKind, Result};

/// Limits and tuning of one engine instance. Every limit is enforced before
/// anything is written: a log batch or a read that exceeds one gets
/// [`EngineError::LimitExceeded`] and changes nothing, and so does a request
/// checked with [`crate::Engine::validate_request`] before it is proposed.
/// Applying committed entries never consults these limits (replicas may
/// differ in them; see [`crate::kv`]), except to split its writes and to
/// bound a scan's page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Longest user key accepted.
    pub key_bytes_max: u64,
    /// Longest value accepted.
    pub value_bytes_max: u64,
    /// Largest log append or apply batch accepted in one write.
    pub batch_bytes_max: u64,
    /// Most pairs one scan may return.
    pub scan_limit_max: u64,
    /// Most key + value bytes one scan page carries: a scan stops before
    /// the pair that would take it past this and names that pair's key as
    /// the page's continuation ([`crate::ScanPage::next`]). A page holds at
    /// least one pair whatever its size (a value written under a larger
    /// limit elsewhere can exceed this replica's). At least
    /// `key_bytes_max + value_bytes_max + 64`, so a pair within the limits
    /// always fits. The node keeps a `Reply::Pairs` under its 16 MiB frame
    /// limit with it: a page's encoding is its key and value bytes plus a
    /// few bytes of lengths and version per pair, and at most
    /// `scan_limit_max` pairs.
    pub scan_bytes_max: u64,
    /// Size of the block cache shared by all column families.
    pub block_cache_bytes: u64,
    /// Memtable size per column family before it is flushed.
    pub write_buffer_bytes: u64,
    /// Background flush and compaction threads.
    pub background_jobs: u32,
    /// Budget of the apply cache: the latest value of recently written or
    /// read keys and sessions, kept so applying a write need not search
    /// the memtable for the key's version and the client's session. When
    /// full it is emptied. 0 disables it.
    pub apply_cache_bytes: u64,
}

/// Default key limit: 8 KiB.
pub const KEY_BYTES_MAX_DEFAULT: u64 = 8 * 1024;
/// Default value limit: 4 MiB.
pub const VALUE_BYTES_MAX_DEFAULT: u64 = 4 * 1024 * 1024;
/// Default batch limit: 64 MiB.
pub const BATCH_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default apply cache budget: 32 MiB.
pub const APPLY_CACHE_BYTES_DEFAULT: u64 = 32 * 1024 * 1024;
/// Default scan limit: 10,000 pairs.
pub const SCAN_LIMIT_MAX_DEFAULT: u64 = 10_000;
/// Default scan page budget: 8 MiB, the first power of two that holds a
/// maximal default pair (8 KiB key + 4 MiB value), and half the node's
/// 16 MiB frame limit, which leaves room for the per-pair encoding.
pub const SCAN_BYTES_MAX_DEFAULT: u64 = 8 * 1024 * 1024;
/// Room [`EngineConfig::scan_bytes_max`] must leave on top of a maximal
/// key and value.
pub const SCAN_BYTES_PAIR_SLACK: u64 = 64;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            key_bytes_max: KEY_BYTES_MAX_DEFAULT,
            value_bytes_max: VALUE_BYTES_MAX_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            scan_limit_max: SCAN_LIMIT_MAX_DEFAULT,
            scan_bytes_max: SCAN_BYTES_MAX_DEFAULT,
            block_cache_bytes: 64 * 1024 * 1024,
            write_buffer_bytes: 32 * 1024 * 1024,
            background_jobs: 2,
            apply_cache_bytes: APPLY_CACHE_BYTES_DEFAULT,
        }
    }
}

impl EngineConfig {
    /// Checks that every field is in range, naming the first that is not.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, msg: &str| {
            if ok {
                Ok(())
            } else {
                Err(EngineError::Config(msg.to_string()))
            }
        };
        check(self.key_bytes_max >= 1, "key_bytes_max must be at least 1")?;
        check(
            self.key_bytes_max <= 64 * 1024,
            "key_bytes_max must be at most 64 KiB",
        )?;
        check(
            self.value_bytes_max <= 256 * 1024 * 1024,
            "value_bytes_max must be at most 256 MiB",
        )?;
        check(
            self.batch_bytes_max >= self.key_bytes_max + self.value_bytes_max,
            "batch_bytes_max must hold at least one maximal key and value",
        )?;
        check(
            self.scan_limit_max >= 1,
            "scan_limit_max must be at least 1",
        )?;
        check(
            self.scan_bytes_max
                >= self.key_bytes_max + self.value_bytes_max + SCAN_BYTES_PAIR_SLACK,
            "scan_bytes_max must hold at least one maximal key and value plus 64 bytes",
        )?;
        check(
            self.block_cache_bytes >= 1024 * 1024,
            "block_cache_bytes must be at least 1 MiB",
        )?;
        check(
            self.write_buffer_bytes >= 1024 * 1024,
            "write_buffer_bytes must be at least 1 MiB",
        )?;
        check(
            (1..=64).contains(&self.background_jobs),
            "background_jobs must be in 1..=64",
        )?;
        Ok(())
    }

    pub(crate) fn check(kind: LimitKind, actual: u64, limit: u64) -> Result<()> {
        if actual > limit {
            Err(EngineError::LimitExceeded {
                kind,
                actual,
                limit,
            })
        } else {
            Ok(())
        }
    }
}
