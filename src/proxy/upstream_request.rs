//! What the upstream receives: the request header rewritten for the target.

use crate::auth::authenticator::Verified;
use crate::auth::credential::strip_credentials;
use crate::edge::request_id::REQUEST_ID_HEADER;
use crate::routing::resolve::Target;
use crate::secrets::SecretStore;
use crate::upstream::{UpstreamKind, NAMESPACE_HEADER, ROOM_HEADER};
use crate::websocket::handshake::header_has_token;
use http::header::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::Result;
use std::net::IpAddr;
use std::sync::Arc;

/// Header name prefixes a client may never choose for itself.
const RESERVED_PREFIXES: [&str; 3] = ["x-partykit-", "x-agents-", "x-gateway-identity-"];

/// Headers the gateway sets for the upstream, whatever the client sent.
const MANAGED: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    REQUEST_ID_HEADER,
    "host",
];

/// Hop-by-hop headers (RFC 9110 §7.6.1), besides those named by `Connection`. Names, not
/// strings: removing by a string parses it first, for every header of every request.
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::UPGRADE,
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

/// Rewrites `req` for `target`: path, Host, routing headers, forwarding headers, and no
/// hop-by-hop or client-chosen routing headers. `websocket` keeps the upgrade headers.
pub(crate) fn prepare_upstream_request(
    req: &mut RequestHeader,
    target: &Target,
    client: &ClientInfo,
    websocket: bool,
    secrets: &SecretStore,
) -> Result<()> {
    remove_hop_by_hop(req);
    remove_reserved(req, target);
    // A client may never supply the header a secret travels in, whether or not it is set.
    for (secret, header) in &target.upstream.forward_secrets {
        req.remove_header(header);
        if let Some(value) = secrets.get(secret) {
            req.insert_header(header.clone(), value.expose())?;
        }
    }
    if websocket {
        req.insert_header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )?;
        req.insert_header(http::header::UPGRADE, HeaderValue::from_static("websocket"))?;
    }
    let uri: http::Uri = target.upstream_path.parse().map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "upstream path", e)
    })?;
    req.set_uri(uri);
    if let UpstreamKind::Worker { host, .. } = &target.upstream.kind {
        req.insert_header(http::header::HOST, host.as_str())?;
    }
    if let (true, Some(agent)) = (target.upstream.is_local(), &target.agent) {
        req.insert_header(NAMESPACE_HEADER, agent.agent.slug.as_str())?;
        req.insert_header(ROOM_HEADER, agent.instance.as_str())?;
    }
    match &client.forwarded_for {
        Some(chain) => req.insert_header("x-forwarded-for", chain.as_str())?,
        None => {
            req.remove_header("x-forwarded-for");
        }
    }
    let proto = HeaderValue::from_static(if client.tls { "https" } else { "http" });
    req.insert_header("x-forwarded-proto", proto)?;
    req.insert_header(REQUEST_ID_HEADER, client.request_id.as_str())?;
    if let Some(policy) = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref()) {
        strip_credentials(&policy.credentials, req)?;
    }
    if let Some(verified) = &client.identity {
        for (name, value) in &verified.headers {
            req.insert_header(name.clone(), value.clone())?;
        }
    }
    Ok(())
}

fn remove_hop_by_hop(req: &mut RequestHeader) {
    // `keep-alive` and `upgrade` are in the fixed set below anyway.
    let named: Vec<String> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !["keep-alive", "upgrade"]
                    .iter()
                    .any(|fixed| t.eq_ignore_ascii_case(fixed))
        })
        .map(str::to_ascii_lowercase)
        .collect();
    for name in &named {
        req.remove_header(name.as_str());
    }
    for name in &HOP_BY_HOP {
        req.remove_header(name);
    }
}

/// Removes every header a client may not choose: the reserved prefixes, and any name that
/// folds to a header the gateway sets or strips when `_` is read as `-` (`x_partykit_room`,
/// `X_Forwarded_For`, `keep_alive`): frameworks that map both to one variable would read the
/// client's alias as the gateway's header.
fn remove_reserved(req: &mut RequestHeader, target: &Target) {
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
        req.remove_header(&name);
    }
}

/// Whether a request asks for an upgrade the gateway does not proxy (anything but websocket).
pub(crate) fn is_other_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::UPGRADE)
        && !header_has_token(&req.headers, http::header::UPGRADE, "websocket")
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
        prepare_upstream_request(
            &mut req,
            &target,
            &client,
            websocket,
            &SecretStore::read(&config),
        )
        .expect("prepared");
        req
    }

    fn header<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
        req.headers.get(name).and_then(|v| v.to_str().ok())
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
