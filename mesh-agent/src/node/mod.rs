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

use crate::locks::{Locked, RwLocked};
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, SystemTime},
};

mod metrics;

use rand::Rng;
use rustls::{pki_types::CertificateDer, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::agent::{
    mesh::{bpffs, kernel::RoutingMesh},
    net::{
        bridge::{LocalNetwork, Subnet},
        dns::Dns,
        overlay::Overlays,
        tunnel::{Tunnel, WireguardMode},
    },
    tasks::{cgroup::TaskCgroup, logs, supervisor::Supervisor},
};
use crate::api::parts;
use crate::{
    api::{
        cert_records::NodeCerts,
        error::{ApiError, ApiResult, ErrorKind},
        messages::{
            Assignments, ClusterRequest, ClusterResponse, Heartbeat, HeartbeatReply, InitRequest, JoinCall,
            JoinRequest, LocalRequest, LocalResponse, LogChunk, LogQuery, Origin, PeerRequest, PeerResponse, SwarmInfo,
        },
        objects::{node_id_text, Availability, CaState, ClusterSpec, JoinTokens, Node, NodeId, NodeStatus, Role},
        secret_text::SecretText,
        service::TaskReport,
        store::Command,
    },
    ca::{
        keystore::{write_private, KeyStore, KeyStoreError, Loaded},
        pki::{self, NodeIdentity, NodeKey, RootCa},
        seal::{DataKey, UnlockKey},
        token::JoinToken,
    },
    manager::{
        raft::network::{Peers, MANAGER_NAME},
        rules, unix_now, Manager, RaftTiming, ASSIGNMENTS_WAIT,
    },
    wire::{
        rpc::{self, Handler, Peer, RpcClient, RpcError},
        tls,
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
}

/// The non-secret facts a node keeps in `node.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node.
    pub node_id: NodeId,
    /// Its swarm.
    pub cluster_id: String,
    /// Where its cluster port listens.
    pub listen_addr: String,
    /// Managers it knows (id, address), refreshed by heartbeats.
    pub managers: Vec<(NodeId, String)>,
}

/// The node's certificate, key and trusted roots.
#[derive(Clone)]
struct Credentials {
    cert_pem: String,
    key_pem: Zeroizing<String>,
    roots: Vec<String>,
    role: Role,
    /// The certificate's serial (hex), as the store records it.
    serial: String,
    not_before: u64,
    not_after: u64,
}

impl Credentials {
    fn new(cert_pem: String, key_pem: Zeroizing<String>, roots: Vec<String>) -> ApiResult<Self> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| ApiError::internal(format!("the node certificate is not PEM: {e}")))?;
        let (identity, _) =
            pki::identity_from_cert(&der).map_err(|e| ApiError::internal(format!("the node certificate: {e}")))?;
        let (not_before, not_after) = validity(&der)?;
        Ok(Credentials {
            cert_pem,
            key_pem,
            roots,
            role: identity.role,
            serial: pki::serial_of(&der).unwrap_or_default(),
            not_before,
            not_after,
        })
    }

    fn chain_pem(&self) -> String {
        format!(
            "{}{}",
            self.cert_pem,
            self.roots.first().map(String::as_str).unwrap_or("")
        )
    }

    fn server_config(&self) -> ApiResult<Arc<ServerConfig>> {
        tls::server_config(&self.roots, &self.chain_pem(), &self.key_pem).map_err(|e| ApiError::internal(e.to_string()))
    }

    fn client_config(&self) -> ApiResult<Arc<rustls::ClientConfig>> {
        tls::client_config(&self.roots, Some((&self.cert_pem, &self.key_pem)))
            .map_err(|e| ApiError::internal(e.to_string()))
    }
}

use rustls::pki_types::pem::PemObject;

fn validity(der: &CertificateDer<'_>) -> ApiResult<(u64, u64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ApiError::internal(format!("the node certificate does not parse: {e}")))?;
    let v = cert.validity();
    Ok((
        v.not_before.timestamp().max(0) as u64,
        v.not_after.timestamp().max(0) as u64,
    ))
}

/// Files of a node's data directory.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn config(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    fn read_config(&self) -> ApiResult<Option<NodeConfig>> {
        match std::fs::read(self.config()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ApiError::internal(format!("{} is corrupt: {e}", self.config().display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::internal(format!("{}: {e}", self.config().display()))),
        }
    }

    fn write_config(&self, config: &NodeConfig) -> ApiResult<()> {
        let bytes = serde_json::to_vec_pretty(config).map_err(|e| ApiError::internal(e.to_string()))?;
        write_private(&self.config(), &bytes).map_err(internal)
    }

    fn write_credentials(&self, creds: &Credentials, dek: &DataKey) -> ApiResult<()> {
        let certs = self.dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(|e| ApiError::internal(format!("{}: {e}", certs.display())))?;
        write_private(
            &certs.join("node.key.sealed"),
            &dek.seal(b"node-key", creds.key_pem.as_bytes()),
        )
        .map_err(internal)?;
        write_private(&certs.join("node.pem"), creds.cert_pem.as_bytes()).map_err(internal)?;
        write_private(&certs.join("ca.pem"), creds.roots.concat().as_bytes()).map_err(internal)
    }

    fn read_credentials(&self, dek: &DataKey) -> ApiResult<Credentials> {
        let certs = self.dir.join("certs");
        let read = |name: &str| {
            std::fs::read(certs.join(name))
                .map_err(|e| ApiError::internal(format!("{}: {e}", certs.join(name).display())))
        };
        let key = dek
            .open(b"node-key", &read("node.key.sealed")?)
            .map_err(|e| ApiError::internal(format!("the node key cannot be opened: {e}")))?;
        let key_pem =
            Zeroizing::new(String::from_utf8(key).map_err(|_| ApiError::internal("the node key is not PEM"))?);
        let cert_pem = String::from_utf8(read("node.pem")?).map_err(|_| ApiError::internal("node.pem is not PEM"))?;
        let roots =
            split_pem(&String::from_utf8(read("ca.pem")?).map_err(|_| ApiError::internal("ca.pem is not PEM"))?);
        Credentials::new(cert_pem, key_pem, roots)
    }

    /// The node's WireGuard private key (sealed with the DEK), made on
    /// first use.
    fn wireguard_key(&self, dek: &DataKey) -> ApiResult<[u8; 32]> {
        let path = self.dir.join("certs").join("wireguard.key.sealed");
        match std::fs::read(&path) {
            Ok(sealed) => {
                let key = zeroize::Zeroizing::new(
                    dek.open(b"wireguard-key", &sealed)
                        .map_err(|e| ApiError::internal(format!("the WireGuard key cannot be opened: {e}")))?,
                );
                <[u8; 32]>::try_from(key.as_slice())
                    .map_err(|_| ApiError::internal(format!("{} does not hold a 32-byte key", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                write_private(&path, &dek.seal(b"wireguard-key", &key)).map_err(internal)?;
                Ok(key)
            }
            Err(e) => Err(ApiError::internal(format!("{}: {e}", path.display()))),
        }
    }

    /// Removes everything the swarm left in the data directory.
    fn wipe(&self) {
        for sub in ["raft", "certs", "keys"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
        let _ = std::fs::remove_file(self.config());
    }
}

fn split_pem(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|s| s.contains("BEGIN"))
        .map(str::to_string)
        .collect()
}

fn internal(e: KeyStoreError) -> ApiError {
    ApiError::internal(e.to_string())
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
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|e| ApiError::internal(format!("{}: {e}", opts.data_dir.display())))?;
        restrict(&opts.data_dir)?;
        let files = Files {
            dir: opts.data_dir.clone(),
        };
        let phase = match files.read_config()? {
            None => Phase::Inactive,
            Some(config) => match KeyStore::new(&opts.data_dir).load().map_err(internal)? {
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
        let listen = rules::parse_listen_addr(&req.listen_addr)?;
        let advertise = match &req.advertise_addr {
            Some(a) => rules::parse_advertise_addr(a, listen.port())?,
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
        let ca = RootCa::generate(&cluster_id).map_err(|e| ApiError::internal(e.to_string()))?;
        let key = NodeKey::generate().map_err(|e| ApiError::internal(e.to_string()))?;
        let now = SystemTime::now();
        let identity = NodeIdentity {
            node_id: id,
            role: Role::Manager,
            cluster_id: cluster_id.clone(),
        };
        let csr = key.csr_pem().map_err(|e| ApiError::internal(e.to_string()))?;
        let cert = ca
            .issue(
                &csr,
                &identity,
                now - pki::backdate(Duration::from_secs(req.cert_expiry_secs)),
                now + Duration::from_secs(req.cert_expiry_secs),
            )
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let issued = ca
            .record(&cert, unix_now())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let tokens = JoinTokens {
            worker: JoinToken::generate(ca.digest()).to_text(),
            manager: JoinToken::generate(ca.digest()).to_text(),
        };
        let unlock = req.autolock.then(UnlockKey::generate);
        let dek = KeyStore::new(&self.opts.data_dir)
            .create(unlock.as_ref())
            .map_err(internal)?;
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
        let remote = rules::parse_remote_addr(&req.remote_addr)?;
        let listen = rules::parse_listen_addr(&req.listen_addr)?;
        let advertise = match &req.advertise_addr {
            Some(a) => Some(rules::parse_advertise_addr(a, listen.port())?),
            None if !listen.ip().is_unspecified() => Some(listen),
            None => None,
        };
        if let Some(a) = &req.data_path_addr {
            a.parse::<IpAddr>()
                .map_err(|_| ApiError::invalid(format!("invalid --data-path-addr {a:?}: expected an IP address")))?;
        }
        let key = NodeKey::generate().map_err(|e| ApiError::internal(e.to_string()))?;
        let call = JoinCall {
            token: req.token.clone(),
            csr_pem: key.csr_pem().map_err(|e| ApiError::internal(e.to_string()))?,
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
            let dek = KeyStore::new(&self.opts.data_dir).create(None).map_err(internal)?;
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
            other => internal(other),
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

fn restrict(dir: &Path) -> ApiResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))
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
pub struct Member {
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
        let listen: SocketAddr = rules::parse_listen_addr(&config.listen_addr)?;
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
            cgroup.as_ref().map(TaskCgroup::procs),
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
        .await
        .map_err(ApiError::internal)?;
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
        let old = crate::manager::raft::store::recover(&path, self.dek.clone())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let addr =
            old.nodes.get(&self.id).map(|n| n.addr.clone()).ok_or_else(|| {
                ApiError::precondition("--force-new-cluster: this node is not a member in its own store")
            })?;
        let state = old.forced_to_single_manager(self.id, unix_now());
        let kept = self.opts.data_dir.join(format!("raft.before-force-{}", unix_now()));
        std::fs::rename(&dir, &kept).map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
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

    fn self_origin(&self) -> Origin {
        let creds = self.creds.read_locked();
        Origin {
            identity: Some((self.id, creds.role)),
            operator: None,
            serial: creds.serial.clone(),
            ip: IpAddr::from([127, 0, 0, 1]),
        }
    }

    async fn cluster_request(&self, request: ClusterRequest) -> ApiResult<crate::api::messages::ClusterResponse> {
        if self.manager().is_none() {
            return Err(ApiError::precondition(
                "this node is not a swarm manager: worker nodes cannot view or change cluster state; run this on a manager, or promote this node (`meshctl node promote`)",
            ));
        }
        match self
            .route(self.self_origin(), PeerRequest::Cluster(request), false)
            .await
        {
            PeerResponse::Cluster(r) => r,
            PeerResponse::Refused(e) => Err(e),
            other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Serves a request here if this manager leads, else forwards it once to the leader.
    async fn route(&self, origin: Origin, request: PeerRequest, forwarded: bool) -> PeerResponse {
        let Some(manager) = self.manager() else {
            return PeerResponse::Refused(ApiError::unavailable("this node is not a manager"));
        };
        if manager.is_leader() {
            return serve_as_leader(&manager, origin, request).await;
        }
        if forwarded {
            return PeerResponse::Refused(ApiError::unavailable("this manager is no longer the leader; retry"));
        }
        // A manager still joining the Raft voters does not know the leader
        // from Raft yet; the heartbeat replies name it.
        let reported = || {
            let leader = (*self.reported_leader.locked())?;
            let config = self.config.locked();
            config
                .managers
                .iter()
                .find(|(id, _)| *id == leader && *id != self.id)
                .map(|(_, a)| a.clone())
        };
        // The leader takes forwarded requests only from voters: a manager
        // still catching up as a learner holds the request until it votes.
        let deadline = tokio::time::Instant::now() + VOTER_WAIT;
        while !manager.voters().contains(&self.id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(addr) = manager.leader_addr().or_else(reported) else {
            return PeerResponse::Refused(ApiError::unavailable(
                "no leader is elected: the swarm may have lost its quorum of managers; retry, or bring managers back",
            ));
        };
        let forward = PeerRequest::Forwarded {
            origin,
            request: Box::new(request),
        };
        match self.peers.call(&addr, forward, FORWARD_TIMEOUT).await {
            Ok(r) => r,
            Err(e) => PeerResponse::Refused(ApiError::unavailable(format!(
                "forwarding to the leader at {addr}: {e}"
            ))),
        }
    }

    /// Heartbeats to the managers; applies what they answer.
    async fn session(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut period = Duration::from_millis(1000);
        let mut warned = false;
        loop {
            match self.heartbeat_once().await {
                Ok(reply) => {
                    warned = false;
                    period = Duration::from_millis(reply.period_ms.max(100));
                    if let Err(e) = self.apply_heartbeat(reply).await {
                        log::warn!("applying the managers' answer: {e}");
                    }
                }
                Err(e) if !warned => {
                    let not_after = self.creds.read_locked().not_after;
                    if not_after < unix_now() {
                        log::error!(
                            "heartbeat: {e}; this node's certificate expired (unix time {not_after}) while it was away: \
                             run `meshctl swarm leave` here, `meshctl node rm` on a manager, and join again with a token"
                        );
                    } else {
                        log::warn!("heartbeat: {e}");
                    }
                    warned = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn heartbeat_once(&self) -> ApiResult<HeartbeatReply> {
        let hb = {
            let creds = self.creds.read_locked();
            let ca_digest = creds
                .roots
                .first()
                .and_then(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).ok())
                .map(|der| hex::encode(pki::cert_digest(&der)))
                .unwrap_or_default();
            Heartbeat {
                agent_version: crate::VERSION.into(),
                raft_ready: self.manager().is_some(),
                cert_not_after: creds.not_after,
                cert_not_before: creds.not_before,
                cert_role: creds.role,
                cert_ca_digest: ca_digest,
                wireguard_key: crate::api::assignment::tunnel::key_text(&self.overlays.public_key()),
            }
        };
        match self
            .call_managers(|| PeerRequest::Heartbeat(hb.clone()), Duration::from_secs(3), true)
            .await?
        {
            PeerResponse::Heartbeat(reply) => reply,
            other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Calls the managers: the one that last answered first, then the
    /// others. A manager's transport failure or refusal moves on to the
    /// next; `hint` records the one that answered (heartbeats keep it).
    async fn call_managers(
        &self,
        request: impl Fn() -> PeerRequest,
        timeout: Duration,
        hint: bool,
    ) -> ApiResult<PeerResponse> {
        let mut targets: Vec<String> = self.leader_hint.locked().iter().cloned().collect();
        targets.extend(self.config.locked().managers.iter().map(|(_, a)| a.clone()));
        let mut seen = std::collections::HashSet::new();
        targets.retain(|t| seen.insert(t.clone()));
        let mut last = ApiError::unavailable("no manager is known");
        for addr in targets {
            match self.peers.call(&addr, request(), timeout).await {
                Ok(reply) => {
                    if let Some(e) = reply.retry_elsewhere() {
                        last = e;
                        continue;
                    }
                    if hint {
                        *self.leader_hint.locked() = Some(addr);
                    }
                    return Ok(reply);
                }
                Err(e) => last = ApiError::unavailable(format!("{addr}: {e}")),
            }
        }
        if hint {
            *self.leader_hint.locked() = None;
        }
        Err(last)
    }

    /// Follows this node's assignments (a long poll) and applies them.
    async fn assignments_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut known = String::new();
        // The last answer, whole: its shared parts are named in the next
        // poll and put back into an answer that holds them back.
        let mut previous: Option<Assignments> = None;
        let mut warned = false;
        loop {
            let holds = previous.as_ref().map(parts::holds).unwrap_or_default();
            let request = || PeerRequest::Assignments {
                known: known.clone(),
                holds: holds.clone(),
            };
            let call = self.call_managers(request, ASSIGNMENTS_WAIT + Duration::from_secs(5), false);
            let reply = tokio::select! {
                r = call => r,
                _ = stop.changed() => return,
            };
            match reply {
                Ok(PeerResponse::Assignments(Ok(mut a))) => {
                    // The last answer is used up here, and replaced by this one below.
                    if let Err(e) = parts::restore(&mut a, previous.take()) {
                        // Ask again at once, naming nothing: the answer comes whole.
                        log::warn!("assignments: {e}; asking for them whole");
                        known.clear();
                        continue;
                    }
                    warned = false;
                    known = a.digest.clone();
                    *self.overlay_facts.locked() = metrics::overlay_facts(&a);
                    let started = std::time::Instant::now();
                    let overlays = self.overlays.apply(&a).await;
                    crate::metrics::record_reconcile("overlay", started, &overlays);
                    // The VIPs and published ports before the tasks: a new
                    // task's process connects at once, and a socket that
                    // connects before the socket programs serve its VIP
                    // keeps the VIP as its peer, which nothing answers.
                    let started = std::time::Instant::now();
                    // Tasks a previous agent left keep their backends.
                    self.tasks.adopt_addresses(&a.tasks).await;
                    let mesh = self.mesh.apply(&a).await;
                    crate::metrics::record_reconcile("mesh", started, &mesh);
                    if let Err(e) = &mesh {
                        log::warn!("routing mesh: {e}");
                    }
                    let started = std::time::Instant::now();
                    self.dns.apply(&a.services);
                    self.tasks.apply(&a.tasks, &a.retained);
                    crate::metrics::record_reconcile::<(), ()>("tasks", started, &Ok(()));
                    previous = Some(a);
                    if overlays.is_ok() && mesh.is_ok() {
                        continue;
                    }
                    // Ask again after the pause, whether or not anything changed.
                    known.clear();
                }
                Ok(other) if !warned => log::warn!("assignments: unexpected reply {other:?}"),
                Err(e) if !warned => log::warn!("assignments: {e}"),
                _ => {}
            }
            warned = true;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Sends task reports to the managers in order, batching what queued
    /// up meanwhile and retrying until they are stored.
    async fn report_loop(
        self: Arc<Self>,
        mut reports: mpsc::UnboundedReceiver<TaskReport>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut pending: Vec<TaskReport> = Vec::new();
        loop {
            if pending.is_empty() {
                tokio::select! {
                    r = reports.recv() => match r {
                        Some(r) => pending.push(r),
                        None => return,
                    },
                    _ = stop.changed() => return,
                }
            }
            while let Ok(r) = reports.try_recv() {
                pending.push(r);
            }
            let batch = || PeerRequest::ReportTasks(pending.clone());
            match self.call_managers(batch, Duration::from_secs(10), false).await {
                Ok(PeerResponse::Reported(Ok(()))) => {
                    pending.clear();
                    continue;
                }
                Ok(PeerResponse::Reported(Err(e))) if e.kind == ErrorKind::InvalidArgument => {
                    log::error!("the managers refused {} task reports: {e}", pending.len());
                    pending.clear();
                    continue;
                }
                Ok(other) => log::warn!("reporting tasks: unexpected reply {other:?}"),
                Err(e) => log::warn!("reporting tasks: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Whether the caller `identity` is a manager by what this node knows:
    /// its store on a manager, the managers its heartbeats name on a worker.
    fn check_manager_caller(&self, identity: Option<&NodeIdentity>, serial: &str) -> ApiResult<()> {
        let Some(i) = identity else {
            return Err(manager_only());
        };
        if let Some(m) = self.manager() {
            let caller = rules::Caller {
                id: i.node_id,
                certified: i.role,
                serial,
            };
            return rules::check_caller(&m.state(), caller, Role::Manager, unix_now());
        }
        let config = self.config.locked();
        if config.managers.iter().any(|(m, _)| *m == i.node_id) {
            Ok(())
        } else {
            Err(ApiError::denied(
                "the caller is not among the swarm's managers as this node knows them",
            ))
        }
    }

    /// Whether the caller may forward requests to this manager: a manager
    /// by the store, with its current certificate, and a Raft voter (a
    /// manager still joining the voters is told to retry).
    fn check_forwarder(&self, identity: Option<&NodeIdentity>, serial: &str) -> ApiResult<()> {
        self.check_manager_caller(identity, serial)?;
        let (Some(m), Some(i)) = (self.manager(), identity) else {
            return Err(ApiError::unavailable("this node runs no Raft store"));
        };
        if m.voters().contains(&i.node_id) {
            Ok(())
        } else {
            Err(ApiError::unavailable(format!(
                "manager {} is not a Raft voter (yet): only voters forward requests; retry in a moment",
                node_id_text(i.node_id)
            )))
        }
    }

    /// Reads log text of tasks kept on this node.
    fn read_logs(&self, query: &LogQuery) -> ApiResult<Vec<LogChunk>> {
        if query.tasks.len() > 1000 {
            return Err(ApiError::invalid("at most 1000 tasks per log query"));
        }
        query
            .tasks
            .iter()
            .map(|(task, from)| {
                let chunk = logs::read(&self.tasks.log_path(*task), *from, query.tail)
                    .map_err(|e| ApiError::internal(format!("reading task {}'s log: {e}", node_id_text(*task))))?;
                Ok(LogChunk {
                    task: *task,
                    text: chunk.text,
                    next: chunk.next,
                })
            })
            .collect()
    }

    /// `service logs`: finds the service's tasks and reads each one's log
    /// from its node, all nodes at once.
    async fn service_logs(
        &self,
        service: &str,
        cursors: &[(u64, u64)],
        tail: Option<usize>,
    ) -> ApiResult<Vec<(String, LogChunk)>> {
        let ClusterResponse::Tasks(tasks) = self
            .cluster_request(ClusterRequest::TaskList {
                service: service.to_string(),
            })
            .await?
        else {
            return Err(ApiError::internal("unexpected reply to a task list"));
        };
        let ClusterResponse::Nodes(nodes) = self.cluster_request(ClusterRequest::NodeList).await? else {
            return Err(ApiError::internal("unexpected reply to a node list"));
        };
        let addr_of: BTreeMap<NodeId, String> = nodes.iter().map(|n| (n.node.id, n.node.addr.clone())).collect();
        let cursor: BTreeMap<u64, u64> = cursors.iter().copied().collect();
        let mut by_node: BTreeMap<NodeId, Vec<(u64, Option<u64>)>> = BTreeMap::new();
        let mut labels: BTreeMap<u64, String> = BTreeMap::new();
        for t in &tasks {
            let Some(node) = t.task.node else { continue };
            by_node
                .entry(node)
                .or_default()
                .push((t.task.id, cursor.get(&t.task.id).copied()));
            labels.insert(
                t.task.id,
                format!(
                    "{}.{}.{}@{}",
                    t.service_name,
                    if t.task.slot == 0 {
                        node_id_text(node)
                    } else {
                        t.task.slot.to_string()
                    },
                    node_id_text(t.task.id),
                    t.node_hostname.as_deref().unwrap_or("?")
                ),
            );
        }
        let calls = by_node.into_iter().filter_map(|(node, tasks)| {
            let addr = addr_of.get(&node)?.clone();
            let query = PeerRequest::ReadLogs(LogQuery { tasks, tail });
            Some(async move {
                let reply = self.peers.call_node(node, &addr, query, Duration::from_secs(10)).await;
                (addr, reply)
            })
        });
        let mut out = Vec::new();
        for (addr, reply) in futures::future::join_all(calls).await {
            match reply {
                Ok(PeerResponse::Logs(Ok(chunks))) => {
                    for c in chunks {
                        let label = labels.get(&c.task).cloned().unwrap_or_default();
                        out.push((label, c));
                    }
                }
                Ok(PeerResponse::Logs(Err(e)) | PeerResponse::Refused(e)) => {
                    log::warn!("logs from {addr}: {e}");
                }
                Ok(other) => log::warn!("logs from {addr}: unexpected reply {other:?}"),
                Err(e) => log::warn!("logs from {addr}: {e}"),
            }
        }
        Ok(out)
    }

    async fn apply_heartbeat(&self, reply: HeartbeatReply) -> ApiResult<()> {
        *self.reported_leader.locked() = reply.leader;
        {
            let mut config = self.config.locked();
            if config.managers != reply.managers && !reply.managers.is_empty() {
                config.managers = reply.managers.clone();
                self.files().write_config(&config)?;
            }
        }
        if reply.renew_certificate {
            self.renew_certificate().await?;
        }
        self.follow_roots(&reply.ca_pems)?;
        let role = self.creds.read_locked().role;
        match (role, self.manager().is_some()) {
            (Role::Manager, false) => {
                log::info!("promoted: starting the Raft store");
                self.start_manager().await?;
            }
            (Role::Worker, true) => {
                log::info!("demoted: stopping the Raft store and removing it");
                self.stop_manager().await;
            }
            _ => {}
        }
        if self.manager().is_some() {
            let keys = KeyStore::new(&self.opts.data_dir);
            match reply.unlock_key.as_ref().map(|k| UnlockKey::parse(k.expose())) {
                Some(Ok(key)) if keys.unlock(&key).is_err() => {
                    keys.wrap_with(&self.dek, Some(&key)).map_err(internal)?;
                    log::info!("autolock: the data key is now wrapped by the swarm's unlock key");
                }
                None if keys.is_autolocked() => {
                    keys.wrap_with(&self.dek, None).map_err(internal)?;
                    log::info!("autolock turned off for this manager");
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn renew_certificate(&self) -> ApiResult<()> {
        let key = NodeKey::generate().map_err(|e| ApiError::internal(e.to_string()))?;
        let csr = key.csr_pem().map_err(|e| ApiError::internal(e.to_string()))?;
        let addr = self
            .leader_hint
            .locked()
            .clone()
            .ok_or_else(|| ApiError::unavailable("no manager reachable"))?;
        let (cert, roots) = match self
            .peers
            .call(
                &addr,
                PeerRequest::RenewCertificate { csr_pem: csr },
                Duration::from_secs(10),
            )
            .await
        {
            Ok(PeerResponse::Certificate(r)) => r?,
            Ok(PeerResponse::Refused(e)) => return Err(e),
            Ok(other) => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            Err(e) => return Err(ApiError::unavailable(e.to_string())),
        };
        let creds = Credentials::new(cert, key.key_pem(), roots)?;
        log::info!(
            "certificate renewed: role {:?}, valid until {}",
            creds.role,
            creds.not_after
        );
        self.install_credentials(creds)
    }

    /// Trusts the roots the managers name (current first): a rotation's
    /// new root before this node's certificate comes from it, and no
    /// longer the previous one once the rotation ends.
    fn follow_roots(&self, roots: &[String]) -> ApiResult<()> {
        let creds = {
            let creds = self.creds.read_locked();
            if roots.is_empty() || creds.roots == roots {
                return Ok(());
            }
            Credentials::new(creds.cert_pem.clone(), creds.key_pem.clone(), roots.to_vec())?
        };
        log::info!("trusted roots changed: {} root(s) now", roots.len());
        self.install_credentials(creds)
    }

    /// Stores `creds` and serves and calls with them from now on.
    fn install_credentials(&self, creds: Credentials) -> ApiResult<()> {
        self.files().write_credentials(&creds, &self.dek)?;
        let server = creds.server_config()?;
        let client = creds.client_config()?;
        *self.creds.write_locked() = creds;
        self.peers.set_tls(client);
        let _ = self.server_tls.send(server);
        Ok(())
    }
}

async fn serve_as_leader(manager: &Manager, origin: Origin, request: PeerRequest) -> PeerResponse {
    // Who the caller is comes from its certificate (or the forwarding
    // manager's word for it); what it may do comes from the store.
    let state = manager.state();
    let now = unix_now();
    let member = |needs| match origin.identity {
        Some((id, certified)) => {
            let caller = rules::Caller {
                id,
                certified,
                serial: &origin.serial,
            };
            rules::check_caller(&state, caller, needs, now).map(|()| id)
        }
        None => Err(no_certificate()),
    };
    match request {
        PeerRequest::Join(call) => PeerResponse::Join(manager.handle_join(call, origin.ip).await),
        PeerRequest::Heartbeat(hb) => match member(Role::Worker) {
            Ok(id) => PeerResponse::Heartbeat(manager.handle_heartbeat(id, &origin.serial, hb).await),
            Err(e) => PeerResponse::Refused(e),
        },
        PeerRequest::Assignments { known, holds } => match member(Role::Worker) {
            Ok(id) => PeerResponse::Assignments(manager.handle_assignments(id, &known, &holds).await),
            Err(e) => PeerResponse::Refused(e),
        },
        PeerRequest::Leave => match member(Role::Worker) {
            Ok(id) => PeerResponse::Reported(manager.handle_leave(id).await),
            Err(e) => PeerResponse::Refused(e),
        },
        PeerRequest::ReportTasks(reports) => match member(Role::Worker) {
            Ok(id) => PeerResponse::Reported(manager.handle_report(id, reports).await),
            Err(e) => PeerResponse::Refused(e),
        },
        PeerRequest::RenewCertificate { csr_pem } => match member(Role::Worker) {
            Ok(id) => PeerResponse::Certificate(manager.handle_renew(id, &csr_pem).await),
            Err(e) => PeerResponse::Refused(e),
        },
        PeerRequest::Cluster(req) => match (origin.identity, &origin.operator) {
            (None, Some(name)) => match rules::check_operator(&state, name, &origin.serial, now) {
                Ok(()) => PeerResponse::Cluster(manager.handle_cluster(req).await),
                Err(e) => PeerResponse::Refused(e),
            },
            (Some(_), _) => match member(Role::Manager) {
                Ok(_) => PeerResponse::Cluster(manager.handle_cluster(req).await),
                Err(e) => PeerResponse::Refused(e),
            },
            (None, None) => PeerResponse::Refused(manager_only()),
        },
        other => PeerResponse::Refused(ApiError::invalid(format!("{} cannot be forwarded", kind(&other)))),
    }
}

fn kind(request: &PeerRequest) -> &'static str {
    match request {
        PeerRequest::AppendEntries(_) => "AppendEntries",
        PeerRequest::Vote(_) => "Vote",
        PeerRequest::InstallSnapshot(_) => "InstallSnapshot",
        PeerRequest::Join(_) => "Join",
        PeerRequest::Heartbeat(_) => "Heartbeat",
        PeerRequest::RenewCertificate { .. } => "RenewCertificate",
        PeerRequest::Cluster(_) => "Cluster",
        PeerRequest::Forwarded { .. } => "Forwarded",
        PeerRequest::Assignments { .. } => "Assignments",
        PeerRequest::ReportTasks(_) => "ReportTasks",
        PeerRequest::Leave => "Leave",
        PeerRequest::ReadLogs(_) => "ReadLogs",
    }
}

fn no_certificate() -> ApiError {
    ApiError::denied("this call needs a node certificate of this swarm")
}

fn manager_only() -> ApiError {
    ApiError::denied("this call is reserved to managers; the caller's certificate is not a manager's")
}

/// Serves node-to-node requests for a [`Member`].
struct PeerHandler {
    member: Weak<Member>,
}

impl Handler for PeerHandler {
    type Request = PeerRequest;
    type Response = PeerResponse;

    async fn handle(&self, peer: Peer, request: PeerRequest) -> PeerResponse {
        let Some(member) = self.member.upgrade() else {
            return PeerResponse::Refused(ApiError::unavailable("this node is leaving the swarm"));
        };
        let cluster_id = member.config.locked().cluster_id.clone();
        let identity = tls::peer_identity(&peer.certs).filter(|i| i.cluster_id == cluster_id);
        let operator = tls::peer_operator(&peer.certs)
            .filter(|(_, c)| *c == cluster_id)
            .map(|(name, _)| name);
        if !peer.certs.is_empty() && identity.is_none() && operator.is_none() {
            return PeerResponse::Refused(ApiError::denied("the caller's certificate is not of this swarm"));
        }
        let is_manager = identity.as_ref().is_some_and(|i| i.role == Role::Manager);
        let serial = peer.certs.first().and_then(|c| pki::serial_of(c)).unwrap_or_default();
        let origin = Origin {
            identity: identity.as_ref().map(|i| (i.node_id, i.role)),
            operator: operator.clone(),
            serial: serial.clone(),
            ip: peer.addr.ip(),
        };
        match request {
            PeerRequest::AppendEntries(_) | PeerRequest::Vote(_) | PeerRequest::InstallSnapshot(_) if !is_manager => {
                PeerResponse::Refused(manager_only())
            }
            PeerRequest::AppendEntries(_) | PeerRequest::Vote(_) | PeerRequest::InstallSnapshot(_)
                if !member
                    .manager()
                    .is_some_and(|m| m.admits_raft_peer(origin.identity.map(|i| i.0))) =>
            {
                // A manager left out of this store's membership (demoted,
                // removed, or from before --force-new-cluster) must not
                // disturb it with its old terms.
                PeerResponse::Refused(ApiError::denied("the caller is not a member of this Raft store"))
            }
            PeerRequest::AppendEntries(rpc) => match member.manager() {
                Some(m) => PeerResponse::AppendEntries(m.raft.append_entries(rpc).await),
                None => PeerResponse::Refused(ApiError::unavailable("this node runs no Raft store")),
            },
            PeerRequest::Vote(rpc) => match member.manager() {
                Some(m) => PeerResponse::Vote(m.raft.vote(rpc).await),
                None => PeerResponse::Refused(ApiError::unavailable("this node runs no Raft store")),
            },
            PeerRequest::InstallSnapshot(rpc) => match member.manager() {
                Some(m) => PeerResponse::InstallSnapshot(m.raft.install_snapshot(rpc).await),
                None => PeerResponse::Refused(ApiError::unavailable("this node runs no Raft store")),
            },
            // Only a current Raft voter forwards (a removed or demoted
            // manager's certificate does not), and only what it
            // authenticated itself; the leader judges the origin against
            // the store again.
            PeerRequest::Forwarded {
                origin: claimed,
                request,
            } if is_manager => match member.check_forwarder(identity.as_ref(), &serial) {
                Ok(()) => member.route(claimed, *request, true).await,
                Err(e) => PeerResponse::Refused(e),
            },
            PeerRequest::Cluster(_) if operator.is_some() => member.route(origin, request, false).await,
            PeerRequest::Forwarded { .. } | PeerRequest::Cluster(_) if !is_manager => {
                PeerResponse::Refused(manager_only())
            }
            PeerRequest::Heartbeat(_)
            | PeerRequest::RenewCertificate { .. }
            | PeerRequest::Assignments { .. }
            | PeerRequest::ReportTasks(_)
            | PeerRequest::Leave
                if identity.is_none() =>
            {
                PeerResponse::Refused(no_certificate())
            }
            // Served here, by the node that keeps the logs, to a manager by
            // the store (or, on a worker, by the managers its heartbeats name).
            PeerRequest::ReadLogs(query) if is_manager => match member.check_manager_caller(identity.as_ref(), &serial)
            {
                Ok(()) => PeerResponse::Logs(member.read_logs(&query)),
                Err(e) => PeerResponse::Refused(e),
            },
            PeerRequest::ReadLogs(_) => PeerResponse::Refused(manager_only()),
            request => member.route(origin, request, false).await,
        }
    }
}
