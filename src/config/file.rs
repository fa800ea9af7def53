//! The serde-facing shape of `gateway.toml`: exactly what the file may say, nothing resolved.
//!
//! Fields that later checks may need to point at are [`Spanned`], so that an error names the
//! line and column of the value at fault. Defaults are applied by the validation in
//! [`super`], not here, so that every default is stated in one place.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

pub(crate) type SpannedString = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub(crate) server: ServerSection,
    #[serde(default)]
    pub(crate) admin: AdminSection,
    #[serde(default)]
    pub(crate) websocket: WebSocketSection,
    /// The default CORS and Origin policy of every route that has none of its own.
    pub(crate) cors: Option<CorsSection>,
    /// TLS termination: a second public listener.
    pub(crate) tls: Option<TlsSection>,
    #[serde(default)]
    pub(crate) limits: LimitsSection,
    #[serde(default)]
    pub(crate) log: LogSection,
    /// Upstream for requests outside every route prefix; without it they answer 404.
    pub(crate) fallback_upstream: Option<SpannedString>,
    #[serde(default)]
    pub(crate) routes: Vec<RouteSection>,
    #[serde(default)]
    pub(crate) upstreams: BTreeMap<String, UpstreamSection>,
    /// Where each secret comes from; a secret named only in `require` is read from the
    /// environment variable of its name.
    #[serde(default)]
    pub(crate) secrets: BTreeMap<String, SecretSection>,
    /// Authentication policies by name, for routes and agents to name in `auth`.
    #[serde(default)]
    pub(crate) auth: BTreeMap<String, AuthSection>,
}

/// `[auth.NAME]`: one policy. Which keys apply depends on `method`; the validation names any
/// key given to a method that does not use it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSection {
    /// `jwt`, `api_key` or `forward`.
    pub(crate) method: Option<SpannedString>,
    /// Where the credential is looked for, in order (`bearer`, `cookie:NAME`, ...).
    pub(crate) credentials: Option<Vec<SpannedString>>,
    pub(crate) algorithms: Option<Vec<SpannedString>>,
    pub(crate) jwks_url: Option<SpannedString>,
    pub(crate) jwks_file: Option<SpannedString>,
    pub(crate) jwks_refresh: Option<SpannedString>,
    /// A secret holding the HMAC key or a PEM public key.
    pub(crate) key_secret: Option<SpannedString>,
    pub(crate) issuers: Option<Vec<SpannedString>>,
    pub(crate) audiences: Option<Vec<SpannedString>>,
    pub(crate) leeway: Option<SpannedString>,
    /// API keys: subject -> the secret holding its key.
    pub(crate) keys: Option<Spanned<BTreeMap<String, SpannedString>>>,
    pub(crate) url: Option<SpannedString>,
    pub(crate) timeout: Option<SpannedString>,
    pub(crate) cache: Option<SpannedString>,
    pub(crate) subject_header: Option<SpannedString>,
    pub(crate) identity_from: Option<Vec<SpannedString>>,
    pub(crate) instance_claim: Option<SpannedString>,
    pub(crate) scope_claim: Option<SpannedString>,
    /// Claim -> the header that carries it upstream.
    pub(crate) identity_headers: Option<Spanned<BTreeMap<String, SpannedString>>>,
    pub(crate) sign_with: Option<SpannedString>,
    pub(crate) expiry_close_code: Option<Spanned<i64>>,
    pub(crate) expiry_close_reason: Option<SpannedString>,
    pub(crate) max_websockets_per_subject: Option<Spanned<i64>>,
    pub(crate) upgrades_per_subject_per_second: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretSection {
    pub(crate) env: Option<SpannedString>,
    pub(crate) file: Option<SpannedString>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSection {
    pub(crate) listen: Option<SpannedString>,
    pub(crate) threads: Option<Spanned<i64>>,
    pub(crate) drain_grace: Option<SpannedString>,
    pub(crate) upgrade_sock: Option<SpannedString>,
    /// Proxies (CIDR) whose X-Forwarded-For is believed.
    pub(crate) trusted_proxies: Option<Vec<SpannedString>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    pub(crate) listen: SpannedString,
    pub(crate) certificates: Spanned<Vec<CertificateSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CertificateSection {
    pub(crate) cert: SpannedString,
    pub(crate) key: SpannedString,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsSection {
    pub(crate) upgrades_per_ip_per_second: Option<Spanned<i64>>,
    pub(crate) websockets_per_ip: Option<Spanned<i64>>,
    pub(crate) websockets_total: Option<Spanned<i64>>,
    pub(crate) max_request_header_bytes: Option<Spanned<i64>>,
    pub(crate) max_request_body_bytes: Option<Spanned<i64>>,
    pub(crate) header_timeout: Option<SpannedString>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSection {
    pub(crate) format: Option<SpannedString>,
    pub(crate) level: Option<SpannedString>,
    pub(crate) access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSection {
    pub(crate) listen: Option<SpannedString>,
    pub(crate) ready_requires_secrets: Option<bool>,
}

/// `[websocket]`, and `[routes.websocket]` for one route: what a route leaves out it takes
/// from `[websocket]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebSocketSection {
    pub(crate) idle_timeout: Option<SpannedString>,
    pub(crate) close_timeout: Option<SpannedString>,
    pub(crate) upstream_lost_code: Option<Spanned<i64>>,
    pub(crate) max_message_bytes: Option<Spanned<i64>>,
    /// Client silence after which the gateway sends it a Ping.
    pub(crate) ping_interval: Option<SpannedString>,
    /// How long the client has to send anything after that Ping.
    pub(crate) ping_timeout: Option<SpannedString>,
    pub(crate) upstream_ping_interval: Option<SpannedString>,
    pub(crate) upstream_ping_timeout: Option<SpannedString>,
    pub(crate) tcp_keepalive_idle: Option<SpannedString>,
    pub(crate) tcp_keepalive_interval: Option<SpannedString>,
    pub(crate) tcp_keepalive_probes: Option<Spanned<i64>>,
    /// Data messages per second from the client, per connection, and the burst allowed.
    pub(crate) client_messages_per_second: Option<Spanned<i64>>,
    pub(crate) client_message_burst: Option<Spanned<i64>>,
    /// Bytes per second from the client, per connection, and the burst allowed.
    pub(crate) client_bytes_per_second: Option<Spanned<i64>>,
    pub(crate) client_bytes_burst: Option<Spanned<i64>>,
    /// The same for one client over all its connections.
    pub(crate) per_client_messages_per_second: Option<Spanned<i64>>,
    pub(crate) per_client_message_burst: Option<Spanned<i64>>,
    pub(crate) per_client_bytes_per_second: Option<Spanned<i64>>,
    pub(crate) per_client_bytes_burst: Option<Spanned<i64>>,
    /// `close` or `throttle`.
    pub(crate) rate_limit_action: Option<SpannedString>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteSection {
    pub(crate) name: Option<SpannedString>,
    pub(crate) prefix: Option<SpannedString>,
    pub(crate) upstream_prefix: Option<SpannedString>,
    pub(crate) default_instance: Option<SpannedString>,
    /// Replaces the global `[cors]` policy for this route, whole.
    pub(crate) cors: Option<CorsSection>,
    /// Secrets this route's agents need; defaults to OPENROUTER_API_KEY.
    pub(crate) require: Option<Vec<SpannedString>>,
    /// Overrides `[websocket]` for this route, key by key.
    pub(crate) websocket: Option<WebSocketSection>,
    /// The `[auth.NAME]` policy of this route's agents; `"none"` or absent: public.
    pub(crate) auth: Option<SpannedString>,
    #[serde(default)]
    pub(crate) agents: Vec<AgentSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CorsSection {
    #[serde(default)]
    pub(crate) allowed_origins: Vec<SpannedString>,
    #[serde(default)]
    pub(crate) allowed_origin_patterns: Vec<SpannedString>,
    pub(crate) allowed_methods: Option<Spanned<Vec<String>>>,
    pub(crate) allowed_headers: Option<Spanned<Vec<String>>>,
    pub(crate) exposed_headers: Option<Spanned<Vec<String>>>,
    pub(crate) allow_credentials: Option<Spanned<bool>>,
    pub(crate) max_age: Option<SpannedString>,
    pub(crate) allow_missing_origin: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentSection {
    pub(crate) name: SpannedString,
    pub(crate) upstream: SpannedString,
    pub(crate) slug: Option<SpannedString>,
    /// Overrides its route's WebSocket settings for this agent, key by key.
    pub(crate) websocket: Option<WebSocketSection>,
    /// Overrides its route's `auth` for this agent; `"none"` makes it public.
    pub(crate) auth: Option<SpannedString>,
}

/// One table for both kinds, so that a field given to the wrong kind gets a sentence of its
/// own ("`nodes` is for local upstreams") instead of serde's generic complaint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamSection {
    pub(crate) kind: SpannedString,
    pub(crate) nodes: Option<Spanned<Vec<SpannedString>>>,
    pub(crate) address: Option<SpannedString>,
    pub(crate) host: Option<SpannedString>,
    pub(crate) tls: Option<Spanned<bool>>,
    pub(crate) ca_file: Option<SpannedString>,
    pub(crate) connect_timeout: Option<SpannedString>,
    pub(crate) read_timeout: Option<SpannedString>,
    pub(crate) require: Option<Vec<SpannedString>>,
    /// Secret name -> request header that carries it upstream (local upstreams only).
    pub(crate) forward_secrets: Option<Spanned<BTreeMap<String, SpannedString>>>,
    pub(crate) probe_path: Option<SpannedString>,
    pub(crate) probe_interval: Option<SpannedString>,
    // A local upstream's fleet: its nodes from DNS instead of `nodes`, and their checks.
    pub(crate) dns: Option<SpannedString>,
    pub(crate) port: Option<Spanned<i64>>,
    pub(crate) srv: Option<SpannedString>,
    pub(crate) resolve_interval: Option<SpannedString>,
    pub(crate) nameserver: Option<SpannedString>,
    pub(crate) health_check: Option<SpannedString>,
    pub(crate) health_path: Option<SpannedString>,
    pub(crate) health_interval: Option<SpannedString>,
    pub(crate) health_timeout: Option<SpannedString>,
    pub(crate) healthy_after: Option<Spanned<i64>>,
    pub(crate) unhealthy_after: Option<Spanned<i64>>,
}
