//! What the store remembers of the certificates the CA issued, so that a
//! certificate is honoured only while the store says so: each node's
//! current one (and, for a short grace after a renewal, the one it
//! replaced), and each operator certificate by name until it expires or is
//! revoked. Plain data and pure checks; the callers turn a refusal into
//! their error.

use serde::{Deserialize, Serialize};

/// A certificate as the store records it when the CA issues it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Issued {
    /// Its serial number (hex).
    pub serial: String,
    /// SHA-256 (hex) of the root that signed it.
    pub ca: String,
    /// Unix seconds when it was issued.
    pub issued_at: u64,
    /// Unix seconds when it expires.
    pub not_after: u64,
}

/// A node's certificates by the store: the one last issued to it, and the
/// one before, honoured until `previous_until` so that calls already under
/// way when the node renewed still finish.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCerts {
    /// The certificate last issued (an empty serial: a node recorded
    /// before the store kept serials, honoured until it next renews).
    pub current: Issued,
    /// The serial of the one it replaced ("" if none).
    pub(crate) previous: String,
    /// Unix seconds until which `previous` is honoured.
    pub(crate) previous_until: u64,
}

/// Why a certificate is no longer honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A newer certificate replaced it (renewal, role change, CA rotation).
    Superseded {
        /// When the newer one was issued (unix seconds).
        replaced_at: u64,
    },
    /// No operator certificate of that name is recorded (revoked).
    Revoked,
    /// The name is recorded with another serial (revoked and issued again).
    Replaced,
    /// Past its end.
    Expired,
}

impl NodeCerts {
    /// The record of a node's first certificate.
    pub fn first(issued: Issued) -> NodeCerts {
        NodeCerts {
            current: issued,
            ..NodeCerts::default()
        }
    }

    /// The record after `next` was issued, with the current one honoured
    /// for `grace_secs` more.
    pub fn renewed(&self, next: Issued, grace_secs: u64) -> NodeCerts {
        if self.current.serial.is_empty() {
            return NodeCerts::first(next);
        }
        NodeCerts {
            previous: self.current.serial.clone(),
            previous_until: next.issued_at.saturating_add(grace_secs),
            current: next,
        }
    }

    /// Whether a certificate with `serial` is honoured at `now`.
    pub fn check(&self, serial: &str, now: u64) -> Result<(), Refusal> {
        if self.current.serial.is_empty() || serial == self.current.serial {
            return Ok(());
        }
        if !self.previous.is_empty() && serial == self.previous && now <= self.previous_until {
            return Ok(());
        }
        Err(Refusal::Superseded {
            replaced_at: self.current.issued_at,
        })
    }
}

/// Whether the operator certificate `serial` presented as `record`'s
/// name is honoured at `now` (`record`: what the store has for that name).
pub fn check_operator(record: Option<&Issued>, serial: &str, now: u64) -> Result<(), Refusal> {
    let Some(record) = record else {
        return Err(Refusal::Revoked);
    };
    if record.serial != serial {
        return Err(Refusal::Replaced);
    }
    if record.not_after < now {
        return Err(Refusal::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(serial: &str, at: u64) -> Issued {
        Issued {
            serial: serial.into(),
            ca: "c".into(),
            issued_at: at,
            not_after: at + 1000,
        }
    }

    #[test]
    fn a_renewed_nodes_old_certificate_is_honoured_only_for_the_grace() {
        let first = NodeCerts::first(issued("a", 100));
        assert_eq!(first.check("a", 150), Ok(()));
        assert!(first.check("b", 150).is_err(), "a serial never issued");
        let renewed = first.renewed(issued("b", 200), 60);
        assert_eq!(renewed.check("b", 201), Ok(()));
        assert_eq!(renewed.check("a", 260), Ok(()), "within the grace");
        assert_eq!(renewed.check("a", 261), Err(Refusal::Superseded { replaced_at: 200 }));
        // Two renewals: the first certificate is gone at once.
        let twice = renewed.renewed(issued("c", 210), 60);
        assert!(twice.check("a", 211).is_err());
        assert_eq!(twice.check("b", 211), Ok(()));
    }

    #[test]
    fn a_node_recorded_without_a_serial_is_honoured_until_it_renews() {
        let legacy = NodeCerts::default();
        assert_eq!(legacy.check("anything", 1), Ok(()));
        let renewed = legacy.renewed(issued("b", 200), 60);
        assert_eq!(renewed.previous, "", "no serial to honour in the grace");
        assert!(renewed.check("anything", 201).is_err());
    }

    #[test]
    fn an_operator_certificate_is_honoured_only_as_recorded_and_unexpired() {
        let record = issued("s", 100);
        assert_eq!(check_operator(Some(&record), "s", 500), Ok(()));
        assert_eq!(check_operator(Some(&record), "t", 500), Err(Refusal::Replaced));
        assert_eq!(check_operator(Some(&record), "s", 1101), Err(Refusal::Expired));
        assert_eq!(check_operator(None, "s", 500), Err(Refusal::Revoked));
    }
}
