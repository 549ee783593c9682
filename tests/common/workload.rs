//! Concurrent clients against a real cluster, recording a history for the
//! linearizability checker, and the end-of-test checks every crash test
//! shares: each acknowledged append is in its key's value exactly once, an
//! append whose outcome is unknown at most once, and the whole history
//! (final reads included) is linearizable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal::cluster::{BlockingClient, ClientError, ClientOptions};
use shoal_shard::linearizability::{HistoryRecorder, Input, Output};

use super::{wait_for, Cluster};

/// The seed of a randomized test: `SHOAL_SEED` if set (a replay), else
/// random. Print it first thing.
pub fn seed() -> u64 {
    match std::env::var("SHOAL_SEED") {
        Ok(s) => s.parse().expect("SHOAL_SEED must be a number"),
        Err(_) => rand::rng().random(),
    }
}

/// Runs `test(seed)`; on failure prints how to replay it, then fails.
pub fn with_seed(name: &str, test: impl FnOnce(u64) + std::panic::UnwindSafe) {
    let seed = seed();
    eprintln!("{name}: SHOAL_SEED={seed}");
    if let Err(e) = std::panic::catch_unwind(|| test(seed)) {
        eprintln!("{name} FAILED: replay with SHOAL_SEED={seed}");
        std::panic::resume_unwind(e);
    }
}

/// The shape of a workload.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Concurrent clients (threads, each with its own session).
    pub clients: u64,
    /// Keys appended to (`a0`, `a1`, ...). Each append rewrites the whole
    /// value, and a follower that catches up applies many entries in one
    /// engine write, so few keys with long values would make that write
    /// grow quadratically.
    pub append_keys: u64,
    /// Keys for puts and conditional puts (`p0`, ...). Few keys make
    /// conflicts, but every write of unknown outcome on a key widens the
    /// checker's search, so not too few.
    pub put_keys: u64,
    /// Deadline of one client operation, retries included.
    pub op_deadline: Duration,
    /// Deadline of one attempt at one node.
    pub rpc_deadline: Duration,
    /// A sharded cluster: its controller group's nodes, so that every
    /// client (the final reader too) routes by key. `None`: one KV group.
    pub controller: Option<Vec<u64>>,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            clients: 3,
            append_keys: 8,
            put_keys: 2,
            op_deadline: Duration::from_secs(5),
            rpc_deadline: Duration::from_millis(500),
            controller: None,
        }
    }
}

impl WorkloadConfig {
    /// Every key the clients use: the append keys `a*`, then the put keys
    /// `p*`.
    pub fn keys(&self) -> Vec<String> {
        let appends = (0..self.append_keys).map(|i| format!("a{i}"));
        appends
            .chain((0..self.put_keys).map(|i| format!("p{i}")))
            .collect()
    }
}

/// (key, token) of appends.
type Tokens = Vec<(String, String)>;

/// Clients running in threads until [`Workload::finish`].
pub struct Workload {
    config: WorkloadConfig,
    history: Arc<HistoryRecorder>,
    acked_ops: Arc<AtomicU64>,
    unknown_ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<(Tokens, Tokens)>>,
}

/// What [`Workload::finish`] checked.
#[derive(Debug)]
pub struct Summary {
    /// Operations in the history.
    pub operations: usize,
    /// Appends acknowledged.
    pub appends_acked: usize,
    /// Appends of unknown outcome.
    pub appends_unknown: usize,
}

impl Workload {
    /// Starts `config.clients` clients against `cluster`.
    pub fn start(cluster: &Cluster, config: WorkloadConfig, seed: u64) -> Workload {
        let history = Arc::new(HistoryRecorder::new());
        let acked_ops = Arc::new(AtomicU64::new(0));
        let unknown_ops = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (1..=config.clients)
            .map(|id| {
                let worker = ClientLoop {
                    client_id: id,
                    members: cluster.members.clone(),
                    tls: cluster.tls.clone(),
                    seed,
                    config: config.clone(),
                    history: history.clone(),
                    acked_ops: acked_ops.clone(),
                    unknown_ops: unknown_ops.clone(),
                    stop: stop.clone(),
                };
                std::thread::spawn(move || worker.run())
            })
            .collect();
        Workload {
            config,
            history,
            acked_ops,
            unknown_ops,
            stop,
            clients,
        }
    }

    /// The workload's shape.
    pub fn config(&self) -> &WorkloadConfig {
        &self.config
    }

    /// Operations that ended with an unknown outcome (deadline) so far.
    pub fn unknown_ops(&self) -> u64 {
        self.unknown_ops.load(Ordering::Relaxed)
    }

    /// Operations completed with a known outcome so far.
    pub fn acked_ops(&self) -> u64 {
        self.acked_ops.load(Ordering::Relaxed)
    }

    /// Waits until `ops` more operations complete with a known outcome
    /// (progress, not time); panics after `timeout`.
    pub fn wait_progress(&self, what: &str, ops: u64, timeout: Duration) {
        let from = self.acked_ops();
        wait_for(what, timeout, || self.acked_ops() >= from + ops);
    }

    /// Stops the clients, reads every append key once more (recorded in the
    /// history too), and checks: every acknowledged append present exactly
    /// once, every unknown one at most once, the history linearizable.
    /// The cluster must be able to serve.
    pub fn finish(self, cluster: &Cluster, timeout: Duration) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        let mut unknown = Vec::new();
        for client in self.clients {
            let (a, u) = client.join().expect("client thread");
            acked.extend(a);
            unknown.extend(u);
        }
        let options = ClientOptions {
            op_deadline: timeout,
            controller: self.config.controller.clone(),
            ..ClientOptions::default()
        };
        let reader =
            BlockingClient::connect_with(&cluster.members, &cluster.tls, options).expect("client");
        for key in (0..self.config.append_keys).map(|i| format!("a{i}")) {
            let op = self.history.begin(
                0,
                Input::Get {
                    key: Bytes::from(key.clone()),
                },
            );
            let value = match reader.get(key.clone()) {
                Ok(v) => {
                    self.history.end(
                        op,
                        Output::Value {
                            value: v.value.clone(),
                            version: v.version,
                        },
                    );
                    String::from_utf8(v.value.to_vec()).expect("utf-8")
                }
                Err(ClientError::NotFound) => {
                    self.history.end(op, Output::NotFound);
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
        let operations = self.history.history().len();
        eprintln!(
            "{operations} operations ({} appends acknowledged, {} unknown)",
            acked.len(),
            unknown.len()
        );
        assert!(!acked.is_empty(), "no append was ever acknowledged");
        let outcome = self.history.check(10_000_000);
        assert!(
            outcome.is_linearizable(),
            "history is not linearizable: {outcome}"
        );
        Summary {
            operations,
            appends_acked: acked.len(),
            appends_unknown: unknown.len(),
        }
    }
}

/// Maps a client result to the checker's output.
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

/// One client's loop.
struct ClientLoop {
    client_id: u64,
    members: Vec<(u64, std::net::SocketAddr)>,
    tls: PathBuf,
    seed: u64,
    config: WorkloadConfig,
    history: Arc<HistoryRecorder>,
    acked_ops: Arc<AtomicU64>,
    unknown_ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl ClientLoop {
    /// Random operations on a few shared keys until `stop`. Appends carry
    /// unique tokens `<client>.<n>;` and go to `a*` keys only; puts and
    /// conditional puts go to `p*` keys. Returns the tokens whose appends
    /// were acknowledged and those whose outcome is unknown.
    fn run(self) -> (Tokens, Tokens) {
        let options = ClientOptions {
            op_deadline: self.config.op_deadline,
            rpc_deadline: self.config.rpc_deadline,
            controller: self.config.controller.clone(),
            ..ClientOptions::default()
        };
        let client =
            BlockingClient::connect_with(&self.members, &self.tls, options).expect("client");
        let history = &self.history;
        let client_id = self.client_id;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ client_id);
        let (mut acked, mut unknown) = (Vec::new(), Vec::new());
        let append_key =
            |rng: &mut ChaCha8Rng| format!("a{}", rng.random_range(0..self.config.append_keys));
        let put_key =
            |rng: &mut ChaCha8Rng| format!("p{}", rng.random_range(0..self.config.put_keys));
        let mut n = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            n += 1;
            let roll = rng.random_range(0..100);
            let output = if roll < 35 {
                let key = append_key(&mut rng);
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
                let key = put_key(&mut rng);
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
                let key = put_key(&mut rng);
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
                    append_key(&mut rng)
                } else {
                    put_key(&mut rng)
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
            if output == Output::Unknown {
                self.unknown_ops.fetch_add(1, Ordering::Relaxed);
            } else {
                self.acked_ops.fetch_add(1, Ordering::Relaxed);
            }
        }
        client.close();
        (acked, unknown)
    }
}
