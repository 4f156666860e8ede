//! Backend.AI's event wire formats: how a journaled event (its name and Backend.AI's positional
//! arguments) becomes what goes to Redis, for the 26.9 manager or for managers up to 25.x.
//! This is the one place that knows either format.
//!
//! - **26.9** ([`EventFormat::Current`]): a stream entry with `name`, `source` (the agent id)
//!   and `payload`, the event's fields as a JSON object that the manager validates against the
//!   event's model (`ai.backend.common.events.event_types.*`, `model_validate_json`); an entry
//!   without `payload` is dropped by that manager as malformed. Events the Python agent also
//!   *broadcasts* (kernel lifecycle, session results) get a copy on the pub/sub channel
//!   (`events_all`) as the JSON `{"name", "source", "payload"}`; background-task events
//!   (`bgtask_*`) go only there, each also kept under its cache id (`bgtask.<task id>`) for a
//!   subscriber that comes late ([`Delivery`]).
//! - **≤ 25.x** ([`EventFormat::Legacy`]): a stream entry with `name`, `source` and `args`, the
//!   msgpack array that the manager's event classes `deserialize` positionally; nothing is
//!   broadcast.
//!
//! Events are emitted and journaled in the positional form; the translation happens at
//! delivery, so a journal written under one format is delivered in the configured one.

use rmpv::Value;
use serde_json::{Map, Value as Json, json};

use crate::msgpack_json::to_json;

pub use crate::config::EventFormat;

/// Why an event could not be put in the 26.9 format.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("event `{name}`: no 26.9 form is known for this event")]
    UnknownEvent { name: String },
    #[error("event `{name}`: argument {index} ({what}) is missing or not {expected}")]
    Argument { name: String, index: usize, what: &'static str, expected: &'static str },
    #[error("event `{name}`: the arguments are not valid msgpack: {reason}")]
    Msgpack { name: String, reason: String },
}

/// What goes to Redis for one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The last field of the stream entry (after `name` and `source`, which every format has):
    /// `payload` (26.9) or `args` (≤ 25.x); `None` for an event that is not a stream entry.
    pub stream_field: Option<(&'static str, Vec<u8>)>,
    /// The pub/sub copy (26.9 only).
    pub broadcast: Option<Broadcast>,
}

/// An event published on the broadcast channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    /// The event's fields as JSON (the same text as the stream entry's `payload`).
    pub payload: String,
    /// Kept under this key too (`SET … EX`), for subscribers that come after the publish.
    pub cache_id: Option<String>,
}

impl Broadcast {
    /// The channel message: `{"name", "source", "payload"}`, as Backend.AI's
    /// `BroadcastMessagePayload.to_json` writes it.
    pub fn message(&self, name: &str, source: &str) -> String {
        json!({ "name": name, "source": source, "payload": self.payload }).to_string()
    }
}

/// How long a cached broadcast lives (Backend.AI's broadcaster: 300 s).
pub const BROADCAST_CACHE_TTL_SECS: u64 = 300;

/// How the event named `name` with the msgpack arguments `args` goes to Redis in `format`;
/// `None` for an event that this format does not carry (26.9 has no `kernel_pull_progress`).
pub fn delivery(format: EventFormat, name: &str, args: &[u8]) -> Result<Option<Delivery>, WireError> {
    match format {
        EventFormat::Legacy => Ok(Some(Delivery { stream_field: Some(("args", args.to_vec())), broadcast: None })),
        EventFormat::Current if NOT_IN_26_9.contains(&name) => Ok(None),
        EventFormat::Current => {
            let values = decode_args(name, args)?;
            let payload = payload_json(name, &values)?.to_string();
            let pattern = pattern(name);
            let broadcast = pattern.broadcast.then(|| Broadcast {
                payload: payload.clone(),
                cache_id: pattern.cached.then(|| cache_id(name, &values)).flatten(),
            });
            let stream_field = pattern.anycast.then(|| ("payload", payload.into_bytes()));
            Ok(Some(Delivery { stream_field, broadcast }))
        }
    }
}

/// Where a 26.9 event goes: the stream (anycast), the channel (broadcast) or both, as the
/// Python agent 26.9.6 sends each (`anycast_event`, `anycast_and_broadcast_event`,
/// `broadcast_event_with_cache`).
struct Pattern {
    anycast: bool,
    broadcast: bool,
    cached: bool,
}

fn pattern(name: &str) -> Pattern {
    const BOTH: &[&str] = &[
        "kernel_preparing",
        "kernel_pulling",
        "kernel_creating",
        "kernel_started",
        "kernel_terminated",
        "session_success",
        "session_failure",
    ];
    if name.starts_with("bgtask_") {
        Pattern { anycast: false, broadcast: true, cached: true }
    } else {
        Pattern { anycast: true, broadcast: BOTH.contains(&name), cached: false }
    }
}

/// `bgtask.<task id>`: Backend.AI's `EventCacheDomain.BGTASK.cache_id`.
fn cache_id(name: &str, args: &[Value]) -> Option<String> {
    name.starts_with("bgtask_").then(|| args.first().and_then(Value::as_str).map(|task| format!("bgtask.{task}")))?
}

/// Events of the ≤ 25.x protocol that 26.9 no longer has.
const NOT_IN_26_9: &[&str] = &["kernel_pull_progress"];

fn decode_args(name: &str, args: &[u8]) -> Result<Vec<Value>, WireError> {
    let mut cursor = std::io::Cursor::new(args);
    match rmpv::decode::read_value_with_max_depth(&mut cursor, 64) {
        Ok(Value::Array(values)) => Ok(values),
        Ok(other) => Err(WireError::Msgpack { name: name.into(), reason: format!("not an array: {other}") }),
        Err(err) => Err(WireError::Msgpack { name: name.into(), reason: err.to_string() }),
    }
}

/// The 26.9 event model's fields for an event in Backend.AI's positional form.
pub fn payload_json(name: &str, args: &[Value]) -> Result<Json, WireError> {
    let arg = Args { name, args };
    let payload = match name {
        "agent_started" | "agent_terminated" => json!({ "reason": arg.text(0, "reason")? }),
        "agent_heartbeat" => json!({ "agent_info": agent_info(&arg, arg.map(0, "agent_info")?)? }),
        "kernel_preparing" | "kernel_pulling" | "kernel_creating" | "kernel_cancelled" => json!({
            "kernel_id": arg.text(0, "kernel_id")?,
            "session_id": arg.text(1, "session_id")?,
            "reason": arg.optional_text(2).unwrap_or_default(),
        }),
        "kernel_started" => json!({
            "kernel_id": arg.text(0, "kernel_id")?,
            "session_id": arg.text(1, "session_id")?,
            "reason": arg.optional_text(2).unwrap_or_default(),
            "creation_info": creation_info(&arg, arg.map(3, "creation_info")?)?,
        }),
        "kernel_terminating" | "kernel_terminated" => json!({
            "kernel_id": arg.text(0, "kernel_id")?,
            "session_id": arg.text(1, "session_id")?,
            "reason": lifecycle_reason(arg.optional_text(2)),
            "exit_code": arg.optional_int(3).unwrap_or(-1),
        }),
        "image_pull_started" => json!({
            "image": arg.text(0, "image")?,
            "agent_id": arg.text(1, "agent_id")?,
            "timestamp": arg.number(2, "timestamp")?,
            "image_ref": Json::Null,
        }),
        "image_pull_finished" => json!({
            "image": arg.text(0, "image")?,
            "agent_id": arg.text(1, "agent_id")?,
            "timestamp": arg.number(2, "timestamp")?,
            "msg": arg.optional_text(3),
            "image_ref": Json::Null,
        }),
        "image_pull_failed" => json!({
            "image": arg.text(0, "image")?,
            "agent_id": arg.text(1, "agent_id")?,
            "msg": arg.optional_text(3).unwrap_or_default(),
            "image_ref": Json::Null,
        }),
        "session_success" | "session_failure" => json!({
            "session_id": arg.text(0, "session_id")?,
            "reason": lifecycle_reason(arg.optional_text(1)),
            "exit_code": arg.optional_int(2).unwrap_or(-1),
        }),
        "bgtask_updated" => json!({
            "task_id": arg.text(0, "task_id")?,
            "current_progress": arg.number(1, "current_progress")?,
            "total_progress": arg.number(2, "total_progress")?,
            "message": arg.optional_text(3),
        }),
        "bgtask_done" | "bgtask_failed" | "bgtask_cancelled" => json!({
            "task_id": arg.text(0, "task_id")?,
            "message": arg.optional_text(1),
        }),
        _ => return Err(WireError::UnknownEvent { name: name.into() }),
    };
    Ok(payload)
}

/// A reason as 26.9's `KernelLifecycleEventReason` has it: the model refuses a value it does not
/// know (and the whole event with it), so anything else becomes `unknown`. An OOM kill is
/// `self-terminated` there (exit code 137), as the Python agent 26.9 reports it; ≤ 25.x
/// managers know `oom-killed`.
fn lifecycle_reason(reason: Option<&str>) -> &str {
    const KNOWN: &[&str] = &[
        "abnormal-termination",
        "agent-resource-group-changed",
        "agent-termination",
        "already-terminated",
        "anomaly-detected",
        "bootstrap-timeout",
        "container-not-found",
        "deprioritized-for-rescheduling",
        "dry-run-complete",
        "exceeded-max-retries",
        "exec-timeout",
        "failed-to-create",
        "failed-to-start",
        "force-terminated",
        "hang-timeout",
        "idle-session-lifetime",
        "idle-timeout",
        "idle-utilization",
        "kernel-handler-failure",
        "killed-by-event",
        "new-container-started",
        "not-found-in-manager",
        "passed-preconditions",
        "pending-timeout",
        "preempted-by-reservation",
        "preempted-by-scheduler",
        "preemption-reservation",
        "rescheduled",
        "restart-timeout",
        "restarting",
        "resuming-agent-operation",
        "route-termination",
        "self-terminated",
        "service-scaled-down",
        "stale-kernel",
        "task-cancelled",
        "task-failed",
        "task-finished",
        "task-timeout",
        "terminated-unknown-container",
        "triggered-by-scheduler",
        "unknown",
        "user-purged",
        "user-requested",
    ];
    match reason {
        Some("oom-killed") => "self-terminated",
        Some(reason) if KNOWN.contains(&reason) => reason,
        _ => "unknown",
    }
}

/// 26.9's `AgentInfo` from the heartbeat's map (the ≤ 25.x shape).
fn agent_info(arg: &Args, info: &[(Value, Value)]) -> Result<Json, WireError> {
    let text = |key: &str| field(info, key).and_then(Value::as_str);
    let required = |key: &'static str| {
        text(key).ok_or(WireError::Argument { name: arg.name.into(), index: 0, what: key, expected: "a string" })
    };
    let available: Vec<Json> = field(info, "available_resource_slots")
        .and_then(Value::as_map)
        .map(|slots| {
            slots
                .iter()
                .filter_map(|(slot, amount)| {
                    Some(json!({ "resource_type": slot.as_str()?, "quantity": amount.as_str()? }))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({
        "ip": required("ip")?,
        "region": text("region"),
        "scaling_group": text("scaling_group"),
        "addr": required("addr")?,
        "public_key": Json::Null,
        "public_host": required("public_host")?,
        "available_resource_slots": available,
        "slot_key_and_units": field(info, "slot_key_and_units").map(to_json).unwrap_or_else(|| json!({})),
        "version": required("version")?,
        "compute_plugins": field(info, "compute_plugins").map(to_json).unwrap_or_else(|| json!({})),
        "architecture": required("architecture")?,
        "auto_terminate_abusing_kernel": field(info, "auto_terminate_abusing_kernel")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }))
}

/// 26.9's `KernelCreationInfo` from the agent's creation info (the `create_kernels` reply).
fn creation_info(arg: &Args, info: &[(Value, Value)]) -> Result<Json, WireError> {
    let missing = |what: &'static str, expected: &'static str| WireError::Argument {
        name: arg.name.into(),
        index: 3,
        what,
        expected,
    };
    let int = |key: &'static str| field(info, key).and_then(Value::as_i64).ok_or_else(|| missing(key, "an integer"));
    let service_ports: Vec<Json> = field(info, "service_ports")
        .and_then(Value::as_array)
        .map(|ports| {
            ports
                .iter()
                .filter_map(Value::as_map)
                .map(|port| {
                    json!({
                        "name": field(port, "name").and_then(Value::as_str).unwrap_or_default(),
                        "protocol": field(port, "protocol").and_then(Value::as_str).unwrap_or("tcp"),
                        "container_ports": field(port, "container_ports").map(to_json).unwrap_or_else(|| json!([])),
                        "host_ports": field(port, "host_ports").map(to_json).unwrap_or_else(|| json!([])),
                        "is_inference": false,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({
        "container_id": field(info, "container_id").and_then(Value::as_str).ok_or_else(|| missing("container_id", "a string"))?,
        "kernel_host": field(info, "kernel_host").and_then(Value::as_str).ok_or_else(|| missing("kernel_host", "a string"))?,
        "repl_in_port": int("repl_in_port")?,
        "repl_out_port": int("repl_out_port")?,
        "service_ports": service_ports,
        "used_devices": used_devices(info),
    }))
}

/// `UsedDevices` from what the kernel holds: each accelerator device it was given (the
/// creation info's `attached_devices`) as a unit of its own with the model, the slot's amount,
/// processing units and memory, as the Python agent reports them; every other slot
/// (`resource_spec.slots`) under the device it names (`cpu` → `cpu`) on one unit (`root`), as
/// the Python agent reports intrinsic slots. The manager sums them into the kernel's occupied
/// slots.
fn used_devices(info: &[(Value, Value)]) -> Json {
    let mut units: Map<String, Json> = Map::new();
    let mut by_device: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for (key, devices) in field(info, "attached_devices").and_then(Value::as_map).into_iter().flatten() {
        let Some(key) = key.as_str() else { continue };
        for device in devices.as_array().into_iter().flatten() {
            let Some(device) = device.as_map() else { continue };
            let text = |name: &str| field(device, name).and_then(Value::as_str).map(str::to_owned);
            let (Some(id), Some(slot), Some(amount)) = (text("device_id"), text("slot"), text("amount")) else {
                continue;
            };
            let data = field(device, "data").and_then(Value::as_map);
            let number = |name: &str| data.and_then(|data| field(data, name)).and_then(Value::as_u64);
            let unit = units.entry(key.to_owned()).or_insert_with(|| json!({}));
            unit[id.as_str()] = json!({
                "model_name": text("model_name"),
                "used": { slot.as_str(): amount },
                "processing_units": number("smp"),
                "memory_size": number("mem"),
            });
            by_device.insert(slot);
        }
    }
    let slots = field(info, "resource_spec").and_then(Value::as_map).and_then(|spec| field(spec, "slots"));
    for (slot, amount) in slots.and_then(Value::as_map).into_iter().flatten() {
        let (Some(slot), Some(amount)) = (slot.as_str(), amount_text(amount)) else { continue };
        if by_device.contains(slot) {
            continue;
        }
        let device = slot.split('.').next().unwrap_or(slot);
        let unit = units.entry(device.to_owned()).or_insert_with(|| json!({}));
        if unit.get("root").is_none() {
            unit["root"] = json!({ "model_name": null, "used": {}, "processing_units": null, "memory_size": null });
        }
        if let Some(used) = unit.pointer_mut("/root/used").and_then(Json::as_object_mut) {
            used.insert(slot.to_owned(), Json::String(amount));
        }
    }
    json!({ "units": units })
}

fn amount_text(amount: &Value) -> Option<String> {
    match amount {
        Value::String(s) => s.as_str().map(str::to_owned),
        Value::Integer(n) => Some(n.to_string()),
        Value::F64(f) => Some(f.to_string()),
        _ => None,
    }
}

fn field<'a>(entries: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

/// An event's positional arguments, read with errors that name the event and the argument.
struct Args<'a> {
    name: &'a str,
    args: &'a [Value],
}

impl<'a> Args<'a> {
    fn error(&self, index: usize, what: &'static str, expected: &'static str) -> WireError {
        WireError::Argument { name: self.name.into(), index, what, expected }
    }

    fn text(&self, index: usize, what: &'static str) -> Result<&'a str, WireError> {
        self.optional_text(index).ok_or_else(|| self.error(index, what, "a string"))
    }

    fn optional_text(&self, index: usize) -> Option<&'a str> {
        self.args.get(index).and_then(Value::as_str)
    }

    fn number(&self, index: usize, what: &'static str) -> Result<f64, WireError> {
        match self.args.get(index) {
            Some(Value::F64(f)) => Ok(*f),
            Some(Value::F32(f)) => Ok(f64::from(*f)),
            Some(Value::Integer(n)) => n.as_f64().ok_or_else(|| self.error(index, what, "a number")),
            _ => Err(self.error(index, what, "a number")),
        }
    }

    fn optional_int(&self, index: usize) -> Option<i64> {
        self.args.get(index).and_then(Value::as_i64)
    }

    fn map(&self, index: usize, what: &'static str) -> Result<&'a [(Value, Value)], WireError> {
        match self.args.get(index) {
            Some(Value::Map(entries)) => Ok(entries),
            _ => Err(self.error(index, what, "a map")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::from(text)
    }

    #[test]
    fn kernel_terminated_names_its_fields_and_keeps_known_reasons() {
        let args = [s("k1"), s("s1"), s("oom-killed"), Value::from(137)];
        assert_eq!(
            payload_json("kernel_terminated", &args).expect("renders"),
            json!({"kernel_id": "k1", "session_id": "s1", "reason": "self-terminated", "exit_code": 137})
        );
        let args = [s("k1"), s("s1"), s("no-such-reason"), Value::Nil];
        let payload = payload_json("kernel_terminated", &args).expect("renders");
        assert_eq!((&payload["reason"], &payload["exit_code"]), (&json!("unknown"), &json!(-1)));
    }

    #[test]
    fn a_missing_argument_is_named() {
        let err = payload_json("kernel_started", &[s("k1")]).expect_err("no session id");
        assert_eq!(err.to_string(), "event `kernel_started`: argument 1 (session_id) is missing or not a string");
        let err = payload_json("no_such_event", &[]).expect_err("unknown");
        assert!(err.to_string().contains("no_such_event"), "{err}");
    }

    #[test]
    fn the_legacy_format_passes_the_args_through() {
        let args = crate::events::pack_args(&[s("self-started")]);
        let legacy = delivery(EventFormat::Legacy, "agent_started", &args).expect("renders").expect("sent");
        assert_eq!(legacy, Delivery { stream_field: Some(("args", args.clone())), broadcast: None });
        let current = delivery(EventFormat::Current, "agent_started", &args).expect("renders").expect("sent");
        let (field, payload) = current.stream_field.expect("a stream entry");
        assert_eq!((field, payload.as_slice()), ("payload", br#"{"reason":"self-started"}"#.as_slice()));
        assert_eq!(current.broadcast, None, "agent events are anycast only");
        assert_eq!(delivery(EventFormat::Current, "kernel_pull_progress", &args), Ok(None));
    }

    #[test]
    fn lifecycle_events_are_also_broadcast_and_background_tasks_only_broadcast_with_a_cache() {
        let args = crate::events::pack_args(&[s("k1"), s("s1"), s("user-requested"), Value::from(0)]);
        let terminated = delivery(EventFormat::Current, "kernel_terminated", &args).expect("renders").expect("sent");
        let (_, stream) = terminated.stream_field.expect("a stream entry");
        let broadcast = terminated.broadcast.expect("a broadcast copy");
        assert_eq!(broadcast.payload.as_bytes(), stream.as_slice(), "the copy carries the same payload");
        assert_eq!(broadcast.cache_id, None);
        let message: Json = serde_json::from_str(&broadcast.message("kernel_terminated", "i-a")).expect("JSON");
        assert_eq!(message["name"], "kernel_terminated");
        assert_eq!(message["source"], "i-a");
        let inner: Json =
            serde_json::from_str(message["payload"].as_str().expect("payload is a string")).expect("JSON");
        assert_eq!(inner["kernel_id"], "k1");

        let terminating = crate::events::pack_args(&[s("k1"), s("s1"), s("user-requested")]);
        let terminating = delivery(EventFormat::Current, "kernel_terminating", &terminating).expect("renders");
        assert_eq!(terminating.expect("sent").broadcast, None, "the Python agent does not broadcast it");

        let task = "3f1c2e4a-5b6d-4e7f-9a0b-1c2d3e4f5a6b";
        let done = crate::events::pack_args(&[s(task), s("committed")]);
        let done = delivery(EventFormat::Current, "bgtask_done", &done).expect("renders").expect("sent");
        assert_eq!(done.stream_field, None, "background-task events are not stream entries");
        let broadcast = done.broadcast.expect("broadcast");
        assert_eq!(broadcast.cache_id.as_deref(), Some(format!("bgtask.{task}").as_str()));
        assert_eq!(
            serde_json::from_str::<Json>(&broadcast.payload).expect("JSON"),
            json!({"task_id": task, "message": "committed"})
        );
        let updated = crate::events::pack_args(&[s(task), Value::from(0.0), Value::from(0.0), s("Task started")]);
        let updated = delivery(EventFormat::Current, "bgtask_updated", &updated).expect("renders").expect("sent");
        let payload: Json = serde_json::from_str(&updated.broadcast.expect("broadcast").payload).expect("JSON");
        assert_eq!(
            payload,
            json!({"task_id": task, "current_progress": 0.0, "total_progress": 0.0, "message": "Task started"})
        );
    }

    #[test]
    fn used_devices_group_slots_by_device() {
        let info = vec![(
            s("resource_spec"),
            Value::Map(vec![(
                s("slots"),
                Value::Map(vec![(s("cpu"), s("1")), (s("mem"), s("268435456")), (s("cuda.shares"), s("0.5"))]),
            )]),
        )];
        let devices = used_devices(&info);
        assert_eq!(devices["units"]["cpu"]["root"]["used"], json!({"cpu": "1"}));
        assert_eq!(devices["units"]["cuda"]["root"]["used"], json!({"cuda.shares": "0.5"}));
    }

    #[test]
    fn used_devices_name_each_accelerator_device() {
        let device = |id: &str, amount: &str| {
            Value::Map(vec![
                (s("device_id"), s(id)),
                (s("model_name"), s("CUDA GPU")),
                (s("slot"), s("cuda.shares")),
                (s("amount"), s(amount)),
                (s("data"), Value::Map(vec![(s("smp"), Value::from(4)), (s("mem"), Value::from(1u64 << 30))])),
            ])
        };
        let info = vec![
            (
                s("resource_spec"),
                Value::Map(vec![(
                    s("slots"),
                    Value::Map(vec![(s("cpu"), s("1")), (s("mem"), s("268435456")), (s("cuda.shares"), s("0.75"))]),
                )]),
            ),
            (
                s("attached_devices"),
                Value::Map(vec![(s("cuda"), Value::Array(vec![device("a", "0.5"), device("b", "0.25")]))]),
            ),
        ];
        let devices = used_devices(&info);
        let cuda = &devices["units"]["cuda"];
        assert_eq!(cuda["a"]["used"], json!({"cuda.shares": "0.5"}));
        assert_eq!(cuda["b"]["used"], json!({"cuda.shares": "0.25"}));
        assert_eq!(
            (cuda["a"]["model_name"].clone(), cuda["a"]["memory_size"].clone()),
            (json!("CUDA GPU"), json!(1u64 << 30))
        );
        assert!(cuda.get("root").is_none(), "the slot is not counted twice: {cuda}");
        assert_eq!(devices["units"]["mem"]["root"]["used"], json!({"mem": "268435456"}));
    }
}
