//! `bai-agentctl` against a real `bai-agent`: the node commands (`ping`, `hwinfo`,
//! `config`, `health`) in human and JSON output, the address options, and the one-line
//! errors with exit status 1 (a FAILURE reply, a refused connection).

use std::{
    net::TcpListener,
    process::{Command, Output},
};

use bai_agent_tests::{Agent, agentctl_binary, require_environment};
use serde_json::Value;

fn agentctl(agent: &Agent, args: &[&str]) -> Output {
    let binary = agentctl_binary();
    assert!(binary.exists(), "no bai-agentctl at {} (build the workspace first)", binary.display());
    Command::new(&binary)
        .args(["--agent", &format!("tcp://{}", agent.rpc_addr), "--timeout", "20"])
        .args(args)
        .env_remove("BAI_AGENT_ADDR")
        .output()
        .expect("runs bai-agentctl")
}

/// Standard output of a successful run.
fn ok(agent: &Agent, args: &[&str]) -> String {
    let out = agentctl(agent, args);
    assert!(
        out.status.success(),
        "bai-agentctl {args:?} failed with {}: {}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn json(agent: &Agent, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(agent, &all);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{args:?} printed no JSON ({err}): {text}"))
}

/// Asserts a failed run: exit status 1 and exactly one stderr line `bai-agentctl: …`.
fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("bai-agentctl: "), "{stderr:?}");
    stderr
}

#[test]
fn node_commands_print_for_people_and_as_json() {
    require_environment();
    let agent = Agent::start("").expect("agent starts");

    assert!(ok(&agent, &["ping", "hello"]).starts_with("hello ("), "ping echoes with its round trip");
    assert_eq!(json(&agent, &["ping", "hello"]), Value::from("hello"));
    assert_eq!(json(&agent, &["ping"]), Value::from("ping"));

    let health = json(&agent, &["health"]);
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["agent_id"], agent.id.as_str());
    let text = ok(&agent, &["health"]);
    assert!(text.lines().any(|l| l == "status: ok"), "{text}");
    assert!(text.lines().any(|l| l == format!("agent_id: {}", agent.id)), "{text}");

    let config = json(&agent, &["config"]);
    assert_eq!(config["agent"]["id"], agent.id.as_str(), "{config}");
    assert_eq!(config["agent"]["rpc-listen-addr"], agent.rpc_addr.as_str());
    let text = ok(&agent, &["config"]);
    assert!(text.lines().any(|l| l == "agent:"), "{text}");
    assert!(text.lines().any(|l| l == format!("  id: {}", agent.id)), "nested maps are indented: {text}");

    let hwinfo = json(&agent, &["hwinfo"]);
    assert_eq!(hwinfo["cpu"]["status"], "healthy", "{hwinfo}");
    let cores: u32 = hwinfo["cpu"]["metadata"]["cores"].as_str().expect("cores").parse().expect("a number");
    assert!(cores >= 1);
    let text = ok(&agent, &["hwinfo"]);
    assert!(text.lines().any(|l| l == "cpu:") && text.lines().any(|l| l == "  status: healthy"), "{text}");

    // `--addr HOST:PORT` and BAI_AGENT_ADDR reach the same agent.
    let out = Command::new(agentctl_binary()).args(["--addr", &agent.rpc_addr, "ping", "x"]).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(agentctl_binary())
        .args(["--json", "ping", "from-env"])
        .env("BAI_AGENT_ADDR", &agent.rpc_addr)
        .output()
        .expect("runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"from-env\"");
}

#[test]
fn errors_are_one_line_and_exit_1() {
    require_environment();
    let agent = Agent::start("").expect("agent starts");

    // A FAILURE reply names the method and the agent's message.
    let stderr = failure(&agentctl(&agent, &["logs", "nonexistent"]));
    assert!(stderr.contains("`get_logs` failed on the agent: "), "{stderr}");

    // Nothing listens: refused at once, not after the handshake timeout.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let out = Command::new(agentctl_binary())
        .args(["--addr", &format!("127.0.0.1:{closed}"), "ping"])
        .output()
        .expect("runs");
    let stderr = failure(&out);
    assert!(stderr.contains("cannot connect to the agent") && stderr.contains("refused"), "{stderr}");

    // Bad local input fails before any call.
    let stderr = failure(&agentctl(&agent, &["upload", "k", "/nonexistent/bai-agentctl-test-file"]));
    assert!(stderr.contains("cannot read /nonexistent/bai-agentctl-test-file"), "{stderr}");
    let stderr = failure(&agentctl(&agent, &["create", "--image", "x", "--mem", "12q"]));
    assert!(stderr.contains("--mem `12q`"), "{stderr}");
}

#[test]
fn kernel_commands_create_list_move_files_and_destroy() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&bai_agent_tests::kernels::kernel_toml(dir.path(), 21500)).expect("agent starts");
    let created = json(
        &agent,
        &["create", "--image", bai_agent_tests::BUSYBOX_IMAGE, "--cpu", "1", "--mem", "256m", "--env", "COLOR=blue"],
    );
    let kernel = created[0]["id"].as_str().expect("a kernel id").to_owned();
    let listed = json(&agent, &["list"]);
    assert_eq!(listed[0]["kernel_id"], kernel.as_str());
    assert_eq!(listed[0]["state"], "running");
    assert!(ok(&agent, &["list"]).contains(&kernel), "the table lists the kernel");

    let local = dir.path().join("notes.txt");
    std::fs::write(&local, "from the CLI\n").expect("local file");
    ok(&agent, &["upload", &kernel, local.to_str().expect("utf-8"), "notes.txt"]);
    assert!(ok(&agent, &["ls", &kernel]).contains("notes.txt"));
    let fetched = dir.path().join("fetched.txt");
    ok(&agent, &["download", &kernel, "notes.txt", "-o", fetched.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read_to_string(&fetched).expect("downloaded"), "from the CLI\n");
    let escape = agentctl(&agent, &["download", &kernel, "/etc/passwd"]);
    assert!(failure(&escape).contains("escapes"));

    ok(&agent, &["destroy", &kernel]);
    assert_eq!(json(&agent, &["list"]), serde_json::json!([]));
    assert!(failure(&agentctl(&agent, &["logs", &kernel])).contains("unknown kernel id"));
}

#[test]
fn exec_streams_output_answers_input_and_exits_with_the_codes_status() {
    use std::{
        io::{BufRead, BufReader, Write},
        process::Stdio,
    };
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&bai_agent_tests::kernels::kernel_toml(dir.path(), 21650)).expect("agent starts");
    let created = json(&agent, &["create", "--image", bai_agent_tests::PYTHON_IMAGE, "--cpu", "1", "--mem", "256m"]);
    let kernel = created[0]["id"].as_str().expect("a kernel id").to_owned();
    let exec = |args: &[&str], stdin: &str| {
        let mut child = Command::new(agentctl_binary())
            .args(["--agent", &agent.rpc_addr, "exec", &kernel])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bai-agentctl");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
        child
    };

    // Output arrives while the code still runs.
    let mut slow =
        exec(&["import time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.5)"], "");
    let mut lines = BufReader::new(slow.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("tick 0"));
    assert!(slow.try_wait().expect("try_wait").is_none(), "the first line came before the run ended");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(rest, ["tick 1", "tick 2"]);
    assert!(slow.wait().expect("wait").success());

    // input() is answered from standard input; the exit status is the code's.
    let out = exec(&["name = input('name? ')\nprint('hi', name)\nraise SystemExit(5)"], "Ada\n")
        .wait_with_output()
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "name? hi Ada\n");
    assert_eq!(out.status.code(), Some(5), "stderr: {}", String::from_utf8_lossy(&out.stderr));

    // stderr goes to stderr; batch mode runs a command.
    let out = exec(&["import sys; print('oops', file=sys.stderr)"], "").wait_with_output().expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let out = exec(&["--batch", "--build", "echo built", "echo ran; exit 2"], "").wait_with_output().expect("batch");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "built\nran\n");
    assert_eq!(out.status.code(), Some(2));

    let bad = agentctl(&agent, &["exec", "no-such-kernel", "print(1)"]);
    assert!(failure(&bad).contains("no-such-kernel"));
    ok(&agent, &["destroy", &kernel]);
}

/// `bai-agentctl top` under tmux: the live table lists the node's kernels with the busy one
/// first by CPU, `m` re-sorts by memory, `q` quits; off a terminal it prints plain tables.
#[test]
fn top_shows_the_kernels_live_sorts_on_a_key_and_prints_plain_off_a_terminal() {
    use std::time::Duration;
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&bai_agent_tests::kernels::kernel_toml(dir.path(), 24750)).expect("agent starts");
    let create = || {
        let created =
            json(&agent, &["create", "--image", bai_agent_tests::BUSYBOX_IMAGE, "--cpu", "1", "--mem", "256m"]);
        (
            created[0]["id"].as_str().expect("id").to_owned(),
            created[0]["container_id"].as_str().expect("container").to_owned(),
        )
    };
    let (busy, busy_container) = create();
    let (idle, _) = create();
    let spin = Command::new("docker")
        .args(["exec", "-d", &busy_container, "sh", "-c", "while :; do :; done"])
        .status()
        .expect("docker exec");
    assert!(spin.success());
    // Both counted by the agent before top's first reading (a kernel not yet in it has no rate).
    for kernel in [&busy, &idle] {
        agent.wait_for_kernel(kernel, true, Duration::from_secs(20)).expect("the agent counts the kernel");
    }

    // Plain, off a terminal: two tables, no escape sequences.
    let plain = ok(&agent, &["top", "--iterations", "2", "--interval", "1"]);
    assert_eq!(plain.matches("KERNEL").count(), 2, "{plain}");
    assert!(!plain.contains('\u{1b}'), "{plain:?}");
    // Every table, the first included: its rates are taken between two of the agent's passes.
    for table in plain.split("KERNEL").skip(1) {
        let first_row = table.lines().nth(1).expect("a row");
        assert!(first_row.starts_with(&busy), "the busy kernel first by CPU: {plain}");
    }
    assert!(plain.contains(&idle) && plain.contains("running"), "{plain}");

    // Live, under tmux.
    let socket = bai_agent_tests::unique("top");
    let tmux = |args: &[&str]| Command::new("tmux").args(["-L", &socket]).args(args).output().expect("tmux");
    let command =
        format!("{} --agent tcp://{} top --interval 1", bai_agent_tests::agentctl_binary().display(), agent.rpc_addr);
    assert!(tmux(&["new-session", "-d", "-s", "top", "-x", "200", "-y", "30", &command]).status.success());
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned();
    bai_agent_tests::wait_until("the live table", Duration::from_secs(15), || {
        let text = screen();
        text.contains("sorted by cpu") && text.contains(&busy) && text.contains(&idle)
    })
    .unwrap_or_else(|err| panic!("{err}: {}", screen()));
    let text = screen();
    let row = text.lines().find(|line| line.starts_with(&busy)).expect("the busy kernel's row");
    let cpu: f64 = row.split_whitespace().nth(3).and_then(|v| v.parse().ok()).expect("CPU%");
    assert!(cpu > 20.0, "the spinning kernel is busy: {row}");
    assert!(tmux(&["send-keys", "-t", "top", "m"]).status.success());
    bai_agent_tests::wait_until("sorted by memory", Duration::from_secs(10), || screen().contains("sorted by mem"))
        .unwrap_or_else(|err| panic!("{err}: {}", screen()));
    assert!(tmux(&["send-keys", "-t", "top", "q"]).status.success());
    bai_agent_tests::wait_until("top quits on q", Duration::from_secs(10), || {
        !tmux(&["has-session", "-t", "top"]).status.success()
    })
    .unwrap_or_else(|err| panic!("{err}: {}", screen()));
    for kernel in [&busy, &idle] {
        ok(&agent, &["destroy", kernel]);
    }
}

/// `bai-agentctl create --auto-pull` of an image the engine lacks shows the pull's progress
/// (layers and bytes, from the agent's `image_pull_progress`) while `create_kernels` runs.
#[test]
fn create_shows_the_image_pulls_progress() {
    require_environment();
    let registry = bai_agent_tests::LocalRegistry::start().expect("registry starts");
    let image = format!("{}/bai-test/pull-progress:{}", registry.addr, bai_agent_tests::unique("tag"));
    let docker = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().expect("docker");
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A layer of its own (random bytes), so that the pull really downloads something.
    let context = tempfile::tempdir().expect("build context");
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {}\nRUN dd if=/dev/urandom of=/blob bs=1M count=96\n", bai_agent_tests::BUSYBOX_IMAGE),
    )
    .expect("Dockerfile");
    let built = Command::new("docker")
        .args(["build", "-q", "-t", &image])
        .arg(context.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    registry.docker(&["push", &image]).expect("push");
    docker(&["rmi", &image]);
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&bai_agent_tests::kernels::kernel_toml(dir.path(), 24790)).expect("agent starts");
    let out = agentctl(&agent, &["--json", "create", "--image", &image, "--auto-pull", "--cpu", "1", "--mem", "256m"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}\n{}", agent.log_text());
    let created: Value = serde_json::from_slice(&out.stdout).expect("json");
    let lines: Vec<&str> = stderr.lines().filter(|line| line.starts_with(&format!("pulling {image}: "))).collect();
    assert!(!lines.is_empty(), "the pull's progress is shown: {stderr:?}");
    let last = lines.last().expect("a line");
    assert!(last.contains("layers") && last.contains("MiB"), "{last}");
    assert!(!last.contains("/0.0 MiB"), "the pull's size is known: {last}");
    let kernel = created[0]["id"].as_str().expect("a kernel id").to_owned();
    ok(&agent, &["destroy", &kernel]);
    let _ = Command::new("docker").args(["rmi", &image]).output();
}
