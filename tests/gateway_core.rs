//! Issue 3 acceptance: the real gateway in front of the real reference backend.

mod common;

use agent_gateway::fleet::placement::{PlacedNode, Placement};
use common::*;

#[tokio::test]
async fn every_spelling_echoes_through_the_gateway() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    for spelling in [
        "CoderAgent",
        "coderagent",
        "coder-agent",
        "coder_agent",
        "CODER_AGENT",
    ] {
        let mut ws = connect(&gateway.url(&format!("/agents/{spelling}/default?_pk=conn-1"))).await;
        let identity = next_json(&mut ws).await;
        assert_eq!(identity["type"], "cf_agent_identity", "{spelling}");
        assert_eq!(identity["agent"], "coder-agent", "{spelling}");
        assert_eq!(identity["name"], "default", "{spelling}");
        send_text(&mut ws, &format!("hello from {spelling}")).await;
        let echo = next_message(&mut ws).await;
        assert_eq!(
            echo.into_text().expect("text").as_str(),
            format!("hello from {spelling}")
        );
        ws.close(None).await.expect("close");
        assert_eq!(close_code(&mut ws).await, 1005);
    }
}

#[tokio::test]
async fn direct_connection_fails_as_in_the_field_and_the_gateway_fixes_it() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    let (status, body) = connect_refused(&backend.url("/agents/coder-agent/default")).await;
    assert_eq!(status, 500);
    assert!(
        body.starts_with("Missing namespace or room headers when connecting to CoderAgent.\nDid you try connecting directly to this Durable Object? Try using getServerByName(namespace, id) instead."),
        "{body}"
    );
    let mut ws = connect(&gateway.url("/agents/coder-agent/default")).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
}

#[tokio::test]
async fn instance_is_case_sensitive_and_defaults() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    let mut ws = connect(&gateway.url("/agents/CoderAgent")).await;
    assert_eq!(next_json(&mut ws).await["name"], "default");
    let mut ws = connect(&gateway.url("/agents/CoderAgent/Default")).await;
    assert_eq!(next_json(&mut ws).await["name"], "Default");
}

#[tokio::test]
async fn client_routing_headers_never_reach_the_backend() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    let spoofs = [
        ("x-partykit-room", "someone-elses-room"),
        ("X-PartyKit-Namespace", "admin-agent"),
        ("x-agents-impersonate", "1"),
    ];
    // Plain HTTP: the backend reports every header it received.
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/mine/info?_pk=abc",
        &spoofs,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = answer.json();
    assert_eq!(seen["room"], "mine");
    assert_eq!(seen["agent"], "coder-agent");
    assert_eq!(seen["path"], "/agents/coder-agent/mine/info?_pk=abc");
    assert!(
        seen["headers"].get("x-agents-impersonate").is_none(),
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    // WebSocket: the identity names the room the gateway chose, not the spoofed one.
    let request = ws_request(&gateway.url("/agents/CoderAgent/mine"), &spoofs);
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    let identity = next_json(&mut ws).await;
    assert_eq!(identity["name"], "mine");
    assert_eq!(identity["agent"], "coder-agent");
}

#[tokio::test]
async fn unknown_agents_and_bad_paths_never_reach_an_upstream() {
    // No backend at all: any forwarded request would answer 502, not these.
    let gateway = start_gateway(&local_config(&["127.0.0.1:9".parse().expect("addr")]));
    let answer = get(gateway.address(), "/agents/SupportAgent/default", &[]).await;
    assert_eq!(answer.status, 404);
    let body = answer.json();
    assert_eq!(body["error"], "unknown_agent");
    assert_eq!(body["agent"], "SupportAgent");
    assert_eq!(body["known_agents"], serde_json::json!(["CoderAgent"]));
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json")
    );

    let (status, body) = connect_refused(&gateway.url("/agents/SupportAgent/default")).await;
    assert_eq!(status, 404);
    assert!(body.contains("unknown_agent"), "{body}");

    for (path, kind) in [
        ("/agents/CoderAgent/..", "dot_segment"),
        ("/agents/CoderAgent/default/../../Other/x", "dot_segment"),
        ("/agents/CoderAgent/%2e%2e", "dot_segment"),
        ("/agents/CoderAgent/a%2Fb", "invalid_instance_segment"),
        ("/agents/CoderAgent/a%2fb/x", "invalid_instance_segment"),
        ("/agents/CoderAgent/a%00b", "control_byte"),
        ("/agents/Coder.Agent/x", "invalid_agent_segment"),
        ("/agents//default", "missing_agent"),
    ] {
        let answer = get(gateway.address(), path, &[]).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        assert_eq!(answer.json()["error"], kind, "{path}");
    }
    let answer = get(gateway.address(), "/elsewhere", &[]).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["error"], "no_route");
}

#[tokio::test]
async fn upstream_down_answers_502_with_json() {
    let port = free_port(); // nothing listens here
    let gateway = start_gateway(&local_config(&[format!("127.0.0.1:{port}")
        .parse()
        .expect("addr")]));
    let answer = get(gateway.address(), "/agents/CoderAgent/default", &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(body["upstream"], "local");
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/default")).await;
    assert_eq!(status, 502);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(body["upstream"], "local");
}

#[tokio::test]
async fn instances_stay_on_their_home_node() {
    let first = start_backend(Some(TEST_KEY));
    let second = start_backend(Some(TEST_KEY));
    let nodes = [first.address, second.address];
    let gateway = start_gateway(&local_config(&nodes));
    let ring = Placement::new(
        nodes
            .iter()
            .map(|a| PlacedNode::new(&a.to_string(), &a.to_string(), true))
            .collect(),
    );
    let mut served = std::collections::HashMap::new();
    for i in 0..16 {
        let instance = format!("room-{i}");
        let expected = ring
            .home(&["coder-agent", &instance])
            .expect("node")
            .id
            .to_string();
        for _ in 0..2 {
            let answer = get(
                gateway.address(),
                &format!("/agents/CoderAgent/{instance}"),
                &[],
            )
            .await;
            assert_eq!(answer.json()["node"], expected.as_str(), "{instance}");
        }
        served.insert(instance, expected);
    }
    let used: std::collections::HashSet<_> = served.values().collect();
    assert_eq!(
        used.len(),
        2,
        "both nodes should hold instances: {served:?}"
    );

    // Two clients of one instance meet on its home node: each sees the other's messages.
    let mut alice = connect(&gateway.url("/agents/CoderAgent/shared")).await;
    let mut bob = connect(&gateway.url("/agents/coder-agent/shared")).await;
    next_json(&mut alice).await;
    next_json(&mut bob).await;
    send_text(&mut alice, "hi bob").await;
    assert_eq!(
        next_message(&mut alice)
            .await
            .into_text()
            .expect("text")
            .as_str(),
        "hi bob"
    );
    assert_eq!(
        next_message(&mut bob)
            .await
            .into_text()
            .expect("text")
            .as_str(),
        "hi bob"
    );

    // Remove the second node: instances that lived on the first stay there.
    drop(gateway);
    let gateway = start_gateway(&local_config(&[first.address]));
    for (instance, node) in &served {
        if *node == first.address.to_string() {
            let answer = get(
                gateway.address(),
                &format!("/agents/CoderAgent/{instance}"),
                &[],
            )
            .await;
            assert_eq!(answer.json()["node"], node.as_str());
        }
    }
}

#[tokio::test]
async fn upstream_that_never_answers_gets_504_with_json() {
    // Accepts connections and reads, but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = silent.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let config = local_config(&[address]).replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nread_timeout = \"300ms\"",
    );
    let gateway = start_gateway(&config);
    let answer = get(gateway.address(), "/agents/CoderAgent/default", &[]).await;
    assert_eq!(answer.status, 504, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(body["upstream"], "local");
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/default")).await;
    assert_eq!(status, 504, "{body}");
}
