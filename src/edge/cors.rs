//! CORS and Origin policy.
//!
//! Browsers send no preflight for a WebSocket and ignore CORS headers on a 101, so the only
//! protection against cross-site WebSocket hijacking is refusing the upgrade when its
//! `Origin` is not allowed, before any upstream is contacted. For plain HTTP the gateway
//! answers preflights itself and is the single source of `Access-Control-*` headers.

use regex::Regex;
use std::time::Duration;

/// One entry of `allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginRule {
    /// `*`: any origin but `null`.
    Any,
    /// An exact origin, lowercased: `https://app.example.com`, `http://127.0.0.1:5173`, `null`.
    Exact(String),
    /// `https://*.example.com[:port]`: any subdomain (at any depth) of the suffix, same scheme
    /// and port; never the bare domain.
    Subdomains {
        scheme: String,
        /// `.example.com`
        suffix: String,
        port: Option<u16>,
    },
}

#[derive(Debug)]
pub(crate) struct CorsPolicy {
    rules: Vec<OriginRule>,
    patterns: Vec<Regex>,
    allowed_methods: String,
    allowed_headers: String,
    exposed_headers: String,
    allow_credentials: bool,
    max_age: Option<Duration>,
    allow_missing_origin: bool,
}

/// The policy as written in the configuration, before validation.
#[derive(Debug, Default, Clone)]
pub(crate) struct CorsSpec {
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) allowed_origin_patterns: Vec<String>,
    pub(crate) allowed_methods: Vec<String>,
    pub(crate) allowed_headers: Vec<String>,
    pub(crate) exposed_headers: Vec<String>,
    pub(crate) allow_credentials: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) allow_missing_origin: bool,
}

/// Which entry of the spec is wrong, and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CorsSpecError {
    Origin { index: usize, why: String },
    Pattern { index: usize, why: String },
    Token { field: &'static str, index: usize },
    AnyWithCredentials,
}

/// What the policy says of a request's `Origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OriginVerdict {
    /// No `Origin` header: a non-browser client.
    Missing,
    Allowed,
    Refused,
}

pub(crate) const DEFAULT_METHODS: [&str; 3] = ["GET", "POST", "OPTIONS"];

impl CorsPolicy {
    pub(crate) fn new(spec: &CorsSpec) -> Result<Self, CorsSpecError> {
        let rules = spec
            .allowed_origins
            .iter()
            .enumerate()
            .map(|(index, origin)| {
                parse_rule(origin).map_err(|why| CorsSpecError::Origin { index, why })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if spec.allow_credentials && rules.contains(&OriginRule::Any) {
            return Err(CorsSpecError::AnyWithCredentials);
        }
        let patterns = spec
            .allowed_origin_patterns
            .iter()
            .enumerate()
            .map(|(index, p)| {
                Regex::new(&format!("^(?:{p})$")).map_err(|e| CorsSpecError::Pattern {
                    index,
                    why: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let methods: Vec<String> = if spec.allowed_methods.is_empty() {
            DEFAULT_METHODS.iter().map(|m| (*m).to_owned()).collect()
        } else {
            spec.allowed_methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect()
        };
        for (field, list) in [
            ("allowed_methods", &methods),
            ("allowed_headers", &spec.allowed_headers),
            ("exposed_headers", &spec.exposed_headers),
        ] {
            if let Some(index) = list.iter().position(|t| !is_token(t)) {
                return Err(CorsSpecError::Token { field, index });
            }
        }
        Ok(CorsPolicy {
            rules,
            patterns,
            allowed_methods: methods.join(", "),
            allowed_headers: spec.allowed_headers.join(", "),
            exposed_headers: spec.exposed_headers.join(", "),
            allow_credentials: spec.allow_credentials,
            max_age: spec.max_age,
            allow_missing_origin: spec.allow_missing_origin,
        })
    }

    /// Whether the (single) `Origin` value is allowed.
    pub(crate) fn verdict(&self, origin: Option<&str>) -> OriginVerdict {
        match origin {
            None => OriginVerdict::Missing,
            Some(origin) if self.allows(origin) => OriginVerdict::Allowed,
            Some(_) => OriginVerdict::Refused,
        }
    }

    /// Whether a WebSocket upgrade with this verdict may go upstream.
    pub(crate) fn admits_upgrade(&self, verdict: OriginVerdict) -> bool {
        match verdict {
            OriginVerdict::Allowed => true,
            OriginVerdict::Missing => self.allow_missing_origin,
            OriginVerdict::Refused => false,
        }
    }

    fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.rules.iter().any(|rule| rule_matches(rule, &origin))
            || self.patterns.iter().any(|p| p.is_match(&origin))
    }

    /// Headers for a response to an allowed origin (actual requests and 101s).
    pub(crate) fn response_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        let wildcard = !self.allow_credentials && self.rules.contains(&OriginRule::Any);
        let mut headers = vec![(
            "access-control-allow-origin",
            if wildcard {
                "*".to_owned()
            } else {
                origin.to_owned()
            },
        )];
        if self.allow_credentials {
            headers.push(("access-control-allow-credentials", "true".to_owned()));
        }
        if !self.exposed_headers.is_empty() {
            headers.push((
                "access-control-expose-headers",
                self.exposed_headers.clone(),
            ));
        }
        headers
    }

    /// Headers for the gateway's answer to a preflight from an allowed origin.
    pub(crate) fn preflight_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        let mut headers = self.response_headers(origin);
        headers.push(("access-control-allow-methods", self.allowed_methods.clone()));
        if !self.allowed_headers.is_empty() {
            headers.push(("access-control-allow-headers", self.allowed_headers.clone()));
        }
        if let Some(max_age) = self.max_age {
            headers.push(("access-control-max-age", max_age.as_secs().to_string()));
        }
        headers
    }
}

/// What the gateway does with a request under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CorsDecision {
    /// Forward it; `allowed_origin` gets the CORS response headers.
    Forward { allowed_origin: Option<String> },
    /// A preflight from an allowed origin: the gateway answers 204 with these headers.
    Preflight {
        headers: Vec<(&'static str, String)>,
    },
    /// Refuse with 403: an upgrade or preflight whose Origin is not allowed (or missing where
    /// required).
    Refuse,
}

/// The request's facts the policy decides on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CorsRequest<'a> {
    pub(crate) origin: Option<&'a str>,
    pub(crate) websocket: bool,
    /// `OPTIONS` with `Access-Control-Request-Method`.
    pub(crate) preflight: bool,
}

pub(crate) fn decide(policy: &CorsPolicy, request: CorsRequest<'_>) -> CorsDecision {
    let verdict = policy.verdict(request.origin);
    let allowed_origin = match (verdict, request.origin) {
        (OriginVerdict::Allowed, Some(origin)) => Some(origin.to_owned()),
        _ => None,
    };
    if request.websocket {
        return if policy.admits_upgrade(verdict) {
            CorsDecision::Forward { allowed_origin }
        } else {
            CorsDecision::Refuse
        };
    }
    if request.preflight {
        return match allowed_origin {
            Some(origin) => CorsDecision::Preflight {
                headers: policy.preflight_headers(&origin),
            },
            None => CorsDecision::Refuse,
        };
    }
    // A refused origin's plain request still goes through, with no CORS headers: the
    // browser keeps the answer from the page, and non-browser clients are unaffected.
    CorsDecision::Forward { allowed_origin }
}

/// Why a request's `Origin` header cannot be read as one origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OriginHeaderError {
    /// Several `Origin` headers: which one a later hop reads is anyone's guess.
    Several,
    NotText,
}

/// The single `Origin` of a request, if any.
pub(crate) fn request_origin(headers: &http::HeaderMap) -> Result<Option<&str>, OriginHeaderError> {
    let mut values = headers.get_all(http::header::ORIGIN).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(OriginHeaderError::Several);
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| OriginHeaderError::NotText)
}

fn rule_matches(rule: &OriginRule, origin: &str) -> bool {
    match rule {
        OriginRule::Any => origin != "null",
        OriginRule::Exact(exact) => exact == origin,
        OriginRule::Subdomains {
            scheme,
            suffix,
            port,
        } => {
            let Some((origin_scheme, authority)) = origin.split_once("://") else {
                return false;
            };
            let (host, origin_port) = split_port(authority);
            origin_scheme == scheme
                && origin_port == *port
                && host.len() > suffix.len()
                && host.ends_with(suffix.as_str())
                && is_host(host)
        }
    }
}

fn parse_rule(origin: &str) -> Result<OriginRule, String> {
    let lower = origin.to_ascii_lowercase();
    if lower == "*" {
        return Ok(OriginRule::Any);
    }
    if lower == "null" {
        return Ok(OriginRule::Exact(lower));
    }
    let (scheme, authority) = lower
        .split_once("://")
        .ok_or("an origin is scheme://host[:port], such as \"https://app.example.com\"")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err("the scheme is not valid".to_owned());
    }
    if authority.contains('/') {
        return Err("an origin has no path: drop everything after the host and port".to_owned());
    }
    let (host, port) = split_port(authority);
    if authority.contains(':') && port.is_none() {
        return Err("the port is not a number from 0 to 65535".to_owned());
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        if !is_host(suffix) || suffix.contains('*') {
            return Err(
                "a wildcard is \"*.\" followed by a domain, such as \"https://*.example.com\""
                    .to_owned(),
            );
        }
        return Ok(OriginRule::Subdomains {
            scheme: scheme.to_owned(),
            suffix: format!(".{suffix}"),
            port,
        });
    }
    if !is_host(host) {
        return Err(
            "the host is not valid (a wildcard may only be the first label: \"*.example.com\")"
                .to_owned(),
        );
    }
    Ok(OriginRule::Exact(lower))
}

fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse().ok())
        }
        _ => (authority, None),
    }
}

fn is_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
}

/// An HTTP token (RFC 9110 §5.6.2): what header and method names are.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], patterns: &[&str]) -> CorsPolicy {
        CorsPolicy::new(&CorsSpec {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            allowed_origin_patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
            allow_missing_origin: true,
            ..CorsSpec::default()
        })
        .expect("valid policy")
    }

    #[test]
    fn exact_origins() {
        let p = policy(&["https://app.example.com", "http://127.0.0.1:5173"], &[]);
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(p.allows("http://127.0.0.1:5173"));
        for refused in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.net",
            "http://127.0.0.1:5174",
            "null",
        ] {
            assert!(!p.allows(refused), "{refused}");
        }
    }

    #[test]
    fn wildcard_subdomains_refuse_look_alikes() {
        let p = policy(&["https://*.example.com"], &[]);
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("https://a.b.example.com"));
        for refused in [
            "https://example.com",
            "https://evil-example.com",
            "https://example.com.evil.net",
            "https://app.example.com.evil.net",
            "http://app.example.com",
            "https://app.example.com:444",
            "https://.example.com",
            "https://app.example.com/",
        ] {
            assert!(!p.allows(refused), "{refused}");
        }
    }

    #[test]
    fn patterns_are_anchored() {
        let p = policy(&[], &[r"https://preview-[0-9]+\.example\.dev"]);
        assert!(p.allows("https://preview-42.example.dev"));
        assert!(!p.allows("https://preview-42.example.dev.evil.net"));
        assert!(!p.allows("https://x.https://preview-42.example.dev"));
    }

    #[test]
    fn any_origin_but_null() {
        let p = policy(&["*"], &[]);
        assert!(p.allows("https://anything.example"));
        assert!(!p.allows("null"));
        assert!(policy(&["null"], &[]).allows("null"));
        assert_eq!(p.response_headers("https://a.b")[0].1, "*");
    }

    #[test]
    fn any_with_credentials_is_refused() {
        let spec = CorsSpec {
            allowed_origins: vec!["*".to_owned()],
            allow_credentials: true,
            ..CorsSpec::default()
        };
        assert_eq!(
            CorsPolicy::new(&spec).err(),
            Some(CorsSpecError::AnyWithCredentials)
        );
    }

    #[test]
    fn bad_entries_are_located() {
        for (origin, index) in [
            ("app.example.com", 0),
            ("https://a.com/path", 0),
            ("https://a.*.com", 0),
            ("https://a.com:http", 0),
        ] {
            let spec = CorsSpec {
                allowed_origins: vec![origin.to_owned()],
                ..CorsSpec::default()
            };
            assert!(
                matches!(CorsPolicy::new(&spec), Err(CorsSpecError::Origin { index: i, .. }) if i == index),
                "{origin}"
            );
        }
        let spec = CorsSpec {
            allowed_origin_patterns: vec!["(".to_owned()],
            ..CorsSpec::default()
        };
        assert!(matches!(
            CorsPolicy::new(&spec),
            Err(CorsSpecError::Pattern { index: 0, .. })
        ));
        let spec = CorsSpec {
            allowed_headers: vec!["ok".to_owned(), "bad header".to_owned()],
            ..CorsSpec::default()
        };
        assert_eq!(
            CorsPolicy::new(&spec).err(),
            Some(CorsSpecError::Token {
                field: "allowed_headers",
                index: 1
            })
        );
    }

    #[test]
    fn upgrade_admission() {
        let mut spec = CorsSpec {
            allowed_origins: vec!["https://a.example".to_owned()],
            ..CorsSpec::default()
        };
        spec.allow_missing_origin = true;
        let open = CorsPolicy::new(&spec).expect("valid");
        assert!(open.admits_upgrade(open.verdict(None)));
        assert!(open.admits_upgrade(open.verdict(Some("https://a.example"))));
        assert!(!open.admits_upgrade(open.verdict(Some("https://b.example"))));
        spec.allow_missing_origin = false;
        let strict = CorsPolicy::new(&spec).expect("valid");
        assert!(!strict.admits_upgrade(strict.verdict(None)));
    }

    #[test]
    fn decisions_for_upgrades_preflights_and_plain_requests() {
        let p = policy(&["https://a.example"], &[]);
        let request = |origin, websocket, preflight| CorsRequest {
            origin,
            websocket,
            preflight,
        };
        let allowed = Some("https://a.example");
        let refused = Some("https://b.example");
        assert_eq!(
            decide(&p, request(allowed, true, false)),
            CorsDecision::Forward {
                allowed_origin: Some("https://a.example".into())
            }
        );
        assert_eq!(
            decide(&p, request(refused, true, false)),
            CorsDecision::Refuse
        );
        assert_eq!(
            decide(&p, request(Some("null"), true, false)),
            CorsDecision::Refuse
        );
        assert_eq!(
            decide(&p, request(None, true, false)),
            CorsDecision::Forward {
                allowed_origin: None
            }
        );
        assert!(matches!(
            decide(&p, request(allowed, false, true)),
            CorsDecision::Preflight { .. }
        ));
        assert_eq!(
            decide(&p, request(refused, false, true)),
            CorsDecision::Refuse
        );
        assert_eq!(decide(&p, request(None, false, true)), CorsDecision::Refuse);
        assert_eq!(
            decide(&p, request(refused, false, false)),
            CorsDecision::Forward {
                allowed_origin: None
            }
        );
    }

    #[test]
    fn several_origins_are_an_error() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(request_origin(&headers), Ok(None));
        headers.append(
            http::header::ORIGIN,
            "https://a.example".parse().expect("value"),
        );
        assert_eq!(request_origin(&headers), Ok(Some("https://a.example")));
        headers.append(
            http::header::ORIGIN,
            "https://b.example".parse().expect("value"),
        );
        assert_eq!(request_origin(&headers), Err(OriginHeaderError::Several));
    }

    #[test]
    fn preflight_headers_carry_the_policy() {
        let spec = CorsSpec {
            allowed_origins: vec!["https://a.example".to_owned()],
            allowed_methods: vec!["get".to_owned(), "POST".to_owned()],
            allowed_headers: vec!["content-type".to_owned()],
            exposed_headers: vec!["x-agent".to_owned()],
            allow_credentials: true,
            max_age: Some(Duration::from_secs(600)),
            allow_missing_origin: true,
            ..CorsSpec::default()
        };
        let headers = CorsPolicy::new(&spec)
            .expect("valid")
            .preflight_headers("https://a.example");
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("access-control-allow-origin"),
            Some("https://a.example")
        );
        assert_eq!(get("access-control-allow-credentials"), Some("true"));
        assert_eq!(get("access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(get("access-control-allow-headers"), Some("content-type"));
        assert_eq!(get("access-control-expose-headers"), Some("x-agent"));
        assert_eq!(get("access-control-max-age"), Some("600"));
    }
}
