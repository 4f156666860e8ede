//! Accelerators on a node without any: the mock devices of a Backend.AI
//! `mock-accelerator.toml` are measured and exported per device, and a broken file stops the
//! start naming the key and what is wrong.

use std::time::Duration;

use bai_agent_tests::{Agent, require_environment, wait_until};

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
