//! Real `shoal node` processes on loopback for the cluster tests: a
//! certificate directory, free ports, start/kill/terminate/restart, the
//! nodes' status files, and partitions through the admin RPC (nodes started
//! with `--fault-injection`). Every child is SIGKILLed when the cluster is
//! dropped (also when a test panics). [`workload`] holds the concurrent
//! clients whose history the crash tests check.

#![allow(dead_code)]

pub mod workload;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal::cluster::{self, BlockingClient, ClientOptions, NodeStatus};
use shoal_net::NodeId;

/// A UDP port nobody is bound to right now on 127.0.0.1.
pub fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a free port");
    socket.local_addr().expect("local addr")
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Retries an admin call until it succeeds; panics with the last error
/// after `timeout`.
pub fn retry_admin(
    what: &str,
    timeout: Duration,
    mut call: impl FnMut() -> Result<(), shoal_shard::AdminError>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        match call() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A cluster of `shoal node` processes.
pub struct Cluster {
    pub root: PathBuf,
    pub tls: PathBuf,
    pub members: Vec<(u64, SocketAddr)>,
    /// Whether nodes run with `--fault-injection` (admin partitions).
    pub fault_injection: bool,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// Creates certificates and starts `n` nodes under `root`.
    pub fn start(root: &Path, n: u64) -> Cluster {
        Cluster::start_with(root, n, false)
    }

    /// [`Cluster::start`], the nodes with `--fault-injection` if asked.
    pub fn start_with(root: &Path, n: u64, fault_injection: bool) -> Cluster {
        let tls = root.join("tls");
        let ids: Vec<u64> = (1..=n).collect();
        shoal::certs::init(&tls, &ids, &["client".into(), "admin".into()]).expect("certs");
        let members = ids.iter().map(|&id| (id, free_udp_addr())).collect();
        let mut cluster = Cluster {
            root: root.to_path_buf(),
            tls,
            members,
            fault_injection,
            children: (0..n).map(|_| None).collect(),
        };
        cluster.start_nodes(&ids);
        cluster
    }

    /// Every node id.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|&(id, _)| id).collect()
    }

    pub fn cluster_arg(&self) -> String {
        cluster::format_members(&self.members)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}"))
    }

    /// Starts (or restarts) node `id` and waits until it listens.
    pub fn start_node(&mut self, id: u64) {
        self.start_nodes(&[id]);
    }

    /// Starts (or restarts) every node of `ids` at once, then waits until
    /// each listens.
    pub fn start_nodes(&mut self, ids: &[u64]) {
        let mut outputs = Vec::new();
        for &id in ids {
            let mut child = self.spawn_node(id);
            outputs.push((id, BufReader::new(child.stdout.take().expect("stdout"))));
            // Owned by the cluster at once, so a failure below still kills it.
            self.children[id as usize - 1] = Some(child);
        }
        for (id, mut stdout) in outputs {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("node output");
            assert!(
                line.contains("listening"),
                "node {id} did not start: {line:?}"
            );
            // Keep draining so the node never blocks on a full pipe.
            std::thread::spawn(move || for _ in stdout.lines() {});
        }
    }

    fn spawn_node(&mut self, id: u64) -> Child {
        assert!(
            self.children[id as usize - 1].is_none(),
            "node {id} is running"
        );
        let addr = self.members[id as usize - 1].1;
        // A stale status file from the previous run must not be mistaken for this one's.
        let _ = std::fs::remove_file(cluster::status_path(&self.data_dir(id)));
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["node", "--id", &id.to_string(), "--data"])
            .arg(self.data_dir(id))
            .args([
                "--listen",
                &addr.to_string(),
                "--peers",
                &self.cluster_arg(),
                "--tls",
            ])
            .arg(&self.tls)
            .args(self.fault_injection.then_some("--fault-injection"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start shoal node")
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.children[id as usize - 1].is_some()
    }

    /// SIGKILLs node `id` (a crash) and reaps it.
    pub fn kill(&mut self, id: u64) {
        self.kill_many(&[id]);
    }

    /// SIGKILLs every node of `ids` at once (all signals sent before any
    /// is reaped), then reaps them.
    pub fn kill_many(&mut self, ids: &[u64]) {
        let mut killed = Vec::new();
        for &id in ids {
            let mut child = self.children[id as usize - 1].take().expect("node running");
            child.kill().expect("kill");
            killed.push(child);
        }
        for mut child in killed {
            child.wait().expect("wait");
        }
    }

    /// The ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|&id| self.is_running(id))
            .collect()
    }

    /// A client with the admin certificate (status and fault-filter RPCs).
    pub fn admin(&self) -> BlockingClient {
        let options = ClientOptions {
            name: shoal_net::ADMIN_CLIENT_NAME.into(),
            rpc_deadline: Duration::from_millis(1000),
            ..ClientOptions::default()
        };
        BlockingClient::connect_with(&self.members, &self.tls, options).expect("admin client")
    }

    /// Splits the nodes into `sides` that talk only within themselves: each
    /// node's fault filter blocks every node on another side (set through
    /// the admin RPC, retried until `timeout`). Needs `fault_injection`.
    pub fn partition(&self, admin: &BlockingClient, sides: &[Vec<u64>], timeout: Duration) {
        for side in sides {
            let blocked: Vec<NodeId> = self
                .ids()
                .into_iter()
                .filter(|id| !side.contains(id))
                .map(NodeId)
                .collect();
            for &id in side {
                retry_admin(
                    &format!("node {id} to take its fault filter"),
                    timeout,
                    || admin.set_fault_filter(NodeId(id), blocked.clone()),
                );
            }
        }
    }

    /// Clears the fault filter of every running node.
    pub fn heal(&self, admin: &BlockingClient, timeout: Duration) {
        for id in self.running() {
            retry_admin(
                &format!("node {id} to clear its fault filter"),
                timeout,
                || admin.clear_fault_filter(NodeId(id)),
            );
        }
    }

    /// Waits until every running node has applied what the leader had
    /// committed when this was called (under load the commit index moves
    /// on; that moment's value is the target).
    pub fn wait_caught_up(&self, timeout: Duration) {
        let leader = self.wait_for_leader(timeout);
        let target = self.status(leader).map_or(0, |s| s.commit);
        for id in self.running() {
            wait_for(
                &format!("node {id} to catch up to {target}"),
                timeout,
                || self.status(id).is_some_and(|s| s.applied >= target),
            );
        }
    }

    /// SIGTERMs node `id` and waits (at most `timeout`) for a clean exit.
    pub fn terminate(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.children[id as usize - 1].take().expect("node running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("node {id} did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status node `id` last wrote, if it is running and wrote one.
    pub fn status(&self, id: u64) -> Option<NodeStatus> {
        let child = self.children[id as usize - 1].as_ref()?;
        cluster::read_status(&self.data_dir(id)).filter(|s| s.pid == child.id())
    }

    /// The running leader with the highest term, if any.
    pub fn leader(&self) -> Option<u64> {
        self.members
            .iter()
            .filter_map(|&(id, _)| self.status(id))
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// Waits until some running node leads.
    pub fn wait_for_leader(&self, timeout: Duration) -> u64 {
        let mut leader = None;
        wait_for("a leader", timeout, || {
            leader = self.leader();
            leader.is_some()
        });
        leader.expect("leader")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
