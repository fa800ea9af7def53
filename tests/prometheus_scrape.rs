//! A real Prometheus server (Debian's `prometheus`, on loopback, scraping every second)
//! scrapes the gateway's admin listener, and a PromQL query over its HTTP API returns the
//! close counts the test produced.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Queries Prometheus until `query` returns `expected` as its single value.
async fn wait_for_query(prometheus: std::net::SocketAddr, query: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    loop {
        let answer = get(prometheus, &format!("/api/v1/query?query={encoded}"), &[]).await;
        let value = answer.json()["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok());
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{query} = {value:?}, expected {expected}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_close_counts() {
    let backend = start_backend(Some(TEST_KEY));
    let gateway = start_gateway(&local_config(&[backend.address]));
    for code in [CloseCode::Normal, CloseCode::Normal, CloseCode::Away] {
        let mut ws = connect(&gateway.url("/agents/CoderAgent/scraped")).await;
        next_json(&mut ws).await;
        ws.close(Some(CloseFrame {
            code,
            reason: "".into(),
        }))
        .await
        .expect("close");
        close_code(&mut ws).await;
    }
    gateway
        .wait_metric("agent_gateway_ws_closes_total{agent=\"CoderAgent\",code=\"1000\",initiator=\"client\"}", 2.0)
        .await;

    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: agent-gateway\n    static_configs:\n      - targets: [\"{}\"]\n",
            gateway.admin
        ),
    )
    .expect("config");
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={address}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus; scripts/bootstrap.sh installs it)");
    let _prometheus = Proc { child, address };
    wait_for_port(address);
    let deadline = Instant::now() + WAIT;
    while get(address, "/-/ready", &[]).await.status != 200 {
        assert!(Instant::now() < deadline, "prometheus never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_query(
        address,
        r#"sum(agent_gateway_ws_closes_total{agent="CoderAgent",initiator="client",code="1000"})"#,
        2.0,
    )
    .await;
    wait_for_query(
        address,
        r#"sum by (code) (agent_gateway_ws_closes_total{code="1001"})"#,
        1.0,
    )
    .await;
}
