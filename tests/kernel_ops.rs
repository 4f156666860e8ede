//! Kernel operations past the basic lifecycle, through the RPC on the real engine:
//! concurrent creates against fixed capacity, file methods and vfolder mounts that try
//! to escape, an OOM-killed kernel, restart, and registry sync with the manager.

use std::{collections::HashSet, process::Command, sync::Arc, time::Duration};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, EventCollector, LocalRegistry,
    kernels::{
        container_exists, create, created_id, docker_inspect, field, kernel_config, kernel_toml, list, map, runtime,
        with_field,
    },
    require_environment, test_redis, unique, wait_until,
};
use rmpv::Value;

fn mem_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    kib * 1024
}

/// Twenty creates at once on a node with room for fewer: the survivors never share a
/// core past the overcommit factor, never exceed the memory capacity, never share a port.
#[test]
fn twenty_concurrent_creates_never_over_allocate() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    // Capacity: 2 cores shared by up to 3 kernels each (cpu 6), and 1.25 GiB of memory:
    // room for five 256 MiB kernels, so memory is what runs out first.
    let reserved_mem = mem_total_bytes() - (1280 << 20);
    let toml = kernel_toml(dir.path(), 21200)
        .replace("reserved-mem = \"512m\"", &format!("reserved-mem = {reserved_mem}\ncpu-overcommit = 3.0"));
    let agent = Agent::start(&toml).expect("agent starts");
    runtime().block_on(async {
        let client = Arc::new(RpcClient::connect(&agent.rpc_addr).await.expect("connect"));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                create(&client, "s", &unique("kernel"), kernel_config(BUSYBOX_IMAGE, "1", "268435456")).await
            }));
        }
        let mut created = Vec::new();
        let mut refusals = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                Ok(result) => created.push(result),
                Err(err) => refusals.push(err),
            }
        }
        assert_eq!(created.len(), 5, "exactly five fit in memory; refusals: {refusals:?}");
        assert!(refusals.iter().all(|e| e.contains("insufficient mem")), "{refusals:?}");

        let mut cores: Vec<String> = Vec::new();
        let mut ports = HashSet::new();
        let mut memory = 0u64;
        for result in &created {
            let container = created_id(result, "container_id");
            cores.push(docker_inspect(&container, "{{.HostConfig.CpusetCpus}}"));
            memory += docker_inspect(&container, "{{.HostConfig.Memory}}").parse::<u64>().expect("memory");
            for port in ["repl_in_port", "repl_out_port"] {
                let port = field(&result.as_array().expect("list")[0], port).as_u64().expect("port");
                assert!(ports.insert(port), "host port {port} handed out twice");
            }
        }
        assert!(memory <= 1280 << 20, "memory limits add up to {memory}, over the capacity");
        for core in ["0", "1"] {
            let sharing = cores.iter().filter(|c| c.as_str() == core).count();
            assert!(sharing <= 3, "core {core} pinned by {sharing} kernels, over the overcommit of 3: {cores:?}");
        }
        for kernel in list(&client).await {
            let id = field(&kernel, "kernel_id").as_str().expect("id").to_owned();
            client.call("destroy_kernel", vec![id.as_str().into(), "s".into()], vec![]).await.expect("destroy");
        }
    });
}

#[test]
fn file_methods_and_mounts_stay_inside_their_roots() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let vfolders = dir.path().join("vfolders");
    std::fs::create_dir_all(vfolders.join("data")).expect("vfolder");
    std::fs::write(vfolders.join("data/readme.txt"), "vfolder file\n").expect("vfolder file");
    std::os::unix::fs::symlink("/etc", vfolders.join("sneaky")).expect("symlink");
    let agent = Agent::start(&kernel_toml(dir.path(), 21250)).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let mount = |host: &str| {
            Value::Array(vec![map(vec![
                ("host_path", host.into()),
                ("kernel_path", "/home/work/data".into()),
                ("permission", "ro".into()),
            ])])
        };
        // Mounts: one under the mount root works; outside it, or through a symlink out, is refused.
        for host in ["/etc", "../../etc", vfolders.join("sneaky").to_str().expect("utf-8")] {
            let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "268435456"), "mounts", mount(host));
            let err = create(&client, "s", &unique("kernel"), config).await.expect_err("escaping mount refused");
            let named = std::path::Path::new(host).file_name().and_then(|n| n.to_str()).unwrap_or(host);
            assert!(err.contains(named), "the refusal should name the vfolder path {host}: {err}");
            assert!(!err.contains("TypeError"), "a refused mount is not an argument-type error: {err}");
        }
        let data = vfolders.join("data");
        let config =
            with_field(kernel_config(BUSYBOX_IMAGE, "1", "268435456"), "mounts", mount(data.to_str().expect("utf-8")));
        let kernel = unique("kernel");
        let created = create(&client, "s", &kernel, config).await.expect("mount under the root");
        let container = created_id(&created, "container_id");
        let out = Command::new("docker").args(["exec", &container, "cat", "/home/work/data/readme.txt"]).output();
        assert_eq!(String::from_utf8_lossy(&out.expect("exec").stdout), "vfolder file\n");

        // Files: an upload lands in the kernel's /home/work and comes back down.
        let payload = Value::Binary(b"hello from the manager\n".to_vec());
        client
            .call("upload_file", vec![kernel.as_str().into(), "notes/hello.txt".into(), payload], vec![])
            .await
            .expect("upload");
        let out = Command::new("docker").args(["exec", &container, "cat", "/home/work/notes/hello.txt"]).output();
        assert_eq!(String::from_utf8_lossy(&out.expect("exec").stdout), "hello from the manager\n");
        let back = client
            .call("download_single", vec![kernel.as_str().into(), "notes/hello.txt".into()], vec![])
            .await
            .expect("download");
        assert_eq!(back, Value::Binary(b"hello from the manager\n".to_vec()));
        let listing =
            client.call("list_files", vec![kernel.as_str().into(), "notes".into()], vec![]).await.expect("list");
        assert!(field(&listing, "files").as_str().is_some_and(|f| f.contains("hello.txt")), "{listing}");
        let tar = client.call("download_file", vec![kernel.as_str().into(), "notes".into()], vec![]).await;
        assert!(matches!(tar, Ok(Value::Binary(ref bytes)) if bytes.len() >= 1024), "a tar archive: {tar:?}");

        // Escapes are refused, name the path, and write nothing outside.
        let outside = dir.path().join("escaped.txt");
        for (method, path) in [
            ("upload_file", "../../../escaped.txt"),
            ("upload_file", "/etc/bai-agent-test-escape"),
            ("download_single", "/etc/passwd"),
            ("download_single", "../../../../etc/passwd"),
            ("download_file", "/etc"),
            ("list_files", "/etc"),
        ] {
            let mut args = vec![kernel.as_str().into(), path.into()];
            if method == "upload_file" {
                args.push(Value::Binary(b"x".to_vec()));
            }
            let err = client.call(method, args, vec![]).await.expect_err("escape refused");
            assert!(err.to_string().contains("escapes"), "{method} {path}: {err}");
        }
        assert!(!outside.exists() && !std::path::Path::new("/etc/bai-agent-test-escape").exists());
        client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
    });
}

#[test]
fn an_oom_killed_kernel_is_reported_as_such() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21300)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("collector");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        // The kernel's main process reads /dev/zero into memory until the limit kills it.
        let config = with_field(
            kernel_config(BUSYBOX_IMAGE, "1", "64m"),
            "startup_command",
            "sleep 1; exec tail /dev/zero".into(),
        );
        let kernel = unique("kernel");
        let created = create(&client, "s", &kernel, config).await.expect("create");
        let container = created_id(&created, "container_id");
        wait_until("kernel_terminated", Duration::from_secs(30), || {
            collector.events().iter().any(|e| e.name == "kernel_terminated")
        })
        .expect("reported");
        let event = collector.events().into_iter().find(|e| e.name == "kernel_terminated").expect("event");
        let args = event.args_value();
        let args = args.as_array().expect("tuple");
        assert_eq!(args[0].as_str(), Some(kernel.as_str()));
        assert_eq!(args[2].as_str(), Some("oom-killed"), "{args:?}");
        wait_until("cleanup", Duration::from_secs(10), || !container_exists(&container)).expect("container removed");
        assert!(list(&client).await.is_empty());
    });
}

#[test]
fn restart_keeps_scratch_and_allocation_and_sync_drops_unknown_kernels() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21350)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("collector");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let created =
            create(&client, "s", &kernel, kernel_config(BUSYBOX_IMAGE, "1", "268435456")).await.expect("create");
        let first = created_id(&created, "container_id");
        let cpuset = docker_inspect(&first, "{{.HostConfig.CpusetCpus}}");
        client
            .call(
                "upload_file",
                vec![kernel.as_str().into(), "kept.txt".into(), Value::Binary(b"kept".to_vec())],
                vec![],
            )
            .await
            .expect("upload");
        let restarted = client
            .call("restart_kernel", vec!["s".into(), kernel.as_str().into(), BUSYBOX_IMAGE.into(), map(vec![])], vec![])
            .await
            .expect("restart");
        let second = field(&restarted, "container_id").as_str().expect("container").to_owned();
        assert_ne!(first, second, "a new container");
        assert!(!container_exists(&first), "the old container is gone");
        assert_eq!(docker_inspect(&second, "{{.HostConfig.CpusetCpus}}"), cpuset, "same cores");
        let out = Command::new("docker").args(["exec", &second, "cat", "/home/work/kept.txt"]).output().expect("exec");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept", "same scratch");
        assert_eq!(
            client.call("check_running", vec![kernel.as_str().into()], vec![]).await.expect("check"),
            Value::Boolean(true)
        );

        // The manager knows another kernel, not this one: ours goes, theirs is reported gone.
        let theirs = unique("kernel");
        let pairs = Value::Array(vec![Value::Array(vec![theirs.as_str().into(), "s2".into()])]);
        client.call("sync_kernel_registry", vec![pairs], vec![]).await.expect("sync");
        assert!(list(&client).await.is_empty(), "the kernel the manager does not know is destroyed");
        assert!(!container_exists(&second));
        wait_until("already-terminated for the manager's kernel", Duration::from_secs(10), || {
            collector.events().iter().any(|e| {
                e.name == "kernel_terminated"
                    && e.args_value().as_array().and_then(|a| a.first()).and_then(Value::as_str)
                        == Some(theirs.as_str())
            })
        })
        .expect("reported");
    });
}

#[test]
fn the_python_callosum_client_creates_and_destroys_a_kernel() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21400)).expect("agent starts");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/callosum_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([agent.rpc_addr.as_str(), "lifecycle", BUSYBOX_IMAGE])
        .output()
        .expect("python3 runs (cargo xtask setup installs callosum)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the client failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("JSON from the client");
    let created = &result["created"][0];
    assert_eq!(created["id"], result["kernel_id"]);
    let container = created["container_id"].as_str().expect("a container id");
    assert_eq!(result["running"], serde_json::Value::Bool(true));
    // A destroyed kernel is not running (the manager's terminator relies on False, not an error).
    assert_eq!(result["after_destroy"]["raised"], serde_json::Value::Null, "{result}");
    assert_eq!(result["after_destroy"]["value"], serde_json::Value::Bool(false), "{result}");
    assert!(!container_exists(container), "destroy_kernel removed the container");
}

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The image config of `image` in a registry at `addr`, with the login the manager sends
/// (`registry: {name, url, username, password}`).
fn image_in_registry(image: &str, addr: &str, login: Option<(&str, &str)>) -> Value {
    let text = |value: Option<&str>| value.map_or(Value::Nil, Value::from);
    map(vec![
        ("canonical", image.into()),
        ("digest", "".into()),
        ("labels", map(vec![])),
        (
            "registry",
            map(vec![
                ("name", addr.into()),
                ("url", format!("http://{addr}").into()),
                ("username", text(login.map(|(user, _)| user))),
                ("password", text(login.map(|(_, password)| password))),
            ]),
        ),
    ])
}

#[test]
fn a_missing_image_is_pulled_only_when_auto_pull_allows_and_with_the_registrys_login() {
    require_environment();
    let registry = LocalRegistry::start_with_login("puller", "s3cret pass").expect("registry starts");
    let image = format!("{}/bai-test/pull-me:{}", registry.addr, unique("tag"));
    docker(&["tag", BUSYBOX_IMAGE, &image]);
    registry.login("puller", "s3cret pass").expect("docker login to the test registry");
    registry.docker(&["push", &image]).expect("push");
    docker(&["rmi", &image]);

    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21450)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("collector");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let refused = create(&client, "s", &unique("kernel"), kernel_config(&image, "1", "268435456")).await;
        assert!(refused.expect_err("not present").contains("not present"));
        // Without the registry's login the pull is refused, and the error says so.
        let anonymous = with_field(
            with_field(kernel_config(&image, "1", "268435456"), "auto_pull", true.into()),
            "image",
            image_in_registry(&image, &registry.addr, None),
        );
        let refused = create(&client, "s", &unique("kernel"), anonymous).await.expect_err("no login");
        assert!(refused.contains("pull") && refused.contains(&registry.addr), "{refused}");
        let config = with_field(
            with_field(kernel_config(&image, "1", "268435456"), "auto_pull", true.into()),
            "image",
            image_in_registry(&image, &registry.addr, Some(("puller", "s3cret pass"))),
        );
        let kernel = unique("kernel");
        let created = create(&client, "s", &kernel, config).await.expect("pulled and started");
        let container = created_id(&created, "container_id");
        assert_eq!(docker_inspect(&container, "{{.Config.Image}}"), image);
        let names: Vec<String> = collector.events().into_iter().map(|e| e.name).collect();
        assert!(names.contains(&"kernel_pulling".to_string()), "{names:?}");
        assert!(names.contains(&"kernel_pull_progress".to_string()), "{names:?}");
        client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
    });
    let _ = Command::new("docker").args(["rmi", &image]).output();
}

#[test]
fn services_declared_by_the_image_are_published_on_loopback() {
    require_environment();
    let image = format!("bai-test/with-services:{}", unique("tag"));
    let dockerfile =
        format!("FROM {BUSYBOX_IMAGE}\nLABEL ai.backend.service-ports=\"web:http:8080,notebook:http:8888\"\n");
    let mut build = Command::new("docker")
        .args(["build", "-q", "-t", &image, "-"])
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker build");
    std::io::Write::write_all(build.stdin.as_mut().expect("stdin"), dockerfile.as_bytes()).expect("Dockerfile");
    drop(build.stdin.take());
    assert!(build.wait().expect("build").success());

    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21550)).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let created = create(&client, "s", &kernel, kernel_config(&image, "1", "268435456")).await.expect("create");
        let info = &created.as_array().expect("list")[0];
        let container = created_id(&created, "container_id");
        let bindings = docker_inspect(&container, "{{json .HostConfig.PortBindings}}");
        let services = field(info, "service_ports").as_array().expect("service_ports").clone();
        let names: Vec<&str> = services.iter().filter_map(|s| field(s, "name").as_str()).collect();
        assert_eq!(names, ["sshd", "ttyd", "web", "notebook"]);
        for service in &services {
            let container_port = field(service, "container_ports").as_array().expect("list")[0].as_u64().expect("port");
            let host_port = field(service, "host_ports").as_array().expect("list")[0].as_u64().expect("port");
            assert!((21550..=21589).contains(&host_port), "host port {host_port} from the pool");
            let expected =
                format!("\"{container_port}/tcp\":[{{\"HostIp\":\"127.0.0.1\",\"HostPort\":\"{host_port}\"}}]");
            assert!(bindings.contains(&expected), "{expected} in {bindings}");
        }
        client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
    });
    let _ = Command::new("docker").args(["rmi", &image]).output();
}

#[test]
fn pool_ports_held_by_another_process_are_skipped() {
    require_environment();
    // Another program on the node holds the first ports of the agent's pool.
    let holders: Vec<std::net::TcpListener> =
        (21600..21603).filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok()).collect();
    assert!(!holders.is_empty(), "could not hold any pool port for the test");
    let held: Vec<u16> = holders.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21600)).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let created = create(&client, "s", &kernel, kernel_config(BUSYBOX_IMAGE, "1", "268435456")).await;
        let created = created.expect("the kernel starts on other ports");
        let info = &created.as_array().expect("list")[0];
        for name in ["repl_in_port", "repl_out_port"] {
            let port = u16::try_from(field(info, name).as_u64().expect("port")).expect("u16");
            assert!(!held.contains(&port), "{name} {port} is held by another process");
        }
        client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![]).await.expect("destroy");
    });
    drop(holders);
}

/// Backend.AI 26.9's image step before `create_kernels`: `check_and_pull` answers a task id per
/// image at once and reports each image by event. An image of the `local` registry is never
/// pulled: present, it is `image_pull_finished` ("Image already exists"); absent,
/// `image_pull_failed` naming it. The kernel then runs the local image by its short name
/// (`local/bai-test/busybox:latest` → `bai-test/busybox:latest`). `check_pulling` and
/// `check_creating` answer for what is not pulling and for a kernel that exists or not.
#[test]
fn check_and_pull_reports_local_images_without_pulling_and_they_run_by_short_name() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21700)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("collector");
    let local_image = |canonical: &str| {
        map(vec![
            ("canonical", canonical.into()),
            ("project", "bai-test".into()),
            ("registry", map(vec![("name", "local".into()), ("url", "http://localhost".into())])),
            ("is_local", true.into()),
            ("digest", "".into()),
            ("auto_pull", "digest".into()),
            ("labels", map(vec![])),
        ])
    };
    let present = format!("local/{BUSYBOX_IMAGE}");
    let absent = "local/bai-test/not-built-here:1.0".to_owned();
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let images = map(vec![(present.as_str(), local_image(&present)), (absent.as_str(), local_image(&absent))]);
        let tasks = client
            .call("check_and_pull", vec![images], vec![("agent_id".to_owned(), agent.id.as_str().into())])
            .await
            .expect("check_and_pull");
        for image in [&present, &absent] {
            let task = field(&tasks, image).as_str().unwrap_or_default().to_owned();
            assert!(task.len() == 32 && task.chars().all(|c| c.is_ascii_hexdigit()), "task id of {image}: {tasks}");
        }
        let pulling = client.call("check_pulling", vec![present.as_str().into()], vec![]).await.expect("check");
        assert_eq!(pulling, Value::Boolean(false));

        let kernel = unique("kernel");
        let known = client.call("check_creating", vec![kernel.as_str().into()], vec![]).await.expect("check");
        assert_eq!(known, Value::Boolean(false), "not created yet");
        let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "268435456"), "image", local_image(&present));
        let created = create(&client, "s", &kernel, config).await.expect("a local image runs by its short name");
        let container = created_id(&created, "container_id");
        assert_eq!(docker_inspect(&container, "{{.Config.Image}}"), BUSYBOX_IMAGE);
        let known = client.call("check_creating", vec![kernel.as_str().into()], vec![]).await.expect("check");
        assert_eq!(known, Value::Boolean(true));
        client
            .call("destroy_kernel", vec![kernel.as_str().into(), "s".into(), "user-requested".into()], vec![])
            .await
            .expect("destroy");
    });
    wait_until("both image events", Duration::from_secs(20), || {
        collector.events().iter().filter(|e| e.name.starts_with("image_pull_")).count() >= 2
    })
    .expect("image events");
    let events = collector.events();
    let image_event = |name: &str| {
        let event = events.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("no {name}"));
        event.args_value().as_array().cloned().unwrap_or_default()
    };
    let finished = image_event("image_pull_finished");
    assert_eq!(finished[0].as_str(), Some(present.as_str()));
    assert_eq!(finished[3].as_str(), Some("Image already exists"));
    let failed = image_event("image_pull_failed");
    assert_eq!(failed[0].as_str(), Some(absent.as_str()));
    assert!(failed[3].as_str().is_some_and(|m| m.contains("not-built-here")), "{failed:?}");
    assert!(!events.iter().any(|e| e.name == "image_pull_started"), "nothing was pulled");
}

/// A multi-container session as the 26.9 manager runs one: `create_local_network`, then one
/// `create_kernels` whose `cluster_info.network_name` names it and whose configs carry each
/// kernel's `cluster_hostname`; each kernel resolves the other by that name; after the kernels,
/// `destroy_local_network` removes the network (and a second call, or one for a network that
/// never existed, is fine).
#[test]
fn a_multi_container_session_shares_a_network_where_kernels_resolve_each_other() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21750)).expect("agent starts");
    let network = unique("bai-test-net");
    // Removed whatever happens to the test (the agent removes it on the way that passes).
    struct RemoveOnDrop(String);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["network", "rm", &self.0]).output();
        }
    }
    let _cleanup = RemoveOnDrop(network.clone());
    let network_exists = |name: &str| {
        Command::new("docker").args(["network", "inspect", name]).output().is_ok_and(|o| o.status.success())
    };
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        for _ in 0..2 {
            client.call("create_local_network", vec![network.as_str().into()], vec![]).await.expect("create network");
        }
        assert!(network_exists(&network), "the network exists");
        let (main, sub) = (unique("kernel"), unique("kernel"));
        let config = |hostname: &str| {
            with_field(kernel_config(BUSYBOX_IMAGE, "1", "134217728"), "cluster_hostname", hostname.into())
        };
        let created = client
            .call(
                "create_kernels",
                vec![
                    "s-cluster".into(),
                    Value::Array(vec![main.as_str().into(), sub.as_str().into()]),
                    Value::Array(vec![config("main1"), config("sub1")]),
                    map(vec![
                        ("mode", "single-node".into()),
                        ("size", 2.into()),
                        ("network_name", network.as_str().into()),
                    ]),
                    map(vec![]),
                ],
                vec![],
            )
            .await
            .expect("create both");
        let containers: Vec<String> = created
            .as_array()
            .expect("results")
            .iter()
            .map(|r| field(r, "container_id").as_str().unwrap_or_default().to_owned())
            .collect();
        for (container, other) in [(&containers[0], "sub1"), (&containers[1], "main1")] {
            let out = Command::new("docker").args(["exec", container, "nslookup", other]).output().expect("exec");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains("Address"), "{other} does not resolve: {text}");
        }
        for kernel in [&main, &sub] {
            client
                .call(
                    "destroy_kernel",
                    vec![kernel.as_str().into(), "s-cluster".into(), "user-requested".into()],
                    vec![],
                )
                .await
                .expect("destroy");
        }
        for _ in 0..2 {
            client.call("destroy_local_network", vec![network.as_str().into()], vec![]).await.expect("destroy network");
        }
        assert!(!network_exists(&network), "the network is gone");
    });
}

/// `purge_images` as the 26.9 manager calls it: each image removed, or its error said, in
/// `{"responses": [{"image", "error"}]}`.
#[test]
fn purge_images_removes_each_image_and_names_what_failed() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21850)).expect("agent starts");
    let doomed = format!("bai-test/purge-me:{}", unique("t"));
    let tagged = Command::new("docker").args(["tag", BUSYBOX_IMAGE, &doomed]).status().expect("docker tag");
    assert!(tagged.success(), "docker tag {BUSYBOX_IMAGE} {doomed}");
    let missing = "bai-test/never-built:1".to_owned();
    let reply = runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        client
            .call(
                "purge_images",
                vec![Value::Array(vec![doomed.as_str().into(), missing.as_str().into()]), false.into(), false.into()],
                vec![("agent_id".to_owned(), agent.id.as_str().into())],
            )
            .await
            .expect("purge_images")
    });
    let responses = field(&reply, "responses").as_array().cloned().unwrap_or_default();
    assert_eq!(responses.len(), 2, "{reply}");
    assert_eq!(field(&responses[0], "image").as_str(), Some(doomed.as_str()));
    assert_eq!(field(&responses[0], "error"), &Value::Nil, "{reply}");
    assert!(field(&responses[1], "error").as_str().is_some_and(|e| e.contains("never-built")), "{reply}");
    let gone = Command::new("docker").args(["image", "inspect", &doomed]).output().expect("docker");
    assert!(!gone.status.success(), "{doomed} is removed");
    let kept = Command::new("docker").args(["image", "inspect", BUSYBOX_IMAGE]).output().expect("docker");
    assert!(kept.status.success(), "the image it was tagged from stays");
}

/// A session's `bootstrap_script` (as the 26.9 manager sends it in the kernel config) is written
/// to the kernel's `work/bootstrap.sh` and run once by the kernel runner, in the work dir with
/// the kernel's environment, before the kernel serves.
#[test]
fn the_bootstrap_script_runs_once_in_the_work_dir_with_the_kernels_environment() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 21900)).expect("agent starts");
    let script = "echo \"booted $GREETING in $(pwd)\" >> /home/work/booted.txt\n";
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "268435456"), "bootstrap_script", script.into());
        let created = create(&client, "s", &kernel, config).await.expect("create");
        let container = created_id(&created, "container_id");
        let read = || {
            let out = Command::new("docker").args(["exec", &container, "cat", "/home/work/booted.txt"]).output();
            out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        wait_until("the bootstrap script's output", Duration::from_secs(20), || read().is_some()).expect("it ran");
        let out =
            Command::new("docker").args(["exec", &container, "cat", "/home/work/bootstrap.sh"]).output().expect("exec");
        assert_eq!(String::from_utf8_lossy(&out.stdout), script, "the script as sent");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(read().as_deref(), Some("booted hello in /home/work\n"), "once, in the work dir, with environ");
        client
            .call("destroy_kernel", vec![kernel.as_str().into(), "s".into(), "user-requested".into()], vec![])
            .await
            .expect("destroy");
    });
}
