//! Addresses and subnets operators give: `--subnet`, `--gateway`,
//! `--ip-range` (network create), `--default-addr-pool` with its mask
//! length (swarm init), `--local-pool`, `--listen-addr`,
//! `--advertise-addr`, the manager address of `swarm join`, and
//! `--metrics-addr` (the first byte picks which; the rest is the text).
//!
//! Asserts: a subnet prints back to itself and its arithmetic stays inside
//! it (hosts, gateway, broadcast, splits); pools accepted never overlap and
//! the networks carved from them neither overlap each other nor leave their
//! pool; a network's gateway, range and first task address lie in its
//! subnet; an address accepted is accepted again as printed.
#![no_main]

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
};

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    agent::net::bridge::{check_local_pool, Ipam},
    api::{
        addr::{parse_advertise_addr, parse_listen_addr, parse_remote_addr},
        network::NetworkSpec,
        subnet::Subnet,
    },
    manager::{
        allocator::network::{allocate_network, task_address, Pools},
        rules::check_address_pools,
    },
    metrics::server::parse_addr,
};

fn subnet(text: &str) {
    let Ok(s) = Subnet::parse(text) else {
        return;
    };
    assert!(s.prefix <= 32);
    assert_eq!(Subnet::parse(&s.to_string()), Ok(s));
    assert_eq!(u32::from(s.base) & !s.mask(), 0, "host bits are zero");
    assert!(s.contains(s.base) && s.contains(s.broadcast()) && s.covers(s));
    let mut hosts = s.hosts();
    if let Some(first) = hosts.next() {
        assert!(s.contains(first) && first != s.base);
    }
    if let Some(last) = s.hosts().last() {
        assert!(s.contains(last) && last != s.broadcast());
    }
    if s.prefix <= 30 {
        let gateway = s.gateway();
        assert!(s.contains(gateway) && gateway != s.base && gateway != s.broadcast());
    }
    for more in 0..=3u8 {
        let parts: Vec<Subnet> = s.split(s.prefix.saturating_add(more)).collect();
        if s.prefix + more > 32 {
            assert!(parts.is_empty());
            continue;
        }
        assert_eq!(parts.len(), 1 << more);
        for pair in parts.windows(2) {
            assert!(!pair[0].overlaps(pair[1]));
        }
        assert!(parts.iter().all(|p| s.covers(*p) && s.overlaps(*p)));
    }
    if let Ok(pool) = check_local_pool(text) {
        assert_eq!(pool, s);
        let mut ipam = Ipam::new(pool);
        let first = ipam.allocate().expect("a local pool has room for a task");
        assert!(pool.contains(first) && first != pool.gateway() && first != pool.broadcast());
        assert!(!ipam.reserve(first), "an allocated address is taken");
    }
}

/// `--default-addr-pool` lines after the mask length, then three networks
/// carved from them.
fn pools(mask_len: u8, text: &str) {
    let pools: Vec<String> = text.lines().map(str::to_string).collect();
    if check_address_pools(&pools, mask_len).is_err() {
        return;
    }
    let pools = Pools {
        pools: pools
            .iter()
            .map(|p| Subnet::parse(p).expect("an accepted pool parses"))
            .collect(),
        mask_len,
    };
    for (i, a) in pools.pools.iter().enumerate() {
        assert!(a.prefix <= mask_len);
        assert!(pools.pools[i + 1..].iter().all(|b| !a.overlaps(*b)));
    }
    let mut networks = Vec::new();
    for id in 0..3 {
        let spec = NetworkSpec {
            name: format!("n{id}"),
            ..NetworkSpec::default()
        };
        let existing: Vec<_> = networks.iter().collect();
        let Ok(network) = allocate_network(&spec, &existing, &pools, id, 0) else {
            break;
        };
        assert_eq!(network.subnet.prefix, mask_len);
        assert!(pools.pools.iter().any(|p| p.covers(network.subnet)));
        assert!(existing
            .iter()
            .all(|n| !n.subnet.overlaps(network.subnet) && n.vni != network.vni));
        networks.push(network);
    }
}

/// `network create --subnet S --gateway G --ip-range R` (a line each; an
/// empty line leaves it out).
fn network(text: &str) {
    let mut lines = text.split('\n');
    let mut field = || lines.next().filter(|l| !l.is_empty());
    let (subnet, gateway, ip_range) = (field(), field(), field());
    let spec = NetworkSpec {
        name: "net".into(),
        subnet: match subnet.map(Subnet::parse) {
            Some(Ok(s)) => Some(s),
            Some(Err(_)) => return,
            None => None,
        },
        gateway: match gateway.map(str::parse::<Ipv4Addr>) {
            Some(Ok(g)) => Some(g),
            Some(Err(_)) => return,
            None => None,
        },
        ip_range: match ip_range.map(Subnet::parse) {
            Some(Ok(r)) => Some(r),
            Some(Err(_)) => return,
            None => None,
        },
        ..NetworkSpec::default()
    };
    let pools = Pools {
        pools: vec![Subnet::parse("10.0.0.0/8").expect("reason: a valid pool")],
        mask_len: 24,
    };
    let Ok(n) = allocate_network(&spec, &[], &pools, 1, 0) else {
        return;
    };
    assert!(n.subnet.covers(n.ip_range), "{n:?}");
    assert!(n.subnet.contains(n.gateway) && n.gateway != n.subnet.base && n.gateway != n.subnet.broadcast());
    if let Some(a) = task_address(&n, &BTreeSet::new()) {
        assert!(n.ip_range.contains(a) && a != n.gateway && a != n.subnet.base && a != n.subnet.broadcast());
        assert_ne!(task_address(&n, &BTreeSet::from([a])), Some(a));
    }
}

fn addresses(text: &str) {
    if let Ok(addr) = parse_listen_addr(text) {
        assert_ne!(addr.port(), 0);
        assert_eq!(parse_listen_addr(&addr.to_string()), Ok(addr));
    }
    if let Ok(addr) = parse_advertise_addr(text, 2377) {
        assert!(addr.port() != 0 && !addr.ip().is_unspecified());
        assert_eq!(parse_advertise_addr(&addr.to_string(), 1), Ok(addr));
    }
    if let Ok(remote) = parse_remote_addr(text) {
        assert!(remote
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()));
        assert_eq!(parse_remote_addr(&remote), Ok(remote.clone()), "accepted as printed");
    }
    if let Ok(Some(addr)) = parse_addr(text) {
        assert_eq!(parse_addr(&addr.to_string()), Ok(Some::<SocketAddr>(addr)));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => subnet(text),
        1 => {
            if let Some((mask_len, pools_text)) = text.split_once('\n').and_then(|(m, p)| Some((m.parse().ok()?, p))) {
                pools(mask_len, pools_text)
            }
        }
        2 => network(text),
        _ => addresses(text),
    }
});
