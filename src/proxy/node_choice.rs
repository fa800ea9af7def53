//! Which node a request goes to: a Worker's one address, or, for a `local` upstream, the
//! instance's home in its fleet's placement; and what the request's result says about that
//! node's health.

use super::problem::Problem;
use crate::fleet::placement::key_hash;
use crate::fleet::{Fleet, Fleets};
use crate::routing::resolve::Target;
use crate::runtime::state::ActiveConfig;
use crate::upstream::UpstreamKind;
use crate::websocket::stop::{MigrationReason, StopSignal};
use pingora::prelude::HttpPeer;
use pingora::ErrorType;
use std::sync::Arc;

/// The node chosen for a request.
pub(crate) struct NodeChoice {
    /// `host:port` to connect to.
    pub(crate) connect: Arc<str>,
    /// For a `local` upstream: its fleet and the node's id, for passive health and for the
    /// instance's owner registration.
    pub(crate) fleet_node: Option<(Arc<Fleet>, Arc<str>)>,
}

impl NodeChoice {
    /// A Pingora peer for the chosen node, with the upstream's TLS and timeouts.
    pub(crate) async fn peer(&self, target: &Target) -> pingora::Result<HttpPeer> {
        target.upstream.peer(&self.connect).await
    }

    /// Counts a request's result on the chosen node as a passive health check (see
    /// [`Fleets::traffic_observed`]).
    pub(crate) fn observed(&self, fleets: &Fleets, ok: bool) {
        if let Some((fleet, id)) = &self.fleet_node {
            fleets.traffic_observed(fleet, id, ok);
        }
    }
}

/// Whether an upstream error says the node could not be reached at all, as opposed to a
/// slow or failing answer from a node that is up (one endpoint's trouble, not the node's).
pub(crate) fn is_connect_failure(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::SocketError
            | ErrorType::BindError
    )
}

/// The node for `target` under `active`, or the 503 that says why there is none.
pub(crate) fn choose_node(active: &ActiveConfig, target: &Target) -> Result<NodeChoice, Problem> {
    let upstream = &target.upstream;
    match &upstream.kind {
        UpstreamKind::Worker { address, .. } => Ok(NodeChoice {
            connect: Arc::from(address.as_str()),
            fleet_node: None,
        }),
        UpstreamKind::Local { .. } => {
            let Some(fleet) = active.fleets.get(&upstream.name) else {
                return Err(Problem::no_node(
                    &upstream.name,
                    crate::fleet::placement::NoHome::NoNodes,
                ));
            };
            let key = match &target.agent {
                Some(a) => key_hash(&[&a.agent.slug, &a.instance]),
                None => key_hash(&[&target.upstream_path]),
            };
            let placement = fleet.placement();
            let home = placement
                .home_of(key)
                .map_err(|why| Problem::no_node(&upstream.name, why))?;
            Ok(NodeChoice {
                connect: Arc::clone(&home.connect),
                fleet_node: Some((Arc::clone(fleet), Arc::clone(&home.id))),
            })
        }
    }
}

/// The node for a WebSocket to `target`, and, for an agent instance on a `local` node, the
/// instance's stop channel, registered before the handshake so that a placement change
/// from then on reaches the connection (1012 at once if it comes before the 101).
pub(crate) fn choose_for_websocket(
    active: &ActiveConfig,
    fleets: &Fleets,
    target: &Target,
) -> Result<(NodeChoice, Option<StopSignal>), Problem> {
    let mut attempts = 0;
    loop {
        let choice = choose_node(active, target)?;
        let (Some((fleet, id)), Some(agent)) = (&choice.fleet_node, &target.agent) else {
            return Ok((choice, None));
        };
        let key = [&*agent.agent.slug, agent.instance.as_str()];
        let signal = fleets
            .owners
            .subscribe(fleet.upstream(), id, key[0], key[1]);
        // A change stored between the choice and the registration moved nothing of this
        // connection's: the placement is read again now that the registration is visible.
        let placement = fleet.placement();
        let still_home = placement.home(&key).is_ok_and(|home| home.id == *id);
        attempts += 1;
        if still_home {
            return Ok((choice, Some(signal)));
        }
        if attempts == 3 {
            // Placement is flapping: the connection goes ahead, told at once to move on
            // (as every other on that node is), rather than outlive its home there.
            fleets.placement_changed(fleet, MigrationReason::Health);
            return Ok((choice, Some(signal)));
        }
    }
}
