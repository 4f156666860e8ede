//! The foundation, end to end on a real Docker engine and real eBPF: CPU time and
//! network bytes per kernel container agree with the kernel's own accounting (from eBPF,
//! and from the cgroup-file fallback), kernels
//! are picked up whenever they started, removed ones leave `/metrics`, bad config is refused.

use std::{process::Command, time::Duration};

use bai_agent_tests::{Agent, Container, relative_error, require_environment, wait_until};

/// Quick sampling and a short grace so tests do not wait long.
const FAST: &str = "[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"1s\"\n";

/// Waits two sampling intervals so `/metrics` reflects what has already happened.
fn settle() {
    std::thread::sleep(Duration::from_millis(600));
}

/// The same, with every resource counted from cgroup files instead of eBPF.
const FAST_FROM_FILES: &str = "[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"1s\"\n\
     cgroup-file-resources = [\"cpu\", \"network\", \"block-io\", \"oom\"]\n";

#[test]
fn cpu_time_agrees_with_the_cgroups_own_accounting() {
    cpu_time_agrees(FAST, "ebpf");
}

#[test]
fn cpu_time_from_cgroup_files_agrees_too() {
    cpu_time_agrees(FAST_FROM_FILES, "cgroup-files");
}

fn cpu_time_agrees(config: &str, source: &str) {
    require_environment();
    let agent = Agent::start(config).expect("agent starts");
    assert_eq!(agent.source_of("cpu").expect("scrape").as_deref(), Some(source));
    // Idle until the agent counts it, busy for 5 s at half a CPU, then idle again, so
    // both readings can be taken while nothing changes.
    let container = Container::run(
        &agent.id,
        &["--cpus", "0.5", "--network", "none"],
        "sleep 3; timeout -s KILL 5 sh -c 'while :; do :; done'; sleep 3600",
    )
    .expect("container runs");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");
    settle();
    let kernel_before = container.kernel_cpu_ns().expect("cpuacct readable") as f64 / 1e9;
    let agent_before =
        agent.kernel_value("container_cpu_usage_seconds_total", &container.kernel_id).expect("scrape").expect("series");

    // Wait for the busy phase to start and then to end (the cgroup stops accruing time).
    wait_until("the busy loop to start", Duration::from_secs(10), || {
        container.kernel_cpu_ns().is_ok_and(|ns| ns as f64 / 1e9 > kernel_before + 0.2)
    })
    .expect("busy phase");
    let mut last = 0;
    wait_until("the busy loop to end", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(400));
        let now = container.kernel_cpu_ns().unwrap_or(0);
        let idle = now.saturating_sub(last) < 5_000_000;
        last = now;
        idle
    })
    .expect("busy phase ends");
    settle();

    let kernel_delta = container.kernel_cpu_ns().expect("cpuacct readable") as f64 / 1e9 - kernel_before;
    let agent_delta =
        agent.kernel_value("container_cpu_usage_seconds_total", &container.kernel_id).expect("scrape").expect("series")
            - agent_before;
    let error = relative_error(agent_delta, kernel_delta);
    println!("cpu: agent {agent_delta:.6} s, kernel {kernel_delta:.6} s, error {:.3}%", error * 100.0);
    assert!(kernel_delta > 2.0, "the container should have used about 2.5 s of CPU, used {kernel_delta}");
    assert!(error < 0.01, "agent {agent_delta} s vs kernel {kernel_delta} s: {:.3}% apart", error * 100.0);
}

#[test]
fn network_bytes_agree_with_the_containers_interface_counters() {
    network_bytes_agree(FAST, "ebpf");
}

#[test]
fn network_bytes_from_proc_net_dev_agree_too() {
    network_bytes_agree(FAST_FROM_FILES, "cgroup-files");
}

fn network_bytes_agree(config: &str, source: &str) {
    require_environment();
    let agent = Agent::start(config).expect("agent starts");
    assert_eq!(agent.source_of("network").expect("scrape").as_deref(), Some(source));
    const SIZE: u64 = 10 * 1024 * 1024;
    // A web server and a client inside one container, over its own loopback: every
    // byte on `lo` in its network namespace is the container's own.
    let script = format!(
        "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1048576 count={} 2>/dev/null && \
         httpd -p 127.0.0.1:8080 -h /www && sleep 2 && \
         wget -q -O /dev/null http://127.0.0.1:8080/blob && touch /done; sleep 3600",
        SIZE / 1048576
    );
    let container = Container::run(&agent.id, &["--network", "none"], &script).expect("container runs");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");
    wait_until("the download to finish", Duration::from_secs(30), || container.has_file("/done")).expect("download");
    settle();

    // Loopback counts from the IP header up (it strips its Ethernet header before
    // counting) and counts each GSO segment; the agent counts in the same units (it adds
    // 14 header bytes per packet only on non-loopback devices), so they compare as is.
    let lo = container.net_dev("lo").expect("net/dev readable");
    let value = |name: &str| agent.kernel_value(name, &container.kernel_id).expect("scrape").expect("series");
    let rx_bytes = value("container_network_receive_bytes_total");
    let tx_bytes = value("container_network_transmit_bytes_total");
    let rx_packets = value("container_network_receive_packets_total");
    let tx_packets = value("container_network_transmit_packets_total");
    println!("net: agent rx {rx_bytes} B/{rx_packets} p, tx {tx_bytes} B/{tx_packets} p; lo {lo:?}");

    assert!(lo.tx_bytes >= SIZE, "the transfer should have put {SIZE} bytes on lo: {lo:?}");
    for (what, agent_value, truth) in [
        ("rx bytes", rx_bytes, lo.rx_bytes as f64),
        ("tx bytes", tx_bytes, lo.tx_bytes as f64),
        ("rx packets", rx_packets, lo.rx_packets as f64),
    ] {
        let error = relative_error(agent_value, truth);
        assert!(error < 0.01, "{what}: agent {agent_value} vs /proc/net/dev {truth}: {:.3}% apart", error * 100.0);
    }
    // Loopback splits some TCP GSO super-packets into segments after the egress hook has
    // counted them whole, so its tx packet count can only be higher; each extra segment
    // carries one more IP+TCP header, which is all the byte difference may be.
    let extra_segments = lo.tx_packets as f64 - tx_packets;
    assert!(extra_segments >= 0.0, "the agent cannot see more packets than lo: {tx_packets} vs {lo:?}");
    let header_bytes = lo.tx_bytes as f64 - tx_bytes;
    assert!(
        header_bytes >= 0.0 && header_bytes <= extra_segments * 60.0,
        "tx bytes missing from the agent ({header_bytes}) are more than the headers of {extra_segments} extra segments"
    );
}

#[test]
fn a_kernel_running_before_the_agent_is_picked_up_and_a_removed_one_leaves() {
    require_environment();
    let agent_id = bai_agent_tests::unique("i-test");
    let container = Container::run(&agent_id, &["--network", "none"], "sleep 3600").expect("container runs");
    // A container of another agent must be left alone.
    let foreign = Container::run("i-someone-else", &["--network", "none"], "sleep 3600").expect("container runs");

    let agent = Agent::start_with_id(&agent_id, FAST).expect("agent starts");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("pre-existing kernel picked up");
    let samples = agent.metrics().expect("scrape");
    let series = samples
        .iter()
        .find(|s| s.name == "container_cpu_usage_seconds_total" && s.labels["kernel_id"] == container.kernel_id)
        .expect("cpu series");
    assert_eq!(series.labels["container_id"], container.id);
    assert_eq!(series.labels["session_id"], format!("session-of-{}", container.kernel_id));
    assert_eq!(series.labels["image"], bai_agent_tests::BUSYBOX_IMAGE);
    assert_eq!(series.labels["owner_user_id"], "user-1");
    assert_eq!(series.labels["owner_project_id"], "project-1");
    assert!(
        !samples.iter().any(|s| s.labels.get("kernel_id") == Some(&foreign.kernel_id)),
        "another agent's kernel must not be counted"
    );

    // One started while the agent runs is picked up too.
    let later = Container::run(&agent_id, &["--network", "none"], "sleep 3600").expect("container runs");
    agent.wait_for_kernel(&later.kernel_id, true, Duration::from_secs(10)).expect("new kernel picked up");

    container.remove().expect("docker rm");
    agent.wait_for_kernel(&container.kernel_id, false, Duration::from_secs(10)).expect("removed kernel leaves");
    let attached = agent
        .metrics()
        .expect("scrape")
        .into_iter()
        .find(|s| s.name == "backendai_agent_attached_cgroups")
        .expect("self metric")
        .value;
    assert_eq!(attached, 1.0, "only the later kernel stays attached");
    assert!(agent.kernel_value("container_cpu_usage_seconds_total", &later.kernel_id).expect("scrape").is_some());
}

#[test]
fn sigterm_exits_zero_leaving_containers_running_and_counted() {
    require_environment();
    let mut agent = Agent::start(FAST).expect("agent starts");
    let container = Container::run(&agent.id, &["--network", "none"], "sleep 3600").expect("container runs");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "exit status {status}; log:\n{}", agent.log_text());
    assert!(agent.log_text().contains("leaving the eBPF programs counting (pinned) for the next agent"));
    // The programs and the container's packet counters stay pinned for the next agent.
    let links = bai_agent::config::Config::default().monitor.bpffs_dir.join(&agent.id).join("links");
    let pinned: Vec<String> = std::fs::read_dir(&links)
        .expect("the agent's pinned links")
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    for name in ["sched_stat_runtime", "block_bio_queue", "mark_victim"] {
        assert!(pinned.iter().any(|p| p == name), "{name} is pinned: {pinned:?}");
    }
    assert_eq!(pinned.iter().filter(|p| p.starts_with("skb-")).count(), 2, "{pinned:?}");
    let running =
        Command::new("docker").args(["inspect", "-f", "{{.State.Running}}", &container.id]).output().expect("docker");
    assert_eq!(String::from_utf8_lossy(&running.stdout).trim(), "true");
}

#[test]
fn a_malformed_config_is_refused_naming_the_key() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, key) in [
        ("[monitor]\nintervall = \"1s\"\n", "monitor.intervall"),
        ("[agent]\ninternal-addr = 6003\n", "agent.internal-addr"),
        ("[monitor]\ninterval = \"often\"\n", "monitor.interval"),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write config");
        let out =
            Command::new(bai_agent_tests::agent_binary()).arg("--config").arg(&path).output().expect("agent runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "config {text:?} must be refused; stderr: {stderr}");
        assert!(stderr.contains(&format!("`{key}`")), "the error must name `{key}`: {stderr}");
    }
}

/// Backend.AI 26.9.6's own sample `agent.toml` (from the `backend.ai-install` wheel that setup
/// unpacks) is a valid configuration: the keys bai-agent does not use are named, not refused.
#[test]
fn the_python_agents_own_sample_agent_toml_loads() {
    require_environment();
    let install =
        std::env::var_os("BAI_TEST_BACKENDAI_INSTALL").expect("BAI_TEST_BACKENDAI_INSTALL (cargo xtask test)");
    let sample = std::path::Path::new(&install).join("ai/backend/install/configs/agent.toml");
    let out = Command::new(bai_agent_tests::agent_binary())
        .arg("--config")
        .arg(&sample)
        .arg("--check-config")
        .output()
        .expect("agent runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {}{stdout}", sample.display(), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rpc_listen_addr: 127.0.0.1:6001"), "{stdout}");
    assert!(stdout.contains("ignored (keys of the Python agent that bai-agent does not use): "), "{stdout}");
    assert!(stdout.contains("agent.mode") && stdout.contains("container.kernel-uid"), "{stdout}");
}

#[test]
fn counters_survive_a_kill_9_of_the_agent_and_count_while_it_is_down() {
    require_environment();
    let id = bai_agent_tests::unique("i-test");
    let mut agent = Agent::start_with_id(&id, FAST).expect("agent starts");
    let busy = Container::run(&agent.id, &["--cpus", "0.5", "--network", "none"], "while :; do :; done")
        .expect("container runs");
    let ended = Container::run(&agent.id, &["--network", "none"], "sleep 3600").expect("container runs");
    for container in [&busy, &ended] {
        agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(10)).expect("picked up");
    }
    std::thread::sleep(Duration::from_secs(1));
    let kernel_before = busy.kernel_cpu_ns().expect("cpuacct") as f64 / 1e9;
    let agent_before =
        agent.kernel_value("container_cpu_usage_seconds_total", &busy.kernel_id).expect("scrape").expect("series");

    agent.kill_hard().expect("kill -9");
    // The busy kernel goes on burning CPU, and the other one ends, while no agent runs.
    ended.remove().expect("docker rm");
    std::thread::sleep(Duration::from_secs(3));
    let agent = Agent::start_with_id(&id, FAST).expect("agent restarts");
    agent.wait_for_kernel(&busy.kernel_id, true, Duration::from_secs(10)).expect("picked up again");
    settle();
    let kernel_delta = busy.kernel_cpu_ns().expect("cpuacct") as f64 / 1e9 - kernel_before;
    let agent_delta =
        agent.kernel_value("container_cpu_usage_seconds_total", &busy.kernel_id).expect("scrape").expect("series")
            - agent_before;
    println!("across the restart: agent {agent_delta:.6} s, kernel {kernel_delta:.6} s");
    assert!(kernel_delta > 1.0, "the kernel used about half a CPU for over 3 s: {kernel_delta}");
    // No reset, no gap: what the kernel used while no agent ran is in the counter.
    let error = relative_error(agent_delta, kernel_delta);
    assert!(error < 0.05, "agent {agent_delta} s vs kernel {kernel_delta} s across the restart: {:.2}%", error * 100.0);
    let log = agent.log_text();
    assert!(log.contains("a pinned program of this build is still counting; adopted"), "{log}");
    assert!(log.contains("counters of a container that ended while no agent ran"), "{log}");
    assert_eq!(agent.kernel_value("container_cpu_usage_seconds_total", &ended.kernel_id).expect("scrape"), None);
}
