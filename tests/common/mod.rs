//! Shared harness for the integration tests: the real `agent-gateway` binary and the real
//! reference backend as child processes on 127.0.0.1, real clients, bounded waits.
#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod auth;
pub mod browser;
pub mod dns;
pub mod fleet;
mod raw;
pub mod workerd;

pub use raw::*;

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_agent-gateway");
pub const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_reference-backend");
/// Upper bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);
pub const TEST_KEY: &str = "sk-test-not-a-real-key-0123456789";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub address: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.address)
    }
}

/// A free loopback port. The listener is dropped before the gateway binds it; the window is
/// small and the ports are ephemeral.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free loopback ports, held open together while chosen so none repeats.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("address").port())
}

/// Starts the reference backend on an ephemeral port, waiting for its readiness line.
pub fn start_backend(key: Option<&str>) -> Proc {
    start_backend_at("127.0.0.1:0".parse().expect("address"), key)
}

/// Starts the reference backend on `address` (port 0: any free port).
pub fn start_backend_at(address: SocketAddr, key: Option<&str>) -> Proc {
    let mut command = Command::new(BACKEND_BIN);
    command
        .args(["--listen", &address.to_string()])
        .env_remove("OPENROUTER_API_KEY")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(key) = key {
        command.env("OPENROUTER_API_KEY", key);
    }
    let mut child = command.spawn().expect("backend starts");
    let line = first_line(&mut child, WAIT);
    let address = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected backend line {line:?}"));
    Proc { child, address }
}

/// The first line a child prints on its piped stdout: its readiness signal.
pub fn first_line(child: &mut Child, wait: Duration) -> String {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(wait).expect("a readiness line in time")
}

/// A gateway started from a config text; `{listen}` in it is replaced by a free port.
pub struct Gateway {
    pub proc: Proc,
    pub admin: SocketAddr,
    /// The address `{tls}` stood for.
    pub tls: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    pub fn url(&self, path: &str) -> String {
        self.proc.url(path)
    }

    pub fn address(&self) -> SocketAddr {
        self.proc.address
    }

    /// What the gateway wrote on stdout so far: its access and connection lines.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// What the gateway wrote on stderr so far, when started by [`start_gateway_logged`].
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The admin listener's Prometheus exposition.
    pub async fn metrics(&self) -> String {
        get(self.admin, "/metrics", &[]).await.body
    }

    /// The value of one series, `name{labels}` exactly as exposed (labels sorted by name).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Waits until `series` reaches `value`: close accounting happens as the pump winds
    /// down, just after the client has seen its Close.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            let now = metric_value(&text, series);
            if now == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {now}, expected {value}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A series' value in a Prometheus text exposition; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

/// The sum of every series of `name` whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn start_gateway(config: &str) -> Gateway {
    start_gateway_with(config, &[], |_| {})
}

/// Starts the gateway with `config` (placeholders `{listen}`, `{admin}`, `{tls}` and `{dir}`), extra environment,
/// and a hook to write more files into its folder first.
pub fn start_gateway_with(
    config: &str,
    env: &[(&str, &str)],
    prepare: impl FnOnce(&Path),
) -> Gateway {
    launch(config, env, prepare, false)
}

/// Starts the gateway as [`start_gateway_with`] does, but with `RUST_LOG` unset (so that the
/// config's `[log] level` rules) and its stderr kept in `stderr.log` beside `stdout.log`.
pub fn start_gateway_logged(config: &str, env: &[(&str, &str)]) -> Gateway {
    launch(config, env, |_| {}, true)
}

fn launch(
    config: &str,
    env: &[(&str, &str)],
    prepare: impl FnOnce(&Path),
    logged: bool,
) -> Gateway {
    let dir = tempfile::tempdir().expect("temp dir");
    prepare(dir.path());
    let [listen_port, admin_port, tls_port] = free_ports::<3>();
    let address: SocketAddr = format!("127.0.0.1:{listen_port}").parse().expect("address");
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("address");
    let tls: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("address");
    let text = config
        .replace("{listen}", &address.to_string())
        .replace("{admin}", &admin.to_string())
        .replace("{tls}", &tls.to_string())
        .replace("{dir}", &dir.path().display().to_string());
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).expect("config written");
    let file = |name: &str| std::fs::File::create(dir.path().join(name)).expect("a log file");
    let mut command = Command::new(BIN);
    command
        .args(["run", "-c"])
        .arg(&path)
        // Agent routes require this by default; tests that need it missing set it empty.
        .env("OPENROUTER_API_KEY", TEST_KEY)
        // Access and connection lines, for tests that read them.
        .stdout(file("stdout.log"));
    if logged {
        command.env_remove("RUST_LOG").stderr(file("stderr.log"));
    } else {
        let level = std::env::var("TEST_GATEWAY_LOG").unwrap_or_else(|_| "warn".to_owned());
        command.env("RUST_LOG", level).stderr(Stdio::inherit());
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command.spawn().expect("gateway starts");
    let proc = Proc { child, address };
    wait_for_port(address);
    if text.contains(&admin.to_string()) {
        wait_for_port(admin);
    }
    if text.contains(&tls.to_string()) {
        wait_for_port(tls);
    }
    Gateway {
        proc,
        admin,
        tls,
        dir,
    }
}

/// Waits until something accepts on `address`: the gateway's readiness for traffic.
pub fn wait_for_port(address: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {address}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Config text: the gateway's listener on `{listen}` and its admin listener on `{admin}`.
pub const LISTENERS: &str = r#"
[server]
listen = "{listen}"
threads = 2

[admin]
listen = "{admin}"
"#;

/// A config with one local upstream over `nodes` and the agent CoderAgent.
pub fn local_config(nodes: &[SocketAddr]) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        r#"
[server]
listen = "{{listen}}"
threads = 2
upgrade_sock = "upgrade.sock"

[admin]
listen = "{{admin}}"

[upstreams.local]
kind = "local"
nodes = [{}]
connect_timeout = "2s"

[[routes]]
prefix = "/agents"

[[routes.agents]]
name = "CoderAgent"
upstream = "local"
"#,
        nodes.join(", ")
    )
}

/// Opens a WebSocket, failing the test after [`WAIT`].
pub async fn connect(url: &str) -> Ws {
    connect_headers(url, &[]).await.0
}

/// Opens a WebSocket with extra headers; the socket and the 101's headers.
pub async fn connect_headers(url: &str, headers: &[(&str, &str)]) -> (Ws, http::HeaderMap) {
    let request = ws_request(url, headers);
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .unwrap_or_else(|e| panic!("WebSocket to {url}: {e}"));
    assert_eq!(response.status(), 101);
    (ws, response.headers().clone())
}

/// The next data message (text or binary), skipping pings and pongs.
pub async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("no WebSocket error");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    match next_message(ws).await {
        Message::Text(text) => serde_json::from_str(&text).expect("JSON text frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Sends `text` and expects it echoed back.
pub async fn assert_echo(ws: &mut Ws, text: &str) {
    send_text(ws, text).await;
    let echo = next_message(ws).await.into_text().expect("a text echo");
    assert_eq!(echo.as_str(), text);
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    tokio::time::timeout(WAIT, ws.send(Message::text(text.to_owned())))
        .await
        .expect("sent in time")
        .expect("sent");
}

/// Reads until the Close frame and returns its code (1006 when the stream ended without one).
pub async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
                return code;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return 1006,
        }
    }
}

/// A WebSocket handshake request for `url` with extra headers.
pub fn ws_request(url: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for (k, v) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    request
}

/// A test certificate authority, for TLS on both sides of the gateway.
pub struct TestCa {
    pub pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate issued by a [`TestCa`].
pub struct TestLeaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: rustls::pki_types::CertificateDer<'static>,
    pub key_der: rustls::pki_types::PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Names of their own: OpenSSL (curl) takes a leaf whose subject is its issuer's for a
        // self-signed certificate.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agent-gateway test CA");
        let cert = params.self_signed(&key).expect("CA");
        TestCa {
            pem: cert.pem(),
            cert,
            key,
        }
    }

    pub fn issue(&self, names: &[&str]) -> TestLeaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).expect("leaf params");
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        let leaf = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        TestLeaf {
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            der: leaf.der().clone(),
            key_der: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A client configuration that trusts only this CA.
    pub fn client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("CA added");
        std::sync::Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}
