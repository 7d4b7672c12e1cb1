//! A task's secrets and configs on the node: written to a memory-backed
//! file system (tmpfs) the agent mounts for the task alone, bind-mounted by
//! the task's process over /run/secrets and /run/configs (and a config
//! with an absolute target over that file, which must exist on the node)
//! inside its own mount namespace, then unmounted from the node's
//! namespace once the task has started. From then on only the task's mount namespace holds them,
//! and they go with it: nothing is written to disk, and a node keeps no
//! copy once its last task using them has stopped.

use std::{
    ffi::CString,
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use super::error::TaskError;
use crate::api::secret::{Kind, TaskFile, CONFIGS_DIR, SECRETS_DIR};

/// The staged files of one task, mounted at `dir` until [`Staged::release`].
pub(crate) struct Staged {
    dir: PathBuf,
    /// (source in the staging tmpfs, where the task sees it).
    pub(crate) binds: Vec<(PathBuf, PathBuf)>,
}

/// Mounts a tmpfs at `dir` and writes `files` into it, one directory per
/// kind, with their owner and mode.
pub(crate) fn stage(dir: &Path, files: &[TaskFile]) -> Result<Staged, TaskError> {
    let total: usize = files.iter().map(|f| f.data.len()).sum();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(TaskError::io(format!("creating {}", dir.display())))?;
    let target = crate::agent::net::netns::c_path(dir).map_err(TaskError::io("naming the secrets' mount point"))?;
    // Room for the files and their directories, rounded up.
    let options =
        CString::new(format!("mode=0700,size={}", (total + 64 * 1024).next_multiple_of(4096))).expect("reason: no NUL");
    // SAFETY: NUL-terminated strings that outlive the call.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(TaskError::Io {
            doing: format!("mounting a tmpfs for the task's secrets at {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    let staged = Staged {
        dir: dir.to_path_buf(),
        binds: Vec::new(),
    };
    write_all(staged, files)
}

/// Writes `f` at `path` with its owner and mode.
fn write_file(path: &Path, f: &TaskFile) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(f.mode)
        .open(path)?;
    file.write_all(&f.data)?;
    std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid))?;
    // The umask may have cut the mode.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(f.mode))
}

fn write_all(mut staged: Staged, files: &[TaskFile]) -> Result<Staged, TaskError> {
    // Configs over existing files, one bind each.
    for (i, f) in files.iter().filter(|f| f.target.starts_with('/')).enumerate() {
        let target = Path::new(&f.target);
        if !target.is_file() {
            staged.release();
            return Err(TaskError::ConfigTarget {
                target: f.target.clone(),
                dir: CONFIGS_DIR,
            });
        }
        let source = staged.dir.join(format!("file-{i}"));
        if let Err(e) = write_file(&source, f) {
            staged.release();
            return Err(TaskError::io(format!("writing the task's config for {}", f.target))(e));
        }
        staged.binds.push((source, target.to_path_buf()));
    }
    for (kind, sub, shown) in [
        (Kind::Secret, "secrets", SECRETS_DIR),
        (Kind::Config, "configs", CONFIGS_DIR),
    ] {
        let mine: Vec<&TaskFile> = files
            .iter()
            .filter(|f| f.kind == kind && !f.target.starts_with('/'))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let source = staged.dir.join(sub);
        let written = (|| -> std::io::Result<()> {
            fs::DirBuilder::new().mode(0o755).create(&source)?;
            for f in &mine {
                write_file(&source.join(&f.target), f)?;
            }
            // Where the task sees them must exist on the node (empty).
            fs::DirBuilder::new().recursive(true).mode(0o755).create(shown)
        })();
        if let Err(e) = written {
            staged.release();
            return Err(TaskError::io(format!("writing the task's {}s", kind.name()))(e));
        }
        staged.binds.push((source, PathBuf::from(shown)));
    }
    Ok(staged)
}

impl Staged {
    /// Unmounts the staging tmpfs from the node's namespace (a started
    /// task keeps its own mount) and removes its directory.
    pub(crate) fn release(&mut self) {
        if let Ok(path) = crate::agent::net::netns::c_path(&self.dir) {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.dir);
        self.binds.clear();
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.release();
    }
}
