//! Compute plugins: accelerators behind one trait, so the monitor measures every device
//! the same way whatever its vendor. [`cuda`] is NVIDIA's, through NVML loaded at run time;
//! [`mock`] reads Backend.AI's mock-accelerator format, for nodes without accelerators;
//! [`accelerator`] describes the devices a node hands out to kernels and what a kernel given
//! some of them gets. Besides each device, a plugin reports the processes using each device
//! ([`ProcessUse`]), which the monitor maps to kernels through their cgroups (per-kernel
//! accounting).

pub mod accelerator;
pub mod cuda;
pub mod mock;
pub mod rocm;

pub use accelerator::{
    Accelerator, AcceleratorDevice, AcceleratorSettings, AttachedDevice, ContainerDevices, DeviceMapping,
    DeviceRequest, Passthrough,
};

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

/// What [`detect`] found: plugins to measure devices (for the monitor) and accelerators to
/// hand out (for the allocator and kernel creation).
pub struct Detected {
    pub plugins: Vec<Box<dyn ComputePlugin>>,
    pub accelerators: Vec<Accelerator>,
}

/// Where [`detect`] looks and how devices are handed out.
pub struct DetectOptions<'a> {
    /// `[debug] fake-cuda-devices`: measured only, never handed out.
    pub fake_cuda_devices: u32,
    /// `[resource] mock-accelerator`.
    pub mock_config: Option<&'a std::path::Path>,
    /// Where the mock's stand-in device nodes are made.
    pub mock_node_dir: &'a std::path::Path,
    /// `[accelerators.<plugin>]`.
    pub settings: &'a std::collections::BTreeMap<String, AcceleratorSettings>,
}

/// The plugins this node has: each one whose library and devices are present, or the mock
/// devices of `mock_config` (Backend.AI's `mock-accelerator.toml` format) when it is given.
pub fn detect(options: &DetectOptions<'_>) -> Result<Detected, ComputeError> {
    let mut plugins: Vec<Box<dyn ComputePlugin>> = Vec::new();
    let mut accelerators = Vec::new();
    let settings = |key: &str| options.settings.get(key).cloned().unwrap_or_default();
    if let Some(path) = options.mock_config {
        let config = mock::MockConfig::load(path)?;
        tracing::warn!(
            path = %path.display(),
            slot = %config.slot_name,
            devices = config.devices.len(),
            "using mock accelerators (resource.mock-accelerator); never in production"
        );
        // Backend.AI's mock takes its settings under its own plugin name (`mock`); ours also
        // under the slot it stands in for.
        let mock_settings =
            if options.settings.contains_key("mock") { settings("mock") } else { settings(&config.slot_name) };
        accelerators.push(Accelerator::mock(&config, mock_settings, options.mock_node_dir)?);
        plugins.push(Box::new(mock::MockPlugin::new(config)));
        return Ok(Detected { plugins, accelerators });
    }
    let fake_cuda_devices = options.fake_cuda_devices;
    if fake_cuda_devices > 0 {
        tracing::warn!(
            devices = fake_cuda_devices,
            "using a fake NVML ([debug] fake-cuda-devices); never in production"
        );
        plugins.push(Box::new(cuda::CudaPlugin::new(cuda::FakeNvml::new(fake_cuda_devices))));
        return Ok(Detected { plugins, accelerators });
    }
    match cuda::RealNvml::load() {
        Ok(nvml) => {
            tracing::info!(devices = ?nvml.device_count(), "NVML loaded; measuring NVIDIA devices");
            match nvml.inventory() {
                Ok(devices) => accelerators.push(Accelerator::nvidia(devices, settings("cuda"), nvml.driver_version())),
                Err(err) => tracing::error!(error = %err, "listing NVIDIA devices failed; none is handed out"),
            }
            plugins.push(Box::new(cuda::CudaPlugin::new(nvml)));
        }
        Err(err) => tracing::info!(reason = %err, "no NVIDIA devices: NVML is not available on this node"),
    }
    match rocm::RocmSmi::load() {
        Ok(smi) => {
            tracing::info!(devices = ?smi.device_count(), "ROCm SMI loaded; measuring AMD devices");
            match smi.inventory() {
                Ok(devices) => accelerators.push(Accelerator::rocm(devices, settings("rocm"))),
                Err(err) => tracing::error!(error = %err, "listing AMD devices failed; none is handed out"),
            }
            plugins.push(Box::new(rocm::RocmPlugin(smi)));
        }
        Err(err) => tracing::info!(reason = %err, "no AMD devices: ROCm SMI is not available on this node"),
    }
    Ok(Detected { plugins, accelerators })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::AllocationMode;

    const MOCK: &str = r#"slot_name = "cuda"
device_plugin_name = "CUDADevice"
devices = [
  { mother_uuid = "a", model_name = "CUDA GPU", numa_node = 0, subproc_count = 108, memory_size = "40G", is_mig_device = false },
]
"#;

    fn detected_mode(settings: &[(&str, AllocationMode)]) -> AllocationMode {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mock.toml");
        std::fs::write(&path, MOCK).expect("write");
        let settings = settings
            .iter()
            .map(|(key, mode)| {
                ((*key).to_owned(), AcceleratorSettings { allocation_mode: *mode, ..Default::default() })
            })
            .collect();
        let detected = detect(&DetectOptions {
            fake_cuda_devices: 0,
            mock_config: Some(&path),
            mock_node_dir: &dir.path().join("nodes"),
            settings: &settings,
        })
        .expect("detects");
        assert_eq!(detected.plugins.len(), 1);
        detected.accelerators[0].mode
    }

    #[test]
    fn the_mock_takes_backend_ais_mock_settings_else_its_slots() {
        assert_eq!(detected_mode(&[]), AllocationMode::Discrete, "Backend.AI's default");
        assert_eq!(detected_mode(&[("cuda", AllocationMode::Fractional)]), AllocationMode::Fractional);
        assert_eq!(
            detected_mode(&[("cuda", AllocationMode::Discrete), ("mock", AllocationMode::Fractional)]),
            AllocationMode::Fractional,
            "[accelerators.mock] (config/plugins/accelerator/mock/…) first"
        );
    }
}
