//! Keeps every `local` upstream's fleet current: resolves DNS-listed nodes on their
//! interval (a reload resolves at once) and runs the active health checks on theirs. A
//! change of placement closes, with 1012, the connections whose instance's home moved.

use super::state::GatewayState;
use crate::fleet::health::run_check;
use crate::fleet::{DueChecks, Fleet, Fleets};
use crate::websocket::stop::MigrationReason;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the loop looks for due work: intervals are met to within this.
const TICK: Duration = Duration::from_millis(100);
/// How often the record of open connections forgets instances with none left.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct FleetChecks {
    pub(crate) state: Arc<GatewayState>,
}

#[async_trait]
impl BackgroundService for FleetChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut pruned_at = Instant::now();
        loop {
            let now = Instant::now();
            if now.duration_since(pruned_at) >= PRUNE_EVERY {
                // Without scrapes or placement changes, nothing else would forget the
                // instances whose connections all ended.
                self.state.fleets.owners.prune();
                pruned_at = now;
            }
            for fleet in self.state.fleets.all() {
                // Each round is a task of its own, so that a slow node or DNS server delays
                // no other fleet's round.
                if let Some(discovery) = fleet.due_resolution(now) {
                    let (fleets, fleet) = (Arc::clone(&self.state.fleets), Arc::clone(&fleet));
                    tokio::spawn(async move {
                        let result = discovery.discover().await;
                        if result.is_err() {
                            fleets.metrics.discovery_failed(fleet.upstream());
                        }
                        if fleet.resolved(&discovery, result) {
                            fleets.placement_changed(&fleet, MigrationReason::Discovery);
                        }
                    });
                }
                if let Some(due) = fleet.due_checks(now) {
                    let fleets = Arc::clone(&self.state.fleets);
                    tokio::spawn(check_round(fleets, fleet, due));
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }
}

/// Checks the due nodes of `fleet` at once and records each result.
async fn check_round(fleets: Arc<Fleets>, fleet: Arc<Fleet>, due: DueChecks) {
    let checks = due.nodes.iter().map(|(id, connect)| {
        let check = Arc::clone(&due.check);
        async move { (id, run_check(check.as_ref(), connect, due.timeout).await) }
    });
    for (id, ok) in futures_util::future::join_all(checks).await {
        fleets.checked(&fleet, id, ok);
    }
    fleet.checks_done();
}
