//! What the monitor saw at one sampling instant ([`MonitorSnapshot`]), and where it hands
//! its snapshots ([`SnapshotSink`]: the metrics state, which derives everything else).

use std::sync::Arc;

use crate::{
    docker::KernelContainer,
    monitor::{ContainerReadings, ProgramStats, Sources, node::NodeReadings},
    resources::compute::DeviceReadings,
};

/// Where the monitor publishes each snapshot.
pub trait SnapshotSink: Send + Sync {
    fn publish(&self, snapshot: MonitorSnapshot);
}

/// One kernel container's readings at the latest sample.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    pub kernel: Arc<KernelContainer>,
    pub readings: ContainerReadings,
    /// The cgroup counted now; None once the container stopped (its counters are final).
    pub cgroup_id: Option<agent_common::CgroupId>,
    /// What the current cgroup counted (its pinned counters from earlier agents included).
    pub run: agent_common::CgroupCounters,
}

/// How full one of the eBPF maps is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

/// What the monitor saw at one sampling instant.
#[derive(Debug, Clone)]
pub struct MonitorSnapshot {
    /// When it was taken (wall clock).
    pub taken_at: std::time::SystemTime,
    /// Whether the monitor has applied Docker's list of running containers (before that, a
    /// kernel missing from `containers` proves nothing).
    pub synced: bool,
    /// Containers that ended while no agent ran: (cgroup id, their last counters), found in
    /// the pinned maps and let go of in one of the last 60 passes.
    pub ended_runs: Vec<(agent_common::CgroupId, agent_common::CgroupCounters)>,
    pub containers: Vec<ContainerSample>,
    pub node: NodeReadings,
    /// Accelerators, per compute plugin.
    pub devices: Vec<DeviceReadings>,
    /// Each running kernel's use of each device (from its processes), read with `devices`.
    pub accelerator_use: Vec<crate::monitor::accel::KernelDeviceUse>,
    /// Whether `node` and `devices` were read in this pass (else they are the last readings).
    pub node_fresh: bool,
    pub attached_cgroups: usize,
    pub programs: Vec<ProgramStats>,
    pub sources: Sources,
    /// Events the eBPF programs could not hand over (ring buffer full).
    pub lost_events: u64,
    /// The start-up check that the CPU program counts what the kernel charges, when it ran.
    pub cpu_check: Option<crate::monitor::selfcheck::CpuCheck>,
    pub maps: Vec<MapUsage>,
    /// Sampling passes the monitor has made, this one included.
    pub passes: u64,
    /// How long this pass took (every container, the node, the devices).
    pub pass_duration: std::time::Duration,
}

impl Default for MonitorSnapshot {
    fn default() -> Self {
        MonitorSnapshot {
            taken_at: std::time::UNIX_EPOCH,
            synced: false,
            ended_runs: Vec::new(),
            containers: Vec::new(),
            node: NodeReadings::default(),
            devices: Vec::new(),
            accelerator_use: Vec::new(),
            node_fresh: true,
            attached_cgroups: 0,
            programs: Vec::new(),
            sources: Sources::default(),
            lost_events: 0,
            cpu_check: None,
            maps: Vec::new(),
            passes: 0,
            pass_duration: std::time::Duration::ZERO,
        }
    }
}
