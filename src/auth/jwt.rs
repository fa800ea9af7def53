//! JWT verification for a `method = "jwt"` policy: the token's header is read by hand (so that
//! `alg: none` and unknown algorithms are refused by name, not by a parse error), its key is
//! chosen by `kid` and algorithm family from a static [`KeySet`] or a [`RemoteJwks`], and
//! jsonwebtoken checks the signature, `exp`, `nbf`, `iss` and `aud`.
//!
//! No error text carries the token or key material: they reach logs and 401 answers.

use super::jwks::{algorithm_names, KeyChoice, KeySet, VerifyKey};
use super::jwks_remote::RemoteJwks;
use super::{AuthFailure, Identity, JwtSettings};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest token verified: real ones are well under 2 KiB, and a limit bounds the work an
/// unauthenticated client can ask for.
pub(crate) const MAX_TOKEN_BYTES: usize = 8192;
/// The largest leeway honoured, whatever the configuration says: jsonwebtoken subtracts it
/// from the current time.
const MAX_LEEWAY_SECS: u64 = 86_400;
const UNKNOWN_KID: &str = "unknown key id";

/// Where a verifier's keys come from.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

/// Verifies the JWTs of one policy.
pub struct JwtVerifier {
    keys: JwtKeys,
    /// One jsonwebtoken `Validation` per accepted algorithm, since jsonwebtoken wants every
    /// algorithm of a `Validation` to fit the key it is given.
    validations: Vec<(Algorithm, Validation)>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<Algorithm> = self.validations.iter().map(|(alg, _)| *alg).collect();
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys)
            .field("algorithms", &algorithms)
            .finish()
    }
}

/// What a token's header says, read without jsonwebtoken so that any `alg` can be named.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

/// Why checking with one key set did not give an identity.
enum Miss {
    /// The token names a `kid` the set lacks: a remote set is worth fetching again.
    UnknownKid,
    Failed(AuthFailure),
}

impl From<AuthFailure> for Miss {
    fn from(failure: AuthFailure) -> Self {
        Miss::Failed(failure)
    }
}

impl Miss {
    fn into_failure(self) -> AuthFailure {
        match self {
            Miss::UnknownKid => invalid(UNKNOWN_KID),
            Miss::Failed(failure) => failure,
        }
    }
}

fn invalid(why: &str) -> AuthFailure {
    AuthFailure::Invalid(why.to_string())
}

impl JwtVerifier {
    pub(crate) fn new(settings: &JwtSettings, keys: JwtKeys) -> JwtVerifier {
        JwtVerifier::from_parts(
            &settings.algorithms,
            keys,
            &settings.issuers,
            &settings.audiences,
            settings.leeway,
        )
    }

    /// A verifier accepting `algorithms`, and only tokens from one of `issuers` for one of
    /// `audiences` (each unchecked when empty), with `leeway` for `exp` and `nbf`.
    pub fn from_parts(
        algorithms: &[Algorithm],
        keys: JwtKeys,
        issuers: &[String],
        audiences: &[String],
        leeway: Duration,
    ) -> JwtVerifier {
        let mut validations: Vec<(Algorithm, Validation)> = Vec::new();
        for alg in algorithms {
            if validations.iter().any(|(known, _)| known == alg) {
                continue;
            }
            let mut validation = Validation::new(*alg);
            validation.leeway = leeway.as_secs().min(MAX_LEEWAY_SECS);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            // Tokens without `exp` are allowed (their cached verification lives briefly); `sub`
            // is required but checked here, after the signature, so that its absence is named.
            validation.required_spec_claims = HashSet::new();
            if !issuers.is_empty() {
                validation.set_issuer(issuers);
                validation.required_spec_claims.insert("iss".to_string());
            }
            if audiences.is_empty() {
                // Otherwise jsonwebtoken refuses every token that has an `aud`.
                validation.validate_aud = false;
            } else {
                validation.set_audience(audiences);
                validation.required_spec_claims.insert("aud".to_string());
            }
            validations.push((*alg, validation));
        }
        JwtVerifier { keys, validations }
    }

    /// The identity a token proves, or why it proves none. A remote key set lacking the
    /// token's `kid` is fetched again (at most once per its `min_refetch`) before the token is
    /// refused.
    pub(crate) async fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let (header, validation) = self.read_header(token)?;
        let remote = match &self.keys {
            JwtKeys::Static(keys) => {
                return self
                    .check(keys, token, &header, validation)
                    .map_err(Miss::into_failure)
            }
            JwtKeys::Remote(remote) => remote,
        };
        let keys = match remote.keys() {
            Some(keys) => keys,
            None => {
                // Not fetched yet (a reload just named it, or its host was down): try now
                // rather than wait for the next refresh.
                remote.refetch_for_unknown_kid().await;
                remote.keys().ok_or_else(|| {
                    AuthFailure::Unavailable(format!(
                        "the JWKS at {} has not been fetched",
                        remote.url()
                    ))
                })?
            }
        };
        match self.check(&keys, token, &header, validation) {
            Err(Miss::UnknownKid) => {
                let newer = match remote.keys() {
                    // A refresh landed since this token looked: no need to fetch again.
                    Some(current) if !Arc::ptr_eq(&current, &keys) => Some(current),
                    _ if remote.refetch_for_unknown_kid().await => remote.keys(),
                    _ => None,
                };
                match newer {
                    Some(keys) => self
                        .check(&keys, token, &header, validation)
                        .map_err(Miss::into_failure),
                    None => Err(invalid(UNKNOWN_KID)),
                }
            }
            verdict => verdict.map_err(Miss::into_failure),
        }
    }

    /// [`Self::verify`] against the given keys, without any fetching: what `verify` does with
    /// a static set, and what the benches measure.
    pub fn verify_with_keys(&self, keys: &KeySet, token: &str) -> Result<Identity, AuthFailure> {
        let (header, validation) = self.read_header(token)?;
        self.check(keys, token, &header, validation)
            .map_err(Miss::into_failure)
    }

    /// The token's header, and the validation of its algorithm if the policy accepts it.
    fn read_header(&self, token: &str) -> Result<(RawHeader, &Validation), AuthFailure> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("the token is longer than 8192 bytes"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("the token is not three dot-separated parts"));
        };
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| invalid("the token's header is not base64url"))?;
        let header: RawHeader = serde_json::from_slice(&header)
            .map_err(|_| invalid("the token's header is not a JSON object"))?;
        if header.crit.is_some() {
            // RFC 7515 4.1.11: extensions the recipient must understand, and this one does not.
            return Err(invalid(
                "the token has critical header parameters the gateway does not understand",
            ));
        }
        let Some(name) = header.alg.as_deref() else {
            return Err(invalid("the token's header names no algorithm"));
        };
        let accepted = name.parse::<Algorithm>().ok().and_then(|alg| {
            self.validations
                .iter()
                .find(|(known, _)| *known == alg)
                .map(|(_, validation)| validation)
        });
        match accepted {
            Some(validation) => Ok((header, validation)),
            None => Err(AuthFailure::Invalid(format!(
                "the token's algorithm {} is not accepted (accepted: {})",
                shown_alg(name),
                algorithm_names(
                    &self
                        .validations
                        .iter()
                        .map(|(alg, _)| *alg)
                        .collect::<Vec<_>>()
                )
            ))),
        }
    }

    /// Checks the token with the keys of `keys` that fit its header.
    fn check(
        &self,
        keys: &KeySet,
        token: &str,
        header: &RawHeader,
        validation: &Validation,
    ) -> Result<Identity, Miss> {
        let Some(alg) = validation.algorithms.first().copied() else {
            return Err(invalid("the token's algorithm is not accepted").into());
        };
        let candidates = match keys.select(header.kid.as_deref(), alg) {
            KeyChoice::Keys(candidates) => candidates,
            KeyChoice::UnknownKid => return Err(Miss::UnknownKid),
            KeyChoice::NoKeyForAlg => {
                return Err(AuthFailure::Invalid(format!(
                    "no key serves the token's algorithm {alg:?}"
                ))
                .into())
            }
        };
        let mut failure = invalid("the signature does not verify");
        for key in candidates {
            match decode(token, key, validation) {
                Ok(claims) => {
                    let leeway = Duration::from_secs(validation.leeway);
                    return identity(claims, leeway).map_err(Miss::Failed);
                }
                Err(Attempt::TryNext(why)) => failure = why,
                Err(Attempt::Stop(why)) => return Err(why.into()),
            }
        }
        Err(failure.into())
    }
}

/// How checking with one key failed.
enum Attempt {
    /// The signature did not verify with this key: another key of the set may do.
    TryNext(AuthFailure),
    /// The token itself is wrong (malformed, or verified but its claims fail).
    Stop(AuthFailure),
}

fn decode(
    token: &str,
    key: &VerifyKey,
    validation: &Validation,
) -> Result<Map<String, Value>, Attempt> {
    match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::Crypto(_) => Attempt::TryNext(invalid("the signature does not verify")),
            ErrorKind::ExpiredSignature => Attempt::Stop(AuthFailure::Expired),
            ErrorKind::ImmatureSignature => Attempt::Stop(invalid("the token is not valid yet")),
            ErrorKind::InvalidIssuer => {
                Attempt::Stop(invalid("the token's issuer is not accepted"))
            }
            ErrorKind::InvalidAudience => {
                Attempt::Stop(invalid("the token's audience is not accepted"))
            }
            ErrorKind::MissingRequiredClaim(claim) => Attempt::Stop(AuthFailure::Invalid(format!(
                "the token has no {claim} claim"
            ))),
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => Attempt::Stop(invalid("the token is malformed")),
            _ => Attempt::Stop(invalid("the token does not verify")),
        }),
    }
}

/// The identity of verified claims: `sub` is required, and `exp` and `nbf` must be dates if
/// present (jsonwebtoken silently skips ones it cannot read as numbers). It expires at `exp`
/// plus `leeway`, as jsonwebtoken judged it, so that the cache, the admission and the Close of
/// an open WebSocket agree with the verification.
fn identity(claims: Map<String, Value>, leeway: Duration) -> Result<Identity, AuthFailure> {
    let subject = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        _ => return Err(invalid("the token has no subject (sub)")),
    };
    let expires_at = match claims.get("exp") {
        None => None,
        Some(exp) => {
            let exp = numeric_date(exp).ok_or_else(|| invalid("the token's exp is not a date"))?;
            let with_leeway = exp.checked_add(leeway);
            Some(with_leeway.ok_or_else(|| invalid("the token's exp is out of range"))?)
        }
    };
    if claims
        .get("nbf")
        .is_some_and(|nbf| numeric_date(nbf).is_none())
    {
        return Err(invalid("the token's nbf is not a date"));
    }
    Ok(Identity {
        subject,
        claims,
        expires_at,
    })
}

/// An RFC 7519 NumericDate: seconds since the epoch, possibly fractional.
fn numeric_date(value: &Value) -> Option<SystemTime> {
    let since_epoch = match value.as_u64() {
        Some(secs) => Duration::from_secs(secs),
        None => Duration::try_from_secs_f64(value.as_f64()?).ok()?,
    };
    UNIX_EPOCH.checked_add(since_epoch)
}

/// An `alg` as it may appear in an error: a client-chosen string is only named when it looks
/// like an algorithm name.
fn shown_alg(name: &str) -> String {
    if !name.is_empty()
        && name.len() <= 16
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        format!("\"{name}\"")
    } else {
        "(unrecognised)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_keys::*;
    use super::*;
    use serde_json::json;

    fn static_keys(set: KeySet) -> JwtKeys {
        JwtKeys::Static(Arc::new(set))
    }

    fn verifier_of(algorithms: &[Algorithm], keys: JwtKeys) -> JwtVerifier {
        JwtVerifier::from_parts(algorithms, keys, &[], &[], Duration::ZERO)
    }

    fn secret_verifier(alg: Algorithm, public: &str) -> JwtVerifier {
        let set = KeySet::from_secret(public, &[alg]).expect("a key");
        verifier_of(&[alg], static_keys(set))
    }

    /// Verifies, and checks that a failure's text never quotes the token.
    async fn verify(verifier: &JwtVerifier, token: &str) -> Result<Identity, AuthFailure> {
        let verdict = verifier.verify(token).await;
        if let Err(AuthFailure::Invalid(why) | AuthFailure::Unavailable(why)) = &verdict {
            assert!(token.len() < 8 || !why.contains(token), "token in: {why}");
            for part in token.split('.').filter(|part| part.len() >= 8) {
                assert!(!why.contains(part), "token part in: {why}");
            }
        }
        verdict
    }

    fn invalid_because(verdict: Result<Identity, AuthFailure>, why: &str) {
        match verdict {
            Err(AuthFailure::Invalid(text)) => assert!(text.contains(why), "{text}"),
            other => panic!("expected Invalid({why}), got {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_algorithm_verifies() {
        use Algorithm::*;
        let cases = [
            (HS256, HMAC_SECRET, HMAC_SECRET),
            (HS384, HMAC_SECRET, HMAC_SECRET),
            (HS512, HMAC_SECRET, HMAC_SECRET),
            (RS256, RSA_PRIVATE, RSA_PUBLIC),
            (RS384, RSA_PRIVATE, RSA_PUBLIC),
            (RS512, RSA_PRIVATE, RSA_PUBLIC),
            (PS256, RSA_PRIVATE, RSA_PUBLIC),
            (PS512, RSA_PRIVATE, RSA_PUBLIC),
            (ES256, EC256_PRIVATE, EC256_PUBLIC),
            (ES384, EC384_PRIVATE, EC384_PUBLIC),
            (EdDSA, ED25519_PRIVATE, ED25519_PUBLIC),
        ];
        for (alg, private, public) in cases {
            let claims = claims();
            let token = sign(alg, private, None, &claims);
            let identity = verify(&secret_verifier(alg, public), &token)
                .await
                .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
            assert_eq!(identity.subject, "alice");
            assert_eq!(identity.claims.get("team"), Some(&json!("red")));
            let exp = claims["exp"].as_u64().expect("exp");
            assert_eq!(
                identity.expires_at,
                Some(UNIX_EPOCH + Duration::from_secs(exp))
            );
        }
    }

    #[tokio::test]
    async fn every_jwks_key_type_verifies_by_kid() {
        use Algorithm::*;
        let set = KeySet::from_jwks_json(&jwks(&[
            rsa_jwk(RSA_PRIVATE, "rsa"),
            ec_jwk(EC256_PRIVATE, false, "p256"),
            ec_jwk(EC384_PRIVATE, true, "p384"),
            ed_jwk(ED25519_PRIVATE, "ed"),
            oct_jwk(HMAC_SECRET, "oct"),
        ]))
        .expect("a key set");
        let all = [HS256, RS256, PS256, ES256, ES384, EdDSA];
        let verifier = verifier_of(&all, static_keys(set));
        let cases = [
            (HS256, HMAC_SECRET, "oct"),
            (RS256, RSA_PRIVATE, "rsa"),
            (PS256, RSA_PRIVATE, "rsa"),
            (ES256, EC256_PRIVATE, "p256"),
            (ES384, EC384_PRIVATE, "p384"),
            (EdDSA, ED25519_PRIVATE, "ed"),
        ];
        for (alg, private, kid) in cases {
            let token = sign(alg, private, Some(kid), &claims());
            let identity = verify(&verifier, &token).await;
            assert!(identity.is_ok(), "{alg:?}: {identity:?}");
            // Without kid: tried with the first keys of its family.
            let token = sign(alg, private, None, &claims());
            assert!(
                verify(&verifier, &token).await.is_ok(),
                "{alg:?} without kid"
            );
        }
        // A kid of the wrong family is not tried for the token's algorithm.
        let token = sign(ES256, EC256_PRIVATE, Some("rsa"), &claims());
        invalid_because(verify(&verifier, &token).await, "no key serves");
        let token = sign(ES256, EC256_PRIVATE, Some("p384"), &claims());
        invalid_because(verify(&verifier, &token).await, "no key serves");
        let token = sign(RS256, RSA_PRIVATE, Some("gone"), &claims());
        invalid_because(verify(&verifier, &token).await, "unknown key id");
    }

    #[tokio::test]
    async fn a_kid_in_a_token_does_not_stop_a_kid_less_secret() {
        let token = sign(Algorithm::HS256, HMAC_SECRET, Some("v1"), &claims());
        let verifier = secret_verifier(Algorithm::HS256, HMAC_SECRET);
        assert!(verify(&verifier, &token).await.is_ok());
    }

    #[tokio::test]
    async fn time_claims_honour_the_leeway() {
        let keys =
            || static_keys(KeySet::from_secret(HMAC_SECRET, &[Algorithm::HS256]).expect("a key"));
        let strict = JwtVerifier::from_parts(&[Algorithm::HS256], keys(), &[], &[], Duration::ZERO);
        let lenient = JwtVerifier::from_parts(
            &[Algorithm::HS256],
            keys(),
            &[],
            &[],
            Duration::from_secs(60),
        );
        let sign = |claims: &Value| sign(Algorithm::HS256, HMAC_SECRET, None, claims);

        let expired = sign(&json!({"sub": "alice", "exp": now() - 30}));
        assert_eq!(verify(&strict, &expired).await, Err(AuthFailure::Expired));
        assert!(verify(&lenient, &expired).await.is_ok());
        let long_expired = sign(&json!({"sub": "alice", "exp": now() - 120}));
        assert_eq!(
            verify(&lenient, &long_expired).await,
            Err(AuthFailure::Expired)
        );

        let early = sign(&json!({"sub": "alice", "nbf": now() + 30}));
        invalid_because(verify(&strict, &early).await, "the token is not valid yet");
        assert!(verify(&lenient, &early).await.is_ok());
        let too_early = sign(&json!({"sub": "alice", "nbf": now() + 120}));
        invalid_because(verify(&lenient, &too_early).await, "not valid yet");

        // Without exp: allowed, and no expiry.
        let forever = sign(&json!({"sub": "alice"}));
        let identity = verify(&strict, &forever).await.expect("no exp is fine");
        assert_eq!(identity.expires_at, None);
        let fractional = sign(&json!({"sub": "alice", "exp": now() as f64 + 600.5}));
        assert!(verify(&strict, &fractional).await.is_ok());
        for bad in [json!("tomorrow"), json!(-5), json!(null)] {
            let token = sign(&json!({"sub": "alice", "exp": bad}));
            invalid_because(verify(&strict, &token).await, "exp is not a date");
        }
        let token = sign(&json!({"sub": "alice", "nbf": "now"}));
        invalid_because(verify(&strict, &token).await, "nbf is not a date");
    }

    #[tokio::test]
    async fn issuer_and_audience_are_checked_when_configured() {
        let keys =
            static_keys(KeySet::from_secret(HMAC_SECRET, &[Algorithm::HS256]).expect("a key"));
        let strict = JwtVerifier::from_parts(
            &[Algorithm::HS256],
            keys.clone(),
            &["https://idp.example".to_string()],
            &["gateway".to_string(), "other".to_string()],
            Duration::ZERO,
        );
        let open = verifier_of(&[Algorithm::HS256], keys);
        let token = |iss: Option<&str>, aud: Option<Value>| {
            let mut claims = claims();
            if let Some(iss) = iss {
                claims["iss"] = json!(iss);
            }
            if let Some(aud) = aud {
                claims["aud"] = aud;
            }
            sign(Algorithm::HS256, HMAC_SECRET, None, &claims)
        };
        let good = token(Some("https://idp.example"), Some(json!("gateway")));
        assert!(verify(&strict, &good).await.is_ok());
        let list = token(Some("https://idp.example"), Some(json!(["x", "other"])));
        assert!(verify(&strict, &list).await.is_ok());

        let wrong_aud = token(Some("https://idp.example"), Some(json!("someone-else")));
        invalid_because(
            verify(&strict, &wrong_aud).await,
            "audience is not accepted",
        );
        let no_aud = token(Some("https://idp.example"), None);
        invalid_because(verify(&strict, &no_aud).await, "no aud claim");
        let wrong_iss = token(Some("https://evil.example"), Some(json!("gateway")));
        invalid_because(verify(&strict, &wrong_iss).await, "issuer is not accepted");
        let no_iss = token(None, Some(json!("gateway")));
        invalid_because(verify(&strict, &no_iss).await, "no iss claim");

        // Not configured: not checked, whatever the token says.
        assert!(verify(&open, &wrong_aud).await.is_ok());
        assert!(verify(&open, &wrong_iss).await.is_ok());
    }

    #[tokio::test]
    async fn a_subject_is_required() {
        let verifier = secret_verifier(Algorithm::HS256, HMAC_SECRET);
        for claims in [
            json!({"exp": now() + 60}),
            json!({"sub": "", "exp": now() + 60}),
            json!({"sub": 42, "exp": now() + 60}),
        ] {
            let token = sign(Algorithm::HS256, HMAC_SECRET, None, &claims);
            invalid_because(verify(&verifier, &token).await, "no subject");
        }
    }

    #[tokio::test]
    async fn the_wrong_key_is_refused() {
        let verifier = secret_verifier(Algorithm::RS256, RSA_PUBLIC);
        let token = sign(Algorithm::RS256, RSA2_PRIVATE, None, &claims());
        invalid_because(verify(&verifier, &token).await, "signature does not verify");
        let verifier = secret_verifier(Algorithm::HS256, "another secret");
        let token = sign(Algorithm::HS256, HMAC_SECRET, None, &claims());
        invalid_because(verify(&verifier, &token).await, "signature does not verify");
        // A signature changed by one character (mid-way: the last one also holds padding bits,
        // and changing those makes the base64 non-canonical, hence malformed).
        let verifier = secret_verifier(Algorithm::ES256, EC256_PUBLIC);
        let mut token = sign(Algorithm::ES256, EC256_PRIVATE, None, &claims());
        let at = token.len() - 20;
        let other = if token[at..].starts_with('A') {
            "B"
        } else {
            "A"
        };
        token.replace_range(at..=at, other);
        invalid_because(verify(&verifier, &token).await, "signature does not verify");
    }

    fn unsigned(header: &Value, claims: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[tokio::test]
    async fn alg_none_is_refused_by_name() {
        let verifier = secret_verifier(Algorithm::HS256, HMAC_SECRET);
        let header = json!({"alg": "none", "typ": "JWT"});
        for signature in ["", "c2ln"] {
            let token = unsigned(&header, &claims(), signature);
            invalid_because(
                verify(&verifier, &token).await,
                "algorithm \"none\" is not accepted",
            );
        }
        for (header, why) in [
            (json!({"alg": "None"}), "\"None\" is not accepted"),
            (json!({"alg": "RS1"}), "\"RS1\" is not accepted"),
            (
                json!({"alg": "HS256\"; drop"}),
                "(unrecognised) is not accepted",
            ),
            (json!({"alg": 256}), "not a JSON object"),
            (json!({"typ": "JWT"}), "names no algorithm"),
            (json!({"alg": "HS256", "crit": ["exp"]}), "critical header"),
        ] {
            let token = unsigned(&header, &claims(), "c2ln");
            invalid_because(verify(&verifier, &token).await, why);
        }
    }

    #[tokio::test]
    async fn algorithm_confusion_is_refused() {
        // An HS256 token whose HMAC key is the RSA public key's PEM text.
        let forged = sign(Algorithm::HS256, RSA_PUBLIC, None, &claims());
        // A policy of RS256 only: the algorithm is refused outright.
        let verifier = secret_verifier(Algorithm::RS256, RSA_PUBLIC);
        invalid_because(
            verify(&verifier, &forged).await,
            "\"HS256\" is not accepted",
        );
        // A policy accepting both, with an RSA key set: no key serves HS256.
        let set = KeySet::from_jwks_json(&jwks(&[rsa_jwk(RSA_PRIVATE, "rsa")])).expect("keys");
        let both = verifier_for_both(set);
        invalid_because(verify(&both, &forged).await, "no key serves");
        let forged_kid = sign(Algorithm::HS256, RSA_PUBLIC, Some("rsa"), &claims());
        invalid_because(verify(&both, &forged_kid).await, "no key serves");
        // The same policy still takes the real thing.
        let real = sign(Algorithm::RS256, RSA_PRIVATE, Some("rsa"), &claims());
        assert!(verify(&both, &real).await.is_ok());
    }

    fn verifier_for_both(set: KeySet) -> JwtVerifier {
        verifier_of(&[Algorithm::RS256, Algorithm::HS256], static_keys(set))
    }

    #[tokio::test]
    async fn oversized_and_malformed_tokens_are_invalid() {
        let verifier = secret_verifier(Algorithm::HS256, HMAC_SECRET);
        let mut claims = claims();
        claims["padding"] = json!("x".repeat(MAX_TOKEN_BYTES));
        let big = sign(Algorithm::HS256, HMAC_SECRET, None, &claims);
        assert_eq!(
            verify(&verifier, &big).await,
            Err(invalid("the token is longer than 8192 bytes"))
        );
        let good = sign(
            Algorithm::HS256,
            HMAC_SECRET,
            None,
            &super::super::test_keys::claims(),
        );
        let parts: Vec<&str> = good.split('.').collect();
        let cases = [
            ("", "three dot-separated parts"),
            ("garbage", "three dot-separated parts"),
            ("a.b", "three dot-separated parts"),
            ("a.b.c.d", "three dot-separated parts"),
            ("..", "header is not a JSON object"),
            ("!!!.e30.c2ln", "header is not base64url"),
            ("e30=.e30.c2ln", "header is not base64url"),
            ("bm90IGpzb24.e30.c2ln", "header is not a JSON object"),
        ];
        for (token, why) in cases {
            invalid_because(verify(&verifier, token).await, why);
        }
        for token in [
            format!("{}.!!!.{}", parts[0], parts[2]),
            format!("{}.{}.!!!", parts[0], parts[1]),
            format!("{}.{}.", parts[0], parts[1]),
            format!("{}.bm90IGpzb24.{}", parts[0], parts[2]),
        ] {
            let verdict = verify(&verifier, &token).await;
            assert!(
                matches!(verdict, Err(AuthFailure::Invalid(_))),
                "{verdict:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_rotated_remote_key_is_fetched_once_and_verifies() {
        let server = jwks_server(jwks(&[rsa_jwk(RSA_PRIVATE, "k1")])).await;
        let remote = fetched_jwks(&server.url, Duration::from_secs(60)).await;
        let verifier = verifier_of(&[Algorithm::RS256], JwtKeys::Remote(remote.clone()));
        let old = sign(Algorithm::RS256, RSA_PRIVATE, Some("k1"), &claims());
        assert!(verify(&verifier, &old).await.is_ok());
        assert_eq!(server.requests(), 1);

        server.serve(Some(jwks(&[rsa_jwk(RSA2_PRIVATE, "k2")])));
        let new = sign(Algorithm::RS256, RSA2_PRIVATE, Some("k2"), &claims());
        let identity = verify(&verifier, &new)
            .await
            .expect("verified after one refetch");
        assert_eq!(identity.subject, "alice");
        assert_eq!(server.requests(), 2);
        assert!(verify(&verifier, &new).await.is_ok());
        assert_eq!(server.requests(), 2);
        // The rotated-out key is gone with the old set.
        invalid_because(verify(&verifier, &old).await, "unknown key id");
        assert_eq!(server.requests(), 2, "within min_refetch");
    }

    #[tokio::test]
    async fn a_burst_of_unknown_kids_refetches_at_most_once() {
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let remote = fetched_jwks(&server.url, Duration::from_secs(60)).await;
        let verifier = verifier_of(&[Algorithm::HS256], JwtKeys::Remote(remote));
        let tokens: Vec<String> = (0..50)
            .map(|i| {
                sign(
                    Algorithm::HS256,
                    HMAC_SECRET,
                    Some(&format!("rogue-{i}")),
                    &claims(),
                )
            })
            .collect();
        let verdicts =
            futures_util::future::join_all(tokens.iter().map(|token| verify(&verifier, token)))
                .await;
        for verdict in verdicts {
            invalid_because(verdict, "unknown key id");
        }
        assert_eq!(server.requests(), 2, "one refetch for the whole burst");
        for token in &tokens[..5] {
            invalid_because(verify(&verifier, token).await, "unknown key id");
        }
        assert_eq!(server.requests(), 2);
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_old_keys() {
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let remote = fetched_jwks(&server.url, Duration::ZERO).await;
        let verifier = verifier_of(&[Algorithm::HS256], JwtKeys::Remote(remote.clone()));
        server.serve(None);
        assert!(remote.refresh().await.is_err());
        assert_eq!(remote.fetch_failures(), 1);
        let token = sign(Algorithm::HS256, HMAC_SECRET, Some("k1"), &claims());
        assert!(verify(&verifier, &token).await.is_ok());
        // An unknown kid still tries (and fails) to refetch, and is refused.
        let token = sign(Algorithm::HS256, HMAC_SECRET, Some("k9"), &claims());
        invalid_because(verify(&verifier, &token).await, "unknown key id");
        assert_eq!(remote.fetch_failures(), 2);
        assert_eq!(server.requests(), 3);
    }

    #[tokio::test]
    async fn a_never_fetched_jwks_is_fetched_on_demand_or_unavailable() {
        let server = jwks_server(jwks(&[oct_jwk(HMAC_SECRET, "k1")])).await;
        let remote = RemoteJwks::new(
            &server.url,
            Duration::from_secs(600),
            Duration::from_secs(60),
        )
        .expect("a URL");
        let verifier = verifier_of(&[Algorithm::HS256], JwtKeys::Remote(remote));
        let token = sign(Algorithm::HS256, HMAC_SECRET, Some("k1"), &claims());
        assert!(verify(&verifier, &token).await.is_ok());
        assert_eq!(server.requests(), 1);

        let url = closed_url("/jwks");
        let remote = RemoteJwks::new(&url, Duration::from_secs(600), Duration::from_secs(60))
            .expect("a URL");
        let down = verifier_of(&[Algorithm::HS256], JwtKeys::Remote(remote));
        let expected = AuthFailure::Unavailable(format!("the JWKS at {url} has not been fetched"));
        assert_eq!(verify(&down, &token).await, Err(expected.clone()));
        // Refused again without a fetch (within min_refetch), still unavailable.
        assert_eq!(verify(&down, &token).await, Err(expected));
    }

    #[test]
    fn verify_with_keys_checks_against_the_given_keys() {
        let set = KeySet::from_secret(HMAC_SECRET, &[Algorithm::HS256]).expect("a key");
        let other = KeySet::from_secret("another shared secret of 32+ bytes", &[Algorithm::HS256])
            .expect("a key");
        let verifier = verifier_of(&[Algorithm::HS256], static_keys(other));
        let token = sign(Algorithm::HS256, HMAC_SECRET, None, &claims());
        let identity = verifier.verify_with_keys(&set, &token).expect("verified");
        assert_eq!(identity.subject, "alice");
        assert_eq!(identity.claims["team"], json!("red"));
        assert!(identity.expires_at.is_some());
        assert_eq!(
            verifier.verify_with_keys(&set, "x").map_err(|f| f.result()),
            Err("invalid")
        );
        let expired = sign(
            Algorithm::HS256,
            HMAC_SECRET,
            None,
            &json!({"sub": "a", "exp": 1}),
        );
        assert_eq!(
            verifier.verify_with_keys(&set, &expired),
            Err(AuthFailure::Expired)
        );
    }
}
