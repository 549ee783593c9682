//! Goal: nothing the engine acknowledged is lost when its process is killed
//! with SIGKILL at a random moment, no partial batch ever becomes visible,
//! the state machine always equals a replay of the log up to its applied
//! index, and a snapshot install killed at any point leaves the old shard or
//! the new one, never a mix.
//!
//! Real processes: the `shoal` binary runs the writer (`engine-writer`) or
//! the installer (`engine-installer`) on a real RocksDB directory; this test
//! SIGKILLs it after a random number of acknowledgements plus a random
//! delay, reopens the database and checks it (`shoal::crashtest`). Kill
//! points come from a seed, printed on failure; `SHOAL_SEED=<n>` replays the
//! same kill points. `SHOAL_CRASH_ROUNDS` sets the number of kills.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal::crashtest;

fn seed() -> u64 {
    match std::env::var("SHOAL_SEED") {
        Ok(s) => s.parse().expect("SHOAL_SEED must be a number"),
        Err(_) => rand::rng().random(),
    }
}

fn rounds(default: u64) -> u64 {
    std::env::var("SHOAL_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start shoal")
}

/// Busy-waits `micros` so the kill lands at a random point inside the
/// child's next write, not just after a line it printed.
fn spin(micros: u64) {
    let until = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

fn run_with_seed(name: &str, seed: u64, body: impl FnOnce(u64)) {
    eprintln!("{name}: SHOAL_SEED={seed}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(seed)));
    if let Err(e) = result {
        eprintln!("{name} FAILED: replay with SHOAL_SEED={seed}");
        std::panic::resume_unwind(e);
    }
}

#[test]
fn engine_survives_sigkill_mid_write() {
    run_with_seed("engine_survives_sigkill_mid_write", seed(), |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let dir_arg = dir.path().display().to_string();
        let workload_seed = seed.to_string();
        let mut acked = 0u64;
        for round in 0..rounds(25) {
            let target = acked + rng.random_range(1..300);
            let mut child = spawn(&["engine-writer", "--dir", &dir_arg, "--seed", &workload_seed]);
            let stdout = child.stdout.take().unwrap();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(n) = line.strip_prefix("ack ") {
                    acked = n.parse().unwrap();
                    if acked >= target {
                        break;
                    }
                }
            }
            assert!(acked >= target, "round {round}: writer exited early");
            spin(rng.random_range(0..3_000));
            child.kill().unwrap();
            child.wait().unwrap();
            let check = crashtest::check_writer(dir.path(), seed, acked)
                .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
            acked = check.last_index;
        }
        assert!(acked > 0);
    });
}

#[test]
fn snapshot_install_survives_sigkill() {
    run_with_seed("snapshot_install_survives_sigkill", seed(), |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let dir_arg = dir.path().display().to_string();
        let mut seen = [false; 2];
        let mut interrupted = 0u32;
        for round in 0..rounds(25) {
            let installs_before_kill = rng.random_range(0..3);
            let mut child = spawn(&["engine-installer", "--dir", &dir_arg]);
            // Keep the pipe open until the kill, so the child never dies of EPIPE.
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut installs = 0;
            if installs_before_kill > 0 {
                for line in lines.by_ref() {
                    installs += u32::from(line.unwrap().starts_with("installed"));
                    if installs >= installs_before_kill {
                        break;
                    }
                }
            }
            spin(rng.random_range(0..20_000));
            child.kill().unwrap();
            child.wait().unwrap();
            drop(lines);
            let check = crashtest::check_installer(dir.path())
                .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
            if let Some(which) = check.template {
                seen[which as usize] = true;
            }
            interrupted += u32::from(check.finished_interrupted_install);
        }
        assert!(seen.iter().any(|s| *s), "no install ever completed");
        // How often a kill landed inside an install (after its marker): reported, not
        // asserted, since it depends on timing.
        eprintln!("snapshot_install_survives_sigkill: {interrupted} kills interrupted an install");
    });
}

/// Goal: the writer itself, run to a fixed index without kills, produces a
/// state that the checker accepts (so the checker is not vacuous for the
/// crash runs above) and that it rejects a claim of more than was written.
#[test]
fn checker_accepts_clean_run_and_rejects_lost_acks() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "engine-writer",
            "--dir",
            &dir.path().display().to_string(),
            "--seed",
            "7",
            "--stop-after",
            "700",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let check = crashtest::check_writer(dir.path(), 7, 700).unwrap();
    assert!(check.last_index >= 700 && check.applied_index == check.last_index);
    assert!(check.first_index > 1, "the run compacted its log");
    let err = crashtest::check_writer(dir.path(), 7, check.last_index + 1).unwrap_err();
    assert!(err.to_string().contains("lost"), "{err}");
    // A different seed's workload does not match what is stored.
    assert!(crashtest::check_writer(dir.path(), 8, 0).is_err());
}
