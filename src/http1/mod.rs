//! HTTP/1.1 on pingora-core's lower layers: its listeners, TLS, session parser and writer
//! (so its request-smuggling defences, head limits and keep-alive handling stay), and its
//! upstream connector and pool, without `pingora-proxy`'s generic phase machine, whose
//! per-request cost was most of the gateway's (see `docs/pingora-costs.md`). Each request
//! is decided by the same [`Gateway`] calls as the HTTP/2 path; this module moves bytes.
//!
//! HTTP/2 connections (ALPN `h2` on the TLS listener) are handed to `pingora-proxy`.

mod relay;

use crate::proxy::exchange::{Exchange, Gateway};
use crate::proxy::Http2Hooks;
use async_trait::async_trait;
use log::debug;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::connectors::http::v1::Connector;
use pingora::protocols::http::ServerSession;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use pingora::ErrorType;
use std::sync::Arc;

/// The public listeners' HTTP application.
pub(crate) struct Http1App {
    gateway: Arc<Gateway>,
    /// Upstream HTTP/1.1 connections, pooled by peer for keep-alive reuse.
    upstreams: Connector,
    http2: Arc<HttpProxy<Http2Hooks>>,
}

impl Http1App {
    pub(crate) fn new(gateway: Arc<Gateway>, http2: Arc<HttpProxy<Http2Hooks>>) -> Self {
        Http1App {
            gateway,
            upstreams: Connector::new(None),
            http2,
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
            Ok(reusable) => reusable,
            Err(e) => {
                gateway.failed(session, &e, exchange).await;
                false
            }
        }
    }
}

#[async_trait]
impl HttpServerApp for Http1App {
    /// Runs for each request on a connection (pingora-core's loop brings back the stream
    /// returned for the next one), or once for an HTTP/2 connection, which goes to
    /// `pingora-proxy`.
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if session.is_http2() {
            return HttpServerApp::process_new_http(&self.http2, session, shutdown).await;
        }
        if !read_head(&mut session, shutdown).await {
            return None;
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let mut exchange = Exchange::default();
        let reusable = self.serve(&mut session, &mut exchange).await;
        self.gateway.record(&session, &exchange);
        if !reusable {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        let stream = session.finish().await.ok().flatten()?;
        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        HttpServerApp::server_options(self.http2.as_ref())
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        HttpServerApp::h2_options(self.http2.as_ref())
    }

    async fn http_cleanup(&self) {
        HttpServerApp::http_cleanup(self.http2.as_ref()).await
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
