//! The eBPF side in user space: which containers are counted, attaching and detaching
//! their cgroups as Docker reports them, and sampling the counters every interval.

pub mod btf;
pub mod cgroup;
pub mod counters;
pub mod ebpf;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::CgroupCounters;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    docker::{ContainerEvent, KernelContainer},
    metrics::{ContainerSample, MetricsState, MonitorSnapshot},
};
pub use cgroup::{CgroupLayout, UnifiedCgroup};
pub use ebpf::{EbpfError, EbpfMonitor, ProgramStats};

/// One kernel container as the monitor knows it.
struct Tracked {
    kernel: KernelContainer,
    /// The cgroup being counted while the container runs.
    cgroup: Option<UnifiedCgroup>,
    /// What earlier runs of this container counted (a restart gets a new cgroup).
    retired: CgroupCounters,
    /// The last reading of the current cgroup.
    current: CgroupCounters,
    /// When it stopped; its series are dropped a grace period later.
    stopped_at: Option<Instant>,
}

impl Tracked {
    fn total(&self) -> CgroupCounters {
        let mut total = self.retired;
        total.accumulate(&self.current);
        total
    }
}

/// Attaches, samples and lets go of kernel containers.
pub struct ContainerMonitor {
    ebpf: EbpfMonitor,
    layout: CgroupLayout,
    tracked: HashMap<String, Tracked>,
    grace: Duration,
}

impl ContainerMonitor {
    pub fn new(ebpf: EbpfMonitor, layout: CgroupLayout, grace: Duration) -> Self {
        Self { ebpf, layout, tracked: HashMap::new(), grace }
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
                for kernel in running {
                    self.started(kernel);
                }
            }
            ContainerEvent::Started(kernel) => self.started(kernel),
            ContainerEvent::Stopped { container_id } | ContainerEvent::Removed { container_id } => {
                self.stopped(&container_id)
            }
        }
    }

    fn started(&mut self, kernel: KernelContainer) {
        let cgroup = match self.layout.cgroup_of_pid(kernel.pid) {
            Ok(cgroup) => cgroup,
            Err(err) => {
                tracing::warn!(container_id = %kernel.container_id, error = %err, "cannot resolve the container's cgroup; not counting it");
                return;
            }
        };
        let tracked = self.tracked.entry(kernel.container_id.clone()).or_insert_with(|| Tracked {
            kernel: kernel.clone(),
            cgroup: None,
            retired: CgroupCounters::default(),
            current: CgroupCounters::default(),
            stopped_at: None,
        });
        if tracked.cgroup.as_ref() == Some(&cgroup) {
            return; // a replayed start of what is already counted
        }
        if let Some(old) = tracked.cgroup.take() {
            let last = self.ebpf.detach(old.id).unwrap_or(tracked.current);
            tracked.retired.accumulate(&last);
        }
        tracked.kernel = kernel;
        tracked.current = CgroupCounters::default();
        tracked.stopped_at = None;
        match self.ebpf.attach(cgroup.id, &cgroup.path) {
            Ok(()) => {
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
            match self.ebpf.detach(cgroup.id) {
                Ok(last) => tracked.current = last,
                Err(err) => {
                    tracing::warn!(container_id, error = %err, "reading final counters failed")
                }
            }
            let current = std::mem::take(&mut tracked.current);
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
                match self.ebpf.read(cgroup.id) {
                    Ok(counters) => tracked.current = counters,
                    Err(err) => {
                        tracing::warn!(container_id = %tracked.kernel.container_id, error = %err, "reading counters failed")
                    }
                }
            }
            samples.push(ContainerSample { kernel: tracked.kernel.clone(), counters: tracked.total() });
        }
        samples
    }

    /// Samples every container and the programs' own cost, for `/metrics`.
    pub fn snapshot(&mut self, now: Instant) -> MonitorSnapshot {
        MonitorSnapshot {
            containers: self.sample(now),
            attached_cgroups: self.ebpf.attached_count(),
            programs: self.ebpf.program_stats(),
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
    metrics: Arc<MetricsState>,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = events.recv() => match event {
                Some(event) => {
                    let snapshot = matches!(event, ContainerEvent::Snapshot(_));
                    monitor.handle(event);
                    if snapshot {
                        metrics.publish(monitor.snapshot(Instant::now()));
                        synced.send_replace(true);
                    }
                }
                None => break,
            },
            _ = ticker.tick() => metrics.publish(monitor.snapshot(Instant::now())),
        }
    }
    metrics.publish(monitor.snapshot(Instant::now()));
    monitor.detach_all();
    tracing::info!("detached from every kernel container");
}
