//! Decisions the API makes before it proposes anything, as pure functions:
//! naming nodes, quorum safety of promote/demote/remove, and validation of
//! addresses and address pools given to `swarm init`/`join`.

use std::{collections::BTreeSet, net::SocketAddr};

use crate::api::subnet::Subnet;

use rustls::pki_types::{pem::PemObject, CertificateDer};

use crate::api::{
    cert_records::{self, Refusal},
    error::{ApiError, ApiResult},
    messages::CaView,
};

use crate::ca::pki;

use crate::api::{
    objects::{node_id_text, NodeId, NodeStatus, Role},
    store::ClusterState,
};

/// Finds a node by full ID, hostname or unique ID prefix (in that order).
pub fn resolve_node(state: &ClusterState, text: &str) -> ApiResult<NodeId> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::invalid("a node ID or hostname is required"));
    }
    if let Some(node) = state.nodes.values().find(|n| node_id_text(n.id) == text) {
        return Ok(node.id);
    }
    let by_name: Vec<NodeId> = state
        .nodes
        .values()
        .filter(|n| n.hostname == text)
        .map(|n| n.id)
        .collect();
    match by_name.as_slice() {
        [one] => return Ok(*one),
        [] => {}
        many => {
            return Err(ApiError::invalid(format!(
                "hostname {text:?} is shared by nodes {}; use the node ID",
                ids(many)
            )))
        }
    }
    let by_prefix: Vec<NodeId> = state
        .nodes
        .values()
        .filter(|n| node_id_text(n.id).starts_with(text))
        .map(|n| n.id)
        .collect();
    match by_prefix.as_slice() {
        [one] => Ok(*one),
        [] => Err(ApiError::not_found(format!(
            "node {text} not found (`meshctl node ls` lists the nodes)"
        ))),
        many => Err(ApiError::invalid(format!(
            "node ID prefix {text:?} matches nodes {}; give more characters",
            ids(many)
        ))),
    }
}

fn ids(list: &[NodeId]) -> String {
    list.iter().map(|id| node_id_text(*id)).collect::<Vec<_>>().join(", ")
}

/// Checks a service spec against the cluster: its networks exist and its
/// published ports are free (`except`: the service being updated).
pub(crate) fn check_service_in_cluster(
    state: &ClusterState,
    spec: &crate::api::service::ServiceSpec,
    except: Option<u64>,
) -> ApiResult<()> {
    // First, so a retried create whose first attempt landed hears that,
    // not that its own port is taken.
    if state
        .services
        .values()
        .any(|s| Some(s.id) != except && s.spec.name == spec.name)
    {
        return Err(ApiError::precondition(format!(
            "service {} already exists (`meshctl service update {}` changes it)",
            spec.name, spec.name
        )));
    }
    if let Some(net) = spec
        .networks
        .iter()
        .find(|n| !state.networks.values().any(|x| &x.name == *n))
    {
        return Err(ApiError::not_found(format!(
            "network {net} not found (`meshctl network ls` lists them; `meshctl network create --driver overlay {net}` makes it)"
        )));
    }
    for kind in [crate::api::secret::Kind::Secret, crate::api::secret::Kind::Config] {
        if let Some(r) = spec
            .refs(kind)
            .iter()
            .find(|r| !state.blobs(kind).values().any(|b| b.name == r.source))
        {
            return Err(ApiError::not_found(format!(
                "{} {} not found (`meshctl {} ls` lists them; `meshctl {} create {} FILE` makes it)",
                kind.name(),
                r.source,
                kind.name(),
                kind.name(),
                r.source
            )));
        }
    }
    let reserved = swarm_ports(state);
    for p in &spec.publish {
        if let Some((_, _, what)) = reserved
            .iter()
            .find(|(port, proto, _)| *port == p.published && *proto == p.protocol)
        {
            return Err(ApiError::invalid(format!(
                "port {}/{} is the swarm's own ({what}): publish another port",
                p.published,
                p.protocol.name()
            )));
        }
        let taken = state.services.values().filter(|s| Some(s.id) != except).find(|s| {
            s.spec
                .publish
                .iter()
                .any(|q| q.published == p.published && q.protocol == p.protocol)
        });
        if let Some(other) = taken {
            return Err(ApiError::precondition(format!(
                "port {} is already published by service {}",
                p.published, other.spec.name
            )));
        }
    }
    Ok(())
}

/// The ports the swarm itself uses on every node's addresses, which no
/// service may publish: the nodes' cluster ports, VXLAN, IPsec's VXLAN,
/// the routing mesh's tunnel and WireGuard.
fn swarm_ports(state: &ClusterState) -> Vec<(u16, crate::api::service::Protocol, &'static str)> {
    use crate::api::service::Protocol::{Tcp, Udp};
    let data = state
        .cluster
        .as_ref()
        .map_or(crate::api::objects::DEFAULT_DATA_PATH_PORT, |c| c.data_path_port);
    let mut ports = vec![
        (data, Udp, "overlay VXLAN"),
        (
            crate::api::assignment::ipsec::ipsec_vxlan_port(data),
            Udp,
            "IPsec overlays' VXLAN",
        ),
        (
            crate::api::assignment::mesh::tunnel_port(data),
            Udp,
            "the routing mesh's tunnel",
        ),
        (crate::api::assignment::tunnel::WIREGUARD_PORT, Udp, "WireGuard"),
    ];
    for n in state.nodes.values() {
        if let Some(port) = n.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()) {
            if !ports.iter().any(|(p, proto, _)| *p == port && *proto == Tcp) {
                ports.push((port, Tcp, "a node's cluster port"));
            }
        }
    }
    ports
}

/// Finds a service by name, full ID or unique ID prefix.
pub(crate) fn resolve_service(state: &ClusterState, text: &str) -> ApiResult<u64> {
    let services: Vec<(u64, &str)> = state.services.values().map(|s| (s.id, s.spec.name.as_str())).collect();
    resolve("service", services.into_iter(), text)
}

/// Finds an overlay network by name, full ID or unique ID prefix.
pub(crate) fn resolve_network(state: &ClusterState, text: &str) -> ApiResult<u64> {
    let networks = state.networks.values().map(|n| (n.id, n.name.as_str()));
    resolve("network", networks, text)
}

/// Finds a secret or config by name, full ID or unique ID prefix.
pub fn resolve_blob(state: &ClusterState, kind: crate::api::secret::Kind, text: &str) -> ApiResult<u64> {
    let blobs = state.blobs(kind).values().map(|b| (b.id, b.name.as_str()));
    resolve(kind.name(), blobs, text)
}

/// Finds one of `items` (ID, name) by name, full ID or unique ID prefix.
fn resolve<'a>(kind: &str, items: impl Iterator<Item = (u64, &'a str)> + Clone, text: &str) -> ApiResult<u64> {
    let text = text.trim();
    if let Some((id, _)) = items
        .clone()
        .find(|(id, name)| *name == text || node_id_text(*id) == text)
    {
        return Ok(id);
    }
    let by_prefix: Vec<u64> = items
        .filter(|(id, _)| !text.is_empty() && node_id_text(*id).starts_with(text))
        .map(|(id, _)| id)
        .collect();
    match by_prefix.as_slice() {
        [one] => Ok(*one),
        [] => Err(ApiError::not_found(format!(
            "{kind} {text} not found (`meshctl {kind} ls` lists them)"
        ))),
        many => Err(ApiError::invalid(format!(
            "{kind} ID prefix {text:?} matches {}; give more characters",
            ids(many)
        ))),
    }
}

/// Whether taking `target` out of the Raft voters (demote or leave) keeps the
/// cluster able to commit. `voters` is the current Raft voter set and
/// `reachable` the voters the leader hears from.
pub(crate) fn check_voter_removal(
    voters: &BTreeSet<NodeId>,
    reachable: &BTreeSet<NodeId>,
    target: NodeId,
    what: &str,
) -> ApiResult<()> {
    if !voters.contains(&target) {
        return Ok(());
    }
    let remaining: BTreeSet<NodeId> = voters.iter().copied().filter(|id| *id != target).collect();
    if remaining.is_empty() {
        return Err(ApiError::precondition(format!(
            "cannot {what} node {}: it is the last manager, and the cluster would have no store left; promote another node first (`meshctl node promote NODE`)",
            node_id_text(target)
        )));
    }
    let quorum = remaining.len() / 2 + 1;
    let up = remaining.intersection(reachable).count();
    if up < quorum {
        return Err(ApiError::precondition(format!(
            "cannot {what} node {}: only {up} of the {} remaining managers are reachable, fewer than the {quorum} a quorum needs; bring managers back first",
            node_id_text(target),
            remaining.len()
        )));
    }
    Ok(())
}

/// A caller as its certificate presents it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller<'a> {
    /// The node ID in the certificate.
    pub(crate) id: NodeId,
    /// The role in the certificate.
    pub(crate) certified: Role,
    /// The certificate's serial (hex).
    pub(crate) serial: &'a str,
}

/// Whether `caller` may make a call that needs `needs` at `now` (unix
/// seconds), by the store: the certificate proves who the caller is; only
/// the store says whether it is still a member, a manager, and whether
/// this certificate is still the one issued to it. A removed node's
/// certificate, a demoted manager's, and one replaced by a renewal (after
/// a short grace) are refused.
pub(crate) fn check_caller(state: &ClusterState, caller: Caller<'_>, needs: Role, now: u64) -> ApiResult<()> {
    let id = caller.id;
    let Some(node) = state.nodes.get(&id) else {
        return Err(ApiError::denied(format!(
            "node {} is not a member of this swarm (it was removed): its certificate is no longer honoured; join again with a token",
            node_id_text(id)
        )));
    };
    if let Err(Refusal::Superseded { replaced_at }) = node.certs.check(caller.serial, now) {
        return Err(ApiError::denied(format!(
            "this certificate of node {} (serial {}) was replaced by one issued at unix time {replaced_at} (renewal, role change or CA rotation) and is no longer honoured",
            node_id_text(id),
            caller.serial
        )));
    }
    if needs != Role::Manager {
        return Ok(());
    }
    match (caller.certified, node.role) {
        (Role::Manager, Role::Manager) => Ok(()),
        (Role::Manager, Role::Worker) => Err(ApiError::denied(format!(
            "node {} is no longer a manager (it was demoted): its manager certificate is not honoured for this call",
            node_id_text(id)
        ))),
        (Role::Worker, _) => Err(ApiError::denied(
            "this call is reserved to managers; the caller's certificate is not a manager's",
        )),
    }
}

/// Whether the operator certificate of `name` with `serial` is honoured at
/// `now`: only while the store records it (`swarm operator-cert rm`
/// revokes it at once) and until it expires.
pub(crate) fn check_operator(state: &ClusterState, name: &str, serial: &str, now: u64) -> ApiResult<()> {
    match cert_records::check_operator(state.operators.get(name), serial, now) {
        Ok(()) => Ok(()),
        Err(Refusal::Revoked) => Err(ApiError::denied(format!(
            "the operator certificate of {name:?} was revoked (`meshctl swarm operator-cert rm`); ask a manager's operator for a new one"
        ))),
        Err(Refusal::Replaced) => Err(ApiError::denied(format!(
            "this operator certificate of {name:?} (serial {serial}) was revoked and another issued under that name; use the newer one"
        ))),
        Err(Refusal::Expired | Refusal::Superseded { .. }) => Err(ApiError::denied(format!(
            "the operator certificate of {name:?} expired; issue a new one with `meshctl swarm operator-cert --name {name}` on a manager"
        ))),
    }
}

/// SHA-256 (hex) of a root certificate's PEM ("" if it does not parse).
fn root_digest(pem: &str) -> String {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| hex::encode(pki::cert_digest(&der)))
        .unwrap_or_default()
}

/// The trusted roots at `now`, and who still holds a certificate from a
/// previous one: every node whose recorded certificate is not from the
/// current root, and every operator whose unexpired one is not.
pub(crate) fn ca_view(state: &ClusterState, now: u64) -> CaView {
    let Some(ca) = &state.ca else {
        return CaView {
            current: String::new(),
            previous: Vec::new(),
            previous_until: 0,
            nodes_pending: Vec::new(),
            operators_pending: Vec::new(),
        };
    };
    let current = root_digest(&ca.root_cert_pem);
    let rotating = !ca.previous_roots_pem.is_empty();
    CaView {
        previous: ca.previous_roots_pem.iter().map(|p| root_digest(p)).collect(),
        previous_until: ca.previous_until,
        nodes_pending: state
            .nodes
            .values()
            .filter(|n| rotating && n.certs.current.ca != current)
            .map(|n| n.hostname.clone())
            .collect(),
        operators_pending: state
            .operators
            .iter()
            .filter(|(_, o)| rotating && o.ca != current && o.not_after >= now)
            .map(|(name, _)| name.clone())
            .collect(),
        current,
    }
}

/// Whether the previous roots can be dropped at `now`: every node and live
/// operator holds a certificate from the current root, or their deadline
/// passed.
pub(crate) fn previous_roots_done(state: &ClusterState, now: u64) -> bool {
    let Some(ca) = &state.ca else { return false };
    if ca.previous_roots_pem.is_empty() {
        return false;
    }
    if ca.previous_until != 0 && now >= ca.previous_until {
        return true;
    }
    let view = ca_view(state, now);
    view.nodes_pending.is_empty() && view.operators_pending.is_empty()
}

/// Whether a joining node may take `advertise` (its cluster address) and
/// `data_path` (its overlay address): not while another member that is
/// not down has either, or the other node's Raft and overlay traffic would
/// go to the newcomer. A node that is down may be the same host joining
/// again, so its addresses are free.
pub(crate) fn check_join_addresses(state: &ClusterState, advertise: &SocketAddr, data_path: &str) -> ApiResult<()> {
    let advertise_text = advertise.to_string();
    for node in state.nodes.values().filter(|n| n.status != NodeStatus::Down) {
        let same_advertise = node.addr == advertise_text;
        let same_data_path = node.data_path_addr == data_path;
        if same_advertise || same_data_path {
            let (what, address) = if same_advertise {
                ("advertise address", advertise_text.as_str())
            } else {
                ("data path address", data_path)
            };
            return Err(ApiError::precondition(format!(
                "the {what} {address} is already node {} ({})'s, and that node is not down: give this node its own address (--advertise-addr, --data-path-addr), or remove the other node first (`meshctl node rm`)",
                node_id_text(node.id),
                node.hostname
            )));
        }
    }
    Ok(())
}

/// `swarm ca --rotate --previous-root-ttl`: from 1 minute to 90 days.
pub(crate) fn check_previous_root_ttl(secs: u64) -> ApiResult<()> {
    if (60..=90 * 86400).contains(&secs) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "--previous-root-ttl must be between 1m and 2160h: it bounds how long nodes that have not renewed stay trusted",
        ))
    }
}

/// Whether `node rm` may remove `target`.
pub(crate) fn check_node_removal(
    state: &ClusterState,
    voters: &BTreeSet<NodeId>,
    target: NodeId,
    force: bool,
) -> ApiResult<()> {
    let node = state
        .nodes
        .get(&target)
        .ok_or_else(|| ApiError::not_found(format!("node {} not found", node_id_text(target))))?;
    if node.role == Role::Manager || voters.contains(&target) {
        return Err(ApiError::precondition(format!(
            "node {} is a manager and a member of the Raft store: demote it first (`meshctl node demote {}`), then remove it",
            node_id_text(target),
            node.hostname
        )));
    }
    if node.status != NodeStatus::Down && !force {
        return Err(ApiError::precondition(format!(
            "node {} ({}) is not down: stop it or run `meshctl swarm leave` on it first, or remove it anyway with --force",
            node_id_text(target),
            node.hostname
        )));
    }
    Ok(())
}

/// Validates `--default-addr-pool` and `--default-addr-pool-mask-length`.
pub fn check_address_pools(pools: &[String], mask_len: u8) -> ApiResult<()> {
    if !(8..=29).contains(&mask_len) {
        return Err(ApiError::invalid(format!(
            "--default-addr-pool-mask-length {mask_len} is out of range: use 8 to 29 (24 gives 254 addresses per network)"
        )));
    }
    let mut nets = Vec::new();
    for pool in pools {
        let net = Subnet::parse(pool).map_err(ApiError::invalid)?;
        if net.prefix > mask_len {
            return Err(ApiError::invalid(format!(
                "pool {pool} is smaller than one /{mask_len} network; use a larger pool or a longer mask length"
            )));
        }
        for other in &nets {
            if net.overlaps(*other) {
                return Err(ApiError::invalid(format!("pools {pool} and {other} overlap")));
            }
        }
        nets.push(net);
    }
    Ok(())
}

/// Most ended tasks `--task-history-limit` may keep per slot: history is
/// for `service ps`, and every kept task lives in the replicated store.
pub(crate) const MAX_TASK_HISTORY: u32 = 100;

/// Checks `--task-history-limit`.
pub(crate) fn check_task_history_limit(limit: u32) -> ApiResult<()> {
    if limit > MAX_TASK_HISTORY {
        return Err(ApiError::invalid(format!(
            "--task-history-limit {limit} is too large: keep at most {MAX_TASK_HISTORY} ended tasks per slot"
        )));
    }
    Ok(())
}

/// Checks `--data-path-port`: Docker's range, clear of the well-known
/// ports and the usual ephemeral range.
pub(crate) fn check_data_path_port(port: u16) -> ApiResult<()> {
    if !(1024..=49151).contains(&port) {
        return Err(ApiError::invalid(format!(
            "--data-path-port {port} is out of range: use a port from 1024 to 49151 (default 4789)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::objects::Node, manager::state::tests::node as test_node};

    fn state(nodes: &[(NodeId, &str, Role, NodeStatus)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, host, role, status) in nodes {
            let node = Node {
                hostname: host.to_string(),
                status: *status,
                ..test_node(*id, *role)
            };
            s.nodes.insert(*id, node);
        }
        s
    }

    #[test]
    fn a_service_name_taken_is_reported_before_its_ports() {
        use crate::api::service::PortPublish;
        let mut s = ClusterState::default();
        let mut web = crate::manager::orchestrator::tests_support::service(1);
        web.spec.name = "web".into();
        web.spec.publish = vec![PortPublish::parse("8080:80").unwrap()];
        s.services.insert(1, web.clone());
        // A retried create of the same service.
        let err = check_service_in_cluster(&s, &web.spec, None).unwrap_err();
        assert!(err.message.contains("service web already exists"), "{}", err.message);
        // Another service on its port.
        let mut api = web.spec.clone();
        api.name = "api".into();
        let err = check_service_in_cluster(&s, &api, None).unwrap_err();
        assert!(
            err.message.contains("already published by service web"),
            "{}",
            err.message
        );
        // The service itself, updated.
        assert!(check_service_in_cluster(&s, &web.spec, Some(1)).is_ok());
    }

    #[test]
    fn resolve_by_id_hostname_and_prefix() {
        let a = 36u64.pow(12) + 1; // starts with '1'
        let b = 36u64.pow(12) * 2 + 2; // starts with '2'
        let b2 = 36u64.pow(12) * 2 + 3;
        let s = state(&[
            (a, "alpha", Role::Manager, NodeStatus::Ready),
            (b, "beta", Role::Worker, NodeStatus::Ready),
            (b2, "beta", Role::Worker, NodeStatus::Ready),
        ]);
        assert_eq!(resolve_node(&s, &node_id_text(a)).unwrap(), a);
        assert_eq!(resolve_node(&s, "alpha").unwrap(), a);
        assert_eq!(resolve_node(&s, "1").unwrap(), a);
        assert!(resolve_node(&s, "beta")
            .unwrap_err()
            .message
            .contains("use the node ID"));
        assert!(resolve_node(&s, "2")
            .unwrap_err()
            .message
            .contains("give more characters"));
        assert_eq!(
            resolve_node(&s, "zzz").unwrap_err().kind,
            crate::api::error::ErrorKind::NotFound
        );
        assert_eq!(
            resolve_node(&s, " ").unwrap_err().kind,
            crate::api::error::ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn voter_removal_keeps_quorum() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        // All up: any one may go.
        assert!(check_voter_removal(&voters, &voters, 3, "demote").is_ok());
        // 2 down of 3: removing the third leaves 1 of 2 up, below quorum 2.
        assert!(check_voter_removal(&voters, &[1].into(), 2, "demote")
            .unwrap_err()
            .message
            .contains("quorum"));
        // Removing a down manager when the other two are up is fine.
        assert!(check_voter_removal(&voters, &[1, 2].into(), 3, "demote").is_ok());
        // The last manager never goes.
        assert!(check_voter_removal(&[1].into(), &[1].into(), 1, "demote")
            .unwrap_err()
            .message
            .contains("last manager"));
        // Not a voter: nothing to check.
        assert!(check_voter_removal(&voters, &voters, 9, "demote").is_ok());
    }

    #[test]
    fn node_removal_rules() {
        let s = state(&[
            (1, "m", Role::Manager, NodeStatus::Ready),
            (2, "w", Role::Worker, NodeStatus::Ready),
            (3, "d", Role::Worker, NodeStatus::Down),
        ]);
        let voters = [1].into();
        assert!(check_node_removal(&s, &voters, 1, true)
            .unwrap_err()
            .message
            .contains("demote it first"));
        assert!(check_node_removal(&s, &voters, 2, false)
            .unwrap_err()
            .message
            .contains("--force"));
        assert!(check_node_removal(&s, &voters, 2, true).is_ok());
        assert!(check_node_removal(&s, &voters, 3, false).is_ok());
        assert!(check_node_removal(&s, &voters, 7, false).is_err());
    }

    #[test]
    fn pools() {
        assert!(check_address_pools(&["10.0.0.0/8".into()], 24).is_ok());
        assert!(check_address_pools(&["10.0.0.1/8".into()], 24)
            .unwrap_err()
            .message
            .contains("did you mean 10.0.0.0/8"));
        assert!(check_address_pools(&["10.0.0.0/33".into()], 24).is_err());
        assert!(check_address_pools(&["banana".into()], 24).is_err());
        assert!(check_address_pools(&["10.0.0.0/8".into()], 30).is_err());
        assert!(check_address_pools(&["10.0.0.0/26".into()], 24)
            .unwrap_err()
            .message
            .contains("smaller"));
        assert!(check_address_pools(&["10.0.0.0/8".into(), "10.5.0.0/16".into()], 24)
            .unwrap_err()
            .message
            .contains("overlap"));
    }

    #[test]
    fn data_path_ports_stay_in_dockers_range() {
        assert!(check_data_path_port(4789).is_ok());
        assert!(check_data_path_port(1024).is_ok() && check_data_path_port(49151).is_ok());
        for bad in [80, 1023, 49152] {
            assert!(check_data_path_port(bad).unwrap_err().message.contains("1024 to 49151"));
        }
    }

    fn caller(id: NodeId, certified: Role) -> Caller<'static> {
        Caller {
            id,
            certified,
            serial: "s1",
        }
    }

    #[test]
    fn callers_are_judged_by_the_store_not_by_their_certificate() {
        use crate::manager::state::tests::{initialised, node};
        let mut s = initialised();
        s.nodes.insert(5, node(5, Role::Manager));
        s.nodes.insert(6, node(6, Role::Worker));
        assert!(check_caller(&s, caller(5, Role::Manager), Role::Manager, 0).is_ok());
        assert!(check_caller(&s, caller(6, Role::Worker), Role::Worker, 0).is_ok());
        let denied = |r: ApiResult<()>| r.map_err(|e| (e.kind, e.message)).unwrap_err();
        let (kind, why) = denied(check_caller(&s, caller(6, Role::Manager), Role::Manager, 0));
        assert_eq!(kind, crate::api::error::ErrorKind::PermissionDenied);
        assert!(why.contains("demoted"), "{why}");
        let (_, why) = denied(check_caller(&s, caller(6, Role::Worker), Role::Manager, 0));
        assert!(why.contains("reserved to managers"), "{why}");
        let (_, why) = denied(check_caller(&s, caller(7, Role::Manager), Role::Worker, 0));
        assert!(why.contains("removed"), "{why}");
        // Promoted but not yet renewed: a worker's certificate stays a worker's.
        assert!(check_caller(&s, caller(5, Role::Worker), Role::Manager, 0).is_err());
    }

    fn issued(serial: &str, ca: &str, at: u64) -> cert_records::Issued {
        cert_records::Issued {
            serial: serial.into(),
            ca: ca.into(),
            issued_at: at,
            not_after: at + 1000,
        }
    }

    #[test]
    fn a_joining_node_cannot_take_a_live_nodes_addresses() {
        let mut s = state(&[
            (1, "h1", Role::Manager, NodeStatus::Ready),
            (2, "h2", Role::Worker, NodeStatus::Down),
        ]);
        let n1 = s.nodes.get_mut(&1).unwrap();
        n1.addr = "192.0.2.1:2377".into();
        n1.data_path_addr = "198.51.100.1".into();
        let n2 = s.nodes.get_mut(&2).unwrap();
        n2.addr = "192.0.2.2:2377".into();
        n2.data_path_addr = "192.0.2.2".into();
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        let why = check_join_addresses(&s, &at("192.0.2.1:2377"), "192.0.2.9").unwrap_err();
        assert_eq!(why.kind, crate::api::error::ErrorKind::FailedPrecondition);
        assert!(
            why.message.contains("advertise address 192.0.2.1:2377") && why.message.contains("(h1)"),
            "{}",
            why.message
        );
        let why = check_join_addresses(&s, &at("192.0.2.9:2377"), "198.51.100.1").unwrap_err();
        assert!(
            why.message.contains("data path address 198.51.100.1"),
            "{}",
            why.message
        );
        // Another port on the same host is another address.
        assert!(check_join_addresses(&s, &at("192.0.2.1:2378"), "192.0.2.9").is_ok());
        // A down node's addresses are free: it may be this host again.
        assert!(check_join_addresses(&s, &at("192.0.2.2:2377"), "192.0.2.2").is_ok());
    }

    #[test]
    fn a_renewed_nodes_old_certificate_is_refused_after_the_grace() {
        use crate::{
            api::cert_records::NodeCerts,
            manager::state::tests::{initialised, node},
        };
        let mut s = initialised();
        let mut worker = node(6, Role::Worker);
        worker.certs = NodeCerts::first(issued("s1", "c", 100)).renewed(issued("s2", "c", 200), 30);
        s.nodes.insert(6, worker);
        let new = Caller {
            serial: "s2",
            ..caller(6, Role::Worker)
        };
        assert!(check_caller(&s, new, Role::Worker, 1000).is_ok());
        assert!(check_caller(&s, caller(6, Role::Worker), Role::Worker, 230).is_ok());
        let why = check_caller(&s, caller(6, Role::Worker), Role::Worker, 231).unwrap_err();
        assert_eq!(why.kind, crate::api::error::ErrorKind::PermissionDenied);
        assert!(
            why.message.contains("replaced by one issued at unix time 200"),
            "{}",
            why.message
        );
    }

    #[test]
    fn operator_certificates_are_honoured_while_recorded() {
        let mut s = crate::manager::state::tests::initialised();
        s.operators.insert("alice".into(), issued("a1", "c", 100));
        assert!(check_operator(&s, "alice", "a1", 500).is_ok());
        let why = check_operator(&s, "alice", "a0", 500).unwrap_err().message;
        assert!(why.contains("use the newer one"), "{why}");
        let why = check_operator(&s, "alice", "a1", 2000).unwrap_err().message;
        assert!(why.contains("expired"), "{why}");
        let why = check_operator(&s, "bob", "b1", 500).unwrap_err().message;
        assert!(why.contains("revoked"), "{why}");
    }

    #[test]
    fn previous_roots_go_once_everyone_moved_or_at_their_deadline() {
        use crate::{
            api::cert_records::NodeCerts,
            manager::state::tests::{initialised, node},
        };
        let mut s = initialised();
        let root = pki::RootCa::generate("c1").unwrap();
        let ca = s.ca.as_mut().unwrap();
        ca.root_cert_pem = root.cert_pem().to_string();
        let current = root_digest(&ca.root_cert_pem);
        assert!(!current.is_empty(), "the test CA parses");
        assert!(!previous_roots_done(&s, 0), "nothing to drop");
        let ca = s.ca.as_mut().unwrap();
        ca.previous_roots_pem = vec![ca.root_cert_pem.clone()];
        ca.previous_until = 10_000;
        let mut on = |id, ca: &str| {
            let mut n = node(id, Role::Worker);
            n.certs = NodeCerts::first(issued("s", ca, 100));
            n.hostname = format!("h{id}");
            s.nodes.insert(id, n);
        };
        on(1, &current);
        on(5, "old");
        on(6, &current);
        // An operator certificate that expired holds nothing back.
        let gone = cert_records::Issued {
            not_after: 400,
            ..issued("g", "old", 0)
        };
        s.operators.insert("gone".into(), gone);
        s.operators.insert("alice".into(), issued("a", "old", 100));
        let view = ca_view(&s, 2000);
        assert_eq!(view.nodes_pending, vec!["h5".to_string()]);
        assert_eq!(view.operators_pending, Vec::<String>::new(), "alice's expired at 1100");
        let view = ca_view(&s, 500);
        assert_eq!(view.operators_pending, vec!["alice".to_string()]);
        assert!(!previous_roots_done(&s, 500));
        assert!(previous_roots_done(&s, 10_000), "the deadline");
        s.nodes.get_mut(&5).unwrap().certs.current.ca = current.clone();
        s.operators.get_mut("alice").unwrap().ca = current;
        assert!(previous_roots_done(&s, 500), "everyone moved");
    }
}
