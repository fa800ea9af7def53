//! Issue 6: secret presence, through the real gateway and the real reference backend. The
//! key used here is distinctive so that the last test can prove it is never printed.

mod common;

use common::*;
use std::net::SocketAddr;
use std::process::Command;

const KEY_ENV: &str = "OPENROUTER_API_KEY";
/// Never printed: assertions about it say only "equal" or "not equal".
const SECRET: &str = "sk-or-v1-gateway-test-0b7c4e1f9a2d";

fn config(backend: SocketAddr, extra_upstream: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"
[admin]
listen = "{{admin}}"
{extra}
[upstreams.local]
kind = "local"
nodes = ["{backend}"]
{extra_upstream}

[[routes]]
prefix = "/agents"
[[routes.agents]]
name = "CoderAgent"
upstream = "local"

[[routes]]
prefix = "/public"
require = []
[[routes.agents]]
name = "CoderAgent"
upstream = "local"
"#
    )
}

async fn assert_secret_missing(gateway: &Gateway, hint_part: &str) {
    let answer = get(gateway.address(), "/agents/CoderAgent/default", &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "secret_missing");
    assert_eq!(body["secret"], KEY_ENV);
    assert!(
        body["hint"]
            .as_str()
            .unwrap_or_default()
            .contains(hint_part),
        "{body}"
    );
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/default")).await;
    assert_eq!(status, 503);
    assert!(body.contains("secret_missing"), "{body}");
}

#[tokio::test]
async fn absent_or_empty_key_answers_503_and_other_routes_keep_working() {
    let backend = start_backend(Some(TEST_KEY));
    for value in ["", "   \t"] {
        let gateway = start_gateway_with(
            &config(backend.address, "", ""),
            &[(KEY_ENV, value)],
            |_| {},
        );
        assert_secret_missing(&gateway, "environment variable OPENROUTER_API_KEY").await;
        // A route that requires nothing still works.
        let mut ws = connect(&gateway.url("/public/CoderAgent/default")).await;
        assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
        let metrics = gateway.metrics().await;
        assert_eq!(
            metric_value(
                &metrics,
                "agent_gateway_secret_present{secret=\"OPENROUTER_API_KEY\",upstream=\"local\"}"
            ),
            0.0
        );
        let ready = get(gateway.admin, "/readyz", &[]).await;
        assert_eq!(ready.status, 503);
        assert_eq!(ready.json()["reason"], "secret_missing");
    }
}

#[tokio::test]
async fn key_from_a_file_is_forwarded_and_clients_cannot_inject_their_own() {
    let backend = start_backend(Some(TEST_KEY));
    let text = config(
        backend.address,
        "forward_secrets = { OPENROUTER_API_KEY = \"x-openrouter-key\" }",
        "[secrets.OPENROUTER_API_KEY]\nfile = \"openrouter-key\"",
    );
    // The environment says nothing: the file is the source.
    let gateway = start_gateway_with(&text, &[(KEY_ENV, "")], |dir| {
        std::fs::write(dir.join("openrouter-key"), format!("{SECRET}\n")).expect("key file");
    });
    let answer = get(
        gateway.address(),
        "/agents/CoderAgent/default",
        &[("X-OpenRouter-Key", "client-chosen-key")],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let seen = answer.json()["headers"]["x-openrouter-key"]
        .as_str()
        .map(str::to_owned);
    let expected = agent_gateway::secrets::fingerprint(SECRET);
    assert_eq!(
        seen.as_deref(),
        Some(expected.as_str()),
        "the backend did not receive the configured key"
    );
    // The upstream gets the configured key on every route, never the client's.
    let answer = get(
        gateway.address(),
        "/public/CoderAgent/x",
        &[("x-openrouter-key", "client-chosen-key")],
    )
    .await;
    let seen = answer.json()["headers"]["x-openrouter-key"]
        .as_str()
        .map(str::to_owned);
    assert_eq!(
        seen.as_deref(),
        Some(expected.as_str()),
        "a client-sent key reached the backend"
    );
}

#[tokio::test]
async fn missing_file_recovers_on_reload() {
    let backend = start_backend(Some(TEST_KEY));
    let text = config(
        backend.address,
        "",
        "[secrets.OPENROUTER_API_KEY]\nfile = \"openrouter-key\"",
    );
    let gateway = start_gateway_with(&text, &[(KEY_ENV, "")], |_| {});
    assert_secret_missing(&gateway, "openrouter-key").await;
    std::fs::write(gateway.dir.path().join("openrouter-key"), SECRET).expect("key file");
    let reload = raw_request(
        gateway.admin,
        "POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    let mut ws = connect(&gateway.url("/agents/CoderAgent/default")).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
    assert_eq!(get(gateway.admin, "/readyz", &[]).await.status, 200);
}

#[tokio::test]
async fn backend_without_its_key_gives_the_client_503_json_until_the_probe_passes() {
    let port = free_port();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut backend = start_backend_at(address, None);
    let text = config(
        address,
        "probe_path = \"/agents/agent-gateway-probe/probe\"\nprobe_interval = \"200ms\"",
        "",
    );
    let gateway = start_gateway(&text);
    // The backend answers 500 "OPENROUTER_API_KEY is not set": the client gets the
    // gateway's 503 JSON instead, for the upgrade and for plain HTTP.
    assert_secret_missing(&gateway, "agent backend of upstream local").await;
    gateway
        .wait_metric(
            "agent_gateway_secret_present{secret=\"OPENROUTER_API_KEY\",upstream=\"local\"}",
            0.0,
        )
        .await;
    assert_eq!(get(gateway.admin, "/readyz", &[]).await.status, 503);
    // The key arrives (the backend restarts with it); the probe notices without traffic.
    backend.child.kill().expect("killed");
    backend.child.wait().expect("reaped");
    let _backend = start_backend_at(address, Some(TEST_KEY));
    gateway
        .wait_metric(
            "agent_gateway_secret_present{secret=\"OPENROUTER_API_KEY\",upstream=\"local\"}",
            1.0,
        )
        .await;
    assert_eq!(get(gateway.admin, "/readyz", &[]).await.status, 200);
    let mut ws = connect(&gateway.url("/agents/CoderAgent/default")).await;
    assert_eq!(next_json(&mut ws).await["type"], "cf_agent_identity");
}

#[tokio::test]
async fn an_empty_500_still_gets_its_json_answer() {
    // A 500 with no body, to an agent that needs a secret: held back like any small 500,
    // it becomes the gateway's 503 JSON, with a body, even though the head ended the answer.
    let (node, _accepting) = common::auth::serve(|mut stream| async move {
        let mut buffer = Vec::new();
        while common::auth::read_request(&mut stream, &mut buffer)
            .await
            .is_some()
        {
            let answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n";
            if tokio::io::AsyncWriteExt::write_all(&mut stream, answer)
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let gateway = start_gateway(&config(node, "", ""));
    for _ in 0..2 {
        let answer = get(gateway.address(), "/agents/CoderAgent/default", &[]).await;
        assert_eq!(answer.status, 503, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"], "upstream_error", "{body}");
        assert_eq!(body["upstream_status"], 500, "{body}");
    }
}

#[tokio::test]
async fn check_reports_missing_secrets_by_name() {
    let backend = start_backend(Some(TEST_KEY));
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.toml");
    let text = config(backend.address, "", "")
        .replace("{listen}", "127.0.0.1:1")
        .replace("{admin}", "127.0.0.1:2");
    std::fs::write(&path, text).expect("written");
    let run = |value: &str, extra: &[&str]| {
        Command::new(BIN)
            .args(["check", "-c"])
            .arg(&path)
            .args(extra)
            .env(KEY_ENV, value)
            .output()
            .expect("check ran")
    };
    let missing = run("", &[]);
    assert!(!missing.status.success());
    let out = String::from_utf8_lossy(&missing.stdout);
    assert!(out.contains("OPENROUTER_API_KEY: MISSING"), "{out}");
    assert!(run("", &["--warn-secrets"]).status.success());
    let present = run(SECRET, &[]);
    assert!(present.status.success());
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&present.stdout),
        String::from_utf8_lossy(&present.stderr)
    );
    assert!(
        everything.contains("OPENROUTER_API_KEY: present"),
        "check output lacks the secret's state"
    );
    assert!(
        !everything.contains(SECRET),
        "check printed the secret's value"
    );
}

#[tokio::test]
async fn the_value_is_never_printed() {
    let backend = start_backend(Some(TEST_KEY));
    let dir = tempfile::tempdir().expect("dir");
    let log_path = dir.path().join("gateway.log");
    let text = config(
        backend.address,
        "forward_secrets = { OPENROUTER_API_KEY = \"x-openrouter-key\" }",
        "",
    )
    .replace("{listen}", &format!("127.0.0.1:{}", free_port()))
    .replace("{admin}", &format!("127.0.0.1:{}", free_port()));
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).expect("config");
    let listen: SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.trim_end_matches('"').parse().ok())
        .expect("listen");
    let admin: SocketAddr = text
        .lines()
        .filter_map(|l| l.strip_prefix("listen = \""))
        .nth(1)
        .and_then(|l| l.trim_end_matches('"').parse().ok())
        .expect("admin");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "debug")
        .env(KEY_ENV, SECRET)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("gateway");
    let proc = Proc {
        child,
        address: listen,
    };
    wait_for_port(listen);
    wait_for_port(admin);
    // Traffic of every kind, good and bad, so that every log line and answer is produced.
    let mut bodies = Vec::new();
    for path in [
        "/agents/CoderAgent/x",
        "/agents/Nope/x",
        "/agents/CoderAgent/..",
        "/elsewhere",
    ] {
        bodies.push(get(listen, path, &[]).await.body);
    }
    let mut ws = connect(&format!("ws://{listen}/agents/CoderAgent/x")).await;
    next_json(&mut ws).await;
    ws.close(None).await.expect("close");
    close_code(&mut ws).await;
    for path in ["/metrics", "/config", "/readyz"] {
        bodies.push(get(admin, path, &[]).await.body);
    }
    bodies.push(
        raw_request(
            admin,
            "POST /reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .body,
    );
    drop(proc);
    let logs = std::fs::read_to_string(&log_path).expect("logs");
    assert!(!logs.is_empty(), "the gateway logged nothing");
    assert!(
        !logs.contains(SECRET),
        "the secret's value is in the gateway's logs"
    );
    for body in &bodies {
        assert!(!body.contains(SECRET), "the secret's value is in an answer");
    }
}
