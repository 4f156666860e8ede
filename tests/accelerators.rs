//! Accelerators on a node without any: the mock devices of a Backend.AI
//! `mock-accelerator.toml` are measured and exported per device, and a broken file stops the
//! start naming the key and what is wrong; they are handed out to kernels as whole devices
//! (`cuda.device`) or shares (`cuda.shares`): a kernel sees exactly its devices (stand-in
//! nodes it may open, any other refused by the device program), concurrent requests never
//! over-allocate, and what kernels hold survives `kill -9` of the agent.

use std::{process::Command, time::Duration};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE,
    kernels::{create, created_id, field, kernel_config, kernel_toml, map, runtime, with_field},
    remove_agent_containers, require_environment, unique, wait_until,
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
