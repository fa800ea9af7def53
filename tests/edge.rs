//! Issue 8 edge hardening: each limit hit once with its status and metric, client addresses
//! from trusted proxies only, and structured access and connection logs.

mod common;

use common::*;
use std::time::Duration;

fn with_sections(backend: std::net::SocketAddr, sections: &str) -> String {
    local_config(&[backend]) + sections
}

fn refusals(limit: &str) -> String {
    format!("agent_gateway_limit_refusals_total{{limit=\"{limit}\"}}")
}

#[tokio::test]
async fn header_and_body_size_limits() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&with_sections(
        backend.address,
        "\n[limits]\nmax_request_header_bytes = 1024\nmax_request_body_bytes = 16\n",
    ));
    let big = "x".repeat(2048);
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/x",
        &[("x-big", big.as_str())],
    )
    .await;
    assert_eq!(answer.status, 431);
    assert_eq!(answer.json()["error"], "request_header_too_large");
    let answer = raw_request(
        gateway.address(),
        "POST /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"], "request_body_too_large");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, &refusals("request_header_too_large")),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, &refusals("request_body_too_large")),
        1.0
    );
}

#[tokio::test]
async fn a_body_without_a_declared_length_is_bounded_on_the_way() {
    // The node reads and never answers: the gateway's 413 is the only answer there can be.
    let (node, _accepting) = common::auth::serve(|mut stream| async move {
        let mut sink = [0u8; 4096];
        while matches!(
            tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await,
            Ok(n) if n > 0
        ) {}
    })
    .await;
    let gateway = start_gateway(&with_sections(
        node,
        "\n[limits]\nmax_request_body_bytes = 16\n",
    ));
    let chunk = "x".repeat(10);
    let body = format!("a\r\n{chunk}\r\na\r\n{chunk}\r\n0\r\n\r\n");
    let answer = raw_request(
        gateway.address(),
        &format!(
            "POST /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        ),
    )
    .await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"], "request_body_too_large");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, &refusals("request_body_too_large")),
        1.0
    );
}

#[tokio::test]
async fn upgrade_rate_per_client_address() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&with_sections(
        backend.address,
        "\n[limits]\nupgrades_per_ip_per_second = 2\nwebsockets_per_ip = 0\n",
    ));
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let (status, _) =
            match tokio_tungstenite::connect_async(gateway.url("/agents/CoderAgent/rate")).await {
                Ok(_) => (101, String::new()),
                Err(_) => connect_refused(&gateway.url("/agents/CoderAgent/rate")).await,
            };
        statuses.push(status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(gateway.metric(&refusals("upgrade_rate")).await >= 1.0);
}

#[tokio::test]
async fn open_websockets_per_client_and_in_total() {
    let backend = start_backend(Some(TEST_KEY));
    let per_ip = start_gateway(&with_sections(
        backend.address,
        "\n[limits]\nwebsockets_per_ip = 1\n",
    ));
    let mut first = connect(&per_ip.url("/agents/CoderAgent/a")).await;
    next_json(&mut first).await;
    let (status, body) = connect_refused(&per_ip.url("/agents/CoderAgent/b")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(per_ip.metric(&refusals("websockets_per_ip")).await, 1.0);
    // Closing the first frees the place.
    first.close(None).await.expect("close");
    close_code(&mut first).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match tokio_tungstenite::connect_async(per_ip.url("/agents/CoderAgent/b")).await {
            Ok(_) => break,
            Err(_) => assert!(
                std::time::Instant::now() < deadline,
                "the place was never freed"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let total = start_gateway(&with_sections(
        backend.address,
        "\n[limits]\nwebsockets_per_ip = 0\nwebsockets_total = 1\n",
    ));
    let mut only = connect(&total.url("/agents/CoderAgent/a")).await;
    next_json(&mut only).await;
    let (status, _) = connect_refused(&total.url("/agents/CoderAgent/b")).await;
    assert_eq!(status, 503);
    assert_eq!(total.metric(&refusals("websockets_total")).await, 1.0);
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&with_sections(
        backend.address,
        "\n[websocket]\nmax_message_bytes = 1024\n",
    ));
    let mut ws = connect(&gateway.url("/agents/CoderAgent/big")).await;
    next_json(&mut ws).await;
    send_text(&mut ws, &"y".repeat(1000)).await;
    assert_eq!(
        next_message(&mut ws).await.into_text().expect("text").len(),
        1000
    );
    send_text(&mut ws, &"z".repeat(2048)).await;
    assert_eq!(close_code(&mut ws).await, 1009);
    gateway
        .wait_metric(
            "agent_gateway_ws_protocol_errors_total{agent=\"CoderAgent\",kind=\"message_too_big\"}",
            1.0,
        )
        .await;
    let received = get(gateway.address(), "/agents/CoderAgent/big", &[]).await;
    assert_eq!(
        received.json()["received_closes"],
        serde_json::json!([1009])
    );
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let backend = start_backend(Some(TEST_KEY));
    let untrusted = start_gateway(&local_config(&[backend.address]));
    let seen = get(
        untrusted.address(),
        "/agents/CoderAgent/x",
        &[("X-Forwarded-For", "6.6.6.6")],
    )
    .await;
    assert_eq!(seen.json()["headers"]["x-forwarded-for"], "127.0.0.1");

    let trusted = start_gateway(&local_config(&[backend.address]).replace(
        "threads = 2",
        "threads = 2\ntrusted_proxies = [\"127.0.0.0/8\"]",
    ));
    let seen = get(
        trusted.address(),
        "/agents/CoderAgent/x",
        &[("X-Forwarded-For", "203.0.113.7")],
    )
    .await;
    assert_eq!(
        seen.json()["headers"]["x-forwarded-for"],
        "203.0.113.7, 127.0.0.1"
    );
}

#[tokio::test]
async fn access_and_connection_lines_in_json() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&with_sections(
        backend.address,
        "\n[log]\nformat = \"json\"\n",
    ));
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/alice-private-room?_pk=secret-conn",
        &[],
    )
    .await;
    assert_eq!(answer.status, 200);
    let mut ws = connect(&gateway.url("/agents/CoderAgent/alice-private-room")).await;
    next_json(&mut ws).await;
    ws.close(None).await.expect("close");
    close_code(&mut ws).await;
    gateway.wait_metric("agent_gateway_ws_closes_total{agent=\"CoderAgent\",code=\"1005\",initiator=\"client\"}", 1.0).await;
    let deadline = std::time::Instant::now() + WAIT;
    let lines = loop {
        let out = gateway.stdout();
        if out.contains("\"kind\":\"websocket\"") || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let records: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let access = records
        .iter()
        .find(|r| r["kind"] == "access" && r["status"] == 200)
        .expect("an access line");
    assert_eq!(access["path"], "/agents/CoderAgent/alice-private-room");
    assert_eq!(access["agent"], "CoderAgent");
    assert_eq!(access["route"], "agents");
    let connection = records
        .iter()
        .find(|r| r["kind"] == "websocket")
        .expect("a connection line");
    assert_eq!(connection["initiator"], "client");
    assert_eq!(connection["code"], 1005);
    assert!(connection["instance_hash"]
        .as_str()
        .is_some_and(|h| h.len() == 16));
    assert!(
        !lines.contains("secret-conn"),
        "the query reached the access log"
    );
    let websocket_lines: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "websocket")
        .collect();
    assert!(!serde_json::to_string(&websocket_lines)
        .expect("json")
        .contains("alice-private-room"));
}

#[tokio::test]
async fn a_slow_request_head_gets_408_and_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&with_sections(
        backend.address,
        "\n[limits]\nheader_timeout = \"300ms\"\n",
    ));
    let mut slow = tokio::net::TcpStream::connect(gateway.address())
        .await
        .expect("connect");
    // Half a request head, then nothing: the deadline ends it.
    slow.write_all(b"GET /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, slow.read_to_string(&mut answer))
        .await
        .expect("the gateway ended the connection")
        .ok();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert_eq!(gateway.metric(&refusals("header_timeout")).await, 1.0);
    // A prompt client on the same gateway is unaffected, also past the deadline.
    let mut ws = connect(&gateway.url("/agents/CoderAgent/prompt")).await;
    next_json(&mut ws).await;
    tokio::time::sleep(Duration::from_millis(400)).await; // outlive the 300 ms head deadline
    assert_echo(&mut ws, "still open").await;
}
