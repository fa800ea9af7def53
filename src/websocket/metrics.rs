//! The WebSocket metric families. They live beside the pump, which updates them on its hot
//! path, so that the pump needs nothing of the rest of the gateway; the gateway's registry
//! registers them with the others.
//!
//! Label values come from the configuration (agent names) or from fixed sets, never from raw
//! client input: an agent the configuration does not know is `agent="unknown"`, and
//! instance names are never labels. Handles for an agent's series are resolved once per
//! connection, so the pump's hot path is an atomic add, not a label lookup.

use super::handshake::InvalidUpgradeAnswer;
use super::outcome::ConnectionOutcome;
use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts,
};
use std::borrow::Cow;

/// The `agent` label of requests that name no configured agent.
pub(crate) const UNKNOWN_AGENT: &str = "unknown";
pub(crate) const DIRECTION_CLIENT_TO_UPSTREAM: &str = "client_to_upstream";
pub(crate) const DIRECTION_UPSTREAM_TO_CLIENT: &str = "upstream_to_client";

pub(crate) struct WebSocketMetrics {
    closes: IntCounterVec,
    close_causes: IntCounterVec,
    active: IntGaugeVec,
    duration: HistogramVec,
    messages: IntCounterVec,
    bytes: IntCounterVec,
    protocol_errors: IntCounterVec,
    handshakes: IntCounterVec,
    rate_limited: IntCounterVec,
    throttled_seconds: CounterVec,
}

/// Live counters of one direction of one connection.
#[derive(Clone)]
pub(crate) struct DirectionCounters {
    pub(crate) messages: IntCounter,
    pub(crate) bytes: IntCounter,
}

/// An open agent WebSocket: counted active until dropped.
pub(crate) struct ConnectionMetrics {
    pub(crate) client_to_upstream: DirectionCounters,
    pub(crate) upstream_to_client: DirectionCounters,
    active: IntGauge,
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// How an upgrade request was answered: the `result` label of the handshake counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeResult {
    /// 101: the connection is open.
    Upgraded,
    /// Refused with this HTTP status, by the gateway or relayed from the upstream.
    Status(u16),
    /// The CORS and Origin policy refused the Origin.
    OriginRefused,
    /// A secret the agent needs is missing (the gateway's copy, or the upstream said so).
    SecretMissing,
    /// The upstream could not be reached or failed during the handshake.
    UpstreamError,
    /// The upstream's 101 did not answer the client's handshake; answered 502.
    InvalidAnswer(InvalidUpgradeAnswer),
}

impl HandshakeResult {
    pub(crate) fn label(self) -> Cow<'static, str> {
        match self {
            HandshakeResult::Upgraded => "101".into(),
            // Any status Pingora accepts (100-999): a relayed status is the upstream's own.
            HandshakeResult::Status(status) => status.to_string().into(),
            HandshakeResult::OriginRefused => "origin_refused".into(),
            HandshakeResult::SecretMissing => "secret_missing".into(),
            HandshakeResult::UpstreamError => "upstream_error".into(),
            HandshakeResult::InvalidAnswer(why) => why.kind().into(),
        }
    }
}

// Names and labels are constants of this file; a failure here is a programming error caught
// by the unit tests, at start-up.
pub(crate) fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

/// A counter of seconds (a float), for time summed over connections.
pub(crate) fn seconds_counter(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    CounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

pub(crate) fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition")
}

pub(crate) fn histogram(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid histogram definition")
}

impl Default for WebSocketMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WebSocketMetrics {
    pub(crate) fn new() -> Self {
        WebSocketMetrics {
            closes: counter(
                "agent_gateway_ws_closes_total",
                "Agent WebSocket connections ended, by who sent the first Close (or dropped first) and its code (1006: dropped without Close).",
                &["agent", "initiator", "code"],
            ),
            // Its own family, so that the series and alerts built on the one above are kept.
            close_causes: counter(
                "agent_gateway_ws_close_causes_total",
                "Agent WebSocket connections ended, by who ended them and why: close, dropped, heartbeat (did not answer the gateway's Ping), idle_timeout, drain, protocol_error, rate_limit.",
                &["agent", "initiator", "cause"],
            ),
            active: gauge(
                "agent_gateway_ws_connections_active",
                "Agent WebSocket connections open now.",
                &["agent"],
            ),
            duration: histogram(
                "agent_gateway_ws_connection_duration_seconds",
                "Lifetime of agent WebSocket connections.",
                &["agent"],
                vec![0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0],
            ),
            messages: counter(
                "agent_gateway_ws_messages_total",
                "Complete WebSocket data messages proxied.",
                &["agent", "direction"],
            ),
            bytes: counter(
                "agent_gateway_ws_bytes_total",
                "WebSocket bytes proxied after the handshake, frame headers included.",
                &["agent", "direction"],
            ),
            protocol_errors: counter(
                "agent_gateway_ws_protocol_errors_total",
                "WebSocket protocol violations seen; each closes its connection with 1002.",
                &["agent", "kind"],
            ),
            handshakes: counter(
                "agent_gateway_ws_handshakes_total",
                "WebSocket upgrade requests, by result: 101, the HTTP status answered, or why the gateway refused.",
                &["agent", "result"],
            ),
            rate_limited: counter(
                "agent_gateway_ws_rate_limited_total",
                "Times a client's rate limit held one of its agent WebSockets back (action throttle) or closed it (action close), by limit.",
                &["agent", "limit", "action"],
            ),
            throttled_seconds: seconds_counter(
                "agent_gateway_ws_throttled_seconds_total",
                "Time agent WebSockets spent throttled by a rate limit, the gateway not reading from the client.",
                &["agent"],
            ),
        }
    }

    /// Every family, for the registry.
    pub(crate) fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.closes.clone()),
            Box::new(self.close_causes.clone()),
            Box::new(self.active.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.messages.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.protocol_errors.clone()),
            Box::new(self.handshakes.clone()),
            Box::new(self.rate_limited.clone()),
            Box::new(self.throttled_seconds.clone()),
        ]
    }

    /// A WebSocket connection to `agent` has been upgraded.
    pub(crate) fn connection_opened(&self, agent: &str) -> ConnectionMetrics {
        let direction = |d: &str| DirectionCounters {
            messages: self.messages.with_label_values(&[agent, d]),
            bytes: self.bytes.with_label_values(&[agent, d]),
        };
        let active = self.active.with_label_values(&[agent]);
        active.inc();
        ConnectionMetrics {
            client_to_upstream: direction(DIRECTION_CLIENT_TO_UPSTREAM),
            upstream_to_client: direction(DIRECTION_UPSTREAM_TO_CLIENT),
            active,
        }
    }

    /// Records how a connection ended. Its message and byte counts were added live.
    pub(crate) fn connection_closed(&self, agent: &str, outcome: &ConnectionOutcome) {
        let code = close_code_label(outcome.code);
        self.closes
            .with_label_values(&[agent, outcome.initiator.label(), &code])
            .inc();
        self.close_causes
            .with_label_values(&[agent, outcome.initiator.label(), outcome.cause.label()])
            .inc();
        self.duration
            .with_label_values(&[agent])
            .observe(outcome.duration.as_secs_f64());
        if let Some(error) = outcome.protocol_error {
            self.protocol_errors
                .with_label_values(&[agent, error.kind()])
                .inc();
        }
    }

    /// The counter of `limit` stopping `agent`'s connections with `action`.
    pub(crate) fn rate_limited(&self, agent: &str, limit: &str, action: &str) -> IntCounter {
        self.rate_limited.with_label_values(&[agent, limit, action])
    }

    /// The time `agent`'s connections spent throttled.
    pub(crate) fn throttled_seconds(&self, agent: &str) -> Counter {
        self.throttled_seconds.with_label_values(&[agent])
    }

    pub(crate) fn handshake(&self, agent: &str, result: HandshakeResult) {
        self.handshakes
            .with_label_values(&[agent, &result.label()])
            .inc();
    }
}

/// The `code` label: registered codes (1000-1015) and the registered and private ranges
/// (3000-4999) as the number; anything else `other`, so a client cannot mint label values.
pub(crate) fn close_code_label(code: u16) -> Cow<'static, str> {
    match code {
        1000..=1015 | 3000..=4999 => code.to_string().into(),
        _ => "other".into(),
    }
}

/// HTTP statuses as labels: the number for real statuses, `other` for anything odd.
pub(crate) fn status_label(status: u16) -> Cow<'static, str> {
    match status {
        100..=599 => status.to_string().into(),
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_keep_registered_and_application_ranges() {
        assert_eq!(close_code_label(1000), "1000");
        assert_eq!(close_code_label(1006), "1006");
        assert_eq!(close_code_label(1014), "1014");
        assert_eq!(close_code_label(4001), "4001");
        assert_eq!(close_code_label(3000), "3000");
        assert_eq!(close_code_label(2000), "other");
        assert_eq!(close_code_label(999), "other");
        assert_eq!(close_code_label(5000), "other");
    }

    #[test]
    fn handshake_results_keep_their_labels() {
        assert_eq!(HandshakeResult::Upgraded.label(), "101");
        assert_eq!(HandshakeResult::Status(404).label(), "404");
        assert_eq!(HandshakeResult::OriginRefused.label(), "origin_refused");
        assert_eq!(HandshakeResult::SecretMissing.label(), "secret_missing");
        assert_eq!(HandshakeResult::UpstreamError.label(), "upstream_error");
        let bad_accept = HandshakeResult::InvalidAnswer(InvalidUpgradeAnswer::Accept);
        assert_eq!(bad_accept.label(), "bad_accept");
    }
}
