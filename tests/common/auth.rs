//! What the authentication tests share: tokens, the identity signature as documented, metric
//! series and config text of policies, and a small HTTP/1.1 server for the services a test
//! stands in for (an auth service, a JWKS URL, an upstream that records what reaches it).

use super::{get, Gateway, LISTENERS};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::hmac;
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Seconds since 1970 by this machine's clock.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A token of `claims` signed with `key` (the HMAC secret, or a PEM private key), naming
/// `kid` when given.
pub fn sign(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = key.as_bytes();
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem).expect("an EC key"),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem).expect("an Ed25519 key"),
        _ => EncodingKey::from_rsa_pem(pem).expect("an RSA key"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("signed")
}

/// The series counting the decisions of `method` on `route` with `result`.
pub fn decisions(route: &str, method: &str, result: &str) -> String {
    format!("agent_gateway_auth_decisions_total{{method=\"{method}\",result=\"{result}\",route=\"{route}\"}}")
}

/// The HMAC-SHA256 (hex) over identity `headers` as the doc comment of `src/auth/identity.rs`
/// specifies it, computed here independently of the gateway.
pub fn identity_signature(
    key: &str,
    timestamp: u64,
    agent: &str,
    instance: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut text = format!("agent-gateway-identity-v1\n{timestamp}\n{agent}\n{instance}\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}:{value}\n"));
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
    hmac::sign(&key, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Config text: [`LISTENERS`], heartbeats off, and a local upstream `name` over `node` for
/// each of `upstreams`; policies and routes follow.
pub fn quiet_config(upstreams: &[(&str, SocketAddr)]) -> String {
    let mut text = LISTENERS.to_owned()
        + "\n[websocket]\nping_interval = \"0s\"\nupstream_ping_interval = \"0s\"\n";
    for (name, node) in upstreams {
        text += &format!("\n[upstreams.{name}]\nkind = \"local\"\nnodes = [\"{node}\"]\n");
    }
    text
}

/// Config text: a `[[routes]]` under `prefix`, guarded by the policy `auth` when given.
pub fn route(prefix: &str, auth: Option<&str>) -> String {
    let auth = auth.map_or(String::new(), |a| format!("auth = \"{a}\"\n"));
    format!("\n[[routes]]\nprefix = \"{prefix}\"\n{auth}")
}

/// Config text: an agent of the route before it on `upstream`, with its own policy if given.
pub fn agent(name: &str, upstream: &str, auth: Option<&str>) -> String {
    let auth = auth.map_or(String::new(), |a| format!("auth = \"{a}\"\n"));
    format!("\n[[routes.agents]]\nname = \"{name}\"\nupstream = \"{upstream}\"\n{auth}")
}

/// The reference backend's JSON for a plain GET of `path` with `headers`, asserting a 200.
pub async fn backend_json(gateway: &Gateway, path: &str, headers: &[(&str, &str)]) -> Value {
    let answer = get(gateway.address(), path, headers).await;
    assert_eq!(answer.status, 200, "{}\n{}", answer.head, answer.body);
    answer.json()
}

/// A request a test server received: its method, target, headers (names in lower case) and
/// head as it came.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub head: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Accepts connections on 127.0.0.1 (listening before it returns), each handled by `handler`
/// on a task of its own; the address, and the accepting task (abort it to stop listening).
pub async fn serve<F, Fut>(handler: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bound");
    let address = listener.local_addr().expect("an address");
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handler(stream));
        }
    });
    (address, accepting)
}

/// The next request head on `stream` (`buffer` keeps what was read past it, for keep-alive);
/// `None` once the peer closes or sends something that is not HTTP.
pub async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Request> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buffer) {
            Ok(httparse::Status::Complete(length)) => {
                let request = Request {
                    method: parsed.method.unwrap_or_default().to_owned(),
                    target: parsed.path.unwrap_or_default().to_owned(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_ascii_lowercase(), value)
                        })
                        .collect(),
                    head: String::from_utf8_lossy(&buffer[..length]).into_owned(),
                };
                buffer.drain(..length);
                return Some(request);
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return None,
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// An HTTP/1.1 answer with `headers` and `body` (its `content-length` added).
pub fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("X");
    let mut text = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text + "\r\n" + body
}
