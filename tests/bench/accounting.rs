//! `bench-accounting`: what measuring many running kernels costs, the agent side by side with
//! the Python agent's two ways of collecting (`tests/bench/python_collectors.py`): polling each
//! container through the Docker API, and reading the cgroup files.
//!
//! For the agent it measures, over the same windows: CPU time per container-sample (every
//! resource of every kernel, the node, and the stats it writes to Redis), total CPU use,
//! resident memory, the kernel-side cost per event of each eBPF program (with
//! `kernel.bpf_stats_enabled=1`, which `cargo xtask bench` sets, in a window of its own: the
//! agent's cost is measured with the setting off, as deployed), and `/metrics` latency.
//!
//! Usage: bench-accounting [KERNELS=100] [WINDOW_SECONDS=30] [ROUNDS=2] [waking|mixed|idle]
//!
//! The kernels: `waking` (the default), every kernel wakes every 0.3 s (`sleep 0.3` in a loop:
//! a fork, an exec and a little CPU each time, so its CPU time moves between every two
//! samples); `mixed`, four busy kernels that keep the eBPF hooks and the OOM killer busy (a
//! context-switching pipe, HTTP over loopback, direct I/O, a kernel OOM-killed every second)
//! and the rest waking; `idle`, the four busy ones and the rest asleep throughout.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bai_agent_tests::{
    Agent, Container, RedisServer,
    bench::{CpuAccount, Summary, cpu_of_processes, load_average, machine_description, ms, resident_kib},
    free_loopback_port, parse_exposition, require_environment, unique, wait_until,
};

/// The container engine's processes, whose work a Docker API poll causes.
const ENGINE: &[&str] = &["dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2"];
const PYTHON_COLLECTORS: &str = "tests/bench/python_collectors.py";
/// The agent's programs and what one event of each is.
const PROGRAMS: &[(&str, &str)] = &[
    ("sched_stat_runtime", "CPU charge by the scheduler (update_curr) on the node"),
    ("cgroup_skb_ingress", "packet received by a kernel"),
    ("cgroup_skb_egress", "packet sent by a kernel"),
    ("block_bio_queue", "bio submitted on the node"),
    ("mark_victim", "OOM kill on the node"),
];

/// One measured window of one collector.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    seconds: f64,
    container_samples: f64,
    /// The collector's own CPU time.
    cpu: Duration,
    /// dockerd, containerd and the shims, in the same window.
    engine_cpu: Duration,
}

impl Window {
    fn add(&mut self, other: Window) {
        self.seconds += other.seconds;
        self.container_samples += other.container_samples;
        self.cpu += other.cpu;
        self.engine_cpu += other.engine_cpu;
    }

    fn per_sample_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.container_samples.max(1.0)
    }

    fn core_pct(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.seconds.max(1e-9) * 100.0
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>());
    let usage = "usage: bench-accounting [KERNELS] [WINDOW_SECONDS] [ROUNDS] [waking|mixed|idle]";
    let kernels = args.next().transpose().context(usage)?.unwrap_or(100).max(5) as usize;
    let window = Duration::from_secs(args.next().transpose().context(usage)?.unwrap_or(30));
    let rounds = args.next().transpose().context(usage)?.unwrap_or(2).max(1);
    let mix = match std::env::args().nth(4).as_deref() {
        None | Some("waking") => Mix::Waking,
        Some("mixed") => Mix::BusyAndWaking,
        Some("idle") => Mix::BusyAndIdle,
        Some(other) => bail!("{usage}: `{other}` is not waking, mixed or idle"),
    };
    require_environment();
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default().trim() != "1" {
        bail!("kernel.bpf_stats_enabled is not 1; run through `cargo xtask bench`, which sets it");
    }
    let python = Command::new("python3").args(["-c", "import aiodocker"]).output();
    if !python.is_ok_and(|out| out.status.success()) {
        bail!("python3 cannot import aiodocker, which the Python baselines use; `cargo xtask setup` installs it");
    }
    // The agent as it runs in production: `info` logging. RUST_LOG wins over the config.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: set before any thread of this process starts.
        unsafe { std::env::set_var("RUST_LOG", "info") };
    }

    let redis = RedisServer::start(free_loopback_port()?)?;
    let agent_id = unique("i-bench");
    let mut agent = Agent::start_with_id(
        &agent_id,
        &format!("[monitor]\ninterval = \"1s\"\n\n[redis]\naddr = \"{}\"\n", redis.addr()),
    )?;
    let agent_pid = agent.pid().context("the agent's pid")?;
    let account = CpuAccount::create("agent")?;
    account.adopt(agent_pid)?;

    let io_dir = tempfile::tempdir_in(std::env::current_dir()?)?;
    let containers = start_kernels(&agent_id, kernels, io_dir.path(), mix)?;
    wait_until("the agent to count every kernel", Duration::from_secs(120), || {
        gauge(&agent, "backendai_agent_tracked_containers").is_ok_and(|n| n as usize == containers.len())
    })?;
    println!("{} kernels running and counted ({}); load average {}", containers.len(), mix.describe(), load_average());
    std::thread::sleep(Duration::from_secs(5));

    let mut agent_total = Window::default();
    let mut docker_total = Window::default();
    let mut files_total = Window::default();
    let mut python_rss = BTreeMap::new();
    let load_start = load_average();
    // The agent as deployed: without the kernel's per-program statistics (each costs every
    // program run two clock reads, and the agent reads them every pass while they are on).
    set_bpf_stats(false)?;
    for _ in 0..rounds {
        agent_total.add(measure_agent(&agent, &account, window)?);
        for (mode, total) in [("docker", &mut docker_total), ("cgroup", &mut files_total)] {
            let (measured, rss) = measure_python(mode, &agent_id, window)?;
            total.add(measured);
            python_rss.insert(mode, rss);
        }
    }
    // Then the programs' own cost, in a window of its own with the statistics on (the agent
    // looks at the setting every tenth pass).
    set_bpf_stats(true)?;
    std::thread::sleep(Duration::from_secs(11));
    let (programs_before, programs_seconds, programs_after) = measure_programs(&agent, window)?;
    let (rss_kib, peak_kib) = resident_kib(agent_pid);
    let scrapes = scrape_latency(&agent, 300)?;
    let load_end = load_average();
    let ids: Vec<String> = containers.iter().map(|c| c.id.clone()).collect();
    let _ = Command::new("docker").arg("rm").arg("-f").args(&ids).output();
    agent.stop()?;
    drop(redis);

    println!();
    println!("{}", machine_description()?);
    println!(
        "{} kernels ({}), 1 s interval, {rounds} rounds of {} s per collector; load average {load_start} at the start, {load_end} at the end",
        containers.len(),
        mix.describe(),
        window.as_secs()
    );
    println!();
    println!(
        "| collector | container-samples | CPU µs per container-sample | with the engine's (dockerd, containerd, shims) | CPU % of one core | with the engine's | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, total, rss) in [
        ("bai-agent (eBPF + cgroup files, stats to Redis)", agent_total, peak_kib),
        (
            "Python agent, Docker API (`stats?stream=false`)",
            docker_total,
            python_rss.get("docker").copied().unwrap_or(0),
        ),
        ("Python agent, cgroup files", files_total, python_rss.get("cgroup").copied().unwrap_or(0)),
    ] {
        let with_engine = total.cpu + total.engine_cpu;
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.3} | {:.3} | {:.1} |",
            total.container_samples,
            total.per_sample_us(total.cpu),
            total.per_sample_us(with_engine),
            total.core_pct(total.cpu),
            total.core_pct(with_engine),
            rss as f64 / 1024.0
        );
    }
    println!();
    println!(
        "agent resident memory at the end: {:.1} MiB (peak {:.1} MiB)",
        rss_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
    println!();
    println!("| eBPF program | per | events | events/s | ns/event |");
    println!("|---|---|---:|---:|---:|");
    for (program, event) in PROGRAMS {
        let (Some(before), Some(after)) = (programs_before.get(*program), programs_after.get(*program)) else {
            println!("| {program} | {event} | not loaded | | |");
            continue;
        };
        let runs = after.1 - before.1;
        let ns = (after.0 - before.0) * 1e9 / runs.max(1.0);
        println!("| {program} | {event} | {runs:.0} | {:.1} | {ns:.1} |", runs / programs_seconds.max(1e-9));
    }
    println!();
    println!(
        "`/metrics` with {} kernels ({} bytes, OpenMetrics): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} scrapes",
        containers.len(),
        scrapes.1,
        ms(scrapes.0.p50),
        ms(scrapes.0.p90),
        ms(scrapes.0.p99),
        ms(scrapes.0.max),
        300
    );
    Ok(())
}

/// `kernels` labelled busybox containers: four that keep the hooks busy (a context-switching
/// pipe, loopback HTTP, direct I/O, an OOM kill a second), each held to a quarter of a CPU,
/// and idle ones for the rest.
/// What the benchmark's kernels do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    Waking,
    BusyAndWaking,
    BusyAndIdle,
}

impl Mix {
    fn describe(self) -> &'static str {
        match self {
            Mix::Waking => "every one waking every 0.3 s",
            Mix::BusyAndWaking => "four busy, the rest waking every 0.3 s",
            Mix::BusyAndIdle => "four busy, the rest idle",
        }
    }
}

fn start_kernels(agent_id: &str, kernels: usize, io_dir: &std::path::Path, mix: Mix) -> anyhow::Result<Vec<Container>> {
    let io_mount = format!("{}:/io", io_dir.display());
    let busy: [(Vec<&str>, &str); 4] = [
        (
            vec!["--network", "none", "--cpus", "0.25"],
            "while :; do dd if=/dev/zero bs=64 count=20000 2>/dev/null | dd of=/dev/null bs=64 2>/dev/null; done",
        ),
        (
            vec!["--network", "none", "--cpus", "0.25"],
            "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=65536 count=16 2>/dev/null && \
             httpd -p 127.0.0.1:8080 -h /www && sleep 1 && \
             while :; do wget -q -O /dev/null http://127.0.0.1:8080/blob; done",
        ),
        (
            vec!["--network", "none", "--cpus", "0.25", "-v", io_mount.as_str()],
            "while :; do dd if=/dev/zero of=/io/blob bs=64k count=64 oflag=direct 2>/dev/null; \
             dd if=/io/blob of=/dev/null bs=64k iflag=direct 2>/dev/null; sleep 0.2; done",
        ),
        (
            vec!["--network", "none", "-m", "64m", "--memory-swap", "64m"],
            "while :; do dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; sleep 1; done",
        ),
    ];
    let mut plan: Vec<(Vec<String>, String)> = busy
        .iter()
        .filter(|_| mix != Mix::Waking)
        .map(|(options, script)| (options.iter().map(|o| (*o).to_owned()).collect(), (*script).to_owned()))
        .collect();
    while plan.len() < kernels {
        let script = if mix == Mix::BusyAndIdle { "sleep 86400" } else { "while :; do sleep 0.3; done" };
        plan.push((vec!["--network".into(), "none".into()], script.into()));
    }
    // Four `docker run`s at a time.
    let mut containers = Vec::with_capacity(kernels);
    for chunk in plan.chunks(4) {
        let started: Vec<anyhow::Result<Container>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(options, script)| {
                    scope.spawn(move || {
                        let options: Vec<&str> = options.iter().map(String::as_str).collect();
                        Container::run(agent_id, &options, script)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("docker run panicked"))))
                .collect()
        });
        for container in started {
            containers.push(container?);
        }
    }
    Ok(containers)
}

/// One sample of a gauge or counter without labels.
fn gauge(agent: &Agent, name: &str) -> anyhow::Result<f64> {
    agent.metrics()?.into_iter().find(|s| s.name == name).map(|s| s.value).with_context(|| format!("no {name}"))
}

/// (run time seconds, runs) per program.
type ProgramTable = BTreeMap<String, (f64, f64)>;

/// Each program's totals, and the monitor's passes, from one scrape.
fn program_stats(agent: &Agent) -> anyhow::Result<(ProgramTable, f64)> {
    let samples = agent.metrics()?;
    let mut stats: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut passes = 0.0;
    for sample in samples {
        let program = sample.labels.get("program").cloned().unwrap_or_default();
        match sample.name.as_str() {
            "backendai_agent_ebpf_program_run_time_seconds_total" => stats.entry(program).or_default().0 = sample.value,
            "backendai_agent_ebpf_program_runs_total" => stats.entry(program).or_default().1 = sample.value,
            "backendai_agent_monitor_passes_total" => passes = sample.value,
            _ => {}
        }
    }
    Ok((stats, passes))
}

/// The agent alone for one window: its CPU (cgroup) and the sampling passes it made. The
/// scrapes that read the passes lie outside the CPU readings.
fn measure_agent(agent: &Agent, account: &CpuAccount, window: Duration) -> anyhow::Result<Window> {
    let tracked = gauge(agent, "backendai_agent_tracked_containers")?;
    let (_, passes_before) = program_stats(agent)?;
    let (cpu_before, engine_before, started) = (account.usage()?, cpu_of_processes(ENGINE), Instant::now());
    std::thread::sleep(window);
    let (cpu_after, engine_after, seconds) =
        (account.usage()?, cpu_of_processes(ENGINE), started.elapsed().as_secs_f64());
    let (_, passes_after) = program_stats(agent)?;
    Ok(Window {
        seconds,
        container_samples: (passes_after - passes_before) * tracked,
        cpu: cpu_after - cpu_before,
        engine_cpu: engine_after.saturating_sub(engine_before),
    })
}

/// The programs' run time and count at the start and the end of a window, and its seconds.
fn measure_programs(agent: &Agent, window: Duration) -> anyhow::Result<(ProgramTable, f64, ProgramTable)> {
    let (before, _) = program_stats(agent)?;
    let started = Instant::now();
    std::thread::sleep(window);
    let (after, _) = program_stats(agent)?;
    Ok((before, started.elapsed().as_secs_f64(), after))
}

/// Turns the kernel's per-program statistics on or off (`cargo xtask bench` puts the setting
/// back afterwards).
fn set_bpf_stats(on: bool) -> anyhow::Result<()> {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", if on { "1" } else { "0" })
        .context("setting kernel.bpf_stats_enabled")
}

/// One Python collector for one window: its own CPU (reported by itself over its loop) and
/// the engine's; returns its peak RSS in KiB too.
fn measure_python(mode: &str, agent_id: &str, window: Duration) -> anyhow::Result<(Window, u64)> {
    let engine_before = cpu_of_processes(ENGINE);
    let out = Command::new("python3")
        .arg(PYTHON_COLLECTORS)
        .args([mode, agent_id, "1", &window.as_secs().to_string()])
        .output()
        .context("running python3")?;
    let engine_after = cpu_of_processes(ENGINE);
    if !out.status.success() {
        bail!("{PYTHON_COLLECTORS} {mode} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("the collector's report")?;
    let number = |key: &str| report[key].as_f64().with_context(|| format!("no {key} in {report}"));
    let measured = Window {
        seconds: number("seconds")?,
        container_samples: number("samples")?,
        cpu: Duration::from_secs_f64(number("cpu_seconds")?),
        engine_cpu: engine_after.saturating_sub(engine_before),
    };
    Ok((measured, number("max_rss_kib")? as u64))
}

/// `/metrics` as Prometheus asks for it, `count` times in a row.
fn scrape_latency(agent: &Agent, count: usize) -> anyhow::Result<(Summary, usize)> {
    let mut times = Vec::with_capacity(count);
    let mut size = 0;
    for _ in 0..count {
        let started = Instant::now();
        let mut stream = TcpStream::connect(&agent.addr)?;
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
            agent.addr
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        times.push(started.elapsed());
        size = response.len();
        if !response.starts_with(b"HTTP/1.0 200") && !response.starts_with(b"HTTP/1.1 200") {
            bail!("/metrics answered {}", String::from_utf8_lossy(&response[..response.len().min(64)]));
        }
    }
    let body_samples = parse_exposition(&agent.get("/metrics")?.1).len();
    println!("/metrics holds {body_samples} samples");
    Ok((Summary::of(&times), size))
}
