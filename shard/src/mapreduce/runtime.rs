//! The MapReduce runtime: the I/O shell around the pure core. A job is
//! planned ([`plan_job`]: check the spec, pin the input, split it, store
//! the job record), coordinated ([`coordinate`]: answer workers from the
//! [`JobTable`], storing it in the database after every change) and worked
//! ([`work`]: read a split at the job's snapshot, map it into runs on
//! local disk, fetch runs from other workers over `net` bulk streams,
//! reduce, write the output into the database).
//!
//! Generic over the `net` transport (QUIC for `shoal mapreduce`, the
//! in-memory network for [`run_in_process`] and the simulated tests) and
//! over the database client's transport.
//!
//! # Guarantees
//! - **One snapshot.** The input is pinned once, when the job is planned
//!   (see [`Client::pin`]): every map task reads its split at that point,
//!   so no key is missed or read twice however the database changes
//!   meanwhile, and the job's result is the sequential run over the pinned
//!   snapshot (one pin per group, each at its own point). A pin lives on
//!   one node; if that node restarts, the map tasks of its shards fail
//!   with the pin gone and the job fails (rerun it: a new job pins anew).
//! - **Survives its coordinator.** The job record (spec, pins, task table,
//!   known workers) lives under [`JOB_KEY_PREFIX`]`<name>` and is written
//!   with a versioned put after every change and before the answer that
//!   depends on it. A restarted coordinator loads it, fences the old one
//!   (its next versioned put fails), gives running attempts a fresh lease
//!   and goes on.
//! - **Output is final when the job says done.** A reduce attempt reports
//!   only after every output put was acknowledged; the job is done only
//!   when every partition has reported. Apps are deterministic, so a
//!   backup or re-run of a partition writes the same pairs: no duplicates,
//!   no mix of attempts.
//! - **Lost map output is recomputed.** Runs live on the worker that made
//!   them, as in the MapReduce paper. A worker process that restarts under
//!   the same node id and directory still serves them; a reducer that
//!   cannot reach a holder asks the coordinator where it is now and tries
//!   again, and only when the runs stay out of reach (or the holder says
//!   it has none) are they reported lost and those map tasks run again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_net::{Inbox, NodeId, Peer, RpcCaller, Transport};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::app::{app_by_name, MapReduceApp};
use super::coordinator::{Assignment, Finish, JobConfig, JobTable, TaskRef, TaskState};
use super::plan::{split_range, JobSpec, KeyRange, PlanError, ShardInput};
use super::wire::{
    encode_run, read_run, write_atomically, JobHeader, JobProgress, MrProtocol, MrRequest,
    MrResponse, PhaseTimes, RunId, RunSource, TaskReply, WorkerHello,
};
use super::worker::{map_task, reduce_task, Run};
use crate::client::{Client, ClientError, PinnedShard};
use crate::protocol::KvProtocol;

/// Job records live under this prefix, followed by the job's name. Keep
/// input and output ranges clear of it ([`plan_job`] refuses overlaps).
pub const JOB_KEY_PREFIX: &[u8] = b"__shoal/mapreduce/";

/// Longest job name, in bytes.
pub const JOB_NAME_BYTES_MAX: usize = 128;

/// Default target size of one map task's input.
pub const SPLIT_BYTES_DEFAULT: u64 = 16 << 20;

/// How long a worker told to wait waits before asking again.
pub const WAIT_MS: u64 = 200;

/// A worker that cannot reach its coordinator for this long exits.
pub const COORDINATOR_SILENCE_MS_MAX: u64 = 60_000;

/// Deadline of one call to the coordinator: long, because a retried task
/// request whose answer was lost leaves an attempt orphaned until its
/// lease runs out.
pub const COORDINATOR_CALL_DEADLINE_MS: u64 = 10_000;

/// Longest wait for one run to be sent by its holder.
pub const FETCH_DEADLINE_MS: u64 = 30_000;

/// After the job finished, the coordinator keeps answering `Done` until
/// every worker it knows was told, or no worker asked for this long (so
/// running workers learn it and exit).
pub const DONE_LINGER_MS: u64 = 1_000;

/// Pairs asked for per page when a map task reads its split.
pub const READ_PAGE_PAIRS: u64 = 1_000;

/// Output puts in flight per reduce attempt.
pub const OUTPUT_PUTS_INFLIGHT_MAX: usize = 128;

/// Tries at fetching one run from an unresponsive holder.
pub const FETCH_TRIES: u32 = 3;

/// Pause between those tries (the lab restarts a crashed worker after 1 s).
pub const FETCH_RETRY_MS: u64 = 1_000;

/// Holders one reduce attempt fetches from at once.
pub const FETCHES_INFLIGHT_MAX: usize = 8;

/// Resolves an application name (from the job record) to the code that
/// runs it. [`builtin_apps`] knows the built-in names; an embedded user
/// adds their own.
pub type AppResolver = Arc<dyn Fn(&str) -> Option<Arc<dyn MapReduceApp>> + Send + Sync>;

/// The built-in applications, by [`app_by_name`]'s names and the lab's
/// test applications ([`super::labapps`]).
pub fn builtin_apps() -> AppResolver {
    Arc::new(|name: &str| {
        super::labapps::lab_app_by_name(name).or_else(|| app_by_name(name).map(Arc::from))
    })
}

/// Makes database clients (each with its own session, so several can have
/// an operation in flight at once).
pub type ClientFactory<C> = Arc<dyn Fn() -> Client<C> + Send + Sync>;

/// The state of a job as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Tasks are being handed out.
    Running,
    /// Every output is final.
    Done,
    /// It failed; nothing more will run.
    Failed(String),
}

/// Everything a coordinator needs to (re)start a job; stored as one value
/// under [`JOB_KEY_PREFIX`]`<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// What workers are told.
    pub header: JobHeader,
    /// The spec it was planned from.
    pub spec: JobSpec,
    /// The input snapshot, one entry per shard (the shards of a group share
    /// one pin; split keys dropped).
    pub pins: Vec<PinnedShard>,
    /// The task table.
    pub table: JobTable,
    /// The latest incarnation seen of each worker node.
    pub workers: BTreeMap<u64, WorkerHello>,
    /// Input bytes read by the winning map attempts.
    pub bytes_read: u64,
    /// Input bytes at the snapshot.
    pub bytes_total: u64,
    /// Attempts handed out.
    pub attempts: u64,
    /// Where the winning attempts' time went.
    pub times: PhaseTimes,
    /// Running, done or failed.
    pub state: JobState,
}

impl JobRecord {
    /// Progress as reported to `shoal mapreduce status` and progress bars.
    pub fn progress(&self) -> JobProgress {
        let done = |task| self.table.task_state(task) == TaskState::Finished;
        let maps = self.table.map_count();
        let reduces = self.table.reduce_count();
        JobProgress {
            maps_done: (0..maps).filter(|&t| done(TaskRef::Map(t))).count() as u32,
            maps,
            reduces_done: (0..reduces).filter(|&p| done(TaskRef::Reduce(p))).count() as u32,
            reduces,
            bytes_read: self.bytes_read,
            bytes_total: self.bytes_total,
            attempts: self.attempts,
            times: self.times,
            finished: self.state != JobState::Running,
            failure: match &self.state {
                JobState::Failed(why) => Some(why.clone()),
                _ => None,
            },
        }
    }
}

/// What to run: [`plan_job`]'s input.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The job's name (its record's key); unique among stored jobs.
    pub name: String,
    /// The application's name, resolved by the workers' [`AppResolver`].
    pub app: String,
    /// Input range, output prefix, reduce count.
    pub spec: JobSpec,
    /// Leases, backups, attempts.
    pub config: JobConfig,
    /// Target input bytes per map task.
    pub split_bytes: u64,
    /// Workers also write `mr-out-<partition>` files.
    pub write_files: bool,
}

/// Why a job could not be planned, coordinated or worked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MrError {
    /// The spec is invalid or the input is empty.
    #[error("bad job: {0}")]
    Plan(#[from] PlanError),
    /// No application by that name.
    #[error(
        "unknown application {0:?} (built in: wc, indexer, grep:PATTERN, and the lab's test apps)"
    )]
    UnknownApp(String),
    /// The job's name is empty or too long.
    #[error("job name must be 1..={JOB_NAME_BYTES_MAX} bytes")]
    BadName,
    /// The input or output overlaps the job records' prefix.
    #[error("the input range and output prefix must not overlap {}", JOB_KEY_PREFIX.escape_ascii())]
    ReservedRange,
    /// Keys already exist under the output prefix.
    #[error("the output prefix {} already holds keys (e.g. {}); choose another or delete them", .prefix.escape_ascii(), .example.escape_ascii())]
    OutputNotEmpty {
        /// The prefix.
        prefix: Vec<u8>,
        /// One key found there.
        example: Vec<u8>,
    },
    /// A job of that name is already stored.
    #[error("a job named {0:?} already exists (use `status`, or another name)")]
    JobExists(String),
    /// No job of that name is stored.
    #[error("no job named {0:?}")]
    NoSuchJob(String),
    /// Another coordinator took the job over (its versioned put won).
    #[error("another coordinator took job {0:?} over")]
    Fenced(String),
    /// The stored job record does not decode.
    #[error("job record {0:?} is corrupt: {1}")]
    CorruptRecord(String, String),
    /// The job failed (a task ran out of attempts).
    #[error("job failed: {0}")]
    Failed(String),
    /// The coordinator did not answer for [`COORDINATOR_SILENCE_MS_MAX`].
    #[error("the coordinator did not answer for {0:?}")]
    CoordinatorSilent(Duration),
    /// The database refused or failed an operation.
    #[error("database: {0}")]
    Db(#[from] ClientError),
    /// Local files (runs, output files).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn job_key(name: &str) -> Bytes {
    let mut key = JOB_KEY_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    Bytes::from(key)
}

fn check_name(name: &str) -> Result<(), MrError> {
    if name.is_empty() || name.len() > JOB_NAME_BYTES_MAX {
        return Err(MrError::BadName);
    }
    Ok(())
}

/// Checks `options`, pins the input, splits it into map tasks and stores
/// the new job's record. Writes nothing when any check fails: an unknown
/// app, an invalid spec (reduce count 0, output overlapping the input),
/// an empty input, keys already under the output prefix, a name in use.
pub async fn plan_job<C: RpcCaller<KvProtocol>>(
    db: &Client<C>,
    options: &JobOptions,
    apps: &AppResolver,
) -> Result<JobRecord, MrError> {
    check_name(&options.name)?;
    options.spec.validate()?;
    options.config.validate().map_err(PlanError::from)?;
    if apps(&options.app).is_none() {
        return Err(MrError::UnknownApp(options.app.clone()));
    }
    let reserved = KeyRange::prefix(JOB_KEY_PREFIX);
    if options.spec.input.overlaps(&reserved)
        || KeyRange::prefix(&options.spec.output_prefix).overlaps(&reserved)
    {
        return Err(MrError::ReservedRange);
    }
    let output = KeyRange::prefix(&options.spec.output_prefix);
    let existing = db.scan(output.start.clone(), output.end.clone(), 1).await?;
    if let Some((key, _)) = existing.first() {
        return Err(MrError::OutputNotEmpty {
            prefix: options.spec.output_prefix.clone(),
            example: key.to_vec(),
        });
    }
    if db.get(job_key(&options.name)).await.is_ok() {
        return Err(MrError::JobExists(options.name.clone()));
    }
    let input = &options.spec.input;
    let mut pins = db
        .pin(
            Bytes::from(input.start.clone()),
            Bytes::from(input.end.clone()),
            options.split_bytes,
        )
        .await?;
    let planned = plan_from_pins(options, &pins);
    let record = match planned {
        Ok(table) => {
            let bytes_total = pins.iter().map(|p| p.info.bytes).sum();
            for pin in &mut pins {
                pin.info.split_keys.clear();
            }
            JobRecord {
                header: JobHeader {
                    job: rand::random(),
                    app: options.app.clone(),
                    reduce_count: options.spec.reduce_count,
                    output_prefix: options.spec.output_prefix.clone(),
                    write_files: options.write_files,
                },
                spec: options.spec.clone(),
                pins,
                table,
                workers: BTreeMap::new(),
                bytes_read: 0,
                bytes_total,
                attempts: 0,
                times: PhaseTimes::default(),
                state: JobState::Running,
            }
        }
        Err(e) => {
            release_pins(db, &pins).await;
            return Err(e);
        }
    };
    let encoded = postcard::to_stdvec(&record).expect("a job record encodes");
    match db.put_if_version(job_key(&options.name), encoded, 0).await {
        Ok(_) => Ok(record),
        Err(e) => {
            release_pins(db, &record.pins).await;
            Err(match e {
                ClientError::VersionMismatch { .. } => MrError::JobExists(options.name.clone()),
                other => MrError::Db(other),
            })
        }
    }
}

fn plan_from_pins(options: &JobOptions, pins: &[PinnedShard]) -> Result<JobTable, MrError> {
    if pins.iter().all(|p| p.info.keys == 0) {
        return Err(PlanError::EmptyInputRange {
            start: options.spec.input.start.clone(),
            end: options.spec.input.end.clone(),
        }
        .into());
    }
    let shards: Vec<ShardInput> = pins
        .iter()
        .filter(|p| p.info.keys > 0)
        .map(|p| ShardInput {
            shard: p.shard,
            approx_bytes: p.info.bytes,
            split_keys: p.info.split_keys.iter().map(|k| k.to_vec()).collect(),
        })
        .collect();
    let splits = split_range(&options.spec.input, &shards, options.split_bytes)?;
    Ok(JobTable::new(
        splits,
        options.spec.reduce_count,
        options.config,
    )?)
}

/// Releases the job's input pins: one unpin per group pin (its shards
/// share it; unpinning another of them would only answer that it is gone).
async fn release_pins<C: RpcCaller<KvProtocol>>(db: &Client<C>, pins: &[PinnedShard]) {
    let mut released = std::collections::BTreeSet::new();
    for pin in pins {
        if !released.insert((pin.info.node, pin.info.pin)) {
            continue;
        }
        if let Err(e) = db.unpin(pin).await {
            tracing::warn!(shard = pin.shard, error = %e, "could not release an input pin; it expires when idle");
        }
    }
}

/// Reads job `name`'s stored record.
pub async fn load_job<C: RpcCaller<KvProtocol>>(
    db: &Client<C>,
    name: &str,
) -> Result<(JobRecord, u64), MrError> {
    check_name(name)?;
    let stored = match db.get(job_key(name)).await {
        Ok(v) => v,
        Err(ClientError::NotFound) => return Err(MrError::NoSuchJob(name.to_string())),
        Err(e) => return Err(e.into()),
    };
    let record = postcard::from_bytes(&stored.value)
        .map_err(|e| MrError::CorruptRecord(name.to_string(), e.to_string()))?;
    Ok((record, stored.version))
}

/// The coordinator of one job: its record, the stored version it last
/// wrote, and its clock.
struct Coordinator<C: RpcCaller<KvProtocol>> {
    db: Client<C>,
    name: String,
    record: JobRecord,
    version: u64,
    clock_base_ms: u64,
    started: Instant,
}

impl<C: RpcCaller<KvProtocol>> Coordinator<C> {
    fn now_ms(&self) -> u64 {
        self.clock_base_ms + self.started.elapsed().as_millis() as u64
    }

    /// Stores the record; fails if another coordinator wrote it since.
    async fn save(&mut self) -> Result<(), MrError> {
        let encoded = postcard::to_stdvec(&self.record).expect("a job record encodes");
        match self
            .db
            .put_if_version(job_key(&self.name), encoded, self.version)
            .await
        {
            Ok(version) => {
                self.version = version;
                Ok(())
            }
            Err(ClientError::VersionMismatch { .. }) => Err(MrError::Fenced(self.name.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Notes `hello`; a new incarnation of a known node means its previous
    /// process stopped: its running attempts are abandoned, and its runs
    /// are fetched from the new process (which finds them if it kept the
    /// same directory; if not, the reducer reports them lost). Returns
    /// whether anything changed.
    fn register(&mut self, hello: WorkerHello) -> bool {
        match self.record.workers.insert(hello.node.0, hello) {
            Some(old) if old.incarnation != hello.incarnation => {
                let loss = self.record.table.worker_restarted(old.worker());
                tracing::info!(node = %hello.node, ?loss, "worker restarted");
                true
            }
            Some(old) => old != hello,
            None => true,
        }
    }

    fn finish_if_done(&mut self) {
        if self.record.state != JobState::Running {
            return;
        }
        if let Some(failure) = self.record.table.failure() {
            self.record.state = JobState::Failed(failure.to_string());
        } else if self.record.table.is_done() {
            self.record.state = JobState::Done;
        }
    }

    fn pin_of(&self, shard: u32) -> Option<&PinnedShard> {
        self.record.pins.iter().find(|p| p.shard == shard)
    }

    async fn task(&mut self, hello: WorkerHello) -> Result<MrResponse, MrError> {
        let mut dirty = self.register(hello);
        if self.record.state != JobState::Running {
            if dirty {
                self.save().await?;
            }
            return Ok(MrResponse::Task(TaskReply::Done));
        }
        let now = self.now_ms();
        let reply = match self.record.table.request_task(hello.worker(), now) {
            Ok(Assignment::Map {
                task,
                attempt,
                split,
            }) => {
                let Some(pin) = self.pin_of(split.shard).cloned() else {
                    unreachable!("every split's shard was pinned at planning")
                };
                self.record.attempts += 1;
                dirty = true;
                TaskReply::Map {
                    header: self.record.header.clone(),
                    task,
                    attempt,
                    split,
                    pin,
                }
            }
            Ok(Assignment::Reduce {
                partition,
                attempt,
                map_outputs,
            }) => {
                // A holder that restarted is reached at its new address;
                // its runs keep the name of the attempt that made them.
                let sources = map_outputs
                    .iter()
                    .map(|m| {
                        let mut source = postcard::from_bytes::<RunSource>(&m.location)
                            .expect("locations are written by this coordinator");
                        if let Some(now) = self.record.workers.get(&source.holder.node.0) {
                            source.reach = *now;
                        }
                        source
                    })
                    .collect();
                self.record.attempts += 1;
                dirty = true;
                TaskReply::Reduce {
                    header: self.record.header.clone(),
                    partition,
                    attempt,
                    sources,
                }
            }
            Ok(Assignment::Wait) => TaskReply::Wait { ms: WAIT_MS },
            Ok(Assignment::Done) | Err(_) => {
                self.finish_if_done();
                dirty = true;
                TaskReply::Done
            }
        };
        if dirty {
            self.save().await?;
        }
        Ok(MrResponse::Task(reply))
    }

    async fn handle(&mut self, request: MrRequest) -> Result<MrResponse, MrError> {
        let refused = |e: &dyn std::fmt::Display| MrResponse::Refused {
            reason: e.to_string(),
        };
        match request {
            MrRequest::Task { hello } => self.task(hello).await,
            MrRequest::MapDone {
                hello,
                task,
                attempt,
                bytes_read,
                times,
            } => {
                self.register(hello);
                let location = postcard::to_stdvec(&RunSource {
                    task,
                    attempt,
                    holder: hello,
                    reach: hello,
                })
                .expect("a location encodes");
                match self
                    .record
                    .table
                    .map_finished(hello.worker(), task, attempt, location)
                {
                    Ok(finish) => {
                        if finish == Finish::Accepted {
                            self.record.bytes_read += bytes_read;
                            self.record.times.add(&times);
                        }
                        self.save().await?;
                        Ok(MrResponse::Ack)
                    }
                    Err(e) => Ok(refused(&e)),
                }
            }
            MrRequest::ReduceDone {
                hello,
                partition,
                attempt,
                times,
            } => match self
                .record
                .table
                .reduce_finished(hello.worker(), partition, attempt)
            {
                Ok(finish) => {
                    if finish == Finish::Accepted {
                        self.record.times.add(&times);
                    }
                    self.finish_if_done();
                    self.save().await?;
                    Ok(MrResponse::Ack)
                }
                Err(e) => Ok(refused(&e)),
            },
            MrRequest::Failed {
                hello,
                task,
                attempt,
                reason,
            } => {
                tracing::warn!(worker = %hello.node, %task, attempt, %reason, "attempt failed");
                match self
                    .record
                    .table
                    .attempt_failed(hello.worker(), task, attempt)
                {
                    Ok(()) => {
                        self.finish_if_done();
                        self.save().await?;
                        Ok(MrResponse::Ack)
                    }
                    Err(e) => Ok(refused(&e)),
                }
            }
            MrRequest::FetchFailed {
                hello,
                partition,
                attempt,
                holder,
                reason,
            } => {
                let loss = self.record.table.worker_lost(holder.worker());
                tracing::warn!(reducer = %hello.node, holder = %holder.node, ?loss, %reason, "runs could not be fetched; their maps run again");
                if let Err(e) = self.record.table.attempt_input_lost(
                    hello.worker(),
                    TaskRef::Reduce(partition),
                    attempt,
                ) {
                    tracing::info!(error = %e, "the reduce attempt's end was not taken");
                }
                self.finish_if_done();
                self.save().await?;
                Ok(MrResponse::Ack)
            }
            MrRequest::PinLost { hello, shard } => {
                tracing::error!(worker = %hello.node, shard, "the input snapshot is gone; the job fails");
                if self.record.state == JobState::Running {
                    self.record.state = JobState::Failed(format!(
                        "the input snapshot of shard {shard} is gone (its node restarted, or the \
                         pin idled out); run the job again to read a new one"
                    ));
                    self.save().await?;
                }
                Ok(MrResponse::Ack)
            }
            MrRequest::Locate { node } => Ok(MrResponse::Located(
                self.record.workers.get(&node.0).copied(),
            )),
            MrRequest::Status => Ok(MrResponse::Progress(self.record.progress())),
            MrRequest::SendRun { .. } => Ok(MrResponse::Refused {
                reason: "this is a coordinator, not a worker".into(),
            }),
        }
    }
}

/// Coordinates job `name` (planned by [`plan_job`], or left running by a
/// coordinator that died) until it is done or failed: answers the workers
/// calling `node`, stores the record after every change, publishes
/// progress on `progress`. Then keeps answering `Done` for
/// [`DONE_LINGER_MS`] after the last worker asked, releases the input
/// pins, and returns the final progress (or [`MrError::Failed`]).
pub async fn coordinate<T, C>(
    node: T,
    mut inbox: Inbox<MrProtocol>,
    db: Client<C>,
    name: &str,
    progress: watch::Sender<JobProgress>,
) -> Result<JobProgress, MrError>
where
    T: Transport<MrProtocol>,
    C: RpcCaller<KvProtocol>,
{
    let _node = node;
    let (mut record, version) = load_job(&db, name).await?;
    let clock_base_ms = record.table.now_ms();
    record.table.resume(clock_base_ms);
    let mut coordinator = Coordinator {
        db: db.clone(),
        name: name.to_string(),
        record,
        version,
        clock_base_ms,
        started: Instant::now(),
    };
    // Fence any coordinator still running this job.
    coordinator.save().await?;
    progress.send_replace(coordinator.record.progress());
    let mut finished_at: Option<Instant> = None;
    let mut last_ask = Instant::now();
    let mut told_done: std::collections::BTreeSet<u64> = Default::default();
    loop {
        // Once the job is over, linger only until every worker was told.
        let linger_until = if coordinator.record.state != JobState::Running {
            let done = *finished_at.get_or_insert_with(Instant::now);
            let quiet = last_ask.max(done) + Duration::from_millis(DONE_LINGER_MS);
            let all_told = coordinator
                .record
                .workers
                .keys()
                .all(|node| told_done.contains(node));
            if all_told || Instant::now() >= quiet {
                break;
            }
            Some(quiet)
        } else {
            None
        };
        let received = match linger_until {
            Some(quiet) => tokio::time::timeout_at(quiet, inbox.rpcs.recv())
                .await
                .ok()
                .flatten(),
            None => inbox.rpcs.recv().await,
        };
        let Some(rpc) = received else {
            break;
        };
        let asked = match &rpc.request {
            MrRequest::Task { hello } => Some(hello.node.0),
            _ => None,
        };
        if asked.is_some() {
            last_ask = Instant::now();
        }
        let response = match refuse_impostor(&rpc.from, &rpc.request) {
            Some(refusal) => refusal,
            None => coordinator.handle(rpc.request).await?,
        };
        if let (Some(node), MrResponse::Task(TaskReply::Done)) = (asked, &response) {
            told_done.insert(node);
        }
        rpc.reply.send(response);
        progress.send_replace(coordinator.record.progress());
    }
    release_pins(&db, &coordinator.record.pins).await;
    let last = coordinator.record.progress();
    progress.send_replace(last.clone());
    match coordinator.record.state {
        JobState::Failed(why) => Err(MrError::Failed(why)),
        _ => Ok(last),
    }
}

/// A request that speaks for a worker (every one but `Status`) must come
/// from that worker's node certificate: whatever a caller claims in a
/// hello, it can act only as itself. Returns the refusal, if any.
pub fn refuse_impostor(from: &Peer, request: &MrRequest) -> Option<MrResponse> {
    let claimed = match request {
        MrRequest::Task { hello }
        | MrRequest::MapDone { hello, .. }
        | MrRequest::ReduceDone { hello, .. }
        | MrRequest::Failed { hello, .. }
        | MrRequest::FetchFailed { hello, .. }
        | MrRequest::PinLost { hello, .. }
        | MrRequest::SendRun { hello, .. } => hello.node,
        MrRequest::Status | MrRequest::Locate { .. } => return None,
    };
    if *from == Peer::Node(claimed) {
        return None;
    }
    tracing::warn!(?from, %claimed, "a caller spoke for another worker; refused");
    Some(MrResponse::Refused {
        reason: format!("{from:?} cannot speak for worker {claimed}"),
    })
}

/// How a worker reaches others beyond its coordinator: a QUIC node learns
/// a worker's address; the in-memory network needs nothing.
pub trait WorkerTransport: Transport<MrProtocol> {
    /// Makes `hello`'s node reachable (messages, files) from this one.
    fn learn(&self, hello: &WorkerHello);
}

impl WorkerTransport for shoal_net::quic::QuicNode<MrProtocol> {
    fn learn(&self, hello: &WorkerHello) {
        if let Some(addr) = hello.addr {
            self.set_member(hello.node, addr);
        }
    }
}

impl WorkerTransport for shoal_net::mem::MemNode<MrProtocol> {
    fn learn(&self, _hello: &WorkerHello) {}
}

/// A worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// This process's identity.
    pub hello: WorkerHello,
    /// The coordinator's node id (reachable through the transport).
    pub coordinator: NodeId,
    /// Where runs are kept (created if missing).
    pub dir: PathBuf,
    /// Where `mr-out-<partition>` files go when the job asks for them.
    pub out_dir: PathBuf,
    /// Exit once the coordinator was unreachable this long (at most
    /// [`COORDINATOR_SILENCE_MS_MAX`]).
    pub coordinator_silence_ms: u64,
}

/// What a worker did before it exited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Map attempts it finished.
    pub maps: u64,
    /// Reduce attempts it finished.
    pub reduces: u64,
    /// Attempts that failed.
    pub failures: u64,
}

type RunWaiters = Arc<Mutex<HashMap<RunId, oneshot::Sender<PathBuf>>>>;

/// Runs a worker until its coordinator says the job is done (or stays
/// silent for [`COORDINATOR_SILENCE_MS_MAX`]). Meanwhile it serves its
/// runs to reducers.
pub async fn work<T, C>(
    node: T,
    inbox: Inbox<MrProtocol>,
    clients: ClientFactory<C>,
    apps: AppResolver,
    options: WorkerOptions,
) -> Result<WorkerSummary, MrError>
where
    T: WorkerTransport + Clone,
    C: RpcCaller<KvProtocol>,
{
    std::fs::create_dir_all(&options.dir)?;
    let Inbox {
        rpcs: mut incoming,
        files: mut arrivals,
        ..
    } = inbox;
    let waiters: RunWaiters = Arc::default();
    let mut tasks = JoinSet::new();
    {
        // Serve our runs to reducers.
        let node = node.clone();
        let dir = options.dir.clone();
        tasks.spawn(async move {
            let mut sends = JoinSet::new();
            while let Some(rpc) = incoming.recv().await {
                if let Some(refusal) = refuse_impostor(&rpc.from, &rpc.request) {
                    rpc.reply.send(refusal);
                    continue;
                }
                let MrRequest::SendRun { hello, run } = rpc.request else {
                    rpc.reply.send(MrResponse::Refused {
                        reason: "this is a worker; it only sends runs".into(),
                    });
                    continue;
                };
                let path = dir.join(run.file_name());
                let node = node.clone();
                sends.spawn(async move {
                    if !path.exists() {
                        rpc.reply.send(MrResponse::RunMissing);
                        return;
                    }
                    node.learn(&hello);
                    let response = match node.send_file(hello.node, path, run).await {
                        Ok(_) => MrResponse::RunSent,
                        Err(e) => MrResponse::Refused {
                            reason: format!("sending {}: {e}", run.file_name()),
                        },
                    };
                    rpc.reply.send(response);
                });
                while sends.try_join_next().is_some() {}
            }
            sends.shutdown().await;
        });
    }
    {
        // Hand arriving runs to the reduce waiting for them.
        let waiters = waiters.clone();
        tasks.spawn(async move {
            while let Some(file) = arrivals.recv().await {
                let waiter = waiters.lock().expect("waiters lock").remove(&file.meta);
                match waiter {
                    Some(tx) => {
                        if let Err(path) = tx.send(file.path) {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    None => {
                        let _ = std::fs::remove_file(&file.path);
                    }
                }
            }
        });
    }
    let worker = Worker {
        node,
        clients,
        apps,
        options,
        waiters,
        resolved: Mutex::default(),
    };
    let result = worker.run().await;
    tasks.shutdown().await;
    result
}

struct Worker<T, C: RpcCaller<KvProtocol>> {
    node: T,
    clients: ClientFactory<C>,
    apps: AppResolver,
    options: WorkerOptions,
    waiters: RunWaiters,
    resolved: Mutex<HashMap<String, Arc<dyn MapReduceApp>>>,
}

/// Why one fetch of a run failed.
enum FetchError {
    /// The holder answered that it does not have the run (or it is
    /// corrupt): it is lost.
    Missing(String),
    /// The holder did not answer: it may be restarting.
    Unreachable(String),
}

/// Why one attempt stopped early.
enum AttemptError {
    /// Report it as failed.
    Failed(String),
    /// A holder's runs could not be fetched.
    Fetch(WorkerHello, String),
    /// The input snapshot of `shard` is gone (its node restarted or the
    /// pin expired): the job cannot finish at its snapshot.
    PinLost(u32),
}

impl<T: WorkerTransport + Clone, C: RpcCaller<KvProtocol>> Worker<T, C> {
    async fn ask(&self, request: MrRequest) -> Result<MrResponse, MrError> {
        let silent_since = Instant::now();
        loop {
            match self
                .node
                .call_with_deadline(
                    self.options.coordinator,
                    request.clone(),
                    Duration::from_millis(COORDINATOR_CALL_DEADLINE_MS),
                )
                .await
            {
                Ok(response) => return Ok(response),
                Err(e) => {
                    let silence = silent_since.elapsed();
                    let limit = self
                        .options
                        .coordinator_silence_ms
                        .min(COORDINATOR_SILENCE_MS_MAX);
                    if silence >= Duration::from_millis(limit) {
                        return Err(MrError::CoordinatorSilent(silence));
                    }
                    tracing::debug!(error = %e, "coordinator unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(WAIT_MS)).await;
                }
            }
        }
    }

    async fn run(&self) -> Result<WorkerSummary, MrError> {
        let hello = self.options.hello;
        let mut summary = WorkerSummary::default();
        let mut jobs_seen = Vec::new();
        loop {
            let response = self.ask(MrRequest::Task { hello }).await?;
            let MrResponse::Task(task) = response else {
                tracing::warn!(?response, "unexpected answer to a task request");
                tokio::time::sleep(Duration::from_millis(WAIT_MS)).await;
                continue;
            };
            let (task_ref, attempt, outcome): (_, _, Result<(u64, PhaseTimes), AttemptError>) =
                match task {
                    TaskReply::Done => break,
                    TaskReply::Wait { ms } => {
                        tokio::time::sleep(Duration::from_millis(ms.min(10 * WAIT_MS))).await;
                        continue;
                    }
                    TaskReply::Map {
                        header,
                        task,
                        attempt,
                        split,
                        pin,
                    } => {
                        jobs_seen.push(header.job);
                        let outcome = self.map(&header, task, attempt, &split.range, &pin).await;
                        (TaskRef::Map(task), attempt, outcome)
                    }
                    TaskReply::Reduce {
                        header,
                        partition,
                        attempt,
                        sources,
                    } => {
                        jobs_seen.push(header.job);
                        let outcome = self.reduce(&header, partition, &sources).await;
                        (TaskRef::Reduce(partition), attempt, outcome.map(|t| (0, t)))
                    }
                };
            let report = match (task_ref, outcome) {
                (TaskRef::Map(task), Ok((bytes_read, times))) => {
                    summary.maps += 1;
                    MrRequest::MapDone {
                        hello,
                        task,
                        attempt,
                        bytes_read,
                        times,
                    }
                }
                (TaskRef::Reduce(partition), Ok((_, times))) => {
                    summary.reduces += 1;
                    MrRequest::ReduceDone {
                        hello,
                        partition,
                        attempt,
                        times,
                    }
                }
                (task, Err(AttemptError::Failed(reason))) => {
                    summary.failures += 1;
                    MrRequest::Failed {
                        hello,
                        task,
                        attempt,
                        reason,
                    }
                }
                (TaskRef::Reduce(partition), Err(AttemptError::Fetch(holder, reason))) => {
                    // The holder's maps run again; this attempt ends now
                    // (uncharged) rather than at its lease.
                    summary.failures += 1;
                    MrRequest::FetchFailed {
                        hello,
                        partition,
                        attempt,
                        holder,
                        reason,
                    }
                }
                (task @ TaskRef::Map(_), Err(AttemptError::Fetch(_, reason))) => {
                    summary.failures += 1;
                    MrRequest::Failed {
                        hello,
                        task,
                        attempt,
                        reason,
                    }
                }
                (_, Err(AttemptError::PinLost(shard))) => {
                    summary.failures += 1;
                    MrRequest::PinLost { hello, shard }
                }
            };
            if let MrResponse::Refused { reason } = self.ask(report).await? {
                tracing::info!(%reason, "report not taken");
            }
        }
        // The job is done: nobody needs our runs any more.
        jobs_seen.sort_unstable();
        jobs_seen.dedup();
        remove_runs(&self.options.dir, &jobs_seen);
        Ok(summary)
    }

    /// Reads the split at the pin, maps it and stores one run per
    /// partition. Returns the input bytes read and the time spent.
    async fn map(
        &self,
        header: &JobHeader,
        task: u32,
        attempt: u32,
        range: &KeyRange,
        pin: &PinnedShard,
    ) -> Result<(u64, PhaseTimes), AttemptError> {
        let app = self.app(header)?;
        let mut times = PhaseTimes::default();
        let started = Instant::now();
        let db = (self.clients)();
        let mut pairs: Vec<(Bytes, Bytes)> = Vec::new();
        let mut bytes_read = 0u64;
        let mut start = Bytes::from(range.start.clone());
        let end = Bytes::from(range.end.clone());
        loop {
            let page = db
                .scan_pinned(pin, start, end.clone(), READ_PAGE_PAIRS)
                .await
                .map_err(|e| match e {
                    ClientError::PinGone => AttemptError::PinLost(pin.shard),
                    e => AttemptError::Failed(format!("reading the input: {e}")),
                })?;
            for (key, versioned) in page.pairs {
                bytes_read += (key.len() + versioned.value.len()) as u64;
                pairs.push((key, versioned.value));
            }
            match page.next {
                Some(next) => start = next,
                None => break,
            }
        }
        times.read_ms = elapsed_ms(started);
        let started = Instant::now();
        let dir = self.options.dir.clone();
        let reduce_count = header.reduce_count;
        let job = header.job;
        blocking(move || -> Result<(), String> {
            let runs = map_task(app.as_ref(), pairs, reduce_count);
            for (partition, run) in runs.iter().enumerate() {
                let id = RunId {
                    job,
                    task,
                    attempt,
                    partition: partition as u32,
                };
                write_atomically(&dir.join(id.file_name()), &encode_run(run))
                    .map_err(|e| format!("writing run {}: {e}", id.file_name()))?;
            }
            Ok(())
        })
        .await?;
        times.map_ms = elapsed_ms(started);
        Ok((bytes_read, times))
    }

    /// The job's app: resolved once per worker, so an app's state (the
    /// lab's `jobcount` numbers its calls) spans the worker's tasks.
    fn app(&self, header: &JobHeader) -> Result<Arc<dyn MapReduceApp>, AttemptError> {
        let mut resolved = self.resolved.lock().expect("apps lock");
        if let Some(app) = resolved.get(&header.app) {
            return Ok(app.clone());
        }
        let app = (self.apps)(&header.app)
            .ok_or_else(|| AttemptError::Failed(format!("unknown application {:?}", header.app)))?;
        resolved.insert(header.app.clone(), app.clone());
        Ok(app)
    }

    /// Gets one run: from our own directory, or from its holder. A holder
    /// that does not answer may be restarting (a new process under the
    /// same node id keeps its directory): the reducer asks the coordinator
    /// where that node is now and tries again, [`FETCH_TRIES`] times in
    /// all, [`FETCH_RETRY_MS`] apart, before it reports the runs lost.
    async fn fetch(&self, source: RunSource, id: RunId) -> Result<Run, AttemptError> {
        let mut reach = source.reach;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.fetch_from(reach, id).await {
                Ok(run) => return Ok(run),
                Err(FetchError::Missing(reason)) => {
                    return Err(AttemptError::Fetch(source.holder, reason))
                }
                Err(FetchError::Unreachable(reason)) if tries >= FETCH_TRIES => {
                    return Err(AttemptError::Fetch(source.holder, reason))
                }
                Err(FetchError::Unreachable(reason)) => {
                    tracing::debug!(holder = %reach.node, %reason, "holder unreachable; asking where it is now");
                    tokio::time::sleep(Duration::from_millis(FETCH_RETRY_MS)).await;
                    let locate = MrRequest::Locate { node: reach.node };
                    if let Ok(MrResponse::Located(Some(now))) = self.ask(locate).await {
                        reach = now;
                    }
                }
            }
        }
    }

    async fn fetch_from(&self, reach: WorkerHello, id: RunId) -> Result<Run, FetchError> {
        let local = self.options.dir.join(id.file_name());
        if reach.node == self.options.hello.node {
            // Ours, or our predecessor's in the same directory.
            return read_run_blocking(local, false)
                .await
                .map_err(FetchError::Missing);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").insert(id, tx);
        self.node.learn(&reach);
        let request = MrRequest::SendRun {
            hello: self.options.hello,
            run: id,
        };
        let deadline = Duration::from_millis(FETCH_DEADLINE_MS);
        let fetched = async {
            match self
                .node
                .call_with_deadline(reach.node, request, deadline)
                .await
            {
                Ok(MrResponse::RunSent) => {}
                Ok(MrResponse::RunMissing) => {
                    return Err(FetchError::Missing("the holder no longer has it".into()))
                }
                Ok(other) => {
                    return Err(FetchError::Unreachable(format!(
                        "the holder answered {other:?}"
                    )))
                }
                Err(e) => {
                    return Err(FetchError::Unreachable(format!(
                        "the holder is unreachable: {e}"
                    )))
                }
            }
            let path = tokio::time::timeout(deadline, rx)
                .await
                .map_err(|_| FetchError::Unreachable("the file did not arrive".into()))?
                .map_err(|_| FetchError::Unreachable("the worker is stopping".into()))?;
            read_run_blocking(path, true)
                .await
                .map_err(FetchError::Missing)
        }
        .await;
        self.waiters.lock().expect("waiters lock").remove(&id);
        fetched
    }

    async fn reduce(
        &self,
        header: &JobHeader,
        partition: u32,
        sources: &[RunSource],
    ) -> Result<PhaseTimes, AttemptError> {
        let app = self.app(header)?;
        let mut times = PhaseTimes::default();
        let started = Instant::now();
        // One fetcher per holder, holders in parallel: a holder's runs come
        // one after another over its one connection, and the first that
        // cannot be had ends that holder's fetcher (and the attempt)
        // without dialing a dead holder once per run.
        let mut by_holder: BTreeMap<u64, Vec<(usize, RunSource)>> = BTreeMap::new();
        for (index, source) in sources.iter().enumerate() {
            by_holder
                .entry(source.reach.node.0)
                .or_default()
                .push((index, *source));
        }
        let mut runs: Vec<Option<Run>> = vec![None; sources.len()];
        let holders: Vec<Vec<(usize, RunSource)>> = by_holder.into_values().collect();
        for group in holders.chunks(FETCHES_INFLIGHT_MAX) {
            let fetchers = group.iter().map(|list| async move {
                let mut got = Vec::with_capacity(list.len());
                for (index, source) in list {
                    let id = RunId {
                        job: header.job,
                        task: source.task,
                        attempt: source.attempt,
                        partition,
                    };
                    got.push((*index, self.fetch(*source, id).await?));
                }
                Ok::<_, AttemptError>(got)
            });
            for fetched in join_all(fetchers).await {
                for (index, run) in fetched? {
                    runs[index] = Some(run);
                }
            }
        }
        let runs: Vec<Run> = runs.into_iter().map(|r| r.unwrap_or_default()).collect();
        times.shuffle_ms = elapsed_ms(started);
        let started = Instant::now();
        let reducer = app.clone();
        let output = blocking(move || Ok(reduce_task(reducer.as_ref(), runs))).await?;
        times.reduce_ms = elapsed_ms(started);
        let started = Instant::now();
        self.write_output(header, partition, output).await?;
        times.write_ms = elapsed_ms(started);
        Ok(times)
    }

    async fn write_output(
        &self,
        header: &JobHeader,
        partition: u32,
        output: Run,
    ) -> Result<(), AttemptError> {
        if header.write_files {
            let path = self.options.out_dir.join(format!("mr-out-{partition}"));
            let mut text = Vec::new();
            for (key, value) in &output {
                text.extend_from_slice(key);
                text.push(b' ');
                text.extend_from_slice(value);
                text.push(b'\n');
            }
            blocking(move || {
                write_atomically(&path, &text).map_err(|e| format!("{}: {e}", path.display()))
            })
            .await?;
        }
        let output = Arc::new(output);
        let mut puts = JoinSet::new();
        let writers = OUTPUT_PUTS_INFLIGHT_MAX.min(output.len().max(1));
        for writer in 0..writers {
            let db = (self.clients)();
            let output = output.clone();
            let prefix = header.output_prefix.clone();
            puts.spawn(async move {
                for (key, value) in output.iter().skip(writer).step_by(writers) {
                    let mut full = prefix.clone();
                    full.extend_from_slice(key);
                    db.put(full, value.clone()).await?;
                }
                Ok::<(), ClientError>(())
            });
        }
        while let Some(done) = puts.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(AttemptError::Failed(format!("writing the output: {e}"))),
                Err(e) => return Err(AttemptError::Failed(format!("output writer: {e}"))),
            }
        }
        Ok(())
    }
}

/// Reads (and checks) a run file on the blocking pool, then removes it if
/// `remove` (a fetched copy).
async fn read_run_blocking(path: PathBuf, remove: bool) -> Result<Run, String> {
    tokio::task::spawn_blocking(move || {
        let run = read_run(&path).map_err(|e| e.to_string());
        if remove {
            let _ = std::fs::remove_file(&path);
        }
        run
    })
    .await
    .map_err(|e| e.to_string())?
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Runs `work` on the blocking pool; a panic (an app's) becomes an error.
async fn blocking<R: Send + 'static>(
    work: impl FnOnce() -> Result<R, String> + Send + 'static,
) -> Result<R, AttemptError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(AttemptError::Failed(e)),
        Err(e) if e.is_panic() => Err(AttemptError::Failed(format!(
            "the application panicked: {}",
            panic_message(e.into_panic())
        ))),
        Err(e) => Err(AttemptError::Failed(e.to_string())),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Polls every future to completion, concurrently, keeping their order.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("polled to completion"))
        .collect()
}

fn remove_runs(dir: &Path, jobs: &[u64]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefixes: Vec<String> = jobs.iter().map(|job| format!("mr-{job:016x}-")).collect();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Runs a job inside this process: `workers` workers and a coordinator on
/// an in-memory network, reading and writing through clients made by
/// `clients` (an embedded [`Db`](../../../shoal/struct.Db.html)'s, or a
/// cluster's). Returns the final progress.
pub async fn run_in_process<C: RpcCaller<KvProtocol>>(
    clients: ClientFactory<C>,
    options: &JobOptions,
    apps: AppResolver,
    workers: u32,
    dir: &Path,
    progress: watch::Sender<JobProgress>,
) -> Result<JobProgress, MrError> {
    use shoal_net::mem::{MemConfig, MemNetwork};
    let db = clients();
    plan_job(&db, options, &apps).await?;
    let mut net_config = MemConfig::with_seed(rand::random());
    net_config.files_dir = dir.join("net-files");
    let net = MemNetwork::<MrProtocol>::new(net_config);
    let coordinator_id = NodeId(1);
    let (coordinator_node, coordinator_inbox) = net.add_node(coordinator_id);
    let mut tasks = JoinSet::new();
    for w in 0..workers.max(1) {
        let id = NodeId(2 + u64::from(w));
        let (node, inbox) = net.add_node(id);
        let options = WorkerOptions {
            hello: WorkerHello {
                node: id,
                incarnation: rand::random::<u32>().max(1),
                addr: None,
            },
            coordinator: coordinator_id,
            dir: dir.join(format!("worker-{}", id.0)),
            out_dir: dir.to_path_buf(),
            coordinator_silence_ms: COORDINATOR_SILENCE_MS_MAX,
        };
        tasks.spawn(work(node, inbox, clients.clone(), apps.clone(), options));
    }
    let outcome = coordinate(
        coordinator_node,
        coordinator_inbox,
        db,
        &options.name,
        progress,
    )
    .await;
    while let Some(worker) = tasks.join_next().await {
        if let Ok(Err(e)) = worker {
            tracing::warn!(error = %e, "in-process worker stopped on an error");
        }
    }
    outcome
}
