//! `bench-cpu`: the agent's CPU time against the kernel's own per-cgroup accounting for every
//! shape of work of `bai_agent_tests::cpu` (forks, short processes and threads, busy threads,
//! a quota, a shared core, nested cgroups), at the production sampling interval (1 s); with a
//! second agent binary (an earlier build), both side by side in one run, shape by shape.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use bai_agent_tests::{
    Agent, agent_binary,
    cpu::{self, Comparison, SHAPES},
    require_environment,
};

const INTERVAL: Duration = Duration::from_secs(1);
const CONFIG: &str = "[monitor]\ninterval = \"1s\"\n";

fn main() -> anyhow::Result<()> {
    let baseline: Option<PathBuf> = std::env::args().nth(1).map(PathBuf::from);
    require_environment();
    if let Some(path) = &baseline {
        anyhow::ensure!(path.is_file(), "the baseline agent {} does not exist", path.display());
    }
    let agent = Agent::start(CONFIG).context("starting the agent")?;
    let earlier = baseline.as_deref().map(|path| Agent::start_binary(path, CONFIG)).transpose()?;

    let mut rows = Vec::new();
    for shape in SHAPES {
        let ours = cpu::measure(&agent, INTERVAL, &shape).with_context(|| format!("{} (this agent)", shape.name))?;
        let theirs = earlier
            .as_ref()
            .map(|agent| cpu::measure(agent, INTERVAL, &shape))
            .transpose()
            .with_context(|| format!("{} (baseline agent)", shape.name))?;
        eprintln!(
            "{}: {:.4}{}",
            shape.name,
            ours.ratio(),
            theirs.map(|t| format!(" (baseline {:.4})", t.ratio())).unwrap_or_default()
        );
        rows.push((shape.name, ours, theirs));
    }

    println!("CPU time per shape of work, agent ÷ kernel over the same window (1 s sampling interval)");
    println!("this agent: {}", agent_binary().display());
    if let Some(path) = &baseline {
        println!("baseline agent: {}", path.display());
    }
    println!();
    println!("| work inside the container | kernel CPU s | this agent ÷ kernel | baseline agent ÷ kernel |");
    println!("|---|---:|---:|---:|");
    let cell = |c: Option<Comparison>| c.map(|c| format!("{:.4}", c.ratio())).unwrap_or_else(|| "—".to_owned());
    for (name, ours, theirs) in &rows {
        println!("| {name} | {:.3} | {} | {} |", ours.kernel_s, cell(Some(*ours)), cell(*theirs));
    }
    let worst = rows.iter().map(|(_, ours, _)| ours.error()).fold(0.0, f64::max);
    println!();
    println!("largest difference of this agent from the kernel: {:.4} %", worst * 100.0);
    Ok(())
}
