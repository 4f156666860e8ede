//! `bench-backendai`: bai-agent against the Python agent it replaces (`backend.ai-agent`
//! 26.9.6), each in turn joined to the same real Backend.AI 26.9.6 manager (one control plane
//! from `tests/e2e/stack.sh`), on the same machine and the same kernel image, driven by the
//! user's own `backend.ai` CLI and client SDK.
//!
//! Per agent (after waiting, up to two minutes, for the 1-minute load average to fall under 1):
//! start it and wait until the manager has it ALIVE; one untimed warm-up session; a 20 s idle
//! window; then SESSIONS sessions, one after the other, each (session i after an untimed
//! (i mod 10) × 0.2 s, so that the sessions meet the manager's 2 s scheduling pass at spread
//! phases):
//! 1. `session create` (cpu 1, mem 2g) timed until the CLI returns (the session RUNNING), with
//!    the manager's own status history of it (PENDING → SCHEDULED → PREPARED → the kernel
//!    RUNNING → the session RUNNING) and the agent's own time for `create_kernels`;
//! 2. QUERIES query-mode round trips of `print(1)` on it through the client SDK in one process
//!    (`tests/bench/backendai_query.py`: the manager, the agent and the kernel runner, without
//!    the CLI's start-up), and `backend.ai run -c 'print(1)'` three times, timed whole;
//! 3. `session destroy`, timed until the CLI returns and until the manager has the session
//!    TERMINATED and Docker no container of its kernel, with the agent's own `destroy_kernel`.
//!
//! Throughout, the agent's CPU time: utime + stime of its process tree from `/proc` (children it
//! waited for included; clock ticks), and `cpuacct.usage` of a cgroup of the bench's own that
//! the tree is moved into (nanoseconds); its memory: the tree's `VmRSS` and `Pss` sums, sampled
//! every 250 ms, and `VmHWM` at the end. The agent's own RPC times: bai-agent's
//! `backendai_agent_rpc_request_duration_seconds` (one `/metrics` scrape per session), the
//! Python agent's log (`rpc::create_kernel` → `… done` with the steps it logs between,
//! `rpc::destroy_kernel` → `Kernel … destroyed`).
//!
//! The Python agent runs with the `agent.toml` of the `backend.ai-install` wheel (the
//! installer's template, with its substitutions: ports, paths, id) and `[debug] enabled =
//! false` as in production; bai-agent with the same reserved cpu and memory. Both run the
//! image `bai-test/python3-ipykernel:latest` (bai-test/python3 with ipykernel, which the
//! Python agent's query mode needs; `cargo xtask setup` builds it). The Python agent reacts to
//! the Docker events of every container named `kernel.*`, so the two agents run one after the
//! other, and the bench refuses to start (and every session) while any such container exists.
//!
//! Usage: bench-backendai [SESSIONS=10] [QUERIES=20]

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use bai_agent_tests::{
    Agent,
    backendai::{ControlPlane, REGISTRY_PROJECT},
    backendai_python,
    bench::{CpuAccount, load_average, machine_description, resident_kib},
    free_ports, require_environment, unique,
};

/// The image both agents run (`cargo xtask setup` builds it from `bai-test/python3:latest`).
const IMAGE: &str = "bai-test/python3-ipykernel:latest";
/// What the session asks for; 2g because the image's minimum is a little over 1g.
const RESOURCES: [&str; 4] = ["-r", "cpu=1", "-r", "mem=2g"];
/// The query-mode snippet and what it prints.
const CODE: &str = "print(1)";
const EXPECTED: &str = "1";
/// Untimed round trips before the timed ones on each session (the first runs the kernel's
/// first code).
const QUERY_WARM_UP: usize = 3;
/// `backend.ai run -c` calls per session, each timed whole.
const CLI_RUNS: usize = 3;
/// The idle window after the warm-up session, for each agent's CPU use with nothing to do.
const IDLE: Duration = Duration::from_secs(20);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The manager's scheduling pass (sokovan's `short_interval`).
const TICK: Duration = Duration::from_secs(2);
/// How long each agent's phase waits for the machine to calm down first.
const SETTLE_MAX: Duration = Duration::from_secs(120);
/// The host port pools (clear of the integration tests' 21000–25000 ranges).
const BAI_FIRST_PORT: u16 = 26100;
const PYTHON_FIRST_PORT: u16 = 26200;
/// How long one CLI call may take.
const CLI_TIMEOUT_S: &str = "300";

/// The image as the manager's `local` registry finds it: under the registry's project, with a
/// name of its own (the end-to-end test tags `e2e/python:3.11`).
fn image_name() -> String {
    format!("{REGISTRY_PROJECT}/python-ipykernel:3.11")
}

/// The image as the CLI names it.
fn image_ref() -> String {
    format!("local/{}", image_name())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bai,
    Python,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Bai => "bai-agent",
            Kind::Python => "Python agent 26.9.6",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::Bai => "rs",
            Kind::Python => "py",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: bench-backendai [SESSIONS] [QUERIES]";
    let mut args = std::env::args().skip(1);
    let sessions: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(10);
    let queries: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(20);
    ensure!(sessions > 0 && queries > 0, "{usage}: SESSIONS > 0, QUERIES > 0");
    require_environment();
    require_python_agent()?;
    refuse_foreign_kernels("before the benchmark")?;
    // bai-agent as it runs in production: `info` logging (the support crate configures
    // `debug`). RUST_LOG wins over the config.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "info") };
    }

    let machine = machine_description()?;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    println!("machine: {machine}; /proc/loadavg {load_before}");
    let plane = ControlPlane::start()?;
    register_the_image(&plane)?;

    let bai = bench_agent(&plane, Kind::Bai, sessions, queries)?;
    refuse_foreign_kernels("before the Python agent starts")?;
    let python = bench_agent(&plane, Kind::Python, sessions, queries)?;
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    let foreign = kernel_containers()?;

    println!();
    println!(
        "bench-backendai: {sessions} sessions per agent, {queries} SDK round trips and {CLI_RUNS} `run -c` per session; \
         one Backend.AI 26.9.6 manager; {machine}"
    );
    println!("/proc/loadavg before {load_before}; after {load_after}");
    if !foreign.is_empty() {
        println!("warning: kernel containers of another test appeared during the run: {}", foreign.join(", "));
    }
    print_tables(&bai, &python, sessions);
    Ok(())
}

/// Fails naming what the Python agent's side lacks: the agent in the venv, its config
/// template, the image with ipykernel.
fn require_python_agent() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let python = backendai_python();
    let import = Command::new(&python)
        .args(["-c", "import ai.backend.agent.server, ai.backend.krunner.static_gnu, ai.backend.client.session"])
        .output();
    if !import.is_ok_and(|out| out.status.success()) {
        missing.push(format!(
            "backend.ai-agent 26.9.6 (with backend.ai-krunner-static-gnu) in the venv of {}",
            python.display()
        ));
    }
    match std::env::var_os("BAI_TEST_BACKENDAI_INSTALL").map(PathBuf::from) {
        Some(dir) if agent_template(&dir).is_file() => {}
        Some(dir) => missing.push(format!("the agent.toml template at {}", agent_template(&dir).display())),
        None => missing.push("BAI_TEST_BACKENDAI_INSTALL (the unpacked backend.ai-install wheel)".to_owned()),
    }
    let image = Command::new("docker").args(["image", "inspect", IMAGE]).output();
    if !image.is_ok_and(|out| out.status.success()) {
        missing.push(format!("the image {IMAGE} (bai-test/python3 with ipykernel)"));
    }
    if !missing.is_empty() {
        bail!(
            "bench-backendai cannot run here; missing: {}. `cargo xtask setup` installs all of it.",
            missing.join("; ")
        );
    }
    Ok(())
}

fn agent_template(install: &Path) -> PathBuf {
    install.join("ai/backend/install/configs/agent.toml")
}

/// The names of all containers named `kernel.*`, running or not.
fn kernel_containers() -> anyhow::Result<Vec<String>> {
    let out =
        Command::new("docker").args(["ps", "-a", "--format", "{{.Names}}"]).output().context("running docker ps")?;
    ensure!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|name| name.starts_with("kernel."))
        .map(str::to_owned)
        .collect())
}

/// The Python agent takes over every `kernel.*` container it sees: never next to another
/// agent's kernels.
fn refuse_foreign_kernels(when: &str) -> anyhow::Result<()> {
    let kernels = kernel_containers()?;
    if !kernels.is_empty() {
        bail!(
            "refusing to run {when}: Docker has kernel containers ({}), and the Python agent acts on the events of every \
             `kernel.*` container; wait until the other test is done (or remove them) and run again",
            kernels.join(", ")
        );
    }
    Ok(())
}

/// Tags the image under the `local` registry's project and has the manager scan it.
fn register_the_image(plane: &ControlPlane) -> anyhow::Result<()> {
    let tagged = Command::new("docker").args(["tag", IMAGE, &image_name()]).output()?;
    ensure!(tagged.status.success(), "docker tag: {}", String::from_utf8_lossy(&tagged.stderr));
    let scan = plane.mgr(&["image", "rescan", "local"]);
    ensure!(scan.success, "image rescan: {}", scan.text());
    let images = plane.sql("select name from images")?;
    ensure!(
        images.lines().any(|name| name.trim() == image_ref()),
        "the manager does not list {}: {images}",
        image_ref()
    );
    Ok(())
}

/// One agent's numbers.
#[derive(Debug, Default)]
struct AgentResult {
    sessions: Vec<SessionTimes>,
    /// Spawn → ALIVE in the manager's database.
    startup: Duration,
    startup_cpu: Duration,
    idle_cpu: Cpu,
    /// CPU over the timed sessions, and over the whole life of the agent (spawn → stop).
    sessions_cpu: Cpu,
    sessions_wall: Duration,
    total_cpu: Duration,
    /// The tree's resident memory (KiB) sampled during the timed sessions.
    rss_kib: Vec<u64>,
    /// The same for the tree's `Pss`.
    pss_kib: Vec<u64>,
    /// Sum of the tree's `VmHWM` just before the stop (KiB).
    hwm_kib: u64,
    processes: usize,
    load: String,
}

#[derive(Debug, Default, Clone)]
struct SessionTimes {
    create_cli: Duration,
    /// The manager's status history: PENDING → RUNNING, and its four steps.
    create_manager: Duration,
    create_steps: [Duration; 4],
    create_agent: Duration,
    /// The Python agent's `create_kernel` by its log: preparation, the container's create and
    /// start, waiting for the kernel runner, the rest.
    python_create_steps: Option<[Duration; 4]>,
    queries: Vec<Duration>,
    cli_runs: Vec<Duration>,
    destroy_cli: Duration,
    destroy_done: Duration,
    /// TERMINATING → TERMINATED in the manager's status history.
    destroy_manager: Duration,
    destroy_agent: Duration,
    /// `destroy_kernel` calls the agent got for the session.
    destroy_calls: u32,
    cpu: Cpu,
}

fn bench_agent(plane: &ControlPlane, kind: Kind, sessions: usize, queries: usize) -> anyhow::Result<AgentResult> {
    settle();
    println!("== {}: starting", kind.label());
    let load_start = load_average();
    let spawned = Instant::now();
    let mut agent = RunningAgent::start(plane, kind)?;
    let pid = agent.pid()?;
    let meter = CpuMeter::start(kind, pid)?;
    let mut sampler = Sampler::start(pid);
    if let Err(err) = plane.wait_for_sql(
        &format!("select status from agents where id = '{}'", agent.id()),
        "ALIVE",
        Duration::from_secs(180),
    ) {
        bail!(
            "{} did not become ALIVE: {err}\n{}\n{}",
            kind.label(),
            agent.log_tail(40),
            plane.log_tail("manager", 40)
        );
    }
    let startup = spawned.elapsed();
    let startup_cpu = tree_cpu(pid);
    println!("   ALIVE after {:.1} s ({:.2} s CPU); warm-up session", startup.as_secs_f64(), startup_cpu.as_secs_f64());

    let tag = format!("bench-{}-{}", kind.tag(), std::process::id());
    run_session(plane, &mut agent, &meter, &format!("{tag}-warm"), 0, QUERY_WARM_UP)
        .with_context(|| format!("{}: the warm-up session", kind.label()))?;
    let idle_from = meter.read()?;
    std::thread::sleep(IDLE);
    let idle_cpu = meter.read()?.since(idle_from);

    let mut result = AgentResult { startup, startup_cpu, idle_cpu, ..AgentResult::default() };
    let (cpu_before, wall_before) = (meter.read()?, Instant::now());
    for index in 0..sessions {
        let times = run_session(plane, &mut agent, &meter, &format!("{tag}-{index}"), index as u32, queries)
            .with_context(|| format!("{}: session {index}", kind.label()))?;
        let (slowest, slowest_at) =
            times.queries.iter().enumerate().map(|(at, took)| (*took, at)).max().unwrap_or_default();
        println!(
            "   session {index}: create {:.2} s (manager {:.2} s, agent {:.3} s), query p50 {:.1} ms (slowest {:.1} ms, \
             #{slowest_at}), destroy {:.2} s, CPU {:.0} ms",
            times.create_cli.as_secs_f64(),
            times.create_manager.as_secs_f64(),
            times.create_agent.as_secs_f64(),
            median(&times.queries).as_secs_f64() * 1e3,
            slowest.as_secs_f64() * 1e3,
            times.destroy_done.as_secs_f64(),
            times.cpu.exact.as_secs_f64() * 1e3
        );
        result.sessions.push(times);
    }
    result.sessions_cpu = meter.read()?.since(cpu_before);
    result.sessions_wall = wall_before.elapsed();
    (result.rss_kib, result.pss_kib) = sampler.since(wall_before).into_iter().unzip();
    let tree = process_tree(pid);
    result.processes = tree.len();
    result.hwm_kib = tree.iter().map(|pid| resident_kib(*pid).1).sum();
    result.total_cpu = tree_cpu(pid);
    result.load = format!("{load_start} → {}", load_average());
    sampler.stop();
    agent.stop()?;
    // The manager marks an agent that said goodbye TERMINATED; the next agent is the only one.
    plane.wait_for_sql(
        &format!("select status <> 'ALIVE' from agents where id = '{}'", agent.id()),
        "t",
        Duration::from_secs(120),
    )?;
    Ok(result)
}

/// Waits (up to [`SETTLE_MAX`]) until the 1-minute load average is under 1, so that what ran
/// just before (the build, the control plane's start, the other agent) is not in the numbers;
/// what the load was is printed with them.
fn settle() {
    let load = || load_average().parse::<f64>().unwrap_or(f64::MAX);
    let deadline = Instant::now() + SETTLE_MAX;
    while load() >= 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// One session: create, queries, `run -c`, destroy. Each starts with no kernel container on the
/// engine (the previous session's is gone): another test's kernels would load the machine and,
/// next to the Python agent, be acted on by it.
fn run_session(
    plane: &ControlPlane,
    agent: &mut RunningAgent,
    meter: &CpuMeter,
    name: &str,
    offset: u32,
    queries: usize,
) -> anyhow::Result<SessionTimes> {
    refuse_foreign_kernels(&format!("session {name}"))?;
    // Sessions start at spread phases of the manager's 2 s scheduling pass, which every step of
    // a session's life waits for: otherwise each run of the bench would land on one phase.
    std::thread::sleep(TICK * (offset % 10) / 10);
    let cpu_before = meter.read()?;
    let marks = agent.rpc_marks()?;
    let mut times = SessionTimes::default();

    let image = image_ref();
    let (took, _) =
        cli(plane, &[&["session", "create", "-t", name][..], &RESOURCES[..], &[image.as_str()][..]].concat())
            .with_context(|| format!("agent log:\n{}", agent.log_tail(30)))?;
    times.create_cli = took;
    let row = plane.sql(&format!(
        "select s.status, k.id, coalesce(k.agent, ''), {} from sessions s join kernels k on k.session_id = s.id \
         where s.name = '{name}'",
        [
            ("s", "PENDING", "s", "RUNNING"),
            ("s", "PENDING", "s", "SCHEDULED"),
            ("s", "SCHEDULED", "s", "PREPARED"),
            ("s", "PREPARED", "k", "RUNNING"),
            ("k", "RUNNING", "s", "RUNNING"),
        ]
        .map(|(a, from, b, to)| format!(
            "extract(epoch from ({b}.status_history->>'{to}')::timestamptz - ({a}.status_history->>'{from}')::timestamptz)"
        ))
        .join(", ")
    ))?;
    let fields: Vec<&str> = row.split('|').collect();
    let &[status, kernel_id, assigned, ref spans @ ..] = &fields[..] else {
        bail!("the manager has no one kernel for session {name}: {row:?}");
    };
    ensure!(status == "RUNNING", "session {name} is {status} after `session create` returned");
    ensure!(assigned == agent.id(), "session {name} went to agent {assigned:?}, not {}", agent.id());
    let spans = spans
        .iter()
        .map(|s| s.parse::<f64>().ok().filter(|v| *v >= 0.0).map(Duration::from_secs_f64))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("session {name}'s status history lacks a step: {row:?}"))?;
    let [whole, steps @ ..] = &spans[..] else { bail!("status history of {name}: {row:?}") };
    times.create_manager = *whole;
    times.create_steps = steps.try_into().with_context(|| format!("status history of {name}: {row:?}"))?;

    times.queries = sdk_round_trips(plane, name, queries)?;
    for _ in 0..CLI_RUNS {
        let (took, stdout) = cli(plane, &["run", "-t", name, &image_ref(), "-c", CODE])?;
        ensure!(stdout.lines().any(|line| line.trim() == EXPECTED), "`run -c {CODE}` printed:\n{stdout}");
        times.cli_runs.push(took);
    }

    let started = Instant::now();
    let (took, _) = cli(plane, &["session", "destroy", name])?;
    times.destroy_cli = took;
    let deadline = started + Duration::from_secs(120);
    loop {
        let status = plane.sql(&format!("select status from sessions where name = '{name}'"))?;
        if status == "TERMINATED" && containers_of(kernel_id)?.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "session {name} still {status} 120 s after `session destroy`");
        std::thread::sleep(Duration::from_millis(100));
    }
    times.destroy_done = started.elapsed();
    let terminating = plane.sql(&format!(
        "select extract(epoch from (status_history->>'TERMINATED')::timestamptz - \
         (status_history->>'TERMINATING')::timestamptz) from sessions where name = '{name}'"
    ))?;
    times.destroy_manager = Duration::from_secs_f64(
        terminating.parse::<f64>().with_context(|| format!("TERMINATING → TERMINATED of {name}: {terminating:?}"))?,
    );
    let own = agent.rpc_times(&marks, kernel_id)?;
    (times.create_agent, times.destroy_agent, times.destroy_calls, times.python_create_steps) =
        (own.create, own.destroy, own.destroys, own.create_steps);
    times.cpu = meter.read()?.since(cpu_before);
    Ok(times)
}

/// `backend.ai ARGS` with the example superadmin's keys: how long it took and its stdout.
fn cli(plane: &ControlPlane, args: &[&str]) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let out = plane
        .client_command(Path::new("timeout"))
        .arg(CLI_TIMEOUT_S)
        .arg(plane.venv().join("bin/backend.ai"))
        .args(args)
        .output()
        .context("running the backend.ai CLI")?;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`backend.ai {}` failed ({}):\n{stdout}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((took, stdout))
}

/// Query-mode round trips through the client SDK in one process (`backendai_query.py`).
fn sdk_round_trips(plane: &ControlPlane, name: &str, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/backendai_query.py");
    let out = plane
        .client_command(&plane.venv().join("bin/python"))
        .arg(&script)
        .args([name, &QUERY_WARM_UP.to_string(), &runs.to_string(), CODE, EXPECTED])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let times = stdout
        .lines()
        .map(|line| line.trim().parse::<f64>().map(Duration::from_secs_f64))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} printed: {stdout}", script.display()))?;
    ensure!(times.len() == runs, "{} timed {} runs, not {runs}", script.display(), times.len());
    Ok(times)
}

/// The ids of the containers (running or not) whose name holds `kernel_id`: both agents name
/// a kernel's container `kernel.{image}.{kernel_id}`.
fn containers_of(kernel_id: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name={kernel_id}")])
        .output()
        .context("running docker ps")?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect())
}

/// What an agent itself says one session's RPC calls took.
struct AgentTimes {
    create: Duration,
    /// bai-agent: all its `destroy_kernel` calls of the session; the Python agent: its first.
    destroy: Duration,
    destroys: u32,
    create_steps: Option<[Duration; 4]>,
}

/// The agent under measurement.
enum RunningAgent {
    Bai(Agent),
    Python(PythonAgent),
}

/// bai-agent's RPC time per method so far (`_sum`, `_count`), to difference per session.
type RpcMarks = HashMap<String, (f64, f64)>;

impl RunningAgent {
    fn start(plane: &ControlPlane, kind: Kind) -> anyhow::Result<RunningAgent> {
        Ok(match kind {
            Kind::Bai => {
                let id = unique("i-bench-bai");
                let toml = format!(
                    "[container]\nscratch-root = \"{scratch}\"\nport-range = [{BAI_FIRST_PORT}, {last}]\n\
                     bind-host = \"127.0.0.1\"\n\n[resource]\nreserved-cpu = 1\nreserved-mem = \"1g\"\n\n\
                     [redis]\naddr = \"{redis}\"\nevent-format = \"26.9\"\n\n[etcd]\naddr = \"{etcd}\"\n\
                     namespace = \"local\"\n",
                    scratch = plane.path("bai-scratches").display(),
                    last = BAI_FIRST_PORT + 99,
                    redis = plane.redis_addr,
                    etcd = plane.etcd_addr,
                );
                RunningAgent::Bai(Agent::start_with_journal(&id, &plane.path("bai-state"), &toml)?)
            }
            Kind::Python => RunningAgent::Python(PythonAgent::start(plane, &unique("i-bench-python"))?),
        })
    }

    fn id(&self) -> &str {
        match self {
            RunningAgent::Bai(agent) => &agent.id,
            RunningAgent::Python(agent) => &agent.id,
        }
    }

    fn pid(&self) -> anyhow::Result<u32> {
        match self {
            RunningAgent::Bai(agent) => agent.pid().context("bai-agent is not running"),
            RunningAgent::Python(agent) => {
                agent.child.as_ref().map(Child::id).context("the Python agent is not running")
            }
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = match self {
            RunningAgent::Bai(agent) => agent.log_text(),
            RunningAgent::Python(agent) => std::fs::read_to_string(&agent.log).unwrap_or_default(),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn rpc_marks(&self) -> anyhow::Result<RpcMarks> {
        let RunningAgent::Bai(agent) = self else { return Ok(RpcMarks::new()) };
        let mut marks = RpcMarks::new();
        for sample in agent.metrics()? {
            let Some(method) = sample.labels.get("method") else { continue };
            let entry = marks.entry(method.clone()).or_default();
            match sample.name.as_str() {
                "backendai_agent_rpc_request_duration_seconds_sum" => entry.0 = sample.value,
                "backendai_agent_rpc_request_duration_seconds_count" => entry.1 = sample.value,
                _ => {}
            }
        }
        Ok(marks)
    }

    /// The agent's own time for this session's `create_kernels` and `destroy_kernel` (and, for
    /// the Python agent, the steps of its `create_kernel` that its log names).
    fn rpc_times(&self, before: &RpcMarks, kernel_id: &str) -> anyhow::Result<AgentTimes> {
        match self {
            RunningAgent::Bai(_) => {
                let after = self.rpc_marks()?;
                // All the calls of the session: the manager sends `destroy_kernel` again when the
                // session is still TERMINATING at its next scheduling pass.
                let calls = |method: &str| -> anyhow::Result<(Duration, u32)> {
                    let (sum0, count0) = before.get(method).copied().unwrap_or_default();
                    let (sum1, count1) = after.get(method).copied().unwrap_or_default();
                    ensure!(count1 > count0, "bai-agent handled no {method} call in the session");
                    Ok((Duration::from_secs_f64(sum1 - sum0), (count1 - count0) as u32))
                };
                let (create, creates) = calls("create_kernels")?;
                ensure!(creates == 1, "bai-agent handled {creates} create_kernels calls in one session");
                let (destroy, destroys) = calls("destroy_kernel")?;
                Ok(AgentTimes { create, destroy, destroys, create_steps: None })
            }
            RunningAgent::Python(agent) => {
                let kernel = format!("create_kernel(kernel:{kernel_id}");
                let create = agent.log_marks(&[
                    &[&format!("rpc::create_kernel(k:{kernel_id}")],
                    &[&kernel, ") starting container"],
                    &[&kernel, ") container started"],
                    &[&kernel, ") service apps initialized"],
                    &[&kernel, ") done"],
                ])?;
                let destroy = agent.log_marks(&[
                    &[&format!("rpc::destroy_kernel(k:{kernel_id})")],
                    &[&format!("Kernel {kernel_id} destroyed")],
                ])?;
                let destroys = agent.log_count(&format!("rpc::destroy_kernel(k:{kernel_id})"));
                let steps: Vec<Duration> = create.windows(2).map(|pair| span(pair[0], pair[1])).collect();
                Ok(AgentTimes {
                    create: span(create[0], create[4]),
                    destroy: span(destroy[0], destroy[1]),
                    destroys,
                    create_steps: steps.try_into().ok(),
                })
            }
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            RunningAgent::Bai(agent) => {
                let status = agent.stop()?;
                ensure!(status.success(), "bai-agent ended with {status}");
            }
            RunningAgent::Python(agent) => agent.stop()?,
        }
        Ok(())
    }
}

/// The Python agent (`backend.ai ag start-server`) in a process group of its own, on the
/// installer's `agent.toml`; stopped (SIGTERM to the group, then SIGKILL) when dropped, its
/// socket-relay container removed.
struct PythonAgent {
    child: Option<Child>,
    id: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PythonAgent {
    fn start(plane: &ControlPlane, id: &str) -> anyhow::Result<PythonAgent> {
        let install =
            std::env::var_os("BAI_TEST_BACKENDAI_INSTALL").map(PathBuf::from).context("BAI_TEST_BACKENDAI_INSTALL")?;
        let template_path = agent_template(&install);
        let template =
            std::fs::read_to_string(&template_path).with_context(|| format!("reading {}", template_path.display()))?;
        let dir = tempfile::Builder::new().prefix("bai-bench-python-agent-").tempdir()?;
        let etcd_port = plane.etcd_addr.rsplit(':').next().context("etcd port")?;
        let config = python_agent_toml(&template, dir.path(), id, etcd_port)?;
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.path().join("agent.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(plane.venv().join("bin/backend.ai"))
            .args(["ag", "start-server", "-f"])
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .context("starting backend.ai ag start-server")?;
        Ok(PythonAgent { child: Some(child), id: id.to_owned(), log, _dir: dir })
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let group = i32::try_from(child.id())?;
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Whatever is left of the group (and the leader, if it did not stop).
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = child.wait();
        // What the agent leaves on the engine: its socket relay, and (after a failed run) kernels.
        let _ = Command::new("docker").args(["rm", "-f", &format!("backendai-socket-relay.{}", self.id)]).output();
        bai_agent_tests::remove_agent_containers(&self.id);
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("the Python agent ended with {status}"),
            None => bail!("the Python agent did not stop within 30 s of SIGTERM"),
        }
    }

    /// The times (ms since midnight, the log's own `YYYY-MM-DD HH:MM:SS.mmm …`) of a run of
    /// log lines: the first line holding every string of `marks[0]`, then the first after it
    /// holding every string of `marks[1]`, and so on. The log is written a little after the
    /// fact, so it is read again for a while.
    /// How many lines of the log hold `needle`.
    fn log_count(&self, needle: &str) -> u32 {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|line| line.contains(needle)).count() as u32
    }

    fn log_marks(&self, marks: &[&[&str]]) -> anyhow::Result<Vec<f64>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let mut lines = text.lines();
            let times: Vec<f64> = marks
                .iter()
                .map_while(|needles| {
                    lines.by_ref().find(|line| needles.iter().all(|needle| line.contains(needle))).and_then(log_time)
                })
                .collect();
            if times.len() == marks.len() {
                return Ok(times);
            }
            ensure!(
                Instant::now() < deadline,
                "the Python agent's log has no line with {:?} (after {:?})",
                marks[times.len()],
                &marks[..times.len()]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for PythonAgent {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("stopping the Python agent: {err:#}");
        }
    }
}

/// From one log time to a later one (ms since midnight; across midnight the clock starts again).
fn span(from: f64, to: f64) -> Duration {
    let day = 86_400_000.0;
    Duration::from_secs_f64(((to - from + day) % day) / 1e3)
}

/// Milliseconds since midnight of a log line `YYYY-MM-DD HH:MM:SS.mmm …`.
fn log_time(line: &str) -> Option<f64> {
    let clock = line.split_whitespace().nth(1)?;
    let mut parts = clock.split(':');
    let (h, m, s) =
        (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    Some(((h * 60.0 + m) * 60.0 + s) * 1e3)
}

/// The installer's `agent.toml` with what `install/context.py` substitutes (the etcd and RPC
/// ports, the ipc and var directories, the mount path) and what a second agent on one host
/// needs apart (every port free and on 127.0.0.1, the id, paths in `dir`), plus
/// `[debug] enabled = false` and uncoloured logs. Each line must be found exactly once.
fn python_agent_toml(template: &str, dir: &Path, id: &str, etcd_port: &str) -> anyhow::Result<String> {
    let d = dir.display();
    let [rpc, service, sock, watcher, termui, webui, metadata] = free_ports::<7>()?;
    let replacements: Vec<(&str, String)> = vec![
        (
            "addr = { host = \"127.0.0.1\", port = 8120 }",
            format!("addr = {{ host = \"127.0.0.1\", port = {etcd_port} }}"),
        ),
        (
            "rpc-listen-addr = { host = \"127.0.0.1\", port = 6001 }",
            format!("rpc-listen-addr = {{ host = \"127.0.0.1\", port = {rpc} }}"),
        ),
        (
            "service-addr = { host = \"0.0.0.0\", port = 6003 }",
            format!(
                "service-addr = {{ host = \"127.0.0.1\", port = {service} }}\nid = \"{id}\"\n\
                 aiomonitor-termui-port = {termui}\naiomonitor-webui-port = {webui}\n\
                 metadata-server-bind-host = \"127.0.0.1\"\nmetadata-server-port = {metadata}"
            ),
        ),
        ("agent-sock-port = 6007", format!("agent-sock-port = {sock}")),
        ("pid-file = \"./agent.pid\"", format!("pid-file = \"{d}/agent.pid\"")),
        ("# ipc-base-path = \"/tmp/backend.ai/ipc\"", format!("ipc-base-path = \"{d}/ipc\"")),
        ("var-base-path = \"./var/lib/backend.ai\"", format!("var-base-path = \"{d}/var\"")),
        ("image-commit-path = \"./tmp/backend.ai/commit/\"", format!("image-commit-path = \"{d}/commit/\"")),
        ("mount-path = \"./vfroot/local\"", format!("mount-path = \"{d}/vfroot/local\"")),
        ("port-range = [30000, 31000]", format!("port-range = [{PYTHON_FIRST_PORT}, {}]", PYTHON_FIRST_PORT + 99)),
        ("scratch-root = \"./scratches\"", format!("scratch-root = \"{d}/scratches\"")),
        (
            "service-addr = { host = \"127.0.0.1\", port = 6009 }",
            format!("service-addr = {{ host = \"127.0.0.1\", port = {watcher} }}"),
        ),
        ("colored = true", "colored = false".to_owned()),
        ("path = \"./logs\"", format!("path = \"{d}/logs\"")),
        // The only `enabled = true` of the template: `[debug]`.
        ("enabled = true", "enabled = false".to_owned()),
    ];
    let mut lines: Vec<String> = template.lines().map(str::to_owned).collect();
    for (from, to) in replacements {
        let found: Vec<usize> =
            lines.iter().enumerate().filter(|(_, line)| line.trim() == from).map(|(i, _)| i).collect();
        let [index] = found[..] else {
            bail!("the agent.toml template has {} lines `{from}`, not one; the template changed", found.len());
        };
        lines[index] = to;
    }
    for sub in ["ipc", "var", "commit", "vfroot/local", "scratches", "logs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    Ok(lines.join("\n") + "\n")
}

/// The pids of `root` and all its descendants (from each process's parent in `/proc/*/stat`).
fn process_tree(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // After the command name (which may hold spaces and parentheses): state, ppid, …
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        else {
            continue;
        };
        children.entry(ppid).or_default().push(pid);
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        tree.extend(children.get(&tree[next]).into_iter().flatten().copied());
        next += 1;
    }
    tree
}

/// utime + stime + cutime + cstime of one process (`/proc/PID/stat`, clock ticks): its own
/// threads, dead ones included, and the children it waited for.
fn process_cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    // Fields 14–17 of stat(5); `rest` starts at field 3.
    rest.split_whitespace().skip(11).take(4).filter_map(|v| v.parse::<u64>().ok()).sum()
}

/// The CPU time of `root`'s process tree so far.
fn tree_cpu(root: u32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = process_tree(root).into_iter().map(process_cpu_ticks).sum();
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// An agent's CPU time two ways: utime + stime of its process tree from `/proc` (clock ticks,
/// 10 ms), and `cpuacct.usage` of a cgroup of the bench's own that the tree is moved into at
/// start (nanoseconds, every thread and child that lived in it; what it used before the move
/// is not in it, so only differences count).
struct CpuMeter {
    root: u32,
    account: CpuAccount,
}

#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    proc: Duration,
    exact: Duration,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu { proc: self.proc.saturating_sub(earlier.proc), exact: self.exact.saturating_sub(earlier.exact) }
    }
}

impl CpuMeter {
    fn start(kind: Kind, root: u32) -> anyhow::Result<CpuMeter> {
        let account = CpuAccount::create(&format!("backendai-{}", kind.tag()))?;
        for pid in process_tree(root) {
            account.adopt(pid).with_context(|| format!("moving pid {pid} into the bench's cpuacct cgroup"))?;
        }
        Ok(CpuMeter { root, account })
    }

    fn read(&self) -> anyhow::Result<Cpu> {
        Ok(Cpu { proc: tree_cpu(self.root), exact: self.account.usage()? })
    }
}

/// `Pss` of a process (`/proc/PID/smaps_rollup`), KiB; 0 when it is gone.
fn proportional_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Samples the memory of a process tree every [`SAMPLE_EVERY`] in a thread: the sums of its
/// processes' `VmRSS` and of their `Pss` (`/proc/PID/smaps_rollup`: a page shared by n of them
/// counts 1/n in each, so the sum counts it once), KiB.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, u64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(root: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let tree = process_tree(root);
                    let rss: u64 = tree.iter().map(|pid| resident_kib(*pid).0).sum();
                    let pss: u64 = tree.iter().map(|pid| proportional_kib(*pid)).sum();
                    if let Ok(mut samples) = samples.lock() {
                        samples.push((Instant::now(), rss, pss));
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        Sampler { stop, samples, thread: Some(thread) }
    }

    /// The (RSS, PSS) samples taken since `since`.
    fn since(&self, since: Instant) -> Vec<(u64, u64)> {
        self.samples
            .lock()
            .map(|samples| {
                samples
                    .iter()
                    .filter(|(at, rss, _)| *at >= since && *rss > 0)
                    .map(|(_, rss, pss)| (*rss, *pss))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or_default()
}

/// min, median (the lower middle of an even count) and max.
fn spread(values: &[f64]) -> [f64; 3] {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.get(sorted.len().saturating_sub(1) / 2), sorted.last()) {
        (Some(min), Some(mid), Some(max)) => [*min, *mid, *max],
        _ => [f64::NAN; 3],
    }
}

fn print_tables(bai: &AgentResult, python: &AgentResult, sessions: usize) {
    let secs = |pick: fn(&SessionTimes) -> Duration, r: &AgentResult| -> Vec<f64> {
        r.sessions.iter().map(|s| pick(s).as_secs_f64()).collect()
    };
    let row = |name: &str, decimals: usize, scale: f64, a: Vec<f64>, b: Vec<f64>| {
        let cells: Vec<String> =
            spread(&a).into_iter().chain(spread(&b)).map(|v| format!("{:.*}", decimals, v * scale)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    let all = |pick: fn(&SessionTimes) -> &Vec<Duration>, r: &AgentResult| -> Vec<f64> {
        r.sessions.iter().flat_map(|s| pick(s).iter().map(Duration::as_secs_f64)).collect()
    };
    println!();
    println!("| metric (per session unless said) | bai-agent min | median | max | Python agent min | median | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    row("`session create` → RUNNING, CLI wall, s", 2, 1.0, secs(|s| s.create_cli, bai), secs(|s| s.create_cli, python));
    row(
        "… manager's PENDING → RUNNING (status history), s",
        2,
        1.0,
        secs(|s| s.create_manager, bai),
        secs(|s| s.create_manager, python),
    );
    row("… agent's own `create_kernels`, s", 3, 1.0, secs(|s| s.create_agent, bai), secs(|s| s.create_agent, python));
    row(
        "query `print(1)` round trip, client SDK in one process, ms",
        1,
        1e3,
        all(|s| &s.queries, bai),
        all(|s| &s.queries, python),
    );
    row("`run -c 'print(1)'`, CLI wall, s", 2, 1.0, all(|s| &s.cli_runs, bai), all(|s| &s.cli_runs, python));
    row("`session destroy`, CLI wall, s", 2, 1.0, secs(|s| s.destroy_cli, bai), secs(|s| s.destroy_cli, python));
    row(
        "`session destroy` → TERMINATED and no container, s",
        2,
        1.0,
        secs(|s| s.destroy_done, bai),
        secs(|s| s.destroy_done, python),
    );
    row(
        "… manager's TERMINATING → TERMINATED, s",
        2,
        1.0,
        secs(|s| s.destroy_manager, bai),
        secs(|s| s.destroy_manager, python),
    );
    row("… agent's own `destroy_kernel`, s", 3, 1.0, secs(|s| s.destroy_agent, bai), secs(|s| s.destroy_agent, python));
    let calls = |r: &AgentResult| r.sessions.iter().map(|s| f64::from(s.destroy_calls)).collect::<Vec<_>>();
    row("… `destroy_kernel` calls the manager made", 0, 1.0, calls(bai), calls(python));
    row(
        "agent CPU per session (create → destroyed), `/proc` utime+stime, ms",
        0,
        1e3,
        secs(|s| s.cpu.proc, bai),
        secs(|s| s.cpu.proc, python),
    );
    row(
        "… the same from the agent's cpuacct cgroup (ns), ms",
        1,
        1e3,
        secs(|s| s.cpu.exact, bai),
        secs(|s| s.cpu.exact, python),
    );
    let mib = |kib: &[u64]| kib.iter().map(|kib| *kib as f64 / 1024.0).collect::<Vec<_>>();
    row(
        "agent RSS (process tree, every 250 ms during the sessions), MiB",
        1,
        1.0,
        mib(&bai.rss_kib),
        mib(&python.rss_kib),
    );
    row("… PSS (shared pages counted once), MiB", 1, 1.0, mib(&bai.pss_kib), mib(&python.pss_kib));

    println!();
    println!("| median step of `session create` (manager's status history), s | bai-agent | Python agent |");
    println!("|---|---:|---:|");
    let steps = [
        "PENDING → SCHEDULED",
        "SCHEDULED → PREPARED (image check on the agent)",
        "PREPARED → kernel RUNNING (`create_kernels`)",
        "kernel RUNNING → session RUNNING",
    ];
    for (index, step) in steps.iter().enumerate() {
        let med = |r: &AgentResult| {
            spread(&r.sessions.iter().map(|s| s.create_steps[index].as_secs_f64()).collect::<Vec<_>>())[1]
        };
        println!("| {step} | {:.2} | {:.2} |", med(bai), med(python));
    }

    println!();
    println!("| the Python agent's `create_kernel`, by its log, s | min | median | max |");
    println!("|---|---:|---:|---:|");
    let python_steps = [
        "RPC in → `starting container` (resource spec, scratch, SSH keypair, mounts)",
        "`starting container` → `container started` (the engine's create and start)",
        "`container started` → `service apps initialized` (waiting for its kernel runner)",
        "→ `done`",
    ];
    for (index, step) in python_steps.iter().enumerate() {
        let values: Vec<f64> =
            python.sessions.iter().filter_map(|s| Some(s.python_create_steps?[index].as_secs_f64())).collect();
        let [min, mid, max] = spread(&values);
        println!("| {step} | {min:.3} | {mid:.3} | {max:.3} |");
    }

    println!();
    println!("| whole run | bai-agent | Python agent |");
    println!("|---|---:|---:|");
    let pair = |name: &str, f: &dyn Fn(&AgentResult) -> String| println!("| {name} | {} | {} |", f(bai), f(python));
    pair("start-up: spawn → ALIVE in the manager, s", &|r| format!("{:.1}", r.startup.as_secs_f64()));
    pair("start-up CPU, s", &|r| format!("{:.2}", r.startup_cpu.as_secs_f64()));
    pair(&format!("CPU idle ({} s after the warm-up), cpuacct (`/proc`), ms per s", IDLE.as_secs()), &|r| {
        let per_s = |cpu: Duration| cpu.as_secs_f64() * 1e3 / IDLE.as_secs_f64();
        format!("{:.2} ({:.1})", per_s(r.idle_cpu.exact), per_s(r.idle_cpu.proc))
    });
    pair(&format!("CPU over the {sessions} sessions, cpuacct (`/proc`), s"), &|r| {
        format!("{:.3} ({:.2})", r.sessions_cpu.exact.as_secs_f64(), r.sessions_cpu.proc.as_secs_f64())
    });
    pair("… % of one core over those sessions' wall time", &|r| {
        format!("{:.2}", r.sessions_cpu.exact.as_secs_f64() / r.sessions_wall.as_secs_f64().max(1e-9) * 100.0)
    });
    pair("CPU over the whole run (spawn → stop), s", &|r| format!("{:.2}", r.total_cpu.as_secs_f64()));
    pair("peak RSS: sum of VmHWM over the tree at the end, MiB", &|r| format!("{:.1}", r.hwm_kib as f64 / 1024.0));
    pair("processes in the tree", &|r| r.processes.to_string());
    pair("1-minute load average, start → end", &|r| r.load.clone());
}
