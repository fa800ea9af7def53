//! Verified tokens, remembered for a while so that a reconnect storm (every client of a
//! restarted upstream coming back at once, each with the token it already showed) does not
//! verify each signature again.
//!
//! Bounded in memory (TinyUFO), keyed by the first 128 bits of the token's SHA-256 digest: the
//! token itself is never stored. Only successful verifications are cached, each until its
//! `exp` (at most [`MAX_TTL`]; [`NO_EXP_TTL`] for a token without `exp`). One cache serves one
//! policy: a token verified under one policy's keys and audiences proves nothing under another.

use super::Identity;
use pingora_memory_cache::MemoryCache;
use ring::digest::{digest, SHA256};
use std::fmt;
use std::time::{Duration, SystemTime};

/// How long a verified token without `exp` is remembered.
pub(crate) const NO_EXP_TTL: Duration = Duration::from_secs(60);
/// How long any verified token is remembered at most, so that a key withdrawn from a JWKS
/// stops admitting its tokens within minutes rather than at their `exp`.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(300);

#[derive(Clone)]
struct Entry {
    /// The whole 128-bit key again: the cache itself indexes by a 64-bit hash of it, and a
    /// collision there must not hand out another client's identity.
    digest: u128,
    identity: Identity,
}

/// Recently verified tokens of one policy.
pub struct TokenCache {
    /// `None`: a capacity of zero, caching nothing. Boxed: TinyUFO's bookkeeping is nearly
    /// 1 KiB, too much to carry inline in every policy's check.
    cache: Option<Box<MemoryCache<u128, Entry>>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("enabled", &self.cache.is_some())
            .finish()
    }
}

fn token_digest(token: &str) -> u128 {
    let sha = digest(&SHA256, token.as_bytes());
    let mut prefix = [0u8; 16];
    for (to, from) in prefix.iter_mut().zip(sha.as_ref()) {
        *to = *from;
    }
    u128::from_be_bytes(prefix)
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; zero caches nothing.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            cache: (capacity > 0).then(|| Box::new(MemoryCache::new(capacity))),
        }
    }

    /// The identity `token` was verified as, unless forgotten or expired.
    pub fn get(&self, token: &str) -> Option<Identity> {
        let cache = self.cache.as_ref()?;
        let digest = token_digest(token);
        let (entry, _) = cache.get(&digest);
        let entry = entry.filter(|entry| entry.digest == digest)?;
        // The TTL runs on the monotonic clock; `exp` is wall-clock time, checked too.
        if entry
            .identity
            .expires_at
            .is_some_and(|exp| exp <= SystemTime::now())
        {
            return None;
        }
        Some(entry.identity)
    }

    /// Remembers that `token` verified as `identity`, until its `expires_at`.
    pub fn put(&self, token: &str, identity: &Identity) {
        let Some(cache) = self.cache.as_ref() else {
            return;
        };
        let ttl = match identity.expires_at {
            None => NO_EXP_TTL,
            Some(exp) => match exp.duration_since(SystemTime::now()) {
                Ok(left) => left,
                Err(_) => return,
            },
        }
        .min(MAX_TTL);
        if ttl.is_zero() {
            return;
        }
        let digest = token_digest(token);
        let entry = Entry {
            digest,
            identity: identity.clone(),
        };
        cache.put(&digest, entry, Some(ttl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};

    fn identity(subject: &str, expires_at: Option<SystemTime>) -> Identity {
        let mut claims = Map::new();
        claims.insert("sub".to_string(), json!(subject));
        claims.insert("team".to_string(), json!("red"));
        Identity {
            subject: subject.to_string(),
            claims,
            expires_at,
        }
    }

    fn in_secs(secs: u64) -> Option<SystemTime> {
        Some(SystemTime::now() + Duration::from_secs(secs))
    }

    #[test]
    fn a_verified_token_is_a_hit_and_others_miss() {
        let cache = TokenCache::new(1000);
        let alice = identity("alice", in_secs(600));
        assert_eq!(cache.get("token-a"), None);
        cache.put("token-a", &alice);
        assert_eq!(cache.get("token-a"), Some(alice.clone()));
        assert_eq!(cache.get("token-b"), None);
        assert_eq!(cache.get("token-a "), None);
        let bob = identity("bob", None);
        cache.put("token-b", &bob);
        assert_eq!(cache.get("token-b"), Some(bob));
        assert_eq!(cache.get("token-a"), Some(alice));
    }

    #[test]
    fn expiry_is_honoured() {
        let cache = TokenCache::new(1000);
        cache.put(
            "past",
            &identity("alice", Some(SystemTime::now() - Duration::from_secs(1))),
        );
        assert_eq!(cache.get("past"), None);
        let soon = SystemTime::now() + Duration::from_millis(300);
        cache.put("soon", &identity("alice", Some(soon)));
        assert!(cache.get("soon").is_some());
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(cache.get("soon"), None);
    }

    #[test]
    fn a_zero_capacity_caches_nothing() {
        let cache = TokenCache::new(0);
        cache.put("token", &identity("alice", in_secs(600)));
        assert_eq!(cache.get("token"), None);
    }

    #[test]
    fn entries_are_keyed_by_a_sha256_prefix() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223 b00361a396177a9cb410ff61f20015ad
        assert_eq!(token_digest("abc"), 0xba7816bf8f01cfea414140de5dae2223);
        let cache = TokenCache::new(10);
        cache.put("abc", &identity("alice", in_secs(600)));
        let stored = cache
            .cache
            .as_ref()
            .and_then(|c| c.get(&token_digest("abc")).0);
        assert_eq!(stored.map(|entry| entry.digest), Some(token_digest("abc")));
    }
}
