//! What the upstream receives: the request header rewritten for the target.

use crate::auth::authenticator::Verified;
use crate::auth::credential::strip_credentials;
use crate::edge::request_id::REQUEST_ID_HEADER;
use crate::routing::resolve::Target;
use crate::secrets::SecretStore;
use crate::upstream::{UpstreamKind, NAMESPACE_HEADER, ROOM_HEADER};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use http::header::{TRANSFER_ENCODING, UPGRADE};
use http::request::Parts;
use pingora::http::RequestHeader;
use pingora::Result;
use std::net::IpAddr;
use std::sync::Arc;

/// Header name prefixes a client may never choose for itself.
const RESERVED_PREFIXES: [&str; 3] = ["x-partykit-", "x-agents-", "x-gateway-identity-"];

const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const NAMESPACE: HeaderName = HeaderName::from_static(NAMESPACE_HEADER);
const ROOM: HeaderName = HeaderName::from_static(ROOM_HEADER);

/// Headers the gateway sets for the upstream, whatever the client sent.
const MANAGED: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    REQUEST_ID_HEADER,
    "host",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1, RFC 9113 §8.2.2), besides those named by
/// `Connection`; the body's framing is set again for the upstream (see
/// [`upstream_request_for`]). Names, not strings: removing by a string parses it first, for
/// every header of every request.
const HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Facts about the downstream connection that the upstream is told.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientInfo {
    /// The client, as [`crate::edge::client_address::client_ip`] decided.
    pub(crate) ip: Option<IpAddr>,
    /// The `X-Forwarded-For` to send, from [`crate::edge::client_address::forwarded_for`].
    pub(crate) forwarded_for: Option<String>,
    pub(crate) tls: bool,
    /// The request's ID (see [`crate::edge::request_id`]), sent upstream and on every answer.
    pub(crate) request_id: String,
    /// The trace ID of the request's `traceparent`, for log lines.
    pub(crate) trace_id: Option<String>,
    /// Who the client is, when the agent's policy verified it.
    pub(crate) identity: Option<Arc<Verified>>,
}

/// The request for the upstream: the client's `request` rewritten for `target` by
/// [`prepare_upstream_request`]. A plain request's body keeps its declared length, or goes
/// chunked when it has none (a chunked body, or an HTTP/2 one without `Content-Length`):
/// never both, and never a client's `Transfer-Encoding` list as sent.
///
/// It is built without Pingora's header-case map, so names go upstream in lower case (as
/// HTTP/2 sends them, and as HTTP/1.1 allows): Pingora's `insert_header` turns each name into
/// bytes and parses it back, and keeps the case map in step, about 1.6k instructions per
/// header set against a plain map insert (see `docs/pingora-costs.md`).
pub(crate) fn upstream_request_for(
    request: &RequestHeader,
    target: &Target,
    client: &ClientInfo,
    body: UpstreamBody,
    secrets: &SecretStore,
) -> Result<RequestHeader> {
    let mut parts = request.as_owned_parts();
    parts.version = http::Version::HTTP_11;
    // Room for what the gateway adds, so the map is not regrown on the way.
    parts.headers.reserve(8);
    let websocket = body == UpstreamBody::WebSocket;
    prepare_upstream_request(&mut parts, target, client, websocket, secrets)?;
    let headers = &request.headers;
    let chunked = headers.contains_key(TRANSFER_ENCODING)
        || (body == UpstreamBody::Present && !headers.contains_key(CONTENT_LENGTH));
    if chunked && !websocket {
        parts.headers.remove(CONTENT_LENGTH);
        parts
            .headers
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    Ok(RequestHeader::from(parts))
}

/// What follows the request head upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamBody {
    /// Nothing: the client's request has no body.
    None,
    /// The client's body.
    Present,
    /// A WebSocket handshake: the request goes as it is framed, the upgrade headers kept.
    WebSocket,
}

/// Rewrites `req` for `target`: path, Host, routing headers, forwarding headers, and no
/// hop-by-hop or client-chosen routing headers. `websocket` keeps the upgrade headers.
pub(crate) fn prepare_upstream_request(
    req: &mut Parts,
    target: &Target,
    client: &ClientInfo,
    websocket: bool,
    secrets: &SecretStore,
) -> Result<()> {
    remove_hop_by_hop(req);
    remove_reserved(req, target);
    let headers = &mut req.headers;
    // A client may never supply the header a secret travels in, whether or not it is set.
    for (secret, header) in &target.upstream.forward_secrets {
        headers.remove(header);
        if let Some(value) = secrets.get(secret) {
            headers.insert(header.clone(), value_of(value.expose())?);
        }
    }
    if websocket {
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    }
    if let UpstreamKind::Worker { host, .. } = &target.upstream.kind {
        headers.insert(HOST, value_of(host)?);
    }
    if let (true, Some(agent)) = (target.upstream.is_local(), &target.agent) {
        headers.insert(NAMESPACE, value_of(&agent.agent.slug)?);
        headers.insert(ROOM, value_of(&agent.instance)?);
    }
    match &client.forwarded_for {
        Some(chain) => headers.insert(FORWARDED_FOR, value_of(chain)?),
        None => headers.remove(FORWARDED_FOR),
    };
    let proto = HeaderValue::from_static(if client.tls { "https" } else { "http" });
    headers.insert(FORWARDED_PROTO, proto);
    headers.insert(REQUEST_ID, value_of(&client.request_id)?);
    if let Some(verified) = &client.identity {
        for (name, value) in &verified.headers {
            headers.insert(name.clone(), value.clone());
        }
    }
    req.uri = target.upstream_path.parse().map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "upstream path", e)
    })?;
    if let Some(policy) = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref()) {
        strip_credentials(&policy.credentials, req)?;
    }
    Ok(())
}

fn value_of(text: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(text).map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "header value", e)
    })
}

fn remove_hop_by_hop(req: &mut Parts) {
    // `keep-alive` and `upgrade` are in the fixed set below anyway.
    let named: Vec<String> = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            // Neither Host nor the body's length is the client's to drop (Pingora's proxy
            // refuses a request that nominates Host).
            !t.is_empty()
                && !["keep-alive", "upgrade", "host", "content-length"]
                    .iter()
                    .any(|fixed| t.eq_ignore_ascii_case(fixed))
        })
        .map(str::to_ascii_lowercase)
        .collect();
    for name in &named {
        req.headers.remove(name.as_str());
    }
    for name in &HOP_BY_HOP {
        req.headers.remove(name);
    }
}

/// Removes every header a client may not choose: the reserved prefixes, and any name that
/// folds to a header the gateway sets or strips when `_` is read as `-` (`x_partykit_room`,
/// `X_Forwarded_For`, `keep_alive`): frameworks that map both to one variable would read the
/// client's alias as the gateway's header.
fn remove_reserved(req: &mut Parts, target: &Target) {
    let policy = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref());
    // The identity headers are the gateway's to set, under the names the policy gives them.
    let identity_headers = policy
        .into_iter()
        .flat_map(|p| p.identity_headers.iter().map(|(_, header)| header.as_str()));
    let secret_headers: Vec<&str> = target
        .upstream
        .forward_secrets
        .iter()
        .map(|(_, header)| header.as_str())
        .chain(identity_headers)
        .collect();
    let reserved: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            if RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
                || secret_headers.contains(&name)
            {
                return true;
            }
            if !name.contains('_') {
                return false;
            }
            // Header names are lower case already; only the separator is folded.
            let folded = name.replace('_', "-");
            RESERVED_PREFIXES.iter().any(|p| folded.starts_with(p))
                || MANAGED.contains(&folded.as_str())
                || HOP_BY_HOP.iter().any(|h| h.as_str() == folded)
                || secret_headers.contains(&folded.as_str())
        })
        .cloned()
        .collect();
    for name in reserved {
        req.headers.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{parse, CODER_AND_CHAT, UPSTREAMS};
    use crate::routing::resolve::resolve;

    fn prepared(path: &str, headers: &[(&str, &str)], websocket: bool) -> RequestHeader {
        let config = parse(&format!("{UPSTREAMS}[[routes]]{CODER_AND_CHAT}"));
        let target = resolve(&config, path, Some("_pk=1")).expect("target");
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("req");
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).expect("header");
        }
        // The chain as client_address::forwarded_for builds it behind a trusted proxy.
        let client = ClientInfo {
            ip: Some("10.1.2.3".parse().expect("ip")),
            forwarded_for: Some("192.0.2.1, 10.1.2.3".to_owned()),
            tls: false,
            request_id: "req-1".to_owned(),
            trace_id: None,
            identity: None,
        };
        let secrets = SecretStore::read(&config);
        let body = match websocket {
            true => UpstreamBody::WebSocket,
            false => UpstreamBody::None,
        };
        upstream_request_for(&req, &target, &client, body, &secrets).expect("prepared")
    }

    fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
        req.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_client_cannot_drop_host_or_the_body_length_by_naming_them_in_connection() {
        let req = prepared(
            "/agents/coderagent/Room1",
            &[
                ("host", "gw"),
                ("content-length", "5"),
                ("connection", "host, content-length, x-drop-me"),
                ("x-drop-me", "1"),
            ],
            false,
        );
        assert_eq!(header(&req, "host"), Some("gw"));
        assert_eq!(header(&req, "content-length"), Some("5"));
        assert_eq!(header(&req, "x-drop-me"), None);
    }

    #[test]
    fn local_upstreams_get_routing_headers_and_spoofs_are_dropped() {
        let req = prepared(
            "/agents/coderagent/Room1",
            &[
                ("x-partykit-room", "someone-else"),
                ("X-PartyKit-Namespace", "admin"),
                ("x-agents-secret", "1"),
                ("connection", "keep-alive, x-drop-me"),
                ("x-drop-me", "1"),
                ("x-forwarded-for", "192.0.2.1"),
            ],
            false,
        );
        assert_eq!(header(&req, NAMESPACE_HEADER), Some("coder-agent"));
        assert_eq!(header(&req, ROOM_HEADER), Some("Room1"));
        assert_eq!(header(&req, "x-agents-secret"), None);
        assert_eq!(header(&req, "x-drop-me"), None);
        assert_eq!(header(&req, "connection"), None);
        assert_eq!(header(&req, "x-forwarded-for"), Some("192.0.2.1, 10.1.2.3"));
        assert_eq!(header(&req, "x-forwarded-proto"), Some("http"));
        assert_eq!(header(&req, REQUEST_ID_HEADER), Some("req-1"));
        assert_eq!(req.uri.to_string(), "/agents/coder-agent/Room1?_pk=1");
    }

    #[test]
    fn workers_get_their_host_and_no_routing_headers() {
        let req = prepared(
            "/agents/CHAT/default",
            &[
                ("host", "gateway.local"),
                ("x-partykit-room", "x"),
                ("upgrade", "websocket"),
                ("connection", "upgrade"),
            ],
            true,
        );
        assert_eq!(header(&req, "host"), Some("agents.example.com"));
        assert_eq!(header(&req, ROOM_HEADER), None);
        assert_eq!(header(&req, "upgrade"), Some("websocket"));
        assert_eq!(header(&req, "connection"), Some("Upgrade"));
        assert_eq!(req.uri.to_string(), "/agents/chat/default?_pk=1");
    }

    #[test]
    fn underscore_aliases_of_managed_headers_are_dropped() {
        let req = prepared(
            "/agents/coderagent/Room1",
            &[
                ("x_partykit_room", "someone-else"),
                ("X_PartyKit_Namespace", "admin"),
                ("x_forwarded_for", "203.0.113.9"),
                ("X_Forwarded_Proto", "https"),
                ("x_request_id", "mine"),
                ("keep_alive", "1"),
                ("x_agents_identity", "root"),
                ("x_custom_header", "kept"),
            ],
            false,
        );
        for alias in [
            "x_partykit_room",
            "x_partykit_namespace",
            "x_forwarded_for",
            "x_forwarded_proto",
            "x_request_id",
            "keep_alive",
            "x_agents_identity",
        ] {
            assert_eq!(header(&req, alias), None, "{alias} reached the upstream");
        }
        assert_eq!(header(&req, "x_custom_header"), Some("kept"));
        assert_eq!(header(&req, ROOM_HEADER), Some("Room1"));
    }
}
