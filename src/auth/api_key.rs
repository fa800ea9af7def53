//! API keys: a client presents an opaque key, the gateway finds whose it is.
//!
//! The table keeps only the SHA-256 digest of each key, never the key itself, so a memory
//! dump, a core file or a stray `{:?}` cannot show one. Keys are high-entropy secrets, so an
//! unsalted fast digest is enough: there is nothing to brute-force from a dictionary.
//!
//! A presented key is digested and compared with every entry in constant time, without
//! stopping at a match, so the time taken tells nothing about which entry matched, how many
//! there are, or how long a common prefix was.

use super::{AuthFailure, Identity};
use ring::digest::{digest, SHA256, SHA256_OUTPUT_LEN};
use serde_json::{Map, Value};
use std::fmt;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

type Digest = [u8; SHA256_OUTPUT_LEN];

/// The API keys of one policy: (subject, digest of its key).
pub struct ApiKeyTable {
    entries: Vec<(String, Digest)>,
}

impl ApiKeyTable {
    /// A table of `(subject, key value)` pairs. The key values are digested and dropped here.
    /// When two subjects share a key value, the first one listed is the one found.
    pub fn new(keys: Vec<(String, String)>) -> ApiKeyTable {
        let entries = keys
            .into_iter()
            .map(|(subject, key)| (subject, sha256(key.as_bytes())))
            .collect();
        ApiKeyTable { entries }
    }

    /// How many keys the table holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no key (every key is then invalid).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whose key `presented` is. An empty key never matches, even an empty configured one.
    pub fn verify(&self, presented: &str) -> Result<Identity, AuthFailure> {
        if presented.is_empty() {
            return Err(invalid());
        }
        let presented = sha256(presented.as_bytes());
        let mut found = Choice::from(0);
        let mut index = 0u64;
        // Walked backwards so that the first of duplicate entries is the one kept; every entry
        // is compared whatever happened before, and the index is chosen without a branch.
        for (i, (_, entry)) in self.entries.iter().enumerate().rev() {
            let matched = presented.ct_eq(entry);
            index.conditional_assign(&(i as u64), matched);
            found |= matched;
        }
        if !bool::from(found) {
            return Err(invalid());
        }
        let subject = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|(subject, _)| subject.clone())
            .ok_or_else(invalid)?;
        let mut claims = Map::new();
        claims.insert("sub".to_string(), Value::String(subject.clone()));
        Ok(Identity {
            subject,
            claims,
            expires_at: None,
        })
    }
}

impl fmt::Debug for ApiKeyTable {
    // Subjects only: digests are not secrets, but showing them helps no one and invites
    // offline guessing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyTable")
            .field(
                "subjects",
                &self.entries.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn invalid() -> AuthFailure {
    AuthFailure::Invalid("unknown API key".to_string())
}

fn sha256(data: &[u8]) -> Digest {
    let mut out = [0u8; SHA256_OUTPUT_LEN];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ApiKeyTable {
        ApiKeyTable::new(vec![
            ("alice".to_string(), "key-alice-0123456789".to_string()),
            ("bob".to_string(), "key-bob-0123456789".to_string()),
        ])
    }

    #[test]
    fn a_known_key_gives_its_subject() {
        let identity = table().verify("key-bob-0123456789").unwrap();
        assert_eq!(identity.subject, "bob");
        assert_eq!(identity.claims.len(), 1);
        assert_eq!(identity.claims["sub"], Value::String("bob".into()));
        assert_eq!(identity.expires_at, None);
        assert_eq!(
            table().verify("key-alice-0123456789").unwrap().subject,
            "alice"
        );
    }

    #[test]
    fn an_unknown_key_is_invalid() {
        for key in [
            "key-bob-012345678",
            "key-bob-01234567890",
            "KEY-BOB-0123456789",
            "x",
            "",
        ] {
            assert_eq!(
                table().verify(key),
                Err(AuthFailure::Invalid("unknown API key".into()))
            );
        }
    }

    #[test]
    fn an_empty_key_never_matches() {
        let table = ApiKeyTable::new(vec![("empty".to_string(), String::new())]);
        assert!(table.verify("").is_err());
    }

    #[test]
    fn an_empty_table_knows_no_key() {
        let table = ApiKeyTable::new(Vec::new());
        assert!(table.is_empty());
        assert_eq!(table.len(), 0);
        assert!(table.verify("anything").is_err());
    }

    #[test]
    fn the_first_of_duplicate_keys_wins() {
        let table = ApiKeyTable::new(vec![
            ("first".to_string(), "same".to_string()),
            ("second".to_string(), "same".to_string()),
        ]);
        assert_eq!(table.len(), 2);
        assert_eq!(table.verify("same").unwrap().subject, "first");
    }

    #[test]
    fn debug_shows_subjects_and_no_key_material() {
        let text = format!("{:?}", table());
        assert_eq!(text, r#"ApiKeyTable { subjects: ["alice", "bob"] }"#);
    }
}
