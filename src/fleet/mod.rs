//! The fleet of a `local` upstream: its agent nodes (from a static list or DNS), their
//! health, where each agent instance lives, and the connections that must move when that
//! changes.
//!
//! [`placement`] decides homes, [`health`] judges nodes, [`discovery`] asks DNS, [`owners`]
//! knows which connections sit where; [`Fleet`] holds one upstream's view and [`Fleets`]
//! all of them, kept across reloads so that health and discovered nodes survive one.

pub mod discovery;
pub(crate) mod health;
pub(crate) mod metrics;
pub(crate) mod owners;
pub mod placement;

use crate::websocket::stop::MigrationReason;
use arc_swap::ArcSwap;
use discovery::{DiscoveredNode, DnsDiscovery, DnsQuery};
use health::{HealthSettings, NodeHealth};
use metrics::FleetMetrics;
use owners::Owners;
use pingora_load_balancing::health_check::HealthCheck;
use placement::{PlacedNode, Placement};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where a `local` upstream's nodes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeSource {
    /// `host:port` entries, each its own identity; names are resolved per connection.
    Static(Vec<String>),
    Dns {
        query: DnsQuery,
        /// How often to resolve again; a reload resolves at once.
        interval: Duration,
        /// `None`: the system's resolv.conf.
        nameserver: Option<SocketAddr>,
    },
}

/// A `local` upstream's fleet, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleetSettings {
    pub source: NodeSource,
    pub health: HealthSettings,
}

/// One upstream's nodes, their health and the placement made of them.
pub(crate) struct Fleet {
    upstream: String,
    placement: ArcSwap<Placement>,
    state: Mutex<FleetState>,
}

struct FleetState {
    settings: FleetSettings,
    /// (id, connect) of every node in the list.
    members: Vec<(String, String)>,
    health: HashMap<String, NodeHealth>,
    check: Arc<dyn HealthCheck + Send + Sync>,
    checked_at: Option<Instant>,
    /// A round of checks is running: the next waits for it, so rounds never overlap.
    checking: bool,
    discovery: Option<Arc<DnsDiscovery>>,
    resolved_at: Option<Instant>,
    /// A resolution is running: the next waits for it, so answers land in order.
    resolving: bool,
    last_resolution_error: Option<String>,
}

/// Active checks due now: the check and the nodes to run it on, as (id, connect).
pub(crate) struct DueChecks {
    pub check: Arc<dyn HealthCheck + Send + Sync>,
    /// The most one check may take, whatever the check's own timeouts.
    pub timeout: Duration,
    pub nodes: Vec<(String, String)>,
}

impl Fleet {
    fn new(upstream: &str, settings: FleetSettings) -> Result<Self, String> {
        let state = FleetState {
            check: Arc::from(settings.health.check()),
            discovery: discovery_of(&settings.source)?,
            members: static_members(&settings.source),
            settings,
            health: HashMap::new(),
            checked_at: None,
            checking: false,
            resolved_at: None,
            resolving: false,
            last_resolution_error: None,
        };
        let fleet = Fleet {
            upstream: upstream.to_owned(),
            placement: ArcSwap::default(),
            state: Mutex::new(state),
        };
        fleet.republish(&mut fleet.lock());
        Ok(fleet)
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    fn lock(&self) -> MutexGuard<'_, FleetState> {
        // Every change is made whole under the lock, so a panicking holder leaves no half.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The placement in force: the request path reads it without a lock.
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.load_full()
    }

    /// Applies new settings (a reload); `true` when placement changed. DNS is resolved
    /// again on the next tick, the old list serving until then. On an error nothing changed.
    fn configure(&self, settings: FleetSettings) -> Result<bool, String> {
        let mut state = self.lock();
        let new_source = state.settings.source != settings.source;
        // Made before anything changes, so that a failure leaves the fleet as it was.
        let discovery = if new_source {
            discovery_of(&settings.source)?
        } else {
            state.discovery.clone()
        };
        // A reload resolves DNS again at once, changed or not.
        state.resolved_at = None;
        if state.settings == settings {
            return Ok(false);
        }
        if state.settings.health != settings.health {
            state.check = Arc::from(settings.health.check());
            state.checked_at = None;
        }
        if new_source {
            state.discovery = discovery;
            if let NodeSource::Static(_) = settings.source {
                state.members = static_members(&settings.source);
            }
        }
        state.settings = settings;
        Ok(self.republish(&mut state))
    }

    /// Records a check's or, with `traffic`, a request's result for node `id`; `true` when
    /// placement changed. A request's success counts only when no active check watches the
    /// node: otherwise the checks decide, so a node failing its health path goes down
    /// whatever traffic still succeeds.
    pub fn observe(&self, id: &str, ok: bool, traffic: bool) -> bool {
        let mut state = self.lock();
        if ok && traffic && state.settings.health.checks_every_node() {
            return false;
        }
        let FleetState {
            settings,
            health,
            members,
            ..
        } = &mut *state;
        let record = match health.get_mut(id) {
            Some(record) => record,
            // Healthy, with no run of failures: a success changes nothing (the common case,
            // on every answered request without active checks).
            None if ok => return false,
            None if !members.iter().any(|(member, _)| member == id) => return false,
            None => health.entry(id.to_owned()).or_default(),
        };
        if !record.observe(ok, &settings.health) {
            return false;
        }
        let now = if record.healthy { "up" } else { "down" };
        log::warn!("upstream {}: node {id} is {now}", self.upstream);
        self.republish(&mut state)
    }

    /// The checks due at `now`, if any (every node, or without active checks the nodes that
    /// are down); they are then timed from `now`.
    pub fn due_checks(&self, now: Instant) -> Option<DueChecks> {
        let mut state = self.lock();
        let interval = state.settings.health.interval;
        if state.checking || state.checked_at.is_some_and(|at| now < at + interval) {
            return None;
        }
        state.checked_at = Some(now);
        let every = state.settings.health.checks_every_node();
        let placement = self.placement();
        let nodes: Vec<(String, String)> = state
            .members
            .iter()
            .filter(|(id, _)| every || placement.node(id).is_some_and(|n| !n.healthy))
            .cloned()
            .collect();
        if nodes.is_empty() {
            return None;
        }
        state.checking = true;
        Some(DueChecks {
            check: Arc::clone(&state.check),
            timeout: state.settings.health.timeout,
            nodes,
        })
    }

    /// The round of checks [`Self::due_checks`] gave has ended.
    pub fn checks_done(&self) {
        self.lock().checking = false;
    }

    /// The DNS resolution due at `now`, if any; it is then timed from `now`.
    pub fn due_resolution(&self, now: Instant) -> Option<Arc<DnsDiscovery>> {
        let mut state = self.lock();
        let NodeSource::Dns { interval, .. } = state.settings.source else {
            return None;
        };
        if state.resolving || state.resolved_at.is_some_and(|at| now < at + interval) {
            return None;
        }
        state.resolved_at = Some(now);
        state.resolving = state.discovery.is_some();
        state.discovery.clone()
    }

    /// Takes the result of a resolution by `by`: a new list, or an error that keeps the last
    /// good one; `true` when placement changed. A result of a query a reload has replaced
    /// since is dropped.
    pub fn resolved(
        &self,
        by: &Arc<DnsDiscovery>,
        result: Result<Vec<DiscoveredNode>, String>,
    ) -> bool {
        let mut state = self.lock();
        state.resolving = false;
        if !state.discovery.as_ref().is_some_and(|d| Arc::ptr_eq(d, by)) {
            return false;
        }
        match result {
            Ok(found) => {
                state.last_resolution_error = None;
                let members: Vec<(String, String)> =
                    found.into_iter().map(|n| (n.id, n.connect)).collect();
                if members == state.members {
                    return false;
                }
                log::info!(
                    "upstream {}: DNS lists {} nodes: {}",
                    self.upstream,
                    members.len(),
                    members
                        .iter()
                        .map(|(id, _)| id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                state.members = members;
                self.republish(&mut state)
            }
            Err(why) => {
                log::warn!(
                    "upstream {}: DNS resolution failed, keeping the last {} nodes: {why}",
                    self.upstream,
                    state.members.len()
                );
                state.last_resolution_error = Some(why);
                false
            }
        }
    }

    /// Builds the placement from the list and health; `true` when it changed. Health of
    /// nodes that left the list is forgotten: one that returns starts afresh.
    fn republish(&self, state: &mut FleetState) -> bool {
        let FleetState {
            members, health, ..
        } = state;
        health.retain(|id, _| members.iter().any(|(member, _)| member == id));
        let nodes = members
            .iter()
            .map(|(id, connect)| {
                let healthy = health.get(id).is_none_or(|h| h.healthy);
                PlacedNode::new(id, connect, healthy)
            })
            .collect();
        let placement = Placement::new(nodes);
        if **self.placement.load() == placement {
            return false;
        }
        self.placement.store(Arc::new(placement));
        true
    }

    /// The fleet for `/fleet` and `/config`: the source, each node's health and what it holds.
    pub(crate) fn describe(&self, owners: &Owners) -> Value {
        let load = owners.load(&self.upstream);
        let state = self.lock();
        let source = match &state.settings.source {
            NodeSource::Static(_) => json!({"static": true}),
            NodeSource::Dns {
                query, interval, ..
            } => json!({
                "dns": query.to_string(),
                "interval_ms": interval.as_millis() as u64,
                "last_error": state.last_resolution_error,
            }),
        };
        let placement = self.placement();
        let nodes: Vec<Value> = placement
            .nodes()
            .iter()
            .map(|n| {
                let held = load.get(&n.id).copied().unwrap_or_default();
                json!({
                    "id": &*n.id,
                    "connect": &*n.connect,
                    "healthy": n.healthy,
                    "instances": held.instances,
                    "connections": held.connections,
                })
            })
            .collect();
        json!({"source": source, "nodes": nodes})
    }
}

fn static_members(source: &NodeSource) -> Vec<(String, String)> {
    match source {
        NodeSource::Static(nodes) => nodes.iter().map(|n| (n.clone(), n.clone())).collect(),
        NodeSource::Dns { .. } => Vec::new(),
    }
}

fn discovery_of(source: &NodeSource) -> Result<Option<Arc<DnsDiscovery>>, String> {
    match source {
        NodeSource::Static(_) => Ok(None),
        NodeSource::Dns {
            query, nameserver, ..
        } => DnsDiscovery::new(query.clone(), *nameserver).map(|d| Some(Arc::new(d))),
    }
}

/// Every `local` upstream's fleet, kept across reloads by upstream name, and the open
/// connections of all of them.
pub(crate) struct Fleets {
    by_upstream: Mutex<HashMap<String, Arc<Fleet>>>,
    pub owners: Owners,
    pub(crate) metrics: FleetMetrics,
}

impl Fleets {
    /// `metrics`: the families the gateway exports, into which the fleets report.
    pub(crate) fn new(metrics: FleetMetrics) -> Self {
        Fleets {
            by_upstream: Mutex::default(),
            owners: Owners::default(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Fleet>>> {
        self.by_upstream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fleets of a configuration's `local` upstreams: kept ones reconfigured (a changed
    /// placement closes the connections that moved, reason `reload`), new ones made, gone
    /// ones dropped. An upstream whose fleet cannot be made (its resolver cannot be set up)
    /// is left out and logged; its requests answer 503.
    pub fn configure<'a>(
        &self,
        upstreams: impl Iterator<Item = (&'a str, &'a FleetSettings)>,
    ) -> HashMap<String, Arc<Fleet>> {
        let mut kept = HashMap::new();
        let mut by_upstream = self.lock();
        for (name, settings) in upstreams {
            let fleet = match by_upstream.get(name) {
                Some(fleet) => {
                    match fleet.configure(settings.clone()) {
                        Ok(true) => self.placement_changed(fleet, MigrationReason::Reload),
                        Ok(false) => {}
                        Err(why) => log::error!(
                            "upstream {name}: its new node source cannot be used, the old one keeps serving: {why}"
                        ),
                    }
                    Arc::clone(fleet)
                }
                None => match Fleet::new(name, settings.clone()) {
                    Ok(fleet) => Arc::new(fleet),
                    Err(why) => {
                        log::error!("upstream {name}: its nodes cannot be found: {why}");
                        continue;
                    }
                },
            };
            self.metrics.upstream_known(name);
            kept.insert(name.to_owned(), fleet);
        }
        // Connections on the nodes of an upstream that is gone (or no longer `local`) have no
        // home any more: their clients reconnect to wherever their agent now lives.
        for gone in by_upstream.keys().filter(|name| !kept.contains_key(*name)) {
            let moved = self.owners.evict(gone, MigrationReason::Reload);
            if moved > 0 {
                log::warn!("upstream {gone} is gone; {moved} WebSockets on its nodes told to close with 1012");
            }
        }
        *by_upstream = kept.clone();
        self.metrics.forget_other_upstreams(&kept);
        kept
    }

    /// Every fleet in force.
    pub fn all(&self) -> Vec<Arc<Fleet>> {
        self.lock().values().cloned().collect()
    }

    /// Closes, with 1012, the connections whose instance's home `fleet`'s new placement
    /// moved; each counts itself under `why` as it closes.
    pub fn placement_changed(&self, fleet: &Fleet, why: MigrationReason) {
        let moved = self
            .owners
            .migrate(fleet.upstream(), &fleet.placement(), why);
        if moved > 0 {
            log::warn!(
                "upstream {}: placement changed ({}); {moved} WebSockets told to close with 1012 and move to their instances' new homes",
                fleet.upstream(),
                why.label()
            );
        }
    }

    /// An active check's result on node `id` of `fleet`.
    pub fn checked(&self, fleet: &Fleet, id: &str, ok: bool) {
        if fleet.observe(id, ok, false) {
            self.placement_changed(fleet, MigrationReason::Health);
        }
    }

    /// A request's result on node `id` of `fleet`, counted as a passive check: `ok` when the
    /// node answered, not when it could not be reached or refused as unavailable.
    pub fn traffic_observed(&self, fleet: &Fleet, id: &str, ok: bool) {
        if fleet.observe(id, ok, true) {
            self.placement_changed(fleet, MigrationReason::Health);
        }
    }

    /// Sets the node gauges of every fleet to what they are now.
    pub(crate) fn refresh_gauges(&self) {
        for fleet in self.all() {
            let nodes: Vec<(Arc<str>, bool)> = fleet
                .placement()
                .nodes()
                .iter()
                .map(|n| (Arc::clone(&n.id), n.healthy))
                .collect();
            let load = self.owners.load(fleet.upstream());
            self.metrics.set_nodes(fleet.upstream(), &nodes, &load);
        }
    }

    /// Every fleet, for the admin listener's `/fleet`.
    pub(crate) fn describe(&self) -> Value {
        let mut fleets: Vec<Arc<Fleet>> = self.all();
        fleets.sort_by(|a, b| a.upstream.cmp(&b.upstream));
        let upstreams: serde_json::Map<String, Value> = fleets
            .iter()
            .map(|f| (f.upstream.clone(), f.describe(&self.owners)))
            .collect();
        json!({ "upstreams": upstreams })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(nodes: &[&str]) -> FleetSettings {
        FleetSettings {
            source: NodeSource::Static(nodes.iter().map(|n| n.to_string()).collect()),
            health: HealthSettings {
                unhealthy_after: 1,
                healthy_after: 1,
                ..HealthSettings::default()
            },
        }
    }

    #[test]
    fn health_changes_republish_placement_and_move_connections() {
        let fleets = Fleets::new(FleetMetrics::new());
        let three = settings(&["n1", "n2", "n3"]);
        let configured = fleets.configure([("local", &three)].into_iter());
        let fleet = &configured["local"];
        let home = fleet
            .placement()
            .home(&["coder", "a"])
            .expect("home")
            .id
            .clone();
        let signal = fleets.owners.subscribe("local", &home, "coder", "a");
        fleets.traffic_observed(fleet, &home, false);
        let placement = fleet.placement();
        assert_ne!(placement.home(&["coder", "a"]).expect("home").id, home);
        assert_eq!(
            *signal.borrow(),
            crate::websocket::stop::StopOrder::Migrate(MigrationReason::Health)
        );
        fleets.checked(fleet, &home, true);
        assert_eq!(
            fleet.placement().home(&["coder", "a"]).expect("home").id,
            home
        );
        assert!(!fleet.observe("not-a-member", false, false));
    }

    #[test]
    fn a_reload_keeps_health_and_moves_only_what_the_new_list_moves() {
        let fleets = Fleets::new(FleetMetrics::new());
        let three = settings(&["n1", "n2", "n3"]);
        let fleet = Arc::clone(&fleets.configure([("local", &three)].into_iter())["local"]);
        fleets.checked(&fleet, "n3", false);
        let four = settings(&["n1", "n2", "n3", "n4"]);
        let again = fleets.configure([("local", &four)].into_iter());
        assert!(Arc::ptr_eq(&fleet, &again["local"]), "the same fleet");
        let n3 = fleet.placement().node("n3").map(|n| n.healthy);
        assert_eq!(n3, Some(false), "health survives a reload");
        assert!(fleets.configure(std::iter::empty()).is_empty());
    }

    #[test]
    fn a_failed_resolution_keeps_the_last_good_list_and_a_stale_one_is_dropped() {
        let query = DnsQuery::Srv {
            name: "_agent._tcp.nodes.test".into(),
        };
        let dns = FleetSettings {
            source: NodeSource::Dns {
                query: query.clone(),
                interval: Duration::from_secs(10),
                nameserver: Some(SocketAddr::from(([127, 0, 0, 1], 53))),
            },
            ..settings(&[])
        };
        let fleet = Fleet::new("local", dns).expect("fleet");
        let now = Instant::now();
        let by = fleet.due_resolution(now).expect("due at once");
        assert!(
            fleet
                .due_resolution(now + Duration::from_secs(60))
                .is_none(),
            "one at a time"
        );
        let found = vec![DiscoveredNode {
            id: "a:1".into(),
            connect: "127.0.0.1:1".into(),
        }];
        assert!(fleet.resolved(&by, Ok(found.clone())));
        assert!(!fleet.resolved(&by, Ok(found)));
        assert!(!fleet.resolved(&by, Err("SERVFAIL".into())));
        assert_eq!(fleet.placement().nodes().len(), 1);
        let replaced = Arc::new(DnsDiscovery::new(query, None).expect("a resolver"));
        let other = vec![DiscoveredNode {
            id: "b:1".into(),
            connect: "127.0.0.1:2".into(),
        }];
        assert!(
            !fleet.resolved(&replaced, Ok(other)),
            "not the query in force"
        );
        assert_eq!(&*fleet.placement().nodes()[0].id, "a:1");
    }

    #[test]
    fn checks_are_due_once_per_interval() {
        let mut tcp = settings(&["n1"]);
        tcp.health.check = health::ActiveCheck::Tcp;
        let fleet = Fleet::new("local", tcp).expect("fleet");
        let now = Instant::now();
        assert!(fleet.due_checks(now).is_some());
        fleet.checks_done();
        assert!(fleet.due_checks(now).is_none());
        let later = now + Duration::from_secs(5);
        assert!(fleet.due_checks(later).is_some());
        assert!(
            fleet.due_checks(later + Duration::from_secs(5)).is_none(),
            "the last round is still running"
        );
        assert!(fleet.due_resolution(now).is_none(), "a static list");
    }

    #[test]
    fn without_active_checks_only_down_nodes_are_checked() {
        let fleet = Fleet::new("local", settings(&["n1", "n2"])).expect("fleet");
        let now = Instant::now();
        assert!(fleet.due_checks(now).is_none(), "every node is up");
        fleet.observe("n2", false, true);
        let later = now + Duration::from_secs(5);
        let due = fleet.due_checks(later).expect("the down node is due");
        assert_eq!(due.nodes, vec![("n2".to_owned(), "n2".to_owned())]);
    }
}
