//! The gateway's shared runtime state: the configuration in force (swapped whole on reload),
//! metrics, what upstreams reported about their secrets, the drain signal and the open
//! agent WebSockets a drain waits for.

use crate::config::{ConfigError, GatewayConfig};
use crate::edge::limits::LimitState;
use crate::edge::tls::SniResolver;
use crate::secrets::UpstreamReports;
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

pub struct GatewayState {
    config: ArcSwap<GatewayConfig>,
    config_path: PathBuf,
    pub metrics: Metrics,
    pub reports: UpstreamReports,
    pub limits: Arc<LimitState>,
    drain: watch::Sender<bool>,
    pub connections: Arc<ConnectionTracker>,
    /// The TLS listener's certificates, replaced on reload.
    tls_resolver: Option<Arc<SniResolver>>,
}

impl GatewayState {
    pub fn new(config: GatewayConfig, config_path: PathBuf) -> Arc<Self> {
        let tls_resolver = config
            .tls
            .as_ref()
            .map(|t| Arc::new(SniResolver::new(t.certificates.clone())));
        let state = Arc::new(GatewayState {
            tls_resolver,
            config: ArcSwap::from_pointee(config),
            config_path,
            metrics: Metrics::new(),
            reports: UpstreamReports::default(),
            limits: Arc::default(),
            drain: watch::channel(false).0,
            connections: Arc::default(),
        });
        state.refresh_secret_gauges();
        state
    }

    /// The configuration in force. Requests hold it for their lifetime; a reload never
    /// changes it under an established connection.
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.config.load_full()
    }

    /// Reads and validates the file again; on success it replaces the configuration, on
    /// failure the old one keeps serving. Listener changes need a restart and are reported.
    pub fn reload(&self, trigger: &str) -> Result<Value, ConfigError> {
        let loaded = GatewayConfig::load(&self.config_path);
        self.metrics.config_reloaded(loaded.is_ok());
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                log::error!(
                    "reload ({trigger}) refused, the previous configuration keeps serving: {e}"
                );
                return Err(e);
            }
        };
        let old = self.config();
        let mut needs_restart = Vec::new();
        if new.listen != old.listen {
            needs_restart.push("server.listen");
        }
        if new.admin_listen != old.admin_listen {
            needs_restart.push("admin.listen");
        }
        if new.threads != old.threads {
            needs_restart.push("server.threads");
        }
        if new.tls.as_ref().map(|t| &t.listen) != old.tls.as_ref().map(|t| &t.listen) {
            needs_restart.push("tls.listen");
        }
        if let (Some(resolver), Some(tls)) = (&self.tls_resolver, &new.tls) {
            resolver.replace(tls.certificates.clone());
        }
        for field in &needs_restart {
            log::warn!("reload ({trigger}): {field} changed; it takes effect only after a restart");
        }
        self.config.store(Arc::new(new));
        self.refresh_secret_gauges();
        log::info!("reload ({trigger}) applied");
        Ok(json!({"reloaded": true, "needs_restart": needs_restart}))
    }

    /// The resolver the TLS listener is built with, if there is one.
    pub fn tls_resolver(&self) -> Option<Arc<SniResolver>> {
        self.tls_resolver.clone()
    }

    pub fn start_drain(&self) {
        if !self.drain.send_replace(true) {
            log::warn!("draining: agent WebSockets get Close 1001, new upgrades are refused");
        }
    }

    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }

    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Why the gateway is not ready, if it is not.
    pub fn not_ready_reason(&self) -> Option<Value> {
        if self.draining() {
            return Some(json!({"reason": "draining"}));
        }
        let config = self.config();
        if !config.ready_requires_secrets {
            return None;
        }
        let missing: Vec<Value> = secret_presence(&config, &self.reports)
            .into_iter()
            .filter(|(_, _, present)| !present)
            .map(|(secret, upstream, _)| json!({"secret": secret, "upstream": upstream}))
            .collect();
        (!missing.is_empty()).then(|| json!({"reason": "secret_missing", "missing": missing}))
    }

    pub fn refresh_secret_gauges(&self) {
        let config = self.config();
        self.metrics
            .set_secret_presence(&secret_presence(&config, &self.reports));
    }

    /// Records an upstream's "NAME is not set" answer.
    pub fn upstream_reported_missing(&self, upstream: &str, secret: &str) {
        let (changed, log_now) = self.reports.report_missing(upstream, secret);
        if log_now {
            log::error!("upstream {upstream} answers that {secret} is not set; clients get 503 secret_missing until it is");
        }
        if changed {
            self.refresh_secret_gauges();
        }
    }

    /// An upstream answered well: what it reported missing is there now.
    pub fn upstream_answered_well(&self, upstream: &str) {
        if self.reports.report_ok(upstream) {
            log::info!("upstream {upstream} answers normally again");
            self.refresh_secret_gauges();
        }
    }
}

/// (secret, upstream, present) for every secret an upstream's agents need. The gateway
/// checks its own copy for secrets it holds; for the rest, it knows what the upstream said.
pub fn secret_presence(
    config: &GatewayConfig,
    reports: &UpstreamReports,
) -> Vec<(String, String, bool)> {
    let mut presence: Vec<(String, String, bool)> = Vec::new();
    for agent in config.routes.iter().flat_map(|r| r.agents.values()) {
        let upstream = &agent.upstream;
        for secret in &agent.required_secrets {
            if presence
                .iter()
                .any(|(s, u, _)| s == secret && *u == upstream.name)
            {
                continue;
            }
            // The gateway holds the deployment's copy for local upstreams (and may forward
            // it); a Worker keeps its own as a Worker secret.
            let locally_present = !upstream.is_local()
                || config
                    .secrets
                    .get(secret)
                    .is_some_and(|s| s.value.is_some());
            let present = locally_present && !reports.is_missing(&upstream.name, secret);
            presence.push((secret.clone(), upstream.name.clone(), present));
        }
    }
    presence.sort();
    presence
}

/// Counts open agent WebSockets, so that a drain can wait for the last one.
#[derive(Default)]
pub struct ConnectionTracker {
    open: AtomicUsize,
    closed: Notify,
}

/// One open connection in the count, until dropped; owned by the connection's task.
pub struct ConnectionGuard(Arc<ConnectionTracker>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

impl ConnectionTracker {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(Arc::clone(self))
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until no connection is open, or `limit` has passed; returns what is still open.
    pub async fn wait_idle(&self, limit: Duration) -> usize {
        let wait = async {
            loop {
                // Registered before the count is read, so a close in between is not missed.
                let mut notified = std::pin::pin!(self.closed.notified());
                notified.as_mut().enable();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        self.count()
    }
}
