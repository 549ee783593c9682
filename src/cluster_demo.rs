//! `shoal demo`: a 3-node cluster of real `shoal node` processes on
//! loopback, a write/read workload, the leader SIGKILLed mid-workload,
//! service continuing under a new leader, the killed node restarted and
//! caught up, and a final check that no acknowledged write was lost.
//!
//! Every child is killed when the demo ends, on success, error or panic
//! ([`LocalCluster`]'s `Drop`); the node processes also get the terminal's SIGINT
//! on Ctrl-C and shut down gracefully.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use shoal::cluster::{BlockingClient, ClientError, ClientOptions};
use shoal::local_cluster::{wait_for, LocalCluster};

/// Nodes in the demo cluster.
const NODES: u64 = 3;
/// Keys written before the leader is killed, and after.
const WRITES_PER_PHASE: u64 = 300;
/// Longest wait for any cluster condition (leader, catch-up, exit).
const WAIT_MAX: Duration = Duration::from_secs(30);

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "  {what:<22} {{bar:30}} {{pos:>4}}/{{len}}  {{msg}}"
        ))
        .expect("static template"),
    );
    bar
}

/// Writes `keys`; records acknowledged values in `acked` and writes whose
/// outcome is unknown in `unknown`. Returns the longest single write.
fn write_phase(
    client: &BlockingClient,
    keys: std::ops::Range<u64>,
    what: &str,
    acked: &mut BTreeMap<String, String>,
    unknown: &mut Vec<String>,
) -> Result<Duration> {
    let bar = bar(keys.end - keys.start, what);
    let mut slowest = Duration::ZERO;
    for i in keys {
        let (key, value) = (format!("key-{i:05}"), format!("value-{i}"));
        let started = Instant::now();
        match client.put(key.clone(), value.clone()) {
            Ok(_) => {
                acked.insert(key, value);
            }
            Err(ClientError::Maybe | ClientError::Timeout) => unknown.push(key),
            Err(e) => bail!("put {key}: {e}"),
        }
        slowest = slowest.max(started.elapsed());
        bar.inc(1);
        bar.set_message(format!("slowest write {} ms", slowest.as_millis()));
    }
    bar.finish();
    Ok(slowest)
}

/// Reads every acknowledged key back (linearizable reads through the
/// leader); returns how many matched.
fn verify(client: &BlockingClient, acked: &BTreeMap<String, String>, what: &str) -> Result<u64> {
    let bar = bar(acked.len() as u64, what);
    let mut ok = 0;
    for (key, value) in acked {
        let got = client
            .get(key.clone())
            .with_context(|| format!("reading {key}"))?;
        if got.value != value.as_bytes() {
            bail!(
                "{key}: acknowledged {value:?}, read {:?}",
                String::from_utf8_lossy(&got.value)
            );
        }
        ok += 1;
        bar.inc(1);
    }
    bar.finish();
    Ok(ok)
}

/// Runs the cluster demo with its data under `dir` (wiped first).
pub fn run(dir: &Path) -> Result<()> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let mut nodes = LocalCluster::create(&std::env::current_exe()?, &dir, NODES, &[])?;
    let members = nodes.members().to_vec();
    let tls = nodes.tls_dir().to_path_buf();
    println!("Shoal cluster demo: {NODES} `shoal node` processes on loopback (QUIC + mutual TLS, RocksDB), data in {}", dir.display());
    println!(
        "  certificates in {}; cluster {}",
        tls.display(),
        nodes.cluster_arg()
    );
    nodes.start_all()?;
    let first = nodes.wait_for_leader(WAIT_MAX)?;
    println!("  node {} leads (term {})\n", first.id, first.term);

    let options = ClientOptions {
        op_deadline: Duration::from_secs(20),
        rpc_deadline: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let client = BlockingClient::connect_with(&members, &tls, options)?;
    let mut acked = BTreeMap::new();
    let mut unknown = Vec::new();
    write_phase(
        &client,
        0..WRITES_PER_PHASE,
        "writing",
        &mut acked,
        &mut unknown,
    )?;
    verify(&client, &acked, "reading back")?;

    let victim = nodes.leader().context("no leader")?;
    nodes.kill(victim.id)?;
    println!(
        "\nSIGKILL node {} (the leader, term {}); the workload goes on:",
        victim.id, victim.term
    );
    let failover_write = write_phase(
        &client,
        WRITES_PER_PHASE..2 * WRITES_PER_PHASE,
        "writing",
        &mut acked,
        &mut unknown,
    )?;
    let second = nodes.wait_for_leader(WAIT_MAX)?;
    println!(
        "  node {} leads now (term {}); the slowest write across the failover took {} ms",
        second.id,
        second.term,
        failover_write.as_millis()
    );

    println!(
        "\nRestarting node {}; it catches up from its own disk and the leader:",
        victim.id
    );
    nodes.start(victim.id)?;
    let catch_up_started = Instant::now();
    let (caught, target) = wait_for("the restarted node to catch up", WAIT_MAX, || {
        let leader = nodes.leader()?;
        let restarted = nodes.status(victim.id)?;
        (restarted.applied >= leader.commit && leader.commit > 0)
            .then_some((restarted.applied, leader.commit))
    })?;
    println!(
        "  node {} applied index {caught} >= leader's commit index {target} after {} ms",
        victim.id,
        catch_up_started.elapsed().as_millis()
    );

    // Prove the restarted node holds the data: with the new leader killed,
    // any quorum must include it.
    let second_victim = nodes.leader().context("no leader")?;
    nodes.kill(second_victim.id)?;
    println!(
        "\nSIGKILL node {} (the new leader): now node {} is part of every quorum.",
        second_victim.id, victim.id
    );
    let third = nodes.wait_for_leader(WAIT_MAX)?;
    println!(
        "  node {} leads (term {}); every write now needs node {}'s disk:",
        third.id, third.term, victim.id
    );
    write_phase(
        &client,
        2 * WRITES_PER_PHASE..2 * WRITES_PER_PHASE + WRITES_PER_PHASE / 3,
        "writing",
        &mut acked,
        &mut unknown,
    )?;
    let verified = verify(&client, &acked, "verifying all writes")?;
    nodes.start(second_victim.id)?;
    nodes.wait_caught_up(WAIT_MAX)?;
    client.close();
    nodes.stop_all(WAIT_MAX)?;

    println!("\nSummary");
    println!("  writes acknowledged:           {}", acked.len());
    println!("  writes with unknown outcome:   {}", unknown.len());
    println!(
        "  leaders:                       node {} -> SIGKILL -> node {} -> SIGKILL -> node {}",
        first.id, second.id, third.id
    );
    println!(
        "  restarted node {} caught up:    applied {caught} >= commit {target}",
        victim.id
    );
    println!(
        "  acknowledged writes read back: {verified}/{} — none lost",
        acked.len()
    );
    println!(
        "  total time:                    {:.1} s; node logs and data in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    run_sharded(&dir.join("sharded"))
}

/// Shards in the sharded part of the demo.
const DEMO_SHARDS: u32 = 16;

/// The sharded part: six nodes, the controller group on nodes 1-3, group
/// 1 on nodes 1-3 serving every shard; a writer keeps writing while group
/// 2 (nodes 4-6) joins, a shard moves back, and group 1 leaves; every
/// acknowledged write is read back.
fn run_sharded(dir: &Path) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    println!("\nSharding: six nodes, a controller group (nodes 1-3) and replica groups; shards move while a writer writes");
    std::fs::create_dir_all(dir)?;
    let mut nodes = LocalCluster::create(
        &std::env::current_exe()?,
        dir,
        6,
        &["--controller", "1,2,3"],
    )?;
    nodes.start_all()?;
    let members = nodes.members().to_vec();
    let tls = nodes.tls_dir().to_path_buf();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin = runtime.block_on(async {
        shoal::sharding::Admin::connect(&members, &[1, 2, 3], &tls, Duration::from_secs(60))
    })?;
    let count =
        |config: &shoal_shard::controller::ShardConfig, group: u64| config.shards_of(group).len();
    let config = runtime.block_on(admin.init(DEMO_SHARDS, 1, &[1, 2, 3]))?;
    println!(
        "  config {}: {} shards, all on group 1 (nodes 1-3)",
        config.num,
        count(&config, 1)
    );
    let options = ClientOptions {
        op_deadline: Duration::from_secs(20),
        controller: Some(vec![1, 2, 3]),
        ..ClientOptions::default()
    };
    let client = BlockingClient::connect_with(&members, &tls, options)?;
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(u64, Duration)> {
            let (mut unknown, mut slowest) = (0, Duration::ZERO);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (key, value) = (format!("sharded-{i:05}"), format!("v{i}"));
                let started = Instant::now();
                match client.put(key.clone(), value.clone()) {
                    Ok(_) => {
                        acked.lock().expect("lock").insert(key, value);
                    }
                    Err(ClientError::Maybe | ClientError::Timeout) => unknown += 1,
                    Err(e) => bail!("put {key}: {e}"),
                }
                slowest = slowest.max(started.elapsed());
                i += 1;
            }
            client.close();
            Ok((unknown, slowest))
        })
    };
    let step = |what: &str, config: &shoal_shard::controller::ShardConfig, t: Instant| {
        println!(
            "  {what}: config {} in {} ms; group 1: {} shards, group 2: {} shards; {} writes acknowledged so far",
            config.num,
            t.elapsed().as_millis(),
            count(config, 1),
            count(config, 2),
            acked.lock().map(|a| a.len()).unwrap_or(0)
        );
    };
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let config = runtime.block_on(admin.join(2, &[4, 5, 6]))?;
    step("group 2 (nodes 4-6) joined", &config, t);
    let moving = config.shards_of(2)[0];
    let t = Instant::now();
    let config = runtime.block_on(admin.move_shard(moving, 1))?;
    step(&format!("shard {moving} moved back to group 1"), &config, t);
    let t = Instant::now();
    let config = runtime.block_on(admin.leave(1))?;
    step("group 1 left (its replicas dropped)", &config, t);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (unknown, slowest) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    runtime.block_on(admin.close());
    let acked = acked.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    let options = ClientOptions {
        controller: Some(vec![1, 2, 3]),
        ..ClientOptions::default()
    };
    let reader = BlockingClient::connect_with(&members, &tls, options)?;
    let verified = verify(&reader, &acked, "verifying all writes")?;
    reader.close();
    nodes.stop_all(WAIT_MAX)?;
    println!(
        "  {} writes acknowledged ({unknown} unknown), slowest {} ms; read back {verified}/{} from group 2 — none lost",
        acked.len(),
        slowest.as_millis(),
        acked.len()
    );
    Ok(())
}
