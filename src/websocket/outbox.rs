//! What one direction of the pump sends toward its destination: written at once as far as the
//! destination takes it, the rest kept in order; and why a direction stops.

use super::frame::ProtocolError;
use super::socket::Socket;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::AsyncWrite;

/// Why a direction stopped.
pub(crate) enum Stop {
    SourceEnded(Option<io::Error>),
    DestinationFailed(io::Error),
    Protocol(ProtocolError),
    /// The source went over a rate limit whose action is `close`; the Close toward the
    /// destination is queued. The direction can go on.
    RateLimited,
}

/// What goes toward the destination: written at once as far as it takes it, the rest kept
/// in order.
pub(crate) struct Outbox {
    /// `pending[pos..]` was meant for the destination but it has not taken it yet; empty
    /// (and unallocated after a burst) while the destination keeps up. It holds at most a
    /// read and a frame of the gateway's (nothing more is read while it waits): `pos` fits in
    /// 32 bits, which keeps the outbox, in every idle connection's task, 8 bytes smaller.
    pending: Vec<u8>,
    pos: u32,
    pub(crate) needs_flush: bool,
    /// While a heartbeat Ping toward the destination is unanswered: when the destination
    /// last took bytes (one that still takes them is still there).
    pub(crate) watching: bool,
    pub(crate) progress: Instant,
}

/// Where [`super::direction::Direction::ingest`] sends what may go on: to the destination now, or (bytes read
/// with the handshake, before the pump runs) kept for it.
pub(crate) enum Sink<'a, 'b> {
    Now {
        cx: &'a mut Context<'b>,
        destination: &'a mut Socket,
    },
    Later,
}

impl Outbox {
    pub(crate) fn new(now: Instant) -> Self {
        Outbox {
            pending: Vec::new(),
            pos: 0,
            needs_flush: false,
            watching: false,
            progress: now,
        }
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.unsent().is_empty()
    }

    /// What the destination has not taken yet.
    pub(crate) fn unsent(&self) -> &[u8] {
        &self.pending[self.pos as usize..]
    }

    fn wrote(&mut self) {
        self.needs_flush = true;
        if self.watching {
            self.progress = Instant::now();
        }
    }

    /// Sends `bytes` after anything kept before them.
    pub(crate) fn emit(&mut self, sink: &mut Sink<'_, '_>, mut bytes: &[u8]) -> Result<(), Stop> {
        if let Sink::Now { cx, destination } = sink {
            while !bytes.is_empty() && !self.has_pending() {
                match poll_write_some(cx, destination, bytes) {
                    Poll::Ready(Ok(written)) => {
                        self.wrote();
                        bytes = &bytes[written..];
                    }
                    Poll::Ready(Err(stop)) => return Err(stop),
                    Poll::Pending => break,
                }
            }
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes what was kept; ready once all of it is out.
    pub(crate) fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        destination: &mut Socket,
    ) -> Poll<Result<(), Stop>> {
        while self.has_pending() {
            match poll_write_some(cx, destination, self.unsent()) {
                Poll::Ready(Ok(written)) => {
                    self.pos += written as u32;
                    self.wrote();
                }
                Poll::Ready(Err(stop)) => return Poll::Ready(Err(stop)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.pending.is_empty() {
            // Drained: give a burst's memory back.
            self.pending = Vec::new();
            self.pos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// One write; a destination that takes no bytes is gone.
fn poll_write_some(
    cx: &mut Context<'_>,
    destination: &mut Socket,
    bytes: &[u8],
) -> Poll<Result<usize, Stop>> {
    match Pin::new(&mut *destination).poll_write(cx, bytes) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(Stop::DestinationFailed(
            io::ErrorKind::WriteZero.into(),
        ))),
        Poll::Ready(Ok(written)) => Poll::Ready(Ok(written)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(Stop::DestinationFailed(e))),
        Poll::Pending => Poll::Pending,
    }
}
