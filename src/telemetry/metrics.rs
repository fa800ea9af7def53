//! Prometheus metrics, exported on the admin listener only.
//!
//! Label values come from the configuration (route, upstream and secret names) or from fixed
//! sets, never from raw client input. The WebSocket families live beside the pump
//! ([`crate::websocket::metrics`]), the authentication ones beside the policies
//! ([`crate::auth::metrics`]), the fleet's beside it ([`crate::fleet::metrics`]); all are
//! registered here with the rest.

use crate::auth::metrics::AuthMetrics;
use crate::fleet::metrics::FleetMetrics;
use crate::secrets::presence::SecretPresence;
use crate::websocket::metrics::{counter, gauge, histogram, status_label, WebSocketMetrics};
use prometheus::core::Collector;
use prometheus::{Encoder, HistogramVec, IntCounterVec, IntGaugeVec, Registry, TextEncoder};

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) websocket: WebSocketMetrics,
    pub(crate) auth: AuthMetrics,
    pub(crate) fleet: FleetMetrics,
    http_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    origin_refusals: IntCounterVec,
    secret_present: IntGaugeVec,
    config_reloads: IntCounterVec,
    limit_refusals: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every series family. Called once at start-up.
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let metrics = Metrics {
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
            secret_present: gauge(
                "agent_gateway_secret_present",
                "Whether a secret an upstream's agents need is present (1) or missing (0), as far as the gateway can tell.",
                &["secret", "upstream"],
            ),
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
            websocket: WebSocketMetrics::new(),
            auth: AuthMetrics::new(),
            fleet: FleetMetrics::new(),
        };
        // Both results exist from the start, so that increase() sees the first failure.
        for result in ["success", "failure"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        let build_info = gauge(
            "agent_gateway_build_info",
            "Build of the running gateway; always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let own: [Box<dyn Collector>; 8] = [
            Box::new(metrics.http_requests.clone()),
            Box::new(metrics.upstream_duration.clone()),
            Box::new(metrics.upstream_errors.clone()),
            Box::new(metrics.origin_refusals.clone()),
            Box::new(metrics.secret_present.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.limit_refusals.clone()),
            Box::new(build_info),
        ];
        let families = metrics.websocket.collectors().into_iter();
        let families = families.chain(metrics.auth.collectors());
        let families = families.chain(metrics.fleet.collectors());
        for collector in own.into_iter().chain(families) {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Prometheus text exposition of every family.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }

    pub(crate) fn http_request(&self, route: &str, status: u16) {
        let status = status_label(status);
        self.http_requests
            .with_label_values(&[route, &status])
            .inc();
    }

    pub(crate) fn upstream_answered(&self, upstream: &str, seconds: f64) {
        self.upstream_duration
            .with_label_values(&[upstream])
            .observe(seconds);
    }

    pub(crate) fn upstream_error(&self, upstream: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[upstream, kind])
            .inc();
    }

    pub(crate) fn limit_refused(&self, limit: &str) {
        self.limit_counter(limit).inc();
    }

    /// The refusal counter of one limit, for code that counts without a request at hand.
    pub(crate) fn limit_counter(&self, limit: &str) -> prometheus::IntCounter {
        self.limit_refusals.with_label_values(&[limit])
    }

    pub(crate) fn config_reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// Replaces the secret gauges: series for secrets no longer required disappear.
    pub(crate) fn set_secret_presence(&self, presence: &[SecretPresence]) {
        self.secret_present.reset();
        for p in presence {
            self.secret_present
                .with_label_values(&[&p.secret, &p.upstream])
                .set(i64::from(p.present));
        }
    }

    pub(crate) fn origin_refused(&self, route: &str) {
        self.origin_refusals.with_label_values(&[route]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::outcome::{
        Cause, ConnectionOutcome, DirectionStats, DropKind, Initiator,
    };
    use std::time::Duration;

    #[test]
    fn exposition_has_the_families_and_counts() {
        let metrics = Metrics::new();
        {
            let connection = metrics.websocket.connection_opened("CoderAgent");
            connection.client_to_upstream.messages.inc_by(3);
            let text = String::from_utf8(metrics.render()).expect("utf-8");
            assert!(
                text.contains("agent_gateway_ws_connections_active{agent=\"CoderAgent\"} 1"),
                "{text}"
            );
        }
        metrics.websocket.connection_closed(
            "CoderAgent",
            &ConnectionOutcome {
                initiator: Initiator::Upstream,
                code: 1006,
                reason_len: 0,
                answered: false,
                drop_kind: Some(DropKind::Reset),
                cause: Cause::Dropped,
                protocol_error: None,
                duration: Duration::from_secs(2),
                throttled: Duration::ZERO,
                client_to_upstream: DirectionStats::default(),
                upstream_to_client: DirectionStats::default(),
            },
        );
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        for expected in [
            "agent_gateway_ws_connections_active{agent=\"CoderAgent\"} 0",
            "agent_gateway_ws_closes_total{agent=\"CoderAgent\",code=\"1006\",initiator=\"upstream\"} 1",
            "agent_gateway_ws_close_causes_total{agent=\"CoderAgent\",cause=\"dropped\",initiator=\"upstream\"} 1",
            "agent_gateway_ws_messages_total{agent=\"CoderAgent\",direction=\"client_to_upstream\"} 3",
            "agent_gateway_ws_connection_duration_seconds_count{agent=\"CoderAgent\"} 1",
            "agent_gateway_build_info{version=",
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
    }
}
