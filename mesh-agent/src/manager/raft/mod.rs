//! Raft under the manager: the log and state machine on redb, every value
//! sealed ([`store`]), and openraft's network over the peers' mutual-TLS
//! clients ([`network`]).

pub mod network;
pub mod store;
