//! Helpers for the tests of a `local` upstream's fleet (issue 16): configs with health
//! checks, the gateway's `/fleet`, each node's own `/admin/instances`, placement as the
//! gateway computes it, and bounded polling.

use super::{get, local_config, raw_request, Gateway, WAIT};
use agent_gateway::fleet::placement::{PlacedNode, Placement};
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The agent slug of CoderAgent, the first part of an instance's placement key.
pub const SLUG: &str = "coder-agent";
/// The fleet configs' active check interval and failure threshold.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(300);
pub const HEALTHY_AFTER: u32 = 2;
pub const UNHEALTHY_AFTER: u32 = 2;
/// How often [`wait_until`] looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// [`local_config`] over `nodes` with active health checks (`/healthz` every
/// [`HEALTH_INTERVAL`], 200 ms timeout, [`HEALTHY_AFTER`] / [`UNHEALTHY_AFTER`]) and no
/// per-address limits (every test client is 127.0.0.1).
pub fn fleet_config(nodes: &[SocketAddr]) -> String {
    let health = format!(
        "connect_timeout = \"2s\"\nhealth_path = \"/healthz\"\nhealth_interval = \"{}ms\"\n\
         health_timeout = \"200ms\"\nhealthy_after = {HEALTHY_AFTER}\nunhealthy_after = {UNHEALTHY_AFTER}\n",
        HEALTH_INTERVAL.as_millis()
    );
    local_config(nodes).replace("connect_timeout = \"2s\"\n", &health)
        + "\n[limits]\nupgrades_per_ip_per_second = 0\nwebsockets_per_ip = 0\n"
}

/// Rewrites a running gateway's config file with `config` (its placeholders filled with the
/// addresses the gateway listens on) and reloads it through the admin listener.
pub async fn reload_with(gateway: &Gateway, config: &str) {
    let text = config
        .replace("{listen}", &gateway.address().to_string())
        .replace("{admin}", &gateway.admin.to_string());
    std::fs::write(gateway.config_path(), text).expect("config rewritten");
    let request = format!(
        "POST /reload HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        gateway.admin
    );
    let answer = raw_request(gateway.admin, &request).await;
    assert_eq!(answer.status, 200, "reload: {}", answer.body);
}

/// The gateway's `GET /fleet`.
pub async fn fleet(gateway: &Gateway) -> Value {
    let answer = get(gateway.admin, "/fleet", &[]).await;
    assert_eq!(answer.status, 200, "/fleet: {}", answer.body);
    answer.json()
}

/// Node id -> healthy, for the `local` upstream in a `/fleet` answer.
pub fn fleet_health(fleet: &Value) -> BTreeMap<String, bool> {
    let nodes = fleet["upstreams"]["local"]["nodes"].as_array();
    nodes
        .unwrap_or_else(|| panic!("no local upstream in {fleet}"))
        .iter()
        .map(|n| {
            let id = n["id"].as_str().expect("a node id").to_owned();
            (id, n["healthy"].as_bool().expect("healthy is a boolean"))
        })
        .collect()
}

/// What one node says it holds: `room -> open connections` of agent [`SLUG`].
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub node: String,
    pub rooms: BTreeMap<String, u64>,
}

/// A node's `GET /admin/instances`, its own count of open WebSockets per instance.
pub async fn node_instances(node: SocketAddr) -> NodeReport {
    let answer = get(node, "/admin/instances", &[]).await;
    assert_eq!(
        answer.status, 200,
        "{node}/admin/instances: {}",
        answer.body
    );
    let body = answer.json();
    let listed = body["instances"].as_array();
    let rooms = listed
        .unwrap_or_else(|| panic!("no instances in {body}"))
        .iter()
        .map(|i| {
            assert_eq!(i["namespace"], SLUG, "an instance of another agent: {i}");
            let room = i["room"].as_str().expect("a room").to_owned();
            (room, i["connections"].as_u64().expect("a count"))
        })
        .collect();
    let node_name = body["node"]
        .as_str()
        .expect("the node's address")
        .to_owned();
    assert_eq!(node_name, node.to_string());
    NodeReport {
        node: node_name,
        rooms,
    }
}

/// Every listed node's report, asked at once.
pub async fn node_reports(nodes: &[SocketAddr]) -> Vec<NodeReport> {
    futures_util::future::join_all(nodes.iter().map(|n| node_instances(*n))).await
}

/// Instances with live connections on more than one node, by the nodes' own reports.
pub fn instances_on_two_nodes(reports: &[NodeReport]) -> usize {
    let mut nodes_of: BTreeMap<&str, usize> = BTreeMap::new();
    for report in reports {
        for room in report.rooms.keys() {
            *nodes_of.entry(room).or_default() += 1;
        }
    }
    nodes_of.values().filter(|n| **n > 1).count()
}

/// Distinct instances with live connections on any node.
pub fn instances_total(reports: &[NodeReport]) -> usize {
    let mut rooms: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.rooms.keys().map(String::as_str))
        .collect();
    rooms.sort_unstable();
    rooms.dedup();
    rooms.len()
}

/// The placement a gateway computes over `nodes` with `down` marked unhealthy.
pub fn placement(nodes: &[SocketAddr], down: &[SocketAddr]) -> Placement {
    Placement::new(
        nodes
            .iter()
            .map(|n| {
                let id = n.to_string();
                PlacedNode::new(&id, &id, !down.contains(n))
            })
            .collect(),
    )
}

/// The home of CoderAgent's `room` under `placement`, as a node id ("127.0.0.1:port").
pub fn home(placement: &Placement, room: &str) -> String {
    let node = placement.home(&[SLUG, room]).expect("a healthy node");
    node.id.to_string()
}

/// Polls `check` every [`POLL`] until it gives `Ok`, for at most `within`; panics with
/// `what` and the last reason it gave otherwise.
pub async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        // One look may not itself outlast the deadline by more than a single request's WAIT.
        let look = tokio::time::timeout(WAIT, check()).await;
        let why = match look {
            Ok(Ok(value)) => return value,
            Ok(Err(why)) => why,
            Err(_) => format!("one check took over {WAIT:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not so after {within:?}: {why}"
        );
        tokio::time::sleep(POLL).await;
    }
}
