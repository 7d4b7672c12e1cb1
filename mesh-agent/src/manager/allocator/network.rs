//! The allocator that gives each overlay network a subnet, a gateway and a VXLAN network identifier, and
//! each task an address on it (pure; the leader runs it, Raft keeps the
//! result, so every node sees the same numbers).

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::api::error::{ApiError, ApiResult, Invalid};
use crate::api::network::{check_network_name, Network, NetworkSpec, FIRST_VNI, MAX_VNI, MTU_RANGE};
use crate::api::subnet::Subnet;

/// Where new networks' subnets come from: the cluster's pools, each cut
/// into subnets of `mask_len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pools {
    /// `--default-addr-pool`.
    pub pools: Vec<Subnet>,
    /// `--default-addr-pool-mask-length`.
    pub mask_len: u8,
}

/// Turns `spec` into a network with everything allocated, or says what is
/// wrong: a name in use conflicts with the cluster's state, anything else
/// is bad input. `existing` are the networks already stored.
pub fn allocate_network(
    spec: &NetworkSpec,
    existing: &[&Network],
    pools: &Pools,
    id: u64,
    now: u64,
) -> ApiResult<Network> {
    if existing.iter().any(|n| n.name == spec.name) {
        return Err(ApiError::precondition(format!("network {} already exists", spec.name)));
    }
    Ok(allocate(spec, existing, pools, id, now)?)
}

fn allocate(spec: &NetworkSpec, existing: &[&Network], pools: &Pools, id: u64, now: u64) -> Result<Network, Invalid> {
    check_network_name(&spec.name)?;
    let subnet = match spec.subnet {
        Some(subnet) => {
            if !(8..=29).contains(&subnet.prefix) {
                return Err(crate::invalid!(
                    "--subnet {subnet}: the prefix length must be 8 to 29 (room for a gateway and tasks)"
                ));
            }
            if let Some(other) = existing.iter().find(|n| n.subnet.overlaps(subnet)) {
                return Err(crate::invalid!(
                    "--subnet {subnet} overlaps network {} ({}); choose another subnet",
                    other.name, other.subnet
                ));
            }
            subnet
        }
        None => free_subnet(pools, existing).ok_or_else(|| {
            let names: Vec<String> = pools.pools.iter().map(ToString::to_string).collect();
            crate::invalid!(
                "the default address pools ({}) have no free /{} left: remove unused networks, give --subnet, or create the swarm with a larger --default-addr-pool",
                names.join(", "),
                pools.mask_len
            )
        })?,
    };
    let ip_range = match spec.ip_range {
        Some(range) if !subnet.covers(range) => {
            return Err(crate::invalid!("--ip-range {range} is not inside --subnet {subnet}"))
        }
        Some(range) => range,
        None => subnet,
    };
    let gateway = match spec.gateway {
        Some(g) if !subnet.contains(g) => return Err(crate::invalid!("--gateway {g} is outside --subnet {subnet}")),
        Some(g) if g == subnet.base || g == subnet.broadcast() => {
            return Err(crate::invalid!(
                "--gateway {g} is the network or broadcast address of {subnet}"
            ))
        }
        Some(g) => g,
        None => subnet.gateway(),
    };
    if let Some(mtu) = spec.mtu {
        if !MTU_RANGE.contains(&mtu) {
            return Err(crate::invalid!(
                "--opt mtu={mtu} is out of range: use {} to {}",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            ));
        }
    }
    let taken: BTreeSet<u32> = existing.iter().map(|n| n.vni).collect();
    let vni = (FIRST_VNI..=MAX_VNI)
        .find(|v| !taken.contains(v))
        .ok_or("every VXLAN network identifier is in use")?;
    Ok(Network {
        id,
        name: spec.name.clone(),
        subnet,
        gateway,
        ip_range,
        vni,
        attachable: spec.attachable,
        encryption: spec.encryption,
        mtu: spec.mtu,
        labels: spec.labels.clone(),
        created_at: now,
    })
}

/// The first subnet of the pools' size that no network overlaps.
fn free_subnet(pools: &Pools, existing: &[&Network]) -> Option<Subnet> {
    pools
        .pools
        .iter()
        .flat_map(|p| p.split(pools.mask_len))
        .find(|candidate| existing.iter().all(|n| !n.subnet.overlaps(*candidate)))
}

/// The lowest address of `network`'s range that is neither its gateway,
/// nor its network or broadcast address, nor in `used`.
pub fn task_address(network: &Network, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let range = network.ip_range;
    (u32::from(range.base)..=u32::from(range.broadcast()))
        .map(Ipv4Addr::from)
        .find(|a| {
            *a != network.subnet.base && *a != network.subnet.broadcast() && *a != network.gateway && !used.contains(a)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(text: &[&str], mask_len: u8) -> Pools {
        Pools {
            pools: text.iter().map(|p| Subnet::parse(p).unwrap()).collect(),
            mask_len,
        }
    }

    fn spec(name: &str) -> NetworkSpec {
        NetworkSpec {
            name: name.into(),
            ..NetworkSpec::default()
        }
    }

    #[test]
    fn subnets_and_vnis_are_carved_in_order_and_never_shared() {
        let pools = pools(&["10.0.0.0/23"], 24);
        let a = allocate_network(&spec("a"), &[], &pools, 1, 0).unwrap();
        assert_eq!(
            (a.subnet.to_string(), a.gateway, a.vni),
            ("10.0.0.0/24".into(), Ipv4Addr::new(10, 0, 0, 1), FIRST_VNI)
        );
        let b = allocate_network(&spec("b"), &[&a], &pools, 2, 0).unwrap();
        assert_eq!((b.subnet.to_string(), b.vni), ("10.0.1.0/24".into(), FIRST_VNI + 1));
        let err = allocate_network(&spec("c"), &[&a, &b], &pools, 3, 0)
            .unwrap_err()
            .message;
        assert!(err.contains("no free /24") && err.contains("10.0.0.0/23"), "{err}");
        // A given subnet outside the pools is fine; inside a taken one is not.
        let mut own = spec("c");
        own.subnet = Some(Subnet::parse("192.168.5.0/24").unwrap());
        let c = allocate_network(&own, &[&a, &b], &pools, 3, 0).unwrap();
        assert_eq!(c.vni, FIRST_VNI + 2);
        own.name = "d".into();
        own.subnet = Some(Subnet::parse("10.0.0.0/16").unwrap());
        let err = allocate_network(&own, &[&a, &b, &c], &pools, 4, 0).unwrap_err().message;
        assert!(err.contains("overlaps network a"), "{err}");
        // Removing a network frees its subnet and VNI for the next one.
        let d = allocate_network(&spec("d"), &[&b, &c], &pools, 4, 0).unwrap();
        assert_eq!((d.subnet, d.vni), (a.subnet, a.vni));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let pools = pools(&["10.0.0.0/8"], 24);
        let a = allocate_network(&spec("a"), &[], &pools, 1, 0).unwrap();
        let cases: Vec<(NetworkSpec, &str)> = vec![
            (spec("a"), "already exists"),
            (spec("bad name"), "invalid network name"),
            (
                NetworkSpec {
                    subnet: Some(Subnet::parse("172.20.0.0/24").unwrap()),
                    gateway: Some(Ipv4Addr::new(172, 21, 0, 1)),
                    ..spec("g")
                },
                "outside --subnet",
            ),
            (
                NetworkSpec {
                    subnet: Some(Subnet::parse("172.20.0.0/24").unwrap()),
                    gateway: Some(Ipv4Addr::new(172, 20, 0, 255)),
                    ..spec("g")
                },
                "broadcast",
            ),
            (
                NetworkSpec {
                    subnet: Some(Subnet::parse("172.20.0.0/24").unwrap()),
                    ip_range: Some(Subnet::parse("172.20.1.0/25").unwrap()),
                    ..spec("r")
                },
                "not inside --subnet",
            ),
            (
                NetworkSpec {
                    subnet: Some(Subnet::parse("172.20.0.0/30").unwrap()),
                    ..spec("s")
                },
                "8 to 29",
            ),
            (
                NetworkSpec {
                    mtu: Some(100),
                    ..spec("m")
                },
                "mtu=100 is out of range",
            ),
        ];
        for (s, why) in cases {
            let err = allocate_network(&s, &[&a], &pools, 2, 0).unwrap_err().message;
            assert!(err.contains(why), "{s:?}: {err}");
        }
    }

    #[test]
    fn task_addresses_skip_the_gateway_and_stay_in_the_range() {
        let mut s = spec("a");
        s.subnet = Some(Subnet::parse("10.9.0.0/24").unwrap());
        s.ip_range = Some(Subnet::parse("10.9.0.0/30").unwrap());
        let net = allocate_network(&s, &[], &pools(&["10.0.0.0/8"], 24), 1, 0).unwrap();
        let mut used = BTreeSet::new();
        let first = task_address(&net, &used).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 9, 0, 2), "not .0 (network) nor .1 (gateway)");
        used.insert(first);
        assert_eq!(task_address(&net, &used), Some(Ipv4Addr::new(10, 9, 0, 3)));
        used.insert(Ipv4Addr::new(10, 9, 0, 3));
        assert_eq!(task_address(&net, &used), None, "the range is full");
    }
}
