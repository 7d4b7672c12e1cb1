//! The cluster API: `network create|ls|inspect|rm`.

use crate::api::network::NetworkSpec;
use crate::manager::*;

impl Manager {
    pub(in crate::manager) async fn network_create(
        &self,
        state: &Arc<ClusterState>,
        spec: Box<NetworkSpec>,
    ) -> ApiResult<ClusterResponse> {
        let cluster = state.cluster.as_ref().ok_or_else(|| ApiError::internal("no cluster"))?;
        let pools = allocator::network::Pools {
            pools: cluster
                .default_addr_pool
                .iter()
                .map(|p| crate::api::subnet::Subnet::parse(p))
                .collect::<Result<_, _>>()
                .map_err(ApiError::internal)?,
            mask_len: cluster.default_addr_pool_mask_len,
        };
        let id = loop {
            let id: u64 = rand::thread_rng().gen();
            if id != 0 && !state.networks.contains_key(&id) {
                break id;
            }
        };
        let existing: Vec<&crate::api::network::Network> = state.networks.values().collect();
        let network = allocator::network::allocate_network(&spec, &existing, &pools, id, unix_now())?;
        self.propose(Command::CreateNetwork(Box::new(network))).await?;
        Ok(ClusterResponse::NetworkCreated { id })
    }

    pub(in crate::manager) async fn network_list(&self, state: &Arc<ClusterState>) -> ApiResult<ClusterResponse> {
        Ok(ClusterResponse::Networks(
            state.networks.values().map(|n| network_view(state, n)).collect(),
        ))
    }

    pub(in crate::manager) async fn network_inspect(
        &self,
        state: &Arc<ClusterState>,
        network: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_network(state, &network)?;
        Ok(ClusterResponse::Networks(vec![network_view(
            state,
            &state.networks[&id],
        )]))
    }

    pub(in crate::manager) async fn network_remove(
        &self,
        state: &Arc<ClusterState>,
        network: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_network(state, &network)?;
        state
            .check_network_unused(&state.networks[&id])
            .map_err(ApiError::precondition)?;
        self.propose(Command::RemoveNetwork { id }).await?;
        Ok(ClusterResponse::Done)
    }
}
