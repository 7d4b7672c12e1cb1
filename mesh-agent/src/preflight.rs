//! `mesh-agent check`: what this node's kernel offers the dataplane.
//!
//! Facts are gathered from /proc and /sys and by loading the eBPF programs
//! ([`gather`]); what they mean for mesh is a pure function ([`assess`]).

use std::path::Path;

use crate::{
    agent::tasks::cgroup::{Layout, CONTROLLERS},
    dataplane::ebpf::{self, EbpfDataplane, TcApi},
};

/// What the node's kernel has, as read from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    /// `uname -r`.
    pub(crate) release: String,
    /// The programs loaded, or the loader's error.
    pub(crate) ebpf: Result<Vec<String>, String>,
    pub(crate) tc_api: TcApi,
    /// Whether each kernel module is built in or loaded (from /sys/module).
    pub(crate) ip_vs: bool,
    pub(crate) wireguard: bool,
    pub(crate) esp4: bool,
    /// Where the controllers task limits use are.
    pub(crate) cgroups: Layout,
}

/// How a finding affects the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Ok,
    /// A feature mesh falls back from (e.g. userspace WireGuard).
    Degraded,
    /// The node cannot run the dataplane.
    Fatal,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub what: String,
}

/// Reads the facts from the running kernel (loads and unloads the eBPF
/// programs; needs root for that).
pub fn gather() -> KernelFacts {
    let module = |name: &str| Path::new("/sys/module").join(name).exists();
    KernelFacts {
        release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into()),
        ebpf: EbpfDataplane::load()
            .map(|d| d.program_names())
            .map_err(|e| e.to_string()),
        tc_api: ebpf::preferred_tc_api(),
        ip_vs: module("ip_vs") || Path::new("/proc/net/ip_vs").exists(),
        wireguard: module("wireguard"),
        esp4: module("esp4"),
        cgroups: Layout::read(),
    }
}

/// What the facts mean for mesh on this node.
pub fn assess(facts: &KernelFacts) -> Vec<Finding> {
    let finding = |severity, what: String| Finding { severity, what };
    let mut out = vec![finding(Severity::Ok, format!("kernel {}", facts.release))];
    out.push(match &facts.ebpf {
        Ok(programs) => finding(
            Severity::Ok,
            format!("eBPF programs pass the verifier: {}", programs.join(", ")),
        ),
        Err(e) => finding(Severity::Fatal, format!("eBPF programs cannot load: {e}")),
    });
    out.push(match facts.tc_api {
        TcApi::Tcx => finding(Severity::Ok, "TC programs attach through tcx links".into()),
        TcApi::Clsact => finding(
            Severity::Ok,
            "TC programs attach under the clsact qdisc (kernel < 6.6)".into(),
        ),
    });
    let module = |present: bool, name: &str, without: &str| {
        if present {
            finding(Severity::Ok, format!("{name} available"))
        } else {
            finding(
                Severity::Degraded,
                format!("{name} not loaded: {without} (modprobe it if the kernel has it)"),
            )
        }
    };
    out.push(module(
        facts.ip_vs,
        "IPVS (ip_vs)",
        "the IPVS load-balancing backend is unavailable; eBPF is used",
    ));
    out.push(module(
        facts.wireguard,
        "kernel WireGuard",
        "encrypted overlays use userspace WireGuard (boringtun)",
    ));
    out.push(module(
        facts.esp4,
        "IPsec ESP (esp4)",
        "`encrypted=ipsec` overlays are unavailable",
    ));
    for (controller, line) in CONTROLLERS.iter().zip(facts.cgroups.describe()) {
        let severity = if facts.cgroups.controllers.contains_key(controller) {
            Severity::Ok
        } else {
            Severity::Degraded
        };
        out.push(finding(severity, format!("task limits, {line}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> KernelFacts {
        KernelFacts {
            release: "6.18.0".into(),
            ebpf: Ok(vec!["tc_count".into(), "xdp_count".into()]),
            tc_api: TcApi::Tcx,
            ip_vs: true,
            wireguard: true,
            esp4: true,
            cgroups: Layout::parse(
                "31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw",
                "0::/",
                "cpu memory pids",
            ),
        }
    }

    #[test]
    fn a_full_kernel_is_all_ok() {
        assert!(assess(&facts()).iter().all(|f| f.severity == Severity::Ok));
    }

    #[test]
    fn missing_modules_degrade_and_a_failing_verifier_is_fatal() {
        let mut f = facts();
        f.wireguard = false;
        f.ebpf = Err("verifier says no".into());
        let findings = assess(&f);
        let wg = findings
            .iter()
            .find(|x| x.what.contains("WireGuard"))
            .expect("a WireGuard line");
        assert_eq!(wg.severity, Severity::Degraded);
        assert!(wg.what.contains("boringtun"), "says what mesh falls back to");
        assert!(findings
            .iter()
            .any(|x| x.severity == Severity::Fatal && x.what.contains("verifier says no")));
    }

    #[test]
    fn a_missing_controller_degrades_task_limits() {
        let mut f = facts();
        f.cgroups = Layout::parse(
            "31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw",
            "0::/",
            "cpu memory",
        );
        let pids = assess(&f)
            .into_iter()
            .find(|x| x.what.contains("pids"))
            .expect("a pids line");
        assert_eq!(pids.severity, Severity::Degraded, "{}", pids.what);
    }
}
