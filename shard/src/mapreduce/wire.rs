//! What MapReduce processes say to each other, and the intermediate file
//! format. Workers call the coordinator (ask for a task, report it) and
//! each other (send me your run of partition `p`); runs travel as `net`
//! bulk files, so they are CRC-checked in transit, and carry their own
//! CRC on disk. [`MrProtocol`] is the `net::Protocol` of a job's
//! endpoints; both ends and the tests use these types.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shoal_net::{NodeId, Protocol};

use super::coordinator::{TaskRef, WorkerId};
use super::plan::MapSplit;
use super::worker::Run;
use crate::client::PinnedShard;

/// The `net` protocol of a MapReduce job's coordinator and workers.
#[derive(Debug)]
pub struct MrProtocol;

/// Peer messages: none (everything is a call or a file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MrMessage {}

impl Protocol for MrProtocol {
    type Message = MrMessage;
    type Request = MrRequest;
    type Response = MrResponse;
    type FileMeta = RunId;
}

/// Who a worker process is: its `net` node id (from its certificate), an
/// incarnation drawn at every start (a restarted worker has lost whatever
/// its previous process held), and the address others reach it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// Its node id.
    pub node: NodeId,
    /// Drawn at start; never 0.
    pub incarnation: u32,
    /// Where reducers fetch its runs (`None`: in-process network).
    pub addr: Option<SocketAddr>,
}

impl WorkerHello {
    /// The coordinator's name for this process: node id and incarnation.
    pub fn worker(&self) -> WorkerId {
        WorkerId(self.node.0 << 32 | u64::from(self.incarnation))
    }
}

/// The node id of a worker named by [`WorkerHello::worker`].
pub fn worker_node(worker: WorkerId) -> NodeId {
    NodeId(worker.0 >> 32)
}

/// One run file: map task `task`'s attempt `attempt`, partition
/// `partition`, of job `job`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunId {
    /// The job's id (drawn when it was created).
    pub job: u64,
    /// Map task.
    pub task: u32,
    /// Its attempt.
    pub attempt: u32,
    /// Reduce partition.
    pub partition: u32,
}

impl RunId {
    /// The run's file name in a worker's directory.
    pub fn file_name(&self) -> String {
        format!(
            "mr-{:016x}-{}-{}-{}",
            self.job, self.task, self.attempt, self.partition
        )
    }
}

/// Where a finished map task's runs live: stored (postcard) in the job
/// table's opaque map output location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSource {
    /// The map task.
    pub task: u32,
    /// The attempt that won it (its runs' names).
    pub attempt: u32,
    /// The worker process that made them (the table's name for it).
    pub holder: WorkerHello,
    /// Where to fetch them: the holder, or the process that replaced it
    /// under the same node id (it serves runs left in its directory).
    pub reach: WorkerHello,
}

/// What every worker needs to know of the job it works for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHeader {
    /// The job's id.
    pub job: u64,
    /// The application, by name (see [`super::app_by_name`]).
    pub app: String,
    /// Reduce partitions.
    pub reduce_count: u32,
    /// Output keys are this prefix followed by the intermediate key.
    pub output_prefix: Vec<u8>,
    /// Also write the lab's `mr-out-<partition>` files into the worker's
    /// output directory.
    pub write_files: bool,
}

/// Where a job's time went, summed over the winning attempts, in
/// milliseconds of worker time (two workers busy for 1 s add 2 000).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Reading map input at the snapshot.
    pub read_ms: u64,
    /// Running map (and the combiner) and storing runs.
    pub map_ms: u64,
    /// Fetching runs from their holders.
    pub shuffle_ms: u64,
    /// Running reduce.
    pub reduce_ms: u64,
    /// Writing the output into the database (and files).
    pub write_ms: u64,
}

impl PhaseTimes {
    /// Adds `other` to these.
    pub fn add(&mut self, other: &PhaseTimes) {
        self.read_ms += other.read_ms;
        self.map_ms += other.map_ms;
        self.shuffle_ms += other.shuffle_ms;
        self.reduce_ms += other.reduce_ms;
        self.write_ms += other.write_ms;
    }
}

/// A call to a coordinator or a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MrRequest {
    /// Worker → coordinator: give me work.
    Task {
        /// The caller.
        hello: WorkerHello,
    },
    /// Worker → coordinator: map attempt finished; its runs are stored.
    MapDone {
        /// The caller.
        hello: WorkerHello,
        /// Map task.
        task: u32,
        /// Attempt.
        attempt: u32,
        /// Input bytes it read.
        bytes_read: u64,
        /// Where its time went.
        times: PhaseTimes,
    },
    /// Worker → coordinator: reduce attempt finished; its output is
    /// written and durable.
    ReduceDone {
        /// The caller.
        hello: WorkerHello,
        /// Partition.
        partition: u32,
        /// Attempt.
        attempt: u32,
        /// Where its time went.
        times: PhaseTimes,
    },
    /// Worker → coordinator: the attempt failed (app panic, I/O, input
    /// snapshot gone).
    Failed {
        /// The caller.
        hello: WorkerHello,
        /// The task.
        task: TaskRef,
        /// Attempt.
        attempt: u32,
        /// Why, for the log.
        reason: String,
    },
    /// Reducer → coordinator: the runs of `holder` could not be fetched,
    /// so reduce `partition`'s attempt `attempt` ends (uncharged).
    FetchFailed {
        /// The caller.
        hello: WorkerHello,
        /// The reduce partition of the attempt.
        partition: u32,
        /// The attempt.
        attempt: u32,
        /// The worker that should have them.
        holder: WorkerHello,
        /// Why.
        reason: String,
    },
    /// Worker → coordinator: the input snapshot of `shard` is gone; the
    /// job cannot finish.
    PinLost {
        /// The caller.
        hello: WorkerHello,
        /// The shard whose pin is gone.
        shard: u32,
    },
    /// Reducer → mapper: send me this run as a bulk file.
    SendRun {
        /// The caller (so the mapper can reach it).
        hello: WorkerHello,
        /// The run.
        run: RunId,
    },
    /// Anyone → coordinator: how far along is the job.
    Status,
    /// Reducer → coordinator: where is worker node `node` now (its latest
    /// incarnation and address)?
    Locate {
        /// The node.
        node: NodeId,
    },
}

/// A task handed to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TaskReply {
    /// Map `split` of the job's input, read through `pin`.
    Map {
        /// The job.
        header: JobHeader,
        /// Map task.
        task: u32,
        /// Attempt to report.
        attempt: u32,
        /// The input to read.
        split: MapSplit,
        /// The input snapshot of the split's shard.
        pin: PinnedShard,
    },
    /// Reduce `partition` from these runs.
    Reduce {
        /// The job.
        header: JobHeader,
        /// Partition.
        partition: u32,
        /// Attempt to report.
        attempt: u32,
        /// Every map task's runs, by task.
        sources: Vec<RunSource>,
    },
    /// Nothing now; ask again after `ms`.
    Wait {
        /// Milliseconds.
        ms: u64,
    },
    /// The job is done (or failed): exit.
    Done,
}

/// Progress of a job, as the coordinator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Map tasks finished / all.
    pub maps_done: u32,
    /// All map tasks.
    pub maps: u32,
    /// Reduce partitions finished.
    pub reduces_done: u32,
    /// All reduce partitions.
    pub reduces: u32,
    /// Input bytes the winning map attempts read.
    pub bytes_read: u64,
    /// Input bytes of the whole job (at its snapshot).
    pub bytes_total: u64,
    /// Attempts handed out in all (more than tasks: re-runs and backups).
    pub attempts: u64,
    /// Where the winning attempts' time went.
    pub times: PhaseTimes,
    /// The job finished (every output final) or failed.
    pub finished: bool,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

/// An answer to an [`MrRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MrResponse {
    /// The next task.
    Task(TaskReply),
    /// A report was taken.
    Ack,
    /// The run was sent (its file has reached the caller).
    RunSent,
    /// The mapper does not have that run (restarted, or never made it).
    RunMissing,
    /// Job progress.
    Progress(JobProgress),
    /// The latest hello of the node asked about, if it ever registered.
    Located(Option<WorkerHello>),
    /// The request was refused (wrong job, bad report, not a coordinator).
    Refused {
        /// Why.
        reason: String,
    },
}

/// Magic at the start of a run file (format version 1).
const RUN_MAGIC: &[u8; 8] = b"SHMRUN01";

/// Why a run file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    /// Reading or writing failed.
    #[error("run file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid run (truncated, corrupt, wrong format).
    #[error("run file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Encodes a run: magic, then per pair `u32` key length, key, `u32` value
/// length, value (little endian), then the pair count (`u64`) and a CRC32
/// of everything before it.
pub fn encode_run(run: &Run) -> Vec<u8> {
    let size: usize = run.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(RUN_MAGIC.len() + size + 12);
    out.extend_from_slice(RUN_MAGIC);
    for (key, value) in run {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    out.extend_from_slice(&(run.len() as u64).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes [`encode_run`]'s bytes, checking the magic, the CRC and every
/// length.
pub fn decode_run(bytes: &[u8]) -> Result<Run, &'static str> {
    let body_len = bytes
        .len()
        .checked_sub(RUN_MAGIC.len() + 12)
        .ok_or("shorter than its header and trailer")?;
    let (payload, crc) = bytes.split_at(bytes.len() - 4);
    if !payload.starts_with(RUN_MAGIC) {
        return Err("bad magic");
    }
    if crc32fast::hash(payload) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch");
    }
    let (mut body, count) = payload[RUN_MAGIC.len()..].split_at(body_len);
    let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
    let take = |body: &mut &[u8]| -> Result<Vec<u8>, &'static str> {
        if body.len() < 4 {
            return Err("truncated length");
        }
        let (len, rest) = body.split_at(4);
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if rest.len() < len {
            return Err("truncated record");
        }
        let (item, rest) = rest.split_at(len);
        *body = rest;
        Ok(item.to_vec())
    };
    let mut run = Vec::new();
    while !body.is_empty() {
        let key = take(&mut body)?;
        let value = take(&mut body)?;
        run.push((key, value));
    }
    if run.len() as u64 != count {
        return Err("pair count mismatch");
    }
    Ok(run)
}

/// Writes `bytes` to `path` through a temporary name and a rename, so a
/// reader sees the whole file or none.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Reads and checks the run file at `path`.
pub fn read_run(path: &Path) -> Result<Run, RunFileError> {
    let bytes = std::fs::read(path).map_err(|source| RunFileError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_run(&bytes).map_err(|reason| RunFileError::Corrupt {
        path: path.display().to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a run survives encoding, and any truncation or flipped byte is
    /// caught.
    #[test]
    fn run_roundtrip_and_corruption() {
        let run: Run = vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), Vec::new()),
            (Vec::new(), b"x".to_vec()),
        ];
        let bytes = encode_run(&run);
        assert_eq!(decode_run(&bytes).unwrap(), run);
        assert_eq!(decode_run(&encode_run(&Vec::new())).unwrap(), Run::new());
        for cut in 0..bytes.len() {
            assert!(decode_run(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode_run(&bad).is_err(), "flipped byte {i}");
        }
    }

    /// Goal: a caller can speak only for the worker its certificate names.
    #[test]
    fn impostors_are_refused() {
        use crate::mapreduce::runtime::refuse_impostor;
        use shoal_net::Peer;
        let hello = WorkerHello {
            node: NodeId(7),
            incarnation: 1,
            addr: None,
        };
        let task = MrRequest::Task { hello };
        assert!(refuse_impostor(&Peer::Node(NodeId(7)), &task).is_none());
        assert!(refuse_impostor(&Peer::Node(NodeId(8)), &task).is_some());
        assert!(refuse_impostor(&Peer::Client("client".into()), &task).is_some());
        assert!(refuse_impostor(&Peer::Client("client".into()), &MrRequest::Status).is_none());
    }

    /// Goal: worker ids carry the node id and the incarnation apart.
    #[test]
    fn worker_ids_split() {
        let hello = WorkerHello {
            node: NodeId(7),
            incarnation: 0xdead_beef,
            addr: None,
        };
        assert_eq!(worker_node(hello.worker()), NodeId(7));
        assert_ne!(
            hello.worker(),
            WorkerHello {
                incarnation: 1,
                ..hello
            }
            .worker()
        );
    }
}
