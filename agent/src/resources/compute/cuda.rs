//! NVIDIA GPUs through NVML: the driver's `libnvidia-ml.so` is opened at run time
//! (`nvml-wrapper` loads it with `dlopen`), so the agent runs where no driver exists.
//! [`Nvml`] is the little of NVML the plugin uses, so a fake can stand in for it in tests.
//! Per process: the compute and graphics processes on each device with the memory they hold,
//! and NVML's per-process SM utilisation samples since the last read of that device.

use std::collections::{BTreeMap, HashMap};

use super::{ComputeError, ComputePlugin, DeviceMeasure, DeviceReadings, ProcessUse};

const PLUGIN: &str = "cuda";

/// One device as NVML reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmlDevice {
    pub name: String,
    /// `GPU-…`; empty when NVML does not say.
    pub uuid: String,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub gpu_utilization_pct: u32,
}

/// One SM utilisation sample of a process (`nvmlProcessUtilizationSample_t`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlSample {
    pub pid: u32,
    pub sm_util_pct: u32,
    /// NVML's CPU timestamp of the sample, microseconds.
    pub timestamp_us: u64,
}

/// The processes on one device as NVML reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NvmlProcesses {
    /// (pid, GPU memory in bytes; 0 where NVML cannot tell), compute and graphics processes.
    pub running: Vec<(u32, u64)>,
    /// Utilisation samples taken after the timestamp asked for.
    pub samples: Vec<NvmlSample>,
}

/// The NVML calls the plugin makes.
pub trait Nvml: Send {
    fn device_count(&self) -> Result<u32, String>;
    fn device(&self, index: u32) -> Result<NvmlDevice, String>;

    /// The processes on device `index` and their utilisation samples after `since_us`
    /// (0: every sample NVML holds). None by default (the fake has no processes).
    fn processes(&self, _index: u32, _since_us: u64) -> Result<NvmlProcesses, String> {
        Ok(NvmlProcesses::default())
    }
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
            uuid: device.uuid().unwrap_or_default(),
            mem_used_bytes: memory.used,
            mem_total_bytes: memory.total,
            gpu_utilization_pct: utilization.gpu,
        })
    }

    fn processes(&self, index: u32, since_us: u64) -> Result<NvmlProcesses, String> {
        use nvml_wrapper::{enums::device::UsedGpuMemory, error::NvmlError};
        let device = self.0.device_by_index(index).map_err(|err| err.to_string())?;
        let mut running = Vec::new();
        for list in [device.running_compute_processes(), device.running_graphics_processes()] {
            match list {
                Ok(list) => running.extend(list.into_iter().map(|process| {
                    let bytes = match process.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes,
                        UsedGpuMemory::Unavailable => 0,
                    };
                    (process.pid, bytes)
                })),
                Err(NvmlError::NotSupported) => {}
                Err(err) => return Err(err.to_string()),
            }
        }
        let samples = match device.process_utilization_stats(since_us) {
            Ok(samples) => samples
                .into_iter()
                .map(|s| NvmlSample { pid: s.pid, sm_util_pct: s.sm_util, timestamp_us: s.timestamp })
                .collect(),
            // No sample since then, or a device without per-process statistics.
            Err(NvmlError::NotFound | NvmlError::NotSupported) => Vec::new(),
            Err(err) => return Err(err.to_string()),
        };
        Ok(NvmlProcesses { running, samples })
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
            uuid: format!("GPU-00000000-0000-0000-0000-{index:012}"),
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
    /// Per device index: the timestamp of the newest utilisation sample read so far.
    last_sample_us: HashMap<u32, u64>,
}

impl<N: Nvml> CudaPlugin<N> {
    pub fn new(nvml: N) -> Self {
        CudaPlugin { nvml, last_sample_us: HashMap::new() }
    }
}

/// One device's processes as [`ProcessUse`]s: each pid once (a process both compute and
/// graphics counts its memory once), its SM utilisation the mean of its samples (a process
/// with samples but no longer listed is reported with no memory), sorted by pid.
pub fn process_uses(device_id: &str, processes: &NvmlProcesses) -> Vec<ProcessUse> {
    let mut by_pid: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for (pid, bytes) in &processes.running {
        let entry = by_pid.entry(*pid).or_default();
        entry.0 = entry.0.max(*bytes);
    }
    for sample in &processes.samples {
        let entry = by_pid.entry(sample.pid).or_default();
        entry.1 += u64::from(sample.sm_util_pct.min(100));
        entry.2 += 1;
    }
    by_pid
        .into_iter()
        .map(|(pid, (mem_used_bytes, util_sum, samples))| ProcessUse {
            pid,
            device_id: device_id.to_owned(),
            mem_used_bytes,
            sm_util_pct: u32::try_from(util_sum.checked_div(samples).unwrap_or(0)).unwrap_or(100),
        })
        .collect()
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
                uuid: device.uuid,
                mem_used_bytes: device.mem_used_bytes,
                mem_total_bytes: device.mem_total_bytes,
                utilization_pct: device.gpu_utilization_pct.min(100),
            });
        }
        Ok(DeviceReadings { plugin: PLUGIN, devices })
    }

    fn processes(&mut self, _candidates: &[u32]) -> Result<Vec<ProcessUse>, ComputeError> {
        let failed = |message: String| ComputeError::Device { plugin: PLUGIN, message };
        let count = self.nvml.device_count().map_err(failed)?;
        let mut uses = Vec::new();
        for index in 0..count {
            let since = self.last_sample_us.get(&index).copied().unwrap_or(0);
            let processes =
                self.nvml.processes(index, since).map_err(|err| failed(format!("device {index} processes: {err}")))?;
            if let Some(newest) = processes.samples.iter().map(|s| s.timestamp_us).max() {
                self.last_sample_us.insert(index, newest.max(since));
            }
            uses.extend(process_uses(&index.to_string(), &processes));
        }
        Ok(uses)
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
    fn processes_are_merged_per_pid_and_samples_are_read_once() {
        struct TwoReads(std::sync::Mutex<Vec<u64>>);
        impl Nvml for TwoReads {
            fn device_count(&self) -> Result<u32, String> {
                Ok(1)
            }
            fn device(&self, _index: u32) -> Result<NvmlDevice, String> {
                Ok(NvmlDevice::default())
            }
            fn processes(&self, _index: u32, since_us: u64) -> Result<NvmlProcesses, String> {
                self.0.lock().map_err(|_| "poisoned")?.push(since_us);
                Ok(NvmlProcesses {
                    // 7 is both a compute and a graphics process; 9 has no memory figure.
                    running: vec![(7, 100), (7, 100), (9, 0)],
                    samples: vec![
                        NvmlSample { pid: 7, sm_util_pct: 60, timestamp_us: 1000 },
                        NvmlSample { pid: 7, sm_util_pct: 80, timestamp_us: 2000 },
                        NvmlSample { pid: 11, sm_util_pct: 150, timestamp_us: 1500 },
                    ],
                })
            }
        }
        let mut plugin = CudaPlugin::new(TwoReads(std::sync::Mutex::new(Vec::new())));
        let uses = plugin.processes(&[]).expect("reads");
        let summary: Vec<_> =
            uses.iter().map(|u| (u.pid, u.device_id.as_str(), u.mem_used_bytes, u.sm_util_pct)).collect();
        assert_eq!(summary, [(7, "0", 100, 70), (9, "0", 0, 0), (11, "0", 0, 100)]);
        plugin.processes(&[]).expect("reads again");
        let asked = plugin.nvml.0.lock().expect("lock").clone();
        assert_eq!(asked, [0, 2000], "the second read asks for samples after the newest seen");
    }

    #[test]
    fn the_fake_has_no_processes() {
        let mut plugin = CudaPlugin::new(FakeNvml::new(2));
        assert!(plugin.processes(&[]).expect("reads").is_empty());
        assert!(!plugin.wants_candidates());
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
