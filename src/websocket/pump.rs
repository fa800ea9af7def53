//! The gateway's own bidirectional pump for upgraded connections.
//!
//! Why not Pingora's upgrade path: Pingora forwards upgraded bytes through its body filters,
//! but offers no way to write into an idle upgraded connection from outside (pingora issue
//! 571), and its downstream read timeout (60 s by default) would end idle agent sockets. The
//! gateway therefore takes both streams over once the upstream has answered 101, and runs
//! this pump: one task that polls both directions itself (no split halves, no locks, and a
//! slow writer on one side never stops the other direction), feeds each direction through a
//! [`FrameParser`], and writes Close frames of its own only between frames.

use super::frame::{close_frame, CloseFrame, Feed, FrameEvent, FrameParser, ProtocolError, Sender};
use super::metrics::{ConnectionMetrics, DirectionCounters};
use super::outcome::{ConnectionOutcome, DirectionStats, DropKind, Initiator};
use super::socket::Socket;
use futures_util::FutureExt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// Bytes read per direction at once, into a buffer on the stack: an idle connection holds
/// no read buffer at all, only what a slow destination has not taken yet.
const READ_SIZE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PumpSettings {
    /// Close both sides with 1001 after this long without a byte either way.
    pub(crate) idle_timeout: Option<Duration>,
    /// How long a closing connection may take to finish its Close handshake.
    pub(crate) close_timeout: Duration,
    /// Largest data message either side may send; over it, both get Close 1009.
    pub(crate) max_message_bytes: Option<u64>,
    /// The code the client gets when the upstream drops: 1011 (understood by every client
    /// library) or 1014 (Bad Gateway, which some, tungstenite among them, report as 1002).
    pub(crate) upstream_lost_code: u16,
}

/// One direction: bytes read from `source`, parsed, written to the other side.
struct Direction {
    parser: FrameParser,
    /// `pending[pending_pos..]` was read but the destination has not taken it yet; empty
    /// (and unallocated after a burst) while the destination keeps up.
    pending: Vec<u8>,
    pending_pos: usize,
    needs_flush: bool,
    /// A frame of the gateway's own, waiting for a frame boundary.
    inject: Option<Vec<u8>>,
    inject_pos: usize,
    /// A Close has gone toward the destination: later bytes are read but not forwarded.
    closed_toward_destination: bool,
    /// The source sent a Close (and when).
    close_seen: Option<(CloseFrame, Instant)>,
    /// The pump's loop has been woken for `close_seen`, to start the closing deadline.
    close_reported: bool,
    stats: DirectionStats,
    /// Live metric handles, resolved once per connection.
    counters: DirectionCounters,
    last_read: Instant,
}

/// Why a direction stopped.
enum Stop {
    SourceEnded(Option<io::Error>),
    DestinationFailed(io::Error),
    Protocol(ProtocolError),
}

impl Direction {
    fn new(
        sender: Sender,
        deflate: bool,
        max_message: Option<u64>,
        counters: DirectionCounters,
        now: Instant,
    ) -> Self {
        Direction {
            parser: FrameParser::new(sender, deflate).with_max_message(max_message),
            pending: Vec::new(),
            pending_pos: 0,
            needs_flush: false,
            inject: None,
            inject_pos: 0,
            closed_toward_destination: false,
            close_seen: None,
            close_reported: false,
            stats: DirectionStats::default(),
            counters,
            last_read: now,
        }
    }

    /// Whether a frame of the gateway's own may go to the destination now: what went out so
    /// far ends between two frames (also after a malformed frame that was held back whole).
    fn can_inject(&self) -> bool {
        !self.closed_toward_destination
            && (self.parser.at_frame_boundary() || self.parser.failed_frame_began_in_last_chunk())
    }

    /// Queues a Close of the gateway's own toward the destination, unless one went already.
    fn queue_close(&mut self, frame: Vec<u8>) {
        if !self.closed_toward_destination && self.inject.is_none() {
            self.inject = Some(frame);
            self.inject_pos = 0;
        }
    }

    /// Parses freshly read `data`; returns how much of it may be forwarded, and the protocol
    /// error that stops the rest, if any.
    fn accept(&mut self, data: &[u8]) -> (usize, Result<(), ProtocolError>) {
        let messages_before = self.stats.messages;
        let result = self.parse_read(data);
        self.counters.bytes.inc_by(data.len() as u64);
        self.counters
            .messages
            .inc_by(self.stats.messages - messages_before);
        result
    }

    fn parse_read(&mut self, data: &[u8]) -> (usize, Result<(), ProtocolError>) {
        self.stats.bytes += data.len() as u64;
        if self.close_seen.is_some() {
            // Nothing may follow a Close frame: read, counted, dropped.
            return (0, Ok(()));
        }
        let stop_at_boundary = self.inject.is_some() && !self.closed_toward_destination;
        let (consumed, result) = {
            let (stats, close_seen) = (&mut self.stats, &mut self.close_seen);
            self.parser
                .feed_to_boundary(data, stop_at_boundary, |event| {
                    record(stats, close_seen, event)
                })
        };
        let parsed_ok = match result {
            Feed::Error { offset, .. } => offset,
            Feed::Ok => consumed,
        };
        let forward = if self.closed_toward_destination {
            0
        } else {
            parsed_ok
        };
        if let Feed::Error { error, .. } = result {
            return (forward, Err(error));
        }
        if self.close_seen.is_some() {
            // The source's own Close goes out with these bytes; nothing of ours follows it.
            self.closed_toward_destination = true;
            self.inject = None;
        } else if consumed < data.len() {
            // Stopped at a boundary for a queued Close of ours: the rest is not forwarded, but
            // is still parsed, to learn whether the source answers with a Close of its own.
            let (stats, close_seen) = (&mut self.stats, &mut self.close_seen);
            if let Feed::Error { error, .. } = self
                .parser
                .feed(&data[consumed..], |event| record(stats, close_seen, event))
            {
                return (forward, Err(error));
            }
        }
        (forward, Ok(()))
    }

    /// Writes `bytes` as far as the destination takes them now; keeps the rest for later.
    fn send_or_keep(
        &mut self,
        cx: &mut Context<'_>,
        destination: &mut Socket,
        mut bytes: &[u8],
    ) -> Result<(), Stop> {
        while !bytes.is_empty() {
            match poll_write_some(cx, destination, bytes) {
                Poll::Ready(Ok(written)) => {
                    self.needs_flush = true;
                    bytes = &bytes[written..];
                }
                Poll::Ready(Err(stop)) => return Err(stop),
                Poll::Pending => break,
            }
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    /// Drives this direction until it needs to wait, or stops.
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Socket,
        destination: &mut Socket,
    ) -> Poll<Stop> {
        loop {
            if self.pending_pos < self.pending.len() {
                match poll_write_some(cx, destination, &self.pending[self.pending_pos..]) {
                    Poll::Ready(Ok(written)) => {
                        self.pending_pos += written;
                        self.needs_flush = true;
                        if self.pending_pos == self.pending.len() {
                            // Drained: give a burst's memory back.
                            self.pending = Vec::new();
                            self.pending_pos = 0;
                        }
                        continue;
                    }
                    Poll::Ready(Err(stop)) => return Poll::Ready(stop),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.can_inject() {
                if let Some(frame) = &self.inject {
                    match poll_write_some(cx, destination, &frame[self.inject_pos..]) {
                        Poll::Ready(Ok(written)) => {
                            self.inject_pos += written;
                            self.needs_flush = true;
                            if self.inject_pos == frame.len() {
                                self.inject = None;
                                self.closed_toward_destination = true;
                            }
                            continue;
                        }
                        Poll::Ready(Err(stop)) => return Poll::Ready(stop),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            // Uninitialised: zeroing 16 KiB on every read attempt would cost more than the
            // rest of the pump's work per message.
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut read_buf = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut *source).poll_read(cx, &mut read_buf) {
                Poll::Ready(Ok(())) => {
                    let data = read_buf.filled();
                    if data.is_empty() {
                        return Poll::Ready(Stop::SourceEnded(None));
                    }
                    self.last_read = Instant::now();
                    let (forward, result) = self.accept(data);
                    // What precedes a bad frame still goes out, then the Close of ours.
                    if let Err(stop) = self.send_or_keep(cx, destination, &data[..forward]) {
                        return Poll::Ready(stop);
                    }
                    if let Err(error) = result {
                        return Poll::Ready(Stop::Protocol(error));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Stop::SourceEnded(Some(e))),
                Poll::Pending => {
                    if self.needs_flush {
                        match Pin::new(&mut *destination).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.needs_flush = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Stop::DestinationFailed(e)),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
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

fn record(
    stats: &mut DirectionStats,
    close_seen: &mut Option<(CloseFrame, Instant)>,
    event: FrameEvent,
) {
    match event {
        FrameEvent::Frame { .. } => stats.frames += 1,
        FrameEvent::MessageEnd => stats.messages += 1,
        FrameEvent::Close(close) => {
            close_seen.get_or_insert((close, Instant::now()));
        }
    }
}

/// Requests from outside the pump: the drain of the whole gateway.
pub(crate) type DrainSignal = watch::Receiver<bool>;

/// Pumps `client` and `upstream` until the connection ends, and says how it ended.
///
/// `upstream_preread` holds bytes the upstream sent right behind its 101, read with the
/// handshake; they go to the client first.
pub(crate) async fn pump(
    mut client: Socket,
    mut upstream: Socket,
    upstream_preread: &[u8],
    deflate: bool,
    mut drain: DrainSignal,
    settings: &PumpSettings,
    metrics: &ConnectionMetrics,
) -> ConnectionOutcome {
    let started = Instant::now();
    let max = settings.max_message_bytes;
    let mut c2u = Direction::new(
        Sender::Client,
        deflate,
        max,
        metrics.client_to_upstream.clone(),
        started,
    );
    let mut u2c = Direction::new(
        Sender::Server,
        deflate,
        max,
        metrics.upstream_to_client.clone(),
        started,
    );
    let mut gateway_close: Option<(u16, usize, Instant)> = None;
    let mut ended: Option<(Initiator, Option<DropKind>)> = None;
    let mut protocol_error = None;

    if !upstream_preread.is_empty() {
        let (forward, result) = u2c.accept(upstream_preread);
        u2c.pending.extend_from_slice(&upstream_preread[..forward]);
        protocol_error = result.err();
    }

    if let Some(error) = protocol_error {
        close_both(
            &mut c2u,
            &mut u2c,
            &mut gateway_close,
            error.close_code(),
            error.kind(),
        );
    }

    // Made once, not on every wake-up: a fresh drain waiter and timer per turn of the loop
    // would take the watch's and the timer wheel's locks twice for every frame.
    let drain_requested = async move {
        // The sender gone (the gateway stopping) counts as a drain too.
        let _ = drain.wait_for(|draining| *draining).await;
    }
    .fuse();
    tokio::pin!(drain_requested);
    let idle_timeout = settings.idle_timeout.unwrap_or_default();
    let idle_timer = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle_timer);
    let closing_timer = tokio::time::sleep(settings.close_timeout);
    tokio::pin!(closing_timer);
    let mut closing_started = false;

    loop {
        // Once anyone has sent a Close, the handshake gets `close_timeout` to finish.
        let closing =
            gateway_close.is_some() || c2u.close_seen.is_some() || u2c.close_seen.is_some();
        if closing && !closing_started {
            closing_started = true;
            closing_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + settings.close_timeout);
        }
        let stop = tokio::select! {
            biased;
            () = &mut drain_requested, if gateway_close.is_none() => {
                close_both(&mut c2u, &mut u2c, &mut gateway_close, 1001, "gateway shutting down");
                continue;
            }
            () = &mut idle_timer, if settings.idle_timeout.is_some() && !closing => {
                // Reads do not move the timer; when it fires, it is set again for the
                // deadline of the last read, if that is still ahead.
                let last_read = c2u.last_read.max(u2c.last_read);
                let deadline = tokio::time::Instant::from_std(last_read + idle_timeout);
                if deadline > tokio::time::Instant::now() {
                    idle_timer.as_mut().reset(deadline);
                } else {
                    close_both(&mut c2u, &mut u2c, &mut gateway_close, 1001, "idle timeout");
                }
                continue;
            }
            () = &mut closing_timer, if closing_started => break,
            wake = poll_fn(|cx| poll_both(cx, &mut c2u, &mut u2c, &mut client, &mut upstream)) => wake,
        };
        let Wake::Stopped(side, stop) = stop else {
            continue;
        };
        match stop {
            Stop::SourceEnded(error) => {
                let source_closed = match side {
                    Initiator::Client => c2u.close_seen.is_some(),
                    _ => u2c.close_seen.is_some(),
                };
                if !source_closed && ended.is_none() {
                    ended = Some((
                        side,
                        Some(error.as_ref().map_or(DropKind::Eof, DropKind::of)),
                    ));
                }
            }
            Stop::DestinationFailed(error) => {
                let dest = if side == Initiator::Client {
                    Initiator::Upstream
                } else {
                    Initiator::Client
                };
                let dest_closed = match dest {
                    Initiator::Client => c2u.close_seen.is_some(),
                    _ => u2c.close_seen.is_some(),
                };
                if !dest_closed && ended.is_none() {
                    ended = Some((dest, Some(DropKind::of(&error))));
                }
            }
            Stop::Protocol(error) => {
                protocol_error = Some(error);
                close_both(
                    &mut c2u,
                    &mut u2c,
                    &mut gateway_close,
                    error.close_code(),
                    error.kind(),
                );
            }
        }
        break;
    }

    // Tell the side still there why the other went, then give the queued frames a moment.
    if let Some((side, Some(_))) = ended {
        match side {
            Initiator::Upstream => u2c.queue_close(close_frame(
                settings.upstream_lost_code,
                "upstream connection lost",
                None,
            )),
            _ => c2u.queue_close(close_frame(
                1001,
                "client connection lost",
                Some(mask_key()),
            )),
        }
    }
    let flush_deadline =
        tokio::time::Instant::now() + settings.close_timeout.min(Duration::from_secs(1));
    let _ = tokio::time::timeout_at(flush_deadline, async {
        if ended.map(|(s, _)| s) != Some(Initiator::Client) {
            let _ = flush_injection(&mut u2c, &mut client).await;
        }
        if ended.map(|(s, _)| s) != Some(Initiator::Upstream) {
            let _ = flush_injection(&mut c2u, &mut upstream).await;
        }
    })
    .await;
    let _ = tokio::time::timeout_at(flush_deadline, client.shutdown()).await;
    let _ = tokio::time::timeout_at(flush_deadline, upstream.shutdown()).await;

    outcome(started, &c2u, &u2c, gateway_close, ended, protocol_error)
}

/// Queues a Close of the gateway's own toward both sides and records it.
fn close_both(
    c2u: &mut Direction,
    u2c: &mut Direction,
    gateway_close: &mut Option<(u16, usize, Instant)>,
    code: u16,
    reason: &str,
) {
    u2c.queue_close(close_frame(code, reason, None));
    c2u.queue_close(close_frame(code, reason, Some(mask_key())));
    gateway_close.get_or_insert((code, reason.len().min(123), Instant::now()));
}

/// What woke the pump's loop.
enum Wake {
    Stopped(Initiator, Stop),
    /// A side sent its first Close: the closing deadline starts.
    CloseSeen,
}

/// Polls both directions; the first to stop says which side's stream it was reading.
fn poll_both(
    cx: &mut Context<'_>,
    c2u: &mut Direction,
    u2c: &mut Direction,
    client: &mut Socket,
    upstream: &mut Socket,
) -> Poll<Wake> {
    if let Poll::Ready(stop) = c2u.poll_step(cx, client, upstream) {
        return Poll::Ready(Wake::Stopped(Initiator::Client, stop));
    }
    if let Poll::Ready(stop) = u2c.poll_step(cx, upstream, client) {
        return Poll::Ready(Wake::Stopped(Initiator::Upstream, stop));
    }
    for direction in [c2u, u2c] {
        if direction.close_seen.is_some() && !direction.close_reported {
            direction.close_reported = true;
            return Poll::Ready(Wake::CloseSeen);
        }
    }
    Poll::Pending
}

/// Writes whatever is still buffered for the destination, then the queued frame of ours,
/// if it can go out between frames.
async fn flush_injection(direction: &mut Direction, destination: &mut Socket) -> io::Result<()> {
    if direction.pending_pos < direction.pending.len() {
        destination
            .write_all(&direction.pending[direction.pending_pos..])
            .await?;
        direction.pending_pos = direction.pending.len();
    }
    if direction.can_inject() {
        if let Some(frame) = direction.inject.take() {
            destination
                .write_all(&frame[direction.inject_pos..])
                .await?;
            direction.closed_toward_destination = true;
        }
    }
    destination.flush().await
}

fn outcome(
    started: Instant,
    c2u: &Direction,
    u2c: &Direction,
    gateway_close: Option<(u16, usize, Instant)>,
    ended: Option<(Initiator, Option<DropKind>)>,
    protocol_error: Option<ProtocolError>,
) -> ConnectionOutcome {
    let close_code = |c: &CloseFrame| c.code.unwrap_or(1005);
    let mut closes: Vec<(Initiator, u16, usize, Instant)> = Vec::with_capacity(3);
    if let Some((c, at)) = c2u.close_seen {
        closes.push((Initiator::Client, close_code(&c), c.reason_len, at));
    }
    if let Some((c, at)) = u2c.close_seen {
        closes.push((Initiator::Upstream, close_code(&c), c.reason_len, at));
    }
    if let Some((code, reason_len, at)) = gateway_close {
        closes.push((Initiator::Gateway, code, reason_len, at));
    }
    closes.sort_by_key(|c| c.3);
    let (initiator, code, reason_len, drop_kind) = match (closes.first(), ended) {
        (Some(&(who, code, len, _)), _) => (who, code, len, None),
        (None, Some((side, kind))) => (side, 1006, 0, kind),
        (None, None) => (Initiator::Gateway, 1006, 0, None),
    };
    ConnectionOutcome {
        initiator,
        code,
        reason_len,
        answered: closes.len() > 1,
        drop_kind,
        protocol_error,
        duration: started.elapsed(),
        client_to_upstream: c2u.stats,
        upstream_to_client: u2c.stats,
    }
}

/// A masking key for frames toward the upstream. RFC 6455 asks for unpredictable keys so
/// that a client cannot steer the bytes on the wire; a per-process random seed stepped by
/// a counter through splitmix64 gives that without a crypto dependency on the hot path.
fn mask_key() -> [u8; 4] {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let state = std::collections::hash_map::RandomState::new();
        std::hash::BuildHasher::hash_one(&state, std::process::id())
    });
    let mut z = seed.wrapping_add(COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let bytes = (z ^ (z >> 31)).to_le_bytes();
    [bytes[0], bytes[1], bytes[2], bytes[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame::tests::frame;
    use crate::websocket::metrics::WebSocketMetrics;
    use tokio::io::AsyncReadExt;

    /// Through pipes of 64 bytes, nearly every write is partial: what the destination has not
    /// taken is kept and sent in order, and the Close handshake still completes.
    #[tokio::test]
    async fn a_slow_destination_gets_every_byte_in_order() {
        let (client_side, mut client) = tokio::io::duplex(64);
        let (upstream_side, mut upstream) = tokio::io::duplex(64);
        let metrics = WebSocketMetrics::new();
        let connection = metrics.connection_opened("test");
        let (_drain_sender, drain) = watch::channel(false);
        let settings = PumpSettings {
            idle_timeout: None,
            close_timeout: Duration::from_secs(5),
            max_message_bytes: None,
            upstream_lost_code: 1011,
        };
        let pumping = tokio::spawn(async move {
            pump(
                Socket::Layered(Box::new(client_side)),
                Socket::Layered(Box::new(upstream_side)),
                b"",
                false,
                drain,
                &settings,
                &connection,
            )
            .await
        });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = frame(true, 0, 0x2, &payload, None);
        sent.extend(close_frame(1000, "done", None));
        let expected = sent.clone();
        let upstream_task = tokio::spawn(async move {
            upstream.write_all(&sent).await.expect("upstream writes");
            // The client's Close answer arrives; then the upstream hangs up.
            let mut answer = [0u8; 64];
            let n = upstream.read(&mut answer).await.expect("answer");
            n > 0
        });
        let mut received = vec![0u8; expected.len()];
        for chunk in received.chunks_mut(1000) {
            client.read_exact(chunk).await.expect("client reads");
        }
        assert!(
            received == expected,
            "bytes changed or reordered on the way"
        );
        client
            .write_all(&close_frame(1000, "", Some([1, 2, 3, 4])))
            .await
            .expect("client answers");
        assert!(upstream_task.await.expect("upstream task"));
        let outcome = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump ends")
            .expect("pump task");
        assert_eq!(
            (outcome.initiator, outcome.code, outcome.answered),
            (Initiator::Upstream, 1000, true)
        );
        assert_eq!(outcome.upstream_to_client.bytes, expected.len() as u64);
        assert_eq!(outcome.upstream_to_client.messages, 1);
    }
}
