//! `meshctl`: the operator's CLI, shaped like `docker swarm|node`. Every
//! command is one request to the local agent over its Unix socket; the agent
//! forwards what needs the leader.
//!
//! Exit codes: 0 success, 1 internal, 2 invalid input, 3 not found,
//! 4 refused by the cluster's state, 5 permission denied, 6 node locked,
//! 7 unavailable (no agent, no leader).

/// meshctl's version, as `meshctl version` prints it.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

use mesh_api::{api, wire};

mod ca;
pub(crate) mod network;
pub(crate) mod run;
pub(crate) mod secret;
pub(crate) mod service;
pub(crate) mod table;

use std::{io::BufRead, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    api::{
        error::{ApiError, ApiResult},
        messages::{
            parse_labels, ClusterRequest, ClusterResponse, InitRequest, JoinRequest, LocalRequest, LocalResponse,
            NodeView, PeerRequest, PeerResponse, SwarmInfo,
        },
        objects::{node_id_text, Availability, NodeStatus, NodeUpdate, Role},
    },
    wire::{
        local,
        rpc::RpcClient,
        tls::{self, MANAGER_NAME},
    },
};

/// meshctl's command line.
#[derive(Parser, Debug)]
#[command(name = "meshctl", version = crate::VERSION, about = "Drive a mesh cluster")]
pub(crate) struct Cli {
    /// The agent's socket (default /run/mesh/mesh.sock, or $MESH_SOCKET).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Talk to a remote manager (HOST:PORT) over mutual TLS instead of the
    /// local agent; needs an operator certificate (`swarm operator-cert`).
    #[arg(long, global = true, env = "MESH_HOST")]
    host: Option<String>,
    /// Where the operator certificate for --host lives (key.pem, cert.pem, ca.pem).
    #[arg(long, global = true, env = "MESH_TLS_DIR", default_value = "~/.mesh/tls")]
    tls_dir: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the client and agent versions.
    Version,
    /// Print a shell completion script: `meshctl completion bash >
    /// /etc/bash_completion.d/meshctl` (zsh: into a directory on $fpath as
    /// `_meshctl`; fish: `~/.config/fish/completions/meshctl.fish`).
    Completion {
        /// bash, zsh or fish.
        shell: CompletionShell,
    },
    /// Show this node's swarm state.
    Info {
        /// json or table.
        #[arg(long, default_value = "table")]
        format: Format,
    },
    /// Manage the swarm.
    #[command(subcommand)]
    Swarm(SwarmCommand),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage services.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Manage overlay networks.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Manage secrets (files under /run/secrets in the tasks that use them).
    #[command(subcommand)]
    Secret(secret::BlobCommand),
    /// Manage configs (files under /run/configs in the tasks that use them).
    #[command(subcommand)]
    Config(secret::BlobCommand),
    /// Run a one-off command on this node, attached to attachable overlays.
    Run(run::RunArgs),
}

/// The flags every `ls` takes.
#[derive(clap::Args, Debug)]
pub(crate) struct ListArgs {
    /// Only print IDs.
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// json or table.
    #[arg(long, default_value = "table")]
    pub(crate) format: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Worker,
    Manager,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Worker => Role::Worker,
            RoleArg::Manager => Role::Manager,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AvailabilityArg {
    Active,
    Pause,
    Drain,
}

/// Where a node listens and how others reach it (`swarm init` and `join`).
#[derive(Args, Debug)]
struct AddressArgs {
    /// Address advertised to other nodes (IP[:PORT]).
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Listen address (ADDR:PORT).
    #[arg(long, default_value = "0.0.0.0:2377")]
    listen_addr: String,
    /// Address for data path (overlay) traffic.
    #[arg(long)]
    data_path_addr: Option<String>,
}

#[derive(Args, Debug)]
struct InitArgs {
    #[command(flatten)]
    addresses: AddressArgs,
    /// Address pool(s) for overlay networks (CIDR, repeatable).
    #[arg(long = "default-addr-pool", default_value = "10.0.0.0/8")]
    default_addr_pool: Vec<String>,
    /// Subnet size carved from the pools.
    #[arg(long, default_value_t = 24)]
    default_addr_pool_mask_length: u8,
    /// Require an unlock key to start a stopped manager.
    #[arg(long)]
    autolock: bool,
    /// Validity period of node certificates.
    #[arg(long, default_value = "2160h")]
    cert_expiry: String,
    /// How often nodes heartbeat; a node silent for 3 periods is Down.
    #[arg(long, default_value = "1s")]
    dispatcher_heartbeat: String,
    /// Ended tasks kept per service slot (for `service ps`).
    #[arg(long, default_value_t = 5)]
    task_history_limit: u32,
    /// UDP port of the overlays' VXLAN traffic (1024 to 49151).
    #[arg(long, default_value_t = crate::api::objects::DEFAULT_DATA_PATH_PORT)]
    data_path_port: u16,
}

#[derive(Subcommand, Debug)]
enum SwarmCommand {
    /// Create a swarm with this node as its first manager.
    Init(InitArgs),
    /// Join a swarm as a worker or manager.
    Join {
        /// The join token.
        #[arg(long)]
        token: String,
        #[command(flatten)]
        addresses: AddressArgs,
        /// A manager's address (HOST:PORT).
        remote: String,
    },
    /// Print or rotate a join token.
    JoinToken {
        /// Rotate the token first.
        #[arg(long)]
        rotate: bool,
        /// Only print the token.
        #[arg(short, long)]
        quiet: bool,
        /// worker or manager.
        role: RoleArg,
    },
    /// Leave the swarm.
    Leave {
        /// Leave even as a manager.
        #[arg(short, long)]
        force: bool,
    },
    /// Unlock a locked manager (reads the key from standard input).
    Unlock,
    /// Print or rotate the unlock key.
    UnlockKey {
        /// Rotate the key first.
        #[arg(long)]
        rotate: bool,
        /// Only print the key.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Change swarm settings.
    Update {
        /// Turn autolock on or off.
        #[arg(long)]
        autolock: Option<bool>,
        /// Ended tasks kept per service slot (for `service ps`).
        #[arg(long)]
        task_history_limit: Option<u32>,
    },
    /// Show the trusted roots, or rotate the root CA.
    Ca(ca::CaArgs),
    /// Operator certificates for `meshctl --host`: issue one (the key never
    /// leaves this machine), list them, or revoke one.
    OperatorCert(ca::OperatorCertArgs),
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List nodes.
    Ls(ListArgs),
    /// Show nodes in detail (JSON unless --pretty).
    Inspect {
        /// Human-readable text.
        #[arg(long)]
        pretty: bool,
        /// Node IDs, ID prefixes, hostnames, or `self`.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Promote nodes to managers.
    Promote {
        /// Nodes.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Demote managers to workers.
    Demote {
        /// Nodes.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Update a node.
    Update {
        /// active, pause or drain.
        #[arg(long)]
        availability: Option<AvailabilityArg>,
        /// Add or change a label (KEY=VALUE, repeatable).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a label (repeatable).
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        /// The node.
        node: String,
    },
    /// Remove nodes from the swarm.
    Rm {
        /// Remove even if the node is up.
        #[arg(short, long)]
        force: bool,
        /// Nodes.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

/// Shells `meshctl completion` writes for.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script for `shell` (no agent needed).
pub(crate) fn completion_script(shell: CompletionShell) -> String {
    use clap::CommandFactory;
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "meshctl", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs meshctl; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        // Written whole or not at all: a closed pipe (`| head`) is no error.
        use std::io::Write;
        let _ = std::io::stdout().write_all(completion_script(shell).as_bytes());
        return 0;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: cannot start: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {}", e.message);
            e.exit_code()
        }
    }
}

/// Where requests go: the local agent's socket, or a remote manager.
enum Transport {
    Local(PathBuf),
    Remote {
        addr: String,
        rpc: RpcClient<PeerRequest, PeerResponse>,
    },
}

pub(crate) struct Client {
    transport: Transport,
}

impl Client {
    fn new(socket: Option<PathBuf>, host: Option<String>, tls_dir: &str) -> ApiResult<Client> {
        let Some(host) = host else {
            return Ok(Client {
                transport: Transport::Local(local::socket_path(socket)),
            });
        };
        let addr = crate::api::addr::parse_remote_addr(&host)?;
        let dir = expand_home(tls_dir);
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| {
                ApiError::invalid(format!(
                    "--host needs an operator certificate: {}: {e} (issue one with `meshctl swarm operator-cert --name NAME --out {}` on a manager)",
                    dir.join(name).display(),
                    dir.display()
                ))
            })
        };
        let (key, cert, ca) = (read("key.pem")?, read("cert.pem")?, read("ca.pem")?);
        let roots = vec![ca];
        let config = tls::client_config(&roots, Some((&cert, &key)))
            .map_err(|e| ApiError::invalid(format!("{}: {e}", dir.display())))?;
        let name = MANAGER_NAME.try_into().expect("reason: a valid DNS name");
        Ok(Client {
            transport: Transport::Remote {
                rpc: RpcClient::new(addr.clone(), config, name),
                addr,
            },
        })
    }

    async fn call(&self, request: LocalRequest) -> ApiResult<LocalResponse> {
        match &self.transport {
            Transport::Local(socket) => local::call(socket, &request).await,
            Transport::Remote { addr, rpc } => {
                let LocalRequest::Cluster(cluster) = request else {
                    return Err(ApiError::invalid(
                        "this command acts on the node it runs on: run it there, without --host",
                    ));
                };
                match rpc.call(PeerRequest::Cluster(cluster), Duration::from_secs(30)).await {
                    Ok(PeerResponse::Cluster(r)) => r.map(LocalResponse::Cluster),
                    Ok(PeerResponse::Refused(e)) => Err(e),
                    Ok(other) => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
                    Err(e) => Err(ApiError::unavailable(format!("{addr}: {e}"))),
                }
            }
        }
    }

    fn remote_addr(&self) -> Option<&str> {
        match &self.transport {
            Transport::Remote { addr, .. } => Some(addr),
            Transport::Local(_) => None,
        }
    }

    pub(crate) async fn cluster(&self, request: ClusterRequest) -> ApiResult<ClusterResponse> {
        match self.call(LocalRequest::Cluster(request)).await? {
            LocalResponse::Cluster(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn info(&self) -> ApiResult<SwarmInfo> {
        match self.call(LocalRequest::Info).await? {
            LocalResponse::Info(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// Resolves `self` to this node's ID.
    async fn node_name(&self, name: &str) -> ApiResult<String> {
        if name == "self" {
            let info = self.info().await?;
            return info
                .node_id
                .map(node_id_text)
                .ok_or_else(|| ApiError::precondition("this node is not part of a swarm"));
        }
        Ok(name.to_string())
    }

    async fn node(&self, name: &str) -> ApiResult<NodeView> {
        let node = self.node_name(name).await?;
        match self.cluster(ClusterRequest::NodeInspect { node }).await? {
            ClusterResponse::Node(v) => Ok(*v),
            other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        }
    }
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Writes the operator's key, certificate and roots, the key readable by its owner only.
/// Reads one line of secret text from standard input; on a terminal after
/// `prompt`, with echo off (restored even when reading fails).
fn read_secret_line(prompt: &str) -> std::io::Result<zeroize::Zeroizing<String>> {
    use std::os::fd::AsRawFd;
    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    // SAFETY: termios is plain data, valid when zeroed.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a termios to fill; it fails cleanly
    // on anything that is not a terminal.
    let terminal = std::io::IsTerminal::is_terminal(&stdin) && unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if terminal {
        eprint!("{prompt}");
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: a valid descriptor and a termios read from it.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = zeroize::Zeroizing::new(String::new());
    let read = stdin.lock().read_line(&mut line);
    if terminal {
        // SAFETY: as above, with the settings read before.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    read?;
    Ok(line)
}

fn unexpected(other: LocalResponse) -> ApiError {
    ApiError::internal(format!("unexpected reply from the agent: {other:?}"))
}

pub(crate) fn duration_ms(flag: &str, text: &str) -> ApiResult<u64> {
    crate::api::clock::parse_duration(text)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| ApiError::invalid(format!("--{flag}: {e}")))
}

async fn run(cli: Cli) -> ApiResult<()> {
    let client = Client::new(cli.socket, cli.host, &cli.tls_dir)?;
    match cli.command {
        Command::Completion { .. } => Ok(()),
        Command::Version => {
            println!("Client: meshctl {}", crate::VERSION);
            match client.info().await {
                Ok(info) => println!("Agent:  mesh-agent {}", info.agent_version),
                Err(e) => println!("Agent:  unreachable ({})", e.message),
            }
            Ok(())
        }
        Command::Info { format } => {
            let info = client.info().await?;
            if format == Format::Json {
                println!("{}", json(&info)?);
            } else {
                println!("Swarm: {}", info.state);
                if let Some(id) = info.node_id {
                    println!(" NodeID: {}", node_id_text(id));
                }
                if let Some(c) = &info.cluster_id {
                    println!(" ClusterID: {c}");
                }
                if let Some(r) = info.role {
                    println!(" Is Manager: {}", r == Role::Manager);
                }
                if let Some(l) = info.leader {
                    println!(" Leader: {}", node_id_text(l));
                }
                println!(" Managers: {}", info.managers.len());
                for (id, addr) in &info.managers {
                    println!("  {} {addr}", node_id_text(*id));
                }
                if let Some(r) = &info.raft {
                    let n = |v: Option<u64>| v.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
                    println!(" Raft:");
                    println!("  Term: {}", r.term);
                    println!("  Last log index: {}", n(r.last_log_index));
                    println!("  Applied index: {}", n(r.last_applied));
                    println!("  Snapshot index: {}", n(r.snapshot_index));
                    println!("  Purged up to: {}", n(r.purged_index));
                    println!("  Voters: {}", r.voters.len());
                }
            }
            Ok(())
        }
        Command::Swarm(cmd) => swarm(&client, cmd).await,
        Command::Node(cmd) => node(&client, cmd).await,
        Command::Service(cmd) => service::run(&client, cmd).await,
        Command::Network(cmd) => network::run(&client, cmd).await,
        Command::Secret(cmd) => secret::run(&client, crate::api::secret::Kind::Secret, cmd).await,
        Command::Config(cmd) => secret::run(&client, crate::api::secret::Kind::Config, cmd).await,
        Command::Run(args) => run::run(&client, args).await,
    }
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> ApiResult<String> {
    serde_json::to_string_pretty(value).map_err(|e| ApiError::internal(e.to_string()))
}

async fn swarm(client: &Client, cmd: SwarmCommand) -> ApiResult<()> {
    match cmd {
        SwarmCommand::Init(args) => {
            let request = InitRequest {
                advertise_addr: args.addresses.advertise_addr,
                listen_addr: args.addresses.listen_addr,
                data_path_addr: args.addresses.data_path_addr,
                default_addr_pool: args.default_addr_pool,
                default_addr_pool_mask_len: args.default_addr_pool_mask_length,
                autolock: args.autolock,
                cert_expiry_secs: duration_ms("cert-expiry", &args.cert_expiry)? / 1000,
                heartbeat_period_ms: duration_ms("dispatcher-heartbeat", &args.dispatcher_heartbeat)?,
                task_history_limit: args.task_history_limit,
                data_path_port: args.data_path_port,
            };
            match client.call(LocalRequest::Init(request)).await? {
                LocalResponse::Initialized {
                    node_id,
                    worker_join_command,
                    unlock_key,
                } => {
                    println!(
                        "Swarm initialized: current node ({}) is now a manager.\n",
                        node_id_text(node_id)
                    );
                    println!(
                        "To add a worker to this swarm, run the following command:\n\n    {worker_join_command}\n"
                    );
                    println!("To add a manager to this swarm, run 'meshctl swarm join-token manager' and follow the instructions.");
                    if let Some(key) = unlock_key {
                        println!("\nTo unlock a swarm manager after it restarts, run the `meshctl swarm unlock`");
                        println!("command and provide the following key:\n\n    {}\n", key.expose());
                        println!("Remember to store this key in a password manager, since without it you");
                        println!("will not be able to restart the manager.");
                    }
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        SwarmCommand::Join {
            token,
            addresses,
            remote,
        } => {
            let request = JoinRequest {
                token,
                remote_addr: remote,
                advertise_addr: addresses.advertise_addr,
                listen_addr: addresses.listen_addr,
                data_path_addr: addresses.data_path_addr,
            };
            match client.call(LocalRequest::Join(request)).await? {
                LocalResponse::Joined { role, .. } => {
                    println!("This node joined a swarm as a {}.", role_text(role));
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        SwarmCommand::JoinToken { rotate, quiet, role } => {
            let role: Role = role.into();
            let token = match client.cluster(ClusterRequest::JoinToken { role, rotate }).await? {
                ClusterResponse::Secret(t) => t,
                other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            };
            if quiet {
                println!("{}", token.expose());
                return Ok(());
            }
            if rotate {
                println!("Successfully rotated {} join token.\n", role_text(role));
            }
            let addr = match client.remote_addr() {
                Some(addr) => addr.to_string(),
                None => {
                    let info = client.info().await?;
                    info.managers
                        .iter()
                        .find(|(id, _)| Some(*id) == info.node_id)
                        .map(|(_, a)| a.clone())
                        .unwrap_or_default()
                }
            };
            println!(
                "To add a {} to this swarm, run the following command:\n\n    meshctl swarm join --token {} {addr}\n",
                role_text(role),
                token.expose()
            );
            Ok(())
        }
        SwarmCommand::Leave { force } => {
            client.call(LocalRequest::Leave { force }).await?;
            println!("Node left the swarm.");
            Ok(())
        }
        SwarmCommand::Unlock => {
            let key = read_secret_line("Enter unlock key: ")
                .map_err(|e| ApiError::invalid(format!("reading the unlock key from standard input: {e}")))?;
            client.call(LocalRequest::Unlock { key: key.into() }).await?;
            Ok(())
        }
        SwarmCommand::UnlockKey { rotate, quiet } => {
            let key = match client.cluster(ClusterRequest::UnlockKey { rotate }).await? {
                ClusterResponse::Secret(k) => k,
                other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            };
            if quiet {
                println!("{}", key.expose());
            } else {
                if rotate {
                    println!("Successfully rotated manager unlock key.\n");
                }
                println!("To unlock a swarm manager after it restarts, run the `meshctl swarm unlock`\ncommand and provide the following key:\n\n    {}\n", key.expose());
            }
            Ok(())
        }
        SwarmCommand::Update {
            autolock,
            task_history_limit,
        } => {
            if autolock.is_none() && task_history_limit.is_none() {
                return Err(ApiError::invalid(
                    "nothing to update: give --autolock=true|false and/or --task-history-limit N",
                ));
            }
            if let Some(limit) = task_history_limit {
                client.cluster(ClusterRequest::SetTaskHistoryLimit { limit }).await?;
            }
            let Some(enabled) = autolock else {
                println!("Swarm updated.");
                return Ok(());
            };
            match client.cluster(ClusterRequest::SetAutolock { enabled }).await? {
                ClusterResponse::Secret(key) => {
                    println!("Swarm updated.\nTo unlock a swarm manager after it restarts, run the `meshctl swarm unlock`\ncommand and provide the following key:\n\n    {}\n", key.expose());
                }
                _ => println!("Swarm updated."),
            }
            Ok(())
        }
        SwarmCommand::OperatorCert(args) => ca::operator_cert(client, args).await,
        SwarmCommand::Ca(args) => ca::ca(client, args).await,
    }
}

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Worker => "worker",
        Role::Manager => "manager",
    }
}

fn status_text(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Unknown => "Unknown",
        NodeStatus::Ready => "Ready",
        NodeStatus::Down => "Down",
    }
}

fn availability_text(a: Availability) -> &'static str {
    match a {
        Availability::Active => "Active",
        Availability::Pause => "Pause",
        Availability::Drain => "Drain",
    }
}

/// The `node ls` table; `self_id` gets a `*`.
pub(crate) fn node_table(nodes: &[NodeView], self_id: Option<u64>) -> String {
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.node.hostname.cmp(&b.node.hostname).then(a.node.id.cmp(&b.node.id)));
    let rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|v| {
            let star = if Some(v.node.id) == self_id { " *" } else { "" };
            vec![
                format!("{}{star}", node_id_text(v.node.id)),
                v.node.hostname.clone(),
                status_text(v.node.status).to_string(),
                availability_text(v.node.availability).to_string(),
                v.manager_status.clone().unwrap_or_default(),
                v.node.agent_version.clone(),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "HOSTNAME",
            "STATUS",
            "AVAILABILITY",
            "MANAGER STATUS",
            "AGENT VERSION",
        ],
        &rows,
    )
}

async fn node(client: &Client, cmd: NodeCommand) -> ApiResult<()> {
    match cmd {
        NodeCommand::Ls(ListArgs { quiet, format }) => {
            let ClusterResponse::Nodes(nodes) = client.cluster(ClusterRequest::NodeList).await? else {
                return Err(ApiError::internal("unexpected reply to node ls"));
            };
            if quiet {
                for n in &nodes {
                    println!("{}", node_id_text(n.node.id));
                }
            } else if format == Format::Json {
                println!("{}", json(&nodes)?);
            } else {
                let self_id = match client.remote_addr() {
                    Some(_) => None,
                    None => client.info().await.ok().and_then(|i| i.node_id),
                };
                print!("{}", node_table(&nodes, self_id));
            }
            Ok(())
        }
        NodeCommand::Inspect { pretty, nodes } => {
            let mut views = Vec::new();
            for n in &nodes {
                views.push(client.node(n).await?);
            }
            if pretty {
                for v in &views {
                    let n = &v.node;
                    println!("ID:\t\t\t{}", node_id_text(n.id));
                    println!("Hostname:\t\t{}", n.hostname);
                    println!("Role:\t\t\t{}", role_text(n.role));
                    println!(
                        "Status:\n State:\t\t\t{}\n Availability:\t\t{}\n Address:\t\t{}",
                        status_text(n.status),
                        availability_text(n.availability),
                        n.addr
                    );
                    if let Some(m) = &v.manager_status {
                        println!("Manager Status:\n Raft Status:\t\t{m}");
                    }
                    if !n.labels.is_empty() {
                        println!("Labels:");
                        for (k, val) in &n.labels {
                            println!(" - {k} = {val}");
                        }
                    }
                    println!(
                        "Resources:\n CPUs:\t\t\t{}\n Memory:\t\t{}",
                        crate::api::resources::cpus_text(n.resources.nano_cpus),
                        crate::api::resources::bytes_text(n.resources.memory_bytes)
                    );
                    println!("Agent Version:\t\t{}", n.agent_version);
                }
            } else {
                println!("{}", json(&views)?);
            }
            Ok(())
        }
        NodeCommand::Promote { nodes } | NodeCommand::Demote { nodes } if nodes.is_empty() => {
            Err(ApiError::invalid("name at least one node"))
        }
        NodeCommand::Promote { nodes } => set_role(client, &nodes, Role::Manager).await,
        NodeCommand::Demote { nodes } => set_role(client, &nodes, Role::Worker).await,
        NodeCommand::Update {
            availability,
            label_add,
            label_rm,
            node,
        } => {
            let update = NodeUpdate {
                role: None,
                availability: availability.map(|a| match a {
                    AvailabilityArg::Active => Availability::Active,
                    AvailabilityArg::Pause => Availability::Pause,
                    AvailabilityArg::Drain => Availability::Drain,
                }),
                label_add: parse_labels(&label_add)?,
                label_rm,
            };
            if update == NodeUpdate::default() {
                return Err(ApiError::invalid(
                    "nothing to update: give --availability, --label-add or --label-rm",
                ));
            }
            let name = client.node_name(&node).await?;
            client
                .cluster(ClusterRequest::NodeUpdate { node: name, update })
                .await?;
            println!("{node}");
            Ok(())
        }
        NodeCommand::Rm { force, nodes } => {
            for n in &nodes {
                let name = client.node_name(n).await?;
                client.cluster(ClusterRequest::NodeRemove { node: name, force }).await?;
                println!("{n}");
            }
            Ok(())
        }
    }
}

async fn set_role(client: &Client, nodes: &[String], role: Role) -> ApiResult<()> {
    for n in nodes {
        let view = client.node(n).await?;
        let id = node_id_text(view.node.id);
        if view.node.role == role {
            println!("Node {id} is already a {}.", role_text(role));
            continue;
        }
        let update = NodeUpdate {
            role: Some(role),
            ..Default::default()
        };
        client
            .cluster(ClusterRequest::NodeUpdate {
                node: id.clone(),
                update,
            })
            .await?;
        match role {
            Role::Manager => println!("Node {id} promoted to a manager in the swarm."),
            Role::Worker => println!("Manager {id} demoted in the swarm."),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_scripts_name_the_commands() {
        for shell in [CompletionShell::Bash, CompletionShell::Zsh, CompletionShell::Fish] {
            let script = completion_script(shell);
            for word in ["meshctl", "service", "secret", "network", "--publish"] {
                assert!(script.contains(word), "{shell:?} completion lacks {word}");
            }
        }
    }
}
