//! JWT authentication with keys from a JWKS URL, through the real gateway and the reference
//! backend, against a JWKS server the test runs (real HTTP/1.1 on 127.0.0.1, counting its
//! requests, its key set swappable and the server stoppable): RS256, PS256, ES256, ES384 and
//! EdDSA tokens verify (upgrade and greeting, identity header upstream) from one fetch; a key
//! rotated in is fetched once for its new `kid` and the rotated-out key is refused; a JWKS
//! never fetched answers 503 `auth_unavailable`, failed fetches are counted, and keys fetched
//! before keep verifying after their server is gone; and a token that expires while its
//! WebSocket is open closes it (1008 "token expired", or the policy's code, to the client;
//! 1001 to the agent), at its `exp`, counted as cause `token_expired`.

mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::auth::*;
use common::*;
use jsonwebtoken::Algorithm;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

const RSA: &str = include_str!("fixtures/auth/rsa-private.pem");
const RSA2: &str = include_str!("fixtures/auth/rsa2-private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/auth/rsa-public.pem");
const EC256: &str = include_str!("fixtures/auth/ec256-private.pem");
const EC384: &str = include_str!("fixtures/auth/ec384-private.pem");
const ED25519: &str = include_str!("fixtures/auth/ed25519-private.pem");

/// Claims for `sub`, valid for ten minutes.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "iat": now()})
}

fn der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).expect("a PEM fixture")
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The public JWK of a fixture's private key (PKCS#8), computed with ring.
fn jwk(alg: Algorithm, private: &str, kid: &str) -> Value {
    let der = der(private);
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => {
            let (signing, crv, half) = if alg == Algorithm::ES256 {
                (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
            } else {
                (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
            };
            let pair = EcdsaKeyPair::from_pkcs8(signing, &der, &SystemRandom::new()).expect("EC");
            // An uncompressed point: 0x04 || x || y.
            let point = pair.public_key().as_ref();
            let (x, y) = (b64(&point[1..=half]), b64(&point[1 + half..]));
            json!({"kty": "EC", "crv": crv, "kid": kid, "use": "sig", "x": x, "y": y})
        }
        Algorithm::EdDSA => {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).expect("Ed25519");
            let x = b64(pair.public_key().as_ref());
            json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x})
        }
        _ => {
            let pair = RsaKeyPair::from_pkcs8(&der).expect("RSA");
            let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
            json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&public.n), "e": b64(&public.e)})
        }
    }
}

/// A JWKS server: HTTP/1.1 on 127.0.0.1, serving its current key set at `/jwks.json` (404
/// elsewhere), counting the requests for it.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
    accepting: JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let keys = Arc::new(Mutex::new(keys));
        let requests = Arc::new(AtomicUsize::new(0));
        let (set, count) = (keys.clone(), requests.clone());
        let (address, accepting) =
            serve(move |stream| answer_jwks(stream, set.clone(), count.clone())).await;
        JwksServer {
            url: format!("http://{address}/jwks.json"),
            keys,
            requests,
            accepting,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn serve(&self, keys: Vec<Value>) {
        *self.keys.lock().expect("unpoisoned") = keys;
    }

    /// Stops listening: later fetches are refused connections.
    async fn stop(&mut self) {
        self.accepting.abort();
        let _ = (&mut self.accepting).await;
    }
}

async fn answer_jwks(mut stream: TcpStream, set: Arc<Mutex<Vec<Value>>>, count: Arc<AtomicUsize>) {
    let Some(request) = read_request(&mut stream, &mut Vec::new()).await else {
        return;
    };
    let close = [("connection", "close")];
    let answer = if (request.method.as_str(), request.target.as_str()) == ("GET", "/jwks.json") {
        count.fetch_add(1, Ordering::SeqCst);
        let body = json!({"keys": *set.lock().expect("unpoisoned")}).to_string();
        answer(
            200,
            &[("content-type", "application/json"), close[0]],
            &body,
        )
    } else {
        answer(404, &close, "")
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A gateway whose `/agents` route (label `agents`) has `agents` as (name, policy), all on the
/// reference backend at `node`, with heartbeats off and then `policies`.
fn start(node: SocketAddr, agents: &[(&str, &str)], policies: &str) -> Gateway {
    let mut text = quiet_config(&[("local", node)]) + &route("/agents", None);
    for (name, auth) in agents {
        text += &agent(name, "local", Some(auth));
    }
    start_gateway(&(text + policies))
}

/// A JWT policy `name` over the JWKS at `url`, accepting `algorithms`, with `extra` lines.
fn jwks_policy(name: &str, url: &str, algorithms: &str, extra: &str) -> String {
    format!(
        "\n[auth.{name}]\nmethod = \"jwt\"\nalgorithms = [{algorithms}]\njwks_url = \"{url}\"\n\
         identity_headers = {{ sub = \"x-user-id\" }}\n{extra}"
    )
}

fn jwt_decisions(result: &str) -> String {
    decisions("agents", "jwt", result)
}

fn last_success(url: &str) -> String {
    format!("agent_gateway_auth_jwks_last_success_timestamp_seconds{{url=\"{url}\"}}")
}

fn failures(url: &str) -> String {
    format!("agent_gateway_auth_jwks_fetch_failures_total{{url=\"{url}\"}}")
}

/// Waits until `series` satisfies `ready`, and returns its value.
async fn wait_for(gateway: &Gateway, series: &str, ready: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = gateway.metrics().await;
        let value = metric_value(&text, series);
        if ready(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stays at {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The reference backend's JSON for a plain GET of `path` with `token`, asserting a 200.
async fn backend_as(gateway: &Gateway, path: &str, token: &str) -> Value {
    backend_json(gateway, path, &[("authorization", &bearer(token))]).await
}

/// The subject the backend was told for a GET of `path` with `token`.
async fn subject_upstream(gateway: &Gateway, path: &str, token: &str) -> Value {
    backend_as(gateway, path, token).await["headers"]["x-user-id"].clone()
}

/// Opens a WebSocket with `token` as bearer and reads the agent's greeting.
async fn open_as(gateway: &Gateway, path: &str, token: &str) -> Ws {
    let authorization = bearer(token);
    let url = gateway.url(path);
    let (mut ws, _) = connect_headers(&url, &[("authorization", &authorization)]).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    ws
}

/// Checks a GET of `path` with `token` is refused with `status`, `error` and, in its
/// detail, `why`.
async fn assert_refused(
    gateway: &Gateway,
    path: &str,
    token: &str,
    (status, error, why): (u16, &str, &str),
) {
    let answer = get(
        gateway.address(),
        path,
        &[("authorization", &bearer(token))],
    )
    .await;
    let what = format!("{}\n{}", answer.head, answer.body);
    assert_eq!(answer.status, status, "{what}");
    assert_eq!(answer.json()["error"], error, "{what}");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains(why)),
        "{what}"
    );
}

#[tokio::test]
async fn rs256_ps256_es256_es384_and_eddsa_tokens_verify_with_one_fetch_of_the_jwks() {
    let keys = [
        (Algorithm::RS256, RSA, "rsa"),
        (Algorithm::PS256, RSA, "rsa"),
        (Algorithm::ES256, EC256, "p256"),
        (Algorithm::ES384, EC384, "p384"),
        (Algorithm::EdDSA, ED25519, "ed"),
    ];
    let set: Vec<Value> = keys[1..]
        .iter()
        .map(|(alg, pem, kid)| jwk(*alg, pem, kid))
        .collect();
    let server = JwksServer::start(set).await;
    let backend = start_backend(Some(TEST_KEY));
    let algorithms = "\"RS256\", \"PS256\", \"ES256\", \"ES384\", \"EdDSA\"";
    let policy = jwks_policy("users", &server.url, algorithms, "");
    let gateway = start(backend.address, &[("CoderAgent", "users")], &policy);
    wait_for(&gateway, &last_success(&server.url), |at| at > 0.0).await;
    for (alg, pem, kid) in keys {
        let sub = format!("user-{alg:?}");
        let token = sign(alg, pem, Some(kid), &claims(&sub));
        let path = format!("/agents/CoderAgent/{alg:?}");
        let mut ws = open_as(&gateway, &path, &token).await;
        assert_echo(&mut ws, "hello").await;
        assert_eq!(
            subject_upstream(&gateway, &path, &token).await,
            sub.as_str()
        );
    }
    let path = "/agents/CoderAgent/room";
    // Another key under a known kid; an HS256 token keyed with the RSA public key's PEM.
    let impostor = sign(Algorithm::RS256, RSA2, Some("rsa"), &claims("eve"));
    assert_refused(
        &gateway,
        path,
        &impostor,
        (401, "invalid_token", "signature does not verify"),
    )
    .await;
    let confused = sign(Algorithm::HS256, RSA_PUBLIC, Some("rsa"), &claims("eve"));
    assert_refused(
        &gateway,
        path,
        &confused,
        (401, "invalid_token", "\"HS256\" is not accepted"),
    )
    .await;
    assert_eq!(server.requests(), 1, "known kids need no fetch");
    let text = gateway.metrics().await;
    assert_eq!(
        metric_value(&text, &jwt_decisions("allowed")),
        10.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, &jwt_decisions("invalid")),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_the_rotated_out_key_is_refused() {
    let server = JwksServer::start(vec![jwk(Algorithm::RS256, RSA, "k1")]).await;
    let backend = start_backend(Some(TEST_KEY));
    let policy = jwks_policy("users", &server.url, "\"RS256\"", "");
    let gateway = start(backend.address, &[("CoderAgent", "users")], &policy);
    wait_for(&gateway, &last_success(&server.url), |at| at > 0.0).await;
    let path = "/agents/CoderAgent/room";
    let old = |sub: &str| sign(Algorithm::RS256, RSA, Some("k1"), &claims(sub));
    let new = |sub: &str| sign(Algorithm::RS256, RSA2, Some("k2"), &claims(sub));
    assert_eq!(
        subject_upstream(&gateway, path, &old("before")).await,
        "before"
    );
    assert_eq!(server.requests(), 1);

    server.serve(vec![jwk(Algorithm::RS256, RSA2, "k2")]);
    assert_eq!(
        subject_upstream(&gateway, path, &new("after")).await,
        "after"
    );
    assert_eq!(server.requests(), 2, "one fetch for the new kid");
    let mut ws = open_as(&gateway, path, &new("after-ws")).await;
    assert_echo(&mut ws, "hello").await;
    assert_eq!(server.requests(), 2);
    // A token of the rotated-out key (not verified before) no longer verifies, and asks no
    // fetch so soon after the last.
    assert_refused(
        &gateway,
        path,
        &old("stale"),
        (401, "invalid_token", "unknown key id"),
    )
    .await;
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn jwks_failures_answer_503_until_fetched_are_counted_and_keep_the_last_good_keys() {
    let mut server = JwksServer::start(vec![jwk(Algorithm::ES256, EC256, "p256")]).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bound");
    let nowhere = format!("http://{}/jwks.json", closed.local_addr().expect("address"));
    drop(closed);
    let backend = start_backend(Some(TEST_KEY));
    // Refreshed every second, so that the fetches after the server stops come soon.
    let policies = jwks_policy("users", &server.url, "\"ES256\"", "jwks_refresh = \"1s\"\n")
        + &jwks_policy("down", &nowhere, "\"ES256\"", "");
    let gateway = start(
        backend.address,
        &[("CoderAgent", "users"), ("DownAgent", "down")],
        &policies,
    );
    let fetched = wait_for(&gateway, &last_success(&server.url), |at| at > 0.0).await;
    wait_for(&gateway, &failures(&nowhere), |n| n >= 1.0).await;

    // Keys never fetched: fail closed, 503, not a 401 the client would "fix" by signing in.
    let token = |sub: &str| sign(Algorithm::ES256, EC256, Some("p256"), &claims(sub));
    let answer = get(
        gateway.address(),
        "/agents/DownAgent/room",
        &[("authorization", &bearer(&token("a")))],
    )
    .await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(
        (
            answer.json()["error"].clone(),
            answer.json()["policy"].clone()
        ),
        (json!("auth_unavailable"), json!("down"))
    );
    assert_eq!(answer.header("www-authenticate"), None);
    assert_eq!(
        metric_value(&gateway.metrics().await, &jwt_decisions("auth_unavailable")),
        1.0
    );
    assert_eq!(
        metric_value(&gateway.metrics().await, &last_success(&nowhere)),
        0.0
    );

    let path = "/agents/CoderAgent/room";
    assert_eq!(
        subject_upstream(&gateway, path, &token("before")).await,
        "before"
    );
    server.stop().await;
    wait_for(&gateway, &failures(&server.url), |n| n >= 2.0).await;
    // Tokens never seen before still verify with the keys fetched before the server died.
    assert_eq!(
        subject_upstream(&gateway, path, &token("after")).await,
        "after"
    );
    let mut ws = open_as(&gateway, path, &token("after-ws")).await;
    assert_echo(&mut ws, "hello").await;
    let unknown = sign(Algorithm::ES256, EC256, Some("p256-next"), &claims("eve"));
    assert_refused(
        &gateway,
        path,
        &unknown,
        (401, "invalid_token", "unknown key id"),
    )
    .await;
    // The last success is still the fetch before the server stopped (two refreshes ago).
    let at = metric_value(&gateway.metrics().await, &last_success(&server.url));
    assert!(
        (at - fetched).abs() < 0.5,
        "last success moved from {fetched} to {at}"
    );
}

/// The Close a WebSocket gets (reading past anything else), and the wall time it arrived.
async fn close_frame(ws: &mut Ws) -> (u16, String, SystemTime) {
    loop {
        let next = tokio::time::timeout(WAIT, futures_util::StreamExt::next(ws));
        match next.await.expect("a Close in time") {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (
                    frame.code.into(),
                    frame.reason.to_string(),
                    SystemTime::now(),
                )
            }
            Some(Ok(Message::Close(None))) => panic!("a Close without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("no Close: {e}"),
            None => panic!("the stream ended without a Close"),
        }
    }
}

/// The close codes and reasons the reference backend received for `path`, once it has one.
async fn backend_closes(gateway: &Gateway, path: &str, token: &str) -> (Value, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = backend_as(gateway, path, token).await;
        let count = seen["received_closes"].as_array().map_or(0, Vec::len);
        if count > 0 || Instant::now() > deadline {
            return (
                seen["received_closes"].clone(),
                seen["received_close_reasons"].clone(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_token_expiring_while_its_websocket_is_open_closes_it_at_exp() {
    let server = JwksServer::start(vec![jwk(Algorithm::EdDSA, ED25519, "ed")]).await;
    let backend = start_backend(Some(TEST_KEY));
    // No leeway: the Close is due at `exp` itself.
    let exact = "leeway = \"0s\"\n";
    let custom =
        "leeway = \"0s\"\nexpiry_close_code = 4001\nexpiry_close_reason = \"session over\"\n";
    let policies = jwks_policy("users", &server.url, "\"EdDSA\"", exact)
        + &jwks_policy("custom", &server.url, "\"EdDSA\"", custom);
    let agents = [("CoderAgent", "users"), ("OtherAgent", "custom")];
    let gateway = start(backend.address, &agents, &policies);
    wait_for(&gateway, &last_success(&server.url), |at| at > 0.0).await;
    let exp = now() + 3;
    let expires_at = UNIX_EPOCH + Duration::from_secs(exp);
    let short = sign(
        Algorithm::EdDSA,
        ED25519,
        Some("ed"),
        &json!({"sub": "alice", "exp": exp}),
    );
    let (coder, other) = ("/agents/CoderAgent/expiring", "/agents/OtherAgent/expiring");
    let mut first = open_as(&gateway, coder, &short).await;
    let mut second = open_as(&gateway, other, &short).await;
    assert_echo(&mut first, "still valid").await;
    let (a, b) = tokio::join!(close_frame(&mut first), close_frame(&mut second));
    assert_eq!((a.0, a.1.as_str()), (1008, "token expired"));
    assert_eq!((b.0, b.1.as_str()), (4001, "session over"));
    for (_, _, at) in [&a, &b] {
        // Not before exp (give or take a clock reading), and promptly after.
        let early = expires_at.duration_since(*at).unwrap_or_default();
        let late = at.duration_since(expires_at).unwrap_or_default();
        assert!(
            early < Duration::from_millis(100),
            "closed {early:?} before exp"
        );
        assert!(late < Duration::from_secs(2), "closed {late:?} after exp");
    }
    let long = sign(Algorithm::EdDSA, ED25519, Some("ed"), &claims("alice"));
    for path in [coder, other] {
        let (codes, reasons) = backend_closes(&gateway, path, &long).await;
        assert_eq!(codes, json!([1001]), "{path}");
        assert_eq!(reasons, json!(["client credential expired"]), "{path}");
    }
    for (agent, code) in [("CoderAgent", 1008), ("OtherAgent", 4001)] {
        let cause = format!("agent_gateway_ws_close_causes_total{{agent=\"{agent}\",cause=\"token_expired\",initiator=\"gateway\"}}");
        gateway.wait_metric(&cause, 1.0).await;
        let closes = format!("agent_gateway_ws_closes_total{{agent=\"{agent}\",code=\"{code}\",initiator=\"gateway\"}}");
        assert_eq!(gateway.metric(&closes).await, 1.0, "{closes}");
    }
}
