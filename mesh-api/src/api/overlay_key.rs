//! The swarm's overlay key, kept in the store: the WireGuard preshared
//! keys and IPsec associations of every pair of nodes derive from it, and
//! it rotates on a schedule and whenever a node is removed.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::objects::NodeId;

/// The swarm's overlay key: the secret the pairs' preshared keys are
/// derived from.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct OverlayKey {
    /// Increases by one at each rotation.
    pub epoch: u64,
    /// Unix seconds.
    pub(crate) created_at: u64,
    /// A node that held it was removed: rotate now.
    #[serde(default)]
    pub stale: bool,
    /// The secret.
    secret: [u8; 32],
}

impl fmt::Debug for OverlayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverlayKey")
            .field("epoch", &self.epoch)
            .field("created_at", &self.created_at)
            .field("stale", &self.stale)
            .finish_non_exhaustive()
    }
}

impl OverlayKey {
    /// A fresh key following `previous`.
    pub fn next(previous: Option<&OverlayKey>, secret: [u8; 32], now: u64) -> OverlayKey {
        OverlayKey {
            epoch: previous.map_or(1, |k| k.epoch + 1),
            created_at: now,
            stale: false,
            secret,
        }
    }

    /// The preshared key of nodes `a` and `b` (the same both ways).
    pub fn pair_key(&self, a: NodeId, b: NodeId) -> [u8; 32] {
        let (low, high) = (a.min(b), a.max(b));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("reason: HMAC takes any key length");
        mac.update(b"mesh wireguard psk");
        mac.update(&self.epoch.to_be_bytes());
        mac.update(&low.to_be_bytes());
        mac.update(&high.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The ESP security association nodes `src` -> `dst` send with: its
    /// SPI (the low bit of the epoch in the top bit, so consecutive keys'
    /// SPIs differ; never below 256, which the RFC reserves) and its
    /// AES-GCM key with the 4-byte salt after it.
    pub fn esp_sa(&self, src: NodeId, dst: NodeId) -> (u32, [u8; 20]) {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("reason: HMAC takes any key length");
            mac.update(label);
            mac.update(&self.epoch.to_be_bytes());
            mac.update(&src.to_be_bytes());
            mac.update(&dst.to_be_bytes());
            mac.finalize().into_bytes().into()
        };
        let spi_bytes = derive(b"mesh esp spi");
        let spi = u32::from_be_bytes(spi_bytes[..4].try_into().expect("reason: 4 of 32 bytes"));
        let spi = (spi & 0x7fff_ffff) | ((self.epoch as u32 & 1) << 31) | 0x100;
        let mut key = [0u8; 20];
        key.copy_from_slice(&derive(b"mesh esp key")[..20]);
        (spi, key)
    }
}

/// Whether the leader should propose a new overlay key: none yet, a
/// holder was removed, or the current one is older than `rotation_secs`.
pub fn key_rotation_due(key: Option<&OverlayKey>, now: u64, rotation_secs: u64) -> bool {
    match key {
        None => true,
        Some(k) => k.stale || now.saturating_sub(k.created_at) >= rotation_secs.max(1),
    }
}
