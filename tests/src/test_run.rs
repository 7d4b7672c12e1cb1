//! BPF_PROG_TEST_RUN: runs a loaded program on a packet fixture and returns
//! its verdict and output packet, the way Katran tests its programs.
//!
//! aya has no wrapper for this command, so this is the one raw `bpf(2)`
//! call of the test suite.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_PROG_TEST_RUN` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Room for programs that grow the packet (encapsulation pushes headers).
const OUTPUT_HEADROOM: usize = 512;

/// The `test` member of `union bpf_attr`, as the kernel lays it out.
#[repr(C, align(8))]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one test run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (XDP action or TC verdict).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Mean run time per repetition, in nanoseconds, as the kernel measured it.
    pub duration_ns: u32,
}

/// Runs the program `prog` on `packet` (`repeat` times; 0 and 1 both mean
/// once). Programs of type XDP and SCHED_CLS accept Ethernet frames of at
/// least 14 bytes.
pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> io::Result<TestRun> {
    let mut out = vec![0u8; packet.len() + OUTPUT_HEADROOM];
    let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "packet larger than 4 GiB");
    let mut attr = TestAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        data_size_in: u32::try_from(packet.len()).map_err(too_big)?,
        data_size_out: u32::try_from(out.len()).map_err(too_big)?,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestAttr::default()
    };
    // SAFETY: attr is a properly laid out bpf_attr prefix whose size is
    // passed along; data_in/data_out point to live buffers of the stated
    // sizes for the whole call, and the kernel writes at most data_size_out
    // bytes to data_out.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            std::mem::size_of::<TestAttr>() as libc::c_uint,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun {
        verdict: attr.retval,
        packet: out,
        duration_ns: attr.duration,
    })
}
