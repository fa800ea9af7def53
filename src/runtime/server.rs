//! Server wiring: the Pingora server, the public proxy service, the admin service, the secret
//! probes, the JWKS refresh, and the signal watcher that drains before Pingora shuts down.

use super::fleet_checks::FleetChecks;
use super::jwks_refresh::JwksRefresh;
use super::probes::SecretProbes;
use crate::config::GatewayConfig;
use crate::edge::header_deadline::HeaderDeadline;
use crate::http1::Http1;
use crate::proxy::exchange::Gateway;
use crate::proxy::Http2Hooks;
use crate::runtime::admin::Admin;
use crate::runtime::signals::GatewaySignals;
use crate::runtime::state::GatewayState;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, ALPN};
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::ShutdownWatch;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::sync::Arc;

/// Starts the gateway and serves until a signal stops it.
pub fn run(config: GatewayConfig, config_path: PathBuf, upgrade: bool) {
    let conf = ServerConf {
        threads: config.threads,
        // The drain happens before Pingora is told to stop (see lifecycle): by then the
        // WebSockets are closed, and in-flight HTTP requests get these few seconds.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: config.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let listen = config.listen.clone();
    let admin_listen = config.admin_listen.clone();
    let tls_listen = config.tls.as_ref().map(|t| t.listen.clone());
    let state = GatewayState::new(config, config_path);

    let gateway = Arc::new(Gateway::new(state.clone()));
    let http2 = Http2Hooks {
        gateway: Arc::clone(&gateway),
    };
    let edge = EdgeApp {
        http2: Arc::new(pingora::proxy::http_proxy(&server.configuration, http2)),
        http1: Http1::new(gateway, &server.configuration),
        state: state.clone(),
    };
    let mut proxy = Service::new("agent gateway".to_owned(), edge);
    // No L4 read buffer: Pingora's HTTP session reads into its own. `Socket::detach` relies on
    // it: bytes left in such a buffer would be lost when a WebSocket leaves Pingora's stream.
    let buffers = L4BufferSettings::default().read(0);
    proxy.add_listener(ListenerConfig::tcp(&listen).l4_buffer(buffers));
    if let (Some(tls_listen), Some(resolver)) = (&tls_listen, state.tls_resolver()) {
        // Certificates come from the resolver (SNI, reloadable), not from these paths.
        match TlsSettings::intermediate("", "") {
            Ok(mut settings) => {
                settings.set_cert_resolver(resolver);
                // HTTP/2 and HTTP/1.1: a browser opens at most six HTTP/1.1 connections per
                // origin, too few for an agent UI with several event streams. WebSocket
                // upgrades stay on HTTP/1.1: without RFC 8441's setting, which is not sent,
                // browsers open them on a connection of their own.
                settings.set_alpn(ALPN::H2H1);
                proxy.add_listener(
                    ListenerConfig::tcp(tls_listen.as_str())
                        .tls(settings)
                        .l4_buffer(buffers),
                );
            }
            Err(e) => log::error!("cannot set up the TLS listener {tls_listen}: {e}"),
        }
    }
    let mut admin = Service::new("admin".to_owned(), Admin::new(state.clone()));
    admin.add_tcp(&admin_listen);
    let probes = background_service(
        "secret probes",
        SecretProbes {
            state: state.clone(),
        },
    );

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(probes);
    let jwks = JwksRefresh {
        state: state.clone(),
    };
    server.add_service(background_service("jwks refresh", jwks));
    let fleet = FleetChecks {
        state: state.clone(),
    };
    server.add_service(background_service("fleet checks", fleet));
    log::info!("agent-gateway listening on http://{listen}, admin on http://{admin_listen}");
    server.run(RunArgs {
        shutdown_signal: Box::new(GatewaySignals { state }),
    });
}

/// The public listeners' app: HTTP/1.1 on pingora-core's lower layers (see
/// [`crate::http1`]) behind a deadline on each connection's first request head (see
/// [`HeaderDeadline`]), and HTTP/2 (ALPN `h2` on the TLS listener) through `pingora-proxy`.
struct EdgeApp {
    http1: Http1,
    http2: Arc<HttpProxy<Http2Hooks>>,
    state: Arc<GatewayState>,
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return ServerApp::process_new(&self.http2, stream, shutdown).await;
        }
        let header_timeout = self.state.config().limits.header_timeout;
        let stream: Stream = match header_timeout {
            Some(limit) => Box::new(HeaderDeadline::new(
                stream,
                limit,
                self.state.metrics.limit_counter("header_timeout"),
            )),
            None => stream,
        };
        self.http1.serve_connection(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.http2.as_ref()).await
    }
}
