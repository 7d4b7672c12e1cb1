//! The shared parts of a node's assignments (each of its networks'
//! endpoints and services, the routing-mesh fleet), and holding back the
//! ones the node already has.
//!
//! Every change on a network wakes each node on it, and each used to get
//! all its parts again: at 5,000 simulated nodes the leader spent its time
//! sending (`perf`: memmove, AES-GCM and writev) while the orchestrator's
//! writes waited, and the load stalled. A node now names the parts it
//! holds when it polls ([`crate::api::messages::PeerRequest::Assignments`]);
//! those come back as their digest only, and the node puts its own copy
//! back ([`restore`]). Only the parts that changed travel.

use std::collections::{HashMap, HashSet};

use crate::api::{
    messages::{Assignments, PartDigest},
    network::Peer,
};

use super::{
    assignment::{discovery::ServiceRecord, mesh::MeshFleet},
    encoded::Encoded,
};

/// One shared part's place in an answer.
enum Slot<'a> {
    Peers(&'a mut Encoded<Vec<Peer>>),
    Services(&'a mut Encoded<Vec<ServiceRecord>>),
    Fleet(&'a mut Encoded<MeshFleet>),
}

/// Every shared part of `answer`: the networks' endpoints, then their
/// services, then the routing mesh (the order of `answer.parts`).
fn slots(answer: &mut Assignments) -> impl Iterator<Item = Slot<'_>> {
    let peers = answer.networks.iter_mut().map(|n| Slot::Peers(&mut n.peers));
    let services = answer.services.iter_mut().map(|s| Slot::Services(&mut s.services));
    let fleet = answer.mesh.iter_mut().map(|m| Slot::Fleet(&mut m.fleet));
    peers.chain(services).chain(fleet)
}

/// How many shared parts `answer` carries.
fn part_count(answer: &Assignments) -> usize {
    answer.networks.len() + answer.services.len() + usize::from(answer.mesh.is_some())
}

/// What a node holds once it has applied `answer`: the digests to name in
/// its next poll.
pub fn holds(answer: &Assignments) -> Vec<PartDigest> {
    answer.parts.iter().map(|p| p.digest).collect()
}

/// The digests of `answer`'s parts, computed from their encodings (what
/// `answer.parts` must list).
pub fn digests_of(answer: &Assignments) -> Vec<PartDigest> {
    use sha2::Digest;
    let mut answer = answer.clone();
    slots(&mut answer)
        .map(|slot| {
            let bytes = match slot {
                Slot::Peers(v) => v.bytes(),
                Slot::Services(v) => v.bytes(),
                Slot::Fleet(v) => v.bytes(),
            };
            sha2::Sha256::digest(bytes).into()
        })
        .collect()
}

/// Leaves out of `answer` the parts named in `holds` (the caller has them):
/// each is marked held and sent empty. Nothing else changes, the digest
/// included.
pub fn hold_back(answer: &mut Assignments, holds: &[PartDigest]) {
    if holds.is_empty() {
        return;
    }
    let holds: HashSet<&PartDigest> = holds.iter().collect();
    let mut refs = std::mem::take(&mut answer.parts);
    for (slot, part) in slots(answer).zip(refs.iter_mut()) {
        if !holds.contains(&part.digest) {
            continue;
        }
        part.held = true;
        match slot {
            Slot::Peers(v) => *v = Encoded::default(),
            Slot::Services(v) => *v = Encoded::default(),
            Slot::Fleet(v) => *v = Encoded::default(),
        }
    }
    answer.parts = refs;
}

/// Why an answer's held parts could not be put back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The answer lists another number of parts than it carries.
    #[error("the answer lists {listed} shared parts but carries {carried}")]
    Malformed { listed: usize, carried: usize },
    /// A part held back is not among the node's (or is of another kind).
    #[error("a shared part the manager held back ({}) is not among this node's", hex::encode(&digest[..6]))]
    Missing { digest: PartDigest },
}

/// Puts back into `answer` the parts the manager held back, taken from
/// `previous` (the node's last answer, itself restored; it is used up).
/// After it, the answer is whole. On an error the node should ask again
/// naming nothing.
pub fn restore(answer: &mut Assignments, previous: Option<Assignments>) -> Result<(), RestoreError> {
    if !answer.parts.iter().any(|p| p.held) {
        // Whole as sent (from a manager that lists no parts, too).
        return Ok(());
    }
    let carried = part_count(answer);
    if answer.parts.len() != carried {
        return Err(RestoreError::Malformed {
            listed: answer.parts.len(),
            carried,
        });
    }
    // Only a previous answer whose list matches its parts names them.
    let mut previous = previous.filter(|p| p.parts.len() == part_count(p)).unwrap_or_default();
    let digests = holds(&previous);
    let kept: HashMap<PartDigest, Slot<'_>> = digests.into_iter().zip(slots(&mut previous)).collect();
    let mut refs = std::mem::take(&mut answer.parts);
    let mut result = Ok(());
    for (slot, part) in slots(answer).zip(refs.iter_mut()) {
        if !part.held {
            continue;
        }
        match (slot, kept.get(&part.digest)) {
            (Slot::Peers(v), Some(Slot::Peers(k))) => *v = (*k).clone(),
            (Slot::Services(v), Some(Slot::Services(k))) => *v = (*k).clone(),
            (Slot::Fleet(v), Some(Slot::Fleet(k))) => *v = (*k).clone(),
            _ => {
                result = Err(RestoreError::Missing { digest: part.digest });
                break;
            }
        }
        part.held = false;
    }
    answer.parts = refs;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::messages::PartRef;
    use crate::api::{
        assignment::{discovery::NetworkServices, mesh::NodeMesh},
        network::NetworkPeers,
    };

    fn peers(n: u64, addrs: &[&str]) -> NetworkPeers {
        NetworkPeers {
            network: n,
            vni: 4096 + n as u32,
            peers: Encoded::new(
                addrs
                    .iter()
                    .map(|a| Peer {
                        address: "10.0.0.2".parse().unwrap(),
                        vtep: a.to_string(),
                    })
                    .collect(),
            ),
        }
    }

    /// An answer whose parts list their digests, as the dispatcher sends it.
    fn answer(networks: Vec<NetworkPeers>, fleet: Option<MeshFleet>) -> Assignments {
        let services = networks
            .iter()
            .map(|n| NetworkServices {
                network: n.network,
                services: Encoded::default(),
            })
            .collect();
        let mut a = Assignments {
            digest: "d".into(),
            networks,
            services,
            mesh: fleet.map(|f| NodeMesh {
                fleet: Encoded::new(f),
                node: 5,
            }),
            ..Assignments::default()
        };
        a.parts = digests_of(&a)
            .into_iter()
            .map(|digest| PartRef { digest, held: false })
            .collect();
        a
    }

    #[test]
    fn parts_the_node_holds_travel_as_digests_and_come_back_whole() {
        let fleet = MeshFleet::default();
        let first = answer(
            vec![peers(1, &["10.1.0.1"]), peers(2, &["10.1.0.2"])],
            Some(fleet.clone()),
        );
        // Network 2 changed since; the node holds the rest.
        let whole = answer(vec![peers(1, &["10.1.0.1"]), peers(2, &["10.1.0.9"])], Some(fleet));
        let mut sent = whole.clone();
        hold_back(&mut sent, &holds(&first));
        let held: Vec<bool> = sent.parts.iter().map(|p| p.held).collect();
        // Network 1's endpoints, both (empty) service lists, the fleet.
        assert_eq!(held, vec![true, false, true, true, true]);
        assert_eq!(sent.digest, whole.digest, "the digest is the whole answer's");
        assert!(sent.networks[0].peers.is_empty(), "not sent");
        assert_eq!(sent.networks[1].peers, whole.networks[1].peers, "what changed is sent");
        let wire = rmp_serde::to_vec(&sent).unwrap();
        assert!(wire.len() < rmp_serde::to_vec(&whole).unwrap().len());
        let mut got: Assignments = rmp_serde::from_slice(&wire).unwrap();
        restore(&mut got, Some(first)).unwrap();
        assert_eq!(got, whole);
    }

    #[test]
    fn nothing_is_held_back_from_a_node_that_names_nothing() {
        let whole = answer(vec![peers(1, &["10.1.0.1"])], None);
        let mut sent = whole.clone();
        hold_back(&mut sent, &[]);
        assert_eq!(sent, whole);
        restore(&mut sent, None).unwrap();
        assert_eq!(sent, whole);
        // A manager that lists no parts holds none back: taken as it is,
        // and it names nothing to hold.
        let mut unlisted = Assignments {
            parts: Vec::new(),
            ..whole.clone()
        };
        restore(&mut unlisted, Some(whole.clone())).unwrap();
        assert_eq!(unlisted.networks, whole.networks);
        assert!(holds(&unlisted).is_empty());
    }

    #[test]
    fn a_held_part_the_node_lacks_is_an_error_not_an_empty_part() {
        let first = answer(vec![peers(1, &["10.1.0.1"])], None);
        let mut sent = first.clone();
        hold_back(&mut sent, &holds(&first));
        // A node that lost its copy (restarted, or failed the last answer).
        let err = restore(&mut sent.clone(), None).unwrap_err();
        assert_eq!(
            err,
            RestoreError::Missing {
                digest: first.parts[0].digest
            }
        );
        // A part of another kind with the same digest is not taken for it.
        let mut other = Assignments {
            services: vec![NetworkServices {
                network: 1,
                services: Encoded::default(),
            }],
            ..Assignments::default()
        };
        other.parts = vec![PartRef {
            digest: first.parts[0].digest,
            held: false,
        }];
        assert!(matches!(
            restore(&mut sent.clone(), Some(other)),
            Err(RestoreError::Missing { .. })
        ));
        // A previous answer whose list does not match its parts is not
        // trusted to name them.
        let mut unaligned = first.clone();
        unaligned.parts.push(first.parts[0]);
        assert!(matches!(
            restore(&mut sent.clone(), Some(unaligned)),
            Err(RestoreError::Missing { .. })
        ));
        // A list that does not match what the answer carries.
        sent.parts.pop();
        assert!(matches!(
            restore(&mut sent, Some(first)),
            Err(RestoreError::Malformed { listed: 1, carried: 2 })
        ));
    }
}
