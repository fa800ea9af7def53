//! DNS discovery of agent nodes against a real DNS server the test runs on 127.0.0.1 (UDP and
//! TCP), its records changed while the test runs: A/AAAA with the configured port (IPv6 in
//! brackets), SRV with the targets' addresses in the additional section or looked up, a
//! target without addresses skipped, changed records seen by the next call, and NXDOMAIN,
//! an empty answer, SERVFAIL and a silent server each an error within a bounded time.

mod common;

use agent_gateway::fleet::discovery::{DiscoveredNode, DnsDiscovery, DnsQuery};
use common::dns::TestDns;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Longer than any `discover()` may take.
const BOUND: Duration = Duration::from_secs(8);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP")
}

fn address(dns: &TestDns, name: &str, port: u16) -> DnsDiscovery {
    let query = DnsQuery::Address {
        name: name.into(),
        port,
    };
    DnsDiscovery::new(query, Some(dns.addr)).expect("a discovery")
}

fn srv(dns: &TestDns, name: &str) -> DnsDiscovery {
    let query = DnsQuery::Srv { name: name.into() };
    DnsDiscovery::new(query, Some(dns.addr)).expect("a discovery")
}

async fn discover(discovery: &DnsDiscovery) -> Result<Vec<DiscoveredNode>, String> {
    tokio::time::timeout(BOUND, discovery.discover())
        .await
        .expect("discover() returns within its bound")
}

/// (id, connect) of each node, for short assertions.
async fn found(discovery: &DnsDiscovery) -> Vec<(String, String)> {
    let nodes = discover(discovery).await.expect("nodes");
    nodes.into_iter().map(|n| (n.id, n.connect)).collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    let pair = |(id, connect): &(&str, &str)| (id.to_string(), connect.to_string());
    expected.iter().map(pair).collect()
}

#[tokio::test]
async fn a_and_aaaa_records_are_nodes_on_the_configured_port() {
    let dns = TestDns::start();
    let ips = [ip("127.0.0.3"), ip("::1"), ip("127.0.0.2"), ip("127.0.0.3")];
    dns.set_a("agent-node.agents.test", &ips);
    // Asked as given, case and root dot aside.
    let discovery = address(&dns, "Agent-Node.Agents.Test.", 8787);
    assert_eq!(
        discovery.query().to_string(),
        "A/AAAA Agent-Node.Agents.Test.:8787"
    );
    let expected = [
        ("127.0.0.2:8787", "127.0.0.2:8787"),
        ("127.0.0.3:8787", "127.0.0.3:8787"),
        ("[::1]:8787", "[::1]:8787"),
    ];
    assert_eq!(found(&discovery).await, pairs(&expected));

    dns.set_a("v6.agents.test", &[ip("fd00::2"), ip("fd00::1")]);
    let expected = [
        ("[fd00::1]:1", "[fd00::1]:1"),
        ("[fd00::2]:1", "[fd00::2]:1"),
    ];
    assert_eq!(
        found(&address(&dns, "v6.agents.test", 1)).await,
        pairs(&expected)
    );
}

#[tokio::test]
async fn an_answer_too_large_for_udp_arrives_over_tcp() {
    let dns = TestDns::start();
    let ips: Vec<IpAddr> = (1..=200)
        .map(|i| IpAddr::from([127, 0, 1, i as u8]))
        .collect();
    dns.set_a("many.agents.test", &ips);
    let before = dns.queries();
    let nodes = found(&address(&dns, "many.agents.test", 8787)).await;
    assert_eq!(nodes.len(), 200, "all of them, not a truncated UDP answer");
    assert!(nodes.contains(&("127.0.1.200:8787".into(), "127.0.1.200:8787".into())));
    assert_eq!(
        dns.queries() - before,
        3,
        "A over UDP (truncated), A over TCP, AAAA"
    );
}

#[tokio::test]
async fn srv_targets_are_nodes_by_name_with_addresses_from_the_additional_section() {
    let dns = TestDns::start();
    dns.set_a("node-0.agent.test", &[ip("127.0.0.10")]);
    dns.set_a("node-1.agent.test", &[ip("::1"), ip("127.0.0.11")]);
    dns.set_srv(
        "_agent._tcp.agent.test",
        &[("node-1.agent.test", 9001), ("Node-0.Agent.Test.", 9000)],
    );
    let discovery = srv(&dns, "_agent._tcp.agent.test");
    let before = dns.queries();
    let expected = [
        ("node-0.agent.test:9000", "127.0.0.10:9000"),
        ("node-1.agent.test:9001", "127.0.0.11:9001"),
    ];
    assert_eq!(found(&discovery).await, pairs(&expected));
    assert_eq!(
        dns.queries() - before,
        1,
        "one SRV query, nothing looked up"
    );
}

#[tokio::test]
async fn srv_targets_missing_from_the_additional_section_are_looked_up() {
    let dns = TestDns::start();
    dns.glue(false);
    dns.set_a("node-0.agent.test", &[ip("127.0.0.10")]);
    dns.set_a("node-1.agent.test", &[ip("fd00::11")]);
    dns.set_srv(
        "_agent._tcp.agent.test",
        &[("node-0.agent.test", 9000), ("node-1.agent.test", 9000)],
    );
    let discovery = srv(&dns, "_agent._tcp.agent.test");
    let before = dns.queries();
    let expected = [
        ("node-0.agent.test:9000", "127.0.0.10:9000"),
        ("node-1.agent.test:9000", "[fd00::11]:9000"),
    ];
    assert_eq!(found(&discovery).await, pairs(&expected));
    assert_eq!(dns.queries() - before, 5, "SRV, then A and AAAA per target");

    // A target without addresses is skipped; none left is an error.
    dns.remove("node-1.agent.test");
    let expected = [("node-0.agent.test:9000", "127.0.0.10:9000")];
    assert_eq!(found(&discovery).await, pairs(&expected));
    dns.set_a("node-0.agent.test", &[]);
    let error = discover(&discovery)
        .await
        .expect_err("no target has an address");
    assert!(error.contains("SRV _agent._tcp.agent.test"), "{error}");
}

#[tokio::test]
async fn records_changed_between_calls_are_seen_by_the_next() {
    let dns = TestDns::start();
    dns.set_a("agent-node.agents.test", &[ip("127.0.0.2")]);
    let discovery = address(&dns, "agent-node.agents.test", 8787);
    let one = [("127.0.0.2:8787", "127.0.0.2:8787")];
    assert_eq!(found(&discovery).await, pairs(&one));
    dns.set_a(
        "agent-node.agents.test",
        &[ip("127.0.0.2"), ip("127.0.0.4")],
    );
    let two = [
        ("127.0.0.2:8787", "127.0.0.2:8787"),
        ("127.0.0.4:8787", "127.0.0.4:8787"),
    ];
    assert_eq!(found(&discovery).await, pairs(&two));
    dns.set_a("agent-node.agents.test", &[ip("127.0.0.4")]);
    let other = [("127.0.0.4:8787", "127.0.0.4:8787")];
    assert_eq!(found(&discovery).await, pairs(&other));

    // A pod moved: its SRV identity stays, its address changes.
    dns.set_a("node-0.agent.test", &[ip("127.0.0.10")]);
    dns.set_srv("_agent._tcp.agent.test", &[("node-0.agent.test", 9000)]);
    let discovery = srv(&dns, "_agent._tcp.agent.test");
    let before = [("node-0.agent.test:9000", "127.0.0.10:9000")];
    assert_eq!(found(&discovery).await, pairs(&before));
    dns.set_a("node-0.agent.test", &[ip("127.0.0.20")]);
    let after = [("node-0.agent.test:9000", "127.0.0.20:9000")];
    assert_eq!(found(&discovery).await, pairs(&after));
}

#[tokio::test]
async fn a_name_gone_or_without_records_is_an_error_naming_the_query() {
    let dns = TestDns::start();
    dns.set_a("agent-node.agents.test", &[ip("127.0.0.2")]);
    let discovery = address(&dns, "agent-node.agents.test", 8787);
    assert_eq!(found(&discovery).await.len(), 1);
    dns.remove("agent-node.agents.test");
    let error = discover(&discovery).await.expect_err("NXDOMAIN");
    assert_eq!(error, "A/AAAA agent-node.agents.test:8787: NXDOMAIN");
    dns.set_a("agent-node.agents.test", &[]);
    let error = discover(&discovery).await.expect_err("no records");
    assert!(
        error.starts_with("A/AAAA agent-node.agents.test:8787: "),
        "{error}"
    );

    let error = discover(&srv(&dns, "_agent._tcp.none.test")).await;
    assert_eq!(error, Err("SRV _agent._tcp.none.test: NXDOMAIN".into()));
    dns.set_a("_agent._tcp.agent-node.agents.test", &[ip("127.0.0.2")]);
    let error = discover(&srv(&dns, "_agent._tcp.agent-node.agents.test")).await;
    let expected = "SRV _agent._tcp.agent-node.agents.test: no records";
    assert_eq!(error, Err(expected.into()));
}

#[tokio::test]
async fn a_failing_server_is_an_error_soon_and_recovery_is_seen() {
    let dns = TestDns::start();
    dns.set_a("agent-node.agents.test", &[ip("127.0.0.2")]);
    dns.set_a("node-0.agent.test", &[ip("127.0.0.10")]);
    dns.set_srv("_agent._tcp.agent.test", &[("node-0.agent.test", 9000)]);
    let by_address = address(&dns, "agent-node.agents.test", 8787);
    let by_srv = srv(&dns, "_agent._tcp.agent.test");
    dns.fail(true);
    for discovery in [&by_address, &by_srv] {
        let started = Instant::now();
        let error = discover(discovery).await.expect_err("SERVFAIL");
        assert!(error.ends_with("SERVFAIL"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "an answer, not a timeout"
        );
    }
    dns.fail(false);
    assert_eq!(found(&by_address).await.len(), 1);
    assert_eq!(found(&by_srv).await.len(), 1);
}

#[tokio::test]
async fn a_silent_server_is_an_error_within_the_bound() {
    // Bound but never answering: every query times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let query = DnsQuery::Srv {
        name: "_agent._tcp.agent.test".into(),
    };
    let discovery =
        DnsDiscovery::new(query, Some(silent.local_addr().expect("address"))).expect("a discovery");
    let started = Instant::now();
    let error = discover(&discovery).await.expect_err("no answer");
    assert_eq!(error, "SRV _agent._tcp.agent.test: timed out");
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
}
