//! `shoal bench-mapreduce`: word count over generated text stored in a
//! local cluster, three ways, alternating in rounds (A B C A B C ...) so
//! that drift of the machine hits each alike:
//!
//! - **sequential**: the same map and reduce code (`map_task` with the
//!   combiner, `reduce_task`) over the same text, in one thread of this
//!   process, reading the text from memory;
//! - **mapreduce**: `shoal mapreduce run --workers N` (the coordinator and
//!   N worker processes) over the text stored as keys, output written back
//!   as keys;
//! - **coreutils**: `tr -cs 'A-Za-z' '\n' | sort | uniq -c` over the text
//!   exported to one file (`LC_ALL=C`).
//!
//! The text is Zipf-distributed words (exponent 1) over a deterministic
//! vocabulary, so every run reads the same bytes. Each round checks that
//! the job's output keys equal the sequential counts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use shoal_shard::mapreduce::{map_task, reduce_task, MapReduceApp, WordCount};

use crate::local_cluster::LocalCluster;

/// Settings of one benchmark run.
#[derive(Debug, Clone)]
pub struct MrBenchOptions {
    /// The `shoal` binary.
    pub exe: PathBuf,
    /// Working directory (wiped first).
    pub dir: PathBuf,
    /// Text to generate, MiB.
    pub mib: u64,
    /// Rounds of the three systems.
    pub rounds: u32,
    /// Worker processes of the job.
    pub workers: u64,
    /// Reduce partitions of the job.
    pub reduce: u32,
}

/// One round's seconds per system.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Round {
    /// Sequential, in-process.
    pub sequential_secs: f64,
    /// The MapReduce job, end to end.
    pub mapreduce_secs: f64,
    /// tr | sort | uniq -c.
    pub coreutils_secs: f64,
}

/// Vocabulary size of the generated text.
const VOCABULARY: usize = 50_000;

/// A deterministic vocabulary: letter-only words of 2..=11 letters.
fn vocabulary() -> Vec<String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    (0..VOCABULARY)
        .map(|_| {
            let len = rng.random_range(2..=11);
            (0..len)
                .map(|_| {
                    let c = rng.random_range(0..52u8);
                    if c < 26 {
                        (b'a' + c) as char
                    } else {
                        (b'A' + c - 26) as char
                    }
                })
                .collect()
        })
        .collect()
}

/// Writes `mib` MiB of Zipf text in 1 MiB files under `dir`; returns them.
fn generate(dir: &Path, mib: u64) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let words = vocabulary();
    // Zipf(1) by inverse CDF over precomputed cumulative weights.
    let mut cumulative = Vec::with_capacity(words.len());
    let mut total = 0.0;
    for rank in 1..=words.len() {
        total += 1.0 / rank as f64;
        cumulative.push(total);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut files = Vec::new();
    for n in 0..mib {
        let mut text = Vec::with_capacity(1 << 20);
        let mut column = 0;
        while text.len() < (1 << 20) - 16 {
            let x = rng.random::<f64>() * total;
            let i = cumulative.partition_point(|&c| c < x).min(words.len() - 1);
            text.extend_from_slice(words[i].as_bytes());
            column += words[i].len() + 1;
            if column > 72 {
                text.push(b'\n');
                column = 0;
            } else {
                text.push(b' ');
            }
        }
        let path = dir.join(format!("text-{n:05}.txt"));
        std::fs::write(&path, &text)?;
        files.push(path);
    }
    Ok(files)
}

/// One map task over all of the text (one combining table), then one
/// reduce: the job's code with no distribution at all.
fn sequential(texts: &[Vec<u8>]) -> (BTreeMap<Vec<u8>, Vec<u8>>, f64) {
    let started = Instant::now();
    let app = WordCount;
    let inputs = texts.iter().map(|t| (&b""[..], t.as_slice()));
    let runs = map_task(&app as &dyn MapReduceApp, inputs, 1);
    let out: BTreeMap<_, _> = reduce_task(&app, runs).into_iter().collect();
    (out, started.elapsed().as_secs_f64())
}

fn coreutils(file: &Path) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg("tr -cs 'A-Za-z' '\\n' < \"$1\" | sort | uniq -c > /dev/null")
        .arg("sh")
        .arg(file)
        .env("LC_ALL", "C")
        .status()
        .context("running tr | sort | uniq -c")?;
    if !status.success() {
        bail!("tr | sort | uniq -c failed: {status}");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Runs the benchmark; prints a table and one JSON line per round.
pub fn run(options: &MrBenchOptions) -> Result<Vec<Round>> {
    let _ = std::fs::remove_dir_all(&options.dir);
    std::fs::create_dir_all(&options.dir)?;
    eprintln!("generating {} MiB of Zipf text ...", options.mib);
    let files = generate(&options.dir.join("text"), options.mib)?;
    let texts: Vec<Vec<u8>> = files
        .iter()
        .map(std::fs::read)
        .collect::<std::io::Result<_>>()?;
    let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    let export = options.dir.join("all.txt");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&export)?);
        for t in &texts {
            out.write_all(t)?;
        }
    }
    let mut cluster = LocalCluster::create(&options.exe, &options.dir.join("cluster"), 1, &[])?;
    let coordinator_id = 100;
    let worker_ids: Vec<u64> = (coordinator_id..=coordinator_id + options.workers).collect();
    crate::certs::add(cluster.tls_dir(), &worker_ids, &[])?;
    cluster.start_all()?;
    let cluster_arg = cluster.cluster_arg();
    let tls = cluster.tls_dir().to_path_buf();
    eprintln!("loading the text into a 1-node cluster ...");
    let load = Command::new(&options.exe)
        .args(["load", "--cluster", &cluster_arg, "--tls"])
        .arg(&tls)
        .args(["--timeout-ms", "60000", "--prefix", "text/"])
        .args(&files)
        .stderr(Stdio::inherit())
        .output()?;
    if !load.status.success() {
        bail!("shoal load failed");
    }
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        let (want, sequential_secs) = sequential(&texts);
        let output = format!("count{round}/");
        let started = Instant::now();
        let job = Command::new(&options.exe)
            .args(["mapreduce", "--cluster", &cluster_arg, "--tls"])
            .arg(&tls)
            .args([
                "--timeout-ms",
                "60000",
                "run",
                "--app",
                "wc",
                "--input",
                "text/",
            ])
            .args(["--output", &output, "--reduce", &options.reduce.to_string()])
            .args(["--id", &coordinator_id.to_string()])
            .args(["--workers", &options.workers.to_string()])
            .arg("--dir")
            .arg(options.dir.join(format!("job{round}")))
            .stderr(Stdio::inherit())
            .output()?;
        let mapreduce_secs = started.elapsed().as_secs_f64();
        if !job.status.success() {
            bail!("the job failed");
        }
        let summary: serde_json::Value = serde_json::from_slice(&job.stdout)?;
        check_output(&cluster_arg, &tls, &output, &want)?;
        let coreutils_secs = coreutils(&export)?;
        let r = Round {
            sequential_secs,
            mapreduce_secs,
            coreutils_secs,
        };
        println!(
            "{}",
            serde_json::json!({"round": round, "bytes": bytes, "secs": r, "job": summary})
        );
        rounds.push(r);
    }
    cluster.stop_all(std::time::Duration::from_secs(10))?;
    let mb = bytes as f64 / 1e6;
    let ratio = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "word count over {:.0} MB, medians of {} rounds:",
        mb, options.rounds
    );
    for (name, secs) in [
        ("sequential (1 thread)", ratio(|r| r.sequential_secs)),
        ("mapreduce", ratio(|r| r.mapreduce_secs)),
        ("tr|sort|uniq -c", ratio(|r| r.coreutils_secs)),
    ] {
        println!("  {name:<24} {secs:>7.2} s  {:>7.1} MB/s", mb / secs);
    }
    println!(
        "  speedup of mapreduce over sequential: median ratio {:.2}x; over coreutils {:.2}x",
        ratio(|r| r.sequential_secs / r.mapreduce_secs),
        ratio(|r| r.coreutils_secs / r.mapreduce_secs)
    );
    Ok(rounds)
}

/// Checks the job's output keys against the sequential counts.
fn check_output(
    cluster: &str,
    tls: &Path,
    prefix: &str,
    want: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<()> {
    let members = crate::cluster::parse_members(cluster)?;
    let client = crate::cluster::BlockingClient::connect(&members, tls)?;
    let end = shoal_shard::mapreduce::prefix_end(prefix.as_bytes());
    let got = client.scan(prefix.to_string(), end, u64::MAX)?;
    client.close();
    if got.len() != want.len() {
        bail!(
            "the job wrote {} keys, the sequential run counted {}",
            got.len(),
            want.len()
        );
    }
    for (key, value) in got {
        let word = &key[prefix.len()..];
        if want.get(word).map(Vec::as_slice) != Some(&value.value[..]) {
            bail!("count of {:?} differs", String::from_utf8_lossy(word));
        }
    }
    Ok(())
}
