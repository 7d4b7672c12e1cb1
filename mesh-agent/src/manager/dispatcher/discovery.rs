//! Service discovery as the cluster decides it (pure): for each overlay
//! network a node's tasks are on, the services on that network with their
//! virtual IP there and their running tasks' addresses there. A node's DNS
//! responder answers from this, and its VIP programs load-balance over it;
//! a node learns only about the networks its own tasks are on.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::api::service::{DesiredState, EndpointMode, TaskState};

use crate::api::assignment::discovery::ServiceRecord;
use crate::api::store::ClusterState;

/// The services on each of `networks`: one pass over the tasks, then one
/// over the services per network. The dispatcher makes this once per
/// state for every network and gives each node the networks it needs.
pub(crate) fn by_network(state: &ClusterState, networks: &BTreeSet<u64>) -> BTreeMap<u64, Vec<ServiceRecord>> {
    // (network, service) -> its running tasks there, in task ID order.
    let mut running: BTreeMap<(u64, u64), Vec<(u64, Ipv4Addr)>> = BTreeMap::new();
    for t in state
        .tasks
        .values()
        .filter(|t| t.desired == DesiredState::Running && t.state == TaskState::Running)
    {
        for a in t.attachments.iter().filter(|a| networks.contains(&a.network)) {
            running
                .entry((a.network, t.service))
                .or_default()
                .push((t.id, a.address));
        }
    }
    let mut out = BTreeMap::new();
    for &network in networks {
        let name = state.networks.get(&network).map(|n| n.name.as_str());
        let mut services = Vec::new();
        for service in state.services.values() {
            let vip = service.vips.iter().find(|v| v.network == network).map(|v| v.address);
            let dnsrr_here = service.spec.endpoint_mode == EndpointMode::Dnsrr
                && name.is_some_and(|n| service.spec.networks.iter().any(|s| s == n));
            if vip.is_none() && !dnsrr_here {
                continue;
            }
            services.push(ServiceRecord {
                service: service.id,
                name: service.spec.name.clone(),
                vip,
                tasks: running.remove(&(network, service.id)).unwrap_or_default(),
                lb: service.spec.lb,
            });
        }
        out.insert(network, services);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{
            assignment::discovery::NetworkServices,
            network::{NetworkAttachment, TaskNetwork},
            service::{Assignment, Task, TaskSpec},
        },
        manager::orchestrator::tests_support::{self, service},
    };

    /// What node `tasks`' networks hold.
    fn discovery(state: &ClusterState, tasks: &[Assignment]) -> Vec<NetworkServices> {
        let networks: BTreeSet<u64> = tasks
            .iter()
            .flat_map(|t| t.spec.networks.iter().map(|n| n.network))
            .collect();
        let mut all = by_network(state, &networks);
        networks
            .into_iter()
            .map(|network| NetworkServices {
                network,
                services: all.remove(&network).unwrap_or_default().into(),
            })
            .collect()
    }

    fn task(id: u64, service: u64, state: TaskState, address: [u8; 4]) -> Task {
        Task {
            attachments: vec![NetworkAttachment {
                network: 5,
                address: Ipv4Addr::from(address),
            }],
            ..tests_support::task(id, service, id as u32, Some(1), state)
        }
    }

    #[test]
    fn a_network_lists_its_services_vips_and_running_tasks() {
        let mut s = ClusterState::default();
        let mut api = service(1);
        api.spec.name = "api".into();
        api.spec.networks = vec!["front".into()];
        api.vips = vec![NetworkAttachment {
            network: 5,
            address: Ipv4Addr::new(10, 0, 0, 2),
        }];
        s.services.insert(1, api);
        let mut other = service(2);
        other.spec.name = "elsewhere".into();
        s.services.insert(2, other);
        s.tasks.insert(10, task(10, 1, TaskState::Running, [10, 0, 0, 3]));
        s.tasks.insert(11, task(11, 1, TaskState::Starting, [10, 0, 0, 4]));
        let mine = Assignment {
            endpoints_pending: 0,
            task: 10,
            service: 1,
            desired: DesiredState::Running,
            state: TaskState::Running,
            spec: TaskSpec {
                networks: vec![TaskNetwork {
                    network: 5,
                    name: "front".into(),
                    vni: 4096,
                    subnet: crate::api::subnet::Subnet::parse("10.0.0.0/24").unwrap(),
                    gateway: Ipv4Addr::new(10, 0, 0, 1),
                    address: Ipv4Addr::new(10, 0, 0, 3),
                    mtu: None,
                    encryption: Default::default(),
                }],
                ..Default::default()
            },
        };
        let d = discovery(&s, &[mine]);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].services.len(), 1, "only services on the network");
        let api = &d[0].services[0];
        assert_eq!(api.vip, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(api.tasks, vec![(10, Ipv4Addr::new(10, 0, 0, 3))], "only running tasks");
        assert!(discovery(&s, &[]).is_empty());
    }
}
