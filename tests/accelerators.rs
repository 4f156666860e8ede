//! Accelerators on a node without any: the mock devices of a Backend.AI
//! `mock-accelerator.toml` are measured and exported per device, and a broken file stops the
//! start naming the key and what is wrong; they are handed out to kernels as whole devices
//! (`cuda.device`) or shares (`cuda.shares`): a kernel sees exactly its devices (stand-in
//! nodes it may open, any other refused by the device program), concurrent requests never
//! over-allocate, and what kernels hold survives `kill -9` of the agent; per-kernel
//! accounting from the processes of each kernel's cgroup, driven by the mock's synthetic load
//! (`BAI_MOCK_GPU_UTIL` in a process's environment besides the `BACKENDAI_MOCK_CUDA_DEVICES`
//! its kernel gets), in the manager's stats, Prometheus and the usage records.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, RedisServer,
    kernels::{create, created_id, field, kernel_config, kernel_toml, map, runtime, with_field},
    remove_agent_containers, require_environment, test_redis, unique, wait_until,
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

const GPU0: &str = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d01";
const GPU1: &str = "c59395cd-ac91-4cd3-a1b0-3d2568aa2d02";

/// A kernel-running agent with the two mock devices, handed out `mode`.
fn gpu_agent(dir: &std::path::Path, first_port: u16, mode: &str) -> Agent {
    let path = dir.join("mock-accelerator.toml");
    std::fs::write(&path, MOCK).expect("mock config");
    let toml = kernel_toml(dir, first_port)
        .replace("[resource]\n", &format!("[resource]\nmock-accelerator = \"{}\"\n", path.display()))
        + &format!("\n[accelerators.cuda]\nallocation-mode = \"{mode}\"\n");
    // Room for the ports of twenty kernels (the concurrent creates).
    let toml = toml.replace(
        &format!("port-range = [{first_port}, {}]", first_port + 39),
        &format!("port-range = [{first_port}, {}]", first_port + 89),
    );
    Agent::start_with_journal(&unique("i-gpu"), &dir.join("journal"), &toml).expect("agent starts")
}

fn gpu_config(slot: &str, amount: &str) -> Value {
    let config = kernel_config(BUSYBOX_IMAGE, "0", "134217728");
    with_field(
        config,
        "resource_slots",
        map(vec![("cpu", "0".into()), ("mem", "134217728".into()), (slot, amount.into())]),
    )
}

/// `sh -c script` in a container; stdout and stderr together.
fn exec(container: &str, script: &str) -> String {
    let out = Command::new("docker").args(["exec", container, "sh", "-c", script]).output().expect("docker exec");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned()
}

async fn alloc_map(client: &RpcClient) -> Vec<(String, String)> {
    let value = client.call("scan_gpu_alloc_map", vec![], vec![]).await.expect("scan_gpu_alloc_map");
    let mut pairs: Vec<(String, String)> = value
        .as_map()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str().unwrap_or_default().to_owned(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    pairs.sort();
    pairs
}

/// The devices the result of `create_kernels` says the kernel got.
fn attached(result: &Value) -> Vec<String> {
    let first = result.as_array().and_then(|items| items.first()).unwrap_or(&Value::Nil);
    field(field(first, "attached_devices"), "cuda")
        .as_array()
        .into_iter()
        .flatten()
        .map(|device| field(device, "device_id").as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn whole_devices_reach_only_their_kernel_and_survive_kill_9() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut agent = gpu_agent(dir.path(), 24800, "discrete");
    let rt = runtime();
    let (first, first_container) = rt.block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let hwinfo = client.call("gather_hwinfo", vec![], vec![]).await.expect("hwinfo");
        assert_eq!(field(field(field(&hwinfo, "cuda"), "metadata"), "devices").as_str(), Some("2"), "{hwinfo}");

        let first = unique("gpu-a");
        let created = create(&client, "s", &first, gpu_config("cuda.device", "1")).await.expect("the first fits");
        assert_eq!(attached(&created), vec![GPU0.to_owned()]);
        let container = created_id(&created, "container_id");

        // Inside: its device node and no other, Backend.AI's environment, and resource.txt.
        assert_eq!(exec(&container, "ls /dev | grep nvidia | sort | tr '\\n' ' '"), "nvidia0 nvidiactl");
        assert_eq!(exec(&container, "stat -c %t:%T /dev/nvidia0"), "c3:0", "NVIDIA's major 195, minor 0");
        assert_eq!(
            exec(&container, "echo $CUDA_VISIBLE_DEVICES/$BACKENDAI_MOCK_CUDA_DEVICES/$GPU_COUNT"),
            format!("0/{GPU0}/1")
        );
        let resource_txt = exec(&container, "cat /home/config/resource.txt");
        assert!(resource_txt.contains(&format!("CUDA.DEVICE_SHARES={GPU0}:1")), "{resource_txt}");
        assert!(resource_txt.contains(&format!("CUDA_GLOBAL_DEVICE_IDS=0:{GPU0}")), "{resource_txt}");
        // Its own node opens as far as the device program goes (no driver behind it: ENXIO);
        // the other device, made inside, is refused by the device program (EPERM).
        let own = exec(&container, "cat /dev/nvidia0 2>&1; true");
        assert!(own.contains("No such device or address"), "its own device is allowed: {own}");
        let other = exec(&container, "rm -f /tmp/nvidia1; mknod /tmp/nvidia1 c 195 1 && cat /tmp/nvidia1 2>&1; true");
        assert!(other.contains("Operation not permitted"), "the other device is refused: {other}");

        let second = unique("gpu-b");
        let created = create(&client, "s", &second, gpu_config("cuda.device", "1")).await.expect("the second fits");
        assert_eq!(attached(&created), vec![GPU1.to_owned()]);
        let err = create(&client, "s", &unique("gpu-c"), gpu_config("cuda.device", "1")).await.expect_err("none left");
        assert!(err.contains("insufficient cuda.device: requested 1, available 0 of 2"), "{err}");
        assert_eq!(alloc_map(&client).await, vec![(GPU0.into(), "1".into()), (GPU1.into(), "1".into())]);
        // The operator's view of the same map.
        let out = Command::new(bai_agent_tests::agentctl_binary())
            .args(["--agent", &format!("tcp://{}", agent.rpc_addr), "--json", "gpu-alloc-map"])
            .output()
            .expect("bai-agentctl runs");
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(shown, serde_json::json!({ GPU0: "1", GPU1: "1" }), "bai-agentctl gpu-alloc-map");
        client.call("destroy_kernel", vec![second.as_str().into()], vec![]).await.expect("destroy");
        (first, container)
    });

    // kill -9: the restarted agent takes what the kernel holds back from its resource.txt.
    agent.kill_hard().expect("kill -9");
    agent.restart().expect("restart");
    rt.block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        wait_until("the agent has its kernels back", Duration::from_secs(30), || {
            rt_alloc_map_blocking(&agent) == vec![(GPU0.to_owned(), "1".to_owned())]
        })
        .unwrap_or_else(|err| panic!("{err}: {}", agent.log_text()));
        let created = create(&client, "s", &unique("gpu-d"), gpu_config("cuda.device", "2"))
            .await
            .expect_err("the restored kernel still holds one of the two");
        assert!(created.contains("insufficient cuda.device: requested 2, available 1 of 2"), "{created}");
        let created = create(&client, "s", &unique("gpu-e"), gpu_config("cuda.device", "1")).await.expect("fits");
        assert_eq!(attached(&created), vec![GPU1.to_owned()], "the free one, not the restored kernel's");
        let other =
            exec(&first_container, "rm -f /tmp/nvidia1; mknod /tmp/nvidia1 c 195 1 && cat /tmp/nvidia1 2>&1; true");
        assert!(other.contains("Operation not permitted"), "still refused after the restart: {other}");
        client.call("destroy_kernel", vec![first.as_str().into()], vec![]).await.expect("destroy");
    });
    remove_agent_containers(&agent.id);
}

/// `scan_gpu_alloc_map` from outside the runtime (for `wait_until`).
fn rt_alloc_map_blocking(agent: &Agent) -> Vec<(String, String)> {
    let addr = agent.rpc_addr.clone();
    std::thread::spawn(move || {
        runtime().block_on(async {
            match RpcClient::connect(&addr).await {
                Ok(client) => match client.call("scan_gpu_alloc_map", vec![], vec![]).await {
                    Ok(_) => alloc_map(&client).await,
                    Err(_) => Vec::new(),
                },
                Err(_) => Vec::new(),
            }
        })
    })
    .join()
    .unwrap_or_default()
}

#[test]
fn shares_are_split_and_twenty_concurrent_creates_never_over_allocate() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = gpu_agent(dir.path(), 24900, "fractional");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        // 40 GiB and 108 multiprocessors a device: min(40 / 2, 108 / 8) = 13.5 shares each.
        let half = unique("half");
        let created = create(&client, "s", &half, gpu_config("cuda.shares", "0.5")).await.expect("fits");
        assert_eq!(attached(&created), vec![GPU0.to_owned()]);
        let container = created_id(&created, "container_id");
        let resource_txt = exec(&container, "cat /home/config/resource.txt");
        assert!(resource_txt.contains(&format!("CUDA.SHARES_SHARES={GPU0}:0.5")), "{resource_txt}");
        assert!(resource_txt.contains("CUDA_RESOURCE_VIRTUALIZED=1"), "{resource_txt}");
        assert_eq!(alloc_map(&client).await, vec![(GPU0.into(), "0.037".into())], "0.5 of 13.5");
        client.call("destroy_kernel", vec![half.as_str().into()], vec![]).await.expect("destroy");

        // Twenty creates at once, 2.5 shares each: 5 fit on a device, 10 on the node.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let addr = agent.rpc_addr.clone();
                tokio::spawn(async move {
                    let client = RpcClient::connect(&addr).await.expect("connect");
                    create(&client, "s", &unique("many"), gpu_config("cuda.shares", "2.5")).await
                })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => granted += 1,
                Err(err) => assert!(err.contains("insufficient cuda.shares"), "refused for the right reason: {err}"),
            }
        }
        assert_eq!(granted, 10, "13.5 shares a device hold five kernels of 2.5");
        let map = alloc_map(&client).await;
        assert_eq!(map, vec![(GPU0.into(), "0.9259".into()), (GPU1.into(), "0.9259".into())], "12.5 of 13.5 each");
    });
    remove_agent_containers(&agent.id);
}

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
    // Each kernel is given one whole device: the agent sets its BACKENDAI_MOCK_CUDA_DEVICES.
    let with_a_device = || {
        let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "256m"), "startup_command", "sleep 3600".into());
        with_field(
            config,
            "resource_slots",
            map(vec![("cpu", "1".into()), ("mem", "256m".into()), ("cuda.device", "1".into())]),
        )
    };
    let (busy, idle) = (unique("busy"), unique("idle"));
    let created = rt.block_on(create(&client, "s-busy", &busy, with_a_device())).expect("create busy");
    assert_eq!(attached(&created), vec![GPU0.to_owned()]);
    let created = rt.block_on(create(&client, "s-idle", &idle, with_a_device())).expect("create idle");
    assert_eq!(attached(&created), vec![GPU1.to_owned()]);
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
    let idle_stats = kernel_stats(&mut conn, &idle).expect("idle stats");
    assert_eq!(
        stat(&idle_stats, "cuda_util", "capacity").as_deref(),
        Some("100"),
        "the device it was given, though its processes use none (as Backend.AI's plugins count)"
    );

    // Prometheus: per kernel and device, Backend.AI's per-kernel gauge, DCGM's per device.
    let per_kernel = "backendai_kernel_accelerator_utilization_percent";
    assert_eq!(series(&agent, per_kernel, &[("kernel_id", &busy), ("device_id", GPU0)]), Some(70.0));
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
    assert_eq!(series(&agent, "DCGM_FI_DEV_GPU_UTIL", &[("UUID", GPU0), ("gpu", "0")]), Some(70.0));
    assert_eq!(series(&agent, "DCGM_FI_DEV_GPU_UTIL", &[("UUID", GPU1)]), Some(0.0));
    assert_eq!(series(&agent, "DCGM_FI_DEV_FB_USED", &[("UUID", GPU0)]), Some(1024.0), "MiB, as DCGM");
    assert_eq!(series(&agent, "DCGM_FI_DEV_FB_FREE", &[("UUID", GPU0)]), Some(39.0 * 1024.0));

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
