//! The gateway's shared runtime state: the configuration in force with its secret values
//! (swapped whole on reload), and the parts every request may touch: metrics, limits, drain,
//! open connections, what upstreams reported about their secrets, the TLS certificates.

use super::drain::{ConnectionTracker, Drain};
use super::reload::restart_needed;
use crate::auth::jwks_remote::JwksRegistry;
use crate::auth::Authenticator;
use crate::config::{ConfigError, GatewayConfig};
use crate::edge::limits::LimitState;
use crate::edge::tls::SniResolver;
use crate::fleet::{Fleet, Fleets};
use crate::secrets::presence::presence;
use crate::secrets::reports::UpstreamReports;
use crate::secrets::SecretStore;
use crate::telemetry::metrics::Metrics;
use crate::upstream::UpstreamKind;
use crate::websocket::pump::PumpSettings;
use crate::websocket::rate_limit::ClientBuckets;
use arc_swap::ArcSwap;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

/// A validated configuration with the secret values read for it: what a request is served
/// under from start to end, so a reload never changes it under a request or connection.
pub(crate) struct ActiveConfig {
    pub(crate) config: GatewayConfig,
    pub(crate) secrets: SecretStore,
    /// The per-client rate-limit buckets of this configuration: made anew with each one, so
    /// that a reload starts them full.
    pub(crate) client_limits: ClientLimits,
    /// The checks of the authentication policies, with their keys and caches.
    pub(crate) auth: Authenticator,
    /// The fleets of the `local` upstreams, by upstream name: made once and kept across
    /// reloads by [`Fleets`], so that node health and discovered nodes survive them.
    pub(crate) fleets: HashMap<String, Arc<Fleet>>,
}

impl ActiveConfig {
    /// Reads the secrets `config` names (start-up and reload do this, parsing does not),
    /// and the JWKS files its policies name. JWKS URLs are `jwks`'s, which outlives it, as
    /// the fleets are `fleets`'s: a changed placement closes the connections it moves.
    pub(crate) fn new(config: GatewayConfig, jwks: &JwksRegistry, fleets: &Fleets) -> Self {
        let secrets = SecretStore::read(&config);
        let client_limits = ClientLimits::of(&config);
        let auth = Authenticator::new(&config, &secrets, jwks);
        for (_, why) in auth.unusable() {
            log::error!("{why}; its agents answer 503 auth_unavailable until a reload fixes it");
        }
        let fleets = fleets.configure(config.upstreams.values().filter_map(|u| match &u.kind {
            UpstreamKind::Local { fleet } => Some((u.name.as_str(), fleet)),
            UpstreamKind::Worker { .. } => None,
        }));
        ActiveConfig {
            config,
            secrets,
            client_limits,
            auth,
            fleets,
        }
    }
}

/// The per-client rate-limit buckets, one set per WebSocket settings that have per-client
/// limits: a route's (shared by its agents) or an agent's own.
#[derive(Default)]
pub(crate) struct ClientLimits {
    /// By the address of the settings: agents that share their route's settings (one `Arc`)
    /// share its buckets. The configuration holds those `Arc`s as long as this.
    by_settings: HashMap<usize, Arc<ClientBuckets>>,
    /// Those of the global `[websocket]`, for the fallback upstream.
    fallback: Option<Arc<ClientBuckets>>,
}

impl ClientLimits {
    fn of(config: &GatewayConfig) -> Self {
        let mut by_settings = HashMap::new();
        for agent in config.routes.iter().flat_map(|r| r.agents.values()) {
            let key = Self::key(&agent.websocket);
            if by_settings.contains_key(&key) {
                continue;
            }
            let limits = agent.websocket.rate_limits.as_ref();
            if let Some(buckets) = limits.and_then(ClientBuckets::new) {
                by_settings.insert(key, buckets);
            }
        }
        let fallback = config
            .websocket
            .rate_limits
            .as_ref()
            .and_then(ClientBuckets::new);
        ClientLimits {
            by_settings,
            fallback,
        }
    }

    fn key(settings: &Arc<PumpSettings>) -> usize {
        Arc::as_ptr(settings) as usize
    }

    /// The buckets of an agent's settings; `None`: the fallback upstream's.
    pub(crate) fn buckets(&self, agent: Option<&Arc<PumpSettings>>) -> Option<&Arc<ClientBuckets>> {
        match agent {
            Some(settings) => self.by_settings.get(&Self::key(settings)),
            None => self.fallback.as_ref(),
        }
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
    /// The JWKS URLs of every policy so far, with their keys: kept across reloads.
    pub(crate) jwks: Arc<JwksRegistry>,
    /// The `local` upstreams' nodes, health and open connections: kept across reloads.
    pub(crate) fleets: Arc<Fleets>,
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
        let jwks = Arc::new(JwksRegistry::default());
        let metrics = Metrics::new();
        let fleets = Arc::new(Fleets::new(metrics.fleet.clone()));
        let state = Arc::new(GatewayState {
            tls_resolver,
            active: ArcSwap::from_pointee(ActiveConfig::new(config, &jwks, &fleets)),
            jwks,
            fleets,
            config_path,
            metrics,
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
        self.active
            .store(Arc::new(ActiveConfig::new(new, &self.jwks, &self.fleets)));
        self.refresh_secret_gauges();
        log::info!("reload ({trigger}) applied");
        Ok(json!({"reloaded": true, "needs_restart": needs_restart}))
    }

    /// The resolver the TLS listener is built with, if there is one.
    pub(crate) fn tls_resolver(&self) -> Option<Arc<SniResolver>> {
        self.tls_resolver.clone()
    }

    /// Starts the drain: every agent WebSocket gets Close 1001, new upgrades are refused.
    pub(crate) fn start_drain(&self) {
        self.drain.start();
        self.fleets.owners.drain();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{parse, UPSTREAMS};

    /// Agents that share their route's settings share its per-client buckets; an agent with
    /// per-client limits of its own has its own; each configuration has new ones.
    #[test]
    fn per_client_buckets_follow_the_settings_they_were_made_for() {
        let text = format!(
            "{UPSTREAMS}[[routes]]\nrequire = []\n[routes.websocket]\nper_client_messages_per_second = 5\n\
             [[routes.agents]]\nname = \"A\"\nupstream = \"local\"\n\
             [[routes.agents]]\nname = \"B\"\nupstream = \"local\"\n\
             [[routes.agents]]\nname = \"C\"\nupstream = \"local\"\n[routes.agents.websocket]\nper_client_message_burst = 9\n\
             [[routes.agents]]\nname = \"D\"\nupstream = \"local\"\n[routes.agents.websocket]\nper_client_messages_per_second = 0\n"
        );
        let config = parse(&text);
        let limits = ClientLimits::of(&config);
        let agents = &config.routes[0].agents;
        let buckets = |name: &str| limits.buckets(Some(&agents[name].websocket));
        let (a, b, c) = (buckets("a"), buckets("b"), buckets("c"));
        assert!(a.zip(b).is_some_and(|(a, b)| Arc::ptr_eq(a, b)));
        assert!(a.zip(c).is_some_and(|(a, c)| !Arc::ptr_eq(a, c)));
        assert!(
            buckets("d").is_none(),
            "its own settings have no per-client limit"
        );
        assert!(limits.buckets(None).is_none(), "no global per-client limit");
        let again = ClientLimits::of(&config);
        let fresh = again.buckets(Some(&agents["a"].websocket));
        assert!(a.zip(fresh).is_some_and(|(a, f)| !Arc::ptr_eq(a, f)));
    }
}
