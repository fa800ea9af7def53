//! Secret presence: the gateway checks that the secrets an agent needs exist before any agent
//! sees a request, and recognises the field's "OPENROUTER_API_KEY is not set" answer.
//!
//! Values are read from an environment variable or a file (the Kubernetes and
//! systemd-credentials way) at start and on every reload. A [`SecretValue`] never prints:
//! its `Debug` is redacted and it has no `Display`, so it cannot reach a log line, an error
//! body or `check` output by accident.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod probe;

/// The secret agent routes require unless they say otherwise.
pub const DEFAULT_REQUIRED: &str = "OPENROUTER_API_KEY";

/// How often the same upstream report is logged.
const REPORT_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub struct SecretValue(String);

impl SecretValue {
    /// The value itself, for the one place that forwards it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(redacted)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// Reads the value; empty or whitespace-only counts as missing.
    pub fn read(&self) -> Option<SecretValue> {
        let raw = match self {
            SecretSource::Env(var) => std::env::var(var).ok()?,
            SecretSource::File(path) => std::fs::read_to_string(path).ok()?,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return None;
        }
        crate::telemetry::logging::register_secret(trimmed);
        Some(SecretValue(trimmed.to_owned()))
    }

    /// Where to set it, for hints.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Env(var) => format!("the environment variable {var}"),
            SecretSource::File(path) => format!("the file {}", path.display()),
        }
    }
}

/// What may be shown of a credential: its length and FNV-1a hash, enough for a test to check
/// that the right value arrived without anyone printing it.
pub fn fingerprint(value: &str) -> String {
    let hash = crate::upstream::stable_hash(value.as_bytes());
    format!("redacted len={} fnv={hash:016x}", value.len())
}

/// A secret the configuration names, with its value as last read.
#[derive(Debug)]
pub struct Secret {
    pub source: SecretSource,
    pub value: Option<SecretValue>,
}

/// The name of the secret an upstream's answer says is missing: status 500 and a body
/// containing "NAME is not set", as the field's Worker answered.
pub fn reported_missing<'a>(status: u16, body: &[u8], required: &'a [String]) -> Option<&'a str> {
    if status != 500 {
        return None;
    }
    let body = String::from_utf8_lossy(body);
    required
        .iter()
        .find(|name| body.contains(&format!("{name} is not set")))
        .map(String::as_str)
}

/// Secrets that upstreams reported missing. Kept across reloads: a new file does not make
/// a Worker's secret appear; a later successful answer or probe does.
#[derive(Default)]
pub struct UpstreamReports {
    /// (upstream, secret) -> when it was last logged.
    missing: Mutex<HashMap<(String, String), Instant>>,
}

impl UpstreamReports {
    /// Records a report; returns whether the state changed and whether to log it now.
    pub fn report_missing(&self, upstream: &str, secret: &str) -> (bool, bool) {
        let Ok(mut missing) = self.missing.lock() else {
            return (false, false);
        };
        let key = (upstream.to_owned(), secret.to_owned());
        match missing.get_mut(&key) {
            Some(logged) if logged.elapsed() < REPORT_LOG_INTERVAL => (false, false),
            Some(logged) => {
                *logged = Instant::now();
                (false, true)
            }
            None => {
                missing.insert(key, Instant::now());
                (true, true)
            }
        }
    }

    /// The upstream answered well: whatever it reported missing is there now. Returns
    /// whether anything changed.
    pub fn report_ok(&self, upstream: &str) -> bool {
        let Ok(mut missing) = self.missing.lock() else {
            return false;
        };
        let before = missing.len();
        missing.retain(|(u, _), _| u != upstream);
        missing.len() != before
    }

    pub fn is_missing(&self, upstream: &str, secret: &str) -> bool {
        self.missing
            .lock()
            .map(|m| m.contains_key(&(upstream.to_owned(), secret.to_owned())))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_whitespace_values_are_missing() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("key");
        std::fs::write(&file, "  \n").expect("written");
        assert!(SecretSource::File(file.clone()).read().is_none());
        std::fs::write(&file, "sk-value\n").expect("written");
        let value = SecretSource::File(file).read().expect("present");
        assert_eq!(value.expose(), "sk-value");
        assert!(SecretSource::File(dir.path().join("absent"))
            .read()
            .is_none());
        assert!(SecretSource::Env("AGENT_GATEWAY_TEST_SURELY_UNSET".into())
            .read()
            .is_none());
    }

    #[test]
    fn values_never_print() {
        let value = SecretValue("sk-or-v1-very-secret".to_owned());
        let printed = format!("{value:?} {:?}", Some(&value));
        assert!(!printed.contains("very-secret"), "{printed}");
    }

    #[test]
    fn the_field_signature_is_recognised() {
        let required = vec!["OPENROUTER_API_KEY".to_owned()];
        assert_eq!(
            reported_missing(500, b"OPENROUTER_API_KEY is not set", &required),
            Some("OPENROUTER_API_KEY")
        );
        assert_eq!(
            reported_missing(503, b"OPENROUTER_API_KEY is not set", &required),
            None
        );
        assert_eq!(reported_missing(500, b"Internal error", &required), None);
        assert_eq!(
            reported_missing(500, b"OTHER_KEY is not set", &required),
            None
        );
    }

    #[test]
    fn reports_are_logged_once_per_interval_and_cleared_by_success() {
        let reports = UpstreamReports::default();
        assert_eq!(reports.report_missing("cloud", "K"), (true, true));
        assert_eq!(reports.report_missing("cloud", "K"), (false, false));
        assert!(reports.is_missing("cloud", "K"));
        assert!(reports.report_ok("cloud"));
        assert!(!reports.is_missing("cloud", "K"));
        assert!(!reports.report_ok("cloud"));
    }
}
