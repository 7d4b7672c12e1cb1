//! What the leader assigns to a node besides its tasks: its routing mesh,
//! service discovery, tunnel and IPsec.

pub mod discovery;
pub mod ipsec;
pub mod mesh;
pub mod tunnel;
