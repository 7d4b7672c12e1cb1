//! Raft under the manager: the log and state machine on redb, every value
//! sealed ([`store`]), and openraft's network over the peers' mutual-TLS
//! clients ([`network`]).

pub(crate) mod network;
pub(crate) mod store;
