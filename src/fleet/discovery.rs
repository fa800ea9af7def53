//! Discovery of agent nodes from DNS: the A/AAAA records of a name (a Kubernetes headless
//! Service) with a configured port, or its SRV records. Every call asks the DNS server anew;
//! the caller re-resolves on its own interval and keeps its last good list when a call fails.

use futures_util::future::join_all;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record};
use hickory_resolver::{Resolver, TokioResolver};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One DNS query's wait; a retry doubles it at most.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one whole `discover()`, the SRV targets' lookups included.
const DISCOVER_DEADLINE: Duration = Duration::from_secs(5);

/// What to ask DNS for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsQuery {
    /// A and AAAA records of `name`; every address is a node on `port`.
    Address { name: String, port: u16 },
    /// SRV records of `name` (e.g. `_agent._tcp.agent-node.agents.svc.cluster.local`): each
    /// target:port is a node, its addresses from the answer's additional records or a lookup.
    Srv { name: String },
}

impl fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsQuery::Address { name, port } => write!(f, "A/AAAA {name}:{port}"),
            DnsQuery::Srv { name } => write!(f, "SRV {name}"),
        }
    }
}

/// One node as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiscoveredNode {
    /// Its identity in placement: `ip:port` (`[v6]:port`) for A/AAAA, `target:port` (no
    /// trailing dot, lowercase) for SRV — a StatefulSet pod keeps its SRV target name across
    /// restarts, not its IP.
    pub id: String,
    /// `ip:port` to connect to (an IP literal, so no lookup per connection).
    pub connect: String,
}

/// Asks DNS for the nodes of one query.
pub struct DnsDiscovery {
    query: DnsQuery,
    /// The query's name made absolute, so neither `search` nor `ndots` rewrites it.
    name: Name,
    resolver: TokioResolver,
}

/// Why a name gave no addresses: it has none (an SRV target to skip), or DNS failed (the
/// whole discovery fails, so the caller keeps its last good list rather than drop nodes).
enum NoAddresses {
    Empty(String),
    Failed(String),
}

impl DnsDiscovery {
    /// `nameserver`: a DNS server to ask (UDP with TCP fallback), or None for the system's
    /// resolv.conf. Needs no runtime; `discover()` runs on whichever tokio runtime awaits it.
    pub fn new(query: DnsQuery, nameserver: Option<SocketAddr>) -> Result<Self, String> {
        let text = match &query {
            DnsQuery::Address { port: 0, .. } => return Err(format!("{query}: port 0")),
            DnsQuery::Address { name, .. } | DnsQuery::Srv { name } => name,
        };
        let name = absolute_name(text).map_err(|e| format!("{query}: {e}"))?;
        let mut builder = match nameserver {
            Some(address) => {
                let mut server = NameServerConfig::udp_and_tcp(address.ip());
                for connection in &mut server.connections {
                    connection.port = address.port();
                }
                let config = ResolverConfig::from_name_servers(vec![server]);
                Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("{query}: system DNS configuration: {e}"))?,
        };
        let options = builder.options_mut();
        options.timeout = QUERY_TIMEOUT;
        // One retry (hickory counts retries), for a lost datagram.
        options.attempts = 1;
        // Our interval decides freshness: nothing answered may outlive the call that asked.
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        // Nodes come from DNS only, not from this host's /etc/hosts.
        options.use_hosts_file = ResolveHosts::Never;
        let resolver = builder
            .build()
            .map_err(|e| format!("{query}: resolver: {e}"))?;
        Ok(Self {
            query,
            name,
            resolver,
        })
    }

    /// Resolves now (no answer cached across calls: the caller decides the interval). Sorted
    /// by id, deduplicated. An empty answer, NXDOMAIN, a timeout or SERVFAIL is an Err with a
    /// short description naming the query (never a panic); the caller keeps its last good
    /// list. Returns within `DISCOVER_DEADLINE` (5 s) whatever the server does.
    pub async fn discover(&self) -> Result<Vec<DiscoveredNode>, String> {
        self.resolver.clear_cache();
        let found = tokio::time::timeout(DISCOVER_DEADLINE, async {
            match &self.query {
                DnsQuery::Address { port, .. } => match self.addresses(&self.name).await {
                    Ok(ips) => Ok(address_nodes(ips, *port)),
                    Err(NoAddresses::Empty(e) | NoAddresses::Failed(e)) => Err(e),
                },
                DnsQuery::Srv { .. } => self.srv().await,
            }
        })
        .await;
        match found {
            Ok(Ok(nodes)) if nodes.is_empty() => {
                Err(format!("{}: no target has an address", self.query))
            }
            Ok(Ok(nodes)) => Ok(nodes),
            Ok(Err(e)) => Err(format!("{}: {e}", self.query)),
            Err(_) => Err(format!(
                "{}: no answer within {}s",
                self.query,
                DISCOVER_DEADLINE.as_secs()
            )),
        }
    }

    pub fn query(&self) -> &DnsQuery {
        &self.query
    }

    /// A and AAAA together: a failure of either fails the whole, so a SERVFAIL on AAAA
    /// cannot silently drop the IPv6 nodes.
    async fn addresses(&self, name: &Name) -> Result<Vec<IpAddr>, NoAddresses> {
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name.clone())
        );
        let mut ips = Vec::new();
        let mut nxdomain = false;
        for result in [v4, v6] {
            match result {
                Ok(lookup) => ips.extend(lookup.answers().iter().filter_map(|r| r.data.ip_addr())),
                Err(NetError::Dns(DnsError::NoRecordsFound(none)))
                    if is_absence(none.response_code) =>
                {
                    nxdomain |= none.response_code == ResponseCode::NXDomain;
                }
                Err(e) => return Err(NoAddresses::Failed(describe(&e))),
            }
        }
        match (ips.is_empty(), nxdomain) {
            (false, _) => Ok(ips),
            (true, true) => Err(NoAddresses::Empty("NXDOMAIN".into())),
            (true, false) => Err(NoAddresses::Empty("no A/AAAA records".into())),
        }
    }

    async fn srv(&self) -> Result<Vec<DiscoveredNode>, String> {
        let lookup = self
            .resolver
            .srv_lookup(self.name.clone())
            .await
            .map_err(|e| describe(&e))?;
        let targets = srv_targets(lookup.answers());
        if targets.is_empty() {
            return Err("no SRV records".into());
        }
        let additionals = lookup.additionals();
        let resolved = join_all(targets.into_iter().map(|(target, port)| async move {
            let glue = glue(additionals, &target);
            let ips = match glue.is_empty() {
                false => Ok(glue),
                true => self.addresses(&target).await,
            };
            (target, port, ips)
        }))
        .await;
        let mut found = Vec::new();
        for (target, port, ips) in resolved {
            match ips {
                Ok(ips) => found.push((name_text(&target), port, ips)),
                Err(NoAddresses::Empty(e)) => {
                    log::warn!("{}: target {} skipped: {e}", self.query, name_text(&target));
                }
                Err(NoAddresses::Failed(e)) => {
                    return Err(format!("target {}: {e}", name_text(&target)));
                }
            }
        }
        Ok(srv_nodes(found))
    }
}

/// NOERROR without records or NXDOMAIN: the name has nothing, as opposed to DNS failing.
fn is_absence(code: ResponseCode) -> bool {
    matches!(code, ResponseCode::NoError | ResponseCode::NXDomain)
}

/// A short reason for logs and /config, not hickory's Debug dump of the query.
fn describe(error: &NetError) -> String {
    let code = match error {
        NetError::Dns(DnsError::NoRecordsFound(none)) => none.response_code,
        NetError::Dns(DnsError::ResponseCode(code)) => *code,
        NetError::Timeout => return "timed out".into(),
        other => return other.to_string(),
    };
    match code {
        ResponseCode::NoError => "no records".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => other.to_str().into(),
    }
}

/// `text` as an absolute name: asked as given, whatever resolv.conf's `search` says.
fn absolute_name(text: &str) -> Result<Name, String> {
    if text.trim_end_matches('.').is_empty() {
        return Err("empty name".into());
    }
    let mut name = Name::from_ascii(text).map_err(|e| format!("invalid name: {e}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// A name as an id part: lowercase (DNS names are case-insensitive) without the root dot.
fn name_text(name: &Name) -> String {
    trim_dot(&name.to_ascii()).to_ascii_lowercase()
}

fn trim_dot(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

/// `ip:port`, an IPv6 address in brackets.
fn socket_text(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn address_nodes(ips: impl IntoIterator<Item = IpAddr>, port: u16) -> Vec<DiscoveredNode> {
    let mut nodes: Vec<DiscoveredNode> = ips
        .into_iter()
        .map(|ip| {
            let text = socket_text(ip, port);
            DiscoveredNode {
                id: text.clone(),
                connect: text,
            }
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// The SRV records' targets and ports; a `.` target means "no service here" (RFC 2782).
fn srv_targets(answers: &[Record]) -> Vec<(Name, u16)> {
    let mut targets: Vec<(Name, u16)> = answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) if !srv.target.is_root() => Some((srv.target.clone(), srv.port)),
            _ => None,
        })
        .collect();
    targets.sort();
    targets.dedup();
    targets
}

/// The addresses of `target` among an answer's additional records.
fn glue(additionals: &[Record], target: &Name) -> Vec<IpAddr> {
    additionals
        .iter()
        .filter(|r| &r.name == target)
        .filter_map(|r| r.data.ip_addr())
        .collect()
}

/// One node per `target:port`, connected at the target's lowest address (IPv4 first) so the
/// choice is the same on every resolution.
fn srv_nodes(targets: Vec<(String, u16, Vec<IpAddr>)>) -> Vec<DiscoveredNode> {
    let mut nodes: Vec<DiscoveredNode> = targets
        .into_iter()
        .filter_map(|(target, port, ips)| {
            let ip = ips.into_iter().min()?;
            Some(DiscoveredNode {
                id: format!("{}:{port}", trim_dot(&target).to_ascii_lowercase()),
                connect: socket_text(ip, port),
            })
        })
        .collect();
    nodes.sort();
    nodes.dedup_by(|a, b| a.id == b.id);
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::{A, SRV};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn node(id: &str, connect: &str) -> DiscoveredNode {
        DiscoveredNode {
            id: id.into(),
            connect: connect.into(),
        }
    }

    #[test]
    fn address_nodes_are_sorted_deduplicated_and_bracket_ipv6() {
        let ips = [
            ip("10.0.0.2"),
            ip("fd00::1"),
            ip("10.0.0.1"),
            ip("10.0.0.2"),
        ];
        assert_eq!(
            address_nodes(ips, 8787),
            [
                node("10.0.0.1:8787", "10.0.0.1:8787"),
                node("10.0.0.2:8787", "10.0.0.2:8787"),
                node("[fd00::1]:8787", "[fd00::1]:8787"),
            ]
        );
    }

    #[test]
    fn srv_nodes_use_the_target_name_and_its_lowest_address() {
        let targets = vec![
            (
                "Node-1.Agents.".to_string(),
                9000,
                vec![ip("fd00::9"), ip("10.0.0.9")],
            ),
            ("node-0.agents".to_string(), 9000, vec![ip("10.0.0.7")]),
            ("node-0.agents".to_string(), 9000, vec![ip("10.0.0.8")]),
            ("node-2.agents".to_string(), 9000, vec![]),
            ("node-3.agents".to_string(), 9001, vec![ip("fd00::3")]),
        ];
        assert_eq!(
            srv_nodes(targets),
            [
                node("node-0.agents:9000", "10.0.0.7:9000"),
                node("node-1.agents:9000", "10.0.0.9:9000"),
                node("node-3.agents:9001", "[fd00::3]:9001"),
            ]
        );
    }

    #[test]
    fn names_are_absolute_and_ids_lose_the_root_dot() {
        let name = absolute_name("_agent._tcp.Agent-Node.agents.svc").unwrap();
        assert!(name.is_fqdn());
        assert_eq!(name_text(&name), "_agent._tcp.agent-node.agents.svc");
        assert!(absolute_name("node.agents.").unwrap().is_fqdn());
        assert!(absolute_name("").is_err());
        assert!(absolute_name(".").is_err());
        assert_eq!(trim_dot("a.b."), "a.b");
        assert_eq!(trim_dot("a.b"), "a.b");
    }

    #[test]
    fn srv_targets_skip_the_root_and_glue_matches_names_case_insensitively() {
        let srv = |target: &str, port| {
            let rdata = RData::SRV(SRV::new(0, 10, port, Name::from_ascii(target).unwrap()));
            Record::from_rdata(Name::from_ascii("_a._tcp.x.").unwrap(), 0, rdata)
        };
        let answers = [srv("n0.x.", 1), srv(".", 2), srv("n1.x.", 3)];
        let targets = srv_targets(&answers);
        assert_eq!(targets.len(), 2);
        assert_eq!((name_text(&targets[1].0), targets[1].1), ("n1.x".into(), 3));
        let address = |name: &str, ip: Ipv4Addr| {
            Record::from_rdata(Name::from_ascii(name).unwrap(), 0, RData::A(A(ip)))
        };
        let additionals = [
            address("N0.X.", Ipv4Addr::new(10, 0, 0, 1)),
            address("n1.x.", Ipv4Addr::new(10, 0, 0, 2)),
            Record::from_rdata(
                Name::from_ascii("n0.x.").unwrap(),
                0,
                RData::from(Ipv6Addr::LOCALHOST),
            ),
        ];
        assert_eq!(
            glue(&additionals, &targets[0].0),
            [ip("10.0.0.1"), ip("::1")]
        );
    }

    #[test]
    fn display_names_the_query() {
        let address = DnsQuery::Address {
            name: "agent-node.agents.svc".into(),
            port: 8787,
        };
        assert_eq!(address.to_string(), "A/AAAA agent-node.agents.svc:8787");
        let srv = DnsQuery::Srv {
            name: "_agent._tcp.agent-node".into(),
        };
        assert_eq!(srv.to_string(), "SRV _agent._tcp.agent-node");
    }

    #[test]
    fn new_rejects_port_zero_and_bad_names_without_a_runtime() {
        let server = Some("127.0.0.1:53".parse().unwrap());
        let zero = DnsQuery::Address {
            name: "a.b".into(),
            port: 0,
        };
        assert!(DnsDiscovery::new(zero, server).is_err());
        let empty = DnsQuery::Srv { name: "".into() };
        assert!(DnsDiscovery::new(empty, server).is_err());
        let good = DnsQuery::Srv {
            name: "_a._tcp.b".into(),
        };
        assert_eq!(
            DnsDiscovery::new(good.clone(), server).unwrap().query(),
            &good
        );
    }

    #[test]
    fn discovery_is_shareable_across_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<DnsDiscovery>();
    }

    #[test]
    fn short_reasons() {
        assert_eq!(describe(&NetError::Timeout), "timed out");
        let code = |c| NetError::Dns(DnsError::ResponseCode(c));
        assert_eq!(describe(&code(ResponseCode::ServFail)), "SERVFAIL");
        assert!(is_absence(ResponseCode::NXDomain));
        assert!(!is_absence(ResponseCode::ServFail));
    }
}
