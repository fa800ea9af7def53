//! Agent-name routing: from a request path to the agent, instance and upstream it names.

use crate::config::{Agent, GatewayConfig, Route};
use crate::edge::cors::CorsPolicy;
use crate::routing::agent_name::fold_key;
use crate::routing::agent_path::{
    as_upstream_reads, parse_agent_path, strip_route_prefix, PathError,
};
use crate::upstream::Upstream;
use std::sync::Arc;

/// Where a request goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) upstream: Arc<Upstream>,
    /// Path and query to send upstream.
    pub(crate) upstream_path: String,
    /// Set for agent routes; `None` for the fallback upstream.
    pub(crate) agent: Option<AgentTarget>,
    /// The CORS and Origin policy that applies; `None`: no CORS handling.
    pub(crate) cors: Option<Arc<CorsPolicy>>,
}

#[derive(Debug, Clone)]
pub(crate) struct AgentTarget {
    pub(crate) route: String,
    pub(crate) agent: Arc<Agent>,
    /// As the client sent it (percent-encoding included).
    pub(crate) instance: String,
}

/// Why a request cannot be routed; each maps to one status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    BadPath {
        route: String,
        error: PathError,
    },
    UnknownAgent {
        route: String,
        asked: String,
        known: Vec<String>,
    },
    NoRoute,
}

impl Refusal {
    /// The route the request fell under, if any.
    pub(crate) fn route(&self) -> Option<&str> {
        match self {
            Refusal::BadPath { route, .. } | Refusal::UnknownAgent { route, .. } => Some(route),
            Refusal::NoRoute => None,
        }
    }
}

/// Resolves `path` (without query) and `query` against the routing table.
pub(crate) fn resolve(
    config: &GatewayConfig,
    path: &str,
    query: Option<&str>,
) -> Result<Target, Refusal> {
    let Some((route, tail)) = config
        .routes
        .iter()
        .find_map(|r| strip_route_prefix(path, &r.prefix).map(|tail| (r, tail)))
    else {
        // Another spelling of a route's path must not reach its agents through the fallback,
        // past the route's authentication and routing.
        let read_as = as_upstream_reads(path);
        let alias_of = config
            .routes
            .iter()
            .find(|r| strip_route_prefix(&read_as, &r.prefix).is_some());
        if let (Some(route), Some(_)) = (alias_of, &config.fallback_upstream) {
            return Err(Refusal::BadPath {
                route: route.name.clone(),
                error: PathError::RouteAlias,
            });
        }
        return match &config.fallback_upstream {
            Some(upstream) => Ok(Target {
                upstream: upstream.clone(),
                upstream_path: join_path(&[path], query),
                agent: None,
                cors: config.cors.clone(),
            }),
            None => Err(Refusal::NoRoute),
        };
    };
    resolve_in_route(route, tail, query)
}

fn resolve_in_route(route: &Route, tail: &str, query: Option<&str>) -> Result<Target, Refusal> {
    let parsed = parse_agent_path(tail).map_err(|error| Refusal::BadPath {
        route: route.name.clone(),
        error,
    })?;
    let Some(agent) = route.agents.get(&fold_key(parsed.agent)) else {
        return Err(Refusal::UnknownAgent {
            route: route.name.clone(),
            asked: parsed.agent.to_owned(),
            known: route.agent_names().into_iter().map(str::to_owned).collect(),
        });
    };
    let instance = parsed.instance.unwrap_or(&route.default_instance);
    let upstream_path = join_path(
        &[
            &route.upstream_prefix,
            "/",
            &agent.slug,
            "/",
            instance,
            parsed.rest,
        ],
        query,
    );
    Ok(Target {
        upstream: agent.upstream.clone(),
        upstream_path,
        agent: Some(AgentTarget {
            route: route.name.clone(),
            agent: agent.clone(),
            instance: instance.to_owned(),
        }),
        cors: route.cors.clone(),
    })
}

/// `parts` and `?query` in one allocation of the exact size (this runs for every request).
fn join_path(parts: &[&str], query: Option<&str>) -> String {
    let length = parts.iter().map(|p| p.len()).sum::<usize>() + query.map_or(0, |q| q.len() + 1);
    let mut path = String::with_capacity(length);
    parts.iter().for_each(|p| path.push_str(p));
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{parse, CODER_AND_CHAT, UPSTREAMS};

    fn config(extra: &str) -> GatewayConfig {
        parse(&format!(
            "{extra}{UPSTREAMS}[[routes]]\ndefault_instance = \"main\"\n{CODER_AND_CHAT}\
             [[routes.agents]]\nname = \"MyMCPAgent\"\nupstream = \"local\"\n"
        ))
    }

    #[test]
    fn every_spelling_reaches_the_canonical_path() {
        let c = config("");
        for spelling in [
            "CoderAgent",
            "coderagent",
            "coder-agent",
            "coder_agent",
            "CODER_AGENT",
        ] {
            let t = resolve(
                &c,
                &format!("/agents/{spelling}/Default/x"),
                Some("_pk=abc"),
            )
            .expect("routed");
            assert_eq!(t.upstream_path, "/agents/coder-agent/Default/x?_pk=abc");
            assert_eq!(
                t.agent.as_ref().map(|a| a.instance.as_str()),
                Some("Default")
            );
        }
        let t = resolve(&c, "/agents/mymcpagent", None).expect("routed");
        assert_eq!(t.upstream_path, "/agents/my-m-c-p-agent/main");
    }

    #[test]
    fn refusals() {
        let c = config("");
        assert_eq!(
            resolve(&c, "/agents/Nope/x", None).map(|_| ()),
            Err(Refusal::UnknownAgent {
                route: "agents".into(),
                asked: "Nope".into(),
                known: vec!["Chat".into(), "CoderAgent".into(), "MyMCPAgent".into()]
            })
        );
        assert_eq!(
            resolve(&c, "/other", None).map(|_| ()),
            Err(Refusal::NoRoute)
        );
        assert!(matches!(
            resolve(&c, "/agents/CoderAgent/..", None),
            Err(Refusal::BadPath {
                error: PathError::DotSegment,
                ..
            })
        ));
    }

    #[test]
    fn other_spellings_of_a_route_never_reach_the_fallback() {
        let c = config("fallback_upstream = \"local\"");
        for path in [
            "//agents/coder/x",
            "/x/../agents/coder/x",
            "/agents\\coder/x",
            "/%2e/agents/coder/x",
            "/a/%2E%2e/agents/coder/x",
        ] {
            let refused = resolve(&c, path, None).expect_err(path);
            assert!(
                matches!(
                    refused,
                    Refusal::BadPath {
                        error: PathError::RouteAlias,
                        ..
                    }
                ),
                "{path}: {refused:?}"
            );
        }
        assert!(resolve(&c, "/static//app.js", None).is_ok());
        assert!(resolve(&c, "/docs/../health", None).is_ok());
    }

    #[test]
    fn fallback_takes_paths_outside_every_prefix() {
        let c = config("fallback_upstream = \"local\"");
        let t = resolve(&c, "/health", Some("a=1")).expect("fallback");
        assert_eq!(t.upstream_path, "/health?a=1");
        assert!(t.agent.is_none());
    }
}
