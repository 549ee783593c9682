//! In-memory models of the controller's two seams, for its tests:
//! - [`MemStore`]: a linearizable map with versions (the controller group);
//! - [`ModelMover`] over [`Groups`]: replica groups that enforce the
//!   [`ShardMover`] contract (per group and shard: the largest num seen and
//!   a state, Serving, Frozen or Absent; `Stale` for older nums; repeats are
//!   no-ops; an install needs a token from a freeze of the same shard and
//!   num) and panic on anything a correct controller can never cause: two
//!   groups serving one shard, a delete before the data is installed
//!   elsewhere, an install of data already deleted;
//! - [`Hooks`]: one controller's fault injector, shared by its store and
//!   mover handles: seeded random delays and transient faults, scripted
//!   faults, a crash at its k-th operation, a stall at its k-th operation.
//!
//! Every operation goes through [`Hooks::admit`], which yields or sleeps
//! first, so controllers running side by side interleave at every step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_consensus::NodeId;
use shoal_engine::{GroupId, ShardId};
use tokio::sync::Notify;

use super::{
    ConfigStore, FreezeOutcome, GroupRef, MoveError, PutOutcome, ShardMover, StepOutcome,
    StoreError,
};

/// A fault one operation suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A transient error, without effect.
    Unavailable,
    /// The operation takes effect, then its reply is lost: a put answers
    /// `Maybe`, a step a transient error (a get just fails).
    LostReply,
    /// A put answers `Maybe` without effect (anything else: `Unavailable`).
    MaybeDropped,
    /// A permanent error, without effect.
    Refused,
}

/// What [`Hooks::admit`] lets an operation do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Go,
    Fault(Fault),
}

/// Settings and counters of one controller's [`Hooks`].
#[derive(Debug)]
struct HooksState {
    rng: ChaCha8Rng,
    delay_ms_max: u64,
    fault_per_mille: u32,
    script: VecDeque<Option<Fault>>,
    /// Operations started so far (the next one's index).
    ops: u64,
    /// The index of the operation at which the controller dies, and whether
    /// that operation takes effect first. It and every later operation
    /// fail permanently.
    crash_at: Option<(u64, bool)>,
    stall_at: Option<u64>,
    /// Operations from this index on fail with a transient error.
    down_from: Option<u64>,
    store_writes: u64,
    mover_calls: u64,
}

/// One controller's fault injector.
#[derive(Debug)]
pub struct Hooks {
    state: Mutex<HooksState>,
    stalled: Notify,
    release: Notify,
}

impl Hooks {
    /// No faults and no delays (operations still yield), with a random
    /// stream from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Mutex::new(HooksState {
                rng: ChaCha8Rng::seed_from_u64(seed),
                delay_ms_max: 0,
                fault_per_mille: 0,
                script: VecDeque::new(),
                ops: 0,
                crash_at: None,
                stall_at: None,
                down_from: None,
                store_writes: 0,
                mover_calls: 0,
            }),
            stalled: Notify::new(),
            release: Notify::new(),
        }
    }

    /// Each operation first sleeps a random 0..=`ms_max` ms.
    pub fn delays(self, ms_max: u64) -> Self {
        self.lock().delay_ms_max = ms_max;
        self
    }

    /// Each operation suffers a random transient fault (`Unavailable`,
    /// `LostReply` or `MaybeDropped`) with this probability.
    pub fn faults(self, per_mille: u32) -> Self {
        self.lock().fault_per_mille = per_mille;
        self
    }

    /// The next operations suffer `faults`, one each, in order (`None`:
    /// no scripted fault).
    pub fn script(self, faults: &[Option<Fault>]) -> Self {
        self.lock().script.extend(faults);
        self
    }

    /// The controller dies at operation `index` (0-based): it takes effect
    /// first if `applies` (its reply is lost), and it and every later
    /// operation fail permanently.
    pub fn crash_at(self, index: u64, applies: bool) -> Self {
        self.lock().crash_at = Some((index, applies));
        self
    }

    /// Operations from `index` on fail with a transient error.
    pub fn down_from(self, index: u64) -> Self {
        self.lock().down_from = Some(index);
        self
    }

    /// Operation `index` waits for [`Hooks::release`] before doing anything,
    /// after signalling [`Hooks::stalled`].
    pub fn stall_at(self, index: u64) -> Self {
        self.lock().stall_at = Some(index);
        self
    }

    /// Waits until the stalling operation has stalled.
    pub async fn stalled(&self) {
        self.stalled.notified().await;
    }

    /// Lets the stalled operation go on.
    pub fn release(&self) {
        self.release.notify_one();
    }

    /// Whether the crash operation has started.
    pub fn crashed(&self) -> bool {
        let state = self.lock();
        state.crash_at.is_some_and(|(index, _)| state.ops > index)
    }

    /// Puts that wrote something.
    pub fn store_writes(&self) -> u64 {
        self.lock().store_writes
    }

    /// Mover steps attempted.
    pub fn mover_calls(&self) -> u64 {
        self.lock().mover_calls
    }

    fn lock(&self) -> MutexGuard<'_, HooksState> {
        self.state.lock().expect("hooks lock")
    }

    /// Delays the next operation and decides its fate.
    async fn admit(&self) -> Admit {
        let (index, delay_ms, stall) = {
            let mut state = self.lock();
            let index = state.ops;
            state.ops += 1;
            let max = state.delay_ms_max;
            let delay_ms = if max > 0 {
                state.rng.random_range(0..=max)
            } else {
                0
            };
            (index, delay_ms, state.stall_at == Some(index))
        };
        if stall {
            self.stalled.notify_one();
            self.release.notified().await;
        }
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        } else {
            tokio::task::yield_now().await;
        }
        let mut state = self.lock();
        if let Some((crash, applies)) = state.crash_at {
            if index == crash && applies {
                return Admit::Fault(Fault::LostReply);
            }
            if index >= crash {
                return Admit::Fault(Fault::Refused);
            }
        }
        if state.down_from.is_some_and(|from| index >= from) {
            return Admit::Fault(Fault::Unavailable);
        }
        if let Some(fault) = state.script.pop_front() {
            return fault.map_or(Admit::Go, Admit::Fault);
        }
        let per_mille = state.fault_per_mille;
        if per_mille > 0 && state.rng.random_range(0..1000) < per_mille {
            let faults = [Fault::Unavailable, Fault::LostReply, Fault::MaybeDropped];
            return Admit::Fault(faults[state.rng.random_range(0..faults.len())]);
        }
        Admit::Go
    }
}

/// The store's contents: key → (value, version).
#[derive(Debug, Clone, Default)]
pub struct StoreState {
    /// The entries.
    pub map: BTreeMap<Vec<u8>, (Bytes, u64)>,
}

impl StoreState {
    /// A conditional put, linearizable because it runs under the lock.
    fn put_if_version(&mut self, key: &[u8], value: Bytes, version: u64) -> PutOutcome {
        let current = self.map.get(key).map_or(0, |&(_, version)| version);
        if current != version {
            return PutOutcome::VersionMismatch { current };
        }
        self.map.insert(key.to_vec(), (value, version + 1));
        PutOutcome::Written {
            version: version + 1,
        }
    }
}

/// One controller's handle on the shared store.
#[derive(Debug)]
pub struct MemStore {
    state: Arc<Mutex<StoreState>>,
    hooks: Arc<Hooks>,
}

impl MemStore {
    /// A handle on `state` whose operations go through `hooks`.
    pub fn new(state: Arc<Mutex<StoreState>>, hooks: Arc<Hooks>) -> Self {
        Self { state, hooks }
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().expect("store lock")
    }

    fn put_now(&self, key: &[u8], value: Bytes, version: u64) -> PutOutcome {
        let outcome = self.lock().put_if_version(key, value, version);
        if let PutOutcome::Written { .. } = outcome {
            self.hooks.lock().store_writes += 1;
        }
        outcome
    }
}

fn unavailable() -> StoreError {
    StoreError::Unavailable("model: unavailable".into())
}

fn refused() -> StoreError {
    StoreError::Refused("model: refused".into())
}

impl ConfigStore for MemStore {
    async fn get(&self, key: &[u8]) -> Result<Option<(Bytes, u64)>, StoreError> {
        match self.hooks.admit().await {
            Admit::Go => Ok(self.lock().map.get(key).cloned()),
            Admit::Fault(Fault::Refused) => Err(refused()),
            Admit::Fault(_) => Err(unavailable()),
        }
    }

    async fn put_if_version(
        &self,
        key: &[u8],
        value: Bytes,
        version: u64,
    ) -> Result<PutOutcome, StoreError> {
        match self.hooks.admit().await {
            Admit::Go => Ok(self.put_now(key, value, version)),
            Admit::Fault(Fault::Unavailable) => Err(unavailable()),
            Admit::Fault(Fault::LostReply) => {
                self.put_now(key, value, version);
                Ok(PutOutcome::Maybe)
            }
            Admit::Fault(Fault::MaybeDropped) => Ok(PutOutcome::Maybe),
            Admit::Fault(Fault::Refused) => Err(refused()),
        }
    }
}

/// A replica group's state of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Accepts reads and writes.
    Serving,
    /// Refuses writes; its data waits for the destination's install.
    Frozen,
    /// Deleted after a move.
    Absent,
}

/// One group's copy of one shard.
#[derive(Debug, Clone)]
struct Replica {
    /// The largest config number seen in a step for the shard.
    num_max: u64,
    held: Held,
    /// The last value written (0 when created), `None` once deleted.
    data: Option<u64>,
}

/// What a freeze hands to an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Token {
    shard: ShardId,
    num: u64,
    from: GroupId,
    /// `None` if the source had deleted the shard already (a repeated
    /// freeze): installing that is only fine as a repeat.
    data: Option<u64>,
}

/// Every group's shards, and the writes clients made.
#[derive(Debug, Clone, Default)]
pub struct GroupsState {
    replicas: BTreeMap<(GroupId, ShardId), Replica>,
    members: BTreeMap<GroupId, Vec<NodeId>>,
    tokens: BTreeSet<Bytes>,
    /// The last value a client wrote to each shard.
    written: BTreeMap<ShardId, u64>,
    steps_in_flight: usize,
    steps_in_flight_max: usize,
    /// Groups shut down for good: every step to them fails transiently.
    gone: BTreeSet<GroupId>,
}

impl GroupsState {
    /// The groups serving `shard`.
    pub fn serving(&self, shard: ShardId) -> Vec<GroupId> {
        self.replicas
            .iter()
            .filter(|(&(_, s), replica)| s == shard && replica.held == Held::Serving)
            .map(|(&(group, _), _)| group)
            .collect()
    }

    /// The serving group's data of `shard`.
    pub fn data(&self, shard: ShardId) -> Option<(GroupId, Option<u64>)> {
        let group = *self.serving(shard).first()?;
        Some((group, self.replicas[&(group, shard)].data))
    }

    /// The last value a client wrote to `shard`.
    pub fn written(&self, shard: ShardId) -> Option<u64> {
        self.written.get(&shard).copied()
    }

    /// Shuts `group` down for good (the lab's ExitGroup after its leave):
    /// from now on every step addressed to it fails with a transient error.
    pub fn shut_down(&mut self, group: GroupId) {
        self.gone.insert(group);
    }

    /// Most steps that were in flight at once.
    pub fn steps_in_flight_max(&self) -> usize {
        self.steps_in_flight_max
    }

    /// A client write of `value` to `shard`, applied by its serving group
    /// (if any); that group, or `None`.
    pub fn write(&mut self, shard: ShardId, value: u64) -> Option<GroupId> {
        let group = *self.serving(shard).first()?;
        let replica = self.replicas.get_mut(&(group, shard)).expect("serving");
        replica.data = Some(value);
        self.written.insert(shard, value);
        Some(group)
    }

    fn check_members(&mut self, group: GroupRef<'_>) {
        let known = self
            .members
            .entry(group.id)
            .or_insert_with(|| group.members.to_vec());
        assert_eq!(
            known, group.members,
            "model: group {} addressed with other members",
            group.id
        );
    }

    /// At most one group serves a shard at any time.
    fn check_single_server(&self, shard: ShardId) {
        let serving = self.serving(shard);
        assert!(
            serving.len() <= 1,
            "model: shard {shard} is served by groups {serving:?}"
        );
    }

    fn create(&mut self, group: GroupRef<'_>, shards: &[ShardId], num: u64) -> StepOutcome {
        self.check_members(group);
        // All or nothing: the first stale shard refuses the whole call.
        for &shard in shards {
            if let Some(replica) = self.replicas.get(&(group.id, shard)) {
                if num < replica.num_max {
                    return StepOutcome::Stale {
                        num: replica.num_max,
                    };
                }
            }
        }
        for &shard in shards {
            let replica = self.replicas.entry((group.id, shard)).or_insert(Replica {
                num_max: num,
                held: Held::Absent,
                data: None,
            });
            if replica.num_max == num && replica.held == Held::Serving {
                continue; // a repeat
            }
            assert_eq!(
                replica.held,
                Held::Absent,
                "model: create of shard {shard} at {num} on group {}, which holds it at {}",
                group.id,
                replica.num_max
            );
            *replica = Replica {
                num_max: num,
                held: Held::Serving,
                data: Some(0),
            };
            self.check_single_server(shard);
        }
        StepOutcome::Done
    }

    fn freeze(
        &mut self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> FreezeOutcome {
        self.check_members(from);
        self.check_members(to);
        let replica = self.replicas.get_mut(&(from.id, shard)).unwrap_or_else(|| {
            panic!(
                "model: freeze of shard {shard} on group {}, which never had it",
                from.id
            )
        });
        if num < replica.num_max {
            return FreezeOutcome::Stale {
                num: replica.num_max,
            };
        }
        if num == replica.num_max {
            assert_ne!(
                replica.held,
                Held::Serving,
                "model: freeze of shard {shard} at {num} on group {}, which received it at {num}",
                from.id
            );
        } else {
            assert_eq!(
                replica.held,
                Held::Serving,
                "model: freeze of shard {shard} at {num} on group {}, which does not serve it",
                from.id
            );
            replica.num_max = num;
            replica.held = Held::Frozen;
        }
        let token = Token {
            shard,
            num,
            from: from.id,
            data: replica.data,
        };
        let token = Bytes::from(postcard::to_stdvec(&token).expect("token serializes"));
        self.tokens.insert(token.clone());
        FreezeOutcome::Frozen { token }
    }

    fn install(
        &mut self,
        to: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        from: GroupRef<'_>,
        token: &Bytes,
    ) -> StepOutcome {
        self.check_members(to);
        self.check_members(from);
        assert!(
            self.tokens.contains(token),
            "model: install of shard {shard} with a token no freeze issued"
        );
        let decoded: Token = postcard::from_bytes(token).expect("token decodes");
        assert_eq!(
            (decoded.shard, decoded.num, decoded.from),
            (shard, num, from.id),
            "model: install with another step's token"
        );
        if let Some(replica) = self.replicas.get(&(to.id, shard)) {
            if num < replica.num_max {
                return StepOutcome::Stale {
                    num: replica.num_max,
                };
            }
            if num == replica.num_max {
                assert_eq!(
                    replica.held,
                    Held::Serving,
                    "model: repeated install of shard {shard} at {num} on group {}",
                    to.id
                );
                return StepOutcome::Done; // a repeat keeps the data
            }
            assert_eq!(
                replica.held,
                Held::Absent,
                "model: install of shard {shard} at {num} on group {}, which holds it at {}",
                to.id,
                replica.num_max
            );
        }
        let data = decoded.data.unwrap_or_else(|| {
            panic!("model: install of shard {shard} at {num}: the source deleted it already")
        });
        self.replicas.insert(
            (to.id, shard),
            Replica {
                num_max: num,
                held: Held::Serving,
                data: Some(data),
            },
        );
        self.check_single_server(shard);
        StepOutcome::Done
    }

    fn delete(&mut self, from: GroupRef<'_>, shard: ShardId, num: u64) -> StepOutcome {
        self.check_members(from);
        let replica = self.replicas.get(&(from.id, shard)).unwrap_or_else(|| {
            panic!(
                "model: delete of shard {shard} on group {}, which never had it",
                from.id
            )
        });
        if num < replica.num_max {
            return StepOutcome::Stale {
                num: replica.num_max,
            };
        }
        assert_eq!(
            replica.num_max, num,
            "model: delete of shard {shard} at {num} on group {} before its freeze",
            from.id
        );
        match replica.held {
            Held::Absent => return StepOutcome::Done, // a repeat
            Held::Serving => panic!(
                "model: delete of shard {shard} at {num} on group {}, which serves it",
                from.id
            ),
            Held::Frozen => {}
        }
        // The data must live on: installed at this num by the destination.
        let installed = self.replicas.iter().any(|(&(group, s), r)| {
            s == shard && group != from.id && r.num_max == num && r.held == Held::Serving
        });
        assert!(
            installed,
            "model: delete of shard {shard} at {num} on group {} before any install",
            from.id
        );
        let replica = self.replicas.get_mut(&(from.id, shard)).expect("present");
        replica.held = Held::Absent;
        replica.data = None;
        StepOutcome::Done
    }
}

/// The replica groups, shared by every controller's [`ModelMover`].
#[derive(Debug, Default)]
pub struct Groups {
    state: Mutex<GroupsState>,
}

impl Groups {
    /// Groups in `state`.
    pub fn new(state: GroupsState) -> Self {
        Self {
            state: Mutex::new(state),
        }
    }

    /// The state, locked.
    pub fn lock(&self) -> MutexGuard<'_, GroupsState> {
        self.state.lock().expect("groups lock")
    }
}

/// Counts a step as in flight while it lives (also if it is dropped).
struct InFlight<'a>(&'a Groups);

impl<'a> InFlight<'a> {
    fn enter(groups: &'a Groups) -> Self {
        let mut state = groups.lock();
        state.steps_in_flight += 1;
        state.steps_in_flight_max = state.steps_in_flight_max.max(state.steps_in_flight);
        Self(groups)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.steps_in_flight -= 1;
        }
    }
}

/// One controller's handle on the shared groups.
#[derive(Debug)]
pub struct ModelMover {
    groups: Arc<Groups>,
    hooks: Arc<Hooks>,
}

impl ModelMover {
    /// A handle on `groups` whose steps go through `hooks`.
    pub fn new(groups: Arc<Groups>, hooks: Arc<Hooks>) -> Self {
        Self { groups, hooks }
    }

    /// This controller's hooks.
    pub fn hooks(&self) -> &Arc<Hooks> {
        &self.hooks
    }

    /// Admits a step to `group` and applies it (or not) as the fault says;
    /// a group shut down answers nothing.
    async fn step<T>(
        &self,
        group: GroupId,
        apply: impl FnOnce(&mut GroupsState) -> T,
    ) -> Result<T, MoveError> {
        let _in_flight = InFlight::enter(&self.groups);
        self.hooks.lock().mover_calls += 1;
        let admit = self.hooks.admit().await;
        if self.groups.lock().gone.contains(&group) {
            return Err(MoveError::Unavailable("model: the group is gone".into()));
        }
        match admit {
            Admit::Go => Ok(apply(&mut self.groups.lock())),
            Admit::Fault(Fault::LostReply) => {
                apply(&mut self.groups.lock());
                Err(MoveError::Unavailable("model: reply lost".into()))
            }
            Admit::Fault(Fault::Unavailable | Fault::MaybeDropped) => {
                Err(MoveError::Unavailable("model: unavailable".into()))
            }
            Admit::Fault(Fault::Refused) => Err(MoveError::Refused("model: refused".into())),
        }
    }
}

impl ShardMover for ModelMover {
    async fn create(
        &self,
        group: GroupRef<'_>,
        shards: &[ShardId],
        num: u64,
    ) -> Result<StepOutcome, MoveError> {
        self.step(group.id, |state| state.create(group, shards, num))
            .await
    }

    async fn freeze(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        to: GroupRef<'_>,
    ) -> Result<FreezeOutcome, MoveError> {
        self.step(from.id, |state| state.freeze(from, shard, num, to))
            .await
    }

    async fn install(
        &self,
        to: GroupRef<'_>,
        shard: ShardId,
        num: u64,
        from: GroupRef<'_>,
        token: Bytes,
    ) -> Result<StepOutcome, MoveError> {
        self.step(to.id, |state| state.install(to, shard, num, from, &token))
            .await
    }

    async fn delete(
        &self,
        from: GroupRef<'_>,
        shard: ShardId,
        num: u64,
    ) -> Result<StepOutcome, MoveError> {
        self.step(from.id, |state| state.delete(from, shard, num))
            .await
    }
}
