//! Test keys, JWKS documents made from them, signed tokens, a tiny JWKS server and a port
//! where nothing listens, for the tests of the auth modules.

use super::jwks::pem_der;
use super::jwks_remote::RemoteJwks;
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
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub(crate) const RSA_PRIVATE: &str = include_str!("../../tests/fixtures/auth/rsa-private.pem");
pub(crate) const RSA_PUBLIC: &str = include_str!("../../tests/fixtures/auth/rsa-public.pem");
pub(crate) const RSA2_PRIVATE: &str = include_str!("../../tests/fixtures/auth/rsa2-private.pem");
pub(crate) const EC256_PRIVATE: &str = include_str!("../../tests/fixtures/auth/ec256-private.pem");
pub(crate) const EC256_PUBLIC: &str = include_str!("../../tests/fixtures/auth/ec256-public.pem");
pub(crate) const EC384_PRIVATE: &str = include_str!("../../tests/fixtures/auth/ec384-private.pem");
pub(crate) const EC384_PUBLIC: &str = include_str!("../../tests/fixtures/auth/ec384-public.pem");
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

/// A loopback port where nothing listens (bound, then let go).
pub(crate) fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
    listener.local_addr().expect("an address").port()
}

/// An http URL of `path` on a loopback port where nothing listens.
pub(crate) fn closed_url(path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", closed_port())
}

/// The JWKS at `url` (refreshed every ten minutes, refetched for an unknown kid at most once
/// per `min_refetch`), fetched once.
pub(crate) async fn fetched_jwks(url: &str, min_refetch: Duration) -> Arc<RemoteJwks> {
    let remote = RemoteJwks::new(url, Duration::from_secs(600), min_refetch).expect("a URL");
    remote.refresh().await.expect("fetched");
    remote
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
