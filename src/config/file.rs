//! The serde-facing shape of `gateway.toml`: exactly what the file may say, nothing resolved.
//!
//! Fields that later checks may need to point at are [`Spanned`], so that an error names the
//! line and column of the value at fault. Defaults are applied by the validation in
//! [`super`], not here, so that every default is stated in one place.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

pub type SpannedString = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub websocket: WebSocketSection,
    /// The default CORS and Origin policy of every route that has none of its own.
    pub cors: Option<CorsSection>,
    /// TLS termination: a second public listener.
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub log: LogSection,
    /// Upstream for requests outside every route prefix; without it they answer 404.
    pub fallback_upstream: Option<SpannedString>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    /// Where each secret comes from; a secret named only in `require` is read from the
    /// environment variable of its name.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSection {
    pub env: Option<SpannedString>,
    pub file: Option<SpannedString>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<SpannedString>,
    pub threads: Option<Spanned<i64>>,
    pub drain_grace: Option<SpannedString>,
    pub upgrade_sock: Option<SpannedString>,
    /// Proxies (CIDR) whose X-Forwarded-For is believed.
    pub trusted_proxies: Option<Vec<SpannedString>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub listen: SpannedString,
    pub certificates: Spanned<Vec<CertificateSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    pub cert: SpannedString,
    pub key: SpannedString,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub upgrades_per_ip_per_second: Option<Spanned<i64>>,
    pub websockets_per_ip: Option<Spanned<i64>>,
    pub websockets_total: Option<Spanned<i64>>,
    pub max_request_header_bytes: Option<Spanned<i64>>,
    pub max_request_body_bytes: Option<Spanned<i64>>,
    pub header_timeout: Option<SpannedString>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<SpannedString>,
    pub level: Option<SpannedString>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<SpannedString>,
    pub ready_requires_secrets: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSection {
    pub idle_timeout: Option<SpannedString>,
    pub close_timeout: Option<SpannedString>,
    pub upstream_lost_code: Option<Spanned<i64>>,
    pub max_message_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: Option<SpannedString>,
    pub prefix: Option<SpannedString>,
    pub upstream_prefix: Option<SpannedString>,
    pub default_instance: Option<SpannedString>,
    /// Replaces the global `[cors]` policy for this route, whole.
    pub cors: Option<CorsSection>,
    /// Secrets this route's agents need; defaults to OPENROUTER_API_KEY.
    pub require: Option<Vec<SpannedString>>,
    #[serde(default)]
    pub agents: Vec<AgentSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSection {
    #[serde(default)]
    pub allowed_origins: Vec<SpannedString>,
    #[serde(default)]
    pub allowed_origin_patterns: Vec<SpannedString>,
    pub allowed_methods: Option<Spanned<Vec<String>>>,
    pub allowed_headers: Option<Spanned<Vec<String>>>,
    pub exposed_headers: Option<Spanned<Vec<String>>>,
    pub allow_credentials: Option<Spanned<bool>>,
    pub max_age: Option<SpannedString>,
    pub allow_missing_origin: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub name: SpannedString,
    pub upstream: SpannedString,
    pub slug: Option<SpannedString>,
}

/// One table for both kinds, so that a field given to the wrong kind gets a sentence of its
/// own ("`nodes` is for local upstreams") instead of serde's generic complaint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub kind: SpannedString,
    pub nodes: Option<Spanned<Vec<SpannedString>>>,
    pub address: Option<SpannedString>,
    pub host: Option<SpannedString>,
    pub tls: Option<Spanned<bool>>,
    pub ca_file: Option<SpannedString>,
    pub connect_timeout: Option<SpannedString>,
    pub read_timeout: Option<SpannedString>,
    pub require: Option<Vec<SpannedString>>,
    /// Secret name -> request header that carries it upstream (local upstreams only).
    pub forward_secrets: Option<Spanned<BTreeMap<String, SpannedString>>>,
    pub probe_path: Option<SpannedString>,
    pub probe_interval: Option<SpannedString>,
}
