//! Issue 15, cost control: through the real gateway and the reference backend, a client that
//! sends faster than its route allows is closed (1008 to it, 1001 to the agent) or throttled
//! (every message arrives, in order, at the configured pace), per connection and across a
//! client's connections; a route without limits is not touched; `check` and `/config` show
//! the limits.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// `local_config` with heartbeats off (their Pings are not what these tests watch) and
/// `websocket` added to `[websocket]`.
fn config(node: SocketAddr, websocket: &str) -> String {
    local_config(&[node])
        + "\n[websocket]\nping_interval = \"0s\"\nupstream_ping_interval = \"0s\"\n"
        + websocket
}

fn causes(initiator: &str, cause: &str) -> String {
    format!("agent_gateway_ws_close_causes_total{{agent=\"CoderAgent\",cause=\"{cause}\",initiator=\"{initiator}\"}}")
}

fn rate_limited(agent: &str, limit: &str, action: &str) -> String {
    format!("agent_gateway_ws_rate_limited_total{{action=\"{action}\",agent=\"{agent}\",limit=\"{limit}\"}}")
}

/// What the reference backend recorded for the instance at `path`, asked through the
/// gateway, once `ready` holds for it (or after [`WAIT`], for the assertion to report).
async fn backend_state(
    gateway: &Gateway,
    path: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = get(gateway.address(), path, &[]).await.json();
        if ready(&state) || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The close codes and reasons the backend received for the instance at `path`, once it
/// has received `count` Closes.
async fn backend_closes(gateway: &Gateway, path: &str, count: usize) -> (Vec<u64>, Vec<String>) {
    let state = backend_state(gateway, path, |s| {
        s["received_closes"].as_array().map_or(0, Vec::len) >= count
    })
    .await;
    let codes = state["received_closes"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let reasons = state["received_close_reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (codes, reasons)
}

async fn send(ws: &mut Ws, text: String) {
    tokio::time::timeout(WAIT, ws.send(Message::text(text)))
        .await
        .expect("sent in time")
        .expect("sent");
}

/// Sends `texts` in one write: all are on their way before the gateway can act on the
/// first, so that a Close it sends meanwhile cannot make a later send fail.
async fn send_all(ws: &mut Ws, texts: Vec<String>) {
    let batch = async {
        for text in texts {
            ws.feed(Message::text(text)).await?;
        }
        ws.flush().await
    };
    tokio::time::timeout(WAIT, batch)
        .await
        .expect("sent in time")
        .expect("sent");
}

/// The texts received until the Close, and the Close (`None`: the stream ended without one).
async fn until_close(ws: &mut Ws) -> (Vec<String>, Option<CloseFrame>) {
    let mut texts = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the gateway acts in time")
        {
            Some(Ok(Message::Text(text))) => texts.push(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => return (texts, frame),
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(_)) | None => return (texts, None),
        }
    }
}

/// Opens a WebSocket and reads the agent's greeting.
async fn open(gateway: &Gateway, path: &str) -> Ws {
    let mut ws = connect(&gateway.url(path)).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    ws
}

/// Sends `marker` and returns the texts received before its echo: through an instance's
/// broadcast, what the agent received from the other connections.
async fn received_until(ws: &mut Ws, marker: &str) -> Vec<String> {
    send(ws, marker.to_owned()).await;
    let mut texts = Vec::new();
    loop {
        let text = next_message(ws).await.into_text().expect("a text message");
        if text.as_str() == marker {
            return texts;
        }
        texts.push(text.as_str().to_owned());
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[tokio::test]
async fn close_under_a_flood_gives_the_client_1008_and_the_agent_1001() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(
        backend.address,
        "client_messages_per_second = 5\nclient_message_burst = 5\nrate_limit_action = \"close\"\n",
    ));
    let path = "/agents/CoderAgent/flood-close";
    // The agent sends every message it receives to each connection of the instance: the
    // observer sees what reached the agent, also after the flooder's connection has gone.
    let mut observer = open(&gateway, path).await;
    let mut ws = open(&gateway, path).await;
    send_all(&mut ws, numbered(0..50)).await;
    let (_, close) = until_close(&mut ws).await;
    let close = close.expect("a Close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
    let (codes, reasons) = backend_closes(&gateway, path, 1).await;
    assert_eq!(codes, [1001]);
    assert_eq!(reasons, ["client rate limit exceeded"]);
    let received = received_until(&mut observer, "done").await;
    // The burst went through (a slow machine may let a refill or two through as well); the
    // flood did not, and nothing arrived out of order.
    assert!(
        (5..50).contains(&received.len()),
        "the agent received {received:?}"
    );
    assert_eq!(received, numbered(0..received.len()));
    gateway
        .wait_metric(&causes("gateway", "rate_limit"), 1.0)
        .await;
    let closes =
        "agent_gateway_ws_closes_total{agent=\"CoderAgent\",code=\"1008\",initiator=\"gateway\"}";
    assert_eq!(gateway.metric(closes).await, 1.0);
    let limited = rate_limited("CoderAgent", "client_messages", "close");
    assert_eq!(gateway.metric(&limited).await, 1.0);
    let lines = gateway.stdout();
    let line = lines
        .lines()
        .find(|l| l.contains("kind=websocket"))
        .unwrap_or_else(|| panic!("no connection line in {lines}"));
    assert!(line.contains("cause=\"rate_limit\""), "{line}");
    assert!(line.contains("code=1008"), "{line}");
}

#[tokio::test]
async fn throttle_under_a_flood_delivers_every_message_in_order_at_the_configured_pace() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(
        backend.address,
        "client_messages_per_second = 20\nclient_message_burst = 5\nrate_limit_action = \"throttle\"\n",
    ));
    let path = "/agents/CoderAgent/flood-throttle";
    // Sees what the agent receives from the flooder (see the test above).
    let mut observer = open(&gateway, path).await;
    let mut ws = open(&gateway, path).await;
    let started = Instant::now();
    for text in numbered(0..50) {
        send(&mut ws, text).await;
    }
    // The agent echoes what it receives, in the order it receives it.
    let mut echoes = Vec::new();
    while echoes.len() < 50 {
        let echo = next_message(&mut ws)
            .await
            .into_text()
            .expect("a text echo");
        echoes.push(echo.as_str().to_owned());
    }
    let elapsed = started.elapsed();
    assert_eq!(echoes, numbered(0..50), "lost or reordered");
    // 45 messages past the burst at 20 a second: 2.25 s. Only a lower bound, with slack.
    assert!(
        elapsed >= Duration::from_millis(2000),
        "50 messages in {elapsed:?}"
    );
    let throttled = gateway
        .metric("agent_gateway_ws_throttled_seconds_total{agent=\"CoderAgent\"}")
        .await;
    assert!(throttled >= 1.5, "throttled for {throttled} s");
    let limited = rate_limited("CoderAgent", "client_messages", "throttle");
    assert!(gateway.metric(&limited).await >= 1.0);

    // More messages and the client's Close right behind them: the Close waits its turn
    // behind the throttled messages, then is honoured.
    for text in numbered(50..60) {
        send(&mut ws, text).await;
    }
    let closing = Instant::now();
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("Close sent");
    // The agent may close before echoing the last messages: the observer has them all.
    let (echoes, _) = until_close(&mut ws).await;
    assert_eq!(echoes, numbered(50..50 + echoes.len()), "reordered");
    let (codes, reasons) = backend_closes(&gateway, path, 1).await;
    assert_eq!((codes, reasons), (vec![1000], vec!["bye".to_owned()]));
    assert!(
        closing.elapsed() >= Duration::from_millis(350),
        "ten messages at 20 a second came before the Close: {:?}",
        closing.elapsed()
    );
    assert_eq!(
        received_until(&mut observer, "done").await,
        numbered(0..60),
        "lost or reordered on the way to the agent"
    );
    gateway.wait_metric(&causes("client", "close"), 1.0).await;
    assert_eq!(gateway.metric(&causes("gateway", "rate_limit")).await, 0.0);
}

/// Two connections from one address share its per-client bucket: the second is closed for
/// what the first sent. Another address has a bucket of its own.
#[tokio::test]
async fn per_client_limits_count_all_of_a_clients_connections() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(
        backend.address,
        "per_client_messages_per_second = 1\nper_client_message_burst = 4\nrate_limit_action = \"close\"\n",
    ));
    let mut first = open(&gateway, "/agents/CoderAgent/client-a").await;
    let mut second = open(&gateway, "/agents/CoderAgent/client-b").await;
    for text in numbered(0..4) {
        assert_echo(&mut first, &text).await;
    }
    // The second connection has sent nothing; its client has used the burst.
    send(&mut second, "one too many".to_owned()).await;
    let (echoes, close) = until_close(&mut second).await;
    assert!(echoes.is_empty(), "{echoes:?}");
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Policy));
    let limited = rate_limited("CoderAgent", "per_client_messages", "close");
    gateway.wait_metric(&limited, 1.0).await;

    // 127.0.0.2 is another client, with a full bucket.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("address"))
        .expect("bind 127.0.0.2");
    let stream = tokio::time::timeout(WAIT, socket.connect(gateway.address()))
        .await
        .expect("connect in time")
        .expect("connect");
    let url = gateway.url("/agents/CoderAgent/client-c");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (mut other, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(next_json(&mut other).await["type"], "cf_agent_identity");
    for text in numbered(0..4) {
        assert_echo(&mut other, &text).await;
    }
}

#[tokio::test]
async fn bytes_over_the_limit_close_the_connection() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(
        backend.address,
        "client_bytes_per_second = 1000\nclient_bytes_burst = 2000\n",
    ));
    let mut ws = open(&gateway, "/agents/CoderAgent/bytes").await;
    let big = "x".repeat(1500);
    assert_echo(&mut ws, &big).await;
    // About 500 bytes are left in the bucket; this frame is 1508.
    send(&mut ws, big.clone()).await;
    let (_, close) = until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Policy));
    let limited = rate_limited("CoderAgent", "client_bytes", "close");
    gateway.wait_metric(&limited, 1.0).await;
}

/// Limits set for one route only: the other route's connections are not touched, and
/// `check` and `/config` say which route has which.
#[tokio::test]
async fn a_route_without_limits_is_unaffected() {
    let backend = start_backend(Some(TEST_KEY));
    let text = format!(
        r#"
[server]
listen = "{{listen}}"

[admin]
listen = "{{admin}}"

[websocket]
ping_interval = "0s"
upstream_ping_interval = "0s"

[upstreams.local]
kind = "local"
nodes = ["{}"]

[[routes]]
prefix = "/agents"

[routes.websocket]
client_messages_per_second = 2
client_message_burst = 2

[[routes.agents]]
name = "CoderAgent"
upstream = "local"

[[routes]]
prefix = "/free"

[[routes.agents]]
name = "FreeAgent"
upstream = "local"
"#,
        backend.address
    );
    let gateway = start_gateway(&text);
    let mut free = open(&gateway, "/free/FreeAgent/flood").await;
    let mut limited = open(&gateway, "/agents/CoderAgent/flood").await;
    send_all(&mut limited, numbered(0..100)).await;
    let (_, close) = until_close(&mut limited).await;
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Policy));
    for text in numbered(0..100) {
        send(&mut free, text).await;
    }
    let mut echoes = Vec::new();
    while echoes.len() < 100 {
        let echo = next_message(&mut free)
            .await
            .into_text()
            .expect("a text echo");
        echoes.push(echo.as_str().to_owned());
    }
    assert_eq!(echoes, numbered(0..100));
    free.close(None).await.expect("close");
    assert_eq!(close_code(&mut free).await, 1005);
    let metrics = gateway.metrics().await;
    assert!(
        !metrics
            .contains("agent_gateway_ws_rate_limited_total{action=\"close\",agent=\"FreeAgent\""),
        "{metrics}"
    );

    let table = get(gateway.admin, "/config", &[]).await.json();
    let routes = table["routes"].as_array().expect("routes");
    let route = |prefix: &str| {
        routes
            .iter()
            .find(|r| r["prefix"] == prefix)
            .unwrap_or_else(|| panic!("no route {prefix} in {table}"))
    };
    let limits = &route("/agents")["websocket"]["rate_limits"];
    assert_eq!(limits["client_messages"]["per_second"], 2, "{table}");
    assert_eq!(limits["action"], "close");
    assert_eq!(
        route("/free")["websocket"]["rate_limits"],
        serde_json::Value::Null
    );
    assert_eq!(
        route("/free")["websocket"]["ping_interval"],
        serde_json::Value::Null
    );

    let output = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(gateway.config_path())
        .env("OPENROUTER_API_KEY", TEST_KEY)
        .output()
        .expect("check runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("\n  rates     2 messages/s per connection (burst 2); over a limit: close\n"),
        "{text}"
    );
    assert!(text.contains("\n  rates     no limit\n"), "{text}");
}
