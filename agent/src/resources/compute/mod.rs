//! Compute plugins: accelerators behind one trait, so the monitor measures every device
//! the same way whatever its vendor. [`cuda`] is NVIDIA's, through NVML loaded at run time.

pub mod cuda;

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

/// The plugins this node has: each one whose library and devices are present.
pub fn detect(fake_cuda_devices: u32) -> Vec<Box<dyn ComputePlugin>> {
    let mut plugins: Vec<Box<dyn ComputePlugin>> = Vec::new();
    if fake_cuda_devices > 0 {
        tracing::warn!(
            devices = fake_cuda_devices,
            "using a fake NVML ([debug] fake-cuda-devices); never in production"
        );
        plugins.push(Box::new(cuda::CudaPlugin::new(cuda::FakeNvml::new(fake_cuda_devices))));
        return plugins;
    }
    match cuda::RealNvml::load() {
        Ok(nvml) => {
            tracing::info!(devices = ?nvml.device_count(), "NVML loaded; measuring NVIDIA devices");
            plugins.push(Box::new(cuda::CudaPlugin::new(nvml)));
        }
        Err(err) => tracing::info!(reason = %err, "no NVIDIA devices: NVML is not available on this node"),
    }
    plugins
}
