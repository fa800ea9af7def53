//! Keeps the JWKS URLs' keys fresh: fetched at start, then every policy's `jwks_refresh`
//! (an unknown `kid` fetches sooner, from the request that met it). A failed fetch keeps the
//! last good keys; the metrics show how stale they are.

use super::state::GatewayState;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;

pub(crate) struct JwksRefresh {
    pub(crate) state: Arc<GatewayState>,
}

#[async_trait]
impl BackgroundService for JwksRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let wait = self.state.jwks.refresh_due().await;
            for jwks in self.state.jwks.all() {
                let metrics = &self.state.metrics.auth;
                metrics.jwks_state(jwks.url(), jwks.age(), jwks.fetch_failures());
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
