//! Who may reach which agent: authentication and authorization at the edge, decided before
//! anything goes upstream.
//!
//! A route (or one of its agents) names an [`AuthPolicy`]: how the client proves who it is
//! ([`AuthMethod`]), where its credential is ([`credential`]), which instances it may open
//! ([`scope`]) and what the upstream is told about it ([`identity`]). The policy is plain
//! configuration; [`Authenticator`] holds what checking it needs at run time (keys, digests,
//! caches) and is made anew with every configuration, beside its secret values. A JWT policy's
//! keys are a [`jwks::KeySet`] (parsed from a secret or a JWKS document; [`jwks`] also picks
//! the keys a token is checked with), which may come from a JWKS URL that [`jwks_remote`]
//! fetches and keeps fresh.

pub mod api_key;
pub mod authenticator;
pub mod credential;
pub mod forward;
pub mod identity;
pub mod jwks;
pub mod jwks_remote;
pub mod jwt;
pub mod metrics;
pub mod scope;
#[cfg(test)]
pub(crate) mod test_keys;
pub mod token_cache;

pub(crate) use authenticator::Authenticator;

use credential::CredentialSource;
use http::header::HeaderName;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The default Close sent to a client whose token expires while its WebSocket is open.
pub(crate) const DEFAULT_EXPIRY_CLOSE_CODE: u16 = 1008;
pub(crate) const DEFAULT_EXPIRY_CLOSE_REASON: &str = "token expired";

/// A named policy from `[auth.NAME]`.
#[derive(Debug)]
pub(crate) struct AuthPolicy {
    pub(crate) name: String,
    pub(crate) method: AuthMethod,
    /// Where the credential is looked for, in this order.
    pub(crate) credentials: Vec<CredentialSource>,
    pub(crate) scope: scope::InstanceScope,
    /// Claim -> header sent upstream with its value.
    pub(crate) identity_headers: Vec<(String, HeaderName)>,
    /// The secret whose value keys the HMAC signature over the identity headers.
    pub(crate) sign_with: Option<String>,
    /// The Close a client gets when its token expires while its WebSocket is open.
    pub(crate) expiry_close_code: u16,
    pub(crate) expiry_close_reason: String,
    /// Open WebSockets per subject at once; `None`: unlimited.
    pub(crate) max_websockets_per_subject: Option<usize>,
    /// WebSocket upgrades per subject per second; `None`: unlimited.
    pub(crate) upgrades_per_subject_per_second: Option<u32>,
}

impl AuthPolicy {
    /// One line for `check`: the method, where its keys are, where the credential is looked
    /// for, and what is enforced. Names only, never a value.
    pub(crate) fn describe(&self) -> String {
        let method = match &self.method {
            AuthMethod::Jwt(jwt) => {
                let keys = match &jwt.keys {
                    KeySource::Secret(name) => format!("key from secret {name}"),
                    KeySource::JwksFile(path) => format!("JWKS file {}", path.display()),
                    KeySource::JwksUrl { url, .. } => format!("JWKS {url}"),
                };
                let algorithms: Vec<String> =
                    jwt.algorithms.iter().map(|a| format!("{a:?}")).collect();
                format!("jwt {} ({keys})", algorithms.join("/"))
            }
            AuthMethod::ApiKeys(keys) => format!("api_key ({} keys)", keys.keys.len()),
            AuthMethod::Forward(forward) => format!("forward to {}", forward.url),
        };
        let sources: Vec<String> = self.credentials.iter().map(ToString::to_string).collect();
        let mut line = format!(
            "{} = {method}; credential from {}",
            self.name,
            sources.join(", ")
        );
        if let Some(claim) = &self.scope.instance_claim {
            line.push_str(&format!("; instance = claim {claim}"));
        }
        if let Some(claim) = &self.scope.patterns_claim {
            line.push_str(&format!("; agent/instance in claim {claim}"));
        }
        if let Some(secret) = &self.sign_with {
            line.push_str(&format!("; identity signed with {secret}"));
        }
        line
    }

    /// The policy as `/config` shows it: names and settings, never a value.
    pub(crate) fn to_json(&self) -> Value {
        let sources: Vec<String> = self.credentials.iter().map(ToString::to_string).collect();
        let headers: Map<String, Value> = self
            .identity_headers
            .iter()
            .map(|(claim, header)| (claim.clone(), Value::from(header.as_str())))
            .collect();
        serde_json::json!({
            "name": self.name,
            "method": self.method.label(),
            "credentials": sources,
            "instance_claim": self.scope.instance_claim,
            "scope_claim": self.scope.patterns_claim,
            "identity_headers": headers,
            "signed_with": self.sign_with,
            "expiry_close": {"code": self.expiry_close_code, "reason": self.expiry_close_reason},
            "max_websockets_per_subject": self.max_websockets_per_subject,
            "upgrades_per_subject_per_second": self.upgrades_per_subject_per_second,
        })
    }
}

/// How a client proves who it is.
#[derive(Debug)]
pub(crate) enum AuthMethod {
    Jwt(JwtSettings),
    ApiKeys(ApiKeySettings),
    Forward(ForwardSettings),
}

impl AuthMethod {
    /// The `method` label of the auth metrics and the `method` key of the configuration.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            AuthMethod::Jwt(_) => "jwt",
            AuthMethod::ApiKeys(_) => "api_key",
            AuthMethod::Forward(_) => "forward",
        }
    }
}

#[derive(Debug)]
pub struct JwtSettings {
    /// The algorithms accepted; a token naming any other is invalid (no `none`, ever).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub keys: KeySource,
    /// Accepted `iss` values; empty: not checked.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; empty: not checked.
    pub audiences: Vec<String>,
    /// Allowed clock difference for `exp` and `nbf`.
    pub leeway: Duration,
}

/// Where a JWT policy's verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A secret from `[secrets]`: the shared key of HS* algorithms, or a PEM public key.
    Secret(String),
    /// A JWKS document on disk, read at start-up and on every reload.
    JwksFile(PathBuf),
    /// A JWKS URL, fetched at start and every `refresh`; an unknown `kid` fetches it again, at
    /// most once per `min_refetch`.
    JwksUrl {
        url: String,
        refresh: Duration,
        min_refetch: Duration,
    },
}

#[derive(Debug)]
pub(crate) struct ApiKeySettings {
    /// (subject, secret holding that subject's key).
    pub(crate) keys: Vec<(String, String)>,
}

#[derive(Debug)]
pub(crate) struct ForwardSettings {
    /// The auth service's URL; the original path and query go in `X-Forwarded-Uri`.
    pub(crate) url: String,
    /// How long the auth service may take; over it the request gets 503 (fail closed).
    pub(crate) timeout: Duration,
    /// How long an allowed answer is reused for the same credential; zero: never.
    pub(crate) cache_ttl: Duration,
    /// The answer header naming the subject (for per-subject limits and logs).
    pub(crate) subject_header: HeaderName,
    /// The auth service's answer headers that become identity claims (by their lowercase
    /// name), for `identity_headers` and the scope.
    pub(crate) identity_from: Vec<HeaderName>,
}

/// A client whose credential was verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Who it is: `sub`, an API key's name, or the forward-auth service's subject header.
    pub subject: String,
    /// What is known about it, by claim name: a JWT's claims, `{"sub": name}` for an API key,
    /// the `identity_from` headers of a forward-auth answer.
    pub claims: Map<String, Value>,
    /// When the credential stops being valid: a JWT's `exp` plus the policy's leeway.
    pub expires_at: Option<SystemTime>,
}

/// Why a request was not let through. Each maps to an answer and to a `result` label.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthFailure {
    /// No credential where the policy looks: 401.
    Missing,
    /// A credential that does not verify: 401. The text says why, without the credential.
    Invalid(String),
    /// A token past its `exp` (with leeway): 401.
    Expired,
    /// A verified client that may not open this instance: 403.
    Forbidden(String),
    /// The keys or the auth service are not available: 503, fail closed.
    Unavailable(String),
    /// The forward-auth service said no: its 401 or 403 goes to the client as it is.
    Denied {
        status: u16,
        headers: Vec<(HeaderName, http::HeaderValue)>,
        body: bytes::Bytes,
    },
}

impl AuthFailure {
    /// The `result` label of `agent_gateway_auth_decisions_total`.
    pub(crate) fn result(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid(_) => "invalid",
            AuthFailure::Expired => "expired",
            AuthFailure::Forbidden(_) => "forbidden",
            AuthFailure::Unavailable(_) => "auth_unavailable",
            AuthFailure::Denied { status: 403, .. } => "forbidden",
            AuthFailure::Denied { .. } => "invalid",
        }
    }
}

/// The `result` label of an allowed request.
pub(crate) const ALLOWED: &str = "allowed";
