//! The gateway's own error answers: an HTTP status and a short JSON body naming the problem.

use crate::auth::AuthFailure;
use crate::edge::cors::OriginHeaderError;
use crate::edge::limits::LimitRefusal;
use crate::edge::request_id::REQUEST_ID_HEADER;
use crate::fleet::placement::NoHome;
use crate::routing::resolve::Refusal;
use crate::websocket::handshake::{InvalidUpgrade, InvalidUpgradeAnswer, WEBSOCKET_VERSION};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::{ErrorType, Result};
use serde_json::{json, Value};

/// An error answer, before it is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub(crate) status: u16,
    pub(crate) body: Value,
    /// Headers the answer needs besides the JSON ones (`Sec-WebSocket-Version` on a 426,
    /// `WWW-Authenticate` on a 401).
    headers: Vec<(&'static str, String)>,
    /// Another service's answer relayed as it is, in place of the JSON body.
    relayed_body: Option<Bytes>,
}

impl Problem {
    pub(crate) fn new(status: u16, body: Value) -> Self {
        Problem {
            status,
            body,
            headers: Vec::new(),
            relayed_body: None,
        }
    }

    /// A request that asks for a WebSocket but is not a valid opening handshake: 426 with
    /// the version the gateway speaks for a wrong version, 400 otherwise.
    pub(crate) fn invalid_upgrade(why: InvalidUpgrade) -> Self {
        let body = json!({"error": "invalid_upgrade", "detail": why.describe()});
        match why {
            InvalidUpgrade::Version => Problem {
                headers: vec![
                    ("sec-websocket-version", WEBSOCKET_VERSION.to_owned()),
                    ("upgrade", "websocket".to_owned()),
                ],
                ..Problem::new(426, body)
            },
            _ => Problem::new(400, body),
        }
    }

    /// An upstream's 101 that does not answer the client's handshake.
    pub(crate) fn invalid_upgrade_answer(upstream: &str, why: InvalidUpgradeAnswer) -> Self {
        Problem::new(
            502,
            json!({"error": "upstream_invalid_upgrade", "upstream": upstream, "reason": why.kind(), "detail": why.describe()}),
        )
    }

    /// The `error` field, used as the handshake result label.
    pub(crate) fn kind(&self) -> &str {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("error")
    }

    pub(crate) fn upstream_unavailable(upstream: &str, why: &str) -> Self {
        Problem::new(
            502,
            json!({"error": "upstream_unavailable", "upstream": upstream, "detail": why}),
        )
    }

    /// No node of a `local` upstream can take the instance: 503 at once, rather than a 502
    /// after a connect timeout to a node known to be down.
    pub(crate) fn no_node(upstream: &str, why: NoHome) -> Self {
        let detail = match why {
            NoHome::AllDown => "every node of the upstream is down",
            NoHome::NoNodes => "the upstream has no nodes (DNS has listed none yet)",
        };
        Problem::new(
            503,
            json!({"error": "no_healthy_node", "upstream": upstream, "detail": detail}),
        )
    }

    pub(crate) fn upstream_timeout(upstream: &str) -> Self {
        Problem::new(
            504,
            json!({"error": "upstream_timeout", "upstream": upstream, "detail": "the upstream did not answer in time"}),
        )
    }

    /// The answer for an upstream failure of Pingora's error type `etype`.
    pub(crate) fn for_upstream_error(upstream: &str, etype: &ErrorType) -> Self {
        match etype {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Problem::upstream_timeout(upstream)
            }
            ErrorType::ConnectRefused => {
                Problem::upstream_unavailable(upstream, "connection refused")
            }
            ErrorType::ConnectNoRoute => {
                Problem::upstream_unavailable(upstream, "no route to the upstream")
            }
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
                Problem::upstream_unavailable(upstream, "TLS handshake with the upstream failed")
            }
            _ => Problem::upstream_unavailable(upstream, "the upstream connection failed"),
        }
    }

    /// The gateway itself failed, not the upstream or the client.
    pub(crate) fn internal() -> Self {
        Problem::new(
            500,
            json!({"error": "internal", "detail": "the gateway failed to proxy the request"}),
        )
    }

    /// The gateway is draining: new agent WebSockets are refused so clients reconnect elsewhere.
    pub(crate) fn draining() -> Self {
        Problem::new(
            503,
            json!({"error": "draining", "detail": "the gateway is shutting down; reconnect"}),
        )
    }

    /// An `Origin` the policy does not allow (or none, where one is required).
    pub(crate) fn origin_refused(origin: Option<&str>) -> Self {
        match origin {
            Some(origin) => Problem::new(
                403,
                json!({"error": "origin_refused", "origin": truncate(origin, 256), "detail": "this Origin is not allowed by the gateway's CORS policy"}),
            ),
            None => Problem::new(
                403,
                json!({"error": "origin_required", "detail": "this route requires an Origin header on WebSocket upgrades"}),
            ),
        }
    }

    /// A secret the agent needs is missing; the hint says where to set it, never its value.
    pub(crate) fn secret_missing(secret: &str, hint: &str) -> Self {
        Problem::new(
            503,
            json!({"error": "secret_missing", "secret": secret, "hint": hint}),
        )
    }

    /// An upstream's own small 500 on a route that needs secrets, with its text kept.
    pub(crate) fn upstream_status(upstream: &str, status: u16, body: &[u8]) -> Self {
        Problem::new(
            503,
            json!({
                "error": "upstream_error",
                "upstream": upstream,
                "upstream_status": status,
                "upstream_body": String::from_utf8_lossy(body),
            }),
        )
    }

    pub(crate) fn limit(refusal: LimitRefusal) -> Self {
        let detail = match refusal {
            LimitRefusal::UpgradeRate => {
                "too many WebSocket upgrades from this address; retry in a second"
            }
            LimitRefusal::WebSocketsPerIp => "too many open WebSockets from this address",
            LimitRefusal::WebSocketsTotal => {
                "the gateway holds as many WebSockets as it is configured for"
            }
            LimitRefusal::HeaderTooLarge => "the request header is larger than the gateway accepts",
            LimitRefusal::BodyTooLarge => "the request body is larger than the gateway accepts",
            LimitRefusal::UpgradeRatePerSubject => {
                "too many WebSocket upgrades by this user; retry in a second"
            }
            LimitRefusal::WebSocketsPerSubject => "too many open WebSockets by this user",
        };
        Problem::new(
            refusal.status(),
            json!({"error": refusal.kind(), "detail": detail}),
        )
    }

    /// A request a policy did not let through. 401s carry `WWW-Authenticate: Bearer` with
    /// the RFC 6750 error; the detail never contains the credential.
    pub(crate) fn auth(failure: &AuthFailure, policy: &str) -> Self {
        let (status, error, detail) = match failure {
            AuthFailure::Missing => (401, "unauthorized", "no credential".to_owned()),
            AuthFailure::Invalid(why) => (401, "invalid_token", why.clone()),
            AuthFailure::Expired => (401, "token_expired", "the token has expired".to_owned()),
            AuthFailure::Forbidden(why) => (403, "forbidden", why.clone()),
            AuthFailure::Unavailable(why) => (503, "auth_unavailable", why.clone()),
            AuthFailure::Denied {
                status,
                headers,
                body,
            } => {
                // The auth service's own 401 or 403 reaches the client as it is.
                let mut problem =
                    Problem::new(*status, json!({"error": "denied", "policy": policy}));
                for (name, value) in headers {
                    let known = match name {
                        n if n == http::header::WWW_AUTHENTICATE => "www-authenticate",
                        n if n == http::header::CONTENT_TYPE => "content-type",
                        _ => continue,
                    };
                    if let Ok(value) = value.to_str() {
                        problem.headers.push((known, value.to_owned()));
                    }
                }
                problem.relayed_body = Some(body.clone());
                return problem;
            }
        };
        let mut problem = Problem::new(
            status,
            json!({"error": error, "policy": policy, "detail": detail}),
        );
        let challenge = match failure {
            // RFC 6750 §3.1: no error code when the request had no credential at all.
            AuthFailure::Missing => Some("Bearer realm=\"agent-gateway\"".to_owned()),
            AuthFailure::Invalid(why) => Some(bearer_error("invalid_token", why)),
            AuthFailure::Expired => Some(bearer_error("invalid_token", "the token has expired")),
            AuthFailure::Forbidden(why) => Some(bearer_error("insufficient_scope", why)),
            _ => None,
        };
        if let Some(challenge) = challenge {
            problem.headers.push(("www-authenticate", challenge));
        }
        problem
    }

    pub(crate) fn bad_origin_header(error: OriginHeaderError) -> Self {
        let detail = match error {
            OriginHeaderError::Several => "a request may carry one Origin header",
            OriginHeaderError::NotText => "the Origin header is not valid text",
        };
        Problem::new(
            400,
            json!({"error": "invalid_origin_header", "detail": detail}),
        )
    }

    /// The JSON body, naming the request's ID as the `x-request-id` header does.
    pub(crate) fn body_bytes(&self, request_id: &str) -> Bytes {
        if let Some(body) = &self.relayed_body {
            return body.clone();
        }
        let mut body = self.body.clone();
        if let Value::Object(fields) = &mut body {
            fields.insert("request_id".to_owned(), json!(request_id));
        }
        Bytes::from(body.to_string())
    }

    pub(crate) fn response(&self, request_id: &str) -> Result<(ResponseHeader, Bytes)> {
        let body = self.body_bytes(request_id);
        let mut header = ResponseHeader::build(self.status, Some(4 + self.headers.len()))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        header.insert_header(REQUEST_ID_HEADER, request_id)?;
        for (name, value) in &self.headers {
            header.insert_header(*name, value.as_str())?;
        }
        Ok((header, body))
    }

    /// Writes the answer on `session` and ends the response.
    pub(crate) async fn send(&self, session: &mut ServerSession, request_id: &str) -> Result<()> {
        let (header, body) = self.response(request_id)?;
        session.write_response_header(Box::new(header)).await?;
        session.write_response_body(body, true).await
    }
}

impl From<&Refusal> for Problem {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::BadPath { error, .. } => Problem::new(
                400,
                json!({"error": error.kind(), "detail": error.describe()}),
            ),
            Refusal::UnknownAgent { asked, known, .. } => Problem::new(
                404,
                json!({"error": "unknown_agent", "agent": asked, "known_agents": known}),
            ),
            Refusal::NoRoute => Problem::new(
                404,
                json!({"error": "no_route", "detail": "the path is outside every configured route prefix"}),
            ),
        }
    }
}

/// A `WWW-Authenticate: Bearer` challenge with an RFC 6750 error. The description is the
/// gateway's own text; quotes and backslashes are dropped so it stays one quoted-string.
fn bearer_error(error: &str, description: &str) -> String {
    let description: String = description
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect();
    format!(
        "Bearer realm=\"agent-gateway\", error=\"{error}\", error_description=\"{description}\""
    )
}

/// The `kind` label of `agent_gateway_upstream_errors_total` for a Pingora error type.
pub(crate) fn upstream_error_kind(etype: &ErrorType) -> &'static str {
    match etype {
        ErrorType::ConnectRefused => "connect_refused",
        ErrorType::ConnectTimedout => "connect_timeout",
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
        ErrorType::ConnectNoRoute => "no_route",
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
            "tls"
        }
        ErrorType::ConnectionClosed => "closed",
        ErrorType::InvalidHTTPHeader => "invalid_response",
        _ => "other",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}
