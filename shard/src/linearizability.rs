//! A linearizability checker for key/value histories.
//!
//! Tests record what concurrent clients asked ([`Input`]), what they were
//! told ([`Output`]) and when each call started and returned
//! ([`Operation`]), then ask [`check_history`] whether some sequential order
//! of the operations (a *linearization*) both respects real time (an
//! operation that returned before another was called comes first) and
//! reproduces every observed output on the sequential model ([`apply`]).
//!
//! # Layout
//! - The model: [`KeyState`], [`Input`], [`Output`], [`apply`].
//! - The history: [`Operation`], and [`HistoryRecorder`], which concurrent
//!   test clients share to build one.
//! - The checker: [`check_history`] returning a [`CheckOutcome`].
//!
//! # Algorithm
//! Wing & Gong's search ("Testing and verifying concurrent objects", J.
//! Parallel Distrib. Comput. 17, 1993) with Lowe's improvements ("Testing
//! for linearizability", Concurrency and Computation 29(4), 2017), as in
//! porcupine (github.com/anishathalye/porcupine):
//!
//! - **Partitioning (P-compositionality).** Linearizability is local: a
//!   history is linearizable iff its restriction to each key is, because
//!   every operation touches one key. Each key is searched on its own.
//! - **Search.** The call and return events of a key's operations are kept
//!   in time order in a doubly linked list. Walking from the front, a call
//!   event is an operation that may be linearized next; if the model accepts
//!   its output, the operation is *lifted* out of the list (call and return)
//!   and pushed on a stack, and the walk restarts at the front. Reaching a
//!   return event means the operation it belongs to can no longer be
//!   postponed and none of the earlier candidates worked: pop the last
//!   lifted operation, put it back (dancing links), restore the model state
//!   and try the candidate after it. An empty list is a linearization; an
//!   empty stack at a return is a proof that none exists.
//! - **Just-in-time linearization.** Only operations whose call precedes the
//!   first pending return are ever candidates; return events are never
//!   "executed", so the search never branches on them.
//! - **Memoization.** A (set of linearized operations, model state) pair
//!   that was reached before has been fully explored already; it is kept in
//!   a hash set and never expanded twice. This is what makes the search
//!   practical: without it, commuting reads multiply the search space.
//!
//! # Time
//! Intervals are closed: `a` precedes `b` only if `a.return_time <
//! b.call_time`; operations that merely touch (`a.return_time ==
//! b.call_time`) are concurrent. At equal times calls therefore sort before
//! returns. The checker reads no clock; times are whatever the caller
//! recorded (tokio's paused clock, a logical counter, nanoseconds).
//!
//! # Unknown outcomes
//! An operation with [`Output::Unknown`] (the client timed out) may have
//! taken effect at any moment after its call, or never. The checker gives
//! it a return time of +infinity (its recorded `return_time` is ignored) and
//! accepts any output from it. "Never" needs no special case: an operation
//! that never took effect is indistinguishable from one linearized after
//! every other operation, where its effect reaches no observed output, and a
//! return at +infinity always allows that position. The tests cross-check
//! this against a brute-force checker that omits such operations instead.
//! Unknown reads are dropped before the search: they change nothing.
//!
//! # Limits
//! The problem is NP-complete in general, so the search is bounded by a
//! deterministic step budget per key instead of a wall-clock timeout: a step
//! is one visit of a list entry (one linearization attempt or one
//! backtrack). Running out yields [`CheckOutcome::BudgetExhausted`], which
//! is neither a pass nor a failure.
//!
//! Histories of correct systems are usually decided in about one step per
//! operation. The expensive case is disproving a history with many
//! unknown-outcome writes on one key before the violation: each may have
//! landed anywhere after its call or never, and all those placements must be
//! refuted. Keep unknown outcomes rare, or keys many, in tests that must
//! find violations.
//!
//! Memory: the memo holds one bitset of `n` bits (`n` = operations on the
//! key) per successful step, so at most `steps * n / 8` bytes per key.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use shoal_shard::linearizability::{check_history, Input, Operation, Output};
//!
//! let key = Bytes::from_static(b"k");
//! let history = vec![
//!     Operation {
//!         client_id: 1,
//!         input: Input::Put { key: key.clone(), value: Bytes::from_static(b"a") },
//!         output: Output::Written { version: 1 },
//!         call_time: 0,
//!         return_time: 10,
//!     },
//!     // Overlaps the put, so it may read before or after it.
//!     Operation {
//!         client_id: 2,
//!         input: Input::Get { key },
//!         output: Output::NotFound,
//!         call_time: 5,
//!         return_time: 15,
//!     },
//! ];
//! assert!(check_history(&history, 10_000).is_linearizable());
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// The model's state of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// The key does not exist.
    #[default]
    Absent,
    /// The key exists.
    Present {
        /// Current value.
        value: Bytes,
        /// 1 when the key was created, +1 on every write since.
        version: u64,
    },
}

/// What a client asked the KV service to do. Every input names one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Read a key.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Write unconditionally: version becomes old + 1, or 1 on create.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Write only if the key's version is `version`; `version == 0` means
    /// "only if the key is absent".
    PutIfVersion {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// Expected current version (0: absent).
        version: u64,
    },
    /// Concatenate `value` to the key's value, creating it if absent.
    Append {
        /// The key.
        key: Bytes,
        /// Bytes to append.
        value: Bytes,
    },
    /// Remove the key; a later create starts again at version 1.
    Delete {
        /// The key.
        key: Bytes,
    },
}

impl Input {
    /// The key this input addresses.
    pub fn key(&self) -> &Bytes {
        match self {
            Input::Get { key }
            | Input::Put { key, .. }
            | Input::PutIfVersion { key, .. }
            | Input::Append { key, .. }
            | Input::Delete { key } => key,
        }
    }
}

/// What a client was told.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// `Get` found the key.
    Value {
        /// The value read.
        value: Bytes,
        /// Its version.
        version: u64,
    },
    /// `Get` found no key.
    NotFound,
    /// A write took effect; the key now has this version.
    Written {
        /// The version after the write.
        version: u64,
    },
    /// `PutIfVersion` found the key at another version.
    VersionMismatch,
    /// `PutIfVersion` with a non-zero version found no key.
    NoKey,
    /// `Delete` ran.
    Deleted {
        /// Whether the key existed.
        existed: bool,
    },
    /// The client does not know whether the operation took effect (for
    /// example it timed out). Matches any outcome; see the module docs.
    Unknown,
}

/// The sequential specification: applies `input` to one key's `state`,
/// returning the new state and the output a correct service gives. The
/// input's key is not looked at; the caller has already picked the key.
pub fn apply(state: &KeyState, input: &Input) -> (KeyState, Output) {
    let version_after_write = match state {
        KeyState::Absent => 1,
        KeyState::Present { version, .. } => version + 1,
    };
    match (input, state) {
        (Input::Get { .. }, KeyState::Absent) => (KeyState::Absent, Output::NotFound),
        (Input::Get { .. }, KeyState::Present { value, version }) => (
            state.clone(),
            Output::Value {
                value: value.clone(),
                version: *version,
            },
        ),
        (Input::Put { value, .. }, _) => (
            KeyState::Present {
                value: value.clone(),
                version: version_after_write,
            },
            Output::Written {
                version: version_after_write,
            },
        ),
        (
            Input::PutIfVersion {
                value,
                version: expected,
                ..
            },
            _,
        ) => {
            let current = match state {
                KeyState::Absent => 0,
                KeyState::Present { version, .. } => *version,
            };
            if *expected == current {
                (
                    KeyState::Present {
                        value: value.clone(),
                        version: version_after_write,
                    },
                    Output::Written {
                        version: version_after_write,
                    },
                )
            } else if current == 0 {
                (KeyState::Absent, Output::NoKey)
            } else {
                (state.clone(), Output::VersionMismatch)
            }
        }
        (Input::Append { value, .. }, KeyState::Absent) => (
            KeyState::Present {
                value: value.clone(),
                version: 1,
            },
            Output::Written { version: 1 },
        ),
        (Input::Append { value: suffix, .. }, KeyState::Present { value, .. }) => {
            let mut joined = BytesMut::with_capacity(value.len() + suffix.len());
            joined.extend_from_slice(value);
            joined.extend_from_slice(suffix);
            (
                KeyState::Present {
                    value: joined.freeze(),
                    version: version_after_write,
                },
                Output::Written {
                    version: version_after_write,
                },
            )
        }
        (Input::Delete { .. }, _) => (
            KeyState::Absent,
            Output::Deleted {
                existed: matches!(state, KeyState::Present { .. }),
            },
        ),
    }
}

/// One completed (or abandoned) client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Which client issued it. Informational: each client is expected to
    /// have one operation in flight at a time, but the checker relies only
    /// on the times.
    pub client_id: u64,
    /// What was asked.
    pub input: Input,
    /// What was answered.
    pub output: Output,
    /// When the call was made.
    pub call_time: u64,
    /// When the answer arrived; must be `>= call_time`. Ignored (treated as
    /// +infinity) when `output` is [`Output::Unknown`].
    pub return_time: u64,
}

impl Operation {
    /// True if the client does not know whether the operation took effect.
    pub fn is_unknown(&self) -> bool {
        self.output == Output::Unknown
    }
}

/// The verdict of [`check_history`].
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Every key's history has a linearization.
    Linearizable {
        /// Search steps used, summed over all keys.
        steps_used: u64,
    },
    /// Some key's history has no linearization. When several keys fail,
    /// the smallest key is reported.
    NotLinearizable {
        /// The key whose history is not linearizable.
        key: Bytes,
        /// Indices (into the checked slice, ascending) of the operations
        /// that could not be linearized after the longest linearizable
        /// prefix found: every one of them contradicts the model there.
        ops_involved: Vec<usize>,
        /// Human-readable account: the end of the longest prefix, the model
        /// state after it, and what each involved operation observed
        /// versus what the model says.
        explanation: String,
    },
    /// The step budget ran out on some key before a verdict; no violation
    /// was found on any key that finished.
    BudgetExhausted {
        /// The first key (in key order) whose search ran out of steps.
        key: Bytes,
        /// Steps used on that key (the budget).
        steps_used: u64,
    },
}

impl CheckOutcome {
    /// True for [`CheckOutcome::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckOutcome::Linearizable { .. })
    }

    /// True for [`CheckOutcome::NotLinearizable`].
    pub fn is_violation(&self) -> bool {
        matches!(self, CheckOutcome::NotLinearizable { .. })
    }
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckOutcome::Linearizable { steps_used } => {
                write!(f, "linearizable ({steps_used} search steps)")
            }
            CheckOutcome::NotLinearizable {
                key,
                ops_involved,
                explanation,
            } => write!(
                f,
                "not linearizable on key {key:?} (operations {ops_involved:?}):\n{explanation}"
            ),
            CheckOutcome::BudgetExhausted { key, steps_used } => write!(
                f,
                "no verdict: search on key {key:?} ran out of its {steps_used} step budget"
            ),
        }
    }
}

/// Checks whether `ops` is linearizable with respect to [`apply`].
///
/// `steps_max_per_key` bounds the search on each key (see the module docs);
/// the total work is at most that times the number of keys. The verdict is
/// deterministic for a given history and budget.
///
/// # Panics
/// If an operation that is not [`Output::Unknown`] has `return_time <
/// call_time`: that is a bug in the recording, not in the system under test.
pub fn check_history(ops: &[Operation], steps_max_per_key: u64) -> CheckOutcome {
    let mut by_key: BTreeMap<&Bytes, Vec<usize>> = BTreeMap::new();
    for (index, op) in ops.iter().enumerate() {
        assert!(
            op.is_unknown() || op.return_time >= op.call_time,
            "operation {index} returns before it is called: {op:?}"
        );
        if op.is_unknown() && matches!(op.input, Input::Get { .. }) {
            // A read with no answer changes nothing and constrains nothing;
            // searching its positions would only cost steps.
            continue;
        }
        by_key.entry(op.input.key()).or_default().push(index);
    }
    let mut steps_total = 0u64;
    let mut exhausted: Option<(Bytes, u64)> = None;
    for (key, indices) in by_key {
        match check_partition(ops, &indices, steps_max_per_key) {
            PartitionOutcome::Linearizable { steps_used } => steps_total += steps_used,
            PartitionOutcome::NotLinearizable {
                ops_involved,
                explanation,
            } => {
                return CheckOutcome::NotLinearizable {
                    key: key.clone(),
                    ops_involved,
                    explanation,
                };
            }
            PartitionOutcome::BudgetExhausted { steps_used } => {
                // Keep going: a definite violation on a later key is worth
                // more than "no verdict".
                exhausted.get_or_insert((key.clone(), steps_used));
            }
        }
    }
    match exhausted {
        Some((key, steps_used)) => CheckOutcome::BudgetExhausted { key, steps_used },
        None => CheckOutcome::Linearizable {
            steps_used: steps_total,
        },
    }
}

enum PartitionOutcome {
    Linearizable {
        steps_used: u64,
    },
    NotLinearizable {
        ops_involved: Vec<usize>,
        explanation: String,
    },
    BudgetExhausted {
        steps_used: u64,
    },
}

/// Marks the end of the event list and "no entry".
const NIL: usize = usize::MAX;

/// The event list of one key as a doubly linked list over arrays. Entries
/// `0..2n` are events in time order; entry `2n` is the head sentinel.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Local operation id of each event.
    op: Vec<usize>,
    /// For a call event, its return event; `NIL` for return events.
    return_entry: Vec<usize>,
    head: usize,
}

impl EventList {
    fn new(ops: &[&Operation]) -> EventList {
        // Sort key: (return at +infinity?, time, call before return, op).
        let mut events: Vec<(bool, u64, u8, usize)> = Vec::with_capacity(ops.len() * 2);
        for (id, op) in ops.iter().enumerate() {
            events.push((false, op.call_time, 0, id));
            if op.is_unknown() {
                events.push((true, 0, 1, id));
            } else {
                events.push((false, op.return_time, 1, id));
            }
        }
        events.sort_unstable();
        let entries = events.len();
        let head = entries;
        let mut list = EventList {
            next: vec![NIL; entries + 1],
            prev: vec![NIL; entries + 1],
            op: vec![NIL; entries],
            return_entry: vec![NIL; entries],
            head,
        };
        let mut call_entry_of = vec![NIL; ops.len()];
        let mut previous = head;
        for (entry, &(_, _, kind, id)) in events.iter().enumerate() {
            list.op[entry] = id;
            if kind == 0 {
                call_entry_of[id] = entry;
            } else {
                assert_ne!(
                    call_entry_of[id], NIL,
                    "return event of op {id} sorted before its call"
                );
                list.return_entry[call_entry_of[id]] = entry;
            }
            list.next[previous] = entry;
            list.prev[entry] = previous;
            previous = entry;
        }
        list
    }

    fn first(&self) -> usize {
        self.next[self.head]
    }

    fn is_call(&self, entry: usize) -> bool {
        self.return_entry[entry] != NIL
    }

    /// Removes a call entry and its return entry. The removed entries keep
    /// their links so that `unlift` in LIFO order restores the list.
    fn lift(&mut self, call: usize) {
        let (prev, next) = (self.prev[call], self.next[call]);
        self.next[prev] = next;
        // A call is always followed by at least its own return.
        self.prev[next] = prev;
        let ret = self.return_entry[call];
        let (prev, next) = (self.prev[ret], self.next[ret]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    /// Undoes the most recent `lift` still in effect, which must be `call`'s.
    fn unlift(&mut self, call: usize) {
        let ret = self.return_entry[call];
        let (prev, next) = (self.prev[ret], self.next[ret]);
        self.next[prev] = ret;
        if next != NIL {
            self.prev[next] = ret;
        }
        let (prev, next) = (self.prev[call], self.next[call]);
        self.next[prev] = call;
        self.prev[next] = call;
    }
}

fn bit_set(bits: &mut [u64], id: usize) {
    bits[id / 64] |= 1 << (id % 64);
}

fn bit_clear(bits: &mut [u64], id: usize) {
    bits[id / 64] &= !(1 << (id % 64));
}

/// Searches one key's history; `indices` are positions in `all_ops`.
fn check_partition(all_ops: &[Operation], indices: &[usize], steps_max: u64) -> PartitionOutcome {
    let ops: Vec<&Operation> = indices.iter().map(|&index| &all_ops[index]).collect();
    let mut list = EventList::new(&ops);
    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut seen: HashSet<(Vec<u64>, KeyState)> = HashSet::new();
    // Lifted call entries with the model state from before each.
    let mut stack: Vec<(usize, KeyState)> = Vec::new();
    let mut state = KeyState::Absent;
    let mut longest_prefix: Vec<usize> = Vec::new();
    let mut steps_used = 0u64;
    let mut entry = list.first();
    while list.first() != NIL {
        if steps_used >= steps_max {
            return PartitionOutcome::BudgetExhausted { steps_used };
        }
        steps_used += 1;
        if list.is_call(entry) {
            let id = list.op[entry];
            let (next_state, expected) = apply(&state, &ops[id].input);
            if ops[id].output == Output::Unknown || ops[id].output == expected {
                bit_set(&mut linearized, id);
                if seen.insert((linearized.clone(), next_state.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, next_state)));
                    list.lift(entry);
                    if stack.len() > longest_prefix.len() {
                        longest_prefix = stack.iter().map(|&(call, _)| list.op[call]).collect();
                    }
                    entry = list.first();
                    continue;
                }
                bit_clear(&mut linearized, id);
            }
            entry = list.next[entry];
        } else {
            // The operation of this return must be linearized before
            // anything later, and no candidate before it worked: backtrack.
            let Some((call, previous_state)) = stack.pop() else {
                let (ops_involved, explanation) = explain(&ops, indices, &longest_prefix);
                return PartitionOutcome::NotLinearizable {
                    ops_involved,
                    explanation,
                };
            };
            bit_clear(&mut linearized, list.op[call]);
            state = previous_state;
            list.unlift(call);
            entry = list.next[call];
        }
    }
    PartitionOutcome::Linearizable { steps_used }
}

/// Most prefix operations an explanation lists.
const EXPLANATION_PREFIX_OPS_MAX: usize = 8;

/// Describes why the longest linearizable prefix cannot be extended.
/// Returns the global indices of the stuck operations and the text.
fn explain(ops: &[&Operation], indices: &[usize], prefix: &[usize]) -> (Vec<usize>, String) {
    use std::fmt::Write as _;
    let describe = |id: usize| {
        let op = ops[id];
        let returned = if op.is_unknown() {
            "inf".to_string()
        } else {
            op.return_time.to_string()
        };
        format!(
            "op {} (client {}, [{}, {}]): {:?} -> {:?}",
            indices[id], op.client_id, op.call_time, returned, op.input, op.output
        )
    };
    let mut text = String::new();
    let mut state = KeyState::Absent;
    let mut in_prefix = vec![false; ops.len()];
    for &id in prefix {
        state = apply(&state, &ops[id].input).0;
        in_prefix[id] = true;
    }
    let _ = writeln!(
        text,
        "the longest linearizable prefix has {} of {} operations; its last {}:",
        prefix.len(),
        ops.len(),
        prefix.len().min(EXPLANATION_PREFIX_OPS_MAX)
    );
    for &id in &prefix[prefix.len().saturating_sub(EXPLANATION_PREFIX_OPS_MAX)..] {
        let _ = writeln!(text, "  {}", describe(id));
    }
    let _ = writeln!(text, "model state after the prefix: {state:?}");
    // Candidates for the next position: unlinearized operations called no
    // later than the earliest pending return.
    let earliest_return = (0..ops.len())
        .filter(|&id| !in_prefix[id] && !ops[id].is_unknown())
        .map(|id| ops[id].return_time)
        .min()
        .unwrap_or(u64::MAX);
    let stuck: Vec<usize> = (0..ops.len())
        .filter(|&id| !in_prefix[id] && ops[id].call_time <= earliest_return)
        .collect();
    let _ = writeln!(text, "none of these can come next:");
    for &id in &stuck {
        let (_, expected) = apply(&state, &ops[id].input);
        let _ = writeln!(text, "  {}; the model answers {:?}", describe(id), expected);
    }
    let mut ops_involved: Vec<usize> = stuck.iter().map(|&id| indices[id]).collect();
    ops_involved.sort_unstable();
    (ops_involved, text)
}

/// Proof that an operation was begun with [`HistoryRecorder`]; hand it back
/// to one of the `end` methods. Not `Clone`: an operation ends once.
#[must_use = "an operation that is never ended is recorded as Output::Unknown"]
#[derive(Debug)]
pub struct OpToken {
    index: usize,
}

/// Where a [`HistoryRecorder`]'s timestamps come from. A recorder uses one
/// source for its whole life; mixing them would make times incomparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClockSource {
    /// `begin`/`end`: a counter inside the recorder.
    Logical,
    /// `begin_at`/`end_at`: times passed by the caller.
    Caller,
}

#[derive(Debug, Default)]
struct RecorderState {
    operations: Vec<Operation>,
    ended: Vec<bool>,
    logical_time: u64,
    clock_source: Option<ClockSource>,
}

impl RecorderState {
    fn use_clock(&mut self, source: ClockSource) {
        let current = *self.clock_source.get_or_insert(source);
        assert_eq!(
            current, source,
            "a HistoryRecorder must not mix begin/end with begin_at/end_at"
        );
    }

    fn tick(&mut self) -> u64 {
        self.logical_time += 1;
        self.logical_time
    }

    fn begin(&mut self, client_id: u64, input: Input, call_time: u64) -> OpToken {
        let index = self.operations.len();
        // Until it ends, the operation is in flight: outcome unknown.
        self.operations.push(Operation {
            client_id,
            input,
            output: Output::Unknown,
            call_time,
            return_time: call_time,
        });
        self.ended.push(false);
        OpToken { index }
    }

    fn end(&mut self, token: OpToken, output: Output, return_time: u64) {
        assert!(
            token.index < self.operations.len() && !self.ended[token.index],
            "OpToken {} does not belong to a pending operation of this recorder",
            token.index
        );
        let op = &mut self.operations[token.index];
        assert!(
            return_time >= op.call_time,
            "operation {} returns at {return_time}, before its call at {}",
            token.index,
            op.call_time
        );
        op.output = output;
        op.return_time = return_time;
        self.ended[token.index] = true;
    }
}

/// Records a history from concurrent clients. Share it behind an `Arc`;
/// every method takes `&self` and locks briefly.
///
/// Timestamps come either from an internal counter (`begin`, `end`,
/// `end_unknown`: each event gets the next tick, so the recorded order is
/// the order in which the events reached the recorder) or from the caller
/// (`begin_at`, `end_at`, `end_unknown_at`, e.g. tokio's paused clock in
/// nanoseconds). A recorder must use one kind throughout.
///
/// For the counter to be sound, call `begin` before sending the request and
/// `end` after the reply arrived: the recorded interval must contain the
/// real one.
#[derive(Debug, Default)]
pub struct HistoryRecorder {
    state: Mutex<RecorderState>,
}

impl HistoryRecorder {
    /// An empty recorder.
    pub fn new() -> HistoryRecorder {
        HistoryRecorder::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        // A client that panicked cannot leave the log half-written (each
        // update is a push or a field store), so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the call of `input` by `client_id` at the next logical tick.
    pub fn begin(&self, client_id: u64, input: Input) -> OpToken {
        let mut state = self.lock();
        state.use_clock(ClockSource::Logical);
        let now = state.tick();
        state.begin(client_id, input, now)
    }

    /// Records the answer to `token`'s operation at the next logical tick.
    pub fn end(&self, token: OpToken, output: Output) {
        let mut state = self.lock();
        state.use_clock(ClockSource::Logical);
        let now = state.tick();
        state.end(token, output, now);
    }

    /// Records that `token`'s operation ended without a known outcome.
    pub fn end_unknown(&self, token: OpToken) {
        self.end(token, Output::Unknown);
    }

    /// Records the call of `input` by `client_id` at the caller's time.
    pub fn begin_at(&self, client_id: u64, input: Input, call_time: u64) -> OpToken {
        let mut state = self.lock();
        state.use_clock(ClockSource::Caller);
        state.begin(client_id, input, call_time)
    }

    /// Records the answer to `token`'s operation at the caller's time.
    ///
    /// # Panics
    /// If `return_time` is before the operation's call time.
    pub fn end_at(&self, token: OpToken, output: Output, return_time: u64) {
        let mut state = self.lock();
        state.use_clock(ClockSource::Caller);
        state.end(token, output, return_time);
    }

    /// Records, at the caller's time, that `token`'s operation ended
    /// without a known outcome.
    pub fn end_unknown_at(&self, token: OpToken, return_time: u64) {
        self.end_at(token, Output::Unknown, return_time);
    }

    /// A copy of the history so far, in the order operations were begun.
    /// Operations still in flight appear with [`Output::Unknown`].
    pub fn history(&self) -> Vec<Operation> {
        self.lock().operations.clone()
    }

    /// Checks the history so far; see [`check_history`].
    pub fn check(&self, steps_max_per_key: u64) -> CheckOutcome {
        check_history(&self.lock().operations, steps_max_per_key)
    }
}
