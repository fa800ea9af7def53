//! Forward auth: an external service decides, as with nginx `auth_request`, Traefik
//! ForwardAuth or Envoy `ext_authz`.
//!
//! For each request the gateway sends `GET {the service URL}` with the original request's
//! method, path and query, and host in `X-Forwarded-Method`, `X-Forwarded-Uri` and
//! `X-Forwarded-Host`, its `Authorization` and `Cookie` headers, and in `X-Auth-Credential` the
//! credential the policy found (so that one in a query parameter or a WebSocket subprotocol
//! entry, which the service could not see, reaches it too). The service answers:
//!
//! - 2xx: allowed; the subject is in the configured subject header and the `identity_from`
//!   headers become claims;
//! - 401 or 403: denied; that status, its `WWW-Authenticate` (401) and `Content-Type` headers
//!   and its body (up to 16 KiB) go to the client as they are;
//! - anything else, no answer within the timeout, or no connection: the request is refused
//!   with 503 (fail closed).
//!
//! Allowed answers may be reused for `cache_ttl`, keyed by a digest of the credential-bearing
//! inputs only (not the path): the service is asked who the client is, and what the client
//! may open is the policy's scope, checked by the gateway.

use super::{AuthFailure, ForwardSettings, Identity};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Uri;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora_memory_cache::MemoryCache;
use ring::digest::{Context, SHA256, SHA256_OUTPUT_LEN};
use serde_json::{Map, Value};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub(crate) const FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
pub(crate) const FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
pub(crate) const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const CREDENTIAL_HEADER: HeaderName = HeaderName::from_static("x-auth-credential");

/// The most of a denial's body relayed to the client; a longer one is cut there.
const MAX_BODY: usize = 16 * 1024;
/// Allowed answers kept at once; the least useful go first when it is full.
const CACHE_ENTRIES: usize = 16 * 1024;
/// How long an idle kept-alive connection to the service stays pooled. Short, because many
/// servers close idle connections after a few seconds and a stale one costs a retry.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type Digest = [u8; SHA256_OUTPUT_LEN];

/// A forward-auth policy's client of its auth service.
pub(crate) struct ForwardAuth {
    url: String,
    /// `host:port` to resolve and connect to; also what error texts name.
    address: String,
    /// The `Host` header sent: the URL's authority.
    host: HeaderValue,
    tls: bool,
    sni: String,
    /// The URL's path and query, the request target sent.
    target: String,
    timeout: Duration,
    cache_ttl: Duration,
    subject_header: HeaderName,
    identity_from: Vec<HeaderName>,
    /// Boxed, as is the cache, to keep this small beside the other checks (it is ~1.5 KiB).
    connector: Box<Connector>,
    /// Digest of the credential inputs -> (that digest again, the identity). The digest is
    /// kept in the value because the cache itself only tells keys apart by a 64-bit hash.
    cache: Option<Box<MemoryCache<Digest, (Digest, Identity)>>>,
}

/// What the service answered.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl ForwardAuth {
    pub(crate) fn new(settings: &ForwardSettings) -> Result<ForwardAuth, String> {
        let uri: Uri = settings
            .url
            .parse()
            .map_err(|e| format!("the forward auth URL is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("the forward auth URL must start with http:// or https://".into()),
        };
        let authority = uri.authority().ok_or("the forward auth URL has no host")?;
        // User info would be a credential in a URL that logs and metrics show.
        if authority.as_str().contains('@') {
            return Err("the forward auth URL must not carry user info".into());
        }
        let host = authority.host();
        if host.is_empty() {
            return Err("the forward auth URL has no host".into());
        }
        // Read here rather than with `Authority::port`, which takes an invalid port for none.
        let port = match authority
            .as_str()
            .strip_prefix(host)
            .and_then(|rest| rest.strip_prefix(':'))
        {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or("the forward auth URL has an invalid port")?,
            None if tls => 443,
            None => 80,
        };
        if settings.timeout.is_zero() {
            return Err("the forward auth timeout must be more than zero".into());
        }
        let target = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_string();
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| "the forward auth URL's host cannot be a Host header".to_string())?;
        Ok(ForwardAuth {
            url: settings.url.clone(),
            address: format!("{host}:{port}"),
            host: host_header,
            tls,
            sni: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            target,
            timeout: settings.timeout,
            cache_ttl: settings.cache_ttl,
            subject_header: settings.subject_header.clone(),
            identity_from: settings.identity_from.clone(),
            connector: Box::new(Connector::new(None)),
            cache: (!settings.cache_ttl.is_zero())
                .then(|| Box::new(MemoryCache::new(CACHE_ENTRIES))),
        })
    }

    /// The auth service's URL as configured.
    #[cfg(test)]
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// [`Self::check_timed`] without the timing.
    #[cfg(test)]
    pub(crate) async fn check(
        &self,
        request: &RequestHeader,
        credential: Option<&str>,
    ) -> Result<Identity, AuthFailure> {
        self.check_timed(request, credential, |_| {}).await
    }

    /// Asks the auth service about `request`, unless an allowed answer for the same
    /// credential is cached; `credential` is the one the policy found (sent along for those
    /// the service would not see: a query parameter, a subprotocol entry). `asked` gets how
    /// long the service took, when it was asked.
    pub(crate) async fn check_timed(
        &self,
        request: &RequestHeader,
        credential: Option<&str>,
        asked: impl FnOnce(Duration),
    ) -> Result<Identity, AuthFailure> {
        let key = match &self.cache {
            Some(cache) => {
                let key = cache_key(request, credential);
                if let Some(key) = &key {
                    if let (Some((stored, identity)), _) = cache.get(key) {
                        if stored == *key {
                            return Ok(identity);
                        }
                    }
                }
                key
            }
            None => None,
        };
        let head = self.auth_request(request, credential)?;
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.exchange(head)).await;
        asked(started.elapsed());
        let answer = answer
            .map_err(|_| self.unavailable(format_args!("no answer within {:?}", self.timeout)))??;
        let identity = self.decide(answer)?;
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.put(&key, (key, identity.clone()), Some(self.cache_ttl));
        }
        Ok(identity)
    }

    /// The request to the service. Only the headers named here are taken from the original
    /// request, so a client cannot send the service forwarded headers of its own making.
    fn auth_request(
        &self,
        request: &RequestHeader,
        credential: Option<&str>,
    ) -> Result<Box<RequestHeader>, AuthFailure> {
        let build_failed = |_| self.unavailable("cannot build the request");
        let mut head =
            RequestHeader::build("GET", self.target.as_bytes(), Some(8)).map_err(build_failed)?;
        head.insert_header(header::HOST, self.host.clone())
            .map_err(build_failed)?;
        head.insert_header(FORWARDED_METHOD, request.method.as_str())
            .map_err(build_failed)?;
        let uri = request
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        head.insert_header(FORWARDED_URI, uri)
            .map_err(build_failed)?;
        let original_host = match request.headers.get(header::HOST) {
            Some(host) => Some(host.clone()),
            None => request
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        if let Some(host) = original_host {
            head.insert_header(FORWARDED_HOST, host)
                .map_err(build_failed)?;
        }
        for name in [header::AUTHORIZATION, header::COOKIE] {
            for value in request.headers.get_all(&name) {
                head.append_header(name.clone(), value.clone())
                    .map_err(build_failed)?;
            }
        }
        if let Some(credential) = credential {
            // A decoded query parameter may hold bytes no header can carry: the client's fault.
            let value = HeaderValue::from_str(credential).map_err(|_| {
                AuthFailure::Invalid("the credential has characters a header cannot carry".into())
            })?;
            head.insert_header(CREDENTIAL_HEADER, value)
                .map_err(build_failed)?;
        }
        Ok(Box::new(head))
    }

    /// One exchange with the service, on a pooled connection when there is one. A pooled
    /// connection the service has closed meanwhile fails at once; the exchange is then tried
    /// once more, which is safe because the check is a GET.
    async fn exchange(&self, head: Box<RequestHeader>) -> Result<Answer, AuthFailure> {
        let address = self.resolve().await?;
        let peer = HttpPeer::new(address, self.tls, self.sni.clone());
        let mut retried = false;
        loop {
            let (mut session, reused) =
                self.connector.get_http_session(&peer).await.map_err(|e| {
                    self.unavailable(format_args!("cannot connect ({})", e.etype().as_str()))
                })?;
            match read_answer(&mut session, head.clone()).await {
                Ok(answer) => {
                    // Pooled only when the whole answer was read; Pingora checks.
                    self.connector
                        .release_http_session(session, &peer, Some(POOL_IDLE_TIMEOUT))
                        .await;
                    return Ok(answer);
                }
                Err(_) if reused && !retried => retried = true,
                Err(e) => {
                    return Err(self
                        .unavailable(format_args!("the exchange failed ({})", e.etype().as_str())))
                }
            }
        }
    }

    /// Resolved per check, so that a DNS change is followed without a reload.
    async fn resolve(&self) -> Result<SocketAddr, AuthFailure> {
        tokio::net::lookup_host(&self.address)
            .await
            .ok()
            .and_then(|mut addresses| addresses.next())
            .ok_or_else(|| self.unavailable("cannot resolve its host"))
    }

    /// The answer's meaning for the client.
    fn decide(&self, answer: Answer) -> Result<Identity, AuthFailure> {
        match answer.status {
            200..=299 => {}
            401 | 403 => {
                let mut names = vec![header::CONTENT_TYPE];
                if answer.status == 401 {
                    names.push(header::WWW_AUTHENTICATE);
                }
                let headers = names
                    .into_iter()
                    .flat_map(|name| {
                        answer
                            .headers
                            .get_all(&name)
                            .iter()
                            .map(|value| (name.clone(), value.clone()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                return Err(AuthFailure::Denied {
                    status: answer.status,
                    headers,
                    body: answer.body,
                });
            }
            status => return Err(self.unavailable(format_args!("answered {status}"))),
        }
        let subject = answer
            .headers
            .get(&self.subject_header)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                // Fail closed: per-subject limits and logs need a subject.
                self.unavailable(format_args!(
                    "allowed the request without a {} header",
                    self.subject_header
                ))
            })?
            .to_string();
        let mut claims = Map::new();
        for name in &self.identity_from {
            if let Some(value) = answer.headers.get(name).and_then(|v| v.to_str().ok()) {
                claims.insert(name.as_str().to_string(), Value::String(value.to_string()));
            }
        }
        claims.insert("sub".to_string(), Value::String(subject.clone()));
        Ok(Identity {
            subject,
            claims,
            expires_at: None,
        })
    }

    /// A failure naming the service and what happened, never anything from the request.
    fn unavailable(&self, what: impl fmt::Display) -> AuthFailure {
        AuthFailure::Unavailable(format!("auth service {}: {what}", self.address))
    }
}

impl fmt::Debug for ForwardAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardAuth")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .field("subject_header", &self.subject_header)
            .field("identity_from", &self.identity_from)
            .finish_non_exhaustive()
    }
}

/// Sends `head` and reads the answer: its header (after any 1xx) and up to [`MAX_BODY`] of its
/// body. A longer body is cut, and the connection is then not pooled.
async fn read_answer(
    session: &mut HttpSession,
    head: Box<RequestHeader>,
) -> pingora::Result<Answer> {
    session.write_request_header(head).await?;
    session.finish_request_body().await?;
    let (status, headers) = loop {
        session.read_response_header().await?;
        let Some(answer) = session.response_header() else {
            return pingora::Error::e_explain(
                pingora::ErrorType::InvalidHTTPHeader,
                "no response header",
            );
        };
        if !answer.status.is_informational() {
            break (answer.status.as_u16(), answer.headers.clone());
        }
    };
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_response_body().await? {
        let room = MAX_BODY - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() >= room && !session.response_done() {
            break;
        }
    }
    Ok(Answer {
        status,
        headers,
        body: body.freeze(),
    })
}

/// The cache key: a digest of every credential-bearing input, each length-prefixed so that
/// no two different sets of inputs give the same bytes. `None` when there is none at all,
/// since an anonymous answer is not one to reuse.
fn cache_key(request: &RequestHeader, credential: Option<&str>) -> Option<Digest> {
    let authorization = request.headers.get_all(header::AUTHORIZATION);
    let cookie = request.headers.get_all(header::COOKIE);
    if credential.is_none()
        && authorization.iter().next().is_none()
        && cookie.iter().next().is_none()
    {
        return None;
    }
    let mut context = Context::new(&SHA256);
    let mut field = |tag: u8, values: &mut dyn Iterator<Item = &[u8]>| {
        context.update(&[tag]);
        for value in values {
            context.update(&[1]);
            context.update(&(value.len() as u64).to_be_bytes());
            context.update(value);
        }
        context.update(&[0]);
    };
    field(b'a', &mut authorization.iter().map(|v| v.as_bytes()));
    field(b'c', &mut cookie.iter().map(|v| v.as_bytes()));
    field(b'x', &mut credential.map(str::as_bytes).into_iter());
    let mut key = [0u8; SHA256_OUTPUT_LEN];
    key.copy_from_slice(context.finish().as_ref());
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::super::test_keys::closed_port;
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A request the test service received: its target and headers (lowercase names).
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    struct Reply {
        delay: Duration,
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    }

    fn reply(status: u16, headers: &[(&'static str, &str)], body: &[u8]) -> Reply {
        Reply {
            delay: Duration::ZERO,
            status,
            headers: headers.iter().map(|(n, v)| (*n, v.to_string())).collect(),
            body: body.to_vec(),
        }
    }

    type Replier = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

    /// A minimal HTTP/1.1 auth service with keep-alive, on 127.0.0.1, listening before it is
    /// returned.
    struct Service {
        port: u16,
        seen: Arc<Mutex<Vec<Seen>>>,
        connections: Arc<AtomicUsize>,
    }

    impl Service {
        async fn start(replier: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Service {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let connections = Arc::new(AtomicUsize::new(0));
            let replier: Replier = Arc::new(replier);
            let (s, c) = (seen.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, s.clone(), replier.clone()));
                }
            });
            Service {
                port,
                seen,
                connections,
            }
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, replier: Replier) {
        let mut buf = Vec::new();
        loop {
            let request = loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(len)) = parsed.parse(&buf) {
                    let request = Seen {
                        method: parsed.method.unwrap_or_default().to_string(),
                        target: parsed.path.unwrap_or_default().to_string(),
                        headers: parsed
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                    };
                    buf.drain(..len);
                    break request;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            seen.lock().unwrap().push(request.clone());
            let reply = replier(&request);
            tokio::time::sleep(reply.delay).await;
            let mut out = format!(
                "HTTP/1.1 {} Whatever\r\ncontent-length: {}\r\n",
                reply.status,
                reply.body.len()
            );
            for (name, value) in &reply.headers {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            out.push_str("\r\n");
            let mut out = out.into_bytes();
            out.extend_from_slice(&reply.body);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    fn settings(port: u16, timeout: Duration, cache_ttl: Duration) -> ForwardSettings {
        ForwardSettings {
            url: format!("http://127.0.0.1:{port}/verify?policy=agents"),
            timeout,
            cache_ttl,
            subject_header: HeaderName::from_static("x-user"),
            identity_from: vec![
                HeaderName::from_static("x-user"),
                HeaderName::from_static("x-org"),
                HeaderName::from_static("x-absent"),
            ],
        }
    }

    fn auth(port: u16, cache_ttl: Duration) -> ForwardAuth {
        ForwardAuth::new(&settings(port, Duration::from_secs(2), cache_ttl)).unwrap()
    }

    fn request(authorization: &str) -> RequestHeader {
        let mut request =
            RequestHeader::build("GET", b"/agents/chat/room-1?mode=live", None).unwrap();
        request.insert_header("host", "gw.example").unwrap();
        request
            .insert_header("authorization", authorization)
            .unwrap();
        request.insert_header("cookie", "session=s1").unwrap();
        request.insert_header("x-forwarded-uri", "/forged").unwrap();
        request
    }

    fn allow(_: &Seen) -> Reply {
        reply(200, &[("x-user", "alice"), ("x-org", "acme")], b"ok")
    }

    /// Starts a service answering with `replier` and has it refuse `Bearer t1` (cached 60 s).
    async fn refusal(
        replier: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> (u16, AuthFailure) {
        let service = Service::start(replier).await;
        let failure = auth(service.port, Duration::from_secs(60))
            .check(&request("Bearer t1"), None)
            .await
            .unwrap_err();
        (service.port, failure)
    }

    fn unavailable(port: u16, why: &str) -> AuthFailure {
        AuthFailure::Unavailable(format!("auth service 127.0.0.1:{port}: {why}"))
    }

    async fn bounded<T>(test: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test took too long")
    }

    #[tokio::test]
    async fn an_allowed_request_gives_the_answer_identity() {
        bounded(async {
            let service = Service::start(allow).await;
            let auth = auth(service.port, Duration::ZERO);
            let identity = auth
                .check(&request("Bearer t1"), Some("query-token"))
                .await
                .unwrap();
            assert_eq!(identity.subject, "alice");
            assert_eq!(identity.expires_at, None);
            let claims: Vec<_> = identity.claims.iter().collect();
            assert_eq!(identity.claims.len(), 3, "{claims:?}");
            assert_eq!(identity.claims["sub"], "alice");
            assert_eq!(identity.claims["x-user"], "alice");
            assert_eq!(identity.claims["x-org"], "acme");

            let seen = service.seen();
            assert_eq!(seen.len(), 1);
            let seen = &seen[0];
            assert_eq!(seen.method, "GET");
            assert_eq!(seen.target, "/verify?policy=agents");
            let host = format!("127.0.0.1:{}", service.port);
            assert_eq!(seen.header("host"), Some(host.as_str()));
            assert_eq!(seen.header("x-forwarded-method"), Some("GET"));
            assert_eq!(
                seen.header("x-forwarded-uri"),
                Some("/agents/chat/room-1?mode=live")
            );
            assert_eq!(seen.header("x-forwarded-host"), Some("gw.example"));
            assert_eq!(seen.header("authorization"), Some("Bearer t1"));
            assert_eq!(seen.header("cookie"), Some("session=s1"));
            assert_eq!(seen.header("x-auth-credential"), Some("query-token"));
            let forwarded_uris = seen
                .headers
                .iter()
                .filter(|(n, _)| n == "x-forwarded-uri")
                .count();
            assert_eq!(forwarded_uris, 1, "a client's own header is not passed on");
        })
        .await
    }

    #[tokio::test]
    async fn no_credential_header_is_sent_when_there_is_none() {
        bounded(async {
            let service = Service::start(allow).await;
            let request = RequestHeader::build("POST", b"/x", None).unwrap();
            auth(service.port, Duration::ZERO)
                .check(&request, None)
                .await
                .unwrap();
            let seen = &service.seen()[0];
            assert_eq!(seen.header("x-forwarded-method"), Some("POST"));
            assert_eq!(seen.header("x-forwarded-host"), None);
            assert_eq!(seen.header("authorization"), None);
            assert_eq!(seen.header("cookie"), None);
            assert_eq!(seen.header("x-auth-credential"), None);
        })
        .await
    }

    #[tokio::test]
    async fn a_401_is_relayed_with_its_challenge_and_body() {
        bounded(async {
            let (_, failure) = refusal(|_| {
                reply(
                    401,
                    &[
                        ("www-authenticate", "Bearer realm=\"agents\""),
                        ("content-type", "application/json"),
                        ("x-internal", "not relayed"),
                    ],
                    br#"{"error":"login"}"#,
                )
            })
            .await;
            let AuthFailure::Denied {
                status,
                headers,
                body,
            } = failure
            else {
                panic!("not denied: {failure:?}");
            };
            assert_eq!(status, 401);
            assert_eq!(
                headers,
                vec![
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json")
                    ),
                    (
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"agents\"")
                    ),
                ]
            );
            assert_eq!(&body[..], br#"{"error":"login"}"#);
        })
        .await
    }

    #[tokio::test]
    async fn a_403_is_relayed_and_never_cached() {
        bounded(async {
            let service = Service::start(|_| {
                reply(
                    403,
                    &[
                        ("content-type", "text/plain"),
                        ("www-authenticate", "Bearer"),
                    ],
                    b"no",
                )
            })
            .await;
            let auth = auth(service.port, Duration::from_secs(60));
            for _ in 0..2 {
                let failure = auth.check(&request("Bearer t1"), None).await.unwrap_err();
                assert_eq!(
                    failure,
                    AuthFailure::Denied {
                        status: 403,
                        headers: vec![(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain")
                        )],
                        body: Bytes::from_static(b"no"),
                    }
                );
                assert_eq!(failure.result(), "forbidden");
            }
            assert_eq!(service.seen().len(), 2);
        })
        .await
    }

    #[tokio::test]
    async fn a_long_denial_body_is_cut() {
        bounded(async {
            let service = Service::start(|_| reply(401, &[], &[b'x'; 40 * 1024])).await;
            let auth = auth(service.port, Duration::ZERO);
            for _ in 0..2 {
                match auth.check(&request("Bearer t1"), None).await {
                    Err(AuthFailure::Denied { body, .. }) => assert_eq!(body.len(), MAX_BODY),
                    other => panic!("not denied: {other:?}"),
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_slow_service_is_unavailable_within_the_timeout() {
        bounded(async {
            let service = Service::start(|_| Reply {
                delay: Duration::from_secs(5),
                ..allow(&Seen {
                    method: String::new(),
                    target: String::new(),
                    headers: Vec::new(),
                })
            })
            .await;
            let timeout = Duration::from_millis(200);
            let auth = ForwardAuth::new(&settings(service.port, timeout, Duration::ZERO)).unwrap();
            let started = Instant::now();
            let failure = auth.check(&request("Bearer t1"), None).await.unwrap_err();
            let took = started.elapsed();
            assert!(took >= timeout && took < Duration::from_secs(2), "{took:?}");
            assert_eq!(failure, unavailable(service.port, "no answer within 200ms"));
        })
        .await
    }

    #[tokio::test]
    async fn a_service_that_is_down_is_unavailable() {
        bounded(async {
            let port = closed_port();
            let failure = auth(port, Duration::ZERO)
                .check(&request("Bearer t1"), Some("query-token"))
                .await
                .unwrap_err();
            let AuthFailure::Unavailable(text) = failure else {
                panic!("{failure:?}");
            };
            assert!(
                text.starts_with(&format!("auth service 127.0.0.1:{port}: cannot connect")),
                "{text}"
            );
            assert!(
                !text.contains("t1") && !text.contains("query-token"),
                "{text}"
            );
        })
        .await
    }

    #[tokio::test]
    async fn a_server_error_is_unavailable() {
        bounded(async {
            let (port, failure) = refusal(|_| reply(500, &[("x-user", "alice")], b"boom")).await;
            assert_eq!(failure, unavailable(port, "answered 500"));
        })
        .await
    }

    #[tokio::test]
    async fn an_allowed_answer_without_a_subject_is_unavailable() {
        bounded(async {
            let (port, failure) = refusal(|_| reply(204, &[("x-org", "acme")], b"")).await;
            let why = "allowed the request without a x-user header";
            assert_eq!(failure, unavailable(port, why));
        })
        .await
    }

    #[tokio::test]
    async fn an_allowed_answer_is_reused_for_the_same_credential_only() {
        bounded(async {
            let service = Service::start(allow).await;
            let auth = auth(service.port, Duration::from_secs(60));
            let first = auth.check(&request("Bearer t1"), None).await.unwrap();
            let second = auth.check(&request("Bearer t1"), None).await.unwrap();
            assert_eq!(first, second);
            assert_eq!(
                service.seen().len(),
                1,
                "the second check is answered from the cache"
            );

            auth.check(&request("Bearer t2"), None).await.unwrap();
            assert_eq!(
                service.seen().len(),
                2,
                "another Authorization is asked about"
            );
            auth.check(&request("Bearer t1"), Some("q")).await.unwrap();
            assert_eq!(service.seen().len(), 3, "another credential is asked about");
            auth.check(&request("Bearer t1"), Some("q")).await.unwrap();
            assert_eq!(service.seen().len(), 3);
        })
        .await
    }

    #[tokio::test]
    async fn an_anonymous_answer_is_not_cached() {
        bounded(async {
            let service = Service::start(allow).await;
            let auth = auth(service.port, Duration::from_secs(60));
            let request = RequestHeader::build("GET", b"/x", None).unwrap();
            auth.check(&request, None).await.unwrap();
            auth.check(&request, None).await.unwrap();
            assert_eq!(service.seen().len(), 2);
        })
        .await
    }

    #[tokio::test]
    async fn uncached_checks_reuse_one_connection() {
        bounded(async {
            let service = Service::start(allow).await;
            let auth = auth(service.port, Duration::ZERO);
            for _ in 0..3 {
                auth.check(&request("Bearer t1"), None).await.unwrap();
            }
            assert_eq!(service.seen().len(), 3);
            assert_eq!(service.connections(), 1);
        })
        .await
    }

    #[tokio::test]
    async fn a_credential_no_header_can_carry_is_invalid_and_not_sent() {
        bounded(async {
            let service = Service::start(allow).await;
            let failure = auth(service.port, Duration::ZERO)
                .check(&request("Bearer t1"), Some("a\nb"))
                .await
                .unwrap_err();
            assert!(matches!(failure, AuthFailure::Invalid(_)), "{failure:?}");
            assert!(service.seen().is_empty());
        })
        .await
    }

    #[test]
    fn cache_keys_tell_every_input_apart() {
        let with = |authorization: Option<&str>, cookie: Option<&str>, credential| {
            let mut request = RequestHeader::build("GET", b"/", None).unwrap();
            if let Some(v) = authorization {
                request.insert_header("authorization", v).unwrap();
            }
            if let Some(v) = cookie {
                request.insert_header("cookie", v).unwrap();
            }
            cache_key(&request, credential)
        };
        assert_eq!(with(None, None, None), None);
        let keys = [
            with(Some("ab"), None, None),
            with(Some("a"), Some("b"), None),
            with(None, Some("ab"), None),
            with(None, None, Some("ab")),
            with(Some("a"), None, Some("b")),
            with(Some("ab"), None, Some("")),
            with(None, Some(""), None),
        ];
        for (i, a) in keys.iter().enumerate() {
            assert!(a.is_some());
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(keys[0], with(Some("ab"), None, None));
    }

    #[test]
    fn the_url_is_checked() {
        let with = |url: &str| {
            let mut settings = settings(1, Duration::from_secs(1), Duration::ZERO);
            settings.url = url.to_string();
            ForwardAuth::new(&settings)
        };
        let auth = with("https://auth.example/check").unwrap();
        assert_eq!(auth.url(), "https://auth.example/check");
        assert_eq!(auth.address, "auth.example:443");
        assert_eq!(auth.target, "/check");
        assert!(auth.tls);
        let auth = with("http://auth.example").unwrap();
        assert_eq!(auth.address, "auth.example:80");
        assert_eq!(auth.target, "/");
        let auth = with("http://[::1]:9000/a?b=c").unwrap();
        assert_eq!(auth.address, "[::1]:9000");
        assert_eq!(auth.sni, "::1");
        assert_eq!(auth.host, "[::1]:9000");
        assert_eq!(auth.target, "/a?b=c");
        for bad in [
            "ftp://auth.example/",
            "auth.example/check",
            "/check",
            "http://user:pw@auth.example/",
            "http://auth.example:99999/",
            "http://auth.example:0/",
            "http://auth.example:/",
            "not a url",
        ] {
            let error = with(bad).unwrap_err();
            assert!(!error.contains("pw"), "{error}");
        }
        let mut zero = settings(1, Duration::ZERO, Duration::ZERO);
        zero.url = "http://auth.example/".into();
        assert!(ForwardAuth::new(&zero).is_err());
    }
}
