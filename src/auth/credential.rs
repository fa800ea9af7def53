//! Where a client's credential is, and taking it out of what goes upstream.
//!
//! Browsers cannot set `Authorization` on a WebSocket, so a credential may also come in a
//! cookie, a query parameter (what partysocket's and AgentClient's `query` option sends) or
//! an entry of `Sec-WebSocket-Protocol` (`bearer.<token>`). The query parameter and the
//! protocol entry are removed before the request goes upstream, so that the token reaches no
//! upstream log and is never echoed back as the selected protocol.

use http::header::{HeaderValue, AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL};
use http::request::Parts;
use percent_encoding::percent_decode_str;
use pingora::http::RequestHeader;
use std::fmt;

/// One place a policy looks for the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CredentialSource {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// The cookie of this name.
    Cookie(String),
    /// The query parameter of this name.
    Query(String),
    /// The `Sec-WebSocket-Protocol` entry that starts with this prefix (`bearer.`).
    Protocol(String),
}

impl CredentialSource {
    /// Parses the configuration's form: `bearer`, `cookie:NAME`, `query:NAME`,
    /// `protocol:PREFIX`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (kind, name) = match text.split_once(':') {
            Some((kind, name)) => (kind, Some(name)),
            None => (text, None),
        };
        let named = |make: fn(String) -> CredentialSource| match name {
            Some(name) if is_token(name) => Ok(make(name.to_owned())),
            _ => Err(format!(
                "{text:?} needs a name after the colon, made of letters, digits and -_.~"
            )),
        };
        match (kind, name) {
            ("bearer", None) => Ok(CredentialSource::Bearer),
            ("cookie", _) => named(CredentialSource::Cookie),
            ("query", _) => named(CredentialSource::Query),
            ("protocol", _) => named(CredentialSource::Protocol),
            _ => Err(format!(
                "{text:?} is not a credential source; expected \"bearer\", \"cookie:NAME\", \"query:NAME\" or \"protocol:PREFIX\""
            )),
        }
    }
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Bearer => write!(f, "bearer"),
            CredentialSource::Cookie(name) => write!(f, "cookie:{name}"),
            CredentialSource::Query(name) => write!(f, "query:{name}"),
            CredentialSource::Protocol(prefix) => write!(f, "protocol:{prefix}"),
        }
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

/// The credential of `request`: the first of `sources` that holds one.
pub(crate) fn find_credential(
    sources: &[CredentialSource],
    request: &RequestHeader,
) -> Option<String> {
    sources
        .iter()
        .find_map(|source| match source {
            CredentialSource::Bearer => bearer(request),
            CredentialSource::Cookie(name) => cookie(request, name),
            CredentialSource::Query(name) => query_parameter(request.uri.query()?, name),
            CredentialSource::Protocol(prefix) => protocol_entries(request)
                .find_map(|entry| entry.strip_prefix(prefix.as_str()).map(str::to_owned)),
        })
        .filter(|value| !value.is_empty())
}

fn bearer(request: &RequestHeader) -> Option<String> {
    let value = request.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn cookie(request: &RequestHeader, name: &str) -> Option<String> {
    request
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| value.trim_matches('"').to_owned())
        })
}

fn query_parameter(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| decode(value))
    })
}

/// Query values are form-encoded: `+` is a space, then percent-decoding.
fn decode(value: &str) -> String {
    let spaced = value.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

fn protocol_entries(request: &Parts) -> impl Iterator<Item = &str> {
    request
        .headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// The subprotocols the client offered, without the credential entries: what the upstream is
/// offered and what an answer may select.
pub(crate) fn offered_protocols(sources: &[CredentialSource], request: &Parts) -> Vec<String> {
    protocol_entries(request)
        .filter(|entry| !is_credential_entry(sources, entry))
        .map(str::to_owned)
        .collect()
}

/// Whether the client offered a credential as a `Sec-WebSocket-Protocol` entry.
pub(crate) fn offers_protocol_credential(sources: &[CredentialSource], request: &Parts) -> bool {
    protocol_entries(request).any(|entry| is_credential_entry(sources, entry))
}

fn is_credential_entry(sources: &[CredentialSource], entry: &str) -> bool {
    sources.iter().any(|source| {
        matches!(source, CredentialSource::Protocol(prefix) if entry.starts_with(prefix.as_str()))
    })
}

/// Takes the query parameters and `Sec-WebSocket-Protocol` entries that `sources` read
/// credentials from out of `request`, the request that goes upstream.
pub(crate) fn strip_credentials(
    sources: &[CredentialSource],
    request: &mut Parts,
) -> pingora::Result<()> {
    let query_names: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            CredentialSource::Query(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    if let Some(query) = request.uri.query().filter(|_| !query_names.is_empty()) {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
                !query_names.contains(&key)
            })
            .collect();
        if kept.len() != query.split('&').count() {
            let path = request.uri.path();
            let uri = match kept.is_empty() {
                true => path.to_owned(),
                false => format!("{path}?{}", kept.join("&")),
            };
            let uri = uri.parse().map_err(|_| {
                pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    "rewritten URI is invalid",
                )
            })?;
            request.uri = uri;
        }
    }
    let offered = protocol_entries(request).count();
    let kept = offered_protocols(sources, request);
    if kept.len() != offered {
        request.headers.remove(SEC_WEBSOCKET_PROTOCOL);
        if !kept.is_empty() {
            let value = HeaderValue::from_str(&kept.join(", ")).map_err(|_| {
                pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    "invalid subprotocol list",
                )
            })?;
            request.headers.insert(SEC_WEBSOCKET_PROTOCOL, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).unwrap();
        }
        req
    }

    fn sources(texts: &[&str]) -> Vec<CredentialSource> {
        texts
            .iter()
            .map(|t| CredentialSource::parse(t).unwrap())
            .collect()
    }

    #[test]
    fn sources_parse_and_print_back() {
        for text in [
            "bearer",
            "cookie:session",
            "query:token",
            "protocol:bearer.",
        ] {
            assert_eq!(CredentialSource::parse(text).unwrap().to_string(), text);
        }
        for bad in ["basic", "cookie", "cookie:", "query:a b", "header:x"] {
            assert!(CredentialSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_source_that_holds_a_credential_wins() {
        let order = sources(&[
            "bearer",
            "cookie:session",
            "query:token",
            "protocol:bearer.",
        ]);
        let req = request(
            "/a/b?x=1&token=q%2Bq",
            &[
                ("cookie", "theme=dark; session=c1"),
                ("sec-websocket-protocol", "chat, bearer.p1"),
            ],
        );
        assert_eq!(find_credential(&order, &req).as_deref(), Some("c1"));
        let req = request("/a/b?x=1&token=q%2Bq", &[("authorization", "Bearer  h1 ")]);
        assert_eq!(find_credential(&order, &req).as_deref(), Some("h1"));
        let req = request("/a/b?x=1&token=q%2Bq", &[]);
        assert_eq!(find_credential(&order, &req).as_deref(), Some("q+q"));
        let req = request("/a/b", &[("sec-websocket-protocol", "chat, bearer.p1")]);
        assert_eq!(find_credential(&order, &req).as_deref(), Some("p1"));
    }

    #[test]
    fn other_schemes_and_empty_values_are_no_credential() {
        let order = sources(&["bearer", "query:token"]);
        let req = request("/a?token=", &[("authorization", "Basic YTpi")]);
        assert_eq!(find_credential(&order, &req), None);
    }

    #[test]
    fn query_and_protocol_credentials_do_not_go_upstream() {
        let order = sources(&["query:token", "protocol:bearer."]);
        let mut req = request(
            "/agents/a/b?_pk=1&token=secret&x=2",
            &[("sec-websocket-protocol", "bearer.secret, chat")],
        )
        .as_owned_parts();
        strip_credentials(&order, &mut req).unwrap();
        assert_eq!(req.uri.to_string(), "/agents/a/b?_pk=1&x=2");
        assert_eq!(req.headers.get("sec-websocket-protocol").unwrap(), "chat");

        let mut req = request(
            "/agents/a/b?token=secret",
            &[("sec-websocket-protocol", "bearer.s")],
        )
        .as_owned_parts();
        strip_credentials(&order, &mut req).unwrap();
        assert_eq!(req.uri.to_string(), "/agents/a/b");
        assert!(req.headers.get("sec-websocket-protocol").is_none());
    }

    #[test]
    fn the_offer_without_credentials_keeps_its_order() {
        let order = sources(&["protocol:bearer."]);
        let req = request("/", &[("sec-websocket-protocol", "a, bearer.t, b")]);
        assert_eq!(offered_protocols(&order, &req), ["a", "b"]);
    }
}
