//! The fleet's metric families, registered by [`crate::telemetry::metrics`] with the rest.
//! Labels are upstream names from the configuration and node ids from the configuration or
//! from DNS: one series per node, as an operator names them.

use super::owners::NodeLoad;
use crate::websocket::metrics::{counter, gauge};
use crate::websocket::stop::MigrationReason;
use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGaugeVec};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct FleetMetrics {
    migrations: IntCounterVec,
    node_healthy: IntGaugeVec,
    node_instances: IntGaugeVec,
    node_connections: IntGaugeVec,
    discovery_failures: IntCounterVec,
    discovered_nodes: IntGaugeVec,
}

impl Default for FleetMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FleetMetrics {
    pub(crate) fn new() -> Self {
        FleetMetrics {
            migrations: counter(
                "agent_gateway_migrations_total",
                "Agent WebSockets closed with 1012 because their instance's home moved to another node, by upstream and reason (health, reload, discovery).",
                &["upstream", "reason"],
            ),
            node_healthy: gauge(
                "agent_gateway_node_healthy",
                "Whether a local upstream's node takes instances (1) or is down (0), as this gateway's checks see it.",
                &["upstream", "node"],
            ),
            node_instances: gauge(
                "agent_gateway_node_instances",
                "Agent instances with open WebSockets through this gateway, by the node they are on.",
                &["upstream", "node"],
            ),
            node_connections: gauge(
                "agent_gateway_node_connections",
                "Open agent WebSockets through this gateway, by the node they are on.",
                &["upstream", "node"],
            ),
            discovery_failures: counter(
                "agent_gateway_discovery_failures_total",
                "Failed DNS resolutions of a local upstream's nodes; the last good list keeps serving.",
                &["upstream"],
            ),
            discovered_nodes: gauge(
                "agent_gateway_fleet_nodes",
                "Nodes in a local upstream's current list (static or from DNS).",
                &["upstream"],
            ),
        }
    }

    pub(crate) fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.migrations.clone()),
            Box::new(self.node_healthy.clone()),
            Box::new(self.node_instances.clone()),
            Box::new(self.node_connections.clone()),
            Box::new(self.discovery_failures.clone()),
            Box::new(self.discovered_nodes.clone()),
        ]
    }

    /// Makes every reason's series exist, so that `increase()` sees the first migration.
    pub(crate) fn upstream_known(&self, upstream: &str) {
        for reason in MigrationReason::ALL {
            self.migrations
                .with_label_values(&[upstream, reason.label()]);
        }
        self.discovery_failures.with_label_values(&[upstream]);
    }

    /// A connection closed with 1012 because its instance moved.
    pub(crate) fn migrated(&self, upstream: &str, why: MigrationReason) {
        self.migrations
            .with_label_values(&[upstream, why.label()])
            .inc();
    }

    pub(crate) fn discovery_failed(&self, upstream: &str) {
        self.discovery_failures.with_label_values(&[upstream]).inc();
    }

    /// Sets the node gauges of `upstream` to what it is now: `nodes` (id, healthy) and the
    /// load of each. Series of nodes that left the list are removed.
    pub(crate) fn set_nodes(
        &self,
        upstream: &str,
        nodes: &[(Arc<str>, bool)],
        load: &BTreeMap<Arc<str>, NodeLoad>,
    ) {
        for family in [
            &self.node_healthy,
            &self.node_instances,
            &self.node_connections,
        ] {
            remove_gone(family, upstream, nodes);
        }
        self.discovered_nodes
            .with_label_values(&[upstream])
            .set(nodes.len() as i64);
        for (id, healthy) in nodes {
            let labels = [upstream, &**id];
            let held = load.get(id).copied().unwrap_or_default();
            self.node_healthy
                .with_label_values(&labels)
                .set(i64::from(*healthy));
            self.node_instances
                .with_label_values(&labels)
                .set(held.instances as i64);
            self.node_connections
                .with_label_values(&labels)
                .set(held.connections as i64);
        }
    }
}

impl FleetMetrics {
    /// Removes the gauges of upstreams that are no longer fleets, so that no alert fires
    /// forever on a node of an upstream that is gone.
    pub(crate) fn forget_other_upstreams<V>(&self, fleets: &HashMap<String, V>) {
        for family in [
            &self.node_healthy,
            &self.node_instances,
            &self.node_connections,
            &self.discovered_nodes,
        ] {
            for labels in series_labels(family) {
                let upstream = labels.get("upstream");
                if upstream.is_some_and(|u| !fleets.contains_key(u.as_str())) {
                    let _ = family.remove(&as_refs(&labels));
                }
            }
        }
    }
}

/// Every series of `family` as its labels, by name.
fn series_labels(family: &IntGaugeVec) -> Vec<HashMap<String, String>> {
    family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| {
            m.get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect()
        })
        .collect()
}

fn as_refs(labels: &HashMap<String, String>) -> HashMap<&str, &str> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Removes the series of `upstream`'s nodes that are not in `nodes` any more.
fn remove_gone(family: &IntGaugeVec, upstream: &str, nodes: &[(Arc<str>, bool)]) {
    for labels in series_labels(family) {
        let (Some(series_upstream), Some(node)) = (labels.get("upstream"), labels.get("node"))
        else {
            continue;
        };
        if series_upstream == upstream && !nodes.iter().any(|(id, _)| **id == **node) {
            let _ = family.remove(&as_refs(&labels));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(metrics: &FleetMetrics) -> usize {
        series_labels(&metrics.node_healthy).len()
    }

    #[test]
    fn series_of_nodes_and_upstreams_that_left_are_removed() {
        let metrics = FleetMetrics::new();
        let (n1, n2): (Arc<str>, Arc<str>) = (Arc::from("n1"), Arc::from("n2"));
        let load = BTreeMap::new();
        metrics.set_nodes("a", &[(n1.clone(), true), (n2, false)], &load);
        metrics.set_nodes("b", &[(n1.clone(), true)], &load);
        assert_eq!(series(&metrics), 3);
        metrics.set_nodes("a", &[(n1, true)], &load);
        assert_eq!(series(&metrics), 2, "n2 left upstream a");
        let only_b: HashMap<String, ()> = [("b".to_owned(), ())].into();
        metrics.forget_other_upstreams(&only_b);
        assert_eq!(series(&metrics), 1, "upstream a is gone");
        assert_eq!(series_labels(&metrics.discovered_nodes).len(), 1);
    }
}
