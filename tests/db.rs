//! Goal: the embedded `Db` keeps every acknowledged write — across a clean
//! close and reopen, and when its process is SIGKILLed right after writes
//! were acknowledged (a child `shoal db-writer` prints `ack i` once
//! `put(k<i>)` returned; we kill it, reopen the directory here, and every
//! acknowledged key must be there).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use shoal::{Db, DbError};

#[test]
fn operations_and_close_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
    assert_eq!(db.put("a", "1").expect("put"), 1);
    assert_eq!(db.append("a", "2").expect("append"), 2);
    assert_eq!(db.get("a").expect("get").value, "12");
    assert!(matches!(
        db.put_if_version("a", "x", 1),
        Err(DbError::VersionMismatch { current: 2 })
    ));
    assert!(matches!(
        db.put_if_version("b", "x", 5),
        Err(DbError::NoKey)
    ));
    assert_eq!(db.put_if_version("b", "x", 0).expect("create"), 1);
    assert!(matches!(db.get("zzz"), Err(DbError::NotFound)));
    for i in 0..50 {
        db.put(format!("k{i:02}"), format!("v{i}")).expect("put");
    }
    assert_eq!(db.scan("k", "k10", 100).expect("scan").len(), 10);
    assert!(db.delete("k00").expect("delete"));
    assert!(!db.delete("k00").expect("delete again"));
    db.close().expect("close");

    let db = Db::open(dir.path()).expect("reopen");
    assert_eq!(db.get("a").expect("get").value, "12");
    assert_eq!(db.get("b").expect("get").version, 1);
    assert!(matches!(db.get("k00"), Err(DbError::NotFound)));
    let pairs = db.scan("k", "", 100).expect("scan");
    assert_eq!(pairs.len(), 49);
    assert_eq!(pairs[0].0, "k01");
    // A write after reopening continues from the stored versions.
    assert_eq!(db.put("a", "3").expect("put"), 3);
    drop(db); // dropping closes too
    let db = Db::open(dir.path()).expect("reopen after drop");
    assert_eq!(db.get("a").expect("get").value, "3");
    db.close().expect("close");
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: Option<u64> = None;
    for round in 0..3u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["db-writer", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start db-writer");
        let stdout = child.stdout.take().expect("stdout");
        let target = 50 + round * 37;
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("line");
            let i: u64 = line
                .strip_prefix("ack ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected line {line:?}"));
            acked = Some(acked.map_or(i, |a| a.max(i)));
            seen += 1;
            if seen >= target {
                break;
            }
        }
        assert_eq!(seen, target, "round {round}: the writer stopped early");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");

        let db = Db::open(dir.path()).expect("reopen after SIGKILL");
        let last = acked.expect("some ack");
        for i in 0..=last {
            let v = db
                .get(format!("k{i}"))
                .unwrap_or_else(|e| panic!("round {round}: acknowledged k{i} lost: {e}"));
            assert_eq!(v.value, format!("v{i}"));
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
