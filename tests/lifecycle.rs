//! Issue 8 lifecycle, with the real binary as a child process: SIGTERM drains, SIGHUP
//! reloads (a good file and a bad one), and a binary upgrade hands the listeners over.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill ran");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Waits for the process to exit, at most `limit`; returns its exit status.
async fn exited(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_0_within_the_grace() {
    let backend = start_backend(Some(TEST_KEY));
    let config = local_config(&[backend.address])
        .replace("threads = 2", "threads = 2\ndrain_grace = \"20s\"");
    let mut gateway = start_gateway(&config);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&gateway.url("/agents/CoderAgent/term")).await;
        next_json(&mut ws).await;
        clients.push(ws);
    }
    let started = Instant::now();
    signal(gateway.proc.child.id(), "TERM");
    for ws in &mut clients {
        assert_eq!(close_code(ws).await, 1001);
    }
    let status = exited(&mut gateway.proc.child, Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}");
    // The clients answered at once, so the drain did not wait out its grace.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let received = get(
        backend.address,
        "/agents/coder-agent/term",
        &[
            ("x-partykit-namespace", "coder-agent"),
            ("x-partykit-room", "term"),
        ],
    )
    .await;
    assert_eq!(
        received.json()["received_closes"],
        serde_json::json!([1001, 1001, 1001])
    );
}

#[tokio::test]
async fn sighup_applies_a_good_file_and_refuses_a_bad_one() {
    let backend = start_backend(Some(TEST_KEY));
    let config = local_config(&[backend.address]);
    let gateway = start_gateway(&config);
    let mut established = connect(&gateway.url("/agents/CoderAgent/hup")).await;
    next_json(&mut established).await;
    let (status, _) = connect_refused(&gateway.url("/agents/SupportAgent/x")).await;
    assert_eq!(status, 404);

    // A good file: a new agent route.
    let text = std::fs::read_to_string(gateway.config_path()).expect("config");
    let added = text + "\n[[routes.agents]]\nname = \"SupportAgent\"\nupstream = \"local\"\n";
    std::fs::write(gateway.config_path(), &added).expect("written");
    signal(gateway.proc.child.id(), "HUP");
    gateway
        .wait_metric(
            "agent_gateway_config_reloads_total{result=\"success\"}",
            1.0,
        )
        .await;
    let mut support = connect(&gateway.url("/agents/support-agent/x")).await;
    assert_eq!(next_json(&mut support).await["agent"], "support-agent");
    // The socket opened before the reload still works.
    assert_echo(&mut established, "still here").await;

    // A bad file: refused, counted, and the configuration in force keeps serving.
    std::fs::write(
        gateway.config_path(),
        added.replace("kind = \"local\"", "kind = \"lokal\""),
    )
    .expect("written");
    signal(gateway.proc.child.id(), "HUP");
    gateway
        .wait_metric(
            "agent_gateway_config_reloads_total{result=\"failure\"}",
            1.0,
        )
        .await;
    let mut again = connect(&gateway.url("/agents/SupportAgent/y")).await;
    assert_eq!(next_json(&mut again).await["type"], "cf_agent_identity");
    assert_echo(&mut established, "and now").await;

    // POST /reload says why.
    let answer = raw_request(
        gateway.admin,
        "POST /reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 422);
    let detail = answer.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        detail.contains("unknown upstream kind \"lokal\""),
        "{detail}"
    );
    assert!(detail.contains("gateway.toml:"), "{detail}");
}

async fn healthz_pid(admin: std::net::SocketAddr) -> Option<u64> {
    let answer = get(admin, "/healthz", &[]).await;
    answer.json()["pid"].as_u64()
}

#[tokio::test]
async fn binary_upgrade_hands_the_listeners_over_without_refusing_anyone() {
    let backend = start_backend(Some(TEST_KEY));
    let old = start_gateway(&local_config(&[backend.address]));
    let mut across = connect(&old.url("/agents/CoderAgent/upgrade")).await;
    next_json(&mut across).await;

    // The new process waits on the upgrade socket for the old one's listeners.
    let new_child = Command::new(BIN)
        .args(["run", "--upgrade", "-c"])
        .arg(old.config_path())
        .env("RUST_LOG", "warn")
        .env("OPENROUTER_API_KEY", TEST_KEY)
        .current_dir(old.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("new gateway");
    let new_pid = u64::from(new_child.id());
    let _new = Proc {
        child: new_child,
        address: old.address(),
    };
    let socket = old.dir.path().join("upgrade.sock");
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never opened {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Clients keep connecting during the hand-over; none may be refused.
    let address = old.address();
    let handed_over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = handed_over.clone();
    let prober = tokio::spawn(async move {
        let mut served = 0u32;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Until the new process answers: the hand-over happens inside this loop.
        while !done.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
            let answer = get(address, "/agents/CoderAgent/probe", &[]).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            served += 1;
        }
        served
    });
    let old_pid = old.proc.child.id();
    signal(old_pid, "QUIT");
    // The connection across the upgrade is closed with 1001, not dropped.
    assert_eq!(close_code(&mut across).await, 1001);
    let deadline = Instant::now() + Duration::from_secs(20);
    while healthz_pid(old.admin).await != Some(new_pid) {
        assert!(Instant::now() < deadline, "the new process never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handed_over.store(true, std::sync::atomic::Ordering::Release);
    let served = prober.await.expect("prober");
    assert!(served > 0);
    // Until the old process exits, upgrades that reach it get 503 "draining" and clients
    // retry; after that, every reconnect lands on the new process.
    let mut old = old;
    let status = exited(&mut old.proc.child, Duration::from_secs(20)).await;
    assert!(status.success(), "the old process exited with {status}");
    let mut again = connect(&old.url("/agents/CoderAgent/upgrade")).await;
    assert_eq!(next_json(&mut again).await["type"], "cf_agent_identity");
}
