//! Applying the commands that change the swarm-wide records: init and restore, tokens, the unlock key, the CA and its
//! rotation, operator certificates, the overlay key, the history limit (pure).

use crate::manager::state::*;

impl ClusterState {
    /// Applies [`Command::Init`].
    pub(super) fn apply_init(
        &mut self,
        cluster: &ClusterSpec,
        ca: &CaState,
        tokens: &JoinTokens,
        unlock_key: &Option<SecretText>,
        first: &Node,
    ) -> Result<(), Refusal> {
        if self.cluster.is_some() {
            return Err("the cluster is already initialised".into());
        }
        self.cluster = Some(cluster.clone());
        self.ca = Some(ca.clone());
        self.tokens = tokens.clone();
        self.unlock_key = unlock_key.clone();
        self.nodes.insert(first.id, first.clone());
        Ok(())
    }

    /// Applies [`Command::Restore`].
    pub(super) fn apply_restore(&mut self, state: &ClusterState) -> Result<(), Refusal> {
        if self.cluster.is_some() {
            return Err("a store can only be restored into while empty".into());
        }
        if state.cluster.is_none() {
            return Err("the recovered state holds no cluster".into());
        }
        *self = state.clone();
        Ok(())
    }

    /// Applies [`Command::RotateOverlayKey`].
    pub(super) fn apply_rotate_overlay_key(
        &mut self,
        key: &crate::api::overlay_key::OverlayKey,
    ) -> Result<(), Refusal> {
        let expected = self.overlay_key.as_ref().map_or(1, |k| k.epoch + 1);
        if key.epoch != expected {
            return Err(refusal!(
                "overlay key epoch {} does not follow the current one (expected {expected})",
                key.epoch
            ));
        }
        self.previous_overlay_key = self.overlay_key.replace(key.clone());
        Ok(())
    }

    /// Applies [`Command::RotateToken`].
    pub(super) fn apply_rotate_token(&mut self, role: Role, token: &str) -> Result<(), Refusal> {
        match role {
            Role::Worker => self.tokens.worker = token.to_string(),
            Role::Manager => self.tokens.manager = token.to_string(),
        };
        Ok(())
    }

    /// Applies [`Command::SetUnlockKey`].
    pub(super) fn apply_set_unlock_key(&mut self, unlock_key: &Option<SecretText>) -> Result<(), Refusal> {
        let cluster = self.cluster.as_mut().expect("reason: checked above");
        cluster.autolock = unlock_key.is_some();
        self.unlock_key = unlock_key.clone();
        Ok(())
    }

    /// Applies [`Command::SetTaskHistoryLimit`].
    pub(super) fn apply_set_task_history_limit(&mut self, limit: u32) -> Result<(), Refusal> {
        self.cluster.as_mut().expect("reason: checked above").task_history_limit = limit;
        self.prune_task_history(None);
        Ok(())
    }

    /// Applies [`Command::RotateCa`].
    pub(super) fn apply_rotate_ca(&mut self, ca: &CaState, tokens: &JoinTokens) -> Result<(), Refusal> {
        self.ca = Some(ca.clone());
        self.tokens = tokens.clone();
        Ok(())
    }

    /// Applies [`Command::DropPreviousRoots`].
    pub(super) fn apply_drop_previous_roots(&mut self) -> Result<(), Refusal> {
        let ca = self.ca.as_mut().ok_or("the store has no CA")?;
        ca.previous_roots_pem.clear();
        ca.previous_until = 0;
        ca.cross_signed_pem.clear();
        Ok(())
    }

    /// Applies [`Command::RecordOperatorCert`].
    pub(super) fn apply_record_operator_cert(&mut self, name: &str, issued: &Issued) -> Result<(), Refusal> {
        let now = issued.issued_at;
        if self.operators.get(name).is_some_and(|o| o.not_after >= now) {
            return Err(refusal!(
                    "an operator certificate named {name:?} is already issued: revoke it first (`meshctl swarm operator-cert rm {name}`) or choose another name"
                ));
        }
        self.operators.retain(|_, o| o.not_after >= now);
        self.operators.insert(name.to_string(), issued.clone());
        Ok(())
    }

    /// Applies [`Command::RevokeOperatorCert`].
    pub(super) fn apply_revoke_operator_cert(&mut self, name: &str) -> Result<(), Refusal> {
        self.operators
            .remove(name)
            .ok_or_else(|| format!("no operator certificate named {name:?}"))?;
        Ok(())
    }
}
