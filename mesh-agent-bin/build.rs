//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the
//! `mesh-agent` binary.
//!
//! The agent is useless without its eBPF programs, so a missing or stale
//! object fails the build with a message naming the command that fixes it,
//! instead of silently producing an agent that cannot load its dataplane.
//! Only this small package embeds it: the library (mesh-agent) builds,
//! checks and tests without the BPF toolchain, and an eBPF change
//! rebuilds this binary alone.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// Where `cargo xtask build-ebpf` leaves the object (relative to the workspace).
const OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/mesh-ebpf";

/// Sources whose change makes the object stale (relative to the workspace).
const SOURCES: &[&str] = &["mesh-ebpf/src", "mesh-ebpf/Cargo.toml", "mesh-common/src"];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("reason: cargo sets it"));
    let workspace = manifest
        .parent()
        .expect("reason: mesh-agent-bin sits in the workspace root")
        .to_path_buf();
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = std::env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join(OBJECT));
    println!("cargo:rerun-if-changed={}", object.display());
    for source in SOURCES {
        println!("cargo:rerun-if-changed={}", workspace.join(source).display());
    }

    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    let built = match fs::metadata(&object).and_then(|m| m.modified()) {
        Ok(t) => t,
        // clippy reads the code and builds nothing to run: an empty stand-in
        // lets it lint this package without the BPF toolchain.
        Err(_) if linting() => return stand_in(),
        Err(_) => fail(&format!("the eBPF object {} is missing.", object.display())),
    };
    if let Some((newest, path)) = SOURCES
        .iter()
        .filter_map(|s| newest_in(&workspace.join(s)))
        .max_by_key(|(t, _)| *t)
    {
        if newest > built {
            fail(&format!(
                "the eBPF object {} is older than {}.",
                object.display(),
                path.display()
            ));
        }
    }
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}

/// Whether clippy drives this build.
fn linting() -> bool {
    std::env::var("RUSTC_WORKSPACE_WRAPPER").is_ok_and(|w| w.contains("clippy"))
}

/// An empty object for clippy, with a warning that says so.
fn stand_in() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("reason: cargo sets it"));
    let empty = out.join("mesh-ebpf.empty");
    fs::write(&empty, []).expect("reason: OUT_DIR is writable");
    println!(
        "cargo:warning=no eBPF object: linted with an empty stand-in (`cargo xtask build-ebpf` builds the real one)"
    );
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", empty.display());
}

fn fail(what: &str) -> ! {
    eprintln!(
        "\nerror: {what}\n\
         mesh-agent embeds its eBPF programs and will not build without an up-to-date object.\n\
         Run `cargo xtask build-ebpf` (it needs `cargo xtask setup` once for the nightly's\n\
         rust-src and bpf-linker), then build again.\n"
    );
    std::process::exit(1);
}

/// The newest modification time under `path` (a file or a directory tree).
fn newest_in(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_in(&e.path()))
        .max_by_key(|(t, _)| *t)
}
