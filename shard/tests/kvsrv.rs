//! The MIT 6.5840 lab-2 kvsrv and lock tests, on a one-node cluster (the
//! lab's single key/value server) of the real node runtime.
//!
//! Two deliberate differences, both because Shoal's client keeps an
//! exactly-once session (issue 5) where the lab's kvsrv must keep no
//! per-client state:
//! - TestUnreliableNet: the lab requires `ErrMaybe` to occur at least once,
//!   because its server cannot tell a resent Put from a new one. Ours can,
//!   so every Put must be answered definitively (OK) on the first call even
//!   though requests and replies are dropped; the test asserts that instead,
//!   and that drops really happened.
//! - TestMemPutManyClientsReliable (heap per client without sessions) does
//!   not apply: a session per client is the design. Not ported.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seed, Clerk, Cluster};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_shard::client::ClientError;
use tokio::time::sleep;

// Goal: the versioned-put rules on a reliable network.
#[tokio::test(start_paused = true)]
async fn test_reliable_put() {
    let cluster = Cluster::new(1, true, seed("TestReliablePut"));
    let ck = cluster.clerk();
    assert_eq!(ck.put("k", "6.5840", 0).await, Ok(1));
    assert_eq!(ck.get("k").await.expect("get"), ("6.5840".into(), 1));
    assert!(matches!(
        ck.put("k", "6.5840", 0).await,
        Err(ClientError::VersionMismatch { current: 1 })
    ));
    assert_eq!(ck.put("y", "6.5840", 1).await, Err(ClientError::NoKey));
    assert!(matches!(
        ck.client.get("y").await,
        Err(ClientError::NotFound)
    ));
}

/// The lab's OnePut loop: read the key, put at the version read.
async fn one_put_loop(cli: usize, clerk: Clerk, done: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ok = 0;
    while !done.load(Ordering::Relaxed) {
        let (_, version) = clerk.get("k").await.expect("get");
        match clerk
            .put("k", &format!("{{\"Id\":{cli},\"Ver\":{version}}}"), version)
            .await
        {
            Ok(_) => ok += 1,
            Err(ClientError::VersionMismatch { .. }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
        sleep(Duration::from_millis(rng.random_range(1..=10))).await;
    }
    ok
}

// Goal: ten concurrent clients for a second on one key: the final version
// equals the number of successful puts and the history is linearizable.
#[tokio::test(start_paused = true)]
async fn test_put_concurrent_reliable() {
    let seed = seed("TestPutConcurrentReliable");
    let cluster = Cluster::new(1, true, seed);
    let done = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..10)
        .map(|cli| {
            tokio::spawn(one_put_loop(
                cli,
                cluster.clerk(),
                done.clone(),
                seed ^ cli as u64,
            ))
        })
        .collect();
    sleep(Duration::from_secs(1)).await;
    done.store(true, Ordering::Relaxed);
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("task");
    }
    let (_, version) = cluster.clerk().get("k").await.expect("get");
    assert_eq!(version, ok, "seed {seed}");
    cluster.check_linearizable();
}

// Goal: on a network that drops requests and replies, each versioned put is
// applied exactly once and answered definitively; after each round the key
// holds the round's first value at the next version.
#[tokio::test(start_paused = true)]
async fn test_unreliable_net() {
    const NTRY: u64 = 100;
    let seed = seed("TestUnreliableNet");
    let cluster = Cluster::new(1, false, seed);
    let ck = cluster.clerk();
    let calls_before = cluster.net.rpc_total();
    for attempt in 0..NTRY {
        let r = ck.put("k", "0", attempt).await;
        assert_eq!(
            r,
            Ok(attempt + 1),
            "seed {seed}: put {attempt} was not answered definitively"
        );
        assert_eq!(
            ck.get("k").await.expect("get"),
            ("0".into(), attempt + 1),
            "seed {seed}"
        );
    }
    let calls = cluster.net.rpc_total() - calls_before;
    assert!(
        calls > 2 * NTRY,
        "seed {seed}: no request or reply was ever dropped ({calls} calls)"
    );
    cluster.check_linearizable();
}

/// The lab's lock, built only on versioned Put and Get.
struct Lock {
    ck: Clerk,
    name: String,
    id: String,
}

impl Lock {
    async fn acquire(&self) {
        loop {
            let (value, version) = self.ck.get(&self.name).await.expect("get");
            if value.is_empty() {
                match self.ck.put(&self.name, &self.id, version).await {
                    Ok(_) => return,
                    Err(ClientError::Maybe) => {
                        if self.ck.get(&self.name).await.expect("get").0 == self.id.as_bytes() {
                            return;
                        }
                    }
                    Err(_) => {}
                }
            } else if value == self.id.as_bytes() {
                return;
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    async fn release(&self) {
        let (value, version) = self.ck.get(&self.name).await.expect("get");
        assert_eq!(value, self.id.as_bytes(), "releasing a lock we do not hold");
        match self.ck.put(&self.name, "", version).await {
            Ok(_) | Err(ClientError::Maybe) => {}
            Err(e) => panic!("release failed: {e:?}"),
        }
    }
}

/// NCLNT clients each loop for NSEC seconds: acquire, check "l0" is empty,
/// write their id, sleep 10 ms, clear it, release.
async fn lock_test(name: &str, nclients: usize, reliable: bool) {
    const NSEC: u64 = 2;
    let seed = seed(name);
    let cluster = Cluster::new(1, reliable, seed);
    let done = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..nclients)
        .map(|cli| {
            let ck = cluster.clerk();
            let done = done.clone();
            tokio::spawn(async move {
                let lock = Lock {
                    ck: ck.clone(),
                    name: "lock".into(),
                    id: format!("client-{cli}"),
                };
                let mut rounds = 0;
                while !done.load(Ordering::Relaxed) {
                    lock.acquire().await;
                    let (value, version) = ck.get("l0").await.expect("get");
                    assert!(value.is_empty(), "two clients acquired the lock");
                    let v = ck
                        .put("l0", &lock.id, version)
                        .await
                        .expect("put in critical section");
                    sleep(Duration::from_millis(10)).await;
                    ck.put("l0", "", v).await.expect("put in critical section");
                    lock.release().await;
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    sleep(Duration::from_secs(NSEC)).await;
    done.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for t in tasks {
        rounds += t.await.expect("client");
    }
    assert!(rounds > 0, "seed {seed}: nobody ever got the lock");
    cluster.check_linearizable();
}

// Goal: one client takes and releases the lock repeatedly.
#[tokio::test(start_paused = true)]
async fn test_one_client_reliable() {
    lock_test("TestOneClientReliable", 1, true).await;
}

// Goal: ten clients never hold the lock at once.
#[tokio::test(start_paused = true)]
async fn test_many_clients_reliable() {
    lock_test("TestManyClientsReliable", 10, true).await;
}

// Goal: one client, unreliable network.
#[tokio::test(start_paused = true)]
async fn test_one_client_unreliable() {
    lock_test("TestOneClientUnreliable", 1, false).await;
}

// Goal: ten clients never hold the lock at once, unreliable network.
#[tokio::test(start_paused = true)]
async fn test_many_clients_unreliable() {
    lock_test("TestManyClientsUnreliable", 10, false).await;
}
