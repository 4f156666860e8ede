//! Compute plugins: accelerators behind one trait, so the monitor measures every device
//! the same way whatever its vendor. [`cuda`] is NVIDIA's, through NVML loaded at run time;
//! [`mock`] reads Backend.AI's mock-accelerator format, for nodes without accelerators.
//! Besides each device, a plugin reports the processes using each device ([`ProcessUse`]),
//! which the monitor maps to kernels through their cgroups (per-kernel accounting).

pub mod cuda;
pub mod mock;

use cuda::Nvml;

/// One device's measurements at one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMeasure {
    /// The device id Backend.AI uses: its index on the node, as a string.
    pub id: String,
    pub model: String,
    /// The device's UUID (NVML's `GPU-…`, the mock's `mother_uuid`); empty when unknown.
    pub uuid: String,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// Share of the last sampling period the device was busy, 0–100.
    pub utilization_pct: u32,
}

/// One plugin's devices at one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceReadings {
    /// The plugin's key (`cuda`), also the prefix of its slots (`cuda.device`).
    pub plugin: &'static str,
    pub devices: Vec<DeviceMeasure>,
}

/// One process's use of one device at one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessUse {
    /// The process id in the host's pid namespace (the agent's).
    pub pid: u32,
    /// The device's id, as [`DeviceMeasure::id`].
    pub device_id: String,
    /// Device memory the process holds.
    pub mem_used_bytes: u64,
    /// Share of the device's compute (SMs) the process kept busy since the last read, 0–100.
    pub sm_util_pct: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("{plugin}: {message}")]
    Device { plugin: &'static str, message: String },
}

/// A kind of accelerator the agent measures.
pub trait ComputePlugin: Send {
    /// The plugin's key, e.g. `cuda`.
    fn key(&self) -> &'static str;

    /// Reads every device once.
    fn measure(&mut self) -> Result<DeviceReadings, ComputeError>;

    /// Whether [`ComputePlugin::processes`] must be told which processes to look at (the
    /// processes of the kernels' cgroups). A plugin whose driver lists the processes on its
    /// devices (NVML) does not; the mock, which reads processes' environments, does.
    fn wants_candidates(&self) -> bool {
        false
    }

    /// The processes using each device now, one entry per (process, device). `candidates`
    /// are the processes of the kernels' cgroups, given only to a plugin that
    /// [wants them](ComputePlugin::wants_candidates) (empty otherwise). A plugin that cannot
    /// tell reports none.
    fn processes(&mut self, _candidates: &[u32]) -> Result<Vec<ProcessUse>, ComputeError> {
        Ok(Vec::new())
    }
}

/// The plugins this node has: each one whose library and devices are present, or the mock
/// devices of `mock_config` (Backend.AI's `mock-accelerator.toml` format) when it is given.
pub fn detect(
    fake_cuda_devices: u32,
    mock_config: Option<&std::path::Path>,
) -> Result<Vec<Box<dyn ComputePlugin>>, ComputeError> {
    let mut plugins: Vec<Box<dyn ComputePlugin>> = Vec::new();
    if let Some(path) = mock_config {
        let config = mock::MockConfig::load(path)?;
        tracing::warn!(
            path = %path.display(),
            slot = %config.slot_name,
            devices = config.devices.len(),
            "using mock accelerators (resource.mock-accelerator); never in production"
        );
        plugins.push(Box::new(mock::MockPlugin::new(config)));
        return Ok(plugins);
    }
    if fake_cuda_devices > 0 {
        tracing::warn!(
            devices = fake_cuda_devices,
            "using a fake NVML ([debug] fake-cuda-devices); never in production"
        );
        plugins.push(Box::new(cuda::CudaPlugin::new(cuda::FakeNvml::new(fake_cuda_devices))));
        return Ok(plugins);
    }
    match cuda::RealNvml::load() {
        Ok(nvml) => {
            tracing::info!(devices = ?nvml.device_count(), "NVML loaded; measuring NVIDIA devices");
            plugins.push(Box::new(cuda::CudaPlugin::new(nvml)));
        }
        Err(err) => tracing::info!(reason = %err, "no NVIDIA devices: NVML is not available on this node"),
    }
    Ok(plugins)
}
