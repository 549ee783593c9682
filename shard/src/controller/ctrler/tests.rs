//! Goal: the controller keeps the lab's promises (5A: init, query, joins
//! and leaves move shards and their data; 5B: a change half-done by a
//! crashed controller is finished by the next one's `init_controller`; 5C:
//! one controller wins each config number, and a stale controller cannot
//! corrupt anything), against in-memory models of the store and the groups
//! ([`model`](super::model)) that panic on any unsafe step: two groups
//! serving a shard, data deleted before it was installed elsewhere,
//! installed twice, or lost.
//!
//! Randomized tests run a fixed list of seeds and print the failing one;
//! `SHOAL_CTRLER_SEED=<seed>` replays just that seed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::NodeId;
use shoal_engine::{GroupId, ShardId};
use tokio::time::Instant;

use super::model::{Fault, Groups, GroupsState, Hooks, MemStore, ModelMover, StoreState};
use super::*;
use crate::controller::{join, leave, moves, ShardConfig, SHARDS_DEFAULT};

/// A controller on the models.
type Ctrl = Controller<MemStore, ModelMover>;

const SEEDS: &[u64] = &[1, 2, 3, 5, 8, 13, 21, 34, 55, 89];

/// [`SEEDS`], or only `SHOAL_CTRLER_SEED` if set.
fn seeds() -> Vec<u64> {
    match std::env::var("SHOAL_CTRLER_SEED") {
        Ok(seed) => vec![seed.parse().expect("SHOAL_CTRLER_SEED is a u64")],
        Err(_) => SEEDS.to_vec(),
    }
}

/// Prints the test's seed (and what else it was doing) if it panics.
struct OnPanic(String);

impl Drop for OnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "failing case: {} (replay: SHOAL_CTRLER_SEED=<seed>)",
                self.0
            );
        }
    }
}

/// Short timings: steps give up after 2 s of transient errors.
fn timing() -> ControllerConfig {
    ControllerConfig {
        step_deadline: Duration::from_secs(2),
        backoff_min: Duration::from_millis(1),
        backoff_max: Duration::from_millis(100),
    }
}

/// Three members per group, derived from its id.
fn members(group: GroupId) -> Vec<NodeId> {
    vec![group * 10 + 1, group * 10 + 2, group * 10 + 3]
}

fn joined(config: &ShardConfig, groups: &[GroupId]) -> ShardConfig {
    let new: BTreeMap<GroupId, Vec<NodeId>> = groups.iter().map(|&g| (g, members(g))).collect();
    join(config, new).unwrap()
}

fn left(config: &ShardConfig, groups: &[GroupId]) -> ShardConfig {
    leave(config, groups).unwrap()
}

/// The shared store and groups, which controllers come and go over.
struct World {
    store: Arc<Mutex<StoreState>>,
    groups: Arc<Groups>,
}

impl World {
    fn new() -> Self {
        Self {
            store: Arc::default(),
            groups: Arc::default(),
        }
    }

    /// An independent copy, to try something from this state.
    fn fork(&self) -> Self {
        let store = self.store.lock().unwrap().clone();
        let groups: GroupsState = self.groups.lock().clone();
        Self {
            store: Arc::new(Mutex::new(store)),
            groups: Arc::new(Groups::new(groups)),
        }
    }

    fn controller(&self, hooks: Hooks) -> Ctrl {
        let hooks = Arc::new(hooks);
        Controller::new(
            MemStore::new(self.store.clone(), hooks.clone()),
            ModelMover::new(self.groups.clone(), hooks),
            timing(),
        )
        .unwrap()
    }

    fn put_raw(&self, key: &[u8], value: &[u8]) {
        let mut store = self.store.lock().unwrap();
        let version = store.map.get(key).map_or(0, |&(_, version)| version);
        store
            .map
            .insert(key.to_vec(), (Bytes::copy_from_slice(value), version + 1));
    }

    fn stored(&self, key: &[u8]) -> Option<ShardConfig> {
        let store = self.store.lock().unwrap();
        store
            .map
            .get(key)
            .map(|(record, _)| decode_config(record).unwrap())
    }

    /// A client writes `tag * 10_000 + shard` to every served shard.
    fn write_all(&self, tag: u64) {
        let mut groups = self.groups.lock();
        let shards: Vec<ShardId> = (0..SHARDS_DEFAULT).collect();
        for shard in shards {
            groups.write(shard, tag * 10_000 + u64::from(shard));
        }
    }

    /// `config` is published with nothing pending, the groups serve exactly
    /// what it says, and every shard holds the last value written to it.
    fn check(&self, config: &ShardConfig) {
        assert_eq!(self.stored(CURRENT_CONFIG_KEY).as_ref(), Some(config));
        assert_eq!(
            self.stored(NEXT_CONFIG_KEY).map(|next| next.num),
            Some(config.num),
            "a change is pending"
        );
        let groups = self.groups.lock();
        for shard in 0..config.shard_count() {
            let expected: Vec<GroupId> = config.group_of(shard).into_iter().collect();
            assert_eq!(
                groups.serving(shard),
                expected,
                "groups serving shard {shard}"
            );
            if let Some((group, data)) = groups.data(shard) {
                let written = groups.written(shard).unwrap_or(0);
                assert_eq!(
                    data,
                    Some(written),
                    "data of shard {shard} on group {group}"
                );
            }
        }
    }
}

/// A world with `config` (grown from the initial one by joins) posted and
/// written to.
async fn world_at(config: &ShardConfig) -> World {
    let world = World::new();
    let ctrl = world.controller(Hooks::new(0));
    assert_eq!(
        ctrl.init_config(config.clone()).await.unwrap(),
        InitOutcome::Posted
    );
    world.write_all(1);
    world.check(config);
    world
}

/// The next change of a random join/leave sequence: join one or two new
/// groups, or (with two groups or more) leave one or two.
fn random_change(
    rng: &mut ChaCha8Rng,
    config: &ShardConfig,
    next_group: &mut GroupId,
) -> ShardConfig {
    let groups: Vec<GroupId> = config.groups.keys().copied().collect();
    let count = rng.random_range(1..=2);
    if groups.len() >= 2 && rng.random_bool(0.4) {
        let leaving: Vec<GroupId> = (0..count.min(groups.len() - 1))
            .map(|_| groups[rng.random_range(0..groups.len())])
            .collect();
        left(config, &leaving)
    } else {
        let joining: Vec<GroupId> = (0..count)
            .map(|_| {
                *next_group += 1;
                *next_group - 1
            })
            .collect();
        joined(config, &joining)
    }
}

/// Goal (InitQuery5A): the first config is posted and queried as num 1,
/// every shard created on Gid1; posting it again is a no-op, posting
/// another one changes nothing.
#[tokio::test(start_paused = true)]
async fn init_then_query() {
    let world = World::new();
    let ctrl = world.controller(Hooks::new(1));
    assert!(matches!(
        ctrl.query().await,
        Err(QueryError::NotInitialized)
    ));
    assert_eq!(ctrl.init_controller().await.unwrap(), RecoverOutcome::Empty);
    let initial = ShardConfig::initial(12).unwrap();
    assert!(matches!(
        ctrl.change_config_to(joined(&initial, &[1])).await,
        Err(ChangeError::NotInitialized)
    ));

    let one = joined(&initial, &[1]);
    assert_eq!(
        ctrl.init_config(one.clone()).await.unwrap(),
        InitOutcome::Posted
    );
    let queried = ctrl.query().await.unwrap();
    assert_eq!(queried, one);
    assert_eq!((queried.num, queried.shards[0]), (1, 1));
    world.check(&one);

    assert_eq!(
        ctrl.init_config(one.clone()).await.unwrap(),
        InitOutcome::Posted
    );
    let other = joined(&initial, &[2]);
    assert_eq!(
        ctrl.init_config(other).await.unwrap(),
        InitOutcome::Exists { num: 1 }
    );
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Idle { num: 1 }
    );
    world.check(&one);

    let mut broken = one.clone();
    broken.shards[3] = 9;
    assert!(matches!(
        World::new()
            .controller(Hooks::new(1))
            .init_config(broken)
            .await,
        Err(InitError::Invalid(ConfigError::UnknownGroup {
            shard: 3,
            group: 9
        }))
    ));
}

/// Goal (JoinBasic5A, ManyJoinLeave5A): groups join one by one, then leave
/// one by one; after each change the published config is the requested
/// one, the groups serve exactly its shards, and no written value is lost.
#[tokio::test(start_paused = true)]
async fn join_leave_sequences_move_shards_and_data() {
    for shards in [1, 12, SHARDS_DEFAULT] {
        let _case = OnPanic(format!("{shards} shards"));
        let mut config = joined(&ShardConfig::initial(shards).unwrap(), &[1]);
        let world = world_at(&config).await;
        let ctrl = world.controller(Hooks::new(2).delays(2));
        let joins = (2..=8).map(|group| (true, group));
        let leaves = (1..=7).map(|group| (false, group));
        for (tag, (joining, group)) in (2..).zip(joins.chain(leaves)) {
            let next = if joining {
                joined(&config, &[group])
            } else {
                left(&config, &[group])
            };
            assert_eq!(
                ctrl.change_config_to(next.clone()).await.unwrap(),
                ChangeOutcome::Changed
            );
            assert_eq!(ctrl.query().await.unwrap(), next);
            world.check(&next);
            world.write_all(tag);
            world.check(&next);
            config = next;
        }
        assert_eq!(config.shards_of(8).len(), shards as usize);
    }
}

/// Goal (5C): controllers racing for the same config number: exactly one
/// wins; the others return without having written anything or sent a
/// single step, and their groups never serve a shard.
#[tokio::test(start_paused = true)]
async fn racing_controllers_exactly_one_wins() {
    for seed in seeds() {
        let _case = OnPanic(format!("seed {seed}"));
        let base = joined(&ShardConfig::initial(12).unwrap(), &[1, 2]);
        let world = world_at(&base).await;
        let racers: Vec<(Ctrl, ShardConfig)> = (0..4)
            .map(|i| {
                let hooks = Hooks::new(seed * 100 + i).delays(5).faults(100);
                (world.controller(hooks), joined(&base, &[10 + i]))
            })
            .collect();
        let outcomes = run_all(
            racers
                .iter()
                .map(|(ctrl, target)| ctrl.change_config_to(target.clone())),
        )
        .await;
        let winners: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, outcome)| matches!(outcome, Ok(ChangeOutcome::Changed)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "outcomes {outcomes:?}");
        let winner = winners[0];
        for (i, ((ctrl, _), outcome)) in racers.iter().zip(&outcomes).enumerate() {
            if i == winner {
                continue;
            }
            assert!(
                matches!(
                    outcome,
                    Ok(ChangeOutcome::Lost | ChangeOutcome::Superseded { num: 2 })
                ),
                "racer {i}: {outcome:?}"
            );
            let hooks = ctrl.mover().hooks();
            assert_eq!(
                (hooks.store_writes(), hooks.mover_calls()),
                (0, 0),
                "racer {i}"
            );
        }
        world.check(&racers[winner].1);
    }
}

/// Runs `futures` side by side; their outputs in order.
async fn run_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                if let std::task::Poll::Ready(value) = future.as_mut().poll(cx) {
                    *output = Some(value);
                }
            }
        }
        if outputs.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

/// Goal (5B): a controller that dies at any operation of a change (its
/// k-th store operation or step, for every k, with that operation lost
/// before or after taking effect) leaves a state from which fresh
/// controllers' `init_controller` (one that dies too, then two side by
/// side) finish the change, or find it never claimed and make it anew. At
/// every moment at most one group serves a shard (the model checks), and
/// no write is lost. Sequences of joins and leaves from each seed.
#[tokio::test(start_paused = true)]
async fn crash_at_every_step_then_recover() {
    for seed in seeds() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shards = [1, 3, 12][rng.random_range(0..3)];
        let world = World::new();
        let mut config = ShardConfig::initial(shards).unwrap();
        let mut next_group: GroupId = 1;
        for change in 0..5 {
            let target = if change == 0 {
                let first = rng.random_range(1..=2);
                let groups: Vec<GroupId> = (next_group..next_group + first).collect();
                next_group += first;
                joined(&config, &groups)
            } else {
                random_change(&mut rng, &config, &mut next_group)
            };
            for applies in [false, true] {
                for crash_at in 0.. {
                    let _case = OnPanic(format!(
                        "seed {seed}, {shards} shards, change {change} to {target:?}, \
                         crash at operation {crash_at} (applied: {applies})"
                    ));
                    let trial = world.fork();
                    let hooks = Hooks::new(seed ^ crash_at)
                        .delays(3)
                        .crash_at(crash_at, applies);
                    let doomed = trial.controller(hooks);
                    let result = if change == 0 {
                        doomed
                            .init_config(target.clone())
                            .await
                            .map(|outcome| assert_eq!(outcome, InitOutcome::Posted))
                            .map_err(|error| error.to_string())
                    } else {
                        doomed
                            .change_config_to(target.clone())
                            .await
                            .map(|outcome| assert_eq!(outcome, ChangeOutcome::Changed))
                            .map_err(|error| error.to_string())
                    };
                    if !doomed.mover().hooks().crashed() {
                        assert!(result.is_ok(), "{result:?}");
                        trial.check(&target);
                        break;
                    }
                    recover(&trial, &mut rng, &config, &target).await;
                    trial.check(&target);
                    trial.write_all(100 + crash_at);
                    trial.check(&target);
                }
            }
            let ctrl = world.controller(Hooks::new(seed).delays(3));
            if change == 0 {
                ctrl.init_config(target.clone()).await.unwrap();
            } else {
                ctrl.change_config_to(target.clone()).await.unwrap();
            }
            world.write_all(change + 2);
            world.check(&target);
            config = target;
        }
    }
}

/// After a crash during the change from `from` to `target`: one controller
/// recovers and dies at a random operation, then two recover side by side;
/// if the change was never claimed, a healthy controller makes it.
async fn recover(world: &World, rng: &mut ChaCha8Rng, from: &ShardConfig, target: &ShardConfig) {
    let crash_at = rng.random_range(0..20);
    let doomed = world.controller(
        Hooks::new(rng.random())
            .delays(3)
            .crash_at(crash_at, rng.random_bool(0.5)),
    );
    let outcome = doomed.init_controller().await;
    assert!(
        outcome.is_ok() || doomed.mover().hooks().crashed(),
        "{outcome:?}"
    );

    let (a, b) = (
        world.controller(Hooks::new(rng.random()).delays(3)),
        world.controller(Hooks::new(rng.random()).delays(3)),
    );
    let (a, b) = tokio::join!(a.init_controller(), b.init_controller());
    for outcome in [a.unwrap(), b.unwrap()] {
        let allowed = [
            RecoverOutcome::Empty,
            RecoverOutcome::Idle { num: from.num },
            RecoverOutcome::Idle { num: target.num },
            RecoverOutcome::Finished { num: target.num },
        ];
        assert!(allowed.contains(&outcome), "{outcome:?}");
    }
    let ctrl = world.controller(Hooks::new(rng.random()).delays(3));
    match world.stored(CURRENT_CONFIG_KEY) {
        None => assert_eq!(
            ctrl.init_config(target.clone()).await.unwrap(),
            InitOutcome::Posted
        ),
        Some(current) if current == *from => assert_eq!(
            ctrl.change_config_to(target.clone()).await.unwrap(),
            ChangeOutcome::Changed
        ),
        Some(current) => assert_eq!(current, *target),
    }
}

/// Goal (PartitionControllerJoin5C): a controller that stalls at any
/// operation of its change, while another finishes (or pre-empts) that
/// change and makes one more, is fenced when it wakes: it returns `Lost` or
/// `Superseded`, and neither the config nor any data written meanwhile is
/// touched.
#[tokio::test(start_paused = true)]
async fn stale_controller_is_fenced() {
    for seed in seeds() {
        let base = joined(&ShardConfig::initial(12).unwrap(), &[1, 2]);
        let world = world_at(&base).await;
        let target = joined(&base, &[3]);
        for stall_at in 0.. {
            let _case = OnPanic(format!("seed {seed}, stall at operation {stall_at}"));
            let trial = world.fork();
            let stale = Arc::new(trial.controller(Hooks::new(seed).delays(3).stall_at(stall_at)));
            let hooks = stale.mover().hooks().clone();
            let mut task = tokio::spawn({
                let stale = stale.clone();
                let target = target.clone();
                async move { stale.change_config_to(target).await }
            });
            let stalled = tokio::select! {
                () = hooks.stalled() => true,
                outcome = &mut task => {
                    assert_eq!(outcome.unwrap().unwrap(), ChangeOutcome::Changed);
                    false
                }
            };
            if !stalled {
                trial.check(&target);
                break;
            }

            let fresh = trial.controller(Hooks::new(seed + 1).delays(3));
            let recovered = fresh.init_controller().await.unwrap();
            assert!(
                matches!(
                    recovered,
                    RecoverOutcome::Idle { num: 1 } | RecoverOutcome::Finished { num: 2 }
                ),
                "{recovered:?}"
            );
            let current = fresh.query().await.unwrap();
            let newer = left(&current, &[1]);
            assert_eq!(
                fresh.change_config_to(newer.clone()).await.unwrap(),
                ChangeOutcome::Changed
            );
            trial.write_all(7);
            trial.check(&newer);

            hooks.release();
            let outcome = task.await.unwrap().unwrap();
            assert!(
                matches!(
                    outcome,
                    ChangeOutcome::Lost | ChangeOutcome::Superseded { .. }
                ),
                "{outcome:?}"
            );
            trial.check(&newer);
        }
    }
}

/// Goal (ConcurrentReliable5C, with faults): four controllers each post
/// the same first config, then loop recover + join a new group + leave
/// it, while a fifth only recovers (from before the first config exists),
/// all with random delays and transient faults, and a client keeps
/// writing. No operation fails (transient faults are retried, races are
/// outcomes, not errors), and in the end the published config is what the
/// groups serve and no accepted write is lost.
#[tokio::test(start_paused = true)]
async fn concurrent_controllers_keep_the_data() {
    for seed in seeds() {
        let _case = OnPanic(format!("seed {seed}"));
        let first = joined(&ShardConfig::initial(12).unwrap(), &[1, 2]);
        let world = World::new();
        let loops = (0..4u64).map(|i| {
            let ctrl = world.controller(Hooks::new(seed * 10 + i).delays(4).faults(50));
            let first = first.clone();
            async move {
                let posted = ctrl.init_config(first).await.unwrap();
                assert_eq!(posted, InitOutcome::Posted);
                for round in 0..4 {
                    let group = 100 + i * 10 + round;
                    ctrl.init_controller().await.unwrap();
                    let current = ctrl.query().await.unwrap();
                    ctrl.change_config_to(joined(&current, &[group]))
                        .await
                        .unwrap();
                    let current = ctrl.query().await.unwrap();
                    if current.groups.contains_key(&group) {
                        ctrl.change_config_to(left(&current, &[group]))
                            .await
                            .unwrap();
                    }
                }
            }
        });
        let recoverer = async {
            let ctrl = world.controller(Hooks::new(seed * 10 + 9).delays(4).faults(50));
            for _ in 0..100 {
                ctrl.init_controller().await.unwrap();
            }
        };
        let writer = async {
            for tag in 10..200 {
                world.write_all(tag);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        };
        tokio::join!(run_all(loops), recoverer, writer);

        let ctrl = world.controller(Hooks::new(seed));
        ctrl.init_controller().await.unwrap();
        let current = ctrl.query().await.unwrap();
        assert!(current.num > first.num, "no change was made");
        world.check(&current);
    }
}

/// Goal: a controller stops at the first `Stale` answer. It stalls before
/// the freeze, the install or the delete of the one shard config 2 moves;
/// meanwhile config 2 is finished and config 3 moves the shard back; when
/// it wakes, that step is refused and it sends no other.
#[tokio::test(start_paused = true)]
async fn a_stale_answer_stops_the_change_at_once() {
    let one = joined(&ShardConfig::initial(2).unwrap(), &[1]);
    let two = joined(&one, &[2]);
    let three = left(&two, &[2]);
    assert_eq!(moves(&one, &two).len(), 1);
    // Operations 0..=2 are the two reads and the claim.
    for (step, stall_at) in [("freeze", 3), ("install", 4), ("delete", 5)] {
        let _case = OnPanic(format!("stall before the {step}"));
        let world = world_at(&one).await;
        let stale = Arc::new(world.controller(Hooks::new(9).stall_at(stall_at)));
        let hooks = stale.mover().hooks().clone();
        let task = tokio::spawn({
            let two = two.clone();
            async move { stale.change_config_to(two).await }
        });
        hooks.stalled().await;
        let fresh = world.controller(Hooks::new(10));
        assert_eq!(
            fresh.init_controller().await.unwrap(),
            RecoverOutcome::Finished { num: 2 }
        );
        assert_eq!(
            fresh.change_config_to(three.clone()).await.unwrap(),
            ChangeOutcome::Changed
        );
        hooks.release();
        assert_eq!(
            task.await.unwrap().unwrap(),
            ChangeOutcome::Superseded { num: 3 }
        );
        assert_eq!(hooks.mover_calls(), stall_at - 2, "steps sent");
        world.check(&three);
    }
}

/// Goal (5C, the lab's concurCtrler): a controller whose change another
/// controller finished and published meanwhile stops, reporting it done,
/// although the group its remaining step addresses is gone for good (a
/// group that left is shut down once its leave is published). Here the
/// stalled controller was making group 2 leave; once released, its freeze
/// at group 2 finds nobody. It used to retry that step until its step
/// deadline and fail (shardkv test AcquireLockConcurrentUnreliable5C,
/// seed 28).
#[tokio::test(start_paused = true)]
async fn a_change_published_by_another_ends_the_retries() {
    let one = joined(&ShardConfig::initial(2).unwrap(), &[1]);
    let two = joined(&one, &[2]);
    let three = left(&two, &[2]);
    assert_eq!(moves(&two, &three).len(), 1);
    let world = world_at(&one).await;
    let ctrl = world.controller(Hooks::new(20));
    assert_eq!(
        ctrl.change_config_to(two.clone()).await.unwrap(),
        ChangeOutcome::Changed
    );
    // Operations 0..=2 are the two reads and the claim; 3 is the freeze.
    let slow = Arc::new(world.controller(Hooks::new(21).stall_at(3)));
    let hooks = slow.mover().hooks().clone();
    let task = tokio::spawn({
        let three = three.clone();
        async move { slow.change_config_to(three).await }
    });
    hooks.stalled().await;
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Finished { num: 3 }
    );
    world.groups.lock().shut_down(2);
    let released = Instant::now();
    hooks.release();
    assert_eq!(task.await.unwrap().unwrap(), ChangeOutcome::Changed);
    assert!(
        released.elapsed() < timing().step_deadline / 2,
        "stopped only after {:?}",
        released.elapsed()
    );
    world.check(&three);
}

/// Goal: every operation reads NEXT before CURRENT, so that a change
/// claimed between the two reads is never mistaken for one that started
/// from the CURRENT read. Each controller here stalls between its two
/// reads while others publish a config and claim the next one (and die).
/// Read the other way round, `init_controller` and `init_config` would
/// take the claimed change 2 for a first config and create its shards on
/// top of config 1's, and `change_config_to` would find NEXT two ahead of
/// CURRENT.
#[tokio::test(start_paused = true)]
async fn reads_take_next_before_current() {
    let initial = ShardConfig::initial(12).unwrap();
    let one = joined(&initial, &[1]);
    let two = joined(&one, &[2]);
    let three = joined(&two, &[3]);

    // init_controller, from before the first config.
    let world = World::new();
    let recoverer = Arc::new(world.controller(Hooks::new(11).stall_at(1)));
    let hooks = recoverer.mover().hooks().clone();
    let task = tokio::spawn(async move { recoverer.init_controller().await });
    hooks.stalled().await;
    let ctrl = world.controller(Hooks::new(12));
    assert_eq!(
        ctrl.init_config(one.clone()).await.unwrap(),
        InitOutcome::Posted
    );
    let doomed = world.controller(Hooks::new(13).crash_at(3, false));
    assert!(doomed.change_config_to(two.clone()).await.is_err());
    hooks.release();
    assert_eq!(
        task.await.unwrap().unwrap(),
        RecoverOutcome::Idle { num: 1 }
    );
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Finished { num: 2 }
    );
    world.check(&two);

    // init_config, from before the first config.
    let world = World::new();
    let poster = Arc::new(world.controller(Hooks::new(17).stall_at(1)));
    let hooks = poster.mover().hooks().clone();
    let task = tokio::spawn({
        let one = one.clone();
        async move { poster.init_config(one).await }
    });
    hooks.stalled().await;
    let ctrl = world.controller(Hooks::new(18));
    assert_eq!(
        ctrl.init_config(one.clone()).await.unwrap(),
        InitOutcome::Posted
    );
    let doomed = world.controller(Hooks::new(19).crash_at(3, false));
    assert!(doomed.change_config_to(two.clone()).await.is_err());
    hooks.release();
    assert_eq!(task.await.unwrap().unwrap(), InitOutcome::Posted);
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Finished { num: 2 }
    );
    world.check(&two);

    // change_config_to, while configs 2 and 3 overtake it.
    let world = world_at(&one).await;
    let stale = Arc::new(world.controller(Hooks::new(14).stall_at(1)));
    let hooks = stale.mover().hooks().clone();
    let task = tokio::spawn({
        let two = joined(&one, &[4]);
        async move { stale.change_config_to(two).await }
    });
    hooks.stalled().await;
    let ctrl = world.controller(Hooks::new(15));
    assert_eq!(
        ctrl.change_config_to(two.clone()).await.unwrap(),
        ChangeOutcome::Changed
    );
    let doomed = world.controller(Hooks::new(16).crash_at(3, false));
    assert!(doomed.change_config_to(three.clone()).await.is_err());
    hooks.release();
    assert_eq!(
        task.await.unwrap().unwrap(),
        ChangeOutcome::Superseded { num: 2 }
    );
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Finished { num: 3 }
    );
    world.check(&three);
}

/// Goal: a corrupt or invalid stored config is a typed error naming the
/// key and the cause, never a panic.
#[tokio::test(start_paused = true)]
async fn corrupt_stored_config_is_a_typed_error() {
    let good = joined(&ShardConfig::initial(4).unwrap(), &[1]);
    let record = encode_config(&good);
    let mut invalid = good.clone();
    invalid.shards[2] = 7;
    let invalid = postcard::to_extend(&invalid, vec![CONFIG_FORMAT_V1]).unwrap();
    let mut trailing = record.to_vec();
    trailing.push(0);
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (vec![], DecodeError::Empty),
        (vec![2, 0, 0], DecodeError::UnknownFormat { format: 2 }),
        (
            vec![CONFIG_FORMAT_V1, 1, 200],
            DecodeError::Postcard(postcard::Error::DeserializeUnexpectedEnd),
        ),
        (trailing, DecodeError::TrailingBytes { bytes: 1 }),
        (
            invalid,
            DecodeError::Invalid(ConfigError::UnknownGroup { shard: 2, group: 7 }),
        ),
        (
            vec![CONFIG_FORMAT_V1; CONFIG_RECORD_BYTES_MAX + 1],
            DecodeError::TooLarge {
                bytes: CONFIG_RECORD_BYTES_MAX + 1,
            },
        ),
    ];
    for (bytes, expected) in cases {
        let _case = OnPanic(format!("record {:?}", &bytes[..bytes.len().min(8)]));
        assert_eq!(decode_config(&bytes).unwrap_err(), expected);

        let world = World::new();
        world.put_raw(NEXT_CONFIG_KEY, &record);
        world.put_raw(CURRENT_CONFIG_KEY, &bytes);
        let ctrl = world.controller(Hooks::new(3));
        match ctrl.query().await {
            Err(QueryError::Corrupt {
                key: ConfigKey::Current,
                source,
            }) => assert_eq!(source, expected),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ctrl.change_config_to(joined(&good, &[2])).await,
            Err(ChangeError::Corrupt {
                key: ConfigKey::Current,
                ..
            })
        ));

        let world = World::new();
        world.put_raw(NEXT_CONFIG_KEY, &bytes);
        world.put_raw(CURRENT_CONFIG_KEY, &record);
        let ctrl = world.controller(Hooks::new(3));
        assert!(matches!(
            ctrl.init_controller().await,
            Err(RecoverError::Corrupt {
                key: ConfigKey::Next,
                ..
            })
        ));
        assert!(matches!(
            ctrl.init_config(good.clone()).await,
            Err(InitError::Corrupt {
                key: ConfigKey::Next,
                ..
            })
        ));
    }
}

/// Goal: the stored record is the format byte then postcard, byte for byte
/// (derived by hand from postcard's wire format: varints, length-prefixed
/// sequences and maps), so other tools can read it.
#[test]
fn config_record_is_pinned() {
    let config = ShardConfig {
        num: 300,
        shards: vec![1, 2, 1],
        groups: BTreeMap::from([(1, vec![11]), (2, vec![21, 22])]),
    };
    let expected: &[u8] = &[
        CONFIG_FORMAT_V1,
        0xac,
        0x02, // num 300 as a varint
        3,
        1,
        2,
        1, // shards
        2, // two groups
        1,
        1,
        11, // group 1: [11]
        2,
        2,
        21,
        22, // group 2: [21, 22]
    ];
    assert_eq!(&encode_config(&config)[..], expected);
    assert_eq!(decode_config(expected).unwrap(), config);
}

/// Goal: transient errors are retried with backoff until they pass, and for
/// no longer than the step deadline; permanent ones are not retried; a
/// `Maybe` put is resolved whether it landed or not.
#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_within_the_deadline() {
    let one = joined(&ShardConfig::initial(12).unwrap(), &[1]);

    // Transient store and mover faults, lost replies, and both kinds of
    // Maybe: every operation still succeeds.
    for fault in [Fault::Unavailable, Fault::LostReply, Fault::MaybeDropped] {
        let _case = OnPanic(format!("{fault:?}"));
        let world = world_at(&one).await;
        // Every third operation suffers the fault (a period of two would
        // keep hitting the resent put after each read-back of a Maybe).
        let script = [Some(fault), None, None].repeat(30);
        let ctrl = world.controller(Hooks::new(4).script(&script));
        let two = joined(&one, &[2]);
        assert_eq!(
            ctrl.change_config_to(two.clone()).await.unwrap(),
            ChangeOutcome::Changed
        );
        world.check(&two);
        let ctrl = world.controller(Hooks::new(4).delays(2).script(&script));
        let three = joined(&two, &[3]);
        assert_eq!(
            ctrl.change_config_to(three.clone()).await.unwrap(),
            ChangeOutcome::Changed
        );
        world.check(&three);
    }

    // Unavailable for good: the step gives up at its deadline.
    let world = world_at(&one).await;
    let ctrl = world.controller(Hooks::new(4).faults(1000));
    let start = Instant::now();
    assert!(matches!(
        ctrl.query().await,
        Err(QueryError::Store {
            key: ConfigKey::Next | ConfigKey::Current,
            source: StoreError::Unavailable(_)
        })
    ));
    let waited = start.elapsed();
    let step_deadline = timing().step_deadline;
    assert!(
        waited >= step_deadline && waited <= step_deadline + timing().backoff_max,
        "waited {waited:?}"
    );

    // Refused: no retry, no wait.
    let ctrl = world.controller(Hooks::new(4).script(&[Some(Fault::Refused)]));
    let start = Instant::now();
    assert!(matches!(
        ctrl.query().await,
        Err(QueryError::Store {
            source: StoreError::Refused(_),
            ..
        })
    ));
    assert_eq!(start.elapsed(), Duration::ZERO);

    // The groups go away after the reads and the claim (operations 0..=2):
    // the change stops at the first step's deadline, naming it, and stays
    // pending for init_controller.
    let ctrl = world.controller(Hooks::new(4).down_from(3));
    let two = joined(&one, &[2]);
    let start = Instant::now();
    match ctrl.change_config_to(two.clone()).await {
        Err(ChangeError::Move {
            step: Step::Freeze { group: 1, .. },
            num: 2,
            source: MoveError::Unavailable(_),
        }) => {}
        other => panic!("{other:?}"),
    }
    let waited = start.elapsed();
    assert!(
        waited >= step_deadline && waited <= step_deadline + timing().backoff_max,
        "waited {waited:?}"
    );
    assert_eq!(world.stored(NEXT_CONFIG_KEY), Some(two.clone()));
    let ctrl = world.controller(Hooks::new(4));
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Finished { num: 2 }
    );
    world.check(&two);
}

/// Goal: a change that cannot follow the current config is refused before
/// anything is done, and one that is not newer is `Superseded`; while a
/// claim is pending, another change is `Lost`.
#[tokio::test(start_paused = true)]
async fn changes_that_cannot_follow_are_refused() {
    let one = joined(&ShardConfig::initial(12).unwrap(), &[1]);
    let world = world_at(&one).await;
    let ctrl = world.controller(Hooks::new(6));
    let two = joined(&one, &[2]);

    let mut gap = two.clone();
    gap.num = 3;
    let mut other_count = joined(&ShardConfig::initial(8).unwrap(), &[1, 2]);
    other_count.num = 2;
    let mut unassigned = ShardConfig::initial(12).unwrap();
    unassigned.num = 2;
    let mut invalid = two.clone();
    invalid.groups.insert(5, vec![]);
    let refusals = [
        (gap, TransitionError::NumGap { current: 1, new: 3 }),
        (
            other_count,
            TransitionError::ShardCount {
                current_shards: 12,
                new_shards: 8,
            },
        ),
        (unassigned, TransitionError::ShardUnassigned { shard: 0 }),
        (
            invalid,
            TransitionError::Invalid(ConfigError::NoMembers { group: 5 }),
        ),
    ];
    for (config, expected) in refusals {
        match ctrl.change_config_to(config).await {
            Err(ChangeError::Invalid(error)) => assert_eq!(error, expected),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        ctrl.change_config_to(one.clone()).await.unwrap(),
        ChangeOutcome::Superseded { num: 1 }
    );
    world.check(&one);
    assert_eq!(ctrl.mover().hooks().store_writes(), 0);

    // A claim whose controller died before any step: the next change of
    // the same number is Lost, until init_controller finishes the claim.
    let doomed = world.controller(Hooks::new(6).crash_at(3, false));
    assert!(doomed.change_config_to(two.clone()).await.is_err());
    assert_eq!(world.stored(NEXT_CONFIG_KEY), Some(two.clone()));
    let three = joined(&one, &[3]);
    assert_eq!(
        ctrl.change_config_to(three).await.unwrap(),
        ChangeOutcome::Lost
    );
    assert_eq!(
        ctrl.init_controller().await.unwrap(),
        RecoverOutcome::Finished { num: 2 }
    );
    world.check(&two);
}

/// Goal: the moves of a change run side by side, never more than
/// [`MOVES_CONCURRENT_MAX`] steps at once, and that many when there is
/// enough work.
#[tokio::test(start_paused = true)]
async fn moves_run_concurrently_within_the_bound() {
    let one = joined(&ShardConfig::initial(SHARDS_DEFAULT).unwrap(), &[1]);
    let world = world_at(&one).await;
    let ctrl = world.controller(Hooks::new(7).delays(5));
    let two = joined(&one, &[2, 3]);
    let start = Instant::now();
    assert_eq!(
        ctrl.change_config_to(two.clone()).await.unwrap(),
        ChangeOutcome::Changed
    );
    world.check(&two);
    assert_eq!(
        world.groups.lock().steps_in_flight_max(),
        MOVES_CONCURRENT_MAX
    );
    // 170 moves of three steps of up to 5 ms each: sequentially about
    // 1.3 s, eight at a time under 0.3 s.
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
}

/// Goal: timing settings that cannot work are refused.
#[test]
fn controller_config_is_validated() {
    assert_eq!(ControllerConfig::default().validate(), Ok(()));
    let check = |config: ControllerConfig, expected: ControllerConfigError| {
        assert_eq!(config.validate(), Err(expected));
    };
    check(
        ControllerConfig {
            step_deadline: Duration::ZERO,
            ..ControllerConfig::default()
        },
        ControllerConfigError::StepDeadlineZero,
    );
    check(
        ControllerConfig {
            backoff_min: Duration::ZERO,
            ..ControllerConfig::default()
        },
        ControllerConfigError::BackoffMinZero,
    );
    check(
        ControllerConfig {
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(1),
            ..ControllerConfig::default()
        },
        ControllerConfigError::BackoffInverted {
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(1),
        },
    );
}

/// Goal: the controller's futures are `Send` when its store and mover are
/// `Sync`, so the cluster can run it in a spawned task.
#[test]
fn controller_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let world = World::new();
    let ctrl = world.controller(Hooks::new(8));
    let config = ShardConfig::initial(4).unwrap();
    assert_send(&ctrl.query());
    assert_send(&ctrl.init_config(config.clone()));
    assert_send(&ctrl.change_config_to(config));
    assert_send(&ctrl.init_controller());
}
