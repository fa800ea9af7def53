//! Shared harness for the integration tests: the real `agent-gateway` binary and the real
//! reference backend as child processes on 127.0.0.1, real clients, bounded waits.
#![allow(dead_code)] // each test binary uses its own part of the harness

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Reads a response head byte by byte, so nothing after it (WebSocket frames) is consumed.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut byte))
            .await
            .expect("head in time")
            .expect("read");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Opens a WebSocket to CoderAgent's `room` by hand (a valid handshake, read up to the 101),
/// so a test can stay silent or write frames a library would refuse to send.
pub async fn raw_upgrade(address: SocketAddr, room: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = format!(
        "GET /agents/CoderAgent/{room} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
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
    let mut command = Command::new(BIN);
    command
        .args(["run", "-c"])
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("TEST_GATEWAY_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        // Agent routes require this by default; tests that need it missing set it empty.
        .env("OPENROUTER_API_KEY", TEST_KEY)
        // Access and connection lines, for tests that read them.
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).expect("stdout file"))
        .stderr(Stdio::inherit());
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

/// An HTTP answer read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Sends `request` as written (so paths are not normalised by a client library) and reads
/// the answer until the server closes or the body is complete.
pub async fn raw_request(address: SocketAddr, request: &str) -> RawResponse {
    let work = async {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(parsed) = parse_complete(&buf) {
                return parsed;
            }
        }
        parse_complete(&buf)
            .unwrap_or_else(|| panic!("incomplete answer: {:?}", String::from_utf8_lossy(&buf)))
    };
    tokio::time::timeout(WAIT, work)
        .await
        .expect("answer in time")
}

fn parse_complete(buf: &[u8]) -> Option<RawResponse> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let response = RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    };
    if response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        let body = decode_chunked(&response.body)?;
        return Some(RawResponse { body, ..response });
    }
    let length: usize = response.header("content-length")?.parse().ok()?;
    (response.body.len() >= length).then_some(response)
}

/// The body of a complete chunked encoding, or `None` while it is incomplete.
fn decode_chunked(mut raw: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size_line, rest) = raw.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(rest.get(..size)?);
        raw = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// `GET path` with `Connection: close` and extra header lines.
pub async fn get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    raw_request(address, &request).await
}

/// Opens a WebSocket, failing the test after [`WAIT`].
pub async fn connect(url: &str) -> Ws {
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .unwrap_or_else(|e| panic!("WebSocket to {url}: {e}"));
    assert_eq!(response.status(), 101);
    ws
}

/// Sends a WebSocket handshake for `url` by hand and returns the HTTP refusal it got, whole
/// (a client library may keep only the body bytes that came with the head).
pub async fn connect_refused(url: &str) -> (u16, String) {
    connect_refused_with(url, &[]).await
}

pub async fn connect_refused_with(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let rest = url.strip_prefix("ws://").expect("a ws:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let address: SocketAddr = authority.parse().expect("an IP:port authority");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let answer = raw_request(address, &request).await;
    assert_ne!(
        answer.status, 101,
        "expected a refusal, the upgrade succeeded"
    );
    (answer.status, answer.body)
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
        let leaf = rcgen::CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf");
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
