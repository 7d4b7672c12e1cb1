//! Types shared between the eBPF programs (`mesh-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` plain data so both sides agree on the
//! byte layout of map keys and values. The `user` feature adds the
//! `aya::Pod` impls the agent needs to read and write maps. [`packet`] is
//! the programs' bounds-checked header parsing, here so the host can fuzz
//! the very code the kernel runs.
#![no_std]

pub mod counters;
pub mod lb;
pub mod packet;
