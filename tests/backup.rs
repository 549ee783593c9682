//! Goal: `Db::backup` taken while writers keep writing is one point in
//! time — it holds every write acknowledged before it began, and of each
//! writer's in-order sequence exactly a prefix — and `shoal restore` turns
//! it into a directory that `Db::open` and a one-node `shoal node` open
//! with exactly those contents (versions and sessions included); a
//! damaged backup makes `shoal restore` fail naming the file, creating
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal::engine::{EngineConfig, RocksEngine, Versioned};
use shoal::local_cluster::LocalCluster;
use shoal::Db;

const WRITERS: u64 = 4;
/// Writes each writer must have acknowledged before the backup starts.
const WRITES_BEFORE_BACKUP: u64 = 40;
const WAIT: Duration = Duration::from_secs(60);

fn shoal_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal"))
}

fn writer_key(writer: u64, i: u64) -> String {
    format!("w{writer}/{i:08}")
}

/// Runs `shoal restore BACKUP --data DATA ARGS`; its output, whatever it is.
fn run_restore(backup: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(shoal_exe())
        .arg("restore")
        .arg(backup)
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

/// [`run_restore`], which must succeed.
fn restore_ok(backup: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    let out = run_restore(backup, data, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every pair of a `Db`, in key order.
fn contents(db: &Db) -> Vec<(Bytes, Versioned)> {
    db.scan("", "").map(|pair| pair.unwrap()).collect()
}

/// The key/value group's sessions in an engine directory (closed `Db`).
fn sessions(engine_dir: &Path) -> Vec<(u64, u64)> {
    let engine = RocksEngine::open(engine_dir, EngineConfig::default()).unwrap();
    engine
        .sessions(shoal::shard::node::KV_GROUP, shoal::shard::node::KV_SHARD)
        .unwrap()
}

#[test]
fn backup_under_concurrent_writers_is_a_consistent_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open(tmp.path().join("source")).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (db, stop, acked) = (db.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    db.put(writer_key(w, i), i.to_string()).unwrap();
                    i += 1;
                    acked[w as usize].store(i, Ordering::Release);
                }
            })
        })
        .collect();
    common::wait_for("every writer to get going", WAIT, || {
        acked
            .iter()
            .all(|a| a.load(Ordering::Acquire) >= WRITES_BEFORE_BACKUP)
    });
    let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Acquire)).collect();
    let backup = tmp.path().join("backup");
    let manifest = db.backup(&backup).unwrap();
    let after: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Acquire)).collect();
    // The writers go on after the backup too.
    common::wait_for("writes after the backup", WAIT, || {
        acked
            .iter()
            .zip(&after)
            .all(|(a, &n)| a.load(Ordering::Acquire) > n + 1)
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(manifest.groups.len(), 1);

    let restored = tmp.path().join("restored");
    let out = restore_ok(&backup, &restored, &[]);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["ok"], true, "{line}");
    let restored = Db::open(&restored).unwrap();
    let mut per_writer: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (key, value) in contents(&restored) {
        let key = String::from_utf8(key.to_vec()).unwrap();
        let (writer, i) = key[1..].split_once('/').unwrap();
        let (writer, i): (u64, u64) = (writer.parse().unwrap(), i.parse().unwrap());
        assert_eq!(value.value, Bytes::from(i.to_string()), "{key}");
        assert_eq!(value.version, 1, "{key}");
        per_writer.entry(writer).or_default().push(i);
    }
    for w in 0..WRITERS {
        let got = per_writer.remove(&w).unwrap_or_default();
        let n = got.len() as u64;
        assert_eq!(got, (0..n).collect::<Vec<_>>(), "writer {w}: not a prefix");
        // Everything acknowledged before the backup began is in it; at most
        // the one write in flight when it returned is beyond what was
        // acknowledged by then.
        assert!(
            n >= before[w as usize],
            "writer {w}: {n} < {}",
            before[w as usize]
        );
        assert!(
            n <= after[w as usize] + 1,
            "writer {w}: {n} > {} + 1",
            after[w as usize]
        );
    }
    assert!(per_writer.is_empty());
    // The restored database takes writes.
    restored.put("after-restore", "yes").unwrap();
    assert_eq!(
        restored.get("after-restore").unwrap().unwrap().value,
        Bytes::from("yes")
    );
}

#[test]
fn restore_equals_the_source_with_versions_and_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let source_dir = tmp.path().join("source");
    let db = Db::open(&source_dir).unwrap();
    for i in 0..200u64 {
        db.put(format!("k{:03}", i % 70), format!("v{i}")).unwrap();
        if i % 3 == 0 {
            db.append(format!("a{}", i % 5), format!("+{i}")).unwrap();
        }
        if i % 11 == 0 {
            db.delete(format!("k{:03}", i % 70)).unwrap();
        }
    }
    let expected = contents(&db);
    assert!(expected.iter().any(|(_, v)| v.version > 1));
    db.close().unwrap();
    let expected_sessions = sessions(&source_dir.join("db"));
    assert!(!expected_sessions.is_empty());

    let db = Db::open(&source_dir).unwrap();
    let backup = tmp.path().join("backup");
    db.backup(&backup).unwrap();
    db.put("k000", "after the backup").unwrap();
    db.put("new-key", "after the backup").unwrap();
    db.close().unwrap();

    let restored_dir = tmp.path().join("restored");
    shoal::backup::restore_db(&backup, &restored_dir).unwrap();
    assert_eq!(sessions(&restored_dir.join("db")), expected_sessions);
    let restored = Db::open(&restored_dir).unwrap();
    assert_eq!(contents(&restored), expected);
    restored.close().unwrap();

    // The same backup seeds a one-node cluster.
    let cluster_dir = tmp.path().join("cluster");
    let mut cluster = LocalCluster::create(&shoal_exe(), &cluster_dir, 1, &[]).unwrap();
    cluster.inherit_stderr();
    let data = cluster.data_dir(1);
    restore_ok(
        &backup,
        &data,
        &["--node-id", "1", "--peers", &cluster.cluster_arg()],
    );
    cluster.start_all().unwrap();
    cluster.wait_for_leader(WAIT).unwrap();
    let client = shoal::BlockingClient::connect(
        &shoal::cluster::parse_members(&cluster.cluster_arg()).unwrap(),
        cluster.tls_dir(),
    )
    .unwrap();
    for (key, value) in &expected {
        assert_eq!(&client.get(key.clone()).unwrap(), value, "{key:?}");
    }
    let missing = client.get("new-key");
    assert!(
        matches!(missing, Err(shoal::shard::ClientError::NotFound)),
        "{missing:?}"
    );
    cluster.stop_all(WAIT).unwrap();
}

#[test]
fn shoal_restore_refuses_a_damaged_backup_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let db = Db::open(tmp.path().join("source")).unwrap();
    for i in 0..50 {
        db.put(format!("k{i}"), "v").unwrap();
    }
    let backup = tmp.path().join("backup");
    let manifest = db.backup(&backup).unwrap();
    db.close().unwrap();
    let group = &manifest.groups[0];
    let sst = group
        .files
        .iter()
        .find(|f| f.name.ends_with(".sst"))
        .unwrap();
    let bad = backup.join(&group.dir).join(&sst.name);
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    let restored = tmp.path().join("restored");
    let out = run_restore(&backup, &restored, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
    assert!(!restored.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Runs `shoal backup` against the cluster `cluster_arg` (certificates in
/// `tls`) into `out`; its output, whatever it is.
fn run_backup(cluster_arg: &str, tls: &Path, out: &Path) -> std::process::Output {
    Command::new(shoal_exe())
        .arg("backup")
        .args(["--cluster", cluster_arg, "--tls"])
        .arg(tls)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// The JSON line of a `shoal backup` that must have succeeded.
fn backup_line(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs `shoal backup` against `cluster`; returns its JSON line.
fn shoal_backup(cluster: &LocalCluster, out: &Path) -> serde_json::Value {
    backup_line(&run_backup(&cluster.cluster_arg(), cluster.tls_dir(), out))
}

/// The groups a backup's JSON line lists.
fn backed_up_groups(line: &serde_json::Value) -> Vec<u64> {
    line["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_u64().unwrap())
        .collect()
}

/// A thread that writes `writer_key(0, i)` = `i` for i = 0, 1, ... through
/// `client`, each after the previous one was acknowledged, counting the
/// acknowledged ones in `acked`, until `stop`.
fn spawn_in_order_writer(
    client: shoal::BlockingClient,
    stop: &Arc<AtomicBool>,
    acked: &Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let (stop, acked) = (stop.clone(), acked.clone());
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            client.put(writer_key(0, i), i.to_string()).unwrap();
            i += 1;
            acked.store(i, Ordering::Release);
        }
    })
}

/// The indexes of the in-order writer's keys `client` reads (at most
/// `limit`), in key order, each checked to hold its index as its value.
fn writer_indexes(client: &shoal::BlockingClient, limit: u64) -> Vec<u64> {
    client
        .scan(writer_key(0, 0), "w0/~", limit)
        .unwrap()
        .into_iter()
        .map(|(key, value)| {
            let i: u64 = std::str::from_utf8(&key[3..]).unwrap().parse().unwrap();
            assert_eq!(value.value, Bytes::from(i.to_string()));
            i
        })
        .collect()
}

/// The controller group's nodes in the sharded tests.
const CONTROLLER: &str = "1,2,3";

/// A client of a sharded cluster whose controller group is on nodes 1-3.
fn sharded_client(members: &[(u64, std::net::SocketAddr)], tls: &Path) -> shoal::BlockingClient {
    let options = shoal::cluster::ClientOptions {
        op_deadline: WAIT,
        controller: Some(vec![1, 2, 3]),
        ..Default::default()
    };
    shoal::BlockingClient::connect_with(members, tls, options).unwrap()
}

/// A 3-node sharded cluster under `dir` (its controller group on every
/// node), configured with `shards` shards on group 7 (nodes 1-3).
fn start_sharded(dir: &Path, shards: u32) -> common::Cluster {
    let source = common::Cluster::start_args(dir, 3, &["--controller", CONTROLLER]);
    let shards = shards.to_string();
    source.shard(
        CONTROLLER,
        60_000,
        &["init", "--shards", &shards, "--group", "7=1,2,3"],
    );
    source
}

/// A new 3-node sharded cluster under `dir`, each node restored from
/// `backup` by `shoal restore --node-id N` (same ids, no `--peers`), started.
fn restore_sharded(backup: &Path, dir: &Path) -> LocalCluster {
    let mut restored =
        LocalCluster::create(&shoal_exe(), dir, 3, &["--controller", CONTROLLER]).unwrap();
    restored.inherit_stderr();
    for id in restored.ids() {
        restore_ok(
            backup,
            &restored.data_dir(id),
            &["--node-id", &id.to_string()],
        );
    }
    restored.start_all().unwrap();
    restored
}

#[test]
fn shoal_backup_of_a_cluster_under_writes_restores_into_a_new_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let mut source =
        LocalCluster::create(&shoal_exe(), &tmp.path().join("source"), 3, &[]).unwrap();
    source.inherit_stderr();
    source.start_all().unwrap();
    source.wait_for_leader(WAIT).unwrap();
    let members = shoal::cluster::parse_members(&source.cluster_arg()).unwrap();
    let client = shoal::BlockingClient::connect(&members, source.tls_dir()).unwrap();
    for i in 0..100 {
        client
            .put(format!("fixed/{i:03}"), format!("v{i}"))
            .unwrap();
    }
    client.append("fixed/000", "+more").unwrap();

    // Backups read everything: a client without the admin certificate is
    // refused.
    let denied = client.block_on(client.client().backup_export(
        shoal_net::NodeId(1),
        shoal::shard::node::KV_GROUP,
        WAIT,
    ));
    assert!(
        matches!(
            denied,
            Err(shoal::shard::AdminError::Denied(
                shoal::shard::protocol::Denied::NotAdmin
            ))
        ),
        "{denied:?}"
    );

    // A writer keeps writing keys in order during the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = spawn_in_order_writer(
        shoal::BlockingClient::connect(&members, source.tls_dir()).unwrap(),
        &stop,
        &acked,
    );
    common::wait_for("the writer to get going", WAIT, || {
        acked.load(Ordering::Acquire) >= WRITES_BEFORE_BACKUP
    });
    let before = acked.load(Ordering::Acquire);
    let backup = tmp.path().join("backup");
    let line = shoal_backup(&source, &backup);
    let after = acked.load(Ordering::Acquire);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(line["ok"], true, "{line}");
    assert_eq!(line["groups"].as_array().unwrap().len(), 1, "{line}");
    source.stop_all(WAIT).unwrap();

    // A new cluster: other addresses, same ids, seeded from the backup.
    let mut restored =
        LocalCluster::create(&shoal_exe(), &tmp.path().join("restored"), 3, &[]).unwrap();
    restored.inherit_stderr();
    for id in restored.ids() {
        restore_ok(
            &backup,
            &restored.data_dir(id),
            &[
                "--node-id",
                &id.to_string(),
                "--peers",
                &restored.cluster_arg(),
            ],
        );
    }
    restored.start_all().unwrap();
    restored.wait_for_leader(WAIT).unwrap();
    let members = shoal::cluster::parse_members(&restored.cluster_arg()).unwrap();
    let client = shoal::BlockingClient::connect(&members, restored.tls_dir()).unwrap();
    assert_eq!(
        client.get("fixed/000").unwrap().value,
        Bytes::from("v0+more")
    );
    for i in 1..100 {
        assert_eq!(
            client.get(format!("fixed/{i:03}")).unwrap().value,
            Bytes::from(format!("v{i}"))
        );
    }
    let written = writer_indexes(&client, 100_000);
    let n = written.len() as u64;
    assert_eq!(written, (0..n).collect::<Vec<_>>(), "not a prefix");
    assert!(
        n >= before,
        "{n} < {before}: an acknowledged write is missing"
    );
    assert!(n <= after + 1, "{n} > {after} + 1");
    client.put("after-restore", "yes").unwrap();
    restored.stop_all(WAIT).unwrap();
}

/// A sharded cluster (a controller group and a replica group hosted at
/// runtime): `shoal backup` takes both groups, and `shoal restore
/// --node-id N` without `--peers` gives each node of a new cluster with
/// the same ids its groups, hosting records included.
#[test]
fn a_sharded_cluster_restores_onto_nodes_of_the_same_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let source = start_sharded(&tmp.path().join("source"), 4);
    let client = sharded_client(&source.members, &source.tls);
    for i in 0..40 {
        client.put(format!("k{i}"), format!("v{i}")).unwrap();
    }
    let backup = tmp.path().join("backup");
    let line = backup_line(&run_backup(&source.cluster_arg(), &source.tls, &backup));
    assert_eq!(backed_up_groups(&line), vec![0, 7], "{line}");
    drop(client);
    drop(source);

    let mut restored = restore_sharded(&backup, &tmp.path().join("restored"));
    let client = sharded_client(restored.members(), restored.tls_dir());
    for i in 0..40 {
        assert_eq!(
            client.get(format!("k{i}")).unwrap().value,
            Bytes::from(format!("v{i}"))
        );
    }
    client.put("after-restore", "yes").unwrap();
    restored.stop_all(WAIT).unwrap();
}

/// Goal: a backup of a sharded cluster is one point in time across its
/// groups. A writer writes keys in order, each after the previous one was
/// acknowledged, spread over two replica groups by their shards; the
/// backup is taken meanwhile. Restored, the keys are exactly a prefix of
/// the sequence (a key in one group's export implies every earlier key,
/// whichever group holds it) holding every write acknowledged before the
/// backup began.
#[test]
fn a_sharded_backup_is_one_point_in_time_across_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let source = start_sharded(&tmp.path().join("source"), 8);
    source.shard(CONTROLLER, 60_000, &["join", "--group", "8=1,2,3"]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = spawn_in_order_writer(sharded_client(&source.members, &source.tls), &stop, &acked);
    common::wait_for("the writer to get going", WAIT, || {
        acked.load(Ordering::Acquire) >= WRITES_BEFORE_BACKUP
    });
    let before = acked.load(Ordering::Acquire);
    let backup = tmp.path().join("backup");
    let output = run_backup(&source.cluster_arg(), &source.tls, &backup);
    let after = acked.load(Ordering::Acquire);
    // The writer goes on after the backup: its fences ended.
    common::wait_for("writes after the backup", WAIT, || {
        acked.load(Ordering::Acquire) >= after + 10
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let line = backup_line(&output);
    assert_eq!(backed_up_groups(&line), vec![0, 7, 8], "{line}");
    drop(source);

    let mut restored = restore_sharded(&backup, &tmp.path().join("restored"));
    let client = sharded_client(restored.members(), restored.tls_dir());
    let written = writer_indexes(&client, 1_000_000);
    let n = written.len() as u64;
    assert_eq!(
        written,
        (0..n).collect::<Vec<_>>(),
        "not a prefix: the groups are not one point in time"
    );
    assert!(
        n >= before,
        "{n} < {before}: an acknowledged write is missing"
    );
    assert!(n <= after + 1, "{n} > {after} + 1");
    client.put("after-restore", "yes").unwrap();
    restored.stop_all(WAIT).unwrap();
}
