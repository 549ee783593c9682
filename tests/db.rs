//! Goal: the embedded `Db` keeps every acknowledged write — across a clean
//! close and reopen, and when its process is SIGKILLed while several
//! threads write (a child `shoal db-writer --threads 8` prints `ack t i`
//! once thread t's i-th write returned; we kill it, reopen the directory
//! here, and every acknowledged key must be there, and every batch, acked
//! or not, must be there whole or not at all). `SHOAL_CRASH_ROUNDS` sets
//! the number of kills (default 3).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use std::collections::BTreeMap;

use shoal::{Db, DbError};

/// Writer threads of the SIGKILL test's child.
const WRITERS: u64 = 8;

#[test]
fn operations_and_close_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
    assert_eq!(db.put("a", "1").expect("put"), 1);
    assert_eq!(db.append("a", "2").expect("append"), 2);
    assert_eq!(db.get("a").expect("get").expect("present").value, "12");
    assert!(matches!(
        db.put_if_version("a", "x", 1),
        Err(DbError::VersionMismatch { current: 2 })
    ));
    assert!(matches!(
        db.put_if_version("b", "x", 5),
        Err(DbError::NoKey)
    ));
    assert_eq!(db.put_if_version("b", "x", 0).expect("create"), 1);
    assert_eq!(db.get("zzz").expect("get"), None);
    for i in 0..50 {
        db.put(format!("k{i:02}"), format!("v{i}")).expect("put");
    }
    assert_eq!(db.scan("k", "k10").count(), 10);
    assert!(db.delete("k00").expect("delete"));
    assert!(!db.delete("k00").expect("delete again"));
    db.close().expect("close");

    let db = Db::open(dir.path()).expect("reopen");
    assert_eq!(db.get("a").expect("get").expect("present").value, "12");
    assert_eq!(db.get("b").expect("get").expect("present").version, 1);
    assert_eq!(db.get("k00").expect("get"), None);
    let pairs: Vec<_> = db.scan("k", "").collect::<Result<_, _>>().expect("scan");
    assert_eq!(pairs.len(), 49);
    assert_eq!(pairs[0].0, "k01");
    // A write after reopening continues from the stored versions.
    assert_eq!(db.put("a", "3").expect("put"), 3);
    drop(db); // dropping closes too
    let db = Db::open(dir.path()).expect("reopen after drop");
    assert_eq!(db.get("a").expect("get").expect("present").value, "3");
    db.close().expect("close");
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    sigkill_rounds(&[]);
}

/// With a group-commit window the log is synced only every 20 ms, but a
/// crash of the process alone still loses nothing acknowledged: the writes
/// were handed to the OS before they were acknowledged.
#[test]
fn group_commit_writes_survive_sigkill_of_the_process() {
    sigkill_rounds(&["--group-commit-ms", "20"]);
}

/// Runs `shoal db-writer` (with `args`) and SIGKILLs it, several rounds;
/// checks after each that every acknowledged write is there and every
/// batch whole or absent.
fn sigkill_rounds(args: &[&str]) {
    let rounds = std::env::var("SHOAL_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3u64);
    let dir = tempfile::tempdir().expect("tempdir");
    // Per writer thread, the highest write acknowledged so far.
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["db-writer", "--threads", &WRITERS.to_string()])
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start db-writer");
        let stdout = child.stdout.take().expect("stdout");
        let target = 60 + (round % 5) * 37;
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let parsed = line.strip_prefix("ack ").and_then(|rest| {
                let (t, i) = rest.split_once(' ')?;
                Some((t.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
            });
            let (t, i) = parsed.unwrap_or_else(|| panic!("unexpected line {line:?}"));
            let last = acked.entry(t).or_insert(i);
            *last = (*last).max(i);
            seen += 1;
            if seen >= target {
                break;
            }
        }
        assert_eq!(seen, target, "round {round}: the writer stopped early");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");

        let db = Db::open(dir.path()).expect("reopen after SIGKILL");
        for (&t, &last) in &acked {
            for i in 0..=last {
                let v = db
                    .get(format!("k{t}-{i}"))
                    .expect("get")
                    .unwrap_or_else(|| panic!("round {round}: acknowledged k{t}-{i} lost"));
                assert_eq!(v.value, format!("v{i}"));
            }
        }
        // Batches are atomic whether or not they were acknowledged: each
        // `m` key exists exactly when its `k` key of the same batch does.
        for pair in db.scan_prefix("m") {
            let (key, _) = pair.expect("scan");
            let k = format!("k{}", std::str::from_utf8(&key[1..]).expect("utf-8"));
            assert!(
                db.get(&k).expect("get").is_some(),
                "round {round}: half a batch: {key:?} without {k}"
            );
        }
        for (&t, &last) in &acked {
            // The batch after the last acknowledged write may have landed.
            for i in (2..=last + 3).step_by(3) {
                let k = db.get(format!("k{t}-{i}")).expect("get").is_some();
                let m = db.get(format!("m{t}-{i}")).expect("get").is_some();
                assert_eq!(k, m, "round {round}: half a batch at {t}-{i}");
            }
        }
        db.close().expect("close");
    }
}

// A compile-time check of the claim in `Db`'s docs.
#[allow(dead_code)]
fn db_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Db>();
}

/// Goal (issue 10, item 5): a `Db` compacts its log by default and the
/// stored log stays bounded across reopening. Writes ~8 MiB through a `Db`
/// whose threshold is 1 MiB, reopens it, writes again, and then counts the
/// bytes really stored in the `raft_log` column family (not the running
/// count the node decides by): they stay within a few thresholds, while
/// without compaction they would hold every write.
#[test]
fn log_is_compacted_and_stays_bounded_across_reopen() {
    const THRESHOLD_BYTES: u64 = 1 << 20;
    const VALUE_BYTES: usize = 4 << 10;
    const WRITES_PER_OPEN: usize = 1_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let value = vec![b'x'; VALUE_BYTES];
    for round in 0..2 {
        let db = Db::builder(dir.path())
            .max_raft_state_bytes(THRESHOLD_BYTES)
            .open()
            .expect("open");
        for i in 0..WRITES_PER_OPEN {
            db.put(format!("k{round}-{i:04}"), value.clone())
                .expect("put");
        }
        db.close().expect("close");
    }
    let written = (2 * WRITES_PER_OPEN * VALUE_BYTES) as u64;
    let engine = shoal_engine::RocksEngine::open(
        dir.path().join("db"),
        shoal_engine::EngineConfig::default(),
    )
    .expect("open the engine");
    let group = shoal_shard::node::KV_GROUP;
    let first = engine.first_index(group).expect("first index");
    let last = engine.last_index(group).expect("last index");
    let stored: u64 = if last >= first {
        engine
            .entries(group, first, last + 1, u64::MAX)
            .expect("entries")
            .iter()
            .map(|e| e.size_bytes())
            .sum()
    } else {
        0
    };
    assert!(
        stored <= 3 * THRESHOLD_BYTES,
        "the raft log holds {stored} bytes after {written} bytes of writes (threshold {THRESHOLD_BYTES})"
    );
    assert!(
        first > 1,
        "the log was never compacted (first index {first})"
    );
    assert!(
        engine.log_bytes(group).expect("log bytes") >= stored,
        "the running log size must not undercount what is stored"
    );
    drop(engine);
    let db = Db::builder(dir.path())
        .max_raft_state_bytes(THRESHOLD_BYTES)
        .open()
        .expect("reopen");
    for key in ["k0-0000", "k1-0999"] {
        let value = db.get(key).expect("get").expect("present").value;
        assert_eq!(value.len(), VALUE_BYTES);
    }
    db.close().expect("close");
}
