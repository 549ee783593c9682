//! Input pins: a key range of one (group, shard) read at ONE point in time,
//! page by page, while clients keep writing (the input of a MapReduce job).
//!
//! # Protocol
//! - `Pin { start, end, split_bytes }` is a read: it goes through ReadIndex
//!   at the group's leader like `Scan`, and once the applied index reaches
//!   the read index and the group still serves the shard, the node starts a
//!   *holder* for it (the loop's `serve_reads`, then [`Pins::admit`]).
//! - The holder, off the loop, takes the engine's point-in-time view
//!   ([`Engine::with_view`]) and keeps it for its whole life. Inside it, it
//!   first scans the pinned range once for its size ([`PinInfo::bytes`],
//!   [`PinInfo::keys`]) and split keys ([`SplitKeys`]), answers the `Pin`
//!   with [`KvResponse::Pinned`], then serves pages ([`PinPage`]) from a
//!   bounded channel until released.
//! - `ScanPin` and `Unpin` go to the node named in [`PinInfo::node`] and are
//!   served at once, whatever its Raft role: the loop checks the request
//!   against the pin ([`pin_scan_bounds`]) and forwards it to the holder's
//!   channel with its responder (a full channel answers `Busy`); the loop
//!   itself never scans and never waits for a holder.
//!
//! # Why a pin is linearizable
//! The view is taken when the holder starts, which may be slightly after
//! the applied index reached the pin's read index: entries applied in
//! between are committed writes, so the view is the state at some applied
//! index `i` with read index <= `i` <= the index applied when the reply is
//! sent. The read index was taken after the request arrived, and the view
//! before the reply left: the pin's point lies inside the request's
//! interval, as a linearizable read's must. The holder also checks, in the
//! view, that the group still serves the shard (a move applied in between
//! would make the view miss writes the shard's new group took); if not it
//! answers `WrongGroup` and the client asks the controller again.
//!
//! # Lifetime and limits
//! A pin lives on the node that served it (the group's leader then) and
//! survives a change of leadership: that node still answers `ScanPin` as a
//! follower. It ends on `Unpin`, after [`NodeConfig::pin_idle_ms`] without a
//! `ScanPin` (judged by the loop's tick on tokio's clock), when its group is
//! dropped or stops here, and at shutdown; a restart loses every pin
//! (`PinGone`: pin ids are drawn afresh at every start, so an old id never
//! names a new pin). At most [`PINS_MAX`] pins per node (beyond: `Refused`),
//! each with at most [`PIN_QUEUE_MAX`] queued pages.
//!
//! A held view keeps every version it sees: RocksDB's compaction keeps the
//! overwritten and deleted pairs of a snapshot, the in-memory backend
//! copies a map on the first write after the view. Hence the idle expiry.
//!
//! [`NodeConfig::pin_idle_ms`]: super::NodeConfig::pin_idle_ms
//! [`KvResponse::Pinned`]: crate::protocol::KvResponse::Pinned

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_consensus::NodeId;
use shoal_engine::{Backend, Engine, GroupId, Reply, ShardId, ShardStatus};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::group::Waiter;
use crate::protocol::{KvResponse, PinInfo, PIN_SPLIT_KEYS_MAX};

/// Most pins one node holds at once; a `Pin` beyond it is `Refused`. Each
/// holds an engine view (old versions kept) and a thread of the blocking
/// pool, so the bound is small: a job pins each shard once.
pub const PINS_MAX: usize = 64;
/// Default [`super::NodeConfig::pin_idle_ms`]: five minutes, well above the
/// pause between two pages of a job's map task.
pub const PIN_IDLE_MS_DEFAULT: u64 = 300_000;
/// Most `ScanPin` requests queued at one holder; beyond, `Busy`.
pub const PIN_QUEUE_MAX: usize = 16;

/// Where split keys go: one every `every_bytes` of pairs, at most
/// `keys_max` of them. Offered the pairs of a range in key order, it
/// records the key that starts each new piece; when a key more than
/// `keys_max` would be kept, it keeps every second one and doubles the
/// spacing, so the keys stay about evenly spaced, just further apart.
#[derive(Debug, Clone)]
pub struct SplitKeys {
    every_bytes: u64,
    keys_max: usize,
    /// Kept keys with the bytes of the range before each.
    keys: Vec<(Bytes, u64)>,
    /// Bytes offered so far.
    total_bytes: u64,
}

impl SplitKeys {
    /// Split keys about `every_bytes` apart (0: none at all), at most
    /// `keys_max` of them.
    pub fn new(every_bytes: u64, keys_max: usize) -> SplitKeys {
        SplitKeys {
            every_bytes,
            keys_max,
            keys: Vec::new(),
            total_bytes: 0,
        }
    }

    /// Offers the next pair of the range: its key and its key + value bytes.
    pub fn offer(&mut self, key: &[u8], size_bytes: u64) {
        if self.every_bytes > 0 && self.keys_max > 0 {
            let since = self.total_bytes - self.keys.last().map_or(0, |(_, at)| *at);
            if self.total_bytes > 0 && since >= self.every_bytes {
                self.keys
                    .push((Bytes::copy_from_slice(key), self.total_bytes));
                if self.keys.len() > self.keys_max {
                    // Keep the 2nd, 4th, ...: pieces merge pairwise.
                    self.keys = std::mem::take(&mut self.keys)
                        .into_iter()
                        .skip(1)
                        .step_by(2)
                        .collect();
                    self.every_bytes = self.every_bytes.saturating_mul(2);
                }
            }
        }
        self.total_bytes += size_bytes;
    }

    /// The split keys, in order.
    pub fn finish(self) -> Vec<Bytes> {
        self.keys.into_iter().map(|(k, _)| k).collect()
    }
}

/// The keys a `ScanPin` of `[start, end)` reads from a pin of
/// `[pin_start, pin_end)` (an empty end: no bound; an empty `end` means
/// the pin's end): the request's range, or why it leaves the pin's.
pub fn pin_scan_bounds(
    (pin_start, pin_end): (&[u8], &[u8]),
    start: &Bytes,
    end: &Bytes,
) -> Result<(Bytes, Bytes), String> {
    if start.as_ref() < pin_start {
        return Err(format!(
            "scan start {start:?} is below the pinned range's start {:?}",
            Bytes::copy_from_slice(pin_start)
        ));
    }
    let end = if end.is_empty() {
        Bytes::copy_from_slice(pin_end)
    } else {
        end.clone()
    };
    if !pin_end.is_empty() && (end.is_empty() || end.as_ref() > pin_end) {
        return Err(format!(
            "scan end {end:?} is past the pinned range's end {:?}",
            Bytes::copy_from_slice(pin_end)
        ));
    }
    Ok((start.clone(), end))
}

/// A page request forwarded to a holder.
pub(super) struct PinPage {
    pub(super) start: Bytes,
    pub(super) end: Bytes,
    pub(super) limit: u64,
    pub(super) waiter: Waiter,
    /// Dropped once the page is answered (see [`PinWork::Wait`]).
    pub(super) done: Option<oneshot::Sender<()>>,
}

/// What a holder pins.
#[derive(Debug, Clone)]
pub(super) struct PinSpec {
    pub(super) pin: u64,
    pub(super) node: NodeId,
    pub(super) group: GroupId,
    pub(super) shard: ShardId,
    /// The group serves the shard statically (it has no shard record).
    pub(super) static_shard: bool,
    pub(super) start: Bytes,
    pub(super) end: Bytes,
    pub(super) split_bytes: u64,
}

/// Blocking work the node runs for its pins, as tasks of its pin task set.
pub(super) enum PinWork {
    /// Join the thread of a released holder (it ends at once).
    Join(std::thread::JoinHandle<()>),
    /// Wait until a holder has answered one request. Only without
    /// `blocking_io`, where holders run on threads of their own: tokio's
    /// paused clock does not auto-advance while a `spawn_blocking` task
    /// runs, so virtual time stands still while a holder works for a
    /// caller, as it does for any other blocking work of the node, and a
    /// seed's timing does not depend on the host's thread scheduling.
    Wait(oneshot::Receiver<()>),
}

impl PinWork {
    /// Blocks until the work is done.
    pub(super) fn run(self) {
        match self {
            PinWork::Join(thread) => {
                // A holder that panicked has answered what it could.
                let _ = thread.join();
            }
            PinWork::Wait(done) => {
                // Ends when the holder drops the sender.
                let _ = done.blocking_recv();
            }
        }
    }
}

/// One live pin, as the loop sees it.
struct PinEntry {
    group: GroupId,
    shard: ShardId,
    start: Bytes,
    end: Bytes,
    pages: SyncSender<PinPage>,
    /// Set when the pin is released: the holder stops its first scan early
    /// and answers queued pages `PinGone`.
    released: Arc<AtomicBool>,
    last_used: Instant,
    /// The holder's own thread (without `blocking_io`), joined once the
    /// pin is released.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PinEntry {
    fn drop(&mut self) {
        // Dropping the sender ends the holder's wait; the flag ends its
        // first scan too.
        self.released.store(true, Ordering::Relaxed);
    }
}

/// A new pin's holder side: its id, its page channel, its release flag,
/// and (without `blocking_io`) the sender to drop once the `Pin` is
/// answered.
pub(super) struct Admitted {
    pub(super) pin: u64,
    pub(super) pages: Receiver<PinPage>,
    pub(super) released: Arc<AtomicBool>,
    pub(super) done: Option<oneshot::Sender<()>>,
}

/// The pins a node holds, by id.
pub(super) struct Pins {
    pins: BTreeMap<u64, PinEntry>,
    /// Ids are `base` + a counter: `base` is drawn at every start, so an id
    /// from before a restart names no pin of this run.
    base: u64,
    next: u64,
    /// Holders run on threads of their own, each request awaited
    /// ([`PinWork::Wait`]): the node runs without `blocking_io`.
    own_threads: bool,
    /// Work for the node to run off the loop ([`Pins::take_work`]).
    work: Vec<PinWork>,
}

/// Why a pin could not be admitted.
pub(super) enum Refusal {
    /// The node holds [`PINS_MAX`] pins.
    Full,
}

impl Pins {
    pub(super) fn new(node: NodeId, seed: u64, own_threads: bool) -> Pins {
        // Random per start (std's hasher keys are), mixed with the node.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(node);
        h.write_u64(seed);
        Pins {
            pins: BTreeMap::new(),
            base: h.finish() & !0xFFFF_FFFF,
            next: 1,
            own_threads,
            work: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.pins.len()
    }

    /// The blocking work queued since the last call, for the node to run
    /// in its pin task set.
    pub(super) fn take_work(&mut self) -> Vec<PinWork> {
        std::mem::take(&mut self.work)
    }

    /// A `done` sender whose drop ends a [`PinWork::Wait`] (own threads
    /// only).
    fn await_done(&mut self) -> Option<oneshot::Sender<()>> {
        self.own_threads.then(|| {
            let (tx, rx) = oneshot::channel();
            self.work.push(PinWork::Wait(rx));
            tx
        })
    }

    /// Registers a new pin of `[start, end)` of (`group`, `shard`), or
    /// says why not.
    pub(super) fn admit(
        &mut self,
        group: GroupId,
        shard: ShardId,
        start: Bytes,
        end: Bytes,
        now: Instant,
    ) -> Result<Admitted, Refusal> {
        if self.pins.len() >= PINS_MAX {
            return Err(Refusal::Full);
        }
        let pin = self.base | (self.next & 0xFFFF_FFFF);
        self.next += 1;
        let (tx, pages) = std::sync::mpsc::sync_channel(PIN_QUEUE_MAX);
        let released = Arc::new(AtomicBool::new(false));
        self.pins.insert(
            pin,
            PinEntry {
                group,
                shard,
                start,
                end,
                pages: tx,
                released: released.clone(),
                last_used: now,
                thread: None,
            },
        );
        Ok(Admitted {
            pin,
            pages,
            released,
            done: self.await_done(),
        })
    }

    /// Records the thread of `pin`'s holder, to join once released.
    pub(super) fn set_thread(&mut self, pin: u64, thread: std::thread::JoinHandle<()>) {
        match self.pins.get_mut(&pin) {
            Some(entry) => entry.thread = Some(thread),
            None => self.work.push(PinWork::Join(thread)),
        }
    }

    /// Forwards a `ScanPin` to its holder, or answers it.
    pub(super) fn scan(
        &mut self,
        pin: u64,
        group: GroupId,
        shard: ShardId,
        (start, end, limit): (Bytes, Bytes, u64),
        waiter: Waiter,
        now: Instant,
    ) {
        let Some(entry) = self
            .pins
            .get_mut(&pin)
            .filter(|e| e.group == group && e.shard == shard)
        else {
            waiter.send(KvResponse::PinGone);
            return;
        };
        let (start, end) = match pin_scan_bounds((&entry.start, &entry.end), &start, &end) {
            Ok(bounds) => bounds,
            Err(reason) => {
                waiter.send(KvResponse::Refused { reason });
                return;
            }
        };
        entry.last_used = now;
        // A page not forwarded drops `done` at once, ending its wait.
        let done = self.await_done();
        let entry = self.pins.get_mut(&pin).expect("found above");
        let page = PinPage {
            start,
            end,
            limit,
            waiter,
            done,
        };
        match entry.pages.try_send(page) {
            Ok(()) => {}
            Err(TrySendError::Full(page)) => page.waiter.send(KvResponse::Busy),
            Err(TrySendError::Disconnected(page)) => {
                // The holder ended (an engine error, or it panicked).
                self.remove(pin);
                page.waiter.send(KvResponse::PinGone);
            }
        }
    }

    /// Removes `pin`, its holder released.
    fn remove(&mut self, pin: u64) {
        if let Some(mut entry) = self.pins.remove(&pin) {
            if let Some(thread) = entry.thread.take() {
                self.work.push(PinWork::Join(thread));
            }
        }
    }

    /// Releases `pin`; whether it was held.
    pub(super) fn release(&mut self, pin: u64, group: GroupId, shard: ShardId) -> bool {
        let held = self
            .pins
            .get(&pin)
            .is_some_and(|e| e.group == group && e.shard == shard);
        if held {
            self.remove(pin);
        }
        held
    }

    /// Releases every pin for which `release` holds; returns how many.
    fn release_where(&mut self, release: impl Fn(&PinEntry) -> bool) -> usize {
        let pins: Vec<u64> = self
            .pins
            .iter()
            .filter(|(_, e)| release(e))
            .map(|(p, _)| *p)
            .collect();
        for &pin in &pins {
            self.remove(pin);
        }
        pins.len()
    }

    /// Releases every pin of `group`.
    pub(super) fn release_group(&mut self, group: GroupId) {
        self.release_where(|e| e.group == group);
    }

    /// Releases every pin unused for `idle`; returns how many.
    pub(super) fn expire(&mut self, idle: Duration, now: Instant) -> usize {
        self.release_where(|e| now.saturating_duration_since(e.last_used) >= idle)
    }

    /// Releases every pin (shutdown).
    pub(super) fn clear(&mut self) {
        self.release_where(|_| true);
    }
}

/// A holder's whole life, on its own thread: takes the view, measures the
/// range, answers the `Pin` (`answer`), then serves pages until released
/// (its channel closes). See the module docs.
pub(super) fn hold<B: Backend>(engine: Engine<B>, spec: PinSpec, answer: Waiter, holder: Admitted) {
    let Admitted {
        pages,
        released,
        done,
        ..
    } = holder;
    let (group, shard) = (spec.group, spec.shard);
    let mut answer = Some(answer);
    let mut done = done;
    let result = engine.with_view(&mut |view| {
        if !spec.static_shard {
            let serving = view
                .shard_record(group, shard)?
                .is_some_and(|r| r.status == ShardStatus::Serving);
            if !serving {
                // A move applied since the read index.
                if let Some(a) = answer.take() {
                    a.send(KvResponse::WrongGroup);
                }
                return Ok(());
            }
        }
        let mut split = SplitKeys::new(spec.split_bytes, PIN_SPLIT_KEYS_MAX);
        let (mut bytes, mut keys) = (0u64, 0u64);
        view.visit_sizes(group, shard, &spec.start, &spec.end, &mut |key, size| {
            if released.load(Ordering::Relaxed) {
                return Ok(false);
            }
            split.offer(key, size);
            bytes += size;
            keys += 1;
            Ok(true)
        })?;
        let Some(a) = answer.take() else {
            return Ok(());
        };
        if released.load(Ordering::Relaxed) {
            a.send(KvResponse::PinGone);
            return Ok(());
        }
        a.send(KvResponse::Pinned(PinInfo {
            pin: spec.pin,
            node: spec.node,
            bytes,
            keys,
            split_keys: split.finish(),
        }));
        drop(done.take());
        // Pages queued before a release are answered `PinGone`; the loop
        // dropping the sender ends the wait.
        while let Ok(page) = pages.recv() {
            let PinPage {
                start,
                end,
                limit,
                waiter,
                done,
            } = page;
            let response = if released.load(Ordering::Relaxed) {
                KvResponse::PinGone
            } else {
                match view.scan(group, shard, &start, &end, limit) {
                    Ok(p) => KvResponse::Done(Reply::Pairs(p)),
                    Err(e) => KvResponse::Refused {
                        reason: e.to_string(),
                    },
                }
            };
            waiter.send(response);
            // Only after the answer: it ends the node's wait for it.
            drop(done);
        }
        Ok(())
    });
    if let Err(e) = result {
        tracing::warn!(node = spec.node, group, shard, pin = spec.pin, error = %e, "pin holder failed");
        if let Some(a) = answer.take() {
            a.send(KvResponse::Refused {
                reason: format!("pinning failed: {e}"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(every: u64, max: usize, sizes: &[(u32, u64)]) -> Vec<u32> {
        let mut s = SplitKeys::new(every, max);
        for (k, size) in sizes {
            s.offer(&k.to_be_bytes(), *size);
        }
        s.finish()
            .iter()
            .map(|k| u32::from_be_bytes(k.as_ref().try_into().unwrap()))
            .collect()
    }

    // Goal: a split key starts each piece of at least `every` bytes.
    #[test]
    fn split_keys_every_so_many_bytes() {
        let pairs: Vec<(u32, u64)> = (0..10).map(|k| (k, 10)).collect();
        assert_eq!(split(30, 100, &pairs), vec![3, 6, 9]);
        assert_eq!(split(10, 100, &pairs), (1..10).collect::<Vec<_>>());
        // 0: no split keys; one piece larger than the range: none either.
        assert!(split(0, 100, &pairs).is_empty());
        assert!(split(1000, 100, &pairs).is_empty());
        // A large pair makes a piece of its own.
        assert_eq!(split(30, 100, &[(0, 5), (1, 100), (2, 5), (3, 5)]), vec![2]);
    }

    // Goal: never more than the cap; beyond it the keys are spaced
    // further apart, still about evenly.
    #[test]
    fn split_keys_are_capped_and_thinned_evenly() {
        let pairs: Vec<(u32, u64)> = (0..1000).map(|k| (k, 1)).collect();
        for max in [1, 2, 3, 7, 64] {
            let keys = split(1, max, &pairs);
            assert!(!keys.is_empty() && keys.len() <= max, "{max}: {keys:?}");
            let gaps: Vec<u32> = keys.windows(2).map(|w| w[1] - w[0]).collect();
            if let (Some(lo), Some(hi)) = (gaps.iter().min(), gaps.iter().max()) {
                assert!(hi - lo <= *lo, "{max}: uneven {gaps:?}");
            }
            assert!(keys.windows(2).all(|w| w[0] < w[1]));
        }
        // Without the cap every key but the first is one.
        assert_eq!(split(1, 4096, &pairs).len(), 999);
        // The cap the protocol uses.
        let many: Vec<(u32, u64)> = (0..100_000).map(|k| (k, 1)).collect();
        let keys = split(1, PIN_SPLIT_KEYS_MAX, &many);
        assert!(keys.len() <= PIN_SPLIT_KEYS_MAX && keys.len() > PIN_SPLIT_KEYS_MAX / 4);
    }

    // Goal: a ScanPin reads only inside its pin.
    #[test]
    fn pin_scan_bounds_stay_inside_the_pin() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let pin = (b"b".as_slice(), b"m".as_slice());
        assert_eq!(pin_scan_bounds(pin, &b("b"), &b("")), Ok((b("b"), b("m"))));
        assert_eq!(pin_scan_bounds(pin, &b("c"), &b("d")), Ok((b("c"), b("d"))));
        assert_eq!(pin_scan_bounds(pin, &b("c"), &b("m")), Ok((b("c"), b("m"))));
        assert!(pin_scan_bounds(pin, &b("a"), &b("")).is_err());
        assert!(pin_scan_bounds(pin, &b("c"), &b("n")).is_err());
        // A pin to the end of the shard takes any end.
        let open = (b"b".as_slice(), b"".as_slice());
        assert_eq!(pin_scan_bounds(open, &b("x"), &b("")), Ok((b("x"), b(""))));
        assert_eq!(
            pin_scan_bounds(open, &b("x"), &b("z")),
            Ok((b("x"), b("z")))
        );
        assert!(pin_scan_bounds(open, &b(""), &b("z")).is_err());
    }

    // Goal: ids of one run never collide and are never 0.
    #[test]
    fn pin_ids_are_unique_and_released_pins_are_gone() {
        let mut pins = Pins::new(1, 1, false);
        let now = Instant::now();
        let mut ids = Vec::new();
        let mut holders = Vec::new();
        for _ in 0..PINS_MAX {
            let Ok(admitted) = pins.admit(1, 0, Bytes::new(), Bytes::new(), now) else {
                panic!("below the limit");
            };
            ids.push(admitted.pin);
            holders.push(admitted.pages);
        }
        assert!(matches!(
            pins.admit(1, 0, Bytes::new(), Bytes::new(), now),
            Err(Refusal::Full)
        ));
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), PINS_MAX);
        assert!(ids.iter().all(|&i| i != 0));
        assert!(!pins.release(ids[0], 2, 0), "another group's pin");
        assert!(pins.release(ids[0], 1, 0));
        assert!(!pins.release(ids[0], 1, 0));
        assert_eq!(pins.expire(Duration::from_secs(1), now), 0);
        assert_eq!(
            pins.expire(Duration::from_secs(1), now + Duration::from_secs(1)),
            PINS_MAX - 1
        );
        assert_eq!(pins.len(), 0);
    }
}
