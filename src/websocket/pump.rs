//! The gateway's own bidirectional pump for upgraded connections.
//!
//! Why not Pingora's upgrade path: Pingora forwards upgraded bytes through its body filters,
//! but offers no way to write into an idle upgraded connection from outside (pingora issue
//! 571), and its downstream read timeout (60 s by default) would end idle agent sockets. The
//! gateway therefore takes both streams over once the upstream has answered 101, and runs
//! this pump: one task that polls both directions itself (no split halves, no locks, and a
//! slow writer on one side never stops the other direction), feeds each direction through a
//! [`Direction`], and writes frames of its own (Close, heartbeat Pings) only between frames.

use super::direction::{beat, Direction};
use super::expiry::Expiry;
use super::frame::{close_frame, mask_key, CloseFrame, ProtocolError, Sender};
use super::heartbeat::{Heartbeat, PeerWatch};
use super::metrics::ConnectionMetrics;
use super::outbox::{Sink, Stop};
use super::outcome::{Cause, ConnectionOutcome, DropKind, Initiator};
use super::rate_limit::{ConnectionLimiter, RateLimits, CLIENT_CLOSE_CODE, CLIENT_CLOSE_REASON};
use super::socket::{Keepalive, Socket};
use super::stop::{StopOrder, StopSignal};
use futures_util::future::select;
use futures_util::FutureExt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PumpSettings {
    /// Close both sides with 1001 after this long without a byte either way (answers to the
    /// gateway's heartbeat Pings do not count).
    pub(crate) idle_timeout: Option<Duration>,
    /// How long a closing connection may take to finish its Close handshake.
    pub(crate) close_timeout: Duration,
    /// Largest data message either side may send; over it, both get Close 1009.
    pub(crate) max_message_bytes: Option<u64>,
    /// The code the client gets when the upstream drops: 1011 (understood by every client
    /// library) or 1014 (Bad Gateway, which some, tungstenite among them, report as 1002).
    pub(crate) upstream_lost_code: u16,
    /// Pings toward a client that has gone quiet, and how long it has to answer.
    pub(crate) client_heartbeat: Option<Heartbeat>,
    /// The same toward the upstream.
    pub(crate) upstream_heartbeat: Option<Heartbeat>,
    /// TCP keepalive on both sockets.
    pub(crate) tcp_keepalive: Option<Keepalive>,
    /// Limits on what the client sends toward the agent, and what happens over them.
    pub(crate) rate_limits: Option<RateLimits>,
}

/// A Close the gateway sent both ways, and why.
#[derive(Debug, Clone, Copy)]
struct GatewayClose {
    code: u16,
    /// At most 123 (the longest reason a Close may carry).
    reason_len: u8,
    at: Instant,
    cause: Cause,
}

/// The two ends of an upgraded connection.
pub(crate) struct Ends<'a> {
    pub(crate) client: Socket,
    pub(crate) upstream: Socket,
    /// Bytes the upstream sent right behind its 101, read with the handshake; they go to the
    /// client first.
    pub(crate) upstream_preread: &'a [u8],
    /// permessage-deflate was negotiated.
    pub(crate) deflate: bool,
}

/// What a connection's pump runs under (its settings, its client's credential expiry, its
/// live metrics), held with whatever else the caller keeps until the connection ends. The
/// pump's future owns it and gives it back: the connection's task is that future alone, and
/// nothing in it is kept twice.
pub(crate) trait PumpOwner: Send + 'static {
    fn settings(&self) -> &PumpSettings;
    fn expiry(&self) -> Option<&Expiry>;
    fn metrics(&self) -> &ConnectionMetrics;
}

/// Pumps both ends until the connection ends, and says how it ended. `limiter` holds the
/// connection's rate limits when its settings have any.
///
/// Not an `async fn`: one keeps its arguments twice in its future (as passed, and moved into
/// its body), and this future is most of an idle connection's memory (its task). What comes
/// before the first wait is done here; the future owns what it needs, once.
pub(crate) fn pump<O: PumpOwner>(
    ends: Ends<'_>,
    mut stop: StopSignal,
    owner: O,
    mut limiter: Option<Box<ConnectionLimiter>>,
) -> impl Future<Output = (ConnectionOutcome, O)> + Send {
    let (settings, metrics) = (owner.settings(), owner.metrics());
    let Ends {
        mut client,
        mut upstream,
        upstream_preread,
        deflate,
    } = ends;
    let started = Instant::now();
    if let Some(keepalive) = settings.tcp_keepalive {
        for (side, socket) in [("client", &client), ("upstream", &upstream)] {
            if let Err(e) = socket.set_keepalive(keepalive) {
                log::debug!("TCP keepalive not set on a WebSocket's {side} socket: {e}");
            }
        }
    }
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
    let mut gateway_close: Option<GatewayClose> = None;
    let mut protocol_error = None;
    if limiter.as_ref().is_some_and(|l| l.charges_messages()) {
        c2u.parser.gate_messages();
    }

    if !upstream_preread.is_empty() {
        if let Err(Stop::Protocol(error)) = u2c.ingest(upstream_preread, &mut Sink::Later) {
            protocol_error = Some(error);
        }
    }

    if let Some(error) = protocol_error {
        close_both(
            &mut c2u,
            &mut u2c,
            &mut gateway_close,
            error.close_code(),
            error.kind(),
            Cause::ProtocolError,
        );
    }

    async move {
        let (settings, expiry) = (owner.settings(), owner.expiry());
        let mut ended: Option<(Initiator, Option<DropKind>)> = None;
        // The side in `ended` did not answer the heartbeat (rather than dropping its stream).
        let mut heartbeat_lost = false;
        let mut watches = [PeerWatch::default(); 2];
        // Made once, not on every wake-up: a fresh stop waiter and timer per turn of the loop
        // would take the watch's and the timer wheel's locks twice for every frame. It borrows
        // `stop` (a `wait_for` would keep its own copy of the receiver and be larger).
        let stop_requested = async {
            loop {
                let order = *stop.borrow_and_update();
                if order != StopOrder::Run {
                    return order;
                }
                if stop.changed().await.is_err() {
                    // The sender gone (the gateway stopping) counts as a drain.
                    return StopOrder::Drain;
                }
            }
        }
        .fuse();
        tokio::pin!(stop_requested);
        // One timer per connection for whatever is due next: the idle timeout, the heartbeats
        // and the end of a throttle while open, then the closing deadline (or a throttle's end
        // before it), and last the final flush.
        let timed = settings.idle_timeout.is_some()
            || settings.client_heartbeat.is_some()
            || settings.upstream_heartbeat.is_some()
            || limiter.is_some()
            || expiry.is_some();
        let until_expiry = |at: Instant| expiry.map_or(at, |e| e.at.min(at));
        let first = match tick(started, settings, &mut watches, &mut c2u, &mut u2c, None) {
            Due::Next(at) => until_expiry(at),
            _ => started,
        };
        let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(first));
        tokio::pin!(timer);
        let mut closing_deadline: Option<Instant> = None;

        loop {
            // Once anyone has sent a Close, the handshake gets `close_timeout` to finish.
            let closing =
                gateway_close.is_some() || c2u.close_seen().is_some() || u2c.close_seen().is_some();
            if closing && closing_deadline.is_none() {
                let deadline = Instant::now() + settings.close_timeout;
                closing_deadline = Some(deadline);
                let throttle = throttle_wait(limiter.as_deref(), &mut c2u, Instant::now());
                timer.as_mut().reset(sooner_of(deadline, throttle));
            }
            let wake = tokio::select! {
                biased;
                order = &mut stop_requested, if gateway_close.is_none() => {
                    let (code, reason, cause) = match order {
                        StopOrder::Migrate(why) => (1012, "service restart", Cause::Migrated(why)),
                        _ => (1001, "gateway shutting down", Cause::Drain),
                    };
                    close_both(&mut c2u, &mut u2c, &mut gateway_close, code, reason, cause);
                    continue;
                }
                () = &mut timer, if closing_deadline.is_some() || timed => {
                    if closing_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        break;
                    }
                    Wake::Due
                }
                wake = poll_fn(|cx| poll_both(cx, &mut c2u, &mut u2c, &mut client, &mut upstream, limiter.as_deref_mut())) => wake,
            };
            let (side, stop) = match wake {
                Wake::Stopped(side, stop) => (side, stop),
                Wake::CloseSeen => continue,
                // Reads do not move the timer. It fires for whatever is due next, and a side's
                // answer to a Ping (once per interval) or a new throttle sets it again, so that
                // the next Ping is timed from the answer.
                Wake::Due | Wake::Answered | Wake::Throttled => {
                    let now = Instant::now();
                    let throttle = throttle_wait(limiter.as_deref(), &mut c2u, now);
                    if let Some(deadline) = closing_deadline {
                        timer.as_mut().reset(sooner_of(deadline, throttle));
                        continue;
                    }
                    if let Some(expiry) = expiry.filter(|e| now >= e.at && gateway_close.is_none())
                    {
                        close_expired(&mut c2u, &mut u2c, &mut gateway_close, expiry);
                        continue;
                    }
                    match tick(now, settings, &mut watches, &mut c2u, &mut u2c, throttle) {
                        Due::Next(at) => timer
                            .as_mut()
                            .reset(tokio::time::Instant::from_std(until_expiry(at))),
                        Due::Idle => close_both(
                            &mut c2u,
                            &mut u2c,
                            &mut gateway_close,
                            1001,
                            "idle timeout",
                            Cause::IdleTimeout,
                        ),
                        Due::Gone(side) => {
                            ended = Some((side, Some(DropKind::Timeout)));
                            heartbeat_lost = true;
                            break;
                        }
                    }
                    continue;
                }
            };
            match stop {
                Stop::SourceEnded(error) => {
                    let source_closed = match side {
                        Initiator::Client => c2u.close_seen().is_some(),
                        _ => u2c.close_seen().is_some(),
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
                        Initiator::Client => c2u.close_seen().is_some(),
                        _ => u2c.close_seen().is_some(),
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
                        Cause::ProtocolError,
                    );
                }
                // The agent's Close went from the direction, where the message would have begun;
                // the client's goes now, before anything the agent answers to it.
                Stop::RateLimited => {
                    u2c.queue_close(close_frame(CLIENT_CLOSE_CODE, CLIENT_CLOSE_REASON, None));
                    gateway_close.get_or_insert(GatewayClose {
                        code: CLIENT_CLOSE_CODE,
                        reason_len: CLIENT_CLOSE_REASON.len() as u8,
                        at: Instant::now(),
                        cause: Cause::RateLimit,
                    });
                    continue;
                }
            }
            break;
        }

        // Tell the side still there why the other went, then give the queued frames a moment.
        let gone = ended.and_then(|(side, kind)| kind.map(|_| side));
        match gone {
            Some(Initiator::Upstream) => u2c.queue_close(close_frame(
                settings.upstream_lost_code,
                if heartbeat_lost {
                    "agent did not answer heartbeat"
                } else {
                    "upstream connection lost"
                },
                None,
            )),
            Some(_) => c2u.queue_close(close_frame(
                1001,
                if heartbeat_lost {
                    "client did not answer heartbeat"
                } else {
                    "client connection lost"
                },
                Some(mask_key()),
            )),
            None => {}
        }
        if heartbeat_lost {
            // A side judged gone gets a reset, not a FIN queued behind data it will not read.
            let socket = if gone == Some(Initiator::Client) {
                &client
            } else {
                &upstream
            };
            if let Err(e) = socket.reset_on_close() {
                log::debug!("cannot reset a WebSocket's socket to a silent peer: {e}");
            }
        }
        // The flush and the shutdowns get a second at most, on the same timer: a `timeout_at`
        // each would add a timer of its own to the future.
        let flush_deadline =
            tokio::time::Instant::now() + settings.close_timeout.min(Duration::from_secs(1));
        timer.as_mut().reset(flush_deadline);
        // Toward the client first, then toward the upstream, as each write may wait.
        let mut done = [
            gone == Some(Initiator::Client),
            gone == Some(Initiator::Upstream),
        ];
        let flush = poll_fn(|cx| {
            done[0] = done[0] || u2c.poll_finish(cx, &mut client).is_ready();
            done[1] = done[1] || (done[0] && c2u.poll_finish(cx, &mut upstream).is_ready());
            match done {
                [true, true] => Poll::Ready(()),
                _ => Poll::Pending,
            }
        });
        let _ = select(flush, timer.as_mut()).await;
        if !(heartbeat_lost && gone == Some(Initiator::Client)) {
            let _ = select(pin!(client.shutdown()), timer.as_mut()).await;
        }
        if !(heartbeat_lost && gone == Some(Initiator::Upstream)) {
            let _ = select(pin!(upstream.shutdown()), timer.as_mut()).await;
        }

        let ending = Ending {
            gateway_close,
            ended,
            heartbeat_lost,
            protocol_error,
            throttled: limiter.as_mut().map_or(Duration::ZERO, |l| l.finish()),
        };
        (outcome(started, &c2u, &u2c, ending), owner)
    }
}

/// What the pump's timer found due.
enum Due {
    /// Nothing yet; look again then.
    Next(Instant),
    Idle,
    /// This side did not answer the heartbeat.
    Gone(Initiator),
}

/// The idle timeout and both sides' heartbeats at `now`: Pings queued where one is due. A
/// throttle's end (`throttle`) is due too.
fn tick(
    now: Instant,
    settings: &PumpSettings,
    watches: &mut [PeerWatch; 2],
    c2u: &mut Direction,
    u2c: &mut Direction,
    throttle: Option<Instant>,
) -> Due {
    let mut next: Option<Instant> = throttle;
    let mut sooner = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
    if let Some(idle) = settings.idle_timeout {
        let deadline = c2u.last_traffic.max(u2c.last_traffic) + idle;
        if now >= deadline {
            return Due::Idle;
        }
        sooner(deadline);
    }
    // The client is heard through c2u and asked through u2c; the upstream the other way.
    let [client_watch, upstream_watch] = watches;
    if let Some(heartbeat) = settings.client_heartbeat {
        match beat(heartbeat, client_watch, now, c2u, u2c) {
            Some(at) => sooner(at),
            None => return Due::Gone(Initiator::Client),
        }
    }
    if let Some(heartbeat) = settings.upstream_heartbeat {
        match beat(heartbeat, upstream_watch, now, u2c, c2u) {
            Some(at) => sooner(at),
            None => return Due::Gone(Initiator::Upstream),
        }
    }
    Due::Next(next.unwrap_or(now + settings.close_timeout))
}

/// When a throttled client may be read again, if that is still to come. A throttled client
/// sent more than the gateway read: it is heard and not idle, whatever its heartbeat or
/// `idle_timeout` would say, since its answers wait behind what is not read yet.
fn throttle_wait(
    limiter: Option<&ConnectionLimiter>,
    c2u: &mut Direction,
    now: Instant,
) -> Option<Instant> {
    // A past end is for the direction to find; the timer set to it would fire forever.
    let until = limiter?.waiting_until().filter(|until| *until > now)?;
    if c2u.closed_toward_destination {
        return None;
    }
    c2u.last_read = now;
    c2u.last_traffic = now;
    Some(until)
}

/// The timer's next instant: `deadline`, or a throttle's end before it.
fn sooner_of(deadline: Instant, throttle: Option<Instant>) -> tokio::time::Instant {
    tokio::time::Instant::from_std(throttle.map_or(deadline, |t| t.min(deadline)))
}

/// Queues a Close of the gateway's own toward both sides and records it.
fn close_both(
    c2u: &mut Direction,
    u2c: &mut Direction,
    gateway_close: &mut Option<GatewayClose>,
    code: u16,
    reason: &str,
    cause: Cause,
) {
    u2c.queue_close(close_frame(code, reason, None));
    c2u.queue_close(close_frame(code, reason, Some(mask_key())));
    gateway_close.get_or_insert(GatewayClose {
        code,
        reason_len: reason.len().min(123) as u8,
        at: Instant::now(),
        cause,
    });
}

/// The client's credential expired: each side gets its Close (see [`Expiry::closes`]).
fn close_expired(
    c2u: &mut Direction,
    u2c: &mut Direction,
    gateway_close: &mut Option<GatewayClose>,
    expiry: &Expiry,
) {
    let (to_client, to_agent) = expiry.closes();
    u2c.queue_close(to_client);
    c2u.queue_close(to_agent);
    gateway_close.get_or_insert(GatewayClose {
        code: expiry.code,
        reason_len: expiry.reason.len().min(123) as u8,
        at: Instant::now(),
        cause: Cause::TokenExpired,
    });
}

/// What woke the pump's loop.
enum Wake {
    Stopped(Initiator, Stop),
    /// A side sent its first Close: the closing deadline starts.
    CloseSeen,
    /// The timer: something may be due.
    Due,
    /// A side answered a Ping of the gateway's.
    Answered,
    /// A throttle began: the timer must wake the pump at its end.
    Throttled,
}

/// Polls both directions; the first to stop says which side's stream it was reading. The
/// rate limits apply to what the client sends.
fn poll_both(
    cx: &mut Context<'_>,
    c2u: &mut Direction,
    u2c: &mut Direction,
    client: &mut Socket,
    upstream: &mut Socket,
    mut limiter: Option<&mut ConnectionLimiter>,
) -> Poll<Wake> {
    if let Poll::Ready(stop) = c2u.poll_step(cx, client, upstream, limiter.as_deref_mut()) {
        return Poll::Ready(Wake::Stopped(Initiator::Client, stop));
    }
    if let Poll::Ready(stop) = u2c.poll_step(cx, upstream, client, None) {
        return Poll::Ready(Wake::Stopped(Initiator::Upstream, stop));
    }
    if limiter.is_some_and(|l| l.take_new_wait()) {
        return Poll::Ready(Wake::Throttled);
    }
    for direction in [c2u, u2c] {
        if direction.close_seen().is_some() && !direction.close_reported {
            direction.close_reported = true;
            return Poll::Ready(Wake::CloseSeen);
        }
        if direction.answered {
            direction.answered = false;
            return Poll::Ready(Wake::Answered);
        }
    }
    Poll::Pending
}

/// How the pump's loop ended, besides what each direction saw.
struct Ending {
    gateway_close: Option<GatewayClose>,
    ended: Option<(Initiator, Option<DropKind>)>,
    heartbeat_lost: bool,
    protocol_error: Option<ProtocolError>,
    throttled: Duration,
}

fn outcome(
    started: Instant,
    c2u: &Direction,
    u2c: &Direction,
    ending: Ending,
) -> ConnectionOutcome {
    let close_code = |c: &CloseFrame| c.code.unwrap_or(1005);
    let mut closes: Vec<(Initiator, u16, usize, Instant, Cause)> = Vec::with_capacity(3);
    if let Some((c, at)) = c2u.close_seen() {
        closes.push((
            Initiator::Client,
            close_code(&c),
            c.reason_len,
            at,
            Cause::Close,
        ));
    }
    if let Some((c, at)) = u2c.close_seen() {
        let code = close_code(&c);
        closes.push((Initiator::Upstream, code, c.reason_len, at, Cause::Close));
    }
    if let Some(g) = ending.gateway_close {
        closes.push((
            Initiator::Gateway,
            g.code,
            g.reason_len.into(),
            g.at,
            g.cause,
        ));
    }
    closes.sort_by_key(|c| c.3);
    let (initiator, code, reason_len, drop_kind, cause) = match (closes.first(), ending.ended) {
        (Some(&(who, code, len, _, cause)), _) => (who, code, len, None, cause),
        (None, Some((side, kind))) => {
            let cause = if ending.heartbeat_lost {
                Cause::Heartbeat
            } else {
                Cause::Dropped
            };
            (side, 1006, 0, kind, cause)
        }
        (None, None) => (Initiator::Gateway, 1006, 0, None, Cause::Dropped),
    };
    ConnectionOutcome {
        initiator,
        code,
        reason_len,
        answered: closes.len() > 1,
        drop_kind,
        cause,
        protocol_error: ending.protocol_error,
        duration: started.elapsed(),
        throttled: ending.throttled,
        client_to_upstream: c2u.stats,
        upstream_to_client: u2c.stats,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame::tests::frame;
    use crate::websocket::heartbeat::is_gateway_pong;
    use crate::websocket::metrics::WebSocketMetrics;
    use crate::websocket::rate_limit::{Rate, RateLimitAction, RateLimitCounters};
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::sync::watch;

    struct Owner(PumpSettings, ConnectionMetrics);

    impl PumpOwner for Owner {
        fn settings(&self) -> &PumpSettings {
            &self.0
        }

        fn expiry(&self) -> Option<&Expiry> {
            None
        }

        fn metrics(&self) -> &ConnectionMetrics {
            &self.1
        }
    }

    /// Reads one frame with a payload under 126 bytes: its opcode and unmasked payload.
    async fn read_frame(stream: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.expect("a frame header");
        let len = usize::from(head[1] & 0x7f);
        assert!(len < 126, "a short frame expected");
        let mut key = [0u8; 4];
        let masked = head[1] & 0x80 != 0;
        if masked {
            stream.read_exact(&mut key).await.expect("a masking key");
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.expect("a payload");
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        (head[0] & 0x0f, payload)
    }

    fn heartbeat(interval_ms: u64, timeout_ms: u64) -> Option<Heartbeat> {
        Some(Heartbeat {
            interval: Duration::from_millis(interval_ms),
            timeout: Some(Duration::from_millis(timeout_ms)),
        })
    }

    fn start(
        settings: PumpSettings,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<ConnectionOutcome>,
    ) {
        start_limited(settings, None)
    }

    fn start_limited(
        settings: PumpSettings,
        limiter: Option<Box<ConnectionLimiter>>,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<ConnectionOutcome>,
    ) {
        let (client_side, client) = tokio::io::duplex(4096);
        let (upstream_side, upstream) = tokio::io::duplex(4096);
        let pumping = tokio::spawn(async move {
            let metrics = WebSocketMetrics::new();
            let connection = metrics.connection_opened("test");
            let (_stop_sender, stop) = watch::channel(StopOrder::Run);
            let ends = Ends {
                client: Socket::Layered(Box::new(client_side)),
                upstream: Socket::Layered(Box::new(upstream_side)),
                upstream_preread: b"",
                deflate: false,
            };
            pump(ends, stop, Owner(settings, connection), limiter)
                .await
                .0
        });
        (client, upstream, pumping)
    }

    #[tokio::test]
    async fn a_client_that_never_answers_is_gone_and_the_agent_is_told() {
        let settings = PumpSettings {
            client_heartbeat: heartbeat(50, 50),
            ..quiet_settings()
        };
        let started = Instant::now();
        let (mut client, mut upstream, pumping) = start(settings);
        let (opcode, payload) = read_frame(&mut client).await;
        assert_eq!(opcode, 0x9);
        assert!(is_gateway_pong(&payload), "{payload:?}");
        let (opcode, payload) = read_frame(&mut upstream).await;
        assert_eq!(opcode, 0x8);
        assert_eq!(payload[..2], 1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"client did not answer heartbeat");
        let outcome = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump ends")
            .expect("pump task");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(
            (
                outcome.initiator,
                outcome.code,
                outcome.cause,
                outcome.drop_kind
            ),
            (
                Initiator::Client,
                1006,
                Cause::Heartbeat,
                Some(DropKind::Timeout)
            )
        );
        // The client's end is dropped without a Close.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// The agent stops halfway through a frame: the Ping due meanwhile waits for the frame's
    /// end, and the client, which could not be asked, is not condemned for its silence.
    #[tokio::test]
    async fn a_ping_stuck_behind_a_half_frame_does_not_condemn_the_client() {
        let settings = PumpSettings {
            client_heartbeat: heartbeat(20, 30),
            ..quiet_settings()
        };
        let (mut client, mut upstream, pumping) = start(settings);
        let text = frame(true, 0, 0x1, b"half now, half later", None);
        let (first, second) = text.split_at(8);
        upstream.write_all(first).await.expect("first half");
        let mut got = vec![0u8; first.len()];
        client
            .read_exact(&mut got)
            .await
            .expect("first half forwarded");
        // Many intervals and timeouts pass; time is the stimulus here, nothing signals it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pumping.is_finished(), "the client was judged gone unasked");
        upstream.write_all(second).await.expect("second half");
        let mut got = vec![0u8; second.len()];
        client.read_exact(&mut got).await.expect("second half");
        assert_eq!(got, second, "nothing inside the frame");
        let (opcode, payload) = read_frame(&mut client).await;
        assert_eq!(opcode, 0x9);
        assert!(is_gateway_pong(&payload));
        drop(client);
        let outcome = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump ends")
            .expect("pump task");
        assert_eq!(outcome.cause, Cause::Dropped);
    }

    /// The client answers every Ping, so it stays; its Pongs never reach the agent, and they
    /// do not count as traffic: `idle_timeout` still ends the quiet connection.
    #[tokio::test]
    async fn answered_pings_keep_a_client_but_do_not_hold_off_the_idle_timeout() {
        let settings = PumpSettings {
            client_heartbeat: heartbeat(20, 100),
            idle_timeout: Some(Duration::from_millis(300)),
            ..quiet_settings()
        };
        let started = Instant::now();
        let (mut client, mut upstream, pumping) = start(settings);
        let answering = tokio::spawn(async move {
            let mut answered = 0;
            loop {
                match read_frame(&mut client).await {
                    (0x9, payload) => {
                        let pong = frame(true, 0, 0xA, &payload, Some([5, 6, 7, 8]));
                        client.write_all(&pong).await.expect("pong");
                        answered += 1;
                    }
                    (0x8, payload) => {
                        let echo = frame(true, 0, 0x8, &payload, Some([5, 6, 7, 8]));
                        let _ = client.write_all(&echo).await;
                        return (answered, payload);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let (opcode, payload) = read_frame(&mut upstream).await;
        assert_eq!(opcode, 0x8, "the agent saw a frame other than the Close");
        assert_eq!(&payload[2..], b"idle timeout");
        // The pump may already have ended: the client hangs up after answering the Close.
        let _ = upstream.write_all(&close_frame(1001, "", None)).await;
        let (answered, client_close) = answering.await.expect("client task");
        assert!(answered >= 5, "only {answered} Pings in 300 ms");
        assert_eq!(&client_close[2..], b"idle timeout");
        let outcome = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump ends")
            .expect("pump task");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            (
                outcome.initiator,
                outcome.code,
                outcome.cause,
                outcome.answered
            ),
            (Initiator::Gateway, 1001, Cause::IdleTimeout, true)
        );
    }

    /// A throttled client sent more than the gateway reads: waiting for the bucket, longer
    /// than the heartbeat's interval and timeout, it is not taken for gone, and each message
    /// goes on whole and in order once the bucket allows it.
    #[tokio::test]
    async fn a_throttled_client_is_not_taken_for_gone() {
        let limits = RateLimits {
            messages: std::num::NonZeroU32::new(5).map(|n| Rate {
                per_second: n,
                burst: std::num::NonZeroU32::MIN,
            }),
            bytes: None,
            per_client_messages: None,
            per_client_bytes: None,
            action: RateLimitAction::Throttle,
        };
        let metrics = WebSocketMetrics::new();
        let counters = RateLimitCounters::new(&metrics, "test", &limits);
        let limiter = ConnectionLimiter::new(&limits, None, counters);
        let settings = PumpSettings {
            client_heartbeat: heartbeat(40, 40),
            rate_limits: Some(limits),
            ..quiet_settings()
        };
        let (mut client, mut upstream, pumping) = start_limited(settings, Some(limiter));
        let started = Instant::now();
        let messages: Vec<Vec<u8>> = (0..3u8)
            .map(|i| frame(true, 0, 0x1, &[b'0' + i], Some([1, 2, 3, 4])))
            .collect();
        client.write_all(&messages.concat()).await.expect("written");
        for i in 0..3u8 {
            assert_eq!(read_frame(&mut upstream).await, (0x1, vec![b'0' + i]));
        }
        // Two waits of 200 ms for the second and third.
        assert!(started.elapsed() >= Duration::from_millis(350));
        // Silent from then on (it never answers a Ping), the client is found gone.
        let outcome = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump ends")
            .expect("pump task");
        assert_eq!(outcome.cause, Cause::Heartbeat);
        assert!(
            outcome.throttled >= Duration::from_millis(350),
            "{outcome:?}"
        );
        assert_eq!(outcome.client_to_upstream.messages, 3);
    }

    /// No timers: only what a test turns on.
    fn quiet_settings() -> PumpSettings {
        PumpSettings {
            idle_timeout: None,
            close_timeout: Duration::from_secs(5),
            max_message_bytes: None,
            upstream_lost_code: 1011,
            client_heartbeat: None,
            upstream_heartbeat: None,
            tcp_keepalive: None,
            rate_limits: None,
        }
    }

    /// Through pipes of 64 bytes, nearly every write is partial: what the destination has not
    /// taken is kept and sent in order, and the Close handshake still completes.
    #[tokio::test]
    async fn a_slow_destination_gets_every_byte_in_order() {
        let (client_side, mut client) = tokio::io::duplex(64);
        let (upstream_side, mut upstream) = tokio::io::duplex(64);
        let metrics = WebSocketMetrics::new();
        let connection = metrics.connection_opened("test");
        let (_stop_sender, stop) = watch::channel(StopOrder::Run);
        let settings = quiet_settings();
        let pumping = tokio::spawn(async move {
            let ends = Ends {
                client: Socket::Layered(Box::new(client_side)),
                upstream: Socket::Layered(Box::new(upstream_side)),
                upstream_preread: b"",
                deflate: false,
            };
            pump(ends, stop, Owner(settings, connection), None).await.0
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
