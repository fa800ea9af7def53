//! JWT authentication through the real gateway, with keys from a secret (`key_secret`, read
//! from the environment): HS256, HS384 and HS512 tokens signed by the test let a client reach
//! the reference backend, which is told the identity by the gateway alone; every missing,
//! bad or expired token, and every token scoped to other instances, is answered 401/403 with
//! its JSON error and `WWW-Authenticate` before anything reaches an upstream (an upstream the
//! test owns records every request head it gets); the credential is read from a header, a
//! cookie, a query parameter or a WebSocket subprotocol, and the last two never reach the
//! upstream nor the 101; `leeway` applies to `exp` and `nbf`; the decisions are counted by
//! result; and no token reaches the gateway's logs (at debug), `/metrics` or `/config`.
//! JWKS URLs, the other algorithms and expiry of open WebSockets: `tests/auth_jwks.rs`.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::auth::*;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const SECRET: &str = "an HMAC secret of the integration tests, 32+ bytes";
const RSA_PRIVATE: &str = include_str!("fixtures/auth/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/auth/rsa-public.pem");
const REALM: &str = "Bearer realm=\"agent-gateway\"";

/// The HS policy most tests use: issuer and audience checked, `sub` and `team` sent upstream.
const USERS: &str = r#"
[auth.users]
method = "jwt"
algorithms = ["HS256", "HS384", "HS512"]
key_secret = "JWT_KEY"
issuers = ["https://id.example/"]
audiences = ["agents"]
identity_headers = { sub = "x-user-id", team = "x-user-team" }
"#;

/// Every credential source, HS256.
const SOURCES: &str = r#"
[auth.users]
method = "jwt"
algorithms = ["HS256"]
key_secret = "JWT_KEY"
credentials = ["bearer", "cookie:session", "query:token", "protocol:bearer."]
identity_headers = { sub = "x-user-id" }
"#;

/// Claims for `sub`, valid for ten minutes, from the policy's issuer for its audience.
fn claims(sub: &str) -> Value {
    json!({
        "sub": sub, "exp": now() + 600, "iat": now(),
        "iss": "https://id.example/", "aud": "agents", "team": "red",
    })
}

/// An HS256 token signed with [`SECRET`] for `claims("alice")` with `patch`'s fields.
fn alice(patch: Value) -> String {
    let mut claims = claims("alice");
    for (key, value) in patch.as_object().expect("an object") {
        claims[key] = value.clone();
    }
    sign(Algorithm::HS256, SECRET, None, &claims)
}

/// A gateway whose `/agents` route (metrics label `agents`) has `agents` as (name, upstream,
/// policy) over local `upstreams`, heartbeats off, then `policies`; `JWT_KEY` is [`SECRET`].
fn start(
    upstreams: &[(&str, SocketAddr)],
    agents: &[(&str, &str, &str)],
    policies: &str,
) -> Gateway {
    start_gateway_with(
        &config(upstreams, agents, policies),
        &[("JWT_KEY", SECRET)],
        |_| {},
    )
}

fn config(
    upstreams: &[(&str, SocketAddr)],
    agents: &[(&str, &str, &str)],
    policies: &str,
) -> String {
    let mut text = quiet_config(upstreams);
    text += &route("/agents", None);
    for (name, upstream, auth) in agents {
        text += &agent(name, upstream, Some(auth));
    }
    text + policies
}

/// A gateway with CoderAgent on the reference backend at `node`, under [`USERS`].
fn start_users(node: SocketAddr) -> Gateway {
    start(
        &[("local", node)],
        &[("CoderAgent", "local", "users")],
        USERS,
    )
}

/// `GET path` with `token` as bearer.
async fn get_as(gateway: &Gateway, path: &str, token: &str) -> RawResponse {
    get(
        gateway.address(),
        path,
        &[("authorization", &bearer(token))],
    )
    .await
}

/// A WebSocket handshake for `path` with extra headers, sent by hand: for refusals, whose
/// whole answer (head and body) it returns.
async fn upgrade_refused(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    upgrade(gateway.address(), path, headers).await.refused()
}

/// Opens a WebSocket with extra headers, checks the 101 and returns it with the socket.
async fn ws_with(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> (Ws, http::HeaderMap) {
    connect_headers(&gateway.url(path), headers).await
}

/// Opens a WebSocket with extra headers and reads the agent's greeting.
async fn open_with(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> Ws {
    let (mut ws, _) = ws_with(gateway, path, headers).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    ws
}

/// Checks a refusal: its status, JSON `error` and `policy`, and `WWW-Authenticate`
/// (`challenge`: [`REALM`] exactly, or the RFC 6750 error it names; `None`: absent).
fn assert_refused(
    answer: &RawResponse,
    status: u16,
    error: &str,
    policy: &str,
    challenge: Option<&str>,
) {
    let what = format!("{}\n{}", answer.head, answer.body);
    assert_eq!(answer.status, status, "{what}");
    let body = answer.json();
    assert_eq!(
        (&body["error"], &body["policy"]),
        (&json!(error), &json!(policy)),
        "{what}"
    );
    let got = answer.header("www-authenticate");
    match challenge {
        None => assert_eq!(got, None, "{what}"),
        Some(REALM) => assert_eq!(got.as_deref(), Some(REALM), "{what}"),
        Some(code) => {
            let got = got.unwrap_or_else(|| panic!("no WWW-Authenticate: {what}"));
            assert!(got.starts_with(REALM), "{what}");
            assert!(got.contains(&format!(", error=\"{code}\"")), "{what}");
        }
    }
}

/// Checks the refusal of an expired token by the policy `users`.
fn assert_expired(answer: &RawResponse) {
    assert_refused(answer, 401, "token_expired", "users", Some("invalid_token"));
}

/// Upgrades `path` with `token` as bearer and checks the 401 `invalid_token` says `why`, in
/// its JSON detail and its challenge's description (a quoted-string: without quotes).
async fn assert_invalid(gateway: &Gateway, path: &str, policy: &str, token: &str, why: &str) {
    let answer = upgrade_refused(gateway, path, &[("authorization", &bearer(token))]).await;
    assert_refused(&answer, 401, "invalid_token", policy, Some("invalid_token"));
    let detail = answer.json()["detail"].clone();
    assert!(
        detail.as_str().is_some_and(|d| d.contains(why)),
        "{why}: {detail}"
    );
    let challenge = answer.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains(&why.replace('"', "")),
        "{why}: {challenge}"
    );
}

/// Checks the decision counters of the `agents` route by result; unlisted results are 0.
async fn assert_decisions(gateway: &Gateway, expected: &[(&str, usize)]) {
    let text = gateway.metrics().await;
    let results = [
        "allowed",
        "missing",
        "invalid",
        "expired",
        "forbidden",
        "auth_unavailable",
    ];
    for result in results {
        let want = expected
            .iter()
            .find(|(r, _)| *r == result)
            .map_or(0, |(_, n)| *n);
        let series = decisions("agents", "jwt", result);
        assert_eq!(
            metric_value(&text, &series),
            want as f64,
            "{series}\n{text}"
        );
    }
}

/// An upstream the test owns. It records the head of every request that reaches it and
/// answers 200 `ok`, or 101 to an upgrade (then holds the connection until the gateway ends
/// it): refused requests must leave no head here, and the heads show what went upstream.
struct Recorder {
    address: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        let (address, _) = serve(move |stream| record(stream, seen.clone())).await;
        Recorder { address, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("unpoisoned").clone()
    }
}

async fn record(mut stream: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let Some(request) = read_request(&mut stream, &mut Vec::new()).await else {
        return;
    };
    seen.lock().expect("unpoisoned").push(request.head.clone());
    let answer = match request.header("sec-websocket-key") {
        Some(key) => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        ),
        None => answer(200, &[("connection", "close")], "ok"),
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Every value of header `name` in a request head.
fn headers_of(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
        .collect()
}

fn header_of(head: &str, name: &str) -> Option<String> {
    headers_of(head, name).into_iter().next()
}

#[tokio::test]
async fn hs256_hs384_and_hs512_tokens_verify_with_a_secret_from_the_environment() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_users(backend.address);
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let sub = format!("user-{alg:?}");
        let token = sign(alg, SECRET, None, &claims(&sub));
        let path = format!("/agents/CoderAgent/room-{alg:?}");
        let mut ws = open_with(&gateway, &path, &[("authorization", &bearer(&token))]).await;
        assert_echo(&mut ws, "hello").await;
        let seen = backend_json(&gateway, &path, &[("authorization", &bearer(&token))]).await;
        assert_eq!(seen["headers"]["x-user-id"], sub.as_str(), "{seen}");
        assert_eq!(seen["headers"]["x-user-team"], "red", "{seen}");
        // The same claims under another secret are someone else's.
        let forged = sign(
            alg,
            "another secret entirely, 32+ bytes",
            None,
            &claims(&sub),
        );
        let answer = get_as(&gateway, &path, &forged).await;
        assert_refused(
            &answer,
            401,
            "invalid_token",
            "users",
            Some("invalid_token"),
        );
    }
    assert_decisions(&gateway, &[("allowed", 6), ("invalid", 3)]).await;
}

#[tokio::test]
async fn bad_and_missing_tokens_are_refused_before_anything_reaches_the_upstream() {
    let trap = Recorder::start().await;
    let rsa =
        "\n[auth.rsa]\nmethod = \"jwt\"\nalgorithms = [\"RS256\"]\nkey_secret = \"RSA_PUB\"\n";
    let gateway = start_gateway_with(
        &config(
            &[("trap", trap.address)],
            &[("CoderAgent", "trap", "users"), ("RsaAgent", "trap", "rsa")],
            &(USERS.to_owned() + rsa),
        ),
        &[("JWT_KEY", SECRET), ("RSA_PUB", RSA_PUBLIC)],
        |_| {},
    );
    let path = "/agents/CoderAgent/room";
    // No credential where the policy looks: on an upgrade, a plain request, another scheme.
    let basic = [("authorization", "Basic YWxpY2U6cHc=")];
    for answer in [
        upgrade_refused(&gateway, path, &[]).await,
        get(gateway.address(), path, &[]).await,
        get(gateway.address(), path, &basic).await,
    ] {
        assert_refused(&answer, 401, "unauthorized", "users", Some(REALM));
        assert_eq!(answer.json()["detail"], "no credential");
    }
    let expired = alice(json!({"exp": now() - 3600}));
    let answer = upgrade_refused(&gateway, path, &[("authorization", &bearer(&expired))]).await;
    assert_expired(&answer);

    let mut padded = claims("alice");
    padded["padding"] = json!("x".repeat(9000));
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("alice").to_string())
    );
    let other_secret = "not the gateway's secret, but 32+ bytes";
    // Each token, and why its refusal says it is invalid.
    let invalid = [
        (alice(json!({"nbf": now() + 3600})), "not valid yet"),
        (alice(json!({"aud": "others"})), "audience is not accepted"),
        (
            alice(json!({"iss": "https://evil.example/"})),
            "issuer is not accepted",
        ),
        (
            sign(Algorithm::HS256, other_secret, None, &claims("alice")),
            "signature does not verify",
        ),
        (unsigned, "\"none\" is not accepted"),
        (
            sign(Algorithm::HS256, SECRET, None, &padded),
            "longer than 8192 bytes",
        ),
        ("not-a-jwt".to_owned(), "three dot-separated parts"),
        ("e30.e30.c2ln".to_owned(), "names no algorithm"),
    ];
    for (token, why) in &invalid {
        assert_invalid(&gateway, path, "users", token, why).await;
    }
    // HS256 keyed with the RSA public key's PEM, against an RS256 policy holding that key.
    let confused = sign(Algorithm::HS256, RSA_PUBLIC, None, &claims("alice"));
    let why = "\"HS256\" is not accepted";
    assert_invalid(&gateway, "/agents/RsaAgent/room", "rsa", &confused, why).await;
    assert_eq!(
        trap.heads(),
        Vec::<String>::new(),
        "a refused request went upstream"
    );

    // Good tokens go through, to the trap: it is the agents' upstream.
    let answer = get_as(&gateway, path, &alice(json!({}))).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    let rs256 = sign(Algorithm::RS256, RSA_PRIVATE, None, &claims("alice"));
    let answer = get_as(&gateway, "/agents/RsaAgent/room", &rs256).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    assert_eq!(trap.heads().len(), 2);

    let invalid = invalid.len() + 1;
    let expected = [
        ("missing", 3),
        ("expired", 1),
        ("invalid", invalid),
        ("allowed", 2),
    ];
    assert_decisions(&gateway, &expected).await;
}

#[tokio::test]
async fn instance_and_scope_claims_limit_which_instances_a_subject_opens() {
    let trap = Recorder::start().await;
    let policies = r#"
[auth.own]
method = "jwt"
algorithms = ["HS256"]
key_secret = "JWT_KEY"
instance_claim = "sub"

[auth.team]
method = "jwt"
algorithms = ["HS256"]
key_secret = "JWT_KEY"
scope_claim = "agents"
"#;
    let agents = [("OwnAgent", "trap", "own"), ("TeamAgent", "trap", "team")];
    let gateway = start(&[("trap", trap.address)], &agents, policies);
    let plain = alice(json!({}));
    let bob = alice(json!({"sub": "bob"}));
    let rooms = alice(json!({"agents": ["team-agent/room-*", "other-agent/*"]}));
    // The binding name in any case, as well as the slug; a space-separated string.
    let lobby = alice(json!({"agents": ["TEAMAGENT/lobby"]}));
    let listed = alice(json!({"agents": "team-agent/x team-agent/y"}));
    let others = alice(json!({"agents": ["other-agent/*"]}));
    // (instance of OwnAgent or TeamAgent, token, whether it may open it)
    let cases = [
        ("OwnAgent/alice", &plain, true),
        ("OwnAgent/bob", &plain, false),
        ("OwnAgent/alice-2", &plain, false),
        ("OwnAgent/bob", &bob, true),
        ("TeamAgent/room-1", &rooms, true),
        ("TeamAgent/lobby", &rooms, false),
        ("TeamAgent/lobby", &lobby, true),
        ("TeamAgent/y", &listed, true),
        ("TeamAgent/room-1", &others, false),
        ("TeamAgent/room-1", &plain, false),
    ];
    for (target, token, allowed) in cases {
        let answer = get_as(&gateway, &format!("/agents/{target}"), token).await;
        if allowed {
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (200, "ok"),
                "{target}"
            );
        } else {
            let policy = if target.starts_with("Own") {
                "own"
            } else {
                "team"
            };
            assert_refused(
                &answer,
                403,
                "forbidden",
                policy,
                Some("insufficient_scope"),
            );
        }
    }
    // A WebSocket upgrade is refused alike.
    let answer = upgrade_refused(
        &gateway,
        "/agents/OwnAgent/bob",
        &[("authorization", &bearer(&plain))],
    )
    .await;
    assert_refused(&answer, 403, "forbidden", "own", Some("insufficient_scope"));

    let reached: Vec<String> = trap
        .heads()
        .iter()
        .filter_map(|head| header_of(head, "x-partykit-room"))
        .collect();
    let expected: Vec<&str> = cases
        .iter()
        .filter(|(_, _, allowed)| *allowed)
        .filter_map(|(target, _, _)| target.split('/').nth(1))
        .collect();
    assert_eq!(
        reached, expected,
        "only allowed requests reach the upstream"
    );
    let refused = cases.len() - expected.len() + 1;
    assert_decisions(
        &gateway,
        &[("allowed", expected.len()), ("forbidden", refused)],
    )
    .await;
}

#[tokio::test]
async fn the_credential_is_read_from_a_header_cookie_query_or_subprotocol_never_sent_upstream() {
    let backend = start_backend(Some(TEST_KEY));
    let trap = Recorder::start().await;
    let upstreams = [("local", backend.address), ("trap", trap.address)];
    let agents = [
        ("CoderAgent", "local", "users"),
        ("ProtoAgent", "trap", "users"),
    ];
    let gateway = start(&upstreams, &agents, SOURCES);
    let path = "/agents/CoderAgent/room";
    // Each source with a subject of its own, so that the upstream shows which was read.
    let [header, cookie, query, protocol] =
        ["via-header", "via-cookie", "via-query", "via-protocol"]
            .map(|sub| alice(json!({"sub": sub})));
    let seen = backend_json(&gateway, path, &[("authorization", &bearer(&header))]).await;
    assert_eq!(seen["headers"]["x-user-id"], "via-header");
    let jar = format!("theme=dark; session={cookie}");
    let seen = backend_json(&gateway, path, &[("cookie", &jar)]).await;
    assert_eq!(seen["headers"]["x-user-id"], "via-cookie");

    let seen = backend_json(&gateway, &format!("{path}?x=1&token={query}&y=2"), &[]).await;
    assert_eq!(seen["headers"]["x-user-id"], "via-query");
    assert!(
        seen["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("?x=1&y=2")),
        "{seen}"
    );
    assert!(
        !seen.to_string().contains(&query),
        "the token went upstream: {seen}"
    );

    let offer = format!("bearer.{protocol}, chat");
    let seen = backend_json(&gateway, path, &[("sec-websocket-protocol", &offer)]).await;
    assert_eq!(seen["headers"]["x-user-id"], "via-protocol");
    assert_eq!(seen["headers"]["sec-websocket-protocol"], "chat");
    assert!(
        !seen.to_string().contains(&protocol),
        "the token went upstream: {seen}"
    );

    // WebSockets to the reference backend: the 101 names `chat`, never the token.
    let (mut ws, answer) = ws_with(&gateway, path, &[("sec-websocket-protocol", &offer)]).await;
    assert_eq!(answer["sec-websocket-protocol"], "chat");
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    let mut ws = open_with(&gateway, &format!("{path}?token={query}"), &[]).await;
    assert_echo(&mut ws, "via the query").await;

    // What an upgrade sends upstream, seen by an upstream the test owns; identity headers a
    // client sends (in any case, with `_` for `-`) do not get there.
    let spoofed = [
        ("sec-websocket-protocol", offer.as_str()),
        ("X-User-Id", "mallory"),
        ("x_user_id", "mallory"),
    ];
    let trap_path = format!("/agents/ProtoAgent/room?token={query}&x=1");
    let (_ws, answer) = ws_with(&gateway, &trap_path, &spoofed).await;
    assert_eq!(answer["sec-websocket-protocol"], "chat");
    let heads = trap.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert!(
        !head.contains(&query) && !head.contains(&protocol),
        "{head}"
    );
    let request_line = head.lines().next().unwrap_or_default();
    assert!(request_line.ends_with("/room?x=1 HTTP/1.1"), "{head}");
    assert_eq!(
        headers_of(head, "sec-websocket-protocol"),
        ["chat"],
        "{head}"
    );
    assert_eq!(headers_of(head, "x-user-id"), ["via-query"], "{head}");
    assert_eq!(
        headers_of(head, "x_user_id"),
        Vec::<String>::new(),
        "{head}"
    );
}

#[tokio::test]
async fn leeway_applies_to_exp_as_to_nbf() {
    // `leeway` (30 s by default) is documented for `exp` and `nbf` alike: a token that
    // expired 5 s ago by the gateway's clock is still good, as one valid in 5 s already is.
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_users(backend.address);
    let path = "/agents/CoderAgent/room";
    let early = alice(json!({"nbf": now() + 5}));
    let seen = backend_json(&gateway, path, &[("authorization", &bearer(&early))]).await;
    assert_eq!(seen["headers"]["x-user-id"], "alice");
    let expired = alice(json!({"exp": now() - 60}));
    let answer = get_as(&gateway, path, &expired).await;
    assert_expired(&answer);
    let late = alice(json!({"exp": now() - 5}));
    let seen = backend_json(&gateway, path, &[("authorization", &bearer(&late))]).await;
    assert_eq!(seen["headers"]["x-user-id"], "alice");
}

#[tokio::test]
async fn no_token_reaches_the_logs_at_debug_the_metrics_or_the_config() {
    let backend = start_backend(Some(TEST_KEY));
    let log = "\n[log]\nlevel = \"debug\"\naccess_log = true\n";
    let agents = [("CoderAgent", "local", "users")];
    let text = config(&[("local", backend.address)], &agents, SOURCES) + log;
    let gateway = start_gateway_logged(&text, &[("JWT_KEY", SECRET)]);
    let tokens: Vec<String> = (0..6)
        .map(|i| alice(json!({"sub": format!("user-{i}")})))
        .collect();
    let forged = sign(
        Algorithm::HS256,
        "a forger's secret, 32+ bytes long",
        None,
        &claims("eve"),
    );
    let expired = alice(json!({"exp": now() - 3600}));
    let (address, path) = (gateway.address(), "/agents/CoderAgent/room");
    let jar = format!("session={}", tokens[1]);
    let offer = format!("bearer.{}, chat", tokens[3]);
    for (query, headers, status) in [
        ("", vec![("authorization", bearer(&tokens[0]))], 200),
        ("", vec![("cookie", jar)], 200),
        (tokens[2].as_str(), vec![], 200),
        ("", vec![("sec-websocket-protocol", offer)], 200),
        ("", vec![("authorization", bearer(&forged))], 401),
        (expired.as_str(), vec![], 401),
    ] {
        let target = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?token={query}")
        };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            get(address, &target, &headers).await.status,
            status,
            "{headers:?}"
        );
    }
    let offer = format!("bearer.{}, chat", tokens[4]);
    let query = format!("{path}?token={}", tokens[5]);
    for (target, headers) in [
        (path, vec![("sec-websocket-protocol", offer.as_str())]),
        (&query, vec![]),
    ] {
        let mut ws = open_with(&gateway, target, &headers).await;
        assert_echo(&mut ws, "hello").await;
        ws.close(None).await.expect("closed");
    }
    // The connection lines are written as the sessions wind down.
    let deadline = Instant::now() + WAIT;
    while gateway.stdout().matches("kind=websocket").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no connection lines:\n{}",
            gateway.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = get(gateway.admin, "/config", &[]).await;
    assert_eq!(config.status, 200);
    let places = [
        ("stdout", gateway.stdout()),
        ("stderr", gateway.stderr()),
        ("/metrics", gateway.metrics().await),
        ("/config", config.body),
    ];
    // The logs are there, at debug: what is absent from them below is absent for a reason.
    assert!(places[0].1.contains("kind=access"), "{}", places[0].1);
    assert!(places[1].1.contains(" DEBUG "), "no debug lines on stderr");
    // Every line holding a token's signature (what makes it a credential), blanked out.
    let mut leaks = Vec::new();
    for token in tokens.iter().chain([&forged, &expired]) {
        let signature = token.rsplit('.').next().expect("a signature");
        for (place, text) in &places {
            for line in text.lines().filter(|line| line.contains(signature)) {
                let line = line.replace(signature, "<SIGNATURE>");
                leaks.push(format!("{place}: {}", &line[..line.len().min(300)]));
            }
        }
    }
    assert!(leaks.is_empty(), "tokens leaked:\n{}", leaks.join("\n"));
    for (place, text) in &places {
        assert!(!text.contains(SECRET), "the key secret is in {place}");
    }
}
