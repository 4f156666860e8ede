//! The RPC method table: Backend.AI's method names and argument shapes, the `Args` helper
//! that binds positional-or-keyword arguments with type checks, and the methods themselves.
//!
//! A method is one arm of [`Methods::dispatch`]; a new one (`create_kernels`,
//! `destroy_kernel`, …) is a new arm plus an `async fn` taking `Args`.

use std::{collections::BTreeMap, time::Instant};

use rmpv::Value;
use tokio::sync::watch;

use super::codec::{ErrorInfo, map_get, type_name};
use crate::{
    backendai::{self, rpc::HealthCheck},
    config::Config,
    msgpack_json::map,
};

/// Why a method did not return a value. Each becomes a FAILURE reply whose exception name
/// mirrors what a Python agent would have raised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error("unknown method `{0}`")]
    UnknownMethod(String),
    /// The request's arguments do not fit the method's signature.
    #[error("{0}")]
    Arguments(String),
    /// The request is not `{"args": [...], "kwargs": {...}}`.
    #[error("{0}")]
    Request(String),
    /// The method ran and failed.
    #[error("{method}: {message}")]
    Failed { method: String, message: String },
    /// The call names another agent (`agent_id=`): a manager's routing mistake.
    #[error("{method}: this call is for agent `{requested}`, but this is agent `{own}`")]
    WrongAgent { method: String, requested: String, own: String },
}

impl MethodError {
    /// The Python exception class a Backend.AI agent raises in the same situation.
    pub fn exception_name(&self) -> &'static str {
        match self {
            MethodError::UnknownMethod(_) => "AttributeError",
            MethodError::Arguments(_) => "TypeError",
            MethodError::Request(_) => "ValueError",
            MethodError::Failed { .. } => "RuntimeError",
            MethodError::WrongAgent { .. } => "ValueError",
        }
    }

    pub fn to_error_info(&self, method: &str) -> ErrorInfo {
        ErrorInfo::new(
            self.exception_name(),
            &self.to_string(),
            &format!("bai-agent {} (Rust), rpc method `{method}`", env!("CARGO_PKG_VERSION")),
        )
    }
}

/// The arguments of one call: callosum's `{"args": [...], "kwargs": {...}}`, bound to a
/// method's parameter names the way Python binds them.
#[derive(Debug, Clone, Default)]
pub struct Args {
    method: String,
    positional: Vec<Value>,
    keyword: BTreeMap<String, Value>,
}

impl Args {
    /// Reads a request payload. `None` (a nil body) means no arguments.
    pub fn from_payload(method: &str, payload: Option<Value>) -> Result<Args, MethodError> {
        let mut args = Args { method: method.to_owned(), ..Args::default() };
        let Some(payload) = payload else {
            return Ok(args);
        };
        // Backend.AI's extension types (UUIDs, datetimes, pickled enums, `ImageRef`s, …) become
        // plain values here, decoded without executing anything; any other class is refused
        // by name.
        let payload =
            crate::backendai::pickle::plain(payload).map_err(|err| MethodError::Request(format!("{method}: {err}")))?;
        let Value::Map(entries) = payload else {
            return Err(MethodError::Request(format!(
                "{method}: the request body must be a map {{\"args\": [...], \"kwargs\": {{...}}}}, got {}",
                type_name(&payload)
            )));
        };
        match map_get(&entries, "args") {
            None | Some(Value::Nil) => {}
            Some(Value::Array(values)) => args.positional = values.clone(),
            Some(other) => {
                return Err(MethodError::Request(format!(
                    "{method}: `args` must be an array, got {}",
                    type_name(other)
                )));
            }
        }
        match map_get(&entries, "kwargs") {
            None | Some(Value::Nil) => {}
            Some(Value::Map(pairs)) => {
                for (key, value) in pairs {
                    let Some(name) = key.as_str() else {
                        return Err(MethodError::Request(format!(
                            "{method}: keyword argument names must be strings, got {}",
                            type_name(key)
                        )));
                    };
                    args.keyword.insert(name.to_owned(), value.clone());
                }
            }
            Some(other) => {
                return Err(MethodError::Request(format!(
                    "{method}: `kwargs` must be a map, got {}",
                    type_name(other)
                )));
            }
        }
        Ok(args)
    }

    /// Builds arguments directly (tests, in-process callers).
    pub fn new(method: &str, positional: Vec<Value>, keyword: Vec<(&str, Value)>) -> Args {
        Args {
            method: method.to_owned(),
            positional,
            keyword: keyword.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// Backend.AI managers from 25.19 on name the agent a call is for, `agent_id=<id>`, on every
    /// method: a call meant for another agent is refused naming both ids; the keyword is then
    /// taken off, so methods see only their own parameters. A nil `agent_id` names no agent.
    pub fn claim_agent_id(mut self, own: &str) -> Result<Args, MethodError> {
        match self.keyword.remove("agent_id") {
            None | Some(Value::Nil) => Ok(self),
            Some(Value::String(id)) if id.as_str() == Some(own) => Ok(self),
            Some(Value::String(id)) => Err(MethodError::WrongAgent {
                method: self.method.clone(),
                requested: id.as_str().map_or_else(|| id.to_string(), str::to_owned),
                own: own.to_owned(),
            }),
            Some(other) => Err(self.wrong_type("agent_id", "a string", &other)),
        }
    }

    /// Checks the call against the method's parameters, in order: no more positional
    /// arguments than parameters, no unknown keyword, no parameter given twice.
    pub fn expect(&self, params: &[&str]) -> Result<(), MethodError> {
        let method = &self.method;
        if self.positional.len() > params.len() {
            return Err(MethodError::Arguments(format!(
                "{method}: takes {} positional argument{} but {} {} given",
                params.len(),
                if params.len() == 1 { "" } else { "s" },
                self.positional.len(),
                if self.positional.len() == 1 { "was" } else { "were" },
            )));
        }
        for name in self.keyword.keys() {
            match params.iter().position(|p| p == name) {
                None => {
                    return Err(MethodError::Arguments(format!("{method}: unexpected keyword argument `{name}`")));
                }
                Some(index) if index < self.positional.len() => {
                    return Err(MethodError::Arguments(format!("{method}: got multiple values for argument `{name}`")));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The argument for parameter `name` at position `index`, if given.
    /// The method these arguments are for.
    pub fn method(&self) -> &str {
        &self.method
    }

    pub fn get(&self, index: usize, name: &str) -> Option<&Value> {
        self.positional.get(index).or_else(|| self.keyword.get(name))
    }

    pub fn required(&self, index: usize, name: &str) -> Result<&Value, MethodError> {
        self.get(index, name)
            .ok_or_else(|| MethodError::Arguments(format!("{}: missing required argument `{name}`", self.method)))
    }

    fn wrong_type(&self, name: &str, expected: &str, got: &Value) -> MethodError {
        MethodError::Arguments(format!("{}: argument `{name}` must be {expected}, got {}", self.method, type_name(got)))
    }

    pub fn string(&self, index: usize, name: &str) -> Result<String, MethodError> {
        let value = self.required(index, name)?;
        value.as_str().map(str::to_owned).ok_or_else(|| self.wrong_type(name, "a string", value))
    }

    /// A string, or `None` when absent or nil.
    pub fn optional_string(&self, index: usize, name: &str) -> Result<Option<String>, MethodError> {
        match self.get(index, name) {
            None | Some(Value::Nil) => Ok(None),
            Some(value) => {
                value.as_str().map(|s| Some(s.to_owned())).ok_or_else(|| self.wrong_type(name, "a string", value))
            }
        }
    }

    pub fn integer(&self, index: usize, name: &str) -> Result<i64, MethodError> {
        let value = self.required(index, name)?;
        value.as_i64().ok_or_else(|| self.wrong_type(name, "an integer", value))
    }

    /// An integer or a float, as a float.
    pub fn number(&self, index: usize, name: &str) -> Result<f64, MethodError> {
        let value = self.required(index, name)?;
        match value {
            Value::F32(f) => Ok(f64::from(*f)),
            Value::F64(f) => Ok(*f),
            Value::Integer(i) => i.as_f64().ok_or_else(|| self.wrong_type(name, "a number", value)),
            _ => Err(self.wrong_type(name, "a number", value)),
        }
    }

    pub fn boolean_or(&self, index: usize, name: &str, default: bool) -> Result<bool, MethodError> {
        match self.get(index, name) {
            None | Some(Value::Nil) => Ok(default),
            Some(value) => value.as_bool().ok_or_else(|| self.wrong_type(name, "a boolean", value)),
        }
    }

    pub fn array(&self, index: usize, name: &str) -> Result<&[Value], MethodError> {
        let value = self.required(index, name)?;
        value.as_array().map(Vec::as_slice).ok_or_else(|| self.wrong_type(name, "an array", value))
    }

    pub fn map(&self, index: usize, name: &str) -> Result<&[(Value, Value)], MethodError> {
        let value = self.required(index, name)?;
        value.as_map().map(Vec::as_slice).ok_or_else(|| self.wrong_type(name, "a map", value))
    }
}

/// What the methods need from the running agent.
/// Every method [`Methods::dispatch`] serves (a test checks the two agree).
pub const METHOD_NAMES: &[&str] = &[
    "ping",
    "health",
    "gather_hwinfo",
    "get_local_config",
    "debug_sleep",
    "create_kernels",
    "destroy_kernel",
    "restart_kernel",
    "check_running",
    "ping_kernel",
    "sync_kernel_registry",
    "get_logs",
    "list_kernels",
    "assign_port",
    "upload_file",
    "download_file",
    "download_single",
    "list_files",
    "release_port",
    "execute",
    "interrupt_kernel",
    "get_completions",
    "start_service",
    "shutdown_service",
    "trigger_batch_execution",
    "check_and_pull",
    "check_pulling",
    "check_creating",
    "health_v2",
    "gather_hwinfo_v2",
    "create_local_network",
    "destroy_local_network",
    "purge_images",
    "commit",
    "get_commit_status",
    "push_image",
    "scan_gpu_alloc_map",
    "set_egress_cap",
    "image_pull_progress",
];

pub struct Methods {
    pub(super) config: Config,
    pub(super) kernels: Option<std::sync::Arc<crate::kernel::KernelManager>>,
    started: Instant,
    docker_connected: Option<watch::Receiver<bool>>,
    monitor_synced: Option<watch::Receiver<bool>>,
}

impl Methods {
    pub fn new(config: Config) -> Methods {
        Methods { config, kernels: None, started: Instant::now(), docker_connected: None, monitor_synced: None }
    }

    /// Lets `health` report whether Docker is followed and the monitor synced.
    /// Serves the kernel methods (`create_kernels`, `destroy_kernel`, …) from `kernels`.
    pub fn with_kernels(mut self, kernels: std::sync::Arc<crate::kernel::KernelManager>) -> Self {
        self.kernels = Some(kernels);
        self
    }

    pub fn with_readiness(
        mut self,
        docker_connected: watch::Receiver<bool>,
        monitor_synced: watch::Receiver<bool>,
    ) -> Self {
        self.docker_connected = Some(docker_connected);
        self.monitor_synced = Some(monitor_synced);
        self
    }

    /// Runs `method`. Every method of the manager-facing API is an arm here.
    /// Whether `method` is one of the agent's (`debug_*` included), for bounded metric labels.
    pub fn knows(method: &str) -> bool {
        METHOD_NAMES.contains(&method)
    }

    pub async fn dispatch(&self, method: &str, args: Args) -> Result<Value, MethodError> {
        let args = args.claim_agent_id(&self.config.agent.id)?;
        match method {
            "ping" => self.ping(args),
            "health" => self.health(args),
            "gather_hwinfo" => self.gather_hwinfo(args).await,
            "get_local_config" => self.get_local_config(args),
            "debug_sleep" if self.config.debug.enabled => self.debug_sleep(args).await,
            "create_kernels" => self.create_kernels(args).await,
            "destroy_kernel" => self.destroy_kernel(args).await,
            "restart_kernel" => self.restart_kernel(args).await,
            "check_running" => self.check_running(args).await,
            "ping_kernel" => self.ping_kernel(args).await,
            "sync_kernel_registry" => self.sync_kernel_registry(args).await,
            "get_logs" => self.get_logs(args).await,
            "list_kernels" => self.list_kernels(args).await,
            "assign_port" => self.assign_port(args).await,
            "upload_file" => self.upload_file(args).await,
            "download_file" => self.download_file(args).await,
            "download_single" => self.download_single(args).await,
            "list_files" => self.list_files(args).await,
            "release_port" => self.release_port(args).await,
            "execute" => self.execute(args).await,
            "interrupt_kernel" => self.interrupt_kernel(args).await,
            "get_completions" => self.get_completions(args).await,
            "start_service" => self.start_service(args).await,
            "shutdown_service" => self.shutdown_service(args).await,
            "trigger_batch_execution" => self.trigger_batch_execution(args).await,
            "check_and_pull" => self.check_and_pull(args).await,
            "check_pulling" => self.check_pulling(args).await,
            "check_creating" => self.check_creating(args).await,
            "health_v2" => self.health_v2(args),
            "gather_hwinfo_v2" => self.gather_hwinfo_v2(args).await,
            "create_local_network" => self.create_local_network(args).await,
            "destroy_local_network" => self.destroy_local_network(args).await,
            "purge_images" => self.purge_images(args).await,
            "commit" => self.commit(args).await,
            "get_commit_status" => self.get_commit_status(args).await,
            "push_image" => self.push_image(args).await,
            "scan_gpu_alloc_map" => self.scan_gpu_alloc_map(args),
            "set_egress_cap" => self.set_egress_cap(args).await,
            "image_pull_progress" => self.image_pull_progress(args).await,
            _ => Err(MethodError::UnknownMethod(method.to_owned())),
        }
    }

    /// An `agent_id` given as the first positional argument: it must be this agent's.
    pub(super) fn positional_agent_id(&self, args: &Args, method: &str) -> Result<(), MethodError> {
        match args.optional_string(0, "agent_id")? {
            Some(requested) if requested != self.config.agent.id => Err(MethodError::WrongAgent {
                method: method.to_owned(),
                requested: requested.to_owned(),
                own: self.config.agent.id.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// `ping(msg)` → `msg`.
    fn ping(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&["msg"])?;
        Ok(Value::from(args.string(0, "msg")?))
    }

    /// `health()` → `{status, version, component, agent_id, uptime, docker_connected, monitor_synced}`.
    fn health(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&[])?;
        let docker = self.docker_connected.as_ref().map(|rx| *rx.borrow());
        let synced = self.monitor_synced.as_ref().map(|rx| *rx.borrow());
        let healthy = docker.unwrap_or(true) && synced.unwrap_or(true);
        let flag = |state: Option<bool>| state.map_or(Value::Nil, Value::from);
        Ok(map(vec![
            ("status", Value::from(if healthy { "ok" } else { "degraded" })),
            ("version", Value::from(env!("CARGO_PKG_VERSION"))),
            ("component", Value::from("agent")),
            ("agent_id", Value::from(self.config.agent.id.as_str())),
            ("uptime", Value::from(self.started.elapsed().as_secs_f64())),
            ("docker_connected", flag(docker)),
            ("monitor_synced", flag(synced)),
        ]))
    }

    /// `health_v2(req)` (Backend.AI 26.9's typed health call; `req` is empty) →
    /// `HealthResp`: `{status, version, component, connectivity: {overall_healthy,
    /// connectivity_checks: [{service_group, component_id, is_healthy, last_checked_at,
    /// error_message}], timestamp}}`, the checks being the Docker engine and the monitor.
    fn health_v2(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&["req"])?;
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
        let state = |rx: &Option<watch::Receiver<bool>>| rx.as_ref().map(|rx| *rx.borrow());
        let checks = [
            HealthCheck {
                group: "docker",
                component: "docker-engine",
                healthy: state(&self.docker_connected),
                problem: "not connected",
            },
            HealthCheck {
                group: "monitor",
                component: "container-monitor",
                healthy: state(&self.monitor_synced),
                problem: "not synced yet",
            },
        ];
        Ok(backendai::rpc::health_v2(env!("CARGO_PKG_VERSION"), &checks, &now))
    }

    /// `gather_hwinfo_v2(req)` (26.9; `req` is empty) → `GatherHwinfoResp`:
    /// `{devices: [{device_name, status, status_info, metadata}]}`, the same facts as
    /// `gather_hwinfo` as a list.
    async fn gather_hwinfo_v2(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&["req"])?;
        let by_device = self.gather_hwinfo(Args::new("gather_hwinfo", Vec::new(), Vec::new())).await?;
        Ok(backendai::rpc::hwinfo_v2(&by_device))
    }

    /// `gather_hwinfo(agent_id=None)` → `{device: {status, status_info, metadata}}` for the
    /// intrinsic devices, read from `/proc`, and each accelerator the node hands out.
    /// Metadata values are strings, as Backend.AI's compute plugins report them.
    async fn gather_hwinfo(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&["agent_id"])?;
        self.positional_agent_id(&args, "gather_hwinfo")?;
        let cpu = tokio::fs::read_to_string("/proc/cpuinfo").await.map(|text| cpu_metadata(&text));
        let mem = tokio::fs::read_to_string("/proc/meminfo").await.map(|text| mem_metadata(&text));
        let mut entries = vec![
            ("cpu".to_owned(), hw_entry(cpu, "/proc/cpuinfo")),
            ("mem".to_owned(), hw_entry(mem, "/proc/meminfo")),
        ];
        for accelerator in self.kernels.iter().flat_map(|kernels| kernels.accelerators()) {
            entries.push((accelerator.key.clone(), hw_entry(Ok(accelerator.hwinfo()), &accelerator.key)));
        }
        Ok(Value::Map(entries.into_iter().map(|(key, value)| (key.into(), value)).collect()))
    }

    /// `debug_sleep(seconds, tag=None)` → `tag`, after sleeping (at most a minute). Only
    /// with `[debug] enabled = true`; tests use it to observe scheduling.
    async fn debug_sleep(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&["seconds", "tag"])?;
        let seconds = args.number(0, "seconds")?;
        if !(0.0..=60.0).contains(&seconds) {
            return Err(MethodError::Arguments(format!(
                "debug_sleep: `seconds` must be within 0 and 60, got {seconds}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(seconds)).await;
        Ok(args.get(1, "tag").cloned().unwrap_or(Value::Nil))
    }

    /// `get_local_config()` → the configuration in effect, keyed as in `agent.toml`.
    /// `get_local_config(agent_id=None)` (26.9 passes the id positionally) → the agent's
    /// configuration as the manager reads it.
    fn get_local_config(&self, args: Args) -> Result<Value, MethodError> {
        args.expect(&["agent_id"])?;
        self.positional_agent_id(&args, "get_local_config")?;
        let c = &self.config;
        let duration = |d: std::time::Duration| Value::from(humantime::format_duration(d).to_string());
        Ok(map(vec![
            (
                "agent",
                map(vec![
                    ("id", Value::from(c.agent.id.as_str())),
                    ("rpc-listen-addr", Value::from(c.agent.rpc_listen_addr.to_string())),
                    ("internal-addr", Value::from(c.agent.internal_addr.to_string())),
                ]),
            ),
            (
                "monitor",
                map(vec![
                    ("interval", duration(c.monitor.interval)),
                    ("gone-series-grace", duration(c.monitor.gone_series_grace)),
                ]),
            ),
            ("docker", map(vec![("host", c.docker.host.as_deref().map_or(Value::Nil, Value::from))])),
            (
                "logging",
                map(vec![
                    ("level", Value::from(c.logging.level.as_str())),
                    (
                        "format",
                        Value::from(match c.logging.format {
                            crate::config::LogFormat::Text => "text",
                            crate::config::LogFormat::Json => "json",
                        }),
                    ),
                ]),
            ),
            ("debug", map(vec![("enabled", Value::from(c.debug.enabled))])),
            // After the etcd overlay: where the values in effect came from is visible here.
            ("redis", map(vec![("addr", c.redis.addr.as_ref().map_or(Value::Nil, |a| Value::from(a.to_string())))])),
            (
                "etcd",
                map(vec![
                    ("addr", c.etcd.addr.as_ref().map_or(Value::Nil, |a| Value::from(a.to_string()))),
                    ("namespace", Value::from(c.etcd.namespace.as_str())),
                ]),
            ),
            ("version", Value::from(env!("CARGO_PKG_VERSION"))),
        ]))
    }
}

/// One `HardwareMetadata` entry: healthy with its metadata, or unavailable with the reason.
fn hw_entry<K: AsRef<str>>(metadata: std::io::Result<Vec<(K, String)>>, source: &str) -> Value {
    match metadata {
        Ok(fields) => map(vec![
            ("status", Value::from("healthy")),
            ("status_info", Value::Nil),
            (
                "metadata",
                Value::Map(fields.into_iter().map(|(k, v)| (Value::from(k.as_ref()), Value::from(v))).collect()),
            ),
        ]),
        Err(err) => map(vec![
            ("status", Value::from("unavailable")),
            ("status_info", Value::from(format!("cannot read {source}: {err}"))),
            ("metadata", map(Vec::new())),
        ]),
    }
}

/// `cores` (logical CPUs), `sockets`, `model_name`, `vendor_id`, `architecture` from `/proc/cpuinfo`.
pub fn cpu_metadata(cpuinfo: &str) -> Vec<(&'static str, String)> {
    let mut cores = 0usize;
    let mut sockets = std::collections::BTreeSet::new();
    let mut model = None;
    let mut vendor = None;
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => cores += 1,
            "physical id" => {
                sockets.insert(value.to_owned());
            }
            // x86 says "model name"; some arm64 kernels only say "Processor" or "CPU part".
            "model name" | "Processor" if model.is_none() => model = Some(value.to_owned()),
            "vendor_id" | "CPU implementer" if vendor.is_none() => vendor = Some(value.to_owned()),
            _ => {}
        }
    }
    if cores == 0 {
        cores = std::thread::available_parallelism().map_or(1, usize::from);
    }
    let mut fields = vec![("cores", cores.to_string()), ("sockets", sockets.len().max(1).to_string())];
    if let Some(model) = model {
        fields.push(("model_name", model));
    }
    if let Some(vendor) = vendor {
        fields.push(("vendor_id", vendor));
    }
    fields.push(("architecture", std::env::consts::ARCH.to_owned()));
    fields
}

/// `total`, `available` and `swap_total` in bytes (as strings) from `/proc/meminfo`.
pub fn mem_metadata(meminfo: &str) -> Vec<(&'static str, String)> {
    let kib = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok().map(|kib| kib.saturating_mul(1024))
        })
    };
    let mut fields = Vec::new();
    for (key, source) in [("total", "MemTotal"), ("available", "MemAvailable"), ("swap_total", "SwapTotal")] {
        if let Some(bytes) = kib(source) {
            fields.push((key, bytes.to_string()));
        }
    }
    if let Some(total) = kib("MemTotal") {
        fields.push(("total_human", format!("{:.1} GiB", total as f64 / (1u64 << 30) as f64)));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(positional: Vec<Value>, keyword: Vec<(&str, Value)>) -> Args {
        Args::new("ping", positional, keyword)
    }

    fn run(method: &str, args: Args) -> Result<Value, MethodError> {
        let methods = Methods::new(Config::default());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(methods.dispatch(method, args))
    }

    #[test]
    fn positional_or_keyword() {
        let by_position = args(vec![Value::from("hi")], vec![]);
        let by_name = args(vec![], vec![("msg", Value::from("hi"))]);
        for a in [by_position, by_name] {
            a.expect(&["msg"]).expect("fits");
            assert_eq!(a.string(0, "msg").expect("string"), "hi");
        }
    }

    #[test]
    fn wrong_type_is_named() {
        let a = args(vec![Value::from(5)], vec![]);
        let err = a.string(0, "msg").expect_err("not a string");
        assert_eq!(err.to_string(), "ping: argument `msg` must be a string, got integer");
        assert_eq!(err.exception_name(), "TypeError");
        let a = args(vec![], vec![("msg", Value::Binary(b"hi".to_vec()))]);
        assert_eq!(
            a.string(0, "msg").expect_err("bytes").to_string(),
            "ping: argument `msg` must be a string, got bytes"
        );
    }

    #[test]
    fn missing_extra_duplicate_and_unknown_arguments() {
        let err = args(vec![], vec![]).string(0, "msg").expect_err("missing");
        assert_eq!(err.to_string(), "ping: missing required argument `msg`");
        let err = args(vec![Value::from("a"), Value::from("b")], vec![]).expect(&["msg"]).expect_err("too many");
        assert_eq!(err.to_string(), "ping: takes 1 positional argument but 2 were given");
        let err = args(vec![Value::from("a")], vec![("msg", Value::from("b"))]).expect(&["msg"]).expect_err("twice");
        assert_eq!(err.to_string(), "ping: got multiple values for argument `msg`");
        let err = args(vec![], vec![("mesage", Value::from("b"))]).expect(&["msg"]).expect_err("unknown");
        assert_eq!(err.to_string(), "ping: unexpected keyword argument `mesage`");
    }

    #[test]
    fn payload_shapes() {
        let payload = Value::Map(vec![
            (Value::from("args"), Value::Array(vec![Value::from("x")])),
            (Value::from("kwargs"), Value::Map(vec![])),
        ]);
        let a = Args::from_payload("ping", Some(payload)).expect("valid");
        assert_eq!(a.string(0, "msg").expect("msg"), "x");
        assert!(Args::from_payload("ping", None).is_ok());
        let err = Args::from_payload("ping", Some(Value::from(1))).expect_err("not a map");
        assert!(err.to_string().contains("must be a map"), "{err}");
        let bad_args = Value::Map(vec![(Value::from("args"), Value::from("x"))]);
        let err = Args::from_payload("ping", Some(bad_args)).expect_err("args not array");
        assert_eq!(err.to_string(), "ping: `args` must be an array, got string");
        let bad_key = Value::Map(vec![(Value::from("kwargs"), Value::Map(vec![(Value::from(1), Value::Nil)]))]);
        let err = Args::from_payload("ping", Some(bad_key)).expect_err("kwarg key not a string");
        assert!(err.to_string().contains("names must be strings"), "{err}");
    }

    #[test]
    fn every_listed_method_is_dispatched() {
        let mut config = Config::default();
        config.debug.enabled = true;
        let methods = Methods::new(config);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        for name in METHOD_NAMES {
            // Wrong arguments on purpose: every method must get past the name lookup.
            let result = runtime.block_on(methods.dispatch(name, Args::new(name, vec![Value::from(true); 9], vec![])));
            assert_ne!(result, Err(MethodError::UnknownMethod((*name).to_owned())), "{name}");
            assert!(Methods::knows(name));
        }
        assert!(!Methods::knows("no_such_method"));
    }

    #[test]
    fn dispatch_ping_and_unknown() {
        assert_eq!(run("ping", args(vec![Value::from("hello")], vec![])), Ok(Value::from("hello")));
        let err = run("foo", Args::default()).expect_err("unknown");
        assert_eq!(err.to_string(), "unknown method `foo`");
        let err = run("health", Args::new("health", vec![Value::from(1)], vec![])).expect_err("health takes nothing");
        assert_eq!(err.to_string(), "health: takes 0 positional arguments but 1 was given");
    }

    #[test]
    fn debug_methods_exist_only_in_debug_mode() {
        let err = run("debug_sleep", Args::new("debug_sleep", vec![Value::from(0)], vec![])).expect_err("not in debug");
        assert_eq!(err, MethodError::UnknownMethod("debug_sleep".into()));
        let mut config = Config::default();
        config.debug.enabled = true;
        let methods = Methods::new(config);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let tag =
            runtime
                .block_on(methods.dispatch(
                    "debug_sleep",
                    Args::new("debug_sleep", vec![Value::F64(0.01), Value::from("t")], vec![]),
                ))
                .expect("sleeps");
        assert_eq!(tag, Value::from("t"));
        let err = runtime
            .block_on(methods.dispatch("debug_sleep", Args::new("debug_sleep", vec![Value::from("long")], vec![])))
            .expect_err("not a number");
        assert_eq!(err.to_string(), "debug_sleep: argument `seconds` must be a number, got string");
    }

    #[test]
    fn hwinfo_reads_this_machine() {
        let value = run("gather_hwinfo", Args::new("gather_hwinfo", vec![], vec![])).expect("hwinfo");
        let cpu = value.as_map().and_then(|m| map_get(m, "cpu")).and_then(Value::as_map).expect("cpu entry");
        assert_eq!(map_get(cpu, "status").and_then(Value::as_str), Some("healthy"));
        assert_eq!(map_get(cpu, "status_info"), Some(&Value::Nil));
        let meta = map_get(cpu, "metadata").and_then(Value::as_map).expect("metadata");
        let cores: usize = map_get(meta, "cores").and_then(Value::as_str).expect("cores").parse().expect("number");
        assert!(cores >= 1);
        let err = run("gather_hwinfo", Args::new("gather_hwinfo", vec![Value::from("i-other")], vec![]))
            .expect_err("another agent's id");
        assert!(err.to_string().contains("this call is for agent `i-other`"), "{err}");
    }

    /// Request bodies as backend.ai-manager 26.9.6's `AgentClient` sends them (packed by its
    /// own `msgpack.packb`: pickled enums, an `ImageRef`, UUID keys, `metadata`): they bind,
    /// and a kernel config among them parses.
    #[test]
    fn the_26_9_managers_own_requests_bind() {
        use crate::{backendai::pickle::tests as real, kernel::spec::KernelSpec, resources::SlotRegistry};
        let body = |hex: &str, method: &str| {
            let value = crate::rpc::codec::unpack(&real::hex(hex), "body").expect("msgpack");
            Args::from_payload(method, Some(value)).expect("binds").claim_agent_id("i-agent").expect("for i-agent")
        };
        let create = body(real::CREATE_KERNELS_BODY, "create_kernels");
        create.expect(&["session_id", "kernel_ids", "configs", "cluster_info", "kernel_image_refs"]).expect("shape");
        let config = &create.array(2, "configs").expect("configs")[0];
        let spec = KernelSpec::parse(config, None, &SlotRegistry::intrinsic()).expect("the config parses");
        assert_eq!(spec.image, "cr.backend.ai/stable/python:3.9-ubuntu20.04");
        assert!(spec.auto_pull, "AutoPullBehavior.DIGEST pulls");
        assert_eq!(spec.shm_bytes, Some(64 << 20), "BinarySize shmem");
        assert_eq!(spec.cluster_hostname.as_deref(), Some("main1"));
        let refs = create.map(4, "kernel_image_refs").expect("refs");
        assert_eq!(refs[0].0.as_str(), Some("0a1b2c3d-4e5f-4607-8899-aabbccddeeff"), "UUID keys become strings");

        let destroy = body(real::DESTROY_KERNEL_BODY, "destroy_kernel");
        assert_eq!(destroy.string(2, "reason").expect("reason"), "user-requested");

        let pull = body(real::CHECK_AND_PULL_BODY, "check_and_pull");
        let images = pull.map(0, "image_configs").expect("images");
        let config = images[0].1.as_map().expect("an ImageConfig");
        assert_eq!(map_get(config, "auto_pull").and_then(Value::as_str), Some("digest"));

        // A pickle of anything else is refused by name, and the agent goes on.
        let evil = Value::Map(vec![(
            Value::from("args"),
            Value::Array(vec![Value::Ext(6, b"\x80\x05\x8c\x02os\x8c\x06system\x93)R.".to_vec())]),
        )]);
        let err = Args::from_payload("ping", Some(evil)).expect_err("refused");
        assert!(err.to_string().contains("os.system"), "{err}");
    }

    #[test]
    fn every_method_takes_this_agents_id_and_refuses_anothers() {
        let own = Methods::new(Config::default()).config.agent.id.clone();
        let with_id = |id: &str| Args::new("ping", vec![Value::from("x")], vec![("agent_id", Value::from(id))]);
        assert_eq!(run("ping", with_id(&own)), Ok(Value::from("x")), "this agent's id is taken off");
        let err = run("ping", with_id("i-elsewhere")).expect_err("another agent");
        assert_eq!(err.to_string(), format!("ping: this call is for agent `i-elsewhere`, but this is agent `{own}`"));
        assert_eq!(err.exception_name(), "ValueError");
        let nil = Args::new("ping", vec![Value::from("x")], vec![("agent_id", Value::Nil)]);
        assert_eq!(run("ping", nil), Ok(Value::from("x")));
        let err = run("ping", Args::new("ping", vec![Value::from("x")], vec![("agent_id", Value::from(3))]))
            .expect_err("not a string");
        assert!(err.to_string().contains("agent_id"), "{err}");
        // 26.9 calls get_local_config(agent_id) positionally.
        let config = run("get_local_config", Args::new("get_local_config", vec![Value::from(own.as_str())], vec![]))
            .expect("config");
        assert!(config.as_map().and_then(|m| map_get(m, "agent")).is_some());
        let err = run("get_local_config", Args::new("get_local_config", vec![Value::from("i-other")], vec![]))
            .expect_err("another agent");
        assert!(err.to_string().contains("`i-other`"), "{err}");
    }

    #[test]
    fn cpuinfo_and_meminfo_parsing() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nphysical id\t: 0\n\n\
                       processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nphysical id\t: 1\n";
        let fields = cpu_metadata(cpuinfo);
        assert!(fields.contains(&("cores", "2".into())));
        assert!(fields.contains(&("sockets", "2".into())));
        assert!(fields.contains(&("model_name", "Xeon".into())));
        let meminfo = "MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:   8192 kB\nSwapTotal: 0 kB\n";
        let fields = mem_metadata(meminfo);
        assert!(fields.contains(&("total", (16384u64 * 1024).to_string())));
        assert!(fields.contains(&("available", (8192u64 * 1024).to_string())));
    }
}
