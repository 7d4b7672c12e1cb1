//! The node's keys on disk: a data key (DEK) wrapped by a key-encryption key
//! (KEK), and the node's private key sealed with the DEK.
//!
//! Layout under `<data-dir>/keys/` (directory 0700, files 0600):
//! - `dek.sealed`: the DEK, wrapped by the KEK;
//! - `kek`: the KEK itself, only when the node is not autolocked. With
//!   autolock the KEK is the operator's unlock key and is never written, so a
//!   copy of the data directory alone opens nothing.
//!
//! Re-wrapping writes the new files beside the old (`dek.sealed.new`,
//! `kek.new`) and renames them into place; a crash at any point leaves a
//! pair that opens the DEK, which the next load finds and finishes.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::ca::seal::{DataKey, KeyEncryptionKey, SealError, UnlockKey};

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

    fn new_dek_path(&self) -> PathBuf {
        self.dir.join("dek.sealed.new")
    }

    fn new_kek_path(&self) -> PathBuf {
        self.dir.join("kek.new")
    }

    /// Whether keys exist at all.
    pub(crate) fn exists(&self) -> bool {
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

    /// Reads the DEK if the node is not locked. A re-wrap a crash
    /// interrupted is finished first.
    pub fn load(&self) -> Result<Loaded, KeyStoreError> {
        let wrapped = self.wrapped()?;
        let mut keks = Vec::new();
        for path in [self.new_kek_path(), self.kek_path()] {
            if let Some(raw) = self.read_if_exists(&path)? {
                let bytes: [u8; 32] = raw
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyStoreError::Corrupt(path.clone(), SealError::Truncated(raw.len())))?;
                keks.push((path, KeyEncryptionKey::from_bytes(bytes)));
            }
        }
        let mut first_error = None;
        for (kek_path, kek) in &keks {
            for (dek_path, bytes) in &wrapped {
                match kek.unwrap(bytes) {
                    Ok(dek) => {
                        self.settle(dek_path, Some(kek_path))?;
                        return Ok(Loaded::Unlocked(dek));
                    }
                    Err(e) => {
                        first_error.get_or_insert((dek_path.clone(), e));
                    }
                }
            }
        }
        match (keks.iter().any(|(p, _)| *p == self.kek_path()), first_error) {
            // Only a new KEK that opens nothing: a re-wrap that stopped
            // before its DEK was written; the node is autolocked.
            (false, _) => {
                remove_if_exists(&self.new_kek_path())?;
                Ok(Loaded::Locked)
            }
            (true, Some((path, e))) => Err(KeyStoreError::Corrupt(path, e)),
            (true, None) => Err(KeyStoreError::Missing(self.dir.clone())),
        }
    }

    /// Opens the DEK of a locked node with the operator's unlock key.
    pub fn unlock(&self, key: &UnlockKey) -> Result<DataKey, KeyStoreError> {
        for (path, bytes) in self.wrapped()? {
            if let Ok(dek) = key.kek().unwrap(&bytes) {
                self.settle(&path, None)?;
                return Ok(dek);
            }
        }
        Err(KeyStoreError::WrongUnlockKey)
    }

    /// Re-wraps the DEK: with `Some(key)` the node becomes autolocked with
    /// that key (the KEK file is removed); with `None` a random KEK is stored
    /// again. Crash-safe: see the module's documentation.
    pub fn wrap_with(&self, dek: &DataKey, unlock: Option<&UnlockKey>) -> Result<(), KeyStoreError> {
        self.rewrap(dek, unlock, usize::MAX)
    }

    /// [`KeyStore::wrap_with`], stopping after `steps` file operations (as
    /// a crash would, for the tests).
    fn rewrap(&self, dek: &DataKey, unlock: Option<&UnlockKey>, steps: usize) -> Result<(), KeyStoreError> {
        let new_dek = self.new_dek_path();
        let new_kek = self.new_kek_path();
        let mut ops: Vec<Box<dyn FnOnce() -> Result<(), KeyStoreError> + '_>> = Vec::new();
        match unlock {
            Some(key) => {
                let wrapped = key.kek().wrap(dek);
                ops.push(Box::new(move || write_private(&new_dek, &wrapped)));
                ops.push(Box::new(|| remove_if_exists(&self.kek_path())));
            }
            None => {
                let kek = KeyEncryptionKey::generate();
                let (wrapped, raw) = (kek.wrap(dek), kek.to_bytes());
                ops.push(Box::new(move || write_private(&new_kek, &raw)));
                ops.push(Box::new(move || write_private(&new_dek, &wrapped)));
                ops.push(Box::new(|| rename(&self.new_kek_path(), &self.kek_path())));
            }
        }
        ops.push(Box::new(|| rename(&self.new_dek_path(), &self.dek_path())));
        for op in ops.into_iter().take(steps) {
            op()?;
        }
        Ok(())
    }

    /// The wrapped DEKs on disk, a new one (of an unfinished re-wrap)
    /// first.
    fn wrapped(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, KeyStoreError> {
        let mut found = Vec::new();
        for path in [self.new_dek_path(), self.dek_path()] {
            if let Some(bytes) = self.read_if_exists(&path)? {
                found.push((path, bytes));
            }
        }
        if found.is_empty() {
            return Err(KeyStoreError::Missing(self.dir.clone()));
        }
        Ok(found)
    }

    /// Makes the pair that opened the DEK the current one and drops the
    /// other files an interrupted re-wrap left.
    fn settle(&self, dek: &Path, kek: Option<&Path>) -> Result<(), KeyStoreError> {
        if dek != self.dek_path() {
            rename(dek, &self.dek_path())?;
        }
        remove_if_exists(&self.new_dek_path())?;
        match kek {
            Some(kek) if kek != self.kek_path() => rename(kek, &self.kek_path()),
            Some(_) => remove_if_exists(&self.new_kek_path()),
            None => {
                remove_if_exists(&self.new_kek_path())?;
                remove_if_exists(&self.kek_path())
            }
        }
    }

    fn read_if_exists(&self, path: &Path) -> Result<Option<Vec<u8>>, KeyStoreError> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KeyStoreError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Whether the node is autolocked (no KEK on disk).
    pub fn is_autolocked(&self) -> bool {
        self.exists() && !self.kek_path().exists()
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), KeyStoreError> {
    fs::rename(from, to).map_err(|source| KeyStoreError::Io {
        path: from.to_path_buf(),
        source,
    })
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

    #[test]
    fn a_rewrap_stopped_at_any_step_still_opens_and_is_finished_by_the_next_load() {
        let key = UnlockKey::generate();
        let other = UnlockKey::generate();
        // (from, to): plain -> autolock, autolock -> plain, plain -> plain,
        // autolock -> another unlock key.
        let cases: [(Option<&UnlockKey>, Option<&UnlockKey>); 4] = [
            (None, Some(&key)),
            (Some(&key), None),
            (None, None),
            (Some(&key), Some(&other)),
        ];
        for (case, (from, to)) in cases.into_iter().enumerate() {
            for steps in 0..=4 {
                let dir = tempdir(&format!("crash-{case}-{steps}"));
                let ks = KeyStore::new(&dir);
                let dek = ks.create(from).unwrap();
                ks.rewrap(&dek, to, steps).unwrap();
                // The restarted node: unlocked with its KEK, or locked and
                // opened by either the old or the new unlock key.
                let opened = match ks
                    .load()
                    .unwrap_or_else(|e| panic!("case {case} after {steps} steps: {e}"))
                {
                    Loaded::Unlocked(d) => d,
                    Loaded::Locked => [from, to]
                        .into_iter()
                        .flatten()
                        .find_map(|k| ks.unlock(k).ok())
                        .unwrap_or_else(|| panic!("case {case} after {steps} steps: locked, and no key opens it")),
                };
                assert_eq!(opened, dek, "case {case} after {steps} steps");
                // The next load or unlock left one consistent pair.
                let names: Vec<String> = fs::read_dir(dir.join("keys"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert!(
                    !names.iter().any(|n| n.ends_with(".new")),
                    "case {case} after {steps} steps: {names:?}"
                );
                // And a finished re-wrap from there works as ever.
                ks.wrap_with(&dek, to).unwrap();
                match to {
                    Some(k) => assert_eq!(ks.unlock(k).unwrap(), dek),
                    None => assert!(matches!(ks.load().unwrap(), Loaded::Unlocked(d) if d == dek)),
                }
                fs::remove_dir_all(dir).unwrap();
            }
        }
    }

    #[test]
    fn a_tampered_kek_is_an_error_not_a_lock() {
        let dir = tempdir("tampered");
        let ks = KeyStore::new(&dir);
        ks.create(None).unwrap();
        fs::write(dir.join("keys/kek"), [0u8; 32]).unwrap();
        assert!(matches!(ks.load(), Err(KeyStoreError::Corrupt(..))));
        fs::remove_dir_all(dir).unwrap();
    }
}
