//! Loopback QUIC benchmarks against TCP yardsticks measured in the same run.
//!
//! - `messages/256B`: batched peer messages per second, node to node.
//! - `rpc/echo`: RPC round trip (criterion mean) plus a printed p50/p99.
//! - `bulk/128MiB`: bulk file stream MB/s (files on /dev/shm when present, so
//!   the disk does not dominate; the receiver still fsyncs).
//! - yardsticks: tokio TCP ping-pong round trip p50/p99 and loopback TCP
//!   bandwidth streaming 1 GiB.
//!
//! Run: `cargo bench -p shoal-net --bench transport`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use serde::{Deserialize, Serialize};
use shoal_net::certs::ClusterCa;
use shoal_net::quic::{QuicClient, QuicNode};
use shoal_net::{Inbox, Limits, NodeConfig, NodeId, Protocol, RpcCaller, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

struct Bench;

#[derive(Serialize, Deserialize)]
struct Msg(Vec<u8>);

impl Protocol for Bench {
    type Message = Msg;
    type Request = Vec<u8>;
    type Response = Vec<u8>;
    type FileMeta = u64;
}

const MESSAGE_BYTES: usize = 256;
// Postcard adds a 2-byte length to the 254-byte payload: 256 bytes on the wire per message.
const PAYLOAD_BYTES: usize = MESSAGE_BYTES - 2;

fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

struct Pair {
    a: QuicNode<Bench>,
    b: QuicNode<Bench>,
    inbox_b: Option<Inbox<Bench>>,
    client: QuicClient<Bench>,
    _dir: tempfile::TempDir,
}

fn start_pair(rt: &Runtime) -> Pair {
    rt.block_on(async {
        let dir = scratch_dir();
        let ca = ClusterCa::generate().unwrap();
        let limits = Limits {
            peer_queue_messages_max: 1 << 20,
            inbox_capacity: 1 << 16,
            bulk_file_bytes_max: 1 << 40,
            udp_payload_bytes_max: std::env::var("SHOAL_BENCH_UDP_PAYLOAD_BYTES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(Limits::default().udp_payload_bytes_max),
            // Loopback carries 1500-byte packets for sure (its MTU is 64 KiB):
            // tell QUIC so, as a LAN deployment would.
            udp_payload_bytes_min: std::env::var("SHOAL_BENCH_UDP_PAYLOAD_BYTES_MIN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1452),
            ..Limits::default()
        };
        let bind = |id: u64| {
            let mut config = NodeConfig::new(
                NodeId(id),
                "127.0.0.1:0".parse().unwrap(),
                HashMap::new(),
                dir.path().join(format!("n{id}")),
            );
            config.limits = limits.clone();
            QuicNode::<Bench>::bind(config, &ca.issue_node(NodeId(id)).unwrap()).unwrap()
        };
        let (a, _inbox_a) = bind(1);
        let (b, inbox_b) = bind(2);
        a.set_member(NodeId(2), b.local_addr().unwrap());
        b.set_member(NodeId(1), a.local_addr().unwrap());
        let client = QuicClient::new(
            &ca.issue_client("bench").unwrap(),
            [(NodeId(2), b.local_addr().unwrap())].into_iter().collect(),
            limits,
        )
        .unwrap();
        Pair {
            a,
            b,
            inbox_b: Some(inbox_b),
            client,
            _dir: dir,
        }
    })
}

/// CPU time (user + system) of this process, from /proc/self/stat; zero
/// where that is unavailable. Reported next to wall-clock numbers because the
/// build machine is shared and wall-clock throughput moves with its load.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    let Some(after_name) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = stat[after_name + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

fn tcp_rtt(rt: &Runtime, rounds: usize) -> (Duration, Duration) {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [7u8; 64];
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            s.write_all(&buf).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            samples.push(t.elapsed());
        }
        percentiles(samples)
    })
}

fn tcp_bandwidth(rt: &Runtime, total_bytes: usize) -> f64 {
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            loop {
                let r = s.read(&mut buf).await.unwrap();
                if r == 0 {
                    break n;
                }
                n += r;
            }
        });
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let buf = vec![1u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..total_bytes / buf.len() {
            s.write_all(&buf).await.unwrap();
        }
        s.shutdown().await.unwrap();
        let n = reader.await.unwrap();
        assert_eq!(n, total_bytes);
        total_bytes as f64 / t.elapsed().as_secs_f64() / 1e6
    })
}

fn rpc_latencies(rt: &Runtime, pair: &Pair, rounds: usize) -> (Duration, Duration) {
    rt.block_on(async {
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            pair.client.call(NodeId(2), vec![7u8; 64]).await.unwrap();
            samples.push(t.elapsed());
        }
        percentiles(samples)
    })
}

fn main() {
    // `cargo test --all-targets` (CI) runs this binary without `--bench`:
    // then only a quick smoke pass, so tests stay fast in debug builds.
    let full = std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--test");
    let scale = |n: usize| if full { n } else { (n / 1000).max(1) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut pair = start_pair(&rt);
    // Echo server on node 2; peer messages counted by a drain task.
    let inbox = pair.inbox_b.take().unwrap();
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let files: Arc<
        tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<shoal_net::ReceivedFile<u64>>>>,
    > = Arc::new(tokio::sync::Mutex::new(Some(inbox.files)));
    rt.spawn({
        let mut rpcs = inbox.rpcs;
        async move {
            while let Some(rpc) = rpcs.recv().await {
                rpc.reply.send(rpc.request);
            }
        }
    });
    rt.spawn({
        let received = received.clone();
        let mut messages = inbox.messages;
        async move {
            while messages.recv().await.is_some() {
                received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    // Yardsticks and percentiles, printed.
    let _ = tcp_rtt(&rt, scale(2_000));
    let (tcp_p50, tcp_p99) = tcp_rtt(&rt, scale(20_000));
    let tcp_mbps = tcp_bandwidth(&rt, scale(1 << 30) & !((1 << 20) - 1));
    let _ = rpc_latencies(&rt, &pair, scale(2_000));
    let (rpc_p50, rpc_p99) = rpc_latencies(&rt, &pair, scale(20_000));
    println!("yardstick tcp_rtt: p50 {tcp_p50:?} p99 {tcp_p99:?}");
    println!("yardstick tcp_bandwidth: {tcp_mbps:.0} MB/s (1 GiB, 1 MiB writes)");
    println!(
        "quic rpc_rtt (64 B echo): p50 {rpc_p50:?} p99 {rpc_p99:?}  -> p50 = {:.2}x TCP p50",
        rpc_p50.as_secs_f64() / tcp_p50.as_secs_f64()
    );

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));

    let mut group = c.benchmark_group("messages");
    group.throughput(Throughput::Elements(1));
    group.bench_function("256B", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start_count = received.load(std::sync::atomic::Ordering::Relaxed);
                let t = Instant::now();
                for _ in 0..iters {
                    pair.a.send(NodeId(2), Msg(vec![3u8; PAYLOAD_BYTES]));
                    // Keep the queue bounded in the bench too, yielding to the sender task.
                    if pair.a.queued_messages(NodeId(2)) > 100_000 {
                        tokio::task::yield_now().await;
                    }
                }
                while received.load(std::sync::atomic::Ordering::Relaxed) - start_count < iters {
                    tokio::task::yield_now().await;
                }
                t.elapsed()
            })
        })
    });
    group.finish();
    assert_eq!(pair.a.stats().messages_dropped_overflow, 0);

    let mut group = c.benchmark_group("rpc");
    group.bench_function("echo_64B", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    pair.client.call(NodeId(2), vec![7u8; 64]).await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    group.finish();

    let file_bytes: usize = if full { 128 << 20 } else { 1 << 20 };
    let dir = scratch_dir();
    let source: PathBuf = dir.path().join("source.sst");
    {
        let mut f = std::fs::File::create(&source).unwrap();
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for _ in 0..file_bytes >> 20 {
            f.write_all(&block).unwrap();
        }
    }
    let mut group = c.benchmark_group("bulk");
    group.throughput(Throughput::Bytes(file_bytes as u64));
    group.sample_size(10);
    group.bench_function("128MiB", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut files = files.lock().await;
                let files = files.as_mut().unwrap();
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let t = Instant::now();
                    pair.a
                        .send_file(NodeId(2), source.clone(), i)
                        .await
                        .unwrap();
                    total += t.elapsed();
                    let file = files.recv().await.unwrap();
                    std::fs::remove_file(file.path).unwrap();
                }
                total
            })
        })
    });
    group.finish();
    c.final_summary();

    // Wall clock and CPU for a fixed amount of work, printed as one line each.
    let rounds = if full { 8u64 } else { 1 };
    let (wall, cpu) = rt.block_on(async {
        let mut files = files.lock().await;
        let files = files.as_mut().unwrap();
        let (t, cpu) = (Instant::now(), process_cpu());
        for i in 0..rounds {
            pair.a
                .send_file(NodeId(2), source.clone(), i)
                .await
                .unwrap();
            std::fs::remove_file(files.recv().await.unwrap().path).unwrap();
        }
        (t.elapsed(), process_cpu() - cpu)
    });
    if let Some(stats) = pair.a.connection_stats(NodeId(2)) {
        println!(
            "node1->node2 path: mtu {} B, rtt {:?}, lost packets {}, MTU probes sent {} lost {}, black holes {}",
            stats.path.current_mtu,
            stats.path.rtt,
            stats.path.lost_packets,
            stats.path.sent_plpmtud_probes,
            stats.path.lost_plpmtud_probes,
            stats.path.black_holes_detected
        );
    }
    let bulk_mbps = (rounds * file_bytes as u64) as f64 / wall.as_secs_f64() / 1e6;
    println!(
        "quic bulk: {bulk_mbps:.0} MB/s wall ({:.1}% of TCP {tcp_mbps:.0} MB/s); {:.0} MB per CPU-second (both ends)",
        100.0 * bulk_mbps / tcp_mbps,
        (rounds * file_bytes as u64) as f64 / cpu.as_secs_f64().max(1e-9) / 1e6
    );
    let count = scale(2_000_000) as u64;
    let (wall, cpu) = rt.block_on(async {
        let start_count = received.load(std::sync::atomic::Ordering::Relaxed);
        let (t, cpu) = (Instant::now(), process_cpu());
        for _ in 0..count {
            pair.a.send(NodeId(2), Msg(vec![3u8; PAYLOAD_BYTES]));
            if pair.a.queued_messages(NodeId(2)) > 100_000 {
                tokio::task::yield_now().await;
            }
        }
        while received.load(std::sync::atomic::Ordering::Relaxed) - start_count < count {
            tokio::task::yield_now().await;
        }
        (t.elapsed(), process_cpu() - cpu)
    });
    println!(
        "quic messages (256 B, batched): {:.0} k/s wall; {:.0} k per CPU-second (both ends)",
        count as f64 / wall.as_secs_f64() / 1e3,
        count as f64 / cpu.as_secs_f64().max(1e-9) / 1e3
    );
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    rt.block_on(async {
        pair.client.close().await;
        pair.a.shutdown().await;
        pair.b.shutdown().await;
    });
}
