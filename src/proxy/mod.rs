//! The Pingora adapter: the [`ProxyHttp`] hooks, each short. Decisions are made by plain
//! functions with their own tests ([`admission::admit`], [`upstream_request`], the routing,
//! edge and secrets modules); the hooks perform them and record what happened.

pub mod admission;
pub mod authorization;
pub mod node_choice;
pub mod problem;
pub mod responses;
pub mod upstream_request;
pub mod websocket_session;

use crate::config::GatewayConfig;
use crate::edge::client_address::{client_ip, forwarded_for};
use crate::edge::limits::WebSocketSlot;
use crate::edge::request_id::{request_id, trace_id, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use crate::routing::resolve::Target;
use crate::runtime::state::{ActiveConfig, GatewayState};
use crate::upstream::upgrade_connector;
use admission::{admit, Admission, AllowedCors, ConnectionFacts, RefusalReason, Refused, NO_ROUTE};
use async_trait::async_trait;
use authorization::authorize;
use node_choice::{choose_node, is_connect_failure, NodeChoice};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use problem::{upstream_error_kind, Problem};
use responses::{apply_cors, holds_secrets, is_small, send_preflight, upstream_error_answer};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use upstream_request::{is_other_upgrade, prepare_upstream_request, ClientInfo};
use websocket_session::{hold_websocket_slot, serve_websocket};

pub(crate) struct Gateway {
    state: Arc<GatewayState>,
    /// Connects WebSocket upstreams; pooled reuse is off because upgraded streams never return.
    connector: TransportConnector,
}

impl Gateway {
    pub(crate) fn new(state: Arc<GatewayState>) -> Self {
        Gateway {
            state,
            connector: upgrade_connector(),
        }
    }
}

/// Per-request state shared by the hooks.
pub(crate) struct RequestCtx {
    /// The configuration this request is served under, start to end (forwarded requests).
    active: Option<Arc<ActiveConfig>>,
    target: Option<Target>,
    /// The node the request went to, once chosen.
    node: Option<NodeChoice>,
    /// A small upstream 500 held back to see whether it is the "NAME is not set" answer.
    held_error_body: Option<bytes::BytesMut>,
    /// The `route` label: a route name, "fallback" or "none".
    route: String,
    /// The status answered when the gateway wrote the answer on a stream it took over.
    status: Option<u16>,
    upstream_started: Option<Instant>,
    /// The policy in force and the origin it allowed, if any.
    cors: Option<AllowedCors>,
    started: Instant,
    /// Facts for the access line (kept only when it is on), taken before a WebSocket
    /// takeover leaves the session without its request.
    access: Option<AccessFacts>,
    /// Who the client is, worked out once per request.
    client: ClientInfo,
}

struct AccessFacts {
    method: String,
    path: String,
    agent: Option<String>,
    upstream: Option<String>,
}

fn client_info(session: &Session, config: &GatewayConfig) -> ClientInfo {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    let headers = &session.req_header().headers;
    let incoming = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let trusted = &config.trusted_proxies;
    let from_trusted_proxy = peer.is_some_and(|p| trusted.iter().any(|c| c.contains(p)));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    ClientInfo {
        ip: client_ip(peer, incoming, trusted),
        forwarded_for: peer.map(|p| forwarded_for(p, incoming, trusted)),
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        request_id: request_id(from_trusted_proxy, header(REQUEST_ID_HEADER)),
        trace_id: trace_id(header(TRACEPARENT_HEADER)).map(str::to_owned),
        identity: None,
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            active: None,
            target: None,
            node: None,
            held_error_body: None,
            route: NO_ROUTE.to_owned(),
            status: None,
            upstream_started: None,
            cors: None,
            started: Instant::now(),
            access: None,
            client: ClientInfo::default(),
        }
    }

    /// Runs once, when the proxy is built, to set up the modules of every downstream
    /// session. Pingora's default adds its (disabled) compression module, whose per-request
    /// context is pure cost here: the gateway never compresses. This adds nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Runs first for every request, with the request head read. Admission decides; this
    /// performs the decision. `Ok(true)` means the answer has been written here: a refusal,
    /// a preflight, a 503 when no node of a `local` upstream is up, or a WebSocket upgrade
    /// served in full (see [`serve_websocket`]); `Ok(false)` lets Pingora proxy the request to
    /// the node chosen for the admitted target. Pingora's default
    /// admits everything.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let active = self.state.config();
        ctx.client = client_info(session, &active);
        let connection = ConnectionFacts {
            http2: session.as_downstream().is_http2(),
            draining: self.state.drain.draining(),
        };
        let admission = admit(&active, &active.secrets, session.req_header(), connection);
        // Before authentication: a flood of upgrades from one address is refused by its
        // limits before each attempt costs a token verification or a forward-auth call.
        let (admission, slot) = hold_websocket_slot(&self.state, &active, admission, &ctx.client);
        let auth_metrics = &self.state.metrics.auth;
        let request = session.req_header();
        let admission = authorize(&active, auth_metrics, request, admission, &mut ctx.client).await;
        ctx.route = admission.route().to_owned();
        if active.log.access_log {
            ctx.access = Some(access_facts(session.req_header(), &admission));
        }
        match admission {
            Admission::Refuse(refused) => {
                self.count_refusal(&refused);
                refused
                    .problem
                    .send(session, &ctx.client.request_id)
                    .await?;
            }
            Admission::Preflight { headers, .. } => {
                send_preflight(session, &headers, &ctx.client.request_id).await?
            }
            Admission::Upgrade(admitted) => {
                let Some(slot) = slot else {
                    return Error::e_explain(ErrorType::InternalError, "no WebSocket slot held");
                };
                // Boxed: inline, its state would enlarge the future Pingora moves for every
                // plain HTTP request too.
                let upgrade = self.upgrade(session, &ctx.client, active, admitted, slot);
                ctx.status = Some(Box::pin(upgrade).await?);
            }
            Admission::Forward(admitted) => match choose_node(&active, &admitted.target) {
                Ok(node) => {
                    ctx.node = Some(node);
                    ctx.cors = admitted.cors;
                    ctx.target = Some(admitted.target);
                    ctx.active = Some(active);
                    return Ok(false);
                }
                Err(problem) => {
                    let upstream = admitted.target.upstream.name.as_str();
                    self.state
                        .metrics
                        .upstream_error(upstream, "no_healthy_node");
                    problem.send(session, &ctx.client.request_id).await?;
                }
            },
        }
        Ok(true)
    }

    /// Runs on the response header before it goes downstream. The gateway's CORS policy is
    /// the single source of `Access-Control-*`: the upstream's are replaced; and the answer
    /// carries the request's `x-request-id`. Pingora's default changes nothing.
    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(cors) = &ctx.cors {
            apply_cors(response, &cors.response_headers())?;
        }
        response.insert_header(REQUEST_ID_HEADER, ctx.client.request_id.as_str())?;
        Ok(())
    }

    /// Runs after `request_filter` let a request through: the peer is the node it chose for
    /// the admitted target (for `local` upstreams, the instance's home in its fleet). There is
    /// no default in Pingora; an error here reaches [`Self::fail_to_proxy`].
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let (Some(target), Some(node)) = (ctx.target.as_ref(), ctx.node.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "no target resolved");
        };
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(node.peer(target).await?))
    }

    /// Runs on the request header just before it goes upstream: rewritten for the target
    /// (path, Host, routing and forwarding headers, forwarded secrets, no hop-by-hop or
    /// client-chosen routing headers). Upgrades other than WebSocket go as plain requests.
    /// Pingora's default sends the client's header as it is.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let (Some(target), Some(active)) = (ctx.target.as_ref(), ctx.active.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "no target resolved");
        };
        if is_other_upgrade(upstream_request) {
            upstream_request.remove_header(&http::header::UPGRADE);
        }
        prepare_upstream_request(
            upstream_request,
            target,
            &ctx.client,
            false,
            &active.secrets,
        )
    }

    /// Runs on the upstream's response header. Records the upstream's latency and health;
    /// unlike Pingora's default, which passes everything, it rewrites a small 500 from an
    /// upstream whose agents need secrets into a 503 whose JSON body is decided once the body
    /// is read (see [`Self::upstream_response_body_filter`]).
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
            let seconds = started.elapsed().as_secs_f64();
            self.state.metrics.upstream_answered(upstream, seconds);
        }
        let status = response.status.as_u16();
        if let Some(node) = &ctx.node {
            // The node answered: whatever the status, an application's, it is up.
            node.observed(&self.state.fleets, true);
        }
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

    /// Runs on each chunk of the upstream's response body. For a 500 held back by
    /// [`Self::upstream_response_filter`], it gathers the body and, at its end, replaces it
    /// with the JSON problem (`secret_missing` or `upstream_error`). Otherwise, as Pingora's
    /// default, it passes chunks through unchanged.
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
            let problem = upstream_error_answer(&self.state, target, 500, held);
            *body = Some(problem.body_bytes(&ctx.client.request_id));
        }
        Ok(None)
    }

    /// Runs when proxying failed. Unlike Pingora's default bare status page, upstream failures
    /// answer 502 or 504 with JSON naming the upstream and are counted; a failure on the
    /// client's side writes nothing. The downstream connection is never reused afterwards.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let problem = match (&ctx.target, e.esource()) {
            (Some(target), pingora::ErrorSource::Upstream) => {
                if let (Some(node), true) = (&ctx.node, is_connect_failure(e.etype())) {
                    node.observed(&self.state.fleets, false);
                }
                let upstream = &target.upstream.name;
                let kind = upstream_error_kind(e.etype());
                self.state.metrics.upstream_error(upstream, kind);
                Some(Problem::for_upstream_error(upstream, e.etype()))
            }
            (_, pingora::ErrorSource::Downstream) => None,
            _ => Some(Problem::internal()),
        };
        let mut error_code = 0;
        if let Some(problem) = problem.filter(|_| session.response_written().is_none()) {
            log::warn!("{} {}: {e}", problem.kind(), problem.status);
            if let Err(write_error) = problem.send(session, &ctx.client.request_id).await {
                log::warn!("could not send the error answer: {write_error}");
            }
            error_code = problem.status;
        }
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// The request's one-line summary in Pingora's own log lines ("Fail to proxy: ..."). Its
    /// default prints the path with its query, where a `query:` credential travels; this one
    /// prints the method and the path only, as the access line does.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let request = session.req_header();
        format!("{} {}", request.method, request.uri.path())
    }

    /// Runs last for every request, whatever happened: counts the answer by route and status
    /// and writes the access line. Pingora's default does nothing.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = ctx
            .status
            .or_else(|| session.response_written().map(|r| r.status.as_u16()));
        if let Some(status) = status {
            self.state.metrics.http_request(&ctx.route, status);
        }
        if let Some(access) = &ctx.access {
            log_access(&self.state.config(), ctx, access, status);
        }
    }
}

impl Gateway {
    /// Serves an admitted upgrade and counts its handshake; returns the status answered.
    async fn upgrade(
        &self,
        session: &mut Session,
        client: &ClientInfo,
        active: Arc<ActiveConfig>,
        admitted: admission::Admitted,
        slot: WebSocketSlot,
    ) -> Result<u16> {
        let agent = admission::agent_label(&admitted.target).to_owned();
        let state = &self.state;
        let connector = &self.connector;
        let served =
            serve_websocket(state, connector, session, active, admitted, slot, client).await?;
        let answered = served.answered;
        state.metrics.websocket.handshake(&agent, answered.result);
        served.written?;
        Ok(answered.status)
    }

    /// The counters a refusal moves besides the request counter.
    fn count_refusal(&self, refused: &Refused) {
        let metrics = &self.state.metrics;
        match refused.reason {
            RefusalReason::Limit(limit) | RefusalReason::WebSocketLimit(limit) => {
                metrics.limit_refused(limit.kind())
            }
            RefusalReason::OriginRefused => metrics.origin_refused(&refused.route),
            _ => {}
        }
        if let Some(result) = refused.handshake_result() {
            metrics.websocket.handshake(&refused.agent, result);
        }
    }
}

fn access_facts(request: &RequestHeader, admission: &Admission) -> AccessFacts {
    let target = match admission {
        Admission::Forward(admitted) | Admission::Upgrade(admitted) => Some(&admitted.target),
        _ => None,
    };
    // Named once routed: refusals by limits and routing have no agent.
    let agent = match admission {
        Admission::Refuse(refused) => match refused.reason {
            RefusalReason::Limit(_) | RefusalReason::Routing => None,
            _ => Some(refused.agent.clone()),
        },
        Admission::Preflight { agent, .. } => Some(agent.clone()),
        _ => target.map(|t| admission::agent_label(t).to_owned()),
    };
    AccessFacts {
        method: request.method.as_str().to_owned(),
        // The path only: queries carry connection ids.
        path: request.uri.path().to_owned(),
        agent,
        upstream: match admission {
            Admission::Refuse(refused) => refused.upstream.clone(),
            _ => target.map(|t| t.upstream.name.clone()),
        },
    }
}

fn log_access(active: &ActiveConfig, ctx: &RequestCtx, access: &AccessFacts, status: Option<u16>) {
    crate::telemetry::logging::record(
        active.log.json,
        "access",
        &[
            ("method", json!(access.method)),
            ("path", json!(access.path)),
            ("route", json!(ctx.route)),
            ("agent", json!(access.agent.as_deref().unwrap_or("-"))),
            ("status", json!(status.unwrap_or(0))),
            (
                "duration_ms",
                json!(ctx.started.elapsed().as_millis() as u64),
            ),
            ("upstream", json!(access.upstream.as_deref().unwrap_or("-"))),
            ("client", json!(ctx.client.ip.map(|ip| ip.to_string()))),
            ("request_id", json!(ctx.client.request_id)),
            ("trace_id", json!(ctx.client.trace_id)),
        ],
    );
}
