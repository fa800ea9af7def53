//! HTTP and WebSocket handshakes written by hand on a raw socket, and their answers read
//! whole: paths are not normalised, headers are sent as given, refusals keep their bodies.

use super::WAIT;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads a response head byte by byte, so nothing after it (WebSocket frames) is consumed.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut byte))
            .await
            .expect("head in time")
            .expect("read");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Opens a WebSocket to CoderAgent's `room` by hand (a valid handshake, read up to the 101),
/// so a test can stay silent or write frames a library would refuse to send.
pub async fn raw_upgrade(address: SocketAddr, room: &str) -> TcpStream {
    let path = format!("/agents/CoderAgent/{room}");
    upgrade_as(address, "x", &path, &[]).await.open().0
}

/// A WebSocket handshake request for `path`, written by hand, with extra header lines.
pub fn upgrade_request(host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request + "\r\n"
}

/// A WebSocket upgrade by hand: the open stream and the 101's head, or the whole refusal.
pub enum Upgrade {
    Open(TcpStream, String),
    Refused(RawResponse),
}

impl Upgrade {
    pub fn open(self) -> (TcpStream, String) {
        match self {
            Upgrade::Open(stream, head) => (stream, head),
            Upgrade::Refused(answer) => panic!("refused: {}\n{}", answer.head, answer.body),
        }
    }

    pub fn refused(self) -> RawResponse {
        match self {
            Upgrade::Refused(answer) => answer,
            Upgrade::Open(_, head) => panic!("expected a refusal, got {head}"),
        }
    }
}

/// Upgrades `path` on `address` with extra headers (`Host` is the address).
pub async fn upgrade(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Upgrade {
    upgrade_as(address, &address.to_string(), path, headers).await
}

/// Upgrades `path` on `address` with `Host: host` and extra headers: the head decides; a
/// refusal is read whole (an accepted upgrade never ends by itself).
pub async fn upgrade_as(
    address: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Upgrade {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = upgrade_request(host, path, headers);
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    if head.starts_with("HTTP/1.1 101") {
        return Upgrade::Open(stream, head);
    }
    let answer = tokio::time::timeout(WAIT, read_answer(&mut stream, head.into_bytes()))
        .await
        .expect("answer in time");
    Upgrade::Refused(answer)
}

/// An HTTP answer read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Sends `request` as written (so paths are not normalised by a client library) and reads
/// the answer until the server closes or the body is complete.
pub async fn raw_request(address: SocketAddr, request: &str) -> RawResponse {
    let work = async {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        read_answer(&mut stream, Vec::new()).await
    };
    tokio::time::timeout(WAIT, work)
        .await
        .expect("answer in time")
}

/// Reads an answer (of which `buf` already holds the start) until the server closes or the
/// body is complete.
async fn read_answer(stream: &mut TcpStream, mut buf: Vec<u8>) -> RawResponse {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(parsed) = parse_complete(&buf) {
            return parsed;
        }
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_complete(&buf)
        .unwrap_or_else(|| panic!("incomplete answer: {:?}", String::from_utf8_lossy(&buf)))
}

fn parse_complete(buf: &[u8]) -> Option<RawResponse> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let response = RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    };
    if response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        let body = decode_chunked(&response.body)?;
        return Some(RawResponse { body, ..response });
    }
    let length: usize = response.header("content-length")?.parse().ok()?;
    (response.body.len() >= length).then_some(response)
}

/// The body of a complete chunked encoding, or `None` while it is incomplete.
fn decode_chunked(mut raw: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size_line, rest) = raw.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(rest.get(..size)?);
        raw = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// `GET path` with `Connection: close` and extra header lines.
pub async fn get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    raw_request(address, &request).await
}

/// Sends a WebSocket handshake for `url` by hand and returns the HTTP refusal it got, whole
/// (a client library may keep only the body bytes that came with the head).
pub async fn connect_refused(url: &str) -> (u16, String) {
    connect_refused_with(url, &[]).await
}

pub async fn connect_refused_with(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let rest = url.strip_prefix("ws://").expect("a ws:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let address: SocketAddr = authority.parse().expect("an IP:port authority");
    let answer = raw_request(address, &upgrade_request(authority, path, headers)).await;
    assert_ne!(
        answer.status, 101,
        "expected a refusal, the upgrade succeeded"
    );
    (answer.status, answer.body)
}
