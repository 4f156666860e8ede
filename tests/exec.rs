//! Code execution through the RPC into real kernels (busybox shell and Debian python3) run by
//! the mounted bai-krunner: state across snippets, output order and bytes, continued runs,
//! input, interrupt, services, batch jobs, output truncation and a kernel that stops answering.

use std::{process::Command, time::Duration};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, EventCollector, PYTHON_IMAGE,
    kernels::{create, created_id, field, kernel_config, kernel_toml, map, runtime},
    require_environment, test_redis, unique, wait_until,
};
use rmpv::Value;

/// One `execute` call.
async fn execute(
    client: &RpcClient,
    kernel: &str,
    run_id: &str,
    mode: &str,
    code: &str,
    opts: Value,
    flush: Option<f64>,
) -> Result<Value, String> {
    let args = vec![
        "session".into(),
        kernel.into(),
        2.into(),
        run_id.into(),
        mode.into(),
        code.into(),
        opts,
        flush.map_or(Value::Nil, Value::F64),
    ];
    client.call("execute", args, vec![]).await.map_err(|err| err.to_string())
}

fn status(result: &Value) -> &str {
    field(result, "status").as_str().unwrap_or_default()
}

/// The console of an API v2 result as (kind, bytes), bytes whether sent as text or binary.
fn console(result: &Value) -> Vec<(String, Vec<u8>)> {
    let items = field(result, "console").as_array().cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|item| {
            let pair = item.as_array()?;
            let data = match &pair[1] {
                Value::String(s) => s.as_bytes().to_vec(),
                Value::Binary(b) => b.clone(),
                other => other.to_string().into_bytes(),
            };
            Some((pair[0].as_str()?.to_owned(), data))
        })
        .collect()
}

fn stream(items: &[(String, Vec<u8>)], kind: &str) -> Vec<u8> {
    items.iter().filter(|(k, _)| k == kind).flat_map(|(_, d)| d.clone()).collect()
}

/// Runs `code` in query mode to its end; all console items and the exit code.
async fn run(client: &RpcClient, kernel: &str, code: &str) -> (Vec<(String, Vec<u8>)>, i64) {
    let run_id = unique("run");
    let mut result = execute(client, kernel, &run_id, "query", code, Value::Nil, Some(0.5)).await.expect("execute");
    let mut items = console(&result);
    while status(&result) == "continued" {
        result = execute(client, kernel, &run_id, "continue", "", Value::Nil, Some(0.5)).await.expect("continue");
        items.extend(console(&result));
    }
    assert_eq!(status(&result), "finished", "{result}");
    assert_eq!(field(&result, "runId").as_str(), Some(run_id.as_str()));
    (items, field(&result, "exitCode").as_i64().expect("exitCode"))
}

fn start_kernel(client: &RpcClient, rt: &tokio::runtime::Runtime, image: &str) -> (String, String) {
    let kernel = unique("kernel");
    let created =
        rt.block_on(create(client, "session", &kernel, kernel_config(image, "1", "268435456"))).expect("create");
    (kernel, created_id(&created, "container_id"))
}

fn host_port(container: &str, port: u16) -> u16 {
    let out = Command::new("docker").args(["port", container, &port.to_string()]).output().expect("docker port");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    first.rsplit(':').next().and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("no host port: {text}"))
}

fn http_status(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /hello.txt HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    Some(reply)
}

#[test]
fn shell_kernel_keeps_state_orders_output_and_passes_bytes() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 24000)).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let (kernel, container) = start_kernel(&client, &rt, BUSYBOX_IMAGE);
    let entrypoint = bai_agent_tests::kernels::docker_inspect(&container, "{{json .Config.Entrypoint}}");
    assert!(entrypoint.contains("/opt/kernel/bai-krunner"), "the runner is the entrypoint: {entrypoint}");
    rt.block_on(async {
        let (items, code) = run(&client, &kernel, "COUNT=41; mkdir -p sub; cd sub; echo started").await;
        assert_eq!((stream(&items, "stdout"), code), (b"started\n".to_vec(), 0));
        // Variables and the working directory survive into the next snippet.
        let (items, code) = run(&client, &kernel, "echo $((COUNT + 1)) $(pwd)").await;
        assert_eq!(String::from_utf8_lossy(&stream(&items, "stdout")), "42 /home/work/sub\n");
        assert_eq!(code, 0);
        // stdout and stderr keep their order (apart in time, as two pipes must be).
        let (items, code) =
            run(&client, &kernel, "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; sh -c 'exit 3'").await;
        let kinds: Vec<(&str, &[u8])> = items.iter().map(|(k, d)| (k.as_str(), d.as_slice())).collect();
        assert_eq!(kinds, vec![("stdout", &b"one\n"[..]), ("stderr", b"two\n"), ("stdout", b"three\n")]);
        assert_eq!(code, 3);
        // Bytes that are not UTF-8 arrive unchanged.
        let (items, _) = run(&client, &kernel, r"printf '\377\376\000raw\n'").await;
        assert_eq!(stream(&items, "stdout"), b"\xff\xfe\x00raw\n");

        // API v1 keeps the streams apart.
        let args = vec![
            "session".into(),
            kernel.as_str().into(),
            1.into(),
            "v1".into(),
            "query".into(),
            "echo out; echo err >&2".into(),
            Value::Nil,
            Value::Nil,
        ];
        let v1 = client.call("execute", args, vec![]).await.expect("v1");
        assert_eq!(field(&v1, "stdout").as_str(), Some("out\n"), "{v1}");
        assert_eq!(field(&v1, "stderr").as_str(), Some("err\n"));
        assert!(field(&v1, "console").is_nil());

        // Batch mode: each step ends with its own status.
        let opts = map(vec![
            ("clean", "rm -f built".into()),
            ("build", "echo compiled > built".into()),
            ("exec", "cat built; exit 4".into()),
        ]);
        let mut result = execute(&client, &kernel, "b1", "batch", "", opts, None).await.expect("batch");
        let mut ends = vec![status(&result).to_owned()];
        let mut items = console(&result);
        while status(&result) != "finished" {
            result = execute(&client, &kernel, "b1", "continue", "", Value::Nil, None).await.expect("continue");
            ends.push(status(&result).to_owned());
            items.extend(console(&result));
        }
        assert_eq!(ends, vec!["clean-finished", "build-finished", "finished"]);
        assert_eq!(stream(&items, "stdout"), b"compiled\n");
        assert_eq!(field(&result, "exitCode").as_i64(), Some(4));

        // Bad requests are named and change nothing.
        let err = execute(&client, &kernel, "x", "eval", "1", Value::Nil, None).await.expect_err("mode");
        assert!(err.contains("mode"), "{err}");
        let err = execute(&client, &kernel, "x", "continue", "", Value::Nil, None).await.expect_err("no run");
        assert!(err.contains("no run in progress"), "{err}");
        let err = execute(&client, "no-such-kernel", "x", "query", "true", Value::Nil, None).await.expect_err("id");
        assert!(err.contains("no-such-kernel"), "{err}");
        let (items, _) = run(&client, &kernel, "echo still $COUNT").await;
        assert_eq!(stream(&items, "stdout"), b"still 41\n");
    });
}

#[test]
fn python_kernel_continues_takes_input_and_survives_interrupt() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 24040)).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let (kernel, _) = start_kernel(&client, &rt, PYTHON_IMAGE);
    rt.block_on(async {
        let (items, code) = run(&client, &kernel, "import sys, time\nanswer = 6 * 7\nprint('ready')").await;
        assert_eq!((stream(&items, "stdout"), code), (b"ready\n".to_vec(), 0));
        let (items, _) = run(&client, &kernel, "print(answer)").await;
        assert_eq!(stream(&items, "stdout"), b"42\n", "globals survive between snippets");

        // A long job: `continued` with what it printed so far, then `finished`.
        let code = "print('first', flush=True)\ntime.sleep(2)\nprint('second')";
        let first = execute(&client, &kernel, "long", "query", code, Value::Nil, Some(0.7)).await.expect("long");
        assert_eq!(status(&first), "continued", "{first}");
        assert_eq!(stream(&console(&first), "stdout"), b"first\n");
        let mut result = first;
        let mut rest = Vec::new();
        while status(&result) == "continued" {
            result = execute(&client, &kernel, "long", "continue", "", Value::Nil, Some(0.7)).await.expect("more");
            rest.extend(console(&result));
        }
        assert_eq!(status(&result), "finished");
        assert_eq!(stream(&rest, "stdout"), b"second\n");

        // input(): the run waits, the answer comes through mode `input`.
        let asked = execute(
            &client,
            &kernel,
            "ask",
            "query",
            "name = input('name? ')\nprint('hello', name)",
            Value::Nil,
            Some(5.0),
        )
        .await
        .expect("ask");
        assert_eq!(status(&asked), "waiting-input", "{asked}");
        assert_eq!(field(field(&asked, "options"), "is_password").as_bool(), Some(false));
        let answered = execute(&client, &kernel, "ask", "input", "Ada", Value::Nil, Some(5.0)).await.expect("input");
        assert_eq!(status(&answered), "finished", "{answered}");
        assert!(String::from_utf8_lossy(&stream(&console(&answered), "stdout")).contains("hello Ada"));

        // Interrupt an endless loop; the kernel keeps its state and runs the next snippet.
        let looping = execute(&client, &kernel, "loop", "query", "n = 0\nwhile True: n += 1", Value::Nil, Some(0.5))
            .await
            .expect("loop");
        assert_eq!(status(&looping), "continued");
        let reply = client.call("interrupt_kernel", vec![kernel.as_str().into()], vec![]).await.expect("interrupt");
        assert_eq!(field(&reply, "status").as_str(), Some("finished"));
        let (items, code) = run(&client, &kernel, "print(answer, n > 0)").await;
        assert_eq!(String::from_utf8_lossy(&stream(&items, "stdout")), "42 True\n");
        assert_eq!(code, 0);

        // Raw bytes pass through unchanged; stderr keeps its place.
        let (items, _) =
            run(&client, &kernel, "sys.stdout.buffer.write(b'\\xff\\xfe ok\\n'); sys.stdout.flush()").await;
        assert_eq!(stream(&items, "stdout"), b"\xff\xfe ok\n");
        let (items, code) = run(&client, &kernel, "raise ValueError('bad value')").await;
        assert!(String::from_utf8_lossy(&stream(&items, "stderr")).contains("ValueError: bad value"));
        assert_ne!(code, 0);

        let completions = client
            .call("get_completions", vec![kernel.as_str().into(), "ans".into(), map(vec![])], vec![])
            .await
            .expect("completions");
        assert_eq!(field(&completions, "status").as_str(), Some("finished"), "{completions}");
        let candidates = field(&completions, "completions").as_array().cloned().unwrap_or_default();
        assert!(candidates.contains(&Value::from("answer")), "the kernel's own names: {completions}");
    });
}

#[test]
fn services_start_on_their_published_port_and_stop() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 24080)).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    for image in [BUSYBOX_IMAGE, PYTHON_IMAGE] {
        let (kernel, container) = start_kernel(&client, &rt, image);
        let port = host_port(&container, 8080);
        rt.block_on(async {
            run(
                &client,
                &kernel,
                if image == PYTHON_IMAGE {
                    "open('hello.txt', 'w').write('hello from the kernel\\n')"
                } else {
                    "echo 'hello from the kernel' > hello.txt"
                },
            )
            .await;
            let args = vec![kernel.as_str().into(), "http".into(), map(vec![])];
            let started = client.call("start_service", args, vec![]).await.expect("start_service");
            assert_eq!(field(&started, "status").as_str(), Some("started"), "{image}: {started}");
            let again = client
                .call("start_service", vec![kernel.as_str().into(), "http".into(), map(vec![])], vec![])
                .await
                .expect("again");
            assert_eq!(field(&again, "status").as_str(), Some("running"), "{again}");
            let err = client
                .call("start_service", vec![kernel.as_str().into(), "nope".into(), map(vec![])], vec![])
                .await
                .expect_err("unknown service");
            assert!(err.to_string().contains("no service `nope`"), "{err}");
        });
        let reply = http_status(port).unwrap_or_default();
        assert!(reply.starts_with("HTTP/1.") && reply.contains(" 200"), "{image} on 127.0.0.1:{port}: {reply}");
        assert!(reply.contains("hello from the kernel"), "{reply}");
        rt.block_on(client.call("shutdown_service", vec![kernel.as_str().into(), "http".into()], vec![]))
            .expect("shutdown_service");
        wait_until("the service stops", Duration::from_secs(10), || http_status(port).is_none_or(|r| r.is_empty()))
            .expect("stopped");
    }
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn huge_output_is_truncated_without_growing_the_agent_and_silence_is_exec_timeout() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "{}\n[kernel-runner]\noutput-limit = \"1m\"\nresponse-timeout = \"2s\"\n",
        kernel_toml(dir.path(), 24120)
    );
    let agent = Agent::start(&toml).expect("agent starts");
    let pid = agent.pid().expect("agent pid");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let (kernel, container) = start_kernel(&client, &rt, BUSYBOX_IMAGE);
    rt.block_on(async {
        run(&client, &kernel, "true").await;
        // The peak so far is the agent's start-up (loading the eBPF programs), whose heap it
        // has handed back: start the peak (VmHWM) afresh at the current RSS.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the agent's peak RSS");
        let before = rss_kib(pid, "VmRSS:");
        // 100 MB of output, collected in steps as a client streaming it would.
        let (items, code) = run(&client, &kernel, "head -c 100000000 /dev/zero | tr '\\0' x; echo; echo end").await;
        assert_eq!(code, 0);
        let stdout = stream(&items, "stdout");
        assert_eq!(stdout.len(), 1 << 20, "stdout stops at the limit");
        let stderr = String::from_utf8_lossy(&stream(&items, "stderr")).into_owned();
        assert!(stderr.contains("output truncated at 1048576 bytes"), "{stderr}");
        // 100 MB of x, a newline and "end\n": everything past the first MiB is counted.
        let dropped = 100_000_000 + 1 + 4 - (1 << 20);
        assert!(stderr.contains(&format!("{dropped} more bytes")), "every dropped byte is counted: {stderr}");
        let peak = rss_kib(pid, "VmHWM:");
        assert!(peak < before + 32 * 1024, "agent memory grew from {before} KiB to a peak of {peak} KiB");
        let (items, _) = run(&client, &kernel, "echo next run").await;
        assert_eq!(stream(&items, "stdout"), b"next run\n", "the limit is per run");
    });

    // A kernel that stops answering: exec-timeout, not a hung call; it answers again later.
    let paused = Command::new("docker").args(["pause", &container]).status().expect("docker pause");
    assert!(paused.success());
    rt.block_on(async {
        let started = std::time::Instant::now();
        let result = execute(&client, &kernel, "frozen", "query", "echo thawed", Value::Nil, None).await;
        let unpaused = Command::new("docker").args(["unpause", &container]).status().expect("docker unpause");
        assert!(unpaused.success());
        let result = result.expect("execute");
        assert_eq!(status(&result), "exec-timeout", "{result}");
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        let mut result =
            execute(&client, &kernel, "frozen", "continue", "", Value::Nil, Some(5.0)).await.expect("continue");
        let mut items = console(&result);
        // A kernel just thawed may take longer than one response timeout to speak again (on a
        // loaded node): until a deadline, "not yet" is an answer, not the end of the run.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while matches!(status(&result), "continued" | "exec-timeout") && std::time::Instant::now() < deadline {
            result =
                execute(&client, &kernel, "frozen", "continue", "", Value::Nil, Some(5.0)).await.expect("continue");
            items.extend(console(&result));
        }
        assert_eq!(status(&result), "finished", "{result}");
        assert_eq!(stream(&items, "stdout"), b"thawed\n");
    });
}

#[test]
fn batch_jobs_report_session_success_and_failure() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 24160)).expect("agent starts");
    let collector = EventCollector::start(&test_redis(), 4, &agent.id).expect("collector");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let session_events = |session: &str| {
        collector
            .events()
            .into_iter()
            .filter(|e| e.name.starts_with("session_"))
            .filter_map(|e| {
                let args = e.args_value();
                let args = args.as_array()?.clone();
                (args.first()?.as_str()? == session).then(|| (e.name.clone(), args))
            })
            .collect::<Vec<_>>()
    };
    for (code, expected, reason, exit) in [
        ("echo working; test -d /home/work", "session_success", "task-finished", 0),
        ("echo failing; exit 7", "session_failure", "task-failed", 7),
    ] {
        let session = unique("batch-session");
        let kernel = unique("kernel");
        let config = kernel_config(BUSYBOX_IMAGE, "1", "268435456");
        let config = bai_agent_tests::kernels::with_field(config, "session_type", "batch".into());
        let config = bai_agent_tests::kernels::with_field(config, "startup_command", code.into());
        rt.block_on(create(&client, &session, &kernel, config)).expect("create");
        let args = vec![session.as_str().into(), kernel.as_str().into(), code.into(), 30.into()];
        let reply = rt.block_on(client.call("trigger_batch_execution", args, vec![])).expect("trigger");
        assert!(reply.is_nil());
        wait_until(expected, Duration::from_secs(30), || !session_events(&session).is_empty()).expect(expected);
        let events = session_events(&session);
        assert_eq!(events.len(), 1, "{events:?}");
        let (name, args) = &events[0];
        assert_eq!(name, expected);
        assert_eq!(args[1].as_str(), Some(reason));
        assert_eq!(args[2].as_i64(), Some(exit));
    }
    let err = rt
        .block_on(client.call(
            "trigger_batch_execution",
            vec!["s".into(), "missing".into(), "true".into(), Value::Nil],
            vec![],
        ))
        .expect_err("unknown kernel");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn an_image_with_its_own_runner_keeps_its_entrypoint() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    // An image that carries a Backend.AI-compatible runner as its own entrypoint.
    let context = dir.path().join("image");
    std::fs::create_dir_all(&context).expect("context");
    std::fs::copy("/opt/bai-agent/bin/bai-krunner", context.join("image-runner")).expect("copy the runner");
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX_IMAGE}\nCOPY image-runner /usr/local/bin/image-runner\n\
             LABEL ai.backend.kernel-runner=image\nENTRYPOINT [\"/usr/local/bin/image-runner\"]\n"
        ),
    )
    .expect("Dockerfile");
    let image = "bai-test/own-runner:latest";
    let built = Command::new("docker")
        .args(["build", "-q", "-t", image])
        .arg(&context)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(built.status.success(), "docker build: {}", String::from_utf8_lossy(&built.stderr));

    let agent = Agent::start(&kernel_toml(dir.path(), 24200)).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let (kernel, container) = start_kernel(&client, &rt, image);
    let entrypoint = bai_agent_tests::kernels::docker_inspect(&container, "{{json .Config.Entrypoint}}");
    assert_eq!(entrypoint, r#"["/usr/local/bin/image-runner"]"#);
    let mounts = bai_agent_tests::kernels::docker_inspect(&container, "{{range .Mounts}}{{.Destination}} {{end}}");
    assert!(!mounts.contains("/opt/kernel"), "no runner mounted: {mounts}");
    let (items, code) = rt.block_on(run(&client, &kernel, "echo from the image runner"));
    assert_eq!((stream(&items, "stdout"), code), (b"from the image runner\n".to_vec(), 0));
    rt.block_on(client.call("destroy_kernel", vec![kernel.as_str().into(), "session".into()], vec![]))
        .expect("destroy");
    Command::new("docker").args(["rmi", "-f", image]).output().ok();
}

#[test]
fn interpreter_state_survives_a_kill_9_of_the_agent() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("state");
    let id = unique("i-test");
    let toml = kernel_toml(dir.path(), 24240);
    let mut agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let (kernel, _) = start_kernel(&client, &rt, BUSYBOX_IMAGE);
    rt.block_on(run(&client, &kernel, "KEPT=across-restarts; cd /tmp"));
    drop(client);
    agent.kill_hard().expect("kill -9");
    let agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent restarts");
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect again");
    wait_until("the kernel is recovered", Duration::from_secs(20), || {
        rt.block_on(client.call("check_running", vec![kernel.as_str().into()], vec![]))
            .is_ok_and(|v| v == Value::from(true))
    })
    .expect("recovered");
    let (items, code) = rt.block_on(run(&client, &kernel, "echo $KEPT $(pwd)"));
    assert_eq!(String::from_utf8_lossy(&stream(&items, "stdout")), "across-restarts /tmp\n");
    assert_eq!(code, 0);
}
