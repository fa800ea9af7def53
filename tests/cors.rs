//! Issue 5: the CORS and Origin policy with raw requests, every case, through the real gateway.

mod common;

use common::*;

const ALLOWED: &str = "https://app.example.com";

fn cors_config(backend: std::net::SocketAddr, extra: &str) -> String {
    local_config(&[backend])
        + &format!(
            r#"
[cors]
allowed_origins = ["{ALLOWED}", "https://*.example.org"]
allowed_origin_patterns = ['https://preview-[0-9]+\.example\.dev']
allowed_methods = ["GET", "POST"]
allowed_headers = ["content-type", "x-client"]
exposed_headers = ["x-agent"]
allow_credentials = true
max_age = "10m"
{extra}
"#
        )
}

fn upgrade(origin_lines: &str, upgrade: &str) -> String {
    format!(
        "GET /agents/CoderAgent/cors HTTP/1.1\r\nHost: gw\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin_lines}\r\n"
    )
}

/// Sends an upgrade by hand and returns the status line's code and the head.
async fn try_upgrade(gateway: &Gateway, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway.address())
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("in time")
            .expect("read");
        assert!(
            n == 1,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head)
}

fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case(name) && v.trim() == value)
    })
}

#[tokio::test]
async fn websocket_upgrades_are_checked_before_any_upstream() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&cors_config(backend.address, ""));
    // Allowed: 101 with the CORS headers, for clients that read them.
    let (status, head) = try_upgrade(
        &gateway,
        &upgrade(&format!("Origin: {ALLOWED}\r\n"), "websocket"),
    )
    .await;
    assert_eq!(status, 101, "{head}");
    assert!(
        has_header(&head, "access-control-allow-origin", ALLOWED),
        "{head}"
    );
    assert!(
        has_header(&head, "access-control-allow-credentials", "true"),
        "{head}"
    );
    for origin in ["https://x.example.org", "https://preview-12.example.dev"] {
        let (status, _) = try_upgrade(
            &gateway,
            &upgrade(&format!("Origin: {origin}\r\n"), "websocket"),
        )
        .await;
        assert_eq!(status, 101, "{origin}");
    }
    // Mixed case Upgrade is still a WebSocket, and still checked.
    let (status, _) = try_upgrade(
        &gateway,
        &upgrade("Origin: https://evil.example\r\n", "WebSocket"),
    )
    .await;
    assert_eq!(status, 403);
    // Refused: 403 JSON, never forwarded.
    for origin in [
        "https://evil-example.com",
        "https://app.example.com.evil.net",
        "https://example.org",
        "https://preview-12.example.dev.evil.net",
        "null",
    ] {
        let (status, body) = connect_refused_with(
            &gateway.url("/agents/CoderAgent/refused"),
            &[("Origin", origin)],
        )
        .await;
        assert_eq!(status, 403, "{origin}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["error"], "origin_refused", "{origin}");
    }
    // Several Origin headers: refused outright, whichever comes first.
    let (status, body) = connect_refused_with(
        &gateway.url("/agents/CoderAgent/refused"),
        &[("Origin", ALLOWED), ("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_origin_header"), "{body}");
    // No Origin (CLIs, servers, the SDK in Node): allowed by default.
    let (status, head) = try_upgrade(&gateway, &upgrade("", "websocket")).await;
    assert_eq!(status, 101);
    assert!(!head
        .to_ascii_lowercase()
        .contains("access-control-allow-origin"));
    // The backend never saw the refused room.
    let seen = get(gateway.address(), "/agents/CoderAgent/refused", &[]).await;
    assert_eq!(seen.json()["received_closes"], serde_json::json!([]));
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_gateway_ws_handshakes_total{agent=\"CoderAgent\",result=\"origin_refused\"}"
        ),
        6.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_gateway_origin_refusals_total{route=\"agents\"}"
        ),
        6.0
    );
}

#[tokio::test]
async fn missing_origin_can_be_required() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&cors_config(
        backend.address,
        "allow_missing_origin = false",
    ));
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/x")).await;
    assert_eq!(status, 403);
    assert!(body.contains("origin_required"), "{body}");
}

#[tokio::test]
async fn other_upgrades_are_plain_requests_under_the_http_rules() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&cors_config(backend.address, ""));
    // Upgrade: h2c from a refused origin is not a WebSocket: proxied as plain HTTP, with
    // the upgrade dropped and no CORS headers.
    let answer = raw_request(
        gateway.address(),
        "GET /agents/CoderAgent/x HTTP/1.1\r\nHost: gw\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nOrigin: https://evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.json()["headers"].get("upgrade").is_none());
    assert_eq!(answer.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn preflights_are_answered_by_the_gateway() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&cors_config(backend.address, ""));
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /agents/CoderAgent/x/messages HTTP/1.1\r\nHost: gw\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
        )
    };
    let answer = raw_request(gateway.address(), &preflight(ALLOWED)).await;
    assert_eq!(answer.status, 204);
    assert_eq!(
        answer.header("access-control-allow-origin").as_deref(),
        Some(ALLOWED)
    );
    assert_eq!(
        answer.header("access-control-allow-methods").as_deref(),
        Some("GET, POST")
    );
    assert_eq!(
        answer.header("access-control-allow-headers").as_deref(),
        Some("content-type, x-client")
    );
    assert_eq!(
        answer.header("access-control-max-age").as_deref(),
        Some("600")
    );
    assert_eq!(
        answer.header("access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert_eq!(answer.header("vary").as_deref(), Some("Origin"));
    let refused = raw_request(gateway.address(), &preflight("https://evil.example")).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("access-control-allow-origin"), None);
    // Never forwarded: the backend would have answered 200 with its JSON.
    assert_eq!(refused.json()["error"], "origin_refused");
}

#[tokio::test]
async fn responses_carry_the_policy_not_the_upstream() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&cors_config(backend.address, ""));
    let allowed = get(
        gateway.address(),
        "/agents/CoderAgent/x",
        &[("Origin", ALLOWED)],
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("access-control-allow-origin").as_deref(),
        Some(ALLOWED)
    );
    assert_eq!(
        allowed
            .header("access-control-allow-credentials")
            .as_deref(),
        Some("true")
    );
    assert_eq!(
        allowed.header("access-control-expose-headers").as_deref(),
        Some("x-agent")
    );
    assert_eq!(allowed.header("vary").as_deref(), Some("Origin"));
    let refused = get(
        gateway.address(),
        "/agents/CoderAgent/x",
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(refused.status, 200);
    assert!(
        !refused
            .head
            .to_ascii_lowercase()
            .contains("access-control-"),
        "{}",
        refused.head
    );
    assert_eq!(refused.header("vary").as_deref(), Some("Origin"));
}

#[tokio::test]
async fn wildcard_without_credentials_answers_star_and_any_with_credentials_is_refused() {
    let backend = start_backend(Some(TEST_KEY));
    let config = local_config(&[backend.address]) + "\n[cors]\nallowed_origins = [\"*\"]\n";
    let gateway = start_gateway(&config);
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/x",
        &[("Origin", "https://anyone.example")],
    )
    .await;
    assert_eq!(
        answer.header("access-control-allow-origin").as_deref(),
        Some("*")
    );

    let bad = (local_config(&[backend.address])
        + "\n[cors]\nallowed_origins = [\"*\"]\nallow_credentials = true\n")
        .replace("{listen}", "127.0.0.1:1")
        .replace("{admin}", "127.0.0.1:2");
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, bad).expect("written");
    let output = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("check ran");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("allow_credentials"), "{stderr}");
    assert!(stderr.contains("gateway.toml:"), "{stderr}");
}

#[tokio::test]
async fn a_route_policy_replaces_the_global_one() {
    let backend = start_backend(Some(TEST_KEY));
    let config = format!(
        r#"
[server]
listen = "{{listen}}"
[admin]
listen = "{{admin}}"
[cors]
allowed_origins = ["https://global.example"]
[upstreams.local]
kind = "local"
nodes = ["{}"]
[[routes]]
prefix = "/agents"
[routes.cors]
allowed_origins = ["https://route.example"]
[[routes.agents]]
name = "CoderAgent"
upstream = "local"
"#,
        backend.address
    );
    let gateway = start_gateway(&config);
    let (status, _) = connect_refused_with(
        &gateway.url("/agents/CoderAgent/x"),
        &[("Origin", "https://global.example")],
    )
    .await;
    assert_eq!(status, 403);
    let mut ws = connect_with_origin(&gateway, "https://route.example").await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
}

async fn connect_with_origin(gateway: &Gateway, origin: &str) -> Ws {
    let request = ws_request(&gateway.url("/agents/CoderAgent/x"), &[("Origin", origin)]);
    tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade")
        .0
}
