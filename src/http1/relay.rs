//! Relaying one admitted HTTP/1.1 request to its node and the answer back, both bodies
//! streamed chunk by chunk in one loop: a chunk is written on before the next is read, so a
//! slow reader on either side slows the other and nothing is buffered whole, and a response
//! chunk (an event of an event stream) is written as soon as it arrives.

use crate::proxy::exchange::{Exchange, Gateway};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Method, Version};
use pingora::connectors::http::v1::Connector;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::protocols::http::{HttpTask, ServerSession};
use pingora::{Error, ErrorType, Result, RetryType};

/// Forwards the request on `session` to the node [`Gateway::decide`] chose and relays the
/// answer. An error (marked upstream or downstream) says the exchange failed, to be answered
/// by [`Gateway::failed`].
pub(super) async fn forward(
    gateway: &Gateway,
    upstreams: &Upstreams,
    session: &mut ServerSession,
    exchange: &mut Exchange,
) -> Result<()> {
    let peer = gateway.peer(exchange).await?;
    let request = upstream_request(gateway, session, exchange)?;
    let (pooled, reused) = upstreams
        .pool
        .get_http_session(&peer)
        .await
        .map_err(|e| e.into_up())?;
    let mut upstream = with_timeouts(pooled, &peer);
    let mut relayed = relay(gateway, session, &mut upstream, request, exchange).await;
    if reused && relayed.as_ref().is_err_and(|e| may_retry(e, session)) {
        // A pooled connection the node closed as it was taken: sent again, as Pingora's proxy
        // does, on a new connection rather than another pooled one that may be as stale.
        if let Err(e) = &relayed {
            log::debug!("reused upstream connection failed, retrying on a new one: {e}");
        }
        let request = upstream_request(gateway, session, exchange)?;
        let fresh = upstreams.fresh.new_stream(&peer).await;
        let fresh = fresh.map_err(|e| e.into_up())?;
        upstream = with_timeouts(UpstreamSession::new_with_options(fresh, &peer), &peer);
        relayed = relay(gateway, session, &mut upstream, request, exchange).await;
    }
    if relayed? {
        let idle_timeout = pingora::upstreams::peer::Peer::idle_timeout(&peer);
        let pool = &upstreams.pool;
        pool.release_http_session(upstream, &peer, idle_timeout)
            .await;
    }
    Ok(())
}

/// Connections to nodes: the keep-alive pool, and new connections for a retry.
pub(super) struct Upstreams {
    pub(super) pool: Connector,
    pub(super) fresh: TransportConnector,
}

fn with_timeouts(mut upstream: UpstreamSession, peer: &HttpPeer) -> UpstreamSession {
    upstream.read_timeout = peer.options.read_timeout;
    upstream.write_timeout = peer.options.write_timeout;
    upstream
}

/// The request header for the upstream, built from the client's.
fn upstream_request(
    gateway: &Gateway,
    session: &mut ServerSession,
    exchange: &Exchange,
) -> Result<Box<RequestHeader>> {
    let has_body = !session.is_body_empty();
    let request = gateway.upstream_request(exchange, session.req_header(), has_body)?;
    Ok(Box::new(request))
}

/// Whether a failure on a reused upstream connection may be sent again: Pingora marks a
/// connection that closed before any answer (`ReusedOnly`). The request may have reached the
/// node, so only an idempotent one without a body goes again, as in Pingora's proxy.
fn may_retry(e: &Error, session: &mut ServerSession) -> bool {
    matches!(e.retry, RetryType::ReusedOnly | RetryType::Decided(true))
        && session.req_header().method.is_idempotent()
        && e.esource() == &pingora::ErrorSource::Upstream
        && session.response_written().is_none()
        && session.body_bytes_read() == 0
        && session.is_body_done()
}

/// Writes the request upstream and relays until the response is complete. Returns whether
/// the upstream connection may be reused.
async fn relay(
    gateway: &Gateway,
    session: &mut ServerSession,
    upstream: &mut UpstreamSession,
    request: Box<RequestHeader>,
    exchange: &mut Exchange,
) -> Result<bool> {
    let head_only = request.method == Method::HEAD;
    upstream
        .write_request_header(request)
        .await
        .map_err(|e| e.into_up())?;
    let mut request_done = false;
    let mut response_done = false;
    // A request body the upstream stopped taking: its answer may still come.
    let mut send_error = None;
    if session.is_body_done() {
        request_done = true;
        upstream.finish_body().await.map_err(|e| e.into_up())?;
    }
    // The answer's end ends the relay, as in Pingora's proxy: a body still coming (an early
    // refusal's, or one whose length the client never made clear) is Pingora's to drain or
    // cut when the session finishes.
    while !response_done {
        tokio::select! {
            task = upstream.read_response_task() => {
                let task = match task.and_then(|task| with_ready_body(upstream, task)) {
                    Ok(task) => task,
                    Err(e) => return Err(send_error.unwrap_or(e).into_up()),
                };
                response_done = task.is_end();
                deliver(gateway, session, exchange, task, head_only).await?;
            }
            // After the body, this watches for the client leaving (an error ends the relay).
            body = session.read_body_or_idle(request_done), if send_error.is_none() => {
                match body.map_err(|e| e.into_down())? {
                    Some(chunk) => {
                        gateway.request_body(exchange, chunk.len())?;
                        if let Err(e) = upstream.write_body(&chunk).await {
                            send_error = Some(e);
                        }
                    }
                    None => {
                        request_done = true;
                        if let Err(e) = upstream.finish_body().await {
                            send_error = Some(e);
                        }
                    }
                }
            }
        }
    }
    Ok(request_done && send_error.is_none())
}

/// Body chunks shorter than this are joined with the chunks already received behind them.
const SMALL_CHUNK: usize = 4096;
/// Joined chunks stop growing at this size.
const JOINED_MAX: usize = 16 * 1024;

/// Joins a small body chunk with the ones the upstream has already sent behind it (an event
/// stream's events that came in one read), so they go downstream in one write, as nginx's
/// buffer sends them, instead of one system call each. Nothing waits: only what is ready is
/// taken, so each event still leaves as soon as it arrives. Large chunks go as they are.
fn with_ready_body(upstream: &mut UpstreamSession, task: HttpTask) -> Result<HttpTask> {
    let HttpTask::Body(Some(first), false) = task else {
        return Ok(task);
    };
    if first.len() >= SMALL_CHUNK {
        return Ok(HttpTask::Body(Some(first), false));
    }
    let mut joined = BytesMut::from(&first[..]);
    let mut end = false;
    while !end && joined.len() < JOINED_MAX {
        match upstream.read_response_task().now_or_never() {
            Some(Ok(HttpTask::Body(more, more_end))) => {
                joined.extend_from_slice(more.as_deref().unwrap_or_default());
                end = more_end;
            }
            Some(Ok(HttpTask::Done)) => end = true,
            // After the head, an HTTP/1.1 answer carries only body and its end.
            Some(Ok(_)) | None => break,
            Some(Err(e)) => return Err(e),
        }
    }
    Ok(HttpTask::Body(Some(joined.freeze()), end))
}

/// Writes one piece of the upstream's answer downstream, through the gateway's decisions.
async fn deliver(
    gateway: &Gateway,
    session: &mut ServerSession,
    exchange: &mut Exchange,
    task: HttpTask,
    head_only: bool,
) -> Result<()> {
    match task {
        HttpTask::Header(mut header, end) => {
            // The body a held-back 500 without one gets (its JSON problem).
            let mut tail = None;
            if !header.status.is_informational() {
                gateway.upstream_answered(exchange, &mut header)?;
                if end {
                    gateway.upstream_body(exchange, &mut tail, true);
                }
                frame_for_keep_alive(&mut header, head_only, end && tail.is_none())?;
                gateway.answer_headers(exchange, &mut header)?;
            } else if header.status == 101 {
                // The upgrade headers were not sent: a 101 here is the upstream's mistake.
                return Error::e_explain(ErrorType::InvalidHTTPHeader, "101 to a plain request")
                    .map_err(|e| e.into_up());
            }
            session
                .write_response_header(header)
                .await
                .map_err(|e| e.into_down())?;
            if end {
                write_body(session, tail.unwrap_or_default(), true).await?;
            }
        }
        HttpTask::Body(mut data, end) => {
            gateway.upstream_body(exchange, &mut data, end);
            write_body(session, data.unwrap_or_default(), end).await?;
        }
        HttpTask::Done => write_body(session, Bytes::new(), true).await?,
        HttpTask::Failed(e) => return Err(e),
        // Trailers are not relayed on HTTP/1.1 (as in Pingora's proxy); no upgrade was asked.
        HttpTask::Trailer(_) | HttpTask::UpgradedBody(..) => {}
    }
    Ok(())
}

async fn write_body(session: &mut ServerSession, data: Bytes, end: bool) -> Result<()> {
    session
        .write_response_body(data, end)
        .await
        .map_err(|e| e.into_down())
}

/// An answer framed by the upstream closing its connection is sent chunked, so that the
/// client's connection stays open (what Pingora's proxy does for HTTP/1.1 clients).
fn frame_for_keep_alive(header: &mut ResponseHeader, head_only: bool, end: bool) -> Result<()> {
    let no_body = head_only || matches!(header.status.as_u16(), 204 | 304);
    let framed = header.headers.contains_key(http::header::TRANSFER_ENCODING)
        || header.headers.contains_key(http::header::CONTENT_LENGTH);
    if !no_body && !framed && !end {
        header.set_version(Version::HTTP_11);
        header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    /// An upstream session whose answer, `answer`, has been sent on the other end (returned
    /// too, still open), past its head and first body chunk.
    async fn answered(answer: &'static [u8]) -> (UpstreamSession, HttpTask, DuplexStream) {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut upstream = UpstreamSession::new(Box::new(ours));
        let request = RequestHeader::build("GET", b"/events", None).expect("a request");
        upstream
            .write_request_header(Box::new(request))
            .await
            .expect("written");
        theirs.write_all(answer).await.expect("answered");
        let head = upstream.read_response_task().await.expect("a head");
        assert!(matches!(head, HttpTask::Header(..)));
        let first = upstream.read_response_task().await.expect("a chunk");
        (upstream, first, theirs)
    }

    fn body_of(task: &HttpTask) -> (&[u8], bool) {
        match task {
            HttpTask::Body(data, end) => (data.as_deref().unwrap_or_default(), *end),
            _ => panic!("not a body"),
        }
    }

    /// A client's session with `request` read, and the error of a pooled connection that
    /// closed before answering.
    async fn closed_before_answering(request: &'static [u8]) -> (ServerSession, Box<Error>) {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        theirs.write_all(request).await.expect("sent");
        let mut session = ServerSession::new_http1(Box::new(ours));
        assert!(session.read_request().await.expect("a head"));
        let mut error = Error::explain(ErrorType::ConnectionClosed, "closed").into_up();
        error.retry = RetryType::ReusedOnly;
        (session, error)
    }

    #[tokio::test]
    async fn only_idempotent_requests_without_a_body_are_sent_again() {
        let get = b"GET /agents/a/b HTTP/1.1\r\nHost: gw\r\n\r\n";
        let (mut session, error) = closed_before_answering(get).await;
        assert!(may_retry(&error, &mut session));
        let post = b"POST /agents/a/b HTTP/1.1\r\nHost: gw\r\ncontent-length: 0\r\n\r\n";
        let (mut session, error) = closed_before_answering(post).await;
        assert!(
            !may_retry(&error, &mut session),
            "a POST may have reached the node"
        );
        let put = b"PUT /agents/a/b HTTP/1.1\r\nHost: gw\r\ncontent-length: 2\r\n\r\nhi";
        let (mut session, error) = closed_before_answering(put).await;
        assert!(!may_retry(&error, &mut session), "its body was not kept");
    }

    #[tokio::test]
    async fn small_chunks_already_received_go_in_one_write() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            7\r\ndata: 1\r\n7\r\ndata: 2\r\n7\r\ndata: 3\r\n";
        let (mut upstream, first, _node) = answered(answer).await;
        let joined = with_ready_body(&mut upstream, first).expect("joined");
        assert_eq!(body_of(&joined), (&b"data: 1data: 2data: 3"[..], false));
    }

    #[tokio::test]
    async fn the_end_of_the_body_is_kept_when_joined() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            1\r\na\r\n1\r\nb\r\n0\r\n\r\n";
        let (mut upstream, first, _node) = answered(answer).await;
        let joined = with_ready_body(&mut upstream, first).expect("joined");
        assert_eq!(body_of(&joined), (&b"ab"[..], true));
    }

    fn answer(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut header = ResponseHeader::build(status, None).expect("a header");
        for (name, value) in headers {
            header
                .insert_header(name.to_string(), *value)
                .expect("a field");
        }
        header
    }

    fn chunked(header: &ResponseHeader) -> bool {
        header.headers.contains_key(http::header::TRANSFER_ENCODING)
    }

    #[test]
    fn close_delimited_answers_become_chunked() {
        let mut header = answer(200, &[]);
        frame_for_keep_alive(&mut header, false, false).expect("framed");
        assert!(chunked(&header));
        assert_eq!(header.version, Version::HTTP_11);
    }

    #[test]
    fn framed_or_bodiless_answers_are_left_alone() {
        for (status, headers, head_only, end) in [
            (200, &[("content-length", "5")][..], false, false),
            (200, &[("transfer-encoding", "chunked")][..], false, false),
            (204, &[][..], false, false),
            (304, &[][..], false, false),
            (200, &[][..], true, false),
            (200, &[][..], false, true),
        ] {
            let mut header = answer(status, headers);
            let before = chunked(&header);
            frame_for_keep_alive(&mut header, head_only, end).expect("framed");
            assert_eq!(chunked(&header), before, "{status} {headers:?}");
        }
    }
}
