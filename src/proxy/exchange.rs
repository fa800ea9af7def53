//! One request's decisions, whichever path carries it (HTTP/1.1 on pingora-core's lower
//! layers, HTTP/2 through `pingora-proxy`): admission before anything goes upstream, the
//! node, the request sent upstream, the shaping of the upstream's answer, the answer to a
//! failure, and the record at the end. The paths only move bytes; every decision is here once.

use super::admission::{self, admit, Admission, AllowedCors, ConnectionFacts, RefusalReason};
use super::admission::{Refused, NO_ROUTE};
use super::authorization::authorize;
use super::node_choice::{choose_node, is_connect_failure, NodeChoice};
use super::problem::{upstream_error_kind, Problem};
use super::responses::upstream_error_answer;
use super::responses::{apply_cors, holds_secrets, is_small, send_preflight};
use super::upstream_request::{upstream_request_for, ClientInfo, UpstreamBody};
use super::websocket_session::{hold_websocket_slot, serve_websocket};
use crate::config::GatewayConfig;
use crate::edge::client_address::{client_ip, forwarded_for};
use crate::edge::limits::{LimitRefusal, WebSocketSlot};
use crate::edge::request_id::{request_id, trace_id, REQUEST_ID_HEADER, TRACEPARENT_HEADER};
use crate::routing::resolve::Target;
use crate::runtime::state::{ActiveConfig, GatewayState};
use crate::upstream::upgrade_connector;
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorType, Result};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// What every request's decisions need, shared by both paths.
pub(crate) struct Gateway {
    pub(crate) state: Arc<GatewayState>,
    /// Connects WebSocket upstreams; pooled reuse is off because upgraded streams never return.
    connector: TransportConnector,
}

/// One request's state, from its head to its record.
pub(crate) struct Exchange {
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
    /// Request body bytes taken from the client so far.
    body_received: u64,
}

/// A request body that outgrew `max_request_body_bytes` on the way (one without a declared
/// length: admission refuses a declared one before anything goes upstream).
pub(crate) const BODY_TOO_LARGE: ErrorType = ErrorType::Custom("request body too large");

struct AccessFacts {
    method: String,
    path: String,
    agent: Option<String>,
    upstream: Option<String>,
}

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
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
            body_received: 0,
        }
    }
}

fn client_info(session: &ServerSession, config: &GatewayConfig) -> ClientInfo {
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

impl Gateway {
    pub(crate) fn new(state: Arc<GatewayState>) -> Self {
        Gateway {
            state,
            connector: upgrade_connector(),
        }
    }

    /// Decides a request whose head has been read. Admission decides; this performs the
    /// decision. `Ok(true)` means the answer has been written: a refusal, a preflight, a 503
    /// when no node of a `local` upstream is up, or a WebSocket upgrade served in full (see
    /// [`serve_websocket`]); `Ok(false)` means the request is to go to the node chosen for
    /// the admitted target.
    pub(crate) async fn decide(
        &self,
        session: &mut ServerSession,
        exchange: &mut Exchange,
    ) -> Result<bool> {
        let active = self.state.config();
        exchange.client = client_info(session, &active);
        let connection = ConnectionFacts {
            http2: session.is_http2(),
            draining: self.state.drain.draining(),
        };
        let admission = admit(&active, &active.secrets, session.req_header(), connection);
        // Before authentication: a flood of upgrades from one address is refused by its
        // limits before each attempt costs a token verification or a forward-auth call.
        let (admission, slot) =
            hold_websocket_slot(&self.state, &active, admission, &exchange.client);
        let auth_metrics = &self.state.metrics.auth;
        let request = session.req_header();
        let client = &mut exchange.client;
        let admission = authorize(&active, auth_metrics, request, admission, client).await;
        exchange.route = admission.route().to_owned();
        if active.log.access_log {
            exchange.access = Some(access_facts(session.req_header(), &admission));
        }
        let request_id = &exchange.client.request_id;
        match admission {
            Admission::Refuse(refused) => {
                self.count_refusal(&refused);
                refused.problem.send(session, request_id).await?;
            }
            Admission::Preflight { headers, .. } => {
                send_preflight(session, &headers, request_id).await?
            }
            Admission::Upgrade(admitted) => {
                let Some(slot) = slot else {
                    return Error::e_explain(ErrorType::InternalError, "no WebSocket slot held");
                };
                // Boxed: inline, its state would enlarge every plain request's future too.
                let upgrade = self.upgrade(session, &exchange.client, active, admitted, slot);
                exchange.status = Some(Box::pin(upgrade).await?);
            }
            Admission::Forward(admitted) => match choose_node(&active, &admitted.target) {
                Ok(node) => {
                    exchange.node = Some(node);
                    exchange.cors = admitted.cors;
                    exchange.target = Some(admitted.target);
                    exchange.active = Some(active);
                    return Ok(false);
                }
                Err(problem) => {
                    let upstream = admitted.target.upstream.name.as_str();
                    self.state
                        .metrics
                        .upstream_error(upstream, "no_healthy_node");
                    problem.send(session, request_id).await?;
                }
            },
        }
        Ok(true)
    }

    /// The peer for a request [`Self::decide`] let through: the node it chose for the
    /// admitted target (for `local` upstreams, the instance's home in its fleet).
    pub(crate) async fn peer(&self, exchange: &mut Exchange) -> Result<HttpPeer> {
        let (Some(target), Some(node)) = (exchange.target.as_ref(), exchange.node.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "no target resolved");
        };
        exchange.upstream_started = Some(Instant::now());
        node.peer(target).await
    }

    /// The request header for the upstream, from the client's: rewritten for the target
    /// (path, Host, routing and forwarding headers, forwarded secrets, no hop-by-hop or
    /// client-chosen routing headers; upgrades other than WebSocket go as plain requests).
    pub(crate) fn upstream_request(
        &self,
        exchange: &Exchange,
        client_request: &RequestHeader,
        has_body: bool,
    ) -> Result<RequestHeader> {
        let (Some(target), Some(active)) = (exchange.target.as_ref(), exchange.active.as_ref())
        else {
            return Error::e_explain(ErrorType::InternalError, "no target resolved");
        };
        let client = &exchange.client;
        let body = match has_body {
            true => UpstreamBody::Present,
            false => UpstreamBody::None,
        };
        upstream_request_for(client_request, target, client, body, &active.secrets)
    }

    /// Counts a chunk of the client's body on its way upstream; past `max_request_body_bytes`
    /// the request fails with [`BODY_TOO_LARGE`], answered 413 while nothing was answered yet.
    pub(crate) fn request_body(&self, exchange: &mut Exchange, chunk_len: usize) -> Result<()> {
        exchange.body_received += chunk_len as u64;
        let limit = exchange.active.as_ref();
        let limit = limit.and_then(|active| active.limits.max_request_body_bytes);
        match limit {
            Some(max) if exchange.body_received > max => {
                Error::e_explain(BODY_TOO_LARGE, format!("more than {max} bytes"))
            }
            _ => Ok(()),
        }
    }

    /// Takes the upstream's response header as it arrives: records the upstream's latency
    /// and health, and rewrites a small 500 from an upstream whose agents need secrets into
    /// a 503 whose JSON body is decided once the body is read (see [`Self::upstream_body`]).
    pub(crate) fn upstream_answered(
        &self,
        exchange: &mut Exchange,
        response: &mut ResponseHeader,
    ) -> Result<()> {
        let Some(target) = &exchange.target else {
            return Ok(());
        };
        let upstream = target.upstream.name.as_str();
        if let Some(started) = exchange.upstream_started {
            let seconds = started.elapsed().as_secs_f64();
            self.state.metrics.upstream_answered(upstream, seconds);
        }
        let status = response.status.as_u16();
        if let Some(node) = &exchange.node {
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
            exchange.held_error_body = Some(bytes::BytesMut::new());
        }
        Ok(())
    }

    /// The gateway's headers on the answer going downstream. Its CORS policy is the single
    /// source of `Access-Control-*` (the upstream's are replaced), and the answer carries
    /// the request's `x-request-id`.
    pub(crate) fn answer_headers(
        &self,
        exchange: &Exchange,
        response: &mut ResponseHeader,
    ) -> Result<()> {
        if let Some(cors) = &exchange.cors {
            apply_cors(response, &cors.response_headers())?;
        }
        response.insert_header(REQUEST_ID_HEADER, exchange.client.request_id.as_str())?;
        Ok(())
    }

    /// Takes each chunk of the upstream's response body. For a 500 held back by
    /// [`Self::upstream_answered`], it gathers the body and, at its end, replaces it with the
    /// JSON problem (`secret_missing` or `upstream_error`). Other chunks pass unchanged.
    pub(crate) fn upstream_body(
        &self,
        exchange: &mut Exchange,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
    ) {
        let (Some(held), Some(target)) = (exchange.held_error_body.as_mut(), &exchange.target)
        else {
            return;
        };
        if let Some(chunk) = body.take() {
            held.extend_from_slice(&chunk);
        }
        if end_of_stream {
            let problem = upstream_error_answer(&self.state, target, 500, held);
            *body = Some(problem.body_bytes(&exchange.client.request_id));
        }
    }

    /// Answers a request whose proxying failed, when nothing was written yet: upstream
    /// failures get 502 or 504 with JSON naming the upstream and are counted; a failure on
    /// the client's side writes nothing. Returns the status written, or 0.
    pub(crate) async fn failed(
        &self,
        session: &mut ServerSession,
        e: &Error,
        exchange: &Exchange,
    ) -> u16 {
        let problem = match (&exchange.target, e.esource()) {
            _ if e.etype() == &BODY_TOO_LARGE => {
                let refusal = LimitRefusal::BodyTooLarge;
                self.state.metrics.limit_refused(refusal.kind());
                Some(Problem::limit(refusal))
            }
            (Some(target), pingora::ErrorSource::Upstream) => {
                if let (Some(node), true) = (&exchange.node, is_connect_failure(e.etype())) {
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
        let Some(problem) = problem.filter(|_| session.response_written().is_none()) else {
            return 0;
        };
        log::warn!("{} {}: {e}", problem.kind(), problem.status);
        if let Err(write_error) = problem.send(session, &exchange.client.request_id).await {
            log::warn!("could not send the error answer: {write_error}");
        }
        problem.status
    }

    /// Runs last for every request, whatever happened: counts the answer by route and status
    /// and writes the access line.
    pub(crate) fn record(&self, session: &ServerSession, exchange: &Exchange) {
        let status = exchange
            .status
            .or_else(|| session.response_written().map(|r| r.status.as_u16()));
        if let Some(status) = status {
            self.state.metrics.http_request(&exchange.route, status);
        }
        if let Some(access) = &exchange.access {
            log_access(&self.state.config(), exchange, access, status);
        }
    }

    /// Serves an admitted upgrade and counts its handshake; returns the status answered.
    async fn upgrade(
        &self,
        session: &mut ServerSession,
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

fn log_access(
    active: &ActiveConfig,
    exchange: &Exchange,
    access: &AccessFacts,
    status: Option<u16>,
) {
    crate::telemetry::logging::record(
        active.log.json,
        "access",
        &[
            ("method", json!(access.method)),
            ("path", json!(access.path)),
            ("route", json!(exchange.route)),
            ("agent", json!(access.agent.as_deref().unwrap_or("-"))),
            ("status", json!(status.unwrap_or(0))),
            (
                "duration_ms",
                json!(exchange.started.elapsed().as_millis() as u64),
            ),
            ("upstream", json!(access.upstream.as_deref().unwrap_or("-"))),
            ("client", json!(exchange.client.ip.map(|ip| ip.to_string()))),
            ("request_id", json!(exchange.client.request_id)),
            ("trace_id", json!(exchange.client.trace_id)),
        ],
    );
}
