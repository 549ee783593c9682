//! The lab's test applications (6.5840 `mrapps`), built in so that
//! `shoal mapreduce` can run the lab's tests by name. Unlike the real
//! apps, several have side effects on purpose: marker files in the
//! worker's current directory (as the lab's, counted to see how many
//! workers run at once or how often a task ran), sleeps, and process exits.
//! Only the test suites use them.
//!
//! - `mtiming`: map counts the live map workers (marker files
//!   `mr-worker-map-<pid>` of live processes), sleeps 1 s, and emits
//!   `times-<pid>` and `parallel-<pid> N`.
//! - `rtiming`: map emits keys `a`..`j`; reduce counts the live reduce
//!   workers the same way and returns the count.
//! - `jobcount`: map writes `mr-worker-jobcount-<pid>-<n>`, sleeps 2–5 s
//!   and emits `("a", "x")`; reduce returns the number of such files.
//! - `early_exit`: map emits `(input key, "1")`; reduce sleeps 3 s for keys
//!   containing `sherlock` or `tom`, then returns the value count.
//! - `crash` / `nocrash`: map emits `a` → key, `b` → key length, `c` →
//!   value length, `d` → `xyzzy`; reduce sorts and joins the values.
//!   `crash` first, in every call: exits the process (1/3), sleeps up to
//!   10 s (1/3), or goes on.
//! - `slow_wc` (ours, not the lab's): word count whose map sleeps 500 ms
//!   per call, so that a test can change the cluster while maps run.
//!
//! Process liveness is read from `/proc/<pid>` (Linux), as the lab's
//! `kill(pid, 0)`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::app::MapReduceApp;

/// The lab test application called `name`, if any.
pub fn lab_app_by_name(name: &str) -> Option<Arc<dyn MapReduceApp>> {
    Some(match name {
        "mtiming" => Arc::new(MapTiming),
        "rtiming" => Arc::new(ReduceTiming),
        "jobcount" => Arc::new(JobCount::default()),
        "early_exit" => Arc::new(EarlyExit),
        "crash" => Arc::new(Crash { crashes: true }),
        "nocrash" => Arc::new(Crash { crashes: false }),
        "slow_wc" => Arc::new(SlowWordCount),
        _ => return None,
    })
}

/// How many processes of `phase` run now: writes this process's marker,
/// counts markers of live processes, sleeps 1 s, removes the marker.
fn parallel(phase: &str) -> usize {
    let pid = std::process::id();
    let mine = format!("mr-worker-{phase}-{pid}");
    let _ = std::fs::write(&mine, b"x");
    let pattern = format!("mr-worker-{phase}-");
    let live = std::fs::read_dir(".")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix(&pattern))
                        .and_then(|pid| pid.parse::<u32>().ok())
                })
                .filter(|pid| Path::new("/proc").join(pid.to_string()).exists())
                .count()
        })
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    let _ = std::fs::remove_file(&mine);
    live
}

fn sorted_join(values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
    let mut all: Vec<&[u8]> = values.collect();
    all.sort_unstable();
    all.join(&b" "[..])
}

struct MapTiming;

impl MapReduceApp for MapTiming {
    fn map(&self, _key: &[u8], _value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let pid = std::process::id();
        let n = parallel("map");
        emit(
            format!("times-{pid}").as_bytes(),
            format!("{now:.1}").as_bytes(),
        );
        emit(
            format!("parallel-{pid}").as_bytes(),
            n.to_string().as_bytes(),
        );
    }

    fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        sorted_join(values)
    }
}

struct ReduceTiming;

impl MapReduceApp for ReduceTiming {
    fn map(&self, _key: &[u8], _value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        for key in b'a'..=b'j' {
            emit(&[key], b"1");
        }
    }

    fn reduce(&self, _key: &[u8], _values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        parallel("reduce").to_string().into_bytes()
    }
}

#[derive(Default)]
struct JobCount {
    calls: AtomicU64,
}

impl MapReduceApp for JobCount {
    fn map(&self, _key: &[u8], _value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let _ = std::fs::write(
            format!("mr-worker-jobcount-{}-{n}", std::process::id()),
            b"x",
        );
        std::thread::sleep(Duration::from_millis(2_000 + rand::random::<u64>() % 3_000));
        emit(b"a", b"x");
    }

    fn reduce(&self, _key: &[u8], _values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        let count = std::fs::read_dir(".")
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with("mr-worker-jobcount")
                    })
                    .count()
            })
            .unwrap_or(0);
        count.to_string().into_bytes()
    }
}

struct EarlyExit;

impl MapReduceApp for EarlyExit {
    fn map(&self, key: &[u8], _value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        emit(key, b"1");
    }

    fn reduce(&self, key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        let contains = |needle: &[u8]| key.windows(needle.len()).any(|w| w == needle);
        if contains(b"sherlock") || contains(b"tom") {
            std::thread::sleep(Duration::from_secs(3));
        }
        values.count().to_string().into_bytes()
    }
}

struct SlowWordCount;

impl MapReduceApp for SlowWordCount {
    fn map(&self, key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        std::thread::sleep(Duration::from_millis(500));
        super::app::WordCount.map(key, value, emit);
    }

    fn reduce(&self, key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        super::app::WordCount.reduce(key, values)
    }
}

struct Crash {
    crashes: bool,
}

impl Crash {
    fn maybe_crash(&self) {
        if !self.crashes {
            return;
        }
        match rand::random::<u32>() % 1000 {
            0..=329 => std::process::exit(1),
            330..=659 => std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 10_000)),
            _ => {}
        }
    }
}

impl MapReduceApp for Crash {
    fn map(&self, key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        self.maybe_crash();
        emit(b"a", key);
        emit(b"b", key.len().to_string().as_bytes());
        emit(b"c", value.len().to_string().as_bytes());
        emit(b"d", b"xyzzy");
    }

    fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        self.maybe_crash();
        sorted_join(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapreduce::run_sequential;

    /// Goal: `nocrash` computes what the lab's does, and the names resolve.
    #[test]
    fn nocrash_output() {
        let app = lab_app_by_name("nocrash").unwrap();
        let out = run_sequential(app.as_ref(), [(&b"f1"[..], &b"abc"[..]), (b"f22", b"")]);
        assert_eq!(out[&b"a".to_vec()], b"f1 f22");
        assert_eq!(out[&b"b".to_vec()], b"2 3");
        assert_eq!(out[&b"c".to_vec()], b"0 3");
        assert_eq!(out[&b"d".to_vec()], b"xyzzy xyzzy");
        for name in ["mtiming", "rtiming", "jobcount", "early_exit", "crash"] {
            assert!(lab_app_by_name(name).is_some(), "{name}");
        }
        assert!(lab_app_by_name("wc").is_none());
    }
}
