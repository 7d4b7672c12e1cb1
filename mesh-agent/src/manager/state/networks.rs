//! Applying the commands that change overlay networks (pure).

use crate::manager::state::*;

/// Applies [`Command::CreateNetwork`].
pub(super) fn apply_create_network(state: &mut ClusterState, network: &Network) -> Result<(), Refusal> {
    create_network(state, network)?;
    Ok(())
}

/// Applies [`Command::RemoveNetwork`].
pub(super) fn apply_remove_network(state: &mut ClusterState, id: u64) -> Result<(), Refusal> {
    let network = state
        .networks
        .get(&id)
        .ok_or_else(|| format!("network {id} not found"))?;
    state.check_network_unused(network)?;
    state.networks.remove(&id);
    Ok(())
}
