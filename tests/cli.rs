//! Goal: the command-line tools work end to end on real processes — three
//! `shoal node` processes on loopback (QUIC with mutual TLS, RocksDB on
//! disk), `shoal client` answering JSON lines exactly as README.md
//! documents (including bad lines, after which it keeps going), the
//! one-shot commands, and a graceful SIGTERM shutdown after which a
//! restarted cluster still holds the data.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Cluster;
use serde_json::{json, Value};

/// Feeds `lines` to `shoal client` and returns its answers, one per line.
fn client(cluster: &Cluster, lines: &[&str]) -> Vec<Value> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["client", "--cluster", &cluster.cluster_arg(), "--tls"])
        .arg(&cluster.tls)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start shoal client");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for line in lines {
            writeln!(stdin, "{line}").expect("write request");
        }
    }
    let output = child.wait_with_output().expect("client output");
    assert!(
        output.status.success(),
        "shoal client failed: {:?}",
        output.status
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("answer {l:?} is not JSON: {e}"))
        })
        .collect()
}

fn one_shot(cluster: &Cluster, args: &[&str]) -> (bool, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(&args[..1])
        .args(["--cluster", &cluster.cluster_arg(), "--tls"])
        .arg(&cluster.tls)
        .args(&args[1..])
        .stderr(Stdio::inherit())
        .output()
        .expect("run shoal");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    (
        output.status.success(),
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}")),
    )
}

#[test]
fn nodes_and_json_client_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Cluster::start(dir.path(), 3);
    cluster.wait_for_leader(Duration::from_secs(20));

    let answers = client(
        &cluster,
        &[
            r#"{"op":"put","key":"k","value":"v"}"#,
            r#"{"op":"get","key":"k"}"#,
            r#"{"op":"put","key":"k","value":"w","if_version":1}"#,
            r#"{"op":"put","key":"k","value":"x","if_version":1}"#,
            r#"{"op":"put","key":"nope","value":"x","if_version":4}"#,
            r#"this is not json"#,
            r#"{"op":"append","key":"k","value":"!"}"#,
            r#"{"op":"get","key":"missing"}"#,
            r#"{"op":"put","key":"a1","value":"1"}"#,
            r#"{"op":"put","key":"a2","value":"2"}"#,
            r#"{"op":"scan","start":"a","end":"b","limit":10}"#,
            r#"{"op":"del","key":"a1"}"#,
            r#"{"op":"del","key":"a1"}"#,
            r#"{"op":"get"}"#,
            r#"{"op":"scan","start":"a","end":"z","limit":10}"#,
        ],
    );
    assert_eq!(answers.len(), 15, "{answers:?}");
    assert_eq!(answers[0], json!({"ok": true, "version": 1}));
    assert_eq!(answers[1], json!({"ok": true, "value": "v", "version": 1}));
    assert_eq!(answers[2], json!({"ok": true, "version": 2}));
    assert_eq!(
        answers[3],
        json!({"ok": false, "error": "version_mismatch", "current": 2})
    );
    assert_eq!(answers[4], json!({"ok": false, "error": "no_key"}));
    assert_eq!(answers[5]["ok"], false);
    assert_eq!(answers[5]["error"], "bad_request");
    assert!(answers[5]["detail"].is_string());
    assert_eq!(answers[6], json!({"ok": true, "version": 3}));
    assert_eq!(answers[7], json!({"ok": false, "error": "not_found"}));
    assert_eq!(
        answers[10],
        json!({"ok": true, "pairs": [{"key": "a1", "value": "1", "version": 1}, {"key": "a2", "value": "2", "version": 1}]})
    );
    assert_eq!(answers[11], json!({"ok": true, "existed": true}));
    assert_eq!(answers[12], json!({"ok": true, "existed": false}));
    assert_eq!(answers[13]["error"], "bad_request");
    assert_eq!(
        answers[14],
        json!({"ok": true, "pairs": [{"key": "a2", "value": "2", "version": 1}, {"key": "k", "value": "w!", "version": 3}]})
    );

    assert_eq!(
        one_shot(&cluster, &["put", "one", "1"]),
        (true, json!({"ok": true, "version": 1}))
    );
    assert_eq!(
        one_shot(&cluster, &["append", "one", "2"]),
        (true, json!({"ok": true, "version": 2}))
    );
    assert_eq!(
        one_shot(&cluster, &["put", "one", "x", "--if-version", "1"]),
        (
            false,
            json!({"ok": false, "error": "version_mismatch", "current": 2})
        )
    );
    assert_eq!(
        one_shot(&cluster, &["get", "one"]),
        (true, json!({"ok": true, "value": "12", "version": 2}))
    );
    assert_eq!(
        one_shot(&cluster, &["del", "one"]),
        (true, json!({"ok": true, "existed": true}))
    );
    assert_eq!(
        one_shot(&cluster, &["get", "one"]),
        (false, json!({"ok": false, "error": "not_found"}))
    );
    assert_eq!(
        one_shot(&cluster, &["scan", "a", "b"]),
        (
            true,
            json!({"ok": true, "pairs": [{"key": "a2", "value": "2", "version": 1}]})
        )
    );

    // Graceful shutdown of every node, then a restart from disk.
    for id in 1..=3 {
        let status = cluster.terminate(id, Duration::from_secs(20));
        assert!(
            status.success(),
            "node {id} exited with {status:?} on SIGTERM"
        );
    }
    for id in 1..=3 {
        cluster.start_node(id);
    }
    cluster.wait_for_leader(Duration::from_secs(20));
    assert_eq!(
        one_shot(&cluster, &["get", "k"]),
        (true, json!({"ok": true, "value": "w!", "version": 3}))
    );
}
