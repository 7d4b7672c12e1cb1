//! Applying the commands that change the swarm-wide records: init and restore, tokens, the unlock key, the CA and its
//! rotation, operator certificates, the overlay key, the history limit (pure).

use crate::manager::state::*;

/// Applies [`Command::Init`].
pub(super) fn apply_init(
    state: &mut ClusterState,
    cluster: &ClusterSpec,
    ca: &CaState,
    tokens: &JoinTokens,
    unlock_key: &Option<SecretText>,
    first: &Node,
) -> Result<(), Refusal> {
    if state.cluster.is_some() {
        return Err("the cluster is already initialised".into());
    }
    state.cluster = Some(cluster.clone());
    state.ca = Some(ca.clone());
    state.tokens = tokens.clone();
    state.unlock_key = unlock_key.clone();
    state.nodes.insert(first.id, first.clone());
    Ok(())
}

/// Applies [`Command::Restore`].
pub(super) fn apply_restore(state: &mut ClusterState, restored: &ClusterState) -> Result<(), Refusal> {
    if state.cluster.is_some() {
        return Err("a store can only be restored into while empty".into());
    }
    if restored.cluster.is_none() {
        return Err("the recovered state holds no cluster".into());
    }
    *state = restored.clone();
    Ok(())
}

/// Applies [`Command::RotateOverlayKey`].
pub(super) fn apply_rotate_overlay_key(
    state: &mut ClusterState,
    key: &crate::api::overlay_key::OverlayKey,
) -> Result<(), Refusal> {
    let expected = state.overlay_key.as_ref().map_or(1, |k| k.epoch + 1);
    if key.epoch != expected {
        return Err(refusal!(
            "overlay key epoch {} does not follow the current one (expected {expected})",
            key.epoch
        ));
    }
    state.previous_overlay_key = state.overlay_key.replace(key.clone());
    Ok(())
}

/// Applies [`Command::RotateToken`].
pub(super) fn apply_rotate_token(state: &mut ClusterState, role: Role, token: &str) -> Result<(), Refusal> {
    match role {
        Role::Worker => state.tokens.worker = token.to_string(),
        Role::Manager => state.tokens.manager = token.to_string(),
    };
    Ok(())
}

/// Applies [`Command::SetUnlockKey`].
pub(super) fn apply_set_unlock_key(state: &mut ClusterState, unlock_key: &Option<SecretText>) -> Result<(), Refusal> {
    let cluster = state.cluster.as_mut().expect("reason: checked above");
    cluster.autolock = unlock_key.is_some();
    state.unlock_key = unlock_key.clone();
    Ok(())
}

/// Applies [`Command::SetTaskHistoryLimit`].
pub(super) fn apply_set_task_history_limit(state: &mut ClusterState, limit: u32) -> Result<(), Refusal> {
    state
        .cluster
        .as_mut()
        .expect("reason: checked above")
        .task_history_limit = limit;
    prune_task_history(state, None);
    Ok(())
}

/// Applies [`Command::RotateCa`].
pub(super) fn apply_rotate_ca(state: &mut ClusterState, ca: &CaState, tokens: &JoinTokens) -> Result<(), Refusal> {
    state.ca = Some(ca.clone());
    state.tokens = tokens.clone();
    Ok(())
}

/// Applies [`Command::DropPreviousRoots`].
pub(super) fn apply_drop_previous_roots(state: &mut ClusterState) -> Result<(), Refusal> {
    let ca = state.ca.as_mut().ok_or("the store has no CA")?;
    ca.previous_roots_pem.clear();
    ca.previous_until = 0;
    ca.cross_signed_pem.clear();
    Ok(())
}

/// Applies [`Command::RecordOperatorCert`].
pub(super) fn apply_record_operator_cert(state: &mut ClusterState, name: &str, issued: &Issued) -> Result<(), Refusal> {
    let now = issued.issued_at;
    if state.operators.get(name).is_some_and(|o| o.not_after >= now) {
        return Err(refusal!(
                "an operator certificate named {name:?} is already issued: revoke it first (`meshctl swarm operator-cert rm {name}`) or choose another name"
            ));
    }
    state.operators.retain(|_, o| o.not_after >= now);
    state.operators.insert(name.to_string(), issued.clone());
    Ok(())
}

/// Applies [`Command::RevokeOperatorCert`].
pub(super) fn apply_revoke_operator_cert(state: &mut ClusterState, name: &str) -> Result<(), Refusal> {
    state
        .operators
        .remove(name)
        .ok_or_else(|| format!("no operator certificate named {name:?}"))?;
    Ok(())
}
