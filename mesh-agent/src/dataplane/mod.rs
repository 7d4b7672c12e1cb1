//! The node's dataplane: desired state turned into kernel objects.
//!
//! One module per kernel mechanism; nothing here shells out to `ip`/`tc`.

pub mod ebpf;
pub mod genl;
pub mod ipvs;
pub mod lb;
pub(crate) mod maglev;
pub mod netlink;
pub mod nftables;
pub(crate) mod nlmsg;
pub mod vxlan;
pub(crate) mod wgtun;
pub mod wireguard;
pub mod xfrm;
