//! Secret probes: a configured path on an upstream, asked periodically, so that a missing
//! secret is found before a user finds it, and a restored one is noticed without traffic.

use super::state::GatewayState;
use crate::secrets::reports::reported_missing;
use crate::upstream::{upgrade_connector, Upstream, UpstreamKind, NAMESPACE_HEADER, ROOM_HEADER};
use crate::websocket::handshake::{handshake, Handshake};
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// How often the probe loop wakes to see which probes are due (and picks up reloads).
const TICK: Duration = Duration::from_secs(1);

pub(crate) struct SecretProbes {
    pub(crate) state: Arc<GatewayState>,
}

#[async_trait]
impl BackgroundService for SecretProbes {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = upgrade_connector();
        let mut last_run: std::collections::HashMap<String, tokio::time::Instant> =
            Default::default();
        loop {
            let config = self.state.config();
            for upstream in config.upstreams.values() {
                let Some(probe) = &upstream.probe else {
                    continue;
                };
                let due = last_run
                    .get(&upstream.name)
                    .is_none_or(|at| at.elapsed() >= probe.interval);
                if !due {
                    continue;
                }
                last_run.insert(upstream.name.clone(), tokio::time::Instant::now());
                let required: Vec<String> = config
                    .routes
                    .iter()
                    .flat_map(|r| r.agents.values())
                    .filter(|a| a.upstream.name == upstream.name)
                    .flat_map(|a| a.required_secrets.iter().cloned())
                    .collect();
                let addresses: Vec<String> =
                    match &upstream.kind {
                        UpstreamKind::Worker { address, .. } => vec![address.clone()],
                        // Every node in the fleet now, up or down: a down node's answer is news.
                        UpstreamKind::Local { .. } => config
                            .fleets
                            .get(&upstream.name)
                            .map_or_else(Vec::new, |fleet| {
                                let placement = fleet.placement();
                                placement
                                    .nodes()
                                    .iter()
                                    .map(|n| n.connect.to_string())
                                    .collect()
                            }),
                    };
                self.probe(&connector, upstream, &addresses, &probe.path, &required)
                    .await;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }
}

impl SecretProbes {
    async fn probe(
        &self,
        connector: &pingora::connectors::TransportConnector,
        upstream: &Upstream,
        addresses: &[String],
        path: &str,
        required: &[String],
    ) {
        for address in addresses {
            let answer = async {
                let peer = upstream.peer(address).await?;
                let mut request = RequestHeader::build("GET", path.as_bytes(), None)?;
                let host = match &upstream.kind {
                    UpstreamKind::Worker { host, .. } => host.as_str(),
                    UpstreamKind::Local { .. } => address.as_str(),
                };
                request.insert_header(http::header::HOST, host)?;
                request.insert_header(http::header::CONNECTION, "close")?;
                request.insert_header(http::header::USER_AGENT, "agent-gateway-probe")?;
                if upstream.is_local() {
                    // A local backend refuses requests without routing headers before it
                    // looks at its secrets; the probe has an agent namespace of its own.
                    request.insert_header(NAMESPACE_HEADER, "agent-gateway-probe")?;
                    request.insert_header(ROOM_HEADER, "probe")?;
                }
                handshake(connector, &peer, &request, upstream.read_timeout).await
            };
            match answer.await {
                Ok(Handshake::Refused { response, body }) => {
                    let status = response.status.as_u16();
                    match reported_missing(status, &body, required) {
                        Some(secret) => {
                            self.state.upstream_reported_missing(&upstream.name, secret)
                        }
                        None if status < 500 => self.state.upstream_answered_well(&upstream.name),
                        None => log::warn!(
                            "probe of upstream {} at {address}{path} answered {status}",
                            upstream.name
                        ),
                    }
                }
                Ok(Handshake::Upgraded { .. }) => self.state.upstream_answered_well(&upstream.name),
                Err(e) => log::warn!(
                    "probe of upstream {} at {address}{path} failed: {e}",
                    upstream.name
                ),
            }
        }
    }
}
