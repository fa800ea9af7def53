//! Configuration: loading `gateway.toml` into the validated runtime form.
//!
//! [`file`] is what serde reads; [`GatewayConfig`] is what the gateway runs on. Everything that
//! can be checked is checked here, once, so the request path never meets an unresolved name.

mod file;

use crate::edge::client_address::Cidr;
use crate::edge::cors::{CorsPolicy, CorsSpec, CorsSpecError};
use crate::edge::limits::LimitSettings;
use crate::routing::agent_name::{fold_key, is_valid_agent_name, sdk_slug};
use crate::routing::agent_path::parse_agent_path;
use crate::secrets::{Secret, SecretSource, DEFAULT_REQUIRED};
use crate::upstream::{
    Node, Probe, Upstream, UpstreamKind, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT,
};
use crate::websocket::pump::PumpSettings;
use file::{ConfigFile, CorsSection, SpannedString, UpstreamSection};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/agent-gateway-upgrade.sock";
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_PREFIX: &str = "/agents";
pub const DEFAULT_INSTANCE: &str = "default";
pub const DEFAULT_THREADS: usize = 2;

/// The validated configuration the gateway runs on.
#[derive(Debug)]
pub struct GatewayConfig {
    pub listen: String,
    /// Metrics, health and drain; never the public listener.
    pub admin_listen: String,
    pub threads: usize,
    pub websocket: PumpSettings,
    /// Longest prefix first, so nested prefixes resolve to the most specific route.
    pub routes: Vec<Route>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub fallback_upstream: Option<Arc<Upstream>>,
    /// The global policy, also applied to the fallback upstream; `None`: no CORS handling.
    pub cors: Option<Arc<CorsPolicy>>,
    /// Every secret the file names, with its value as read at load.
    pub secrets: BTreeMap<String, Secret>,
    /// How long open WebSockets get to finish after Close 1001 on SIGTERM.
    pub drain_grace: Duration,
    /// The Unix socket over which a new process (`run --upgrade`) takes the listeners over.
    pub upgrade_sock: PathBuf,
    /// `/readyz` answers 503 while a required secret is missing.
    pub ready_requires_secrets: bool,
    pub limits: LimitSettings,
    pub trusted_proxies: Vec<Cidr>,
    /// The TLS listener and its certificates, read at load (and so at every reload).
    pub tls: Option<TlsListener>,
    pub log: LogSettings,
}

#[derive(Debug)]
pub struct TlsListener {
    pub listen: String,
    pub certificates: Arc<crate::edge::tls::CertStore>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub json: bool,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` environment variable wins over it.
    pub level: String,
    /// One line per HTTP request and one per WebSocket at close.
    pub access_log: bool,
}

#[derive(Debug)]
pub struct Route {
    /// Stable name, used in logs and metric labels.
    pub name: String,
    pub prefix: String,
    /// The prefix of the path sent upstream (the Agents SDK's default is `/agents`).
    pub upstream_prefix: String,
    pub default_instance: String,
    /// This route's policy, or the global one; `None`: Origin unchecked, headers untouched.
    pub cors: Option<Arc<CorsPolicy>>,
    /// Agents by [`fold_key`].
    pub agents: HashMap<String, Arc<Agent>>,
}

#[derive(Debug)]
pub struct Agent {
    /// The binding name as configured (`CoderAgent`).
    pub name: String,
    /// The URL segment the upstream expects (`coder-agent`).
    pub slug: String,
    pub upstream: Arc<Upstream>,
    /// Secrets requests to this agent need: its route's and its upstream's.
    pub required_secrets: Vec<String>,
}

impl Route {
    /// Configured agent names, sorted, for "known agents" answers.
    pub fn agent_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.agents.values().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        names
    }
}

/// A configuration problem, located in its file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
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
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            position: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (used for error positions and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let ctx = Ctx { text, path };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            ctx.error_at(e.span(), message)
        })?;
        ctx.validate(file)
    }
}

struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Ctx<'_> {
    fn error_at(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            position: span.map(|s| line_column(self.text, s.start)),
            message: message.into(),
        }
    }

    fn error<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error_at(Some(value.span()), message)
    }

    fn validate(&self, file: ConfigFile) -> Result<GatewayConfig, ConfigError> {
        let listen = self.socket_address(file.server.listen.as_ref(), DEFAULT_LISTEN)?;
        let admin_listen = self.socket_address(file.admin.listen.as_ref(), DEFAULT_ADMIN_LISTEN)?;
        if admin_listen == listen {
            let span = file.admin.listen.as_ref().map(Spanned::span);
            return Err(self.error_at(
                span,
                "the admin listener must not be the public listener: metrics and drain stay off the public port",
            ));
        }
        let idle_timeout = self.duration(file.websocket.idle_timeout.as_ref(), Duration::ZERO)?;
        let websocket =
            PumpSettings {
                idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
                close_timeout: self
                    .duration(file.websocket.close_timeout.as_ref(), DEFAULT_CLOSE_TIMEOUT)?,
                max_message_bytes: match &file.websocket.max_message_bytes {
                    None => Some(DEFAULT_MAX_MESSAGE_BYTES),
                    Some(max) if *max.get_ref() == 0 => None,
                    Some(max) => Some(u64::try_from(*max.get_ref()).map_err(|_| {
                        self.error(
                            max,
                            "`max_message_bytes` is a number of bytes, 0 for no cap",
                        )
                    })?),
                },
                upstream_lost_code: match &file.websocket.upstream_lost_code {
                    None => 1011,
                    Some(code) => match *code.get_ref() {
                        1011 => 1011,
                        1014 => 1014,
                        _ => return Err(self.error(
                            code,
                            "`upstream_lost_code` is 1011 (Internal Error) or 1014 (Bad Gateway)",
                        )),
                    },
                },
            };
        let threads = match &file.server.threads {
            Some(t) => usize::try_from(*t.get_ref())
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| self.error(t, "`threads` must be a whole number from 1 to 256"))?,
            None => DEFAULT_THREADS,
        };

        let mut secrets = BTreeMap::new();
        for (name, section) in &file.secrets {
            secrets.insert(name.clone(), self.secret(name, section)?);
        }
        let mut upstreams = BTreeMap::new();
        for (name, section) in file.upstreams {
            let upstream = self.upstream(&name, section)?;
            upstreams.insert(name, Arc::new(upstream));
        }
        let lookup = |reference: &SpannedString| {
            upstreams.get(reference.get_ref()).cloned().ok_or_else(|| {
                let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                self.error(
                    reference,
                    format!(
                        "no upstream is named {:?}; the [upstreams] table defines: {}",
                        reference.get_ref(),
                        list_or_none(&known)
                    ),
                )
            })
        };

        let fallback_upstream = file.fallback_upstream.as_ref().map(lookup).transpose()?;
        let global_cors = file.cors.as_ref().map(|c| self.cors(c)).transpose()?;

        if file.routes.is_empty() {
            return Err(self.error_at(
                None,
                "the file defines no [[routes]]; at least one route with agents is expected",
            ));
        }
        let mut routes: Vec<Route> = Vec::new();
        let mut route_spans: HashMap<String, (usize, usize)> = HashMap::new();
        for section in file.routes {
            let prefix = match &section.prefix {
                Some(p) => self.prefix(p, "prefix")?,
                None => DEFAULT_PREFIX.to_owned(),
            };
            let upstream_prefix = match &section.upstream_prefix {
                Some(p) => self.prefix(p, "upstream_prefix")?,
                None => prefix.clone(),
            };
            let name = match &section.name {
                Some(n) => {
                    if !is_label_safe(n.get_ref()) {
                        return Err(self.error(
                            n,
                            "a route `name` may hold only ASCII letters, digits, '-' and '_'",
                        ));
                    }
                    n.get_ref().clone()
                }
                None => prefix.trim_start_matches('/').replace('/', "_"),
            };
            let position = section
                .prefix
                .as_ref()
                .or(section.name.as_ref())
                .map(|s| line_column(self.text, s.span().start));
            if let Some(existing) = routes.iter().find(|r| r.prefix == prefix || r.name == name) {
                let (line, _) = route_spans.get(&existing.name).copied().unwrap_or((0, 0));
                return Err(ConfigError {
                    file: self.path.to_owned(),
                    position,
                    message: format!(
                        "route {name:?} with prefix {prefix:?} repeats the name or prefix of the route on line {line}; each route needs its own"
                    ),
                });
            }
            let default_instance = match &section.default_instance {
                Some(d) => {
                    let probe = format!("/a/{}", d.get_ref());
                    match parse_agent_path(&probe) {
                        Ok(p) if p.instance == Some(d.get_ref().as_str()) => d.get_ref().clone(),
                        _ => {
                            return Err(self.error(
                                d,
                                "`default_instance` must be a valid instance segment: no '/', dot segment, encoded slash or control byte",
                            ))
                        }
                    }
                }
                None => DEFAULT_INSTANCE.to_owned(),
            };
            if section.agents.is_empty() {
                return Err(ConfigError {
                    file: self.path.to_owned(),
                    position,
                    message: format!("route {name:?} lists no [[routes.agents]]; it would answer 404 to everything"),
                });
            }
            let mut agents: HashMap<String, Arc<Agent>> = HashMap::new();
            let mut agent_lines: HashMap<String, usize> = HashMap::new();
            let route_requires = match &section.require {
                Some(names) => names
                    .iter()
                    .map(|n| self.secret_name(n))
                    .collect::<Result<Vec<_>, _>>()?,
                None => vec![DEFAULT_REQUIRED.to_owned()],
            };
            for agent in section.agents {
                let agent_name = agent.name.get_ref();
                if !is_valid_agent_name(agent_name) {
                    return Err(self.error(
                        &agent.name,
                        "an agent `name` is a binding name: ASCII letters, digits, '-' and '_', starting with a letter, at most 128",
                    ));
                }
                let key = fold_key(agent_name);
                if let Some(first) = agents.get(&key) {
                    let line = agent_lines.get(&key).copied().unwrap_or(0);
                    return Err(self.error(
                        &agent.name,
                        format!(
                            "agent {agent_name:?} folds to the same name as {:?} on line {line} (case, '-' and '_' are ignored when matching); rename one of them",
                            first.name
                        ),
                    ));
                }
                let slug = match &agent.slug {
                    Some(s) => {
                        let ok = !s.get_ref().is_empty()
                            && s.get_ref().len() <= crate::routing::agent_name::MAX_AGENT_NAME_LEN
                            && s.get_ref()
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                        if !ok {
                            return Err(self.error(
                                s,
                                "a `slug` is a URL segment: ASCII letters, digits, '-' and '_'",
                            ));
                        }
                        s.get_ref().clone()
                    }
                    None => sdk_slug(agent_name),
                };
                let upstream = lookup(&agent.upstream)?;
                let mut required_secrets = route_requires.clone();
                for name in upstream
                    .require
                    .iter()
                    .map(String::as_str)
                    .chain(upstream.gateway_held_secrets())
                {
                    if !required_secrets.iter().any(|r| r == name) {
                        required_secrets.push(name.to_owned());
                    }
                }
                agent_lines.insert(
                    key.clone(),
                    line_column(self.text, agent.name.span().start).0,
                );
                agents.insert(
                    key,
                    Arc::new(Agent {
                        name: agent_name.clone(),
                        slug,
                        upstream,
                        required_secrets,
                    }),
                );
            }
            if let Some(p) = position {
                route_spans.insert(name.clone(), p);
            }
            let cors = match &section.cors {
                Some(c) => Some(self.cors(c)?),
                None => global_cors.clone(),
            };
            routes.push(Route {
                name,
                prefix,
                upstream_prefix,
                default_instance,
                cors,
                agents,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        // A secret named only in `require` or `forward_secrets` is read from the environment
        // variable of its name.
        let named: Vec<String> = routes
            .iter()
            .flat_map(|r| r.agents.values())
            .flat_map(|a| a.required_secrets.iter().cloned())
            .collect();
        for name in named {
            secrets.entry(name.clone()).or_insert_with(|| {
                let source = SecretSource::Env(name);
                Secret {
                    value: source.read(),
                    source,
                }
            });
        }
        let drain_grace = self.duration(file.server.drain_grace.as_ref(), DEFAULT_DRAIN_GRACE)?;
        let tls = file
            .tls
            .as_ref()
            .map(|t| self.tls(t, &listen, &admin_listen))
            .transpose()?;

        Ok(GatewayConfig {
            listen,
            admin_listen,
            threads,
            websocket,
            routes,
            upstreams,
            fallback_upstream,
            cors: global_cors,
            secrets,
            drain_grace,
            upgrade_sock: file.server.upgrade_sock.as_ref().map_or_else(
                || PathBuf::from(DEFAULT_UPGRADE_SOCK),
                |p| self.relative(p.get_ref()),
            ),
            ready_requires_secrets: file.admin.ready_requires_secrets.unwrap_or(true),
            limits: self.limits(&file.limits)?,
            tls,
            trusted_proxies: file
                .server
                .trusted_proxies
                .iter()
                .flatten()
                .map(|c| {
                    c.get_ref().parse::<Cidr>().map_err(|_| {
                        self.error(
                            c,
                            "a trusted proxy is an address or network such as \"10.0.0.0/8\"",
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            log: LogSettings {
                json: match &file.log.format {
                    None => false,
                    Some(f) => match f.get_ref().as_str() {
                        "plain" => false,
                        "json" => true,
                        _ => return Err(self.error(f, "`format` is \"plain\" or \"json\"")),
                    },
                },
                level: file
                    .log
                    .level
                    .as_ref()
                    .map_or_else(|| "info".to_owned(), |l| l.get_ref().clone()),
                access_log: file.log.access_log.unwrap_or(true),
            },
        })
    }

    fn tls(
        &self,
        section: &file::TlsSection,
        listen: &str,
        admin: &str,
    ) -> Result<TlsListener, ConfigError> {
        let address = self.socket_address(Some(&section.listen), "")?;
        if address == listen || address == admin {
            return Err(self.error(
                &section.listen,
                "the TLS listener needs an address of its own",
            ));
        }
        if section.certificates.get_ref().is_empty() {
            return Err(self.error(
                &section.certificates,
                "list at least one [[tls.certificates]] with `cert` and `key`",
            ));
        }
        let paths: Vec<(PathBuf, PathBuf)> = section
            .certificates
            .get_ref()
            .iter()
            .map(|c| {
                (
                    self.relative(c.cert.get_ref()),
                    self.relative(c.key.get_ref()),
                )
            })
            .collect();
        let pairs: Vec<(&Path, &Path)> = paths
            .iter()
            .map(|(c, k)| (c.as_path(), k.as_path()))
            .collect();
        let store = crate::edge::tls::CertStore::load(&pairs).map_err(|why| {
            self.error(
                &section.certificates,
                format!("cannot use the certificates: {why}"),
            )
        })?;
        Ok(TlsListener {
            listen: address,
            certificates: Arc::new(store),
        })
    }

    fn limits(&self, section: &file::LimitsSection) -> Result<LimitSettings, ConfigError> {
        let defaults = LimitSettings::default();
        // 0 turns a limit off.
        let count = |value: &Option<Spanned<i64>>,
                     default: Option<u64>|
         -> Result<Option<u64>, ConfigError> {
            match value {
                None => Ok(default),
                Some(v) if *v.get_ref() == 0 => Ok(None),
                Some(v) => u64::try_from(*v.get_ref()).map(Some).map_err(|_| {
                    self.error(v, "a limit is a positive whole number, or 0 for none")
                }),
            }
        };
        let as_usize = |v: Option<u64>| v.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Ok(LimitSettings {
            upgrades_per_ip_per_second: count(
                &section.upgrades_per_ip_per_second,
                defaults.upgrades_per_ip_per_second.map(u64::from),
            )?
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            websockets_per_ip: as_usize(count(
                &section.websockets_per_ip,
                defaults.websockets_per_ip.map(|n| n as u64),
            )?),
            websockets_total: as_usize(count(
                &section.websockets_total,
                defaults.websockets_total.map(|n| n as u64),
            )?),
            max_request_header_bytes: as_usize(count(
                &section.max_request_header_bytes,
                Some(defaults.max_request_header_bytes as u64),
            )?)
            .unwrap_or(usize::MAX),
            max_request_body_bytes: count(
                &section.max_request_body_bytes,
                defaults.max_request_body_bytes,
            )?,
            header_timeout: match &section.header_timeout {
                None => defaults.header_timeout,
                Some(t) => Some(self.duration(Some(t), Duration::ZERO)?).filter(|d| !d.is_zero()),
            },
        })
    }

    fn secret_name(&self, name: &SpannedString) -> Result<String, ConfigError> {
        let n = name.get_ref();
        if !is_secret_name(n) {
            return Err(self.error(
                name,
                "a secret name is an identifier such as OPENROUTER_API_KEY",
            ));
        }
        Ok(n.clone())
    }

    fn secret(&self, name: &str, section: &file::SecretSection) -> Result<Secret, ConfigError> {
        let source = match (&section.env, &section.file) {
            (Some(_), Some(file)) => {
                return Err(self.error(
                    file,
                    format!("secret {name} has both `env` and `file`; give one source"),
                ))
            }
            (Some(env), None) => SecretSource::Env(env.get_ref().clone()),
            (None, Some(file)) => {
                // systemd's LoadCredential= puts credentials under $CREDENTIALS_DIRECTORY.
                let expanded = match std::env::var("CREDENTIALS_DIRECTORY") {
                    Ok(dir) => file.get_ref().replace("${CREDENTIALS_DIRECTORY}", &dir),
                    Err(_) => file.get_ref().clone(),
                };
                SecretSource::File(self.relative(&expanded))
            }
            (None, None) => SecretSource::Env(name.to_owned()),
        };
        Ok(Secret {
            value: source.read(),
            source,
        })
    }

    fn cors(&self, section: &CorsSection) -> Result<Arc<CorsPolicy>, ConfigError> {
        let strings = |list: &[SpannedString]| -> Vec<String> {
            list.iter().map(|s| s.get_ref().clone()).collect()
        };
        let tokens = |list: &Option<Spanned<Vec<String>>>| -> Vec<String> {
            list.as_ref()
                .map(|l| l.get_ref().clone())
                .unwrap_or_default()
        };
        let spec = CorsSpec {
            allowed_origins: strings(&section.allowed_origins),
            allowed_origin_patterns: strings(&section.allowed_origin_patterns),
            allowed_methods: tokens(&section.allowed_methods),
            allowed_headers: tokens(&section.allowed_headers),
            exposed_headers: tokens(&section.exposed_headers),
            allow_credentials: section
                .allow_credentials
                .as_ref()
                .is_some_and(|c| *c.get_ref()),
            max_age: section
                .max_age
                .as_ref()
                .map(|m| self.duration(Some(m), Duration::ZERO))
                .transpose()?,
            allow_missing_origin: section.allow_missing_origin.unwrap_or(true),
        };
        CorsPolicy::new(&spec).map(Arc::new).map_err(|e| match e {
            CorsSpecError::Origin { index, why } => {
                let entry = &section.allowed_origins[index];
                self.error(entry, format!("allowed origin {:?}: {why}", entry.get_ref()))
            }
            CorsSpecError::Pattern { index, why } => {
                let entry = &section.allowed_origin_patterns[index];
                self.error(entry, format!("allowed origin pattern is not a valid regular expression: {why}"))
            }
            CorsSpecError::Token { field, index } => {
                let list = match field {
                    "allowed_methods" => &section.allowed_methods,
                    "allowed_headers" => &section.allowed_headers,
                    _ => &section.exposed_headers,
                };
                self.error_at(
                    list.as_ref().map(Spanned::span),
                    format!("entry {} of `{field}` is not a valid HTTP token", index + 1),
                )
            }
            CorsSpecError::AnyWithCredentials => self.error_at(
                section.allow_credentials.as_ref().map(Spanned::span),
                "allowed origin \"*\" with allow_credentials = true is refused: browsers forbid it, list the origins instead",
            ),
        })
    }

    fn socket_address(
        &self,
        value: Option<&SpannedString>,
        default: &str,
    ) -> Result<String, ConfigError> {
        match value {
            Some(v) => {
                v.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
                    self.error(
                        v,
                        "a listener is an IP address and port, such as \"127.0.0.1:8080\"",
                    )
                })?;
                Ok(v.get_ref().clone())
            }
            None => Ok(default.to_owned()),
        }
    }

    fn prefix(&self, p: &SpannedString, field: &str) -> Result<String, ConfigError> {
        let value = p.get_ref();
        let ok = value.starts_with('/')
            && !value.ends_with('/')
            && value.split('/').skip(1).all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'?' && b != b'#')
            });
        if !ok {
            return Err(self.error(
                p,
                format!("`{field}` must be a path such as \"/agents\": starting with '/', no trailing '/', no empty, dot or percent-encoded segments"),
            ));
        }
        Ok(value.clone())
    }

    fn upstream(&self, name: &str, section: UpstreamSection) -> Result<Upstream, ConfigError> {
        let kind_span = section.kind.span();
        if !is_label_safe(name) {
            return Err(self.error_at(
                Some(kind_span),
                format!("upstream name {name:?} may hold only ASCII letters, digits, '-' and '_'"),
            ));
        }
        let require = section
            .require
            .iter()
            .flatten()
            .map(|n| self.secret_name(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut forward_secrets = Vec::new();
        if let Some(forward) = &section.forward_secrets {
            if section.kind.get_ref() != "local" {
                return Err(self.error(
                    forward,
                    "`forward_secrets` is for local upstreams; a Worker keeps its key as a Worker secret",
                ));
            }
            for (secret, header) in forward.get_ref() {
                if !is_secret_name(secret) {
                    return Err(self.error(header, format!("{secret:?} is not a secret name")));
                }
                let name = http::HeaderName::from_bytes(header.get_ref().as_bytes())
                    .map_err(|_| self.error(header, "not a valid header name"))?;
                forward_secrets.push((secret.clone(), name));
            }
        }
        let probe = match &section.probe_path {
            Some(path) => {
                if !path.get_ref().starts_with('/') {
                    return Err(self.error(
                        path,
                        "`probe_path` is a path such as \"/agents/coder-agent/probe\"",
                    ));
                }
                Some(Probe {
                    path: path.get_ref().clone(),
                    interval: self
                        .duration(section.probe_interval.as_ref(), DEFAULT_PROBE_INTERVAL)?,
                })
            }
            None => {
                if let Some(interval) = &section.probe_interval {
                    return Err(self.error(interval, "`probe_interval` needs a `probe_path`"));
                }
                None
            }
        };
        let connect_timeout =
            self.duration(section.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT)?;
        let read_timeout = self.duration(section.read_timeout.as_ref(), DEFAULT_READ_TIMEOUT)?;
        let kind = match section.kind.get_ref().as_str() {
            "local" => {
                for (field, present) in [
                    ("address", section.address.as_ref().map(Spanned::span)),
                    ("host", section.host.as_ref().map(Spanned::span)),
                    ("tls", section.tls.as_ref().map(Spanned::span)),
                    ("ca_file", section.ca_file.as_ref().map(Spanned::span)),
                ] {
                    if let Some(span) = present {
                        return Err(self.error_at(
                            Some(span),
                            format!("`{field}` is for worker upstreams; a local upstream lists its `nodes`"),
                        ));
                    }
                }
                let nodes = section.nodes.ok_or_else(|| {
                    self.error_at(
                        Some(kind_span.clone()),
                        format!("local upstream {name:?} needs `nodes`, a list such as [\"127.0.0.1:8787\"]"),
                    )
                })?;
                if nodes.get_ref().is_empty() {
                    return Err(self.error(&nodes, "`nodes` must list at least one \"host:port\""));
                }
                let mut resolved: Vec<Node> = Vec::new();
                for node in nodes.get_ref() {
                    let address = self.host_port(node, None)?;
                    if resolved.iter().any(|n| n.address == address) {
                        return Err(self.error(node, format!("node {address:?} is listed twice")));
                    }
                    resolved.push(Node { address });
                }
                UpstreamKind::Local { nodes: resolved }
            }
            "worker" => {
                if let Some(nodes) = &section.nodes {
                    return Err(self.error(nodes, "`nodes` is for local upstreams; a worker upstream has one `address`"));
                }
                let tls = section.tls.as_ref().is_none_or(|t| *t.get_ref());
                let address_field = section.address.as_ref().ok_or_else(|| {
                    self.error_at(
                        Some(kind_span.clone()),
                        format!("worker upstream {name:?} needs an `address`, such as \"agents.example.com:443\""),
                    )
                })?;
                let address = self.host_port(address_field, Some(if tls { 443 } else { 80 }))?;
                let host = match &section.host {
                    Some(h) => {
                        if h.get_ref().is_empty() || !h.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
                            return Err(self.error(h, "`host` must be a host name such as \"agents.example.com\""));
                        }
                        h.get_ref().clone()
                    }
                    None => host_of(&address).to_owned(),
                };
                let ca = match &section.ca_file {
                    Some(f) if !tls => {
                        return Err(self.error(f, "`ca_file` needs `tls = true`"));
                    }
                    Some(f) => Some(self.ca_file(f)?),
                    None => None,
                };
                UpstreamKind::Worker { address, host, tls, ca }
            }
            other => {
                return Err(self.error(
                    &section.kind,
                    format!("unknown upstream kind {other:?}; expected \"worker\" (a Cloudflare Worker running routeAgentRequest) or \"local\" (a self-hosted agent backend)"),
                ))
            }
        };
        Ok(Upstream {
            name: name.to_owned(),
            kind,
            connect_timeout,
            read_timeout,
            require,
            forward_secrets,
            probe,
        })
    }

    /// `host:port`, or `host` alone when a default port applies. Resolution happens per
    /// connection, so a name that moves is followed without a reload.
    fn host_port(
        &self,
        value: &SpannedString,
        default_port: Option<u16>,
    ) -> Result<String, ConfigError> {
        let v = value.get_ref();
        let bad = || {
            self.error(
                value,
                format!("{v:?} is not a \"host:port\" address, such as \"127.0.0.1:8787\" or \"agents.example.com:443\""),
            )
        };
        if v.parse::<std::net::SocketAddr>().is_ok() {
            return Ok(v.clone());
        }
        let (host, port) = match v.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
            Some(_) => return Err(bad()),
            None => (v.as_str(), None),
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        match (host_ok, port.or(default_port)) {
            (true, Some(port)) => Ok(format!("{host}:{port}")),
            _ => Err(bad()),
        }
    }

    fn duration(
        &self,
        value: Option<&SpannedString>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref()).ok_or_else(|| {
                self.error(
                    v,
                    "a duration is a number with a unit: \"500ms\", \"5s\", \"2m\" or \"1h\"",
                )
            }),
        }
    }

    fn ca_file(
        &self,
        value: &SpannedString,
    ) -> Result<Arc<pingora::protocols::tls::CaType>, ConfigError> {
        let path = self.relative(value.get_ref());
        crate::upstream::load_ca_file(&path).map_err(|why| {
            self.error(
                value,
                format!("cannot use {} as a CA file: {why}", path.display()),
            )
        })
    }

    /// Paths in the file are relative to the file's folder.
    fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            return p.to_owned();
        }
        self.path
            .parent()
            .map_or_else(|| p.to_owned(), |dir| dir.join(p))
    }
}

/// An identifier, as environment variable names are: `OPENROUTER_API_KEY`.
fn is_secret_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn host_of(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Names that go into metric labels and logs as they are.
fn is_label_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
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

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(text, Path::new("gateway.toml"))
    }

    fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn resolves_agents_slugs_and_upstreams() {
        let config = parse(GOOD).expect("valid");
        let route = &config.routes[0];
        assert_eq!(route.name, "agents");
        assert_eq!(route.default_instance, "default");
        let coder = &route.agents["coderagent"];
        assert_eq!(coder.slug, "coder-agent");
        assert_eq!(coder.upstream.name, "local");
        assert_eq!(route.agents["chat"].slug, "chat-v2");
        match &route.agents["chat"].upstream.kind {
            UpstreamKind::Worker {
                address, host, tls, ..
            } => {
                assert_eq!(address, "agents.example.com:443");
                assert_eq!(host, "agents.example.com");
                assert!(*tls);
            }
            other => panic!("expected a worker, got {other:?}"),
        }
    }

    #[test]
    fn folding_collisions_are_refused_with_both_places() {
        let text = GOOD.replace("name = \"Chat\"", "name = \"CODER_AGENT\"");
        let err = error_of(&text);
        assert!(err.starts_with("gateway.toml:21:8: "), "{err}");
        assert!(err.contains("\"CoderAgent\" on line 17"), "{err}");
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
    fn references_and_kinds_are_checked() {
        let err = error_of(&GOOD.replace("upstream = \"cloud\"", "upstream = \"clod\""));
        assert!(err.contains("no upstream is named \"clod\""), "{err}");
        assert!(err.contains("cloud, local"), "{err}");
        let err = error_of(&GOOD.replace("kind = \"worker\"", "kind = \"lambda\""));
        assert!(err.contains("unknown upstream kind \"lambda\""), "{err}");
        let err = error_of(&GOOD.replace("address = \"agents.example.com\"", "nodes = [\"a:1\"]"));
        assert!(err.contains("`nodes` is for local upstreams"), "{err}");
        let err = error_of(&GOOD.replace("\"127.0.0.1:8788\"", "\"127.0.0.1:8787\""));
        assert!(err.contains("listed twice"), "{err}");
        let err = error_of(&GOOD.replace("prefix = \"/agents\"", "prefix = \"agents/\""));
        assert!(err.contains("`prefix` must be a path"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
    }
}
