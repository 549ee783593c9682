//! The MIT 6.5840 lab-3 (Raft) test suite, re-expressed on the
//! deterministic simulator with the lab's names, steps and thresholds
//! (TESTS-6.5840.md §4). Time is virtual, so the suite runs in seconds.
//!
//! Adaptations, and why:
//! - Indices: our leaders append a no-op entry on election, which the lab's
//!   Raft does not. Where the lab asserts an exact index ("Start returns
//!   4"), we assert the *command index* (no-ops not counted), computed by
//!   [`Cluster::command_index`].
//! - "Concurrent" client goroutines become interleaved client state
//!   machines stepped every 10 ms of virtual time.
//! - RPCs: a request and its response count as one RPC, as in labrpc.
//!
//! Each test runs for `SHOAL_LAB_RUNS` seeds (default 2); `SHOAL_SEED=<n>`
//! replays one seed; `SHOAL_SEED_BASE` shifts the seed range.

use bytes::Bytes;
use shoal_consensus::sim::{Cluster, NetFaults, SimOptions};

/// The lab's `RaftElectionTimeout`.
const ELECTION_TIMEOUT_MS: u64 = 1000;
/// The lab's `MAXLOGSIZE` for snapshot tests.
const LOG_SIZE_BYTES_MAX: u64 = 2000;
/// The lab's `SnapShotInterval`.
const SNAPSHOT_INTERVAL: u64 = 10;

fn lab_seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SHOAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let runs: u64 = std::env::var("SHOAL_LAB_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let base: u64 = std::env::var("SHOAL_SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (base..base + runs).collect()
}

fn run(name: &str, f: fn(u64)) {
    for seed in lab_seeds() {
        if let Err(e) = std::panic::catch_unwind(|| f(seed)) {
            eprintln!("{name} failed: SHOAL_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
}

fn make(servers: usize, seed: u64, reliable: bool, snapshot: bool) -> Cluster {
    let mut o = SimOptions::new(servers, seed);
    if !reliable {
        o.faults = NetFaults::unreliable();
    }
    if snapshot {
        o.snapshot_interval = Some(SNAPSHOT_INTERVAL);
    }
    Cluster::new(o)
}

fn cmd(x: u64) -> Bytes {
    Bytes::from(x.to_le_bytes().to_vec())
}

fn rand_cmd(c: &mut Cluster) -> Bytes {
    let x = c.rand(1..1 << 40);
    cmd(x)
}

fn one(c: &mut Cluster, x: Bytes, n: usize, retry: bool) -> u64 {
    match c.one(x, n, retry) {
        Some(i) => i,
        None => panic!(
            "one() failed to reach agreement (SHOAL_SEED={})\n{}",
            c.seed(),
            c.describe()
        ),
    }
}

/// Lab's `ts.restart(i)`: crash if running, start from persisted state,
/// reconnect every server.
fn restart(c: &mut Cluster, i: usize) {
    c.crash(i);
    c.restart(i);
    for j in 0..c.len() {
        c.connect(j);
    }
}

// ----- 3A -----

#[test]
fn test_initial_election_3a() {
    run("InitialElection3A", |seed| {
        let mut c = make(3, seed, true, false);
        c.check_one_leader();
        c.run_for(50);
        let term1 = c.check_terms();
        assert!(term1 >= 1, "term is {term1}, but should be at least 1");
        c.run_for(2 * ELECTION_TIMEOUT_MS);
        let term2 = c.check_terms();
        if term1 != term2 {
            eprintln!("warning: term changed even though there were no failures");
        }
        c.check_one_leader();
    });
}

#[test]
fn test_re_election_3a() {
    run("ReElection3A", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        let leader1 = c.check_one_leader();
        c.disconnect(leader1);
        c.check_one_leader();
        c.connect(leader1);
        let leader2 = c.check_one_leader();
        c.disconnect(leader2);
        c.disconnect((leader2 + 1) % servers);
        c.run_for(2 * ELECTION_TIMEOUT_MS);
        c.check_no_leader();
        c.connect((leader2 + 1) % servers);
        c.check_one_leader();
        c.connect(leader2);
        c.check_one_leader();
    });
}

#[test]
fn test_many_elections_3a() {
    run("ManyElections3A", |seed| {
        let servers = 7;
        let mut c = make(servers, seed, true, false);
        c.check_one_leader();
        for _ in 1..10 {
            let i1 = c.rand(0..servers as u64) as usize;
            let i2 = c.rand(0..servers as u64) as usize;
            let i3 = c.rand(0..servers as u64) as usize;
            c.disconnect(i1);
            c.disconnect(i2);
            c.disconnect(i3);
            c.check_one_leader();
            c.connect(i1);
            c.connect(i2);
            c.connect(i3);
        }
        c.check_one_leader();
    });
}

// ----- 3B -----

#[test]
fn test_basic_agree_3b() {
    run("BasicAgree3B", |seed| {
        let mut c = make(3, seed, true, false);
        let mut last = 0;
        for index in 1..4u64 {
            let (nd, _) = c.n_committed(last + 1);
            assert_eq!(nd, 0, "some have committed before Start()");
            let xindex = c.one(cmd(index * 100), 3, false).expect("one");
            let leader = c.leaders()[0].0;
            assert_eq!(
                c.command_index(leader, xindex),
                index,
                "got index {xindex}, expected command {index}"
            );
            last = xindex;
        }
    });
}

#[test]
fn test_rpc_bytes_3b() {
    run("RPCBytes3B", |seed| {
        let mut c = make(3, seed, true, false);
        one(&mut c, cmd(99), 3, false);
        let bytes0 = c.stats.bytes;
        let mut sent = 0u64;
        for _ in 2..12 {
            let x: Vec<u8> = (0..5000).map(|_| c.rand(0..256) as u8).collect();
            one(&mut c, Bytes::from(x), 3, false);
            sent += 5000;
        }
        let got = c.stats.bytes - bytes0;
        let expected = 3 * sent;
        eprintln!(
            "RPCBytes3B seed {seed}: {got} bytes for {sent} payload bytes (limit {})",
            expected + 50_000
        );
        assert!(
            got <= expected + 50_000,
            "too many RPC bytes; got {got}, expected {expected}"
        );
    });
}

#[test]
fn test_follower_failure_3b() {
    run("FollowerFailure3B", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(101), servers, false);
        let leader1 = c.check_one_leader();
        c.disconnect((leader1 + 1) % servers);
        one(&mut c, cmd(102), servers - 1, false);
        c.run_for(ELECTION_TIMEOUT_MS);
        one(&mut c, cmd(103), servers - 1, false);
        let leader2 = c.check_one_leader();
        c.disconnect((leader2 + 1) % servers);
        c.disconnect((leader2 + 2) % servers);
        let (index, _) = c
            .propose(leader2, cmd(104))
            .expect("leader rejected Start()");
        assert_eq!(
            c.command_index(leader2, index),
            4,
            "expected command index 4, got raft index {index}"
        );
        c.run_for(2 * ELECTION_TIMEOUT_MS);
        let (n, _) = c.n_committed(index);
        assert_eq!(n, 0, "{n} committed but no majority");
    });
}

#[test]
fn test_leader_failure_3b() {
    run("LeaderFailure3B", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(101), servers, false);
        let leader1 = c.check_one_leader();
        c.disconnect(leader1);
        one(&mut c, cmd(102), servers - 1, false);
        c.run_for(ELECTION_TIMEOUT_MS);
        one(&mut c, cmd(103), servers - 1, false);
        let leader2 = c.check_one_leader();
        c.disconnect(leader2);
        let mut started = Vec::new();
        for i in 0..servers {
            if let Some((index, _)) = c.propose(i, cmd(104)) {
                started.push(index);
            }
        }
        c.run_for(2 * ELECTION_TIMEOUT_MS);
        for index in started {
            let (n, v) = c.n_committed(index);
            assert!(
                n == 0 || v != Some(cmd(104)),
                "{n} committed 104 but no majority"
            );
        }
    });
}

#[test]
fn test_fail_agree_3b() {
    run("FailAgree3B", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(101), servers, false);
        let leader = c.check_one_leader();
        c.disconnect((leader + 1) % servers);
        one(&mut c, cmd(102), servers - 1, false);
        one(&mut c, cmd(103), servers - 1, false);
        c.run_for(ELECTION_TIMEOUT_MS);
        one(&mut c, cmd(104), servers - 1, false);
        one(&mut c, cmd(105), servers - 1, false);
        c.connect((leader + 1) % servers);
        one(&mut c, cmd(106), servers, true);
        c.run_for(ELECTION_TIMEOUT_MS);
        one(&mut c, cmd(107), servers, true);
    });
}

#[test]
fn test_fail_no_agree_3b() {
    run("FailNoAgree3B", |seed| {
        let servers = 5;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(10), servers, false);
        let leader = c.check_one_leader();
        c.disconnect((leader + 1) % servers);
        c.disconnect((leader + 2) % servers);
        c.disconnect((leader + 3) % servers);
        let (index, _) = c.propose(leader, cmd(20)).expect("leader rejected Start()");
        assert_eq!(
            c.command_index(leader, index),
            2,
            "expected command index 2, got raft index {index}"
        );
        c.run_for(2 * ELECTION_TIMEOUT_MS);
        let (n, _) = c.n_committed(index);
        assert_eq!(n, 0, "{n} committed but no majority");
        c.connect((leader + 1) % servers);
        c.connect((leader + 2) % servers);
        c.connect((leader + 3) % servers);
        let leader2 = c.check_one_leader();
        let (index2, _) = c
            .propose(leader2, cmd(30))
            .expect("leader2 rejected Start()");
        let ci = c.command_index(leader2, index2);
        assert!((2..=3).contains(&ci), "unexpected command index {ci}");
        one(&mut c, cmd(1000), servers, true);
    });
}

#[test]
fn test_concurrent_starts_3b() {
    run("ConcurrentStarts3B", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        let mut success = false;
        'outer: for attempt in 0..5 {
            if attempt > 0 {
                c.run_for(3000);
            }
            let leader = c.check_one_leader();
            let Some((_, term)) = c.propose(leader, cmd(1)) else {
                continue;
            };
            let mut indexes = Vec::new();
            for i in 0..5u64 {
                match c.propose(leader, cmd(100 + i)) {
                    Some((index, t)) if t == term => indexes.push((index, 100 + i)),
                    _ => continue 'outer,
                }
            }
            for &(index, _) in &indexes {
                if c.wait(index, servers, Some(term)).is_none() {
                    continue 'outer;
                }
            }
            for &(index, x) in &indexes {
                assert_eq!(c.n_committed(index).1, Some(cmd(x)), "cmd {x} missing");
            }
            success = true;
            break;
        }
        assert!(success, "term changed too often");
    });
}

#[test]
fn test_rejoin_3b() {
    run("Rejoin3B", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(101), servers, true);
        let leader1 = c.check_one_leader();
        c.disconnect(leader1);
        c.propose(leader1, cmd(102));
        c.propose(leader1, cmd(103));
        c.propose(leader1, cmd(104));
        one(&mut c, cmd(103), 2, true);
        let leader2 = c.check_one_leader();
        c.disconnect(leader2);
        c.connect(leader1);
        one(&mut c, cmd(104), 2, true);
        c.connect(leader2);
        one(&mut c, cmd(105), servers, true);
    });
}

#[test]
fn test_backup_3b() {
    run("Backup3B", |seed| {
        let servers = 5;
        let mut c = make(servers, seed, true, false);
        let x = rand_cmd(&mut c);
        one(&mut c, x, servers, true);
        let leader1 = c.check_one_leader();
        c.disconnect((leader1 + 2) % servers);
        c.disconnect((leader1 + 3) % servers);
        c.disconnect((leader1 + 4) % servers);
        for _ in 0..50 {
            let x = rand_cmd(&mut c);
            c.propose(leader1, x);
        }
        c.run_for(ELECTION_TIMEOUT_MS / 2);
        c.disconnect(leader1);
        c.disconnect((leader1 + 1) % servers);
        c.connect((leader1 + 2) % servers);
        c.connect((leader1 + 3) % servers);
        c.connect((leader1 + 4) % servers);
        for _ in 0..50 {
            let x = rand_cmd(&mut c);
            one(&mut c, x, 3, true);
        }
        let leader2 = c.check_one_leader();
        let mut other = (leader1 + 2) % servers;
        if leader2 == other {
            other = (leader2 + 1) % servers;
        }
        c.disconnect(other);
        for _ in 0..50 {
            let x = rand_cmd(&mut c);
            c.propose(leader2, x);
        }
        c.run_for(ELECTION_TIMEOUT_MS / 2);
        for i in 0..servers {
            c.disconnect(i);
        }
        c.connect(leader1);
        c.connect((leader1 + 1) % servers);
        c.connect(other);
        for _ in 0..50 {
            let x = rand_cmd(&mut c);
            one(&mut c, x, 3, true);
        }
        for i in 0..servers {
            c.connect(i);
        }
        let x = rand_cmd(&mut c);
        one(&mut c, x, servers, true);
    });
}

#[test]
fn test_count_3b() {
    run("Count3B", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        let leader = c.check_one_leader();
        let total1 = c.stats.rpcs;
        assert!(
            (1..=30).contains(&total1),
            "too many or too few RPCs ({total1}) to elect initial leader"
        );
        eprintln!("Count3B seed {seed}: {total1} RPCs to elect");
        let _ = leader;
        let mut success = false;
        let mut total2 = 0;
        'outer: for attempt in 0..5 {
            if attempt > 0 {
                c.run_for(3000);
            }
            let leader = c.check_one_leader();
            let total1 = c.stats.rpcs;
            let iters = 10u64;
            let Some((starti, term)) = c.propose(leader, cmd(1)) else {
                continue;
            };
            let mut cmds = Vec::new();
            for i in 1..iters + 2 {
                let x = c.rand(1..1 << 40);
                cmds.push(x);
                match c.propose(leader, cmd(x)) {
                    Some((index1, term1)) if term1 == term => {
                        assert_eq!(index1, starti + i, "Start() failed");
                    }
                    _ => continue 'outer,
                }
            }
            for i in 1..iters + 1 {
                match c.wait(starti + i, servers, Some(term)) {
                    Some(v) => assert_eq!(v, cmd(cmds[i as usize - 1]), "wrong value committed"),
                    None => continue 'outer,
                }
            }
            if (0..servers).any(|i| c.raft(i).is_some_and(|r| r.term() != term)) {
                continue;
            }
            total2 = c.stats.rpcs;
            assert!(
                total2 - total1 <= (iters + 1 + 3) * 3,
                "too many RPCs ({}) for {iters} entries",
                total2 - total1
            );
            eprintln!(
                "Count3B seed {seed}: {} RPCs to commit {} entries",
                total2 - total1,
                iters + 1
            );
            success = true;
            break;
        }
        assert!(success, "term changed too often");
        c.run_for(ELECTION_TIMEOUT_MS);
        eprintln!(
            "Count3B seed {seed}: {} RPCs in 1 s idle",
            c.stats.rpcs - total2
        );
        let total3 = c.stats.rpcs;
        assert!(
            total3 - total2 <= 3 * 20,
            "too many RPCs ({}) for 1 second of idleness",
            total3 - total2
        );
    });
}

// ----- 3C -----

#[test]
fn test_persist1_3c() {
    run("Persist13C", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(11), servers, true);
        for i in 0..servers {
            c.crash(i);
        }
        for i in 0..servers {
            restart(&mut c, i);
        }
        one(&mut c, cmd(12), servers, true);
        let leader1 = c.check_one_leader();
        restart(&mut c, leader1);
        one(&mut c, cmd(13), servers, true);
        let leader2 = c.check_one_leader();
        c.crash(leader2);
        let index14 = one(&mut c, cmd(14), servers - 1, true);
        restart(&mut c, leader2);
        c.wait(index14, servers, None);
        let i3 = (c.check_one_leader() + 1) % servers;
        c.crash(i3);
        one(&mut c, cmd(15), servers - 1, true);
        restart(&mut c, i3);
        one(&mut c, cmd(16), servers, true);
    });
}

#[test]
fn test_persist2_3c() {
    run("Persist23C", |seed| {
        let servers = 5;
        let mut c = make(servers, seed, true, false);
        let mut index = 1u64;
        for _ in 0..5 {
            one(&mut c, cmd(10 + index), servers, true);
            index += 1;
            let leader1 = c.check_one_leader();
            c.crash((leader1 + 1) % servers);
            c.crash((leader1 + 2) % servers);
            one(&mut c, cmd(10 + index), servers - 2, true);
            index += 1;
            c.crash(leader1 % servers);
            c.crash((leader1 + 3) % servers);
            c.crash((leader1 + 4) % servers);
            restart(&mut c, (leader1 + 1) % servers);
            restart(&mut c, (leader1 + 2) % servers);
            c.run_for(ELECTION_TIMEOUT_MS);
            restart(&mut c, (leader1 + 3) % servers);
            one(&mut c, cmd(10 + index), servers - 2, true);
            index += 1;
            restart(&mut c, (leader1 + 4) % servers);
            restart(&mut c, leader1 % servers);
        }
        one(&mut c, cmd(1000), servers, true);
    });
}

#[test]
fn test_persist3_3c() {
    run("Persist33C", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, true, false);
        one(&mut c, cmd(101), 3, true);
        let leader = c.check_one_leader();
        c.disconnect((leader + 2) % servers);
        one(&mut c, cmd(102), 2, true);
        c.crash(leader % servers);
        c.crash((leader + 1) % servers);
        restart(&mut c, (leader + 2) % servers);
        restart(&mut c, leader % servers);
        one(&mut c, cmd(103), 2, true);
        restart(&mut c, (leader + 1) % servers);
        one(&mut c, cmd(104), servers, true);
    });
}

fn figure8(seed: u64, iterations: usize) {
    let servers = 5;
    let mut c = make(servers, seed, true, false);
    let x = rand_cmd(&mut c);
    one(&mut c, x, 1, true);
    let mut nup = servers;
    for _ in 0..iterations {
        let mut leader = None;
        for i in 0..servers {
            let x = rand_cmd(&mut c);
            if c.propose(i, x).is_some() {
                leader = Some(i);
            }
        }
        let ms = if c.rand(0..1000) < 100 {
            c.rand(0..ELECTION_TIMEOUT_MS / 2)
        } else {
            c.rand(0..13)
        };
        c.run_for(ms);
        if let Some(l) = leader {
            if c.is_alive(l) {
                c.crash(l);
                nup -= 1;
            }
        }
        if nup < 3 {
            let s = c.rand(0..servers as u64) as usize;
            if !c.is_alive(s) {
                restart(&mut c, s);
                nup += 1;
            }
        }
    }
    for i in 0..servers {
        if !c.is_alive(i) {
            restart(&mut c, i);
        }
    }
    let x = rand_cmd(&mut c);
    one(&mut c, x, servers, true);
}

#[test]
fn test_figure8_3c() {
    run("Figure83C", |seed| figure8(seed, 1000));
}

#[test]
fn test_unreliable_agree_3c() {
    run("UnreliableAgree3C", |seed| {
        let servers = 5;
        let mut c = make(servers, seed, false, false);
        for iters in 1..50u64 {
            for j in 0..4 {
                one(&mut c, cmd(100 * iters + j), 1, true);
            }
            one(&mut c, cmd(iters), 1, true);
        }
        c.faults = NetFaults::reliable();
        one(&mut c, cmd(100), servers, true);
    });
}

#[test]
fn test_figure8_unreliable_3c() {
    run("Figure8Unreliable3C", |seed| {
        let servers = 5;
        let mut c = make(servers, seed, false, false);
        let x = cmd(c.rand(0..10_000));
        one(&mut c, x, 1, true);
        let mut nup = servers;
        for iters in 0..1000 {
            if iters == 200 {
                c.faults.long_delay_per_mille = 667;
            }
            let mut leader = None;
            for i in 0..servers {
                let x = cmd(c.rand(0..10_000));
                if c.propose(i, x).is_some() && c.is_connected(i) {
                    leader = Some(i);
                }
            }
            let ms = if c.rand(0..1000) < 100 {
                c.rand(0..ELECTION_TIMEOUT_MS / 2)
            } else {
                c.rand(0..13)
            };
            c.run_for(ms);
            if let Some(l) = leader {
                if c.rand(0..1000) < ELECTION_TIMEOUT_MS / 2 {
                    c.disconnect(l);
                    nup -= 1;
                }
            }
            if nup < 3 {
                let s = c.rand(0..servers as u64) as usize;
                if !c.is_connected(s) {
                    c.connect(s);
                    nup += 1;
                }
            }
        }
        for i in 0..servers {
            c.connect(i);
        }
        let x = cmd(c.rand(0..10_000));
        one(&mut c, x, servers, true);
    });
}

/// One "concurrent" client of the churn tests.
struct Client {
    next_ms: u64,
    waiting: Option<(u64, Bytes, usize)>,
    values: Vec<Bytes>,
    me: u64,
}

fn churn(seed: u64, unreliable: bool) {
    let servers = 5;
    let mut c = make(servers, seed, !unreliable, false);
    let mut clients: Vec<Client> = (0..3)
        .map(|me| Client {
            next_ms: 0,
            waiting: None,
            values: Vec::new(),
            me,
        })
        .collect();
    let polls = [10u64, 20, 50, 100, 200];
    let step = |c: &mut Cluster, clients: &mut Vec<Client>, ms: u64| {
        let end = c.now_ms + ms;
        while c.now_ms < end {
            for cl in clients.iter_mut() {
                if c.now_ms < cl.next_ms {
                    continue;
                }
                if let Some((index, x, poll)) = cl.waiting.take() {
                    let (nd, v) = c.n_committed(index);
                    if nd > 0 {
                        if v.as_ref() == Some(&x) {
                            cl.values.push(x);
                        }
                    } else if poll < polls.len() {
                        cl.waiting = Some((index, x, poll + 1));
                        cl.next_ms = c.now_ms + polls[poll];
                    }
                    continue;
                }
                let x = cmd(c.rand(1..1 << 40));
                let mut index = None;
                for i in 0..servers {
                    if let Some((idx, _)) = c.propose(i, x.clone()) {
                        index = Some(idx);
                    }
                }
                match index {
                    Some(idx) => cl.waiting = Some((idx, x, 0)),
                    None => cl.next_ms = c.now_ms + 79 + cl.me * 17,
                }
            }
            c.run_for(5);
        }
    };
    for _ in 0..20 {
        if c.rand(0..1000) < 200 {
            let i = c.rand(0..servers as u64) as usize;
            c.disconnect(i);
        }
        if c.rand(0..1000) < 500 {
            let i = c.rand(0..servers as u64) as usize;
            if !c.is_alive(i) {
                c.restart(i);
            }
            c.connect(i);
        }
        if c.rand(0..1000) < 200 {
            let i = c.rand(0..servers as u64) as usize;
            c.crash(i);
        }
        step(&mut c, &mut clients, ELECTION_TIMEOUT_MS * 7 / 10);
    }
    step(&mut c, &mut clients, ELECTION_TIMEOUT_MS);
    c.faults = NetFaults::reliable();
    for i in 0..servers {
        if !c.is_alive(i) {
            c.restart(i);
        }
        c.connect(i);
    }
    // Clients stop; let their pending polls finish.
    step(&mut c, &mut clients, 400);
    let x = rand_cmd(&mut c);
    let last_index = one(&mut c, x, servers, true);
    let mut really = std::collections::HashSet::new();
    for index in 1..=last_index {
        if let Some(v) = c.wait(index, servers, None) {
            really.insert(v);
        }
    }
    for cl in &clients {
        for v in &cl.values {
            assert!(
                really.contains(v),
                "didn't find a value a client saw committed"
            );
        }
    }
}

#[test]
fn test_reliable_churn_3c() {
    run("ReliableChurn3C", |seed| churn(seed, false));
}

#[test]
fn test_unreliable_churn_3c() {
    run("UnreliableChurn3C", |seed| churn(seed, true));
}

// ----- 3D -----

fn snapcommon(seed: u64, disconnect: bool, reliable: bool, crash: bool) {
    let iters = 30;
    let servers = 3;
    let mut c = make(servers, seed, reliable, true);
    let x = rand_cmd(&mut c);
    one(&mut c, x, servers, true);
    let mut leader1 = c.check_one_leader();
    let mut max_size = 0;
    for i in 0..iters {
        let (mut victim, mut sender) = ((leader1 + 1) % servers, leader1);
        if i % 3 == 1 {
            sender = (leader1 + 1) % servers;
            victim = leader1;
        }
        if disconnect {
            c.disconnect(victim);
            let x = rand_cmd(&mut c);
            one(&mut c, x, servers - 1, true);
        }
        if crash {
            c.crash(victim);
            let x = rand_cmd(&mut c);
            one(&mut c, x, servers - 1, true);
        }
        let nn = SNAPSHOT_INTERVAL / 2 + c.rand(0..SNAPSHOT_INTERVAL);
        for _ in 0..nn {
            let x = rand_cmd(&mut c);
            c.propose(sender, x);
        }
        let x = rand_cmd(&mut c);
        if !disconnect && !crash {
            // All followers caught up: no InstallSnapshot needed in Basic.
            one(&mut c, x, servers, true);
        } else {
            one(&mut c, x, servers - 1, true);
        }
        let size = c.log_size_bytes();
        assert!(size < LOG_SIZE_BYTES_MAX, "log size too large: {size}");
        max_size = max_size.max(size);
        if disconnect {
            c.connect(victim);
            let x = rand_cmd(&mut c);
            one(&mut c, x, servers, true);
            leader1 = c.check_one_leader();
        }
        if crash {
            restart(&mut c, victim);
            let x = rand_cmd(&mut c);
            one(&mut c, x, servers, true);
            leader1 = c.check_one_leader();
        }
    }
    eprintln!("snapshot test seed {seed}: largest raft state {max_size} bytes (limit {LOG_SIZE_BYTES_MAX})");
}

#[test]
fn test_snapshot_basic_3d() {
    run("SnapshotBasic3D", |seed| {
        snapcommon(seed, false, true, false)
    });
}

#[test]
fn test_snapshot_install_3d() {
    run("SnapshotInstall3D", |seed| {
        snapcommon(seed, true, true, false)
    });
}

#[test]
fn test_snapshot_install_unreliable_3d() {
    run("SnapshotInstallUnreliable3D", |seed| {
        snapcommon(seed, true, false, false)
    });
}

#[test]
fn test_snapshot_install_crash_3d() {
    run("SnapshotInstallCrash3D", |seed| {
        snapcommon(seed, false, true, true)
    });
}

#[test]
fn test_snapshot_install_un_crash_3d() {
    run("SnapshotInstallUnCrash3D", |seed| {
        snapcommon(seed, false, false, true)
    });
}

#[test]
fn test_snapshot_all_crash_3d() {
    run("SnapshotAllCrash3D", |seed| {
        let servers = 3;
        let iters = 5;
        let mut c = make(servers, seed, false, true);
        let x = rand_cmd(&mut c);
        one(&mut c, x, servers, true);
        for _ in 0..iters {
            let nn = SNAPSHOT_INTERVAL / 2 + c.rand(0..SNAPSHOT_INTERVAL);
            for _ in 0..nn {
                let x = rand_cmd(&mut c);
                one(&mut c, x, servers, true);
            }
            let x = rand_cmd(&mut c);
            let index1 = one(&mut c, x, servers, true);
            for i in 0..servers {
                c.crash(i);
            }
            for i in 0..servers {
                restart(&mut c, i);
            }
            let x = rand_cmd(&mut c);
            let index2 = one(&mut c, x, servers, true);
            assert!(index2 > index1, "index decreased from {index1} to {index2}");
        }
    });
}

#[test]
fn test_snapshot_init_3d() {
    run("SnapshotInit3D", |seed| {
        let servers = 3;
        let mut c = make(servers, seed, false, true);
        let x = rand_cmd(&mut c);
        one(&mut c, x, servers, true);
        for _ in 0..SNAPSHOT_INTERVAL + 1 {
            let x = rand_cmd(&mut c);
            one(&mut c, x, servers, true);
        }
        for i in 0..servers {
            c.crash(i);
        }
        for i in 0..servers {
            restart(&mut c, i);
        }
        let x = rand_cmd(&mut c);
        one(&mut c, x, servers, true);
        for i in 0..servers {
            c.crash(i);
        }
        for i in 0..servers {
            restart(&mut c, i);
        }
        let x = rand_cmd(&mut c);
        one(&mut c, x, servers, true);
    });
}
