//! The eBPF object in user space: loaded once, the global programs (the tracepoints
//! `sched_stat_runtime`, `block_bio_queue` and `mark_victim`) attached once, `cgroup_skb` programs attached per container cgroup, counters read from the maps,
//! and which resource each program covers.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use agent_common::{
    BASELINES_MAP, COUNTERS_MAP, CgroupCounters, CgroupId, LOST_EVENTS_MAP, MAX_OVERFLOW_CGROUPS, NR_CPUS_GLOBAL,
    OOM_EVENTS_MAP, SLOT_OVERFLOW_MAP, SLOTS, SLOTS_MAP, offsets, programs,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError, cgroup_skb::CgroupSkbLinkId,
        links::FdLink,
    },
    util::nr_cpus,
};
use aya_obj::generated::bpf_prog_info;

use super::{
    btf::{BtfError, KernelBtf},
    counters::{CounterHandle, CounterStore},
    pins::{PinDir, adopt_link, object_info},
    sources::{Resource, Source, Sources},
};

/// The object built by `agent/build.rs` from `agent-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "loading the eBPF object failed: {0} (the agent needs root or CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN and a kernel with BPF)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("kernel BTF is unavailable ({0}); tp_btf programs need /sys/kernel/btf/vmlinux")]
    Btf(#[from] aya::BtfError),
    #[error("eBPF program `{name}`: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("eBPF program `{0}` is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map `{0}` is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map `{name}`: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup { path: PathBuf, source: std::io::Error },
    #[error("cannot count the number of CPUs: {0}")]
    Cpus(String),
    #[error("cgroup {0} is not attached")]
    NotAttached(CgroupId),
    #[error("pinning the link of eBPF program `{name}`: {reason}")]
    Pin { name: &'static str, reason: String },
    #[error("finding the fields the program reads in kernel BTF: {0}")]
    KernelLayout(#[from] BtfError),
    #[error(transparent)]
    Counters(#[from] super::counters::CounterError),
}

/// Links of the per-cgroup programs for one attached cgroup.
enum CgroupLinks {
    /// Network is counted from files: only the counters are registered.
    None,
    /// Owned by this process: detached when it ends.
    Owned(CgroupSkbLinkId, CgroupSkbLinkId),
    /// Pinned (see [`PinDir::skb_link`]): detached when the pins are removed
    /// ([`EbpfMonitor::forget`]).
    Pinned,
}

/// The two packet-counter programs of a cgroup, by the name of their pins.
const SKB_DIRECTIONS: [&str; 2] = ["ingress", "egress"];

/// The maps pinned with [`PinDir::maps`]: all that the programs write.
const PINNED_MAPS: [&str; 6] =
    [SLOTS_MAP, BASELINES_MAP, SLOT_OVERFLOW_MAP, COUNTERS_MAP, LOST_EVENTS_MAP, OOM_EVENTS_MAP];

/// Pins a link of this process at `path` (replacing a stale pin), so that it outlives the agent.
fn pin_link(link: FdLink, path: &Path, name: &'static str) -> Result<(), EbpfError> {
    let _ = std::fs::remove_file(path);
    link.pin(path).map(drop).map_err(|err| EbpfError::Pin { name, reason: err.to_string() })
}

/// The kernel struct fields each program reads: (global, struct, member path).
type FieldOffset = (&'static str, &'static str, &'static [&'static str]);

const CPU_FIELDS: &[FieldOffset] = &[
    (offsets::TASK_CGROUPS, "task_struct", &["cgroups"]),
    (offsets::CSS_SET_DFL_CGRP, "css_set", &["dfl_cgrp"]),
    (offsets::CGROUP_KN, "cgroup", &["kn"]),
    (offsets::KERNFS_NODE_ID, "kernfs_node", &["id"]),
    (offsets::CGROUP_LEVEL, "cgroup", &["level"]),
    (offsets::CGROUP_PARENT_CSS, "cgroup", &["self", "parent"]),
    (offsets::CSS_CGROUP, "cgroup_subsys_state", &["cgroup"]),
];
const BLOCK_IO_FIELDS: &[FieldOffset] =
    &[(offsets::BIO_OPF, "bio", &["bi_opf"]), (offsets::BIO_SIZE, "bio", &["bi_iter", "bi_size"])];
const OOM_FIELDS: &[FieldOffset] = &[
    (offsets::TASK_TGID, "task_struct", &["tgid"]),
    (offsets::TASK_COMM, "task_struct", &["comm"]),
    (offsets::TASK_CGROUPS, "task_struct", &["cgroups"]),
    (offsets::CSS_SET_DFL_CGRP, "css_set", &["dfl_cgrp"]),
    (offsets::CGROUP_KN, "cgroup", &["kn"]),
    (offsets::KERNFS_NODE_ID, "kernfs_node", &["id"]),
];

/// The global program of each resource it counts: (resource, program, BTF tracepoint, the
/// kernel fields it reads).
const GLOBAL_PROGRAMS: [(Resource, &str, &str, &[FieldOffset]); 3] = [
    (Resource::Cpu, programs::SCHED_STAT_RUNTIME, "sched_stat_runtime", CPU_FIELDS),
    (Resource::BlockIo, programs::BLOCK_BIO_QUEUE, "block_bio_queue", BLOCK_IO_FIELDS),
    (Resource::Oom, programs::MARK_VICTIM, "mark_victim", OOM_FIELDS),
];

/// Names of every global program (their pinned links have these names).
fn global_program_names() -> Vec<&'static str> {
    GLOBAL_PROGRAMS.iter().map(|(_, name, _, _)| *name).collect()
}

/// The field offsets a program reads, from BTF.
fn resolve_offsets(kernel_types: &KernelBtf, fields: &[FieldOffset]) -> Result<Vec<(&'static str, u64)>, BtfError> {
    fields.iter().map(|&(global, strukt, path)| Ok((global, kernel_types.member_offset(strukt, path)?))).collect()
}

/// How a global program came to run.
enum Attached {
    /// Attached by this process: detached when the link is dropped.
    Owned(FdLink),
    /// Attached by this process and pinned: runs until the pin is removed.
    Pinned,
    /// An earlier agent's pinned link of the same code, still running that program.
    Adopted(OwnedFd),
}

/// Loads and attaches one global program, or adopts the pinned link of an earlier agent that
/// runs the same code.
fn attach_global(
    ebpf: &mut Ebpf,
    btf: &Btf,
    name: &'static str,
    tracepoint: &str,
    pins: Option<&PinDir>,
) -> Result<Attached, EbpfError> {
    let at = |source| EbpfError::Program { name, source };
    let program: &mut BtfTracePoint = program(ebpf, name)?;
    program.load(tracepoint, btf).map_err(at)?;
    if let Some(pins) = pins {
        let own = program.fd().map_err(at)?.as_fd();
        if let Some(running) = adopt_link(&pins.link(name), own) {
            tracing::info!(program = name, "a pinned program of this build is still counting; adopted");
            return Ok(Attached::Adopted(running));
        }
    }
    let id = program.attach().map_err(at)?;
    let link: FdLink = program.take_link(id).map_err(at)?.into();
    match pins {
        Some(pins) => pin_link(link, &pins.link(name), name).map(|()| Attached::Pinned),
        None => Ok(Attached::Owned(link)),
    }
}

/// The loaded programs and the counters map. Dropping it detaches everything.
pub struct EbpfMonitor {
    ebpf: Ebpf,
    counters: CounterStore,
    attached: HashMap<CgroupId, CgroupLinks>,
    sources: Sources,
    lost_events: Option<PerCpuArray<MapData, u64>>,
    /// Where maps and links are pinned, when they outlive the agent.
    pins: Option<PinDir>,
    /// Links of the global programs this process owns (unpinned): dropping detaches them.
    global_links: Vec<(&'static str, FdLink)>,
    /// Programs of an earlier agent still running from their pinned links (for their stats).
    adopted: Vec<(&'static str, OwnedFd)>,
}

impl EbpfMonitor {
    /// Loads the object and attaches the global programs of every resource not in
    /// `cgroup_files`. A program that cannot load or attach here (a missing hook or kernel
    /// field) leaves its resource to the cgroup-file readers, logged once; only an object
    /// that cannot load at all, or a broken counters map, is an error.
    ///
    /// With `pins`, the counter maps and the links are pinned there and outlive the agent:
    /// a link pinned by an earlier agent that runs the same code is adopted (its counts go
    /// on), and registered cgroups are recovered from the maps.
    pub fn load(cgroup_files: &[Resource], pins: Option<PinDir>) -> Result<Self, EbpfError> {
        raise_memlock_limit();
        // Offsets each resource's programs read; a resource whose fields this kernel lacks is
        // counted from files. Unresolved globals keep their defaults (their programs are not
        // loaded). The parsed types are let go before aya parses BTF again, to keep the peak low.
        let resolved: Vec<Result<Vec<(&str, u64)>, BtfError>> = {
            let kernel_types = KernelBtf::from_sys_fs()?;
            GLOBAL_PROGRAMS.iter().map(|(_, _, _, fields)| resolve_offsets(&kernel_types, fields)).collect()
        };
        let btf = Btf::from_sys_fs()?;
        let cpus = nr_cpus().map_err(|(path, err)| EbpfError::Cpus(format!("{path}: {err}")))?;
        let mut loader = EbpfLoader::new();
        loader.btf(Some(&btf));
        let lines = u32::try_from(cpus).ok().and_then(|cpus| cpus.checked_mul(SLOTS));
        let lines = lines.ok_or_else(|| EbpfError::Cpus(format!("{cpus} CPUs are more than the counters can hold")))?;
        loader.map_max_entries(SLOTS_MAP, lines);
        let cpus_global = cpus as u64;
        loader.override_global(NR_CPUS_GLOBAL, &cpus_global, true);
        let pins = pins.and_then(|pins| match pins.maps(cpus) {
            Ok(maps) => Some((pins, maps)),
            Err(err) => {
                tracing::warn!(error = %err, "cannot pin the counters; they start afresh whenever the agent restarts");
                None
            }
        });
        if let Some((pins, maps)) = &pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, maps.join(name));
            }
            pins.remove_unknown_global_links(&global_program_names());
        }
        let pins = pins.map(|(pins, _)| pins);
        let values: Vec<(&str, u64)> = resolved.iter().flatten().flatten().copied().collect();
        for (global, value) in &values {
            loader.override_global(global, value, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let mut sources = Sources::default();
        let mut global_links = Vec::new();
        let mut adopted = Vec::new();
        for ((resource, name, tracepoint, _), globals) in GLOBAL_PROGRAMS.into_iter().zip(resolved) {
            if cgroup_files.contains(&resource) {
                if let Some(pins) = &pins {
                    // An earlier agent's program for a resource now read from files stops.
                    let _ = std::fs::remove_file(pins.link(name));
                }
                tracing::info!(%resource, from = resource.fallback(), "counting from cgroup files, as [monitor] cgroup-file-resources asks");
                continue;
            }
            let attached = globals
                .map_err(EbpfError::KernelLayout)
                .and_then(|_| attach_global(&mut ebpf, &btf, name, tracepoint, pins.as_ref()));
            match attached {
                Ok(attached) => {
                    sources.set(resource, Source::Ebpf);
                    match attached {
                        Attached::Owned(link) => global_links.push((name, link)),
                        Attached::Pinned => {}
                        Attached::Adopted(running) => adopted.push((name, running)),
                    }
                }
                Err(err) => {
                    tracing::warn!(
                        %resource,
                        error = %err,
                        from = resource.fallback(),
                        "the eBPF program cannot run on this kernel; counting from cgroup files instead"
                    );
                }
            }
        }
        if cgroup_files.contains(&Resource::Network) {
            tracing::info!(resource = %Resource::Network, from = Resource::Network.fallback(), "counting from cgroup files, as [monitor] cgroup-file-resources asks");
        } else {
            let loaded = [programs::SKB_INGRESS, programs::SKB_EGRESS].into_iter().try_for_each(|name| {
                let skb: &mut CgroupSkb = program(&mut ebpf, name)?;
                skb.load().map_err(|source| EbpfError::Program { name, source })
            });
            match loaded {
                Ok(()) => sources.set(Resource::Network, Source::Ebpf),
                Err(err) => tracing::warn!(
                    resource = %Resource::Network,
                    error = %err,
                    from = Resource::Network.fallback(),
                    "the eBPF program cannot run on this kernel; counting from cgroup files instead"
                ),
            }
        }

        let mut counters = CounterStore::take_from(&mut ebpf, cpus)?;
        if pins.is_some() {
            let recovered = counters.recover()?;
            if recovered > 0 {
                tracing::info!(cgroups = recovered, "cgroups still counted in the pinned maps");
            }
        }
        let lost_events = match ebpf.take_map(LOST_EVENTS_MAP) {
            Some(map) => {
                Some(PerCpuArray::try_from(map).map_err(|source| EbpfError::Map { name: LOST_EVENTS_MAP, source })?)
            }
            None => None,
        };
        Ok(Self { ebpf, counters, attached: HashMap::new(), sources, lost_events, pins, global_links, adopted })
    }

    /// Whether the counters and links are pinned (they outlive this process).
    pub fn is_pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Cgroups whose counters are registered but whose container this agent has not
    /// attached (yet): after recovery and the first sync with Docker, those of containers
    /// that ended while no agent ran.
    pub fn unattached_registrations(&self) -> Vec<CgroupId> {
        let mut ids = self.counters.registered();
        ids.extend(self.pins.iter().flat_map(PinDir::skb_cgroups));
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|id| !self.attached.contains_key(id));
        ids
    }

    /// Drops a registration no container claims: its last counters, and its links go.
    pub fn forget(&mut self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        self.unpin_skb(id);
        match self.counters.unregister(id) {
            // Only its pinned links were left.
            Err(super::counters::CounterError::NotAttached(_)) => Ok(CgroupCounters::default()),
            other => Ok(other?),
        }
    }

    /// Removes a cgroup's pinned packet-counter links, which detaches them.
    fn unpin_skb(&self, id: CgroupId) {
        if let Some(pins) = &self.pins {
            for direction in SKB_DIRECTIONS {
                let _ = std::fs::remove_file(pins.skb_link(id, direction));
            }
        }
    }

    /// Which resources the programs count; the rest is for the cgroup-file readers.
    pub fn sources(&self) -> Sources {
        self.sources
    }

    /// Stops the global program of `resource` (detached, its pin removed): the cgroup files
    /// count it from now on.
    pub fn use_files_for(&mut self, resource: Resource) {
        let Some((_, name, _, _)) = GLOBAL_PROGRAMS.iter().find(|(r, ..)| *r == resource) else { return };
        self.global_links.retain(|(owner, _)| owner != name);
        self.adopted.retain(|(owner, _)| owner != name);
        if let Some(pins) = &self.pins {
            let _ = std::fs::remove_file(pins.link(name));
        }
        self.sources.set(resource, Source::CgroupFiles);
    }

    /// The ring buffer of OOM kills, for one consumer (`None` once taken, or when the
    /// OOM program is not running).
    pub fn take_oom_events(&mut self) -> Option<RingBuf<MapData>> {
        if !self.sources.ebpf(Resource::Oom) {
            return None;
        }
        self.ebpf.take_map(OOM_EVENTS_MAP).and_then(|map| RingBuf::try_from(map).ok())
    }

    /// Events the programs could not hand to user space because the ring buffer was full.
    pub fn lost_events(&self) -> u64 {
        let Some(map) = &self.lost_events else { return 0 };
        map.get(&0, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// Starts counting a cgroup: registers its id (so the programs count it) and attaches
    /// the packet counters to its directory. `true` when its counters start now; `false` when
    /// they were already counting (recovered from pinned maps).
    pub fn attach(&mut self, id: CgroupId, path: &Path) -> Result<bool, EbpfError> {
        if self.attached.contains_key(&id) {
            return Ok(false);
        }
        let dir = File::open(path).map_err(|source| EbpfError::OpenCgroup { path: path.to_path_buf(), source })?;
        // A cgroup recovered from pinned maps keeps its counts.
        let fresh = self.counters.register(id)?;
        if !self.sources.ebpf(Resource::Network) {
            // An earlier agent's packet counters for this cgroup stop: files count it now.
            self.unpin_skb(id);
            self.attached.insert(id, CgroupLinks::None);
            return Ok(fresh);
        }
        let links = match self.pins.clone() {
            Some(pins) => self.attach_pinned(id, &dir, &pins),
            None => self.attach_owned(&dir),
        };
        match links {
            Ok(links) => {
                self.attached.insert(id, links);
                Ok(fresh)
            }
            Err(err) => {
                let _ = self.counters.unregister(id);
                Err(err)
            }
        }
    }

    /// Packet counters whose links this process owns; nothing half-attached on failure.
    fn attach_owned(&mut self, dir: &File) -> Result<CgroupLinks, EbpfError> {
        let ingress = self.attach_skb(programs::SKB_INGRESS, dir, CgroupSkbAttachType::Ingress)?;
        match self.attach_skb(programs::SKB_EGRESS, dir, CgroupSkbAttachType::Egress) {
            Ok(egress) => Ok(CgroupLinks::Owned(ingress, egress)),
            Err(err) => {
                let _ = self.skb_program(programs::SKB_INGRESS).and_then(|p| detach_link(p, ingress));
                Err(err)
            }
        }
    }

    /// Packet counters pinned under `pins`: adopted when an earlier agent's are still there.
    fn attach_pinned(&mut self, id: CgroupId, dir: &File, pins: &PinDir) -> Result<CgroupLinks, EbpfError> {
        let directions = [
            (programs::SKB_INGRESS, CgroupSkbAttachType::Ingress, SKB_DIRECTIONS[0]),
            (programs::SKB_EGRESS, CgroupSkbAttachType::Egress, SKB_DIRECTIONS[1]),
        ];
        for (name, attach_type, direction) in directions {
            let pin = pins.skb_link(id, direction);
            if let Err(err) = self.attach_pinned_skb(name, attach_type, dir, &pin) {
                self.unpin_skb(id);
                return Err(err);
            }
        }
        Ok(CgroupLinks::Pinned)
    }

    fn attach_pinned_skb(
        &mut self,
        name: &'static str,
        attach_type: CgroupSkbAttachType,
        dir: &File,
        pin: &Path,
    ) -> Result<(), EbpfError> {
        let at = |source| EbpfError::Program { name, source };
        let running = {
            let own = self.skb_program(name)?.fd().map_err(at)?.as_fd();
            adopt_link(pin, own)
        };
        if let Some(running) = running {
            self.note_adopted(name, running);
            return Ok(());
        }
        let link_id = self.attach_skb(name, dir, attach_type)?;
        let link = self.skb_program(name)?.take_link(link_id).map_err(at)?;
        let link = FdLink::try_from(link).map_err(|err| EbpfError::Pin { name, reason: err.to_string() })?;
        pin_link(link, pin, name)
    }

    /// Keeps one descriptor per distinct running program adopted from pins, for its stats.
    fn note_adopted(&mut self, name: &'static str, running: OwnedFd) {
        let id = |fd: &OwnedFd| object_info::<bpf_prog_info>(fd.as_fd()).map(|info| info.id).ok();
        let new_id = id(&running);
        if !self.adopted.iter().any(|(other, fd)| *other == name && id(fd) == new_id) {
            self.adopted.push((name, running));
        }
    }

    /// Stops counting a cgroup and returns what it counted last.
    pub fn detach(&mut self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        let links = self.attached.remove(&id).ok_or(EbpfError::NotAttached(id))?;
        // Detaching fails harmlessly when the cgroup is already gone with its links.
        if let CgroupLinks::Owned(ingress, egress) = links {
            let _ = self.skb_program(programs::SKB_INGRESS).and_then(|p| detach_link(p, ingress));
            let _ = self.skb_program(programs::SKB_EGRESS).and_then(|p| detach_link(p, egress));
        }
        self.forget(id)
    }

    /// The cgroup's counters, summed over CPUs, read now.
    pub fn read(&self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        Ok(self.counters.read(id)?)
    }

    /// Where an attached cgroup's counters are, for [`EbpfMonitor::read_handle`] (valid until
    /// it is detached or its baseline seeded).
    pub fn handle(&self, id: CgroupId) -> Result<CounterHandle, EbpfError> {
        Ok(self.counters.handle(id)?)
    }

    /// The counters a handle points at, read now without looking anything up.
    pub fn read_handle(&self, handle: &CounterHandle) -> Result<CgroupCounters, EbpfError> {
        Ok(self.counters.read_handle(handle)?)
    }

    /// Sets a freshly attached cgroup's CPU baseline from its cgroup files (see
    /// [`CounterStore::seed_cpu_baseline`]): its counters then equal the kernel's accounting
    /// from the cgroup's first instruction on.
    pub fn seed_cpu_baseline(
        &mut self,
        id: CgroupId,
        read_files: impl FnMut() -> std::io::Result<u64>,
    ) -> Result<CgroupCounters, EbpfError> {
        Ok(self.counters.seed_cpu_baseline(id, read_files)?)
    }

    /// What the kernel measured of each program (advances while `kernel.bpf_stats_enabled=1`).
    /// The programs an earlier agent left running count as the same program.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        running_program_stats(
            &self.ebpf,
            &[
                programs::SCHED_STAT_RUNTIME,
                programs::SKB_INGRESS,
                programs::SKB_EGRESS,
                programs::BLOCK_BIO_QUEUE,
                programs::MARK_VICTIM,
            ],
            &self.adopted,
        )
    }

    /// (cgroups in direct slots, cgroups in the overflow map)
    pub fn occupancy(&self) -> (usize, usize) {
        self.counters.occupancy()
    }

    /// (direct slots, overflow entries): how many cgroups each can hold.
    pub fn capacity(&self) -> (usize, usize) {
        (SLOTS as usize, MAX_OVERFLOW_CGROUPS as usize)
    }

    pub fn is_attached(&self, id: CgroupId) -> bool {
        self.attached.contains_key(&id)
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    fn attach_skb(
        &mut self,
        name: &'static str,
        dir: &File,
        attach_type: CgroupSkbAttachType,
    ) -> Result<CgroupSkbLinkId, EbpfError> {
        // On kernels with bpf_link (5.7+) aya attaches through a link, which always
        // coexists with other programs and must be created with no flags: `Single` is 0.
        self.skb_program(name)?
            .attach(dir, attach_type, CgroupAttachMode::Single)
            .map_err(|source| EbpfError::Program { name, source })
    }

    fn skb_program(&mut self, name: &'static str) -> Result<&mut CgroupSkb, EbpfError> {
        program(&mut self.ebpf, name)
    }
}

/// Empty programs on the counters' hooks (`sched_stat_runtime`, `block_bio_queue`, and
/// ingress and egress of one cgroup), loaded beside the agent by the benchmark to measure the
/// floor any program pays.
pub struct BaselinePrograms {
    ebpf: Ebpf,
    _links: Vec<FdLink>,
}

impl BaselinePrograms {
    pub fn load(cgroup: &Path) -> Result<Self, EbpfError> {
        let btf = Btf::from_sys_fs()?;
        let mut ebpf = EbpfLoader::new().btf(Some(&btf)).load(EBPF_OBJECT)?;
        let mut links = Vec::new();
        for (name, tracepoint) in [
            (programs::BASELINE_SCHED_STAT_RUNTIME, "sched_stat_runtime"),
            (programs::BASELINE_BLOCK_BIO_QUEUE, "block_bio_queue"),
        ] {
            if let Attached::Owned(link) = attach_global(&mut ebpf, &btf, name, tracepoint, None)? {
                links.push(link);
            }
        }
        let name = programs::BASELINE_SKB;
        let at = |source| EbpfError::Program { name, source };
        let dir = File::open(cgroup).map_err(|source| EbpfError::OpenCgroup { path: cgroup.to_path_buf(), source })?;
        let skb: &mut CgroupSkb = program(&mut ebpf, name)?;
        skb.load().map_err(at)?;
        skb.attach(&dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single).map_err(at)?;
        skb.attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single).map_err(at)?;
        Ok(Self { ebpf, _links: links })
    }

    pub fn stats(&self) -> Vec<ProgramStats> {
        loaded_program_stats(
            &self.ebpf,
            &[programs::BASELINE_SCHED_STAT_RUNTIME, programs::BASELINE_SKB, programs::BASELINE_BLOCK_BIO_QUEUE],
        )
    }
}

/// The kernel's cost accounting of each named program loaded in `ebpf`, with the programs an
/// earlier agent left running (`adopted`, by name) counted as the same program.
pub(crate) fn running_program_stats(
    ebpf: &Ebpf,
    names: &[&'static str],
    adopted: &[(&'static str, OwnedFd)],
) -> Vec<ProgramStats> {
    let mut stats = loaded_program_stats(ebpf, names);
    for (name, fd) in adopted {
        let Ok(adopted) = kernel_program_stats(name, fd.as_fd()) else { continue };
        match stats.iter_mut().find(|s| s.name == *name) {
            Some(own) => {
                own.run_time_ns += adopted.run_time_ns;
                own.run_count += adopted.run_count;
            }
            None => stats.push(adopted),
        }
    }
    stats
}

/// The kernel's cost accounting of each named program that is loaded in `ebpf`.
fn loaded_program_stats(ebpf: &Ebpf, names: &[&'static str]) -> Vec<ProgramStats> {
    names
        .iter()
        .filter_map(|&name| {
            let fd = ebpf.program(name)?.fd().ok()?;
            match kernel_program_stats(name, fd.as_fd()) {
                Ok(stats) => Some(stats),
                Err(err) => {
                    tracing::debug!(program = name, error = %err, "reading program stats failed");
                    None
                }
            }
        })
        .collect()
}

/// The kernel's own cost accounting of one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// A program's run time and count (aya 0.14 does not expose them).
pub(crate) fn kernel_program_stats(name: &'static str, fd: BorrowedFd<'_>) -> std::io::Result<ProgramStats> {
    let info: bpf_prog_info = object_info(fd)?;
    Ok(ProgramStats { name, run_time_ns: info.run_time_ns, run_count: info.run_cnt })
}

fn detach_link(program: &mut CgroupSkb, link: CgroupSkbLinkId) -> Result<(), EbpfError> {
    program.detach(link).map_err(|source| EbpfError::Program { name: "cgroup_skb", source })
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::MissingProgram(name))?;
    program.try_into().map_err(|source| EbpfError::Program { name, source })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads a valid struct; failure only matters on old kernels.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels with memcg-based BPF accounting");
    }
}
