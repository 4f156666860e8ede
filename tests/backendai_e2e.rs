//! End to end with a real Backend.AI 26.9.6 manager: PostgreSQL, etcd, Redis and the manager
//! from PyPI (`tests/e2e/stack.sh`), bai-agent joining it through etcd and Redis, and sessions
//! driven through the user's own `backend.ai` CLI. What the manager records (its database) and
//! what Docker runs are the ground truth, not the agent's own view.
//!
//! One test walks the scenarios in order on one stack (standing it up takes a minute or two):
//! the agent ALIVE with its slots; an interactive session created, queried, given a file to run,
//! listed, downloaded from, its logs read, destroyed (and its container gone); `run --rm`; code
//! running as the owner's container uid/gids; batch
//! sessions ending SUCCESS and FAILURE (and the exit code the agent reported); a session that
//! lives through a `kill -9` of the agent; the manager's live stats of a kernel (through the
//! Prometheus it queries, scraping the agent) and its stats in Redis coming from the agent;
//! the kernel lifecycle's broadcast copies on `events_all`; `session commit` (the kernel saved
//! as a file on the node) and `session convert-to-image` (committed, pushed to a registry with
//! a login, rescanned by the manager), both waiting on the agent's background-task events;
//! GPU sessions on two more agents with mock accelerators: `cuda.device=1` and
//! `cuda.shares=0.5` scheduled onto them and seeing exactly their devices, twenty concurrent
//! share requests never over-allocating a device, and whole devices held across `kill -9`.

use std::{process::Command, time::Duration};

use bai_agent_tests::{
    Agent, BroadcastCollector, LocalRegistry, PYTHON_IMAGE, PrometheusServer,
    backendai::{CliOutput, ControlPlane, REGISTRY_PROJECT},
    require_environment, unique,
};

/// The test image under the `local` registry's project, as the manager's scan finds it.
fn image_name() -> String {
    format!("{REGISTRY_PROJECT}/python:3.11")
}

/// The image as the CLI names it (registry/project/name:tag).
fn image_ref() -> String {
    format!("local/{}", image_name())
}

fn agent_toml(plane: &ControlPlane, first_port: u16) -> String {
    format!(
        "[container]\nscratch-root = \"{scratch}\"\nport-range = [{first_port}, {last}]\nbind-host = \"127.0.0.1\"\n\
         stop-timeout = \"3s\"\n\n[resource]\nreserved-cpu = 0\nreserved-mem = \"512m\"\n\n\
         [redis]\naddr = \"{redis}\"\nevent-format = \"26.9\"\n\n[etcd]\naddr = \"{etcd}\"\nnamespace = \"local\"\n\n\
         [debug]\nheartbeat-interval = \"3s\"\n",
        scratch = plane.path("scratches").display(),
        last = first_port + 99,
        redis = plane.redis_addr,
        etcd = plane.etcd_addr,
    )
}

/// The agent's last log lines (its log is at debug level), for failure messages.
fn agent_log_tail(agent: &Agent) -> String {
    let text = agent.log_text();
    let lines: Vec<&str> = text.lines().filter(|line| !line.contains("DEBUG")).collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The ids of the containers Docker has (running or not) for one kernel.
fn kernel_containers(kernel_id: &str) -> String {
    docker(&["ps", "-aq", "--filter", &format!("label=ai.backend.kernel-id={kernel_id}")])
}

fn session_kernel(plane: &ControlPlane, session: &str) -> String {
    plane
        .sql(&format!(
            "select k.id from kernels k join sessions s on k.session_id = s.id where s.name = '{session}' \
             order by k.created_at desc limit 1"
        ))
        .expect("the session's kernel")
}

fn session_status(plane: &ControlPlane, session: &str) -> String {
    plane
        .sql(&format!("select status from sessions where name = '{session}' order by created_at desc limit 1"))
        .unwrap_or_default()
}

/// `session destroy`, then [`session_ends`].
fn destroy_session(plane: &ControlPlane, name: &str) {
    let destroyed = plane.cli(&["session", "destroy", name]);
    assert!(destroyed.success, "destroy: {}", destroyed.text());
    session_ends(plane, name);
}

/// The manager has the session TERMINATED, and Docker no container of its kernel.
fn session_ends(plane: &ControlPlane, name: &str) {
    plane
        .wait_for_sql(
            &format!("select status from sessions where name = '{name}'"),
            "TERMINATED",
            Duration::from_secs(90),
        )
        .unwrap_or_else(|err| panic!("{name} ends: {err}"));
    let kernel = session_kernel(plane, name);
    bai_agent_tests::wait_until(&format!("{name}'s container is removed"), Duration::from_secs(30), || {
        kernel_containers(&kernel).is_empty()
    })
    .unwrap_or_else(|err| panic!("{err}"));
}

#[test]
fn a_real_backendai_manager_runs_sessions_on_bai_agent() {
    require_environment();
    let plane = ControlPlane::start().expect("the Backend.AI control plane comes up");
    let id = unique("i-e2e");
    let state = plane.path("agent-state");
    let mut agent = Agent::start_with_journal(&id, &state, &agent_toml(&plane, 22000)).expect("bai-agent starts");
    // The Prometheus the manager queries for kernels' live stats, scraping the agent.
    let _prometheus = PrometheusServer::start_at(&plane.prometheus_addr, &[&agent.addr]).expect("prometheus starts");

    the_agent_is_alive_with_its_slots(&plane, &agent);
    register_the_test_image(&plane);
    an_interactive_session_runs_code_and_files_and_is_destroyed(&plane, &agent);
    run_rm_runs_code_in_a_session_of_its_own(&plane);
    the_kernel_runs_as_its_owners_container_user(&plane);
    batch_sessions_end_with_their_commands_result(&plane);
    a_session_becomes_an_image_in_a_registry(&plane, &agent);
    a_session_lives_through_a_kill_9_of_the_agent(&plane, &mut agent);
    gpu_sessions_get_their_own_mock_devices(&plane);
}

fn the_agent_is_alive_with_its_slots(plane: &ControlPlane, agent: &Agent) {
    plane
        .wait_for_sql(&format!("select status from agents where id = '{}'", agent.id), "ALIVE", Duration::from_secs(60))
        .unwrap_or_else(|err| {
            panic!("{err}\n{}\nagent log:\n{}", plane.log_tail("manager", 60), agent_log_tail(agent))
        });
    // The manager's own record of what the agent can give kernels.
    let slots = plane
        .sql(&format!(
            "select slot_name || '=' || capacity from agent_resources where agent_id = '{}' order by slot_name",
            agent.id
        ))
        .expect("slots");
    let number = |key: &str| {
        slots.lines().find_map(|line| line.strip_prefix(&format!("{key}="))).and_then(|v| v.parse::<f64>().ok())
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert_eq!(number("cpu"), Some(cores), "every core is allocatable (reserved-cpu = 0): {slots}");
    assert!(number("mem").is_some_and(|mem| mem > 256.0 * 1024.0 * 1024.0), "memory less the 512 MiB reserve: {slots}");
    let listed = plane.cli(&["admin", "agent", "list"]);
    assert!(listed.success && listed.stdout.contains(&agent.id), "the CLI lists the agent: {}", listed.text());
}

/// Tags the test image under the `local` registry's project and has the manager scan it.
fn register_the_test_image(plane: &ControlPlane) {
    docker(&["tag", PYTHON_IMAGE, &image_name()]);
    let scan = plane.mgr(&["image", "rescan", "local"]);
    assert!(scan.success, "image rescan: {}", scan.text());
    let images = plane.sql("select name from images").expect("images");
    assert!(images.contains("python:3.11"), "the manager knows the image: {images}");
}

fn an_interactive_session_runs_code_and_files_and_is_destroyed(plane: &ControlPlane, agent: &Agent) {
    let name = "e2e-interactive";
    let image = image_ref();
    let broadcasts = BroadcastCollector::start(&plane.redis_addr, "events_all", &agent.id).expect("subscribed");
    let created = plane.cli(&["session", "create", "-t", name, "-r", "cpu=1", "-r", "mem=2g", &image]);
    assert!(created.success, "session create: {}\nagent log:\n{}", created.text(), agent_log_tail(agent));
    assert_eq!(session_status(plane, name), "RUNNING");
    let kernel = session_kernel(plane, name);
    assert_eq!(kernel_containers(&kernel).lines().count(), 1, "one container for kernel {kernel}");
    broadcast_arrives(&broadcasts, "kernel_started", &kernel);

    // Query mode: the code runs in the kernel and its output comes back.
    let query = plane.cli(&["run", "-t", name, &image, "-c", "import os; print(6 * 7, os.getcwd())"]);
    assert!(query.success && query.stdout.contains("42 /home/work"), "run -c: {}", query.text());

    // Batch mode with an uploaded file.
    let work = plane.path("work");
    std::fs::create_dir_all(&work).expect("work dir");
    std::fs::write(work.join("hello.py"), "print('batch ok')\nopen('result.txt', 'w').write('from the kernel')\n")
        .expect("write hello.py");
    let batch = plane.cli_in(
        &work,
        &["run", "-t", name, "--exec", "python3 hello.py", &image, "hello.py"],
        Duration::from_secs(180),
    );
    assert!(batch.success && batch.stdout.contains("batch ok"), "run --exec: {}", batch.text());

    // Files: listed, downloaded.
    let ls = plane.cli(&["session", "ls", name, "."]);
    assert!(ls.success && ls.stdout.contains("hello.py") && ls.stdout.contains("result.txt"), "ls: {}", ls.text());
    let downloads = plane.path("downloads");
    std::fs::create_dir_all(&downloads).expect("downloads dir");
    let download = plane.cli(&["session", "download", name, "result.txt", "--dest", &downloads.to_string_lossy()]);
    assert!(download.success, "download: {}", download.text());
    assert_eq!(std::fs::read_to_string(downloads.join("result.txt")).unwrap_or_default(), "from the kernel");

    // The manager's live stats of the kernel are the agent's measurements.
    let busy = plane.cli(&[
        "run",
        "-t",
        name,
        &image,
        "-c",
        "import time\nt = time.time()\nwhile time.time() - t < 3: pass\nprint('spun')",
    ]);
    assert!(busy.success && busy.stdout.contains("spun"), "busy run: {}", busy.text());
    manager_sees_the_kernels_stats(plane, &kernel);
    let session_id = plane.sql(&format!("select id from sessions where name = '{name}'")).expect("session id");
    manager_shows_live_stats(plane, &session_id);

    the_session_is_committed_to_a_file(plane, agent, name, &broadcasts);

    // Logs, then destroy: TERMINATED in the manager, the container gone.
    let logs = plane.cli(&["session", "logs", name]);
    assert!(logs.success && logs.stdout.contains("kernel runner listening"), "logs: {}", logs.text());
    assert!(!logs.stdout.contains('\u{1b}'), "the container's log is plain text: {}", logs.text());
    destroy_session(plane, name);
    broadcast_arrives(&broadcasts, "kernel_terminated", &kernel);
}

/// The broadcast copy of the event `event` about `kernel` arrives on `events_all`, its payload
/// the event's fields as JSON text (Backend.AI's `BroadcastMessagePayload`).
fn broadcast_arrives(broadcasts: &BroadcastCollector, event: &str, kernel: &str) {
    let payload_of = |message: &serde_json::Value| {
        message["payload"].as_str().and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
    };
    broadcasts
        .wait_for(&format!("the broadcast {event} of {kernel}"), Duration::from_secs(30), |messages| {
            messages.iter().any(|m| m["name"] == event && payload_of(m).is_some_and(|p| p["kernel_id"] == kernel))
        })
        .unwrap_or_else(|err| panic!("{err}"));
}

/// `session commit`: the manager has the agent save the kernel as a gzipped image file in
/// `image-commit-path/<owner's e-mail>/`; the commit's background task ends `bgtask_done`,
/// broadcast and cached for the manager.
fn the_session_is_committed_to_a_file(
    plane: &ControlPlane,
    agent: &Agent,
    name: &str,
    broadcasts: &BroadcastCollector,
) {
    let commit = plane.cli(&["session", "commit", name]);
    assert!(commit.success, "session commit: {}\nagent log:\n{}", commit.text(), agent_log_tail(agent));
    let owner_dir = agent.commit_dir().join("admin_lablup.com");
    let mut saved = None;
    bai_agent_tests::wait_until("the committed image file", Duration::from_secs(120), || {
        saved = std::fs::read_dir(&owner_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.to_string_lossy().ends_with("python-3.11.tar.gz"));
        saved.is_some()
    })
    .unwrap_or_else(|err| {
        panic!(
            "{err}; in {}: {:?}\nagent log:\n{}",
            owner_dir.display(),
            std::fs::read_dir(&owner_dir).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
            agent_log_tail(agent)
        )
    });
    let saved = saved.expect("found");
    let listing = Command::new("tar").arg("-tzf").arg(&saved).output().expect("tar runs");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.lines().any(|line| line == "manifest.json"), "a docker-save archive: {listing}");
    let done = broadcasts
        .wait_for("the commit's bgtask_done", Duration::from_secs(30), |messages| {
            messages.iter().any(|m| m["name"] == "bgtask_done")
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let done = done.iter().find(|m| m["name"] == "bgtask_done").expect("found");
    let payload: serde_json::Value =
        serde_json::from_str(done["payload"].as_str().unwrap_or("{}")).expect("JSON payload");
    let task_id = payload["task_id"].as_str().expect("a task id").to_owned();
    let cached = redis_get(plane, &format!("bgtask.{task_id}"));
    assert!(cached.contains("bgtask_done"), "the outcome is cached for the manager: {cached:?}");
    assert!(!owner_dir.join("lock").join(session_kernel(plane, name)).exists(), "the commit's lock is gone");
}

/// A key of the manager's event database (4), as text.
fn redis_get(plane: &ControlPlane, key: &str) -> String {
    let script = format!(
        "import redis\nv = redis.Redis(host='127.0.0.1', port={port}, db=4).get({key:?})\nprint(v.decode() if v else '')\n",
        port = plane.redis_port,
    );
    let (ok, out) = bai_agent_tests::run_backendai_python(&script, b"");
    assert!(ok, "reading {key}: {out}");
    out.trim().to_owned()
}

/// `session convert-to-image`: a session of an image from a registry that wants a login (so the
/// agent pulls it with the registry's credentials) is committed by the agent, pushed by the
/// agent to that registry (with the credentials), and rescanned by the manager: the new image
/// is in the manager's database and in the registry. The manager follows both steps through
/// the agent's background-task events.
fn a_session_becomes_an_image_in_a_registry(plane: &ControlPlane, agent: &Agent) {
    let registry = LocalRegistry::start_with_login("e2e-user", "e2e pass").expect("the registry starts");
    registry.login("e2e-user", "e2e pass").expect("docker login to the test registry");
    let base = format!("{}/{REGISTRY_PROJECT}/python:3.11", registry.addr);
    docker(&["tag", PYTHON_IMAGE, &base]);
    registry.docker(&["push", &base]).expect("push the base image");
    docker(&["rmi", &base]);

    // The registry in the manager, and as the project's registry for customized images.
    let fixture = plane.path("registry-fixture.json");
    let row = serde_json::json!({"container_registries": [{
        "id": "5b7c3a1e-2222-4b55-8d3c-0f7e0c3a5d11", "registry_name": registry.addr, "url": format!("http://{}", registry.addr),
        "type": "docker", "project": REGISTRY_PROJECT, "username": "e2e-user", "password": "e2e pass",
    }]});
    std::fs::write(&fixture, row.to_string()).expect("write the fixture");
    let populated = plane.mgr(&["fixture", "populate", &fixture.to_string_lossy()]);
    assert!(populated.success, "fixture populate: {}", populated.text());
    plane
        .sql(&format!(
            "update groups set container_registry = '{{\"registry\": \"{}\", \"project\": \"{REGISTRY_PROJECT}\"}}' \
             where name = 'default'",
            registry.addr
        ))
        .expect("the project's image-commit registry");
    plane
        .sql(&format!(
            "update domains set allowed_docker_registries = array_append(allowed_docker_registries, '{}') \
             where name = 'default'",
            registry.addr
        ))
        .expect("the domain allows the registry");
    let scan = plane.mgr(&["image", "rescan", &registry.addr]);
    assert!(scan.success, "image rescan: {}", scan.text());
    let images = plane.sql("select name from images").expect("images");
    assert!(images.contains(&base), "the manager scanned the registry's image: {images}\n{}", scan.text());

    let name = "e2e-imagify";
    let created = plane.cli(&["session", "create", "-t", name, "-r", "cpu=1", "-r", "mem=2g", &base]);
    assert!(
        created.success,
        "session create from the registry: {}\nagent log:\n{}",
        created.text(),
        agent_log_tail(agent)
    );
    // The 26.9.6 CLI's `session convert-to-image` sends the image name as a query parameter,
    // which the 26.9.6 manager refuses (it reads a JSON body): the client SDK's own request
    // with the body the manager expects.
    let imagify = format!(
        "import asyncio\n\
         from ai.backend.client.session import AsyncSession\n\
         from ai.backend.client.request import Request\n\
         async def main():\n\
         \x20   async with AsyncSession():\n\
         \x20       rqst = Request('POST', '/session/{name}/imagify')\n\
         \x20       rqst.set_json({{'image_name': 'mine'}})\n\
         \x20       async with rqst.fetch() as resp:\n\
         \x20           print(resp.status, await resp.text())\n\
         asyncio.run(main())\n"
    );
    let requested =
        plane.client_command(&plane.venv().join("bin/python")).args(["-c", &imagify]).output().expect("python runs");
    let answer = String::from_utf8_lossy(&requested.stdout);
    assert!(
        requested.status.success() && answer.starts_with("200"),
        "imagify: {answer}{}",
        String::from_utf8_lossy(&requested.stderr)
    );
    plane
        .wait_for_sql("select count(*) from images where name like '%customized_%'", "1", Duration::from_secs(180))
        .unwrap_or_else(|err| {
            panic!("{err}\nmanager log:\n{}\nagent log:\n{}", plane.log_tail("manager", 40), agent_log_tail(agent))
        });
    let images = plane.sql("select name from images where name like '%customized_%'").expect("images");
    assert!(
        images.contains(&format!("{}/{REGISTRY_PROJECT}/python:3.11-customized_", registry.addr)),
        "the manager knows the new image: {images:?}"
    );
    let (status, tags) = registry_tags(&registry, &format!("{REGISTRY_PROJECT}/python"));
    assert!(status == 200 && tags.contains("3.11-customized_"), "the registry has the pushed image: {status} {tags}");
    destroy_session(plane, name);
    // The pulled and the committed image stay on the node (as with the Python agent); this
    // test's registry goes, so do they.
    for tag in docker(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        &format!("{}/{REGISTRY_PROJECT}/python", registry.addr),
    ])
    .lines()
    {
        docker(&["rmi", tag]);
    }
}

/// `GET /v2/<repository>/tags/list` of the registry, logged in.
fn registry_tags(registry: &LocalRegistry, repository: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-u", "e2e-user:e2e pass", "-w", "\n%{http_code}"])
        .arg(format!("http://{}/v2/{repository}/tags/list", registry.addr))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The kernel's stats as the manager serves them (from Redis, written by the agent): CPU time
/// used by the busy loop, and memory.
fn manager_sees_the_kernels_stats(plane: &ControlPlane, kernel: &str) {
    let script = format!(
        "import asyncio, sys\n\
         from ai.backend.common import msgpack\n\
         import redis\n\
         r = redis.Redis(host='127.0.0.1', port={port}, db=0)\n\
         raw = r.get('{kernel}')\n\
         stats = msgpack.unpackb(raw) if raw else {{}}\n\
         print(float(stats['cpu_used']['current']), float(stats['mem']['current']))\n",
        port = plane.redis_port,
    );
    let mut last = String::new();
    for _ in 0..20 {
        let (ok, out) = bai_agent_tests::run_backendai_python(&script, b"");
        if ok {
            let numbers: Vec<f64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if let [cpu_ms, mem] = numbers[..]
                && cpu_ms >= 2500.0
            {
                assert!(mem > 0.0, "memory in the kernel's stats: {out}");
                return;
            }
        }
        last = out;
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("the kernel's stats in the manager's Redis never showed the 3 s busy loop: {last}");
}

/// The session's live stats in the manager's own view (`session info`: in 26.9 the manager
/// queries Prometheus for the agent's `backendai_container_utilization`): the 3 s busy loop in
/// `cpu_used`, memory in `mem`.
fn manager_shows_live_stats(plane: &ControlPlane, session_id: &str) {
    let current = |text: &str, metric: &str| -> Option<f64> {
        let line = text.lines().find(|line| line.trim_start().starts_with(&format!("- {metric}:")))?;
        let rest = line.split("'current': '").nth(1)?;
        rest.split('\'').next()?.parse().ok()
    };
    let mut last = String::new();
    for _ in 0..30 {
        let info = plane.cli(&["session", "info", session_id]);
        if let (Some(cpu_ms), Some(mem)) = (current(&info.stdout, "cpu_used"), current(&info.stdout, "mem")) {
            assert!(cpu_ms >= 2500.0, "cpu_used in the manager's live stats: {cpu_ms} ms");
            assert!(mem > 0.0, "mem in the manager's live stats: {mem}");
            return;
        }
        last = info.text();
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("the manager never showed the session's live stats: {last}");
}

fn run_rm_runs_code_in_a_session_of_its_own(plane: &ControlPlane) {
    let run = plane.cli(&["run", "--rm", "-t", "e2e-rm", &image_ref(), "-c", "print(2 ** 10)"]);
    assert!(run.success && run.stdout.contains("1024"), "run --rm: {}", run.text());
    session_ends(plane, "e2e-rm");
}

/// The owner's `container_uid`, `container_main_gid` and `container_gids` (set on the user in
/// the manager's database, as an admin would) are who the code runs as.
fn the_kernel_runs_as_its_owners_container_user(plane: &ControlPlane) {
    let admin = "email = 'admin@lablup.com'";
    plane
        .sql(&format!(
            "update users set container_uid = 1234, container_main_gid = 2345, container_gids = '{{3456}}' where {admin}"
        ))
        .expect("set the user's container ids");
    let run = plane.cli(&[
        "run",
        "--rm",
        "-t",
        "e2e-user",
        &image_ref(),
        "-c",
        "import os; print('ids', os.getuid(), os.getgid(), sorted(os.getgroups()), os.access('.', os.W_OK))",
    ]);
    plane
        .sql(&format!(
            "update users set container_uid = null, container_main_gid = null, container_gids = null where {admin}"
        ))
        .expect("reset the user's container ids");
    assert!(run.success && run.stdout.contains("ids 1234 2345 [2345, 3456] True"), "run as the user: {}", run.text());
    session_ends(plane, "e2e-user");
}

fn batch_sessions_end_with_their_commands_result(plane: &ControlPlane) {
    for (name, command, result, exit_code) in [
        ("e2e-batch-ok", "python3 -c 'print(1)'", "SUCCESS", 0),
        ("e2e-batch-fail", "python3 -c 'import sys; sys.exit(3)'", "FAILURE", 3),
    ] {
        let created = plane.cli(&[
            "session",
            "create",
            "-t",
            name,
            "--type",
            "batch",
            "--startup-command",
            command,
            "-r",
            "cpu=1",
            "-r",
            "mem=2g",
            &image_ref(),
        ]);
        assert!(created.success, "batch session create: {}", created.text());
        plane
            .wait_for_sql(
                &format!("select status || ' ' || result from sessions where name = '{name}'"),
                &format!("TERMINATED {result}"),
                Duration::from_secs(90),
            )
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        // The manager keeps no exit code of its own (it marks SUCCESS or FAILURE); the one the
        // agent reported is in the event it consumed.
        let session_id = plane.sql(&format!("select id from sessions where name = '{name}'")).expect("session id");
        let reported = batch_result_event(plane, &session_id);
        assert_eq!(reported.0, if exit_code == 0 { "session_success" } else { "session_failure" }, "{name}");
        assert_eq!(reported.1["exit_code"], exit_code, "{name}: {:?}", reported);
        session_ends(plane, name);
    }
}

/// The `session_success` / `session_failure` event the agent put on the manager's stream for a
/// session: its name and JSON payload.
fn batch_result_event(plane: &ControlPlane, session_id: &str) -> (String, serde_json::Value) {
    let script = format!(
        "import redis\n\
         r = redis.Redis(host='127.0.0.1', port={port}, db=4)\n\
         for _, fields in r.xrange('events'):\n\
         \x20   if fields.get(b'name') in (b'session_success', b'session_failure'):\n\
         \x20       print(fields[b'name'].decode(), fields[b'payload'].decode())\n",
        port = plane.redis_port,
    );
    let (ok, out) = bai_agent_tests::run_backendai_python(&script, b"");
    assert!(ok, "reading the event stream: {out}");
    out.lines()
        .filter_map(|line| line.split_once(' '))
        .filter_map(|(name, payload)| Some((name.to_owned(), serde_json::from_str::<serde_json::Value>(payload).ok()?)))
        .find(|(_, payload)| payload["session_id"] == session_id)
        .unwrap_or_else(|| panic!("no batch result event for session {session_id} in the stream: {out}"))
}

fn a_session_lives_through_a_kill_9_of_the_agent(plane: &ControlPlane, agent: &mut Agent) {
    let name = "e2e-restart";
    let image = image_ref();
    let created = plane.cli(&["session", "create", "-t", name, "-r", "cpu=1", "-r", "mem=2g", &image]);
    assert!(created.success, "session create: {}", created.text());
    let set = plane.cli(&["run", "-t", name, &image, "-c", "x = 41"]);
    assert!(set.success, "run -c: {}", set.text());

    agent.kill_hard().expect("kill -9");
    std::thread::sleep(Duration::from_secs(2));
    agent.restart().expect("the agent starts again");

    assert_eq!(session_status(plane, name), "RUNNING", "the manager still has the session running");
    let after = plane.cli(&["run", "-t", name, &image, "-c", "print('after restart', x + 1)"]);
    assert!(after.success && after.stdout.contains("after restart 42"), "the kernel kept its state: {}", after.text());
    destroy_session(plane, name);
}

/// Two mock devices (Backend.AI's sample): 40 GiB and 108 multiprocessors each, so 13.5 shares
/// each when shared.
const MOCK_GPUS: &str = r#"slot_name = "cuda"
device_plugin_name = "CUDADevice"
devices = [
  { mother_uuid = "f0000000-0000-4000-8000-000000000001", model_name = "CUDA GPU", numa_node = 0, subproc_count = 108, memory_size = "40G", is_mig_device = false },
  { mother_uuid = "f0000000-0000-4000-8000-000000000002", model_name = "CUDA GPU", numa_node = 0, subproc_count = 108, memory_size = "40G", is_mig_device = false },
]

[attributes]
nvidia_driver = "450.0.0"
"#;

/// An agent with the mock devices, handed out `mode`; cores overcommitted so that CPU is
/// never what limits the GPU sessions.
fn start_gpu_agent(plane: &ControlPlane, mode: &str, first_port: u16) -> Agent {
    let mock = plane.path(&format!("mock-{mode}.toml"));
    std::fs::write(&mock, MOCK_GPUS).expect("mock accelerator file");
    let toml = agent_toml(plane, first_port).replace(
        "[resource]\n",
        &format!(
            "[resource]\nmock-accelerator = \"{}\"\ncpu-overcommit = 10.0\nmem-overcommit = 4.0\n",
            mock.display()
        ),
    ) + &format!("\n[accelerators.cuda]\nallocation-mode = \"{mode}\"\n");
    let id = unique(&format!("i-gpu-{mode}"));
    let agent = Agent::start_with_journal(&id, &plane.path(&format!("agent-state-{mode}")), &toml)
        .expect("the GPU agent starts");
    plane
        .wait_for_sql(&format!("select status from agents where id = '{id}'"), "ALIVE", Duration::from_secs(60))
        .unwrap_or_else(|err| panic!("{err}\n{}", agent_log_tail(&agent)));
    agent
}

/// The manager's capacity of `slot` on `agent` (`agent_resources`).
fn agent_capacity(plane: &ControlPlane, agent: &Agent, slot: &str) -> String {
    plane
        .sql(&format!("select capacity from agent_resources where agent_id = '{}' and slot_name = '{slot}'", agent.id))
        .unwrap_or_default()
}

/// The devices Docker gave a session's kernel container, as the kernel sees them: its
/// `/dev/nvidia*` nodes and `BACKENDAI_MOCK_CUDA_DEVICES`.
fn devices_inside(plane: &ControlPlane, session: &str) -> (String, String) {
    let kernel = session_kernel(plane, session);
    let container = kernel_containers(&kernel);
    let nodes = docker(&["exec", &container, "sh", "-c", "ls /dev | grep '^nvidia[0-9]' | sort | tr '\\n' ' '"]);
    let ids = docker(&["exec", &container, "printenv", "BACKENDAI_MOCK_CUDA_DEVICES"]);
    (nodes.trim().to_owned(), ids)
}

/// `session create` of the test image with one core, 2 GiB and `accelerator` (`cuda.device=1`);
/// with `enqueue_only`, it returns once the manager queued it.
fn gpu_session(plane: &ControlPlane, name: &str, accelerator: &str, enqueue_only: bool) -> CliOutput {
    let image = image_ref();
    let mut args = vec!["session", "create", "-t", name, "-r", "cpu=1", "-r", "mem=2g", "-r", accelerator];
    if enqueue_only {
        args.insert(2, "--enqueue-only");
    }
    args.push(&image);
    plane.cli(&args)
}

fn gpu_sessions_get_their_own_mock_devices(plane: &ControlPlane) {
    let mut whole = start_gpu_agent(plane, "discrete", 22200);
    let shared = start_gpu_agent(plane, "fractional", 22300);
    assert_eq!(agent_capacity(plane, &whole, "cuda.device").parse::<f64>().ok(), Some(2.0));
    assert_eq!(agent_capacity(plane, &shared, "cuda.shares").parse::<f64>().ok(), Some(27.0));

    // One whole device: the session runs on the discrete agent with one device of its own.
    let created = gpu_session(plane, "e2e-gpu-a", "cuda.device=1", false);
    assert!(
        created.success,
        "cuda.device session: {}\n{}\nmanager log:\n{}",
        created.text(),
        agent_log_tail(&whole),
        plane.log_tail("manager", 60)
    );
    let (nodes_a, ids_a) = devices_inside(plane, "e2e-gpu-a");
    assert_eq!(nodes_a, "nvidia0", "one device node");
    assert_eq!(ids_a, "f0000000-0000-4000-8000-000000000001");
    let attached = plane
        .sql("select k.attached_devices::text from kernels k join sessions s on k.session_id = s.id where s.name = 'e2e-gpu-a'")
        .expect("attached devices");
    assert!(attached.contains(&ids_a), "the manager records the kernel's device: {attached}");
    // The device moved from reserved to used in the manager's books (it reads `used_devices`).
    let used = plane
        .sql(&format!("select used from agent_resources where agent_id = '{}' and slot_name = 'cuda.device'", whole.id))
        .expect("agent_resources");
    assert_eq!(used.parse::<f64>().ok(), Some(1.0), "the manager counts one device used: {used}");

    // kill -9 of the agent: the restarted agent still holds the first device for the running
    // session and gives the next session the other one; a third waits in the manager's queue.
    whole.kill_hard().expect("kill -9");
    std::thread::sleep(Duration::from_secs(2));
    whole.restart().expect("the GPU agent starts again");
    let created = gpu_session(plane, "e2e-gpu-b", "cuda.device=1", false);
    assert!(created.success, "second cuda.device session: {}\n{}", created.text(), agent_log_tail(&whole));
    let (nodes_b, ids_b) = devices_inside(plane, "e2e-gpu-b");
    assert_eq!(
        (nodes_b.as_str(), ids_b.as_str()),
        ("nvidia1", "f0000000-0000-4000-8000-000000000002"),
        "the free device"
    );
    assert_eq!(session_status(plane, "e2e-gpu-a"), "RUNNING");
    let queued = gpu_session(plane, "e2e-gpu-c", "cuda.device=1", true);
    assert!(queued.success, "enqueue: {}", queued.text());
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(session_status(plane, "e2e-gpu-c"), "PENDING", "no device left for a third session");
    for name in ["e2e-gpu-a", "e2e-gpu-b"] {
        destroy_session(plane, name);
    }
    plane
        .wait_for_sql("select status from sessions where name = 'e2e-gpu-c'", "RUNNING", Duration::from_secs(120))
        .unwrap_or_else(|err| {
            panic!("the queued session runs once a device is free: {err}\n{}", agent_log_tail(&whole))
        });
    destroy_session(plane, "e2e-gpu-c");

    // Half a device: the fractional agent.
    let created = gpu_session(plane, "e2e-gpu-half", "cuda.shares=0.5", false);
    assert!(created.success, "cuda.shares session: {}\n{}", created.text(), agent_log_tail(&shared));
    let (nodes, ids) = devices_inside(plane, "e2e-gpu-half");
    assert_eq!((nodes.as_str(), ids.as_str()), ("nvidia0", "f0000000-0000-4000-8000-000000000001"));
    destroy_session(plane, "e2e-gpu-half");

    // Twenty at once, 2.5 shares each: the manager and the agent agree on ten. (The example
    // keypair may run five sessions at a time; devices are what should limit here.)
    plane
        .sql("update keypair_resource_policies set max_concurrent_sessions = 40 where name = 'default'")
        .expect("raise the session limit");
    let names: Vec<String> = (0..20).map(|i| format!("e2e-gpu-many-{i}")).collect();
    std::thread::scope(|scope| {
        for name in &names {
            scope.spawn(move || {
                let queued = gpu_session(plane, name, "cuda.shares=2.5", true);
                assert!(queued.success, "enqueue {name}: {}", queued.text());
            });
        }
    });
    let count = |status: &str| {
        plane
            .sql(&format!("select count(*) from sessions where name like 'e2e-gpu-many-%' and status = '{status}'"))
            .unwrap_or_default()
    };
    bai_agent_tests::wait_until("ten of twenty run", Duration::from_secs(300), || count("RUNNING") == "10")
        .unwrap_or_else(|err| {
            panic!(
                "{err}: running {}, pending {}, error {}\n{}",
                count("RUNNING"),
                count("PENDING"),
                count("ERROR"),
                agent_log_tail(&shared)
            )
        });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        (count("RUNNING"), count("ERROR")),
        ("10".to_owned(), "0".to_owned()),
        "no more, and none refused by the agent"
    );
    // Docker's truth: what each running kernel's resource.txt holds, summed per device.
    let mut per_device: std::collections::BTreeMap<String, f64> = Default::default();
    for name in &names {
        if session_status(plane, name) != "RUNNING" {
            continue;
        }
        let container = kernel_containers(&session_kernel(plane, name));
        let text = docker(&["exec", &container, "cat", "/home/config/resource.txt"]);
        let line =
            text.lines().find_map(|line| line.strip_prefix("CUDA.SHARES_SHARES=")).unwrap_or_default().to_owned();
        for piece in line.split(',').filter(|piece| !piece.is_empty()) {
            let (device, amount) = piece.split_once(':').expect("device:amount");
            *per_device.entry(device.to_owned()).or_default() += amount.parse::<f64>().expect("an amount");
        }
    }
    let total: f64 = per_device.values().sum();
    assert!((total - 25.0).abs() < 1e-9, "ten kernels hold 2.5 each: {per_device:?}");
    assert!(per_device.values().all(|held| *held <= 13.5 + 1e-9), "no device past its 13.5 shares: {per_device:?}");
    std::thread::scope(|scope| {
        for name in &names {
            scope.spawn(move || {
                let _ = plane.cli(&["session", "destroy", name]);
            });
        }
    });
}
