//! Agent WebSockets: the protocol and the pump only. [`handshake`] performs the upgrade with
//! the upstream, [`pump`] carries the two streams after the 101 (see it for why the gateway
//! pumps them itself) one [`direction`] each, writing through an [`outbox`]; [`frame`] parses
//! RFC 6455 frames as they pass, [`heartbeat`] finds peers that vanished, [`rate_limit`] holds
//! back or closes clients that send too fast, [`expiry`] closes a connection whose client's
//! credential expired, [`stop`] carries the drain and migration orders, and [`outcome`] and
//! [`metrics`] say how each connection went. Nothing here reads the configuration or the
//! gateway's state: callers pass in what a connection needs.

pub mod direction;
pub mod expiry;
pub mod frame;
pub mod handshake;
pub mod heartbeat;
pub mod metrics;
pub mod outbox;
pub mod outcome;
pub mod pump;
pub mod rate_limit;
pub mod socket;
pub mod stop;
