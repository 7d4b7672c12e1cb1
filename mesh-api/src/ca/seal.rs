//! Encryption at rest: everything a manager writes to its data directory is
//! sealed with a data key (DEK), and the DEK is stored only wrapped by a
//! key-encryption key (KEK).
//!
//! Without autolock the KEK is a random key kept in a 0600 file next to the
//! data; with autolock the KEK *is* the operator's unlock key and never
//! touches the disk, so a restarted manager stays locked until `meshctl swarm
//! unlock`. XChaCha20-Poly1305 takes a random 192-bit nonce per message, so no
//! nonce bookkeeping survives restarts.

use std::fmt;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Format byte in front of every sealed value, so the layout can change later.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Associated data that binds a wrapped DEK to its purpose.
const WRAP_AAD: &[u8] = b"mesh/dek/v1";
/// How unlock keys are printed: `MESHKEY-1-<64 hex digits>`.
const UNLOCK_PREFIX: &str = "MESHKEY-1-";

/// Why a sealed value could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Shorter than a version byte, a nonce and a tag.
    #[error("sealed value is truncated ({0} bytes)")]
    Truncated(usize),
    /// Written by a newer format than this build knows.
    #[error("sealed value has unknown format version {0}")]
    UnknownVersion(u8),
    /// Wrong key, or the bytes were changed.
    #[error("sealed value failed authentication: wrong key or tampered data")]
    Authentication,
}

/// Why an unlock key typed by the operator was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnlockKeyError {
    /// Not of the form `MESHKEY-1-<64 hex digits>`.
    #[error("not an unlock key: expected MESHKEY-1- followed by 64 hex digits (as printed by `meshctl swarm init --autolock` or `meshctl swarm unlock-key`)")]
    Malformed,
}

/// A 256-bit symmetric key. Zeroed when dropped; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
struct Key([u8; 32]);

impl Key {
    fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Key(k)
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .expect("reason: XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
            return Err(SealError::Truncated(sealed.len()));
        }
        if sealed[0] != VERSION {
            return Err(SealError::UnknownVersion(sealed[0]));
        }
        let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| SealError::Authentication)
    }
}

/// The data key: seals Raft log entries, snapshots, the vote and node keys.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(Key);

impl DataKey {
    /// A fresh random data key.
    pub fn generate() -> Self {
        DataKey(Key::generate())
    }

    /// Encrypts and authenticates `plaintext`; `aad` is authenticated but not
    /// stored (use it to bind a value to where it lives, e.g. its table and key).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.0.seal(aad, plaintext)
    }

    /// Opens a value sealed with the same key and `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.0.open(aad, sealed)
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The key-encryption key that wraps the [`DataKey`].
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct KeyEncryptionKey(Key);

impl KeyEncryptionKey {
    /// A fresh random KEK (the non-autolock case).
    pub(crate) fn generate() -> Self {
        KeyEncryptionKey(Key::generate())
    }

    /// The KEK from its 32 raw bytes (as read from the KEK file).
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyEncryptionKey(Key(bytes))
    }

    /// The raw bytes, for writing the KEK file. Handle with care.
    pub(crate) fn to_bytes(&self) -> [u8; 32] {
        self.0 .0
    }

    /// Seals the data key for storage.
    pub(crate) fn wrap(&self, dek: &DataKey) -> Vec<u8> {
        self.0.seal(WRAP_AAD, &dek.0 .0)
    }

    /// Recovers the data key; fails if this is not the KEK that wrapped it.
    pub(crate) fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, SealError> {
        let mut raw = self.0.open(WRAP_AAD, wrapped)?;
        let key: [u8; 32] = raw.as_slice().try_into().map_err(|_| SealError::Authentication)?;
        raw.zeroize();
        Ok(DataKey(Key(key)))
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(<redacted>)")
    }
}

/// The operator's unlock key for an autolocked swarm; it is the KEK.
#[derive(Clone, PartialEq, Eq)]
pub struct UnlockKey(KeyEncryptionKey);

impl UnlockKey {
    /// A fresh random unlock key.
    pub fn generate() -> Self {
        UnlockKey(KeyEncryptionKey::generate())
    }

    /// The KEK this unlock key stands for.
    pub(crate) fn kek(&self) -> &KeyEncryptionKey {
        &self.0
    }

    /// The text the operator keeps and types back: `MESHKEY-1-<hex>`.
    pub fn to_text(&self) -> String {
        format!("{UNLOCK_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }

    /// Parses what the operator typed (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<Self, UnlockKeyError> {
        let hexpart = text
            .trim()
            .strip_prefix(UNLOCK_PREFIX)
            .ok_or(UnlockKeyError::Malformed)?;
        let raw = hex::decode(hexpart).map_err(|_| UnlockKeyError::Malformed)?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| UnlockKeyError::Malformed)?;
        Ok(UnlockKey(KeyEncryptionKey::from_bytes(bytes)))
    }
}

impl fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnlockKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let dek = DataKey::generate();
        let sealed = dek.seal(b"log/7", b"hello");
        assert_eq!(dek.open(b"log/7", &sealed).unwrap(), b"hello");
        // Bound to its place: the same bytes under another key path do not open.
        assert_eq!(dek.open(b"log/8", &sealed), Err(SealError::Authentication));
        // Another key does not open it.
        assert_eq!(
            DataKey::generate().open(b"log/7", &sealed),
            Err(SealError::Authentication)
        );
        // Nothing of the plaintext shows.
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn tampering_and_truncation_are_detected() {
        let dek = DataKey::generate();
        let mut sealed = dek.seal(b"", b"payload");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(dek.open(b"", &sealed), Err(SealError::Authentication));
        assert_eq!(dek.open(b"", &sealed[..10]), Err(SealError::Truncated(10)));
        sealed[0] = 9;
        assert_eq!(dek.open(b"", &sealed), Err(SealError::UnknownVersion(9)));
    }

    #[test]
    fn wrap_unwrap_needs_the_right_kek() {
        let dek = DataKey::generate();
        let kek = KeyEncryptionKey::generate();
        let wrapped = kek.wrap(&dek);
        assert_eq!(kek.unwrap(&wrapped).unwrap(), dek);
        assert_eq!(
            KeyEncryptionKey::generate().unwrap(&wrapped),
            Err(SealError::Authentication)
        );
    }

    #[test]
    fn unlock_key_text_round_trip_and_errors() {
        let key = UnlockKey::generate();
        let text = key.to_text();
        assert!(text.starts_with("MESHKEY-1-"));
        assert_eq!(UnlockKey::parse(&format!("  {text}\n")).unwrap(), key);
        for bad in [
            "",
            "MESHKEY-1-",
            "MESHKEY-1-zz",
            "SWMKEY-1-abc",
            &text[..text.len() - 2],
        ] {
            assert_eq!(UnlockKey::parse(bad), Err(UnlockKeyError::Malformed), "{bad:?}");
        }
        assert_eq!(format!("{key:?}"), "UnlockKey(<redacted>)");
    }
}
