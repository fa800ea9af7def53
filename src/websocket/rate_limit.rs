//! Rate limits on what a client sends toward its agent, for agents that pay per message:
//! data messages and bytes per second, per connection and per client across its
//! connections. Each limit is a token bucket with a burst (governor's GCRA).
//!
//! Over a limit, a connection is either closed (1008 to the client, 1001 to the agent) or
//! throttled: the gateway stops reading from the client until the buckets allow again, so
//! that TCP backpressure slows the sender and nothing is lost or reordered.
//!
//! A data message is charged when the first byte of its first frame is about to go on, so
//! that a message over the limit never reaches the agent (close) or waits whole (throttle).
//! Bytes are charged per read from the client; a read is never larger than a bytes burst,
//! and after one the bucket has not taken, the next read waits until it has. Control frames
//! are not charged as messages.

use super::frame::{close_frame, mask_key};
use super::metrics::WebSocketMetrics;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::{Counter, IntCounter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The Close a client gets for exceeding a limit with `action = "close"`.
pub(crate) const CLIENT_CLOSE_CODE: u16 = 1008;
pub(crate) const CLIENT_CLOSE_REASON: &str = "rate limit exceeded";
/// And what its agent gets: the client is going away.
const AGENT_CLOSE_CODE: u16 = 1001;
const AGENT_CLOSE_REASON: &str = "client rate limit exceeded";
/// How often the per-client buckets drop the keys of clients whose buckets are full again.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// One token bucket: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub(crate) per_second: NonZeroU32,
    pub(crate) burst: NonZeroU32,
}

impl Rate {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// What happens to a connection over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateLimitAction {
    /// Close 1008 to the client, 1001 to the agent.
    Close,
    /// Stop reading from the client until the buckets allow again.
    Throttle,
}

impl RateLimitAction {
    pub(crate) fn label(self) -> &'static str {
        match self {
            RateLimitAction::Close => "close",
            RateLimitAction::Throttle => "throttle",
        }
    }
}

/// The limits on what a client sends toward the agent; at least one is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RateLimits {
    /// Data messages per connection.
    pub(crate) messages: Option<Rate>,
    /// Bytes read from the client per connection.
    pub(crate) bytes: Option<Rate>,
    /// Data messages of one client over all its connections under the same settings.
    pub(crate) per_client_messages: Option<Rate>,
    /// Bytes of one client over all its connections under the same settings.
    pub(crate) per_client_bytes: Option<Rate>,
    pub(crate) action: RateLimitAction,
}

impl RateLimits {
    /// Each limit with its label, in the order the buckets are charged.
    pub(crate) fn each(&self) -> [(Limit, Option<Rate>); 4] {
        [
            (Limit::ClientMessages, self.messages),
            (Limit::ClientBytes, self.bytes),
            (Limit::PerClientMessages, self.per_client_messages),
            (Limit::PerClientBytes, self.per_client_bytes),
        ]
    }
}

/// Which limit was exceeded: the `limit` label, named after the configuration keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    ClientMessages = 0,
    ClientBytes = 1,
    PerClientMessages = 2,
    PerClientBytes = 3,
}

impl Limit {
    const ALL: [Limit; 4] = [
        Limit::ClientMessages,
        Limit::ClientBytes,
        Limit::PerClientMessages,
        Limit::PerClientBytes,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Limit::ClientMessages => "client_messages",
            Limit::ClientBytes => "client_bytes",
            Limit::PerClientMessages => "per_client_messages",
            Limit::PerClientBytes => "per_client_bytes",
        }
    }
}

/// Who a client is, for the limits across its connections: its authenticated subject when
/// its agent has a policy, so that a subject's connections share buckets whatever their
/// addresses; else its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    Address(IpAddr),
    /// An authenticated subject, by its policy's name and its own.
    Subject(String),
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<Instant>>;
type Keyed<C> =
    RateLimiter<ClientKey, DefaultKeyedStateStore<ClientKey>, C, NoOpMiddleware<Instant>>;

/// The per-client buckets of one set of WebSocket settings (a route's, or an agent's own),
/// shared by every connection opened under them. The runtime state holds them and makes new
/// ones with each configuration.
pub(crate) struct ClientBuckets<C: Clock<Instant = Instant> = MonotonicClock> {
    messages: Option<Keyed<C>>,
    bytes: Option<Keyed<C>>,
    clock: C,
    /// When stale keys were last dropped.
    swept: Mutex<Instant>,
}

impl ClientBuckets {
    /// The buckets for `limits`; `None` when they set no per-client limit.
    pub(crate) fn new(limits: &RateLimits) -> Option<Arc<Self>> {
        Self::with_clock(limits, MonotonicClock)
    }
}

impl<C: Clock<Instant = Instant> + Clone> ClientBuckets<C> {
    fn with_clock(limits: &RateLimits, clock: C) -> Option<Arc<Self>> {
        if limits.per_client_messages.is_none() && limits.per_client_bytes.is_none() {
            return None;
        }
        let keyed = |rate: Option<Rate>| {
            rate.map(|r| RateLimiter::dashmap_with_clock(r.quota(), clock.clone()))
        };
        Some(Arc::new(ClientBuckets {
            messages: keyed(limits.per_client_messages),
            bytes: keyed(limits.per_client_bytes),
            swept: Mutex::new(clock.now()),
            clock,
        }))
    }

    /// Drops the keys of clients whose buckets are full again, at most every
    /// [`SWEEP_EVERY`]. Called as connections open rather than from a task of its own: keys
    /// are only added by connections, so sweeping as they open bounds the maps, and buckets
    /// remade on every reload need no task to be started and stopped with them.
    pub(crate) fn sweep_if_due(&self) {
        let now = self.clock.now();
        // Another connection sweeping right now is as good.
        let Ok(mut swept) = self.swept.try_lock() else {
            return;
        };
        if now.saturating_duration_since(*swept) < SWEEP_EVERY {
            return;
        }
        *swept = now;
        for keyed in [&self.messages, &self.bytes].into_iter().flatten() {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
    }

    /// Clients with a bucket that is not full (kept in memory).
    #[cfg(test)]
    fn clients(&self) -> usize {
        [&self.messages, &self.bytes]
            .into_iter()
            .flatten()
            .map(|k| k.len())
            .max()
            .unwrap_or(0)
    }
}

/// Live metric handles of one limited connection, resolved once when it opens.
pub(crate) struct RateLimitCounters {
    /// By [`Limit`]; only the limits that are set.
    limited: [Option<IntCounter>; 4],
    /// Only with `action = "throttle"`.
    throttled_seconds: Option<Counter>,
}

impl RateLimitCounters {
    pub(crate) fn new(metrics: &WebSocketMetrics, agent: &str, limits: &RateLimits) -> Self {
        let action = limits.action.label();
        RateLimitCounters {
            limited: limits.each().map(|(limit, rate)| {
                rate.map(|_| metrics.rate_limited(agent, limit.label(), action))
            }),
            throttled_seconds: (limits.action == RateLimitAction::Throttle)
                .then(|| metrics.throttled_seconds(agent)),
        }
    }

    fn limited(&self, limit: Limit) {
        if let Some(counter) = &self.limited[limit as usize] {
            counter.inc();
        }
    }

    fn throttled(&self, time: Duration) {
        if let Some(counter) = &self.throttled_seconds {
            counter.inc_by(time.as_secs_f64());
        }
    }
}

/// What a charge decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go on.
    Pass,
    /// Go on no further until the buckets allow ([`ConnectionLimiter::ready`]).
    Throttle,
    /// Close the connection; nothing more is charged.
    Close,
}

/// The rate limits of one connection, from the client toward the agent: its own buckets, its
/// share of its client's, what is still to be charged, and the bytes read but held back.
/// Boxed in every limited connection for its life: the 32-bit fields keep it within 256 bytes
/// (an allocator size class; 8 bytes more would take the next, of 320).
pub(crate) struct ConnectionLimiter<C: Clock<Instant = Instant> = MonotonicClock> {
    messages: Option<Direct<C>>,
    bytes: Option<Direct<C>>,
    client: Option<(Arc<ClientBuckets<C>>, ClientKey)>,
    clock: C,
    action: RateLimitAction,
    /// The largest read: a read is charged whole, so it must fit in every bytes burst (a
    /// `u32`); `u32::MAX` without bytes limits.
    read_size: u32,
    /// Cells still to charge, by [`Limit`], before anything more goes on.
    owed: [u32; 4],
    /// Throttled until then (at least).
    until: Option<Instant>,
    /// When the current throttle began.
    since: Option<Instant>,
    /// Time spent throttled, in nanoseconds.
    throttled: u64,
    /// A wait began since the pump last looked: its timer must be moved.
    new_wait: bool,
    /// Closed for a limit (reported to the pump once): nothing more is charged.
    closed: bool,
    hit: Option<Limit>,
    /// Bytes read from the client that begin a message still waiting for the buckets:
    /// `backlog[backlog_pos..]`. Its capacity is kept while the client floods. It is the end
    /// of one read, which is far shorter than 4 GiB.
    backlog: Vec<u8>,
    backlog_pos: u32,
    counters: RateLimitCounters,
}

impl ConnectionLimiter {
    /// A connection's limiter; `client` is its client's share of per-client buckets.
    pub(crate) fn new(
        limits: &RateLimits,
        client: Option<(Arc<ClientBuckets>, ClientKey)>,
        counters: RateLimitCounters,
    ) -> Box<Self> {
        Box::new(Self::with_clock(limits, client, counters, MonotonicClock))
    }
}

impl<C: Clock<Instant = Instant> + Clone> ConnectionLimiter<C> {
    fn with_clock(
        limits: &RateLimits,
        client: Option<(Arc<ClientBuckets<C>>, ClientKey)>,
        counters: RateLimitCounters,
        clock: C,
    ) -> Self {
        if let Some((buckets, _)) = &client {
            buckets.sweep_if_due();
        }
        let direct = |rate: Option<Rate>| {
            rate.map(|r| RateLimiter::direct_with_clock(r.quota(), clock.clone()))
        };
        let shared_bytes = client.as_ref().and(limits.per_client_bytes);
        let read_size = [limits.bytes, shared_bytes]
            .into_iter()
            .flatten()
            .map(|r| r.burst.get())
            .fold(u32::MAX, u32::min);
        ConnectionLimiter {
            messages: direct(limits.messages),
            bytes: direct(limits.bytes),
            client,
            clock,
            action: limits.action,
            read_size,
            owed: [0; 4],
            until: None,
            since: None,
            throttled: 0,
            new_wait: false,
            closed: false,
            hit: None,
            backlog: Vec::new(),
            backlog_pos: 0,
            counters,
        }
    }

    /// Whether data messages are charged: the frame parser must stop before each.
    pub(crate) fn charges_messages(&self) -> bool {
        self.messages.is_some()
            || self
                .client
                .as_ref()
                .is_some_and(|(buckets, _)| buckets.messages.is_some())
    }

    /// The largest read allowed, at most `max`.
    pub(crate) fn read_size(&self, max: usize) -> usize {
        (self.read_size as usize).min(max)
    }

    /// Whether more may be read and let through now: a throttle is over once the buckets
    /// have taken everything still owed.
    pub(crate) fn ready(&mut self) -> bool {
        let Some(until) = self.until else {
            return true;
        };
        if self.closed {
            return true;
        }
        let now = self.clock.now();
        if now < until {
            return false;
        }
        match self.pay() {
            Ok(()) => {
                self.until = None;
                if let Some(since) = self.since.take() {
                    self.add_throttled(now.saturating_duration_since(since));
                }
                true
            }
            // Another connection of the client took the refill first: wait again, the same
            // throttle (not counted again).
            Err((_, until)) => {
                self.until = Some(until);
                self.new_wait = true;
                false
            }
        }
    }

    /// Charges the data message about to begin.
    pub(crate) fn admit_message(&mut self) -> Verdict {
        self.charge(Limit::ClientMessages, Limit::PerClientMessages, 1)
    }

    /// Charges `n` bytes just read from the client (at most [`Self::read_size`]).
    pub(crate) fn charge_bytes(&mut self, n: usize) -> Verdict {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.charge(Limit::ClientBytes, Limit::PerClientBytes, n)
    }

    fn charge(&mut self, own: Limit, shared: Limit, n: u32) -> Verdict {
        if self.closed {
            return Verdict::Pass;
        }
        self.owed[own as usize] = self.owed[own as usize].saturating_add(n);
        self.owed[shared as usize] = self.owed[shared as usize].saturating_add(n);
        if self.until.is_some() {
            // Already throttled: this waits with the rest.
            return Verdict::Throttle;
        }
        let (limit, until) = match self.pay() {
            Ok(()) => return Verdict::Pass,
            Err(denied) => denied,
        };
        self.counters.limited(limit);
        match self.action {
            RateLimitAction::Close => {
                self.closed = true;
                self.hit = Some(limit);
                self.owed = [0; 4];
                Verdict::Close
            }
            RateLimitAction::Throttle => {
                self.until = Some(until);
                self.since = Some(self.clock.now());
                self.new_wait = true;
                Verdict::Throttle
            }
        }
    }

    /// Charges what is owed, bucket by bucket; the first that refuses says until when.
    fn pay(&mut self) -> Result<(), (Limit, Instant)> {
        for limit in Limit::ALL {
            let Some(n) = NonZeroU32::new(self.owed[limit as usize]) else {
                continue;
            };
            let shared = self.client.as_ref().and_then(|(buckets, key)| {
                let keyed = match limit {
                    Limit::PerClientMessages => buckets.messages.as_ref(),
                    Limit::PerClientBytes => buckets.bytes.as_ref(),
                    _ => None,
                };
                keyed.map(|k| k.check_key_n(key, n))
            });
            let outcome = match limit {
                Limit::ClientMessages => self.messages.as_ref().map(|l| l.check_n(n)),
                Limit::ClientBytes => self.bytes.as_ref().map(|l| l.check_n(n)),
                _ => shared,
            };
            match outcome {
                Some(Ok(Err(denied))) => return Err((limit, denied.earliest_possible())),
                // No such bucket; or more than its burst, which reads never are (they are
                // cut to the smallest bytes burst): let it through rather than wait forever.
                None | Some(Ok(Ok(()))) | Some(Err(_)) => self.owed[limit as usize] = 0,
            }
        }
        Ok(())
    }

    /// Until when the connection is throttled, if it is.
    pub(crate) fn waiting_until(&self) -> Option<Instant> {
        self.until.filter(|_| !self.closed)
    }

    /// Whether a wait began since the last call: the pump's timer must be moved to it.
    pub(crate) fn take_new_wait(&mut self) -> bool {
        std::mem::take(&mut self.new_wait)
    }

    /// The limit that closed the connection, reported once.
    pub(crate) fn take_hit(&mut self) -> Option<Limit> {
        self.hit.take()
    }

    /// The time spent throttled, an unfinished throttle included (the connection is ending).
    pub(crate) fn finish(&mut self) -> Duration {
        if let Some(since) = self.since.take() {
            self.add_throttled(self.clock.now().saturating_duration_since(since));
        }
        Duration::from_nanos(self.throttled)
    }

    fn add_throttled(&mut self, time: Duration) {
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        self.throttled = self.throttled.saturating_add(nanos);
        self.counters.throttled(time);
    }

    /// Keeps `rest`, the end of a read from the client, for when the buckets allow it.
    pub(crate) fn hold(&mut self, rest: &[u8]) {
        self.backlog.clear();
        self.backlog.extend_from_slice(rest);
        self.backlog_pos = 0;
    }

    /// The bytes held back, to be fed before anything more is read, and where they start.
    pub(crate) fn take_backlog(&mut self) -> Option<(Vec<u8>, usize)> {
        let pos = self.backlog_pos as usize;
        (pos < self.backlog.len()).then(|| (std::mem::take(&mut self.backlog), pos))
    }

    /// Gives back what [`Self::take_backlog`] took, fed up to `pos`.
    pub(crate) fn return_backlog(&mut self, mut backlog: Vec<u8>, mut pos: usize) {
        if pos >= backlog.len() {
            // Its memory stays for the next hold while the client floods.
            backlog.clear();
            pos = 0;
        }
        self.backlog = backlog;
        self.backlog_pos = pos as u32;
    }

    /// A read went through whole: the client is not flooding now, and the memory of the
    /// backlog goes back.
    pub(crate) fn read_through(&mut self) {
        if self.backlog.capacity() > 0 && self.backlog_pos as usize >= self.backlog.len() {
            self.backlog = Vec::new();
            self.backlog_pos = 0;
        }
    }
}

/// The Close toward the agent when its client is closed for a limit; masked toward a server.
pub(crate) fn agent_close(toward_server: bool) -> Vec<u8> {
    close_frame(
        AGENT_CLOSE_CODE,
        AGENT_CLOSE_REASON,
        toward_server.then(mask_key),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock the test moves by hand, so that verdicts do not depend on the machine's speed.
    #[derive(Clone)]
    struct TestClock(Arc<Mutex<Instant>>);

    impl TestClock {
        fn new() -> Self {
            TestClock(Arc::new(Mutex::new(Instant::now())))
        }

        fn advance(&self, by: Duration) {
            if let Ok(mut now) = self.0.lock() {
                *now += by;
            }
        }
    }

    impl Clock for TestClock {
        type Instant = Instant;

        fn now(&self) -> Instant {
            *self.0.lock().expect("clock")
        }
    }

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).expect("rate"),
            burst: NonZeroU32::new(burst).expect("burst"),
        })
    }

    fn no_limits(action: RateLimitAction) -> RateLimits {
        RateLimits {
            messages: None,
            bytes: None,
            per_client_messages: None,
            per_client_bytes: None,
            action,
        }
    }

    fn counters(metrics: &WebSocketMetrics, limits: &RateLimits) -> RateLimitCounters {
        RateLimitCounters::new(metrics, "test", limits)
    }

    fn limiter(
        limits: &RateLimits,
        clock: &TestClock,
        metrics: &WebSocketMetrics,
    ) -> ConnectionLimiter<TestClock> {
        ConnectionLimiter::with_clock(limits, None, counters(metrics, limits), clock.clone())
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn close_refuses_the_message_after_the_burst_and_charges_nothing_more() {
        let clock = TestClock::new();
        let metrics = WebSocketMetrics::new();
        let limits = RateLimits {
            messages: rate(10, 3),
            ..no_limits(RateLimitAction::Close)
        };
        let mut l = limiter(&limits, &clock, &metrics);
        assert!(l.charges_messages());
        for _ in 0..3 {
            assert_eq!(l.admit_message(), Verdict::Pass);
        }
        assert_eq!(l.admit_message(), Verdict::Close);
        assert_eq!(l.take_hit(), Some(Limit::ClientMessages));
        assert_eq!(l.take_hit(), None, "reported once");
        assert_eq!(l.waiting_until(), None, "closing is no throttle");
        assert_eq!(l.admit_message(), Verdict::Pass, "nothing charged after");
        let limited = metrics.rate_limited("test", "client_messages", "close");
        assert_eq!(limited.get(), 1);
    }

    #[test]
    fn throttle_waits_until_the_bucket_has_refilled_then_charges_what_was_held() {
        let clock = TestClock::new();
        let metrics = WebSocketMetrics::new();
        let limits = RateLimits {
            messages: rate(10, 2),
            ..no_limits(RateLimitAction::Throttle)
        };
        let mut l = limiter(&limits, &clock, &metrics);
        let start = clock.now();
        assert_eq!(l.admit_message(), Verdict::Pass);
        assert_eq!(l.admit_message(), Verdict::Pass);
        assert_eq!(l.admit_message(), Verdict::Throttle);
        assert!(l.take_new_wait());
        assert!(!l.take_new_wait());
        // One message every 100 ms.
        assert_eq!(l.waiting_until(), Some(start + 100 * MS));
        assert!(!l.ready());
        clock.advance(99 * MS);
        assert!(!l.ready());
        clock.advance(MS);
        assert!(l.ready(), "the held message is charged and goes");
        assert_eq!(l.waiting_until(), None);
        // Its charge used the refill: the next one waits another 100 ms.
        assert_eq!(l.admit_message(), Verdict::Throttle);
        assert_eq!(l.waiting_until(), Some(start + 200 * MS));
        clock.advance(50 * MS);
        assert_eq!(
            l.finish(),
            150 * MS,
            "100 ms, then 50 of the unfinished wait"
        );
        let seconds = metrics.throttled_seconds("test").get();
        assert!((seconds - 0.15).abs() < 1e-9, "{seconds}");
        let limited = metrics.rate_limited("test", "client_messages", "throttle");
        assert_eq!(limited.get(), 2);
    }

    #[test]
    fn bytes_are_charged_per_read_and_reads_fit_the_smallest_burst() {
        let clock = TestClock::new();
        let metrics = WebSocketMetrics::new();
        let limits = RateLimits {
            bytes: rate(1000, 4000),
            per_client_bytes: rate(1000, 3000),
            ..no_limits(RateLimitAction::Throttle)
        };
        let plain = limiter(&limits, &clock, &metrics);
        assert!(!plain.charges_messages());
        assert_eq!(
            plain.read_size(16384),
            4000,
            "no client share: its burst is not used"
        );
        let buckets = ClientBuckets::with_clock(&limits, clock.clone()).expect("per-client");
        let key = ClientKey::Address(IpAddr::from([192, 0, 2, 1]));
        let mut l = ConnectionLimiter::with_clock(
            &limits,
            Some((buckets, key)),
            counters(&metrics, &limits),
            clock.clone(),
        );
        assert_eq!(l.read_size(16384), 3000);
        assert_eq!(l.read_size(1024), 1024);
        assert_eq!(l.charge_bytes(3000), Verdict::Pass);
        // The read is taken by the connection's bucket, not by the client's: 500 ms to wait.
        assert_eq!(l.charge_bytes(500), Verdict::Throttle);
        assert_eq!(l.waiting_until(), Some(clock.now() + 500 * MS));
        assert_eq!(
            metrics
                .rate_limited("test", "per_client_bytes", "throttle")
                .get(),
            1
        );
        clock.advance(500 * MS);
        assert!(l.ready());
    }

    /// Two connections of one client share its buckets; another client has its own.
    #[test]
    fn per_client_buckets_are_shared_by_a_clients_connections() {
        let clock = TestClock::new();
        let metrics = WebSocketMetrics::new();
        let limits = RateLimits {
            per_client_messages: rate(1, 3),
            ..no_limits(RateLimitAction::Close)
        };
        let buckets = ClientBuckets::with_clock(&limits, clock.clone()).expect("per-client");
        let open = |ip: [u8; 4]| {
            let key = ClientKey::Address(IpAddr::from(ip));
            ConnectionLimiter::with_clock(
                &limits,
                Some((Arc::clone(&buckets), key)),
                counters(&metrics, &limits),
                clock.clone(),
            )
        };
        let mut a = open([192, 0, 2, 1]);
        let mut b = open([192, 0, 2, 1]);
        let mut other = open([192, 0, 2, 2]);
        assert!(a.charges_messages());
        assert_eq!(a.admit_message(), Verdict::Pass);
        assert_eq!(a.admit_message(), Verdict::Pass);
        assert_eq!(b.admit_message(), Verdict::Pass);
        assert_eq!(b.admit_message(), Verdict::Close);
        assert_eq!(b.take_hit(), Some(Limit::PerClientMessages));
        assert_eq!(other.admit_message(), Verdict::Pass);
        assert_eq!(buckets.clients(), 2);
        // Once both buckets are full again, a sweep forgets both clients.
        clock.advance(Duration::from_secs(4));
        buckets.sweep_if_due();
        assert_eq!(
            buckets.clients(),
            2,
            "not due yet: swept at most every 10 s"
        );
        clock.advance(SWEEP_EVERY);
        buckets.sweep_if_due();
        assert_eq!(buckets.clients(), 0);
        assert!(ClientBuckets::new(&no_limits(RateLimitAction::Close)).is_none());
    }

    #[test]
    fn the_backlog_keeps_its_memory_while_the_client_floods() {
        let clock = TestClock::new();
        let metrics = WebSocketMetrics::new();
        let limits = RateLimits {
            messages: rate(1, 1),
            ..no_limits(RateLimitAction::Throttle)
        };
        let mut l = limiter(&limits, &clock, &metrics);
        assert!(l.take_backlog().is_none());
        l.hold(b"abcdef");
        let (backlog, pos) = l.take_backlog().expect("held");
        assert_eq!(&backlog[pos..], b"abcdef");
        l.return_backlog(backlog, 2);
        let (backlog, pos) = l.take_backlog().expect("the rest");
        assert_eq!(&backlog[pos..], b"cdef");
        l.return_backlog(backlog, 6);
        assert!(l.take_backlog().is_none());
        assert!(l.backlog.capacity() >= 6, "kept for the next hold");
        l.read_through();
        assert_eq!(l.backlog.capacity(), 0);
    }

    #[test]
    fn the_agent_is_told_why_its_client_went() {
        let frame = agent_close(false);
        assert_eq!(frame[0], 0x88);
        assert_eq!(frame[2..4], AGENT_CLOSE_CODE.to_be_bytes());
        assert_eq!(&frame[4..], AGENT_CLOSE_REASON.as_bytes());
        assert_eq!(agent_close(true)[1] & 0x80, 0x80, "masked toward a server");
    }

    /// What a limited connection costs: reported by the work's summary, kept small.
    #[test]
    fn a_connections_limiter_is_small() {
        let size = std::mem::size_of::<ConnectionLimiter>();
        assert!(size <= 272, "{size} bytes");
    }
}
