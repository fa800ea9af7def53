//! The two ends of an upgraded connection, as the pump holds them.
//!
//! A plain TCP end is taken out of Pingora's stream layers (the slowloris wrapper, Pingora's
//! `Stream` with its write buffer and digests) and kept as a bare tokio socket: an idle agent
//! WebSocket then costs little more than its two sockets, and each frame skips three layers.
//! Pingora offers no way to unwrap its `Stream`, so the socket is duplicated and the layered
//! original dropped. TLS ends keep Pingora's stream, which holds the session.

use crate::edge::header_deadline::HeaderDeadline;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub(crate) enum Socket {
    /// A plain TCP connection, out of Pingora's layers.
    Tcp(TcpStream),
    /// Anything else (TLS, or a stream not from a TCP socket), as Pingora gave it.
    Layered(Stream),
}

impl Socket {
    /// Sheds Pingora's layers from a plain TCP stream; other streams are kept as they are.
    /// Nothing may be buffered in `stream`: the caller has flushed it, the handshake has
    /// consumed everything read from it, and Pingora reads it unbuffered (the listeners'
    /// `l4_buffer` read size is 0 in `server.rs`; upstream streams have no buffer).
    pub(crate) fn detach(stream: Stream) -> Socket {
        match bare_tcp(&stream) {
            Ok(Some(tcp)) => Socket::Tcp(tcp),
            Ok(None) => Socket::Layered(stream),
            Err(e) => {
                log::debug!("keeping Pingora's stream for an upgraded connection: {e}");
                Socket::Layered(stream)
            }
        }
    }
}

/// A second handle on `stream`'s TCP socket, registered with this runtime; `None` when the
/// stream is not plain TCP.
fn bare_tcp(stream: &Stream) -> io::Result<Option<TcpStream>> {
    if stream.get_ssl().is_some() {
        return Ok(None);
    }
    let any = stream.as_any();
    let l4 = match any.downcast_ref::<HeaderDeadline>() {
        Some(wrapper) => wrapper.inner().as_any().downcast_ref::<L4Stream>(),
        None => any.downcast_ref::<L4Stream>(),
    };
    let Some(l4) = l4 else {
        return Ok(None);
    };
    let raw = l4.as_raw_fd();
    if raw < 0 {
        // Pingora's in-memory streams have no descriptor.
        return Ok(None);
    }
    // SAFETY: `raw` is a valid descriptor (checked above) that belongs to `l4`, which is
    // borrowed for the whole of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    let tcp = std::net::TcpStream::from(fd.try_clone_to_owned()?);
    // A Unix socket would fail here: its address is not an internet one.
    tcp.peer_addr()?;
    tcp.set_nonblocking(true)?;
    TcpStream::from_std(tcp).map(Some)
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Layered(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Layered(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Layered(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Layered(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// The detached socket carries the connection on after Pingora's stream is gone.
    #[tokio::test]
    async fn plain_tcp_is_detached_and_outlives_the_layered_stream() {
        let (near, mut far) = pair().await;
        let layered: Stream = Box::new(L4Stream::from(near));
        let Socket::Tcp(mut bare) = Socket::detach(layered) else {
            panic!("a plain TCP stream stays layered");
        };
        bare.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        far.write_all(b"pong").await.expect("write back");
        bare.read_exact(&mut got).await.expect("read back");
        assert_eq!(&got, b"pong");
    }

    #[tokio::test]
    async fn streams_without_a_socket_stay_layered() {
        let (one, _other) = tokio::io::duplex(64);
        assert!(matches!(Socket::detach(Box::new(one)), Socket::Layered(_)));
    }
}
