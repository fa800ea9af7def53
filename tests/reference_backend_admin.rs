//! Issue 16: the reference backend, the reference agent node, says what it holds and whether
//! it is alive. `GET /admin/instances` counts each instance's open WebSockets (tests of the
//! fleet ask every node where an instance lives); `GET /healthz` answers without the secret
//! or routing headers (the gateway's health checks and the kubelet's probes carry neither).
//! The real binary on 127.0.0.1 and real WebSockets straight to it, no gateway between.

mod common;

use common::*;
use serde_json::json;
use std::time::Instant;

/// A WebSocket to the backend's instance (namespace, room), with the routing headers the
/// gateway would add; returns once the agent has greeted, which it does only after counting
/// the connection.
async fn open(backend: &Proc, namespace: &str, room: &str) -> Ws {
    let url = backend.url(&format!("/agents/{namespace}/{room}"));
    let headers = [
        ("x-partykit-namespace", namespace),
        ("x-partykit-room", room),
    ];
    let (mut ws, _) = connect_headers(&url, &headers).await;
    let greeting = next_json(&mut ws).await;
    assert_eq!(greeting["type"], "cf_agent_identity", "{greeting}");
    ws
}

/// The backend's `GET /admin/instances` answer.
async fn instances(backend: &Proc) -> serde_json::Value {
    let answer = get(backend.address, "/admin/instances", &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json")
    );
    answer.json()
}

/// Polls `/admin/instances` until its `instances` equal `expected`: a connection leaves the
/// count when the backend's side of it ends, just after the client's side did.
async fn wait_instances(backend: &Proc, expected: serde_json::Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let listing = instances(backend).await;
        if listing["instances"] == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "instances are {listing}, expected {expected}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn instance(namespace: &str, room: &str, connections: u64) -> serde_json::Value {
    json!({"namespace": namespace, "room": room, "connections": connections})
}

#[tokio::test]
async fn admin_instances_counts_open_websockets_until_they_end() {
    let backend = start_backend(Some(TEST_KEY));
    assert_eq!(
        instances(&backend).await,
        json!({"node": backend.address.to_string(), "instances": []})
    );

    // Opened out of order; listed by namespace, then room.
    let mut other = open(&backend, "other-agent", "r1").await;
    let mut first = open(&backend, "coder-agent", "r1").await;
    let second = open(&backend, "coder-agent", "r2").await;
    let mut third = open(&backend, "coder-agent", "r1").await;
    // The greeting came after the count: no wait needed on the way up.
    assert_eq!(
        instances(&backend).await,
        json!({"node": backend.address.to_string(), "instances": [
            instance("coder-agent", "r1", 2),
            instance("coder-agent", "r2", 1),
            instance("other-agent", "r1", 1),
        ]})
    );

    // A Close from the client, and a connection dropped without one: both leave the count,
    // and an emptied instance leaves the list.
    first.close(None).await.expect("close sent");
    assert_eq!(close_code(&mut first).await, 1005);
    drop(second);
    wait_instances(
        &backend,
        json!([
            instance("coder-agent", "r1", 1),
            instance("other-agent", "r1", 1)
        ]),
    )
    .await;

    // A Close from the agent's side.
    send_text(
        &mut other,
        r#"{"type":"close","code":4001,"reason":"done"}"#,
    )
    .await;
    assert_eq!(close_code(&mut other).await, 4001);
    wait_instances(&backend, json!([instance("coder-agent", "r1", 1)])).await;

    third.close(None).await.expect("close sent");
    let _ = close_code(&mut third).await;
    wait_instances(&backend, json!([])).await;

    // A new connection to an emptied instance counts from one again.
    let mut again = open(&backend, "coder-agent", "r1").await;
    assert_eq!(
        instances(&backend).await["instances"],
        json!([instance("coder-agent", "r1", 1)])
    );
    again.close(None).await.expect("close sent");
    let _ = close_code(&mut again).await;
    wait_instances(&backend, json!([])).await;
}

#[tokio::test]
async fn healthz_and_admin_answer_without_the_secret_or_routing_headers() {
    let backend = start_backend(None);
    let health = get(backend.address, "/healthz", &[]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(
        health.json(),
        json!({"status": "ok", "node": backend.address.to_string()})
    );
    assert_eq!(
        instances(&backend).await,
        json!({"node": backend.address.to_string(), "instances": []})
    );

    // Agent requests still need the secret: only the node's own paths come before it.
    let routed = [
        ("x-partykit-namespace", "coder-agent"),
        ("x-partykit-room", "r1"),
    ];
    let agent = get(backend.address, "/agents/coder-agent/r1", &routed).await;
    assert_eq!(agent.status, 500);
    assert_eq!(agent.body, "OPENROUTER_API_KEY is not set");

    for path in ["/healthz", "/admin/instances"] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            backend.address
        );
        let refused = raw_request(backend.address, &request).await;
        assert_eq!(refused.status, 405, "POST {path}: {}", refused.body);
        assert_eq!(refused.header("allow").as_deref(), Some("GET"));
        assert!(refused.json()["error"].is_string(), "{}", refused.body);
    }
}
