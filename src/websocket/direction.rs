//! One direction of the pump: bytes read from a source, parsed by a [`FrameParser`], written
//! to the destination, with frames of the gateway's own (a Close, a heartbeat Ping) put in
//! between two frames and the Pongs that answer the gateway's Pings taken out.

use super::frame::{
    mask_key, CloseFrame, Feed, FrameEvent, FrameParser, ProtocolError, Sender, MAX_CONTROL_FRAME,
};
use super::heartbeat::{is_gateway_pong, PingFrame};
use super::metrics::DirectionCounters;
use super::outcome::DirectionStats;
use super::socket::Socket;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read per direction at once, into a buffer on the stack: an idle connection holds
/// no read buffer at all, only what a slow destination has not taken yet.
const READ_SIZE: usize = 16 * 1024;

/// Why a direction stopped.
pub(crate) enum Stop {
    SourceEnded(Option<io::Error>),
    DestinationFailed(io::Error),
    Protocol(ProtocolError),
}

/// What goes toward the destination: written at once as far as it takes it, the rest kept
/// in order.
pub(crate) struct Outbox {
    /// `pending[pos..]` was meant for the destination but it has not taken it yet; empty
    /// (and unallocated after a burst) while the destination keeps up.
    pending: Vec<u8>,
    pos: usize,
    needs_flush: bool,
    /// While a heartbeat Ping toward the destination is unanswered: when the destination
    /// last took bytes (one that still takes them is still there).
    watching: bool,
    pub(crate) progress: Instant,
}

/// Where [`Direction::ingest`] sends what may go on: to the destination now, or (bytes read
/// with the handshake, before the pump runs) kept for it.
pub(crate) enum Sink<'a, 'b> {
    Now {
        cx: &'a mut Context<'b>,
        destination: &'a mut Socket,
    },
    Later,
}

impl Outbox {
    fn new(now: Instant) -> Self {
        Outbox {
            pending: Vec::new(),
            pos: 0,
            needs_flush: false,
            watching: false,
            progress: now,
        }
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.pos < self.pending.len()
    }

    fn wrote(&mut self) {
        self.needs_flush = true;
        if self.watching {
            self.progress = Instant::now();
        }
    }

    /// Sends `bytes` after anything kept before them.
    fn emit(&mut self, sink: &mut Sink<'_, '_>, mut bytes: &[u8]) -> Result<(), Stop> {
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
    fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        destination: &mut Socket,
    ) -> Poll<Result<(), Stop>> {
        while self.has_pending() {
            match poll_write_some(cx, destination, &self.pending[self.pos..]) {
                Poll::Ready(Ok(written)) => {
                    self.pos += written;
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

    /// Writes what was kept, to the end (after the pump's loop).
    pub(crate) async fn drain(&mut self, destination: &mut Socket) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if self.has_pending() {
            destination.write_all(&self.pending[self.pos..]).await?;
            self.pos = self.pending.len();
        }
        Ok(())
    }
}

/// One direction: bytes read from `source`, parsed, written to the other side.
pub(crate) struct Direction {
    pub(crate) parser: FrameParser,
    pub(crate) out: Outbox,
    /// A Close of the gateway's own, waiting for a frame boundary.
    close: Option<Vec<u8>>,
    /// A heartbeat Ping of the gateway's own is due, at the next frame boundary.
    ping_due: bool,
    pings_sent: u32,
    /// The destination is a server: the gateway's frames toward it are masked.
    toward_server: bool,
    /// A Close has gone toward the destination: later bytes are read but not forwarded.
    pub(crate) closed_toward_destination: bool,
    /// The source sent a Close (and when).
    pub(crate) close_seen: Option<(CloseFrame, Instant)>,
    /// The pump's loop has been woken for `close_seen`, to start the closing deadline.
    pub(crate) close_reported: bool,
    /// The source answered a Ping of the gateway's since the pump's loop last looked: the
    /// next Ping is timed from now.
    pub(crate) answered: bool,
    pub(crate) stats: DirectionStats,
    /// Live metric handles, resolved once per connection.
    counters: DirectionCounters,
    /// When the source last sent anything: its sign of life, for heartbeats.
    pub(crate) last_read: Instant,
    /// When the source last sent more than answers to the gateway's Pings: activity, for
    /// `idle_timeout`, which the heartbeat must not keep alive.
    pub(crate) last_traffic: Instant,
}

impl Direction {
    pub(crate) fn new(
        sender: Sender,
        deflate: bool,
        max_message: Option<u64>,
        counters: DirectionCounters,
        now: Instant,
    ) -> Self {
        Direction {
            parser: FrameParser::new(sender, deflate).with_max_message(max_message),
            out: Outbox::new(now),
            close: None,
            ping_due: false,
            pings_sent: 0,
            toward_server: sender == Sender::Client,
            closed_toward_destination: false,
            close_seen: None,
            close_reported: false,
            answered: false,
            stats: DirectionStats::default(),
            counters,
            last_read: now,
            last_traffic: now,
        }
    }

    /// Whether a frame of the gateway's own may go to the destination now: what went out so
    /// far ends between two frames (also before a held Pong, and after a malformed frame that
    /// was held back whole).
    pub(crate) fn between_frames(&self) -> bool {
        !self.closed_toward_destination
            && (self.parser.at_frame_boundary()
                || self.parser.holding_pong()
                || self.parser.failed_frame_began_in_last_chunk())
    }

    /// Queues a Close of the gateway's own toward the destination, unless one went already.
    /// A Ping not yet sent is dropped: nothing may follow the Close.
    pub(crate) fn queue_close(&mut self, frame: Vec<u8>) {
        if !self.closed_toward_destination && self.close.is_none() {
            self.close = Some(frame);
            self.ping_due = false;
        }
    }

    /// The Close of the gateway's own still waiting for a frame boundary, if any.
    pub(crate) fn take_queued_close(&mut self) -> Option<Vec<u8>> {
        self.close.take()
    }

    /// Queues a heartbeat Ping toward the destination and watches for its answer.
    pub(crate) fn queue_ping(&mut self, now: Instant) {
        if !self.closed_toward_destination && self.close.is_none() {
            self.ping_due = true;
        }
        self.watch_destination(true, now);
    }

    /// Starts or stops recording when the destination takes bytes.
    pub(crate) fn watch_destination(&mut self, on: bool, now: Instant) {
        if on && !self.out.watching {
            self.out.progress = now;
        }
        self.out.watching = on;
    }

    /// Sends the frame of the gateway's own that waits, if any; the caller has checked that
    /// the destination is between two frames.
    fn send_own_frame(&mut self, sink: &mut Sink<'_, '_>) -> Result<(), Stop> {
        if let Some(close) = self.close.take() {
            self.closed_toward_destination = true;
            self.ping_due = false;
            self.out.emit(sink, &close)
        } else if self.ping_due {
            self.ping_due = false;
            self.pings_sent = self.pings_sent.wrapping_add(1);
            let ping = PingFrame::new(self.pings_sent, self.toward_server.then(mask_key));
            self.out.emit(sink, ping.as_bytes())
        } else {
            Ok(())
        }
    }

    /// Whether a Ping of ours waits only for the source to finish the frame in progress:
    /// the destination has taken everything, so the wait is not its fault.
    pub(crate) fn ping_waits_on_source(&self) -> bool {
        self.ping_due && !self.out.has_pending()
    }

    fn own_frame_waits(&self) -> bool {
        self.close.is_some() || self.ping_due
    }

    /// Parses freshly read `data` and sends on what may go to the destination, in order: a
    /// frame of the gateway's own goes in at the first boundary between two frames, a Pong
    /// answering the gateway's Ping is taken out, and nothing of a malformed frame goes on.
    /// Returns whether `data` held more than such Pongs.
    pub(crate) fn ingest(&mut self, data: &[u8], sink: &mut Sink<'_, '_>) -> Result<bool, Stop> {
        let messages_before = self.stats.messages;
        self.stats.bytes += data.len() as u64;
        self.counters.bytes.inc_by(data.len() as u64);
        let result = self.ingest_frames(data, sink);
        self.counters
            .messages
            .inc_by(self.stats.messages - messages_before);
        result
    }

    fn ingest_frames(&mut self, mut data: &[u8], sink: &mut Sink<'_, '_>) -> Result<bool, Stop> {
        let mut traffic = false;
        loop {
            if self.close_seen.is_some() {
                // Nothing may follow a Close frame: read, counted, dropped.
                return Ok(true);
            }
            if self.own_frame_waits() && self.between_frames() {
                self.send_own_frame(sink)?;
            }
            if data.is_empty() {
                return Ok(traffic);
            }
            let forwarding = !self.closed_toward_destination;
            if self.parser.holding_pong() {
                let (used, feed) = self.feed(data, false);
                if let Feed::Error { error, .. } = feed {
                    return Err(Stop::Protocol(error));
                }
                data = &data[used..];
                if self.parser.holding_pong() {
                    continue;
                }
                if is_gateway_pong(self.parser.pong_payload()) {
                    self.answered = true;
                } else {
                    // Not an answer to the gateway: it goes on as it came.
                    traffic = true;
                    if forwarding {
                        let mut frame = [0u8; MAX_CONTROL_FRAME];
                        let len = self.parser.held_pong_frame(&mut frame);
                        self.out.emit(sink, &frame[..len])?;
                    }
                }
                continue;
            }
            // With a frame of ours waiting, stop at the first boundary to send it there.
            let (used, feed) = self.feed(data, forwarding && self.own_frame_waits());
            let (fine, error) = match feed {
                Feed::Ok => (used, None),
                Feed::Error { offset, error } => (offset, Some(error)),
            };
            if forwarding {
                // What precedes a bad frame still goes out, then the Close of ours.
                self.out.emit(sink, &data[..fine])?;
            }
            if let Some(error) = error {
                return Err(Stop::Protocol(error));
            }
            traffic |= used > 0;
            data = &data[used..];
            if self.close_seen.is_some() {
                // The source's own Close went out with these bytes; nothing of ours follows.
                self.closed_toward_destination = true;
                self.close = None;
                self.ping_due = false;
            }
        }
    }

    fn feed(&mut self, data: &[u8], stop_at_boundary: bool) -> (usize, Feed) {
        let (stats, close_seen) = (&mut self.stats, &mut self.close_seen);
        self.parser
            .feed_to_boundary(data, stop_at_boundary, |event| {
                record(stats, close_seen, event)
            })
    }

    /// Drives this direction until it needs to wait, or stops.
    pub(crate) fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Socket,
        destination: &mut Socket,
    ) -> Poll<Stop> {
        loop {
            match self.out.poll_drain(cx, destination) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(stop)) => return Poll::Ready(stop),
                Poll::Pending => return Poll::Pending,
            }
            if self.own_frame_waits() && self.between_frames() {
                let mut sink = Sink::Now {
                    cx: &mut *cx,
                    destination: &mut *destination,
                };
                if let Err(stop) = self.send_own_frame(&mut sink) {
                    return Poll::Ready(stop);
                }
                continue;
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
                    let now = Instant::now();
                    self.last_read = now;
                    let mut sink = Sink::Now {
                        cx: &mut *cx,
                        destination: &mut *destination,
                    };
                    match self.ingest(data, &mut sink) {
                        Ok(true) => self.last_traffic = now,
                        Ok(false) => {}
                        Err(stop) => return Poll::Ready(stop),
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Stop::SourceEnded(Some(e))),
                Poll::Pending => {
                    if self.out.needs_flush {
                        match Pin::new(&mut *destination).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.out.needs_flush = false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame::close_frame;
    use crate::websocket::frame::tests::frame;
    use crate::websocket::heartbeat::PING_PREFIX;
    use crate::websocket::metrics::WebSocketMetrics;

    const KEY: Option<[u8; 4]> = Some([9, 8, 7, 6]);
    const OP_TEXT: u8 = 0x1;
    const OP_CONTINUATION: u8 = 0x0;
    const OP_PONG: u8 = 0xA;

    fn direction(sender: Sender) -> Direction {
        let metrics = WebSocketMetrics::new();
        let counters = metrics.connection_opened("test").client_to_upstream.clone();
        Direction::new(sender, false, None, counters, Instant::now())
    }

    fn gateway_pong(counter: u32, mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut payload = PING_PREFIX.to_vec();
        payload.extend_from_slice(&counter.to_be_bytes());
        frame(true, 0, OP_PONG, &payload, mask)
    }

    /// Feeds `chunks` in order; returns what went on toward the destination and, per chunk,
    /// whether it counted as traffic.
    fn run(d: &mut Direction, chunks: &[&[u8]]) -> (Vec<u8>, Vec<bool>) {
        let traffic = chunks
            .iter()
            .map(|chunk| match d.ingest(chunk, &mut Sink::Later) {
                Ok(traffic) => traffic,
                Err(_) => panic!("a valid stream was refused"),
            })
            .collect();
        (d.out.pending[d.out.pos..].to_vec(), traffic)
    }

    #[test]
    fn pongs_answering_the_gateway_are_cut_wherever_the_reads_split() {
        let a = frame(true, 0, OP_TEXT, b"a", KEY);
        let ours = gateway_pong(1, KEY);
        let b = frame(true, 0, OP_TEXT, b"b", KEY);
        let theirs = frame(true, 0, OP_PONG, b"client's own", KEY);
        let stream = [a.clone(), ours.clone(), b.clone(), theirs.clone()].concat();
        let expected = [a, b, theirs].concat();
        for cut in 0..=stream.len() {
            for second in cut..=stream.len() {
                let mut d = direction(Sender::Client);
                d.parser.hold_pongs();
                let chunks = [&stream[..cut], &stream[cut..second], &stream[second..]];
                let (forwarded, _) = run(&mut d, &chunks);
                assert_eq!(forwarded, expected, "cuts at {cut} and {second}");
            }
        }
        // A read that is only the gateway's Pong is no traffic for `idle_timeout`.
        let mut d = direction(Sender::Client);
        d.parser.hold_pongs();
        let (forwarded, traffic) = run(&mut d, &[&ours[..3], &ours[3..]]);
        assert!(forwarded.is_empty());
        assert_eq!(traffic, [false, false]);
    }

    #[test]
    fn without_a_ping_sent_pongs_pass_untouched() {
        let mut d = direction(Sender::Server);
        let ours = gateway_pong(1, None);
        assert_eq!(run(&mut d, &[&ours]).0, ours);
    }

    /// The Ping goes where the first frame ends, between two fragments of a message, never
    /// inside a frame; toward a server it is masked.
    #[test]
    fn pings_go_between_frames_never_inside_one() {
        for sender in [Sender::Server, Sender::Client] {
            let mask = (sender == Sender::Client).then_some([1, 2, 3, 4]);
            let first = frame(false, 0, OP_TEXT, b"hel", mask);
            let second = frame(true, 0, OP_CONTINUATION, b"lo", mask);
            let mut d = direction(sender);
            let (half, rest) = first.split_at(4);
            d.ingest(half, &mut Sink::Later).ok();
            d.queue_ping(Instant::now());
            let tail = [rest, &second].concat();
            let (forwarded, _) = run(&mut d, &[&tail]);
            assert_eq!(forwarded[..first.len()], first[..]);
            let ping = &forwarded[first.len()..forwarded.len() - second.len()];
            assert_eq!(ping[0], 0x89, "a Ping right after the first fragment");
            assert_eq!(ping[1] & 0x80 != 0, mask.is_some(), "masked toward servers");
            assert_eq!(forwarded[forwarded.len() - second.len()..], second[..]);
            let mut check = FrameParser::new(sender, false);
            assert_eq!(check.feed(&forwarded, |_| {}), Feed::Ok);
            assert!(check.at_frame_boundary());
        }
    }

    #[test]
    fn a_ping_due_at_a_boundary_goes_first() {
        let mut d = direction(Sender::Server);
        d.queue_ping(Instant::now());
        let text = frame(true, 0, OP_TEXT, b"x", None);
        let (forwarded, _) = run(&mut d, &[&text]);
        assert_eq!(forwarded[..2], [0x89, 10]);
        assert_eq!(forwarded[12..], text[..]);
    }

    /// A Close of the gateway's goes at the first boundary; nothing read after it goes on,
    /// even when a later read completes a frame that began after the boundary.
    #[test]
    fn a_queued_close_ends_forwarding_at_the_first_boundary() {
        let a = frame(true, 0, OP_TEXT, &[b'a'; 40], None);
        let b = frame(true, 0, OP_TEXT, &[b'b'; 40], None);
        let c = frame(true, 0, OP_TEXT, b"c", None);
        let close = close_frame(1001, "gateway shutting down", None);
        let mut d = direction(Sender::Server);
        d.ingest(&a[..10], &mut Sink::Later).ok();
        d.queue_close(close.clone());
        let middle = [&a[10..], &b[..10]].concat();
        let end = [&b[10..], &c[..]].concat();
        let (forwarded, _) = run(&mut d, &[&middle, &end]);
        assert_eq!(forwarded, [a, close].concat());
        assert!(d.closed_toward_destination);
    }

    /// The source's own Close ends forwarding; a Ping of ours no longer goes.
    #[test]
    fn nothing_of_ours_follows_the_sources_close() {
        let mut d = direction(Sender::Server);
        let partial = frame(true, 0, OP_TEXT, b"abcdef", None);
        d.ingest(&partial[..3], &mut Sink::Later).ok();
        d.queue_ping(Instant::now());
        let close = close_frame(1000, "", None);
        let rest = [&partial[3..], &close[..]].concat();
        let (forwarded, _) = run(&mut d, &[&rest]);
        // The Ping went at the boundary before the Close, and nothing after it.
        assert_eq!(forwarded[..partial.len()], partial[..]);
        assert_eq!(forwarded[partial.len()], 0x89);
        assert!(forwarded.ends_with(&close));
        d.queue_ping(Instant::now());
        assert!(!d.own_frame_waits());
    }
}
