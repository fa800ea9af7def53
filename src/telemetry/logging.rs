//! Logging: env_logger (level from `RUST_LOG`, `info` by default), behind a filter that
//! removes every secret value the gateway has read from every record, whichever crate wrote
//! it. Pingora's own debug logs print whole request headers, and a forwarded secret travels
//! in one; this is what keeps it out of the logs.

use log::{Log, Metadata, Record};
use std::io::Write;
use std::sync::RwLock;

/// Values to scrub, registered as secrets are read (kept after rotation: old values stay
/// secret too).
static SECRET_VALUES: RwLock<Vec<String>> = RwLock::new(Vec::new());

const REDACTED: &str = "[redacted]";

/// Registers a secret's value for scrubbing.
pub(crate) fn register_secret(value: &str) {
    if let Ok(mut values) = SECRET_VALUES.write() {
        if !values.iter().any(|v| v == value) {
            values.push(value.to_owned());
        }
    }
}

/// `text` with every registered secret value replaced.
pub(crate) fn scrub(text: &str) -> std::borrow::Cow<'_, str> {
    let Ok(values) = SECRET_VALUES.read() else {
        return REDACTED.into();
    };
    let mut out = std::borrow::Cow::Borrowed(text);
    for value in values.iter() {
        if out.contains(value.as_str()) {
            out = out.replace(value.as_str(), REDACTED).into();
        }
    }
    out
}

/// Headers whose values are credentials. Pingora's own debug lines print whole request heads
/// (`Sending header to upstream ...`), and a bearer token or session cookie forwarded upstream
/// would be in them: their values are redacted from every log line, whatever logged it.
const CREDENTIAL_HEADERS: &str = r#"(?i)"(authorization|proxy-authorization|cookie|set-cookie|sec-websocket-protocol|x-auth-credential|x-gateway-identity-signature)": "(?:[^"\\]|\\.)*""#;

/// `text` with the values of credential headers, as a header map's `Debug` prints them,
/// replaced.
fn redact_credential_headers(text: &str) -> std::borrow::Cow<'_, str> {
    static PATTERN: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let lower = text.to_ascii_lowercase();
    let names = [
        "authorization",
        "cookie",
        "protocol",
        "credential",
        "signature",
    ];
    if !names.iter().any(|name| lower.contains(name)) {
        return text.into();
    }
    match PATTERN.get_or_init(|| regex::Regex::new(CREDENTIAL_HEADERS).ok()) {
        Some(pattern) => pattern.replace_all(text, r#""$1": "[redacted]""#),
        // Unreachable with the constant above; fail closed rather than print.
        None => REDACTED.into(),
    }
}

struct ScrubbingLogger {
    inner: env_logger::Logger,
}

impl Log for ScrubbingLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let redacted = redact_credential_headers(&message);
        let scrubbed = scrub(&redacted);
        self.inner.log(
            &Record::builder()
                .args(format_args!("{scrubbed}"))
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger; called once at start-up. `RUST_LOG` wins over `level`.
pub fn init(level: &str, json: bool) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if json {
        builder.format(|buf, record| {
            let line = serde_json::json!({
                "ts": buf.timestamp().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    let inner = builder.build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(ScrubbingLogger { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// Writes one access or connection line to stdout: JSON, or `key=value` pairs.
pub(crate) fn record(json: bool, kind: &str, fields: &[(&str, serde_json::Value)]) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = if json {
        let mut object = serde_json::Map::new();
        object.insert("ts".to_owned(), serde_json::json!(ts));
        object.insert("kind".to_owned(), serde_json::json!(kind));
        for (key, value) in fields {
            object.insert((*key).to_owned(), value.clone());
        }
        serde_json::Value::Object(object).to_string()
    } else {
        let mut line = format!("ts={ts:.3} kind={kind}");
        for (key, value) in fields {
            match value {
                serde_json::Value::String(s) => line.push_str(&format!(" {key}={s:?}")),
                other => line.push_str(&format!(" {key}={other}")),
            }
        }
        line
    };
    let scrubbed = scrub(&line);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{scrubbed}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_values_are_scrubbed() {
        register_secret("sk-scrub-test-123");
        assert_eq!(
            scrub("x-key: sk-scrub-test-123, again sk-scrub-test-123"),
            "x-key: [redacted], again [redacted]"
        );
        assert_eq!(scrub("nothing here"), "nothing here");
    }

    #[test]
    fn credential_headers_are_redacted_as_a_header_map_prints_them() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "authorization",
            "Bearer eyJ.secret\"quoted".parse().unwrap(),
        );
        headers.insert("cookie", "session=abc123".parse().unwrap());
        headers.insert(
            "sec-websocket-protocol",
            "chat, bearer.tok".parse().unwrap(),
        );
        headers.insert("x-user-id", "alice".parse().unwrap());
        let line = format!("Sending header to upstream {headers:?}");
        let redacted = redact_credential_headers(&line);
        for secret in ["eyJ.secret", "abc123", "bearer.tok"] {
            assert!(!redacted.contains(secret), "{redacted}");
        }
        assert!(
            redacted.contains(r#""authorization": "[redacted]""#),
            "{redacted}"
        );
        assert!(redacted.contains("alice"), "{redacted}");
        assert_eq!(redact_credential_headers("plain line"), "plain line");
    }
}
