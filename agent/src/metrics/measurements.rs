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

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};
use rmpv::Value;
use rust_decimal::{Decimal, RoundingStrategy, prelude::ToPrimitive};

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

/// A kernel's `cpu_util` capacity: 1000 ms of CPU per second, one core (as Backend.AI).
const ONE_CORE_MS: Decimal = Decimal::from_parts(1000, 0, 0, false, 0);

/// The moving statistics of one metric.
#[derive(Debug, Clone, Default)]
struct MovingStats {
    min: Option<Decimal>,
    max: Option<Decimal>,
    sum: Decimal,
    count: u64,
    /// The last two (input, time) points, newest last.
    last: Vec<(Decimal, Instant)>,
}

impl MovingStats {
    fn push_point(&mut self, input: Decimal, at: Instant) {
        if self.last.len() == 2 {
            self.last.remove(0);
        }
        self.last.push((input, at));
    }

    fn observe(&mut self, value: Decimal) {
        self.min = Some(self.min.map_or(value, |m| m.min(value)));
        self.max = Some(self.max.map_or(value, |m| m.max(value)));
        self.sum += value;
        self.count += 1;
    }

    /// Change between the last two points; 0 for fewer points or a counter reset.
    fn diff(&self) -> Decimal {
        match self.last.as_slice() {
            [(older, _), (newer, _)] if newer >= older => newer - older,
            _ => Decimal::ZERO,
        }
    }

    /// The diff per second.
    fn rate(&self) -> Decimal {
        match self.last.as_slice() {
            [(_, t0), (_, t1)] => {
                let seconds = Decimal::from_f64_retain(t1.duration_since(*t0).as_secs_f64()).unwrap_or_default();
                if seconds.is_zero() { Decimal::ZERO } else { self.diff() / seconds }
            }
            _ => Decimal::ZERO,
        }
    }

    fn avg(&self) -> Decimal {
        if self.count == 0 { Decimal::ZERO } else { self.sum / Decimal::from(self.count) }
    }

    fn get(&self, name: &str) -> Decimal {
        match name {
            "min" => self.min.unwrap_or_default(),
            "max" => self.max.unwrap_or_default(),
            "sum" => self.sum,
            "avg" => self.avg(),
            "diff" => self.diff(),
            "rate" => self.rate(),
            _ => Decimal::ZERO,
        }
    }
}

/// One metric of one kernel (or of the node, or of a device) across samples.
#[derive(Debug, Clone)]
struct Metric {
    definition: Definition,
    capacity: Option<Decimal>,
    /// The latest raw input (what the Prometheus utilization gauges export).
    raw: Decimal,
    current: Decimal,
    /// Points of the raw input, for rate and diff.
    inputs: MovingStats,
    /// Statistics of `current`.
    stats: MovingStats,
}

impl Metric {
    fn new(definition: Definition, capacity: Option<Decimal>) -> Metric {
        Metric {
            definition,
            capacity,
            raw: Decimal::ZERO,
            current: Decimal::ZERO,
            inputs: MovingStats::default(),
            stats: MovingStats::default(),
        }
    }

    fn update(&mut self, raw: Decimal, capacity: Option<Decimal>, at: Instant) {
        if capacity.is_some() {
            self.capacity = capacity;
        }
        self.raw = raw;
        self.inputs.push_point(raw, at);
        self.current = match self.definition.current {
            Current::Raw => raw,
            Current::Rate => self.inputs.rate(),
            Current::Diff => self.inputs.diff(),
        };
        // For rate and diff metrics the first sample has nothing to compare with yet.
        // A rate or diff needs two samples: the first one has none yet and is left out.
        if self.definition.current == Current::Raw || self.inputs.last.len() == 2 {
            self.stats.observe(self.current);
        }
    }

    fn value(&self) -> MetricValue {
        let pct = match self.capacity {
            Some(capacity) if capacity > Decimal::ZERO => {
                format_decimal(self.current / capacity * Decimal::ONE_HUNDRED, 2)
            }
            _ => "0.00".to_owned(),
        };
        MetricValue {
            key: self.definition.key,
            current: format_decimal(self.current, 3),
            capacity: self.capacity.map(|c| format_decimal(c, 3)),
            pct,
            unit_hint: self.definition.unit_hint,
            stats: self
                .definition
                .stats
                .iter()
                .map(|&name| {
                    // A raw metric's rate is of its input; the rest are statistics of current.
                    let value =
                        if name == "rate" || name == "diff" { self.inputs.get(name) } else { self.stats.get(name) };
                    (name, format_decimal(value, 3))
                })
                .collect(),
        }
    }
}

/// Backend.AI's number format: rounded half-even to `places`, trailing zeros dropped.
pub fn format_decimal(value: Decimal, places: u32) -> String {
    value.round_dp_with_strategy(places, RoundingStrategy::MidpointNearestEven).normalize().to_string()
}

/// One metric's serialisable value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricValue {
    pub key: &'static str,
    pub current: String,
    pub capacity: Option<String>,
    pub pct: String,
    pub unit_hint: &'static str,
    pub stats: Vec<(&'static str, String)>,
}

impl MetricValue {
    /// `{"current", "capacity", "pct", "unit_hint", "stats.<name>"…}`.
    pub fn to_value(&self) -> Value {
        let mut entries = vec![
            (Value::from("current"), Value::from(self.current.as_str())),
            (Value::from("capacity"), self.capacity.as_deref().map_or(Value::Nil, Value::from)),
            (Value::from("pct"), Value::from(self.pct.as_str())),
            (Value::from("unit_hint"), Value::from(self.unit_hint)),
        ];
        for (name, value) in &self.stats {
            entries.push((Value::from(format!("stats.{name}")), Value::from(value.as_str())));
        }
        Value::Map(entries)
    }
}

/// A kernel's metrics at one sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelMeasurements {
    pub values: Vec<MetricValue>,
    /// (metric key, raw input, capacity) for the Prometheus gauges.
    pub raw: Vec<(&'static str, f64, Option<f64>)>,
}

impl KernelMeasurements {
    /// `{metric_key: measurement}`, what the manager reads from Redis under the kernel id.
    pub fn to_value(&self) -> Value {
        Value::Map(self.values.iter().map(|v| (Value::from(v.key), v.to_value())).collect())
    }

    pub fn get(&self, key: &str) -> Option<&MetricValue> {
        self.values.iter().find(|v| v.key == key)
    }
}

/// The node's metrics and, per metric key, its devices' (`"0"`, `"root"`, `"/dev/vda"`, …).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeMeasurements {
    pub node: Vec<MetricValue>,
    pub devices: Vec<(&'static str, Vec<(String, MetricValue)>)>,
    /// (metric key, device id, raw, capacity) of device metrics, for Prometheus.
    pub raw_devices: Vec<(&'static str, String, f64, Option<f64>)>,
}

impl NodeMeasurements {
    /// `{"node": {...}, "devices": {...}}`, what the manager reads under the agent id.
    pub fn to_value(&self) -> Value {
        let node = Value::Map(self.node.iter().map(|v| (Value::from(v.key), v.to_value())).collect());
        let devices = Value::Map(
            self.devices
                .iter()
                .map(|(key, per_device)| {
                    let inner = per_device.iter().map(|(id, v)| (Value::from(id.as_str()), v.to_value())).collect();
                    (Value::from(*key), Value::Map(inner))
                })
                .collect(),
        );
        Value::Map(vec![(Value::from("node"), node), (Value::from("devices"), devices)])
    }
}

/// The measurements of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct MeasuredSnapshot {
    pub kernels: Vec<(Arc<KernelContainer>, KernelMeasurements)>,
    pub node: NodeMeasurements,
}

/// A metric set that keeps its metrics' history across samples.
#[derive(Debug, Clone, Default)]
struct MetricSet {
    metrics: Vec<Metric>,
}

impl MetricSet {
    /// Feeds one input; the first time, `capacity` (or the input itself) becomes its capacity.
    fn update(
        &mut self,
        definition: Definition,
        raw: Decimal,
        capacity: Option<Decimal>,
        fixed_first: bool,
        at: Instant,
    ) {
        let metric = match self.metrics.iter_mut().position(|m| m.definition.key == definition.key) {
            Some(index) => &mut self.metrics[index],
            None => {
                let first_capacity = if fixed_first { capacity.or(Some(raw)) } else { capacity };
                self.metrics.push(Metric::new(definition, first_capacity));
                self.metrics.last_mut().expect("just pushed")
            }
        };
        metric.update(raw, capacity, at);
    }

    fn values(&self) -> Vec<MetricValue> {
        self.metrics.iter().map(Metric::value).collect()
    }

    fn raw(&self) -> Vec<(&'static str, f64, Option<f64>)> {
        self.metrics
            .iter()
            .map(|m| (m.definition.key, m.raw.to_f64().unwrap_or(0.0), m.capacity.and_then(|c| c.to_f64())))
            .collect()
    }
}

fn decimal(value: u64) -> Decimal {
    Decimal::from(value)
}

/// Milliseconds, to 3 decimals, of a nanosecond count.
fn ms_of_ns(ns: u64) -> Decimal {
    Decimal::from(ns) / Decimal::from(1_000_000u64)
}

/// Every kernel's and the node's metrics, kept across snapshots.
#[derive(Debug, Default)]
pub struct Measurements {
    kernels: HashMap<String, (MetricSet, Instant)>,
    node: MetricSet,
    /// Per metric key and device id.
    devices: Vec<(&'static str, Vec<(String, MetricSet)>)>,
}

impl Measurements {
    /// Feeds a snapshot and returns what it measures.
    pub fn update(&mut self, snapshot: &MonitorSnapshot) -> MeasuredSnapshot {
        self.update_at(snapshot, Instant::now())
    }

    pub fn update_at(&mut self, snapshot: &MonitorSnapshot, at: Instant) -> MeasuredSnapshot {
        let mut kernels = Vec::with_capacity(snapshot.containers.len());
        for sample in &snapshot.containers {
            let (set, seen) =
                self.kernels.entry(sample.kernel.kernel_id.clone()).or_insert_with(|| (MetricSet::default(), at));
            *seen = at;
            let r = &sample.readings;
            let cpu_ms = ms_of_ns(r.counters.cpu_ns);
            set.update(CPU_UTIL, cpu_ms, Some(ONE_CORE_MS), true, at);
            set.update(CPU_USED, cpu_ms, None, true, at);
            set.update(MEM, decimal(r.memory.working_set), r.memory.limit.map(decimal), true, at);
            set.update(IO_READ, decimal(r.counters.io_read_bytes), None, true, at);
            set.update(IO_WRITE, decimal(r.counters.io_write_bytes), None, true, at);
            set.update(NET_RX, decimal(r.counters.rx_bytes), None, true, at);
            set.update(NET_TX, decimal(r.counters.tx_bytes), None, true, at);
            kernels.push((sample.kernel.clone(), KernelMeasurements { values: set.values(), raw: set.raw() }));
        }
        self.kernels.retain(|_, (_, seen)| at.duration_since(*seen) < KERNEL_RETENTION);
        MeasuredSnapshot { kernels, node: self.update_node(snapshot, at) }
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

    fn update_node(&mut self, snapshot: &MonitorSnapshot, at: Instant) -> NodeMeasurements {
        let node = &snapshot.node;
        // The node's (and each core's) CPU capacity is the wall time since the last sample,
        // as in the Python agent, so the node's pct reaches 100 per busy core.
        let wall_ms = self
            .node
            .metrics
            .iter()
            .find(|m| m.definition.key == "cpu_util")
            .and_then(|m| m.inputs.last.last())
            .map(|(_, t)| Decimal::from_f64_retain(at.duration_since(*t).as_secs_f64() * 1000.0).unwrap_or_default())
            .unwrap_or_default();
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
        let mem_used = decimal(node.mem_used_bytes());
        let mem_total = Some(decimal(node.mem_total_bytes));
        self.node.update(MEM, mem_used, mem_total, false, at);
        self.device("mem", "root").update(MEM, mem_used, mem_total, false, at);
        let disk_used: u64 = node.disks.iter().map(|d| d.used_bytes).sum();
        let disk_total: u64 = node.disks.iter().map(|d| d.total_bytes).sum();
        self.node.update(DISK, decimal(disk_used), Some(decimal(disk_total)), false, at);
        for disk in &node.disks {
            self.device("disk", &disk.device).update(
                DISK,
                decimal(disk.used_bytes),
                Some(decimal(disk.total_bytes)),
                false,
                at,
            );
        }
        for (definition, bytes) in [(NET_RX, node.net_rx_bytes), (NET_TX, node.net_tx_bytes)] {
            self.node.update(definition, decimal(bytes), None, false, at);
            self.device(definition.key, "node").update(definition, decimal(bytes), None, false, at);
        }
        let accelerators: Vec<_> = snapshot.devices.iter().flat_map(|plugin| plugin.devices.iter()).collect();
        if !accelerators.is_empty() {
            let mem_used: u64 = accelerators.iter().map(|d| d.mem_used_bytes).sum();
            let mem_total: u64 = accelerators.iter().map(|d| d.mem_total_bytes).sum();
            let util: u64 = accelerators.iter().map(|d| u64::from(d.utilization_pct)).sum();
            self.node.update(CUDA_MEM, decimal(mem_used), Some(decimal(mem_total)), false, at);
            self.node.update(CUDA_UTIL, decimal(util), Some(decimal(100 * accelerators.len() as u64)), false, at);
            for device in &accelerators {
                self.device("cuda_mem", &device.id).update(
                    CUDA_MEM,
                    decimal(device.mem_used_bytes),
                    Some(decimal(device.mem_total_bytes)),
                    false,
                    at,
                );
                self.device("cuda_util", &device.id).update(
                    CUDA_UTIL,
                    decimal(u64::from(device.utilization_pct)),
                    Some(Decimal::ONE_HUNDRED),
                    false,
                    at,
                );
            }
        }
        NodeMeasurements {
            node: self.node.values(),
            devices: self
                .devices
                .iter()
                .map(|(key, per_device)| {
                    (*key, per_device.iter().map(|(id, set)| (id.clone(), set.values().remove(0))).collect())
                })
                .collect(),
            raw_devices: self
                .devices
                .iter()
                .flat_map(|(key, per_device)| {
                    per_device.iter().flat_map(move |(id, set)| {
                        set.raw().into_iter().map(move |(_, raw, capacity)| (*key, id.clone(), raw, capacity))
                    })
                })
                .collect(),
        }
    }

    /// The last measurements of a kernel seen in the last [`KERNEL_RETENTION`].
    pub fn last_of_kernel(&self, kernel_id: &str) -> Option<KernelMeasurements> {
        self.kernels.get(kernel_id).map(|(set, _)| KernelMeasurements { values: set.values(), raw: set.raw() })
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
        let measured = self.state.latest_measurements();
        let mut family = encoder.encode_descriptor(
            "backendai_container_utilization",
            "Backend.AI's per-kernel measurements: the raw input (current) and its capacity.",
            None,
            MetricType::Gauge,
        )?;
        for (kernel, measurements) in &measured.kernels {
            for &(key, raw, capacity) in &measurements.raw {
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
        for (key, device, raw, capacity) in &measured.node.raw_devices {
            for (value_type, value) in [("current", Some(*raw)), ("capacity", *capacity)] {
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
        Ok(())
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
        assert_eq!(format_decimal(Decimal::new(12345, 1), 3), "1234.5");
        assert_eq!(format_decimal(Decimal::from(1073741824u64), 3), "1073741824");
        assert_eq!(format_decimal(Decimal::new(50_000, 3), 2), "50");
        assert_eq!(format_decimal(Decimal::new(2_5, 3), 2), "0.02");
        assert_eq!(format_decimal(Decimal::new(3_5, 3), 2), "0.04");
        assert_eq!(format_decimal(Decimal::ZERO, 3), "0");
    }

    fn sample(cpu_ns: u64, rx: u64, working_set: u64) -> MonitorSnapshot {
        let readings = ContainerReadings {
            counters: CgroupCounters { cpu_ns, rx_bytes: rx, io_read_bytes: 4096, ..CgroupCounters::default() },
            memory: MemoryStats { working_set, limit: Some(1 << 30), ..MemoryStats::default() },
            ..ContainerReadings::default()
        };
        MonitorSnapshot {
            containers: vec![ContainerSample { kernel: kernel("a"), readings }],
            ..MonitorSnapshot::default()
        }
    }

    #[test]
    fn kernel_metrics_have_backend_ai_keys_and_rates() {
        let mut measurements = Measurements::default();
        let t0 = Instant::now();
        measurements.update_at(&sample(0, 0, 1 << 29), t0);
        // Half a core for two seconds, 2000 bytes/s in.
        let measured = measurements.update_at(&sample(1_000_000_000, 4000, 1 << 28), t0 + Duration::from_secs(2));
        let (_, kernel) = &measured.kernels[0];
        let keys: Vec<&str> = kernel.values.iter().map(|v| v.key).collect();
        assert_eq!(keys, ["cpu_util", "cpu_used", "mem", "io_read", "io_write", "net_rx", "net_tx"]);
        let cpu = kernel.get("cpu_util").expect("cpu_util");
        assert_eq!((cpu.current.as_str(), cpu.capacity.as_deref(), cpu.pct.as_str()), ("500", Some("1000"), "50"));
        assert_eq!(cpu.stats, vec![("avg", "500".to_owned()), ("max", "500".to_owned())]);
        assert_eq!(kernel.get("cpu_used").expect("cpu_used").current, "1000");
        let mem = kernel.get("mem").expect("mem");
        assert_eq!(
            (mem.current.as_str(), mem.capacity.as_deref(), mem.pct.as_str()),
            ("268435456", Some("1073741824"), "25")
        );
        assert_eq!(mem.stats, vec![("max", "536870912".to_owned())]);
        assert_eq!(kernel.get("net_rx").expect("net_rx").current, "2000");
        assert_eq!(kernel.get("io_read").expect("io_read").stats, vec![("rate", "0".to_owned())]);
        // No capacity of its own: the first value (0) is the capacity, so pct is "0.00".
        let io_write = kernel.get("io_write").expect("io_write");
        assert_eq!((io_write.capacity.as_deref(), io_write.pct.as_str()), (Some("0"), "0.00"));
        // The Prometheus gauge gets the raw cumulative input.
        assert!(kernel.raw.contains(&("cpu_util", 1000.0, Some(1000.0))), "{:?}", kernel.raw);
        assert!(measurements.last_of_kernel("k-a").is_some());
        assert!(measurements.last_of_kernel("k-b").is_none());
    }

    #[test]
    fn values_serialise_to_the_redis_shape() {
        let value = MetricValue {
            key: "mem",
            current: "10".into(),
            capacity: None,
            pct: "0.00".into(),
            unit_hint: "bytes",
            stats: vec![("max", "12".into())],
        };
        let map = value.to_value();
        let entries = map.as_map().expect("a map");
        let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["current", "capacity", "pct", "unit_hint", "stats.max"]);
        assert_eq!(entries[1].1, Value::Nil);
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
        let measured = measurements.update_at(
            &MonitorSnapshot { node: node(500, 1000), ..MonitorSnapshot::default() },
            t0 + Duration::from_secs(1),
        );
        let get = |key| measured.node.node.iter().find(|v| v.key == key).cloned().expect("present");
        assert_eq!(get("cpu_util").current, "500");
        assert_eq!(get("cpu_util").pct, "50");
        assert_eq!((get("mem").current.as_str(), get("mem").pct.as_str()), ("750", "75"));
        assert_eq!(get("disk").current, "40");
        assert_eq!(get("net_rx").current, "1000");
        assert_eq!(get("net_rx").capacity, None);
        let devices: Vec<&str> = measured.node.devices.iter().map(|(k, _)| *k).collect();
        assert_eq!(devices, ["cpu_util", "mem", "disk", "net_rx", "net_tx"]);
        let value = measured.node.to_value();
        assert_eq!(value.as_map().map(|m| m.len()), Some(2));
    }
}
