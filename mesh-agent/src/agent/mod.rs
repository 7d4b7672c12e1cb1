//! What runs on a node: its tasks in their namespaces ([`tasks`]), their
//! networks ([`net`]: the local bridge, overlays, tunnels, IPsec, DNS) and
//! the routing mesh ([`mesh`]). The node's session with the managers that
//! drives all of it is `crate::node`.

pub mod mesh;
pub mod net;
pub mod tasks;
