//! WireGuard in userspace, for kernels without it: boringtun's protocol
//! code (no I/O) between a TUN device and a UDP socket, on three threads
//! of the agent (packets out, packets in, timers).
//!
//! The TUN device is made persistent, so the addresses, routes and VXLAN
//! devices that hang on it outlive an agent restart; the next agent opens
//! it again and the tunnels re-handshake (one round trip).
//!
//! Every peer may only send from its own tunnel address, as the kernel's
//! allowed IPs enforce; packets from anyone else are dropped.

use crate::locks::{Locked, RwLocked};
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex, RwLock,
    },
    thread::JoinHandle,
    time::Duration,
};

use boringtun::{
    noise::{handshake::parse_handshake_anon, rate_limiter::RateLimiter, Packet, Tunn, TunnResult},
    x25519::{PublicKey, StaticSecret},
};

use super::wireguard::{Key, PeerChange, TunnelPeer};

// linux/if_tun.h: _IOW('T', 202, int) and _IOW('T', 203, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// How often the workers look up from a blocking wait (to stop).
const WAKE: Duration = Duration::from_millis(200);
/// How often the WireGuard timers run (handshake retries, keepalives,
/// session expiry), as boringtun's own device does.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Room for the largest packet plus WireGuard's overhead.
const BUFFER: usize = 65_536 + 64;
/// Handshakes a second the device takes before it asks for cookies
/// (boringtun's own device uses the same figure).
const HANDSHAKES_PER_SECOND: u64 = 100;

/// A running userspace WireGuard device.
pub(crate) struct UserspaceTunnel {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    tun: File,
    udp: UdpSocket,
    private: StaticSecret,
    public: PublicKey,
    peers: RwLock<PeerTable>,
    /// Checks a handshake's MACs (and, under load, its cookie) before any
    /// Diffie-Hellman work is spent on it.
    limiter: Arc<RateLimiter>,
    next_index: AtomicU32,
    stop: AtomicBool,
}

#[derive(Default)]
struct PeerTable {
    by_key: HashMap<Key, Arc<Peer>>,
    by_tunnel: HashMap<Ipv6Addr, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
}

struct Peer {
    config: TunnelPeer,
    index: u32,
    tunn: Mutex<Tunn>,
}

impl UserspaceTunnel {
    /// Opens (or creates, persistent) TUN device `name`, binds the
    /// WireGuard socket on `port` and starts the workers, with no peers.
    pub(crate) fn start(name: &str, private: Key, port: u16) -> io::Result<UserspaceTunnel> {
        let tun = open_tun(name)?;
        let udp = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .map_err(|e| io::Error::new(e.kind(), format!("binding the WireGuard port udp/{port}: {e}")))?;
        udp.set_read_timeout(Some(WAKE))?;
        let private = StaticSecret::from(private);
        let public = PublicKey::from(&private);
        let shared = Arc::new(Shared {
            tun,
            udp,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            public,
            private,
            peers: RwLock::new(PeerTable::default()),
            next_index: AtomicU32::new(1),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for (name, work) in [
            ("wg-out", outbound as fn(&Shared)),
            ("wg-in", inbound),
            ("wg-timers", timers),
        ] {
            let s = shared.clone();
            workers.push(std::thread::Builder::new().name(name.into()).spawn(move || work(&s))?);
        }
        Ok(UserspaceTunnel { shared, workers })
    }

    /// Each peer's traffic and last handshake (boringtun's counters).
    pub(crate) fn peer_stats(&self) -> Vec<super::wireguard::PeerStats> {
        let table = self.shared.peers.read_locked();
        table
            .by_key
            .values()
            .map(|p| {
                let (since, tx, rx, _, _) = p.tunn.locked().stats();
                super::wireguard::PeerStats {
                    tunnel: p.config.tunnel,
                    handshake_age_s: since.map(|d| d.as_secs_f64()),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect()
    }

    /// Carries out `changes`. A changed peer gets a fresh session (one
    /// handshake; boringtun cannot change a preshared key in place).
    pub(crate) fn apply(&self, changes: &[PeerChange]) {
        let mut table = self.shared.peers.write_locked();
        for change in changes {
            let key = match change {
                PeerChange::Remove { key } | PeerChange::Set { key, .. } => *key,
            };
            if let Some(old) = table.by_key.remove(&key) {
                table.by_index.remove(&old.index);
                if table
                    .by_tunnel
                    .get(&old.config.tunnel)
                    .is_some_and(|p| Arc::ptr_eq(p, &old))
                {
                    table.by_tunnel.remove(&old.config.tunnel);
                }
            }
            if let PeerChange::Set { key, peer } = change {
                // Session indexes carry the peer's index in their upper 24 bits.
                let index = self.shared.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                let tunn = Tunn::new(
                    self.shared.private.clone(),
                    PublicKey::from(*key),
                    Some(peer.psk),
                    None,
                    index,
                    Some(self.shared.limiter.clone()),
                );
                let peer = Arc::new(Peer {
                    config: peer.clone(),
                    index,
                    tunn: Mutex::new(tunn),
                });
                table.by_tunnel.insert(peer.config.tunnel, peer.clone());
                table.by_index.insert(index, peer.clone());
                table.by_key.insert(*key, peer);
            }
        }
    }

    /// Stops the workers and deletes the TUN device (the node leaves).
    pub(crate) fn remove(self) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes an int by value on an open TUN fd.
        let r = unsafe { libc::ioctl(self.shared.tun.as_raw_fd(), TUNSETPERSIST as _, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(self);
        Ok(())
    }
}

impl Drop for UserspaceTunnel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Opens TUN device `name` (IFF_TUN, no packet info), creating it and
/// making it persistent.
fn open_tun(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad TUN name {name:?}"),
        ));
    }
    // SAFETY: open(2) of a constant path; the fd is owned by the File below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")));
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: a zeroed ifreq is valid; name and flags are set below.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut ifr as *mut libc::ifreq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("creating TUN device {name}: {e}")));
    }
    // SAFETY: TUNSETPERSIST takes an int by value on an open TUN fd.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits up to [`WAKE`] for the TUN device to have a packet.
fn tun_readable(tun: &File) -> bool {
    let mut pfd = libc::pollfd {
        fd: tun.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, WAKE.as_millis() as libc::c_int) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// TUN -> peers: each packet to a tunnel address goes, encrypted, to the
/// node that owns it.
fn outbound(s: &Shared) {
    let mut packet = vec![0u8; BUFFER];
    let mut out = vec![0u8; BUFFER];
    while !s.stop.load(Ordering::Relaxed) {
        if !tun_readable(&s.tun) {
            continue;
        }
        let n = match (&s.tun).read(&mut packet) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("reading the WireGuard TUN device: {e}");
                std::thread::sleep(WAKE);
                continue;
            }
        };
        let Some(IpAddr::V6(dst)) = Tunn::dst_address(&packet[..n]) else {
            continue;
        };
        let peer = s.peers.read_locked().by_tunnel.get(&dst).cloned();
        let Some(peer) = peer else {
            continue;
        };
        let mut tunn = peer.tunn.locked();
        if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&packet[..n], &mut out) {
            let _ = s.udp.send_to(p, peer.config.endpoint);
        }
    }
}

/// Peers -> TUN: each datagram is matched to its peer (by session index,
/// or by the static key inside a handshake), decrypted, and written to the
/// TUN device if it comes from that peer's tunnel address.
fn inbound(s: &Shared) {
    let mut datagram = vec![0u8; BUFFER];
    let mut out = vec![0u8; BUFFER];
    while !s.stop.load(Ordering::Relaxed) {
        let (n, from) = match s.udp.recv_from(&mut datagram) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                log::warn!("reading the WireGuard socket: {e}");
                std::thread::sleep(WAKE);
                continue;
            }
        };
        match admit(&s.limiter, from.ip(), &datagram[..n], &mut out) {
            Admission::Pass => {}
            Admission::Reply(cookie) => {
                let _ = s.udp.send_to(&cookie, from);
                continue;
            }
            Admission::Drop => continue,
        }
        let Some(peer) = s.peer_of(&datagram[..n]) else {
            continue;
        };
        let mut tunn = peer.tunn.locked();
        let mut result = tunn.decapsulate(Some(from.ip()), &datagram[..n], &mut out);
        loop {
            match result {
                TunnResult::WriteToNetwork(p) => {
                    let _ = s.udp.send_to(p, peer.config.endpoint);
                    // Packets queued while the handshake ran go out now.
                    result = tunn.decapsulate(None, &[], &mut out);
                }
                TunnResult::WriteToTunnelV6(p, source) => {
                    if source == peer.config.tunnel {
                        let _ = (&s.tun).write(p);
                    }
                    break;
                }
                TunnResult::WriteToTunnelV4(..) | TunnResult::Done | TunnResult::Err(_) => break,
            }
        }
    }
}

/// What becomes of a datagram before it is matched to a peer.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// On to its peer.
    Pass,
    /// A handshake while under load without a valid cookie: answer with
    /// this cookie reply, and nothing more.
    Reply(Vec<u8>),
    /// Not WireGuard, or a handshake whose MAC does not verify.
    Drop,
}

/// The rate limiter's verdict on `datagram` from `from`: only handshakes
/// that carry our public key's MAC (and, under load, a cookie) reach the
/// Diffie-Hellman work of matching them to a peer.
fn admit(limiter: &RateLimiter, from: std::net::IpAddr, datagram: &[u8], out: &mut [u8]) -> Admission {
    match limiter.verify_packet(Some(from), datagram, out) {
        Ok(_) => Admission::Pass,
        Err(TunnResult::WriteToNetwork(cookie)) => Admission::Reply(cookie.to_vec()),
        Err(_) => Admission::Drop,
    }
}

impl Shared {
    fn peer_of(&self, datagram: &[u8]) -> Option<Arc<Peer>> {
        let table = self.peers.read_locked();
        let index = match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(p) => {
                let half = parse_handshake_anon(&self.private, &self.public, &p).ok()?;
                return table.by_key.get(&half.peer_static_public).cloned();
            }
            Packet::HandshakeResponse(p) => p.receiver_idx,
            Packet::PacketCookieReply(p) => p.receiver_idx,
            Packet::PacketData(p) => p.receiver_idx,
        };
        table.by_index.get(&(index >> 8)).cloned()
    }
}

/// Runs every peer's timers: handshake retries and rekeys, keepalives.
fn timers(s: &Shared) {
    let mut out = vec![0u8; BUFFER];
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(TIMER_TICK);
        // The handshake count is per second (the peers' timers leave it to
        // us); the limiter resets it at most once a second.
        s.limiter.reset_count();
        let peers: Vec<Arc<Peer>> = s.peers.read_locked().by_key.values().cloned().collect();
        for peer in peers {
            let mut tunn = peer.tunn.locked();
            if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out) {
                let _ = s.udp.send_to(p, peer.config.endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake initiation from a fresh key to `responder`.
    fn initiation(responder: &PublicKey) -> Vec<u8> {
        let mut tunn = Tunn::new(StaticSecret::from([7u8; 32]), *responder, None, None, 1, None);
        let mut out = vec![0u8; 256];
        match tunn.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("an initiation"),
        }
    }

    #[test]
    fn handshakes_are_checked_before_any_key_exchange_and_cookies_asked_under_load() {
        let public = PublicKey::from(&StaticSecret::from([9u8; 32]));
        let limiter = RateLimiter::new(&public, 1);
        let from = std::net::IpAddr::from([192, 0, 2, 7]);
        let mut out = vec![0u8; 256];
        let real = initiation(&public);
        // A forged initiation (right type and size, no valid MAC): dropped.
        let mut forged = real.clone();
        forged[100] ^= 0xff;
        let last = forged.len() - 20;
        forged[last] ^= 0xff;
        assert_eq!(admit(&limiter, from, &forged, &mut out), Admission::Drop);
        // One aimed at another key: dropped too.
        let other = PublicKey::from(&StaticSecret::from([8u8; 32]));
        assert_eq!(admit(&limiter, from, &initiation(&other), &mut out), Admission::Drop);
        // A real one passes; past the rate, one without a cookie gets a
        // cookie reply (64 bytes) and nothing more.
        assert_eq!(admit(&limiter, from, &real, &mut out), Admission::Pass);
        match admit(&limiter, from, &real, &mut out) {
            Admission::Reply(cookie) => assert_eq!(cookie.len(), 64),
            other => panic!("under load: {other:?}"),
        }
        // Not WireGuard at all.
        assert_eq!(admit(&limiter, from, b"hello", &mut out), Admission::Drop);
    }
}
