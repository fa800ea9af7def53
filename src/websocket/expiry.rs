//! A deadline on an open WebSocket: the instant its client's credential stops being valid,
//! and the Closes the two sides get then. The caller (authentication) decides the instant and
//! the client's code; the pump keeps the time.

use super::frame::{close_frame, mask_key};
use std::time::Instant;

/// The reason the agent's Close gives when its client's credential expired.
const EXPIRED_AGENT_REASON: &str = "client credential expired";

#[derive(Debug, Clone)]
pub(crate) struct Expiry {
    pub(crate) at: Instant,
    /// The Close the client gets (the policy's, 1008 "token expired" by default).
    pub(crate) code: u16,
    pub(crate) reason: String,
}

impl Expiry {
    /// The Close toward the client, so that it refreshes its credential before reconnecting,
    /// and the one toward the agent (masked, as a client's): 1001, as for any client that
    /// leaves.
    pub(crate) fn closes(&self) -> (Vec<u8>, Vec<u8>) {
        (
            close_frame(self.code, &self.reason, None),
            close_frame(1001, EXPIRED_AGENT_REASON, Some(mask_key())),
        )
    }
}
