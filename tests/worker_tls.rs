//! A `worker` upstream over TLS, verified against a test CA: it must receive the canonical
//! path and its own Host, and no routing headers (a Worker routes by itself).

mod common;

use common::*;
use futures_util::SinkExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

struct TestPki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn test_pki() -> TestPki {
    let ca = TestCa::new();
    let leaf = ca.issue(&["agents.test"]);
    TestPki {
        ca_pem: ca.pem,
        chain: vec![leaf.der],
        key: leaf.key_der,
    }
}

/// A TLS WebSocket server that reports the request line and Host it received, then closes.
async fn start_worker(pki: &TestPki) -> std::net::SocketAddr {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = serde_json::Value::Null;
                // The callback's error type is tungstenite's, large by its design.
                #[allow(clippy::result_large_err)]
                let callback = |request: &Request, response: Response| {
                    let header = |n: &str| {
                        request
                            .headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    seen = serde_json::json!({
                        "uri": request.uri().to_string(),
                        "host": header("host"),
                        "room": header("x-partykit-room"),
                        "forwarded_proto": header("x-forwarded-proto"),
                    });
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
                    return;
                };
                let _ = ws.send(Message::text(seen.to_string())).await;
                let _ = ws.close(None).await;
            });
        }
    });
    address
}

/// A gateway config with one TLS `worker` upstream at `worker`, trusting `ca.pem`.
fn worker_config(worker: std::net::SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"

[admin]
listen = "{{admin}}"

[upstreams.cloud]
kind = "worker"
address = "{worker}"
host = "agents.test"
ca_file = "ca.pem"

[[routes]]
prefix = "/agents"

[[routes.agents]]
name = "CoderAgent"
upstream = "cloud"
"#
    )
}

#[tokio::test]
async fn worker_upstream_over_tls_gets_canonical_path_and_host() {
    let pki = test_pki();
    let worker = start_worker(&pki).await;
    let config = worker_config(worker);
    let ca_pem = pki.ca_pem.clone();
    let gateway = start_gateway_with(&config, &[], |dir| {
        std::fs::write(dir.join("ca.pem"), ca_pem).expect("CA written");
    });
    for spelling in ["CoderAgent", "coderagent", "CODER_AGENT"] {
        let request = ws_request(
            &gateway.url(&format!("/agents/{spelling}/Room-7?_pk=abc")),
            &[("x-partykit-room", "spoofed")],
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        let seen = next_json(&mut ws).await;
        assert_eq!(
            seen["uri"], "/agents/coder-agent/Room-7?_pk=abc",
            "{spelling}"
        );
        assert_eq!(seen["host"], "agents.test");
        assert_eq!(
            seen["room"],
            serde_json::Value::Null,
            "a worker routes by itself"
        );
        assert_eq!(seen["forwarded_proto"], "http");
    }
}

#[tokio::test]
async fn worker_with_an_untrusted_certificate_is_refused() {
    let pki = test_pki();
    let other = test_pki();
    let worker = start_worker(&pki).await;
    let config = worker_config(worker);
    let gateway = start_gateway_with(&config, &[], |dir| {
        std::fs::write(dir.join("ca.pem"), &other.ca_pem).expect("CA written");
    });
    let (status, body) = connect_refused(&gateway.url("/agents/CoderAgent/default")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("TLS handshake"), "{body}");
}
