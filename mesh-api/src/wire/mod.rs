//! How nodes and `meshctl` talk: framed msgpack requests and responses
//! over mutual TLS between nodes ([`rpc`]), the rustls configurations
//! ([`tls`]), and the local Unix socket `meshctl` drives its agent through
//! ([`local`]).

pub mod local;
pub mod rpc;
pub mod tls;
