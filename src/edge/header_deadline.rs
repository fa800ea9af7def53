//! A deadline on a connection's first request head, against slowloris clients.
//!
//! Pingora bounds each read (60 s), not the whole head, so a client trickling a byte a
//! minute keeps a connection forever; and no Pingora hook runs before the head is complete.
//! So the gateway wraps the accepted stream itself: until the first `\r\n\r\n` has gone
//! by, reads race a deadline; when it passes, the client gets 408 and the connection ends.
//! Afterwards the wrapper only forwards.

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use prometheus::IntCounter;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const TIMEOUT_ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: 69\r\nconnection: close\r\n\r\n{\"error\":\"request_timeout\",\"detail\":\"the request head came too slowly\"}";

pub(crate) struct HeaderDeadline {
    inner: Stream,
    /// Armed until the first head has been read.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last bytes read, to find `\r\n\r\n` across reads.
    tail: [u8; 3],
    timeouts: IntCounter,
}

impl HeaderDeadline {
    pub(crate) fn new(inner: Stream, limit: Duration, timeouts: IntCounter) -> Self {
        HeaderDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            tail: [0; 3],
            timeouts,
        }
    }

    /// The wrapped stream, for a WebSocket takeover that sheds the layers.
    pub(crate) fn inner(&self) -> &Stream {
        &self.inner
    }

    /// Whether `bytes`, following the bytes before them, complete a request head.
    fn completes_head(&mut self, bytes: &[u8]) -> bool {
        let mut window: Vec<u8> = self.tail.to_vec();
        window.extend_from_slice(&bytes[..bytes.len().min(4096)]);
        let found = window.windows(4).any(|w| w == b"\r\n\r\n")
            || bytes.len() > 4096 && bytes.windows(4).any(|w| w == b"\r\n\r\n");
        let keep = window.len().min(3);
        self.tail = [0; 3];
        self.tail[3 - keep..].copy_from_slice(&window[window.len() - keep..]);
        found
    }
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("armed", &self.deadline.is_some())
            .field("inner", &self.inner)
            .finish()
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() && this.completes_head(&buf.filled()[before..]) {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    this.deadline = None;
                    this.timeouts.inc();
                    // Best effort: the client may not be reading either.
                    let _ = Pin::new(&mut this.inner).poll_write(cx, TIMEOUT_ANSWER);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head too slow",
                    )))
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline() -> HeaderDeadline {
        let (inner, _) = tokio::io::duplex(1);
        let counter = IntCounter::new("t", "t").expect("counter");
        HeaderDeadline::new(Box::new(inner), Duration::from_secs(1), counter)
    }

    #[tokio::test]
    async fn finds_the_end_of_the_head_across_reads() {
        let mut d = deadline();
        assert!(!d.completes_head(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(!d.completes_head(b"\n"));
        assert!(d.completes_head(b"\r\n"));
        let mut d = deadline();
        assert!(d.completes_head(b"GET / HTTP/1.1\r\n\r\nbody"));
        let mut d = deadline();
        assert!(!d.completes_head(b"\r\n\r"));
        assert!(d.completes_head(b"\n"));
    }
}
