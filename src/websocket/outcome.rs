//! How one upgraded connection ended: who closed it, with what code, and what crossed it.
//! The pump produces it; the close metrics and the connection log line report it.

use super::frame::ProtocolError;
use super::stop::MigrationReason;
use std::io;
use std::time::Duration;

/// Who ended a connection, or sent the first Close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Initiator {
    Client,
    Upstream,
    Gateway,
}

impl Initiator {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Upstream => "upstream",
            Initiator::Gateway => "gateway",
        }
    }
}

/// How a TCP (or TLS) stream ended without a Close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropKind {
    Eof,
    Reset,
    Timeout,
    Tls,
    Other,
}

impl DropKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            DropKind::Eof => "eof",
            DropKind::Reset => "reset",
            DropKind::Timeout => "timeout",
            DropKind::Tls => "tls",
            DropKind::Other => "other",
        }
    }

    pub(crate) fn of(error: &io::Error) -> DropKind {
        match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => DropKind::Reset,
            io::ErrorKind::TimedOut => DropKind::Timeout,
            io::ErrorKind::UnexpectedEof => DropKind::Eof,
            io::ErrorKind::InvalidData => DropKind::Tls,
            _ => DropKind::Other,
        }
    }
}

/// Why a connection ended: the `cause` of the connection line and of
/// `agent_gateway_ws_close_causes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// A side sent a Close frame.
    Close,
    /// A side's stream ended without a Close frame.
    Dropped,
    /// A side did not answer the gateway's heartbeat Ping in time.
    Heartbeat,
    /// `idle_timeout` passed without traffic either way.
    IdleTimeout,
    /// The gateway is draining.
    Drain,
    /// A side broke the protocol or sent a message over the cap.
    ProtocolError,
    /// The client went over a rate limit whose action is `close`.
    RateLimit,
    /// The client's credential expired while its WebSocket was open.
    TokenExpired,
    /// The instance's home moved to another node, and why.
    Migrated(MigrationReason),
}

impl Cause {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Cause::Close => "close",
            Cause::Dropped => "dropped",
            Cause::Heartbeat => "heartbeat",
            Cause::IdleTimeout => "idle_timeout",
            Cause::Drain => "drain",
            Cause::ProtocolError => "protocol_error",
            Cause::RateLimit => "rate_limit",
            Cause::TokenExpired => "token_expired",
            Cause::Migrated(_) => "migrated",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirectionStats {
    pub(crate) bytes: u64,
    pub(crate) frames: u64,
    pub(crate) messages: u64,
}

/// How one upgraded connection ended: what the close metrics and the connection log report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectionOutcome {
    pub(crate) initiator: Initiator,
    /// The Close code sent first; 1005 for an empty Close, 1006 when a side dropped first.
    pub(crate) code: u16,
    pub(crate) reason_len: usize,
    /// Whether the other party answered the first Close with its own.
    pub(crate) answered: bool,
    /// Set when the initiator dropped its stream without a Close (`Timeout` also when it did
    /// not answer the heartbeat).
    pub(crate) drop_kind: Option<DropKind>,
    pub(crate) cause: Cause,
    pub(crate) protocol_error: Option<ProtocolError>,
    pub(crate) duration: Duration,
    /// Time the client was not read from because of a rate limit (`throttle`).
    pub(crate) throttled: Duration,
    pub(crate) client_to_upstream: DirectionStats,
    pub(crate) upstream_to_client: DirectionStats,
}
