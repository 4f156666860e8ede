//! Node capacity: the host's online CPU cores and memory, minus what is reserved for the
//! host, times the overcommit factors.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
};

use rust_decimal::{Decimal, prelude::ToPrimitive};

use super::slots::{ResourceSlots, SlotAmount, format_binary_size};

pub const CPU_ONLINE_PATH: &str = "/sys/devices/system/cpu/online";
pub const MEMINFO_PATH: &str = "/proc/meminfo";

/// Why the node's capacity could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {text:?} is not a CPU list (expected e.g. \"0-3,5\")")]
    BadCpuList { path: PathBuf, text: String },
    #[error("{path}: no `MemTotal: <n> kB` line")]
    NoMemTotal { path: PathBuf },
    #[error("resource.reserved-cpu = {reserved} leaves none of the {online} online cores for kernels")]
    NoCoresLeft { reserved: u32, online: usize },
    #[error(
        "resource.reserved-mem = {reserved} bytes ({}) is not less than the host's {total} bytes ({})",
        format_binary_size(*reserved),
        format_binary_size(*total)
    )]
    NoMemoryLeft { reserved: u64, total: u64 },
    #[error("resource.{key} = {value} is not an overcommit factor (a finite number >= 1.0)")]
    BadOvercommit { key: &'static str, value: f64 },
}

/// What the host has, before reservation and overcommit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostResources {
    /// Online CPU ids, ascending.
    pub online_cpus: Vec<u32>,
    /// `MemTotal`, in bytes.
    pub mem_total_bytes: u64,
}

impl HostResources {
    /// Reads `/sys/devices/system/cpu/online` and `/proc/meminfo`.
    pub fn detect() -> Result<HostResources, CapacityError> {
        Self::from_files(Path::new(CPU_ONLINE_PATH), Path::new(MEMINFO_PATH))
    }

    pub fn from_files(cpu_online: &Path, meminfo: &Path) -> Result<HostResources, CapacityError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CapacityError::Read { path: path.to_path_buf(), source })
        };
        let cpus = read(cpu_online)?;
        let online_cpus = parse_cpu_list(&cpus).ok_or_else(|| CapacityError::BadCpuList {
            path: cpu_online.to_path_buf(),
            text: cpus.trim().to_string(),
        })?;
        let mem_total_bytes = parse_mem_total(&read(meminfo)?)
            .ok_or_else(|| CapacityError::NoMemTotal { path: meminfo.to_path_buf() })?;
        Ok(HostResources { online_cpus, mem_total_bytes })
    }
}

/// Core → NUMA node from `/sys/devices/system/node/node*/cpulist` (`root` is that directory).
/// Empty when the host does not say or has one node: then no device is nearer than another.
pub fn numa_nodes_of_cores(root: &Path) -> std::collections::BTreeMap<u32, u32> {
    let mut map = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root) else { return map };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(node) = name.to_str().and_then(|name| name.strip_prefix("node")).and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("cpulist")) else { continue };
        for core in parse_cpu_list(&text).unwrap_or_default() {
            map.insert(core, node);
        }
    }
    if map.values().collect::<std::collections::BTreeSet<_>>().len() < 2 {
        map.clear();
    }
    map
}

/// Parses the kernel's CPU list format (`0-3,5,7-8`) into ascending, distinct ids.
/// `None` when the text is not such a list or names no CPU.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (low.trim().parse::<u32>().ok()?, high.trim().parse::<u32>().ok()?);
                if low > high {
                    return None;
                }
                cpus.extend(low..=high);
            }
            None => cpus.push(part.parse::<u32>().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() { None } else { Some(cpus) }
}

/// `MemTotal` from `/proc/meminfo` text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|line| line.strip_prefix("MemTotal:"))?;
    let mut words = line.split_whitespace();
    let kib = words.next()?.parse::<u64>().ok()?;
    match words.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

/// The `[resource]` settings that shape capacity (see `config::ResourceSection`).
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityPolicy {
    /// Cores kept for the host; `None` means 1 when the host has more than one core, else 0.
    pub reserved_cpu: Option<u32>,
    /// Bytes kept for the host.
    pub reserved_mem: u64,
    /// Up to `ceil(factor)` kernels may share a core; the node offers `floor(cores × factor)` cpu.
    pub cpu_overcommit: f64,
    /// The node offers `floor((MemTotal − reserved) × factor)` bytes.
    pub mem_overcommit: f64,
}

impl Default for CapacityPolicy {
    fn default() -> Self {
        Self { reserved_cpu: None, reserved_mem: 1 << 30, cpu_overcommit: 1.0, mem_overcommit: 1.0 }
    }
}

/// What kernels on this node may be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    /// Cores kernels may be pinned to, ascending (the lowest-numbered cores are the reserved ones).
    pub cores: Vec<u32>,
    /// How many kernels may be pinned to one core (`ceil(cpu-overcommit)`, at least 1).
    pub kernels_per_core: u32,
    /// The `cpu` slot capacity: `floor(cores × cpu-overcommit)`.
    pub cpu: u32,
    /// The `mem` slot capacity, in bytes.
    pub mem_bytes: u64,
    /// Other slots (accelerators) as plain amounts, filled in by compute plugins.
    pub extra: ResourceSlots,
}

impl NodeCapacity {
    /// Capacity with no overcommit: every core once, `mem_bytes` as given.
    pub fn fixed(cores: Vec<u32>, mem_bytes: u64) -> NodeCapacity {
        let mut cores = cores;
        cores.sort_unstable();
        cores.dedup();
        let cpu = u32::try_from(cores.len()).unwrap_or(u32::MAX);
        NodeCapacity { cores, kernels_per_core: 1, cpu, mem_bytes, extra: ResourceSlots::new() }
    }

    /// Applies reservation and overcommit to what the host has.
    pub fn compute(host: &HostResources, policy: &CapacityPolicy) -> Result<NodeCapacity, CapacityError> {
        let cpu_factor = factor(policy.cpu_overcommit, "cpu-overcommit")?;
        let mem_factor = factor(policy.mem_overcommit, "mem-overcommit")?;
        let online = host.online_cpus.len();
        let reserved_cpu = policy.reserved_cpu.unwrap_or(if online > 1 { 1 } else { 0 });
        let reserved_count = usize::try_from(reserved_cpu).unwrap_or(usize::MAX);
        if reserved_count >= online {
            return Err(CapacityError::NoCoresLeft { reserved: reserved_cpu, online });
        }
        let mut cores = host.online_cpus.clone();
        cores.sort_unstable();
        cores.dedup();
        let cores: Vec<u32> = cores.into_iter().skip(reserved_count).collect();
        let kernels_per_core = cpu_factor.ceil().to_u32().unwrap_or(u32::MAX).max(1);
        let cpu = (Decimal::from(cores.len()) * cpu_factor).floor().to_u32().unwrap_or(u32::MAX);

        if policy.reserved_mem >= host.mem_total_bytes {
            return Err(CapacityError::NoMemoryLeft { reserved: policy.reserved_mem, total: host.mem_total_bytes });
        }
        let usable = host.mem_total_bytes - policy.reserved_mem;
        let mem_bytes = Decimal::from(usable)
            .checked_mul(mem_factor)
            .map(|bytes| bytes.floor().to_u64().unwrap_or(u64::MAX))
            .unwrap_or(u64::MAX);
        Ok(NodeCapacity { cores, kernels_per_core, cpu, mem_bytes, extra: ResourceSlots::new() })
    }

    /// Adds an accelerator slot's capacity (`cuda.device` = 4).
    pub fn with_slot(mut self, slot: &str, amount: SlotAmount) -> NodeCapacity {
        self.extra.insert(slot, amount);
        self
    }

    /// The node's slots, as the heartbeat's `available_resource_slots` reports them.
    pub fn slots(&self) -> ResourceSlots {
        let mut slots = self.extra.clone();
        slots.insert("cpu", SlotAmount::from(self.cpu));
        slots.insert("mem", SlotAmount::from_u64(self.mem_bytes));
        slots
    }
}

/// An overcommit factor as an exact decimal of the number the operator wrote.
fn factor(value: f64, key: &'static str) -> Result<Decimal, CapacityError> {
    let bad = || CapacityError::BadOvercommit { key, value };
    if !value.is_finite() || value < 1.0 {
        return Err(bad());
    }
    Decimal::from_str(&value.to_string()).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_nodes_come_from_each_nodes_cpulist() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (node, list) in [("node0", "0-1\n"), ("node1", "2,3\n")] {
            std::fs::create_dir(dir.path().join(node)).expect("mkdir");
            std::fs::write(dir.path().join(node).join("cpulist"), list).expect("write");
        }
        std::fs::create_dir(dir.path().join("power")).expect("mkdir");
        let map = numa_nodes_of_cores(dir.path());
        assert_eq!(map.into_iter().collect::<Vec<_>>(), vec![(0, 0), (1, 0), (2, 1), (3, 1)]);
        std::fs::remove_dir_all(dir.path().join("node1")).expect("rm");
        assert!(numa_nodes_of_cores(dir.path()).is_empty(), "one node: no preference");
    }

    const GIB: u64 = 1 << 30;

    fn host(cpus: &[u32], mem: u64) -> HostResources {
        HostResources { online_cpus: cpus.to_vec(), mem_total_bytes: mem }
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-3,5,7-8"), Some(vec![0, 1, 2, 3, 5, 7, 8]));
        assert_eq!(parse_cpu_list("4"), Some(vec![4]));
        for bad in ["", "a", "3-1", "0-", "1,,2"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mem_total_parses() {
        let meminfo = "MemTotal:       24591004 kB\nMemFree:        1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24591004 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn detect_reads_this_host() {
        let host = HostResources::detect().expect("Linux exposes both files");
        assert!(!host.online_cpus.is_empty());
        assert!(host.mem_total_bytes > 0);
    }

    #[test]
    fn unreadable_or_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpus = dir.path().join("online");
        let meminfo = dir.path().join("meminfo");
        let err = HostResources::from_files(&cpus, &meminfo).expect_err("missing");
        assert!(err.to_string().contains("online"), "{err}");
        std::fs::write(&cpus, "zero\n").expect("write");
        let err = HostResources::from_files(&cpus, &meminfo).expect_err("bad list");
        assert!(matches!(err, CapacityError::BadCpuList { .. }), "{err}");
        std::fs::write(&cpus, "0-1\n").expect("write");
        std::fs::write(&meminfo, "MemFree: 1 kB\n").expect("write");
        let err = HostResources::from_files(&cpus, &meminfo).expect_err("no MemTotal");
        assert!(err.to_string().contains("MemTotal"), "{err}");
        std::fs::write(&meminfo, "MemTotal: 2048 kB\n").expect("write");
        let host = HostResources::from_files(&cpus, &meminfo).expect("valid");
        assert_eq!(host, HostResources { online_cpus: vec![0, 1], mem_total_bytes: 2048 * 1024 });
    }

    #[test]
    fn reservation_takes_the_lowest_cores_and_some_memory() {
        let capacity = NodeCapacity::compute(&host(&[0, 1, 2, 3], 8 * GIB), &CapacityPolicy::default()).expect("ok");
        assert_eq!(capacity.cores, vec![1, 2, 3], "one core reserved by default on a multi-core host");
        assert_eq!(capacity.cpu, 3);
        assert_eq!(capacity.kernels_per_core, 1);
        assert_eq!(capacity.mem_bytes, 7 * GIB);
        let single = NodeCapacity::compute(&host(&[0], 2 * GIB), &CapacityPolicy::default()).expect("ok");
        assert_eq!(single.cores, vec![0], "a single-core host reserves none by default");
        let policy = CapacityPolicy { reserved_cpu: Some(0), reserved_mem: 0, ..CapacityPolicy::default() };
        let all = NodeCapacity::compute(&host(&[0, 1], GIB), &policy).expect("ok");
        assert_eq!((all.cores.clone(), all.mem_bytes), (vec![0, 1], GIB));
        let slots = all.slots();
        assert_eq!(slots.amount("cpu"), SlotAmount::from_u64(2));
        assert_eq!(slots.amount("mem"), SlotAmount::from_u64(GIB));
    }

    #[test]
    fn overcommit_multiplies() {
        let policy =
            CapacityPolicy { reserved_cpu: Some(0), reserved_mem: 0, cpu_overcommit: 1.5, mem_overcommit: 2.0 };
        let capacity = NodeCapacity::compute(&host(&[0, 1], 4 * GIB), &policy).expect("ok");
        assert_eq!(capacity.cpu, 3);
        assert_eq!(capacity.kernels_per_core, 2);
        assert_eq!(capacity.mem_bytes, 8 * GIB);
        let policy = CapacityPolicy { cpu_overcommit: 1.4, ..policy };
        let capacity = NodeCapacity::compute(&host(&[0, 1, 2, 3, 4], 4 * GIB), &policy).expect("ok");
        assert_eq!(capacity.cpu, 7, "5 × 1.4 is exactly 7");
    }

    #[test]
    fn impossible_policies_are_refused() {
        let policy = CapacityPolicy { reserved_cpu: Some(2), ..CapacityPolicy::default() };
        let err = NodeCapacity::compute(&host(&[0, 1], 4 * GIB), &policy).expect_err("no cores left");
        assert_eq!(err.to_string(), "resource.reserved-cpu = 2 leaves none of the 2 online cores for kernels");
        let policy = CapacityPolicy { reserved_mem: 4 * GIB, ..CapacityPolicy::default() };
        let err = NodeCapacity::compute(&host(&[0, 1], 4 * GIB), &policy).expect_err("no memory left");
        assert!(err.to_string().contains("resource.reserved-mem"), "{err}");
        assert!(err.to_string().contains("(4g)"), "{err}");
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            let policy = CapacityPolicy { cpu_overcommit: bad, ..CapacityPolicy::default() };
            let err = NodeCapacity::compute(&host(&[0, 1], 4 * GIB), &policy).expect_err("bad factor");
            assert!(err.to_string().contains("resource.cpu-overcommit"), "{err}");
        }
    }
}
