//! AMD GPUs through ROCm SMI: the driver stack's `librocm_smi64.so` is opened at run time, so
//! the agent runs where ROCm is absent (and says so once). Measured like NVML's devices and
//! listed for allocation (whole devices, their DRM render nodes).

use std::ffi::{c_char, c_int};

use super::{ComputeError, ComputePlugin, DeviceMeasure, DeviceReadings};

const PLUGIN: &str = "rocm";
/// `RSMI_MEM_TYPE_VRAM`.
const MEM_TYPE_VRAM: c_int = 0;
const LIBRARIES: [&str; 2] = ["librocm_smi64.so.1", "librocm_smi64.so"];

type InitFn = unsafe extern "C" fn(u64) -> c_int;
type CountFn = unsafe extern "C" fn(*mut u32) -> c_int;
type MemoryFn = unsafe extern "C" fn(u32, c_int, *mut u64) -> c_int;
type BusyFn = unsafe extern "C" fn(u32, *mut u32) -> c_int;
type NameFn = unsafe extern "C" fn(u32, *mut c_char, usize) -> c_int;
type U32Fn = unsafe extern "C" fn(u32, *mut u32) -> c_int;

/// ROCm SMI, loaded and initialised.
pub struct RocmSmi {
    /// Keeps the library mapped while the function pointers below are in use.
    _library: libloading::Library,
    count: CountFn,
    memory_total: MemoryFn,
    memory_usage: MemoryFn,
    busy_percent: BusyFn,
    name: NameFn,
    /// `rsmi_dev_drm_render_minor_get`, `rsmi_topo_get_numa_node_number` (optional).
    render_minor: Option<U32Fn>,
    numa_node: Option<U32Fn>,
}

impl RocmSmi {
    /// Opens ROCm SMI and initialises it; an error naming what is missing where it is absent.
    pub fn load() -> Result<RocmSmi, String> {
        let mut last = String::new();
        for name in LIBRARIES {
            // SAFETY: loading ROCm SMI runs its initialisers, which only set up its own state.
            match unsafe { libloading::Library::new(name) } {
                Ok(library) => return Self::bind(library),
                Err(err) => last = format!("{name}: {err}"),
            }
        }
        Err(last)
    }

    fn bind(library: libloading::Library) -> Result<RocmSmi, String> {
        // SAFETY: each symbol is looked up with the C signature ROCm SMI documents for it.
        unsafe {
            let symbol = |name: &str| format!("rocm_smi: {name} is missing");
            let init: InitFn = *library.get::<InitFn>(b"rsmi_init\0").map_err(|_| symbol("rsmi_init"))?;
            let count = *library
                .get::<CountFn>(b"rsmi_num_monitor_devices\0")
                .map_err(|_| symbol("rsmi_num_monitor_devices"))?;
            let memory_total = *library
                .get::<MemoryFn>(b"rsmi_dev_memory_total_get\0")
                .map_err(|_| symbol("rsmi_dev_memory_total_get"))?;
            let memory_usage = *library
                .get::<MemoryFn>(b"rsmi_dev_memory_usage_get\0")
                .map_err(|_| symbol("rsmi_dev_memory_usage_get"))?;
            let busy_percent = *library
                .get::<BusyFn>(b"rsmi_dev_busy_percent_get\0")
                .map_err(|_| symbol("rsmi_dev_busy_percent_get"))?;
            let name = *library.get::<NameFn>(b"rsmi_dev_name_get\0").map_err(|_| symbol("rsmi_dev_name_get"))?;
            let render_minor = library.get::<U32Fn>(b"rsmi_dev_drm_render_minor_get\0").ok().map(|f| *f);
            let numa_node = library.get::<U32Fn>(b"rsmi_topo_get_numa_node_number\0").ok().map(|f| *f);
            let status = init(0);
            if status != 0 {
                return Err(format!("rsmi_init failed with status {status}"));
            }
            Ok(RocmSmi {
                _library: library,
                count,
                memory_total,
                memory_usage,
                busy_percent,
                name,
                render_minor,
                numa_node,
            })
        }
    }

    pub fn device_count(&self) -> Result<u32, String> {
        let mut count = 0u32;
        // SAFETY: the pointer is to a live u32 the call writes once.
        let status = unsafe { (self.count)(&mut count) };
        if status == 0 { Ok(count) } else { Err(format!("rsmi_num_monitor_devices: status {status}")) }
    }

    /// Every device as allocation sees it: index as id, model, memory, NUMA node and DRM render
    /// node (`/dev/dri/renderD{minor}`, 128 + index where ROCm SMI does not say).
    pub fn inventory(&self) -> Result<Vec<super::AcceleratorDevice>, String> {
        let ask = |call: Option<U32Fn>, index: u32| {
            let mut value = 0u32;
            // SAFETY: the pointer is to a live u32 the call writes once.
            call.filter(|f| unsafe { f(index, &mut value) } == 0).map(|_| value)
        };
        (0..self.device_count()?)
            .map(|index| {
                let measured = self.read(index).map_err(|err| format!("device {index}: {err}"))?;
                let minor = ask(self.render_minor, index).unwrap_or(128 + index);
                let node = format!("/dev/dri/renderD{minor}");
                Ok(super::AcceleratorDevice {
                    id: measured.id,
                    model: measured.model,
                    numa_node: ask(self.numa_node, index),
                    memory_bytes: measured.mem_total_bytes,
                    processing_units: 0,
                    host_node: Some(std::path::PathBuf::from(&node)),
                    container_node: node,
                })
            })
            .collect()
    }

    fn read(&self, index: u32) -> Result<DeviceMeasure, String> {
        let (mut total, mut used, mut busy) = (0u64, 0u64, 0u32);
        let mut name = [0 as c_char; 128];
        // SAFETY: every pointer is to a live local the call writes within the given size.
        let statuses = unsafe {
            [
                (self.memory_total)(index, MEM_TYPE_VRAM, &mut total),
                (self.memory_usage)(index, MEM_TYPE_VRAM, &mut used),
                (self.busy_percent)(index, &mut busy),
                (self.name)(index, name.as_mut_ptr(), name.len()),
            ]
        };
        if let Some(status) = statuses[..3].iter().find(|status| **status != 0) {
            return Err(format!("status {status}"));
        }
        let model = if statuses[3] == 0 {
            // SAFETY: rsmi_dev_name_get wrote a NUL-terminated string within the buffer.
            unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned()
        } else {
            "AMD GPU".to_owned()
        };
        Ok(DeviceMeasure {
            id: index.to_string(),
            uuid: String::new(),
            model,
            mem_used_bytes: used,
            mem_total_bytes: total,
            utilization_pct: busy.min(100),
        })
    }
}

/// AMD devices as a compute plugin.
pub struct RocmPlugin(pub RocmSmi);

impl ComputePlugin for RocmPlugin {
    fn key(&self) -> &'static str {
        PLUGIN
    }

    fn measure(&mut self) -> Result<DeviceReadings, ComputeError> {
        let failed = |message: String| ComputeError::Device { plugin: PLUGIN, message };
        let count = self.0.device_count().map_err(failed)?;
        let devices = (0..count)
            .map(|index| self.0.read(index).map_err(|err| failed(format!("device {index}: {err}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceReadings { plugin: PLUGIN, devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_rocm_the_library_is_said_missing() {
        // This machine has no ROCm: loading fails with the library's name instead of crashing.
        if std::path::Path::new("/opt/rocm").exists() {
            return;
        }
        let err = RocmSmi::load().err().expect("no ROCm here");
        assert!(err.contains("librocm_smi64"), "{err}");
    }
}
