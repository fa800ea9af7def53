//! The upgrade handshake with the upstream, and the hand-over of the client's stream once it
//! has answered 101.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::http_req_header_to_wire;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, OrErr, Result};
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
