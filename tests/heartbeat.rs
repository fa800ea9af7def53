//! Issue 15, heartbeats and dead peers: through the real gateway, with short intervals, a
//! client or an agent that stops answering is found and the other side told why; one that
//! answers stays, and neither side sees the gateway's Pings toward the other or the Pongs
//! that answer them; Pings the sides send themselves pass as before.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::Message;

/// The start of every Ping payload of the gateway's own.
const GATEWAY_PING: &[u8] = b"agw-hb";
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(300);
/// Scheduling on a loaded machine, on top of `INTERVAL + TIMEOUT`.
const SLACK: Duration = Duration::from_millis(1500);

/// Heartbeats toward the client only, at the short test interval.
const CLIENT_ONLY: &str =
    "ping_interval = \"200ms\"\nping_timeout = \"300ms\"\nupstream_ping_interval = \"0s\"\n";
/// Heartbeats toward the agent only.
const UPSTREAM_ONLY: &str =
    "ping_interval = \"0s\"\nupstream_ping_interval = \"200ms\"\nupstream_ping_timeout = \"300ms\"\n";
const BOTH: &str = "ping_interval = \"200ms\"\nping_timeout = \"300ms\"\nupstream_ping_interval = \"200ms\"\nupstream_ping_timeout = \"300ms\"\n";

fn config(node: SocketAddr, websocket: &str) -> String {
    local_config(&[node]) + "\n[websocket]\n" + websocket
}

fn closes(initiator: &str, code: &str) -> String {
    format!("agent_gateway_ws_closes_total{{agent=\"CoderAgent\",code=\"{code}\",initiator=\"{initiator}\"}}")
}

fn causes(initiator: &str, cause: &str) -> String {
    format!("agent_gateway_ws_close_causes_total{{agent=\"CoderAgent\",cause=\"{cause}\",initiator=\"{initiator}\"}}")
}

/// What the reference backend recorded for instance `room`, asked through the gateway,
/// once `ready` holds for it (or after [`WAIT`], for the assertion to report).
async fn backend_state(
    gateway: &Gateway,
    room: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = get(
            gateway.address(),
            &format!("/agents/CoderAgent/{room}"),
            &[],
        )
        .await
        .json();
        if ready(&state) || Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads one frame: opcode, FIN and unmasked payload; `None` once the stream has ended
/// (closed or reset).
async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> Option<(u8, bool, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.ok()?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut extended = [0u8; 2];
            stream.read_exact(&mut extended).await.ok()?;
            usize::from(u16::from_be_bytes(extended))
        }
        127 => panic!("no test frame is that long"),
        short => usize::from(short),
    };
    let mut key = [0u8; 4];
    let masked = head[1] & 0x80 != 0;
    if masked {
        stream.read_exact(&mut key).await.ok()?;
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some((head[0] & 0x0f, head[0] & 0x80 != 0, payload))
}

/// An unmasked frame, as an upstream sends them.
fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![(u8::from(fin) << 7) | opcode, payload.len() as u8];
    frame.extend_from_slice(payload);
    frame
}

/// Opens a WebSocket by hand, so that the test client can stay silent; returns the stream
/// and when the 101 arrived.
async fn raw_upgrade_at(gateway: &Gateway, room: &str) -> (TcpStream, Instant) {
    let stream = raw_upgrade(gateway.address(), room).await;
    (stream, Instant::now())
}

/// A hand-made upstream: accepts one upgrade and answers it with a valid 101.
async fn accept_upgrade(listener: &TcpListener) -> TcpStream {
    let (mut stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the gateway connects in time")
        .expect("accept");
    let head = read_head(&mut stream).await;
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .expect("a Sec-WebSocket-Key");
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(answer.as_bytes()).await.expect("101");
    stream
}

async fn next_raw(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a message in time")
        .expect("stream open")
        .expect("no WebSocket error")
}

#[tokio::test]
async fn a_client_that_never_answers_is_dropped_and_the_agent_told_why() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(backend.address, CLIENT_ONLY));
    let (mut stream, upgraded) = raw_upgrade_at(&gateway, "silent").await;
    let mut pings = 0;
    loop {
        match tokio::time::timeout(WAIT, read_frame(&mut stream))
            .await
            .expect("the gateway acts in time")
        {
            Some((0x9, _, payload)) => {
                assert!(payload.starts_with(GATEWAY_PING), "{payload:?}");
                pings += 1;
            }
            Some((0x1, _, greeting)) => {
                assert!(String::from_utf8_lossy(&greeting).contains("cf_agent_identity"));
            }
            // The client is gone: it gets no Close, its socket is dropped.
            Some(other) => panic!("unexpected frame {other:?}"),
            None => break,
        }
    }
    let elapsed = upgraded.elapsed();
    assert_eq!(pings, 1, "one Ping, never answered");
    assert!(
        elapsed >= INTERVAL + TIMEOUT - Duration::from_millis(50)
            && elapsed <= INTERVAL + TIMEOUT + SLACK,
        "dropped after {elapsed:?}"
    );
    let state = backend_state(&gateway, "silent", |s| {
        !strings(&s["received_close_reasons"]).is_empty()
    })
    .await;
    assert_eq!(state["received_closes"], serde_json::json!([1001]));
    assert_eq!(
        strings(&state["received_close_reasons"]),
        ["client did not answer heartbeat"]
    );
    gateway
        .wait_metric(&causes("client", "heartbeat"), 1.0)
        .await;
    assert_eq!(gateway.metric(&closes("client", "1006")).await, 1.0);
    let lines = gateway.stdout();
    let line = lines
        .lines()
        .find(|l| l.contains("kind=websocket"))
        .unwrap_or_else(|| panic!("no connection line in {lines}"));
    assert!(line.contains("cause=\"heartbeat\""), "{line}");
    assert!(line.contains("initiator=\"client\""), "{line}");
}

#[tokio::test]
async fn a_client_that_answers_stays_open_and_the_agent_sees_no_heartbeat() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(backend.address, CLIENT_ONLY));
    let mut ws = connect(&gateway.url("/agents/CoderAgent/answers")).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    let started = Instant::now();
    let mut pings = 0;
    // tungstenite answers each Ping as the test reads on.
    while pings < 20 {
        match next_raw(&mut ws).await {
            Message::Ping(payload) => {
                assert!(payload.starts_with(GATEWAY_PING), "{payload:?}");
                pings += 1;
            }
            other => panic!("the client got {other:?}"),
        }
    }
    assert!(
        started.elapsed() >= INTERVAL * 19,
        "twenty Pings in {:?}",
        started.elapsed()
    );
    assert_echo(&mut ws, "still here").await;
    let state = backend_state(&gateway, "answers", |_| true).await;
    assert_eq!(state["received_control"]["pings"], 0, "{state}");
    assert_eq!(state["received_control"]["pongs"], 0, "{state}");
    ws.close(None).await.expect("close");
    assert_eq!(close_code(&mut ws).await, 1005);
    gateway.wait_metric(&causes("client", "close"), 1.0).await;
    assert_eq!(gateway.metric(&causes("client", "heartbeat")).await, 0.0);
}

#[tokio::test]
async fn an_agent_that_answers_stays_and_the_client_sees_no_heartbeat() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(backend.address, UPSTREAM_ONLY));
    let mut ws = connect(&gateway.url("/agents/CoderAgent/agent-answers")).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    let state = backend_state(&gateway, "agent-answers", |s| {
        s["received_control"]["pings"].as_u64() >= Some(10)
    })
    .await;
    let pings = strings(&state["received_control"]["recent_pings"]);
    assert!(
        state["received_control"]["pings"].as_u64() >= Some(10),
        "{state}"
    );
    assert!(pings.iter().all(|p| p.starts_with("agw-hb")), "{pings:?}");
    // Neither the gateway's Pings nor the agent's Pongs reached the client: the echo is the
    // first thing it reads.
    send_text(&mut ws, "still here").await;
    match next_raw(&mut ws).await {
        Message::Text(text) => assert_eq!(text.as_str(), "still here"),
        other => panic!("the client got {other:?}"),
    }
    ws.close(None).await.expect("close");
    assert_eq!(close_code(&mut ws).await, 1005);
}

#[tokio::test]
async fn pings_and_pongs_the_sides_send_themselves_pass_through() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&config(backend.address, BOTH));
    let mut ws = connect(&gateway.url("/agents/CoderAgent/own-pings")).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    // Once the gateway has pinged both sides, it checks every Pong from them.
    match next_raw(&mut ws).await {
        Message::Ping(payload) => assert!(payload.starts_with(GATEWAY_PING)),
        other => panic!("expected the gateway's Ping, got {other:?}"),
    }
    backend_state(&gateway, "own-pings", |s| {
        s["received_control"]["pings"].as_u64() >= Some(1)
    })
    .await;
    ws.send(Message::Ping("client-ping".into()))
        .await
        .expect("ping sent");
    loop {
        match next_raw(&mut ws).await {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"client-ping");
                break;
            }
            Message::Ping(payload) => assert!(payload.starts_with(GATEWAY_PING)),
            other => panic!("the client got {other:?}"),
        }
    }
    ws.send(Message::Pong("client-pong".into()))
        .await
        .expect("pong sent");
    let state = backend_state(&gateway, "own-pings", |s| {
        s["received_control"]["pongs"].as_u64() >= Some(1)
    })
    .await;
    let control = &state["received_control"];
    assert!(
        strings(&control["recent_pings"]).contains(&"client-ping".to_owned()),
        "{state}"
    );
    assert_eq!(
        strings(&control["recent_pongs"]),
        ["client-pong"],
        "{state}"
    );
    ws.close(None).await.expect("close");
    assert_eq!(close_code(&mut ws).await, 1005);
}

#[tokio::test]
async fn an_agent_that_stops_answering_gives_the_client_1011() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = listener.local_addr().expect("address");
    let (done, until_done) = oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        let stream = accept_upgrade(&listener).await;
        // Silent from here on: it reads nothing and answers nothing.
        let _ = until_done.await;
        drop(stream);
    });
    let gateway = start_gateway(&config(node, UPSTREAM_ONLY));
    let mut ws = connect(&gateway.url("/agents/CoderAgent/stuck")).await;
    let started = Instant::now();
    match next_raw(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1011);
            assert_eq!(frame.reason.as_str(), "agent did not answer heartbeat");
        }
        other => panic!("expected Close 1011, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed <= INTERVAL + TIMEOUT + SLACK,
        "closed after {elapsed:?}"
    );
    gateway
        .wait_metric(&causes("upstream", "heartbeat"), 1.0)
        .await;
    assert_eq!(gateway.metric(&closes("upstream", "1006")).await, 1.0);
    assert_eq!(
        gateway
            .metric("agent_gateway_upstream_errors_total{kind=\"timeout\",upstream=\"local\"}")
            .await,
        1.0
    );
    let _ = done.send(());
    agent.await.expect("agent task");
}

/// The agent sends a message in three fragments and stops halfway through the second; the
/// client's Ping falls due meanwhile. It goes out after the second fragment, never inside a
/// frame, the message arrives whole, and the client's Pong never reaches the agent. The
/// heartbeat is the route's own (`[routes.websocket]`), the global one being the default.
#[tokio::test]
async fn a_fragmented_message_with_the_heartbeat_due_in_the_middle_arrives_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = listener.local_addr().expect("address");
    let (go_on, until_go_on) = oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        let mut stream = accept_upgrade(&listener).await;
        let second = server_frame(false, 0x0, b"wor");
        let mut start = server_frame(false, 0x1, b"hello ");
        start.extend_from_slice(&second[..3]);
        stream.write_all(&start).await.expect("first part");
        until_go_on.await.expect("the test goes on");
        let mut rest = second[3..].to_vec();
        rest.extend(server_frame(true, 0x0, b"ld"));
        stream.write_all(&rest).await.expect("second part");
        // Everything the client sends from here, until its Close, which is answered.
        let mut opcodes = Vec::new();
        while let Some((opcode, _, payload)) = read_frame(&mut stream).await {
            opcodes.push(opcode);
            if opcode == 0x8 {
                let _ = stream.write_all(&server_frame(true, 0x8, &payload)).await;
                break;
            }
        }
        opcodes
    });
    let text = local_config(&[node])
        + "\n[routes.websocket]\nping_interval = \"200ms\"\nping_timeout = \"300ms\"\nupstream_ping_interval = \"0s\"\n";
    let gateway = start_gateway(&text);
    let mut ws = connect(&gateway.url("/agents/CoderAgent/fragments")).await;
    // Time is the stimulus: the Ping falls due while the second fragment is unfinished.
    tokio::time::sleep(INTERVAL + TIMEOUT + INTERVAL).await;
    go_on.send(()).expect("the agent waits");
    let mut seen = Vec::new();
    loop {
        match next_raw(&mut ws).await {
            Message::Ping(payload) => {
                assert!(payload.starts_with(GATEWAY_PING));
                seen.push("ping".to_owned());
            }
            Message::Text(text) => {
                seen.push(text.to_string());
                break;
            }
            other => panic!("the client got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        ["ping", "hello world"],
        "the Ping goes between fragments"
    );
    // The client answers that Ping as it reads on; the answer stays with the gateway.
    ws.close(None).await.expect("close");
    assert_eq!(close_code(&mut ws).await, 1005);
    let opcodes = agent.await.expect("agent task");
    assert_eq!(opcodes, [0x8], "the agent got more than the Close");
}
