//! Drain: the signal that tells every agent WebSocket to close with 1001 and new upgrades to
//! be refused, and the count of open WebSockets a drain waits for.

use crate::websocket::stop::{StopOrder, StopSignal};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Whether the gateway is draining; once started, a drain is never undone in this process.
pub(crate) struct Drain {
    sender: watch::Sender<StopOrder>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            sender: watch::channel(StopOrder::Run).0,
        }
    }
}

impl Drain {
    /// Starts the drain; `true` the first time. Connections on `local` nodes watch their
    /// instance's channel instead, which the caller drains too.
    pub(crate) fn start(&self) -> bool {
        let first = self.sender.send_replace(StopOrder::Drain) == StopOrder::Run;
        if first {
            log::warn!("draining: agent WebSockets get Close 1001, new upgrades are refused");
        }
        first
    }

    pub(crate) fn draining(&self) -> bool {
        *self.sender.borrow() != StopOrder::Run
    }

    /// What the pump of a connection that has no instance channel watches.
    pub(crate) fn signal(&self) -> StopSignal {
        self.sender.subscribe()
    }
}

/// Counts open agent WebSockets, so that a drain can wait for the last one.
#[derive(Default)]
pub(crate) struct ConnectionTracker {
    open: AtomicUsize,
    closed: Notify,
}

/// One open connection in the count, until dropped; owned by the connection's task.
pub(crate) struct ConnectionGuard(Arc<ConnectionTracker>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

impl ConnectionTracker {
    pub(crate) fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(Arc::clone(self))
    }

    pub(crate) fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until no connection is open, or `limit` has passed; returns what is still open.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> usize {
        let wait = async {
            loop {
                // Registered before the count is read, so a close in between is not missed.
                let mut notified = std::pin::pin!(self.closed.notified());
                notified.as_mut().enable();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        self.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_the_last_connection() {
        let tracker = Arc::new(ConnectionTracker::default());
        let guard = tracker.open();
        assert_eq!(tracker.wait_idle(Duration::from_millis(10)).await, 1);
        let waiter = {
            let tracker = Arc::clone(&tracker);
            tokio::spawn(async move { tracker.wait_idle(Duration::from_secs(10)).await })
        };
        drop(guard);
        assert_eq!(waiter.await.expect("joined"), 0);
    }

    #[test]
    fn a_drain_is_seen_by_signals_taken_before_and_after() {
        let drain = Drain::default();
        let before = drain.signal();
        assert!(!drain.draining());
        drain.start();
        assert!(drain.draining());
        assert_eq!(*before.borrow(), StopOrder::Drain);
        assert_eq!(*drain.signal().borrow(), StopOrder::Drain);
    }
}
