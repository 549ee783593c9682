//! Limits and endpoint configuration. Every limit carries its unit in its name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConfigError;
use crate::NodeId;

/// ALPN protocol id; the version of the wire format. A peer offering anything
/// else fails the TLS handshake.
pub const ALPN: &[u8] = b"shoal/8";

/// Hard upper bound for `max_frame_bytes` (64 MiB).
pub const FRAME_BYTES_CEILING: usize = 64 << 20;

/// Limits shared by the QUIC and the in-memory transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (length prefix excluded) accepted or sent. A peer
    /// announcing a bigger one is disconnected.
    pub max_frame_bytes: usize,
    /// Bounded outbound queue per peer. When full, `send` drops the **oldest**
    /// queued message (newer Raft messages supersede older ones) and counts it
    /// in `Stats::messages_dropped_overflow`.
    pub peer_queue_messages_max: usize,
    /// Messages are packed into one frame until it reaches this size.
    pub batch_bytes_max: usize,
    /// Capacity of each inbox channel (messages, RPCs, files). A full inbox
    /// back-pressures the sending peer (QUIC) or drops (in-memory, counted).
    pub inbox_capacity: usize,
    /// Concurrent RPC and bulk streams a peer may open on one connection.
    pub rpc_concurrency_max: u32,
    /// Default RPC deadline.
    pub rpc_deadline_ms: u64,
    /// Bulk stream chunk size; each chunk carries its own CRC32.
    pub chunk_bytes: usize,
    /// Largest file accepted by a bulk transfer.
    pub bulk_file_bytes_max: u64,
    /// Most bytes per second this node sends in bulk files, all transfers
    /// together (0: no limit). Bulk transfers (shard moves, snapshots,
    /// MapReduce runs) then leave the CPU and the network to the client
    /// traffic, as TiKV's snapshot rate limit does.
    pub bulk_send_bytes_per_sec_max: u64,
    /// Idle time after which a transfer or a handshake is given up.
    pub io_timeout_ms: u64,
    /// First reconnect delay after a failed dial.
    pub reconnect_backoff_min_ms: u64,
    /// Cap of the exponential reconnect delay.
    pub reconnect_backoff_max_ms: u64,
    /// How long `QuicNode::shutdown` may take in all to deliver what is
    /// queued for live peers and let accepted RPCs answer (plus a short
    /// close linger, `quic::CLOSE_LINGER_MS`). Peers that have gone silent
    /// are given up after `quic::PEER_SILENCE_MS`, not waited for.
    pub shutdown_drain_ms: u64,
    /// Upper bound of QUIC path-MTU discovery (UDP payload bytes). Discovery
    /// starts at 1200 and only keeps sizes the path really carries, so a large
    /// bound costs nothing on a 1500-byte network and cuts per-packet CPU on
    /// jumbo-frame networks and loopback.
    pub udp_payload_bytes_max: u16,
    /// UDP payload size the path is known to carry: QUIC starts there and
    /// never falls below it, even when losses look like an MTU black hole.
    /// 1200 (QUIC's minimum) is safe everywhere; 1452 suits a LAN or
    /// loopback with the usual 1500-byte MTU, where a burst of drops under
    /// CPU load would otherwise send QUIC back to 1200-byte packets for a
    /// minute and cut bulk throughput.
    pub udp_payload_bytes_min: u16,
    /// Requested UDP socket send and receive buffer size. The kernel caps it
    /// (Linux: `net.core.rmem_max` / `wmem_max`); too small a receive buffer
    /// drops bursts, which QUIC then treats as congestion.
    pub udp_socket_buffer_bytes: usize,
}

/// Default [`Limits::shutdown_drain_ms`]: enough to flush full queues to
/// live peers on a LAN, short enough that a stopping node does not hang.
pub const SHUTDOWN_DRAIN_MS_DEFAULT: u64 = 2_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 << 20,
            peer_queue_messages_max: 4096,
            batch_bytes_max: 64 << 10,
            inbox_capacity: 4096,
            rpc_concurrency_max: 256,
            rpc_deadline_ms: 5_000,
            chunk_bytes: 1 << 20,
            bulk_file_bytes_max: 64 << 30,
            bulk_send_bytes_per_sec_max: 0,
            io_timeout_ms: 10_000,
            reconnect_backoff_min_ms: 20,
            reconnect_backoff_max_ms: 2_000,
            shutdown_drain_ms: SHUTDOWN_DRAIN_MS_DEFAULT,
            udp_payload_bytes_max: 8952,
            udp_payload_bytes_min: 1200,
            udp_socket_buffer_bytes: 4 << 20,
        }
    }
}

fn check(ok: bool, field: &'static str, reason: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError {
            field,
            reason: reason.to_string(),
        })
    }
}

impl Limits {
    /// Checks every limit against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1024..=FRAME_BYTES_CEILING).contains(&self.max_frame_bytes),
            "max_frame_bytes",
            "must be in 1 KiB..=64 MiB",
        )?;
        check(
            self.peer_queue_messages_max >= 1,
            "peer_queue_messages_max",
            "must be >= 1",
        )?;
        check(
            self.batch_bytes_max >= 1 && self.batch_bytes_max <= self.max_frame_bytes,
            "batch_bytes_max",
            "must be in 1..=max_frame_bytes",
        )?;
        check(self.inbox_capacity >= 1, "inbox_capacity", "must be >= 1")?;
        check(
            (1..=65_536).contains(&self.rpc_concurrency_max),
            "rpc_concurrency_max",
            "must be in 1..=65536",
        )?;
        check(self.rpc_deadline_ms >= 1, "rpc_deadline_ms", "must be >= 1")?;
        check(
            self.chunk_bytes >= 1 && self.chunk_bytes + 8 <= self.max_frame_bytes,
            "chunk_bytes",
            "must be >= 1 and chunk_bytes + 8 <= max_frame_bytes",
        )?;
        check(
            self.bulk_file_bytes_max >= 1,
            "bulk_file_bytes_max",
            "must be >= 1",
        )?;
        check(self.io_timeout_ms >= 1, "io_timeout_ms", "must be >= 1")?;
        check(
            self.reconnect_backoff_min_ms >= 1
                && self.reconnect_backoff_min_ms <= self.reconnect_backoff_max_ms,
            "reconnect_backoff_min_ms",
            "must be in 1..=reconnect_backoff_max_ms",
        )?;
        check(
            (1200..=65_527).contains(&self.udp_payload_bytes_max),
            "udp_payload_bytes_max",
            "must be in 1200..=65527",
        )?;
        check(
            (1200..=self.udp_payload_bytes_max).contains(&self.udp_payload_bytes_min),
            "udp_payload_bytes_min",
            "must be in 1200..=udp_payload_bytes_max",
        )?;
        check(
            self.udp_socket_buffer_bytes >= 64 << 10,
            "udp_socket_buffer_bytes",
            "must be >= 64 KiB",
        )?;
        Ok(())
    }

    /// `rpc_deadline_ms` as a [`Duration`].
    pub fn rpc_deadline(&self) -> Duration {
        Duration::from_millis(self.rpc_deadline_ms)
    }

    /// `io_timeout_ms` as a [`Duration`].
    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }
}

/// Configuration of one QUIC node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id; must match the id in its certificate.
    pub id: NodeId,
    /// UDP address to bind (port 0 picks a free port).
    pub listen_addr: SocketAddr,
    /// Cluster membership: every node (this one may be included) and its address.
    /// Inbound node connections whose certificate names a non-member are refused.
    pub members: HashMap<NodeId, SocketAddr>,
    /// Directory where verified bulk files are placed (created if missing).
    /// Temporary `.part` files live here too, so the final rename is atomic.
    pub files_dir: PathBuf,
    /// Limits.
    pub limits: Limits,
    /// Enables [`crate::Transport::set_fault_filter`]. Off by default;
    /// turn it on only in tests or behind an authenticated admin call.
    pub fault_injection_enabled: bool,
    /// Accept connections from any node the CA certified, member or not.
    /// Off for database nodes (a cluster's membership is its list); on for
    /// MapReduce coordinators and workers, whose peers come and go. A
    /// non-member that connects can call this node and be answered on its
    /// own connection; messages and files *to* it still need
    /// [`crate::quic::QuicNode::set_member`].
    pub members_open: bool,
}

impl NodeConfig {
    /// A config with default limits and fault injection off.
    pub fn new(
        id: NodeId,
        listen_addr: SocketAddr,
        members: HashMap<NodeId, SocketAddr>,
        files_dir: PathBuf,
    ) -> Self {
        NodeConfig {
            id,
            listen_addr,
            members,
            files_dir,
            limits: Limits::default(),
            fault_injection_enabled: false,
            members_open: false,
        }
    }

    /// Validates the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()
    }
}
