//! `cargo xtask setup`: installs, only when missing, what the project needs
//! on a fresh Debian machine: the nightly's rust-src and bpf-linker for the
//! eBPF build, cargo-fuzz for the fuzz targets, Debian packages for the
//! kernel and VM lanes and benchmarks, and virtme-ng from PyPI for the VM
//! lane.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace;

/// bpf-linker 0.10.x links with the nightly's own LLVM; newer ones want a
/// system LLVM that Debian here lacks.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// cargo-fuzz, run with the nightly (libFuzzer and the sanitizers need it);
/// this one builds here with the installed nightly and libfuzzer-sys 0.4.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages, each with why it is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip/tc/bridge to observe kernel state in tests"),
    ("g++", "the fuzz lane: libfuzzer-sys compiles libFuzzer (C++)"),
    ("nftables", "kernel lane: firewall interplay"),
    ("iputils-ping", "demo and tests: reachability between hosts"),
    ("tcpdump", "debugging captures inside test namespaces"),
    ("iperf3", "benchmarks: throughput"),
    ("wrk", "benchmarks: HTTP load"),
    ("prometheus", "kernel lane: promtool checks the agents' /metrics"),
    ("chromium", "kernel lane: the visualizer page rendered headless"),
    ("kmod", "VM lane: modprobe"),
    ("qemu-system-x86", "VM lane: the emulator virtme-ng drives"),
    ("busybox-static", "VM lane: virtme-ng builds its initramfs with it"),
    (
        "linux-image-amd64",
        "VM lane: Debian's kernel with IPVS, WireGuard, ESP modules",
    ),
];

/// PyPI packages: (distribution, command it provides).
const PIP_PACKAGES: &[(&str, &str)] = &[("virtme-ng", "vng")];

pub fn run() -> Result<()> {
    eprintln!("setup: checking toolchain and packages");
    let mut installed = Vec::new();
    nightly_rust_src(&mut installed)?;
    bpf_linker(&mut installed)?;
    cargo_fuzz(&mut installed)?;
    apt_packages(&mut installed)?;
    pip_packages(&mut installed)?;
    if installed.is_empty() {
        eprintln!("setup: everything is already installed");
    } else {
        eprintln!("setup: installed {}", installed.join(", "));
    }
    Ok(())
}

fn nightly_rust_src(installed: &mut Vec<String>) -> Result<()> {
    let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs with the nightly toolchain")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        workspace::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("cannot install the nightly toolchain (is crates.io/rustup reachable?)")?;
        installed.push("rust nightly".into());
    }
    let components =
        stdout(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        workspace::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
            .context("cannot add rust-src to the nightly toolchain")?;
        installed.push("nightly rust-src".into());
    }
    Ok(())
}

fn bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    let present = stdout(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if present.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let spec = format!("bpf-linker@{BPF_LINKER_VERSION}");
    workspace::run(Command::new("rustup").args(["run", "nightly", "cargo", "install", &spec, "--locked", "--force"]))
        .with_context(|| format!("cannot install {spec} (is crates.io reachable?)"))?;
    installed.push(spec);
    Ok(())
}

fn cargo_fuzz(installed: &mut Vec<String>) -> Result<()> {
    let present =
        stdout(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"])).unwrap_or_default();
    if present.split_whitespace().any(|word| word == CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    let spec = format!("cargo-fuzz@{CARGO_FUZZ_VERSION}");
    workspace::run(Command::new("rustup").args(["run", "nightly", "cargo", "install", &spec, "--locked", "--force"]))
        .with_context(|| format!("cannot install {spec} (is crates.io reachable?)"))?;
    installed.push(spec);
    Ok(())
}

fn apt_packages(installed: &mut Vec<String>) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !dpkg_installed(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (name, why) in APT_PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        eprintln!("setup: will install {name} ({why})");
    }
    require_root(&format!("installing Debian packages ({})", missing.join(" ")))?;
    workspace::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("`apt-get update` failed: are Debian's package mirrors reachable?")?;
    workspace::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("`apt-get install` failed")?;
    installed.extend(missing.iter().map(|s| s.to_string()));
    Ok(())
}

fn pip_packages(installed: &mut Vec<String>) -> Result<()> {
    for (dist, command) in PIP_PACKAGES {
        if python_command(command).is_some() {
            continue;
        }
        let pip = |extra: &[&str]| {
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "pip", "install", "--quiet"]).args(extra).arg(dist);
            eprintln!("+ {}", workspace::display(&cmd));
            cmd.output()
                .with_context(|| format!("cannot run pip to install {dist}"))
        };
        let mut out = pip(&[])?;
        // Debian's own python3 refuses pip installs (PEP 668) unless told;
        // virtme-ng has no Debian package, so tell it.
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("externally-managed") {
            out = pip(&["--break-system-packages"])?;
        }
        if !out.status.success() {
            bail!(
                "cannot install {dist} from PyPI (is PyPI reachable?):\n{}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if python_command(command).is_none() {
            bail!("{dist} installed but `{command}` is found neither on PATH nor in Python's scripts directory");
        }
        installed.push((*dist).into());
    }
    Ok(())
}

/// A command installed by pip: on PATH, or in the scripts directory of the
/// `python3` on PATH (pyenv and --user installs are not always on PATH).
pub fn python_command(command: &str) -> Option<std::path::PathBuf> {
    which(command).or_else(|| {
        let scripts =
            stdout(Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]))
                .ok()?;
        let path = std::path::Path::new(scripts.trim()).join(command);
        path.is_file().then_some(path)
    })
}

fn dpkg_installed(package: &str) -> bool {
    stdout(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.contains("install ok installed"))
}

/// The full path of `command` on PATH, if any.
pub fn which(command: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(command))
        .find(|path| path.is_file())
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: run `sudo -E cargo xtask ...` (or as root)");
    }
    Ok(())
}

/// A command's stdout, or an error if it could not run or failed.
fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", workspace::display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            workspace::display(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
