//! What the gateway decides about a client before routing: its address, the limits it is
//! held to, the CORS and Origin policy, the first-request deadline and TLS certificates.

pub mod client_address;
pub mod cors;
pub mod header_deadline;
pub mod limits;
pub mod request_id;
pub mod tls;
