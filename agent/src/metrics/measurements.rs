//! Backend.AI's measurements: per kernel and for the node, each metric key (`cpu_util`,
//! `cpu_used`, `mem`, `io_read`, `io_write`, `net_rx`, `net_tx`, `disk`, `cuda_mem`,
//! `cuda_util`) as `{current, capacity, pct, unit_hint, stats.*}` with decimal strings, the
//! moving statistics kept across samples, and the `backendai_*_utilization` gauges.
//!
//! The shape and the numbers follow the Python agent (`agent/stats.py` and the intrinsic
//! plugins): `current` rounded to 3 decimals and `pct` to 2 with trailing zeros dropped
//! (`pct` is `"0.00"` without a capacity); min/max/sum/avg over the metric's life, diff and
//! rate between its last two samples; a metric with no capacity of its own takes its first
//! value as capacity. One deliberate difference: for metrics whose `current` is a rate
//! (`cpu_util`, `net_*`) the statistics are of that rate, not of the cumulative input.
//!
//! Every sample only updates numbers (`f64`, exact for integers below 2^53); the decimal
//! strings are made when someone reads them (the stats writer, `destroy_kernel`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};
use rmpv::Value;

use super::{MetricsState, MonitorSnapshot};
use crate::docker::KernelContainer;

/// How long a kernel's statistics outlive its last sample (so `destroy_kernel` finds them).
const KERNEL_RETENTION: Duration = Duration::from_secs(600);

/// What a metric's `current` is made of its raw input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    /// The input itself (a gauge, or a cumulative count shown as is).
    Raw,
    /// Change of the input per second between the last two samples.
    Rate,
    /// Change of the input since the last sample.
    Diff,
}

/// One metric key's definition.
#[derive(Debug, Clone, Copy)]
struct Definition {
    key: &'static str,
    unit_hint: &'static str,
    current: Current,
    /// Which `stats.*` entries the metric reports.
    stats: &'static [&'static str],
}

const CPU_UTIL: Definition =
    Definition { key: "cpu_util", unit_hint: "percent", current: Current::Rate, stats: &["avg", "max"] };
const CPU_USED: Definition = Definition { key: "cpu_used", unit_hint: "msec", current: Current::Raw, stats: &[] };
const MEM: Definition = Definition { key: "mem", unit_hint: "bytes", current: Current::Raw, stats: &["max"] };
const IO_READ: Definition = Definition { key: "io_read", unit_hint: "bytes", current: Current::Raw, stats: &["rate"] };
const IO_WRITE: Definition =
    Definition { key: "io_write", unit_hint: "bytes", current: Current::Raw, stats: &["rate"] };
const NET_RX: Definition = Definition { key: "net_rx", unit_hint: "bps", current: Current::Rate, stats: &[] };
const NET_TX: Definition = Definition { key: "net_tx", unit_hint: "bps", current: Current::Rate, stats: &[] };
const NODE_CPU_UTIL: Definition = Definition { key: "cpu_util", unit_hint: "msec", current: Current::Diff, stats: &[] };
const DISK: Definition = Definition { key: "disk", unit_hint: "bytes", current: Current::Raw, stats: &[] };
const CUDA_MEM: Definition = Definition { key: "cuda_mem", unit_hint: "bytes", current: Current::Raw, stats: &["max"] };
const CUDA_UTIL: Definition =
    Definition { key: "cuda_util", unit_hint: "percent", current: Current::Raw, stats: &["avg", "max"] };

/// A compute plugin's per-kernel metrics, `{key}_util` and `{key}_mem` (`cuda_util`,
/// `cuda_mem`), shaped as [`CUDA_UTIL`] and [`CUDA_MEM`]. Plugins are made once at start, so
/// the few keys other than `cuda` are made once and kept.
fn accelerator_definitions(plugin: &'static str) -> (Definition, Definition) {
    if plugin == "cuda" {
        return (CUDA_UTIL, CUDA_MEM);
    }
    static MADE: std::sync::Mutex<Vec<(&'static str, Definition, Definition)>> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, util, mem)) = made.iter().find(|(key, _, _)| *key == plugin) {
        return (*util, *mem);
    }
    let leak = |suffix: &str| -> &'static str { Box::leak(format!("{plugin}_{suffix}").into_boxed_str()) };
    let util = Definition { key: leak("util"), ..CUDA_UTIL };
    let mem = Definition { key: leak("mem"), ..CUDA_MEM };
    made.push((plugin, util, mem));
    (util, mem)
}

/// A kernel's use of one plugin's devices at a sample: (utilisation summed over its devices,
/// 100 × their number, memory its processes hold on them, those devices' memory), as
/// Backend.AI's CUDA plugin shapes `cuda_util` / `cuda_mem` per container. Its devices are
/// those it was given (`given`: plugin key, device id), or, for a kernel given none of this
/// plugin's, those its processes use.
fn kernel_accelerator_measure(
    readings: &crate::resources::compute::DeviceReadings,
    uses: &[&crate::monitor::accel::KernelDeviceUse],
    given: &[(String, String)],
) -> (f64, f64, f64, f64) {
    let uses: Vec<_> = uses.iter().filter(|u| u.plugin == readings.plugin).collect();
    let (util, mem) = uses.iter().fold((0.0, 0.0), |(util, mem), used| {
        (util + f64::from(used.utilization_pct), mem + used.mem_used_bytes as f64)
    });
    let mut devices: Vec<&str> =
        given.iter().filter(|(plugin, _)| plugin == readings.plugin).map(|(_, id)| id.as_str()).collect();
    if devices.is_empty() {
        devices = uses.iter().map(|used| used.device_id.as_str()).collect();
    }
    devices.sort_unstable();
    devices.dedup();
    let mem_capacity = devices
        .iter()
        .map(|id| readings.devices.iter().find(|d| d.id == *id).map_or(0.0, |d| d.mem_total_bytes as f64))
        .sum();
    (util, 100.0 * devices.len() as f64, mem, mem_capacity)
}

/// A kernel's `cpu_util` capacity: 1000 ms of CPU per second, one core (as Backend.AI).
const ONE_CORE_MS: f64 = 1000.0;

/// The moving statistics of one metric.
#[derive(Debug, Clone, Default)]
struct MovingStats {
    min: Option<f64>,
    max: Option<f64>,
    sum: f64,
    count: u64,
}

impl MovingStats {
    fn observe(&mut self, value: f64) {
        self.min = Some(self.min.map_or(value, |m| m.min(value)));
        self.max = Some(self.max.map_or(value, |m| m.max(value)));
        self.sum += value;
        self.count += 1;
    }

    fn avg(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }
    }
}

/// The last two points of a metric's raw input, newest last.
#[derive(Debug, Clone, Copy, Default)]
struct Points {
    older: Option<(f64, Instant)>,
    newer: Option<(f64, Instant)>,
}

impl Points {
    fn push(&mut self, value: f64, at: Instant) {
        self.older = self.newer.replace((value, at));
    }

    /// Change between the last two points; 0 for fewer points or a counter reset.
    fn diff(&self) -> f64 {
        match (self.older, self.newer) {
            (Some((older, _)), Some((newer, _))) if newer >= older => newer - older,
            _ => 0.0,
        }
    }

    /// The diff per second.
    fn rate(&self) -> f64 {
        match (self.older, self.newer) {
            (Some((_, t0)), Some((_, t1))) if t1 > t0 => self.diff() / t1.duration_since(t0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// One metric of one kernel (or of the node, or of a device) across samples.
#[derive(Debug, Clone)]
struct Metric {
    definition: Definition,
    capacity: Option<f64>,
    /// The latest raw input (what the Prometheus utilization gauges export).
    raw: f64,
    current: f64,
    inputs: Points,
    /// Statistics of `current`.
    stats: MovingStats,
}

impl Metric {
    fn new(definition: Definition, capacity: Option<f64>) -> Metric {
        Metric {
            definition,
            capacity,
            raw: 0.0,
            current: 0.0,
            inputs: Points::default(),
            stats: MovingStats::default(),
        }
    }

    fn update(&mut self, raw: f64, capacity: Option<f64>, at: Instant) {
        if capacity.is_some() {
            self.capacity = capacity;
        }
        self.raw = raw;
        self.inputs.push(raw, at);
        self.current = match self.definition.current {
            Current::Raw => raw,
            Current::Rate => self.inputs.rate(),
            Current::Diff => self.inputs.diff(),
        };
        // A rate or diff needs two samples: the first one has none yet and is left out.
        if self.definition.current == Current::Raw || self.inputs.older.is_some() {
            self.stats.observe(self.current);
        }
    }

    fn stat(&self, name: &str) -> f64 {
        match name {
            "min" => self.stats.min.unwrap_or(0.0),
            "max" => self.stats.max.unwrap_or(0.0),
            "sum" => self.stats.sum,
            "avg" => self.stats.avg(),
            // Of the raw input, as Backend.AI's io_read/io_write `stats.rate`.
            "diff" => self.inputs.diff(),
            "rate" => self.inputs.rate(),
            _ => 0.0,
        }
    }

    /// `{"current", "capacity", "pct", "unit_hint", "stats.<name>"…}` as msgpack.
    fn write(&self, out: &mut Vec<u8>) {
        write_map_len(out, 4 + self.definition.stats.len());
        write_str(out, "current");
        write_number(out, self.current, 3);
        write_str(out, "capacity");
        match self.capacity {
            Some(capacity) => write_number(out, capacity, 3),
            None => out.push(NIL),
        }
        write_str(out, "pct");
        match self.capacity {
            Some(capacity) if capacity > 0.0 => write_number(out, self.current / capacity * 100.0, 2),
            _ => write_str(out, "0.00"),
        }
        write_str(out, "unit_hint");
        write_str(out, self.definition.unit_hint);
        for name in self.definition.stats {
            write_str(out, &format!("stats.{name}"));
            write_number(out, self.stat(name), 3);
        }
    }
}

/// msgpack's nil.
const NIL: u8 = 0xc0;

/// Backend.AI's number format: rounded half-even to `places` decimals, trailing zeros
/// dropped (`"1234.5"`, `"1073741824"`, `"50"`).
pub fn format_number(value: f64, places: u32) -> String {
    let mut digits = [0u8; 48];
    String::from_utf8_lossy(number_digits(value, places, &mut digits)).into_owned()
}

/// A non-negative whole number whose decimal digits are taken from the right: in `u64` when it
/// fits (nearly always; 128-bit division is a library call, several times slower).
enum Units {
    Small(u64),
    Large(u128),
}

impl Units {
    fn of(value: f64) -> Units {
        if value < u64::MAX as f64 { Units::Small(value as u64) } else { Units::Large(value as u128) }
    }

    fn pop_digit(&mut self) -> u8 {
        match self {
            Units::Small(n) => {
                let digit = (*n % 10) as u8;
                *n /= 10;
                digit
            }
            Units::Large(n) => {
                let digit = (*n % 10) as u8;
                *n /= 10;
                digit
            }
        }
    }

    fn is_zero(&self) -> bool {
        matches!(self, Units::Small(0) | Units::Large(0))
    }
}

/// [`format_number`] into `buf`, without allocating (there are thousands per stats write).
fn number_digits(value: f64, places: u32, buf: &mut [u8; 48]) -> &[u8] {
    let scale = 10u128.pow(places.min(6));
    let scaled = if value.is_finite() { (value * scale as f64).round_ties_even() } else { 0.0 };
    let mut units = Units::of(scaled.abs());
    // Digits from the right: the fraction (dropping trailing zeros), the point, the whole part.
    let mut at = buf.len();
    let mut fraction_digits = places.min(6);
    let mut seen_nonzero = false;
    while fraction_digits > 0 {
        let digit = units.pop_digit();
        fraction_digits -= 1;
        if digit != 0 || seen_nonzero {
            seen_nonzero = true;
            at -= 1;
            buf[at] = b'0' + digit;
        }
    }
    if seen_nonzero {
        at -= 1;
        buf[at] = b'.';
    }
    loop {
        at -= 1;
        buf[at] = b'0' + units.pop_digit();
        if units.is_zero() || at == 1 {
            break;
        }
    }
    if scaled < 0.0 && (seen_nonzero || buf[at..] != *b"0") {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

fn write_number(out: &mut Vec<u8>, value: f64, places: u32) {
    let mut digits = [0u8; 48];
    let digits = number_digits(value, places, &mut digits);
    // The digits are ASCII; a msgpack str is its length and bytes.
    let _ = rmp::encode::write_str_len(out, u32::try_from(digits.len()).unwrap_or(0));
    out.extend_from_slice(digits);
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, text);
}

fn write_map_len(out: &mut Vec<u8>, len: usize) {
    let _ = rmp::encode::write_map_len(out, u32::try_from(len).unwrap_or(u32::MAX));
}

/// A metric set that keeps its metrics' history across samples.
#[derive(Debug, Clone, Default)]
struct MetricSet {
    metrics: Vec<Metric>,
    /// Where the next update of this sample probably goes ([`MetricSet::start_sample`] resets it).
    cursor: usize,
}

impl MetricSet {
    /// Feeds one input; the first time, `capacity` (or, with `fixed_first`, the input
    /// itself) becomes its capacity.
    fn update(&mut self, definition: Definition, raw: f64, capacity: Option<f64>, fixed_first: bool, at: Instant) {
        // Callers feed a set's metrics in the same order every time: try the next slot first.
        let next = self.cursor;
        self.cursor += 1;
        let found = match self.metrics.get(next) {
            Some(metric) if metric.definition.key == definition.key => Some(next),
            _ => self.metrics.iter().position(|m| m.definition.key == definition.key),
        };
        let metric = match found {
            Some(index) => &mut self.metrics[index],
            None => {
                let first_capacity = if fixed_first { capacity.or(Some(raw)) } else { capacity };
                self.metrics.push(Metric::new(definition, first_capacity));
                let last = self.metrics.len() - 1;
                &mut self.metrics[last]
            }
        };
        metric.update(raw, capacity, at);
    }

    fn start_sample(&mut self) {
        self.cursor = 0;
    }

    /// `{metric_key: measurement}` as msgpack.
    fn write(&self, out: &mut Vec<u8>) {
        write_map_len(out, self.metrics.len());
        for metric in &self.metrics {
            write_str(out, metric.definition.key);
            metric.write(out);
        }
    }

    /// (metric key, raw input, capacity) per metric.
    fn raw(&self) -> impl Iterator<Item = (&'static str, f64, Option<f64>)> + '_ {
        self.metrics.iter().map(|m| (m.definition.key, m.raw, m.capacity))
    }
}

/// One kernel's metrics and whose they are.
#[derive(Debug)]
struct KernelEntry {
    kernel: Arc<KernelContainer>,
    metrics: MetricSet,
    seen: Instant,
    /// Whether it had stopped at its last measurement (its numbers are then final).
    stopped: bool,
}

/// Milliseconds of a nanosecond count.
fn ms_of_ns(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Every kernel's and the node's metrics, kept across snapshots.
#[derive(Debug, Default)]
pub struct Measurements {
    /// By kernel id (a fast hash: looked up for every kernel on every pass).
    kernels: rustc_hash::FxHashMap<String, KernelEntry>,
    node: MetricSet,
    /// Per metric key and device id.
    devices: Vec<(&'static str, Vec<(String, MetricSet)>)>,
    /// When the latest snapshot was fed.
    latest: Option<Instant>,
}

impl Measurements {
    /// Feeds a snapshot taken now.
    pub fn update(&mut self, snapshot: &MonitorSnapshot) {
        self.update_at(snapshot, Instant::now());
    }

    /// Feeds a snapshot taken at `at`. Kernels are measured at the passes that read the node
    /// (every `monitor.stats-interval`, what the manager and the utilization gauges look at);
    /// in between only a kernel that just stopped is, so that its final numbers are there at
    /// once (`destroy_kernel` returns them).
    pub fn update_at(&mut self, snapshot: &MonitorSnapshot, at: Instant) {
        // Per container, its use of the node's accelerators.
        let mut accelerator_use: rustc_hash::FxHashMap<&str, Vec<&crate::monitor::accel::KernelDeviceUse>> =
            rustc_hash::FxHashMap::default();
        for used in &snapshot.accelerator_use {
            accelerator_use.entry(used.kernel.container_id.as_str()).or_default().push(used);
        }
        for sample in &snapshot.containers {
            let stopped = sample.cgroup_id.is_none();
            if !(snapshot.node_fresh || stopped) {
                continue;
            }
            let entry = match self.kernels.get_mut(sample.kernel.kernel_id.as_str()) {
                Some(entry) if !snapshot.node_fresh && entry.stopped => continue,
                Some(entry) => entry,
                None => self.kernels.entry(sample.kernel.kernel_id.clone()).or_insert_with(|| KernelEntry {
                    kernel: sample.kernel.clone(),
                    metrics: MetricSet::default(),
                    seen: at,
                    stopped,
                }),
            };
            entry.seen = at;
            entry.stopped = stopped;
            if !Arc::ptr_eq(&entry.kernel, &sample.kernel) {
                entry.kernel = sample.kernel.clone();
            }
            let (set, r) = (&mut entry.metrics, &sample.readings);
            set.start_sample();
            let cpu_ms = ms_of_ns(r.counters.cpu_ns);
            set.update(CPU_UTIL, cpu_ms, Some(ONE_CORE_MS), true, at);
            set.update(CPU_USED, cpu_ms, None, true, at);
            set.update(MEM, r.memory.working_set as f64, r.memory.limit.map(|l| l as f64), true, at);
            set.update(IO_READ, r.counters.io_read_bytes as f64, None, true, at);
            set.update(IO_WRITE, r.counters.io_write_bytes as f64, None, true, at);
            set.update(NET_RX, r.counters.rx_bytes as f64, None, true, at);
            set.update(NET_TX, r.counters.tx_bytes as f64, None, true, at);
            // On a node with accelerators every kernel has their metrics (0 while its
            // processes use none; a stopped kernel's processes use none).
            let uses = match (stopped, accelerator_use.get(sample.kernel.container_id.as_str())) {
                (false, Some(uses)) => uses.as_slice(),
                _ => &[],
            };
            for readings in &snapshot.devices {
                let (util_def, mem_def) = accelerator_definitions(readings.plugin);
                let (util, util_capacity, mem, mem_capacity) =
                    kernel_accelerator_measure(readings, uses, &sample.kernel.accelerator_devices);
                set.update(util_def, util, Some(util_capacity), false, at);
                set.update(mem_def, mem, Some(mem_capacity), false, at);
            }
        }
        if !snapshot.node_fresh {
            return;
        }
        self.kernels.retain(|_, entry| at.duration_since(entry.seen) < KERNEL_RETENTION);
        self.update_node(snapshot, at);
        self.latest = Some(at);
    }

    fn device(&mut self, key: &'static str, device: &str) -> &mut MetricSet {
        let index = match self.devices.iter().position(|(k, _)| *k == key) {
            Some(index) => index,
            None => {
                self.devices.push((key, Vec::new()));
                self.devices.len() - 1
            }
        };
        let per_device = &mut self.devices[index].1;
        let index = match per_device.iter().position(|(id, _)| id == device) {
            Some(index) => index,
            None => {
                per_device.push((device.to_owned(), MetricSet::default()));
                per_device.len() - 1
            }
        };
        &mut per_device[index].1
    }

    fn update_node(&mut self, snapshot: &MonitorSnapshot, at: Instant) {
        let node = &snapshot.node;
        // The node's (and each core's) CPU capacity is the wall time since the last sample,
        // as in the Python agent, so the node's pct reaches 100 per busy core.
        let wall_ms = self
            .node
            .metrics
            .iter()
            .find(|m| m.definition.key == "cpu_util")
            .and_then(|m| m.inputs.newer)
            .map_or(0.0, |(_, t)| at.duration_since(t).as_secs_f64() * 1000.0);
        let total_busy: u64 = node.cores.iter().map(|c| c.busy_ns).sum();
        self.node.update(NODE_CPU_UTIL, ms_of_ns(total_busy), Some(wall_ms), false, at);
        for core in &node.cores {
            self.device("cpu_util", &core.core.to_string()).update(
                NODE_CPU_UTIL,
                ms_of_ns(core.busy_ns),
                Some(wall_ms),
                false,
                at,
            );
        }
        let mem_used = node.mem_used_bytes() as f64;
        let mem_total = Some(node.mem_total_bytes as f64);
        self.node.update(MEM, mem_used, mem_total, false, at);
        self.device("mem", "root").update(MEM, mem_used, mem_total, false, at);
        let disk_used: u64 = node.disks.iter().map(|d| d.used_bytes).sum();
        let disk_total: u64 = node.disks.iter().map(|d| d.total_bytes).sum();
        self.node.update(DISK, disk_used as f64, Some(disk_total as f64), false, at);
        for disk in &node.disks {
            self.device("disk", &disk.device).update(
                DISK,
                disk.used_bytes as f64,
                Some(disk.total_bytes as f64),
                false,
                at,
            );
        }
        for (definition, bytes) in [(NET_RX, node.net_rx_bytes), (NET_TX, node.net_tx_bytes)] {
            self.node.update(definition, bytes as f64, None, false, at);
            self.device(definition.key, "node").update(definition, bytes as f64, None, false, at);
        }
        let accelerators: Vec<_> = snapshot.devices.iter().flat_map(|plugin| plugin.devices.iter()).collect();
        if !accelerators.is_empty() {
            let mem_used: u64 = accelerators.iter().map(|d| d.mem_used_bytes).sum();
            let mem_total: u64 = accelerators.iter().map(|d| d.mem_total_bytes).sum();
            let util: u64 = accelerators.iter().map(|d| u64::from(d.utilization_pct)).sum();
            self.node.update(CUDA_MEM, mem_used as f64, Some(mem_total as f64), false, at);
            self.node.update(CUDA_UTIL, util as f64, Some(100.0 * accelerators.len() as f64), false, at);
            for device in &accelerators {
                let (mem_used, mem_total) = (device.mem_used_bytes as f64, device.mem_total_bytes as f64);
                self.device("cuda_mem", &device.id).update(CUDA_MEM, mem_used, Some(mem_total), false, at);
                let util = f64::from(device.utilization_pct);
                self.device("cuda_util", &device.id).update(CUDA_UTIL, util, Some(100.0), false, at);
            }
        }
    }

    /// Every kernel of the latest snapshot with its `{metric_key: measurement}` in msgpack,
    /// what the manager reads from Redis under the kernel id.
    pub fn latest_kernels(&self) -> Vec<(&str, Vec<u8>)> {
        self.kernels
            .iter()
            .filter(|(_, entry)| Some(entry.seen) == self.latest)
            .map(|(kernel_id, entry)| {
                let mut out = Vec::with_capacity(512);
                entry.metrics.write(&mut out);
                (kernel_id.as_str(), out)
            })
            .collect()
    }

    /// The node's `{"node": {...}, "devices": {metric_key: {device_id: measurement}}}` in
    /// msgpack, what the manager reads under the agent id.
    pub fn node(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        write_map_len(&mut out, 2);
        write_str(&mut out, "node");
        self.node.write(&mut out);
        write_str(&mut out, "devices");
        write_map_len(&mut out, self.devices.len());
        for (key, per_device) in &self.devices {
            write_str(&mut out, key);
            let measured: Vec<_> = per_device.iter().filter_map(|(id, set)| Some((id, set.metrics.first()?))).collect();
            write_map_len(&mut out, measured.len());
            for (id, metric) in measured {
                write_str(&mut out, id);
                metric.write(&mut out);
            }
        }
        out
    }

    /// The last measurements of a kernel seen in the last [`KERNEL_RETENTION`], as a value
    /// (what `destroy_kernel` returns).
    pub fn kernel(&self, kernel_id: &str) -> Option<Value> {
        let entry = self.kernels.get(kernel_id)?;
        let mut out = Vec::with_capacity(512);
        entry.metrics.write(&mut out);
        rmpv::decode::read_value(&mut out.as_slice()).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ContainerUtilizationLabels {
    container_metric_name: &'static str,
    agent_id: String,
    kernel_id: String,
    session_id: String,
    user_id: String,
    project_id: String,
    value_type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeviceUtilizationLabels {
    device_metric_name: &'static str,
    agent_id: String,
    device_id: String,
    value_type: &'static str,
}

/// `backendai_container_utilization` and `backendai_device_utilization`, as the Python
/// agent exports them: the raw inputs (cumulative where the input is), as `current`, and
/// the capacity.
#[derive(Debug)]
pub struct UtilizationCollector {
    pub state: Arc<MetricsState>,
    pub agent_id: String,
}

impl Collector for UtilizationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.state.with_measurements(|measurements| {
            let mut family = encoder.encode_descriptor(
                "backendai_container_utilization",
                "Backend.AI's per-kernel measurements: the raw input (current) and its capacity.",
                None,
                MetricType::Gauge,
            )?;
            for entry in measurements.kernels.values().filter(|entry| Some(entry.seen) == measurements.latest) {
                let kernel = &entry.kernel;
                for (key, raw, capacity) in entry.metrics.raw() {
                    for (value_type, value) in [("current", Some(raw)), ("capacity", capacity)] {
                        let Some(value) = value else { continue };
                        let labels = ContainerUtilizationLabels {
                            container_metric_name: key,
                            agent_id: self.agent_id.clone(),
                            kernel_id: kernel.kernel_id.clone(),
                            session_id: kernel.session_id.clone(),
                            user_id: kernel.owner_user_id.clone(),
                            project_id: kernel.owner_project_id.clone(),
                            value_type,
                        };
                        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
            let mut family = encoder.encode_descriptor(
                "backendai_device_utilization",
                "Backend.AI's per-device measurements of the node: the raw input (current) and its capacity.",
                None,
                MetricType::Gauge,
            )?;
            for (key, per_device) in &measurements.devices {
                for (device, set) in per_device {
                    for (_, raw, capacity) in set.raw() {
                        for (value_type, value) in [("current", Some(raw)), ("capacity", capacity)] {
                            let Some(value) = value else { continue };
                            let labels = DeviceUtilizationLabels {
                                device_metric_name: key,
                                agent_id: self.agent_id.clone(),
                                device_id: device.clone(),
                                value_type,
                            };
                            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use agent_common::CgroupCounters;

    use super::*;
    use crate::{
        metrics::{ContainerSample, test_support::kernel},
        monitor::{ContainerReadings, MemoryStats},
    };

    #[test]
    fn numbers_are_formatted_as_backend_ai_does() {
        assert_eq!(format_number(1234.5, 3), "1234.5");
        assert_eq!(format_number(1073741824.0, 3), "1073741824");
        assert_eq!(format_number(50.0, 2), "50");
        assert_eq!(format_number(0.0351, 2), "0.04");
        assert_eq!(format_number(12.3456, 3), "12.346");
        assert_eq!(format_number(0.0, 3), "0");
        assert_eq!(format_number(-0.0001, 3), "0");
        assert_eq!(format_number(f64::NAN, 3), "0");
        assert_eq!(format_number(9_007_199_254.740_991, 3), "9007199254.741");
        assert_eq!(format_number(-2.5, 3), "-2.5");
        assert_eq!(format_number(100.0, 2), "100");
        assert_eq!(format_number(0.5, 0), "0");
        assert_eq!(format_number(1e30, 3), format_number(1e30, 3), "huge values do not panic");
        // Past what u64 holds once scaled: the 128-bit path gives the same digits.
        assert_eq!(format_number(1e17, 3), "100000000000000000");
        assert_eq!(format_number(-123_456_789_012_345_678.0, 3), "-123456789012345683.968");
        assert_eq!(format_number(18_446_744_073_709_551.0, 3), "18446744073709551.616");
        assert_eq!(format_number(18_446_744_073_709.5, 3), "18446744073709.5");
    }

    fn sample(cpu_ns: u64, rx: u64, working_set: u64) -> MonitorSnapshot {
        let readings = ContainerReadings {
            counters: CgroupCounters { cpu_ns, rx_bytes: rx, io_read_bytes: 4096, ..CgroupCounters::default() },
            memory: MemoryStats { working_set, limit: Some(1 << 30), ..MemoryStats::default() },
            ..ContainerReadings::default()
        };
        MonitorSnapshot {
            containers: vec![ContainerSample {
                kernel: kernel("a"),
                readings,
                cgroup_id: Some(1),
                run: Default::default(),
            }],
            ..MonitorSnapshot::default()
        }
    }

    fn get<'a>(value: &'a Value, key: &str) -> &'a Value {
        value
            .as_map()
            .and_then(|entries| entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v))
            .unwrap_or_else(|| panic!("no {key} in {value}"))
    }

    fn text<'a>(value: &'a Value, key: &str) -> &'a str {
        get(value, key).as_str().unwrap_or_else(|| panic!("{key} is not a string in {value}"))
    }

    fn keys(value: &Value) -> Vec<&str> {
        value.as_map().expect("a map").iter().filter_map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn kernel_metrics_have_backend_ai_keys_and_rates() {
        let mut measurements = Measurements::default();
        let t0 = Instant::now();
        measurements.update_at(&sample(0, 0, 1 << 29), t0);
        // Half a core for two seconds, 2000 bytes/s in.
        measurements.update_at(&sample(1_000_000_000, 4000, 1 << 28), t0 + Duration::from_secs(2));
        let latest = measurements.latest_kernels();
        assert_eq!(latest.len(), 1);
        let (kernel_id, bytes) = &latest[0];
        assert_eq!(*kernel_id, "k-a");
        let value = rmpv::decode::read_value(&mut bytes.as_slice()).expect("msgpack");
        assert_eq!(keys(&value), ["cpu_util", "cpu_used", "mem", "io_read", "io_write", "net_rx", "net_tx"]);
        let cpu = get(&value, "cpu_util");
        assert_eq!(keys(cpu), ["current", "capacity", "pct", "unit_hint", "stats.avg", "stats.max"]);
        assert_eq!((text(cpu, "current"), text(cpu, "capacity"), text(cpu, "pct")), ("500", "1000", "50"));
        assert_eq!((text(cpu, "stats.avg"), text(cpu, "stats.max"), text(cpu, "unit_hint")), ("500", "500", "percent"));
        assert_eq!(text(get(&value, "cpu_used"), "current"), "1000");
        let mem = get(&value, "mem");
        assert_eq!((text(mem, "current"), text(mem, "capacity"), text(mem, "pct")), ("268435456", "1073741824", "25"));
        assert_eq!(text(mem, "stats.max"), "536870912");
        assert_eq!(text(get(&value, "net_rx"), "current"), "2000");
        assert_eq!(text(get(&value, "io_read"), "stats.rate"), "0");
        // No capacity of its own: the first value (0) is the capacity, so pct is "0.00".
        let io_write = get(&value, "io_write");
        assert_eq!((text(io_write, "capacity"), text(io_write, "pct")), ("0", "0.00"));
        // The Prometheus gauge gets the raw cumulative input.
        let raw: Vec<_> = measurements.kernels["k-a"].metrics.raw().collect();
        assert!(raw.contains(&("cpu_util", 1000.0, Some(1000.0))), "{raw:?}");
        assert_eq!(measurements.kernel("k-a"), Some(value));
        assert!(measurements.kernel("k-b").is_none());
        // A kernel missing from the next snapshot is no longer written, but still known.
        measurements.update_at(&MonitorSnapshot::default(), t0 + Duration::from_secs(3));
        assert!(measurements.latest_kernels().is_empty());
        assert!(measurements.kernel("k-a").is_some());
    }

    /// Kernels `a` (busy on device 0 when `util` is given) and `b` (idle) on a node with two
    /// 1000-byte CUDA devices.
    fn gpu_sample(util: Option<u32>) -> MonitorSnapshot {
        use crate::{
            monitor::accel::KernelDeviceUse,
            resources::compute::{DeviceMeasure, DeviceReadings},
        };
        let device = |id: &str| DeviceMeasure { id: id.into(), mem_total_bytes: 1000, ..DeviceMeasure::default() };
        let mut snapshot = sample(0, 0, 1);
        let mut b = snapshot.containers[0].clone();
        b.kernel = kernel("b");
        snapshot.containers.push(b);
        snapshot.devices = vec![DeviceReadings { plugin: "cuda", devices: vec![device("0"), device("1")] }];
        snapshot.accelerator_use = util
            .map(|util| KernelDeviceUse {
                kernel: kernel("a"),
                plugin: "cuda",
                device_id: "0".into(),
                mem_used_bytes: 100,
                utilization_pct: util,
                processes: 1,
            })
            .into_iter()
            .collect();
        snapshot
    }

    #[test]
    fn a_kernel_given_devices_is_measured_against_all_of_them() {
        use crate::{
            monitor::accel::KernelDeviceUse,
            resources::compute::{DeviceMeasure, DeviceReadings},
        };
        let device = |id: &str| DeviceMeasure { id: id.into(), mem_total_bytes: 1000, ..DeviceMeasure::default() };
        let readings = DeviceReadings { plugin: "cuda", devices: vec![device("0"), device("1")] };
        let used = KernelDeviceUse {
            kernel: kernel("a"),
            plugin: "cuda",
            device_id: "0".into(),
            mem_used_bytes: 100,
            utilization_pct: 100,
            processes: 1,
        };
        let given = [("cuda".to_owned(), "0".to_owned()), ("cuda".to_owned(), "1".to_owned())];
        // Two devices given, one busy: half of what it has, as Backend.AI's plugins count.
        assert_eq!(kernel_accelerator_measure(&readings, &[&used], &given), (100.0, 200.0, 100.0, 2000.0));
        assert_eq!(kernel_accelerator_measure(&readings, &[], &given), (0.0, 200.0, 0.0, 2000.0), "idle");
        // Given none (a kernel the agent did not give devices): the devices its processes use.
        assert_eq!(kernel_accelerator_measure(&readings, &[&used], &[]), (100.0, 100.0, 100.0, 1000.0));
        let other = [("rocm".to_owned(), "0".to_owned())];
        assert_eq!(kernel_accelerator_measure(&readings, &[], &other), (0.0, 0.0, 0.0, 0.0), "another plugin's");
    }

    #[test]
    fn a_kernels_accelerator_use_is_its_processes_on_the_devices_they_use() {
        let mut measurements = Measurements::default();
        let t0 = Instant::now();
        measurements.update_at(&gpu_sample(Some(70)), t0);
        let a = measurements.kernel("k-a").expect("a");
        let (util, mem) = (get(&a, "cuda_util"), get(&a, "cuda_mem"));
        assert_eq!((text(util, "current"), text(util, "capacity"), text(util, "pct")), ("70", "100", "70"));
        assert_eq!((text(mem, "current"), text(mem, "capacity"), text(mem, "pct")), ("100", "1000", "10"));
        assert_eq!((text(util, "unit_hint"), text(mem, "unit_hint")), ("percent", "bytes"));
        let b = measurements.kernel("k-b").expect("b");
        let util = get(&b, "cuda_util");
        assert_eq!((text(util, "current"), text(util, "capacity"), text(util, "pct")), ("0", "0", "0.00"));
        // The process ended: nothing counts any more, and the statistics remember it.
        measurements.update_at(&gpu_sample(None), t0 + Duration::from_secs(1));
        let a = measurements.kernel("k-a").expect("a");
        let util = get(&a, "cuda_util");
        assert_eq!((text(util, "current"), text(util, "stats.max"), text(util, "stats.avg")), ("0", "70", "35"));
        // Without accelerators on the node there are no such metrics.
        let mut plain = Measurements::default();
        plain.update_at(&sample(0, 0, 1), t0);
        assert!(!keys(&plain.kernel("k-a").expect("a")).contains(&"cuda_util"));
    }

    #[test]
    fn kernels_are_measured_every_stats_interval_and_once_more_when_they_stop() {
        let mut measurements = Measurements::default();
        let t0 = Instant::now();
        let cpu_used =
            |m: &Measurements| text(get(&m.kernel("k-a").expect("measured"), "cpu_used"), "current").to_owned();
        let between = |mut snapshot: MonitorSnapshot| {
            snapshot.node_fresh = false;
            snapshot
        };
        measurements.update_at(&sample(0, 0, 1), t0);
        // A pass that does not read the node leaves a running kernel's numbers alone.
        measurements.update_at(&between(sample(1_000_000, 0, 1)), t0 + Duration::from_secs(1));
        assert_eq!(cpu_used(&measurements), "0");
        measurements.update_at(&sample(2_000_000, 0, 1), t0 + Duration::from_secs(2));
        assert_eq!(cpu_used(&measurements), "2");
        // A kernel that stopped is measured at once, its final numbers, and then left alone.
        let mut stopped = between(sample(3_000_000, 0, 1));
        stopped.containers[0].cgroup_id = None;
        measurements.update_at(&stopped, t0 + Duration::from_secs(3));
        assert_eq!(cpu_used(&measurements), "3");
        stopped.containers[0].readings.counters.cpu_ns = 9_000_000;
        measurements.update_at(&stopped, t0 + Duration::from_secs(4));
        assert_eq!(cpu_used(&measurements), "3");
    }

    #[test]
    fn node_metrics_cover_cpu_memory_disk_and_network() {
        use crate::monitor::node::{CoreTime, DiskSpace, NodeReadings};
        let node = |busy_ms: u64, rx: u64| NodeReadings {
            cores: vec![CoreTime { core: 0, busy_ns: busy_ms * 1_000_000, idle_ns: 0 }],
            mem_total_bytes: 1000,
            mem_available_bytes: 250,
            net_rx_bytes: rx,
            net_tx_bytes: 0,
            disks: vec![DiskSpace {
                mount_point: "/".into(),
                device: "/dev/vda".into(),
                total_bytes: 100,
                used_bytes: 40,
            }],
            disk_io: Vec::new(),
        };
        let mut measurements = Measurements::default();
        let t0 = Instant::now();
        measurements.update_at(&MonitorSnapshot { node: node(0, 0), ..MonitorSnapshot::default() }, t0);
        measurements.update_at(
            &MonitorSnapshot { node: node(500, 1000), ..MonitorSnapshot::default() },
            t0 + Duration::from_secs(1),
        );
        let value = rmpv::decode::read_value(&mut measurements.node().as_slice()).expect("msgpack");
        let node = get(&value, "node");
        assert_eq!((text(get(node, "cpu_util"), "current"), text(get(node, "cpu_util"), "pct")), ("500", "50"));
        assert_eq!((text(get(node, "mem"), "current"), text(get(node, "mem"), "pct")), ("750", "75"));
        assert_eq!(text(get(node, "disk"), "current"), "40");
        assert_eq!(text(get(node, "net_rx"), "current"), "1000");
        assert_eq!(get(get(node, "net_rx"), "capacity"), &Value::Nil);
        let devices = get(&value, "devices");
        assert_eq!(keys(devices), ["cpu_util", "mem", "disk", "net_rx", "net_tx"]);
        assert_eq!(text(get(get(devices, "cpu_util"), "0"), "unit_hint"), "msec");
        assert_eq!(text(get(get(devices, "mem"), "root"), "capacity"), "1000");
    }
}
