//! `start-service` / `shutdown-service` / `get-apps`: services described by JSON definitions
//! (`<defs>/<name>.json`, `{"command": [...], "env": {...}}` with `{runtime_path}`, `{port}` and
//! `{ports[N]}` substituted), started in the work dir and reported up once their port accepts.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{process::Child, sync::Mutex};

const PORT_WAIT: Duration = Duration::from_secs(40);

/// The `start-service` payload (extra fields ignored).
#[derive(Debug, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Deserialize)]
struct ServiceDef {
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

pub struct Services {
    pub defs_dir: PathBuf,
    pub work_dir: PathBuf,
    pub runtime_path: PathBuf,
    pub env: BTreeMap<String, String>,
    running: Mutex<HashMap<String, Child>>,
}

impl Services {
    pub fn new(defs_dir: PathBuf, work_dir: PathBuf, runtime_path: PathBuf, env: BTreeMap<String, String>) -> Self {
        Services { defs_dir, work_dir, runtime_path, env, running: Mutex::new(HashMap::new()) }
    }

    /// Handles `start-service`; the result is the `service-result` JSON.
    pub async fn start(&self, payload: &[u8]) -> Value {
        let info: ServiceInfo = match serde_json::from_slice(payload) {
            Ok(info) => info,
            Err(err) => return json!({"status": "failed", "error": format!("bad service info: {err}")}),
        };
        if info.protocol == "preopen" {
            return json!({"status": "started"});
        }
        let mut running = self.running.lock().await;
        if let Some(child) = running.get_mut(&info.name) {
            if matches!(child.try_wait(), Ok(None)) {
                return json!({"status": "running"});
            }
            running.remove(&info.name);
        }
        let port = info.port.or(info.ports.first().copied());
        let Some(def) = self.definition(&info.name) else {
            tracing::warn!(name = %info.name, "unsupported service");
            return json!({"status": "failed", "error": "unsupported service"});
        };
        let subst = |arg: &str| {
            let mut arg = arg.replace("{runtime_path}", &self.runtime_path.to_string_lossy());
            if let Some(port) = port {
                arg = arg.replace("{port}", &port.to_string());
            }
            for (i, p) in info.ports.iter().enumerate() {
                arg = arg.replace(&format!("{{ports[{i}]}}"), &p.to_string());
            }
            arg
        };
        let args: Vec<String> = def.command.iter().map(|a| subst(a)).collect();
        let Some((program, rest)) = args.split_first() else {
            return json!({"status": "failed", "error": "empty service command"});
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(rest).current_dir(&self.work_dir).envs(&self.env).envs(&def.env).kill_on_drop(true);
        crate::user::apply(&mut cmd, &self.env);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return json!({"status": "failed", "error": format!("the executable file is not found: {program}")});
            }
            Err(err) => return json!({"status": "failed", "error": format!("{program}: {err}")}),
        };
        if let Some(port) = port {
            let deadline = tokio::time::Instant::now() + PORT_WAIT;
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    break;
                }
                if !matches!(child.try_wait(), Ok(None)) {
                    return json!({"status": "failed", "error": format!("the process did not start properly: {program}")});
                }
                if tokio::time::Instant::now() >= deadline {
                    child.start_kill().ok();
                    return json!({"status": "failed", "error": format!("opening the service port timed out: {}", info.name)});
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tracing::info!(name = %info.name, pid = ?child.id(), ?port, "service started");
        running.insert(info.name, child);
        json!({"status": "started"})
    }

    /// Handles `shutdown-service` (payload: a JSON string); SIGTERM, then SIGKILL after 2 s.
    pub async fn shutdown(&self, payload: &[u8]) {
        let Ok(name) = serde_json::from_slice::<String>(payload) else {
            tracing::warn!("shutdown-service: payload is not a JSON string");
            return;
        };
        let Some(mut child) = self.running.lock().await.remove(&name) else { return };
        if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: plain kill(2) on a child we spawned and have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
            child.kill().await.ok();
        }
        tracing::info!(%name, "service stopped");
    }

    /// `apps-result`: `{"status": "done", "data": [...]}`, the names of the defined services.
    pub fn apps(&self, _selected: &str) -> Value {
        let mut data = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.defs_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|ext| ext == "json")
                    && let Some(stem) = path.file_stem()
                {
                    data.push(json!({"name": stem.to_string_lossy()}));
                }
            }
        }
        json!({"status": "done", "data": data})
    }

    fn definition(&self, name: &str) -> Option<ServiceDef> {
        if name.contains('/') || name.starts_with('.') {
            return None;
        }
        let text = std::fs::read(self.defs_dir.join(format!("{name}.json"))).ok()?;
        serde_json::from_slice(&text).map_err(|err| tracing::warn!(%name, %err, "bad service definition")).ok()
    }
}
