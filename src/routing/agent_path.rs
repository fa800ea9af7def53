//! Parsing `/{prefix}/{agent}/{instance}[/rest]` request paths.
//!
//! What is accepted, exactly (docs/configuration.md repeats this):
//! - the agent segment: ASCII letters, digits, `-` and `_`, at most 128 bytes;
//! - the instance segment: any non-empty run of bytes that are not `/`, passed upstream byte for
//!   byte (percent-encoding included), except that it may not be `.` or `..` (also
//!   percent-encoded), may not contain an encoded slash or backslash (`%2F`, `%5C`), a raw
//!   backslash, or NUL or another control byte (raw or percent-encoded);
//! - the rest of the path may not hold dot segments or control bytes either, so that no
//!   normalising hop behind the gateway can turn it into a path for another agent;
//! - a missing instance (`/agents/CoderAgent` or `/agents/CoderAgent/`) means the route's default.

use crate::routing::agent_name::MAX_AGENT_NAME_LEN;

/// A request path split at the route prefix.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AgentPath<'a> {
    pub(crate) agent: &'a str,
    /// `None` when the client named no instance.
    pub(crate) instance: Option<&'a str>,
    /// Everything after the instance, starting with `/`, or empty.
    pub(crate) rest: &'a str,
}

/// Why a path under a route prefix cannot be routed.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum PathError {
    MissingAgent,
    InvalidAgentSegment,
    InvalidInstanceSegment,
    DotSegment,
    ControlByte,
    /// A path outside every route that a URL parser or partyserver would read as one inside
    /// a route (`//agents/x/y`, `/a/../agents/x/y`, `/agents\\x/y`).
    RouteAlias,
}

impl PathError {
    /// A short sentence for the JSON error body.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            PathError::MissingAgent => {
                "the path names no agent: expected {prefix}/{agent}/{instance}"
            }
            PathError::InvalidAgentSegment => {
                "the agent segment may hold only ASCII letters, digits, '-' and '_' (at most 128)"
            }
            PathError::InvalidInstanceSegment => {
                "the instance segment may not be empty or hold an encoded slash or backslash"
            }
            PathError::DotSegment => "dot segments ('.' or '..') are not allowed in agent paths",
            PathError::ControlByte => "NUL and control bytes are not allowed in agent paths",
            PathError::RouteAlias => {
                "the path spells an agent route another way (repeated '/', dot segments or '\\'); use its canonical form"
            }
        }
    }

    /// A stable machine-readable name, used in error bodies and metric labels.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            PathError::MissingAgent => "missing_agent",
            PathError::InvalidAgentSegment => "invalid_agent_segment",
            PathError::InvalidInstanceSegment => "invalid_instance_segment",
            PathError::DotSegment => "dot_segment",
            PathError::ControlByte => "control_byte",
            PathError::RouteAlias => "route_alias",
        }
    }
}

/// `path` as the Worker's URL parser and partyserver would read it: `\\` as `/`, empty
/// segments dropped, dot segments (also percent-encoded, as the WHATWG URL parser reads them)
/// resolved. Written by hand because the gateway must predict exactly that reading, not
/// normalise in some library's own way.
pub(crate) fn as_upstream_reads(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split(['/', '\\']) {
        match segment.to_ascii_lowercase().as_str() {
            "" | "." | "%2e" => {}
            ".." | ".%2e" | "%2e." | "%2e%2e" => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    format!("/{}", segments.join("/"))
}

/// Whether `path` falls under `prefix` (which has no trailing `/`), returning what follows it.
pub(crate) fn strip_route_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let tail = path.strip_prefix(prefix)?;
    (tail.is_empty() || tail.starts_with('/')).then_some(tail)
}

/// Parses what follows the route prefix (empty or starting with `/`).
pub(crate) fn parse_agent_path(tail: &str) -> Result<AgentPath<'_>, PathError> {
    if has_control_byte(tail) {
        return Err(PathError::ControlByte);
    }
    let tail = tail.strip_prefix('/').unwrap_or(tail);
    let mut parts = tail.splitn(3, '/');
    let agent = parts.next().unwrap_or_default();
    let instance = parts.next().unwrap_or_default();
    let rest_without_slash = parts.next();

    if agent.is_empty() {
        return Err(PathError::MissingAgent);
    }
    if is_dot_segment(agent) || is_dot_segment(instance) {
        return Err(PathError::DotSegment);
    }
    let agent_ok = agent.len() <= MAX_AGENT_NAME_LEN
        && agent
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !agent_ok {
        return Err(PathError::InvalidAgentSegment);
    }
    let rest = match rest_without_slash {
        Some(r) => {
            if r.split('/').any(is_dot_segment) {
                return Err(PathError::DotSegment);
            }
            // The rest with its leading slash, borrowed from the input.
            &tail[agent.len() + 1 + instance.len()..]
        }
        None => "",
    };
    let instance = if instance.is_empty() {
        if !rest.is_empty() {
            return Err(PathError::InvalidInstanceSegment);
        }
        None
    } else {
        if has_encoded_separator(instance) || instance.contains('\\') {
            return Err(PathError::InvalidInstanceSegment);
        }
        Some(instance)
    };
    Ok(AgentPath {
        agent,
        instance,
        rest,
    })
}

fn is_dot_segment(segment: &str) -> bool {
    let lower = segment.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."
    )
}

/// Raw control bytes, or a percent-encoded one (`%00`-`%1F`, `%7F`).
fn has_control_byte(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_control())
        || percent_escapes(s).any(|byte| byte.is_ascii_control())
}

fn has_encoded_separator(s: &str) -> bool {
    percent_escapes(s).any(|byte| byte == b'/' || byte == b'\\')
}

/// The bytes that `%XX` escapes in `s` stand for.
fn percent_escapes(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.as_bytes().windows(3).filter_map(|w| {
        if w[0] != b'%' {
            return None;
        }
        let hi = char::from(w[1]).to_digit(16)?;
        let lo = char::from(w[2]).to_digit(16)?;
        u8::try_from(hi * 16 + lo).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(tail: &str) -> (String, Option<String>, String) {
        let p = parse_agent_path(tail).expect(tail);
        (
            p.agent.to_owned(),
            p.instance.map(str::to_owned),
            p.rest.to_owned(),
        )
    }

    #[test]
    fn splits_agent_instance_and_rest() {
        assert_eq!(
            parsed("/CoderAgent/default"),
            ("CoderAgent".into(), Some("default".into()), "".into())
        );
        assert_eq!(
            parsed("/coder-agent/Room%20A/messages/1"),
            (
                "coder-agent".into(),
                Some("Room%20A".into()),
                "/messages/1".into()
            )
        );
        assert_eq!(
            parsed("/CoderAgent"),
            ("CoderAgent".into(), None, "".into())
        );
        assert_eq!(
            parsed("/CoderAgent/"),
            ("CoderAgent".into(), None, "".into())
        );
    }

    #[test]
    fn refuses_what_could_reach_another_agent() {
        let cases = [
            ("", PathError::MissingAgent),
            ("/", PathError::MissingAgent),
            ("//default", PathError::MissingAgent),
            ("/..", PathError::DotSegment),
            ("/CoderAgent/..", PathError::DotSegment),
            ("/CoderAgent/%2e%2E", PathError::DotSegment),
            ("/CoderAgent/default/../../Other/x", PathError::DotSegment),
            ("/CoderAgent/default/./x", PathError::DotSegment),
            ("/CoderAgent/a%2Fb", PathError::InvalidInstanceSegment),
            ("/CoderAgent/a%2fb", PathError::InvalidInstanceSegment),
            ("/CoderAgent/a%5Cb", PathError::InvalidInstanceSegment),
            ("/CoderAgent/a\\b", PathError::InvalidInstanceSegment),
            ("/CoderAgent//x", PathError::InvalidInstanceSegment),
            ("/CoderAgent/a%00b", PathError::ControlByte),
            ("/CoderAgent/a\u{1}b", PathError::ControlByte),
            ("/CoderAgent/a/%0d%0a", PathError::ControlByte),
            ("/Coder%41gent/default", PathError::InvalidAgentSegment),
            ("/coder.agent/default", PathError::InvalidAgentSegment),
        ];
        for (tail, err) in cases {
            assert_eq!(parse_agent_path(tail), Err(err), "{tail:?}");
        }
    }

    #[test]
    fn prefix_must_end_at_a_segment_boundary() {
        assert_eq!(strip_route_prefix("/agents/x", "/agents"), Some("/x"));
        assert_eq!(strip_route_prefix("/agents", "/agents"), Some(""));
        assert_eq!(strip_route_prefix("/agentsx/y", "/agents"), None);
        assert_eq!(strip_route_prefix("/other", "/agents"), None);
    }

    #[test]
    fn instance_keeps_its_bytes() {
        let p = parse_agent_path("/a/Default%2Bx~y").expect("valid");
        assert_eq!(p.instance, Some("Default%2Bx~y"));
    }
}
