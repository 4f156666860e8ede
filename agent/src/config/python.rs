//! A Python agent's `agent.toml` as bai-agent reads it: the keys Backend.AI's agent (26.9) has
//! that bai-agent does not use are set aside and reported once, by name; the ones both have in
//! another form (`{ host, port }` addresses, a few names) are translated. Anything else that is
//! unknown stays an error, so a typo of one of bai-agent's own keys still stops the start.
//!
//! This is the one place that knows the Python agent's configuration keys.

use toml::{Table, Value};

/// Keys of the Python agent's `agent.toml` that bai-agent has no use for: `section.key`, or a
/// whole `section`.
const UNUSED: &[&str] = &[
    "agent.mode",
    "agent.ssl-enabled",
    "agent.ssl-cert",
    "agent.ssl-privkey",
    "agent.advertised-rpc-addr",
    "agent.rpc-auth-manager-public-key",
    "agent.rpc-auth-agent-keypair",
    "agent.agent-sock-port",
    "agent.pid-file",
    "agent.event-loop",
    "agent.var-base-path",
    "agent.abuse-report-path",
    "agent.cohabiting-storage-proxy",
    "agent.allow-compute-plugins",
    "agent.block-compute-plugins",
    "agent.allow-network-plugins",
    "agent.block-network-plugins",
    "agent.force-terminate-abusing-containers",
    "agent.kernel-creation-concurrency-per-image",
    "agent.use-experimental-redis-event-dispatcher",
    "agent.docker-mode",
    "agent.backend",
    "agent.sync-container-lifecycles",
    "agent.internal-addr-for-remote",
    // The metadata service listens where kernels are redirected (policy.metadata-service-host).
    "agent.metadata-server-bind-host",
    "container.kernel-uid",
    "container.kernel-gid",
    "container.jail-args",
    "container.scratch-type",
    "container.scratch-size",
    "container.scratch-nfs-address",
    "container.scratch-nfs-options",
    "container.stats-type",
    "container.krunner-volumes",
    "container.swarm-enabled",
    "container.alternative-bridge",
    "container.advertised-host",
    "container.advertised-port-range",
    "container.use-host-network",
    "watcher.ssl-enabled",
    "watcher.ssl-cert",
    "watcher.ssl-privkey",
    "logging.drivers",
    "logging.pkg-ns",
    "logging.console",
    "logging.file",
    "logging.logstash",
    "logging.graylog",
    "logging.version",
    "logging.disable-existing-loggers",
    "resource.reserved-disk",
    "resource.allocation-order",
    "resource.affinity-policy",
    "resource.memory-align-size",
    "debug.skip-container-deletion",
    "debug.asyncio",
    "debug.enhanced-aiomonitor-task-info",
    "debug.log-events",
    "debug.log-kernel-config",
    "debug.log-alloc-map",
    "debug.log-stats",
    "debug.log-heartbeats",
    "debug.log-docker-events",
    "debug.coredump",
    "etcd.addrs",
    "redis.sentinel",
    "redis.service-name",
    "redis.redis-helper-config",
    "pyroscope",
    "otel",
    "service-discovery",
    "api",
    "kernel-lifecycles",
    "agent-common",
];

/// Keys the Python agent names differently: (its key, bai-agent's). Its key is set aside when
/// the file sets bai-agent's too.
const RENAMED: &[(&str, &str)] = &[
    ("agent.service-addr", "agent.internal-addr"),
    ("agent.initial-resource-group-name", "agent.scaling-group"),
    ("agent.mount-path", "container.mount-root"),
    ("agent.metadata-server-port", "policy.metadata-service-port"),
    ("container.sandbox-type", "policy.sandbox-type"),
];

/// Addresses the Python agent writes as `{ host = "…", port = … }`.
const ADDRESSES: &[&str] =
    &["agent.rpc-listen-addr", "agent.internal-addr", "etcd.addr", "redis.addr", "watcher.service-addr"];

/// Rewrites `table` in place into bai-agent's keys; returns the keys set aside, sorted.
pub fn translate(table: &mut Table) -> Vec<String> {
    let mut set_aside = Vec::new();
    for (theirs, ours) in RENAMED {
        let Some(value) = take(table, theirs) else { continue };
        if get(table, ours).is_some() {
            set_aside.push((*theirs).to_owned());
        } else {
            put(table, ours, value);
        }
    }
    for key in UNUSED {
        if take(table, key).is_some() {
            set_aside.push((*key).to_owned());
        }
    }
    for key in ADDRESSES {
        if let Some(value) = get_mut(table, key)
            && let Some(text) = host_port(value)
        {
            *value = Value::String(text);
        }
    }
    // Python's logging levels are upper case (`INFO`); a `tracing` filter's are lower case.
    if let Some(Value::String(level)) = get_mut(table, "logging.level")
        && ["TRACE", "DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"].contains(&level.as_str())
    {
        *level = match level.as_str() {
            "WARNING" => "warn".into(),
            "CRITICAL" => "error".into(),
            other => other.to_ascii_lowercase(),
        };
    }
    // Sections the Python agent has that end up empty are not unknown sections.
    table.retain(|_, value| !matches!(value, Value::Table(inner) if inner.is_empty()));
    set_aside.sort();
    set_aside
}

/// `{ host, port }` as `host:port` (an IPv6 host in brackets).
fn host_port(value: &Value) -> Option<String> {
    let table = value.as_table()?;
    let host = table.get("host")?.as_str()?;
    let port = table.get("port")?.as_integer()?;
    if table.len() != 2 {
        return None;
    }
    Some(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}

fn split(key: &str) -> (&str, Option<&str>) {
    match key.split_once('.') {
        Some((section, name)) => (section, Some(name)),
        None => (key, None),
    }
}

fn get<'t>(table: &'t Table, key: &str) -> Option<&'t Value> {
    match split(key) {
        (section, Some(name)) => table.get(section)?.as_table()?.get(name),
        (section, None) => table.get(section),
    }
}

fn get_mut<'t>(table: &'t mut Table, key: &str) -> Option<&'t mut Value> {
    match split(key) {
        (section, Some(name)) => table.get_mut(section)?.as_table_mut()?.get_mut(name),
        (section, None) => table.get_mut(section),
    }
}

fn take(table: &mut Table, key: &str) -> Option<Value> {
    match split(key) {
        (section, Some(name)) => table.get_mut(section)?.as_table_mut()?.remove(name),
        (section, None) => table.remove(section),
    }
}

fn put(table: &mut Table, key: &str, value: Value) {
    match split(key) {
        (section, Some(name)) => {
            let entry = table.entry(section).or_insert_with(|| Value::Table(Table::new()));
            if let Some(inner) = entry.as_table_mut() {
                inner.insert(name.to_owned(), value);
            }
        }
        (section, None) => {
            table.insert(section.to_owned(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(text: &str) -> (Table, Vec<String>) {
        let mut table: Table = text.parse().expect("TOML");
        let set_aside = translate(&mut table);
        (table, set_aside)
    }

    #[test]
    fn addresses_names_and_levels_are_translated() {
        let (table, set_aside) = translated(
            "[agent]\nrpc-listen-addr = { host = \"127.0.0.1\", port = 6001 }\nservice-addr = { host = \"::1\", port = 6003 }\n\
             initial-resource-group-name = \"gpu\"\n[etcd]\naddr = { host = \"etcd\", port = 2379 }\n[logging]\nlevel = \"WARNING\"\n",
        );
        assert!(set_aside.is_empty(), "{set_aside:?}");
        assert_eq!(get(&table, "agent.rpc-listen-addr").and_then(Value::as_str), Some("127.0.0.1:6001"));
        assert_eq!(get(&table, "agent.internal-addr").and_then(Value::as_str), Some("[::1]:6003"));
        assert_eq!(get(&table, "agent.scaling-group").and_then(Value::as_str), Some("gpu"));
        assert_eq!(get(&table, "etcd.addr").and_then(Value::as_str), Some("etcd:2379"));
        assert_eq!(get(&table, "logging.level").and_then(Value::as_str), Some("warn"));
    }

    #[test]
    fn unused_keys_and_sections_are_set_aside_and_ours_stay() {
        let (table, set_aside) = translated(
            "[agent]\nmode = \"docker\"\nid = \"i-1\"\nintervall = 3\n[pyroscope]\nenabled = false\n\
             [container]\nkernel-uid = -1\n[logging.file]\npath = \"./logs\"\n",
        );
        assert_eq!(set_aside, ["agent.mode", "container.kernel-uid", "logging.file", "pyroscope"]);
        assert_eq!(get(&table, "agent.id").and_then(Value::as_str), Some("i-1"));
        // Not the Python agent's: left for the unknown-key check to name.
        assert!(get(&table, "agent.intervall").is_some());
        assert!(table.get("container").is_none() && table.get("logging").is_none(), "{table:?}");
    }

    #[test]
    fn our_own_key_wins_over_the_python_name() {
        let (table, set_aside) = translated(
            "[agent]\ninternal-addr = \"127.0.0.1:9\"\nservice-addr = { host = \"0.0.0.0\", port = 6003 }\n",
        );
        assert_eq!(set_aside, ["agent.service-addr"]);
        assert_eq!(get(&table, "agent.internal-addr").and_then(Value::as_str), Some("127.0.0.1:9"));
    }
}
