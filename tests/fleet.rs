//! Issue 16: a `local` upstream's fleet through the real gateway in front of real reference
//! nodes: health (active and passive), 503 when every node is down, migration with 1012 on
//! both sides, and nodes from a real DNS server whose records change during the test.

mod common;

use common::dns::TestDns;
use common::fleet::*;
use common::*;
use std::net::{IpAddr, SocketAddr};

/// An instance of CoderAgent whose home over `nodes` (all up) is `wanted`.
fn instance_homed_on(nodes: &[SocketAddr], wanted: SocketAddr, prefix: &str) -> String {
    let all_up = placement(nodes, &[]);
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|room| home(&all_up, room) == wanted.to_string())
        .expect("some instance lives on every node")
}

/// What `node` says instance `room` of CoderAgent received: its Closes, in order.
async fn closes_received(node: SocketAddr, room: &str) -> serde_json::Value {
    let routing = [("x-partykit-namespace", SLUG), ("x-partykit-room", room)];
    get(node, "/state", &routing).await.json()["received_closes"].clone()
}

async fn wait_health(gateway: &Gateway, node: SocketAddr, healthy: bool) {
    let id = node.to_string();
    wait_until("the node's health in /fleet", WAIT, || async {
        let health = fleet_health(&fleet(gateway).await);
        match health.get(&id) {
            Some(h) if *h == healthy => Ok(()),
            other => Err(format!("{id} is {other:?}")),
        }
    })
    .await
}

#[tokio::test]
async fn every_node_down_answers_503_naming_the_upstream_without_trying_them() {
    let [a, b] = free_ports::<2>().map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let gateway = start_gateway(&fleet_config(&[a, b]));
    wait_health(&gateway, a, false).await;
    wait_health(&gateway, b, false).await;
    let answer = get(gateway.address(), "/agents/CoderAgent/room", &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "no_healthy_node");
    assert_eq!(body["upstream"], "local");
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/room")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no_healthy_node"), "{body}");
    let metrics = gateway.metrics().await;
    for node in [a, b] {
        let series = format!("agent_gateway_node_healthy{{node=\"{node}\",upstream=\"local\"}}");
        assert_eq!(metric_value(&metrics, &series), 0.0, "{series}");
    }
}

#[tokio::test]
async fn a_node_that_returns_takes_its_instances_back_with_1012_on_both_sides() {
    let first = start_backend(Some(TEST_KEY));
    let second = start_backend(Some(TEST_KEY));
    let (a, b) = (first.address, second.address);
    let gateway = start_gateway(&fleet_config(&[a, b]));
    let moving = instance_homed_on(&[a, b], b, "moving");
    let staying = instance_homed_on(&[a, b], a, "staying");

    // The second node dies: its instance goes to its next choice, the first node.
    drop(second);
    wait_health(&gateway, b, false).await;
    let mut moved = connect(&gateway.url(&format!("/agents/CoderAgent/{moving}"))).await;
    let mut stayed = connect(&gateway.url(&format!("/agents/CoderAgent/{staying}"))).await;
    next_json(&mut moved).await;
    next_json(&mut stayed).await;
    let on_a = node_instances(a).await;
    assert_eq!(on_a.rooms.get(&moving), Some(&1), "{on_a:?}");

    // It comes back: the moved instance's connection is closed with 1012 on both sides.
    let _second = start_backend_at(b, Some(TEST_KEY));
    assert_eq!(close_code(&mut moved).await, 1012);
    wait_until("the first node saw the 1012", WAIT, || async {
        let closes = closes_received(a, &moving).await;
        if closes == serde_json::json!([1012]) {
            Ok(())
        } else {
            Err(format!("closes {closes}"))
        }
    })
    .await;
    // The instance that lived on the first node all along was not touched.
    assert_echo(&mut stayed, "still here").await;
    let migrations = "agent_gateway_migrations_total{reason=\"health\",upstream=\"local\"}";
    // Counted as the connection ends, just after its Close reached the client.
    gateway.wait_metric(migrations, 1.0).await;
    wait_until("the close is counted as migrated", WAIT, || async {
        let causes = gateway.metrics().await;
        let cause = "cause=\"migrated\"";
        match metric_sum(&causes, "agent_gateway_ws_close_causes_total", &[cause]) {
            1.0 => Ok(()),
            n => Err(format!("{n} migrated closes")),
        }
    })
    .await;

    // Reconnected, it is home again, and the temporary home holds nothing of it.
    let mut back = connect(&gateway.url(&format!("/agents/CoderAgent/{moving}"))).await;
    next_json(&mut back).await;
    let reports = node_reports(&[a, b]).await;
    assert_eq!(instances_on_two_nodes(&reports), 0, "{reports:?}");
    assert_eq!(reports[1].rooms.get(&moving), Some(&1), "{reports:?}");
}

#[tokio::test]
async fn failed_connections_take_a_node_down_before_its_next_check() {
    let first = start_backend(Some(TEST_KEY));
    let second = start_backend(Some(TEST_KEY));
    let (a, b) = (first.address, second.address);
    // Active checks far apart: only real traffic can tell the gateway the node is gone.
    let config = fleet_config(&[a, b]).replace(
        &format!("health_interval = \"{}ms\"", HEALTH_INTERVAL.as_millis()),
        "health_interval = \"1h\"",
    );
    let gateway = start_gateway(&config);
    wait_until("the first active round", WAIT, || async {
        let metrics = gateway.metrics().await;
        match metric_value(&metrics, "agent_gateway_fleet_nodes{upstream=\"local\"}") {
            2.0 => Ok(()),
            n => Err(format!("{n} nodes")),
        }
    })
    .await;
    drop(second);
    let room = instance_homed_on(&[a, b], b, "passive");
    let path = format!("/agents/CoderAgent/{room}");
    for attempt in 0..UNHEALTHY_AFTER {
        let (status, body) = connect_refused(&gateway.url(&path)).await;
        assert_eq!(status, 502, "attempt {attempt}: {body}");
    }
    let health = fleet_health(&fleet(&gateway).await);
    assert_eq!(health.get(&b.to_string()), Some(&false), "{health:?}");
    // Refused upgrades are not connections: nothing was migrated.
    let migrations = "agent_gateway_migrations_total{reason=\"health\",upstream=\"local\"}";
    assert_eq!(gateway.metric(migrations).await, 0.0);
    let mut ws = connect(&gateway.url(&path)).await;
    next_json(&mut ws).await;
    assert_eq!(node_instances(a).await.rooms.get(&room), Some(&1));
}

/// The SRV name the DNS tests publish their nodes under.
const SRV: &str = "_agent._tcp.fleet.test";

fn dns_config(dns: &TestDns, source: &str) -> String {
    fleet_config(&[]).replace(
        "nodes = []",
        &format!(
            "{source}\nnameserver = \"{}\"\nresolve_interval = \"200ms\"",
            dns.addr
        ),
    )
}

async fn wait_fleet_ids(gateway: &Gateway, ids: &[String]) {
    wait_until("the fleet lists the DNS nodes", WAIT, || async {
        let health = fleet_health(&fleet(gateway).await);
        let listed: Vec<&String> = health.keys().collect();
        if listed == ids.iter().collect::<Vec<_>>() {
            Ok(())
        } else {
            Err(format!("listed {listed:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn nodes_from_srv_records_follow_dns_and_survive_its_failures() {
    let dns = TestDns::start();
    let first = start_backend(Some(TEST_KEY));
    let second = start_backend(Some(TEST_KEY));
    let localhost: IpAddr = [127, 0, 0, 1].into();
    dns.set_a("node-a.fleet.test", &[localhost]);
    dns.set_a("node-b.fleet.test", &[localhost]);
    dns.set_srv(SRV, &[("node-a.fleet.test", first.address.port())]);
    let gateway = start_gateway(&dns_config(&dns, &format!("srv = \"{SRV}\"")));
    let id_a = format!("node-a.fleet.test:{}", first.address.port());
    let id_b = format!("node-b.fleet.test:{}", second.address.port());
    wait_fleet_ids(&gateway, std::slice::from_ref(&id_a)).await;

    // An instance whose home will be the second node, once DNS lists it.
    let both = [id_a.clone(), id_b.clone()];
    let both = agent_gateway::fleet::placement::Placement::new(
        both.iter()
            .map(|id| agent_gateway::fleet::placement::PlacedNode::new(id, id, true))
            .collect(),
    );
    let room = (0..)
        .map(|i| format!("dns-{i}"))
        .find(|room| home(&both, room) == id_b)
        .expect("an instance for the second node");
    let mut ws = connect(&gateway.url(&format!("/agents/CoderAgent/{room}"))).await;
    next_json(&mut ws).await;
    assert_eq!(
        node_instances(first.address).await.rooms.get(&room),
        Some(&1)
    );

    dns.set_srv(
        SRV,
        &[
            ("node-a.fleet.test", first.address.port()),
            ("node-b.fleet.test", second.address.port()),
        ],
    );
    assert_eq!(close_code(&mut ws).await, 1012, "moved to the new node");
    wait_fleet_ids(&gateway, &[id_a.clone(), id_b.clone()]).await;
    let migrations = "agent_gateway_migrations_total{reason=\"discovery\",upstream=\"local\"}";
    // Counted as the connection ends, just after its Close reached the client.
    gateway.wait_metric(migrations, 1.0).await;
    let mut ws = connect(&gateway.url(&format!("/agents/CoderAgent/{room}"))).await;
    next_json(&mut ws).await;
    assert_eq!(
        node_instances(second.address).await.rooms.get(&room),
        Some(&1)
    );

    // A broken DNS server, then a vanished name: the last good list keeps serving.
    let failures = "agent_gateway_discovery_failures_total{upstream=\"local\"}";
    for break_dns in [
        |d: &TestDns| d.fail(true),
        |d: &TestDns| {
            d.fail(false);
            d.remove(SRV)
        },
    ] {
        let before = gateway.metric(failures).await;
        break_dns(&dns);
        wait_until("a failed resolution is counted", WAIT, || async {
            let now = gateway.metric(failures).await;
            if now > before {
                Ok(())
            } else {
                Err(format!("{now} failures"))
            }
        })
        .await;
        let listed = fleet(&gateway).await;
        assert_eq!(fleet_health(&listed).len(), 2, "{listed}");
        assert!(
            listed["upstreams"]["local"]["source"]["last_error"].is_string(),
            "{listed}"
        );
        assert_echo(&mut ws, "still served").await;
    }
}

#[tokio::test]
async fn nodes_from_address_records_take_the_configured_port() {
    let dns = TestDns::start();
    let first = start_backend(Some(TEST_KEY));
    let port = first.address.port();
    // The second node on another loopback address, on the same port: A records carry none.
    let second = start_backend_at(SocketAddr::from(([127, 0, 0, 2], port)), Some(TEST_KEY));
    dns.set_a("nodes.fleet.test", &[[127, 0, 0, 1].into()]);
    let source = format!("dns = \"nodes.fleet.test\"\nport = {port}");
    let gateway = start_gateway(&dns_config(&dns, &source));
    wait_fleet_ids(&gateway, &[first.address.to_string()]).await;
    let answer = get(gateway.address(), "/agents/CoderAgent/a-records", &[]).await;
    assert_eq!(answer.json()["node"], first.address.to_string());

    dns.set_a("nodes.fleet.test", &[[127, 0, 0, 2].into()]);
    wait_fleet_ids(&gateway, &[second.address.to_string()]).await;
    let answer = get(gateway.address(), "/agents/CoderAgent/a-records", &[]).await;
    assert_eq!(answer.json()["node"], second.address.to_string());
}

#[tokio::test]
async fn an_application_error_does_not_take_a_node_down() {
    // A node without its key answers every request 500 "OPENROUTER_API_KEY is not set": the
    // node is up, the agent is not, and no other instance should move.
    let keyless = start_backend(None);
    let gateway = start_gateway(&fleet_config(&[keyless.address]));
    for _ in 0..(UNHEALTHY_AFTER + 2) {
        let answer = get(gateway.address(), "/agents/CoderAgent/app", &[]).await;
        assert_eq!(answer.json()["error"], "secret_missing", "{}", answer.body);
        let (status, _) = connect_refused(&gateway.url("/agents/CoderAgent/app-ws")).await;
        assert_eq!(status, 503);
    }
    let health = fleet_health(&fleet(&gateway).await);
    assert_eq!(
        health.get(&keyless.address.to_string()),
        Some(&true),
        "{health:?}"
    );
}

#[tokio::test]
async fn an_upstream_removed_by_a_reload_closes_its_connections_with_1012() {
    let node = start_backend(Some(TEST_KEY));
    let config = fleet_config(&[node.address]);
    let gateway = start_gateway(&config);
    let mut ws = connect(&gateway.url("/agents/CoderAgent/leaving")).await;
    next_json(&mut ws).await;
    // The agent now lives on a Worker: the local upstream is gone.
    let worker = config
        .replace(
            "[upstreams.local]\nkind = \"local\"",
            "[upstreams.local]\nkind = \"worker\"\ntls = false",
        )
        .replace(
            &format!("nodes = [\"{}\"]", node.address),
            &format!("address = \"{}\"", node.address),
        );
    let worker: String = worker
        .lines()
        .filter(|l| {
            !l.starts_with("health_") && !l.starts_with("healthy_") && !l.starts_with("unhealthy_")
        })
        .collect::<Vec<_>>()
        .join("\n");
    reload_with(&gateway, &worker).await;
    assert_eq!(close_code(&mut ws).await, 1012);
    let migrations = "agent_gateway_migrations_total{reason=\"reload\",upstream=\"local\"}";
    // Counted as the connection ends, just after its Close reached the client.
    gateway.wait_metric(migrations, 1.0).await;
}

#[tokio::test]
async fn a_reload_resolves_dns_again_at_once() {
    let dns = TestDns::start();
    let first = start_backend(Some(TEST_KEY));
    let second = start_backend(Some(TEST_KEY));
    dns.set_a("node-a.fleet.test", &[[127, 0, 0, 1].into()]);
    dns.set_srv(SRV, &[("node-a.fleet.test", first.address.port())]);
    // Resolved at start, then not for an hour: only the reload can pick the change up.
    let config = dns_config(&dns, &format!("srv = \"{SRV}\""))
        .replace("resolve_interval = \"200ms\"", "resolve_interval = \"1h\"");
    let gateway = start_gateway(&config);
    let id_a = format!("node-a.fleet.test:{}", first.address.port());
    wait_fleet_ids(&gateway, std::slice::from_ref(&id_a)).await;
    dns.set_srv(SRV, &[("node-a.fleet.test", second.address.port())]);
    reload_with(&gateway, &config).await;
    let id_b = format!("node-a.fleet.test:{}", second.address.port());
    wait_fleet_ids(&gateway, &[id_b]).await;
}
