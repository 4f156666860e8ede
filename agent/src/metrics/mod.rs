//! Turns raw counters into Prometheus series: the latest sample of every kernel
//! container, encoded on scrape with cAdvisor-compatible names and the agreed labels.

pub mod server;

use std::sync::{Arc, RwLock};

use agent_common::CgroupCounters;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{docker::KernelContainer, monitor::ProgramStats};

/// One kernel container's totals at the latest sample.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    pub kernel: KernelContainer,
    pub counters: CgroupCounters,
}

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

/// What the monitor saw at one sampling instant.
#[derive(Debug, Clone, Default)]
pub struct MonitorSnapshot {
    pub containers: Vec<ContainerSample>,
    pub attached_cgroups: usize,
    pub programs: Vec<ProgramStats>,
}

/// The latest snapshot, shared between the monitor (writer) and scrapes (readers).
#[derive(Debug, Default)]
pub struct MetricsState {
    latest: RwLock<Arc<MonitorSnapshot>>,
}

impl MetricsState {
    pub fn publish(&self, snapshot: MonitorSnapshot) {
        // A poisoned lock only means a panicking writer; the snapshot is replaced whole anyway.
        *self.latest.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(snapshot);
    }

    /// The latest snapshot; cheap, so a scrape never holds the lock while encoding.
    pub fn latest(&self) -> Arc<MonitorSnapshot> {
        self.latest.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
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
    registry.register_collector(Box::new(ContainerCollector(state.clone())));
    registry.register_collector(Box::new(AgentCollector { state, agent_id: agent_id.to_owned() }));
    registry
}

/// A container counter: how to read it from a sample.
struct CounterSeries {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    value: fn(&CgroupCounters) -> f64,
}

const CONTAINER_COUNTERS: &[CounterSeries] = &[
    CounterSeries {
        name: "container_cpu_usage",
        help: "Cumulative CPU time consumed by the container's tasks (eBPF sched_switch).",
        unit: Some(Unit::Seconds),
        value: |c| c.cpu_ns as f64 / 1e9,
    },
    CounterSeries {
        name: "container_network_receive",
        help: "Cumulative bytes received by the container's sockets, as its interfaces count them.",
        unit: Some(Unit::Bytes),
        value: |c| c.rx_bytes as f64,
    },
    CounterSeries {
        name: "container_network_transmit",
        help: "Cumulative bytes sent by the container's sockets, as its interfaces count them.",
        unit: Some(Unit::Bytes),
        value: |c| c.tx_bytes as f64,
    },
    CounterSeries {
        name: "container_network_receive_packets",
        help: "Cumulative packets received by the container's sockets.",
        unit: None,
        value: |c| c.rx_packets as f64,
    },
    CounterSeries {
        name: "container_network_transmit_packets",
        help: "Cumulative packets sent by the container's sockets.",
        unit: None,
        value: |c| c.tx_packets as f64,
    },
];

#[derive(Debug)]
struct ContainerCollector(Arc<MetricsState>);

impl Collector for ContainerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.latest();
        let labelled: Vec<(ContainerLabels, &CgroupCounters)> = snapshot
            .containers
            .iter()
            .map(|sample| (ContainerLabels::from(&sample.kernel), &sample.counters))
            .collect();
        for series in CONTAINER_COUNTERS {
            let mut family =
                encoder.encode_descriptor(series.name, series.help, series.unit.as_ref(), MetricType::Counter)?;
            for (labels, counters) in &labelled {
                ConstCounter::new((series.value)(counters)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct AgentCollector {
    state: Arc<MetricsState>,
    agent_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    agent_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let build = BuildLabels { version: env!("CARGO_PKG_VERSION"), agent_id: self.agent_id.clone() };
        let mut family = encoder.encode_descriptor(
            "backendai_agent_build_info",
            "The agent's version and id.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1).encode(family.encode_family(&build)?)?;
        let gauges: [(&str, &str, usize); 2] = [
            (
                "backendai_agent_tracked_containers",
                "Kernel containers with series in /metrics, stopped ones in their grace period included.",
                self.state.tracked_containers(),
            ),
            (
                "backendai_agent_attached_cgroups",
                "Container cgroups the eBPF programs are attached to right now.",
                self.state.attached_cgroups(),
            ),
        ];
        let snapshot = self.state.latest();
        let mut run_time = encoder.encode_descriptor(
            "backendai_agent_ebpf_program_run_time",
            "Time the kernel spent running each eBPF program (advances while kernel.bpf_stats_enabled=1).",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for program in &snapshot.programs {
            let labels = ProgramLabels { program: program.name };
            ConstCounter::new(program.run_time_ns as f64 / 1e9).encode(run_time.encode_family(&labels)?)?;
        }
        let mut runs = encoder.encode_descriptor(
            "backendai_agent_ebpf_program_runs",
            "Times the kernel ran each eBPF program (advances while kernel.bpf_stats_enabled=1).",
            None,
            MetricType::Counter,
        )?;
        for program in &snapshot.programs {
            let labels = ProgramLabels { program: program.name };
            ConstCounter::new(program.run_count).encode(runs.encode_family(&labels)?)?;
        }
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(id: &str) -> KernelContainer {
        KernelContainer {
            container_id: format!("c-{id}"),
            kernel_id: format!("k-{id}"),
            session_id: format!("s-{id}"),
            owner_user_id: "u".into(),
            owner_project_id: "p".into(),
            image: "img:1".into(),
            pid: 1,
        }
    }

    fn scrape(state: Arc<MetricsState>) -> String {
        let registry = registry(state, "i-test");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text
    }

    #[test]
    fn exposes_cadvisor_names_with_labels() {
        let state = Arc::new(MetricsState::default());
        let counters =
            CgroupCounters { cpu_ns: 1_500_000_000, rx_bytes: 1000, rx_packets: 10, tx_bytes: 2000, tx_packets: 20 };
        state.publish(MonitorSnapshot {
            containers: vec![ContainerSample { kernel: kernel("a"), counters }],
            attached_cgroups: 1,
            programs: vec![ProgramStats { name: "sched_switch", run_time_ns: 2_500_000_000, run_count: 7 }],
        });
        let text = scrape(state);
        let labels = "container_id=\"c-a\",kernel_id=\"k-a\",session_id=\"s-a\",image=\"img:1\",owner_user_id=\"u\",owner_project_id=\"p\"";
        for line in [
            format!("container_cpu_usage_seconds_total{{{labels}}} 1.5"),
            format!("container_network_receive_bytes_total{{{labels}}} 1000.0"),
            format!("container_network_transmit_bytes_total{{{labels}}} 2000.0"),
            format!("container_network_receive_packets_total{{{labels}}} 10.0"),
            format!("container_network_transmit_packets_total{{{labels}}} 20.0"),
            "backendai_agent_attached_cgroups 1".to_string(),
            "backendai_agent_ebpf_program_run_time_seconds_total{program=\"sched_switch\"} 2.5".to_string(),
            "backendai_agent_ebpf_program_runs_total{program=\"sched_switch\"} 7".to_string(),
            "backendai_agent_ebpf_program_run_time_seconds_total{program=\"sched_switch\"} 2.5".to_string(),
            "backendai_agent_ebpf_program_runs_total{program=\"sched_switch\"} 7".to_string(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_dropped_container_has_no_series() {
        let state = Arc::new(MetricsState::default());
        let sample = ContainerSample { kernel: kernel("a"), counters: CgroupCounters::default() };
        state.publish(MonitorSnapshot { containers: vec![sample], attached_cgroups: 1, programs: Vec::new() });
        assert!(scrape(state.clone()).contains("kernel_id=\"k-a\""));
        state.publish(MonitorSnapshot::default());
        assert!(!scrape(state).contains("kernel_id=\"k-a\""));
    }
}
