//! Request IDs and trace context: every request gets an ID that goes upstream, comes back on
//! every answer and stands in every log line about it, so one request can be followed across
//! the client, the gateway and the agent.

use uuid::Uuid;

pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";
pub(crate) const TRACEPARENT_HEADER: &str = "traceparent";

/// Longest incoming ID kept; longer ones are replaced.
const MAX_ID_LEN: usize = 128;

/// The request's ID: the one a trusted proxy sent, when it is a plain token, else a new
/// UUIDv7, which is time-ordered so that IDs sort by arrival in logs. A client that is not a
/// trusted proxy cannot choose the ID its request is logged under.
pub(crate) fn request_id(from_trusted_proxy: bool, incoming: Option<&str>) -> String {
    match incoming {
        Some(id) if from_trusted_proxy && is_plain_token(id) => id.to_owned(),
        _ => Uuid::now_v7().to_string(),
    }
}

/// Printable ASCII without spaces, quotes or backslashes: safe in a header, a JSON body and
/// a `key=value` log line as it is.
fn is_plain_token(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// The trace ID of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), for log lines. The
/// header itself is passed upstream untouched; one that does not parse is not logged.
pub(crate) fn trace_id(traceparent: Option<&str>) -> Option<&str> {
    let mut parts = traceparent?.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && !all_zero(trace)
        && hex(parent, 16)
        && !all_zero(parent)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trusted_proxies_choose_the_id() {
        assert_eq!(request_id(true, Some("req-123")), "req-123");
        let made = request_id(false, Some("req-123"));
        assert_ne!(made, "req-123");
        let parsed = Uuid::parse_str(&made).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 7);
        for odd in ["", "with space", "quote\"d", &"x".repeat(129)] {
            assert_ne!(request_id(true, Some(odd)), odd, "{odd:?}");
        }
        assert_ne!(request_id(false, None), request_id(false, None));
    }

    #[test]
    fn ids_made_later_sort_later() {
        let first = request_id(false, None);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(request_id(false, None) > first);
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(Some(header)),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(None), None);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(trace_id(Some(bad)), None, "{bad}");
        }
    }
}
