//! Prometheus metrics, exported on the admin listener only.
//!
//! Label values come from the configuration (agent, route and upstream names) or from fixed
//! sets, never from raw client input: an agent the configuration does not know is
//! `agent="unknown"`, and instance names are never labels. Handles for an agent's
//! WebSocket series are resolved once per connection, so the pump's hot path is an atomic
//! add, not a label lookup.

use crate::websocket::frame::ProtocolError;
use crate::websocket::pump::ConnectionOutcome;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The `agent` label of requests that name no configured agent.
pub const UNKNOWN_AGENT: &str = "unknown";
pub const DIRECTION_CLIENT_TO_UPSTREAM: &str = "client_to_upstream";
pub const DIRECTION_UPSTREAM_TO_CLIENT: &str = "upstream_to_client";

pub struct Metrics {
    registry: Registry,
    ws_closes: IntCounterVec,
    ws_active: IntGaugeVec,
    ws_duration: HistogramVec,
    ws_messages: IntCounterVec,
    ws_bytes: IntCounterVec,
    ws_protocol_errors: IntCounterVec,
    ws_handshakes: IntCounterVec,
    http_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    origin_refusals: IntCounterVec,
    secret_present: IntGaugeVec,
    config_reloads: IntCounterVec,
    limit_refusals: IntCounterVec,
}

/// Live counters of one direction of one connection.
#[derive(Clone)]
pub struct DirectionCounters {
    pub messages: IntCounter,
    pub bytes: IntCounter,
}

/// An open agent WebSocket: counted active until dropped.
pub struct ConnectionMetrics {
    pub client_to_upstream: DirectionCounters,
    pub upstream_to_client: DirectionCounters,
    active: IntGauge,
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.active.dec();
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Names and labels are constants of this file; a failure here is a programming error
    // caught by the unit tests, at start-up.
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid histogram definition")
}

impl Metrics {
    /// Creates and registers every series family. Called once at start-up.
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Metrics {
            ws_closes: counter(
                "agent_gateway_ws_closes_total",
                "Agent WebSocket connections ended, by who sent the first Close (or dropped first) and its code (1006: dropped without Close).",
                &["agent", "initiator", "code"],
            ),
            ws_active: IntGaugeVec::new(
                Opts::new("agent_gateway_ws_connections_active", "Agent WebSocket connections open now."),
                &["agent"],
            )
            .expect("valid gauge definition"),
            ws_duration: histogram(
                "agent_gateway_ws_connection_duration_seconds",
                "Lifetime of agent WebSocket connections.",
                &["agent"],
                vec![0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0],
            ),
            ws_messages: counter(
                "agent_gateway_ws_messages_total",
                "Complete WebSocket data messages proxied.",
                &["agent", "direction"],
            ),
            ws_bytes: counter(
                "agent_gateway_ws_bytes_total",
                "WebSocket bytes proxied after the handshake, frame headers included.",
                &["agent", "direction"],
            ),
            ws_protocol_errors: counter(
                "agent_gateway_ws_protocol_errors_total",
                "WebSocket protocol violations seen; each closes its connection with 1002.",
                &["agent", "kind"],
            ),
            ws_handshakes: counter(
                "agent_gateway_ws_handshakes_total",
                "WebSocket upgrade requests, by result: 101, the HTTP status answered, or why the gateway refused.",
                &["agent", "result"],
            ),
            http_requests: counter(
                "agent_gateway_http_requests_total",
                "HTTP requests answered, WebSocket upgrades included, by route and status.",
                &["route", "status"],
            ),
            upstream_duration: histogram(
                "agent_gateway_upstream_request_duration_seconds",
                "Time from connecting to an upstream to its response header (or 101).",
                &["upstream"],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            upstream_errors: counter(
                "agent_gateway_upstream_errors_total",
                "Failures reaching or talking to an upstream, by kind.",
                &["upstream", "kind"],
            ),
            origin_refusals: counter(
                "agent_gateway_origin_refusals_total",
                "Requests refused by the CORS and Origin policy.",
                &["route"],
            ),
            secret_present: IntGaugeVec::new(
                Opts::new(
                    "agent_gateway_secret_present",
                    "Whether a secret an upstream's agents need is present (1) or missing (0), as far as the gateway can tell.",
                ),
                &["secret", "upstream"],
            )
            .expect("valid gauge definition"),
            config_reloads: counter(
                "agent_gateway_config_reloads_total",
                "Configuration reloads (SIGHUP or POST /reload), by result.",
                &["result"],
            ),
            limit_refusals: counter(
                "agent_gateway_limit_refusals_total",
                "Requests refused by a limit (upgrade rate, open WebSockets, header or body size).",
                &["limit"],
            ),
            registry,
        };
        // Both results exist from the start, so that increase() sees the first failure.
        for result in ["success", "failure"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new(
                "agent_gateway_build_info",
                "Build of the running gateway; always 1.",
            ),
            &["version"],
        )
        .expect("valid gauge definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(metrics.ws_closes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.ws_active.clone()),
            Box::new(metrics.ws_duration.clone()),
            Box::new(metrics.ws_messages.clone()),
            Box::new(metrics.ws_bytes.clone()),
            Box::new(metrics.ws_protocol_errors.clone()),
            Box::new(metrics.ws_handshakes.clone()),
            Box::new(metrics.http_requests.clone()),
            Box::new(metrics.upstream_duration.clone()),
            Box::new(metrics.upstream_errors.clone()),
            Box::new(metrics.origin_refusals.clone()),
            Box::new(metrics.secret_present.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.limit_refusals.clone()),
            Box::new(build_info),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }

    /// A WebSocket connection to `agent` has been upgraded.
    pub fn connection_opened(&self, agent: &str) -> ConnectionMetrics {
        let direction = |d: &str| DirectionCounters {
            messages: self.ws_messages.with_label_values(&[agent, d]),
            bytes: self.ws_bytes.with_label_values(&[agent, d]),
        };
        let active = self.ws_active.with_label_values(&[agent]);
        active.inc();
        ConnectionMetrics {
            client_to_upstream: direction(DIRECTION_CLIENT_TO_UPSTREAM),
            upstream_to_client: direction(DIRECTION_UPSTREAM_TO_CLIENT),
            active,
        }
    }

    /// Records how a connection ended. Its message and byte counts were added live.
    pub fn connection_closed(&self, agent: &str, outcome: &ConnectionOutcome) {
        let code = close_code_label(outcome.code);
        self.ws_closes
            .with_label_values(&[agent, outcome.initiator.label(), &code])
            .inc();
        self.ws_duration
            .with_label_values(&[agent])
            .observe(outcome.duration.as_secs_f64());
        if let Some(error) = outcome.protocol_error {
            self.protocol_error(agent, error);
        }
    }

    fn protocol_error(&self, agent: &str, error: ProtocolError) {
        self.ws_protocol_errors
            .with_label_values(&[agent, error.kind()])
            .inc();
    }

    /// `result` is "101", an HTTP status, or a refusal reason from a fixed set.
    pub fn handshake(&self, agent: &str, result: &str) {
        self.ws_handshakes.with_label_values(&[agent, result]).inc();
    }

    pub fn http_request(&self, route: &str, status: u16) {
        let status = status_label(status);
        self.http_requests
            .with_label_values(&[route, &status])
            .inc();
    }

    pub fn upstream_answered(&self, upstream: &str, seconds: f64) {
        self.upstream_duration
            .with_label_values(&[upstream])
            .observe(seconds);
    }

    pub fn upstream_error(&self, upstream: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[upstream, kind])
            .inc();
    }

    pub fn limit_refused(&self, limit: &str) {
        self.limit_counter(limit).inc();
    }

    /// The refusal counter of one limit, for code that counts without a request at hand.
    pub fn limit_counter(&self, limit: &str) -> prometheus::IntCounter {
        self.limit_refusals.with_label_values(&[limit])
    }

    pub fn config_reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// Replaces the secret gauges: series for secrets no longer required disappear.
    pub fn set_secret_presence(&self, presence: &[(String, String, bool)]) {
        self.secret_present.reset();
        for (secret, upstream, present) in presence {
            self.secret_present
                .with_label_values(&[secret, upstream])
                .set(i64::from(*present));
        }
    }

    pub fn origin_refused(&self, route: &str) {
        self.origin_refusals.with_label_values(&[route]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `code` label: registered codes (1000-1015) and the registered and private ranges
/// (3000-4999) as the number; anything else `other`, so a client cannot mint label values.
pub fn close_code_label(code: u16) -> std::borrow::Cow<'static, str> {
    match code {
        1000..=1015 | 3000..=4999 => code.to_string().into(),
        _ => "other".into(),
    }
}

/// HTTP statuses as labels: the number for real statuses, `other` for anything odd.
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    match status {
        100..=599 => status.to_string().into(),
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::pump::{DirectionStats, DropKind, Initiator};
    use std::time::Duration;

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
    fn exposition_has_the_families_and_counts() {
        let metrics = Metrics::new();
        {
            let connection = metrics.connection_opened("CoderAgent");
            connection.client_to_upstream.messages.inc_by(3);
            let text = String::from_utf8(metrics.render()).expect("utf-8");
            assert!(
                text.contains("agent_gateway_ws_connections_active{agent=\"CoderAgent\"} 1"),
                "{text}"
            );
        }
        metrics.connection_closed(
            "CoderAgent",
            &ConnectionOutcome {
                initiator: Initiator::Upstream,
                code: 1006,
                reason_len: 0,
                answered: false,
                drop_kind: Some(DropKind::Reset),
                protocol_error: None,
                duration: Duration::from_secs(2),
                client_to_upstream: DirectionStats::default(),
                upstream_to_client: DirectionStats::default(),
            },
        );
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        for expected in [
            "agent_gateway_ws_connections_active{agent=\"CoderAgent\"} 0",
            "agent_gateway_ws_closes_total{agent=\"CoderAgent\",code=\"1006\",initiator=\"upstream\"} 1",
            "agent_gateway_ws_messages_total{agent=\"CoderAgent\",direction=\"client_to_upstream\"} 3",
            "agent_gateway_ws_connection_duration_seconds_count{agent=\"CoderAgent\"} 1",
            "agent_gateway_build_info{version=",
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
    }
}
