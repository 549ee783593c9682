//! The KV client: finds and caches the leader, retries with capped backoff
//! within a deadline, and makes writes exactly-once with a session.
//!
//! # Exactly-once
//! A write runs on a session: a session id and the next sequence number,
//! kept across the write's retries. The node's session table (see
//! `shoal_engine::kv`) applies a (session, seq) once and answers a retry
//! from its cache, so a retried write never applies twice and gets the
//! first attempt's answer.
//!
//! # Many operations at once
//! A client and its clones run any number of operations at once. Reads
//! need no session. Each write takes a session of its own for its whole
//! run, from a pool of at most [`ClientConfig::sessions_max`] (the first
//! has the client's id, the others ids derived from it, [`session_id`]),
//! so a session never has two writes in flight and the node's one cached
//! reply per session stays enough. Concurrent writes reach the leader
//! together and share its synced log writes (group commit).
//!
//! # When the outcome is unknown
//! A session expires once a leader has seen it idle for `session_idle_ms`
//! on its own clock. If a write applied but its reply was lost, and the
//! client kept retrying past that, a retry may run again as a new request:
//! its answer (a second version, a version mismatch that is the first run's
//! doing) describes a write applied twice. So every write that was sent
//! more than once and whose retries lasted at least a quarter of
//! `session_idle_ms`, counted from the first send, is reported as
//! [`ClientError::Maybe`] instead of its reply. The session cannot really
//! have expired that early (a leader watches the whole period after the
//! first send was applied); the margin covers clock rate differences and a
//! client configured with a longer idle time than the nodes'. Time spent
//! waiting for another operation of a clone of the client does not count.
//! [`ClientConfig::validate`] keeps `op_deadline` at most half of
//! `session_idle_ms`. An operation that runs out of its deadline after a
//! request may have reached a node is [`ClientError::Maybe`] for writes and
//! [`ClientError::Timeout`] for reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_engine::kv::ScanPage;
use shoal_engine::{BatchWrite, ClientId, Condition, GroupId, Reply, ShardId, Versioned};
use shoal_net::{NodeId, RpcCaller, RpcError};
use tokio::time::Instant;

use crate::controller::{decode_config, ShardConfig, CURRENT_CONFIG_KEY, NEXT_CONFIG_KEY};
use crate::node::{
    CONTROLLER_GROUP, CONTROLLER_SHARD, KV_GROUP, KV_SHARD, SESSION_IDLE_MS_DEFAULT,
};
use crate::protocol::{
    BackupRefusal, BackupRequest, ClientCommand, Denied, GroupRefusal, KvProtocol, KvRequest,
    KvResponse, MemberChange, MemberReply, MemberRequest, NodeReport, PinInfo, PinnedShardInfo,
    Request, Response, PIN_SHARDS_MAX,
};

/// Most pairs [`Client::scan`] asks for in one page (the nodes' default
/// per-request limit).
pub const SCAN_PAGE_PAIRS_MAX: u64 = shoal_engine::config::SCAN_LIMIT_MAX_DEFAULT;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This client's session id: unique in the cluster, never 0.
    pub client_id: ClientId,
    /// How long one operation may take, retries included.
    pub op_deadline: Duration,
    /// How long one attempt may wait for a node's answer.
    pub rpc_deadline: Duration,
    /// First pause after every node was tried without success.
    pub backoff_min: Duration,
    /// Longest pause between rounds of attempts.
    pub backoff_max: Duration,
    /// The nodes' session idle time (`NodeConfig::session_idle_ms`).
    pub session_idle_ms: u64,
    /// The group this client addresses (routing by key arrives with the
    /// shard controller).
    pub group: GroupId,
    /// The shard this client addresses.
    pub shard: ShardId,
    /// Most writes of this client and its clones in flight at once: each
    /// runs on a session of its own (see the module docs).
    pub sessions_max: usize,
}

/// Default [`ClientConfig::sessions_max`].
pub const SESSIONS_MAX_DEFAULT: usize = 64;

/// Why a [`ClientConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientConfigError {
    /// Client id 0 means "no session".
    #[error("client id 0 is reserved (no session)")]
    ZeroClientId,
    /// An operation could retry for longer than half a session lifetime,
    /// so a retry could outlive the session and apply twice.
    #[error("op_deadline ({op_deadline_ms} ms) must be at most half of session_idle_ms ({session_idle_ms} ms)")]
    DeadlineTooLong {
        /// The operation deadline.
        op_deadline_ms: u64,
        /// The session idle time.
        session_idle_ms: u64,
    },
    /// `sessions_max` is 0: no write could run.
    #[error("sessions_max must be at least 1")]
    NoSessions,
    /// A deadline or backoff of zero, or a backoff range upside down.
    #[error("{0} must be positive, and backoff_min at most backoff_max")]
    Timing(&'static str),
}

impl ClientConfig {
    /// Checks the settings: a non-zero id, positive timings, and an
    /// operation deadline of at most half the session idle time (so no
    /// write is retried past its session's lifetime).
    pub fn validate(&self) -> Result<(), ClientConfigError> {
        if self.client_id == 0 {
            return Err(ClientConfigError::ZeroClientId);
        }
        if self.op_deadline.is_zero() {
            return Err(ClientConfigError::Timing("op_deadline"));
        }
        if self.rpc_deadline.is_zero() {
            return Err(ClientConfigError::Timing("rpc_deadline"));
        }
        if self.backoff_min > self.backoff_max {
            return Err(ClientConfigError::Timing("backoff"));
        }
        if self.sessions_max == 0 {
            return Err(ClientConfigError::NoSessions);
        }
        let op_deadline_ms = self.op_deadline.as_millis() as u64;
        if op_deadline_ms.saturating_mul(2) > self.session_idle_ms {
            return Err(ClientConfigError::DeadlineTooLong {
                op_deadline_ms,
                session_idle_ms: self.session_idle_ms,
            });
        }
        Ok(())
    }

    /// Defaults for session `client_id`: 30 s per operation, 1 s per
    /// attempt, backoff from 10 ms to 500 ms.
    pub fn new(client_id: ClientId) -> ClientConfig {
        assert!(client_id != 0, "client id 0 means \"no session\"");
        ClientConfig {
            client_id,
            op_deadline: Duration::from_secs(30),
            rpc_deadline: Duration::from_secs(1),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            session_idle_ms: SESSION_IDLE_MS_DEFAULT,
            group: KV_GROUP,
            shard: KV_SHARD,
            sessions_max: SESSIONS_MAX_DEFAULT,
        }
    }
}

/// Why an operation did not succeed. Expected outcomes of the operations
/// (missing key, version mismatch) are variants too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `get` found no such key.
    #[error("key not found")]
    NotFound,
    /// `put_if_version` found the key at another version.
    #[error("version mismatch (current version {current})")]
    VersionMismatch {
        /// The key's version.
        current: u64,
    },
    /// `put_if_version` with a non-zero version found no key.
    #[error("no such key")]
    NoKey,
    /// The write may or may not have taken effect.
    #[error("outcome unknown: the write may or may not have been applied")]
    Maybe,
    /// A read's deadline passed (a read has no effect, so nothing is
    /// unknown; a write that runs out of time is [`ClientError::Maybe`]).
    #[error("deadline exceeded")]
    Timeout,
    /// A node refused the request (limits, unknown group).
    #[error("refused: {0}")]
    Refused(String),
    /// The group does not serve the shard (any more): the configuration
    /// changed; a routing client asks the controller again.
    #[error("the group does not serve this shard")]
    WrongGroup,
    /// The pin is gone from its node: released, expired, its group
    /// dropped, or the node restarted. Pin the range again.
    #[error("the pin is gone (released, expired, or its node restarted)")]
    PinGone,
    /// A batch's condition did not hold: nothing of it was written.
    #[error("condition {index} failed (the key is at version {current}); nothing was written")]
    ConditionFailed {
        /// Index of the first failed condition, in the order added.
        index: u32,
        /// That key's version (0: absent).
        current: u64,
    },
    /// A batch names keys of several shards; until cross-shard
    /// transactions exist, a batch must stay within one shard.
    #[error("a batch must name keys of one shard (it names shards {first} and {other})")]
    CrossShard {
        /// The shard of the batch's first key.
        first: ShardId,
        /// The shard of a key that differs.
        other: ShardId,
    },
}

/// An atomic write of several keys under version conditions, like an etcd
/// `Txn` compare-and-write: [`Client::write`] applies every write if every
/// condition holds, and nothing otherwise. Conditions are judged against
/// the state before the batch; writes apply in the order added. On a
/// sharded cluster all keys must be in one shard. At most
/// [`shoal_engine::kv::BATCH_OPS_MAX`] conditions and writes.
///
/// ```
/// let mut batch = shoal_shard::WriteBatch::new();
/// batch.check_version("account/a", 3).put("account/a", "70").put("account/b", "30");
/// assert_eq!(batch.len(), 3);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    conditions: Vec<Condition>,
    writes: Vec<BatchWrite>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Adds a write of `key`.
    pub fn put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut WriteBatch {
        self.writes.push(BatchWrite::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a delete of `key` (nothing if absent).
    pub fn delete(&mut self, key: impl Into<Bytes>) -> &mut WriteBatch {
        self.writes.push(BatchWrite::Delete { key: key.into() });
        self
    }

    /// Adds a condition: `key` must be at `version` (0: absent).
    pub fn check_version(&mut self, key: impl Into<Bytes>, version: u64) -> &mut WriteBatch {
        self.conditions.push(Condition {
            key: key.into(),
            version,
        });
        self
    }

    /// Conditions and writes together.
    pub fn len(&self) -> usize {
        self.conditions.len() + self.writes.len()
    }

    /// No conditions and no writes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key named, conditions first.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.conditions
            .iter()
            .map(|c| &c.key)
            .chain(self.writes.iter().map(BatchWrite::key))
    }

    /// The conditions and the writes.
    pub fn into_parts(self) -> (Vec<Condition>, Vec<BatchWrite>) {
        (self.conditions, self.writes)
    }
}

/// One shard's part of a pinned range ([`Client::pin`]), held by the
/// node [`ShardPin::node`]; what a job keeps to read its input. The
/// shards of one group share one pin (same [`ShardPin::pin`] and node).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinnedShard {
    /// The group that served the pin.
    pub group: GroupId,
    /// The shard pinned.
    pub shard: ShardId,
    /// The pin, its node, and the shard's part's size and split keys.
    pub info: ShardPin,
}

/// A group pin as one of its shards sees it: the pin and its node (shared
/// by the group's shards), and this shard's part of the pinned range.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardPin {
    /// The pin's id on its node ([`PinInfo::pin`]).
    pub pin: u64,
    /// The node holding it ([`PinInfo::node`]).
    pub node: u64,
    /// Key + value bytes of the range in this shard.
    pub bytes: u64,
    /// Pairs of the range in this shard.
    pub keys: u64,
    /// Split keys of this shard's part ([`PinnedShardInfo::split_keys`]).
    pub split_keys: Vec<Bytes>,
}

impl PinnedShard {
    /// Each shard of `info`, a pin `group` answered.
    fn from_info(group: GroupId, info: PinInfo) -> Vec<PinnedShard> {
        let PinInfo { pin, node, shards } = info;
        shards
            .into_iter()
            .map(|s: PinnedShardInfo| PinnedShard {
                group,
                shard: s.shard,
                info: ShardPin {
                    pin,
                    node,
                    bytes: s.bytes,
                    keys: s.keys,
                    split_keys: s.split_keys,
                },
            })
            .collect()
    }
}

/// The async KV client. Cheap to clone; clones share the session pool,
/// and operations of all clones run concurrently (see the module docs).
#[derive(Clone)]
pub struct Client<C: RpcCaller<KvProtocol>> {
    caller: C,
    config: Arc<ClientConfig>,
    sessions: Arc<Sessions>,
    route: Route<C>,
}

/// Where a client sends its requests.
#[derive(Clone)]
enum Route<C: RpcCaller<KvProtocol>> {
    /// One group (`ClientConfig::group`, `shard`) on fixed servers: a
    /// deployment without a shard controller.
    Fixed(Target),
    /// By key: the shard of the key, the group the controller's current
    /// configuration gives it, that group's members.
    Sharded(Arc<Routes<C>>),
}

/// A group's servers and the presumed leader among them.
#[derive(Clone)]
struct Target {
    group: GroupId,
    servers: Arc<Vec<NodeId>>,
    /// Index into `servers` of the presumed leader.
    leader: Arc<AtomicU64>,
}

/// A sharded client's view of the cluster: the controller group's client,
/// the configuration last read from it, and each group's presumed leader.
struct Routes<C: RpcCaller<KvProtocol>> {
    controller: Client<C>,
    config: std::sync::Mutex<Option<Arc<ShardConfig>>>,
    targets: std::sync::Mutex<HashMap<GroupId, Target>>,
}

impl<C: RpcCaller<KvProtocol>> std::fmt::Debug for Client<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Client");
        d.field("client_id", &self.config.client_id);
        match &self.route {
            Route::Fixed(t) => d.field("servers", &t.servers),
            Route::Sharded(_) => d.field("route", &"sharded"),
        };
        d.finish()
    }
}

/// The write sessions of a client and its clones. A write takes a free
/// session for its whole run (its retries keep the session's sequence
/// number) and gives it back when it ends, however it ends; a new session
/// is opened when none is free, up to [`ClientConfig::sessions_max`], and
/// beyond that a write waits for one. Free sessions are reused last in,
/// first out, so a client that writes one at a time uses one session.
struct Sessions {
    free: std::sync::Mutex<Vec<Session>>,
    permits: tokio::sync::Semaphore,
    opened: AtomicU64,
    base: ClientId,
}

/// A session: its id and the last sequence number it used.
#[derive(Debug)]
struct Session {
    id: ClientId,
    seq: u64,
}

/// A session taken by one write; dropping it gives the session back.
struct SessionGuard<'a> {
    sessions: &'a Sessions,
    session: Option<Session>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Sessions {
    fn new(base: ClientId, max: usize) -> Sessions {
        Sessions {
            free: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(max),
            opened: AtomicU64::new(0),
            base,
        }
    }

    /// A free session, with its next sequence number taken.
    async fn take(&self) -> (SessionGuard<'_>, ClientId, u64) {
        let permit = self.permits.acquire().await.expect("never closed");
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut session = reused.unwrap_or_else(|| Session {
            id: session_id(self.base, self.opened.fetch_add(1, Ordering::Relaxed)),
            seq: 0,
        });
        session.seq += 1;
        let (id, seq) = (session.id, session.seq);
        let guard = SessionGuard {
            sessions: self,
            session: Some(session),
            _permit: permit,
        };
        (guard, id, seq)
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.sessions
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(session);
        }
    }
}

/// The id of session `n` of the client `base`: `base` itself for the
/// first, then ids mixed from both (SplitMix64), never 0. Client ids are
/// drawn at random from 64 bits, so these collide no more than they do.
pub fn session_id(base: ClientId, n: u64) -> ClientId {
    if n == 0 {
        return base;
    }
    let mut z = base ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.max(1)
}

/// What a retry loop ended with.
enum Attempted {
    Reply(Reply, Sends),
    /// A pin, by the group that served it.
    Pinned(PinInfo, GroupId),
    Failed(ClientError),
    /// No server of the group answered in [`GROUP_ROUNDS_MAX`] rounds (a
    /// sharded client then reads the configuration again: the shard may
    /// have moved off a group that is down).
    Unanswered,
}

/// Rounds over a group's servers a sharded client makes without an answer
/// before it reads the configuration again.
pub const GROUP_ROUNDS_MAX: u64 = 3;

/// The longest pause a sharded client makes between two tries of a shard
/// that answered `WrongGroup` (a move in progress): a moved shard is served
/// by its new group as soon as that group installs it, so waiting longer
/// only lengthens the time a write to a moving shard is held up. (The
/// general [`ClientConfig::backoff_max`] still caps it.)
pub const WRONG_GROUP_PAUSE_MAX: Duration = Duration::from_millis(40);

/// How a request that got a reply was sent.
#[derive(Debug, Clone, Copy)]
struct Sends {
    /// Times the request was sent (1: the reply answers the only send).
    count: u64,
    /// When it was first sent.
    first: Instant,
}

impl<C: RpcCaller<KvProtocol>> Client<C> {
    /// A client of the cluster `servers`, calling through `caller`.
    ///
    /// # Panics
    /// If `servers` is empty or `config` does not validate
    /// ([`ClientConfig::validate`]); [`Client::try_new`] returns the error.
    pub fn new(caller: C, servers: Vec<NodeId>, config: ClientConfig) -> Client<C> {
        match Client::try_new(caller, servers, config) {
            Ok(client) => client,
            Err(e) => panic!("invalid client config: {e}"),
        }
    }

    /// A client of the cluster `servers`, or why `config` cannot be used.
    ///
    /// # Panics
    /// If `servers` is empty.
    pub fn try_new(
        caller: C,
        servers: Vec<NodeId>,
        config: ClientConfig,
    ) -> Result<Client<C>, ClientConfigError> {
        assert!(!servers.is_empty(), "a client needs at least one server");
        config.validate()?;
        Ok(Client {
            caller,
            route: Route::Fixed(Target {
                group: config.group,
                servers: Arc::new(servers),
                leader: Arc::new(AtomicU64::new(0)),
            }),
            sessions: Arc::new(Sessions::new(config.client_id, config.sessions_max)),
            config: Arc::new(config),
        })
    }

    /// A client of a sharded cluster: each key goes to the group that
    /// serves its shard in the configuration the controller group (on
    /// `controller_servers`) publishes. The configuration is cached and
    /// read again whenever a group answers that it does not serve a shard;
    /// a request is retried (same session sequence number, so a write still
    /// applies once, even across a shard move) until `op_deadline`.
    /// `config.group` and `config.shard` are not used.
    ///
    /// # Panics
    /// If `controller_servers` is empty.
    pub fn sharded(
        caller: C,
        controller_servers: Vec<NodeId>,
        config: ClientConfig,
    ) -> Result<Client<C>, ClientConfigError> {
        let mut controller_config = config.clone();
        controller_config.group = CONTROLLER_GROUP;
        controller_config.shard = CONTROLLER_SHARD;
        let controller = Client::try_new(caller.clone(), controller_servers, controller_config)?;
        Ok(Client {
            caller,
            route: Route::Sharded(Arc::new(Routes {
                controller,
                config: std::sync::Mutex::new(None),
                targets: std::sync::Mutex::new(HashMap::new()),
            })),
            sessions: Arc::new(Sessions::new(config.client_id, config.sessions_max)),
            config: Arc::new(config),
        })
    }

    /// The shard configuration a sharded client routes by (read from the
    /// controller group if none is cached, or if `refresh`).
    ///
    /// # Errors
    /// [`ClientError::Refused`] for a client of fixed servers or a stored
    /// configuration that does not decode; the controller client's errors.
    pub async fn shard_config(&self, refresh: bool) -> Result<Arc<ShardConfig>, ClientError> {
        let Route::Sharded(routes) = &self.route else {
            return Err(ClientError::Refused(
                "a client of fixed servers has no shard configuration".into(),
            ));
        };
        if !refresh {
            if let Some(config) = routes
                .config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Ok(config);
            }
        }
        // Boxed: the controller's client is a client too (of fixed
        // servers, so this never recurses further).
        let stored = Box::pin(
            routes
                .controller
                .get(Bytes::from_static(CURRENT_CONFIG_KEY)),
        )
        .await?;
        let config =
            Arc::new(decode_config(&stored.value).map_err(|e| {
                ClientError::Refused(format!("the stored shard configuration: {e}"))
            })?);
        let mut cached = routes.config.lock().unwrap_or_else(|p| p.into_inner());
        // Never go back to an older configuration read concurrently.
        if cached.as_ref().is_none_or(|c| c.num <= config.num) {
            *cached = Some(config.clone());
        }
        Ok(cached.clone().unwrap_or(config))
    }

    /// Where a request on `shard` goes: the fixed target, or the group the
    /// configuration gives the shard (`None` while no group serves it).
    async fn target(&self, shard: ShardId, refresh: bool) -> Result<Option<Target>, ClientError> {
        if let Route::Fixed(target) = &self.route {
            return Ok(Some(target.clone()));
        }
        let config = self.shard_config(refresh).await?;
        Ok(config
            .group_of(shard)
            .and_then(|group| self.group_target(&config, group)))
    }

    /// Where a request on `shard` goes while the configuration after the
    /// current one is being installed, if that one moves the shard away
    /// from `from` (the group that just answered `WrongGroup`): the new
    /// group serves the shard as soon as it has installed it, before the
    /// configuration is published. `None` when no change is pending, it
    /// leaves the shard where it is, or the pending configuration cannot be
    /// read (the caller then waits and reads the current one again).
    async fn next_target(&self, shard: ShardId, from: GroupId) -> Option<Target> {
        let Route::Sharded(routes) = &self.route else {
            return None;
        };
        let current = self.shard_config(false).await.ok()?;
        let stored = Box::pin(routes.controller.get(Bytes::from_static(NEXT_CONFIG_KEY)))
            .await
            .ok()?;
        let next = decode_config(&stored.value).ok()?;
        let group = next.group_of(shard)?;
        if next.num <= current.num || group == from {
            return None;
        }
        self.group_target(&next, group)
    }

    /// Where a request to `group` goes by `config` (`None` for a client of
    /// fixed servers, or a group `config` does not know).
    fn group_target(&self, config: &ShardConfig, group: GroupId) -> Option<Target> {
        let Route::Sharded(routes) = &self.route else {
            return None;
        };
        let members = config.members(group)?;
        let mut targets = routes.targets.lock().unwrap_or_else(|p| p.into_inner());
        let target = targets
            .entry(group)
            .and_modify(|t| {
                if t.servers.iter().map(|n| n.0).ne(members.iter().copied()) {
                    *t = Target {
                        group,
                        servers: Arc::new(members.iter().copied().map(NodeId).collect()),
                        leader: Arc::new(AtomicU64::new(0)),
                    };
                }
            })
            .or_insert_with(|| Target {
                group,
                servers: Arc::new(members.iter().copied().map(NodeId).collect()),
                leader: Arc::new(AtomicU64::new(0)),
            });
        Some(target.clone())
    }

    /// The shard a request is routed by: the key's, or the fixed one.
    async fn shard_of(&self, key: &[u8]) -> Result<ShardId, ClientError> {
        match &self.route {
            Route::Fixed(_) => Ok(self.config.shard),
            Route::Sharded(_) => Ok(self.shard_config(false).await?.shard_of_key(key)),
        }
    }

    /// This client's session id.
    pub fn id(&self) -> ClientId {
        self.config.client_id
    }

    /// Reads `key` (linearizable).
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Versioned, ClientError> {
        match self.run(ClientCommand::Get { key: key.into() }).await? {
            Reply::Value(v) => Ok(v),
            Reply::NotFound => Err(ClientError::NotFound),
            other => Err(unexpected(other)),
        }
    }

    /// Writes `key` unconditionally; returns the new version.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        written(
            self.run(ClientCommand::Put {
                key: key.into(),
                value: value.into(),
            })
            .await?,
        )
    }

    /// The lab's versioned put: writes only if the key is at `version`
    /// (0: absent). Returns the new version.
    pub async fn put_if_version(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<u64, ClientError> {
        let command = ClientCommand::PutIfVersion {
            key: key.into(),
            value: value.into(),
            version,
        };
        match self.run(command).await? {
            Reply::Written { version } => Ok(version),
            Reply::VersionMismatch { current } => Err(ClientError::VersionMismatch { current }),
            Reply::NoKey => Err(ClientError::NoKey),
            other => Err(unexpected(other)),
        }
    }

    /// Appends `value` to `key` (creating it); returns the new version.
    pub async fn append(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        written(
            self.run(ClientCommand::Append {
                key: key.into(),
                value: value.into(),
            })
            .await?,
        )
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        match self.run(ClientCommand::Delete { key: key.into() }).await? {
            Reply::Deleted { existed } => Ok(existed),
            other => Err(unexpected(other)),
        }
    }

    /// Applies `batch` atomically (see [`WriteBatch`]); returns, per write,
    /// the key's new version (0 for a delete). An empty batch does nothing.
    ///
    /// # Errors
    /// [`ClientError::ConditionFailed`] (nothing written),
    /// [`ClientError::CrossShard`] (nothing sent), and those of any write.
    pub async fn write(&self, batch: WriteBatch) -> Result<Vec<u64>, ClientError> {
        let mut shard = None;
        for key in batch.keys() {
            let of_key = self.shard_of(key).await?;
            match shard {
                None => shard = Some(of_key),
                Some(first) if first != of_key => {
                    return Err(ClientError::CrossShard {
                        first,
                        other: of_key,
                    })
                }
                Some(_) => {}
            }
        }
        let Some(shard) = shard else {
            return Ok(Vec::new());
        };
        let (conditions, writes) = batch.into_parts();
        let command = ClientCommand::Batch { conditions, writes };
        match self.run_on(Some(shard), command).await? {
            Reply::BatchWritten { versions } => Ok(versions),
            Reply::ConditionFailed { index, current } => {
                Err(ClientError::ConditionFailed { index, current })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Keys in `[start, end)` (empty `end`: no bound), at most `limit`, in
    /// order. Fetched in pages (each bounded by the nodes' scan byte limit,
    /// so no reply outgrows a frame); each page is a linearizable read, the
    /// whole is not one snapshot when writes run meanwhile.
    pub async fn scan(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u64,
    ) -> Result<Vec<(Bytes, Versioned)>, ClientError> {
        let end = end.into();
        let mut start = start.into();
        let mut pairs = Vec::new();
        while (pairs.len() as u64) < limit {
            let page = self
                .scan_page(
                    start,
                    end.clone(),
                    (limit - pairs.len() as u64).min(SCAN_PAGE_PAIRS_MAX),
                )
                .await?;
            pairs.extend(page.pairs);
            match page.next {
                Some(next) => start = next,
                None => break,
            }
        }
        Ok(pairs)
    }

    /// Every key in `[start, end)` (empty `end`: no bound), in order, as a
    /// [`Scanner`] that fetches pages of [`SCAN_PAGE_PAIRS_MAX`] pairs as
    /// it goes: no cap on the range, memory of one page. Each page is a
    /// linearizable read; the whole is not one snapshot when writes run
    /// meanwhile (a pin is: [`Client::pin`]).
    pub fn scanner(&self, start: impl Into<Bytes>, end: impl Into<Bytes>) -> Scanner<C> {
        Scanner {
            client: self.clone(),
            next: Some(start.into()),
            end: end.into(),
            page: std::collections::VecDeque::new(),
        }
    }

    /// One page of keys in `[start, end)` (empty `end`: no bound): at most
    /// `limit` pairs and at most the nodes' scan byte limit, in order
    /// (linearizable), with the key to continue from if more remain.
    pub async fn scan_page(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u64,
    ) -> Result<ScanPage, ClientError> {
        let command = ClientCommand::Scan {
            start: start.into(),
            end: end.into(),
            limit,
        };
        if let Route::Fixed(_) = &self.route {
            return match self.run(command).await? {
                Reply::Pairs(page) => Ok(page),
                other => Err(unexpected(other)),
            };
        }
        // Keys are spread over the shards by hash: a page in key order is
        // the merge of one page from every shard.
        let shards = self.shard_config(false).await?.shard_count();
        let mut pages = Vec::with_capacity(shards as usize);
        for shard in 0..shards {
            match self.run_on(Some(shard), command.clone()).await? {
                Reply::Pairs(page) => pages.push(page),
                other => return Err(unexpected(other)),
            }
        }
        Ok(merge_pages(pages, limit))
    }

    /// Pins `[start, end)` (empty `end`: no bound) for reading at one point
    /// in time with [`Client::scan_pinned`], whatever is written meanwhile:
    /// one [`PinnedShard`] per shard the range may cover, in shard order (a
    /// sharded client: every shard of the current configuration, since
    /// keys are spread over shards by hash; otherwise the client's one
    /// shard). It takes ONE pin per group (per [`PIN_SHARDS_MAX`] shards of
    /// a group), covering every shard the group serves, at the group's
    /// leader (a linearizable read), held there: the shards of a group
    /// share a pin id and one point in time; the pins of different groups
    /// are taken one after the other, not at one common point.
    /// `split_bytes`: about how many bytes apart each shard's
    /// [`ShardPin::split_keys`] are (0: none; at most
    /// [`crate::protocol::pin_split_keys_max`] per shard). Release them
    /// with [`Client::unpin`] (idle ones expire on their node).
    ///
    /// A configuration that changes meanwhile (a group answers that it
    /// does not serve a shard any more) is read again, and the shards not
    /// pinned yet are pinned where it says, within the operation deadline.
    ///
    /// # Errors
    /// As for reads; a node at its pin limit refuses
    /// ([`ClientError::Refused`]). On an error the pins already taken are
    /// released.
    pub async fn pin(
        &self,
        start: Bytes,
        end: Bytes,
        split_bytes: u64,
    ) -> Result<Vec<PinnedShard>, ClientError> {
        let mut pins = Vec::new();
        match self.pin_groups(start, end, split_bytes, &mut pins).await {
            Ok(()) => {
                pins.sort_by_key(|p| p.shard);
                Ok(pins)
            }
            Err(e) => {
                // One unpin per group pin (a repeat would answer PinGone).
                pins.dedup_by_key(|p| (p.info.node, p.info.pin));
                for p in &pins {
                    // Best effort: an unreleased pin expires anyway.
                    let _ = self.unpin(p).await;
                }
                Err(e)
            }
        }
    }

    /// [`Client::pin`]'s work: pins, group by group, every shard not in
    /// `pins` yet, adding each group's shards to `pins` (grouped: a
    /// group's shards are consecutive), until all are or an error.
    async fn pin_groups(
        &self,
        start: Bytes,
        end: Bytes,
        split_bytes: u64,
        pins: &mut Vec<PinnedShard>,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.config.op_deadline;
        let mut sends = Sends {
            count: 0,
            first: Instant::now(),
        };
        let mut refresh = false;
        let mut pause = self.config.backoff_min;
        loop {
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
            // Where each shard not pinned yet goes, by group.
            let plan: Vec<(Target, Vec<ShardId>)> = match &self.route {
                Route::Fixed(_) if !pins.is_empty() => Vec::new(),
                Route::Fixed(target) => vec![(target.clone(), vec![self.config.shard])],
                Route::Sharded(_) => {
                    let config = self.shard_config(refresh).await?;
                    let mut by_group: std::collections::BTreeMap<GroupId, Vec<ShardId>> =
                        std::collections::BTreeMap::new();
                    let mut unserved = false;
                    for shard in 0..config.shard_count() {
                        if pins.iter().any(|p| p.shard == shard) {
                            continue;
                        }
                        match config.group_of(shard) {
                            Some(group) => by_group.entry(group).or_default().push(shard),
                            None => unserved = true,
                        }
                    }
                    let mut plan = Vec::with_capacity(by_group.len());
                    for (group, shards) in by_group {
                        match self.group_target(&config, group) {
                            Some(target) => plan.push((target, shards)),
                            None => unserved = true,
                        }
                    }
                    if unserved {
                        // A config being changed: no group serves a shard.
                        refresh = true;
                        tokio::time::sleep(
                            pause.min(deadline.saturating_duration_since(Instant::now())),
                        )
                        .await;
                        pause = (pause * 2).min(self.config.backoff_max);
                        continue;
                    }
                    plan
                }
            };
            if plan.is_empty() {
                return Ok(());
            }
            refresh = false;
            'groups: for (target, shards) in plan {
                for chunk in shards.chunks(PIN_SHARDS_MAX) {
                    let request = KvRequest {
                        group: target.group,
                        shard: chunk[0],
                        client: self.config.client_id,
                        seq: 0,
                        command: ClientCommand::Pin {
                            start: start.clone(),
                            end: end.clone(),
                            split_bytes,
                            shards: chunk.to_vec(),
                        },
                    };
                    let attempted = self
                        .attempt_until_deadline(request, &target, deadline, &mut sends)
                        .await;
                    match attempted {
                        Attempted::Pinned(info, group) => {
                            let answered: Vec<ShardId> =
                                info.shards.iter().map(|s| s.shard).collect();
                            let taken = PinnedShard::from_info(group, info);
                            if answered != chunk {
                                // Release it too (a bug or a version mismatch).
                                pins.extend(taken);
                                return Err(ClientError::Refused(format!(
                                    "pinned shards {answered:?}, asked {chunk:?}"
                                )));
                            }
                            pins.extend(taken);
                        }
                        // The configuration moved on (a shard left the
                        // group, or the group is down): read it again and
                        // pin the shards left where it says.
                        Attempted::Unanswered => {
                            refresh = true;
                            break 'groups;
                        }
                        Attempted::Failed(ClientError::WrongGroup)
                            if matches!(self.route, Route::Sharded(_)) =>
                        {
                            refresh = true;
                            tokio::time::sleep(
                                pause.min(deadline.saturating_duration_since(Instant::now())),
                            )
                            .await;
                            pause = (pause * 2).min(self.config.backoff_max);
                            break 'groups;
                        }
                        Attempted::Failed(e) => return Err(e),
                        Attempted::Reply(other, _) => return Err(unexpected(other)),
                    }
                }
            }
        }
    }

    /// One page of `pin`'s shard in `[start, end)` (empty `end`: the pin's
    /// end) as of the pin: at most `limit` pairs (and the node's scan
    /// limits), in order, with the key to continue from. Asks the pin's
    /// node directly, whatever its role now; `Busy` is retried until the
    /// operation deadline. Unlike other operations, pin calls from clones
    /// of a client run concurrently.
    ///
    /// # Errors
    /// [`ClientError::PinGone`] if the node no longer holds the pin;
    /// [`ClientError::Refused`] for a range outside the pinned one;
    /// [`ClientError::Timeout`] if the node did not answer in time.
    pub async fn scan_pinned(
        &self,
        pin: &PinnedShard,
        start: Bytes,
        end: Bytes,
        limit: u64,
    ) -> Result<ScanPage, ClientError> {
        let command = ClientCommand::ScanPin {
            pin: pin.info.pin,
            start,
            end,
            limit,
        };
        match self.call_pin_node(pin, command).await? {
            Reply::Pairs(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Releases `pin` on its node: the whole group pin, so every shard of
    /// `pin`'s group that shares its id too. A pin already gone counts as
    /// released: unpinning each shard of a group in turn is fine.
    pub async fn unpin(&self, pin: &PinnedShard) -> Result<(), ClientError> {
        match self
            .call_pin_node(pin, ClientCommand::Unpin { pin: pin.info.pin })
            .await
        {
            Ok(_) | Err(ClientError::PinGone) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends a `ScanPin` or `Unpin` to the pin's node until it answers,
    /// with capped backoff, within the operation deadline.
    async fn call_pin_node(
        &self,
        pin: &PinnedShard,
        command: ClientCommand,
    ) -> Result<Reply, ClientError> {
        let request = Request::Kv(KvRequest {
            group: pin.group,
            shard: pin.shard,
            client: self.config.client_id,
            seq: 0,
            command,
        });
        let deadline = Instant::now() + self.config.op_deadline;
        let mut backoff = self.config.backoff_min;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout);
            }
            let rpc_deadline = self.config.rpc_deadline.min(deadline - now);
            let result = self
                .caller
                .call_with_deadline(NodeId(pin.info.node), request.clone(), rpc_deadline)
                .await;
            match result {
                Ok(Response::Kv(KvResponse::Done(reply))) => return Ok(reply),
                // A node shutting down releases its pins.
                Ok(Response::Kv(KvResponse::PinGone | KvResponse::ShuttingDown)) => {
                    return Err(ClientError::PinGone)
                }
                Ok(Response::Kv(KvResponse::Refused { reason })) => {
                    return Err(ClientError::Refused(reason))
                }
                Ok(Response::Kv(KvResponse::Busy)) => {}
                Ok(other) => {
                    return Err(ClientError::Refused(format!(
                        "unexpected response {other:?}"
                    )))
                }
                Err(RpcError::Codec(e)) => return Err(ClientError::Refused(e)),
                // Unreachable or slow: the pin may still be there.
                Err(_) => {}
            }
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                .await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    async fn run(&self, command: ClientCommand) -> Result<Reply, ClientError> {
        self.run_on(None, command).await
    }

    /// Runs `command` on `shard`, or on its key's shard, with the leader
    /// chase, retries and exactly-once rules of the module docs. (`Pin`
    /// has its own loop, [`Client::pin`].)
    async fn run_on(
        &self,
        shard: Option<ShardId>,
        command: ClientCommand,
    ) -> Result<Reply, ClientError> {
        let read_only = command.is_read_only();
        // A read needs no session; a write holds one until it ends.
        let (_session, client, seq) = if read_only {
            (None, self.config.client_id, 0)
        } else {
            let (guard, id, seq) = self.sessions.take().await;
            (Some(guard), id, seq)
        };
        let deadline = Instant::now() + self.config.op_deadline;
        let mut sends = Sends {
            count: 0,
            first: Instant::now(),
        };
        let shard = match shard {
            Some(shard) => shard,
            None => match &command {
                ClientCommand::Get { key }
                | ClientCommand::Put { key, .. }
                | ClientCommand::PutIfVersion { key, .. }
                | ClientCommand::Append { key, .. }
                | ClientCommand::Delete { key } => self.shard_of(key).await?,
                ClientCommand::Batch { .. }
                | ClientCommand::Scan { .. }
                | ClientCommand::Pin { .. }
                | ClientCommand::ScanPin { .. }
                | ClientCommand::Unpin { .. } => self.config.shard,
            },
        };
        let mut refresh = false;
        let mut pause = self.config.backoff_min;
        let mut redirect: Option<Target> = None;
        let attempted = loop {
            if Instant::now() >= deadline {
                break Attempted::Failed(ClientError::Timeout);
            }
            let redirected = redirect.is_some();
            let target = match redirect.take() {
                Some(target) => target,
                None => match self.target(shard, refresh).await {
                    Ok(Some(target)) => target,
                    // No group serves the shard yet (a config being changed).
                    Ok(None) => {
                        refresh = true;
                        tokio::time::sleep(pause.min(deadline - Instant::now())).await;
                        pause = (pause * 2).min(self.config.backoff_max);
                        continue;
                    }
                    Err(ClientError::Timeout) => break Attempted::Failed(ClientError::Timeout),
                    Err(e) => break Attempted::Failed(e),
                },
            };
            let request = KvRequest {
                group: target.group,
                shard,
                client,
                seq,
                command: command.clone(),
            };
            match self
                .attempt_until_deadline(request, &target, deadline, &mut sends)
                .await
            {
                // The configuration moved on: read it again and retry
                // there, with the same sequence number.
                Attempted::Unanswered => refresh = true,
                Attempted::Failed(ClientError::WrongGroup)
                    if matches!(self.route, Route::Sharded(_)) =>
                {
                    // The shard is moving (or has moved): its new group
                    // serves it as soon as it installs it, before the new
                    // configuration is published, so try the group the
                    // configuration being installed names first.
                    if !redirected {
                        redirect = self.next_target(shard, target.group).await;
                        if redirect.is_some() {
                            continue;
                        }
                    }
                    refresh = true;
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                    pause = (pause * 2)
                        .min(self.config.backoff_max)
                        .min(WRONG_GROUP_PAUSE_MAX);
                }
                other => break other,
            }
        };
        match attempted {
            // Retries that outlasted a quarter of a session may have met a
            // re-execution of an earlier send (see the module docs).
            Attempted::Reply(_, sends) if !read_only && self.outlasted_session(sends) => {
                Err(ClientError::Maybe)
            }
            Attempted::Reply(Reply::Rejected { reason }, _) => Err(ClientError::Refused(reason)),
            Attempted::Reply(reply, _) => Ok(reply),
            Attempted::Pinned(info, _) => {
                Err(ClientError::Refused(format!("unexpected pin {info:?}")))
            }
            Attempted::Failed(ClientError::Timeout) | Attempted::Unanswered if !read_only => {
                Err(ClientError::Maybe)
            }
            Attempted::Unanswered => Err(ClientError::Timeout),
            Attempted::Failed(e) => Err(e),
        }
    }

    /// Whether a write's retries lasted long enough that its session might
    /// have expired in between (see the module docs).
    fn outlasted_session(&self, sends: Sends) -> bool {
        sends.count > 1
            && sends.first.elapsed() >= Duration::from_millis(self.config.session_idle_ms / 4)
    }

    /// Sends `request` to the presumed leader, then the others in turn,
    /// with capped exponential backoff after each full round, until an
    /// answer or the deadline. A timeout is reported as `Timeout`; the
    /// caller turns it into `Maybe` for writes.
    async fn attempt_until_deadline(
        &self,
        request: KvRequest,
        target: &Target,
        deadline: Instant,
        sends: &mut Sends,
    ) -> Attempted {
        let n = target.servers.len() as u64;
        let mut backoff = self.config.backoff_min;
        let mut tried_in_round = 0u64;
        let mut rounds = 0u64;
        let rounds_max = match self.route {
            Route::Fixed(_) => u64::MAX,
            Route::Sharded(_) => GROUP_ROUNDS_MAX,
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Attempted::Failed(ClientError::Timeout);
            }
            let index = target.leader.load(Ordering::Relaxed) % n;
            let server = target.servers[index as usize];
            let rpc_deadline = self.config.rpc_deadline.min(deadline - now);
            if sends.count == 0 {
                sends.first = now;
            }
            sends.count += 1;
            let result = self
                .caller
                .call_with_deadline(server, Request::Kv(request.clone()), rpc_deadline)
                .await
                .map(|response| match response {
                    Response::Kv(kv) => kv,
                    other => KvResponse::Refused {
                        reason: format!("unexpected response {other:?}"),
                    },
                });
            let next = match result {
                // A rejection is a reply like any other: the caller first
                // checks whether retries outlasted the session.
                Ok(KvResponse::Done(reply)) => return Attempted::Reply(reply, *sends),
                Ok(KvResponse::Pinned(info)) => return Attempted::Pinned(info, request.group),
                Ok(KvResponse::PinGone) => return Attempted::Failed(ClientError::PinGone),
                Ok(KvResponse::WrongGroup) => return Attempted::Failed(ClientError::WrongGroup),
                // A node that dropped the group after the shard moved
                // away: the configuration moved on.
                Ok(KvResponse::UnknownGroup) if matches!(self.route, Route::Sharded(_)) => {
                    return Attempted::Failed(ClientError::WrongGroup)
                }
                Ok(KvResponse::UnknownGroup) => {
                    return Attempted::Failed(ClientError::Refused(format!(
                        "node {} does not host group {}",
                        server.0, request.group
                    )))
                }
                Ok(KvResponse::Shard(reply)) => {
                    return Attempted::Failed(ClientError::Refused(format!(
                        "unexpected shard step reply {reply:?}"
                    )))
                }
                Ok(KvResponse::Member(reply)) => {
                    return Attempted::Failed(ClientError::Refused(format!(
                        "unexpected membership reply {reply:?}"
                    )))
                }
                Ok(KvResponse::Refused { reason }) => {
                    return Attempted::Failed(ClientError::Refused(reason))
                }
                Ok(KvResponse::NotLeader { leader_hint }) => target
                    .servers
                    .iter()
                    .position(|s| s.0 == leader_hint && leader_hint != 0 && s.0 != server.0),
                Ok(KvResponse::ShuttingDown) | Ok(KvResponse::Busy) => None,
                Err(RpcError::Codec(e)) => return Attempted::Failed(ClientError::Refused(e)),
                Err(_) => None,
            };
            match next {
                Some(hinted) => {
                    target.leader.store(hinted as u64, Ordering::Relaxed);
                    tried_in_round += 1;
                }
                None => {
                    target.leader.store((index + 1) % n, Ordering::Relaxed);
                    tried_in_round += 1;
                }
            }
            if tried_in_round >= n {
                tried_in_round = 0;
                rounds += 1;
                let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(self.config.backoff_max);
                if rounds >= rounds_max {
                    return Attempted::Unanswered;
                }
            }
        }
    }
}

/// The pairs of a range in key order, a page at a time; see
/// [`Client::scanner`].
pub struct Scanner<C: RpcCaller<KvProtocol>> {
    client: Client<C>,
    /// Where the next page starts; `None` once the range is exhausted.
    next: Option<Bytes>,
    end: Bytes,
    page: std::collections::VecDeque<(Bytes, Versioned)>,
}

impl<C: RpcCaller<KvProtocol>> Scanner<C> {
    /// The next pair, or `None` at the end of the range. After an error
    /// the same call may be made again: it retries the same page.
    pub async fn next(&mut self) -> Result<Option<(Bytes, Versioned)>, ClientError> {
        loop {
            if let Some(pair) = self.page.pop_front() {
                return Ok(Some(pair));
            }
            let Some(start) = self.next.clone() else {
                return Ok(None);
            };
            let page = self
                .client
                .scan_page(start, self.end.clone(), SCAN_PAGE_PAIRS_MAX)
                .await?;
            self.next = page.next;
            self.page.extend(page.pairs);
        }
    }
}

fn written(reply: Reply) -> Result<u64, ClientError> {
    match reply {
        Reply::Written { version } => Ok(version),
        other => Err(unexpected(other)),
    }
}

/// Why a status or admin call to one node failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The node refused (not the admin client, fault injection off, ...).
    #[error("refused: {0}")]
    Denied(Denied),
    /// The node refused to host or drop a group; nothing changed.
    #[error("group refused: {0}")]
    GroupRefused(GroupRefusal),
    /// The node refused a backup step.
    #[error("backup refused: {0}")]
    BackupRefused(BackupRefusal),
    /// The node could not be reached or did not answer in time.
    #[error("rpc: {0}")]
    Rpc(RpcError),
    /// The node answered something else (a bug or a version mismatch).
    #[error("unexpected response {0}")]
    Unexpected(String),
}

/// Why a membership change ([`Client::change_members`]) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    /// The leader refused the change; nothing was proposed.
    #[error("refused: {0}")]
    Refused(String),
    /// A node refused the caller (not the admin client).
    #[error("refused: {0}")]
    Denied(Denied),
    /// No leader carried the change out within the operation deadline;
    /// it may still be applied. The last answer is given.
    #[error("no leader applied the change in time (last answer: {0})")]
    Unavailable(String),
}

impl<C: RpcCaller<KvProtocol>> Client<C> {
    /// Admin: has `group`'s leader, found among `nodes` (following leader
    /// hints), carry out one membership change, and returns the membership
    /// once the change is applied there: (voters, learners). A change
    /// refused as pending (an earlier one, or a new leader's first entry,
    /// not applied yet) or a learner not caught up yet is retried until
    /// the operation deadline. Needs the admin client's certificate.
    pub async fn change_members(
        &self,
        group: GroupId,
        change: MemberChange,
        nodes: &[NodeId],
    ) -> Result<(Vec<u64>, Vec<u64>), MemberError> {
        let deadline = Instant::now() + self.config.op_deadline;
        let mut backoff = self.config.backoff_min;
        let mut next = 0;
        let mut hint: Option<NodeId> = None;
        let mut last = String::from("no node tried");
        while Instant::now() < deadline {
            let node = match hint.take() {
                Some(h) => h,
                None if nodes.is_empty() => break,
                None => {
                    next += 1;
                    nodes[(next - 1) % nodes.len()]
                }
            };
            let request = Request::Member(MemberRequest {
                group,
                change: change.clone(),
            });
            let rpc_deadline = self.config.rpc_deadline.max(self.config.op_deadline / 4);
            match self
                .caller
                .call_with_deadline(node, request, rpc_deadline)
                .await
            {
                Ok(Response::Kv(KvResponse::Member(MemberReply::Done { voters, learners }))) => {
                    return Ok((voters, learners))
                }
                Ok(Response::Kv(KvResponse::Member(MemberReply::Refused { reason }))) => {
                    return Err(MemberError::Refused(reason))
                }
                Ok(Response::Denied(d)) => return Err(MemberError::Denied(d)),
                Ok(Response::Kv(KvResponse::NotLeader { leader_hint })) if leader_hint != 0 => {
                    hint = Some(NodeId(leader_hint));
                    last = format!("node {node}: not the leader");
                    continue;
                }
                Ok(other) => last = format!("node {node}: {other:?}"),
                Err(e) => last = format!("node {node}: {e}"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        Err(MemberError::Unavailable(last))
    }
}

/// Status and admin calls: one attempt at one node, no retries (the
/// caller picks the node; these are not replicated operations).
impl<C: RpcCaller<KvProtocol>> Client<C> {
    async fn call_node(&self, node: NodeId, request: Request) -> Result<Response, AdminError> {
        match self
            .caller
            .call_with_deadline(node, request, self.config.rpc_deadline)
            .await
        {
            Ok(Response::Denied(denied)) => Err(AdminError::Denied(denied)),
            Ok(Response::GroupRefused(refusal)) => Err(AdminError::GroupRefused(refusal)),
            Ok(Response::BackupRefused(refusal)) => Err(AdminError::BackupRefused(refusal)),
            Ok(response) => Ok(response),
            Err(e) => Err(AdminError::Rpc(e)),
        }
    }

    /// Admin: asks `node`, the leader of `group`, to export the group for
    /// a backup, waiting up to `deadline` (an export reads the whole
    /// group); the export's id and its files. See `node::backups`.
    pub async fn backup_export(
        &self,
        node: NodeId,
        group: GroupId,
        deadline: Duration,
    ) -> Result<(u64, shoal_engine::GroupBackup), AdminError> {
        let request = Request::Backup(BackupRequest::Export { group });
        match self
            .caller
            .call_with_deadline(node, request, deadline)
            .await
        {
            Ok(Response::BackupExported { id, backup }) => Ok((id, *backup)),
            Ok(Response::Denied(denied)) => Err(AdminError::Denied(denied)),
            Ok(Response::BackupRefused(refusal)) => Err(AdminError::BackupRefused(refusal)),
            Ok(other) => Err(AdminError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(AdminError::Rpc(e)),
        }
    }

    /// Admin: bytes of `file` of `node`'s export `id` from `offset` (at
    /// most [`crate::protocol::BACKUP_CHUNK_BYTES_MAX`]; empty at the end).
    pub async fn backup_read(
        &self,
        node: NodeId,
        id: u64,
        file: &str,
        offset: u64,
    ) -> Result<Bytes, AdminError> {
        let request = Request::Backup(BackupRequest::Read {
            id,
            file: file.to_string(),
            offset,
        });
        match self.call_node(node, request).await? {
            Response::BackupChunk(bytes) => Ok(bytes),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: asks `node`, the leader of `group`, to fence the group's
    /// writes for at most `hold_ms` and export it (see
    /// [`BackupRequest::FencedExport`]); answers once the export's view is
    /// taken: the export's id and the applied index it holds.
    pub async fn backup_fenced_export(
        &self,
        node: NodeId,
        group: GroupId,
        hold_ms: u64,
    ) -> Result<(u64, u64), AdminError> {
        let request = Request::Backup(BackupRequest::FencedExport { group, hold_ms });
        match self.call_node(node, request).await? {
            Response::BackupPinned { id, applied_index } => Ok((id, applied_index)),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: ends the fence of `node`'s export `id` on `group`; whether it
    /// held from the export's view on (nothing written since).
    pub async fn backup_unfence(
        &self,
        node: NodeId,
        group: GroupId,
        id: u64,
    ) -> Result<bool, AdminError> {
        let request = Request::Backup(BackupRequest::Unfence { group, id });
        match self.call_node(node, request).await? {
            Response::BackupUnfenced { held } => Ok(held),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: the contents of `node`'s export `id` once written
    /// ([`BackupRefusal::Running`] until then).
    pub async fn backup_files(
        &self,
        node: NodeId,
        id: u64,
    ) -> Result<shoal_engine::GroupBackup, AdminError> {
        let request = Request::Backup(BackupRequest::Files { id });
        match self.call_node(node, request).await? {
            Response::BackupExported { backup, .. } => Ok(*backup),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: how much of each shard `node`'s replica of `group` holds
    /// (shards holding no key are absent).
    pub async fn shard_sizes(
        &self,
        node: NodeId,
        group: GroupId,
    ) -> Result<Vec<(shoal_engine::ShardId, shoal_engine::ShardSize)>, AdminError> {
        match self.call_node(node, Request::ShardSizes { group }).await? {
            Response::ShardSizes(sizes) => Ok(sizes),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: makes `node`, which a membership change removed from
    /// `group`, drop its replica (see [`Request::DropRemoved`]).
    pub async fn drop_removed(&self, node: NodeId, group: GroupId) -> Result<(), AdminError> {
        match self.call_node(node, Request::DropRemoved { group }).await? {
            Response::AdminDone => Ok(()),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: releases `node`'s export `id` (its files are removed).
    pub async fn backup_release(&self, node: NodeId, id: u64) -> Result<(), AdminError> {
        match self
            .call_node(node, Request::Backup(BackupRequest::Release { id }))
            .await?
        {
            Response::AdminDone => Ok(()),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Node `node`'s view of itself and its groups (any client may ask).
    pub async fn node_status(&self, node: NodeId) -> Result<NodeReport, AdminError> {
        match self.call_node(node, Request::Status).await? {
            Response::Status(report) => Ok(report),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: makes `node` drop all traffic with `blocked` (replacing its
    /// previous filter). Needs the admin client's certificate and a node
    /// with fault injection enabled.
    pub async fn set_fault_filter(
        &self,
        node: NodeId,
        blocked: Vec<NodeId>,
    ) -> Result<(), AdminError> {
        match self
            .call_node(node, Request::SetFaultFilter { blocked })
            .await?
        {
            Response::AdminDone => Ok(()),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: clears `node`'s fault filter (same conditions as
    /// [`Client::set_fault_filter`]).
    pub async fn clear_fault_filter(&self, node: NodeId) -> Result<(), AdminError> {
        match self.call_node(node, Request::ClearFaultFilter).await? {
            Response::AdminDone => Ok(()),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: makes `node` host a replica of `group` with `voters` (see
    /// [`Request::HostGroup`]). Needs the admin client's certificate.
    pub async fn host_group(
        &self,
        node: NodeId,
        group: GroupId,
        voters: Vec<u64>,
    ) -> Result<(), AdminError> {
        match self
            .call_node(node, Request::HostGroup { group, voters })
            .await?
        {
            Response::AdminDone => Ok(()),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Admin: makes `node` stop hosting `group` and delete its replica (see
    /// [`Request::DropGroup`]). Needs the admin client's certificate.
    pub async fn drop_group(&self, node: NodeId, group: GroupId) -> Result<(), AdminError> {
        match self.call_node(node, Request::DropGroup { group }).await? {
            Response::AdminDone => Ok(()),
            other => Err(AdminError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// The first `limit` pairs, in key order, of pages from disjoint shards
/// over the same range, and where to continue: every pair not returned
/// (cut from a merged page, or still behind a shard's own continuation)
/// is at or after it.
fn merge_pages(pages: Vec<ScanPage>, limit: u64) -> ScanPage {
    // A shard's unread keys start at its continuation, so the merge is
    // complete only below the smallest one.
    let horizon = pages.iter().filter_map(|p| p.next.clone()).min();
    let mut pairs: Vec<(Bytes, Versioned)> = pages
        .into_iter()
        .flat_map(|p| p.pairs)
        .filter(|(k, _)| horizon.as_ref().is_none_or(|h| k < h))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next = if pairs.len() > limit {
        Some(pairs[limit].0.clone())
    } else {
        horizon
    };
    pairs.truncate(limit);
    ScanPage { pairs, next }
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Refused(format!("unexpected reply {reply:?}"))
}

/// A blocking wrapper around [`Client`] for synchronous callers: each call
/// runs the async operation to completion on the wrapper's own runtime.
/// Do not use it from inside an async context.
pub struct BlockingClient<C: RpcCaller<KvProtocol>> {
    runtime: tokio::runtime::Runtime,
    client: Client<C>,
}

impl<C: RpcCaller<KvProtocol>> std::fmt::Debug for BlockingClient<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("client", &self.client)
            .finish()
    }
}

impl<C: RpcCaller<KvProtocol>> BlockingClient<C> {
    /// Wraps `client`; its calls run on `runtime` (which must be able to
    /// drive the client's transport).
    pub fn new(runtime: tokio::runtime::Runtime, client: Client<C>) -> Self {
        BlockingClient { runtime, client }
    }

    /// The async client inside.
    pub fn client(&self) -> &Client<C> {
        &self.client
    }

    /// Runs any future on this wrapper's runtime (e.g. closing the
    /// transport underneath).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// See [`Client::get`].
    pub fn get(&self, key: impl Into<Bytes>) -> Result<Versioned, ClientError> {
        self.runtime.block_on(self.client.get(key))
    }

    /// See [`Client::put`].
    pub fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<u64, ClientError> {
        self.runtime.block_on(self.client.put(key, value))
    }

    /// See [`Client::put_if_version`].
    pub fn put_if_version(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<u64, ClientError> {
        self.runtime
            .block_on(self.client.put_if_version(key, value, version))
    }

    /// See [`Client::append`].
    pub fn append(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<u64, ClientError> {
        self.runtime.block_on(self.client.append(key, value))
    }

    /// See [`Client::delete`].
    pub fn delete(&self, key: impl Into<Bytes>) -> Result<bool, ClientError> {
        self.runtime.block_on(self.client.delete(key))
    }

    /// See [`Client::write`].
    pub fn write(&self, batch: WriteBatch) -> Result<Vec<u64>, ClientError> {
        self.runtime.block_on(self.client.write(batch))
    }

    /// See [`Client::node_status`].
    pub fn node_status(&self, node: NodeId) -> Result<NodeReport, AdminError> {
        self.runtime.block_on(self.client.node_status(node))
    }

    /// See [`Client::set_fault_filter`].
    pub fn set_fault_filter(&self, node: NodeId, blocked: Vec<NodeId>) -> Result<(), AdminError> {
        self.runtime
            .block_on(self.client.set_fault_filter(node, blocked))
    }

    /// See [`Client::clear_fault_filter`].
    pub fn clear_fault_filter(&self, node: NodeId) -> Result<(), AdminError> {
        self.runtime.block_on(self.client.clear_fault_filter(node))
    }

    /// See [`Client::scan`].
    pub fn scan(
        &self,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
        limit: u64,
    ) -> Result<Vec<(Bytes, Versioned)>, ClientError> {
        self.runtime.block_on(self.client.scan(start, end, limit))
    }

    /// See [`Client::pin`].
    pub fn pin(
        &self,
        start: Bytes,
        end: Bytes,
        split_bytes: u64,
    ) -> Result<Vec<PinnedShard>, ClientError> {
        self.runtime
            .block_on(self.client.pin(start, end, split_bytes))
    }

    /// See [`Client::scan_pinned`].
    pub fn scan_pinned(
        &self,
        pin: &PinnedShard,
        start: Bytes,
        end: Bytes,
        limit: u64,
    ) -> Result<ScanPage, ClientError> {
        self.runtime
            .block_on(self.client.scan_pinned(pin, start, end, limit))
    }

    /// See [`Client::unpin`].
    pub fn unpin(&self, pin: &PinnedShard) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.unpin(pin))
    }
}
