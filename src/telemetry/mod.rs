//! What the gateway reports: Prometheus metrics and log lines.

pub mod logging;
pub mod metrics;
