//! Authentication with API keys, through the real gateway and the reference backend: a key
//! from a secret in the gateway's environment lets its subject through whether it comes as a
//! bearer token, a query parameter, a cookie or a `Sec-WebSocket-Protocol` entry, and the
//! agent is told the subject in the identity header (signed with HMAC-SHA256 when the policy
//! says so, verifiable with the documented text); a wrong or missing key is refused with 401
//! before anything reaches the agent; the credential's query parameter and protocol entry,
//! and client-sent copies of the identity headers, never reach the agent; per-subject limits
//! refuse with 429 and free their slots, and the per-address limits refuse a flood before any
//! key is checked; an agent may be public under a guarded route;
//! `check` and `/config` show each agent's policy, and a policy whose key secret is missing
//! fails `check` and answers 503. Decisions and refusals are counted.

mod common;

use common::auth::*;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const ALICE: &str = "ak-alice-7f3c9e21d4b85a60";
const BOB: &str = "ak-bob-0c6d2b8e91f4a735";
const IDENTITY_KEY: &str = "identity-signing-key-5e1f";

/// A gateway over the backend at `node` with `policies` and `routes`, heartbeats off.
fn config(node: SocketAddr, policies: &str, routes: &str) -> String {
    format!("{}\n{policies}\n{routes}", quiet_config(&[("local", node)]))
}

const KEYS: &str = r#"
[auth.keys]
method = "api_key"
credentials = ["bearer", "query:api_key", "cookie:session", "protocol:bearer."]
keys = { alice = "ALICE_KEY", bob = "BOB_KEY" }
identity_headers = { sub = "x-user-id" }
"#;

/// The `/agents` route, guarded by `keys`, with CoderAgent.
fn guarded() -> String {
    route("/agents", Some("keys")) + &agent("CoderAgent", "local", None)
}

/// Starts a gateway with the keys (and the identity signing key) in its environment.
fn start(text: &str) -> Gateway {
    let env = [
        ("ALICE_KEY", ALICE),
        ("BOB_KEY", BOB),
        ("IDENTITY_KEY", IDENTITY_KEY),
    ];
    start_gateway_with(text, &env, |_| {})
}

fn key_decisions(result: &str) -> String {
    decisions("agents", "api_key", result)
}

fn refusals(limit: &str) -> String {
    format!("agent_gateway_limit_refusals_total{{limit=\"{limit}\"}}")
}

/// The backend's record of the most recent upgrade of CoderAgent's `room`.
async fn last_upgrade(gateway: &Gateway, room: &str) -> Value {
    let authorization = bearer(ALICE);
    let path = format!("/agents/CoderAgent/{room}");
    backend_json(gateway, &path, &[("Authorization", &authorization)]).await["last_upgrade"].clone()
}

#[tokio::test]
async fn a_key_as_bearer_query_parameter_or_cookie_lets_its_subject_through() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start(&config(backend.address, KEYS, &guarded()));
    let address = gateway.address();

    let seen = backend_json(
        &gateway,
        "/agents/CoderAgent/keys",
        &[("Authorization", &bearer(ALICE))],
    )
    .await;
    assert_eq!(seen["headers"]["x-user-id"], "alice", "{seen}");

    let query = format!("/agents/CoderAgent/keys?mode=live&api_key={BOB}&x=1");
    let seen = backend_json(&gateway, &query, &[]).await;
    assert_eq!(seen["headers"]["x-user-id"], "bob", "{seen}");
    assert_eq!(seen["path"], "/agents/coder-agent/keys?mode=live&x=1");
    let only = format!("/agents/CoderAgent/keys?api_key={BOB}");
    let seen = backend_json(&gateway, &only, &[]).await;
    assert_eq!(seen["path"], "/agents/coder-agent/keys", "{seen}");

    let cookie = format!("theme=dark; session={ALICE}");
    let seen = backend_json(&gateway, "/agents/CoderAgent/keys", &[("Cookie", &cookie)]).await;
    assert_eq!(seen["headers"]["x-user-id"], "alice", "{seen}");

    // The upgrade: the key in the query is gone from what the agent was asked.
    let path = format!("/agents/CoderAgent/keys-ws?api_key={ALICE}&v=2");
    let (_ws, head) = upgrade(address, &path, &[]).await.open();
    assert!(!head.contains(ALICE), "{head}");
    let seen = last_upgrade(&gateway, "keys-ws").await;
    assert_eq!(seen["path"], "/agents/coder-agent/keys-ws?v=2", "{seen}");
    assert_eq!(seen["headers"]["x-user-id"], "alice", "{seen}");
    assert!(!seen.to_string().contains(ALICE), "{seen}");

    // Four GETs, one upgrade and the GET reading the backend's record.
    let allowed = key_decisions("allowed");
    assert_eq!(gateway.metric(&allowed).await, 6.0);
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_refused_before_the_agent() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start(&config(backend.address, KEYS, &guarded()));
    let address = gateway.address();

    for wrong in [
        vec![("Authorization", bearer("ak-alice-7f3c9e21d4b85a6"))],
        vec![("Cookie", format!("session={ALICE}x"))],
    ] {
        let headers: Vec<(&str, &str)> = wrong.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = get(address, "/agents/CoderAgent/wrong", &headers).await;
        assert_eq!(answer.status, 401, "{}", answer.head);
        let body = answer.json();
        assert_eq!(body["error"], "invalid_token", "{body}");
        assert_eq!(body["policy"], "keys");
        let challenge = answer.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"agent-gateway\", error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(!answer.head.contains(ALICE) && !answer.body.contains(ALICE));
    }
    let answer = get(address, "/agents/CoderAgent/none", &[]).await;
    assert_eq!(answer.status, 401, "{}", answer.head);
    let body = answer.json();
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(body["policy"], "keys");
    assert_eq!(body["detail"], "no credential");
    assert_eq!(
        answer.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"agent-gateway\"")
    );

    // Refused upgrades: the agent never hears of them.
    let wrong = upgrade(address, "/agents/CoderAgent/refused-1?api_key=nope", &[]).await;
    let answer = wrong.refused();
    assert_eq!(
        (answer.status, answer.json()["error"].clone()),
        (401, "invalid_token".into())
    );
    let none = upgrade(address, "/agents/CoderAgent/refused-2", &[]).await;
    assert_eq!(none.refused().json()["error"], "unauthorized");
    for room in ["refused-1", "refused-2", "wrong", "none"] {
        assert_eq!(last_upgrade(&gateway, room).await, Value::Null, "{room}");
    }

    assert_eq!(gateway.metric(&key_decisions("invalid")).await, 3.0);
    assert_eq!(gateway.metric(&key_decisions("missing")).await, 2.0);
}

/// Client-sent copies of the identity header, its `_` alias in any case, and the gateway's
/// signature headers are removed; the agent gets the gateway's values only.
#[tokio::test]
async fn client_sent_identity_headers_never_reach_the_agent() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start(&config(backend.address, KEYS, &guarded()));
    let authorization = bearer(BOB);
    let spoofs = [
        ("Authorization", authorization.as_str()),
        ("x-user-id", "mallory"),
        ("X_User_Id", "mallory"),
        ("x-gateway-identity-signature", "forged"),
        ("X-Gateway-Identity-Headers", "x-user-id"),
    ];
    let seen = backend_json(&gateway, "/agents/CoderAgent/spoof", &spoofs).await;
    let (_ws, _) = upgrade(gateway.address(), "/agents/CoderAgent/spoof-ws", &spoofs)
        .await
        .open();
    let upgraded = last_upgrade(&gateway, "spoof-ws").await;
    for headers in [&seen["headers"], &upgraded["headers"]] {
        assert_eq!(headers["x-user-id"], "bob", "{headers}");
        let names: Vec<&String> = headers.as_object().expect("headers").keys().collect();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("x-gateway-identity") || *n == "x_user_id"),
            "{names:?}"
        );
        assert!(!headers.to_string().contains("mallory"), "{headers}");
    }
}

/// The agent can verify the identity with the secret: HMAC-SHA256 over the text the doc
/// comment of `src/auth/identity.rs` gives, recomputed here.
#[tokio::test]
async fn a_signed_identity_verifies_with_the_documented_hmac() {
    let backend = start_backend(Some(TEST_KEY));
    let signed = KEYS.to_owned() + "sign_with = \"IDENTITY_KEY\"\n";
    let gateway = start(&config(backend.address, &signed, &guarded()));
    let authorization = bearer(ALICE);
    let headers = [
        ("Authorization", authorization.as_str()),
        ("x-gateway-identity-signature", "forged"),
        ("x-gateway-identity-timestamp", "1"),
        ("x_gateway_identity_headers", "x-user-id,x-admin"),
    ];
    let seen = backend_json(&gateway, "/agents/CoderAgent/signed-get", &headers).await;
    assert_signed(&seen["headers"], "signed-get");
    let (_ws, _) = upgrade(gateway.address(), "/agents/CoderAgent/signed-ws", &headers)
        .await
        .open();
    let upgraded = last_upgrade(&gateway, "signed-ws").await;
    assert_signed(&upgraded["headers"], "signed-ws");
    assert_ne!(
        seen["headers"]["x-gateway-identity-signature"],
        upgraded["headers"]["x-gateway-identity-signature"],
        "another instance, another signature"
    );
}

fn assert_signed(headers: &Value, instance: &str) {
    let text = |name: &str| {
        headers[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {headers}"))
            .to_owned()
    };
    assert_eq!(text("x-user-id"), "alice");
    assert_eq!(text("x-gateway-identity-headers"), "x-user-id");
    let timestamp: u64 = text("x-gateway-identity-timestamp")
        .parse()
        .expect("seconds");
    let now = now();
    assert!(now.abs_diff(timestamp) < 60, "{timestamp} vs {now}");
    let identity = [("x-user-id", "alice")];
    let expected = identity_signature(IDENTITY_KEY, timestamp, "coder-agent", instance, &identity);
    assert_eq!(text("x-gateway-identity-signature"), expected, "{headers}");
}

#[tokio::test]
async fn a_key_in_the_subprotocol_is_neither_offered_upstream_nor_echoed() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start(&config(backend.address, KEYS, &guarded()));
    let offer = format!("bearer.{ALICE}, chat");
    let (_ws, head) = upgrade(
        gateway.address(),
        "/agents/CoderAgent/protocol",
        &[("Sec-WebSocket-Protocol", &offer)],
    )
    .await
    .open();
    let answer = RawResponse {
        status: 101,
        head: head.clone(),
        body: String::new(),
    };
    assert_eq!(
        answer.header("sec-websocket-protocol").as_deref(),
        Some("chat"),
        "{head}"
    );
    assert!(!head.contains(ALICE), "{head}");
    let seen = last_upgrade(&gateway, "protocol").await;
    assert_eq!(seen["headers"]["sec-websocket-protocol"], "chat", "{seen}");
    assert_eq!(seen["headers"]["x-user-id"], "alice", "{seen}");
    assert!(!seen.to_string().contains(ALICE), "{seen}");
}

#[tokio::test]
async fn open_websockets_per_subject_are_limited_apart_from_other_subjects() {
    let backend = start_backend(Some(TEST_KEY));
    let limited = KEYS.to_owned() + "max_websockets_per_subject = 2\n";
    let gateway = start(&config(backend.address, &limited, &guarded()));
    let address = gateway.address();
    let alice = bearer(ALICE);
    let as_alice = [("Authorization", alice.as_str())];
    let (first, _) = upgrade(address, "/agents/CoderAgent/s1", &as_alice)
        .await
        .open();
    let (_second, _) = upgrade(address, "/agents/CoderAgent/s2", &as_alice)
        .await
        .open();
    let third = upgrade(address, "/agents/CoderAgent/s3", &as_alice)
        .await
        .refused();
    assert_eq!(third.status, 429, "{}", third.head);
    assert_eq!(third.json()["error"], "websockets_per_subject");
    assert_eq!(
        gateway.metric(&refusals("websockets_per_subject")).await,
        1.0
    );
    assert_eq!(last_upgrade(&gateway, "s3").await, Value::Null);

    let bob = bearer(BOB);
    let (_bob, _) = upgrade(address, "/agents/CoderAgent/s3", &[("Authorization", &bob)])
        .await
        .open();

    // Closing one of alice's frees its slot once the gateway has seen the connection end.
    drop(first);
    let active = "agent_gateway_ws_connections_active{agent=\"CoderAgent\"}";
    gateway.wait_metric(active, 2.0).await;
    let deadline = Instant::now() + WAIT;
    let _again = loop {
        match upgrade(address, "/agents/CoderAgent/s4", &as_alice).await {
            Upgrade::Open(stream, _) => break stream,
            Upgrade::Refused(answer) => {
                assert_eq!(answer.status, 429, "{}", answer.head);
                assert!(Instant::now() < deadline, "the slot was never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
}

#[tokio::test]
async fn upgrades_per_subject_per_second_are_limited_apart_from_other_subjects() {
    let backend = start_backend(Some(TEST_KEY));
    let paced = KEYS.to_owned() + "upgrades_per_subject_per_second = 2\n";
    let gateway = start(&config(backend.address, &paced, &guarded()));
    let address = gateway.address();
    let alice = bearer(ALICE);
    let mut open = Vec::new();
    let mut refused = 0;
    let started = std::time::Instant::now();
    for i in 0..10 {
        let path = format!("/agents/CoderAgent/paced-{i}");
        match upgrade(address, &path, &[("Authorization", &alice)]).await {
            Upgrade::Open(stream, _) => open.push(stream),
            Upgrade::Refused(answer) => {
                assert_eq!(answer.status, 429, "{}", answer.head);
                assert_eq!(answer.json()["error"], "upgrade_rate_per_subject");
                refused += 1;
            }
        }
    }
    // Two a second, counted in one-second windows: the ten span at most (whole seconds
    // taken + 2) windows, however a loaded machine spreads them, and each admits two.
    let windows = started.elapsed().as_secs() as usize + 2;
    assert!(
        open.len() <= 2 * windows,
        "{} of 10 admitted over {windows} windows",
        open.len()
    );
    assert!(refused > 0, "none of 10 refused");
    assert!(!open.is_empty());
    let bob = bearer(BOB);
    let (_bob, _) = upgrade(
        address,
        "/agents/CoderAgent/paced-bob",
        &[("Authorization", &bob)],
    )
    .await
    .open();
    let counted = gateway.metric(&refusals("upgrade_rate_per_subject")).await;
    assert_eq!(counted, f64::from(refused));
}

/// [`guarded`], with PublicAgent open to anyone.
fn public_under_guard() -> String {
    guarded() + &agent("PublicAgent", "local", Some("none"))
}

#[tokio::test]
async fn an_agent_may_be_public_under_a_guarded_route_and_config_shows_no_secret() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start(&config(backend.address, KEYS, &public_under_guard()));
    let address = gateway.address();
    let headers = [("x-gateway-identity-signature", "forged")];
    let answer = get(address, "/agents/PublicAgent/open", &headers).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    let seen = answer.json()["headers"].clone();
    assert_eq!(seen.get("x-gateway-identity-signature"), None, "{seen}");
    let (_ws, _) = upgrade(address, "/agents/PublicAgent/open-ws", &[])
        .await
        .open();
    let guarded = get(address, "/agents/CoderAgent/open", &[]).await;
    assert_eq!(guarded.status, 401);
    // Only the guarded agent's request was decided.
    let metrics = gateway.metrics().await;
    let decided: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("agent_gateway_auth_decisions_total{"))
        .collect();
    assert_eq!(decided, [format!("{} 1", key_decisions("missing"))]);

    let text = get(gateway.admin, "/config", &[]).await.body;
    assert!(!text.contains(ALICE) && !text.contains(BOB), "{text}");
    let table: Value = serde_json::from_str(&text).expect("JSON");
    let agents = table["routes"][0]["agents"].as_array().expect("agents");
    let agent = |name: &str| {
        agents
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {table}"))
    };
    let policy = &agent("CoderAgent")["auth"];
    assert_eq!(policy["name"], "keys", "{table}");
    assert_eq!(policy["method"], "api_key");
    assert_eq!(
        policy["credentials"],
        serde_json::json!([
            "bearer",
            "query:api_key",
            "cookie:session",
            "protocol:bearer."
        ])
    );
    assert_eq!(policy["identity_headers"]["sub"], "x-user-id");
    assert_eq!(agent("PublicAgent")["auth"], Value::Null);
}

/// Runs `check` on `text` (with `[auth.keys]`'s secrets set when `keys` holds).
fn check(text: &str, keys: bool, warn_secrets: bool) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.toml");
    let text = text
        .replace("{listen}", "127.0.0.1:8080")
        .replace("{admin}", "127.0.0.1:9090");
    std::fs::write(&path, text).expect("written");
    let mut command = Command::new(BIN);
    command
        .args(["check", "-c"])
        .arg(&path)
        .env("OPENROUTER_API_KEY", TEST_KEY)
        .env_remove("ALICE_KEY")
        .env_remove("BOB_KEY");
    if keys {
        command.env("ALICE_KEY", ALICE).env("BOB_KEY", BOB);
    }
    if warn_secrets {
        command.arg("--warn-secrets");
    }
    let output = command.output().expect("check runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stdout, stderr)
}

#[test]
fn check_shows_each_agents_policy_and_refuses_unknown_or_unusable_ones() {
    let node: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let text = config(node, KEYS, &public_under_guard());
    let (ok, out, err) = check(&text, true, false);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("\n    auth      keys = api_key (2 keys); credential from bearer, query:api_key, cookie:session, protocol:bearer.\n"),
        "{out}"
    );
    assert!(
        out.contains("\n    auth      none  WARNING: public, and its upstream needs OPENROUTER_API_KEY: anyone who reaches the gateway can open it\n"),
        "{out}"
    );
    assert!(!out.contains(ALICE) && !err.contains(ALICE), "{out}\n{err}");

    let unknown = config(
        node,
        KEYS,
        &public_under_guard().replace("auth = \"keys\"", "auth = \"staff\""),
    );
    let (ok, out, err) = check(&unknown, true, false);
    assert!(!ok, "{out}");
    assert!(err.contains("no [auth.staff] policy"), "{err}");

    let (ok, out, err) = check(&text, false, false);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("error: policy keys: secret ALICE_KEY is missing"),
        "{err}"
    );
    let (ok, out, err) = check(&text, false, true);
    assert!(ok, "{out}\n{err}");
    assert!(
        err.contains("warning: policy keys: secret ALICE_KEY is missing"),
        "{err}"
    );
}

#[tokio::test]
async fn a_policy_whose_key_secret_is_missing_answers_503() {
    let backend = start_backend(Some(TEST_KEY));
    // Only bob's key is in the environment: the policy cannot be built, nobody gets in.
    let text = config(backend.address, KEYS, &guarded());
    let gateway = start_gateway_with(&text, &[("BOB_KEY", BOB)], |_| {});
    let address = gateway.address();
    for headers in [vec![("Authorization", bearer(BOB))], vec![]] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = get(address, "/agents/CoderAgent/closed", &headers).await;
        assert_eq!(answer.status, 503, "{}", answer.head);
        assert_eq!(answer.json()["error"], "auth_unavailable");
        assert!(!answer.body.contains(BOB), "{}", answer.body);
    }
    let refused = upgrade(address, "/agents/CoderAgent/closed", &[])
        .await
        .refused();
    assert_eq!(refused.status, 503);
    let unavailable = key_decisions("auth_unavailable");
    assert_eq!(gateway.metric(&unavailable).await, 3.0);
}

#[tokio::test]
async fn the_address_limits_refuse_a_flood_before_any_key_is_checked() {
    let backend = start_backend(Some(TEST_KEY));
    let limits = "\n[limits]\nwebsockets_per_ip = 1\n";
    let gateway = start(&(config(backend.address, KEYS, &guarded()) + limits));
    let address = gateway.address();
    let alice = bearer(ALICE);
    let (_held, _) = upgrade(
        address,
        "/agents/CoderAgent/flood",
        &[("Authorization", &alice)],
    )
    .await
    .open();
    let wrong = bearer("ak-not-a-key");
    for _ in 0..3 {
        let refused = upgrade(
            address,
            "/agents/CoderAgent/flood",
            &[("Authorization", &wrong)],
        )
        .await
        .refused();
        assert_eq!(refused.status, 429, "{}", refused.body);
        assert_eq!(refused.json()["error"], "websockets_per_ip");
    }
    assert_eq!(gateway.metric(&refusals("websockets_per_ip")).await, 3.0);
    // The held upgrade's key was checked; the flood's never were.
    assert_eq!(gateway.metric(&key_decisions("allowed")).await, 1.0);
    assert_eq!(gateway.metric(&key_decisions("invalid")).await, 0.0);
}
