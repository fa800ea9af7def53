//! Server-sent events, both ends: the hello backend's event stream and the client that counts
//! the events (`wsload sse`).
//!
//! The backend answers `GET .../events[?size=N]` with `200`, `content-type: text/event-stream`,
//! no Content-Length (`transfer-encoding: chunked`), then writes events back to back for as
//! long as the client takes them: each event `data: xxx...\n\n`, N bytes in all (64 by
//! default), in a chunk of its own and a write of its own, so a proxy sees one small chunk per
//! event (how many it reads at once is up to it). The stream ends when a write fails, i.e.
//! when the client (or the proxy in front) closes.
//!
//! The client opens N such streams, checks each answer (200, text/event-stream, no
//! Content-Length), decodes the chunked framing (or reads to EOF when the proxy sent none) and
//! counts event boundaries (`\n\n`) in the decoded body.

use std::io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The path an event stream is asked for with (before any query).
pub const EVENTS_SUFFIX: &str = "/events";
pub const DEFAULT_EVENT_SIZE: usize = 64;
/// Smallest and largest event (`data: ` and the blank line included).
const MIN_EVENT: usize = 9;
const MAX_EVENT: usize = 16 * 1024;

const EVENTS_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

/// What an event-stream request asks for: `?size=N` bytes per event, `?every_ms=M` a pause
/// between events (0, the default: back to back; a paced stream shows whether a proxy holds
/// events back, which a stream at full speed cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsRequest {
    pub size: usize,
    pub every_ms: u64,
}

/// For a request target, what it asks for when it is an event stream (`None` else).
pub fn events_request(method: Option<&str>, target: Option<&str>) -> Option<EventsRequest> {
    if method != Some("GET") {
        return None;
    }
    let target = target?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.ends_with(EVENTS_SUFFIX) {
        return None;
    }
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let size = param("size").map_or(DEFAULT_EVENT_SIZE, |v| v as usize);
    Some(EventsRequest {
        size: size.clamp(MIN_EVENT, MAX_EVENT),
        every_ms: param("every_ms").unwrap_or(0).min(60_000),
    })
}

/// One event as a chunk: `{len:x}\r\ndata: xxx...\n\n\r\n`, the event `size` bytes.
pub fn event_chunk(size: usize) -> Vec<u8> {
    let mut event = b"data: ".to_vec();
    event.resize(size - 2, b'x');
    event.extend_from_slice(b"\n\n");
    let mut chunk = format!("{:x}\r\n", event.len()).into_bytes();
    chunk.extend_from_slice(&event);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

/// The backend's side: the response head, then one event per write until the peer is gone.
pub async fn stream_events(mut s: TcpStream, req: EventsRequest) -> io::Result<()> {
    s.write_all(EVENTS_HEAD).await?;
    let chunk = event_chunk(req.size);
    loop {
        s.write_all(&chunk).await?;
        if req.every_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(req.every_ms)).await;
        }
    }
}

/// What the response head of an event stream said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHead {
    pub chunked: bool,
}

/// Counts event boundaries (`\n\n`) in a body, across reads.
#[derive(Default)]
pub struct EventCounter {
    last_newline: bool,
}

impl EventCounter {
    pub fn count(&mut self, data: &[u8]) -> u64 {
        let mut n = 0;
        let mut last = self.last_newline;
        for &b in data {
            if b == b'\n' {
                if last {
                    n += 1;
                    last = false;
                } else {
                    last = true;
                }
            } else {
                last = false;
            }
        }
        self.last_newline = last;
        n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the size line (hex digits, then extensions up to LF).
    Size {
        size: usize,
        digits: usize,
        ext: bool,
    },
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The last chunk came: the body is over.
    Done,
}

/// A streaming `transfer-encoding: chunked` decoder.
pub struct Dechunker {
    state: Chunk,
}

impl Default for Dechunker {
    fn default() -> Self {
        Dechunker {
            state: Chunk::Size {
                size: 0,
                digits: 0,
                ext: false,
            },
        }
    }
}

impl Dechunker {
    /// Feeds raw bytes; calls `data` with every piece of chunk data. Ok(true) once the last
    /// chunk has come.
    pub fn feed(&mut self, mut buf: &[u8], mut data: impl FnMut(&[u8])) -> io::Result<bool> {
        let bad =
            |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("chunked: {what}"));
        while !buf.is_empty() {
            match self.state {
                Chunk::Size { size, digits, ext } => {
                    let b = buf[0];
                    buf = &buf[1..];
                    self.state = match b {
                        b'\n' if digits == 0 => return Err(bad("empty size line")),
                        b'\n' if size == 0 => Chunk::Done,
                        b'\n' => Chunk::Data(size),
                        b'\r' => Chunk::Size { size, digits, ext },
                        _ if ext => Chunk::Size { size, digits, ext },
                        b';' | b' ' | b'\t' => Chunk::Size {
                            size,
                            digits,
                            ext: true,
                        },
                        _ => {
                            let d =
                                (b as char).to_digit(16).ok_or_else(|| bad("size digit"))? as usize;
                            if digits >= 12 {
                                return Err(bad("chunk too long"));
                            }
                            Chunk::Size {
                                size: size * 16 + d,
                                digits: digits + 1,
                                ext,
                            }
                        }
                    };
                }
                Chunk::Data(left) => {
                    let n = left.min(buf.len());
                    data(&buf[..n]);
                    buf = &buf[n..];
                    self.state = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                }
                Chunk::DataEnd => {
                    let b = buf[0];
                    buf = &buf[1..];
                    match b {
                        b'\r' => {}
                        b'\n' => {
                            self.state = Chunk::Size {
                                size: 0,
                                digits: 0,
                                ext: false,
                            }
                        }
                        _ => return Err(bad("no CRLF after the data")),
                    }
                }
                // Trailers are not looked at: the body is over.
                Chunk::Done => return Ok(true),
            }
        }
        Ok(self.state == Chunk::Done)
    }
}

/// The client's side of one stream: sends the request, checks the head; returns the stream,
/// the head and the body bytes read with it.
pub async fn open_stream(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
) -> io::Result<(TcpStream, StreamHead, Vec<u8>)> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    );
    let (stream, head, buf) = crate::request_head(addr, &request).await?;
    if head.status != 200 {
        return Err(io::Error::other(format!("answered {}", head.status)));
    }
    let header = |name: &str| head.header(name).map(str::to_ascii_lowercase);
    let ctype = header("content-type").unwrap_or_default();
    if !ctype.starts_with("text/event-stream") {
        return Err(io::Error::other(format!(
            "content-type {ctype:?}, not text/event-stream"
        )));
    }
    if let Some(cl) = header("content-length") {
        return Err(io::Error::other(format!(
            "a Content-Length ({cl}) on an event stream"
        )));
    }
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    Ok((stream, StreamHead { chunked }, buf))
}

/// Reads a stream's body until it fails or ends, calling `on_read(events, bytes)` after each
/// read with what that read brought. Returns why it ended.
pub async fn read_events(
    mut s: TcpStream,
    head: StreamHead,
    first: Vec<u8>,
    mut on_read: impl FnMut(u64, u64),
) -> io::Error {
    let mut counter = EventCounter::default();
    let mut dechunker = Dechunker::default();
    let mut buf = first;
    buf.reserve(64 * 1024);
    loop {
        if !buf.is_empty() {
            let mut events = 0;
            let ended = if head.chunked {
                match dechunker.feed(&buf, |d| events += counter.count(d)) {
                    Ok(ended) => ended,
                    Err(e) => return e,
                }
            } else {
                events = counter.count(&buf);
                false
            };
            on_read(events, buf.len() as u64);
            if ended {
                return io::Error::new(io::ErrorKind::UnexpectedEof, "the event stream ended");
            }
            buf.clear();
        }
        match s.read_buf(&mut buf).await {
            Ok(0) => return io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-stream"),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_detection() {
        let r = |size, every_ms| Some(EventsRequest { size, every_ms });
        assert_eq!(
            events_request(Some("GET"), Some("/agents/hello/s1/events")),
            r(64, 0)
        );
        assert_eq!(
            events_request(Some("GET"), Some("/x/events?size=128&every_ms=50")),
            r(128, 50)
        );
        assert_eq!(
            events_request(Some("GET"), Some("/x/events?a=1&size=3&xsize=9")),
            r(MIN_EVENT, 0)
        );
        assert_eq!(
            events_request(Some("GET"), Some("/agents/hello/default")),
            None
        );
        assert_eq!(events_request(Some("POST"), Some("/x/events")), None);
    }

    #[test]
    fn chunk_is_one_event_of_the_size() {
        let c = event_chunk(64);
        assert!(c.starts_with(b"40\r\ndata: x"));
        assert!(c.ends_with(b"x\n\n\r\n"));
        assert_eq!(c.len(), 4 + 64 + 2);
    }

    #[test]
    fn dechunk_and_count_across_any_split() {
        let mut raw = Vec::new();
        for _ in 0..10 {
            raw.extend_from_slice(&event_chunk(64));
        }
        // A proxy that merges events into one chunk, with an extension.
        let merged: Vec<u8> = (0..3).flat_map(|_| b"data: yy\n\n".to_vec()).collect();
        raw.extend_from_slice(format!("{:x};ext=1\r\n", merged.len()).as_bytes());
        raw.extend_from_slice(&merged);
        raw.extend_from_slice(b"\r\n0\r\n\r\n");
        for step in [1, 2, 3, 7, 64, 1000] {
            let (mut d, mut c, mut n, mut bytes, mut ended) =
                (Dechunker::default(), EventCounter::default(), 0, 0, false);
            for piece in raw.chunks(step) {
                ended = d
                    .feed(piece, |x| {
                        bytes += x.len();
                        n += c.count(x)
                    })
                    .unwrap();
            }
            assert!(ended, "step {step}");
            assert_eq!(n, 13, "step {step}");
            assert_eq!(bytes, 10 * 64 + merged.len(), "step {step}");
        }
    }

    #[test]
    fn bad_chunk_size_is_an_error() {
        assert!(Dechunker::default().feed(b"zz\r\n", |_| {}).is_err());
    }
}
