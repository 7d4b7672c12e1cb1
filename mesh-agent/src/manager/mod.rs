//! A manager: its Raft instance over the encrypted store, and the duties of
//! the leader (admitting nodes, issuing certificates, tracking liveness,
//! keeping Raft membership in line with the roles the operator asked for,
//! and serving the cluster API).
//!
//! Requests reach this module already authenticated and, when this manager
//! is not the leader, are forwarded by `node` before they get here.
//!
//! - [`raft`]: the Raft log and state machine on redb, every value sealed
//!   ([`raft::store`]), and Raft's network over the peers' RPC clients.
//! - [`state`]: applying a committed command to the replicated state (pure).
//! - `controlapi`: the cluster API, one file per resource; [`rules`]: the
//!   naming, quorum, identity and address checks it makes before proposing (pure).
//! - [`scheduler`]: task placement and reconciliation (pure).
//! - [`orchestrator`]: restarts, rolling updates and the scheduler's input (pure).
//! - [`allocator`]: overlay subnets, VNIs and task addresses; each node's
//!   tunnel and IPsec assignment (pure).
//! - [`dispatcher`]: node liveness from heartbeats, and what each node is
//!   told: its tasks, routing mesh and service discovery (pure).
//! - [`visualizer`]: what the swarm visualizer page draws, from the store (pure).
//! - [`error`]: what fails in the manager itself (store, Raft), apart from refusals.

pub mod allocator;
mod controlapi;
pub(crate) mod dispatcher;
pub(crate) mod error;
pub mod orchestrator;
pub(crate) mod raft;
pub mod rules;
pub(crate) mod scheduler;
pub mod state;
pub(crate) mod visualizer;

use crate::locks::Locked;
use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::api::clock::{unix_now, unix_now_ms};
use error::ManagerError;
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use rand::Rng;

use crate::api::{messages::PartDigest, parts};

use crate::api::{
    cert_records::NodeCerts,
    error::{ApiError, ApiResult},
    messages::{
        Assignments, ClusterRequest, ClusterResponse, Endpoint, Heartbeat, HeartbeatReply, JoinCall, JoinReply,
        NetworkView, NodeView, OperatorCertView, ServiceView, TaskView,
    },
    raft_types::TypeConfig,
    secret,
    secret_text::SecretText,
    service::{DesiredState, Service, ServiceMode, Task, TaskReport, TaskState},
};

use crate::{
    ca::{
        pki::{self, NodeIdentity, RootCa},
        seal::{DataKey, UnlockKey},
        token::JoinToken,
    },
    manager::{
        dispatcher::{down_after, propagation::Propagation, Liveness},
        raft::{
            network::{Peers, RaftNet},
            store::{self, StateMachineStore},
        },
    },
};

use crate::api::{
    objects::{node_id_text, Availability, CaState, JoinTokens, Node, NodeId, NodeStatus, Role},
    store::{ClusterState, Command, CommandResponse},
};

/// How long a write may wait for its commit before the caller hears
/// "unavailable".
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Raft timing, configurable per agent.
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    /// Leader heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout (ms); the upper bound is twice this.
    pub election_timeout_ms: u64,
    /// Log entries between snapshots.
    pub snapshot_interval: u64,
}

/// One manager's Raft and leader state.
pub(crate) struct Manager {
    /// This node.
    pub(crate) id: NodeId,
    /// The Raft instance.
    pub(crate) raft: Raft<TypeConfig>,
    sm: StateMachineStore,
    liveness: Mutex<Liveness>,
    raft_ready: Mutex<BTreeSet<NodeId>>,
    stop: tokio::sync::watch::Sender<bool>,
    /// What the long polls answer from: renewed at most once per
    /// [`dispatcher::ASSIGNMENTS_BATCH`].
    dispatch: Mutex<Option<Arc<dispatcher::DispatchView>>>,
    /// What each node has applied, so starting tasks wait for their peers.
    propagation: Mutex<Propagation>,
    /// When each node's facts were last written from its heartbeats.
    fact_writes: Mutex<dispatcher::FactWrites>,
}

/// How long an assignments long poll waits for a change (below the
/// forwarding timeout, so a poll through a follower never times out).
pub(crate) const ASSIGNMENTS_WAIT: Duration = Duration::from_secs(5);

/// How often a long poll whose node has a task waiting for its peers
/// looks again whether they have learnt its endpoint.
const PEERS_RECHECK: Duration = Duration::from_millis(25);

/// Task reports accepted in one call.
const MAX_REPORTS: usize = 10_000;

impl Manager {
    /// Opens (or creates) the store under `<data_dir>/raft` and starts Raft.
    pub(crate) async fn start(
        id: NodeId,
        data_dir: &Path,
        dek: DataKey,
        peers: Arc<Peers>,
        timing: RaftTiming,
    ) -> Result<Arc<Self>, ManagerError> {
        let dir = data_dir.join("raft");
        std::fs::create_dir_all(&dir).map_err(|source| ManagerError::Io {
            path: dir.clone(),
            source,
        })?;
        let (log, sm) = store::open(&dir.join("raft.redb"), dek)?;
        let config = openraft::Config {
            cluster_name: "mesh".into(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_timeout_ms,
            election_timeout_max: timing.election_timeout_ms * 2,
            install_snapshot_timeout: 5_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timing.snapshot_interval),
            max_in_snapshot_log_to_keep: timing.snapshot_interval / 2,
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ManagerError::Timing(e.to_string()))?;
        let raft = Raft::new(id, Arc::new(config), RaftNet { peers }, log, sm.clone())
            .await
            .map_err(|e| ManagerError::Raft(e.to_string()))?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let manager = Arc::new(Manager {
            id,
            raft,
            sm,
            liveness: Mutex::new(Liveness::default()),
            dispatch: Mutex::new(None),
            propagation: Mutex::new(Propagation::default()),
            fact_writes: Mutex::new(dispatcher::FactWrites::default()),
            raft_ready: Mutex::new(BTreeSet::new()),
            stop,
        });
        tokio::spawn(count_elections(manager.raft.metrics(), stop_rx.clone()));
        tokio::spawn(exit_when_the_core_fails(manager.raft.metrics(), stop_rx.clone()));
        tokio::spawn(manager.clone().membership_loop(stop_rx.clone()));
        tokio::spawn(manager.clone().leader_loop(stop_rx));
        Ok(manager)
    }

    /// Makes this node a single-voter cluster and commits `init`.
    pub(crate) async fn bootstrap(&self, addr: &str, init: Command) -> ApiResult<()> {
        let members = [(self.id, BasicNode::new(addr))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ApiError::internal(format!("initialising Raft: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.raft.current_leader().await != Some(self.id) {
            if Instant::now() > deadline {
                return Err(ApiError::internal(
                    "this node did not become the leader of its own new cluster",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.propose(init).await
    }

    /// Stops Raft and the leader loop.
    pub(crate) async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.raft.shutdown().await {
            log::warn!("raft shutdown: {e}");
        }
    }

    /// The replicated state as applied here.
    pub(crate) fn state(&self) -> Arc<ClusterState> {
        self.sm.state()
    }

    /// The current leader, as this manager knows it.
    pub(crate) fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this manager leads.
    pub(crate) fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The leader's address, from the Raft membership.
    pub(crate) fn leader_addr(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// This manager's Raft status.
    pub(crate) fn raft_info(&self) -> crate::api::messages::RaftInfo {
        let m = self.raft.metrics().borrow().clone();
        crate::api::messages::RaftInfo {
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
            snapshot_bytes: self.sm.snapshot_bytes(),
        }
    }

    /// Whether Raft messages from `caller` are accepted: a store that knows
    /// its membership only hears its voters (only a leader or a candidate
    /// sends, and both are voters; a learner never does); a new one,
    /// waiting to be added, hears any manager.
    pub(crate) fn admits_raft_peer(&self, caller: Option<NodeId>) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if membership.nodes().next().is_none() {
            return true;
        }
        caller.is_some_and(|c| membership.voter_ids().any(|id| id == c))
    }

    /// The Raft voters.
    pub(crate) fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Proposes a command and waits until it is committed and applied here.
    pub(crate) async fn propose(&self, command: Command) -> ApiResult<()> {
        // Fail fast when this leader has not heard from a quorum lately: the
        // write would only wait for managers that are gone.
        let (quorum_ack, lease) = {
            let m = self.raft.metrics().borrow().clone();
            (m.millis_since_quorum_ack, self.raft.config().election_timeout_max)
        };
        if self.is_leader() && quorum_ack.is_some_and(|ms| ms > 2 * lease) {
            return Err(ApiError::unavailable(
                "this leader has not heard from a quorum of managers: the swarm has lost its quorum; bring managers back (or, if they are gone for good, see `mesh-agent run --force-new-cluster`)",
            ));
        }
        let started = std::time::Instant::now();
        let written = tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(command)).await.map_err(|_| {
            ApiError::unavailable(format!(
                "the write was not committed within {PROPOSE_TIMEOUT:?}: a quorum of managers may be unreachable (it may still commit if they return)"
            ))
        })?;
        crate::metrics::instruments()
            .proposal_seconds
            .observe(started.elapsed().as_secs_f64());
        match written {
            Ok(resp) => match resp.data {
                CommandResponse::Applied => Ok(()),
                CommandResponse::Refused(reason) => Err(ApiError::precondition(reason)),
            },
            Err(openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(_))) => Err(
                ApiError::unavailable("this manager lost the leadership while handling the request; retry"),
            ),
            Err(e) => Err(ApiError::unavailable(format!("the write was not committed: {e}"))),
        }
    }

    fn reachable(&self, state: &ClusterState) -> BTreeSet<NodeId> {
        let now = Instant::now();
        let timeout = down_after(state);
        let liveness = self.liveness.locked();
        self.voters()
            .into_iter()
            .filter(|id| *id == self.id || liveness.is_alive(*id, now, timeout))
            .collect()
    }

    fn view(&self, node: &Node, voters: &BTreeSet<NodeId>, reachable: &BTreeSet<NodeId>) -> NodeView {
        let manager_status = if voters.contains(&node.id) {
            Some(if Some(node.id) == self.leader() {
                "Leader"
            } else if reachable.contains(&node.id) {
                "Reachable"
            } else {
                "Unreachable"
            })
        } else if node.role == Role::Manager {
            Some("Joining")
        } else {
            None
        };
        NodeView {
            node: node.clone(),
            manager_status: manager_status.map(str::to_string),
        }
    }

    /// Serves a cluster API request (leader only).
    pub(crate) async fn handle_cluster(&self, request: ClusterRequest) -> ApiResult<ClusterResponse> {
        // Reads must not come from a leader that was deposed without knowing
        // it; writes need no such check, their commit proves the leadership.
        let read_only = matches!(
            request,
            ClusterRequest::NodeList
                | ClusterRequest::NodeInspect { .. }
                | ClusterRequest::JoinToken { rotate: false, .. }
                | ClusterRequest::UnlockKey { rotate: false }
        );
        if read_only {
            self.raft
                .ensure_linearizable()
                .await
                .map_err(|e| ApiError::unavailable(format!("this manager cannot confirm it leads a quorum: {e}")))?;
        }
        let state = self.state();
        let voters = self.voters();
        match request {
            ClusterRequest::NodeList => self.node_list(&state, &voters).await,
            ClusterRequest::NodeInspect { node } => self.node_inspect(&state, &voters, node).await,
            ClusterRequest::NodeUpdate { node, update } => self.node_update(&state, &voters, node, update).await,
            ClusterRequest::NodeRemove { node, force } => self.node_remove(&state, &voters, node, force).await,
            ClusterRequest::JoinToken { role, rotate } => self.join_token(&state, role, rotate).await,
            ClusterRequest::UnlockKey { rotate } => self.unlock_key(&state, rotate).await,
            ClusterRequest::SetAutolock { enabled } => self.set_autolock(&state, enabled).await,
            ClusterRequest::SetTaskHistoryLimit { limit } => self.set_task_history_limit(limit).await,
            ClusterRequest::IssueOperatorCert {
                name,
                csr_pem,
                validity_secs,
            } => self.issue_operator_cert(&state, name, csr_pem, validity_secs).await,
            ClusterRequest::ServiceCreate { spec } => self.service_create(&state, spec).await,
            ClusterRequest::NetworkCreate { spec } => self.network_create(&state, spec).await,
            ClusterRequest::NetworkList => self.network_list(&state).await,
            ClusterRequest::NetworkInspect { network } => self.network_inspect(&state, network).await,
            ClusterRequest::NetworkRemove { network } => self.network_remove(&state, network).await,
            ClusterRequest::BlobCreate {
                kind,
                name,
                labels,
                data,
            } => self.blob_create(&state, kind, name, labels, data).await,
            ClusterRequest::BlobList { kind } => self.blob_list(&state, kind).await,
            ClusterRequest::BlobInspect { kind, name } => self.blob_inspect(&state, kind, name).await,
            ClusterRequest::BlobRemove { kind, name } => self.blob_remove(&state, kind, name).await,
            ClusterRequest::ServiceList => self.service_list(&state).await,
            ClusterRequest::ServiceInspect { service } => self.service_inspect(&state, service).await,
            ClusterRequest::ServiceUpdate { service, update } => self.service_update(&state, service, update).await,
            ClusterRequest::ServiceRollback { service } => self.service_rollback(&state, service).await,
            ClusterRequest::ServiceRemove { service } => self.service_remove(&state, service).await,
            ClusterRequest::ServiceScale { service, replicas } => self.service_scale(&state, service, replicas).await,
            ClusterRequest::TaskList { service } => self.task_list(&state, service).await,
            ClusterRequest::CaInspect => self.ca_inspect(&state).await,
            ClusterRequest::OperatorCertList => self.operator_cert_list(&state).await,
            ClusterRequest::OperatorCertRemove { name } => self.operator_cert_remove(&state, name).await,
            ClusterRequest::CaRotate { previous_root_ttl_secs } => self.ca_rotate(&state, previous_root_ttl_secs).await,
        }
    }

    /// Admits a node that presented a join token (leader only).
    pub(crate) async fn handle_join(&self, call: JoinCall, caller_ip: std::net::IpAddr) -> ApiResult<JoinReply> {
        let state = self.state();
        let presented = JoinToken::parse(&call.token).map_err(|e| ApiError::invalid(e.to_string()))?;
        let ca = current_ca(&state)?;
        if presented.ca_digest() != ca.digest() {
            return Err(ApiError::denied(
                "the join token belongs to another swarm (its CA digest is not this swarm's); get a token with `meshctl swarm join-token worker` on a manager of the swarm you want to join",
            ));
        }
        let role = if presented.secret_matches(&state.tokens.manager) {
            Role::Manager
        } else if presented.secret_matches(&state.tokens.worker) {
            Role::Worker
        } else {
            return Err(ApiError::denied(
                "invalid join token: it is not this swarm's current worker or manager token (was it rotated? `meshctl swarm join-token worker` on a manager prints the current one)",
            ));
        };
        if call.agent_version.len() > 64 {
            return Err(ApiError::invalid(
                "the joining node reported an agent version longer than 64 bytes",
            ));
        }
        if call.hostname.is_empty() || call.hostname.len() > 253 {
            return Err(ApiError::invalid("the joining node sent an empty or overlong hostname"));
        }
        let advertise = match &call.advertise_addr {
            Some(a) => crate::api::addr::parse_advertise_addr(a, call.listen_port)?,
            None => std::net::SocketAddr::new(caller_ip, call.listen_port),
        };
        let data_path_addr = match &call.data_path_addr {
            Some(a) => a
                .parse::<std::net::IpAddr>()
                .map_err(|_| ApiError::invalid(format!("invalid data path address {a:?}")))?
                .to_string(),
            None => advertise.ip().to_string(),
        };
        rules::check_join_addresses(&state, &advertise, &data_path_addr)?;
        let cluster = state
            .cluster
            .clone()
            .ok_or_else(|| ApiError::internal("the cluster is not initialised"))?;
        let id = loop {
            let id: NodeId = rand::thread_rng().gen();
            if !state.nodes.contains_key(&id) && !state.removed.contains(&id) && id != 0 {
                break id;
            }
        };
        let cert_pem = issue(&ca, &call.csr_pem, id, role, &cluster.id, cluster.cert_expiry_secs)?;
        let now = unix_now();
        let issued = ca
            .record(&cert_pem, now)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let node = Node {
            id,
            hostname: call.hostname.clone(),
            role,
            availability: Availability::Active,
            labels: Default::default(),
            addr: advertise.to_string(),
            data_path_addr,
            status: NodeStatus::Unknown,
            status_message: String::new(),
            agent_version: call.agent_version.clone(),
            wireguard_key: String::new(),
            resources: Default::default(),
            certs: NodeCerts::first(issued),
            created_at: now,
            updated_at: now,
        };
        self.liveness.locked().seen(id, Instant::now());
        self.propose(Command::AddNode(node)).await?;
        let state = self.state();
        Ok(JoinReply {
            node_id: id,
            role,
            cluster_id: cluster.id,
            cert_pem: with_cross_signed(cert_pem, &state),
            ca_pems: roots(&state),
            managers: managers(&state),
            heartbeat_period_ms: cluster.heartbeat_period_ms,
        })
    }

    /// The role a node's certificate should carry now: a demoted node keeps
    /// its manager certificate until it has left the Raft voters.
    fn issued_role(&self, state: &ClusterState, id: NodeId) -> Role {
        let wanted = state.nodes.get(&id).map(|n| n.role);
        if wanted == Some(Role::Manager) || self.voters().contains(&id) {
            Role::Manager
        } else {
            Role::Worker
        }
    }

    /// The long poll behind a node's assignments: answers when they differ
    /// from `known`, or after [`ASSIGNMENTS_WAIT`], without the shared
    /// parts the node `holds` (`api::parts`). `known` is also what the
    /// node has applied (`dispatcher::propagation`).
    pub(crate) async fn handle_assignments(
        &self,
        id: NodeId,
        known: &str,
        holds: &[PartDigest],
    ) -> ApiResult<Assignments> {
        self.propagation.locked().polled(id, known);
        let (mut answer, view) = self.assignments_after(id, known).await?;
        self.propagation.locked().answered(id, &answer.digest, view);
        parts::hold_back(&mut answer, holds);
        Ok(answer)
    }

    /// Node `id`'s assignments once they differ from `known`, or after
    /// [`ASSIGNMENTS_WAIT`], and the number of the view they come from.
    /// While one of its tasks waits for its peers to learn its endpoint,
    /// the poll looks again every [`PEERS_RECHECK`], so the node hears as
    /// soon as they have ([`Self::while_peers_learn`]).
    async fn assignments_after(&self, id: NodeId, known: &str) -> ApiResult<(Assignments, u64)> {
        let mut applied = self.sm.subscribe();
        let deadline = tokio::time::Instant::now() + ASSIGNMENTS_WAIT;
        // A node this leader never answered is answered at once: what it
        // has applied is known only from its next poll.
        let answered = self.propagation.locked().has_answered(id);
        loop {
            let seen = *applied.borrow_and_update();
            let view = self.dispatch_view(seen);
            if !self.state().nodes.contains_key(&id) {
                return Err(ApiError::not_found(format!(
                    "node {} is not a member of this swarm",
                    node_id_text(id)
                )));
            }
            let current = {
                let mut propagation = self.propagation.locked();
                let now = std::time::Instant::now();
                dispatcher::assignments_with(&view.state, &view.index, id, &mut |task| {
                    propagation.pending(task, &view.state, &view.index, view.seq, now)
                })
            };
            if current.digest != known || !self.is_leader() || !answered {
                return Ok((current, view.seq));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok((current, view.seq));
            }
            let waiting: Vec<u64> = current
                .tasks
                .iter()
                .filter(|t| t.endpoints_pending > 0)
                .map(|t| t.task)
                .collect();
            if !waiting.is_empty() {
                if !self.while_peers_learn(&view, &waiting, &mut applied, deadline).await {
                    return Ok((current, view.seq));
                }
                continue;
            }
            // Wait for a change, then for the batch it falls in to end: a
            // view already behind what was applied is renewed when its
            // batch ends, without waiting for another change.
            let behind = view.applied < seen;
            let next = tokio::time::Instant::from_std(view.next_at());
            let seq = view.seq;
            drop(view);
            if !behind {
                match tokio::time::timeout_at(deadline, applied.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return Ok((current, seq)),
                }
            }
            tokio::time::sleep_until(next.min(deadline)).await;
        }
    }

    /// Waits while the `waiting` tasks of `view` wait for their peers,
    /// looking every [`PEERS_RECHECK`] without making the whole answer;
    /// returns once one stops waiting, a renewed view is due (the state
    /// moved on and `view`'s batch is over) or `deadline` passes. `false`
    /// when the store is gone.
    async fn while_peers_learn(
        &self,
        view: &dispatcher::DispatchView,
        waiting: &[u64],
        applied: &mut tokio::sync::watch::Receiver<u64>,
        deadline: tokio::time::Instant,
    ) -> bool {
        while tokio::time::Instant::now() < deadline {
            if view.applied < *applied.borrow() {
                let next = tokio::time::Instant::from_std(view.next_at());
                tokio::time::sleep_until(next.min(deadline)).await;
                return true;
            }
            let recheck = (tokio::time::Instant::now() + PEERS_RECHECK).min(deadline);
            match tokio::time::timeout_at(recheck, applied.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return false,
                Err(_) => {}
            }
            let mut propagation = self.propagation.locked();
            let now = std::time::Instant::now();
            let still = waiting.iter().all(|id| {
                view.state
                    .tasks
                    .get(id)
                    .is_some_and(|t| propagation.pending(t, &view.state, &view.index, view.seq, now) > 0)
            });
            if !still {
                return true;
            }
        }
        true
    }

    /// The view the long polls answer from: the cached one, unless it is
    /// behind `applied` and its batch is over.
    fn dispatch_view(&self, applied: u64) -> Arc<dispatcher::DispatchView> {
        let mut cached = self.dispatch.locked();
        let now = std::time::Instant::now();
        match &*cached {
            Some(view) if !view.is_due_for_renewal(applied, now) => view.clone(),
            previous => {
                let seq = previous.as_ref().map_or(1, |v| v.seq + 1);
                let view = Arc::new(dispatcher::DispatchView::new(self.state(), applied, seq, now));
                self.propagation.locked().view_made(&view.state, seq);
                *cached = Some(view.clone());
                view
            }
        }
    }

    /// Stores a node's reports on its tasks.
    pub(crate) async fn handle_report(&self, id: NodeId, reports: Vec<TaskReport>) -> ApiResult<()> {
        if reports.len() > MAX_REPORTS {
            return Err(ApiError::invalid(format!(
                "{} task reports in one call; at most {MAX_REPORTS}",
                reports.len()
            )));
        }
        if reports.iter().any(|r| r.message.len() > 4096) {
            return Err(ApiError::invalid("a task report's message is longer than 4096 bytes"));
        }
        // Only what moves one of its tasks, once per task; nothing is
        // written when nothing would change.
        let reports = self.state().reports_that_change(id, reports);
        if reports.is_empty() {
            return Ok(());
        }
        self.propose(Command::ReportTasks {
            node: id,
            reports,
            at_ms: unix_now_ms(),
        })
        .await
    }

    /// Node `id` leaves the swarm: it is down from now, and a heartbeat
    /// still on its way does not bring it back (its tasks move as
    /// for any node that went down).
    pub(crate) async fn handle_leave(&self, id: NodeId) -> ApiResult<()> {
        self.propose(Command::SetNodeStatus {
            id,
            status: NodeStatus::Down,
            message: crate::api::objects::LEFT_THE_SWARM.into(),
            agent_version: String::new(),
            at: unix_now(),
        })
        .await
    }

    /// A node's heartbeat, made with the certificate of serial `serial`.
    pub(crate) async fn handle_heartbeat(&self, id: NodeId, serial: &str, hb: Heartbeat) -> ApiResult<HeartbeatReply> {
        if hb.agent_version.len() > 64 {
            return Err(ApiError::invalid("the reported agent version is longer than 64 bytes"));
        }
        let state = self.state();
        if state
            .nodes
            .get(&id)
            .is_some_and(|n| n.status == NodeStatus::Down && n.status_message == crate::api::objects::LEFT_THE_SWARM)
        {
            return Err(ApiError::denied(format!(
                "node {} left the swarm; join again with a token",
                node_id_text(id)
            )));
        }
        let Some(node) = state.nodes.get(&id).cloned() else {
            return Err(if state.removed.contains(&id) {
                ApiError::denied(format!(
                    "node {} was removed from the swarm; run `meshctl swarm leave` on it and join again with a token",
                    node_id_text(id)
                ))
            } else {
                ApiError::not_found(format!("node {} is not a member of this swarm", node_id_text(id)))
            });
        };
        self.liveness.locked().seen(id, Instant::now());
        {
            // Ready to vote only as a manager by the store with a manager's
            // certificate: a node coming back with the store and the
            // certificate of a role it lost reports ready until it drops
            // them, and must not be made a voter on that word.
            let mut ready = self.raft_ready.locked();
            if hb.raft_ready && hb.cert_role == Role::Manager && node.role == Role::Manager {
                ready.insert(id);
            } else {
                ready.remove(&id);
            }
        }
        let new_key = !hb.wireguard_key.is_empty() && hb.wireguard_key != node.wireguard_key;
        let new_version = node.agent_version != hb.agent_version;
        let new_resources = hb.resources != node.resources;
        // A node's own facts are written at most every NODE_FACTS_EVERY: a
        // node that flips them on every beat would write on every beat.
        let facts = (new_key || new_version || new_resources) && self.fact_writes.locked().allow(id, Instant::now());
        if new_resources && facts {
            self.propose(Command::SetNodeResources {
                id,
                resources: hb.resources,
            })
            .await?;
        }
        if new_key && facts {
            crate::api::assignment::tunnel::parse_public_key(&hb.wireguard_key).map_err(ApiError::invalid)?;
            self.propose(Command::SetNodeWireguardKey {
                id,
                key: hb.wireguard_key.clone(),
            })
            .await?;
        }
        if node.status != NodeStatus::Ready || (new_version && facts) {
            self.propose(Command::SetNodeStatus {
                id,
                status: NodeStatus::Ready,
                message: String::new(),
                agent_version: if facts {
                    hb.agent_version.clone()
                } else {
                    node.agent_version.clone()
                },
                at: unix_now(),
            })
            .await?;
        }
        let cluster = state
            .cluster
            .clone()
            .ok_or_else(|| ApiError::internal("the cluster is not initialised"))?;
        let ca = current_ca(&state)?;
        // The store's record says which root issued the certificate in use;
        // one that is not the last issued (an answer to a renewal was lost)
        // is renewed again.
        let current_root = hex::encode(ca.digest());
        let recorded = &node.certs.current;
        let renew = pki::needs_renewal(secs(hb.cert_not_before), secs(hb.cert_not_after), SystemTime::now())
            || hb.cert_role != self.issued_role(&state, id)
            || hb.cert_ca_digest != current_root
            || (!recorded.serial.is_empty() && (recorded.serial != serial || recorded.ca != current_root));
        Ok(HeartbeatReply {
            period_ms: cluster.heartbeat_period_ms,
            managers: managers(&state),
            leader: self.leader(),
            desired_role: node.role,
            renew_certificate: renew,
            ca_pems: roots(&state),
            unlock_key: if node.role == Role::Manager {
                state.unlock_key.clone()
            } else {
                None
            },
            availability: node.availability,
        })
    }

    /// A fresh certificate for a member's new key (leader only).
    pub(crate) async fn handle_renew(&self, id: NodeId, csr_pem: &str) -> ApiResult<(String, Vec<String>)> {
        let state = self.state();
        if !state.nodes.contains_key(&id) {
            return Err(ApiError::denied(format!(
                "node {} is not a member of this swarm",
                node_id_text(id)
            )));
        }
        let cluster = state
            .cluster
            .clone()
            .ok_or_else(|| ApiError::internal("the cluster is not initialised"))?;
        let ca = current_ca(&state)?;
        let role = self.issued_role(&state, id);
        let cert = issue(&ca, csr_pem, id, role, &cluster.id, cluster.cert_expiry_secs)?;
        // The node uses it only after this answer, so the record comes
        // first; the certificate it replaces is honoured as long as the
        // clock skew certificates already absorb, for calls under way.
        let issued = ca
            .record(&cert, unix_now())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.propose(Command::RecordNodeCert {
            id,
            issued,
            grace_secs: pki::backdate(Duration::from_secs(cluster.cert_expiry_secs)).as_secs(),
        })
        .await?;
        Ok((with_cross_signed(cert, &state), roots(&state)))
    }

    /// Bringing Raft membership in line with node roles, one change at a
    /// time, on its own loop: a learner catching up can take seconds, and
    /// tasks must not wait for it (the orchestrator runs in
    /// [`Self::leader_loop`]).
    async fn membership_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => return,
            }
            let state = self.state();
            if !self.is_leader() || state.cluster.is_none() {
                continue;
            }
            if let Err(e) = self.reconcile_membership(&state).await {
                log::warn!("raft membership: {e}");
            }
        }
    }

    /// Leader duties, every 200 ms: mark silent nodes Down and run the
    /// orchestrator.
    async fn leader_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut was_leader = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.changed() => return,
            }
            let leader = self.is_leader();
            let state = self.state();
            if leader && !was_leader {
                self.liveness
                    .locked()
                    .reset(state.nodes.keys().copied(), Instant::now());
            }
            was_leader = leader;
            if !leader || state.cluster.is_none() {
                continue;
            }
            let overdue = self
                .liveness
                .locked()
                .overdue(&state, Instant::now(), down_after(&state));
            for id in overdue {
                if id == self.id {
                    continue;
                }
                let cmd = Command::SetNodeStatus {
                    id,
                    status: NodeStatus::Down,
                    message: "heartbeat failure".into(),
                    agent_version: String::new(),
                    at: unix_now(),
                };
                if let Err(e) = self.propose(cmd).await {
                    log::warn!("marking node {} down: {e}", node_id_text(id));
                }
            }
            let rotation = state
                .cluster
                .as_ref()
                .map_or(crate::api::objects::DEFAULT_KEY_ROTATION_SECS, |c| {
                    c.overlay_key_rotation_secs
                });
            if crate::api::overlay_key::key_rotation_due(state.overlay_key.as_ref(), unix_now(), rotation) {
                let key =
                    crate::api::overlay_key::OverlayKey::next(state.overlay_key.as_ref(), rand::random(), unix_now());
                let epoch = key.epoch;
                match self.propose(Command::RotateOverlayKey(key)).await {
                    Ok(()) => log::info!("overlay key rotated (epoch {epoch})"),
                    Err(e) => log::warn!("rotating the overlay key: {e}"),
                }
            }
            if rules::previous_roots_done(&state, unix_now()) {
                match self.propose(Command::DropPreviousRoots).await {
                    Ok(()) => log::info!("CA rotation done: the previous root is no longer trusted"),
                    Err(e) => log::warn!("dropping the previous root: {e}"),
                }
            }
            if let Some(plan) = orchestrator::plan(&self.state(), unix_now_ms(), &mut || rand::random()) {
                let (placed, unplaceable) = orchestrator::decisions(&plan);
                let decided = &crate::metrics::instruments().scheduler_decisions;
                decided.with_label_values(&["placed"]).inc_by(placed);
                decided.with_label_values(&["unplaceable"]).inc_by(unplaceable);
                if let Err(e) = self.propose(plan).await {
                    log::warn!("orchestrator: {e}");
                }
            }
        }
    }

    async fn reconcile_membership(&self, state: &ClusterState) -> Result<(), ManagerError> {
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let ready = self.raft_ready.locked().clone();
        for node in state.nodes.values().filter(|n| n.role == Role::Manager) {
            if voters.contains(&node.id) || !ready.contains(&node.id) {
                continue;
            }
            if learners.contains(&node.id) {
                // A learner that did not catch up (its manager certificate
                // may still be on its way) must not become a voter: the
                // joint configuration would stall every commit on it.
                let metrics = self.raft.metrics().borrow().clone();
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&node.id).copied().flatten())
                    .map(|l| l.index);
                if !caught_up(matched, metrics.last_log_index.unwrap_or(0)) {
                    continue;
                }
            }
            log::info!(
                "adding manager {} ({}) to the Raft voters",
                node_id_text(node.id),
                node.addr
            );
            if !learners.contains(&node.id) {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    self.raft.add_learner(node.id, BasicNode::new(&node.addr), true),
                )
                .await
                .map_err(|_| {
                    ManagerError::Membership(format!("{} did not catch up within 10 s", node_id_text(node.id)))
                })?
                .map_err(|e| ManagerError::Membership(e.to_string()))?;
            }
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([node.id].into()), false)
                .await
                .map_err(|e| ManagerError::Membership(e.to_string()))?;
            return Ok(());
        }
        for id in voters.iter().chain(learners.iter()) {
            let wanted = state.nodes.get(id).map(|n| n.role);
            if wanted == Some(Role::Manager) {
                continue;
            }
            log::info!("removing {} from the Raft members", node_id_text(*id));
            let change = if voters.contains(id) {
                ChangeMembers::RemoveVoters([*id].into())
            } else {
                ChangeMembers::RemoveNodes([*id].into())
            };
            self.raft
                .change_membership(change, false)
                .await
                .map_err(|e| ManagerError::Membership(e.to_string()))?;
            self.raft_ready.locked().remove(id);
            return Ok(());
        }
        Ok(())
    }
}

/// How far behind the leader's log a learner may be and still be made a
/// voter.
const LEARNER_LAG: u64 = 64;

/// Whether a learner whose log matches the leader's up to `matched` has
/// caught up with a leader whose log ends at `last`.
fn caught_up(matched: Option<u64>, last: u64) -> bool {
    matched.is_some_and(|m| m.saturating_add(LEARNER_LAG) >= last)
}

/// A time a node reported, clamped so no value from the wire can overflow.
fn secs(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix.min(1 << 40))
}

fn cluster_id(state: &ClusterState) -> ApiResult<String> {
    state
        .cluster
        .as_ref()
        .map(|c| c.id.clone())
        .ok_or_else(|| ApiError::internal("the cluster is not initialised"))
}

fn current_ca(state: &ClusterState) -> ApiResult<RootCa> {
    let ca = state
        .ca
        .as_ref()
        .ok_or_else(|| ApiError::internal("the store has no CA"))?;
    RootCa::from_pem(&ca.root_cert_pem, ca.root_key_pem.expose())
        .map_err(|e| ApiError::internal(format!("the stored CA is unusable: {e}")))
}

fn blob_view(state: &ClusterState, kind: secret::Kind, blob: &secret::Blob) -> crate::api::messages::BlobView {
    crate::api::messages::BlobView {
        id: node_id_text(blob.id),
        name: blob.name.clone(),
        labels: blob.labels.clone(),
        created: blob.created,
        updated: blob.updated,
        size: blob.data.len(),
        data: (kind == secret::Kind::Config).then(|| String::from_utf8_lossy(&blob.data).into_owned()),
        services: state
            .services
            .values()
            .filter(|s| s.spec.refs(kind).iter().any(|r| r.source == blob.name))
            .map(|s| s.spec.name.clone())
            .collect(),
    }
}

fn network_view(state: &ClusterState, network: &crate::api::network::Network) -> NetworkView {
    let mut peers = std::collections::BTreeSet::new();
    let mut endpoints = Vec::new();
    for t in state.tasks.values().filter(|t| !t.state.is_terminal()) {
        let Some(a) = t.attachments.iter().find(|a| a.network == network.id) else {
            continue;
        };
        let node = t.node.and_then(|n| state.nodes.get(&n));
        if let Some(n) = node {
            peers.insert((n.hostname.clone(), n.data_path_addr.clone()));
        }
        let service = state.services.get(&t.service).map_or("-", |s| s.spec.name.as_str());
        endpoints.push(Endpoint {
            task: node_id_text(t.id),
            name: if t.slot == 0 {
                format!("{service}.{}", node.map_or("-", |n| n.hostname.as_str()))
            } else {
                format!("{service}.{}", t.slot)
            },
            node: node.map(|n| n.hostname.clone()),
            address: a.address,
        });
    }
    NetworkView {
        network: network.clone(),
        services: state
            .services
            .values()
            .filter(|s| s.spec.networks.contains(&network.name))
            .map(|s| s.spec.name.clone())
            .collect(),
        peers: peers.into_iter().collect(),
        endpoints,
        key_epoch: (network.encryption != crate::api::network::Encryption::None)
            .then(|| state.overlay_key.as_ref().map_or(0, |k| k.epoch)),
    }
}

fn service_view(state: &ClusterState, service: &Service) -> ServiceView {
    let live = |t: &&Task| t.service == service.id && t.desired == DesiredState::Running;
    let running = state
        .tasks
        .values()
        .filter(live)
        .filter(|t| t.state == TaskState::Running)
        .count() as u32;
    let desired = match service.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        // One per node that admits it, before the orchestrator has placed
        // them (so a fresh global service is not "converged" at 0 of 0);
        // a paused node keeps its task without admitting new ones.
        ServiceMode::Global => {
            let placement = crate::manager::orchestrator::placement_of(service);
            let admitting = crate::manager::orchestrator::sched_nodes(state)
                .iter()
                .filter(|n| placement.admits(n))
                .count();
            admitting.max(state.tasks.values().filter(live).count()) as u32
        }
    };
    ServiceView {
        service: service.clone(),
        running,
        desired,
    }
}

/// Trusted roots, current first.
pub(crate) fn roots(state: &ClusterState) -> Vec<String> {
    state
        .ca
        .iter()
        .flat_map(|ca| std::iter::once(ca.root_cert_pem.clone()).chain(ca.previous_roots_pem.iter().cloned()))
        .collect()
}

/// A certificate just issued, followed while a rotation settles by the
/// cross-signed current root (see [`CaState::cross_signed_pem`]).
fn with_cross_signed(cert_pem: String, state: &ClusterState) -> String {
    match &state.ca {
        Some(ca) if !ca.cross_signed_pem.is_empty() => format!("{cert_pem}{}", ca.cross_signed_pem),
        _ => cert_pem,
    }
}

/// Managers as (id, address).
pub(crate) fn managers(state: &ClusterState) -> Vec<(NodeId, String)> {
    state
        .nodes
        .values()
        .filter(|n| n.role == Role::Manager)
        .map(|n| (n.id, n.addr.clone()))
        .collect()
}

fn issue(ca: &RootCa, csr_pem: &str, id: NodeId, role: Role, cluster_id: &str, expiry_secs: u64) -> ApiResult<String> {
    let now = SystemTime::now();
    let identity = NodeIdentity {
        node_id: id,
        role,
        cluster_id: cluster_id.to_string(),
    };
    ca.issue(
        csr_pem,
        &identity,
        now - pki::backdate(Duration::from_secs(expiry_secs)),
        now + Duration::from_secs(expiry_secs),
    )
    .map_err(|e| ApiError::invalid(format!("cannot issue a certificate: {e}")))
}

/// Waits until the Raft core stops on its own (a storage error is fatal
/// to it), with why; `None` when it stopped because it was told to.
pub(crate) async fn core_failure(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>,
) -> Option<String> {
    loop {
        match &metrics.borrow_and_update().running_state {
            Ok(()) => {}
            Err(openraft::error::Fatal::Stopped) => return None,
            Err(fatal) => return Some(fatal.to_string()),
        }
        if metrics.changed().await.is_err() {
            return None;
        }
    }
}

/// A manager whose Raft core failed would stay up answering nothing; it
/// says why and exits instead, so its service manager restarts it (tasks
/// outlive the agent and are adopted again).
async fn exit_when_the_core_fails(
    metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        failure = core_failure(metrics) => {
            if let Some(why) = failure {
                log::error!("the Raft store stopped: {why}; this manager can no longer serve the swarm, exiting so that it is restarted");
                std::process::exit(1);
            }
        }
        _ = stop.changed() => {}
    }
}

/// Counts the terms this manager enters (each is one election) for the
/// metrics, until the manager stops.
async fn count_elections(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut term = metrics.borrow().current_term;
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
        let now = metrics.borrow().current_term;
        if now > term {
            crate::metrics::instruments().raft_elections.inc_by(now - term);
            term = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_learner_that_caught_up_becomes_a_voter() {
        assert!(!caught_up(None, 0), "nothing replicated yet");
        assert!(caught_up(Some(100), 120));
        assert!(caught_up(Some(56), 120), "within the lag");
        assert!(!caught_up(Some(55), 120));
    }
}
