//! The mock accelerator: devices described in the format of Backend.AI's
//! `backend.ai-accelerator-mock` plugin (`mock-accelerator.toml`), measured as idle, so that
//! the agent's accelerator paths run on a node without any.

use std::path::Path;

use serde::Deserialize;

use super::{ComputeError, ComputePlugin, DeviceMeasure, DeviceReadings};

/// The file, as the Python plugin reads it (`slot_name`, `device_plugin_name`, `devices`,
/// `attributes`, `formats`); keys it does not check are let through, as it does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MockConfig {
    /// The slot family (`cuda`: `cuda.device` / `cuda.shares`).
    pub slot_name: String,
    pub device_plugin_name: String,
    pub devices: Vec<MockDevice>,
    #[serde(default)]
    pub attributes: toml::Table,
    #[serde(default)]
    pub formats: toml::Table,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MockDevice {
    pub mother_uuid: String,
    pub model_name: String,
    pub numa_node: u32,
    pub subproc_count: u32,
    /// Bytes, or a size such as `"40G"` (binary units, as Backend.AI's `BinarySize`).
    pub memory_size: toml::Value,
    /// Required for `cuda`: a MIG device is named `MIG-{mother_uuid}/{index}/0`.
    #[serde(default)]
    pub is_mig_device: Option<bool>,
}

impl MockConfig {
    /// Reads and checks the file; an error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<MockConfig, ComputeError> {
        let failed = |message: String| ComputeError::Device { plugin: "mock", message };
        let text = std::fs::read_to_string(path).map_err(|err| failed(format!("{}: {err}", path.display())))?;
        let config: MockConfig = toml::from_str(&text).map_err(|err| failed(format!("{}: {err}", path.display())))?;
        config.check().map_err(|message| failed(format!("{}: {message}", path.display())))?;
        Ok(config)
    }

    /// What the Python plugin's schema requires beyond the keys' presence.
    fn check(&self) -> Result<(), String> {
        if self.slot_name.is_empty() || !self.slot_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("slot_name `{}` must be a plain name like `cuda`", self.slot_name));
        }
        for (index, device) in self.devices.iter().enumerate() {
            if device.subproc_count < 1 {
                return Err(format!("devices[{index}].subproc_count must be at least 1"));
            }
            device.memory_bytes().map_err(|message| format!("devices[{index}].memory_size: {message}"))?;
            if self.slot_name == "cuda" && device.is_mig_device.is_none() {
                return Err(format!("devices[{index}].is_mig_device is required for the cuda slot"));
            }
        }
        for (name, format) in &self.formats {
            let table = format.as_table().ok_or_else(|| format!("formats.{name} must be a table"))?;
            for key in ["human_readable_name", "description", "display_unit", "display_icon", "number_format"] {
                if !table.contains_key(key) {
                    return Err(format!("formats.{name}.{key} is missing"));
                }
            }
        }
        Ok(())
    }

    /// The Backend.AI device id of each device (its index decides a MIG device's name).
    pub fn device_ids(&self) -> Vec<String> {
        self.devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                if device.is_mig_device == Some(true) {
                    format!("MIG-{}/{index}/0", device.mother_uuid)
                } else {
                    device.mother_uuid.clone()
                }
            })
            .collect()
    }
}

impl MockDevice {
    pub fn memory_bytes(&self) -> Result<u64, String> {
        match &self.memory_size {
            toml::Value::Integer(bytes) => u64::try_from(*bytes).map_err(|_| format!("{bytes} is negative")),
            toml::Value::String(text) => crate::resources::parse_binary_size(text)
                .ok_or_else(|| format!("`{text}` is not a size (bytes, or e.g. \"40G\")")),
            other => Err(format!("{other} is not a size")),
        }
    }
}

/// The mock devices as a compute plugin: always idle, memory as configured.
pub struct MockPlugin {
    /// The slot name, kept for the process's life (plugins are made once, at start).
    key: &'static str,
    config: MockConfig,
}

impl MockPlugin {
    pub fn new(config: MockConfig) -> MockPlugin {
        let key: &'static str = Box::leak(config.slot_name.clone().into_boxed_str());
        MockPlugin { key, config }
    }
}

impl ComputePlugin for MockPlugin {
    fn key(&self) -> &'static str {
        self.key
    }

    fn measure(&mut self) -> Result<DeviceReadings, ComputeError> {
        let devices = self
            .config
            .devices
            .iter()
            .zip(self.config.device_ids())
            .map(|(device, id)| DeviceMeasure {
                id,
                model: device.model_name.clone(),
                mem_used_bytes: 0,
                mem_total_bytes: device.memory_bytes().unwrap_or(0),
                utilization_pct: 0,
            })
            .collect();
        Ok(DeviceReadings { plugin: self.key, devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backend.AI's own sample (`configs/accelerator/mock-accelerator.toml`), two devices.
    const SAMPLE: &str = r#"
slot_name = "cuda"
device_plugin_name = "CUDADevice"
devices = [
  { mother_uuid = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d01", model_name = "CUDA GPU", numa_node = 0, subproc_count = 108, memory_size = "40G", is_mig_device = false },
  { mother_uuid = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d02", model_name = "CUDA GPU", numa_node = 1, subproc_count = 108, memory_size = "40G", is_mig_device = true },
]

[attributes]
nvidia_driver = "450.0.0"
cuda_runtime = "11.0"

[formats.devices]
display_unit = "GPU"
display_icon = "gpu1"
human_readable_name = "GPU"
description = "CUDA-capable GPU"
number_format = { binary = false, round_length = 0 }
"#;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mock-accelerator.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn backend_ais_sample_loads_and_measures_idle() {
        let (_dir, path) = write(SAMPLE);
        let config = MockConfig::load(&path).expect("loads");
        assert_eq!(config.device_ids()[1], "MIG-c59395cd-ac91-4cd3-a1b0-3d2568aa2d02/1/0");
        let mut plugin = MockPlugin::new(config);
        assert_eq!(plugin.key(), "cuda");
        let readings = plugin.measure().expect("measures");
        assert_eq!(readings.devices.len(), 2);
        assert_eq!(readings.devices[0].mem_total_bytes, 40 << 30);
        assert_eq!((readings.devices[0].mem_used_bytes, readings.devices[0].utilization_pct), (0, 0));
    }

    #[test]
    fn what_the_python_plugin_refuses_is_refused_by_name() {
        for (broken, named) in [
            (
                SAMPLE.replace(
                    "subproc_count = 108, memory_size = \"40G\", is_mig_device = false",
                    "subproc_count = 0, memory_size = \"40G\", is_mig_device = false",
                ),
                "subproc_count",
            ),
            (
                SAMPLE.replace(
                    "memory_size = \"40G\", is_mig_device = false",
                    "memory_size = \"lots\", is_mig_device = false",
                ),
                "memory_size",
            ),
            (SAMPLE.replace(", is_mig_device = false", ""), "is_mig_device"),
            (SAMPLE.replace("display_icon = \"gpu1\"\n", ""), "display_icon"),
            (SAMPLE.replace("slot_name = \"cuda\"\n", ""), "slot_name"),
        ] {
            let (_dir, path) = write(&broken);
            let err = MockConfig::load(&path).expect_err(named).to_string();
            assert!(err.contains(named) && err.contains("mock-accelerator.toml"), "{named}: {err}");
        }
    }
}
