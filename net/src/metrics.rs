//! The QUIC transport's metrics, recorded through the `metrics` facade (a
//! no-op unless the program installs a recorder, as `shoal node
//! --status-addr` does). Only events that are rare in a healthy cluster
//! are recorded here (drops, refused and malformed input), so the message
//! path itself pays nothing. Labels come from fixed sets.

/// Counter: peer messages dropped, by `reason`: `queue_full` (the bounded
/// per-peer queue overflowed and dropped its oldest message),
/// `connection_lost` (a message stream broke with the messages in flight),
/// `fault_filter`, `shutdown`, `unknown_peer`, `too_large`,
/// `unencodable`.
pub const MESSAGES_DROPPED: &str = "shoal_net_messages_dropped_total";
/// Counter: connections closed for malformed or oversized input.
pub const MALFORMED_INPUTS: &str = "shoal_net_malformed_inputs_total";
/// Counter: connections refused (failed handshake, wrong identity, not a
/// member).
pub const CONNECTIONS_REFUSED: &str = "shoal_net_connections_refused_total";

/// Why a peer message was dropped (the `reason` label of
/// [`MESSAGES_DROPPED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    QueueFull,
    ConnectionLost,
    FaultFilter,
    Shutdown,
    UnknownPeer,
    TooLarge,
    Unencodable,
}

impl DropReason {
    const ALL: [DropReason; 7] = [
        DropReason::QueueFull,
        DropReason::ConnectionLost,
        DropReason::FaultFilter,
        DropReason::Shutdown,
        DropReason::UnknownPeer,
        DropReason::TooLarge,
        DropReason::Unencodable,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ConnectionLost => "connection_lost",
            DropReason::FaultFilter => "fault_filter",
            DropReason::Shutdown => "shutdown",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::TooLarge => "too_large",
            DropReason::Unencodable => "unencodable",
        }
    }
}

pub(crate) fn dropped(reason: DropReason, messages: u64) {
    if messages > 0 {
        ::metrics::counter!(MESSAGES_DROPPED, "reason" => reason.label()).increment(messages);
    }
}

pub(crate) fn malformed() {
    ::metrics::counter!(MALFORMED_INPUTS).increment(1);
}

pub(crate) fn refused() {
    ::metrics::counter!(CONNECTIONS_REFUSED).increment(1);
}

/// Describes the transport's series to the installed recorder (the
/// `# HELP` lines of a Prometheus scrape) and registers each at zero, so
/// a dashboard or alert sees `0`, not an absent series, until the first
/// event.
pub fn describe() {
    for reason in DropReason::ALL {
        ::metrics::counter!(MESSAGES_DROPPED, "reason" => reason.label()).absolute(0);
    }
    ::metrics::counter!(MALFORMED_INPUTS).absolute(0);
    ::metrics::counter!(CONNECTIONS_REFUSED).absolute(0);
    ::metrics::describe_counter!(
        MESSAGES_DROPPED,
        "Peer messages dropped, by reason (queue_full: a peer's bounded queue overflowed)"
    );
    ::metrics::describe_counter!(
        MALFORMED_INPUTS,
        "Connections closed for malformed or oversized input"
    );
    ::metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused: failed handshake, wrong identity, not a member"
    );
}
