//! `meshctl network`: overlay networks (`docker network` for the swarm scope).

use mesh_api::api::error::Invalid;
use std::{collections::BTreeMap, net::Ipv4Addr};

use clap::{Args, Subcommand};

use super::{json, table, Client, Format, ListArgs};
use crate::api::{
    error::{ApiError, ApiResult},
    messages::{ClusterRequest, ClusterResponse, NetworkView},
    network::{Encryption, NetworkSpec},
    objects::node_id_text,
    subnet::Subnet,
};

/// `network create` flags.
#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Only overlay networks span the swarm.
    #[arg(short, long, default_value = "overlay")]
    driver: String,
    /// Subnet in CIDR form (default: the next free one from the swarm's address pools).
    #[arg(long)]
    subnet: Option<String>,
    /// Gateway address inside the subnet (default: its first address).
    #[arg(long)]
    gateway: Option<String>,
    /// Hand task addresses out of this part of the subnet only.
    #[arg(long)]
    ip_range: Option<String>,
    /// Let one-off tasks (`meshctl run --network`) attach.
    #[arg(long)]
    attachable: bool,
    /// Driver options: encrypted[=wireguard|ipsec], mtu=N (repeatable).
    #[arg(short, long)]
    opt: Vec<String>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long)]
    label: Vec<String>,
    /// Network name.
    name: String,
}

/// `meshctl network`.
#[derive(Subcommand, Debug)]
pub(crate) enum NetworkCommand {
    /// Create an overlay network.
    Create(CreateArgs),
    /// List networks.
    Ls(ListArgs),
    /// Show networks in detail (JSON): subnet, VNI, peers, endpoints.
    Inspect {
        /// Names or IDs.
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while a service uses one).
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

/// The spec `network create`'s flags describe, or what is wrong with them.
pub(crate) fn spec_of(args: CreateArgs) -> Result<NetworkSpec, Invalid> {
    if args.driver != "overlay" {
        return Err(mesh_api::invalid!(
            "network driver {:?} is not supported: swarm networks use --driver overlay",
            args.driver
        ));
    }
    let subnet = args.subnet.as_deref().map(Subnet::parse).transpose()?;
    let ip_range = args
        .ip_range
        .as_deref()
        .map(|r| Subnet::parse(r).map_err(|e| format!("--ip-range: {e}")))
        .transpose()?;
    let gateway = args
        .gateway
        .as_deref()
        .map(|g| {
            g.parse::<Ipv4Addr>()
                .map_err(|_| format!("invalid --gateway {g:?}: expected an IPv4 address"))
        })
        .transpose()?;
    if subnet.is_none() && (gateway.is_some() || ip_range.is_some()) {
        return Err("--gateway and --ip-range need --subnet".into());
    }
    let mut spec = NetworkSpec {
        name: args.name,
        subnet,
        gateway,
        ip_range,
        attachable: args.attachable,
        ..NetworkSpec::default()
    };
    for opt in &args.opt {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (opt.trim(), None),
        };
        match (key, value) {
            ("encrypted", None | Some("" | "wireguard" | "true")) => spec.encryption = Encryption::WireGuard,
            ("encrypted", Some("ipsec")) => spec.encryption = Encryption::Ipsec,
            ("encrypted", Some(other)) => {
                return Err(mesh_api::invalid!(
                    "invalid --opt encrypted={other}: use wireguard or ipsec"
                ))
            }
            ("mtu", Some(n)) => {
                spec.mtu = Some(
                    n.parse()
                        .map_err(|_| format!("invalid --opt mtu={n}: expected a number"))?,
                )
            }
            _ => {
                return Err(mesh_api::invalid!(
                    "unknown --opt {opt:?}: overlay networks take encrypted[=wireguard|ipsec] and mtu=N"
                ))
            }
        }
    }
    spec.labels = args
        .label
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(mesh_api::invalid!("invalid --label {l:?}: expected KEY=VALUE")),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    Ok(spec)
}

pub(crate) fn networks(reply: ClusterResponse) -> ApiResult<Vec<NetworkView>> {
    match reply {
        ClusterResponse::Networks(n) => Ok(n),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// The `network ls` table.
pub(crate) fn network_table(list: &[NetworkView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            vec![
                node_id_text(v.network.id),
                v.network.name.clone(),
                "overlay".into(),
                "swarm".into(),
            ]
        })
        .collect();
    table::render(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"], &rows)
}

/// Runs a `network` subcommand.
pub(crate) async fn run(client: &Client, cmd: NetworkCommand) -> ApiResult<()> {
    match cmd {
        NetworkCommand::Create(args) => {
            let spec = spec_of(args).map_err(ApiError::invalid)?;
            match client
                .cluster(ClusterRequest::NetworkCreate { spec: Box::new(spec) })
                .await?
            {
                ClusterResponse::NetworkCreated { id } => {
                    println!("{}", node_id_text(id));
                    Ok(())
                }
                other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            }
        }
        NetworkCommand::Ls(ListArgs { quiet, format }) => {
            let list = networks(client.cluster(ClusterRequest::NetworkList).await?)?;
            if quiet {
                list.iter().for_each(|v| println!("{}", node_id_text(v.network.id)));
            } else if format == Format::Json {
                println!("{}", json(&list)?);
            } else {
                print!("{}", network_table(&list));
            }
            Ok(())
        }
        NetworkCommand::Inspect { networks: names } => {
            let mut out = Vec::new();
            for network in names {
                out.extend(networks(
                    client.cluster(ClusterRequest::NetworkInspect { network }).await?,
                )?);
            }
            println!("{}", json(&out)?);
            Ok(())
        }
        NetworkCommand::Rm { networks: names } => {
            for network in names {
                client
                    .cluster(ClusterRequest::NetworkRemove {
                        network: network.clone(),
                    })
                    .await?;
                println!("{network}");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: NetworkCommand,
    }

    fn create(args: &[&str]) -> Result<NetworkSpec, Invalid> {
        let mut full = vec!["meshctl", "create"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full).map_err(|e| e.to_string())?.cmd {
            NetworkCommand::Create(a) => spec_of(a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn create_flags_become_a_spec() {
        let s = create(&[
            "--subnet",
            "10.5.0.0/24",
            "--gateway",
            "10.5.0.254",
            "--ip-range",
            "10.5.0.128/25",
            "--attachable",
            "--opt",
            "encrypted",
            "--opt",
            "mtu=1400",
            "--label",
            "team=a",
            "app",
        ])
        .unwrap();
        assert_eq!(s.subnet.unwrap().to_string(), "10.5.0.0/24");
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 5, 0, 254)));
        assert_eq!(s.encryption, Encryption::WireGuard);
        assert_eq!(s.mtu, Some(1400));
        assert!(s.attachable);
        assert_eq!(
            create(&["-o", "encrypted=ipsec", "x"]).unwrap().encryption,
            Encryption::Ipsec
        );
        assert_eq!(create(&["x"]).unwrap().encryption, Encryption::None);
        for (args, why) in [
            (&["--driver", "bridge", "x"][..], "not supported"),
            (&["--subnet", "10.5.0.1/24", "x"][..], "host bits"),
            (&["--gateway", "10.5.0.1", "x"][..], "need --subnet"),
            (&["--opt", "encrypted=rot13", "x"][..], "wireguard or ipsec"),
            (&["--opt", "mtu=big", "x"][..], "expected a number"),
            (&["--opt", "color=red", "x"][..], "unknown --opt"),
        ] {
            let err = create(args).unwrap_err();
            assert!(err.contains(why), "{args:?}: {err}");
        }
    }
}
