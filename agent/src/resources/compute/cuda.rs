//! NVIDIA GPUs through NVML: the driver's `libnvidia-ml.so` is opened at run time
//! (`nvml-wrapper` loads it with `dlopen`), so the agent runs where no driver exists.
//! [`Nvml`] is the little of NVML the plugin uses, so a fake can stand in for it in tests.

use super::{ComputeError, ComputePlugin, DeviceMeasure, DeviceReadings};

const PLUGIN: &str = "cuda";

/// One device as NVML reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmlDevice {
    pub name: String,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub gpu_utilization_pct: u32,
}

/// The NVML calls the plugin makes.
pub trait Nvml: Send {
    fn device_count(&self) -> Result<u32, String>;
    fn device(&self, index: u32) -> Result<NvmlDevice, String>;
}

/// The driver's NVML.
pub struct RealNvml(nvml_wrapper::Nvml);

impl RealNvml {
    /// Opens `libnvidia-ml.so` and initialises it; an error where there is no driver.
    pub fn load() -> Result<RealNvml, String> {
        nvml_wrapper::Nvml::init().map(RealNvml).map_err(|err| err.to_string())
    }
}

impl RealNvml {
    /// Every device as allocation sees it: index as id, model, memory, NUMA node (from its PCI
    /// address), processing units (NVML's core count over 64 per multiprocessor when it says,
    /// else 0) and its `/dev/nvidia{minor}` node.
    pub fn inventory(&self) -> Result<Vec<super::AcceleratorDevice>, String> {
        let count = self.0.device_count().map_err(|err| err.to_string())?;
        let mut devices = Vec::new();
        for index in 0..count {
            let device = self.0.device_by_index(index).map_err(|err| format!("device {index}: {err}"))?;
            let memory = device.memory_info().map_err(|err| format!("device {index}: {err}"))?;
            let minor = device.minor_number().unwrap_or(index);
            let node = format!("/dev/nvidia{minor}");
            devices.push(super::AcceleratorDevice {
                id: index.to_string(),
                model: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
                numa_node: device.pci_info().ok().and_then(|pci| super::accelerator::pci_numa_node(&pci.bus_id)),
                memory_bytes: memory.total,
                processing_units: device.num_cores().map(|cores| cores / 64).unwrap_or(0),
                host_node: Some(std::path::PathBuf::from(&node)),
                container_node: node,
            });
        }
        Ok(devices)
    }

    /// The driver's version, for the heartbeat.
    pub fn driver_version(&self) -> Option<String> {
        self.0.sys_driver_version().ok()
    }
}

impl Nvml for RealNvml {
    fn device_count(&self) -> Result<u32, String> {
        self.0.device_count().map_err(|err| err.to_string())
    }

    fn device(&self, index: u32) -> Result<NvmlDevice, String> {
        let device = self.0.device_by_index(index).map_err(|err| err.to_string())?;
        let memory = device.memory_info().map_err(|err| err.to_string())?;
        let utilization = device.utilization_rates().map_err(|err| err.to_string())?;
        Ok(NvmlDevice {
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
            mem_used_bytes: memory.used,
            mem_total_bytes: memory.total,
            gpu_utilization_pct: utilization.gpu,
        })
    }
}

/// A stand-in for NVML with devices whose numbers move on each read (tests and
/// development on nodes without GPUs; `[debug] fake-cuda-devices`).
pub struct FakeNvml {
    devices: u32,
    reads: std::sync::atomic::AtomicU64,
}

impl FakeNvml {
    pub const MEM_TOTAL: u64 = 16 << 30;

    pub fn new(devices: u32) -> FakeNvml {
        FakeNvml { devices, reads: std::sync::atomic::AtomicU64::new(0) }
    }

    /// What device `index` reports on read number `read` (from 0): utilisation cycles
    /// through 0–90 %, memory in use is that share of the total.
    pub fn expected(index: u32, read: u64) -> NvmlDevice {
        let pct = u32::try_from((read + u64::from(index) * 3) % 10 * 10).unwrap_or(0);
        NvmlDevice {
            name: "Fake NVIDIA GPU".to_owned(),
            mem_used_bytes: Self::MEM_TOTAL / 100 * u64::from(pct),
            mem_total_bytes: Self::MEM_TOTAL,
            gpu_utilization_pct: pct,
        }
    }
}

impl Nvml for FakeNvml {
    /// The plugin asks for the count once per pass over the devices: that starts a read.
    fn device_count(&self) -> Result<u32, String> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.devices)
    }

    fn device(&self, index: u32) -> Result<NvmlDevice, String> {
        if index >= self.devices {
            return Err(format!("no device {index}"));
        }
        let read = self.reads.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(1);
        Ok(Self::expected(index, read))
    }
}

/// The CUDA compute plugin over any [`Nvml`].
pub struct CudaPlugin<N: Nvml> {
    nvml: N,
}

impl<N: Nvml> CudaPlugin<N> {
    pub fn new(nvml: N) -> Self {
        CudaPlugin { nvml }
    }
}

impl<N: Nvml> ComputePlugin for CudaPlugin<N> {
    fn key(&self) -> &'static str {
        PLUGIN
    }

    fn measure(&mut self) -> Result<DeviceReadings, ComputeError> {
        let failed = |message: String| ComputeError::Device { plugin: PLUGIN, message };
        let count = self.nvml.device_count().map_err(failed)?;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = self.nvml.device(index).map_err(|err| failed(format!("device {index}: {err}")))?;
            devices.push(DeviceMeasure {
                id: index.to_string(),
                model: device.name,
                mem_used_bytes: device.mem_used_bytes,
                mem_total_bytes: device.mem_total_bytes,
                utilization_pct: device.gpu_utilization_pct.min(100),
            });
        }
        Ok(DeviceReadings { plugin: PLUGIN, devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_reports_what_nvml_says() {
        let mut plugin = CudaPlugin::new(FakeNvml::new(2));
        let first = plugin.measure().expect("measures");
        assert_eq!(first.plugin, "cuda");
        assert_eq!(first.devices.len(), 2);
        let expected = FakeNvml::expected(1, 0);
        assert_eq!(first.devices[1].id, "1");
        assert_eq!(first.devices[1].mem_used_bytes, expected.mem_used_bytes);
        assert_eq!(first.devices[1].utilization_pct, expected.gpu_utilization_pct);
        let second = plugin.measure().expect("measures");
        assert_eq!(second.devices[0].utilization_pct, FakeNvml::expected(0, 1).gpu_utilization_pct);
        assert_ne!(first.devices[0], second.devices[0], "the fake's numbers move between reads");
    }

    #[test]
    fn a_failing_device_names_itself() {
        struct Broken;
        impl Nvml for Broken {
            fn device_count(&self) -> Result<u32, String> {
                Ok(1)
            }
            fn device(&self, _index: u32) -> Result<NvmlDevice, String> {
                Err("GPU is lost".into())
            }
        }
        let err = CudaPlugin::new(Broken).measure().expect_err("fails");
        assert_eq!(err.to_string(), "cuda: device 0: GPU is lost");
    }

    #[test]
    fn without_a_driver_nvml_does_not_load() {
        // This machine has no NVIDIA driver: loading fails with a reason instead of crashing.
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            assert!(RealNvml::load().is_ok());
        } else {
            assert!(RealNvml::load().is_err());
        }
    }
}
