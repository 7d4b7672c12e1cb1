//! The control plane: the Raft-replicated cluster store, its encryption at
//! rest, the PKI, node-to-node RPC over mutual TLS, and node management.
//!
//! - [`state`]: the replicated cluster state and the commands that change it (pure).
//! - [`rules`]: naming, quorum and address checks the API makes before proposing (pure).
//! - [`dispatcher`]: node liveness from heartbeats (pure).
//! - [`scheduler`]: task placement and reconciliation (pure).
//! - [`overlay`]: overlay networks and their allocator: subnets, VNIs, task addresses (pure).
//! - [`service`]: service specs, their flag parsers, the task life cycle (pure).
//! - [`orchestrator`], [`updater`]: restarts, rolling updates and the scheduler's input (pure).
//! - [`visualizer`]: what the swarm visualizer page draws, from the store (pure).
//! - [`seal`], [`keystore`]: data key / key-encryption key / unlock key; the key files;
//!   [`secret_text`]: key material as text, zeroized and never printed;
//!   [`wire_bytes`]: byte strings as base64 in JSON, binary in msgpack.
//! - [`store`]: the Raft log and state machine on redb, every value sealed.
//! - [`pki`], [`token`], [`tls`]: root CA, node certificates, join tokens, rustls configs;
//!   [`cert_records`]: which issued certificates the store still honours (pure).
//! - [`rpc`]: framed request/response over mutual TLS; [`network`]: peers and Raft's network.
//! - [`manager`]: Raft and the leader's duties (the node's side, which owns both a
//!   manager and the runtime, is `crate::node`).
//! - [`api`], [`local`]: the messages, and the local socket `meshctl` talks to;
//!   [`encoded`]: message parts many nodes get alike, encoded once;
//!   [`parts`]: those parts held back from a node that has them (pure);
//!   [`propagation`]: which nodes have learnt a starting task's endpoint (pure).

pub mod discovery;
pub mod dispatcher;
pub mod ipsec;
pub mod keystore;
pub mod local;
pub mod manager;
pub mod mesh;
pub mod network;
pub mod orchestrator;
pub mod overlay;
pub mod pki;
pub mod propagation;
pub mod rpc;
pub mod rules;
pub mod scheduler;
pub mod seal;
pub mod state;
pub mod store;
pub mod tls;
pub mod token;
pub mod tunnel;
pub mod updater;
pub mod visualizer;
