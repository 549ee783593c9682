//! The MapReduce runtime (`mapreduce::runtime`: coordinator, workers, run
//! fetches) under faults, on the in-memory networks and tokio's paused
//! clock, seeded (`SHOAL_SEED` replays one seed, `SHOAL_SEEDS` sweeps
//! more): the job's network drops, delays and reorders requests and
//! replies, workers crash (their task aborted, their node removed) and
//! come back with a new incarnation and the same directory, some come back
//! with an empty directory (their runs gone), and the database is a 3-node
//! Raft group on an unreliable network. The output must equal the
//! sequential run, and the coordinator must not declare the job done
//! before every partition's output is written.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, ELECTION_TIMEOUT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_net::mem::{MemConfig, MemNetwork};
use shoal_net::NodeId;
use shoal_shard::mapreduce::runtime::{
    builtin_apps, coordinate, plan_job, work, ClientFactory, JobOptions, WorkerOptions,
};
use shoal_shard::mapreduce::wire::{JobProgress, MrProtocol, WorkerHello};
use shoal_shard::mapreduce::{app_by_name, run_sequential, JobConfig, JobSpec, KeyRange};
use tokio::task::JoinHandle;

const WORKERS: u64 = 3;
const COORDINATOR: NodeId = NodeId(100);

fn documents(rng: &mut ChaCha8Rng) -> BTreeMap<Bytes, Bytes> {
    const WORDS: &[&str] = &[
        "alpha", "beta", "gamma", "delta", "raft", "shard", "log", "quorum", "leader", "term",
    ];
    (0..24)
        .map(|i| {
            let text: Vec<&str> = (0..rng.random_range(5..60))
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            (
                Bytes::from(format!("doc/{i:03}")),
                Bytes::from(text.join(" ")),
            )
        })
        .collect()
}

fn start_worker(
    net: &MemNetwork<MrProtocol>,
    id: u64,
    incarnation: u32,
    dir: &Path,
    clients: &ClientFactory<shoal_net::mem::MemClient<shoal_shard::protocol::KvProtocol>>,
) -> JoinHandle<()> {
    let (node, inbox) = net.add_node(NodeId(id));
    let options = WorkerOptions {
        hello: WorkerHello {
            node: NodeId(id),
            incarnation,
            addr: None,
        },
        coordinator: COORDINATOR,
        dir: dir.join(format!("worker-{id}")),
        out_dir: dir.to_path_buf(),
        coordinator_silence_ms: 60_000,
    };
    let clients = clients.clone();
    tokio::spawn(async move {
        let _ = work(node, inbox, clients, builtin_apps(), options).await;
    })
}

async fn run_one(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cluster = Cluster::new(3, false, seed);
    cluster.wait_for_leader(ELECTION_TIMEOUT * 10).await;
    let data = documents(&mut rng);
    let loader = cluster.client();
    for (k, v) in &data {
        loader.put(k.clone(), v.clone()).await.expect("load");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut net_config = MemConfig::with_seed(seed);
    net_config.files_dir = tmp.path().join("net");
    let net = MemNetwork::<MrProtocol>::new(net_config);
    net.set_reliable(false);
    let clients: ClientFactory<_> = {
        let net = cluster.net.clone();
        let ids = cluster.ids();
        let base = cluster.client_config();
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        Arc::new(move || {
            let mut config = base.clone();
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            config.client_id = (base.client_id ^ (n << 40)).max(1);
            let name = format!("mr-{}", config.client_id);
            shoal_shard::Client::new(net.add_client(&name), ids.clone(), config)
        })
    };
    let options = JobOptions {
        name: "sim".into(),
        app: "wc".into(),
        spec: JobSpec {
            input: KeyRange::prefix(b"doc/"),
            output_prefix: b"out/".to_vec(),
            reduce_count: 4,
        },
        config: JobConfig::default(),
        split_bytes: 200,
        write_files: false,
    };
    plan_job(&clients(), &options, &builtin_apps())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: planning: {e}"));
    let (coordinator_node, coordinator_inbox) = net.add_node(COORDINATOR);
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(JobProgress::default());
    let coordinator = tokio::spawn(coordinate(
        coordinator_node,
        coordinator_inbox,
        clients(),
        "sim",
        progress_tx,
    ));
    let mut workers: Vec<JoinHandle<()>> = (1..=WORKERS)
        .map(|w| start_worker(&net, w, 1, tmp.path(), &clients))
        .collect();
    let mut incarnation = 1;
    // Crash and restart workers at random until the job ends.
    while !coordinator.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..8_000))).await;
        if coordinator.is_finished() {
            break;
        }
        let w = rng.random_range(0..WORKERS as usize);
        workers[w].abort();
        net.remove_node(NodeId(w as u64 + 1));
        let dir = tmp.path().join(format!("worker-{}", w + 1));
        if rng.random_bool(0.25) {
            // Its disk is gone too.
            let _ = std::fs::remove_dir_all(&dir);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..2_000))).await;
        incarnation += 1;
        workers[w] = start_worker(&net, w as u64 + 1, incarnation, tmp.path(), &clients);
        // No answer to anything leaves it waiting forever: a bound.
        assert!(
            progress_rx.borrow().attempts < 2_000,
            "seed {seed}: the job does not converge"
        );
    }
    let outcome = coordinator.await.expect("the coordinator task");
    if outcome.is_err() {
        let (record, _) = shoal_shard::mapreduce::runtime::load_job(&clients(), "sim")
            .await
            .expect("the job record");
        for p in 0..4 {
            let task = shoal_shard::mapreduce::TaskRef::Reduce(p);
            eprintln!("{task}: {:?}", record.table.attempts(task));
        }
    }
    let progress = outcome.unwrap_or_else(|e| panic!("seed {seed}: the job failed: {e}"));
    assert!(progress.finished);
    // Done means every output is written: read it back at once.
    let reader = cluster.client();
    let got: BTreeMap<Vec<u8>, Vec<u8>> = reader
        .scan("out/", "out0", 100_000)
        .await
        .expect("scan the output")
        .into_iter()
        .map(|(k, v)| (k[4..].to_vec(), v.value.to_vec()))
        .collect();
    let wc = app_by_name("wc").unwrap();
    assert_eq!(
        got,
        run_sequential(wc.as_ref(), data.iter()),
        "seed {seed}: output differs from the sequential run"
    );
    for w in workers {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn job_survives_lossy_network_and_worker_crashes() {
    for seed in common::seeds_or("job_survives_lossy_network_and_worker_crashes", 4) {
        run_one(seed).await;
    }
}
