//! The admin listener: metrics, health, readiness and drain. Bound to loopback by default and
//! never served on the public listener.

use crate::metrics::Metrics;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::watch;

pub struct Admin {
    metrics: Arc<Metrics>,
    /// Set once the gateway drains: every agent WebSocket gets Close 1001, new ones are refused.
    drain: watch::Sender<bool>,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>, drain: watch::Sender<bool>) -> Self {
        Admin { metrics, drain }
    }

    fn draining(&self) -> bool {
        *self.drain.borrow()
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
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
                let body = self.metrics.render();
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
            (Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "alive"})),
            (Method::GET, "/readyz") if self.draining() => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reason": "draining"}),
            ),
            (Method::GET, "/readyz") => json_response(StatusCode::OK, json!({"ready": true})),
            (Method::POST, "/drain") => {
                self.drain.send_replace(true);
                log::warn!("draining: agent WebSockets are being closed with 1001");
                json_response(StatusCode::ACCEPTED, json!({"draining": true}))
            }
            (_, "/metrics" | "/healthz" | "/readyz" | "/drain") => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed", "detail": "GET /metrics, /healthz, /readyz; POST /drain"}),
            ),
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "detail": "GET /metrics, /healthz, /readyz; POST /drain"}),
            ),
        }
    }
}
