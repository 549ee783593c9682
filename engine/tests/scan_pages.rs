//! Goal: a scan returns one page bounded by count AND bytes, with the key
//! to continue from, so a reply stays under the node's frame limit and a
//! read never holds more than about `scan_bytes_max` in memory, however
//! large the values (issue 10, item 7: 10,000 pairs of 4 MiB were 40 GiB).
//! Following `next` from page to page yields exactly the whole range, on
//! both backends and through both paths (`Engine::scan`, and a `Scan`
//! command inside apply, which must also see the batch's earlier writes).

use bytes::Bytes;
use shoal_engine::{
    ApplyEntry, Backend, Command, Engine, EngineConfig, MemStore, Reply, Request, RocksEngine,
    ScanPage, Versioned,
};

const GROUP: u64 = 1;
const SHARD: u32 = 3;
const VALUE_BYTES_MAX: u64 = 1000;
const SCAN_BYTES_MAX: u64 = 4096;

fn config() -> EngineConfig {
    EngineConfig {
        key_bytes_max: 64,
        value_bytes_max: VALUE_BYTES_MAX,
        batch_bytes_max: 1024 * 1024,
        scan_bytes_max: SCAN_BYTES_MAX,
        ..EngineConfig::default()
    }
}

fn put(key: &str, value_bytes: usize) -> Request {
    Request {
        shard: SHARD,
        client: 0,
        seq: 0,
        command: Command::Put {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(vec![key.as_bytes()[0]; value_bytes]),
        },
    }
}

fn scan_command(start: &[u8], end: &[u8], limit: u64) -> Request {
    Request {
        shard: SHARD,
        client: 0,
        seq: 0,
        command: Command::Scan {
            start: Bytes::copy_from_slice(start),
            end: Bytes::copy_from_slice(end),
            limit,
        },
    }
}

fn page_bytes(page: &ScanPage) -> u64 {
    page.pairs
        .iter()
        .map(|(k, v)| (k.len() + v.value.len()) as u64)
        .sum()
}

/// One scan call: (start, end, limit) to a page.
type ScanFn<'a> = dyn FnMut(&[u8], &[u8], u64) -> ScanPage + 'a;

/// Follows the pages of `[start, end)` with `scan`, checking each is
/// within the bounds; returns the pages.
fn pages(limit: u64, start: &[u8], end: &[u8], scan: &mut ScanFn<'_>) -> Vec<ScanPage> {
    let mut out: Vec<ScanPage> = Vec::new();
    let mut from = Bytes::copy_from_slice(start);
    loop {
        let page = scan(&from, end, limit);
        assert!(page.pairs.len() as u64 <= limit, "over the count limit");
        assert!(
            page.pairs.len() == 1 || page_bytes(&page) <= SCAN_BYTES_MAX,
            "a page of {} pairs holds {} bytes, over {SCAN_BYTES_MAX}",
            page.pairs.len(),
            page_bytes(&page)
        );
        if page.next.is_some() {
            assert!(
                !page.pairs.is_empty(),
                "a page with a continuation is empty"
            );
        }
        if let Some((last, _)) = page.pairs.last() {
            assert!(page.next.as_ref().is_none_or(|n| n > last));
        }
        let next = page.next.clone();
        out.push(page);
        match next {
            Some(n) => from = n,
            None => return out,
        }
        assert!(out.len() < 10_000, "pages do not advance");
    }
}

fn concat(pages: &[ScanPage]) -> Vec<(Bytes, Versioned)> {
    pages.iter().flat_map(|p| p.pairs.clone()).collect()
}

/// Scans through `Engine::scan` and through an applied `Scan` command.
fn both_paths<B: Backend>(
    engine: &Engine<B>,
    index: &mut u64,
    start: &[u8],
    end: &[u8],
    limit: u64,
) -> [Vec<ScanPage>; 2] {
    let direct = pages(limit, start, end, &mut |s, e, l| {
        engine.scan(GROUP, SHARD, s, e, l).unwrap()
    });
    let applied = pages(limit, start, end, &mut |s, e, l| {
        *index += 1;
        let replies = engine
            .apply(
                GROUP,
                &[ApplyEntry {
                    index: *index,
                    term: 1,
                    requests: vec![scan_command(s, e, l)],
                }],
            )
            .unwrap();
        match &replies[0][0] {
            Reply::Pairs(page) => page.clone(),
            other => panic!("expected pairs, got {other:?}"),
        }
    });
    [direct, applied]
}

fn apply(engine: &Engine<impl Backend>, index: &mut u64, requests: Vec<Request>) {
    *index += 1;
    engine
        .apply(
            GROUP,
            &[ApplyEntry {
                index: *index,
                term: 1,
                requests,
            }],
        )
        .unwrap();
}

fn check_large_range<B: Backend>(engine: &Engine<B>) {
    let mut index = 0;
    // 300 values of 1000 bytes: 300 KB, 73 times the page budget.
    let requests = (0..300).map(|k| put(&format!("k{k:03}"), 1000)).collect();
    apply(engine, &mut index, requests);
    for [direct, applied] in [
        both_paths(engine, &mut index, b"", b"", 10_000),
        both_paths(engine, &mut index, b"k1", b"k2", 10_000),
    ] {
        assert_eq!(direct, applied);
        // 4 pairs of 1004 bytes fit in 4096; a fifth would not.
        assert!(direct[..direct.len() - 1]
            .iter()
            .all(|p| p.pairs.len() == 4));
    }
    let all = concat(&both_paths(engine, &mut index, b"", b"", 10_000)[0]);
    assert_eq!(all.len(), 300);
    assert!(all.iter().enumerate().all(|(k, (key, v))| key.as_ref()
        == format!("k{k:03}").as_bytes()
        && v.value.len() == 1000));
    let middle = concat(&both_paths(engine, &mut index, b"k1", b"k2", 10_000)[0]);
    assert_eq!(middle.len(), 100);
    assert_eq!(middle[0].0, "k100");
}

#[test]
fn pages_cover_a_range_far_larger_than_the_budget_rocksdb() {
    let tmp = tempfile::tempdir().unwrap();
    check_large_range(&RocksEngine::open(tmp.path(), config()).unwrap());
}

#[test]
fn pages_cover_a_range_far_larger_than_the_budget_memstore() {
    check_large_range(&MemStore::new_in_memory(config()).unwrap());
}

#[test]
fn count_limit_ends_a_page_and_names_the_next_key() {
    let engine = MemStore::new_in_memory(config()).unwrap();
    let mut index = 0;
    apply(
        &engine,
        &mut index,
        ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|k| put(k, 1))
            .collect(),
    );
    let page = engine.scan(GROUP, SHARD, b"", b"", 3).unwrap();
    let keys: Vec<_> = page.pairs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert_eq!(page.next.as_deref(), Some(&b"d"[..]));
    // A range holding exactly `limit` pairs is exhausted: no continuation.
    let page = engine.scan(GROUP, SHARD, b"e", b"", 3).unwrap();
    assert_eq!(page.pairs.len(), 3);
    assert_eq!(page.next, None);
    let page = engine.scan(GROUP, SHARD, b"b", b"d", 3).unwrap();
    assert_eq!(page.pairs.len(), 2);
    assert_eq!(page.next, None);
    // Limit 0 returns nothing but still says where the range goes on.
    let page = engine.scan(GROUP, SHARD, b"c", b"", 0).unwrap();
    assert!(page.pairs.is_empty());
    assert_eq!(page.next.as_deref(), Some(&b"c"[..]));
    for [direct, applied] in [
        both_paths(&engine, &mut index, b"", b"", 1),
        both_paths(&engine, &mut index, b"", b"", 2),
    ] {
        assert_eq!(direct, applied);
        assert_eq!(concat(&direct).len(), 7);
    }
}

/// Goal: a pair larger than the page budget (written under a larger value
/// limit on the leader; apply does not check this replica's limits) is
/// returned alone, and the pages around it stay within the budget.
#[test]
fn a_pair_larger_than_the_budget_is_returned_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let rocks = RocksEngine::open(tmp.path(), config()).unwrap();
    let mem = MemStore::new_in_memory(config()).unwrap();
    for engine in [&rocks as &dyn ScanAll, &mem] {
        let mut index = 0;
        let mut requests: Vec<Request> = ["a", "b", "c"].iter().map(|k| put(k, 1500)).collect();
        requests.push(put("d-big", 10_000));
        requests.extend(["e", "f"].iter().map(|k| put(k, 1500)));
        let [direct, applied] = engine.apply_and_scan(&mut index, requests);
        assert_eq!(direct, applied);
        let sizes: Vec<Vec<usize>> = direct
            .iter()
            .map(|p| p.pairs.iter().map(|(_, v)| v.value.len()).collect())
            .collect();
        assert_eq!(
            sizes,
            vec![vec![1500, 1500], vec![1500], vec![10_000], vec![1500, 1500]]
        );
    }
}

/// Goal: a `Scan` inside apply sees the writes staged earlier in the same
/// batch (puts, overwrites, deletes), merged in key order, across pages.
#[test]
fn applied_scan_sees_earlier_writes_of_its_batch() {
    let engine = MemStore::new_in_memory(config()).unwrap();
    let mut index = 0;
    apply(
        &engine,
        &mut index,
        (0..10).map(|k| put(&format!("k{k}"), 900)).collect(),
    );
    let delete = |key: &str| Request {
        shard: SHARD,
        client: 0,
        seq: 0,
        command: Command::Delete {
            key: Bytes::from(key.to_string()),
        },
    };
    let replies = engine
        .apply(
            GROUP,
            &[ApplyEntry {
                index: index + 1,
                term: 1,
                requests: vec![
                    put("k0", 10),
                    delete("k1"),
                    put("k15", 900),
                    delete("k3"),
                    put("k99", 900),
                    scan_command(b"", b"", 100),
                    scan_command(b"k4", b"", 100),
                ],
            }],
        )
        .unwrap();
    let keys = |r: &Reply| match r {
        Reply::Pairs(p) => (
            p.pairs
                .iter()
                .map(|(k, v)| (String::from_utf8(k.to_vec()).unwrap(), v.value.len()))
                .collect::<Vec<_>>(),
            p.next.clone(),
        ),
        other => panic!("expected pairs, got {other:?}"),
    };
    assert_eq!(
        keys(&replies[0][5]),
        (
            vec![
                ("k0".into(), 10),
                ("k15".into(), 900),
                ("k2".into(), 900),
                ("k4".into(), 900),
                ("k5".into(), 900)
            ],
            Some(Bytes::from_static(b"k6"))
        )
    );
    assert_eq!(
        keys(&replies[0][6]),
        (
            vec![
                ("k4".into(), 900),
                ("k5".into(), 900),
                ("k6".into(), 900),
                ("k7".into(), 900)
            ],
            Some(Bytes::from_static(b"k8"))
        )
    );
}

/// Object-safe access to both engine types for the table above.
trait ScanAll {
    fn apply_and_scan(&self, index: &mut u64, requests: Vec<Request>) -> [Vec<ScanPage>; 2];
}

impl<B: Backend> ScanAll for Engine<B> {
    fn apply_and_scan(&self, index: &mut u64, requests: Vec<Request>) -> [Vec<ScanPage>; 2] {
        apply(self, index, requests);
        both_paths(self, index, b"", b"", 100)
    }
}
