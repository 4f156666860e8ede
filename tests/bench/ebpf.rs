//! `bench-ebpf`: the kernel-side cost of each eBPF program per event (CPU-time charges,
//! packets, bios), under a busy workload, as the kernel itself measures it (`kernel.bpf_stats_enabled=1`: run time
//! and run count per program, which the agent exports as
//! `backendai_agent_ebpf_program_{run_time_seconds,runs}_total`).

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bai_agent::monitor::{CgroupLayout, ebpf::BaselinePrograms};
use bai_agent_tests::{Agent, Container, require_environment, wait_until};

/// The agent's programs, what one event is, and the empty program on the same hook.
const PROGRAMS: &[(&str, &str, &str)] = &[
    (
        "sched_stat_runtime",
        "sched_stat_runtime (tp_btf), per CPU-time charge (update_curr) on the node",
        "baseline_sched_stat_runtime",
    ),
    ("cgroup_skb_ingress", "cgroup_skb ingress, per packet received", "baseline_cgroup_skb"),
    ("cgroup_skb_egress", "cgroup_skb egress, per packet sent", "baseline_cgroup_skb"),
    ("block_bio_queue", "block_bio_queue (tp_btf), per bio submitted on the node", "baseline_block_bio_queue"),
];

#[derive(Debug, Clone, Copy, Default)]
struct ProgramStats {
    run_time_ns: f64,
    run_cnt: f64,
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 =
        std::env::args().nth(1).map(|s| s.parse()).transpose().context("usage: bench-ebpf [SECONDS]")?.unwrap_or(20);
    require_environment();
    let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    if enabled.trim() != "1" {
        bail!("kernel.bpf_stats_enabled is not 1; run through `cargo xtask bench`, which sets it");
    }

    let mut agent = Agent::start("[monitor]\ninterval = \"1s\"\n")?;
    // A pipe between two processes switches context on every small write and read.
    let switcher = Container::run(
        &agent.id,
        &["--network", "none"],
        "while :; do dd if=/dev/zero bs=64 count=200000 2>/dev/null | dd of=/dev/null bs=64 2>/dev/null; done",
    )?;
    // A web server and a client looping over the container's own loopback.
    let network = Container::run(
        &agent.id,
        &["--network", "none"],
        "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=65536 count=16 2>/dev/null && \
         httpd -p 127.0.0.1:8080 -h /www && sleep 1 && \
         while :; do wget -q -O /dev/null http://127.0.0.1:8080/blob; done",
    )?;
    // Direct I/O in a loop, on a directory of the workspace's disk, paced so that the disk's
    // interrupts do not load the machine for the other programs' numbers.
    let io_dir = tempfile::tempdir_in(std::env::current_dir()?)?;
    let io = Container::run(
        &agent.id,
        &["--network", "none", "-v", &format!("{}:/io", io_dir.path().display())],
        "while :; do dd if=/dev/zero of=/io/blob bs=64k count=64 oflag=direct 2>/dev/null; \
         dd if=/io/blob of=/dev/null bs=64k iflag=direct 2>/dev/null; sleep 0.2; done",
    )?;
    for container in [&switcher, &network, &io] {
        agent.wait_for_kernel(&container.kernel_id, true, Duration::from_secs(15))?;
    }
    wait_until("traffic to start", Duration::from_secs(15), || {
        agent.kernel_value("container_network_transmit_packets_total", &network.kernel_id).ok().flatten().unwrap_or(0.0)
            > 100.0
    })?;

    // Empty programs on the same hooks (and the same container's cgroup), side by side.
    let network_cgroup = CgroupLayout::detect()?.cgroup_of_pid(network.pid()?)?;
    let baseline = BaselinePrograms::load(&network_cgroup.path)?;

    let before = read_stats(&agent, &baseline)?;
    let switches_before = context_switches()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let after = read_stats(&agent, &baseline)?;
    let elapsed = started.elapsed().as_secs_f64();
    let switches = (context_switches()? - switches_before) as f64;

    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    println!("eBPF per-event cost over {elapsed:.1} s, kernel {kernel}, {cpu}, {} CPUs", num_cpus());
    println!();
    println!(
        "| program | events | events/s | ns/event | empty program on the same hook, ns/event | counting's own ns/event | CPU µs per second |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, description, baseline_name) in PROGRAMS {
        let cost = per_event(&before, &after, name)?;
        let floor = per_event(&before, &after, baseline_name)?;
        println!(
            "| {description} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
            cost.events,
            cost.events / elapsed,
            cost.ns_per_event,
            floor.ns_per_event,
            cost.ns_per_event - floor.ns_per_event,
            cost.events / elapsed * cost.ns_per_event / 1000.0
        );
    }
    println!();
    println!("context switches on the node: {switches:.0} ({:.0}/s)", switches / elapsed);
    drop(switcher);
    drop(network);
    drop(io);
    agent.stop()?;
    Ok(())
}

/// Context switches on the node since boot (`ctxt` in /proc/stat).
fn context_switches() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ctxt = stat.lines().find_map(|l| l.strip_prefix("ctxt ")).context("no ctxt in /proc/stat")?;
    Ok(ctxt.trim().parse()?)
}

struct Cost {
    events: f64,
    ns_per_event: f64,
}

fn per_event(
    before: &BTreeMap<String, ProgramStats>,
    after: &BTreeMap<String, ProgramStats>,
    name: &str,
) -> anyhow::Result<Cost> {
    let (Some(b), Some(a)) = (before.get(name), after.get(name)) else { bail!("no statistics for program {name}") };
    let events = a.run_cnt - b.run_cnt;
    if events <= 0.0 {
        bail!("program {name} ran no events during the benchmark");
    }
    Ok(Cost { events, ns_per_event: (a.run_time_ns - b.run_time_ns) / events })
}

/// Run time and count of the agent's programs, from its self-metrics (sampled every
/// interval, so readings are taken right after a fresh sample), and of the baseline's.
fn read_stats(agent: &Agent, baseline: &BaselinePrograms) -> anyhow::Result<BTreeMap<String, ProgramStats>> {
    std::thread::sleep(Duration::from_millis(1100));
    let mut stats: BTreeMap<String, ProgramStats> = BTreeMap::new();
    for program in baseline.stats() {
        stats.insert(
            program.name.to_owned(),
            ProgramStats { run_time_ns: program.run_time_ns as f64, run_cnt: program.run_count as f64 },
        );
    }
    for sample in agent.metrics()? {
        let Some(program) = sample.labels.get("program") else { continue };
        let entry = stats.entry(program.clone()).or_default();
        match sample.name.as_str() {
            "backendai_agent_ebpf_program_run_time_seconds_total" => entry.run_time_ns = sample.value * 1e9,
            "backendai_agent_ebpf_program_runs_total" => entry.run_cnt = sample.value,
            _ => {}
        }
    }
    for (name, _, _) in PROGRAMS {
        if !stats.contains_key(*name) {
            bail!("the agent exports no run statistics for program {name}");
        }
    }
    Ok(stats)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
