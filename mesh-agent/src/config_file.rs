//! The settings of `mesh-agent run` ([`RunArgs`]) and `--config FILE`: a
//! TOML file of the same settings as the flags, keys named like the flags (`data-dir`, `lb-backend`, ...). The
//! file becomes flags placed before the command line's, so the command
//! line wins; a key whose environment variable is set is left to the
//! environment, so the environment wins over the file. Unknown keys, and
//! values of the wrong shape, are refused with the key named.

use std::path::PathBuf;

/// The settings of `mesh-agent run`, from its flags, their `MESH_*`
/// variables and the settings file ([`args_from_toml`]).
#[derive(clap::Args)]
#[command(args_override_self = true)]
pub struct RunArgs {
    /// A TOML file of these settings, keys named like the flags
    /// (`data-dir = "/var/lib/mesh"`); unknown keys are refused. The command
    /// line wins over the environment (`MESH_DATA_DIR`, ...), which wins
    /// over the file.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the node keeps its state (keys, certificates, the Raft store).
    #[arg(long, env = "MESH_DATA_DIR", default_value = "/var/lib/mesh")]
    pub data_dir: PathBuf,
    /// The local API socket (root-only).
    #[arg(long, env = "MESH_SOCKET", default_value = crate::wire::local::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The name this node reports (default: the host name).
    #[arg(long, env = "MESH_HOSTNAME")]
    pub hostname: Option<String>,
    /// Raft leader heartbeat interval. With the default election timeout a
    /// write commits again about 1.4 s (median) after the leader dies: openraft
    /// has a follower wait the leader lease (the maximum timeout) plus its own
    /// timeout before campaigning. Raise both on slow or lossy links.
    #[arg(long, env = "MESH_RAFT_HEARTBEAT", default_value = "50ms")]
    pub raft_heartbeat: String,
    /// Raft election timeout (randomised between this and twice this).
    #[arg(long, env = "MESH_RAFT_ELECTION_TIMEOUT", default_value = "150ms")]
    pub raft_election_timeout: String,
    /// Log entries between Raft snapshots.
    #[arg(long, env = "MESH_RAFT_SNAPSHOT_INTERVAL", default_value_t = 1000)]
    pub raft_snapshot_interval: u64,
    /// Disaster recovery, when a quorum of managers is lost for good: make
    /// this manager the only one, keeping the swarm's state; the others are
    /// demoted. Start once with it, then without.
    #[arg(long, env = "MESH_FORCE_NEW_CLUSTER")]
    pub force_new_cluster: bool,
    /// The node-local pool tasks get their address on the node's bridge
    /// (mesh_gwbridge) from.
    #[arg(long, env = "MESH_LOCAL_POOL", default_value = crate::agent::net::bridge::DEFAULT_POOL)]
    pub local_pool: String,
    /// Which WireGuard encrypted overlays use: the kernel's where it has
    /// it (auto), only the kernel's, or boringtun in the agent on a TUN
    /// device (userspace).
    #[arg(long, env = "MESH_WIREGUARD", value_enum, default_value = "auto")]
    pub wireguard: crate::agent::net::tunnel::WireguardMode,
    /// How published ports reach tasks on other nodes: as they are, to
    /// the node's MAC address, when it is on the same link, else through
    /// the routing-mesh tunnel (auto); or always through the tunnel.
    #[arg(long, env = "MESH_MESH_ROUTING", value_enum, default_value = "auto")]
    pub mesh_routing: crate::agent::mesh::kernel::MeshRouting,
    /// What serves published ports: the eBPF programs, or IPVS as in
    /// Swarm (needs the ip_vs module; tasks on other nodes than the one a
    /// connection came in on see that node's address, not the client's).
    /// Service VIPs use the eBPF socket programs either way.
    #[arg(long, env = "MESH_LB_BACKEND", value_enum, default_value = "ebpf")]
    pub lb_backend: crate::agent::mesh::kernel::LbBackend,
    /// Where Prometheus scrapes the agent (`GET /metrics`), or `off`.
    /// Loopback by default: the metrics name services and nodes, so
    /// expose them on purpose (a warning says when they are).
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = crate::metrics::server::DEFAULT_ADDR)]
    pub metrics_addr: String,
    /// Serve the swarm visualizer (a live page of nodes and tasks, like the
    /// Docker Swarm Visualizer) on ADDR:PORT, e.g. 127.0.0.1:8080, on a
    /// manager; `off` by default.
    #[arg(long, env = "MESH_VISUALIZER_ADDR", default_value = "off")]
    pub visualizer_addr: String,
    /// Connections to the cluster port from one address that have not
    /// presented a node's or operator's certificate yet (handshaking, or
    /// joining): more are closed at once. Raise it only for many nodes
    /// that reach the managers from one address (behind NAT).
    #[arg(long, env = "MESH_MAX_UNAUTHENTICATED_PER_SOURCE", default_value_t = crate::wire::rpc::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE)]
    pub max_unauthenticated_per_source: usize,
}

/// The flags `text` stands for, for `command` (the `run` subcommand's
/// definition): `--key` for a switch, `--key=value` otherwise. `env_set`
/// says whether an environment variable is set.
pub fn args_from_toml(
    text: &str,
    command: &clap::Command,
    env_set: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
    let mut args = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| {
                let known: Vec<&str> = command
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| *l != "config" && *l != "help")
                    .collect();
                format!("unknown key {key:?} (known: {})", known.join(", "))
            })?;
        if arg.get_env().and_then(|e| e.to_str()).is_some_and(env_set) {
            continue;
        }
        let flag = format!("--{key}");
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => args.push(flag),
                toml::Value::Boolean(false) => {}
                other => return Err(format!("{key}: expected true or false, found {other}")),
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(format!("{key}: expected a string or a number, found {other}")),
        };
        // One `--key=value` argument: a value that looks like a flag
        // ("--to") stays a value rather than being read as the next flag.
        args.push(format!("{flag}={text}"));
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn command() -> Command {
        Command::new("run")
            .arg(Arg::new("config").long("config"))
            .arg(Arg::new("data-dir").long("data-dir").env("MESH_DATA_DIR"))
            .arg(Arg::new("raft-snapshot-interval").long("raft-snapshot-interval"))
            .arg(
                Arg::new("force-new-cluster")
                    .long("force-new-cluster")
                    .action(ArgAction::SetTrue),
            )
    }

    #[test]
    fn keys_become_flags_and_the_environment_wins() {
        let text = "data-dir = \"/srv/mesh\"\nraft-snapshot-interval = 500\nforce-new-cluster = true\n";
        let args = args_from_toml(text, &command(), &|_| false).unwrap();
        assert_eq!(
            args,
            vec![
                "--data-dir=/srv/mesh",
                "--force-new-cluster",
                "--raft-snapshot-interval=500"
            ]
        );
        let args = args_from_toml(text, &command(), &|e| e == "MESH_DATA_DIR").unwrap();
        assert!(!args.iter().any(|a| a.starts_with("--data-dir")), "{args:?}");
    }

    /// Found by the config_file fuzz target: `"--to"` was passed as its
    /// own argument, which clap read as an unknown flag.
    #[test]
    fn a_value_that_looks_like_a_flag_stays_a_value() {
        let args = args_from_toml("data-dir = \"--to\"", &command(), &|_| false).unwrap();
        assert_eq!(args, vec!["--data-dir=--to"]);
        let matches = command().no_binary_name(true).try_get_matches_from(&args).unwrap();
        assert_eq!(matches.get_one::<String>("data-dir").map(String::as_str), Some("--to"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = args_from_toml("data_dir = \"/x\"", &command(), &|_| false).unwrap_err();
        assert!(
            err.contains("unknown key \"data_dir\"") && err.contains("data-dir"),
            "{err}"
        );
        assert!(args_from_toml("config = \"/x\"", &command(), &|_| false).is_err());
        assert!(args_from_toml("force-new-cluster = \"yes\"", &command(), &|_| false)
            .unwrap_err()
            .contains("true or false"));
        assert!(args_from_toml("data-dir = [1]", &command(), &|_| false).is_err());
        assert!(args_from_toml("data-dir = ", &command(), &|_| false)
            .unwrap_err()
            .contains("TOML"));
    }
}
