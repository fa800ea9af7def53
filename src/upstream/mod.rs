//! Upstreams: where an agent request goes, and how to reach it.
//!
//! A `worker` upstream is one Cloudflare Worker that runs `routeAgentRequest` itself. A `local`
//! upstream is a set of self-hosted agent nodes that expect the gateway to do that routing; an
//! agent instance lives on exactly one of them, chosen by rendezvous hashing so that every
//! gateway replica with the same node list agrees without talking to the others.

use pingora::prelude::HttpPeer;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::WrappedX509;
use pingora::{Error, ErrorType, OrErr, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Routing headers of the partyserver contract, which `local` upstreams expect from their
/// caller; the gateway alone may set them.
pub(crate) const NAMESPACE_HEADER: &str = "x-partykit-namespace";
pub(crate) const ROOM_HEADER: &str = "x-partykit-room";

/// A connector for upstream connections that are upgraded or closed, never pooled: an
/// upgraded stream never returns to a pool.
pub(crate) fn upgrade_connector() -> pingora::connectors::TransportConnector {
    let mut options = pingora::connectors::ConnectorOptions::new(0);
    options.keepalive_pool_size = 0;
    pingora::connectors::TransportConnector::new(Some(options))
}

#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) name: String,
    pub(crate) kind: UpstreamKind,
    pub(crate) connect_timeout: Duration,
    /// How long an HTTP response (or a WebSocket handshake answer) may take.
    pub(crate) read_timeout: Duration,
    /// Secrets every request to this upstream needs, besides its routes' own.
    pub(crate) require: Vec<String>,
    /// (secret, header): secrets the gateway sends along, local upstreams only. A header of
    /// that name sent by a client is always removed first.
    pub(crate) forward_secrets: Vec<(String, http::HeaderName)>,
    /// A path probed periodically to learn whether the upstream has its secrets.
    pub(crate) probe: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probe {
    pub(crate) path: String,
    pub(crate) interval: Duration,
}

/// A file the configuration names: read after parsing, and reported at `at`, its line and
/// column in the configuration file, when it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedFile {
    pub(crate) path: PathBuf,
    pub(crate) at: (usize, usize),
}

#[derive(Debug)]
pub(crate) enum UpstreamKind {
    Worker {
        /// `host:port` to connect to.
        address: String,
        /// Host header and TLS server name.
        host: String,
        tls: bool,
        /// A PEM file of trust anchors replacing the platform's, for tests and private CAs.
        ca_file: Option<NamedFile>,
        /// Its certificates, read by `GatewayConfig::load` after parsing.
        ca: OnceLock<Arc<CaType>>,
    },
    Local {
        nodes: Vec<Node>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `host:port`, as configured; also the node's identity in the hash.
    pub address: String,
}

impl Upstream {
    /// Everything this upstream needs from the gateway's secrets.
    pub(crate) fn gateway_held_secrets(&self) -> impl Iterator<Item = &str> {
        self.forward_secrets
            .iter()
            .map(|(secret, _)| secret.as_str())
    }

    /// Whether the gateway must set the routing headers itself.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self.kind, UpstreamKind::Local { .. })
    }

    /// The address to connect to for an agent instance (`key` is `(slug, instance)`), or the
    /// fallback route's whole path when there is no instance.
    pub(crate) fn address_for(&self, key: &[&str]) -> Option<&str> {
        match &self.kind {
            UpstreamKind::Worker { address, .. } => Some(address),
            UpstreamKind::Local { nodes } => home_node(nodes, key).map(|n| n.address.as_str()),
        }
    }

    /// A Pingora peer for `address`, with this upstream's TLS and timeouts. The name is resolved
    /// here, per connection, so that DNS changes are followed without a reload.
    pub(crate) async fn peer(&self, address: &str) -> Result<HttpPeer> {
        let socket = tokio::net::lookup_host(address)
            .await
            .or_err_with(ErrorType::ConnectNoRoute, || {
                format!("upstream {}: cannot resolve {address}", self.name)
            })?
            .next()
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("upstream {}: {address} resolves to no address", self.name),
                )
            })?;
        let mut peer = match &self.kind {
            UpstreamKind::Worker {
                host,
                tls,
                ca_file,
                ca,
                ..
            } => {
                if ca_file.is_some() && ca.get().is_none() {
                    // Only a configuration that was parsed but never loaded gets here: fail
                    // rather than trust the platform's roots instead of the configured ones.
                    return Error::e_explain(
                        ErrorType::InternalError,
                        format!("upstream {}: its CA file was never read", self.name),
                    );
                }
                let mut peer = HttpPeer::new(socket, *tls, host.clone());
                peer.options.ca = ca.get().cloned();
                peer
            }
            UpstreamKind::Local { .. } => HttpPeer::new(socket, false, String::new()),
        };
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Ok(peer)
    }
}

/// Rendezvous (highest random weight) hashing: the node with the highest score for `key` is
/// its home. Removing a node moves only the keys that lived on it; adding one takes only
/// the keys it now wins. The hash is FNV-1a plus a finaliser, fixed here rather than
/// `std`'s unspecified one, so that replicas built by different compilers agree.
pub fn home_node<'a>(nodes: &'a [Node], key: &[&str]) -> Option<&'a Node> {
    let key_hash = key.iter().fold(FNV_OFFSET, |h, part| {
        fnv1a(fnv1a(h, part.as_bytes()), &[0xff])
    });
    nodes
        .iter()
        .max_by_key(|node| mix(fnv1a(key_hash, node.address.as_bytes())))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A hash that is the same on every build and machine (FNV-1a, 64 bits): for placement and
/// for fingerprints in logs, never for security.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET, bytes)
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// splitmix64's finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads every certificate of a PEM file, checking each parses, for a per-upstream CA.
pub(crate) fn load_ca_file(path: &Path) -> std::result::Result<Arc<CaType>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())? {
        let der = item.map_err(|e| e.to_string())?;
        x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("a certificate does not parse: {e}"))?;
        certs.push(WrappedX509::new(der.as_ref().to_vec(), |raw| {
            pingora::utils::tls::parse_x509(raw)
        }));
    }
    if certs.is_empty() {
        return Err("it holds no PEM certificate".to_owned());
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(addresses: &[&str]) -> Vec<Node> {
        addresses
            .iter()
            .map(|a| Node {
                address: (*a).to_owned(),
            })
            .collect()
    }

    fn instances() -> Vec<String> {
        (0..2000).map(|i| format!("room-{i}")).collect()
    }

    #[test]
    fn home_node_is_stable_and_spread() {
        let three = nodes(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let mut counts = [0usize; 3];
        for instance in instances() {
            let first = home_node(&three, &["coder-agent", &instance]).expect("a node");
            let again = home_node(&three, &["coder-agent", &instance]).expect("a node");
            assert_eq!(first, again);
            let index = three
                .iter()
                .position(|n| n == first)
                .expect("one of the nodes");
            counts[index] += 1;
        }
        for count in counts {
            assert!((500..=830).contains(&count), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_instances() {
        let three = nodes(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let two = nodes(&["10.0.0.1:80", "10.0.0.3:80"]);
        let mut moved = 0;
        for instance in instances() {
            let before = home_node(&three, &["coder-agent", &instance]).expect("a node");
            let after = home_node(&two, &["coder-agent", &instance]).expect("a node");
            if before.address == "10.0.0.2:80" {
                moved += 1;
            } else {
                assert_eq!(before, after, "{instance} moved off a surviving node");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn the_mapping_is_fixed_across_builds() {
        // Pinned so that a change of hash, which would re-home every instance on a rolling
        // upgrade, cannot pass unnoticed.
        let three = nodes(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
        let homes: Vec<&str> = ["default", "alice", "bob", "Default"]
            .iter()
            .map(|i| {
                home_node(&three, &["coder-agent", i])
                    .expect("a node")
                    .address
                    .as_str()
            })
            .collect();
        assert_eq!(homes, PINNED_HOMES);
    }

    const PINNED_HOMES: [&str; 4] = ["10.0.0.3:80", "10.0.0.2:80", "10.0.0.1:80", "10.0.0.3:80"];
}
