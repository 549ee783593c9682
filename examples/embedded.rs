//! The embedded database: open a `Db` in a directory, write from several
//! threads at once, move money between two accounts with an atomic
//! conditional batch, read it back, scan a prefix, and close.
//!
//! Run: `cargo run --example embedded [DIR]` (default: a temporary
//! directory, removed at the end).

use std::sync::Arc;

use shoal::{Db, DbError, WriteBatch};

fn main() -> Result<(), DbError> {
    let temp = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    let db = Arc::new(Db::open(&dir)?);

    // Many threads share one Db; their writes share synced log writes.
    std::thread::scope(|scope| {
        for t in 0..4 {
            let db = db.clone();
            scope.spawn(move || -> Result<(), DbError> {
                for i in 0..25 {
                    db.put(
                        format!("event/{t}-{i:02}"),
                        format!("thread {t}, event {i}"),
                    )?;
                }
                Ok(())
            });
        }
    });

    // Two accounts, then a transfer that applies only if neither changed
    // since we read them: all of it, or nothing.
    db.put("account/alice", "100")?;
    db.put("account/bob", "0")?;
    let alice = db.get("account/alice")?.expect("alice exists");
    let bob = db.get("account/bob")?.expect("bob exists");
    let mut transfer = WriteBatch::new();
    transfer
        .check_version("account/alice", alice.version)
        .check_version("account/bob", bob.version)
        .put("account/alice", "70")
        .put("account/bob", "30");
    let versions = db.write(transfer.clone())?;
    println!("transfer applied, new versions {versions:?}");
    // The same batch again: its conditions no longer hold, nothing changes.
    match db.write(transfer) {
        Err(DbError::ConditionFailed { index, current }) => {
            println!("second transfer refused: condition {index} (version now {current})")
        }
        other => panic!("expected a failed condition, got {other:?}"),
    }

    let events = db.scan_prefix("event/").count();
    println!("{events} events stored");
    assert_eq!(events, 100);
    for pair in db.scan_prefix("account/") {
        let (key, value) = pair?;
        println!(
            "{} = {} (version {})",
            String::from_utf8_lossy(&key),
            String::from_utf8_lossy(&value.value),
            value.version
        );
    }
    Arc::into_inner(db).expect("threads are done").close()?;
    Ok(())
}
