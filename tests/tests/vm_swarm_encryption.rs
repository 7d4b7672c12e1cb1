//! VM lane: encrypted overlays with the kernel's WireGuard (Debian's
//! kernel has it; the host's does not). The scenario is the kernel lane's
//! (`swarm_encryption.rs`), with every agent told to use the kernel's
//! WireGuard only, so a fallback to userspace cannot pass for it.

#[path = "swarm_encryption.rs"]
mod scenario;

#[test]
#[ignore = "VM lane: needs a kernel with WireGuard (cargo xtask test runs it under virtme-ng)"]
fn encrypted_overlays_in_kernel_wireguard() {
    mesh_tests::require_root();
    // Slower Raft timing: the VM emulates its CPUs in software.
    scenario::encrypted_overlays_hide_the_payload_and_survive_key_rotation(&[
        "--raft-heartbeat",
        "250ms",
        "--raft-election-timeout",
        "1500ms",
        "--wireguard",
        "kernel",
    ]);
}
