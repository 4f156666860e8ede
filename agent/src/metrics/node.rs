//! The node's series: CPU time per core, memory, network, disk space and disk traffic,
//! and each accelerator's memory and utilisation (`backendai_node_*`).

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::MetricsState;

#[derive(Debug)]
pub struct NodeCollector(pub Arc<MetricsState>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CpuLabels {
    cpu: String,
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FilesystemLabels {
    device: String,
    mountpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AcceleratorLabels {
    plugin: String,
    device_id: String,
    model: String,
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.latest();
        let node = &snapshot.node;
        let mut cpu = encoder.encode_descriptor(
            "backendai_node_cpu",
            "CPU time of each core since boot, busy (user, nice, system, irq, softirq, steal) or idle (idle, iowait).",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for core in &node.cores {
            for (mode, ns) in [("busy", core.busy_ns), ("idle", core.idle_ns)] {
                let labels = CpuLabels { cpu: core.core.to_string(), mode };
                ConstCounter::new(ns as f64 / 1e9).encode(cpu.encode_family(&labels)?)?;
            }
        }
        for (name, help, value) in [
            ("backendai_node_memory_total", "The node's memory (MemTotal).", node.mem_total_bytes),
            (
                "backendai_node_memory_available",
                "Memory available to new work (MemAvailable).",
                node.mem_available_bytes,
            ),
            ("backendai_node_memory_used", "MemTotal less MemAvailable.", node.mem_used_bytes()),
        ] {
            ConstGauge::new(value as f64).encode(encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?)?;
        }
        for (name, help, value) in [
            ("backendai_node_network_receive", "Bytes received on every interface of the host.", node.net_rx_bytes),
            ("backendai_node_network_transmit", "Bytes sent on every interface of the host.", node.net_tx_bytes),
        ] {
            ConstCounter::new(value as f64).encode(encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?)?;
        }
        for (name, help, value) in [
            (
                "backendai_node_filesystem_size",
                "Size of the filesystem kernels' scratch directories live on.",
                (|d: &crate::monitor::node::DiskSpace| d.total_bytes) as fn(&crate::monitor::node::DiskSpace) -> u64,
            ),
            ("backendai_node_filesystem_used", "Bytes used on that filesystem.", |d| d.used_bytes),
        ] {
            let mut family = encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
            for disk in &node.disks {
                let labels = FilesystemLabels { device: disk.device.clone(), mountpoint: disk.mount_point.clone() };
                ConstGauge::new(value(disk) as f64).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, value) in [
            (
                "backendai_node_disk_read",
                "Bytes read from each disk since boot.",
                (|d: &crate::monitor::node::DiskIo| d.read_bytes) as fn(&crate::monitor::node::DiskIo) -> u64,
            ),
            ("backendai_node_disk_written", "Bytes written to each disk since boot.", |d| d.written_bytes),
        ] {
            let mut family = encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
            for disk in &node.disk_io {
                ConstCounter::new(value(disk) as f64)
                    .encode(family.encode_family(&DeviceLabels { device: disk.device.clone() })?)?;
            }
        }
        let accelerators: Vec<_> =
            snapshot.devices.iter().flat_map(|plugin| plugin.devices.iter().map(move |d| (plugin.plugin, d))).collect();
        for (name, help, unit, value) in [
            (
                "backendai_node_accelerator_memory_used",
                "Memory in use on each accelerator.",
                Some(Unit::Bytes),
                (|d: &crate::resources::compute::DeviceMeasure| d.mem_used_bytes as f64)
                    as fn(&crate::resources::compute::DeviceMeasure) -> f64,
            ),
            ("backendai_node_accelerator_memory_total", "Memory of each accelerator.", Some(Unit::Bytes), |d| {
                d.mem_total_bytes as f64
            }),
            (
                "backendai_node_accelerator_utilization_percent",
                "Busy share of each accelerator's compute.",
                None,
                |d| f64::from(d.utilization_pct),
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for (plugin, device) in &accelerators {
                let labels = AcceleratorLabels {
                    plugin: (*plugin).to_owned(),
                    device_id: device.id.clone(),
                    model: device.model.clone(),
                };
                ConstGauge::new(value(device)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
