//! Enforcement per kernel on the real engine and the real kernel: the metadata address
//! redirected to the agent's metadata service (each kernel sees its own environment) or denied,
//! node and kernel deny rules failing `connect` with `EPERM` and counted once per call, the raw
//! socket backstop, the policy surviving `kill -9` of the agent and leaving with the kernel.
//!
//! Every address stays on this machine: the host's side of Docker's bridge (a listener of the
//! test's own), a loopback-range metadata address, and the real metadata address only from a
//! `--network none` kernel, where the hook answers before any route.

use std::{
    net::{Ipv4Addr, TcpListener},
    process::Command,
    time::Duration,
};

use bai_agent::{config::MetadataHost, rpc::client::RpcClient};
use bai_agent_tests::{
    Agent, PYTHON_IMAGE,
    kernels::{create, created_id, field, kernel_config, kernel_toml, map, runtime, with_field},
    require_environment, unique, wait_until,
};
use rmpv::Value;

/// The host's address on Docker's default bridge, which kernels reach.
fn bridge_host() -> Ipv4Addr {
    bai_agent::policy::metadata_host(MetadataHost::Auto).expect("docker0 has an IPv4 address")
}

/// A listener on the host's bridge address that accepts (and drops) every connection.
fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind((bridge_host(), 0)).expect("bind on docker0");
    let port = listener.local_addr().expect("addr").port();
    let accepting = listener.try_clone().expect("clone");
    std::thread::spawn(move || for _ in accepting.incoming() {});
    (listener, port)
}

/// Runs Python in a kernel's container (as the kernel's own processes run: inside its cgroup).
fn python_in(container: &str, code: &str) -> String {
    let out = Command::new("docker").args(["exec", container, "python3", "-c", code]).output().expect("docker exec");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned()
}

/// What `connect` to each destination gives inside the kernel: `ok` or the errno's name.
fn connect_from(container: &str, targets: &[(&str, u16)]) -> Vec<String> {
    let list: Vec<String> = targets.iter().map(|(host, port)| format!("({host:?}, {port})")).collect();
    let code = format!(
        "import socket, errno\n\
         for host, port in [{}]:\n\
         \x20   family = socket.AF_INET6 if ':' in host else socket.AF_INET\n\
         \x20   s = socket.socket(family, socket.SOCK_STREAM)\n\
         \x20   s.settimeout(3)\n\
         \x20   try:\n\
         \x20       s.connect((host, port)); print('ok')\n\
         \x20   except OSError as e:\n\
         \x20       print(errno.errorcode.get(e.errno, str(e)))\n\
         \x20   s.close()\n",
        list.join(", ")
    );
    python_in(container, &code).lines().map(str::to_owned).collect()
}

fn verdicts(agent: &Agent, kernel_id: &str, rule: &str, verdict: &str) -> f64 {
    agent
        .metrics()
        .expect("metrics")
        .iter()
        .filter(|s| {
            s.name == "backendai_agent_policy_verdicts_total"
                && s.labels.get("kernel_id").map(String::as_str) == Some(kernel_id)
                && s.labels.get("rule").map(String::as_str) == Some(rule)
                && s.labels.get("verdict").map(String::as_str) == Some(verdict)
        })
        .map(|s| s.value)
        .sum()
}

async fn create_python(client: &RpcClient, kernel: &str, greeting: &str, network_policy: Option<Value>) -> String {
    let mut config = kernel_config(PYTHON_IMAGE, "1", "268435456");
    config = with_field(config, "environ", map(vec![("GREETING", greeting.into())]));
    if let Some(policy) = network_policy {
        config = with_field(config, "internal_data", map(vec![("network_policy", policy)]));
    }
    let created = create(client, "s-policy", kernel, config).await.expect("create");
    created_id(&created, "container_id")
}

/// Creates a kernel on a network of its own choosing (`cluster_info.network_name`: a bridge,
/// or `none`); its container id.
async fn create_on_network(client: &RpcClient, kernel: &str, config: Value, network: &str) -> String {
    let created = client
        .call(
            "create_kernels",
            vec![
                "s-policy".into(),
                Value::Array(vec![kernel.into()]),
                Value::Array(vec![config]),
                map(vec![("mode", "single-node".into()), ("size", 1.into()), ("network_name", network.into())]),
                map(vec![]),
            ],
            vec![],
        )
        .await
        .unwrap_or_else(|err| panic!("create {kernel} on network {network}: {err:?}"));
    created_id(&created, "container_id")
}

async fn destroy(client: &RpcClient, kernel: &str) {
    client
        .call("destroy_kernel", vec![kernel.into(), "s-policy".into(), "user-requested".into()], vec![])
        .await
        .expect("destroy");
}

/// The kernel's own cgroup directory in the unified hierarchy.
fn kernel_cgroup(agent: &Agent, kernel: &str) -> std::path::PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let layout = bai_agent::monitor::CgroupLayout::from_mountinfo(&mountinfo).expect("cgroup2");
    layout.unified_root.join("bai-kernels").join(&agent.id).join(kernel)
}

/// Redirect mode: a kernel's connection to the metadata address reaches the agent's metadata
/// service, which answers with that kernel's own environment (two kernels, two answers), the
/// peer reads as the metadata address, and every redirect is counted. Node deny rules (by port,
/// IPv4 and v4-mapped IPv6) fail `connect` with `EPERM`, counted once per call and logged once.
#[test]
fn metadata_is_redirected_to_each_kernels_own_service_and_deny_rules_refuse_with_eperm() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_denied_listener, denied_port) = listener();
    let (_open_listener, open_port) = listener();
    let host = bridge_host();
    let service_port = TcpListener::bind((host, 0)).and_then(|l| l.local_addr()).expect("a free port").port();
    let toml = format!(
        "{}\n[policy]\nmetadata-service-port = {service_port}\nmetadata = \"redirect\"\nmetadata-address = \"127.0.0.99:80\"\n\
         deny = [{{ cidr = \"{host}/32\", ports = \"{denied_port}\", name = \"test-denied\" }}]\n",
        kernel_toml(dir.path(), 24300)
    );
    let agent = Agent::start(&toml).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let (first, second) = (unique("kernel"), unique("kernel"));
        let first_container = create_python(&client, &first, "hello-first", None).await;
        let second_container = create_python(&client, &second, "hello-second", None).await;

        let fetch = "import json, socket, urllib.request\n\
                     envs = json.load(urllib.request.urlopen('http://127.0.0.99/latest/meta-data/envs', timeout=5))\n\
                     s = socket.create_connection(('127.0.0.99', 80), timeout=5)\n\
                     print(envs['GREETING'], envs['BACKENDAI_KERNEL_ID'], s.getpeername())";
        let answer = python_in(&first_container, fetch);
        assert_eq!(answer, format!("hello-first {first} ('127.0.0.99', 80)"), "the first kernel's own envs");
        let answer = python_in(&second_container, fetch);
        assert_eq!(answer, format!("hello-second {second} ('127.0.0.99', 80)"), "the second kernel's own envs");
        let listing = python_in(
            &first_container,
            "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.99/latest/meta-data/', timeout=5).read().decode())",
        );
        assert_eq!(listing, "envs\nlocal-ipv4\nsandbox");
        assert_eq!(verdicts(&agent, &first, "metadata", "redirected"), 3.0, "three connections redirected");

        let host_text = host.to_string();
        let mapped = format!("::ffff:{host}");
        let outcomes = connect_from(
            &first_container,
            &[
                (&host_text, denied_port),
                (&host_text, open_port),
                (&mapped, denied_port),
                (&host_text, denied_port),
                (&host_text, denied_port),
            ],
        );
        assert_eq!(outcomes, ["EPERM", "ok", "EPERM", "EPERM", "EPERM"], "denied port refused, the other open");
        assert_eq!(verdicts(&agent, &first, "test-denied", "denied"), 4.0, "each denied call counted once");
        assert_eq!(verdicts(&agent, &second, "test-denied", "denied"), 0.0, "nothing counted for the other kernel");
        let destination = format!("{host}:{denied_port}");
        wait_until("the denial is logged", Duration::from_secs(5), || agent.log_text().contains(&destination))
            .expect("logged");
        let logged = agent.log_text().lines().filter(|l| l.contains("policy denied") && l.contains(&destination)).count();
        assert_eq!(logged, 1, "four denials of one destination within a minute are logged once");

        // A caller that is not a kernel of this agent is refused.
        let service = format!("{host}:{service_port}");
        let (status, _) = bai_agent_tests::http_get(&service, "/latest/meta-data/envs").expect("GET from the host");
        assert_eq!(status, 403, "the host is no kernel");

        destroy(&client, &first).await;
        destroy(&client, &second).await;
        assert!(!kernel_cgroup(&agent, &first).exists(), "the kernel's cgroup goes with it");
    });
}

/// Deny mode on the real metadata address from a `--network none` kernel: the hook answers
/// `EPERM` before any route is looked up (without it: `ENETUNREACH`). A kernel's own rules
/// narrow the node's, for that kernel only. Raw ICMP to a denied address is dropped by the
/// backstop. The policy holds while the agent is killed and after it restarts.
#[test]
fn deny_mode_kernel_rules_and_the_backstop_hold_across_kill_9() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_listener, port) = listener();
    let host = bridge_host();
    // Raw sockets are let through the guardrail here: the backstop is what is tested.
    let toml = format!(
        "{}\n[policy]\nmetadata-service-port = 0\nmetadata = \"deny\"\n[policy.guardrails]\nraw-socket = \"off\"\n",
        kernel_toml(dir.path(), 24350)
    );
    let mut agent = Agent::start(&toml).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let isolated = unique("kernel");
        let config = kernel_config(PYTHON_IMAGE, "1", "268435456");
        let isolated_container = create_on_network(&client, &isolated, config, "none").await;
        assert_eq!(
            connect_from(&isolated_container, &[("169.254.169.254", 80), ("192.0.2.1", 80)]),
            ["EPERM", "ENETUNREACH"],
            "the metadata address is refused by the hook, anything else finds no route"
        );
        assert_eq!(verdicts(&agent, &isolated, "metadata", "denied"), 1.0);
        destroy(&client, &isolated).await;
        assert!(!kernel_cgroup(&agent, &isolated).exists(), "its cgroup goes with it");

        let narrowed = unique("kernel");
        let own_rules = map(vec![(
            "deny",
            Value::Array(vec![map(vec![("cidr", format!("{host}/32").into()), ("name", "own-rule".into())])]),
        )]);
        let narrowed_container = create_python(&client, &narrowed, "narrowed", Some(own_rules)).await;
        let plain = unique("kernel");
        let plain_container = create_python(&client, &plain, "plain", None).await;
        let host_text = host.to_string();
        assert_eq!(connect_from(&narrowed_container, &[(&host_text, port)]), ["EPERM"], "its own rule denies");
        assert_eq!(connect_from(&plain_container, &[(&host_text, port)]), ["ok"], "the neighbour is not narrowed");
        assert_eq!(verdicts(&agent, &narrowed, "own-rule", "denied"), 1.0);
        let raw_ping = format!(
            "import socket, errno\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n\
             try:\n\
             \x20   s.sendto(b'\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00', ('{host}', 0)); print('sent')\n\
             except OSError as e:\n\
             \x20   print(errno.errorcode.get(e.errno, str(e)))"
        );
        assert_eq!(python_in(&narrowed_container, &raw_ping), "EPERM", "raw ICMP meets the backstop");
        assert_eq!(python_in(&plain_container, &raw_ping), "sent", "the neighbour may ping");

        // The programs and maps are pinned: killing the agent changes nothing for the kernels.
        agent.kill_hard().expect("kill -9");
        assert_eq!(connect_from(&narrowed_container, &[(&host_text, port)]), ["EPERM"], "denied with no agent");
        agent.restart().expect("restart");
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("reconnect");
        assert_eq!(connect_from(&narrowed_container, &[(&host_text, port)]), ["EPERM"], "denied after restart");
        assert_eq!(connect_from(&plain_container, &[(&host_text, port)]), ["ok"], "still open after restart");
        wait_until("the counters are read back", Duration::from_secs(10), || {
            verdicts(&agent, &narrowed, "own-rule", "denied") >= 3.0
        })
        .expect("the pinned counters survived, under the rule's name");
        for kernel in [&narrowed, &plain] {
            destroy(&client, kernel).await;
            assert!(!kernel_cgroup(&agent, kernel).exists(), "{kernel}'s cgroup goes with it");
        }
    });
}

/// A kernel whose network policy cannot be applied is not started, and the reason names it.
#[test]
fn a_kernel_with_a_malformed_policy_is_refused_by_name() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&kernel_toml(dir.path(), 24400)).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let config = with_field(
            kernel_config(PYTHON_IMAGE, "1", "268435456"),
            "internal_data",
            map(vec![("network_policy", map(vec![("deny", Value::Array(vec!["10.0.0.0/99".into()]))]))]),
        );
        let err = create(&client, "s-policy", &kernel, config).await.expect_err("refused");
        assert!(err.contains("internal_data.network_policy") && err.contains("10.0.0.0/99"), "{err}");
        assert!(!kernel_cgroup(&agent, &kernel).exists(), "nothing made for it");
        let listed = client.call("list_kernels", vec![], vec![]).await.expect("list");
        assert!(listed.as_array().is_some_and(|items| items.iter().all(|k| field(k, "id").as_str() != Some(&kernel))));
    });
}

/// A node rule changed in the file and applied with SIGHUP while a kernel probes without
/// pause: the destination denied before and after is never let through (no gap), the newly
/// denied one is refused within a second of the reload, and nothing is restarted. A file that
/// does not parse changes nothing.
#[test]
fn a_reloaded_node_rule_applies_at_once_with_no_gap() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_first_listener, first) = listener();
    let (_second_listener, second) = listener();
    let (low, high) = (first.min(second), first.max(second));
    let host = bridge_host();
    let rule = |ports: &str| format!("deny = [{{ cidr = \"{host}/32\", ports = \"{ports}\", name = \"moving\" }}]\n");
    let toml = format!(
        "{}\n[policy]\nmetadata-service-port = 0\n{}",
        kernel_toml(dir.path(), 24450),
        rule(&first.to_string())
    );
    let agent = Agent::start(&toml).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let container = create_python(&client, &kernel, "probing", None).await;
        // Probe both ports for 6 s, writing `time first second` per round.
        let probe = format!(
            "import socket, errno, time\n\
             def attempt(port):\n\
             \x20   s = socket.socket(); s.settimeout(2)\n\
             \x20   try:\n\
             \x20       s.connect(('{host}', port)); return 'ok'\n\
             \x20   except OSError as e:\n\
             \x20       return errno.errorcode.get(e.errno, str(e))\n\
             \x20   finally:\n\
             \x20       s.close()\n\
             out = open('/home/work/probe.log', 'w', buffering=1)\n\
             end = time.time() + 6\n\
             while time.time() < end:\n\
             \x20   out.write(f'{{time.time()}} {{attempt({first})}} {{attempt({second})}}\\n')\n\
             \x20   time.sleep(0.002)\n\
             out.write('done\\n')\n"
        );
        let started = Command::new("docker")
            .args(["exec", "-d", &container, "python3", "-c", &probe])
            .status()
            .expect("docker exec -d");
        assert!(started.success());
        std::thread::sleep(Duration::from_secs(1));
        let config = std::fs::read_to_string(agent.config_path()).expect("config");
        std::fs::write(agent.config_path(), config.replace("policy]\n", "policy]\nno-such-key = 1\n")).expect("write");
        agent.reload().expect("SIGHUP");
        std::thread::sleep(Duration::from_millis(700));
        std::fs::write(agent.config_path(), config.replace(&rule(&first.to_string()), &rule(&format!("{low}-{high}"))))
            .expect("write");
        let reloaded_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
        agent.reload().expect("SIGHUP");
        let log = dir.path().join("scratch").join(&kernel).join("work").join("probe.log");
        wait_until("the probe finishes", Duration::from_secs(15), || {
            std::fs::read_to_string(&log).is_ok_and(|text| text.contains("done"))
        })
        .expect("probe done");
        let text = std::fs::read_to_string(&log).expect("probe log");
        let rounds: Vec<(f64, String, String)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                Some((fields.next()?.parse().ok()?, fields.next()?.to_owned(), fields.next()?.to_owned()))
            })
            .collect();
        assert!(rounds.len() > 200, "the probe ran without pause: {} rounds", rounds.len());
        assert!(rounds.iter().all(|(_, denied, _)| denied == "EPERM"), "the denied port was never let through");
        let reloaded = reloaded_at.as_secs_f64();
        let before: Vec<_> = rounds.iter().filter(|(t, _, _)| *t < reloaded - 0.2).collect();
        let after: Vec<_> = rounds.iter().filter(|(t, _, _)| *t > reloaded + 1.0).collect();
        assert!(!before.is_empty() && !after.is_empty(), "rounds on both sides of the reload");
        assert!(
            before.iter().all(|(_, _, open)| open == "ok"),
            "open before the reload (the bad file changed nothing)"
        );
        assert!(after.iter().all(|(_, _, open)| open == "EPERM"), "denied within a second of the reload");
        let first_denied = rounds.iter().find(|(_, _, open)| open == "EPERM").map(|(t, _, _)| *t).expect("denied");
        assert!(first_denied >= reloaded - 0.05, "not denied before the reload");
        assert!(agent.log_text().contains("not reloading"), "the invalid file is named in the log");
        destroy(&client, &kernel).await;
    });
}

/// What opening each path for reading gives inside the kernel: `ok` or the errno's name.
fn open_from(container: &str, paths: &[&str]) -> Vec<String> {
    let list: Vec<String> = paths.iter().map(|path| format!("{path:?}")).collect();
    let code = format!(
        "import os, errno\n\
         for path in [{}]:\n\
         \x20   try:\n\
         \x20       os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK)); print('ok')\n\
         \x20   except OSError as e:\n\
         \x20       print(errno.errorcode.get(e.errno, str(e)))\n",
        list.join(", ")
    );
    python_in(container, &code).lines().map(str::to_owned).collect()
}

/// The container's cgroup directory in the v1 `devices` hierarchy (Docker's layer).
fn v1_devices_dir(agent: &Agent, kernel: &str, container: &str) -> std::path::PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let devices = bai_agent::monitor::cgroup::hierarchy_mounts(&mountinfo)
        .into_iter()
        .find(|mount| mount.file_name().is_some_and(|name| name.to_string_lossy().split(',').any(|c| c == "devices")))
        .expect("this host mounts the v1 devices controller");
    devices.join("bai-kernels").join(&agent.id).join(kernel).join(container)
}

/// Device access: a kernel opens the standard container set and the node it was given
/// (`kernel-devices`), and nothing else. It may make a node for another device (`mknod`, as
/// Docker allows) but opening it fails with `EPERM`, counted and logged. Our set and Docker's
/// v1 `devices.list` for the container agree line for line; a grant slipped into the v1 list
/// behind our back, a `docker update` of the container and `kill -9` of the agent leave the
/// device denied.
#[test]
fn a_kernel_opens_only_the_devices_it_was_given() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "{}\n[policy]\nmetadata-service-port = 0\nkernel-devices = [\"/dev/fuse\"]\n",
        kernel_toml(dir.path(), 24500)
    );
    let mut agent = Agent::start(&toml).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let kernel = unique("kernel");
        let container = create_python(&client, &kernel, "devices", None).await;

        let v1 = v1_devices_dir(&agent, &kernel, &container);
        let docker_list: std::collections::BTreeSet<String> = std::fs::read_to_string(v1.join("devices.list"))
            .expect("devices.list")
            .lines()
            .map(str::to_owned)
            .collect();
        let mut ours: std::collections::BTreeSet<String> =
            bai_agent::policy::devices::STANDARD.iter().map(bai_agent::policy::devices::rule_text).collect();
        ours.insert("c 10:229 rwm".to_owned());
        assert_eq!(docker_list, ours, "Docker's v1 list and ours give the same devices");

        let standard = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/fuse"];
        assert_eq!(open_from(&container, &standard), vec!["ok"; standard.len()], "the standard set and the given");
        let made = python_in(
            &container,
            "import os\nos.mknod('/loop-made', 0o600 | 0o60000, os.makedev(7, 0))\nprint('made')",
        );
        assert_eq!(made, "made", "mknod stays allowed, as Docker has it");
        assert_eq!(open_from(&container, &["/loop-made"]), ["EPERM"], "a device it was not given");
        assert_eq!(verdicts(&agent, &kernel, "device-not-given", "denied"), 1.0, "counted once");
        wait_until("the denial is logged", Duration::from_secs(5), || {
            let log = agent.log_text();
            log.contains("device node it was not given") && log.contains("b 7:0 r")
        })
        .expect("the denial names the device");

        // Docker's layer is told to allow it (as a runtime's own update could): ours still denies.
        std::fs::write(v1.join("devices.allow"), "b 7:0 rwm").expect("grant in the v1 layer");
        assert_eq!(open_from(&container, &["/loop-made"]), ["EPERM"], "our layer holds on its own");
        let updated = Command::new("docker")
            .args(["update", "--cpu-shares", "512", "--pids-limit", "2048", &container])
            .output()
            .expect("docker update");
        assert!(updated.status.success(), "{}", String::from_utf8_lossy(&updated.stderr));
        assert_eq!(open_from(&container, &["/loop-made"]), ["EPERM"], "docker update does not undo it");
        assert_eq!(open_from(&container, &["/dev/null", "/dev/fuse"]), ["ok", "ok"]);
        assert_eq!(verdicts(&agent, &kernel, "device-not-given", "denied"), 3.0);
        agent.kill_hard().expect("kill -9");
        assert_eq!(open_from(&container, &["/loop-made", "/dev/fuse"]), ["EPERM", "ok"], "the same with no agent");
        agent.restart().expect("restart");
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("reconnect");
        assert_eq!(open_from(&container, &["/loop-made", "/dev/fuse"]), ["EPERM", "ok"], "and after its restart");
        destroy(&client, &kernel).await;
    });
}

/// Receives on `port` inside `container` for `secs`, sampling (time, bytes so far) every 0.1 s.
const RECEIVER: &str = r#"
import socket, sys, time, json
port, secs = int(sys.argv[1]), float(sys.argv[2])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('0.0.0.0', port)); l.listen(1)
c, _ = l.accept(); c.settimeout(0.2)
buf = bytearray(1 << 20); total = 0; samples = []; start = time.time(); tick = start
while time.time() - start < secs:
    try:
        n = c.recv_into(buf)
        if n == 0: break
        total += n
    except socket.timeout:
        pass
    now = time.time()
    if now >= tick: samples.append((now, total)); tick += 0.1
print(json.dumps(samples), flush=True)
"#;

/// Sends as fast as it can to `host:port` for `secs`.
const SENDER: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b'x' * 65536; end = time.time() + float(sys.argv[3])
while time.time() < end: s.sendall(buf)
s.close()
"#;

/// Bits per second received between two moments, from the receiver's samples.
/// The samples span from the first at or after `from` to the last at or before `to`: a
/// receiver that got no CPU for a while reads late what arrived meanwhile, so only a span of
/// a few seconds says the rate; a shorter one is refused.
fn rate_between(samples: &[(f64, u64)], from: f64, to: f64) -> f64 {
    let start = samples.iter().find(|(time, _)| *time >= from).copied();
    let end = samples.iter().rfind(|(time, _)| *time <= to).copied();
    let (Some((t0, b0)), Some((t1, b1))) = (start, end) else { panic!("no samples in {from}..{to}") };
    assert!(t1 - t0 >= 1.5, "only {:.2} s of samples in {from:.2}..{to:.2}: {samples:?}", t1 - t0);
    (b1 - b0) as f64 * 8.0 / (t1 - t0)
}

fn kernel_address(container: &str, network: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let out = Command::new("docker").args(["inspect", "--format", &format, container]).output().expect("inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Egress caps (Earliest Departure Time): on a bridge of the test's own, a kernel created with
/// `resource_opts.net_egress_bps` sends TCP at its cap (within 10 %), a neighbour sending to the
/// same receiver at the same time is not held to it, and a cap changed while it sends applies
/// within a second.
#[test]
fn egress_caps_hold_a_kernel_to_its_rate_and_change_within_a_second() {
    require_environment();
    const CAP: u64 = 40_000_000;
    const LOWER: u64 = 16_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    // Three kernels of one core each on a machine that may have two.
    let base = kernel_toml(dir.path(), 24540).replace("reserved-cpu = 0\n", "reserved-cpu = 0\ncpu-overcommit = 2\n");
    let toml = format!("{base}\n[policy]\nmetadata-service-port = 0\n");
    let agent = Agent::start(&toml).expect("agent starts");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let network = unique("bai-test-net");
        client.call("create_local_network", vec![network.as_str().into()], vec![]).await.expect("a bridge");
        let mut containers = Vec::new();
        let (capped, free, receiver) = (unique("kernel"), unique("kernel"), unique("kernel"));
        for (kernel, cap) in [(&capped, Some(CAP)), (&free, None), (&receiver, None)] {
            let mut config = kernel_config(PYTHON_IMAGE, "1", "268435456");
            if let Some(cap) = cap {
                config = with_field(config, "resource_opts", map(vec![("net_egress_bps", cap.into())]));
            }
            containers.push(create_on_network(&client, kernel, config, &network).await);
        }
        let target = kernel_address(&containers[2], &network);
        assert!(!target.is_empty(), "the receiver has an address on the bridge");

        const SECS: f64 = 10.0;
        let receive = |port: u16| {
            let container = containers[2].clone();
            std::thread::spawn(move || {
                let out = Command::new("docker")
                    .args(["exec", &container, "python3", "-c", RECEIVER, &port.to_string(), &SECS.to_string()])
                    .output()
                    .expect("receiver");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let json = text.lines().last().unwrap_or_default().to_owned();
                serde_json::from_str::<Vec<(f64, u64)>>(&json)
                    .unwrap_or_else(|err| panic!("{err}: {text}{}", String::from_utf8_lossy(&out.stderr)))
            })
        };
        let (capped_rx, free_rx) = (receive(5001), receive(5002));
        std::thread::sleep(Duration::from_secs(1));
        for (container, port) in [(&containers[0], "5001"), (&containers[1], "5002")] {
            Command::new("docker")
                .args(["exec", "-d", container, "python3", "-c", SENDER, &target, port, &SECS.to_string()])
                .status()
                .expect("sender");
        }
        tokio::time::sleep(Duration::from_millis(3500)).await;
        // Measured from the request: the cap must hold within a second of it.
        let changed_at =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        let reply = client
            .call("set_egress_cap", vec![capped.as_str().into(), LOWER.into()], vec![])
            .await
            .expect("set_egress_cap");
        assert_eq!(field(&reply, "egress_bps").as_u64(), Some(LOWER));
        let (capped_samples, free_samples) = (capped_rx.join().expect("receiver"), free_rx.join().expect("receiver"));

        let first = capped_samples.first().expect("samples").0;
        let last = capped_samples.last().expect("samples").0;
        assert!(last >= changed_at + 4.0, "the receiver ran past the window ({last} < {changed_at} + 4)");
        let before = rate_between(&capped_samples, first + 0.5, changed_at);
        // From a second after the request to the end (at least 3 s, by the check above).
        let after = rate_between(&capped_samples, changed_at + 1.0, last);
        let neighbour = rate_between(&free_samples, first + 0.5, changed_at);
        eprintln!("capped {before:.0} bit/s, then {after:.0} bit/s; neighbour {neighbour:.0} bit/s");
        if (after - LOWER as f64).abs() > LOWER as f64 * 0.10 {
            // What the capped kernel's qdisc and sockets looked like, for the failure's reader.
            let pid = Command::new("docker").args(["inspect", "--format", "{{.State.Pid}}", &containers[0]]).output();
            let pid = pid.map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned()).unwrap_or_default();
            for what in [&["tc", "-s", "qdisc", "show"][..], &["ss", "-tin"][..]] {
                let out = Command::new("nsenter").args(["-t", &pid, "-n"]).args(what).output();
                eprintln!(
                    "{what:?}: {}",
                    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
                );
            }
            eprintln!(
                "capped samples after the change: {:?}",
                capped_samples.iter().filter(|(t, _)| *t >= changed_at - 0.5).collect::<Vec<_>>()
            );
        }
        assert!((before - CAP as f64).abs() <= CAP as f64 * 0.10, "{before} bit/s against a cap of {CAP}");
        assert!(
            (after - LOWER as f64).abs() <= LOWER as f64 * 0.10,
            "{after} bit/s a second after lowering to {LOWER}"
        );
        assert!(neighbour > 4.0 * CAP as f64, "the neighbour is not held to the cap: {neighbour} bit/s");
        let caps = agent.metrics().expect("metrics");
        let gauge = caps
            .iter()
            .find(|s| {
                s.name == "backendai_agent_policy_egress_cap_bits_per_second"
                    && s.labels.get("kernel_id").map(String::as_str) == Some(capped.as_str())
            })
            .map(|s| s.value);
        assert_eq!(gauge, Some(LOWER as f64));
        for kernel in [&capped, &free, &receiver] {
            destroy(&client, kernel).await;
        }
        client.call("destroy_local_network", vec![network.as_str().into()], vec![]).await.expect("bridge removed");
    });
}

/// Does, from inside a kernel's cgroup, each call a guardrail covers and prints what each gave.
/// It runs in a privileged helper container with the host's pid namespace (so that a process
/// outside the kernel is there to `ptrace`, and no seccomp profile answers first) and moves
/// itself into the kernel's cgroup before it starts.
const GUARDED_CALLS: &str = r#"
import ctypes, errno, json, os, socket, subprocess, sys
cgroup, outside = sys.argv[1], int(sys.argv[2])
with open(os.path.join(cgroup, 'cgroup.procs'), 'w') as f:
    f.write('0')
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
x86 = os.uname().machine == 'x86_64'
NR_PERF, NR_BPF = (298, 321) if x86 else (241, 280)
def result(rc):
    return 'ok' if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), '?')
def sock(family, kind, proto=0):
    try:
        socket.socket(family, kind, proto).close(); return 'ok'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
out = {}
out['raw-socket'] = sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
out['packet-socket'] = sock(17, socket.SOCK_RAW)
out['module'] = sock(12, socket.SOCK_SEQPACKET)
attr = (ctypes.c_uint32 * 18)(2, 4, 4, 1)
out['bpf'] = result(libc.syscall(NR_BPF, 0, ctypes.byref(attr), ctypes.sizeof(attr)))
perf = (ctypes.c_uint8 * 128)()
perf[0] = 1
perf[4] = 128
fd = libc.syscall(NR_PERF, ctypes.byref(perf), 0, -1, -1, 0)
out['perf-event'] = result(fd)
os.makedirs('/tmp/guarded-mount', exist_ok=True)
rc = libc.mount(b'none', b'/tmp/guarded-mount', b'tmpfs', 0, None)
out['mount'] = result(rc)
if rc == 0:
    libc.umount2(b'/tmp/guarded-mount', 0)
out['ptrace-outside'] = result(libc.ptrace(0x4206, outside, 0, 0))
child = subprocess.Popen(['sleep', '30'])
out['ptrace-inside'] = result(libc.ptrace(0x4206, child.pid, 0, 0))
child.kill()
print(json.dumps(out, sort_keys=True))
"#;

/// Runs [`GUARDED_CALLS`] in `kernel`'s cgroup against `outside`, a host process.
fn guarded_calls(cgroup: &std::path::Path, outside: u32) -> serde_json::Value {
    let mount = format!("{}:/hostcg", cgroup.display());
    let out = Command::new("docker")
        .args(["run", "--rm", "--privileged", "--pid", "host", "-v", &mount, PYTHON_IMAGE, "python3", "-c"])
        .args([GUARDED_CALLS, "/hostcg", &outside.to_string()])
        .output()
        .expect("docker run");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|err| panic!("{err}: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

fn guardrail_active(agent: &Agent, guardrail: &str) -> bool {
    agent.metrics().expect("metrics").iter().any(|s| {
        s.name == "backendai_agent_policy_guardrails_active"
            && s.labels.get("guardrail").map(String::as_str) == Some(guardrail)
            && s.value == 1.0
    })
}

fn guardrail_observed(agent: &Agent, guardrail: &str) -> bool {
    agent.metrics().expect("metrics").iter().any(|s| {
        s.name == "backendai_agent_policy_guardrails_observed"
            && s.labels.get("guardrail").map(String::as_str) == Some(guardrail)
            && s.value == 1.0
    })
}

/// `bpf()`, `perf_event_open()` and `mount()` from a kernel's own process (Docker's seccomp
/// profile and capabilities apply), with what each gave.
const RUNTIME_REFUSED: &str = "import ctypes, errno, os, json\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
libc.syscall.restype = ctypes.c_long\n\
NR_PERF, NR_BPF = (298, 321) if os.uname().machine == 'x86_64' else (241, 280)\n\
def result(rc):\n\
\x20   return 'ok' if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), '?')\n\
attr = (ctypes.c_uint32 * 18)(2, 4, 4, 1)\n\
perf = (ctypes.c_uint8 * 128)()\n\
perf[0] = 1\n\
perf[4] = 128\n\
os.makedirs('/tmp/guarded-mount', exist_ok=True)\n\
print(json.dumps({'bpf': result(libc.syscall(NR_BPF, 0, ctypes.byref(attr), ctypes.sizeof(attr))),\n\
\x20   'perf-event': result(libc.syscall(NR_PERF, ctypes.byref(perf), 0, -1, -1, 0)),\n\
\x20   'mount': result(libc.mount(b'none', b'/tmp/guarded-mount', b'tmpfs', 0, None))}, sort_keys=True))";

/// Without BPF LSM: the guardrails with a syscall tracepoint are reported observed, and a
/// kernel's calls are counted with their outcome: the packet socket it opened (Docker gives
/// CAP_NET_RAW) as monitored, `bpf()`, `perf_event_open()` and `mount()` (refused by Docker's
/// seccomp profile) as denied, each exactly once (the runtime's own mounts before the kernel's
/// first program are not its calls), and reported in the log.
fn observed_without_lsm(agent: &Agent, kernel: &str, container: &str) {
    for guardrail in ["packet-socket", "bpf", "perf-event", "mount"] {
        assert!(guardrail_observed(agent, guardrail), "{guardrail} is observed");
        assert!(!guardrail_active(agent, guardrail), "{guardrail} does not decide here");
    }
    assert!(!guardrail_observed(agent, "raw-socket"), "raw sockets are decided, not just observed");
    assert!(!guardrail_observed(agent, "ptrace-outside"), "no tracepoint can tell a ptrace target's kernel");
    assert!(verdicts(agent, kernel, "packet-socket", "monitored") >= 1.0, "the packet socket it opened");
    let calls: serde_json::Value = serde_json::from_str(&python_in(container, RUNTIME_REFUSED)).expect("json");
    for guardrail in ["bpf", "perf-event", "mount"] {
        assert_eq!(calls[guardrail], "EPERM", "Docker's seccomp profile refuses {guardrail}: {calls}");
        assert_eq!(verdicts(agent, kernel, guardrail, "denied"), 1.0, "{guardrail} counted once as denied");
        assert_eq!(verdicts(agent, kernel, guardrail, "monitored"), 0.0, "{guardrail}: nothing else counted");
    }
    wait_until("the observed calls are logged", Duration::from_secs(5), || {
        let log = agent.log_text();
        ["bpf", "perf-event", "mount"]
            .iter()
            .all(|rule| log.lines().any(|line| line.contains("a guardrail saw") && line.contains(rule)))
    })
    .expect("logged");
}

/// `drop-net-raw`: packet sockets refused on every host. Where BPF LSM cannot run, a kernel
/// under `enforce` for both socket guardrails starts without `CAP_NET_RAW`; a kernel whose own
/// packet-socket mode is `monitor` keeps it (its raw sockets still meet the raw-socket
/// guardrail). Where BPF LSM runs, its guardrail refuses the packet socket and the capability
/// stays: the same outcomes.
#[test]
fn drop_net_raw_refuses_packet_sockets_where_the_guardrail_cannot() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "{}\n[policy]\nmetadata-service-port = 0\n[policy.guardrails]\ndrop-net-raw = true\n",
        kernel_toml(dir.path(), 25100)
    );
    let agent = Agent::start(&toml).expect("agent starts");
    let lsm = guardrail_active(&agent, "packet-socket");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let (strict, monitored) = (unique("kernel"), unique("kernel"));
        let strict_container = create_python(&client, &strict, "strict", None).await;
        let monitored_container = create_with_guardrail(&client, &monitored, "packet-socket", "monitor").await;
        assert_eq!(python_in(&strict_container, RAW_AND_PACKET), "EPERM\nEPERM", "both refused");
        assert_eq!(python_in(&monitored_container, RAW_AND_PACKET), "EPERM\nok", "its own exception");
        assert!(verdicts(&agent, &strict, "packet-socket", "denied") >= 1.0, "the refusal is counted");
        assert!(verdicts(&agent, &monitored, "packet-socket", "monitored") >= 1.0, "the packet socket is seen");
        let cap_drop = |container: &str| {
            let out = Command::new("docker")
                .args(["inspect", "-f", "{{json .HostConfig.CapDrop}}", container])
                .output()
                .expect("docker inspect");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let expected = if lsm { "null" } else { "[\"NET_RAW\"]" };
        assert_eq!(cap_drop(&strict_container), expected, "the capability is dropped only where it has to be");
        assert_eq!(cap_drop(&monitored_container), "null");
        for kernel in [&strict, &monitored] {
            destroy(&client, kernel).await;
        }
    });
}

/// A python kernel with its own mode for one guardrail (`internal_data.guardrails`): its container.
async fn create_with_guardrail(client: &RpcClient, kernel: &str, guardrail: &str, mode: &str) -> String {
    let config = with_field(
        kernel_config(PYTHON_IMAGE, "1", "268435456"),
        "internal_data",
        map(vec![("guardrails", map(vec![(guardrail, mode.into())]))]),
    );
    created_id(&create(client, "s-policy", kernel, config).await.expect("create"), "container_id")
}

/// What opening a raw IPv4 socket and a packet socket gives inside a kernel's container.
const RAW_AND_PACKET: &str = "import socket, errno\n\
for family, kind, proto in [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), (17, socket.SOCK_RAW, 0)]:\n\
\x20   try:\n\
\x20       socket.socket(family, kind, proto).close(); print('ok')\n\
\x20   except OSError as e:\n\
\x20       print(errno.errorcode.get(e.errno, str(e)))";

/// Guardrails per kernel. Raw sockets (a cgroup socket program, on every host): refused with
/// `EPERM` under the default, counted and reported; a kernel's own exception lets them through
/// for it alone; a mode flipped to `monitor` in the file with SIGHUP applies to the next call.
/// The BPF LSM guardrails, where the host runs BPF LSM: packet sockets, `bpf()`, mounts, module
/// loading and `ptrace` of a process outside the kernel refused, `perf_event_open` monitored,
/// `ptrace` inside untouched. Where the host cannot run BPF LSM, the agent says why, reports
/// them inactive, and refuses to start when they are `required`.
#[test]
fn guardrails_enforce_or_monitor_per_kernel_and_a_flip_applies_to_the_next_call() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!("{}\n[policy]\nmetadata-service-port = 0\n", kernel_toml(dir.path(), 24580));
    let agent = Agent::start(&toml).expect("agent starts");
    assert!(guardrail_active(&agent, "raw-socket"), "the raw-socket guardrail runs everywhere");
    let lsm = guardrail_active(&agent, "packet-socket");
    runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await.expect("connect");
        let (guarded, excepted) = (unique("kernel"), unique("kernel"));
        let guarded_container = create_python(&client, &guarded, "guarded", None).await;
        let excepted_container = create_with_guardrail(&client, &excepted, "raw-socket", "off").await;

        // The kernel's own processes, as Docker runs them (CAP_NET_RAW included).
        let packet = if lsm { "EPERM" } else { "ok" };
        assert_eq!(python_in(&guarded_container, RAW_AND_PACKET), format!("EPERM\n{packet}"), "raw sockets refused");
        assert_eq!(python_in(&excepted_container, RAW_AND_PACKET), format!("ok\n{packet}"), "its own exception");
        assert_eq!(verdicts(&agent, &guarded, "raw-socket", "denied"), 1.0, "counted once");
        assert_eq!(verdicts(&agent, &excepted, "raw-socket", "denied"), 0.0);
        wait_until("the refusal is logged", Duration::from_secs(5), || {
            agent.log_text().lines().any(|line| line.contains("a guardrail saw") && line.contains("raw-socket"))
        })
        .expect("logged");

        let mut outside = Command::new("sleep").arg("60").spawn().expect("a process outside the kernel");
        let cgroup = kernel_cgroup(&agent, &guarded);
        if lsm {
            // Everything else, from a process in the kernel's cgroup without seccomp or pid namespace.
            let calls = guarded_calls(&cgroup, outside.id());
            for rule in ["raw-socket", "packet-socket", "bpf", "mount", "ptrace-outside"] {
                assert_eq!(calls[rule], "EPERM", "{rule}: {calls}");
            }
            assert_eq!(calls["module"], "EAFNOSUPPORT", "the module was not loaded: {calls}");
            assert_eq!(calls["perf-event"], "ok", "monitored only: {calls}");
            assert_eq!(calls["ptrace-inside"], "ok", "{calls}");
            for (rule, verdict) in [
                ("packet-socket", "denied"),
                ("bpf", "denied"),
                ("mount", "denied"),
                ("module", "denied"),
                ("ptrace-outside", "denied"),
                ("perf-event", "monitored"),
            ] {
                assert!(verdicts(&agent, &guarded, rule, verdict) >= 1.0, "{rule} {verdict}");
            }
        } else {
            eprintln!(
                "NOTE: this host refuses BPF LSM programs; the LSM guardrails are checked for being reported inactive, observed by syscall tracepoints, and for `required = true` refusing to start, not for their own verdicts"
            );
            assert!(
                agent.log_text().contains("the BPF LSM guardrails cannot run on this host"),
                "the agent says why: {}",
                agent.log_text()
            );
            observed_without_lsm(&agent, &guarded, &guarded_container);
        }

        // Flipped in the file: raw sockets monitored (and the LSM rules loosened) from the next call.
        let flipped = format!(
            "{toml}[policy.guardrails]\nraw-socket = \"monitor\"\nmount = \"monitor\"\nptrace-outside = \"off\"\n"
        );
        std::fs::write(agent.config_path(), flipped).expect("rewrite the config");
        agent.reload().expect("SIGHUP");
        wait_until("the flip is applied", Duration::from_secs(5), || agent.log_text().contains("network policy reloaded"))
            .expect("reloaded");
        assert_eq!(python_in(&guarded_container, RAW_AND_PACKET), format!("ok\n{packet}"), "monitored now");
        assert_eq!(verdicts(&agent, &guarded, "raw-socket", "monitored"), 1.0);
        assert_eq!(verdicts(&agent, &guarded, "raw-socket", "denied"), 1.0, "no more denials");
        if lsm {
            let calls = guarded_calls(&cgroup, outside.id());
            assert_eq!((calls["mount"].as_str(), calls["ptrace-outside"].as_str()), (Some("ok"), Some("ok")), "{calls}");
            assert_eq!(calls["packet-socket"], "EPERM", "the rest stays: {calls}");
            assert!(verdicts(&agent, &guarded, "mount", "monitored") >= 1.0);
        }
        let _ = outside.kill();
        let _ = outside.wait();
        for kernel in [&guarded, &excepted] {
            destroy(&client, kernel).await;
        }
    });
    drop(agent);

    if !lsm {
        let required = format!("{toml}[policy.guardrails]\nrequired = true\n");
        let err = Agent::start(&required).err().expect("refuses to start without its guardrails").to_string();
        assert!(err.contains("the guardrails cannot run") && err.contains("required = true"), "{err}");
    }
}
