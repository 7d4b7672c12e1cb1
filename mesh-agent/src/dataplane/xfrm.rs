//! IPsec in the kernel (XFRM over NETLINK_XFRM): the policies and
//! security associations that wrap IPsec networks' VXLAN in ESP.
//!
//! Two policies per node, whatever the number of peers: every UDP datagram
//! from the node's data-path address to the IPsec VXLAN port must leave
//! through ESP (with no association for its destination, the kernel drops
//! it: nothing goes out in clear), and every one arriving there must have
//! come through ESP (clear ones are dropped). The associations, one per
//! direction and peer, are transport mode, `rfc4106(gcm(aes))` with a
//! 128-bit key and a 128-bit ICV, with extended sequence numbers so a busy
//! link never runs out of them. All carry [`REQID`], which is how the
//! agent knows its own.
//!
//! [`plan`] is the pure diff; [`Xfrm`] reads and writes the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    net::Ipv4Addr,
};

use netlink_sys::{protocols::NETLINK_XFRM, Socket, SocketAddr};

use super::nlmsg::{self, NLMSG_DONE, NLMSG_ERROR};

/// The request ID on every association and policy template of the agent.
pub(crate) const REQID: u32 = 0x6d65_7368;

/// The priority of the agent's policies (lower wins; 0 is `ip xfrm`'s
/// default, so an operator's own policies come first).
pub(crate) const POLICY_PRIORITY: u32 = 0x6d65;

const XFRM_MSG_NEWSA: u16 = 0x10;
const XFRM_MSG_DELSA: u16 = 0x11;
const XFRM_MSG_GETSA: u16 = 0x12;
const XFRM_MSG_DELPOLICY: u16 = 0x14;
const XFRM_MSG_GETPOLICY: u16 = 0x15;
const XFRM_MSG_UPDPOLICY: u16 = 0x19;
const XFRM_MSG_NEWPOLICY: u16 = 0x13;
const XFRMA_TMPL: u16 = 5;
const XFRMA_ALG_AEAD: u16 = 18;
const XFRMA_REPLAY_ESN_VAL: u16 = 23;
const XFRM_STATE_ESN: u8 = 128;
const XFRM_MODE_TRANSPORT: u8 = 0;
const XFRM_POLICY_IN: u8 = 0;
const XFRM_POLICY_OUT: u8 = 1;
const XFRM_INF: u64 = u64::MAX;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u16 = libc::AF_INET as u16;

/// The AEAD and its sizes: a 128-bit AES key plus a 32-bit salt, and a
/// 128-bit ICV.
const AEAD_NAME: &str = "rfc4106(gcm(aes))";
const AEAD_KEY_BITS: u32 = 160;
const AEAD_ICV_BITS: u32 = 128;

/// The anti-replay window (packets), kept as a bitmap for ESN.
const REPLAY_WINDOW: u32 = 128;

const SELECTOR_LEN: usize = 56;
const USERSA_INFO_LEN: usize = 224;
const USERSA_ID_LEN: usize = 24;
const USERPOLICY_INFO_LEN: usize = 168;
const USERPOLICY_ID_LEN: usize = 64;
const USER_TMPL_LEN: usize = 64;

/// Which way a policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// Datagrams arriving at the node.
    In,
    /// Datagrams the node sends.
    Out,
}

/// One of the agent's two policies: UDP to `port`, from (out) or to (in)
/// the node's `local` address, through ESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Policy {
    /// Its direction.
    pub direction: Direction,
    /// The node's data-path address.
    pub local: Ipv4Addr,
    /// The IPsec networks' VXLAN port.
    pub port: u16,
}

/// What identifies an association.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SaId {
    /// The sender.
    pub src: Ipv4Addr,
    /// The receiver.
    pub dst: Ipv4Addr,
    /// Its SPI.
    pub spi: u32,
}

/// An association as the agent wants it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sa {
    /// The UDP port its selector allows (the IPsec VXLAN port).
    pub port: u16,
    /// The AES-GCM key and salt.
    pub key: [u8; 20],
}

impl fmt::Debug for Sa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sa").field("port", &self.port).finish_non_exhaustive()
    }
}

/// The agent's IPsec state, as wanted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Its policies.
    pub policies: BTreeSet<Policy>,
    /// Its associations.
    pub sas: BTreeMap<SaId, Sa>,
}

/// The agent's IPsec state, as found in the kernel (keys are not read
/// back: an SPI is derived with its key, so the same SPI means the same
/// key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Its policies.
    pub policies: BTreeSet<Policy>,
    /// Its associations.
    pub sas: BTreeSet<SaId>,
}

/// One change to the kernel's IPsec state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add (or replace) a policy.
    SetPolicy(Policy),
    /// Add an association.
    AddSa(SaId, Sa),
    /// Remove an association.
    DeleteSa(SaId),
    /// Remove a policy.
    DeletePolicy(Policy),
}

/// The changes from `found` to `wanted`: policies first (so nothing is
/// ever sent or taken in clear), then new associations before stale ones
/// go (a new outbound association is used as soon as it is added, being
/// the newest), then policies no longer wanted.
pub fn plan(wanted: &Wanted, found: &Found) -> Vec<Change> {
    let mut changes = Vec::new();
    for p in wanted.policies.difference(&found.policies) {
        changes.push(Change::SetPolicy(*p));
    }
    for (id, sa) in &wanted.sas {
        if !found.sas.contains(id) {
            changes.push(Change::AddSa(*id, sa.clone()));
        }
    }
    for id in found.sas.iter().filter(|id| !wanted.sas.contains_key(id)) {
        changes.push(Change::DeleteSa(*id));
    }
    for p in found.policies.difference(&wanted.policies) {
        changes.push(Change::DeletePolicy(*p));
    }
    changes
}

/// Why an XFRM request failed.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    /// The socket could not be opened or used (no `xfrm_user` module).
    #[error("XFRM netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a request.
    #[error("the kernel refused {what}: {source}")]
    Refused {
        /// What was asked.
        what: String,
        /// The errno it answered.
        source: io::Error,
    },
    /// A reply made no sense.
    #[error("undecodable XFRM reply: {0}")]
    Decode(String),
    /// The kernel cannot do the agent's IPsec: a module is missing.
    #[error("{source} ({hint})")]
    Unsupported {
        /// What is probably missing.
        hint: &'static str,
        /// The failure that showed it.
        source: Box<XfrmError>,
    },
}

/// A NETLINK_XFRM socket in the calling thread's network namespace.
pub struct Xfrm {
    socket: Socket,
    sequence: u32,
}

impl Xfrm {
    /// Opens the socket.
    pub fn open() -> Result<Xfrm, XfrmError> {
        let mut socket = Socket::new(NETLINK_XFRM).map_err(XfrmError::Socket)?;
        socket.bind_auto().map_err(XfrmError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(XfrmError::Socket)?;
        Ok(Xfrm { socket, sequence: 0 })
    }

    /// The agent's policies and associations in the kernel.
    pub fn observe(&mut self) -> Result<Found, XfrmError> {
        let mut found = Found::default();
        for (kind, body) in self.dump(XFRM_MSG_GETSA, &[0; USERSA_INFO_LEN])? {
            if let Some(id) = parse_sa(kind, &body) {
                found.sas.insert(id);
            }
        }
        for (kind, body) in self.dump(XFRM_MSG_GETPOLICY, &[0; USERPOLICY_INFO_LEN])? {
            if let Some(p) = parse_policy(kind, &body) {
                found.policies.insert(p);
            }
        }
        Ok(found)
    }

    /// Carries out `changes` in order. An association that already exists
    /// (the same SPI, so the same key) counts as added; a policy or
    /// association already gone counts as removed.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), XfrmError> {
        for change in changes {
            log::debug!("ipsec: {change:?}");
            let (what, tolerated) = match change {
                Change::SetPolicy(_) => ("the IPsec policy", 0),
                Change::AddSa(..) => ("the ESP association", libc::EEXIST),
                Change::DeleteSa(_) => ("removing the ESP association", libc::ESRCH),
                Change::DeletePolicy(_) => ("removing the IPsec policy", libc::ENOENT),
            };
            let (kind, mut body) = message(change);
            let result = self.request(kind, &body);
            // It may hold a key.
            zeroize::Zeroize::zeroize(&mut body);
            match result {
                Err(XfrmError::Refused { source, .. }) if source.raw_os_error() == Some(tolerated) => {}
                Err(XfrmError::Refused { source, .. }) => {
                    return Err(XfrmError::Refused {
                        what: format!("{what} ({change:?})"),
                        source,
                    })
                }
                other => other?,
            }
        }
        Ok(())
    }

    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<u32, XfrmError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut message = Vec::with_capacity(16 + body.len());
        message.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&self.sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(body);
        self.socket.send(&message, 0).map_err(XfrmError::Socket)?;
        Ok(self.sequence)
    }

    /// Sends one request and waits for its ACK.
    fn request(&mut self, kind: u16, body: &[u8]) -> Result<(), XfrmError> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let sequence = self.send(kind, flags, body)?;
        self.replies(sequence, |_, _| {}).map(|_| ())
    }

    /// Sends a dump request and collects (type, body) of every message.
    fn dump(&mut self, kind: u16, body: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, XfrmError> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let sequence = self.send(kind, flags, body)?;
        let mut out = Vec::new();
        self.replies(sequence, |kind, body| out.push((kind, body.to_vec())))?;
        Ok(out)
    }

    /// Reads replies to `sequence` until the ACK, an error or the end of a
    /// dump, handing every other message to `each`.
    fn replies(&mut self, sequence: u32, mut each: impl FnMut(u16, &[u8])) -> Result<(), XfrmError> {
        let mut buffer: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            buffer.clear();
            let n = self.socket.recv(&mut buffer, 0).map_err(XfrmError::Socket)?;
            let replies = decode_replies(&buffer[..n], sequence)?;
            for (kind, body) in &replies.messages {
                each(*kind, body);
            }
            if replies.finished {
                return Ok(());
            }
        }
    }
}

/// What one datagram of the kernel's replies to a request says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replies<'a> {
    /// Type and body of every message of the request other than the
    /// ACK and DONE, in order.
    pub messages: Vec<(u16, &'a [u8])>,
    /// Whether it ends the exchange (the ACK, or the DONE of a dump).
    pub(crate) finished: bool,
}

/// Decodes one datagram of replies to request `sequence`: the kernel's
/// refusal is an error, as is a message whose length does not fit;
/// messages of other requests are skipped.
pub fn decode_replies(datagram: &[u8], sequence: u32) -> Result<Replies<'_>, XfrmError> {
    let mut replies = Replies::default();
    for message in nlmsg::messages(datagram) {
        let message = message.map_err(|length| XfrmError::Decode(format!("a message of {length} bytes")))?;
        if message.seq != sequence {
            continue;
        }
        match message.kind {
            NLMSG_DONE => {
                replies.finished = true;
                return Ok(replies);
            }
            NLMSG_ERROR => {
                let code =
                    nlmsg::error_code(message.body).ok_or_else(|| XfrmError::Decode("a short error message".into()))?;
                if code == 0 {
                    replies.finished = true;
                    return Ok(replies);
                }
                return Err(XfrmError::Refused {
                    what: String::new(),
                    source: io::Error::from_raw_os_error(code),
                });
            }
            _ => replies.messages.push((message.kind, message.body)),
        }
    }
    Ok(replies)
}

/// Whether this namespace's kernel can do the agent's IPsec: XFRM netlink,
/// ESP and AES-GCM. Tries an association to a documentation address (no
/// packet is sent) and removes it; the attempt also loads the modules.
pub fn kernel_has_esp() -> Result<(), XfrmError> {
    let unsupported = |hint| {
        move |e| XfrmError::Unsupported {
            hint,
            source: Box::new(e),
        }
    };
    let mut xfrm = Xfrm::open().map_err(unsupported("no xfrm_user module?"))?;
    let id = SaId {
        src: Ipv4Addr::new(198, 51, 100, 1),
        dst: Ipv4Addr::new(198, 51, 100, 2),
        spi: 0x6d65_0001,
    };
    let sa = Sa { port: 9, key: [0; 20] };
    let added = xfrm.apply(&[Change::AddSa(id, sa)]);
    let removed = xfrm.apply(&[Change::DeleteSa(id)]);
    added.map_err(unsupported("no esp4 module or no AES-GCM?"))?;
    removed
}

fn ipv4_at(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

/// An IPv4 `xfrm_selector`: UDP to `dport`, from `src`/`src_len` to
/// `dst`/`dst_len`.
fn selector(dst: Ipv4Addr, dst_len: u8, src: Ipv4Addr, src_len: u8, dport: u16) -> [u8; SELECTOR_LEN] {
    let mut s = [0u8; SELECTOR_LEN];
    s[0..4].copy_from_slice(&dst.octets());
    s[16..20].copy_from_slice(&src.octets());
    s[32..34].copy_from_slice(&dport.to_be_bytes());
    s[34..36].copy_from_slice(&0xffffu16.to_be_bytes());
    s[40..42].copy_from_slice(&AF_INET.to_ne_bytes());
    s[42] = dst_len;
    s[43] = src_len;
    s[44] = IPPROTO_UDP;
    s
}

fn policy_selector(p: &Policy) -> [u8; SELECTOR_LEN] {
    let any = Ipv4Addr::UNSPECIFIED;
    match p.direction {
        Direction::Out => selector(any, 0, p.local, 32, p.port),
        Direction::In => selector(p.local, 32, any, 0, p.port),
    }
}

fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::In => XFRM_POLICY_IN,
        Direction::Out => XFRM_POLICY_OUT,
    }
}

/// A `xfrm_lifetime_cfg` with no limits.
fn unlimited() -> [u8; 64] {
    let mut l = [0u8; 64];
    for i in 0..4 {
        l[i * 8..i * 8 + 8].copy_from_slice(&XFRM_INF.to_ne_bytes());
    }
    l
}

fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// `xfrm_userpolicy_info` and its one ESP template.
fn policy_message(p: &Policy) -> Vec<u8> {
    let mut m = vec![0u8; USERPOLICY_INFO_LEN];
    m[..SELECTOR_LEN].copy_from_slice(&policy_selector(p));
    m[56..120].copy_from_slice(&unlimited());
    m[152..156].copy_from_slice(&POLICY_PRIORITY.to_ne_bytes());
    m[160] = direction_code(p.direction);
    let mut tmpl = [0u8; USER_TMPL_LEN];
    tmpl[20] = IPPROTO_ESP;
    tmpl[24..26].copy_from_slice(&AF_INET.to_ne_bytes());
    tmpl[44..48].copy_from_slice(&REQID.to_ne_bytes());
    tmpl[48] = XFRM_MODE_TRANSPORT;
    for offset in [52, 56, 60] {
        tmpl[offset..offset + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
    }
    attribute(&mut m, XFRMA_TMPL, &tmpl);
    m
}

/// `xfrm_userpolicy_id` of `p`.
fn policy_id_message(p: &Policy) -> Vec<u8> {
    let mut m = vec![0u8; USERPOLICY_ID_LEN];
    m[..SELECTOR_LEN].copy_from_slice(&policy_selector(p));
    m[60] = direction_code(p.direction);
    m
}

/// One of the agent's associations from a dump message (`kind`, body:
/// `xfrm_usersa_info`); `None` for anything else.
pub fn parse_sa(kind: u16, body: &[u8]) -> Option<SaId> {
    if kind != XFRM_MSG_NEWSA || body.len() < USERSA_INFO_LEN {
        return None;
    }
    let reqid = u32::from_ne_bytes(body[208..212].try_into().ok()?);
    let family = u16::from_ne_bytes([body[212], body[213]]);
    if reqid != REQID || family != AF_INET || body[76] != IPPROTO_ESP {
        return None;
    }
    Some(SaId {
        dst: ipv4_at(&body[56..]),
        spi: u32::from_be_bytes(body[72..76].try_into().ok()?),
        src: ipv4_at(&body[80..]),
    })
}

/// One of the agent's policies from a dump message (`kind`, body:
/// `xfrm_userpolicy_info`); `None` for anything else.
pub fn parse_policy(kind: u16, body: &[u8]) -> Option<Policy> {
    if kind != XFRM_MSG_NEWPOLICY || body.len() < USERPOLICY_INFO_LEN {
        return None;
    }
    let priority = u32::from_ne_bytes(body[152..156].try_into().ok()?);
    let family = u16::from_ne_bytes([body[40], body[41]]);
    if priority != POLICY_PRIORITY || family != AF_INET || body[44] != IPPROTO_UDP {
        return None;
    }
    let port = u16::from_be_bytes([body[32], body[33]]);
    let (direction, local) = match body[160] {
        XFRM_POLICY_OUT if body[43] == 32 => (Direction::Out, ipv4_at(&body[16..])),
        XFRM_POLICY_IN if body[42] == 32 => (Direction::In, ipv4_at(body)),
        _ => return None,
    };
    Some(Policy { direction, local, port })
}

/// The request a change is: its message type and body (`ip xfrm policy
/// update|delete ...`, `ip xfrm state add|delete ...`).
pub fn message(change: &Change) -> (u16, Vec<u8>) {
    match change {
        Change::SetPolicy(p) => (XFRM_MSG_UPDPOLICY, policy_message(p)),
        Change::AddSa(id, sa) => (XFRM_MSG_NEWSA, sa_message(id, sa)),
        Change::DeleteSa(id) => (XFRM_MSG_DELSA, sa_id_message(id)),
        Change::DeletePolicy(p) => (XFRM_MSG_DELPOLICY, policy_id_message(p)),
    }
}

/// `xfrm_usersa_info` of an ESP transport association, with its AEAD and
/// ESN replay state.
fn sa_message(id: &SaId, sa: &Sa) -> Vec<u8> {
    let mut m = vec![0u8; USERSA_INFO_LEN];
    m[..SELECTOR_LEN].copy_from_slice(&selector(id.dst, 32, id.src, 32, sa.port));
    m[56..60].copy_from_slice(&id.dst.octets());
    m[72..76].copy_from_slice(&id.spi.to_be_bytes());
    m[76] = IPPROTO_ESP;
    m[80..84].copy_from_slice(&id.src.octets());
    m[96..160].copy_from_slice(&unlimited());
    m[208..212].copy_from_slice(&REQID.to_ne_bytes());
    m[212..214].copy_from_slice(&AF_INET.to_ne_bytes());
    m[214] = XFRM_MODE_TRANSPORT;
    // replay_window stays 0: with ESN the window is in the ESN attribute.
    m[216] = XFRM_STATE_ESN;
    let mut aead = vec![0u8; 72];
    aead[..AEAD_NAME.len()].copy_from_slice(AEAD_NAME.as_bytes());
    aead[64..68].copy_from_slice(&AEAD_KEY_BITS.to_ne_bytes());
    aead[68..72].copy_from_slice(&AEAD_ICV_BITS.to_ne_bytes());
    aead.extend_from_slice(&sa.key);
    attribute(&mut m, XFRMA_ALG_AEAD, &aead);
    // xfrm_replay_state_esn: bmp_len, oseq, seq, oseq_hi, seq_hi,
    // replay_window, then the bitmap.
    let words = REPLAY_WINDOW / 32;
    let mut esn = vec![0u8; 24 + 4 * words as usize];
    esn[..4].copy_from_slice(&words.to_ne_bytes());
    esn[20..24].copy_from_slice(&REPLAY_WINDOW.to_ne_bytes());
    attribute(&mut m, XFRMA_REPLAY_ESN_VAL, &esn);
    zeroize::Zeroize::zeroize(&mut aead);
    m
}

/// `xfrm_usersa_id` of `id`.
fn sa_id_message(id: &SaId) -> Vec<u8> {
    let mut m = vec![0u8; USERSA_ID_LEN];
    m[..4].copy_from_slice(&id.dst.octets());
    m[16..20].copy_from_slice(&id.spi.to_be_bytes());
    m[20..22].copy_from_slice(&AF_INET.to_ne_bytes());
    m[22] = IPPROTO_ESP;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(spi: u32) -> SaId {
        SaId {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            spi,
        }
    }

    fn sa() -> Sa {
        Sa {
            port: 4790,
            key: [1; 20],
        }
    }

    fn policy(direction: Direction) -> Policy {
        Policy {
            direction,
            local: Ipv4Addr::new(10, 0, 0, 1),
            port: 4790,
        }
    }

    #[test]
    fn policies_come_first_new_associations_before_old_ones_go() {
        let wanted = Wanted {
            policies: [policy(Direction::In), policy(Direction::Out)].into(),
            sas: [(id(0x200), sa())].into(),
        };
        let found = Found {
            policies: [policy(Direction::In)].into(),
            sas: [id(0x100)].into(),
        };
        assert_eq!(
            plan(&wanted, &found),
            vec![
                Change::SetPolicy(policy(Direction::Out)),
                Change::AddSa(id(0x200), sa()),
                Change::DeleteSa(id(0x100)),
            ]
        );
        let same = Found {
            policies: wanted.policies.clone(),
            sas: [id(0x200)].into(),
        };
        assert!(plan(&wanted, &same).is_empty(), "nothing to do when all is in place");
        assert_eq!(
            plan(&Wanted::default(), &same),
            vec![
                Change::DeleteSa(id(0x200)),
                Change::DeletePolicy(policy(Direction::In)),
                Change::DeletePolicy(policy(Direction::Out)),
            ]
        );
    }

    /// Found by the netlink fuzz target: negating i32::MIN overflowed.
    #[test]
    fn an_error_with_a_nonsense_code_is_a_refusal_not_a_panic() {
        let mut datagram = Vec::new();
        datagram.extend_from_slice(&36u32.to_ne_bytes());
        datagram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        datagram.extend_from_slice(&0u16.to_ne_bytes());
        datagram.extend_from_slice(&9u32.to_ne_bytes());
        datagram.extend_from_slice(&0u32.to_ne_bytes());
        datagram.extend_from_slice(&i32::MIN.to_ne_bytes());
        datagram.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_replies(&datagram, 9),
            Err(XfrmError::Refused { source, .. }) if source.raw_os_error() == Some(i32::MIN)
        ));
    }

    #[test]
    fn a_dump_hands_on_its_messages_until_done() {
        let message = |kind: u16, body: &[u8]| {
            let mut m = Vec::new();
            m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&4u32.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(body);
            m
        };
        let policy = policy_message(&policy(Direction::In));
        let datagram = [message(XFRM_MSG_NEWPOLICY, &policy), message(NLMSG_DONE, &[0; 4])].concat();
        let replies = decode_replies(&datagram, 4).unwrap();
        assert!(replies.finished);
        assert_eq!(replies.messages, vec![(XFRM_MSG_NEWPOLICY, &policy[..])]);
        assert!(decode_replies(&datagram[..20], 4).is_err(), "a cut message");
    }

    #[test]
    fn a_policy_reads_back_as_written() {
        for direction in [Direction::In, Direction::Out] {
            let p = policy(direction);
            let message = policy_message(&p);
            assert_eq!(message.len(), USERPOLICY_INFO_LEN + 4 + USER_TMPL_LEN);
            assert_eq!(parse_policy(XFRM_MSG_NEWPOLICY, &message), Some(p));
        }
    }

    #[test]
    fn an_association_carries_its_ids_aead_and_esn() {
        let m = sa_message(&id(0x1234), &sa());
        assert_eq!(&m[56..60], &[10, 0, 0, 2]);
        assert_eq!(&m[72..76], &0x1234u32.to_be_bytes());
        assert_eq!(&m[80..84], &[10, 0, 0, 1]);
        assert_eq!(m[216], XFRM_STATE_ESN);
        assert_eq!(m[215], 0, "ESN keeps the legacy replay window at 0");
        // AEAD attribute: header, 72 bytes of algorithm, 20 of key.
        let aead = &m[USERSA_INFO_LEN..];
        assert_eq!(u16::from_ne_bytes([aead[0], aead[1]]) as usize, 4 + 72 + 20);
        assert_eq!(u16::from_ne_bytes([aead[2], aead[3]]), XFRMA_ALG_AEAD);
        assert!(aead[4..].starts_with(AEAD_NAME.as_bytes()));
        assert_eq!(format!("{:?}", sa()), "Sa { port: 4790, .. }", "keys are never printed");
    }
}
