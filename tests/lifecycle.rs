//! The kernel lifecycle through the RPC, on the real Docker engine with events in real
//! Redis: create → running → destroy, refusals that name the problem and leak nothing,
//! a kernel that exits on its own, and `kill -9` of the agent followed by a restart that
//! loses nothing and double-allocates nothing.

use std::{process::Command, time::Duration};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, EventCollector,
    kernels::{container_exists, create, docker_inspect, field, kernel_config, kernel_toml, list, runtime},
    require_environment, test_redis, unique, wait_until,
};
use rmpv::Value;

#[test]
fn create_run_and_destroy_through_the_rpc() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21000)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("event collector");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let (session, kernel) = (unique("session"), unique("kernel"));
        let created =
            create(&client, &session, &kernel, kernel_config(bai_agent_tests::BUSYBOX_IMAGE, "1", "268435456"))
                .await
                .expect("create_kernels");
        let info = &created.as_array().expect("a list")[0];
        assert_eq!(field(info, "id").as_str(), Some(kernel.as_str()));
        let container = field(info, "container_id").as_str().expect("container id").to_owned();
        let repl_in = field(info, "repl_in_port").as_u64().expect("repl_in_port");
        assert!((21000..=21039).contains(&repl_in), "repl port {repl_in} from the pool");

        // The container as DESIGN.md says: labels, limits, no-new-privileges, 127.0.0.1 ports, scratch mounts.
        assert_eq!(docker_inspect(&container, "{{index .Config.Labels \"ai.backend.kernel-id\"}}"), kernel);
        assert_eq!(docker_inspect(&container, "{{index .Config.Labels \"ai.backend.session-id\"}}"), session);
        assert_eq!(docker_inspect(&container, "{{index .Config.Labels \"ai.backend.owner-user-id\"}}"), "user-7");
        assert_eq!(docker_inspect(&container, "{{index .Config.Labels \"ai.backend.agent-id\"}}"), agent.id);
        assert_eq!(docker_inspect(&container, "{{.HostConfig.Memory}}"), "268435456");
        assert_eq!(docker_inspect(&container, "{{.HostConfig.MemorySwap}}"), "268435456");
        assert_eq!(docker_inspect(&container, "{{.HostConfig.ShmSize}}"), (64u64 << 20).to_string());
        assert!(["0", "1"].contains(&docker_inspect(&container, "{{.HostConfig.CpusetCpus}}").as_str()));
        assert!(docker_inspect(&container, "{{.HostConfig.SecurityOpt}}").contains("no-new-privileges"));
        assert_ne!(docker_inspect(&container, "{{.HostConfig.PidsLimit}}"), "0");
        assert!(docker_inspect(&container, "{{json .HostConfig.PortBindings}}").contains("\"HostIp\":\"127.0.0.1\""));
        let scratch = dir.path().join("scratch").join(&kernel);
        assert!(scratch.join("work").is_dir() && scratch.join("config/environ.txt").is_file());
        assert!(
            std::fs::read_to_string(scratch.join("config/environ.txt")).expect("environ").contains("GREETING=hello")
        );
        assert!(scratch.join("config/resource.txt").is_file() && scratch.join("config/intrinsic-ports.json").is_file());
        assert!(docker_inspect(&container, "{{json .Mounts}}").contains("/home/work"));

        assert_eq!(
            client.call("check_running", vec![kernel.as_str().into()], vec![]).await.expect("check"),
            Value::Boolean(true)
        );
        // The monitor counts it: its series appear in /metrics.
        agent.wait_for_kernel(&kernel, true, Duration::from_secs(10)).expect("the kernel's series in /metrics");
        let started = client.call("ping_kernel", vec![kernel.as_str().into()], vec![]).await.expect("ping_kernel");
        assert!(field(&started, "started_at").as_f64().is_some_and(|t| t > 0.0), "{started}");
        let port = client.call("assign_port", vec![], vec![]).await.expect("assign_port").as_u64().expect("a port");
        assert!((21000..=21039).contains(&port), "port {port} from the pool");
        client.call("release_port", vec![port.into()], vec![]).await.expect("release_port");
        let listed = list(&client).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(field(&listed[0], "state").as_str(), Some("running"));
        let logs = client.call("get_logs", vec![kernel.as_str().into()], vec![]).await.expect("get_logs");
        assert!(field(&logs, "logs").is_str());

        client
            .call(
                "destroy_kernel",
                vec![kernel.as_str().into(), session.as_str().into(), "user-requested".into()],
                vec![],
            )
            .await
            .expect("destroy_kernel");
        assert!(!container_exists(&container), "the container is removed");
        assert!(!scratch.exists(), "the scratch directory is removed");
        assert!(list(&client).await.is_empty());
        // A kernel the agent does not know is not running (an error would make the manager's
        // terminator skip it forever); other kernel methods still name the unknown id.
        let running = client.call("check_running", vec![kernel.as_str().into()], vec![]).await.expect("answers");
        assert_eq!(running, Value::Boolean(false));
        let err = client.call("get_logs", vec![kernel.as_str().into()], vec![]).await.expect_err("gone");
        assert!(err.to_string().contains("unknown kernel id"), "{err}");

        wait_until("kernel_terminated in Redis", Duration::from_secs(10), || {
            collector.events().iter().any(|e| e.name == "kernel_terminated")
        })
        .expect("events");
        let names: Vec<String> =
            collector.events().into_iter().map(|e| e.name).filter(|n| n.starts_with("kernel_")).collect();
        assert_eq!(
            names,
            ["kernel_preparing", "kernel_creating", "kernel_started", "kernel_terminating", "kernel_terminated"],
            "lifecycle events in order"
        );
        let terminated = collector.events().into_iter().find(|e| e.name == "kernel_terminated").expect("terminated");
        let args = terminated.args_value();
        let args = args.as_array().expect("a tuple");
        assert_eq!(args[0].as_str(), Some(kernel.as_str()));
        assert_eq!(args[2].as_str(), Some("user-requested"));
    });
}

#[test]
fn bad_requests_are_refused_by_name_and_leak_nothing() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21040)).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let image = bai_agent_tests::BUSYBOX_IMAGE;
        let cases: Vec<(Value, &str)> = vec![
            (kernel_config(image, "64", "268435456"), "cpu"),
            (kernel_config(image, "1", "1099511627776000"), "mem"),
            (kernel_config("bai-test/not-here:1", "1", "268435456"), "not present"),
            (
                {
                    let mut config = kernel_config(image, "1", "268435456");
                    if let Value::Map(entries) = &mut config {
                        entries.push(("environ".into(), "A=1".into()));
                        entries.retain(|(k, v)| k.as_str() != Some("environ") || v.is_str());
                    }
                    config
                },
                "config.environ",
            ),
        ];
        for (config, named) in cases {
            let err = create(&client, "s", &unique("kernel"), config).await.expect_err("refused");
            assert!(err.contains(named), "the refusal should name `{named}`: {err}");
        }
        let err = client
            .call("destroy_kernel", vec!["no-such-kernel".into(), "s".into()], vec![])
            .await
            .expect_err("unknown");
        assert!(err.to_string().contains("unknown kernel id `no-such-kernel`"), "{err}");
        let err = create(&client, "s", "../escape", kernel_config(image, "1", "268435456")).await.expect_err("bad id");
        assert!(err.contains("escape"), "{err}");
        // Nothing was left behind: no kernels, no scratch, and the whole node is still free.
        assert!(list(&client).await.is_empty());
        let scratch = dir.path().join("scratch");
        let left: Vec<_> = std::fs::read_dir(&scratch).map(|d| d.filter_map(Result::ok).collect()).unwrap_or_default();
        assert!(left.is_empty(), "scratch left behind: {left:?}");
        let two = create(&client, "s", &unique("kernel"), kernel_config(image, "2", "268435456")).await;
        let two = two.expect("both cores are still free");
        let kernel = field(&two.as_array().expect("list")[0], "id").as_str().expect("id").to_owned();
        client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
        // The agent kept serving through all of it.
        assert_eq!(
            client.call("ping", vec!["still here".into()], vec![]).await.expect("ping"),
            Value::from("still here")
        );
    });
}

#[test]
fn a_kernel_that_exits_on_its_own_is_reported_and_cleaned_up() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21080)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("event collector");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let created = create(&client, "s", &kernel, kernel_config(bai_agent_tests::BUSYBOX_IMAGE, "2", "268435456"))
            .await
            .expect("create");
        let container = field(&created.as_array().expect("list")[0], "container_id").as_str().expect("id").to_owned();
        let killed = Command::new("docker").args(["kill", &container]).output().expect("docker kill");
        assert!(killed.status.success());
        wait_until("the kernel to be cleaned up", Duration::from_secs(15), || !container_exists(&container))
            .expect("cleaned up");
        wait_until("kernel_terminated", Duration::from_secs(10), || {
            collector.events().iter().any(|e| e.name == "kernel_terminated")
        })
        .expect("reported");
        let terminated = collector.events().into_iter().find(|e| e.name == "kernel_terminated").expect("event");
        let args = terminated.args_value();
        let args = args.as_array().expect("tuple");
        assert_eq!(args[2].as_str(), Some("self-terminated"));
        assert_eq!(args[3].as_i64(), Some(137), "exit code of a SIGKILLed container");
        assert!(list(&client).await.is_empty());
        // Its two cores are free again.
        let again =
            create(&client, "s", &unique("kernel"), kernel_config(bai_agent_tests::BUSYBOX_IMAGE, "2", "268435456"))
                .await
                .expect("resources were released");
        let kernel = field(&again.as_array().expect("list")[0], "id").as_str().expect("id").to_owned();
        client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
    });
}

#[test]
fn kill_9_and_restart_loses_nothing_and_double_allocates_nothing() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("state");
    let id = unique("i-test");
    let toml = kernel_toml(dir.path(), 21120);
    let mut agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent starts");
    let rt = runtime();
    // Two kernels, one core each: one lives through the agent's death, one dies meanwhile.
    let ((kernel, container), (doomed, doomed_container)) = rt.block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let mut made = Vec::new();
        for _ in 0..2 {
            let kernel = unique("kernel");
            let config = kernel_config(bai_agent_tests::BUSYBOX_IMAGE, "1", "268435456");
            let created = create(&client, "s", &kernel, config).await.expect("create");
            let container =
                field(&created.as_array().expect("list")[0], "container_id").as_str().expect("id").to_owned();
            made.push((kernel, container));
        }
        let second = made.pop().expect("two");
        (made.pop().expect("two"), second)
    });
    agent.kill_hard().expect("kill -9");
    assert_eq!(docker_inspect(&container, "{{.State.Running}}"), "true", "the kernel outlives the agent");
    let killed = Command::new("docker").args(["kill", &doomed_container]).output().expect("docker kill");
    assert!(killed.status.success());

    let collector = EventCollector::start(&test_redis(), 4, &id).expect("event collector");
    let agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent restarts");
    rt.block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let mut listed = Vec::new();
        for _ in 0..50 {
            match client.call("list_kernels", vec![], vec![]).await {
                Ok(Value::Array(items)) => {
                    listed = items;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        assert_eq!(listed.len(), 1, "the live kernel is known again, the dead one is not: {listed:?}");
        assert_eq!(field(&listed[0], "kernel_id").as_str(), Some(kernel.as_str()));
        assert_eq!(field(&listed[0], "container_id").as_str(), Some(container.as_str()));
        wait_until("resuming-agent-operation", Duration::from_secs(10), || {
            collector.events().iter().any(|e| {
                e.name == "kernel_started"
                    && e.args_value().as_array().and_then(|a| a.get(2)).and_then(Value::as_str)
                        == Some("resuming-agent-operation")
            })
        })
        .expect("reported as resumed");
        wait_until("the dead kernel reported", Duration::from_secs(10), || {
            collector.events().iter().any(|e| {
                let args = e.args_value();
                let args = args.as_array().cloned().unwrap_or_default();
                e.name == "kernel_terminated"
                    && args.first().and_then(Value::as_str) == Some(doomed.as_str())
                    && args.get(2).and_then(Value::as_str) == Some("self-terminated")
            })
        })
        .expect("the kernel that died while the agent was down is reported self-terminated");
        assert!(!container_exists(&doomed_container), "its container is cleaned up");
        assert!(!dir.path().join("scratch").join(&doomed).exists(), "its scratch is cleaned up");

        // One core is still the recovered kernel's: one more fits, a third does not.
        let second =
            create(&client, "s", &unique("kernel"), kernel_config(bai_agent_tests::BUSYBOX_IMAGE, "1", "268435456"))
                .await
                .expect("the other core is free");
        let second_container =
            field(&second.as_array().expect("list")[0], "container_id").as_str().expect("id").to_owned();
        assert_ne!(
            docker_inspect(&second_container, "{{.HostConfig.CpusetCpus}}"),
            docker_inspect(&container, "{{.HostConfig.CpusetCpus}}"),
            "the recovered kernel's core is not handed out again"
        );
        let err =
            create(&client, "s", &unique("kernel"), kernel_config(bai_agent_tests::BUSYBOX_IMAGE, "1", "268435456"))
                .await
                .expect_err("no core left");
        assert!(err.contains("cpu"), "{err}");
        for item in list(&client).await {
            let kernel = field(&item, "kernel_id").as_str().expect("id").to_owned();
            client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
        }
        assert!(!container_exists(&container));
    });
}
