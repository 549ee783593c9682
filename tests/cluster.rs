//! Goal: a real cluster survives crashes without losing an acknowledged
//! write or breaking linearizability. Three `shoal node` processes on
//! loopback (QUIC with mutual TLS, RocksDB on disk); concurrent clients
//! record a history; the leader and random nodes are SIGKILLed several
//! times and restarted. At the end every acknowledged append is in its
//! key's value exactly once (an unknown one at most once), and the whole
//! history is linearizable (`shoal_shard::linearizability`).
//!
//! Every wait polls a condition with a deadline; nothing sleeps a fixed
//! time. Kill choices come from a seed printed on failure
//! (`SHOAL_SEED=<n>` replays the choices; timing still varies).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{wait_for, Cluster};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal::cluster::{BlockingClient, ClientError, ClientOptions};
use shoal_shard::linearizability::{HistoryRecorder, Input, Output};

const CLIENTS: u64 = 3;
const KILL_ROUNDS: u64 = 6;
/// Acknowledged operations required between faults (progress, not time).
const OPS_BETWEEN_FAULTS: u64 = 15;
/// Keys appended to. Each append rewrites the whole value, and a follower
/// that catches up applies many entries in one engine write, so few keys
/// with long values would make that write grow quadratically (see the report
/// on the node's unbounded apply batches).
const APPEND_KEYS: u64 = 8;
const WAIT: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    match std::env::var("SHOAL_SEED") {
        Ok(s) => s.parse().expect("SHOAL_SEED must be a number"),
        Err(_) => rand::rng().random(),
    }
}

/// (key, token) of appends.
type Tokens = Vec<(String, String)>;

fn output_of<T>(result: Result<T, ClientError>, ok: impl FnOnce(T) -> Output) -> Output {
    match result {
        Ok(t) => ok(t),
        Err(ClientError::NotFound) => Output::NotFound,
        Err(ClientError::VersionMismatch { .. }) => Output::VersionMismatch,
        Err(ClientError::NoKey) => Output::NoKey,
        Err(ClientError::Maybe | ClientError::Timeout) => Output::Unknown,
        Err(e) => panic!("unexpected client error: {e}"),
    }
}

/// One client's loop: random operations on a few shared keys until `stop`.
/// Appends carry unique tokens `<client>.<n>;` and go to `a*` keys only;
/// puts and conditional puts go to `p*` keys. Returns the tokens whose
/// appends were acknowledged and those whose outcome is unknown.
fn client_loop(
    client_id: u64,
    cluster: String,
    tls: std::path::PathBuf,
    seed: u64,
    history: Arc<HistoryRecorder>,
    acked_ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (Tokens, Tokens) {
    let members = shoal::cluster::parse_members(&cluster).expect("members");
    let options = ClientOptions {
        op_deadline: Duration::from_secs(5),
        rpc_deadline: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let client = BlockingClient::connect_with(&members, &tls, options).expect("client");
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ client_id);
    let (mut acked, mut unknown) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let roll = rng.random_range(0..100);
        let output = if roll < 35 {
            let key = format!("a{}", rng.random_range(0..APPEND_KEYS));
            let token = format!("{client_id}.{n};");
            let op = history.begin(
                client_id,
                Input::Append {
                    key: Bytes::from(key.clone()),
                    value: Bytes::from(token.clone()),
                },
            );
            let out = output_of(client.append(key.clone(), token.clone()), |version| {
                Output::Written { version }
            });
            match out {
                Output::Written { .. } => acked.push((key, token)),
                _ => unknown.push((key, token)),
            }
            history.end(op, out.clone());
            out
        } else if roll < 55 {
            let key = format!("p{}", rng.random_range(0..2));
            let value = format!("{client_id}.{n}");
            let op = history.begin(
                client_id,
                Input::Put {
                    key: Bytes::from(key.clone()),
                    value: Bytes::from(value.clone()),
                },
            );
            let out = output_of(client.put(key, value), |version| Output::Written {
                version,
            });
            history.end(op, out.clone());
            out
        } else if roll < 70 {
            let key = format!("p{}", rng.random_range(0..2));
            let value = format!("{client_id}.{n}");
            let version = rng.random_range(0..6);
            let op = history.begin(
                client_id,
                Input::PutIfVersion {
                    key: Bytes::from(key.clone()),
                    value: Bytes::from(value.clone()),
                    version,
                },
            );
            let out = output_of(client.put_if_version(key, value, version), |version| {
                Output::Written { version }
            });
            history.end(op, out.clone());
            out
        } else {
            let key = if rng.random_bool(0.5) {
                format!("a{}", rng.random_range(0..APPEND_KEYS))
            } else {
                format!("p{}", rng.random_range(0..2))
            };
            let op = history.begin(
                client_id,
                Input::Get {
                    key: Bytes::from(key.clone()),
                },
            );
            let out = output_of(client.get(key), |v| Output::Value {
                value: v.value,
                version: v.version,
            });
            history.end(op, out.clone());
            out
        };
        if output != Output::Unknown {
            acked_ops.fetch_add(1, Ordering::Relaxed);
        }
    }
    client.close();
    (acked, unknown)
}

#[test]
fn sigkill_leader_and_random_nodes_linearizable() {
    let seed = seed();
    eprintln!("sigkill_leader_and_random_nodes_linearizable: SHOAL_SEED={seed}");
    let result = std::panic::catch_unwind(|| run(seed));
    if let Err(e) = result {
        eprintln!("FAILED: replay with SHOAL_SEED={seed}");
        std::panic::resume_unwind(e);
    }
}

fn run(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    cluster.wait_for_leader(WAIT);

    let history = Arc::new(HistoryRecorder::new());
    let acked_ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|id| {
            let (cluster, tls, history, acked_ops, stop) = (
                cluster.cluster_arg(),
                cluster.tls.clone(),
                history.clone(),
                acked_ops.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                client_loop(id, cluster, tls, seed, history, acked_ops, stop)
            })
        })
        .collect();
    let progress = |from: u64| {
        let acked_ops = acked_ops.clone();
        move || acked_ops.load(Ordering::Relaxed) >= from + OPS_BETWEEN_FAULTS
    };

    for round in 0..KILL_ROUNDS {
        wait_for(
            "progress before a fault",
            WAIT,
            progress(acked_ops.load(Ordering::Relaxed)),
        );
        let victim = if round % 2 == 0 {
            cluster.wait_for_leader(WAIT)
        } else {
            rng.random_range(1..=3)
        };
        eprintln!("round {round}: SIGKILL node {victim}");
        cluster.kill(victim);
        // The other two must keep serving.
        wait_for(
            "progress with a node down",
            WAIT,
            progress(acked_ops.load(Ordering::Relaxed)),
        );
        cluster.start_node(victim);
        // Wait until the restarted node has caught up, so the next kill
        // never takes down a majority's only copy.
        // (Under load the leader's commit index moves on; what was committed
        // when the node came back is the target.)
        let leader = cluster.wait_for_leader(WAIT);
        let target = cluster.status(leader).map_or(0, |s| s.commit);
        wait_for("the restarted node to catch up", WAIT, || {
            cluster.status(victim).is_some_and(|s| s.applied >= target)
        });
    }
    wait_for(
        "progress after the last fault",
        WAIT,
        progress(acked_ops.load(Ordering::Relaxed)),
    );
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    for client in clients {
        let (a, u) = client.join().expect("client thread");
        acked.extend(a);
        unknown.extend(u);
    }

    // Final reads, recorded too.
    let members = shoal::cluster::parse_members(&cluster.cluster_arg()).expect("members");
    let reader = BlockingClient::connect(&members, &cluster.tls).expect("client");
    for key in (0..APPEND_KEYS).map(|i| format!("a{i}")) {
        let op = history.begin(
            0,
            Input::Get {
                key: Bytes::from(key.clone()),
            },
        );
        let value = match reader.get(key.clone()) {
            Ok(v) => {
                history.end(
                    op,
                    Output::Value {
                        value: v.value.clone(),
                        version: v.version,
                    },
                );
                String::from_utf8(v.value.to_vec()).expect("utf-8")
            }
            Err(ClientError::NotFound) => {
                history.end(op, Output::NotFound);
                String::new()
            }
            Err(e) => panic!("final read of {key}: {e}"),
        };
        for (k, token) in &acked {
            if *k == key {
                assert_eq!(
                    value.matches(token.as_str()).count(),
                    1,
                    "acknowledged append {token} to {key} is not there exactly once"
                );
            }
        }
        for (k, token) in &unknown {
            if *k == key {
                assert!(
                    value.matches(token.as_str()).count() <= 1,
                    "append {token} to {key} applied twice"
                );
            }
        }
    }
    reader.close();
    let ops = history.history();
    eprintln!(
        "{} operations ({} appends acknowledged, {} unknown)",
        ops.len(),
        acked.len(),
        unknown.len()
    );
    assert!(!acked.is_empty());
    let outcome = history.check(10_000_000);
    assert!(
        outcome.is_linearizable(),
        "history is not linearizable: {outcome}"
    );
}
