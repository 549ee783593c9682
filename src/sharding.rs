//! `shoal shard`: operating a sharded cluster as the admin client — create
//! groups on chosen nodes, post the first configuration, have groups join
//! or leave, move one shard, rebalance, and print where every shard is.
//!
//! A sharded cluster's nodes run with `--controller 1,2,3` (the members of
//! the controller group, which stores the configurations). Replica groups
//! are created on running nodes by [`Admin::host_group`] and configured by
//! the [`Controller`]; every command here is idempotent, so re-running one
//! that was interrupted finishes it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use shoal_consensus::Role;
use shoal_engine::{GroupId, ShardId, ShardSize};
use shoal_net::quic::QuicClient;
use shoal_net::{Limits, NodeId, Peer, ADMIN_CLIENT_NAME};
use shoal_shard::client::AdminError;
use shoal_shard::controller::{
    join, leave, move_shard, rebalance, set_members, ChangeOutcome, Controller, ControllerConfig,
    GroupStore, InitOutcome, RpcMover, ShardConfig,
};
use shoal_shard::node::{CONTROLLER_GROUP, CONTROLLER_SHARD};
use shoal_shard::protocol::{GroupRefusal, KvProtocol};
use shoal_shard::{Client, ClientConfig};

use crate::cluster::fresh_client_id;

type Ctrl = Controller<GroupStore<QuicClient<KvProtocol>>, RpcMover<QuicClient<KvProtocol>>>;

/// How long a replica that is still catching up may keep refusing to be
/// dropped.
pub const DROP_WAIT_MS_MAX: u64 = 30_000;

/// How long one controller step (a store operation or one move step) may
/// take, retries included.
pub const STEP_DEADLINE_MS_DEFAULT: u64 = 60_000;

/// The admin side of a sharded cluster.
pub struct Admin {
    quic: QuicClient<KvProtocol>,
    /// Single calls to named nodes (host and drop groups, status).
    nodes: Client<QuicClient<KvProtocol>>,
    controller: Ctrl,
    members: Vec<(u64, SocketAddr)>,
}

/// Parses `G=1,2,3`: a group and its member nodes.
pub fn parse_group(spec: &str) -> Result<(GroupId, Vec<u64>)> {
    let (group, nodes) = spec
        .split_once('=')
        .with_context(|| format!("{spec:?}: expected GROUP=NODE,NODE,..."))?;
    let group: GroupId = group
        .trim()
        .parse()
        .with_context(|| format!("group id {group:?}"))?;
    let nodes = nodes
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<u64>()
                .with_context(|| format!("node id {n:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((group, nodes))
}

/// One shard's line in `shoal shard status`.
#[derive(Debug, Serialize)]
pub struct ShardLine {
    /// The shard.
    pub shard: ShardId,
    /// Its group in the current configuration (0: none).
    pub group: GroupId,
    /// The group's leader as its members report it (0: unknown).
    pub leader: u64,
    /// Keys of the shard the group's leader holds (`None`: it did not
    /// answer).
    pub keys: Option<u64>,
    /// Bytes of those keys and their records, as stored before
    /// compression (`None`: the leader did not answer).
    pub bytes: Option<u64>,
}

impl Admin {
    /// An admin client of the cluster `members` (every node), whose
    /// controller group runs on `controller` nodes, with the `admin`
    /// certificate from `tls_dir`.
    pub fn connect(
        members: &[(u64, SocketAddr)],
        controller: &[u64],
        tls_dir: &Path,
        op_deadline: Duration,
    ) -> Result<Admin> {
        if controller.is_empty() {
            bail!("--controller must name the controller group's nodes");
        }
        let identity = crate::certs::load(tls_dir, &Peer::Client(ADMIN_CLIENT_NAME.into()))?;
        let addresses = members.iter().map(|&(id, a)| (NodeId(id), a)).collect();
        let quic = QuicClient::new(&identity, addresses, Limits::default())?;
        let mut config = ClientConfig::new(fresh_client_id());
        config.op_deadline = op_deadline;
        let nodes = Client::try_new(
            quic.clone(),
            members.iter().map(|&(id, _)| NodeId(id)).collect(),
            config.clone(),
        )?;
        config.group = CONTROLLER_GROUP;
        config.shard = CONTROLLER_SHARD;
        let store = GroupStore::new(Client::try_new(
            quic.clone(),
            controller.iter().copied().map(NodeId).collect(),
            config,
        )?);
        // A freeze tells its source where the destination's nodes are, as
        // this client reaches them: a member added to a group since the
        // nodes started is in no node's peer list.
        let mover = RpcMover::new(quic.clone(), Duration::from_secs(2))
            .with_addrs(members.iter().map(|&(id, a)| (id, a.to_string())).collect());
        let controller = Controller::new(
            store,
            mover,
            ControllerConfig {
                step_deadline: Duration::from_millis(STEP_DEADLINE_MS_DEFAULT),
                ..Default::default()
            },
        )?;
        Ok(Admin {
            quic,
            nodes,
            controller,
            members: members.to_vec(),
        })
    }

    /// Makes every node of `voters` host a replica of `group`.
    pub async fn host_group(&self, group: GroupId, voters: &[u64]) -> Result<()> {
        for &node in voters {
            self.nodes
                .host_group(NodeId(node), group, voters.to_vec())
                .await
                .with_context(|| format!("node {node}: hosting group {group}"))?;
        }
        Ok(())
    }

    /// Makes every node of `voters` drop its replica of `group` (which
    /// must hold no shards any more). First waits (up to
    /// [`DROP_WAIT_MS_MAX`]) until every replica applied everything the
    /// group committed — the deletes that moved its last shards away — and
    /// everything in its own log, because once a majority has dropped, a
    /// lagging replica could never catch up, nor settle an uncommitted
    /// tail (the node refuses to drop a replica with one). A replica that still refuses is asked again until then.
    pub async fn drop_group(&self, group: GroupId, voters: &[u64]) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(DROP_WAIT_MS_MAX);
        // The highest commit index any replica reported, ever: it only
        // grows, so a replica that reaches it applied every delete.
        let mut target = 0;
        loop {
            let mut applied = Vec::with_capacity(voters.len());
            for &node in voters {
                let report = self.nodes.node_status(NodeId(node)).await;
                let g = report
                    .ok()
                    .and_then(|r| r.groups.into_iter().find(|g| g.group == group));
                if let Some(g) = &g {
                    target = target.max(g.commit);
                }
                applied.push((node, g.map(|g| (g.applied, g.last))));
            }
            // Behind: not reporting, short of the target, or holding log
            // entries it has not applied (say a killed leader's last
            // proposal). Such a tail is settled only while the group still
            // has a majority, so it must be settled before any replica is
            // dropped (a replica refuses the drop until it is).
            let behind: Vec<u64> = applied
                .into_iter()
                .filter(|(_, a)| a.is_none_or(|(applied, last)| applied < target || applied < last))
                .map(|(node, _)| node)
                .collect();
            if behind.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("group {group}: replicas {behind:?} did not catch up; drop it later");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for &node in voters {
            loop {
                match self.nodes.drop_group(NodeId(node), group).await {
                    Ok(()) => break,
                    // A node that died with the request (or its reply)
                    // is asked again once back: a repeated drop is done.
                    Err(
                        AdminError::GroupRefused(
                            GroupRefusal::HoldsShards { .. } | GroupRefusal::CatchingUp { .. },
                        )
                        | AdminError::Rpc(_),
                    ) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("node {node}: dropping group {group}"))
                    }
                }
            }
        }
        Ok(())
    }

    /// The current configuration.
    pub async fn query(&self) -> Result<ShardConfig> {
        Ok(self.controller.query().await?)
    }

    /// Finishes a change a controller left half-done (any command does
    /// this first).
    async fn recover(&self) -> Result<()> {
        self.controller.init_controller().await?;
        Ok(())
    }

    /// The first configuration: `shards` shards, all on `group`.
    pub async fn init(&self, shards: u32, group: GroupId, voters: &[u64]) -> Result<ShardConfig> {
        self.host_group(group, voters).await?;
        let first = join(
            &ShardConfig::initial(shards)?,
            BTreeMap::from([(group, voters.to_vec())]),
        )?;
        match self.controller.init_config(first.clone()).await? {
            InitOutcome::Posted => Ok(first),
            InitOutcome::Exists { num } => {
                bail!("the cluster has a configuration already (number {num})")
            }
        }
    }

    async fn change(&self, next: ShardConfig) -> Result<ShardConfig> {
        match self.controller.change_config_to(next.clone()).await? {
            ChangeOutcome::Changed => Ok(next),
            ChangeOutcome::Lost => bail!(
                "another controller is changing the configuration; run `shoal shard status` and retry"
            ),
            ChangeOutcome::Superseded { num } => {
                bail!("a newer configuration ({num}) was posted meanwhile; retry")
            }
        }
    }

    /// `group` (on `voters`, which start hosting it) joins, and shards are
    /// rebalanced onto it.
    pub async fn join(&self, group: GroupId, voters: &[u64]) -> Result<ShardConfig> {
        self.recover().await?;
        self.host_group(group, voters).await?;
        let current = self.query().await?;
        let next = join(&current, BTreeMap::from([(group, voters.to_vec())]))?;
        self.change(next).await
    }

    /// `group` leaves: its shards move to the others, then its members
    /// drop their replicas.
    pub async fn leave(&self, group: GroupId) -> Result<ShardConfig> {
        self.recover().await?;
        let current = self.query().await?;
        let Some(voters) = current.members(group).map(<[u64]>::to_vec) else {
            // Left already: finish a leave that was cut short after the
            // change, dropping the replicas any node still hosts.
            let hosts = self.hosts_of(group).await;
            if hosts.is_empty() {
                bail!(
                    "group {group} is not in configuration {} and no node hosts it",
                    current.num
                );
            }
            self.drop_group(group, &hosts).await?;
            return Ok(current);
        };
        let next = self.change(leave(&current, &[group])?).await?;
        self.drop_group(group, &voters).await?;
        Ok(next)
    }

    /// Moves `shard` to `group`.
    pub async fn move_shard(&self, shard: ShardId, group: GroupId) -> Result<ShardConfig> {
        self.recover().await?;
        let current = self.query().await?;
        self.change(move_shard(&current, shard, group)?).await
    }

    /// Writes `group`'s replica-group membership (`members`: voters and
    /// learners) into the configuration, if it differs, so that clients,
    /// moves and leaves address the group's nodes as they are. `None` if
    /// the configuration has no such group (hosted, not joined yet).
    pub async fn set_members(
        &self,
        group: GroupId,
        members: &[u64],
    ) -> Result<Option<ShardConfig>> {
        self.recover().await?;
        let current = self.query().await?;
        let Some(listed) = current.members(group) else {
            return Ok(None);
        };
        let mut wanted = members.to_vec();
        wanted.sort_unstable();
        let mut listed = listed.to_vec();
        listed.sort_unstable();
        if listed == wanted {
            return Ok(Some(current));
        }
        Ok(Some(
            self.change(set_members(&current, group, wanted)?).await?,
        ))
    }

    /// Evens the shards out over the groups, moving as few as possible.
    pub async fn rebalance(&self) -> Result<ShardConfig> {
        self.recover().await?;
        let current = self.query().await?;
        if rebalance(&current)?.shards == current.shards {
            return Ok(current);
        }
        self.change(rebalance(&current)?).await
    }

    /// The nodes (of those this admin was given) that host a replica of
    /// `group`, as they report it.
    async fn hosts_of(&self, group: GroupId) -> Vec<u64> {
        let mut hosts = Vec::new();
        for &(node, _) in &self.members {
            if let Ok(report) = self.nodes.node_status(NodeId(node)).await {
                if report.groups.iter().any(|g| g.group == group) {
                    hosts.push(node);
                }
            }
        }
        hosts
    }

    /// Each group's leader as its members report it (groups none of whose
    /// members answered are absent).
    pub async fn group_leaders(&self, config: &ShardConfig) -> BTreeMap<GroupId, u64> {
        let mut leaders: BTreeMap<GroupId, u64> = BTreeMap::new();
        for (&group, voters) in &config.groups {
            for &node in voters {
                let Ok(report) = self.nodes.node_status(NodeId(node)).await else {
                    continue;
                };
                if let Some(g) = report.groups.iter().find(|g| g.group == group) {
                    if g.role == Role::Leader || g.leader != 0 {
                        leaders.insert(
                            group,
                            if g.role == Role::Leader {
                                node
                            } else {
                                g.leader
                            },
                        );
                        break;
                    }
                }
            }
        }
        leaders
    }

    /// Each shard with its group, that group's leader, and its size as the
    /// leader holds it.
    pub async fn shard_lines(&self, config: &ShardConfig) -> Vec<ShardLine> {
        let leaders = self.group_leaders(config).await;
        // Each group's leader counts its shards (off its event loop).
        let mut sizes: BTreeMap<(GroupId, ShardId), ShardSize> = BTreeMap::new();
        let mut counted: std::collections::BTreeSet<GroupId> = Default::default();
        for (&group, &leader) in &leaders {
            match self.nodes.shard_sizes(NodeId(leader), group).await {
                Ok(found) => {
                    counted.insert(group);
                    sizes.extend(
                        found
                            .into_iter()
                            .map(|(shard, size)| ((group, shard), size)),
                    );
                }
                Err(e) => tracing::debug!(group, leader, error = %e, "no shard sizes"),
            }
        }
        (0..config.shard_count())
            .map(|shard| {
                let group = config.group_of(shard).unwrap_or(0);
                let size = counted
                    .contains(&group)
                    .then(|| sizes.get(&(group, shard)).copied().unwrap_or_default());
                ShardLine {
                    shard,
                    group,
                    leader: leaders.get(&group).copied().unwrap_or(0),
                    keys: size.map(|s| s.keys),
                    bytes: size.map(|s| s.bytes),
                }
            })
            .collect()
    }

    /// The nodes this admin was given.
    pub fn members(&self) -> &[(u64, SocketAddr)] {
        &self.members
    }

    /// Closes the connections.
    pub async fn close(&self) {
        self.quic.close().await;
    }
}
