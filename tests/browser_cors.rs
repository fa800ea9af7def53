//! Issue 5: the real-browser proof of the CORS and Origin policy.
//!
//! Debian's headless Chromium, driven by `tests/browser/drive.mjs` (playwright-core, pinned in
//! `tests/browser/package-lock.json`), loads a page from an allowed origin
//! (`http://127.0.0.1:A`) and one from a refused origin (`http://localhost:B`), both served
//! by the driver itself, and from each opens a WebSocket through the real gateway to the real
//! reference backend and makes credentialed `fetch()` calls to an agent's HTTP endpoint. The
//! driver prints one JSON line per check; this test asserts each, then asks the backend
//! (through the gateway) what reached it, and the admin listener what the gateway refused.
//!
//! `tests/browser/setup.sh` installs Chromium (apt-get) and the npm packages when missing;
//! without node, npm or a working Chromium this test fails, saying so. It never skips.

mod common;

use agent_gateway::secrets::fingerprint;
use common::browser::*;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The driver's own deadline for the whole run (it reports and exits when it passes).
const DRIVER_DEADLINE: Duration = Duration::from_secs(90);

const WS_ROOM: &str = "browser-ws";
/// Used only by the refused page's WebSocket: the backend must never see this room.
const REFUSED_ROOM: &str = "browser-refused";
const FETCH_ROOM: &str = "browser-fetch";
/// Set by the allowed page on its host, 127.0.0.1 (cookies ignore ports): a credentialed
/// request to the gateway on 127.0.0.1 carries it. A dummy, never a real session.
const COOKIE: &str = "agw_browser_session=not-a-real-session-1234";

fn cors_config(backend: std::net::SocketAddr, allowed_origin: &str) -> String {
    // local_config sets [admin] listen = "{admin}": parallel tests never share a port.
    local_config(&[backend])
        + &format!(
            r#"
[cors]
allowed_origins = ["{allowed_origin}"]
allowed_origin_patterns = []
allowed_methods = ["GET", "POST"]
allowed_headers = ["content-type"]
exposed_headers = []
allow_credentials = true
max_age = "10m"
allow_missing_origin = true
"#
        )
}

async fn drive(gateway: std::net::SocketAddr, allowed_port: u16, refused_port: u16) -> DriverRun {
    let args = [
        ("gateway", format!("http://{gateway}")),
        ("allowed-port", allowed_port.to_string()),
        ("refused-port", refused_port.to_string()),
        ("ws-room", WS_ROOM.to_owned()),
        ("refused-room", REFUSED_ROOM.to_owned()),
        ("fetch-room", FETCH_ROOM.to_owned()),
        ("cookie", COOKIE.to_owned()),
    ];
    run_driver("drive.mjs", &args, &[], DRIVER_DEADLINE).await
}

/// What the backend reports for a room, asked through the gateway by a client with no
/// Origin (a non-browser client: `allow_missing_origin = true`).
async fn backend_room(gateway: &Gateway, room: &str) -> Value {
    let answer = get(
        gateway.address(),
        &format!("/agents/CoderAgent/{room}/state"),
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

#[tokio::test]
async fn a_real_browser_is_held_to_the_origin_policy() {
    let started = Instant::now();
    setup();
    let backend = start_backend(Some(TEST_KEY));
    let allowed_port = free_port();
    let refused_port = std::iter::repeat_with(free_port)
        .find(|p| *p != allowed_port)
        .expect("a second port");
    let allowed_origin = format!("http://127.0.0.1:{allowed_port}");
    let refused_origin = format!("http://localhost:{refused_port}");
    let gateway = start_gateway(&cors_config(backend.address, &allowed_origin));

    let run = drive(gateway.address(), allowed_port, refused_port).await;

    let pages = run.passed("pages");
    assert_eq!(pages["allowed_origin"], allowed_origin.as_str());
    assert_eq!(pages["refused_origin"], refused_origin.as_str());

    let browser = run.passed("browser");
    assert!(
        browser["product"]
            .as_str()
            .is_some_and(|p| p.starts_with("Chrome/")),
        "{browser}"
    );
    assert_eq!(
        browser["missing_switches"],
        serde_json::json!([]),
        "{browser}"
    );

    // The allowed page's WebSocket reaches the agent: identity, echoes, a clean close.
    let ws = run.passed("ws_allowed");
    assert_eq!(ws["opened"], true);
    assert_eq!(ws["identity"]["type"], "cf_agent_identity");
    assert_eq!(ws["identity"]["agent"], "coder-agent");
    assert_eq!(ws["identity"]["name"], WS_ROOM);
    assert_eq!(ws["echoes"], ws["sent"]);
    assert_eq!(ws["sent"].as_array().map(Vec::len), Some(2));
    assert_eq!(ws["close"]["code"], 1000);
    assert_eq!(ws["close"]["wasClean"], true);
    assert_eq!(ws["handshake"]["status"], 101);
    assert_eq!(ws["handshake"]["origin_sent"], allowed_origin.as_str());
    assert_eq!(
        ws["handshake"]["cors_headers"]["access-control-allow-origin"],
        allowed_origin.as_str()
    );

    // The refused page's WebSocket: 403 on the handshake, no open, no message, 1006.
    let ws = run.passed("ws_refused");
    assert_eq!(ws["opened"], false);
    assert_eq!(ws["errored"], true);
    assert_eq!(ws["messages"], serde_json::json!([]));
    assert_eq!(ws["close"]["code"], 1006);
    assert_eq!(ws["handshake"]["status"], 403);
    assert_eq!(ws["handshake"]["origin_sent"], refused_origin.as_str());

    // Credentialed GET from the allowed page: the page reads the backend's JSON, and the
    // cookie the page set went along (the gateway forwarded it; the backend reports a
    // credential header by its fingerprint, not its value).
    let fetch = run.passed("fetch_allowed");
    assert_eq!(fetch["status"], 200);
    assert_eq!(fetch["type"], "cors");
    assert_eq!(fetch["backend_saw"]["agent"], "coder-agent");
    assert_eq!(fetch["backend_saw"]["room"], FETCH_ROOM);
    assert_eq!(fetch["backend_saw"]["origin"], allowed_origin.as_str());
    let cookie = fetch["backend_saw"]["cookie"].as_str().unwrap_or_default();
    assert!(
        cookie == fingerprint(COOKIE) || cookie.contains(COOKIE),
        "the backend did not get the page's cookie: {fetch}"
    );
    assert_eq!(
        fetch["response_cors_headers"]["access-control-allow-origin"],
        allowed_origin.as_str()
    );
    assert_eq!(
        fetch["response_cors_headers"]["access-control-allow-credentials"],
        "true"
    );
    assert_eq!(fetch["response_cors_headers"]["vary"], "Origin");

    // The same GET from the refused page: the browser blocks it (no CORS headers came back).
    let fetch = run.passed("fetch_refused");
    assert_eq!(fetch["error"]["name"], "TypeError");
    assert_eq!(fetch["origin_sent"], refused_origin.as_str());
    assert_eq!(fetch["cors_error"], "MissingAllowOriginHeader");
    assert!(
        fetch["response_cors_headers"]
            .as_object()
            .is_some_and(|h| !h.keys().any(|k| k.starts_with("access-control-"))),
        "{fetch}"
    );

    // A preflighted POST: the gateway answers the OPTIONS (204) for the allowed origin ...
    let post = run.passed("preflight_allowed");
    assert_eq!(post["status"], 200);
    assert_eq!(post["backend_saw"]["method"], "POST");
    assert_eq!(post["preflight_seen_by_devtools"]["status"], 204);
    assert_eq!(
        post["preflight_seen_by_devtools"]["cors_headers"]["access-control-allow-methods"],
        "GET, POST"
    );
    // ... and refuses it (403) for the other, so the browser never sends the POST.
    let post = run.passed("preflight_refused");
    assert_eq!(post["error"]["name"], "TypeError");
    assert!(
        post["cors_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Preflight")),
        "{post}"
    );

    let summary = run.passed("summary");
    assert_eq!(summary["failed"], serde_json::json!([]));

    // The backend's side. A WebSocket that reached it records a close code when it ends: the
    // allowed page's connection closed with 1000 ...
    let deadline = Instant::now() + WAIT;
    loop {
        let state = backend_room(&gateway, WS_ROOM).await;
        if state["received_closes"] == serde_json::json!([1000]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend state for {WS_ROOM}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the refused page's never reached it.
    let state = backend_room(&gateway, REFUSED_ROOM).await;
    assert_eq!(state["received_closes"], serde_json::json!([]), "{state}");

    // The gateway's side: it refused the upgrade and the preflight itself, nothing else.
    let metrics = gateway.metrics().await;
    let refusals = metric_sum(&metrics, "agent_gateway_origin_refusals_total", &[]);
    assert_eq!(
        refusals, 2.0,
        "origin refusals (the upgrade and the preflight)\n{metrics}"
    );
    for (series, value) in [
        (
            "agent_gateway_ws_handshakes_total{agent=\"CoderAgent\",result=\"origin_refused\"}",
            1.0,
        ),
        (
            "agent_gateway_ws_handshakes_total{agent=\"CoderAgent\",result=\"101\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&metrics, series), value, "{series}\n{metrics}");
    }
    eprintln!("real-browser CORS test took {:?}", started.elapsed());
}
