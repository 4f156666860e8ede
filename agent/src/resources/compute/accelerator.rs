//! The accelerators this node hands out: each plugin's devices as allocation sees them (ids,
//! memory, processing units, NUMA node), its slot (`cuda.device` or `cuda.shares`), and what
//! a kernel given some of them gets: device nodes, the NVIDIA runtime's device request,
//! environment variables and `resource.txt` lines, and the manager's `used_devices` facts.

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use rust_decimal::{Decimal, prelude::ToPrimitive};

use super::{ComputeError, mock::MockConfig};
use crate::resources::{
    AllocationMode, AllocationStrategy, DeviceAllocMap, DeviceCapacity, PerDevice, format_binary_size,
};

/// NVIDIA's character-device major, which the mock's stand-in nodes also use.
const NVIDIA_MAJOR: u32 = 195;
/// `/dev/nvidiactl`'s minor.
const NVIDIACTL_MINOR: u32 = 255;
/// The major of other mock plugins' stand-in nodes (in the range Linux leaves for local use).
const MOCK_MAJOR: u32 = 241;
/// AMD's compute interface, which every ROCm process opens.
const KFD: &str = "/dev/kfd";
/// TensorFlow's floor on multiprocessors, which Backend.AI sets for CUDA kernels.
const MIN_SMP_COUNT: u32 = 4;

/// How one accelerator plugin's devices are handed out (`[accelerators.<plugin>]`; the keys
/// of Backend.AI's `config/plugins/accelerator/<plugin>/…`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct AcceleratorSettings {
    /// `discrete` (`{plugin}.device`, whole devices) or `fractional` (`{plugin}.shares`).
    pub allocation_mode: AllocationMode,
    /// The smallest share a device gives (fractional).
    #[serde(deserialize_with = "positive_decimal")]
    pub quantum_size: Decimal,
    /// Device memory one share stands for (fractional).
    #[serde(deserialize_with = "crate::resources::slots::deserialize_byte_size")]
    pub unit_mem: u64,
    /// Processing units (multiprocessors) one share stands for (fractional).
    pub unit_proc: u32,
    /// Device ids the node keeps for itself: never handed out.
    pub device_mask: Vec<String>,
    /// Device memory kept back from a shared device's kernels (`CUDA_RESERVED_MEMORY`).
    #[serde(deserialize_with = "crate::resources::slots::deserialize_byte_size")]
    pub reserved_memory: u64,
}

impl Default for AcceleratorSettings {
    fn default() -> Self {
        Self {
            allocation_mode: AllocationMode::Discrete,
            quantum_size: Decimal::new(1, 2),
            unit_mem: 2 << 30,
            unit_proc: 8,
            device_mask: Vec::new(),
            reserved_memory: 64 << 20,
        }
    }
}

/// A positive decimal, written as a string (`"0.01"`) or a number.
fn positive_decimal<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Decimal, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Float(f64),
        Int(i64),
    }
    let value = match <Raw as serde::Deserialize>::deserialize(de)? {
        Raw::Text(text) => text.trim().parse::<Decimal>().map_err(serde::de::Error::custom)?,
        Raw::Float(f) => Decimal::try_from(f).map_err(serde::de::Error::custom)?,
        Raw::Int(i) => Decimal::from(i),
    };
    if value <= Decimal::ZERO {
        return Err(serde::de::Error::custom(format!("{value} must be positive")));
    }
    Ok(value.normalize())
}

/// A host device node a container gets, as Docker's `--device` has it
/// (`host[:container[:permissions]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMapping {
    pub host_path: String,
    pub container_path: String,
    /// Some of `r`, `w`, `m`.
    pub permissions: String,
}

impl DeviceMapping {
    /// Parses `host[:container[:permissions]]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        let host_path = parts.next().unwrap_or_default().trim().to_owned();
        let container_path = parts.next().map(str::trim).filter(|p| !p.is_empty()).unwrap_or(&host_path).to_owned();
        let permissions = parts.next().map(str::trim).unwrap_or("rwm").to_owned();
        if parts.next().is_some() {
            return Err(format!("`{text}`: expected host[:container[:permissions]]"));
        }
        if !host_path.starts_with("/dev/") || !container_path.starts_with('/') {
            return Err(format!("`{text}`: the host path must be under /dev and the container path absolute"));
        }
        if permissions.is_empty() || !permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(format!("`{text}`: permissions are some of r, w, m"));
        }
        Ok(Self { host_path, container_path, permissions })
    }
}

impl<'de> serde::Deserialize<'de> for DeviceMapping {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        DeviceMapping::parse(&<String as serde::Deserialize>::deserialize(deserializer)?)
            .map_err(serde::de::Error::custom)
    }
}

/// One device as allocation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceleratorDevice {
    /// Backend.AI's device id (`0` for NVML's first device, `mother_uuid` for a mock one).
    pub id: String,
    pub model: String,
    pub numa_node: Option<u32>,
    pub memory_bytes: u64,
    /// Multiprocessors (CUDA) or the plugin's processing units.
    pub processing_units: u32,
    /// The device node a kernel given it opens, on the host.
    pub host_node: Option<PathBuf>,
    /// Where that node appears in the container.
    pub container_node: String,
}

/// How devices reach a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// The NVIDIA container runtime (`DeviceRequests`, driver `nvidia`) mounts the nodes, the
    /// driver's libraries and `nvidia-smi`; the device program allows the nodes.
    Nvidia,
    /// Stand-in nodes the agent made, passed as plain devices.
    Mock,
    /// AMD's: each device's DRM render node and `/dev/kfd`, passed as plain devices (as AMD's
    /// instructions for Docker have them).
    Rocm,
}

/// A request for the NVIDIA container runtime (Docker's `DeviceRequests` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    pub driver: String,
    pub device_ids: Vec<String>,
    pub capabilities: Vec<String>,
}

/// What one kernel's container gets for its devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerDevices {
    /// The devices given: (plugin key, device id).
    pub given: Vec<(String, String)>,
    pub env: BTreeMap<String, String>,
    /// Device nodes passed to the container (and allowed by the device program).
    pub nodes: Vec<DeviceMapping>,
    /// Nodes a runtime mounts itself: only allowed by the device program.
    pub allowed_only: Vec<DeviceMapping>,
    pub device_requests: Vec<DeviceRequest>,
    /// Lines appended to the kernel's `resource.txt` (Backend.AI's `generate_resource_data`).
    pub resource_data: Vec<(String, String)>,
}

/// A device a kernel holds, as the manager records it (`used_devices` / `attached_devices`).
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedDevice {
    pub device_id: String,
    pub model_name: String,
    pub slot: String,
    pub amount: Decimal,
    pub processing_units: u32,
    pub memory_bytes: u64,
}

/// One plugin's devices, handed out to kernels.
#[derive(Debug, Clone)]
pub struct Accelerator {
    /// The plugin key and slot prefix (`cuda`).
    pub key: String,
    pub mode: AllocationMode,
    pub settings: AcceleratorSettings,
    pub devices: Vec<AcceleratorDevice>,
    pub passthrough: Passthrough,
    /// The heartbeat's `compute_plugins` entry besides `version` (`cuda_support`, …).
    pub extra_info: BTreeMap<String, String>,
}

impl Accelerator {
    /// The devices of a mock-accelerator file; stand-in nodes are made under `node_dir`.
    pub fn mock(
        config: &MockConfig,
        settings: AcceleratorSettings,
        node_dir: &Path,
    ) -> Result<Accelerator, ComputeError> {
        let failed = |message: String| ComputeError::Device { plugin: "mock", message };
        std::fs::create_dir_all(node_dir).map_err(|err| failed(format!("{}: {err}", node_dir.display())))?;
        let cuda = config.slot_name == "cuda";
        let mut devices = Vec::new();
        for (index, (device, id)) in config.devices.iter().zip(config.device_ids()).enumerate() {
            if device.is_mig_device == Some(true) {
                tracing::warn!(device = %id, "mock MIG devices are measured but not handed out (no MIG slots)");
                continue;
            }
            let index = u32::try_from(index).map_err(|_| failed("too many devices".into()))?;
            let (major, name) = if cuda {
                (NVIDIA_MAJOR, format!("nvidia{index}"))
            } else {
                (MOCK_MAJOR, format!("{}{index}", config.slot_name))
            };
            let host_node = node_dir.join(&name);
            ensure_char_node(&host_node, major, index).map_err(failed)?;
            devices.push(AcceleratorDevice {
                id,
                model: device.model_name.clone(),
                numa_node: Some(device.numa_node),
                memory_bytes: device.memory_bytes().map_err(failed)?,
                processing_units: device.subproc_count,
                host_node: Some(host_node),
                container_node: format!("/dev/{name}"),
            });
        }
        if cuda {
            ensure_char_node(&node_dir.join("nvidiactl"), NVIDIA_MAJOR, NVIDIACTL_MINOR).map_err(failed)?;
        }
        let mut extra_info = BTreeMap::from([(format!("{}_support", config.slot_name), "true".to_owned())]);
        for (key, value) in &config.attributes {
            extra_info.insert(key.clone(), value.as_str().map_or_else(|| value.to_string(), str::to_owned));
        }
        let mut accelerator = Accelerator {
            key: config.slot_name.clone(),
            mode: settings.allocation_mode,
            settings,
            devices,
            passthrough: Passthrough::Mock,
            extra_info,
        };
        accelerator.apply_mask();
        Ok(accelerator)
    }

    /// NVIDIA devices as NVML lists them, whole devices only (`cuda.device`).
    pub fn nvidia(
        devices: Vec<AcceleratorDevice>,
        settings: AcceleratorSettings,
        driver: Option<String>,
    ) -> Accelerator {
        let mut accelerator = Self::whole_devices("cuda", devices, settings, Passthrough::Nvidia);
        if let Some(driver) = driver {
            accelerator.extra_info.insert("nvidia_version".into(), driver);
        }
        accelerator
    }

    /// AMD devices as ROCm SMI lists them, whole devices only (`rocm.device`).
    pub fn rocm(devices: Vec<AcceleratorDevice>, settings: AcceleratorSettings) -> Accelerator {
        Self::whole_devices("rocm", devices, settings, Passthrough::Rocm)
    }

    /// A real vendor's devices, which are handed out whole whatever `allocation-mode` says.
    fn whole_devices(
        key: &str,
        devices: Vec<AcceleratorDevice>,
        settings: AcceleratorSettings,
        passthrough: Passthrough,
    ) -> Accelerator {
        if settings.allocation_mode == AllocationMode::Fractional {
            tracing::warn!(
                plugin = key,
                "real devices are handed out whole; accelerators.{key}.allocation-mode = fractional is ignored"
            );
        }
        let mut accelerator = Accelerator {
            key: key.to_owned(),
            mode: AllocationMode::Discrete,
            settings,
            devices,
            passthrough,
            extra_info: BTreeMap::from([(format!("{key}_support"), "true".to_owned())]),
        };
        accelerator.apply_mask();
        accelerator
    }

    /// `device-mask`: devices the node keeps for itself.
    fn apply_mask(&mut self) {
        let mask = &self.settings.device_mask;
        self.devices.retain(|device| !mask.contains(&device.id));
    }

    /// Its `gather_hwinfo` metadata: the slot, how many devices, their models, whether they
    /// are the mock's, and the plugin's attributes (`nvidia_driver`, …).
    pub fn hwinfo(&self) -> Vec<(String, String)> {
        let models: std::collections::BTreeSet<&str> = self.devices.iter().map(|d| d.model.as_str()).collect();
        let mut metadata = vec![
            ("slot".to_owned(), self.slot()),
            ("devices".to_owned(), self.devices.len().to_string()),
            ("models".to_owned(), models.into_iter().collect::<Vec<_>>().join(",")),
            ("mock".to_owned(), (self.passthrough == Passthrough::Mock).to_string()),
        ];
        metadata.extend(
            self.extra_info.iter().filter(|(key, _)| !key.ends_with("_support")).map(|(k, v)| (k.clone(), v.clone())),
        );
        metadata
    }

    /// The slot this accelerator hands out (`cuda.device`, `cuda.shares`).
    pub fn slot(&self) -> String {
        self.mode.slot_name(&self.key)
    }

    /// A device's shares: `min(memory / unit-mem, processing units / unit-proc)`, to 0.01
    /// down, as Backend.AI's fractional plugins count them.
    pub fn shares_of(&self, device: &AcceleratorDevice) -> Decimal {
        let unit_mem = Decimal::from(self.settings.unit_mem.max(1));
        let unit_proc = Decimal::from(self.settings.unit_proc.max(1));
        let by_mem = Decimal::from(device.memory_bytes) / unit_mem;
        let by_proc = Decimal::from(device.processing_units) / unit_proc;
        (by_mem.min(by_proc) * Decimal::ONE_HUNDRED).floor() / Decimal::ONE_HUNDRED
    }

    /// The allocation map of this accelerator's slot.
    pub fn alloc_map(&self, strategy: AllocationStrategy) -> DeviceAllocMap {
        let devices = self
            .devices
            .iter()
            .map(|device| DeviceCapacity {
                id: device.id.clone(),
                numa_node: device.numa_node,
                capacity: match self.mode {
                    AllocationMode::Discrete => Decimal::ONE,
                    AllocationMode::Fractional => self.shares_of(device),
                },
            })
            .collect();
        DeviceAllocMap::new(self.slot(), self.mode, strategy, self.settings.quantum_size, devices)
    }

    fn device(&self, id: &str) -> Option<&AcceleratorDevice> {
        self.devices.iter().find(|device| device.id == id)
    }

    /// What a kernel holding `per_device` of this accelerator's slot gets in its container.
    pub fn container_devices(&self, per_device: &PerDevice) -> ContainerDevices {
        let held: Vec<&AcceleratorDevice> =
            per_device.iter().filter(|(_, amount)| !amount.is_zero()).filter_map(|(id, _)| self.device(id)).collect();
        let mut out = ContainerDevices::default();
        if held.is_empty() {
            return out;
        }
        let ids: Vec<String> = held.iter().map(|device| device.id.clone()).collect();
        out.given = ids.iter().map(|id| (self.key.clone(), id.clone())).collect();
        let visible: Vec<String> = (0..held.len()).map(|index| index.to_string()).collect();
        let upper = self.key.to_ascii_uppercase();
        let env = &mut out.env;
        match self.passthrough {
            // HIP's and the ROCm runtime's own variables.
            Passthrough::Rocm => {
                env.insert("HIP_VISIBLE_DEVICES".into(), visible.join(","));
                env.insert("ROCR_VISIBLE_DEVICES".into(), visible.join(","));
            }
            _ => {
                env.insert(format!("{upper}_VISIBLE_DEVICES"), visible.join(","));
            }
        }
        if self.key == "cuda" {
            env.insert("TF_MIN_GPU_MULTIPROCESSOR_COUNT".into(), MIN_SMP_COUNT.to_string());
        }
        // What Backend.AI's agent sets for a kernel's first accelerator.
        env.insert("GPU_TYPE".into(), self.key.clone());
        env.insert("GPU_MODEL_NAME".into(), held[0].model.clone());
        env.insert("GPU_COUNT".into(), held.len().to_string());
        env.insert("N_GPUS".into(), held.len().to_string());
        let attached = self.attached_devices(per_device);
        env.insert(
            "GPU_CONFIG".into(),
            attached
                .iter()
                .enumerate()
                .map(|(index, device)| format!("{index}:{}", format_binary_size(device.memory_bytes)))
                .collect::<Vec<_>>()
                .join(","),
        );
        env.insert(
            "TF_GPU_MEMORY_ALLOC".into(),
            attached
                .iter()
                .enumerate()
                .map(|(index, device)| format!("{index}:{}", device.memory_bytes >> 20))
                .collect::<Vec<_>>()
                .join(","),
        );

        let node = |host: &Path, container: &str| DeviceMapping {
            host_path: host.display().to_string(),
            container_path: container.to_owned(),
            permissions: "rwm".into(),
        };
        let held_nodes = held
            .iter()
            .filter_map(|device| Some(node(device.host_node.as_ref()?, &device.container_node)))
            .collect::<Vec<_>>();
        match self.passthrough {
            Passthrough::Mock => {
                env.insert(super::mock::devices_var(&self.key), ids.join(","));
                env.insert(format!("BACKENDAI_MOCK_{upper}_DEVICE_COUNT"), ids.len().to_string());
                out.nodes = held_nodes;
                if self.key == "cuda"
                    && let Some(dir) = held.iter().find_map(|device| device.host_node.as_ref()?.parent())
                {
                    out.nodes.push(node(&dir.join("nvidiactl"), "/dev/nvidiactl"));
                }
            }
            Passthrough::Rocm => {
                out.nodes.push(node(Path::new(KFD), KFD));
                out.nodes.extend(held_nodes);
            }
            Passthrough::Nvidia => {
                out.device_requests.push(DeviceRequest {
                    driver: "nvidia".into(),
                    device_ids: ids.clone(),
                    capabilities: ["utility", "compute", "video", "graphics", "display"].map(str::to_owned).to_vec(),
                });
                out.allowed_only = held_nodes;
                for control in ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"] {
                    if Path::new(control).exists() {
                        out.allowed_only.push(node(Path::new(control), control));
                    }
                }
            }
        }
        out.resource_data = self.resource_data(per_device, &ids);
        out
    }

    /// Backend.AI's `generate_resource_data` lines for CUDA: the devices by local index, and
    /// for shares the memory and multiprocessor limits they amount to.
    fn resource_data(&self, per_device: &PerDevice, ids: &[String]) -> Vec<(String, String)> {
        if self.key != "cuda" {
            return Vec::new();
        }
        let global = ids.iter().enumerate().map(|(index, id)| format!("{index}:{id}")).collect::<Vec<_>>().join(",");
        let fractional = self.mode == AllocationMode::Fractional;
        let mut lines = vec![
            ("CUDA_GLOBAL_DEVICE_IDS".to_owned(), global),
            ("CUDA_RESOURCE_VIRTUALIZED".to_owned(), if fractional { "1" } else { "0" }.to_owned()),
        ];
        if fractional {
            let (mem, proc): (Vec<String>, Vec<String>) = per_device
                .iter()
                .map(|(id, share)| {
                    let (mem, proc) = self.share_spec(share.as_decimal());
                    (format!("{id}:{}", format_binary_size(mem)), format!("{id}:{proc}"))
                })
                .unzip();
            lines.push(("CUDA_MEMORY_LIMITS".into(), mem.join(",")));
            lines.push(("CUDA_PROCESSOR_LIMITS".into(), proc.join(",")));
            lines.push(("CUDA_RESERVED_MEMORY".into(), self.settings.reserved_memory.to_string()));
        }
        lines
    }

    /// The memory and multiprocessors a share amounts to.
    fn share_spec(&self, share: Decimal) -> (u64, u32) {
        let mem = (Decimal::from(self.settings.unit_mem) * share).floor().to_u64().unwrap_or(0);
        let proc = (Decimal::from(self.settings.unit_proc) * share).floor().to_u32().unwrap_or(0).max(MIN_SMP_COUNT);
        (mem, proc)
    }

    /// The devices a kernel holds, with what the manager records of each: whole devices their
    /// full memory and units, shares what the share amounts to.
    pub fn attached_devices(&self, per_device: &PerDevice) -> Vec<AttachedDevice> {
        let slot = self.slot();
        per_device
            .iter()
            .filter(|(_, amount)| !amount.is_zero())
            .filter_map(|(id, amount)| {
                let device = self.device(id)?;
                let (memory_bytes, processing_units) = match self.mode {
                    AllocationMode::Discrete => (device.memory_bytes, device.processing_units),
                    AllocationMode::Fractional => self.share_spec(amount.as_decimal()),
                };
                Some(AttachedDevice {
                    device_id: id.clone(),
                    model_name: device.model.clone(),
                    slot: slot.clone(),
                    amount: amount.as_decimal(),
                    processing_units,
                    memory_bytes,
                })
            })
            .collect()
    }
}

/// Makes (or checks) a character node with these numbers; a different file there is an error.
fn ensure_char_node(path: &Path, major: u32, minor: u32) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let rdev = meta.rdev();
            if meta.file_type().is_char_device() && libc::major(rdev) == major && libc::minor(rdev) == minor {
                return Ok(());
            }
            Err(format!("{} exists and is not the character device {major}:{minor}", path.display()))
        }
        Err(_) => {
            let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{}: a NUL in the path", path.display()))?;
            // SAFETY: c_path is a valid NUL-terminated path; mknod reads it and nothing else.
            let made = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(major, minor)) };
            if made != 0 {
                return Err(format!(
                    "making the stand-in device {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
    }
}

/// The NUMA node of a PCI device (`/sys/bus/pci/devices/{bus_id}/numa_node`); `None` when
/// the host does not say (-1).
pub fn pci_numa_node(bus_id: &str) -> Option<u32> {
    let path = format!("/sys/bus/pci/devices/{}/numa_node", bus_id.to_ascii_lowercase());
    std::fs::read_to_string(path).ok()?.trim().parse::<i64>().ok().and_then(|node| u32::try_from(node).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::SlotAmount;

    const SAMPLE: &str = r#"
slot_name = "cuda"
device_plugin_name = "CUDADevice"
devices = [
  { mother_uuid = "c59395cd-0001", model_name = "CUDA GPU", numa_node = 0, subproc_count = 108, memory_size = "40G", is_mig_device = false },
  { mother_uuid = "c59395cd-0002", model_name = "CUDA GPU", numa_node = 1, subproc_count = 108, memory_size = "40G", is_mig_device = false },
  { mother_uuid = "c59395cd-0003", model_name = "A100-1g.5gb", numa_node = 1, subproc_count = 14, memory_size = "5G", is_mig_device = true },
]
[attributes]
nvidia_driver = "450.0.0"
"#;

    fn mock(mode: AllocationMode) -> (tempfile::TempDir, Accelerator) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mock.toml");
        std::fs::write(&path, SAMPLE).expect("write");
        let config = MockConfig::load(&path).expect("loads");
        let settings = AcceleratorSettings { allocation_mode: mode, ..AcceleratorSettings::default() };
        let accelerator = Accelerator::mock(&config, settings, &dir.path().join("nodes")).expect("mock");
        (dir, accelerator)
    }

    fn held(list: &[(&str, &str)]) -> PerDevice {
        list.iter().map(|(id, amount)| ((*id).to_owned(), amount.parse::<SlotAmount>().expect("amount"))).collect()
    }

    #[test]
    fn device_mappings_parse_as_docker_has_them() {
        let plain = DeviceMapping::parse("/dev/fuse").unwrap();
        assert_eq!((plain.container_path.as_str(), plain.permissions.as_str()), ("/dev/fuse", "rwm"));
        let full = DeviceMapping::parse("/dev/net/tun:/dev/tun0:rw").unwrap();
        assert_eq!((full.container_path.as_str(), full.permissions.as_str()), ("/dev/tun0", "rw"));
        for bad in ["fuse", "/etc/passwd", "/dev/fuse:/dev/fuse:rx", "/dev/a:/b:r:x", "/dev/fuse:rel"] {
            assert!(DeviceMapping::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mock_devices_get_stand_in_nodes_and_whole_slots() {
        let (dir, accelerator) = mock(AllocationMode::Discrete);
        assert_eq!(accelerator.slot(), "cuda.device");
        assert_eq!(accelerator.devices.len(), 2, "the MIG device is not handed out");
        let meta = std::fs::metadata(dir.path().join("nodes/nvidia1")).expect("node made");
        assert!(meta.file_type().is_char_device());
        assert_eq!((libc::major(meta.rdev()), libc::minor(meta.rdev())), (195, 1));
        assert_eq!(accelerator.alloc_map(AllocationStrategy::Fill).capacity(), Decimal::TWO);
        assert_eq!(accelerator.extra_info["cuda_support"], "true");
        assert_eq!(accelerator.extra_info["nvidia_driver"], "450.0.0");
        // A second start finds the nodes and keeps them.
        let again = mock(AllocationMode::Discrete);
        drop(again);
    }

    #[test]
    fn a_kernel_sees_only_its_devices() {
        let (_dir, accelerator) = mock(AllocationMode::Discrete);
        let given = accelerator.container_devices(&held(&[("c59395cd-0002", "1")]));
        let paths: Vec<&str> = given.nodes.iter().map(|node| node.container_path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/nvidia1", "/dev/nvidiactl"]);
        assert_eq!(given.env["CUDA_VISIBLE_DEVICES"], "0");
        assert_eq!(given.env["BACKENDAI_MOCK_CUDA_DEVICES"], "c59395cd-0002");
        assert_eq!(given.env["GPU_COUNT"], "1");
        assert_eq!(given.env["GPU_CONFIG"], "0:40g");
        assert!(given.device_requests.is_empty());
        assert_eq!(given.resource_data[0], ("CUDA_GLOBAL_DEVICE_IDS".to_owned(), "0:c59395cd-0002".to_owned()));
        assert!(accelerator.container_devices(&Vec::new()).env.is_empty(), "no devices, nothing set");
    }

    #[test]
    fn shares_count_by_memory_and_processors() {
        let (_dir, accelerator) = mock(AllocationMode::Fractional);
        assert_eq!(accelerator.slot(), "cuda.shares");
        // 40 GiB / 2 GiB = 20, 108 SMs / 8 = 13.5: the smaller.
        assert_eq!(accelerator.shares_of(&accelerator.devices[0]), Decimal::new(135, 1));
        let given = accelerator.container_devices(&held(&[("c59395cd-0001", "0.5")]));
        let lines: BTreeMap<String, String> = given.resource_data.into_iter().collect();
        assert_eq!(lines["CUDA_RESOURCE_VIRTUALIZED"], "1");
        assert_eq!(lines["CUDA_MEMORY_LIMITS"], "c59395cd-0001:1g");
        assert_eq!(lines["CUDA_PROCESSOR_LIMITS"], "c59395cd-0001:4");
        let attached = accelerator.attached_devices(&held(&[("c59395cd-0001", "2")]));
        assert_eq!((attached[0].memory_bytes, attached[0].processing_units), (4 << 30, 16));
    }

    #[test]
    fn amd_devices_get_their_render_node_and_kfd() {
        let device = |index: u32, minor: u32| AcceleratorDevice {
            id: index.to_string(),
            model: "AMD Instinct MI210".into(),
            numa_node: Some(0),
            memory_bytes: 64 << 30,
            processing_units: 104,
            host_node: Some(PathBuf::from(format!("/dev/dri/renderD{minor}"))),
            container_node: format!("/dev/dri/renderD{minor}"),
        };
        let accelerator = Accelerator::rocm(vec![device(0, 128), device(1, 129)], AcceleratorSettings::default());
        assert_eq!(accelerator.slot(), "rocm.device");
        let given = accelerator.container_devices(&held(&[("1", "1")]));
        let paths: Vec<&str> = given.nodes.iter().map(|node| node.container_path.as_str()).collect();
        assert_eq!(paths, vec!["/dev/kfd", "/dev/dri/renderD129"]);
        assert_eq!((given.env["HIP_VISIBLE_DEVICES"].as_str(), given.env["ROCR_VISIBLE_DEVICES"].as_str()), ("0", "0"));
        assert_eq!(given.env["GPU_TYPE"], "rocm");
        assert!(given.device_requests.is_empty() && given.resource_data.is_empty());
    }

    #[test]
    fn the_mask_keeps_devices_for_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mock.toml");
        std::fs::write(&path, SAMPLE).expect("write");
        let config = MockConfig::load(&path).expect("loads");
        let settings =
            AcceleratorSettings { device_mask: vec!["c59395cd-0001".into()], ..AcceleratorSettings::default() };
        let accelerator = Accelerator::mock(&config, settings, &dir.path().join("nodes")).expect("mock");
        assert_eq!(accelerator.devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), vec!["c59395cd-0002"]);
    }

    #[test]
    fn a_foreign_file_where_a_node_belongs_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("nvidia0"), "x").expect("write");
        let err = ensure_char_node(&dir.path().join("nvidia0"), 195, 0).expect_err("a plain file");
        assert!(err.contains("is not the character device 195:0"), "{err}");
    }
}
