//! Configuration: loading `gateway.toml` into the validated runtime form.
//!
//! [`file`] is what serde reads; [`GatewayConfig`] is what the gateway runs on. Everything that
//! can be checked is checked here, once, so the request path never meets an unresolved name.

mod context;
mod extract;
mod extract_auth;
mod extract_fleet;
mod extract_routes;
mod extract_upstreams;
mod extract_websocket;
mod file;
/// Configuration texts the unit tests of other modules share.
#[cfg(test)]
pub(crate) mod fixtures;
mod values;

use crate::auth::AuthPolicy;
use crate::edge::client_address::Cidr;
use crate::edge::cors::CorsPolicy;
use crate::edge::limits::LimitSettings;
use crate::edge::tls::CertStore;
use crate::upstream::{load_ca_file, NamedFile, Upstream, UpstreamKind};
use crate::websocket::pump::PumpSettings;
use context::Ctx;
use file::ConfigFile;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub(crate) const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;
/// Under the 30 s and 60 s idle timeouts common in load balancers and NATs.
pub(crate) const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(25);
pub(crate) const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive: the kernel's backstop, dead after 60 s + 6 x 10 s without an answer.
pub(crate) const DEFAULT_TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_TCP_KEEPALIVE_PROBES: u32 = 6;
pub(crate) const DEFAULT_UPGRADE_SOCK: &str = "/tmp/agent-gateway-upgrade.sock";
pub(crate) const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_PREFIX: &str = "/agents";
pub(crate) const DEFAULT_INSTANCE: &str = "default";
pub(crate) const DEFAULT_THREADS: usize = 2;
/// The secret agent routes require unless they say otherwise.
pub(crate) const DEFAULT_REQUIRED: &str = "OPENROUTER_API_KEY";

/// Where a secret's value is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// Where to set it, for hints.
    pub(crate) fn describe(&self) -> String {
        match self {
            SecretSource::Env(var) => format!("the environment variable {var}"),
            SecretSource::File(path) => format!("the file {}", path.display()),
        }
    }
}

/// The validated configuration the gateway runs on.
#[derive(Debug)]
pub struct GatewayConfig {
    pub(crate) listen: String,
    /// Metrics, health and drain; never the public listener.
    pub(crate) admin_listen: String,
    pub(crate) threads: usize,
    pub(crate) websocket: PumpSettings,
    /// Longest prefix first, so nested prefixes resolve to the most specific route.
    pub(crate) routes: Vec<Route>,
    pub(crate) upstreams: BTreeMap<String, Arc<Upstream>>,
    pub(crate) fallback_upstream: Option<Arc<Upstream>>,
    /// The global policy, also applied to the fallback upstream; `None`: no CORS handling.
    pub(crate) cors: Option<Arc<CorsPolicy>>,
    /// Where every secret the file names comes from. Values are read at start-up and on
    /// reload by [`crate::secrets::SecretStore`], never here.
    pub(crate) secrets: BTreeMap<String, SecretSource>,
    /// How long open WebSockets get to finish after Close 1001 on SIGTERM.
    pub(crate) drain_grace: Duration,
    /// The Unix socket over which a new process (`run --upgrade`) takes the listeners over.
    pub(crate) upgrade_sock: PathBuf,
    /// `/readyz` answers 503 while a required secret is missing.
    pub(crate) ready_requires_secrets: bool,
    pub(crate) limits: LimitSettings,
    pub(crate) trusted_proxies: Vec<Cidr>,
    /// The TLS listener and its certificates, read at load (and so at every reload).
    pub(crate) tls: Option<TlsListener>,
    pub log: LogSettings,
    /// The `[auth.NAME]` policies, by name; routes and agents hold the ones they use.
    pub(crate) auth_policies: BTreeMap<String, Arc<AuthPolicy>>,
}

#[derive(Debug)]
pub(crate) struct TlsListener {
    pub(crate) listen: String,
    /// (certificate chain, private key) PEM files.
    pub(crate) certificate_files: Vec<(NamedFile, NamedFile)>,
    /// Where `certificates` stands in the configuration file, for errors.
    pub(crate) named_at: (usize, usize),
    /// The certificates, read by [`GatewayConfig::load`] after parsing.
    pub(crate) certificates: Option<Arc<CertStore>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub json: bool,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` environment variable wins over it.
    pub level: String,
    /// One line per HTTP request and one per WebSocket at close.
    pub(crate) access_log: bool,
}

#[derive(Debug)]
pub(crate) struct Route {
    /// Stable name, used in logs and metric labels.
    pub(crate) name: String,
    pub(crate) prefix: String,
    /// The prefix of the path sent upstream (the Agents SDK's default is `/agents`).
    pub(crate) upstream_prefix: String,
    pub(crate) default_instance: String,
    /// This route's policy, or the global one; `None`: Origin unchecked, headers untouched.
    pub(crate) cors: Option<Arc<CorsPolicy>>,
    /// Agents by [`fold_key`](crate::routing::agent_name::fold_key).
    pub(crate) agents: HashMap<String, Arc<Agent>>,
    /// Its WebSocket settings (`[websocket]` with `[routes.websocket]` over it).
    pub(crate) websocket: Arc<PumpSettings>,
}

#[derive(Debug)]
pub(crate) struct Agent {
    /// The binding name as configured (`CoderAgent`).
    pub(crate) name: String,
    /// The URL segment the upstream expects (`coder-agent`).
    pub(crate) slug: String,
    pub(crate) upstream: Arc<Upstream>,
    /// Secrets requests to this agent need: its route's and its upstream's.
    pub(crate) required_secrets: Vec<String>,
    /// Its WebSocket settings: its route's, or with its own `[routes.agents.websocket]` over
    /// them (`own_websocket`).
    pub(crate) websocket: Arc<PumpSettings>,
    pub(crate) own_websocket: bool,
    /// Who may reach it: its own `auth`, else its route's; `None`: anyone.
    pub(crate) auth: Option<Arc<AuthPolicy>>,
}

impl Route {
    /// Configured agent names, sorted, for "known agents" answers.
    pub(crate) fn agent_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.agents.values().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        names
    }
}

/// A configuration problem, located in its file.
#[derive(Debug)]
pub struct ConfigError {
    pub(crate) file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub(crate) position: Option<(usize, usize)>,
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => {
                write!(
                    f,
                    "{}:{line}:{column}: {}",
                    self.file.display(),
                    self.message
                )
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl GatewayConfig {
    /// Reads and validates the file at `path`.
    /// Reading is a step of its own after parsing, so that parsing does no I/O: the
    /// certificates and CA files the configuration names are read here, and a file that
    /// cannot be used fails the load, not the first connection.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            position: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        let mut config = Self::parse(&text, path)?;
        config.read_named_files(path)?;
        Ok(config)
    }

    fn read_named_files(&mut self, path: &Path) -> Result<(), ConfigError> {
        let error = |at: (usize, usize), message: String| ConfigError {
            file: path.to_owned(),
            position: Some(at),
            message,
        };
        for upstream in self.upstreams.values() {
            if let UpstreamKind::Worker {
                ca_file: Some(file),
                ca,
                ..
            } = &upstream.kind
            {
                let loaded = load_ca_file(&file.path).map_err(|why| {
                    error(
                        file.at,
                        format!("cannot use {} as a CA file: {why}", file.path.display()),
                    )
                })?;
                // Set once: this configuration was parsed just now and is read once.
                let _ = ca.set(loaded);
            }
        }
        if let Some(tls) = &mut self.tls {
            let pairs: Vec<(&Path, &Path)> = tls
                .certificate_files
                .iter()
                .map(|(cert, key)| (cert.path.as_path(), key.path.as_path()))
                .collect();
            let store = CertStore::load(&pairs).map_err(|why| {
                error(tls.named_at, format!("cannot use the certificates: {why}"))
            })?;
            tls.certificates = Some(Arc::new(store));
        }
        Ok(())
    }

    /// Validates `text` as if read from `path` (used for error positions and relative paths).
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let ctx = Ctx { text, path };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            ctx.error_at(e.span(), message)
        })?;
        ctx.validate(file)
    }
}

impl Ctx<'_> {
    /// One extractor per section. They run in this order, which decides the fault reported
    /// for a file with several: keep it. Files the configuration names (CA files,
    /// certificates) are read after all of them, by [`GatewayConfig::load`].
    fn validate(&self, file: ConfigFile) -> Result<GatewayConfig, ConfigError> {
        let (listen, admin_listen) = self.extract_listeners(&file.server, &file.admin)?;
        let websocket = self.extract_websocket(&file.websocket)?;
        let threads = self.extract_threads(file.server.threads.as_ref())?;
        let mut secrets = self.extract_secrets(&file.secrets)?;
        let upstreams = self.extract_upstreams(file.upstreams)?;
        let fallback_upstream = file
            .fallback_upstream
            .as_ref()
            .map(|r| self.upstream_named(&upstreams, r))
            .transpose()?;
        let cors = file
            .cors
            .as_ref()
            .map(|c| self.extract_cors(c))
            .transpose()?;
        let auth_policies = self.extract_auth(&file.auth, &mut secrets)?;
        let routes = self.extract_routes(
            file.routes,
            &upstreams,
            cors.as_ref(),
            &file.websocket,
            &auth_policies,
        )?;
        extract::add_required_secrets(&mut secrets, &routes);
        let drain_grace =
            self.duration_or(file.server.drain_grace.as_ref(), DEFAULT_DRAIN_GRACE)?;
        let tls = file
            .tls
            .as_ref()
            .map(|t| self.extract_tls(t, &listen, &admin_listen))
            .transpose()?;
        let limits = self.extract_limits(&file.limits)?;
        let trusted_proxies = self
            .extract_trusted_proxies(file.server.trusted_proxies.as_deref().unwrap_or_default())?;
        let log = self.extract_log(&file.log)?;
        Ok(GatewayConfig {
            listen,
            admin_listen,
            threads,
            websocket,
            routes,
            upstreams,
            fallback_upstream,
            cors,
            secrets,
            drain_grace,
            upgrade_sock: self.upgrade_sock(file.server.upgrade_sock.as_ref()),
            ready_requires_secrets: file.admin.ready_requires_secrets.unwrap_or(true),
            limits,
            trusted_proxies,
            tls,
            log,
            auth_policies,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Also the fixture the extractors' tests start from.
    use super::*;

    pub(crate) const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"

[upstreams.local]
kind = "local"
nodes = ["127.0.0.1:8787", "127.0.0.1:8788"]

[upstreams.cloud]
kind = "worker"
address = "agents.example.com"

[[routes]]
prefix = "/agents"

[[routes.agents]]
name = "CoderAgent"
upstream = "local"

[[routes.agents]]
name = "Chat"
upstream = "cloud"
slug = "chat-v2"
"#;

    pub(crate) fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(text, Path::new("gateway.toml"))
    }

    pub(crate) fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    /// The error of loading `text` from a file: what the files it names add to parsing.
    pub(crate) fn load_error_of(text: &str) -> String {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).expect("written");
        let error = GatewayConfig::load(&path).expect_err("config should be refused");
        assert_eq!(error.file, path);
        match error.position {
            Some((line, column)) => format!("gateway.toml:{line}:{column}: {}", error.message),
            None => format!("gateway.toml: {}", error.message),
        }
    }

    #[test]
    fn parsing_reads_no_named_file_and_loading_does() {
        let text = GOOD.replace(
            "address = \"agents.example.com\"",
            "address = \"a:1\"\nca_file = \"/nonexistent/ca.pem\"",
        );
        assert!(parse(&text).is_ok(), "parsing must not read the CA file");
        let err = load_error_of(&text);
        assert!(
            err.starts_with("gateway.toml:12:11: cannot use /nonexistent/ca.pem as a CA file: "),
            "{err}"
        );
    }

    #[test]
    fn syntax_and_unknown_fields_name_line_and_column() {
        let err = error_of(&GOOD.replace("kind = \"local\"", "kind = \"local\"\nweight = 3"));
        assert!(err.starts_with("gateway.toml:7:1: "), "{err}");
        assert!(err.contains("unknown field `weight`"), "{err}");
        let err = error_of("[server\nlisten = 1");
        assert!(err.starts_with("gateway.toml:1:"), "{err}");
    }

    #[test]
    fn absent_sections_take_the_defaults() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.listen, "127.0.0.1:8080");
        assert_eq!(config.admin_listen, DEFAULT_ADMIN_LISTEN);
        assert_eq!(config.threads, DEFAULT_THREADS);
        assert_eq!(config.drain_grace, DEFAULT_DRAIN_GRACE);
        assert_eq!(config.upgrade_sock, Path::new(DEFAULT_UPGRADE_SOCK));
        assert!(config.ready_requires_secrets);
        assert!(config.fallback_upstream.is_none());
        assert!(config.cors.is_none());
        assert!(config.tls.is_none());
        assert!(config.trusted_proxies.is_empty());
        assert_eq!(config.limits, LimitSettings::default());
        assert_eq!(
            config.log,
            LogSettings {
                json: false,
                level: "info".to_owned(),
                access_log: true,
            }
        );
        assert_eq!(config.websocket.idle_timeout, None);
        assert_eq!(config.websocket.close_timeout, DEFAULT_CLOSE_TIMEOUT);
        assert_eq!(
            config.websocket.max_message_bytes,
            Some(DEFAULT_MAX_MESSAGE_BYTES)
        );
        assert_eq!(config.websocket.upstream_lost_code, 1011);
        assert_eq!(
            config.secrets,
            BTreeMap::from([(
                DEFAULT_REQUIRED.to_owned(),
                SecretSource::Env(DEFAULT_REQUIRED.to_owned())
            )])
        );
    }

    #[test]
    fn missing_file_is_reported_without_position() {
        let err =
            GatewayConfig::load(Path::new("/nonexistent/gateway.toml")).expect_err("no such file");
        assert_eq!(err.position, None);
        assert!(
            err.to_string()
                .starts_with("/nonexistent/gateway.toml: cannot read the configuration file: "),
            "{err}"
        );
    }

    /// With several faults, the first section in `validate`'s order is the one reported.
    #[test]
    fn sections_are_checked_in_order() {
        let faults = [
            ("[server]\n", "[server]\nthreads = 0\n"),
            (
                "[[routes]]\n",
                "[websocket]\nidle_timeout = \"x\"\n\n[[routes]]\n",
            ),
        ];
        let text = faults
            .iter()
            .fold(GOOD.to_owned(), |t, (a, b)| t.replacen(a, b, 1));
        assert!(
            error_of(&text).contains("a duration is a number"),
            "websocket before threads"
        );
        let text = GOOD.replacen("[server]\n", "[server]\nthreads = 0\n", 1)
            + "\n[limits]\nwebsockets_total = -1\n";
        assert!(
            error_of(&text).contains("`threads`"),
            "threads before limits"
        );
        let text = GOOD.to_owned()
            + "\n[log]\nformat = \"xml\"\n[tls]\nlisten = \"127.0.0.1:8080\"\ncertificates = []\n";
        assert!(error_of(&text).contains("TLS listener"), "tls before log");
    }
}
