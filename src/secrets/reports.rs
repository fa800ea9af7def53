//! What upstreams say about their secrets: the field's "OPENROUTER_API_KEY is not set"
//! answer, recognised, and remembered per upstream until it answers well again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the same upstream report is logged.
const REPORT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The name of the secret an upstream's answer says is missing: status 500 and a body
/// containing "NAME is not set", as the field's Worker answered.
pub(crate) fn reported_missing<'a>(
    status: u16,
    body: &[u8],
    required: &'a [String],
) -> Option<&'a str> {
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
pub(crate) struct UpstreamReports {
    /// (upstream, secret) -> when it was last logged.
    missing: Mutex<HashMap<(String, String), Instant>>,
}

impl UpstreamReports {
    /// Records a report; returns whether the state changed and whether to log it now.
    pub(crate) fn report_missing(&self, upstream: &str, secret: &str) -> (bool, bool) {
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
    pub(crate) fn report_ok(&self, upstream: &str) -> bool {
        let Ok(mut missing) = self.missing.lock() else {
            return false;
        };
        let before = missing.len();
        missing.retain(|(u, _), _| u != upstream);
        missing.len() != before
    }

    pub(crate) fn is_missing(&self, upstream: &str, secret: &str) -> bool {
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
