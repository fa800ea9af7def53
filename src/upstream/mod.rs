//! Upstreams: where an agent request goes, and how to reach it.
//!
//! A `worker` upstream is one Cloudflare Worker that runs `routeAgentRequest` itself. A `local`
//! upstream is a fleet of self-hosted agent nodes that expect the gateway to do that routing;
//! an agent instance lives on exactly one of them ([`crate::fleet`] decides which).

use crate::fleet::FleetSettings;
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
        /// Where its nodes come from and how they are checked.
        fleet: FleetSettings,
    },
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
