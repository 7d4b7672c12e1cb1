//! The eBPF dataplane: loads mesh-ebpf's programs, attaches them to links
//! and reads their maps, through aya.
//!
//! The object is embedded by the `mesh-agent` binary (package
//! mesh-agent-bin, whose build script refuses a missing or stale one) and
//! handed over with [`embed`] at start. The library itself embeds nothing, so
//! checking, linting and testing it needs no BPF toolchain, and an eBPF
//! change rebuilds only the binary. Without an embedded object (tests,
//! tools) [`object`] reads the one `cargo xtask build-ebpf` left in the
//! workspace, or the file `MESH_EBPF_OBJECT` names.
//!
//! Attaching resolves interface names in the calling thread's network
//! namespace, so callers enter the namespace first (see
//! [`crate::agent::net::netns::NetNs::run`]).

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
    sync::OnceLock,
};

use aya::{
    maps::PerCpuArray,
    programs::{
        links::LinkOrder,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf,
};
use mesh_common::counters::{self, Counter, Hook, ProtoClass};

/// Where `cargo xtask build-ebpf` leaves the object, from the workspace root.
pub(crate) const OBJECT_IN_WORKSPACE: &str = "target/ebpf/bpfel-unknown-none/release/mesh-ebpf";

static EMBEDDED: OnceLock<&'static [u8]> = OnceLock::new();
static READ: OnceLock<Result<&'static [u8], String>> = OnceLock::new();

/// Hands over the object the binary embeds (aligned, as aya parses it in
/// place); the first call wins.
pub fn embed(object: &'static [u8]) {
    let _ = EMBEDDED.set(object);
}

/// The compiled mesh-ebpf object: the embedded one, else the file
/// `MESH_EBPF_OBJECT` names or the workspace's, read once.
pub(crate) fn object() -> Result<&'static [u8], EbpfError> {
    if let Some(object) = EMBEDDED.get() {
        return Ok(object);
    }
    READ.get_or_init(|| {
        let path = std::env::var_os("MESH_EBPF_OBJECT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(OBJECT_IN_WORKSPACE));
        let bytes = std::fs::read(&path).map_err(|e| {
            format!(
                "this build embeds no eBPF object and {} cannot be read ({e}): run the mesh-agent binary, or `cargo xtask build-ebpf` first",
                path.display()
            )
        })?;
        Ok(leak_aligned(&bytes))
    })
    .clone()
    .map_err(EbpfError::NoObject)
}

/// `bytes` copied into 8-byte aligned memory that lives as long as the
/// process (the ELF parser reads its headers in place).
fn leak_aligned(bytes: &[u8]) -> &'static [u8] {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: the u64 buffer holds at least bytes.len() bytes; u8 has no
    // alignment or validity requirement.
    let view = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
    view.copy_from_slice(bytes);
    let words: &'static mut [u64] = words.leak();
    // SAFETY: as above, over the leaked buffer, which is never freed.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), bytes.len()) }
}

/// What a map is, as far as a program reading it cares: its kind, key and
/// value sizes, capacity and creation flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapShape {
    kind: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl MapShape {
    fn of_info(info: &aya::maps::MapInfo) -> MapShape {
        MapShape {
            kind: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }
    }
}

/// How `found` (a pinned map) differs from `wanted` (this object's map of
/// that name), in words; `None` when they are the same shape.
fn shape_change(found: MapShape, wanted: MapShape) -> Option<String> {
    let fields = [
        ("type", found.kind, wanted.kind),
        ("key bytes", found.key_size, wanted.key_size),
        ("value bytes", found.value_size, wanted.value_size),
        ("entries", found.max_entries, wanted.max_entries),
        ("flags", found.flags, wanted.flags),
    ];
    let changed: Vec<String> = fields
        .iter()
        .filter(|(_, f, w)| f != w)
        .map(|(what, f, w)| format!("{what} {f}, this agent's {w}"))
        .collect();
    (!changed.is_empty()).then(|| changed.join("; "))
}

/// The shapes of the embedded object's maps, by name.
fn object_map_shapes() -> Result<std::collections::HashMap<String, MapShape>, EbpfError> {
    let object = aya_obj::Object::parse(object()?).map_err(|e| EbpfError::Map {
        name: "mesh-ebpf object",
        reason: format!("parsing its map definitions: {e}"),
    })?;
    Ok(object
        .maps
        .iter()
        .map(|(name, m)| {
            let shape = MapShape {
                kind: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// The XDP packet-counting program.
pub const XDP_COUNT: &str = "xdp_count";
/// The TC packet-counting program.
pub const TC_COUNT: &str = "tc_count";

/// Errors of the eBPF dataplane.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// No object was embedded and none could be read.
    #[error("{0}")]
    NoObject(String),
    /// The embedded object could not be parsed or its maps created.
    #[error("cannot load the mesh-ebpf object: {0}")]
    Object(#[from] Box<aya::EbpfError>),
    /// The kernel (usually the verifier) refused a program.
    #[error("the kernel refused eBPF program `{name}`: {source}")]
    Load { name: String, source: Box<ProgramError> },
    /// The object holds a program of a kind the agent does not know how to load.
    #[error("eBPF program `{0}` is of a kind the agent does not load")]
    UnsupportedKind(String),
    /// A program the agent needs is not in the object.
    #[error("eBPF program `{0}` is not in the mesh-ebpf object (rebuild with `cargo xtask build-ebpf`)")]
    MissingProgram(String),
    /// A program is in the object but is not of the expected kind.
    #[error("eBPF program `{name}` is not a {expected} program")]
    WrongKind { name: String, expected: &'static str },
    /// Attaching or detaching failed.
    #[error("cannot {action} eBPF program `{name}` on `{interface}`: {}", chain(source.as_ref()))]
    Attach {
        action: &'static str,
        name: String,
        interface: String,
        source: Box<ProgramError>,
    },
    /// Adding the clsact qdisc failed.
    #[error("cannot add the clsact qdisc to `{interface}`: {source}")]
    Clsact {
        interface: String,
        source: Box<tc::TcError>,
    },
    /// A map is missing or could not be read.
    #[error("cannot read eBPF map `{name}`: {reason}")]
    Map { name: &'static str, reason: String },
}

/// How an XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Generic (skb) mode: works on every device, after skb allocation.
    Generic,
    /// Native (driver) mode: the driver runs the program, before skb allocation.
    Native,
}

impl XdpAttachMode {
    fn aya(self) -> XdpMode {
        match self {
            XdpAttachMode::Generic => XdpMode::Skb,
            XdpAttachMode::Native => XdpMode::Driver,
        }
    }
}

/// Which TC kernel interface attaches a classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcApi {
    /// tcx links (kernel >= 6.6): no qdisc, detached when the agent lets go.
    Tcx,
    /// A cls_bpf filter under the clsact qdisc (every kernel mesh supports).
    Clsact,
}

/// The direction a TC program sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcDirection {
    Ingress,
    Egress,
}

/// The kinds of program mesh-ebpf holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    Xdp,
    TcClassifier,
    /// cgroup/connect4 and its kin (`sock_*`).
    CgroupSockAddr,
}

/// An attached XDP program, to hand back to [`EbpfDataplane::detach_xdp`].
#[derive(Debug)]
pub struct XdpAttachment {
    interface: String,
    link: aya::programs::xdp::XdpLinkId,
}

/// An attached TC program, to hand back to [`EbpfDataplane::detach_tc`].
#[derive(Debug)]
pub struct TcAttachment {
    interface: String,
    link: SchedClassifierLinkId,
}

/// Packet counters summed over CPUs, per hook and protocol class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters([Counter; counters::ENTRIES as usize]);

impl PacketCounters {
    /// The counter for `class` packets seen at `hook`.
    pub fn get(&self, hook: Hook, class: ProtoClass) -> Counter {
        self.0[counters::index(hook, class) as usize]
    }
}

/// mesh-ebpf's programs, loaded into the kernel.
pub struct EbpfDataplane {
    ebpf: Ebpf,
}

impl EbpfDataplane {
    /// Parses the embedded object and loads every program in it, so the
    /// verifier sees each one now rather than at first attach.
    pub fn load() -> Result<Self, EbpfError> {
        Self::load_pinned(None, &[])
    }

    /// As [`EbpfDataplane::load`], with the maps named in `pinned` kept in
    /// `pin_dir` on a bpffs: an existing pin is reused (so what an earlier
    /// agent wrote, and the connections it tracked, carry on), a missing
    /// one is created and pinned.
    ///
    /// A pin whose map has another shape than this object's map of that
    /// name (left by an agent of another version: pins carry no layout
    /// version) is replaced by a new map rather than taken over, since the
    /// programs would read its entries with the wrong layout; what it held
    /// starts empty.
    pub fn load_pinned(pin_dir: Option<&std::path::Path>, pinned: &[&'static str]) -> Result<Self, EbpfError> {
        let mut loader = aya::EbpfLoader::new();
        if let Some(dir) = pin_dir {
            let shapes = object_map_shapes()?;
            for name in pinned {
                let path = dir.join(name);
                let found = aya::maps::MapInfo::from_pin(&path).ok().map(|i| MapShape::of_info(&i));
                let wanted = shapes.get(*name).copied();
                if let Some(why) = found
                    .zip(wanted)
                    .and_then(|(found, wanted)| shape_change(found, wanted))
                {
                    log::warn!(
                        "eBPF map {name} pinned at {} was made by another version ({why}): replaced by a new, empty one",
                        path.display()
                    );
                    std::fs::remove_file(&path).map_err(|e| EbpfError::Map {
                        name: "pinned map",
                        reason: format!("removing the stale pin {}: {e}", path.display()),
                    })?;
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(object()?).map_err(Box::new)?;
        for (name, program) in ebpf.programs_mut() {
            let loaded = match program {
                Program::Xdp(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                Program::CgroupSockAddr(p) => p.load(),
                _ => return Err(EbpfError::UnsupportedKind(name.to_owned())),
            };
            loaded.map_err(|source| EbpfError::Load {
                name: name.to_owned(),
                source: Box::new(source),
            })?;
        }
        Ok(Self { ebpf })
    }

    /// Takes map `name` out of the object, for a typed owner (dataplane/lb.rs).
    pub fn take_map(&mut self, name: &str) -> Option<aya::maps::Map> {
        self.ebpf.take_map(name)
    }

    /// Names of every program in the object.
    pub fn program_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        names.sort();
        names
    }

    /// The kind of program `name` is.
    pub fn program_kind(&self, name: &str) -> Result<ProgramKind, EbpfError> {
        match self.ebpf.program(name) {
            Some(Program::Xdp(_)) => Ok(ProgramKind::Xdp),
            Some(Program::SchedClassifier(_)) => Ok(ProgramKind::TcClassifier),
            Some(Program::CgroupSockAddr(_)) => Ok(ProgramKind::CgroupSockAddr),
            Some(_) => Err(EbpfError::UnsupportedKind(name.to_owned())),
            None => Err(EbpfError::MissingProgram(name.to_owned())),
        }
    }

    /// The file descriptor of a loaded program (for BPF_PROG_TEST_RUN).
    pub fn program_fd(&self, name: &str) -> Result<BorrowedFd<'_>, EbpfError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or_else(|| EbpfError::MissingProgram(name.to_owned()))?;
        let fd = program.fd().map_err(|source| EbpfError::Load {
            name: name.to_owned(),
            source: Box::new(source),
        })?;
        Ok(fd.as_fd())
    }

    /// Attaches the XDP program `name` to `interface`
    /// (`ip link set dev IF xdpgeneric|xdpdrv obj ...`).
    pub fn attach_xdp(&mut self, name: &str, interface: &str, mode: XdpAttachMode) -> Result<XdpAttachment, EbpfError> {
        let link = self
            .xdp(name)?
            .attach(interface, mode.aya())
            .map_err(|source| attach_error("attach", name, interface, source))?;
        Ok(XdpAttachment {
            interface: interface.to_owned(),
            link,
        })
    }

    /// Detaches an XDP program attached by [`Self::attach_xdp`].
    pub fn detach_xdp(&mut self, name: &str, attachment: XdpAttachment) -> Result<(), EbpfError> {
        self.xdp(name)?
            .detach(attachment.link)
            .map_err(|source| attach_error("detach", name, &attachment.interface, source))
    }

    /// Attaches the TC program `name` to `interface` in `direction`
    /// (`tc filter add dev IF ingress|egress bpf da obj ...`, after
    /// `tc qdisc add dev IF clsact` when `api` is [`TcApi::Clsact`]).
    pub fn attach_tc(
        &mut self,
        name: &str,
        interface: &str,
        direction: TcDirection,
        api: TcApi,
    ) -> Result<TcAttachment, EbpfError> {
        let attach_type = match direction {
            TcDirection::Ingress => TcAttachType::Ingress,
            TcDirection::Egress => TcAttachType::Egress,
        };
        let options = match api {
            TcApi::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            TcApi::Clsact => {
                add_clsact(interface)?;
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        let link = self
            .classifier(name)?
            .attach_with_options(interface, attach_type, options)
            .map_err(|source| attach_error("attach", name, interface, source))?;
        Ok(TcAttachment {
            interface: interface.to_owned(),
            link,
        })
    }

    /// Detaches a TC program attached by [`Self::attach_tc`].
    pub fn detach_tc(&mut self, name: &str, attachment: TcAttachment) -> Result<(), EbpfError> {
        self.classifier(name)?
            .detach(attachment.link)
            .map_err(|source| attach_error("detach", name, &attachment.interface, source))
    }

    /// Attaches TC program `name` to `interface`'s ingress so that it
    /// outlives the agent: through tcx, a link pinned at `pin` (one pinned
    /// by an earlier agent is taken over and switched to this program in
    /// one step, so no packet goes unhandled); through clsact, a filter,
    /// which outlives the agent by itself (an earlier agent's filter of
    /// the same program is replaced).
    pub(crate) fn attach_tc_pinned(
        &mut self,
        name: &str,
        interface: &str,
        api: TcApi,
        pin: &std::path::Path,
    ) -> Result<(), EbpfError> {
        let error = |action, source| attach_error(action, name, interface, source);
        let program = self.classifier(name)?;
        match api {
            TcApi::Tcx => {
                if pin.exists() {
                    let adopted = aya::programs::links::PinnedLink::from_pin(pin)
                        .ok()
                        .map(aya::programs::links::FdLink::from)
                        .and_then(|l| aya::programs::tc::SchedClassifierLink::try_from(l).ok());
                    // A link whose device went away cannot be switched:
                    // attach anew then.
                    if let Some(Ok(_)) = adopted.map(|link| program.attach_to_link(link)) {
                        return Ok(());
                    }
                    let _ = std::fs::remove_file(pin);
                }
                let id = program
                    .attach_with_options(
                        interface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| error("attach", e))?;
                let link = program.take_link(id).map_err(|e| error("attach", e))?;
                let fd = aya::programs::links::FdLink::try_from(link).map_err(|e| EbpfError::Map {
                    name: "tc link",
                    reason: format!("a tcx link that is no fd link: {e}"),
                })?;
                fd.pin(pin).map_err(|e| EbpfError::Map {
                    name: "tc link",
                    reason: format!("pinning {}: {e}", pin.display()),
                })?;
                Ok(())
            }
            TcApi::Clsact => {
                add_clsact(interface)?;
                let _ = tc::qdisc_detach_program(interface, TcAttachType::Ingress, name);
                let id = program
                    .attach_with_options(
                        interface,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(|e| error("attach", e))?;
                // Forgotten, not detached: the filter stays when the agent goes.
                let link = program.take_link(id).map_err(|e| error("attach", e))?;
                std::mem::forget(link);
                Ok(())
            }
        }
    }

    /// Detaches what [`EbpfDataplane::attach_tc_pinned`] attached.
    pub(crate) fn detach_tc_pinned(name: &str, interface: &str, api: TcApi, pin: &std::path::Path) {
        match api {
            TcApi::Tcx => {
                if let Ok(link) = aya::programs::links::PinnedLink::from_pin(pin) {
                    // Unpinned and closed: the kernel detaches the link.
                    let _ = link.unpin();
                }
            }
            TcApi::Clsact => {
                let _ = tc::qdisc_detach_program(interface, TcAttachType::Ingress, name);
            }
        }
    }

    /// Attaches the cgroup socket program `name` to the cgroup directory
    /// `cgroup` (`bpftool cgroup attach CGROUP connect4 ...`); it stays
    /// attached while the agent runs.
    pub(crate) fn attach_cgroup(&mut self, name: &str, cgroup: &std::path::Path) -> Result<(), EbpfError> {
        let interface = cgroup.display().to_string();
        let dir = std::fs::File::open(cgroup).map_err(|e| EbpfError::Attach {
            action: "attach",
            name: name.to_owned(),
            interface: interface.clone(),
            source: Box::new(ProgramError::IOError(e)),
        })?;
        let program: &mut aya::programs::CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| EbpfError::MissingProgram(name.to_owned()))?
            .try_into()
            .map_err(|_| EbpfError::WrongKind {
                name: name.to_owned(),
                expected: "cgroup socket address",
            })?;
        program
            // A link (kernel >= 5.7) always lets other programs share the
            // cgroup; the link API refuses the ALLOW_MULTI flag itself.
            .attach(dir, aya::programs::links::CgroupAttachMode::Single)
            .map_err(|source| attach_error("attach", name, &interface, source))?;
        Ok(())
    }

    /// The packet counters, summed over every CPU.
    pub fn counters(&self) -> Result<PacketCounters, EbpfError> {
        let map_error = |reason: String| EbpfError::Map {
            name: counters::MAP_NAME,
            reason,
        };
        let map = self
            .ebpf
            .map(counters::MAP_NAME)
            .ok_or_else(|| map_error("not in the object".into()))?;
        let array = PerCpuArray::<_, Counter>::try_from(map).map_err(|e| map_error(e.to_string()))?;
        let mut out = PacketCounters::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let index = u32::try_from(i).expect("reason: ENTRIES is a u32");
            let per_cpu = array.get(&index, 0).map_err(|e| map_error(e.to_string()))?;
            *slot = per_cpu.iter().fold(Counter::default(), |sum, c| sum.saturating_add(*c));
        }
        Ok(out)
    }

    fn xdp(&mut self, name: &str) -> Result<&mut Xdp, EbpfError> {
        match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => Ok(p),
            Some(_) => Err(EbpfError::WrongKind {
                name: name.to_owned(),
                expected: "XDP",
            }),
            None => Err(EbpfError::MissingProgram(name.to_owned())),
        }
    }

    fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier, EbpfError> {
        match self.ebpf.program_mut(name) {
            Some(Program::SchedClassifier(p)) => Ok(p),
            Some(_) => Err(EbpfError::WrongKind {
                name: name.to_owned(),
                expected: "TC classifier",
            }),
            None => Err(EbpfError::MissingProgram(name.to_owned())),
        }
    }
}

/// The TC API this kernel prefers: tcx from 6.6 on, clsact before.
pub(crate) fn preferred_tc_api() -> TcApi {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(6, 6, 0) => TcApi::Tcx,
        _ => TcApi::Clsact,
    }
}

/// `tc qdisc add dev IF clsact`, accepting one that is already there.
fn add_clsact(interface: &str) -> Result<(), EbpfError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(EbpfError::Clsact {
            interface: interface.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// An error and its causes, as one line (aya's syscall errors keep the
/// OS error as their cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn attach_error(action: &'static str, name: &str, interface: &str, source: ProgramError) -> EbpfError {
    EbpfError::Attach {
        action,
        name: name.to_owned(),
        interface: interface.to_owned(),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_is_in_the_object_and_a_changed_shape_is_told_apart() {
        let shapes = object_map_shapes().expect("the object parses");
        for name in mesh_common::lb::PINNED_MAPS {
            assert!(shapes.contains_key(name), "{name} is pinned but not in the object");
        }
        let wanted = shapes[mesh_common::lb::REVERSE_NAT_MAP];
        assert_eq!(shape_change(wanted, wanted), None);
        let older = MapShape {
            value_size: wanted.value_size - 4,
            max_entries: wanted.max_entries / 2,
            ..wanted
        };
        let why = shape_change(older, wanted).expect("a different shape");
        assert!(
            why.contains(&format!(
                "value bytes {}, this agent's {}",
                wanted.value_size - 4,
                wanted.value_size
            )),
            "{why}"
        );
        assert!(why.contains("entries"), "{why}");
    }
}
