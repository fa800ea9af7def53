//! Serving an admitted WebSocket upgrade: the handshake with the upstream, the answer to the
//! client, and the connection's life after the 101 in a task of its own.

use super::admission::{agent_label, Admission, Admitted, RefusalReason, Refused};
use super::node_choice::{choose_for_websocket, is_connect_failure};
use super::problem::{upstream_error_kind, Problem};
use super::responses::{apply_cors, holds_secrets, relay_refusal, upstream_error_answer};
use super::upstream_request::{upstream_request_for, ClientInfo, UpstreamBody};
use crate::auth::credential::{offered_protocols, offers_protocol_credential};
use crate::config::Agent;
use crate::edge::limits::{LimitRefusal, SubjectLimits, SubjectSlot, WebSocketSlot};
use crate::edge::request_id::REQUEST_ID_HEADER;
use crate::routing::resolve::{AgentTarget, Target};
use crate::runtime::drain::ConnectionGuard;
use crate::runtime::state::{ActiveConfig, GatewayState};
use crate::upstream::Upstream;
use crate::websocket::expiry::Expiry;
use crate::websocket::handshake::{
    check_upgrade_answer, handshake, negotiated_deflate, response_head_bytes, take_client_stream,
    Handshake,
};
use crate::websocket::metrics::{ConnectionMetrics, HandshakeResult};
use crate::websocket::outcome::{Cause, ConnectionOutcome, DropKind, Initiator};
use crate::websocket::pump::{pump, Ends, PumpOwner, PumpSettings};
use crate::websocket::rate_limit::{ClientKey, ConnectionLimiter, RateLimitCounters};
use crate::websocket::socket::Socket;
use crate::websocket::stop::StopSignal;
use bytes::Bytes;
use futures_util::FutureExt;
use log::{info, warn};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorType, Result};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::io::AsyncWriteExt;

/// What the client was answered: the HTTP status and the handshake counter's result.
pub(crate) struct Answered {
    pub(crate) status: u16,
    pub(crate) result: HandshakeResult,
}

impl Answered {
    fn refused(problem: &Problem, result: HandshakeResult) -> Self {
        Answered {
            status: problem.status,
            result,
        }
    }

    fn written(self, written: Result<()>) -> Served {
        Served {
            answered: self,
            written,
        }
    }
}

/// What the client was answered, and whether writing it worked: the handshake is counted
/// either way, as the answer was decided.
pub(crate) struct Served {
    pub(crate) answered: Answered,
    pub(crate) written: Result<()>,
}

/// Performs the upgrade with the upstream for a client holding `slot` in the WebSocket limits
/// (see [`hold_websocket_slot`]); on 101, takes both streams over and hands them to a task of
/// their own. Returns what the client was answered; an error only when nothing
/// was decided (the request could not be prepared for the upstream).
pub(crate) async fn serve_websocket(
    state: &Arc<GatewayState>,
    connector: &TransportConnector,
    session: &mut ServerSession,
    active: Arc<ActiveConfig>,
    admitted: Admitted,
    slot: WebSocketSlot,
    client: &ClientInfo,
) -> Result<Served> {
    let metrics = &state.metrics;
    let target = admitted.target;
    let upstream_name = target.upstream.name.as_str();
    let subject_slot = match subject_slot(state, &target, client) {
        Ok(subject_slot) => subject_slot,
        Err(refusal) => {
            metrics.limit_refused(refusal.kind());
            let problem = Problem::limit(refusal);
            let written = problem.send(session, &client.request_id).await;
            let answered = Answered::refused(&problem, HandshakeResult::Status(problem.status));
            return Ok(answered.written(written));
        }
    };
    let (node, stop) = match choose_for_websocket(&active, &state.fleets, &target) {
        Ok(chosen) => chosen,
        Err(problem) => {
            metrics.upstream_error(upstream_name, "no_healthy_node");
            let written = problem.send(session, &client.request_id).await;
            let answered = Answered::refused(&problem, HandshakeResult::UpstreamError);
            return Ok(answered.written(written));
        }
    };
    let secrets = &active.secrets;
    let websocket = UpstreamBody::WebSocket;
    let request = upstream_request_for(session.req_header(), &target, client, websocket, secrets)?;
    let started = Instant::now();
    let answer = match node.peer(&target).await {
        Ok(peer) => handshake(connector, &peer, &request, target.upstream.read_timeout).await,
        Err(e) => Err(e),
    };
    // Only an upgraded connection stays registered on the node: a refused one must not
    // count as a connection that a placement change moves.
    let upgraded = matches!(answer, Ok(Handshake::Upgraded { .. }));
    let stop = stop.filter(|_| upgraded);
    // A passive health check: the node could not be reached, or refused the upgrade as
    // unavailable (502, 503, 504). An application's answer, a 500 "NAME is not set" among
    // them, says the node is up.
    let node_failed = match &answer {
        Ok(Handshake::Refused { response, .. }) => {
            matches!(response.status.as_u16(), 502..=504)
        }
        Ok(Handshake::Upgraded { .. }) => false,
        Err(e) => is_connect_failure(e.etype()),
    };
    node.observed(&state.fleets, !node_failed);
    let (mut response, stream, preread) = match answer {
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
                state.upstream_answered_well(upstream_name);
            } else if holds_secrets(&target) {
                // The field's 1006: a 500 "NAME is not set" to the upgrade. Say so.
                let problem = upstream_error_answer(state, &target, status, &body);
                if problem.kind() == "secret_missing" {
                    let written = problem.send(session, &client.request_id).await;
                    let answered = Answered::refused(&problem, HandshakeResult::SecretMissing);
                    return Ok(answered.written(written));
                }
            }
            let written = relay_refusal(session, response, body, &client.request_id).await;
            let answered = Answered {
                status,
                result: HandshakeResult::Status(status),
            };
            return Ok(answered.written(written));
        }
        Err(e) => {
            metrics.upstream_error(upstream_name, upstream_error_kind(e.etype()));
            let problem = Problem::for_upstream_error(upstream_name, e.etype());
            warn!("WebSocket upgrade via upstream {upstream_name} failed: {e}");
            let written = problem.send(session, &client.request_id).await;
            let answered = Answered::refused(&problem, HandshakeResult::UpstreamError);
            return Ok(answered.written(written));
        }
    };
    metrics.upstream_answered(upstream_name, started.elapsed().as_secs_f64());
    if let Err(why) = check_upgrade_answer(&request, &response) {
        metrics.upstream_error(upstream_name, "invalid_upgrade");
        warn!(
            "upstream {upstream_name} answered the upgrade with a bad 101: {}",
            why.describe()
        );
        let problem = Problem::invalid_upgrade_answer(upstream_name, why);
        let written = problem.send(session, &client.request_id).await;
        let answered = Answered::refused(&problem, HandshakeResult::InvalidAnswer(why));
        return Ok(answered.written(written));
    }
    state.upstream_answered_well(upstream_name);
    if let Err(e) = answer_offered_protocol(session.req_header(), &mut response, &target) {
        let answered = Answered {
            status: 101,
            result: HandshakeResult::Upgraded,
        };
        return Ok(answered.written(Err(e)));
    }
    let upgraded = Answered {
        status: 101,
        result: HandshakeResult::Upgraded,
    };
    if let Some(cors) = &admitted.cors {
        if let Err(e) = apply_cors(&mut response, &cors.response_headers()) {
            return Ok(upgraded.written(Err(e)));
        }
    }
    if let Err(e) = response.insert_header(REQUEST_ID_HEADER, client.request_id.as_str()) {
        return Ok(upgraded.written(Err(e)));
    }
    let deflate = negotiated_deflate(&response);
    let Some(mut client_stream) = take_client_stream(session) else {
        let unavailable =
            Error::e_explain(ErrorType::InternalError, "downstream stream unavailable");
        return Ok(upgraded.written(unavailable));
    };
    let auth = AuthState::of(subject_slot, expiry(&target, client));
    let client_key = client_key(&target, client);
    // The IDs are for the connection line only: without it they are not kept.
    let access_log = active.log.access_log;
    let (request_id, trace_id) = if access_log {
        (client.request_id.clone(), client.trace_id.clone())
    } else {
        (String::new(), None)
    };
    let connection = UpgradedConnection {
        stop: stop.unwrap_or_else(|| state.drain.signal()),
        metrics: metrics.websocket.connection_opened(agent_label(&target)),
        _open: state.connections.open(),
        _slot: slot,
        auth,
        state: Arc::clone(state),
        active,
        target,
        upstream: Socket::detach(stream),
        preread,
        deflate,
        request_id,
        trace_id,
        client_key,
    };
    let head = response_head_bytes(&response);
    if client_stream.write_all(&head).await.is_err() || client_stream.flush().await.is_err() {
        return Ok(upgraded.written(Ok(())));
    }
    // The connection lives on in a task of its own, so that Pingora's request futures,
    // session and request header are freed now rather than held for the socket's life.
    tokio::spawn(connection.run(Socket::detach(client_stream)));
    Ok(upgraded.written(Ok(())))
}

/// An agent WebSocket after its 101: everything its own task needs, and the guards that
/// keep it counted (drain, limits, active gauge) until the task ends.
struct UpgradedConnection {
    /// What its pump watches: its instance's channel on a `local` node (drain and
    /// migration), else the gateway's drain.
    stop: StopSignal,
    metrics: ConnectionMetrics,
    _open: ConnectionGuard,
    _slot: WebSocketSlot,
    auth: Option<Box<AuthState>>,
    state: Arc<GatewayState>,
    active: Arc<ActiveConfig>,
    target: Target,
    upstream: Socket,
    preread: Bytes,
    deflate: bool,
    /// For the connection line: the request's ID and trace ID (empty without access log).
    request_id: String,
    trace_id: Option<String>,
    /// Who the client is, for its rate limits across connections.
    client_key: Option<ClientKey>,
}

/// What authentication keeps on an open connection. Boxed, and only when there is something
/// to keep: connections without a policy pay one word for it.
struct AuthState {
    _subject_slot: Option<SubjectSlot>,
    /// When the client's credential expires, and how it is told.
    expiry: Option<Expiry>,
}

impl AuthState {
    fn of(subject_slot: Option<SubjectSlot>, expiry: Option<Expiry>) -> Option<Box<Self>> {
        (subject_slot.is_some() || expiry.is_some()).then(|| {
            Box::new(AuthState {
                _subject_slot: subject_slot,
                expiry,
            })
        })
    }
}

impl UpgradedConnection {
    /// Pumps the two streams until the connection ends, then accounts for how it ended.
    ///
    /// The future returned is the connection's task, most of what an idle WebSocket costs:
    /// the pump's alone, which owns what the connection keeps ([`Held`]); what is only needed
    /// to start is used here and not kept. Mind its size (about 1.5 KiB): tokio's task cell
    /// adds 96 bytes and rounds to 128, and mimalloc gives a cell of up to 1664 bytes a
    /// 1792-byte block, a larger one 2048 bytes or more.
    fn run(self, client: Socket) -> impl Future<Output = ()> + Send + 'static {
        let limiter = self.limiter();
        let access_log = self.active.log.access_log;
        let held = Held {
            metrics: self.metrics,
            _open: self._open,
            _slot: self._slot,
            auth: self.auth,
            state: self.state,
            active: self.active,
            target: KeptTarget::of(self.target, access_log),
            request_id: self.request_id,
            trace_id: self.trace_id,
        };
        let ends = Ends {
            client,
            upstream: self.upstream,
            upstream_preread: &self.preread,
            deflate: self.deflate,
        };
        pump(ends, self.stop, held, limiter).map(|(outcome, held)| held.account(&outcome))
    }

    /// The connection's rate limits, when its settings have any: its own buckets, and its
    /// client's share of the per-client ones of the configuration in force.
    fn limiter(&self) -> Option<Box<ConnectionLimiter>> {
        let agent_settings = self.target.agent.as_ref().map(|a| &a.agent.websocket);
        let settings = agent_settings.map_or(&self.active.websocket, |s| s);
        let limits = settings.rate_limits.as_ref()?;
        let buckets = self.active.client_limits.buckets(agent_settings);
        let share = buckets.cloned().zip(self.client_key.clone());
        let websocket_metrics = &self.state.metrics.websocket;
        let counters = RateLimitCounters::new(websocket_metrics, agent_label(&self.target), limits);
        Some(ConnectionLimiter::new(limits, share, counters))
    }
}

/// What an agent WebSocket keeps while open: its guards, what its pump runs under, and what
/// its end is accounted with.
struct Held {
    metrics: ConnectionMetrics,
    _open: ConnectionGuard,
    _slot: WebSocketSlot,
    auth: Option<Box<AuthState>>,
    state: Arc<GatewayState>,
    active: Arc<ActiveConfig>,
    target: KeptTarget,
    request_id: String,
    trace_id: Option<String>,
}

impl PumpOwner for Held {
    /// The agent's settings; the fallback upstream has the global ones.
    fn settings(&self) -> &PumpSettings {
        let agent_settings = self.target.agent.as_ref().map(|a| &a.websocket);
        agent_settings.map_or(&self.active.websocket, |s| s)
    }

    fn expiry(&self) -> Option<&Expiry> {
        self.auth.as_ref().and_then(|a| a.expiry.as_ref())
    }

    fn metrics(&self) -> &ConnectionMetrics {
        &self.metrics
    }
}

impl Held {
    /// Counts and logs how the connection ended; its guards go with it.
    fn account(self, outcome: &ConnectionOutcome) {
        let target = self.target.into_target();
        let metrics = &self.state.metrics;
        if outcome.initiator == Initiator::Upstream && outcome.code == 1006 {
            let kind = match outcome.drop_kind {
                Some(DropKind::Timeout) => "timeout",
                Some(DropKind::Tls) => "tls",
                _ => "dropped",
            };
            metrics.upstream_error(&target.upstream.name, kind);
        }
        if let Cause::Migrated(why) = outcome.cause {
            metrics.fleet.migrated(&target.upstream.name, why);
        }
        metrics
            .websocket
            .connection_closed(agent_label(&target), outcome);
        if self.active.log.access_log {
            let ids = (self.request_id.as_str(), self.trace_id.as_deref());
            log_outcome(self.active.log.json, &target, ids, outcome);
        }
    }
}

/// The target as an open connection keeps it: what its settings, metrics and connection line
/// need (the instance only with the access log). The request's other strings are freed now.
struct KeptTarget {
    upstream: Arc<Upstream>,
    agent: Option<Arc<Agent>>,
    instance: String,
}

impl KeptTarget {
    fn of(target: Target, access_log: bool) -> Self {
        let (agent, instance) = match target.agent {
            Some(a) if access_log => (Some(a.agent), a.instance),
            Some(a) => (Some(a.agent), String::new()),
            None => (None, String::new()),
        };
        KeptTarget {
            upstream: target.upstream,
            agent,
            instance,
        }
    }

    /// A [`Target`] again, for [`agent_label`] and the connection line; its other strings
    /// stay empty (nothing is allocated).
    fn into_target(self) -> Target {
        Target {
            upstream: self.upstream,
            upstream_path: String::new(),
            agent: self.agent.map(|agent| AgentTarget {
                route: String::new(),
                agent,
                instance: self.instance,
            }),
            cors: None,
        }
    }
}

/// For an admitted upgrade, the client's place in the per-address and total WebSocket
/// limits, or the refusal that replaces it (429/503, counted as a handshake).
pub(crate) fn hold_websocket_slot(
    state: &GatewayState,
    active: &ActiveConfig,
    admission: Admission,
    client: &ClientInfo,
) -> (Admission, Option<WebSocketSlot>) {
    let Admission::Upgrade(admitted) = &admission else {
        return (admission, None);
    };
    match state.limits.admit_websocket(&active.limits, client.ip) {
        Ok(slot) => (admission, Some(slot)),
        Err(limit) => {
            let refused = Refused {
                problem: Problem::limit(limit),
                reason: RefusalReason::WebSocketLimit(limit),
                route: admitted.route.clone(),
                agent: agent_label(&admitted.target).to_owned(),
                upstream: Some(admitted.target.upstream.name.clone()),
                websocket: true,
            };
            (Admission::Refuse(refused), None)
        }
    }
}

/// The verified client's place in its policy's per-subject limits, if it has any.
fn subject_slot(
    state: &GatewayState,
    target: &Target,
    client: &ClientInfo,
) -> std::result::Result<Option<SubjectSlot>, LimitRefusal> {
    let policy = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref());
    let (Some(policy), Some(verified)) = (policy, &client.identity) else {
        return Ok(None);
    };
    let limits = SubjectLimits {
        upgrades_per_second: policy.upgrades_per_subject_per_second,
        open_websockets: policy.max_websockets_per_subject,
    };
    if limits == SubjectLimits::default() {
        return Ok(None);
    }
    let key = subject_key(&policy.name, &verified.identity.subject);
    state.limits.admit_subject(limits, key).map(Some)
}

/// Who the client is for its rate limits across connections: its verified subject, else its
/// address.
fn client_key(target: &Target, client: &ClientInfo) -> Option<ClientKey> {
    let policy = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref());
    match (policy, &client.identity) {
        (Some(policy), Some(verified)) => Some(ClientKey::Subject(subject_key(
            &policy.name,
            &verified.identity.subject,
        ))),
        _ => client.ip.map(ClientKey::Address),
    }
}

/// Subjects of two policies are different people, whatever their names.
fn subject_key(policy: &str, subject: &str) -> String {
    format!("{policy}\0{subject}")
}

/// When the verified client's credential expires, as the pump's clock reads it.
fn expiry(target: &Target, client: &ClientInfo) -> Option<Expiry> {
    let policy = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref())?;
    let expires_at = client.identity.as_ref()?.identity.expires_at?;
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Some(Expiry {
        at: Instant::now() + left,
        code: policy.expiry_close_code,
        reason: policy.expiry_close_reason.clone(),
    })
}

/// A client that sent its credential as a `Sec-WebSocket-Protocol` entry must get a protocol
/// back (browsers fail the handshake otherwise), but never that entry: when the upstream
/// selected none, the answer names the first other protocol the client offered.
fn answer_offered_protocol(
    client_request: &RequestHeader,
    response: &mut ResponseHeader,
    target: &Target,
) -> Result<()> {
    let Some(policy) = target.agent.as_ref().and_then(|a| a.agent.auth.as_ref()) else {
        return Ok(());
    };
    let protocol = http::header::SEC_WEBSOCKET_PROTOCOL;
    let offered_credential = offers_protocol_credential(&policy.credentials, client_request);
    if !offered_credential || response.headers.contains_key(&protocol) {
        return Ok(());
    }
    if let Some(first) = offered_protocols(&policy.credentials, client_request).first() {
        response.insert_header(protocol, first.as_str())?;
    }
    Ok(())
}

/// One connection line per WebSocket at close. The instance is hashed: its name can be a
/// user's identifier.
/// `ids` are the request's ID and trace ID.
fn log_outcome(
    json: bool,
    target: &Target,
    ids: (&str, Option<&str>),
    outcome: &ConnectionOutcome,
) {
    let instance = target.agent.as_ref().map_or("", |a| a.instance.as_str());
    crate::telemetry::logging::record(
        json,
        "websocket",
        &[
            ("agent", json!(agent_label(target))),
            (
                "instance_hash",
                json!(format!(
                    "{:016x}",
                    crate::fleet::placement::stable_hash(instance.as_bytes())
                )),
            ),
            ("upstream", json!(target.upstream.name)),
            ("initiator", json!(outcome.initiator.label())),
            ("code", json!(outcome.code)),
            ("reason_len", json!(outcome.reason_len)),
            ("answered", json!(outcome.answered)),
            ("drop", json!(outcome.drop_kind.map(|k| k.label()))),
            ("cause", json!(outcome.cause.label())),
            (
                "protocol_error",
                json!(outcome.protocol_error.map(|e| e.kind())),
            ),
            ("duration_ms", json!(outcome.duration.as_millis() as u64)),
            ("throttled_ms", json!(outcome.throttled.as_millis() as u64)),
            ("bytes_in", json!(outcome.client_to_upstream.bytes)),
            ("bytes_out", json!(outcome.upstream_to_client.bytes)),
            ("frames_in", json!(outcome.client_to_upstream.frames)),
            ("frames_out", json!(outcome.upstream_to_client.frames)),
            ("request_id", json!(ids.0)),
            ("trace_id", json!(ids.1)),
        ],
    );
}
