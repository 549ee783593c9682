//! `shoal load` and `shoal mapreduce`: MapReduce jobs over the keys stored
//! in a cluster, with QUIC (mutual TLS) between the coordinator and the
//! workers. The runtime is `shoal_shard::mapreduce::runtime`; this module
//! binds its endpoints, loads files, draws progress and prints summaries.
//!
//! Identities: the coordinator and every worker are `net` nodes with a
//! node certificate (`node-<id>.pem` in the TLS directory, issued by the
//! cluster CA like a database node's; choose ids no database node uses),
//! and reach the database as a client (`client-<name>.pem`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use shoal_net::quic::QuicNode;
use shoal_net::{NodeConfig, NodeId, Peer};
use shoal_shard::mapreduce::runtime::{
    self, builtin_apps, ClientFactory, JobOptions, WorkerOptions, WorkerSummary,
};
use shoal_shard::mapreduce::wire::{JobProgress, MrProtocol, WorkerHello};
use tokio::task::JoinSet;

use crate::cluster::Client;

/// Files larger than this are stored as several keys, cut at line ends.
pub const LOAD_CHUNK_BYTES_MAX: usize = 1 << 20;

/// Idle time after which a MapReduce endpoint gives up a transfer or a
/// dial (a dead worker is noticed this fast).
pub const IO_TIMEOUT_MS: u64 = 3_000;

/// Puts in flight while loading.
pub const LOAD_PUTS_INFLIGHT_MAX: usize = 16;

/// The chunks `load` stores for one file named `name`: `(key suffix,
/// bytes)`. A file of at most [`LOAD_CHUNK_BYTES_MAX`] is one key, its
/// name; a larger one is cut after the last newline (or, in a line longer
/// than a chunk, after the last ASCII whitespace, or anywhere) before
/// each chunk limit, into keys `name/000000`, `name/000001`, ...
pub fn chunks<'a>(name: &str, bytes: &'a [u8]) -> Vec<(String, &'a [u8])> {
    if bytes.len() <= LOAD_CHUNK_BYTES_MAX {
        return vec![(name.to_string(), bytes)];
    }
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut cut = rest.len().min(LOAD_CHUNK_BYTES_MAX);
        if cut < rest.len() {
            let window = &rest[..cut];
            cut = window
                .iter()
                .rposition(|&b| b == b'\n')
                .or_else(|| window.iter().rposition(|b| b.is_ascii_whitespace()))
                .map_or(cut, |i| i + 1);
        }
        let (chunk, tail) = rest.split_at(cut);
        out.push((format!("{name}/{:06}", out.len()), chunk));
        rest = tail;
    }
    out
}

/// What [`load`] stored.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LoadSummary {
    /// Files read.
    pub files: u64,
    /// Keys written.
    pub keys: u64,
    /// Bytes written (values).
    pub bytes: u64,
    /// Seconds it took.
    pub secs: f64,
}

/// Stores every file under `prefix` + its file name (see [`chunks`]).
pub async fn load(client: &Client, prefix: &str, files: &[PathBuf]) -> Result<LoadSummary> {
    let started = Instant::now();
    let mut summary = LoadSummary::default();
    let mut puts = JoinSet::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no UTF-8 file name", path.display()))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        summary.files += 1;
        for (suffix, chunk) in chunks(name, &bytes) {
            if puts.len() >= LOAD_PUTS_INFLIGHT_MAX {
                puts.join_next().await.expect("not empty")??;
            }
            let session = client.new_session();
            let key = Bytes::from(format!("{prefix}{suffix}"));
            let value = Bytes::copy_from_slice(chunk);
            summary.keys += 1;
            summary.bytes += value.len() as u64;
            puts.spawn(async move {
                session
                    .put(key.clone(), value)
                    .await
                    .with_context(|| format!("storing {}", key.escape_ascii()))
                    .map(|_| ())
            });
        }
    }
    while let Some(put) = puts.join_next().await {
        put??;
    }
    summary.secs = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn clients(client: &Client) -> ClientFactory<shoal_net::quic::QuicClient<shoal_shard::KvProtocol>> {
    let client = client.clone();
    Arc::new(move || client.new_session())
}

/// Binds a MapReduce endpoint: node `id` (certificate `node-<id>`) on
/// `listen`, open to any node the CA certified.
pub fn bind(
    id: u64,
    listen: SocketAddr,
    tls_dir: &Path,
    files_dir: PathBuf,
) -> Result<(QuicNode<MrProtocol>, shoal_net::Inbox<MrProtocol>)> {
    let identity = crate::certs::load(tls_dir, &Peer::Node(NodeId(id)))?;
    let mut config = NodeConfig::new(NodeId(id), listen, HashMap::new(), files_dir);
    config.members_open = true;
    // A worker that died is given up on after this, not the default 10 s:
    // its runs are then recomputed elsewhere.
    config.limits.io_timeout_ms = IO_TIMEOUT_MS;
    Ok(QuicNode::bind(config, &identity)?)
}

/// Settings of `shoal mapreduce run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The job.
    pub job: JobOptions,
    /// Take over a stored job of that name instead of planning a new one.
    pub resume: bool,
    /// The coordinator's node id.
    pub id: u64,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Certificates.
    pub tls_dir: PathBuf,
    /// Scratch directory (received files).
    pub dir: PathBuf,
    /// Draw a progress bar on stderr.
    pub progress_bar: bool,
}

/// Plans (or resumes) a job and coordinates it to the end. Returns the
/// final progress and the seconds it took.
/// `listening` is told the coordinator's address once it is bound.
pub async fn run(
    client: &Client,
    options: &RunOptions,
    listening: impl FnOnce(SocketAddr),
) -> Result<(JobProgress, f64)> {
    let started = Instant::now();
    let apps = builtin_apps();
    if !options.resume {
        runtime::plan_job(client, &options.job, &apps).await?;
    }
    let (node, inbox) = bind(
        options.id,
        options.listen,
        &options.tls_dir,
        options.dir.join("net-files"),
    )?;
    listening(node.local_addr()?);
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(JobProgress::default());
    let bar = options.progress_bar.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tasks  {msg}  elapsed {elapsed}",
            )
            .expect("static template"),
        );
        bar
    });
    let drawing = bar.clone().map(|bar| {
        tokio::spawn(async move {
            while progress_rx.changed().await.is_ok() {
                let p = progress_rx.borrow_and_update().clone();
                bar.set_length(u64::from(p.maps + p.reduces));
                bar.set_position(u64::from(p.maps_done + p.reduces_done));
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                let rate = p.bytes_read as f64 / secs / 1e6;
                let eta = if p.bytes_read > 0 && p.maps_done < p.maps {
                    let left = p.bytes_total.saturating_sub(p.bytes_read) as f64;
                    format!("map ETA {:.0}s", left / (p.bytes_read as f64 / secs))
                } else {
                    String::new()
                };
                bar.set_message(format!(
                    "read {:.1}/{:.1} MB at {rate:.1} MB/s {eta}",
                    p.bytes_read as f64 / 1e6,
                    p.bytes_total as f64 / 1e6
                ));
            }
        })
    });
    let outcome = runtime::coordinate(
        node.clone(),
        inbox,
        client.new_session(),
        &options.job.name,
        progress_tx,
    )
    .await;
    if let Some(drawing) = drawing {
        let _ = drawing.await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    node.shutdown().await;
    Ok((outcome?, started.elapsed().as_secs_f64()))
}

/// Settings of `shoal mapreduce worker`.
#[derive(Debug, Clone)]
pub struct WorkerRunOptions {
    /// This worker's node id.
    pub id: u64,
    /// Where it listens (reducers fetch runs here).
    pub listen: SocketAddr,
    /// Certificates.
    pub tls_dir: PathBuf,
    /// The coordinator.
    pub coordinator: (u64, SocketAddr),
    /// Runs and received files.
    pub dir: PathBuf,
    /// `mr-out-*` files, when the job asks for them.
    pub out_dir: PathBuf,
    /// Exit after the coordinator was unreachable this long.
    pub coordinator_silence_ms: u64,
}

/// Works for the coordinator until the job is done.
pub async fn work(client: &Client, options: &WorkerRunOptions) -> Result<WorkerSummary> {
    let (node, inbox) = bind(
        options.id,
        options.listen,
        &options.tls_dir,
        options.dir.join("net-files"),
    )?;
    let (coordinator, coordinator_addr) = options.coordinator;
    node.set_member(NodeId(coordinator), coordinator_addr);
    let addr = node.local_addr()?;
    if addr.ip().is_unspecified() {
        bail!("--listen {addr}: give an address other workers can reach");
    }
    let hello = WorkerHello {
        node: NodeId(options.id),
        incarnation: rand::random::<u32>().max(1),
        addr: Some(addr),
    };
    let worker_options = WorkerOptions {
        hello,
        coordinator: NodeId(coordinator),
        dir: options.dir.clone(),
        out_dir: options.out_dir.clone(),
        coordinator_silence_ms: options.coordinator_silence_ms,
    };
    let summary = runtime::work(
        node.clone(),
        inbox,
        clients(client),
        builtin_apps(),
        worker_options,
    )
    .await;
    node.shutdown().await;
    Ok(summary?)
}

/// A stored job's progress.
pub async fn status(client: &Client, name: &str) -> Result<JobProgress> {
    let (record, _) = runtime::load_job(client, name).await?;
    Ok(record.progress())
}

/// How long `shoal mapreduce worker` waits for a silent coordinator by
/// default before it exits (the lab's workers exit when the coordinator
/// is gone: the job is then done).
pub const WORKER_COORDINATOR_SILENCE_MS_DEFAULT: u64 = 10_000;

/// Parses `ID@ADDR`.
pub fn parse_endpoint(text: &str) -> Result<(u64, SocketAddr)> {
    let Some((id, addr)) = text.split_once('@') else {
        bail!("{text:?}: want ID@HOST:PORT");
    };
    Ok((
        id.parse().with_context(|| format!("node id {id:?}"))?,
        addr.parse().with_context(|| format!("address {addr:?}"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: large files are cut at line ends into keys that sort in file
    /// order and hold every byte once.
    #[test]
    fn chunks_cut_at_line_ends() {
        assert_eq!(
            chunks("f", b"small"),
            vec![("f".to_string(), &b"small"[..])]
        );
        let line = b"word word word\n";
        let big: Vec<u8> = line
            .iter()
            .copied()
            .cycle()
            .take(LOAD_CHUNK_BYTES_MAX * 2 + 7)
            .collect();
        let parts = chunks("big.txt", &big);
        assert!(parts.len() >= 3);
        let joined: Vec<u8> = parts.iter().flat_map(|(_, c)| c.iter().copied()).collect();
        assert_eq!(joined, big);
        for (i, (key, chunk)) in parts.iter().enumerate() {
            assert_eq!(key, &format!("big.txt/{i:06}"));
            assert!(chunk.len() <= LOAD_CHUNK_BYTES_MAX);
            if i + 1 < parts.len() {
                assert!(chunk.ends_with(b"\n"));
            }
        }
    }
}
