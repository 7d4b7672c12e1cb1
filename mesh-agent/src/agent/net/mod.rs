//! A node's networks for its tasks.
//!
//! - [`netns`]: named network namespaces (bind mounts).
//! - [`bridge`]: the node-local bridge network tasks attach to.
//! - [`overlay`]: this node's overlay networks (VXLAN) and its tasks' ports on them.
//! - [`tunnel`]: the WireGuard tunnel encrypted overlays travel in; [`ipsec`]: ESP for IPsec overlays.
//! - [`dns`]: the embedded DNS server tasks resolve service names with.
//! - [`error`]: what fails when the node programs them.

pub mod bridge;
pub mod dns;
pub(crate) mod error;
pub(crate) mod ipsec;
pub mod netns;
pub mod overlay;
pub(crate) mod tunnel;
