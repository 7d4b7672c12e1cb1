//! A datagram a task sends to its embedded DNS responder (127.0.0.11:53),
//! answered from the records of two services the way the responder does.
//!
//! Asserts: a query that parses has a name of labels of at most 63 bytes
//! and a question section that is exactly what it sent; the reply (if not
//! forwarded) is a response to it: the same ID, the question echoed, as
//! many well-formed A records as it says, and nothing else; only names
//! outside the swarm's shape are ever forwarded.
#![no_main]

use std::{collections::BTreeSet, net::Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    agent::net::dns::{is_service_name, parse_query, respond, Records},
    api::{
        assignment::discovery::{NetworkServices, ServiceRecord},
        service::LbOptions,
    },
};

fn records() -> Records {
    let service = |name: &str, vip: Option<Ipv4Addr>| ServiceRecord {
        service: 1,
        name: name.into(),
        vip,
        tasks: vec![(1, Ipv4Addr::new(10, 0, 0, 3)), (2, Ipv4Addr::new(10, 0, 0, 4))],
        lb: LbOptions::default(),
    };
    Records::new(&[NetworkServices {
        network: 7,
        services: vec![service("web", Some(Ipv4Addr::new(10, 0, 0, 2))), service("db", None)].into(),
    }])
}

fuzz_target!(|data: &[u8]| {
    let Ok(query) = parse_query(data) else {
        return;
    };
    assert_eq!(query.id, u16::from_be_bytes([data[0], data[1]]));
    assert!(query.name.split('.').all(|label| label.len() <= 63 * 3), "{query:?}");
    assert!(query.question.len() >= 5 && query.question.len() <= 255 + 5);
    assert_eq!(data[12..12 + query.question.len()], query.question[..]);
    let tail = &query.question[query.question.len() - 4..];
    assert_eq!(query.qtype, u16::from_be_bytes([tail[0], tail[1]]));
    assert_eq!(query.qclass, u16::from_be_bytes([tail[2], tail[3]]));

    let networks = BTreeSet::from([7]);
    for can_forward in [false, true] {
        let Some(reply) = respond(&records(), &networks, &query, can_forward) else {
            assert!(can_forward, "nothing is forwarded without resolvers");
            assert!(
                !is_service_name(&query.name),
                "{:?} is not the swarm's to forward",
                query.name
            );
            continue;
        };
        assert_eq!(reply[..2], data[..2], "the query's ID");
        let flags = u16::from_be_bytes([reply[2], reply[3]]);
        assert!(flags & 0x8000 != 0, "a response");
        assert_eq!(u16::from_be_bytes([reply[4], reply[5]]), 1, "one question");
        let answers = usize::from(u16::from_be_bytes([reply[6], reply[7]]));
        let question_end = 12 + query.question.len();
        assert_eq!(reply[12..question_end], query.question[..]);
        assert_eq!(reply.len(), question_end + 16 * answers, "A records and nothing else");
        for record in reply[question_end..].chunks(16) {
            assert_eq!(
                record[..12],
                [0xc0, 12, 0, 1, 0, 1, record[6], record[7], record[8], record[9], 0, 4]
            );
        }
    }
});
