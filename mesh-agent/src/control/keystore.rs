//! The node's keys on disk: a data key (DEK) wrapped by a key-encryption key
//! (KEK), and the node's private key sealed with the DEK.
//!
//! Layout under `<data-dir>/keys/` (directory 0700, files 0600):
//! - `dek.sealed`: the DEK, wrapped by the KEK;
//! - `kek`: the KEK itself, only when the node is not autolocked. With
//!   autolock the KEK is the operator's unlock key and is never written, so a
//!   copy of the data directory alone opens nothing.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use super::seal::{DataKey, KeyEncryptionKey, SealError, UnlockKey};

/// Why the keys could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// No keys: the node was never initialised or joined.
    #[error("no keys in {0}: this node has not joined a swarm")]
    Missing(PathBuf),
    /// The unlock key given does not open the DEK.
    #[error("the unlock key is not the one this node was locked with (`meshctl swarm unlock-key` on an unlocked manager prints the current key)")]
    WrongUnlockKey,
    /// The stored KEK does not open the DEK: the files were tampered with.
    #[error("the data key in {0} cannot be opened with the stored key: {1}")]
    Corrupt(PathBuf, SealError),
}

/// What [`KeyStore::load`] found.
#[derive(Debug)]
pub enum Loaded {
    /// Not autolocked: the DEK is open.
    Unlocked(DataKey),
    /// Autolocked: needs the unlock key.
    Locked,
}

/// The key files of one node.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// Keys kept under `<data_dir>/keys`.
    pub fn new(data_dir: &Path) -> Self {
        KeyStore {
            dir: data_dir.join("keys"),
        }
    }

    fn dek_path(&self) -> PathBuf {
        self.dir.join("dek.sealed")
    }

    fn kek_path(&self) -> PathBuf {
        self.dir.join("kek")
    }

    /// Whether keys exist at all.
    pub fn exists(&self) -> bool {
        self.dek_path().exists()
    }

    /// Creates a fresh DEK, wrapped by `unlock` if given (autolock) or by a
    /// new random KEK stored beside it.
    pub fn create(&self, unlock: Option<&UnlockKey>) -> Result<DataKey, KeyStoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| KeyStoreError::Io {
                path: self.dir.clone(),
                source,
            })?;
        let dek = DataKey::generate();
        self.wrap_with(&dek, unlock)?;
        Ok(dek)
    }

    /// Reads the DEK if the node is not locked.
    pub fn load(&self) -> Result<Loaded, KeyStoreError> {
        let wrapped = self.read(&self.dek_path())?;
        let kek_path = self.kek_path();
        if !kek_path.exists() {
            return Ok(Loaded::Locked);
        }
        let raw = self.read(&kek_path)?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyStoreError::Corrupt(kek_path.clone(), SealError::Truncated(raw.len())))?;
        let dek = KeyEncryptionKey::from_bytes(bytes)
            .unwrap(&wrapped)
            .map_err(|e| KeyStoreError::Corrupt(self.dek_path(), e))?;
        Ok(Loaded::Unlocked(dek))
    }

    /// Opens the DEK of a locked node with the operator's unlock key.
    pub fn unlock(&self, key: &UnlockKey) -> Result<DataKey, KeyStoreError> {
        let wrapped = self.read(&self.dek_path())?;
        key.kek().unwrap(&wrapped).map_err(|_| KeyStoreError::WrongUnlockKey)
    }

    /// Re-wraps the DEK: with `Some(key)` the node becomes autolocked with
    /// that key (the KEK file is removed); with `None` a random KEK is stored
    /// again. The new wrapping is written before the old is removed.
    pub fn wrap_with(&self, dek: &DataKey, unlock: Option<&UnlockKey>) -> Result<(), KeyStoreError> {
        match unlock {
            Some(key) => {
                write_private(&self.dek_path(), &key.kek().wrap(dek))?;
                remove_if_exists(&self.kek_path())
            }
            None => {
                let kek = KeyEncryptionKey::generate();
                // KEK first: a crash in between leaves a KEK that opens nothing
                // rather than a DEK nothing opens.
                let tmp = self.dir.join("kek.new");
                write_private(&tmp, &kek.to_bytes())?;
                write_private(&self.dek_path(), &kek.wrap(dek))?;
                fs::rename(&tmp, self.kek_path()).map_err(|source| KeyStoreError::Io { path: tmp, source })
            }
        }
    }

    /// Whether the node is autolocked (no KEK on disk).
    pub fn is_autolocked(&self) -> bool {
        self.exists() && !self.kek_path().exists()
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, KeyStoreError> {
        match fs::read(path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(KeyStoreError::Missing(self.dir.clone())),
            Err(source) => Err(KeyStoreError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Writes a file readable only by its owner, atomically (temp file + rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyStoreError> {
    let tmp = path.with_extension("tmp");
    let io_err = |source| KeyStoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err)?;
    f.write_all(bytes).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

fn remove_if_exists(path: &Path) -> Result<(), KeyStoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(KeyStoreError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-keystore-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn plain_create_load_and_permissions() {
        let dir = tempdir("plain");
        let ks = KeyStore::new(&dir);
        assert!(matches!(ks.load(), Err(KeyStoreError::Missing(_))));
        let dek = ks.create(None).unwrap();
        match ks.load().unwrap() {
            Loaded::Unlocked(d) => assert_eq!(d, dek),
            Loaded::Locked => panic!("not autolocked"),
        }
        assert!(!ks.is_autolocked());
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.join("keys")), 0o700);
        assert_eq!(mode(dir.join("keys/kek")), 0o600);
        assert_eq!(mode(dir.join("keys/dek.sealed")), 0o600);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn autolock_round_trip_and_rotation() {
        let dir = tempdir("autolock");
        let ks = KeyStore::new(&dir);
        let key = UnlockKey::generate();
        let dek = ks.create(Some(&key)).unwrap();
        assert!(matches!(ks.load().unwrap(), Loaded::Locked));
        assert!(ks.is_autolocked());
        assert!(matches!(
            ks.unlock(&UnlockKey::generate()),
            Err(KeyStoreError::WrongUnlockKey)
        ));
        assert_eq!(ks.unlock(&key).unwrap(), dek);
        // Rotate to a new unlock key: the old one stops working.
        let new = UnlockKey::generate();
        ks.wrap_with(&dek, Some(&new)).unwrap();
        assert!(matches!(ks.unlock(&key), Err(KeyStoreError::WrongUnlockKey)));
        assert_eq!(ks.unlock(&new).unwrap(), dek);
        // Autolock off: loads without a key again.
        ks.wrap_with(&dek, None).unwrap();
        assert!(matches!(ks.load().unwrap(), Loaded::Unlocked(d) if d == dek));
        fs::remove_dir_all(dir).unwrap();
    }
}
