//! `agent.toml`: the search order, parsing with key-named errors, defaults and CLI overrides.

mod policy;
mod python;

pub use crate::resources::{AcceleratorSettings, DeviceMapping};
pub use policy::{
    EgressShaper, GuardMode, GuardrailsSection, MetadataHost, MetadataMode, NetworkRule, PolicySection, Protocol,
    RuleLists,
};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

/// Why a configuration could not be used. Every variant names the file and, where
/// one is to blame, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: unknown key{} {}", if keys.len() > 1 { "s" } else { "" }, keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))]
    UnknownKeys { path: PathBuf, keys: Vec<String> },
    #[error("{path}: invalid value for `{key}`: {message}")]
    InvalidValue { path: PathBuf, key: String, message: String },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
}

/// The agent's whole configuration, with every default filled in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Config {
    pub agent: AgentSection,
    pub monitor: MonitorSection,
    pub docker: DockerSection,
    pub logging: LoggingSection,
    pub debug: DebugSection,
    pub resource: ResourceSection,
    pub container: ContainerSection,
    pub kernel_runner: KernelRunnerSection,
    pub redis: RedisSection,
    pub etcd: EtcdSection,
    pub watcher: WatcherSection,
    pub usage: UsageSection,
    pub policy: PolicySection,
    /// Per accelerator plugin (`[accelerators.cuda]`): how its devices are handed out.
    pub accelerators: std::collections::BTreeMap<String, AcceleratorSettings>,
    /// The `section.key` paths the TOML file set itself (e.g. `redis.addr`); the etcd overlay
    /// never replaces these.
    #[serde(skip)]
    pub explicit_keys: std::collections::BTreeSet<String>,
    /// Keys of a Python agent's `agent.toml` that the file set and bai-agent does not use
    /// (see [`python`]); the agent names them once at start.
    #[serde(skip)]
    pub python_keys: Vec<String>,
}

/// Backend.AI's etcd: shared configuration under `/sorna/{namespace}/` overlaid on this file's
/// defaults at startup, and node registration. Unset `addr` means no etcd.
#[derive(Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct EtcdSection {
    /// `host:port` of an etcd v3 endpoint (plain HTTP).
    pub addr: Option<RedisAddr>,
    /// The `{namespace}` of `/sorna/{namespace}/…` (Backend.AI: `local`).
    pub namespace: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Default for EtcdSection {
    fn default() -> Self {
        Self { addr: None, namespace: "local".into(), user: None, password: None }
    }
}

/// The password stays out of `--check-config` output and logs.
impl std::fmt::Debug for EtcdSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSection")
            .field("addr", &self.addr)
            .field("namespace", &self.namespace)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The watcher side daemon `bai-watcher` (Backend.AI's, port 6009).
#[derive(Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct WatcherSection {
    /// What `X-BackendAI-Watcher-Token` must carry; etcd's `config/watcher/token` fills it,
    /// and without either it is Backend.AI's `insecure` (logged).
    pub token: Option<String>,
    /// Where the watcher listens; the agent registers its port in etcd
    /// (`nodes/agents/{id}/watcher_port`) for the manager.
    pub service_addr: SocketAddr,
    /// The agent's systemd unit.
    pub target_service: String,
    /// `POST /soft-reset` (`systemctl reload`) is served.
    pub soft_reset_available: bool,
    /// The service manager's command (`systemctl`; a stand-in where there is no systemd).
    pub systemctl: Vec<String>,
    /// What `POST /shutdown` runs after stopping the agent.
    pub shutdown_command: Vec<String>,
    /// The fstab `GET /fstab` reads and mounts may edit.
    pub fstab_path: PathBuf,
    /// The engine's unit, restarted by `POST /hard-reset`.
    pub docker_service: String,
}

impl Default for WatcherSection {
    fn default() -> Self {
        Self {
            token: None,
            service_addr: SocketAddr::from(([0, 0, 0, 0], 6009)),
            target_service: "backendai-agent.service".into(),
            soft_reset_available: false,
            systemctl: vec!["systemctl".into()],
            shutdown_command: vec!["shutdown".into(), "-h".into(), "now".into()],
            fstab_path: PathBuf::from("/etc/fstab"),
            docker_service: "docker.service".into(),
        }
    }
}

impl std::fmt::Debug for WatcherSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatcherSection")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("service_addr", &self.service_addr)
            .field("target_service", &self.target_service)
            .field("soft_reset_available", &self.soft_reset_available)
            .field("systemctl", &self.systemctl)
            .field("shutdown_command", &self.shutdown_command)
            .field("fstab_path", &self.fstab_path)
            .field("docker_service", &self.docker_service)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct AgentSection {
    /// Agent id as the manager knows it; also the `ai.backend.agent-id` label value.
    pub id: String,
    /// Internal HTTP server: `/metrics`, `/health`, `/livez`, `/readyz`.
    pub internal_addr: SocketAddr,
    /// The manager-facing RPC server (callosum over a ZeroMQ ROUTER socket).
    pub rpc_listen_addr: SocketAddr,
    /// Local state: the event outbox (`events.jsonl`, `events.delivered`).
    pub journal_dir: PathBuf,
    /// Reported in the heartbeat (`region`).
    pub region: String,
    /// The scaling group (resource group) the agent joins; reported in the heartbeat.
    pub scaling_group: String,
    /// The host the manager and users reach this node by; unset means the RPC address's host.
    pub public_host: Option<String>,
    /// How many kernels of one `create_kernels` call are created at once.
    pub kernel_creation_concurrency: usize,
    /// Where `commit` writes a kernel's image as a file (`<subdir>/<filename>`, the subdir
    /// being the owner's e-mail as the manager sends it) and its `lock/<kernel id>` markers.
    pub image_commit_path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MonitorSection {
    /// How often the eBPF maps are read.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// How long a stopped container's series stay in `/metrics` so a last scrape sees them.
    #[serde(deserialize_with = "duration")]
    pub gone_series_grace: Duration,
    /// How often the measurements for the manager are written to Redis (`redis.stats-db`).
    #[serde(deserialize_with = "duration")]
    pub stats_interval: Duration,
    /// Resources counted from cgroup files even where their eBPF program loads.
    pub cgroup_file_resources: Vec<Resource>,
    /// Where the counters and the programs' links are pinned (bpffs), so they outlive the
    /// agent; `{bpffs-dir}/{agent id}`. Empty: nothing is pinned.
    pub bpffs_dir: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct DockerSection {
    /// Engine endpoint (`unix:///var/run/docker.sock`); unset means `DOCKER_HOST` or the local default.
    pub host: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct LoggingSection {
    /// A `tracing` filter: `info`, `debug`, `bai_agent=debug,info`, …
    pub level: String,
    pub format: LogFormat,
}

/// Development aids; never enable in production.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct DebugSection {
    /// Adds debugging RPC methods (`debug_sleep`) to the method table.
    pub enabled: bool,
    /// How often `agent_heartbeat` goes to the manager (Backend.AI: 20 s).
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Measure this many fake NVIDIA devices instead of loading NVML (nodes without GPUs).
    pub fake_cuda_devices: u32,
}

/// The manager's Redis: events (stream `events`) and stats. Unset `addr` means no Redis:
/// events stay in the local journal.
#[derive(Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RedisSection {
    /// `host:port`.
    pub addr: Option<RedisAddr>,
    pub password: Option<String>,
    /// Database of the `events` stream (Backend.AI: 4).
    pub events_db: u32,
    /// Database of the per-kernel and per-node stats (Backend.AI: 0).
    pub stats_db: u32,
    /// Database of the installed-image report (Backend.AI: 3).
    pub image_db: u32,
    /// The manager the event stream entries are for: `"26.9"` (a JSON `payload`, the default)
    /// or `"legacy"` (Backend.AI up to 25.x: an `args` msgpack tuple).
    pub event_format: EventFormat,
    /// The pub/sub channel where 26.9 events that are broadcast get their copy (Backend.AI:
    /// `events_all`).
    pub broadcast_channel: String,
}

/// The wire format of the events stream (`redis.event-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventFormat {
    /// Backend.AI 26.9: a JSON `payload` per event.
    #[default]
    Current,
    /// Backend.AI up to 25.x: an `args` msgpack tuple.
    Legacy,
}

impl EventFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            EventFormat::Current => "26.9",
            EventFormat::Legacy => "legacy",
        }
    }
}

impl<'de> Deserialize<'de> for EventFormat {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        match String::deserialize(de)?.as_str() {
            "26.9" => Ok(EventFormat::Current),
            "legacy" => Ok(EventFormat::Legacy),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not an event format; write \"26.9\" (Backend.AI 26.9) or \"legacy\" (up to 25.x)"
            ))),
        }
    }
}

/// Usage records for billing (docs/USAGE.md): one per kernel per `interval` and a final one,
/// journaled in `agent.journal-dir` and delivered to the Redis stream `stream` in
/// `redis.events-db` (when `redis.addr` is set) and to `http-endpoint` (when set).
#[derive(Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct UsageSection {
    /// The window of one record; windows end at multiples of it since the epoch.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// The Redis stream the records go to.
    pub stream: String,
    /// Entries older than this are trimmed from the stream as records are added (`MINID ~`);
    /// "0s" never trims.
    #[serde(deserialize_with = "duration")]
    pub stream_retention: Duration,
    /// `http://host:port/path` that takes CloudEvents batches
    /// (`application/cloudevents-batch+json`); unset: no HTTP delivery.
    pub http_endpoint: Option<String>,
    /// Sent as `Authorization: Bearer …` to `http-endpoint`.
    pub http_bearer_token: Option<String>,
    /// How long one HTTP delivery may take.
    #[serde(deserialize_with = "duration")]
    pub http_timeout: Duration,
}

impl Default for UsageSection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            stream: "usage".into(),
            stream_retention: Duration::from_secs(7 * 86400),
            http_endpoint: None,
            http_bearer_token: None,
            http_timeout: Duration::from_secs(10),
        }
    }
}

/// The token stays out of `--check-config` output and logs.
impl std::fmt::Debug for UsageSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageSection")
            .field("interval", &self.interval)
            .field("stream", &self.stream)
            .field("stream_retention", &self.stream_retention)
            .field("http_endpoint", &self.http_endpoint)
            .field("http_bearer_token", &self.http_bearer_token.as_ref().map(|_| "<redacted>"))
            .field("http_timeout", &self.http_timeout)
            .finish()
    }
}

/// A Redis server address, `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for RedisAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for RedisAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not `host:port`");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 || host.contains(['/', ' ']) {
            return Err(bad());
        }
        Ok(RedisAddr { host: host.to_owned(), port })
    }
}

impl<'de> Deserialize<'de> for RedisAddr {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        String::deserialize(de)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The password stays out of `--check-config` output and logs.
impl std::fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSection")
            .field("addr", &self.addr)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("events_db", &self.events_db)
            .field("stats_db", &self.stats_db)
            .field("image_db", &self.image_db)
            .field("event_format", &self.event_format)
            .field("broadcast_channel", &self.broadcast_channel)
            .finish()
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            addr: None,
            password: None,
            events_db: 4,
            stats_db: 0,
            image_db: 3,
            event_format: EventFormat::Current,
            broadcast_channel: "events_all".into(),
        }
    }
}

impl Default for DebugSection {
    fn default() -> Self {
        Self { enabled: false, heartbeat_interval: Duration::from_secs(20), fake_cuda_devices: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            id: default_agent_id(),
            internal_addr: SocketAddr::from(([127, 0, 0, 1], 6003)),
            rpc_listen_addr: SocketAddr::from(([0, 0, 0, 0], 6001)),
            journal_dir: PathBuf::from("/var/lib/backend.ai/agent"),
            region: "local".into(),
            scaling_group: "default".into(),
            public_host: None,
            kernel_creation_concurrency: 4,
            image_commit_path: PathBuf::from("/var/lib/backend.ai/commit"),
        }
    }
}

impl Default for MonitorSection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            gone_series_grace: Duration::from_secs(120),
            stats_interval: Duration::from_secs(5),
            cgroup_file_resources: Vec::new(),
            bpffs_dir: PathBuf::from("/sys/fs/bpf/bai-agent"),
        }
    }
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

/// The node's host name (`/proc/sys/kernel/hostname`); empty when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned()
}

/// Backend.AI names agents `i-<hostname>` unless told otherwise.
fn default_agent_id() -> String {
    let host = host_name();
    format!("i-{}", if host.is_empty() { "localhost" } else { &host })
}

/// Accepts `"1s"`, `"250ms"`, `"2m"` or a number of seconds.
fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(f64),
        Text(String),
    }
    let parsed = match Raw::deserialize(de)? {
        Raw::Seconds(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Raw::Seconds(secs) => {
            return Err(serde::de::Error::custom(format!("{secs} is not a duration")));
        }
        Raw::Text(text) => humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!("{text:?} is not a duration ({err}); write e.g. \"1s\" or \"500ms\""))
        })?,
    };
    Ok(parsed)
}

/// What this node offers kernels (Backend.AI's `[resource]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ResourceSection {
    /// Cores kept for the host and the agent (the lowest-numbered online cores). Unset means
    /// 1 when the host has more than one core, else 0 (Backend.AI's default is 1).
    pub reserved_cpu: Option<u32>,
    /// Memory kept for the host and the agent: a number of bytes or a size such as `"1g"`.
    #[serde(deserialize_with = "byte_size")]
    pub reserved_mem: u64,
    /// Up to `ceil(factor)` kernels may be pinned to one core; the node offers
    /// `floor(cores × factor)` cpu. At least 1.0.
    pub cpu_overcommit: f64,
    /// The node offers `floor((MemTotal − reserved-mem) × factor)` bytes. At least 1.0.
    pub mem_overcommit: f64,
    /// How cores are picked: `fill` (lowest-numbered first) or `evenly` (least-loaded first).
    pub allocation_strategy: crate::resources::AllocationStrategy,
    /// Mock accelerators instead of real ones: a file in the format of Backend.AI's
    /// `backend.ai-accelerator-mock` plugin (`mock-accelerator.toml`). For nodes without any;
    /// measured as idle.
    pub mock_accelerator: Option<PathBuf>,
}

impl From<&ResourceSection> for crate::resources::CapacityPolicy {
    fn from(section: &ResourceSection) -> Self {
        Self {
            reserved_cpu: section.reserved_cpu,
            reserved_mem: section.reserved_mem,
            cpu_overcommit: section.cpu_overcommit,
            mem_overcommit: section.mem_overcommit,
        }
    }
}

/// A resource the agent counts per container with eBPF when it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resource {
    Cpu,
    Network,
    BlockIo,
    Oom,
}

impl Resource {
    pub const ALL: [Resource; 4] = [Resource::Cpu, Resource::Network, Resource::BlockIo, Resource::Oom];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Network => "network",
            Resource::BlockIo => "block-io",
            Resource::Oom => "oom",
        }
    }

    /// What a reader of the cgroup files uses instead.
    pub fn fallback(self) -> &'static str {
        match self {
            Resource::Cpu => "cpuacct.usage / cpu.stat",
            Resource::Network => "/proc/<pid>/net/dev of the container",
            Resource::BlockIo => "blkio.throttle.io_service* / io.stat",
            Resource::Oom => "memory.oom_control / memory.events",
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kernel containers: scratch directories, published ports, vfolder mounts.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ContainerSection {
    /// Per-kernel scratch directories (`{scratch-root}/{kernel_id}/work` and `/config`).
    pub scratch_root: PathBuf,
    /// Host ports for kernels' REPL and service ports, `[low, high]` inclusive.
    pub port_range: [u16; 2],
    /// How long a released host port rests before it is handed out again.
    #[serde(deserialize_with = "duration")]
    pub port_cooldown: Duration,
    /// The host address container ports are published on.
    pub bind_host: std::net::IpAddr,
    /// vfolder host paths must resolve (symlinks included) to a path under this directory.
    pub mount_root: PathBuf,
    /// How long `destroy_kernel` waits after SIGTERM before it kills a kernel's container.
    #[serde(deserialize_with = "duration")]
    pub stop_timeout: Duration,
}

/// Code execution: the in-container runner the agent mounts, and how `execute` waits on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct KernelRunnerSection {
    /// The static `bai-krunner` binary, mounted read-only at `/opt/kernel/bai-krunner` and
    /// made the entrypoint of every kernel whose image does not bring its own runner.
    pub path: PathBuf,
    /// Most output bytes one run keeps; the rest is dropped and a marker says how much.
    #[serde(deserialize_with = "byte_size")]
    pub output_limit: u64,
    /// A runner silent this long, a status probe included, makes `execute` return
    /// `exec-timeout` instead of waiting forever.
    #[serde(deserialize_with = "duration")]
    pub response_timeout: Duration,
    /// How long the agent keeps trying to reach a new kernel's runner.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for KernelRunnerSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/opt/bai-agent/bin/bai-krunner"),
            output_limit: 16 << 20,
            response_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(20),
        }
    }
}

impl Default for ResourceSection {
    fn default() -> Self {
        Self {
            reserved_cpu: None,
            reserved_mem: 1 << 30,
            cpu_overcommit: 1.0,
            mem_overcommit: 1.0,
            allocation_strategy: crate::resources::AllocationStrategy::Fill,
            mock_accelerator: None,
        }
    }
}

impl Default for ContainerSection {
    fn default() -> Self {
        Self {
            scratch_root: PathBuf::from("/var/lib/backend.ai/scratches"),
            port_range: [30000, 31000],
            port_cooldown: Duration::from_secs(10),
            bind_host: std::net::IpAddr::from([127, 0, 0, 1]),
            mount_root: PathBuf::from("/var/lib/backend.ai/vfolders"),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

impl ContainerSection {
    /// `port-range` as an inclusive range.
    pub fn port_range_inclusive(&self) -> std::ops::RangeInclusive<u16> {
        self.port_range[0]..=self.port_range[1]
    }
}

/// Accepts a number of bytes or a size with a binary suffix: `"1g"`, `"512m"`, `"1.5G"`.
fn byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    crate::resources::slots::deserialize_byte_size(de)
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefaults,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::EmbeddedDefaults => f.write_str("embedded defaults"),
        }
    }
}

impl Config {
    /// The files tried, in order, when `--config` is not given.
    pub fn search_path() -> Vec<PathBuf> {
        let mut paths = vec![PathBuf::from("agent.toml")];
        if let Some(home) = std::env::var_os("HOME") {
            paths.push(PathBuf::from(home).join(".config/backend.ai/agent.toml"));
        }
        paths.push(PathBuf::from("/etc/backend.ai/agent.toml"));
        paths
    }

    /// Loads `explicit` if given (it must exist), else the first file of the search path,
    /// else the embedded defaults.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, ConfigSource), ConfigError> {
        if let Some(path) = explicit {
            if !path.exists() {
                return Err(ConfigError::NotFound { path: path.to_path_buf() });
            }
            return Ok((Self::from_file(path)?, ConfigSource::File(path.to_path_buf())));
        }
        for path in Self::search_path() {
            if path.is_file() {
                return Ok((Self::from_file(&path)?, ConfigSource::File(path)));
            }
        }
        Ok((Config::default(), ConfigSource::EmbeddedDefaults))
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// Parses TOML text; `origin` only labels errors. A Python agent's `agent.toml` is read
    /// through [`python::translate`] first.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let path = origin.to_path_buf();
        let syntax = |message: String| ConfigError::Syntax { path: path.clone(), message };
        let mut table: toml::Table = text.parse().map_err(|err: toml::de::Error| syntax(err.to_string()))?;
        let python_keys = python::translate(&mut table);
        let explicit = explicit_keys(&table);
        let mut unknown = Vec::new();
        let mut record_unknown = |key: serde_ignored::Path<'_>| unknown.push(key.to_string());
        let tracked = serde_ignored::Deserializer::new(toml::Value::Table(table), &mut record_unknown);
        let mut config: Config =
            serde_path_to_error::deserialize(tracked).map_err(|err| ConfigError::InvalidValue {
                path: path.clone(),
                key: err.path().to_string(),
                message: first_line(&err.inner().to_string()),
            })?;
        config.explicit_keys = explicit;
        config.python_keys = python_keys;
        config.resolve_relative_paths(origin);
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKeys { path, keys: unknown });
        }
        config.validate(&path)?;
        Ok(config)
    }

    /// Relative directories (a Python agent's sample has `./scratches`) are taken from the
    /// config file's directory, not from wherever the agent happens to start.
    fn resolve_relative_paths(&mut self, origin: &Path) {
        let Some(dir) = origin.parent() else { return };
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        for path in [
            &mut self.container.scratch_root,
            &mut self.container.mount_root,
            &mut self.kernel_runner.path,
            &mut self.agent.journal_dir,
            &mut self.agent.image_commit_path,
        ] {
            if path.is_relative() && !path.as_os_str().is_empty() {
                *path = dir.join(&*path);
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::InvalidValue {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        };
        if self.agent.id.trim().is_empty() {
            return Err(invalid("agent.id", "must not be empty"));
        }
        if self.monitor.interval < Duration::from_millis(10) {
            return Err(invalid("monitor.interval", "must be at least 10ms"));
        }
        if self.monitor.stats_interval < Duration::from_millis(100) {
            return Err(invalid("monitor.stats-interval", "must be at least 100ms"));
        }
        if self.agent.journal_dir.as_os_str().is_empty() {
            return Err(invalid("agent.journal-dir", "must not be empty"));
        }
        if self.agent.image_commit_path.as_os_str().is_empty() {
            return Err(invalid("agent.image-commit-path", "must not be empty"));
        }
        if self.redis.broadcast_channel.trim().is_empty() {
            return Err(invalid("redis.broadcast-channel", "must not be empty"));
        }
        for (key, value) in [("agent.region", &self.agent.region), ("agent.scaling-group", &self.agent.scaling_group)] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.agent.public_host.as_deref().is_some_and(|host| host.trim().is_empty()) {
            return Err(invalid("agent.public-host", "must not be empty (leave it out to use the RPC address)"));
        }
        if self.usage.interval < Duration::from_secs(1) {
            return Err(invalid("usage.interval", "must be at least 1s"));
        }
        if self.usage.stream.trim().is_empty() {
            return Err(invalid("usage.stream", "must not be empty"));
        }
        if let Some(endpoint) = &self.usage.http_endpoint {
            check_usage_endpoint(endpoint).map_err(|message| invalid("usage.http-endpoint", &message))?;
        }
        if self.usage.http_timeout < Duration::from_millis(100) {
            return Err(invalid("usage.http-timeout", "must be at least 100ms"));
        }
        if self.debug.heartbeat_interval < Duration::from_millis(100) {
            return Err(invalid("debug.heartbeat-interval", "must be at least 100ms"));
        }
        for (key, factor) in [
            ("resource.cpu-overcommit", self.resource.cpu_overcommit),
            ("resource.mem-overcommit", self.resource.mem_overcommit),
        ] {
            if !factor.is_finite() || factor < 1.0 {
                return Err(invalid(key, "must be a number >= 1.0"));
            }
        }
        for (key, dir) in [
            ("container.scratch-root", &self.container.scratch_root),
            ("container.mount-root", &self.container.mount_root),
            ("kernel-runner.path", &self.kernel_runner.path),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(key, "must be an absolute path"));
            }
        }
        let [low, high] = self.container.port_range;
        if low == 0 || low > high {
            return Err(invalid("container.port-range", "must be [low, high] with 1 <= low <= high <= 65535"));
        }
        if self.kernel_runner.output_limit < 1024 {
            return Err(invalid("kernel-runner.output-limit", "must be at least 1k"));
        }
        for (key, value) in [
            ("kernel-runner.response-timeout", self.kernel_runner.response_timeout),
            ("kernel-runner.connect-timeout", self.kernel_runner.connect_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(invalid(key, "must be at least 100ms"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            return Err(invalid("logging.level", "not a log filter (try \"info\" or \"debug\")"));
        }
        let namespace = self.etcd.namespace.trim();
        if namespace.is_empty() || namespace.contains('/') || namespace != self.etcd.namespace {
            return Err(invalid("etcd.namespace", "must be a non-empty name without `/` or spaces"));
        }
        self.policy.check().map_err(|(key, message)| invalid(key, &message))?;
        match (&self.etcd.user, &self.etcd.password) {
            (Some(_), None) => return Err(invalid("etcd.password", "must be set when etcd.user is")),
            (None, Some(_)) => return Err(invalid("etcd.user", "must be set when etcd.password is")),
            _ => {}
        }
        Ok(())
    }
}

/// The `section.key` paths (and sections) the file sets.
fn explicit_keys(table: &toml::Table) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    for (section, value) in table {
        keys.insert(section.clone());
        if let Some(inner) = value.as_table() {
            keys.extend(inner.keys().map(|key| format!("{section}.{key}")));
        }
    }
    keys
}

/// toml's messages carry a source excerpt after the first line; the key path says where.
fn first_line(message: &str) -> String {
    let mut lines = message.lines().filter(|line| !line.trim().is_empty());
    let first = lines.next().unwrap_or(message).trim();
    // toml puts "TOML parse error at line N, column M" first; the reason is the last line.
    if first.starts_with("TOML parse error") {
        message.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or(first).trim().to_string()
    } else {
        first.to_string()
    }
}

/// Checks `usage.http-endpoint`: an absolute `http://` URL.
pub fn check_usage_endpoint(endpoint: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(endpoint).map_err(|err| format!("{endpoint:?} is not a URL ({err})"))?;
    match url.scheme() {
        "http" if url.host_str().is_some() => Ok(()),
        "https" => Err(format!(
            "{endpoint:?}: https is not built into this agent; send to a local relay (http://127.0.0.1:…) that forwards over TLS"
        )),
        _ => Err(format!("{endpoint:?} is not an http:// URL with a host")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_policy_comes_from_the_resource_section() {
        let section = ResourceSection::default();
        assert_eq!(crate::resources::CapacityPolicy::from(&section), crate::resources::CapacityPolicy::default());
    }

    #[test]
    fn usage_endpoints_must_be_http_urls() {
        assert!(check_usage_endpoint("http://127.0.0.1:8080/usage").is_ok());
        assert!(check_usage_endpoint("https://billing.example/usage").expect_err("tls").contains("https is not built"));
        assert!(check_usage_endpoint("billing:8080").is_err());
        assert!(check_usage_endpoint("not a url").expect_err("garbage").contains("not a URL"));
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("agent.toml"))
    }

    #[test]
    fn usage_keys_default_and_bad_values_are_named() {
        let config = parse("").expect("defaults");
        assert_eq!(config.usage.interval, Duration::from_secs(60));
        assert_eq!(config.usage.stream, "usage");
        assert_eq!(config.usage.stream_retention, Duration::from_secs(7 * 86400));
        assert_eq!(config.usage.http_endpoint, None);
        let config = parse(
            "[usage]\ninterval = \"5s\"\nhttp-endpoint = \"http://127.0.0.1:9/u\"\nhttp-bearer-token = \"secret\"\n",
        )
        .expect("valid");
        assert_eq!(config.usage.interval, Duration::from_secs(5));
        assert!(!format!("{config:?}").contains("secret"), "the token is redacted");
        for (text, key) in [
            ("[usage]\ninterval = \"100ms\"\n", "usage.interval"),
            ("[usage]\ninterval = \"often\"\n", "usage.interval"),
            ("[usage]\nstream = \"\"\n", "usage.stream"),
            ("[usage]\nhttp-endpoint = \"https://billing/usage\"\n", "usage.http-endpoint"),
            ("[usage]\nhttp-endpoint = \"billing:80\"\n", "usage.http-endpoint"),
            ("[usage]\nintervall = \"1m\"\n", "usage.intervall"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(&format!("`{key}`")), "{text}: {err}");
        }
    }

    #[test]
    fn empty_file_means_defaults() {
        let config = parse("").expect("empty config is valid");
        assert_eq!(config.monitor.interval, Duration::from_secs(1));
        assert_eq!(config.agent.internal_addr, "127.0.0.1:6003".parse().expect("addr"));
        assert!(config.agent.id.starts_with("i-"));
    }

    #[test]
    fn rpc_listen_addr_defaults_to_backend_ais_port_and_can_be_set() {
        let config = parse("").expect("defaults");
        assert_eq!(config.agent.rpc_listen_addr, "0.0.0.0:6001".parse().expect("addr"));
        let config = parse("[agent]\nrpc-listen-addr = \"127.0.0.1:16001\"\n").expect("valid");
        assert_eq!(config.agent.rpc_listen_addr, "127.0.0.1:16001".parse().expect("addr"));
        let config = parse("[agent]\nrpc-listen-addr = \"[::1]:6001\"\n").expect("IPv6");
        assert_eq!(config.agent.rpc_listen_addr, "[::1]:6001".parse().expect("addr"));
        let err = parse("[agent]\nrpc-listen-addr = \"6001\"\n").expect_err("a port alone is not an address");
        assert!(err.to_string().contains("`agent.rpc-listen-addr`"), "{err}");
    }

    #[test]
    fn shipped_config_files_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let sample = Config::from_file(&root.join("agent.sample.toml")).expect("agent.sample.toml");
        assert_eq!(sample.agent.rpc_listen_addr, "0.0.0.0:6001".parse().expect("addr"));
        assert_eq!(sample.kernel_runner.path, KernelRunnerSection::default().path);
        assert_eq!(sample.kernel_runner.output_limit, 16 << 20);
        assert_eq!(sample.kernel_runner.response_timeout, Duration::from_secs(15));
        let dev = Config::from_file(&root.join("agent.dev.toml")).expect("agent.dev.toml");
        assert_eq!(dev.agent.rpc_listen_addr, "127.0.0.1:6001".parse().expect("addr"));
        assert_eq!(sample.agent.journal_dir, Path::new("/var/lib/backend.ai/agent"));
        assert_eq!(dev.agent.journal_dir, Path::new("/tmp/bai-agent-dev/state"));
        assert_eq!(sample.debug.heartbeat_interval, Duration::from_secs(20));
    }

    #[test]
    fn debug_is_off_unless_enabled() {
        assert!(!parse("").expect("defaults").debug.enabled);
        assert!(parse("[debug]\nenabled = true\n").expect("valid").debug.enabled);
    }

    #[test]
    fn durations_accept_text_and_seconds() {
        let config = parse("[monitor]\ninterval = \"250ms\"\ngone-series-grace = 3\n").expect("valid");
        assert_eq!(config.monitor.interval, Duration::from_millis(250));
        assert_eq!(config.monitor.gone_series_grace, Duration::from_secs(3));
    }

    #[test]
    fn unknown_key_is_named_with_its_section() {
        let err = parse("[monitor]\nintervall = \"1s\"\n").expect_err("typo must be refused");
        let message = err.to_string();
        assert!(message.contains("`monitor.intervall`"), "{message}");
    }

    #[test]
    fn unknown_section_is_named() {
        let err = parse("[monitr]\ninterval = \"1s\"\n").expect_err("typo must be refused");
        assert!(err.to_string().contains("`monitr`"), "{err}");
    }

    #[test]
    fn bad_value_is_named_by_key() {
        let err = parse("[agent]\ninternal-addr = \"nowhere\"\n").expect_err("bad address");
        let message = err.to_string();
        assert!(message.contains("`agent.internal-addr`"), "{message}");
        let err = parse("[monitor]\ninterval = \"soon\"\n").expect_err("bad duration");
        assert!(err.to_string().contains("`monitor.interval`"), "{err}");
        let err = parse("[logging]\nformat = \"xml\"\n").expect_err("bad format");
        assert!(err.to_string().contains("`logging.format`"), "{err}");
    }

    #[test]
    fn too_short_interval_is_refused() {
        let err = parse("[monitor]\ninterval = \"1ms\"\n").expect_err("too short");
        assert!(err.to_string().contains("`monitor.interval`"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let err = parse("[monitor\n").expect_err("broken TOML");
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("agent.toml"), "{err}");
    }

    #[test]
    fn redis_is_unset_by_default_and_takes_host_port_password_and_dbs() {
        let config = parse("").expect("defaults");
        assert!(config.redis.addr.is_none());
        assert_eq!((config.redis.events_db, config.redis.stats_db), (4, 0));
        assert_eq!(config.redis.event_format, EventFormat::Current);
        assert!(config.redis.password.is_none());
        let config =
            parse("[redis]\naddr = \"redis.example:6380\"\npassword = \"hunter2\"\nevents-db = 5\nstats-db = 1\n")
                .expect("valid");
        let addr = config.redis.addr.clone().expect("addr");
        assert_eq!((addr.host.as_str(), addr.port), ("redis.example", 6380));
        assert_eq!(addr.to_string(), "redis.example:6380");
        assert_eq!((config.redis.events_db, config.redis.stats_db), (5, 1));
        assert_eq!(config.redis.password.as_deref(), Some("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"), "the password must not be printed");
        let config = parse("[redis]\naddr = \"[::1]:6379\"\n").expect("IPv6");
        assert_eq!(config.redis.addr.expect("addr").host, "::1");
    }

    #[test]
    fn bad_redis_keys_are_named() {
        for (text, key) in [
            ("[redis]\naddr = \"localhost\"\n", "redis.addr"),
            ("[redis]\naddr = \"localhost:port\"\n", "redis.addr"),
            ("[redis]\naddr = 6379\n", "redis.addr"),
            ("[redis]\nevents-db = -1\n", "redis.events-db"),
            ("[redis]\nstats-db = \"zero\"\n", "redis.stats-db"),
            ("[redis]\nevent-format = \"25.1\"\n", "redis.event-format"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(&format!("`{key}`")), "{text:?}: {err}");
        }
        let err = parse("[redis]\nevent-db = 4\n").expect_err("typo");
        assert!(err.to_string().contains("`redis.event-db`"), "{err}");
    }

    #[test]
    fn heartbeat_interval_defaults_to_20s_next_to_enabled() {
        let config = parse("").expect("defaults");
        assert_eq!(config.debug.heartbeat_interval, Duration::from_secs(20));
        let config = parse("[debug]\nenabled = true\nheartbeat-interval = \"500ms\"\n").expect("valid");
        assert_eq!(config.debug.heartbeat_interval, Duration::from_millis(500));
        assert!(config.debug.enabled);
        let err = parse("[debug]\nheartbeat-interval = \"often\"\n").expect_err("bad duration");
        assert!(err.to_string().contains("`debug.heartbeat-interval`"), "{err}");
        let err = parse("[debug]\nheartbeat-interval = \"1ms\"\n").expect_err("too short");
        assert!(err.to_string().contains("`debug.heartbeat-interval`"), "{err}");
    }

    #[test]
    fn agent_identity_and_journal_keys() {
        let config = parse("").expect("defaults");
        assert_eq!(config.agent.journal_dir, Path::new("/var/lib/backend.ai/agent"));
        assert_eq!((config.agent.region.as_str(), config.agent.scaling_group.as_str()), ("local", "default"));
        assert!(config.agent.public_host.is_none());
        let config = parse(
            "[agent]\njournal-dir = \"/tmp/x\"\nregion = \"us-east\"\nscaling-group = \"gpu\"\npublic-host = \"node1\"\n",
        )
        .expect("valid");
        assert_eq!(config.agent.journal_dir, Path::new("/tmp/x"));
        assert_eq!((config.agent.region.as_str(), config.agent.scaling_group.as_str()), ("us-east", "gpu"));
        assert_eq!(config.agent.public_host.as_deref(), Some("node1"));
        for (text, key) in [
            ("[agent]\njournal-dir = \"\"\n", "agent.journal-dir"),
            ("[agent]\njournal-dir = 3\n", "agent.journal-dir"),
            ("[agent]\nregion = \"\"\n", "agent.region"),
            ("[agent]\nscaling-group = \" \"\n", "agent.scaling-group"),
            ("[agent]\npublic-host = \"\"\n", "agent.public-host"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(&format!("`{key}`")), "{text:?}: {err}");
        }
    }

    #[test]
    fn resource_defaults_and_values() {
        let config = parse("").expect("defaults");
        assert_eq!(config.resource.reserved_cpu, None, "auto: 1 on multi-core hosts, else 0");
        assert_eq!(config.resource.reserved_mem, 1 << 30);
        assert_eq!((config.resource.cpu_overcommit, config.resource.mem_overcommit), (1.0, 1.0));
        assert_eq!(config.resource.allocation_strategy, crate::resources::AllocationStrategy::Fill);
        let config = parse(
            "[resource]\nreserved-cpu = 2\nreserved-mem = \"512m\"\ncpu-overcommit = 2\nmem-overcommit = 1.5\n\
             allocation-strategy = \"evenly\"\n",
        )
        .expect("valid");
        assert_eq!(config.resource.reserved_cpu, Some(2));
        assert_eq!(config.resource.reserved_mem, 512 << 20);
        assert_eq!((config.resource.cpu_overcommit, config.resource.mem_overcommit), (2.0, 1.5));
        assert_eq!(config.resource.allocation_strategy, crate::resources::AllocationStrategy::Evenly);
        assert_eq!(parse("[resource]\nreserved-mem = 1048576\n").expect("bytes").resource.reserved_mem, 1 << 20);
        assert_eq!(parse("[resource]\nreserved-mem = \"1.5G\"\n").expect("size").resource.reserved_mem, 3 << 29);
    }

    #[test]
    fn bad_resource_keys_are_named() {
        for (text, key) in [
            ("[resource]\nreserved-mem = \"lots\"\n", "resource.reserved-mem"),
            ("[resource]\nreserved-mem = -1\n", "resource.reserved-mem"),
            ("[resource]\nreserved-cpu = -1\n", "resource.reserved-cpu"),
            ("[resource]\ncpu-overcommit = 0.5\n", "resource.cpu-overcommit"),
            ("[resource]\nmem-overcommit = 0\n", "resource.mem-overcommit"),
            ("[resource]\nmem-overcommit = nan\n", "resource.mem-overcommit"),
            ("[resource]\nallocation-strategy = \"random\"\n", "resource.allocation-strategy"),
            ("[resource]\nallocation-stratgy = \"fill\"\n", "resource.allocation-stratgy"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(&format!("`{key}`")), "{text:?}: {err}");
        }
    }

    #[test]
    fn container_defaults_and_values() {
        let config = parse("").expect("defaults");
        assert_eq!(config.container.scratch_root, Path::new("/var/lib/backend.ai/scratches"));
        assert_eq!(config.container.port_range, [30000, 31000]);
        assert_eq!(config.container.port_range_inclusive(), 30000..=31000);
        assert_eq!(config.container.port_cooldown, Duration::from_secs(10));
        assert_eq!(config.container.bind_host, std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(config.container.mount_root, Path::new("/var/lib/backend.ai/vfolders"));
        let config = parse(
            "[container]\nscratch-root = \"/srv/scratch\"\nport-range = [40000, 40000]\nport-cooldown = \"1m\"\n\
             bind-host = \"::1\"\nmount-root = \"/srv/vfolders\"\n",
        )
        .expect("valid");
        assert_eq!(config.container.scratch_root, Path::new("/srv/scratch"));
        assert_eq!(config.container.port_range_inclusive(), 40000..=40000);
        assert_eq!(config.container.port_cooldown, Duration::from_secs(60));
        assert_eq!(config.container.bind_host, "::1".parse::<std::net::IpAddr>().expect("ip"));
        assert_eq!(config.container.mount_root, Path::new("/srv/vfolders"));
        assert_eq!(
            parse("[container]\nport-cooldown = 0\n").expect("no cooldown").container.port_cooldown,
            Duration::ZERO
        );
    }

    #[test]
    fn relative_directories_are_the_config_files() {
        let config = Config::from_toml(
            "[container]\nscratch-root = \"./scratches\"\nmount-root = \"vfolders\"\n",
            Path::new("/etc/backend.ai/agent.toml"),
        )
        .expect("valid");
        assert_eq!(config.container.scratch_root, Path::new("/etc/backend.ai/./scratches"));
        assert_eq!(config.container.mount_root, Path::new("/etc/backend.ai/vfolders"));
    }

    /// The keys of Backend.AI 26.9.6's own sample `configs/agent.toml` (values as there).
    const PYTHON_AGENT_TOML: &str = r#"
[etcd]
namespace = "local"
addr = { host = "127.0.0.1", port = 8120 }
user = ""
password = ""
[agent]
mode = "docker"
rpc-listen-addr = { host = "127.0.0.1", port = 6001 }
service-addr = { host = "0.0.0.0", port = 6003 }
ssl-enabled = false
agent-sock-port = 6007
initial-resource-group-name = "default"
pid-file = "./agent.pid"
event-loop = "uvloop"
var-base-path = "./var/lib/backend.ai"
image-commit-path = "./tmp/backend.ai/commit/"
mount-path = "./vfroot/local"
cohabiting-storage-proxy = true
[container]
port-range = [30000, 31000]
kernel-uid = -1
kernel-gid = -1
bind-host = "127.0.0.1"
sandbox-type = "docker"
scratch-type = "hostdir"
scratch-root = "./scratches"
scratch-size = "1G"
[watcher]
service-addr = { host = "127.0.0.1", port = 6009 }
ssl-enabled = false
target-service = "backendai-agent.service"
soft-reset-available = false
[pyroscope]
enabled = false
[logging]
level = "INFO"
drivers = ["console"]
[logging.pkg-ns]
"" = "WARNING"
[logging.console]
colored = true
[resource]
reserved-cpu = 1
reserved-mem = "1G"
reserved-disk = "8G"
allocation-order = ["cuda", "rocm", "tpu", "cpu", "mem"]
affinity-policy = "INTERLEAVED"
[debug]
enabled = true
skip-container-deletion = false
[debug.coredump]
enabled = false
[otel]
enabled = false
"#;

    #[test]
    fn a_python_agents_agent_toml_loads_with_its_unused_keys_named() {
        let config = Config::from_toml(PYTHON_AGENT_TOML, Path::new("/etc/backend.ai/agent.toml")).expect("loads");
        assert_eq!(config.agent.rpc_listen_addr.to_string(), "127.0.0.1:6001");
        assert_eq!(config.agent.internal_addr.to_string(), "0.0.0.0:6003");
        assert_eq!(config.agent.scaling_group, "default");
        assert_eq!(config.etcd.addr.as_ref().map(ToString::to_string).as_deref(), Some("127.0.0.1:8120"));
        assert_eq!(config.container.port_range, [30000, 31000]);
        assert_eq!(config.container.scratch_root, Path::new("/etc/backend.ai/./scratches"));
        assert_eq!(config.container.mount_root, Path::new("/etc/backend.ai/./vfroot/local"));
        assert_eq!((config.resource.reserved_cpu, config.resource.reserved_mem), (Some(1), 1 << 30));
        assert_eq!(config.logging.level, "info");
        assert_eq!(config.watcher.service_addr.to_string(), "127.0.0.1:6009");
        assert_eq!(config.watcher.target_service, "backendai-agent.service");
        for key in ["agent.mode", "container.kernel-uid", "watcher.ssl-enabled", "pyroscope", "otel", "debug.coredump"]
        {
            assert!(config.python_keys.iter().any(|k| k == key), "{key} in {:?}", config.python_keys);
        }
        // A typo of one of bai-agent's own keys still stops the start, next to Python's keys.
        let typo = format!("{PYTHON_AGENT_TOML}\n[monitor]\nintervall = \"1s\"\n");
        let err = Config::from_toml(&typo, Path::new("agent.toml")).expect_err("typo");
        assert!(err.to_string().contains("`monitor.intervall`"), "{err}");
    }

    #[test]
    fn bad_container_keys_are_named() {
        for (text, key) in [
            ("[kernel-runner]\noutput-limit = 10\n", "kernel-runner.output-limit"),
            ("[kernel-runner]\nresponse-timeout = \"1ms\"\n", "kernel-runner.response-timeout"),
            ("[container]\nport-range = [31000, 30000]\n", "container.port-range"),
            ("[container]\nport-range = [0, 10]\n", "container.port-range"),
            ("[container]\nport-range = [30000, 70000]\n", "container.port-range"),
            ("[container]\nport-range = [30000]\n", "container.port-range"),
            ("[container]\nport-range = \"30000-31000\"\n", "container.port-range"),
            ("[container]\nport-cooldown = \"soon\"\n", "container.port-cooldown"),
            ("[container]\nbind-host = \"localhost\"\n", "container.bind-host"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(&format!("`{key}")), "{text:?}: {err}");
        }
    }

    #[test]
    fn shipped_config_files_set_resource_and_container_keys() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let sample = Config::from_file(&root.join("agent.sample.toml")).expect("agent.sample.toml");
        assert_eq!(sample.container.scratch_root, Path::new("/var/lib/backend.ai/scratches"));
        assert_eq!(sample.container.port_range, [30000, 31000]);
        assert_eq!(sample.resource.reserved_mem, 1 << 30);
        assert_eq!(sample.kernel_runner.path, KernelRunnerSection::default().path);
        assert_eq!(sample.kernel_runner.output_limit, 16 << 20);
        assert_eq!(sample.kernel_runner.response_timeout, Duration::from_secs(15));
        let dev = Config::from_file(&root.join("agent.dev.toml")).expect("agent.dev.toml");
        assert_eq!(dev.container.scratch_root, Path::new("/tmp/bai-agent-dev/scratches"));
        assert_eq!(dev.container.mount_root, Path::new("/tmp/bai-agent-dev/vfolders"));
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/agent.toml"))).expect_err("missing file");
        assert!(matches!(err, ConfigError::NotFound { .. }));
    }
}
