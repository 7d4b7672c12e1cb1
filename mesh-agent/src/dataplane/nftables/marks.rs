//! The firewall half of the IPVS routing mesh (`--lb-backend ipvs`), in
//! its own table: a published port's packets get a firewall mark that
//! names the IPVS virtual service taking them, and what that service
//! sends on to another node leaves with this node's address.
//!
//! ```text
//! table ip mesh-ipvs {
//!   set peers { type ipv4_addr; elements = { OTHER NODES } }
//!   chain prerouting { type filter hook prerouting priority mangle;
//!     # per port; ingress mode:
//!     ip daddr NODE tcp dport 8080 ip saddr @peers meta mark set LOCAL accept
//!     ip daddr NODE tcp dport 8080 meta mark set CLUSTER
//!     # host mode: only LOCAL, whoever sends }
//!   chain postrouting { type nat hook postrouting priority srcnat;
//!     meta mark & MASK == CLUSTER_BITS ip daddr @peers snat to NODE }
//! }
//! ```
//!
//! A connection another node passes on is served by this node's own
//! tasks only (LOCAL), so no connection bounces between nodes.

use std::net::Ipv4Addr;

use super::*;

/// The table (family ip).
pub const IPVS_TABLE: &str = "mesh-ipvs";
const PEERS_SET: &str = "peers";
const PEERS_SET_ID: u32 = 1;
/// Elements per set-element message, so no message grows with the cluster
/// past what one netlink message comfortably carries.
const ELEMENTS_PER_MESSAGE: usize = 512;

const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
/// nft's type number for ipv4_addr (so `nft list` shows addresses).
const TYPE_IPADDR: u32 = 7;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_META_SREG: u16 = 3;
const NFT_META_MARK: u32 = 3;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFT_NAT_SNAT: u32 = 0;
const NF_INET_PRE_ROUTING: u32 = 0;
/// NF_IP_PRI_MANGLE: `nft`'s `mangle` priority.
const PRIORITY_MANGLE: i32 = -150;
const IPV4_DADDR_OFFSET: u32 = 16;

/// One published port as the firewall marks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkedPort {
    /// 6 TCP, 17 UDP.
    pub protocol: u8,
    pub port: u16,
    /// The mark of connections from clients (ingress mode: the service
    /// spreading over the whole swarm); `None` in host mode, where every
    /// connection gets `local`.
    pub clients: Option<u32>,
    /// The mark of connections other nodes pass on (the service of this
    /// node's own tasks).
    pub local: u32,
}

/// Everything in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMarks {
    /// This node's data-path address: the published ports answer on it,
    /// and what goes on to other nodes leaves from it.
    pub node: Ipv4Addr,
    /// The other nodes' data-path addresses.
    pub peers: Vec<Ipv4Addr>,
    pub ports: Vec<MarkedPort>,
    /// Connections whose `mark & snat_mask == snat_bits` going to a peer
    /// leave with `node` as their source.
    pub snat_mask: u32,
    pub snat_bits: u32,
}

fn in_peers() -> Attrs {
    expression(
        "lookup",
        Some(
            Attrs::default()
                .str(NFTA_LOOKUP_SET, PEERS_SET)
                .be32(NFTA_LOOKUP_SREG, NFT_REG_1)
                .be32(NFTA_LOOKUP_SET_ID, PEERS_SET_ID),
        ),
    )
}

fn set_register(value: &[u8]) -> Attrs {
    expression(
        "immediate",
        Some(
            Attrs::default()
                .be32(NFTA_IMMEDIATE_DREG, NFT_REG_1)
                .data(NFTA_IMMEDIATE_DATA, value),
        ),
    )
}

/// `meta mark set MARK` (marks are host-endian in nf_tables registers).
fn set_mark(mark: u32) -> Vec<Attrs> {
    vec![
        set_register(&mark.to_ne_bytes()),
        expression(
            "meta",
            Some(
                Attrs::default()
                    .be32(NFTA_META_KEY, NFT_META_MARK)
                    .be32(NFTA_META_SREG, NFT_REG_1),
            ),
        ),
    ]
}

fn accept() -> Attrs {
    expression(
        "immediate",
        Some(Attrs::default().be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT).nested(
            NFTA_IMMEDIATE_DATA,
            Attrs::default().nested(NFTA_DATA_VERDICT, Attrs::default().be32(NFTA_VERDICT_CODE, NF_ACCEPT)),
        )),
    )
}

/// `ip daddr NODE meta l4proto P th dport PORT`.
fn port_match(node: Ipv4Addr, port: &MarkedPort) -> Vec<Attrs> {
    vec![
        load(NFT_PAYLOAD_NETWORK_HEADER, IPV4_DADDR_OFFSET, 4),
        equals(&node.octets()),
        meta_load(NFT_META_L4PROTO),
        equals(&[port.protocol]),
        load(NFT_PAYLOAD_TRANSPORT_HEADER, TRANSPORT_DPORT_OFFSET, 2),
        equals(&port.port.to_be_bytes()),
    ]
}

/// The prerouting rules, in order.
fn mark_rules(marks: &IpvsMarks) -> Vec<Attrs> {
    let mut rules = Vec::new();
    for port in &marks.ports {
        match port.clients {
            Some(clients) => {
                let mut from_peer = port_match(marks.node, port);
                from_peer.push(load(NFT_PAYLOAD_NETWORK_HEADER, IPV4_SADDR_OFFSET, 4));
                from_peer.push(in_peers());
                from_peer.extend(set_mark(port.local));
                from_peer.push(accept());
                rules.push(joined(from_peer));
                let mut from_client = port_match(marks.node, port);
                from_client.extend(set_mark(clients));
                rules.push(joined(from_client));
            }
            None => {
                let mut any = port_match(marks.node, port);
                any.extend(set_mark(port.local));
                rules.push(joined(any));
            }
        }
    }
    rules
}

fn snat_rule(marks: &IpvsMarks) -> Attrs {
    joined(vec![
        meta_load(NFT_META_MARK),
        mask(&marks.snat_mask.to_ne_bytes()),
        equals(&marks.snat_bits.to_ne_bytes()),
        load(NFT_PAYLOAD_NETWORK_HEADER, IPV4_DADDR_OFFSET, 4),
        in_peers(),
        set_register(&marks.node.octets()),
        expression(
            "nat",
            Some(
                Attrs::default()
                    .be32(NFTA_NAT_TYPE, NFT_NAT_SNAT)
                    .be32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4))
                    .be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1),
            ),
        ),
    ])
}

impl Batch {
    fn base_chain(&mut self, name: &str, kind: &str, hook: u32, priority: i32, what: &'static str) {
        let hook = Attrs::default()
            .be32(NFTA_HOOK_HOOKNUM, hook)
            .be32(NFTA_HOOK_PRIORITY, priority as u32);
        let chain = Attrs::default()
            .str(NFTA_CHAIN_TABLE, IPVS_TABLE)
            .str(NFTA_CHAIN_NAME, name)
            .nested(NFTA_CHAIN_HOOK, hook)
            .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, kind);
        self.message(
            NFT_MSG_NEWCHAIN,
            NFPROTO_IPV4,
            NLM_F_REQUEST | NLM_F_CREATE,
            &chain.0,
            Some(what),
        );
    }

    fn rule(&mut self, chain: &str, expressions: Attrs, what: &'static str) {
        let rule = Attrs::default()
            .str(NFTA_RULE_TABLE, IPVS_TABLE)
            .str(NFTA_RULE_CHAIN, chain)
            .raw(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, &expressions.0);
        self.message(
            NFT_MSG_NEWRULE,
            NFPROTO_IPV4,
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND,
            &rule.0,
            Some(what),
        );
    }
}

/// Replaces the table with one holding `marks`, in one batch (created if
/// missing, deleted and made anew), so nothing an earlier agent left
/// stays and no packet sees half of it.
pub fn ipvs_marks_batch(marks: &IpvsMarks) -> Batch {
    let mut b = Batch::new();
    b.table(NFT_MSG_NEWTABLE, NFPROTO_IPV4, IPVS_TABLE, "the IPVS mark table");
    b.table(NFT_MSG_DELTABLE, NFPROTO_IPV4, IPVS_TABLE, "the old IPVS mark table");
    b.table(NFT_MSG_NEWTABLE, NFPROTO_IPV4, IPVS_TABLE, "the IPVS mark table");
    let set = Attrs::default()
        .str(NFTA_SET_TABLE, IPVS_TABLE)
        .str(NFTA_SET_NAME, PEERS_SET)
        .be32(NFTA_SET_KEY_TYPE, TYPE_IPADDR)
        .be32(NFTA_SET_KEY_LEN, 4)
        .be32(NFTA_SET_ID, PEERS_SET_ID);
    b.message(
        NFT_MSG_NEWSET,
        NFPROTO_IPV4,
        NLM_F_REQUEST | NLM_F_CREATE,
        &set.0,
        Some("the set of peers"),
    );
    for chunk in marks.peers.chunks(ELEMENTS_PER_MESSAGE) {
        let mut elements = Attrs::default();
        for peer in chunk {
            let key = Attrs::default().data(NFTA_SET_ELEM_KEY, &peer.octets());
            elements = elements.nested(NFTA_LIST_ELEM, key);
        }
        let list = Attrs::default()
            .str(NFTA_SET_ELEM_LIST_TABLE, IPVS_TABLE)
            .str(NFTA_SET_ELEM_LIST_SET, PEERS_SET)
            .be32(NFTA_SET_ELEM_LIST_SET_ID, PEERS_SET_ID)
            .nested(NFTA_SET_ELEM_LIST_ELEMENTS, elements);
        b.message(
            NFT_MSG_NEWSETELEM,
            NFPROTO_IPV4,
            NLM_F_REQUEST | NLM_F_CREATE,
            &list.0,
            Some("the peers"),
        );
    }
    b.base_chain(
        "prerouting",
        "filter",
        NF_INET_PRE_ROUTING,
        PRIORITY_MANGLE,
        "the marking chain",
    );
    for rule in mark_rules(marks) {
        b.rule("prerouting", rule, "a published port's marking rule");
    }
    b.base_chain(
        "postrouting",
        "nat",
        NF_INET_POST_ROUTING,
        PRIORITY_SRCNAT,
        "the IPVS nat chain",
    );
    b.rule(
        "postrouting",
        snat_rule(marks),
        "the rule for connections passed to other nodes",
    );
    b.end()
}

/// Deletes the table if it exists.
pub fn remove_ipvs_marks_batch() -> Batch {
    remove_table_batch(NFPROTO_IPV4, IPVS_TABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(peers: usize) -> IpvsMarks {
        IpvsMarks {
            node: Ipv4Addr::new(192, 0, 2, 1),
            peers: (0..peers).map(|i| Ipv4Addr::from(0x0a00_0000 + i as u32)).collect(),
            ports: vec![
                MarkedPort {
                    protocol: 6,
                    port: 8080,
                    clients: Some(0x6d00_1f90),
                    local: 0x6d02_1f90,
                },
                MarkedPort {
                    protocol: 17,
                    port: 53,
                    clients: None,
                    local: 0x6d03_0035,
                },
            ],
            snat_mask: 0xff02_0000,
            snat_bits: 0x6d00_0000,
        }
    }

    /// Message types (low byte) of a batch, markers included.
    fn kinds(batch: &Batch) -> Vec<u16> {
        let mut out = Vec::new();
        let mut rest = batch.bytes();
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            out.push(u16::from_ne_bytes(rest[4..6].try_into().unwrap()) & 0xff);
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn an_ingress_port_has_a_rule_for_peers_and_one_for_clients_a_host_port_one() {
        let batch = ipvs_marks_batch(&marks(3));
        let k = kinds(&batch);
        let count = |m: u16| k.iter().filter(|x| **x == m).count();
        assert_eq!(count(NFT_MSG_NEWRULE), 3 + 1, "2 + 1 marking rules and the snat rule");
        assert_eq!(count(NFT_MSG_NEWSETELEM), 1);
        assert_eq!(count(NFT_MSG_NEWCHAIN), 2);
        let bytes = batch.bytes();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(&0x6d00_1f90u32.to_ne_bytes()), "the clients' mark");
        assert!(has(&0x6d02_1f90u32.to_ne_bytes()), "the peers' mark");
        assert!(has(&8080u16.to_be_bytes()));
        assert!(has(b"lookup\0"));
        assert!(has(b"nat\0"));
        assert!(has(&[10, 0, 0, 2]), "a peer");
    }

    #[test]
    fn a_large_peer_set_is_split_over_messages() {
        let batch = ipvs_marks_batch(&marks(2000));
        let elements = kinds(&batch).iter().filter(|k| **k == NFT_MSG_NEWSETELEM).count();
        assert_eq!(elements, 4);
        let none = ipvs_marks_batch(&marks(0));
        assert_eq!(kinds(&none).iter().filter(|k| **k == NFT_MSG_NEWSETELEM).count(), 0);
    }
}
