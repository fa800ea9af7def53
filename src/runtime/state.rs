//! The gateway's shared runtime state: the configuration in force with its secret values
//! (swapped whole on reload), and the parts every request may touch: metrics, limits, drain,
//! open connections, what upstreams reported about their secrets, the TLS certificates.

use super::drain::{ConnectionTracker, Drain};
use super::reload::restart_needed;
use crate::config::{ConfigError, GatewayConfig};
use crate::edge::limits::LimitState;
use crate::edge::tls::SniResolver;
use crate::secrets::presence::presence;
use crate::secrets::reports::UpstreamReports;
use crate::secrets::SecretStore;
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use serde_json::{json, Value};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

/// A validated configuration with the secret values read for it: what a request is served
/// under from start to end, so a reload never changes it under a request or connection.
pub(crate) struct ActiveConfig {
    pub(crate) config: GatewayConfig,
    pub(crate) secrets: SecretStore,
}

impl ActiveConfig {
    /// Reads the secrets `config` names (start-up and reload do this, parsing does not).
    pub(crate) fn new(config: GatewayConfig) -> Self {
        let secrets = SecretStore::read(&config);
        ActiveConfig { config, secrets }
    }
}

impl Deref for ActiveConfig {
    type Target = GatewayConfig;

    fn deref(&self) -> &GatewayConfig {
        &self.config
    }
}

pub(crate) struct GatewayState {
    active: ArcSwap<ActiveConfig>,
    config_path: PathBuf,
    pub(crate) metrics: Metrics,
    pub(crate) reports: UpstreamReports,
    pub(crate) limits: Arc<LimitState>,
    pub(crate) drain: Drain,
    pub(crate) connections: Arc<ConnectionTracker>,
    /// The TLS listener's certificates, replaced on reload.
    tls_resolver: Option<Arc<SniResolver>>,
}

impl GatewayState {
    pub(crate) fn new(config: GatewayConfig, config_path: PathBuf) -> Arc<Self> {
        let tls_resolver = config
            .tls
            .as_ref()
            .and_then(|t| t.certificates.clone())
            .map(|store| Arc::new(SniResolver::new(store)));
        let state = Arc::new(GatewayState {
            tls_resolver,
            active: ArcSwap::from_pointee(ActiveConfig::new(config)),
            config_path,
            metrics: Metrics::new(),
            reports: UpstreamReports::default(),
            limits: Arc::default(),
            drain: Drain::default(),
            connections: Arc::default(),
        });
        state.refresh_secret_gauges();
        state
    }

    /// The configuration in force. Requests hold it for their lifetime.
    pub(crate) fn config(&self) -> Arc<ActiveConfig> {
        self.active.load_full()
    }

    /// Reads and validates the file again; on success it replaces the configuration, on
    /// failure the old one keeps serving. Listener changes need a restart and are reported.
    pub(crate) fn reload(&self, trigger: &str) -> Result<Value, ConfigError> {
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
        let needs_restart = restart_needed(&self.config(), &new);
        let certificates = new.tls.as_ref().and_then(|t| t.certificates.clone());
        if let (Some(resolver), Some(store)) = (&self.tls_resolver, certificates) {
            resolver.replace(store);
        }
        for field in &needs_restart {
            log::warn!("reload ({trigger}): {field} changed; it takes effect only after a restart");
        }
        self.active.store(Arc::new(ActiveConfig::new(new)));
        self.refresh_secret_gauges();
        log::info!("reload ({trigger}) applied");
        Ok(json!({"reloaded": true, "needs_restart": needs_restart}))
    }

    /// The resolver the TLS listener is built with, if there is one.
    pub(crate) fn tls_resolver(&self) -> Option<Arc<SniResolver>> {
        self.tls_resolver.clone()
    }

    /// Why the gateway is not ready, if it is not.
    pub(crate) fn not_ready_reason(&self) -> Option<Value> {
        if self.drain.draining() {
            return Some(json!({"reason": "draining"}));
        }
        let active = self.config();
        if !active.ready_requires_secrets {
            return None;
        }
        let missing: Vec<Value> = presence(&active, &active.secrets, &self.reports)
            .into_iter()
            .filter(|p| !p.present)
            .map(|p| json!({"secret": p.secret, "upstream": p.upstream}))
            .collect();
        (!missing.is_empty()).then(|| json!({"reason": "secret_missing", "missing": missing}))
    }

    fn refresh_secret_gauges(&self) {
        let active = self.config();
        self.metrics
            .set_secret_presence(&presence(&active, &active.secrets, &self.reports));
    }

    /// Records an upstream's "NAME is not set" answer.
    pub(crate) fn upstream_reported_missing(&self, upstream: &str, secret: &str) {
        let (changed, log_now) = self.reports.report_missing(upstream, secret);
        if log_now {
            log::error!("upstream {upstream} answers that {secret} is not set; clients get 503 secret_missing until it is");
        }
        if changed {
            self.refresh_secret_gauges();
        }
    }

    /// An upstream answered well: what it reported missing is there now.
    pub(crate) fn upstream_answered_well(&self, upstream: &str) {
        if self.reports.report_ok(upstream) {
            log::info!("upstream {upstream} answers normally again");
            self.refresh_secret_gauges();
        }
    }
}
