//! What authenticating one WebSocket upgrade costs at the edge: a JWT verification per
//! algorithm, the token-cache hit that spares a reconnecting client that verification, and an
//! API-key lookup.
//! Tokens carry a typical claim set and are signed with the test-only keys of
//! `tests/fixtures/auth/`.

use agent_gateway::auth::api_key::ApiKeyTable;
use agent_gateway::auth::jwks::KeySet;
use agent_gateway::auth::jwt::{JwtKeys, JwtVerifier};
use agent_gateway::auth::token_cache::TokenCache;
use agent_gateway::auth::Identity;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const HMAC_SECRET: &str = "a test-only shared secret of 32+ bytes";
const RSA_PRIVATE: &str = include_str!("../tests/fixtures/auth/rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("../tests/fixtures/auth/rsa-public.pem");
const EC256_PRIVATE: &str = include_str!("../tests/fixtures/auth/ec256-private.pem");
const EC256_PUBLIC: &str = include_str!("../tests/fixtures/auth/ec256-public.pem");
const EC384_PRIVATE: &str = include_str!("../tests/fixtures/auth/ec384-private.pem");
const EC384_PUBLIC: &str = include_str!("../tests/fixtures/auth/ec384-public.pem");
const ED25519_PRIVATE: &str = include_str!("../tests/fixtures/auth/ed25519-private.pem");
const ED25519_PUBLIC: &str = include_str!("../tests/fixtures/auth/ed25519-public.pem");

fn signed(alg: Algorithm, private: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let claims = json!({
        "sub": "user-1234", "iss": "https://idp.example", "aud": "gateway",
        "iat": now, "exp": now + 3600, "scope": "agents:chat", "instance": "room-42",
    });
    let key = match alg {
        Algorithm::HS256 => Ok(EncodingKey::from_secret(private.as_bytes())),
        Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(private.as_bytes()),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(private.as_bytes()),
        _ => EncodingKey::from_ed_pem(private.as_bytes()),
    }
    .unwrap_or_else(|e| panic!("{alg:?} key: {e}"));
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap_or_else(|e| panic!("{e}"))
}

fn verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("auth_verify");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("HS256", Algorithm::HS256, HMAC_SECRET, HMAC_SECRET),
        ("RS256", Algorithm::RS256, RSA_PRIVATE, RSA_PUBLIC),
        ("PS256", Algorithm::PS256, RSA_PRIVATE, RSA_PUBLIC),
        ("ES256", Algorithm::ES256, EC256_PRIVATE, EC256_PUBLIC),
        ("ES384", Algorithm::ES384, EC384_PRIVATE, EC384_PUBLIC),
        ("EdDSA", Algorithm::EdDSA, ED25519_PRIVATE, ED25519_PUBLIC),
    ];
    for (name, alg, private, public) in cases {
        let keys = Arc::new(KeySet::from_secret(public, &[alg]).unwrap_or_else(|e| panic!("{e}")));
        let verifier = JwtVerifier::from_parts(
            &[alg],
            JwtKeys::Static(keys.clone()),
            &["https://idp.example".to_string()],
            &["gateway".to_string()],
            Duration::from_secs(30),
        );
        let token = signed(alg, private);
        let identity = verifier
            .verify_with_keys(&keys, &token)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(identity.subject, "user-1234");
        group.bench_function(format!("jwt_{name}"), |b| {
            b.iter(|| verifier.verify_with_keys(&keys, black_box(&token)))
        });
    }

    // A reconnecting client: its token was verified moments ago.
    let cache = TokenCache::new(100_000);
    let token = signed(Algorithm::ES256, EC256_PRIVATE);
    let identity = Identity {
        subject: "user-1234".to_string(),
        claims: json!({"sub": "user-1234", "scope": "agents:chat"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
    };
    cache.put(&token, &identity);
    assert_eq!(cache.get(&token), Some(identity));
    group.bench_function("token_cache_hit", |b| {
        b.iter(|| cache.get(black_box(&token)))
    });

    // An API key among 100: every entry is compared, in constant time, whichever matches.
    let table = ApiKeyTable::new(
        (0..100)
            .map(|i| {
                (
                    format!("client-{i}"),
                    format!("ak_test_{i:04}_0123456789abcdef0123456789"),
                )
            })
            .collect(),
    );
    let key = "ak_test_0042_0123456789abcdef0123456789";
    assert_eq!(
        table.verify(key).map(|identity| identity.subject),
        Ok("client-42".to_string())
    );
    group.bench_function("api_key_100", |b| b.iter(|| table.verify(black_box(key))));
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
