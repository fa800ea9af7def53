//! The Pingora hooks. They stay thin: decisions are made by [`crate::routing`],
//! [`crate::proxy::upstream_request`] and [`crate::websocket`], which are plain code with their own tests.

pub mod problem;
pub mod upstream_request;

use crate::config::GatewayConfig;
use crate::edge::client_address::{client_ip, forwarded_for};
use crate::edge::cors::{decide, request_origin, CorsDecision, CorsPolicy, CorsRequest};
use crate::edge::limits::{check_request, WebSocketSlot};
use crate::proxy::problem::{upstream_error_kind, Problem};
use crate::proxy::upstream_request::{is_other_upgrade, prepare_upstream_request, ClientInfo};
use crate::routing::resolve::{resolve, Target};
use crate::runtime::state::{ConnectionGuard, GatewayState};
use crate::secrets::reported_missing;
use crate::telemetry::metrics::{ConnectionMetrics, UNKNOWN_AGENT};
use crate::websocket::pump::{pump, ConnectionOutcome, DropKind, Initiator};
use crate::websocket::socket::Socket;
use crate::websocket::{
    handshake, is_websocket_upgrade, negotiated_deflate, response_head_bytes, take_client_stream,
    Handshake,
};
use async_trait::async_trait;
use bytes::Bytes;
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
    state: Arc<GatewayState>,
    /// Connects WebSocket upstreams; pooled reuse is off because upgraded streams never return.
    connector: TransportConnector,
}

impl Gateway {
    pub fn new(state: Arc<GatewayState>) -> Self {
        Gateway {
            state,
            connector: upgrade_connector(),
        }
    }
}

/// A connector for upstream connections that are upgraded or closed, never pooled.
pub fn upgrade_connector() -> TransportConnector {
    let mut options = pingora::connectors::ConnectorOptions::new(0);
    options.keepalive_pool_size = 0;
    TransportConnector::new(Some(options))
}

/// Per-request state shared by the hooks.
pub struct RequestCtx {
    /// The configuration this request is served under, start to end.
    config: Option<Arc<GatewayConfig>>,
    target: Option<Target>,
    /// A small upstream 500 held back to see whether it is the "NAME is not set" answer.
    held_error_body: Option<bytes::BytesMut>,
    /// The `route` label: a route name, "fallback" or "none".
    route: String,
    /// The status answered when the gateway wrote the answer on a stream it took over.
    status: Option<u16>,
    upstream_started: Option<Instant>,
    /// The policy in force and the origin it allowed, if any.
    cors: Option<(Arc<CorsPolicy>, Option<String>)>,
    started: Instant,
    /// The agent label, once routed.
    agent: Option<String>,
    /// Facts for the access line, taken before a WebSocket takeover leaves the session
    /// without its request.
    method: String,
    path: String,
    /// Who the client is, worked out once per request.
    client: ClientInfo,
}

fn client_info(session: &Session, config: &GatewayConfig) -> ClientInfo {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let incoming = session
        .req_header()
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    ClientInfo {
        ip: client_ip(peer, incoming, &config.trusted_proxies),
        forwarded_for: peer.map(|p| forwarded_for(p, incoming, &config.trusted_proxies)),
        tls,
    }
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
            config: None,
            target: None,
            held_error_body: None,
            route: NO_ROUTE.to_owned(),
            status: None,
            upstream_started: None,
            cors: None,
            started: Instant::now(),
            agent: None,
            method: String::new(),
            path: String::new(),
            client: ClientInfo::default(),
        }
    }

    /// No downstream modules: Pingora's default adds a disabled compression module, whose
    /// per-request context is pure cost (the gateway never compresses).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Routes every request; refusals and WebSocket upgrades are answered here, in full.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let config = self.state.config();
        let metrics = &self.state.metrics;
        ctx.client = client_info(session, &config);
        let req = session.req_header();
        let access_log = config.log.access_log;
        if access_log {
            ctx.method = req.method.as_str().to_owned();
            ctx.path = req.uri.path().to_owned();
        }
        let websocket = is_websocket_upgrade(req);
        if let Err(refusal) = check_request(&config.limits, req) {
            metrics.limit_refused(refusal.kind());
            Problem::limit(refusal).send(session).await?;
            return Ok(true);
        }
        let target = match resolve(&config, req.uri.path(), req.uri.query()) {
            Ok(target) => target,
            Err(refusal) => {
                if let Some(route) = refusal.route() {
                    ctx.route = route.to_owned();
                }
                let problem = Problem::from(&refusal);
                if websocket {
                    metrics.handshake(UNKNOWN_AGENT, &problem.status.to_string());
                }
                problem.send(session).await?;
                return Ok(true);
            }
        };
        ctx.route = match &target.agent {
            Some(agent) => agent.route.clone(),
            None => FALLBACK_ROUTE.to_owned(),
        };
        if access_log {
            ctx.agent = Some(agent_label(Some(&target)).to_owned());
        }
        if let Some(policy) = target.cors.clone() {
            let origin = match request_origin(&req.headers) {
                Ok(origin) => origin,
                Err(error) => {
                    if websocket {
                        metrics.handshake(agent_label(Some(&target)), "400");
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
                    metrics.origin_refused(&ctx.route);
                    if websocket {
                        metrics.handshake(agent_label(Some(&target)), "origin_refused");
                    }
                    problem.send(session).await?;
                    return Ok(true);
                }
            }
        }
        if let Some(problem) = missing_secret(&config, &target) {
            if websocket {
                metrics.handshake(agent_label(Some(&target)), "secret_missing");
            }
            problem.send(session).await?;
            return Ok(true);
        }
        if websocket {
            if access_log {
                ctx.target = Some(target.clone());
            }
            let cors_headers = ctx
                .cors
                .as_ref()
                .map(|_| cors_response_headers(ctx.cors.as_ref()));
            // Boxed: inline, its state would enlarge the future Pingora moves for every
            // plain HTTP request too.
            ctx.status = Some(
                Box::pin(self.serve_websocket(
                    session,
                    Arc::clone(&config),
                    target,
                    &ctx.client,
                    cors_headers.as_deref(),
                ))
                .await?,
            );
            return Ok(true);
        }
        ctx.target = Some(target);
        ctx.config = Some(config);
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
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let target = ctx
            .target
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no target resolved"))?;
        let config = ctx
            .config
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no configuration"))?;
        if is_other_upgrade(upstream_request) {
            // Only WebSocket upgrades are proxied; anything else goes as a plain request.
            upstream_request.remove_header(&http::header::UPGRADE);
        }
        prepare_upstream_request(
            upstream_request,
            target,
            &ctx.client,
            false,
            &config.secrets,
        )
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(target) = &ctx.target else {
            return Ok(());
        };
        let upstream = target.upstream.name.as_str();
        if let Some(started) = ctx.upstream_started {
            self.state
                .metrics
                .upstream_answered(upstream, started.elapsed().as_secs_f64());
        }
        let status = response.status.as_u16();
        if status < 500 {
            self.state.upstream_answered_well(upstream);
        } else if status == 500 && holds_secrets(target) && is_small(response) {
            // Possibly the field's "NAME is not set": the body decides, so the header is
            // rewritten now and the body held back until it is complete.
            response.set_status(503)?;
            response.remove_header(&http::header::CONTENT_LENGTH);
            response.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            ctx.held_error_body = Some(bytes::BytesMut::new());
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        let (Some(held), Some(target)) = (ctx.held_error_body.as_mut(), ctx.target.as_ref()) else {
            return Ok(None);
        };
        if let Some(chunk) = body.take() {
            held.extend_from_slice(&chunk);
        }
        if end_of_stream {
            let problem = self.upstream_error_answer(target, 500, held);
            *body = Some(bytes::Bytes::from(problem.body.to_string()));
        }
        Ok(None)
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
                self.state
                    .metrics
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
            self.state.metrics.http_request(&ctx.route, status);
        }
        let config = self.state.config();
        if config.log.access_log {
            crate::telemetry::logging::record(
                config.log.json,
                "access",
                &[
                    ("method", json!(ctx.method)),
                    // The path only: queries carry connection ids.
                    ("path", json!(ctx.path)),
                    ("route", json!(ctx.route)),
                    ("agent", json!(ctx.agent.as_deref().unwrap_or("-"))),
                    ("status", json!(status.unwrap_or(0))),
                    (
                        "duration_ms",
                        json!(ctx.started.elapsed().as_millis() as u64),
                    ),
                    (
                        "upstream",
                        json!(ctx
                            .target
                            .as_ref()
                            .map_or("-", |t| t.upstream.name.as_str())),
                    ),
                    ("client", json!(ctx.client.ip.map(|ip| ip.to_string()))),
                ],
            );
        }
    }
}

/// The first secret an agent needs that the gateway should hold and does not.
fn missing_secret(config: &GatewayConfig, target: &Target) -> Option<Problem> {
    let agent = &target.agent.as_ref()?.agent;
    if !agent.upstream.is_local() {
        return None;
    }
    agent.required_secrets.iter().find_map(|name| {
        let secret = config.secrets.get(name)?;
        secret.value.is_none().then(|| {
            Problem::secret_missing(
                name,
                &agent.upstream.secret_hint(name, Some(&secret.source)),
            )
        })
    })
}

/// Whether requests to this target need secrets, so a 500 may be the field's signature.
fn holds_secrets(target: &Target) -> bool {
    target
        .agent
        .as_ref()
        .is_some_and(|a| !a.agent.required_secrets.is_empty())
}

/// Largest upstream 500 body inspected for the "NAME is not set" signature.
const MAX_INSPECTED_ERROR: usize = 4096;

fn is_small(response: &ResponseHeader) -> bool {
    response
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|len| len <= MAX_INSPECTED_ERROR)
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
        config: Arc<GatewayConfig>,
        target: Target,
        client: &ClientInfo,
        cors_headers: Option<&[(&'static str, String)]>,
    ) -> Result<u16> {
        let metrics = &self.state.metrics;
        let agent = agent_label(Some(&target));
        let upstream_name = target.upstream.name.as_str();
        let refuse = |problem: Problem, result: &str| {
            metrics.handshake(agent, result);
            problem
        };
        if self.state.draining() {
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
        let slot = match self.state.limits.admit_websocket(&config.limits, client.ip) {
            Ok(slot) => slot,
            Err(refusal) => {
                metrics.limit_refused(refusal.kind());
                let problem = refuse(Problem::limit(refusal), &refusal.status().to_string());
                problem.send(session).await?;
                return Ok(problem.status);
            }
        };
        let mut request = session.req_header().clone();
        prepare_upstream_request(&mut request, &target, client, true, &config.secrets)?;
        let started = Instant::now();
        let answer = match peer_for(&target).await {
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
                metrics.upstream_answered(upstream_name, started.elapsed().as_secs_f64());
                info!("upstream {upstream_name} refused a WebSocket upgrade with {status}");
                if status < 500 {
                    self.state.upstream_answered_well(upstream_name);
                } else if holds_secrets(&target) {
                    // The field's 1006: a 500 "NAME is not set" to the upgrade. Say so.
                    let problem = self.upstream_error_answer(&target, status, &body);
                    if problem.kind() == "secret_missing" {
                        metrics.handshake(agent, "secret_missing");
                        problem.send(session).await?;
                        return Ok(problem.status);
                    }
                }
                metrics.handshake(agent, &status.to_string());
                relay_refusal(session, response, body).await?;
                return Ok(status);
            }
            Err(e) => {
                metrics.upstream_error(upstream_name, upstream_error_kind(e.etype()));
                let problem = refuse(
                    Problem::for_upstream_error(upstream_name, e.etype()),
                    "upstream_error",
                );
                warn!("WebSocket upgrade via upstream {upstream_name} failed: {e}");
                problem.send(session).await?;
                return Ok(problem.status);
            }
        };
        metrics.upstream_answered(upstream_name, started.elapsed().as_secs_f64());
        metrics.handshake(agent, "101");
        self.state.upstream_answered_well(upstream_name);
        let mut response = response;
        if let Some(headers) = cors_headers {
            apply_cors(&mut response, headers)?;
        }
        let deflate = negotiated_deflate(&response);
        let Some(mut client) = take_client_stream(session.as_downstream_mut()) else {
            return Error::e_explain(ErrorType::InternalError, "downstream stream unavailable");
        };
        let connection = UpgradedConnection {
            metrics: metrics.connection_opened(agent),
            _open: self.state.connections.open(),
            _slot: slot,
            state: Arc::clone(&self.state),
            config,
            target,
            upstream: Socket::detach(stream),
            preread,
            deflate,
        };
        let head = response_head_bytes(&response);
        if client.write_all(&head).await.is_err() || client.flush().await.is_err() {
            return Ok(101);
        }
        // The connection lives on in a task of its own, so that Pingora's request futures,
        // session and request header are freed now rather than held for the socket's life.
        tokio::spawn(connection.run(Socket::detach(client)));
        Ok(101)
    }

    /// The answer for an upstream 500: `secret_missing` when it is the field's "NAME is not
    /// set" (and the upstream is marked), else an `upstream_error` carrying its text.
    fn upstream_error_answer(&self, target: &Target, status: u16, body: &[u8]) -> Problem {
        let upstream = &target.upstream;
        let required = target
            .agent
            .as_ref()
            .map_or(&[][..], |a| a.agent.required_secrets.as_slice());
        match reported_missing(status, body, required) {
            Some(secret) => {
                self.state.upstream_reported_missing(&upstream.name, secret);
                let hint = upstream.secret_hint(secret, None);
                Problem::secret_missing(secret, &hint)
            }
            None => Problem::upstream_status(&upstream.name, status, body),
        }
    }
}

/// An agent WebSocket after its 101: everything its own task needs, and the guards that
/// keep it counted (drain, limits, active gauge) until the task ends.
struct UpgradedConnection {
    metrics: ConnectionMetrics,
    _open: ConnectionGuard,
    _slot: WebSocketSlot,
    state: Arc<GatewayState>,
    config: Arc<GatewayConfig>,
    target: Target,
    upstream: Socket,
    preread: Bytes,
    deflate: bool,
}

impl UpgradedConnection {
    /// Pumps the two streams until the connection ends, then accounts for how it ended.
    async fn run(self, client: Socket) {
        let outcome = pump(
            client,
            self.upstream,
            &self.preread,
            self.deflate,
            self.state.drain_signal(),
            &self.config.websocket,
            &self.metrics,
        )
        .await;
        let metrics = &self.state.metrics;
        let upstream_name = self.target.upstream.name.as_str();
        if outcome.initiator == Initiator::Upstream && outcome.code == 1006 {
            let kind = match outcome.drop_kind {
                Some(DropKind::Timeout) => "timeout",
                Some(DropKind::Tls) => "tls",
                _ => "dropped",
            };
            metrics.upstream_error(upstream_name, kind);
        }
        metrics.connection_closed(agent_label(Some(&self.target)), &outcome);
        if self.config.log.access_log {
            log_outcome(self.config.log.json, &self.target, &outcome);
        }
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

/// One connection line per WebSocket at close. The instance is hashed: its name can be a
/// user's identifier.
fn log_outcome(json: bool, target: &Target, outcome: &ConnectionOutcome) {
    let instance = target.agent.as_ref().map_or("", |a| a.instance.as_str());
    crate::telemetry::logging::record(
        json,
        "websocket",
        &[
            ("agent", json!(agent_label(Some(target)))),
            (
                "instance_hash",
                json!(format!(
                    "{:016x}",
                    crate::upstream::stable_hash(instance.as_bytes())
                )),
            ),
            ("upstream", json!(target.upstream.name)),
            ("initiator", json!(outcome.initiator.label())),
            ("code", json!(outcome.code)),
            ("reason_len", json!(outcome.reason_len)),
            ("answered", json!(outcome.answered)),
            ("drop", json!(outcome.drop_kind.map(|k| k.label()))),
            (
                "protocol_error",
                json!(outcome.protocol_error.map(|e| e.kind())),
            ),
            ("duration_ms", json!(outcome.duration.as_millis() as u64)),
            ("bytes_in", json!(outcome.client_to_upstream.bytes)),
            ("bytes_out", json!(outcome.upstream_to_client.bytes)),
            ("frames_in", json!(outcome.client_to_upstream.frames)),
            ("frames_out", json!(outcome.upstream_to_client.frames)),
        ],
    );
}
