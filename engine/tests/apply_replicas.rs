//! Goal: applying the log depends only on the log and the state, never on
//! a replica's configuration or clock, so every replica ends identical.
//!
//! The bugs these guard against (issue 10, items 3 and 4): apply checked
//! requests against the local `EngineConfig`, so a replica with smaller
//! limits turned a committed `Written` into `Rejected` and diverged; and
//! sessions expired by comparing leader wall-clock stamps carried in the
//! log, so a leader whose clock ran ahead expired sessions another leader
//! had just stamped. Now limits are decided when proposing (the one that
//! depends on the state, an append's resulting size, travels in the
//! command) and expiry names (client, sequence number) pairs the leader
//! chose by its own monotonic clock.

use bytes::Bytes;
use shoal_engine::{
    ApplyEntry, Backend, Cf, ClientId, Command, Engine, EngineConfig, EngineError, LimitKind,
    MemStore, Reply, Request, RocksEngine, EXPIRE_SESSIONS_PER_ENTRY_MAX,
};

const GROUP: u64 = 1;
const SHARD: u32 = 2;

fn request(client: ClientId, seq: u64, command: Command) -> Request {
    Request {
        shard: SHARD,
        client,
        seq,
        command,
    }
}

fn put(key: &str, value_bytes: usize) -> Command {
    Command::Put {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(vec![b'v'; value_bytes]),
    }
}

fn append(key: &str, value_bytes: usize, value_bytes_max: u64) -> Command {
    Command::Append {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(vec![b'a'; value_bytes]),
        value_bytes_max,
    }
}

/// Every pair of the `kv` and `dedup` column families, raw.
fn dump<B: Backend>(engine: &Engine<B>) -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for cf in [Cf::Kv, Cf::Dedup] {
        engine
            .backend()
            .scan(cf, &[], &[0xff; 16], &mut |k, v| {
                out.push((cf, k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
    }
    out
}

/// The entries: proposed by a leader with the default (large) limits, so
/// its limits are stamped into the appends; several break the small
/// replica's limits.
fn entries(leader: &MemStore) -> Vec<ApplyEntry> {
    let mut requests = vec![
        // Key over the small replica's 16-byte limit.
        request(1, 1, put("a-key-of-twenty-bytes", 4)),
        // Value over its 64-byte limit.
        request(2, 1, put("big", 100)),
        // An append growing a value to 100 bytes: within the leader's
        // limit (stamped below), over the small replica's.
        request(3, 1, append("grown", 60, 0)),
        request(3, 2, append("grown", 40, 0)),
        // An append over the limit stamped into it: rejected everywhere.
        request(4, 1, append("capped", 30, 50)),
        request(4, 2, append("capped", 30, 50)),
        // A retry, answered from the session on every replica.
        request(2, 1, put("big", 100)),
    ];
    for r in &mut requests[2..4] {
        leader.stamp_request(r);
    }
    let scan = request(
        0,
        0,
        Command::Scan {
            start: Bytes::new(),
            end: Bytes::new(),
            limit: 100,
        },
    );
    vec![
        ApplyEntry {
            index: 1,
            term: 1,
            requests,
        },
        ApplyEntry {
            index: 2,
            term: 1,
            requests: vec![
                // Client 1 is active again after the leader decided to
                // expire it at seq 1: keeps its session. Client 2 is not.
                request(1, 2, put("k1", 1)),
                request(
                    0,
                    0,
                    Command::ExpireSessions {
                        sessions: vec![(1, 1), (2, 1), (9, 1)],
                    },
                ),
            ],
        },
        ApplyEntry {
            index: 3,
            term: 1,
            requests: vec![scan],
        },
    ]
}

#[test]
fn replicas_with_other_limits_apply_identically() {
    let small = EngineConfig {
        key_bytes_max: 16,
        value_bytes_max: 64,
        batch_bytes_max: 1024,
        scan_bytes_max: 16 + 64 + 64,
        apply_cache_bytes: 0,
        ..EngineConfig::default()
    };
    let leader = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let small_mem = MemStore::new_in_memory(small.clone()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let small_rocks = RocksEngine::open(tmp.path(), small).unwrap();
    let entries = entries(&leader);

    let want = leader.apply(GROUP, &entries).unwrap();
    let write_replies = |replies: &Vec<Vec<Reply>>| (replies[0].clone(), replies[1].clone());
    assert_eq!(
        write_replies(&want),
        (
            vec![
                Reply::Written { version: 1 },
                Reply::Written { version: 1 },
                Reply::Written { version: 1 },
                Reply::Written { version: 2 },
                Reply::Written { version: 1 },
                Reply::Rejected {
                    reason: "value size 60 exceeds the limit of 50".into()
                },
                Reply::Written { version: 1 },
            ],
            vec![
                Reply::Written { version: 1 },
                Reply::SessionsExpired { count: 1 }
            ]
        )
    );
    for (name, replies) in [
        ("small MemStore", small_mem.apply(GROUP, &entries).unwrap()),
        (
            "small RocksEngine",
            small_rocks.apply(GROUP, &entries).unwrap(),
        ),
    ] {
        // The scan in entry 3 is read-only: its page may end elsewhere on a
        // replica with a smaller page budget (its reply is never stored);
        // every write's reply must be the same.
        assert_eq!(write_replies(&replies), write_replies(&want), "{name}");
    }
    let state = dump(&leader);
    assert_eq!(dump(&small_mem), state, "small MemStore's kv/dedup differ");
    assert_eq!(
        dump(&small_rocks),
        state,
        "small RocksEngine's kv/dedup differ"
    );
    assert_eq!(
        small_rocks
            .get(GROUP, SHARD, b"grown")
            .unwrap()
            .unwrap()
            .value
            .len(),
        100
    );
}

/// Goal: `ExpireSessions` removes a named session only if its last
/// sequence number is still the one named; `sessions` lists what the
/// leader decides from.
#[test]
fn expiry_removes_only_sessions_idle_since_the_decision() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let mut index = 0;
    let mut apply = |requests: Vec<Request>| {
        index += 1;
        engine
            .apply(
                GROUP,
                &[ApplyEntry {
                    index,
                    term: 1,
                    requests,
                }],
            )
            .unwrap()
            .remove(0)
    };
    apply(vec![
        request(1, 5, put("a", 1)),
        request(2, 7, put("b", 1)),
        request(3, 1, put("c", 1)),
    ]);
    // The leader loads the sessions and decides, by its clock, that all
    // three are idle.
    let decided = engine.sessions(GROUP, SHARD).unwrap();
    assert_eq!(decided, vec![(1, 5), (2, 7), (3, 1)]);
    // Before the expiry commits, client 2 sends another request.
    apply(vec![request(2, 8, put("b", 1))]);
    let replies = apply(vec![request(
        0,
        0,
        Command::ExpireSessions {
            sessions: decided.clone(),
        },
    )]);
    assert_eq!(replies, vec![Reply::SessionsExpired { count: 2 }]);
    assert_eq!(engine.sessions(GROUP, SHARD).unwrap(), vec![(2, 8)]);
    // Expiring again (a duplicate entry, a stale decision) changes nothing.
    let replies = apply(vec![request(
        0,
        0,
        Command::ExpireSessions { sessions: decided },
    )]);
    assert_eq!(replies, vec![Reply::SessionsExpired { count: 0 }]);
    // Client 1's session is gone: its old seq is applied again as new.
    assert_eq!(
        apply(vec![request(1, 5, put("a", 1))]),
        vec![Reply::Written { version: 2 }]
    );
    assert!(engine.sessions(GROUP, SHARD + 1).unwrap().is_empty());
    // The same shard of another group is another session table.
    assert!(engine.sessions(GROUP + 1, SHARD).unwrap().is_empty());
}

#[test]
fn expiry_lists_are_bounded_when_proposed() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let expire = |n: usize| {
        request(
            0,
            0,
            Command::ExpireSessions {
                sessions: (0..n as u64).map(|c| (c, 1)).collect(),
            },
        )
    };
    engine
        .validate_request(&expire(EXPIRE_SESSIONS_PER_ENTRY_MAX))
        .unwrap();
    match engine.validate_request(&expire(EXPIRE_SESSIONS_PER_ENTRY_MAX + 1)) {
        Err(EngineError::LimitExceeded {
            kind: LimitKind::ExpireSessions,
            actual,
            limit,
        }) => {
            assert_eq!(actual, EXPIRE_SESSIONS_PER_ENTRY_MAX as u64 + 1);
            assert_eq!(limit, EXPIRE_SESSIONS_PER_ENTRY_MAX as u64);
        }
        other => panic!("expected the expiry limit, got {other:?}"),
    }
}

/// Goal: a session record holds a sequence number and a reply, nothing
/// more (the server's per-client state is bounded by it).
#[test]
fn session_records_stay_small() {
    let engine = MemStore::new_in_memory(EngineConfig::default()).unwrap();
    let requests = (1..=100)
        .map(|c| request(c, u64::from(u32::MAX), put("k", 1)))
        .collect();
    engine
        .apply(
            GROUP,
            &[ApplyEntry {
                index: 1,
                term: 1,
                requests,
            }],
        )
        .unwrap();
    let (count, bytes) = engine.session_footprint(GROUP, SHARD).unwrap();
    assert_eq!(count, 100);
    // 20-byte key (group, shard, client), 4-byte CRC, seq (5-byte varint),
    // Written { version }.
    assert!(bytes / count <= 32, "{} bytes per session", bytes / count);
}
