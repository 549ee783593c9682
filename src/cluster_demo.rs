//! `shoal demo`: a 3-node cluster of real `shoal node` processes on
//! loopback, a write/read workload, the leader SIGKILLed mid-workload,
//! service continuing under a new leader, the killed node restarted and
//! caught up, and a final check that no acknowledged write was lost.
//!
//! Every child is killed when the demo ends, on success, error or panic
//! ([`Nodes`]'s `Drop`); the node processes also get the terminal's SIGINT
//! on Ctrl-C and shut down gracefully.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use shoal::cluster::{self, BlockingClient, ClientError, ClientOptions, NodeStatus};

/// Nodes in the demo cluster.
const NODES: u64 = 3;
/// Keys written before the leader is killed, and after.
const WRITES_PER_PHASE: u64 = 300;
/// Longest wait for any cluster condition (leader, catch-up, exit).
const WAIT_MAX: Duration = Duration::from_secs(30);

/// The node processes; killed on drop.
struct Nodes {
    exe: PathBuf,
    dir: PathBuf,
    tls: PathBuf,
    members: Vec<(u64, SocketAddr)>,
    children: BTreeMap<u64, Child>,
}

impl Nodes {
    fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn start(&mut self, id: u64) -> Result<()> {
        let data = self.data_dir(id);
        std::fs::create_dir_all(&data)?;
        let _ = std::fs::remove_file(cluster::status_path(&data));
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))?;
        let addr = self.members[id as usize - 1].1;
        let mut child = Command::new(&self.exe)
            .args(["node", "--id", &id.to_string(), "--data"])
            .arg(&data)
            .args([
                "--listen",
                &addr.to_string(),
                "--peers",
                &cluster::format_members(&self.members),
                "--tls",
            ])
            .arg(&self.tls)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting shoal node")?;
        let mut stdout = BufReader::new(child.stdout.take().context("node stdout")?);
        self.children.insert(id, child);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.contains("listening") {
            bail!(
                "node {id} did not start (see {}/node-{id}.log)",
                self.dir.display()
            );
        }
        std::thread::spawn(move || for _ in stdout.lines() {});
        Ok(())
    }

    fn kill(&mut self, id: u64) -> Result<()> {
        let mut child = self.children.remove(&id).context("node not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM to every node, then wait for them to exit.
    fn stop_all(&mut self) -> Result<()> {
        for child in self.children.values() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
        }
        let deadline = Instant::now() + WAIT_MAX;
        for (id, mut child) in std::mem::take(&mut self.children) {
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        bail!("node {id} exited with {status}");
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("node {id} did not exit after SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    fn status(&self, id: u64) -> Option<NodeStatus> {
        let child = self.children.get(&id)?;
        cluster::read_status(&self.data_dir(id)).filter(|s| s.pid == child.id())
    }

    fn leader(&self) -> Option<NodeStatus> {
        self.children
            .keys()
            .filter_map(|&id| self.status(id))
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
    }

    fn wait_for<T>(&self, what: &str, mut probe: impl FnMut(&Nodes) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            if let Some(t) = probe(self) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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
    let tls = dir.join("tls");
    let ids: Vec<u64> = (1..=NODES).collect();
    shoal::certs::init(&tls, &ids, &["client".into(), "admin".into()])?;
    let members: Vec<(u64, SocketAddr)> = ids
        .iter()
        .map(|&id| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
            Ok((id, socket.local_addr()?))
        })
        .collect::<std::io::Result<_>>()?;
    println!("Shoal cluster demo: {NODES} `shoal node` processes on loopback (QUIC + mutual TLS, RocksDB), data in {}", dir.display());
    println!(
        "  certificates in {}; cluster {}",
        tls.display(),
        cluster::format_members(&members)
    );
    let mut nodes = Nodes {
        exe: std::env::current_exe()?,
        dir: dir.clone(),
        tls: tls.clone(),
        members: members.clone(),
        children: BTreeMap::new(),
    };
    for &id in &ids {
        nodes.start(id)?;
    }
    let first = nodes.wait_for("a leader", Nodes::leader)?;
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
    let second = nodes.wait_for("a new leader", Nodes::leader)?;
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
    let (caught, target) = nodes.wait_for("the restarted node to catch up", |n| {
        let leader = n.leader()?;
        let restarted = n.status(victim.id)?;
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
    let third = nodes.wait_for("a third leader", Nodes::leader)?;
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
    nodes.wait_for("every node to catch up", |n| {
        let leader = n.leader()?;
        ids.iter()
            .all(|&id| n.status(id).is_some_and(|s| s.applied >= leader.commit))
            .then_some(())
    })?;
    client.close();
    nodes.stop_all()?;

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
    Ok(())
}
