//! agent-gateway: an edge reverse proxy for AI agents behind `/agents/{agent}/{instance}`
//! WebSocket URLs, on Cloudflare's Pingora.
//!
//! The folders follow the request: [`edge`] decides about the client (address, limits,
//! CORS, TLS), [`routing`] maps the path to an agent and its [`upstream`], [`secrets`] says
//! whether the agent can be served, [`proxy`] makes each request's decisions once
//! ([`proxy::exchange`]) for the two paths that carry requests, [`http1`] on pingora-core's
//! lower layers and `pingora-proxy` for HTTP/2, and [`websocket`] carries an upgraded
//! connection. [`config`] is read once per
//! load, [`runtime`] wires the server, and [`telemetry`] reports.

pub mod auth;
pub mod config;
pub mod edge;
pub mod fleet;
pub mod http1;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod secrets;
pub mod telemetry;
pub mod upstream;
pub mod websocket;
