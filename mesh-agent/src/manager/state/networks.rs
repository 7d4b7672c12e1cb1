//! Applying the commands that change overlay networks (pure).

use crate::manager::state::*;

impl ClusterState {
    /// Applies [`Command::CreateNetwork`].
    pub(super) fn apply_create_network(&mut self, network: &Network) -> Result<(), Refusal> {
        self.create_network(network)?;
        Ok(())
    }

    /// Applies [`Command::RemoveNetwork`].
    pub(super) fn apply_remove_network(&mut self, id: u64) -> Result<(), Refusal> {
        let network = self
            .networks
            .get(&id)
            .ok_or_else(|| format!("network {id} not found"))?;
        self.check_network_unused(network)?;
        self.networks.remove(&id);
        Ok(())
    }
}
