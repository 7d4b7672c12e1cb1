//! IPVS over its generic netlink family (include/uapi/linux/ip_vs.h), the
//! Swarm-compatible load-balancing backend: virtual services and their
//! real servers as plain data, `plan(wanted, found)` (pure), and the
//! kernel requests, encoded here attribute by attribute (`ipvsadm` is
//! never run).
//!
//! A virtual service is an address, port and protocol, or a firewall mark
//! (what the routing mesh uses: nftables marks the packets of a published
//! port). Real servers are reached in masquerade (NAT) mode. A real server
//! that should go is first given weight 0, so it takes no new connection
//! while its established ones finish (as libnetwork does), and is deleted
//! once IPVS counts no established connection on it, or when the caller
//! says its time is up (connections in TIME_WAIT and the like do not hold
//! it back).

use std::{collections::BTreeMap, net::Ipv4Addr};

use netlink_packet_core::{DecodeError, Emitable, ParseableParametrized};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use super::genl::{Genl, GenlError};

/// The family's name.
pub const FAMILY: &str = "IPVS";
const VERSION: u8 = 1;

const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;

const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const SVC_ATTR_STATS64: u16 = 12;

const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;
const DEST_ATTR_STATS64: u16 = 12;
// IPVS_STATS_ATTR_*, u64 each inside the STATS64 attributes.
const STATS_CONNS: u16 = 1;
const STATS_INPKTS: u16 = 2;
const STATS_OUTPKTS: u16 = 3;
const STATS_INBYTES: u16 = 4;
const STATS_OUTBYTES: u16 = 5;

/// IP_VS_CONN_F_MASQ.
const FWD_MASQ: u32 = 0;
/// IP_VS_SVC_F_PERSISTENT: a client sticks to its real server.
const SVC_F_PERSISTENT: u32 = 0x1;
/// IP_VS_SVC_F_SCHED1..3: the scheduler's own flags.
const SVC_F_SCHED_MASK: u32 = 0x38;
/// IP_VS_SVC_F_SCHED_MH_PORT: `mh` hashes the source port too (so one
/// client's connections spread like anyone's).
pub const SCHED_MH_PORT: u32 = 0x10;
const NLA_F_NESTED: u16 = 1 << 15;

/// A virtual service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceId {
    /// Address, port and protocol (6 TCP, 17 UDP).
    Addr { addr: Ipv4Addr, port: u16, protocol: u8 },
    /// IPv4 packets carrying this firewall mark.
    Mark(u32),
}

/// A real server of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestId {
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// IPVS's counters of a service or real server (`ipvsadm -Ln --stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub(crate) connections: u64,
    /// Packets and bytes toward the real servers, and back.
    pub(crate) packets_in: u64,
    pub(crate) packets_out: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

impl Stats {
    /// Packets both ways.
    pub fn packets(&self) -> u64 {
        self.packets_in + self.packets_out
    }

    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.bytes_in + self.bytes_out
    }
}

/// What a real server is in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dest {
    pub weight: u32,
    /// Connections IPVS tracks on it (established, and others).
    pub active: u32,
    pub inactive: u32,
    /// Read by `observe`; ignored by `plan`.
    pub stats: Stats,
}

/// How a virtual service picks real servers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The scheduler (`rr`, `wrr`, `sh`, `mh`, ...).
    pub scheduler: String,
    /// Its flags (`ipvsadm -b`), e.g. [`SCHED_MH_PORT`].
    pub scheduler_flags: u32,
    /// Seconds a client sticks to its real server after its last
    /// connection (persistence, `ipvsadm -p`); 0: no persistence.
    pub persistence_s: u32,
}

/// A virtual service and its real servers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub schedule: Schedule,
    pub dests: BTreeMap<DestId, Dest>,
    /// Read by `observe`; ignored by `plan`.
    pub stats: Stats,
}

/// The IPVS state of a node (the agent's services only).
pub type IpvsState = BTreeMap<ServiceId, Service>;

/// One kernel request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddService(ServiceId, Schedule),
    SetService(ServiceId, Schedule),
    AddDest(ServiceId, DestId, u32),
    SetWeight(ServiceId, DestId, u32),
    DelDest(ServiceId, DestId),
    DelService(ServiceId),
}

/// The requests that take `found` toward `wanted`. A real server that is
/// not wanted drains first (weight 0) and is deleted when it has no
/// established connection left, or at once once `expired` says so (its
/// drain time is up, or the node leaves). A service that is not wanted is
/// deleted once all its real servers are.
pub fn plan(wanted: &IpvsState, found: &IpvsState, expired: impl Fn(&ServiceId, &DestId) -> bool) -> Vec<Change> {
    let mut out = Vec::new();
    for (id, want) in wanted {
        match found.get(id) {
            None => out.push(Change::AddService(*id, want.schedule.clone())),
            Some(have) if have.schedule != want.schedule => out.push(Change::SetService(*id, want.schedule.clone())),
            Some(_) => {}
        }
        let have = found.get(id).map(|s| &s.dests);
        for (dest, d) in &want.dests {
            match have.and_then(|h| h.get(dest)) {
                None => out.push(Change::AddDest(*id, *dest, d.weight)),
                Some(h) if h.weight != d.weight => out.push(Change::SetWeight(*id, *dest, d.weight)),
                Some(_) => {}
            }
        }
    }
    for (id, have) in found {
        let want = wanted.get(id).map(|s| &s.dests);
        let mut left = 0;
        for (dest, d) in &have.dests {
            if want.is_some_and(|w| w.contains_key(dest)) {
                left += 1;
                continue;
            }
            if (d.weight == 0 && d.active == 0) || expired(id, dest) {
                out.push(Change::DelDest(*id, *dest));
            } else {
                left += 1;
                if d.weight != 0 {
                    out.push(Change::SetWeight(*id, *dest, 0));
                }
            }
        }
        if want.is_none() && left == 0 {
            out.push(Change::DelService(*id));
        }
    }
    out
}

/// A raw message of the IPVS family: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    pub(crate) cmd: u8,
    pub attrs: Vec<u8>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY
    }

    fn version(&self) -> u8 {
        VERSION
    }

    fn command(&self) -> u8 {
        self.cmd
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.attrs);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(IpvsMessage {
            cmd: header.cmd,
            attrs: buf.to_vec(),
        })
    }
}

fn put(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nested(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    put(buf, kind | NLA_F_NESTED, &inner);
}

/// The attributes naming a service.
fn service_id(buf: &mut Vec<u8>, id: &ServiceId) {
    put(buf, SVC_ATTR_AF, &(libc::AF_INET as u16).to_ne_bytes());
    match id {
        ServiceId::Addr { addr, port, protocol } => {
            let mut address = [0u8; 16]; // union nf_inet_addr
            address[..4].copy_from_slice(&addr.octets());
            put(buf, SVC_ATTR_PROTOCOL, &u16::from(*protocol).to_ne_bytes());
            put(buf, SVC_ATTR_ADDR, &address);
            put(buf, SVC_ATTR_PORT, &port.to_be_bytes());
        }
        ServiceId::Mark(mark) => put(buf, SVC_ATTR_FWMARK, &mark.to_ne_bytes()),
    }
}

fn service_message(cmd: u8, id: &ServiceId, schedule: Option<&Schedule>) -> IpvsMessage {
    let mut attrs = Vec::new();
    nested(&mut attrs, CMD_ATTR_SERVICE, |svc| {
        service_id(svc, id);
        if let Some(s) = schedule {
            let mut name = s.scheduler.as_bytes().to_vec();
            name.push(0);
            put(svc, SVC_ATTR_SCHED_NAME, &name);
            let persistent = if s.persistence_s > 0 { SVC_F_PERSISTENT } else { 0 };
            let flags = persistent | (s.scheduler_flags & SVC_F_SCHED_MASK);
            // struct ip_vs_flags: the flags, then the mask of those set.
            put(
                svc,
                SVC_ATTR_FLAGS,
                &[flags.to_ne_bytes(), u32::MAX.to_ne_bytes()].concat(),
            );
            put(svc, SVC_ATTR_TIMEOUT, &s.persistence_s.to_ne_bytes());
            put(svc, SVC_ATTR_NETMASK, &u32::MAX.to_be_bytes());
        }
    });
    IpvsMessage { cmd, attrs }
}

fn dest_message(cmd: u8, id: &ServiceId, dest: &DestId, weight: Option<u32>) -> IpvsMessage {
    let mut attrs = Vec::new();
    nested(&mut attrs, CMD_ATTR_SERVICE, |svc| service_id(svc, id));
    nested(&mut attrs, CMD_ATTR_DEST, |d| {
        let mut address = [0u8; 16];
        address[..4].copy_from_slice(&dest.addr.octets());
        put(d, DEST_ATTR_ADDR, &address);
        put(d, DEST_ATTR_PORT, &dest.port.to_be_bytes());
        put(d, DEST_ATTR_ADDR_FAMILY, &(libc::AF_INET as u16).to_ne_bytes());
        if let Some(w) = weight {
            put(d, DEST_ATTR_FWD_METHOD, &FWD_MASQ.to_ne_bytes());
            put(d, DEST_ATTR_WEIGHT, &w.to_ne_bytes());
            put(d, DEST_ATTR_U_THRESH, &0u32.to_ne_bytes());
            put(d, DEST_ATTR_L_THRESH, &0u32.to_ne_bytes());
        }
    });
    IpvsMessage { cmd, attrs }
}

/// The request a change is (`ipvsadm -A|-E|-D|-a|-e|-d ...`).
pub fn message(change: &Change) -> IpvsMessage {
    match change {
        Change::AddService(id, s) => service_message(CMD_NEW_SERVICE, id, Some(s)),
        Change::SetService(id, s) => service_message(CMD_SET_SERVICE, id, Some(s)),
        Change::DelService(id) => service_message(CMD_DEL_SERVICE, id, None),
        Change::AddDest(id, d, w) => dest_message(CMD_NEW_DEST, id, d, Some(*w)),
        Change::SetWeight(id, d, w) => dest_message(CMD_SET_DEST, id, d, Some(*w)),
        Change::DelDest(id, d) => dest_message(CMD_DEL_DEST, id, d, None),
    }
}

/// The attribute `kind` in `buf` (nested flag ignored).
fn attr(mut buf: &[u8], kind: u16) -> Option<&[u8]> {
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let this = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return None;
        }
        if this == kind {
            return Some(&buf[4..len]);
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    None
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn parse_stats(stats: Option<&[u8]>) -> Stats {
    let Some(stats) = stats else {
        return Stats::default();
    };
    let get = |kind| {
        attr(stats, kind)
            .and_then(|v| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)))
            .unwrap_or(0)
    };
    Stats {
        connections: get(STATS_CONNS),
        packets_in: get(STATS_INPKTS),
        packets_out: get(STATS_OUTPKTS),
        bytes_in: get(STATS_INBYTES),
        bytes_out: get(STATS_OUTBYTES),
    }
}

fn parse_service(svc: &[u8]) -> Option<(ServiceId, Schedule)> {
    let af = u16::from_ne_bytes(attr(svc, SVC_ATTR_AF)?.get(..2)?.try_into().ok()?);
    if i32::from(af) != libc::AF_INET {
        return None;
    }
    let id = match attr(svc, SVC_ATTR_FWMARK).and_then(u32_of).filter(|m| *m != 0) {
        Some(mark) => ServiceId::Mark(mark),
        None => {
            let addr: [u8; 4] = attr(svc, SVC_ATTR_ADDR)?.get(..4)?.try_into().ok()?;
            let port = u16::from_be_bytes(attr(svc, SVC_ATTR_PORT)?.get(..2)?.try_into().ok()?);
            let protocol = u16::from_ne_bytes(attr(svc, SVC_ATTR_PROTOCOL)?.get(..2)?.try_into().ok()?) as u8;
            ServiceId::Addr {
                addr: Ipv4Addr::from(addr),
                port,
                protocol,
            }
        }
    };
    let sched = attr(svc, SVC_ATTR_SCHED_NAME)?;
    let scheduler = String::from_utf8_lossy(sched.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
    let flags = attr(svc, SVC_ATTR_FLAGS).and_then(u32_of).unwrap_or(0);
    let persistence_s = if flags & SVC_F_PERSISTENT != 0 {
        attr(svc, SVC_ATTR_TIMEOUT).and_then(u32_of).unwrap_or(0)
    } else {
        0
    };
    Some((
        id,
        Schedule {
            scheduler,
            scheduler_flags: flags & SVC_F_SCHED_MASK,
            persistence_s,
        },
    ))
}

/// A virtual service of a `GET_SERVICE` dump reply's attributes, with its
/// counters; `None` for one that is not IPv4 or lacks what identifies it.
pub fn parse_service_reply(attrs: &[u8]) -> Option<(ServiceId, Schedule, Stats)> {
    let svc = attr(attrs, CMD_ATTR_SERVICE)?;
    let (id, schedule) = parse_service(svc)?;
    Some((id, schedule, parse_stats(attr(svc, SVC_ATTR_STATS64))))
}

/// A real server of a `GET_DEST` dump reply's attributes; `None` for one
/// that lacks its address, port or weight.
pub fn parse_dest_reply(attrs: &[u8]) -> Option<(DestId, Dest)> {
    parse_dest(attr(attrs, CMD_ATTR_DEST)?)
}

fn parse_dest(d: &[u8]) -> Option<(DestId, Dest)> {
    let addr: [u8; 4] = attr(d, DEST_ATTR_ADDR)?.get(..4)?.try_into().ok()?;
    let port = u16::from_be_bytes(attr(d, DEST_ATTR_PORT)?.get(..2)?.try_into().ok()?);
    Some((
        DestId {
            addr: Ipv4Addr::from(addr),
            port,
        },
        Dest {
            weight: u32_of(attr(d, DEST_ATTR_WEIGHT)?)?,
            active: attr(d, DEST_ATTR_ACTIVE_CONNS).and_then(u32_of).unwrap_or(0),
            inactive: attr(d, DEST_ATTR_INACT_CONNS).and_then(u32_of).unwrap_or(0),
            stats: parse_stats(attr(d, DEST_ATTR_STATS64)),
        },
    ))
}

/// IPVS in the calling thread's network namespace.
pub struct Ipvs {
    genl: Genl,
}

impl Ipvs {
    /// Resolves the family (the `ip_vs` module must be loaded; the error
    /// says so when it is not).
    pub fn open() -> Result<Ipvs, GenlError> {
        Ok(Ipvs {
            genl: Genl::open(FAMILY)?,
        })
    }

    /// Every IPv4 virtual service, with its real servers
    /// (`ipvsadm -Ln --stats`); `owned` picks the agent's own.
    pub fn observe(&mut self, owned: impl Fn(&ServiceId) -> bool) -> Result<IpvsState, GenlError> {
        let mut state = IpvsState::new();
        let services = self.genl.dump(IpvsMessage {
            cmd: CMD_GET_SERVICE,
            attrs: Vec::new(),
        })?;
        for reply in services {
            let Some((id, schedule, stats)) = parse_service_reply(&reply.attrs) else {
                continue;
            };
            if !owned(&id) {
                continue;
            }
            let mut query = Vec::new();
            nested(&mut query, CMD_ATTR_SERVICE, |svc| service_id(svc, &id));
            let dests = self.genl.dump(IpvsMessage {
                cmd: CMD_GET_DEST,
                attrs: query,
            })?;
            let dests = dests.iter().filter_map(|r| parse_dest_reply(&r.attrs)).collect();
            state.insert(id, Service { schedule, dests, stats });
        }
        Ok(state)
    }

    /// Sends `changes` in order; stops at the first refusal.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), GenlError> {
        for change in changes {
            self.genl.request(message(change))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(port: u16) -> ServiceId {
        ServiceId::Addr {
            addr: Ipv4Addr::new(192, 0, 2, 1),
            port,
            protocol: 6,
        }
    }

    fn dest(last: u8) -> DestId {
        DestId {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 80,
        }
    }

    fn state(dests: &[(u8, Dest)]) -> IpvsState {
        IpvsState::from([(
            svc(8080),
            Service {
                schedule: rr(),
                dests: dests.iter().map(|(d, w)| (dest(*d), *w)).collect(),
                ..Service::default()
            },
        )])
    }

    fn rr() -> Schedule {
        Schedule {
            scheduler: "rr".into(),
            scheduler_flags: 0,
            persistence_s: 0,
        }
    }

    fn weight(w: u32) -> Dest {
        Dest {
            weight: w,
            ..Dest::default()
        }
    }

    #[test]
    fn a_real_server_drains_at_weight_zero_before_it_is_deleted() {
        let wanted = state(&[(2, weight(1))]);
        assert_eq!(
            plan(&wanted, &IpvsState::new(), |_, _| false),
            vec![
                Change::AddService(svc(8080), rr()),
                Change::AddDest(svc(8080), dest(2), 1)
            ]
        );
        let busy = Dest {
            weight: 1,
            active: 3,
            inactive: 0,
            ..Dest::default()
        };
        let found = state(&[(2, weight(1)), (3, busy)]);
        assert_eq!(
            plan(&wanted, &found, |_, _| false),
            vec![Change::SetWeight(svc(8080), dest(3), 0)]
        );
        let draining = state(&[(2, weight(1)), (3, Dest { weight: 0, ..busy })]);
        assert!(
            plan(&wanted, &draining, |_, _| false).is_empty(),
            "waits while connections remain"
        );
        assert_eq!(
            plan(&wanted, &draining, |_, d| *d == dest(3)),
            vec![Change::DelDest(svc(8080), dest(3))]
        );
        let idle = state(&[
            (2, weight(1)),
            (
                3,
                Dest {
                    weight: 0,
                    active: 0,
                    inactive: 4,
                    ..Dest::default()
                },
            ),
        ]);
        assert_eq!(
            plan(&wanted, &idle, |_, _| false),
            vec![Change::DelDest(svc(8080), dest(3))]
        );
    }

    #[test]
    fn a_service_goes_after_its_last_real_server() {
        let found = state(&[(2, weight(0))]);
        assert_eq!(
            plan(&IpvsState::new(), &found, |_, _| false),
            vec![Change::DelDest(svc(8080), dest(2)), Change::DelService(svc(8080))]
        );
        let busy = state(&[(
            2,
            Dest {
                weight: 1,
                active: 1,
                inactive: 0,
                ..Dest::default()
            },
        )]);
        assert_eq!(
            plan(&IpvsState::new(), &busy, |_, _| false),
            vec![Change::SetWeight(svc(8080), dest(2), 0)]
        );
    }

    #[test]
    fn messages_carry_the_service_and_the_real_server() {
        let m = message(&Change::AddDest(svc(8080), dest(2), 5));
        assert_eq!(m.cmd, CMD_NEW_DEST);
        let s = attr(&m.attrs, CMD_ATTR_SERVICE).unwrap();
        assert_eq!(attr(s, SVC_ATTR_PORT).unwrap(), &8080u16.to_be_bytes());
        let d = attr(&m.attrs, CMD_ATTR_DEST).unwrap();
        let (id, parsed) = parse_dest(d).unwrap();
        assert_eq!((id, parsed.weight), (dest(2), 5));
        assert_eq!(u32_of(attr(d, DEST_ATTR_FWD_METHOD).unwrap()), Some(FWD_MASQ));
        let sticky = Schedule {
            scheduler: "mh".into(),
            scheduler_flags: SCHED_MH_PORT,
            persistence_s: 300,
        };
        let add = message(&Change::AddService(svc(8080), sticky.clone()));
        let parsed = parse_service(attr(&add.attrs, CMD_ATTR_SERVICE).unwrap()).unwrap();
        assert_eq!(parsed, (svc(8080), sticky.clone()));
        let marked = message(&Change::SetService(ServiceId::Mark(0x6d00_1f90), sticky.clone()));
        assert_eq!(marked.cmd, CMD_SET_SERVICE);
        let parsed = parse_service(attr(&marked.attrs, CMD_ATTR_SERVICE).unwrap()).unwrap();
        assert_eq!(parsed, (ServiceId::Mark(0x6d00_1f90), sticky));
    }
}
