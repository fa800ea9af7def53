//! Agent-name folding and the Agents SDK's canonical slug.
//!
//! Clients spell agent names every way the field has seen (`CoderAgent`, `coderagent`,
//! `coder-agent`, `CODER_AGENT`); the Agents SDK only answers to the kebab-case slug of the
//! binding name. Matching uses [`fold_key`]; the path sent upstream uses [`sdk_slug`].

/// The key two spellings of one agent name share: ASCII lowercase with `-` and `_` removed.
pub(crate) fn fold_key(name: &str) -> String {
    name.bytes()
        .filter(|b| *b != b'-' && *b != b'_')
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect()
}

/// The slug the Agents SDK derives from a binding name (`camelCaseToKebabCase` in its utils).
///
/// Reproduced rule for rule, including its quirks, because the Worker compares the URL
/// segment against exactly this string:
/// - a name that is all capitals is lowercased and `_` becomes `-`;
/// - otherwise every capital becomes `-` plus its lowercase, one leading `-` is dropped,
///   `_` becomes `-` and one trailing `-` is dropped.
pub(crate) fn sdk_slug(binding: &str) -> String {
    let has_cased = binding.bytes().any(|b| b.is_ascii_alphabetic());
    let all_capitals = has_cased && !binding.bytes().any(|b| b.is_ascii_lowercase());
    if all_capitals {
        return binding.to_ascii_lowercase().replace('_', "-");
    }
    let mut slug = String::with_capacity(binding.len() + 4);
    for c in binding.chars() {
        if c.is_ascii_uppercase() {
            slug.push('-');
            slug.push(c.to_ascii_lowercase());
        } else {
            slug.push(c);
        }
    }
    if slug.starts_with('-') {
        slug.remove(0);
    }
    let mut slug = slug.replace('_', "-");
    if slug.ends_with('-') {
        slug.pop();
    }
    slug
}

/// Whether `name` may name an agent: a binding name is an identifier, so ASCII letters,
/// digits, `-` and `_`, starting with a letter.
pub(crate) fn is_valid_agent_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name.len() <= MAX_AGENT_NAME_LEN
}

/// A few spellings that reach `name`, for the routing table `check` prints.
pub(crate) fn example_spellings(name: &str) -> Vec<String> {
    let slug = sdk_slug(name);
    let mut spellings = vec![
        name.to_owned(),
        fold_key(name),
        slug.clone(),
        slug.replace('-', "_"),
        slug.replace('-', "_").to_ascii_uppercase(),
    ];
    let mut seen = std::collections::HashSet::new();
    spellings.retain(|s| seen.insert(s.clone()));
    spellings
}

/// Longest agent name or URL agent segment accepted.
pub(crate) const MAX_AGENT_NAME_LEN: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_matches_the_sdk_table() {
        let table = [
            ("CoderAgent", "coder-agent"),
            ("CODER_AGENT", "coder-agent"),
            ("coderagent", "coderagent"),
            ("MyMCPAgent", "my-m-c-p-agent"),
            ("coder_agent", "coder-agent"),
            ("Chat", "chat"),
            ("chat", "chat"),
            ("CHAT", "chat"),
            ("Coder_", "coder"),
            ("A__", "a--"),
            ("Ab__", "ab-"),
            ("coder-agent", "coder-agent"),
            ("Agent2", "agent2"),
            ("AGENT_2", "agent-2"),
            ("myAgent", "my-agent"),
        ];
        for (binding, slug) in table {
            assert_eq!(sdk_slug(binding), slug, "slug of {binding}");
        }
    }

    #[test]
    fn every_field_spelling_folds_to_one_key() {
        let spellings = [
            "CoderAgent",
            "coderagent",
            "coder-agent",
            "coder_agent",
            "CODER_AGENT",
        ];
        for s in spellings {
            assert_eq!(fold_key(s), "coderagent", "fold of {s}");
        }
        assert_ne!(fold_key("CoderAgent2"), fold_key("CoderAgent"));
    }

    #[test]
    fn agent_names_are_identifiers() {
        assert!(is_valid_agent_name("CoderAgent"));
        assert!(is_valid_agent_name("coder_agent-2"));
        for bad in [
            "",
            "2agent",
            "-agent",
            "coder.agent",
            "coder agent",
            "coder/agent",
        ] {
            assert!(!is_valid_agent_name(bad), "{bad:?} accepted");
        }
        assert!(!is_valid_agent_name(&"a".repeat(MAX_AGENT_NAME_LEN + 1)));
    }
}
