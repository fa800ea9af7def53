//! Issue 15, a strict handshake and request IDs: bad opening handshakes are answered by the
//! gateway and reach no upstream; an upstream's bad 101 is refused with 502; underscore
//! aliases of the gateway's headers never reach an agent; every answer carries the request's
//! ID, which goes upstream and into the access line with the trace ID.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// An upstream on a real socket that reads one request head and answers with `answer`,
/// counting the connections it accepted.
async fn scripted_upstream(answer: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = stream.write_all(answer.as_bytes()).await;
                // Held open: the gateway decides what happens next.
                let mut rest = [0u8; 64];
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    (address, accepted)
}

fn upgrade(method: &str, version: &str, headers: &[&str]) -> String {
    let mut request = format!(
        "{method} /agents/CoderAgent/room {version}\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    );
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

#[tokio::test]
async fn bad_opening_handshakes_are_answered_by_the_gateway_and_reach_no_upstream() {
    let (upstream, accepted) =
        scripted_upstream("HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
    let gateway = start_gateway(&local_config(&[upstream]));
    let version = "Sec-WebSocket-Version: 13";
    let key = &format!("Sec-WebSocket-Key: {KEY}") as &str;
    let cases: [(String, u16); 6] = [
        (
            upgrade("GET", "HTTP/1.1", &["Sec-WebSocket-Version: 8", key]),
            426,
        ),
        (upgrade("GET", "HTTP/1.1", &[key]), 426),
        (upgrade("GET", "HTTP/1.1", &[version]), 400),
        (
            upgrade("GET", "HTTP/1.1", &[version, "Sec-WebSocket-Key: c2hvcnQ="]),
            400,
        ),
        (
            upgrade("POST", "HTTP/1.1", &[version, key, "Content-Length: 0"]),
            400,
        ),
        (upgrade("GET", "HTTP/1.0", &[version, key]), 400),
    ];
    for (request, status) in &cases {
        let answer = raw_request(gateway.address(), request).await;
        assert_eq!(answer.status, *status, "{request}\n{}", answer.head);
        let body = answer.json();
        assert_eq!(body["error"], "invalid_upgrade", "{request}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(
            body["request_id"].as_str(),
            answer.header("x-request-id").as_deref(),
            "the body names the request's ID"
        );
        if *status == 426 {
            assert_eq!(
                answer.header("sec-websocket-version").as_deref(),
                Some("13")
            );
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "an upstream saw a bad handshake"
    );
    gateway
        .wait_metric(
            "agent_gateway_ws_handshakes_total{agent=\"CoderAgent\",result=\"426\"}",
            2.0,
        )
        .await;
}

async fn upgrade_through(gateway: &Gateway, extra: &[&str]) -> RawResponse {
    let mut headers = vec![
        "Sec-WebSocket-Version: 13".to_owned(),
        format!("Sec-WebSocket-Key: {KEY}"),
    ];
    headers.extend(extra.iter().map(|h| (*h).to_owned()));
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    raw_request(gateway.address(), &upgrade("GET", "HTTP/1.1", &headers)).await
}

#[tokio::test]
async fn an_upstream_101_with_a_wrong_accept_key_is_refused_with_502() {
    let (upstream, _) = scripted_upstream(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    )
    .await;
    let gateway = start_gateway(&local_config(&[upstream]));
    let answer = upgrade_through(&gateway, &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.head);
    let body = answer.json();
    assert_eq!(body["error"], "upstream_invalid_upgrade");
    assert_eq!(body["reason"], "bad_accept");
    assert_eq!(body["upstream"], "local");
    gateway
        .wait_metric(
            "agent_gateway_ws_handshakes_total{agent=\"CoderAgent\",result=\"bad_accept\"}",
            1.0,
        )
        .await;
    gateway
        .wait_metric(
            "agent_gateway_upstream_errors_total{kind=\"invalid_upgrade\",upstream=\"local\"}",
            1.0,
        )
        .await;
}

#[tokio::test]
async fn an_upstream_101_choosing_what_the_client_did_not_offer_is_refused() {
    let answer_with = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: graphql\r\n\r\n"
    );
    let (upstream, _) = scripted_upstream(Box::leak(answer_with.into_boxed_str())).await;
    let gateway = start_gateway(&local_config(&[upstream]));
    let answer = upgrade_through(&gateway, &["Sec-WebSocket-Protocol: chat"]).await;
    assert_eq!(answer.status, 502, "{}", answer.head);
    assert_eq!(answer.json()["reason"], "unoffered_protocol");
}

#[tokio::test]
async fn a_valid_101_is_relayed_with_the_request_id() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    let answer = raw_request_head(
        gateway.address(),
        &upgrade(
            "GET",
            "HTTP/1.1",
            &[
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Key: {KEY}"),
            ],
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains(&format!(
            "sec-websocket-accept: {}",
            ACCEPT.to_ascii_lowercase()
        )),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id: "),
        "{answer}"
    );
}

/// Sends `request` and reads only the response head: a 101 is followed by frames, not a body.
async fn raw_request_head(address: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    read_head(&mut stream).await
}

#[tokio::test]
async fn underscore_aliases_of_routing_and_forwarding_headers_never_reach_the_agent() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/room",
        &[
            ("x_partykit_room", "someone-else"),
            ("X_PartyKit_Namespace", "admin"),
            ("x_forwarded_for", "203.0.113.9"),
            ("x_request_id", "chosen-by-client"),
            ("x_custom", "kept"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = answer.json();
    let headers = seen["headers"].to_string().to_ascii_lowercase();
    for alias in [
        "x_partykit_room",
        "x_partykit_namespace",
        "x_forwarded_for",
        "x_request_id",
    ] {
        assert!(
            !headers.contains(alias),
            "{alias} reached the agent: {headers}"
        );
    }
    assert!(headers.contains("x_custom"), "{headers}");
    assert!(
        headers.contains("\"x-partykit-room\":\"room\""),
        "{headers}"
    );
}

#[tokio::test]
async fn request_ids_go_upstream_come_back_and_are_logged_with_the_trace() {
    let backend = start_backend(Some(TEST_KEY));
    // 127.0.0.1 is a trusted proxy here: its x-request-id is kept.
    let config = local_config(&[backend.address]).replace(
        "upgrade_sock = \"upgrade.sock\"",
        "upgrade_sock = \"upgrade.sock\"\ntrusted_proxies = [\"127.0.0.1/32\"]",
    ) + "\n[log]\nformat = \"json\"\n";
    let gateway = start_gateway(&config);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/room",
        &[("x-request-id", "edge-42"), ("traceparent", traceparent)],
    )
    .await;
    assert_eq!(answer.header("x-request-id").as_deref(), Some("edge-42"));
    let seen = answer.json()["headers"].to_string();
    assert!(seen.contains("\"x-request-id\":\"edge-42\""), "{seen}");
    assert!(
        seen.contains(traceparent),
        "traceparent passes untouched: {seen}"
    );
    let made = get(gateway.address(), "/agents/CoderAgent/room", &[]).await;
    let id = made.header("x-request-id").expect("an ID is made");
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(&id[14..15], "7", "a UUIDv7: {id}");
    let refused = get(gateway.address(), "/agents/Nobody/room", &[]).await;
    assert_eq!(refused.status, 404);
    assert_eq!(
        refused.json()["request_id"].as_str(),
        refused.header("x-request-id").as_deref()
    );
    let logged = wait_for_line(&gateway, "edge-42").await;
    let line: serde_json::Value = serde_json::from_str(&logged).expect("a JSON access line");
    assert_eq!(line["kind"], "access");
    assert_eq!(line["request_id"], "edge-42");
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn an_untrusted_client_cannot_choose_its_request_id() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/room",
        &[("x-request-id", "chosen-by-client")],
    )
    .await;
    let id = answer.header("x-request-id").expect("an ID");
    assert_ne!(id, "chosen-by-client");
    let seen = answer.json()["headers"].to_string();
    assert!(
        seen.contains(&format!("\"x-request-id\":\"{id}\"")),
        "{seen}"
    );
}

/// The first stdout line of the gateway that contains `needle`, waiting for it: the access
/// line is written after the answer, and a log file has no readiness signal to wait on.
async fn wait_for_line(gateway: &Gateway, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(line) = gateway.stdout().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line with {needle}:\n{}",
            gateway.stdout()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
