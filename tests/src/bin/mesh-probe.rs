//! What an attacker inside a task would try, for the sandbox tests: run as
//! a task's command, it tries each probe and prints one line per probe,
//! `PROBE: ok` or `PROBE: ERROR`, then `probe done` and sleeps (so the
//! task stays up while the test reads its log).
//!
//! Probes (in any order, each repeatable):
//! `read PATH`, `write PATH`, `connect PATH` (a Unix socket),
//! `setns PATH` (a network namespace file), `unshare-user`, `mount`,
//! `keyctl`, `mknod-disk` (makes a block node for the first disk in /tmp
//! and opens it), `caps` (prints the effective capabilities),
//! `pids` (prints the process IDs in /proc), `uid`, `alloc MIB` (uses that
//! much memory), `fork N` (starts N processes that stay; prints how many
//! started), `write-mib PATH:MIB` (writes that many MiB), `cat PATH`.

use std::{ffi::CString, io, os::unix::net::UnixStream};

fn result(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(code) => errno_name(code),
            None => e.to_string(),
        },
    }
}

fn errno_name(code: i32) -> String {
    match code {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::EROFS => "EROFS".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENXIO => "ENXIO".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::ENOSPC => "ENOSPC".into(),
        other => format!("errno {other}"),
    }
}

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let probe = args[i].as_str();
        let arg = args.get(i + 1).cloned().unwrap_or_default();
        let (line, used) = match probe {
            "read" => (format!("read {arg}: {}", result(std::fs::read(&arg).map(|_| ()))), 2),
            "write" => (format!("write {arg}: {}", result(std::fs::write(&arg, b"x"))), 2),
            "connect" => (
                format!("connect {arg}: {}", result(UnixStream::connect(&arg).map(|_| ()))),
                2,
            ),
            "setns" => {
                let r = std::fs::File::open(&arg).and_then(|f| {
                    // SAFETY: setns on an open descriptor.
                    check(
                        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } as libc::c_long,
                    )
                });
                (format!("setns {arg}: {}", result(r)), 2)
            }
            "unshare-user" => {
                // SAFETY: a system call with a flag argument.
                let r = check(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as libc::c_long);
                (format!("unshare-user: {}", result(r)), 1)
            }
            "mount" => {
                let target = c("/tmp");
                // SAFETY: NUL-terminated strings that outlive the call.
                let r = check(unsafe {
                    libc::mount(
                        c"none".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                } as libc::c_long);
                (format!("mount: {}", result(r)), 1)
            }
            "keyctl" => {
                // KEYCTL_GET_KEYRING_ID of the session keyring.
                // SAFETY: a syscall with integer arguments.
                let r = check(unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i64, 0) });
                (format!("keyctl: {}", result(r)), 1)
            }
            "mknod-disk" => {
                let path = c("/tmp/mesh-probe-disk");
                // SAFETY: a NUL-terminated path.
                unsafe { libc::unlink(path.as_ptr()) };
                // SAFETY: as above; 8:0 is the first SCSI disk.
                let made = check(
                    unsafe { libc::mknod(path.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(8, 0)) } as libc::c_long,
                );
                let r = made.and_then(|()| std::fs::File::open("/tmp/mesh-probe-disk").map(|_| ()));
                (format!("mknod-disk: {}", result(r)), 1)
            }
            "caps" => {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let eff = status
                    .lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .unwrap_or("?")
                    .trim()
                    .to_string();
                (format!("caps: {eff}"), 1)
            }
            "pids" => {
                let mut pids: Vec<u32> = std::fs::read_dir("/proc")
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.file_name().to_str()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                pids.sort();
                (format!("pids: {pids:?}"), 1)
            }
            "write-mib" => {
                // ARG is PATH:MIB.
                let (path, mib) = arg.split_once(':').unwrap_or((&arg, "1"));
                let mib: usize = mib.parse().unwrap_or(1);
                let r = std::fs::write(path, vec![7u8; mib << 20]);
                (format!("write-mib {arg}: {}", result(r)), 2)
            }
            "cat" => {
                let r = std::fs::read_to_string(&arg);
                let shown = match r {
                    Ok(text) => text.trim().to_string(),
                    Err(e) => result(Err(e)),
                };
                (format!("cat {arg}: {shown}"), 2)
            }
            "alloc" => {
                // Touches every page, so the memory is really used.
                let mib: usize = arg.parse().unwrap_or(1);
                let mut blocks = Vec::new();
                for _ in 0..mib {
                    blocks.push(vec![1u8; 1 << 20]);
                }
                (format!("alloc {mib}: ok ({} MiB held)", blocks.len()), 2)
            }
            "fork" => {
                // Children that stay (they sleep), so each one counts.
                let wanted: usize = arg.parse().unwrap_or(1);
                let mut made = 0;
                let mut error = String::new();
                for _ in 0..wanted {
                    match std::process::Command::new("sleep").arg("600").spawn() {
                        Ok(_) => made += 1,
                        Err(e) => {
                            error = result(Err(e));
                            break;
                        }
                    }
                }
                (format!("fork {wanted}: {made} {error}"), 2)
            }
            // SAFETY: getuid cannot fail.
            "uid" => (format!("uid: {}", unsafe { libc::getuid() }), 1),
            other => (format!("{other}: unknown probe"), 1),
        };
        println!("{line}");
        i += used;
    }
    println!("probe done");
    std::thread::sleep(std::time::Duration::from_secs(3600));
}
