//! `bench-gpu`: what per-kernel GPU accounting costs per sample (`monitor::accel::sample`):
//! N kernel cgroups of M real processes each, with the mock plugin (each process's
//! `/proc/<pid>/environ` read, the claimed ones mapped to kernels through `/proc/<pid>/cgroup`)
//! and with a stand-in for NVML that names every process (only the mapping), beside a scan of
//! every process of the host (the alternative the mock does not take). No Docker, no agent.
//!
//! `bench-gpu [KERNELS] [PROCESSES_PER_KERNEL] [ROUNDS]` (default 100 10 200). Runs as root
//! (it makes cgroups under the unified hierarchy).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Instant,
};

use bai_agent::{
    docker::KernelContainer,
    monitor::{
        CgroupLayout,
        accel::{self, KernelCgroup},
    },
    resources::compute::{
        ComputeError, ComputePlugin, DeviceReadings, ProcessUse,
        mock::{MockConfig, MockPlugin},
    },
};
use bai_agent_tests::bench::{Summary, load_average, machine_description, us};

const DEVICE: &str = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d01";

fn arg(n: usize, default: usize) -> anyhow::Result<usize> {
    match std::env::args().nth(n) {
        Some(text) => Ok(text.parse()?),
        None => Ok(default),
    }
}

/// What NVML would report: every one of these processes on device 0 (the mapping's cost only).
struct EveryProcess(Vec<u32>);

impl ComputePlugin for EveryProcess {
    fn key(&self) -> &'static str {
        "cuda"
    }

    fn measure(&mut self) -> Result<DeviceReadings, ComputeError> {
        Ok(DeviceReadings { plugin: "cuda", devices: Vec::new() })
    }

    fn processes(&mut self, _candidates: &[u32]) -> Result<Vec<ProcessUse>, ComputeError> {
        Ok(self
            .0
            .iter()
            .map(|pid| ProcessUse { pid: *pid, device_id: "0".into(), mem_used_bytes: 1 << 30, sm_util_pct: 50 })
            .collect())
    }
}

/// The cgroups and processes, removed when dropped.
struct Fixture {
    root: PathBuf,
    children: Vec<Child>,
    cgroups: Vec<PathBuf>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for cgroup in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(cgroup);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn time(rounds: usize, mut pass: impl FnMut() -> usize) -> (Summary, usize) {
    let mut samples = Vec::with_capacity(rounds);
    let mut found = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        found = pass();
        samples.push(started.elapsed());
    }
    (Summary::of(&samples), found)
}

fn report(what: &str, summary: &Summary, processes: usize, found: usize) {
    println!(
        "{what:<58} p50 {:>9.1} µs  p90 {:>9.1} µs  p99 {:>9.1} µs  mean {:>9.1} µs  ({:.2} µs per process; {found} kernel-device uses)",
        us(summary.p50),
        us(summary.p90),
        us(summary.p99),
        us(summary.mean),
        us(summary.mean) / processes.max(1) as f64,
    );
}

fn main() -> anyhow::Result<()> {
    let kernels = arg(1, 100)?;
    let per_kernel = arg(2, 10)?;
    let rounds = arg(3, 200)?.max(1);
    let layout = CgroupLayout::detect()?;
    let root = layout.unified_root.join(format!("bai-bench-gpu-{}", std::process::id()));
    std::fs::create_dir(&root)?;
    let mut fixture = Fixture { root: root.clone(), children: Vec::new(), cgroups: Vec::new() };
    let mut cgroups = Vec::new();
    for k in 0..kernels {
        let dir = root.join(format!("k{k}"));
        std::fs::create_dir(&dir)?;
        fixture.cgroups.push(dir.clone());
        for p in 0..per_kernel {
            let mut command = Command::new("sleep");
            command.arg("3600").stdin(Stdio::null()).env("BACKENDAI_MOCK_CUDA_DEVICES", DEVICE);
            // Every other process claims a load (the rest are a kernel's shells and runners).
            if p % 2 == 0 {
                command.env("BAI_MOCK_GPU_UTIL", "30").env("BAI_MOCK_GPU_MEM", "1073741824");
            }
            let child = command.spawn()?;
            std::fs::write(dir.join("cgroup.procs"), child.id().to_string())?;
            fixture.children.push(child);
        }
        let kernel = KernelContainer {
            container_id: format!("container-{k}"),
            kernel_id: format!("kernel-{k:08}"),
            session_id: format!("session-{k}"),
            owner_user_id: "user".into(),
            owner_project_id: "project".into(),
            image: "cr.backend.ai/stable/python:3.12".into(),
            pid: 0,
            accelerator_devices: Vec::new(),
        };
        cgroups.push(KernelCgroup { kernel: Arc::new(kernel), path: dir });
    }
    let processes = kernels * per_kernel;
    let config_dir = tempfile::tempdir()?;
    let config = config_dir.path().join("mock-accelerator.toml");
    std::fs::write(
        &config,
        format!(
            "slot_name = \"cuda\"\ndevice_plugin_name = \"CUDADevice\"\ndevices = [\n  {{ mother_uuid = \"{DEVICE}\", \
             model_name = \"CUDA GPU\", numa_node = 0, subproc_count = 108, memory_size = \"40G\", is_mig_device = false }},\n]\n"
        ),
    )?;
    let host_processes = std::fs::read_dir("/proc")?
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok()))
        .count();
    println!("bench-gpu: {kernels} kernels × {per_kernel} processes ({processes}), {rounds} rounds");
    println!("{}", machine_description()?);
    println!("host processes: {host_processes}; load average: {}", load_average());

    let mut buf = Vec::with_capacity(8192);
    let mut plugins: Vec<Box<dyn ComputePlugin>> = vec![Box::new(MockPlugin::new(MockConfig::load(&config)?))];
    let (mock, found) = time(rounds, || accel::sample(&mut plugins, &layout.unified_root, &cgroups, &mut buf).len());
    anyhow::ensure!(found == kernels, "every kernel uses the device: {found}");
    report("mock: cgroup.procs + environ of every kernel process + map", &mock, processes, found);

    let pids: Vec<u32> = fixture.children.iter().map(Child::id).collect();
    let mut plugins: Vec<Box<dyn ComputePlugin>> = vec![Box::new(EveryProcess(pids))];
    let (nvml, found) = time(rounds, || accel::sample(&mut plugins, &layout.unified_root, &cgroups, &mut buf).len());
    report("NVML stand-in: every process on a device, mapped", &nvml, processes, found);

    // The alternative: every process of the host, its environment read (what a mock that does
    // not know the kernels' cgroups would do).
    let (scan, found) = time(rounds.min(50), || {
        let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
        let mut claimed = 0;
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Ok(environ) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ"))
                && bai_agent::resources::compute::mock::synthetic_load(&environ, "BACKENDAI_MOCK_CUDA_DEVICES")
                    .is_some()
            {
                claimed += 1;
            }
        }
        claimed
    });
    report("alternative: scan every host process's environ (no mapping)", &scan, host_processes, found);
    drop(fixture);
    Ok(())
}
