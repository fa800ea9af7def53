//! From a request path to the agent, instance and upstream it names.

pub mod agent_name;
pub mod agent_path;
pub mod resolve;
pub mod table;
