//! The reference local agent backend: a small agent host that honours the partyserver
//! contract the way the Agents SDK's Durable Objects do, for the default config, the README's
//! run command and the tests.
//!
//! - `GET /healthz` answers 200 `{"status":"ok","node":"<listen address>"}` (another method:
//!   405 JSON), before the checks below: a node without its secret is still alive, and a
//!   health check (the gateway's, a kubelet's probe) carries no routing headers.
//! - `GET /admin/instances` answers 200 `{"node":"<listen address>","instances":[{"namespace":
//!   "coder-agent","room":"r1","connections":2}, ...]}`: every (namespace, room) with at least
//!   one open WebSocket right now and how many, sorted by namespace then room; a connection
//!   leaves the count as soon as its WebSocket ends, however it ends. Another method: 405
//!   JSON. An admin path of this node for tests and operators, not part of the agent protocol
//!   (the gateway routes only `/agents/...` here), so it too comes before the checks below.
//! - Without `OPENROUTER_API_KEY` in its environment it answers every other request with 500
//!   `OPENROUTER_API_KEY is not set`, as the field's Worker did.
//! - Without `x-partykit-namespace`/`x-partykit-room` it answers 500 with the message field
//!   agents gave, so a direct connection fails as it does in the field.
//! - With them, WebSocket connections join one in-memory instance per (namespace, room): the
//!   agent greets with `cf_agent_identity`, echoes every message to its sender, broadcasts it
//!   to the instance's other connections, and closes with a chosen code when a text message
//!   says `{"type":"close","code":4001,"reason":"..."}`. It answers Pings (tungstenite does)
//!   and counts the Pings and Pongs it receives per instance.
//! - Plain HTTP requests get a JSON description of what arrived (method, path, headers) and
//!   of the instance's state: the Closes and control frames it received, and in
//!   `last_upgrade` the path (with its query) and headers of its most recent WebSocket
//!   upgrade request (`null` before the first), so that tests can see what an upgrade carried
//!   upstream. Headers are named in lower case; a repeated one has its values joined with
//!   `, `; credential-looking ones (`authorization`, `cookie`, names with `key`, `secret` or
//!   `token`) are shown as fingerprints, never as they are.

use agent_gateway::secrets::fingerprint;
use bytes::BytesMut;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const SECRET_ENV: &str = "OPENROUTER_API_KEY";

type Outbox = mpsc::UnboundedSender<Message>;
type Rooms = BTreeMap<(String, String), HashMap<u64, Outbox>>;

#[derive(Default)]
struct Instances {
    /// This backend's address, reported in HTTP answers so tests can see which node served.
    node: String,
    /// (namespace, room) -> connection id -> its outbox: the open connections only, and only
    /// rooms that have one (see [`Membership`]). Ordered, so `/admin/instances` lists it as is.
    rooms: Mutex<Rooms>,
    /// (namespace, room) -> the close codes its connections received, in order (1005 for an
    /// empty Close, 1006 for a connection that ended without one): what tests check to see
    /// what reached the upstream side.
    received_closes: Mutex<HashMap<(String, String), Vec<u16>>>,
    /// The reasons of those Close frames, in the same order ("" for none).
    received_close_reasons: Mutex<HashMap<(String, String), Vec<String>>>,
    /// (namespace, room) -> the Pings and Pongs its connections received.
    received_control: Mutex<HashMap<(String, String), ControlSeen>>,
    /// (namespace, room) -> the path and headers of its most recent upgrade request.
    last_upgrades: Mutex<HashMap<(String, String), serde_json::Value>>,
    next_id: AtomicU64,
}

/// Control frames an instance received: counts and the latest payloads (lossy UTF-8, at
/// most [`RECENT`] of each), so that tests can see which Pings and Pongs crossed the gateway.
#[derive(Default, Clone, serde::Serialize)]
struct ControlSeen {
    pings: u64,
    pongs: u64,
    recent_pings: Vec<String>,
    recent_pongs: Vec<String>,
}

const RECENT: usize = 16;

fn remember(recent: &mut Vec<String>, payload: &[u8]) {
    if recent.len() == RECENT {
        recent.remove(0);
    }
    recent.push(String::from_utf8_lossy(payload).into_owned());
}

/// The reference local agent backend: the partyserver contract, echo and broadcast. For
/// tests and `scripts/run-local.sh`; not part of the gateway binary.
#[derive(Parser)]
#[command(name = "reference-backend", version)]
struct Cli {
    /// Address to listen on; port 0 picks a free one (the address is printed).
    #[arg(short, long, default_value = "127.0.0.1:8787")]
    listen: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(&cli.listen)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: reference backend on {}: {e}", cli.listen);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves on `listen` until the process ends. Prints the bound address on stdout once
/// listening: that line is the readiness signal scripts and tests wait for.
async fn serve(listen: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    println!("reference backend listening on http://{address}");
    let instances = Arc::new(Instances {
        node: address.to_string(),
        ..Instances::default()
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let instances = instances.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, instances).await {
                log::debug!("backend connection from {peer}: {e}");
            }
        });
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

async fn handle(mut stream: TcpStream, instances: Arc<Instances>) -> std::io::Result<()> {
    let (request, leftover) = match read_request(&mut stream).await? {
        Some(r) => r,
        None => return Ok(()),
    };
    if let Some((status, body)) = admin_answer(&request, &instances) {
        return respond_json(&mut stream, status, &body).await;
    }
    let key_present = std::env::var(SECRET_ENV).is_ok_and(|v| !v.trim().is_empty());
    if !key_present {
        return respond(
            &mut stream,
            500,
            "text/plain",
            "OPENROUTER_API_KEY is not set",
        )
        .await;
    }
    let (Some(namespace), Some(room)) = (
        request.header("x-partykit-namespace"),
        request.header("x-partykit-room"),
    ) else {
        let class = class_name(&request.path);
        let message = format!(
            "Missing namespace or room headers when connecting to {class}.\nDid you try connecting directly to this Durable Object? Try using getServerByName(namespace, id) instead."
        );
        return respond(&mut stream, 500, "text/plain", &message).await;
    };
    let (namespace, room) = (namespace.to_owned(), room.to_owned());
    let websocket =
        request.has_token("upgrade", "websocket") && request.has_token("connection", "upgrade");
    if !websocket {
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers
            .iter()
            .map(|(k, v)| {
                let name = k.to_ascii_lowercase();
                (name.clone(), json!(shown(&name, v)))
            })
            .collect();
        let body = json!({
            "agent": namespace, "room": room, "method": request.method,
            "path": request.path, "headers": headers, "node": instances.node,
            "received_closes": instances.received_closes(&namespace, &room),
            "received_close_reasons": instances.received_close_reasons(&namespace, &room),
            "received_control": instances.received_control(&namespace, &room),
            "last_upgrade": instances.last_upgrade(&namespace, &room),
        });
        return respond_json(&mut stream, 200, &body).await;
    }
    instances.upgraded(&namespace, &room, &request);
    let Some(key) = request.header("sec-websocket-key") else {
        return respond(&mut stream, 400, "text/plain", "missing Sec-WebSocket-Key").await;
    };
    let accept = derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let socket =
        WebSocketStream::from_partially_read(stream, leftover.to_vec(), Role::Server, None).await;
    run_connection(socket, namespace, room, &instances).await;
    Ok(())
}

async fn run_connection(
    socket: WebSocketStream<TcpStream>,
    namespace: String,
    room: String,
    instances: &Instances,
) {
    let (outbox, mut inbox) = mpsc::unbounded_channel();
    let key = (namespace.clone(), room.clone());
    let membership = instances.join(&key, outbox.clone());
    let id = membership.id;
    let identity = json!({"type": "cf_agent_identity", "name": room, "agent": namespace});
    let _ = outbox.send(Message::text(identity.to_string()));
    let (mut sink, mut source) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(message) = inbox.recv().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
        // Wait for the peer's Close answer to arrive on the read side before dropping.
        let _ = sink.flush().await;
    });
    let mut received_close = 1006;
    let mut received_reason = String::new();
    while let Some(Ok(message)) = source.next().await {
        match message {
            Message::Text(ref text) => {
                if let Some(close) = close_request(text) {
                    let _ = outbox.send(Message::Close(Some(close)));
                    continue;
                }
                broadcast(instances, &key, id, &message);
            }
            Message::Binary(_) => broadcast(instances, &key, id, &message),
            Message::Close(frame) => {
                received_close = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                received_reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                break;
            }
            Message::Ping(payload) => instances.control_seen(&key, |seen| {
                seen.pings += 1;
                remember(&mut seen.recent_pings, &payload);
            }),
            Message::Pong(payload) => instances.control_seen(&key, |seen| {
                seen.pongs += 1;
                remember(&mut seen.recent_pongs, &payload);
            }),
            Message::Frame(_) => {}
        }
    }
    if let Ok(mut closes) = instances.received_closes.lock() {
        closes.entry(key.clone()).or_default().push(received_close);
    }
    if let Ok(mut reasons) = instances.received_close_reasons.lock() {
        reasons
            .entry(key.clone())
            .or_default()
            .push(received_reason);
    }
    // The WebSocket has ended: out of the count now, not after the writer winds down, and
    // after its Close is recorded, so whoever sees the count drop also sees that Close.
    drop(membership);
    drop(outbox);
    let _ = writer.await;
}

/// A connection's place in [`Instances::rooms`]: dropping it removes the connection, and its
/// room once empty, so the listing is exact whichever way the connection ended (a Close from
/// either side, a dropped socket, an error, a task that ended early).
struct Membership<'a> {
    instances: &'a Instances,
    key: (String, String),
    id: u64,
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        // A poisoned lock still holds a usable map; leaving the entry would make the count lie.
        let mut rooms = self
            .instances
            .rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(connections) = rooms.get_mut(&self.key) {
            connections.remove(&self.id);
            if connections.is_empty() {
                rooms.remove(&self.key);
            }
        }
    }
}

impl Instances {
    /// Adds a connection to the instance `key`; it stays counted while the result lives.
    fn join(&self, key: &(String, String), outbox: Outbox) -> Membership<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.entry(key.clone()).or_default().insert(id, outbox);
        Membership {
            instances: self,
            key: key.clone(),
            id,
        }
    }

    /// The `/admin/instances` answer: open connections per (namespace, room).
    fn listing(&self) -> serde_json::Value {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        listing(&self.node, &rooms)
    }

    fn received_closes(&self, namespace: &str, room: &str) -> Vec<u16> {
        self.received_closes
            .lock()
            .ok()
            .and_then(|c| c.get(&(namespace.to_owned(), room.to_owned())).cloned())
            .unwrap_or_default()
    }

    fn received_close_reasons(&self, namespace: &str, room: &str) -> Vec<String> {
        self.received_close_reasons
            .lock()
            .ok()
            .and_then(|c| c.get(&(namespace.to_owned(), room.to_owned())).cloned())
            .unwrap_or_default()
    }

    fn received_control(&self, namespace: &str, room: &str) -> ControlSeen {
        self.received_control
            .lock()
            .ok()
            .and_then(|c| c.get(&(namespace.to_owned(), room.to_owned())).cloned())
            .unwrap_or_default()
    }

    fn last_upgrade(&self, namespace: &str, room: &str) -> serde_json::Value {
        self.last_upgrades
            .lock()
            .ok()
            .and_then(|u| u.get(&(namespace.to_owned(), room.to_owned())).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Records `request` as the instance's most recent upgrade request.
    fn upgraded(&self, namespace: &str, room: &str, request: &Request) {
        let mut headers = serde_json::Map::new();
        for (k, v) in &request.headers {
            let name = k.to_ascii_lowercase();
            let value = shown(&name, v);
            let joined = match headers.get(&name).and_then(|e| e.as_str()) {
                Some(earlier) => format!("{earlier}, {value}"),
                None => value,
            };
            headers.insert(name, json!(joined));
        }
        let upgrade = json!({"path": request.path, "headers": headers});
        if let Ok(mut upgrades) = self.last_upgrades.lock() {
            upgrades.insert((namespace.to_owned(), room.to_owned()), upgrade);
        }
    }

    fn control_seen(&self, key: &(String, String), update: impl FnOnce(&mut ControlSeen)) {
        if let Ok(mut seen) = self.received_control.lock() {
            update(seen.entry(key.clone()).or_default());
        }
    }
}

/// Sends `message` to every connection of the instance: the sender gets its echo.
fn broadcast(instances: &Instances, key: &(String, String), _from: u64, message: &Message) {
    if let Ok(rooms) = instances.rooms.lock() {
        for outbox in rooms.get(key).into_iter().flat_map(HashMap::values) {
            let _ = outbox.send(message.clone());
        }
    }
}

/// The answer to this node's own paths (`/healthz`, `/admin/instances`), which need neither
/// routing headers nor the secret; `None` for every other path.
fn admin_answer(request: &Request, instances: &Instances) -> Option<(u16, serde_json::Value)> {
    let path = request.path.split('?').next().unwrap_or("");
    if path != "/healthz" && path != "/admin/instances" {
        return None;
    }
    Some(if request.method != "GET" {
        let error = format!("{} is not allowed on {path}; use GET", request.method);
        (405, json!({ "error": error }))
    } else if path == "/healthz" {
        (200, json!({"status": "ok", "node": instances.node}))
    } else {
        (200, instances.listing())
    })
}

/// `{"node": node, "instances": [{"namespace", "room", "connections"}, ...]}` in the order of
/// `rooms` (namespace, then room), leaving out rooms without connections.
fn listing(node: &str, rooms: &Rooms) -> serde_json::Value {
    let instances: Vec<serde_json::Value> = rooms
        .iter()
        .filter(|(_, connections)| !connections.is_empty())
        .map(|((namespace, room), connections)| {
            json!({"namespace": namespace, "room": room, "connections": connections.len()})
        })
        .collect();
    json!({ "node": node, "instances": instances })
}

fn close_request(text: &str) -> Option<CloseFrame> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value.get("type")?.as_str()? != "close" {
        return None;
    }
    let code = u16::try_from(value.get("code")?.as_u64()?).ok()?;
    let reason = value
        .get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or("")
        .to_owned();
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

/// A header's value as reported: credentials are described, never echoed.
fn shown(name: &str, value: &str) -> String {
    if is_credential(name) {
        fingerprint(value)
    } else {
        value.to_owned()
    }
}

/// Headers that carry credentials are described, never echoed.
fn is_credential(name: &str) -> bool {
    ["key", "secret", "token", "authorization", "cookie"]
        .iter()
        .any(|word| name.contains(word))
}

/// The Durable Object class a path would reach, as partyserver names it in its error.
fn class_name(path: &str) -> String {
    let segment = path.split('/').nth(2).unwrap_or("Agent");
    segment
        .split(['-', '_'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<(Request, BytesMut)>> {
    let mut buffer = BytesMut::with_capacity(2048);
    loop {
        if stream.read_buf(&mut buffer).await? == 0 {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buffer) {
            Ok(httparse::Status::Complete(len)) => {
                let request = Request {
                    method: parsed.method.unwrap_or("GET").to_owned(),
                    path: parsed.path.unwrap_or("/").to_owned(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                let leftover = buffer.split_off(len);
                return Ok(Some((request, leftover)));
            }
            Ok(httparse::Status::Partial) if buffer.len() < 64 * 1024 => continue,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad request head",
                ))
            }
        }
    }
}

async fn respond_json(
    stream: &mut TcpStream,
    status: u16,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    respond(stream, status, "application/json", &body.to_string()).await
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    // A 405 names what is allowed (RFC 9110, 15.5.6): only the admin paths answer 405.
    let allow = if status == 405 { "allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{allow}connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_as_partyserver_reports_them() {
        assert_eq!(class_name("/agents/coder-agent/default"), "CoderAgent");
        assert_eq!(class_name("/agents/CoderAgent/default"), "CoderAgent");
        assert_eq!(class_name("/agents/coderagent"), "Coderagent");
    }

    #[test]
    fn close_requests() {
        let close = close_request(r#"{"type":"close","code":4001,"reason":"bye"}"#).expect("close");
        assert_eq!(u16::from(close.code), 4001);
        assert!(close_request("hello").is_none());
        assert!(close_request(r#"{"type":"chat"}"#).is_none());
    }

    fn instances() -> Instances {
        Instances {
            node: "127.0.0.1:8787".to_owned(),
            ..Instances::default()
        }
    }

    fn key(namespace: &str, room: &str) -> (String, String) {
        (namespace.to_owned(), room.to_owned())
    }

    fn get(path: &str, method: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn listing_counts_open_connections_sorted_and_forgets_ended_ones() {
        let instances = instances();
        let (outbox, _inbox) = mpsc::unbounded_channel();
        let b1 = instances.join(&key("b-agent", "r1"), outbox.clone());
        let a2 = instances.join(&key("a-agent", "r2"), outbox.clone());
        let a1 = instances.join(&key("a-agent", "r1"), outbox.clone());
        let a1_again = instances.join(&key("a-agent", "r1"), outbox.clone());
        assert_eq!(
            instances.listing(),
            json!({"node": "127.0.0.1:8787", "instances": [
                {"namespace": "a-agent", "room": "r1", "connections": 2},
                {"namespace": "a-agent", "room": "r2", "connections": 1},
                {"namespace": "b-agent", "room": "r1", "connections": 1},
            ]})
        );
        drop(a1);
        drop(b1);
        assert_eq!(
            instances.listing()["instances"],
            json!([
                {"namespace": "a-agent", "room": "r1", "connections": 1},
                {"namespace": "a-agent", "room": "r2", "connections": 1},
            ])
        );
        drop((a1_again, a2));
        assert_eq!(instances.listing()["instances"], json!([]));
        // Emptied rooms are gone, not kept with zero connections.
        assert!(instances.rooms.lock().expect("lock").is_empty());
    }

    #[test]
    fn listing_leaves_out_rooms_without_connections() {
        let mut rooms = Rooms::new();
        rooms.insert(key("a", "empty"), HashMap::new());
        assert_eq!(listing("n", &rooms), json!({"node": "n", "instances": []}));
    }

    #[test]
    fn admin_paths_answer_without_routing_headers() {
        let instances = instances();
        let health = admin_answer(&get("/healthz", "GET"), &instances);
        assert_eq!(
            health,
            Some((200, json!({"status": "ok", "node": "127.0.0.1:8787"})))
        );
        let (status, body) =
            admin_answer(&get("/admin/instances?x=1", "GET"), &instances).expect("answered");
        assert_eq!(status, 200);
        assert_eq!(body["instances"], json!([]));
        for (path, method) in [("/healthz", "POST"), ("/admin/instances", "DELETE")] {
            let (status, body) = admin_answer(&get(path, method), &instances).expect("answered");
            assert_eq!(status, 405, "{method} {path}");
            assert!(body["error"].as_str().is_some_and(|e| e.contains(method)));
        }
        for path in ["/agents/coder-agent/r1", "/healthz/x", "/admin", "/"] {
            assert!(
                admin_answer(&get(path, "GET"), &instances).is_none(),
                "{path}"
            );
        }
    }
}
