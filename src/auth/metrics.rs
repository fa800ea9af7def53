//! The authentication metric families, registered by [`crate::telemetry::metrics`] with the
//! rest. Labels come from the configuration (route, policy, JWKS URL) or fixed sets.

use crate::websocket::metrics::{counter, histogram};
use prometheus::core::Collector;
use prometheus::{GaugeVec, HistogramVec, IntCounterVec, Opts};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone)]
pub(crate) struct AuthMetrics {
    decisions: IntCounterVec,
    forward_duration: HistogramVec,
    jwks_last_success: GaugeVec,
    jwks_fetch_failures: IntCounterVec,
}

impl Default for AuthMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthMetrics {
    pub(crate) fn new() -> Self {
        AuthMetrics {
            decisions: counter(
                "agent_gateway_auth_decisions_total",
                "Authentication decisions on requests to agents with a policy, by route, method and result (allowed, missing, invalid, expired, forbidden, auth_unavailable).",
                &["route", "method", "result"],
            ),
            forward_duration: histogram(
                "agent_gateway_auth_forward_duration_seconds",
                "Time the forward-auth service took to answer (cached answers are not counted).",
                &["policy"],
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            jwks_last_success: GaugeVec::new(
                Opts::new(
                    "agent_gateway_auth_jwks_last_success_timestamp_seconds",
                    "When each JWKS URL was last fetched successfully (Unix time); time() minus it is the keys' staleness.",
                ),
                &["url"],
            )
            .expect("valid gauge definition"),
            jwks_fetch_failures: counter(
                "agent_gateway_auth_jwks_fetch_failures_total",
                "Failed fetches of a JWKS URL; the last good keys keep serving.",
                &["url"],
            ),
        }
    }

    pub(crate) fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.decisions.clone()),
            Box::new(self.forward_duration.clone()),
            Box::new(self.jwks_last_success.clone()),
            Box::new(self.jwks_fetch_failures.clone()),
        ]
    }

    pub(crate) fn decided(&self, route: &str, method: &str, result: &str) {
        self.decisions
            .with_label_values(&[route, method, result])
            .inc();
    }

    pub(crate) fn forward_answered(&self, policy: &str, took: Duration) {
        self.forward_duration
            .with_label_values(&[policy])
            .observe(took.as_secs_f64());
    }

    /// Records a JWKS URL's state after a refresh pass: its last success and failures so far.
    pub(crate) fn jwks_state(&self, url: &str, age: Option<Duration>, failures: u64) {
        if let Some(age) = age {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let at = now.saturating_sub(age).as_secs_f64();
            self.jwks_last_success.with_label_values(&[url]).set(at);
        }
        let counter = self.jwks_fetch_failures.with_label_values(&[url]);
        let seen = counter.get();
        if failures > seen {
            counter.inc_by(failures - seen);
        }
    }
}
