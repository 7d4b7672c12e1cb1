//! The routing mesh on a node: the tables it programs, built from the
//! assignment (pure, [`tables`]); programming them into the eBPF maps
//! ([`kernel`]) or IPVS ([`ipvs`]); and the pinned BPF file system ([`bpffs`]).

pub mod bpffs;
pub mod ipvs;
pub mod kernel;
pub(crate) mod tables;
