//! Named network namespaces, kept alive by a bind mount under /run/netns
//! exactly as `ip netns` keeps them, so operators can inspect them with
//! `ip netns exec NAME ...`.
//!
//! Entering a namespace switches only the calling thread, so [`NetNs::run`]
//! runs the work on a dedicated thread: no runtime worker ever ends up in
//! the wrong namespace.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::{ffi::OsStrExt, fs::OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

/// Where named namespaces are bind-mounted (the same place as `ip netns`).
pub const NETNS_DIR: &str = "/run/netns";

/// Errors of network namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The name cannot be a file name under /run/netns.
    #[error("invalid network namespace name {0:?}: use 1-64 characters without '/', not '.' or '..'")]
    InvalidName(String),
    /// A namespace of that name exists already.
    #[error("network namespace {0:?} exists already (remove it with `ip netns delete {0}`)")]
    Exists(String),
    /// No namespace of that name.
    #[error("network namespace {0:?} does not exist")]
    NotFound(String),
    /// A system call failed.
    #[error("{op} for network namespace {name:?}: {source}")]
    Sys {
        op: &'static str,
        name: String,
        source: io::Error,
    },
}

/// A named network namespace.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    /// Creates a new, empty namespace (`ip netns add NAME`).
    pub fn create(name: &str) -> Result<NetNs, NetnsError> {
        let path = path_of(name)?;
        fs::create_dir_all(NETNS_DIR).map_err(|source| NetnsError::Sys {
            op: "create /run/netns",
            name: name.to_owned(),
            source,
        })?;
        NetNs::create_at(&path, name)
    }

    /// Creates a new, empty namespace kept alive by a bind mount at `path`
    /// (tasks' namespaces live in the agent's data directory, out of
    /// `ip netns list`); `name` is for messages.
    pub fn create_at(path: &Path, name: &str) -> Result<NetNs, NetnsError> {
        let path = path.to_path_buf();
        let sys = |op| {
            move |source| NetnsError::Sys {
                op,
                name: name.to_owned(),
                source,
            }
        };
        // The mount point: created exclusively so two creators cannot share it.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => NetnsError::Exists(name.to_owned()),
                _ => sys("create the mount point")(e),
            })?;
        let mounted = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<()> {
                // SAFETY: unshare only changes this thread's namespace; the
                // thread ends right after, so nothing else runs in it.
                check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
                bind_mount(Path::new("/proc/thread-self/ns/net"), &path)
            })
            .join()
            .expect("reason: the namespace thread does not panic")
        });
        if let Err(source) = mounted {
            let _ = fs::remove_file(&path);
            return Err(NetnsError::Sys {
                op: "unshare and bind-mount",
                name: name.to_owned(),
                source,
            });
        }
        NetNs::open_at(&path, name)
    }

    /// Opens an existing namespace.
    pub fn open(name: &str) -> Result<NetNs, NetnsError> {
        NetNs::open_at(&path_of(name)?, name)
    }

    /// Opens the namespace bind-mounted (or a process's, `/proc/PID/ns/net`) at `path`.
    pub fn open_at(path: &Path, name: &str) -> Result<NetNs, NetnsError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetnsError::NotFound(name.to_owned()),
            _ => NetnsError::Sys {
                op: "open",
                name: name.to_owned(),
                source: e,
            },
        })?;
        Ok(NetNs {
            name: name.to_owned(),
            file,
        })
    }

    /// Removes a namespace's name (`ip netns delete NAME`); the kernel frees
    /// it, with every link inside, once no process or fd holds it any more.
    pub fn delete(name: &str) -> Result<(), NetnsError> {
        NetNs::delete_at(&path_of(name)?, name)
    }

    /// Unmounts and removes the bind mount at `path` (see [`NetNs::create_at`]).
    pub fn delete_at(path: &Path, name: &str) -> Result<(), NetnsError> {
        if !path.exists() {
            return Err(NetnsError::NotFound(name.to_owned()));
        }
        let c_path = c_path(path).map_err(|source| NetnsError::Sys {
            op: "unmount",
            name: name.to_owned(),
            source,
        })?;
        // SAFETY: c_path is a valid NUL-terminated path for the call's duration.
        match check(unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) }) {
            Ok(()) => {}
            // Not a mount point: a leftover of a creation cut short; unlink it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(NetnsError::Sys {
                    op: "unmount",
                    name: name.to_owned(),
                    source,
                })
            }
        }
        fs::remove_file(path).map_err(|source| NetnsError::Sys {
            op: "remove",
            name: name.to_owned(),
            source,
        })
    }

    /// Names of every namespace under /run/netns (`ip netns list`).
    pub fn list() -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(NETNS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A file descriptor referring to the namespace (for setns or
    /// `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its
    /// result (`ip netns exec NAME ...` for a closure). A panic in `f` is
    /// resumed in the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            let joined = s
                .spawn(|| -> io::Result<T> {
                    // SAFETY: setns only changes this thread's namespace, and
                    // the thread is ours alone until it ends after `f`.
                    check(unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) })?;
                    Ok(f())
                })
                .join();
            match joined {
                Ok(result) => result.map_err(|source| NetnsError::Sys {
                    op: "enter (setns)",
                    name: self.name.clone(),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

fn path_of(name: &str) -> Result<PathBuf, NetnsError> {
    if name.is_empty() || name.len() > 64 || name.contains('/') || name == "." || name == ".." {
        return Err(NetnsError::InvalidName(name.to_owned()));
    }
    Ok(Path::new(NETNS_DIR).join(name))
}

/// A path as the C string system calls take.
pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{} holds a NUL", path.display())))
}

fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    let (source, target) = (c_path(source)?, c_path(target)?);
    // SAFETY: both are valid NUL-terminated paths; a bind mount takes no
    // filesystem type or data.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        for bad in ["", ".", "..", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(path_of(bad), Err(NetnsError::InvalidName(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(path_of("mesh-h1").expect("valid"), Path::new("/run/netns/mesh-h1"));
    }
}
