//! What the swarm visualizer draws, made from the store (pure): one column
//! per node, one box per live placed task, a name per service. The page
//! and its server are `metrics::visualizer`.

use serde::Serialize;

use crate::api::service::{DesiredState, TaskState};

use crate::api::{objects::node_id_text, store::ClusterState};
use crate::metrics::label;

/// A node's column.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub(crate) struct NodeBox {
    pub(crate) id: String,
    pub(crate) hostname: String,
    pub(crate) role: String,
    pub(crate) status: String,
    pub(crate) availability: String,
}

/// A task's box.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub(crate) struct TaskBox {
    pub(crate) id: String,
    pub(crate) service: String,
    pub(crate) slot: u32,
    pub(crate) node: String,
    pub(crate) state: String,
}

/// A service's name.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub(crate) struct ServiceName {
    pub(crate) id: String,
    pub(crate) name: String,
}

/// What the page draws.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) nodes: Vec<NodeBox>,
    pub(crate) services: Vec<ServiceName>,
    pub(crate) tasks: Vec<TaskBox>,
}

/// The swarm as the page draws it: every node (by hostname), and the
/// tasks placed on a node that are wanted running or have not ended yet
/// (pure).
pub(crate) fn view(state: &ClusterState) -> View {
    let mut nodes: Vec<NodeBox> = state
        .nodes
        .values()
        .map(|n| NodeBox {
            id: node_id_text(n.id),
            hostname: n.hostname.clone(),
            role: label(&n.role),
            status: label(&n.status),
            availability: label(&n.availability),
        })
        .collect();
    nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    View {
        nodes,
        services: state
            .services
            .values()
            .map(|s| ServiceName {
                id: node_id_text(s.id),
                name: s.spec.name.clone(),
            })
            .collect(),
        tasks: state
            .tasks
            .values()
            .filter(|t| t.desired == DesiredState::Running || !t.state.is_terminal())
            .filter_map(|t| {
                Some(TaskBox {
                    id: node_id_text(t.id),
                    service: node_id_text(t.service),
                    slot: t.slot,
                    node: node_id_text(t.node?),
                    state: label(&t.state),
                })
            })
            .filter(|t| t.state != label(&TaskState::Shutdown))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{orchestrator::tests_support, state::tests::initialised};

    #[test]
    fn the_view_has_every_node_and_the_live_placed_tasks() {
        let mut s = initialised();
        s.services.insert(7, tests_support::service(7));
        s.tasks
            .insert(1, tests_support::task(1, 7, 1, Some(5), TaskState::Running));
        s.tasks
            .insert(2, tests_support::task(2, 7, 2, None, TaskState::Pending));
        let mut ended = tests_support::task(3, 7, 1, Some(5), TaskState::Failed);
        ended.desired = DesiredState::Shutdown;
        s.tasks.insert(3, ended);
        let v = view(&s);
        assert_eq!(v.nodes.len(), s.nodes.len());
        assert_eq!(v.tasks.len(), 1, "{v:?}");
        assert_eq!((v.tasks[0].state.as_str(), v.tasks[0].slot), ("running", 1));
        assert_eq!(v.services[0].name, s.services[&7].spec.name);
    }
}
