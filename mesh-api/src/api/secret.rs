//! Secrets and configs (`meshctl secret|config create|ls|inspect|rm`), as
//! Swarm has them: named blobs of at most 500 KiB in the Raft store (whose
//! values are sealed at rest, `manager::raft::store`), immutable (a new version
//! is a new name, rotated into services with `--secret-rm old
//! --secret-add new`), refused for removal while a service uses them, and
//! sent to a node only inside the assignments of tasks that need them.
//!
//! Tasks share the node's root file system, so their files live on a
//! memory-backed file system private to the task's mount namespace:
//! secrets under `/run/secrets` (default: their name), configs under
//! `/run/configs`, or a config over an existing file at an absolute target
//! (only the task sees it there; the node's file is untouched). A
//! reference may rename the file and set its owner and mode.

use crate::api::error::Invalid;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Swarm's limit for one secret or config.
pub const MAX_SIZE: usize = 500 * 1024;
/// Where secrets appear in a task.
pub const SECRETS_DIR: &str = "/run/secrets";
/// Where configs appear in a task.
pub const CONFIGS_DIR: &str = "/run/configs";

/// A secret or a config.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Secret,
    Config,
}

impl Kind {
    /// Its name in messages and commands.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Secret => "secret",
            Kind::Config => "config",
        }
    }

    /// The directory its files appear in.
    pub(crate) fn dir(self) -> &'static str {
        match self {
            Kind::Secret => SECRETS_DIR,
            Kind::Config => CONFIGS_DIR,
        }
    }
}

/// One secret or config in the store.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Blob {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The content (never shown for a secret).
    #[serde(with = "crate::api::wire_bytes")]
    pub data: Vec<u8>,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
}

/// Never prints the content (logs, errors, panics).
impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("data", &format_args!("<{} bytes>", self.data.len()))
            .finish()
    }
}

/// A service's use of a secret or config (`--secret` / `--config`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    /// The secret's or config's name.
    pub source: String,
    /// The file's name under the kind's directory, or (a config) an
    /// absolute path.
    pub target: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// Checks a secret's or config's name: what Swarm allows (letters, digits,
/// `-`, `_`, `.`; 64 characters at most, starting with a letter or digit).
pub fn check_name(kind: Kind, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(crate::invalid!(
            "invalid {} name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit",
            kind.name()
        ))
    }
}

/// Checks a secret's or config's content.
pub fn check_data(kind: Kind, data: &[u8]) -> Result<(), Invalid> {
    if data.is_empty() {
        return Err(crate::invalid!(
            "the {} is empty: give a file or standard input with content",
            kind.name()
        ));
    }
    if data.len() > MAX_SIZE {
        return Err(crate::invalid!(
            "the {} is {} bytes; the limit is {MAX_SIZE} (500 KiB)",
            kind.name(),
            data.len()
        ));
    }
    Ok(())
}

/// Parses `--secret NAME` or `--secret source=NAME,target=FILE,uid=,gid=,mode=`
/// (mode in octal; default 0444, owner root).
pub fn parse_ref(kind: Kind, text: &str) -> Result<BlobRef, Invalid> {
    let flag = kind.name();
    let mut r = BlobRef {
        source: String::new(),
        target: String::new(),
        uid: 0,
        gid: 0,
        mode: 0o444,
    };
    if !text.contains('=') {
        r.source = text.trim().to_string();
    } else {
        for part in text.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("invalid --{flag} {text:?}: {part:?} is not KEY=VALUE"))?;
            let number = |radix| {
                u32::from_str_radix(v, radix).map_err(|_| format!("invalid --{flag} {text:?}: {k}={v} is not a number"))
            };
            match k {
                "source" | "src" => r.source = v.to_string(),
                "target" => r.target = v.to_string(),
                "uid" => r.uid = number(10)?,
                "gid" => r.gid = number(10)?,
                "mode" => r.mode = number(8)?,
                _ => {
                    return Err(crate::invalid!(
                        "invalid --{flag} {text:?}: unknown key {k:?} (source, target, uid, gid, mode)"
                    ))
                }
            }
        }
    }
    if r.target.is_empty() {
        r.target = r.source.clone();
    }
    // An absolute target is accepted when it is in the kind's directory.
    if let Some(rest) = r.target.strip_prefix(kind.dir()).and_then(|t| t.strip_prefix('/')) {
        r.target = rest.to_string();
    }
    check_ref(kind, &r).map_err(|e| format!("invalid --{flag} {text:?}: {e}"))?;
    Ok(r)
}

/// Checks a reference however it was made (parsed from a flag, or part of
/// a spec that came over the API): a valid name, a file that stays in the
/// kind's directory (or, for a config, an absolute path without `.` or
/// `..`), and permission bits only.
pub(crate) fn check_ref(kind: Kind, r: &BlobRef) -> Result<(), Invalid> {
    check_name(kind, &r.source)?;
    let plain = |part: &str| !part.is_empty() && part != "." && part != ".." && !part.contains('\0');
    let file_ok = match r.target.strip_prefix('/') {
        Some(path) if kind == Kind::Config => path.split('/').all(plain),
        _ => plain(&r.target) && !r.target.contains('/'),
    };
    if !file_ok {
        return Err(Invalid(match kind {
            Kind::Secret => format!(
                "target {:?} must be a file name in {SECRETS_DIR} (tasks share the node's file system, so secrets appear only there)",
                r.target
            ),
            Kind::Config => format!(
                "target {:?} must be a file name in {CONFIGS_DIR} or an absolute path without . or ..",
                r.target
            ),
        }));
    }
    if r.mode > 0o777 {
        return Err(crate::invalid!("mode {:o} is beyond 0777", r.mode));
    }
    Ok(())
}

/// A file a task gets: its content and where it goes (sent only to the
/// node running the task).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct TaskFile {
    pub kind: Kind,
    /// Its name under the kind's directory, or (a config) an absolute path.
    pub target: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    #[serde(with = "crate::api::wire_bytes")]
    pub data: Vec<u8>,
}

/// Never prints the content.
impl std::fmt::Debug for TaskFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TaskFile({:?} {}, {} bytes)",
            self.kind,
            self.target,
            self.data.len()
        )
    }
}

/// The files for a task of a service referring to `refs` (by kind), from
/// the store's blobs; a reference to a missing blob is left out (the
/// store refuses removing a blob in use, so this is a race at most).
pub fn task_files(refs: &[(Kind, &BlobRef)], blobs: &dyn Fn(Kind, &str) -> Option<Vec<u8>>) -> Vec<TaskFile> {
    refs.iter()
        .filter_map(|(kind, r)| {
            Some(TaskFile {
                kind: *kind,
                target: r.target.clone(),
                uid: r.uid,
                gid: r.gid,
                mode: r.mode,
                data: blobs(*kind, &r.source)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_default_to_the_name_and_stay_in_their_directory() {
        let r = parse_ref(Kind::Secret, "db_password").unwrap();
        assert_eq!((r.target.as_str(), r.mode, r.uid), ("db_password", 0o444, 0));
        let r = parse_ref(Kind::Secret, "source=db_password,target=pw,uid=1000,gid=1000,mode=0400").unwrap();
        assert_eq!(
            (r.source.as_str(), r.target.as_str(), r.uid, r.mode),
            ("db_password", "pw", 1000, 0o400)
        );
        let r = parse_ref(Kind::Config, "source=app,target=/run/configs/app.toml").unwrap();
        assert_eq!(r.target, "app.toml");
        let r = parse_ref(Kind::Config, "source=app,target=/etc/app/app.toml").unwrap();
        assert_eq!(r.target, "/etc/app/app.toml");
        for bad in [
            "source=x,target=/etc/passwd",
            "source=x,target=../x",
            "source=x,mode=999",
            "source=x,owner=1",
            "source=,target=x",
            "bad name",
        ] {
            assert!(parse_ref(Kind::Secret, bad).is_err(), "{bad} is refused");
        }
        assert!(parse_ref(Kind::Config, "source=x,target=/etc/../x")
            .unwrap_err()
            .contains("absolute path"));
        assert!(parse_ref(Kind::Secret, "source=x,target=/etc/x")
            .unwrap_err()
            .contains("/run/secrets"));
    }

    #[test]
    fn names_and_sizes_are_checked_and_data_is_never_printed() {
        assert!(check_name(Kind::Secret, "a.b-c_1").is_ok());
        assert!(check_name(Kind::Secret, "-x").is_err());
        assert!(check_name(Kind::Secret, &"x".repeat(65)).is_err());
        assert!(check_data(Kind::Secret, b"").unwrap_err().contains("empty"));
        assert!(check_data(Kind::Config, &vec![0; MAX_SIZE + 1])
            .unwrap_err()
            .contains("500 KiB"));
        let blob = Blob {
            id: 1,
            name: "pw".into(),
            labels: BTreeMap::new(),
            data: b"hunter2".to_vec(),
            created: 0,
            updated: 0,
        };
        assert!(!format!("{blob:?}").contains("hunter2"));
        let r = parse_ref(Kind::Secret, "pw").unwrap();
        let files = task_files(&[(Kind::Secret, &r)], &|_, n| (n == "pw").then(|| b"hunter2".to_vec()));
        assert!(!format!("{files:?}").contains("hunter2"));
        assert_eq!(files[0].data, b"hunter2");
    }
}
