//! `mesh-agent`: the per-node daemon. The control plane (init, join, the
//! Raft store) comes with its own issue; today the binary checks a node.

use clap::{Parser, Subcommand};
use mesh_agent::preflight::{self, Severity};

#[derive(Parser)]
#[command(name = "mesh-agent", version = mesh_agent::VERSION, about = "mesh's per-node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check what this node's kernel offers mesh's dataplane (needs root).
    Check,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Check => {
            let findings = preflight::assess(&preflight::gather());
            for f in &findings {
                let mark = match f.severity {
                    Severity::Ok => "ok  ",
                    Severity::Degraded => "warn",
                    Severity::Fatal => "FAIL",
                };
                println!("{mark} {}", f.what);
            }
            if findings.iter().any(|f| f.severity == Severity::Fatal) {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
    }
}
