//! `[[routes]]`: one extractor per route and one per agent. A route's checks that compare it
//! with the routes before it (and an agent's with the agents before it) run in the loops
//! here, the rest in the per-entry extractors.

use super::context::Ctx;
use super::extract_upstreams::Upstreams;
use super::extract_websocket::over;
use super::file::{AgentSection, RouteSection, SpannedString, WebSocketSection};
use super::values::{is_label_safe, is_word};
use super::{Agent, ConfigError, Route, DEFAULT_INSTANCE, DEFAULT_PREFIX, DEFAULT_REQUIRED};
use crate::auth::AuthPolicy;
use crate::edge::cors::CorsPolicy;
use crate::routing::agent_name::{fold_key, is_valid_agent_name, sdk_slug, MAX_AGENT_NAME_LEN};
use crate::routing::agent_path::parse_agent_path;
use crate::websocket::pump::PumpSettings;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

/// What a route's agents inherit and may override: its WebSocket settings with the table
/// they came from, and its authentication policy.
struct RouteDefaults<'a> {
    settings: &'a Arc<PumpSettings>,
    section: &'a WebSocketSection,
    auth: Option<&'a Arc<AuthPolicy>>,
    policies: &'a Policies,
}

type Policies = BTreeMap<String, Arc<AuthPolicy>>;

/// What names a route: checked before the rest, so that a repeated route is reported as such.
struct RouteHead {
    name: String,
    prefix: String,
    upstream_prefix: String,
    /// Where the route's errors point: its `prefix`, else its `name`, else nowhere.
    span: Option<Range<usize>>,
}

impl Ctx<'_> {
    /// The routes, longest prefix first so nested prefixes resolve to the most specific one.
    pub(crate) fn extract_routes(
        &self,
        sections: Vec<RouteSection>,
        upstreams: &Upstreams,
        global_cors: Option<&Arc<CorsPolicy>>,
        global_websocket: &WebSocketSection,
        policies: &Policies,
    ) -> Result<Vec<Route>, ConfigError> {
        if sections.is_empty() {
            return Err(self.error_at(
                None,
                "the file defines no [[routes]]; at least one route with agents is expected",
            ));
        }
        // Each route with the line it starts on (0 when it has neither prefix nor name).
        let mut routes: Vec<(Route, usize)> = Vec::new();
        for section in sections {
            let head = self.route_head(&section)?;
            let existing = routes
                .iter()
                .find(|(r, _)| r.prefix == head.prefix || r.name == head.name);
            if let Some((_, line)) = existing {
                return Err(self.error_at(
                    head.span,
                    format!(
                        "route {:?} with prefix {:?} repeats the name or prefix of the route on line {line}; each route needs its own",
                        head.name, head.prefix
                    ),
                ));
            }
            let line = head.span.as_ref().map_or(0, |s| self.line(s));
            let route = self.extract_route(
                head,
                section,
                upstreams,
                global_cors,
                global_websocket,
                policies,
            )?;
            routes.push((route, line));
        }
        let mut routes: Vec<Route> = routes.into_iter().map(|(r, _)| r).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(routes)
    }

    fn route_head(&self, section: &RouteSection) -> Result<RouteHead, ConfigError> {
        let prefix = match &section.prefix {
            Some(p) => self.prefix(p, "prefix")?,
            None => DEFAULT_PREFIX.to_owned(),
        };
        let upstream_prefix = match &section.upstream_prefix {
            Some(p) => self.prefix(p, "upstream_prefix")?,
            None => prefix.clone(),
        };
        let name = match &section.name {
            Some(n) if !is_label_safe(n.get_ref()) => {
                return Err(self.error(
                    n,
                    "a route `name` may hold only ASCII letters, digits, '-' and '_'",
                ));
            }
            Some(n) => n.get_ref().clone(),
            None => prefix.trim_start_matches('/').replace('/', "_"),
        };
        let span = section
            .prefix
            .as_ref()
            .or(section.name.as_ref())
            .map(|s| s.span());
        Ok(RouteHead {
            name,
            prefix,
            upstream_prefix,
            span,
        })
    }

    fn extract_route(
        &self,
        head: RouteHead,
        section: RouteSection,
        upstreams: &Upstreams,
        global_cors: Option<&Arc<CorsPolicy>>,
        global_websocket: &WebSocketSection,
        policies: &Policies,
    ) -> Result<Route, ConfigError> {
        let default_instance = match &section.default_instance {
            Some(d) => self.default_instance(d)?,
            None => DEFAULT_INSTANCE.to_owned(),
        };
        if section.agents.is_empty() {
            return Err(self.error_at(
                head.span,
                format!(
                    "route {:?} lists no [[routes.agents]]; it would answer 404 to everything",
                    head.name
                ),
            ));
        }
        let route_requires = match &section.require {
            Some(names) => self.secret_names(names)?,
            None => vec![DEFAULT_REQUIRED.to_owned()],
        };
        let merged = section
            .websocket
            .as_ref()
            .map(|own| over(own, global_websocket));
        let websocket_section = merged.as_ref().unwrap_or(global_websocket);
        let websocket = Arc::new(self.extract_websocket(websocket_section)?);
        let auth = match &section.auth {
            Some(name) => self.policy_named(policies, name)?,
            None => None,
        };
        let route_websocket = RouteDefaults {
            settings: &websocket,
            section: websocket_section,
            auth: auth.as_ref(),
            policies,
        };
        let agents =
            self.extract_agents(section.agents, &route_requires, upstreams, &route_websocket)?;
        let cors = match &section.cors {
            Some(c) => Some(self.extract_cors(c)?),
            None => global_cors.cloned(),
        };
        Ok(Route {
            name: head.name,
            prefix: head.prefix,
            upstream_prefix: head.upstream_prefix,
            default_instance,
            cors,
            agents,
            websocket,
        })
    }

    /// Must survive as the instance segment of a path, unchanged.
    fn default_instance(&self, d: &SpannedString) -> Result<String, ConfigError> {
        let probe = format!("/a/{}", d.get_ref());
        match parse_agent_path(&probe) {
            Ok(p) if p.instance == Some(d.get_ref().as_str()) => Ok(d.get_ref().clone()),
            _ => Err(self.error(
                d,
                "`default_instance` must be a valid instance segment: no '/', dot segment, encoded slash or control byte",
            )),
        }
    }

    /// The route's agents by [`fold_key`]; two names that fold alike are refused.
    fn extract_agents(
        &self,
        sections: Vec<AgentSection>,
        route_requires: &[String],
        upstreams: &Upstreams,
        websocket: &RouteDefaults<'_>,
    ) -> Result<HashMap<String, Arc<Agent>>, ConfigError> {
        // Each agent with the line of its name, for the message about a later one.
        let mut agents: HashMap<String, (Arc<Agent>, usize)> = HashMap::new();
        for section in sections {
            let name = section.name.get_ref();
            if !is_valid_agent_name(name) {
                return Err(self.error(
                    &section.name,
                    "an agent `name` is a binding name: ASCII letters, digits, '-' and '_', starting with a letter, at most 128",
                ));
            }
            let key = fold_key(name);
            if let Some((first, line)) = agents.get(&key) {
                return Err(self.error(
                    &section.name,
                    format!(
                        "agent {name:?} folds to the same name as {:?} on line {line} (case, '-' and '_' are ignored when matching); rename one of them",
                        first.name
                    ),
                ));
            }
            let line = self.line(&section.name.span());
            let agent = self.extract_agent(&section, route_requires, upstreams, websocket)?;
            agents.insert(key, (Arc::new(agent), line));
        }
        Ok(agents.into_iter().map(|(k, (a, _))| (k, a)).collect())
    }

    fn extract_agent(
        &self,
        section: &AgentSection,
        route_requires: &[String],
        upstreams: &Upstreams,
        defaults: &RouteDefaults<'_>,
    ) -> Result<Agent, ConfigError> {
        let name = section.name.get_ref();
        let slug = match &section.slug {
            Some(s) if !is_word(s.get_ref(), MAX_AGENT_NAME_LEN) => {
                return Err(self.error(
                    s,
                    "a `slug` is a URL segment: ASCII letters, digits, '-' and '_'",
                ));
            }
            Some(s) => s.get_ref().clone(),
            None => sdk_slug(name),
        };
        let upstream = self.upstream_named(upstreams, &section.upstream)?;
        // The route's secrets, then the upstream's own and those it forwards, each once.
        let mut required_secrets = route_requires.to_vec();
        for secret in upstream
            .require
            .iter()
            .map(String::as_str)
            .chain(upstream.gateway_held_secrets())
        {
            if !required_secrets.iter().any(|r| r == secret) {
                required_secrets.push(secret.to_owned());
            }
        }
        // An agent's own table makes settings of its own; the others share their route's.
        let (websocket, own_websocket) = match &section.websocket {
            Some(own) => (
                Arc::new(self.extract_websocket(&over(own, defaults.section))?),
                true,
            ),
            None => (Arc::clone(defaults.settings), false),
        };
        let auth = match &section.auth {
            Some(own) => self.policy_named(defaults.policies, own)?,
            None => defaults.auth.cloned(),
        };
        Ok(Agent {
            name: name.clone(),
            slug,
            upstream,
            required_secrets,
            websocket,
            own_websocket,
            auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{error_of, parse, GOOD};
    use crate::upstream::UpstreamKind;

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
    fn references_are_checked() {
        let err = error_of(&GOOD.replace("upstream = \"cloud\"", "upstream = \"clod\""));
        assert!(err.contains("no upstream is named \"clod\""), "{err}");
        assert!(err.contains("cloud, local"), "{err}");
        let err = error_of(&GOOD.replace("prefix = \"/agents\"", "prefix = \"agents/\""));
        assert!(err.contains("`prefix` must be a path"), "{err}");
        let err = error_of(&format!("fallback_upstream = \"nowhere\"\n{GOOD}"));
        assert!(err.contains("no upstream is named \"nowhere\""), "{err}");
    }

    #[test]
    fn repeated_routes_name_the_first_one() {
        let second = "\n[[routes]]\nname = \"agents\"\nprefix = \"/other\"\n\n[[routes.agents]]\nname = \"X\"\nupstream = \"local\"\n";
        let err = error_of(&(GOOD.to_owned() + second));
        assert_eq!(
            err,
            "gateway.toml:27:10: route \"agents\" with prefix \"/other\" repeats the name or prefix of the route on line 14; each route needs its own"
        );
        // A route without prefix or name takes the default prefix and has no line.
        let unnamed = GOOD.replace("prefix = \"/agents\"\n", "");
        let err =
            error_of(&(unnamed + &second.replace("prefix = \"/other\"", "prefix = \"/agents\"")));
        assert!(
            err.contains("repeats the name or prefix of the route on line 0"),
            "{err}"
        );
    }

    #[test]
    fn routes_need_agents_and_are_ordered_longest_prefix_first() {
        let err = error_of("[[routes]]\nprefix = \"/empty\"\n");
        assert_eq!(
            err,
            "gateway.toml:2:10: route \"empty\" lists no [[routes.agents]]; it would answer 404 to everything"
        );
        let err = error_of("[server]\n");
        assert_eq!(
            err,
            "gateway.toml: the file defines no [[routes]]; at least one route with agents is expected"
        );
        let nested = "\n[[routes]]\nprefix = \"/agents/v2\"\nupstream_prefix = \"/agents\"\n\n[[routes.agents]]\nname = \"X\"\nupstream = \"local\"\n";
        let config = parse(&(GOOD.to_owned() + nested)).expect("valid");
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["agents_v2", "agents"]);
        assert_eq!(config.routes[0].upstream_prefix, "/agents");
    }

    #[test]
    fn names_slugs_and_instances_are_checked() {
        let err = error_of(&GOOD.replace("name = \"Chat\"", "name = \"9chat\""));
        assert!(
            err.starts_with("gateway.toml:21:8: an agent `name` is a binding name"),
            "{err}"
        );
        let err = error_of(&GOOD.replace("slug = \"chat-v2\"", "slug = \"chat/v2\""));
        assert!(err.contains("a `slug` is a URL segment"), "{err}");
        let err = error_of(&GOOD.replace(
            "prefix = \"/agents\"",
            "prefix = \"/agents\"\nname = \"a b\"",
        ));
        assert!(err.contains("a route `name` may hold only"), "{err}");
        let with_instance = |i: &str| {
            GOOD.replace(
                "prefix = \"/agents\"",
                &format!("prefix = \"/agents\"\ndefault_instance = \"{i}\""),
            )
        };
        let config = parse(&with_instance("main")).expect("valid");
        assert_eq!(config.routes[0].default_instance, "main");
        for bad in ["a/b", "..", "a%2Fb"] {
            let err = error_of(&with_instance(bad));
            assert!(
                err.contains("`default_instance` must be a valid instance segment"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn agents_require_their_routes_and_upstreams_secrets() {
        let text = GOOD
            .replace("prefix = \"/agents\"", "prefix = \"/agents\"\nrequire = [\"A\", \"B\"]")
            .replace(
                "nodes = [\"127.0.0.1:8787\", \"127.0.0.1:8788\"]",
                "nodes = [\"127.0.0.1:8787\"]\nrequire = [\"B\", \"C\"]\nforward_secrets = { D = \"x-d\" }",
            );
        let config = parse(&text).expect("valid");
        let route = &config.routes[0];
        assert_eq!(
            route.agents["coderagent"].required_secrets,
            ["A", "B", "C", "D"]
        );
        assert_eq!(route.agents["chat"].required_secrets, ["A", "B"]);
        let names: Vec<&str> = config.secrets.keys().map(String::as_str).collect();
        assert_eq!(names, ["A", "B", "C", "D"]);
        let err = error_of(&GOOD.replace(
            "prefix = \"/agents\"",
            "prefix = \"/agents\"\nrequire = [\"not-a-name\"]",
        ));
        assert!(err.contains("a secret name is an identifier"), "{err}");
    }
}
