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
use std::process::{Child, Command, Stdio};
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
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding a free TCP port")?;
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
    children: BTreeMap<u64, Child>,
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
            children: BTreeMap::new(),
        })
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

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Starts every node that is not running.
    pub fn start_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self.members.iter().map(|&(id, _)| id).collect();
        for id in ids {
            if !self.is_running(id) {
                self.start(id)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts) node `id` and waits until it listens.
    pub fn start(&mut self, id: u64) -> Result<()> {
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
        let log_path = self.dir.join(format!("node-{id}.log"));
        let log = File::options().create(true).append(true).open(&log_path)?;
        let mut child = Command::new(&self.exe)
            .args(["node", "--id", &id.to_string(), "--data"])
            .arg(&data)
            .args(["--listen", &addr.to_string(), "--peers", &self.cluster_arg(), "--tls"])
            .arg(&self.tls)
            .args(&self.extra_args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().context("node stdout")?);
        self.children.insert(id, child);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.contains("listening") {
            bail!("node {id} did not start (see {})", log_path.display());
        }
        // Keep draining so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in stdout.lines() {});
        Ok(())
    }

    /// Whether node `id` was started and not killed since.
    pub fn is_running(&self, id: u64) -> bool {
        self.children.contains_key(&id)
    }

    /// Process id of node `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children.get(&id).map(Child::id)
    }

    /// SIGKILLs node `id` (a crash) and reaps it.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let mut child = self.children.remove(&id).context("node not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM to every running node, then waits (at most `timeout`) for
    /// each to exit cleanly.
    pub fn stop_all(&mut self, timeout: Duration) -> Result<()> {
        for child in self.children.values() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        }
        let deadline = Instant::now() + timeout;
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
                    bail!("node {id} did not exit within {timeout:?} of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
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
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
