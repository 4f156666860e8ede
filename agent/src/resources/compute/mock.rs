//! The mock accelerator: devices described in the format of Backend.AI's
//! `backend.ai-accelerator-mock` plugin (`mock-accelerator.toml`), so that the agent's
//! accelerator paths run on a node without any.
//!
//! Backend.AI's mock has no per-process statistics; this one reads a synthetic load from the
//! environment of the kernels' processes (docs/ACCELERATORS.md): a process is on the mock
//! devices listed in `BACKENDAI_MOCK_{SLOT}_DEVICES` (comma-separated device ids, what
//! Backend.AI's mock sets for a kernel given devices) when it also has
//! `BAI_MOCK_GPU_UTIL=<0-100>`, the utilisation it claims on each of them; its device memory
//! is `BAI_MOCK_GPU_MEM=<bytes>`, or else its resident set. A device's own readings are the
//! sums over its processes (idle without any).

use std::path::Path;

use serde::Deserialize;

use super::{ComputeError, ComputePlugin, DeviceMeasure, DeviceReadings, ProcessUse};

/// The variable with a process's claimed utilisation (0–100) on its mock devices.
pub const UTIL_VAR: &str = "BAI_MOCK_GPU_UTIL";
/// The variable with a process's claimed device memory in bytes (else its resident set).
pub const MEM_VAR: &str = "BAI_MOCK_GPU_MEM";

/// The variable listing a process's mock devices for a slot (`BACKENDAI_MOCK_CUDA_DEVICES`).
pub fn devices_var(slot_name: &str) -> String {
    format!("BACKENDAI_MOCK_{}_DEVICES", slot_name.to_ascii_uppercase())
}

/// What a process claims, from its environment (`/proc/<pid>/environ`: `NAME=value\0…`):
/// (device ids, utilisation, memory if given). None when it is on no device.
pub fn synthetic_load(environ: &[u8], devices_var: &str) -> Option<(Vec<String>, u32, Option<u64>)> {
    let (mut devices, mut util, mut mem) = (None, None, None);
    for entry in environ.split(|b| *b == 0) {
        let Ok(entry) = std::str::from_utf8(entry) else { continue };
        let Some((name, value)) = entry.split_once('=') else { continue };
        if name == devices_var {
            devices = Some(value);
        } else if name == UTIL_VAR {
            util = value.trim().parse::<u32>().ok().filter(|pct| *pct <= 100);
        } else if name == MEM_VAR {
            mem = value.trim().parse::<u64>().ok();
        }
    }
    let devices: Vec<String> =
        devices?.split(',').map(str::trim).filter(|id| !id.is_empty()).map(str::to_owned).collect();
    if devices.is_empty() {
        return None;
    }
    Some((devices, util?, mem))
}

/// A process's resident set in bytes (`/proc/<pid>/statm`'s second field × the page size).
fn resident_bytes(pid: u32, buf: &mut Vec<u8>) -> Option<u64> {
    buf.clear();
    let mut file = std::fs::File::open(format!("/proc/{pid}/statm")).ok()?;
    std::io::Read::read_to_end(&mut file, buf).ok()?;
    let pages: u64 = std::str::from_utf8(buf).ok()?.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    Some(pages * page)
}

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

/// The mock devices as a compute plugin: memory total as configured, use from the synthetic
/// load of the last [`ComputePlugin::processes`] read.
pub struct MockPlugin {
    /// The slot name, kept for the process's life (plugins are made once, at start).
    key: &'static str,
    config: MockConfig,
    ids: Vec<String>,
    /// Each device's memory, in bytes (read once: the file was checked at load).
    totals: Vec<u64>,
    devices_var: String,
    /// The processes of the last read, for the devices' own readings.
    last: Vec<ProcessUse>,
    buf: Vec<u8>,
}

impl MockPlugin {
    pub fn new(config: MockConfig) -> MockPlugin {
        let key: &'static str = Box::leak(config.slot_name.clone().into_boxed_str());
        let ids = config.device_ids();
        let totals = config.devices.iter().map(|device| device.memory_bytes().unwrap_or(0)).collect();
        let devices_var = devices_var(&config.slot_name);
        MockPlugin { key, config, ids, totals, devices_var, last: Vec::new(), buf: Vec::with_capacity(4096) }
    }

    /// The uses of one process from its environment; none when it claims no device of ours.
    fn process_uses(&mut self, pid: u32, out: &mut Vec<ProcessUse>) {
        self.buf.clear();
        let read = std::fs::File::open(format!("/proc/{pid}/environ"))
            .and_then(|mut file| std::io::Read::read_to_end(&mut file, &mut self.buf));
        if let Err(err) = read {
            // Usually a process that exited since its cgroup was listed.
            tracing::debug!(pid, error = %err, "cannot read a process's environment; skipped");
            return;
        }
        let Some((devices, util, mem)) = synthetic_load(&self.buf, &self.devices_var) else { return };
        let mem = match mem {
            Some(mem) => mem,
            None => resident_bytes(pid, &mut self.buf).unwrap_or(0),
        };
        for device in devices.into_iter().filter(|id| self.ids.contains(id)) {
            out.push(ProcessUse { pid, device_id: device, mem_used_bytes: mem, sm_util_pct: util });
        }
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
            .zip(&self.ids)
            .zip(&self.totals)
            .map(|((device, id), &total)| {
                let on = self.last.iter().filter(|p| p.device_id == *id);
                let (mem, util) = on.fold((0u64, 0u32), |(m, u), p| {
                    (m.saturating_add(p.mem_used_bytes), u.saturating_add(p.sm_util_pct))
                });
                DeviceMeasure {
                    id: id.clone(),
                    model: device.model_name.clone(),
                    uuid: device.mother_uuid.clone(),
                    mem_used_bytes: mem.min(total),
                    mem_total_bytes: total,
                    utilization_pct: util.min(100),
                }
            })
            .collect();
        Ok(DeviceReadings { plugin: self.key, devices })
    }

    fn wants_candidates(&self) -> bool {
        true
    }

    fn processes(&mut self, candidates: &[u32]) -> Result<Vec<ProcessUse>, ComputeError> {
        let mut uses = Vec::new();
        for pid in candidates {
            self.process_uses(*pid, &mut uses);
        }
        uses.sort_by(|a, b| (a.pid, &a.device_id).cmp(&(b.pid, &b.device_id)));
        self.last = uses.clone();
        Ok(uses)
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
    fn the_synthetic_load_is_read_from_the_environment() {
        let var = devices_var("cuda");
        assert_eq!(var, "BACKENDAI_MOCK_CUDA_DEVICES");
        let env = |text: &str| text.replace(' ', "\0").into_bytes();
        assert_eq!(
            synthetic_load(&env("PATH=/bin BACKENDAI_MOCK_CUDA_DEVICES=a,b BAI_MOCK_GPU_UTIL=70"), &var),
            Some((vec!["a".to_owned(), "b".to_owned()], 70, None))
        );
        assert_eq!(
            synthetic_load(&env("BAI_MOCK_GPU_MEM=1024 BACKENDAI_MOCK_CUDA_DEVICES=a BAI_MOCK_GPU_UTIL=0"), &var),
            Some((vec!["a".to_owned()], 0, Some(1024)))
        );
        // Devices without a utilisation, a utilisation without devices, or one out of range: on no device.
        assert_eq!(synthetic_load(&env("BACKENDAI_MOCK_CUDA_DEVICES=a"), &var), None);
        assert_eq!(synthetic_load(&env("BAI_MOCK_GPU_UTIL=70"), &var), None);
        assert_eq!(synthetic_load(&env("BACKENDAI_MOCK_CUDA_DEVICES=a BAI_MOCK_GPU_UTIL=101"), &var), None);
        assert_eq!(synthetic_load(&env("BACKENDAI_MOCK_CUDA_DEVICES= BAI_MOCK_GPU_UTIL=5"), &var), None);
    }

    #[test]
    fn a_child_with_the_variables_is_on_its_devices_and_the_device_readings_follow() {
        let (_dir, path) = write(SAMPLE);
        let mut plugin = MockPlugin::new(MockConfig::load(&path).expect("loads"));
        let id = plugin.ids[0].clone();
        let mut busy = std::process::Command::new("sleep")
            .arg("30")
            .env("BACKENDAI_MOCK_CUDA_DEVICES", format!("{id},not-ours"))
            .env(UTIL_VAR, "70")
            .env(MEM_VAR, "4096")
            .spawn()
            .expect("sleep");
        let mut idle = std::process::Command::new("sleep")
            .arg("30")
            .env("BACKENDAI_MOCK_CUDA_DEVICES", &id)
            .spawn()
            .expect("sleep");
        assert!(plugin.wants_candidates());
        // Until a child has exec'd, /proc shows the environment it forked with (ours).
        for child in [busy.id(), idle.id()] {
            let exec_done =
                || std::fs::read_to_string(format!("/proc/{child}/comm")).is_ok_and(|comm| comm.trim() == "sleep");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !exec_done() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let uses = plugin.processes(&[busy.id(), idle.id(), u32::MAX]).expect("reads");
        let _ = (busy.kill(), idle.kill(), busy.wait(), idle.wait());
        assert_eq!(uses, [ProcessUse { pid: busy.id(), device_id: id, mem_used_bytes: 4096, sm_util_pct: 70 }]);
        let readings = plugin.measure().expect("measures");
        assert_eq!((readings.devices[0].utilization_pct, readings.devices[0].mem_used_bytes), (70, 4096));
        assert_eq!((readings.devices[1].utilization_pct, readings.devices[1].mem_used_bytes), (0, 0));
        assert_eq!(readings.devices[0].uuid, "c59395cd-ac91-4cd3-a1b0-3d2568aa2d01");
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
