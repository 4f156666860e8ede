//! The manager-facing RPC of a real `bai-agent`: the Rust client's calls, FAILURE replies
//! for bad calls, malformed frames from a raw DEALER, per-order-key scheduling, and
//! interoperability with the real Python callosum library used as Backend.AI's manager uses it.

use std::{
    net::TcpListener,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bai_agent::rpc::{
    CallOptions, RpcClient, RpcClientError,
    codec::{self, Header, Message, MessageType, Payload},
};
use bai_agent_tests::{Agent, require_environment};
use bytes::Bytes;
use rmpv::Value;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// The pinned Python packages `cargo xtask setup` installs for the callosum test (the same
/// list as `PYTHON_PACKAGES` in xtask/src/setup.rs).
const PYTHON_PACKAGES: &str = "callosum==1.0.3 pyzmq==27.2.0 python-snappy==0.7.3 msgpack==1.2.4";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn s(text: &str) -> Value {
    Value::from(text)
}

/// `value[key]` of a msgpack map with string keys.
fn field<'a>(value: &'a Value, key: &str) -> &'a Value {
    value.as_map().and_then(|entries| codec::map_get(entries, key)).unwrap_or_else(|| panic!("no `{key}` in {value}"))
}

async fn connect(agent: &Agent) -> RpcClient {
    RpcClient::connect(&agent.rpc_addr).await.unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()))
}

#[test]
fn the_rust_client_calls_ping_health_hwinfo_and_local_config() {
    require_environment();
    let agent = Agent::start("").expect("agent starts");
    runtime().block_on(async {
        let client = connect(&agent).await;

        let pong = client.call("ping", vec![s("hello")], vec![]).await.expect("ping");
        assert_eq!(pong, s("hello"));
        let pong = client.call("ping", vec![], vec![("msg".into(), s("by keyword"))]).await.expect("ping kw");
        assert_eq!(pong, s("by keyword"));
        let uncompressed = CallOptions { zip: false, ..CallOptions::default() };
        let pong = client.call_with("ping", vec![s("plain")], vec![], &uncompressed).await.expect("ping, no zip");
        assert_eq!(pong, s("plain"));

        let health = client.call("health", vec![], vec![]).await.expect("health");
        assert_eq!(field(&health, "status"), &s("ok"), "{health}");
        assert_eq!(field(&health, "agent_id"), &s(&agent.id));
        assert_eq!(field(&health, "version"), &s(env!("CARGO_PKG_VERSION")));
        assert_eq!(field(&health, "docker_connected"), &Value::from(true));
        let uptime = field(&health, "uptime").as_f64().expect("uptime is a number");
        assert!(uptime > 0.0 && uptime < 600.0, "uptime {uptime}");

        let hwinfo = client.call("gather_hwinfo", vec![], vec![]).await.expect("gather_hwinfo");
        let cpu = field(&hwinfo, "cpu");
        assert_eq!(field(cpu, "status"), &s("healthy"));
        assert_eq!(field(cpu, "status_info"), &Value::Nil);
        let cores: usize = field(field(cpu, "metadata"), "cores").as_str().expect("string").parse().expect("number");
        let online = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        assert!(cores >= online, "hwinfo says {cores} cores, this process sees {online}");
        let mem = field(&hwinfo, "mem");
        assert_eq!(field(mem, "status"), &s("healthy"));
        let total: u64 = field(field(mem, "metadata"), "total").as_str().expect("string").parse().expect("number");
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        let kib: u64 =
            meminfo.lines().next().and_then(|l| l.split_whitespace().nth(1)).expect("MemTotal").parse().expect("kB");
        assert_eq!(total, kib * 1024);

        let local = client.call("get_local_config", vec![], vec![]).await.expect("get_local_config");
        let section = field(&local, "agent");
        assert_eq!(field(section, "id"), &s(&agent.id));
        assert_eq!(field(section, "rpc-listen-addr"), &s(&agent.rpc_addr));
        assert_eq!(field(section, "internal-addr"), &s(&agent.addr));
    });
}

#[test]
fn bad_calls_get_a_failure_naming_the_problem_and_the_agent_keeps_serving() {
    require_environment();
    let agent = Agent::start("").expect("agent starts");
    runtime().block_on(async {
        let client = connect(&agent).await;
        let failure = |err: RpcClientError| match err {
            RpcClientError::Failure { error, .. } => error,
            other => panic!("expected a FAILURE, got {other}"),
        };

        let err = failure(client.call("foo", vec![], vec![]).await.expect_err("unknown method"));
        assert_eq!(err.message(), "unknown method `foo`");
        assert_eq!(err.name, "AttributeError");

        let err = failure(client.call("ping", vec![Value::from(5)], vec![]).await.expect_err("wrong type"));
        assert_eq!(err.message(), "ping: argument `msg` must be a string, got integer");
        assert_eq!(err.name, "TypeError");
        assert!(err.repr.starts_with("TypeError('ping: argument"), "{}", err.repr);

        let err = failure(client.call("ping", vec![], vec![]).await.expect_err("missing"));
        assert_eq!(err.message(), "ping: missing required argument `msg`");
        let err = failure(client.call("ping", vec![s("a")], vec![("bogus".into(), s("b"))]).await.expect_err("kw"));
        assert_eq!(err.message(), "ping: unexpected keyword argument `bogus`");
        // Debugging methods exist only with `[debug] enabled = true`.
        let err = failure(client.call("debug_sleep", vec![Value::from(0)], vec![]).await.expect_err("not debug"));
        assert_eq!(err.message(), "unknown method `debug_sleep`");

        assert_eq!(client.call("ping", vec![s("after")], vec![]).await.expect("still serving"), s("after"));
        // A new connection works too.
        let second = connect(&agent).await;
        assert_eq!(second.call("ping", vec![s("again")], vec![]).await.expect("ping"), s("again"));
    });
}

/// A DEALER that speaks raw frames.
struct RawPeer {
    socket: DealerSocket,
}

impl RawPeer {
    async fn connect(addr: &str) -> RawPeer {
        let mut socket = DealerSocket::new();
        socket.connect(&format!("tcp://{addr}")).await.expect("raw DEALER connects");
        RawPeer { socket }
    }

    async fn send(&mut self, frames: Vec<Vec<u8>>) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        self.socket.send(ZmqMessage::try_from(frames).expect("frames")).await.expect("send");
    }

    async fn request(&mut self, method: &str, okey: &str, seq: u64, args: Vec<Value>) {
        let message = Message::request(method, s(okey), seq, args, vec![]);
        let (header, body) = message.encode().expect("encode");
        self.send(vec![b"UPPER".to_vec(), header, body]).await;
    }

    async fn recv(&mut self, timeout: Duration) -> Option<Vec<Bytes>> {
        match tokio::time::timeout(timeout, self.socket.recv()).await {
            Ok(Ok(message)) => Some(message.into_vec()),
            Ok(Err(err)) => panic!("raw DEALER receive failed: {err}"),
            Err(_) => None,
        }
    }

    /// The next reply, decoded.
    async fn reply(&mut self) -> Message {
        let frames = self.recv(Duration::from_secs(10)).await.expect("a reply within 10 s");
        assert_eq!(frames.len(), 3, "a DEALER gets [UPPER, header, body]");
        assert_eq!(frames[0].as_ref(), b"UPPER");
        Message::decode(&frames[1], &frames[2]).expect("a reply that decodes")
    }
}

fn failure_message(reply: &Message) -> String {
    assert_eq!(reply.header.kind, MessageType::Failure, "{reply:?}");
    match &reply.payload {
        Payload::Error(error) => error.message(),
        other => panic!("a FAILURE without error metadata: {other:?}"),
    }
}

#[test]
fn malformed_frames_from_a_raw_dealer_do_not_stop_the_server() {
    require_environment();
    let agent = Agent::start("").expect("agent starts");
    runtime().block_on(async {
        let mut raw = RawPeer::connect(&agent.rpc_addr).await;

        // The keepalive: [PING, "", ""] is answered [PONG, "", ""].
        raw.send(vec![b"PING".to_vec(), vec![], vec![]]).await;
        let pong = raw.recv(Duration::from_secs(5)).await.expect("PONG");
        assert_eq!(pong, vec![Bytes::from_static(b"PONG"), Bytes::new(), Bytes::new()]);

        // No reply address in any of these: they are dropped with a warning.
        raw.send(vec![b"just one frame".to_vec()]).await;
        raw.send(vec![b"UPPER".to_vec(), b"h".to_vec()]).await;
        raw.send(vec![b"UPPER".to_vec(), vec![1], vec![2], vec![3], vec![4]]).await;
        raw.send(vec![b"UPPER".to_vec(), b"\x85\xa4garbage".to_vec(), b"garbage".to_vec()]).await;
        raw.send(vec![b"BOGUS".to_vec(), vec![], vec![]]).await;
        let no_seq = codec::pack(&Value::Map(vec![
            (s("type"), Value::from(1)),
            (s("meth"), s("ping")),
            (s("okey"), s("")),
            (s("zip"), Value::from(false)),
        ]))
        .expect("pack");
        raw.send(vec![b"UPPER".to_vec(), no_seq, vec![0x80]]).await;

        // A readable header with a broken body: FAILURE to that address.
        let header =
            Header { kind: MessageType::Function, method: "ping".into(), order_key: s("k"), seq: 1, zip: true };
        raw.send(vec![b"UPPER".to_vec(), codec::encode_header(&header).expect("header"), b"not snappy".to_vec()]).await;
        // A body whose `args` is not an array.
        let plain = Header { seq: 2, zip: false, ..header.clone() };
        let body = Message {
            header: plain.clone(),
            payload: Payload::Value(Some(Value::Map(vec![(s("args"), Value::from(5))]))),
        };
        let (h, b) = body.encode().expect("encode");
        raw.send(vec![b"UPPER".to_vec(), h, b]).await;
        // And a good call after all of that, on the same key.
        raw.request("ping", "k", 3, vec![s("survived")]).await;

        let first = raw.reply().await;
        assert_eq!((first.header.seq, &first.header.method, &first.header.order_key), (1, &"ping".to_owned(), &s("k")));
        let message = failure_message(&first);
        assert!(message.contains("malformed request") && message.contains("snappy"), "{message}");
        let second = raw.reply().await;
        assert_eq!(second.header.seq, 2);
        assert_eq!(failure_message(&second), "ping: `args` must be an array, got integer");
        let third = raw.reply().await;
        assert_eq!(third.header.seq, 3);
        assert_eq!(third.header.kind, MessageType::Result);
        assert_eq!(third.payload, Payload::Value(Some(s("survived"))));
        assert!(raw.recv(Duration::from_millis(300)).await.is_none(), "the dropped messages must get no reply");

        let client = connect(&agent).await;
        assert_eq!(client.call("ping", vec![s("fine")], vec![]).await.expect("ping"), s("fine"));
    });
    let log = agent.log_text();
    assert!(log.contains("dropping an RPC message of 1 frames"), "{log}");
    assert!(log.contains("dropping an RPC message with no reply address"), "{log}");
    assert!(log.contains("unknown frame type \"BOGUS\""), "{log}");
}

#[test]
fn one_order_key_runs_in_order_and_different_keys_run_concurrently() {
    require_environment();
    let agent = Agent::start("[debug]\nenabled = true\n").expect("agent starts");
    runtime().block_on(async {
        // Same key, one connection: the slow first call finishes before the quick second
        // one starts, so the replies come back in order and take the sum of the sleeps.
        let mut raw = RawPeer::connect(&agent.rpc_addr).await;
        let started = Instant::now();
        raw.request("debug_sleep", "same", 10, vec![Value::F64(0.6), s("slow")]).await;
        raw.request("debug_sleep", "same", 11, vec![Value::F64(0.0), s("quick")]).await;
        raw.request("ping", "same", 12, vec![s("last")]).await;
        let replies = [raw.reply().await, raw.reply().await, raw.reply().await];
        let seqs: Vec<u64> = replies.iter().map(|r| r.header.seq).collect();
        assert_eq!(seqs, [10, 11, 12], "same-key replies must keep the request order");
        assert_eq!(replies[1].payload, Payload::Value(Some(s("quick"))));
        assert!(started.elapsed() >= Duration::from_millis(600));

        // Different keys: the quick call overtakes the slow one.
        raw.request("debug_sleep", "a", 20, vec![Value::F64(0.6), s("slow")]).await;
        raw.request("debug_sleep", "b", 21, vec![Value::F64(0.0), s("quick")]).await;
        let first = raw.reply().await;
        let second = raw.reply().await;
        assert_eq!((first.header.seq, second.header.seq), (21, 20), "a different key must not wait");

        // Two one-second calls on different keys take about one second, not two.
        let client = connect(&agent).await;
        let on = |key: &str| CallOptions { order_key: s(key), ..CallOptions::default() };
        let (k1, k2) = (on("k1"), on("k2"));
        let started = Instant::now();
        let (a, b) = tokio::join!(
            client.call_with("debug_sleep", vec![Value::from(1), s("a")], vec![], &k1),
            client.call_with("debug_sleep", vec![Value::from(1), s("b")], vec![], &k2),
        );
        let elapsed = started.elapsed();
        assert_eq!((a.expect("a"), b.expect("b")), (s("a"), s("b")));
        assert!(elapsed < Duration::from_millis(1800), "different keys ran one after another: {elapsed:?}");

        // A call the client gives up on is cancelled on the agent, and the key is free again.
        let short = CallOptions { timeout: Duration::from_millis(200), ..on("c") };
        let err = client.call_with("debug_sleep", vec![Value::from(30)], vec![], &short).await.expect_err("times out");
        assert!(matches!(err, RpcClientError::Timeout { .. }), "{err}");
        let started = Instant::now();
        let pong = client.call_with("ping", vec![s("free")], vec![], &on("c")).await.expect("ping");
        assert_eq!(pong, s("free"));
        assert!(started.elapsed() < Duration::from_secs(5), "the cancelled call still held its key");
    });
}

#[test]
fn sigterm_cancels_running_calls_and_the_agent_exits_cleanly() {
    require_environment();
    let mut agent = Agent::start("[debug]\nenabled = true\n").expect("agent starts");
    let rt = runtime();
    let (stopped, reply) = rt.block_on(async {
        let client = connect(&agent).await;
        let call = client.call("debug_sleep", vec![Value::from(30), s("never")], vec![]);
        let stop = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let started = Instant::now();
            let status = tokio::task::block_in_place(|| agent.stop());
            (status, started.elapsed())
        };
        tokio::join!(stop, call)
    });
    let (status, took) = stopped;
    let status = status.expect("the agent stops");
    assert!(status.success(), "exit status {status}; log:\n{}", agent.log_text());
    assert!(took < Duration::from_secs(10), "shutdown took {took:?} with a call in flight");
    let err = reply.expect_err("the call cannot finish");
    assert!(matches!(err, RpcClientError::Cancelled { .. }), "expected CANCELLED, got {err}");
    assert!(agent.log_text().contains("RPC server stopped"), "{}", agent.log_text());
}

#[test]
fn the_real_python_callosum_client_interoperates() {
    require_environment();
    let import = Command::new("python3").args(["-c", "import callosum, zmq, snappy, msgpack"]).output();
    match import {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "python3 cannot import callosum and its transports ({}); `cargo xtask setup` installs them \
             (python3 -m pip install {PYTHON_PACKAGES})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!("python3 does not run ({err}); the callosum compatibility test needs it"),
    }
    let agent = Agent::start("").expect("agent starts");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/callosum_client.py");
    let out = Command::new("python3").arg(&script).arg(&agent.rpc_addr).output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{}\nagent log:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("the script prints JSON");

    assert_eq!(result["ping"], "hello from callosum");
    assert_eq!(result["ping_kwargs"], "by keyword");
    assert_eq!(result["ping_bytes_okey"], "bytes okey", "callosum's default b\"\" order key must be echoed as bytes");
    assert_eq!(result["ping_uncompressed"], "no snappy");
    assert_eq!(result["ping_after_failures"], "still here", "a FAILURE must not break callosum's receive loop");
    let concurrent: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    assert_eq!(result["concurrent"], serde_json::json!(concurrent));

    assert_eq!(result["hwinfo"]["cpu"]["status"], "healthy");
    assert!(result["hwinfo"]["cpu"]["status_info"].is_null());
    let cores: usize = result["hwinfo"]["cpu"]["metadata"]["cores"].as_str().expect("cores").parse().expect("number");
    assert!(cores >= 1);
    assert_eq!(result["hwinfo"]["mem"]["status"], "healthy");
    assert_eq!(result["health"]["agent_id"], agent.id.as_str());
    assert_eq!(result["local_config"]["agent"]["rpc-listen-addr"], agent.rpc_addr.as_str());

    // callosum raises RPCUserError(name, repr, traceback) from our FAILURE metadata.
    let unknown = &result["unknown"];
    assert_eq!(unknown["raised"], "RPCUserError");
    assert_eq!(unknown["name"], "AttributeError");
    assert_eq!(unknown["repr"], "AttributeError('unknown method `no_such_method`')");
    assert!(
        unknown["traceback"]
            .as_str()
            .expect("traceback")
            .ends_with("AttributeError: unknown method `no_such_method`\n")
    );
    let wrong = &result["wrong_type"];
    assert_eq!(wrong["raised"], "RPCUserError");
    assert_eq!(wrong["name"], "TypeError");
    assert_eq!(wrong["repr"], "TypeError('ping: argument `msg` must be a string, got integer')");
}

#[test]
fn a_taken_rpc_port_stops_the_agent_naming_the_key() {
    require_environment();
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr");
    let http = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"i-rpc-port-taken\"\ninternal-addr = \"{http}\"\nrpc-listen-addr = \"{taken}\"\n[monitor]\nbpffs-dir = \"\"\n"
        ),
    )
    .expect("write config");
    let out = Command::new(bai_agent_tests::agent_binary()).arg("--config").arg(&config).output().expect("agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must not start on a taken RPC port: {stderr}");
    assert!(stderr.contains("agent.rpc-listen-addr") && stderr.contains(&taken.to_string()), "{stderr}");
}

#[test]
fn the_rpc_address_can_be_set_on_the_command_line() {
    require_environment();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[agent]\nrpc-listen-addr = \"127.0.0.1:9\"\n").expect("write config");
    let out = Command::new(bai_agent_tests::agent_binary())
        .arg("--config")
        .arg(&config)
        .args(["--rpc-listen-addr", "127.0.0.1:16001", "--check-config"])
        .output()
        .expect("agent runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rpc_listen_addr: 127.0.0.1:16001"), "{stdout}");
}

/// Backend.AI 26.9's typed calls, made as its `AgentClient._call_v3` makes them (`req={}` and
/// `agent_id=` as keywords): the replies validate against Backend.AI 26.9.6's own response
/// models (`HealthResp`, `GatherHwinfoResp`), in the venv `cargo xtask setup` makes.
#[test]
fn typed_26_9_calls_answer_what_backend_ais_response_models_accept() {
    require_environment();
    let agent = Agent::start("").expect("agent starts");
    let replies = runtime().block_on(async {
        let client = connect(&agent).await;
        let kwargs = || vec![("req".to_owned(), Value::Map(Vec::new())), ("agent_id".to_owned(), s(&agent.id))];
        let health = client.call("health_v2", vec![], kwargs()).await.expect("health_v2");
        let hwinfo = client.call("gather_hwinfo_v2", vec![], kwargs()).await.expect("gather_hwinfo_v2");
        (health, hwinfo)
    });
    let input = serde_json::json!({
        "health": bai_agent::msgpack_json::to_json(&replies.0),
        "hwinfo": bai_agent::msgpack_json::to_json(&replies.1),
    });
    let check = r#"
import sys, json
from ai.backend.common.dto.agent.response import HealthResp, GatherHwinfoResp
replies = json.load(sys.stdin)
health = HealthResp.model_validate(replies["health"])
hwinfo = GatherHwinfoResp.model_validate(replies["hwinfo"])
print(health.status.value, health.component, health.connectivity.overall_healthy,
      sorted(d.device_name for d in hwinfo.devices), [d.status.value for d in hwinfo.devices])
"#;
    let (ok, text) = bai_agent_tests::run_backendai_python(check, input.to_string().as_bytes());
    assert!(ok, "Backend.AI 26.9.6's models refuse the replies:\n{text}\nreplies: {input}");
    // Healthy once the monitor is synced (a degraded start names what is missing instead).
    assert!(
        text.starts_with("ok agent True") || text.starts_with("degraded agent False"),
        "status, component and connectivity agree: {text}"
    );
    assert!(text.trim_end().ends_with("['cpu', 'mem'] ['healthy', 'healthy']"), "{text}");
    // Another agent's id is refused, naming both.
    let err = runtime().block_on(async {
        connect(&agent)
            .await
            .call(
                "health_v2",
                vec![],
                vec![("req".to_owned(), Value::Map(Vec::new())), ("agent_id".to_owned(), s("i-else"))],
            )
            .await
            .expect_err("another agent's call")
    });
    assert!(
        err.to_string().contains(&format!("this call is for agent `i-else`, but this is agent `{}`", agent.id)),
        "{err}"
    );
}
