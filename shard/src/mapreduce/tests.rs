//! Goal: the task table keeps the lab's promises — each map task counted
//! once and nothing re-issued under 10 s (job count), a lease expires at
//! exactly `task_lease_ms`, a backup never starts before `backup_after_ms`,
//! a lost worker's map outputs run again before reduces go on, `is_done`
//! only once every reduce finished (early exit) — and random interleavings
//! of requests, finishes, failures, losses and time keep its invariants and
//! always end once a healthy worker keeps working (proptest).

use proptest::prelude::*;
use proptest::test_runner::RngSeed;

use super::*;

const SECOND_MS: u64 = 1_000;

fn splits(count: u32) -> Vec<MapSplit> {
    (0..count)
        .map(|shard| MapSplit {
            shard,
            range: KeyRange::new("", ""),
        })
        .collect()
}

fn table(maps: u32, reduces: u32, config: JobConfig) -> JobTable {
    JobTable::new(splits(maps), reduces, config).unwrap()
}

/// The (task, attempt) of a map assignment, or a panic naming what came.
fn expect_map(assignment: Assignment) -> (u32, u32) {
    match assignment {
        Assignment::Map { task, attempt, .. } => (task, attempt),
        other => panic!("expected a map task, got {other:?}"),
    }
}

/// The (partition, attempt, map output workers) of a reduce assignment.
fn expect_reduce(assignment: Assignment) -> (u32, u32, Vec<WorkerId>) {
    match assignment {
        Assignment::Reduce {
            partition,
            attempt,
            map_outputs,
        } => (
            partition,
            attempt,
            map_outputs.iter().map(|m| m.worker).collect(),
        ),
        other => panic!("expected a reduce task, got {other:?}"),
    }
}

fn location(worker: WorkerId) -> Vec<u8> {
    format!("w{}", worker.0).into_bytes()
}

/// Workers that take `map_ms(task)` per map and 500 ms per reduce, asking
/// every 100 ms when idle, run `table` to the end; returns the time taken.
/// After every step, `is_done` implies every reduce finished and no worker
/// still holds a reduce (the lab's early-exit snapshot).
fn run_workers(table: &mut JobTable, workers: u64, map_ms: impl Fn(u32) -> u64) -> u64 {
    let mut busy: Vec<Option<(u64, Assignment)>> = vec![None; workers as usize];
    let mut now_ms = 0;
    while !table.is_done() {
        assert!(now_ms < 3_600 * SECOND_MS, "the job never ended");
        for (index, slot) in busy.iter_mut().enumerate() {
            let worker = WorkerId(index as u64);
            match slot.take() {
                Some((until_ms, assignment)) if until_ms <= now_ms => match assignment {
                    Assignment::Map { task, attempt, .. } => {
                        table
                            .map_finished(worker, task, attempt, location(worker))
                            .unwrap();
                    }
                    Assignment::Reduce {
                        partition, attempt, ..
                    } => {
                        table.reduce_finished(worker, partition, attempt).unwrap();
                    }
                    other => panic!("held {other:?}"),
                },
                Some(held) => *slot = Some(held),
                None => match table.request_task(worker, now_ms).unwrap() {
                    assignment @ Assignment::Map { task, .. } => {
                        *slot = Some((now_ms + map_ms(task), assignment));
                    }
                    assignment @ Assignment::Reduce { .. } => {
                        *slot = Some((now_ms + 500, assignment));
                    }
                    Assignment::Wait | Assignment::Done => {}
                },
            }
            if table.is_done() {
                let reduces = table.reduce_count();
                assert!((0..reduces)
                    .all(|p| table.task_state(TaskRef::Reduce(p)) == TaskState::Finished));
            }
        }
        now_ms += 100;
    }
    now_ms
}

/// The lab's job-count test: map tasks of 2 to 5 s (under the 10 s lease)
/// with more tasks than workers. Each map task is handed out exactly once
/// and counted once; so is each reduce.
#[test]
fn job_count_each_task_runs_once_when_slow_under_lease() {
    let mut table = table(8, 10, JobConfig::default());
    run_workers(&mut table, 2, |task| 2_000 + u64::from(task) * 3_000 / 7);
    for task in 0..8 {
        let attempts = table.attempts(TaskRef::Map(task));
        assert_eq!(attempts.len(), 1, "map {task}: {attempts:?}");
        assert_eq!(attempts[0].status, AttemptStatus::Won);
    }
    for partition in 0..10 {
        assert_eq!(table.attempts(TaskRef::Reduce(partition)).len(), 1);
    }
    assert_eq!(table.late_finishes(), 0);
    assert_eq!(
        table.request_task(WorkerId(0), u64::MAX),
        Ok(Assignment::Done)
    );
}

/// A lease expires at exactly `task_lease_ms`: one millisecond earlier the
/// task is still held; at the lease the next worker gets attempt 1. The
/// expired attempt may still finish and win; the new one then finishes late.
#[test]
fn lease_expiry_reissues_after_exactly_task_lease_ms() {
    let lease_ms = TASK_LEASE_MS_DEFAULT;
    let mut table = table(1, 1, JobConfig::default());
    let (slow, fast) = (WorkerId(1), WorkerId(2));
    assert_eq!(expect_map(table.request_task(slow, 100).unwrap()), (0, 0));
    assert_eq!(
        table.request_task(fast, 100 + lease_ms - 1),
        Ok(Assignment::Wait)
    );
    assert_eq!(table.task_state(TaskRef::Map(0)), TaskState::Running);
    assert_eq!(
        expect_map(table.request_task(fast, 100 + lease_ms).unwrap()),
        (0, 1)
    );
    assert_eq!(
        table.attempts(TaskRef::Map(0))[0].status,
        AttemptStatus::Expired
    );
    // The slow worker was alive after all: its output is as good.
    assert_eq!(
        table.map_finished(slow, 0, 0, location(slow)),
        Ok(Finish::Accepted)
    );
    assert_eq!(table.map_output(0).unwrap().worker, slow);
    assert_eq!(
        table.map_finished(fast, 0, 1, location(fast)),
        Ok(Finish::AlreadyFinished)
    );
    assert_eq!(
        table.map_output(0).unwrap().worker,
        slow,
        "the winner stays"
    );
    assert_eq!(table.late_finishes(), 1);
}

/// With a lease longer than the backup delay, an idle worker gets a backup
/// of the longest-running task at exactly `backup_after_ms`, never before,
/// and never of its own attempt; the first finish wins.
#[test]
fn backup_never_starts_before_backup_after_ms() {
    let config = JobConfig {
        task_lease_ms: 60 * SECOND_MS,
        ..JobConfig::default()
    };
    let backup_ms = config.backup_after_ms;
    let mut table = table(2, 1, config);
    let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
    assert_eq!(expect_map(table.request_task(a, 0).unwrap()), (0, 0));
    assert_eq!(expect_map(table.request_task(b, 500).unwrap()), (1, 0));
    assert_eq!(table.request_task(c, backup_ms - 1), Ok(Assignment::Wait));
    assert_eq!(
        table.request_task(a, backup_ms),
        Ok(Assignment::Wait),
        "own attempt"
    );
    // Task 0 has run longest (since 0); task 1 only since 500.
    assert_eq!(
        expect_map(table.request_task(c, backup_ms).unwrap()),
        (0, 1)
    );
    assert_eq!(
        table.attempts(TaskRef::Map(0))[0].status,
        AttemptStatus::Running
    );
    // One backup per task: the next idle worker gets task 1's, once due.
    assert_eq!(
        table.request_task(WorkerId(4), backup_ms + 499),
        Ok(Assignment::Wait)
    );
    assert_eq!(
        expect_map(table.request_task(WorkerId(4), backup_ms + 500).unwrap()),
        (1, 1)
    );
    assert_eq!(
        table.map_finished(c, 0, 1, location(c)),
        Ok(Finish::Accepted)
    );
    assert_eq!(
        table.map_finished(a, 0, 0, location(a)),
        Ok(Finish::AlreadyFinished)
    );
    assert_eq!(table.map_output(0).unwrap().worker, c);
}

/// The backup floor is the lab's 10 s; other bad configs are refused too.
#[test]
fn config_refuses_early_backups_and_bad_bounds() {
    let bad = [
        (
            JobConfig {
                backup_after_ms: BACKUP_AFTER_MS_MIN - 1,
                ..JobConfig::default()
            },
            ConfigError::BackupTooEarly {
                backup_after_ms: BACKUP_AFTER_MS_MIN - 1,
            },
        ),
        (
            JobConfig {
                task_lease_ms: 0,
                ..JobConfig::default()
            },
            ConfigError::LeaseZero,
        ),
        (
            JobConfig {
                attempts_max: 0,
                ..JobConfig::default()
            },
            ConfigError::AttemptsMax { attempts_max: 0 },
        ),
        (
            JobConfig {
                attempts_max: TASK_ATTEMPTS_MAX + 1,
                ..JobConfig::default()
            },
            ConfigError::AttemptsMax {
                attempts_max: TASK_ATTEMPTS_MAX + 1,
            },
        ),
    ];
    for (config, error) in bad {
        assert_eq!(config.validate(), Err(error.clone()));
        assert_eq!(
            JobTable::new(splits(1), 1, config),
            Err(PlanError::Config(error))
        );
    }
    assert_eq!(
        JobTable::new(splits(0), 1, JobConfig::default()),
        Err(PlanError::NoMapTasks)
    );
    assert_eq!(
        JobTable::new(splits(1), 0, JobConfig::default()),
        Err(PlanError::ReduceCountZero)
    );
    assert!(matches!(
        JobTable::new(splits(MAP_TASKS_MAX as u32 + 1), 1, JobConfig::default()),
        Err(PlanError::TooManyMapTasks { .. })
    ));
}

/// The paper's rule: a worker lost after its maps finished takes their
/// outputs with it. During the reduce phase those maps run again first;
/// unstarted reduces wait for them and then read the new locations; a
/// reduce already running may still finish.
#[test]
fn worker_lost_after_maps_reruns_them_and_reduces_wait() {
    let mut table = table(2, 2, JobConfig::default());
    let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
    let (task, attempt) = expect_map(table.request_task(a, 0).unwrap());
    table.map_finished(a, task, attempt, location(a)).unwrap();
    let (task, attempt) = expect_map(table.request_task(b, 0).unwrap());
    table.map_finished(b, task, attempt, location(b)).unwrap();
    let (partition, reduce_attempt, readers) = expect_reduce(table.request_task(b, 1).unwrap());
    assert_eq!((partition, readers), (0, vec![a, b]));

    let loss = table.worker_lost(a);
    assert_eq!(
        loss,
        WorkerLoss {
            attempts_abandoned: 0,
            map_outputs_lost: 1
        }
    );
    assert_eq!(table.task_state(TaskRef::Map(0)), TaskState::Idle);
    assert_eq!(
        table.attempts(TaskRef::Map(0))[0].status,
        AttemptStatus::OutputLost
    );
    assert_eq!(table.map_output(0), None);
    // The map runs again before any other reduce is handed out.
    assert_eq!(expect_map(table.request_task(c, 2).unwrap()), (0, 1));
    assert_eq!(
        table.request_task(WorkerId(4), 3),
        Ok(Assignment::Wait),
        "reduces wait"
    );
    // A's late report of its lost output is ignored.
    assert_eq!(
        table.map_finished(a, 0, 0, location(a)),
        Ok(Finish::Ignored)
    );
    assert_eq!(
        table.map_finished(c, 0, 1, location(c)),
        Ok(Finish::Accepted)
    );
    let (partition, _, readers) = expect_reduce(table.request_task(c, 4).unwrap());
    assert_eq!((partition, readers), (1, vec![c, b]));
    // The reduce that was running all along may finish (its output is final).
    assert_eq!(
        table.reduce_finished(b, 0, reduce_attempt),
        Ok(Finish::Accepted)
    );
    assert!(!table.is_done());
    assert_eq!(table.reduce_finished(c, 1, 0), Ok(Finish::Accepted));
    assert!(table.is_done());
}

/// A restarted worker process keeps its predecessor's disk: its running
/// attempt is abandoned and handed out again at once, its map output
/// stays (and is read from there), until a reducer finds it gone.
#[test]
fn worker_restarted_keeps_map_outputs() {
    let mut table = table(2, 1, JobConfig::default());
    let (a, b) = (WorkerId(1), WorkerId(2));
    let (task, attempt) = expect_map(table.request_task(a, 0).unwrap());
    table.map_finished(a, task, attempt, location(a)).unwrap();
    let (running, _) = expect_map(table.request_task(a, 1).unwrap());
    let loss = table.worker_restarted(a);
    assert_eq!(
        loss,
        WorkerLoss {
            attempts_abandoned: 1,
            map_outputs_lost: 0
        }
    );
    assert_eq!(table.task_state(TaskRef::Map(task)), TaskState::Finished);
    assert_eq!(table.map_output(task).map(|o| o.worker), Some(a));
    // The abandoned map goes to another worker without waiting for a lease.
    assert_eq!(expect_map(table.request_task(b, 2).unwrap()), (running, 1));
    table.map_finished(b, running, 1, location(b)).unwrap();
    let (_, _, readers) = expect_reduce(table.request_task(b, 3).unwrap());
    assert_eq!(readers, vec![a, b]);
    // Then the reducer finds A's output gone after all.
    assert_eq!(table.worker_lost(a).map_outputs_lost, 1);
    assert_eq!(table.task_state(TaskRef::Map(task)), TaskState::Idle);
}

/// Attempts lost with their worker are not charged: a task whose workers
/// keep dying is handed out past `attempts_max`, up to the stored bound,
/// while failures are charged.
#[test]
fn lost_attempts_are_not_charged() {
    let config = JobConfig {
        attempts_max: 2,
        ..JobConfig::default()
    };
    let mut table = table(1, 1, config);
    for n in 0..config.attempts_stored_max() as u64 {
        let worker = WorkerId(n);
        let (task, _) = expect_map(table.request_task(worker, n).unwrap());
        assert_eq!(task, 0);
        table.worker_lost(worker);
    }
    assert_eq!(
        table.failure(),
        Some(&JobFailure::AttemptsExhausted {
            task: TaskRef::Map(0),
            attempts: 2
        }),
        "the stored bound ends it"
    );
    let mut table = self::table(1, 1, config);
    let (_, attempt) = expect_map(table.request_task(WorkerId(1), 0).unwrap());
    table.worker_lost(WorkerId(1));
    let (_, second) = expect_map(table.request_task(WorkerId(2), 1).unwrap());
    assert_eq!((attempt, second), (0, 1));
    table
        .attempt_failed(WorkerId(2), TaskRef::Map(0), 1)
        .unwrap();
    let (_, third) = expect_map(table.request_task(WorkerId(3), 2).unwrap());
    table
        .attempt_failed(WorkerId(3), TaskRef::Map(0), third)
        .unwrap();
    assert!(table.failure().is_some(), "two charged failures end it");
}

/// Once every reduce has finished, nothing reads map outputs: losing their
/// worker changes nothing and the job stays done.
#[test]
fn worker_lost_after_every_reduce_keeps_the_job_done() {
    let mut table = table(1, 1, JobConfig::default());
    let a = WorkerId(1);
    let (task, attempt) = expect_map(table.request_task(a, 0).unwrap());
    table.map_finished(a, task, attempt, location(a)).unwrap();
    let (partition, attempt, _) = expect_reduce(table.request_task(a, 0).unwrap());
    table.reduce_finished(a, partition, attempt).unwrap();
    assert!(table.is_done());
    assert_eq!(table.worker_lost(a), WorkerLoss::default());
    assert!(table.is_done());
    assert_eq!(table.task_state(TaskRef::Map(0)), TaskState::Finished);
    assert_eq!(table.request_task(WorkerId(2), 1), Ok(Assignment::Done));
}

/// A lost worker's running attempts are handed out again at once (no need
/// to wait for the lease), and its later reports are ignored.
#[test]
fn worker_lost_reissues_its_running_tasks() {
    let mut table = table(1, 1, JobConfig::default());
    let (a, b) = (WorkerId(1), WorkerId(2));
    expect_map(table.request_task(a, 0).unwrap());
    assert_eq!(table.request_task(b, 1), Ok(Assignment::Wait));
    assert_eq!(
        table.worker_lost(a),
        WorkerLoss {
            attempts_abandoned: 1,
            map_outputs_lost: 0
        }
    );
    assert_eq!(expect_map(table.request_task(b, 2).unwrap()), (0, 1));
    assert_eq!(
        table.map_finished(a, 0, 0, location(a)),
        Ok(Finish::Ignored)
    );
    assert_eq!(table.task_state(TaskRef::Map(0)), TaskState::Running);
}

/// The lab's early-exit test: `is_done` (and `Done` to workers) never comes
/// before every reduce has finished, even with one slow reduce left.
#[test]
fn is_done_never_before_every_reduce_finished() {
    let mut table = table(3, 3, JobConfig::default());
    let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
    let mut now_ms = 0;
    for worker in workers {
        let (task, attempt) = expect_map(table.request_task(worker, now_ms).unwrap());
        table
            .map_finished(worker, task, attempt, location(worker))
            .unwrap();
    }
    let held: Vec<(WorkerId, u32, u32)> = workers
        .iter()
        .map(|&worker| {
            let (partition, attempt, _) =
                expect_reduce(table.request_task(worker, now_ms).unwrap());
            (worker, partition, attempt)
        })
        .collect();
    for &(worker, partition, attempt) in &held[..2] {
        table.reduce_finished(worker, partition, attempt).unwrap();
        assert!(!table.is_done());
        assert_eq!(table.request_task(worker, now_ms), Ok(Assignment::Wait));
    }
    // The slow reducer ("sherlock") takes 3 s; the others keep asking.
    now_ms += 3 * SECOND_MS;
    assert_eq!(
        table.request_task(WorkerId(1), now_ms),
        Ok(Assignment::Wait)
    );
    assert!(!table.is_done());
    let (worker, partition, attempt) = held[2];
    table.reduce_finished(worker, partition, attempt).unwrap();
    assert!(table.is_done());
    assert_eq!(
        table.request_task(WorkerId(1), now_ms),
        Ok(Assignment::Done)
    );
}

/// Reports naming what does not exist or belongs to someone else are
/// refused and change nothing.
#[test]
fn bad_reports_are_refused() {
    let mut table = table(1, 1, JobConfig::default());
    let (a, b) = (WorkerId(1), WorkerId(2));
    expect_map(table.request_task(a, 0).unwrap());
    let before = table.clone();
    assert_eq!(
        table.map_finished(a, 1, 0, location(a)),
        Err(ReportError::UnknownTask {
            task: TaskRef::Map(1)
        })
    );
    assert_eq!(
        table.map_finished(a, 0, 1, location(a)),
        Err(ReportError::UnknownAttempt {
            task: TaskRef::Map(0),
            attempt: 1
        })
    );
    assert_eq!(
        table.map_finished(b, 0, 0, location(b)),
        Err(ReportError::WrongWorker {
            task: TaskRef::Map(0),
            attempt: 0,
            worker: b,
            holder: a
        })
    );
    assert_eq!(
        table.map_finished(a, 0, 0, vec![0; MAP_OUTPUT_LOCATION_BYTES_MAX + 1]),
        Err(ReportError::LocationTooLong {
            bytes: MAP_OUTPUT_LOCATION_BYTES_MAX + 1
        })
    );
    assert_eq!(
        table.reduce_finished(a, 0, 0),
        Err(ReportError::UnknownAttempt {
            task: TaskRef::Reduce(0),
            attempt: 0
        })
    );
    assert_eq!(table, before);
}

/// A task that needs an attempt beyond `attempts_max` fails the job, naming
/// it; the failure sticks.
#[test]
fn exhausted_attempts_fail_the_job_naming_the_task() {
    let config = JobConfig {
        attempts_max: 2,
        ..JobConfig::default()
    };
    let mut table = table(1, 1, config);
    let a = WorkerId(1);
    for attempt in 0..2 {
        assert_eq!(expect_map(table.request_task(a, 0).unwrap()), (0, attempt));
        table.attempt_failed(a, TaskRef::Map(0), attempt).unwrap();
    }
    let failure = JobFailure::AttemptsExhausted {
        task: TaskRef::Map(0),
        attempts: 2,
    };
    assert_eq!(table.failure(), Some(&failure));
    assert_eq!(table.request_task(a, 1), Err(failure.clone()));
    assert_eq!(
        table.map_finished(a, 0, 1, location(a)),
        Err(ReportError::JobFailed(failure))
    );
    assert_eq!(
        failure_message(&table),
        "map task 0 failed: 2 attempts, none finished"
    );
}

fn failure_message(table: &JobTable) -> String {
    table.failure().map(ToString::to_string).unwrap_or_default()
}

/// A coordinator that loads the table restarts the clock: running attempts
/// get a full lease from the resume, measured on the new clock.
#[test]
fn resume_gives_running_attempts_a_fresh_lease() {
    let mut table = table(1, 1, JobConfig::default());
    expect_map(table.request_task(WorkerId(1), 50_000).unwrap());
    let bytes = postcard::to_stdvec(&table).unwrap();
    let mut loaded: JobTable = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(loaded, table);
    loaded.resume(7); // the new coordinator's clock starts low
    let lease_ms = TASK_LEASE_MS_DEFAULT;
    assert_eq!(
        loaded.request_task(WorkerId(2), 7 + lease_ms - 1),
        Ok(Assignment::Wait)
    );
    assert_eq!(
        expect_map(loaded.request_task(WorkerId(2), 7 + lease_ms).unwrap()),
        (0, 1)
    );
}

// ---- Random interleavings ----

/// Replays with `PROPTEST_RNG_SEED=<seed>`; a failure prints the seed (and
/// proptest prints the shrunk operations).
pub(super) fn seeded_config(cases: u32) -> ProptestConfig {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("mapreduce proptest: replay with PROPTEST_RNG_SEED={seed}");
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // The seed replays a failure; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One step of a random run; `worker` and `pick` are reduced modulo what
/// exists.
#[derive(Debug, Clone)]
enum Op {
    /// Time passes, then `worker` asks for work.
    Request { worker: u64, advance_ms: u64 },
    /// `worker` finishes one of the attempts it holds.
    Finish { worker: u64, pick: usize },
    /// `worker` reports one of its attempts failed.
    Fail { worker: u64, pick: usize },
    /// `worker` is declared lost (it forgets what it held).
    Lose { worker: u64 },
    /// `worker` reports a finish of an arbitrary, probably stale, attempt.
    Stale {
        worker: u64,
        map: bool,
        task: u32,
        attempt: u32,
    },
}

const WORKERS: u64 = 4;

fn op_strategy() -> impl Strategy<Value = Op> {
    let worker = 0..WORKERS;
    let advance = prop_oneof![3 => 0u64..2_000, 1 => 0u64..15_000];
    prop_oneof![
        6 => (worker.clone(), advance).prop_map(|(worker, advance_ms)| Op::Request { worker, advance_ms }),
        5 => (worker.clone(), any::<usize>()).prop_map(|(worker, pick)| Op::Finish { worker, pick }),
        1 => (worker.clone(), any::<usize>()).prop_map(|(worker, pick)| Op::Fail { worker, pick }),
        1 => worker.clone().prop_map(|worker| Op::Lose { worker }),
        1 => (worker, any::<bool>(), 0u32..4, 0u32..4)
            .prop_map(|(worker, map, task, attempt)| Op::Stale { worker, map, task, attempt }),
    ]
}

/// Every task's state, to compare across a step.
fn states(table: &JobTable) -> Vec<(TaskRef, TaskState)> {
    let maps = (0..table.map_count()).map(TaskRef::Map);
    let reduces = (0..table.reduce_count()).map(TaskRef::Reduce);
    maps.chain(reduces)
        .map(|task| (task, table.task_state(task)))
        .collect()
}

/// The invariants that hold after every step.
fn check_invariants(table: &JobTable, now_ms: u64) {
    let config = table.config();
    for (task, state) in states(table) {
        let attempts = table.attempts(task);
        assert!(
            attempts.len() <= config.attempts_stored_max(),
            "{task}: {attempts:?}"
        );
        let charged = attempts.iter().filter(|a| a.status.is_charged()).count();
        assert!(
            charged <= config.attempts_max as usize,
            "{task}: {attempts:?}"
        );
        let running = attempts
            .iter()
            .filter(|a| a.status == AttemptStatus::Running);
        assert!(running.clone().count() <= 2, "{task}: {attempts:?}");
        assert!(
            running.clone().all(|a| a.started_ms <= now_ms),
            "{task} started in the future: {attempts:?}"
        );
        let won: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.status == AttemptStatus::Won)
            .collect();
        // Each task counted once: exactly one winner iff finished.
        assert_eq!(
            won.len(),
            usize::from(state == TaskState::Finished),
            "{task}: {attempts:?}"
        );
        if let TaskRef::Map(index) = task {
            let output = table.map_output(index);
            assert_eq!(output.is_some(), state == TaskState::Finished, "{task}");
            if let (Some(output), Some(winner)) = (output, won.first()) {
                assert_eq!(
                    output.worker, winner.worker,
                    "{task}: output not the winner's"
                );
                assert_eq!(output.location, location(winner.worker));
            }
        }
    }
    let reduces_finished = (0..table.reduce_count())
        .all(|p| table.task_state(TaskRef::Reduce(p)) == TaskState::Finished);
    assert_eq!(table.is_done(), reduces_finished);
    if table.is_done() {
        assert!(table.failure().is_none(), "done and failed");
    }
}

/// Runs `ops` on a job of `maps` × `reduces` with `config`, checking after
/// every step; then a healthy worker keeps working until the job ends.
fn run_interleaving(maps: u32, reduces: u32, config: JobConfig, ops: &[Op]) {
    let mut table = table(maps, reduces, config);
    let mut held: Vec<Vec<(TaskRef, u32)>> = vec![Vec::new(); WORKERS as usize];
    let mut now_ms = 0;
    for op in ops {
        let before = states(&table);
        let mut lost_outputs = Vec::new();
        match *op {
            Op::Request { worker, advance_ms } => {
                now_ms += advance_ms;
                let maps_finished_before =
                    (0..maps).all(|m| table.task_state(TaskRef::Map(m)) == TaskState::Finished);
                match table.request_task(WorkerId(worker), now_ms) {
                    Ok(Assignment::Map {
                        task,
                        attempt,
                        split,
                    }) => {
                        assert_eq!(Some(&split), table.split(task));
                        check_hand_out(&table, TaskRef::Map(task), attempt, now_ms);
                        held[worker as usize].push((TaskRef::Map(task), attempt));
                    }
                    Ok(Assignment::Reduce {
                        partition,
                        attempt,
                        map_outputs,
                    }) => {
                        // The reduce phase never starts before every map finished.
                        assert!(
                            maps_finished_before,
                            "reduce handed out during the map phase"
                        );
                        assert_eq!(map_outputs.len(), maps as usize);
                        check_hand_out(&table, TaskRef::Reduce(partition), attempt, now_ms);
                        held[worker as usize].push((TaskRef::Reduce(partition), attempt));
                    }
                    Ok(Assignment::Done) => assert!(table.is_done()),
                    Ok(Assignment::Wait) | Err(_) => {}
                }
                // Leases were applied: nothing running is past its lease.
                for (task, _) in states(&table) {
                    assert!(table
                        .attempts(task)
                        .iter()
                        .all(|a| a.status != AttemptStatus::Running
                            || now_ms - a.started_ms < config.task_lease_ms));
                }
            }
            Op::Finish { worker, pick } | Op::Fail { worker, pick } => {
                let mine = &mut held[worker as usize];
                if !mine.is_empty() {
                    let (task, attempt) = mine.remove(pick % mine.len());
                    let id = WorkerId(worker);
                    let result = match (op, task) {
                        (Op::Fail { .. }, _) => table
                            .attempt_failed(id, task, attempt)
                            .map(|()| Finish::Ignored),
                        (_, TaskRef::Map(index)) => {
                            table.map_finished(id, index, attempt, location(id))
                        }
                        (_, TaskRef::Reduce(partition)) => {
                            table.reduce_finished(id, partition, attempt)
                        }
                    };
                    assert!(
                        matches!(result, Ok(_) | Err(ReportError::JobFailed(_))),
                        "a held attempt's report was refused: {result:?}"
                    );
                }
            }
            Op::Lose { worker } => {
                held[worker as usize].clear();
                lost_outputs = (0..maps)
                    .filter(|&m| {
                        table
                            .map_output(m)
                            .is_some_and(|o| o.worker == WorkerId(worker))
                    })
                    .map(TaskRef::Map)
                    .collect();
                table.worker_lost(WorkerId(worker));
            }
            Op::Stale {
                worker,
                map,
                task,
                attempt,
            } => {
                let id = WorkerId(worker);
                let _ = if map {
                    table.map_finished(id, task, attempt, location(id))
                } else {
                    table.reduce_finished(id, task, attempt)
                };
            }
        }
        check_invariants(&table, now_ms);
        // A finished task never goes back, except a map whose output's
        // worker was just lost.
        for ((task, was), (_, is)) in before.iter().zip(states(&table)) {
            if *was == TaskState::Finished && is != TaskState::Finished {
                assert!(lost_outputs.contains(task), "{task} un-finished by {op:?}");
            }
        }
    }

    // Liveness: a healthy worker that keeps working ends the job, unless a
    // task ran out of attempts (then the failure names it truly).
    let healthy = WorkerId(WORKERS + 1);
    for _ in 0..10_000 {
        match table.request_task(healthy, now_ms) {
            Ok(Assignment::Map { task, attempt, .. }) => {
                table
                    .map_finished(healthy, task, attempt, location(healthy))
                    .unwrap();
            }
            Ok(Assignment::Reduce {
                partition, attempt, ..
            }) => {
                table.reduce_finished(healthy, partition, attempt).unwrap();
            }
            Ok(Assignment::Wait) => now_ms += config.task_lease_ms,
            Ok(Assignment::Done) => break,
            Err(JobFailure::AttemptsExhausted { task, attempts }) => {
                assert_eq!(attempts, config.attempts_max);
                let all = table.attempts(task);
                let charged = all.iter().filter(|a| a.status.is_charged()).count();
                assert!(
                    charged == attempts as usize || all.len() == config.attempts_stored_max(),
                    "{task} exhausted with {charged} charged of {} stored: {all:?}",
                    all.len()
                );
                assert_ne!(table.task_state(task), TaskState::Finished);
                return;
            }
        }
        check_invariants(&table, now_ms);
    }
    assert!(
        table.is_done(),
        "a healthy worker could not finish the job: {table:?}"
    );
    let bytes = postcard::to_stdvec(&table).unwrap();
    assert_eq!(postcard::from_bytes::<JobTable>(&bytes).unwrap(), table);
}

/// A fresh attempt was just handed out: it is the task's last; if another
/// attempt runs, this is a backup, due and with no idle task left.
fn check_hand_out(table: &JobTable, task: TaskRef, attempt: u32, now_ms: u64) {
    let attempts = table.attempts(task);
    assert_eq!(attempts.len(), attempt as usize + 1);
    assert_eq!(attempts[attempt as usize].started_ms, now_ms);
    let others: Vec<&Attempt> = attempts[..attempt as usize]
        .iter()
        .filter(|a| a.status == AttemptStatus::Running)
        .collect();
    if let Some(original) = others.first() {
        assert_eq!(others.len(), 1);
        assert!(
            now_ms - original.started_ms >= table.config().backup_after_ms,
            "{task}: backup at {now_ms} of an attempt started at {}",
            original.started_ms
        );
        assert_ne!(original.worker, attempts[attempt as usize].worker);
    }
}

proptest! {
    #![proptest_config(seeded_config(256))]

    /// Goal: any interleaving of requests, finishes, failures, losses, stale
    /// reports and time keeps the invariants, and then completes.
    #[test]
    fn random_interleavings_keep_invariants_and_complete(
        maps in 1u32..=4,
        reduces in 1u32..=3,
        lease_ms in prop_oneof![Just(TASK_LEASE_MS_DEFAULT), Just(30_000u64)],
        attempts_max in prop_oneof![Just(3u32), Just(TASK_ATTEMPTS_MAX)],
        ops in proptest::collection::vec(op_strategy(), 1..80),
    ) {
        let config = JobConfig { task_lease_ms: lease_ms, attempts_max, ..JobConfig::default() };
        run_interleaving(maps, reduces, config, &ops);
    }
}
