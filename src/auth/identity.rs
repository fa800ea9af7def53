//! What the upstream is told about a verified client: its claims as headers, and for
//! upstreams that can be reached without the gateway (a Worker on the internet), an HMAC over
//! them so that the Worker can tell them from a forged request.
//!
//! The signature is HMAC-SHA256, keyed by a secret from `[secrets]`, over this text (each line
//! ends with `\n`):
//!
//! ```text
//! agent-gateway-identity-v1
//! {timestamp: Unix seconds}
//! {agent: the URL segment sent upstream}
//! {instance}
//! {header name}:{header value}      one line per identity header, in the order of
//!                                   x-gateway-identity-headers
//! ```
//!
//! sent as lowercase hex in `x-gateway-identity-signature`, with the timestamp in
//! `x-gateway-identity-timestamp` and the signed header names, comma-separated, in
//! `x-gateway-identity-headers`. `docs/auth.md` has the Worker's side.

use super::scope::claim_text;
use super::Identity;
use http::header::{HeaderName, HeaderValue};
use ring::hmac;
use std::fmt::Write;

pub(crate) const SIGNATURE_HEADER: HeaderName =
    HeaderName::from_static("x-gateway-identity-signature");
pub(crate) const TIMESTAMP_HEADER: HeaderName =
    HeaderName::from_static("x-gateway-identity-timestamp");
pub(crate) const SIGNED_HEADERS_HEADER: HeaderName =
    HeaderName::from_static("x-gateway-identity-headers");
const SIGNATURE_VERSION: &str = "agent-gateway-identity-v1";

/// The identity headers for `identity`: each mapped claim it has, by the header name the
/// policy gives it. Claims that are not text, a number or a boolean, or whose text cannot be a
/// header value, are left out.
pub(crate) fn identity_headers(
    mapping: &[(String, HeaderName)],
    identity: &Identity,
) -> Vec<(HeaderName, HeaderValue)> {
    mapping
        .iter()
        .filter_map(|(claim, header)| {
            let text = match claim.as_str() {
                "sub" => Some(identity.subject.clone()),
                _ => identity.claims.get(claim).and_then(claim_text),
            }?;
            let value = HeaderValue::from_str(&text).ok()?;
            Some((header.clone(), value))
        })
        .collect()
}

/// The three signature headers over `headers` for `agent`/`instance` at `timestamp`.
pub(crate) fn sign(
    key: &hmac::Key,
    headers: &[(HeaderName, HeaderValue)],
    agent: &str,
    instance: &str,
    timestamp: u64,
) -> [(HeaderName, HeaderValue); 3] {
    let mut text = format!("{SIGNATURE_VERSION}\n{timestamp}\n{agent}\n{instance}\n");
    let mut names = String::new();
    for (name, value) in headers {
        text.push_str(name.as_str());
        text.push(':');
        text.push_str(&String::from_utf8_lossy(value.as_bytes()));
        text.push('\n');
        if !names.is_empty() {
            names.push(',');
        }
        names.push_str(name.as_str());
    }
    let tag = hmac::sign(key, text.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in tag.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    // Hex digits, digits and header names (tokens) are always valid header values.
    let value = |text: String| HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""));
    [
        (SIGNATURE_HEADER, value(hex)),
        (TIMESTAMP_HEADER, value(timestamp.to_string())),
        (SIGNED_HEADERS_HEADER, value(names)),
    ]
}

/// The signing key from a secret's value.
pub(crate) fn signing_key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alice() -> Identity {
        Identity {
            subject: "alice".into(),
            claims:
                json!({"sub": "alice", "email": "a@example.com", "admin": true, "groups": ["x"]})
                    .as_object()
                    .unwrap()
                    .clone(),
            expires_at: None,
        }
    }

    fn mapping() -> Vec<(String, HeaderName)> {
        ["sub", "email", "admin", "groups", "absent"]
            .iter()
            .map(|c| {
                (
                    c.to_string(),
                    HeaderName::from_bytes(format!("x-user-{c}").as_bytes()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn mapped_claims_become_headers_and_lists_do_not() {
        let headers = identity_headers(&mapping(), &alice());
        let shown: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            shown,
            [
                ("x-user-sub", "alice"),
                ("x-user-email", "a@example.com"),
                ("x-user-admin", "true")
            ]
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_the_documented_text() {
        let key = signing_key("k");
        let headers = identity_headers(&mapping()[..2], &alice());
        let [(_, signature), (_, timestamp), (_, names)] =
            sign(&key, &headers, "coder-agent", "room", 1_700_000_000);
        assert_eq!(timestamp, "1700000000");
        assert_eq!(names, "x-user-sub,x-user-email");
        let text = "agent-gateway-identity-v1\n1700000000\ncoder-agent\nroom\nx-user-sub:alice\nx-user-email:a@example.com\n";
        let expected = hmac::sign(&key, text.as_bytes());
        let hex: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(signature, hex.as_str());
        // Any change to what is signed changes the signature.
        let [(_, other), _, _] = sign(&key, &headers, "coder-agent", "room2", 1_700_000_000);
        assert_ne!(other, signature);
    }
}
