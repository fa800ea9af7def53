//! Which instances a verified client may open, from its claims: the instance must equal a
//! claim (each user has an agent of their own), or `agent/instance` must match one of the
//! patterns a claim lists (a team's agents). Mismatches answer 403.

use super::{AuthFailure, Identity};
use serde_json::Value;

/// A policy's instance scoping; both `None`: any instance of the agents it guards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct InstanceScope {
    /// The claim the instance must equal (`sub`, or any other).
    pub(crate) instance_claim: Option<String>,
    /// The claim listing `agent/instance` patterns; `*` matches any run of characters.
    pub(crate) patterns_claim: Option<String>,
}

impl InstanceScope {
    /// Whether `identity` may open `instance` of the agent named `agent` (its slug) or
    /// `binding` (its configured name); agent names compare in any case, instances exactly.
    pub(crate) fn check(
        &self,
        identity: &Identity,
        agent: &str,
        binding: &str,
        instance: &str,
    ) -> Result<(), AuthFailure> {
        if let Some(claim) = &self.instance_claim {
            let own = identity.claims.get(claim).and_then(claim_text);
            if own.as_deref() != Some(instance) {
                return Err(AuthFailure::Forbidden(format!(
                    "the token's {claim:?} claim does not name instance {instance:?}"
                )));
            }
        }
        if let Some(claim) = &self.patterns_claim {
            let patterns: Vec<String> = match identity.claims.get(claim) {
                Some(Value::Array(items)) => items.iter().filter_map(claim_text).collect(),
                Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
                _ => Vec::new(),
            };
            let allowed = patterns.iter().any(|pattern| {
                let (agent_pattern, instance_pattern) =
                    pattern.split_once('/').unwrap_or((pattern.as_str(), "*"));
                let agent_matches = [agent, binding].iter().any(|name| {
                    glob(
                        &agent_pattern.to_ascii_lowercase(),
                        &name.to_ascii_lowercase(),
                    )
                });
                agent_matches && glob(instance_pattern, instance)
            });
            if !allowed {
                return Err(AuthFailure::Forbidden(format!(
                    "no pattern in the token's {claim:?} claim allows {agent}/{instance}"
                )));
            }
        }
        Ok(())
    }
}

/// A claim as text: strings as they are, numbers and booleans printed.
pub(crate) fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// `*` matches any run of characters, everything else itself. Iterative with one backtrack
/// point, so a hostile pattern cannot make it exponential.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_p, star_t)) = star {
            pi = star_p + 1;
            ti = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity(claims: Value) -> Identity {
        Identity {
            subject: "alice".into(),
            claims: claims.as_object().unwrap().clone(),
            expires_at: None,
        }
    }

    #[test]
    fn an_instance_claim_must_equal_the_instance() {
        let scope = InstanceScope {
            instance_claim: Some("sub".into()),
            patterns_claim: None,
        };
        let alice = identity(json!({"sub": "alice"}));
        assert!(scope
            .check(&alice, "coder-agent", "CoderAgent", "alice")
            .is_ok());
        let refused = scope.check(&alice, "coder-agent", "CoderAgent", "bob");
        assert!(matches!(refused, Err(AuthFailure::Forbidden(_))));
        assert!(scope
            .check(&alice, "coder-agent", "CoderAgent", "Alice")
            .is_err());
        let numeric = identity(json!({"sub": 42}));
        assert!(scope.check(&numeric, "a", "A", "42").is_ok());
    }

    #[test]
    fn patterns_match_agent_in_any_case_and_instance_exactly() {
        let scope = InstanceScope {
            instance_claim: None,
            patterns_claim: Some("agents".into()),
        };
        let team = identity(json!({"agents": ["coder-agent/team-*", "ChatAgent/*"]}));
        assert!(scope
            .check(&team, "coder-agent", "CoderAgent", "team-7")
            .is_ok());
        assert!(scope
            .check(&team, "chat-agent", "ChatAgent", "anything")
            .is_ok());
        assert!(scope
            .check(&team, "coder-agent", "CoderAgent", "other")
            .is_err());
        assert!(scope
            .check(&team, "coder-agent", "CoderAgent", "Team-7")
            .is_err());
        let spaced = identity(json!({"agents": "coder-agent/x other/*"}));
        assert!(scope
            .check(&spaced, "coder-agent", "CoderAgent", "x")
            .is_ok());
        let none = identity(json!({}));
        assert!(scope
            .check(&none, "coder-agent", "CoderAgent", "x")
            .is_err());
    }

    #[test]
    fn glob_handles_stars_anywhere_without_blowing_up() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("*b*", "abc"));
        assert!(!glob("a*c", "abd"));
        let hostile = "a*".repeat(50) + "b";
        assert!(!glob(&hostile, &"a".repeat(200)));
    }
}
