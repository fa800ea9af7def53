//! Issue 4 acceptance: every agent WebSocket's end is accounted for, in both directions,
//! through the real gateway to the real reference backend, checked in the metrics.

mod common;

use common::*;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn closes(initiator: &str, code: &str) -> String {
    format!("agent_gateway_ws_closes_total{{agent=\"CoderAgent\",code=\"{code}\",initiator=\"{initiator}\"}}")
}

/// What the backend's instance `room` received as Close codes, asked through the gateway.
async fn backend_received_closes(gateway: &Gateway, room: &str) -> Vec<u64> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let answer = get(
            gateway.address(),
            &format!("/agents/CoderAgent/{room}"),
            &[],
        )
        .await;
        let closes: Vec<u64> = answer.json()["received_closes"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        if !closes.is_empty() || std::time::Instant::now() > deadline {
            return closes;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup() -> (Proc, Gateway) {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    (backend, gateway)
}

async fn open(gateway: &Gateway, room: &str) -> Ws {
    let mut ws = connect(&gateway.url(&format!("/agents/CoderAgent/{room}"))).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    ws
}

#[tokio::test]
async fn client_closes_1000() {
    let (_backend, gateway) = setup().await;
    let mut ws = open(&gateway, "c1000").await;
    send_text(&mut ws, "hello").await;
    next_message(&mut ws).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .expect("close sent");
    assert_eq!(close_code(&mut ws).await, 1000);
    gateway.wait_metric(&closes("client", "1000"), 1.0).await;
    assert_eq!(backend_received_closes(&gateway, "c1000").await, [1000]);
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_gateway_ws_connections_active{agent=\"CoderAgent\"}"
        ),
        0.0
    );
    assert_eq!(
        metric_value(&metrics, "agent_gateway_ws_messages_total{agent=\"CoderAgent\",direction=\"client_to_upstream\"}"),
        1.0
    );
    // identity + echo
    assert_eq!(
        metric_value(&metrics, "agent_gateway_ws_messages_total{agent=\"CoderAgent\",direction=\"upstream_to_client\"}"),
        2.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_gateway_ws_handshakes_total{agent=\"CoderAgent\",result=\"101\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn backend_closes_4001() {
    let (_backend, gateway) = setup().await;
    let mut ws = open(&gateway, "b4001").await;
    send_text(
        &mut ws,
        r#"{"type":"close","code":4001,"reason":"agent says bye"}"#,
    )
    .await;
    assert_eq!(close_code(&mut ws).await, 4001);
    gateway.wait_metric(&closes("upstream", "4001"), 1.0).await;
}

#[tokio::test]
async fn client_drops_tcp() {
    let (_backend, gateway) = setup().await;
    let ws = open(&gateway, "drop").await;
    drop(ws); // no Close frame: the TCP connection just ends
    gateway.wait_metric(&closes("client", "1006"), 1.0).await;
    // The agent is told the client went away instead of seeing a dead socket.
    assert_eq!(backend_received_closes(&gateway, "drop").await, [1001]);
}

#[tokio::test]
async fn backend_killed_mid_stream_gets_the_client_1011() {
    let (mut backend, gateway) = setup().await;
    let mut ws = open(&gateway, "killed").await;
    backend.child.kill().expect("backend killed");
    backend.child.wait().expect("backend reaped");
    // 1011 by default: 1014 would reach tungstenite's users as 1002 (see upstream_lost_code).
    assert_eq!(close_code(&mut ws).await, 1011);
    gateway.wait_metric(&closes("upstream", "1006"), 1.0).await;
    let errors = gateway
        .metric("agent_gateway_upstream_errors_total{kind=\"dropped\",upstream=\"local\"}")
        .await;
    assert_eq!(errors, 1.0);
}

#[tokio::test]
async fn drain_sends_1001_both_ways() {
    let (_backend, gateway) = setup().await;
    let mut first = open(&gateway, "drain").await;
    let mut second = open(&gateway, "drain").await;
    let answer = raw_request(
        gateway.admin,
        "POST /drain HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 202);
    assert_eq!(close_code(&mut first).await, 1001);
    assert_eq!(close_code(&mut second).await, 1001);
    gateway.wait_metric(&closes("gateway", "1001"), 2.0).await;
    assert_eq!(get(gateway.admin, "/readyz", &[]).await.status, 503);
    // Upstream connections were closed with 1001 too, not dropped.
    let received = backend_received_closes(&gateway, "drain").await;
    assert_eq!(received, [1001, 1001]);
    // New agent WebSockets are refused while draining.
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/drain")).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn idle_timeout_closes_with_1001() {
    let backend = start_backend(Some(TEST_KEY));
    let config = local_config(&[backend.address]) + "\n[websocket]\nidle_timeout = \"300ms\"\n";
    let gateway = start_gateway(&config);
    let mut ws = open(&gateway, "idle").await;
    let message = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("closed in time");
    match message {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected Close 1001, got {other:?}"),
    }
    gateway.wait_metric(&closes("gateway", "1001"), 1.0).await;
}

fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    assert!(payload.len() < 126);
    let mut frame = vec![(u8::from(fin) << 7) | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

#[tokio::test]
async fn fragmented_message_with_a_ping_in_the_middle() {
    let (_backend, gateway) = setup().await;
    let mut stream = raw_upgrade(gateway.address(), "fragments").await;
    let mut bytes = masked_frame(false, 0x1, b"frag");
    bytes.extend(masked_frame(true, 0x9, b"ping!"));
    bytes.extend(masked_frame(false, 0x0, b"men"));
    bytes.extend(masked_frame(true, 0x0, b"ted"));
    // Split mid-frame, as a network would.
    let (a, b) = bytes.split_at(7);
    stream.write_all(a).await.expect("write");
    stream.flush().await.expect("flush");
    stream.write_all(b).await.expect("write");
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("valid")
        {
            Message::Text(t) => seen.push(t.to_string()),
            Message::Pong(p) => seen.push(format!("pong:{}", String::from_utf8_lossy(&p))),
            _ => {}
        }
    }
    assert!(seen[0].contains("cf_agent_identity"));
    assert!(seen.contains(&"pong:ping!".to_owned()), "{seen:?}");
    assert!(seen.contains(&"fragmented".to_owned()), "{seen:?}");
    ws.close(None).await.expect("close");
    gateway.wait_metric(&closes("client", "1005"), 1.0).await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, "agent_gateway_ws_messages_total{agent=\"CoderAgent\",direction=\"client_to_upstream\"}"),
        1.0,
        "one message in three data frames"
    );
}

#[tokio::test]
async fn malformed_frame_closes_1002_both_ways() {
    let (_backend, gateway) = setup().await;
    let mut stream = raw_upgrade(gateway.address(), "malformed").await;
    let mut bytes = masked_frame(true, 0x1, b"fine");
    bytes.extend(masked_frame(true, 0x3, b"reserved opcode"));
    bytes.extend(masked_frame(true, 0x1, b"never forwarded"));
    stream.write_all(&bytes).await.expect("write");
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let mut texts = Vec::new();
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(Message::Close(frame))) => break frame.map_or(1005, |f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("expected a Close, got {other:?}"),
        }
    };
    assert_eq!(code, 1002);
    assert!(
        !texts.iter().any(|t| t.contains("never forwarded")),
        "{texts:?}"
    );
    gateway.wait_metric(&closes("gateway", "1002"), 1.0).await;
    assert_eq!(
        gateway.metric("agent_gateway_ws_protocol_errors_total{agent=\"CoderAgent\",kind=\"reserved_opcode\"}").await,
        1.0
    );
    assert_eq!(backend_received_closes(&gateway, "malformed").await, [1002]);
}

#[tokio::test]
async fn unknown_agents_are_labelled_unknown() {
    let (_backend, gateway) = setup().await;
    let (status, _) = connect_refused(&gateway.url("/agents/SomeoneElse/x")).await;
    assert_eq!(status, 404);
    // Requests are counted in Pingora's logging hook, just after the answer went out.
    gateway
        .wait_metric(
            "agent_gateway_http_requests_total{route=\"agents\",status=\"404\"}",
            1.0,
        )
        .await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agent_gateway_ws_handshakes_total{agent=\"unknown\",result=\"404\"}"
        ),
        1.0
    );
    assert!(
        !metrics.contains("SomeoneElse"),
        "client input became a label"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agent_gateway_http_requests_total{route=\"none\",status=\"404\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn exposition_passes_promtool() {
    let (_backend, gateway) = setup().await;
    let mut ws = open(&gateway, "promtool").await;
    ws.close(None).await.expect("close");
    gateway.wait_metric(&closes("client", "1005"), 1.0).await;
    let text = gateway.metrics().await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/bootstrap.sh installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("exposition written");
    let output = child.wait_with_output().expect("promtool ran");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
