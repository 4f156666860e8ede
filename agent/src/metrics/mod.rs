//! Turns raw readings into what others consume: Prometheus series (cAdvisor-compatible
//! names and the agreed labels, encoded on scrape from the latest snapshot), Backend.AI's
//! measurements for the manager, and the agent's own health numbers.
//!
//! - [`containers`]: the per-container series; [`node`]: the node's and devices' series;
//!   [`accelerators`]: devices under DCGM's names and each kernel's use of each device.
//! - [`agent`], [`kernels`], [`rpc`]: the agent's self-metrics.
//! - [`usage`]: the usage meter's backlog and deliveries.
//! - [`measurements`]: Backend.AI's `current/capacity/pct` shape with moving statistics;
//!   [`stats`] writes it to Redis for the manager.
//! - [`server`]: `/metrics`, `/health`, `/livez`, `/readyz`.

pub mod accelerators;
pub mod agent;
pub mod containers;
pub mod events;
pub mod kernels;
pub mod measurements;
pub mod node;
pub mod policy;
pub mod rpc;
pub mod server;
pub mod stats;
pub mod usage;

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use prometheus_client::{encoding::EncodeLabelSet, registry::Registry};

use crate::docker::KernelContainer;
pub use crate::monitor::snapshot::{ContainerSample, MapUsage, MonitorSnapshot};
pub use measurements::Measurements;

/// Labels on every container series (DESIGN.md "Metrics").
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ContainerLabels {
    pub container_id: String,
    pub kernel_id: String,
    pub session_id: String,
    pub image: String,
    pub owner_user_id: String,
    pub owner_project_id: String,
}

impl From<&KernelContainer> for ContainerLabels {
    fn from(kernel: &KernelContainer) -> Self {
        Self {
            container_id: kernel.container_id.clone(),
            kernel_id: kernel.kernel_id.clone(),
            session_id: kernel.session_id.clone(),
            image: kernel.image.clone(),
            owner_user_id: kernel.owner_user_id.clone(),
            owner_project_id: kernel.owner_project_id.clone(),
        }
    }
}

/// The latest snapshot and the measurements derived from every snapshot so far, shared
/// between the monitor (writer) and scrapes, the stats writer and RPCs (readers).
#[derive(Debug)]
pub struct MetricsState {
    latest: watch::Sender<Arc<MonitorSnapshot>>,
    measurements: Mutex<Measurements>,
    /// How writing the measurements to Redis goes ([`stats::run_stats_writer`]).
    pub stats_writes: stats::StatsWrites,
}

impl Default for MetricsState {
    fn default() -> Self {
        MetricsState {
            latest: watch::Sender::new(Arc::default()),
            measurements: Mutex::default(),
            stats_writes: stats::StatsWrites::default(),
        }
    }
}

impl MetricsState {
    pub fn publish(&self, snapshot: MonitorSnapshot) {
        self.with_measurements(|measurements| measurements.update(&snapshot));
        self.latest.send_replace(Arc::new(snapshot));
    }

    /// Every snapshot from now on (the usage meter follows them).
    pub fn subscribe(&self) -> watch::Receiver<Arc<MonitorSnapshot>> {
        self.latest.subscribe()
    }

    /// Runs `f` on the measurements (briefly: the monitor waits meanwhile).
    pub fn with_measurements<T>(&self, f: impl FnOnce(&mut Measurements) -> T) -> T {
        f(&mut self.measurements.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The latest snapshot; cheap, so a scrape never holds the lock while encoding.
    pub fn latest(&self) -> Arc<MonitorSnapshot> {
        self.latest.borrow().clone()
    }

    /// The last measurements of one kernel (what `destroy_kernel` returns).
    pub fn kernel_measurements(&self, kernel_id: &str) -> Option<rmpv::Value> {
        self.with_measurements(|measurements| measurements.kernel(kernel_id))
    }

    pub fn tracked_containers(&self) -> usize {
        self.latest().containers.len()
    }

    pub fn attached_cgroups(&self) -> usize {
        self.latest().attached_cgroups
    }
}

/// Builds the registry served at `/metrics`.
pub fn registry(state: Arc<MetricsState>, agent_id: &str) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(containers::ContainerCollector(state.clone())));
    registry.register_collector(Box::new(node::NodeCollector(state.clone())));
    registry.register_collector(Box::new(accelerators::AcceleratorCollector::new(state.clone())));
    registry.register_collector(Box::new(measurements::UtilizationCollector {
        state: state.clone(),
        agent_id: agent_id.to_owned(),
    }));
    registry.register_collector(Box::new(agent::AgentCollector { state, agent_id: agent_id.to_owned() }));
    registry
}

/// The monitor hands its snapshots here.
impl crate::monitor::SnapshotSink for MetricsState {
    fn publish(&self, snapshot: MonitorSnapshot) {
        MetricsState::publish(self, snapshot);
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn kernel(id: &str) -> Arc<KernelContainer> {
        Arc::new(KernelContainer {
            container_id: format!("c-{id}"),
            kernel_id: format!("k-{id}"),
            session_id: format!("s-{id}"),
            owner_user_id: "u".into(),
            owner_project_id: "p".into(),
            image: "img:1".into(),
            pid: 1,
            accelerator_devices: Vec::new(),
        })
    }

    pub fn scrape(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
        text
    }
}
