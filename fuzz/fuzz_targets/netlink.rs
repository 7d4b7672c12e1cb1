//! Datagrams the kernel sends back on the agent's netlink sockets, decoded
//! as the agent decodes them (the first byte picks the socket; the rest is
//! one datagram of replies to request 1):
//! generic netlink dumps of IPVS services and real servers, and of a
//! WireGuard device; NETLINK_XFRM dumps of associations and policies; and
//! nf_tables batch acknowledgements.
//!
//! Asserts: what decodes as one of the agent's objects encodes (as the
//! agent's own request for it) to attributes that decode to the same
//! object; the metrics' sums over kernel counters never overflow; every
//! message handed on lies inside the datagram; acknowledgements read back
//! as written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::dataplane::{
    genl::decode_replies as genl_replies,
    ipvs::{self, parse_dest_reply, parse_service_reply, Dest, IpvsMessage, ServiceId},
    nftables::acks,
    wireguard::{device_of, parse_peer, peer_message, peer_stats_of, Checked, PeerChange},
    xfrm::{self, parse_policy, parse_sa, Sa},
};
use netlink_packet_wireguard::WireguardPeer;

/// The request the replies answer.
const SEQUENCE: u32 = 1;

fn ipvs_dump(datagram: &[u8], dump: bool) {
    let Ok(replies) = genl_replies::<IpvsMessage>(datagram, SEQUENCE, dump, ipvs::FAMILY) else {
        return;
    };
    for reply in &replies.payloads {
        if let Some((id, schedule, stats)) = parse_service_reply(&reply.attrs) {
            let _ = (stats.packets(), stats.bytes());
            let request = ipvs::message(&ipvs::Change::AddService(id, schedule.clone()));
            let again = parse_service_reply(&request.attrs).map(|(id, s, _)| (id, s));
            assert_eq!(again, Some((id, schedule)));
        }
        if let Some((dest_id, dest)) = parse_dest_reply(&reply.attrs) {
            let _ = (dest.stats.packets(), dest.stats.bytes());
            let request = ipvs::message(&ipvs::Change::AddDest(ServiceId::Mark(1), dest_id, dest.weight));
            let expected = Dest {
                weight: dest.weight,
                ..Dest::default()
            };
            assert_eq!(parse_dest_reply(&request.attrs), Some((dest_id, expected)));
        }
    }
}

fn wireguard_dump(datagram: &[u8], dump: bool) {
    let Ok(replies) = genl_replies::<Checked>(datagram, SEQUENCE, dump, "wireguard") else {
        return;
    };
    let replies: Vec<_> = replies.payloads.into_iter().map(|r| r.0).collect();
    let device = device_of(replies.clone());
    assert_ne!(device.private, Some([0; 32]), "an all-zero key is no key");
    for (key, peer) in device.peers {
        let WireguardPeer(attrs) = peer_message(&PeerChange::Set {
            key,
            peer: peer.clone(),
        });
        assert_eq!(parse_peer(attrs), Some((key, peer)));
    }
    for stats in peer_stats_of(replies, 1.7e9) {
        if let Some(age) = stats.handshake_age_s {
            assert!(age >= 0.0 && age.is_finite(), "{stats:?}");
        }
    }
}

fn xfrm_dump(datagram: &[u8]) {
    let Ok(replies) = xfrm::decode_replies(datagram, SEQUENCE) else {
        return;
    };
    let range = datagram.as_ptr_range();
    for (kind, body) in replies.messages {
        assert!(range.start <= body.as_ptr() && body.as_ptr_range().end <= range.end);
        if let Some(id) = parse_sa(kind, body) {
            let sa = Sa {
                port: 4790,
                key: [7; 20],
            };
            let (kind, request) = xfrm::message(&xfrm::Change::AddSa(id, sa));
            assert_eq!(parse_sa(kind, &request), Some(id));
        }
        if let Some(policy) = parse_policy(kind, body) {
            let (_, request) = xfrm::message(&xfrm::Change::SetPolicy(policy));
            // The kernel lists a policy as NEWPOLICY with the body it was set with.
            assert_eq!(parse_policy(0x13, &request), Some(policy));
        }
    }
}

fn nftables_acks(datagram: &[u8]) {
    let found = acks(datagram);
    assert!(found.len() <= datagram.len() / 20);
    let mut again = Vec::new();
    for (seq, errno) in &found {
        again.extend_from_slice(&36u32.to_ne_bytes());
        again.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        again.extend_from_slice(&0u16.to_ne_bytes());
        again.extend_from_slice(&seq.to_ne_bytes());
        again.extend_from_slice(&0u32.to_ne_bytes());
        again.extend_from_slice(&errno.wrapping_neg().to_ne_bytes());
        again.extend_from_slice(&[0; 16]);
    }
    assert_eq!(acks(&again), found);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, datagram)) = data.split_first() else {
        return;
    };
    let dump = which & 0x80 != 0;
    match which % 4 {
        0 => ipvs_dump(datagram, dump),
        1 => wireguard_dump(datagram, dump),
        2 => xfrm_dump(datagram),
        _ => nftables_acks(datagram),
    }
});
