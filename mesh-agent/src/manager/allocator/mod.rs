//! What the leader allocates and derives for the swarm's networks (pure):
//! overlay subnets, gateways, VNIs and task addresses ([`network`]), each
//! node's WireGuard tunnel ([`tunnel`]) and IPsec associations ([`ipsec`]).

pub(crate) mod ipsec;
pub mod network;
pub(crate) mod tunnel;
