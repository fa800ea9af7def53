//! The routing table as people read it: one model of the configured routes, agents and
//! upstreams, with each route's WebSocket settings (heartbeats, keepalive, rate limits),
//! rendered as text by `agent-gateway check` and as JSON by the admin `/config`. Secrets
//! appear by name and state only, never by value.

use crate::auth::jwks_remote::JwksRegistry;
use crate::auth::{AuthPolicy, Authenticator};
use crate::config::{GatewayConfig, Route};
use crate::fleet::health::ActiveCheck;
use crate::fleet::NodeSource;
use crate::routing::agent_name::example_spellings;
use crate::secrets::presence::{hint, secret_state, SecretState};
use crate::secrets::SecretStore;
use crate::upstream::{Upstream, UpstreamKind};
use crate::websocket::heartbeat::Heartbeat;
use crate::websocket::pump::PumpSettings;
use crate::websocket::rate_limit::{Limit, Rate};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

pub struct RoutingTable {
    pub(crate) listen: String,
    pub(crate) admin_listen: String,
    pub(crate) tls_listen: Option<String>,
    pub(crate) routes: Vec<RouteRow>,
    pub(crate) upstreams: Vec<UpstreamRow>,
    pub(crate) fallback: Option<UpstreamRow>,
    /// Why each authentication policy that cannot let anyone through cannot (a secret or key
    /// file it needs is missing or unusable).
    pub(crate) unusable_policies: Vec<String>,
}

pub(crate) struct RouteRow {
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) default_instance: String,
    pub(crate) cors: bool,
    pub(crate) websocket: WebSocketRow,
    /// Sorted by name.
    pub(crate) agents: Vec<AgentRow>,
}

pub(crate) struct AgentRow {
    pub(crate) name: String,
    pub(crate) slug: String,
    pub(crate) spellings: Vec<String>,
    pub(crate) upstream: UpstreamRow,
    /// `{upstream_prefix}/{slug}/{instance}`.
    pub(crate) upstream_path: String,
    pub(crate) secrets: Vec<SecretRow>,
    /// Its own WebSocket settings (`[routes.agents.websocket]`); `None`: its route's.
    pub(crate) websocket: Option<WebSocketRow>,
    /// Its authentication policy; `None`: public.
    pub(crate) auth: Option<Arc<AuthPolicy>>,
}

/// WebSocket settings as `check` and `/config` show them.
pub(crate) struct WebSocketRow(PumpSettings);

impl WebSocketRow {
    /// Labelled lines after `indent`, in the column of an agent's `accepts` and `upstream`;
    /// `note` ends the first.
    fn write_text(&self, out: &mut impl Write, indent: &str, note: &str) -> std::io::Result<()> {
        let s = &self.0;
        let max_message = s
            .max_message_bytes
            .map_or("no cap".to_owned(), |b| format!("{b} bytes"));
        writeln!(
            out,
            "{indent}websocket idle timeout {}, close timeout {}, max message {max_message}, upstream lost {}{note}",
            s.idle_timeout.map_or("off".to_owned(), duration_text),
            duration_text(s.close_timeout),
            s.upstream_lost_code,
        )?;
        let heartbeat = |side: &str, h: Option<Heartbeat>| match h {
            None => format!("{side} off"),
            Some(h) => format!(
                "{side} ping after {} silent, {}",
                duration_text(h.interval),
                h.timeout.map_or("no timeout".to_owned(), |t| format!(
                    "gone after {}",
                    duration_text(t)
                )),
            ),
        };
        writeln!(
            out,
            "{indent}heartbeat {}; {}",
            heartbeat("client", s.client_heartbeat),
            heartbeat("upstream", s.upstream_heartbeat),
        )?;
        let keepalive = s.tcp_keepalive.map_or("off".to_owned(), |k| {
            format!(
                "TCP idle {}, every {}, {} probes",
                duration_text(k.idle),
                duration_text(k.interval),
                k.probes
            )
        });
        writeln!(out, "{indent}keepalive {keepalive}")?;
        let Some(limits) = &s.rate_limits else {
            return writeln!(out, "{indent}rates     no limit");
        };
        let rates: Vec<String> = limits
            .each()
            .into_iter()
            .filter_map(|(limit, rate)| {
                let rate = rate?;
                let (unit, scope) = match limit {
                    Limit::ClientMessages => ("messages", "connection"),
                    Limit::ClientBytes => ("bytes", "connection"),
                    Limit::PerClientMessages => ("messages", "client"),
                    Limit::PerClientBytes => ("bytes", "client"),
                };
                Some(format!(
                    "{} {unit}/s per {scope} (burst {})",
                    rate.per_second, rate.burst
                ))
            })
            .collect();
        writeln!(
            out,
            "{indent}rates     {}; over a limit: {}",
            rates.join(", "),
            limits.action.label()
        )
    }

    fn to_json(&self) -> Value {
        let s = &self.0;
        let interval = |h: Option<Heartbeat>| h.map(|h| duration_text(h.interval));
        let timeout = |h: Option<Heartbeat>| h.and_then(|h| h.timeout).map(duration_text);
        let rate =
            |r: Option<Rate>| r.map(|r| json!({"per_second": r.per_second, "burst": r.burst}));
        json!({
            "idle_timeout": s.idle_timeout.map(duration_text),
            "close_timeout": duration_text(s.close_timeout),
            "max_message_bytes": s.max_message_bytes,
            "upstream_lost_code": s.upstream_lost_code,
            "ping_interval": interval(s.client_heartbeat),
            "ping_timeout": timeout(s.client_heartbeat),
            "upstream_ping_interval": interval(s.upstream_heartbeat),
            "upstream_ping_timeout": timeout(s.upstream_heartbeat),
            "tcp_keepalive": s.tcp_keepalive.map(|k| json!({
                "idle": duration_text(k.idle),
                "interval": duration_text(k.interval),
                "probes": k.probes,
            })),
            "rate_limits": s.rate_limits.as_ref().map(|l| {
                let mut fields: serde_json::Map<String, Value> = l
                    .each()
                    .into_iter()
                    .map(|(limit, r)| (limit.label().to_owned(), json!(rate(r))))
                    .collect();
                fields.insert("action".to_owned(), json!(l.action.label()));
                fields
            }),
        })
    }
}

/// A duration as the configuration writes it: `"500ms"`, `"25s"`, `"5m"`, `"1h"`.
fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

pub(crate) struct SecretRow {
    pub(crate) name: String,
    pub(crate) state: SecretCheck,
}

/// What `check` says of a secret an agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SecretCheck {
    KeptByWorker { hint: String },
    Present { source: String },
    Missing { hint: String },
}

#[derive(Clone)]
pub(crate) struct UpstreamRow {
    pub(crate) name: String,
    pub(crate) address: UpstreamAddress,
}

#[derive(Clone)]
pub(crate) enum UpstreamAddress {
    Worker {
        address: String,
        host: String,
        tls: bool,
    },
    Local {
        /// The static list, empty for nodes from DNS.
        nodes: Vec<String>,
        /// The DNS query that lists the nodes, if they come from DNS.
        dns: Option<String>,
        /// How the nodes are checked, in words.
        health: String,
    },
}

impl UpstreamRow {
    fn of(upstream: &Upstream) -> Self {
        let address = match &upstream.kind {
            UpstreamKind::Worker {
                address, host, tls, ..
            } => UpstreamAddress::Worker {
                address: address.clone(),
                host: host.clone(),
                tls: *tls,
            },
            UpstreamKind::Local { fleet } => {
                let (nodes, dns) = match &fleet.source {
                    NodeSource::Static(nodes) => (nodes.clone(), None),
                    NodeSource::Dns {
                        query, interval, ..
                    } => (
                        Vec::new(),
                        Some(format!("{query} every {}", duration_text(*interval))),
                    ),
                };
                let h = &fleet.health;
                let check = match &h.check {
                    ActiveCheck::Http { path } => format!("GET {path}"),
                    ActiveCheck::Tcp => "TCP connect".to_owned(),
                    ActiveCheck::Passive => {
                        "passive; a down node is tried by TCP connect".to_owned()
                    }
                };
                let health = format!(
                    "{check} every {}, down after {} failures, up after {} successes",
                    duration_text(h.interval),
                    h.unhealthy_after,
                    h.healthy_after
                );
                UpstreamAddress::Local { nodes, dns, health }
            }
        };
        UpstreamRow {
            name: upstream.name.clone(),
            address,
        }
    }

    /// `name (worker https://address, Host host)` or `name (local, nodes a b; health ...)`.
    fn describe(&self) -> String {
        match &self.address {
            UpstreamAddress::Worker { address, host, tls } => format!(
                "{} (worker {}://{address}, Host {host})",
                self.name,
                if *tls { "https" } else { "http" }
            ),
            UpstreamAddress::Local {
                dns: Some(dns),
                health,
                ..
            } => format!(
                "{} (local, nodes from DNS {dns}; health {health})",
                self.name
            ),
            UpstreamAddress::Local { nodes, health, .. } => format!(
                "{} (local, nodes {}; health {health})",
                self.name,
                nodes.join(" ")
            ),
        }
    }

    fn to_json(&self) -> Value {
        match &self.address {
            UpstreamAddress::Worker { address, host, tls } => {
                json!({"name": self.name, "kind": "worker", "address": address, "host": host, "tls": tls})
            }
            UpstreamAddress::Local { nodes, dns, health } => {
                json!({"name": self.name, "kind": "local", "nodes": nodes, "dns": dns, "health": health})
            }
        }
    }
}

impl RoutingTable {
    pub fn of(config: &GatewayConfig, secrets: &SecretStore) -> Self {
        RoutingTable {
            listen: config.listen.clone(),
            admin_listen: config.admin_listen.clone(),
            tls_listen: config.tls.as_ref().map(|t| t.listen.clone()),
            routes: config
                .routes
                .iter()
                .map(|r| route_row(config, secrets, r))
                .collect(),
            upstreams: config
                .upstreams
                .values()
                .map(|u| UpstreamRow::of(u))
                .collect(),
            fallback: config.fallback_upstream.as_deref().map(UpstreamRow::of),
            unusable_policies: Authenticator::new(config, secrets, &JwksRegistry::default())
                .unusable()
                .into_iter()
                .map(|(_, why)| why.to_owned())
                .collect(),
        }
    }

    /// Why each policy that cannot let anyone through cannot.
    pub fn unusable_policies(&self) -> &[String] {
        &self.unusable_policies
    }

    /// How many secrets the gateway should hold and does not.
    pub fn missing_secrets(&self) -> usize {
        self.routes
            .iter()
            .flat_map(|r| &r.agents)
            .flat_map(|a| &a.secrets)
            .filter(|s| matches!(s.state, SecretCheck::Missing { .. }))
            .count()
    }

    /// The text `check` prints after its first line.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "listen {}, admin {}", self.listen, self.admin_listen)?;
        if let Some(tls) = &self.tls_listen {
            writeln!(out, "tls {tls}")?;
        }
        for route in &self.routes {
            writeln!(out)?;
            writeln!(
                out,
                "route {} ({}, default instance {:?}{})",
                route.name,
                route.prefix,
                route.default_instance,
                if route.cors { ", CORS policy" } else { "" }
            )?;
            route.websocket.write_text(out, "  ", "")?;
            for agent in &route.agents {
                writeln!(out, "  {}", agent.name)?;
                writeln!(
                    out,
                    "    accepts   {}/{{{}}}/{{instance}}  (any case; '-' and '_' ignored)",
                    route.prefix,
                    agent.spellings.join("|")
                )?;
                writeln!(
                    out,
                    "    upstream  {} on {}",
                    agent.upstream_path,
                    agent.upstream.describe()
                )?;
                for secret in &agent.secrets {
                    let state = match &secret.state {
                        SecretCheck::KeptByWorker { hint } => {
                            format!("kept by the Worker ({hint})")
                        }
                        SecretCheck::Present { source } => format!("present ({source})"),
                        SecretCheck::Missing { hint } => format!("MISSING: {hint}"),
                    };
                    writeln!(out, "    secret    {}: {state}", secret.name)?;
                }
                if let Some(own) = &agent.websocket {
                    own.write_text(out, "    ", "  (its own)")?;
                }
                match (&agent.auth, agent.secrets.first()) {
                    (Some(policy), _) => writeln!(out, "    auth      {}", policy.describe())?,
                    (None, Some(secret)) => writeln!(
                        out,
                        "    auth      none  WARNING: public, and its upstream needs {}: anyone who reaches the gateway can open it",
                        secret.name
                    )?,
                    (None, None) => writeln!(out, "    auth      none (public)")?,
                }
            }
        }
        if let Some(fallback) = &self.fallback {
            writeln!(out)?;
            writeln!(
                out,
                "paths outside every prefix: {} (path unchanged)",
                fallback.describe()
            )?;
        }
        Ok(())
    }

    /// The `listen`, `routes`, `upstreams` and `fallback_upstream` fields of `/config`.
    pub(crate) fn to_json(&self) -> serde_json::Map<String, Value> {
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|route| {
                let agents: Vec<Value> = route
                    .agents
                    .iter()
                    .map(|a| {
                        let mut agent = json!({
                            "name": a.name,
                            "slug": a.slug,
                            "upstream": a.upstream.name,
                            "upstream_path": a.upstream_path,
                            "required_secrets": a.secrets.iter().map(|s| &s.name).collect::<Vec<_>>(),
                        });
                        if let Some(own) = &a.websocket {
                            agent["websocket"] = own.to_json();
                        }
                        agent["auth"] = a.auth.as_ref().map_or(Value::Null, |p| p.to_json());
                        agent
                    })
                    .collect();
                json!({
                    "name": route.name,
                    "prefix": route.prefix,
                    "default_instance": route.default_instance,
                    "cors": route.cors,
                    "websocket": route.websocket.to_json(),
                    "agents": agents,
                })
            })
            .collect();
        let mut fields = serde_json::Map::new();
        fields.insert("listen".to_owned(), json!(self.listen));
        fields.insert("routes".to_owned(), Value::Array(routes));
        fields.insert(
            "upstreams".to_owned(),
            Value::Array(self.upstreams.iter().map(UpstreamRow::to_json).collect()),
        );
        fields.insert(
            "fallback_upstream".to_owned(),
            json!(self.fallback.as_ref().map(|u| u.name.as_str())),
        );
        fields
    }
}

fn route_row(config: &GatewayConfig, secrets: &SecretStore, route: &Route) -> RouteRow {
    let mut agents: Vec<AgentRow> = route
        .agents
        .values()
        .map(|agent| AgentRow {
            name: agent.name.clone(),
            slug: agent.slug.clone(),
            spellings: example_spellings(&agent.name),
            upstream: UpstreamRow::of(&agent.upstream),
            upstream_path: format!("{}/{}/{{instance}}", route.upstream_prefix, agent.slug),
            secrets: agent
                .required_secrets
                .iter()
                .map(|name| SecretRow {
                    name: name.clone(),
                    state: match secret_state(config, secrets, &agent.upstream, name) {
                        SecretState::KeptByWorker => SecretCheck::KeptByWorker {
                            hint: hint(&agent.upstream, name, None),
                        },
                        SecretState::Held {
                            source,
                            present: true,
                        } => SecretCheck::Present {
                            source: source.map_or_else(String::new, |s| s.describe()),
                        },
                        SecretState::Held {
                            source,
                            present: false,
                        } => SecretCheck::Missing {
                            hint: hint(&agent.upstream, name, source),
                        },
                    },
                })
                .collect(),
            websocket: agent
                .own_websocket
                .then(|| WebSocketRow(PumpSettings::clone(&agent.websocket))),
            auth: agent.auth.clone(),
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    RouteRow {
        name: route.name.clone(),
        prefix: route.prefix.clone(),
        default_instance: route.default_instance.clone(),
        cors: route.cors.is_some(),
        websocket: WebSocketRow(PumpSettings::clone(&route.websocket)),
        agents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{parse, requiring_missing, CODER_AND_CHAT, UPSTREAMS};

    fn table() -> RoutingTable {
        let config = requiring_missing("TABLE_TEST_UNSET", "fallback_upstream = \"cloud\"\n");
        let secrets = SecretStore::read(&config);
        RoutingTable::of(&config, &secrets)
    }

    #[test]
    fn text_names_spellings_upstreams_and_secret_states() {
        let table = table();
        let mut out = Vec::new();
        table.write_text(&mut out).expect("written");
        let text = String::from_utf8(out).expect("utf-8");
        for expected in [
            "route agents (/agents, default instance \"default\")",
            "    upstream  /agents/coder-agent/{instance} on local (local, nodes 127.0.0.1:1; health passive; a down node is tried by TCP connect every 5s, down after 3 failures, up after 2 successes)",
            "    secret    TABLE_TEST_UNSET: MISSING: set the file /nonexistent/TABLE_TEST_UNSET",
            "    secret    TABLE_TEST_UNSET: kept by the Worker (the Worker behind upstream cloud needs it",
            "paths outside every prefix: cloud (worker https://agents.example.com:443, Host agents.example.com)",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.find("  Chat").expect("Chat") < text.find("  CoderAgent").expect("Coder"));
        assert_eq!(table.missing_secrets(), 1);
    }

    #[test]
    fn json_carries_the_same_rows() {
        let json = Value::Object(table().to_json());
        assert_eq!(json["routes"][0]["agents"][1]["slug"], "coder-agent");
        assert_eq!(
            json["routes"][0]["agents"][1]["upstream_path"],
            "/agents/coder-agent/{instance}"
        );
        assert_eq!(json["fallback_upstream"], "cloud");
        assert_eq!(json["upstreams"][1]["nodes"][0], "127.0.0.1:1");
    }

    /// Heartbeats, keepalive and rate limits of each route, and of an agent with its own.
    fn limited() -> RoutingTable {
        let agents = CODER_AND_CHAT.replace(
            "upstream = \"cloud\"\n",
            "upstream = \"cloud\"\n[routes.agents.websocket]\nper_client_bytes_per_second = 65536\nrate_limit_action = \"throttle\"\nping_timeout = \"0s\"\n",
        );
        let config = parse(&format!(
            "{UPSTREAMS}[websocket]\nclient_messages_per_second = 20\nclient_message_burst = 5\nidle_timeout = \"5m\"\nclose_timeout = \"500ms\"\ntcp_keepalive_idle = \"0s\"\n[[routes]]\nrequire = []\n{agents}"
        ));
        RoutingTable::of(&config, &SecretStore::read(&config))
    }

    #[test]
    fn text_shows_websocket_settings_and_rate_limits() {
        let mut out = Vec::new();
        limited().write_text(&mut out).expect("written");
        let text = String::from_utf8(out).expect("utf-8");
        for expected in [
            "\n  websocket idle timeout 5m, close timeout 500ms, max message 16777216 bytes, upstream lost 1011\n",
            "\n  heartbeat client ping after 25s silent, gone after 10s; upstream ping after 25s silent, gone after 10s\n",
            "\n  keepalive off\n",
            "\n  rates     20 messages/s per connection (burst 5); over a limit: close\n",
            "  (its own)\n    heartbeat client ping after 25s silent, no timeout; upstream",
            "\n    rates     20 messages/s per connection (burst 5), 65536 bytes/s per client (burst 65536); over a limit: throttle\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let table = table();
        let mut out = Vec::new();
        table.write_text(&mut out).expect("written");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("\n  rates     no limit\n"), "{text}");
        assert!(
            text.contains("\n  keepalive TCP idle 1m, every 10s, 6 probes\n"),
            "{text}"
        );
    }

    #[test]
    fn json_shows_the_same_settings() {
        let json = Value::Object(limited().to_json());
        let route = &json["routes"][0]["websocket"];
        assert_eq!(route["idle_timeout"], "5m");
        assert_eq!(route["close_timeout"], "500ms");
        assert_eq!(route["ping_interval"], "25s");
        assert_eq!(route["ping_timeout"], "10s");
        assert_eq!(route["tcp_keepalive"], Value::Null);
        assert_eq!(
            route["rate_limits"],
            json!({
                "client_messages": {"per_second": 20, "burst": 5},
                "client_bytes": null,
                "per_client_messages": null,
                "per_client_bytes": null,
                "action": "close",
            })
        );
        let chat = &json["routes"][0]["agents"][0];
        assert_eq!(chat["name"], "Chat");
        assert_eq!(chat["websocket"]["ping_timeout"], Value::Null);
        assert_eq!(chat["websocket"]["rate_limits"]["action"], "throttle");
        assert_eq!(
            chat["websocket"]["rate_limits"]["per_client_bytes"]["burst"],
            65536
        );
        assert!(json["routes"][0]["agents"][1].get("websocket").is_none());
        let defaults = Value::Object(table().to_json());
        let keepalive = &defaults["routes"][0]["websocket"]["tcp_keepalive"];
        assert_eq!(
            *keepalive,
            json!({"idle": "1m", "interval": "10s", "probes": 6})
        );
        assert_eq!(
            defaults["routes"][0]["websocket"]["rate_limits"],
            Value::Null
        );
    }

    #[test]
    fn durations_read_as_the_configuration_writes_them() {
        let text = |ms: u64| duration_text(Duration::from_millis(ms));
        assert_eq!(text(0), "0s");
        assert_eq!(text(500), "500ms");
        assert_eq!(text(1500), "1500ms");
        assert_eq!(text(25_000), "25s");
        assert_eq!(text(90_000), "90s");
        assert_eq!(text(300_000), "5m");
        assert_eq!(text(7_200_000), "2h");
    }
}
