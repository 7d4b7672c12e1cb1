//! How far a service's tasks are confined: `--cap-add`, `--cap-drop`,
//! `--security-opt` and `--read-only`, with Docker's defaults and names.

use serde::{Deserialize, Serialize};

use crate::api::error::Invalid;

/// The Linux capabilities by number, as `CAP_` names (without the prefix).
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What a container gets from Docker by default.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// A set of capabilities, bit N for capability N.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// Every capability this table knows.
    pub const ALL: CapSet = CapSet((1 << CAPABILITIES.len()) - 1);

    /// Whether capability `name` (as in [`CAPABILITIES`]) is in it.
    pub fn has(self, name: &str) -> bool {
        capability_number(name).is_some_and(|n| self.0 & (1 << n) != 0)
    }

    /// The names in it, in number order.
    pub fn names(self) -> Vec<&'static str> {
        (0..CAPABILITIES.len())
            .filter(|n| self.0 & (1 << n) != 0)
            .map(|n| CAPABILITIES[n])
            .collect()
    }
}

fn capability_number(name: &str) -> Option<usize> {
    CAPABILITIES.iter().position(|c| *c == name)
}

/// A capability as operators write it (`NET_ADMIN`, `cap_net_admin`, or
/// `ALL`), in the table's spelling.
pub fn normalize_capability(given: &str) -> Result<String, Invalid> {
    let upper = given.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" || capability_number(bare).is_some() {
        Ok(bare.to_string())
    } else {
        Err(crate::invalid!(
            "unknown capability {given:?}: use a name such as NET_ADMIN or CAP_NET_ADMIN (see capabilities(7)), or ALL"
        ))
    }
}

/// `--security-opt seccomp=...`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// Docker's default profile, widened for the capabilities added.
    #[default]
    Default,
    /// No filter.
    Unconfined,
}

/// A service's confinement, beyond its user.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    /// `--cap-add`: capabilities on top of Docker's default set (`ALL` for every one).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// `--cap-drop`: capabilities taken from it (`ALL` for every one).
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// `--security-opt seccomp=`.
    #[serde(default)]
    pub seccomp: Seccomp,
    /// `--read-only`: the task sees the node's file system read-only
    /// (its /dev, /dev/shm, secrets and configs excepted).
    #[serde(default)]
    pub read_only: bool,
}

impl Security {
    /// The capabilities a task of the service has when it runs as root:
    /// Docker's default set, less what is dropped, plus what is added (an
    /// add wins over a drop of `ALL`, as in Docker).
    pub fn capabilities(&self) -> Result<CapSet, Invalid> {
        let mut set = CapSet(
            DEFAULT_CAPABILITIES
                .iter()
                .filter_map(|c| capability_number(c))
                .fold(0, |s, n| s | 1 << n),
        );
        for given in &self.cap_drop {
            match normalize_capability(given)?.as_str() {
                "ALL" => set = CapSet(0),
                name => set.0 &= !(1 << capability_number(name).unwrap_or_default()),
            }
        }
        for given in &self.cap_add {
            match normalize_capability(given)?.as_str() {
                "ALL" => set = CapSet::ALL,
                name => set.0 |= 1 << capability_number(name).unwrap_or_default(),
            }
        }
        Ok(set)
    }

    /// Checks the names; `--cap-add` and `--cap-drop` of one capability
    /// contradict each other.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.capabilities()?;
        for add in &self.cap_add {
            let add = normalize_capability(add)?;
            if add != "ALL"
                && self
                    .cap_drop
                    .iter()
                    .any(|d| normalize_capability(d).ok().as_ref() == Some(&add))
            {
                return Err(crate::invalid!(
                    "--cap-add {add} and --cap-drop {add} contradict each other: give one"
                ));
            }
        }
        Ok(())
    }
}

/// Parses `--security-opt` values: `seccomp=unconfined` or `seccomp=default`
/// (Docker's spelling; profiles from files are not supported).
pub fn parse_security_opts(items: &[String], security: &mut Security) -> Result<(), Invalid> {
    for item in items {
        match item.split_once(['=', ':']) {
            Some(("seccomp", "unconfined")) => security.seccomp = Seccomp::Unconfined,
            Some(("seccomp", "default" | "builtin")) => security.seccomp = Seccomp::Default,
            Some(("seccomp", other)) => {
                return Err(crate::invalid!(
                    "--security-opt seccomp={other}: only the built-in profile (seccomp=default) or seccomp=unconfined are supported"
                ))
            }
            _ => {
                return Err(crate::invalid!(
                    "unsupported --security-opt {item:?}: use seccomp=unconfined or seccomp=default"
                ))
            }
        }
    }
    Ok(())
}

/// Takes capability `given` out of `from` and puts it in `to` (once).
fn move_capability(given: &str, from: &mut Vec<String>, to: &mut Vec<String>) -> Result<(), Invalid> {
    let name = normalize_capability(given)?;
    let same = |other: &String| normalize_capability(other).ok().as_ref() == Some(&name);
    from.retain(|other| !same(other));
    if !to.iter().any(same) {
        to.push(name);
    }
    Ok(())
}

/// `service update --cap-add/--cap-drop` as Docker applies them: an added
/// capability leaves the drop list and joins the add list, and the reverse.
pub fn update_capabilities(security: &mut Security, add: &[String], drop: &[String]) -> Result<(), Invalid> {
    for given in add {
        move_capability(given, &mut security.cap_drop, &mut security.cap_add)?;
    }
    for given in drop {
        move_capability(given, &mut security.cap_add, &mut security.cap_drop)?;
    }
    security.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security(add: &[&str], drop: &[&str]) -> Security {
        Security {
            cap_add: add.iter().map(|s| s.to_string()).collect(),
            cap_drop: drop.iter().map(|s| s.to_string()).collect(),
            ..Security::default()
        }
    }

    #[test]
    fn the_default_set_is_dockers() {
        let caps = Security::default().capabilities().unwrap();
        // Docker's default CapEff for root in a container.
        assert_eq!(caps.0, 0xa80425fb);
        assert!(!caps.has("SYS_ADMIN") && caps.has("NET_BIND_SERVICE"));
    }

    #[test]
    fn names_add_and_drop_as_docker_spells_them() {
        let caps = security(&["net_admin", "CAP_SYS_PTRACE"], &["MKNOD"])
            .capabilities()
            .unwrap();
        assert!(caps.has("NET_ADMIN") && caps.has("SYS_PTRACE") && !caps.has("MKNOD"));
        assert_eq!(security(&[], &["ALL"]).capabilities().unwrap(), CapSet(0));
        assert_eq!(
            security(&["NET_BIND_SERVICE"], &["ALL"])
                .capabilities()
                .unwrap()
                .names(),
            vec!["NET_BIND_SERVICE"]
        );
        assert_eq!(security(&["ALL"], &[]).capabilities().unwrap(), CapSet::ALL);
    }

    #[test]
    fn unknown_and_contradicting_capabilities_are_refused() {
        let e = security(&["NET_ADMINS"], &[]).validate().unwrap_err();
        assert!(e.0.contains("unknown capability \"NET_ADMINS\""), "{e}");
        let e = security(&["NET_ADMIN"], &["cap_net_admin"]).validate().unwrap_err();
        assert!(e.0.contains("contradict"), "{e}");
    }

    #[test]
    fn updates_move_a_capability_between_the_lists() {
        let mut s = security(&["NET_ADMIN"], &["MKNOD"]);
        update_capabilities(&mut s, &["mknod".into()], &["NET_ADMIN".into()]).unwrap();
        assert_eq!(s.cap_add, vec!["MKNOD"]);
        assert_eq!(s.cap_drop, vec!["NET_ADMIN"]);
    }

    #[test]
    fn security_opts_parse_or_say_what_is_supported() {
        let mut s = Security::default();
        parse_security_opts(&["seccomp=unconfined".into()], &mut s).unwrap();
        assert_eq!(s.seccomp, Seccomp::Unconfined);
        let e = parse_security_opts(&["apparmor=unconfined".into()], &mut s).unwrap_err();
        assert!(e.0.contains("seccomp=unconfined"), "{e}");
        let e = parse_security_opts(&["seccomp=/etc/profile.json".into()], &mut s).unwrap_err();
        assert!(e.0.contains("only the built-in profile"), "{e}");
    }
}
