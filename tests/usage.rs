//! Usage records end to end, on a real Docker engine, real eBPF and real Redis: a kernel's
//! deltas add up exactly to its counters across a `kill -9` of the agent and a torn journal
//! line; records journaled while Redis is down for a minute (and the agent is killed before
//! sending them) all arrive once it is back, with the same ids, in order per kernel, none
//! twice; a consumer group sees each record once; the HTTP sink takes CloudEvents batches
//! and retries until the endpoint accepts them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bai_agent::rpc::client::RpcClient;
use bai_agent_tests::{
    Agent, BUSYBOX_IMAGE, RedisServer, UsageCollector, UsageEntry, agentctl_binary, free_loopback_port,
    kernels::{create, created_id, kernel_config, kernel_toml, runtime, with_field},
    require_environment, test_redis, unique, wait_until,
};
use rmpv::Value;

const FAST: &str = "[monitor]\ninterval = \"200ms\"\ngone-series-grace = \"30s\"\n";
const EVENTS_DB: u32 = 4;

/// Config of an agent running kernels, with 2 s usage windows and its events in `redis`.
fn usage_toml(dir: &Path, first_port: u16, redis: &str, usage: &str) -> String {
    format!("{}{FAST}[usage]\ninterval = \"2s\"\n{usage}", kernel_toml(dir, first_port).replace(&test_redis(), redis))
}

/// `12.5` → 12_500_000_000: a decimal string of seconds in nanoseconds, exactly.
fn nanos(text: &str) -> u128 {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    assert!(frac.len() <= 9, "more than nanosecond digits: {text}");
    whole.parse::<u128>().expect("whole part") * 1_000_000_000
        + format!("{frac:0<9}").parse::<u128>().expect("fraction")
}

fn rfc3339_ns(text: &str) -> u128 {
    humantime::parse_rfc3339(text)
        .expect("RFC 3339")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos()
}

/// The journal's lines, as JSON.
fn journal_lines(journal_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(journal_dir.join("usage.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn marker(journal_dir: &Path, sink: &str) -> u64 {
    std::fs::read_to_string(journal_dir.join(format!("usage.{sink}.delivered")))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// One kernel's records, deduplicated by id (a resent record must be identical), in seq
/// order; asserts the sequence is 0, 1, 2, … with windows that meet and one final record last.
fn records_of(entries: &[UsageEntry], kernel_id: &str) -> Vec<serde_json::Value> {
    let mut by_id: BTreeMap<u64, serde_json::Value> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.kernel_id() == kernel_id) {
        assert_eq!(entry.fields, ["event"], "one field per stream entry");
        assert_eq!(entry.id(), format!("{kernel_id}:{}", entry.seq()));
        if let Some(earlier) = by_id.insert(entry.seq(), entry.event.clone()) {
            assert_eq!(earlier, entry.event, "a record sent twice must be the same record");
        }
    }
    let records: Vec<serde_json::Value> = by_id.into_values().collect();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["data"]["seq"], i as u64, "no seq is missing: {records:#?}");
        assert_eq!(record["specversion"], "1.0");
        assert_eq!(record["type"], "ai.backend.kernel.usage");
        assert_eq!(record["subject"], "project-9");
        assert_eq!(record["datacontenttype"], "application/json");
        assert_eq!(record["time"], record["data"]["window_end"]);
        if i + 1 < records.len() {
            assert_eq!(record["data"]["final"], false, "only the last record is final");
        }
    }
    for pair in records.windows(2) {
        assert_eq!(pair[0]["data"]["window_end"], pair[1]["data"]["window_start"], "windows meet exactly");
    }
    records
}

fn sum_u64(records: &[serde_json::Value], field: &str) -> u64 {
    records.iter().map(|r| r["data"][field].as_u64().expect("a count")).sum()
}

fn sum_seconds(records: &[serde_json::Value], pointer: &str) -> u128 {
    records.iter().map(|r| nanos(r["data"].pointer(pointer).and_then(|v| v.as_str()).expect("seconds"))).sum()
}

fn container_has(container: &str, path: &str) -> bool {
    Command::new("docker").args(["exec", container, "test", "-e", path]).output().is_ok_and(|o| o.status.success())
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    agent
        .metrics()
        .expect("scrape")
        .into_iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

#[test]
fn a_kernels_deltas_add_up_to_its_final_counters_across_a_kill_9_and_a_torn_journal_line() {
    require_environment();
    let redis = RedisServer::start(free_loopback_port().expect("port")).expect("redis");
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("state");
    let toml = usage_toml(dir.path(), 22000, &redis.addr(), "");
    let id = unique("i-test");
    let collector = UsageCollector::start(&redis.addr(), EVENTS_DB, "usage", &id).expect("collector");
    let mut agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let kernel = unique("kernel");
    // CPU, disk and network (to its own web server over its own loopback) for about 8 s, then
    // idle. It waits 2 s first, as the agent begins counting a container once Docker reports it.
    let script = "mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1048576 count=2 2>/dev/null && \
                  httpd -p 127.0.0.1:8080 -h /www && sleep 2 && i=0; while [ $i -lt 8 ]; do \
                  wget -q -O /dev/null http://127.0.0.1:8080/blob; \
                  dd if=/dev/zero of=/direct bs=65536 count=16 oflag=direct 2>/dev/null; \
                  dd if=/direct of=/dev/null bs=65536 iflag=direct 2>/dev/null; i=$((i+1)); sleep 1; done; \
                  touch /tmp/done; sleep 3600";
    let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "256m"), "startup_command", script.into());
    let created = rt.block_on(create(&client, "s", &kernel, config)).expect("create");
    let container = created_id(&created, "container_id");
    collector
        .wait_for("the first record", Duration::from_secs(20), |e| e.iter().any(|e| e.kernel_id() == kernel))
        .expect("a record");

    // kill -9 while the kernel works, and a crash's torn line at the end of the journal.
    agent.kill_hard().expect("kill -9");
    std::thread::sleep(Duration::from_secs(2));
    let mut file = std::fs::OpenOptions::new().append(true).open(journal.join("usage.jsonl")).expect("journal");
    file.write_all(br#"{"seq":99999,"kernel_id":"torn","meta":{"kern"#).expect("tear");
    drop(file);
    let agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent restarts over a torn journal");
    let log = agent.log_text();
    assert!(log.contains("the usage journal ends in a torn or corrupt record"), "{log}");
    assert!(log.contains("resuming usage metering from the journal's checkpoints"), "{log}");
    wait_until("the workload to finish", Duration::from_secs(40), || container_has(&container, "/tmp/done"))
        .expect("workload");
    std::thread::sleep(Duration::from_secs(1));
    let value = |name: &str| agent.kernel_value(name, &kernel).expect("scrape").unwrap_or_else(|| panic!("{name}"));
    let rx = value("container_network_receive_bytes_total");
    let tx = value("container_network_transmit_bytes_total");
    let read = value("container_fs_reads_bytes_total");
    let written = value("container_fs_writes_bytes_total");
    let cpu = value("container_cpu_usage_seconds_total");
    assert!(rx > 16e6, "eight 2 MiB downloads over loopback: {rx}");
    assert!(written >= 8.0 * 1048576.0 && read >= 8.0 * 1048576.0, "eight 1 MiB direct writes and reads");

    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    rt.block_on(client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![])).expect("destroy");
    let entries = collector
        .wait_for("the final record", Duration::from_secs(30), |e| {
            e.iter().any(|e| e.kernel_id() == kernel && e.is_final())
        })
        .expect("final");
    let records = records_of(&entries, &kernel);
    println!("{} records; cpu {cpu} s, rx {rx}, tx {tx}, read {read}, written {written}", records.len());
    assert!(records.len() >= 5, "2 s windows over 10 s and more: {}", records.len());
    let last = &records[records.len() - 1]["data"];
    assert_eq!(last["exit_reason"], "user-requested");
    assert_eq!(last["owner_user_id"], "user-7");
    assert_eq!(last["slots"]["cpu"], "1");

    // Everything the counters held once the workload was done is in the records, plus only
    // what stopping the container cost (a few pages read by exiting processes, CPU).
    for (field, counted, slack) in [
        ("net_rx_bytes", rx, 0.0),
        ("net_tx_bytes", tx, 0.0),
        ("io_read_bytes", read, 256.0 * 1024.0),
        ("io_write_bytes", written, 256.0 * 1024.0),
    ] {
        let sum = sum_u64(&records, field) as f64;
        assert!(sum >= counted && sum <= counted + slack, "{field}: records {sum} vs {counted} counted");
    }
    // CPU: the counter as read, plus what stopping the container cost.
    let cpu_sum = sum_seconds(&records, "/cpu_seconds") as f64 / 1e9;
    assert!(cpu_sum >= cpu - 1e-6 && cpu_sum < cpu + 0.05, "cpu {cpu_sum} s in records vs {cpu} s counted");
    // One CPU held from the first window's start to the last one's end, to the nanosecond.
    let held = rfc3339_ns(last["window_end"].as_str().expect("end"))
        - rfc3339_ns(records[0]["data"]["window_start"].as_str().expect("start"));
    assert_eq!(sum_seconds(&records, "/slot_seconds/cpu"), held);
    assert_eq!(sum_seconds(&records, "/slot_seconds/mem"), held * 268_435_456);
    let peaks: Vec<u64> = records.iter().map(|r| r["data"]["mem_peak_bytes"].as_u64().expect("peak")).collect();
    // (The first window may end before the monitor has seen the container at all, the last may
    // start after it stopped.)
    assert!(
        peaks[1..peaks.len() - 1].iter().all(|&peak| peak > 0),
        "memory in use is sampled in every window: {peaks:?}"
    );

    // The journal's last checkpoint holds the kernel's totals: the sum of its deltas, exactly.
    let lines = journal_lines(&journal);
    let final_line = lines.iter().rev().find(|l| l["kernel_id"] == kernel.as_str()).expect("the kernel's last line");
    let totals = &final_line["checkpoint"]["totals"];
    assert_eq!(final_line["checkpoint"]["closed"], true);
    assert_eq!(u128::from(totals["cpu_ns"].as_u64().expect("cpu_ns")), sum_seconds(&records, "/cpu_seconds"));
    for field in ["net_rx_bytes", "net_tx_bytes", "io_read_bytes", "io_write_bytes"] {
        assert_eq!(totals[field].as_u64(), Some(sum_u64(&records, field)), "{field}: the sum of the deltas");
    }
    assert_eq!(
        totals["mem_byte_ns"].as_str().map(|text| text.parse::<u128>().expect("a whole number")),
        Some(sum_seconds(&records, "/mem_byte_seconds")),
        "memory held over time"
    );
    assert!(!lines.iter().any(|l| l["kernel_id"] == "torn"), "the torn line is gone");

    // What `bai-agentctl usage` shows: the same records.
    let out = Command::new(agentctl_binary())
        .args(["usage", "--kernel", &kernel, "--journal-dir"])
        .arg(&journal)
        .output()
        .expect("agentctl");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains(&format!("{kernel}:0")) && table.contains("user-requested"), "{table}");
    assert!(table.contains("redis") && table.contains("sent"), "{table}");
    let out = Command::new(agentctl_binary())
        .args(["--json", "usage", "--kernel", &kernel, "--journal-dir"])
        .arg(&journal)
        .output()
        .expect("agentctl");
    let shown: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one CloudEvent per line"))
        .collect();
    assert_eq!(shown, records);
}

/// A kernel that forks thousands of short processes from its first instruction on: the
/// `cpu_seconds` of its records add up to the kernel's own accounting of its cgroup
/// (`cpuacct.usage` / `cpu.stat`) within 0.5 %, start-up included.
#[test]
fn a_fork_heavy_kernels_cpu_seconds_add_up_to_the_kernels_own_cpu_time() {
    require_environment();
    let redis = RedisServer::start(free_loopback_port().expect("port")).expect("redis");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = usage_toml(dir.path(), 22120, &redis.addr(), "");
    let id = unique("i-test");
    let collector = UsageCollector::start(&redis.addr(), EVENTS_DB, "usage", &id).expect("collector");
    let agent = Agent::start_with_id(&id, &toml).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let kernel = unique("kernel");
    let script = "i=0; while [ $i -lt 4000 ]; do /bin/true; i=$((i+1)); done; touch /home/work/done; exec sleep 3600";
    let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "256m"), "startup_command", script.into());
    let created = rt.block_on(create(&client, "s", &kernel, config)).expect("create");
    let container = bai_agent_tests::Container { id: created_id(&created, "container_id"), kernel_id: kernel.clone() };
    let truth = bai_agent_tests::cpu::KernelCpu::of(&container).expect("the kernel's cgroup");
    wait_until("the workload to finish", Duration::from_secs(60), || {
        dir.path().join("scratch").join(&kernel).join("work/done").exists()
    })
    .expect("workload");
    // The kernel idles from here on (in `sleep`): its cgroup's CPU time is final but for the stop.
    std::thread::sleep(Duration::from_millis(500));
    let kernel_s = truth.total_ns().expect("the kernel's CPU time") as f64 / 1e9;
    rt.block_on(client.call("destroy_kernel", vec![kernel.as_str().into(), "s".into()], vec![])).expect("destroy");
    let entries = collector
        .wait_for("the final record", Duration::from_secs(30), |e| {
            e.iter().any(|e| e.kernel_id() == kernel && e.is_final())
        })
        .expect("final");
    let records = records_of(&entries, &kernel);
    let cpu_sum = sum_seconds(&records, "/cpu_seconds") as f64 / 1e9;
    let error = bai_agent_tests::relative_error(cpu_sum, kernel_s);
    println!("{} records: cpu_seconds add up to {cpu_sum:.6} s, the kernel counted {kernel_s:.6} s", records.len());
    assert!(kernel_s > 0.5, "4000 fork+execs should take a while: {kernel_s} s");
    assert!(
        error < 0.005,
        "cpu_seconds add up to {cpu_sum} s, the kernel counted {kernel_s} s ({:.3} % off)",
        error * 100.0
    );
}

#[test]
fn records_made_while_redis_is_down_for_a_minute_arrive_once_each_in_order_after_a_kill_9() {
    require_environment();
    let mut redis = RedisServer::start(free_loopback_port().expect("port")).expect("redis");
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("state");
    let toml = usage_toml(dir.path(), 22040, &redis.addr(), "");
    let id = unique("i-test");
    let collector = UsageCollector::start(&redis.addr(), EVENTS_DB, "usage", &id).expect("collector");
    let mut agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let kernels = [unique("kernel"), unique("kernel")];
    for kernel in &kernels {
        let config = with_field(
            kernel_config(BUSYBOX_IMAGE, "1", "128m"),
            "startup_command",
            "while :; do sleep 0.1; done".into(),
        );
        rt.block_on(create(&client, "s", kernel, config)).expect("create");
    }
    collector
        .wait_for("a record of each kernel", Duration::from_secs(20), |e| {
            kernels.iter().all(|k| e.iter().any(|e| e.kernel_id() == k))
        })
        .expect("records");

    redis.stop().expect("redis down");
    let down_at = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let backlog = metric(&agent, "backendai_agent_usage_backlog_records", &[("sink", "redis")]).expect("backlog");
    let age = metric(&agent, "backendai_agent_usage_backlog_age_seconds", &[("sink", "redis")]).expect("age");
    let failures =
        metric(&agent, "backendai_agent_usage_delivery_failures_total", &[("sink", "redis")]).expect("failures");
    assert!(backlog >= 10.0, "two kernels, 2 s windows, 20 s down: backlog {backlog}");
    assert!(age >= 15.0, "the oldest waiting record is about 20 s old: {age}");
    assert!(failures >= 1.0, "{failures}");
    while down_at.elapsed() < Duration::from_secs(58) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Journaled, never sent: then kill -9.
    let delivered = marker(&journal, "redis");
    agent.kill_hard().expect("kill -9");
    let unsent: HashMap<String, serde_json::Value> = journal_lines(&journal)
        .into_iter()
        .filter(|l| l["seq"].as_u64().expect("seq") > delivered && l.get("event").is_some())
        .map(|l| (l["event"]["id"].as_str().expect("id").to_owned(), l["event"].clone()))
        .collect();
    assert!(unsent.len() >= 20, "about a minute of records waited in the journal: {}", unsent.len());
    std::thread::sleep(Duration::from_secs(2));
    assert!(down_at.elapsed() >= Duration::from_secs(60), "Redis was down a minute");
    redis.restart().expect("redis back");
    let agent = Agent::start_with_journal(&id, &journal, &toml).expect("agent restarts");
    assert!(agent.log_text().contains("undelivered usage records of an earlier run go first"), "{}", agent.log_text());

    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    rt.block_on(client.call("destroy_kernel", vec![kernels[0].as_str().into(), "s".into()], vec![])).expect("destroy");
    let entries = collector
        .wait_for("every unsent record and the final one", Duration::from_secs(60), |entries| {
            let ids: HashSet<&str> = entries.iter().map(UsageEntry::id).collect();
            unsent.keys().all(|id| ids.contains(id.as_str()))
                && entries.iter().any(|e| e.kernel_id() == kernels[0] && e.is_final())
        })
        .expect("delivered");
    for kernel in &kernels {
        let mine: Vec<&UsageEntry> = entries.iter().filter(|e| e.kernel_id() == kernel).collect();
        let ids: Vec<&str> = mine.iter().map(|e| e.id()).collect();
        let unique_ids: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(ids.len(), unique_ids.len(), "no record twice: {ids:?}");
        let seqs: Vec<u64> = mine.iter().map(|e| e.seq()).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "in order per kernel, none missing: {seqs:?}");
        records_of(&entries, kernel);
    }
    for entry in &entries {
        if let Some(journaled) = unsent.get(entry.id()) {
            assert_eq!(&entry.event, journaled, "a record arrives as it was journaled");
        }
    }
    assert_eq!(
        metric(&agent, "backendai_agent_usage_backlog_records", &[("sink", "redis")]),
        Some(0.0),
        "the backlog is gone"
    );

    // A billing consumer group over the stream (Redis came back empty: what the agent sent
    // since): each record is handed to exactly one of two consumers, once.
    let redis_client = redis::Client::open(format!("redis://{}/{EVENTS_DB}", redis.addr())).expect("client");
    let mut conn = redis_client.get_connection_with_timeout(Duration::from_secs(5)).expect("redis");
    let () = redis::cmd("XGROUP").arg("CREATE").arg("usage").arg("billing").arg("0").query(&mut conn).expect("group");
    let all: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg("usage").arg("-").arg("+").query(&mut conn).expect("xrange");
    let mut seen: Vec<String> = Vec::new();
    for round in 0.. {
        let consumer = if round % 2 == 0 { "worker-1" } else { "worker-2" };
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("billing")
            .arg(consumer)
            .arg("COUNT")
            .arg(3)
            .arg("STREAMS")
            .arg("usage")
            .arg(">")
            .query(&mut conn)
            .expect("xreadgroup");
        let ids: Vec<String> =
            reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect()).unwrap_or_default();
        if ids.is_empty() {
            break;
        }
        let _: u64 = redis::cmd("XACK").arg("usage").arg("billing").arg(&ids).query(&mut conn).expect("xack");
        seen.extend(ids);
    }
    let in_stream: Vec<String> = all.ids.into_iter().map(|e| e.id).collect();
    assert!(!in_stream.is_empty());
    assert_eq!(seen, in_stream, "each entry once, in stream order");
    let pending: redis::streams::StreamPendingReply =
        redis::cmd("XPENDING").arg("usage").arg("billing").query(&mut conn).expect("xpending");
    assert_eq!(pending.count(), 0);
}

/// A request the endpoint answered: its status, headers (names in lowercase) and body.
type Answered = (u16, HashMap<String, String>, String);

/// A CloudEvents endpoint that refuses the first `refuse` requests with 503.
struct Endpoint {
    port: u16,
    requests: Arc<Mutex<Vec<Answered>>>,
}

impl Endpoint {
    fn start(refuse: usize) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut headers = HashMap::new();
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.trim_end().split_once(':') {
                        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
                    }
                }
                let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let mut requests = log.lock().expect("lock");
                let status = if requests.len() < refuse { 503 } else { 200 };
                requests.push((status, headers, String::from_utf8_lossy(&body).into_owned()));
                drop(requests);
                let reason = if status == 200 { "OK" } else { "Service Unavailable" };
                let _ = write!(stream, "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        Endpoint { port, requests }
    }

    fn accepted(&self) -> Vec<serde_json::Value> {
        let requests = self.requests.lock().expect("lock");
        requests
            .iter()
            .filter(|(status, _, _)| *status == 200)
            .flat_map(|(_, _, body)| match serde_json::from_str(body).expect("a JSON body") {
                serde_json::Value::Array(events) => events,
                other => panic!("a batch is a JSON array: {other}"),
            })
            .collect()
    }
}

#[test]
fn the_http_sink_posts_cloudevents_batches_and_retries_until_accepted() {
    require_environment();
    let endpoint = Endpoint::start(2);
    let redis = RedisServer::start(free_loopback_port().expect("port")).expect("redis");
    let dir = tempfile::tempdir().expect("tempdir");
    let usage =
        format!("http-endpoint = \"http://127.0.0.1:{}/usage\"\nhttp-bearer-token = \"t0ken\"\n", endpoint.port);
    let id = unique("i-test");
    let collector = UsageCollector::start(&redis.addr(), EVENTS_DB, "usage", &id).expect("collector");
    let agent = Agent::start_with_id(&id, &usage_toml(dir.path(), 22080, &redis.addr(), &usage)).expect("agent starts");
    let rt = runtime();
    let client = rt.block_on(RpcClient::connect(&agent.rpc_addr)).expect("connect");
    let kernel = unique("kernel");
    let config = with_field(kernel_config(BUSYBOX_IMAGE, "1", "128m"), "startup_command", "sleep 3600".into());
    rt.block_on(create(&client, "s", &kernel, config)).expect("create");
    std::thread::sleep(Duration::from_secs(5));
    rt.block_on(client.call("destroy_kernel", vec![Value::from(kernel.as_str()), "s".into()], vec![]))
        .expect("destroy");
    wait_until("the final record over HTTP", Duration::from_secs(30), || {
        endpoint.accepted().iter().any(|e| e["data"]["kernel_id"] == kernel.as_str() && e["data"]["final"] == true)
    })
    .expect("final");

    let requests = endpoint.requests.lock().expect("lock").clone();
    assert!(requests.len() >= 3, "two refusals, then accepted batches: {}", requests.len());
    for (_, headers, _) in &requests {
        assert_eq!(headers.get("content-type").map(String::as_str), Some("application/cloudevents-batch+json"));
        assert_eq!(headers.get("authorization").map(String::as_str), Some("Bearer t0ken"));
    }
    // What was refused is sent again: the accepted batches hold every record once, in order.
    let accepted: Vec<serde_json::Value> =
        endpoint.accepted().into_iter().filter(|e| e["data"]["kernel_id"] == kernel.as_str()).collect();
    let seqs: Vec<u64> = accepted.iter().map(|e| e["data"]["seq"].as_u64().expect("seq")).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert!(accepted.len() >= 3, "{seqs:?}");
    // Redis got the same records, independently.
    let entries = collector
        .wait_for("the final record in Redis", Duration::from_secs(10), |e| {
            e.iter().any(|e| e.kernel_id() == kernel && e.is_final())
        })
        .expect("redis");
    assert_eq!(records_of(&entries, &kernel), accepted);
    assert!(
        metric(&agent, "backendai_agent_usage_delivery_failures_total", &[("sink", "http")]).expect("failures") >= 2.0
    );
    assert_eq!(
        metric(&agent, "backendai_agent_usage_delivered_total", &[("sink", "http")]),
        Some(accepted.len() as f64)
    );
}
