//! Compute plugins: accelerators behind one trait, so the monitor measures every device
//! the same way whatever its vendor. [`cuda`] is NVIDIA's, through NVML loaded at run time;
//! [`mock`] reads Backend.AI's mock-accelerator format, for nodes without accelerators.

pub mod cuda;
pub mod mock;

use cuda::Nvml;

/// One device's measurements at one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMeasure {
    /// The device id Backend.AI uses: its index on the node, as a string.
    pub id: String,
    pub model: String,
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
