//! Events to the manager from a real `bai-agent` through a real Redis: `agent_started`,
//! periodic `agent_heartbeat` and `agent_terminated` in Backend.AI's stream format (checked
//! with Python's msgpack the way the manager unpacks them), delivery of the backlog after a
//! Redis outage (every event, in order, once), the backlog of an earlier run going first, and
//! the local journal when no Redis is configured. The 26.9 format (a JSON `payload`) is
//! checked with Backend.AI 26.9.6's own message and event models (`backend.ai-common` in the
//! venv `cargo xtask setup` makes): every event the agent emits, and the stream entries of a
//! running agent.
//!
//! The shared Redis is `BAI_TEST_REDIS` (started by `cargo xtask test`), database 4 (never
//! flushed: each test reads only the entries whose `source` is its own agent id). The outage
//! test runs a `redis-server` of its own.

use std::{path::Path, process::Command, time::Duration};

use bai_agent::rpc::codec::map_get;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, EventCollector, RedisServer, StreamEvent, free_loopback_port, require_environment,
    test_redis, unique,
};
use rmpv::Value;

const EVENTS_DB: u32 = 4;

/// The ≤ 25.x format (`args`), whose tuples these tests read; the 26.9 format has its own tests
/// at the end, checked with Backend.AI's own models.
fn redis_config(addr: &str) -> String {
    format!(
        "[redis]\naddr = \"{addr}\"\nevents-db = {EVENTS_DB}\nevent-format = \"legacy\"\n\n\
         [debug]\nheartbeat-interval = \"500ms\"\n"
    )
}

/// `value[key]` of a msgpack map with string keys.
fn field<'a>(value: &'a Value, key: &str) -> &'a Value {
    value.as_map().and_then(|entries| map_get(entries, key)).unwrap_or_else(|| panic!("no `{key}` in {value}"))
}

/// The single argument of an event, which must be a one-element array.
fn only_arg(event: &StreamEvent) -> Value {
    let args = event.args_value();
    let items = args.as_array().unwrap_or_else(|| panic!("args of {} are not an array: {args}", event.name));
    assert_eq!(items.len(), 1, "{} takes one argument: {args}", event.name);
    items[0].clone()
}

fn heartbeat_seq(event: &StreamEvent) -> u64 {
    field(&only_arg(event), "heartbeat_seq").as_u64().expect("heartbeat_seq is an integer")
}

fn heartbeats(events: &[StreamEvent]) -> Vec<&StreamEvent> {
    events.iter().filter(|e| e.name == "agent_heartbeat").collect()
}

/// Unpacks `args` with Python's msgpack exactly as Backend.AI's manager does
/// (`unpackb(raw=False, use_list=False)`, so arrays become tuples and map keys must be str)
/// and checks the heartbeat's shape there.
const PYTHON_CHECK: &str = r#"
import sys, zlib, msgpack
args = msgpack.unpackb(sys.stdin.buffer.read(), raw=False, use_list=False)
assert isinstance(args, tuple) and len(args) == 1, repr(args)
info = args[0]
assert isinstance(info, dict), type(info)
for key in ("ip", "region", "scaling_group", "addr", "public_key", "public_host", "resource_slots",
            "available_resource_slots", "slot_key_and_units", "version", "compute_plugins", "images",
            "architecture", "auto_terminate_abusing_kernel"):
    assert key in info, key
assert info["addr"].startswith("tcp://"), info["addr"]
assert isinstance(info["public_host"], str)
assert info["public_key"] is None
from decimal import Decimal
for slot, (unit, amount) in info["resource_slots"].items():
    assert unit in ("count", "bytes", "unique"), unit
    assert Decimal(amount) == Decimal(info["available_resource_slots"][slot])
assert info["slot_key_and_units"] == {"cpu": "count", "mem": "bytes"}, info["slot_key_and_units"]
assert msgpack.unpackb(zlib.decompress(info["images"]), use_list=False) == ()
print("ok", sorted(info))
"#;

fn python_checks_heartbeat(args: &[u8]) {
    let import = Command::new("python3").args(["-c", "import msgpack"]).output();
    match import {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "python3 cannot import msgpack ({}); `cargo xtask setup` installs it",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!("python3 does not run ({err}); the compatibility check needs it"),
    }
    let mut child = Command::new("python3")
        .args(["-c", PYTHON_CHECK])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(args).expect("write args");
    }
    let out = child.wait_with_output().expect("python3 finishes");
    assert!(
        out.status.success(),
        "Python's msgpack does not read the heartbeat as Backend.AI expects:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn started_heartbeat_and_terminated_reach_the_stream_in_backend_ais_format() {
    require_environment();
    let redis = test_redis();
    let id = unique("i-events");
    let collector = EventCollector::start(&redis, EVENTS_DB, &id).expect("collector");
    let mut agent = Agent::start_with_id(&id, &redis_config(&redis)).expect("agent starts");

    let events = collector
        .wait_for("agent_started and three heartbeats", Duration::from_secs(20), |events| heartbeats(events).len() >= 3)
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));

    // Every entry has exactly Backend.AI's fields; the first heartbeat comes first (the manager
    // registers an agent from it), then agent_started("self-started").
    for event in &events {
        assert_eq!(event.fields, ["args", "name", "source"], "{event:?}");
        assert_eq!(event.source, id);
    }
    assert_eq!((events[0].name.as_str(), events[1].name.as_str()), ("agent_heartbeat", "agent_started"));
    assert_eq!(events[1].args, b"\x91\xacself-started", "msgpack of the tuple (\"self-started\",)");

    // Heartbeats: one map argument with the documented keys and values.
    let beats = heartbeats(&events);
    let info = only_arg(beats[0]);
    let rpc_port = agent.rpc_addr.rsplit_once(':').expect("port").1;
    assert_eq!(field(&info, "ip"), &Value::from("127.0.0.1"));
    assert_eq!(field(&info, "addr"), &Value::from(format!("tcp://127.0.0.1:{rpc_port}")));
    assert_eq!(field(&info, "public_host"), &Value::from("127.0.0.1"));
    assert_eq!(field(&info, "region"), &Value::from("local"));
    assert_eq!(field(&info, "scaling_group"), &Value::from("default"));
    assert_eq!(field(&info, "version"), &Value::from(env!("CARGO_PKG_VERSION")));
    assert_eq!(field(&info, "architecture"), &Value::from(std::env::consts::ARCH));
    let slots = field(&info, "available_resource_slots");
    let cpu: u64 = field(slots, "cpu").as_str().expect("cpu is a decimal string").parse().expect("whole cores");
    let mem: u64 = field(slots, "mem").as_str().expect("mem is a decimal string").parse().expect("bytes");
    assert!(cpu >= 1 && mem > 1 << 20, "cpu {cpu}, mem {mem}");
    assert_eq!(
        field(&info, "slot_key_and_units"),
        &Value::Map(vec![(Value::from("cpu"), Value::from("count")), (Value::from("mem"), Value::from("bytes"))])
    );
    let plugins = field(&info, "compute_plugins");
    assert!(
        map_get(plugins.as_map().expect("map"), "cpu").is_some()
            && map_get(plugins.as_map().expect("map"), "mem").is_some()
    );
    python_checks_heartbeat(&beats[0].args);

    // Periodic: numbered 1, 2, 3 and spread over time, not sent in a burst.
    let seqs: Vec<u64> = beats.iter().map(|e| heartbeat_seq(e)).collect();
    assert_eq!(seqs[..3], [1, 2, 3]);
    let spread = beats[2].added_ms().saturating_sub(beats[0].added_ms());
    assert!(spread >= 700, "three heartbeats 500 ms apart arrived within {spread} ms");

    // agent_terminated("shutdown") is the last word.
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "exit status {status}; log:\n{}", agent.log_text());
    let events = collector
        .wait_for("agent_terminated", Duration::from_secs(10), |events| {
            events.last().is_some_and(|e| e.name == "agent_terminated")
        })
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    assert_eq!(events.last().expect("event").args, b"\x91\xa8shutdown");
    // Delivered everything: the journal was compacted and the marker names the last event.
    let marker = std::fs::read_to_string(agent.journal_dir.join("events.delivered")).expect("marker");
    assert_eq!(marker.trim().parse::<usize>().expect("seq"), events.len());
    assert_eq!(std::fs::metadata(agent.journal_dir.join("events.jsonl")).expect("journal").len(), 0);
}

#[test]
fn heartbeats_emitted_while_redis_is_down_arrive_in_order_once_when_it_returns() {
    require_environment();
    let port = free_loopback_port().expect("port");
    let mut redis = RedisServer::start(port).expect("redis-server starts");
    let id = unique("i-outage");
    let collector = EventCollector::start(&redis.addr(), EVENTS_DB, &id).expect("collector");
    let mut agent = Agent::start_with_id(&id, &redis_config(&redis.addr())).expect("agent starts");
    let before = collector
        .wait_for("two heartbeats", Duration::from_secs(20), |events| heartbeats(events).len() >= 2)
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    let last_before = heartbeat_seq(heartbeats(&before).last().expect("heartbeat"));

    redis.stop().expect("redis-server stops");
    // About six heartbeats are emitted into the outage; they wait in the journal.
    std::thread::sleep(Duration::from_secs(3));
    let journal = std::fs::read_to_string(agent.journal_dir.join("events.jsonl")).expect("journal");
    let waiting = journal.lines().filter(|line| line.contains("\"agent_heartbeat\"")).count();
    assert!(waiting >= 4, "heartbeats during the outage must be journaled; journal:\n{journal}");
    // The operator sees them waiting.
    let metric = |name: &str| {
        agent.metrics().expect("/metrics").into_iter().find(|s| s.name == name).map(|s| s.value).unwrap_or(-1.0)
    };
    assert!(metric("backendai_agent_events_backlog") >= 4.0, "the backlog is exported");
    assert!(metric("backendai_agent_events_backlog_age_seconds") >= 1.0, "so is its oldest event's age");
    redis.restart().expect("redis-server restarts on the same port");

    let target = last_before + 8;
    let events = collector
        .wait_for(&format!("heartbeat {target}"), Duration::from_secs(30), |events| {
            heartbeats(events).iter().any(|e| heartbeat_seq(e) >= target)
        })
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    let seqs: Vec<u64> = heartbeats(&events).iter().map(|e| heartbeat_seq(e)).collect();
    let want: Vec<u64> = (1..=*seqs.last().expect("heartbeats")).collect();
    assert_eq!(seqs, want, "every heartbeat, in order, none twice (outage after heartbeat {last_before})");
    assert_eq!(events[1].name, "agent_started");

    let log = agent.log_text();
    assert_eq!(log.matches("cannot deliver events to Redis").count(), 1, "one warning per outage; log:\n{log}");
    assert!(log.contains("Redis is reachable again"), "{log}");
    // (A heartbeat may be on its way at the scrape.)
    assert!(metric("backendai_agent_events_backlog_age_seconds") < 1.0, "nothing waits long once delivered");
    assert!(metric("backendai_agent_events_delivered_total") >= target as f64);
    agent.stop().expect("agent stops");
}

#[test]
fn an_earlier_runs_undelivered_events_go_first_after_a_restart() {
    require_environment();
    let journal = tempfile::tempdir().expect("tempdir");
    let port = free_loopback_port().expect("port");
    let id = unique("i-backlog");
    // First run: nothing listens on the port, so everything stays in the journal.
    let mut first = Agent::start_with_journal(&id, journal.path(), &redis_config(&format!("127.0.0.1:{port}")))
        .expect("agent starts without its Redis");
    bai_agent_tests::wait_until("two journaled heartbeats", Duration::from_secs(20), || {
        journal_names(journal.path()).iter().filter(|n| *n == "agent_heartbeat").count() >= 2
    })
    .expect("journaled");
    first.stop().expect("agent stops");
    let first_run = journal_names(journal.path());
    assert_eq!(first_run[..2], ["agent_heartbeat", "agent_started"]);
    assert_eq!(first_run.last().map(String::as_str), Some("agent_terminated"));

    let redis = RedisServer::start(port).expect("redis-server starts");
    let collector = EventCollector::start(&redis.addr(), EVENTS_DB, &id).expect("collector");
    let mut second =
        Agent::start_with_journal(&id, journal.path(), &redis_config(&redis.addr())).expect("agent restarts");
    let n = first_run.len();
    let events = collector
        .wait_for("the first run's events and the second's start", Duration::from_secs(20), |events| {
            events.len() > n + 1
        })
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", second.log_text()));
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names[..n], first_run.iter().map(String::as_str).collect::<Vec<_>>()[..], "the backlog goes first");
    assert_eq!(names[n..n + 2], ["agent_heartbeat", "agent_started"], "then the second run: {names:?}");
    let first_beats: Vec<u64> = heartbeats(&events[..n]).iter().map(|e| heartbeat_seq(e)).collect();
    assert_eq!(first_beats, (1..=first_beats.len() as u64).collect::<Vec<_>>());
    second.stop().expect("agent stops");
}

#[test]
fn without_redis_events_land_in_the_local_journal() {
    require_environment();
    let mut agent = Agent::start("[debug]\nheartbeat-interval = \"500ms\"\n").expect("agent starts");
    bai_agent_tests::wait_until("three journaled heartbeats", Duration::from_secs(20), || {
        journal_names(&agent.journal_dir).iter().filter(|n| *n == "agent_heartbeat").count() >= 3
    })
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    agent.stop().expect("agent stops");

    let text = std::fs::read_to_string(agent.journal_dir.join("events.jsonl")).expect("journal");
    let lines: Vec<serde_json::Value> =
        text.lines().map(|line| serde_json::from_str(line).expect("each line is JSON")).collect();
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs, (1..=lines.len() as u64).collect::<Vec<_>>());
    assert_eq!((&lines[0]["name"], &lines[1]["name"]), (&"agent_heartbeat".into(), &"agent_started".into()));
    assert_eq!(lines.last().expect("line")["name"], "agent_terminated");
    let args = |line: &serde_json::Value| -> Vec<u8> { base64_decode(line["args"].as_str().expect("args")) };
    assert_eq!(args(&lines[1]), b"\x91\xacself-started");
    let beat = lines.iter().find(|l| l["name"] == "agent_heartbeat").expect("heartbeat");
    let info = StreamEvent {
        id: "0-0".into(),
        fields: Vec::new(),
        name: "agent_heartbeat".into(),
        source: agent.id.clone(),
        args: args(beat),
        payload: Vec::new(),
    };
    assert_eq!(heartbeat_seq(&info), 1);
    // Without Redis, writing the journal is delivery: the marker follows it.
    let marker = std::fs::read_to_string(agent.journal_dir.join("events.delivered")).expect("marker");
    assert_eq!(marker.trim(), seqs.last().expect("seq").to_string());
}

fn journal_names(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| line["name"].as_str().map(str::to_owned))
        .collect()
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for byte in text.bytes().filter(|&b| b != b'=') {
        let value = ALPHABET.iter().position(|&c| c == byte).expect("base64 alphabet") as u32;
        acc = (acc << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Reads JSON lines `{"fields": {name, source, payload}}` on stdin and decodes each as the
/// 26.9 manager does: `AnycastMessagePayload.from_stream_fields`, then the event class of its
/// name `from_message` (pydantic validation of every field). Prints one line per event with
/// what the manager sees, or the error, and exits non-zero on any failure.
const BACKENDAI_CHECK: &str = r#"
import sys, json
from ai.backend.common.message_queue.payload import AnycastMessagePayload
from ai.backend.common.events.types import EventMessage
from ai.backend.common.events.event_types.agent.anycast import (
    AgentStartedEvent, AgentTerminatedEvent, AgentHeartbeatEvent)
from ai.backend.common.events.event_types.kernel.anycast import (
    KernelPreparingAnycastEvent, KernelPullingAnycastEvent, KernelCreatingAnycastEvent,
    KernelStartedAnycastEvent, KernelCancelledAnycastEvent, KernelTerminatingAnycastEvent,
    KernelTerminatedAnycastEvent)
from ai.backend.common.events.event_types.session.anycast import (
    SessionSuccessAnycastEvent, SessionFailureAnycastEvent)
from ai.backend.common.events.event_types.image.anycast import (
    ImagePullStartedEvent, ImagePullFinishedEvent, ImagePullFailedEvent)
from ai.backend.common.message_queue.payload import BroadcastMessagePayload
from ai.backend.common.events.types import AbstractBroadcastEvent
import ai.backend.common.events.event_types.kernel.broadcast
import ai.backend.common.events.event_types.session.broadcast
import ai.backend.common.events.event_types.bgtask.broadcast
classes = {c.event_name(): c for c in (
    AgentStartedEvent, AgentTerminatedEvent, AgentHeartbeatEvent, KernelPreparingAnycastEvent,
    KernelPullingAnycastEvent, KernelCreatingAnycastEvent, KernelStartedAnycastEvent,
    KernelCancelledAnycastEvent, KernelTerminatingAnycastEvent, KernelTerminatedAnycastEvent,
    SessionSuccessAnycastEvent, SessionFailureAnycastEvent, ImagePullStartedEvent,
    ImagePullFinishedEvent, ImagePullFailedEvent)}
failed = 0
for line in sys.stdin:
    entry = json.loads(line)
    try:
        if "broadcast" in entry:
            message = BroadcastMessagePayload.from_json(entry["broadcast"])
            event = AbstractBroadcastEvent.from_broadcast_payload(message)
            print("broadcast", message.name, message.legacy_source, type(event).__name__, event.model_dump_json())
            continue
        fields = {k.encode(): v.encode() for k, v in entry.items()}
        message = AnycastMessagePayload.from_stream_fields(fields)
        event = classes[message.name].from_message(EventMessage(name=message.name, payload=message.payload))
        print("ok", message.name, message.legacy_source, event.model_dump_json())
    except Exception as e:
        failed += 1
        print("FAILED", entry.get("name") or entry.get("broadcast"), type(e).__name__, e)
sys.exit(1 if failed else 0)
"#;

/// Runs [`BACKENDAI_CHECK`] on stream entries (field name → text; an entry `broadcast` → the
/// channel message) and returns its output.
fn check_with_backendai(entries: &[Vec<(&str, String)>]) -> String {
    let mut input = String::new();
    for entry in entries {
        let object: serde_json::Map<String, serde_json::Value> =
            entry.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str()))).collect();
        input.push_str(&serde_json::Value::Object(object).to_string());
        input.push('\n');
    }
    let (ok, text) = bai_agent_tests::run_backendai_python(BACKENDAI_CHECK, input.as_bytes());
    assert!(ok, "Backend.AI 26.9.6 refuses what the agent sends:\n{text}");
    text
}

/// Every event the agent emits, with arguments shaped as the agent builds them, rendered in the
/// 26.9 format and decoded by Backend.AI 26.9.6's own models.
#[test]
fn every_event_in_the_26_9_format_passes_backend_ais_own_models() {
    use bai_agent::{backendai::events as wire, events::heartbeat};
    let s = |text: &str| Value::from(text);
    let map = |entries: Vec<(&str, Value)>| Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect());
    let identity = heartbeat::AgentIdentity {
        ip: "10.0.0.5".into(),
        region: "local".into(),
        scaling_group: "default".into(),
        addr: "tcp://10.0.0.5:6001".into(),
        public_host: "10.0.0.5".into(),
        version: "26.9.6".into(),
        architecture: "x86_64".into(),
        plugin_info: [("cuda".to_owned(), [("cuda_support".to_owned(), "true".to_owned())].into_iter().collect())]
            .into_iter()
            .collect(),
    };
    let slots = [("cpu", "2"), ("mem", "4294967296"), ("cuda.device", "1")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let creation_info = map(vec![
        ("id", s("k1")),
        ("kernel_host", s("127.0.0.1")),
        ("repl_in_port", Value::from(30000)),
        ("repl_out_port", Value::from(30001)),
        ("stdin_port", Value::from(0)),
        ("stdout_port", Value::from(0)),
        (
            "service_ports",
            Value::Array(vec![map(vec![
                ("name", s("jupyter")),
                ("protocol", s("http")),
                ("container_ports", Value::Array(vec![Value::from(8080)])),
                ("host_ports", Value::Array(vec![Value::from(30002)])),
            ])]),
        ),
        ("container_id", s("0123456789ab")),
        (
            "resource_spec",
            map(vec![
                ("slots", map(vec![("cpu", s("1")), ("mem", s("268435456")), ("cuda.device", s("1"))])),
                ("container_id", s("0123456789ab")),
            ]),
        ),
        (
            "attached_devices",
            map(vec![(
                "cuda",
                Value::Array(vec![map(vec![
                    ("device_id", s("0")),
                    ("model_name", s("CUDA GPU")),
                    ("slot", s("cuda.device")),
                    ("amount", s("1")),
                    ("data", map(vec![("smp", Value::from(108)), ("mem", Value::from(42949672960u64))])),
                ])]),
            )]),
        ),
    ]);
    let kernel = "0b8a9a1e-9d3f-4b55-8d3c-0f7e0c3a5d11";
    let session = "5d2f0e77-2b1c-4c1e-9a57-4d3c2b1a0f99";
    let task = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
    let events: Vec<(&str, Vec<Value>)> = vec![
        ("agent_started", vec![s("self-started")]),
        ("agent_heartbeat", vec![heartbeat::agent_info(&identity, &slots, 1)]),
        ("agent_terminated", vec![s("shutdown")]),
        ("kernel_preparing", vec![s(kernel), s(session)]),
        ("kernel_pulling", vec![s(kernel), s(session), s("python:3.13")]),
        ("kernel_creating", vec![s(kernel), s(session)]),
        ("kernel_started", vec![s(kernel), s(session), s(""), creation_info.clone()]),
        ("kernel_started", vec![s(kernel), s(session), s("resuming-agent-operation"), creation_info]),
        ("kernel_terminating", vec![s(kernel), s(session), s("user-requested")]),
        ("kernel_terminated", vec![s(kernel), s(session), s("user-requested"), Value::from(0)]),
        ("kernel_terminated", vec![s(kernel), s(session), s("failed-to-start"), Value::Nil]),
        ("kernel_terminated", vec![s(kernel), s(session), s("oom-killed"), Value::from(137)]),
        ("kernel_terminated", vec![s(kernel), s(session), s("self-terminated"), Value::from(1)]),
        ("session_success", vec![s(session), s("task-finished"), Value::from(0)]),
        ("session_failure", vec![s(session), s("task-timeout"), Value::from(-2)]),
        (
            "image_pull_started",
            vec![s("cr.backend.ai/stable/python:3.9"), s("i-agent"), Value::from(1.7e9), Value::Nil],
        ),
        (
            "image_pull_finished",
            vec![s("local/e2e/python:3.13"), s("i-agent"), Value::from(1.7e9), s("Image already exists")],
        ),
        (
            "image_pull_finished",
            vec![s("cr.backend.ai/stable/python:3.9"), s("i-agent"), Value::from(1.7e9), Value::Nil],
        ),
        ("image_pull_failed", vec![s("local/e2e/python:3.13"), s("i-agent"), Value::Nil, s("not in the engine")]),
        ("bgtask_updated", vec![s(task), Value::from(0.0), Value::from(0.0), s("Task started")]),
        ("bgtask_done", vec![s(task), s("committed")]),
        ("bgtask_failed", vec![s(task), s("the container is gone")]),
    ];
    let mut entries: Vec<Vec<(&str, String)>> = Vec::new();
    let (mut stream_entries, mut broadcasts) = (0, 0);
    for (name, args) in &events {
        let packed = bai_agent::events::pack_args(args);
        let delivery = wire::delivery(wire::EventFormat::Current, name, &packed)
            .unwrap_or_else(|err| panic!("{err}"))
            .expect("sent in the 26.9 format");
        if let Some((field, payload)) = delivery.stream_field {
            assert_eq!(field, "payload");
            stream_entries += 1;
            entries.push(vec![
                ("name", (*name).to_owned()),
                ("source", "i-agent".to_owned()),
                ("payload", String::from_utf8(payload).expect("JSON is UTF-8")),
            ]);
        }
        if let Some(broadcast) = delivery.broadcast {
            broadcasts += 1;
            entries.push(vec![("broadcast", broadcast.message(name, "i-agent"))]);
        }
    }
    let seen = check_with_backendai(&entries);
    println!("{seen}");
    assert_eq!(seen.lines().filter(|l| l.starts_with("ok ")).count(), stream_entries, "{seen}");
    assert_eq!(seen.lines().filter(|l| l.starts_with("broadcast ")).count(), broadcasts, "{seen}");
    // The Python agent's broadcasts: the kernel lifecycle but `kernel_terminating`, the session
    // results, and the background tasks (only there).
    for expected in [
        "broadcast kernel_started i-agent KernelStartedBroadcastEvent",
        "broadcast kernel_terminated i-agent KernelTerminatedBroadcastEvent",
        "broadcast session_failure i-agent SessionFailureBroadcastEvent",
        "broadcast bgtask_done i-agent BgtaskDoneEvent",
        "broadcast bgtask_failed i-agent BgtaskFailedEvent",
    ] {
        assert!(seen.contains(expected), "missing `{expected}`:\n{seen}");
    }
    assert!(!seen.contains("broadcast kernel_terminating"), "{seen}");
    assert!(!seen.contains("ok bgtask_"), "background-task events are not stream entries:\n{seen}");
    // What the manager reads back: the slots as entries, the OOM kill as 26.9 names it.
    assert!(seen.contains(r#""resource_type":"mem","quantity":"4294967296""#), "{seen}");
    assert!(seen.contains(r#""reason":"self-terminated","exit_code":137"#), "{seen}");
    assert!(seen.contains(r#""used":{"cpu":"1"}"#), "{seen}");
    // An accelerator device is a unit of its own, with its model, as the manager reads it.
    assert!(seen.contains(r#""model_name":"CUDA GPU""#) && seen.contains(r#""used":{"cuda.device":"1"}"#), "{seen}");
}

/// A running agent in the default (26.9) format: its stream entries carry `name`, `source`
/// and `payload`, and Backend.AI 26.9.6's manager-side decoding takes each of them.
#[test]
fn a_running_agents_events_reach_a_26_9_manager_decodable() {
    require_environment();
    let redis = test_redis();
    let toml =
        format!("[redis]\naddr = \"{redis}\"\nevents-db = {EVENTS_DB}\n\n[debug]\nheartbeat-interval = \"500ms\"\n");
    let mut agent = Agent::start(&toml).expect("agent starts");
    let collector = EventCollector::start(&redis, EVENTS_DB, &agent.id).expect("collector");
    collector
        .wait_for("agent_started and a heartbeat", Duration::from_secs(20), |events| {
            events.iter().any(|e| e.name == "agent_heartbeat")
        })
        .expect("events arrive");
    agent.stop().expect("agent stops");
    let events = collector
        .wait_for("agent_terminated", Duration::from_secs(20), |events| {
            events.iter().any(|e| e.name == "agent_terminated")
        })
        .expect("agent_terminated arrives");
    for event in &events {
        assert_eq!(event.fields, ["name", "payload", "source"], "{event:?}");
    }
    let entries: Vec<Vec<(&str, String)>> = events
        .iter()
        .map(|e| {
            vec![
                ("name", e.name.clone()),
                ("source", e.source.clone()),
                ("payload", String::from_utf8_lossy(&e.payload).into_owned()),
            ]
        })
        .collect();
    let seen = check_with_backendai(&entries);
    let mut lines = seen.lines();
    assert!(lines.next().is_some_and(|l| l.starts_with("ok agent_heartbeat")), "the first heartbeat first: {seen}");
    assert_eq!(lines.next(), Some(format!("ok agent_started {} {{\"reason\":\"self-started\"}}", agent.id).as_str()));
    assert!(seen.trim_end().ends_with(r#"{"reason":"shutdown"}"#), "{seen}");
}

/// The first heartbeat (sent at start, before the kernels are even recovered) advertises what
/// the allocator gives kernels — reserved resources taken off — like every later one: the
/// manager schedules against it from the first.
#[test]
fn the_first_heartbeat_advertises_the_allocatable_capacity() {
    require_environment();
    let redis = test_redis();
    let id = unique("i-capacity");
    let collector = EventCollector::start(&redis, EVENTS_DB, &id).expect("collector");
    let toml = format!("{}\n[resource]\nreserved-cpu = 1\n", redis_config(&redis));
    let mut agent = Agent::start_with_id(&id, &toml).expect("agent starts");
    let events = collector
        .wait_for("two heartbeats", Duration::from_secs(20), |events| heartbeats(events).len() >= 2)
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    agent.stop().expect("agent stops");
    let slots = |event: &StreamEvent| field(&only_arg(event), "available_resource_slots").clone();
    let beats = heartbeats(&events);
    assert_eq!(slots(beats[0]), slots(beats[1]), "the first heartbeat's capacity is the allocator's");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu = field(&slots(beats[0]), "cpu").as_str().unwrap_or_default().to_owned();
    assert_eq!(cpu.parse::<f64>().ok(), Some(cores.saturating_sub(1) as f64), "reserved-cpu = 1 of {cores}: {cpu}");
}

/// The installed-image report: after the heartbeats, `installed_image:{agent id}` in the image
/// database (3) lists the engine's kernel images as Backend.AI 26.9.6's `InstalledImageInfo`
/// model reads them (checked with that model), the test image among them.
#[test]
fn the_installed_image_report_lists_the_engines_kernel_images() {
    require_environment();
    let redis = test_redis();
    let id = unique("i-images");
    let mut agent = Agent::start_with_id(&id, &redis_config(&redis)).expect("agent starts");
    let client = redis::Client::open(format!("redis://{redis}/3")).expect("client");
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5)).expect("redis");
    let key = format!("installed_image:{id}");
    let mut report: Option<String> = None;
    bai_agent_tests::wait_until("the installed-image report", Duration::from_secs(20), || {
        report = redis::cmd("GET").arg(&key).query(&mut conn).ok().flatten();
        report.is_some()
    })
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    agent.stop().expect("agent stops");
    let report = report.expect("report");
    let check = r#"
import sys
from pydantic import TypeAdapter
from ai.backend.common.data.image.types import InstalledImageInfo
images = TypeAdapter(list[InstalledImageInfo]).validate_json(sys.stdin.read())
for image in images:
    print(image.canonical, image.digest[:7], image.architecture)
"#;
    let (ok, text) = bai_agent_tests::run_backendai_python(check, report.as_bytes());
    assert!(ok, "InstalledImageInfo refuses the report:\n{text}\n{report}");
    let arch = if cfg!(target_arch = "aarch64") { "aarch64" } else { "x86_64" };
    assert!(text.lines().any(|l| l == format!("{BUSYBOX_IMAGE} sha256: {arch}")), "{text}");
}
