//! The start-up check that the eBPF CPU program counts exactly on this kernel: a short
//! workload of the shapes that are hard to count (short-lived threads, fork+exec of processes
//! that exit at once) runs in a cgroup of the agent's own, and the program's count is compared
//! with the kernel's own accounting of that cgroup (`cpu.stat usage_usec`). A kernel whose
//! scheduler charges CPU time where the program does not see it fails the check, and the agent
//! counts CPU time from the cgroup files instead: never silently less than the kernel.
//!
//! The workload is the agent's own executable, started with [`CHECK_ENV`] set; `bai-agent`'s
//! `main` hands such a process to [`run_workload_if_asked`] before anything else.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{CgroupLayout, EbpfMonitor, files::read_cpu_total};
use crate::monitor::cgroup::{CgroupMode, ContainerCgroups};

/// Set in the environment of the check's workload: `work` runs it, `exit` exits at once (the
/// processes the workload forks and executes).
pub const CHECK_ENV: &str = "BAI_AGENT_CPU_CHECK";
/// Short-lived threads the workload starts and joins.
const THREADS: usize = 200;
/// Processes it forks and executes (each exits at once).
const PROCESSES: usize = 20;
/// What the check may differ by: 0.5 %, plus the microsecond `cpu.stat` truncates to.
const TOLERANCE: f64 = 0.005;
const TRUNCATION_NS: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot create the check's cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("cannot find the agent's own executable for the check's workload: {0}")]
    Executable(std::io::Error),
    #[error("the check's workload failed: {0}")]
    Workload(String),
    #[error("counting the check's cgroup: {0}")]
    Ebpf(#[from] super::EbpfError),
    #[error("reading the check's cgroup files: {0}")]
    Files(std::io::Error),
}

/// What the CPU program and the kernel counted for the check's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCheck {
    pub counted_ns: u64,
    pub kernel_ns: u64,
}

impl CpuCheck {
    /// |counted − kernel| / kernel.
    pub fn error(&self) -> f64 {
        if self.kernel_ns == 0 {
            return 0.0;
        }
        self.counted_ns.abs_diff(self.kernel_ns) as f64 / self.kernel_ns as f64
    }

    /// Whether the program agreed with the kernel, within the tolerance.
    pub fn exact(&self) -> bool {
        let slack = (self.kernel_ns as f64 * TOLERANCE) as u64 + TRUNCATION_NS;
        self.kernel_ns > 0 && self.counted_ns.abs_diff(self.kernel_ns) <= slack
    }
}

/// In a process started as the check's workload, runs it and returns true (the caller then
/// exits); in any other process returns false at once.
pub fn run_workload_if_asked() -> bool {
    match std::env::var(CHECK_ENV).as_deref() {
        Ok("work") => {
            workload();
            true
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Threads that live a few microseconds, and processes that exit as soon as they exec.
fn workload() {
    for i in 0..THREADS {
        let spun = std::thread::spawn(move || (0..20_000u64).fold(i as u64, |a, b| a.wrapping_mul(31).wrapping_add(b)));
        let _ = std::hint::black_box(spun.join());
    }
    if let Ok(exe) = std::env::current_exe() {
        for _ in 0..PROCESSES {
            let _ = Command::new(&exe).env(CHECK_ENV, "exit").status();
        }
    }
}

/// A cgroup of the check's own in the unified hierarchy, removed when dropped.
struct CheckCgroup {
    path: PathBuf,
}

impl Drop for CheckCgroup {
    fn drop(&mut self) {
        // The workload's tasks are reaped, but the kernel may take a moment to let go of them.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir(&self.path).is_err() && self.path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs the workload in a fresh cgroup counted by `ebpf` and compares the count with the
/// kernel's accounting of that cgroup.
pub fn check_cpu(ebpf: &mut EbpfMonitor, layout: &CgroupLayout) -> Result<CpuCheck, CheckError> {
    let exe = std::env::current_exe().map_err(CheckError::Executable)?;
    let path = layout.unified_root.join(format!("bai-agent-cpu-check-{}", std::process::id()));
    std::fs::create_dir_all(&path).map_err(|source| CheckError::Cgroup { path: path.clone(), source })?;
    let cgroup = CheckCgroup { path };
    let relative = cgroup.path.strip_prefix(&layout.unified_root).unwrap_or(&cgroup.path).to_string_lossy();
    let unified = layout
        .cgroup_at(&relative)
        .map_err(|err| CheckError::Cgroup { path: cgroup.path.clone(), source: std::io::Error::other(err) })?;
    let id = unified.id;
    ebpf.attach(id, &cgroup.path)?;
    let ran = run_in(&exe, &cgroup.path);
    let counted = ebpf.detach(id)?;
    ran?;
    let files = ContainerCgroups { mode: CgroupMode::Unified, unified, v1: Default::default() };
    let kernel_ns = read_cpu_total(&files, &mut Vec::new()).map_err(CheckError::Files)?;
    Ok(CpuCheck { counted_ns: counted.cpu_ns, kernel_ns })
}

/// Runs the workload (the agent's executable) in `cgroup`, from its first instruction on.
fn run_in(exe: &Path, cgroup: &Path) -> Result<(), CheckError> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|err| CheckError::Workload(err.to_string()))?;
    let mut command = Command::new(exe);
    command.env(CHECK_ENV, "work").stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec the closure only calls open, write and close (all
    // async-signal-safe) on a path prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = command.status().map_err(|err| CheckError::Workload(format!("{}: {err}", exe.display())))?;
    if !status.success() {
        return Err(CheckError::Workload(format!("{} exited with {status}", exe.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_means_within_half_a_percent_and_the_truncated_microsecond() {
        let check = |counted_ns, kernel_ns| CpuCheck { counted_ns, kernel_ns };
        assert!(check(100_000_000, 100_000_000).exact());
        assert!(check(100_400_000, 100_000_000).exact());
        assert!(check(1_000_900, 1_000_000).exact(), "the truncated microsecond");
        assert!(!check(99_000_000, 100_000_000).exact());
        assert!(!check(26_000_000, 100_000_000).exact(), "what a per-switch program counts of exiting tasks");
        assert!(!check(0, 0).exact(), "a workload that used no CPU proves nothing");
        assert!((check(99_000_000, 100_000_000).error() - 0.01).abs() < 1e-9);
    }
}
