//! The engine crash workload: a deterministic stream of log batches and
//! state-machine commands that a child process writes until it is killed,
//! and the checks run after reopening. Used by `shoal demo` (the engine
//! demo) and by the crash tests in `tests/engine_crash.rs`.
//!
//! Everything the writer does is a function of the seed and the log index,
//! so the checker knows, without any side channel, what every entry must
//! contain, where every batch starts and ends, and what the state machine
//! must hold at any applied index.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::{Entry, HardState, Index};
use shoal_engine::{
    ApplyEntry, Command, EngineConfig, GroupWrite, LogBatch, MemStore, Request, RocksEngine,
    ShardId,
};

/// The group the workload writes.
pub const GROUP: u64 = 1;
/// Shards the workload's keys fall in.
pub const SHARDS: ShardId = 4;
/// Clients (sessions) the workload uses.
pub const CLIENTS: u64 = 4;
/// Entries kept in the log behind the applied index when compacting.
pub const COMPACT_KEEP_ENTRIES: u64 = 100;
/// Compact every this many entries.
pub const COMPACT_EVERY_ENTRIES: u64 = 300;
/// The shard the snapshot-install workload replaces.
pub const INSTALL_SHARD: ShardId = 5;
/// Keys in each install template.
pub const INSTALL_TEMPLATE_KEYS: u64 = 2_000;
/// The value limit the workload's appends carry (small, so some appends are
/// refused by the state machine, deterministically).
pub const VALUE_BYTES_MAX: u64 = 256;

fn rng(seed: u64, index: Index, salt: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// How many entries the batch starting at `start` holds (1..=16).
pub fn batch_len(seed: u64, start: Index) -> u64 {
    rng(seed, start, 1).random_range(1..=16)
}

/// The requests of entry `index`.
pub fn requests_for(seed: u64, index: Index) -> Vec<Request> {
    let mut r = rng(seed, index, 2);
    let count = r.random_range(1..=3);
    let mut out: Vec<Request> = Vec::with_capacity(count + 1);
    for n in 0..count {
        let shard = r.random_range(0..SHARDS);
        let key = Bytes::from(format!("key{}", r.random_range(0..48)));
        let value = Bytes::from(format!("{index}.{n};"));
        let command = match r.random_range(0..100) {
            0..=39 => Command::Put { key, value },
            40..=64 => Command::Append {
                key,
                value,
                value_bytes_max: VALUE_BYTES_MAX,
            },
            65..=79 => Command::PutIfVersion {
                key,
                value,
                version: r.random_range(0..4),
            },
            80..=89 => Command::Delete { key },
            90..=94 => Command::Get { key },
            _ => Command::ExpireSessions {
                sessions: (1..=CLIENTS)
                    .map(|client| (client, r.random_range(0..=index * 4)))
                    .collect(),
            },
        };
        // Sequence numbers grow with the index, so each client's requests are
        // in order; `n` keeps two requests of one entry distinct.
        out.push(Request {
            shard,
            client: r.random_range(0..=CLIENTS),
            seq: index * 4 + n as u64,
            command,
        });
    }
    if r.random_ratio(1, 5) {
        // A retry of the first request: must be answered from the session.
        out.push(out[0].clone());
    }
    out
}

/// Entry `index` as the writer appends it.
pub fn entry_for(seed: u64, index: Index) -> Entry {
    let data = postcard::to_stdvec(&requests_for(seed, index)).expect("encoding requests");
    Entry {
        term: 1,
        index,
        data: data.into(),
        ..Default::default()
    }
}

/// Runs the log/apply writer on `dir` forever (until killed), printing
/// `ack N` once entries up to N are durable, `applied N` once applied.
/// Resumes where a previous (killed) writer left off, replaying the log
/// into the state machine first.
pub fn run_writer(dir: &Path, seed: u64, stop_after: Option<Index>) -> Result<()> {
    let engine = RocksEngine::open(dir, EngineConfig::default())?;
    let mut out = std::io::stdout().lock();
    let mut applied = engine.applied(GROUP)?.index;
    let mut last = engine.last_index(GROUP)?;
    if applied < last {
        apply_range(&engine, seed, applied + 1, last)?;
        applied = last;
        writeln!(out, "applied {applied}")?;
    }
    loop {
        if stop_after.is_some_and(|s| last >= s) {
            return Ok(());
        }
        let start = last + 1;
        let end = start + batch_len(seed, start) - 1;
        let entries: Vec<Entry> = (start..=end).map(|i| entry_for(seed, i)).collect();
        let hard_state = HardState {
            term: 1,
            vote: 1,
            commit: end,
        };
        engine.write_log(LogBatch {
            groups: vec![GroupWrite {
                group: GROUP,
                entries,
                hard_state: Some(hard_state),
                ..Default::default()
            }],
        })?;
        last = end;
        writeln!(out, "ack {last}")?;
        out.flush()?;
        apply_range(&engine, seed, start, end)?;
        writeln!(out, "applied {end}")?;
        out.flush()?;
        if end / COMPACT_EVERY_ENTRIES != (start - 1) / COMPACT_EVERY_ENTRIES
            && end > COMPACT_KEEP_ENTRIES
        {
            engine.compact_log(GROUP, end - COMPACT_KEEP_ENTRIES)?;
        }
    }
}

fn apply_range<B: shoal_engine::Backend>(
    engine: &shoal_engine::Engine<B>,
    seed: u64,
    from: Index,
    to: Index,
) -> Result<()> {
    let batch: Vec<ApplyEntry> = (from..=to)
        .map(|i| ApplyEntry {
            index: i,
            term: 1,
            requests: requests_for(seed, i),
        })
        .collect();
    engine.apply(GROUP, &batch)?;
    Ok(())
}

/// What the checker found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterCheck {
    /// Last index in the log.
    pub last_index: Index,
    /// Applied index of the state machine.
    pub applied_index: Index,
    /// First index still in the log.
    pub first_index: Index,
}

/// Reopens `dir` and checks everything the writer promised: every index up
/// to `acked` is in the log; the log ends on a batch boundary (no partial
/// batch); every stored entry is exactly what was written; the hard state
/// matches the log; the state machine equals a replay of the workload up to
/// its applied index.
pub fn check_writer(dir: &Path, seed: u64, acked: Index) -> Result<WriterCheck> {
    let engine = RocksEngine::open(dir, EngineConfig::default())?;
    let last = engine.last_index(GROUP)?;
    let first = engine.first_index(GROUP)?;
    let applied = engine.applied(GROUP)?.index;
    ensure!(
        last >= acked,
        "acknowledged index {acked} lost: the log ends at {last}"
    );
    ensure!(
        applied <= last,
        "applied index {applied} is past the log's end {last}"
    );
    let mut boundary = 0;
    while boundary < last {
        boundary += batch_len(seed, boundary + 1);
    }
    ensure!(
        boundary == last,
        "the log ends at {last}, inside a batch (partial batch visible)"
    );
    let state = engine.group_state(GROUP)?;
    ensure!(
        state.hard_state.commit == last,
        "hard state commit {} but log ends at {last}",
        state.hard_state.commit
    );
    if last >= first {
        let entries = engine
            .entries(GROUP, first, last + 1, u64::MAX)
            .context("reading the log back")?;
        ensure!(
            entries.len() as u64 == last - first + 1,
            "log has {} entries in [{first}, {last}]",
            entries.len()
        );
        for e in entries {
            ensure!(
                e == entry_for(seed, e.index),
                "entry {} differs from what was written",
                e.index
            );
        }
    }
    // The state machine must equal a replay of the workload to `applied`.
    let model = MemStore::new_in_memory(EngineConfig::default())?;
    let mut next = 1;
    while next <= applied {
        let to = (next + 999).min(applied);
        apply_range(&model, seed, next, to)?;
        next = to + 1;
    }
    compare_state(&engine, &model, 0..SHARDS)?;
    Ok(WriterCheck {
        last_index: last,
        applied_index: applied,
        first_index: first,
    })
}

fn compare_state<B1: shoal_engine::Backend, B2: shoal_engine::Backend>(
    a: &shoal_engine::Engine<B1>,
    b: &shoal_engine::Engine<B2>,
    shards: std::ops::Range<ShardId>,
) -> Result<()> {
    for shard in shards {
        let got = scan_all(a, shard)?;
        let want = scan_all(b, shard)?;
        if got != want {
            bail!(
                "shard {shard}: state machine ({} keys) differs from the replay ({} keys)",
                got.len(),
                want.len()
            );
        }
        for client in 0..=CLIENTS {
            ensure!(
                a.session(GROUP, shard, client)? == b.session(GROUP, shard, client)?,
                "shard {shard}: session of client {client} differs from the replay"
            );
        }
    }
    Ok(())
}

/// Every pair of `shard`, following the scan's continuation.
fn scan_all<B: shoal_engine::Backend>(
    engine: &shoal_engine::Engine<B>,
    shard: ShardId,
) -> Result<Vec<(Bytes, shoal_engine::Versioned)>> {
    let limit = engine.config().scan_limit_max;
    let mut pairs = Vec::new();
    let mut start = Bytes::new();
    loop {
        let page = engine.scan(GROUP, shard, &start, b"", limit)?;
        pairs.extend(page.pairs);
        match page.next {
            Some(next) => start = next,
            None => return Ok(pairs),
        }
    }
}

/// The content of install template `which` (0 or 1), applied at index
/// `100 * (which + 1)`.
fn template_requests(which: u64) -> Vec<Request> {
    (0..INSTALL_TEMPLATE_KEYS)
        .map(|k| Request {
            shard: INSTALL_SHARD,
            client: 0,
            seq: 0,
            command: Command::Put {
                key: Bytes::from(format!("t{k:05}")),
                value: Bytes::from(format!(
                    "template{which}-{k}-{}",
                    "x".repeat((k % 50) as usize)
                )),
            },
        })
        .chain((0..which * 300).map(|k| Request {
            shard: INSTALL_SHARD,
            client: 0,
            seq: 0,
            command: Command::Put {
                key: Bytes::from(format!("u{k:05}")),
                value: Bytes::from("only in template 1"),
            },
        }))
        .collect()
}

fn template_engine<B: shoal_engine::Backend>(
    engine: &shoal_engine::Engine<B>,
    which: u64,
) -> Result<()> {
    engine.apply(
        GROUP,
        &[ApplyEntry {
            index: 100 * (which + 1),
            term: 1,
            requests: template_requests(which),
        }],
    )?;
    Ok(())
}

fn export_dir(dir: &Path, which: u64) -> PathBuf {
    dir.join(format!("export-{which}"))
}

/// Runs the install writer: alternately installs two exported snapshots of
/// [`INSTALL_SHARD`] into the database in `dir/db`, printing `installed W`
/// after each, until killed or `rounds` installs are done.
pub fn run_installer(dir: &Path, rounds: Option<u64>) -> Result<()> {
    for which in 0..2 {
        let export = export_dir(dir, which);
        if !export
            .join(shoal_engine::snapshot::MANIFEST_FILE_NAME)
            .exists()
        {
            let tmp = dir.join(format!("template-{which}"));
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::remove_dir_all(&export);
            let source = RocksEngine::open(&tmp, EngineConfig::default())?;
            template_engine(&source, which)?;
            let staging = dir.join(format!("export-{which}.tmp"));
            let _ = std::fs::remove_dir_all(&staging);
            source.export_snapshot(GROUP, &staging)?;
            std::fs::rename(&staging, &export)?;
        }
    }
    let engine = RocksEngine::open(dir.join("db"), EngineConfig::default())?;
    // Staging copies live inside the engine's directory (an install must
    // name a directory there). Those a killed installer left half-made are
    // garbage now (an interrupted install was finished, and its directory
    // removed, by open).
    let staging_root = dir.join("db");
    for entry in std::fs::read_dir(&staging_root)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("staging-"))
        {
            std::fs::remove_dir_all(&path)?;
        }
    }
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    loop {
        if rounds.is_some_and(|r| n >= r) {
            return Ok(());
        }
        let which = n % 2;
        let staging = staging_root.join(format!("staging-{n}"));
        std::fs::create_dir_all(&staging)?;
        for file in std::fs::read_dir(export_dir(dir, which))? {
            let file = file?;
            std::fs::copy(file.path(), staging.join(file.file_name()))?;
        }
        engine.install_snapshot(&staging)?;
        writeln!(out, "installed {which}")?;
        out.flush()?;
        n += 1;
    }
}

/// What [`check_installer`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallCheck {
    /// Which template the shard holds (None: no install ever finished).
    pub template: Option<u64>,
    /// Whether the kill had interrupted an install that reopening finished.
    pub finished_interrupted_install: bool,
}

/// Reopens `dir/db` and checks that [`INSTALL_SHARD`] holds exactly one of
/// the two templates, with the matching applied index — never a mix.
pub fn check_installer(dir: &Path) -> Result<InstallCheck> {
    let engine = RocksEngine::open(dir.join("db"), EngineConfig::default())?;
    let finished_interrupted_install = engine.interrupted_installs_finished() > 0;
    let got = scan_all(&engine, INSTALL_SHARD)?;
    let applied = engine.applied(GROUP)?.index;
    if got.is_empty() && applied == 0 {
        return Ok(InstallCheck {
            template: None,
            finished_interrupted_install,
        });
    }
    for which in 0..2 {
        let model = MemStore::new_in_memory(EngineConfig::default())?;
        template_engine(&model, which)?;
        if got == scan_all(&model, INSTALL_SHARD)? {
            ensure!(
                applied == 100 * (which + 1),
                "shard holds template {which} but the applied index is {applied}"
            );
            return Ok(InstallCheck {
                template: Some(which),
                finished_interrupted_install,
            });
        }
    }
    bail!(
        "shard {INSTALL_SHARD} holds {} keys matching neither snapshot: a mix of old and new",
        got.len()
    )
}
