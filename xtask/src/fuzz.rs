//! `cargo xtask fuzz [TARGET] [--seconds N]`: builds the libFuzzer targets
//! of `fuzz/` (cargo-fuzz layout, a workspace of its own) and runs each, or
//! one, for N seconds; the test suite's `fuzz` lane runs every target for a
//! few seconds the same way.
//!
//! Each target starts from its committed seeds (`fuzz/corpus/<target>`,
//! made by mesh-agent's `fuzz_seeds` test) plus what earlier runs on this
//! machine found (`fuzz/target/corpus/<target>`, where new inputs go, so
//! the source tree stays as committed). A crash leaves its input in
//! `fuzz/artifacts/<target>/`; `cargo fuzz run --dev TARGET PATH` in
//! `fuzz/` replays it.
//!
//! The build: `cargo fuzz build --dev`, i.e. AddressSanitizer and coverage
//! instrumentation with debug assertions, without optimisation. Measured
//! here from a clean `fuzz/target`: cargo-fuzz's default release build (one
//! codegen unit per crate) is the slowest, and even with 16 codegen units it
//! took 13 CPU-minutes for mesh-agent's dependency tree, over 6 minutes on
//! two idle cores before a single input ran. `--dev` takes about 4
//! CPU-minutes (2½ minutes of wall time), the whole lane about 4½ minutes.
//! Unoptimised, the targets still run from about a hundred inputs a second
//! (config_file, most of it clap) to ten thousand (token), enough for a
//! lane of seconds per target. AddressSanitizer stays on (`-s none` was not
//! needed to fit the budget): it is what checks that the packet parser
//! shared with the eBPF programs never reads outside its window.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{setup, workspace};

/// Where the targets are built (cargo-fuzz's `--dev` profile, host triple).
const BUILD_DIR: &str = "fuzz/target/x86_64-unknown-linux-gnu/debug";
/// One input may take this long before libFuzzer calls it a hang.
const INPUT_TIMEOUT_S: u64 = 10;

#[derive(clap::Args)]
pub struct Args {
    /// Only this target (default: every one in fuzz/fuzz_targets).
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

/// How a target's run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ran its time without a failure: this many inputs.
    Clean { executions: u64 },
    /// Failed: the input that did it, if libFuzzer wrote one.
    Crashed { artifact: Option<PathBuf> },
}

pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    let mut targets = targets()?;
    if let Some(only) = &args.target {
        if !targets.contains(only) {
            bail!("no fuzz target {only:?}: the targets are {}", targets.join(", "));
        }
        targets = vec![only.clone()];
    }
    fuzz(&targets, args.seconds)
}

/// The test suite's lane: every target, briefly.
pub fn lane(seconds: u64) -> Result<()> {
    fuzz(&targets()?, seconds)
}

/// Builds, then runs `targets` for `seconds` each, printing each one's
/// executions and result; fails naming every crash's input.
fn fuzz(targets: &[String], seconds: u64) -> Result<()> {
    build()?;
    let mut crashed = Vec::new();
    let mut report = Vec::new();
    for target in targets {
        let started = Instant::now();
        let outcome = run_target(target, seconds)?;
        let took = started.elapsed().as_secs_f64();
        let line = match &outcome {
            Outcome::Clean { executions } => format!(
                "{target:<12} ok       {executions:>9} executions in {took:.0} s ({:.0}/s)",
                *executions as f64 / took.max(1e-3)
            ),
            Outcome::Crashed { artifact } => {
                let input = artifact
                    .as_ref()
                    .map_or("(no input written)".to_string(), |p| p.display().to_string());
                crashed.push(format!("{target}: {input}"));
                format!("{target:<12} CRASHED  input: {input}")
            }
        };
        eprintln!("fuzz: {line}");
        report.push(line);
    }
    eprintln!("\nfuzz: {} targets, {seconds} s each", targets.len());
    for line in &report {
        eprintln!("  {line}");
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed (replay with `cargo +nightly fuzz run --dev TARGET INPUT` in fuzz/):\n  {}",
            crashed.join("\n  ")
        );
    }
    Ok(())
}

/// The targets: `fuzz/fuzz_targets/*.rs`, by name.
fn targets() -> Result<Vec<String>> {
    let dir = workspace::root().join("fuzz/fuzz_targets");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no fuzz target in {}", dir.display());
    }
    Ok(names)
}

/// `cargo fuzz build --dev` with the nightly, every target at once.
fn build() -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", "build", "--dev"])
        .current_dir(workspace::root().join("fuzz"))
        // The outer (stable) cargo's settings must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS");
    workspace::run(&mut cmd).context("building the fuzz targets failed; `cargo xtask setup` installs cargo-fuzz")
}

/// Runs one built target for `seconds`.
fn run_target(target: &str, seconds: u64) -> Result<Outcome> {
    let root = workspace::root();
    let found = root.join("fuzz/target/corpus").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    for dir in [&found, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut cmd = Command::new(root.join(BUILD_DIR).join(target));
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // New inputs go to the first directory only.
        .arg(&found)
        .args(seeds.is_dir().then_some(&seeds))
        .env("ASAN_OPTIONS", "detect_odr_violation=0")
        .current_dir(root.join("fuzz"));
    eprintln!("+ {}", workspace::display(&cmd));
    let output = cmd
        .output()
        .with_context(|| format!("cannot run the fuzz target {target} (was it built?)"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        let executions = executions(&log)
            .with_context(|| format!("fuzz target {target} ended without saying how many inputs it ran:\n{log}"))?;
        return Ok(Outcome::Clean { executions });
    }
    eprintln!("{}", failure(&log));
    Ok(Outcome::Crashed {
        artifact: artifact(&log).map(|p| absolute(&root.join("fuzz"), p)),
    })
}

/// libFuzzer's closing `Done N runs in S second(s)`.
fn executions(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done ")?.split_whitespace().next()?.parse().ok())
}

/// The input libFuzzer wrote for a failure (`Test unit written to PATH`).
fn artifact(log: &str) -> Option<&Path> {
    log.lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| Path::new(p.trim()))
}

fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// What went wrong, from a failed run's log: the panic message or the
/// sanitizer's report (without the long backtraces after them), and
/// libFuzzer's closing lines.
fn failure(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|l| {
            l.contains("panicked at") || l.contains("ERROR: AddressSanitizer") || l.contains("ERROR: libFuzzer")
        })
        .unwrap_or(lines.len().saturating_sub(20));
    let mut out: Vec<&str> = lines[start..].iter().take(8).copied().collect();
    out.push("...");
    out.extend(
        lines
            .iter()
            .filter(|l| l.starts_with("SUMMARY") || l.contains("Test unit written")),
    );
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_execution_count_and_the_crash_input() {
        let clean = "#1024\tpulse  cov: 10\nDone 123456 runs in 11 second(s)\n";
        assert_eq!(executions(clean), Some(123456));
        assert_eq!(executions("INFO: Seed: 1\n"), None);
        let crash = "thread '<unnamed>' panicked at src/lib.rs:1:1\n==1== ERROR: libFuzzer: deadly signal\n\
                     artifact_prefix='/w/fuzz/artifacts/dns/'; Test unit written to /w/fuzz/artifacts/dns/crash-0a1b\n";
        assert_eq!(artifact(crash), Some(Path::new("/w/fuzz/artifacts/dns/crash-0a1b")));
        assert_eq!(artifact(clean), None);
        let report = failure(&format!("INFO: Seed: 1\n{}\n{crash}", "  at frame\n".repeat(50)));
        assert!(
            report.starts_with("thread '<unnamed>' panicked at src/lib.rs:1:1"),
            "{report}"
        );
        assert!(
            report.ends_with("Test unit written to /w/fuzz/artifacts/dns/crash-0a1b"),
            "{report}"
        );
    }
}
