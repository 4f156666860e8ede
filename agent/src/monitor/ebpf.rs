//! The eBPF object in user space: loaded once, the tracepoint programs (`sched_switch`,
//! `block_bio_queue`, `mark_victim`) attached globally, `cgroup_skb` programs attached per
//! container cgroup, counters read from the maps, and which resource each program covers.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use agent_common::{
    CgroupCounters, CgroupId, LOST_EVENTS_MAP, MAX_OVERFLOW_CGROUPS, OOM_EVENTS_MAP, SLOTS, offsets, programs,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError, cgroup_skb::CgroupSkbLinkId,
    },
    util::nr_cpus,
};
use aya_obj::generated::bpf_prog_info;

use super::{
    btf::{BtfError, KernelBtf},
    counters::CounterStore,
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
    #[error("finding the fields the program reads in kernel BTF: {0}")]
    KernelLayout(#[from] BtfError),
}

/// Links of the per-cgroup programs for one attached cgroup.
#[derive(Default)]
struct CgroupLinks {
    /// `None` while network is counted from files.
    skb: Option<(CgroupSkbLinkId, CgroupSkbLinkId)>,
}

/// The kernel struct fields each program reads: (global, struct, member path).
type FieldOffset = (&'static str, &'static str, &'static [&'static str]);

const CPU_FIELDS: &[FieldOffset] = &[
    (offsets::SUM_EXEC_RUNTIME, "task_struct", &["se", "sum_exec_runtime"]),
    (offsets::PREV_SUM_EXEC_RUNTIME, "task_struct", &["se", "prev_sum_exec_runtime"]),
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

/// The global program of each tracepoint-counted resource: (resource, program, tracepoint, fields).
const TRACEPOINT_PROGRAMS: [(Resource, &str, &str, &[FieldOffset]); 3] = [
    (Resource::Cpu, programs::SCHED_SWITCH, "sched_switch", CPU_FIELDS),
    (Resource::BlockIo, programs::BLOCK_BIO_QUEUE, "block_bio_queue", BLOCK_IO_FIELDS),
    (Resource::Oom, programs::MARK_VICTIM, "mark_victim", OOM_FIELDS),
];

/// The loaded programs and the counters map. Dropping it detaches everything.
pub struct EbpfMonitor {
    ebpf: Ebpf,
    counters: CounterStore,
    attached: HashMap<CgroupId, CgroupLinks>,
    sources: Sources,
    lost_events: Option<PerCpuArray<MapData, u64>>,
}

impl EbpfMonitor {
    /// Loads the object and attaches the global programs of every resource not in
    /// `cgroup_files`. A program that cannot load or attach here (a missing hook or kernel
    /// field) leaves its resource to the cgroup-file readers, logged once; only an object
    /// that cannot load at all, or a broken counters map, is an error.
    pub fn load(cgroup_files: &[Resource]) -> Result<Self, EbpfError> {
        raise_memlock_limit();
        let btf = Btf::from_sys_fs()?;
        let kernel_types = KernelBtf::from_sys_fs()?;
        let mut loader = EbpfLoader::new();
        loader.btf(Some(&btf));
        // Offsets of the fields each program reads; a resource whose fields this kernel
        // lacks is counted from files. Unresolved globals stay 0 (their program is not loaded).
        let resolved: Vec<Result<Vec<u64>, BtfError>> = TRACEPOINT_PROGRAMS
            .iter()
            .map(|(_, _, _, fields)| {
                fields.iter().map(|&(_, strukt, path)| kernel_types.member_offset(strukt, path)).collect()
            })
            .collect();
        for ((_, _, _, fields), offsets) in TRACEPOINT_PROGRAMS.iter().zip(&resolved) {
            for ((global, _, _), at) in fields.iter().zip(offsets.iter().flatten()) {
                loader.override_global(global, at, true);
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let mut sources = Sources::default();
        for ((resource, name, tracepoint, _), offsets) in TRACEPOINT_PROGRAMS.into_iter().zip(resolved) {
            if cgroup_files.contains(&resource) {
                tracing::info!(%resource, from = resource.fallback(), "counting from cgroup files, as [monitor] cgroup-file-resources asks");
                continue;
            }
            let attached = offsets.map_err(EbpfError::KernelLayout).and_then(|_| {
                let at = |source| EbpfError::Program { name, source };
                let program: &mut BtfTracePoint = program(&mut ebpf, name)?;
                program.load(tracepoint, &btf).map_err(at)?;
                program.attach().map_err(at)?;
                Ok(())
            });
            match attached {
                Ok(()) => sources.set(resource, Source::Ebpf),
                Err(err) => tracing::warn!(
                    %resource,
                    error = %err,
                    from = resource.fallback(),
                    "the eBPF program cannot run on this kernel; counting from cgroup files instead"
                ),
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

        let cpus = nr_cpus().map_err(|(path, err)| EbpfError::Cpus(format!("{path}: {err}")))?;
        let counters = CounterStore::take_from(&mut ebpf, cpus)?;
        let lost_events = match ebpf.take_map(LOST_EVENTS_MAP) {
            Some(map) => {
                Some(PerCpuArray::try_from(map).map_err(|source| EbpfError::Map { name: LOST_EVENTS_MAP, source })?)
            }
            None => None,
        };
        Ok(Self { ebpf, counters, attached: HashMap::new(), sources, lost_events })
    }

    /// Which resources the programs count; the rest is for the cgroup-file readers.
    pub fn sources(&self) -> Sources {
        self.sources
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

    /// Starts counting a cgroup: registers its id (so `sched_switch` counts it) and
    /// attaches the packet counters to its directory.
    pub fn attach(&mut self, id: CgroupId, path: &Path) -> Result<(), EbpfError> {
        if self.attached.contains_key(&id) {
            return Ok(());
        }
        let dir = File::open(path).map_err(|source| EbpfError::OpenCgroup { path: path.to_path_buf(), source })?;
        self.counters.register(id)?;
        if !self.sources.ebpf(Resource::Network) {
            self.attached.insert(id, CgroupLinks::default());
            return Ok(());
        }

        let ingress = self.attach_skb(programs::SKB_INGRESS, &dir, CgroupSkbAttachType::Ingress);
        let egress = self.attach_skb(programs::SKB_EGRESS, &dir, CgroupSkbAttachType::Egress);
        match (ingress, egress) {
            (Ok(ingress), Ok(egress)) => {
                self.attached.insert(id, CgroupLinks { skb: Some((ingress, egress)) });
                Ok(())
            }
            (ingress, egress) => {
                // Leave nothing half-attached.
                let mut failure = None;
                match ingress {
                    Ok(link) => {
                        let _ = self.skb_program(programs::SKB_INGRESS).and_then(|p| detach_link(p, link));
                    }
                    Err(err) => failure = Some(err),
                }
                match egress {
                    Ok(link) => {
                        let _ = self.skb_program(programs::SKB_EGRESS).and_then(|p| detach_link(p, link));
                    }
                    Err(err) => failure = failure.or(Some(err)),
                }
                let _ = self.counters.unregister(id);
                Err(failure.unwrap_or(EbpfError::NotAttached(id)))
            }
        }
    }

    /// Stops counting a cgroup and returns what it counted last.
    pub fn detach(&mut self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        let links = self.attached.remove(&id).ok_or(EbpfError::NotAttached(id))?;
        // Detaching fails harmlessly when the cgroup is already gone with its links.
        if let Some((ingress, egress)) = links.skb {
            let _ = self.skb_program(programs::SKB_INGRESS).and_then(|p| detach_link(p, ingress));
            let _ = self.skb_program(programs::SKB_EGRESS).and_then(|p| detach_link(p, egress));
        }
        self.counters.unregister(id)
    }

    /// The cgroup's counters, summed over CPUs, read now.
    pub fn read(&self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        self.counters.read(id)
    }

    /// Prepares the [`EbpfMonitor::read_sampled`]s of one pass (one batch read when many
    /// cgroups are tracked).
    pub fn refresh(&mut self) {
        self.counters.refresh();
    }

    /// Reads every counter slot at once; false when the kernel cannot batch.
    pub fn refresh_batch(&mut self) -> bool {
        self.counters.refresh_batch()
    }

    /// The cgroup's counters as of the last [`EbpfMonitor::refresh`].
    pub fn read_sampled(&self, id: CgroupId) -> Result<CgroupCounters, EbpfError> {
        self.counters.read_sampled(id)
    }

    /// What the kernel measured of each program (advances while `kernel.bpf_stats_enabled=1`).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        loaded_program_stats(
            &self.ebpf,
            &[
                programs::SCHED_SWITCH,
                programs::SKB_INGRESS,
                programs::SKB_EGRESS,
                programs::BLOCK_BIO_QUEUE,
                programs::MARK_VICTIM,
            ],
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

/// Empty programs on the counters' hooks (`sched_switch`, `block_bio_queue`, and ingress
/// and egress of one cgroup), loaded beside the agent by the benchmark to measure the floor any program pays.
pub struct BaselinePrograms {
    ebpf: Ebpf,
}

impl BaselinePrograms {
    pub fn load(cgroup: &Path) -> Result<Self, EbpfError> {
        let btf = Btf::from_sys_fs()?;
        let mut ebpf = EbpfLoader::new().btf(Some(&btf)).load(EBPF_OBJECT)?;
        let name = programs::BASELINE_SCHED_SWITCH;
        let at = |source| EbpfError::Program { name, source };
        let tracepoint: &mut BtfTracePoint = program(&mut ebpf, name)?;
        tracepoint.load("sched_switch", &btf).map_err(at)?;
        tracepoint.attach().map_err(at)?;
        let name = programs::BASELINE_SKB;
        let at = |source| EbpfError::Program { name, source };
        let dir = File::open(cgroup).map_err(|source| EbpfError::OpenCgroup { path: cgroup.to_path_buf(), source })?;
        let skb: &mut CgroupSkb = program(&mut ebpf, name)?;
        skb.load().map_err(at)?;
        skb.attach(&dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single).map_err(at)?;
        skb.attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single).map_err(at)?;
        let name = programs::BASELINE_BLOCK_BIO_QUEUE;
        let at = |source| EbpfError::Program { name, source };
        let tracepoint: &mut BtfTracePoint = program(&mut ebpf, name)?;
        tracepoint.load("block_bio_queue", &btf).map_err(at)?;
        tracepoint.attach().map_err(at)?;
        Ok(Self { ebpf })
    }

    pub fn stats(&self) -> Vec<ProgramStats> {
        loaded_program_stats(
            &self.ebpf,
            &[programs::BASELINE_SCHED_SWITCH, programs::BASELINE_SKB, programs::BASELINE_BLOCK_BIO_QUEUE],
        )
    }
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

/// `BPF_OBJ_GET_INFO_BY_FD` for a program: aya 0.14 does not expose run time and count.
fn kernel_program_stats(name: &'static str, fd: BorrowedFd<'_>) -> std::io::Result<ProgramStats> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFdAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is plain integers; all-zero is its documented initial state.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?,
        info_len: u32::try_from(std::mem::size_of::<bpf_prog_info>()).map_err(std::io::Error::other)?,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    // SAFETY: attr points to a valid, fully initialised struct whose size is passed, and
    // info outlives the call; the kernel writes at most info_len bytes into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoByFdAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
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
