//! Heartbeats: the gateway's own Pings toward a peer that has gone quiet, the recognition of
//! the Pongs that answer them, and the verdict on a peer that stops answering.
//!
//! A vanished peer (a laptop lid closed, a NAT or load balancer dropping an idle flow) sends
//! no FIN: without a question nobody learns it is gone. The pump asks with a Ping after
//! `interval` of silence from a side and, if nothing at all arrives from it within `timeout`
//! after that Ping went out, treats it as gone. The Ping's payload is recognisable, so that
//! the answering Pong is consumed by the gateway instead of reaching the other side.

use std::time::{Duration, Instant};

/// How the gateway watches one side of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heartbeat {
    /// Silence from the side after which the gateway sends it a Ping.
    pub(crate) interval: Duration,
    /// How long the side then has to send anything; `None`: Pings keep middleboxes' idle
    /// timers at bay, but silence never ends the connection.
    pub(crate) timeout: Option<Duration>,
}

/// The fixed start of every Ping payload of the gateway's own; a counter follows it.
pub(crate) const PING_PREFIX: &[u8; 6] = b"agw-hb";
const PAYLOAD_LEN: usize = PING_PREFIX.len() + 4;
/// Header (2 bytes), masking key (toward a server), payload.
const MAX_PING_FRAME: usize = 2 + 4 + PAYLOAD_LEN;
const OP_PING: u8 = 0x9;

/// One Ping frame of the gateway's own, built on the stack when it is sent.
pub(crate) struct PingFrame {
    bytes: [u8; MAX_PING_FRAME],
    len: usize,
}

impl PingFrame {
    /// The `counter`th Ping; masked with `mask` toward a server (the gateway is its client).
    pub(crate) fn new(counter: u32, mask: Option<[u8; 4]>) -> Self {
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[..PING_PREFIX.len()].copy_from_slice(PING_PREFIX);
        payload[PING_PREFIX.len()..].copy_from_slice(&counter.to_be_bytes());
        let mut bytes = [0u8; MAX_PING_FRAME];
        bytes[0] = 0x80 | OP_PING;
        // PAYLOAD_LEN is far below 126: the one-byte length form.
        bytes[1] = PAYLOAD_LEN as u8;
        let mut len = 2;
        if let Some(key) = mask {
            bytes[1] |= 0x80;
            bytes[2..6].copy_from_slice(&key);
            len = 6;
        }
        for (i, b) in payload.iter().enumerate() {
            bytes[len + i] = mask.map_or(*b, |key| b ^ key[i % 4]);
        }
        PingFrame {
            bytes,
            len: len + PAYLOAD_LEN,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Whether an (unmasked) Pong payload answers a Ping of the gateway's own.
pub(crate) fn is_gateway_pong(payload: &[u8]) -> bool {
    payload.len() == PAYLOAD_LEN && payload.starts_with(PING_PREFIX)
}

/// What a side's heartbeat asks of the pump now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Nothing to do before this instant.
    Wait(Instant),
    /// Send the side a Ping now; look again at the instant given.
    Ping(Instant),
    /// The side did not answer in time: it is gone.
    Gone,
}

/// The state of one side's heartbeat: whether a Ping of the gateway's is unanswered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerWatch {
    /// When the unanswered Ping was queued.
    asked: Option<Instant>,
}

impl PeerWatch {
    /// Decides at `now`, given when the side last sent anything (`heard`) and when bytes last
    /// went toward it since the Ping was queued (`progress`: the Ping itself, or data ahead of
    /// it that a slow reader is still taking, which proves it is there).
    pub(crate) fn check(
        &mut self,
        heartbeat: Heartbeat,
        now: Instant,
        heard: Instant,
        progress: Instant,
    ) -> Beat {
        if let Some(asked) = self.asked {
            if heard > asked {
                self.asked = None;
            } else if let Some(timeout) = heartbeat.timeout {
                let deadline = progress.max(asked) + timeout;
                return if now >= deadline {
                    Beat::Gone
                } else {
                    Beat::Wait(deadline)
                };
            }
        }
        // Without a timeout an unanswered Ping is simply repeated every interval.
        let since = self.asked.map_or(heard, |asked| asked.max(heard));
        let due = since + heartbeat.interval;
        if now < due {
            return Beat::Wait(due);
        }
        self.asked = Some(now);
        Beat::Ping(now + heartbeat.timeout.unwrap_or(heartbeat.interval))
    }

    /// Whether a Ping of the gateway's awaits an answer.
    pub(crate) fn awaiting(&self) -> bool {
        self.asked.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn beat(interval_ms: u64, timeout_ms: Option<u64>) -> Heartbeat {
        Heartbeat {
            interval: Duration::from_millis(interval_ms),
            timeout: timeout_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn ping_frames_carry_a_recognisable_payload_masked_toward_servers() {
        let plain = PingFrame::new(7, None);
        let bytes = plain.as_bytes();
        assert_eq!(bytes[..2], [0x89, 10]);
        assert_eq!(&bytes[2..8], PING_PREFIX);
        assert_eq!(bytes[8..], 7u32.to_be_bytes());
        assert!(is_gateway_pong(&bytes[2..]));

        let key = [0x11, 0x22, 0x33, 0x44];
        let masked = PingFrame::new(7, Some(key));
        let bytes = masked.as_bytes();
        assert_eq!(bytes[..2], [0x89, 0x80 | 10]);
        assert_eq!(bytes[2..6], key);
        let unmasked: Vec<u8> = bytes[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(unmasked, plain.as_bytes()[2..]);
    }

    #[test]
    fn only_the_gateways_payloads_are_recognised() {
        let mut ours = PING_PREFIX.to_vec();
        ours.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(is_gateway_pong(&ours));
        assert!(!is_gateway_pong(b""));
        assert!(!is_gateway_pong(PING_PREFIX));
        assert!(!is_gateway_pong(b"agw-hc\0\0\0\x01"));
        ours.push(0);
        assert!(!is_gateway_pong(&ours), "longer than the gateway's payload");
    }

    #[test]
    fn a_quiet_side_is_pinged_after_the_interval_and_gone_after_the_timeout() {
        let start = Instant::now();
        let hb = beat(200, Some(300));
        let mut watch = PeerWatch::default();
        assert_eq!(
            watch.check(hb, start + 100 * MS, start, start),
            Beat::Wait(start + 200 * MS)
        );
        assert_eq!(
            watch.check(hb, start + 200 * MS, start, start),
            Beat::Ping(start + 500 * MS)
        );
        assert!(watch.awaiting());
        // The Ping went out 10 ms after it was queued: the timeout runs from there.
        let sent = start + 210 * MS;
        assert_eq!(
            watch.check(hb, start + 500 * MS, start, sent),
            Beat::Wait(start + 510 * MS)
        );
        assert_eq!(watch.check(hb, start + 510 * MS, start, sent), Beat::Gone);
    }

    #[test]
    fn anything_heard_after_the_ping_answers_it() {
        let start = Instant::now();
        let hb = beat(200, Some(300));
        let mut watch = PeerWatch::default();
        assert!(matches!(
            watch.check(hb, start + 200 * MS, start, start),
            Beat::Ping(_)
        ));
        let answered = start + 250 * MS;
        assert_eq!(
            watch.check(hb, start + 300 * MS, answered, start + 200 * MS),
            Beat::Wait(answered + 200 * MS)
        );
        assert!(!watch.awaiting());
        // The next silence is measured from the answer.
        assert_eq!(
            watch.check(hb, start + 450 * MS, answered, start + 200 * MS),
            Beat::Ping(start + 750 * MS)
        );
    }

    #[test]
    fn a_destination_still_taking_bytes_keeps_the_verdict_open() {
        let start = Instant::now();
        let hb = beat(200, Some(300));
        let mut watch = PeerWatch::default();
        watch.check(hb, start + 200 * MS, start, start);
        // Data ahead of the Ping kept going out until 900 ms.
        assert_eq!(
            watch.check(hb, start + 1000 * MS, start, start + 900 * MS),
            Beat::Wait(start + 1200 * MS)
        );
    }

    #[test]
    fn without_a_timeout_pings_repeat_and_nothing_is_gone() {
        let start = Instant::now();
        let hb = beat(200, None);
        let mut watch = PeerWatch::default();
        assert_eq!(
            watch.check(hb, start + 200 * MS, start, start),
            Beat::Ping(start + 400 * MS)
        );
        assert_eq!(
            watch.check(hb, start + 400 * MS, start, start + 200 * MS),
            Beat::Ping(start + 600 * MS)
        );
        assert_eq!(
            watch.check(hb, start + 10_000 * MS, start, start),
            Beat::Ping(start + 10_200 * MS)
        );
    }
}
