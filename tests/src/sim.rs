//! Simulated nodes: many lightweight agents in one process, for showing
//! the control plane at a scale two cores cannot hold as real hosts.
//!
//! What is real: each simulated node makes its own key and CSR, joins with
//! the swarm's worker token over the token-pinned TLS the agent uses, gets
//! its own certificate from the CA, and then speaks the dispatcher protocol
//! over its own mutual-TLS connections: heartbeats at the period the
//! managers ask for (on a session of their own, see [`SimNode`]), the
//! assignments long poll, task reports. What is
//! simulated: the node's runtime. A task assigned to run is reported
//! Running at once, a task told to stop is reported Shutdown; nothing is
//! made in the kernel. What the kernel *would* hold for the node is
//! computed from its assignments with the agent's own pure planners
//! ([`DataplaneSize`]), so per-node state can be reported against
//! cluster size.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_agent::{
    agent::{
        mesh::kernel::MeshTables,
        net::{dns::Records, overlay},
    },
    api::{
        error::{ApiError, ErrorKind},
        messages::{Assignments, Heartbeat, JoinCall, PartDigest, PartRef, PeerRequest, PeerResponse},
        objects::{NodeId, Role},
        service::{Assignment, DesiredState, TaskReport, TaskState},
    },
    ca::{
        pki::{self, NodeKey},
        token::JoinToken,
    },
    wire::{
        rpc::RpcClient,
        tls::{self, MANAGER_NAME},
    },
};
use rustls::pki_types::{pem::PemObject, CertificateDer};

type Client = RpcClient<PeerRequest, PeerResponse>;

/// What the simulator reads of the managers' answers on a node's work
/// session: the variants that session gets, and of the assignments only
/// the digest and the node's own tasks. The rest (every network's
/// endpoints and services, the routing mesh: msgpack bins) is skipped
/// unread. A real node decodes all of it on its own CPU; 5,000 simulated
/// nodes decoding it on one core made the simulator, not the managers,
/// what the 5,000-node load waited for.
#[derive(Debug, serde::Deserialize)]
pub enum WorkReply {
    Refused(ApiError),
    Assignments(Result<OwnTasks, ApiError>),
    Reported(Result<(), ApiError>),
}

/// The part of [`Assignments`] a simulated node acts on.
#[derive(Debug, Default, serde::Deserialize)]
pub struct OwnTasks {
    pub digest: String,
    pub tasks: Vec<Assignment>,
    /// The shared parts' digests: named in the next poll, as the agent
    /// names the parts it keeps (the simulated node skips their bytes).
    #[serde(default)]
    pub parts: Vec<PartRef>,
}

/// An answer from a manager that may send the node to another one.
pub trait ManagerReply: serde::de::DeserializeOwned + Send + 'static {
    /// The refusal that says to ask another manager, if this is one.
    fn retry_elsewhere(&self) -> Option<ApiError>;
}

impl ManagerReply for PeerResponse {
    fn retry_elsewhere(&self) -> Option<ApiError> {
        PeerResponse::retry_elsewhere(self)
    }
}

impl ManagerReply for WorkReply {
    /// As [`PeerResponse::retry_elsewhere`].
    fn retry_elsewhere(&self) -> Option<ApiError> {
        match self {
            WorkReply::Refused(e) => Some(e.clone()),
            WorkReply::Assignments(Err(e)) | WorkReply::Reported(Err(e)) if e.kind == ErrorKind::Unavailable => {
                Some(e.clone())
            }
            _ => None,
        }
    }
}

/// How long the managers may hold an assignments long poll, plus slack.
const ASSIGNMENTS_TIMEOUT: Duration = Duration::from_secs(20);

/// Counters shared by every simulated node of a fleet.
#[derive(Debug, Default)]
pub struct Stats {
    /// Heartbeats answered.
    pub heartbeats: AtomicU64,
    /// Heartbeats that failed (transport or refusal).
    pub heartbeat_errors: AtomicU64,
    /// Assignments replies received.
    pub assignments: AtomicU64,
    /// Task report batches stored.
    pub reports: AtomicU64,
    /// Tasks the fleet reports Running now.
    pub running: AtomicU64,
}

/// What the kernel would hold on a node for its assignments, as the
/// agent's own planners compute it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneSize {
    /// Overlay objects: per network a bridge and a VXLAN device, plus an
    /// FDB and a neighbour entry per remote endpoint.
    pub overlay_objects: usize,
    /// Routing-mesh map entries (services, VIPs, backends, Maglev tables,
    /// nodes) a fresh agent would write.
    pub mesh_entries: usize,
    /// DNS records served to its tasks.
    pub dns_records: usize,
    /// Tasks assigned (not ended).
    pub tasks: usize,
}

impl DataplaneSize {
    /// The sizes for one node's assignments.
    pub fn of(a: &Assignments) -> DataplaneSize {
        let overlays = overlay::wanted(a, 1500, false);
        let overlay_objects = overlays.values().map(|o| 2 + o.fdb.len() + o.neighbours.len()).sum();
        let mut tables = MeshTables::default();
        let local: BTreeMap<u64, std::net::Ipv4Addr> = a
            .tasks
            .iter()
            .filter_map(|t| Some((t.task, t.spec.networks.first()?.address)))
            .collect();
        let mut mesh_entries = 0;
        if let Some(mesh) = a.mesh.as_ref().and_then(|m| m.assignment()) {
            mesh_entries += tables.update(&mesh, &local, &|_| true).len();
        }
        mesh_entries += tables.update_vips(&a.services).len();
        let dns_records = Records::new(&a.services).len();
        DataplaneSize {
            overlay_objects,
            mesh_entries,
            dns_records,
            tasks: a.tasks.len(),
        }
    }
}

/// The data-path address of simulated node `i`: one of its own, so each
/// node's overlay entries are counted as a real fleet's would be, from
/// 198.18.0.0/15 (set aside for benchmarks, RFC 2544). Nothing is ever
/// sent to them: only the simulated nodes run tasks, and they make no
/// kernel state.
pub fn data_path_address(i: usize) -> std::net::Ipv4Addr {
    let i = i % (2 * 256 * 250);
    std::net::Ipv4Addr::new(
        198,
        18 + (i / (256 * 250)) as u8,
        ((i / 250) % 256) as u8,
        (i % 250 + 1) as u8,
    )
}

/// One simulated node after its join.
///
/// It keeps two sessions to the managers: one for its heartbeats, meant to
/// run on a runtime of their own, and one for its assignments and reports.
/// A real node has its own CPU; thousands of simulated nodes share one
/// process, and heartbeats queued behind other nodes' assignments (each a
/// few hundred KiB to decode) had the managers mark live nodes Down.
pub struct SimNode {
    /// The ID the managers gave it.
    pub id: NodeId,
    hb: Heartbeat,
    tls: Arc<rustls::ClientConfig>,
    beats: Sessions<PeerResponse>,
    work: Sessions<WorkReply>,
}

/// Mutual-TLS sessions to each manager, and which answered last.
struct Sessions<R> {
    managers: Mutex<Vec<RpcClient<PeerRequest, R>>>,
    hint: AtomicU64,
}

impl<R> Default for Sessions<R> {
    fn default() -> Self {
        Sessions {
            managers: Mutex::new(Vec::new()),
            hint: AtomicU64::new(0),
        }
    }
}

impl<R: ManagerReply> Sessions<R> {
    fn addrs(&self) -> Vec<String> {
        let managers = self.managers.lock().expect("reason: never poisoned");
        managers.iter().map(|c| c.addr().to_string()).collect()
    }

    fn set_managers(&self, addrs: &[String], tls: &Arc<rustls::ClientConfig>) {
        let mut managers = self.managers.lock().expect("reason: never poisoned");
        let known: BTreeSet<&str> = managers.iter().map(|c| c.addr()).collect();
        let wanted: BTreeSet<&str> = addrs.iter().map(String::as_str).collect();
        if known == wanted {
            return;
        }
        *managers = addrs
            .iter()
            .map(|a| {
                RpcClient::new(
                    a.clone(),
                    tls.clone(),
                    MANAGER_NAME.try_into().expect("reason: a valid DNS name"),
                )
            })
            .collect();
        self.hint.store(0, Ordering::Relaxed);
    }

    /// Calls the manager that answered last, then the others, as the agent
    /// does (`Member::call_managers`).
    async fn call(&self, request: impl Fn() -> PeerRequest, timeout: Duration) -> Result<R, String> {
        let managers = self.managers.lock().expect("reason: never poisoned").clone();
        if managers.is_empty() {
            return Err("no manager is known".into());
        }
        let first = self.hint.load(Ordering::Relaxed) as usize % managers.len();
        let mut last = String::new();
        for k in 0..managers.len() {
            let i = (first + k) % managers.len();
            match managers[i].call(request(), timeout).await {
                Ok(reply) => {
                    if let Some(e) = reply.retry_elsewhere() {
                        // Closed rather than kept idle: at 5,000 nodes the
                        // idle sessions to followers ran the simulator out
                        // of descriptors.
                        managers[i].release();
                        last = e.to_string();
                        continue;
                    }
                    self.hint.store(i as u64, Ordering::Relaxed);
                    return Ok(reply);
                }
                Err(e) => last = format!("{}: {e}", managers[i].addr()),
            }
        }
        Err(last)
    }
}

impl SimNode {
    /// Joins the swarm through `manager` (`ip:port`) with `token`, as node
    /// `hostname` advertising `advertise` (never dialled by the managers
    /// unless someone asks for its tasks' logs) and `data_path` as its
    /// VTEP (never sent to: nothing of the simulated nodes' overlays is
    /// made). Returns the node and how long the join took (key and CSR
    /// made beforehand are not counted).
    pub async fn join(
        manager: &str,
        token: &str,
        hostname: &str,
        advertise: std::net::SocketAddr,
        data_path: std::net::Ipv4Addr,
    ) -> Result<(SimNode, Duration), String> {
        let parsed = JoinToken::parse(token).map_err(|e| e.to_string())?;
        let key = NodeKey::generate().map_err(|e| e.to_string())?;
        let call = JoinCall {
            token: token.to_string(),
            csr_pem: key.csr_pem().map_err(|e| e.to_string())?,
            hostname: hostname.to_string(),
            advertise_addr: Some(advertise.to_string()),
            listen_port: advertise.port(),
            data_path_addr: Some(data_path.to_string()),
            agent_version: mesh_agent::VERSION.to_string(),
        };
        let pinned: Client = RpcClient::new(
            manager.to_string(),
            tls::pinned_client_config(parsed.ca_digest()),
            MANAGER_NAME.try_into().map_err(|_| "manager name")?,
        );
        let t0 = Instant::now();
        let reply = match pinned.call(PeerRequest::Join(call), Duration::from_secs(60)).await {
            Ok(PeerResponse::Join(r)) => r.map_err(|e: ApiError| e.to_string())?,
            Ok(other) => return Err(format!("unexpected reply to a join: {other:?}")),
            Err(e) => return Err(format!("join through {manager}: {e}")),
        };
        let took = t0.elapsed();
        let der = CertificateDer::from_pem_slice(reply.cert_pem.as_bytes()).map_err(|e| e.to_string())?;
        let (identity, not_after) = pki::identity_from_cert(&der).map_err(|e| e.to_string())?;
        let ca_digest = reply
            .ca_pems
            .first()
            .and_then(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).ok())
            .map(|der| hex::encode(pki::cert_digest(&der)))
            .unwrap_or_default();
        let not_before = x509_parser::parse_x509_certificate(&der)
            .map(|(_, c)| c.validity().not_before.timestamp().max(0) as u64)
            .map_err(|e| e.to_string())?;
        let hb = Heartbeat {
            agent_version: mesh_agent::VERSION.to_string(),
            raft_ready: false,
            cert_not_after: not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cert_not_before: not_before,
            cert_role: identity.role,
            cert_ca_digest: ca_digest,
            wireguard_key: String::new(),
            resources: Default::default(),
        };
        if identity.role != Role::Worker {
            return Err(format!("joined as {:?}, expected a worker", identity.role));
        }
        let tls =
            tls::client_config(&reply.ca_pems, Some((&reply.cert_pem, &key.key_pem()))).map_err(|e| e.to_string())?;
        let node = SimNode {
            id: reply.node_id,
            hb,
            tls,
            beats: Sessions::default(),
            work: Sessions::default(),
        };
        node.set_managers(reply.managers.iter().map(|(_, a)| a.clone()).collect());
        Ok((node, took))
    }

    fn set_managers(&self, addrs: Vec<String>) {
        self.beats.set_managers(&addrs, &self.tls);
        self.work.set_managers(&addrs, &self.tls);
    }

    async fn call(&self, request: impl Fn() -> PeerRequest, timeout: Duration) -> Result<WorkReply, String> {
        self.work.call(request, timeout).await
    }

    /// What the node's kernel would hold for its assignments now, and
    /// their size as sent (rmp-encoded bytes). Asked for afresh rather
    /// than kept from the long poll: a fleet of thousands holding every
    /// node's assignments would need gigabytes, and sizing them on every
    /// reply took the simulator a core.
    pub async fn measure(&self) -> Result<(DataplaneSize, usize), String> {
        // The whole answer, on a session of its own for the occasion.
        let whole = Sessions::<PeerResponse>::default();
        whole.set_managers(&self.work.addrs(), &self.tls);
        match whole
            .call(
                || PeerRequest::Assignments {
                    known: String::new(),
                    holds: Vec::new(),
                },
                ASSIGNMENTS_TIMEOUT,
            )
            .await?
        {
            // Off the runtime: the planners take a while, and the fleet's
            // heartbeats share the runtime's threads.
            PeerResponse::Assignments(Ok(a)) => tokio::task::spawn_blocking(move || {
                let bytes = rmp_serde::to_vec(&a).map_err(|e| e.to_string())?.len();
                Ok((DataplaneSize::of(&a), bytes))
            })
            .await
            .map_err(|e| e.to_string())?,
            other => Err(format!("unexpected reply to an assignments call: {other:?}")),
        }
    }

    /// Heartbeats until `stop`, at the period the managers ask for.
    pub async fn heartbeats(self: Arc<Self>, stats: Arc<Stats>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut period = Duration::from_millis(1000);
        loop {
            match self
                .beats
                .call(|| PeerRequest::Heartbeat(self.hb.clone()), Duration::from_secs(5))
                .await
            {
                Ok(PeerResponse::Heartbeat(Ok(reply))) => {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    period = Duration::from_millis(reply.period_ms.max(100));
                    self.set_managers(reply.managers.into_iter().map(|(_, a)| a).collect());
                }
                _ => {
                    stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Follows the node's assignments and reports on its tasks, as if each
    /// task started (or stopped) the moment it was asked to.
    pub async fn assignments(self: Arc<Self>, stats: Arc<Stats>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut known = String::new();
        let mut holds: Vec<PartDigest> = Vec::new();
        let mut running: BTreeSet<u64> = BTreeSet::new();
        loop {
            let call = self.call(
                || PeerRequest::Assignments {
                    known: known.clone(),
                    holds: holds.clone(),
                },
                ASSIGNMENTS_TIMEOUT,
            );
            let reply = tokio::select! {
                r = call => r,
                _ = stop.changed() => return,
            };
            let a = match reply {
                Ok(WorkReply::Assignments(Ok(a))) => a,
                _ => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            };
            stats.assignments.fetch_add(1, Ordering::Relaxed);
            known = a.digest.clone();
            holds = a.parts.iter().map(|p| p.digest).collect();
            let reports = simulated_reports(&a.tasks);
            if reports.is_empty() {
                continue;
            }
            // Retry the batch until it is stored, as the agent's report loop does.
            loop {
                match self
                    .call(|| PeerRequest::ReportTasks(reports.clone()), Duration::from_secs(30))
                    .await
                {
                    Ok(WorkReply::Reported(Ok(()))) => break,
                    _ => tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => return,
                    },
                }
            }
            stats.reports.fetch_add(1, Ordering::Relaxed);
            for r in &reports {
                let now_running = r.state == TaskState::Running;
                let was = if now_running {
                    !running.insert(r.task)
                } else {
                    running.remove(&r.task)
                };
                match (was, now_running) {
                    (false, true) => stats.running.fetch_add(1, Ordering::Relaxed),
                    (true, false) => stats.running.fetch_sub(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
        }
    }
}

/// What a runtime that starts and stops instantly reports for `a`: Running
/// for each task to run that is not yet, Shutdown for each task to stop
/// that has not ended.
pub fn simulated_reports(tasks: &[Assignment]) -> Vec<TaskReport> {
    tasks
        .iter()
        .filter_map(|t| {
            let state = match t.desired {
                DesiredState::Running if t.state < TaskState::Running => TaskState::Running,
                DesiredState::Running => return None,
                _ if !t.state.is_terminal() => TaskState::Shutdown,
                _ => return None,
            };
            Some(TaskReport {
                task: t.task,
                state,
                message: "simulated".into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(task: u64, desired: DesiredState, state: TaskState) -> Assignment {
        Assignment {
            task,
            service: 1,
            desired,
            state,
            spec: Default::default(),
            endpoints_pending: 0,
        }
    }

    #[test]
    fn reports_what_an_instant_runtime_would() {
        let tasks = vec![
            assignment(1, DesiredState::Running, TaskState::Assigned),
            assignment(2, DesiredState::Running, TaskState::Running),
            assignment(3, DesiredState::Shutdown, TaskState::Running),
            assignment(4, DesiredState::Shutdown, TaskState::Shutdown),
        ];
        let reports: Vec<(u64, TaskState)> = simulated_reports(&tasks).iter().map(|r| (r.task, r.state)).collect();
        assert_eq!(reports, vec![(1, TaskState::Running), (3, TaskState::Shutdown)]);
    }

    /// The simulator's light reading matches what the managers send.
    #[test]
    fn a_work_reply_reads_the_digest_and_own_tasks_of_whole_assignments() {
        use mesh_agent::{
            api::assignment::mesh::{MeshFleet, NodeMesh},
            wire::rpc::{decode_response, encode_frame},
        };
        let whole = Assignments {
            digest: "d1".into(),
            tasks: vec![assignment(1, DesiredState::Running, TaskState::Assigned)],
            mesh: Some(NodeMesh {
                fleet: MeshFleet::default().into(),
                node: 3,
            }),
            parts: vec![PartRef {
                digest: [7; 32],
                held: false,
            }],
            ..Default::default()
        };
        let frame = encode_frame(7, &PeerResponse::Assignments(Ok(whole.clone())), 1 << 20).unwrap();
        let (id, reply) = decode_response::<WorkReply>(&frame[4..]).unwrap();
        assert_eq!(id, 7);
        let Ok(WorkReply::Assignments(Ok(own))) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!((own.digest.as_str(), own.tasks.len()), ("d1", 1));
        assert_eq!(own.parts, whole.parts, "the parts to name in the next poll");
        let refused = ApiError::unavailable("not the leader");
        let frame = encode_frame(8, &PeerResponse::Assignments(Err(refused)), 1 << 20).unwrap();
        let (_, reply) = decode_response::<WorkReply>(&frame[4..]).unwrap();
        assert!(reply.unwrap().retry_elsewhere().is_some(), "sent elsewhere");
        let frame = encode_frame(9, &PeerResponse::Reported(Ok(())), 1 << 20).unwrap();
        let (_, reply) = decode_response::<WorkReply>(&frame[4..]).unwrap();
        assert!(matches!(reply, Ok(WorkReply::Reported(Ok(())))));
    }

    #[test]
    fn data_path_addresses_are_distinct_and_in_the_benchmark_range() {
        let all: BTreeSet<std::net::Ipv4Addr> = (0..20_000).map(data_path_address).collect();
        assert_eq!(all.len(), 20_000);
        assert!(all.iter().all(|a| a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18));
    }

    #[test]
    fn an_empty_assignment_has_no_dataplane() {
        assert_eq!(DataplaneSize::of(&Assignments::default()), DataplaneSize::default());
    }
}
