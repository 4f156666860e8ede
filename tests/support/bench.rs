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
