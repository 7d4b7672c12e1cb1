//! The node's session with the managers: heartbeats and what their
//! answers carry (role, roots, renewal), certificate renewal.

use crate::locks::{Locked, RwLocked};
use std::{sync::Arc, time::Duration};

use rustls::pki_types::pem::PemObject;

use super::error::NodeError;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::{
    api::{
        clock::unix_now,
        error::{ApiError, ApiResult},
        messages::{Heartbeat, HeartbeatReply, PeerRequest, PeerResponse},
        objects::Role,
    },
    ca::{
        keystore::KeyStore,
        pki::{self, NodeKey},
        seal::UnlockKey,
    },
};

use super::{files::Credentials, Member};

impl Member {
    /// Heartbeats to the managers; applies what they answer.
    pub(super) async fn session(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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

    pub(super) async fn heartbeat_once(&self) -> ApiResult<HeartbeatReply> {
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
                resources: node_resources(),
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
    pub(super) async fn call_managers(
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

    pub(super) async fn apply_heartbeat(&self, reply: HeartbeatReply) -> ApiResult<()> {
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
                    keys.wrap_with(&self.dek, Some(&key)).map_err(NodeError::from)?;
                    log::info!("autolock: the data key is now wrapped by the swarm's unlock key");
                }
                None if keys.is_autolocked() => {
                    keys.wrap_with(&self.dek, None).map_err(NodeError::from)?;
                    log::info!("autolock turned off for this manager");
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) async fn renew_certificate(&self) -> ApiResult<()> {
        let key = NodeKey::generate().map_err(NodeError::from)?;
        let csr = key.csr_pem().map_err(NodeError::from)?;
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
    pub(super) fn follow_roots(&self, roots: &[String]) -> ApiResult<()> {
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
    pub(super) fn install_credentials(&self, creds: Credentials) -> ApiResult<()> {
        self.files().write_credentials(&creds, &self.dek)?;
        let server = creds.server_config()?;
        let client = creds.client_config()?;
        *self.creds.write_locked() = creds;
        self.peers.set_tls(client);
        let _ = self.server_tls.send(server);
        Ok(())
    }
}

/// This node's CPUs and memory, as the scheduler counts them: read once,
/// not on every heartbeat (as Docker, a change shows after a restart).
fn node_resources() -> crate::api::resources::NodeResources {
    static READ: std::sync::OnceLock<crate::api::resources::NodeResources> = std::sync::OnceLock::new();
    *READ.get_or_init(read_node_resources)
}

fn read_node_resources() -> crate::api::resources::NodeResources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .unwrap_or(0);
    crate::api::resources::NodeResources {
        nano_cpus: cpus * crate::api::resources::NANOS_PER_CPU,
        memory_bytes: memory_kib * 1024,
    }
}
