//! The running process: server wiring, shared state, signals and the admin listener.

pub mod admin;
pub mod server;
pub mod signals;
pub mod state;
