//! The agent's own series: build info, what the monitor follows, the eBPF programs' cost,
//! map fill, lost events, and where each resource's numbers come from.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::MetricsState;
use crate::monitor::{Resource, Source};

#[derive(Debug)]
pub struct AgentCollector {
    pub state: Arc<MetricsState>,
    pub agent_id: String,
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    resource: &'static str,
    source: &'static str,
}

fn gauge(value: usize) -> ConstGauge {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.state.latest();
        let build = BuildLabels { version: env!("CARGO_PKG_VERSION"), agent_id: self.agent_id.clone() };
        let mut family = encoder.encode_descriptor(
            "backendai_agent_build_info",
            "The agent's version and id.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1).encode(family.encode_family(&build)?)?;
        for (name, help, value) in [
            (
                "backendai_agent_tracked_containers",
                "Kernel containers with series in /metrics, stopped ones in their grace period included.",
                snapshot.containers.len(),
            ),
            (
                "backendai_agent_attached_cgroups",
                "Container cgroups the eBPF programs are attached to right now.",
                snapshot.attached_cgroups,
            ),
        ] {
            gauge(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }

        encode_stats_writes(&self.state.stats_writes, &mut encoder)?;

        let mut sources = encoder.encode_descriptor(
            "backendai_agent_resource_source",
            "Where each resource's numbers come from: 1 for the source in use (ebpf or cgroup-files).",
            None,
            MetricType::Gauge,
        )?;
        for resource in Resource::ALL {
            for source in [Source::Ebpf, Source::CgroupFiles] {
                let labels = SourceLabels { resource: resource.as_str(), source: source.as_str() };
                let in_use = i64::from(snapshot.sources.get(resource) == source);
                ConstGauge::new(in_use).encode(sources.encode_family(&labels)?)?;
            }
        }

        if let Some(check) = snapshot.cpu_check {
            let exact = encoder.encode_descriptor(
                "backendai_agent_cpu_check_exact",
                "1 when the start-up check found the eBPF CPU program exact on this kernel; 0 when it did not, and CPU time is counted from cgroup files.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(check.exact())).encode(exact)?;
            let error = encoder.encode_descriptor(
                "backendai_agent_cpu_check_error_ratio",
                "How far the eBPF CPU program's count was from the kernel's accounting in the start-up check (|counted - kernel| / kernel).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(check.error()).encode(error)?;
        }

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

        for (name, help, value) in [
            (
                "backendai_agent_ebpf_map_entries",
                "Cgroups held in each eBPF counters map.",
                (|m: &super::MapUsage| m.entries) as fn(&super::MapUsage) -> usize,
            ),
            ("backendai_agent_ebpf_map_capacity", "Cgroups each eBPF counters map can hold.", |m| m.capacity),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for map in &snapshot.maps {
                gauge(value(map)).encode(family.encode_family(&MapLabels { map: map.map })?)?;
            }
        }
        let lost = encoder.encode_descriptor(
            "backendai_agent_ebpf_lost_events",
            "Events the eBPF programs could not hand to the agent (ring buffer full); counts are never lost.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(snapshot.lost_events).encode(lost)?;
        let passes = encoder.encode_descriptor(
            "backendai_agent_monitor_passes",
            "Sampling passes the monitor has made (one per monitor.interval).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(snapshot.passes).encode(passes)?;
        let duration = encoder.encode_descriptor(
            "backendai_agent_monitor_pass_duration",
            "How long the latest sampling pass took: every container, the node and its devices.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(snapshot.pass_duration.as_secs_f64()).encode(duration)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::{MapUsage, MonitorSnapshot, registry, test_support::scrape},
        monitor::{ProgramStats, Sources},
    };

    #[test]
    fn programs_maps_and_sources_are_exported() {
        let state = Arc::new(MetricsState::default());
        let mut sources = Sources::default();
        sources.set(Resource::Cpu, Source::Ebpf);
        state.publish(MonitorSnapshot {
            attached_cgroups: 1,
            programs: vec![ProgramStats { name: "sched_switch", run_time_ns: 2_500_000_000, run_count: 7 }],
            sources,
            lost_events: 2,
            maps: vec![MapUsage { map: "CGROUP_SLOTS", entries: 3, capacity: 1024 }],
            passes: 5,
            pass_duration: std::time::Duration::from_micros(250),
            ..MonitorSnapshot::default()
        });
        let text = scrape(&registry(state, "i-test"));
        for line in [
            "backendai_agent_attached_cgroups 1",
            "backendai_agent_ebpf_program_run_time_seconds_total{program=\"sched_switch\"} 2.5",
            "backendai_agent_ebpf_program_runs_total{program=\"sched_switch\"} 7",
            "backendai_agent_resource_source{resource=\"cpu\",source=\"ebpf\"} 1",
            "backendai_agent_resource_source{resource=\"cpu\",source=\"cgroup-files\"} 0",
            "backendai_agent_resource_source{resource=\"block-io\",source=\"cgroup-files\"} 1",
            "backendai_agent_ebpf_map_entries{map=\"CGROUP_SLOTS\"} 3",
            "backendai_agent_ebpf_map_capacity{map=\"CGROUP_SLOTS\"} 1024",
            "backendai_agent_ebpf_lost_events_total 2",
            "backendai_agent_monitor_passes_total 5",
            "backendai_agent_monitor_pass_duration_seconds 0.00025",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// `backendai_agent_stats_writes_total{outcome}` and, once a write was tried,
/// `backendai_agent_stats_last_write_timestamp_seconds` (0 until one succeeds).
fn encode_stats_writes(
    writes: &super::stats::StatsWrites,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering;
    if !writes.attempted() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(
        "backendai_agent_stats_writes",
        "Writes of the measurements to the manager's Redis, by outcome (ok, failed).",
        None,
        MetricType::Counter,
    )?;
    for (outcome, count) in [("ok", &writes.ok), ("failed", &writes.failed)] {
        ConstCounter::new(count.load(Ordering::Relaxed)).encode(family.encode_family(&OutcomeLabels { outcome })?)?;
    }
    let last = writes.last_ok_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0;
    ConstGauge::new(last).encode(encoder.encode_descriptor(
        "backendai_agent_stats_last_write_timestamp",
        "When the measurements were last written to Redis (Unix time; 0: never).",
        Some(&prometheus_client::registry::Unit::Seconds),
        MetricType::Gauge,
    )?)?;
    Ok(())
}
