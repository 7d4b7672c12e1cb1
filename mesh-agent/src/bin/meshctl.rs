//! `meshctl`: the operator's CLI, shaped like `docker swarm|node|service|network`.
//! Commands arrive with the parts they drive; today it reports its version.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "meshctl", version = mesh_agent::VERSION, about = "Drive a mesh cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the client version.
    Version,
}

fn main() {
    match Cli::parse().command {
        Command::Version => println!("meshctl {}", mesh_agent::VERSION),
    }
}
