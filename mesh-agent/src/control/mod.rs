//! The control plane: the Raft-replicated cluster store, its encryption at
//! rest, the PKI, node-to-node RPC over mutual TLS, and node management.
//!
//! - [`state`]: the replicated cluster state and the commands that change it (pure).
//! - [`seal`]: data key / key-encryption key / unlock key (encryption at rest).

pub mod api;
pub mod keystore;
pub mod local;
pub mod raft_types;
pub mod rules;
pub mod seal;
pub mod state;
