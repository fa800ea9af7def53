//! HTTP/1.1 on pingora-core's lower layers: its listeners, TLS, session parser and writer
//! (so its request-smuggling defences, head limits and keep-alive handling stay), and its
//! upstream connector and pool, without `pingora-proxy`'s generic phase machine, whose
//! per-request cost was most of the gateway's (see `docs/pingora-costs.md`). Each request
//! is decided by the same [`Gateway`] calls as the HTTP/2 path; this module moves bytes.
//!
//! HTTP/2 connections (ALPN `h2` on the TLS listener) are handed to `pingora-proxy`.

mod relay;

use crate::proxy::exchange::{Exchange, Gateway};
use log::debug;
use pingora::apps::HttpPersistentSettings;
use pingora::connectors::http::v1::Connector;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::ErrorType;
use relay::Upstreams;
use std::sync::Arc;

/// How long a client's connection may wait idle between requests. Pingora's session keeps
/// it open forever after the first request of HTTP/1.1 (`respect_keepalive`), or as long
/// as the client's own `Keep-Alive: timeout=` asks; nginx's default is 75 s.
const KEEPALIVE_IDLE_SECONDS: u64 = 60;

/// Serves HTTP/1.1 connections.
pub(crate) struct Http1 {
    gateway: Arc<Gateway>,
    upstreams: Upstreams,
}

impl Http1 {
    pub(crate) fn new(gateway: Arc<Gateway>, conf: &ServerConf) -> Self {
        // Pingora's proxy sizes its pool by the server's threads; the same here.
        let options = || Some(ConnectorOptions::from_server_conf(conf));
        Http1 {
            gateway,
            upstreams: Upstreams {
                pool: Connector::new(options()),
                fresh: TransportConnector::new(options()),
            },
        }
    }

    /// Serves the requests of one connection, one after another, while it is kept alive.
    ///
    /// The loop is here rather than in pingora-core's `HttpServerApp` driver, which boxes a
    /// new future per request and moves the session into it: that copy alone cost about a
    /// sixth of a request's instructions (see `docs/pingora-costs.md`).
    pub(crate) async fn serve_connection(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut session = ServerSession::new_http1(stream);
        // Idle between requests for a while, not at all once shutting down.
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_IDLE_SECONDS));
        loop {
            if !read_head(&mut session, shutdown).await {
                return;
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let mut exchange = Exchange::default();
            let reusable = self.serve(&mut session, &mut exchange).await;
            self.gateway.record(&session, &exchange);
            if !reusable {
                return;
            }
            if session.get_keepalive().is_some() {
                session.set_keepalive(Some(KEEPALIVE_IDLE_SECONDS));
            }
            let mut settings = HttpPersistentSettings::for_session(&session);
            let Ok(Some(next)) = session.finish().await else {
                return;
            };
            let (stream, pipelined) = next.into_parts();
            if let Some(prefix) = pipelined {
                settings.set_pipelined_prefix(prefix);
            }
            session = ServerSession::new_http1(stream);
            settings.apply_to_session(&mut session);
        }
    }

    /// Serves one request whose head has been read; returns whether the connection may
    /// carry the next one.
    async fn serve(&self, session: &mut ServerSession, exchange: &mut Exchange) -> bool {
        let gateway = &self.gateway;
        let result = match gateway.decide(session, exchange).await {
            Ok(true) => return true,
            Ok(false) => relay::forward(gateway, &self.upstreams, session, exchange).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                gateway.failed(session, &e, exchange).await;
                false
            }
        }
    }
}

/// Reads a request head, as `pingora-proxy` does: a malformed head gets Pingora's 400 and a
/// `CONNECT` its 405 (tunnels are not proxied), each closing the connection; a connection
/// closed or broken between requests, or a shutdown while waiting, ends quietly. Returns
/// whether there is a request to serve.
async fn read_head(session: &mut ServerSession, shutdown: &ShutdownWatch) -> bool {
    let mut shutdown = shutdown.clone();
    let read = tokio::select! {
        biased;
        read = session.read_request() => read,
        _ = shutdown.wait_for(|down| *down) => return false,
    };
    let refusal = match read {
        Ok(true) if session.req_header().method == http::Method::CONNECT => 405,
        Ok(true) => return true,
        Ok(false) => return false,
        Err(e) if e.etype() == &ErrorType::InvalidHTTPHeader => {
            debug!("bad request head: {e}");
            400
        }
        Err(e) => {
            debug!("no request head: {e}");
            return false;
        }
    };
    if let Err(e) = session.respond_error(refusal).await {
        debug!("could not answer {refusal}: {e}");
    }
    session.shutdown().await;
    false
}
