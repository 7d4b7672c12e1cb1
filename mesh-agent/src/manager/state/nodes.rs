//! Applying the commands that change nodes: join, update, status, removal, their WireGuard key and certificate (pure).

use crate::manager::state::*;

/// Applies [`Command::AddNode`].
pub(super) fn apply_add_node(state: &mut ClusterState, node: &Node) -> Result<(), Refusal> {
    if state.removed.contains(&node.id) {
        return Err(refusal!(
            "node {} was removed and cannot rejoin with the same ID",
            node_id_text(node.id)
        ));
    }
    if state.nodes.contains_key(&node.id) {
        return Err(refusal!("node {} is already a member", node_id_text(node.id)));
    }
    state.nodes.insert(node.id, node.clone());
    Ok(())
}

/// Applies [`Command::UpdateNode`].
pub(super) fn apply_update_node(
    state: &mut ClusterState,
    id: NodeId,
    update: &NodeUpdate,
    at: u64,
) -> Result<(), Refusal> {
    let node = state.nodes.get_mut(&id).ok_or_else(|| no_such_node(id))?;
    if let Some(role) = update.role {
        node.role = role;
    }
    if let Some(availability) = update.availability {
        node.availability = availability;
    }
    for key in &update.label_rm {
        node.labels.remove(key);
    }
    node.labels
        .extend(update.label_add.iter().map(|(k, v)| (k.clone(), v.clone())));
    node.updated_at = at;
    Ok(())
}

/// Applies [`Command::SetNodeStatus`].
pub(super) fn apply_set_node_status(
    state: &mut ClusterState,
    id: NodeId,
    status: NodeStatus,
    message: &str,
    agent_version: &str,
    at: u64,
) -> Result<(), Refusal> {
    let node = state.nodes.get_mut(&id).ok_or_else(|| no_such_node(id))?;
    // A heartbeat read before the leave and committed after it
    // must not bring a node that left back.
    if node.status_message == LEFT_THE_SWARM && status != NodeStatus::Down {
        return Err(refusal!("node {} left the swarm", node_id_text(id)));
    }
    node.status = status;
    node.status_message = message.to_string();
    if !agent_version.is_empty() {
        node.agent_version = agent_version.to_string();
    }
    node.updated_at = at;
    Ok(())
}

/// Applies [`Command::RemoveNode`].
pub(super) fn apply_remove_node(state: &mut ClusterState, id: NodeId) -> Result<(), Refusal> {
    state.nodes.remove(&id).ok_or_else(|| no_such_node(id))?;
    state.removed.insert(id);
    // It may hold pair keys of the current overlay key.
    if let Some(key) = state.overlay_key.as_mut() {
        key.stale = true;
    }
    Ok(())
}

/// Applies [`Command::SetNodeWireguardKey`].
pub(super) fn apply_set_node_wireguard_key(state: &mut ClusterState, id: NodeId, key: &str) -> Result<(), Refusal> {
    crate::api::assignment::tunnel::parse_public_key(key)?;
    state.nodes.get_mut(&id).ok_or_else(|| no_such_node(id))?.wireguard_key = key.to_string();
    Ok(())
}

/// Applies [`Command::SetNodeResources`].
pub(super) fn apply_set_node_resources(
    state: &mut ClusterState,
    id: NodeId,
    resources: crate::api::resources::NodeResources,
) -> Result<(), Refusal> {
    state.nodes.get_mut(&id).ok_or_else(|| no_such_node(id))?.resources = resources;
    Ok(())
}

/// Applies [`Command::RecordNodeCert`].
pub(super) fn apply_record_node_cert(
    state: &mut ClusterState,
    id: NodeId,
    issued: &Issued,
    grace_secs: u64,
) -> Result<(), Refusal> {
    let node = state.nodes.get_mut(&id).ok_or_else(|| no_such_node(id))?;
    node.certs = node.certs.renewed(issued.clone(), grace_secs);
    Ok(())
}
