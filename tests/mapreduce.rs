//! MapReduce over a real cluster with real processes: the lab-1 tests by
//! name (`main/test-mr.sh`: wc, indexer, map parallelism, reduce
//! parallelism, job count, early exit, crash) with the lab's scenarios and
//! pass conditions, and the crash tests beyond the lab (coordinator
//! SIGKILLed and resumed; a worker SIGKILLed after its maps finished;
//! input written during the job).
//!
//! Each test loads 8 generated text files (the lab's `pg-*.txt` stand-ins,
//! two named for the early-exit app's `sherlock` and `tom`) with `shoal
//! load`, runs `shoal mapreduce run` (the coordinator) and `shoal
//! mapreduce worker` processes in a scratch directory (their current
//! directory, where the lab apps keep marker files), and compares the
//! merged `mr-out-*` files and the output keys with a sequential run of the
//! same application.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Cluster;
use rand::{Rng, SeedableRng};
use shoal::cluster::BlockingClient;
use shoal_shard::mapreduce::labapps::lab_app_by_name;
use shoal_shard::mapreduce::{app_by_name, run_sequential, MapReduceApp};

/// The lab's reduce count.
const REDUCE: u32 = 10;
/// The coordinator's node id; workers are 101, 102, ...
const COORDINATOR_ID: u64 = 100;
/// Node certificates issued for MapReduce processes.
const MR_IDS: std::ops::RangeInclusive<u64> = 100..=140;
/// The lab's per-process time limit (45 s; 120 s in the crash test).
const PROCESS_TIMEOUT: Duration = Duration::from_secs(45);
const CRASH_TIMEOUT: Duration = Duration::from_secs(120);

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "I",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "Sherlock",
    "Holmes",
    "Watson",
    "Tom",
    "Sawyer",
    "Huck",
    "river",
    "fence",
    "case",
    "moor",
    "hound",
    "Becky",
    "Aunt",
    "Polly",
    "Baker",
    "street",
    "London",
    "St",
    "Petersburg",
];

const FILES: &[&str] = &[
    "pg-being_ernest.txt",
    "pg-dorian_gray.txt",
    "pg-frankenstein.txt",
    "pg-grimm.txt",
    "pg-huckleberry_finn.txt",
    "pg-metamorphosis.txt",
    "pg-sherlock_holmes.txt",
    "pg-tom_sawyer.txt",
];

/// One test's world: a cluster, certificates for the MapReduce processes,
/// the loaded input and a scratch directory.
struct World {
    cluster: Cluster,
    /// A sharded cluster's controller nodes ("1,2,3"), routed by key.
    controller: Option<&'static str>,
    dir: PathBuf,
    input: BTreeMap<Vec<u8>, Vec<u8>>,
    coordinator_addr: SocketAddr,
    _tmp: tempfile::TempDir,
}

/// Generates the input files (deterministic text, `words` words each).
fn write_inputs(dir: &Path, words: usize) -> Vec<PathBuf> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5840);
    FILES
        .iter()
        .map(|name| {
            let mut text = String::new();
            for i in 0..words {
                // Zipf-like: low indexes far more often.
                let r: f64 = rng.random();
                let word = WORDS[((r * r * r) * WORDS.len() as f64) as usize];
                text.push_str(word);
                text.push(if i % 12 == 11 { '\n' } else { ' ' });
                if i % 97 == 0 {
                    text.push_str("-- ");
                }
            }
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

impl World {
    fn new(nodes: u64) -> World {
        World::create(nodes, None)
    }

    /// Three sharded nodes, 8 shards over groups 1 and 2 (both on nodes
    /// 1-3), the controller group on nodes 1-3.
    fn sharded() -> World {
        World::create(3, Some("1,2,3"))
    }

    fn create(nodes: u64, controller: Option<&'static str>) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let cluster = match controller {
            None => Cluster::start(&tmp.path().join("cluster"), nodes),
            Some(c) => {
                let cluster =
                    Cluster::start_args(&tmp.path().join("cluster"), nodes, &["--controller", c]);
                cluster.shard(c, 60_000, &["init", "--shards", "8", "--group", "1=1,2,3"]);
                cluster.shard(c, 60_000, &["join", "--group", "2=1,2,3"]);
                cluster
            }
        };
        shoal::certs::add(&cluster.tls, &MR_IDS.collect::<Vec<_>>(), &[]).unwrap();
        let dir = tmp.path().join("mr");
        std::fs::create_dir_all(dir.join("input")).unwrap();
        let files = write_inputs(&dir.join("input"), 6_000);
        let output = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("load")
            .args(cluster_args(&cluster, controller))
            .args(["--prefix", "in/"])
            .args(&files)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(output.status.success(), "shoal load failed");
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(summary["files"], 8, "{summary}");
        let input = files
            .iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                (format!("in/{name}").into_bytes(), std::fs::read(p).unwrap())
            })
            .collect();
        World {
            cluster,
            controller,
            dir,
            input,
            coordinator_addr: shoal::local_cluster::free_udp_addr().unwrap(),
            _tmp: tmp,
        }
    }

    /// `shoal mapreduce run` for `app` over the loaded input (one map task
    /// per file, as the lab), with `extra` arguments.
    fn coordinator(&self, app: &str, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("mapreduce")
            .args(self.args())
            .args(["run", "--app", app, "--input", "in/", "--output", "out/"])
            .args([
                "--reduce",
                &REDUCE.to_string(),
                "--split-bytes",
                "1",
                "--files",
            ])
            .args(["--job", "lab", "--id", &COORDINATOR_ID.to_string()])
            .arg(format!("--listen={}", self.coordinator_addr))
            .arg("--dir")
            .arg(self.dir.join("coordinator"))
            .args(extra)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// `shoal mapreduce worker` number `n` (node id 100 + n), in the
    /// scratch directory.
    fn worker(&self, n: u64) -> Child {
        let id = COORDINATOR_ID + n;
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("mapreduce")
            .args(self.args())
            .args(["worker", "--id", &id.to_string()])
            .arg(format!(
                "--coordinator={COORDINATOR_ID}@{}",
                self.coordinator_addr
            ))
            .arg("--dir")
            .arg(self.dir.join(format!("worker-{id}")))
            .args(["--out-dir", ".", "--coordinator-silence-ms", "3000"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    fn args(&self) -> Vec<String> {
        cluster_args(&self.cluster, self.controller)
    }

    fn client(&self) -> BlockingClient {
        let options = shoal::cluster::ClientOptions {
            controller: self
                .controller
                .map(|c| c.split(',').map(|n| n.parse().unwrap()).collect()),
            ..Default::default()
        };
        BlockingClient::connect_with(&self.cluster.members, &self.cluster.tls, options).unwrap()
    }

    /// `shoal mapreduce status --job lab` (JSON; `Null` if it printed none).
    fn status(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("mapreduce")
            .args(self.args())
            .args(["status", "--job", "lab"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// `sort mr-out* | grep .`
    fn merged_files(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with("mr-out-") {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                lines.extend(text.lines().filter(|l| !l.is_empty()).map(String::from));
            }
        }
        lines.sort();
        lines
    }

    /// The output keys, prefix stripped.
    fn output_keys(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let client = self.client();
        let pairs = client.scan("out/", "out0", 1_000_000).unwrap();
        client.close();
        pairs
            .into_iter()
            .map(|(k, v)| (k[4..].to_vec(), v.value.to_vec()))
            .collect()
    }

    /// Checks the files and the output keys against `want`.
    fn check(&self, want: &BTreeMap<Vec<u8>, Vec<u8>>) {
        let mut want_lines: Vec<String> = want
            .iter()
            .map(|(k, v)| {
                format!(
                    "{} {}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                )
            })
            .collect();
        want_lines.sort();
        let got = self.merged_files();
        assert_eq!(got.len(), want_lines.len(), "line count");
        assert_eq!(
            got, want_lines,
            "merged mr-out-* differ from the sequential run"
        );
        assert_eq!(&self.output_keys(), want, "output keys differ");
    }

    fn sequential(&self, app: &dyn MapReduceApp) -> BTreeMap<Vec<u8>, Vec<u8>> {
        run_sequential(app, self.input.iter())
    }
}

fn cluster_args(cluster: &Cluster, controller: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--cluster".into(),
        cluster.cluster_arg(),
        "--tls".into(),
        cluster.tls.display().to_string(),
    ];
    if let Some(c) = controller {
        args.push(format!("--controller={c}"));
    }
    args
}

/// Waits for `child` to exit within `timeout` (SIGKILLs it after) and
/// returns whether it exited successfully.
fn wait_within(child: &mut Child, timeout: Duration, what: &str) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(mut coordinator: Child, mut workers: Vec<Child>, timeout: Duration) {
    assert!(
        wait_within(&mut coordinator, timeout, "the coordinator"),
        "the coordinator failed"
    );
    for (i, w) in workers.iter_mut().enumerate() {
        wait_within(w, timeout, &format!("worker {i}"));
    }
}

/// Lab `wc`: coordinator + 3 workers; merged output == sequential.
#[test]
fn wc() {
    let world = World::new(3);
    let coordinator = world.coordinator("wc", &[]);
    let workers = (1..=3).map(|n| world.worker(n)).collect();
    finish(coordinator, workers, PROCESS_TIMEOUT);
    world.check(&world.sequential(app_by_name("wc").unwrap().as_ref()));
}

/// Lab `indexer`: 2 workers; merged output == sequential.
#[test]
fn indexer() {
    let world = World::new(1);
    let coordinator = world.coordinator("indexer", &[]);
    let workers = (1..=2).map(|n| world.worker(n)).collect();
    finish(coordinator, workers, PROCESS_TIMEOUT);
    world.check(&world.sequential(app_by_name("indexer").unwrap().as_ref()));
}

/// Lab map parallelism: 2 workers run `mtiming`; both ran maps (exactly
/// two `times-` keys) and some map saw 2 running at once.
#[test]
fn map_parallel() {
    let world = World::new(1);
    let coordinator = world.coordinator("mtiming", &[]);
    let workers = (1..=2).map(|n| world.worker(n)).collect();
    finish(coordinator, workers, PROCESS_TIMEOUT);
    let lines = world.merged_files();
    let times = lines.iter().filter(|l| l.starts_with("times-")).count();
    assert_eq!(times, 2, "both workers ran maps: {lines:?}");
    let parallel = lines
        .iter()
        .filter(|l| l.starts_with("parallel") && l.split(' ').skip(1).any(|n| n == "2"))
        .count();
    assert!(parallel >= 1, "maps ran in parallel: {lines:?}");
}

/// Lab reduce parallelism: 2 workers run `rtiming`; at least 2 reduce
/// keys saw 2 reducers at once.
#[test]
fn reduce_parallel() {
    let world = World::new(1);
    let coordinator = world.coordinator("rtiming", &[]);
    let workers = (1..=2).map(|n| world.worker(n)).collect();
    finish(coordinator, workers, PROCESS_TIMEOUT);
    let lines = world.merged_files();
    let parallel = lines
        .iter()
        .filter(|l| l.len() == 3 && l.as_bytes()[0].is_ascii_lowercase() && l.ends_with(" 2"))
        .count();
    assert!(parallel >= 2, "reduces ran in parallel: {lines:?}");
}

/// Lab job count: 4 workers, 2 at a time; every map task ran exactly once
/// (slow maps under the 10 s lease are not re-issued): `a 8`.
#[test]
fn job_count() {
    let world = World::new(1);
    let mut coordinator = world.coordinator("jobcount", &[]);
    let mut first = world.worker(1);
    let mut second = world.worker(2);
    wait_within(&mut second, PROCESS_TIMEOUT, "worker 2");
    let mut third = world.worker(3);
    let mut fourth = world.worker(4);
    wait_within(&mut fourth, PROCESS_TIMEOUT, "worker 4");
    for (w, what) in [(&mut first, "worker 1"), (&mut third, "worker 3")] {
        wait_within(w, PROCESS_TIMEOUT, what);
    }
    assert!(wait_within(
        &mut coordinator,
        PROCESS_TIMEOUT,
        "coordinator"
    ));
    assert_eq!(world.merged_files(), vec!["a 8".to_string()]);
}

/// Lab early exit: the output when the first process exits equals the
/// final output (nobody exits before every output is final).
#[test]
fn early_exit() {
    let world = World::new(1);
    let mut processes = vec![world.coordinator("early_exit", &[])];
    processes.extend((1..=3).map(|n| world.worker(n)));
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let snapshot = loop {
        if processes
            .iter_mut()
            .any(|p| p.try_wait().unwrap().is_some())
        {
            break world.merged_files();
        }
        assert!(Instant::now() < deadline, "nobody exited in time");
        std::thread::sleep(Duration::from_millis(20));
    };
    for (i, p) in processes.iter_mut().enumerate() {
        wait_within(p, PROCESS_TIMEOUT, &format!("process {i}"));
    }
    let last = world.merged_files();
    assert!(!last.is_empty());
    assert_eq!(
        snapshot, last,
        "output changed after the first process exited"
    );
}

/// Lab crash: `crash` exits or stalls at random in every map and reduce
/// call; workers are restarted in 3 loops while the job runs; the output
/// equals the sequential output of `nocrash`.
#[test]
fn crash_worker() {
    let world = World::new(1);
    let mut coordinator = world.coordinator("crash", &[]);
    let started = Instant::now();
    let mut slots: Vec<Option<Child>> = (1..=3).map(|n| Some(world.worker(n))).collect();
    while coordinator.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < CRASH_TIMEOUT,
            "the crash job took too long"
        );
        for (i, slot) in slots.iter_mut().enumerate() {
            let exited = match slot {
                Some(child) => child.try_wait().unwrap().is_some(),
                None => true,
            };
            if exited {
                // The lab restarts a worker 1 s after it exits.
                std::thread::sleep(Duration::from_millis(1_000));
                if coordinator.try_wait().unwrap().is_none() {
                    *slot = Some(world.worker(i as u64 + 1));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        coordinator.wait().unwrap().success(),
        "the coordinator failed"
    );
    for child in slots.iter_mut().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    world.check(&world.sequential(lab_app_by_name("nocrash").unwrap().as_ref()));
}

/// Beyond the lab: the coordinator is SIGKILLed mid-job and restarted with
/// `--resume`; the workers carry on and the output equals sequential.
#[test]
fn coordinator_killed_and_resumed() {
    let world = World::new(3);
    let mut coordinator = world.coordinator("indexer", &[]);
    let workers: Vec<Child> = (1..=2).map(|n| world.worker(n)).collect();
    // Kill it once the job record shows some maps done.
    common::wait_for("some map tasks to finish", PROCESS_TIMEOUT, || {
        world.status()["maps_done"].as_u64().unwrap_or(0) >= 2
    });
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let resumed = world.coordinator("indexer", &["--resume"]);
    finish(resumed, workers, PROCESS_TIMEOUT);
    world.check(&world.sequential(app_by_name("indexer").unwrap().as_ref()));
}

/// Beyond the lab: a worker is SIGKILLed once every map has finished and
/// before the reducers fetched its runs; its maps run again elsewhere and
/// the output equals sequential.
#[test]
fn worker_killed_after_maps() {
    let world = World::new(1);
    // The reduce of "sherlock" keys sleeps, so reduces are still running
    // when the maps are all done; the victim is whoever holds runs.
    let coordinator = world.coordinator("early_exit", &[]);
    let mut victim = world.worker(1);
    common::wait_for("every map task to finish", PROCESS_TIMEOUT, || {
        world.status()["maps_done"].as_u64() == Some(8)
    });
    victim.kill().unwrap();
    victim.wait().unwrap();
    let workers = (2..=3).map(|n| world.worker(n)).collect();
    finish(coordinator, workers, PROCESS_TIMEOUT);
    let progress = world.status();
    assert!(
        progress["attempts"].as_u64().unwrap() > 8 + u64::from(REDUCE),
        "the victim's maps ran again: {progress}"
    );
    world.check(&world.sequential(lab_app_by_name("early_exit").unwrap().as_ref()));
}

/// Beyond the lab: keys written into the input range while the job runs
/// (new keys, overwrites, deletes) do not change its result: it equals the
/// sequential run over the input as it was when the job pinned it.
#[test]
fn input_written_during_job() {
    let world = World::new(3);
    let coordinator = world.coordinator("wc", &[]);
    let workers = (1..=2).map(|n| world.worker(n)).collect();
    let client = world.client();
    // The job pins its input before it hands out a map; wait for the job
    // record, then write.
    common::wait_for("the job to be planned", PROCESS_TIMEOUT, || {
        client.get("__shoal/mapreduce/lab").is_ok()
    });
    for i in 0..50 {
        client
            .put(format!("in/zz-new-{i}"), "extra words extra words")
            .unwrap();
    }
    client.put("in/pg-grimm.txt", "replaced").unwrap();
    client.delete("in/pg-dorian_gray.txt").unwrap();
    client.close();
    finish(coordinator, workers, PROCESS_TIMEOUT);
    world.check(&world.sequential(app_by_name("wc").unwrap().as_ref()));
}

/// Bad input gets a clear error and writes nothing.
#[test]
fn bad_jobs_are_refused() {
    let world = World::new(1);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("mapreduce")
            .args(world.args())
            .arg("run")
            .args(args)
            .arg(format!("--listen={}", world.coordinator_addr))
            .arg("--dir")
            .arg(world.dir.join("bad"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let base = ["--input", "in/", "--output", "out/"];
    let err = run(&[&["--app", "nosuch"][..], &base].concat());
    assert!(err.contains("unknown application"), "{err}");
    let err = run(&["--app", "wc", "--input", "nothing/", "--output", "out/"]);
    assert!(err.contains("empty"), "{err}");
    let err = run(&["--app", "wc", "--input", "in/", "--output", "in/out/"]);
    assert!(err.contains("overlaps"), "{err}");
    let err = run(&[&["--app", "wc", "--reduce", "0"][..], &base].concat());
    assert!(err.contains("reduce count"), "{err}");
    assert!(world.output_keys().is_empty());
    let client = world.client();
    assert!(client.scan("__shoal/", "__shoal0", 10).unwrap().is_empty());
    client.close();
}

/// Beyond the lab: a job over a sharded cluster (one pin per group, at
/// least one map task per shard) while a shard moves between groups; the result
/// equals sequential.
#[test]
fn sharded_job_while_a_shard_moves() {
    let world = World::sharded();
    // Maps sleep 500 ms each, so the move happens while they run.
    let coordinator = world.coordinator("slow_wc", &[]);
    let workers = (1..=2).map(|n| world.worker(n)).collect();
    let client = world.client();
    common::wait_for("the job to be planned", PROCESS_TIMEOUT, || {
        client.get("__shoal/mapreduce/lab").is_ok()
    });
    client.close();
    let status = world.cluster.shard("1,2,3", 60_000, &["status"]);
    let (shard, group) = status[1..]
        .iter()
        .map(|l| (l["shard"].as_u64().unwrap(), l["group"].as_u64().unwrap()))
        .next()
        .unwrap();
    let to = if group == 1 { "2" } else { "1" };
    world.cluster.shard(
        "1,2,3",
        60_000,
        &["move", "--shard", &shard.to_string(), "--to", to],
    );
    let progress = world.status();
    // Maps sleep 500 ms each (8 maps on 2 workers: about 2 s), and a move
    // takes well under that.
    assert!(
        progress["maps_done"].as_u64().unwrap() < 8,
        "the move finished while maps ran: {progress}"
    );
    finish(coordinator, workers, PROCESS_TIMEOUT);
    world.check(&world.sequential(app_by_name("wc").unwrap().as_ref()));
}

/// The in-process API: a job over an embedded `Db` with a user's own app
/// (not a built-in) equals the sequential run over one snapshot of the
/// input, while a writer adds keys to it.
#[test]
fn embedded_db_job() {
    use std::sync::Arc;
    /// Word length -> the distinct words of that length, sorted.
    struct Lengths;
    impl MapReduceApp for Lengths {
        fn map(&self, _key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
            for word in value
                .split(|b| !b.is_ascii_alphabetic())
                .filter(|w| !w.is_empty())
            {
                emit(word.len().to_string().as_bytes(), word);
            }
        }
        fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
            let mut distinct: Vec<&[u8]> = values.collect();
            distinct.sort_unstable();
            distinct.dedup();
            distinct.join(&b","[..])
        }
    }
    /// A distinct 24-letter word per `i`.
    fn word24(i: usize) -> String {
        let mut w = String::from("zz");
        let mut n = i;
        for _ in 0..22 {
            w.push((b'a' + (n % 26) as u8) as char);
            n /= 26;
        }
        w
    }
    let tmp = tempfile::tempdir().unwrap();
    let db = shoal::Db::open(tmp.path().join("db")).unwrap();
    let files = write_inputs(tmp.path(), 2_000);
    let mut input = BTreeMap::new();
    for path in &files {
        let key = format!("in/{}", path.file_name().unwrap().to_str().unwrap());
        let text = std::fs::read(path).unwrap();
        db.put(key.clone(), text.clone()).unwrap();
        input.insert(key.into_bytes(), text);
    }
    let mut job = shoal::MapReduceJob::new("lengths", b"in/", b"len/", 3, tmp.path().join("mr"));
    job.options.split_bytes = 1;
    const NEW: usize = 200;
    let writer = {
        let db = db.async_db();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for i in 0..NEW {
                    db.put(format!("in/new-{i:04}"), word24(i)).await.unwrap();
                }
            })
        })
    };
    let progress = db.mapreduce(&job, Arc::new(Lengths)).unwrap();
    writer.join().unwrap();
    let got: BTreeMap<Vec<u8>, Vec<u8>> = db
        .scan_prefix("len/")
        .map(|pair| {
            let (k, v) = pair.unwrap();
            (k[4..].to_vec(), v.value.to_vec())
        })
        .collect();
    // The writes are sequential, so the pinned snapshot holds the first k
    // of them, for some k: the result is the sequential run over that.
    let snapshot = |k: usize| {
        let mut data = input.clone();
        for i in 0..k {
            data.insert(
                format!("in/new-{i:04}").into_bytes(),
                word24(i).into_bytes(),
            );
        }
        data
    };
    let k = got.get(b"24".as_slice()).map_or(0, |words| {
        words
            .split(|&b| b == b',')
            .filter(|w| w.starts_with(b"zz"))
            .count()
    });
    assert_eq!(
        got,
        run_sequential(&Lengths, snapshot(k).iter()),
        "snapshot of {k} writes"
    );
    assert_eq!(progress.maps as usize, 8 + k, "one map task per input key");
    db.close().unwrap();
}

/// Beyond the lab: the node holding the input pin restarts mid-job; the
/// snapshot is gone, so the job fails with a clear reason instead of
/// reading a different point in time.
#[test]
fn lost_snapshot_fails_the_job_clearly() {
    let mut world = World::new(1);
    let mut coordinator = world.coordinator("slow_wc", &[]);
    let workers: Vec<Child> = (1..=2).map(|n| world.worker(n)).collect();
    let client = world.client();
    common::wait_for("the job to be planned", PROCESS_TIMEOUT, || {
        client.get("__shoal/mapreduce/lab").is_ok()
    });
    client.close();
    world.cluster.kill(1);
    world.cluster.start_node(1);
    assert!(
        !wait_within(&mut coordinator, PROCESS_TIMEOUT, "the coordinator"),
        "the job cannot succeed without its snapshot"
    );
    let progress = world.status();
    let failure = progress["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("snapshot"), "{progress}");
    for mut w in workers {
        wait_within(&mut w, PROCESS_TIMEOUT, "a worker");
    }
}
