//! The agent's place in a swarm: init, join, restart, lock/unlock, leave,
//! its session with the managers (heartbeats, certificate renewal, role
//! changes) and the routing of requests to the leader.
//!
//! On disk under the data directory (0700):
//! - `node.json`: node ID, cluster ID, addresses, known managers (no secrets);
//! - `certs/node.pem`, `certs/ca.pem`: public certificates;
//! - `certs/node.key.sealed`: the node's private key, sealed with the DEK;
//! - `keys/`: the DEK wrapped by the KEK (see [`crate::ca::keystore`]);
//! - `raft/raft.redb`: the encrypted Raft store (managers only).
//!
//! Here: the [`Agent`] (its local API and the life cycle) and the [`Member`]
//! a node is while in a swarm (its manager, if any, and what runs on it).
//! The member's duties are in files of their own: `files` (settings and
//! credentials on disk), `session` (heartbeats, renewal), `worker`
//! (applying assignments, reporting tasks), `routing` (to the leader, and
//! the peers' RPC handler), `service_logs`, `metrics` (the node's facts
//! for a scrape).

use crate::locks::{Locked, RwLocked};
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

mod error;
mod files;
mod metrics;
mod routing;
mod service_logs;
mod session;
mod worker;

use crate::manager::error::ManagerError;
pub(crate) use error::NodeError;
pub use files::NodeConfig;
use files::{Credentials, Files};
use routing::PeerHandler;

use rand::Rng;
use rustls::ServerConfig;
use tokio::sync::{mpsc, watch};

use crate::agent::{
    mesh::{bpffs, kernel::RoutingMesh},
    net::{
        bridge::{LocalNetwork, Subnet},
        dns::Dns,
        overlay::Overlays,
        tunnel::{Tunnel, WireguardMode},
    },
    tasks::{
        cgroup::TaskCgroup,
        supervisor::{SandboxSetup, Supervisor},
    },
};
use crate::{
    api::{
        cert_records::NodeCerts,
        clock::unix_now,
        error::{ApiError, ApiResult, ErrorKind},
        messages::{
            InitRequest, JoinCall, JoinRequest, LocalRequest, LocalResponse, PeerRequest, PeerResponse, SwarmInfo,
        },
        objects::{Availability, CaState, ClusterSpec, JoinTokens, Node, NodeId, NodeStatus, Role},
        secret_text::SecretText,
        store::Command,
    },
    ca::{
        keystore::{KeyStore, KeyStoreError, Loaded},
        pki::{self, NodeIdentity, NodeKey, RootCa},
        seal::{DataKey, UnlockKey},
        token::JoinToken,
    },
    manager::{raft::network::Peers, rules, Manager, RaftTiming},
    wire::{
        rpc::{self, RpcClient, RpcError},
        tls::{self, MANAGER_NAME},
    },
};

/// How long leaving the swarm waits for the node's tasks to stop.
const TASK_STOP_LIMIT: Duration = Duration::from_secs(60);

/// How long a manager waits for the leader to answer a forwarded request.
/// Cluster requests commit in milliseconds; past this the leader is gone or
/// cut off, and the caller hears "unavailable" while a new one is elected.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a manager that is not yet a Raft voter (it just joined or was
/// promoted, and is catching up) holds a request before forwarding it.
const VOTER_WAIT: Duration = Duration::from_secs(10);

/// How the agent runs, from its command line.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// The name the node reports.
    pub hostname: String,
    /// Raft timing (managers).
    pub timing: RaftTiming,
    /// Rebuild a single-manager Raft store from this manager's data (after
    /// losing quorum for good); see `mesh-agent run --force-new-cluster`.
    pub force_new_cluster: bool,
    /// The node-local pool tasks get their bridge address from.
    pub local_pool: Subnet,
    /// Which WireGuard the encrypted overlays use.
    pub wireguard: WireguardMode,
    /// How the routing mesh reaches other nodes.
    pub mesh_routing: crate::agent::mesh::kernel::MeshRouting,
    /// What serves published ports.
    pub lb_backend: crate::agent::mesh::kernel::LbBackend,
    /// The cluster port's limits (connections, frames, deadlines).
    pub cluster_port: rpc::ServerOptions,
    /// The local API socket (hidden from tasks).
    pub socket: PathBuf,
}

enum Phase {
    Inactive,
    Locked(NodeConfig),
    Active(Arc<Member>),
}

/// The agent: one per node.
pub struct Agent {
    opts: AgentOptions,
    phase: tokio::sync::Mutex<Phase>,
}

impl Agent {
    /// Starts the agent: rejoins the swarm if the data directory says it is
    /// in one (staying locked if autolocked), else waits for init or join.
    pub async fn start(opts: AgentOptions) -> ApiResult<Arc<Agent>> {
        std::fs::create_dir_all(&opts.data_dir).map_err(NodeError::io(&opts.data_dir))?;
        restrict(&opts.data_dir)?;
        let files = Files {
            dir: opts.data_dir.clone(),
        };
        let phase = match files.read_config()? {
            None => Phase::Inactive,
            Some(config) => match KeyStore::new(&opts.data_dir).load().map_err(NodeError::from)? {
                Loaded::Locked => {
                    log::warn!("this manager is autolocked: unlock it with `meshctl swarm unlock`");
                    Phase::Locked(config)
                }
                Loaded::Unlocked(dek) => {
                    let creds = files.read_credentials(&dek)?;
                    Phase::Active(Member::start(&opts, config, creds, dek).await?)
                }
            },
        };
        Ok(Arc::new(Agent {
            opts,
            phase: tokio::sync::Mutex::new(phase),
        }))
    }

    /// Serves one request from `meshctl`.
    pub async fn handle(&self, request: LocalRequest) -> ApiResult<LocalResponse> {
        match request {
            LocalRequest::Init(req) => self.init(req).await,
            LocalRequest::Join(req) => self.join(req).await,
            LocalRequest::Leave { force } => self.leave(force).await,
            LocalRequest::Unlock { key } => self.unlock(key.expose()).await,
            LocalRequest::Info => Ok(LocalResponse::Info(self.info().await)),
            LocalRequest::Cluster(req) => {
                let member = self.member().await?;
                Ok(LocalResponse::Cluster(member.cluster_request(req).await?))
            }
            LocalRequest::ServiceLogs { service, cursors, tail } => {
                let member = self.member().await?;
                Ok(LocalResponse::Logs(
                    member.service_logs(&service, &cursors, tail).await?,
                ))
            }
        }
    }

    async fn member(&self) -> ApiResult<Arc<Member>> {
        match &*self.phase.lock().await {
            Phase::Active(m) => Ok(m.clone()),
            Phase::Locked(_) => Err(locked()),
            Phase::Inactive => Err(ApiError::precondition(
                "this node is not part of a swarm: run `meshctl swarm init` or `meshctl swarm join`",
            )),
        }
    }

    async fn info(&self) -> SwarmInfo {
        let mut info = SwarmInfo {
            state: "inactive".into(),
            node_id: None,
            cluster_id: None,
            role: None,
            managers: vec![],
            leader: None,
            raft: None,
            agent_version: crate::VERSION.into(),
        };
        match &*self.phase.lock().await {
            Phase::Inactive => {}
            Phase::Locked(config) => {
                info.state = "locked".into();
                info.node_id = Some(config.node_id);
                info.cluster_id = Some(config.cluster_id.clone());
                info.managers = config.managers.clone();
            }
            Phase::Active(m) => {
                info.state = "active".into();
                info.node_id = Some(m.id);
                let config = m.config.locked().clone();
                info.cluster_id = Some(config.cluster_id);
                info.managers = config.managers;
                info.role = Some(m.creds.read_locked().role);
                info.leader = m.manager().and_then(|mgr| mgr.leader());
                info.raft = m.manager().map(|mgr| mgr.raft_info());
            }
        }
        info
    }

    async fn ensure_inactive(&self) -> ApiResult<tokio::sync::MutexGuard<'_, Phase>> {
        let phase = self.phase.lock().await;
        match &*phase {
            Phase::Inactive => Ok(phase),
            Phase::Locked(_) => Err(locked()),
            Phase::Active(_) => Err(ApiError::precondition(
                "this node is already part of a swarm; run `meshctl swarm leave` first",
            )),
        }
    }

    async fn init(&self, req: InitRequest) -> ApiResult<LocalResponse> {
        let mut phase = self.ensure_inactive().await?;
        let listen = crate::api::addr::parse_listen_addr(&req.listen_addr)?;
        let advertise = match &req.advertise_addr {
            Some(a) => crate::api::addr::parse_advertise_addr(a, listen.port())?,
            None if !listen.ip().is_unspecified() => listen,
            None => SocketAddr::new(detect_address().await?, listen.port()),
        };
        let data_path_addr = match &req.data_path_addr {
            Some(a) => a
                .parse::<IpAddr>()
                .map_err(|_| ApiError::invalid(format!("invalid --data-path-addr {a:?}: expected an IP address")))?,
            None => advertise.ip(),
        };
        rules::check_address_pools(&req.default_addr_pool, req.default_addr_pool_mask_len)?;
        if req.cert_expiry_secs < 60 {
            return Err(ApiError::invalid("--cert-expiry must be at least 1m"));
        }
        if req.heartbeat_period_ms < 100 {
            return Err(ApiError::invalid("--dispatcher-heartbeat must be at least 100ms"));
        }
        rules::check_task_history_limit(req.task_history_limit)?;
        rules::check_data_path_port(req.data_path_port)?;
        let files = Files {
            dir: self.opts.data_dir.clone(),
        };
        match self.do_init(&req, listen, advertise, data_path_addr, &files).await {
            Ok((member, response)) => {
                *phase = Phase::Active(member);
                Ok(response)
            }
            Err(e) => {
                files.wipe();
                Err(e)
            }
        }
    }

    async fn do_init(
        &self,
        req: &InitRequest,
        listen: SocketAddr,
        advertise: SocketAddr,
        data_path_addr: IpAddr,
        files: &Files,
    ) -> ApiResult<(Arc<Member>, LocalResponse)> {
        let id = random_id();
        let cluster_id = random_cluster_id();
        let ca = RootCa::generate(&cluster_id).map_err(NodeError::from)?;
        let key = NodeKey::generate().map_err(NodeError::from)?;
        let now = SystemTime::now();
        let identity = NodeIdentity {
            node_id: id,
            role: Role::Manager,
            cluster_id: cluster_id.clone(),
        };
        let csr = key.csr_pem().map_err(NodeError::from)?;
        let cert = ca
            .issue(
                &csr,
                &identity,
                now - pki::backdate(Duration::from_secs(req.cert_expiry_secs)),
                now + Duration::from_secs(req.cert_expiry_secs),
            )
            .map_err(NodeError::from)?;
        let issued = ca.record(&cert, unix_now()).map_err(NodeError::from)?;
        let tokens = JoinTokens {
            worker: JoinToken::generate(ca.digest()).to_text(),
            manager: JoinToken::generate(ca.digest()).to_text(),
        };
        let unlock = req.autolock.then(UnlockKey::generate);
        let dek = KeyStore::new(&self.opts.data_dir)
            .create(unlock.as_ref())
            .map_err(NodeError::from)?;
        let creds = Credentials::new(cert, key.key_pem(), vec![ca.cert_pem().to_string()])?;
        files.write_credentials(&creds, &dek)?;
        let config = NodeConfig {
            node_id: id,
            cluster_id: cluster_id.clone(),
            listen_addr: listen.to_string(),
            managers: vec![(id, advertise.to_string())],
        };
        files.write_config(&config)?;
        let member = Member::start(&self.opts, config, creds, dek).await?;
        let unix = unix_now();
        let init = Command::Init {
            cluster: ClusterSpec {
                id: cluster_id,
                created_at: unix,
                default_addr_pool: req.default_addr_pool.clone(),
                default_addr_pool_mask_len: req.default_addr_pool_mask_len,
                autolock: req.autolock,
                heartbeat_period_ms: req.heartbeat_period_ms,
                heartbeat_misses_down: 3,
                cert_expiry_secs: req.cert_expiry_secs,
                task_history_limit: req.task_history_limit,
                data_path_port: req.data_path_port,
                overlay_key_rotation_secs: crate::api::objects::DEFAULT_KEY_ROTATION_SECS,
            },
            ca: CaState {
                root_cert_pem: ca.cert_pem().to_string(),
                root_key_pem: SecretText::new(ca.key_pem()),
                previous_roots_pem: vec![],
                previous_until: 0,
                cross_signed_pem: String::new(),
            },
            tokens: tokens.clone(),
            unlock_key: unlock.as_ref().map(|k| SecretText::new(k.to_text())),
            first: Box::new(Node {
                id,
                hostname: self.opts.hostname.clone(),
                role: Role::Manager,
                availability: Availability::Active,
                labels: Default::default(),
                addr: advertise.to_string(),
                data_path_addr: data_path_addr.to_string(),
                status: NodeStatus::Ready,
                status_message: String::new(),
                agent_version: crate::VERSION.into(),
                wireguard_key: String::new(),
                resources: Default::default(),
                certs: NodeCerts::first(issued),
                created_at: unix,
                updated_at: unix,
            }),
        };
        let manager = member
            .manager()
            .ok_or_else(|| ApiError::internal("the manager did not start"))?;
        if let Err(e) = manager.bootstrap(&advertise.to_string(), init).await {
            member.stop().await;
            return Err(e);
        }
        let response = LocalResponse::Initialized {
            node_id: id,
            worker_join_command: format!("meshctl swarm join --token {} {advertise}", tokens.worker),
            unlock_key: unlock.as_ref().map(|k| SecretText::new(k.to_text())),
        };
        Ok((member, response))
    }

    async fn join(&self, req: JoinRequest) -> ApiResult<LocalResponse> {
        let mut phase = self.ensure_inactive().await?;
        let token = JoinToken::parse(&req.token).map_err(|e| ApiError::invalid(e.to_string()))?;
        let remote = crate::api::addr::parse_remote_addr(&req.remote_addr)?;
        let listen = crate::api::addr::parse_listen_addr(&req.listen_addr)?;
        let advertise = match &req.advertise_addr {
            Some(a) => Some(crate::api::addr::parse_advertise_addr(a, listen.port())?),
            None if !listen.ip().is_unspecified() => Some(listen),
            None => None,
        };
        if let Some(a) = &req.data_path_addr {
            a.parse::<IpAddr>()
                .map_err(|_| ApiError::invalid(format!("invalid --data-path-addr {a:?}: expected an IP address")))?;
        }
        let key = NodeKey::generate().map_err(NodeError::from)?;
        let call = JoinCall {
            token: req.token.clone(),
            csr_pem: key.csr_pem().map_err(NodeError::from)?,
            hostname: self.opts.hostname.clone(),
            advertise_addr: advertise.map(|a| a.to_string()),
            listen_port: listen.port(),
            data_path_addr: req.data_path_addr.clone(),
            agent_version: crate::VERSION.into(),
        };
        // Pinned to the CA digest in the token: the token's secret is only
        // ever sent to a manager of the swarm the token names.
        let client: RpcClient<PeerRequest, PeerResponse> = RpcClient::new(
            remote.clone(),
            tls::pinned_client_config(token.ca_digest()),
            MANAGER_NAME.try_into().expect("reason: valid DNS name"),
        );
        let reply = match client.call(PeerRequest::Join(call), Duration::from_secs(20)).await {
            Ok(PeerResponse::Join(r)) => r?,
            Ok(PeerResponse::Refused(e)) => return Err(e),
            Ok(other) => return Err(ApiError::internal(format!("unexpected reply to join: {other:?}"))),
            Err(RpcError::Tls(msg)) => {
                return Err(ApiError::denied(format!(
                    "the manager at {remote} could not be verified against the token ({msg}): the token belongs to another swarm or was altered"
                )))
            }
            Err(e) => return Err(ApiError::unavailable(format!("cannot reach the manager at {remote}: {e}"))),
        };
        let files = Files {
            dir: self.opts.data_dir.clone(),
        };
        let result = async {
            let dek = KeyStore::new(&self.opts.data_dir)
                .create(None)
                .map_err(NodeError::from)?;
            let creds = Credentials::new(reply.cert_pem.clone(), key.key_pem(), reply.ca_pems.clone())?;
            files.write_credentials(&creds, &dek)?;
            let config = NodeConfig {
                node_id: reply.node_id,
                cluster_id: reply.cluster_id.clone(),
                listen_addr: listen.to_string(),
                managers: reply.managers.clone(),
            };
            files.write_config(&config)?;
            Member::start(&self.opts, config, creds, dek).await
        }
        .await;
        match result {
            Ok(member) => {
                *phase = Phase::Active(member);
                Ok(LocalResponse::Joined {
                    node_id: reply.node_id,
                    role: reply.role,
                })
            }
            Err(e) => {
                files.wipe();
                Err(e)
            }
        }
    }

    async fn leave(&self, force: bool) -> ApiResult<LocalResponse> {
        let mut phase = self.phase.lock().await;
        let member = match &*phase {
            Phase::Inactive => return Err(ApiError::precondition("this node is not part of a swarm")),
            Phase::Locked(_) if !force => return Err(locked()),
            Phase::Locked(_) => None,
            Phase::Active(m) => Some(m.clone()),
        };
        if let Some(m) = &member {
            if m.manager().is_some() && !force {
                return Err(ApiError::precondition(
                    "this node is a manager: leaving takes a member out of the Raft store and may cost the swarm its quorum; demote it first (`meshctl node demote NODE` on another manager), or use --force",
                ));
            }
            // Marked down at once rather than after missed heartbeats, so
            // this host can join again right away; the managers may be
            // unreachable, which does not stop the leave.
            match m
                .call_managers(|| PeerRequest::Leave, Duration::from_secs(3), false)
                .await
            {
                Ok(PeerResponse::Reported(Ok(()))) => {}
                Ok(PeerResponse::Refused(e) | PeerResponse::Reported(Err(e))) => {
                    log::warn!("leaving: the managers did not mark this node down: {}", e.message)
                }
                Ok(other) => log::warn!("leaving: unexpected reply {other:?}"),
                Err(e) => log::warn!("leaving: the managers did not mark this node down: {}", e.message),
            }
            m.stop().await;
        }
        Files {
            dir: self.opts.data_dir.clone(),
        }
        .wipe();
        *phase = Phase::Inactive;
        Ok(LocalResponse::Done)
    }

    async fn unlock(&self, text: &str) -> ApiResult<LocalResponse> {
        let mut phase = self.phase.lock().await;
        let Phase::Locked(config) = &*phase else {
            return Err(ApiError::precondition("this node is not locked"));
        };
        let key = UnlockKey::parse(text).map_err(|e| ApiError::invalid(e.to_string()))?;
        let dek = KeyStore::new(&self.opts.data_dir).unlock(&key).map_err(|e| match e {
            KeyStoreError::WrongUnlockKey => ApiError::denied(e.to_string()),
            other => ApiError::from(NodeError::from(other)),
        })?;
        let files = Files {
            dir: self.opts.data_dir.clone(),
        };
        let creds = files.read_credentials(&dek)?;
        let member = Member::start(&self.opts, config.clone(), creds, dek).await?;
        *phase = Phase::Active(member);
        Ok(LocalResponse::Done)
    }
}

fn locked() -> ApiError {
    ApiError::new(
        ErrorKind::Locked,
        "this node is locked (autolock): unlock it with `meshctl swarm unlock` and the unlock key",
    )
}

fn restrict(dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(NodeError::io(dir))
}

fn random_id() -> NodeId {
    rand::thread_rng().gen_range(1..u64::MAX)
}

fn random_cluster_id() -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..25).map(|_| DIGITS[rng.gen_range(0..36)] as char).collect()
}

/// The one global address of this host, when `--advertise-addr` is not given.
async fn detect_address() -> ApiResult<IpAddr> {
    let found = tokio::task::spawn_blocking(|| {
        crate::dataplane::netlink::Netlink::run(|nl| async move { nl.global_addresses().await })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("listing addresses: {e}")))?;
    let v4: Vec<IpAddr> = found.iter().copied().filter(IpAddr::is_ipv4).collect();
    match v4.as_slice() {
        [one] => Ok(*one),
        [] => Err(ApiError::invalid(
            "this host has no global IPv4 address to advertise; use --advertise-addr",
        )),
        many => Err(ApiError::invalid(format!(
            "this host has several addresses ({}); choose one with --advertise-addr",
            many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// A node that is part of a swarm.
pub(crate) struct Member {
    id: NodeId,
    opts: AgentOptions,
    config: Mutex<NodeConfig>,
    creds: RwLock<Credentials>,
    dek: DataKey,
    peers: Arc<Peers>,
    server_tls: watch::Sender<Arc<ServerConfig>>,
    manager: RwLock<Option<Arc<Manager>>>,
    leader_hint: Mutex<Option<String>>,
    /// The leader the managers last named in a heartbeat reply.
    reported_leader: Mutex<Option<NodeId>>,
    /// Runs this node's tasks.
    tasks: Arc<Supervisor>,
    /// The node bridge the tasks are attached to, and its NAT.
    network: Arc<LocalNetwork>,
    /// The overlay networks its tasks are on.
    overlays: Arc<Overlays>,
    /// The node's published ports.
    mesh: Arc<RoutingMesh>,
    /// The tasks' DNS responder.
    dns: Arc<Dns>,
    /// (overlay networks, peers they reach, WireGuard peers), from the
    /// latest assignment (for the metrics).
    overlay_facts: Mutex<(u64, u64, u64)>,
    stop: watch::Sender<bool>,
}

impl Member {
    async fn start(
        opts: &AgentOptions,
        config: NodeConfig,
        creds: Credentials,
        dek: DataKey,
    ) -> ApiResult<Arc<Member>> {
        let listen: SocketAddr = crate::api::addr::parse_listen_addr(&config.listen_addr)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| ApiError::precondition(format!("cannot listen on {listen}: {e}")))?;
        let (server_tls, server_rx) = watch::channel(creds.server_config()?);
        let peers = Peers::new(creds.client_config()?);
        let (stop, stop_rx) = watch::channel(false);
        let role = creds.role;
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let network = Arc::new(LocalNetwork::new(opts.local_pool));
        let wireguard_key = Files {
            dir: opts.data_dir.clone(),
        }
        .wireguard_key(&dek)?;
        let overlays = Arc::new(Overlays::new(Tunnel::new(wireguard_key, opts.wireguard)));
        let cgroup = match TaskCgroup::create(&opts.data_dir) {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("tasks get no cgroup, so service VIPs will not work in them: {e}");
                None
            }
        };
        let pins = bpffs::pin_dir(&opts.data_dir).unwrap_or_else(|e| {
            log::error!(
                "mounting a bpffs at {}: {e}; published ports and VIPs will not be served",
                opts.data_dir.join("bpf").display()
            );
            opts.data_dir.join("bpf")
        });
        let mesh = RoutingMesh::new(
            network.clone(),
            cgroup.as_ref().map(|c| c.dir().to_path_buf()),
            pins,
            opts.mesh_routing == crate::agent::mesh::kernel::MeshRouting::Auto,
            opts.lb_backend,
        );
        let dns = Arc::new(Dns::new());
        let tasks = Supervisor::new(
            opts.data_dir.join("tasks"),
            network.clone(),
            overlays.clone(),
            dns.clone(),
            SandboxSetup {
                // The running binary itself, even once a package upgrade
                // has replaced the file: init and agent always match.
                init: PathBuf::from("/proc/self/exe"),
                cgroups: cgroup.clone(),
                masked: tasks_must_not_see(opts),
                volumes: opts.data_dir.join("volumes"),
            },
            reports,
        )
        .map_err(|e| ApiError::internal(format!("preparing the task directory: {e}")))?;
        let member = Arc::new(Member {
            id: config.node_id,
            opts: opts.clone(),
            config: Mutex::new(config),
            creds: RwLock::new(creds),
            dek,
            peers,
            server_tls,
            manager: RwLock::new(None),
            leader_hint: Mutex::new(None),
            reported_leader: Mutex::new(None),
            tasks,
            network,
            overlays,
            mesh,
            dns,
            overlay_facts: Mutex::new((0, 0, 0)),
            stop,
        });
        if role == Role::Manager {
            if member.opts.force_new_cluster {
                member.force_new_cluster().await?;
            } else {
                member.start_manager().await?;
            }
        }
        let handler = Arc::new(PeerHandler {
            member: Arc::downgrade(&member),
        });
        tokio::spawn(rpc::serve_with_options(
            listener,
            server_rx.into(),
            handler,
            stop_rx.clone(),
            opts.cluster_port.clone(),
        ));
        tokio::spawn(member.clone().assignments_loop(stop_rx.clone()));
        tokio::spawn(member.clone().report_loop(reports_rx, stop_rx.clone()));
        tokio::spawn(member.clone().session(stop_rx));
        Ok(member)
    }

    async fn start_manager(&self) -> ApiResult<()> {
        let manager = Manager::start(
            self.id,
            &self.opts.data_dir,
            self.dek.clone(),
            self.peers.clone(),
            self.opts.timing,
        )
        .await?;
        *self.manager.write_locked() = Some(manager);
        Ok(())
    }

    /// Replaces this manager's store with a new single-voter one holding the
    /// latest state of the old (other managers demoted). The old store is
    /// kept beside it.
    async fn force_new_cluster(&self) -> ApiResult<()> {
        let dir = self.opts.data_dir.join("raft");
        let path = dir.join("raft.redb");
        if !path.exists() {
            return Err(ApiError::precondition(
                "--force-new-cluster: this node has no Raft store to recover from",
            ));
        }
        let old = crate::manager::raft::store::recover(&path, self.dek.clone()).map_err(ManagerError::from)?;
        let addr =
            old.nodes.get(&self.id).map(|n| n.addr.clone()).ok_or_else(|| {
                ApiError::precondition("--force-new-cluster: this node is not a member in its own store")
            })?;
        let state = old.forced_to_single_manager(self.id, unix_now());
        let kept = self.opts.data_dir.join(format!("raft.before-force-{}", unix_now()));
        std::fs::rename(&dir, &kept).map_err(NodeError::io(&dir))?;
        self.start_manager().await?;
        let manager = self
            .manager()
            .ok_or_else(|| ApiError::internal("the manager did not start"))?;
        manager
            .bootstrap(&addr, Command::Restore { state: Box::new(state) })
            .await?;
        log::warn!(
            "forced a new cluster: this node is now the only manager; the other managers were demoted (promote them again once they are back); the old store is kept in {}",
            kept.display()
        );
        Ok(())
    }

    async fn stop_manager(&self) {
        let manager = self.manager.write_locked().take();
        if let Some(m) = manager {
            m.shutdown().await;
            let _ = std::fs::remove_dir_all(self.opts.data_dir.join("raft"));
        }
    }

    fn manager(&self) -> Option<Arc<Manager>> {
        self.manager.read_locked().clone()
    }

    /// Stops tasks, removes the node bridge, NAT and overlays once no task needs
    /// them, and stops the managers' side.
    async fn stop(&self) {
        self.mesh.remove_all().await;
        if self.tasks.stop_all(TASK_STOP_LIMIT).await {
            self.network.remove().await;
            self.overlays.remove_all().await;
            let data_dir = self.opts.data_dir.clone();
            let _ = tokio::task::spawn_blocking(move || TaskCgroup::remove_recorded(&data_dir)).await;
        }
        let _ = self.stop.send(true);
        let manager = self.manager.write_locked().take();
        if let Some(m) = manager {
            m.shutdown().await;
        }
    }

    fn files(&self) -> Files {
        Files {
            dir: self.opts.data_dir.clone(),
        }
    }
}

/// What of the node no task may see: the agent's data directory (keys,
/// the Raft store, other tasks' files) and its socket.
fn tasks_must_not_see(opts: &AgentOptions) -> Vec<PathBuf> {
    vec![opts.data_dir.clone(), opts.socket.clone()]
}
