//! `cargo xtask build-ebpf`: builds mesh-ebpf for bpfel-unknown-none with the
//! nightly toolchain, into target/ebpf, where mesh-agent's build.rs picks
//! the object up.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::workspace::{self, root};

/// The eBPF target triple.
pub const TARGET: &str = "bpfel-unknown-none";

/// Builds the eBPF object and returns its path.
pub fn build() -> Result<PathBuf> {
    let target_dir = root().join("target/ebpf");
    // Same flags as aya-build: BTF for the loader, the CPU architecture for
    // aya-ebpf's register helpers.
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "mesh-ebpf",
        "--release",
    ])
    .args(["--target", TARGET, "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(root().join("mesh-ebpf"))
    // The outer (stable) cargo's settings must not leak into the nightly build.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO")
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("RUSTFLAGS")
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    workspace::run(&mut cmd).context(
        "building the eBPF programs failed; if the nightly's rust-src or bpf-linker is missing, run `cargo xtask setup`",
    )?;
    let object = target_dir.join(TARGET).join("release/mesh-ebpf");
    eprintln!("eBPF object: {}", object.display());
    Ok(object)
}
