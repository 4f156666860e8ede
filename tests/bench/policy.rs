//! `bench-policy`: what the network policy costs a kernel.
//!
//! 1. Per `connect`: inside a python kernel, N `connect`s to an allowed port (a host listener)
//!    and N to a denied one (`EPERM`), with 21 node deny rules in the trie. The kernel's own
//!    accounting (`kernel.bpf_stats_enabled=1`: run time and count) of `policy_connect4` is set
//!    against an empty `connect4` program attached to the kernel's cgroup ([`PolicyBaseline`]).
//!    The other hooks' programs, from the same kernel and statistics: `sendmsg4` and the skb
//!    egress program (UDP datagrams), `getpeername4`, the device program (opening /dev/null)
//!    and the raw-socket guardrail (`socket()`).
//! 2. Allowed TCP throughput: one kernel of an agent without the policy sends the same bytes
//!    over one connection to a sink on the host's docker0 address, in pairs of transfers: one
//!    with every policy program attached to the kernel's own cgroup by the bench (an
//!    [`Enforcer`] with part 1's node policy), one without; the order alternates
//!    (`kernel.bpf_stats_enabled=0`, as in production). Then the programs' share of the CPU
//!    time one transfer uses, from the kernel's own accounting.
//! 3. The egress cap's accuracy: one kernel, its cap set through `set_egress_cap` to each of
//!    several rates, sends to the sink; the rate the sink saw against the cap.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    process::Command,
    sync::mpsc,
};

use agent_common::policy::programs::{
    CONNECT4, DEVICE, GETPEERNAME4, GUARD_OBSERVERS, GUARD_SOCK_CREATE, SENDMSG4, SKB_EGRESS,
};
use anyhow::{Context, bail, ensure};
use bai_agent::{
    config::{MetadataHost, NetworkRule, PolicySection},
    monitor::CgroupLayout,
    policy::{Enforcer, programs::PolicyBaseline},
    rpc::client::RpcClient,
};
use bai_agent_tests::{
    Agent, PYTHON_IMAGE, RedisServer,
    bench::machine_description,
    free_loopback_port,
    kernels::{create, created_id, kernel_config, kernel_toml, runtime},
    require_environment, unique,
};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Pairs of throughput transfers unless the third argument says otherwise.
const PAIRS: usize = 20;
const CHUNK: usize = 1 << 20;
/// The pause before each throughput transfer.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let usage = "usage: bench-policy [CONNECTS] [GIB] [PAIRS]";
    let mut args = std::env::args().skip(1);
    let connects: u64 = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(20_000);
    let gib: f64 = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(2.0);
    let pairs: usize = args.next().map(|s| s.parse()).transpose().context(usage)?.unwrap_or(PAIRS).max(1);
    require_environment();
    if std::fs::read_to_string(BPF_STATS).unwrap_or_default().trim() != "1" {
        bail!("kernel.bpf_stats_enabled is not 1; run through `cargo xtask bench -- policy`, which sets it");
    }
    let host = bai_agent::policy::metadata_host(MetadataHost::Auto).map_err(anyhow::Error::msg)?;
    // The agents' events go to a Redis of the bench's own (`kernel_toml` reads BAI_TEST_REDIS).
    let redis = RedisServer::start(free_loopback_port()?)?;
    // SAFETY: no other thread runs yet that could read the environment.
    unsafe { std::env::set_var("BAI_TEST_REDIS", redis.addr()) };

    println!("## Network policy: cost per connect and allowed throughput\n");
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim().to_owned();
    println!("Machine: nproc {nproc}, kernel {kernel} ({})\n", machine_description()?);
    println!("Command: `cargo xtask bench -- policy {connects} {gib} {pairs}`\n");

    connect_cost(host, connects)?;
    // Per-packet programs pay two clock reads per run while statistics are on: off, as in production.
    let _stats_off = BpfStats::set("0")?;
    throughput(host, (gib * (1u64 << 30) as f64) as u64, pairs)?;
    cap_accuracy(host)?;
    Ok(())
}

/// The node's deny rules of the bench, as (CIDR, ports, name): `bench-denied` for `denied` on
/// the host, and 20 rules no traffic of the bench meets.
fn node_deny_rules(host: Ipv4Addr, denied: u16) -> Vec<(String, Option<String>, Option<&'static str>)> {
    std::iter::once((format!("{host}/32"), Some(denied.to_string()), Some("bench-denied")))
        .chain((0..20).map(|i| (format!("10.{i}.0.0/16"), None, None)))
        .collect()
}

/// Part 1: ns per `connect` of `policy_connect4` and of the empty program, allowed and denied.
fn connect_cost(host: Ipv4Addr, connects: u64) -> anyhow::Result<()> {
    let (_allowed_listener, allowed) = listener(host)?;
    let (_denied_listener, denied) = listener(host)?;
    let dir = tempfile::tempdir()?;
    let deny: Vec<String> = node_deny_rules(host, denied)
        .iter()
        .map(|(cidr, ports, name)| match (ports, name) {
            (Some(ports), Some(name)) => format!("{{ cidr = \"{cidr}\", ports = \"{ports}\", name = \"{name}\" }}"),
            _ => format!("\"{cidr}\""),
        })
        .collect();
    let toml = format!(
        "{}\n[policy]\nmetadata-service-port = 0\ndeny = [{}]\n",
        kernel_toml(dir.path(), 24600),
        deny.join(", ")
    );
    let agent = Agent::start(&toml)?;
    let (kernel, container) = create_python(&agent)?;
    let layout = CgroupLayout::detect()?;
    let cgroup = layout.unified_root.join("bai-kernels").join(&agent.id).join(&kernel);
    let baseline =
        PolicyBaseline::load(&cgroup).with_context(|| format!("attaching the baseline to {}", cgroup.display()))?;

    println!("### Cost per `connect` (policy_connect4 against an empty connect4 program)\n");
    println!("{connects} connects per path from one python kernel; 21 node deny rules.\n");
    println!(
        "| path | outcome | policy_connect4 runs | policy_connect4 ns/call | empty program ns/call | policy's own ns/call | wall µs/connect (Python) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (path, port, outcome) in [("allowed", allowed, "ok"), ("denied (rule `bench-denied`)", denied, "EPERM")] {
        let before = (policy_stats(&agent)?, baseline_stats(&baseline)?);
        let wall_s = connect_loop(&container, host, port, connects, outcome)?;
        let after = (policy_stats(&agent)?, baseline_stats(&baseline)?);
        let (runs, policy_ns) = per_call(before.0, after.0, CONNECT4)?;
        let (_, empty_ns) = per_call(before.1, after.1, "baseline_connect4")?;
        println!(
            "| {path} | {outcome} | {runs} | {policy_ns:.1} | {empty_ns:.1} | {:.1} | {:.2} |",
            policy_ns - empty_ns,
            wall_s / connects as f64 * 1e6
        );
    }
    println!();
    let floor = {
        let before = baseline_stats(&baseline)?;
        connect_loop(&container, host, allowed, connects / 4, "ok")?;
        per_call(before, baseline_stats(&baseline)?, "baseline_connect4")?.1
    };
    other_hooks(&agent, &container, host, allowed, connects, floor)?;
    Ok(())
}

/// The other programs' cost per run, each driven by its own loop in the kernel; `floor` is the
/// empty program's ns per run (what the statistics themselves add to any program).
fn other_hooks(
    agent: &Agent,
    container: &str,
    host: Ipv4Addr,
    port: u16,
    count: u64,
    floor: f64,
) -> anyhow::Result<()> {
    let udp = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range({count}):\n\x20   s.sendto(b'x' * 64, ('{host}', {port}))\nprint('done')"
    );
    let peer = format!(
        "import socket\ns = socket.create_connection(('{host}', {port}))\n\
         for _ in range({count}):\n\x20   s.getpeername()\nprint('done')"
    );
    let device = format!(
        "import os\nfor _ in range({count}):\n\x20   os.close(os.open('/dev/null', os.O_RDONLY))\nprint('done')"
    );
    let sockets = format!(
        "import socket\nfor _ in range({count}):\n\x20   socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()\nprint('done')"
    );
    let bpf = format!(
        "import ctypes\nlibc = ctypes.CDLL(None)\nattr = (ctypes.c_uint32 * 18)(2, 4, 4, 1)\n\
         for _ in range({count}):\n\x20   libc.syscall(321, 0, ctypes.byref(attr), 72)\nprint('done')"
    );
    println!("### Cost per run of the other programs\n");
    println!(
        "{count} calls per workload from the same kernel. For scale: the empty connect4 program measures {floor:.1} ns/run, \
         mostly what the statistics themselves add to a run; a hook's own floor differs a little.\n"
    );
    println!("| program | hook | workload | runs | ns/run |");
    println!("|---|---|---|---:|---:|");
    // (what the kernel does, its Python, the programs it runs: name and hook)
    type Workload<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let workloads: [Workload; 5] = [
        (
            "UDP `sendto` of 64 bytes (one packet each)",
            &udp,
            &[(SENDMSG4, "cgroup/sendmsg4"), (SKB_EGRESS, "cgroup_skb/egress")],
        ),
        ("`getpeername` on a connected socket", &peer, &[(GETPEERNAME4, "cgroup/getpeername4")]),
        ("`open` of /dev/null", &device, &[(DEVICE, "cgroup/dev")]),
        (
            "`socket(AF_INET, SOCK_DGRAM)`",
            &sockets,
            &[
                (GUARD_SOCK_CREATE, "cgroup/sock_create"),
                // Where BPF LSM cannot run: the packet-socket guardrail's observers.
                (GUARD_OBSERVERS[0].0, "tracepoint/syscalls/sys_enter_socket"),
                (GUARD_OBSERVERS[1].0, "tracepoint/syscalls/sys_exit_socket"),
            ],
        ),
        (
            "`bpf(BPF_MAP_CREATE)` (refused by Docker's seccomp profile)",
            &bpf,
            &[(GUARD_OBSERVERS[2].0, "tracepoint/syscalls/sys_exit_bpf")],
        ),
    ];
    for (workload, code, programs) in workloads {
        // The observers run only where BPF LSM cannot: a program the agent does not report is not there.
        let present: Vec<_> = programs.iter().filter(|(program, _)| program_stats(agent, program).is_ok()).collect();
        if present.is_empty() {
            continue;
        }
        let before = present.iter().map(|(program, _)| program_stats(agent, program)).collect::<Result<Vec<_>, _>>()?;
        python_in(container, code)?;
        for ((program, hook), before) in present.iter().zip(before) {
            let (runs, ns) = per_call(before, program_stats(agent, program)?, program)?;
            println!("| {program} | {hook} | {workload} | {runs} | {ns:.1} |");
        }
    }
    println!();
    Ok(())
}

/// Part 2: allowed TCP throughput of one kernel with the policy programs on its cgroup and
/// without them, in pairs of transfers (the order alternating), so that nothing but the
/// programs differs: the same container, cgroup, socket path and sink. Each transfer's CPU time
/// (every task on the host, steal excluded) is counted too: on this CPU-bound path it is what
/// the programs can cost, and it varies far less than a virtual machine's wall-clock rate.
fn throughput(host: Ipv4Addr, bytes: u64, pairs: usize) -> anyhow::Result<()> {
    let (sink, received) = sink(host)?;
    let port = sink.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    // The kernel's agent attaches no policy: the bench attaches it to the kernel itself.
    let agent = Agent::start(&format!("{}\n[policy]\nenabled = false\n", kernel_toml(dir.path(), 24650)))?;
    let (_, container) = create_python(&agent)?;
    // Part 1's rules, `bench-denied` on a port of the host no transfer uses.
    let policy = KernelPolicy::of(&container, host, 1)?;
    let transfer = || send(&container, host, port, bytes, &received);
    // Warm-up: one short transfer each way, not reported.
    send(&container, host, port, 64 * CHUNK as u64, &received)?;
    {
        let _on = policy.attach()?;
        send(&container, host, port, 64 * CHUNK as u64, &received)?;
    }
    let mut with = Vec::with_capacity(pairs);
    let mut without = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        let policy_first = pair % 2 == 0;
        for on in [policy_first, !policy_first] {
            // Loading, attaching and freeing programs leave work behind (RCU grace periods,
            // deferred frees): every transfer starts after the same pause.
            if on {
                let _on = policy.attach()?;
                std::thread::sleep(SETTLE);
                with.push(transfer()?);
            } else {
                std::thread::sleep(SETTLE);
                without.push(transfer()?);
            }
        }
    }
    println!("### Allowed TCP throughput, with the policy programs and without, on the same kernel\n");
    println!(
        "One python kernel (cpu 1, mem 512 MiB) sends {:.2} GiB over one TCP connection to a sink on the host's \
         docker0 address, in 1 MiB `sendall`s; {pairs} pairs of transfers, one with the policy's programs attached \
         to the kernel's cgroup (all of them, the node policy of part 1 in their maps: 21 deny rules, metadata \
         redirect) and one without, the order alternating, each after a {} s pause; kernel.bpf_stats_enabled=0. \
         CPU time: the sending thread's, per GiB (where the skb programs run).\n",
        bytes as f64 / (1u64 << 30) as f64,
        SETTLE.as_secs_f64(),
    );
    println!("| kernel | min | median | max |");
    println!("|---|---:|---:|---:|");
    let gbit = |t: &[Transfer]| t.iter().map(|t| t.gbit).collect::<Vec<_>>();
    let cpu_per_gib = |t: &[Transfer]| t.iter().map(|t| t.cpu_s_per_gib).collect::<Vec<_>>();
    for (measure, of) in [("Gbit/s", &gbit as &dyn Fn(&[Transfer]) -> Vec<f64>), ("CPU s/GiB", &cpu_per_gib)] {
        for (name, transfers) in [("with the policy programs", &with), ("without", &without)] {
            let sorted = sorted(&of(transfers));
            println!(
                "| {name}, {measure} | {:.3} | {:.3} | {:.3} |",
                sorted[0],
                median(&sorted),
                sorted[sorted.len() - 1]
            );
        }
    }
    println!();
    for (measure, of) in [("Throughput", &gbit as &dyn Fn(&[Transfer]) -> Vec<f64>), ("CPU time per GiB", &cpu_per_gib)]
    {
        let ratios: Vec<f64> = of(&with).iter().zip(of(&without)).map(|(w, wo)| (w / wo - 1.0) * 100.0).collect();
        let (mean, half_width) = mean_and_ci95(&ratios);
        println!(
            "{measure}, with against without, pair by pair: median {:+.2} %, mean {mean:+.2} % (95 % confidence \
             interval {:+.2} % to {:+.2} %).\n",
            median(&sorted(&ratios)),
            mean - half_width,
            mean + half_width
        );
    }
    cpu_share(&policy, &container, host, port, bytes, &received)
}

/// One transfer's rate and the host's CPU time per GiB it took.
struct Transfer {
    gbit: f64,
    cpu_s_per_gib: f64,
}

/// What the policy programs take of the CPU time a transfer uses: their run time (the kernel's
/// own accounting, statistics on for this one transfer) against the sending thread's CPU time.
/// On a CPU-bound path this bounds how much throughput the programs can cost.
fn cpu_share(
    policy: &KernelPolicy,
    container: &str,
    host: Ipv4Addr,
    port: u16,
    bytes: u64,
    received: &mpsc::Receiver<u64>,
) -> anyhow::Result<()> {
    let enforcer = policy.attach()?;
    std::thread::sleep(SETTLE);
    let _stats_on = BpfStats::set("1")?;
    let programs_before: u64 = enforcer.program_stats().iter().map(|s| s.run_time_ns).sum();
    let runs_before = skb_runs(&enforcer);
    let transfer = send(container, host, port, bytes, received)?;
    let programs: u64 = enforcer.program_stats().iter().map(|s| s.run_time_ns).sum::<u64>() - programs_before;
    let runs = skb_runs(&enforcer) - runs_before;
    ensure!(runs > 0, "the transfer met no skb program");
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let sender_ns = transfer.cpu_s_per_gib * gib * 1e9;
    println!(
        "CPU share, one more transfer with the programs and kernel.bpf_stats_enabled=1 ({:.2} Gbit/s): the \
         policy programs ran {:.1} µs in all ({runs} runs of {SKB_EGRESS}, {:.1} ns each, {:.0} per GiB), against \
         {:.1} ms of the sending thread's CPU time: **{:.3} %** of it. Statistics add two clock reads to every \
         run, so this is an upper bound.\n",
        transfer.gbit,
        programs as f64 / 1e3,
        programs as f64 / runs as f64,
        runs as f64 / gib,
        sender_ns / 1e6,
        programs as f64 / sender_ns * 100.0
    );
    Ok(())
}

fn skb_runs(enforcer: &Enforcer) -> u64 {
    enforcer.program_stats().iter().filter(|s| s.name == SKB_EGRESS).map(|s| s.run_count).sum()
}

/// The agent's policy, attachable to one kernel's own cgroup: the same programs and node policy
/// an agent attaches at its kernels' parent, held by the bench while a transfer runs.
struct KernelPolicy {
    section: PolicySection,
    unified_root: std::path::PathBuf,
    /// The kernel's cgroup, as the last component of `{cgroup-parent}/{agent-id}`.
    leaf: String,
    redirect: SocketAddrV4,
}

impl KernelPolicy {
    fn of(container: &str, host: Ipv4Addr, denied: u16) -> anyhow::Result<Self> {
        let out = Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", container]).output()?;
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().context("the kernel's pid")?;
        let layout = CgroupLayout::detect()?;
        let cgroup = layout.cgroup_of_pid(pid)?.path;
        let relative = cgroup.strip_prefix(&layout.unified_root).context("the kernel's cgroup")?.to_string_lossy();
        let (parent, leaf) = relative.rsplit_once('/').context("the kernel's cgroup has no parent")?;
        let deny = node_deny_rules(host, denied)
            .iter()
            .map(|(cidr, ports, name)| NetworkRule::parse(cidr, ports.as_deref(), None, *name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let section = PolicySection { cgroup_parent: format!("/{parent}"), deny, ..PolicySection::default() };
        Ok(Self {
            section,
            unified_root: layout.unified_root,
            leaf: leaf.to_owned(),
            redirect: SocketAddrV4::new(host, 40128),
        })
    }

    /// Attaches every policy program to the kernel's cgroup, until the value is dropped.
    fn attach(&self) -> anyhow::Result<Enforcer> {
        Enforcer::start(&self.section, &self.leaf, &self.unified_root, Vec::new(), None, self.redirect)
            .context("attaching the policy to the kernel's cgroup")
    }
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

/// The mean and the half-width of its 95 % confidence interval (Student's t).
fn mean_and_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::INFINITY);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // t(0.975) for 1..=30 degrees of freedom; about 1.96 beyond.
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (variance / n as f64).sqrt())
}

/// Part 3: the rate a capped kernel sends at, against its cap, for several caps.
fn cap_accuracy(host: Ipv4Addr) -> anyhow::Result<()> {
    const SECONDS: f64 = 4.0;
    let (sink, received) = sink(host)?;
    let port = sink.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(&format!("{}\n[policy]\nmetadata-service-port = 0\n", kernel_toml(dir.path(), 24600)))?;
    let (kernel, container) = create_python(&agent)?;
    let shaper = if agent.log_text().contains("no fq qdisc") { "tbf (this kernel has no fq)" } else { "edt" };
    println!(
        "### Egress cap accuracy
"
    );
    println!(
        "One TCP connection from a capped kernel to the host's docker0 address, {SECONDS} s of data at the cap per round; \
         shaper: {shaper}. The cap counts whole frames: TCP payload at 1500-byte frames is at most 1448/1514 = 95.6 % of it.\n"
    );
    println!("| cap Mbit/s | payload Mbit/s | payload / cap | payload / (cap × 0.956) |");
    println!("|---:|---:|---:|---:|");
    for cap in [20_000_000u64, 100_000_000, 400_000_000] {
        runtime().block_on(async {
            let client = RpcClient::connect(&agent.rpc_addr).await?;
            client
                .call("set_egress_cap", vec![kernel.as_str().into(), cap.into()], vec![])
                .await
                .map_err(|err| anyhow::anyhow!("set_egress_cap: {err:?}"))
        })?;
        let bytes = ((cap as f64 / 8.0 * SECONDS) as u64 / CHUNK as u64).max(1) * CHUNK as u64;
        let gbit = send(&container, host, port, bytes, &received)?.gbit;
        let mbit = gbit * 1000.0;
        let capped = cap as f64 / 1e6;
        println!("| {capped:.0} | {mbit:.2} | {:.3} | {:.3} |", mbit / capped, mbit / (capped * 1448.0 / 1514.0));
    }
    println!();
    Ok(())
}

/// Creates a python kernel (cpu 1, 512 MiB) through the agent's RPC: its id and container.
fn create_python(agent: &Agent) -> anyhow::Result<(String, String)> {
    let kernel = unique("kernel");
    let created = runtime().block_on(async {
        let client = RpcClient::connect(&agent.rpc_addr).await?;
        create(&client, "s-bench-policy", &kernel, kernel_config(PYTHON_IMAGE, "1", "536870912"))
            .await
            .map_err(anyhow::Error::msg)
    })?;
    let container = created_id(&created, "container_id");
    ensure!(!container.is_empty(), "create_kernels gave no container: {created}");
    Ok((kernel, container))
}

/// A listener on the host's bridge address that accepts (and drops) every connection.
fn listener(host: Ipv4Addr) -> anyhow::Result<(TcpListener, u16)> {
    let listener = TcpListener::bind((host, 0)).context("bind on docker0")?;
    let port = listener.local_addr()?.port();
    let accepting = listener.try_clone()?;
    std::thread::spawn(move || for _ in accepting.incoming() {});
    Ok((listener, port))
}

/// A listener that reads each connection to its end (1 MiB at a time) and reports its bytes.
fn sink(host: Ipv4Addr) -> anyhow::Result<(TcpListener, mpsc::Receiver<u64>)> {
    let listener = TcpListener::bind((host, 0)).context("bind on docker0")?;
    let accepting = listener.try_clone()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; CHUNK];
        for mut stream in accepting.incoming().flatten() {
            let mut total = 0u64;
            while let Ok(n @ 1..) = stream.read(&mut buffer) {
                total += n as u64;
            }
            let _ = tx.send(total);
        }
    });
    Ok((listener, rx))
}

/// Runs Python in the kernel's container (inside its cgroup, as its own processes run).
fn python_in(container: &str, code: &str) -> anyhow::Result<String> {
    let out = Command::new("docker").args(["exec", container, "python3", "-c", code]).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "python in {container} failed: {text}");
    Ok(text.trim().to_owned())
}

/// `count` connect+close (RST, so no TIME_WAIT piles up) to `host:port`, all of which must end
/// in `outcome`; the wall seconds of the loop as Python saw them.
fn connect_loop(container: &str, host: Ipv4Addr, port: u16, count: u64, outcome: &str) -> anyhow::Result<f64> {
    let code = format!(
        "import socket, struct, errno, time\n\
         linger = struct.pack('ii', 1, 0)\n\
         outcomes = {{}}\n\
         start = time.perf_counter()\n\
         for _ in range({count}):\n\
         \x20   s = socket.socket()\n\
         \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)\n\
         \x20   try:\n\
         \x20       s.connect(('{host}', {port})); r = 'ok'\n\
         \x20   except OSError as e:\n\
         \x20       r = errno.errorcode.get(e.errno, str(e))\n\
         \x20   s.close()\n\
         \x20   outcomes[r] = outcomes.get(r, 0) + 1\n\
         print(time.perf_counter() - start, *(f'{{k}}={{v}}' for k, v in outcomes.items()))\n"
    );
    let out = python_in(container, &code)?;
    let mut fields = out.split_whitespace();
    let seconds: f64 = fields.next().and_then(|s| s.parse().ok()).with_context(|| format!("connect loop: {out}"))?;
    let expected = format!("{outcome}={count}");
    ensure!(fields.eq([expected.as_str()]), "every connect to port {port} should give {outcome}: {out}");
    Ok(seconds)
}

/// Sends `bytes` from the kernel to the sink over one connection: the rate as Python timed it
/// (from the first `sendall` until the sink closed after reading everything) and the sending
/// thread's CPU time over the same span (`CLOCK_THREAD_CPUTIME_ID`: the kernel's exact run time
/// of the thread, which includes the stack's work done in its context and the skb programs).
fn send(
    container: &str,
    host: Ipv4Addr,
    port: u16,
    bytes: u64,
    received: &mpsc::Receiver<u64>,
) -> anyhow::Result<Transfer> {
    let chunks = bytes / CHUNK as u64;
    let code = format!(
        "import socket, time\n\
         chunk = memoryview(bytearray({CHUNK}))\n\
         s = socket.create_connection(('{host}', {port}))\n\
         start, cpu = time.perf_counter(), time.thread_time_ns()\n\
         for _ in range({chunks}):\n\
         \x20   s.sendall(chunk)\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n\
         print(time.perf_counter() - start, time.thread_time_ns() - cpu)\n"
    );
    let out = python_in(container, &code)?;
    let (seconds, cpu_ns) = out
        .split_once(' ')
        .and_then(|(seconds, cpu)| Some((seconds.parse::<f64>().ok()?, cpu.parse::<f64>().ok()?)))
        .with_context(|| format!("transfer: {out}"))?;
    let got = received.recv()?;
    ensure!(got == chunks * CHUNK as u64, "the sink read {got} bytes of {}", chunks * CHUNK as u64);
    let gib = got as f64 / (1u64 << 30) as f64;
    Ok(Transfer { gbit: got as f64 * 8.0 / seconds / 1e9, cpu_s_per_gib: cpu_ns / 1e9 / gib })
}

/// Run time (ns) and count of one program.
type Stats = (f64, f64);

/// `policy_connect4`'s statistics as the agent exports them.
fn policy_stats(agent: &Agent) -> anyhow::Result<Stats> {
    program_stats(agent, CONNECT4)
}

/// A policy program's statistics as the agent exports them.
fn program_stats(agent: &Agent, program: &str) -> anyhow::Result<Stats> {
    let (mut time_ns, mut runs) = (None, None);
    for sample in agent.metrics()? {
        if sample.labels.get("program").map(String::as_str) != Some(program) {
            continue;
        }
        match sample.name.as_str() {
            "backendai_agent_policy_program_run_time_seconds_total" => time_ns = Some(sample.value * 1e9),
            "backendai_agent_policy_program_runs_total" => runs = Some(sample.value),
            _ => {}
        }
    }
    Ok((
        time_ns.with_context(|| format!("no {program} run time in /metrics"))?,
        runs.with_context(|| format!("no {program} runs in /metrics"))?,
    ))
}

fn baseline_stats(baseline: &PolicyBaseline) -> anyhow::Result<Stats> {
    let stats = baseline.stats()?;
    Ok((stats.run_time_ns as f64, stats.run_count as f64))
}

/// Runs and ns per run between two readings.
fn per_call(before: Stats, after: Stats, name: &str) -> anyhow::Result<(f64, f64)> {
    let runs = after.1 - before.1;
    ensure!(runs > 0.0, "program {name} did not run");
    Ok((runs, (after.0 - before.0) / runs))
}

/// Sets `kernel.bpf_stats_enabled`, and puts back what it was when dropped.
struct BpfStats(String);

impl BpfStats {
    fn set(value: &str) -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)?.trim().to_owned();
        std::fs::write(BPF_STATS, value)?;
        Ok(Self(previous))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}
