//! Backend.AI's etcd: the shared configuration under `/sorna/{namespace}/` laid over
//! `agent.toml` at startup, and this node's registration under `nodes/agents/{agent_id}`.
//!
//! Keys read (relative to `/sorna/{namespace}/`, path components URL-quoted as Backend.AI's
//! `AsyncEtcd` writes them):
//!
//! | etcd key | fills |
//! |---|---|
//! | `config/redis/addr` (`host:port`) | `redis.addr` |
//! | `config/redis/password` (empty = none) | `redis.password` |
//! | `volumes/_mount` (or `volumes/mount`; an absolute path) | `container.mount-root` |
//! | `config/watcher/token` | `watcher.token` |
//! | `config/policy/deny`, `config/policy/allow` (a JSON array of rules in `[policy]`'s syntax) | `policy.deny`, `policy.allow` |
//! | `config/plugins/accelerator/{plugin}/{allocation_mode, quantum_size, unit_mem, unit_proc, device_mask, reserved_memory}` (Backend.AI's plugin settings; `device_mask` comma-separated) | `accelerators.{plugin}.*`, when the file has no `[accelerators.{plugin}]` |
//!
//! An etcd value fills a key only when `agent.toml` did not set that key itself: the file
//! wins over etcd, etcd wins over the built-in defaults. A key the file set is not read from
//! etcd at all (so a malformed shared value does not stop an agent that pinned its own).
//! A malformed value that would be used is an error naming the etcd key; the agent refuses to
//! start, as it does for a bad value in the file.
//!
//! Keys written, all under one lease of [`LEASE_TTL_SECS`] kept alive while the agent runs and
//! revoked on a clean shutdown (a crashed agent's keys expire with the lease):
//!
//! | etcd key | value |
//! |---|---|
//! | `nodes/agents/{agent_id}` | `running` (Backend.AI's node status) |
//! | `nodes/agents/{agent_id}/ip` | the host the manager reaches this node by (the heartbeat's `ip`) |
//! | `nodes/agents/{agent_id}/watcher_port` | `watcher.service-addr`'s port (`bai-watcher`) |
//!
//! Backend.AI's managers read `nodes/agents/{agent_id}/ip` and `watcher_port`. `bai-watcher`
//! writes `config/watcher/token` from its own `watcher.token` when etcd has none (the manager
//! reads the token there).
//!
//! etcd unreachable at startup, when `etcd.addr` is set, is an error naming `etcd.addr`: the
//! shared configuration (the manager's Redis, the vfolder mount root) is only known from etcd,
//! and an agent that started without it would quietly run with defaults that differ from the
//! cluster's; the service manager's restart policy retries. An outage after startup does not
//! stop the agent: the registration is renewed when etcd answers again (one warning per
//! outage, one notice when it is over).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use etcd_client::{Client, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RedisAddr};

/// How long connecting and each request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The registration lease's time to live: how long a crashed agent stays registered.
pub const LEASE_TTL_SECS: i64 = 30;
/// Backend.AI's status value of a serving agent.
pub const NODE_STATUS: &str = "running";

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot reach etcd at {addr} (etcd.addr): {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("invalid value in etcd for `{key}`: {message}")]
    InvalidValue { key: String, message: String },
}

/// `/sorna/{namespace}/`: the prefix of every key of a namespace.
pub fn namespace_prefix(namespace: &str) -> String {
    format!("/sorna/{namespace}/")
}

/// `nodes/agents/{agent_id}`: the registration key of an agent, relative to the prefix.
pub fn node_key(agent_id: &str) -> String {
    format!("nodes/agents/{agent_id}")
}

/// What the overlay changed: `(config key, etcd key)` pairs, for the log.
pub type Applied = Vec<(&'static str, String)>;

/// Lays the shared configuration `keys` (relative to `/sorna/{namespace}/`, unquoted, e.g.
/// `config/redis/addr`) over `config`, leaving every key the TOML set itself
/// (`config.explicit_keys`) alone. Errors name the full etcd key.
pub fn overlay(config: &mut Config, keys: &BTreeMap<String, String>) -> Result<Applied, EtcdError> {
    let prefix = namespace_prefix(&config.etcd.namespace);
    let mut applied = Applied::new();
    let explicit = config.explicit_keys.clone();
    // The value of the first of `names` present in etcd, unless the file set `config_key`.
    let lookup = |config_key: &str, names: &[&str]| -> Option<(String, String)> {
        if explicit.contains(config_key) {
            return None;
        }
        names.iter().find_map(|name| keys.get(*name).map(|value| (format!("{prefix}{name}"), value.trim().to_owned())))
    };
    let invalid = |key: &str, message: String| EtcdError::InvalidValue { key: key.to_owned(), message };

    if let Some((key, value)) = lookup("redis.addr", &["config/redis/addr"]) {
        let addr: RedisAddr = value.parse().map_err(|message| invalid(&key, message))?;
        config.redis.addr = Some(addr);
        applied.push(("redis.addr", key));
    }
    if let Some((key, value)) = lookup("redis.password", &["config/redis/password"]) {
        config.redis.password = (!value.is_empty()).then_some(value);
        applied.push(("redis.password", key));
    }
    if let Some((key, value)) = lookup("container.mount-root", &["volumes/_mount", "volumes/mount"]) {
        let path = PathBuf::from(&value);
        if !path.is_absolute() {
            return Err(invalid(&key, format!("{value:?} is not an absolute path")));
        }
        config.container.mount_root = path;
        applied.push(("container.mount-root", key));
    }
    for (config_key, etcd_key) in [("policy.deny", "config/policy/deny"), ("policy.allow", "config/policy/allow")] {
        if let Some((key, value)) = lookup(config_key, &[etcd_key]) {
            let rules: Vec<crate::config::NetworkRule> = serde_json::from_str(&value)
                .map_err(|err| invalid(&key, format!("expected a JSON array of network rules: {err}")))?;
            if config_key == "policy.deny" {
                config.policy.deny = rules;
                applied.push(("policy.deny", key));
            } else {
                config.policy.allow = rules;
                applied.push(("policy.allow", key));
            }
        }
    }
    overlay_accelerators(config, keys, &prefix, &explicit, &mut applied)?;
    if let Some((key, value)) = lookup("watcher.token", &["config/watcher/token"]) {
        if value.is_empty() {
            return Err(invalid(&key, "must not be empty".into()));
        }
        config.watcher.token = Some(value);
        applied.push(("watcher.token", key));
    }
    Ok(applied)
}

/// Backend.AI's accelerator plugin settings (`config/plugins/accelerator/{plugin}/{field}`),
/// for each plugin the file has no `[accelerators.{plugin}]` table for.
fn overlay_accelerators(
    config: &mut Config,
    keys: &BTreeMap<String, String>,
    prefix: &str,
    explicit: &std::collections::BTreeSet<String>,
    applied: &mut Applied,
) -> Result<(), EtcdError> {
    const ROOT: &str = "config/plugins/accelerator/";
    let mut tables: BTreeMap<&str, toml::Table> = BTreeMap::new();
    for (name, value) in keys.range(ROOT.to_owned()..).take_while(|(name, _)| name.starts_with(ROOT)) {
        let Some((plugin, field)) = name[ROOT.len()..].split_once('/') else { continue };
        if explicit.contains(&format!("accelerators.{plugin}")) {
            continue;
        }
        let value = value.trim();
        // Each field as the file would have it, checked by the same parser below.
        let toml_value = match field {
            "allocation_mode" | "quantum_size" | "unit_mem" | "reserved_memory" => {
                toml::Value::String(value.to_owned())
            }
            "unit_proc" => toml::Value::Integer(value.parse().map_err(|_| EtcdError::InvalidValue {
                key: format!("{prefix}{name}"),
                message: format!("{value:?} is not a count"),
            })?),
            "device_mask" => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(|id| toml::Value::String(id.to_owned()))
                    .collect(),
            ),
            _ => continue,
        };
        tables.entry(plugin).or_default().insert(field.replace('_', "-"), toml_value);
    }
    for (plugin, table) in tables {
        let key = format!("{prefix}{ROOT}{plugin}/");
        let settings: crate::config::AcceleratorSettings = table.try_into().map_err(|err: toml::de::Error| {
            EtcdError::InvalidValue { key: key.clone(), message: err.message().to_owned() }
        })?;
        config.accelerators.insert(plugin.to_owned(), settings);
        applied.push(("accelerators", key));
    }
    Ok(())
}

/// The keys of `pairs` under `prefix`, relative to it with each path component unquoted
/// (Backend.AI quotes components with `urllib.parse.quote(safe="")`).
pub fn relative_keys<'a>(
    prefix: &str,
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .filter_map(|(key, value)| {
            let key = String::from_utf8_lossy(key);
            let rest = key.strip_prefix(prefix)?;
            let rest = rest.split('/').map(percent_decode).collect::<Vec<_>>().join("/");
            Some((rest, String::from_utf8_lossy(value).into_owned()))
        })
        .collect()
}

/// Percent-decoding (`%2F` → `/`), as of an etcd key component Backend.AI quoted or a URL's
/// query value; a malformed escape stays as it is.
pub fn percent_decode(component: &str) -> String {
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection to the configured etcd, in one namespace.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    addr: String,
    prefix: String,
}

impl Etcd {
    /// Connects to `etcd.addr` when it is set and checks that etcd answers (within
    /// [`REQUEST_TIMEOUT`]); `None` when no etcd is configured.
    pub async fn connect(config: &Config) -> Result<Option<Etcd>, EtcdError> {
        let Some(addr) = &config.etcd.addr else {
            return Ok(None);
        };
        let addr = addr.to_string();
        let unreachable = |reason: String| EtcdError::Unreachable { addr: addr.clone(), reason };
        let mut options = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
        if let (Some(user), Some(password)) = (&config.etcd.user, &config.etcd.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        let connecting = Client::connect([format!("http://{addr}")], Some(options));
        let client = within(connecting).await.map_err(unreachable)?;
        let etcd = Etcd { client, addr: addr.clone(), prefix: namespace_prefix(&config.etcd.namespace) };
        Ok(Some(etcd))
    }

    /// The shared keys of the namespace (`config/…`, `volumes/…`), relative to its prefix.
    pub async fn shared_keys(&self) -> Result<BTreeMap<String, String>, EtcdError> {
        let mut keys = BTreeMap::new();
        for section in ["config/", "volumes/"] {
            let mut client = self.client.clone();
            let key = format!("{}{section}", self.prefix);
            let response = within(client.get(key, Some(GetOptions::new().with_prefix())))
                .await
                .map_err(|reason| EtcdError::Unreachable { addr: self.addr.clone(), reason })?;
            keys.extend(relative_keys(&self.prefix, response.kvs().iter().map(|kv| (kv.key(), kv.value()))));
        }
        Ok(keys)
    }

    /// Writes `value` at `key` (relative to the namespace) unless the key exists; returns the
    /// value etcd holds afterwards.
    pub async fn put_if_absent(&self, key: &str, value: &str) -> Result<String, EtcdError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
        let full = format!("{}{key}", self.prefix);
        let txn = Txn::new()
            .when([Compare::version(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(full.clone(), value, None)])
            .or_else([TxnOp::get(full.clone(), None)]);
        let mut client = self.client.clone();
        let response = within(client.txn(txn))
            .await
            .map_err(|reason| EtcdError::Unreachable { addr: self.addr.clone(), reason })?;
        if response.succeeded() {
            return Ok(value.to_owned());
        }
        let held = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        Ok(held.unwrap_or_default())
    }

    /// Reads the shared keys and lays them over `config` (see [`overlay`]), logging what came
    /// from etcd (names only: some values are secrets).
    pub async fn apply_shared_config(&self, config: &mut Config) -> Result<(), EtcdError> {
        let keys = self.shared_keys().await?;
        if keys.contains_key("config/redis/sentinel") {
            tracing::warn!(key = %format!("{}config/redis/sentinel", self.prefix), "Redis Sentinel is not supported; using config/redis/addr");
        }
        let applied = overlay(config, &keys)?;
        for (config_key, etcd_key) in &applied {
            tracing::info!(key = config_key, from = %etcd_key, "configured from etcd");
        }
        tracing::info!(addr = %self.addr, prefix = %self.prefix, keys = keys.len(), applied = applied.len(), "read the shared configuration from etcd");
        Ok(())
    }

    /// Registers the node (`nodes/agents/{agent_id}` = [`NODE_STATUS`], `…/ip` and
    /// `…/watcher_port`, where the manager finds the watcher) under a lease and keeps it alive
    /// until `shutdown`, then revokes it. Runs as a task: an etcd outage is retried (the lease
    /// renewed, the keys written again) and never ends it.
    pub fn register(&self, agent_id: &str, ip: &str, watcher_port: u16, shutdown: CancellationToken) -> JoinHandle<()> {
        let node = format!("{}{}", self.prefix, node_key(agent_id));
        let values = vec![
            (node.clone(), NODE_STATUS.to_owned()),
            (format!("{node}/ip"), ip.to_owned()),
            (format!("{node}/watcher_port"), watcher_port.to_string()),
        ];
        let registration = Registration { etcd: self.clone(), node, values, lease: None, keeper: None };
        tokio::spawn(registration.run(shutdown))
    }
}

/// `future` with [`REQUEST_TIMEOUT`]; the error is the reason as text.
async fn within<T>(future: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(describe(&err)),
        Err(_) => Err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())),
    }
}

/// An etcd-client error in a few words: a gRPC status's message and its innermost cause
/// (`tcp connect error: Connection refused (os error 111)`) rather than its debug dump.
fn describe(err: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return err.to_string();
    };
    let mut text = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(error) = cause {
        innermost = Some(error.to_string());
        cause = error.source();
    }
    if let Some(innermost) = innermost.filter(|inner| !text.contains(inner.as_str())) {
        text = if text.is_empty() { innermost } else { format!("{text}: {innermost}") };
    }
    if text.is_empty() { format!("{:?}", status.code()) } else { text }
}

/// The keep-alive task's state.
struct Registration {
    etcd: Etcd,
    node: String,
    values: Vec<(String, String)>,
    /// The lease the keys are attached to, once granted.
    lease: Option<i64>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Registration {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut outage = false;
        loop {
            let step = if self.lease.is_some() { self.keep_alive().await } else { self.put_keys().await };
            match step {
                Ok(()) if outage => {
                    tracing::info!(key = %self.node, "etcd is reachable again; node registration renewed");
                    outage = false;
                }
                Ok(()) => {}
                Err(reason) if !outage => {
                    tracing::warn!(addr = %self.etcd.addr, key = %self.node, %reason,
                        "cannot keep the node registered in etcd; retrying until it answers");
                    outage = true;
                }
                Err(reason) => tracing::debug!(%reason, "etcd still unreachable"),
            }
            // A third of the TTL leaves two more tries before the lease runs out.
            let pause = if outage { Duration::from_secs(2) } else { Duration::from_secs(LEASE_TTL_SECS as u64 / 3) };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.keeper = None;
        if let Some(lease) = self.lease.take() {
            let mut client = self.etcd.client.clone();
            match within(client.lease_revoke(lease)).await {
                Ok(_) => tracing::info!(key = %self.node, "node registration removed from etcd"),
                Err(reason) => tracing::warn!(key = %self.node, %reason,
                    "cannot remove the node registration from etcd; it expires with its lease"),
            }
        }
    }

    /// Grants a lease and writes the keys under it in one transaction.
    async fn put_keys(&mut self) -> Result<(), String> {
        let mut client = self.etcd.client.clone();
        let lease = within(client.lease_grant(LEASE_TTL_SECS, None)).await?.id();
        let options = PutOptions::new().with_lease(lease);
        let puts: Vec<TxnOp> = self
            .values
            .iter()
            .map(|(key, value)| TxnOp::put(key.as_str(), value.as_str(), Some(options.clone())))
            .collect();
        if let Err(reason) = within(client.txn(Txn::new().and_then(puts))).await {
            let _ = within(client.lease_revoke(lease)).await;
            return Err(reason);
        }
        tracing::info!(key = %self.node, lease, ttl_s = LEASE_TTL_SECS, "node registered in etcd");
        self.lease = Some(lease);
        Ok(())
    }

    /// One keep-alive round trip; a lease that expired meanwhile (an outage longer than its
    /// TTL, or a new etcd) is replaced and the keys written again.
    async fn keep_alive(&mut self) -> Result<(), String> {
        let Some(lease) = self.lease else { return self.put_keys().await };
        let Some((keeper, stream)) = self.keeper.as_mut() else {
            // Opening the stream is itself a round trip: etcd-client renews once and fails
            // with `LeaseKeepAliveError` when etcd answers that the lease is gone.
            let mut client = self.etcd.client.clone();
            return match tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease)).await {
                Ok(Ok(keeper)) => {
                    self.keeper = Some(keeper);
                    Ok(())
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => self.register_again(lease).await,
                Ok(Err(err)) => Err(describe(&err)),
                Err(_) => Err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())),
            };
        };
        let answer = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match within(answer).await {
            Ok(Some(response)) if response.ttl() > 0 => Ok(()),
            Ok(Some(_)) => self.register_again(lease).await,
            Ok(None) => {
                self.keeper = None;
                Err("etcd closed the keep-alive stream".into())
            }
            Err(reason) => {
                self.keeper = None;
                Err(reason)
            }
        }
    }

    async fn register_again(&mut self, lease: i64) -> Result<(), String> {
        tracing::info!(key = %self.node, lease, "the registration lease is gone from etcd; registering again");
        self.keeper = None;
        self.lease = None;
        self.put_keys().await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, Path::new("agent.toml")).expect("valid TOML")
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn accelerator_settings_come_from_backend_ais_plugin_keys_unless_the_file_has_them() {
        let mut settings = config("[etcd]\naddr = \"127.0.0.1:2379\"\n");
        let shared = keys(&[
            ("config/plugins/accelerator/cuda/allocation_mode", "fractional"),
            ("config/plugins/accelerator/cuda/quantum_size", "0.05"),
            ("config/plugins/accelerator/cuda/device_mask", "GPU-a, GPU-b"),
            ("config/plugins/accelerator/cuda/unit_proc", "16"),
            ("config/plugins/accelerator/cuda/something_else", "ignored"),
        ]);
        overlay(&mut settings, &shared).expect("applies");
        let cuda = &settings.accelerators["cuda"];
        assert_eq!(cuda.allocation_mode, crate::resources::AllocationMode::Fractional);
        assert_eq!(cuda.quantum_size.to_string(), "0.05");
        assert_eq!(cuda.device_mask, vec!["GPU-a".to_owned(), "GPU-b".to_owned()]);
        assert_eq!((cuda.unit_proc, cuda.unit_mem), (16, 2 << 30), "unset fields keep their defaults");

        let mut pinned = config("[accelerators.cuda]\nallocation-mode = \"discrete\"\n");
        overlay(&mut pinned, &shared).expect("applies");
        assert_eq!(pinned.accelerators["cuda"].allocation_mode, crate::resources::AllocationMode::Discrete);

        let mut broken = config("");
        let err = overlay(&mut broken, &keys(&[("config/plugins/accelerator/cuda/allocation_mode", "halves")]))
            .expect_err("not a mode")
            .to_string();
        assert!(err.contains("config/plugins/accelerator/cuda/") && err.contains("halves"), "{err}");
    }

    #[test]
    fn etcd_values_replace_defaults() {
        let mut config = config("[etcd]\naddr = \"127.0.0.1:2379\"\n");
        let applied = overlay(
            &mut config,
            &keys(&[
                ("config/redis/addr", "redis.internal:6380"),
                ("config/redis/password", "s3cret"),
                ("volumes/_mount", "/mnt/vfroot"),
                ("config/watcher/token", "tok"),
                ("config/docker/registry/cr.backend.ai", "https://cr.backend.ai"),
                ("config/policy/deny", r#"["10.0.0.0/8", {"cidr": "192.0.2.0/24", "ports": "22", "name": "ssh"}]"#),
            ]),
        )
        .expect("valid values");
        assert_eq!(config.policy.deny.len(), 2);
        assert_eq!(config.policy.deny[1].name, "ssh");
        assert_eq!(config.redis.addr, Some(RedisAddr { host: "redis.internal".into(), port: 6380 }));
        assert_eq!(config.redis.password.as_deref(), Some("s3cret"));
        assert_eq!(config.container.mount_root, Path::new("/mnt/vfroot"));
        assert_eq!(config.watcher.token.as_deref(), Some("tok"));
        let names: Vec<&str> = applied.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["redis.addr", "redis.password", "container.mount-root", "policy.deny", "watcher.token"]);
        assert_eq!(applied[0].1, "/sorna/local/config/redis/addr");
    }

    #[test]
    fn keys_the_toml_set_win_over_etcd() {
        let mut config = config(
            "[redis]\naddr = \"127.0.0.1:7000\"\n\n[container]\nmount-root = \"/srv/vf\"\n\n[etcd]\naddr = \"127.0.0.1:2379\"\n",
        );
        let applied = overlay(
            &mut config,
            &keys(&[
                ("config/redis/addr", "redis.internal:6380"),
                ("config/redis/password", "s3cret"),
                ("volumes/_mount", "/mnt/vfroot"),
            ]),
        )
        .expect("valid values");
        assert_eq!(config.redis.addr.as_ref().map(ToString::to_string).as_deref(), Some("127.0.0.1:7000"));
        assert_eq!(config.container.mount_root, Path::new("/srv/vf"));
        // The file did not set the password, so etcd's fills it.
        assert_eq!(config.redis.password.as_deref(), Some("s3cret"));
        assert_eq!(applied.len(), 1);
    }

    #[test]
    fn a_key_the_toml_set_is_not_read_even_when_malformed_in_etcd() {
        let mut config = config("[redis]\naddr = \"127.0.0.1:7000\"\n");
        overlay(&mut config, &keys(&[("config/redis/addr", "nowhere")])).expect("not read");
        assert_eq!(config.redis.addr.expect("addr").port, 7000);
    }

    #[test]
    fn malformed_etcd_values_are_named_by_their_etcd_key() {
        for (key, value) in [
            ("config/redis/addr", "nowhere"),
            ("config/redis/addr", "redis:port"),
            ("volumes/_mount", "relative/dir"),
            ("config/watcher/token", ""),
            ("config/policy/deny", "10.0.0.0/8"),
            ("config/policy/allow", r#"["10.0.0.0/99"]"#),
        ] {
            let mut config = config("[etcd]\naddr = \"127.0.0.1:2379\"\nnamespace = \"prod\"\n");
            let err = overlay(&mut config, &keys(&[(key, value)])).expect_err(value);
            assert!(err.to_string().contains(&format!("`/sorna/prod/{key}`")), "{key}={value:?}: {err}");
        }
    }

    #[test]
    fn nothing_in_etcd_changes_nothing() {
        let mut config = config("");
        let before = format!("{config:?}");
        assert!(overlay(&mut config, &BTreeMap::new()).expect("empty").is_empty());
        assert_eq!(format!("{config:?}"), before);
    }

    #[test]
    fn mount_alias_and_empty_password() {
        let mut config = config("");
        overlay(&mut config, &keys(&[("volumes/mount", "/vf"), ("config/redis/password", "")])).expect("valid");
        assert_eq!(config.container.mount_root, Path::new("/vf"));
        assert_eq!(config.redis.password, None);
    }

    #[test]
    fn relative_keys_strip_the_prefix_and_unquote_components() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"/sorna/local/config/redis/addr", b"127.0.0.1:6379"),
            (b"/sorna/local/config/docker/registry/cr.backend.ai%3A443", b"x"),
            (b"/sorna/other/config/redis/addr", b"elsewhere:1"),
            (b"/sorna/local/volumes/_mount", b"/vf"),
        ];
        let map = relative_keys("/sorna/local/", pairs);
        assert_eq!(
            map.keys().map(String::as_str).collect::<Vec<_>>(),
            ["config/docker/registry/cr.backend.ai:443", "config/redis/addr", "volumes/_mount"]
        );
        assert_eq!(map["config/redis/addr"], "127.0.0.1:6379");
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }

    #[test]
    fn etcd_section_defaults_and_validation() {
        let config = config("");
        assert!(config.etcd.addr.is_none());
        assert_eq!(config.etcd.namespace, "local");
        let parsed =
            self::config("[etcd]\naddr = \"10.0.0.1:2379\"\nnamespace = \"prod\"\nuser = \"u\"\npassword = \"pw\"\n");
        assert_eq!(parsed.etcd.addr.as_ref().map(ToString::to_string).as_deref(), Some("10.0.0.1:2379"));
        assert!(!format!("{parsed:?}").contains("pw\""), "the password must not be printed");
        assert!(parsed.explicit_keys.contains("etcd.addr") && !parsed.explicit_keys.contains("redis.addr"));
        for (text, key) in [
            ("[etcd]\naddr = \"nowhere\"\n", "etcd.addr"),
            ("[etcd]\nnamespace = \"\"\n", "etcd.namespace"),
            ("[etcd]\nnamespace = \"a/b\"\n", "etcd.namespace"),
            ("[etcd]\nuser = \"u\"\n", "etcd.password"),
            ("[etcd]\npassword = \"p\"\n", "etcd.user"),
            ("[etcd]\nnamespaces = \"x\"\n", "etcd.namespaces"),
        ] {
            let err = Config::from_toml(text, Path::new("agent.toml")).expect_err(text);
            assert!(err.to_string().contains(&format!("`{key}`")), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_sample_config_leaves_the_keys_etcd_fills_to_etcd() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        for file in ["agent.sample.toml", "agent.dev.toml"] {
            let config = Config::from_file(&root.join(file)).expect(file);
            assert!(config.etcd.addr.is_none(), "{file}: etcd is off unless an operator sets it");
            assert_eq!(config.etcd.namespace, "local");
        }
        let sample = Config::from_file(&root.join("agent.sample.toml")).expect("sample");
        for key in
            ["redis.addr", "redis.password", "container.mount-root", "watcher.token", "policy.deny", "policy.allow"]
        {
            assert!(!sample.explicit_keys.contains(key), "agent.sample.toml sets {key}, so etcd could not fill it");
        }
        assert_eq!(sample.container.mount_root, Path::new("/var/lib/backend.ai/vfolders"));
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_an_error_naming_etcd_addr() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let config = config(&format!("[etcd]\naddr = \"127.0.0.1:{port}\"\n"));
        let started = std::time::Instant::now();
        let result = match Etcd::connect(&config).await {
            Ok(Some(etcd)) => etcd.shared_keys().await.map(|_| ()),
            Ok(None) => panic!("etcd is configured"),
            Err(err) => Err(err),
        };
        let err = result.expect_err("nothing listens there");
        assert!(err.to_string().contains("(etcd.addr)"), "{err}");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(started.elapsed() < REQUEST_TIMEOUT * 3, "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn no_etcd_configured_means_no_connection() {
        assert!(Etcd::connect(&config("")).await.expect("nothing to do").is_none());
    }
}
