//! Goal (issue 14, part 5): `shoal node --status-addr` serves what an
//! operator scrapes and probes, checked with a real HTTP client against
//! real node processes: `/health` answers while the process is up; `/ready`
//! is 503 (saying why) while the node's group knows no leader and 200 once
//! it does; `/metrics` is Prometheus text whose named series carry
//! plausible values after real writes — one leader across the nodes by the
//! role gauge, proposals counted on the leader, synced log writes timed
//! on every node, client requests timed by kind, a snapshot's bytes
//! counted on both ends, and a killed leader counted as a leader change by
//! the survivors. The endpoint is bounded: a connection beyond its limit is
//! closed unanswered. Every wait polls a condition with a deadline.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{wait_for, Cluster};

/// How long any condition may take to hold.
const WAIT: Duration = Duration::from_secs(30);
/// How long one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The single-group cluster's group (`shoal_shard::node::KV_GROUP`).
const GROUP: &str = "1";

/// An HTTP client that hands back 4xx/5xx answers instead of failing.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into()
}

/// GETs `path` from the status endpoint `addr`: (status code, body), or
/// None if nobody answered.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut response = agent().get(format!("http://{addr}{path}")).call().ok()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().ok()?;
    Some((status, body))
}

/// One sample of a Prometheus text scrape: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (as this exporter writes it: no
/// escaped quotes or commas inside label values, no timestamps).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = rest
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// A node's scrape.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the series `name` whose labels include `labels`
    /// (exactly one must match), or None if there is none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name}{labels:?} matches several series: {matching:?}"
        );
        matching.first().map(|s| s.value)
    }

    /// [`Scrape::value`], 0 when the series does not exist (yet).
    fn or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

/// Scrapes `/metrics` of `addr` (it must answer 200 with the Prometheus
/// content type).
fn scrape(addr: SocketAddr) -> Scrape {
    let mut response = agent()
        .get(format!("http://{addr}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
    assert_eq!(response.status().as_u16(), 200, "/metrics of {addr}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type:?}"
    );
    let text = response.body_mut().read_to_string().expect("metrics body");
    let samples = parse(&text);
    Scrape { text, samples }
}

/// Polls node `id`'s scrape until `check` returns a value; panics naming
/// `what` (with the last scrape) after [`WAIT`].
fn wait_scrape<T>(
    cluster: &Cluster,
    id: u64,
    what: &str,
    mut check: impl FnMut(&Scrape) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let scrape = scrape(cluster.status_addr(id));
        if let Some(t) = check(&scrape) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for node {id}: {what}; last scrape:\n{}",
            scrape.text
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until node `id` answers `path` with `status` and a body that
/// contains `text`; returns the body.
fn wait_answer(cluster: &Cluster, id: u64, path: &str, status: u16, text: &str) -> String {
    let addr = cluster.status_addr(id);
    let mut body = String::new();
    wait_for(
        &format!("node {id}: {path} answering {status} {text:?}"),
        WAIT,
        || match get(addr, path) {
            Some((s, b)) if s == status && b.contains(text) => {
                body = b;
                true
            }
            _ => false,
        },
    );
    body
}

/// Opens a connection to `addr`, GETs `/health` on it (HTTP/1.1,
/// keep-alive) and reads the whole answer; the open connection if it was
/// `200 ok`.
fn served_keep_alive(addr: SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: shoal\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if body.len() >= 3 {
                return (head.starts_with("HTTP/1.1 200") && body == "ok\n").then_some(stream);
            }
        }
    }
}

/// Which nodes report themselves leader of the group (role gauge).
fn leaders(cluster: &Cluster, ids: &[u64]) -> Vec<u64> {
    ids.iter()
        .copied()
        .filter(|&id| {
            scrape(cluster.status_addr(id)).value(ROLE, &[("group", GROUP), ("role", "leader")])
                == Some(1.0)
        })
        .collect()
}

const ROLE: &str = "shoal_raft_role";
const LEADER_ID: &str = "shoal_raft_leader_id";
const LEADER_CHANGES: &str = "shoal_raft_leader_changes_total";

/// Waits until exactly one of `ids` leads, and every one of them names it
/// as leader; returns it.
fn wait_one_leader(cluster: &Cluster, ids: &[u64]) -> u64 {
    let mut leader = 0;
    wait_for("one leader that every node names", WAIT, || {
        let leading = leaders(cluster, ids);
        if leading.len() != 1 {
            return false;
        }
        leader = leading[0];
        ids.iter().all(|&id| {
            scrape(cluster.status_addr(id)).value(LEADER_ID, &[("group", GROUP)])
                == Some(leader as f64)
        })
    });
    leader
}

#[test]
fn status_endpoint_serves_metrics_health_and_readiness() {
    const WRITES: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = [1, 2, 3];
    let cluster = Cluster::with_status(dir.path(), 3, &[], &ids);

    for id in ids {
        assert_eq!(wait_answer(&cluster, id, "/health", 200, ""), "ok\n");
        let ready = wait_answer(&cluster, id, "/ready", 200, "ready");
        assert!(ready.starts_with("ready"), "node {id}: {ready:?}");
    }
    let leader = wait_one_leader(&cluster, &ids);
    for id in ids.into_iter().filter(|&id| id != leader) {
        let scrape = scrape(cluster.status_addr(id));
        assert_eq!(
            scrape.value(ROLE, &[("group", GROUP), ("role", "follower")]),
            Some(1.0),
            "node {id} follows"
        );
    }

    let client = shoal::BlockingClient::connect(&cluster.members, &cluster.tls).expect("client");
    for i in 0..WRITES {
        client.put(format!("key{i}"), "value").expect("put");
    }
    assert_eq!(client.get("key0").expect("get").value, "value");
    client.close();

    // The leader proposed the writes and timed them as client requests.
    wait_scrape(&cluster, leader, "the writes counted", |s| {
        (s.or_zero(
            "shoal_client_requests_total",
            &[("kind", "put"), ("outcome", "done")],
        ) >= WRITES as f64)
            .then_some(())
    });
    let s = scrape(cluster.status_addr(leader));
    let proposals = s.or_zero("shoal_raft_proposals_total", &[("group", GROUP)]);
    assert!(
        proposals >= WRITES as f64,
        "one entry per sequential put: {proposals}"
    );
    let puts_timed = s.or_zero(
        "shoal_client_request_duration_seconds_count",
        &[("kind", "put")],
    );
    assert!(puts_timed >= WRITES as f64, "puts timed: {puts_timed}");
    let puts_seconds = s.or_zero(
        "shoal_client_request_duration_seconds_sum",
        &[("kind", "put")],
    );
    assert!(
        puts_seconds > 0.0 && puts_seconds < WRITES as f64 * 10.0,
        "time spent in puts: {puts_seconds} s"
    );
    assert!(
        s.value(
            "shoal_client_request_duration_seconds_bucket",
            &[("kind", "put"), ("le", "+Inf")]
        ) == Some(puts_timed),
        "the +Inf bucket holds every put"
    );
    assert!(
        s.or_zero(
            "shoal_client_request_duration_seconds_count",
            &[("kind", "get")]
        ) >= 1.0,
        "the get was timed by its own kind"
    );
    assert!(
        s.text
            .contains("# HELP shoal_raft_proposals_total Entries this node proposed"),
        "series are described"
    );
    assert!(s.or_zero(LEADER_CHANGES, &[("group", GROUP)]) >= 1.0);
    assert_eq!(s.value("shoal_node_groups", &[]), Some(1.0));
    assert!(s.or_zero("shoal_node_round_duration_seconds_count", &[]) > 0.0);

    // Every node wrote its log synced, timed, and applied the writes.
    for id in ids {
        let s = wait_scrape(&cluster, id, "the writes applied", |s| {
            (s.or_zero("shoal_raft_entries_applied_total", &[("group", GROUP)]) >= WRITES as f64)
                .then(|| scrape(cluster.status_addr(id)))
        });
        let synced = s.or_zero(
            "shoal_engine_log_write_duration_seconds_count",
            &[("sync", "true")],
        );
        assert!(synced > 0.0, "node {id}: synced log writes {synced}");
        assert!(
            s.or_zero("shoal_engine_log_write_bytes_total", &[("sync", "true")]) > 0.0,
            "node {id}: log bytes"
        );
        let commit = s.or_zero("shoal_raft_commit_index", &[("group", GROUP)]);
        let applied = s.or_zero("shoal_raft_applied_index", &[("group", GROUP)]);
        assert!(
            commit >= WRITES as f64 && applied <= commit,
            "node {id}: commit {commit}, applied {applied}"
        );
        assert!(s.or_zero("shoal_raft_entries_committed_total", &[("group", GROUP)]) > 0.0);
        assert!(s.or_zero("shoal_raft_term", &[("group", GROUP)]) >= 1.0);
        assert!(s.or_zero("shoal_engine_apply_duration_seconds_count", &[]) > 0.0);
    }

    // Anything else is refused plainly.
    let addr = cluster.status_addr(leader);
    assert_eq!(get(addr, "/nope").map(|(s, _)| s), Some(404));
    let post = agent()
        .post(format!("http://{addr}/metrics"))
        .send_empty()
        .expect("POST answered");
    assert_eq!(post.status().as_u16(), 405);
    // Its connection holds a slot until closed.
    drop(post);

    // Bounded: with every connection slot held by a keep-alive client
    // (each served once, so it holds a slot), one more connection is closed
    // unanswered; once they go, the endpoint serves again.
    let held: Vec<TcpStream> = (0..shoal::status::CONNECTIONS_MAX)
        .map(|_| {
            let mut stream = None;
            // A slot still held by an earlier client frees once the server
            // sees it closed: retry until served.
            wait_for("a served keep-alive connection", WAIT, || {
                stream = served_keep_alive(addr);
                stream.is_some()
            });
            stream.expect("served")
        })
        .collect();
    let mut extra = TcpStream::connect(addr).expect("connect");
    extra.set_read_timeout(Some(HTTP_TIMEOUT)).expect("timeout");
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: shoal\r\n\r\n");
    let mut answer = Vec::new();
    match extra.read_to_end(&mut answer) {
        Ok(_) => assert!(answer.is_empty(), "answered beyond the limit: {answer:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ),
            "the connection beyond the limit: {e}"
        ),
    }
    drop(held);
    wait_answer(&cluster, leader, "/health", 200, "ok");
}

#[test]
fn readiness_follows_the_leader_and_snapshots_and_leader_changes_are_counted() {
    const WRITES: usize = 200;
    const VALUE_BYTES: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    // A tiny log limit, so the leader compacts and node 3, started late,
    // needs a snapshot.
    let mut cluster =
        Cluster::with_status(dir.path(), 3, &["--max-raft-state-bytes", "4096"], &[1]);

    // Alone, node 1 is up but cannot serve: no leader without a majority.
    assert_eq!(wait_answer(&cluster, 1, "/health", 200, ""), "ok\n");
    let why = wait_answer(&cluster, 1, "/ready", 503, "knows no leader");
    assert_eq!(why, "not ready: group 1 knows no leader\n");

    cluster.start_node(2);
    for id in [1, 2] {
        wait_answer(&cluster, id, "/ready", 200, "ready");
    }
    let client = shoal::BlockingClient::connect(&cluster.members, &cluster.tls).expect("client");
    for i in 0..WRITES {
        client
            .put(format!("key{i:03}"), vec![b'v'; VALUE_BYTES])
            .expect("put");
    }
    let leader = wait_one_leader(&cluster, &[1, 2]);
    wait_scrape(&cluster, leader, "the log compacted", |s| {
        let bytes = s.value("shoal_raft_log_bytes", &[("group", GROUP)])?;
        (bytes < (WRITES * VALUE_BYTES) as f64).then_some(())
    });

    cluster.start_node(3);
    wait_scrape(&cluster, 3, "a snapshot received and installed", |s| {
        (s.or_zero("shoal_snapshot_received_bytes_total", &[("kind", "raft")]) > 0.0
            && s.or_zero("shoal_raft_snapshots_installed_total", &[("group", GROUP)]) >= 1.0)
            .then_some(())
    });
    let sent = scrape(cluster.status_addr(leader))
        .or_zero("shoal_snapshot_sent_bytes_total", &[("kind", "raft")]);
    assert!(
        sent > 0.0,
        "the leader counted the snapshot it sent: {sent}"
    );
    wait_answer(&cluster, 3, "/ready", 200, "ready");
    assert_eq!(
        client.get("key000").expect("get").value,
        vec![b'v'; VALUE_BYTES]
    );

    // A killed leader: the survivors elect another and count the change.
    let leader = wait_one_leader(&cluster, &[1, 2, 3]);
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    let before: Vec<(u64, f64, f64)> = survivors
        .iter()
        .map(|&id| {
            let s = scrape(cluster.status_addr(id));
            (
                id,
                s.or_zero(LEADER_CHANGES, &[("group", GROUP)]),
                s.or_zero("shoal_raft_elections_started_total", &[("group", GROUP)]),
            )
        })
        .collect();
    cluster.kill(leader);
    let new_leader = wait_one_leader(&cluster, &survivors);
    assert_ne!(new_leader, leader);
    let mut elections = 0.0;
    for (id, changes_before, elections_before) in before {
        let s = scrape(cluster.status_addr(id));
        let changes = s.or_zero(LEADER_CHANGES, &[("group", GROUP)]);
        assert!(
            changes > changes_before,
            "node {id} counted the new leader: {changes_before} -> {changes}"
        );
        elections +=
            s.or_zero("shoal_raft_elections_started_total", &[("group", GROUP)]) - elections_before;
    }
    assert!(elections >= 1.0, "the new leader's election was counted");
    for id in &survivors {
        wait_answer(&cluster, *id, "/ready", 200, "ready");
    }
    client.close();
}

#[test]
fn prometheus_text_parses_as_expected() {
    let samples = parse(
        "# HELP a_total help\n# TYPE a_total counter\na_total{group=\"1\",role=\"leader\"} 3\nb 0.5\n",
    );
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].name, "a_total");
    assert_eq!(samples[0].labels["role"], "leader");
    assert_eq!(samples[0].value, 3.0);
    assert_eq!(samples[1].name, "b");
    assert!(samples[1].labels.is_empty());
}
