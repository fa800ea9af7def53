//! The one answer to "does the gateway hold secret X for agent Y?". The request path,
//! readiness, the secret gauges, `check` and `/config` all ask here.

use super::reports::UpstreamReports;
use super::SecretStore;
use crate::config::{Agent, GatewayConfig, SecretSource};
use crate::upstream::{Upstream, UpstreamKind};

/// What the gateway knows of one secret an upstream needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SecretState<'a> {
    /// A Worker keeps it as a Worker secret; the gateway cannot see it.
    KeptByWorker,
    /// The gateway holds the deployment's copy (local upstreams) and may forward it.
    Held {
        source: Option<&'a SecretSource>,
        present: bool,
    },
}

/// The state of `secret` for requests to `upstream`.
pub(crate) fn secret_state<'a>(
    config: &'a GatewayConfig,
    store: &SecretStore,
    upstream: &Upstream,
    secret: &str,
) -> SecretState<'a> {
    if !upstream.is_local() {
        return SecretState::KeptByWorker;
    }
    SecretState::Held {
        source: config.secrets.get(secret),
        present: store.holds(secret),
    }
}

/// Where a secret must be set for `upstream`, for answers and `check`; `source` is where the
/// gateway reads its own copy, when it holds one.
pub(crate) fn hint(upstream: &Upstream, secret: &str, source: Option<&SecretSource>) -> String {
    match (&upstream.kind, source) {
        (UpstreamKind::Worker { .. }, _) => format!(
            "the Worker behind upstream {} needs it: wrangler secret put {secret}",
            upstream.name
        ),
        (UpstreamKind::Local { .. }, Some(source)) => format!(
            "set {} for the gateway, then reload it (SIGHUP or POST /reload)",
            source.describe()
        ),
        (UpstreamKind::Local { .. }, None) => format!(
            "set {secret} where the agent backend of upstream {} reads it",
            upstream.name
        ),
    }
}

/// A secret an agent needs that the gateway should hold and does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MissingSecret<'a> {
    pub(crate) secret: &'a str,
    pub(crate) hint: String,
}

/// The first secret `agent` needs that the gateway should hold and does not.
pub(crate) fn first_missing<'a>(
    config: &GatewayConfig,
    store: &SecretStore,
    agent: &'a Agent,
) -> Option<MissingSecret<'a>> {
    agent.required_secrets.iter().find_map(|secret| {
        match secret_state(config, store, &agent.upstream, secret) {
            SecretState::Held {
                source,
                present: false,
            } => Some(MissingSecret {
                secret,
                hint: hint(&agent.upstream, secret, source),
            }),
            _ => None,
        }
    })
}

/// One secret an upstream's agents need, and whether it is there as far as the gateway can
/// tell: its own copy for secrets it holds, and what the upstream last said.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SecretPresence {
    pub(crate) secret: String,
    pub(crate) upstream: String,
    pub(crate) present: bool,
}

/// Every (secret, upstream) pair the routes need, sorted.
pub(crate) fn presence(
    config: &GatewayConfig,
    store: &SecretStore,
    reports: &UpstreamReports,
) -> Vec<SecretPresence> {
    let mut all: Vec<SecretPresence> = Vec::new();
    for agent in config.routes.iter().flat_map(|r| r.agents.values()) {
        let upstream = &agent.upstream;
        for secret in &agent.required_secrets {
            if all
                .iter()
                .any(|p| p.secret == *secret && p.upstream == upstream.name)
            {
                continue;
            }
            let held = match secret_state(config, store, upstream, secret) {
                SecretState::KeptByWorker => true,
                SecretState::Held { present, .. } => present,
            };
            all.push(SecretPresence {
                secret: secret.clone(),
                upstream: upstream.name.clone(),
                present: held && !reports.is_missing(&upstream.name, secret),
            });
        }
    }
    all.sort();
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::requiring_missing;

    fn config() -> GatewayConfig {
        requiring_missing("PRESENCE_TEST_UNSET", "")
    }

    #[test]
    fn a_local_agent_misses_what_the_gateway_lacks_and_a_worker_keeps_its_own() {
        let config = config();
        let store = SecretStore::read(&config);
        let route = &config.routes[0];
        let missing = first_missing(&config, &store, &route.agents["coderagent"]).expect("missing");
        assert_eq!(missing.secret, "PRESENCE_TEST_UNSET");
        assert!(
            missing.hint.contains("/nonexistent/PRESENCE_TEST_UNSET"),
            "{}",
            missing.hint
        );
        assert_eq!(first_missing(&config, &store, &route.agents["chat"]), None);
    }

    #[test]
    fn presence_combines_the_gateway_copy_and_upstream_reports() {
        let config = config();
        let store = SecretStore::read(&config);
        let reports = UpstreamReports::default();
        let names = |all: Vec<SecretPresence>| -> Vec<(String, bool)> {
            all.into_iter().map(|p| (p.upstream, p.present)).collect()
        };
        assert_eq!(
            names(presence(&config, &store, &reports)),
            vec![("cloud".to_owned(), true), ("local".to_owned(), false)]
        );
        reports.report_missing("cloud", "PRESENCE_TEST_UNSET");
        assert_eq!(
            names(presence(&config, &store, &reports)),
            vec![("cloud".to_owned(), false), ("local".to_owned(), false)]
        );
    }
}
