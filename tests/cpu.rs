//! CPU time on the real engine and the real kernel, for every shape of work real kernels run
//! (see `bai_agent_tests::cpu`): the agent's `container_cpu_usage_seconds_total` agrees with
//! the kernel's own accounting of the container's cgroup within 0.5 % over the same window;
//! a lone busy loop shows while it runs; user and system time add up to the total; and a
//! kernel's start-up is counted.

use std::time::{Duration, Instant};

use bai_agent_tests::{
    Agent, Container,
    cpu::{self, Comparison, Handshake, KernelCpu, Shape, TOLERANCE, agent_cpu_s, settle},
    relative_error, require_environment,
};

const INTERVAL: Duration = Duration::from_millis(200);
const CONFIG: &str = "[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"30s\"\n";

fn agrees(shape: Shape) {
    require_environment();
    let agent = Agent::start(CONFIG).expect("agent starts");
    assert_eq!(agent.source_of("cpu").expect("scrape").as_deref(), Some("ebpf"), "CPU time should come from eBPF");
    let comparison = cpu::measure(&agent, INTERVAL, &shape).expect("the shape runs");
    assert!(comparison.kernel_s > 0.05, "{}: the work should use CPU, used {} s", shape.name, comparison.kernel_s);
    comparison.check(shape.name).unwrap();
}

#[test]
fn fork_and_exec_of_short_processes() {
    agrees(cpu::FORK_EXEC);
}

#[test]
fn a_forked_applet_that_sleeps_a_millisecond() {
    agrees(cpu::USLEEP);
}

#[test]
fn python_subprocesses() {
    agrees(cpu::PYTHON_SUBPROCESS);
}

#[test]
fn python_short_threads() {
    agrees(cpu::PYTHON_THREADS);
}

#[test]
fn a_shell_loop_around_command_substitution() {
    agrees(cpu::DATE_LOOP);
}

#[test]
fn a_busy_loop_without_forks() {
    agrees(cpu::BUSY_LOOP);
}

#[test]
fn threads_busy_on_every_core() {
    agrees(cpu::THREADS_ON_EVERY_CORE);
}

#[test]
fn a_kernel_throttled_by_a_cpu_quota() {
    agrees(cpu::THROTTLED);
}

#[test]
fn a_kernel_pinned_to_a_core_next_to_a_busy_neighbour() {
    agrees(cpu::SHARED_CORE);
}

#[test]
fn work_in_cgroups_nested_inside_the_kernels() {
    agrees(cpu::NESTED);
}

/// At start-up the agent checks its CPU program against the kernel on a workload of short
/// threads and processes, says so in its log and in `/metrics`, and counts from eBPF only when
/// the check passed.
#[test]
fn the_start_up_check_finds_the_cpu_program_exact() {
    require_environment();
    let agent = Agent::start(CONFIG).expect("agent starts");
    let log = agent.log_text();
    assert!(log.contains("the eBPF CPU program counts exactly what the kernel charges (start-up check)"), "{log}");
    let metrics = agent.metrics().expect("scrape");
    let value = |name: &str| metrics.iter().find(|s| s.name == name).map(|s| s.value);
    assert_eq!(value("backendai_agent_cpu_check_exact"), Some(1.0));
    let error = value("backendai_agent_cpu_check_error_ratio").expect("the check's error");
    assert!((0.0..TOLERANCE).contains(&error), "error ratio {error}");
    assert_eq!(agent.source_of("cpu").expect("scrape").as_deref(), Some("ebpf"));
}

/// A lone busy loop on an otherwise idle core: every sample of the agent trails the kernel's
/// counter by at most one interval and one tick of CPU time (plus the scrape itself), and never
/// leads it.
#[test]
fn a_running_busy_loop_shows_while_it_runs() {
    require_environment();
    let agent = Agent::start(CONFIG).expect("agent starts");
    let container =
        Container::run(&agent.id, &["--network", "none", "--cpus", "1"], "while :; do :; done").expect("container");
    let kernel = KernelCpu::of(&container).expect("its cgroup");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(30)).expect("kernel appears");
    settle(INTERVAL, 2);
    // One interval of the loop's CPU, one 4 ms tick (HZ=250; less at higher HZ), and what the
    // scrape and the file read take.
    let allowed = INTERVAL.as_secs_f64() + 0.004 + 0.030;
    let started = Instant::now();
    let mut samples = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let before = kernel.total_ns().expect("cpuacct") as f64 / 1e9;
        let counted = agent_cpu_s(&agent, &container.kernel_id).expect("series");
        let after = kernel.total_ns().expect("cpuacct") as f64 / 1e9;
        assert!(counted <= after, "the agent ({counted} s) is ahead of the kernel ({after} s)");
        assert!(
            before - counted <= allowed,
            "the agent trails the kernel by {:.3} s of CPU (kernel {before:.6} s, agent {counted:.6} s), more than {allowed} s",
            before - counted
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(37));
    }
    assert!(samples > 20, "only {samples} samples in 3 s");
}

/// `container_cpu_user_seconds_total` and `container_cpu_system_seconds_total` add up to the
/// total within 0.5 %, and split it as the kernel does (`cpuacct.stat` / `cpu.stat`), for work
/// that is mostly user time and work that is mostly system time.
#[test]
fn user_and_system_time_add_up_to_the_total() {
    require_environment();
    let agent = Agent::start(CONFIG).expect("agent starts");
    let handshake = Handshake::new().expect("handshake");
    let container = Container::run(
        &agent.id,
        &["--network", "none", "-v", &handshake.volume()],
        "i=0; while [ $i -lt 600000 ]; do i=$((i+1)); done; \
         dd if=/dev/zero of=/dev/null bs=64k count=600000 2>/dev/null; touch /io/done; exec sleep 3600",
    )
    .expect("container");
    let kernel = KernelCpu::of(&container).expect("its cgroup");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(30)).expect("kernel appears");
    handshake.wait_done(Duration::from_secs(120)).expect("work finishes");
    // The split is read again once the kernel rests (the pass after its work ends).
    settle(INTERVAL, 12);
    let value = |name: &str| agent.kernel_value(name, &container.kernel_id).expect("scrape").expect(name);
    let (total, user, system) = (
        value("container_cpu_usage_seconds_total"),
        value("container_cpu_user_seconds_total"),
        value("container_cpu_system_seconds_total"),
    );
    let (kernel_user, kernel_system) = kernel.split_seconds().expect("the kernel's split");
    let kernel_total = kernel.total_ns().expect("cpuacct") as f64 / 1e9;
    println!(
        "agent: user {user:.3} s + system {system:.3} s = {:.6} s of {total:.6} s; kernel: user {kernel_user:.2} s, system {kernel_system:.2} s of {kernel_total:.6} s",
        user + system
    );
    assert!(relative_error(user + system, total) < TOLERANCE, "user + system = {} s, total {total} s", user + system);
    assert!(user > 0.2 && system > 0.2, "both kinds of work ran: user {user} s, system {system} s");
    // The kernel's own split is in ticks (4–10 ms), and on cgroup v1 `cpuacct.stat` shows the
    // raw tick counts, which can trail the exact time of a phase of work by a few ticks; the
    // agent shares out the exact total in the ratio it read and, like the kernel's
    // `cputime_adjust()`, never takes back time it gave one side. So the parts follow the
    // kernel's within a few percent of the total, not to the tick: the work runs long enough
    // (well over a second) that a lag of a few ticks is a few percent.
    for (what, ours, theirs) in [("user", user, kernel_user), ("system", system, kernel_system)] {
        assert!(
            (ours - theirs).abs() <= 0.05 * kernel_total + 0.02,
            "{what}: agent {ours:.3} s, kernel {theirs:.3} s of {kernel_total:.3} s"
        );
    }
}

/// A kernel that works from its first instruction and then idles: the agent's counter equals
/// the kernel's whole accounting of the cgroup, start-up included (the agent learns of a
/// container only after it started).
#[test]
fn a_kernels_start_up_is_counted() {
    require_environment();
    let agent = Agent::start(CONFIG).expect("agent starts");
    let handshake = Handshake::new().expect("handshake");
    let container = Container::run(
        &agent.id,
        &["--network", "none", "-v", &handshake.volume()],
        "i=0; while [ $i -lt 3000 ]; do /bin/true; i=$((i+1)); done; touch /io/done; exec sleep 3600",
    )
    .expect("container");
    let kernel = KernelCpu::of(&container).expect("its cgroup");
    agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(30)).expect("kernel appears");
    handshake.wait_done(Duration::from_secs(120)).expect("work finishes");
    settle(INTERVAL, 2);
    let comparison = Comparison {
        agent_s: agent_cpu_s(&agent, &container.kernel_id).expect("series"),
        kernel_s: kernel.total_ns().expect("cpuacct") as f64 / 1e9,
    };
    comparison.check("the whole life of a kernel, start-up included").unwrap();
}
