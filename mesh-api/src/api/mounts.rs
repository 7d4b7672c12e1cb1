//! `--mount`: what a service's tasks get mounted, with Docker's syntax
//! (`type=bind|tmpfs|volume,source=,target=[,readonly][,tmpfs-size=]`).

use serde::{Deserialize, Serialize};

use crate::api::error::Invalid;

/// The kind of a mount.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountKind {
    /// A path of the node.
    Bind,
    /// A memory-backed file system of the task's own.
    Tmpfs,
    /// A named directory the node keeps for its tasks (across restarts).
    Volume,
}

impl MountKind {
    /// As `--mount type=` spells it.
    pub fn name(self) -> &'static str {
        match self {
            MountKind::Bind => "bind",
            MountKind::Tmpfs => "tmpfs",
            MountKind::Volume => "volume",
        }
    }
}

/// One `--mount`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// bind, tmpfs or volume.
    pub kind: MountKind,
    /// The node's path (bind), the volume's name (volume); empty for tmpfs.
    pub source: String,
    /// Where the task sees it (absolute; it must exist on the node).
    pub target: String,
    /// `readonly`.
    pub read_only: bool,
    /// `tmpfs-size`, bytes (tmpfs only; unset: the kernel's default, half the memory).
    pub tmpfs_size: Option<u64>,
}

/// Parses one `--mount` value.
pub fn parse_mount(text: &str) -> Result<Mount, Invalid> {
    let mut kind = None;
    let mut source = String::new();
    let mut target = None;
    let mut read_only = false;
    let mut tmpfs_size = None;
    for field in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (field, None),
        };
        match (key, value) {
            ("type", Some(t)) => {
                kind = Some(match t {
                    "bind" => MountKind::Bind,
                    "tmpfs" => MountKind::Tmpfs,
                    "volume" => MountKind::Volume,
                    other => {
                        return Err(crate::invalid!(
                            "--mount {text:?}: type {other:?} is not supported; use bind, tmpfs or volume"
                        ))
                    }
                })
            }
            ("source" | "src", Some(s)) => source = s.to_string(),
            ("target" | "destination" | "dst", Some(t)) => target = Some(t.to_string()),
            ("readonly" | "ro", None | Some("true" | "1")) => read_only = true,
            ("readonly" | "ro", Some("false" | "0")) => read_only = false,
            ("tmpfs-size", Some(size)) => tmpfs_size = Some(crate::api::resources::parse_bytes("mount tmpfs-size", size)?),
            _ => {
                return Err(crate::invalid!(
                    "--mount {text:?}: unknown or malformed field {field:?}; use type=, source=, target=, readonly, tmpfs-size="
                ))
            }
        }
    }
    let mount = Mount {
        kind: kind.unwrap_or(MountKind::Volume),
        source,
        target: target.ok_or_else(|| crate::invalid!("--mount {text:?}: target= is missing"))?,
        read_only,
        tmpfs_size,
    };
    mount.validate()?;
    Ok(mount)
}

/// Where no mount may go: the task's own kernel views and its /dev.
const RESERVED_TARGETS: [&str; 3] = ["/proc", "/sys", "/dev"];

impl Mount {
    /// Checks what can be checked without the node.
    pub fn validate(&self) -> Result<(), Invalid> {
        let t = &self.target;
        if !t.starts_with('/') || t == "/" || t.split('/').any(|c| c == ".." || c == ".") {
            return Err(crate::invalid!(
                "--mount target {t:?}: give an absolute path other than / without . or .."
            ));
        }
        if let Some(r) = RESERVED_TARGETS
            .iter()
            .find(|r| t == *r || t.starts_with(&format!("{r}/")))
        {
            return Err(crate::invalid!(
                "--mount target {t:?}: {r} is the task's own and takes no mount"
            ));
        }
        if self.tmpfs_size.is_some() && self.kind != MountKind::Tmpfs {
            return Err(crate::invalid!("--mount tmpfs-size= is for type=tmpfs only"));
        }
        match self.kind {
            MountKind::Bind if !self.source.starts_with('/') => Err(crate::invalid!(
                "--mount type=bind needs source= an absolute path of the node, not {:?}",
                self.source
            )),
            MountKind::Volume => {
                let ok = !self.source.is_empty()
                    && self.source.len() <= 64
                    && self.source.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                    && self
                        .source
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
                if ok {
                    Ok(())
                } else {
                    Err(crate::invalid!(
                        "--mount type=volume needs source= a volume name (letters, digits, '_', '.', '-'), not {:?}",
                        self.source
                    ))
                }
            }
            MountKind::Tmpfs if !self.source.is_empty() => {
                Err(crate::invalid!("--mount type=tmpfs takes no source= (it starts empty)"))
            }
            _ => Ok(()),
        }
    }

    /// As `service inspect` shows it.
    pub fn text(&self) -> String {
        let mut t = format!("type={}", self.kind.name());
        if !self.source.is_empty() {
            t.push_str(&format!(",source={}", self.source));
        }
        t.push_str(&format!(",target={}", self.target));
        if self.read_only {
            t.push_str(",readonly");
        }
        if let Some(size) = self.tmpfs_size {
            t.push_str(&format!(",tmpfs-size={}", crate::api::resources::bytes_text(size)));
        }
        t
    }
}

/// Checks a service's mounts together: one target each.
pub fn check_mounts(mounts: &[Mount]) -> Result<(), Invalid> {
    for (i, m) in mounts.iter().enumerate() {
        m.validate()?;
        if mounts[..i].iter().any(|o| o.target == m.target) {
            return Err(crate::invalid!("two mounts go to {}: give one", m.target));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_as_docker_writes_them() {
        let m = parse_mount("type=bind,src=/srv/data,dst=/data,readonly").unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.target.as_str(), m.read_only),
            (MountKind::Bind, "/srv/data", "/data", true)
        );
        let m = parse_mount("type=tmpfs,target=/scratch,tmpfs-size=64m").unwrap();
        assert_eq!(m.tmpfs_size, Some(64 << 20));
        let m = parse_mount("source=pgdata,target=/var/lib/postgresql").unwrap();
        assert_eq!(m.kind, MountKind::Volume, "volume is Docker's default type");
        assert_eq!(m.text(), "type=volume,source=pgdata,target=/var/lib/postgresql");
    }

    #[test]
    fn bad_mounts_say_what_is_wrong() {
        for (text, reason) in [
            ("type=nfs,src=a,dst=/b", "not supported"),
            ("type=bind,src=relative,dst=/b", "absolute path of the node"),
            ("type=bind,src=/a", "target= is missing"),
            ("type=volume,src=../x,dst=/b", "volume name"),
            ("type=tmpfs,src=/a,dst=/b", "takes no source"),
            ("type=bind,src=/a,dst=/proc/x", "task's own"),
            ("type=bind,src=/a,dst=relative", "absolute path"),
            ("type=bind,src=/a,dst=/b,colour=blue", "unknown or malformed field"),
            ("type=volume,src=v,dst=/b,tmpfs-size=1m", "type=tmpfs only"),
        ] {
            let e = parse_mount(text).unwrap_err();
            assert!(e.0.contains(reason), "{text}: {e}");
        }
        let twice = [
            parse_mount("type=tmpfs,dst=/a").unwrap(),
            parse_mount("src=v,dst=/a").unwrap(),
        ];
        assert!(check_mounts(&twice).unwrap_err().0.contains("two mounts go to /a"));
    }
}
