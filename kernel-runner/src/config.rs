//! Runner configuration: the REPL ports (`intrinsic-ports.json`), the child environment
//! (`environ.txt`), the work dir and the query-mode runtime profile.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

/// Default REPL ports of Backend.AI's runner.
pub const DEFAULT_REPL_IN_PORT: u16 = 2000;
pub const DEFAULT_REPL_OUT_PORT: u16 = 2001;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Which built-in interpreter profile runs query-mode snippets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// A POSIX shell (`/bin/sh`, dash or busybox ash) run interactively.
    Shell,
    /// Python 3 with a small driver keeping one globals dict.
    Python,
}

impl RuntimeKind {
    /// Maps the `ai.backend.runtime-type` label value; unknown types fall back to the shell.
    pub fn from_label(value: &str) -> RuntimeKind {
        let value = value.trim().to_ascii_lowercase();
        if value.starts_with("python") {
            RuntimeKind::Python
        } else {
            if !matches!(value.as_str(), "" | "shell" | "sh" | "bash" | "ash" | "posix") {
                tracing::warn!(runtime_type = %value, "unknown runtime type; using the POSIX shell profile");
            }
            RuntimeKind::Shell
        }
    }

    /// The interpreter used when no `ai.backend.runtime-path` is given.
    pub fn default_path(self) -> PathBuf {
        match self {
            RuntimeKind::Shell => PathBuf::from("/bin/sh"),
            RuntimeKind::Python => PathBuf::from("python3"),
        }
    }
}

/// The query-mode runtime: profile and interpreter path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub kind: RuntimeKind,
    pub path: PathBuf,
}

/// Everything the runner needs, resolved from CLI flags and the config dir.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub bind: IpAddr,
    pub repl_in_port: u16,
    pub repl_out_port: u16,
    pub runtime: Runtime,
    /// Where snippets and batch commands run (`/home/work` in a kernel).
    pub work_dir: PathBuf,
    /// Extra variables for every child, from `environ.txt`.
    pub child_env: BTreeMap<String, String>,
    /// Folder of service definitions (`<name>.json`), `/etc/backend.ai/service-defs` in a kernel.
    pub service_defs_dir: PathBuf,
}

/// `intrinsic-ports.json`: `{"replin": 2000, "replout": 2001, "sshd": 2200, "ttyd": 7681}`;
/// numbers or numeric strings. A missing file yields an empty map.
pub fn read_intrinsic_ports(config_dir: &Path) -> Result<BTreeMap<String, u16>, ConfigError> {
    let path = config_dir.join("intrinsic-ports.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|err| ConfigError::Invalid { path: path.clone(), message: err.to_string() })?;
    let Some(object) = value.as_object() else {
        return Err(ConfigError::Invalid { path, message: "not a JSON object".into() });
    };
    let mut ports = BTreeMap::new();
    for (name, value) in object {
        let port = match value {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            serde_json::Value::String(s) => s.trim().parse::<u16>().ok(),
            _ => None,
        };
        match port {
            Some(port) => {
                ports.insert(name.clone(), port);
            }
            None => tracing::warn!(%name, %value, "ignoring a non-port entry in intrinsic-ports.json"),
        }
    }
    Ok(ports)
}

/// `environ.txt`: `KEY=VALUE` lines; lines without `=` are skipped. A missing file yields nothing.
pub fn read_environ(config_dir: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let path = config_dir.join("environ.txt");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_accept_numbers_and_strings() {
        let dir = std::env::temp_dir().join(format!("krunner-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(dir.join("intrinsic-ports.json"), r#"{"replin": 3000, "replout": "3001", "x": "y"}"#).ok();
        std::fs::write(dir.join("environ.txt"), "A=1\nB=x=y\nnoeq\n").ok();
        let ports = read_intrinsic_ports(&dir).unwrap_or_default();
        assert_eq!(ports.get("replin"), Some(&3000));
        assert_eq!(ports.get("replout"), Some(&3001));
        assert_eq!(ports.len(), 2);
        let env = read_environ(&dir).unwrap_or_default();
        assert_eq!(env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(env.len(), 2);
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(RuntimeKind::from_label("python3"), RuntimeKind::Python);
        assert_eq!(RuntimeKind::from_label("shell"), RuntimeKind::Shell);
    }
}
