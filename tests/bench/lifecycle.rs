//! `bench-lifecycle`: how long the agent takes to bring a kernel up, against Docker doing
//! the same by itself, and what one RPC round trip costs, against raw ZeroMQ.
//!
//! 1. Kernel start: `create_kernels` (one busybox kernel, cpu 1, 256 MiB, shmem 64m) timed
//!    from sending the request until its reply (the agent answers once the container is
//!    started), against `docker run -d` with the options the agent asks the engine for, and
//!    against the agent's own Engine API call (`create_and_start` with the same spec,
//!    in-process): the floor of what the agent does. Interleaved, round after round;
//!    clean-up (`destroy_kernel`, `docker rm -f`) is not timed.
//! 2. RPC round trip: sequential `ping` calls through [`RpcClient`], against a ROUTER that
//!    echoes the same frames back to a bare DEALER (transport alone), interleaved in blocks.
//!
//! Usage: `bench-lifecycle [ROUNDS] [PINGS]` (defaults 30 and 5000).

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use bai_agent::{
    docker::{DockerClient, containers::ContainerSpec},
    kernel,
    rpc::{client::RpcClient, codec::Message, server::UPPER},
};
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE,
    bench::{Summary, load_average, machine_description, ms, us},
    free_loopback_port, require_environment, unique,
};
use bytes::Bytes;
use rmpv::Value;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Untimed rounds first: the agent connects to the engine on its first kernel, and caches
/// (page cache, the CLI's binary, dockerd's image metadata) warm up.
const WARM_UP_ROUNDS: usize = 2;
const PING_WARM_UP: usize = 200;
/// The timed pings of each path run in this many alternating blocks.
const PING_BLOCKS: usize = 5;
/// The agent's host port pool (clear of the 41000-range of the integration tests).
const FIRST_PORT: u16 = 23100;
/// A pause before each timed start, so that the engine's clean-up of the previous
/// container is not charged to the next one.
const SETTLE: Duration = Duration::from_millis(250);
const MEM_BYTES: u64 = 256 << 20;
/// The container ports the agent publishes for a busybox kernel: the REPL pair, the built-in
/// sshd and ttyd, and the image's `http` service.
const KERNEL_PORTS: [u16; 5] = [2000, 2001, 2200, 7681, 8080];
/// The kernel runner the agent mounts (its default `[kernel-runner] path`).
const KRUNNER: &str = "/opt/bai-agent/bin/bai-krunner";

fn main() -> anyhow::Result<()> {
    let usage = "usage: bench-lifecycle [ROUNDS] [PINGS]";
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(30);
    let pings: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(5000);
    ensure!(rounds > 0 && pings >= PING_BLOCKS, "{usage}: ROUNDS > 0, PINGS >= {PING_BLOCKS}");
    require_environment();
    // The agent as it runs in production: `info` logging (the support crate configures
    // `debug`, which writes a line per RPC request). RUST_LOG wins over the config.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "info") };
    }

    let load_before = load_average();
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(&format!(
        "[container]\nscratch-root = \"{}\"\nmount-root = \"{}\"\nport-range = [{FIRST_PORT}, {}]\n\
         port-cooldown = \"1s\"\n\n[resource]\nreserved-cpu = 0\nreserved-mem = \"512m\"\n\n\
         [debug]\nheartbeat-interval = \"60s\"\n",
        dir.path().join("scratch").display(),
        dir.path().join("vfolders").display(),
        FIRST_PORT + 39,
    ))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (starts, pings) = runtime.block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await?;
        let starts = kernel_starts(&client, &agent, dir.path(), rounds).await?;
        let pings = round_trips(&client, pings).await?;
        anyhow::Ok((starts, pings))
    })?;

    println!("Kernel lifecycle and RPC, {}", machine_description()?);
    println!();
    println!("Load average (1 min) before: {load_before}, after: {}", load_average());
    println!();
    println!(
        "Kernel start, {rounds} rounds interleaved (agent, docker run, Engine API) after {WARM_UP_ROUNDS} untimed, \
         image {BUSYBOX_IMAGE}, cpu 1, mem 256 MiB, shm 64 MiB:"
    );
    println!();
    println!("| path | runs | p50 ms | p90 ms | mean ms | min ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, samples) in [
        ("agent: `create_kernels` RPC until its reply (container running)", &starts.agent),
        ("`docker run -d` with the agent's options, until it returns", &starts.docker_run),
        ("Engine API create + start, in-process (the agent's own `create_and_start`)", &starts.engine_api),
    ] {
        let s = Summary::of(samples);
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            samples.len(),
            ms(s.p50),
            ms(s.p90),
            ms(s.mean),
            ms(s.min),
            ms(s.max)
        );
    }
    let (agent_p50, docker_p50, engine_p50) =
        (Summary::of(&starts.agent).p50, Summary::of(&starts.docker_run).p50, Summary::of(&starts.engine_api).p50);
    println!();
    println!(
        "Agent over `docker run -d` at p50: {:+.1} % (target: under +15 %); agent over the bare Engine API calls at \
         p50: {:+.1} ms",
        (agent_p50.as_secs_f64() / docker_p50.as_secs_f64() - 1.0) * 100.0,
        ms(agent_p50) - ms(engine_p50)
    );
    println!();
    println!("Where the agent's time goes, from the emission times of its lifecycle events (same rounds):");
    println!();
    println!("| phase of `create_kernels` | p50 ms | p90 ms | mean ms |");
    println!("|---|---:|---:|---:|");
    for (name, samples) in PHASES.iter().zip(&starts.phases) {
        let s = Summary::of(samples);
        println!("| {name} | {:.1} | {:.1} | {:.1} |", ms(s.p50), ms(s.p90), ms(s.mean));
    }
    println!();
    println!(
        "RPC round trip over loopback, {} sequential calls per path after {PING_WARM_UP} untimed, in {PING_BLOCKS} \
         alternating blocks:",
        pings.agent.len()
    );
    println!();
    println!("| path | calls | p50 µs | p90 µs | p99 µs | mean µs | max µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, samples) in [
        ("agent: `ping` through `RpcClient` (callosum framing, msgpack, snappy, dispatch)", &pings.agent),
        ("raw ZeroMQ: DEALER → ROUTER echo of the same three frames", &pings.raw),
    ] {
        let s = Summary::of(samples);
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            samples.len(),
            us(s.p50),
            us(s.p90),
            us(s.p99),
            us(s.mean),
            us(s.max)
        );
    }
    println!();
    println!("Agent `ping` p50: {:.3} ms (target: under 0.5 ms)", ms(Summary::of(&pings.agent).p50));
    drop(agent);
    Ok(())
}

struct Starts {
    agent: Vec<Duration>,
    /// The agent's time by [`PHASES`].
    phases: [Vec<Duration>; 4],
    docker_run: Vec<Duration>,
    engine_api: Vec<Duration>,
}

async fn kernel_starts(client: &RpcClient, agent: &Agent, dir: &Path, rounds: usize) -> anyhow::Result<Starts> {
    let engine = DockerClient::connect(None, "bench-engine-api").await?;
    let mut starts =
        Starts { agent: Vec::new(), phases: Default::default(), docker_run: Vec::new(), engine_api: Vec::new() };
    for round in 0..WARM_UP_ROUNDS + rounds {
        let timed = round >= WARM_UP_ROUNDS;
        let (agent_took, phases) = agent_start(client, agent).await?;
        let docker_took = docker_run(dir)?;
        let engine_took = engine_api_start(&engine, dir).await?;
        if timed {
            starts.agent.push(agent_took);
            for (samples, took) in starts.phases.iter_mut().zip(phases) {
                samples.push(took);
            }
            starts.docker_run.push(docker_took);
            starts.engine_api.push(engine_took);
        }
        let which = if timed {
            format!("round {}/{rounds}", round - WARM_UP_ROUNDS + 1)
        } else {
            format!("warm-up {}/{WARM_UP_ROUNDS}", round + 1)
        };
        eprintln!(
            "bench-lifecycle: {which}: agent {:.1} ms, docker run {:.1} ms, Engine API {:.1} ms",
            ms(agent_took),
            ms(docker_took),
            ms(engine_took)
        );
    }
    Ok(starts)
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    value.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name))).map(|(_, v)| v).unwrap_or(&Value::Nil)
}

/// One kernel through the RPC as the manager asks for it (tests/lifecycle.rs's config);
/// timed until `create_kernels` answers, then destroyed (untimed; the reply comes after
/// the container is removed).
async fn agent_start(client: &RpcClient, agent: &Agent) -> anyhow::Result<(Duration, [Duration; 4])> {
    let (session, kernel) = (unique("session"), unique("kernel"));
    let config = map(vec![
        ("image", map(vec![("canonical", BUSYBOX_IMAGE.into()), ("digest", "".into()), ("labels", map(vec![]))])),
        ("resource_slots", map(vec![("cpu", "1".into()), ("mem", MEM_BYTES.to_string().into())])),
        ("resource_opts", map(vec![("shmem", "64m".into())])),
        ("environ", map(vec![("GREETING", "hello".into())])),
        ("owner_user_id", "user-1".into()),
        ("owner_project_id", "project-1".into()),
    ]);
    let args = vec![
        session.as_str().into(),
        Value::Array(vec![kernel.as_str().into()]),
        Value::Array(vec![config]),
        map(vec![("mode", "single-node".into()), ("size", 1.into())]),
        map(vec![]),
    ];
    tokio::time::sleep(SETTLE).await;
    let sent = SystemTime::now();
    let started = Instant::now();
    let created = client.call("create_kernels", args, vec![]).await;
    let took = started.elapsed();
    let replied = SystemTime::now();
    let created = created.with_context(|| format!("create_kernels; agent log:\n{}", agent.log_text()))?;
    let container = created
        .as_array()
        .and_then(|infos| infos.first())
        .and_then(|info| field(info, "container_id").as_str())
        .context("create_kernels returned no container id")?
        .to_owned();
    ensure!(container_running(&container), "the agent's container {container} is not running after create_kernels");
    let phases = phases(agent, sent, replied).await?;
    client
        .call("destroy_kernel", vec![kernel.as_str().into(), session.as_str().into(), "user-requested".into()], vec![])
        .await
        .context("destroy_kernel")?;
    ensure!(!container_exists(&container), "the agent's container {container} is still there after destroy_kernel");
    Ok((took, phases))
}

/// The lifecycle events of one `create_kernels`, by name, in order.
const PHASE_EVENTS: [&str; 3] = ["kernel_preparing", "kernel_creating", "kernel_started"];
/// What the agent does between one mark and the next (agent/src/kernel/mod.rs).
const PHASES: [&str; 4] = [
    "request sent → `kernel_preparing` (RPC in, dispatch, config parsed, registry saved)",
    "`kernel_preparing` → `kernel_creating` (image checked on the engine, registry saved)",
    "`kernel_creating` → `kernel_started` (allocation, registry saved, scratch written, container created and \
     started, registry saved)",
    "`kernel_started` → reply received (RPC out)",
];

/// Where the time of one `create_kernels` went, from the emission times of its events in
/// the agent's journal (`events.jsonl`, `ts_us`, written asynchronously: polled for here).
async fn phases(agent: &Agent, sent: SystemTime, replied: SystemTime) -> anyhow::Result<[Duration; 4]> {
    let path = agent.journal_dir.join("events.jsonl");
    let since = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64;
    let (sent_us, replied_us) = (since(sent), since(replied));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let events: Vec<(String, u64)> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|v| Some((v.get("name")?.as_str()?.to_owned(), v.get("ts_us")?.as_u64()?)))
            .filter(|(_, ts)| *ts >= sent_us)
            .collect();
        // Rounds run one at a time, so the events since the request are this kernel's.
        let marks: Vec<u64> =
            PHASE_EVENTS.iter().filter_map(|name| events.iter().find(|(n, _)| n == name).map(|(_, ts)| *ts)).collect();
        if let [preparing, creating, started] = marks[..] {
            let span = |from: u64, to: u64| Duration::from_micros(to.saturating_sub(from));
            return Ok([
                span(sent_us, preparing),
                span(preparing, creating),
                span(creating, started),
                span(started, replied_us),
            ]);
        }
        if Instant::now() > deadline {
            bail!("the journal {} has no {PHASE_EVENTS:?} after the request", path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scratch directory like the agent's (`work/`, `config/`) for a baseline container.
fn baseline_scratch(dir: &Path) -> anyhow::Result<(tempfile::TempDir, String, String)> {
    let scratch = tempfile::tempdir_in(dir)?;
    let (work, config) = (scratch.path().join("work"), scratch.path().join("config"));
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("environ.txt"), "GREETING=hello\n")?;
    Ok((scratch, work.display().to_string(), config.display().to_string()))
}

/// The labels and environment the agent gives a kernel, under an agent id of their own
/// (so that the running agent leaves these containers alone).
fn baseline_labels_and_env(kernel: &str) -> (Vec<(String, String)>, Vec<String>) {
    let labels = vec![
        ("ai.backend.agent-id".to_owned(), "bench-baseline".to_owned()),
        ("ai.backend.kernel-id".to_owned(), kernel.to_owned()),
        ("ai.backend.session-id".to_owned(), format!("session-of-{kernel}")),
        ("ai.backend.owner-user-id".to_owned(), "user-1".to_owned()),
        ("ai.backend.owner-project-id".to_owned(), "project-1".to_owned()),
        ("ai.backend.internal.block-service-ports".to_owned(), "0".to_owned()),
    ];
    let env = vec![
        "GREETING=hello".to_owned(),
        format!("BACKENDAI_KERNEL_ID={kernel}"),
        format!("BACKENDAI_SESSION_ID=session-of-{kernel}"),
        "BACKENDAI_AGENT_ID=bench-baseline".to_owned(),
    ];
    (labels, env)
}

/// `docker run -d` with what the agent asks the engine for (agent/src/docker/containers.rs
/// `create_and_start`, agent/src/kernel/mod.rs `container_spec`), timed until it returns
/// (after the start); then `docker rm -f`, untimed.
fn docker_run(dir: &Path) -> anyhow::Result<Duration> {
    let kernel = unique("docker-run");
    let (_scratch, work, config) = baseline_scratch(dir)?;
    let (labels, env) = baseline_labels_and_env(&kernel);
    let host_ports = free_ports(KERNEL_PORTS.len())?;
    let mut cmd = Command::new("docker");
    cmd.args(["run", "-d", "--name", &format!("bench.{kernel}")]);
    for (key, value) in &labels {
        cmd.args(["--label", &format!("{key}={value}")]);
    }
    for entry in &env {
        cmd.args(["-e", entry]);
    }
    cmd.args([
        "--memory",
        "256m",
        "--memory-swap",
        "256m",
        "--cpuset-cpus",
        "0",
        "--shm-size",
        "64m",
        "--security-opt",
        "no-new-privileges",
        "--pids-limit",
        "4096",
        "-v",
        &format!("{KRUNNER}:{}:ro", kernel::KRUNNER_MOUNT),
        "--entrypoint",
        kernel::KRUNNER_MOUNT,
        "-v",
        &format!("{work}:/home/work"),
        "-v",
        &format!("{config}:/home/config:ro"),
        "-w",
        "/home/work",
        "--init",
        "-t",
        "-i",
    ]);
    for (container_port, host_port) in KERNEL_PORTS.iter().zip(&host_ports) {
        cmd.args(["-p", &format!("127.0.0.1:{host_port}:{container_port}")]);
    }
    cmd.arg(BUSYBOX_IMAGE);
    std::thread::sleep(SETTLE);
    let started = Instant::now();
    let out = cmd.output().context("running docker")?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!("docker run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let container = String::from_utf8(out.stdout)?.trim().to_owned();
    let running = container_running(&container);
    let removed = Command::new("docker").args(["rm", "-f", &container]).output()?;
    ensure!(running, "the `docker run -d` container {container} is not running after it returned");
    ensure!(removed.status.success(), "docker rm -f failed: {}", String::from_utf8_lossy(&removed.stderr));
    Ok(took)
}

/// The agent's own Engine API calls (create, then start) with the spec it would build, in
/// this process: what `create_kernels` costs without the RPC, bookkeeping and scratch.
async fn engine_api_start(engine: &DockerClient, dir: &Path) -> anyhow::Result<Duration> {
    let kernel = unique("engine-api");
    let (_scratch, work, config) = baseline_scratch(dir)?;
    let (labels, env) = baseline_labels_and_env(&kernel);
    let spec = ContainerSpec {
        name: format!("bench.{kernel}"),
        image: BUSYBOX_IMAGE.to_owned(),
        labels: labels.into_iter().collect(),
        env,
        entrypoint: Some(vec![kernel::KRUNNER_MOUNT.to_owned()]),
        cmd: None,
        cpuset: "0".to_owned(),
        memory_bytes: MEM_BYTES as i64,
        shm_bytes: Some(64 << 20),
        pids_limit: 4096,
        binds: vec![
            format!("{work}:/home/work"),
            format!("{config}:/home/config:ro"),
            format!("{KRUNNER}:{}:ro", kernel::KRUNNER_MOUNT),
        ],
        ports: KERNEL_PORTS.iter().copied().zip(free_ports(KERNEL_PORTS.len())?).collect(),
        bind_host: "127.0.0.1".to_owned(),
        working_dir: Some("/home/work".to_owned()),
        network: None,
        hostname: None,
        cgroup_parent: None,
        cap_drop: Vec::new(),
        devices: Vec::new(),
        device_requests: Vec::new(),
    };
    tokio::time::sleep(SETTLE).await;
    let started = Instant::now();
    let container = engine.create_and_start(&spec).await;
    let took = started.elapsed();
    let container = container?;
    let running = container_running(&container);
    engine.remove_container(&container).await?;
    ensure!(running, "the Engine API container {container} is not running after its start");
    ensure!(!container_exists(&container), "the Engine API container {container} is still there after its removal");
    Ok(took)
}

/// Distinct free loopback ports for a baseline container's published ports.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_loopback_port()?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}
fn container_running(container: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", container])
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "true")
}

fn container_exists(container: &str) -> bool {
    Command::new("docker").args(["inspect", container]).output().is_ok_and(|out| out.status.success())
}

struct RoundTrips {
    agent: Vec<Duration>,
    raw: Vec<Duration>,
}

async fn round_trips(client: &RpcClient, pings: usize) -> anyhow::Result<RoundTrips> {
    let endpoint = start_echo_router()?;
    let mut dealer = DealerSocket::new();
    dealer.connect(&endpoint).await?;
    // Exactly the frames `RpcClient` sends for `ping("hi")`: the same bytes on the wire.
    let (header, body) = Message::request("ping", Value::from(""), 0, vec![Value::from("hi")], vec![]).encode()?;
    let frames = vec![Bytes::from_static(UPPER), Bytes::from(header), Bytes::from(body)];

    let mut result = RoundTrips { agent: Vec::with_capacity(pings), raw: Vec::with_capacity(pings) };
    for _ in 0..PING_WARM_UP {
        agent_ping(client).await?;
        raw_echo(&mut dealer, &frames).await?;
    }
    let per_block = pings / PING_BLOCKS;
    for _ in 0..PING_BLOCKS {
        for _ in 0..per_block {
            result.agent.push(agent_ping(client).await?);
        }
        for _ in 0..per_block {
            result.raw.push(raw_echo(&mut dealer, &frames).await?);
        }
    }
    Ok(result)
}

async fn agent_ping(client: &RpcClient) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let answer = client.call("ping", vec![Value::from("hi")], vec![]).await?;
    let took = started.elapsed();
    ensure!(answer.as_str() == Some("hi"), "ping answered {answer}");
    Ok(took)
}

async fn raw_echo(dealer: &mut DealerSocket, frames: &[Bytes]) -> anyhow::Result<Duration> {
    let message = ZmqMessage::try_from(frames.to_vec()).map_err(|_| anyhow::anyhow!("an empty message"))?;
    let started = Instant::now();
    dealer.send(message).await?;
    let answer = dealer.recv().await?;
    let took = started.elapsed();
    ensure!(answer.len() == frames.len(), "the echo came back with {} frames", answer.len());
    Ok(took)
}

/// A ROUTER on 127.0.0.1 that sends every message back to its sender, on a thread and
/// runtime of its own (two workers, like the agent's); lives until the process ends.
fn start_echo_router() -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                let _ = tx.send(Err(anyhow::Error::from(err)));
                return;
            }
        };
        runtime.block_on(async move {
            let mut router = RouterSocket::new();
            match router.bind("tcp://127.0.0.1:0").await {
                Ok(endpoint) => {
                    let _ = tx.send(Ok(endpoint.to_string()));
                }
                Err(err) => {
                    let _ = tx.send(Err(anyhow::Error::from(err)));
                    return;
                }
            }
            // [peer identity, frames…] in, the same out: ROUTER routes by the first frame.
            while let Ok(message) = router.recv().await {
                if router.send(message).await.is_err() {
                    break;
                }
            }
        });
    });
    rx.recv().context("the echo ROUTER's thread ended")?
}
