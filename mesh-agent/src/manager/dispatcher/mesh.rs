//! The routing mesh as the cluster decides it (pure): which published ports
//! a node answers and which tasks stand behind them. Every node answers a
//! port published in ingress mode; a port published in host mode is only
//! answered by the nodes running one of its tasks, by those tasks.

use std::collections::BTreeMap;

use crate::api::service::{DesiredState, TaskState};

use crate::api::assignment::mesh::{FleetService, MeshFleet};
use crate::api::{objects::NodeId, store::ClusterState};

/// The fleet's mesh in `state`: one pass over the tasks and one over
/// the nodes; `None` when no service publishes a port.
pub(crate) fn fleet_of(state: &ClusterState) -> Option<MeshFleet> {
    let mut running: BTreeMap<u64, Vec<(u64, NodeId, String)>> = BTreeMap::new();
    for t in state
        .tasks
        .values()
        .filter(|t| t.desired == DesiredState::Running && t.state == TaskState::Running)
    {
        let (Some(on), Some(service)) = (t.node, state.services.get(&t.service)) else {
            continue;
        };
        let Some(host) = state.nodes.get(&on).filter(|_| !service.spec.publish.is_empty()) else {
            continue;
        };
        running
            .entry(t.service)
            .or_default()
            .push((t.id, on, host.data_path_addr.clone()));
    }
    let services: Vec<FleetService> = state
        .services
        .values()
        .filter(|s| !s.spec.publish.is_empty())
        .map(|s| FleetService {
            service: s.id,
            name: s.spec.name.clone(),
            ports: s.spec.publish.clone(),
            lb: s.spec.lb,
            running: running.remove(&s.id).unwrap_or_default(),
        })
        .collect();
    if services.is_empty() {
        return None;
    }
    let mut nodes: Vec<(NodeId, String)> = state
        .nodes
        .values()
        .filter(|n| !n.data_path_addr.is_empty())
        .map(|n| (n.id, n.data_path_addr.clone()))
        .collect();
    nodes.sort_by(|a, b| a.1.cmp(&b.1));
    Some(MeshFleet { services, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{assignment::mesh::MeshAssignment, service::PortPublish};
    use crate::{
        api::{objects::Role, service::Task},
        manager::{
            orchestrator::tests_support::{self, service},
            state::tests::node,
        },
    };

    /// Node `node`'s routing mesh as the dispatcher's answer gives it.
    fn mesh_assignment(state: &ClusterState, node: NodeId) -> Option<MeshAssignment> {
        fleet_of(state)?.assignment_for(node)
    }

    fn task(id: u64, service: u64, node: u64, state: TaskState) -> Task {
        tests_support::task(id, service, id as u32, Some(node), state)
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            let mut n = node(id, Role::Worker);
            n.data_path_addr = format!("10.0.0.{id}");
            s.nodes.insert(id, n);
        }
        let mut web = service(7);
        web.spec.publish = vec![PortPublish::parse("8080:80").unwrap()];
        s.services.insert(7, web);
        let mut host = service(8);
        host.spec.publish = vec![PortPublish::parse("published=9090,target=90,mode=host").unwrap()];
        s.services.insert(8, host);
        s.services.insert(9, service(9));
        s.tasks.insert(70, task(70, 7, 1, TaskState::Running));
        s.tasks.insert(71, task(71, 7, 2, TaskState::Running));
        s.tasks.insert(72, task(72, 7, 2, TaskState::Starting));
        s.tasks.insert(80, task(80, 8, 1, TaskState::Running));
        s.tasks.insert(90, task(90, 9, 3, TaskState::Running));
        s
    }

    #[test]
    fn ingress_ports_are_everywhere_host_ports_only_where_tasks_run() {
        let s = cluster();
        let on3 = mesh_assignment(&s, 3).unwrap();
        assert_eq!(on3.services.len(), 1, "node 3 runs no task of the host-mode service");
        let web = &on3.services[0];
        assert_eq!(web.service, 7);
        assert_eq!(
            web.backends.iter().map(|b| (b.task, b.local)).collect::<Vec<_>>(),
            vec![(70, false), (71, false)],
            "only running tasks take connections"
        );
        assert_eq!(on3.peers, vec!["10.0.0.1", "10.0.0.2"]);
        let on1 = mesh_assignment(&s, 1).unwrap();
        assert_eq!(on1.services.len(), 2);
        assert!(on1.services[0].backends[0].local);
    }

    #[test]
    fn a_task_leaving_running_leaves_every_table() {
        let mut s = cluster();
        s.tasks.get_mut(&70).unwrap().desired = DesiredState::Shutdown;
        s.tasks.get_mut(&71).unwrap().state = TaskState::Failed;
        let web = mesh_assignment(&s, 3).unwrap().services.remove(0);
        assert!(web.backends.is_empty());
        s.services.clear();
        assert_eq!(mesh_assignment(&s, 3), None);
    }
}
