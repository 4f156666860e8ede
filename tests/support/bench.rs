//! What every benchmark prints alike: percentiles of timed samples, units, and the machine
//! and load the numbers were taken on.

use std::{process::Command, time::Duration};

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub mean: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Summary {
    /// Nearest-rank percentiles of a non-empty sample.
    pub fn of(samples: &[Duration]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let rank = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Summary {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            mean: sorted.iter().sum::<Duration>() / sorted.len().max(1) as u32,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The 1-minute load average: other work on the machine shows here.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Kernel version, CPU model and count, and the Docker engine's and CLI's versions.
pub fn machine_description() -> anyhow::Result<String> {
    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let docker = Command::new("docker")
        .args(["version", "--format", "Docker Engine {{.Server.Version}}, CLI {{.Client.Version}}"])
        .output()?;
    Ok(format!("kernel {kernel}, {cpu}, {cpus} CPUs, {}", String::from_utf8_lossy(&docker.stdout).trim()))
}

/// A cgroup of the benchmark's own that counts the CPU time of the processes put in it,
/// to the nanosecond and across threads that come and go (`cpuacct.usage` on hybrid
/// hosts, `cpu.stat usage_usec` on pure v2 hosts). Removed when dropped.
pub struct CpuAccount {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
    v1: bool,
}

impl CpuAccount {
    pub fn create(name: &str) -> anyhow::Result<CpuAccount> {
        let layout = bai_agent::monitor::CgroupLayout::detect()?;
        let (root, v1) = match layout.v1_mounts.get("cpuacct") {
            Some(mount) => (mount.clone(), true),
            None => (layout.unified_root.clone(), false),
        };
        let dir = root.join(format!("bai-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(CpuAccount { dir, root, v1 })
    }

    /// Moves a process (every thread of it) into the cgroup.
    pub fn adopt(&self, pid: u32) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())?;
        Ok(())
    }

    /// CPU time of everything that ran in the cgroup since it was made.
    pub fn usage(&self) -> anyhow::Result<Duration> {
        if self.v1 {
            let ns: u64 = std::fs::read_to_string(self.dir.join("cpuacct.usage"))?.trim().parse()?;
            return Ok(Duration::from_nanos(ns));
        }
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat"))?;
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .ok_or_else(|| anyhow::anyhow!("no usage_usec in cpu.stat"))?
            .trim()
            .parse()?;
        Ok(Duration::from_micros(usec))
    }
}

impl Drop for CpuAccount {
    fn drop(&mut self) {
        // A cgroup can only go once it is empty: hand what is left back to the root.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// CPU time of every process whose command name is one of `names`: the scheduler's own
/// runtime of each of their threads (`/proc/<pid>/task/<tid>/schedstat`, nanoseconds), for
/// daemons such as dockerd that live through the measurement.
pub fn cpu_of_processes(names: &[&str]) -> Duration {
    let mut ns = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
        if !names.contains(&comm.trim()) {
            continue;
        }
        for task in std::fs::read_dir(entry.path().join("task")).into_iter().flatten().flatten() {
            let Ok(schedstat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
            ns += schedstat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB.
pub fn resident_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
