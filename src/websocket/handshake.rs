//! The upgrade handshake with the upstream, and the hand-over of the client's stream once it
//! has answered 101.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::http_req_header_to_wire;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, OrErr, Result};
use sha1::{Digest, Sha1};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest upstream response head accepted for a handshake.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest non-101 answer body relayed to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Whether the request asks for a WebSocket: `Upgrade: websocket` in any case, as RFC 6455
/// allows, with `upgrade` among the `Connection` tokens.
pub(crate) fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    header_has_token(&req.headers, http::header::UPGRADE, "websocket")
        && header_has_token(&req.headers, http::header::CONNECTION, "upgrade")
}

/// Whether any value of `name` lists `token` (comma-separated, any case).
pub(crate) fn header_has_token(
    headers: &HeaderMap,
    name: http::header::HeaderName,
    token: &str,
) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Why a request that asks for a WebSocket is not a valid opening handshake (RFC 6455 4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InvalidUpgrade {
    /// Not a GET.
    Method,
    /// Older than HTTP/1.1.
    HttpVersion,
    /// `Sec-WebSocket-Version` other than 13 (or none): answered 426 with the version we speak.
    Version,
    /// `Sec-WebSocket-Key` missing, repeated, or not 16 bytes in base64.
    Key,
}

impl InvalidUpgrade {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            InvalidUpgrade::Method => "a WebSocket upgrade is a GET request",
            InvalidUpgrade::HttpVersion => "a WebSocket upgrade needs HTTP/1.1",
            InvalidUpgrade::Version => "this gateway speaks WebSocket version 13 only",
            InvalidUpgrade::Key => "Sec-WebSocket-Key must be 16 bytes in base64",
        }
    }
}

/// The version the gateway speaks, for `Sec-WebSocket-Version` on a 426.
pub(crate) const WEBSOCKET_VERSION: &str = "13";

/// Checks the client's opening handshake beyond `Upgrade`/`Connection`.
pub(crate) fn check_upgrade_request(req: &RequestHeader) -> Result<(), InvalidUpgrade> {
    if req.method != http::Method::GET {
        return Err(InvalidUpgrade::Method);
    }
    if req.version < http::Version::HTTP_11 {
        return Err(InvalidUpgrade::HttpVersion);
    }
    let mut versions = req
        .headers
        .get_all(http::header::SEC_WEBSOCKET_VERSION)
        .iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes() == WEBSOCKET_VERSION.as_bytes() => {}
        _ => return Err(InvalidUpgrade::Version),
    }
    let mut keys = req.headers.get_all(http::header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) => key,
        _ => return Err(InvalidUpgrade::Key),
    };
    match BASE64.decode(key.as_bytes().trim_ascii()) {
        Ok(raw) if raw.len() == 16 => Ok(()),
        _ => Err(InvalidUpgrade::Key),
    }
}

/// Why an upstream's 101 does not answer the client's handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InvalidUpgradeAnswer {
    /// `Sec-WebSocket-Accept` missing or not derived from the client's key.
    Accept,
    /// An extension the client did not offer.
    Extension,
    /// A subprotocol the client did not offer.
    Protocol,
}

impl InvalidUpgradeAnswer {
    /// The metric label and the problem body's reason.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            InvalidUpgradeAnswer::Accept => "bad_accept",
            InvalidUpgradeAnswer::Extension => "unoffered_extension",
            InvalidUpgradeAnswer::Protocol => "unoffered_protocol",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            InvalidUpgradeAnswer::Accept => {
                "the upstream's Sec-WebSocket-Accept does not match the client's key"
            }
            InvalidUpgradeAnswer::Extension => {
                "the upstream selected a WebSocket extension the client did not offer"
            }
            InvalidUpgradeAnswer::Protocol => {
                "the upstream selected a subprotocol the client did not offer"
            }
        }
    }
}

/// `Sec-WebSocket-Accept` for a key: base64 of SHA-1 over the key and RFC 6455's GUID.
pub(crate) fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    BASE64.encode(sha1.finalize())
}

/// Checks an upstream's 101 against the request that was sent to it: the accept key, and
/// that what it selected was offered (RFC 6455 4.1, the client's duty, which the gateway
/// does for clients that cannot see the upstream).
pub(crate) fn check_upgrade_answer(
    sent: &RequestHeader,
    answer: &ResponseHeader,
) -> Result<(), InvalidUpgradeAnswer> {
    let key = sent
        .headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .unwrap_or_default();
    let accepted = answer.headers.get(http::header::SEC_WEBSOCKET_ACCEPT);
    if accepted.is_none_or(|a| a.as_bytes().trim_ascii() != accept_key(key).as_bytes()) {
        return Err(InvalidUpgradeAnswer::Accept);
    }
    let offered_extensions = tokens(&sent.headers, http::header::SEC_WEBSOCKET_EXTENSIONS, true);
    let selected_extensions = tokens(
        &answer.headers,
        http::header::SEC_WEBSOCKET_EXTENSIONS,
        true,
    );
    if !selected_extensions
        .iter()
        .all(|e| offered_extensions.contains(e))
    {
        return Err(InvalidUpgradeAnswer::Extension);
    }
    let offered_protocols = tokens(&sent.headers, http::header::SEC_WEBSOCKET_PROTOCOL, false);
    let selected_protocols = tokens(&answer.headers, http::header::SEC_WEBSOCKET_PROTOCOL, false);
    match selected_protocols.as_slice() {
        [] => Ok(()),
        [one] if offered_protocols.contains(one) => Ok(()),
        _ => Err(InvalidUpgradeAnswer::Protocol),
    }
}

/// The comma-separated entries of every value of `name`; for extensions only their names
/// (what follows `;` is parameters), compared without case.
fn tokens(
    headers: &HeaderMap,
    name: http::header::HeaderName,
    extension_names: bool,
) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|entry| {
            let entry = if extension_names {
                entry.split(';').next().unwrap_or_default()
            } else {
                entry
            };
            entry.trim().to_ascii_lowercase()
        })
        .filter(|entry| !entry.is_empty())
        .collect()
}

/// The upstream's answer to an upgrade request.
pub(crate) enum Handshake {
    /// 101: the upgraded stream and any bytes that came right behind the response head.
    Upgraded {
        response: Box<ResponseHeader>,
        stream: Stream,
        preread: Bytes,
    },
    /// Anything else: relayed to the client as an HTTP response.
    Refused {
        response: Box<ResponseHeader>,
        body: Bytes,
    },
}

/// Connects to `peer` and sends the upgrade request, waiting at most `timeout` for the answer.
pub(crate) async fn handshake(
    connector: &TransportConnector,
    peer: &HttpPeer,
    request: &RequestHeader,
    timeout: Duration,
) -> Result<Handshake> {
    let mut stream = connector.new_stream(peer).await?;
    let wire = http_req_header_to_wire(request).ok_or_else(|| {
        Error::explain(
            ErrorType::InvalidHTTPHeader,
            "upgrade request cannot be serialised",
        )
    })?;
    let answer = async {
        stream
            .write_all(&wire)
            .await
            .or_err(ErrorType::WriteError, "sending the upgrade request")?;
        stream
            .flush()
            .await
            .or_err(ErrorType::WriteError, "sending the upgrade request")?;
        let (response, buffer) = read_response_head(&mut stream).await?;
        Ok::<_, Box<Error>>((response, buffer))
    };
    let (response, buffer) = tokio::time::timeout(timeout, answer)
        .await
        .or_err(ErrorType::ReadTimedout, "waiting for the upgrade answer")??;
    if response.status == http::StatusCode::SWITCHING_PROTOCOLS {
        // Copied out: the rest of `buffer` would otherwise stay allocated with the socket.
        return Ok(Handshake::Upgraded {
            response,
            stream,
            preread: Bytes::copy_from_slice(&buffer),
        });
    }
    let body = tokio::time::timeout(timeout, read_refusal_body(&mut stream, &response, buffer))
        .await
        .unwrap_or_default();
    Ok(Handshake::Refused { response, body })
}

async fn read_response_head(stream: &mut Stream) -> Result<(Box<ResponseHeader>, BytesMut)> {
    let mut buffer = BytesMut::with_capacity(1024);
    loop {
        if buffer.len() >= MAX_RESPONSE_HEAD {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "upgrade answer head too long");
        }
        let read = stream
            .read_buf(&mut buffer)
            .await
            .or_err(ErrorType::ReadError, "reading the upgrade answer")?;
        if read == 0 {
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "upstream closed the connection before answering the upgrade",
            );
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let status = parsed
            .parse(&buffer)
            .or_err(ErrorType::InvalidHTTPHeader, "malformed upgrade answer")?;
        if let httparse::Status::Complete(head_len) = status {
            let code = parsed.code.unwrap_or(502);
            let mut response = ResponseHeader::build(code, Some(parsed.headers.len()))?;
            for h in parsed.headers.iter() {
                response.append_header(h.name.to_owned(), h.value)?;
            }
            let rest = buffer.split_off(head_len);
            return Ok((Box::new(response), rest));
        }
    }
}

/// Reads a refusal's body (by Content-Length, else to the end), bounded in size.
async fn read_refusal_body(
    stream: &mut Stream,
    response: &ResponseHeader,
    mut buffer: BytesMut,
) -> Bytes {
    let expected = response
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(MAX_REFUSAL_BODY)
        .min(MAX_REFUSAL_BODY);
    while buffer.len() < expected {
        match stream.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    buffer.truncate(expected);
    buffer.freeze()
}

/// Whether the 101 agreed on permessage-deflate, whose RSV1 bit the frame parser must allow.
pub(crate) fn negotiated_deflate(response: &ResponseHeader) -> bool {
    response
        .headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .any(|v| {
            v.to_str()
                .map(|s| s.contains("permessage-deflate"))
                .unwrap_or(false)
        })
}

/// Takes the client's raw stream out of a Pingora HTTP/1 session, leaving an inert one in its
/// place for Pingora to wind down. HTTP/2 has no upgrade; such sessions are left untouched.
pub(crate) fn take_client_stream(session: &mut ServerSession) -> Option<Stream> {
    if !matches!(session, ServerSession::H1(_)) {
        return None;
    }
    // A closed in-memory pipe: whatever Pingora does with it afterwards reads EOF.
    let (inert, _) = tokio::io::duplex(1);
    let taken = std::mem::replace(session, ServerSession::new_http1(Box::new(inert)));
    match taken {
        ServerSession::H1(h1) => Some(h1.into_inner()),
        _ => None,
    }
}

/// Serialises a response head for writing on a raw stream.
pub(crate) fn response_head_bytes(response: &ResponseHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let reason = response.status.canonical_reason().unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", response.status.as_u16()).as_bytes());
    for (name, value) in response.headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/agents/a/b", None).expect("request");
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).expect("header");
        }
        req
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/agents/a/b", None).expect("request");
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).expect("header");
        }
        req
    }

    #[test]
    fn the_opening_handshake_is_checked() {
        let good = [("sec-websocket-version", "13"), ("sec-websocket-key", KEY)];
        assert_eq!(check_upgrade_request(&upgrade("GET", &good)), Ok(()));
        assert_eq!(
            check_upgrade_request(&upgrade("POST", &good)),
            Err(InvalidUpgrade::Method)
        );
        let mut old = upgrade("GET", &good);
        old.set_version(http::Version::HTTP_10);
        assert_eq!(
            check_upgrade_request(&old),
            Err(InvalidUpgrade::HttpVersion)
        );
        for version in [
            &[("sec-websocket-version", "8")][..],
            &[],
            &[
                ("sec-websocket-version", "13"),
                ("sec-websocket-version", "13"),
            ],
        ] {
            let mut headers = version.to_vec();
            headers.push(("sec-websocket-key", KEY));
            assert_eq!(
                check_upgrade_request(&upgrade("GET", &headers)),
                Err(InvalidUpgrade::Version),
                "{headers:?}"
            );
        }
        for key in [
            "",
            "not base64!",
            "c2hvcnQ=",
            "dGhlIHNhbXBsZSBub25jZSB0b28gbG9uZw==",
        ] {
            let headers = [("sec-websocket-version", "13"), ("sec-websocket-key", key)];
            assert_eq!(
                check_upgrade_request(&upgrade("GET", &headers)),
                Err(InvalidUpgrade::Key),
                "{key:?}"
            );
        }
        let no_key = [("sec-websocket-version", "13")];
        assert_eq!(
            check_upgrade_request(&upgrade("GET", &no_key)),
            Err(InvalidUpgrade::Key)
        );
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(accept_key(KEY.as_bytes()), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    fn answer(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut response = ResponseHeader::build(101, None).expect("response");
        for (k, v) in headers {
            response.append_header(k.to_string(), *v).expect("header");
        }
        response
    }

    #[test]
    fn an_upstream_answer_must_match_the_key_and_the_offers() {
        let sent = upgrade(
            "GET",
            &[
                ("sec-websocket-key", KEY),
                (
                    "sec-websocket-extensions",
                    "permessage-deflate; client_max_window_bits",
                ),
                ("sec-websocket-protocol", "chat, superchat"),
            ],
        );
        let accept = ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(check_upgrade_answer(&sent, &answer(&[accept])), Ok(()));
        let chosen = [
            accept,
            (
                "sec-websocket-extensions",
                "permessage-deflate; server_no_context_takeover",
            ),
            ("sec-websocket-protocol", "superchat"),
        ];
        assert_eq!(check_upgrade_answer(&sent, &answer(&chosen)), Ok(()));
        assert_eq!(
            check_upgrade_answer(&sent, &answer(&[("sec-websocket-accept", "AAAA")])),
            Err(InvalidUpgradeAnswer::Accept)
        );
        assert_eq!(
            check_upgrade_answer(&sent, &answer(&[])),
            Err(InvalidUpgradeAnswer::Accept)
        );
        assert_eq!(
            check_upgrade_answer(
                &sent,
                &answer(&[
                    accept,
                    ("sec-websocket-extensions", "x-webkit-deflate-frame")
                ])
            ),
            Err(InvalidUpgradeAnswer::Extension)
        );
        assert_eq!(
            check_upgrade_answer(
                &sent,
                &answer(&[accept, ("sec-websocket-protocol", "graphql")])
            ),
            Err(InvalidUpgradeAnswer::Protocol)
        );
        assert_eq!(
            check_upgrade_answer(
                &sent,
                &answer(&[accept, ("sec-websocket-protocol", "chat, superchat")])
            ),
            Err(InvalidUpgradeAnswer::Protocol)
        );
    }

    #[test]
    fn upgrade_detection_is_case_insensitive_and_token_based() {
        assert!(is_websocket_upgrade(&request(&[
            ("Upgrade", "WebSocket"),
            ("Connection", "keep-alive, Upgrade")
        ])));
        assert!(!is_websocket_upgrade(&request(&[
            ("Upgrade", "h2c"),
            ("Connection", "Upgrade")
        ])));
        assert!(!is_websocket_upgrade(&request(&[("Upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&request(&[(
            "Connection",
            "upgrade"
        )])));
    }
}
