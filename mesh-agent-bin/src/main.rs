//! `mesh-agent`: the per-node daemon. `mesh-agent run` serves the local API
//! socket and, once the node is in a swarm, its cluster port; `mesh-agent
//! check` reports what the kernel offers the dataplane.

use clap::{Parser, Subcommand};
use mesh_agent::{
    api::clock::parse_duration,
    config_file::RunArgs,
    manager::RaftTiming,
    node::{Agent, AgentOptions},
    preflight::{self, Severity},
    wire::local,
};

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
    /// Run the agent (needs root).
    Run(Box<RunArgs>),
}

fn run(args: RunArgs) -> Result<(), String> {
    let ms = |flag: &str, v: &str| {
        parse_duration(v)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| format!("--{flag}: {e}"))
    };
    let timing = RaftTiming {
        heartbeat_ms: ms("raft-heartbeat", &args.raft_heartbeat)?,
        election_timeout_ms: ms("raft-election-timeout", &args.raft_election_timeout)?,
        snapshot_interval: args.raft_snapshot_interval.max(10),
    };
    if timing.election_timeout_ms < 3 * timing.heartbeat_ms {
        return Err("--raft-election-timeout must be at least 3 times --raft-heartbeat".into());
    }
    let hostname = match args.hostname {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    };
    let opts = AgentOptions {
        data_dir: args.data_dir,
        hostname,
        timing,
        force_new_cluster: args.force_new_cluster,
        local_pool: mesh_agent::agent::net::bridge::check_local_pool(&args.local_pool)
            .map_err(|e| format!("--local-pool: {e}"))?,
        wireguard: args.wireguard,
        mesh_routing: args.mesh_routing,
        lb_backend: args.lb_backend,
        socket: args.socket.clone(),
        cluster_port: mesh_agent::wire::rpc::ServerOptions {
            max_unauthenticated_per_source: args.max_unauthenticated_per_source.max(1),
            ..Default::default()
        },
    };
    if args.lb_backend == mesh_agent::agent::mesh::kernel::LbBackend::Ipvs {
        mesh_agent::dataplane::ipvs::Ipvs::open().map_err(|e| {
            format!("--lb-backend ipvs: this kernel offers no IPVS ({e}); load it with `modprobe ip_vs`, or run with --lb-backend ebpf")
        })?;
    }
    let metrics_addr =
        mesh_agent::metrics::server::parse_addr(&args.metrics_addr).map_err(|e| format!("--metrics-addr: {e}"))?;
    let visualizer_addr = mesh_agent::metrics::server::parse_addr(&args.visualizer_addr)
        .map_err(|e| format!("--visualizer-addr: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = local::bind(&args.socket).map_err(|e| format!("{}: {e}", args.socket.display()))?;
        let agent = Agent::start(opts).await.map_err(|e| e.message)?;
        log::info!(
            "mesh-agent {} listening on {}",
            mesh_agent::VERSION,
            args.socket.display()
        );
        if let Some(addr) = metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--metrics-addr {addr}: {e} (choose another address, or `off`)"))?;
            if mesh_agent::metrics::server::is_public(&addr) {
                log::warn!("serving metrics on {addr}, beyond this host: anyone who reaches it can read them");
            }
            log::info!("metrics on http://{addr}/metrics");
            let agent = agent.clone();
            tokio::spawn(mesh_agent::metrics::server::serve(listener, move || {
                let agent = agent.clone();
                async move { agent.metrics().await }
            }));
        }
        if let Some(addr) = visualizer_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--visualizer-addr {addr}: {e} (choose another address, or `off`)"))?;
            if mesh_agent::metrics::server::is_public(&addr) {
                log::warn!("serving the visualizer on {addr}, beyond this host: anyone who reaches it sees the swarm's nodes and services");
            }
            log::info!("visualizer on http://{addr}/");
            let agent = agent.clone();
            tokio::spawn(mesh_agent::metrics::visualizer::serve(listener, move || {
                let agent = agent.clone();
                async move { agent.visualizer_json().await }
            }));
        }
        let served = agent.clone();
        tokio::spawn(local::serve(listener, move |req| {
            let agent = served.clone();
            async move { agent.handle(req).await }
        }));
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        log::info!("shutting down");
        let _ = std::fs::remove_file(&args.socket);
        Ok(())
    })
}

/// `run --config FILE`: parses again with the file's settings placed
/// before the command line's (see mesh_agent::config_file).
fn with_config_file(cli: Cli) -> Result<Cli, String> {
    let Command::Run(args) = &cli.command else {
        return Ok(cli);
    };
    let Some(path) = &args.config else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let command = <Cli as clap::CommandFactory>::command();
    let run = command
        .find_subcommand("run")
        .expect("reason: the run subcommand exists");
    let from_file = mesh_agent::config_file::args_from_toml(&text, run, &|e| std::env::var_os(e).is_some())
        .map_err(|e| format!("--config {}: {e}", path.display()))?;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let at = argv.iter().position(|a| a == "run").expect("reason: parsed as run") + 1;
    argv.splice(at..at, from_file.into_iter().map(Into::into));
    Cli::try_parse_from(argv).map_err(|e| e.to_string())
}

/// The compiled mesh-ebpf object (build.rs refuses a missing or stale one).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

fn main() -> std::process::ExitCode {
    // A task's init: before anything else, single-threaded.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(mesh_agent::agent::tasks::sandbox::INIT_ARG))
    {
        mesh_agent::agent::tasks::sandbox::init_main();
    }
    mesh_agent::dataplane::ebpf::embed(EBPF_OBJECT);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,openraft=warn")).init();
    let cli = match with_config_file(Cli::parse()) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("Error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => match run(*args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// deploy/agent.toml holds only keys the agent knows, with values it takes.
    #[test]
    fn the_example_config_file_is_accepted() {
        let text = include_str!("../../deploy/agent.toml");
        let command = <Cli as clap::CommandFactory>::command();
        let run = command.find_subcommand("run").unwrap();
        let args = mesh_agent::config_file::args_from_toml(text, run, &|_| false).unwrap();
        assert!(args.len() > 10, "{args:?}");
        let mut argv = vec!["mesh-agent".to_string(), "run".to_string()];
        argv.extend(args);
        argv.extend(["--metrics-addr".to_string(), "off".to_string()]);
        let cli = Cli::try_parse_from(argv).expect("the example parses");
        let Command::Run(run) = cli.command else { panic!("run") };
        assert_eq!(run.metrics_addr, "off", "the command line wins over the file");
        assert_eq!(run.data_dir, PathBuf::from("/var/lib/mesh"));
    }
}
