//! Accelerator series beside `backendai_node_accelerator_*`: per device under the names and
//! labels of NVIDIA's DCGM exporter (`DCGM_FI_DEV_GPU_UTIL`, `DCGM_FI_DEV_FB_USED`,
//! `DCGM_FI_DEV_FB_FREE`, in DCGM's units), and per kernel and device what the kernel's
//! processes use (`backendai_kernel_accelerator_*`), from the latest snapshot: a kernel whose
//! processes left a device, or that ended, has no series for it at the next scrape.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
    registry::Unit,
};

use super::{ContainerLabels, MetricsState};
use crate::{monitor::accel::KernelDeviceUse, resources::compute::DeviceMeasure};

/// DCGM reports framebuffer memory in MiB.
const MIB: u64 = 1 << 20;

/// The DCGM exporter's labels of a device series.
#[allow(non_snake_case)]
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DcgmLabels {
    /// The device's index among the plugin's devices (NVML's index).
    gpu: String,
    UUID: String,
    /// `nvidia{gpu}`.
    device: String,
    modelName: String,
    Hostname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KernelDeviceLabels {
    #[prometheus(flatten)]
    kernel: ContainerLabels,
    plugin: String,
    device_id: String,
}

#[derive(Debug)]
pub struct AcceleratorCollector {
    pub state: Arc<MetricsState>,
    /// The node's host name (DCGM's `Hostname` label).
    pub hostname: String,
}

impl AcceleratorCollector {
    pub fn new(state: Arc<MetricsState>) -> AcceleratorCollector {
        AcceleratorCollector { state, hostname: crate::config::host_name() }
    }
}

type DeviceValue = fn(&DeviceMeasure) -> f64;
type UseValue = fn(&KernelDeviceUse) -> f64;

impl Collector for AcceleratorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.state.latest();
        // DCGM's series are NVIDIA's: the devices of the `cuda` plugin (real, fake or mock).
        let cuda: Vec<(usize, &DeviceMeasure)> = snapshot
            .devices
            .iter()
            .filter(|readings| readings.plugin == "cuda")
            .flat_map(|readings| readings.devices.iter().enumerate())
            .collect();
        let dcgm: [(&str, &str, DeviceValue); 3] = [
            ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |d| f64::from(d.utilization_pct)),
            ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", |d| (d.mem_used_bytes / MIB) as f64),
            ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", |d| {
                (d.mem_total_bytes.saturating_sub(d.mem_used_bytes) / MIB) as f64
            }),
        ];
        for (name, help, value) in dcgm {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (index, device) in &cuda {
                let labels = DcgmLabels {
                    gpu: index.to_string(),
                    UUID: if device.uuid.is_empty() { device.id.clone() } else { device.uuid.clone() },
                    device: format!("nvidia{index}"),
                    modelName: device.model.clone(),
                    Hostname: self.hostname.clone(),
                };
                ConstGauge::new(value(device)).encode(family.encode_family(&labels)?)?;
            }
        }
        let labelled: Vec<(KernelDeviceLabels, &KernelDeviceUse)> = snapshot
            .accelerator_use
            .iter()
            .map(|used| {
                let labels = KernelDeviceLabels {
                    kernel: ContainerLabels::from(used.kernel.as_ref()),
                    plugin: used.plugin.to_owned(),
                    device_id: used.device_id.clone(),
                };
                (labels, used)
            })
            .collect();
        let per_kernel: [(&str, &str, Option<Unit>, UseValue); 3] = [
            (
                "backendai_kernel_accelerator_utilization_percent",
                "Busy share of a device's compute (SMs) used by the kernel's processes, summed and capped at 100.",
                None,
                |u| f64::from(u.utilization_pct),
            ),
            (
                "backendai_kernel_accelerator_memory_used",
                "Device memory held by the kernel's processes.",
                Some(Unit::Bytes),
                |u| u.mem_used_bytes as f64,
            ),
            ("backendai_kernel_accelerator_processes", "The kernel's processes on a device.", None, |u| {
                f64::from(u.processes)
            }),
        ];
        for (name, help, unit, value) in per_kernel {
            let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for (labels, used) in &labelled {
                ConstGauge::new(value(used)).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::{MonitorSnapshot, registry, test_support::*},
        resources::compute::DeviceReadings,
    };

    #[test]
    fn devices_in_dcgm_names_and_units_and_kernels_per_device_until_they_leave() {
        let state = Arc::new(MetricsState::default());
        let device = DeviceMeasure {
            id: "0".into(),
            model: "NVIDIA H100".into(),
            uuid: "GPU-1234".into(),
            mem_used_bytes: 3 * MIB + 5,
            mem_total_bytes: 80 * 1024 * MIB,
            utilization_pct: 70,
        };
        let used = KernelDeviceUse {
            kernel: kernel("a"),
            plugin: "cuda",
            device_id: "0".into(),
            mem_used_bytes: 3 * MIB,
            utilization_pct: 70,
            processes: 2,
        };
        state.publish(MonitorSnapshot {
            devices: vec![
                DeviceReadings { plugin: "cuda", devices: vec![device] },
                DeviceReadings { plugin: "tpu", devices: vec![DeviceMeasure::default()] },
            ],
            accelerator_use: vec![used],
            ..MonitorSnapshot::default()
        });
        let registry = registry(state.clone(), "i-test");
        let text = scrape(&registry);
        let hostname = AcceleratorCollector::new(state.clone()).hostname;
        let dcgm =
            format!("gpu=\"0\",UUID=\"GPU-1234\",device=\"nvidia0\",modelName=\"NVIDIA H100\",Hostname=\"{hostname}\"");
        let kernel = "container_id=\"c-a\",kernel_id=\"k-a\",session_id=\"s-a\",image=\"img:1\",owner_user_id=\"u\",owner_project_id=\"p\",plugin=\"cuda\",device_id=\"0\"";
        for line in [
            format!("DCGM_FI_DEV_GPU_UTIL{{{dcgm}}} 70"),
            format!("DCGM_FI_DEV_FB_USED{{{dcgm}}} 3"),
            format!("DCGM_FI_DEV_FB_FREE{{{dcgm}}} 81916"),
            format!("backendai_kernel_accelerator_utilization_percent{{{kernel}}} 70"),
            format!("backendai_kernel_accelerator_memory_used_bytes{{{kernel}}} 3145728"),
            format!("backendai_kernel_accelerator_processes{{{kernel}}} 2"),
        ] {
            assert!(text.lines().any(|l| l.starts_with(&line)), "missing {line} in\n{text}");
        }
        assert_eq!(text.matches("DCGM_FI_DEV_GPU_UTIL{").count(), 1, "only NVIDIA's devices under DCGM's names");
        state.publish(MonitorSnapshot::default());
        let text = scrape(&registry);
        assert!(!text.contains("kernel_id=\"k-a\"") && !text.contains("DCGM_FI_DEV_GPU_UTIL{"), "{text}");
    }
}
