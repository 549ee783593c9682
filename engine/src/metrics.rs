//! The engine's metrics, recorded through the `metrics` facade: a program
//! that installs no recorder (an embedded `Db`, the tests) pays an atomic
//! load per event and records nothing. `shoal node --status-addr` installs
//! a Prometheus recorder and serves them (see the root README, "Metrics and
//! health"). Every name carries its unit; the only label is `sync`
//! (`true` / `false`), so the set of series is fixed. [`describe`] gives
//! each its help text.

use std::time::Duration;

/// Histogram: how long one log write took, by `sync`: the synced ones are
/// what every acknowledged write waits for (a slow disk shows here first).
pub const LOG_WRITE_SECONDS: &str = "shoal_engine_log_write_duration_seconds";
/// Counter: bytes of keys and values written by log writes, by `sync`.
pub const LOG_WRITE_BYTES: &str = "shoal_engine_log_write_bytes_total";
/// Histogram: how long a sync of every write so far (a write-ahead-log
/// fsync, [`crate::Engine::sync`]) took.
pub const WAL_SYNC_SECONDS: &str = "shoal_engine_wal_sync_duration_seconds";
/// Histogram: how long one [`crate::Engine::apply`] of a run of committed
/// entries took (unsynced: memtable inserts and a buffered WAL append).
pub const APPLY_SECONDS: &str = "shoal_engine_apply_duration_seconds";

fn sync_label(sync: bool) -> &'static str {
    if sync {
        "true"
    } else {
        "false"
    }
}

pub(crate) fn log_write(sync: bool, elapsed: Duration, bytes: u64) {
    let sync = sync_label(sync);
    ::metrics::histogram!(LOG_WRITE_SECONDS, "sync" => sync).record(elapsed.as_secs_f64());
    ::metrics::counter!(LOG_WRITE_BYTES, "sync" => sync).increment(bytes);
}

pub(crate) fn wal_sync(elapsed: Duration) {
    ::metrics::histogram!(WAL_SYNC_SECONDS).record(elapsed.as_secs_f64());
}

pub(crate) fn apply(elapsed: Duration) {
    ::metrics::histogram!(APPLY_SECONDS).record(elapsed.as_secs_f64());
}

/// Describes the engine's series to the installed recorder (the `# HELP`
/// lines of a Prometheus scrape).
pub fn describe() {
    use ::metrics::Unit;
    ::metrics::describe_histogram!(
        LOG_WRITE_SECONDS,
        Unit::Seconds,
        "Raft log writes (entries and hard states of every group in one batch), by whether they were synced"
    );
    ::metrics::describe_counter!(
        LOG_WRITE_BYTES,
        Unit::Bytes,
        "Bytes of keys and values in Raft log writes, by whether they were synced"
    );
    ::metrics::describe_histogram!(
        WAL_SYNC_SECONDS,
        Unit::Seconds,
        "Syncs of the write-ahead log on their own (a log sync window's deferred syncs)"
    );
    ::metrics::describe_histogram!(
        APPLY_SECONDS,
        Unit::Seconds,
        "Applies of a run of committed entries to the state machine (unsynced)"
    );
}
