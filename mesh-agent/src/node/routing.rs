//! Where a request goes: served here when this manager leads, forwarded
//! once to the leader otherwise; the peers' RPC handler and its identity checks.

use crate::locks::{Locked, RwLocked};
use std::{net::IpAddr, sync::Weak, time::Duration};

use crate::{
    api::{
        clock::unix_now,
        error::{ApiError, ApiResult},
        messages::{ClusterRequest, Origin, PeerRequest, PeerResponse},
        objects::{node_id_text, Role},
    },
    ca::pki::NodeIdentity,
    manager::{rules, Manager},
    wire::{
        rpc::{Handler, Peer},
        tls,
    },
};

use super::{Member, FORWARD_TIMEOUT, VOTER_WAIT};

pub(super) async fn serve_as_leader(manager: &Manager, origin: Origin, request: PeerRequest) -> PeerResponse {
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

pub(super) fn kind(request: &PeerRequest) -> &'static str {
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

pub(super) fn no_certificate() -> ApiError {
    ApiError::denied("this call needs a node certificate of this swarm")
}

pub(super) fn manager_only() -> ApiError {
    ApiError::denied("this call is reserved to managers; the caller's certificate is not a manager's")
}

/// Serves node-to-node requests for a [`Member`].
pub(super) struct PeerHandler {
    pub(super) member: Weak<Member>,
}

impl Handler for PeerHandler {
    type Request = PeerRequest;
    type Response = PeerResponse;

    async fn handle(&self, peer: Peer, request: PeerRequest) -> PeerResponse {
        let Some(member) = self.member.upgrade() else {
            return PeerResponse::Refused(ApiError::unavailable("this node is leaving the swarm"));
        };
        let cluster_id = member.config.locked().cluster_id.clone();
        let presented = tls::peer_presented(&peer.certs);
        let identity = presented.identity.filter(|i| i.cluster_id == cluster_id);
        let operator = presented
            .operator
            .filter(|(_, c)| *c == cluster_id)
            .map(|(name, _)| name);
        if !peer.certs.is_empty() && identity.is_none() && operator.is_none() {
            return PeerResponse::Refused(ApiError::denied("the caller's certificate is not of this swarm"));
        }
        let is_manager = identity.as_ref().is_some_and(|i| i.role == Role::Manager);
        let serial = presented.serial;
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

impl Member {
    pub(super) fn self_origin(&self) -> Origin {
        let creds = self.creds.read_locked();
        Origin {
            identity: Some((self.id, creds.role)),
            operator: None,
            serial: creds.serial.clone(),
            ip: IpAddr::from([127, 0, 0, 1]),
        }
    }

    pub(super) async fn cluster_request(
        &self,
        request: ClusterRequest,
    ) -> ApiResult<crate::api::messages::ClusterResponse> {
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
    pub(super) async fn route(&self, origin: Origin, request: PeerRequest, forwarded: bool) -> PeerResponse {
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

    /// Whether the caller `identity` is a manager by what this node knows:
    /// its store on a manager, the managers its heartbeats name on a worker.
    pub(super) fn check_manager_caller(&self, identity: Option<&NodeIdentity>, serial: &str) -> ApiResult<()> {
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
    pub(super) fn check_forwarder(&self, identity: Option<&NodeIdentity>, serial: &str) -> ApiResult<()> {
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
}
