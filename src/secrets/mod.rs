//! Secrets: what the gateway holds, what an agent needs, and what upstreams said.
//!
//! Values are read from an environment variable or a file (the Kubernetes and
//! systemd-credentials way) at start-up and on every reload, from the sources the
//! configuration names; parsing the configuration reads none. A [`SecretValue`] never prints:
//! its `Debug` is redacted and it has no `Display`, so it cannot reach a log line, an error
//! body or `check` output by accident.

pub mod presence;
pub mod reports;

use crate::config::{GatewayConfig, SecretSource};
use std::collections::BTreeMap;
use std::fmt;

pub(crate) struct SecretValue(String);

impl SecretValue {
    /// The value itself, for the one place that forwards it upstream.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(redacted)")
    }
}

/// The values of the secrets the configuration names, as read at start-up or reload.
#[derive(Debug, Default)]
pub struct SecretStore {
    values: BTreeMap<String, SecretValue>,
}

impl SecretStore {
    /// Reads every source `config` names, and registers each value with the log scrubber so
    /// that no log line can carry it (old values stay registered after a rotation).
    pub fn read(config: &GatewayConfig) -> SecretStore {
        let values: BTreeMap<String, SecretValue> = config
            .secrets
            .iter()
            .filter_map(|(name, source)| Some((name.clone(), read_source(source)?)))
            .collect();
        for value in values.values() {
            crate::telemetry::logging::register_secret(value.expose());
        }
        SecretStore { values }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&SecretValue> {
        self.values.get(name)
    }

    pub(crate) fn holds(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }
}

/// Reads one value; empty or whitespace-only counts as missing.
fn read_source(source: &SecretSource) -> Option<SecretValue> {
    let raw = match source {
        SecretSource::Env(var) => std::env::var(var).ok()?,
        SecretSource::File(path) => std::fs::read_to_string(path).ok()?,
    };
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then(|| SecretValue(trimmed.to_owned()))
}

/// What may be shown of a credential: its length and FNV-1a hash, enough for a test to check
/// that the right value arrived without anyone printing it.
pub fn fingerprint(value: &str) -> String {
    let hash = crate::fleet::placement::stable_hash(value.as_bytes());
    format!("redacted len={} fnv={hash:016x}", value.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_whitespace_values_are_missing() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("key");
        std::fs::write(&file, "  \n").expect("written");
        assert!(read_source(&SecretSource::File(file.clone())).is_none());
        std::fs::write(&file, "sk-value\n").expect("written");
        let value = read_source(&SecretSource::File(file)).expect("present");
        assert_eq!(value.expose(), "sk-value");
        assert!(read_source(&SecretSource::File(dir.path().join("absent"))).is_none());
        assert!(
            read_source(&SecretSource::Env("AGENT_GATEWAY_TEST_SURELY_UNSET".into())).is_none()
        );
    }

    #[test]
    fn values_never_print() {
        let value = SecretValue("sk-or-v1-very-secret".to_owned());
        let printed = format!("{value:?} {:?}", Some(&value));
        assert!(!printed.contains("very-secret"), "{printed}");
    }
}
