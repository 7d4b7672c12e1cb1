//! This node's IPsec: the XFRM state its assignment asks for ([`wanted`],
//! pure) and the kernel kept in line with it ([`Ipsec::apply`]).
//!
//! Rotation without loss: a node accepts the current and the previous
//! overlay key's associations, and moves its outbound traffic to a new key
//! only once it has known that key for [`OUTBOUND_SWITCH_DELAY`], by which
//! time every peer has been told it too (assignments reach every node
//! within a long poll). The kernel sends with the newest association to a
//! destination, so the switch is the addition of the new one.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::error::NetError;
use crate::{
    api::assignment::ipsec::{EspEpoch, IpsecAssignment},
    dataplane::xfrm::{self, Direction, Policy, Sa, SaId, Wanted, Xfrm},
};

/// ESP's overhead in transport mode with AES-GCM: header 8, IV 8,
/// padding up to 3, pad length and next header 2, ICV 16.
pub(crate) const ESP_OVERHEAD: u32 = 37;

/// How long a node waits after learning a new overlay key before it sends
/// with it (its peers install the key's inbound associations meanwhile).
pub(crate) const OUTBOUND_SWITCH_DELAY: Duration = Duration::from_secs(5);

/// The associations to send to a peer with: the current key's (first in
/// `epochs`) once it has been known for `delay`, or if there is no other;
/// the previous key's until then.
pub(crate) fn outbound(epochs: &[EspEpoch], known_for: impl Fn(u64) -> Duration, delay: Duration) -> Option<&EspEpoch> {
    let current = epochs.first()?;
    match epochs.get(1) {
        Some(previous) if known_for(current.epoch) < delay => Some(previous),
        _ => Some(current),
    }
}

/// The XFRM state for `assignment` on a node whose data-path address is
/// `local`: the two policies, every peer's inbound associations of every
/// epoch it is given, and one outbound association per peer.
pub(crate) fn wanted(assignment: &IpsecAssignment, local: Ipv4Addr, known_for: impl Fn(u64) -> Duration) -> Wanted {
    let port = assignment.port;
    let mut out = Wanted {
        policies: [Direction::In, Direction::Out]
            .into_iter()
            .map(|direction| Policy { direction, local, port })
            .collect(),
        sas: BTreeMap::new(),
    };
    for peer in &assignment.peers {
        for e in &peer.epochs {
            let id = SaId {
                src: peer.address,
                dst: local,
                spi: e.inbound.spi,
            };
            out.sas.insert(
                id,
                Sa {
                    port,
                    key: e.inbound.key.0,
                },
            );
        }
        if let Some(e) = outbound(&peer.epochs, &known_for, OUTBOUND_SWITCH_DELAY) {
            let id = SaId {
                src: local,
                dst: peer.address,
                spi: e.outbound.spi,
            };
            out.sas.insert(
                id,
                Sa {
                    port,
                    key: e.outbound.key.0,
                },
            );
        }
    }
    out
}

/// The node's IPsec state in the kernel.
#[derive(Default)]
pub(crate) struct Ipsec {
    /// When this node first saw each overlay key epoch.
    first_seen: BTreeMap<u64, Instant>,
    /// Whether the kernel can do it, and if not why (asked once, when
    /// first needed; the reason is kept as text, the error is not Clone).
    support: Option<Result<(), String>>,
    /// The policies are in place for this address and port.
    active: Option<(Ipv4Addr, u16)>,
    /// An earlier agent's leftovers have been looked for.
    clean: bool,
}

impl Ipsec {
    /// Nothing known yet.
    pub(crate) fn new() -> Ipsec {
        Ipsec::default()
    }

    /// Whether this kernel can do IPsec (XFRM netlink, ESP, AES-GCM), and
    /// why not.
    pub(crate) fn supported(&mut self) -> Result<(), NetError> {
        self.support
            .get_or_insert_with(|| xfrm::kernel_has_esp().map_err(|e| e.to_string()))
            .clone()
            .map_err(NetError::NoIpsec)
    }

    /// The IPsec VXLAN port, while the policies and associations are in
    /// place.
    pub(crate) fn port(&self) -> Option<u16> {
        self.active.map(|(_, port)| port)
    }

    /// Brings the kernel in line with `want` for data-path address `local`
    /// (blocking). With nothing wanted, removes what the agent has there
    /// (once, on a node that never had any).
    pub(crate) fn apply(&mut self, want: Option<&IpsecAssignment>, local: Ipv4Addr) -> Result<(), NetError> {
        let Some(want) = want else {
            if self.active.is_none() && self.clean {
                return Ok(());
            }
            return self.remove();
        };
        if let Err(e) = self.supported() {
            // Not an error to retry: nothing changes until the kernel does.
            // Tasks on IPsec networks are refused with this reason.
            if self.active.take().is_some() || !self.clean {
                log::warn!("this node's kernel cannot do IPsec: {e}");
            }
            self.clean = true;
            return Ok(());
        }
        let now = Instant::now();
        for peer in &want.peers {
            for e in &peer.epochs {
                self.first_seen.entry(e.epoch).or_insert(now);
            }
        }
        // Epochs no longer given are forgotten.
        let given: Vec<u64> = want
            .peers
            .iter()
            .flat_map(|p| p.epochs.iter().map(|e| e.epoch))
            .collect();
        self.first_seen.retain(|epoch, _| given.contains(epoch));
        let first_seen = &self.first_seen;
        let target = wanted(want, local, |epoch| {
            first_seen
                .get(&epoch)
                .map_or(Duration::ZERO, |t| now.duration_since(*t))
        });
        self.active = None;
        let mut x = Xfrm::open().map_err(NetError::kernel("programming IPsec"))?;
        let found = x.observe().map_err(NetError::kernel("reading the IPsec state"))?;
        x.apply(&xfrm::plan(&target, &found))
            .map_err(NetError::kernel("programming IPsec"))?;
        self.clean = true;
        self.active = Some((local, want.port));
        Ok(())
    }

    /// Removes the agent's policies and associations (the node leaves, or
    /// runs no IPsec network any more).
    pub(crate) fn remove(&mut self) -> Result<(), NetError> {
        self.active = None;
        self.first_seen.clear();
        let mut x = match Xfrm::open() {
            Ok(x) => x,
            // No XFRM in this kernel: nothing of ours can be there.
            Err(_) if !self.clean => {
                self.clean = true;
                return Ok(());
            }
            Err(e) => return Err(NetError::kernel("removing IPsec")(e)),
        };
        let found = x.observe().map_err(NetError::kernel("reading the IPsec state"))?;
        x.apply(&xfrm::plan(&Wanted::default(), &found))
            .map_err(NetError::kernel("removing IPsec"))?;
        self.clean = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::assignment::ipsec::{EspKey, EspPeer, EspSa};

    fn epoch(epoch: u64) -> EspEpoch {
        let sa = |spi: u32| EspSa {
            spi,
            key: EspKey([spi as u8; 20]),
        };
        EspEpoch {
            epoch,
            outbound: sa(0x100 + epoch as u32),
            inbound: sa(0x200 + epoch as u32),
        }
    }

    #[test]
    fn a_new_key_is_sent_with_only_once_every_peer_had_time_to_take_it() {
        let delay = Duration::from_secs(5);
        let both = [epoch(2), epoch(1)];
        let young = |_| Duration::from_secs(1);
        let old = |_| Duration::from_secs(6);
        assert_eq!(outbound(&both, young, delay).unwrap().epoch, 1);
        assert_eq!(outbound(&both, old, delay).unwrap().epoch, 2);
        assert_eq!(
            outbound(&both[..1], young, delay).unwrap().epoch,
            2,
            "no previous key: the current"
        );
        assert!(outbound(&[], old, delay).is_none());
    }

    #[test]
    fn inbound_takes_every_epoch_outbound_one() {
        let local = Ipv4Addr::new(10, 0, 0, 1);
        let peer = Ipv4Addr::new(10, 0, 0, 2);
        let assignment = IpsecAssignment {
            port: 4790,
            key_epoch: 2,
            peers: vec![EspPeer {
                node: 7,
                address: peer,
                epochs: vec![epoch(2), epoch(1)],
            }],
        };
        let w = wanted(&assignment, local, |_| Duration::ZERO);
        assert_eq!(w.policies.len(), 2);
        let ids: Vec<(Ipv4Addr, u32)> = w.sas.keys().map(|id| (id.dst, id.spi)).collect();
        assert_eq!(ids, vec![(peer, 0x101), (local, 0x201), (local, 0x202)]);
        let later = wanted(&assignment, local, |_| Duration::from_secs(60));
        assert!(later.sas.keys().any(|id| id.dst == peer && id.spi == 0x102));
        assert!(!later.sas.keys().any(|id| id.dst == peer && id.spi == 0x101));
    }
}
