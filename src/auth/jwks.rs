//! The keys JWTs are verified with: a [`KeySet`] made from a JWKS document (RFC 7517) or from
//! one secret. Fetching a JWKS from a URL is [`super::jwks_remote`]'s.
//!
//! Every key knows the one algorithm family it serves, and a token is only ever checked with a
//! key of its `alg`'s family. That is what defeats algorithm confusion: an HS256 token "signed"
//! with the bytes of an RSA public key never meets an HMAC key made of those bytes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;

/// A token whose `kid` picks no key is tried with at most this many keys: enough for a key
/// rotation, too few for one token to buy many signature checks.
const MAX_KEYS_TRIED: usize = 4;

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
pub(crate) fn pem_der(pem: &str) -> Option<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::super::test_keys::*;
    use super::*;
    use serde_json::json;

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
}
