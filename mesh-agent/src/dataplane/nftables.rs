//! nf_tables over netlink (NETLINK_NETFILTER), for what the node needs
//! from the firewall: masquerading what its tasks send beyond the node, as
//! Docker does for docker_gwbridge (`-s POOL ! -o BRIDGE -j MASQUERADE`);
//! the tunnel guard; and the IPVS backend's marks ([`marks`]).
//!
//! A small batch writer instead of a library: the Rust nftables crates
//! either shell out to `nft` or are GPL and build libnftnl through bindgen.
//! Encoding is pure (`*_batch`), sending is [`send_batch`]. Every change is
//! one batch, so the kernel applies all of it or none.

use std::{io, net::Ipv4Addr, time::Duration};

use super::nlmsg::{self, NLMSG_ERROR, NLMSG_HDRLEN};

pub mod marks;

// linux/netfilter/nfnetlink.h and nf_tables.h.
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
/// NF_IP_PRI_NAT_SRC: where `nft`'s `srcnat` priority puts masquerading.
const PRIORITY_SRCNAT: i32 = 100;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_META_IIFNAME: u32 = 6;
/// Offset of the destination address in the IPv6 header.
const IPV6_DADDR_OFFSET: u32 = 24;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_REG_1: u32 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_OIFNAME: u32 = 7;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_L4PROTO: u32 = 16;
const IPPROTO_UDP: u8 = 17;
/// A TCP or UDP header's destination port.
const TRANSPORT_DPORT_OFFSET: u32 = 2;
/// Offset of the source address in the IPv4 header.
const IPV4_SADDR_OFFSET: u32 = 12;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const IFNAMSIZ: usize = 16;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

/// How long the kernel may take to answer a batch.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The table the agent owns (family ip). Nothing else of the host's
/// firewall is touched.
pub(crate) const TABLE: &str = "mesh";
/// Its source-NAT chain.
pub(crate) const NAT_CHAIN: &str = "postrouting";
/// The table guarding the tunnel addresses (family ip6).
pub(crate) const TUNNEL_TABLE: &str = "mesh-tunnel";
/// Its input chain.
pub(crate) const TUNNEL_CHAIN: &str = "input";

/// `ip saddr SOURCE oifname != EXEMPT masquerade`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Masquerade {
    /// The task pool.
    pub(crate) source: Ipv4Addr,
    /// Its prefix length.
    pub(crate) prefix: u8,
    /// Traffic leaving through this interface (the node bridge itself,
    /// task to task) keeps its address.
    pub(crate) exempt_oif: String,
}

/// Errors of nf_tables requests.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The socket could not be opened, sent on or read.
    #[error("nf_tables netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused a message of the batch (nothing was applied).
    #[error("nf_tables refused {what}: {source}")]
    Refused {
        /// Which message.
        what: &'static str,
        /// The errno.
        source: io::Error,
    },
    /// The kernel did not answer.
    #[error("nf_tables did not answer within {ANSWER_TIMEOUT:?}")]
    NoAnswer,
}

/// One batch of messages, with what each one is (for errors).
pub struct Batch {
    bytes: Vec<u8>,
    /// Sequence number and description of the messages that want an ack.
    acked: Vec<(u32, &'static str)>,
    next_seq: u32,
}

impl Batch {
    /// No messages yet (queries are sent like this, without batch markers).
    fn empty() -> Batch {
        Batch {
            bytes: Vec::new(),
            acked: Vec::new(),
            next_seq: 1,
        }
    }

    fn new() -> Batch {
        let mut batch = Batch::empty();
        batch.message(NFNL_MSG_BATCH_BEGIN, libc::AF_UNSPEC as u8, NLM_F_REQUEST, &[], None);
        batch
    }

    fn message(&mut self, kind: u16, family: u8, flags: u16, attrs: &[u8], what: Option<&'static str>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch_marker = matches!(kind, NFNL_MSG_BATCH_BEGIN | NFNL_MSG_BATCH_END);
        let kind = if batch_marker {
            kind
        } else {
            NFNL_SUBSYS_NFTABLES << 8 | kind
        };
        // nfgenmsg: family, version 0, res_id (the subsystem for batch markers).
        let res_id: u16 = if batch_marker { NFNL_SUBSYS_NFTABLES } else { 0 };
        let len = NLMSG_HDRLEN + 4 + attrs.len();
        self.bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        let flags = if what.is_some() { flags | NLM_F_ACK } else { flags };
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        self.bytes.extend_from_slice(&[family, 0]);
        self.bytes.extend_from_slice(&res_id.to_be_bytes());
        self.bytes.extend_from_slice(attrs);
        if let Some(what) = what {
            self.acked.push((seq, what));
        }
    }

    /// Creates (if missing) or deletes table `name` of `family`.
    fn table(&mut self, kind: u16, family: u8, name: &str, what: &'static str) {
        let flags = if kind == NFT_MSG_NEWTABLE {
            NLM_F_REQUEST | NLM_F_CREATE
        } else {
            NLM_F_REQUEST
        };
        let attrs = Attrs::default().str(NFTA_TABLE_NAME, name);
        self.message(kind, family, flags, &attrs.0, Some(what));
    }

    fn end(mut self) -> Batch {
        self.message(NFNL_MSG_BATCH_END, libc::AF_UNSPEC as u8, NLM_F_REQUEST, &[], None);
        self
    }

    /// The encoded messages.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Netlink attributes, appended in order.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(mut self, kind: u16, value: &[u8]) -> Attrs {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn str(self, kind: u16, value: &str) -> Attrs {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.raw(kind, &bytes)
    }

    /// nf_tables numbers are big-endian.
    fn be32(self, kind: u16, value: u32) -> Attrs {
        self.raw(kind, &value.to_be_bytes())
    }

    fn nested(self, kind: u16, inner: Attrs) -> Attrs {
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }

    /// NFTA_DATA_VALUE inside `kind`.
    fn data(self, kind: u16, value: &[u8]) -> Attrs {
        self.nested(kind, Attrs::default().raw(NFTA_DATA_VALUE, value))
    }
}

/// One rule expression: its name and attributes.
fn expression(name: &str, data: Option<Attrs>) -> Attrs {
    let expr = Attrs::default().str(NFTA_EXPR_NAME, name);
    let expr = match data {
        Some(d) => expr.nested(NFTA_EXPR_DATA, d),
        None => expr,
    };
    Attrs::default().nested(NFTA_LIST_ELEM, expr)
}

/// `payload load LEN bytes at OFFSET of BASE => reg 1`.
fn load(base: u32, offset: u32, len: u32) -> Attrs {
    expression(
        "payload",
        Some(
            Attrs::default()
                .be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                .be32(NFTA_PAYLOAD_BASE, base)
                .be32(NFTA_PAYLOAD_OFFSET, offset)
                .be32(NFTA_PAYLOAD_LEN, len),
        ),
    )
}

/// `cmp OP reg 1 VALUE`.
fn compare(op: u32, value: &[u8]) -> Attrs {
    expression(
        "cmp",
        Some(
            Attrs::default()
                .be32(NFTA_CMP_SREG, NFT_REG_1)
                .be32(NFTA_CMP_OP, op)
                .data(NFTA_CMP_DATA, value),
        ),
    )
}

/// `cmp eq reg 1 VALUE`.
fn equals(value: &[u8]) -> Attrs {
    compare(NFT_CMP_EQ, value)
}

/// `meta load KEY => reg 1`.
fn meta_load(key: u32) -> Attrs {
    expression(
        "meta",
        Some(
            Attrs::default()
                .be32(NFTA_META_KEY, key)
                .be32(NFTA_META_DREG, NFT_REG_1),
        ),
    )
}

/// `bitwise reg 1 = (reg 1 & MASK) ^ 0`.
fn mask(mask: &[u8]) -> Attrs {
    expression(
        "bitwise",
        Some(
            Attrs::default()
                .be32(NFTA_BITWISE_SREG, NFT_REG_1)
                .be32(NFTA_BITWISE_DREG, NFT_REG_1)
                .be32(NFTA_BITWISE_LEN, mask.len() as u32)
                .data(NFTA_BITWISE_MASK, mask)
                .data(NFTA_BITWISE_XOR, &vec![0; mask.len()]),
        ),
    )
}

fn masquerade_expressions(rule: &Masquerade) -> Attrs {
    let mut oif = [0u8; IFNAMSIZ];
    let name = rule.exempt_oif.as_bytes();
    oif[..name.len().min(IFNAMSIZ - 1)].copy_from_slice(&name[..name.len().min(IFNAMSIZ - 1)]);
    let mask = if rule.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(rule.prefix))
    };
    let network = u32::from(rule.source) & mask;
    joined([
        // oifname != EXEMPT
        meta_load(NFT_META_OIFNAME),
        compare(NFT_CMP_NEQ, &oif),
        // ip saddr & MASK == NETWORK
        load(NFT_PAYLOAD_NETWORK_HEADER, IPV4_SADDR_OFFSET, 4),
        self::mask(&mask.to_be_bytes()),
        equals(&network.to_be_bytes()),
        expression("masq", None),
    ])
}

fn table_attrs() -> Attrs {
    Attrs::default().str(NFTA_TABLE_NAME, TABLE)
}

/// One table holding one base chain: the shape of both tables the agent
/// owns.
struct OneChainTable {
    family: u8,
    table: &'static str,
    chain: &'static str,
    chain_type: &'static str,
    hook: u32,
    priority: i32,
    /// What the chain is, for error messages.
    what: &'static str,
}

/// Replaces `spec`'s table with one holding `rules` (each its
/// expressions and what it is, for error messages) in order: created if
/// missing, then deleted and created again in the same batch, so the
/// result never depends on what an earlier agent left.
fn one_chain_table_batch(spec: &OneChainTable, rules: Vec<(Attrs, &'static str)>) -> Batch {
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE, spec.family, spec.table, "the table");
    b.table(NFT_MSG_DELTABLE, spec.family, spec.table, "the old table");
    b.table(NFT_MSG_NEWTABLE, spec.family, spec.table, "the table");
    let hook = Attrs::default()
        .be32(NFTA_HOOK_HOOKNUM, spec.hook)
        .be32(NFTA_HOOK_PRIORITY, spec.priority as u32);
    let chain = Attrs::default()
        .str(NFTA_CHAIN_TABLE, spec.table)
        .str(NFTA_CHAIN_NAME, spec.chain)
        .nested(NFTA_CHAIN_HOOK, hook)
        .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, spec.chain_type);
    b.message(
        NFT_MSG_NEWCHAIN,
        spec.family,
        NLM_F_REQUEST | NLM_F_CREATE,
        &chain.0,
        Some(spec.what),
    );
    for (expressions, what) in rules {
        let rule = Attrs::default()
            .str(NFTA_RULE_TABLE, spec.table)
            .str(NFTA_RULE_CHAIN, spec.chain)
            .raw(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, &expressions.0);
        b.message(
            NFT_MSG_NEWRULE,
            spec.family,
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND,
            &rule.0,
            Some(what),
        );
    }
    b.end()
}

/// Deletes table `name` of `family` if it exists (created first in the
/// same batch, so a missing table is not an error).
fn remove_table_batch(family: u8, name: &str) -> Batch {
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE, family, name, "the table");
    b.table(NFT_MSG_DELTABLE, family, name, "the table");
    b.end()
}

/// Replaces the agent's table with one holding the masquerade `rule`.
pub(crate) fn masquerade_batch(rule: &Masquerade) -> Batch {
    let spec = OneChainTable {
        family: NFPROTO_IPV4,
        table: TABLE,
        chain: NAT_CHAIN,
        chain_type: "nat",
        hook: NF_INET_POST_ROUTING,
        priority: PRIORITY_SRCNAT,
        what: "the nat chain",
    };
    one_chain_table_batch(&spec, vec![(masquerade_expressions(rule), "the masquerade rule")])
}

/// The tunnel guard, on IPv6 input: `ip6 daddr PREFIX iifname != DEVICE
/// drop` and `udp dport VXLAN_PORT iifname != DEVICE drop`. Packets for
/// the tunnel addresses, and VXLAN over IPv6 to any of the node's
/// addresses (the encrypted networks' VXLAN socket listens on them all:
/// link-local, global), are only taken from the tunnel device, so nobody
/// on the underlay can inject plain VXLAN into an encrypted network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TunnelGuard {
    /// The cluster's tunnel prefix.
    pub(crate) prefix: std::net::Ipv6Addr,
    /// Its length.
    pub(crate) prefix_len: u8,
    /// The tunnel device.
    pub(crate) device: String,
    /// The VXLAN port the encrypted networks' devices listen on.
    pub(crate) vxlan_port: u16,
}

/// `iifname != DEVICE drop`, the end of both guard rules.
fn not_from_device_drop(device: &str) -> [Attrs; 3] {
    let mut iif = [0u8; IFNAMSIZ];
    let name = device.as_bytes();
    let n = name.len().min(IFNAMSIZ - 1);
    iif[..n].copy_from_slice(&name[..n]);
    [
        meta_load(NFT_META_IIFNAME),
        compare(NFT_CMP_NEQ, &iif),
        expression(
            "immediate",
            Some(Attrs::default().be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT).nested(
                NFTA_IMMEDIATE_DATA,
                Attrs::default().nested(NFTA_DATA_VERDICT, Attrs::default().be32(NFTA_VERDICT_CODE, NF_DROP)),
            )),
        ),
    ]
}

/// One rule's expressions, in order.
fn joined(expressions: impl IntoIterator<Item = Attrs>) -> Attrs {
    Attrs(expressions.into_iter().flat_map(|e| e.0).collect())
}

fn guard_prefix_expressions(guard: &TunnelGuard) -> Attrs {
    let bits = u128::from(guard.prefix_len.min(128));
    let mask: u128 = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    let network = u128::from(guard.prefix) & mask;
    // ip6 daddr & MASK == PREFIX
    let matches = [
        load(NFT_PAYLOAD_NETWORK_HEADER, IPV6_DADDR_OFFSET, 16),
        self::mask(&mask.to_be_bytes()),
        equals(&network.to_be_bytes()),
    ];
    joined(matches.into_iter().chain(not_from_device_drop(&guard.device)))
}

fn guard_port_expressions(guard: &TunnelGuard) -> Attrs {
    // meta l4proto udp, udp dport == VXLAN_PORT
    let matches = [
        meta_load(NFT_META_L4PROTO),
        equals(&[IPPROTO_UDP]),
        load(NFT_PAYLOAD_TRANSPORT_HEADER, TRANSPORT_DPORT_OFFSET, 2),
        equals(&guard.vxlan_port.to_be_bytes()),
    ];
    joined(matches.into_iter().chain(not_from_device_drop(&guard.device)))
}

/// Replaces the tunnel guard table with one holding `guard`'s rule.
pub(crate) fn tunnel_guard_batch(guard: &TunnelGuard) -> Batch {
    let spec = OneChainTable {
        family: NFPROTO_IPV6,
        table: TUNNEL_TABLE,
        chain: TUNNEL_CHAIN,
        chain_type: "filter",
        hook: NF_INET_LOCAL_IN,
        priority: 0,
        what: "the tunnel input chain",
    };
    one_chain_table_batch(
        &spec,
        vec![
            (guard_prefix_expressions(guard), "the tunnel guard's address rule"),
            (guard_port_expressions(guard), "the tunnel guard's VXLAN port rule"),
        ],
    )
}

/// Deletes the tunnel guard table if it exists.
pub(crate) fn remove_tunnel_guard_batch() -> Batch {
    remove_table_batch(NFPROTO_IPV6, TUNNEL_TABLE)
}

/// Deletes the agent's table if it exists.
pub(crate) fn remove_batch() -> Batch {
    remove_table_batch(NFPROTO_IPV4, TABLE)
}

/// Sends `batch` in the calling thread's network namespace and waits for
/// the kernel's answer to each message.
pub fn send_batch(batch: &Batch) -> Result<(), NftError> {
    let socket = Socket::open()?;
    socket.send(batch.bytes())?;
    let mut pending: Vec<(u32, &'static str)> = batch.acked.clone();
    let mut refused = None;
    let mut buf = vec![0u8; 64 * 1024];
    while !pending.is_empty() {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            // After a refusal the kernel drops the rest unanswered.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && refused.is_some() => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(NftError::NoAnswer),
            Err(e) => return Err(e.into()),
        };
        for (seq, errno) in acks(&buf[..n]) {
            let Some(at) = pending.iter().position(|(s, _)| *s == seq) else {
                continue;
            };
            let (_, what) = pending.remove(at);
            if errno != 0 && refused.is_none() {
                refused = Some(NftError::Refused {
                    what,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
    }
    refused.map_or(Ok(()), Err)
}

/// Whether the agent's table exists in the calling thread's namespace.
pub fn table_exists() -> Result<bool, NftError> {
    let mut query = Batch::empty();
    query.message(
        NFT_MSG_GETTABLE,
        NFPROTO_IPV4,
        NLM_F_REQUEST,
        &table_attrs().0,
        Some("the table query"),
    );
    let socket = Socket::open()?;
    socket.send(query.bytes())?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match socket.recv(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(NftError::NoAnswer),
            other => other?,
        };
        // The table (if any) comes first, then the ack.
        match acks(&buf[..n]).first() {
            Some((_, 0)) => return Ok(true),
            Some((_, errno)) if *errno == libc::ENOENT => return Ok(false),
            Some((_, errno)) => {
                return Err(NftError::Refused {
                    what: "the table query",
                    source: io::Error::from_raw_os_error(*errno),
                })
            }
            None => {}
        }
    }
}

/// The (sequence, errno) of every NLMSG_ERROR (ack) in `bytes`, a
/// datagram of the kernel's answers; it stops at a message whose length
/// does not fit.
pub fn acks(bytes: &[u8]) -> Vec<(u32, i32)> {
    nlmsg::messages(bytes)
        .map_while(Result::ok)
        .filter(|m| m.kind == NLMSG_ERROR)
        .filter_map(|m| Some((m.seq, nlmsg::error_code(m.body)?)))
        .collect()
}

/// A NETLINK_NETFILTER socket, closed on drop.
struct Socket(libc::c_int);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the descriptor is owned by the result.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = Socket(fd);
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval that outlives the call.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl is the kernel (pid 0, no groups).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and address are valid for the call.
        let sent = unsafe {
            libc::sendto(
                self.0,
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        match sent {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize != bytes.len() => Err(io::Error::other("short netlink send")),
            _ => Ok(()),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EAGAIN) {
                io::ErrorKind::WouldBlock.into()
            } else {
                e
            });
        }
        Ok(n as usize)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned and closed once.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, flags, seq) of every message in a batch.
    fn headers(bytes: &[u8]) -> Vec<(u16, u16, u32)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0, "messages are aligned");
            out.push((
                u16::from_ne_bytes(rest[4..6].try_into().unwrap()),
                u16::from_ne_bytes(rest[6..8].try_into().unwrap()),
                u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
            ));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn a_masquerade_batch_replaces_the_table_atomically() {
        let batch = masquerade_batch(&Masquerade {
            source: Ipv4Addr::new(172, 18, 0, 0),
            prefix: 16,
            exempt_oif: "mesh_gwbridge".into(),
        });
        let kinds: Vec<u16> = headers(batch.bytes()).iter().map(|h| h.0).collect();
        let nft = |m: u16| NFNL_SUBSYS_NFTABLES << 8 | m;
        assert_eq!(
            kinds,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_DELTABLE),
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        let seqs: Vec<u32> = headers(batch.bytes()).iter().map(|h| h.2).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        assert_eq!(batch.acked.len(), 5, "every message but the batch markers is acked");
        let bytes = batch.bytes();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"mesh_gwbridge\0\0\0"), "the bridge name, padded to IFNAMSIZ");
        assert!(has(&[255, 255, 0, 0]), "the /16 mask");
        assert!(has(&[172, 18, 0, 0]), "the pool");
        assert!(has(b"masq\0"));
        assert!(has(b"nat\0"));
    }

    #[test]
    fn a_tunnel_guard_matches_the_prefix_and_the_device() {
        let batch = tunnel_guard_batch(&TunnelGuard {
            prefix: "fd12:3456:789a::".parse().unwrap(),
            prefix_len: 48,
            device: "mwg0".into(),
            vxlan_port: 4789,
        });
        let kinds: Vec<u16> = headers(batch.bytes()).iter().map(|h| h.0 & 0xff).collect();
        assert_eq!(kinds.len(), 8, "two rules in the chain");
        assert_eq!(kinds.iter().filter(|k| **k == NFT_MSG_NEWRULE).count(), 2);
        assert!(
            batch.bytes().windows(2).any(|w| w == 4789u16.to_be_bytes()),
            "the VXLAN port"
        );
        let bytes = batch.bytes();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"mwg0\0\0\0\0\0\0\0\0\0\0\0\0"), "the device, padded to IFNAMSIZ");
        assert!(has(&[0xfd, 0x12, 0x34, 0x56, 0x78, 0x9a, 0, 0]), "the prefix");
        assert!(has(&[0xff; 6]), "the /48 mask");
        assert!(has(b"immediate\0"));
        assert!(has(b"mesh-tunnel\0"));
    }

    #[test]
    fn acks_are_read_with_their_errno() {
        let mut bytes = Vec::new();
        for (seq, error) in [(2u32, 0i32), (3, -libc::ENOENT)] {
            bytes.extend_from_slice(&36u32.to_ne_bytes());
            bytes.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            bytes.extend_from_slice(&0u16.to_ne_bytes());
            bytes.extend_from_slice(&seq.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            bytes.extend_from_slice(&error.to_ne_bytes());
            bytes.extend_from_slice(&[0; 16]);
        }
        assert_eq!(acks(&bytes), vec![(2, 0), (3, libc::ENOENT)]);
        assert_eq!(acks(&bytes[..20]), vec![], "a truncated message is ignored");
    }

    /// Found by the netlink fuzz target: negating i32::MIN overflowed.
    #[test]
    fn an_ack_with_a_nonsense_error_code_is_a_refusal_not_a_panic() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&20u32.to_ne_bytes());
        bytes.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&5u32.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(acks(&bytes), vec![(5, i32::MIN)]);
    }
}
