//! The task's view of the node's file system, built by `task-init` in the
//! task's own mount namespace (nothing here touches the node's).
//!
//! Tasks have no image: they see the node's file system, less what must
//! stay the agent's. As Docker does for a container: a private /dev with
//! the harmless devices only (and no device node elsewhere usable, so
//! CAP_MKNOD opens no disk), its own /proc and /dev/mqueue, /sys read-only,
//! and the kernel files Docker masks in /proc masked.

use crate::{
    agent::net::netns::c_path,
    api::mounts::{Mount, MountKind},
};
use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

/// Files of /proc Docker masks (read as empty).
const MASKED_PROC_FILES: [&str; 5] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
];

/// Directories Docker masks (an empty read-only tmpfs).
const MASKED_DIRS: [&str; 4] = [
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Parts of /proc Docker makes read-only.
const READ_ONLY_PROC: [&str; 5] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// The device nodes a task gets: (name, major, minor).
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `mount_setattr(2)` (kernel >= 5.12): flags set on a mount or a tree.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(what: impl Fn() -> String, ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{}: {e}", what())))
    } else {
        Ok(())
    }
}

/// mount(2), with what failed in the error.
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    let fstype = fstype.map(|f| CString::new(f).expect("reason: a literal"));
    let data = data.map(|d| CString::new(d).expect("reason: options are formatted here, without NUL"));
    // SAFETY: NUL-terminated strings (or null) that outlive the call.
    let ret = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(|| format!("mounting {}", target.display()), ret)
}

/// mount_setattr(2): sets `set` and clears `clear` on the mount at `path`
/// (and every mount below it if `recursive`).
fn set_attrs(path: &Path, recursive: bool, set: u64, clear: u64) -> io::Result<()> {
    let path_c = c_path(path)?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: a NUL-terminated path and a mount_attr of the size given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path_c.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(
        || format!("changing the flags of the mount at {}", path.display()),
        ret as libc::c_int,
    )
}

/// A read-only bind of `from` at `to`.
fn bind_read_only(from: &Path, to: &Path) -> io::Result<()> {
    mount(Some(from), to, None, libc::MS_BIND, None)?;
    mount(
        None,
        to,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// Hides `path`, if it exists: an empty read-only tmpfs over a
/// directory, /dev/null over anything else (a socket then refuses).
fn hide(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) if !m.is_dir() => {
            return mount(Some(Path::new("/dev/null")), path, None, libc::MS_BIND, None);
        }
        Ok(_) => {}
    }
    mount(
        Some(Path::new("tmpfs")),
        path,
        Some("tmpfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=4k,mode=0755"),
    )
}

/// What the task sees of the node, built before its PID 1 is forked: in
/// order, so later mounts are not made read-only or hidden by earlier ones.
pub(crate) struct View<'a> {
    /// Mounted over /etc/resolv.conf.
    pub(crate) resolv_conf: Option<&'a Path>,
    /// Read-only binds (source, target).
    pub(crate) binds: &'a [(PathBuf, PathBuf)],
    /// Directories and files hidden.
    pub(crate) masked: &'a [PathBuf],
    /// `--mount`s: binds (volumes resolved) and tmpfs.
    pub(crate) mounts: &'a [Mount],
    /// `--read-only`.
    pub(crate) read_only: bool,
}

impl View<'_> {
    /// Builds it in the calling process's (new) mount namespace.
    pub(crate) fn build(&self) -> io::Result<()> {
        // Nothing mounted here may reach the node's namespace.
        mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        if let Some(conf) = self.resolv_conf {
            bind_read_only(conf, Path::new("/etc/resolv.conf"))?;
        }
        for (from, to) in self.binds {
            bind_read_only(from, to)?;
        }
        // Binds first: a tmpfs over a directory a bind's source is under
        // (/tmp, say) would hide the source.
        let (tmpfs, binds): (Vec<&Mount>, Vec<&Mount>) = self.mounts.iter().partition(|m| m.kind == MountKind::Tmpfs);
        for m in binds.into_iter().chain(tmpfs) {
            let target = Path::new(&m.target);
            match m.kind {
                MountKind::Tmpfs => {
                    let size = m.tmpfs_size.map(|s| format!(",size={s}")).unwrap_or_default();
                    mount(
                        Some(Path::new("tmpfs")),
                        target,
                        Some("tmpfs"),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        Some(&format!("mode=1777{size}")),
                    )?
                }
                _ if m.read_only => bind_read_only(Path::new(&m.source), target)?,
                _ => mount(
                    Some(Path::new(&m.source)),
                    target,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                )?,
            }
        }
        for dir in self.masked {
            hide(dir)?;
        }
        // No device node on the node's file systems opens from here.
        let mut attrs = MOUNT_ATTR_NODEV;
        if self.read_only {
            attrs |= MOUNT_ATTR_RDONLY;
        }
        set_attrs(Path::new("/"), true, attrs, 0)?;
        if self.read_only {
            // The writable mounts stay writable under a read-only view.
            for m in self.mounts.iter().filter(|m| !m.read_only) {
                set_attrs(Path::new(&m.target), true, 0, MOUNT_ATTR_RDONLY)?;
            }
        }
        set_attrs(Path::new("/sys"), true, MOUNT_ATTR_RDONLY, 0)?;
        for dir in MASKED_DIRS.iter().filter(|d| d.starts_with("/sys")) {
            hide(Path::new(dir))?;
        }
        private_dev()
    }
}

/// A /dev of its own: the harmless devices, a pty instance, /dev/shm and
/// /dev/mqueue (of the task's IPC namespace).
fn private_dev() -> io::Result<()> {
    let dev = Path::new("/dev");
    mount(
        Some(Path::new("tmpfs")),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some("mode=0755,size=65536k"),
    )?;
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        let path_c = c_path(&path)?;
        // SAFETY: a NUL-terminated path.
        let made = unsafe { libc::mknod(path_c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(major, minor)) };
        check(|| format!("creating {}", path.display()), made)?;
        // SAFETY: as above; mknod's mode is cut by the umask.
        unsafe { libc::chmod(path_c.as_ptr(), 0o666) };
        // A mount of its own keeps the node usable once /dev is nodev.
        mount(Some(&path), &path, None, libc::MS_BIND, None)?;
    }
    // Nodes the task makes in /dev open nothing.
    set_attrs(dev, false, MOUNT_ATTR_NODEV, 0)?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(|e| io::Error::new(e.kind(), format!("linking /dev/{link}: {e}")))?;
    }
    for (dir, fstype, flags, data) in [
        (
            "pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        ),
        (
            "shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "mode=1777,size=65536k",
        ),
        (
            "mqueue",
            "mqueue",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
    ] {
        let path = dev.join(dir);
        std::fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        mount(Some(Path::new(fstype)), &path, Some(fstype), flags, Some(data))?;
    }
    Ok(())
}

/// The task's /proc (of its PID namespace: it sees its own processes
/// only), with what Docker masks masked. Done by the namespace's PID 1.
pub(crate) fn mount_proc() -> io::Result<()> {
    let proc = Path::new("/proc");
    mount(
        Some(proc),
        proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    for file in MASKED_PROC_FILES.iter().map(Path::new).filter(|p| p.exists()) {
        mount(Some(Path::new("/dev/null")), file, None, libc::MS_BIND, None)?;
    }
    for dir in MASKED_DIRS.iter().filter(|d| d.starts_with("/proc")) {
        hide(Path::new(dir))?;
    }
    for path in READ_ONLY_PROC.iter().map(Path::new).filter(|p| p.exists()) {
        bind_read_only(path, path)?;
    }
    Ok(())
}
