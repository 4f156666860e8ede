//! The usage record: its CloudEvents 1.0 envelope, its `data` (the billing contract), and
//! the exact decimal arithmetic behind every `*_seconds` field.
//!
//! Every quantity is counted in integers (nanoseconds, bytes, byte-nanoseconds) and turned
//! into a decimal string only when a record is written, so a kernel's records add up exactly:
//! the sum of its deltas is its total, to the last digit.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::CgroupCounters;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The CloudEvents `type` of a usage record.
pub const EVENT_TYPE: &str = "ai.backend.kernel.usage";

/// Who a kernel bills to and what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelMeta {
    pub kernel_id: String,
    pub session_id: String,
    pub owner_user_id: String,
    pub owner_project_id: String,
    pub image: String,
    /// Allocated slots as decimal strings (`{"cpu": "1", "mem": "268435456"}`).
    pub slots: BTreeMap<String, String>,
}

/// The counters a usage record reports deltas of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub cpu_ns: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

impl From<&CgroupCounters> for Counts {
    fn from(c: &CgroupCounters) -> Self {
        Counts {
            cpu_ns: c.cpu_ns,
            io_read_bytes: c.io_read_bytes,
            io_write_bytes: c.io_write_bytes,
            net_rx_bytes: c.rx_bytes,
            net_tx_bytes: c.tx_bytes,
        }
    }
}

impl Counts {
    fn fields(&self) -> [u64; 5] {
        [self.cpu_ns, self.io_read_bytes, self.io_write_bytes, self.net_rx_bytes, self.net_tx_bytes]
    }

    fn from_fields(f: [u64; 5]) -> Self {
        Counts { cpu_ns: f[0], io_read_bytes: f[1], io_write_bytes: f[2], net_rx_bytes: f[3], net_tx_bytes: f[4] }
    }

    /// Whether no field is below `other`'s (a counter that went on, not one that restarted).
    pub fn covers(&self, other: &Counts) -> bool {
        self.fields().iter().zip(other.fields()).all(|(a, b)| *a >= b)
    }

    /// Field by field `self - other`, 0 where `other` is larger.
    pub fn minus(&self, other: &Counts) -> Counts {
        let (a, b) = (self.fields(), other.fields());
        Counts::from_fields(std::array::from_fn(|i| a[i].saturating_sub(b[i])))
    }

    pub fn plus(&self, other: &Counts) -> Counts {
        let (a, b) = (self.fields(), other.fields());
        Counts::from_fields(std::array::from_fn(|i| a[i].saturating_add(b[i])))
    }
}

/// What a kernel used since it started, as the meter counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    #[serde(flatten)]
    pub counts: Counts,
    /// Memory in use integrated over time, in byte-nanoseconds (a decimal string in JSON:
    /// it outgrows 64 bits, and JSON readers lose digits past 53).
    #[serde(serialize_with = "u128_text", deserialize_with = "u128_from_text")]
    pub mem_byte_ns: u128,
    /// Per accelerator type (`cuda`): its devices' utilisation integrated over time, in
    /// percent-nanoseconds (decimal strings in JSON; absent in journals of earlier versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "u128_map_text")]
    pub accel_busy_pct_ns: BTreeMap<String, u128>,
}

impl Totals {
    /// Per accelerator type, `self - base` (0 where `base` is larger).
    pub fn accel_busy_since(&self, base: &Totals) -> BTreeMap<String, u128> {
        self.accel_busy_pct_ns
            .iter()
            .map(|(kind, now)| {
                let then = base.accel_busy_pct_ns.get(kind).copied().unwrap_or(0);
                (kind.clone(), now.saturating_sub(then))
            })
            .collect()
    }
}

mod u128_map_text {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, u128>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(map.iter().map(|(k, v)| (k, v.to_string())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, u128>, D::Error> {
        let texts = BTreeMap::<String, String>::deserialize(deserializer)?;
        texts
            .into_iter()
            .map(|(k, v)| match v.parse() {
                Ok(n) => Ok((k, n)),
                Err(_) => Err(serde::de::Error::custom(format!("{v:?} is not a whole number"))),
            })
            .collect()
    }
}

fn u128_text<S: serde::Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn u128_from_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| serde::de::Error::custom(format!("{text:?} is not a whole number")))
}

/// The `data` of a usage record. The field names are the contract billing code is written
/// against (docs/USAGE.md); amounts are the window's deltas, never running totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageData {
    pub kernel_id: String,
    pub session_id: String,
    pub owner_user_id: String,
    pub owner_project_id: String,
    pub image: String,
    /// 0, 1, 2, … per kernel.
    pub seq: u64,
    /// RFC 3339, nanoseconds, UTC. A window starts exactly where the previous one ended.
    pub window_start: String,
    pub window_end: String,
    /// Allocated slots.
    pub slots: BTreeMap<String, String>,
    /// Per slot: amount × window seconds (exact decimal strings).
    pub slot_seconds: BTreeMap<String, String>,
    pub cpu_seconds: String,
    pub mem_byte_seconds: String,
    pub mem_peak_bytes: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Per accelerator type (`cuda`): allocated devices (or shares) × window seconds.
    pub accel_device_seconds: BTreeMap<String, String>,
    /// Per accelerator type (`cuda`): Σ over the devices its processes use of utilisation/100
    /// × seconds, i.e. device-seconds of busy compute (exact decimal strings).
    #[serde(default)]
    pub accel_busy_seconds: BTreeMap<String, String>,
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Why the kernel ended; only on the final record.
    pub exit_reason: Option<String>,
}

/// A CloudEvents 1.0 event in its JSON format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    /// `{kernel_id}:{seq}`: what a consumer dedupes by.
    pub id: String,
    /// `bai-agent/{agent_id}`.
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The owner project.
    pub subject: String,
    /// When the record was made: the window's end.
    pub time: String,
    pub datacontenttype: String,
    pub data: UsageData,
}

impl CloudEvent {
    pub fn usage(agent_id: &str, data: UsageData) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".into(),
            id: format!("{}:{}", data.kernel_id, data.seq),
            source: format!("bai-agent/{agent_id}"),
            kind: EVENT_TYPE.into(),
            subject: data.owner_project_id.clone(),
            time: data.window_end.clone(),
            datacontenttype: "application/json".into(),
            data,
        }
    }
}

/// One closed window of a kernel, before it becomes [`UsageData`].
#[derive(Debug, Clone)]
pub struct Window {
    pub seq: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub counts: Counts,
    pub mem_byte_ns: u128,
    pub mem_peak_bytes: u64,
    /// Per accelerator type, utilisation × time in percent-nanoseconds.
    pub accel_busy_pct_ns: BTreeMap<String, u128>,
}

impl UsageData {
    pub fn new(meta: &KernelMeta, window: &Window, exit_reason: Option<&str>) -> UsageData {
        let seconds_ns = window.end_ns.saturating_sub(window.start_ns);
        let mut slot_seconds = BTreeMap::new();
        let mut accel_device_seconds: BTreeMap<String, Decimal> = BTreeMap::new();
        for (slot, amount) in &meta.slots {
            let Ok(amount) = amount.parse::<Decimal>() else {
                continue;
            };
            let Some(product) = times_seconds(amount, seconds_ns) else {
                continue;
            };
            slot_seconds.insert(slot.clone(), decimal_text(product));
            if let Some((device_type, kind)) = slot.split_once('.')
                && matches!(kind, "device" | "shares")
            {
                let sum = accel_device_seconds.entry(device_type.to_owned()).or_default();
                *sum = sum.checked_add(product).unwrap_or(*sum);
            }
        }
        UsageData {
            kernel_id: meta.kernel_id.clone(),
            session_id: meta.session_id.clone(),
            owner_user_id: meta.owner_user_id.clone(),
            owner_project_id: meta.owner_project_id.clone(),
            image: meta.image.clone(),
            seq: window.seq,
            window_start: rfc3339(window.start_ns),
            window_end: rfc3339(window.end_ns),
            slots: meta.slots.clone(),
            slot_seconds,
            cpu_seconds: nanos_text(u128::from(window.counts.cpu_ns)),
            mem_byte_seconds: nanos_text(window.mem_byte_ns),
            mem_peak_bytes: window.mem_peak_bytes,
            io_read_bytes: window.counts.io_read_bytes,
            io_write_bytes: window.counts.io_write_bytes,
            net_rx_bytes: window.counts.net_rx_bytes,
            net_tx_bytes: window.counts.net_tx_bytes,
            accel_device_seconds: accel_device_seconds.into_iter().map(|(k, v)| (k, decimal_text(v))).collect(),
            accel_busy_seconds: window
                .accel_busy_pct_ns
                .iter()
                .map(|(k, v)| (k.clone(), fraction_text(*v, 11)))
                .collect(),
            is_final: exit_reason.is_some(),
            exit_reason: exit_reason.map(str::to_owned),
        }
    }
}

/// `amount × nanos / 10⁹`, exactly (None past Decimal's 28 digits).
fn times_seconds(amount: Decimal, nanos: u64) -> Option<Decimal> {
    amount.checked_mul(Decimal::from_i128_with_scale(i128::from(nanos), 9))
}

/// A decimal without trailing zeros: `60`, `0.5`, `12.000000001`.
pub fn decimal_text(value: Decimal) -> String {
    value.normalize().to_string()
}

/// `nanos / 10⁹` as an exact decimal string.
pub fn nanos_text(nanos: u128) -> String {
    fraction_text(nanos, 9)
}

/// `value / 10^digits` as an exact decimal string without trailing zeros (percent-nanoseconds
/// are seconds at 11 digits).
pub fn fraction_text(value: u128, digits: u32) -> String {
    let scale = 10u128.pow(digits);
    let (whole, frac) = (value / scale, value % scale);
    if frac == 0 {
        whole.to_string()
    } else {
        let frac = format!("{frac:0width$}", width = digits as usize);
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns(time: SystemTime) -> u64 {
    u64::try_from(time.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

/// RFC 3339 in UTC with nanoseconds: `2026-12-01T12:00:00.000000000Z`.
pub fn rfc3339(unix_ns: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(unix_ns)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> KernelMeta {
        KernelMeta {
            kernel_id: "k-1".into(),
            session_id: "s-1".into(),
            owner_user_id: "u-1".into(),
            owner_project_id: "p-1".into(),
            image: "python:3.12".into(),
            slots: BTreeMap::from([
                ("cpu".to_owned(), "0.5".to_owned()),
                ("mem".to_owned(), "268435456".to_owned()),
                ("cuda.device".to_owned(), "2".to_owned()),
            ]),
        }
    }

    #[test]
    fn seconds_are_exact_decimal_strings() {
        assert_eq!(nanos_text(0), "0");
        assert_eq!(nanos_text(1), "0.000000001");
        assert_eq!(nanos_text(60_000_000_000), "60");
        assert_eq!(nanos_text(12_500_000_000), "12.5");
        assert_eq!(nanos_text(u128::from(u64::MAX) * 1_000_000), "18446744073709551.615");
        assert_eq!(fraction_text(70 * 1_000_000_000, 11), "0.7");
        assert_eq!(fraction_text(100 * 1_000_000_000, 11), "1");
        assert_eq!(fraction_text(1, 11), "0.00000000001");
        assert_eq!(rfc3339(1_764_590_400_000_000_001), "2025-12-01T12:00:00.000000001Z");
    }

    #[test]
    fn the_cloud_event_carries_the_contract_fields() {
        let window = Window {
            seq: 3,
            start_ns: 1_764_590_400_000_000_000,
            end_ns: 1_764_590_460_000_000_123,
            counts: Counts {
                cpu_ns: 1_500_000_001,
                io_read_bytes: 4096,
                io_write_bytes: 8192,
                net_rx_bytes: 10,
                net_tx_bytes: 20,
            },
            mem_byte_ns: 3 * 1_000_000_000 + 7,
            mem_peak_bytes: 1 << 20,
            // 70 % of one device for 60 s and a bit.
            accel_busy_pct_ns: BTreeMap::from([("cuda".to_owned(), 70 * 60_000_000_123)]),
        };
        let event = CloudEvent::usage("i-node", UsageData::new(&meta(), &window, None));
        let json = serde_json::to_value(&event).expect("json");
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["id"], "k-1:3");
        assert_eq!(json["source"], "bai-agent/i-node");
        assert_eq!(json["type"], "ai.backend.kernel.usage");
        assert_eq!(json["subject"], "p-1");
        assert_eq!(json["time"], "2025-12-01T12:01:00.000000123Z");
        assert_eq!(json["datacontenttype"], "application/json");
        let data = &json["data"];
        assert_eq!(data["seq"], 3);
        assert_eq!(data["window_start"], "2025-12-01T12:00:00.000000000Z");
        assert_eq!(data["slots"]["mem"], "268435456");
        assert_eq!(data["slot_seconds"]["cpu"], "30.0000000615");
        assert_eq!(data["slot_seconds"]["mem"], "16106127393.017561088");
        assert_eq!(data["accel_device_seconds"]["cuda"], "120.000000246");
        assert_eq!(data["accel_busy_seconds"]["cuda"], "42.0000000861");
        assert_eq!(data["cpu_seconds"], "1.500000001");
        assert_eq!(data["mem_byte_seconds"], "3.000000007");
        assert_eq!(data["mem_peak_bytes"], 1 << 20);
        assert_eq!(data["io_read_bytes"], 4096);
        assert_eq!(data["io_write_bytes"], 8192);
        assert_eq!(data["net_rx_bytes"], 10);
        assert_eq!(data["net_tx_bytes"], 20);
        assert_eq!(data["final"], false);
        assert!(data["exit_reason"].is_null());
        let names: Vec<&str> = data.as_object().expect("object").keys().map(String::as_str).collect();
        for field in [
            "kernel_id",
            "session_id",
            "owner_user_id",
            "owner_project_id",
            "image",
            "seq",
            "window_start",
            "window_end",
            "slots",
            "slot_seconds",
            "cpu_seconds",
            "mem_byte_seconds",
            "mem_peak_bytes",
            "io_read_bytes",
            "io_write_bytes",
            "net_rx_bytes",
            "net_tx_bytes",
            "accel_device_seconds",
            "accel_busy_seconds",
            "final",
            "exit_reason",
        ] {
            assert!(names.contains(&field), "missing {field}: {names:?}");
        }
        let last = UsageData::new(&meta(), &window, Some("user-requested"));
        assert!(last.is_final);
        assert_eq!(last.exit_reason.as_deref(), Some("user-requested"));
        let back: CloudEvent = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, event);
    }
}
