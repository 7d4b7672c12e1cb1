//! The embedded DNS responder: inside every task's network namespace the
//! agent answers on 127.0.0.11:53 (as Swarm does), and the task's
//! /etc/resolv.conf points there.
//!
//! - `NAME` -> the service's virtual IP on the task's network (endpoint
//!   mode vip), or its running tasks' addresses (dnsrr);
//! - `tasks.NAME` -> every running task's address;
//! - only services on the task's own networks are known to it;
//! - a name of that shape that is not known here is NXDOMAIN, answered
//!   here: it is not leaked to resolvers outside;
//! - other names go to the node's resolvers (from /etc/resolv.conf, loopback
//!   ones left out: they would be the task's own loopback), and without
//!   any the answer is SERVFAIL.
//!
//! Records follow the assignments, so they change as tasks come and go.
//! The wire format (RFC 1035) is parsed and written here: queries for one
//! name, answers of A records.

use crate::locks::{Locked, RwLocked};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};

use crate::agent::net::{error::NetError, netns::NetNs};
use crate::api::assignment::discovery::NetworkServices;

/// Where tasks reach the responder.
pub(crate) const ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// The resolv.conf every task sees.
pub(crate) const RESOLV_CONF: &str = "nameserver 127.0.0.11\noptions ndots:0\n";

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
/// Virtual IPs change only when a service is removed; task addresses with
/// every task: the latter are not to be cached.
const TTL_VIP: u32 = 60;
const TTL_TASKS: u32 = 0;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries forwarded at once for the whole node (Docker's embedded DNS
/// has the same bound) and for one task: each holds a socket for up to
/// [`UPSTREAM_TIMEOUT`] per upstream, and past these a task's query gets
/// SERVFAIL at once instead of another socket.
const NODE_FORWARDS: usize = 1024;
const TASK_FORWARDS: usize = 128;

/// What a name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) addresses: Vec<Ipv4Addr>,
    pub(crate) ttl: u32,
}

/// Every network's names (lower case).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    networks: BTreeMap<u64, BTreeMap<String, Answer>>,
}

impl Records {
    /// The names of `services`.
    pub fn new(services: &[NetworkServices]) -> Records {
        let mut networks = BTreeMap::new();
        for n in services {
            let mut names = BTreeMap::new();
            for s in n.services.iter() {
                let tasks: Vec<Ipv4Addr> = s.tasks.iter().map(|(_, a)| *a).collect();
                let name = s.name.to_ascii_lowercase();
                let answer = match s.vip {
                    Some(vip) => Answer {
                        addresses: vec![vip],
                        ttl: TTL_VIP,
                    },
                    None => Answer {
                        addresses: tasks.clone(),
                        ttl: TTL_TASKS,
                    },
                };
                names.insert(
                    format!("tasks.{name}"),
                    Answer {
                        addresses: tasks,
                        ttl: TTL_TASKS,
                    },
                );
                names.insert(name, answer);
            }
            networks.insert(n.network, names);
        }
        Records { networks }
    }

    /// How many names there are, over every network.
    pub fn len(&self) -> usize {
        self.networks.values().map(BTreeMap::len).sum()
    }

    /// Whether there is no name at all.
    pub fn is_empty(&self) -> bool {
        self.networks.values().all(BTreeMap::is_empty)
    }

    /// What `name` is on `networks` (a task's): the first network that
    /// knows it, in network ID order; `None` when none does.
    pub(crate) fn resolve(&self, networks: &BTreeSet<u64>, name: &str) -> Option<&Answer> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        networks
            .iter()
            .filter_map(|n| self.networks.get(n))
            .find_map(|names| names.get(&name))
    }
}

/// One question, as asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The flags word of the query (opcode and RD are echoed).
    pub(crate) flags: u16,
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section's bytes, echoed in the answer.
    pub question: Vec<u8>,
}

/// A query as a resolver sends it (recursion desired, one question of
/// class IN): what [`parse_query`] reads. Tests, probes and the fuzz seeds
/// ask with it.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// Parses a query with exactly one question; `Err` says what is wrong.
pub fn parse_query(packet: &[u8]) -> Result<Query, &'static str> {
    if packet.len() < 12 {
        return Err("shorter than a DNS header");
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    if flags & 0x8000 != 0 {
        return Err("a response, not a query");
    }
    if u16::from_be_bytes([packet[4], packet[5]]) != 1 {
        return Err("not exactly one question");
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(at).ok_or("name runs past the end")? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err("compressed or oversized label in a question");
        }
        let label = packet.get(at..at + len).ok_or("label runs past the end")?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += len;
        if at > 12 + 255 {
            return Err("name longer than 255 bytes");
        }
    }
    let tail = packet.get(at..at + 4).ok_or("question cut short")?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    Ok(Query {
        id,
        flags,
        name: labels.join("."),
        qtype,
        qclass,
        question: packet[12..at + 4].to_vec(),
    })
}

/// An authoritative answer: `addresses` as A records when the question
/// asks for them (no records, NOERROR, for other types of a known name).
pub(crate) fn answer(query: &Query, found: &Answer) -> Vec<u8> {
    let wants_a = (query.qtype == TYPE_A || query.qtype == TYPE_ANY) && query.qclass == CLASS_IN;
    let records: &[Ipv4Addr] = if wants_a { &found.addresses } else { &[] };
    let mut out = header(query, 0, records.len() as u16);
    out.extend_from_slice(&query.question);
    for a in records {
        out.extend_from_slice(&[0xc0, 12]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&found.ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&a.octets());
    }
    out
}

/// An answer with no records and `rcode`.
pub(crate) fn error(query: &Query, rcode: u8) -> Vec<u8> {
    let mut out = header(query, rcode, 0);
    out.extend_from_slice(&query.question);
    out
}

fn header(query: &Query, rcode: u8, answers: u16) -> Vec<u8> {
    // QR, the query's opcode and RD, AA, RA.
    let flags = 0x8000 | (query.flags & 0x7900) | 0x0400 | 0x0080 | u16::from(rcode & 0x0f);
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// The answer to `query` from a task on `networks`: its records, or an
/// error; `None` when it is to be forwarded to the node's resolvers
/// (`can_forward`: there are some).
pub fn respond(records: &Records, networks: &BTreeSet<u64>, query: &Query, can_forward: bool) -> Option<Vec<u8>> {
    Some(match records.resolve(networks, &query.name) {
        Some(found) => answer(query, found),
        None if (query.flags >> 11) & 0xf != 0 => error(query, RCODE_NOTIMP),
        // A service name that is not (or not here): no resolver outside
        // has it either, and it is not theirs to see.
        None if is_service_name(&query.name) => error(query, RCODE_NXDOMAIN),
        None if !can_forward => error(query, RCODE_SERVFAIL),
        None => return None,
    })
}

/// Whether `name` has the shape of a service's name (one label, or
/// `tasks.` and one label): such names are answered here or not at all.
pub fn is_service_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    let name = name
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("tasks."))
        .map_or(name, |_| &name[6..]);
    !name.is_empty() && !name.contains('.')
}

/// The resolvers in a resolv.conf, loopback ones left out.
pub(crate) fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}

/// The node's responder: the records, and one server per task.
pub(crate) struct Dns {
    records: Arc<RwLock<Records>>,
    upstreams: Vec<SocketAddr>,
    /// The node's forwards in flight.
    forwards: Arc<Semaphore>,
    servers: std::sync::Mutex<BTreeMap<u64, JoinHandle<()>>>,
}

/// The forwards one task may start: its own share and the node's.
#[derive(Clone)]
struct Forwards {
    node: Arc<Semaphore>,
    task: Arc<Semaphore>,
}

impl Forwards {
    /// Permits for one more forward, if both bounds allow it.
    fn start(&self) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let task = self.task.clone().try_acquire_owned().ok()?;
        let node = self.node.clone().try_acquire_owned().ok()?;
        Some((task, node))
    }
}

impl Default for Dns {
    fn default() -> Self {
        Dns::new()
    }
}

impl Dns {
    /// A responder forwarding to the resolvers of this node's /etc/resolv.conf.
    pub(crate) fn new() -> Dns {
        let upstreams = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| upstreams(&t))
            .unwrap_or_default();
        Dns::with_upstreams(upstreams)
    }

    /// A responder forwarding to `upstreams`.
    pub(crate) fn with_upstreams(upstreams: Vec<SocketAddr>) -> Dns {
        Dns {
            records: Arc::default(),
            upstreams,
            forwards: Arc::new(Semaphore::new(NODE_FORWARDS)),
            servers: std::sync::Mutex::default(),
        }
    }

    /// Follows the assignments' services.
    pub(crate) fn apply(&self, services: &[NetworkServices]) {
        let next = Records::new(services);
        let mut records = self.records.write_locked();
        if *records != next {
            *records = next;
        }
    }

    /// Writes the task's resolv.conf into its directory; the task's mount
    /// namespace gets it over /etc/resolv.conf.
    pub(crate) fn resolv_conf(dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("resolv.conf");
        std::fs::write(&path, RESOLV_CONF)?;
        Ok(path)
    }

    /// Answers task `task` (namespace at `netns`, on `networks`) on
    /// 127.0.0.11:53 until [`Dns::stop`].
    pub(crate) fn serve(&self, task: u64, netns: &Path, networks: BTreeSet<u64>) -> Result<(), NetError> {
        let binding = format!("binding the DNS responder to {ADDRESS}:53 in the task");
        let ns = NetNs::open_at(netns, "task").map_err(NetError::kernel(binding.clone()))?;
        let socket = ns
            .run(|| {
                let s = std::net::UdpSocket::bind((ADDRESS, 53))?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            })
            .map_err(NetError::kernel(binding.clone()))?
            .map_err(NetError::kernel(binding.clone()))?;
        let socket = UdpSocket::from_std(socket).map_err(NetError::kernel(binding))?;
        let handle = tokio::spawn(self.answer(Arc::new(socket), networks, TASK_FORWARDS));
        if let Some(old) = self.servers.locked().insert(task, handle) {
            old.abort();
        }
        Ok(())
    }

    /// Answers the queries arriving on `socket` for a task on `networks`,
    /// forwarding at most `task_forwards` at once.
    fn answer(
        &self,
        socket: Arc<UdpSocket>,
        networks: BTreeSet<u64>,
        task_forwards: usize,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let records = self.records.clone();
        let upstreams = self.upstreams.clone();
        let forwards = Forwards {
            node: self.forwards.clone(),
            task: Arc::new(Semaphore::new(task_forwards)),
        };
        let mut refused_logged: Option<std::time::Instant> = None;
        async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let (n, from) = match socket.recv_from(&mut buf).await {
                    Ok(r) => r,
                    Err(_) => {
                        // Transient (an ICMP error from an earlier send): do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(query) = parse_query(&buf[..n]) else {
                    continue;
                };
                let reply = respond(&records.read_locked(), &networks, &query, !upstreams.is_empty());
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from).await;
                    continue;
                }
                let Some(permits) = forwards.start() else {
                    if refused_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                        log::warn!(
                            "DNS: more than {task_forwards} queries of a task (or {NODE_FORWARDS} of the node) are waiting for the node's resolvers; answering SERVFAIL to the rest"
                        );
                        refused_logged = Some(std::time::Instant::now());
                    }
                    let _ = socket.send_to(&error(&query, RCODE_SERVFAIL), from).await;
                    continue;
                };
                // A slow resolver must not hold up the task's other names.
                let (asked, upstreams, socket) = (buf[..n].to_vec(), upstreams.clone(), socket.clone());
                tokio::spawn(async move {
                    let _permits = permits;
                    let reply = forward(&upstreams, &asked)
                        .await
                        .unwrap_or_else(|| error(&query, RCODE_SERVFAIL));
                    let _ = socket.send_to(&reply, from).await;
                });
            }
        }
    }

    /// Stops answering task `task`.
    pub(crate) fn stop(&self, task: u64) {
        if let Some(h) = self.servers.locked().remove(&task) {
            h.abort();
        }
    }
}

/// Asks the node's resolvers in turn; the first answer wins.
async fn forward(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(socket) = UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.send_to(query, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, _))) = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv_from(&mut buf)).await {
            if n >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{assignment::discovery::ServiceRecord, service::LbOptions};

    fn records() -> Records {
        Records::new(&[NetworkServices {
            network: 5,
            services: vec![
                ServiceRecord {
                    service: 1,
                    name: "API".into(),
                    vip: Some(Ipv4Addr::new(10, 0, 0, 2)),
                    tasks: vec![(10, Ipv4Addr::new(10, 0, 0, 3)), (11, Ipv4Addr::new(10, 0, 0, 4))],
                    lb: LbOptions::default(),
                },
                ServiceRecord {
                    service: 2,
                    name: "db".into(),
                    vip: None,
                    tasks: vec![(20, Ipv4Addr::new(10, 0, 0, 5))],
                    lb: LbOptions::default(),
                },
            ]
            .into(),
        }])
    }

    #[tokio::test]
    async fn forwards_are_bounded_and_the_rest_answered_servfail_at_once() {
        // An upstream that never answers: every forward waits it out.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dns = Dns::with_upstreams(vec![upstream.local_addr().unwrap()]);
        let responder = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let at = responder.local_addr().unwrap();
        let serving = tokio::spawn(dns.answer(responder, BTreeSet::from([5]), 4));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for id in 0..10u16 {
            client
                .send_to(&encode_query(id, "example.org", TYPE_A), at)
                .await
                .unwrap();
        }
        let mut servfail = 0;
        let mut buf = [0u8; 512];
        for _ in 0..10 {
            let (n, _) = tokio::time::timeout(UPSTREAM_TIMEOUT * 3, client.recv_from(&mut buf))
                .await
                .expect("every query is answered")
                .unwrap();
            assert!(n >= 4);
            servfail += usize::from(buf[3] & 0x0f == RCODE_SERVFAIL);
        }
        assert_eq!(servfail, 10, "no upstream answered: SERVFAIL for all");
        let mut forwarded = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), upstream.recv_from(&mut buf)).await {
            forwarded += 1;
        }
        assert_eq!(forwarded, 4, "only the task's bound reached the upstream");
        serving.abort();
    }

    #[test]
    fn names_resolve_on_the_tasks_networks_only() {
        let r = records();
        let on = BTreeSet::from([5]);
        assert_eq!(
            r.resolve(&on, "api").unwrap().addresses,
            vec![Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert_eq!(r.resolve(&on, "Tasks.API.").unwrap().addresses.len(), 2);
        assert_eq!(
            r.resolve(&on, "db").unwrap().addresses,
            vec![Ipv4Addr::new(10, 0, 0, 5)],
            "dnsrr"
        );
        assert!(r.resolve(&on, "example.org").is_none());
        assert!(
            r.resolve(&BTreeSet::from([6]), "api").is_none(),
            "another network's service"
        );
    }

    #[test]
    fn queries_parse_and_answers_carry_a_records() {
        let asked = encode_query(0x1234, "tasks.api", TYPE_A);
        let q = parse_query(&asked).unwrap();
        assert_eq!((q.id, q.name.as_str(), q.qtype), (0x1234, "tasks.api", TYPE_A));
        let found = records().resolve(&BTreeSet::from([5]), &q.name).cloned().unwrap();
        let reply = answer(&q, &found);
        assert_eq!(&reply[..2], &[0x12, 0x34]);
        assert_eq!(reply[2] & 0x80, 0x80, "a response");
        assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 2, "two answers");
        assert_eq!(&reply[reply.len() - 4..], &[10, 0, 0, 4]);
        let aaaa = parse_query(&encode_query(1, "api", 28)).unwrap();
        let none = answer(&aaaa, &found);
        assert_eq!(
            u16::from_be_bytes([none[6], none[7]]),
            0,
            "no AAAA records, still NOERROR"
        );
        assert_eq!(none[3] & 0x0f, 0);
        assert_eq!(error(&q, 3)[3] & 0x0f, 3);
        for bad in [&[0u8; 5][..], &asked[..asked.len() - 2]] {
            assert!(parse_query(bad).is_err());
        }
        let mut response = asked.clone();
        response[2] |= 0x80;
        assert!(parse_query(&response).is_err());
    }

    #[test]
    fn service_shaped_names_stay_here() {
        assert!(is_service_name("api") && is_service_name("tasks.api") && is_service_name("TASKS.db."));
        assert!(!is_service_name("example.org") && !is_service_name("tasks.a.b") && !is_service_name(""));
    }

    #[test]
    fn loopback_resolvers_are_left_out() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nsearch example\n";
        assert_eq!(upstreams(conf), vec!["192.0.2.53:53".parse().unwrap()]);
    }
}
