//! TLS termination on the public listener: SNI picks among several certificates, agent
//! WebSockets work over wss, and a reload swaps renewed certificates without a restart.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

async fn tls_connect(
    address: std::net::SocketAddr,
    ca: &TestCa,
    name: &str,
) -> TlsStream<tokio::net::TcpStream> {
    let connector = TlsConnector::from(ca.client_config());
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    tokio::time::timeout(WAIT, connector.connect(server_name, tcp))
        .await
        .expect("handshake in time")
        .expect("TLS handshake")
}

fn peer_certificate(stream: &TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("certificates")[0]
        .as_ref()
        .to_vec()
}

fn write_pair(dir: &std::path::Path, name: &str, leaf: &TestLeaf) {
    std::fs::write(dir.join(format!("{name}.pem")), &leaf.cert_pem).expect("cert");
    std::fs::write(dir.join(format!("{name}.key")), &leaf.key_pem).expect("key");
}

#[tokio::test]
async fn sni_picks_the_certificate_and_reload_renews_it() {
    let ca = TestCa::new();
    let a = ca.issue(&["a.test"]);
    let b = ca.issue(&["*.b.test"]);
    let backend = start_backend(Some(TEST_KEY));
    let config = local_config(&[backend.address])
        + "\n[tls]\nlisten = \"{tls}\"\n[[tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n[[tls.certificates]]\ncert = \"b.pem\"\nkey = \"b.key\"\n";
    let gateway = start_gateway_with(&config, &[], |dir| {
        write_pair(dir, "a", &a);
        write_pair(dir, "b", &b);
    });
    let tls = gateway.tls;

    assert_eq!(
        peer_certificate(&tls_connect(tls, &ca, "a.test").await),
        a.der.as_ref()
    );
    assert_eq!(
        peer_certificate(&tls_connect(tls, &ca, "x.b.test").await),
        b.der.as_ref()
    );

    // wss: the agent WebSocket over the TLS listener.
    let stream = tls_connect(tls, &ca, "a.test").await;
    let (mut ws, _) =
        tokio_tungstenite::client_async("wss://a.test/agents/CoderAgent/secure", stream)
            .await
            .expect("upgrade over TLS");
    assert_eq!(next_json_tls(&mut ws).await["type"], "cf_agent_identity");

    // The upstream is told the client came over TLS.
    let mut stream = tls_connect(tls, &ca, "a.test").await;
    stream
        .write_all(
            b"GET /agents/CoderAgent/secure HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("request");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .expect("in time")
        .ok();
    assert!(
        answer.contains("\"x-forwarded-proto\":\"https\""),
        "{answer}"
    );

    // Renew a.test's certificate and reload: new handshakes get the new one.
    let renewed = ca.issue(&["a.test"]);
    write_pair(gateway.dir.path(), "a", &renewed);
    let reload = raw_request(
        gateway.admin,
        "POST /reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert_eq!(
        peer_certificate(&tls_connect(tls, &ca, "a.test").await),
        renewed.der.as_ref()
    );
}

async fn next_json_tls(
    ws: &mut tokio_tungstenite::WebSocketStream<TlsStream<tokio::net::TcpStream>>,
) -> serde_json::Value {
    use futures_util::StreamExt;
    let message = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("valid");
    serde_json::from_str(&message.into_text().expect("text")).expect("JSON")
}

#[test]
fn a_key_that_does_not_match_is_a_config_error() {
    let ca = TestCa::new();
    let a = ca.issue(&["a.test"]);
    let other = ca.issue(&["a.test"]);
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("a.pem"), &a.cert_pem).expect("cert");
    std::fs::write(dir.path().join("a.key"), &other.key_pem).expect("key");
    let config = (local_config(&["127.0.0.1:1".parse().expect("address")])
        + "\n[tls]\nlisten = \"127.0.0.1:3\"\n[[tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n")
        .replace("{listen}", "127.0.0.1:1")
        .replace("{admin}", "127.0.0.1:2");
    std::fs::write(dir.path().join("gateway.toml"), config).expect("config");
    let output = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(dir.path().join("gateway.toml"))
        .env("OPENROUTER_API_KEY", TEST_KEY)
        .output()
        .expect("check ran");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not belong to"), "{stderr}");
}
