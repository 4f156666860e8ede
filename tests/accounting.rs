//! The accounting pipeline end to end on a real Docker engine and real eBPF: block I/O,
//! OOM kills, memory, `/dev/shm`, pids and CPU throttling agree with the kernel's own
//! per-cgroup accounting (from eBPF and from the cgroup-file fallback); the manager's stats
//! in Redis have Backend.AI's shape and `destroy_kernel` returns the last of them; fake
//! accelerators are measured through the compute-plugin trait; a real Prometheus scrapes
//! the agent and `promtool` accepts what it serves.

use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use bai_agent::{
    monitor::{CgroupLayout, cgroup::CgroupMode},
    rpc::client::RpcClient,
};
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, Container, EventCollector, PrometheusServer,
    kernels::{create, created_id, docker_inspect, kernel_config, kernel_toml, runtime, with_field},
    relative_error, require_environment, test_redis, unique, wait_until,
};
use rmpv::Value;

const FAST: &str = "[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"30s\"\nstats-interval = \"200ms\"\n";
const FAST_FROM_FILES: &str = "[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"30s\"\n\
     cgroup-file-resources = [\"cpu\", \"network\", \"block-io\", \"oom\"]\n";
const MIB: u64 = 1 << 20;

/// Waits two sampling intervals so `/metrics` reflects what has already happened.
fn settle() {
    std::thread::sleep(Duration::from_millis(600));
}

fn value(agent: &Agent, name: &str, kernel_id: &str) -> f64 {
    agent.kernel_value(name, kernel_id).expect("scrape").unwrap_or_else(|| panic!("no {name} for {kernel_id}"))
}

fn host_mode() -> CgroupMode {
    CgroupLayout::detect().expect("cgroup2 is mounted").mode
}

/// A directory on a real disk (not tmpfs), so direct I/O reaches a block device.
fn dir_on_a_disk() -> tempfile::TempDir {
    for base in [std::env::temp_dir(), std::env::current_dir().expect("cwd")] {
        let on_disk = std::fs::metadata(&base).is_ok_and(|m| libc::major(m.dev()) != 0);
        if on_disk {
            return tempfile::tempdir_in(&base).expect("tempdir");
        }
    }
    panic!(
        "neither the temporary directory nor the working directory is on a block device; block I/O cannot be tested"
    );
}

/// `MAJ:MIN` of the whole disk holding `path`.
fn disk_of(path: &Path) -> String {
    let dev = std::fs::metadata(path).expect("stat").dev();
    let node = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    if Path::new(&node).join("partition").exists() {
        let parent = std::fs::canonicalize(&node).expect("sysfs link").join("../dev");
        return std::fs::read_to_string(parent).expect("parent dev").trim().to_owned();
    }
    format!("{}:{}", libc::major(dev), libc::minor(dev))
}

/// Kernels since 6.10 keep cgroup v1 blkio statistics only on devices that some cgroup set a
/// throttle rule for; a rule no I/O can reach makes the kernel count this test's I/O.
fn activate_v1_blkio_statistics(container: &Container, disk: &str) {
    if host_mode() != CgroupMode::Hybrid {
        return;
    }
    let rule = container.cgroup_dir("blkio").expect("blkio dir").join("blkio.throttle.read_bps_device");
    std::fs::write(&rule, format!("{disk} 1099511627776\n")).expect("a throttle rule on the test disk");
}

/// (read, written) bytes by the kernel's own accounting for the container's cgroup.
fn kernel_block_io(container: &Container) -> (u64, u64) {
    let (mut read, mut written) = (0, 0);
    match host_mode() {
        CgroupMode::Hybrid => {
            let text = container.cgroup_file("blkio", "blkio.throttle.io_service_bytes_recursive").expect("blkio");
            for line in text.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [_, "Read", n] => read += n.parse::<u64>().expect("number"),
                    [_, "Write", n] => written += n.parse::<u64>().expect("number"),
                    _ => {}
                }
            }
        }
        CgroupMode::Unified => {
            for field in container.cgroup_file("blkio", "io.stat").expect("io.stat").split_whitespace() {
                if let Some(n) = field.strip_prefix("rbytes=") {
                    read += n.parse::<u64>().expect("number");
                } else if let Some(n) = field.strip_prefix("wbytes=") {
                    written += n.parse::<u64>().expect("number");
                }
            }
        }
    }
    (read, written)
}

fn block_io_agrees(config: &str, source: &str) {
    require_environment();
    let agent = Agent::start(config).expect("agent starts");
    assert_eq!(agent.source_of("block-io").expect("scrape").as_deref(), Some(source));
    let dir = dir_on_a_disk();
    let io = dir.path().display().to_string();
    // Direct I/O so that every byte reaches the disk while the container's task waits.
    let container = Container::run(
        &agent.id,
        &["--network", "none", "-v", &format!("{io}:/io")],
        "while [ ! -e /io/go ]; do sleep 0.1; done; \
         dd if=/dev/zero of=/io/blob bs=1M count=64 oflag=direct && dd if=/io/blob of=/dev/null bs=1M iflag=direct \
         && touch /io/done; sleep 3600",
    )
    .expect("container runs");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");
    activate_v1_blkio_statistics(&container, &disk_of(dir.path()));
    settle();
    let (kernel_read_before, kernel_written_before) = kernel_block_io(&container);
    let read_before = value(&agent, "container_fs_reads_bytes_total", &container.kernel_id);
    let written_before = value(&agent, "container_fs_writes_bytes_total", &container.kernel_id);
    let ops_before = value(&agent, "container_fs_writes_total", &container.kernel_id);

    std::fs::write(dir.path().join("go"), b"").expect("start the I/O");
    wait_until("the I/O to finish", Duration::from_secs(60), || dir.path().join("done").exists()).expect("dd");
    settle();

    let (kernel_read, kernel_written) = kernel_block_io(&container);
    let (kernel_read, kernel_written) = (kernel_read - kernel_read_before, kernel_written - kernel_written_before);
    let read = value(&agent, "container_fs_reads_bytes_total", &container.kernel_id) - read_before;
    let written = value(&agent, "container_fs_writes_bytes_total", &container.kernel_id) - written_before;
    let write_ops = value(&agent, "container_fs_writes_total", &container.kernel_id) - ops_before;
    println!(
        "block I/O ({source}): agent read {read} written {written}; kernel read {kernel_read} written {kernel_written}"
    );
    assert!(kernel_written >= 64 * MIB && kernel_read >= 64 * MIB, "the kernel saw {kernel_read} / {kernel_written}");
    for (what, agent_bytes, truth) in [("read", read, kernel_read), ("written", written, kernel_written)] {
        let error = relative_error(agent_bytes, truth as f64);
        assert!(error < 0.02, "{what}: agent {agent_bytes} vs kernel {truth}: {:.3}% apart", error * 100.0);
    }
    assert!(write_ops >= 64.0, "64 direct writes of 1 MiB are at least 64 operations, got {write_ops}");
}

#[test]
fn block_io_agrees_with_the_cgroups_own_accounting() {
    block_io_agrees(FAST, "ebpf");
}

#[test]
fn block_io_from_cgroup_files_agrees_too() {
    block_io_agrees(FAST_FROM_FILES, "cgroup-files");
}

/// A memory-limited kernel whose startup command has two children OOM-killed, then dies
/// of it itself: every kill is counted once, and the kernel is reported `oom-killed`.
fn oom_kills_are_counted_once(monitor: &str, source: &str, first_port: u16) {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&format!("{}{monitor}", kernel_toml(dir.path(), first_port))).expect("agent starts");
    assert_eq!(agent.source_of("oom").expect("scrape").as_deref(), Some(source));
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("collector");
    let kernel = unique("kernel");
    let work = dir.path().join("scratch").join(&kernel).join("work");
    // Each dd asks for a 200 MiB buffer in a 128 MiB kernel.
    let eat = "dd if=/dev/zero of=/dev/null bs=200M count=1";
    let command = format!(
        "while [ ! -e /home/work/go ]; do sleep 0.1; done; {eat}; {eat}; touch /home/work/two; \
         while [ ! -e /home/work/last ]; do sleep 0.1; done; exec {eat}"
    );
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "128m"), "startup_command", command.as_str().into());
    let created = rt.block_on(create(&client, "s", &kernel, config)).expect("create");
    let container_id = created_id(&created, "container_id");
    agent.wait_for_kernel(&kernel, true, Duration::from_secs(20)).expect("counted");
    // The kernel's own count: memory.oom_control (v1) or memory.events (v2) of its cgroup.
    let pid: u32 = docker_inspect(&container_id, "{{.State.Pid}}").parse().expect("pid");
    let cgroups = CgroupLayout::detect().expect("layout").container_cgroups(pid).expect("cgroups");
    let oom_file = cgroups.dir("memory").expect("memory controller").join(match host_mode() {
        CgroupMode::Hybrid => "memory.oom_control",
        CgroupMode::Unified => "memory.events",
    });
    let oom_control = || -> u64 {
        let text = std::fs::read_to_string(&oom_file).unwrap_or_else(|err| panic!("{}: {err}", oom_file.display()));
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).expect("oom_kill")
    };

    std::fs::write(work.join("go"), b"").expect("start");
    wait_until("two OOM kills", Duration::from_secs(30), || work.join("two").exists()).expect("two kills");
    assert_eq!(oom_control(), 2, "the kernel's own count");
    wait_until("the agent to count them", Duration::from_secs(10), || {
        agent.kernel_value("container_oom_events_total", &kernel).ok().flatten() == Some(2.0)
    })
    .expect("counted");
    settle();
    assert_eq!(value(&agent, "container_oom_events_total", &kernel), 2.0, "each kill counted once");

    std::fs::write(work.join("last"), b"").expect("last kill");
    collector
        .wait_for("kernel_terminated", Duration::from_secs(30), |events| {
            events.iter().any(|e| e.name == "kernel_terminated")
        })
        .expect("terminated");
    let terminated = collector.events().into_iter().find(|e| e.name == "kernel_terminated").expect("event");
    let args = terminated.args_value();
    let args = args.as_array().expect("a tuple");
    assert_eq!((args[0].as_str(), args[2].as_str()), (Some(kernel.as_str()), Some("oom-killed")), "{args:?}");
    if source == "ebpf" {
        // The kill that ended the kernel too: eBPF counted it before the cgroup went away.
        settle();
        assert_eq!(value(&agent, "container_oom_events_total", &kernel), 3.0, "all three kills, once each");
        let log = agent.log_text();
        let named = log
            .lines()
            .filter(|l| l.contains("the OOM killer killed a process of a kernel") && l.contains(&kernel))
            .count();
        assert_eq!(named, 3, "each kill reported from the ring buffer with the kernel's id:\n{log}");
    }
}

#[test]
fn oom_kills_are_counted_once_and_the_kernel_reported_oom_killed() {
    oom_kills_are_counted_once(FAST, "ebpf", 21700);
}

#[test]
fn oom_kills_from_cgroup_files_are_counted_too() {
    oom_kills_are_counted_once(FAST_FROM_FILES, "cgroup-files", 21750);
}

/// What the kernel says of the container's memory: (usage, working set, cache, rss, shmem, limit).
fn kernel_memory(container: &Container) -> (u64, u64, u64, u64, u64, u64) {
    let stat = |key: &str| container.cgroup_stat("memory", "memory.stat", key).expect(key);
    let read =
        |name: &str| -> u64 { container.cgroup_file("memory", name).expect(name).trim().parse().unwrap_or(u64::MAX) };
    match host_mode() {
        CgroupMode::Hybrid => {
            let usage = read("memory.usage_in_bytes");
            let working_set = usage - stat("total_inactive_file");
            (
                usage,
                working_set,
                stat("total_cache"),
                stat("total_rss"),
                stat("total_shmem"),
                read("memory.limit_in_bytes"),
            )
        }
        CgroupMode::Unified => {
            let usage = read("memory.current");
            (usage, usage - stat("inactive_file"), stat("file"), stat("anon"), stat("shmem"), read("memory.max"))
        }
    }
}

#[test]
fn memory_shm_pids_and_throttling_match_the_cgroup_files() {
    require_environment();
    let agent = Agent::start(FAST).expect("agent starts");
    // 64 MiB in /dev/shm, then a busy loop held to a fifth of a CPU (so it is throttled).
    let container = Container::run(
        &agent.id,
        &["--network", "none", "-m", "256m", "--shm-size", "128m", "--cpus", "0.2"],
        "dd if=/dev/zero of=/dev/shm/blob bs=1M count=64 2>/dev/null; touch /filled; (while :; do :; done) & sleep 3600",
    )
    .expect("container runs");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");
    wait_until("/dev/shm filled", Duration::from_secs(10), || container.has_file("/filled")).expect("filled");
    std::thread::sleep(Duration::from_secs(2));
    let id = &container.kernel_id;
    let agent_memory = [
        "container_memory_usage_bytes",
        "container_memory_working_set_bytes",
        "container_memory_cache",
        "container_memory_rss",
        "container_memory_shmem",
        "container_spec_memory_limit_bytes",
    ]
    .map(|name| value(&agent, name, id));
    let throttled = value(&agent, "container_cpu_cfs_throttled_periods_total", id);
    let kernel = kernel_memory(&container);
    let kernel_throttled = container.cgroup_stat("cpu", "cpu.stat", "nr_throttled").expect("nr_throttled");
    println!(
        "memory: agent {agent_memory:?}, kernel {kernel:?}; throttled agent {throttled} kernel {kernel_throttled}"
    );

    let truth = [kernel.0, kernel.1, kernel.2, kernel.3, kernel.4, kernel.5];
    let names = ["usage", "working set", "cache", "rss", "shmem", "limit"];
    for ((name, agent_value), truth) in names.iter().zip(agent_memory).zip(truth) {
        // The container is idle but for its loop: what moves between the two readings is
        // a few pages at most.
        let apart = (agent_value - truth as f64).abs();
        assert!(apart <= MIB as f64, "{name}: agent {agent_value} vs kernel {truth}");
    }
    assert_eq!(agent_memory[5], (256 * MIB) as f64, "the limit docker set");
    assert!(agent_memory[4] >= (64 * MIB) as f64, "the 64 MiB in /dev/shm are shared memory");
    assert_eq!(value(&agent, "container_dev_shm_usage_bytes", id), (64 * MIB) as f64, "/dev/shm holds the blob");
    let pids = container.cgroup_file("pids", "pids.current").expect("pids").trim().parse::<f64>().expect("number");
    assert_eq!(value(&agent, "container_processes", id), pids);
    // nr_throttled grows by about 5 per second; the readings are a moment apart.
    assert!(throttled > 0.0, "a busy loop at 0.2 CPU is throttled");
    assert!(
        throttled <= kernel_throttled as f64 && kernel_throttled as f64 - throttled <= 5.0,
        "{throttled} vs {kernel_throttled}"
    );
    assert!(value(&agent, "container_cpu_cfs_throttled_seconds_total", id) > 0.0);
}

fn decode(bytes: &[u8]) -> Value {
    bai_agent::rpc::codec::unpack(bytes, "stats").expect("one msgpack value")
}

fn get<'a>(map: &'a Value, key: &str) -> &'a Value {
    map.as_map()
        .and_then(|entries| entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {key} in {map}"))
}

/// A measurement is `{current, capacity, pct, unit_hint, stats.*}` with decimal strings.
fn assert_measurement(measurement: &Value, unit_hint: &str) {
    let current = get(measurement, "current").as_str().expect("current is a string");
    current.parse::<f64>().unwrap_or_else(|_| panic!("current {current} is a decimal"));
    let pct = get(measurement, "pct").as_str().expect("pct is a string");
    pct.parse::<f64>().unwrap_or_else(|_| panic!("pct {pct} is a decimal"));
    assert!(get(measurement, "capacity").is_nil() || get(measurement, "capacity").as_str().is_some());
    assert_eq!(get(measurement, "unit_hint").as_str(), Some(unit_hint), "{measurement}");
}

#[test]
fn stats_in_redis_have_backend_ais_shape_and_destroy_returns_the_last() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!("{}{FAST}", kernel_toml(dir.path(), 21800)).replace(
        "[debug]\nheartbeat-interval = \"60s\"\n",
        "[debug]\nheartbeat-interval = \"60s\"\nfake-cuda-devices = 2\n",
    );
    let agent = Agent::start(&toml).expect("agent starts");
    let redis = redis::Client::open(format!("redis://{}/0", test_redis())).expect("client");
    let mut conn = redis.get_connection_with_timeout(Duration::from_secs(5)).expect("redis");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let kernel = unique("kernel");
    let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "256m"), "startup_command", "while :; do :; done".into());
    rt.block_on(create(&client, "s", &kernel, config)).expect("create");
    agent.wait_for_kernel(&kernel, true, Duration::from_secs(20)).expect("counted");
    std::thread::sleep(Duration::from_secs(2));

    let bytes: Vec<u8> = redis::cmd("GET").arg(&kernel).query(&mut conn).expect("the kernel's stats key");
    let stats = decode(&bytes);
    for (key, unit) in [
        ("cpu_util", "percent"),
        ("cpu_used", "msec"),
        ("mem", "bytes"),
        ("io_read", "bytes"),
        ("io_write", "bytes"),
        ("net_rx", "bps"),
        ("net_tx", "bps"),
    ] {
        assert_measurement(get(&stats, key), unit);
    }
    let cpu = get(&stats, "cpu_util");
    assert_eq!(get(cpu, "capacity").as_str(), Some("1000"));
    // A busy loop on its own core for about two seconds: well over half a second of CPU, and
    // a share of the core in some interval. (Which interval: a slice counts when it ends, and a
    // lone loop on an otherwise idle core may run a while without a context switch.)
    let busiest: f64 = get(cpu, "stats.max").as_str().expect("stats.max").parse().expect("decimal");
    assert!(busiest > 100.0, "a busy loop uses its core: the highest rate was {busiest} ms/s");
    let used: f64 = get(get(&stats, "cpu_used"), "current").as_str().expect("current").parse().expect("decimal");
    assert!(used > 500.0, "cpu_used is cumulative milliseconds: {used}");
    for stat in ["stats.avg", "stats.max"] {
        get(cpu, stat).as_str().expect("a string").parse::<f64>().expect("decimal");
    }
    assert_eq!(get(get(&stats, "mem"), "capacity").as_str(), Some("268435456"));
    get(get(&stats, "io_read"), "stats.rate");
    let ttl: i64 = redis::cmd("TTL").arg(&kernel).query(&mut conn).expect("ttl");
    assert!(ttl > 0 && ttl <= 86_400, "kernel stats expire: ttl {ttl}");
    // The operator sees the writes: how many, and when the last one was.
    let samples = agent.metrics().expect("/metrics");
    let value = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| s.name == name && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
            .map(|s| s.value)
    };
    assert!(value("backendai_agent_stats_writes_total", Some(("outcome", "ok"))).is_some_and(|n| n >= 1.0));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let last = value("backendai_agent_stats_last_write_timestamp_seconds", None).expect("last write exported");
    assert!((now - last).abs() < 30.0, "the last write was recent: {last} vs now {now}");

    let bytes: Vec<u8> = redis::cmd("GET").arg(&agent.id).query(&mut conn).expect("the node's stats key");
    let node_stats = decode(&bytes);
    let node = get(&node_stats, "node");
    for (key, unit) in [
        ("cpu_util", "msec"),
        ("mem", "bytes"),
        ("disk", "bytes"),
        ("net_rx", "bps"),
        ("net_tx", "bps"),
        ("cuda_mem", "bytes"),
        ("cuda_util", "percent"),
    ] {
        assert_measurement(get(node, key), unit);
    }
    // Two fake devices of 16 GiB, measured through the compute-plugin trait.
    assert_eq!(get(get(node, "cuda_mem"), "capacity").as_str(), Some("34359738368"));
    assert_eq!(get(get(node, "cuda_util"), "capacity").as_str(), Some("200"));
    let devices = get(&node_stats, "devices");
    for device in ["0", "1"] {
        assert_measurement(get(get(devices, "cuda_mem"), device), "bytes");
    }
    assert_measurement(get(get(devices, "mem"), "root"), "bytes");
    let ttl: i64 = redis::cmd("TTL").arg(&agent.id).query(&mut conn).expect("ttl");
    assert!(ttl > 0 && ttl <= 1, "the node key lives four stats intervals (rounded up to 1 s): ttl {ttl}");

    // The same numbers for Prometheus, and the agent's own series.
    let samples = agent.metrics().expect("scrape");
    let has = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .any(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
    };
    assert!(has(
        "backendai_container_utilization",
        &[("container_metric_name", "mem"), ("kernel_id", &kernel), ("value_type", "capacity")]
    ));
    assert!(has(
        "backendai_device_utilization",
        &[("device_metric_name", "cuda_util"), ("device_id", "1"), ("value_type", "current")]
    ));
    assert!(has("backendai_node_accelerator_memory_total_bytes", &[("plugin", "cuda"), ("device_id", "0")]));
    assert!(has("backendai_agent_rpc_requests_total", &[("method", "create_kernels"), ("outcome", "result")]));
    assert!(has("backendai_agent_rpc_request_duration_seconds_count", &[("method", "create_kernels")]));
    let running = samples
        .iter()
        .find(|s| s.name == "backendai_agent_kernels" && s.labels.get("state").map(String::as_str) == Some("running"))
        .map(|s| s.value);
    assert_eq!(running, Some(1.0));
    let cpu_used = samples
        .iter()
        .find(|s| s.name == "backendai_agent_slots_used" && s.labels.get("slot").map(String::as_str) == Some("cpu"))
        .map(|s| s.value);
    assert_eq!(cpu_used, Some(1.0));

    let last = rt
        .block_on(client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]))
        .expect("destroy_kernel");
    assert_measurement(get(&last, "cpu_used"), "msec");
    assert_eq!(get(get(&last, "mem"), "capacity").as_str(), Some("268435456"));
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_promtool_accepts_it() {
    require_environment();
    let agent = Agent::start(FAST).expect("agent starts");
    let container = Container::run(&agent.id, &["--network", "none"], "sleep 3600").expect("container runs");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");

    let (status, body) = agent.get("/metrics").expect("scrape");
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    promtool.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write");
    let checked = promtool.wait_with_output().expect("promtool runs");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let prometheus = PrometheusServer::start(&[&agent.addr]).expect("prometheus starts");
    let query = format!("container_memory_working_set_bytes{{kernel_id=\"{}\"}}", container.kernel_id);
    wait_until("Prometheus to have scraped the kernel's series", Duration::from_secs(30), || {
        prometheus.query(&query).is_ok_and(|result| result.len() == 1)
    })
    .unwrap_or_else(|err| panic!("{err}; prometheus log:\n{}", prometheus.log_text()));
    let up = prometheus.query("up{job=\"bai-agent\"}").expect("query");
    assert_eq!(up.first().and_then(|r| r["value"][1].as_str()), Some("1"), "{up:?}");
    let targets = prometheus.api("targets").expect("targets");
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"].as_str(), Some("up"), "{target}");
    assert_eq!(target["lastError"].as_str(), Some(""), "{target}");
    // Counters arrive as counters (rate() works on them), with the labels dashboards select on.
    let rate = format!("rate(container_cpu_usage_seconds_total{{kernel_id=\"{}\"}}[5s])", container.kernel_id);
    wait_until("a rate over two scrapes", Duration::from_secs(30), || {
        prometheus.query(&rate).is_ok_and(|result| {
            result.first().is_some_and(|r| r["metric"]["owner_project_id"].as_str() == Some("project-1"))
        })
    })
    .expect("rate");
}
