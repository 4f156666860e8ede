//! The usage meter: per kernel, what it used in the open window, closed into a record at
//! each window boundary and at its end, with the checkpoint a restarted agent resumes from.
//!
//! It sees the monitor's cumulative counters. Within one agent process a container's
//! counters only grow, so each observation adds `now - last seen`. A restarted agent starts
//! from the last checkpoint: the running container's counters as they were at that boundary
//! (`RunMark`), which the pinned eBPF maps and the cgroup files kept counting meanwhile; the
//! first observation adds `now - mark`. A container that ended while no agent ran adds its
//! last counters (the monitor hands them over) minus the mark. Nothing is counted twice and
//! nothing in between is lost.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::record::{CloudEvent, Counts, KernelMeta, Totals, UsageData, Window};

/// How long a terminated kernel waits for the monitor to see its container stopped (and so
/// its last counters) before its final record is written with what is known.
pub const FINAL_WAIT_NS: u64 = 30_000_000_000;
/// The exit reason of a kernel the agent resumed metering but no longer runs.
pub const GONE_REASON: &str = "already-terminated";

/// The running container's own counters at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMark {
    pub container_id: String,
    pub cgroup_id: u64,
    pub counters: Counts,
}

/// Where a kernel's open window starts: written with every record (and when metering starts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The seq of the window that starts here.
    pub next_seq: u64,
    /// Unix nanoseconds.
    pub window_start_ns: u64,
    pub totals: Totals,
    /// Memory in use at the boundary (held until the next reading).
    pub mem_bytes: u64,
    /// Per accelerator type, the utilisation in use at the boundary, percent summed over
    /// devices (held until the next reading, like `mem_bytes`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accel_util_pct: BTreeMap<String, u64>,
    pub run: Option<RunMark>,
    /// The final record was written: nothing more for this kernel.
    #[serde(default)]
    pub closed: bool,
}

/// One journal line: a checkpoint, and the record that closed the window before it (none
/// when metering starts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageLine {
    pub kernel_id: String,
    pub meta: KernelMeta,
    pub checkpoint: Checkpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<CloudEvent>,
}

/// One container of a kernel in one monitor sample.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub kernel_id: &'a str,
    pub container_id: &'a str,
    /// Its cgroup while it runs; None once stopped (its counters are then final).
    pub cgroup_id: Option<u64>,
    /// Everything the container counted in this agent process (all its cgroups).
    pub totals: Counts,
    /// What its current cgroup counted (pinned counters included).
    pub run: Counts,
    pub mem_bytes: u64,
    /// Per accelerator type (`cuda`), the utilisation of the devices its processes use,
    /// percent summed over those devices (two devices at 70 % are 140).
    pub accel_util_pct: &'a [(&'static str, u64)],
}

#[derive(Debug)]
struct Metered {
    meta: KernelMeta,
    seq: u64,
    window_start_ns: u64,
    base: Totals,
    now: Totals,
    mem_bytes: u64,
    mem_at_ns: u64,
    mem_peak: u64,
    /// Per accelerator type, the utilisation held since `mem_at_ns` (see [`Observation`]).
    accel_pct: BTreeMap<String, u64>,
    /// Per container: its totals when last seen in this process.
    seen: HashMap<String, Counts>,
    /// The checkpoint's running container, until it is seen again or known ended.
    resume: Option<RunMark>,
    run: Option<RunMark>,
    ending: Option<(String, u64)>,
}

impl Metered {
    fn from_checkpoint(meta: KernelMeta, checkpoint: Checkpoint) -> Metered {
        Metered {
            meta,
            seq: checkpoint.next_seq,
            window_start_ns: checkpoint.window_start_ns,
            base: checkpoint.totals.clone(),
            now: checkpoint.totals,
            mem_bytes: checkpoint.mem_bytes,
            mem_at_ns: checkpoint.window_start_ns,
            mem_peak: checkpoint.mem_bytes,
            accel_pct: checkpoint.accel_util_pct,
            seen: HashMap::new(),
            run: checkpoint.run.clone(),
            resume: checkpoint.run,
            ending: None,
        }
    }

    fn checkpoint(&self, closed: bool) -> Checkpoint {
        Checkpoint {
            next_seq: self.seq,
            window_start_ns: self.window_start_ns,
            totals: self.now.clone(),
            mem_bytes: self.mem_bytes,
            accel_util_pct: self.accel_pct.clone(),
            run: self.run.clone(),
            closed,
        }
    }

    /// Integrates memory and accelerator utilisation up to `at_ns` with the readings held
    /// since the last one.
    fn hold_readings_until(&mut self, at_ns: u64) {
        let span = u128::from(at_ns.saturating_sub(self.mem_at_ns));
        self.now.mem_byte_ns = self.now.mem_byte_ns.saturating_add(u128::from(self.mem_bytes) * span);
        for (kind, pct) in &self.accel_pct {
            let busy = self.now.accel_busy_pct_ns.entry(kind.clone()).or_default();
            *busy = busy.saturating_add(u128::from(*pct) * span);
        }
        self.mem_at_ns = self.mem_at_ns.max(at_ns);
    }

    fn add(&mut self, counts: &Counts) {
        self.now.counts = self.now.counts.plus(counts);
    }
}

/// Every metered kernel of this agent.
#[derive(Debug)]
pub struct Meter {
    agent_id: String,
    interval_ns: u64,
    kernels: HashMap<String, Metered>,
}

impl Meter {
    /// A meter with windows of `interval_ns`, aligned to multiples of it since the epoch.
    pub fn new(agent_id: &str, interval_ns: u64) -> Meter {
        Meter { agent_id: agent_id.to_owned(), interval_ns: interval_ns.max(1), kernels: HashMap::new() }
    }

    /// Resumes the open windows of an earlier run (the journal's last checkpoints).
    pub fn resume(&mut self, checkpoints: impl IntoIterator<Item = (KernelMeta, Checkpoint)>) {
        for (meta, checkpoint) in checkpoints {
            if checkpoint.closed {
                continue;
            }
            let kernel_id = meta.kernel_id.clone();
            self.kernels.insert(kernel_id, Metered::from_checkpoint(meta, checkpoint));
        }
    }

    pub fn len(&self) -> usize {
        self.kernels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kernels.is_empty()
    }

    pub fn is_metered(&self, kernel_id: &str) -> bool {
        self.kernels.contains_key(kernel_id)
    }

    /// A kernel started (or was recovered, or restarted): metering begins at `at_ns` unless it
    /// is already metered (then only what it holds is updated). Returns the line that opens
    /// its first window.
    pub fn start(&mut self, meta: KernelMeta, at_ns: u64) -> Option<UsageLine> {
        if let Some(metered) = self.kernels.get_mut(&meta.kernel_id) {
            metered.meta = meta;
            return None;
        }
        let kernel_id = meta.kernel_id.clone();
        let checkpoint = Checkpoint {
            next_seq: 0,
            window_start_ns: at_ns,
            totals: Totals::default(),
            mem_bytes: 0,
            accel_util_pct: BTreeMap::new(),
            run: None,
            closed: false,
        };
        let line =
            UsageLine { kernel_id: kernel_id.clone(), meta: meta.clone(), checkpoint: checkpoint.clone(), event: None };
        self.kernels.insert(kernel_id, Metered::from_checkpoint(meta, checkpoint));
        Some(line)
    }

    /// A kernel ended for `reason`: its final record follows once the monitor shows its
    /// container stopped (or after [`FINAL_WAIT_NS`]).
    pub fn terminate(&mut self, kernel_id: &str, reason: &str, at_ns: u64) {
        match self.kernels.get_mut(kernel_id) {
            Some(metered) => {
                metered.ending.get_or_insert_with(|| (reason.to_owned(), at_ns.saturating_add(FINAL_WAIT_NS)));
            }
            None => tracing::debug!(kernel_id, reason, "a kernel that was not metered ended"),
        }
    }

    /// Every metered kernel not in `live` (the kernels the agent runs after recovering) ended
    /// while no agent ran.
    pub fn reconcile(&mut self, live: &HashSet<String>, at_ns: u64) {
        for (kernel_id, metered) in &mut self.kernels {
            if !live.contains(kernel_id) && metered.ending.is_none() {
                tracing::info!(kernel_id, "a metered kernel is gone since the last run; writing its final usage");
                metered.ending = Some((GONE_REASON.to_owned(), at_ns));
            }
        }
    }

    /// Applies one monitor sample taken at `at_ns`: `containers` of every kernel, `ended`
    /// (cgroup id, last counters) of containers that ended while no agent ran, and whether the
    /// monitor has synced with Docker (before that, a missing container proves nothing).
    /// Returns the lines of the windows it closed, in order.
    pub fn observe(
        &mut self,
        at_ns: u64,
        containers: &[Observation<'_>],
        ended: &[(u64, Counts)],
        synced: bool,
    ) -> Vec<UsageLine> {
        // Grouped by kernel without a map per pass: sorted, each kernel's run found by search.
        let mut by_kernel: Vec<&Observation<'_>> =
            if self.kernels.is_empty() { Vec::new() } else { containers.iter().collect() };
        by_kernel.sort_unstable_by_key(|observation| observation.kernel_id);
        let mut lines = Vec::new();
        let mut finished = Vec::new();
        for (kernel_id, metered) in &mut self.kernels {
            let at_ns = at_ns.max(metered.window_start_ns);
            let first = by_kernel.partition_point(|o| o.kernel_id < kernel_id.as_str());
            let count = by_kernel[first..].iter().take_while(|o| o.kernel_id == kernel_id.as_str()).count();
            let mine = &by_kernel[first..first + count];
            metered.hold_readings_until(at_ns);
            let mut running_mem = 0u64;
            let mut running_accel: BTreeMap<String, u64> = BTreeMap::new();
            let mut run = None;
            for observation in mine {
                let increment = match metered.seen.get(observation.container_id) {
                    Some(last) => observation.totals.minus(last),
                    None => first_increment(kernel_id, metered.resume.take(), observation),
                };
                metered.add(&increment);
                metered.seen.insert(observation.container_id.to_owned(), observation.totals);
                if let Some(cgroup_id) = observation.cgroup_id {
                    running_mem = running_mem.saturating_add(observation.mem_bytes);
                    for (kind, pct) in observation.accel_util_pct {
                        let held = running_accel.entry((*kind).to_owned()).or_default();
                        *held = held.saturating_add(*pct);
                    }
                    run.get_or_insert_with(|| RunMark {
                        container_id: observation.container_id.to_owned(),
                        cgroup_id,
                        counters: observation.run,
                    });
                }
            }
            metered.seen.retain(|container_id, _| mine.iter().any(|o| o.container_id == container_id));
            if let Some(mark) = metered.resume.take() {
                match ended.iter().find(|(cgroup_id, _)| *cgroup_id == mark.cgroup_id) {
                    Some((_, last)) => metered.add(&last.minus(&mark.counters)),
                    None => metered.resume = Some(mark),
                }
            }
            if !mine.is_empty() || synced {
                metered.mem_bytes = running_mem;
                metered.mem_peak = metered.mem_peak.max(running_mem);
                metered.accel_pct = running_accel;
                metered.run = run;
            }
            let ending = metered.ending.as_ref().filter(|(_, deadline)| {
                let stopped = synced && metered.run.is_none() && mine.iter().all(|o| o.cgroup_id.is_none());
                stopped || at_ns >= *deadline
            });
            if let Some((reason, _)) = ending {
                if metered.resume.is_some() {
                    tracing::warn!(
                        kernel_id,
                        "the last counters of a kernel that ended while no agent ran are unknown; its final record counts up to the last checkpoint"
                    );
                }
                let reason = reason.clone();
                lines.push(close_window(&self.agent_id, kernel_id, metered, at_ns, Some(&reason)));
                finished.push(kernel_id.clone());
            } else if (synced || !mine.is_empty()) && at_ns >= next_boundary(metered.window_start_ns, self.interval_ns)
            {
                // (Before the monitor has synced, a resumed kernel's window stays open, so
                // what it used while no agent ran lands in the window that spans that time.)
                lines.push(close_window(&self.agent_id, kernel_id, metered, at_ns, None));
            }
        }
        for kernel_id in finished {
            self.kernels.remove(&kernel_id);
        }
        lines.sort_by(|a, b| a.kernel_id.cmp(&b.kernel_id));
        lines
    }
}

impl Meter {
    /// Writes the final record of every kernel that ended, now, with what is known (at
    /// shutdown: no later snapshot will come).
    pub fn finish_ending(&mut self, at_ns: u64) -> Vec<UsageLine> {
        let mut ending: Vec<String> =
            self.kernels.iter().filter(|(_, m)| m.ending.is_some()).map(|(id, _)| id.clone()).collect();
        ending.sort();
        let mut lines = Vec::new();
        for kernel_id in ending {
            let Some(mut metered) = self.kernels.remove(&kernel_id) else { continue };
            let Some((reason, _)) = metered.ending.clone() else { continue };
            let at_ns = at_ns.max(metered.window_start_ns);
            metered.hold_readings_until(at_ns);
            lines.push(close_window(&self.agent_id, &kernel_id, &mut metered, at_ns, Some(&reason)));
        }
        lines
    }
}

/// The first observation of a container in this process: what it counted since the
/// checkpoint's mark (same container and cgroup, counters that went on), else all of it.
fn first_increment(kernel_id: &str, resume: Option<RunMark>, observation: &Observation<'_>) -> Counts {
    let Some(mark) = resume else {
        return observation.totals;
    };
    let same_run = mark.container_id == observation.container_id && Some(mark.cgroup_id) == observation.cgroup_id;
    if same_run && observation.run.covers(&mark.counters) {
        let earlier_runs = observation.totals.minus(&observation.run);
        return observation.run.minus(&mark.counters).plus(&earlier_runs);
    }
    if same_run {
        tracing::warn!(
            kernel_id,
            container_id = observation.container_id,
            "the container's counters restarted since the last checkpoint (pinned counters lost?); usage between the checkpoint and the restart is not known"
        );
    }
    observation.totals
}

/// Where the window that starts at `start_ns` ends: the next multiple of `interval_ns`.
pub fn next_boundary(start_ns: u64, interval_ns: u64) -> u64 {
    (start_ns / interval_ns).saturating_add(1).saturating_mul(interval_ns)
}

fn close_window(
    agent_id: &str,
    kernel_id: &str,
    metered: &mut Metered,
    end_ns: u64,
    exit_reason: Option<&str>,
) -> UsageLine {
    let window = Window {
        seq: metered.seq,
        start_ns: metered.window_start_ns,
        end_ns,
        counts: metered.now.counts.minus(&metered.base.counts),
        mem_byte_ns: metered.now.mem_byte_ns.saturating_sub(metered.base.mem_byte_ns),
        mem_peak_bytes: metered.mem_peak,
        accel_busy_pct_ns: metered.now.accel_busy_since(&metered.base),
    };
    let event = CloudEvent::usage(agent_id, UsageData::new(&metered.meta, &window, exit_reason));
    metered.seq += 1;
    metered.window_start_ns = end_ns;
    metered.base = metered.now.clone();
    metered.mem_peak = metered.mem_bytes;
    UsageLine {
        kernel_id: kernel_id.to_owned(),
        meta: metered.meta.clone(),
        checkpoint: metered.checkpoint(exit_reason.is_some()),
        event: Some(event),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_764_590_400 * SEC;

    fn meta(kernel_id: &str) -> KernelMeta {
        KernelMeta {
            kernel_id: kernel_id.into(),
            session_id: "s".into(),
            owner_user_id: "u".into(),
            owner_project_id: "p".into(),
            image: "img".into(),
            slots: BTreeMap::from([("cpu".to_owned(), "1".to_owned()), ("mem".to_owned(), "1024".to_owned())]),
        }
    }

    fn counts(cpu_ns: u64, bytes: u64) -> Counts {
        Counts { cpu_ns, io_read_bytes: bytes, io_write_bytes: 2 * bytes, net_rx_bytes: 3 * bytes, net_tx_bytes: bytes }
    }

    fn running<'a>(kernel_id: &'a str, container_id: &'a str, cgroup: u64, c: Counts, mem: u64) -> Observation<'a> {
        Observation {
            kernel_id,
            container_id,
            cgroup_id: Some(cgroup),
            totals: c,
            run: c,
            mem_bytes: mem,
            accel_util_pct: &[],
        }
    }

    /// An open window at T0 whose running container `(id, cgroup, counters)` was marked.
    fn checkpoint(next_seq: u64, totals: Counts, mem_bytes: u64, run: (&str, u64, Counts)) -> Checkpoint {
        Checkpoint {
            next_seq,
            window_start_ns: T0,
            totals: Totals { counts: totals, ..Totals::default() },
            mem_bytes,
            accel_util_pct: BTreeMap::new(),
            run: Some(RunMark { container_id: run.0.into(), cgroup_id: run.1, counters: run.2 }),
            closed: false,
        }
    }

    fn data(lines: &[UsageLine]) -> Vec<UsageData> {
        lines.iter().filter_map(|l| l.event.as_ref().map(|e| e.data.clone())).collect()
    }

    fn sum(records: &[UsageData]) -> (u128, u64, u64, u128) {
        let nanos = |text: &str| -> u128 {
            let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
            whole.parse::<u128>().expect("whole") * 1_000_000_000 + format!("{frac:0<9}").parse::<u128>().expect("frac")
        };
        records.iter().fold((0, 0, 0, 0), |acc, r| {
            (
                acc.0 + nanos(&r.cpu_seconds),
                acc.1 + r.io_read_bytes,
                acc.2 + r.net_rx_bytes,
                acc.3 + nanos(&r.mem_byte_seconds),
            )
        })
    }

    #[test]
    fn windows_close_at_aligned_boundaries_and_their_deltas_add_up_to_the_totals() {
        let mut meter = Meter::new("i-a", 60 * SEC);
        let open = meter.start(meta("k"), T0 + 10 * SEC).expect("an opening line");
        assert!(open.event.is_none());
        assert_eq!(open.checkpoint.window_start_ns, T0 + 10 * SEC);
        let mut records = Vec::new();
        for step in 1..=200u64 {
            let at = T0 + 10 * SEC + step * SEC;
            let c = counts(step * 7_000_001, step * 4096);
            records.extend(data(&meter.observe(at, &[running("k", "c1", 5, c, 1000 + step)], &[], true)));
        }
        meter.terminate("k", "user-requested", T0 + 211 * SEC);
        let stopped = Observation {
            cgroup_id: None,
            mem_bytes: 0,
            ..running("k", "c1", 5, counts(200 * 7_000_001 + 5, 200 * 4096 + 1), 0)
        };
        let last = data(&meter.observe(T0 + 211 * SEC, &[stopped], &[], true));
        assert_eq!(last.len(), 1);
        assert!(last[0].is_final);
        assert_eq!(last[0].exit_reason.as_deref(), Some("user-requested"));
        records.extend(last);
        assert!(!meter.is_metered("k"));

        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (0..records.len() as u64).collect::<Vec<_>>());
        assert_eq!(records[0].window_start, super::super::record::rfc3339(T0 + 10 * SEC));
        assert_eq!(records[0].window_end, super::super::record::rfc3339(T0 + 60 * SEC), "aligned to the minute");
        for pair in records.windows(2) {
            assert_eq!(pair[0].window_end, pair[1].window_start, "no gap, no overlap");
        }
        let (cpu, read, rx, _) = sum(&records);
        assert_eq!(cpu, u128::from(200 * 7_000_001 + 5u64));
        assert_eq!(read, 200 * 4096 + 1);
        assert_eq!(rx, 3 * (200 * 4096 + 1));
        assert_eq!(records[1].slot_seconds["cpu"], "60");
        assert_eq!(records[1].slot_seconds["mem"], "61440");
        assert!(
            records[1].mem_peak_bytes >= 1060 && records[1].mem_peak_bytes <= 1120,
            "{}",
            records[1].mem_peak_bytes
        );
    }

    #[test]
    fn accelerator_busy_time_is_utilisation_held_over_time_and_survives_a_restart() {
        const BUSY: &[(&str, u64)] = &[("cuda", 70)];
        let observe = |meter: &mut Meter, step: u64, busy: bool| {
            let accel_util_pct: &'static [(&'static str, u64)] = if busy { BUSY } else { &[] };
            let observations = [
                Observation { accel_util_pct, ..running("busy", "c1", 9, counts(step, step), 0) },
                running("idle", "c2", 10, counts(step, step), 0),
            ];
            meter.observe(T0 + step * SEC, &observations, &[], true)
        };
        let busy_seconds = |lines: &[UsageLine], kernel: &str| -> Vec<Option<String>> {
            data(lines)
                .iter()
                .filter(|r| r.kernel_id == kernel)
                .map(|r| r.accel_busy_seconds.get("cuda").cloned())
                .collect()
        };
        let mut meter = Meter::new("i-a", 10 * SEC);
        meter.start(meta("busy"), T0);
        meter.start(meta("idle"), T0);
        let mut lines = Vec::new();
        for step in 1..=12 {
            lines.extend(observe(&mut meter, step, true));
        }
        // Seen busy from 1 s: 9 s at 70 % in the first window.
        assert_eq!(busy_seconds(&lines, "busy"), [Some("6.3".to_owned())]);
        assert_eq!(busy_seconds(&lines, "idle"), [None], "an idle kernel has no busy time");
        let checkpoint = lines.iter().find(|l| l.kernel_id == "busy").expect("a line").checkpoint.clone();
        assert_eq!(checkpoint.accel_util_pct, BTreeMap::from([("cuda".to_owned(), 70)]));
        // The agent dies at 12 s; the next one resumes from the 10 s checkpoint, the last
        // reading held while no agent ran (as memory is).
        let json = serde_json::to_string(&checkpoint).expect("json");
        let mut meter = Meter::new("i-a", 10 * SEC);
        meter.resume([(meta("busy"), serde_json::from_str(&json).expect("parses"))]);
        let mut lines = Vec::new();
        for step in 13..=30 {
            lines.extend(observe(&mut meter, step, step <= 20));
        }
        // 10 s at 70 %, then the process ended: its last reading held one more second.
        assert_eq!(busy_seconds(&lines, "busy"), [Some("7".to_owned()), Some("0.7".to_owned())]);
    }

    #[test]
    fn a_restarted_meter_resumes_from_the_checkpoint_without_gap_or_overlap() {
        let mut meter = Meter::new("i-a", 10 * SEC);
        meter.start(meta("k"), T0);
        let mut records = Vec::new();
        let mut last_line = None;
        for step in 1..=25u64 {
            let lines =
                meter.observe(T0 + step * SEC, &[running("k", "c1", 9, counts(step * SEC, step), 0)], &[], true);
            if let Some(line) = lines.last() {
                last_line = Some(line.clone());
            }
            records.extend(data(&lines));
        }
        // The agent dies at 25 s: what came after the 20 s checkpoint was never written.
        let checkpoint = last_line.expect("a line").checkpoint;
        assert_eq!(checkpoint.window_start_ns, T0 + 20 * SEC);
        let mut meter = Meter::new("i-a", 10 * SEC);
        meter.resume([(meta("k"), checkpoint)]);
        // The new process sees the pinned counters, which went on counting while it was down.
        for step in 31..=45u64 {
            records.extend(data(&meter.observe(
                T0 + step * SEC,
                &[running("k", "c1", 9, counts(step * SEC, step), 0)],
                &[],
                true,
            )));
        }
        meter.terminate("k", "user-requested", T0 + 45 * SEC);
        let stopped = Observation { cgroup_id: None, ..running("k", "c1", 9, counts(46 * SEC, 46), 0) };
        records.extend(data(&meter.observe(T0 + 46 * SEC, &[stopped], &[], true)));
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (0..records.len() as u64).collect::<Vec<_>>(), "the sequence goes on");
        for pair in records.windows(2) {
            assert_eq!(pair[0].window_end, pair[1].window_start);
        }
        let (cpu, read, _, _) = sum(&records);
        assert_eq!(cpu, u128::from(46 * SEC));
        assert_eq!(read, 46);
    }

    #[test]
    fn a_container_that_ended_while_no_agent_ran_is_finished_with_its_last_counters() {
        let mut meter = Meter::new("i-a", 10 * SEC);
        meter.resume([(meta("k"), checkpoint(4, counts(100, 10), 50, ("c1", 77, counts(60, 6))))]);
        // Not synced yet: a missing container proves nothing.
        assert!(meter.observe(T0 + SEC, &[], &[], false).is_empty());
        meter.terminate("k", "self-terminated", T0 + SEC);
        assert!(meter.observe(T0 + 2 * SEC, &[], &[], false).is_empty());
        let lines = meter.observe(T0 + 3 * SEC, &[], &[(77, counts(90, 9))], true);
        let records = data(&lines);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].seq, 4);
        assert_eq!(records[0].cpu_seconds, "0.00000003");
        assert_eq!(records[0].io_read_bytes, 3);
        assert_eq!(records[0].mem_byte_seconds, "150", "50 bytes held for 3 s");
        assert!(records[0].is_final);
        assert!(lines[0].checkpoint.closed);
    }

    #[test]
    fn an_ended_run_reported_in_several_snapshots_counts_once() {
        let mut meter = Meter::new("i-a", 10 * SEC);
        meter.resume([(meta("k"), checkpoint(0, counts(100, 10), 0, ("c1", 77, counts(60, 6))))]);
        for step in 1..=3 {
            assert!(meter.observe(T0 + step * SEC, &[], &[(77, counts(90, 9))], true).is_empty());
        }
        meter.terminate("k", "self-terminated", T0 + 3 * SEC);
        let records = data(&meter.observe(T0 + 4 * SEC, &[], &[(77, counts(90, 9))], true));
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].cpu_seconds, "0.00000003", "90 - 60, once");
        assert_eq!(records[0].io_read_bytes, 3);
    }

    #[test]
    fn counters_that_restarted_are_taken_whole_and_restarts_of_the_container_add_up() {
        let mut meter = Meter::new("i-a", 3600 * SEC);
        meter.resume([(meta("k"), checkpoint(1, counts(1000, 100), 0, ("c1", 5, counts(1000, 100))))]);
        // The pins were lost: the same cgroup counts from zero again.
        meter.observe(T0 + SEC, &[running("k", "c1", 5, counts(10, 1), 0)], &[], true);
        // restart_kernel: the old container stops with its final counts, a new one starts.
        let old = Observation { cgroup_id: None, ..running("k", "c1", 5, counts(20, 2), 0) };
        meter.observe(T0 + 2 * SEC, &[old, running("k", "c2", 6, counts(5, 5), 0)], &[], true);
        meter.observe(T0 + 3 * SEC, &[running("k", "c2", 6, counts(8, 8), 0)], &[], true);
        meter.terminate("k", "user-requested", T0 + 3 * SEC);
        let stopped = Observation { cgroup_id: None, ..running("k", "c2", 6, counts(9, 9), 0) };
        let records = data(&meter.observe(T0 + 4 * SEC, &[stopped], &[], true));
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].cpu_seconds, "0.000000029", "20 of the first container, 9 of the second");
        assert_eq!(records[0].io_read_bytes, 11);
    }

    #[test]
    fn kernels_unknown_after_recovery_are_finished_and_starts_of_metered_kernels_only_update_them() {
        let mut meter = Meter::new("i-a", 60 * SEC);
        meter.start(meta("a"), T0);
        meter.start(meta("b"), T0);
        let mut changed = meta("a");
        changed.image = "img:2".into();
        assert!(meter.start(changed, T0 + SEC).is_none(), "already metered");
        meter.reconcile(&HashSet::from(["a".to_owned()]), T0 + 2 * SEC);
        let records = data(&meter.observe(T0 + 3 * SEC, &[running("a", "c", 1, counts(1, 1), 0)], &[], true));
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kernel_id, "b");
        assert_eq!(records[0].exit_reason.as_deref(), Some(GONE_REASON));
        assert!(meter.is_metered("a") && !meter.is_metered("b"));
        // A terminated kernel whose container never shows as stopped is finished at the deadline.
        meter.terminate("a", "user-requested", T0 + 4 * SEC);
        assert!(data(&meter.observe(T0 + 5 * SEC, &[running("a", "c", 1, counts(2, 2), 0)], &[], true)).is_empty());
        let records =
            data(&meter.observe(T0 + 5 * SEC + FINAL_WAIT_NS, &[running("a", "c", 1, counts(3, 3), 0)], &[], true));
        assert_eq!(records[0].image, "img:2");
        assert_eq!(records[0].io_read_bytes, 3);
        assert!(records[0].is_final);
    }
}
