//! The agent against a real etcd: the shared configuration under `/sorna/{namespace}/` fills
//! what `agent.toml` leaves unset (the Redis address from `config/redis/addr` takes effect:
//! events arrive there), never what the file sets; a malformed shared value or an unreachable
//! etcd stops the start with an error naming the etcd key or `etcd.addr`; the node key
//! `/sorna/{namespace}/nodes/agents/{agent_id}` lives under a lease while the agent runs, is
//! removed on SIGTERM, outlives a `kill -9` only for the lease's TTL, and comes back after an
//! etcd outage.
//!
//! The shared etcd is `BAI_TEST_ETCD` (started by `cargo xtask test`); every test works in a
//! namespace of its own. The outage test runs an etcd of its own.

use std::time::Duration;

use bai_agent::rpc::{client::RpcClient, codec::map_get};
use bai_agent_tests::{
    Agent, EtcdServer, EventCollector, etcd_client, etcd_get, free_loopback_port, require_environment, test_etcd,
    test_redis, unique, wait_until,
};
use rmpv::Value;

const EVENTS_DB: u32 = 4;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn etcd_config(addr: &str, namespace: &str) -> String {
    format!("[etcd]\naddr = \"{addr}\"\nnamespace = \"{namespace}\"\n\n[debug]\nheartbeat-interval = \"500ms\"\n")
}

/// `value[key]` of a msgpack map with string keys.
fn field<'a>(value: &'a Value, key: &str) -> &'a Value {
    value.as_map().and_then(|entries| map_get(entries, key)).unwrap_or_else(|| panic!("no `{key}` in {value}"))
}

/// `get_local_config()` of a running agent.
async fn local_config(agent: &Agent) -> Value {
    let client = RpcClient::connect(&agent.rpc_addr)
        .await
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    client.call("get_local_config", vec![], vec![]).await.expect("get_local_config")
}

async fn put(client: &mut etcd_client::Client, key: &str, value: &str) {
    client.put(key, value, None).await.unwrap_or_else(|err| panic!("etcd put {key}: {err}"));
}

/// Polls etcd until `key` exists (`present`) or is gone.
async fn wait_for_key(client: &mut etcd_client::Client, key: &str, present: bool, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if etcd_get(client, key).await.ok().flatten().is_some() == present {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_redis_address_in_etcd_takes_effect_and_the_node_is_registered_while_the_agent_runs() {
    require_environment();
    let (redis, etcd) = (test_redis(), test_etcd());
    let ns = unique("ns-overlay");
    let id = unique("i-etcd");
    let node = format!("/sorna/{ns}/nodes/agents/{id}");
    let rt = runtime();
    let mut client = rt.block_on(etcd_client(&etcd)).expect("etcd client");
    rt.block_on(put(&mut client, &format!("/sorna/{ns}/config/redis/addr"), &redis));
    let rules = r#"["192.0.2.0/24", {"cidr": "198.51.100.0/24", "ports": "22", "name": "no-ssh"}]"#;
    rt.block_on(put(&mut client, &format!("/sorna/{ns}/config/policy/deny"), rules));

    // No [redis] in the file: only etcd says where the manager's Redis is.
    let collector = EventCollector::start(&redis, EVENTS_DB, &id).expect("collector");
    let mut agent = Agent::start_with_id(&id, &etcd_config(&etcd, &ns)).expect("agent starts");
    collector
        .wait_for("agent_started and a heartbeat in the Redis named by etcd", Duration::from_secs(20), |events| {
            events.iter().any(|e| e.name == "agent_started") && events.iter().any(|e| e.name == "agent_heartbeat")
        })
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    let local = rt.block_on(local_config(&agent));
    assert_eq!(field(field(&local, "redis"), "addr"), &Value::from(redis.as_str()));
    assert_eq!(field(field(&local, "etcd"), "namespace"), &Value::from(ns.as_str()));
    assert!(agent.log_text().contains("configured from etcd"), "{}", agent.log_text());
    // Fields are coloured in the log: drop the escape sequences before matching `deny=2`.
    let plain = |line: &str| {
        let mut text = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                chars.by_ref().find(|c| *c == 'm');
            } else {
                text.push(c);
            }
        }
        text
    };
    let enforced = agent
        .log_text()
        .lines()
        .any(|line| line.contains("enforced on every kernel") && plain(line).contains("deny=2"));
    assert!(enforced, "the node's deny rules came from etcd: {}", agent.log_text());

    // Registered: Backend.AI's status value and the `ip` the manager reads, under one lease.
    let (status, lease) = rt
        .block_on(etcd_get(&mut client, &node))
        .expect("etcd get")
        .unwrap_or_else(|| panic!("{node} is missing while the agent runs; log:\n{}", agent.log_text()));
    assert_eq!(status, "running");
    assert_ne!(lease, 0, "the node key must be under a lease");
    let (ip, ip_lease) = rt.block_on(etcd_get(&mut client, &format!("{node}/ip"))).expect("get").expect("ip key");
    assert_eq!((ip.as_str(), ip_lease), ("127.0.0.1", lease));
    let (port, port_lease) =
        rt.block_on(etcd_get(&mut client, &format!("{node}/watcher_port"))).expect("get").expect("watcher_port");
    assert_eq!((port.as_str(), port_lease), ("6009", lease), "where the manager finds the watcher");
    let ttl = rt.block_on(client.lease_time_to_live(lease, None)).expect("lease info");
    assert_eq!(ttl.granted_ttl(), bai_agent::etcd::LEASE_TTL_SECS);

    // SIGTERM: the registration goes with the agent, at once (not when the lease runs out).
    let exit = agent.stop().expect("agent stops");
    assert!(exit.success(), "exit status {exit}; log:\n{}", agent.log_text());
    assert_eq!(rt.block_on(etcd_get(&mut client, &node)).expect("get"), None, "log:\n{}", agent.log_text());
    assert_eq!(rt.block_on(etcd_get(&mut client, &format!("{node}/ip"))).expect("get"), None);
    assert!(agent.log_text().contains("node registration removed from etcd"), "{}", agent.log_text());
}

#[test]
fn redis_address_set_in_the_toml_wins_over_etcd() {
    require_environment();
    let (redis, etcd) = (test_redis(), test_etcd());
    let ns = unique("ns-explicit");
    let id = unique("i-etcd-explicit");
    let rt = runtime();
    let mut client = rt.block_on(etcd_client(&etcd)).expect("etcd client");
    // etcd names a Redis where nothing listens; the file names the real one.
    let elsewhere = format!("127.0.0.1:{}", free_loopback_port().expect("port"));
    rt.block_on(put(&mut client, &format!("/sorna/{ns}/config/redis/addr"), &elsewhere));

    let collector = EventCollector::start(&redis, EVENTS_DB, &id).expect("collector");
    let toml = format!("{}\n[redis]\naddr = \"{redis}\"\n", etcd_config(&etcd, &ns));
    let mut agent = Agent::start_with_id(&id, &toml).expect("agent starts");
    collector
        .wait_for("agent_started in the Redis named by the file", Duration::from_secs(20), |events| {
            events.iter().any(|e| e.name == "agent_started")
        })
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    let local = rt.block_on(local_config(&agent));
    assert_eq!(field(field(&local, "redis"), "addr"), &Value::from(redis.as_str()));
    assert!(!agent.log_text().contains(&elsewhere), "etcd's address must not be used:\n{}", agent.log_text());
    agent.stop().expect("agent stops");
}

#[test]
fn a_malformed_value_in_etcd_stops_the_start_naming_the_etcd_key() {
    require_environment();
    let etcd = test_etcd();
    let ns = unique("ns-malformed");
    let rt = runtime();
    let mut client = rt.block_on(etcd_client(&etcd)).expect("etcd client");
    let key = format!("/sorna/{ns}/config/redis/addr");
    rt.block_on(put(&mut client, &key, "nowhere"));
    let err = match Agent::start(&etcd_config(&etcd, &ns)) {
        Ok(agent) => panic!("the agent started with redis addr \"nowhere\"; log:\n{}", agent.log_text()),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("exited with"), "{err}");
    assert!(err.contains(&format!("`{key}`")), "the error must name the etcd key: {err}");
}

#[test]
fn an_unreachable_etcd_stops_the_start_naming_etcd_addr() {
    require_environment();
    let addr = format!("127.0.0.1:{}", free_loopback_port().expect("port"));
    let err = match Agent::start(&etcd_config(&addr, "local")) {
        Ok(agent) => panic!("the agent started without its etcd; log:\n{}", agent.log_text()),
        Err(err) => err.to_string(),
    };
    assert!(err.contains(&format!("cannot reach etcd at {addr} (etcd.addr)")), "{err}");
}

#[test]
fn a_killed_agents_registration_stays_only_for_the_leases_ttl() {
    require_environment();
    let etcd = test_etcd();
    let ns = unique("ns-killed");
    let id = unique("i-etcd-killed");
    let node = format!("/sorna/{ns}/nodes/agents/{id}");
    let rt = runtime();
    let mut client = rt.block_on(etcd_client(&etcd)).expect("etcd client");
    let mut agent = Agent::start_with_id(&id, &etcd_config(&etcd, &ns)).expect("agent starts");
    assert!(rt.block_on(wait_for_key(&mut client, &node, true, Duration::from_secs(10))), "{}", agent.log_text());
    agent.kill_hard().expect("kill -9");

    // Nobody revoked it: the key stays, counting down the lease the agent no longer renews.
    let (_, lease) = rt.block_on(etcd_get(&mut client, &node)).expect("get").expect("still registered");
    let first = rt.block_on(client.lease_time_to_live(lease, None)).expect("lease info").ttl();
    assert!(first > 0 && first <= bai_agent::etcd::LEASE_TTL_SECS, "ttl {first}");
    std::thread::sleep(Duration::from_millis(2100));
    let later = rt.block_on(client.lease_time_to_live(lease, None)).expect("lease info").ttl();
    assert!(later < first, "the lease must run down after the crash: {first} s, then {later} s");
    rt.block_on(client.lease_revoke(lease)).expect("clean up");
    assert_eq!(rt.block_on(etcd_get(&mut client, &node)).expect("get"), None);
}

#[test]
fn an_etcd_outage_does_not_stop_the_agent_and_the_registration_returns() {
    require_environment();
    let mut etcd = EtcdServer::start().expect("etcd starts");
    let ns = unique("ns-outage");
    let id = unique("i-etcd-outage");
    let node = format!("/sorna/{ns}/nodes/agents/{id}");
    let rt = runtime();
    let mut agent = Agent::start_with_id(&id, &etcd_config(&etcd.addr(), &ns)).expect("agent starts");
    {
        let mut client = rt.block_on(etcd_client(&etcd.addr())).expect("etcd client");
        assert!(rt.block_on(wait_for_key(&mut client, &node, true, Duration::from_secs(10))), "{}", agent.log_text());
    }

    etcd.stop().expect("etcd stops");
    let warning = "cannot keep the node registered in etcd";
    wait_until("the outage warning", Duration::from_secs(30), || agent.log_text().contains(warning))
        .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    // Retries go on (every 2 s) without more warnings, and the agent keeps serving.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(agent.log_text().matches(warning).count(), 1, "one warning per outage:\n{}", agent.log_text());
    assert_eq!(agent.get("/readyz").expect("readyz").0, 200);

    // A fresh etcd (every key and lease gone): the agent registers again by itself.
    etcd.restart(true).expect("etcd restarts");
    let mut client = rt.block_on(etcd_client(&etcd.addr())).expect("etcd client");
    assert!(
        rt.block_on(wait_for_key(&mut client, &node, true, Duration::from_secs(30))),
        "the registration did not return; log:\n{}",
        agent.log_text()
    );
    // The key is in etcd a moment before the agent logs that it is.
    wait_until("the recovery log line", Duration::from_secs(5), || {
        agent.log_text().contains("etcd is reachable again")
    })
    .unwrap_or_else(|err| panic!("{err}; agent log:\n{}", agent.log_text()));
    let exit = agent.stop().expect("agent stops");
    assert!(exit.success(), "exit status {exit}; log:\n{}", agent.log_text());
    assert_eq!(rt.block_on(etcd_get(&mut client, &node)).expect("get"), None);
}
