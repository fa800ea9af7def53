//! Tokens for the storm mode: JWTs minted with `jsonwebtoken` from the test-only keys of
//! `tests/fixtures/auth/` (public in the repository, never used for anything real) or an HMAC
//! secret, and the JWKS document a gateway verifies them with.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// Mints tokens of one algorithm and key, each with its own `jti`.
pub struct Minter {
    header: Header,
    key: EncodingKey,
    subject: String,
    ttl: u64,
    /// Makes every `jti` unique across processes and runs: a token minted here was never
    /// shown to a gateway before.
    nonce: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Minter {
    /// `alg`: HS256, ES256 or RS256 (any name jsonwebtoken knows works). For HS* `key` is the
    /// shared secret's bytes; otherwise a PKCS#8 private key in PEM.
    pub fn new(
        alg: &str,
        key: &[u8],
        kid: Option<&str>,
        subject: &str,
        ttl: u64,
    ) -> Result<Minter, String> {
        let alg: Algorithm = alg
            .parse()
            .map_err(|_| format!("unknown algorithm {alg:?}"))?;
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(key),
            Algorithm::ES256 | Algorithm::ES384 => {
                EncodingKey::from_ec_pem(key).map_err(|e| format!("EC key: {e}"))?
            }
            Algorithm::EdDSA => {
                EncodingKey::from_ed_pem(key).map_err(|e| format!("Ed key: {e}"))?
            }
            _ => EncodingKey::from_rsa_pem(key).map_err(|e| format!("RSA key: {e}"))?,
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Minter {
            header,
            key,
            subject: subject.to_owned(),
            ttl,
            nonce: format!("{t:x}-{:x}", std::process::id()),
        })
    }

    /// Token number `k`: `sub`, `iat`, `exp` (now + ttl) and `jti` = nonce-k.
    pub fn mint(&self, k: u64) -> Result<String, String> {
        let iat = now_secs();
        let claims = json!({
            "sub": self.subject,
            "iat": iat,
            "exp": iat + self.ttl,
            "jti": format!("{}-{k}", self.nonce),
        });
        jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|e| format!("signing: {e}"))
    }
}

/// The DER inside a PEM document (its first block).
pub fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .map(str::trim)
        .collect();
    STANDARD
        .decode(body)
        .map_err(|e| format!("not a PEM document ({e})"))
}

/// The public JWK of a PKCS#8 private key in PEM: RSA (for RS256) or EC P-256 (for ES256).
pub fn public_jwk(private_pem: &str, kid: &str) -> Result<Value, String> {
    let der = pem_der(private_pem)?;
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    if let Ok(pair) = RsaKeyPair::from_pkcs8(&der) {
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        return Ok(
            json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                         "n": b64(&public.n), "e": b64(&public.e)}),
        );
    }
    if let Ok(pair) =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
    {
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        return Ok(
            json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                         "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
        );
    }
    Err("neither an RSA nor an EC P-256 PKCS#8 private key".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA: &str = include_str!("../../../tests/fixtures/auth/rsa-private.pem");
    const EC: &str = include_str!("../../../tests/fixtures/auth/ec256-private.pem");

    #[test]
    fn minted_tokens_are_distinct_and_verify_with_the_jwks() {
        for (alg, pem, kid) in [("RS256", RSA, "r"), ("ES256", EC, "e")] {
            let m = Minter::new(alg, pem.as_bytes(), Some(kid), "bench", 3600).unwrap();
            let (a, b) = (m.mint(0).unwrap(), m.mint(1).unwrap());
            assert_ne!(a, b);
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(public_jwk(pem, kid).unwrap()).unwrap();
            let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let v = jsonwebtoken::Validation::new(alg.parse().unwrap());
            let data = jsonwebtoken::decode::<Value>(&a, &key, &v).unwrap();
            assert_eq!(data.claims["sub"], "bench");
        }
    }
}
