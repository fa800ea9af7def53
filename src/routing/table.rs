//! The routing table as people read it: one model of the configured routes, agents and
//! upstreams, rendered as text by `agent-gateway check` and as JSON by the admin `/config`.
//! Secrets appear by name and state only, never by value.

use crate::config::{GatewayConfig, Route};
use crate::routing::agent_name::example_spellings;
use crate::secrets::presence::{hint, secret_state, SecretState};
use crate::secrets::SecretStore;
use crate::upstream::{Upstream, UpstreamKind};
use serde_json::{json, Value};
use std::io::Write;

pub struct RoutingTable {
    pub(crate) listen: String,
    pub(crate) admin_listen: String,
    pub(crate) tls_listen: Option<String>,
    pub(crate) routes: Vec<RouteRow>,
    pub(crate) upstreams: Vec<UpstreamRow>,
    pub(crate) fallback: Option<UpstreamRow>,
}

pub(crate) struct RouteRow {
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) default_instance: String,
    pub(crate) cors: bool,
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
        nodes: Vec<String>,
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
            UpstreamKind::Local { nodes } => UpstreamAddress::Local {
                nodes: nodes.iter().map(|n| n.address.clone()).collect(),
            },
        };
        UpstreamRow {
            name: upstream.name.clone(),
            address,
        }
    }

    /// `name (worker https://address, Host host)` or `name (local, nodes a b)`.
    fn describe(&self) -> String {
        match &self.address {
            UpstreamAddress::Worker { address, host, tls } => format!(
                "{} (worker {}://{address}, Host {host})",
                self.name,
                if *tls { "https" } else { "http" }
            ),
            UpstreamAddress::Local { nodes } => {
                format!("{} (local, nodes {})", self.name, nodes.join(" "))
            }
        }
    }

    fn to_json(&self) -> Value {
        match &self.address {
            UpstreamAddress::Worker { address, host, tls } => {
                json!({"name": self.name, "kind": "worker", "address": address, "host": host, "tls": tls})
            }
            UpstreamAddress::Local { nodes } => {
                json!({"name": self.name, "kind": "local", "nodes": nodes})
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
        }
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
                        json!({
                            "name": a.name,
                            "slug": a.slug,
                            "upstream": a.upstream.name,
                            "upstream_path": a.upstream_path,
                            "required_secrets": a.secrets.iter().map(|s| &s.name).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                json!({
                    "name": route.name,
                    "prefix": route.prefix,
                    "default_instance": route.default_instance,
                    "cors": route.cors,
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
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    RouteRow {
        name: route.name.clone(),
        prefix: route.prefix.clone(),
        default_instance: route.default_instance.clone(),
        cors: route.cors.is_some(),
        agents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::requiring_missing;

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
            "    upstream  /agents/coder-agent/{instance} on local (local, nodes 127.0.0.1:1)",
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
}
