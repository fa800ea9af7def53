//! The two ends of an upgraded connection, as the pump holds them.
//!
//! A plain TCP end is taken out of Pingora's stream layers (the slowloris wrapper, Pingora's
//! `Stream` with its write buffer and digests) and kept as a bare tokio socket: an idle agent
//! WebSocket then costs little more than its two sockets, and each frame skips three layers.
//! Pingora offers no way to unwrap its `Stream`, so the socket is duplicated and the layered
//! original dropped. TLS ends keep Pingora's stream, which holds the session.
//!
//! Both kinds get TCP keepalive here when configured: the kernel's backstop for a peer that
//! vanished while the heartbeat is off, or while a write toward it is stuck.

use crate::edge::header_deadline::HeaderDeadline;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// TCP keepalive: probes after `idle` without traffic, every `interval`, `probes` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keepalive {
    pub(crate) idle: Duration,
    pub(crate) interval: Duration,
    pub(crate) probes: u32,
}

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

impl Socket {
    /// The TCP socket under this end, if it has one.
    fn tcp_fd(&self) -> Option<RawFd> {
        match self {
            Socket::Tcp(tcp) => Some(tcp.as_raw_fd()),
            // Pingora's TLS streams name their TCP socket's descriptor as their id.
            Socket::Layered(stream) if stream.get_ssl().is_some() => Some(stream.id()),
            Socket::Layered(_) => None,
        }
    }

    /// Runs `f` on the TCP socket under this end; `Ok(false)` when there is none.
    fn with_tcp(&self, f: impl FnOnce(socket2::SockRef<'_>) -> io::Result<()>) -> io::Result<bool> {
        let Some(raw) = self.tcp_fd().filter(|fd| *fd >= 0) else {
            return Ok(false);
        };
        // SAFETY: `raw` is the descriptor of the socket this end owns (checked non-negative
        // above), and `self` is borrowed for the whole call.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let socket = socket2::SockRef::from(&fd);
        // Only an internet stream socket: never a descriptor that is something else.
        if socket.r#type()? != socket2::Type::STREAM || socket.local_addr()?.as_socket().is_none() {
            return Ok(false);
        }
        f(socket).map(|()| true)
    }

    /// Turns TCP keepalive on with `keepalive`; `Ok(false)` for an end without a TCP socket.
    pub(crate) fn set_keepalive(&self, keepalive: Keepalive) -> io::Result<bool> {
        let params = socket2::TcpKeepalive::new()
            .with_time(keepalive.idle)
            .with_interval(keepalive.interval)
            .with_retries(keepalive.probes);
        self.with_tcp(|socket| socket.set_tcp_keepalive(&params))
    }

    /// Makes closing this end reset the connection instead of queueing a FIN behind unsent
    /// data: for a peer judged gone, so that the kernel does not keep retransmitting to it.
    pub(crate) fn reset_on_close(&self) -> io::Result<bool> {
        self.with_tcp(|socket| socket.set_linger(Some(Duration::ZERO)))
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
        let layered = Socket::detach(Box::new(one));
        assert!(matches!(layered, Socket::Layered(_)));
        let keepalive = Keepalive {
            idle: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            probes: 1,
        };
        assert!(!layered.set_keepalive(keepalive).expect("nothing to set"));
        assert!(!layered.reset_on_close().expect("nothing to set"));
    }

    #[tokio::test]
    async fn keepalive_reaches_the_kernel() {
        let (near, _far) = pair().await;
        let socket = Socket::Tcp(near);
        let keepalive = Keepalive {
            idle: Duration::from_secs(45),
            interval: Duration::from_secs(7),
            probes: 4,
        };
        assert!(socket.set_keepalive(keepalive).expect("set"));
        let Socket::Tcp(tcp) = &socket else {
            unreachable!("built as TCP above")
        };
        let kernel = socket2::SockRef::from(tcp);
        assert!(kernel.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(kernel.tcp_keepalive_time().expect("idle"), keepalive.idle);
        assert_eq!(
            kernel.tcp_keepalive_interval().expect("interval"),
            keepalive.interval
        );
        assert_eq!(kernel.tcp_keepalive_retries().expect("probes"), 4);
        assert!(socket.reset_on_close().expect("linger"));
        assert_eq!(kernel.linger().expect("linger"), Some(Duration::ZERO));
    }
}
