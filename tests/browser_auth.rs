//! The real-browser proof of the credentials a browser can present on a WebSocket.
//!
//! Debian's headless Chromium, driven by `tests/browser/drive-auth.mjs` (playwright-core,
//! pinned in `tests/browser/package-lock.json`), loads a page from an origin the gateway's
//! `[cors]` allows and from it opens WebSockets through the real gateway to the real reference
//! backend, whose agent needs a JWT from `cookie:session` or `protocol:bearer.`:
//!
//! - without a credential the handshake is refused with 401 (the page sees a failed socket,
//!   1006) and the gateway counts an `auth_decisions_total{result="missing"}`;
//! - with the session cookie (set for the gateway's origin before the socket opens) the page
//!   gets the agent's identity frame;
//! - without the cookie, with protocols `['chat', 'bearer.<token>']`, the page connects with
//!   `ws.protocol === 'chat'`, and the agent was offered only `chat`, with the identity header.
//!
//! The gateway runs at log level debug with its access log on; the token appears nowhere in
//! its stdout or stderr, its `/metrics` or its `/config`.
//!
//! `tests/browser/setup.sh` installs Chromium (apt-get) and the npm packages when missing;
//! without node, npm or a working Chromium this test fails, saying so. It never skips.

mod common;

use agent_gateway::secrets::fingerprint;
use common::auth::*;
use common::browser::*;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The driver's own deadline for the whole run (it reports and exits when it passes).
const DRIVER_DEADLINE: Duration = Duration::from_secs(60);

/// The HS256 key of the policy (the gateway's secret JWT_KEY). A test value.
const JWT_KEY: &str = "jwt-test-key-browser-auth-71d0c4";
const ROOM: &str = "browser-auth";

/// The gateway, with every line it writes (stdout: access and connection lines; stderr: the
/// debug log) kept in files of its folder.
fn start_logged_gateway(backend: SocketAddr, page_origin: &str) -> Gateway {
    let config = LISTENERS.to_owned()
        + &format!(
            r#"
[log]
level = "debug"
access_log = true

[cors]
allowed_origins = ["{page_origin}"]
allow_credentials = true
allow_missing_origin = true

[upstreams.local]
kind = "local"
nodes = ["{backend}"]
connect_timeout = "2s"

[auth.browser]
method = "jwt"
credentials = ["cookie:session", "protocol:bearer."]
algorithms = ["HS256"]
key_secret = "JWT_KEY"
identity_headers = {{ sub = "x-user-id" }}
"#
        )
        + &route("/agents", Some("browser"))
        + &agent("CoderAgent", "local", None);
    start_gateway_logged(&config, &[("JWT_KEY", JWT_KEY)])
}

async fn drive(gateway: SocketAddr, page_port: u16, token: &str) -> DriverRun {
    let args = [
        ("gateway", format!("http://{gateway}")),
        ("page-port", page_port.to_string()),
        ("room", ROOM.to_owned()),
    ];
    run_driver(
        "drive-auth.mjs",
        &args,
        &[("AUTH_TOKEN", token)],
        DRIVER_DEADLINE,
    )
    .await
}

/// The upgrade request the backend last got for `room`, asked of the backend directly.
async fn last_upgrade(backend: SocketAddr, room: &str) -> Value {
    let answer = get(
        backend,
        "/state",
        &[
            ("x-partykit-namespace", "coder-agent"),
            ("x-partykit-room", room),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()["last_upgrade"].clone()
}

#[tokio::test]
async fn a_real_browser_connects_with_a_cookie_or_a_subprotocol_token() {
    let started = Instant::now();
    setup();
    let backend = start_backend(Some(TEST_KEY));
    let page_port = free_port();
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let gateway = start_logged_gateway(backend.address, &page_origin);
    let claims = json!({"sub": "browser-user", "exp": now() + 600});
    let token = sign(Algorithm::HS256, JWT_KEY, None, &claims);

    let run = drive(gateway.address(), page_port, &token).await;
    let browser = run.passed("browser");
    assert_eq!(browser["page_origin"], page_origin.as_str());

    // No credential: refused by the gateway (401 with a Bearer challenge, which Chromium
    // reports as a failed authentication) before anything reached the backend.
    let none = run.passed("no_cookie");
    assert_eq!(none["opened"], false);
    assert_eq!(none["close"]["code"], 1006);
    assert_eq!(none["cookies"], json!([]));
    let handshake = &none["handshake"];
    assert!(
        handshake["status"] == 401
            || handshake["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("HTTP Authentication failed")),
        "{none}"
    );
    assert_eq!(handshake["origin_sent"], page_origin.as_str());
    assert_eq!(
        last_upgrade(backend.address, &format!("{ROOM}-none")).await,
        Value::Null
    );

    // The session cookie (the only credential offered): the agent's identity frame, and the
    // backend got the browser's cookie and the identity header.
    let cookie = run.passed("cookie");
    assert_eq!(cookie["identity"]["type"], "cf_agent_identity", "{cookie}");
    assert_eq!(cookie["identity"]["agent"], "coder-agent");
    assert_eq!(cookie["identity"]["name"], format!("{ROOM}-cookie"));
    assert_eq!(cookie["handshake"]["offered_protocols"], json!([]));
    let upstream = last_upgrade(backend.address, &format!("{ROOM}-cookie")).await;
    assert_eq!(
        upstream["headers"]["x-user-id"], "browser-user",
        "{upstream}"
    );
    assert_eq!(
        upstream["headers"]["cookie"],
        fingerprint(&format!("session={token}")).as_str(),
        "the browser sent its session cookie: {upstream}"
    );

    // The subprotocol token, no cookie: the page speaks 'chat'; the backend was offered
    // 'chat' alone.
    let protocol = run.passed("protocol");
    assert_eq!(protocol["protocol"], "chat", "{protocol}");
    assert_eq!(protocol["identity"]["name"], format!("{ROOM}-protocol"));
    assert_eq!(protocol["cookies"], json!([]));
    assert_eq!(
        protocol["handshake"]["offered_protocols"],
        json!(["chat", "bearer.[token]"]),
        "{protocol}"
    );
    assert_eq!(protocol["handshake"]["answered_protocol"], "chat");
    let upstream = last_upgrade(backend.address, &format!("{ROOM}-protocol")).await;
    assert_eq!(
        upstream["headers"]["sec-websocket-protocol"], "chat",
        "{upstream}"
    );
    assert_eq!(
        upstream["headers"]["x-user-id"], "browser-user",
        "{upstream}"
    );
    assert!(upstream["headers"].get("cookie").is_none(), "{upstream}");
    assert_eq!(run.passed("summary")["failed"], json!([]));

    // The gateway's count of what it decided.
    let metrics = gateway.metrics().await;
    let decisions = |result: &str| {
        metric_sum(
            &metrics,
            "agent_gateway_auth_decisions_total",
            &["method=\"jwt\"", &format!("result=\"{result}\"")],
        )
    };
    assert_eq!(decisions("missing"), 1.0, "{metrics}");
    assert_eq!(decisions("allowed"), 2.0, "{metrics}");
    assert_eq!(decisions("invalid"), 0.0, "{metrics}");

    // The token is nowhere the gateway writes or answers, though it logged at debug level and
    // wrote an access line for each handshake.
    let config = get(gateway.admin, "/config", &[]).await;
    assert_eq!(config.status, 200, "{}", config.body);
    let output = format!("{}\n{}", gateway.stdout(), gateway.stderr());
    let signature = token.rsplit('.').next().expect("a JWS signature");
    for (what, text) in [
        ("stdout and stderr", output.as_str()),
        ("/metrics", metrics.as_str()),
        ("/config", config.body.as_str()),
    ] {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(
            !text.contains(&token),
            "the token is in the gateway's {what}"
        );
        assert!(
            !text.contains(signature),
            "the token's signature is in the gateway's {what}"
        );
    }
    assert!(
        output.contains("DEBUG"),
        "the gateway logged nothing at debug level"
    );
    let access = gateway.stdout();
    for (room, status) in [("none", 401), ("cookie", 101), ("protocol", 101)] {
        let path = format!("path=\"/agents/CoderAgent/{ROOM}-{room}\"");
        assert!(
            access.lines().any(|l| l.contains("kind=access")
                && l.contains(&path)
                && l.contains(&format!(" status={status} "))),
            "no access line with status {status} for {room}:\n{access}"
        );
    }
    eprintln!("real-browser auth test took {:?}", started.elapsed());
}
