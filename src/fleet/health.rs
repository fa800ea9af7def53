//! Node health: active checks on an interval (pingora-load-balancing's HTTP or TCP check)
//! and passive observations from real traffic (a connect failure or a 5xx to an upgrade),
//! counted together: `unhealthy_after` consecutive failures take a node down,
//! `healthy_after` consecutive successes bring it back. Without active checks (the default,
//! as in nginx and HAProxy), only a node that traffic found down is checked, by TCP connect,
//! so that it can come back.

use pingora::prelude::HttpPeer;
use pingora::upstreams::peer::BasicPeer;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::Backend;
use std::time::Duration;

/// The active check of a `local` upstream's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActiveCheck {
    /// None: traffic alone judges nodes, and a down node is checked by TCP connect.
    Passive,
    /// Every node, by TCP connect.
    Tcp,
    /// Every node, by `GET` of this path, expecting 200.
    Http { path: String },
}

/// How a `local` upstream's nodes are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub check: ActiveCheck,
    pub interval: Duration,
    /// For the check's connect and for its answer.
    pub timeout: Duration,
    /// Consecutive successes before a down node takes instances again.
    pub healthy_after: u32,
    /// Consecutive failures, active or passive, before a node is down.
    pub unhealthy_after: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            check: ActiveCheck::Passive,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
        }
    }
}

impl HealthSettings {
    /// Whether every node is checked, or only those found down.
    pub fn checks_every_node(&self) -> bool {
        self.check != ActiveCheck::Passive
    }

    /// The check these settings describe, for nodes reached as plain HTTP/TCP.
    /// The thresholds are `NodeHealth`'s, which counts checks and traffic together: the check
    /// reports one result per run, and its own `consecutive_*` stay unused.
    pub fn check(&self) -> Box<dyn HealthCheck + Send + Sync> {
        match &self.check {
            ActiveCheck::Http { path } => {
                let mut check = HttpHealthCheck::new("agent-node", false);
                // A path checked by `extract_fleet` (absolute, no spaces or controls) builds.
                if let Ok(request) =
                    pingora::http::RequestHeader::build("GET", path.as_bytes(), None)
                {
                    check.req = request;
                }
                let _ = check
                    .req
                    .insert_header(http::header::USER_AGENT, "agent-gateway-health");
                let _ = check.req.insert_header(http::header::HOST, "agent-node");
                check.peer_template = timed_peer(self.timeout);
                Box::new(check)
            }
            ActiveCheck::Tcp | ActiveCheck::Passive => {
                let mut check = TcpHealthCheck::default();
                let mut peer = BasicPeer::new("0.0.0.0:1");
                peer.options.connection_timeout = Some(self.timeout);
                peer.options.total_connection_timeout = Some(self.timeout);
                check.peer_template = peer;
                Box::new(check)
            }
        }
    }
}

fn timed_peer(timeout: Duration) -> HttpPeer {
    let mut peer = HttpPeer::new("0.0.0.0:1", false, String::new());
    peer.options.connection_timeout = Some(timeout);
    peer.options.total_connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    peer
}

/// Runs `check` once against `connect` (an `ip:port`, or a `host:port` resolved here),
/// `timeout` bounding the whole of it (the lookup, and a body the check's own per-read
/// timeouts would let trickle).
pub async fn run_check(
    check: &(dyn HealthCheck + Send + Sync),
    connect: &str,
    timeout: Duration,
) -> bool {
    let checked = async {
        let Some(address) = resolve(connect).await else {
            return false;
        };
        let backend = Backend {
            addr: pingora::protocols::l4::socket::SocketAddr::Inet(address),
            weight: 1,
            ext: Default::default(),
        };
        check.check(&backend).await.is_ok()
    };
    tokio::time::timeout(timeout, checked)
        .await
        .unwrap_or(false)
}

async fn resolve(connect: &str) -> Option<std::net::SocketAddr> {
    if let Ok(address) = connect.parse() {
        return Some(address);
    }
    tokio::net::lookup_host(connect).await.ok()?.next()
}

/// One node's health: the state and the run of same results that may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHealth {
    pub healthy: bool,
    /// Consecutive results against the current state.
    against: u32,
}

impl Default for NodeHealth {
    /// A new node takes instances at once: a node is assumed up until checks say otherwise,
    /// as a gateway that starts must serve before its first check completes.
    fn default() -> Self {
        NodeHealth {
            healthy: true,
            against: 0,
        }
    }
}

impl NodeHealth {
    /// Records one result, active or passive; `true` when the state flipped.
    pub fn observe(&mut self, ok: bool, settings: &HealthSettings) -> bool {
        if ok == self.healthy {
            self.against = 0;
            return false;
        }
        self.against += 1;
        let needed = if ok {
            settings.healthy_after
        } else {
            settings.unhealthy_after
        };
        if self.against < needed.max(1) {
            return false;
        }
        self.healthy = ok;
        self.against = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            healthy_after: 2,
            unhealthy_after: 3,
            ..HealthSettings::default()
        }
    }

    #[test]
    fn failures_must_be_consecutive_to_take_a_node_down() {
        let mut health = NodeHealth::default();
        let s = settings();
        assert!(!health.observe(false, &s));
        assert!(!health.observe(false, &s));
        assert!(!health.observe(true, &s), "a success resets the run");
        assert!(!health.observe(false, &s));
        assert!(!health.observe(false, &s));
        assert!(health.observe(false, &s));
        assert!(!health.healthy);
    }

    #[test]
    fn successes_bring_a_node_back() {
        let mut health = NodeHealth::default();
        let s = HealthSettings {
            unhealthy_after: 1,
            ..settings()
        };
        assert!(health.observe(false, &s));
        assert!(!health.observe(true, &s));
        assert!(!health.observe(false, &s), "already down");
        assert!(!health.observe(true, &s));
        assert!(health.observe(true, &s));
        assert!(health.healthy);
    }

    #[tokio::test]
    async fn checks_pass_against_a_listening_node_and_fail_against_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("address").to_string();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("address").to_string()
        };
        let http = HealthSettings {
            check: ActiveCheck::Http {
                path: "/healthz".to_owned(),
            },
            ..settings()
        };
        let serve = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = vec![0u8; 1024];
            let n = stream.read(&mut head).await.expect("read");
            let head = String::from_utf8_lossy(&head[..n]).into_owned();
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            stream.write_all(answer).await.expect("write");
            head
        });
        let timeout = Duration::from_secs(2);
        assert!(run_check(http.check().as_ref(), &open, timeout).await);
        let head = serve.await.expect("served");
        assert!(head.starts_with("GET /healthz HTTP/1.1"), "{head}");
        assert!(!run_check(http.check().as_ref(), &closed, timeout).await);
        assert!(!run_check(settings().check().as_ref(), &closed, timeout).await);
    }
}
