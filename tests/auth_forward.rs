//! Forward authentication, through the real gateway and the reference backend, with a real
//! auth service started here on 127.0.0.1: the service is asked with the original method and
//! URI, `Authorization`, `Cookie` and a credential it could not see (`X-Auth-Credential`); its
//! 2xx lets the request through with the subject and email as identity headers; its 401 and
//! 403 reach the client as they are; a slow service (past the timeout) or one that is down
//! gives 503 `auth_unavailable` quickly; a cached policy asks once per credential; no refused
//! request reaches the agent; decisions and the service's answer times are exported.

mod common;

use common::auth::*;
use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_millis(500);
const DENIAL: &str = r#"{"title":"log in first"}"#;
const CHALLENGE: &str = r#"Bearer realm="corp", error="login_required""#;

/// An HTTP/1.1 auth service on a real socket, keeping connections alive. It decides by the
/// bearer token (or `X-Auth-Credential`): `allow-NAME` is NAME, `slow` answers after three
/// seconds, `forbidden` gets 403, anything else (or nothing) 401.
struct AuthService {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl AuthService {
    async fn start() -> AuthService {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let (address, _) = serve(move |stream| serve_auth(stream, Arc::clone(&record))).await;
        AuthService { address, seen }
    }

    fn seen(&self) -> Vec<Request> {
        self.seen.lock().expect("lock").clone()
    }

    /// How many requests came with this `Authorization`.
    fn asked_with(&self, authorization: &str) -> usize {
        let seen = self.seen();
        let with = |s: &&Request| s.header("authorization") == Some(authorization);
        seen.iter().filter(with).count()
    }
}

async fn serve_auth(mut stream: TcpStream, seen: Arc<Mutex<Vec<Request>>>) {
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buffer).await {
        seen.lock().expect("lock").push(request.clone());
        let token = request
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .or(request.header("x-auth-credential"))
            .unwrap_or_default()
            .to_owned();
        let answer = match token.as_str() {
            "slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                answer(200, &[("x-auth-subject", "slowpoke")], "")
            }
            "forbidden" => answer(403, &[("content-type", "text/plain")], "not yours"),
            name if name.starts_with("allow-") => {
                let subject = &name["allow-".len()..];
                let email = format!("{subject}@example.com");
                let headers = [("x-auth-subject", subject), ("x-user-email", &email)];
                answer(200, &headers, "ok")
            }
            _ => answer(
                401,
                &[
                    ("www-authenticate", CHALLENGE),
                    ("content-type", "application/problem+json"),
                    ("x-internal", "not for clients"),
                ],
                DENIAL,
            ),
        };
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Three forward policies on three routes: `corp` on /agents, `cached` (30 s) on /cached,
/// and `down` (its service's port closed) on /down.
fn config(node: SocketAddr, service: SocketAddr, closed: u16) -> String {
    let policies = r#"
[auth.corp]
method = "forward"
url = "http://SERVICE/check?policy=corp"
timeout = "TIMEOUT"
credentials = ["bearer", "query:token"]
identity_from = ["x-user-email"]
identity_headers = { sub = "x-user-id", "x-user-email" = "x-user-email" }

[auth.cached]
method = "forward"
url = "http://SERVICE/check"
cache = "30s"

[auth.down]
method = "forward"
url = "http://127.0.0.1:CLOSED/check"
"#;
    let routes = [
        ("/agents", "corp"),
        ("/cached", "cached"),
        ("/down", "down"),
    ]
    .map(|(prefix, auth)| route(prefix, Some(auth)) + &agent("CoderAgent", "local", None));
    (quiet_config(&[("local", node)]) + policies + &routes.concat())
        .replace("SERVICE", &service.to_string())
        .replace("CLOSED", &closed.to_string())
        .replace("TIMEOUT", &format!("{}ms", TIMEOUT.as_millis()))
}

/// The backend, the auth service and a gateway in front of both.
async fn setup() -> (Proc, AuthService, Gateway) {
    let backend = start_backend(Some(TEST_KEY));
    let service = AuthService::start().await;
    let closed = free_port();
    let gateway = start_gateway(&config(backend.address, service.address, closed));
    (backend, service, gateway)
}

fn forward_decisions(route: &str, result: &str) -> String {
    decisions(route, "forward", result)
}

/// The backend's record of the most recent upgrade of CoderAgent's `room`, asked as alice.
async fn last_upgrade(gateway: &Gateway, room: &str) -> Value {
    let path = format!("/agents/CoderAgent/{room}");
    let answer = get(
        gateway.address(),
        &path,
        &[("Authorization", "Bearer allow-alice")],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    answer.json()["last_upgrade"].clone()
}

/// A WebSocket upgrade by hand; the refusal it got, or `None` for a 101 (the stream is held
/// open in `held` so that the connection stays up).
async fn upgrade_held(
    address: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    held: &mut Vec<TcpStream>,
) -> Option<RawResponse> {
    match upgrade(address, path, headers).await {
        Upgrade::Open(stream, _) => {
            held.push(stream);
            None
        }
        Upgrade::Refused(answer) => Some(answer),
    }
}

#[tokio::test]
async fn an_allowed_request_reaches_the_agent_with_the_services_identity() {
    let (_backend, service, gateway) = setup().await;
    let headers = [
        ("Authorization", "Bearer allow-alice"),
        ("Cookie", "sid=abc; theme=dark"),
        ("x-user-id", "mallory"),
        ("X_User_Email", "mallory@example.com"),
        ("X-Forwarded-Uri", "/forged"),
    ];
    let answer = get(gateway.address(), "/agents/CoderAgent/fw?x=1", &headers).await;
    assert_eq!(answer.status, 200, "{}\n{}", answer.head, answer.body);
    let seen = answer.json();
    assert_eq!(seen["headers"]["x-user-id"], "alice", "{seen}");
    assert_eq!(
        seen["headers"]["x-user-email"], "alice@example.com",
        "{seen}"
    );
    assert_eq!(seen["headers"].get("x_user_email"), None, "{seen}");
    assert!(!seen.to_string().contains("mallory"), "{seen}");

    let asked = service.seen();
    assert_eq!(asked.len(), 1, "{asked:?}");
    let asked = &asked[0];
    assert_eq!(asked.target, "/check?policy=corp");
    assert_eq!(asked.header("x-forwarded-method"), Some("GET"));
    assert_eq!(
        asked.header("x-forwarded-uri"),
        Some("/agents/CoderAgent/fw?x=1")
    );
    assert_eq!(asked.header("authorization"), Some("Bearer allow-alice"));
    assert_eq!(asked.header("cookie"), Some("sid=abc; theme=dark"));

    // A credential in the query: the service gets it in X-Auth-Credential, the agent never.
    let mut held = Vec::new();
    let path = "/agents/CoderAgent/fw-ws?token=allow-bob&v=2";
    assert!(upgrade_held(gateway.address(), path, &[], &mut held)
        .await
        .is_none());
    let asked = service.seen().pop().expect("asked");
    assert_eq!(asked.header("x-auth-credential"), Some("allow-bob"));
    assert_eq!(asked.header("authorization"), None);
    assert_eq!(asked.header("x-forwarded-uri"), Some(path));
    let upgraded = last_upgrade(&gateway, "fw-ws").await;
    assert_eq!(
        upgraded["path"], "/agents/coder-agent/fw-ws?v=2",
        "{upgraded}"
    );
    assert_eq!(upgraded["headers"]["x-user-id"], "bob", "{upgraded}");
    assert_eq!(upgraded["headers"]["x-user-email"], "bob@example.com");

    assert_eq!(
        gateway
            .metric(&forward_decisions("agents", "allowed"))
            .await,
        3.0
    );
    let timed = "agent_gateway_auth_forward_duration_seconds_count{policy=\"corp\"}";
    assert_eq!(gateway.metric(timed).await, 3.0);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("# TYPE agent_gateway_auth_forward_duration_seconds histogram"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_services_401_and_403_reach_the_client_as_they_are_and_nothing_the_agent() {
    let (_backend, service, gateway) = setup().await;
    let address = gateway.address();
    let mut held = Vec::new();

    let denied = upgrade_held(
        address,
        "/agents/CoderAgent/deny-1",
        &[("Authorization", "Bearer nope")],
        &mut held,
    )
    .await
    .expect("refused");
    assert_eq!(denied.status, 401, "{}", denied.head);
    assert_eq!(
        denied.header("www-authenticate").as_deref(),
        Some(CHALLENGE)
    );
    assert_eq!(
        denied.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(denied.header("x-internal"), None, "{}", denied.head);
    assert_eq!(denied.body, DENIAL);

    let anonymous = upgrade_held(address, "/agents/CoderAgent/deny-2", &[], &mut held)
        .await
        .expect("refused");
    assert_eq!((anonymous.status, anonymous.body.as_str()), (401, DENIAL));

    let forbidden = get(
        address,
        "/agents/CoderAgent/deny-3",
        &[("Authorization", "Bearer forbidden")],
    )
    .await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.head);
    assert_eq!(
        forbidden.header("content-type").as_deref(),
        Some("text/plain")
    );
    assert_eq!(forbidden.header("www-authenticate"), None);
    assert_eq!(forbidden.body, "not yours");
    let forbidden = upgrade_held(
        address,
        "/agents/CoderAgent/deny-4",
        &[("Authorization", "Bearer forbidden")],
        &mut held,
    )
    .await
    .expect("refused");
    assert_eq!(
        (forbidden.status, forbidden.body.as_str()),
        (403, "not yours")
    );

    for room in ["deny-1", "deny-2", "deny-3", "deny-4"] {
        assert_eq!(last_upgrade(&gateway, room).await, Value::Null, "{room}");
    }
    assert!(held.is_empty());
    assert_eq!(service.asked_with("Bearer nope"), 1);
    assert_eq!(
        gateway
            .metric(&forward_decisions("agents", "invalid"))
            .await,
        2.0
    );
    assert_eq!(
        gateway
            .metric(&forward_decisions("agents", "forbidden"))
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_slow_or_down_service_gives_503_quickly_and_nothing_reaches_the_agent() {
    let (_backend, service, gateway) = setup().await;
    let address = gateway.address();
    let mut held = Vec::new();

    let started = Instant::now();
    let slow = upgrade_held(
        address,
        "/agents/CoderAgent/slow",
        &[("Authorization", "Bearer slow")],
        &mut held,
    )
    .await
    .expect("refused");
    let took = started.elapsed();
    assert_eq!(slow.status, 503, "{}", slow.head);
    assert_eq!(slow.json()["error"], "auth_unavailable");
    assert_eq!(slow.json()["policy"], "corp");
    assert!(
        took >= TIMEOUT && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
    assert_eq!(service.asked_with("Bearer slow"), 1);

    let started = Instant::now();
    let down = upgrade_held(
        address,
        "/down/CoderAgent/down",
        &[("Authorization", "Bearer allow-alice")],
        &mut held,
    )
    .await
    .expect("refused");
    assert_eq!(down.status, 503, "{}", down.head);
    assert_eq!(down.json()["error"], "auth_unavailable");
    assert!(!down.body.contains("allow-alice"), "{}", down.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let down = get(address, "/down/CoderAgent/down", &[]).await;
    assert_eq!(down.status, 503);

    for room in ["slow", "down"] {
        assert_eq!(last_upgrade(&gateway, room).await, Value::Null, "{room}");
    }
    assert!(held.is_empty());
    assert_eq!(
        gateway
            .metric(&forward_decisions("agents", "auth_unavailable"))
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric(&forward_decisions("down", "auth_unavailable"))
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_cached_policy_asks_the_service_once_per_credential() {
    let (_backend, service, gateway) = setup().await;
    let address = gateway.address();
    for room in ["c1", "c2"] {
        let path = format!("/cached/CoderAgent/{room}");
        let answer = get(address, &path, &[("Authorization", "Bearer allow-carol")]).await;
        assert_eq!(answer.status, 200, "{}", answer.head);
        assert_eq!(answer.json()["headers"]["x-user-id"], Value::Null);
    }
    assert_eq!(
        service.asked_with("Bearer allow-carol"),
        1,
        "the second came from the cache"
    );
    let other = get(
        address,
        "/cached/CoderAgent/c1",
        &[("Authorization", "Bearer allow-dave")],
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(
        service.asked_with("Bearer allow-dave"),
        1,
        "another credential is asked about"
    );
    // A denial is never cached.
    for _ in 0..2 {
        let denied = get(
            address,
            "/cached/CoderAgent/c1",
            &[("Authorization", "Bearer nope")],
        )
        .await;
        assert_eq!(denied.status, 401);
    }
    assert_eq!(service.asked_with("Bearer nope"), 2);
    // The uncached policy asks every time.
    for _ in 0..2 {
        let answer = get(
            address,
            "/agents/CoderAgent/c1",
            &[("Authorization", "Bearer allow-carol")],
        )
        .await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(service.asked_with("Bearer allow-carol"), 3);
    assert_eq!(
        gateway
            .metric(&forward_decisions("cached", "allowed"))
            .await,
        3.0
    );
}

/// `agent_gateway_auth_forward_duration_seconds` is the time the service took to answer;
/// its help text says cached answers are not counted.
#[tokio::test]
async fn answers_from_the_cache_are_not_timed_as_the_services() {
    let (_backend, service, gateway) = setup().await;
    let allow = [("Authorization", "Bearer allow-erin")];
    for _ in 0..3 {
        let answer = get(gateway.address(), "/cached/CoderAgent/t", &allow).await;
        assert_eq!(answer.status, 200, "{}", answer.head);
    }
    assert_eq!(service.asked_with("Bearer allow-erin"), 1);
    let timed = "agent_gateway_auth_forward_duration_seconds_count{policy=\"cached\"}";
    assert_eq!(
        gateway.metric(timed).await,
        1.0,
        "the service answered once"
    );
}
