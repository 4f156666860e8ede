//! Measuring kernel containers: which containers are counted, attaching and detaching
//! their cgroups as Docker reports them, and sampling eBPF counters and cgroup files
//! every interval (with the node's own totals).

pub mod accel;
pub mod btf;
pub mod cgroup;
pub mod counters;
pub mod cputime;
pub mod ebpf;
pub mod files;
pub mod node;
pub mod oom;
pub mod pins;
pub mod selfcheck;
pub mod snapshot;
pub mod sources;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{CgroupCounters, CgroupId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    docker::{ContainerEvent, KernelContainer},
    resources::compute::ComputePlugin,
};
pub use cgroup::{CgroupLayout, ContainerCgroups, UnifiedCgroup};
pub use cputime::CpuSplit;
pub use ebpf::{EbpfError, EbpfMonitor, ProgramStats};
pub use files::{ContainerReadings, CpuThrottling, MemoryStats};
pub use snapshot::{ContainerSample, MapUsage, MonitorSnapshot, SnapshotSink};
pub use sources::{Resource, Source, Sources};

/// How many passes a snapshot keeps reporting a container that ended while no agent ran.
const ENDED_RUNS_PASSES: u64 = 60;

/// One kernel container as the monitor knows it.
struct Tracked {
    kernel: Arc<KernelContainer>,
    /// The cgroup being counted while the container runs.
    cgroup: Option<UnifiedCgroup>,
    /// Where its counters are (looked up once, at attach).
    counters: Option<counters::CounterHandle>,
    /// Its cgroup files, while it runs.
    readers: Option<files::CgroupReaders>,
    /// What earlier runs of this container counted (a restart gets a new cgroup).
    retired: CgroupCounters,
    /// The last reading of the current cgroup (counters of this run only).
    current: ContainerReadings,
    /// When it stopped; its series are dropped a grace period later.
    stopped_at: Option<Instant>,
    /// The user/system split of the CPU time of every run.
    split: CpuSplit,
}

impl Tracked {
    /// The current readings with the counters of every run, and their CPU time split.
    fn total(&mut self) -> ContainerReadings {
        let mut total = self.current;
        total.counters = self.retired;
        total.counters.accumulate(&self.current.counters);
        let basis = &total.cpu_files;
        total.cpu_time = self.split.update(total.counters.cpu_ns, basis.user_ns, basis.system_ns);
        total
    }
}

/// Copies the fields of the resources eBPF counts from `ebpf` into `counters`.
fn take_ebpf_fields(sources: &Sources, counters: &mut CgroupCounters, ebpf: &CgroupCounters) {
    if sources.ebpf(Resource::Cpu) {
        counters.cpu_ns = ebpf.cpu_ns;
    }
    if sources.ebpf(Resource::Network) {
        (counters.rx_bytes, counters.rx_packets) = (ebpf.rx_bytes, ebpf.rx_packets);
        (counters.tx_bytes, counters.tx_packets) = (ebpf.tx_bytes, ebpf.tx_packets);
    }
    if sources.ebpf(Resource::BlockIo) {
        (counters.io_read_bytes, counters.io_read_ops) = (ebpf.io_read_bytes, ebpf.io_read_ops);
        (counters.io_write_bytes, counters.io_write_ops) = (ebpf.io_write_bytes, ebpf.io_write_ops);
    }
    if sources.ebpf(Resource::Oom) {
        counters.oom_kills = ebpf.oom_kills;
    }
}

/// Counts what a freshly attached cgroup ran before its counters started (a kernel's start-up,
/// or all of it when the agent came later) from its files; without them it counts from now.
fn seed_cpu_baseline(ebpf: &mut EbpfMonitor, cgroups: &ContainerCgroups, buf: &mut Vec<u8>) {
    let id = cgroups.unified.id;
    match ebpf.seed_cpu_baseline(id, || files::read_cpu_total(cgroups, buf)) {
        Ok(baseline) => {
            tracing::debug!(
                cgroup_id = id,
                cpu_ns = baseline.cpu_ns,
                "CPU time before counting started, from the cgroup files"
            )
        }
        Err(err) => tracing::warn!(
            cgroup_id = id,
            error = %err,
            "cannot read what the cgroup ran before counting started; its CPU time counts from now"
        ),
    }
}

/// Attaches, samples and lets go of kernel containers.
pub struct ContainerMonitor {
    ebpf: EbpfMonitor,
    sources: Sources,
    layout: CgroupLayout,
    tracked: HashMap<String, Tracked>,
    grace: Duration,
    node: node::NodeReader,
    accelerators: Vec<Box<dyn ComputePlugin>>,
    /// One buffer for every file read.
    buf: Vec<u8>,
    /// Sampling passes so far.
    passes: u64,
    /// Whether a Docker snapshot has been applied.
    synced: bool,
    /// Counters of containers that ended while no agent ran, and the pass that found them.
    ended_runs: Vec<(CgroupId, CgroupCounters, u64)>,
    /// The start-up check of the CPU program, when it ran.
    cpu_check: Option<selfcheck::CpuCheck>,
    /// The programs' run time and count as last read (see [`ContainerMonitor::program_stats`]).
    program_stats: Vec<ProgramStats>,
    /// `kernel.bpf_stats_enabled`, read every [`PROGRAM_STATS_EVERY`]th pass.
    bpf_stats: Option<files::StatFile>,
    bpf_stats_enabled: bool,
    /// Ring-buffer losses as last read (see [`ContainerMonitor::lost_events`]).
    lost_events: u64,
    /// The node and its devices are read every this many passes (the stats interval), and
    /// their last readings published in between.
    node_every: u64,
    last_node: node::NodeReadings,
    last_devices: Vec<crate::resources::compute::DeviceReadings>,
    /// Per kernel and device, the accelerator use of its processes, read with the devices.
    last_accel_use: Vec<accel::KernelDeviceUse>,
}

/// Without `kernel.bpf_stats_enabled` the kernel does not advance the programs' run time and
/// count, so they are read (and the setting checked) only this often.
const PROGRAM_STATS_EVERY: u64 = 10;

impl ContainerMonitor {
    pub fn new(
        ebpf: EbpfMonitor,
        layout: CgroupLayout,
        grace: Duration,
        node: node::NodeReader,
        accelerators: Vec<Box<dyn ComputePlugin>>,
    ) -> Self {
        let sources = ebpf.sources();
        Self {
            ebpf,
            sources,
            layout,
            tracked: HashMap::new(),
            grace,
            node,
            accelerators,
            buf: Vec::with_capacity(8192),
            passes: 0,
            synced: false,
            ended_runs: Vec::new(),
            cpu_check: None,
            program_stats: Vec::new(),
            bpf_stats: files::StatFile::open("/proc/sys/kernel/bpf_stats_enabled".into()).ok(),
            bpf_stats_enabled: true,
            lost_events: 0,
            node_every: 1,
            last_node: node::NodeReadings::default(),
            last_devices: Vec::new(),
            last_accel_use: Vec::new(),
        }
    }

    /// Reads the node and its devices every `passes` passes (at least every pass): their
    /// consumers (the manager's stats, Prometheus) look at them every stats interval, and
    /// reading them costs about as much as a few kernels.
    pub fn with_node_every(mut self, passes: u64) -> Self {
        self.node_every = passes.max(1);
        self
    }

    /// The node's and devices' readings (with the kernels' use of the devices), read afresh
    /// when this pass is one of their turn; `true` when they are fresh.
    #[allow(clippy::type_complexity)]
    fn node_and_devices(
        &mut self,
    ) -> (node::NodeReadings, Vec<crate::resources::compute::DeviceReadings>, Vec<accel::KernelDeviceUse>, bool) {
        let fresh = self.passes.is_multiple_of(self.node_every);
        if fresh {
            self.last_node = self.node.read(&mut self.buf);
            // Processes first: the mock's device readings are the sums over its processes.
            self.last_accel_use = self.kernel_accelerator_use();
            self.last_devices = self.measure_accelerators();
        }
        (self.last_node.clone(), self.last_devices.clone(), self.last_accel_use.clone(), fresh)
    }

    /// Each running kernel's use of each device, from the processes of its cgroup.
    fn kernel_accelerator_use(&mut self) -> Vec<accel::KernelDeviceUse> {
        if self.accelerators.is_empty() {
            return Vec::new();
        }
        let kernels: Vec<accel::KernelCgroup> = self
            .tracked
            .values()
            .filter_map(|t| {
                Some(accel::KernelCgroup { kernel: t.kernel.clone(), path: t.cgroup.as_ref()?.path.clone() })
            })
            .collect();
        accel::sample(&mut self.accelerators, &self.layout.unified_root, &kernels, &mut self.buf)
    }

    /// The programs' cost: read every pass while `kernel.bpf_stats_enabled=1` (when it moves),
    /// else every [`PROGRAM_STATS_EVERY`]th pass.
    fn program_stats(&mut self) -> Vec<ProgramStats> {
        if self.passes.is_multiple_of(PROGRAM_STATS_EVERY) {
            self.bpf_stats_enabled = match &self.bpf_stats {
                Some(file) => file.read_u64(&mut self.buf).ok().flatten() != Some(0),
                None => true,
            };
        }
        if self.bpf_stats_enabled || self.passes.is_multiple_of(PROGRAM_STATS_EVERY) {
            self.program_stats = self.ebpf.program_stats();
        }
        self.program_stats.clone()
    }

    /// Events the programs could not hand over: a count that is rarely anything but zero, read
    /// (a syscall) every [`PROGRAM_STATS_EVERY`]th pass.
    fn lost_events(&mut self) -> u64 {
        if self.passes.is_multiple_of(PROGRAM_STATS_EVERY) {
            self.lost_events = self.ebpf.lost_events();
        }
        self.lost_events
    }

    /// Reports the start-up check of the CPU program (see [`selfcheck`]) in every snapshot.
    pub fn with_cpu_check(mut self, check: Option<selfcheck::CpuCheck>) -> Self {
        self.cpu_check = check;
        self
    }

    /// Every accelerator plugin's devices; a plugin that fails is left out of this sample.
    fn measure_accelerators(&mut self) -> Vec<crate::resources::compute::DeviceReadings> {
        self.accelerators
            .iter_mut()
            .filter_map(|plugin| match plugin.measure() {
                Ok(readings) => Some(readings),
                Err(err) => {
                    tracing::warn!(plugin = plugin.key(), error = %err, "measuring accelerators failed");
                    None
                }
            })
            .collect()
    }

    pub fn sources(&self) -> Sources {
        self.sources
    }

    /// The kernel container whose cgroup has this id, if it is counted now.
    pub fn container_of_cgroup(&self, id: CgroupId) -> Option<&KernelContainer> {
        self.tracked.values().find(|t| t.cgroup.as_ref().is_some_and(|c| c.id == id)).map(|t| t.kernel.as_ref())
    }

    pub fn handle(&mut self, event: ContainerEvent) {
        match event {
            ContainerEvent::Snapshot(running) => {
                let live: Vec<String> = running.iter().map(|k| k.container_id.clone()).collect();
                let gone: Vec<String> = self
                    .tracked
                    .iter()
                    .filter(|(id, tracked)| tracked.cgroup.is_some() && !live.contains(id))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in gone {
                    self.stopped(&id);
                }
                let resolved: Vec<_> = running
                    .into_iter()
                    .map(|kernel| {
                        let cgroups = self.layout.container_cgroups(kernel.pid);
                        (kernel, cgroups)
                    })
                    .collect();
                // Stale registrations go before the running kernels attach, so that none of
                // these finds its direct slot held by a container that is gone.
                let claimed: Vec<CgroupId> =
                    resolved.iter().filter_map(|(_, cgroups)| cgroups.as_ref().ok().map(|c| c.unified.id)).collect();
                self.forget_unclaimed(&claimed);
                for (kernel, cgroups) in resolved {
                    self.attach_resolved(kernel, cgroups);
                }
                self.synced = true;
            }
            ContainerEvent::Started(kernel) => self.started(kernel),
            ContainerEvent::Stopped { container_id } | ContainerEvent::Removed { container_id } => {
                self.stopped(&container_id)
            }
        }
    }

    /// Lets go of counters an earlier agent registered for containers that are gone now
    /// (they ended while no agent ran): neither attached nor among Docker's running kernels.
    fn forget_unclaimed(&mut self, claimed: &[CgroupId]) {
        for id in self.ebpf.unattached_registrations().into_iter().filter(|id| !claimed.contains(id)) {
            match self.ebpf.forget(id) {
                Ok(last) => {
                    tracing::info!(
                        cgroup_id = id,
                        cpu_ns = last.cpu_ns,
                        "counters of a container that ended while no agent ran; let go"
                    );
                    self.ended_runs.push((id, last, self.passes));
                }
                Err(err) => tracing::warn!(cgroup_id = id, error = %err, "letting go of stale counters failed"),
            }
        }
    }

    fn started(&mut self, kernel: KernelContainer) {
        let cgroups = self.layout.container_cgroups(kernel.pid);
        self.attach_resolved(kernel, cgroups);
    }

    fn attach_resolved(&mut self, kernel: KernelContainer, cgroups: Result<ContainerCgroups, cgroup::CgroupError>) {
        let cgroups = match cgroups {
            Ok(cgroups) => cgroups,
            Err(err) => {
                tracing::warn!(container_id = %kernel.container_id, error = %err, "cannot resolve the container's cgroup; not counting it");
                return;
            }
        };
        let cgroup = cgroups.unified.clone();
        let tracked = self.tracked.entry(kernel.container_id.clone()).or_insert_with(|| Tracked {
            kernel: Arc::new(kernel.clone()),
            cgroup: None,
            counters: None,
            readers: None,
            retired: CgroupCounters::default(),
            current: ContainerReadings::default(),
            stopped_at: None,
            split: CpuSplit::default(),
        });
        if tracked.cgroup.as_ref() == Some(&cgroup) {
            return; // a replayed start of what is already counted
        }
        if let Some(old) = tracked.cgroup.take() {
            tracked.counters = None;
            if let Ok(last) = self.ebpf.detach(old.id) {
                take_ebpf_fields(&self.sources, &mut tracked.current.counters, &last);
            }
            tracked.retired.accumulate(&tracked.current.counters);
        }
        let (readers, missing) = files::CgroupReaders::open(&cgroups, kernel.pid, &self.sources);
        if !missing.is_empty() {
            tracing::warn!(container_id = %kernel.container_id, missing = %missing.join("; "), "some cgroup files cannot be read; those numbers stay at zero");
        }
        tracked.readers = Some(readers);
        tracked.kernel = Arc::new(kernel);
        tracked.current = ContainerReadings::default();
        tracked.stopped_at = None;
        match self.ebpf.attach(cgroup.id, &cgroup.path) {
            Ok(fresh) => {
                if fresh && self.sources.ebpf(Resource::Cpu) {
                    seed_cpu_baseline(&mut self.ebpf, &cgroups, &mut self.buf);
                }
                tracked.counters = self.ebpf.handle(cgroup.id).ok();
                tracing::info!(
                    container_id = %tracked.kernel.container_id,
                    kernel_id = %tracked.kernel.kernel_id,
                    cgroup = %cgroup.path.display(),
                    cgroup_id = cgroup.id,
                    "counting kernel container"
                );
                tracked.cgroup = Some(cgroup);
            }
            Err(err) => {
                tracing::warn!(container_id = %tracked.kernel.container_id, error = %err, "cannot attach eBPF programs");
                tracked.stopped_at = Some(Instant::now());
            }
        }
    }

    fn stopped(&mut self, container_id: &str) {
        let Some(tracked) = self.tracked.get_mut(container_id) else {
            return;
        };
        if let Some(cgroup) = tracked.cgroup.take() {
            tracked.counters = None;
            // The files of a gone cgroup cannot be read; eBPF's map still has its last counts.
            tracked.readers = None;
            match self.ebpf.detach(cgroup.id) {
                Ok(last) => take_ebpf_fields(&self.sources, &mut tracked.current.counters, &last),
                Err(err) => {
                    tracing::warn!(container_id, error = %err, "reading final counters failed")
                }
            }
            let current = std::mem::take(&mut tracked.current.counters);
            tracked.retired.accumulate(&current);
            tracing::info!(container_id, "kernel container stopped; let go of its cgroup");
        }
        tracked.stopped_at.get_or_insert_with(Instant::now);
    }

    /// Reads every attached cgroup and drops containers whose grace has passed.
    pub fn sample(&mut self, now: Instant) -> Vec<ContainerSample> {
        let grace = self.grace;
        self.tracked.retain(|_, tracked| tracked.stopped_at.is_none_or(|at| now.duration_since(at) < grace));
        let mut samples = Vec::with_capacity(self.tracked.len());
        for tracked in self.tracked.values_mut() {
            if let Some(cgroup) = &tracked.cgroup {
                let read = match &tracked.counters {
                    Some(handle) => self.ebpf.read_handle(handle),
                    None => self.ebpf.read(cgroup.id),
                };
                match read {
                    Ok(counters) => take_ebpf_fields(&self.sources, &mut tracked.current.counters, &counters),
                    Err(err) => {
                        tracing::warn!(container_id = %tracked.kernel.container_id, error = %err, "reading counters failed")
                    }
                }
            }
            if let Some(readers) = &mut tracked.readers
                && let Err(err) = readers.read(&mut self.buf, &mut tracked.current)
            {
                // Usually the container exiting between its last event and this sample.
                tracing::debug!(container_id = %tracked.kernel.container_id, error = %err, "reading cgroup files failed");
            }
            samples.push(ContainerSample {
                kernel: tracked.kernel.clone(),
                readings: tracked.total(),
                cgroup_id: tracked.cgroup.as_ref().map(|c| c.id),
                run: tracked.current.counters,
            });
        }
        samples
    }

    /// A snapshot that also says how many passes the monitor made and how long this one took.
    pub fn timed_snapshot(&mut self) -> MonitorSnapshot {
        let started = Instant::now();
        let mut snapshot = self.snapshot(started);
        self.passes += 1;
        snapshot.passes = self.passes;
        snapshot.pass_duration = started.elapsed();
        snapshot
    }

    /// The ended runs found in the last [`ENDED_RUNS_PASSES`] passes: a reader of snapshots
    /// (which sees only the latest when several come at once) cannot miss them.
    fn recent_ended_runs(&mut self) -> Vec<(CgroupId, CgroupCounters)> {
        let passes = self.passes;
        self.ended_runs.retain(|(_, _, found)| passes < found + ENDED_RUNS_PASSES);
        self.ended_runs.iter().map(|(id, counters, _)| (*id, *counters)).collect()
    }

    /// Samples every container, the node, and the programs' own cost.
    pub fn snapshot(&mut self, now: Instant) -> MonitorSnapshot {
        let (direct, overflow) = self.ebpf.occupancy();
        let (direct_capacity, overflow_capacity) = self.ebpf.capacity();
        let (node, devices, accelerator_use, node_fresh) = self.node_and_devices();
        MonitorSnapshot {
            taken_at: std::time::SystemTime::now(),
            synced: self.synced,
            ended_runs: self.recent_ended_runs(),
            containers: self.sample(now),
            node,
            devices,
            accelerator_use,
            node_fresh,
            attached_cgroups: self.ebpf.attached_count(),
            programs: self.program_stats(),
            sources: self.sources,
            lost_events: self.lost_events(),
            cpu_check: self.cpu_check,
            maps: vec![
                MapUsage { map: agent_common::SLOTS_MAP, entries: direct, capacity: direct_capacity },
                MapUsage { map: agent_common::COUNTERS_MAP, entries: overflow, capacity: overflow_capacity },
            ],
            ..MonitorSnapshot::default()
        }
    }

    /// Lets go of every cgroup (the containers keep running).
    pub fn detach_all(&mut self) {
        let ids: Vec<String> = self.tracked.keys().cloned().collect();
        for id in ids {
            self.stopped(&id);
        }
    }
}

/// The monitor's task: applies container events as they come and publishes a sample
/// every `interval`. On shutdown it takes a last sample, then detaches everything.
pub async fn run_monitor(
    mut monitor: ContainerMonitor,
    mut events: mpsc::Receiver<ContainerEvent>,
    interval: Duration,
    metrics: Arc<dyn SnapshotSink>,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut ticker = crate::clock::Clock::new(interval);
    let mut ooms = monitor.ebpf.take_oom_events().and_then(|ring| match oom::OomEvents::new(ring) {
        Ok(events) => Some(events),
        Err(err) => {
            tracing::warn!(error = %err, "cannot follow OOM kill events; they are still counted");
            None
        }
    });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            kills = oom::next_kills(&mut ooms) => {
                for kill in kills {
                    match monitor.container_of_cgroup(kill.cgroup_id) {
                        Some(kernel) => tracing::warn!(
                            kernel_id = %kernel.kernel_id,
                            container_id = %kernel.container_id,
                            pid = kill.pid,
                            comm = %kill.comm,
                            "the OOM killer killed a process of a kernel"
                        ),
                        None => tracing::debug!(cgroup_id = kill.cgroup_id, pid = kill.pid, comm = %kill.comm, "OOM kill outside kernel containers"),
                    }
                }
            }
            event = events.recv() => match event {
                Some(event) => {
                    let snapshot = matches!(event, ContainerEvent::Snapshot(_));
                    monitor.handle(event);
                    if snapshot {
                        metrics.publish(monitor.timed_snapshot());
                        synced.send_replace(true);
                    }
                }
                None => break,
            },
            _ = ticker.tick() => metrics.publish(monitor.timed_snapshot()),
        }
    }
    metrics.publish(monitor.timed_snapshot());
    if monitor.ebpf.is_pinned() {
        // The pinned programs keep counting; the next agent takes over their counts.
        tracing::info!("leaving the eBPF programs counting (pinned) for the next agent");
    } else {
        monitor.detach_all();
        tracing::info!("detached from every kernel container");
    }
}
