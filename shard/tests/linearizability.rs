//! Tests of the linearizability checker: hand-written histories with a known
//! verdict, a brute-force cross-check on thousands of tiny random histories,
//! randomized histories simulated from a correct KV (with and without
//! provably illegal corruptions), the recorder, and a performance bound.
//!
//! Randomized tests are deterministic; a failure prints the seed of the
//! offending history, and `SHOAL_SEED=<seed>` replays just that one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_shard::linearizability::{
    check_history, CheckOutcome, HistoryRecorder, Input, Operation, Output,
};

/// Generous for every hand-written and tiny history.
const STEPS_MAX_PER_KEY: u64 = 1_000_000;

// ---------------------------------------------------------------- helpers

fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn get(key: &str) -> Input {
    Input::Get { key: bytes(key) }
}

fn put(key: &str, value: &str) -> Input {
    Input::Put {
        key: bytes(key),
        value: bytes(value),
    }
}

fn put_if_version(key: &str, value: &str, version: u64) -> Input {
    Input::PutIfVersion {
        key: bytes(key),
        value: bytes(value),
        version,
    }
}

fn append(key: &str, value: &str) -> Input {
    Input::Append {
        key: bytes(key),
        value: bytes(value),
    }
}

fn delete(key: &str) -> Input {
    Input::Delete { key: bytes(key) }
}

fn value(text: &str, version: u64) -> Output {
    Output::Value {
        value: bytes(text),
        version,
    }
}

fn written(version: u64) -> Output {
    Output::Written { version }
}

fn deleted(existed: bool) -> Output {
    Output::Deleted { existed }
}

/// An operation of `client` over the closed interval `[call_time, return_time]`.
fn op(client_id: u64, input: Input, output: Output, call_time: u64, return_time: u64) -> Operation {
    Operation {
        client_id,
        input,
        output,
        call_time,
        return_time,
    }
}

/// An operation whose outcome the client never learned; it gave up at
/// `return_time`.
fn unknown(client_id: u64, input: Input, call_time: u64, return_time: u64) -> Operation {
    op(client_id, input, Output::Unknown, call_time, return_time)
}

fn assert_linearizable(history: &[Operation]) {
    let outcome = check_history(history, STEPS_MAX_PER_KEY);
    assert!(
        outcome.is_linearizable(),
        "expected linearizable, got {outcome}\nhistory: {history:#?}"
    );
}

/// Asserts a violation and returns the operations it blames.
fn assert_not_linearizable(history: &[Operation]) -> Vec<usize> {
    match check_history(history, STEPS_MAX_PER_KEY) {
        CheckOutcome::NotLinearizable {
            ops_involved,
            explanation,
            ..
        } => {
            assert!(
                !ops_involved.is_empty(),
                "a violation must blame some operation"
            );
            assert!(!explanation.is_empty());
            ops_involved
        }
        other => panic!("expected a violation, got {other}\nhistory: {history:#?}"),
    }
}

// ------------------------------------------------ known linearizable ones

#[test]
fn sequential_history_is_linearizable() {
    // Goal: a history with no concurrency that follows the model is accepted.
    assert_linearizable(&[
        op(1, get("x"), Output::NotFound, 0, 1),
        op(1, put("x", "a"), written(1), 2, 3),
        op(2, get("x"), value("a", 1), 4, 5),
        op(2, put("x", "b"), written(2), 6, 7),
        op(1, get("x"), value("b", 2), 8, 9),
        op(1, delete("x"), deleted(true), 10, 11),
        op(2, delete("x"), deleted(false), 12, 13),
        op(2, get("x"), Output::NotFound, 14, 15),
    ]);
}

#[test]
fn empty_history_is_linearizable() {
    // Goal: nothing to check is a pass, not a panic.
    assert_linearizable(&[]);
}

#[test]
fn concurrent_put_and_get_may_order_either_way() {
    // Goal: a get overlapping a put may see the value before or after it.
    for read in [Output::NotFound, value("a", 1)] {
        assert_linearizable(&[
            op(1, put("x", "a"), written(1), 0, 10),
            op(2, get("x"), read.clone(), 5, 15),
        ]);
    }
}

#[test]
fn overlapping_puts_may_order_either_way() {
    // Goal: two overlapping puts take versions 1 and 2 in either order, and a
    // later get sees the one that came second.
    for (first, second) in [("a", "b"), ("b", "a")] {
        let version_of = |v: &str| if v == first { 1 } else { 2 };
        assert_linearizable(&[
            op(1, put("x", "a"), written(version_of("a")), 0, 10),
            op(2, put("x", "b"), written(version_of("b")), 2, 12),
            op(3, get("x"), value(second, 2), 20, 21),
        ]);
    }
}

#[test]
fn touching_intervals_are_concurrent() {
    // Goal: intervals are closed, so an operation returning at the instant
    // another is called may still be ordered after it.
    assert_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 5),
        op(2, get("x"), Output::NotFound, 5, 6),
    ]);
}

#[test]
fn versioned_puts_with_mismatches_are_linearizable() {
    // Goal: PutIfVersion creates with version 0, fails with NoKey on a
    // missing key and VersionMismatch on a stale version, and of two
    // concurrent conditional writes on the same version only one wins.
    assert_linearizable(&[
        op(1, put_if_version("x", "a", 3), Output::NoKey, 0, 1),
        op(1, put_if_version("x", "a", 0), written(1), 2, 3),
        op(
            2,
            put_if_version("x", "b", 0),
            Output::VersionMismatch,
            4,
            5,
        ),
        op(
            1,
            put_if_version("x", "c", 1),
            Output::VersionMismatch,
            10,
            20,
        ),
        op(2, put_if_version("x", "d", 1), written(2), 12, 18),
        op(3, get("x"), value("d", 2), 21, 22),
    ]);
}

#[test]
fn concurrent_appends_are_linearizable() {
    // Goal: overlapping appends concatenate in some order that every read
    // agrees with.
    assert_linearizable(&[
        op(1, append("x", "1"), written(2), 0, 10),
        op(2, append("x", "2"), written(1), 1, 11),
        op(3, get("x"), value("2", 1), 2, 3),
        op(3, get("x"), value("21", 2), 12, 13),
        op(1, append("x", "3"), written(3), 14, 15),
        op(2, get("x"), value("213", 3), 16, 17),
    ]);
}

#[test]
fn delete_then_recreate_restarts_the_version() {
    // Goal: a delete removes the key and the next write creates it at 1.
    assert_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        op(1, put("x", "b"), written(2), 2, 3),
        op(2, delete("x"), deleted(true), 4, 5),
        op(2, append("x", "c"), written(1), 6, 7),
        op(1, get("x"), value("c", 1), 8, 9),
    ]);
}

#[test]
fn keys_are_independent() {
    // Goal: operations on different keys never constrain each other's
    // versions.
    assert_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        op(2, put("y", "a"), written(1), 0, 1),
        op(1, get("y"), value("a", 1), 2, 3),
        op(2, get("x"), value("a", 1), 2, 3),
    ]);
}

#[test]
fn unknown_write_that_applied_is_linearizable() {
    // Goal: a timed-out write may have taken effect; later reads see it.
    assert_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        unknown(2, put("x", "b"), 2, 3),
        op(3, get("x"), value("b", 2), 10, 11),
    ]);
}

#[test]
fn unknown_write_that_never_applied_is_linearizable() {
    // Goal: a timed-out write may never take effect, even when everything
    // after it contradicts it having happened.
    assert_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        unknown(2, delete("x"), 2, 3),
        op(3, get("x"), value("a", 1), 10, 11),
        op(3, put("x", "c"), written(2), 12, 13),
        op(1, get("x"), value("c", 2), 14, 15),
    ]);
}

#[test]
fn unknown_write_may_land_after_the_client_gave_up() {
    // Goal: an unknown operation's return time is +infinity: its effect may
    // appear after later reads, even reads by the same client.
    assert_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        unknown(2, append("x", "b"), 2, 3),
        op(2, get("x"), value("a", 1), 4, 5),
        op(3, get("x"), value("a", 1), 6, 7),
        op(3, get("x"), value("ab", 2), 20, 21),
    ]);
}

#[test]
fn unfinished_operations_never_applied_are_linearizable() {
    // Goal: many unknown operations that all never applied are accepted.
    let mut history = vec![op(1, put("x", "a"), written(1), 0, 1)];
    for client in 2..12 {
        history.push(unknown(client, put("x", "lost"), 2, 3));
    }
    history.push(op(1, get("x"), value("a", 1), 100, 101));
    assert_linearizable(&history);
}

// --------------------------------------------- known non-linearizable ones

#[test]
fn stale_read_after_completed_write_is_rejected() {
    // Goal: a read that starts after a write completed must see it.
    let blamed = assert_not_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        op(1, put("x", "b"), written(2), 2, 3),
        op(2, get("x"), value("a", 1), 4, 5),
    ]);
    assert_eq!(blamed, vec![2]);
}

#[test]
fn read_of_a_value_never_written_is_rejected() {
    // Goal: reads can only return values that some write produced.
    let blamed = assert_not_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 10),
        op(2, get("x"), value("z", 1), 0, 10),
    ]);
    assert_eq!(blamed, vec![1]);
}

#[test]
fn concurrent_appends_seen_in_inconsistent_orders_are_rejected() {
    // Goal: two readers may not disagree on the order of two appends.
    assert_not_linearizable(&[
        op(1, append("x", "1"), written(1), 0, 10),
        op(2, append("x", "2"), written(2), 0, 10),
        op(3, get("x"), value("12", 2), 11, 12),
        op(4, get("x"), value("21", 2), 11, 12),
    ]);
}

#[test]
fn version_going_backwards_is_rejected() {
    // Goal: without a delete, a later read never sees an older version.
    assert_not_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 1),
        op(2, put("x", "b"), written(2), 0, 10),
        op(3, get("x"), value("b", 2), 2, 3),
        op(3, get("x"), value("a", 1), 4, 5),
    ]);
}

#[test]
fn get_seeing_a_write_called_after_it_returned_is_rejected() {
    // Goal: a read cannot observe a write that started after the read ended.
    let blamed = assert_not_linearizable(&[
        op(1, get("x"), value("a", 1), 0, 5),
        op(2, put("x", "a"), written(1), 6, 10),
    ]);
    assert_eq!(blamed, vec![0]);
}

#[test]
fn lost_acknowledged_write_is_rejected() {
    // Goal: a write that was acknowledged cannot vanish from later reads.
    assert_not_linearizable(&[
        op(1, append("x", "a"), written(1), 0, 10),
        op(2, append("x", "b"), written(2), 0, 10),
        op(3, get("x"), value("b", 2), 11, 12),
    ]);
}

#[test]
fn duplicate_versions_are_rejected() {
    // Goal: two acknowledged creates cannot both get version 1 without a
    // delete in between (a write applied twice or lost).
    assert_not_linearizable(&[
        op(1, put("x", "a"), written(1), 0, 10),
        op(2, put("x", "b"), written(1), 0, 10),
    ]);
}

#[test]
fn unknown_write_cannot_act_before_its_call() {
    // Goal: an unknown operation may land at any time after its call, never
    // before it.
    assert_not_linearizable(&[
        op(1, get("x"), value("a", 1), 0, 5),
        unknown(2, put("x", "a"), 6, 7),
    ]);
}

#[test]
fn unknown_write_cannot_apply_twice() {
    // Goal: an unknown operation takes effect at most once.
    assert_not_linearizable(&[
        unknown(1, append("x", "a"), 0, 1),
        op(2, get("x"), value("a", 1), 10, 11),
        op(2, get("x"), value("aa", 2), 12, 13),
    ]);
}

#[test]
fn violation_on_one_key_is_found_among_linearizable_keys() {
    // Goal: partitioning by key still reports the key that fails.
    let history = [
        op(1, put("a", "1"), written(1), 0, 1),
        op(1, put("b", "1"), written(1), 2, 3),
        op(2, get("b"), Output::NotFound, 4, 5),
        op(2, get("a"), value("1", 1), 4, 5),
    ];
    match check_history(&history, STEPS_MAX_PER_KEY) {
        CheckOutcome::NotLinearizable {
            key, ops_involved, ..
        } => {
            assert_eq!(key, bytes("b"));
            assert_eq!(ops_involved, vec![2]);
        }
        other => panic!("expected a violation on key b, got {other}"),
    }
}

#[test]
fn budget_exhaustion_is_reported_not_guessed() {
    // Goal: a search that runs out of steps says so instead of passing or
    // failing.
    let history = [
        op(1, put("x", "a"), written(1), 0, 10),
        op(2, put("x", "b"), written(2), 0, 10),
        op(3, get("x"), value("b", 2), 11, 12),
    ];
    assert!(matches!(
        check_history(&history, 1),
        CheckOutcome::BudgetExhausted { steps_used: 1, .. }
    ));
    assert!(check_history(&history, STEPS_MAX_PER_KEY).is_linearizable());
}

// ------------------------------------------------------------- recorder

#[test]
fn recorder_with_logical_clock_records_pending_as_unknown() {
    // Goal: the recorder orders events by arrival and reports operations
    // still in flight as unknown.
    let recorder = HistoryRecorder::new();
    let first = recorder.begin(1, put("x", "a"));
    let pending = recorder.begin(2, put("x", "b"));
    recorder.end(first, written(1));
    let read = recorder.begin(1, get("x"));
    recorder.end(read, value("a", 1));
    let abandoned = recorder.begin(3, delete("x"));
    recorder.end_unknown(abandoned);
    let history = recorder.history();
    assert_eq!(history.len(), 4);
    assert_eq!(history[1].output, Output::Unknown);
    assert_eq!(history[3].output, Output::Unknown);
    assert!(history[0].return_time < history[2].call_time);
    assert!(recorder.check(STEPS_MAX_PER_KEY).is_linearizable());
    drop(pending);
}

#[test]
fn recorder_with_caller_clock_keeps_caller_times() {
    // Goal: begin_at/end_at store the caller's timestamps unchanged.
    let recorder = HistoryRecorder::new();
    let token = recorder.begin_at(7, put("x", "a"), 1_000);
    recorder.end_at(token, written(1), 2_000);
    let token = recorder.begin_at(7, get("x"), 2_000);
    recorder.end_unknown_at(token, 9_000);
    let history = recorder.history();
    assert_eq!(
        (history[0].call_time, history[0].return_time),
        (1_000, 2_000)
    );
    assert_eq!(history[1].output, Output::Unknown);
    assert!(recorder.check(STEPS_MAX_PER_KEY).is_linearizable());
}

#[test]
#[should_panic(expected = "must not mix")]
fn recorder_rejects_mixed_clocks() {
    // Goal: mixing the logical counter with caller times is a bug, caught.
    let recorder = HistoryRecorder::new();
    let token = recorder.begin(1, get("x"));
    recorder.end_at(token, Output::NotFound, 5);
}

#[test]
#[should_panic(expected = "before its call")]
fn recorder_rejects_return_before_call() {
    // Goal: a return time before the call time is a recording bug.
    let recorder = HistoryRecorder::new();
    let token = recorder.begin_at(1, get("x"), 10);
    recorder.end_at(token, Output::NotFound, 9);
}

#[test]
fn threads_sharing_a_locked_map_produce_linearizable_histories() {
    // Goal: real threads hitting a mutex-protected map, recorded through a
    // shared recorder, yield a history the checker accepts.
    let recorder = Arc::new(HistoryRecorder::new());
    let store = Arc::new(Mutex::new(ReferenceKv::default()));
    let threads: Vec<_> = (0..4u64)
        .map(|client| {
            let (recorder, store) = (Arc::clone(&recorder), Arc::clone(&store));
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(client);
                for index in 0..200 {
                    let input = random_input(&mut rng, 2, &format!("{client}.{index}"), 2);
                    let token = recorder.begin(client, input.clone());
                    let output = store.lock().unwrap().execute(&input);
                    recorder.end(token, output);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let outcome = recorder.check(STEPS_MAX_PER_KEY);
    assert!(outcome.is_linearizable(), "{outcome}");
}

// ------------------------------------ reference model and brute force

/// An independent implementation of the KV semantics (not the checker's
/// `apply`), so a shared bug cannot hide.
#[derive(Clone, Debug, Default)]
struct ReferenceKv {
    entries: HashMap<Bytes, (Vec<u8>, u64)>,
}

impl ReferenceKv {
    fn version(&self, key: &Bytes) -> u64 {
        self.entries.get(key).map_or(0, |entry| entry.1)
    }

    fn execute(&mut self, input: &Input) -> Output {
        let key = input.key().clone();
        let current = self.version(&key);
        match input {
            Input::Get { .. } => match self.entries.get(&key) {
                Some((text, version)) => Output::Value {
                    value: Bytes::from(text.clone()),
                    version: *version,
                },
                None => Output::NotFound,
            },
            Input::Put { value, .. } => {
                self.entries.insert(key, (value.to_vec(), current + 1));
                Output::Written {
                    version: current + 1,
                }
            }
            Input::PutIfVersion { value, version, .. } => {
                if *version != current {
                    return if current == 0 {
                        Output::NoKey
                    } else {
                        Output::VersionMismatch
                    };
                }
                self.entries.insert(key, (value.to_vec(), current + 1));
                Output::Written {
                    version: current + 1,
                }
            }
            Input::Append { value, .. } => {
                let entry = self.entries.entry(key).or_insert_with(|| (Vec::new(), 0));
                entry.0.extend_from_slice(value);
                entry.1 += 1;
                Output::Written { version: entry.1 }
            }
            Input::Delete { .. } => Output::Deleted {
                existed: self.entries.remove(&key).is_some(),
            },
        }
    }
}

/// Decides linearizability by trying every order that respects real time,
/// over all keys at once (no partitioning). Unknown operations may be
/// placed anywhere after their call or left out entirely, the literal
/// definition rather than the checker's "return at +infinity".
fn brute_force_linearizable(history: &[Operation]) -> bool {
    assert!(history.len() <= 16);
    fn search(history: &[Operation], placed: u32, kv: &ReferenceKv) -> bool {
        let known_remaining =
            (0..history.len()).any(|i| placed & (1 << i) == 0 && !history[i].is_unknown());
        if !known_remaining {
            return true;
        }
        for next in 0..history.len() {
            if placed & (1 << next) != 0 {
                continue;
            }
            // Every known operation that returned before `next` was called
            // must already be placed.
            let ready = (0..history.len()).all(|before| {
                placed & (1 << before) != 0
                    || history[before].is_unknown()
                    || history[before].return_time >= history[next].call_time
            });
            if !ready {
                continue;
            }
            let mut after = kv.clone();
            let output = after.execute(&history[next].input);
            if (history[next].is_unknown() || output == history[next].output)
                && search(history, placed | (1 << next), &after)
            {
                return true;
            }
        }
        false
    }
    search(history, 0, &ReferenceKv::default())
}

// ------------------------------------------------ history generation

fn key_name(index: usize) -> Bytes {
    bytes(&format!("k{index}"))
}

/// A random input on one of `keys` keys. `unique` is used as the value so
/// every written value can be told apart, unless `small_values` is non-zero,
/// in which case values come from a tiny alphabet to provoke coincidences.
fn random_input(rng: &mut ChaCha8Rng, keys: usize, unique: &str, small_values: usize) -> Input {
    let key = key_name(rng.random_range(0..keys));
    let value = if small_values > 0 {
        bytes(["a", "b", "c"][rng.random_range(0..small_values.min(3))])
    } else {
        bytes(unique)
    };
    match rng.random_range(0..10) {
        0..=2 => Input::Get { key },
        3..=4 => Input::Put { key, value },
        5..=6 => Input::PutIfVersion {
            key,
            value,
            version: rng.random_range(0..4),
        },
        7..=8 => Input::Append { key, value },
        _ => Input::Delete { key },
    }
}

struct SimulationConfig {
    clients: usize,
    ops_per_client: usize,
    keys: usize,
    /// Chance in percent that an operation's outcome is unknown.
    unknown_percent: u32,
    /// Most ticks between a call and its linearization point, and between
    /// that point and the return.
    latency_ticks_max: u64,
    /// See `random_input`.
    small_values: usize,
}

/// Runs clients against a correct KV and records what they see. Each
/// operation takes effect at a linearization point inside its interval;
/// unknown operations take effect there, later (even after the client gave
/// up), or never. The result is linearizable by construction.
fn simulate(rng: &mut ChaCha8Rng, config: &SimulationConfig) -> Vec<Operation> {
    let mut kv = ReferenceKv::default();
    let mut free_at = vec![0u64; config.clients];
    let mut left = vec![config.ops_per_client; config.clients];
    let mut delayed: Vec<Input> = Vec::new();
    let mut history = Vec::new();
    let mut now = 0u64;
    while left.iter().any(|&n| n > 0) {
        now += rng.random_range(1..=3);
        if !delayed.is_empty() && rng.random_ratio(1, 4) {
            let input = delayed.swap_remove(rng.random_range(0..delayed.len()));
            kv.execute(&input);
            continue;
        }
        let ready: Vec<usize> = (0..config.clients)
            .filter(|&c| left[c] > 0 && free_at[c] <= now)
            .collect();
        if ready.is_empty() {
            continue;
        }
        let client = ready[rng.random_range(0..ready.len())];
        left[client] -= 1;
        let mut input = random_input(
            rng,
            config.keys,
            &format!("{client}.{}", left[client]),
            config.small_values,
        );
        if let Input::PutIfVersion { key, version, .. } = &mut input {
            // Mostly the current version, as a read-modify-write would.
            if rng.random_bool(0.6) {
                *version = kv.version(key);
            }
        }
        let call_time = now
            .saturating_sub(rng.random_range(0..=config.latency_ticks_max))
            .max(free_at[client]);
        let return_time = now + rng.random_range(0..=config.latency_ticks_max);
        let output = if rng.random_ratio(config.unknown_percent, 100) {
            match rng.random_range(0..3) {
                0 => {}
                1 => {
                    kv.execute(&input);
                }
                _ => delayed.push(input.clone()),
            }
            Output::Unknown
        } else {
            kv.execute(&input)
        };
        free_at[client] = return_time + 1;
        history.push(Operation {
            client_id: client as u64,
            input,
            output,
            call_time,
            return_time,
        });
    }
    history
}

/// A random output of the shape `input` can produce.
fn random_output(rng: &mut ChaCha8Rng, input: &Input) -> Output {
    let version = rng.random_range(1..4);
    let text = ["a", "b", "c", "ab", "ba", "aa"][rng.random_range(0..6)];
    if rng.random_ratio(1, 10) {
        return Output::Unknown;
    }
    match input {
        Input::Get { .. } if rng.random_bool(0.3) => Output::NotFound,
        Input::Get { .. } => value(text, version),
        Input::Put { .. } | Input::Append { .. } => written(version),
        Input::PutIfVersion { .. } => match rng.random_range(0..4) {
            0 => Output::NoKey,
            1 => Output::VersionMismatch,
            _ => written(version),
        },
        Input::Delete { .. } => deleted(rng.random_bool(0.5)),
    }
}

/// The seeds a randomized test runs: `count` fixed ones, or the single
/// seed in `SHOAL_SEED`.
fn seeds(test_salt: u64, count: u64) -> Vec<u64> {
    match std::env::var("SHOAL_SEED") {
        Ok(text) => vec![text.parse().expect("SHOAL_SEED must be a u64")],
        Err(_) => (0..count)
            .map(|i| test_salt.wrapping_mul(1_000_003).wrapping_add(i))
            .collect(),
    }
}

// ----------------------------------------------------- randomized tests

#[test]
fn checker_agrees_with_brute_force_on_tiny_histories() {
    // Goal: on thousands of random histories of at most 7 operations, the
    // checker's verdict equals the brute force's (exhaustive, unpartitioned,
    // unknown operations omitted rather than postponed).
    let mut verdicts = BTreeMap::<&str, u64>::new();
    for seed in seeds(1, 20_000) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut history = if rng.random_bool(0.6) {
            // A linearizable history, corrupted half the time.
            let clients = rng.random_range(1..=3);
            let config = SimulationConfig {
                clients,
                ops_per_client: rng.random_range(1..=7 / clients),
                keys: rng.random_range(1..=2),
                unknown_percent: 20,
                latency_ticks_max: rng.random_range(0..=4),
                small_values: rng.random_range(1..=3),
            };
            simulate(&mut rng, &config)
        } else {
            // Arbitrary operations on a tight timeline: mostly illegal.
            (0..rng.random_range(1..=7))
                .map(|i| {
                    let keys = rng.random_range(1..=2);
                    let input = random_input(&mut rng, keys, "", 2);
                    let output = random_output(&mut rng, &input);
                    let call_time = rng.random_range(0..10);
                    let return_time = call_time + rng.random_range(0..5);
                    Operation {
                        client_id: i,
                        input,
                        output,
                        call_time,
                        return_time,
                    }
                })
                .collect()
        };
        if !history.is_empty() && rng.random_bool(0.5) {
            let victim = rng.random_range(0..history.len());
            history[victim].output = random_output(&mut rng, &history[victim].input);
        }
        assert!(history.len() <= 7);
        let expected = brute_force_linearizable(&history);
        let outcome = check_history(&history, STEPS_MAX_PER_KEY);
        assert!(
            !matches!(outcome, CheckOutcome::BudgetExhausted { .. }) && outcome.is_linearizable() == expected,
            "seed {seed} (replay with SHOAL_SEED={seed}): brute force says linearizable={expected}, \
             checker says {outcome}\nhistory: {history:#?}"
        );
        *verdicts
            .entry(if expected {
                "linearizable"
            } else {
                "not linearizable"
            })
            .or_default() += 1;
        let unknown = history.iter().any(Operation::is_unknown);
        *verdicts
            .entry(if unknown {
                "with unknown ops"
            } else {
                "without unknown ops"
            })
            .or_default() += 1;
    }
    println!("tiny histories cross-checked: {verdicts:?}");
    if std::env::var("SHOAL_SEED").is_err() {
        // Both verdicts must be well represented or the test proves little.
        for (class, count) in &verdicts {
            assert!(
                *count >= 2_000,
                "only {count} histories {class}: {verdicts:?}"
            );
        }
    }
}

fn medium_config(rng: &mut ChaCha8Rng) -> SimulationConfig {
    SimulationConfig {
        clients: rng.random_range(2..=8),
        ops_per_client: rng.random_range(5..=40),
        keys: rng.random_range(1..=4),
        unknown_percent: rng.random_range(0..=10),
        latency_ticks_max: rng.random_range(0..=12),
        small_values: 0,
    }
}

#[test]
fn simulated_linearizable_histories_are_accepted() {
    // Goal: every history produced by a correct KV, with random overlaps and
    // unknown outcomes (applied on time, late, or never), is accepted.
    for seed in seeds(2, 400) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = medium_config(&mut rng);
        let history = simulate(&mut rng, &config);
        let outcome = check_history(&history, STEPS_MAX_PER_KEY);
        assert!(
            outcome.is_linearizable(),
            "seed {seed} (replay with SHOAL_SEED={seed}): {outcome}\nhistory: {history:#?}"
        );
    }
}

/// Corrupts one read in a way no linearization can explain, or returns
/// `None` if the history has no suitable read. Values in simulated
/// histories are built from digits and dots, so a value with letters was
/// never written; and a read called after a write of version `w` returned,
/// with no delete of the key called before the read returned, must see the
/// key at version `w` or later.
fn corrupt_provably(rng: &mut ChaCha8Rng, history: &mut [Operation]) -> Option<usize> {
    let reads: Vec<usize> = (0..history.len())
        .filter(|&i| matches!(history[i].input, Input::Get { .. }) && !history[i].is_unknown())
        .collect();
    if reads.is_empty() {
        return None;
    }
    if rng.random_bool(0.5) {
        let read = reads[rng.random_range(0..reads.len())];
        let version = rng.random_range(1..5);
        history[read].output = value("never-written", version);
        return Some(read);
    }
    for &read in &reads {
        let key = history[read].input.key().clone();
        let delete_possible = history.iter().any(|other| {
            matches!(other.input, Input::Delete { .. })
                && *other.input.key() == key
                && other.call_time <= history[read].return_time
        });
        if delete_possible {
            continue;
        }
        let newest_completed = history
            .iter()
            .filter(|write| {
                *write.input.key() == key && write.return_time < history[read].call_time
            })
            .filter_map(|write| match write.output {
                Output::Written { version } => Some(version),
                _ => None,
            })
            .max();
        if let Some(version) = newest_completed {
            // For a value, the version alone is impossible.
            history[read].output = if version >= 2 && rng.random_bool(0.5) {
                value("stale", version - 1)
            } else {
                Output::NotFound
            };
            return Some(read);
        }
    }
    None
}

#[test]
fn provably_illegal_corruptions_are_rejected() {
    // Goal: a read changed to a never-written value or to a version older
    // than a write that completed before it is reported, and the report
    // names that read.
    let mut corrupted = 0;
    for seed in seeds(3, 400) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = medium_config(&mut rng);
        let mut history = simulate(&mut rng, &config);
        let Some(read) = corrupt_provably(&mut rng, &mut history) else {
            continue;
        };
        corrupted += 1;
        match check_history(&history, STEPS_MAX_PER_KEY) {
            CheckOutcome::NotLinearizable { ops_involved, .. } => assert!(
                !ops_involved.is_empty(),
                "seed {seed} (replay with SHOAL_SEED={seed}): violation blames nothing"
            ),
            other => panic!(
                "seed {seed} (replay with SHOAL_SEED={seed}): corrupted read {read} accepted: {other}\n\
                 history: {history:#?}"
            ),
        }
    }
    if std::env::var("SHOAL_SEED").is_err() {
        assert!(
            corrupted >= 200,
            "only {corrupted} histories could be corrupted"
        );
    }
}

#[test]
fn ten_clients_thousand_ops_twenty_keys_fit_the_budget() {
    // Goal: a realistic test-sized history (10 clients x 1000 operations
    // over 20 keys, 1% unknown) is decided well within the step budget.
    const STEPS_BUDGET_PER_KEY: u64 = 200_000;
    for seed in seeds(4, 3) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = SimulationConfig {
            clients: 10,
            ops_per_client: 1000,
            keys: 20,
            unknown_percent: 1,
            latency_ticks_max: 15,
            small_values: 0,
        };
        let mut history = simulate(&mut rng, &config);
        assert_eq!(history.len(), 10_000);
        let started = std::time::Instant::now();
        let outcome = check_history(&history, STEPS_BUDGET_PER_KEY);
        println!("seed {seed}: {outcome} in {:?}", started.elapsed());
        assert!(
            outcome.is_linearizable(),
            "seed {seed} (replay with SHOAL_SEED={seed}): {outcome}"
        );
        // And a corruption in so large a history is still found in budget.
        corrupt_provably(&mut rng, &mut history).expect("a 10k-op history has reads");
        let outcome = check_history(&history, STEPS_BUDGET_PER_KEY);
        assert!(
            outcome.is_violation(),
            "seed {seed} (replay with SHOAL_SEED={seed}): {outcome}"
        );
    }
}

#[test]
fn many_unknown_writes_never_turn_a_violation_into_a_pass() {
    // Goal: where unknown outcomes make disproof expensive (20% unknown,
    // long overlaps), a small budget may end in "no verdict" but never in
    // a false "linearizable".
    const STEPS_BUDGET_PER_KEY: u64 = 20_000;
    let mut verdicts = BTreeMap::<&str, u64>::new();
    for seed in seeds(5, 20) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let config = SimulationConfig {
            clients: 8,
            ops_per_client: 100,
            keys: 2,
            unknown_percent: 20,
            latency_ticks_max: 30,
            small_values: 0,
        };
        let mut history = simulate(&mut rng, &config);
        if corrupt_provably(&mut rng, &mut history).is_none() {
            continue;
        }
        let outcome = check_history(&history, STEPS_BUDGET_PER_KEY);
        assert!(
            !outcome.is_linearizable(),
            "seed {seed} (replay with SHOAL_SEED={seed}): corruption accepted"
        );
        *verdicts
            .entry(if outcome.is_violation() {
                "violation"
            } else {
                "no verdict"
            })
            .or_default() += 1;
    }
    println!("heavily unknown, corrupted histories: {verdicts:?}");
    if std::env::var("SHOAL_SEED").is_err() {
        assert!(
            verdicts.values().sum::<u64>() >= 5,
            "too few corruptible histories: {verdicts:?}"
        );
    }
}
