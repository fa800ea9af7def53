//! The request path's decisions ([`exchange`], [`admission::admit`], [`upstream_request`], the
//! WebSocket session) and the `pingora-proxy` adapter that carries HTTP/2 requests through
//! them: the [`ProxyHttp`] hooks, each one call into [`exchange::Gateway`]. HTTP/1.1 takes
//! the lower-level path in [`crate::http1`], through the same calls.

pub mod admission;
pub mod authorization;
pub mod exchange;
pub mod node_choice;
pub mod problem;
pub mod responses;
pub mod upstream_request;
pub mod websocket_session;

use async_trait::async_trait;
use exchange::{Exchange, Gateway};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, Result};
use std::sync::Arc;

/// The [`ProxyHttp`] hooks for HTTP/2 requests (see [`crate::http1`] for HTTP/1.1).
pub(crate) struct Http2Hooks {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait]
impl ProxyHttp for Http2Hooks {
    type CTX = Exchange;

    fn new_ctx(&self) -> Exchange {
        Exchange::default()
    }

    /// Runs once, when the proxy is built, to set up the modules of every downstream
    /// session. Pingora's default adds its (disabled) compression module, whose per-request
    /// context is pure cost here: the gateway never compresses. This adds nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Runs first for every request, with the request head read: [`Gateway::decide`].
    /// `Ok(true)` means the answer has been written there; `Ok(false)` lets Pingora proxy
    /// the request to the node chosen. Pingora's default admits everything.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Exchange) -> Result<bool> {
        self.gateway.decide(session.as_downstream_mut(), ctx).await
    }

    /// Runs on the response header before it goes downstream: [`Gateway::answer_headers`].
    /// Pingora's default changes nothing.
    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Exchange,
    ) -> Result<()> {
        self.gateway.answer_headers(ctx, response)
    }

    /// Runs after `request_filter` let a request through: [`Gateway::peer`]. There is no
    /// default in Pingora; an error here reaches [`Self::fail_to_proxy`].
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Exchange,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.gateway.peer(ctx).await?))
    }

    /// Runs on the request header just before it goes upstream:
    /// [`Gateway::upstream_request`]. Pingora's default sends the client's header as it is.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Exchange,
    ) -> Result<()> {
        let has_body = !session.as_downstream_mut().is_body_empty();
        *upstream_request = self
            .gateway
            .upstream_request(ctx, upstream_request, has_body)?;
        Ok(())
    }

    /// Runs on each chunk of the client's body: [`Gateway::request_body`], which bounds a
    /// body without a declared length. Pingora's default passes every chunk.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Exchange,
    ) -> Result<()> {
        let len = body.as_ref().map_or(0, |chunk| chunk.len());
        self.gateway.request_body(ctx, len)
    }

    /// Runs on the upstream's response header: [`Gateway::upstream_answered`]. Pingora's
    /// default passes everything.
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Exchange,
    ) -> Result<()> {
        self.gateway.upstream_answered(ctx, response)
    }

    /// Runs on each chunk of the upstream's response body: [`Gateway::upstream_body`].
    /// Pingora's default passes chunks through unchanged.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Exchange,
    ) -> Result<Option<std::time::Duration>> {
        self.gateway.upstream_body(ctx, body, end_of_stream);
        Ok(None)
    }

    /// Runs when proxying failed: [`Gateway::failed`], unlike Pingora's default bare status
    /// page. The downstream connection is never reused afterwards.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Exchange,
    ) -> FailToProxy {
        let error_code = self
            .gateway
            .failed(session.as_downstream_mut(), e, ctx)
            .await;
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// The request's one-line summary in Pingora's own log lines ("Fail to proxy: ..."). Its
    /// default prints the path with its query, where a `query:` credential travels; this one
    /// prints the method and the path only, as the access line does.
    fn request_summary(&self, session: &Session, _ctx: &Exchange) -> String {
        let request = session.req_header();
        format!("{} {}", request.method, request.uri.path())
    }

    /// Runs last for every request, whatever happened: [`Gateway::record`]. Pingora's
    /// default does nothing.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Exchange) {
        self.gateway.record(session.as_downstream(), ctx);
    }
}
