//! The per-container series, cAdvisor's names with the agreed labels: one table row per
//! series says how to read it from a container's readings.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::{ContainerLabels, MetricsState};
use crate::monitor::ContainerReadings;

/// One container series: how to read it from a sample (`None`: not exported for it).
struct Series {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    value: fn(&ContainerReadings) -> Option<f64>,
}

const fn counter(
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    value: fn(&ContainerReadings) -> Option<f64>,
) -> Series {
    Series { name, help, unit, kind: MetricType::Counter, value }
}

const fn gauge(
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    value: fn(&ContainerReadings) -> Option<f64>,
) -> Series {
    Series { name, help, unit, kind: MetricType::Gauge, value }
}

const SERIES: &[Series] = &[
    counter(
        "container_cpu_usage",
        "Cumulative CPU time consumed by the container's tasks.",
        Some(Unit::Seconds),
        |r| Some(r.counters.cpu_ns as f64 / 1e9),
    ),
    counter(
        "container_cpu_user",
        "Cumulative CPU time of the container's tasks in user mode (the total split as the kernel splits it).",
        Some(Unit::Seconds),
        |r| Some(r.cpu_time.user_ns as f64 / 1e9),
    ),
    counter(
        "container_cpu_system",
        "Cumulative CPU time of the container's tasks in kernel mode (the total split as the kernel splits it).",
        Some(Unit::Seconds),
        |r| Some(r.cpu_time.system_ns as f64 / 1e9),
    ),
    counter("container_cpu_cfs_periods", "Elapsed CPU bandwidth-control (CFS quota) periods.", None, |r| {
        Some(r.cpu.periods as f64)
    }),
    counter("container_cpu_cfs_throttled_periods", "Periods in which the container was throttled.", None, |r| {
        Some(r.cpu.throttled_periods as f64)
    }),
    counter("container_cpu_cfs_throttled", "Total time the container was throttled.", Some(Unit::Seconds), |r| {
        Some(r.cpu.throttled_ns as f64 / 1e9)
    }),
    gauge(
        "container_memory_usage",
        "Memory charged to the container's cgroup, page cache included.",
        Some(Unit::Bytes),
        |r| Some(r.memory.usage as f64),
    ),
    gauge(
        "container_memory_working_set",
        "Memory usage less inactive page cache (what the kernel cannot easily reclaim).",
        Some(Unit::Bytes),
        |r| Some(r.memory.working_set as f64),
    ),
    gauge("container_memory_cache", "Page cache of the container, in bytes.", None, |r| Some(r.memory.cache as f64)),
    gauge("container_memory_rss", "Anonymous memory of the container, in bytes.", None, |r| Some(r.memory.rss as f64)),
    gauge("container_memory_swap", "Swap used by the container, in bytes.", None, |r| Some(r.memory.swap as f64)),
    gauge("container_memory_mapped_file", "File pages mapped by the container's processes, in bytes.", None, |r| {
        Some(r.memory.mapped_file as f64)
    }),
    gauge("container_memory_shmem", "Shared memory (tmpfs, shm segments) of the container, in bytes.", None, |r| {
        Some(r.memory.shmem as f64)
    }),
    gauge("container_memory_max_usage", "The highest memory usage recorded.", Some(Unit::Bytes), |r| {
        r.memory.max_usage.map(|v| v as f64)
    }),
    gauge("container_spec_memory_limit", "The container's memory limit; 0 means unlimited.", Some(Unit::Bytes), |r| {
        Some(r.memory.limit.unwrap_or(0) as f64)
    }),
    gauge("container_dev_shm_usage", "Bytes used in the container's /dev/shm.", Some(Unit::Bytes), |r| {
        r.shm_bytes.map(|v| v as f64)
    }),
    gauge("container_processes", "Tasks in the container's cgroup.", None, |r| r.processes.map(|v| v as f64)),
    counter("container_fs_reads", "Cumulative bytes read from block devices.", Some(Unit::Bytes), |r| {
        Some(r.counters.io_read_bytes as f64)
    }),
    counter("container_fs_writes", "Cumulative bytes written to block devices.", Some(Unit::Bytes), |r| {
        Some(r.counters.io_write_bytes as f64)
    }),
    counter("container_fs_reads", "Cumulative read operations on block devices.", None, |r| {
        Some(r.counters.io_read_ops as f64)
    }),
    counter("container_fs_writes", "Cumulative write operations on block devices.", None, |r| {
        Some(r.counters.io_write_ops as f64)
    }),
    counter(
        "container_network_receive",
        "Cumulative bytes received by the container's sockets, as its interfaces count them.",
        Some(Unit::Bytes),
        |r| Some(r.counters.rx_bytes as f64),
    ),
    counter(
        "container_network_transmit",
        "Cumulative bytes sent by the container's sockets, as its interfaces count them.",
        Some(Unit::Bytes),
        |r| Some(r.counters.tx_bytes as f64),
    ),
    counter(
        "container_network_receive_packets",
        "Cumulative packets received by the container's sockets.",
        None,
        |r| Some(r.counters.rx_packets as f64),
    ),
    counter("container_network_transmit_packets", "Cumulative packets sent by the container's sockets.", None, |r| {
        Some(r.counters.tx_packets as f64)
    }),
    counter("container_oom_events", "Processes of the container killed by the OOM killer.", None, |r| {
        Some(r.counters.oom_kills as f64)
    }),
];

#[derive(Debug)]
pub struct ContainerCollector(pub Arc<MetricsState>);

impl Collector for ContainerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.latest();
        let labelled: Vec<(ContainerLabels, &ContainerReadings)> = snapshot
            .containers
            .iter()
            .map(|sample| (ContainerLabels::from(sample.kernel.as_ref()), &sample.readings))
            .collect();
        for series in SERIES {
            let mut family = encoder.encode_descriptor(series.name, series.help, series.unit.as_ref(), series.kind)?;
            for (labels, readings) in &labelled {
                let Some(value) = (series.value)(readings) else { continue };
                let metric = family.encode_family(labels)?;
                match series.kind {
                    MetricType::Counter => ConstCounter::new(value).encode(metric)?,
                    _ => ConstGauge::new(value).encode(metric)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use agent_common::CgroupCounters;

    use super::*;
    use crate::{
        metrics::{ContainerSample, MonitorSnapshot, registry, test_support::*},
        monitor::{CpuSplit, CpuThrottling, MemoryStats, files::CpuTimes},
    };

    fn readings() -> ContainerReadings {
        ContainerReadings {
            counters: CgroupCounters {
                cpu_ns: 1_500_000_000,
                rx_bytes: 1000,
                rx_packets: 10,
                tx_bytes: 2000,
                tx_packets: 20,
                io_read_bytes: 4096,
                io_read_ops: 1,
                io_write_bytes: 8192,
                io_write_ops: 2,
                oom_kills: 3,
            },
            memory: MemoryStats {
                usage: 300,
                working_set: 200,
                cache: 100,
                rss: 150,
                swap: 0,
                shmem: 10,
                mapped_file: 5,
                limit: None,
                max_usage: Some(400),
            },
            cpu: CpuThrottling { periods: 10, throttled_periods: 4, throttled_ns: 250_000_000 },
            cpu_files: CpuTimes { total_ns: 1_500_000_000, user_ns: 1_200_000_000, system_ns: 400_000_000 },
            cpu_time: CpuSplit { user_ns: 1_125_000_000, system_ns: 375_000_000 },
            processes: Some(2),
            shm_bytes: Some(4096),
        }
    }

    #[test]
    fn exposes_cadvisor_names_with_labels() {
        let state = Arc::new(MetricsState::default());
        state.publish(MonitorSnapshot {
            containers: vec![ContainerSample {
                kernel: kernel("a"),
                readings: readings(),
                cgroup_id: Some(1),
                run: Default::default(),
            }],
            ..MonitorSnapshot::default()
        });
        let text = scrape(&registry(state, "i-test"));
        let labels = "container_id=\"c-a\",kernel_id=\"k-a\",session_id=\"s-a\",image=\"img:1\",owner_user_id=\"u\",owner_project_id=\"p\"";
        for line in [
            format!("container_cpu_usage_seconds_total{{{labels}}} 1.5"),
            format!("container_cpu_user_seconds_total{{{labels}}} 1.125"),
            format!("container_cpu_system_seconds_total{{{labels}}} 0.375"),
            format!("container_cpu_cfs_throttled_periods_total{{{labels}}} 4.0"),
            format!("container_cpu_cfs_throttled_seconds_total{{{labels}}} 0.25"),
            format!("container_memory_usage_bytes{{{labels}}} 300.0"),
            format!("container_memory_working_set_bytes{{{labels}}} 200.0"),
            format!("container_memory_max_usage_bytes{{{labels}}} 400.0"),
            format!("container_spec_memory_limit_bytes{{{labels}}} 0.0"),
            format!("container_dev_shm_usage_bytes{{{labels}}} 4096.0"),
            format!("container_processes{{{labels}}} 2.0"),
            format!("container_fs_reads_bytes_total{{{labels}}} 4096.0"),
            format!("container_fs_writes_bytes_total{{{labels}}} 8192.0"),
            format!("container_fs_reads_total{{{labels}}} 1.0"),
            format!("container_fs_writes_total{{{labels}}} 2.0"),
            format!("container_network_receive_bytes_total{{{labels}}} 1000.0"),
            format!("container_network_transmit_packets_total{{{labels}}} 20.0"),
            format!("container_oom_events_total{{{labels}}} 3.0"),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_dropped_container_has_no_series() {
        let state = Arc::new(MetricsState::default());
        let sample = ContainerSample {
            kernel: kernel("a"),
            readings: ContainerReadings::default(),
            cgroup_id: Some(1),
            run: Default::default(),
        };
        state.publish(MonitorSnapshot { containers: vec![sample], ..MonitorSnapshot::default() });
        let registry = registry(state.clone(), "i-test");
        assert!(scrape(&registry).contains("kernel_id=\"k-a\""));
        state.publish(MonitorSnapshot::default());
        assert!(!scrape(&registry).contains("kernel_id=\"k-a\""));
    }
}
