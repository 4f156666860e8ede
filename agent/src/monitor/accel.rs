//! Per-kernel accelerator use: the processes each compute plugin reports on its devices,
//! mapped to the kernel whose container cgroup holds them (`/proc/<pid>/cgroup`), summed per
//! kernel and device. A process outside every kernel's cgroup is counted nowhere.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    docker::KernelContainer,
    resources::compute::{ComputePlugin, ProcessUse},
};

/// One kernel's use of one device at one sample: the sum over its processes on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDeviceUse {
    pub kernel: Arc<KernelContainer>,
    /// The plugin's key (`cuda`).
    pub plugin: &'static str,
    pub device_id: String,
    pub mem_used_bytes: u64,
    /// The SM utilisation of its processes on the device, summed and capped at 100.
    pub utilization_pct: u32,
    /// How many of its processes use the device.
    pub processes: u32,
}

/// A running kernel container and its cgroup in the unified hierarchy (what the monitor
/// attached).
#[derive(Debug, Clone)]
pub struct KernelCgroup {
    pub kernel: Arc<KernelContainer>,
    pub path: PathBuf,
}

/// Finds the kernel of a process through its cgroup: its `0::` entry relative to the unified
/// root, that cgroup or its nearest ancestor that is a kernel's container cgroup.
#[derive(Debug, Default)]
pub struct CgroupIndex {
    /// Path relative to the unified root (`/system.slice/docker-….scope`) → kernel index.
    by_path: HashMap<String, usize>,
}

impl CgroupIndex {
    /// Indexes `kernels` by their cgroups under `unified_root`; a path outside it is left out.
    pub fn new(unified_root: &Path, kernels: &[KernelCgroup]) -> CgroupIndex {
        let by_path = kernels
            .iter()
            .enumerate()
            .filter_map(|(index, kernel)| {
                let relative = kernel.path.strip_prefix(unified_root).ok()?;
                Some((format!("/{}", relative.to_string_lossy().trim_end_matches('/')), index))
            })
            .collect();
        CgroupIndex { by_path }
    }

    /// The kernel whose cgroup holds the process whose `/proc/<pid>/cgroup` text this is.
    pub fn kernel_of(&self, proc_cgroup: &str) -> Option<usize> {
        let mut path = super::cgroup::unified_entry(proc_cgroup)?.trim_end();
        loop {
            if let Some(index) = self.by_path.get(path) {
                return Some(*index);
            }
            // A cgroup nested inside a kernel's counts for that kernel.
            match path.rfind('/') {
                Some(0) | None => return None,
                Some(at) => path = &path[..at],
            }
        }
    }
}

/// Sums each plugin's process uses per (kernel, device); `kernel_of` names the kernel (an
/// index into `kernels`) of a pid, or none. Sorted by kernel id, plugin and device.
pub fn attribute(
    uses: &[(&'static str, Vec<ProcessUse>)],
    kernels: &[KernelCgroup],
    mut kernel_of: impl FnMut(u32) -> Option<usize>,
) -> Vec<KernelDeviceUse> {
    let mut pids: HashMap<u32, Option<usize>> = HashMap::new();
    // (kernel id, plugin, device) → (kernel index, memory, utilisation, processes).
    type Sum = (usize, u64, u64, u32);
    let mut sums: BTreeMap<(&str, &'static str, &str), Sum> = BTreeMap::new();
    for (plugin, processes) in uses {
        for process in processes {
            let found = *pids.entry(process.pid).or_insert_with(|| kernel_of(process.pid));
            let Some(index) = found else { continue };
            let Some(kernel) = kernels.get(index) else { continue };
            let sum = sums
                .entry((kernel.kernel.kernel_id.as_str(), plugin, process.device_id.as_str()))
                .or_insert((index, 0, 0, 0));
            sum.1 = sum.1.saturating_add(process.mem_used_bytes);
            sum.2 = sum.2.saturating_add(u64::from(process.sm_util_pct.min(100)));
            sum.3 += 1;
        }
    }
    sums.into_iter()
        .map(|((_, plugin, device_id), (index, mem, util, processes))| KernelDeviceUse {
            kernel: kernels[index].kernel.clone(),
            plugin,
            device_id: device_id.to_owned(),
            mem_used_bytes: mem,
            utilization_pct: u32::try_from(util.min(100)).unwrap_or(100),
            processes,
        })
        .collect()
}

/// The processes of a cgroup (its `cgroup.procs`; nested cgroups are not walked). An
/// unreadable file (the container exiting) gives none.
pub fn cgroup_pids(path: &Path, buf: &mut Vec<u8>, out: &mut Vec<u32>) {
    buf.clear();
    let Ok(mut file) = std::fs::File::open(path.join("cgroup.procs")) else { return };
    if std::io::Read::read_to_end(&mut file, buf).is_err() {
        return;
    }
    out.extend(
        buf.split(|b| *b == b'\n').filter_map(|line| std::str::from_utf8(line).ok()?.trim().parse::<u32>().ok()),
    );
}

/// Reads `/proc/<pid>/cgroup` into `buf`; None when the process is gone.
fn read_proc_cgroup(pid: u32, buf: &mut Vec<u8>) -> Option<&str> {
    buf.clear();
    let mut file = std::fs::File::open(format!("/proc/{pid}/cgroup")).ok()?;
    std::io::Read::read_to_end(&mut file, buf).ok()?;
    std::str::from_utf8(buf).ok()
}

/// One pass of per-kernel accelerator accounting: every plugin's processes (the mock's among
/// the kernels' processes), each mapped to its kernel. A plugin that fails is left out of this
/// sample, with a warning.
pub fn sample(
    plugins: &mut [Box<dyn ComputePlugin>],
    unified_root: &Path,
    kernels: &[KernelCgroup],
    buf: &mut Vec<u8>,
) -> Vec<KernelDeviceUse> {
    if plugins.is_empty() || kernels.is_empty() {
        return Vec::new();
    }
    // The kernels' processes, for a plugin that wants them; their kernel is then known (they
    // were listed in its cgroup), so only the other pids are looked up in /proc/<pid>/cgroup.
    let mut candidates = Vec::new();
    let mut listed: HashMap<u32, usize> = HashMap::new();
    if plugins.iter().any(|plugin| plugin.wants_candidates()) {
        for (index, kernel) in kernels.iter().enumerate() {
            let from = candidates.len();
            cgroup_pids(&kernel.path, buf, &mut candidates);
            listed.extend(candidates[from..].iter().map(|pid| (*pid, index)));
        }
    }
    let mut uses = Vec::with_capacity(plugins.len());
    for plugin in plugins.iter_mut() {
        let given: &[u32] = if plugin.wants_candidates() { &candidates } else { &[] };
        match plugin.processes(given) {
            Ok(processes) => uses.push((plugin.key(), processes)),
            Err(err) => {
                tracing::warn!(plugin = plugin.key(), error = %err, "reading the processes on accelerators failed")
            }
        }
    }
    let index = CgroupIndex::new(unified_root, kernels);
    attribute(&uses, kernels, |pid| match listed.get(&pid) {
        Some(index) => Some(*index),
        None => index.kernel_of(read_proc_cgroup(pid, buf)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::test_support::kernel;

    fn kernels() -> Vec<KernelCgroup> {
        vec![
            KernelCgroup { kernel: kernel("a"), path: "/sys/fs/cgroup/unified/bai-kernels/i-x/a".into() },
            KernelCgroup { kernel: kernel("b"), path: "/sys/fs/cgroup/unified/bai-kernels/i-x/b/".into() },
        ]
    }

    fn process(pid: u32, device: &str, mem: u64, util: u32) -> ProcessUse {
        ProcessUse { pid, device_id: device.into(), mem_used_bytes: mem, sm_util_pct: util }
    }

    #[test]
    fn a_process_belongs_to_the_kernel_whose_cgroup_holds_it() {
        let index = CgroupIndex::new(Path::new("/sys/fs/cgroup/unified"), &kernels());
        assert_eq!(index.kernel_of("9:name=systemd:/x\n0::/bai-kernels/i-x/a\n"), Some(0));
        assert_eq!(index.kernel_of("0::/bai-kernels/i-x/b\n"), Some(1));
        // Nested inside a kernel's cgroup: that kernel's.
        assert_eq!(index.kernel_of("0::/bai-kernels/i-x/b/inner/deeper\n"), Some(1));
        // Neither the parent nor a sibling with a common prefix, nor the root.
        assert_eq!(index.kernel_of("0::/bai-kernels/i-x\n"), None);
        assert_eq!(index.kernel_of("0::/bai-kernels/i-x/ab\n"), None);
        assert_eq!(index.kernel_of("0::/\n"), None);
        assert_eq!(index.kernel_of("4:memory:/bai-kernels/i-x/a\n"), None, "no unified entry");
    }

    #[test]
    fn uses_are_summed_per_kernel_and_device_and_outsiders_count_nowhere() {
        let uses = vec![(
            "cuda",
            vec![
                process(10, "0", 100, 60),
                process(11, "0", 50, 70),
                process(10, "1", 7, 5),
                process(20, "0", 1, 30),
                process(99, "0", 1000, 100),
            ],
        )];
        let owner = |pid: u32| match pid {
            10 | 11 => Some(0),
            20 => Some(1),
            _ => None,
        };
        let mut asked = Vec::new();
        let result = attribute(&uses, &kernels(), |pid| {
            asked.push(pid);
            owner(pid)
        });
        let summary: Vec<_> = result
            .iter()
            .map(|u| {
                (u.kernel.kernel_id.as_str(), u.device_id.as_str(), u.mem_used_bytes, u.utilization_pct, u.processes)
            })
            .collect();
        assert_eq!(summary, [("k-a", "0", 150, 100, 2), ("k-a", "1", 7, 5, 1), ("k-b", "0", 1, 30, 1)]);
        asked.sort();
        assert_eq!(asked, [10, 11, 20, 99], "each pid resolved once");
    }

    #[test]
    fn this_process_maps_through_its_real_cgroup_file() {
        let Ok(layout) = super::super::CgroupLayout::detect() else { return };
        let Ok(own) = layout.cgroup_of_pid(std::process::id()) else { return };
        let kernels = vec![KernelCgroup { kernel: kernel("self"), path: own.path }];
        let mut buf = Vec::new();
        let uses = vec![("cuda", vec![process(std::process::id(), "0", 1, 1)])];
        let index = CgroupIndex::new(&layout.unified_root, &kernels);
        let result = attribute(&uses, &kernels, |pid| index.kernel_of(read_proc_cgroup(pid, &mut buf)?));
        assert_eq!(result.len(), 1);
        assert_eq!(result[0].kernel.kernel_id, "k-self");
    }
}
