//! [`RemoteJwks`]: a JWKS URL fetched at start, every `refresh`, and again when a token names
//! an unknown `kid`. The process-wide [`JwksRegistry`] keeps each URL's keys across
//! configuration reloads and says when the next fetch is due. The keys themselves are a
//! [`KeySet`] of [`super::jwks`].

use super::jwks::KeySet;
use arc_swap::ArcSwapOption;
use http::Uri;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How long one JWKS fetch may take, from resolving the name to the last byte of the body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document accepted; real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How soon [`JwksRegistry::refresh_due`] asks to be called again while a JWKS has never been
/// fetched, so that start-up retries quickly.
const RETRY_NEVER_FETCHED: Duration = Duration::from_secs(5);
/// How soon a JWKS whose last fetch failed is tried again (unless its `refresh` is sooner).
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// The bounds of the wait [`JwksRegistry::refresh_due`] returns: not a busy loop, and a JWKS
/// registered by a reload is fetched within the upper one even if no token asks for it.
const MIN_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Where a JWKS URL points.
#[derive(Debug)]
struct Target {
    tls: bool,
    /// The name to resolve and the TLS SNI: without an IPv6 literal's brackets.
    host: String,
    port: u16,
    /// The `Host` header: as the URL spells it.
    authority: String,
    path: String,
}

fn parse_target(url: &str) -> Result<Target, String> {
    // Neither is echoed: the part before an '@' would be a password.
    let uri: Uri = url
        .parse()
        .map_err(|_| "the JWKS URL is not a URL".to_string())?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("a JWKS URL cannot carry user:password@".to_string());
    }
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("the JWKS URL {url} is not http:// or https://")),
    };
    let Some(authority) = uri.authority() else {
        return Err(format!("the JWKS URL {url} has no host"));
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("the JWKS URL {url} has no host"));
    }
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        Some(path) if !path.is_empty() => path.to_string(),
        _ => "/".to_string(),
    };
    Ok(Target {
        tls,
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        authority: authority.as_str().to_string(),
        path,
    })
}

/// One HTTP client for every JWKS: made on the first fetch, since it reads the platform's CA
/// certificates.
fn connector() -> &'static Connector {
    static CONNECTOR: OnceLock<Connector> = OnceLock::new();
    CONNECTOR.get_or_init(|| Connector::new(None))
}

#[derive(Debug)]
struct FetchState {
    refresh: Duration,
    min_refetch: Duration,
    last_attempt: Option<Instant>,
    last_success: Option<Instant>,
    last_failed: bool,
}

/// A JWKS URL and the keys last fetched from it.
#[derive(Debug)]
pub struct RemoteJwks {
    url: String,
    target: Target,
    /// The last good set: a failed fetch keeps it.
    keys: ArcSwapOption<KeySet>,
    /// Counts successful fetches, so that callers who queued behind a refetch see it happened.
    generation: AtomicU64,
    failures: AtomicU64,
    state: Mutex<FetchState>,
    /// Held through an unknown-kid refetch, and when it last started: one refetch at a time, at
    /// most one per `min_refetch`.
    refetch_gate: tokio::sync::Mutex<Option<Instant>>,
}

impl RemoteJwks {
    /// A JWKS at `url` (http:// or https://), not fetched yet.
    pub fn new(url: &str, refresh: Duration, min_refetch: Duration) -> Result<Arc<Self>, String> {
        Ok(Arc::new(RemoteJwks {
            url: url.to_string(),
            target: parse_target(url)?,
            keys: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            state: Mutex::new(FetchState {
                refresh,
                min_refetch,
                last_attempt: None,
                last_success: None,
                last_failed: false,
            }),
            refetch_gate: tokio::sync::Mutex::new(None),
        }))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The keys of the last successful fetch; `None` before the first.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    pub fn refresh_interval(&self) -> Duration {
        self.state().refresh
    }

    /// How many fetches failed since start.
    pub fn fetch_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The time since the last successful fetch; `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        self.state().last_success.map(|at| at.elapsed())
    }

    fn state(&self) -> MutexGuard<'_, FetchState> {
        // Plain durations and timestamps: still good after a panic elsewhere.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches the JWKS now: on success its keys replace the old ones; on failure the old ones
    /// stay and the failure is counted.
    pub async fn refresh(&self) -> Result<(), String> {
        self.state().last_attempt = Some(Instant::now());
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(fetched) => fetched,
            Err(_) => Err(format!(
                "fetching the JWKS at {} took over {} s",
                self.url,
                FETCH_TIMEOUT.as_secs()
            )),
        };
        match fetched {
            Ok(keys) => {
                self.keys.store(Some(Arc::new(keys)));
                self.generation.fetch_add(1, Ordering::AcqRel);
                let mut state = self.state();
                state.last_success = Some(Instant::now());
                state.last_failed = false;
                Ok(())
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.state().last_failed = true;
                Err(e)
            }
        }
    }

    /// Fetches the JWKS again because a token named a `kid` it lacks, unless a fetch for that
    /// reason started less than `min_refetch` ago. Concurrent callers wait for one fetch rather
    /// than each making their own. Whether new keys arrived meanwhile.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last = self.refetch_gate.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            // Fetched while this caller queued: by the refetch it waited for, or a refresh.
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < self.state().min_refetch) {
            return false;
        }
        *last = Some(Instant::now());
        self.refresh().await.is_ok()
    }

    /// How long until this JWKS is due for a refresh (zero: now), and whether it was ever
    /// fetched. One never fetched is always due; one whose last fetch failed is retried sooner.
    fn due_in(&self, now: Instant) -> (Duration, bool) {
        let state = self.state();
        match (state.last_attempt, state.last_success) {
            (Some(attempt), Some(_)) => {
                let retry = if state.last_failed {
                    RETRY_FAILED
                } else {
                    state.refresh
                };
                let due = (attempt + state.refresh.min(retry)).saturating_duration_since(now);
                (due, true)
            }
            _ => (Duration::ZERO, false),
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let url = &self.url;
        let target = &self.target;
        let address = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("the JWKS host of {url} does not resolve ({e})"))?
            .next()
            .ok_or_else(|| format!("the JWKS host of {url} resolves to no address"))?;
        let mut peer = HttpPeer::new(address, target.tls, target.host.clone());
        peer.options.connection_timeout = Some(FETCH_TIMEOUT);
        peer.options.total_connection_timeout = Some(FETCH_TIMEOUT);
        peer.options.read_timeout = Some(FETCH_TIMEOUT);
        let failed = |e: Box<pingora::Error>| format!("fetching the JWKS at {url} failed ({e})");
        let (mut session, _reused) = connector().get_http_session(&peer).await.map_err(failed)?;
        let mut request =
            RequestHeader::build("GET", target.path.as_bytes(), None).map_err(failed)?;
        for (name, value) in [
            (http::header::HOST, target.authority.as_str()),
            (http::header::ACCEPT, "application/json"),
            (http::header::USER_AGENT, "agent-gateway"),
        ] {
            request.insert_header(name, value).map_err(failed)?;
        }
        session
            .write_request_header(Box::new(request))
            .await
            .map_err(failed)?;
        session.finish_request_body().await.map_err(failed)?;
        session.read_response_header().await.map_err(failed)?;
        let status = session
            .response_header()
            .map(|header| header.status.as_u16())
            .unwrap_or(0);
        if status != 200 {
            // The body is not read, let alone quoted: the URL and status say enough.
            return Err(format!("the JWKS at {url} answered HTTP {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = session.read_response_body().await.map_err(failed)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS at {url} is larger than 1 MiB"));
            }
            body.extend_from_slice(&chunk);
        }
        // Not returned to the pool: fetches are minutes apart, and a stale pooled connection
        // would only turn the next one into a failure.
        drop(session);
        KeySet::from_jwks_json(&body).map_err(|e| format!("the JWKS at {url}: {e}"))
    }
}

/// Every JWKS URL of the running configurations. It lives as long as the process, so that a
/// reload naming the same URL keeps its keys; it holds them weakly, so that a URL no
/// configuration names any more stops being fetched once the last such configuration is gone.
#[derive(Debug, Default)]
pub struct JwksRegistry {
    entries: Mutex<HashMap<String, Weak<RemoteJwks>>>,
}

impl JwksRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Weak<RemoteJwks>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The JWKS for `url`: the one already registered (with the intervals updated), so that
    /// its keys survive a reload, or a new one.
    pub fn register(
        &self,
        url: &str,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Arc<RemoteJwks>, String> {
        let mut entries = self.entries();
        entries.retain(|_, jwks| jwks.strong_count() > 0);
        if let Some(existing) = entries.get(url).and_then(Weak::upgrade) {
            let mut state = existing.state();
            (state.refresh, state.min_refetch) = (refresh, min_refetch);
            drop(state);
            return Ok(existing);
        }
        let jwks = RemoteJwks::new(url, refresh, min_refetch)?;
        entries.insert(url.to_string(), Arc::downgrade(&jwks));
        Ok(jwks)
    }

    /// Every registered JWKS still in use.
    pub fn all(&self) -> Vec<Arc<RemoteJwks>> {
        self.entries().values().filter_map(Weak::upgrade).collect()
    }

    /// Refreshes every JWKS that is due (its `refresh` elapsed since the last attempt, or it
    /// was never fetched), logging failures, and returns how long until the next is due:
    /// between 1 and 30 s, and at most 5 s while one was never fetched.
    pub async fn refresh_due(&self) -> Duration {
        let all = self.all();
        let now = Instant::now();
        let due = all.iter().filter(|jwks| jwks.due_in(now).0.is_zero());
        let results = futures_util::future::join_all(due.map(|jwks| jwks.refresh())).await;
        for e in results.into_iter().filter_map(Result::err) {
            // The error names the URL and the cause, never the body.
            log::warn!("{e}; keeping the keys fetched before, if any");
        }
        let now = Instant::now();
        let next = all.iter().map(|jwks| match jwks.due_in(now) {
            (due, true) => due,
            (_, false) => RETRY_NEVER_FETCHED,
        });
        next.fold(MAX_WAIT, Duration::min).max(MIN_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_keys::*;
    use super::*;

    #[test]
    fn remote_urls_are_validated() {
        for bad in [
            "",
            "jwks.json",
            "ftp://idp.example/jwks.json",
            "https:///jwks.json",
            "https://user:pw@idp.example/jwks.json",
        ] {
            let error = RemoteJwks::new(bad, Duration::from_secs(60), Duration::from_secs(1))
                .expect_err(bad);
            assert!(!error.contains("pw"), "{error}");
        }
        let jwks = RemoteJwks::new(
            "https://[::1]:8443/keys?v=1",
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .expect("a URL");
        assert_eq!(jwks.target.host, "::1");
        assert_eq!(jwks.target.authority, "[::1]:8443");
        assert_eq!(jwks.target.path, "/keys?v=1");
        let plain =
            RemoteJwks::new("http://idp.example", Duration::ZERO, Duration::ZERO).expect("a URL");
        assert_eq!((plain.target.port, plain.target.path.as_str()), (80, "/"));
        assert!(plain.keys().is_none() && plain.age().is_none());
    }

    #[tokio::test]
    async fn remote_jwks_fetches_and_keeps_keys_through_failures() {
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let remote =
            RemoteJwks::new(&server.url, Duration::from_secs(60), Duration::ZERO).expect("a URL");
        remote.refresh().await.expect("fetched");
        assert_eq!(remote.keys().map(|keys| keys.len()), Some(1));
        assert!(remote.age().is_some_and(|age| age < Duration::from_secs(5)));
        let request = server.last_request.lock().expect("unpoisoned").clone();
        assert!(
            request.starts_with("GET /.well-known/jwks.json HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request
            .to_ascii_lowercase()
            .contains("accept: application/json"));
        let host = server.url.trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or_default();
        assert!(request
            .to_ascii_lowercase()
            .contains(&format!("host: {host}")));

        server.serve(None);
        let error = remote.refresh().await.expect_err("a 500");
        assert!(
            error.contains("HTTP 500") && error.contains(&server.url),
            "{error}"
        );
        server.serve(Some(b"{\"keys\": []}".to_vec()));
        remote.refresh().await.expect_err("no keys");
        assert_eq!(remote.fetch_failures(), 2);
        assert_eq!(
            remote.keys().map(|keys| keys.len()),
            Some(1),
            "old keys kept"
        );
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn oversized_and_unreachable_jwks_fail() {
        let server = jwks_server(vec![b' '; MAX_JWKS_BYTES + 1]).await;
        let remote =
            RemoteJwks::new(&server.url, Duration::from_secs(60), Duration::ZERO).expect("a URL");
        let error = remote.refresh().await.expect_err("too large");
        assert!(error.contains("larger than 1 MiB"), "{error}");

        let url = closed_url("/jwks");
        let remote = RemoteJwks::new(&url, Duration::from_secs(60), Duration::ZERO).expect("a URL");
        let error = remote.refresh().await.expect_err("refused");
        assert!(error.contains(&url), "{error}");
        assert_eq!(remote.fetch_failures(), 1);
        assert!(remote.keys().is_none() && remote.age().is_none());
    }

    #[tokio::test]
    async fn unknown_kid_refetches_are_rate_limited_and_shared() {
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let remote = fetched_jwks(&server.url, Duration::from_secs(60)).await;
        // Twenty callers at once: one fetch, and every one of them learns it happened.
        let results =
            futures_util::future::join_all((0..20).map(|_| remote.refetch_for_unknown_kid())).await;
        assert_eq!(server.requests(), 2);
        assert!(results.iter().all(|fetched| *fetched), "{results:?}");
        // Within min_refetch: no more fetches.
        for _ in 0..5 {
            assert!(!remote.refetch_for_unknown_kid().await);
        }
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn registry_shares_and_forgets_jwks() {
        let registry = JwksRegistry::new();
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let first = registry
            .register(&server.url, Duration::from_secs(60), Duration::from_secs(1))
            .expect("registered");
        let again = registry
            .register(
                &server.url,
                Duration::from_secs(120),
                Duration::from_secs(1),
            )
            .expect("registered");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.refresh_interval(), Duration::from_secs(120));
        assert!(registry
            .register("gopher://x", Duration::ZERO, Duration::ZERO)
            .is_err());

        let down_url = closed_url("/jwks");
        let down = registry
            .register(&down_url, Duration::from_secs(60), Duration::from_secs(1))
            .expect("registered");
        assert_eq!(registry.all().len(), 2);

        // Both never fetched: both fetched now; the failed one brings the next call within 5 s.
        let wait = registry.refresh_due().await;
        assert_eq!(server.requests(), 1);
        assert!(first.keys().is_some());
        assert_eq!(down.fetch_failures(), 1);
        assert!(wait >= MIN_WAIT && wait <= RETRY_NEVER_FETCHED, "{wait:?}");
        // The fetched one is not due again; the never-fetched one is retried.
        registry.refresh_due().await;
        assert_eq!(server.requests(), 1);
        assert_eq!(down.fetch_failures(), 2);

        drop((down, again));
        let wait = registry.refresh_due().await;
        assert_eq!(registry.all().len(), 1);
        assert!(wait > RETRY_NEVER_FETCHED && wait <= MAX_WAIT, "{wait:?}");
        drop(first);
        assert!(registry.all().is_empty());
        assert_eq!(registry.refresh_due().await, MAX_WAIT);
    }
}
