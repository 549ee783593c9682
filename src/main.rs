//! The `shoal` command.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use shoal::crashtest;

#[derive(Parser)]
#[command(name = "shoal", version, about = "Shoal: a replicated, sharded key/value database")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Engine demo: write a workload, SIGKILL the writer mid-write, reopen,
    /// and show that everything acknowledged survived and the state is
    /// consistent.
    Demo {
        /// Where to keep the demo's data (wiped first).
        #[arg(long, default_value = "./demo-data")]
        dir: PathBuf,
        /// How many times to kill the writer.
        #[arg(long, default_value_t = 5)]
        kills: u32,
        /// Workload seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Cluster certificates (mutual TLS).
    Certs {
        #[command(subcommand)]
        command: CertsCmd,
    },
    /// (Crash workload) append and apply until killed; prints `ack N`.
    #[command(hide = true)]
    EngineWriter {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        stop_after: Option<u64>,
    },
    /// (Crash workload) install snapshots until killed; prints `installed W`.
    #[command(hide = true)]
    EngineInstaller {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        rounds: Option<u64>,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a cluster CA and certificates for the given nodes and clients.
    Init {
        /// Directory to write (must not hold a CA yet).
        #[arg(long)]
        out: PathBuf,
        /// Node ids, comma-separated (e.g. 1,2,3).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u64>,
        /// Client names, comma-separated (`admin` may set fault filters).
        #[arg(long, value_delimiter = ',', default_value = "client,admin")]
        clients: Vec<String>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    match Cli::parse().command {
        Cmd::Demo { dir, kills, seed } => demo(&dir, kills, seed),
        Cmd::Certs { command: CertsCmd::Init { out, nodes, clients } } => {
            shoal::certs::init(&out, &nodes, &clients)?;
            println!("wrote a cluster CA and certificates for nodes {nodes:?} and clients {clients:?} to {}", out.display());
            Ok(())
        }
        Cmd::EngineWriter { dir, seed, stop_after } => crashtest::run_writer(&dir, seed, stop_after),
        Cmd::EngineInstaller { dir, rounds } => crashtest::run_installer(&dir, rounds),
    }
}

fn spawn_self(args: &[&str]) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    Process::new(exe).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("starting the writer")
}

/// Reads the child's lines until `stop(line)` is true; returns the lines seen.
fn read_until(child: &mut Child, mut stop: impl FnMut(&str) -> bool) -> Result<()> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if stop(&line?) {
            return Ok(());
        }
    }
    bail!("the writer exited before it was killed")
}

fn demo(dir: &Path, kills: u32, seed: u64) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let log_dir = dir.join("engine");
    let log_dir_arg = log_dir.display().to_string();
    println!("Shoal engine demo: a writer appends Raft log batches (synced) and applies them to the KV state machine;");
    println!("we SIGKILL it mid-write {kills} times, reopen the database each time, and check what survived.\n");
    let bar = indicatif::ProgressBar::new(u64::from(kills));
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} kills  {msg}").expect("static template"));
    let mut acked = 0;
    let mut summary = Vec::new();
    for round in 0..kills {
        let target = acked + 2_000 + u64::from(round) * 750;
        let mut child = spawn_self(&["engine-writer", "--dir", &log_dir_arg, "--seed", &seed.to_string()])?;
        read_until(&mut child, |line| {
            if let Some(n) = line.strip_prefix("ack ").and_then(|n| n.parse::<u64>().ok()) {
                acked = n;
                bar.set_message(format!("acknowledged index {acked}"));
            }
            acked >= target
        })?;
        child.kill()?;
        child.wait()?;
        let check = crashtest::check_writer(&log_dir, seed, acked)?;
        bar.inc(1);
        summary.push(format!(
            "  kill {}: acknowledged {acked:>6}, log holds [{}, {}], applied {} -> consistent",
            round + 1,
            check.first_index,
            check.last_index,
            check.applied_index
        ));
        acked = check.last_index;
    }
    bar.finish_and_clear();
    for line in &summary {
        println!("{line}");
    }
    println!("\nSnapshot install: killing an installer that alternates two SST snapshots of one shard.");
    let install_dir = dir.join("install");
    std::fs::create_dir_all(&install_dir)?;
    let install_arg = install_dir.display().to_string();
    for round in 0..3 {
        let mut child = spawn_self(&["engine-installer", "--dir", &install_arg])?;
        let mut installs = 0;
        read_until(&mut child, |line| {
            installs += u32::from(line.starts_with("installed"));
            installs > round
        })?;
        child.kill()?;
        child.wait()?;
        let check = crashtest::check_installer(&install_dir)?;
        let interrupted = if check.finished_interrupted_install { ", an interrupted install was finished on reopen" } else { "" };
        println!(
            "  kill {}: shard holds snapshot {} entirely{interrupted} (never a mix)",
            round + 1,
            check.template.map_or("none".into(), |w| w.to_string())
        );
    }
    println!("\nEvery acknowledged entry survived {kills} SIGKILLs; the state machine always equalled a replay of the log.");
    println!("Data is in {}.", dir.display());
    Ok(())
}
