//! The admin listener: metrics, health, readiness, drain, reload and the resolved routing
//! table. Bound to loopback by default and never served on the public listener.

use crate::config::GatewayConfig;
use crate::runtime::state::{secret_presence, GatewayState};
use crate::upstream::UpstreamKind;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::Arc;

const ENDPOINTS: &str = "GET /metrics, /healthz, /readyz, /config; POST /drain, /reload";

pub struct Admin {
    state: Arc<GatewayState>,
}

impl Admin {
    pub fn new(state: Arc<GatewayState>) -> Self {
        Admin { state }
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                let body = self.state.metrics.render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            // The pid tells which process answers, across a binary upgrade.
            (Method::GET, "/healthz") => json_response(
                StatusCode::OK,
                json!({"status": "alive", "pid": std::process::id()}),
            ),
            (Method::GET, "/readyz") => match self.state.not_ready_reason() {
                Some(mut why) => {
                    why["ready"] = json!(false);
                    json_response(StatusCode::SERVICE_UNAVAILABLE, why)
                }
                None => json_response(StatusCode::OK, json!({"ready": true})),
            },
            (Method::GET, "/config") => json_response(StatusCode::OK, describe(&self.state)),
            (Method::POST, "/drain") => {
                self.state.start_drain();
                json_response(StatusCode::ACCEPTED, json!({"draining": true}))
            }
            (Method::POST, "/reload") => match self.state.reload("POST /reload") {
                Ok(outcome) => json_response(StatusCode::OK, outcome),
                Err(e) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"error": "config_invalid", "detail": e.to_string(), "reloaded": false}),
                ),
            },
            (_, "/metrics" | "/healthz" | "/readyz" | "/config" | "/drain" | "/reload") => {
                json_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    json!({"error": "method_not_allowed", "detail": ENDPOINTS}),
                )
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "detail": ENDPOINTS}),
            ),
        }
    }
}

/// The resolved routing table, secrets by name and presence only.
fn describe(state: &GatewayState) -> Value {
    let config: Arc<GatewayConfig> = state.config();
    let routes: Vec<Value> = config
        .routes
        .iter()
        .map(|route| {
            let mut agents: Vec<Value> = route
                .agents
                .values()
                .map(|a| {
                    json!({
                        "name": a.name,
                        "slug": a.slug,
                        "upstream": a.upstream.name,
                        "upstream_path": format!("{}/{}/{{instance}}", route.upstream_prefix, a.slug),
                        "required_secrets": a.required_secrets,
                    })
                })
                .collect();
            agents.sort_by_key(|a| a["name"].as_str().unwrap_or_default().to_owned());
            json!({
                "name": route.name,
                "prefix": route.prefix,
                "default_instance": route.default_instance,
                "cors": route.cors.is_some(),
                "agents": agents,
            })
        })
        .collect();
    let upstreams: Vec<Value> = config
        .upstreams
        .values()
        .map(|u| match &u.kind {
            UpstreamKind::Worker { address, host, tls, .. } => {
                json!({"name": u.name, "kind": "worker", "address": address, "host": host, "tls": tls})
            }
            UpstreamKind::Local { nodes } => json!({
                "name": u.name, "kind": "local",
                "nodes": nodes.iter().map(|n| n.address.as_str()).collect::<Vec<_>>(),
            }),
        })
        .collect();
    let secrets: Vec<Value> = secret_presence(&config, &state.reports)
        .into_iter()
        .map(|(secret, upstream, present)| json!({"secret": secret, "upstream": upstream, "present": present}))
        .collect();
    json!({
        "listen": config.listen,
        "routes": routes,
        "upstreams": upstreams,
        "fallback_upstream": config.fallback_upstream.as_ref().map(|u| u.name.as_str()),
        "secrets": secrets,
        "draining": state.draining(),
        "open_websockets": state.connections.count(),
    })
}
