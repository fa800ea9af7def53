//! Authentication end to end with the real Cloudflare Agents SDK in a real workerd.
//!
//! `tests/workerd/worker-auth.js` is a Worker whose `routeAgentRequest` runs
//! `docs/examples/gateway-identity.js` (imported as documented, not copied) in
//! `onBeforeConnect` and `onBeforeRequest`; `start.mjs --worker auth` serves it with Miniflare
//! on 127.0.0.1. The real gateway binary sits in front (a `worker` upstream) with a JWT policy
//! that maps claims to identity headers and signs them. Proven here:
//!
//! - a request through the gateway reaches the agent with the identity of its token (client
//!   copies of the identity headers are dropped), over WebSocket and plain HTTP; the same Worker
//!   answers 401 to a request straight to workerd that is unsigned, signed with another key,
//!   altered, replayed on another instance, or stale, and accepts one this test signs itself as
//!   the documentation says (so the 401s are the verifier's doing, not a mismatch);
//! - the SDK's own `AgentClient`, whose async `query` mints a fresh token on every connect,
//!   is closed by the gateway with 1008 "token expired" when its token expires, the agent
//!   sees 1001 "client credential expired", and the client reconnects with a new token under
//!   the same `_pk`.
//!
//! `tests/workerd/setup.sh` installs the pinned npm packages once; without Node and npm every
//! test here fails, saying so.

mod common;

use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use ring::hmac;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message;

/// Installing the npm packages on a cold cache, or starting workerd on a busy machine.
const SLOW_WAIT: Duration = Duration::from_secs(300);
const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// auth-client.mjs bounds itself to 30 s; this is the outer bound.
const SCRIPT_WAIT: Duration = Duration::from_secs(45);

/// The HS256 key the gateway verifies tokens with (its secret JWT_KEY). Test values only.
const JWT_KEY: &str = "jwt-test-key-workerd-auth-5c1e7b";
/// The gateway's `sign_with` secret, and the Worker's GATEWAY_IDENTITY_KEY.
const IDENTITY_KEY: &str = "identity-test-key-workerd-auth-9f2a";
/// A claim that is not ASCII: signed as UTF-8 by the gateway, read as UTF-8 by workerd.
const NAME: &str = "Zoë Ω";
const REFUSED: &str = "Unauthorized: no valid gateway identity";

fn workerd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workerd")
}

/// Runs `tests/workerd/setup.sh` once per test binary; every caller sees its outcome.
fn setup() {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let outcome = SETUP.get_or_init(|| {
        let mut child = Command::new("bash")
            .arg(workerd_dir().join("setup.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run tests/workerd/setup.sh with bash: {e}"))?;
        let deadline = Instant::now() + SLOW_WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("tests/workerd/setup.sh took over {SLOW_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if status.success() {
            return Ok(());
        }
        let mut output = String::new();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        ]
        .into_iter()
        .flatten()
        {
            let _ = BufReader::new(pipe).read_to_string(&mut output);
        }
        Err(format!(
            "tests/workerd/setup.sh failed ({status}):\n{output}"
        ))
    });
    if let Err(why) = outcome {
        panic!("the workerd auth tests cannot run: {why}");
    }
}

/// `start.mjs --worker auth` serving worker-auth.js. Dropping it closes stdin (Miniflare
/// disposes of workerd), then kills the whole process group, so no workerd outlives a test.
struct Workerd {
    child: Child,
    stdin: Option<ChildStdin>,
    address: SocketAddr,
    /// Everything the process printed besides the readiness line, shown when a test fails.
    log: Arc<Mutex<String>>,
}

impl Workerd {
    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.address)
    }
}

impl Drop for Workerd {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            // The group is this child's own (process_group(0)): node, workerd and esbuild.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                eprintln!("--- workerd output ({}) ---\n{log}", self.address);
            }
        }
    }
}

/// Starts worker-auth.js with GATEWAY_IDENTITY_KEY = [`IDENTITY_KEY`] and waits for its
/// readiness line.
fn start_workerd() -> Workerd {
    setup();
    let mut child = Command::new("node")
        .arg(workerd_dir().join("start.mjs"))
        .args(["--worker", "auth"])
        .current_dir(workerd_dir())
        .env_remove("OPENROUTER_API_KEY")
        .env("GATEWAY_IDENTITY_KEY", IDENTITY_KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}): the workerd auth tests need Node 20+ on PATH")
        });
    let log = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    let stdout_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match line.strip_prefix("workerd listening on http://") {
                Some(address) => {
                    let _ = ready_tx.send(address.trim().to_owned());
                }
                None => append(&stdout_log, &line),
            }
        }
    });
    let stderr = child.stderr.take().expect("stderr");
    let stderr_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            append(&stderr_log, &line);
        }
    });
    let stdin = child.stdin.take();
    let mut workerd = Workerd {
        child,
        stdin,
        address: "127.0.0.1:0".parse().expect("address"),
        log,
    };
    match ready_rx.recv_timeout(STARTUP_WAIT) {
        Ok(address) => {
            workerd.address = address
                .parse()
                .unwrap_or_else(|_| panic!("unexpected readiness address {address:?}"));
            workerd
        }
        Err(_) => {
            let log = workerd.log.lock().map(|l| l.clone()).unwrap_or_default();
            panic!("workerd (auth) printed no readiness line within {STARTUP_WAIT:?}:\n{log}")
        }
    }
}

fn append(log: &Mutex<String>, line: &str) {
    if let Ok(mut log) = log.lock() {
        log.push_str(line);
        log.push('\n');
    }
}

/// The gateway in front of workerd, with the policy `users` on the whole route: HS256 tokens
/// as bearer or `?token=`, no leeway (the expiry close comes at `exp`), four claims sent as
/// identity headers and signed with IDENTITY_KEY.
fn start_auth_gateway(workerd: SocketAddr) -> Gateway {
    let config = format!(
        r#"
[server]
listen = "{{listen}}"
threads = 2

[admin]
listen = "{{admin}}"

[upstreams.workerd]
kind = "worker"
address = "{workerd}"
tls = false
host = "localhost"
connect_timeout = "2s"
read_timeout = "10s"

[auth.users]
method = "jwt"
credentials = ["bearer", "query:token"]
algorithms = ["HS256"]
key_secret = "JWT_KEY"
leeway = "0s"
identity_headers = {{ sub = "x-user-id", email = "x-user-email", name = "x-user-name", n = "x-token-n" }}
sign_with = "IDENTITY_KEY"

[[routes]]
prefix = "/agents"
auth = "users"

[[routes.agents]]
name = "CoderAgent"
upstream = "workerd"
"#
    );
    start_gateway_with(
        &config,
        &[("JWT_KEY", JWT_KEY), ("IDENTITY_KEY", IDENTITY_KEY)],
        |_| {},
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// An HS256 token for `claims`.
fn token(claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(JWT_KEY.as_bytes()),
    )
    .expect("token")
}

/// Request headers, as (name, value).
type Headers = Vec<(String, String)>;

/// The identity headers and the three signature headers, as the doc comment of
/// `src/auth/identity.rs` specifies them, computed here independently of the gateway.
fn signed(
    key: &str,
    timestamp: u64,
    agent: &str,
    instance: &str,
    headers: &[(&str, &str)],
) -> Headers {
    let mut text = format!("agent-gateway-identity-v1\n{timestamp}\n{agent}\n{instance}\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}:{value}\n"));
    }
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()),
        text.as_bytes(),
    );
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
    let mut all: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    all.push(("x-gateway-identity-signature".into(), hex));
    all.push(("x-gateway-identity-timestamp".into(), timestamp.to_string()));
    all.push(("x-gateway-identity-headers".into(), names.join(",")));
    all
}

/// A WebSocket handshake written by hand with `headers` (tungstenite refuses UTF-8 values),
/// its 101 required; then a tungstenite client on the same connection.
async fn connect_with(url: &str, headers: &[(String, String)]) -> Ws {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let rest = url.strip_prefix("ws://").expect("a ws:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{url}: {head}");
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        Role::Client,
        None,
    )
    .await
}

/// The next JSON text frame of `kind`, skipping others.
async fn next_of_type(ws: &mut Ws, kind: &str) -> Value {
    for _ in 0..16 {
        if let Message::Text(text) = next_message(ws).await {
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if value["type"] == kind {
                return value;
            }
        }
    }
    panic!("no {kind} frame among the next 16");
}

/// Connects, checks the agent's identity frame, and asks the agent what it received.
async fn whoami(url: &str, headers: &[(String, String)], room: &str) -> Value {
    let mut ws = connect_with(url, headers).await;
    let identity = next_json(&mut ws).await;
    assert_eq!(identity["type"], "cf_agent_identity", "{url}: {identity}");
    assert_eq!(identity["agent"], "coder-agent");
    assert_eq!(identity["name"], room);
    send_text(&mut ws, r#"{"type":"whoami"}"#).await;
    let seen = next_of_type(&mut ws, "whoami").await;
    let _ = ws.close(None).await;
    seen
}

/// A request (upgrade or not) straight to workerd with `headers`: its status and body.
async fn direct(
    workerd: &Workerd,
    path: &str,
    headers: &[(String, String)],
    upgrade: bool,
) -> (u16, String) {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if upgrade {
        request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    if !upgrade {
        let answer = raw_request(workerd.address, &request).await;
        return (answer.status, answer.body);
    }
    // An accepted upgrade never ends by itself: the head decides, then the body if any.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(workerd.address)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; if status == 101 { 0 } else { length }];
    tokio::time::timeout(WAIT, stream.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The path and query of an absolute URL.
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/').map_or("", |i| &rest[i..])
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_worker_accepts_the_gateways_signed_identity_and_refuses_any_other() {
    let started = Instant::now();
    let workerd = start_workerd();
    let gateway = start_auth_gateway(workerd.address);
    let room = "signed";
    let alice = token(&json!({
        "sub": "alice", "email": "alice@example.com", "name": NAME, "exp": now() + 600,
    }));
    let expected = json!({
        "x-user-id": "alice", "x-user-email": "alice@example.com", "x-user-name": NAME,
    });

    // Through the gateway, with the client's own (forged) copies of the identity headers,
    // which the gateway must drop: the agent gets alice, as the gateway signed it.
    let forged_copies = [
        ("authorization", format!("Bearer {alice}")),
        ("x-user-id", "mallory".to_owned()),
        ("x_user_id", "mallory".to_owned()),
        ("x-token-n", "99".to_owned()),
        ("x-gateway-identity-signature", "0".repeat(64)),
        ("x-gateway-identity-headers", "x-user-id".to_owned()),
    ]
    .map(|(n, v)| (n.to_owned(), v));
    let seen = whoami(
        &gateway.url(&format!("/agents/CoderAgent/{room}?_pk=via-gateway")),
        &forged_copies,
        room,
    )
    .await;
    assert_eq!(seen["identity"], expected, "{seen}");
    assert_eq!(seen["id"], "via-gateway");
    let headers = &seen["headers"];
    assert_eq!(headers["x-user-id"], "alice", "{headers}");
    for gone in ["x_user_id", "x-token-n"] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the agent: {headers}"
        );
    }
    assert_eq!(
        path_of(seen["url"].as_str().expect("url")),
        format!("/agents/coder-agent/{room}?_pk=via-gateway")
    );
    // Plain HTTP, through onBeforeRequest, and a token in the query, which stays at the gateway.
    let answer = get(
        gateway.address(),
        &format!("/agents/coder_agent/{room}?token={alice}"),
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["identity"], expected, "{body}");
    assert_eq!(
        path_of(body["url"].as_str().expect("url")),
        format!("/agents/coder-agent/{room}"),
        "the token is not passed on"
    );

    // Straight to workerd. The control: signed here as documented, fresh, it is accepted.
    let path = format!("/agents/coder-agent/{room}");
    let identity = [
        ("x-user-id", "alice"),
        ("x-user-email", "alice@example.com"),
        ("x-user-name", NAME),
    ];
    let good = signed(IDENTITY_KEY, now(), "coder-agent", room, &identity);
    let seen = whoami(
        &workerd.url(&format!("{path}?_pk=self-signed")),
        &good,
        room,
    )
    .await;
    assert_eq!(seen["identity"], expected, "{seen}");
    let (status, body) = direct(&workerd, &path, &good, false).await;
    assert_eq!(status, 200, "{body}");

    // Everything else is refused by the Worker, upgrade and plain HTTP alike.
    let mut tampered = good.clone();
    tampered[0].1 = "mallory".into();
    let mut dropped = good.clone();
    dropped.retain(|(n, _)| n != "x-user-email");
    let cases: Vec<(&str, String, Headers)> = vec![
        (
            "unsigned",
            path.clone(),
            vec![("x-user-id".into(), "alice".into())],
        ),
        (
            "signed with another key",
            path.clone(),
            signed("not-the-key", now(), "coder-agent", room, &identity),
        ),
        ("altered after signing", path.clone(), tampered),
        ("a signed header missing", path.clone(), dropped),
        (
            "replayed on another instance",
            "/agents/coder-agent/elsewhere".into(),
            good.clone(),
        ),
        (
            "stale (2 minutes old)",
            path.clone(),
            signed(IDENTITY_KEY, now() - 120, "coder-agent", room, &identity),
        ),
        (
            "from the future (2 minutes ahead)",
            path.clone(),
            signed(IDENTITY_KEY, now() + 120, "coder-agent", room, &identity),
        ),
    ];
    for (what, path, headers) in &cases {
        for upgrade in [true, false] {
            let (status, body) = direct(&workerd, path, headers, upgrade).await;
            assert_eq!(
                (status, body.as_str()),
                (401, REFUSED),
                "{what} (upgrade: {upgrade})"
            );
        }
    }

    let metrics = gateway.metrics().await;
    let allowed = metric_sum(
        &metrics,
        "agent_gateway_auth_decisions_total",
        &["result=\"allowed\""],
    );
    assert_eq!(allowed, 2.0, "{metrics}");
    eprintln!("signed identity test took {:?}", started.elapsed());
}

#[tokio::test]
async fn the_sdk_client_is_closed_at_token_expiry_and_reconnects_with_a_fresh_token() {
    let started = Instant::now();
    let workerd = start_workerd();
    let gateway = start_auth_gateway(workerd.address);
    let via = gateway.address().to_string();
    let room = "expiring";

    let child = tokio::process::Command::new("node")
        .arg(workerd_dir().join("auth-client.mjs"))
        .args(["--host", &via, "--name", room, "--ttl", "3"])
        .current_dir(workerd_dir())
        .env("JWT_KEY", JWT_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node auth-client.mjs ({e}): Node 20+ on PATH"));
    let output = tokio::time::timeout(SCRIPT_WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("auth-client.mjs did not finish within {SCRIPT_WAIT:?}"))
        .expect("script output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let transcript = format!(
        "auth-client.mjs ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{transcript}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let step = |name: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step in {transcript}"))
    };

    // Connected through the gateway with the first token, which the SDK put in the query.
    let connected = step("connected");
    let pk = connected["pk"].as_str().expect("pk").to_owned();
    let open_url = format!("ws://{via}/agents/coder-agent/{room}?_pk={pk}&token=[token]");
    let frames = connected["frames"].as_array().expect("frames");
    assert_eq!(frames[0]["kind"], "open", "{connected}");
    assert_eq!(frames[0]["url"], open_url.as_str());
    let identity = &frames[1]["data"];
    assert_eq!(identity["type"], "cf_agent_identity", "{connected}");
    assert_eq!(identity["agent"], "coder-agent");
    assert_eq!(identity["name"], room);

    // The agent got the token's identity, and not the token.
    let upstream = format!("/agents/coder-agent/{room}?_pk={pk}");
    let seen = &step("whoami")["seen"];
    assert_eq!(seen["id"], pk.as_str());
    assert_eq!(path_of(seen["url"].as_str().expect("url")), upstream);
    let identity_of = |n: &str| json!({"x-user-id": "sdk-user", "x-user-email": "sdk-user@example.com", "x-token-n": n});
    assert_eq!(seen["identity"], identity_of("1"), "{seen}");

    // Closed by the gateway when the token expired, with the documented Close, on time.
    let expired = step("expired");
    eprintln!("the expiry close, as the SDK saw it: {expired}");
    assert_eq!(expired["close"]["code"], 1008, "{expired}");
    assert_eq!(expired["close"]["reason"], "token expired", "{expired}");
    assert_eq!(expired["close"]["wasClean"], true, "{expired}");
    let late = expired["ms_after_exp"].as_f64().expect("ms_after_exp");
    assert!(
        (-250.0..2000.0).contains(&late),
        "closed {late} ms after exp: {expired}"
    );
    // AgentClient holds 1008 as terminal: it reconnects only because the application asked.
    assert_eq!(expired["sdk_connection_error"], json!({"code": 1008}));

    // Reconnected with a freshly minted token (the query ran again), under the same _pk.
    let reconnected = step("reconnected");
    assert_eq!(reconnected["pk"], pk.as_str(), "the SDK kept its _pk");
    let seen = &reconnected["seen"];
    assert_eq!(seen["id"], pk.as_str(), "the agent saw the same _pk");
    assert_eq!(path_of(seen["url"].as_str().expect("url")), upstream);
    assert_eq!(seen["identity"], identity_of("2"), "{seen}");
    let frames = reconnected["frames"].as_array().expect("frames");
    let kinds: Vec<&str> = frames.iter().filter_map(|f| f["kind"].as_str()).collect();
    assert_eq!(&kinds[..3], ["close", "open", "message"], "{frames:#?}");
    assert_eq!(frames[1]["url"], open_url.as_str());
    assert_eq!(frames[2]["data"]["type"], "cf_agent_identity");
    let mints: Vec<(&str, u64)> = reconnected["minted"]
        .as_array()
        .expect("minted")
        .iter()
        .map(|m| {
            (
                m["sub"].as_str().unwrap_or(""),
                m["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(mints, [("observer", 1), ("sdk-user", 1), ("sdk-user", 2)]);

    // The agent was told the client left (1001), not that the token expired; the observer,
    // whose token is valid, stayed.
    let agent_saw = step("agent_saw");
    assert_eq!(
        agent_saw["report"],
        json!({"type": "peer_closed", "id": pk, "code": 1001,
               "reason": "client credential expired", "wasClean": true}),
        "{agent_saw}"
    );
    assert_eq!(agent_saw["observer_closes"], json!([]));
    assert_eq!(lines.last().map(|l| &l["step"]), Some(&json!("done")));

    let metrics = gateway.metrics().await;
    let expiry_closes = metric_sum(
        &metrics,
        "agent_gateway_ws_close_causes_total",
        &["cause=\"token_expired\""],
    );
    assert_eq!(expiry_closes, 1.0, "{metrics}");
    let allowed = metric_sum(
        &metrics,
        "agent_gateway_auth_decisions_total",
        &["result=\"allowed\""],
    );
    assert_eq!(
        allowed, 3.0,
        "observer, first and second connection\n{metrics}"
    );
    eprintln!("token expiry test took {:?}", started.elapsed());
}
