//! Hostile HTTP/1.1 input on the plain request path, with today's answers pinned: what the
//! client gets (status line, and the JSON `error` when the gateway answers with its problem
//! body) and what reaches the agent's node (every byte it got, parsed with its own framing).
//!
//! The node is a real server that records every byte and answers each request it frames with
//! a 200 whose body is the target it saw. Smuggling attempts must never get a second request
//! to it; refusals must get nothing to it at all. After each case a probe request through the
//! same gateway shows the gateway still serves, and is the only other thing the node may see.
//!
//! Cases: conflicting `Content-Length`, `Transfer-Encoding` with `Content-Length` (CL.TE and
//! TE.CL), obfuscated `Transfer-Encoding`, obs-fold, oversized heads (the gateway's 32 KiB
//! `max_request_header_bytes`, Pingora's 1 MiB head buffer and its 256 headers), absolute-form
//! targets, `CONNECT`, and pipelining. The slow head (slowloris) case is
//! `a_slow_request_head_gets_408_and_is_counted` in `tests/edge.rs`. Each case's comment says
//! why its answer is right; where today's answer is questionable it is pinned all the same
//! and the comment says so.

mod common;

use common::auth::{answer, read_request, serve, Request};
use common::*;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A request as the node framed it: its head and its body as it came on the wire.
#[derive(Debug)]
struct Forwarded {
    request: Request,
    /// The body bytes as sent (chunk framing included).
    wire_body: Vec<u8>,
    /// The body's content (chunk framing removed).
    body: Vec<u8>,
}

/// Everything the node received, over all its connections.
#[derive(Debug, Default)]
struct Seen {
    raw: Vec<u8>,
    requests: Vec<Forwarded>,
}

type Log = Arc<Mutex<Seen>>;

/// The agent's node, recording what it gets, and a gateway in front of it.
struct Fixture {
    gateway: Gateway,
    seen: Log,
    _accepting: JoinHandle<()>,
}

async fn fixture() -> Fixture {
    let seen = Log::default();
    let log = Arc::clone(&seen);
    let (node, accepting) = serve(move |stream| node_connection(stream, Arc::clone(&log))).await;
    Fixture {
        gateway: start_gateway(&local_config(&[node])),
        seen,
        _accepting: accepting,
    }
}

/// Serves one upstream connection: frames each request (head, then body by its
/// `Transfer-Encoding` or `Content-Length`), records it, then answers 200 with its target.
async fn node_connection(mut stream: TcpStream, seen: Log) {
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buffer).await {
        let record = |bytes: &[u8]| seen.lock().expect("log").raw.extend_from_slice(bytes);
        record(request.head.as_bytes());
        let mut wire_body = Vec::new();
        let body = read_body(&mut stream, &mut buffer, &request, &mut wire_body).await;
        record(&wire_body);
        let Some(body) = body else { break };
        let ok = answer(200, &[], &request.target);
        let forwarded = Forwarded {
            request,
            wire_body,
            body,
        };
        seen.lock().expect("log").requests.push(forwarded);
        if stream.write_all(ok.as_bytes()).await.is_err() {
            return;
        }
    }
    // Whatever came after the last request it could frame, or instead of one.
    seen.lock().expect("log").raw.extend_from_slice(&buffer);
}

/// Reads a request's body off `buffer` (filled from `stream` as needed), moving its wire
/// bytes into `wire`; its content, or `None` if the peer ended it first.
async fn read_body(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    request: &Request,
    wire: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    // All its lines make one list (RFC 9110 §5.3), which must end in chunked to be chunked.
    let codings = values(request, "transfer-encoding").join(",");
    let chunked = codings.rsplit(',').next().unwrap_or("").trim() == "chunked";
    if !chunked {
        let length: usize = request
            .header("content-length")
            .map_or(Some(0), |v| v.parse().ok())?;
        take(stream, buffer, length, wire).await?;
        return Some(wire.clone());
    }
    let mut body = Vec::new();
    loop {
        let line = take_line(stream, buffer, wire).await?;
        let size = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !take_line(stream, buffer, wire).await?.is_empty() {}
            return Some(body);
        }
        let start = wire.len();
        take(stream, buffer, size + 2, wire).await?;
        body.extend_from_slice(&wire[start..start + size]);
    }
}

/// Moves the next `n` bytes into `wire`.
async fn take(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    n: usize,
    wire: &mut Vec<u8>,
) -> Option<()> {
    while buffer.len() < n {
        fill(stream, buffer).await?;
    }
    wire.extend(buffer.drain(..n));
    Some(())
}

/// Moves the next line into `wire`; the line without its CRLF.
async fn take_line(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    wire: &mut Vec<u8>,
) -> Option<String> {
    loop {
        if let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buffer[..end]).into_owned();
            wire.extend(buffer.drain(..end + 2));
            return Some(line);
        }
        fill(stream, buffer).await?;
    }
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(n) if n > 0 => {
            buffer.extend_from_slice(&chunk[..n]);
            Some(())
        }
        _ => None,
    }
}

/// One answer the client read.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The JSON `error` of a gateway problem body; `None` for an empty or non-JSON body.
    fn error(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        json["error"].as_str().map(str::to_owned)
    }
}

/// [`converse`] on a connection of its own.
async fn exchange(gateway: &Gateway, request: &[u8]) -> Vec<Answer> {
    let mut stream = TcpStream::connect(gateway.address())
        .await
        .expect("connect");
    converse(&mut stream, request).await
}

/// Writes `request` on `stream` in one write, then reads until the gateway closes the
/// connection (bounded by [`WAIT`]); every answer read, in order.
async fn converse(stream: &mut TcpStream, request: &[u8]) -> Vec<Answer> {
    let work = async {
        stream.write_all(request).await.expect("request written");
        let mut received = Vec::new();
        let mut chunk = [0u8; 8192];
        // A reset ends the reading as a close does: what came before it is what the client got.
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            received.extend_from_slice(&chunk[..n]);
        }
        received
    };
    let received = tokio::time::timeout(WAIT, work)
        .await
        .expect("the gateway answered and closed in time");
    parse_answers(&received)
}

/// Splits what the client read into answers, framed by `Content-Length` or chunked.
fn parse_answers(mut bytes: &[u8]) -> Vec<Answer> {
    let mut answers = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = response.parse(bytes) else {
            panic!("not a whole answer: {:?}", String::from_utf8_lossy(bytes));
        };
        let status = response.code.expect("a status");
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let chunked =
            header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        let length = header("content-length").map(|v| v.parse::<usize>().expect("a length"));
        let head = String::from_utf8_lossy(&bytes[..head_len]).into_owned();
        let rest = &bytes[head_len..];
        let (body, used) = if chunked {
            dechunk(rest)
        } else {
            let length = length.unwrap_or(rest.len());
            assert!(rest.len() >= length, "a short body after {head}");
            (rest[..length].to_vec(), length)
        };
        answers.push(Answer {
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        bytes = &rest[used..];
    }
    answers
}

/// A complete chunked body at the start of `raw`: its content and the bytes it took.
fn dechunk(raw: &[u8]) -> (Vec<u8>, usize) {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let end = at
            + raw[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk line");
        let line = String::from_utf8_lossy(&raw[at..end]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        at = end + 2;
        if size == 0 {
            // No trailers in the gateway's answers: the empty line ends the body.
            return (body, at + 2);
        }
        body.extend_from_slice(&raw[at..at + size]);
        at += size + 2;
    }
}

/// The node's target for CoderAgent's instance `room` on the `local` upstream.
fn node_target(room: &str) -> String {
    format!("/agents/coder-agent/{room}")
}

/// A probe through the gateway: it must still serve, and its request reaches the node. It is
/// also a bounded wait without a sleep: anything the case before it sent the node late had a
/// whole other exchange's time to arrive, and would show before the probe's request.
async fn probe(fixture: &Fixture) {
    let answers = exchange(
        &fixture.gateway,
        b"GET /agents/CoderAgent/probe HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].status, 200, "{answers:?}");
    assert_eq!(answers[0].body, node_target("probe"));
}

/// What reached the node since the last call (the probe's request taken off the end), after
/// checking that every byte it got belongs to a request it could frame, that none of them is
/// the smuggled one, and that none went up with ambiguous framing (both `Content-Length` and
/// `Transfer-Encoding`, or differing lengths).
fn take_seen(fixture: &Fixture) -> Vec<Forwarded> {
    let mut seen = std::mem::take(&mut *fixture.seen.lock().expect("log"));
    let raw = String::from_utf8_lossy(&seen.raw).into_owned();
    let framed: usize = seen
        .requests
        .iter()
        .map(|f| f.request.head.len() + f.wire_body.len())
        .sum();
    assert_eq!(
        framed,
        seen.raw.len(),
        "unframed bytes reached the node:\n{raw}"
    );
    let probe = seen.requests.pop().expect("the probe reached the node");
    assert_eq!(probe.request.target, node_target("probe"));
    for forwarded in &seen.requests {
        let request = &forwarded.request;
        assert!(!request.target.contains("smuggled"), "smuggled:\n{raw}");
        let lengths = values(request, "content-length");
        let ambiguous = !values(request, "transfer-encoding").is_empty() && !lengths.is_empty()
            || lengths.windows(2).any(|pair| pair[0] != pair[1]);
        assert!(
            !ambiguous,
            "ambiguous framing went upstream:\n{}",
            request.head
        );
    }
    seen.requests
}

/// Every value of the header `name` (lower case), in order.
fn values<'a>(request: &'a Request, name: &str) -> Vec<&'a str> {
    request
        .headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A hostile request and today's answer to it.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    /// The status line's code the client gets.
    status: u16,
    /// The JSON `error` of the gateway's problem body; `None` for Pingora's own empty answer
    /// or the node's.
    error: Option<&'static str>,
    /// Whether the request reaches the node (as CoderAgent's room `x`), which answers it.
    forwarded: bool,
}

impl Case {
    /// Refused by Pingora itself, with an empty answer, before any gateway hook runs.
    fn refused(name: &'static str, status: u16, request: Vec<u8>) -> Self {
        Case {
            name,
            request,
            status,
            error: None,
            forwarded: false,
        }
    }

    /// Forwarded to the node, whose 200 the client gets.
    fn forwarded(name: &'static str, request: Vec<u8>) -> Self {
        Case {
            name,
            request,
            status: 200,
            error: None,
            forwarded: true,
        }
    }
}

/// Sends `case` on a connection of its own, asserts the one answer it gets and what reached
/// the node; returns what reached it for closer checks.
async fn pin(fixture: &Fixture, case: &Case) -> Vec<Forwarded> {
    let answers = exchange(&fixture.gateway, &case.request).await;
    let name = case.name;
    assert_eq!(
        answers.len(),
        1,
        "{name}: one answer, then the close; got {answers:?}"
    );
    let answer = &answers[0];
    let shown = format!("{name}:\n{}\n\n{}", answer.head, answer.body);
    assert_eq!(answer.status, case.status, "{shown}");
    assert_eq!(answer.error().as_deref(), case.error, "{shown}");
    probe(fixture).await;
    let seen = take_seen(fixture);
    let targets: Vec<&str> = seen.iter().map(|f| f.request.target.as_str()).collect();
    let wanted: Vec<String> = case
        .forwarded
        .then(|| node_target("x"))
        .into_iter()
        .collect();
    assert_eq!(targets, wanted, "{name}: what reached the node");
    if let [first] = seen.as_slice() {
        // A forwarded request is answered by the node, with the target it saw.
        assert_eq!(answer.body, first.request.target, "{name}");
    }
    seen
}

/// A request hidden after the end of a chunked body; `Connection: close` so that, were it
/// ever served, its answer would end the exchange instead of the bound.
const SMUGGLED: &str =
    "GET /agents/CoderAgent/smuggled HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";

/// A POST to CoderAgent's room `x` with raw header `lines` (besides Host) and `body`.
fn post(lines: &[&str], body: &str) -> Vec<u8> {
    let mut text = "POST /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\n".to_owned();
    for line in lines {
        text.push_str(line);
        text.push_str("\r\n");
    }
    format!("{text}\r\n{body}").into_bytes()
}

/// A CL.TE attempt under the `Transfer-Encoding` header line(s) `te`: by `Content-Length` the
/// body is everything, smuggled request included; by chunked framing it ends before it.
fn cl_te(te: &[&str]) -> Vec<u8> {
    let body = format!("0\r\n\r\n{SMUGGLED}");
    let length = format!("Content-Length: {}", body.len());
    let lines: Vec<&str> = std::iter::once(length.as_str())
        .chain(te.iter().copied())
        .collect();
    post(&lines, &body)
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused_before_the_node() {
    let fixture = fixture().await;
    // RFC 9110 §8.6: differing lengths leave the body's end unknowable, whether on two lines
    // or in one list; refusing is the only safe answer, and Pingora's is 400.
    let cases = [
        Case::refused(
            "Content-Length 5 and 6",
            400,
            post(&["Content-Length: 5", "Content-Length: 6"], "hello!"),
        ),
        Case::refused(
            "Content-Length 5, 6",
            400,
            post(&["Content-Length: 5, 6"], "hello!"),
        ),
    ];
    for case in &cases {
        pin(&fixture, case).await;
    }
}

#[tokio::test]
async fn identical_content_lengths_are_accepted_and_forwarded_as_received() {
    let fixture = fixture().await;
    // RFC 9110 §8.6 lets a recipient accept identical duplicates as one length, which frames
    // the body unambiguously; but both lines go upstream as they came, where a strict node
    // may refuse them (reported: collapsing them to one line would be better).
    let lines = [
        "Content-Length: 5",
        "Content-Length: 5",
        "Connection: close",
    ];
    let case = Case::forwarded("Content-Length 5 twice", post(&lines, "hello"));
    let seen = pin(&fixture, &case).await;
    assert_eq!(values(&seen[0].request, "content-length"), ["5", "5"]);
    assert_eq!(seen[0].body, b"hello");
}

#[tokio::test]
async fn chunked_with_content_length_is_read_as_chunked_and_nothing_is_smuggled() {
    let fixture = fixture().await;
    // CL.TE: Transfer-Encoding wins (RFC 9112 §6.3), so the body ends at the last chunk; the
    // bytes after it are never read as a request, as the connection ends after the answer
    // (RFC 9112 §6.1: no reuse after a message with both).
    let case = Case::forwarded("CL.TE", cl_te(&["Transfer-Encoding: chunked"]));
    let seen = pin(&fixture, &case).await;
    assert_eq!(values(&seen[0].request, "transfer-encoding"), ["chunked"]);
    assert_eq!(seen[0].body, b"");

    // TE.CL: a short Content-Length before a chunk holding a request. The node gets the
    // chunk as a body, chunked, without the Content-Length a back end could have trusted.
    let chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let lines = ["Content-Length: 4", "Transfer-Encoding: chunked"];
    let case = Case::forwarded("TE.CL", post(&lines, &chunk));
    let seen = pin(&fixture, &case).await;
    assert_eq!(values(&seen[0].request, "content-length"), [""; 0]);
    assert_eq!(values(&seen[0].request, "transfer-encoding"), ["chunked"]);
    assert_eq!(seen[0].body, SMUGGLED.as_bytes());
}

/// An obfuscated CL.TE attempt: its `Transfer-Encoding` line(s), today's status, and the
/// `Transfer-Encoding` values that reach the node when the request goes through.
struct Obfuscated {
    name: &'static str,
    te: &'static [&'static str],
    status: u16,
    forwarded: &'static [&'static str],
}

#[tokio::test]
async fn obfuscated_transfer_encodings() {
    let fixture = fixture().await;
    let cases = [
        // A last coding other than chunked leaves the length unknowable (RFC 9112 §6.3): 400.
        Obfuscated {
            name: "xchunked",
            te: &["Transfer-Encoding: xchunked"],
            status: 400,
            forwarded: &[],
        },
        // Whitespace between a field name and its colon must be refused (RFC 9112 §5.1).
        Obfuscated {
            name: "space before the colon",
            te: &["Transfer-Encoding : chunked"],
            status: 400,
            forwarded: &[],
        },
        // chunked must be the final coding (RFC 9112 §6.3).
        Obfuscated {
            name: "chunked, identity",
            te: &["Transfer-Encoding: chunked, identity"],
            status: 400,
            forwarded: &[],
        },
        // A tab is optional whitespace (RFC 9110 §5.6.3): plain chunked, so CL.TE as above.
        Obfuscated {
            name: "tab before chunked",
            te: &["Transfer-Encoding:\tchunked"],
            status: 200,
            forwarded: &["chunked"],
        },
        // Two lines make one list (RFC 9110 §5.3), "chunked, identity": not chunked last.
        Obfuscated {
            name: "two headers, chunked first",
            te: &["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
            status: 400,
            forwarded: &[],
        },
        // The list "identity, chunked" ends in chunked, so it is read as chunked; the
        // upstream gets one `chunked` line, the framing the gateway sends, not the client's
        // list (a node reading only its first line would see no chunked coding).
        Obfuscated {
            name: "two headers, chunked last",
            te: &["Transfer-Encoding: identity", "Transfer-Encoding: chunked"],
            status: 200,
            forwarded: &["chunked"],
        },
    ];
    for obfuscated in &cases {
        let (name, request) = (obfuscated.name, cl_te(obfuscated.te));
        let case = match obfuscated.status {
            200 => Case::forwarded(name, request),
            status => Case::refused(name, status, request),
        };
        let seen = pin(&fixture, &case).await;
        if let [forwarded] = seen.as_slice() {
            let te = values(&forwarded.request, "transfer-encoding");
            assert_eq!(te, obfuscated.forwarded, "{name}");
            // The chunked body ended before the smuggled request: nothing of it went up.
            assert_eq!(forwarded.body, b"", "{name}");
        }
    }
}

#[tokio::test]
async fn obs_fold_is_refused() {
    let fixture = fixture().await;
    // A server must refuse obs-fold in a request or replace it (RFC 9112 §5.2); refusing is
    // the safe choice, as a node could read the folded line as a header of its own.
    let lines = [
        "Content-Length: 0",
        "X-Folded: first",
        " Transfer-Encoding: chunked",
    ];
    pin(&fixture, &Case::refused("obs-fold", 400, post(&lines, ""))).await;
}

/// A GET of CoderAgent's room `x` with `count` header lines of `value`.
fn get_with_headers(count: usize, value: &str) -> Vec<u8> {
    let mut text =
        "GET /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n".to_owned();
    for i in 0..count {
        text.push_str(&format!("X-H{i}: {value}\r\n"));
    }
    (text + "\r\n").into_bytes()
}

#[tokio::test]
async fn oversized_heads_are_refused_before_the_node() {
    let fixture = fixture().await;
    // 1 MiB of head that never ends: Pingora's buffer limit is 1 MiB - 1 bytes, so all of it
    // is read (the answer cannot be lost to a reset) and the next read is refused.
    let mut endless = b"GET /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\nX-Big: ".to_vec();
    endless.resize(1024 * 1024, b'a');
    let cases = [
        // Over the gateway's max_request_header_bytes (32 KiB): its own JSON 431.
        Case {
            name: "40 KiB header value",
            request: get_with_headers(1, &"v".repeat(40 * 1024)),
            status: 431,
            error: Some("request_header_too_large"),
            forwarded: false,
        },
        // Under every size limit but over Pingora's 256 headers: 400.
        Case::refused("300 headers", 400, get_with_headers(300, "v")),
        // Over Pingora's head buffer, before the gateway sees a head at all: 400.
        Case::refused("1 MiB unfinished head", 400, endless),
    ];
    for case in &cases {
        pin(&fixture, case).await;
    }
    // Many headers under every limit are not hostile: they reach the node (50, as the node's
    // parser holds 64 headers and the gateway adds its own).
    let seen = pin(
        &fixture,
        &Case::forwarded("50 headers", get_with_headers(50, "v")),
    )
    .await;
    assert_eq!(seen[0].request.header("x-h49"), Some("v"));
}

/// A GET of CoderAgent's room `x` in absolute form through `evil.example`, with `Host: host`.
fn absolute_form(host: &str) -> Vec<u8> {
    format!("GET http://evil.example/agents/CoderAgent/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn absolute_form_targets() {
    let fixture = fixture().await;
    // Routing is by the path alone, and the node gets the origin form; the Host the client
    // named is kept, as for any request (a local upstream's Host is never rewritten).
    let case = Case::forwarded("absolute form, Host agrees", absolute_form("evil.example"));
    let seen = pin(&fixture, &case).await;
    let head = &seen[0].request.head;
    assert!(
        head.starts_with("GET /agents/coder-agent/x HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(values(&seen[0].request, "host"), ["evil.example"]);

    // RFC 9112 §3.2.2 has the target's authority win over Host; two that disagree are
    // ambiguous, and Pingora refuses them with 400.
    let case = Case::refused("absolute form, Host disagrees", 400, absolute_form("gw"));
    pin(&fixture, &case).await;
}

#[tokio::test]
async fn connect_is_refused() {
    let fixture = fixture().await;
    // The gateway is no tunnel: Pingora refuses CONNECT with 405 before any hook runs.
    let request = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n";
    pin(&fixture, &Case::refused("CONNECT", 405, request.to_vec())).await;
}

/// Reads one answer off `stream`, framed by its `Content-Length`, leaving the stream open.
async fn read_one(stream: &mut TcpStream) -> Answer {
    let head = read_head(stream).await;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            let length = name.eq_ignore_ascii_case("content-length");
            length.then(|| value.trim().parse().ok())?
        })
        .expect("a Content-Length");
    let mut bytes = head.into_bytes();
    let start = bytes.len();
    bytes.resize(start + length, 0);
    tokio::time::timeout(WAIT, stream.read_exact(&mut bytes[start..]))
        .await
        .expect("a body in time")
        .expect("a body");
    parse_answers(&bytes).remove(0)
}

const ONE: &str = "GET /agents/CoderAgent/one HTTP/1.1\r\nHost: gw\r\n\r\n";
const TWO: &str = "GET /agents/CoderAgent/two HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";

/// Status and body of each answer.
fn summary(answers: &[Answer]) -> Vec<(u16, &str)> {
    answers
        .iter()
        .map(|a| (a.status, a.body.as_str()))
        .collect()
}

/// The targets that reached the node since the last look, after the probe.
async fn targets_reached(fixture: &Fixture) -> Vec<String> {
    probe(fixture).await;
    let seen = take_seen(fixture);
    seen.into_iter().map(|f| f.request.target).collect()
}

#[tokio::test]
async fn kept_alive_requests_one_after_the_other_are_both_served() {
    // The control for pipelining below: the same two requests, the second written only once
    // the first is answered, are both served on one connection.
    let fixture = fixture().await;
    let address = fixture.gateway.address();
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(ONE.as_bytes())
        .await
        .expect("request written");
    let first = read_one(&mut stream).await;
    let rest = converse(&mut stream, TWO.as_bytes()).await;
    let (one, two) = (node_target("one"), node_target("two"));
    let answers: Vec<Answer> = std::iter::once(first).chain(rest).collect();
    assert_eq!(
        summary(&answers),
        [(200, one.as_str()), (200, two.as_str())]
    );
    assert_eq!(targets_reached(&fixture).await, [one, two]);
}

#[tokio::test]
async fn pipelined_requests_get_the_first_answered_and_the_rest_dropped() {
    // Pingora 0.9 leaves HTTP/1.1 pipelining off (`HttpSession::set_pipelining_enabled`):
    // bytes read past the first request forbid reusing the connection, so it closes after
    // the first answer and the second request is dropped unanswered, never reaching the node.
    // Nothing is smuggled, but RFC 9112 §9.3.2 asks for both answers in order (reported).
    let fixture = fixture().await;
    let answers = exchange(&fixture.gateway, format!("{ONE}{TWO}").as_bytes()).await;
    let one = node_target("one");
    assert_eq!(summary(&answers), [(200, one.as_str())]);
    assert_eq!(targets_reached(&fixture).await, [one]);
}
