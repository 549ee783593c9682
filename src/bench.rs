//! The load generator behind `shoal bench`: closed-loop clients against a
//! 3-node cluster on loopback — Shoal's own `shoal node` processes, and
//! etcd as the yardstick, measured back to back in the same run with the
//! same workload.
//!
//! # Workload
//! Keys are `KEY_BYTES` (16) bytes, `k` and a zero-padded number below
//! `keys`; values are `value_bytes` (256) bytes. Every key is written once
//! first (the load, not measured), so every get finds its key and a get
//! that does not is counted as an error. Then, per client count, a put
//! phase: each client writes a random key, waits for the answer, repeats.
//! Finally a get phase of linearizable reads (Shoal: ReadIndex; etcd: its
//! default linearizable Range). Each phase runs `warmup` unmeasured, then
//! `measure`: throughput counts the operations that finished inside the
//! measured window; p50/p99 are over their latencies.
//!
//! # Server CPU
//! Summed over the member processes from `/proc/<pid>/stat` (user + system
//! time, what `ps` reports), read at the start and end of the measured
//! window, divided by the operations in it.
//!
//! # Connections
//! Clients share `conns` connections (as etcd's own benchmark tool shares
//! `--conns`): Shoal clients each have their own session on one of `conns`
//! QUIC clients; etcd clients send gRPC calls on one of `conns` HTTP/2
//! connections to the leader (the best case for etcd: nothing is forwarded).
//! Shoal's links are mutually authenticated TLS 1.3 (QUIC); etcd runs
//! plaintext (its default), which flatters etcd's CPU figures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_net::quic::QuicClient;
use shoal_net::{Limits, NodeId, Peer};
use shoal_shard::protocol::KvProtocol;

use crate::cluster::fresh_client_id;
use crate::local_cluster::{free_tcp_addr, LocalCluster};

/// Key length in bytes (`k` + 15 digits).
pub const KEY_BYTES: usize = 16;
/// Longest wait for a cluster to come up or elect a leader.
const STARTUP_WAIT_MAX: Duration = Duration::from_secs(60);
/// One operation's deadline; a slower one is counted as an error.
const OP_DEADLINE_MS: u64 = 10_000;

/// Which database a phase runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// Shoal's own nodes.
    Shoal,
    /// etcd (Debian's `etcd-server`), the yardstick.
    Etcd,
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            System::Shoal => "shoal",
            System::Etcd => "etcd",
        })
    }
}

/// The operation a phase measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Unconditional write of a random key.
    Put,
    /// Linearizable read of a random key.
    Get,
}

/// Settings of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Client counts of the put phases.
    pub put_clients: Vec<usize>,
    /// Client count of the get phase (0: no get phase).
    pub get_clients: usize,
    /// Unmeasured time at the start of each phase.
    pub warmup: Duration,
    /// Measured time of each phase.
    pub measure: Duration,
    /// Distinct keys.
    pub keys: u64,
    /// Value size.
    pub value_bytes: usize,
    /// Connections the clients share (at most one per client).
    pub conns: usize,
    /// Seed of the key choices.
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            put_clients: vec![1, 64, 256],
            get_clients: 64,
            warmup: Duration::from_secs(2),
            measure: Duration::from_secs(8),
            keys: 10_000,
            value_bytes: 256,
            conns: 8,
            seed: 1,
        }
    }
}

/// What one phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    /// Database measured.
    pub system: System,
    /// Operation measured.
    pub op: Op,
    /// Concurrent closed-loop clients.
    pub clients: usize,
    /// Operations that finished inside the measured window.
    pub ops: u64,
    /// Operations that failed or missed their deadline in the window.
    pub errors: u64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// `ops / seconds`.
    pub ops_per_sec: f64,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// Server CPU time (user + system, all members) per operation, µs;
    /// None when the servers' process ids are unknown.
    pub server_cpu_us_per_op: Option<f64>,
    /// This process's CPU time per operation, µs (the load generator).
    pub client_cpu_us_per_op: f64,
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').context("malformed /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .context("malformed /proc stat")?;
    Ok(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_sec(),
    ))
}

#[allow(unsafe_code)]
fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn total_cpu(pids: &[u32]) -> Result<Duration> {
    pids.iter().map(|&pid| process_cpu(pid)).sum()
}

/// The key of number `n`.
pub fn key(n: u64) -> Bytes {
    let key = format!("k{n:015}");
    debug_assert_eq!(key.len(), KEY_BYTES);
    Bytes::from(key)
}

// ---------------------------------------------------------------------------
// Drivers: one per system, each a set of clients sharing a few connections.

/// Shoal clients (one session each) and the QUIC clients they share.
type ShoalClients = (
    Vec<shoal_shard::Client<QuicClient<KvProtocol>>>,
    Vec<QuicClient<KvProtocol>>,
);

/// Clients of one system: `op(client, key, value)` runs one operation.
#[derive(Clone)]
pub enum Driver {
    /// Shoal clients, each with its own session, and the QUIC clients
    /// they share.
    Shoal(Arc<ShoalClients>),
    /// etcd gRPC clients.
    Etcd(Arc<Vec<EtcdConn>>),
}

impl Driver {
    /// Connects `clients` Shoal clients over `conns` QUIC clients.
    /// With `controller`, the cluster is sharded: clients route each key by
    /// the configuration of the controller group on those nodes.
    pub fn shoal(
        members: &[(u64, SocketAddr)],
        tls_dir: &Path,
        clients: usize,
        conns: usize,
        controller: Option<&[u64]>,
    ) -> Result<Driver> {
        let identity = crate::certs::load(tls_dir, &Peer::Client("client".into()))?;
        let nodes: std::collections::HashMap<NodeId, SocketAddr> = members
            .iter()
            .map(|&(id, addr)| (NodeId(id), addr))
            .collect();
        let quics = (0..conns.clamp(1, clients.max(1)))
            .map(|_| QuicClient::new(&identity, nodes.clone(), Limits::default()))
            .collect::<Result<Vec<_>, _>>()?;
        let servers: Vec<NodeId> = members.iter().map(|&(id, _)| NodeId(id)).collect();
        let clients = (0..clients)
            .map(|i| {
                let mut config = shoal_shard::ClientConfig::new(fresh_client_id());
                config.op_deadline = Duration::from_millis(OP_DEADLINE_MS);
                let quic = quics[i % quics.len()].clone();
                match controller {
                    Some(c) => shoal_shard::Client::sharded(
                        quic,
                        c.iter().copied().map(NodeId).collect(),
                        config,
                    ),
                    None => shoal_shard::Client::try_new(quic, servers.clone(), config),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Driver::Shoal(Arc::new((clients, quics))))
    }

    /// Connects `clients` etcd clients over `conns` HTTP/2 connections to `endpoint`.
    pub async fn etcd(endpoint: SocketAddr, clients: usize, conns: usize) -> Result<Driver> {
        let mut connections = Vec::new();
        for _ in 0..conns.clamp(1, clients.max(1)) {
            connections.push(EtcdConn::connect(endpoint).await?);
        }
        Ok(Driver::Etcd(Arc::new(
            (0..clients)
                .map(|i| connections[i % connections.len()].clone())
                .collect(),
        )))
    }

    fn clients(&self) -> usize {
        match self {
            Driver::Shoal(c) => c.0.len(),
            Driver::Etcd(c) => c.len(),
        }
    }

    /// Runs one operation as client `client`.
    pub async fn run(&self, client: usize, op: Op, key: Bytes, value: Bytes) -> Result<()> {
        match self {
            Driver::Shoal(clients) => {
                let c = &clients.0[client];
                match op {
                    Op::Put => c.put(key, value).await.map(drop)?,
                    Op::Get => c.get(key).await.map(drop)?,
                }
            }
            Driver::Etcd(conns) => {
                let c = &conns[client];
                match op {
                    Op::Put => c.put(key, value).await?,
                    Op::Get => {
                        if c.get(key.clone()).await? != 1 {
                            bail!("etcd: key {key:?} not found");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Closes Shoal's QUIC connections (telling the nodes); etcd's HTTP/2
    /// connections close when the last clone is dropped.
    pub async fn close(&self) {
        if let Driver::Shoal(shoal) = self {
            for quic in &shoal.1 {
                quic.close().await;
            }
        }
    }
}

/// Writes every key once with `clients` concurrent writers (not measured).
pub async fn load_keys(driver: &Driver, keys: u64, value: Bytes) -> Result<()> {
    let clients = driver.clients() as u64;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (driver, value) = (driver.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = c;
            while n < keys {
                driver
                    .run(c as usize, Op::Put, key(n), value.clone())
                    .await?;
                n += clients;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs one phase: `clients` closed-loop clients of `driver` doing `op`
/// on random keys for `warmup + measure`; measures the second part.
pub async fn run_phase(
    system: System,
    driver: &Driver,
    op: Op,
    options: &BenchOptions,
    server_pids: Option<&[u32]>,
) -> Result<PhaseResult> {
    let clients = driver.clients();
    let value = Bytes::from(vec![b'v'; options.value_bytes]);
    let start = Instant::now();
    let window_start = start + options.warmup;
    let window_end = window_start + options.measure;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (driver, value) = (driver.clone(), value.clone());
        let (keys, seed) = (options.keys, options.seed);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (c as u64) << 20);
            let mut latencies_us = Vec::new();
            let mut errors = 0u64;
            loop {
                let began = Instant::now();
                if began >= window_end {
                    break;
                }
                let result = driver
                    .run(c, op, key(rng.random_range(0..keys)), value.clone())
                    .await;
                let ended = Instant::now();
                if ended >= window_start && ended < window_end {
                    match result {
                        Ok(()) => latencies_us.push((ended - began).as_micros() as u64),
                        Err(e) => {
                            if errors == 0 {
                                tracing::warn!(client = c, error = %e, "operation failed");
                            }
                            errors += 1;
                        }
                    }
                }
            }
            (latencies_us, errors)
        }));
    }
    tokio::time::sleep_until(window_start.into()).await;
    let (cpu_start, self_start) = (
        server_pids.map(total_cpu).transpose()?,
        process_cpu(std::process::id())?,
    );
    tokio::time::sleep_until(window_end.into()).await;
    let (cpu_end, self_end) = (
        server_pids.map(total_cpu).transpose()?,
        process_cpu(std::process::id())?,
    );
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    let seconds = options.measure.as_secs_f64();
    let per_op = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
    Ok(PhaseResult {
        system,
        op,
        clients,
        ops,
        errors,
        seconds,
        ops_per_sec: ops as f64 / seconds,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        server_cpu_us_per_op: cpu_start.zip(cpu_end).map(|(a, b)| per_op(b - a)),
        client_cpu_us_per_op: per_op(self_end - self_start),
    })
}

/// The `q` quantile of sorted `values` (0 when empty).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------
// etcd: a minimal gRPC client (KV.Put, KV.Range) over HTTP/2, and a 3-member
// cluster of `etcd` processes.

/// One HTTP/2 connection to an etcd member, speaking gRPC.
#[derive(Clone)]
pub struct EtcdConn {
    send: h2::client::SendRequest<Bytes>,
    authority: String,
}

impl EtcdConn {
    /// Connects to an etcd client URL's address.
    pub async fn connect(addr: SocketAddr) -> Result<EtcdConn> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to etcd at {addr}"))?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::handshake(tcp)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "etcd connection ended");
            }
        });
        Ok(EtcdConn {
            send,
            authority: addr.to_string(),
        })
    }

    /// `KV.Put(key, value)`.
    pub async fn put(&self, key: Bytes, value: Bytes) -> Result<()> {
        let message = encode_put_request(&key, &value);
        self.call("/etcdserverpb.KV/Put", &message).await.map(drop)
    }

    /// `KV.Range(key)`, linearizable (etcd's default); returns the count of keys found.
    pub async fn get(&self, key: Bytes) -> Result<u64> {
        let message = encode_range_request(&key);
        let reply = self.call("/etcdserverpb.KV/Range", &message).await?;
        range_response_count(&reply)
    }

    async fn call(&self, path: &str, message: &[u8]) -> Result<Bytes> {
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a static request is valid");
        let mut body = BytesMut::with_capacity(5 + message.len());
        body.put_u8(0); // not compressed
        body.put_u32(message.len() as u32);
        body.put_slice(message);
        let mut send = self.send.clone().ready().await.context("etcd connection")?;
        let (response, mut stream) = send.send_request(request, false)?;
        stream.send_data(body.freeze(), true)?;
        let response = tokio::time::timeout(Duration::from_millis(OP_DEADLINE_MS), response)
            .await
            .context("etcd call timed out")??;
        let (head, mut body) = response.into_parts();
        if head.status != http::StatusCode::OK {
            bail!("etcd answered HTTP {}", head.status);
        }
        let mut reply = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            reply.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?;
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing")
            .to_string();
        if status != "0" {
            let message = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-message"))
                .or_else(|| head.headers.get("grpc-message"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            bail!("etcd gRPC status {status}: {message}");
        }
        if reply.len() < 5 {
            bail!("etcd sent a short gRPC message");
        }
        let mut reply = reply.freeze();
        reply.advance(5);
        Ok(reply)
    }
}

// The few fields of etcd's KV messages (api/etcdserverpb/rpc.proto) the
// client writes or reads; the test checks them against protoc's bytes.
/// `PutRequest.key`.
const PUT_REQUEST_KEY_FIELD: u64 = 1;
/// `PutRequest.value`.
const PUT_REQUEST_VALUE_FIELD: u64 = 2;
/// `RangeRequest.key`.
const RANGE_REQUEST_KEY_FIELD: u64 = 1;
/// `RangeResponse.count` (`header` = 1, `kvs` = 2, `more` = 3 are skipped).
const RANGE_RESPONSE_COUNT_FIELD: u64 = 4;

/// An etcd `PutRequest { key, value }`, encoded as protoc would.
fn encode_put_request(key: &[u8], value: &[u8]) -> BytesMut {
    let mut message = BytesMut::with_capacity(key.len() + value.len() + 8);
    protobuf_bytes(&mut message, PUT_REQUEST_KEY_FIELD, key);
    protobuf_bytes(&mut message, PUT_REQUEST_VALUE_FIELD, value);
    message
}

/// An etcd `RangeRequest { key }` (one key; linearizable, etcd's default),
/// encoded as protoc would.
fn encode_range_request(key: &[u8]) -> BytesMut {
    let mut message = BytesMut::with_capacity(key.len() + 4);
    protobuf_bytes(&mut message, RANGE_REQUEST_KEY_FIELD, key);
    message
}

/// The `count` of an etcd `RangeResponse` (0 when absent: proto3 leaves
/// zero out).
fn range_response_count(reply: &[u8]) -> Result<u64> {
    protobuf_varint_field(reply, RANGE_RESPONSE_COUNT_FIELD).map(|count| count.unwrap_or(0))
}

fn protobuf_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Appends a length-delimited field (wire type 2); an empty one is left out,
/// as proto3 encoders do (the reader sees the default, empty, either way).
fn protobuf_bytes(buf: &mut BytesMut, field: u64, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    protobuf_varint(buf, field << 3 | 2);
    protobuf_varint(buf, data.len() as u64);
    buf.put_slice(data);
}

fn read_varint(buf: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some((&b, rest)) = buf.split_first() else {
            bail!("truncated protobuf varint");
        };
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("protobuf varint too long")
}

/// The value of top-level varint field `field` of a protobuf message, if present.
fn protobuf_varint_field(mut message: &[u8], field: u64) -> Result<Option<u64>> {
    let mut found = None;
    while !message.is_empty() {
        let tag = read_varint(&mut message)?;
        match tag & 7 {
            0 => {
                let v = read_varint(&mut message)?;
                if tag >> 3 == field {
                    found = Some(v);
                }
            }
            1 => message = message.get(8..).context("truncated protobuf")?,
            2 => {
                let len = read_varint(&mut message)? as usize;
                message = message.get(len..).context("truncated protobuf")?;
            }
            5 => message = message.get(4..).context("truncated protobuf")?,
            wire => bail!("unexpected protobuf wire type {wire}"),
        }
    }
    Ok(found)
}

/// A 3-member (or n-member) etcd cluster of `etcd` processes on loopback,
/// killed on drop.
pub struct EtcdCluster {
    children: Vec<Child>,
    client_addrs: Vec<SocketAddr>,
}

impl EtcdCluster {
    /// Starts `n` etcd members with data under `dir` and waits until a
    /// write succeeds.
    pub async fn start(etcd: &Path, dir: &Path, n: usize) -> Result<EtcdCluster> {
        let client_addrs = (0..n)
            .map(|_| free_tcp_addr())
            .collect::<Result<Vec<_>>>()?;
        let peer_addrs = (0..n)
            .map(|_| free_tcp_addr())
            .collect::<Result<Vec<_>>>()?;
        let initial = (0..n)
            .map(|i| format!("e{i}=http://{}", peer_addrs[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            children: Vec::new(),
            client_addrs: client_addrs.clone(),
        };
        for i in 0..n {
            let data = dir.join(format!("etcd-{i}"));
            let _ = std::fs::remove_dir_all(&data);
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new(etcd)
                .arg(format!("--name=e{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls=http://{}", client_addrs[i]))
                .arg(format!(
                    "--advertise-client-urls=http://{}",
                    client_addrs[i]
                ))
                .arg(format!("--listen-peer-urls=http://{}", peer_addrs[i]))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://{}",
                    peer_addrs[i]
                ))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=shoal-bench")
                .arg("--log-level=error")
                .arg("--logger=zap")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", etcd.display()))?;
            cluster.children.push(child);
        }
        let deadline = Instant::now() + STARTUP_WAIT_MAX;
        loop {
            let mut ok = true;
            for &addr in &cluster.client_addrs {
                let attempt = async {
                    EtcdConn::connect(addr)
                        .await?
                        .put(key(0), Bytes::from_static(b"x"))
                        .await
                };
                if attempt.await.is_err() {
                    ok = false;
                }
            }
            if ok {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not come up within {STARTUP_WAIT_MAX:?} (logs in {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Process ids of the members.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// The client address of the current leader, asked of `etcdctl endpoint status`.
    pub fn leader(&self, etcdctl: &Path) -> Result<SocketAddr> {
        let endpoints = self
            .client_addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        let output = Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .args([
                "endpoint",
                "status",
                "-w",
                "json",
                "--endpoints",
                &endpoints,
            ])
            .output()
            .with_context(|| format!("running {}", etcdctl.display()))?;
        if !output.status.success() {
            bail!(
                "etcdctl endpoint status: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let statuses: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
        for s in &statuses {
            let member = &s["Status"]["header"]["member_id"];
            if !member.is_null() && *member == s["Status"]["leader"] {
                let endpoint = s["Endpoint"].as_str().context("etcdctl: no Endpoint")?;
                return endpoint
                    .trim_start_matches("http://")
                    .parse()
                    .context("etcdctl: bad endpoint");
            }
        }
        bail!("etcd has no leader")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Looks `name` up on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// Whole runs.

/// Every phase of one system: load the keys, put phases, get phase.
pub async fn run_system(
    system: System,
    connect: impl Fn(usize) -> DriverFuture,
    options: &BenchOptions,
    server_pids: Option<&[u32]>,
    mut report: impl FnMut(&PhaseResult),
) -> Result<Vec<PhaseResult>> {
    let value = Bytes::from(vec![b'v'; options.value_bytes]);
    let loader = connect(64.min(options.keys as usize).max(1)).await?;
    load_keys(&loader, options.keys, value).await?;
    loader.close().await;
    let mut results = Vec::new();
    let mut phases: Vec<(Op, usize)> = options.put_clients.iter().map(|&c| (Op::Put, c)).collect();
    if options.get_clients > 0 {
        phases.push((Op::Get, options.get_clients));
    }
    for (op, clients) in phases {
        let driver = connect(clients).await?;
        let result = run_phase(system, &driver, op, options, server_pids).await?;
        driver.close().await;
        report(&result);
        results.push(result);
    }
    Ok(results)
}

/// A future connecting a [`Driver`], so [`run_system`] takes either system's.
pub type DriverFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Driver>> + Send>>;

/// Formats a phase result as one table row.
pub fn format_row(r: &PhaseResult) -> String {
    format!(
        "{:<6} {:<4} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>12} {:>12.0} {:>7}",
        r.system.to_string(),
        match r.op {
            Op::Put => "put",
            Op::Get => "get",
        },
        r.clients,
        r.ops_per_sec,
        r.p50_us as f64 / 1000.0,
        r.p99_us as f64 / 1000.0,
        r.server_cpu_us_per_op
            .map_or("-".to_string(), |c| format!("{c:.0}")),
        r.client_cpu_us_per_op,
        r.errors,
    )
}

/// The header of [`format_row`]'s table.
pub const TABLE_HEADER: &str =
    "system op   clients      ops/s    p50 ms    p99 ms  server µs/op  client µs/op  errors";

/// Starts a 3-node Shoal cluster under `dir` with the `shoal` binary `exe`
/// (`node_args` added to each `shoal node`) and waits for a leader.
pub fn start_shoal(exe: &Path, dir: &Path, node_args: &[&str]) -> Result<LocalCluster> {
    let mut cluster = LocalCluster::create(exe, dir, 3, node_args)?;
    cluster.start_all()?;
    // A sharded cluster has no KV group whose leader the status files
    // show; `shard_cluster` waits for its groups instead.
    if !node_args.contains(&"--controller") {
        cluster.wait_for_leader(STARTUP_WAIT_MAX)?;
    }
    Ok(cluster)
}

/// What `shoal bench` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `shoal` binary the nodes run.
    pub exe: PathBuf,
    /// Working directory (wiped first): the clusters' data and logs.
    pub dir: PathBuf,
    /// Systems to measure, in this order.
    pub systems: Vec<System>,
    /// Benchmark an already running Shoal cluster instead of starting one
    /// (members and certificate directory); server CPU is then not measured.
    pub external: Option<(Vec<(u64, SocketAddr)>, PathBuf)>,
    /// Extra arguments of every `shoal node` started.
    pub node_args: Vec<String>,
    /// Replica groups of the Shoal cluster: 1 is the single-group cluster;
    /// more makes it sharded, with that many groups on the same 3 nodes
    /// (leaders spread over them) and the controller group beside them.
    pub groups: u64,
    /// The workload.
    pub bench: BenchOptions,
}

/// Turns the freshly started `cluster` (nodes run with `--controller
/// 1,2,3`) into `groups` replica groups on all three nodes, the shards
/// spread evenly, and waits until their leaders are on distinct nodes (or
/// as spread as the group count allows).
pub fn shard_cluster(cluster: &LocalCluster, groups: u64) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = crate::sharding::Admin::connect(
            cluster.members(),
            &BENCH_CONTROLLER,
            cluster.tls_dir(),
            Duration::from_secs(60),
        )?;
        let result = async {
            admin
                .init(
                    shoal_shard::controller::SHARDS_DEFAULT,
                    1,
                    &BENCH_CONTROLLER,
                )
                .await?;
            for group in 2..=groups {
                admin.join(group, &BENCH_CONTROLLER).await?;
            }
            let want = (groups as usize).min(BENCH_CONTROLLER.len());
            let deadline = tokio::time::Instant::now() + STARTUP_WAIT_MAX;
            loop {
                let config = admin.query().await?;
                let leaders: std::collections::BTreeSet<u64> = admin
                    .group_leaders(&config)
                    .await
                    .into_values()
                    .filter(|&l| l != 0)
                    .collect();
                if leaders.len() >= want || tokio::time::Instant::now() >= deadline {
                    println!("shoal: {groups} groups, leaders on nodes {leaders:?}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok(())
        }
        .await;
        admin.close().await;
        result
    })
}

/// The nodes of a sharded benchmark cluster's controller group (and of
/// every replica group).
pub const BENCH_CONTROLLER: [u64; 3] = [1, 2, 3];

/// Runs every phase against every system and prints a table (and the
/// ratios Shoal / etcd when both ran). Returns all results.
pub fn run(options: &RunOptions) -> Result<Vec<PhaseResult>> {
    let _ = std::fs::remove_dir_all(&options.dir);
    std::fs::create_dir_all(&options.dir)?;
    let dir = options.dir.canonicalize()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let b = &options.bench;
    println!(
        "shoal bench: 3-node clusters on loopback, fsync on; {KEY_BYTES}-byte keys, {}-byte values, {} keys, {} connections; {:?} warm-up + {:?} measured per phase",
        b.value_bytes, b.keys, b.conns, b.warmup, b.measure
    );
    println!("{TABLE_HEADER}");
    let print = |r: &PhaseResult| println!("{}", format_row(r));
    let mut results = Vec::new();
    for &system in &options.systems {
        match system {
            System::Shoal => {
                let (cluster, members, tls) = match &options.external {
                    Some((members, tls)) => (None, members.clone(), tls.clone()),
                    None => {
                        let mut args: Vec<&str> =
                            options.node_args.iter().map(String::as_str).collect();
                        if options.groups > 1 {
                            args.extend(["--controller", "1,2,3"]);
                        }
                        let cluster = start_shoal(&options.exe, &dir.join("shoal"), &args)?;
                        if options.groups > 1 {
                            shard_cluster(&cluster, options.groups)?;
                        }
                        let (members, tls) =
                            (cluster.members().to_vec(), cluster.tls_dir().to_path_buf());
                        (Some(cluster), members, tls)
                    }
                };
                let pids: Option<Vec<u32>> = cluster.as_ref().map(|c| {
                    c.members()
                        .iter()
                        .filter_map(|&(id, _)| c.pid(id))
                        .collect()
                });
                let conns = b.conns;
                let controller = (options.groups > 1).then_some(BENCH_CONTROLLER);
                let connect = |clients: usize| -> DriverFuture {
                    let (members, tls) = (members.clone(), tls.clone());
                    Box::pin(async move {
                        Driver::shoal(
                            &members,
                            &tls,
                            clients,
                            conns,
                            controller.as_ref().map(|c| &c[..]),
                        )
                    })
                };
                results.extend(runtime.block_on(run_system(
                    System::Shoal,
                    connect,
                    b,
                    pids.as_deref(),
                    print,
                ))?);
                if let Some(mut cluster) = cluster {
                    cluster.stop_all(STARTUP_WAIT_MAX)?;
                }
            }
            System::Etcd => {
                let etcd = which("etcd").context(
                    "etcd is not installed (Debian: apt-get install -y etcd-server etcd-client)",
                )?;
                let etcdctl = which("etcdctl")
                    .context("etcdctl is not installed (Debian: apt-get install -y etcd-client)")?;
                let etcd_dir = dir.join("etcd");
                std::fs::create_dir_all(&etcd_dir)?;
                let cluster = runtime.block_on(EtcdCluster::start(&etcd, &etcd_dir, 3))?;
                let leader = cluster.leader(&etcdctl)?;
                let pids = cluster.pids();
                let conns = b.conns;
                let connect = move |clients: usize| -> DriverFuture {
                    Box::pin(Driver::etcd(leader, clients, conns))
                };
                results.extend(runtime.block_on(run_system(
                    System::Etcd,
                    connect,
                    b,
                    Some(&pids),
                    print,
                ))?);
            }
        }
    }
    print_ratios(&results);
    Ok(results)
}

/// Prints Shoal / etcd for every phase both ran.
pub fn print_ratios(results: &[PhaseResult]) {
    let mut header = false;
    for s in results.iter().filter(|r| r.system == System::Shoal) {
        let Some(e) = results
            .iter()
            .find(|r| r.system == System::Etcd && r.op == s.op && r.clients == s.clients)
        else {
            continue;
        };
        if !header {
            println!(
                "\nshoal vs etcd (throughput: higher is better; p99 and CPU: lower is better)"
            );
            header = true;
        }
        let cpu = s
            .server_cpu_us_per_op
            .zip(e.server_cpu_us_per_op)
            .map_or("-".into(), |(s, e)| format!("{:.2}x", s / e));
        println!(
            "  {:<3} {:>3} clients: throughput {:.2}x, p99 {:.2}x, server CPU/op {cpu}",
            match s.op {
                Op::Put => "put",
                Op::Get => "get",
            },
            s.clients,
            s.ops_per_sec / e.ops_per_sec.max(f64::MIN_POSITIVE),
            s.p99_us as f64 / e.p99_us.max(1) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn protobuf_roundtrip_and_field_lookup() {
        let mut m = BytesMut::new();
        protobuf_bytes(&mut m, 1, b"header");
        protobuf_varint(&mut m, 4 << 3);
        protobuf_varint(&mut m, 300);
        assert_eq!(protobuf_varint_field(&m, 4).unwrap(), Some(300));
        assert_eq!(protobuf_varint_field(&m, 3).unwrap(), None);
        assert!(protobuf_varint_field(&m[..m.len() - 1], 4).is_err());
    }

    // etcd's own encoding of the messages the client writes and reads:
    // made by protoc from etcd's field definitions, by
    // `scripts/etcd-golden.sh` (see there). A wrong field number, wire type
    // or length encoding in the codec makes these differ.
    /// `PutRequest { key: "key-42" value: "v" * 130 }`
    const PUT_REQUEST: &str = "0a066b65792d343212820176767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676767676";
    /// `PutRequest { key: "key-42" }`
    const PUT_REQUEST_EMPTY_VALUE: &str = "0a066b65792d3432";
    /// `RangeRequest { key: "key-42" }`
    const RANGE_REQUEST: &str = "0a066b65792d3432";
    /// `RangeResponse { header { cluster_id: 14841639068965178418 member_id: 10276657743932975437 revision: 42 raft_term: 3 } kvs { key: "key-42" create_revision: 5 mod_revision: 42 version: 7 value: "hello" lease: 7587868562287261001 } count: 1 }`
    const RANGE_RESPONSE_ONE: &str = "0a1a08b298eaf1948386fccd0110cdd2918bd2b881cf8e01182a2003121f0a066b65792d34321005182a20072a0568656c6c6f30c9eaf18b95c8e1a6692001";
    /// `RangeResponse { header { cluster_id: 14841639068965178418 member_id: 10276657743932975437 revision: 42 raft_term: 3 } kvs { key: "key-42" create_revision: 5 mod_revision: 42 version: 7 value: "hello" lease: 7587868562287261001 } kvs { key: "key-43" create_revision: 6 mod_revision: 6 version: 1 value: "" } more: true count: 300 }`
    const RANGE_RESPONSE_MANY: &str = "0a1a08b298eaf1948386fccd0110cdd2918bd2b881cf8e01182a2003121f0a066b65792d34321005182a20072a0568656c6c6f30c9eaf18b95c8e1a669120e0a066b65792d3433100618062001180120ac02";
    /// `RangeResponse { header { cluster_id: 14841639068965178418 member_id: 10276657743932975437 revision: 42 raft_term: 3 } }`
    const RANGE_RESPONSE_NONE: &str = "0a1a08b298eaf1948386fccd0110cdd2918bd2b881cf8e01182a2003";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn requests_are_encoded_as_etcds_protoc_encodes_them() {
        let value = vec![b'v'; 130];
        assert_eq!(
            encode_put_request(b"key-42", &value)[..],
            hex(PUT_REQUEST)[..]
        );
        assert_eq!(
            encode_put_request(b"key-42", b"")[..],
            hex(PUT_REQUEST_EMPTY_VALUE)[..]
        );
        assert_eq!(encode_range_request(b"key-42")[..], hex(RANGE_REQUEST)[..]);
    }

    #[test]
    fn range_responses_from_etcds_encoding_are_read() {
        // Header, key-values (with 10-byte varints) and `more` are skipped;
        // `count` is read, also when it takes two bytes.
        assert_eq!(range_response_count(&hex(RANGE_RESPONSE_ONE)).unwrap(), 1);
        assert_eq!(
            range_response_count(&hex(RANGE_RESPONSE_MANY)).unwrap(),
            300
        );
        assert_eq!(range_response_count(&hex(RANGE_RESPONSE_NONE)).unwrap(), 0);
        let truncated = hex(RANGE_RESPONSE_MANY);
        assert!(range_response_count(&truncated[..truncated.len() - 1]).is_err());
        assert!(range_response_count(&truncated[..20]).is_err());
    }

    #[test]
    fn own_cpu_time_grows_while_spinning() {
        let before = process_cpu(std::process::id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        // A clock tick is 10 ms of CPU; spinning must show up as one.
        while process_cpu(std::process::id()).unwrap() <= before {
            assert!(Instant::now() < deadline, "CPU time never grew");
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        assert!(x > 0);
        assert!(process_cpu(u32::MAX).is_err(), "no such process");
    }

    #[test]
    fn keys_have_the_advertised_length() {
        assert_eq!(key(0).len(), KEY_BYTES);
        assert_eq!(key(999_999).len(), KEY_BYTES);
    }
}
