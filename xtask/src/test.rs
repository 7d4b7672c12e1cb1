//! `cargo xtask test`: setup, then every lane in order:
//!
//! 1. lint: `cargo fmt --check` (the fuzz targets too), clippy with warnings denied,
//!    the agent's layering (`layers.rs`);
//! 2. unit: `cargo test` without root or kernel (everything but the
//!    integration tests of mesh-tests);
//! 3. fuzz: every fuzz target for a few seconds (see `fuzz.rs`);
//! 4. kernel: mesh-tests' integration tests, as root, on the host kernel;
//! 5. vm: the `#[ignore]`d `vm_*` tests inside Debian's kernel under virtme-ng.
//!
//! Then it checks that no test namespace was left behind.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{ebpf, fuzz, setup, vm, workspace};

/// How long the fuzz lane runs each target: enough to replay the seeds and
/// what earlier runs found, and to try a few thousand new inputs.
const FUZZ_LANE_SECONDS: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lane {
    Lint,
    Unit,
    Fuzz,
    Kernel,
    Vm,
}

#[derive(clap::Args)]
pub struct Args {
    /// Run only these lanes (repeatable); default: all, in order.
    #[arg(long = "lane", value_enum)]
    lanes: Vec<Lane>,
}

pub fn run(args: &Args) -> Result<()> {
    let lanes = if args.lanes.is_empty() {
        vec![Lane::Lint, Lane::Unit, Lane::Fuzz, Lane::Kernel, Lane::Vm]
    } else {
        args.lanes.clone()
    };
    if lanes.iter().any(|l| matches!(l, Lane::Kernel | Lane::Vm)) {
        setup::require_root("the kernel and VM lanes (network namespaces, eBPF, a VM)")?;
    }
    setup::run()?;
    warn_if_disk_is_short();
    ebpf::build()?;
    for lane in &lanes {
        eprintln!("\n==== lane: {lane:?} ({})", free_disk_text());
        match lane {
            Lane::Lint => lint()?,
            Lane::Unit => unit()?,
            Lane::Fuzz => fuzz::lane(FUZZ_LANE_SECONDS)?,
            Lane::Kernel => kernel()?,
            Lane::Vm => vm_lane()?,
        }
    }
    no_namespaces_left()?;
    eprintln!("\nall lanes passed: {lanes:?}");
    Ok(())
}

/// Room a clean run of every lane needs: a fresh clone came to 4.1 GiB
/// after all of them (with line tables only; see the profiles in
/// Cargo.toml), and the toolchain and crates go elsewhere.
const DISK_NEEDED_GIB: f64 = 6.0;

/// Free space on the build directory's filesystem, in GiB.
fn free_disk_gib() -> Option<f64> {
    let path = std::ffi::CString::new(workspace::root().as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we pass it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as f64 * stat.f_frsize as f64 / (1u64 << 30) as f64)
}

fn free_disk_text() -> String {
    free_disk_gib().map_or_else(|| "free disk unknown".into(), |gib| format!("{gib:.1} GiB free disk"))
}

/// A linker that runs out of disk dies with SIGBUS ("ld terminated with
/// signal 7"), which does not say why; say it up front.
fn warn_if_disk_is_short() {
    if let Some(free) = free_disk_gib().filter(|&free| free < DISK_NEEDED_GIB) {
        eprintln!(
            "warning: {free:.1} GiB free on the build disk; a clean run of every lane needs about \
             {DISK_NEEDED_GIB:.0} GiB. A link may fail with a Bus error: free space (`cargo clean`) first."
        );
    }
}

fn lint() -> Result<()> {
    workspace::cargo(&["fmt", "--all", "--", "--check"]).context("code is not formatted: run `cargo fmt --all`")?;
    // fuzz/ is a workspace of its own, which `--all` does not reach.
    workspace::cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])
        .context("the fuzz targets are not formatted: run `cargo fmt --manifest-path fuzz/Cargo.toml`")?;
    workspace::cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    crate::layers::check_all(&workspace::root())
}

fn unit() -> Result<()> {
    workspace::cargo(&["test", "--workspace", "--exclude", "mesh-tests"])?;
    workspace::cargo(&["test", "-p", "mesh-tests", "--lib", "--bins"])
}

fn kernel() -> Result<()> {
    // The swarm scenarios run the real mesh-agent and meshctl binaries.
    workspace::cargo(&["build", "-p", "meshctl", "-p", "mesh-agent-bin", "--bins"])?;
    workspace::cargo(&["test", "-p", "mesh-tests", "--test", "*"])
}

fn vm_lane() -> Result<()> {
    let binaries = vm_test_binaries()?;
    if binaries.is_empty() {
        bail!("no vm_* test found under tests/tests: the VM lane would run nothing");
    }
    vm::run_tests(&binaries)
}

/// Builds every `tests/tests/vm_*.rs` and returns the test executables.
fn vm_test_binaries() -> Result<Vec<PathBuf>> {
    // MESH_VM_ONLY=vm_a,vm_b: just these (while working on them).
    let only = std::env::var("MESH_VM_ONLY").ok();
    let mut names: Vec<String> = fs::read_dir(workspace::root().join("tests/tests"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("vm_") && n.ends_with(".rs"))
        .map(|n| n.trim_end_matches(".rs").to_owned())
        .filter(|n| only.as_ref().is_none_or(|o| o.split(',').any(|w| w == n)))
        .collect();
    names.sort();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["test", "-p", "mesh-tests", "--no-run", "--message-format=json"])
        .current_dir(workspace::root());
    for name in &names {
        cmd.args(["--test", name]);
    }
    eprintln!("+ {}", workspace::display(&cmd));
    let output = cmd.output().context("cannot run cargo to build the VM tests")?;
    if !output.status.success() {
        bail!(
            "building the VM tests failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(executable_of)
        .filter(|path| names.iter().any(|n| is_test_binary_of(path, n)))
        .collect())
}

/// The `"executable":"..."` field of a cargo JSON message, if not null.
fn executable_of(line: &str) -> Option<PathBuf> {
    let rest = line.split("\"executable\":\"").nth(1)?;
    Some(PathBuf::from(rest.split('"').next()?))
}

/// Whether `path` is the test executable cargo builds for test target `name`
/// (`target/debug/deps/NAME-HASH`).
fn is_test_binary_of(path: &std::path::Path, name: &str) -> bool {
    path.file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.rsplit_once('-'))
        .is_some_and(|(stem, _)| stem == name)
}

/// `ip netns list` must hold no test namespace once the lanes are done
/// (`meshtest-` is mesh-tests' `cluster::PREFIX`; xtask does not link mesh-tests).
fn no_namespaces_left() -> Result<()> {
    let left: Vec<String> = match fs::read_dir("/run/netns") {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("meshtest-"))
            .collect(),
        Err(_) => Vec::new(),
    };
    if !left.is_empty() {
        bail!("tests left network namespaces behind: {}", left.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_in_a_cargo_message() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"vm_x"},"executable":"/t/debug/deps/vm_x-0a1b","fresh":true}"#;
        assert_eq!(executable_of(line), Some(PathBuf::from("/t/debug/deps/vm_x-0a1b")));
        assert_eq!(
            executable_of(r#"{"reason":"compiler-artifact","executable":null}"#),
            None
        );
    }

    #[test]
    fn matches_test_binaries_by_target_name() {
        assert!(is_test_binary_of(
            std::path::Path::new("/t/deps/vm_kernel_features-0a1b"),
            "vm_kernel_features"
        ));
        assert!(!is_test_binary_of(
            std::path::Path::new("/t/deps/vm_kernel-0a1b"),
            "vm_kernel_features"
        ));
    }
}
