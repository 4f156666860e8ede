//! `cargo xtask`: the developer entry point of bai-agent (setup, eBPF build, run, test, bench, dist).

mod backendai;
mod cmd;
mod dist;
mod docker;
mod krunner;
mod services;
mod setup;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::cmd::step;
pub use crate::krunner::KRUNNER_INSTALL_PATH;

const EBPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for bai-agent: machine setup, eBPF build, run, test, bench, dist",
    long_about = "Developer tasks for bai-agent.\n\n\
        `cargo xtask setup` makes a fresh machine (Debian, root) ready; `run`, `test` and `bench` \
        run it first, so on a new machine `cargo xtask test` is all it takes."
)]
struct Cli {
    /// Where bpf-linker is installed (`bin/`, and `lib/` with the nightly's LLVM); the binary
    /// keeps an rpath to `<root>/lib`, so pick a directory that persists.
    #[arg(
        long,
        global = true,
        env = "BAI_BPF_LINKER_ROOT",
        default_value = "/opt/bai-agent/bpf-linker",
        value_name = "DIR"
    )]
    bpf_linker_root: PathBuf,

    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Prepare this machine (idempotent, needs root): Debian packages, nightly Rust with
    /// rust-src, bpf-linker, tracefs, the static kernel runner (built for
    /// x86_64-unknown-linux-musl, installed at /opt/bai-agent/bin/bai-krunner), a running
    /// dockerd and the test images (rebuilt when their inputs under config/images/ change).
    ///
    /// Each step checks first and says `already present` when there is nothing to do. dockerd,
    /// when setup has to start it, keeps running afterwards (log: target/xtask/dockerd.log).
    Setup,

    /// Build the eBPF programs alone (nightly, bpfel-unknown-none) and print the object's path.
    ///
    /// `cargo build` of the agent does this by itself through agent/build.rs; this is for working
    /// on the eBPF code. Needs the nightly toolchain and bpf-linker (`cargo xtask setup`).
    BuildEbpf,

    /// Set up, build the agent (release) and run it in the foreground with
    /// config/agent.dev.toml; exits with the agent's exit code.
    ///
    /// Ctrl-C goes to the agent; xtask waits for it to stop.
    Run {
        /// Extra arguments for bai-agent, after `--` (e.g. `cargo xtask run -- --help`).
        #[arg(last = true, value_name = "AGENT_ARGS")]
        args: Vec<String>,
    },

    /// Set up, start the test services, build the whole workspace and run its tests.
    ///
    /// Tests get BAI_AGENT_BIN (the debug agent binary), BPF_LINKER_DIR, BAI_TEST_REDIS (a
    /// private redis-server on 127.0.0.1, stopped at the end; log: target/xtask/redis.log) and
    /// BAI_TEST_ETCD (a private etcd on 127.0.0.1, data wiped at each start, stopped at the end;
    /// log: target/xtask/etcd.log) in their environment.
    Test {
        /// Extra arguments for the test binaries, after `--` (passed as
        /// `cargo test --workspace -- <ARGS>`, e.g. `cargo xtask test -- --nocapture cpu`).
        #[arg(last = true, value_name = "TEST_ARGS")]
        args: Vec<String>,
    },

    /// Like `test`, but only the end-to-end tests against a real Backend.AI 26.9 manager
    /// (`tests/backendai_e2e.rs`: PostgreSQL, etcd, Redis and the manager from PyPI, sessions
    /// through the `backend.ai` CLI).
    E2e {
        /// Extra arguments for the test binary, after `--`.
        #[arg(last = true, value_name = "TEST_ARGS")]
        args: Vec<String>,
    },

    /// Set up, build (release) and run the benchmarks of the tests package: `bench-ebpf` (with
    /// kernel.bpf_stats_enabled=1, restored afterwards), `bench-lifecycle`, `bench-exec`, then
    /// `bench-accounting` (with kernel.bpf_stats_enabled=1 too), then `bench-policy` (the network
    /// policy's cost per `connect`, with kernel.bpf_stats_enabled=1 too, and on one kernel's TCP
    /// throughput and CPU time with the programs and without, which it measures with the setting
    /// off), then `bench-usage`, then `bench-gpu` (per-kernel
    /// GPU accounting per sample: processes read and mapped to kernels), then `bench-cpu` (CPU time per
    /// shape of work against the kernel's accounting), then `bench-backendai` (bai-agent against
    /// the Python agent 26.9.6 on a real manager).
    ///
    /// After `--`, `ebpf`, `lifecycle`, `exec`, `accounting`, `policy`, `usage`, `gpu`, `cpu` or
    /// `backendai` runs that one alone with the arguments that follow it (`cargo xtask bench --
    /// ebpf 20`, `cargo xtask bench -- lifecycle 30 5000`, `cargo xtask bench -- exec 1000 256`,
    /// `cargo xtask bench -- accounting 100 30 2`, `cargo xtask bench -- policy 20000 1 40`, `cargo
    /// xtask bench -- gpu 100 10 200`, `cargo
    /// xtask bench -- cpu /path/to/an/earlier/bai-agent`, `cargo xtask bench -- backendai 10`);
    /// without a name all run, and any arguments go to bench-ebpf (`cargo xtask bench -- 20`).
    Bench {
        /// `[ebpf|lifecycle|exec|accounting|policy|usage|gpu|cpu|backendai] [ARGS…]`, after `--`.
        #[arg(last = true, value_name = "BENCH_ARGS")]
        args: Vec<String>,
    },

    /// Build the operator's packages under target/dist/: `bai-agent-{version}-{arch}.tar.gz`
    /// and `bai-agent_{version}_{debarch}.deb` (dpkg-deb), with the binaries (debug info
    /// stripped), the static bai-krunner, /etc/backend.ai/agent.toml (the annotated sample), the
    /// systemd units (config/systemd/), sysctl and limits files and the Prometheus rules.
    ///
    /// Needs what `cargo xtask setup` installs (it does not run it): the nightly toolchain and
    /// bpf-linker for the agent's eBPF, the musl target for the runner. See docs/DEPLOYMENT.md.
    Dist {
        /// Cargo profile of bai-agent, bai-agentctl and bai-watcher: `release`, or `dev` for a
        /// quick package to test (bai-krunner is always release).
        #[arg(long, default_value = "release", value_name = "PROFILE")]
        profile: String,
        /// Where the packages go (default: target/dist).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// Where things are.
pub struct Ctx {
    /// The workspace root (parent of xtask/).
    pub workspace: PathBuf,
    pub bpf_linker_root: PathBuf,
}

impl Ctx {
    fn new(bpf_linker_root: PathBuf) -> Result<Self> {
        let workspace =
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("xtask/ has no parent directory")?.to_path_buf();
        Ok(Self { workspace, bpf_linker_root })
    }

    /// Cargo's target directory of the workspace (honours CARGO_TARGET_DIR).
    pub fn target_dir(&self) -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => self.workspace.join(dir),
            _ => self.workspace.join("target"),
        }
    }

    /// Logs and scratch files of xtask: `target/xtask/`.
    pub fn xtask_dir(&self) -> PathBuf {
        self.target_dir().join("xtask")
    }

    /// What build.rs of the agent reads as BPF_LINKER_DIR.
    pub fn bpf_linker_bin(&self) -> PathBuf {
        self.bpf_linker_root.join("bin")
    }

    /// `cargo <args>` in the workspace root, with BPF_LINKER_DIR for the agent's build.rs.
    fn cargo(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(args).current_dir(&self.workspace).env("BPF_LINKER_DIR", self.bpf_linker_bin());
        cmd
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = Ctx::new(cli.bpf_linker_root).and_then(|ctx| match cli.task {
        Task::Setup => setup::setup(&ctx).map(|()| ExitCode::SUCCESS),
        Task::BuildEbpf => build_ebpf(&ctx).map(|()| ExitCode::SUCCESS),
        Task::Run { args } => run(&ctx, &args),
        Task::Test { args } => test(&ctx, &["--workspace"], &args).map(|()| ExitCode::SUCCESS),
        Task::E2e { args } => {
            test(&ctx, &["-p", "bai-agent-tests", "--test", "backendai_e2e"], &args).map(|()| ExitCode::SUCCESS)
        }
        Task::Bench { args } => bench(&ctx, &args),
        Task::Dist { profile, out_dir } => {
            dist::dist(&ctx, &dist::DistOptions { profile, out_dir }).map(|()| ExitCode::SUCCESS)
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Builds the eBPF object through the agent's build script (`agent/build.rs`), the one
/// place that knows how, and prints where the object is.
fn build_ebpf(ctx: &Ctx) -> Result<()> {
    step("build-ebpf", &format!("eBPF programs for {EBPF_TARGET} (through agent/build.rs)"));
    let linker = ctx.bpf_linker_bin().join("bpf-linker");
    if !linker.exists() {
        bail!("{} is missing; run `cargo xtask setup` (or set BAI_BPF_LINKER_ROOT)", linker.display());
    }
    cmd::run(&mut ctx.cargo(&["build", "--release", "-p", "bai-agent", "--lib"]))
        .context("building the eBPF programs failed; they need the nightly toolchain with rust-src and bpf-linker (`cargo xtask setup`)")?;
    let build_dir = ctx.target_dir().join("release/build");
    let newest = fs::read_dir(&build_dir)
        .with_context(|| format!("reading {}", build_dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("bai-agent-"))
        .map(|entry| entry.path().join("out/agent-ebpf.o"))
        .filter(|object| object.is_file())
        .max_by_key(|object| fs::metadata(object).and_then(|m| m.modified()).ok());
    match newest {
        Some(object) => {
            println!("{}", object.display());
            Ok(())
        }
        None => bail!("the build succeeded but no agent-ebpf.o is under {}", build_dir.display()),
    }
}

fn run(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    setup::setup(ctx)?;
    step("build", "bai-agent (release)");
    cmd::run(&mut ctx.cargo(&["build", "--release", "-p", "bai-agent"])).context("building bai-agent failed")?;
    let config = ctx.workspace.join("config/agent.dev.toml");
    if !config.is_file() {
        bail!("{} is missing: it is the development config that `cargo xtask run` gives the agent", config.display());
    }
    let agent = ctx.target_dir().join("release/bai-agent");
    step("run", &format!("{} (Ctrl-C stops it)", agent.display()));
    let status = cmd::status(Command::new(&agent).arg("--config").arg(&config).args(args).current_dir(&ctx.workspace))?;
    if !status.success() {
        eprintln!("xtask: bai-agent ended: {}", cmd::describe(status));
    }
    Ok(ExitCode::from(cmd::exit_code(status)))
}

/// Sets up, starts the test services, builds, and runs `cargo test <selection> -- <args>`.
fn test(ctx: &Ctx, selection: &[&str], args: &[String]) -> Result<()> {
    setup::setup(ctx).context("test: step `setup` failed")?;
    step("services", "test services");
    // Test services that are not system-wide start here as `services::Service`s and stop (by
    // PID) when they go out of scope at the end of this function, whichever way it ends.
    let (_redis, redis_addr) =
        services::start_test_redis(&ctx.xtask_dir()).context("test: starting the tests' redis-server failed")?;
    let (_etcd, etcd_addr) =
        services::start_test_etcd(&ctx.xtask_dir()).context("test: starting the tests' etcd failed")?;
    let agent_bin = ctx.target_dir().join("debug/bai-agent");
    step("build", "the workspace, all targets");
    cmd::run(ctx.cargo(&["build", "--workspace", "--all-targets"]).env("BAI_AGENT_BIN", &agent_bin))
        .context("test: step `build` failed")?;
    step("test", &format!("cargo test {}", selection.join(" ")));
    let mut test = ctx.cargo(&[&["test"], selection].concat());
    if !args.is_empty() {
        test.arg("--").args(args);
    }
    cmd::run(
        test.env("BAI_AGENT_BIN", &agent_bin)
            .env("BAI_TEST_REDIS", &redis_addr)
            .env("BAI_TEST_ETCD", &etcd_addr)
            .env("BAI_TEST_BACKENDAI_PYTHON", backendai::backendai_python())
            .env("BAI_TEST_BACKENDAI_INSTALL", backendai::BACKENDAI_INSTALL),
    )
    .context("test: step `test` failed")?;
    println!("tests passed");
    Ok(())
}

const BPF_STATS_SYSCTL: &str = "kernel.bpf_stats_enabled";

/// Sets `kernel.bpf_stats_enabled` and puts the old value back when dropped.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let previous = fs::read_to_string(path).with_context(|| format!("reading {path}"))?.trim().to_owned();
        cmd::run(Command::new("sysctl").args(["-w", &format!("{BPF_STATS_SYSCTL}=1")]))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let setting = format!("{BPF_STATS_SYSCTL}={}", self.previous);
        if let Err(err) = cmd::run(Command::new("sysctl").args(["-w", &setting])) {
            eprintln!("xtask: could not restore {setting}: {err:#}");
        }
    }
}

/// The benchmarks, in the order `cargo xtask bench` runs them.
const BENCHES: [&str; 9] = ["ebpf", "lifecycle", "exec", "accounting", "policy", "usage", "gpu", "cpu", "backendai"];
/// The benchmarks that read the kernel's per-program statistics (they cost every eBPF
/// program two clock reads per run, so the others run without them).
const BENCHES_WITH_BPF_STATS: [&str; 3] = ["ebpf", "accounting", "policy"];

/// Which benchmarks run, each with its arguments: a leading name picks one, otherwise all
/// run and the arguments go to the first (bench-ebpf).
fn bench_plan(args: &[String]) -> Vec<(&'static str, Vec<String>)> {
    match args.split_first() {
        Some((name, rest)) if BENCHES.contains(&name.as_str()) => {
            BENCHES.iter().filter(|b| **b == name).map(|b| (*b, rest.to_vec())).collect()
        }
        _ => BENCHES.iter().enumerate().map(|(i, b)| (*b, if i == 0 { args.to_vec() } else { Vec::new() })).collect(),
    }
}

fn bench(ctx: &Ctx, args: &[String]) -> Result<ExitCode> {
    let plan = bench_plan(args);
    setup::setup(ctx)?;
    let bins: Vec<String> = plan.iter().map(|(name, _)| format!("bench-{name}")).collect();
    step("build", &format!("bai-agent and {} (release)", bins.join(", ")));
    let mut build =
        ctx.cargo(&["build", "--release", "-p", "bai-agent", "-p", "bai-agent-tests", "--bin", "bai-agent"]);
    for bin in &bins {
        build.args(["--bin", bin]);
    }
    cmd::run(&mut build).with_context(|| format!("building {} failed", bins.join(", ")))?;
    let agent = ctx.target_dir().join("release/bai-agent");
    let mut failed: Option<u8> = None;
    for ((name, args), bin) in plan.iter().zip(&bins) {
        let bench = ctx.target_dir().join("release").join(bin);
        if !bench.is_file() {
            bail!("{} is missing after its build", bench.display());
        }
        let stats = if BENCHES_WITH_BPF_STATS.contains(name) {
            step("bench", &format!("{} with {BPF_STATS_SYSCTL}=1", bench.display()));
            Some(BpfStats::enable()?)
        } else {
            step("bench", &bench.display().to_string());
            None
        };
        let status = cmd::status(
            Command::new(&bench)
                .args(args)
                .env("BAI_AGENT_BIN", &agent)
                // bench-backendai: the manager's venv (with the Python agent) and its templates.
                .env("BAI_TEST_BACKENDAI_PYTHON", backendai::backendai_python())
                .env("BAI_TEST_BACKENDAI_INSTALL", backendai::BACKENDAI_INSTALL)
                .current_dir(&ctx.workspace),
        )?;
        drop(stats);
        if !status.success() {
            eprintln!("xtask: {bin} ended: {}", cmd::describe(status));
            failed.get_or_insert(cmd::exit_code(status));
        }
    }
    Ok(failed.map_or(ExitCode::SUCCESS, ExitCode::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn extra_args_follow_the_double_dash() -> Result<()> {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "--nocapture", "cpu"])?;
        match cli.task {
            Task::Test { args } => assert_eq!(args, ["--nocapture", "cpu"]),
            _ => bail!("parsed as another task"),
        }
        let cli = Cli::try_parse_from(["xtask", "run"])?;
        match cli.task {
            Task::Run { args } => assert!(args.is_empty()),
            _ => bail!("parsed as another task"),
        }
        Ok(())
    }

    #[test]
    fn bench_runs_all_or_the_one_named() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            bench_plan(&[]),
            [
                ("ebpf", args(&[])),
                ("lifecycle", args(&[])),
                ("exec", args(&[])),
                ("accounting", args(&[])),
                ("policy", args(&[])),
                ("usage", args(&[])),
                ("gpu", args(&[])),
                ("cpu", args(&[])),
                ("backendai", args(&[]))
            ]
        );
        assert_eq!(
            bench_plan(&args(&["20"])),
            [
                ("ebpf", args(&["20"])),
                ("lifecycle", args(&[])),
                ("exec", args(&[])),
                ("accounting", args(&[])),
                ("policy", args(&[])),
                ("usage", args(&[])),
                ("gpu", args(&[])),
                ("cpu", args(&[])),
                ("backendai", args(&[]))
            ]
        );
        assert_eq!(bench_plan(&args(&["usage", "1000"])), [("usage", args(&["1000"]))]);
        assert_eq!(bench_plan(&args(&["accounting", "100", "30"])), [("accounting", args(&["100", "30"]))]);
        assert_eq!(bench_plan(&args(&["exec", "100"])), [("exec", args(&["100"]))]);
        assert_eq!(bench_plan(&args(&["policy", "20000", "2"])), [("policy", args(&["20000", "2"]))]);
        assert_eq!(bench_plan(&args(&["ebpf", "20"])), [("ebpf", args(&["20"]))]);
        assert_eq!(bench_plan(&args(&["lifecycle"])), [("lifecycle", args(&[]))]);
        assert_eq!(bench_plan(&args(&["cpu", "/old/bai-agent"])), [("cpu", args(&["/old/bai-agent"]))]);
        assert_eq!(bench_plan(&args(&["backendai", "10"])), [("backendai", args(&["10"]))]);
        assert_eq!(bench_plan(&args(&["gpu", "8", "2"])), [("gpu", args(&["8", "2"]))]);
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() -> Result<()> {
        let ctx = Ctx::new("/opt/bai-agent/bpf-linker".into())?;
        let manifest = fs::read_to_string(ctx.workspace.join("Cargo.toml"))?;
        assert!(manifest.contains("[workspace]"));
        Ok(())
    }
}
