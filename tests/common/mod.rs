//! Real `shoal node` processes on loopback for the cluster tests: the
//! library's [`LocalCluster`] (certificates, free ports, start / kill /
//! terminate / restart, status files) with the nodes' logs on stderr,
//! panicking instead of returning errors, plus partitions through the admin
//! RPC (nodes started with `--fault-injection`). Every child is SIGKILLed
//! when the cluster is dropped (also when a test panics). [`workload`]
//! holds the concurrent clients whose history the crash tests check.

#![allow(dead_code)]

pub mod workload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal::cluster::{self, BlockingClient, ClientOptions, NodeStatus};
use shoal::local_cluster::LocalCluster;
use shoal_net::NodeId;

/// Polls `condition` until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    shoal::local_cluster::wait_for(what, timeout, || condition().then_some(()))
        .unwrap_or_else(|e| panic!("{e}"));
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

/// Runs `command` to completion (it must succeed, `what` names it in the
/// panic) and returns its stdout's JSON lines.
fn json_lines(command: &mut Command, what: &str) -> Vec<serde_json::Value> {
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {:?}",
        output.status
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect()
}

/// A cluster of `shoal node` processes.
pub struct Cluster {
    pub tls: PathBuf,
    pub members: Vec<(u64, SocketAddr)>,
    nodes: LocalCluster,
}

impl Cluster {
    /// Creates certificates and starts `n` nodes under `root`.
    pub fn start(root: &Path, n: u64) -> Cluster {
        Cluster::start_with(root, n, false)
    }

    /// [`Cluster::start`], the nodes with `--fault-injection` if asked.
    pub fn start_with(root: &Path, n: u64, fault_injection: bool) -> Cluster {
        let args: &[&str] = if fault_injection {
            &["--fault-injection"]
        } else {
            &[]
        };
        Cluster::start_args(root, n, args)
    }

    /// Creates certificates for `n` nodes and starts them, the nodes of
    /// `joining` with `--join`: not members until `shoal member add`.
    #[allow(dead_code)]
    pub fn start_joining(root: &Path, n: u64, joining: &[u64]) -> Cluster {
        Cluster::start_joining_after(root, n, joining, |_| {})
    }

    /// [`Cluster::start_joining`], running `prepare` (given each node's
    /// data directory) before any node starts.
    #[allow(dead_code)]
    pub fn start_joining_after(
        root: &Path,
        n: u64,
        joining: &[u64],
        prepare: impl FnOnce(&dyn Fn(u64) -> PathBuf),
    ) -> Cluster {
        Cluster::start_joining_args(root, n, joining, &[], prepare)
    }

    /// [`Cluster::start_joining_after`], every node with the extra
    /// arguments `args`.
    #[allow(dead_code)]
    pub fn start_joining_args(
        root: &Path,
        n: u64,
        joining: &[u64],
        args: &[&str],
        prepare: impl FnOnce(&dyn Fn(u64) -> PathBuf),
    ) -> Cluster {
        let mut nodes = LocalCluster::create(env!("CARGO_BIN_EXE_shoal").as_ref(), root, n, args)
            .expect("certificates and ports");
        nodes.inherit_stderr();
        for &id in joining {
            nodes.set_joining(id);
        }
        prepare(&|id| nodes.data_dir(id));
        nodes.start_all().expect("start the nodes");
        Cluster {
            tls: nodes.tls_dir().to_path_buf(),
            members: nodes.members().to_vec(),
            nodes,
        }
    }

    /// `shoal member ARGS` as the admin; returns its JSON lines (it must
    /// succeed).
    #[allow(dead_code)]
    pub fn member(&self, args: &[&str]) -> Vec<serde_json::Value> {
        self.member_at(&self.cluster_arg(), args)
    }

    /// [`Cluster::member`] with `--cluster cluster`.
    #[allow(dead_code)]
    pub fn member_at(&self, cluster: &str, args: &[&str]) -> Vec<serde_json::Value> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shoal"));
        command
            .arg("member")
            .args(["--cluster", cluster, "--tls"])
            .arg(&self.tls)
            .args(["--name", "admin", "--timeout-ms", "30000"])
            .args(args);
        json_lines(&mut command, &format!("shoal member {args:?}"))
    }

    /// [`Cluster::start`], every node with the extra arguments `args`.
    pub fn start_args(root: &Path, n: u64, args: &[&str]) -> Cluster {
        let mut nodes = LocalCluster::create(env!("CARGO_BIN_EXE_shoal").as_ref(), root, n, args)
            .expect("certificates and ports");
        nodes.inherit_stderr();
        nodes.start_all().expect("start the nodes");
        Cluster {
            tls: nodes.tls_dir().to_path_buf(),
            members: nodes.members().to_vec(),
            nodes,
        }
    }

    /// Creates certificates for `n` nodes under `root`, each node serving
    /// its status endpoint (`--status-addr`, [`Cluster::status_addr`]) and
    /// taking the extra arguments `args`; starts the nodes of `start` only.
    pub fn with_status(root: &Path, n: u64, args: &[&str], start: &[u64]) -> Cluster {
        let mut nodes = LocalCluster::create(env!("CARGO_BIN_EXE_shoal").as_ref(), root, n, args)
            .expect("certificates and ports");
        nodes.serve_status().expect("status ports");
        nodes.inherit_stderr();
        nodes.start_many(start).expect("start the nodes");
        Cluster {
            tls: nodes.tls_dir().to_path_buf(),
            members: nodes.members().to_vec(),
            nodes,
        }
    }

    /// Node `id`'s status endpoint (see [`Cluster::with_status`]).
    pub fn status_addr(&self, id: u64) -> SocketAddr {
        self.nodes
            .status_addr(id)
            .expect("the cluster serves status endpoints")
    }

    /// `shoal shard ARGS` as the admin of the sharded cluster whose
    /// controller group is on `controller` (e.g. "1,2,3"), each step
    /// retried for up to `timeout_ms`.
    pub fn shard_command(&self, controller: &str, timeout_ms: u64, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shoal"));
        command
            .arg("shard")
            .args(["--cluster", &self.cluster_arg(), "--tls"])
            .arg(&self.tls)
            .args([
                "--name",
                "admin",
                "--controller",
                controller,
                "--timeout-ms",
            ])
            .arg(timeout_ms.to_string())
            .args(args);
        command
    }

    /// Runs [`Cluster::shard_command`] to completion (it must succeed);
    /// returns its JSON lines.
    pub fn shard(
        &self,
        controller: &str,
        timeout_ms: u64,
        args: &[&str],
    ) -> Vec<serde_json::Value> {
        json_lines(
            &mut self.shard_command(controller, timeout_ms, args),
            &format!("shoal shard {args:?}"),
        )
    }

    /// Every node id.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.ids()
    }

    pub fn cluster_arg(&self) -> String {
        cluster::format_members(&self.members)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.nodes.data_dir(id)
    }

    /// Starts (or restarts) node `id` and waits until it listens.
    pub fn start_node(&mut self, id: u64) {
        self.start_nodes(&[id]);
    }

    /// Starts (or restarts) every node of `ids` at once, then waits until
    /// each listens.
    pub fn start_nodes(&mut self, ids: &[u64]) {
        self.nodes.start_many(ids).expect("start nodes");
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.is_running(id)
    }

    /// SIGKILLs node `id` (a crash) and reaps it.
    pub fn kill(&mut self, id: u64) {
        self.kill_many(&[id]);
    }

    /// SIGKILLs every node of `ids` at once (all signals sent before any
    /// is reaped), then reaps them.
    pub fn kill_many(&mut self, ids: &[u64]) {
        self.nodes.kill_many(ids).expect("kill nodes");
    }

    /// The ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes.running()
    }

    /// The nodes that exited on their own (a crash the test did not
    /// cause), with how they exited; they count as stopped from then on.
    pub fn exited(&mut self) -> Vec<(u64, std::process::ExitStatus)> {
        self.nodes.exited().expect("check the nodes")
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
    /// committed when this was called.
    pub fn wait_caught_up(&self, timeout: Duration) {
        self.nodes
            .wait_caught_up(timeout)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGTERMs node `id` and waits (at most `timeout`) for it to exit.
    pub fn terminate(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        self.nodes
            .terminate(id, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The status node `id` last wrote, if it is running and wrote one.
    pub fn status(&self, id: u64) -> Option<NodeStatus> {
        self.nodes.status(id)
    }

    /// The running leader with the highest term, if any.
    pub fn leader(&self) -> Option<u64> {
        self.nodes.leader().map(|s| s.id)
    }

    /// Waits until some running node leads.
    pub fn wait_for_leader(&self, timeout: Duration) -> u64 {
        self.nodes
            .wait_for_leader(timeout)
            .unwrap_or_else(|e| panic!("{e}"))
            .id
    }
}
