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

use common::auth::*;
use common::workerd::*;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Instant;

/// The HS256 key the gateway verifies tokens with (its secret JWT_KEY). Test values only.
const JWT_KEY: &str = "jwt-test-key-workerd-auth-5c1e7b";
/// The gateway's `sign_with` secret, and the Worker's GATEWAY_IDENTITY_KEY.
const IDENTITY_KEY: &str = "identity-test-key-workerd-auth-9f2a";
/// A claim that is not ASCII: signed as UTF-8 by the gateway, read as UTF-8 by workerd.
const NAME: &str = "Zoë Ω";
const REFUSED: &str = "Unauthorized: no valid gateway identity";

/// Starts worker-auth.js with GATEWAY_IDENTITY_KEY = [`IDENTITY_KEY`].
fn start_auth_workerd() -> Workerd {
    start_workerd("auth", &[("GATEWAY_IDENTITY_KEY", IDENTITY_KEY)])
}

/// The gateway in front of workerd, with the policy `users` on the whole route: HS256 tokens
/// as bearer or `?token=`, no leeway (the expiry close comes at `exp`), four claims sent as
/// identity headers and signed with IDENTITY_KEY.
fn start_auth_gateway(workerd: SocketAddr) -> Gateway {
    let policy = r#"
[auth.users]
method = "jwt"
credentials = ["bearer", "query:token"]
algorithms = ["HS256"]
key_secret = "JWT_KEY"
leeway = "0s"
identity_headers = { sub = "x-user-id", email = "x-user-email", name = "x-user-name", n = "x-token-n" }
sign_with = "IDENTITY_KEY"
"#;
    let config = worker_upstream(workerd)
        + policy
        + &route("/agents", Some("users"))
        + &agent("CoderAgent", "workerd", None);
    start_gateway_with(
        &config,
        &[("JWT_KEY", JWT_KEY), ("IDENTITY_KEY", IDENTITY_KEY)],
        |_| {},
    )
}

/// An HS256 token for `claims`.
fn token(claims: &Value) -> String {
    sign(Algorithm::HS256, JWT_KEY, None, claims)
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
    let hex = identity_signature(key, timestamp, agent, instance, headers);
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

fn as_strs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// A WebSocket handshake written by hand with `headers` (tungstenite refuses UTF-8 values),
/// its 101 required; then a tungstenite client on the same connection.
async fn connect_with(url: &str, headers: &[(String, String)]) -> Ws {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let rest = url.strip_prefix("ws://").expect("a ws:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let address: SocketAddr = authority.parse().expect("an IP:port authority");
    let (stream, _) = upgrade(address, path, &as_strs(headers)).await.open();
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        Role::Client,
        None,
    )
    .await
}

/// Connects, checks the agent's identity frame, and asks the agent what it received.
async fn whoami(url: &str, headers: &[(String, String)], room: &str) -> Value {
    let mut ws = connect_with(url, headers).await;
    let identity = next_json(&mut ws).await;
    assert_eq!(identity["type"], "cf_agent_identity", "{url}: {identity}");
    assert_eq!(identity["agent"], "coder-agent");
    assert_eq!(identity["name"], room);
    send_text(&mut ws, r#"{"type":"whoami"}"#).await;
    let (_, seen) = next_of_type(&mut ws, "whoami").await;
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
    let headers = as_strs(headers);
    if !upgrade {
        let mut request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (name, value) in &headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        let answer = raw_request(workerd.address, &(request + "\r\n")).await;
        return (answer.status, answer.body);
    }
    match upgrade_as(workerd.address, "localhost", path, &headers).await {
        Upgrade::Open(..) => (101, String::new()),
        Upgrade::Refused(answer) => (answer.status, answer.body),
    }
}

#[tokio::test]
async fn the_worker_accepts_the_gateways_signed_identity_and_refuses_any_other() {
    let started = Instant::now();
    let workerd = start_auth_workerd();
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
    let workerd = start_auth_workerd();
    let gateway = start_auth_gateway(workerd.address);
    let via = gateway.address().to_string();
    let room = "expiring";

    let args = ["--host", via.as_str(), "--name", room, "--ttl", "3"];
    let lines = run_script_with("auth-client.mjs", &args, &[("JWT_KEY", JWT_KEY)]).await;
    let step = |name: &str| step(&lines, name);

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
