//! The Pingora hooks. They stay thin: decisions are made by [`crate::routing`],
//! [`crate::forwarding`] and [`crate::websocket`], which are plain code with their own tests.

use crate::config::GatewayConfig;
use crate::cors::{decide, request_origin, CorsDecision, CorsPolicy, CorsRequest};
use crate::forwarding::{is_other_upgrade, prepare_upstream_request, ClientInfo};
use crate::metrics::{Metrics, UNKNOWN_AGENT};
use crate::problem::{upstream_error_kind, Problem};
use crate::routing::{resolve, Target};
use crate::websocket::pump::{pump, ConnectionOutcome, DrainSignal, DropKind, Initiator};
use crate::websocket::{
    handshake, is_websocket_upgrade, negotiated_deflate, response_head_bytes, take_client_stream,
    Handshake,
};
use async_trait::async_trait;
use log::{info, warn};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// The `route` label of requests outside every route prefix.
const NO_ROUTE: &str = "none";
const FALLBACK_ROUTE: &str = "fallback";

pub struct Gateway {
    config: Arc<GatewayConfig>,
    metrics: Arc<Metrics>,
    /// Connects WebSocket upstreams; pooled reuse is off because upgraded streams never return.
    connector: TransportConnector,
    drain: DrainSignal,
}

impl Gateway {
    pub fn new(config: Arc<GatewayConfig>, metrics: Arc<Metrics>, drain: DrainSignal) -> Self {
        let mut options = pingora::connectors::ConnectorOptions::new(0);
        options.keepalive_pool_size = 0;
        Gateway {
            config,
            metrics,
            connector: TransportConnector::new(Some(options)),
            drain,
        }
    }
}

/// Per-request state shared by the hooks.
pub struct RequestCtx {
    target: Option<Target>,
    /// The `route` label: a route name, "fallback" or "none".
    route: String,
    /// The status answered when the gateway wrote the answer on a stream it took over.
    status: Option<u16>,
    upstream_started: Option<Instant>,
    /// The policy in force and the origin it allowed, if any.
    cors: Option<(Arc<CorsPolicy>, Option<String>)>,
}

fn client_info(session: &Session) -> ClientInfo {
    let ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    ClientInfo { ip, tls }
}

fn agent_label(target: Option<&Target>) -> &str {
    target
        .and_then(|t| t.agent.as_ref())
        .map_or(UNKNOWN_AGENT, |a| a.agent.name.as_str())
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            target: None,
            route: NO_ROUTE.to_owned(),
            status: None,
            upstream_started: None,
            cors: None,
        }
    }

    /// Routes every request; refusals and WebSocket upgrades are answered here, in full.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        let websocket = is_websocket_upgrade(req);
        let target = match resolve(&self.config, req.uri.path(), req.uri.query()) {
            Ok(target) => target,
            Err(refusal) => {
                if let Some(route) = refusal.route() {
                    ctx.route = route.to_owned();
                }
                let problem = Problem::from(&refusal);
                if websocket {
                    self.metrics
                        .handshake(UNKNOWN_AGENT, &problem.status.to_string());
                }
                problem.send(session).await?;
                return Ok(true);
            }
        };
        ctx.route = match &target.agent {
            Some(agent) => agent.route.clone(),
            None => FALLBACK_ROUTE.to_owned(),
        };
        if let Some(policy) = target.cors.clone() {
            let origin = match request_origin(&req.headers) {
                Ok(origin) => origin,
                Err(error) => {
                    if websocket {
                        self.metrics.handshake(agent_label(Some(&target)), "400");
                    }
                    Problem::bad_origin_header(error).send(session).await?;
                    return Ok(true);
                }
            };
            let preflight = req.method == http::Method::OPTIONS
                && req
                    .headers
                    .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
            match decide(
                &policy,
                CorsRequest {
                    origin,
                    websocket,
                    preflight,
                },
            ) {
                CorsDecision::Forward { allowed_origin } => {
                    ctx.cors = Some((policy, allowed_origin));
                }
                CorsDecision::Preflight { headers } => {
                    send_preflight(session, headers).await?;
                    return Ok(true);
                }
                CorsDecision::Refuse => {
                    let problem = Problem::origin_refused(origin);
                    self.metrics.origin_refused(&ctx.route);
                    if websocket {
                        self.metrics
                            .handshake(agent_label(Some(&target)), "origin_refused");
                    }
                    problem.send(session).await?;
                    return Ok(true);
                }
            }
        }
        if websocket {
            let cors_headers = ctx
                .cors
                .as_ref()
                .map(|_| cors_response_headers(ctx.cors.as_ref()));
            ctx.status = Some(
                self.serve_websocket(session, &target, cors_headers.as_deref())
                    .await?,
            );
            return Ok(true);
        }
        ctx.target = Some(target);
        Ok(false)
    }

    /// The policy is the single source of `Access-Control-*`: the upstream's are replaced.
    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.cors.is_some() {
            apply_cors(response, &cors_response_headers(ctx.cors.as_ref()))?;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let target = ctx
            .target
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no target resolved"))?;
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(peer_for(target).await?))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let target = ctx
            .target
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no target resolved"))?;
        if is_other_upgrade(upstream_request) {
            // Only WebSocket upgrades are proxied; anything else goes as a plain request.
            upstream_request.remove_header(&http::header::UPGRADE);
        }
        prepare_upstream_request(upstream_request, target, client_info(session), false)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(target), Some(started)) = (&ctx.target, ctx.upstream_started) {
            self.metrics
                .upstream_answered(&target.upstream.name, started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Upstream failures answer with JSON naming the upstream, never a bare status.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let problem = match (&ctx.target, e.esource()) {
            (Some(target), pingora::ErrorSource::Upstream) => {
                self.metrics
                    .upstream_error(&target.upstream.name, upstream_error_kind(e.etype()));
                Some(Problem::for_upstream_error(
                    &target.upstream.name,
                    e.etype(),
                ))
            }
            (_, pingora::ErrorSource::Downstream) => None,
            _ => Some(Problem::new(
                500,
                json!({"error": "internal", "detail": "the gateway failed to proxy the request"}),
            )),
        };
        let status = match problem {
            Some(problem) if session.response_written().is_none() => {
                warn!("{} {}: {e}", problem.kind(), problem.status);
                if let Err(write_error) = problem.send(session).await {
                    warn!("could not send the error answer: {write_error}");
                }
                problem.status
            }
            _ => 0,
        };
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = ctx
            .status
            .or_else(|| session.response_written().map(|r| r.status.as_u16()));
        if let Some(status) = status {
            self.metrics.http_request(&ctx.route, status);
        }
    }
}

async fn peer_for(target: &Target) -> Result<HttpPeer> {
    let address = target.address().ok_or_else(|| {
        Error::explain(
            ErrorType::ConnectNoRoute,
            format!("upstream {} has no node", target.upstream.name),
        )
    })?;
    target.upstream.peer(address).await
}

impl Gateway {
    /// Performs the upgrade with the upstream; on 101, takes both streams over and pumps them
    /// until the connection ends. Returns the status the client was answered.
    async fn serve_websocket(
        &self,
        session: &mut Session,
        target: &Target,
        cors_headers: Option<&[(&'static str, String)]>,
    ) -> Result<u16> {
        let agent = agent_label(Some(target));
        let upstream_name = target.upstream.name.as_str();
        let refuse = |problem: Problem, result: &str| {
            self.metrics.handshake(agent, result);
            problem
        };
        if *self.drain.borrow() {
            let problem = refuse(Problem::draining(), "503");
            problem.send(session).await?;
            return Ok(problem.status);
        }
        if session.as_downstream().is_http2() {
            let problem = refuse(
                Problem::new(
                    400,
                    json!({"error": "websocket_over_http2", "detail": "agent WebSockets need HTTP/1.1"}),
                ),
                "400",
            );
            problem.send(session).await?;
            return Ok(problem.status);
        }
        let mut request = session.req_header().clone();
        prepare_upstream_request(&mut request, target, client_info(session), true)?;
        let started = Instant::now();
        let answer = match peer_for(target).await {
            Ok(peer) => {
                handshake(
                    &self.connector,
                    &peer,
                    &request,
                    target.upstream.read_timeout,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let (response, stream, preread) = match answer {
            Ok(Handshake::Upgraded {
                response,
                stream,
                preread,
            }) => (response, stream, preread),
            Ok(Handshake::Refused { response, body }) => {
                let status = response.status.as_u16();
                self.metrics
                    .upstream_answered(upstream_name, started.elapsed().as_secs_f64());
                self.metrics.handshake(agent, &status.to_string());
                info!("upstream {upstream_name} refused a WebSocket upgrade with {status}");
                relay_refusal(session, response, body).await?;
                return Ok(status);
            }
            Err(e) => {
                self.metrics
                    .upstream_error(upstream_name, upstream_error_kind(e.etype()));
                let problem = refuse(
                    Problem::for_upstream_error(upstream_name, e.etype()),
                    "upstream_error",
                );
                warn!("WebSocket upgrade via upstream {upstream_name} failed: {e}");
                problem.send(session).await?;
                return Ok(problem.status);
            }
        };
        self.metrics
            .upstream_answered(upstream_name, started.elapsed().as_secs_f64());
        self.metrics.handshake(agent, "101");
        let mut response = response;
        if let Some(headers) = cors_headers {
            apply_cors(&mut response, headers)?;
        }
        let deflate = negotiated_deflate(&response);
        let Some(mut client) = take_client_stream(session.as_downstream_mut()) else {
            return Error::e_explain(ErrorType::InternalError, "downstream stream unavailable");
        };
        let connection = self.metrics.connection_opened(agent);
        let head = response_head_bytes(&response);
        if client.write_all(&head).await.is_err() || client.flush().await.is_err() {
            return Ok(101);
        }
        let outcome = pump(
            client,
            stream,
            &preread,
            deflate,
            self.drain.clone(),
            &self.config.websocket,
            &connection,
        )
        .await;
        if outcome.initiator == Initiator::Upstream && outcome.code == 1006 {
            let kind = match outcome.drop_kind {
                Some(DropKind::Timeout) => "timeout",
                Some(DropKind::Tls) => "tls",
                _ => "dropped",
            };
            self.metrics.upstream_error(upstream_name, kind);
        }
        self.metrics.connection_closed(agent, &outcome);
        log_outcome(target, &outcome);
        Ok(101)
    }
}

/// The CORS headers for a request the policy allowed; none otherwise.
fn cors_response_headers(
    cors: Option<&(Arc<CorsPolicy>, Option<String>)>,
) -> Vec<(&'static str, String)> {
    match cors {
        Some((policy, Some(origin))) => policy.response_headers(origin),
        _ => Vec::new(),
    }
}

/// Replaces whatever `Access-Control-*` the upstream sent with the policy's, and marks the
/// answer as varying by Origin.
fn apply_cors(response: &mut ResponseHeader, headers: &[(&'static str, String)]) -> Result<()> {
    let upstream_cors: Vec<http::HeaderName> = response
        .headers
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in upstream_cors {
        response.remove_header(&name);
    }
    for (name, value) in headers {
        response.insert_header(*name, value.as_str())?;
    }
    response.append_header(http::header::VARY, "Origin")?;
    Ok(())
}

async fn send_preflight(session: &mut Session, headers: Vec<(&'static str, String)>) -> Result<()> {
    let mut response = ResponseHeader::build(204, Some(headers.len() + 2))?;
    apply_cors(&mut response, &headers)?;
    response.insert_header(http::header::CONTENT_LENGTH, "0")?;
    session
        .write_response_header(Box::new(response), true)
        .await
}

/// Relays an upstream's refusal of an upgrade as the plain HTTP answer it was, so the client
/// sees the status and reason instead of a socket that died with 1006.
async fn relay_refusal(
    session: &mut Session,
    mut response: Box<ResponseHeader>,
    body: bytes::Bytes,
) -> Result<()> {
    for name in ["connection", "transfer-encoding", "keep-alive", "upgrade"] {
        response.remove_header(name);
    }
    response.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(response, false).await?;
    session.write_response_body(Some(body), true).await
}

fn log_outcome(target: &Target, outcome: &ConnectionOutcome) {
    info!(
        "websocket closed agent={} upstream={} initiator={} code={} reason_len={} answered={} drop={} protocol_error={} duration_ms={} frames_in={} frames_out={} bytes_in={} bytes_out={}",
        agent_label(Some(target)),
        target.upstream.name,
        outcome.initiator.label(),
        outcome.code,
        outcome.reason_len,
        outcome.answered,
        outcome.drop_kind.map_or("-", |k| k.label()),
        outcome.protocol_error.map_or("-", |e| e.kind()),
        outcome.duration.as_millis(),
        outcome.client_to_upstream.frames,
        outcome.upstream_to_client.frames,
        outcome.client_to_upstream.bytes,
        outcome.upstream_to_client.bytes,
    );
}
