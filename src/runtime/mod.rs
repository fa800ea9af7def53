//! The running process: server wiring, shared state, signals and the admin listener.

pub mod admin;
pub mod drain;
pub mod fleet_checks;
pub mod jwks_refresh;
pub mod probes;
pub mod reload;
pub mod server;
pub mod signals;
pub mod state;
