//! One direction of the pump: bytes read from a source, parsed by a [`FrameParser`], written
//! to the destination, with frames of the gateway's own (a Close, a heartbeat Ping) put in
//! between two frames and the Pongs that answer the gateway's Pings taken out.

use super::frame::{
    mask_key, CloseFrame, Feed, FrameEvent, FrameParser, Sender, MAX_CONTROL_FRAME,
};
use super::heartbeat::{is_gateway_pong, Beat, Heartbeat, PeerWatch, PingFrame};
use super::metrics::DirectionCounters;
use super::outbox::{Outbox, Sink, Stop};
use super::outcome::DirectionStats;
use super::rate_limit::{agent_close, ConnectionLimiter, Verdict};
use super::socket::Socket;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read per direction at once, into a buffer on the stack: an idle connection holds
/// no read buffer at all, only what a slow destination has not taken yet.
const READ_SIZE: usize = 16 * 1024;

/// One direction: bytes read from `source`, parsed, written to the other side.
///
/// Two of these are most of an open connection's task, which every idle WebSocket keeps:
/// what only a closing connection needs is boxed in [`Closing`].
pub(crate) struct Direction {
    pub(crate) parser: FrameParser,
    pub(crate) out: Outbox,
    /// The Closes: none while open.
    closing: Option<Box<Closing>>,
    /// A heartbeat Ping of the gateway's own is due, at the next frame boundary.
    ping_due: bool,
    pings_sent: u32,
    /// The destination is a server: the gateway's frames toward it are masked.
    toward_server: bool,
    /// A Close has gone toward the destination: later bytes are read but not forwarded.
    pub(crate) closed_toward_destination: bool,
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

/// The Closes of a direction, once there is one.
#[derive(Default)]
struct Closing {
    /// A Close of the gateway's own, waiting for a frame boundary.
    queued: Option<Vec<u8>>,
    /// The source sent a Close (and when).
    seen: Option<(CloseFrame, Instant)>,
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
            closing: None,
            ping_due: false,
            pings_sent: 0,
            toward_server: sender == Sender::Client,
            closed_toward_destination: false,
            close_reported: false,
            answered: false,
            stats: DirectionStats::default(),
            counters,
            last_read: now,
            last_traffic: now,
        }
    }

    /// The Close the source sent, and when, if it did.
    pub(crate) fn close_seen(&self) -> Option<(CloseFrame, Instant)> {
        self.closing.as_ref().and_then(|c| c.seen)
    }

    fn close_queued(&self) -> bool {
        self.closing.as_ref().is_some_and(|c| c.queued.is_some())
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
        if !self.closed_toward_destination && !self.close_queued() {
            self.closing.get_or_insert_with(Box::default).queued = Some(frame);
            self.ping_due = false;
        }
    }

    /// The Close of the gateway's own still waiting for a frame boundary, if any.
    pub(crate) fn take_queued_close(&mut self) -> Option<Vec<u8>> {
        self.closing.as_mut().and_then(|c| c.queued.take())
    }

    /// Queues a heartbeat Ping toward the destination and watches for its answer.
    pub(crate) fn queue_ping(&mut self, now: Instant) {
        if !self.closed_toward_destination && !self.close_queued() {
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
        if let Some(close) = self.take_queued_close() {
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
        self.ping_due || self.close_queued()
    }

    /// Parses freshly read `data` and sends on what may go to the destination, in order: a
    /// frame of the gateway's own goes in at the first boundary between two frames, a Pong
    /// answering the gateway's Ping is taken out, and nothing of a malformed frame goes on.
    /// Returns whether `data` held more than such Pongs.
    pub(crate) fn ingest(&mut self, data: &[u8], sink: &mut Sink<'_, '_>) -> Result<bool, Stop> {
        self.ingest_with(data, sink, None)
            .map(|ingested| ingested.traffic)
    }

    /// [`Self::ingest`] under rate limits: a data message goes on only once `limiter` has
    /// charged it, and the bytes from one that must wait are not taken (`held`).
    fn ingest_with(
        &mut self,
        data: &[u8],
        sink: &mut Sink<'_, '_>,
        limiter: Option<&mut ConnectionLimiter>,
    ) -> Result<Ingested, Stop> {
        let messages_before = self.stats.messages;
        let result = self.ingest_frames(data, sink, limiter);
        // Bytes held back are counted when they are taken.
        let taken = data.len() - result.as_ref().map_or(0, |i| i.held);
        self.stats.bytes += taken as u64;
        self.counters.bytes.inc_by(taken as u64);
        self.counters
            .messages
            .inc_by(self.stats.messages - messages_before);
        result
    }

    fn ingest_frames(
        &mut self,
        mut data: &[u8],
        sink: &mut Sink<'_, '_>,
        mut limiter: Option<&mut ConnectionLimiter>,
    ) -> Result<Ingested, Stop> {
        let mut traffic = false;
        loop {
            if self.close_seen().is_some() {
                // Nothing may follow a Close frame: read, counted, dropped.
                return Ok(Ingested::all(true));
            }
            if self.own_frame_waits() && self.between_frames() {
                self.send_own_frame(sink)?;
            }
            if data.is_empty() {
                return Ok(Ingested::all(traffic));
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
            let stop_at_boundary = forwarding && self.own_frame_waits();
            let (used, feed, held) = match limiter.as_deref_mut() {
                None => {
                    let (used, feed) = self.feed(data, stop_at_boundary);
                    (used, feed, false)
                }
                Some(limiter) => self.feed_charged(data, stop_at_boundary, limiter, forwarding),
            };
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
            if self.close_seen().is_some() {
                // The source's own Close went out with these bytes; nothing of ours follows.
                self.closed_toward_destination = true;
                self.take_queued_close();
                self.ping_due = false;
            }
            if held {
                return Ok(Ingested {
                    traffic,
                    held: data.len(),
                });
            }
        }
    }

    /// [`Self::feed`] with each data message charged to `limiter` as it begins, over as many
    /// messages as it lets through, so that they go on in one write. Also says whether it
    /// stopped before a message the limiter holds back (throttle). Over a limit with `close`,
    /// it stops before the message, with the Close of ours queued to go there.
    fn feed_charged(
        &mut self,
        data: &[u8],
        stop_at_boundary: bool,
        limiter: &mut ConnectionLimiter,
        forwarding: bool,
    ) -> (usize, Feed, bool) {
        let mut used = 0;
        loop {
            let (n, feed) = self.feed(&data[used..], stop_at_boundary);
            let base = used;
            used += n;
            if let Feed::Error { offset, error } = feed {
                let offset = base + offset;
                return (used, Feed::Error { offset, error }, false);
            }
            if !self.parser.at_message_gate() {
                return (used, feed, false);
            }
            // After a Close toward the destination nothing goes on: nothing to charge.
            let verdict = if forwarding {
                limiter.admit_message()
            } else {
                Verdict::Pass
            };
            match verdict {
                Verdict::Pass => self.parser.open_gate(),
                Verdict::Close => {
                    self.queue_close(agent_close(self.toward_server));
                    self.parser.open_gate();
                    return (used, feed, false);
                }
                Verdict::Throttle => return (used, feed, true),
            }
        }
    }

    fn feed(&mut self, data: &[u8], stop_at_boundary: bool) -> (usize, Feed) {
        let (stats, closing) = (&mut self.stats, &mut self.closing);
        self.parser
            .feed_to_boundary(data, stop_at_boundary, |event| {
                record(stats, closing, event)
            })
    }

    /// Drives this direction until it needs to wait, or stops. `limiter`: the rate limits on
    /// what the source sends (the client's), if any.
    pub(crate) fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Socket,
        destination: &mut Socket,
        mut limiter: Option<&mut ConnectionLimiter>,
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
            let mut read_size = READ_SIZE;
            if let Some(limiter) = limiter.as_deref_mut() {
                match self.before_read(cx, destination, limiter) {
                    Limited::Read(size) => read_size = size,
                    Limited::Fed => continue,
                    Limited::Wait => return self.poll_flush_idle(cx, destination),
                    Limited::Stop(stop) => return Poll::Ready(stop),
                }
            }
            // Uninitialised: zeroing 16 KiB on every read attempt would cost more than the
            // rest of the pump's work per message.
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut read_buf = ReadBuf::uninit(&mut scratch[..read_size]);
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
                    let ingested = match limiter.as_deref_mut() {
                        None => self.ingest_with(data, &mut sink, None),
                        Some(limiter) => self.ingest_read(data, &mut sink, limiter),
                    };
                    match ingested {
                        Ok(ingested) if ingested.traffic => self.last_traffic = now,
                        Ok(_) => {}
                        Err(stop) => return Poll::Ready(stop),
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Stop::SourceEnded(Some(e))),
                Poll::Pending => return self.poll_flush_idle(cx, destination),
            }
        }
    }

    /// After the pump's loop: writes what is still kept for the destination, then the queued
    /// Close of ours if it can go out between frames, and flushes.
    pub(crate) fn poll_finish(
        &mut self,
        cx: &mut Context<'_>,
        destination: &mut Socket,
    ) -> Poll<Result<(), Stop>> {
        loop {
            ready!(self.out.poll_drain(cx, destination))?;
            if !self.between_frames() {
                break;
            }
            let Some(frame) = self.take_queued_close() else {
                break;
            };
            self.closed_toward_destination = true;
            let mut sink = Sink::Now {
                cx: &mut *cx,
                destination: &mut *destination,
            };
            self.out.emit(&mut sink, &frame)?;
        }
        Pin::new(&mut *destination)
            .poll_flush(cx)
            .map_err(Stop::DestinationFailed)
    }

    /// Waiting for the source (or a rate limit): what was written goes out meanwhile.
    fn poll_flush_idle(&mut self, cx: &mut Context<'_>, destination: &mut Socket) -> Poll<Stop> {
        if self.out.needs_flush {
            match Pin::new(&mut *destination).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.out.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Stop::DestinationFailed(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Under rate limits, before a read: wait while throttled, then feed what was held back
    /// before reading more, and read no more than a read may be charged.
    fn before_read(
        &mut self,
        cx: &mut Context<'_>,
        destination: &mut Socket,
        limiter: &mut ConnectionLimiter,
    ) -> Limited {
        // After a Close toward the destination nothing goes on: the source's Close is read
        // without waiting.
        if !self.closed_toward_destination && !limiter.ready() {
            return Limited::Wait;
        }
        if self.parser.at_message_gate() {
            // The message there was charged when the throttle ended.
            self.parser.open_gate();
        }
        let Some((backlog, pos)) = limiter.take_backlog() else {
            return Limited::Read(limiter.read_size(READ_SIZE));
        };
        let mut sink = Sink::Now {
            cx: &mut *cx,
            destination: &mut *destination,
        };
        let result = self.ingest_with(&backlog[pos..], &mut sink, Some(&mut *limiter));
        let fed = backlog.len() - result.as_ref().map_or(0, |i| i.held);
        limiter.return_backlog(backlog, fed);
        match result {
            Ok(_) if limiter.take_hit().is_some() => Limited::Stop(Stop::RateLimited),
            Ok(ingested) => {
                if ingested.traffic {
                    self.last_traffic = Instant::now();
                }
                Limited::Fed
            }
            Err(stop) => Limited::Stop(stop),
        }
    }

    /// A read under rate limits: its bytes charged, then parsed; the end of it that begins a
    /// message the limits hold back is kept for later.
    fn ingest_read(
        &mut self,
        data: &[u8],
        sink: &mut Sink<'_, '_>,
        limiter: &mut ConnectionLimiter,
    ) -> Result<Ingested, Stop> {
        // Over a bytes limit with `throttle`, what was read goes on and the next read waits;
        // with `close`, our Close goes at the first boundary.
        if !self.closed_toward_destination && limiter.charge_bytes(data.len()) == Verdict::Close {
            self.queue_close(agent_close(self.toward_server));
        }
        let ingested = self.ingest_with(data, sink, Some(&mut *limiter))?;
        if ingested.held > 0 {
            limiter.hold(&data[data.len() - ingested.held..]);
        } else {
            limiter.read_through();
        }
        match limiter.take_hit() {
            Some(_) => Err(Stop::RateLimited),
            None => Ok(ingested),
        }
    }
}

/// One side's heartbeat: `from` reads that side, `toward` writes to it. `None`: it is gone.
pub(crate) fn beat(
    heartbeat: Heartbeat,
    watch: &mut PeerWatch,
    now: Instant,
    from: &mut Direction,
    toward: &mut Direction,
) -> Option<Instant> {
    // A side cannot be asked while the other leaves a frame toward it unfinished.
    let progress = if toward.ping_waits_on_source() {
        now
    } else {
        toward.out.progress
    };
    match watch.check(heartbeat, now, from.last_read, progress) {
        Beat::Wait(at) => {
            toward.watch_destination(watch.awaiting(), now);
            Some(at)
        }
        Beat::Ping(at) => {
            toward.queue_ping(now);
            // From the first Ping on, its Pong may come: Pongs from that side are checked.
            from.parser.hold_pongs();
            Some(at)
        }
        Beat::Gone => None,
    }
}

/// What [`Direction::ingest_with`] did with the bytes it was given.
struct Ingested {
    /// They held more than Pongs answering the gateway.
    traffic: bool,
    /// Bytes at their end not taken: they begin a data message a rate limit holds back.
    held: usize,
}

impl Ingested {
    fn all(traffic: bool) -> Self {
        Ingested { traffic, held: 0 }
    }
}

/// What a direction under rate limits does before reading.
enum Limited {
    /// Read at most this much.
    Read(usize),
    /// Fed bytes held back earlier instead: look again.
    Fed,
    /// Throttled: the pump's timer says when to look again.
    Wait,
    Stop(Stop),
}

fn record(stats: &mut DirectionStats, closing: &mut Option<Box<Closing>>, event: FrameEvent) {
    match event {
        FrameEvent::Frame { .. } => stats.frames += 1,
        FrameEvent::MessageEnd => stats.messages += 1,
        FrameEvent::Close(close) => {
            let closing = closing.get_or_insert_with(Box::default);
            closing.seen.get_or_insert((close, Instant::now()));
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
    use crate::websocket::rate_limit::{Rate, RateLimitAction, RateLimitCounters, RateLimits};
    use std::num::NonZeroU32;

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
        (d.out.unsent().to_vec(), traffic)
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

    /// A limiter of `per_second` data messages with a burst of `burst`.
    fn message_limiter(
        per_second: u32,
        burst: u32,
        action: RateLimitAction,
    ) -> Box<ConnectionLimiter> {
        let rate = NonZeroU32::new(per_second).zip(NonZeroU32::new(burst));
        let limits = RateLimits {
            messages: rate.map(|(per_second, burst)| Rate { per_second, burst }),
            bytes: None,
            per_client_messages: None,
            per_client_bytes: None,
            action,
        };
        let counters = RateLimitCounters::new(&WebSocketMetrics::new(), "test", &limits);
        ConnectionLimiter::new(&limits, None, counters)
    }

    /// Throttled: what the burst allows goes on, the message after it waits whole in the
    /// backlog, from its first byte; a control frame between two messages is not charged.
    #[test]
    fn a_throttled_read_stops_before_the_first_message_over_the_limit() {
        let a = frame(true, 0, OP_TEXT, b"a", KEY);
        let ping = frame(true, 0, 0x9, b"", KEY);
        let b = frame(false, 0, OP_TEXT, b"b", KEY);
        let b_end = frame(true, 0, OP_CONTINUATION, b"b", KEY);
        let c = frame(true, 0, OP_TEXT, b"c", KEY);
        let read = [a.clone(), ping.clone(), b.clone(), b_end.clone(), c.clone()].concat();
        let mut limiter = message_limiter(1, 2, RateLimitAction::Throttle);
        let mut d = direction(Sender::Client);
        d.parser.gate_messages();
        let ingested = d
            .ingest_read(&read, &mut Sink::Later, &mut limiter)
            .unwrap_or_else(|_| panic!("a valid stream was refused"));
        assert_eq!(ingested.held, c.len());
        assert_eq!(d.out.unsent(), [a, ping, b, b_end].concat());
        assert_eq!(d.stats.messages, 2);
        assert_eq!(d.stats.bytes, (read.len() - c.len()) as u64);
        let (backlog, pos) = limiter.take_backlog().expect("held back");
        assert_eq!(backlog[pos..], c[..]);
        assert!(limiter.waiting_until().is_some());
        assert!(!limiter.ready(), "a message a second: not yet");
    }

    /// Closed: the agent's Close goes where the message over the limit would have begun, and
    /// nothing after it goes on.
    #[test]
    fn a_closed_read_ends_with_the_agents_close_before_the_message() {
        let a = frame(true, 0, OP_TEXT, b"a", KEY);
        let b = frame(true, 0, OP_TEXT, b"b", KEY);
        let close = frame(true, 0, 0x8, &1000u16.to_be_bytes(), KEY);
        let read = [a.clone(), b, close].concat();
        let mut limiter = message_limiter(1, 1, RateLimitAction::Close);
        let mut d = direction(Sender::Client);
        d.parser.gate_messages();
        let ingested = d.ingest_read(&read, &mut Sink::Later, &mut limiter);
        assert!(
            matches!(ingested, Err(Stop::RateLimited)),
            "told to the pump"
        );
        let forwarded = d.out.unsent();
        assert_eq!(forwarded[..a.len()], a[..]);
        let mut check = FrameParser::new(Sender::Client, false);
        let mut closes = Vec::new();
        assert_eq!(
            check.feed(&forwarded[a.len()..], |e| {
                if let crate::websocket::frame::FrameEvent::Close(c) = e {
                    closes.push(c.code);
                }
            }),
            Feed::Ok
        );
        assert_eq!(closes, [Some(1001)], "the agent's Close, and nothing else");
        assert!(d.closed_toward_destination);
        assert!(
            d.close_seen().is_some(),
            "the client's own Close is still seen"
        );
        assert!(limiter.take_hit().is_none(), "told once");
    }
}
