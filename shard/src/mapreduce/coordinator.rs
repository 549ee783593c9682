//! The coordinator's task table, [`JobTable`]: a pure state machine driven
//! by explicit time (`now_ms` is passed in; nothing here reads a clock).
//! It owns which task runs where, attempts, leases, backups, where each map
//! output lives, and when the job is done or has failed. The runtime around
//! it does the I/O: it stores the table in the database (so a job survives
//! a coordinator crash), answers workers, and tells it which workers are
//! gone.
//!
//! # Rules
//! - **Phases.** A reduce task is handed out only while every map task is
//!   finished. A map re-run because its output was lost (see
//!   [`JobTable::worker_lost`]) holds back unstarted reduces until it
//!   finishes again; reduces already running may finish.
//! - **Leases.** An attempt not finished [`JobConfig::task_lease_ms`] after
//!   it was handed out has *expired*: its worker is presumed dead for that
//!   task, which goes back to idle and is handed out again. Expiry is
//!   applied by [`JobTable::request_task`], with the time it is given.
//! - **Backups.** When a worker asks and its phase has no idle task, it gets
//!   a second attempt of the longest-running task that has run at least
//!   [`JobConfig::backup_after_ms`] (never less than the lab's 10 s,
//!   [`BACKUP_AFTER_MS_MIN`]), has one attempt running, on another worker.
//! - **Attempts.** Every hand-out of a task is a new attempt, numbered from
//!   0 in the order they were handed out. `map` and `reduce` are
//!   deterministic, so *any* finished attempt of a task is valid output; the
//!   first finish of an attempt that is running or expired wins, and the
//!   task is counted once. A finish after the task was won is recorded
//!   ([`JobTable::late_finishes`]) and ignored; a finish of an attempt whose
//!   worker was declared lost, or that reported failure, is ignored (its
//!   output is gone or partial). So a stale attempt can win only a task
//!   nothing has won, and never replaces a winner.
//! - **Lost workers.** [`JobTable::worker_lost`] abandons the worker's
//!   running attempts and, unless every reduce has finished, loses the map
//!   outputs it holds (they live on the worker, as in the MapReduce paper):
//!   those map tasks run again. Reduce outputs live in the database and are
//!   never lost. Lease expiry alone does not declare a worker lost: a slow
//!   task is no proof its disk is gone; a reducer that cannot fetch a map
//!   output reports it, and the runtime then calls `worker_lost`.
//! - **Done.** [`JobTable::is_done`] holds only once every reduce partition
//!   has finished, which the runtime reports only after the partition's
//!   output is durable and atomically visible (the lab's write to a
//!   temporary file and rename).
//! - **Failure.** A task that needs another attempt when it already had
//!   [`JobConfig::attempts_max`] charged attempts fails the job
//!   ([`JobFailure::AttemptsExhausted`], naming the task). Attempts that
//!   ended because their worker was lost (`WorkerLost`, `OutputLost`) are
//!   not charged (a crash storm is no fault of the task), but they are
//!   stored, at most [`JobConfig::attempts_stored_max`] in all.
//!
//! # Persistence
//! [`JobTable`] is serde-serializable; its encoded size is at most
//! [`table_bytes_max`]. The runtime stores it after every call that changed
//! it and before answering the worker (an answer about a state that a
//! crash could lose would hand out an attempt number twice; the table
//! rejects the stale holder's report as [`ReportError::WrongWorker`], but
//! the work is wasted). After loading it, a new coordinator calls
//! [`JobTable::resume`] with its own clock.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::plan::{check_reduce_count, MapSplit, PlanError, MAP_TASKS_MAX};

/// Default [`JobConfig::task_lease_ms`]: 10 s, after which the lab presumes
/// a worker dead.
pub const TASK_LEASE_MS_DEFAULT: u64 = 10_000;

/// Least [`JobConfig::backup_after_ms`]: 10 s, the lab's "backup tasks may
/// only start after roughly 10 s" (its job-count test has map tasks of 2 to
/// 5 s that must each run exactly once).
pub const BACKUP_AFTER_MS_MIN: u64 = 10_000;

/// Default [`JobConfig::attempts_max`]: 16. The lab's crash test kills a
/// third of all calls and stalls a third for up to 10 s, so an attempt
/// fails about half the time; 16 in a row is 1 in 65,536 per task.
pub const ATTEMPTS_DEFAULT: u32 = 16;

/// [`JobConfig::attempts_stored_max`] over `attempts_max`: a task may see
/// three times as many attempts lost with their workers as it may fail.
pub const ATTEMPTS_STORED_FACTOR: usize = 4;

/// Largest [`JobConfig::attempts_max`]: 32. Attempts are kept in the table,
/// so this bounds its size.
pub const TASK_ATTEMPTS_MAX: u32 = 32;

/// Longest map output location (a worker address, a path): 256 bytes.
pub const MAP_OUTPUT_LOCATION_BYTES_MAX: usize = 256;

/// A worker, as named by the runtime. A restarted worker process should
/// take a new id: the table cannot tell it from the old one otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {}", self.0)
    }
}

/// The coordinator's timing and retry policy, checked by
/// [`JobConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobConfig {
    /// An attempt not finished this long after it was handed out expires
    /// and its task is handed out again. Default [`TASK_LEASE_MS_DEFAULT`].
    pub task_lease_ms: u64,
    /// A task running this long may get a backup attempt near the end of
    /// its phase; at least [`BACKUP_AFTER_MS_MIN`]. With the defaults (both
    /// 10 s) a lease expires when a backup would start, so backups matter
    /// when the lease is longer (jobs with long tasks).
    pub backup_after_ms: u64,
    /// Most attempts of one task, `1..=TASK_ATTEMPTS_MAX`. Default
    /// [`ATTEMPTS_DEFAULT`].
    pub attempts_max: u32,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            task_lease_ms: TASK_LEASE_MS_DEFAULT,
            backup_after_ms: BACKUP_AFTER_MS_MIN,
            attempts_max: ATTEMPTS_DEFAULT,
        }
    }
}

impl JobConfig {
    /// Most attempts of one task kept in the table, charged or not:
    /// `ATTEMPTS_STORED_FACTOR × attempts_max`. Attempts lost with their
    /// worker are not charged, but they are stored, and this bounds them.
    pub fn attempts_stored_max(&self) -> usize {
        ATTEMPTS_STORED_FACTOR * self.attempts_max as usize
    }

    /// Checks every field against its bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.task_lease_ms == 0 {
            return Err(ConfigError::LeaseZero);
        }
        if self.backup_after_ms < BACKUP_AFTER_MS_MIN {
            return Err(ConfigError::BackupTooEarly {
                backup_after_ms: self.backup_after_ms,
            });
        }
        if !(1..=TASK_ATTEMPTS_MAX).contains(&self.attempts_max) {
            return Err(ConfigError::AttemptsMax {
                attempts_max: self.attempts_max,
            });
        }
        Ok(())
    }
}

/// Why a [`JobConfig`] is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `task_lease_ms` is 0: every attempt would expire at once.
    #[error("task_lease_ms must be at least 1")]
    LeaseZero,
    /// `backup_after_ms` is below the lab's floor.
    #[error("backup_after_ms is {backup_after_ms}: at least {BACKUP_AFTER_MS_MIN}")]
    BackupTooEarly {
        /// The value found.
        backup_after_ms: u64,
    },
    /// `attempts_max` is 0 or above [`TASK_ATTEMPTS_MAX`].
    #[error("attempts_max is {attempts_max}: must be 1..={TASK_ATTEMPTS_MAX}")]
    AttemptsMax {
        /// The value found.
        attempts_max: u32,
    },
}

/// A task of a job: map task `n` (an index into the job's splits) or the
/// reduce task of partition `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskRef {
    /// Map task `n`.
    Map(u32),
    /// The reduce task of partition `n`.
    Reduce(u32),
}

impl fmt::Display for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskRef::Map(task) => write!(f, "map task {task}"),
            TaskRef::Reduce(partition) => write!(f, "reduce task {partition}"),
        }
    }
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Not finished and no attempt running: the next to hand out.
    Idle,
    /// Not finished; one or two attempts running.
    Running,
    /// An attempt won; its output is the task's.
    Finished,
}

/// What became of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptStatus {
    /// Handed out, not yet finished, lease not expired.
    Running,
    /// Finished first: its output is the task's.
    Won,
    /// Finished after another attempt had won; output ignored.
    FinishedLate,
    /// Its lease ran out before it finished; it may still finish and win.
    Expired,
    /// Its worker reported that it failed.
    Failed,
    /// Its worker was declared lost while it ran.
    WorkerLost,
    /// It won a map task, then its worker (holding the output) was lost.
    OutputLost,
    /// A reduce attempt that could not fetch a map output (its holder was
    /// lost): ended, and no fault of the task.
    InputLost,
}

impl AttemptStatus {
    /// Whether an attempt that ended so counts against the task's attempt
    /// limit: all but those whose worker or input was lost (`WorkerLost`,
    /// `OutputLost`, `InputLost`), which were no fault of the task (as
    /// Hadoop counts failed attempts, not killed ones).
    pub fn is_charged(self) -> bool {
        !matches!(
            self,
            AttemptStatus::WorkerLost | AttemptStatus::OutputLost | AttemptStatus::InputLost
        )
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The worker it was handed to.
    pub worker: WorkerId,
    /// When it was handed out (or the table resumed), in the coordinator's
    /// milliseconds.
    pub started_ms: u64,
    /// What became of it.
    pub status: AttemptStatus,
}

/// Where the output of a finished map task lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapOutput {
    /// The map task.
    pub task: u32,
    /// The worker that produced and holds it.
    pub worker: WorkerId,
    /// Where on that worker, as the worker reported it (opaque here; at
    /// most [`MAP_OUTPUT_LOCATION_BYTES_MAX`] bytes).
    pub location: Vec<u8>,
}

/// The answer to a worker asking for work ([`JobTable::request_task`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Assignment {
    /// Run map task `task` over `split`, as attempt `attempt`; report it with
    /// [`JobTable::map_finished`].
    Map {
        /// The map task.
        task: u32,
        /// The attempt number to report.
        attempt: u32,
        /// Its input.
        split: MapSplit,
    },
    /// Reduce partition `partition`, reading it from every map output, as
    /// attempt `attempt`; report it with [`JobTable::reduce_finished`].
    Reduce {
        /// The partition.
        partition: u32,
        /// The attempt number to report.
        attempt: u32,
        /// Where each map task's output lives, by task.
        map_outputs: Vec<MapOutput>,
    },
    /// Nothing to do now: ask again later.
    Wait,
    /// The job is done: the worker may exit.
    Done,
}

/// What the table made of a finish report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finish {
    /// This attempt won the task.
    Accepted,
    /// The task had already been won (by this attempt or another); nothing
    /// changed. Harmless: outputs are deterministic.
    AlreadyFinished,
    /// The attempt had failed or its worker was declared lost: its output
    /// is not used.
    Ignored,
}

/// What [`JobTable::worker_lost`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerLoss {
    /// Running attempts of the worker abandoned.
    pub attempts_abandoned: u32,
    /// Finished map tasks whose output was on the worker, now to run again.
    pub map_outputs_lost: u32,
}

/// Why a job failed; once failed, it stays failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum JobFailure {
    /// `task` needed another attempt after `attempts` of them.
    #[error("{task} failed: {attempts} attempts, none finished")]
    AttemptsExhausted {
        /// The task.
        task: TaskRef,
        /// Its attempts (the configured maximum).
        attempts: u32,
    },
}

/// Why a worker's report was refused (it changed nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The job has no such task.
    #[error("no {task} in this job")]
    UnknownTask {
        /// The task named.
        task: TaskRef,
    },
    /// The task has no such attempt (it was never handed out, or handed out
    /// by a coordinator whose table a crash lost).
    #[error("{task} has no attempt {attempt}")]
    UnknownAttempt {
        /// The task.
        task: TaskRef,
        /// The attempt named.
        attempt: u32,
    },
    /// The attempt was handed to another worker.
    #[error("{task} attempt {attempt} belongs to {holder}, not {worker}")]
    WrongWorker {
        /// The task.
        task: TaskRef,
        /// The attempt.
        attempt: u32,
        /// The reporting worker.
        worker: WorkerId,
        /// The worker it was handed to.
        holder: WorkerId,
    },
    /// The map output location is longer than
    /// [`MAP_OUTPUT_LOCATION_BYTES_MAX`].
    #[error("map output location of {bytes} bytes: at most {MAP_OUTPUT_LOCATION_BYTES_MAX}")]
    LocationTooLong {
        /// Its length.
        bytes: usize,
    },
    /// The job has failed.
    #[error(transparent)]
    JobFailed(JobFailure),
}

/// The attempts of one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Task {
    /// Every attempt, indexed by attempt number; at most `attempts_max`.
    attempts: Vec<Attempt>,
    /// The attempt that won, if any (its status is `Won`).
    winner: Option<u32>,
}

impl Task {
    fn new() -> Self {
        Self {
            attempts: Vec::new(),
            winner: None,
        }
    }

    /// Attempts charged to the task ([`AttemptStatus::is_charged`]).
    fn charged(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.status.is_charged())
            .count()
    }

    /// Whether another attempt may be handed out under `config`.
    fn may_attempt(&self, config: &JobConfig) -> bool {
        self.charged() < config.attempts_max as usize
            && self.attempts.len() < config.attempts_stored_max()
    }

    fn running(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts
            .iter()
            .filter(|attempt| attempt.status == AttemptStatus::Running)
    }

    fn state(&self) -> TaskState {
        if self.winner.is_some() {
            TaskState::Finished
        } else if self.running().next().is_some() {
            TaskState::Running
        } else {
            TaskState::Idle
        }
    }
}

/// The task table of one job (see the module docs for its rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTable {
    config: JobConfig,
    /// Map task `n`'s input is `splits[n]`.
    splits: Vec<MapSplit>,
    maps: Vec<Task>,
    /// Where map task `n`'s output lives, while it is finished.
    map_outputs: Vec<Option<MapOutput>>,
    reduces: Vec<Task>,
    /// The latest time seen; time never goes back (until [`Self::resume`]).
    now_ms: u64,
    failure: Option<JobFailure>,
    late_finishes: u64,
}

/// An upper bound on the postcard encoding of a [`JobTable`] of `map_tasks`
/// map tasks, `reduce_count` partitions, `attempts_max` stored attempts
/// per task (pass [`JobConfig::attempts_stored_max`]), whose split keys are
/// at most `split_key_bytes_max` bytes: `128 + maps × (64 + 2·keys +
/// 24·attempts + 256) + reduces × (16 + 24·attempts)`. With 64 stored
/// attempts (the default config), 256 map tasks and 64 partitions of
/// 64-byte keys: about 0.5 MB, well within one value of Shoal's default
/// 4 MiB limit; at the extreme limits ([`MAP_TASKS_MAX`], 512 partitions)
/// it exceeds it, and the runtime's store then refuses the record with a
/// clear error.
pub fn table_bytes_max(
    map_tasks: usize,
    reduce_count: u32,
    attempts_max: u32,
    split_key_bytes_max: usize,
) -> u64 {
    let attempts = u64::from(attempts_max);
    let per_map =
        64 + 2 * split_key_bytes_max as u64 + 24 * attempts + MAP_OUTPUT_LOCATION_BYTES_MAX as u64;
    let per_reduce = 16 + 24 * attempts;
    128 + map_tasks as u64 * per_map + u64::from(reduce_count) * per_reduce
}

impl JobTable {
    /// A job of map tasks over `splits` (task `n` reads `splits[n]`) and
    /// `reduce_count` partitions, starting at time 0 (call
    /// [`Self::resume`] to start at another time).
    pub fn new(
        splits: Vec<MapSplit>,
        reduce_count: u32,
        config: JobConfig,
    ) -> Result<Self, PlanError> {
        config.validate()?;
        check_reduce_count(reduce_count)?;
        if splits.is_empty() {
            return Err(PlanError::NoMapTasks);
        }
        if splits.len() > MAP_TASKS_MAX {
            return Err(PlanError::TooManyMapTasks {
                count: splits.len() as u64,
            });
        }
        Ok(Self {
            config,
            maps: splits.iter().map(|_| Task::new()).collect(),
            map_outputs: vec![None; splits.len()],
            splits,
            reduces: (0..reduce_count).map(|_| Task::new()).collect(),
            now_ms: 0,
            failure: None,
            late_finishes: 0,
        })
    }

    /// The table's time: the latest `now_ms` it was given.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Restarts the clock after the table was loaded by a coordinator whose
    /// clock differs from the one that stored it: the time becomes `now_ms`,
    /// and every running attempt is treated as handed out now, so it gets a
    /// full lease (a worker that outlived the old coordinator may still
    /// finish; a dead one is presumed so one lease later) and no backup
    /// starts earlier than the rule allows.
    pub fn resume(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        for task in self.maps.iter_mut().chain(self.reduces.iter_mut()) {
            for attempt in &mut task.attempts {
                if attempt.status == AttemptStatus::Running {
                    attempt.started_ms = now_ms;
                }
            }
        }
    }

    /// Hands `worker` its next task at time `now_ms`, after expiring every
    /// attempt whose lease has run out. In order: `Done` if every reduce
    /// has finished; else, while some map task is unfinished, an idle map
    /// task (lowest number first), a backup map attempt, or `Wait`; else an
    /// idle reduce task, a backup reduce attempt, or `Wait`.
    ///
    /// Errors: the job has failed (see [`JobFailure`]).
    ///
    /// # Panics
    /// If `now_ms` is before a time given earlier (clocks must be monotonic;
    /// a new coordinator calls [`Self::resume`] first).
    pub fn request_task(
        &mut self,
        worker: WorkerId,
        now_ms: u64,
    ) -> Result<Assignment, JobFailure> {
        assert!(
            now_ms >= self.now_ms,
            "request_task from {worker}: time went back from {} to {now_ms} ms",
            self.now_ms
        );
        self.now_ms = now_ms;
        self.expire_leases();
        self.check_exhausted();
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if self.is_done() {
            return Ok(Assignment::Done);
        }
        let maps_finished = self.maps.iter().all(|task| task.winner.is_some());
        let tasks = if maps_finished {
            &self.reduces
        } else {
            &self.maps
        };
        let Some(index) = self
            .pick_idle(tasks)
            .or_else(|| self.pick_backup(tasks, worker))
        else {
            return Ok(Assignment::Wait);
        };
        let task = if maps_finished {
            &mut self.reduces[index]
        } else {
            &mut self.maps[index]
        };
        assert!(
            task.winner.is_none() && task.running().count() <= 1 && task.may_attempt(&self.config),
            "handing out a task that is finished, has two attempts running, or none left: {task:?}"
        );
        task.attempts.push(Attempt {
            worker,
            started_ms: now_ms,
            status: AttemptStatus::Running,
        });
        let attempt = u32::try_from(task.attempts.len() - 1).unwrap_or(u32::MAX);
        let number = u32::try_from(index).unwrap_or(u32::MAX);
        Ok(if maps_finished {
            Assignment::Reduce {
                partition: number,
                attempt,
                map_outputs: self.map_outputs.iter().flatten().cloned().collect(),
            }
        } else {
            Assignment::Map {
                task: number,
                attempt,
                split: self.splits[index].clone(),
            }
        })
    }

    /// The first idle task among `tasks`.
    fn pick_idle(&self, tasks: &[Task]) -> Option<usize> {
        tasks
            .iter()
            .position(|task| task.state() == TaskState::Idle)
    }

    /// The longest-running task among `tasks` that may get a backup attempt
    /// on `worker`: unfinished, one attempt running (on another worker) for
    /// at least `backup_after_ms`, attempts left.
    fn pick_backup(&self, tasks: &[Task], worker: WorkerId) -> Option<usize> {
        tasks
            .iter()
            .enumerate()
            .filter(|(_, task)| task.winner.is_none() && task.may_attempt(&self.config))
            .filter_map(|(index, task)| {
                let mut running = task.running();
                match (running.next(), running.next()) {
                    (Some(only), None) => Some((index, only)),
                    _ => None,
                }
            })
            .filter(|(_, attempt)| {
                attempt.worker != worker
                    && self.now_ms - attempt.started_ms >= self.config.backup_after_ms
            })
            .min_by_key(|(index, attempt)| (attempt.started_ms, *index))
            .map(|(index, _)| index)
    }

    /// Expires every running attempt handed out `task_lease_ms` or more ago.
    fn expire_leases(&mut self) {
        let (now_ms, lease_ms) = (self.now_ms, self.config.task_lease_ms);
        for task in self.maps.iter_mut().chain(self.reduces.iter_mut()) {
            for attempt in &mut task.attempts {
                if attempt.status == AttemptStatus::Running
                    && now_ms - attempt.started_ms >= lease_ms
                {
                    attempt.status = AttemptStatus::Expired;
                }
            }
        }
    }

    /// Fails the job if an idle task has no attempts left (and the job is
    /// not done: then nothing needs it).
    fn check_exhausted(&mut self) {
        if self.failure.is_some() || self.is_done() {
            return;
        }
        let config = self.config;
        let exhausted = |task: &Task| task.state() == TaskState::Idle && !task.may_attempt(&config);
        let map = self.maps.iter().position(exhausted).map(Self::map_ref);
        let reduce = self
            .reduces
            .iter()
            .position(exhausted)
            .map(Self::reduce_ref);
        if let Some(task) = map.or(reduce) {
            self.failure = Some(JobFailure::AttemptsExhausted {
                task,
                attempts: self.config.attempts_max,
            });
        }
    }

    fn map_ref(index: usize) -> TaskRef {
        TaskRef::Map(u32::try_from(index).unwrap_or(u32::MAX))
    }

    fn reduce_ref(index: usize) -> TaskRef {
        TaskRef::Reduce(u32::try_from(index).unwrap_or(u32::MAX))
    }

    /// The task `task` names and attempt `attempt` of it, checked to be
    /// `worker`'s.
    fn attempt_of(
        &mut self,
        worker: WorkerId,
        task: TaskRef,
        attempt: u32,
    ) -> Result<(&mut Task, usize), ReportError> {
        if let Some(failure) = &self.failure {
            return Err(ReportError::JobFailed(failure.clone()));
        }
        let entry = match task {
            TaskRef::Map(index) => self.maps.get_mut(index as usize),
            TaskRef::Reduce(index) => self.reduces.get_mut(index as usize),
        }
        .ok_or(ReportError::UnknownTask { task })?;
        let record = entry
            .attempts
            .get(attempt as usize)
            .ok_or(ReportError::UnknownAttempt { task, attempt })?;
        if record.worker != worker {
            return Err(ReportError::WrongWorker {
                task,
                attempt,
                worker,
                holder: record.worker,
            });
        }
        Ok((entry, attempt as usize))
    }

    /// Records a finish of `attempt` of `task` (see the module docs for
    /// which finishes win).
    fn finish(
        &mut self,
        worker: WorkerId,
        task: TaskRef,
        attempt: u32,
    ) -> Result<Finish, ReportError> {
        let (entry, index) = self.attempt_of(worker, task, attempt)?;
        let outcome = match entry.attempts[index].status {
            AttemptStatus::Won | AttemptStatus::FinishedLate => Finish::AlreadyFinished,
            AttemptStatus::Failed
            | AttemptStatus::WorkerLost
            | AttemptStatus::OutputLost
            | AttemptStatus::InputLost => Finish::Ignored,
            AttemptStatus::Running | AttemptStatus::Expired if entry.winner.is_some() => {
                entry.attempts[index].status = AttemptStatus::FinishedLate;
                self.late_finishes += 1;
                Finish::AlreadyFinished
            }
            AttemptStatus::Running | AttemptStatus::Expired => {
                entry.attempts[index].status = AttemptStatus::Won;
                entry.winner = Some(attempt);
                Finish::Accepted
            }
        };
        Ok(outcome)
    }

    /// `worker` finished `attempt` of map task `task`, its output at
    /// `location` on the worker.
    ///
    /// Errors (nothing changed): the job failed, no such task or attempt,
    /// the attempt is another worker's, `location` too long.
    pub fn map_finished(
        &mut self,
        worker: WorkerId,
        task: u32,
        attempt: u32,
        location: Vec<u8>,
    ) -> Result<Finish, ReportError> {
        if location.len() > MAP_OUTPUT_LOCATION_BYTES_MAX {
            return Err(ReportError::LocationTooLong {
                bytes: location.len(),
            });
        }
        let outcome = self.finish(worker, TaskRef::Map(task), attempt)?;
        if outcome == Finish::Accepted {
            self.map_outputs[task as usize] = Some(MapOutput {
                task,
                worker,
                location,
            });
        }
        Ok(outcome)
    }

    /// `worker` finished `attempt` of the reduce task of `partition`. Call
    /// only once the partition's output is durable and atomically visible:
    /// the job may be reported done on return. Another attempt may have
    /// written the same output too (a backup, or a re-run after its worker
    /// was declared lost), so that write must replace, not append.
    ///
    /// Errors (nothing changed): the job failed, no such partition or
    /// attempt, the attempt is another worker's.
    pub fn reduce_finished(
        &mut self,
        worker: WorkerId,
        partition: u32,
        attempt: u32,
    ) -> Result<Finish, ReportError> {
        self.finish(worker, TaskRef::Reduce(partition), attempt)
    }

    /// `worker` reports that `attempt` of `task` failed (the app panicked, a
    /// map output could not be fetched, ...). A running or expired attempt
    /// becomes failed, and its task is handed out again if nothing else
    /// runs it; any other attempt is left as it is.
    ///
    /// Errors (nothing changed): as for [`Self::map_finished`].
    pub fn attempt_failed(
        &mut self,
        worker: WorkerId,
        task: TaskRef,
        attempt: u32,
    ) -> Result<(), ReportError> {
        self.end_attempt(worker, task, attempt, AttemptStatus::Failed)
    }

    /// `worker`'s reduce `attempt` of `task` could not fetch a map output
    /// (report the holder with [`Self::worker_lost`]): it ends, uncharged,
    /// so the partition is handed out again once the map has run again.
    ///
    /// Errors (nothing changed): as for [`Self::map_finished`].
    pub fn attempt_input_lost(
        &mut self,
        worker: WorkerId,
        task: TaskRef,
        attempt: u32,
    ) -> Result<(), ReportError> {
        self.end_attempt(worker, task, attempt, AttemptStatus::InputLost)
    }

    /// Ends a running or expired `attempt` of `task` as `status`; leaves
    /// any other attempt as it is.
    fn end_attempt(
        &mut self,
        worker: WorkerId,
        task: TaskRef,
        attempt: u32,
        status: AttemptStatus,
    ) -> Result<(), ReportError> {
        let (entry, index) = self.attempt_of(worker, task, attempt)?;
        let record = &mut entry.attempts[index];
        if matches!(
            record.status,
            AttemptStatus::Running | AttemptStatus::Expired
        ) {
            record.status = status;
        }
        self.check_exhausted();
        Ok(())
    }

    /// `worker` is gone (its process or machine died, or reducers cannot
    /// fetch from it). Its running attempts are abandoned, and its finished
    /// map outputs are lost, so those map tasks run again, unless every
    /// reduce has finished (nothing will read them). Reduce outputs are in
    /// the database and stay.
    pub fn worker_lost(&mut self, worker: WorkerId) -> WorkerLoss {
        let mut loss = self.abandon_running(worker);
        if !self.is_done() {
            for (task, output) in self.maps.iter_mut().zip(&mut self.map_outputs) {
                if output
                    .as_ref()
                    .is_some_and(|output| output.worker == worker)
                {
                    let winner = task.winner.take().expect("a map output without a winner");
                    let winner = winner as usize;
                    task.attempts[winner].status = AttemptStatus::OutputLost;
                    *output = None;
                    loss.map_outputs_lost += 1;
                }
            }
        }
        self.check_exhausted();
        loss
    }

    /// `worker`'s process stopped but its map outputs may live on (a
    /// restarted worker process that keeps its predecessor's disk): its
    /// running attempts are abandoned and its finished map outputs stay.
    /// If they turn out to be gone (a reducer cannot fetch them), call
    /// [`Self::worker_lost`] then.
    pub fn worker_restarted(&mut self, worker: WorkerId) -> WorkerLoss {
        let loss = self.abandon_running(worker);
        self.check_exhausted();
        loss
    }

    fn abandon_running(&mut self, worker: WorkerId) -> WorkerLoss {
        let mut loss = WorkerLoss::default();
        for task in self.maps.iter_mut().chain(self.reduces.iter_mut()) {
            for attempt in &mut task.attempts {
                if attempt.worker == worker && attempt.status == AttemptStatus::Running {
                    attempt.status = AttemptStatus::WorkerLost;
                    loss.attempts_abandoned += 1;
                }
            }
        }
        loss
    }

    /// Whether every reduce partition has finished: the job's output is
    /// final. Never true before; once true, stays true.
    pub fn is_done(&self) -> bool {
        self.reduces.iter().all(|task| task.winner.is_some())
    }

    /// Why the job failed, if it did.
    pub fn failure(&self) -> Option<&JobFailure> {
        self.failure.as_ref()
    }

    /// Where `task` stands.
    ///
    /// # Panics
    /// If the job has no such task.
    pub fn task_state(&self, task: TaskRef) -> TaskState {
        self.task(task).state()
    }

    /// Every attempt of `task`, by attempt number.
    ///
    /// # Panics
    /// If the job has no such task.
    pub fn attempts(&self, task: TaskRef) -> &[Attempt] {
        &self.task(task).attempts
    }

    fn task(&self, task: TaskRef) -> &Task {
        match task {
            TaskRef::Map(index) => self.maps.get(index as usize),
            TaskRef::Reduce(index) => self.reduces.get(index as usize),
        }
        .unwrap_or_else(|| panic!("no {task} in a job of {} maps", self.maps.len()))
    }

    /// Where map task `task`'s output lives, while it is finished.
    pub fn map_output(&self, task: u32) -> Option<&MapOutput> {
        self.map_outputs.get(task as usize)?.as_ref()
    }

    /// The input of map task `task`.
    pub fn split(&self, task: u32) -> Option<&MapSplit> {
        self.splits.get(task as usize)
    }

    /// Number of map tasks.
    pub fn map_count(&self) -> u32 {
        u32::try_from(self.maps.len()).unwrap_or(u32::MAX)
    }

    /// Number of reduce partitions.
    pub fn reduce_count(&self) -> u32 {
        u32::try_from(self.reduces.len()).unwrap_or(u32::MAX)
    }

    /// Finishes that arrived after their task had been won (harmless).
    pub fn late_finishes(&self) -> u64 {
        self.late_finishes
    }

    /// The configuration.
    pub fn config(&self) -> &JobConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    //! Goal: the table's encoded size stays within [`table_bytes_max`] at
    //! its worst (every attempt used, the largest numbers, the longest
    //! locations and keys). Built from the private fields: driving the API
    //! there would take a long time for no more coverage.

    use super::*;
    use crate::mapreduce::{KeyRange, REDUCE_PARTITIONS_MAX};

    #[test]
    fn encoded_size_is_bounded() {
        let key_bytes = 64;
        let key = vec![0xffu8; key_bytes];
        let splits = vec![
            MapSplit {
                shard: u32::MAX,
                range: KeyRange::new(key.clone(), key.clone()),
            };
            MAP_TASKS_MAX
        ];
        let config = JobConfig {
            task_lease_ms: u64::MAX,
            backup_after_ms: u64::MAX,
            attempts_max: TASK_ATTEMPTS_MAX,
        };
        let mut table = JobTable::new(splits, REDUCE_PARTITIONS_MAX, config).unwrap();
        let full = Task {
            attempts: vec![
                Attempt {
                    worker: WorkerId(u64::MAX),
                    started_ms: u64::MAX,
                    status: AttemptStatus::OutputLost,
                };
                TASK_ATTEMPTS_MAX as usize
            ],
            winner: Some(u32::MAX),
        };
        for task in table.maps.iter_mut().chain(table.reduces.iter_mut()) {
            *task = full.clone();
        }
        for output in &mut table.map_outputs {
            *output = Some(MapOutput {
                task: u32::MAX,
                worker: WorkerId(u64::MAX),
                location: vec![0; MAP_OUTPUT_LOCATION_BYTES_MAX],
            });
        }
        table.now_ms = u64::MAX;
        table.late_finishes = u64::MAX;
        table.failure = Some(JobFailure::AttemptsExhausted {
            task: TaskRef::Reduce(u32::MAX),
            attempts: u32::MAX,
        });
        let bytes = postcard::to_stdvec(&table).unwrap().len() as u64;
        let bound = table_bytes_max(
            MAP_TASKS_MAX,
            REDUCE_PARTITIONS_MAX,
            TASK_ATTEMPTS_MAX,
            key_bytes,
        );
        assert!(bytes <= bound, "{bytes} encoded bytes > bound {bound}");
        let typical = table_bytes_max(MAP_TASKS_MAX, REDUCE_PARTITIONS_MAX, ATTEMPTS_DEFAULT, 64);
        assert!(typical < 4 * 1024 * 1024, "{typical}");
    }
}
