//! agent-gateway: an edge reverse proxy for AI agents behind `/agents/{agent}/{instance}`
//! WebSocket URLs, on Cloudflare's Pingora.

pub mod admin;
pub mod agent_name;
pub mod agent_path;
pub mod backend;
pub mod client_address;
pub mod config;
pub mod cors;
pub mod forwarding;
pub mod header_deadline;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod probe;
pub mod problem;
pub mod proxy;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod websocket;
