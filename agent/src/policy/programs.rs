//! The enforcement object in user space: loaded once, its programs attached to the kernels'
//! parent cgroup and pinned (with their maps) so that the policy stays enforced while no agent
//! runs; the maps it reads and writes.

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use agent_common::policy::{
    DENIALS_LOST_MAP, DENIALS_MAP, DENIALS_SEEN_MAP, DEVICES_MAP, EGRESS_CAPS_MAP, GUARDS_ARMED_MAP, KERNEL_GUARDS_MAP,
    KERNEL_LEVEL_GLOBAL, KERNEL_POLICIES_MAP, NODE_POLICY_MAP, POLICY_LAYOUT_VERSION, RULES_MAP, RULES4_MAP,
    VERDICTS_MAP, programs,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupDevice, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        LsmCgroup, ProgramError, TracePoint, links::FdLink,
    },
};

use super::guards::CgroupOffsets;
use crate::monitor::{
    ebpf::{ProgramStats, kernel_program_stats, running_program_stats},
    pins::same_code_link,
};
use agent_common::policy::{
    DeviceKey, EgressCap, KernelGuards, KernelPolicy, NodePolicy, Rule, RuleKey, RuleKey4, VerdictKey,
};

/// The object built by `agent/build.rs` from `agent-ebpf/src/policy.rs`.
static POLICY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-policy.o"));

#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error("loading the policy programs failed: {0} (enforcement needs root or CAP_BPF+CAP_NET_ADMIN and cgroup v2)")]
    Load(#[from] aya::EbpfError),
    #[error("policy program `{name}`: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("policy program `{0}` is missing from the object")]
    MissingProgram(&'static str),
    #[error("policy map `{name}`: {reason}")]
    Map { name: &'static str, reason: String },
    #[error("cannot open the kernels' parent cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("policy program `{name}`: its cgroup link cannot be held as a bpf link: {reason}")]
    Link { name: &'static str, reason: String },
    #[error("pinning policy program `{name}` at {path}: {reason}")]
    Pin { name: &'static str, path: PathBuf, reason: String },
}

/// The socket-address programs, by attach type.
const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// Every map the programs use; all are pinned with the links.
const PINNED_MAPS: [&str; 12] = [
    NODE_POLICY_MAP,
    KERNEL_POLICIES_MAP,
    RULES_MAP,
    RULES4_MAP,
    VERDICTS_MAP,
    DENIALS_MAP,
    DENIALS_SEEN_MAP,
    DENIALS_LOST_MAP,
    DEVICES_MAP,
    EGRESS_CAPS_MAP,
    KERNEL_GUARDS_MAP,
    GUARDS_ARMED_MAP,
];

/// The guardrail programs and the LSM hook each is attached to.
const GUARD_PROGRAMS: [(&str, &str); 9] = [
    (programs::GUARD_SOCKET_CREATE, "socket_create"),
    (programs::GUARD_BPF, "bpf"),
    (programs::GUARD_PERF_EVENT_OPEN, "perf_event_open"),
    (programs::GUARD_SB_MOUNT, "sb_mount"),
    (programs::GUARD_MOVE_MOUNT, "move_mount"),
    (programs::GUARD_SB_UMOUNT, "sb_umount"),
    (programs::GUARD_MODULE_REQUEST, "kernel_module_request"),
    (programs::GUARD_READ_FILE, "kernel_read_file"),
    (programs::GUARD_PTRACE, "ptrace_access_check"),
];

/// The maps user space writes and reads.
pub struct PolicyMaps {
    pub node: Array<MapData, NodePolicy>,
    pub kernels: BpfHashMap<MapData, u64, KernelPolicy>,
    pub rules: LpmTrie<MapData, RuleKey, Rule>,
    pub rules4: LpmTrie<MapData, RuleKey4, Rule>,
    pub verdicts: PerCpuHashMap<MapData, VerdictKey, u64>,
    pub lost: PerCpuArray<MapData, u64>,
    pub denials: Option<RingBuf<MapData>>,
    pub devices: BpfHashMap<MapData, DeviceKey, u32>,
    pub egress_caps: BpfHashMap<MapData, u64, EgressCap>,
    pub guards: BpfHashMap<MapData, u64, KernelGuards>,
    pub armed: BpfHashMap<MapData, u64, u32>,
}

impl PolicyMaps {
    /// Both rule tries, for [`super::rules::replace_list`].
    pub fn tries(&mut self) -> super::rules::Tries<'_> {
        super::rules::Tries { v4: &mut self.rules4, v6: &mut self.rules }
    }
}

/// The loaded programs, attached at the kernels' parent cgroup.
pub struct PolicyPrograms {
    ebpf: Ebpf,
    /// Links this process owns (no pin directory): dropping them detaches the programs.
    owned: Vec<FdLink>,
    owned_raw: Vec<OwnedFd>,
    /// Programs an earlier agent left attached (same code), for their statistics.
    adopted: Vec<(&'static str, OwnedFd)>,
    /// Which guardrail programs are attached.
    guards: Guards,
    /// The observer programs attached (or adopted), by name.
    observers: Vec<&'static str>,
    /// Guardrails with an observer that could not run (their counts would be partial).
    unobservable: Vec<usize>,
}

/// `{pins}/policy-v{N}`: maps and links of the enforcement object.
pub fn pin_dir(pins_root: &Path) -> PathBuf {
    pins_root.join(format!("policy-v{POLICY_LAYOUT_VERSION}"))
}

impl PolicyPrograms {
    /// Loads the object for kernels at cgroup level `kernel_level`, pins its maps under `pins`
    /// (reusing pinned ones: the policy of running kernels stays), and attaches every program to
    /// `parent`, adopting pinned links of the same code. A new program is attached before an
    /// old one's pin is removed, so there is no moment without a policy.
    pub fn load(
        kernel_level: u32,
        parent: &Path,
        pins: Option<&Path>,
        offsets: Option<CgroupOffsets>,
    ) -> Result<(Self, PolicyMaps), ProgramsError> {
        let mut loader = EbpfLoader::new();
        loader.override_global(KERNEL_LEVEL_GLOBAL, &kernel_level, true);
        let known = offsets.is_some() as u32;
        let offsets = offsets.unwrap_or(CgroupOffsets {
            task_cgroups: 0,
            css_set_dfl_cgrp: 0,
            cgroup_level: 0,
            cgroup_ancestors: 0,
            cgroup_kn: 0,
            kernfs_node_id: 0,
        });
        let globals = [
            (agent_common::policy::offsets::TASK_CGROUPS, offsets.task_cgroups),
            (agent_common::policy::offsets::CSS_SET_DFL_CGRP, offsets.css_set_dfl_cgrp),
            (agent_common::policy::offsets::CGROUP_LEVEL, offsets.cgroup_level),
            (agent_common::policy::offsets::CGROUP_ANCESTORS, offsets.cgroup_ancestors),
            (agent_common::policy::offsets::CGROUP_KN, offsets.cgroup_kn),
            (agent_common::policy::offsets::KERNFS_NODE_ID, offsets.kernfs_node_id),
            (agent_common::policy::offsets::KNOWN, known),
        ];
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        if let Some(pins) = pins {
            let maps = pins.join("maps");
            std::fs::create_dir_all(&maps).map_err(|err| ProgramsError::Pin {
                name: "maps",
                path: maps.clone(),
                reason: err.to_string(),
            })?;
            std::fs::create_dir_all(pins.join("links")).map_err(|err| ProgramsError::Pin {
                name: "links",
                path: pins.join("links"),
                reason: err.to_string(),
            })?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, maps.join(name));
            }
        }
        let ebpf = loader.load(POLICY_OBJECT)?;
        let dir = File::open(parent).map_err(|source| ProgramsError::Cgroup { path: parent.to_path_buf(), source })?;
        let mut programs = Self {
            ebpf,
            owned: Vec::new(),
            owned_raw: Vec::new(),
            adopted: Vec::new(),
            guards: Guards::None,
            observers: Vec::new(),
            unobservable: Vec::new(),
        };
        for name in SOCK_ADDR_PROGRAMS {
            programs.attach(name, &dir, pins, Kind::SockAddr)?;
        }
        programs.attach(programs::SKB_EGRESS, &dir, pins, Kind::SkbEgress)?;
        programs.attach(programs::DEVICE, &dir, pins, Kind::Device)?;
        programs.attach(programs::GUARD_SOCK_CREATE, &dir, pins, Kind::SockCreate)?;
        let maps = programs.take_maps()?;
        Ok((programs, maps))
    }

    /// Attaches the guardrail programs (BPF LSM, per cgroup) at `parent`, and the exec
    /// tracepoint that arms the mount rule. Fails on kernels without `lsm_cgroup`.
    pub fn attach_guards(&mut self, parent: &Path, pins: Option<&Path>) -> Result<(), ProgramsError> {
        let btf = aya::Btf::from_sys_fs().map_err(|err| ProgramsError::Map { name: "btf", reason: err.to_string() })?;
        let dir = File::open(parent).map_err(|source| ProgramsError::Cgroup { path: parent.to_path_buf(), source })?;
        for (name, hook) in GUARD_PROGRAMS {
            self.attach(name, &dir, pins, Kind::Lsm { hook, btf: &btf })?;
        }
        self.attach(programs::GUARD_ARM, &dir, pins, Kind::ExecTracepoint { btf: &btf })?;
        self.guards = Guards::Lsm;
        Ok(())
    }

    /// Where BPF LSM cannot run: attaches the exec tracepoint that arms the mount rule and the
    /// syscall tracepoints that observe the guarded calls (they count and report, and stop
    /// nothing; they run for every task and look the caller's kernel up first). A tracepoint
    /// this kernel lacks, or one that cannot be attached, is skipped and logged.
    pub fn attach_observers(&mut self, parent: &Path, pins: Option<&Path>) -> Result<(), ProgramsError> {
        let btf = aya::Btf::from_sys_fs().map_err(|err| ProgramsError::Map { name: "btf", reason: err.to_string() })?;
        let dir = File::open(parent).map_err(|source| ProgramsError::Cgroup { path: parent.to_path_buf(), source })?;
        // Without the arming program no mount would ever count: the mount observers need it.
        let armed = self.attach(programs::GUARD_ARM, &dir, pins, Kind::ExecTracepoint { btf: &btf });
        if let Err(err) = &armed {
            tracing::warn!(error = %err, "mounts cannot be observed: the exec tracepoint that arms them failed");
        }
        for (name, tracepoint, guard) in programs::GUARD_OBSERVERS {
            if guard == agent_common::policy::guard::MOUNT && armed.is_err() {
                self.unobservable.push(guard);
                continue;
            }
            if !syscall_tracepoint_exists(tracepoint) {
                tracing::info!(
                    tracepoint,
                    "this kernel has no such syscall tracepoint; its guardrail call is not observed"
                );
                continue;
            }
            match self.attach(name, &dir, pins, Kind::SyscallTracepoint { tracepoint }) {
                Ok(()) => self.observers.push(name),
                Err(err) => {
                    tracing::warn!(tracepoint, error = %err, "a guardrail observer cannot be attached");
                    self.unobservable.push(guard);
                }
            }
        }
        self.guards = Guards::Observed;
        Ok(())
    }

    /// Every guardrail decides (the BPF LSM programs run).
    pub fn guards_decide(&self) -> bool {
        self.guards == Guards::Lsm
    }

    /// The guardrails whose calls the observers see: an observer of each runs and none failed
    /// (none unless [`Self::attach_observers`] ran).
    pub fn observed_guards(&self) -> Vec<usize> {
        let mut guards: Vec<usize> = programs::GUARD_OBSERVERS
            .iter()
            .filter(|(name, _, guard)| self.observers.contains(name) && !self.unobservable.contains(guard))
            .map(|(_, _, guard)| *guard)
            .collect();
        guards.dedup();
        guards
    }

    fn attach(
        &mut self,
        name: &'static str,
        dir: &File,
        pins: Option<&Path>,
        kind: Kind<'_>,
    ) -> Result<(), ProgramsError> {
        let at = |source| ProgramsError::Program { name, source };
        let link_error = |err: aya::programs::links::LinkError| ProgramsError::Link { name, reason: err.to_string() };
        let pin = pins.map(|pins| pins.join("links").join(name));
        let program = self.ebpf.program_mut(name).ok_or(ProgramsError::MissingProgram(name))?;
        let link: FdLink = match kind {
            Kind::SockAddr => {
                let program: &mut CgroupSockAddr = program.try_into().map_err(at)?;
                program.load().map_err(at)?;
                if let Some(running) = pin.as_deref().and_then(|pin| adopt(pin, program.fd().ok()?.as_fd())) {
                    self.adopted.push((name, running));
                    return Ok(());
                }
                // Links always coexist with other programs on the cgroup; they take no flags.
                let id = program.attach(dir, CgroupAttachMode::Single).map_err(at)?;
                program.take_link(id).map_err(at)?.try_into().map_err(link_error)?
            }
            Kind::SkbEgress => {
                let program: &mut CgroupSkb = program.try_into().map_err(at)?;
                program.load().map_err(at)?;
                if let Some(running) = pin.as_deref().and_then(|pin| adopt(pin, program.fd().ok()?.as_fd())) {
                    self.adopted.push((name, running));
                    return Ok(());
                }
                let id = program.attach(dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single).map_err(at)?;
                program.take_link(id).map_err(at)?.try_into().map_err(link_error)?
            }
            Kind::Lsm { hook, btf } => {
                let program: &mut LsmCgroup = program.try_into().map_err(at)?;
                program.load(hook, btf).map_err(at)?;
                if let Some(running) = pin.as_deref().and_then(|pin| adopt(pin, program.fd().ok()?.as_fd())) {
                    self.adopted.push((name, running));
                    return Ok(());
                }
                let id = program.attach(dir).map_err(at)?;
                program.take_link(id).map_err(at)?.into()
            }
            Kind::SyscallTracepoint { tracepoint } => {
                let program: &mut TracePoint = program.try_into().map_err(at)?;
                program.load().map_err(at)?;
                if let Some(running) = pin.as_deref().and_then(|pin| adopt(pin, program.fd().ok()?.as_fd())) {
                    self.adopted.push((name, running));
                    return Ok(());
                }
                let id = program.attach("syscalls", tracepoint).map_err(at)?;
                program.take_link(id).map_err(at)?.try_into().map_err(link_error)?
            }
            Kind::ExecTracepoint { btf } => {
                let program: &mut BtfTracePoint = program.try_into().map_err(at)?;
                program.load("sched_process_exec", btf).map_err(at)?;
                if let Some(running) = pin.as_deref().and_then(|pin| adopt(pin, program.fd().ok()?.as_fd())) {
                    self.adopted.push((name, running));
                    return Ok(());
                }
                let id = program.attach().map_err(at)?;
                program.take_link(id).map_err(at)?.into()
            }
            Kind::Device | Kind::SockCreate => {
                let (fd, attach_type) = if matches!(kind, Kind::Device) {
                    let program: &mut CgroupDevice = program.try_into().map_err(at)?;
                    program.load().map_err(at)?;
                    (program.fd().map_err(at)?.as_fd(), raw::BPF_CGROUP_DEVICE)
                } else {
                    let program: &mut CgroupSock = program.try_into().map_err(at)?;
                    program.load().map_err(at)?;
                    (program.fd().map_err(at)?.as_fd(), raw::BPF_CGROUP_INET_SOCK_CREATE)
                };
                if let Some(running) = pin.as_deref().and_then(|pin| adopt(pin, fd)) {
                    self.adopted.push((name, running));
                    return Ok(());
                }
                // aya keeps these programs' links to itself; made here so they can be pinned.
                let link = raw::cgroup_link(fd, dir.as_fd(), attach_type)
                    .map_err(|err| ProgramsError::Link { name, reason: err.to_string() })?;
                return self.keep_raw(name, link, pin);
            }
        };
        match pin {
            Some(pin) => replace_pin(name, &pin, |path| link.pin(path).map(drop).map_err(|err| err.to_string())),
            None => {
                self.owned.push(link);
                Ok(())
            }
        }
    }

    /// Pins a link made by [`raw::cgroup_link`] as `attach` pins aya's, or keeps it.
    fn keep_raw(&mut self, name: &'static str, link: OwnedFd, pin: Option<PathBuf>) -> Result<(), ProgramsError> {
        match pin {
            Some(pin) => replace_pin(name, &pin, |path| raw::pin(link.as_fd(), path).map_err(|err| err.to_string())),
            None => {
                self.owned_raw.push(link);
                Ok(())
            }
        }
    }

    fn take_maps(&mut self) -> Result<PolicyMaps, ProgramsError> {
        fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProgramsError>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let map = ebpf.take_map(name).ok_or(ProgramsError::Map { name, reason: "missing".into() })?;
            T::try_from(map).map_err(|err| ProgramsError::Map { name, reason: err.to_string() })
        }
        Ok(PolicyMaps {
            node: take(&mut self.ebpf, NODE_POLICY_MAP)?,
            kernels: take(&mut self.ebpf, KERNEL_POLICIES_MAP)?,
            rules: take(&mut self.ebpf, RULES_MAP)?,
            rules4: take(&mut self.ebpf, RULES4_MAP)?,
            verdicts: take(&mut self.ebpf, VERDICTS_MAP)?,
            lost: take(&mut self.ebpf, DENIALS_LOST_MAP)?,
            denials: take(&mut self.ebpf, DENIALS_MAP).ok(),
            devices: take(&mut self.ebpf, DEVICES_MAP)?,
            egress_caps: take(&mut self.ebpf, EGRESS_CAPS_MAP)?,
            guards: take(&mut self.ebpf, KERNEL_GUARDS_MAP)?,
            armed: take(&mut self.ebpf, GUARDS_ARMED_MAP)?,
        })
    }

    /// What the kernel measured of each program (advances while `kernel.bpf_stats_enabled=1`),
    /// including the programs an earlier agent left running.
    pub fn stats(&self) -> Vec<ProgramStats> {
        let mut names: Vec<&'static str> = SOCK_ADDR_PROGRAMS
            .into_iter()
            .chain([programs::SKB_EGRESS, programs::DEVICE, programs::GUARD_SOCK_CREATE])
            .collect();
        match self.guards {
            Guards::None => {}
            Guards::Lsm => names.extend(GUARD_PROGRAMS.iter().map(|(name, _)| *name)),
            Guards::Observed => names.extend(self.observers.iter().copied()),
        }
        if self.guards != Guards::None {
            names.push(programs::GUARD_ARM);
        }
        running_program_stats(&self.ebpf, &names, &self.adopted)
    }
}

enum Kind<'a> {
    SockAddr,
    SkbEgress,
    Device,
    SockCreate,
    Lsm { hook: &'static str, btf: &'a aya::Btf },
    ExecTracepoint { btf: &'a aya::Btf },
    SyscallTracepoint { tracepoint: &'static str },
}

/// Which guardrail programs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guards {
    None,
    /// The BPF LSM programs: every guardrail decides.
    Lsm,
    /// The syscall tracepoints: guardrails observed only.
    Observed,
}

/// Whether the kernel has the tracepoint `syscalls/{name}` (absent, e.g., for calls a kernel
/// was built without). Reading tracefs may be refused where BPF is not: then assume it does.
fn syscall_tracepoint_exists(name: &str) -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|root| Path::new(root).join("events/syscalls"))
        .find(|events| events.exists())
        .is_none_or(|events| events.join(name).exists())
}

/// Pins a new link at `pin` with `pin_with`, the old pin there (another build's) moved aside
/// first and removed after: the new link runs before the old one goes, so there is no gap.
fn replace_pin(
    name: &'static str,
    pin: &Path,
    pin_with: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), ProgramsError> {
    let stale = pin.with_extension("stale");
    if pin.exists() {
        let _ = std::fs::rename(pin, &stale);
    }
    let pinned = pin_with(pin).map_err(|reason| ProgramsError::Pin { name, path: pin.to_path_buf(), reason });
    let _ = std::fs::remove_file(&stale);
    pinned
}

/// The program of the link pinned at `pin` when it runs the same code as `program`; a pin of
/// other code stays until the new link is pinned in its place.
fn adopt(pin: &Path, program: std::os::fd::BorrowedFd<'_>) -> Option<OwnedFd> {
    let running = same_code_link(pin, program)?;
    tracing::info!(link = %pin.display(), "a pinned policy program of this build is still enforcing; adopted");
    Some(running)
}

/// Removes every pinned policy program and map (the policy stops): for `enabled = false`.
pub fn remove_pins(pins_root: &Path) {
    let dir = pin_dir(pins_root);
    if dir.exists() {
        tracing::info!(dir = %dir.display(), "policy is off; removing the pinned policy programs");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// An empty `connect4` program of the policy object, attached to one cgroup, for benchmarks:
/// what any program on that hook costs, so that the policy's own cost can be told apart.
pub struct PolicyBaseline {
    ebpf: Ebpf,
}

impl PolicyBaseline {
    /// Loads the object a second time (maps of its own, nothing pinned) and attaches only
    /// `baseline_connect4` to `cgroup`, through a link that lives as long as this value.
    pub fn load(cgroup: &Path) -> Result<Self, ProgramsError> {
        let name = programs::BASELINE_CONNECT4;
        let at = |source| ProgramsError::Program { name, source };
        let mut ebpf = EbpfLoader::new().load(POLICY_OBJECT)?;
        let dir = File::open(cgroup).map_err(|source| ProgramsError::Cgroup { path: cgroup.to_path_buf(), source })?;
        let program: &mut CgroupSockAddr =
            ebpf.program_mut(name).ok_or(ProgramsError::MissingProgram(name))?.try_into().map_err(at)?;
        program.load().map_err(at)?;
        program.attach(&dir, CgroupAttachMode::Single).map_err(at)?;
        Ok(Self { ebpf })
    }

    /// What the kernel measured of the empty program (advances while `kernel.bpf_stats_enabled=1`).
    pub fn stats(&self) -> std::io::Result<ProgramStats> {
        let name = programs::BASELINE_CONNECT4;
        let program = self.ebpf.program(name).ok_or_else(|| std::io::Error::other("baseline program missing"))?;
        kernel_program_stats(name, program.fd().map_err(std::io::Error::other)?.as_fd())
    }
}

/// The two `bpf()` commands aya does not offer for every program type.
mod raw {
    use std::{
        os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        path::Path,
    };

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    pub const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
    pub const BPF_CGROUP_DEVICE: u32 = 6;

    fn bpf(cmd: libc::c_long, attr: &mut [u32; 32]) -> std::io::Result<i64> {
        // SAFETY: `attr` is a zeroed `union bpf_attr` of 128 bytes, filled for `cmd`.
        let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
        if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
    }

    /// `BPF_LINK_CREATE` of `program` on `cgroup`.
    pub fn cgroup_link(program: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<OwnedFd> {
        let mut attr = [0u32; 32];
        attr[0] = program.as_raw_fd() as u32;
        attr[1] = cgroup.as_raw_fd() as u32;
        attr[2] = attach_type;
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// `BPF_OBJ_PIN` of `fd` at `path` (on a bpffs).
    pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mut attr = [0u32; 32];
        // The pointer is a u64 at offset 0, in memory order.
        let pointer = (c_path.as_ptr() as u64).to_ne_bytes();
        attr[0] = u32::from_ne_bytes([pointer[0], pointer[1], pointer[2], pointer[3]]);
        attr[1] = u32::from_ne_bytes([pointer[4], pointer[5], pointer[6], pointer[7]]);
        attr[2] = fd.as_raw_fd() as u32;
        bpf(BPF_OBJ_PIN, &mut attr).map(drop)
    }
}
