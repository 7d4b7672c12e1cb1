//! A cluster of hosts, each a network namespace with one veth (`eth0`) into
//! an underlay bridge that lives in a namespace of its own:
//!
//! ```text
//!  [host 0: eth0 192.0.2.1/24]   [host 1: eth0 192.0.2.2/24]  ...
//!            |                              |
//!  [underlay: u0 ------------- br0 ------------- u1 ...]
//! ```
//!
//! Namespace names are `meshtest-<pid>-<n>-<role>`, unique per cluster and
//! per process, so tests run in parallel; a cluster whose process died is
//! removed by the next [`Cluster::new`] on the machine.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use mesh_agent::{
    agent::net::netns::{NetNs, NetnsError},
    dataplane::netlink::{Netlink, NetlinkError},
};

use crate::process::Process;

/// Prefix of every namespace the harness creates.
pub const PREFIX: &str = "meshtest-";

/// The underlay subnet: TEST-NET-1 (RFC 5737), never routed anywhere.
pub const UNDERLAY_PREFIX: u8 = 24;
const UNDERLAY_NET: [u8; 3] = [192, 0, 2];
/// Host interface facing the underlay, inside every host namespace.
pub const HOST_LINK: &str = "eth0";
/// The underlay bridge, inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// Errors building or driving a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("a cluster has 1 to 250 hosts, not {0}")]
    Size(usize),
    #[error("cannot run `{command}` in host {host}: {source}")]
    Spawn {
        host: String,
        command: String,
        source: std::io::Error,
    },
}

/// One host: a network namespace with `lo` and `eth0` up.
#[derive(Debug)]
pub struct Host {
    index: usize,
    ns: NetNs,
    address: Ipv4Addr,
}

impl Host {
    /// Position in the cluster, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The host's underlay address (on `eth0`).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Runs `f` on a thread inside the host's namespace. Sockets created in
    /// `f` stay in that namespace wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns
            .run(f)
            .expect("reason: entering a namespace this cluster created succeeds")
    }

    /// Starts `command` inside the host's namespace; the returned
    /// [`Process`] is killed when dropped.
    pub fn spawn(&self, command: Command) -> Result<Process, ClusterError> {
        Process::spawn_in(&self.ns, command).map_err(|source| self.spawn_error(source))
    }

    /// Runs the tool `program` (`ip`, `nft`, ...) with `args` (split at
    /// spaces) inside the host, to set up or observe the test's own hosts:
    /// its standard output. Panics, with its errors, if it fails.
    pub fn tool(&self, program: &str, args: &str) -> String {
        let mut command = Command::new(program);
        command.args(args.split_whitespace());
        let out = self
            .output(command, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{program} {args}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `command` inside the host to completion, killing it after
    /// `timeout`.
    pub fn output(&self, command: Command, timeout: Duration) -> Result<Output, ClusterError> {
        Process::output_in(&self.ns, command, timeout).map_err(|source| self.spawn_error(source))
    }

    fn spawn_error(&self, source: crate::process::ProcessError) -> ClusterError {
        ClusterError::Spawn {
            host: self.ns.name().to_owned(),
            command: source.command,
            source: source.source,
        }
    }
}

/// N hosts on one underlay bridge, all removed on drop.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    underlay: NetNs,
    hosts: Vec<Host>,
}

impl Cluster {
    /// Builds `hosts` hosts on a fresh underlay; removes first what crashed
    /// runs left behind.
    pub fn new(hosts: usize) -> Result<Cluster, ClusterError> {
        if hosts == 0 || hosts > 250 {
            return Err(ClusterError::Size(hosts));
        }
        remove_stale();
        let prefix = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        );
        let underlay = NetNs::create(&format!("{prefix}-ul"))?;
        // From here on, Drop removes whatever was made if a step fails.
        let mut cluster = Cluster {
            prefix,
            underlay,
            hosts: Vec::new(),
        };
        cluster.build_underlay()?;
        for index in 0..hosts {
            cluster.add_host(index)?;
        }
        Ok(cluster)
    }

    /// The hosts, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The namespace holding the underlay bridge.
    pub fn underlay(&self) -> &NetNs {
        &self.underlay
    }

    /// Cuts host `i` off the underlay (its bridge port goes down).
    pub fn partition(&self, i: usize) -> Result<(), ClusterError> {
        let port = underlay_port(i);
        self.in_underlay(|nl| async move { nl.set_down(&port).await })
    }

    /// Reconnects host `i` after [`Self::partition`].
    pub fn heal(&self, i: usize) -> Result<(), ClusterError> {
        let port = underlay_port(i);
        self.in_underlay(|nl| async move { nl.set_up(&port).await })
    }

    fn build_underlay(&self) -> Result<(), ClusterError> {
        self.in_underlay(|nl| async move {
            nl.set_up("lo").await?;
            nl.add_bridge(UNDERLAY_BRIDGE).await?;
            nl.set_up(UNDERLAY_BRIDGE).await
        })
    }

    fn add_host(&mut self, index: usize) -> Result<(), ClusterError> {
        let ns = NetNs::create(&format!("{}-h{index}", self.prefix))?;
        let address = host_address(index);
        let port = underlay_port(index);
        self.in_underlay(|nl| {
            let fd = ns.fd();
            async move {
                nl.add_veth(&port, HOST_LINK, Some(fd), None, None).await?;
                nl.set_controller(&port, UNDERLAY_BRIDGE).await?;
                nl.set_up(&port).await
            }
        })?;
        ns.run(|| {
            Netlink::run(|nl| async move {
                nl.set_up("lo").await?;
                nl.add_address(HOST_LINK, IpAddr::V4(address), UNDERLAY_PREFIX).await?;
                nl.set_up(HOST_LINK).await
            })
        })??;
        self.hosts.push(Host { index, ns, address });
        Ok(())
    }

    fn in_underlay<F, Fut>(&self, work: F) -> Result<(), ClusterError>
    where
        F: FnOnce(Netlink) -> Fut + Send,
        Fut: std::future::Future<Output = Result<(), NetlinkError>>,
    {
        Ok(self.underlay.run(|| Netlink::run(work))??)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Hosts first, then the underlay; deleting a namespace removes its links.
        for host in self.hosts.drain(..) {
            let name = host.ns.name().to_owned();
            drop(host);
            report(NetNs::delete(&name));
        }
        report(NetNs::delete(self.underlay.name()));
    }
}

fn report(result: Result<(), NetnsError>) {
    match result {
        Ok(()) | Err(NetnsError::NotFound(_)) => {}
        Err(e) => eprintln!("warning: cluster cleanup: {e}"),
    }
}

/// The underlay address of host `index` (192.0.2.1 for host 0).
pub fn host_address(index: usize) -> Ipv4Addr {
    let last = u8::try_from(index + 1).expect("reason: Cluster::new caps hosts at 250");
    Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], last)
}

/// Name of host `index`'s bridge port in the underlay namespace.
fn underlay_port(index: usize) -> String {
    format!("u{index}")
}

/// Deletes harness namespaces whose creating process no longer exists.
pub fn remove_stale() {
    let Ok(names) = NetNs::list() else { return };
    for name in names {
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            eprintln!("removing stale test namespace {name} (its process is gone)");
            report(NetNs::delete(&name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_are_in_test_net_1() {
        assert_eq!(host_address(0), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(host_address(249), Ipv4Addr::new(192, 0, 2, 250));
    }

    #[test]
    fn cluster_size_is_checked_before_anything_is_made() {
        assert!(matches!(Cluster::new(0), Err(ClusterError::Size(0))));
        assert!(matches!(Cluster::new(251), Err(ClusterError::Size(251))));
    }
}
