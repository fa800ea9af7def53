//! The keys JWTs are verified with: a [`KeySet`] made from a JWKS document (RFC 7517) or from
//! one secret, and [`RemoteJwks`], a JWKS URL fetched at start, every `refresh`, and again when
//! a token names an unknown `kid`. The process-wide [`JwksRegistry`] keeps each URL's keys
//! across configuration reloads and says when the next fetch is due.
//!
//! Every key knows the one algorithm family it serves, and a token is only ever checked with a
//! key of its `alg`'s family. That is what defeats algorithm confusion: an HS256 token "signed"
//! with the bytes of an RSA public key never meets an HMAC key made of those bytes.

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::Uri;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How long one JWKS fetch may take, from resolving the name to the last byte of the body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document accepted; real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// A token whose `kid` picks no key is tried with at most this many keys: enough for a key
/// rotation, too few for one token to buy many signature checks.
const MAX_KEYS_TRIED: usize = 4;
/// How soon [`JwksRegistry::refresh_due`] asks to be called again while a JWKS has never been
/// fetched, so that start-up retries quickly.
const RETRY_NEVER_FETCHED: Duration = Duration::from_secs(5);
/// How soon a JWKS whose last fetch failed is tried again (unless its `refresh` is sooner).
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// The bounds of the wait [`JwksRegistry::refresh_due`] returns: not a busy loop, and a JWKS
/// registered by a reload is fetched within the upper one even if no token asks for it.
const MIN_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The DER object identifiers of the two NIST curves ring verifies, as they appear in a PEM
/// public key.
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// The algorithms one key can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyFamily {
    Hmac,
    /// RS* and PS*: the same RSA key serves both paddings.
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyFamily {
    pub(crate) fn serves(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyFamily::Hmac, HS256 | HS384 | HS512)
                | (
                    KeyFamily::Rsa,
                    RS256 | RS384 | RS512 | PS256 | PS384 | PS512
                )
                | (KeyFamily::EcP256, ES256)
                | (KeyFamily::EcP384, ES384)
                | (KeyFamily::Ed25519, EdDSA)
        )
    }
}

/// One verification key.
pub(crate) struct VerifyKey {
    family: KeyFamily,
    /// The one algorithm a JWK's `alg` restricts it to; `None`: any of its family.
    alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl VerifyKey {
    pub(crate) fn serves(&self, alg: Algorithm) -> bool {
        self.family.serves(alg) && self.alg.is_none_or(|only| only == alg)
    }
}

/// The keys a token may be checked with, by [`KeySet::select`].
pub(crate) enum KeyChoice<'a> {
    /// Keys serving the token's algorithm (never empty).
    Keys(Vec<&'a VerifyKey>),
    /// The token names a `kid` the set does not have (a JWKS may have rotated since).
    UnknownKid,
    /// No key of the set serves the token's algorithm.
    NoKeyForAlg,
}

/// Verification keys: by `kid`, and keys without one.
pub struct KeySet {
    /// In document order, so that which keys a kid-less token is tried with is predictable.
    keys: Vec<(Option<String>, VerifyKey)>,
    by_kid: HashMap<String, Vec<usize>>,
}

impl fmt::Debug for KeySet {
    // Key material never reaches a log, not even through Debug.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl KeySet {
    fn new(keys: Vec<(Option<String>, VerifyKey)>) -> KeySet {
        let mut by_kid: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, (kid, _)) in keys.iter().enumerate() {
            if let Some(kid) = kid {
                by_kid.entry(kid.clone()).or_default().push(index);
            }
        }
        KeySet { keys, by_kid }
    }

    /// The signature keys of an RFC 7517 JWKS document (`{"keys": [...]}`): kty RSA, EC (P-256,
    /// P-384), OKP (Ed25519) and oct. Keys for another `use` than `sig`, or of a kind ring cannot
    /// verify with, are skipped; a document with no usable key is an error.
    pub fn from_jwks_json(bytes: &[u8]) -> Result<KeySet, String> {
        // Parsed key by key rather than as a `JwkSet`, so that one key of an unsupported kind
        // (a provider adding a new curve) does not make the whole set unusable.
        let document: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not JSON ({e})"))?;
        let Some(entries) = document.get("keys").and_then(Value::as_array) else {
            return Err("the JWKS has no \"keys\" array".to_string());
        };
        let mut keys = Vec::with_capacity(entries.len());
        for entry in entries {
            if let Some(key) = signature_key(entry) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "the JWKS has no usable signature key (of {} keys)",
                entries.len()
            ));
        }
        Ok(KeySet::new(keys))
    }

    /// The key of a `Secret` key source: with only HS* algorithms the value's bytes are the
    /// shared HMAC key; otherwise the value is a PEM public key (RSA, EC or Ed25519) serving
    /// them. One policy cannot mix HS* with public-key algorithms.
    pub fn from_secret(value: &str, algorithms: &[Algorithm]) -> Result<KeySet, String> {
        if algorithms.is_empty() {
            return Err("the policy accepts no algorithm".to_string());
        }
        let hmac = algorithms
            .iter()
            .filter(|alg| KeyFamily::Hmac.serves(**alg))
            .count();
        let key = if hmac == algorithms.len() {
            if value.is_empty() {
                return Err("the HMAC secret is empty".to_string());
            }
            VerifyKey {
                family: KeyFamily::Hmac,
                alg: None,
                key: DecodingKey::from_secret(value.as_bytes()),
            }
        } else if hmac > 0 {
            return Err(
                "a policy cannot mix HS* algorithms with public-key ones: one secret \
                 cannot be both a shared key and a public key"
                    .to_string(),
            );
        } else {
            pem_public_key(value, algorithms)?
        };
        if !algorithms.iter().any(|alg| key.serves(*alg)) {
            return Err(format!(
                "the secret's key serves none of the algorithms {}",
                algorithm_names(algorithms)
            ));
        }
        Ok(KeySet::new(vec![(None, key)]))
    }

    /// How many keys the set has.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys a token with this `kid` and `alg` may be checked with. A `kid` the set lacks
    /// falls back to the keys without one (a shared secret has none, yet its tokens may name
    /// one); a token without `kid` is tried with the kid-less keys, or with the first few.
    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> KeyChoice<'_> {
        let kidless = self.keys.iter().any(|(kid, _)| kid.is_none());
        let keys: Vec<&VerifyKey> = match kid.map(|kid| self.by_kid.get(kid)) {
            Some(Some(indexes)) => indexes
                .iter()
                .filter_map(|i| self.keys.get(*i))
                .map(|(_, key)| key)
                .filter(|key| key.serves(alg))
                .collect(),
            Some(None) if !kidless => return KeyChoice::UnknownKid,
            _ => self
                .keys
                .iter()
                .filter(|(kid, _)| !kidless || kid.is_none())
                .map(|(_, key)| key)
                .filter(|key| key.serves(alg))
                .take(MAX_KEYS_TRIED)
                .collect(),
        };
        if keys.is_empty() {
            KeyChoice::NoKeyForAlg
        } else {
            KeyChoice::Keys(keys)
        }
    }
}

/// The verification key of one JWKS entry, with its `kid`; `None` for an entry that is not a
/// usable signature key.
fn signature_key(entry: &Value) -> Option<(Option<String>, VerifyKey)> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return None;
    }
    if common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => KeyFamily::EcP256,
            EllipticCurve::P384 => KeyFamily::EcP384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            KeyFamily::Ed25519
        }
        AlgorithmParameters::OctetKeyPair(_) => return None,
        AlgorithmParameters::OctetKey(oct) if oct.value.is_empty() => return None,
        AlgorithmParameters::OctetKey(_) => KeyFamily::Hmac,
    };
    // A declared encryption algorithm (RSA-OAEP...) parses as no `Algorithm`: not a signature
    // key, whatever its `use` says.
    let alg = match common.key_algorithm {
        None => None,
        Some(declared) => Some(declared.to_string().parse::<Algorithm>().ok()?),
    };
    if alg.is_some_and(|alg| !family.serves(alg)) {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some((common.key_id.clone(), VerifyKey { family, alg, key }))
}

/// A PEM public key serving some of `algorithms` (none of them HS*).
fn pem_public_key(value: &str, algorithms: &[Algorithm]) -> Result<VerifyKey, String> {
    if value.contains("PRIVATE KEY") {
        // jsonwebtoken would take an RSA private key and fail every signature with it; and a
        // private key has no business at the edge.
        return Err("the secret is a private key; give the gateway the public key".to_string());
    }
    let wants = |family: KeyFamily| algorithms.iter().any(|alg| family.serves(*alg));
    let pem = value.as_bytes();
    let rsa = || Some((KeyFamily::Rsa, DecodingKey::from_rsa_pem(pem).ok()?));
    let ec = || {
        let key = DecodingKey::from_ec_pem(pem).ok()?;
        // jsonwebtoken does not tell the curves apart; the PEM's curve OID does.
        let der = pem_der(value)?;
        let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
        let family = if has(OID_P256) {
            KeyFamily::EcP256
        } else if has(OID_P384) {
            KeyFamily::EcP384
        } else {
            return None;
        };
        Some((family, key))
    };
    let ed = || Some((KeyFamily::Ed25519, DecodingKey::from_ed_pem(pem).ok()?));
    let found = None
        .or_else(|| wants(KeyFamily::Rsa).then(rsa).flatten())
        .or_else(|| {
            (wants(KeyFamily::EcP256) || wants(KeyFamily::EcP384))
                .then(ec)
                .flatten()
        })
        .or_else(|| wants(KeyFamily::Ed25519).then(ed).flatten());
    match found {
        Some((family, key)) => Ok(VerifyKey {
            family,
            alg: None,
            key,
        }),
        None => Err(format!(
            "the secret is not a PEM public key for {}",
            algorithm_names(algorithms)
        )),
    }
}

/// The DER bytes of the first PEM block of `pem`.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|line| !line.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END"))
        .collect();
    STANDARD.decode(body).ok()
}

pub(crate) fn algorithm_names(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|alg| format!("{alg:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

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

/// Test keys, JWKS documents made from them, signed tokens and a tiny JWKS server, for the
/// tests of this module and of `jwt`.
#[cfg(test)]
pub(crate) mod test_keys {
    use super::pem_der;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{SystemTime, UNIX_EPOCH};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    pub(crate) const RSA_PRIVATE: &str = include_str!("../../tests/fixtures/auth/rsa-private.pem");
    pub(crate) const RSA_PUBLIC: &str = include_str!("../../tests/fixtures/auth/rsa-public.pem");
    pub(crate) const RSA2_PRIVATE: &str =
        include_str!("../../tests/fixtures/auth/rsa2-private.pem");
    pub(crate) const EC256_PRIVATE: &str =
        include_str!("../../tests/fixtures/auth/ec256-private.pem");
    pub(crate) const EC256_PUBLIC: &str =
        include_str!("../../tests/fixtures/auth/ec256-public.pem");
    pub(crate) const EC384_PRIVATE: &str =
        include_str!("../../tests/fixtures/auth/ec384-private.pem");
    pub(crate) const EC384_PUBLIC: &str =
        include_str!("../../tests/fixtures/auth/ec384-public.pem");
    pub(crate) const ED25519_PRIVATE: &str =
        include_str!("../../tests/fixtures/auth/ed25519-private.pem");
    pub(crate) const ED25519_PUBLIC: &str =
        include_str!("../../tests/fixtures/auth/ed25519-public.pem");
    pub(crate) const HMAC_SECRET: &str = "a test-only shared secret of 32+ bytes";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn der(pem: &str) -> Vec<u8> {
        pem_der(pem).expect("a PEM fixture")
    }

    pub(crate) fn rsa_jwk(private_pem: &str, kid: &str) -> Value {
        let pair = RsaKeyPair::from_pkcs8(&der(private_pem)).expect("an RSA PKCS#8 key");
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        json!({"kty": "RSA", "use": "sig", "kid": kid, "n": b64(&public.n), "e": b64(&public.e)})
    }

    pub(crate) fn ec_jwk(private_pem: &str, p384: bool, kid: &str) -> Value {
        let (alg, crv, half) = if p384 {
            (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
        } else {
            (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
        };
        let pair = EcdsaKeyPair::from_pkcs8(alg, &der(private_pem), &SystemRandom::new())
            .expect("an EC PKCS#8 key");
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        json!({
            "kty": "EC", "crv": crv, "kid": kid,
            "x": b64(&point[1..1 + half]), "y": b64(&point[1 + half..]),
        })
    }

    pub(crate) fn ed_jwk(private_pem: &str, kid: &str) -> Value {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der(private_pem))
            .expect("an Ed25519 PKCS#8 key");
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key().as_ref())})
    }

    pub(crate) fn oct_jwk(secret: &str, kid: &str) -> Value {
        json!({"kty": "oct", "kid": kid, "k": b64(secret.as_bytes())})
    }

    pub(crate) fn jwks(keys: &[Value]) -> Vec<u8> {
        json!({ "keys": keys }).to_string().into_bytes()
    }

    pub(crate) fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    /// Claims of a token for `alice`, valid for ten minutes.
    pub(crate) fn claims() -> Value {
        json!({"sub": "alice", "exp": now() + 600, "iat": now(), "team": "red"})
    }

    pub(crate) fn encoding_key(alg: Algorithm, private: &str) -> EncodingKey {
        use Algorithm::*;
        match alg {
            HS256 | HS384 | HS512 => EncodingKey::from_secret(private.as_bytes()),
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
                EncodingKey::from_rsa_pem(private.as_bytes()).expect("an RSA key")
            }
            ES256 | ES384 => EncodingKey::from_ec_pem(private.as_bytes()).expect("an EC key"),
            EdDSA => EncodingKey::from_ed_pem(private.as_bytes()).expect("an Ed25519 key"),
        }
    }

    /// A token of `claims` signed with `private` (a PEM private key, or the HMAC secret).
    pub(crate) fn sign(alg: Algorithm, private: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &encoding_key(alg, private)).expect("signed")
    }

    /// A JWKS server on 127.0.0.1 answering every request with `body` (or 500 when `None`).
    pub(crate) struct JwksServer {
        pub(crate) url: String,
        pub(crate) body: Arc<Mutex<Option<Vec<u8>>>>,
        pub(crate) requests: Arc<AtomicUsize>,
        pub(crate) last_request: Arc<Mutex<String>>,
    }

    impl JwksServer {
        pub(crate) fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        pub(crate) fn serve(&self, body: Option<Vec<u8>>) {
            *self.body.lock().expect("unpoisoned") = body;
        }
    }

    pub(crate) async fn jwks_server(body: Vec<u8>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bound");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("an address")
        );
        let server = JwksServer {
            url,
            body: Arc::new(Mutex::new(Some(body))),
            requests: Arc::new(AtomicUsize::new(0)),
            last_request: Arc::new(Mutex::new(String::new())),
        };
        let (body, requests, last) = (
            server.body.clone(),
            server.requests.clone(),
            server.last_request.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (body, requests, last) = (body.clone(), requests.clone(), last.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    *last.lock().expect("unpoisoned") = String::from_utf8_lossy(&request).into();
                    let body = body.lock().expect("unpoisoned").clone();
                    let answer = match body {
                        Some(body) => {
                            let mut answer = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            answer.extend_from_slice(&body);
                            answer
                        }
                        None => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\
                                  Connection: close\r\n\r\n"
                            .to_vec(),
                    };
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        server
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::*;
    use super::*;
    use serde_json::json;
    use tokio::net::TcpListener;

    fn families(set: &KeySet) -> Vec<(Option<String>, KeyFamily)> {
        set.keys
            .iter()
            .map(|(kid, key)| (kid.clone(), key.family))
            .collect()
    }

    #[test]
    fn jwks_of_every_key_type() {
        let doc = jwks(&[
            rsa_jwk(RSA_PRIVATE, "rsa"),
            ec_jwk(EC256_PRIVATE, false, "p256"),
            ec_jwk(EC384_PRIVATE, true, "p384"),
            ed_jwk(ED25519_PRIVATE, "ed"),
            oct_jwk(HMAC_SECRET, "oct"),
        ]);
        let set = KeySet::from_jwks_json(&doc).expect("a key set");
        assert_eq!(set.len(), 5);
        assert_eq!(
            families(&set),
            vec![
                (Some("rsa".into()), KeyFamily::Rsa),
                (Some("p256".into()), KeyFamily::EcP256),
                (Some("p384".into()), KeyFamily::EcP384),
                (Some("ed".into()), KeyFamily::Ed25519),
                (Some("oct".into()), KeyFamily::Hmac),
            ]
        );
    }

    #[test]
    fn jwks_skips_what_is_not_a_signature_key() {
        let mut enc = rsa_jwk(RSA_PRIVATE, "enc");
        enc["use"] = json!("enc");
        let mut oaep = rsa_jwk(RSA_PRIVATE, "oaep");
        oaep["alg"] = json!("RSA-OAEP");
        oaep.as_object_mut().map(|o| o.remove("use"));
        let mut wrap_only = oct_jwk(HMAC_SECRET, "wrap");
        wrap_only["key_ops"] = json!(["wrapKey"]);
        let mut mismatched = ec_jwk(EC256_PRIVATE, false, "says-es384");
        mismatched["alg"] = json!("ES384");
        let doc = jwks(&[
            enc,
            oaep,
            wrap_only,
            mismatched,
            json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
            json!({"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": "AA"}),
            json!({"kty": "future", "kid": "new"}),
            json!({"kty": "oct", "kid": "empty", "k": ""}),
            ec_jwk(EC256_PRIVATE, false, "good"),
        ]);
        let set = KeySet::from_jwks_json(&doc).expect("one usable key");
        assert_eq!(
            families(&set),
            vec![(Some("good".into()), KeyFamily::EcP256)]
        );
    }

    #[test]
    fn jwks_with_an_alg_serves_only_that_alg() {
        let mut key = rsa_jwk(RSA_PRIVATE, "rs");
        key["alg"] = json!("RS256");
        let set = KeySet::from_jwks_json(&jwks(&[key])).expect("a key set");
        assert!(matches!(
            set.select(Some("rs"), Algorithm::RS256),
            KeyChoice::Keys(_)
        ));
        assert!(matches!(
            set.select(Some("rs"), Algorithm::PS256),
            KeyChoice::NoKeyForAlg
        ));
    }

    #[test]
    fn unusable_jwks_documents_are_errors_without_key_material() {
        let secret_b64 = "c2VjcmV0LWtleS1tYXRlcmlhbA";
        let only_enc = json!({"keys": [{"kty": "oct", "use": "enc", "k": secret_b64}]});
        for doc in [
            b"".to_vec(),
            b"not json".to_vec(),
            b"{}".to_vec(),
            b"{\"keys\": {}}".to_vec(),
            b"{\"keys\": []}".to_vec(),
            only_enc.to_string().into_bytes(),
        ] {
            let error = KeySet::from_jwks_json(&doc).expect_err("no usable key");
            assert!(error.starts_with("the JWKS"), "{error}");
            assert!(!error.contains(secret_b64), "{error}");
        }
    }

    #[test]
    fn secrets_become_hmac_or_pem_keys() {
        let hmac = KeySet::from_secret(HMAC_SECRET, &[Algorithm::HS256, Algorithm::HS512])
            .expect("an HMAC key");
        assert_eq!(families(&hmac), vec![(None, KeyFamily::Hmac)]);
        let cases = [
            (
                RSA_PUBLIC,
                vec![Algorithm::RS256, Algorithm::PS256],
                KeyFamily::Rsa,
            ),
            (EC256_PUBLIC, vec![Algorithm::ES256], KeyFamily::EcP256),
            (EC384_PUBLIC, vec![Algorithm::ES384], KeyFamily::EcP384),
            (
                EC256_PUBLIC,
                vec![Algorithm::ES256, Algorithm::ES384],
                KeyFamily::EcP256,
            ),
            (ED25519_PUBLIC, vec![Algorithm::EdDSA], KeyFamily::Ed25519),
            (
                ED25519_PUBLIC,
                vec![Algorithm::RS256, Algorithm::EdDSA],
                KeyFamily::Ed25519,
            ),
        ];
        for (pem, algorithms, family) in cases {
            let set = KeySet::from_secret(pem, &algorithms).expect("a PEM key");
            assert_eq!(families(&set), vec![(None, family)], "{algorithms:?}");
        }
    }

    #[test]
    fn bad_secrets_are_refused() {
        let cases: [(&str, &[Algorithm], &str); 7] = [
            (HMAC_SECRET, &[], "no algorithm"),
            ("", &[Algorithm::HS256], "empty"),
            (
                HMAC_SECRET,
                &[Algorithm::HS256, Algorithm::RS256],
                "cannot mix",
            ),
            (RSA_PRIVATE, &[Algorithm::RS256], "private key"),
            (
                EC256_PUBLIC,
                &[Algorithm::RS256],
                "not a PEM public key for RS256",
            ),
            (EC256_PUBLIC, &[Algorithm::ES384], "serves none"),
            (HMAC_SECRET, &[Algorithm::EdDSA], "not a PEM public key"),
        ];
        for (value, algorithms, why) in cases {
            let error = KeySet::from_secret(value, algorithms).expect_err("refused");
            assert!(error.contains(why), "{error}");
            assert!(!error.contains("MII"), "key material in: {error}");
            assert!(!error.contains(HMAC_SECRET), "secret in: {error}");
        }
    }

    #[test]
    fn keys_are_selected_by_kid_and_family() {
        let mut anonymous = oct_jwk(HMAC_SECRET, "x");
        anonymous.as_object_mut().map(|o| o.remove("kid"));
        let set = KeySet::from_jwks_json(&jwks(&[
            rsa_jwk(RSA_PRIVATE, "a"),
            rsa_jwk(RSA2_PRIVATE, "b"),
        ]))
        .expect("a key set");
        let count = |choice: KeyChoice<'_>| match choice {
            KeyChoice::Keys(keys) => Some(keys.len()),
            _ => None,
        };
        assert_eq!(count(set.select(Some("a"), Algorithm::RS256)), Some(1));
        assert!(matches!(
            set.select(Some("c"), Algorithm::RS256),
            KeyChoice::UnknownKid
        ));
        assert!(matches!(
            set.select(Some("a"), Algorithm::HS256),
            KeyChoice::NoKeyForAlg
        ));
        // No kid and no kid-less key: the first few keys of its family.
        assert_eq!(count(set.select(None, Algorithm::RS256)), Some(2));
        assert!(matches!(
            set.select(None, Algorithm::ES256),
            KeyChoice::NoKeyForAlg
        ));

        let mixed = KeySet::from_jwks_json(&jwks(&[rsa_jwk(RSA_PRIVATE, "a"), anonymous]))
            .expect("a key set");
        // An unknown kid falls back to the kid-less keys rather than asking for a refetch.
        assert_eq!(count(mixed.select(Some("zz"), Algorithm::HS256)), Some(1));
        assert!(matches!(
            mixed.select(Some("zz"), Algorithm::RS256),
            KeyChoice::NoKeyForAlg
        ));
        assert_eq!(count(mixed.select(None, Algorithm::HS256)), Some(1));
    }

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

        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bound");
        let url = format!("http://{}/jwks", closed.local_addr().expect("an address"));
        drop(closed);
        let remote = RemoteJwks::new(&url, Duration::from_secs(60), Duration::ZERO).expect("a URL");
        let error = remote.refresh().await.expect_err("refused");
        assert!(error.contains(&url), "{error}");
        assert_eq!(remote.fetch_failures(), 1);
        assert!(remote.keys().is_none() && remote.age().is_none());
    }

    #[tokio::test]
    async fn unknown_kid_refetches_are_rate_limited_and_shared() {
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let remote = RemoteJwks::new(
            &server.url,
            Duration::from_secs(600),
            Duration::from_secs(60),
        )
        .expect("a URL");
        remote.refresh().await.expect("fetched");
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

        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bound");
        let down_url = format!("http://{}/jwks", closed.local_addr().expect("an address"));
        drop(closed);
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
