//! `bench-usage`: what usage metering costs the agent: the meter's work per kernel sample,
//! the journal's append (one write and one fsync) per window boundary, and the bytes a record
//! takes on disk and on the wire. Runs the agent's own meter and journal, no Docker.
//!
//! `bench-usage [KERNELS] [WINDOWS] [SAMPLES_PER_WINDOW]` (default 100 60 60: 100 kernels,
//! 60 windows of 60 samples, i.e. an hour at the defaults).

use std::{collections::BTreeMap, time::Instant};

use bai_agent::usage::{
    KernelMeta, Meter, UsageJournal,
    meter::{Observation, UsageLine},
    record::Counts,
};

const SEC: u64 = 1_000_000_000;

fn arg(n: usize, default: u64) -> anyhow::Result<u64> {
    match std::env::args().nth(n) {
        Some(text) => Ok(text.parse()?),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let kernels = arg(1, 100)?;
    let windows = arg(2, 60)?;
    let samples = arg(3, 60)?.max(1);
    let dir = tempfile::tempdir_in(std::env::current_dir()?)?;
    let mut journal = UsageJournal::open(dir.path(), &["redis"])?.journal;
    let interval = 60 * SEC;
    let mut meter = Meter::new("i-bench", interval);
    let t0 = 1_764_590_400 * SEC;
    let ids: Vec<(String, String)> =
        (0..kernels).map(|k| (format!("kernel-{k:08}"), format!("container-{k}"))).collect();
    let mut opening = Vec::new();
    for (kernel_id, _) in &ids {
        let meta = KernelMeta {
            kernel_id: kernel_id.clone(),
            session_id: format!("session-{kernel_id}"),
            owner_user_id: "user-00000000-0000-0000-0000-000000000000".into(),
            owner_project_id: "project-00000000-0000-0000-0000-000000000000".into(),
            image: "cr.backend.ai/stable/python:3.12-ubuntu24.04".into(),
            slots: BTreeMap::from([
                ("cpu".to_owned(), "2".to_owned()),
                ("mem".to_owned(), "4294967296".to_owned()),
                ("cuda.device".to_owned(), "1".to_owned()),
            ]),
        };
        opening.extend(meter.start(meta, t0));
    }
    journal.append(opening).1?;

    let (mut observe_ns, mut append_ns, mut records, mut record_bytes) = (0u128, 0u128, 0u64, 0u64);
    let mut worst_append_ns = 0u128;
    let step = interval / samples;
    for sample in 1..=windows * samples {
        let at = t0 + sample * step + 1;
        let counts = Counts {
            cpu_ns: sample * 700_000_000,
            io_read_bytes: sample * 4096,
            io_write_bytes: sample * 8192,
            net_rx_bytes: sample * 1500,
            net_tx_bytes: sample * 900,
        };
        let observations: Vec<Observation<'_>> = ids
            .iter()
            .map(|(kernel_id, container_id)| Observation {
                kernel_id,
                container_id,
                cgroup_id: Some(7),
                totals: counts,
                run: counts,
                mem_bytes: 1 << 30,
                accel_util_pct: &[],
            })
            .collect();
        let started = Instant::now();
        let lines: Vec<UsageLine> = meter.observe(at, &observations, &[], true);
        observe_ns += started.elapsed().as_nanos();
        if !lines.is_empty() {
            records += lines.len() as u64;
            record_bytes += lines
                .iter()
                .filter_map(|l| l.event.as_ref())
                .map(|e| serde_json::to_vec(e).map_or(0, |v| v.len() as u64))
                .sum::<u64>();
            let started = Instant::now();
            journal.append(lines).1?;
            let took = started.elapsed().as_nanos();
            append_ns += took;
            worst_append_ns = worst_append_ns.max(took);
        }
    }
    let kernel_samples = (kernels * windows * samples) as f64;
    let boundaries = records as f64 / kernels as f64;
    println!(
        "bench-usage: {kernels} kernels, {windows} windows of {samples} samples, journal in {}",
        dir.path().display()
    );
    println!("  meter per kernel sample:          {:>10.3} µs", observe_ns as f64 / kernel_samples / 1e3);
    println!(
        "  journal append per boundary:      {:>10.3} ms ({kernels} records, one fsync; worst {:.3} ms)",
        append_ns as f64 / boundaries / 1e6,
        worst_append_ns as f64 / 1e6
    );
    println!("  journal append per record:        {:>10.3} µs", append_ns as f64 / records as f64 / 1e3);
    println!("  CloudEvent JSON per record:       {:>10.0} bytes", record_bytes as f64 / records as f64);
    println!(
        "  journal line per record:          {:>10.0} bytes",
        journal.len_bytes() as f64 / (records + kernels) as f64
    );
    println!("  records: {records}; journal {} bytes", journal.len_bytes());
    Ok(())
}
