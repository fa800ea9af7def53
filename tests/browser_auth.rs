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
use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// apt-get installing Chromium on a cold machine, or npm ci on a cold cache.
const SETUP_WAIT: Duration = Duration::from_secs(600);
/// The driver's own deadline for the whole run (it reports and exits when it passes) ...
const DRIVER_DEADLINE: Duration = Duration::from_secs(60);
/// ... and this test's, a little longer, in case the driver cannot even do that.
const DRIVER_WAIT: Duration = Duration::from_secs(90);
/// The driver's bound on each browser-side wait.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The HS256 key of the policy (the gateway's secret JWT_KEY). A test value.
const JWT_KEY: &str = "jwt-test-key-browser-auth-71d0c4";
const ROOM: &str = "browser-auth";

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `command` to its end, reading both pipes as it goes. Past `limit` it asks the process
/// to stop (SIGTERM: the driver's Playwright closes Chromium on it), then kills it.
fn run_bounded(mut command: Command, limit: Duration, what: &str) -> Result<Finished, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline && !timed_out {
            timed_out = true;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let grace = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let finished = Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if timed_out {
        return Err(format!(
            "{what} took over {limit:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            finished.stdout, finished.stderr
        ));
    }
    Ok(finished)
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never blocks on it.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `tests/browser/setup.sh` once per test binary; every caller sees its outcome.
fn setup() {
    static SETUP: OnceLock<Result<Duration, String>> = OnceLock::new();
    let outcome = SETUP.get_or_init(|| {
        let started = Instant::now();
        let mut command = Command::new("bash");
        command.arg(browser_dir().join("setup.sh"));
        let finished = run_bounded(command, SETUP_WAIT, "tests/browser/setup.sh")?;
        if !finished.status.success() {
            return Err(format!(
                "tests/browser/setup.sh failed ({}):\n{}{}",
                finished.status, finished.stdout, finished.stderr
            ));
        }
        Ok(started.elapsed())
    });
    match outcome {
        Ok(took) => eprintln!("browser setup took {took:?}"),
        Err(why) => panic!("the real-browser auth test cannot run: {why}"),
    }
}

/// The gateway, with every line it writes (stdout: access and connection lines; stderr: the
/// debug log) kept in files of its folder.
struct LoggedGateway {
    _proc: Proc,
    address: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl LoggedGateway {
    fn start(backend: SocketAddr, page_origin: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let [listen, admin] = free_ports::<2>();
        let address: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("address");
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("address");
        let config = format!(
            r#"
[server]
listen = "{address}"
threads = 2

[admin]
listen = "{admin}"

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

[[routes]]
prefix = "/agents"
auth = "browser"

[[routes.agents]]
name = "CoderAgent"
upstream = "local"
"#
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("config written");
        let file = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&path)
            // The config's level, whatever the environment running the tests says.
            .env("RUST_LOG", "debug")
            .env("OPENROUTER_API_KEY", TEST_KEY)
            .env("JWT_KEY", JWT_KEY)
            .stdout(file("stdout.log"))
            .stderr(file("stderr.log"))
            .spawn()
            .expect("gateway starts");
        let proc = Proc { child, address };
        wait_for_port(address);
        wait_for_port(admin);
        LoggedGateway {
            _proc: proc,
            address,
            admin,
            dir,
        }
    }

    /// Everything the gateway wrote so far, stdout then stderr.
    fn output(&self) -> String {
        ["stdout.log", "stderr.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }
}

/// The driver's checks by name, and everything it printed, for failure messages.
struct DriverRun {
    checks: HashMap<String, Value>,
    transcript: String,
}

impl DriverRun {
    /// The check `name`, which must be present and passed.
    fn passed(&self, name: &str) -> &Value {
        let check = self.checks.get(name).unwrap_or_else(|| {
            panic!("the driver reported no {name:?} check\n{}", self.transcript)
        });
        assert_eq!(
            check["ok"], true,
            "check {name} failed: {check:#}\n{}",
            self.transcript
        );
        check
    }
}

async fn run_driver(gateway: SocketAddr, page_port: u16, token: &str) -> DriverRun {
    let mut command = Command::new("node");
    command
        .current_dir(browser_dir())
        .arg("drive-auth.mjs")
        .args(["--gateway", &format!("http://{gateway}")])
        .args(["--page-port", &page_port.to_string()])
        .args(["--room", ROOM])
        .args(["--timeout-ms", &CHECK_TIMEOUT.as_millis().to_string()])
        .args(["--deadline-ms", &DRIVER_DEADLINE.as_millis().to_string()])
        .env("AUTH_TOKEN", token);
    let finished = tokio::task::spawn_blocking(move || {
        run_bounded(command, DRIVER_WAIT, "tests/browser/drive-auth.mjs")
    })
    .await
    .expect("driver thread")
    .unwrap_or_else(|why| panic!("{why}"));
    let transcript = format!(
        "--- driver ({}) stdout ---\n{}--- driver stderr ---\n{}",
        finished.status, finished.stdout, finished.stderr
    );
    let mut checks = HashMap::new();
    for line in finished.stdout.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("driver line is not JSON ({e}): {line}\n{transcript}"));
        let name = value["check"]
            .as_str()
            .unwrap_or_else(|| panic!("driver line names no check: {line}"))
            .to_owned();
        checks.insert(name, value);
    }
    DriverRun { checks, transcript }
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let gateway = LoggedGateway::start(backend.address, &page_origin);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = encode(
        &Header::default(),
        &json!({"sub": "browser-user", "exp": exp}),
        &EncodingKey::from_secret(JWT_KEY.as_bytes()),
    )
    .expect("token");

    let run = run_driver(gateway.address, page_port, &token).await;
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
    let metrics = get(gateway.admin, "/metrics", &[]).await.body;
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
    let output = gateway.output();
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
