//! A cluster of `shoal node` processes on loopback, run by this process:
//! certificates, free ports, start / SIGKILL / SIGTERM / restart, the
//! nodes' status files and process ids. The demo (`shoal demo`) and the
//! load generator (`shoal bench`) run their clusters with it.
//!
//! Every child is SIGKILLed when the [`LocalCluster`] is dropped, on
//! success, error or panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{self, NodeStatus};

/// How often the `wait_*` helpers re-check their condition.
const POLL_INTERVAL_MS: u64 = 20;

/// A UDP port nobody is bound to right now on 127.0.0.1.
pub fn free_udp_addr() -> Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a free UDP port")?;
    Ok(socket.local_addr()?)
}

/// A TCP port nobody is listening on right now on 127.0.0.1.
pub fn free_tcp_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free TCP port")?;
    Ok(listener.local_addr()?)
}

/// Polls `probe` until it returns a value; fails naming `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = probe() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
}

/// `shoal node` processes on loopback under one directory:
/// `DIR/tls` (certificates), `DIR/node-N` (data), `DIR/node-N.log` (stderr).
#[derive(Debug)]
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    tls: PathBuf,
    members: Vec<(u64, SocketAddr)>,
    extra_args: Vec<String>,
    inherit_stderr: bool,
    /// Each node's `--status-addr`, once [`LocalCluster::serve_status`].
    status_addrs: BTreeMap<u64, SocketAddr>,
    children: BTreeMap<u64, Child>,
    /// Nodes started with `--join`: not members at first (see
    /// [`LocalCluster::set_joining`]).
    joining: std::collections::BTreeSet<u64>,
}

impl LocalCluster {
    /// Creates certificates (nodes `1..=n`, clients `client` and `admin`)
    /// and picks a free port per node; starts nothing. `exe` is the `shoal`
    /// binary; `extra_args` are passed to every `shoal node`.
    pub fn create(exe: &Path, dir: &Path, n: u64, extra_args: &[&str]) -> Result<LocalCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tls = dir.join("tls");
        let ids: Vec<u64> = (1..=n).collect();
        crate::certs::init(&tls, &ids, &["client".into(), "admin".into()])?;
        let members = ids
            .iter()
            .map(|&id| Ok((id, free_udp_addr()?)))
            .collect::<Result<_>>()?;
        Ok(LocalCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            tls,
            members,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            inherit_stderr: false,
            status_addrs: BTreeMap::new(),
            children: BTreeMap::new(),
            joining: Default::default(),
        })
    }

    /// Nodes started from now on write their logs to this process's stderr
    /// instead of `DIR/node-N.log` (tests, so a failure shows the logs).
    pub fn inherit_stderr(&mut self) {
        self.inherit_stderr = true;
    }

    /// Nodes started from now on serve their metrics, `/health` and
    /// `/ready` (`shoal node --status-addr`), each on a free TCP port of
    /// 127.0.0.1 picked now ([`LocalCluster::status_addr`]).
    pub fn serve_status(&mut self) -> Result<()> {
        for id in self.ids() {
            self.status_addrs.insert(id, free_tcp_addr()?);
        }
        Ok(())
    }

    /// Node `id`'s status address (see [`LocalCluster::serve_status`]).
    pub fn status_addr(&self, id: u64) -> Option<SocketAddr> {
        self.status_addrs.get(&id).copied()
    }

    /// Node `id` is not a member at first: it starts with `--join` (its
    /// certificate and address exist) and the others' `--peers` leave it
    /// out, until `shoal member add` adds it.
    pub fn set_joining(&mut self, id: u64) {
        self.joining.insert(id);
    }

    /// Every member's id.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|&(id, _)| id).collect()
    }

    /// Every member: (id, address).
    pub fn members(&self) -> &[(u64, SocketAddr)] {
        &self.members
    }

    /// The certificate directory.
    pub fn tls_dir(&self) -> &Path {
        &self.tls
    }

    /// The member list as `--cluster` / `--peers` take it.
    pub fn cluster_arg(&self) -> String {
        cluster::format_members(&self.members)
    }

    /// The initial members (without the joining nodes), as `--peers`
    /// takes them.
    fn peers_arg(&self) -> String {
        let initial: Vec<(u64, SocketAddr)> = self
            .members
            .iter()
            .filter(|(id, _)| !self.joining.contains(id))
            .copied()
            .collect();
        cluster::format_members(&initial)
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Starts every node that is not running.
    pub fn start_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self
            .ids()
            .into_iter()
            .filter(|&id| !self.is_running(id))
            .collect();
        self.start_many(&ids)
    }

    /// Starts (or restarts) node `id` and waits until it listens.
    pub fn start(&mut self, id: u64) -> Result<()> {
        self.start_many(&[id])
    }

    /// Starts (or restarts) every node of `ids` at once, then waits until
    /// each listens.
    pub fn start_many(&mut self, ids: &[u64]) -> Result<()> {
        let mut outputs = Vec::new();
        for &id in ids {
            let mut child = self.spawn(id)?;
            let stdout = BufReader::new(child.stdout.take().context("node stdout")?);
            // Owned by the cluster at once, so a failure below still kills it.
            self.children.insert(id, child);
            outputs.push((id, stdout));
        }
        for (id, mut stdout) in outputs {
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            if !line.contains("listening") {
                bail!("node {id} did not start: {line:?} (see its log)");
            }
            // Keep draining so the node never blocks on a full pipe.
            std::thread::spawn(move || for _ in stdout.lines() {});
        }
        Ok(())
    }

    fn spawn(&self, id: u64) -> Result<Child> {
        if self.is_running(id) {
            bail!("node {id} is running");
        }
        let addr = self
            .members
            .iter()
            .find(|&&(m, _)| m == id)
            .with_context(|| format!("node {id} is not a member"))?
            .1;
        let data = self.data_dir(id);
        std::fs::create_dir_all(&data)?;
        // A stale status file from the previous run must not be mistaken for this one's.
        let _ = std::fs::remove_file(cluster::status_path(&data));
        let stderr = if self.inherit_stderr {
            Stdio::inherit()
        } else {
            let log = self.dir.join(format!("node-{id}.log"));
            File::options().create(true).append(true).open(log)?.into()
        };
        let status: Vec<String> = self
            .status_addr(id)
            .map(|addr| vec!["--status-addr".into(), addr.to_string()])
            .unwrap_or_default();
        Command::new(&self.exe)
            .args(["node", "--id", &id.to_string(), "--data"])
            .arg(&data)
            .args([
                "--listen",
                &addr.to_string(),
                "--peers",
                &self.peers_arg(),
                "--tls",
            ])
            .arg(&self.tls)
            .args(self.joining.contains(&id).then_some("--join"))
            .args(&self.extra_args)
            .args(&status)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))
    }

    /// Whether node `id` was started and not killed since.
    pub fn is_running(&self, id: u64) -> bool {
        self.children.contains_key(&id)
    }

    /// Process id of node `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children.get(&id).map(Child::id)
    }

    /// The ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.children.keys().copied().collect()
    }

    /// The nodes that exited on their own (neither killed nor terminated
    /// here) since they were started, with how they exited. They count as
    /// stopped from then on, so a restart is up to the caller.
    pub fn exited(&mut self) -> Result<Vec<(u64, ExitStatus)>> {
        let mut exited = Vec::new();
        for (&id, child) in &mut self.children {
            if let Some(status) = child.try_wait().with_context(|| format!("node {id}"))? {
                exited.push((id, status));
            }
        }
        for (id, _) in &exited {
            self.children.remove(id);
        }
        Ok(exited)
    }

    /// SIGKILLs node `id` (a crash) and reaps it.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        self.kill_many(&[id])
    }

    /// SIGKILLs every node of `ids` at once (all signals sent before any is
    /// reaped), then reaps them.
    pub fn kill_many(&mut self, ids: &[u64]) -> Result<()> {
        let mut killed = Vec::new();
        for &id in ids {
            let mut child = self
                .children
                .remove(&id)
                .with_context(|| format!("node {id} is not running"))?;
            child.kill()?;
            killed.push(child);
        }
        for mut child in killed {
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERMs node `id` and waits (at most `timeout`) for it to exit;
    /// returns how it exited.
    pub fn terminate(&mut self, id: u64, timeout: Duration) -> Result<ExitStatus> {
        let child = self
            .children
            .remove(&id)
            .with_context(|| format!("node {id} is not running"))?;
        sigterm(&child)?;
        wait_exit(id, child, Instant::now() + timeout)
    }

    /// SIGTERM to every running node, then waits (at most `timeout`) for
    /// each to exit cleanly.
    pub fn stop_all(&mut self, timeout: Duration) -> Result<()> {
        for child in self.children.values() {
            sigterm(child)?;
        }
        let deadline = Instant::now() + timeout;
        for (id, child) in std::mem::take(&mut self.children) {
            let status = wait_exit(id, child, deadline)?;
            if !status.success() {
                bail!("node {id} exited with {status}");
            }
        }
        Ok(())
    }

    /// The status node `id` last wrote, if it runs and wrote one.
    pub fn status(&self, id: u64) -> Option<NodeStatus> {
        let child = self.children.get(&id)?;
        cluster::read_status(&self.data_dir(id)).filter(|s| s.pid == child.id())
    }

    /// The running leader with the highest term, if any.
    pub fn leader(&self) -> Option<NodeStatus> {
        self.children
            .keys()
            .filter_map(|&id| self.status(id))
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
    }

    /// Waits until some running node leads.
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<NodeStatus> {
        wait_for("a leader", timeout, || self.leader())
    }

    /// Waits until every running node has applied what the leader had
    /// committed when this was called (under load the commit index moves
    /// on; that moment's value is the target).
    pub fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        let target = self.wait_for_leader(timeout)?.commit;
        for id in self.running() {
            wait_for(
                &format!("node {id} to catch up to {target}"),
                timeout,
                || self.status(id).filter(|s| s.applied >= target),
            )?;
        }
        Ok(())
    }
}

fn sigterm(child: &Child) -> Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -TERM {} failed", child.id());
    }
    Ok(())
}

/// Waits for `child` (node `id`) to exit; SIGKILLs it and fails at `deadline`.
fn wait_exit(id: u64, mut child: Child, deadline: Instant) -> Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("node {id} did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
