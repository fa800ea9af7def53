//! Shared pieces of the benchmark's backends and load generator: a minimal RFC 6455 frame
//! codec (just what echoing and timing need), HTTP/1.1 head handling, the two backends (the
//! hello backend's server-sent event stream in [`sse`]), and
//! readers for /proc (CPU ticks, PSS) so that measurements are taken at the right instant.
//!
//! Everything here is single-threaded (tokio current-thread runtimes): each process is pinned
//! to one core by the harness, where more threads would only add scheduling noise.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub mod args;
pub mod procfs;
pub mod sse;
pub mod storm;
pub mod tokens;

/// Longest HTTP head or WebSocket frame either side accepts.
pub const MAX_HEAD: usize = 64 * 1024;
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

pub const HELLO_BODY: &[u8] = b"Hello, world\n";
const HELLO_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world\n";

/// The echo backend's counters, served as JSON on `GET STATS_PATH` (plain HTTP to the backend
/// itself): how many Pings it answered, which the liveness phase needs to count the gateway's
/// heartbeats toward upstreams.
pub const STATS_PATH: &str = "/_bench/stats";
static PINGS_ANSWERED: AtomicU64 = AtomicU64::new(0);

fn stats_response() -> Vec<u8> {
    let body = format!(
        "{{\"pings_answered\":{}}}",
        PINGS_ANSWERED.load(Ordering::Relaxed)
    );
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Binds with a deep accept queue: the hold test opens thousands of sockets in a burst.
pub fn listen(addr: &str) -> io::Result<TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "listen address is ip:port"))?;
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves HTTP/1.1 keep-alive "hello" answers; with `websocket`, upgrades become echo sockets.
pub async fn serve(listener: TcpListener, websocket: bool) -> io::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            // EMFILE and friends: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = serve_connection(stream, websocket).await;
        });
    }
}

struct HeadInfo {
    len: usize,
    upgrade: bool,
    key: Option<Vec<u8>>,
    close: bool,
    body: usize,
    /// A request for [`STATS_PATH`] (looked for by the echo backend only).
    stats: bool,
    /// `GET .../events`: a server-sent event stream (hello backend only).
    events: Option<sse::EventsRequest>,
}

fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

fn parse_request(buf: &[u8], echo: bool) -> io::Result<Option<HeadInfo>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let mut info = HeadInfo {
                len,
                upgrade: false,
                key: None,
                close: false,
                body: 0,
                stats: echo && req.path == Some(STATS_PATH),
                events: if echo {
                    None
                } else {
                    sse::events_request(req.method, req.path)
                },
            };
            let mut upgrade_ws = false;
            let mut connection_upgrade = false;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("upgrade") {
                    upgrade_ws |= has_token(h.value, "websocket");
                } else if h.name.eq_ignore_ascii_case("connection") {
                    connection_upgrade |= has_token(h.value, "upgrade");
                    info.close |= has_token(h.value, "close");
                } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
                    info.key = Some(h.value.to_vec());
                } else if h.name.eq_ignore_ascii_case("content-length") {
                    info.body = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                }
            }
            info.upgrade = upgrade_ws && connection_upgrade;
            Ok(Some(info))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(None),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request head",
        )),
    }
}

/// The Sec-WebSocket-Accept value for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

async fn serve_connection(mut s: TcpStream, websocket: bool) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut inb: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let mut consumed = 0;
        while let Some(head) = parse_request(&inb[consumed..], websocket)? {
            if websocket && head.upgrade {
                let key = head.key.unwrap_or_default();
                if !out.is_empty() {
                    s.write_all(&out).await?;
                }
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept_key(&key)
                );
                s.write_all(answer.as_bytes()).await?;
                let leftover = inb[consumed + head.len..].to_vec();
                drop(inb);
                drop(out);
                return echo_websocket(s, leftover).await;
            }
            if let Some(req) = head.events {
                // The rest of this connection is the event stream (until the client goes).
                if !out.is_empty() {
                    s.write_all(&out).await?;
                }
                return sse::stream_events(s, req).await;
            }
            if inb.len() - consumed < head.len + head.body {
                break; // body still arriving
            }
            consumed += head.len + head.body;
            if head.stats {
                out.extend_from_slice(&stats_response());
            } else {
                out.extend_from_slice(HELLO_RESPONSE);
            }
            if head.close {
                s.write_all(&out).await?;
                return s.shutdown().await;
            }
        }
        inb.drain(..consumed);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if inb.capacity() - inb.len() < 512 {
            inb.reserve(4096);
        }
        if s.read_buf(&mut inb).await? == 0 {
            return Ok(());
        }
    }
}

/// A frame header as parsed from the front of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameHead {
    pub b0: u8,
    pub header_len: usize,
    pub payload_len: usize,
    pub mask: Option<[u8; 4]>,
}

impl FrameHead {
    pub fn opcode(&self) -> u8 {
        self.b0 & 0x0f
    }
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a frame header at the front of `buf`; `None` until the header is complete.
pub fn parse_frame_head(buf: &[u8]) -> io::Result<Option<FrameHead>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut header_len) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len > MAX_FRAME as u64 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too long"));
            }
            (len as usize, 10)
        }
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < header_len + 4 {
            return Ok(None);
        }
        let mut k = [0u8; 4];
        k.copy_from_slice(&buf[header_len..header_len + 4]);
        header_len += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(FrameHead {
        b0,
        header_len,
        payload_len,
        mask,
    }))
}

/// Appends a frame: masked with `mask` (client to server) or unmasked (server to client).
/// `payload` is given in clear; `unmask` first removes the mask it arrived with.
pub fn push_frame(
    out: &mut Vec<u8>,
    b0: u8,
    payload: &[u8],
    unmask: Option<[u8; 4]>,
    mask: Option<[u8; 4]>,
) {
    out.push(b0);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        out.push(mask_bit | n as u8);
    } else if n <= 0xffff {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
    let key = match (unmask, mask) {
        (Some(a), Some(b)) => [a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], a[3] ^ b[3]],
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => [0; 4],
    };
    if key == [0; 4] {
        out.extend_from_slice(payload);
    } else {
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    }
}

/// The echo side of a WebSocket: every data frame comes back unmasked, pings get pongs
/// (counted, for [`STATS_PATH`]), a Close is answered with the same payload and ends the
/// connection.
async fn echo_websocket(mut s: TcpStream, leftover: Vec<u8>) -> io::Result<()> {
    let mut inb = leftover;
    inb.reserve(2048);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let mut pos = 0;
        while let Some(head) = parse_frame_head(&inb[pos..])? {
            if inb.len() - pos < head.total() {
                if inb.capacity() < pos + head.total() {
                    inb.reserve(pos + head.total() - inb.len());
                }
                break;
            }
            let payload = &inb[pos + head.header_len..pos + head.total()];
            match head.opcode() {
                0x8 => {
                    push_frame(&mut out, 0x88, payload, head.mask, None);
                    s.write_all(&out).await?;
                    return s.shutdown().await;
                }
                0x9 => {
                    push_frame(&mut out, 0x8a, payload, head.mask, None);
                    PINGS_ANSWERED.fetch_add(1, Ordering::Relaxed);
                }
                0xa => {}
                _ => push_frame(&mut out, head.b0 & 0x8f, payload, head.mask, None),
            }
            pos += head.total();
        }
        inb.drain(..pos);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if inb.capacity() - inb.len() < 256 {
            inb.reserve(4096);
        }
        if s.read_buf(&mut inb).await? == 0 {
            return Ok(());
        }
    }
}

/// A client WebSocket: the stream, plus bytes read but not yet consumed.
pub struct WsClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

/// The fixed handshake key and the answer it must get.
pub const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const CLIENT_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Clients must mask; any fixed key is as good as another for a benchmark.
pub const CLIENT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A response head as a client reads it: the status and the header lines.
pub struct ResponseHead {
    pub status: u16,
    headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Connects to `addr`, sends `request` (a whole head) and reads the response head; returns
/// the stream, the head and the bytes read past it.
pub async fn request_head(
    addr: SocketAddr,
    request: &str,
) -> io::Result<(TcpStream, ResponseHead, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the response head",
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let head = ResponseHead {
                    status: resp.code.unwrap_or(0),
                    headers: resp
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                buf.drain(..len);
                return Ok((stream, head, buf));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(4096);
                }
            }
            _ => return Err(io::Error::other("bad response head")),
        }
    }
}

impl WsClient {
    /// Connects and upgrades; fails unless the answer is a 101 with the right accept key.
    pub async fn connect(addr: SocketAddr, host: &str, path: &str) -> io::Result<WsClient> {
        Self::connect_with(addr, host, path, "").await
    }

    /// [`Self::connect`] with more header lines in the upgrade request (`extra`: complete
    /// lines, each ending with `\r\n`, such as an `Authorization` header).
    pub async fn connect_with(
        addr: SocketAddr,
        host: &str,
        path: &str,
        extra: &str,
    ) -> io::Result<WsClient> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        let (stream, head, buf) = request_head(addr, &request).await?;
        if head.status != 101 {
            return Err(io::Error::other(format!(
                "handshake answered {}",
                head.status
            )));
        }
        if head.header("sec-websocket-accept") != Some(CLIENT_ACCEPT) {
            return Err(io::Error::other("wrong Sec-WebSocket-Accept"));
        }
        Ok(WsClient {
            stream,
            buf,
            start: 0,
        })
    }

    /// Reads the next frame; returns its opcode and the payload's range in [`Self::payload`].
    pub async fn read_frame(&mut self) -> io::Result<(u8, std::ops::Range<usize>)> {
        loop {
            if let Some(head) = parse_frame_head(&self.buf[self.start..])? {
                if self.buf.len() - self.start >= head.total() {
                    let from = self.start + head.header_len;
                    let to = self.start + head.total();
                    self.start = to;
                    return Ok((head.opcode(), from..to));
                }
            }
            if self.start > 0 && self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
            } else if self.start > 4096 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.buf.capacity() - self.buf.len() < 512 {
                self.buf.reserve(4096);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "socket closed",
                ));
            }
        }
    }

    /// The underlying stream and whatever was read past the last consumed frame.
    pub fn into_parts(mut self) -> (TcpStream, Vec<u8>) {
        self.buf.drain(..self.start);
        (self.stream, self.buf)
    }

    pub fn payload(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Sends `frame` (already encoded) and waits for a data frame echoing `expect_len` bytes.
    pub async fn round_trip(&mut self, frame: &[u8], expect_len: usize) -> io::Result<()> {
        self.stream.write_all(frame).await?;
        loop {
            let (op, range) = self.read_frame().await?;
            match op {
                0x1 | 0x2 if range.len() == expect_len => return Ok(()),
                0x1 | 0x2 => {
                    return Err(io::Error::other(format!(
                        "echo of {} bytes, expected {expect_len}",
                        range.len()
                    )))
                }
                0x8 => return Err(io::Error::other("closed by the peer")),
                _ => {}
            }
        }
    }

    /// Sends a Close (1000) and waits briefly for the answer.
    pub async fn close(mut self) {
        let mut frame = Vec::with_capacity(8);
        push_frame(
            &mut frame,
            0x88,
            &1000u16.to_be_bytes(),
            None,
            Some(CLIENT_MASK),
        );
        if self.stream.write_all(&frame).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                while let Ok((op, _)) = self.read_frame().await {
                    if op == 0x8 {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// A masked binary frame carrying `payload`.
pub fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    push_frame(&mut out, 0x82, payload, None, Some(CLIENT_MASK));
    out
}

/// Runs a single-threaded runtime (with a LocalSet, so tasks may share `Rc` state).
pub fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(accept_key(CLIENT_KEY.as_bytes()), CLIENT_ACCEPT);
    }

    #[test]
    fn frames_round_trip() {
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let f = client_frame(&payload);
        let head = parse_frame_head(&f).unwrap().unwrap();
        assert_eq!(head.payload_len, 300);
        let mut echoed = Vec::new();
        push_frame(&mut echoed, 0x82, &f[head.header_len..], head.mask, None);
        let h2 = parse_frame_head(&echoed).unwrap().unwrap();
        assert!(h2.mask.is_none());
        assert_eq!(&echoed[h2.header_len..], &payload[..]);
    }
}
