//! Sessions and the client's `Maybe` path (see `shard::client`'s and
//! `shard::node::sessions`' module docs).
//!
//! - A session expires only once a leader has itself watched it idle for
//!   the whole idle time on its own monotonic clock: restarting every node
//!   restarts the clock, whatever times the log holds (the wall clocks of
//!   the leaders that wrote it play no part).
//! - A write whose first attempt applied but whose reply was lost, and
//!   whose retries lasted at least a quarter of the client's idea of the
//!   session idle time, is reported `ClientError::Maybe`: past that point
//!   a retry may have met a session that expired, run again, and answered
//!   with its own second effect. With the client's idea matching the nodes'
//!   and a valid configuration (deadline at most half the idle time),
//!   retries cannot outlast a session; a client that believes sessions live
//!   longer than they do still never reports a second run as its answer.
//! - A retry well within the session gets the cached answer; a mismatch on
//!   the only send is a plain `VersionMismatch`.
//!
//! The reply is lost on purpose by [`LossyCaller`], which wraps the
//! in-memory network's client: on the first `Written` reply it cuts the
//! client's links in the `MemNetwork` (so the reply, and every retry until
//! the test reconnects, is lost) and reports the reply lost. Seeded:
//! `SHOAL_SEED` replays one seed; otherwise seeds `b..b+n` run, with `b` =
//! `SHOAL_SEED_BASE` (default 0) and `n` = `SHOAL_SEEDS` (default
//! [`SEEDS_DEFAULT`]).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Cluster;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::Reply;
use shoal_net::mem::{MemClient, MemNetwork};
use shoal_net::{NodeId, RpcCaller, RpcError};
use shoal_shard::client::{Client, ClientError, SESSIONS_MAX_DEFAULT};
use shoal_shard::protocol::{KvProtocol, KvResponse, Request, Response};
use tokio::time::{sleep, Instant};

/// The nodes' session idle time.
const SESSION_IDLE_MS: u64 = 2_000;
/// What a misconfigured client believes the idle time is (six times the
/// nodes'), so that its deadline may outlast a session.
const CLIENT_SESSION_IDLE_MS: u64 = 12_000;
/// Seeds each test runs unless `SHOAL_SEEDS` or `SHOAL_SEED` says otherwise.
const SEEDS_DEFAULT: u64 = 50;

fn seeds(test: &str) -> Vec<u64> {
    common::seeds_or(test, SEEDS_DEFAULT)
}

/// A client transport that loses the first `Written` reply it sees while
/// armed, cutting the client's links in the network at that moment.
#[derive(Clone)]
struct LossyCaller {
    inner: MemClient<KvProtocol>,
    net: MemNetwork<KvProtocol>,
    armed: Arc<AtomicBool>,
}

impl RpcCaller<KvProtocol> for LossyCaller {
    fn call_with_deadline(
        &self,
        to: NodeId,
        request: Request,
        deadline: Duration,
    ) -> impl std::future::Future<Output = Result<Response, RpcError>> + Send {
        let this = self.clone();
        async move {
            let response = this.inner.call_with_deadline(to, request, deadline).await;
            if matches!(
                response,
                Ok(Response::Kv(KvResponse::Done(Reply::Written { .. })))
            ) && this.armed.swap(false, Ordering::SeqCst)
            {
                this.net.set_client_connected(this.inner.name(), false);
                return Err(RpcError::Lost("reply lost (test)".into()));
            }
            response
        }
    }

    fn default_deadline(&self) -> Duration {
        self.inner.default_deadline()
    }
}

/// A cluster with a short session idle time, a written key `k` (version 1)
/// and a lossy client that believes sessions idle `client_idle_ms` (and
/// retries for half of that); returns the cluster, the client and its
/// arming flag.
async fn setup(
    seed: u64,
    client_idle_ms: u64,
) -> (Cluster, Client<LossyCaller>, Arc<AtomicBool>, String) {
    setup_with_sessions(seed, client_idle_ms, SESSIONS_MAX_DEFAULT).await
}

/// [`setup`] with a client of at most `sessions_max` writes in flight.
async fn setup_with_sessions(
    seed: u64,
    client_idle_ms: u64,
    sessions_max: usize,
) -> (Cluster, Client<LossyCaller>, Arc<AtomicBool>, String) {
    let c = Cluster::with_session_idle_ms(3, seed, SESSION_IDLE_MS);
    let mut config = c.client_config();
    config.sessions_max = sessions_max;
    config.session_idle_ms = client_idle_ms;
    config.op_deadline = Duration::from_millis(client_idle_ms / 2);
    config.rpc_deadline = Duration::from_millis(200);
    config.backoff_max = Duration::from_millis(100);
    let name = format!("client-{}", config.client_id);
    let armed = Arc::new(AtomicBool::new(false));
    let caller = LossyCaller {
        inner: c.net.add_client(&name),
        net: c.net.clone(),
        armed: armed.clone(),
    };
    let client = Client::new(caller, c.ids(), config);
    // Elect a leader first (retries through an election would last long
    // enough for the client to say Maybe), then give the client a session.
    c.wait_for_leader(Duration::from_secs(10)).await;
    assert_eq!(client.put("warm", "up").await, Ok(1), "seed {seed}");
    (c, client, armed, name)
}

/// Runs `put_if_version(k, "mine", 0)` with its first reply lost and the
/// client cut off for `cut_for`; returns the put's outcome and how long it
/// took.
async fn put_with_lost_reply(
    seed: u64,
    c: &Cluster,
    client: &Client<LossyCaller>,
    armed: &Arc<AtomicBool>,
    name: &str,
    cut_for: Duration,
) -> (Result<u64, ClientError>, Duration) {
    armed.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let put = tokio::spawn({
        let client = client.clone();
        async move { client.put_if_version("k", "mine", 0).await }
    });
    while armed.load(Ordering::SeqCst) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "seed {seed}: the first attempt never applied"
        );
        sleep(Duration::from_millis(1)).await;
    }
    sleep(cut_for).await;
    c.net.set_client_connected(name, true);
    let outcome = put.await.expect("put task");
    (outcome, started.elapsed())
}

/// Reads `k` through a fresh client: the put must have applied exactly once.
async fn assert_applied_once(seed: u64, c: &Cluster) {
    let v = c.client().get("k").await.expect("get k");
    assert_eq!(
        (v.version, v.value.as_ref()),
        (1, b"mine".as_slice()),
        "seed {seed}: the put applied once"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_session_expiry_is_maybe() {
    // Goal: the first attempt applies, its reply is lost, the retries
    // outlast the nodes' session (the client believes it lives six times
    // longer), the retry runs again and finds version 1: the client says
    // Maybe, never VersionMismatch.
    for seed in seeds("retry_after_session_expiry_is_maybe") {
        let (mut c, client, armed, name) = setup(seed, CLIENT_SESSION_IDLE_MS).await;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Past the idle time plus one expiry period (a quarter of it), so an
        // ExpireSessions entry has certainly removed the session, and past
        // a quarter of what the client believes.
        let cut_for = Duration::from_millis(
            (SESSION_IDLE_MS + SESSION_IDLE_MS / 4).max(CLIENT_SESSION_IDLE_MS / 4)
                + rng.random_range(100..2_000),
        );
        let (outcome, took) = put_with_lost_reply(seed, &c, &client, &armed, &name, cut_for).await;
        assert_eq!(
            outcome,
            Err(ClientError::Maybe),
            "seed {seed}: a retry after the session expired ({took:?}) must be Maybe"
        );
        assert_applied_once(seed, &c).await;
        c.shutdown_all().await;
    }
}

#[tokio::test(start_paused = true)]
async fn retry_within_the_session_gets_the_cached_answer() {
    // Goal: the same lost reply, retried briefly while the session lives,
    // gets the first attempt's answer from the session cache: Ok(1). Retried
    // for longer than a quarter of the idle time (the session still lives),
    // the client cannot tell and says Maybe; the put applied once either way.
    for seed in seeds("retry_within_the_session_gets_the_cached_answer") {
        let (mut c, client, armed, name) = setup(seed, SESSION_IDLE_MS).await;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let short = seed % 2 == 0;
        let cut_for = if short {
            Duration::from_millis(rng.random_range(0..SESSION_IDLE_MS / 8))
        } else {
            Duration::from_millis(rng.random_range(SESSION_IDLE_MS / 4..SESSION_IDLE_MS * 3 / 8))
        };
        let (outcome, took) = put_with_lost_reply(seed, &c, &client, &armed, &name, cut_for).await;
        let expected = if short {
            Ok(1)
        } else {
            Err(ClientError::Maybe)
        };
        assert_eq!(
            outcome, expected,
            "seed {seed}: a retry within the session ({took:?})"
        );
        assert_applied_once(seed, &c).await;
        // A later, genuine mismatch on the first attempt is reported as such.
        assert_eq!(
            client.put_if_version("k", "other", 0).await,
            Err(ClientError::VersionMismatch { current: 1 }),
            "seed {seed}"
        );
        assert_eq!(
            client.put_if_version("absent", "x", 3).await,
            Err(ClientError::NoKey),
            "seed {seed}"
        );
        c.shutdown_all().await;
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_waits_for_a_full_period_watched_by_the_leader() {
    // Goal: a session is expired only after a leader watched it idle for
    // the whole idle time itself. A write at t0; every node restarts at
    // t0 + 0.9 idle (their trackers start over, as a leader that just took
    // over knows nothing of how long a session has been idle); the session
    // must still exist at t0 + 1.6 idle (it used to be expired from the
    // times in the log, about t0 + idle) and be gone by t0 + 3 idle.
    for seed in seeds("expiry_waits_for_a_full_period_watched_by_the_leader") {
        let mut c = Cluster::with_session_idle_ms(3, seed, SESSION_IDLE_MS);
        let client = c.client();
        let idle = Duration::from_millis(SESSION_IDLE_MS);
        c.wait_for_leader(Duration::from_secs(10)).await;
        assert_eq!(client.put("k", "v").await, Ok(1), "seed {seed}");
        let t0 = Instant::now();
        let has_session = |c: &Cluster| {
            c.engines.iter().any(|e| {
                e.session(shoal_shard::node::KV_GROUP, 0, client.id())
                    .expect("session lookup")
                    .is_some()
            })
        };
        sleep(idle * 9 / 10).await;
        assert!(has_session(&c), "seed {seed}: expired before its time");
        c.crash_all().await;
        c.start_all();
        sleep((t0 + idle * 16 / 10).saturating_duration_since(Instant::now())).await;
        assert!(
            has_session(&c),
            "seed {seed}: expired by a leader that had not watched it idle for the whole period"
        );
        sleep((t0 + idle * 3).saturating_duration_since(Instant::now())).await;
        assert!(!has_session(&c), "seed {seed}: never expired");
        c.shutdown_all().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_mismatch_on_the_only_send_is_never_maybe() {
    // Goal: a put whose request was sent once, and answered with a
    // mismatch, reports VersionMismatch however long the operation took in
    // total. Here the put waits for a session behind a clone's slow
    // operation (the client has one session; the slow one holds it for
    // longer than a quarter of the idle time, so it, retried that long, is
    // itself Maybe) before it is sent: that wait is no retry, and nothing
    // earlier of this put can have applied. (The client once measured from
    // before that wait and answered Maybe.)
    for seed in seeds("a_mismatch_on_the_only_send_is_never_maybe") {
        let (mut c, client, armed, name) = setup_with_sessions(seed, SESSION_IDLE_MS, 1).await;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let cut_for = Duration::from_millis(
            rng.random_range(SESSION_IDLE_MS * 3 / 10..SESSION_IDLE_MS * 4 / 10),
        );
        armed.store(true, Ordering::SeqCst);
        let slow = tokio::spawn({
            let client = client.clone();
            async move { client.put_if_version("k", "mine", 0).await }
        });
        while armed.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(1)).await;
        }
        // The slow put now holds the one session; this one waits for it.
        let started = Instant::now();
        let queued = tokio::spawn({
            let client = client.clone();
            async move { client.put_if_version("k", "theirs", 0).await }
        });
        sleep(cut_for).await;
        c.net.set_client_connected(&name, true);
        assert_eq!(
            slow.await.expect("slow put"),
            Err(ClientError::Maybe),
            "seed {seed}"
        );
        assert_eq!(
            queued.await.expect("queued put"),
            Err(ClientError::VersionMismatch { current: 1 }),
            "seed {seed}: sent once after waiting {:?}",
            started.elapsed()
        );
        assert_applied_once(seed, &c).await;
        c.shutdown_all().await;
    }
}
