//! mesh-api: what `meshctl` and the agent share, and nothing of the
//! agent's kernel, Raft store or runtime.
//!
//! - [`api`]: the swarm's plain data (objects, the store's shape and
//!   commands, messages, errors, assignments) and pure helpers.
//! - [`ca`]: keys and certificates: the root CA, node and operator
//!   certificates, join tokens, the sealed key files.
//! - [`wire`]: how nodes and `meshctl` talk: mutual-TLS RPC, the rustls
//!   configurations, the local socket.

pub mod api;
pub mod ca;
pub mod wire;
