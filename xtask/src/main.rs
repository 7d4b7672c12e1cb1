//! `cargo xtask`: the project's own automation.
//!
//! - `setup`: install what the project needs on a fresh Debian machine (idempotent).
//! - `build-ebpf`: build mesh-ebpf for bpfel-unknown-none with the nightly toolchain.
//! - `test`: setup, then every test lane (lint, unit, fuzz, kernel, VM).
//! - `fuzz`: setup, then the fuzz targets of `fuzz/`, each for a while.
//! - `demo`: setup, build, then a 3-host mesh in network namespaces.
//! - `bench`: setup, release build, then the benchmarks (ratios in one run).
//! - `chaos`: setup, release build, then a seeded chaos run under load.

mod ebpf;
mod fuzz;
mod layers;
mod setup;
mod test;
mod vm;
mod workspace;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mesh's build, test and demo automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces and packages the project needs (idempotent).
    Setup,
    /// Build the eBPF programs (mesh-ebpf) where the agent build picks them up.
    BuildEbpf,
    /// Run setup, then every test lane: lint, unit, fuzz, kernel (root), VM (virtme-ng).
    Test(test::Args),
    /// Check the agent's layering (what the lint lane checks): which
    /// top-level modules of a source tree (default: mesh-api's and mesh-agent's) use
    /// which, no cycle among them.
    Layers {
        /// The source tree to check.
        src: Option<std::path::PathBuf>,
    },
    /// Run setup, build the fuzz targets (cargo fuzz, nightly) and run each
    /// (or one) for a while; fails naming the input of any crash.
    Fuzz(fuzz::Args),
    /// Run setup, build, then a 3-node swarm in network namespaces with a
    /// published service, asked through every node.
    Demo {
        /// Keep the swarm up until Ctrl-C, to explore it with `ip netns exec`.
        #[arg(long)]
        hold: bool,
    },
    /// Run the benchmarks: `control` (Raft failover, store writes), `services`
    /// (create -> running, scheduler), `overlay` (VXLAN throughput and
    /// latency vs the bare underlay; encrypted vs plain), `mesh` (published
    /// ports vs direct and nftables DNAT, ns/packet, programming cost,
    /// convergence), `scale` (simulated nodes against 3 real managers; not
    /// run when no benchmark is named: it takes long).
    Bench {
        /// Which benchmark; all when omitted.
        which: Option<String>,
        /// Run it inside Debian's kernel under virtme-ng (`overlay` only:
        /// kernel WireGuard and IPsec, which the host kernel lacks).
        #[arg(long)]
        vm: bool,
        /// Passed to the benchmark binary (e.g. --trials 20).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Run setup, a release build, then faults in a seeded random order
    /// (leader killed, worker killed, manager partitioned, agent restarted,
    /// node drained) against 5 nodes serving a published service under
    /// load; prints per fault the failed requests and recovery time, and
    /// fails if a request fails after convergence, an acknowledged write is
    /// lost, a task is orphaned or a kernel object leaks.
    Chaos {
        /// The schedule's seed (default: from the clock; printed to replay).
        #[arg(long)]
        seed: Option<u64>,
        /// How many faults.
        #[arg(long, default_value_t = 15)]
        faults: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => ebpf::build().map(|_| ()),
        Command::Test(args) => test::run(&args),
        Command::Layers { src } => match src {
            Some(src) => layers::check(&src, &[]),
            None => layers::check_all(&workspace::root()),
        },
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Demo { hold } => demo(hold),
        Command::Bench { which, vm, rest } => bench(which.as_deref(), vm, &rest),
        Command::Chaos { seed, faults } => chaos(seed, faults),
    }
}

/// The release binaries the demo, the benchmarks and the chaos run start:
/// mesh-agent, meshctl and the test helpers.
fn build_release_binaries() -> Result<()> {
    workspace::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "meshctl",
        "-p",
        "mesh-agent-bin",
        "-p",
        "mesh-tests",
        "--bins",
    ])
}

fn demo(hold: bool) -> Result<()> {
    setup::require_root("the demo (network namespaces, eBPF)")?;
    setup::run()?;
    ebpf::build()?;
    // The agents, meshctl and the demo's HTTP server run as real processes.
    build_release_binaries()?;
    let mut args = vec!["run", "--quiet", "--release", "-p", "mesh-tests", "--bin", "mesh-demo"];
    if !hold {
        args.extend(["--", "--once"]);
    }
    workspace::cargo(&args)
}

fn bench(which: Option<&str>, vm: bool, rest: &[String]) -> Result<()> {
    setup::require_root("the benchmarks (network namespaces)")?;
    let binaries: &[&str] = match which {
        None => &[
            "mesh-bench",
            "mesh-bench-services",
            "mesh-bench-overlay",
            "mesh-bench-mesh",
        ],
        Some("control") => &["mesh-bench"],
        Some("services") => &["mesh-bench-services"],
        Some("overlay") => &["mesh-bench-overlay"],
        Some("mesh") => &["mesh-bench-mesh"],
        Some("scale") => &["mesh-bench-scale"],
        Some(other) => {
            anyhow::bail!("unknown benchmark {other:?}: the benchmarks are: control, services, overlay, mesh, scale")
        }
    };
    setup::run()?;
    ebpf::build()?;
    // The agents, meshctl, and the helpers the benchmarks run as tasks.
    build_release_binaries()?;
    if vm {
        if binaries != ["mesh-bench-overlay"] {
            anyhow::bail!("--vm runs the overlay benchmark only: `cargo xtask bench overlay --vm`");
        }
        // The kernel's WireGuard (a fallback to boringtun would not count)
        // and IPsec; fewer round trips, as the VM emulates its CPUs.
        let mut args: Vec<String> = ["--wireguard", "kernel", "--round-trips", "2000"]
            .map(String::from)
            .to_vec();
        args.extend(rest.iter().cloned());
        let binary = workspace::root().join("target/release/mesh-bench-overlay");
        return vm::run_program(&binary, &args);
    }
    for binary in binaries {
        let mut args = vec!["run", "--quiet", "--release", "-p", "mesh-tests", "--bin", binary, "--"];
        args.extend(rest.iter().map(String::as_str));
        workspace::cargo(&args)?;
    }
    Ok(())
}

fn chaos(seed: Option<u64>, faults: usize) -> Result<()> {
    setup::require_root("the chaos run (network namespaces, eBPF)")?;
    setup::run()?;
    ebpf::build()?;
    // The agents, meshctl and the HTTP server the service runs.
    build_release_binaries()?;
    let faults = faults.to_string();
    let mut args = vec![
        "run",
        "--quiet",
        "--release",
        "-p",
        "mesh-tests",
        "--bin",
        "mesh-chaos",
        "--",
        "--faults",
        &faults,
    ];
    let seed = seed.map(|s| s.to_string());
    if let Some(seed) = &seed {
        args.extend(["--seed", seed]);
    }
    workspace::cargo(&args)
}
