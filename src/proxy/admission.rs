//! Admission: every decision the gateway makes about a request before anything goes
//! upstream, as one pure function of the configuration, the request head and a few facts
//! about the connection. The `request_filter` hook performs what [`admit`] decided.
//!
//! The order is the order of the checks: request limits, routing, the opening handshake of a
//! WebSocket upgrade, the Origin header and the CORS policy (which answers preflights), secret
//! presence, then, for WebSocket upgrades, drain and the HTTP version.

use super::problem::Problem;
use crate::config::GatewayConfig;
use crate::edge::cors::{decide, request_origin, CorsDecision, CorsPolicy, CorsRequest};
use crate::edge::limits::{check_request, LimitRefusal};
use crate::routing::resolve::{resolve, Target};
use crate::secrets::presence::first_missing;
use crate::secrets::SecretStore;
use crate::websocket::handshake::{check_upgrade_request, is_websocket_upgrade};
use crate::websocket::metrics::{HandshakeResult, UNKNOWN_AGENT};
use pingora::http::RequestHeader;
use serde_json::json;
use std::sync::Arc;

/// The `route` label of requests outside every route prefix.
pub(crate) const NO_ROUTE: &str = "none";
/// The `route` label of requests served by the fallback upstream.
pub(crate) const FALLBACK_ROUTE: &str = "fallback";

/// Facts about the connection a request arrived on that admission depends on.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnectionFacts {
    /// HTTP/2 has no upgrade: agent WebSockets need HTTP/1.1.
    pub(crate) http2: bool,
    /// The gateway is draining: new agent WebSockets are refused.
    pub(crate) draining: bool,
}

/// What to do with a request.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Answer with a problem; nothing goes upstream.
    Refuse(Refused),
    /// Answer a CORS preflight with these headers.
    Preflight {
        route: String,
        agent: String,
        headers: Vec<(&'static str, String)>,
    },
    /// Proxy a plain HTTP request.
    Forward(Admitted),
    /// Perform a WebSocket upgrade with the upstream.
    Upgrade(Admitted),
}

/// A request admitted, and where it goes.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The `route` label: a route name or "fallback".
    pub(crate) route: String,
    pub(crate) target: Target,
    /// The CORS policy in force, if any, and the origin it allowed.
    pub(crate) cors: Option<AllowedCors>,
}

#[derive(Debug, Clone)]
pub(crate) struct AllowedCors {
    pub(crate) policy: Arc<CorsPolicy>,
    pub(crate) origin: Option<String>,
}

impl AllowedCors {
    /// The `Access-Control-*` headers of the answer: none when no origin was allowed.
    pub(crate) fn response_headers(&self) -> Vec<(&'static str, String)> {
        match &self.origin {
            Some(origin) => self.policy.response_headers(origin),
            None => Vec::new(),
        }
    }
}

/// A request refused by the gateway itself.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) problem: Problem,
    pub(crate) reason: RefusalReason,
    /// The `route` label: a route name, "fallback" or "none".
    pub(crate) route: String,
    /// The `agent` label: the configured agent, or "unknown".
    pub(crate) agent: String,
    /// The upstream the request was headed for, when only the connection stopped it
    /// (drain, HTTP/2), for the access line.
    pub(crate) upstream: Option<String>,
    pub(crate) websocket: bool,
}

/// Why a request was refused, for the metrics each reason has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalReason {
    /// A request limit (header or body size, header deadline): counted on its own.
    Limit(LimitRefusal),
    /// A WebSocket limit (upgrade rate, open WebSockets): counted as a handshake too.
    WebSocketLimit(LimitRefusal),
    /// Unknown agent, bad path, or a path outside every route.
    Routing,
    BadOriginHeader,
    OriginRefused,
    SecretMissing,
    Draining,
    WebSocketOverHttp2,
    InvalidUpgrade,
    /// The agent's authentication policy did not let it through.
    Auth,
}

impl Refused {
    /// The handshake counter's result for a refused upgrade; `None` for plain requests and
    /// for request limits, which have a counter of their own.
    pub(crate) fn handshake_result(&self) -> Option<HandshakeResult> {
        if !self.websocket {
            return None;
        }
        Some(match self.reason {
            RefusalReason::Limit(_) => return None,
            RefusalReason::OriginRefused => HandshakeResult::OriginRefused,
            RefusalReason::SecretMissing => HandshakeResult::SecretMissing,
            RefusalReason::Routing
            | RefusalReason::BadOriginHeader
            | RefusalReason::Draining
            | RefusalReason::WebSocketOverHttp2
            | RefusalReason::InvalidUpgrade
            | RefusalReason::WebSocketLimit(_)
            | RefusalReason::Auth => HandshakeResult::Status(self.problem.status),
        })
    }
}

impl Admission {
    /// The `route` label of the request, whatever was decided.
    pub(crate) fn route(&self) -> &str {
        match self {
            Admission::Refuse(refused) => &refused.route,
            Admission::Preflight { route, .. } => route,
            Admission::Forward(admitted) | Admission::Upgrade(admitted) => &admitted.route,
        }
    }
}

/// The `agent` label of a target: the configured agent, or "unknown" for the fallback.
pub(crate) fn agent_label(target: &Target) -> &str {
    target
        .agent
        .as_ref()
        .map_or(UNKNOWN_AGENT, |a| a.agent.name.as_str())
}

/// Decides what to do with `request`.
pub(crate) fn admit(
    config: &GatewayConfig,
    secrets: &SecretStore,
    request: &RequestHeader,
    connection: ConnectionFacts,
) -> Admission {
    let websocket = is_websocket_upgrade(request);
    let refuse = |problem, reason, route: &str, agent: &str| {
        Admission::Refuse(Refused {
            problem,
            reason,
            route: route.to_owned(),
            agent: agent.to_owned(),
            upstream: None,
            websocket,
        })
    };
    if let Err(limit) = check_request(&config.limits, request) {
        let problem = Problem::limit(limit);
        return refuse(
            problem,
            RefusalReason::Limit(limit),
            NO_ROUTE,
            UNKNOWN_AGENT,
        );
    }
    let target = match resolve(config, request.uri.path(), request.uri.query()) {
        Ok(target) => target,
        Err(refusal) => {
            let route = refusal.route().unwrap_or(NO_ROUTE);
            let problem = Problem::from(&refusal);
            return refuse(problem, RefusalReason::Routing, route, UNKNOWN_AGENT);
        }
    };
    let route = target
        .agent
        .as_ref()
        .map_or(FALLBACK_ROUTE, |a| a.route.as_str());
    let agent = agent_label(&target);
    if let Some(Err(why)) = websocket.then(|| check_upgrade_request(request)) {
        let problem = Problem::invalid_upgrade(why);
        return refuse(problem, RefusalReason::InvalidUpgrade, route, agent);
    }
    let cors = match target.cors.clone() {
        None => None,
        Some(policy) => {
            let origin = match request_origin(&request.headers) {
                Ok(origin) => origin,
                Err(error) => {
                    let problem = Problem::bad_origin_header(error);
                    return refuse(problem, RefusalReason::BadOriginHeader, route, agent);
                }
            };
            let preflight = request.method == http::Method::OPTIONS
                && request
                    .headers
                    .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
            let asked = CorsRequest {
                origin,
                websocket,
                preflight,
            };
            match decide(&policy, asked) {
                CorsDecision::Forward { allowed_origin } => Some(AllowedCors {
                    policy,
                    origin: allowed_origin,
                }),
                CorsDecision::Preflight { headers } => {
                    return Admission::Preflight {
                        route: route.to_owned(),
                        agent: agent.to_owned(),
                        headers,
                    }
                }
                CorsDecision::Refuse => {
                    let problem = Problem::origin_refused(origin);
                    return refuse(problem, RefusalReason::OriginRefused, route, agent);
                }
            }
        }
    };
    let missing = target
        .agent
        .as_ref()
        .and_then(|a| first_missing(config, secrets, &a.agent));
    if let Some(missing) = missing {
        let problem = Problem::secret_missing(missing.secret, &missing.hint);
        return refuse(problem, RefusalReason::SecretMissing, route, agent);
    }
    let refused_by_connection = if !websocket {
        None
    } else if connection.draining {
        Some((Problem::draining(), RefusalReason::Draining))
    } else if connection.http2 {
        let problem = Problem::new(
            400,
            json!({"error": "websocket_over_http2", "detail": "agent WebSockets need HTTP/1.1"}),
        );
        Some((problem, RefusalReason::WebSocketOverHttp2))
    } else {
        None
    };
    if let Some((problem, reason)) = refused_by_connection {
        return Admission::Refuse(Refused {
            problem,
            reason,
            route: route.to_owned(),
            agent: agent.to_owned(),
            upstream: Some(target.upstream.name.clone()),
            websocket,
        });
    }
    let admitted = Admitted {
        route: route.to_owned(),
        target,
        cors,
    };
    if websocket {
        Admission::Upgrade(admitted)
    } else {
        Admission::Forward(admitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{parse, CODER_AND_CHAT, UPSTREAMS};

    const CONFIG: &str = r#"
[limits]
max_request_header_bytes = 2048
[secrets.AGENT_GATEWAY_ADMISSION_TEST_UNSET]
file = "/nonexistent/agent-gateway-admission-test"

[[routes]]
prefix = "/locked"
require = ["AGENT_GATEWAY_ADMISSION_TEST_UNSET"]
[[routes.agents]]
name = "Vault"
upstream = "local"

[[routes]]
require = []
[routes.cors]
allowed_origins = ["https://app.example.com"]
"#;

    fn decide_for(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        connection: ConnectionFacts,
    ) -> Admission {
        let config = parse(&format!("{UPSTREAMS}{CONFIG}{CODER_AND_CHAT}"));
        let secrets = SecretStore::read(&config);
        let mut request = RequestHeader::build(method, path.as_bytes(), None).expect("request");
        for (name, value) in headers {
            request
                .append_header(name.to_string(), *value)
                .expect("header");
        }
        admit(&config, &secrets, &request, connection)
    }

    /// A valid opening handshake, without an Origin.
    const HANDSHAKE: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    fn with_handshake<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        HANDSHAKE.iter().chain(extra).copied().collect()
    }

    const UPGRADE: [(&str, &str); 5] = [
        HANDSHAKE[0],
        HANDSHAKE[1],
        HANDSHAKE[2],
        HANDSHAKE[3],
        ("origin", "https://app.example.com"),
    ];

    fn refused(admission: Admission) -> Refused {
        match admission {
            Admission::Refuse(refused) => refused,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_agent_is_refused_under_its_route() {
        let r = refused(decide_for(
            "GET",
            "/agents/Nope/x",
            &UPGRADE,
            ConnectionFacts::default(),
        ));
        assert_eq!((r.problem.status, r.problem.kind()), (404, "unknown_agent"));
        assert_eq!(
            (r.route.as_str(), r.agent.as_str()),
            ("agents", UNKNOWN_AGENT)
        );
        assert_eq!(r.handshake_result(), Some(HandshakeResult::Status(404)));
    }

    #[test]
    fn a_bad_path_and_a_path_outside_every_route_are_refused() {
        let r = refused(decide_for(
            "GET",
            "/agents/CoderAgent/..",
            &[],
            ConnectionFacts::default(),
        ));
        assert_eq!((r.problem.status, r.reason), (400, RefusalReason::Routing));
        assert_eq!(
            r.handshake_result(),
            None,
            "a plain request has no handshake"
        );
        let r = refused(decide_for(
            "GET",
            "/elsewhere",
            &[],
            ConnectionFacts::default(),
        ));
        assert_eq!((r.problem.status, r.route.as_str()), (404, NO_ROUTE));
    }

    #[test]
    fn a_refused_origin_and_a_doubled_origin_header() {
        let headers = with_handshake(&[("origin", "https://evil.example")]);
        let r = refused(decide_for(
            "GET",
            "/agents/CoderAgent/a",
            &headers,
            ConnectionFacts::default(),
        ));
        assert_eq!(
            (r.problem.status, r.reason),
            (403, RefusalReason::OriginRefused)
        );
        assert_eq!(
            (r.agent.as_str(), r.handshake_result()),
            ("CoderAgent", Some(HandshakeResult::OriginRefused))
        );
        let doubled = [
            ("origin", "https://app.example.com"),
            ("origin", "https://app.example.com"),
        ];
        let r = refused(decide_for(
            "GET",
            "/agents/CoderAgent/a",
            &doubled,
            ConnectionFacts::default(),
        ));
        assert_eq!(
            (r.problem.status, r.reason),
            (400, RefusalReason::BadOriginHeader)
        );
    }

    #[test]
    fn a_preflight_is_answered_by_the_policy() {
        let headers = [
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ];
        match decide_for(
            "OPTIONS",
            "/agents/Chat/a",
            &headers,
            ConnectionFacts::default(),
        ) {
            Admission::Preflight { route, headers, .. } => {
                assert_eq!(route, "agents");
                assert!(
                    headers
                        .iter()
                        .any(|(name, value)| *name == "access-control-allow-origin"
                            && value == "https://app.example.com"),
                    "{headers:?}"
                );
            }
            other => panic!("expected a preflight, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_secret_is_refused_before_any_upstream() {
        let upgrade = HANDSHAKE;
        let r = refused(decide_for(
            "GET",
            "/locked/Vault/a",
            &upgrade,
            ConnectionFacts::default(),
        ));
        assert_eq!(
            (r.problem.status, r.problem.kind()),
            (503, "secret_missing")
        );
        assert_eq!(r.handshake_result(), Some(HandshakeResult::SecretMissing));
    }

    #[test]
    fn a_request_over_a_limit_is_refused_first() {
        let long = "x".repeat(4096);
        let r = refused(decide_for(
            "GET",
            "/agents/Nope/a",
            &[("x-long", &long)],
            ConnectionFacts::default(),
        ));
        assert_eq!(r.reason, RefusalReason::Limit(LimitRefusal::HeaderTooLarge));
        assert_eq!((r.problem.status, r.route.as_str()), (431, NO_ROUTE));
    }

    #[test]
    fn upgrades_are_refused_while_draining_and_over_http2() {
        let draining = ConnectionFacts {
            draining: true,
            http2: false,
        };
        let r = refused(decide_for(
            "GET",
            "/agents/CoderAgent/a",
            &UPGRADE,
            draining,
        ));
        assert_eq!((r.problem.status, r.reason), (503, RefusalReason::Draining));
        let http2 = ConnectionFacts {
            draining: false,
            http2: true,
        };
        let r = refused(decide_for("GET", "/agents/CoderAgent/a", &UPGRADE, http2));
        assert_eq!(
            (r.problem.status, r.reason),
            (400, RefusalReason::WebSocketOverHttp2)
        );
        // A plain request is served while draining: only new WebSockets are refused.
        let plain = [("origin", "https://app.example.com")];
        assert!(matches!(
            decide_for("GET", "/agents/CoderAgent/a", &plain, draining),
            Admission::Forward(_)
        ));
    }

    #[test]
    fn an_upgrade_and_a_plain_request_are_admitted_with_their_cors() {
        match decide_for(
            "GET",
            "/agents/coder_agent/a",
            &UPGRADE,
            ConnectionFacts::default(),
        ) {
            Admission::Upgrade(admitted) => {
                assert_eq!(admitted.route, "agents");
                assert_eq!(admitted.target.upstream_path, "/agents/coder-agent/a");
                let cors = admitted.cors.expect("a policy");
                assert_eq!(cors.origin.as_deref(), Some("https://app.example.com"));
            }
            other => panic!("expected an upgrade, got {other:?}"),
        }
        match decide_for(
            "POST",
            "/agents/Chat/a",
            &[("origin", "https://app.example.com")],
            ConnectionFacts::default(),
        ) {
            Admission::Forward(admitted) => assert_eq!(admitted.target.upstream.name, "cloud"),
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    #[test]
    fn an_invalid_opening_handshake_is_refused_before_anything_else_of_the_upgrade() {
        let refused_for = |method: &str, headers: &[(&str, &str)]| {
            refused(decide_for(
                method,
                "/agents/CoderAgent/a",
                headers,
                ConnectionFacts::default(),
            ))
        };
        let r = refused_for(
            "GET",
            &[("upgrade", "websocket"), ("connection", "Upgrade")],
        );
        assert_eq!(
            (r.problem.status, r.reason),
            (426, RefusalReason::InvalidUpgrade)
        );
        assert_eq!(r.handshake_result(), Some(HandshakeResult::Status(426)));
        let (head, _) = r.problem.response("id-1").expect("response");
        assert_eq!(
            head.headers
                .get("sec-websocket-version")
                .map(|v| v.as_bytes()),
            Some(&b"13"[..])
        );
        let r = refused_for("POST", &HANDSHAKE);
        assert_eq!(
            (r.problem.status, r.problem.kind()),
            (400, "invalid_upgrade")
        );
        let bad_key = [
            HANDSHAKE[0],
            HANDSHAKE[1],
            HANDSHAKE[2],
            ("sec-websocket-key", "c2hvcnQ="),
        ];
        let r = refused_for("GET", &bad_key);
        assert_eq!(
            (r.problem.status, r.reason),
            (400, RefusalReason::InvalidUpgrade)
        );
        // The handshake comes before the Origin policy: no key and a bad Origin is a 400.
        let both = [
            HANDSHAKE[0],
            HANDSHAKE[1],
            HANDSHAKE[2],
            ("origin", "https://evil.example"),
        ];
        assert_eq!(refused_for("GET", &both).problem.status, 400);
    }
}
