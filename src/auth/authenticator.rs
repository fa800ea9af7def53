//! A policy's checks at run time: the keys, digests and caches [`AuthPolicy`] needs, made
//! with each configuration from its secret values, and the one decision per request.

use super::api_key::ApiKeyTable;
use super::credential::find_credential;
use super::forward::ForwardAuth;
use super::identity::{identity_headers, sign, signing_key};
use super::jwks::KeySet;
use super::jwks_remote::JwksRegistry;
use super::jwt::{JwtKeys, JwtVerifier};
use super::metrics::AuthMetrics;
use super::token_cache::TokenCache;
use super::{AuthFailure, AuthMethod, AuthPolicy, Identity, KeySource};
use crate::config::GatewayConfig;
use crate::secrets::SecretStore;
use http::header::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use ring::hmac;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Verified tokens kept per policy, so that a reconnect storm does not verify again.
const TOKEN_CACHE_ENTRIES: usize = 65_536;

/// The checks of every policy of one configuration.
#[derive(Default)]
pub(crate) struct Authenticator {
    by_policy: HashMap<String, PolicyCheck>,
}

struct PolicyCheck {
    /// `Err`: why the policy cannot let anyone through (a secret or key file it needs is
    /// missing or unusable): every request gets 503 until a reload fixes it. Fail closed.
    check: Result<Check, String>,
    signing_key: Option<hmac::Key>,
}

enum Check {
    Jwt {
        verifier: JwtVerifier,
        cache: TokenCache,
    },
    ApiKeys(ApiKeyTable),
    Forward(ForwardAuth),
}

/// The agent a request is for, as the policy sees it.
pub(crate) struct AgentRef<'a> {
    /// The URL segment sent upstream (`coder-agent`).
    pub(crate) slug: &'a str,
    /// The binding name as configured (`CoderAgent`).
    pub(crate) binding: &'a str,
    pub(crate) instance: &'a str,
}

/// A client let through, and what the upstream is told about it.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) identity: Identity,
    /// The identity headers and, when the policy signs, the signature headers.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl Authenticator {
    /// The checks of every policy of `config`, from the secret values read for it. JWKS files
    /// are read here (at start-up and on reload); JWKS URLs come from `jwks`, which outlives
    /// configurations.
    pub(crate) fn new(config: &GatewayConfig, secrets: &SecretStore, jwks: &JwksRegistry) -> Self {
        let by_policy = config
            .auth_policies
            .iter()
            .map(|(name, policy)| (name.clone(), PolicyCheck::new(policy, secrets, jwks)))
            .collect();
        Authenticator { by_policy }
    }

    /// Why each unusable policy cannot let anyone through, for `check` and the log.
    pub(crate) fn unusable(&self) -> Vec<(&str, &str)> {
        let mut list: Vec<(&str, &str)> = self
            .by_policy
            .iter()
            .filter_map(|(name, p)| {
                p.check
                    .as_ref()
                    .err()
                    .map(|why| (name.as_str(), why.as_str()))
            })
            .collect();
        list.sort_unstable();
        list
    }

    /// Decides whether `request` may reach `agent` under `policy`.
    pub(crate) async fn authenticate(
        &self,
        policy: &AuthPolicy,
        request: &RequestHeader,
        agent: &AgentRef<'_>,
        metrics: &AuthMetrics,
    ) -> Result<Verified, AuthFailure> {
        let Some(policy_check) = self.by_policy.get(&policy.name) else {
            return Err(AuthFailure::Unavailable(format!(
                "policy {} is not loaded",
                policy.name
            )));
        };
        let check = match &policy_check.check {
            Ok(check) => check,
            Err(why) => return Err(AuthFailure::Unavailable(why.clone())),
        };
        let credential = find_credential(&policy.credentials, request);
        let identity = match (check, credential) {
            (Check::Forward(forward), credential) => {
                let timed = |took| metrics.forward_answered(&policy.name, took);
                forward
                    .check_timed(request, credential.as_deref(), timed)
                    .await?
            }
            (_, None) => return Err(AuthFailure::Missing),
            (Check::Jwt { verifier, cache }, Some(token)) => match cache.get(&token) {
                Some(identity) => identity,
                None => {
                    let identity = verifier.verify(&token).await?;
                    cache.put(&token, &identity);
                    identity
                }
            },
            (Check::ApiKeys(table), Some(key)) => table.verify(&key)?,
        };
        if identity
            .expires_at
            .is_some_and(|expiry| expiry <= SystemTime::now())
        {
            return Err(AuthFailure::Expired);
        }
        policy
            .scope
            .check(&identity, agent.slug, agent.binding, agent.instance)?;
        let mut headers = identity_headers(&policy.identity_headers, &identity);
        if let Some(key) = &policy_check.signing_key {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signature = sign(key, &headers, agent.slug, agent.instance, now);
            headers.extend(signature);
        }
        Ok(Verified { identity, headers })
    }
}

impl PolicyCheck {
    fn new(policy: &AuthPolicy, secrets: &SecretStore, jwks: &JwksRegistry) -> Self {
        let secret = |name: &str| {
            secrets
                .get(name)
                .map(|v| v.expose().to_owned())
                .ok_or_else(|| format!("policy {}: secret {name} is missing", policy.name))
        };
        let signing_key = policy
            .sign_with
            .as_deref()
            .map(|name| secret(name).map(|v| signing_key(&v)));
        let check = match &policy.method {
            AuthMethod::Jwt(settings) => {
                let keys = match &settings.keys {
                    KeySource::Secret(name) => secret(name).and_then(|value| {
                        KeySet::from_secret(&value, &settings.algorithms)
                            .map(|set| JwtKeys::Static(Arc::new(set)))
                            .map_err(|why| format!("policy {}: secret {name}: {why}", policy.name))
                    }),
                    KeySource::JwksFile(path) => std::fs::read(path)
                        .map_err(|e| e.to_string())
                        .and_then(|bytes| KeySet::from_jwks_json(&bytes))
                        .map(|set| JwtKeys::Static(Arc::new(set)))
                        .map_err(|why| {
                            format!(
                                "policy {}: JWKS file {}: {why}",
                                policy.name,
                                path.display()
                            )
                        }),
                    KeySource::JwksUrl {
                        url,
                        refresh,
                        min_refetch,
                    } => jwks
                        .register(url, *refresh, *min_refetch)
                        .map(JwtKeys::Remote)
                        .map_err(|why| format!("policy {}: {why}", policy.name)),
                };
                keys.map(|keys| Check::Jwt {
                    verifier: JwtVerifier::new(settings, keys),
                    cache: TokenCache::new(TOKEN_CACHE_ENTRIES),
                })
            }
            AuthMethod::ApiKeys(settings) => settings
                .keys
                .iter()
                .map(|(subject, name)| secret(name).map(|value| (subject.clone(), value)))
                .collect::<Result<Vec<_>, _>>()
                .map(|keys| Check::ApiKeys(ApiKeyTable::new(keys))),
            AuthMethod::Forward(settings) => ForwardAuth::new(settings)
                .map(Check::Forward)
                .map_err(|why| format!("policy {}: {why}", policy.name)),
        };
        let (check, signing_key) = match (check, signing_key.transpose()) {
            (Ok(check), Ok(key)) => (Ok(check), key),
            (Err(why), _) | (_, Err(why)) => (Err(why), None),
        };
        PolicyCheck { check, signing_key }
    }
}
