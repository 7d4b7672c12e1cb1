//! The cluster API: `swarm join-token`, `unlock-key`, `update`: the swarm-wide secrets and
//! settings.

use crate::manager::*;

impl Manager {
    pub(in crate::manager) async fn join_token(
        &self,
        state: &Arc<ClusterState>,
        role: Role,
        rotate: bool,
    ) -> ApiResult<ClusterResponse> {
        if rotate {
            let token = JoinToken::generate(current_ca(state)?.digest()).to_text();
            self.propose(Command::RotateToken { role, token }).await?;
        }
        let state = self.state();
        Ok(ClusterResponse::Secret(SecretText::new(match role {
            Role::Worker => state.tokens.worker.clone(),
            Role::Manager => state.tokens.manager.clone(),
        })))
    }

    pub(in crate::manager) async fn unlock_key(
        &self,
        state: &Arc<ClusterState>,
        rotate: bool,
    ) -> ApiResult<ClusterResponse> {
        if state.unlock_key.is_none() {
            return Err(ApiError::precondition(
                "autolock is not enabled on this swarm; turn it on with `meshctl swarm update --autolock=true`",
            ));
        }
        if rotate {
            let key = SecretText::new(UnlockKey::generate().to_text());
            self.propose(Command::SetUnlockKey { unlock_key: Some(key) }).await?;
        }
        Ok(ClusterResponse::Secret(
            self.state().unlock_key.clone().unwrap_or_default(),
        ))
    }

    pub(in crate::manager) async fn set_autolock(
        &self,
        state: &Arc<ClusterState>,
        enabled: bool,
    ) -> ApiResult<ClusterResponse> {
        if enabled == state.unlock_key.is_some() {
            return Ok(match &state.unlock_key {
                Some(k) => ClusterResponse::Secret(k.clone()),
                None => ClusterResponse::Done,
            });
        }
        let key = enabled.then(|| SecretText::new(UnlockKey::generate().to_text()));
        self.propose(Command::SetUnlockKey {
            unlock_key: key.clone(),
        })
        .await?;
        Ok(key.map(ClusterResponse::Secret).unwrap_or(ClusterResponse::Done))
    }

    pub(in crate::manager) async fn set_task_history_limit(&self, limit: u32) -> ApiResult<ClusterResponse> {
        rules::check_task_history_limit(limit)?;
        self.propose(Command::SetTaskHistoryLimit { limit }).await?;
        Ok(ClusterResponse::Done)
    }
}
