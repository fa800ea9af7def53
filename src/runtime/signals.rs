//! Signals: what each one does to a running gateway.
//!
//! - SIGHUP: reload the configuration (as `POST /reload` on the admin listener).
//! - SIGTERM: drain. Not-ready at once, Close 1001 to every agent WebSocket (both sides),
//!   new upgrades refused with 503; once the last WebSocket has finished, or after
//!   `drain_grace`, Pingora stops its listeners and the process exits 0.
//! - SIGQUIT: hand the listening sockets to a new process started with `--upgrade`, and
//!   drain the WebSockets here meanwhile, so their clients reconnect to the new process.
//! - SIGINT: exit at once.
//!
//! Pingora's own watcher would start its shutdown on SIGTERM straight away and then drop
//! the pumps' tasks with the runtimes; this one drains first.

use crate::runtime::state::GatewayState;
use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

pub(crate) struct GatewaySignals {
    pub(crate) state: Arc<GatewayState>,
}

#[async_trait]
impl ShutdownSignalWatch for GatewaySignals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut hangup), Ok(mut terminate), Ok(mut quit), Ok(mut interrupt)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!(
                "cannot install signal handlers; SIGTERM will stop the gateway without a drain"
            );
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    // A refused file is logged and counted by reload itself.
                    let _ = self.state.reload("SIGHUP");
                }
                _ = terminate.recv() => {
                    self.state.start_drain();
                    let grace = self.state.config().drain_grace;
                    let left = self.state.connections.wait_idle(grace).await;
                    if left > 0 {
                        log::warn!("drain grace of {grace:?} ended with {left} WebSockets still open");
                    }
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = quit.recv() => {
                    self.state.start_drain();
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = interrupt.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}
