//! The admin listener: metrics, health, readiness, drain, reload, the resolved routing
//! table and the fleets of the `local` upstreams. Bound to loopback by default and never served on the public listener.

use crate::routing::table::RoutingTable;
use crate::runtime::state::GatewayState;
use crate::secrets::presence::presence;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::Arc;

const ENDPOINTS: &str = "GET /metrics, /healthz, /readyz, /config, /fleet; POST /drain, /reload";

pub(crate) struct Admin {
    state: Arc<GatewayState>,
}

impl Admin {
    pub(crate) fn new(state: Arc<GatewayState>) -> Self {
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
                // The fleet gauges are read off the live connections at scrape time.
                self.state.fleets.refresh_gauges();
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
            (Method::GET, "/fleet") => json_response(StatusCode::OK, self.state.fleets.describe()),
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
            (
                _,
                "/metrics" | "/healthz" | "/readyz" | "/config" | "/fleet" | "/drain" | "/reload",
            ) => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed", "detail": ENDPOINTS}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "detail": ENDPOINTS}),
            ),
        }
    }
}

/// The resolved routing table, secrets by name and presence only.
fn describe(state: &GatewayState) -> Value {
    let active = state.config();
    let mut fields = RoutingTable::of(&active, &active.secrets).to_json();
    let secrets: Vec<Value> = presence(&active, &active.secrets, &state.reports)
        .into_iter()
        .map(|p| json!({"secret": p.secret, "upstream": p.upstream, "present": p.present}))
        .collect();
    fields.insert("secrets".to_owned(), Value::Array(secrets));
    fields.insert("draining".to_owned(), json!(state.drain.draining()));
    fields.insert(
        "open_websockets".to_owned(),
        json!(state.connections.count()),
    );
    Value::Object(fields)
}
