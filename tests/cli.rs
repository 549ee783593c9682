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
            r#"{"op":"batch","conditions":[{"key":"bk","version":0}],"writes":[{"op":"put","key":"bk","value":"b"},{"op":"del","key":"absent"}]}"#,
            r#"{"op":"batch","conditions":[{"key":"bk","version":0}],"writes":[{"op":"put","key":"bk","value":"c"}]}"#,
            r#"{"op":"get","key":"bk"}"#,
        ],
    );
    assert_eq!(answers.len(), 18, "{answers:?}");
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
    assert_eq!(answers[15], json!({"ok": true, "versions": [1, 0]}));
    assert_eq!(
        answers[16],
        json!({"ok": false, "error": "condition_failed", "index": 0, "current": 1})
    );
    assert_eq!(answers[17], json!({"ok": true, "value": "b", "version": 1}));

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
    // SHOAL_CLUSTER / SHOAL_TLS stand for --cluster / --tls, and a
    // missing key has its own exit code (3; bad input 2, unavailable 4).
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["get", "one"])
        .env("SHOAL_CLUSTER", cluster.cluster_arg())
        .env("SHOAL_TLS", &cluster.tls)
        .stderr(Stdio::inherit())
        .output()
        .expect("run shoal");
    assert_eq!(output.status.code(), Some(shoal::jsonl::EXIT_NOT_FOUND));
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["get", "one", "--cluster", "not-a-member-list"])
        .env("SHOAL_TLS", &cluster.tls)
        .output()
        .expect("run shoal");
    assert!(!output.status.success(), "a bad member list is refused");
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

// Goal: `shoal status` prints one line per node in the status file's
// schema (from the status RPC, any client certificate), and admin requests
// over QUIC are refused — for a non-admin client, and for the admin client
// on nodes without `--fault-injection` — while the nodes keep serving.
#[test]
fn status_command_and_admin_refusals() {
    use shoal::cluster::{BlockingClient, ClientOptions};
    use shoal_shard::{AdminError, Denied};

    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start(dir.path(), 3);
    let leader = cluster.wait_for_leader(Duration::from_secs(20));
    let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["status", "--cluster", &cluster.cluster_arg(), "--tls"])
        .arg(&cluster.tls)
        .stderr(Stdio::inherit())
        .output()
        .expect("run shoal status");
    assert!(output.status.success(), "shoal status failed");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let id = i as u64 + 1;
        let file = cluster.status(id).expect("status file");
        assert_eq!(line["id"], id);
        assert_eq!(line["pid"], file.pid, "{line}");
        assert!(line["term"].as_u64().expect("term") >= 1);
        for key in ["role", "leader", "commit", "applied"] {
            assert!(!line[key].is_null(), "{key} missing in {line}");
        }
        if id == leader {
            assert_eq!(line["role"], "leader", "{line}");
        }
    }

    let connect = |name: &str| {
        let options = ClientOptions {
            name: name.into(),
            ..ClientOptions::default()
        };
        BlockingClient::connect_with(&cluster.members, &cluster.tls, options).expect("client")
    };
    let client = connect("client");
    let node = shoal_net::NodeId(leader);
    assert_eq!(
        client.set_fault_filter(node, vec![shoal_net::NodeId(1)]),
        Err(AdminError::Denied(Denied::NotAdmin))
    );
    let admin = connect("admin");
    assert_eq!(
        admin.set_fault_filter(node, vec![shoal_net::NodeId(1)]),
        Err(AdminError::Denied(Denied::FaultInjectionDisabled))
    );
    assert_eq!(
        admin.clear_fault_filter(node),
        Err(AdminError::Denied(Denied::FaultInjectionDisabled))
    );
    assert!(admin
        .node_status(node)
        .expect("status rpc")
        .blocked
        .is_empty());
    assert_eq!(client.put("still", "up"), Ok(1));
    client.close();
    admin.close();
}
