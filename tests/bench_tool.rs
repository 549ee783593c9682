//! Goal: `shoal bench` (the load generator) runs end to end against a
//! 3-node cluster it starts itself, and every phase it reports did real,
//! error-free work: the JSON results name each phase with its operations,
//! latencies and the servers' CPU time read from /proc.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_runs_every_phase_against_a_real_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("results.json");
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "bench",
            "--systems",
            "shoal",
            "--clients",
            "1,4",
            "--get-clients",
            "4",
        ])
        .args([
            "--warmup-secs",
            "0.2",
            "--measure-secs",
            "1",
            "--keys",
            "100",
            "--conns",
            "2",
        ])
        .arg("--dir")
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run shoal bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "shoal bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("server µs/op"), "no table: {stdout}");
    let results: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&json).expect("results")).expect("JSON");
    let phases: Vec<(String, u64)> = results
        .iter()
        .map(|r| {
            (
                r["op"].as_str().expect("op").to_string(),
                r["clients"].as_u64().expect("clients"),
            )
        })
        .collect();
    assert_eq!(
        phases,
        [("put".into(), 1), ("put".into(), 4), ("get".into(), 4)]
    );
    for r in &results {
        assert_eq!(r["system"], "shoal");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["ops"].as_u64().expect("ops") > 0, "{r}");
        let (p50, p99) = (
            r["p50_us"].as_u64().expect("p50"),
            r["p99_us"].as_u64().expect("p99"),
        );
        assert!(0 < p50 && p50 <= p99, "{r}");
        // Three node processes did the work: their CPU time is measured.
        assert!(
            r["server_cpu_us_per_op"].as_f64().expect("server CPU") > 0.0,
            "{r}"
        );
    }
}

/// Goal: `shoal bench-move` moves a shard back and forth on six real nodes
/// under writers, prints a row per round and the medians, and passes its
/// own check that every key written reads back as written.
#[test]
fn bench_move_moves_a_shard_and_reads_every_key_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["bench-move", "--shard-mib", "2", "--value-kib", "16"])
        .args(["--rounds", "2", "--writers", "2"])
        .arg("--dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "error")
        .output()
        .expect("run shoal bench-move");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "shoal bench-move failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("->") || l.starts_with("median"))
        .collect();
    assert_eq!(rows.len(), 3, "two rounds and the medians: {stdout}");
    assert!(
        rows[0].contains("1->2") && rows[1].contains("2->1"),
        "{stdout}"
    );
    assert!(stdout.contains("data check passed"), "{stdout}");
}
