//! Accelerators on a node without any: the mock devices of a Backend.AI
//! `mock-accelerator.toml` are measured and exported per device, and a broken file stops the
//! start naming the key and what is wrong; per-kernel accounting from the processes of each
//! kernel's cgroup, driven by the mock's synthetic load (`BACKENDAI_MOCK_CUDA_DEVICES` +
//! `BAI_MOCK_GPU_UTIL` in a process's environment), in the manager's stats, Prometheus and the
//! usage records.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, RedisServer,
    kernels::{create, kernel_config, kernel_toml, map, runtime, with_field},
    require_environment, test_redis, unique, wait_until,
};
use rmpv::Value;

/// Backend.AI's own sample (`configs/accelerator/mock-accelerator.toml`), two of its devices.
const MOCK: &str = r#"slot_name = "cuda"
device_plugin_name = "CUDADevice"
devices = [
  { mother_uuid = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d01", model_name = "CUDA GPU", numa_node = 0, subproc_count = 108, memory_size = "40G", is_mig_device = false },
  { mother_uuid = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d02", model_name = "CUDA GPU", numa_node = 1, subproc_count = 108, memory_size = "40G", is_mig_device = false },
]

[attributes]
nvidia_driver = "450.0.0"
cuda_runtime = "11.0"
"#;

#[test]
fn mock_accelerators_are_measured_per_device_and_a_broken_file_is_named() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mock-accelerator.toml");
    std::fs::write(&path, MOCK).expect("mock config");
    let agent =
        Agent::start(&format!("[resource]\nmock-accelerator = \"{}\"\n", path.display())).expect("agent starts");
    let total = |device: &str| {
        agent.metrics().ok().and_then(|samples| {
            samples
                .iter()
                .find(|s| {
                    s.name == "backendai_node_accelerator_memory_total_bytes"
                        && s.labels.get("plugin").map(String::as_str) == Some("cuda")
                        && s.labels.get("device_id").map(String::as_str) == Some(device)
                })
                .map(|s| s.value)
        })
    };
    wait_until("the mock devices are measured", Duration::from_secs(15), || {
        total("c59395cd-ac91-4cd3-a1b0-3d2568aa2d02").is_some()
    })
    .unwrap_or_else(|err| panic!("{err}: {}", agent.log_text()));
    assert_eq!(total("c59395cd-ac91-4cd3-a1b0-3d2568aa2d01"), Some((40u64 << 30) as f64));
    drop(agent);

    std::fs::write(
        &path,
        MOCK.replace(
            "memory_size = \"40G\", is_mig_device = false },\n  {",
            "memory_size = \"lots\", is_mig_device = false },\n  {",
        ),
    )
    .expect("broken config");
    let err = Agent::start(&format!("[resource]\nmock-accelerator = \"{}\"\n", path.display()))
        .err()
        .expect("a broken mock file stops the start")
        .to_string();
    assert!(err.contains("resource.mock-accelerator") && err.contains("devices[0].memory_size"), "{err}");
}

const DEVICE_1: &str = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d01";
const DEVICE_2: &str = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d02";
/// This test's own Redis (the manager's stats), and its kernels' port range.
const REDIS_PORT: u16 = 16391;
const FIRST_PORT: u16 = 25000;

/// The container of a kernel of this agent.
fn container_of(agent_id: &str, kernel_id: &str) -> String {
    let out = Command::new("docker")
        .args(["ps", "-q", "--no-trunc", "--filter"])
        .arg(format!("label=ai.backend.agent-id={agent_id}"))
        .arg("--filter")
        .arg(format!("label=ai.backend.kernel-id={kernel_id}"))
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker exec OPTIONS… CONTAINER sh -c SCRIPT`, where the script is the last of `args`.
fn docker_exec(container: &str, args: &[&str]) {
    let (script, options) = args.split_last().expect("a script");
    let out = Command::new("docker")
        .arg("exec")
        .args(options)
        .arg(container)
        .args(["sh", "-c", script])
        .output()
        .expect("docker exec");
    assert!(out.status.success(), "docker exec {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A kernel's `{metric: measurement}` in the manager's stats.
fn kernel_stats(conn: &mut redis::Connection, kernel_id: &str) -> Option<Value> {
    let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(kernel_id).query(conn).ok()?;
    bai_agent::rpc::codec::unpack(&bytes?, "stats").ok()
}

/// `stats[metric][field]` as text.
fn stat(stats: &Value, metric: &str, field: &str) -> Option<String> {
    let get = |map: &Value, key: &str| {
        map.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone()))
    };
    get(&get(stats, metric)?, field)?.as_str().map(str::to_owned)
}

/// A series' value whose labels include `labels`.
fn series(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    agent.metrics().ok()?.into_iter().find_map(|s| {
        (s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .then_some(s.value)
    })
}

/// Every usage record of a kernel in the agent's journal: its `accel_busy_seconds.cuda`
/// (None where absent), in seq order.
fn busy_seconds(journal_dir: &Path, kernel_id: &str) -> Vec<Option<f64>> {
    let mut records: Vec<(u64, Option<f64>)> = std::fs::read_to_string(journal_dir.join("usage.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["kernel_id"] == kernel_id && line["event"].is_object())
        .map(|line| {
            let data = &line["event"]["data"];
            let busy = data["accel_busy_seconds"]["cuda"].as_str().map(|text| text.parse().expect("a decimal"));
            (data["seq"].as_u64().expect("seq"), busy)
        })
        .collect();
    records.sort_by_key(|(seq, _)| *seq);
    records.dedup_by_key(|(seq, _)| *seq);
    records.into_iter().map(|(_, busy)| busy).collect()
}

#[test]
fn gpu_use_is_accounted_per_kernel_from_the_processes_of_its_cgroup() {
    require_environment();
    let redis = RedisServer::start(REDIS_PORT).expect("redis-server on 16391");
    let dir = tempfile::tempdir().expect("tempdir");
    let mock = dir.path().join("mock-accelerator.toml");
    std::fs::write(&mock, MOCK).expect("mock config");
    let toml = format!(
        "{}[monitor]\ninterval = \"200ms\"\nstats-interval = \"200ms\"\ngone-series-grace = \"30s\"\n\n[usage]\ninterval = \"2s\"\n",
        kernel_toml(dir.path(), FIRST_PORT)
            .replace(&test_redis(), &redis.addr())
            .replace("[resource]\n", &format!("[resource]\nmock-accelerator = \"{}\"\n", mock.display()))
    );
    let agent = Agent::start(&toml).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    // Until the allocation work sets it, the kernels are given their mock devices through the
    // environ, as Backend.AI's mock plugin does for a kernel given devices.
    let kernel_with = |device: &str| {
        let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "256m"), "startup_command", "sleep 3600".into());
        with_field(config, "environ", map(vec![("BACKENDAI_MOCK_CUDA_DEVICES", device.into())]))
    };
    let (busy, idle) = (unique("busy"), unique("idle"));
    rt.block_on(create(&client, "s-busy", &busy, kernel_with(DEVICE_1))).expect("create busy");
    rt.block_on(create(&client, "s-idle", &idle, kernel_with(DEVICE_2))).expect("create idle");
    agent.wait_for_kernel(&busy, true, Duration::from_secs(20)).expect("busy counted");
    agent.wait_for_kernel(&idle, true, Duration::from_secs(20)).expect("idle counted");
    let container = container_of(&agent.id, &busy);
    assert!(!container.is_empty(), "the busy kernel's container");

    // A process of the busy kernel claims 70 % and 1 GiB of its device; the kernel's other
    // processes (its environment has the device, not a utilisation) claim nothing.
    docker_exec(
        &container,
        &[
            "-d",
            "-e",
            "BAI_MOCK_GPU_UTIL=70",
            "-e",
            "BAI_MOCK_GPU_MEM=1073741824",
            "echo $$ > /tmp/busy.pid; exec sleep 600",
        ],
    );
    let busy_from = Instant::now();
    let redis_client = redis::Client::open(format!("redis://{}/0", redis.addr())).expect("client");
    let mut conn = redis_client.get_connection_with_timeout(Duration::from_secs(5)).expect("redis");
    let util = |conn: &mut redis::Connection, kernel: &str| {
        kernel_stats(conn, kernel).and_then(|stats| stat(&stats, "cuda_util", "current"))
    };
    wait_until("the busy kernel's cuda_util is 70 in the manager's stats", Duration::from_secs(15), || {
        util(&mut conn, &busy).as_deref() == Some("70")
    })
    .unwrap_or_else(|err| panic!("{err}: {:?}\n{}", kernel_stats(&mut conn, &busy), agent.log_text()));
    let stats = kernel_stats(&mut conn, &busy).expect("busy stats");
    assert_eq!(stat(&stats, "cuda_util", "capacity").as_deref(), Some("100"), "one device used: 100 × 1");
    assert_eq!(stat(&stats, "cuda_util", "pct").as_deref(), Some("70"));
    assert_eq!(stat(&stats, "cuda_mem", "current").as_deref(), Some("1073741824"));
    assert_eq!(stat(&stats, "cuda_mem", "capacity").as_deref(), Some("42949672960"), "the device's 40 GiB");
    assert_eq!(util(&mut conn, &idle).as_deref(), Some("0"), "the idle kernel uses nothing");

    // Prometheus: per kernel and device, Backend.AI's per-kernel gauge, DCGM's per device.
    let per_kernel = "backendai_kernel_accelerator_utilization_percent";
    assert_eq!(series(&agent, per_kernel, &[("kernel_id", &busy), ("device_id", DEVICE_1)]), Some(70.0));
    assert_eq!(series(&agent, per_kernel, &[("kernel_id", &idle)]), None, "no device used by the idle kernel");
    assert_eq!(
        series(&agent, "backendai_kernel_accelerator_memory_used_bytes", &[("kernel_id", &busy)]),
        Some(1073741824.0)
    );
    let container_util = |kernel: &str| {
        series(
            &agent,
            "backendai_container_utilization",
            &[("container_metric_name", "cuda_util"), ("kernel_id", kernel), ("value_type", "current")],
        )
    };
    assert_eq!((container_util(&busy), container_util(&idle)), (Some(70.0), Some(0.0)));
    assert_eq!(series(&agent, "DCGM_FI_DEV_GPU_UTIL", &[("UUID", DEVICE_1), ("gpu", "0")]), Some(70.0));
    assert_eq!(series(&agent, "DCGM_FI_DEV_GPU_UTIL", &[("UUID", DEVICE_2)]), Some(0.0));
    assert_eq!(series(&agent, "DCGM_FI_DEV_FB_USED", &[("UUID", DEVICE_1)]), Some(1024.0), "MiB, as DCGM");
    assert_eq!(series(&agent, "DCGM_FI_DEV_FB_FREE", &[("UUID", DEVICE_1)]), Some(39.0 * 1024.0));

    // Let usage windows close while it is busy, then the process exits: it stops counting.
    std::thread::sleep(Duration::from_secs(4));
    docker_exec(&container, &["kill $(cat /tmp/busy.pid)"]);
    let busy_for = busy_from.elapsed().as_secs_f64();
    wait_until("the busy kernel's cuda_util is 0 once its process exited", Duration::from_secs(15), || {
        util(&mut conn, &busy).as_deref() == Some("0")
    })
    .unwrap_or_else(|err| panic!("{err}: {:?}", kernel_stats(&mut conn, &busy)));
    wait_until("its per-device series is gone", Duration::from_secs(5), || {
        series(&agent, per_kernel, &[("kernel_id", &busy)]).is_none()
    })
    .expect("gone");
    assert_eq!(container_util(&busy), Some(0.0));

    // Two more windows after the exit: they add nothing.
    let windows_then = busy_seconds(&agent.journal_dir, &busy).len();
    wait_until("two usage windows after the exit", Duration::from_secs(10), || {
        busy_seconds(&agent.journal_dir, &busy).len() >= windows_then + 2
    })
    .expect("windows");
    let records = busy_seconds(&agent.journal_dir, &busy);
    let total: f64 = records.iter().flatten().sum();
    // 70 % of the time it ran, give or take a stats interval at each end (it is seen within
    // 200 ms of starting; its last reading is held up to 200 ms after it ended).
    assert!(
        (total - 0.7 * busy_for).abs() <= 0.7 * 0.6 + 0.05 * busy_for,
        "accel_busy_seconds {total} for ~{busy_for:.2} s at 70 %: {records:?}"
    );
    assert!(records.iter().flatten().filter(|s| **s > 0.0).count() >= 2, "it grew window by window: {records:?}");
    // (The window open when the exit was seen may hold some of the busy time; the next not.)
    assert_eq!(records[windows_then + 1], Some(0.0), "nothing after the exit: {records:?}");
    let idle_records = busy_seconds(&agent.journal_dir, &idle);
    assert!(idle_records.len() >= 3, "{idle_records:?}");
    assert!(idle_records.iter().all(Option::is_none), "the idle kernel has no busy time: {idle_records:?}");

    for (kernel, session) in [(&busy, "s-busy"), (&idle, "s-idle")] {
        rt.block_on(client.call("destroy_kernel", vec![kernel.as_str().into(), session.into()], vec![]))
            .expect("destroy_kernel");
    }
    drop(agent);
    drop(redis);
}
