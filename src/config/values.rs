//! Readers of one value each: a field as the file spells it in, the checked value or an
//! error that points at the field out.

use super::context::Ctx;
use super::file::SpannedString;
use super::ConfigError;
use std::time::Duration;
use toml::Spanned;

impl Ctx<'_> {
    /// A listener: an IP address and a port, nothing to resolve.
    pub(crate) fn socket_address(&self, value: &SpannedString) -> Result<String, ConfigError> {
        value
            .get_ref()
            .parse::<std::net::SocketAddr>()
            .map_err(|_| {
                self.error(
                    value,
                    "a listener is an IP address and port, such as \"127.0.0.1:8080\"",
                )
            })?;
        Ok(value.get_ref().clone())
    }

    pub(crate) fn socket_address_or(
        &self,
        value: Option<&SpannedString>,
        default: &str,
    ) -> Result<String, ConfigError> {
        value.map_or_else(|| Ok(default.to_owned()), |v| self.socket_address(v))
    }

    /// `host:port`, or `host` alone when a default port applies. Resolution happens per
    /// connection, so a name that moves is followed without a reload.
    pub(crate) fn host_port(
        &self,
        value: &SpannedString,
        default_port: Option<u16>,
    ) -> Result<String, ConfigError> {
        let v = value.get_ref();
        let bad = || {
            self.error(
                value,
                format!("{v:?} is not a \"host:port\" address, such as \"127.0.0.1:8787\" or \"agents.example.com:443\""),
            )
        };
        if v.parse::<std::net::SocketAddr>().is_ok() {
            return Ok(v.clone());
        }
        let (host, port) = match v.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
            Some(_) => return Err(bad()),
            None => (v.as_str(), None),
        };
        match (is_made_of(host, b"-."), port.or(default_port)) {
            (true, Some(port)) => Ok(format!("{host}:{port}")),
            _ => Err(bad()),
        }
    }

    /// A route prefix (`field` names which): the path segments a request must start with.
    pub(crate) fn prefix(&self, p: &SpannedString, field: &str) -> Result<String, ConfigError> {
        let value = p.get_ref();
        let ok = value.starts_with('/')
            && !value.ends_with('/')
            && value.split('/').skip(1).all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'?' && b != b'#')
            });
        if !ok {
            return Err(self.error(
                p,
                format!("`{field}` must be a path such as \"/agents\": starting with '/', no trailing '/', no empty, dot or percent-encoded segments"),
            ));
        }
        Ok(value.clone())
    }

    pub(crate) fn secret_name(&self, name: &SpannedString) -> Result<String, ConfigError> {
        let n = name.get_ref();
        if !is_secret_name(n) {
            return Err(self.error(
                name,
                "a secret name is an identifier such as OPENROUTER_API_KEY",
            ));
        }
        Ok(n.clone())
    }

    /// A `require` list, in order; the first bad name is the error.
    pub(crate) fn secret_names(&self, names: &[SpannedString]) -> Result<Vec<String>, ConfigError> {
        names.iter().map(|n| self.secret_name(n)).collect()
    }

    pub(crate) fn duration(&self, value: &SpannedString) -> Result<Duration, ConfigError> {
        parse_duration(value.get_ref()).ok_or_else(|| {
            self.error(
                value,
                "a duration is a number with a unit: \"500ms\", \"5s\", \"2m\" or \"1h\"",
            )
        })
    }

    pub(crate) fn duration_or(
        &self,
        value: Option<&SpannedString>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        value.map_or(Ok(default), |v| self.duration(v))
    }

    /// A timeout that `"0s"` turns off.
    pub(crate) fn duration_or_off(
        &self,
        value: Option<&SpannedString>,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => Ok(Some(self.duration(v)?).filter(|d| !d.is_zero())),
        }
    }

    /// A cap that 0 turns off; `message` says what the field holds when it is negative.
    pub(crate) fn count_or_off(
        &self,
        value: Option<&Spanned<i64>>,
        default: Option<u64>,
        message: &str,
    ) -> Result<Option<u64>, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Ok(None),
            Some(v) => u64::try_from(*v.get_ref())
                .map(Some)
                .map_err(|_| self.error(v, message)),
        }
    }
}

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Not empty, and only ASCII letters, digits and the bytes in `extra`.
pub(crate) fn is_made_of(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// A name or URL segment that needs no escaping: letters, digits, '-' and '_'.
pub(crate) fn is_word(s: &str, max_len: usize) -> bool {
    s.len() <= max_len && is_made_of(s, b"-_")
}

/// An identifier, as environment variable names are: `OPENROUTER_API_KEY`.
pub(crate) fn is_secret_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Names that go into metric labels and logs as they are.
pub(crate) fn is_label_safe(name: &str) -> bool {
    is_word(name, 64)
}

/// The host of a `host:port` address, without an IPv6 address's brackets.
pub(crate) fn host_of(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

pub(crate) fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A context over `text` and a value spanning `span` of it.
    fn at(span: std::ops::Range<usize>, value: &str) -> SpannedString {
        Spanned::new(span, value.to_owned())
    }

    const TEXT: &str = "a = 1\nvalue = \"x\"\n";

    fn ctx() -> Ctx<'static> {
        Ctx {
            text: TEXT,
            path: Path::new("gateway.toml"),
        }
    }

    /// The value sits at line 2, column 9.
    fn value(s: &str) -> SpannedString {
        at(14..17, s)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
    }

    #[test]
    fn durations_overflow_and_units() {
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration(&format!("{}h", u64::MAX)), None);
        assert_eq!(parse_duration("5d"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn duration_defaults_and_off() {
        let c = ctx();
        let five = Duration::from_secs(5);
        assert_eq!(c.duration_or(None, five).ok(), Some(five));
        assert_eq!(
            c.duration_or(Some(&value("2s")), five).ok(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(c.duration_or_off(None, Some(five)).ok(), Some(Some(five)));
        assert_eq!(
            c.duration_or_off(Some(&value("0s")), Some(five)).ok(),
            Some(None)
        );
        let err = c.duration_or(Some(&value("5")), five).expect_err("no unit");
        assert_eq!(
            err.to_string(),
            "gateway.toml:2:9: a duration is a number with a unit: \"500ms\", \"5s\", \"2m\" or \"1h\""
        );
    }

    #[test]
    fn counts_zero_is_off_and_negatives_are_refused() {
        let c = ctx();
        let n = |v: i64| Spanned::new(14..17, v);
        assert_eq!(c.count_or_off(None, Some(7), "m").ok(), Some(Some(7)));
        assert_eq!(c.count_or_off(Some(&n(0)), Some(7), "m").ok(), Some(None));
        assert_eq!(c.count_or_off(Some(&n(3)), None, "m").ok(), Some(Some(3)));
        let err = c
            .count_or_off(Some(&n(-1)), None, "bad count")
            .expect_err("negative");
        assert_eq!(err.to_string(), "gateway.toml:2:9: bad count");
    }

    #[test]
    fn host_ports() {
        let c = ctx();
        let hp = |v: &str, port| c.host_port(&value(v), port).map_err(|e| e.message);
        assert_eq!(
            hp("127.0.0.1:8787", None).ok().as_deref(),
            Some("127.0.0.1:8787")
        );
        assert_eq!(hp("[::1]:8787", None).ok().as_deref(), Some("[::1]:8787"));
        assert_eq!(
            hp("agents.example.com", Some(443)).ok().as_deref(),
            Some("agents.example.com:443")
        );
        assert_eq!(
            hp("a.example:80", Some(443)).ok().as_deref(),
            Some("a.example:80")
        );
        for bad in [
            "agents.example.com",
            "a b:1",
            ":80",
            "a:x",
            "a:99999",
            "::1",
        ] {
            let err = hp(bad, None).expect_err(bad);
            assert!(
                err.contains("is not a \"host:port\" address"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn prefixes() {
        let c = ctx();
        let p = |v: &str| c.prefix(&value(v), "prefix").map_err(|e| e.message);
        assert_eq!(p("/agents").ok().as_deref(), Some("/agents"));
        assert_eq!(p("/a/b-c").ok().as_deref(), Some("/a/b-c"));
        for bad in [
            "agents", "/agents/", "/", "/a//b", "/a/./b", "/a/../b", "/a%2Fb", "/a?b", "/a b",
        ] {
            let err = p(bad).expect_err(bad);
            assert!(err.starts_with("`prefix` must be a path"), "{bad}: {err}");
        }
    }

    #[test]
    fn listeners() {
        let c = ctx();
        assert_eq!(
            c.socket_address_or(None, "127.0.0.1:1").ok().as_deref(),
            Some("127.0.0.1:1")
        );
        assert!(c.socket_address(&value("[::]:443")).is_ok());
        let err = c
            .socket_address(&value("localhost:80"))
            .expect_err("not an IP");
        assert!(
            err.message.starts_with("a listener is an IP address"),
            "{err}"
        );
    }

    #[test]
    fn secret_and_label_names() {
        assert!(is_secret_name("OPENROUTER_API_KEY"));
        assert!(is_secret_name("_x1"));
        assert!(!is_secret_name("1X"));
        assert!(!is_secret_name(""));
        assert!(!is_secret_name("A-B"));
        let c = ctx();
        assert_eq!(
            c.secret_names(&[value("A"), value("B_2")]).ok(),
            Some(vec!["A".to_owned(), "B_2".to_owned()])
        );
        assert!(c.secret_names(&[value("A"), value("no-dash")]).is_err());
        assert!(is_label_safe("route_1-a"));
        assert!(!is_label_safe(""));
        assert!(!is_label_safe("a.b"));
        assert!(is_label_safe(&"x".repeat(64)));
        assert!(!is_label_safe(&"x".repeat(65)));
        assert!(is_made_of("a-b.c", b"-."));
        assert!(!is_made_of("", b"-."));
    }

    #[test]
    fn hosts_and_lists() {
        assert_eq!(host_of("agents.example.com:443"), "agents.example.com");
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("plain"), "plain");
        assert_eq!(list_or_none(&[]), "none");
        assert_eq!(list_or_none(&["a", "b"]), "a, b");
    }
}
