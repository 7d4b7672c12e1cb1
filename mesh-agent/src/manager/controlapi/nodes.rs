//! The cluster API: `node ls|inspect|update|rm`: the nodes as the store has them, and the
//! changes refused when they would break the Raft store.

use crate::api::objects::NodeUpdate;
use crate::manager::*;

impl Manager {
    pub(in crate::manager) async fn node_list(
        &self,
        state: &Arc<ClusterState>,
        voters: &BTreeSet<NodeId>,
    ) -> ApiResult<ClusterResponse> {
        let reachable = self.reachable(state);
        let nodes = state.nodes.values().map(|n| self.view(n, voters, &reachable)).collect();
        Ok(ClusterResponse::Nodes(nodes))
    }

    pub(in crate::manager) async fn node_inspect(
        &self,
        state: &Arc<ClusterState>,
        voters: &BTreeSet<NodeId>,
        node: String,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_node(state, &node)?;
        let reachable = self.reachable(state);
        Ok(ClusterResponse::Node(Box::new(self.view(
            &state.nodes[&id],
            voters,
            &reachable,
        ))))
    }

    pub(in crate::manager) async fn node_update(
        &self,
        state: &Arc<ClusterState>,
        voters: &BTreeSet<NodeId>,
        node: String,
        update: NodeUpdate,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_node(state, &node)?;
        if update.role == Some(Role::Worker) && state.nodes[&id].role == Role::Manager {
            let managers_left = state.managers().len() - 1;
            if managers_left == 0 {
                return Err(ApiError::precondition(format!(
                        "cannot demote node {}: it is the last manager; promote another node first (`meshctl node promote NODE`)",
                        node_id_text(id)
                    )));
            }
            rules::check_voter_removal(voters, &self.reachable(state), id, "demote")?;
        }
        for key in update.label_add.keys().chain(update.label_rm.iter()) {
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(ApiError::invalid(format!("invalid label key {key:?}")));
            }
        }
        self.propose(Command::UpdateNode {
            id,
            update,
            at: unix_now(),
        })
        .await?;
        Ok(ClusterResponse::Done)
    }

    pub(in crate::manager) async fn node_remove(
        &self,
        state: &Arc<ClusterState>,
        voters: &BTreeSet<NodeId>,
        node: String,
        force: bool,
    ) -> ApiResult<ClusterResponse> {
        let id = rules::resolve_node(state, &node)?;
        rules::check_node_removal(state, voters, id, force)?;
        self.propose(Command::RemoveNode { id }).await?;
        self.liveness.locked().forget(id);
        self.propagation.locked().forget(id);
        self.fact_writes.locked().forget(id);
        Ok(ClusterResponse::Done)
    }
}
