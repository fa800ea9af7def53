//! A `local` upstream's fleet: where its nodes come from (`nodes`, `dns` with `port`, or
//! `srv`) and how they are checked (`health_*`, `healthy_after`, `unhealthy_after`).

use super::context::Ctx;
use super::file::{SpannedString, UpstreamSection};
use super::ConfigError;
use crate::fleet::discovery::DnsQuery;
use crate::fleet::health::{ActiveCheck, HealthSettings};
use crate::fleet::{FleetSettings, NodeSource};
use crate::upstream::UpstreamKind;
use std::time::Duration;
use toml::Spanned;

const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_HEALTH_PATH: &str = "/healthz";

impl Ctx<'_> {
    pub(crate) fn extract_local(
        &self,
        name: &str,
        section: &UpstreamSection,
    ) -> Result<UpstreamKind, ConfigError> {
        for (field, present) in [
            ("address", section.address.as_ref().map(Spanned::span)),
            ("host", section.host.as_ref().map(Spanned::span)),
            ("tls", section.tls.as_ref().map(Spanned::span)),
            ("ca_file", section.ca_file.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = present {
                return Err(self.error_at(
                    Some(span),
                    format!(
                        "`{field}` is for worker upstreams; a local upstream has `nodes`, `dns` or `srv`"
                    ),
                ));
            }
        }
        let source = self.node_source(name, section)?;
        let health = self.health_settings(section)?;
        Ok(UpstreamKind::Local {
            fleet: FleetSettings { source, health },
        })
    }

    /// Fleet keys on a worker upstream are mistakes worth naming.
    pub(crate) fn refuse_fleet_fields(&self, section: &UpstreamSection) -> Result<(), ConfigError> {
        let spans = [
            ("dns", section.dns.as_ref().map(Spanned::span)),
            ("srv", section.srv.as_ref().map(Spanned::span)),
            ("port", section.port.as_ref().map(Spanned::span)),
            (
                "resolve_interval",
                section.resolve_interval.as_ref().map(Spanned::span),
            ),
            ("nameserver", section.nameserver.as_ref().map(Spanned::span)),
            (
                "health_path",
                section.health_path.as_ref().map(Spanned::span),
            ),
            (
                "health_interval",
                section.health_interval.as_ref().map(Spanned::span),
            ),
            (
                "health_timeout",
                section.health_timeout.as_ref().map(Spanned::span),
            ),
            (
                "healthy_after",
                section.healthy_after.as_ref().map(Spanned::span),
            ),
            (
                "unhealthy_after",
                section.unhealthy_after.as_ref().map(Spanned::span),
            ),
        ];
        match spans.into_iter().find_map(|(f, s)| s.map(|s| (f, s))) {
            Some((field, span)) => Err(self.error_at(
                Some(span),
                format!("`{field}` is for local upstreams, whose agent nodes the gateway places instances on"),
            )),
            None => Ok(()),
        }
    }

    fn node_source(
        &self,
        name: &str,
        section: &UpstreamSection,
    ) -> Result<NodeSource, ConfigError> {
        let dns_only = [
            ("resolve_interval", section.resolve_interval.as_ref()),
            ("nameserver", section.nameserver.as_ref()),
        ];
        match (&section.nodes, &section.dns, &section.srv) {
            (Some(nodes), None, None) => {
                if let Some(port) = &section.port {
                    return Err(self.error(port, "`port` goes with `dns`; each of `nodes` has its own"));
                }
                if let Some((field, value)) = dns_only.iter().find_map(|(f, v)| v.map(|v| (f, v))) {
                    return Err(self.error(value, format!("`{field}` is for nodes from `dns` or `srv`")));
                }
                self.static_nodes(nodes).map(NodeSource::Static)
            }
            (None, Some(dns), None) => {
                let port = section.port.as_ref().ok_or_else(|| {
                    self.error(dns, "`dns` needs a `port`: A/AAAA records carry no port")
                })?;
                let port = u16::try_from(*port.get_ref())
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| self.error(port, "`port` is a TCP port, 1 to 65535"))?;
                let name = self.dns_name(dns)?;
                self.dns_source(section, DnsQuery::Address { name, port })
            }
            (None, None, Some(srv)) => {
                if let Some(port) = &section.port {
                    return Err(self.error(port, "SRV records carry their own ports; `port` goes with `dns`"));
                }
                let name = self.dns_name(srv)?;
                self.dns_source(section, DnsQuery::Srv { name })
            }
            (None, None, None) => Err(self.error(
                &section.kind,
                format!("local upstream {name:?} needs `nodes` (a list such as [\"127.0.0.1:8787\"]), `dns` with `port`, or `srv`"),
            )),
            _ => Err(self.error(
                &section.kind,
                format!("local upstream {name:?} takes one of `nodes`, `dns` and `srv`"),
            )),
        }
    }

    fn static_nodes(
        &self,
        nodes: &Spanned<Vec<SpannedString>>,
    ) -> Result<Vec<String>, ConfigError> {
        if nodes.get_ref().is_empty() {
            return Err(self.error(nodes, "`nodes` must list at least one \"host:port\""));
        }
        let mut resolved: Vec<String> = Vec::new();
        for node in nodes.get_ref() {
            let address = self.host_port(node, None)?;
            if resolved.contains(&address) {
                return Err(self.error(node, format!("node {address:?} is listed twice")));
            }
            resolved.push(address);
        }
        Ok(resolved)
    }

    fn dns_name(&self, value: &SpannedString) -> Result<String, ConfigError> {
        let name = value.get_ref().trim_end_matches('.');
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(self.error(
                value,
                format!(
                    "{name:?} is not a DNS name, such as \"agent-node.agents.svc.cluster.local\""
                ),
            ));
        }
        Ok(name.to_owned())
    }

    fn dns_source(
        &self,
        section: &UpstreamSection,
        query: DnsQuery,
    ) -> Result<NodeSource, ConfigError> {
        let interval =
            self.duration_or(section.resolve_interval.as_ref(), DEFAULT_RESOLVE_INTERVAL)?;
        if interval.is_zero() {
            if let Some(value) = &section.resolve_interval {
                return Err(self.error(value, "`resolve_interval` must be more than zero"));
            }
        }
        let nameserver = match &section.nameserver {
            Some(value) => Some(
                value
                    .get_ref()
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .filter(|address| address.port() != 0)
                    .ok_or_else(|| {
                        self.error(
                            value,
                            "`nameserver` is an \"ip:port\" address, such as \"10.96.0.10:53\"",
                        )
                    })?,
            ),
            None => None,
        };
        Ok(NodeSource::Dns {
            query,
            interval,
            nameserver,
        })
    }

    fn health_settings(&self, section: &UpstreamSection) -> Result<HealthSettings, ConfigError> {
        let defaults = HealthSettings::default();
        let check = match (&section.health_check, &section.health_path) {
            (Some(kind), path) => match (kind.get_ref().as_str(), path) {
                ("http", Some(path)) => ActiveCheck::Http {
                    path: self.health_path(path)?,
                },
                ("http", None) => ActiveCheck::Http {
                    path: DEFAULT_HEALTH_PATH.to_owned(),
                },
                ("tcp" | "passive", Some(path)) => {
                    return Err(self.error(path, "`health_path` goes with `health_check = \"http\"`"))
                }
                ("tcp", None) => ActiveCheck::Tcp,
                ("passive", None) => ActiveCheck::Passive,
                (other, _) => {
                    return Err(self.error(
                        kind,
                        format!("unknown health check {other:?}; expected \"http\" (GET health_path, 200 is healthy), \"tcp\" (a connect) or \"passive\" (traffic only)"),
                    ))
                }
            },
            (None, Some(path)) => ActiveCheck::Http {
                path: self.health_path(path)?,
            },
            (None, None) => ActiveCheck::Passive,
        };
        let interval = self.duration_or(section.health_interval.as_ref(), defaults.interval)?;
        let timeout = self.duration_or(section.health_timeout.as_ref(), defaults.timeout)?;
        for (field, value, duration) in [
            ("health_interval", &section.health_interval, interval),
            ("health_timeout", &section.health_timeout, timeout),
        ] {
            if let (Some(value), true) = (value, duration.is_zero()) {
                return Err(self.error(value, format!("`{field}` must be more than zero")));
            }
        }
        Ok(HealthSettings {
            check,
            interval,
            timeout,
            healthy_after: self
                .threshold(section.healthy_after.as_ref(), defaults.healthy_after)?,
            unhealthy_after: self
                .threshold(section.unhealthy_after.as_ref(), defaults.unhealthy_after)?,
        })
    }

    fn health_path(&self, path: &SpannedString) -> Result<String, ConfigError> {
        let text = path.get_ref();
        if !text.starts_with('/')
            || text.contains(|c: char| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(self.error(path, "`health_path` is a path such as \"/healthz\""));
        }
        Ok(text.clone())
    }

    fn threshold(&self, value: Option<&Spanned<i64>>, default: u32) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => u32::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| self.error(v, "a count of consecutive checks, 1 to 100")),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{error_of, parse, GOOD};
    use crate::fleet::discovery::DnsQuery;
    use crate::fleet::health::ActiveCheck;
    use crate::fleet::NodeSource;
    use crate::upstream::UpstreamKind;
    use std::time::Duration;

    const LOCAL: &str = "nodes = [\"127.0.0.1:8787\", \"127.0.0.1:8788\"]";

    fn fleet_of(text: &str) -> crate::fleet::FleetSettings {
        let config = parse(&GOOD.replace(LOCAL, text)).expect("valid");
        match &config.upstreams["local"].kind {
            UpstreamKind::Local { fleet } => fleet.clone(),
            UpstreamKind::Worker { .. } => panic!("a local upstream"),
        }
    }

    #[test]
    fn nodes_from_dns_and_srv() {
        let fleet = fleet_of("dns = \"agent-node.agents.svc.cluster.local.\"\nport = 8787\nresolve_interval = \"2s\"\nnameserver = \"127.0.0.1:5353\"");
        let NodeSource::Dns {
            query,
            interval,
            nameserver,
        } = fleet.source
        else {
            panic!("dns")
        };
        assert_eq!(
            query,
            DnsQuery::Address {
                name: "agent-node.agents.svc.cluster.local".into(),
                port: 8787
            }
        );
        assert_eq!(interval, Duration::from_secs(2));
        assert_eq!(nameserver, Some("127.0.0.1:5353".parse().expect("address")));
        let fleet = fleet_of("srv = \"_agent._tcp.agent-node\"");
        assert!(matches!(
            fleet.source,
            NodeSource::Dns {
                query: DnsQuery::Srv { .. },
                ..
            }
        ));
    }

    #[test]
    fn health_settings() {
        let fleet = fleet_of(&format!("{LOCAL}\nhealth_path = \"/healthz\"\nhealth_interval = \"500ms\"\nhealth_timeout = \"200ms\"\nhealthy_after = 1\nunhealthy_after = 2"));
        let health = fleet.health;
        assert_eq!(
            health.check,
            ActiveCheck::Http {
                path: "/healthz".into()
            }
        );
        let kinds = [
            ("", ActiveCheck::Passive),
            ("health_check = \"tcp\"", ActiveCheck::Tcp),
            (
                "health_check = \"http\"",
                ActiveCheck::Http {
                    path: "/healthz".into(),
                },
            ),
        ];
        for (text, check) in kinds {
            assert_eq!(fleet_of(&format!("{LOCAL}\n{text}")).health.check, check);
        }
        assert_eq!(health.interval, Duration::from_millis(500));
        assert_eq!((health.healthy_after, health.unhealthy_after), (1, 2));
    }

    #[test]
    fn fleet_mistakes_are_named() {
        let cases = [
            ("dns = \"a.b\"", "`dns` needs a `port`"),
            ("dns = \"a.b\"\nport = 0", "`port` is a TCP port"),
            (
                "srv = \"_a._tcp.b\"\nport = 1",
                "SRV records carry their own ports",
            ),
            (
                &format!("{LOCAL}\ndns = \"a.b\""),
                "takes one of `nodes`, `dns` and `srv`",
            ),
            (&format!("{LOCAL}\nport = 1"), "`port` goes with `dns`"),
            (
                &format!("{LOCAL}\nresolve_interval = \"1s\""),
                "`resolve_interval` is for nodes from",
            ),
            ("dns = \"a..b\"\nport = 1", "is not a DNS name"),
            (
                "dns = \"a.b\"\nport = 1\nnameserver = \"127.0.0.1:0\"",
                "`nameserver` is an \"ip:port\"",
            ),
            (
                "dns = \"a.b\"\nport = 1\nnameserver = \"dns.local\"",
                "`nameserver` is an \"ip:port\"",
            ),
            (
                &format!("{LOCAL}\nhealth_path = \"healthz\""),
                "`health_path` is a path",
            ),
            (&format!("{LOCAL}\nunhealthy_after = 0"), "1 to 100"),
            (
                &format!("{LOCAL}\nhealth_check = \"icmp\""),
                "unknown health check",
            ),
            (
                &format!("{LOCAL}\nhealth_check = \"tcp\"\nhealth_path = \"/h\""),
                "goes with `health_check = \"http\"`",
            ),
            (
                &format!("{LOCAL}\nhealth_interval = \"0s\""),
                "must be more than zero",
            ),
        ];
        for (text, expected) in cases {
            let err = error_of(&GOOD.replace(LOCAL, text));
            assert!(err.contains(expected), "{text}: {err}");
        }
        let worker = GOOD.replace(
            "address = \"agents.example.com\"",
            "address = \"agents.example.com\"\nhealth_path = \"/h\"",
        );
        assert!(error_of(&worker).contains("`health_path` is for local upstreams"));
    }
}
