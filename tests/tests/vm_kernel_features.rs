//! VM lane: the kernel features the host kernel lacks (IPVS, kernel
//! WireGuard, ESP) load and work in Debian's kernel, booted by
//! `cargo xtask test` under virtme-ng.
//!
//! Each test loads its module, then makes its objects inside a fresh network
//! namespace owned by one dedicated thread: the namespace, and everything in
//! it, goes away when that thread ends (nothing else holds it: the netlink
//! sockets are dropped inside and the `ip` children have exited). The test
//! then checks that none of it is visible from the VM's root namespace.
//!
//! IPVS is driven through the agent's own layer (dataplane/ipvs.rs), and
//! WireGuard over netlink as the agent drives it;
//! the ESP state is added with `ip xfrm`, since an `xfrm_usersa_info` written
//! by hand would dwarf the test.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Command, Output},
};

use mesh_agent::dataplane::ipvs::{Change, Ipvs, Schedule, ServiceId};

/// Loads `module` with modprobe and checks the kernel lists it.
fn modprobe(module: &str) {
    let output = Command::new("modprobe")
        .arg(module)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `modprobe {module}`: {e}"));
    assert!(
        output.status.success(),
        "`modprobe {module}` failed ({}): {}; this test needs Debian's kernel (the VM lane), not the host's",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    assert!(
        Path::new("/sys/module").join(module).exists(),
        "modprobe {module} succeeded but /sys/module/{module} does not exist"
    );
}

/// Runs `f` on a new thread inside a new network namespace; the namespace
/// ends with the thread. A panic in `f` fails the calling test as is.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let thread = s.spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) switches only this thread, which
            // is ours alone and ends right after `f`.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET) failed: {}", io::Error::last_os_error());
            f()
        });
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `ip ARGS` (split on whitespace) in the calling thread's namespace;
/// fails the test if it cannot start.
fn ip(args: &str) -> Output {
    Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {args}`: {e}"))
}

#[test]
#[ignore = "vm lane: needs Debian's kernel; run by `cargo xtask test` inside virtme-ng"]
fn ipvs_loads_and_takes_a_virtual_service() {
    modprobe("ip_vs");
    let vip = ServiceId::Addr {
        addr: Ipv4Addr::new(10, 255, 0, 1),
        port: 80,
        protocol: 6,
    };
    let in_namespace = in_fresh_netns(|| {
        let mut x = Ipvs::open().expect("resolve the IPVS generic netlink family in a new namespace");
        x.apply(&[Change::AddService(
            vip,
            Schedule {
                scheduler: "rr".into(),
                scheduler_flags: 0,
                persistence_s: 0,
            },
        )])
        .expect("add TCP virtual service 10.255.0.1:80 (scheduler rr) over generic netlink");
        let services = x.observe(|_| true).expect("dump IPVS services");
        assert_eq!(
            services
                .iter()
                .map(|(id, s)| (*id, s.schedule.scheduler.clone()))
                .collect::<Vec<_>>(),
            [(vip, "rr".to_owned())],
            "IPVS does not list the virtual service just added"
        );
        x.apply(&[Change::DelService(vip)]).expect("delete the virtual service");
        x.observe(|_| true).expect("dump IPVS services after deleting")
    });
    assert!(
        in_namespace.is_empty(),
        "the virtual service is still listed after deleting it"
    );

    let root = Ipvs::open()
        .expect("resolve IPVS in the root namespace")
        .observe(|_| true)
        .expect("dump root namespace IPVS services");
    assert!(
        !root.contains_key(&vip),
        "the test's virtual service leaked into the root namespace: {root:?}"
    );
}

#[test]
#[ignore = "vm lane: needs Debian's kernel; run by `cargo xtask test` inside virtme-ng"]
fn wireguard_loads_and_a_link_derives_its_public_key() {
    modprobe("wireguard");
    let name = "wgvmtest0";
    in_fresh_netns(|| {
        let mut route = Netlink::open(libc::NETLINK_ROUTE).expect("open an rtnetlink socket");
        route
            .request(
                rtnl::RTM_NEWLINK,
                NLM_F_CREATE | NLM_F_EXCL,
                &rtnl::link(name, Some("wireguard")),
            )
            .expect("create a wireguard link (`ip link add wgvmtest0 type wireguard`)");
        let kind = rtnl::link_kind(&mut route, name).expect("look the new link up by name");
        assert_eq!(
            kind.as_deref(),
            Some("wireguard"),
            "the new link is not of kind wireguard"
        );

        let mut genl = Netlink::open(libc::NETLINK_GENERIC).expect("open a generic netlink socket");
        let wg = genl
            .family_id(wireguard::FAMILY)
            .expect("resolve the wireguard generic netlink family");
        genl.request(wg, 0, &wireguard::set_private_key(name, &wireguard::RFC7748_PRIVATE))
            .expect("set the link's private key (`wg set wgvmtest0 private-key ...`)");
        let public = wireguard::public_key(&mut genl, wg, name).expect("read the link's device attributes back");
        assert_eq!(
            public.as_deref(),
            Some(&wireguard::RFC7748_PUBLIC[..]),
            "the kernel derived the wrong Curve25519 public key (RFC 7748 section 6.1 vector)"
        );
    });

    let mut route = Netlink::open(libc::NETLINK_ROUTE).expect("open an rtnetlink socket");
    let root = rtnl::link_kind(&mut route, name);
    assert_eq!(
        root.as_ref().map_err(io::Error::raw_os_error),
        Err(Some(libc::ENODEV)),
        "looking up {name} in the root namespace should fail with ENODEV"
    );
}

#[test]
#[ignore = "vm lane: needs Debian's kernel; run by `cargo xtask test` inside virtme-ng"]
fn esp4_loads_and_takes_an_esp_state() {
    modprobe("esp4");
    let id = "src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x4d455348";
    // AEAD key: 128-bit AES key + 32-bit salt, 128-bit ICV.
    let add = format!(
        "xfrm state add {id} reqid 1 mode transport \
         aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128"
    );
    let get = format!("xfrm state get {id}");
    in_fresh_netns(|| {
        let added = ip(&add);
        assert!(
            added.status.success(),
            "`ip {add}` failed: {}",
            String::from_utf8_lossy(&added.stderr).trim()
        );
        let shown = ip(&get);
        let state = String::from_utf8_lossy(&shown.stdout);
        assert!(
            shown.status.success() && state.contains("proto esp spi 0x4d455348") && state.contains("rfc4106(gcm(aes))"),
            "`ip {get}` does not show the ESP state just added: {state}{}",
            String::from_utf8_lossy(&shown.stderr).trim()
        );
    });
    let root = ip(&get);
    assert!(
        !root.status.success(),
        "the test's ESP state leaked into the root namespace: {}",
        String::from_utf8_lossy(&root.stdout)
    );
}

// ---- a minimal netlink client: enough for the requests above ----

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;

/// A netlink socket in the network namespace of the thread that opened it.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open(protocol: libc::c_int) -> io::Result<Netlink> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a descriptor we just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 0 })
    }

    /// Sends one request and returns the bodies of its replies: a dump
    /// (`NLM_F_DUMP` in `flags`) ends at NLMSG_DONE, anything else at the
    /// kernel's acknowledgement. A negative errno in either is the error.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        let len = u32::try_from(NLMSG_HDRLEN + body.len()).expect("reason: requests are small");
        let mut message = Vec::with_capacity(NLMSG_HDRLEN + body.len());
        message.extend_from_slice(&len.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&self.seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        message.extend_from_slice(body);
        // SAFETY: the pointer and length describe `message`, alive for the call.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }

        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: the pointer and length describe `buf`, alive for the call.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32_at(rest, 0) as usize;
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let (kind, seq, body) = (u16_at(rest, 4), u32_at(rest, 8), &rest[NLMSG_HDRLEN..len]);
                rest = &rest[align(len).min(rest.len())..];
                if seq != self.seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR | NLMSG_DONE => {
                        let errno = body.get(..4).map_or(0, |b| {
                            i32::from_ne_bytes(b.try_into().expect("reason: get(..4) yields 4 bytes"))
                        });
                        if errno < 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        if kind == NLMSG_DONE || !dump {
                            return Ok(replies);
                        }
                    }
                    _ => replies.push(body.to_vec()),
                }
            }
        }
    }

    /// The id of a generic netlink family (CTRL_CMD_GETFAMILY); ENOENT if
    /// no loaded module registered it.
    fn family_id(&mut self, name: &str) -> io::Result<u16> {
        const GENL_ID_CTRL: u16 = 0x10;
        const CTRL_CMD_GETFAMILY: u8 = 3;
        const CTRL_ATTR_FAMILY_ID: u16 = 1;
        const CTRL_ATTR_FAMILY_NAME: u16 = 2;
        let mut body = genl_header(CTRL_CMD_GETFAMILY, 1);
        put_attr(&mut body, CTRL_ATTR_FAMILY_NAME, &c_string(name));
        self.request(GENL_ID_CTRL, 0, &body)?
            .iter()
            .find_map(|reply| attr(&reply[4..], CTRL_ATTR_FAMILY_ID).map(|id| u16_at(id, 0)))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no family id in the reply"))
    }
}

/// The generic netlink header: command, version, reserved.
fn genl_header(cmd: u8, version: u8) -> Vec<u8> {
    vec![cmd, version, 0, 0]
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = u16::try_from(4 + value.len()).expect("reason: attributes here are small");
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align(buf.len()), 0);
}

fn put_nested(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    put_attr(buf, kind | NLA_F_NESTED, &inner);
}

/// The first attribute of `kind` among the attributes in `buf`.
fn attr(mut buf: &[u8], kind: u16) -> Option<&[u8]> {
    while buf.len() >= 4 {
        let len = usize::from(u16_at(buf, 0));
        if len < 4 || len > buf.len() {
            return None;
        }
        if u16_at(buf, 2) & NLA_TYPE_MASK == kind {
            return Some(&buf[4..len]);
        }
        buf = &buf[align(len).min(buf.len())..];
    }
    None
}

fn c_string(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

fn str_of(value: &[u8]) -> String {
    String::from_utf8_lossy(value).trim_end_matches('\0').to_owned()
}

fn align(len: usize) -> usize {
    len.next_multiple_of(4)
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// rtnetlink links (include/uapi/linux/rtnetlink.h, if_link.h).
mod rtnl {
    use super::*;

    pub const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    /// `struct ifinfomsg`, all zero: any family, type, index, flags.
    const IFINFOMSG: [u8; 16] = [0; 16];

    /// A link message naming `name`, of `kind` if given.
    pub fn link(name: &str, kind: Option<&str>) -> Vec<u8> {
        let mut body = IFINFOMSG.to_vec();
        put_attr(&mut body, IFLA_IFNAME, &c_string(name));
        if let Some(kind) = kind {
            put_nested(&mut body, IFLA_LINKINFO, |info| {
                put_attr(info, IFLA_INFO_KIND, kind.as_bytes())
            });
        }
        body
    }

    /// The kind of link `name` (`ip -d link show NAME`); ENODEV if none.
    pub fn link_kind(route: &mut Netlink, name: &str) -> io::Result<Option<String>> {
        let replies = route.request(RTM_GETLINK, 0, &link(name, None))?;
        Ok(replies.iter().find_map(|reply| {
            let info = attr(&reply[IFINFOMSG.len()..], IFLA_LINKINFO)?;
            attr(info, IFLA_INFO_KIND).map(str_of)
        }))
    }
}

/// WireGuard over generic netlink (include/uapi/linux/wireguard.h).
mod wireguard {
    use super::*;

    pub const FAMILY: &str = "wireguard";
    const VERSION: u8 = 1;
    const CMD_GET_DEVICE: u8 = 0;
    const CMD_SET_DEVICE: u8 = 1;
    const DEVICE_A_IFNAME: u16 = 2;
    const DEVICE_A_PRIVATE_KEY: u16 = 3;
    const DEVICE_A_PUBLIC_KEY: u16 = 4;

    /// RFC 7748 section 6.1: Alice's private key and the public key X25519 derives.
    pub const RFC7748_PRIVATE: [u8; 32] = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    pub const RFC7748_PUBLIC: [u8; 32] = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");

    /// `wg set NAME private-key KEY`.
    pub fn set_private_key(name: &str, key: &[u8; 32]) -> Vec<u8> {
        let mut body = genl_header(CMD_SET_DEVICE, VERSION);
        put_attr(&mut body, DEVICE_A_IFNAME, &c_string(name));
        put_attr(&mut body, DEVICE_A_PRIVATE_KEY, key);
        body
    }

    /// The public key of device `name` (`wg show NAME public-key`).
    pub fn public_key(genl: &mut Netlink, family: u16, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut body = genl_header(CMD_GET_DEVICE, VERSION);
        put_attr(&mut body, DEVICE_A_IFNAME, &c_string(name));
        let replies = genl.request(family, NLM_F_DUMP, &body)?;
        Ok(replies
            .iter()
            .find_map(|reply| attr(&reply[4..], DEVICE_A_PUBLIC_KEY).map(<[u8]>::to_vec)))
    }

    const fn hex(s: &str) -> [u8; 32] {
        const fn nibble(c: u8) -> u8 {
            match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => panic!("not a lowercase hex digit"),
            }
        }
        let s = s.as_bytes();
        let mut out = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            out[i] = (nibble(s[2 * i]) << 4) | nibble(s[2 * i + 1]);
            i += 1;
        }
        out
    }
}
