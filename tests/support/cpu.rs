//! CPU time under the shapes of work real kernels run (forks, short-lived processes and
//! threads, busy threads on every core, a CPU quota, a shared core, nested cgroups), each
//! compared with the kernel's own accounting of the container's cgroup over the same window.
//! The CPU tests and `bench-cpu` share them.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use bai_agent::monitor::{CgroupLayout, ContainerCgroups, cgroup::CgroupMode};

use crate::{Agent, BUSYBOX_IMAGE, Container, PYTHON_IMAGE, relative_error, wait_until};

/// The counter every shape is judged by.
pub const CPU_SERIES: &str = "container_cpu_usage_seconds_total";

/// Where the work of a shape runs besides its container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Alone in its container.
    Plain,
    /// Next to a busy container pinned to the same core.
    BusyNeighbour,
    /// In cgroups nested two levels inside the container's.
    Nested,
}

/// One shape of work: `work` runs under `sh -c` in `image` with `options`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub image: &'static str,
    pub options: &'static [&'static str],
    pub work: &'static str,
    pub setting: Setting,
}

const fn busybox(name: &'static str, options: &'static [&'static str], work: &'static str) -> Shape {
    Shape { name, image: BUSYBOX_IMAGE, options, work, setting: Setting::Plain }
}

const fn python(name: &'static str, work: &'static str) -> Shape {
    Shape { name, image: PYTHON_IMAGE, options: &[], work, setting: Setting::Plain }
}

pub const FORK_EXEC: Shape =
    busybox("3000 × fork+exec of /bin/true", &[], "i=0; while [ $i -lt 3000 ]; do /bin/true; i=$((i+1)); done");
pub const USLEEP: Shape = busybox(
    "3000 × usleep 1000 (a forked applet each time)",
    &[],
    "i=0; while [ $i -lt 3000 ]; do usleep 1000; i=$((i+1)); done",
);
pub const PYTHON_SUBPROCESS: Shape = python(
    "Python: 150 × subprocess.run(['python3','-c','pass'])",
    "python3 -c 'import subprocess\nfor _ in range(150): subprocess.run([\"python3\", \"-c\", \"pass\"], check=True)'",
);
pub const PYTHON_THREADS: Shape = python(
    "Python: 3000 short threads, started and joined",
    "python3 -c 'import threading\nfor _ in range(3000):\n    t = threading.Thread(target=lambda: sum(range(200)))\n    t.start()\n    t.join()'",
);
pub const DATE_LOOP: Shape = busybox(
    "a shell loop around $(date +%s) for 5 s",
    &[],
    "end=$(( $(date +%s) + 5 )); while [ $(date +%s) -lt $end ]; do :; done",
);
pub const BUSY_LOOP: Shape =
    busybox("a busy loop with no forks", &[], "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done");
pub const THREADS_ON_EVERY_CORE: Shape = python(
    "Python: 8 threads hashing (GIL released) on both cores",
    "python3 -c 'import hashlib, threading\nblob = bytes(1 << 20)\ndef work():\n    for _ in range(120): hashlib.sha256(blob).digest()\nts = [threading.Thread(target=work) for _ in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]'",
);
pub const THROTTLED: Shape = busybox(
    "throttled to 0.3 CPU (--cpus 0.3): two loops, one forking",
    &["--cpus", "0.3"],
    "(i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done) & \
     (i=0; while [ $i -lt 400 ]; do /bin/true; i=$((i+1)); done) & wait",
);
pub const SHARED_CORE: Shape = Shape {
    setting: Setting::BusyNeighbour,
    ..busybox(
        "pinned to one core (--cpuset-cpus 0) next to a busy neighbour",
        &["--cpuset-cpus", "0"],
        "(i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done) & \
         (i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done) & wait",
    )
};
pub const NESTED: Shape = Shape {
    setting: Setting::Nested,
    ..busybox(
        "in cgroups nested two levels inside the kernel's",
        &[],
        "(i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done) & \
         (i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done) & wait",
    )
};

/// Every shape, in the order of the benchmark's table.
pub const SHAPES: [Shape; 10] = [
    FORK_EXEC,
    USLEEP,
    PYTHON_SUBPROCESS,
    PYTHON_THREADS,
    DATE_LOOP,
    BUSY_LOOP,
    THREADS_ON_EVERY_CORE,
    THROTTLED,
    SHARED_CORE,
    NESTED,
];

/// The largest relative difference from the kernel's accounting the agent may have.
pub const TOLERANCE: f64 = 0.005;

/// A container's CPU time by the kernel's own per-cgroup accounting, from the files of its
/// cgroup as it was when it started (a task moved into a nested cgroup still counts there).
pub struct KernelCpu {
    cgroups: ContainerCgroups,
}

impl KernelCpu {
    pub fn of(container: &Container) -> anyhow::Result<KernelCpu> {
        let layout = CgroupLayout::detect()?;
        Ok(KernelCpu { cgroups: layout.container_cgroups(container.pid()?)? })
    }

    /// `cpuacct.usage` on hybrid hosts, `cpu.stat usage_usec` on pure v2 hosts, in ns.
    pub fn total_ns(&self) -> anyhow::Result<u64> {
        match self.cgroups.mode {
            CgroupMode::Hybrid => {
                let path = self.dir("cpuacct")?.join("cpuacct.usage");
                let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                Ok(text.trim().parse()?)
            }
            CgroupMode::Unified => Ok(self.v2_stat("usage_usec")? * 1000),
        }
    }

    /// (user, system) as the kernel splits the total: `cpuacct.stat` (USER_HZ ticks, scaled)
    /// on hybrid hosts, `cpu.stat` on pure v2 hosts; in seconds.
    pub fn split_seconds(&self) -> anyhow::Result<(f64, f64)> {
        match self.cgroups.mode {
            CgroupMode::Hybrid => {
                let path = self.dir("cpuacct")?.join("cpuacct.stat");
                let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                let value = |key: &str| -> anyhow::Result<f64> {
                    let ticks: f64 = text
                        .lines()
                        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
                        .with_context(|| format!("no {key} in cpuacct.stat"))?
                        .trim()
                        .parse()?;
                    Ok(ticks / 100.0)
                };
                Ok((value("user")?, value("system")?))
            }
            CgroupMode::Unified => {
                Ok((self.v2_stat("user_usec")? as f64 / 1e6, self.v2_stat("system_usec")? as f64 / 1e6))
            }
        }
    }

    fn v2_stat(&self, key: &str) -> anyhow::Result<u64> {
        let path = self.cgroups.unified.path.join("cpu.stat");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .with_context(|| format!("no {key} in cpu.stat"))?
            .trim()
            .parse()?)
    }

    fn dir(&self, controller: &str) -> anyhow::Result<&Path> {
        self.cgroups.dir(controller).with_context(|| format!("the host has no {controller} controller"))
    }

    /// Moves process `pid` (host pid) into `nested/deeper` below the container's cgroup, in
    /// the unified hierarchy and, on hybrid hosts, in the v1 `cpuacct` and `cpu` ones.
    pub fn nest(&self, pid: u32) -> anyhow::Result<()> {
        let mut dirs = vec![self.cgroups.unified.path.clone()];
        if self.cgroups.mode == CgroupMode::Hybrid {
            for controller in ["cpuacct", "cpu"] {
                let dir = self.dir(controller)?.to_path_buf();
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        for dir in dirs {
            let deeper = dir.join("nested").join("deeper");
            std::fs::create_dir_all(&deeper).with_context(|| format!("creating {}", deeper.display()))?;
            std::fs::write(deeper.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("moving {pid} into {}", deeper.display()))?;
        }
        Ok(())
    }
}

/// What the agent and the kernel counted for one shape.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    pub agent_s: f64,
    pub kernel_s: f64,
}

impl Comparison {
    pub fn ratio(&self) -> f64 {
        self.agent_s / self.kernel_s
    }

    pub fn error(&self) -> f64 {
        relative_error(self.agent_s, self.kernel_s)
    }

    /// Fails unless the agent is within [`TOLERANCE`] of the kernel.
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        println!(
            "{what}: agent {:.6} s, kernel {:.6} s, ratio {:.4}, error {:.3} %",
            self.agent_s,
            self.kernel_s,
            self.ratio(),
            self.error() * 100.0
        );
        if self.error() > TOLERANCE {
            bail!(
                "{what}: the agent counted {:.6} s of CPU, the kernel {:.6} s (ratio {:.4}, more than {} % off)",
                self.agent_s,
                self.kernel_s,
                self.ratio(),
                TOLERANCE * 100.0
            );
        }
        Ok(())
    }
}

/// A directory shared with a container as `/io`: a FIFO it waits on, and the file it makes
/// when its work is done.
pub struct Handshake {
    dir: tempfile::TempDir,
}

impl Handshake {
    pub fn new() -> anyhow::Result<Handshake> {
        let dir = tempfile::tempdir()?;
        let fifo = std::ffi::CString::new(dir.path().join("go").as_os_str().as_encoded_bytes())?;
        // SAFETY: a valid C string; mkfifo creates a file.
        if unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) } != 0 {
            bail!("mkfifo: {}", std::io::Error::last_os_error());
        }
        Ok(Handshake { dir })
    }

    /// The `-v` option that mounts it at `/io`.
    pub fn volume(&self) -> String {
        format!("{}:/io", self.dir.path().display())
    }

    /// `work`, run once [`Handshake::go`] is called, then marked done; the container then idles.
    pub fn script(work: &str) -> String {
        format!("read go < /io/go; {work}; touch /io/done; exec sleep 3600")
    }

    /// Lets the container's work start (it is blocked opening the FIFO until then).
    pub fn go(&self) -> anyhow::Result<()> {
        let mut fifo = std::fs::OpenOptions::new().write(true).open(self.dir.path().join("go"))?;
        fifo.write_all(b"go\n")?;
        Ok(())
    }

    pub fn wait_done(&self, timeout: Duration) -> anyhow::Result<()> {
        let done: PathBuf = self.dir.path().join("done");
        wait_until("the work to finish", timeout, || done.exists())
    }
}

/// Waits `passes` of the agent's sampling interval, so its counters include what happened.
pub fn settle(interval: Duration, passes: u32) {
    std::thread::sleep(interval * passes + Duration::from_millis(50));
}

/// The agent's CPU counter of a kernel, in seconds.
pub fn agent_cpu_s(agent: &Agent, kernel_id: &str) -> anyhow::Result<f64> {
    agent.kernel_value(CPU_SERIES, kernel_id)?.with_context(|| format!("no {CPU_SERIES} for {kernel_id}"))
}

/// Runs `shape` in a container counted by `agent` (sampling every `interval`) and compares
/// what the agent and the kernel counted from the moment the work starts until it is done.
pub fn measure(agent: &Agent, interval: Duration, shape: &Shape) -> anyhow::Result<Comparison> {
    let handshake = Handshake::new()?;
    let volume = handshake.volume();
    let mut options = vec!["--network", "none", "-v", &volume];
    options.extend_from_slice(shape.options);
    let neighbour = match shape.setting {
        Setting::BusyNeighbour => {
            Some(Container::run(&agent.id, &["--network", "none", "--cpuset-cpus", "0"], "while :; do :; done")?)
        }
        _ => None,
    };
    let container = Container::run_image(&agent.id, shape.image, &options, &Handshake::script(shape.work))?;
    let kernel = KernelCpu::of(&container)?;
    if shape.setting == Setting::Nested {
        // The container's shell, waiting on the FIFO, is moved; the work it starts stays there.
        kernel.nest(container.pid()?)?;
    }
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(30))?;
    settle(interval, 2);
    let (agent_before, kernel_before) = (agent_cpu_s(agent, &container.kernel_id)?, kernel.total_ns()?);
    handshake.go()?;
    handshake.wait_done(Duration::from_secs(300))?;
    settle(interval, 2);
    let (agent_after, kernel_after) = (agent_cpu_s(agent, &container.kernel_id)?, kernel.total_ns()?);
    drop(neighbour);
    Ok(Comparison { agent_s: agent_after - agent_before, kernel_s: (kernel_after - kernel_before) as f64 / 1e9 })
}
