//! `[upstreams.*]`: one extractor per upstream and one per kind, and the lookup that turns a
//! reference to an upstream into the upstream.

use super::context::Ctx;
use super::file::{SpannedString, UpstreamSection};
use super::values::{host_of, is_label_safe, is_made_of, is_secret_name, list_or_none};
use super::{ConfigError, DEFAULT_PROBE_INTERVAL};
use crate::upstream::{
    Probe, Upstream, UpstreamKind, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT,
};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub(crate) type Upstreams = BTreeMap<String, Arc<Upstream>>;

impl Ctx<'_> {
    pub(crate) fn extract_upstreams(
        &self,
        sections: BTreeMap<String, UpstreamSection>,
    ) -> Result<Upstreams, ConfigError> {
        sections
            .into_iter()
            .map(|(name, section)| {
                let upstream = self.extract_upstream(&name, &section)?;
                Ok((name, Arc::new(upstream)))
            })
            .collect()
    }

    /// The upstream `reference` names, or an error that lists the defined ones.
    pub(crate) fn upstream_named(
        &self,
        upstreams: &Upstreams,
        reference: &SpannedString,
    ) -> Result<Arc<Upstream>, ConfigError> {
        upstreams.get(reference.get_ref()).cloned().ok_or_else(|| {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            self.error(
                reference,
                format!(
                    "no upstream is named {:?}; the [upstreams] table defines: {}",
                    reference.get_ref(),
                    list_or_none(&known)
                ),
            )
        })
    }

    fn extract_upstream(
        &self,
        name: &str,
        section: &UpstreamSection,
    ) -> Result<Upstream, ConfigError> {
        if !is_label_safe(name) {
            return Err(self.error(
                &section.kind,
                format!("upstream name {name:?} may hold only ASCII letters, digits, '-' and '_'"),
            ));
        }
        let require = self.secret_names(section.require.as_deref().unwrap_or_default())?;
        let forward_secrets = self.extract_forward_secrets(section)?;
        let probe = self.extract_probe(section)?;
        let connect_timeout =
            self.duration_or(section.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT)?;
        let read_timeout = self.duration_or(section.read_timeout.as_ref(), DEFAULT_READ_TIMEOUT)?;
        let kind = match section.kind.get_ref().as_str() {
            "local" => self.extract_local(name, section)?,
            "worker" => self.extract_worker(name, section)?,
            other => {
                return Err(self.error(
                    &section.kind,
                    format!("unknown upstream kind {other:?}; expected \"worker\" (a Cloudflare Worker running routeAgentRequest) or \"local\" (a self-hosted agent backend)"),
                ))
            }
        };
        Ok(Upstream {
            name: name.to_owned(),
            kind,
            connect_timeout,
            read_timeout,
            require,
            forward_secrets,
            probe,
        })
    }

    /// `forward_secrets`: (secret, header) pairs, in the table's order.
    fn extract_forward_secrets(
        &self,
        section: &UpstreamSection,
    ) -> Result<Vec<(String, http::HeaderName)>, ConfigError> {
        let Some(forward) = &section.forward_secrets else {
            return Ok(Vec::new());
        };
        if section.kind.get_ref() != "local" {
            return Err(self.error(
                forward,
                "`forward_secrets` is for local upstreams; a Worker keeps its key as a Worker secret",
            ));
        }
        forward
            .get_ref()
            .iter()
            .map(|(secret, header)| {
                if !is_secret_name(secret) {
                    return Err(self.error(header, format!("{secret:?} is not a secret name")));
                }
                let name = http::HeaderName::from_bytes(header.get_ref().as_bytes())
                    .map_err(|_| self.error(header, "not a valid header name"))?;
                Ok((secret.clone(), name))
            })
            .collect()
    }

    fn extract_probe(&self, section: &UpstreamSection) -> Result<Option<Probe>, ConfigError> {
        let Some(path) = &section.probe_path else {
            return match &section.probe_interval {
                Some(interval) => {
                    Err(self.error(interval, "`probe_interval` needs a `probe_path`"))
                }
                None => Ok(None),
            };
        };
        if !path.get_ref().starts_with('/') {
            return Err(self.error(
                path,
                "`probe_path` is a path such as \"/agents/coder-agent/probe\"",
            ));
        }
        Ok(Some(Probe {
            path: path.get_ref().clone(),
            interval: self.duration_or(section.probe_interval.as_ref(), DEFAULT_PROBE_INTERVAL)?,
        }))
    }

    fn extract_worker(
        &self,
        name: &str,
        section: &UpstreamSection,
    ) -> Result<UpstreamKind, ConfigError> {
        if let Some(nodes) = &section.nodes {
            return Err(self.error(
                nodes,
                "`nodes` is for local upstreams; a worker upstream has one `address`",
            ));
        }
        self.refuse_fleet_fields(section)?;
        let tls = section.tls.as_ref().is_none_or(|t| *t.get_ref());
        let address_field = section.address.as_ref().ok_or_else(|| {
            self.error(
                &section.kind,
                format!("worker upstream {name:?} needs an `address`, such as \"agents.example.com:443\""),
            )
        })?;
        let address = self.host_port(address_field, Some(if tls { 443 } else { 80 }))?;
        let host = match &section.host {
            Some(h) if !is_made_of(h.get_ref(), b"-.:[]") => {
                return Err(self.error(
                    h,
                    "`host` must be a host name such as \"agents.example.com\"",
                ));
            }
            Some(h) => h.get_ref().clone(),
            None => host_of(&address).to_owned(),
        };
        let ca = match &section.ca_file {
            Some(f) if !tls => return Err(self.error(f, "`ca_file` needs `tls = true`")),
            Some(f) => Some(self.named_file(f)),
            None => None,
        };
        Ok(UpstreamKind::Worker {
            address,
            host,
            tls,
            ca_file: ca,
            ca: OnceLock::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{error_of, load_error_of, parse, GOOD};
    use crate::upstream::{Probe, UpstreamKind};
    use std::time::Duration;

    const LOCAL: &str = "nodes = [\"127.0.0.1:8787\", \"127.0.0.1:8788\"]";
    const WORKER: &str = "address = \"agents.example.com\"";

    #[test]
    fn kinds_are_checked() {
        let err = error_of(&GOOD.replace("kind = \"worker\"", "kind = \"lambda\""));
        assert!(err.contains("unknown upstream kind \"lambda\""), "{err}");
        let err = error_of(&GOOD.replace("address = \"agents.example.com\"", "nodes = [\"a:1\"]"));
        assert!(err.contains("`nodes` is for local upstreams"), "{err}");
        let err = error_of(&GOOD.replace("\"127.0.0.1:8788\"", "\"127.0.0.1:8787\""));
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn each_kind_needs_its_own_fields() {
        let err = error_of(&GOOD.replace(LOCAL, "address = \"a:1\""));
        assert_eq!(err, "gateway.toml:7:11: `address` is for worker upstreams; a local upstream has `nodes`, `dns` or `srv`");
        let err = error_of(&GOOD.replace(LOCAL, ""));
        assert_eq!(err, "gateway.toml:6:8: local upstream \"local\" needs `nodes` (a list such as [\"127.0.0.1:8787\"]), `dns` with `port`, or `srv`");
        let err = error_of(&GOOD.replace(LOCAL, "nodes = []"));
        assert!(err.contains("`nodes` must list at least one"), "{err}");
        let err = error_of(&GOOD.replace(WORKER, ""));
        assert_eq!(err, "gateway.toml:10:8: worker upstream \"cloud\" needs an `address`, such as \"agents.example.com:443\"");
        let err = error_of(&GOOD.replace(
            WORKER,
            "address = \"a:1\"\nca_file = \"ca.pem\"\ntls = false",
        ));
        assert!(err.contains("`ca_file` needs `tls = true`"), "{err}");
        let err = error_of(&GOOD.replace("[upstreams.cloud]", "[upstreams.\"cl oud\"]"));
        assert!(
            err.contains("upstream name \"cl oud\" may hold only"),
            "{err}"
        );
    }

    #[test]
    fn workers_default_port_and_host() {
        let text = GOOD.replace(
            WORKER,
            "address = \"10.0.0.1\"\ntls = false\nhost = \"agents.internal\"",
        );
        let config = parse(&text).expect("valid");
        match &config.upstreams["cloud"].kind {
            UpstreamKind::Worker {
                address,
                host,
                tls,
                ca_file,
                ..
            } => {
                assert_eq!(address, "10.0.0.1:80");
                assert_eq!(host, "agents.internal");
                assert!(!*tls && ca_file.is_none());
            }
            other => panic!("expected a worker, got {other:?}"),
        }
        let err = error_of(&GOOD.replace(WORKER, "address = \"a:1\"\nhost = \"a b\""));
        assert!(err.contains("`host` must be a host name"), "{err}");
        let err = load_error_of(&GOOD.replace(
            WORKER,
            "address = \"a:1\"\nca_file = \"/nonexistent/ca.pem\"",
        ));
        assert!(
            err.contains("cannot use /nonexistent/ca.pem as a CA file: "),
            "{err}"
        );
    }

    #[test]
    fn probes_timeouts_and_forwarded_secrets() {
        let text = GOOD.replace(
            LOCAL,
            "nodes = [\"n1:1\"]\nprobe_path = \"/probe\"\nread_timeout = \"2s\"\nforward_secrets = { KEY = \"x-key\" }",
        );
        let config = parse(&text).expect("valid");
        let local = &config.upstreams["local"];
        let probe = Probe {
            path: "/probe".to_owned(),
            interval: crate::config::DEFAULT_PROBE_INTERVAL,
        };
        assert_eq!(local.probe, Some(probe));
        assert_eq!(local.read_timeout, Duration::from_secs(2));
        assert_eq!(
            local.connect_timeout,
            crate::upstream::DEFAULT_CONNECT_TIMEOUT
        );
        assert_eq!(local.forward_secrets[0].0, "KEY");
        assert_eq!(local.forward_secrets[0].1.as_str(), "x-key");
        let err = error_of(&GOOD.replace(LOCAL, "nodes = [\"n1:1\"]\nprobe_interval = \"5s\""));
        assert!(
            err.contains("`probe_interval` needs a `probe_path`"),
            "{err}"
        );
        let err = error_of(&GOOD.replace(LOCAL, "nodes = [\"n1:1\"]\nprobe_path = \"probe\""));
        assert!(err.contains("`probe_path` is a path"), "{err}");
        let err = error_of(&GOOD.replace(
            WORKER,
            "address = \"a:1\"\nforward_secrets = { KEY = \"x-key\" }",
        ));
        assert!(
            err.contains("`forward_secrets` is for local upstreams"),
            "{err}"
        );
        let err = error_of(&GOOD.replace(
            LOCAL,
            "nodes = [\"n1:1\"]\nforward_secrets = { \"not-a-name\" = \"x-key\" }",
        ));
        assert!(err.contains("\"not-a-name\" is not a secret name"), "{err}");
        let err = error_of(&GOOD.replace(
            LOCAL,
            "nodes = [\"n1:1\"]\nforward_secrets = { KEY = \"x key\" }",
        ));
        assert!(err.contains("not a valid header name"), "{err}");
    }
}
