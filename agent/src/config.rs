//! `agent.toml`: the search order, parsing with key-named errors, defaults and CLI overrides.

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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct DebugSection {
    /// Adds debugging RPC methods (`debug_sleep`) to the method table.
    pub enabled: bool,
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
        }
    }
}

impl Default for MonitorSection {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1), gone_series_grace: Duration::from_secs(120) }
    }
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

/// Backend.AI names agents `i-<hostname>` unless told otherwise.
fn default_agent_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("i-{}", if host.is_empty() { "localhost" } else { host })
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

    /// Parses TOML text; `origin` only labels errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let path = origin.to_path_buf();
        let document = toml::Deserializer::parse(text)
            .map_err(|err| ConfigError::Syntax { path: path.clone(), message: err.to_string() })?;
        let mut unknown = Vec::new();
        let mut record_unknown = |key: serde_ignored::Path<'_>| unknown.push(key.to_string());
        let tracked = serde_ignored::Deserializer::new(document, &mut record_unknown);
        let config: Config = serde_path_to_error::deserialize(tracked).map_err(|err| ConfigError::InvalidValue {
            path: path.clone(),
            key: err.path().to_string(),
            message: first_line(&err.inner().to_string()),
        })?;
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKeys { path, keys: unknown });
        }
        config.validate(&path)?;
        Ok(config)
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
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            return Err(invalid("logging.level", "not a log filter (try \"info\" or \"debug\")"));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("agent.toml"))
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
        let dev = Config::from_file(&root.join("agent.dev.toml")).expect("agent.dev.toml");
        assert_eq!(dev.agent.rpc_listen_addr, "127.0.0.1:6001".parse().expect("addr"));
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
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/agent.toml"))).expect_err("missing file");
        assert!(matches!(err, ConfigError::NotFound { .. }));
    }
}
