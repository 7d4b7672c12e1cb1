//! The agent's own bpffs, where the routing mesh pins its maps and TC
//! links so they outlive the agent: a restarted or upgraded agent takes
//! them over and forwarding never stops. Mounted at `DATA_DIR/bpf` (owned
//! by the agent, like the rest of its data directory) unless one is there.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::agent::net::netns::c_path;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory of the agent with data directory `data_dir`, mounted
/// if it is not a bpffs yet.
pub fn pin_dir(data_dir: &Path) -> io::Result<PathBuf> {
    let dir = data_dir.join("bpf");
    std::fs::create_dir_all(&dir)?;
    if !is_bpffs(&dir)? {
        let target = c_path(&dir)?;
        // SAFETY: NUL-terminated strings that live through the call.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(dir)
}

fn is_bpffs(dir: &Path) -> io::Result<bool> {
    let path = c_path(dir)?;
    // SAFETY: statfs writes into a zeroed struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Unmounts the agent's bpffs (pins in it go with it). For whoever cleans
/// up after an agent that is gone for good.
pub fn unmount(data_dir: &Path) {
    let dir = data_dir.join("bpf");
    if !is_bpffs(&dir).unwrap_or(false) {
        return;
    }
    if let Ok(target) = c_path(&dir) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
