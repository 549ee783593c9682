//! Input pins: a key range of some shards of ONE group read at ONE point
//! in time, page by page, while clients keep writing (the input of a
//! MapReduce job).
//!
//! # Protocol
//! - `Pin { start, end, split_bytes, shards }` is a read: it goes through
//!   ReadIndex at the group's leader like `Scan`, and once the applied
//!   index reaches the read index and the group still serves every shard
//!   listed, the node starts one *holder* for the whole pin (the loop's
//!   `serve_reads`, then [`Pins::admit`]). One pin per group, not per
//!   shard: a sharded cluster has hundreds of shards (256 by default) and
//!   a handful of groups, and every holder is a long-lived task.
//! - The holder, off the loop, takes the engine's point-in-time view
//!   ([`Engine::with_view`]) and keeps it for its whole life. Inside it, it
//!   first scans the pinned range of each shard once for its size
//!   ([`PinnedShardInfo::bytes`], [`PinnedShardInfo::keys`]) and split
//!   keys ([`SplitKeys`], at most [`pin_split_keys_max`] per shard),
//!   answers the `Pin` with [`KvResponse::Pinned`], then serves pages
//!   ([`PinPage`], each of one shard) from a bounded channel until
//!   released.
//! - `ScanPin` and `Unpin` go to the node named in [`PinInfo::node`] and are
//!   served at once, whatever its Raft role: the loop checks the request
//!   against the pin (its group, that the pin covers the request's shard,
//!   [`pin_scan_bounds`]) and forwards it to the holder's channel with its
//!   responder (a full channel answers `Busy`); the loop itself never scans
//!   and never waits for a holder. `Unpin` releases the whole pin.
//!
//! # Why a pin is linearizable
//! The view is taken when the holder starts, which may be slightly after
//! the applied index reached the pin's read index: entries applied in
//! between are committed writes, so the view is the state at some applied
//! index `i` with read index <= `i` <= the index applied when the reply is
//! sent. The read index was taken after the request arrived, and the view
//! before the reply left: the pin's point lies inside the request's
//! interval, as a linearizable read's must. The holder also checks, in the
//! view, that the group still serves every shard of the pin (a move
//! applied in between would make the view miss writes the shard's new
//! group took); if one is not, it answers `WrongGroup` for the whole pin,
//! ends (the loop sweeps the pin at its next admission or tick), and the
//! client asks the controller again.
//!
//! # Lifetime and limits
//! A pin lives on the node that served it (the group's leader then) and
//! survives a change of leadership: that node still answers `ScanPin` as a
//! follower. It ends on `Unpin`, after [`NodeConfig::pin_idle_ms`] without a
//! `ScanPin` (judged by the loop's tick on tokio's clock), when its group is
//! dropped or stops here, and at shutdown; a restart loses every pin
//! (`PinGone`: pin ids are drawn afresh at every start, so an old id never
//! names a new pin). At most [`super::NodeConfig::pins_max`] pins per node
//! (default [`PINS_MAX`]; beyond: `Refused`), each of at most
//! [`PIN_SHARDS_MAX`] shards and with at most [`PIN_QUEUE_MAX`] queued
//! pages.
//!
//! A held view keeps every version it sees: RocksDB's compaction keeps the
//! overwritten and deleted pairs of a snapshot, the in-memory backend
//! copies a map on the first write after the view. Hence the idle expiry.
//!
//! [`NodeConfig::pin_idle_ms`]: super::NodeConfig::pin_idle_ms
//! [`KvResponse::Pinned`]: crate::protocol::KvResponse::Pinned
//! [`PinInfo::node`]: crate::protocol::PinInfo::node

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
use crate::protocol::{pin_split_keys_max, KvResponse, PinInfo, PinnedShardInfo, PIN_SHARDS_MAX};

/// Default [`super::NodeConfig::pins_max`]: most pins one node holds at
/// once; a `Pin` beyond it is `Refused`. Each holds an engine view (old
/// versions kept) and a thread of the blocking pool, so the bound is
/// small: a job pins each group once, whatever its number of shards, so
/// 64 is a few concurrent jobs on a node that leads a dozen groups.
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

/// Whether a `Pin`'s `shards` are well formed: at least one, at most
/// [`PIN_SHARDS_MAX`], strictly increasing; if not, why.
pub fn pin_shards_check(shards: &[ShardId]) -> Result<(), String> {
    if shards.is_empty() {
        return Err("a pin names no shard".into());
    }
    if shards.len() > PIN_SHARDS_MAX {
        return Err(format!(
            "a pin of {} shards; at most {PIN_SHARDS_MAX} (PIN_SHARDS_MAX)",
            shards.len()
        ));
    }
    if let Some(w) = shards.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!(
            "a pin's shards must be strictly increasing: {} then {}",
            w[0], w[1]
        ));
    }
    Ok(())
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
    /// One of the pin's shards.
    pub(super) shard: ShardId,
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
    /// The shards pinned, strictly increasing.
    pub(super) shards: Vec<ShardId>,
    /// Those of `shards` the group serves statically (no shard record).
    pub(super) static_shards: Vec<ShardId>,
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
    /// Strictly increasing.
    shards: Vec<ShardId>,
    start: Bytes,
    end: Bytes,
    pages: SyncSender<PinPage>,
    /// Set when the pin is released: the holder stops its first scan early
    /// and answers queued pages `PinGone`.
    released: Arc<AtomicBool>,
    /// Set by the holder when it ends on its own (`WrongGroup`, an engine
    /// error, a panic): the pin is swept without waiting for its expiry.
    ended: Arc<AtomicBool>,
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
/// its end flag, and (without `blocking_io`) the sender to drop once the
/// `Pin` is answered.
pub(super) struct Admitted {
    pub(super) pin: u64,
    pub(super) pages: Receiver<PinPage>,
    pub(super) released: Arc<AtomicBool>,
    pub(super) ended: Arc<AtomicBool>,
    pub(super) done: Option<oneshot::Sender<()>>,
}

/// Sets a holder's end flag when the holder returns or unwinds.
struct EndGuard(Arc<AtomicBool>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The pins a node holds, by id.
pub(super) struct Pins {
    pins: BTreeMap<u64, PinEntry>,
    /// Most pins held at once ([`super::NodeConfig::pins_max`]).
    pins_max: usize,
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
    /// The node holds [`super::NodeConfig::pins_max`] pins.
    Full,
}

impl Pins {
    pub(super) fn new(node: NodeId, seed: u64, pins_max: usize, own_threads: bool) -> Pins {
        // Random per start (std's hasher keys are), mixed with the node.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(node);
        h.write_u64(seed);
        Pins {
            pins: BTreeMap::new(),
            pins_max,
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

    /// Most pins held at once.
    pub(super) fn max(&self) -> usize {
        self.pins_max
    }

    /// Registers a new pin of `[start, end)` of `group`'s `shards`
    /// (checked by [`pin_shards_check`]), or says why not.
    pub(super) fn admit(
        &mut self,
        group: GroupId,
        shards: Vec<ShardId>,
        start: Bytes,
        end: Bytes,
        now: Instant,
    ) -> Result<Admitted, Refusal> {
        debug_assert!(pin_shards_check(&shards).is_ok(), "{shards:?}");
        if self.pins.len() >= self.pins_max {
            // Holders that ended on their own make room at once.
            self.release_where(|e| e.ended.load(Ordering::Relaxed));
        }
        if self.pins.len() >= self.pins_max {
            return Err(Refusal::Full);
        }
        let pin = self.base | (self.next & 0xFFFF_FFFF);
        self.next += 1;
        let (tx, pages) = std::sync::mpsc::sync_channel(PIN_QUEUE_MAX);
        let released = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        self.pins.insert(
            pin,
            PinEntry {
                group,
                shards,
                start,
                end,
                pages: tx,
                released: released.clone(),
                ended: ended.clone(),
                last_used: now,
                thread: None,
            },
        );
        Ok(Admitted {
            pin,
            pages,
            released,
            ended,
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

    /// Forwards a `ScanPin` of `shard` to its holder, or answers it.
    pub(super) fn scan(
        &mut self,
        pin: u64,
        group: GroupId,
        shard: ShardId,
        (start, end, limit): (Bytes, Bytes, u64),
        waiter: Waiter,
        now: Instant,
    ) {
        let Some(entry) = self.pins.get_mut(&pin).filter(|e| e.group == group) else {
            waiter.send(KvResponse::PinGone);
            return;
        };
        if entry.shards.binary_search(&shard).is_err() {
            waiter.send(KvResponse::Refused {
                reason: format!("pin {pin} of group {group} does not cover shard {shard}"),
            });
            return;
        }
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
            shard,
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

    /// Releases `pin` (all its shards), named by one of its shards;
    /// whether it was held.
    pub(super) fn release(&mut self, pin: u64, group: GroupId, shard: ShardId) -> bool {
        let held = self
            .pins
            .get(&pin)
            .is_some_and(|e| e.group == group && e.shards.binary_search(&shard).is_ok());
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

    /// Releases every pin unused for `idle`, and every pin whose holder
    /// ended on its own; returns how many.
    pub(super) fn expire(&mut self, idle: Duration, now: Instant) -> usize {
        self.release_where(|e| {
            e.ended.load(Ordering::Relaxed) || now.saturating_duration_since(e.last_used) >= idle
        })
    }

    /// Releases every pin (shutdown).
    pub(super) fn clear(&mut self) {
        self.release_where(|_| true);
    }
}

/// A holder's whole life, on its own thread: takes the view, checks that
/// the group serves every shard and measures the range in each, answers
/// the `Pin` (`answer`), then serves pages until released (its channel
/// closes). See the module docs.
pub(super) fn hold<B: Backend>(engine: Engine<B>, spec: PinSpec, answer: Waiter, holder: Admitted) {
    let Admitted {
        pages,
        released,
        ended,
        done,
        ..
    } = holder;
    let _ended = EndGuard(ended);
    let group = spec.group;
    let mut answer = Some(answer);
    let mut done = done;
    let result = engine.with_view(&mut |view| {
        for &shard in &spec.shards {
            if spec.static_shards.contains(&shard) {
                continue;
            }
            let serving = view
                .shard_record(group, shard)?
                .is_some_and(|r| r.status == ShardStatus::Serving);
            if !serving {
                // A move applied since the read index: nothing is pinned.
                if let Some(a) = answer.take() {
                    a.send(KvResponse::WrongGroup);
                }
                return Ok(());
            }
        }
        let split_keys_max = pin_split_keys_max(spec.shards.len());
        let mut measured = Vec::with_capacity(spec.shards.len());
        for &shard in &spec.shards {
            let mut split = SplitKeys::new(spec.split_bytes, split_keys_max);
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
            measured.push(PinnedShardInfo {
                shard,
                bytes,
                keys,
                split_keys: split.finish(),
            });
        }
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
            shards: measured,
        }));
        drop(done.take());
        // Pages queued before a release are answered `PinGone`; the loop
        // dropping the sender ends the wait. The loop checked each page's
        // shard against the pin's.
        while let Ok(page) = pages.recv() {
            let PinPage {
                shard,
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
        tracing::warn!(node = spec.node, group, shards = spec.shards.len(), pin = spec.pin, error = %e, "pin holder failed");
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
    use crate::protocol::PIN_SPLIT_KEYS_MAX;

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

    // Goal: a pin's shards are checked before anything is pinned.
    #[test]
    fn pin_shards_are_checked() {
        assert!(pin_shards_check(&[0]).is_ok());
        assert!(pin_shards_check(&[0, 3, 7]).is_ok());
        let all: Vec<ShardId> = (0..PIN_SHARDS_MAX as ShardId).collect();
        assert!(pin_shards_check(&all).is_ok());
        let too_many: Vec<ShardId> = (0..=PIN_SHARDS_MAX as ShardId).collect();
        assert!(pin_shards_check(&too_many)
            .unwrap_err()
            .contains("PIN_SHARDS_MAX"));
        assert!(pin_shards_check(&[]).is_err());
        assert!(pin_shards_check(&[1, 1]).is_err());
        assert!(pin_shards_check(&[2, 1]).is_err());
    }

    // Goal: ids of one run never collide and are never 0; the limit is
    // the configured one; a pin of several shards is released (once) by
    // any of them, and only by its group.
    #[test]
    fn pin_ids_are_unique_and_released_pins_are_gone() {
        let max = 5;
        let mut pins = Pins::new(1, 1, max, false);
        let now = Instant::now();
        let (mut ids, mut holders) = (Vec::new(), Vec::new());
        for _ in 0..max {
            let Ok(admitted) = pins.admit(1, vec![0, 4, 9], Bytes::new(), Bytes::new(), now) else {
                panic!("below the limit");
            };
            ids.push(admitted.pin);
            holders.push(admitted);
        }
        assert!(matches!(
            pins.admit(1, vec![0], Bytes::new(), Bytes::new(), now),
            Err(Refusal::Full)
        ));
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), max);
        assert!(ids.iter().all(|&i| i != 0));
        // A holder that ended on its own makes room at once.
        holders[1].ended.store(true, Ordering::Relaxed);
        let Ok(replacement) = pins.admit(1, vec![3], Bytes::new(), Bytes::new(), now) else {
            panic!("an ended holder's pin is swept");
        };
        assert!(!pins.release(ids[1], 1, 0), "swept");
        assert!(!pins.release(ids[0], 2, 0), "another group's pin");
        assert!(
            !pins.release(ids[0], 1, 5),
            "a shard the pin does not cover"
        );
        assert!(pins.release(ids[0], 1, 9));
        assert!(
            !pins.release(ids[0], 1, 0),
            "released already, by another of its shards"
        );
        assert!(pins.release(replacement.pin, 1, 3));
        assert_eq!(pins.expire(Duration::from_secs(1), now), 0);
        assert_eq!(
            pins.expire(Duration::from_secs(1), now + Duration::from_secs(1)),
            max - 2
        );
        assert_eq!(pins.len(), 0);
    }
}
