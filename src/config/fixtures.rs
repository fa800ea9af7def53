//! Configuration texts shared by the unit tests of the crate, so that each test states only
//! what it relies on.

use super::GatewayConfig;
use std::path::Path;

/// A `local` upstream with one node and a `worker` upstream, named `local` and `cloud`.
pub(crate) const UPSTREAMS: &str = r#"
[upstreams.local]
kind = "local"
nodes = ["127.0.0.1:1"]
[upstreams.cloud]
kind = "worker"
address = "agents.example.com"
"#;

/// The agents of a route: `CoderAgent` on `local` and `Chat` on `cloud`.
pub(crate) const CODER_AND_CHAT: &str = r#"
[[routes.agents]]
name = "CoderAgent"
upstream = "local"
[[routes.agents]]
name = "Chat"
upstream = "cloud"
"#;

/// `UPSTREAMS` and one route of `CODER_AND_CHAT` that requires `secret`, read from a file
/// that does not exist: missing for the local agent, the Worker's own business for the other.
pub(crate) fn requiring_missing(secret: &str, before: &str) -> GatewayConfig {
    parse(&format!(
        "{before}{UPSTREAMS}[secrets.{secret}]\nfile = \"/nonexistent/{secret}\"\n\
         [[routes]]\nrequire = [\"{secret}\"]\n{CODER_AND_CHAT}"
    ))
}

/// Parses a test configuration that must be valid.
pub(crate) fn parse(text: &str) -> GatewayConfig {
    match GatewayConfig::parse(text, Path::new("t.toml")) {
        Ok(config) => config,
        Err(e) => panic!("test configuration refused: {e}"),
    }
}
