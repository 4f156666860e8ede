//! Code execution in a kernel: runs (query and batch) with their ids, `execute` steps and
//! their result shapes (API v1 and v2+), input, interrupt, completion, services, and batch
//! jobs that end in `session_success` / `session_failure`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use rmpv::Value;

use crate::msgpack_json::{from_json, to_json};

use super::{
    KernelError, KernelManager, KernelState,
    runner::{Collected, ConsoleKind, ReplyKind, RunnerClient, StepEnd},
};

/// How long `get_completions` waits for the runner.
const COMPLETION_WAIT: Duration = Duration::from_secs(5);
/// How long `start_service` waits: the runner itself waits up to 40 s for the port.
const SERVICE_WAIT: Duration = Duration::from_secs(45);
/// Steps of a batch job are collected this often.
const BATCH_FLUSH: Duration = Duration::from_secs(1);
/// The run id of jobs started by `trigger_batch_execution`.
pub const BATCH_RUN_ID: &str = "batch-job";

/// How an `execute` call drives the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    Query,
    Batch,
    Continue,
    Input,
}

impl ExecMode {
    pub fn parse(mode: &str) -> Option<ExecMode> {
        Some(match mode {
            "query" => ExecMode::Query,
            "batch" => ExecMode::Batch,
            "continue" => ExecMode::Continue,
            "input" => ExecMode::Input,
            _ => return None,
        })
    }
}

/// One `execute` call.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub run_id: Option<String>,
    pub mode: ExecMode,
    pub code: String,
    /// Batch commands: `clean`, `build`, `exec`.
    pub opts: HashMap<String, String>,
    pub api_version: u32,
    /// `None` waits until the step ends.
    pub flush_timeout: Option<Duration>,
}

/// A kernel's REPL connection and the run it is in.
pub struct KernelRepl {
    client: RunnerClient,
    /// The run whose output the next step collects; `None` between runs.
    current_run: Mutex<Option<String>>,
}

impl KernelRepl {
    fn current_run(&self) -> Option<String> {
        self.current_run.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn set_current_run(&self, run: Option<String>) {
        *self.current_run.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = run;
    }
}

/// Per-kernel REPL connections, made on first use.
#[derive(Default)]
pub struct Repls {
    by_kernel: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<KernelRepl>>>>>,
}

impl Repls {
    /// Drops a kernel's connection (it stopped, restarted or stopped answering).
    pub async fn forget(&self, kernel_id: &str) {
        self.by_kernel.lock().await.remove(kernel_id);
    }
}

fn runner_failure(kernel_id: &str, err: impl std::fmt::Display) -> KernelError {
    super::failed(kernel_id, err)
}

impl KernelManager {
    /// The kernel's REPL, connecting on first use.
    async fn repl(&self, kernel_id: &str) -> Result<Arc<KernelRepl>, KernelError> {
        let record = self.record(kernel_id).await?;
        if record.state != KernelState::Running {
            return Err(super::failed(kernel_id, format!("the kernel is {}, not running", record.state.as_str())));
        }
        let cell = self.repls.by_kernel.lock().await.entry(kernel_id.to_owned()).or_default().clone();
        let connected = cell
            .get_or_try_init(|| async {
                let client = RunnerClient::connect(
                    &self.bind_host,
                    record.repl_in_port,
                    record.repl_out_port,
                    self.runner_limits,
                )
                .await?;
                Ok::<_, super::runner::RunnerError>(Arc::new(KernelRepl { client, current_run: Mutex::new(None) }))
            })
            .await;
        match connected {
            Ok(repl) => Ok(repl.clone()),
            Err(err) => {
                self.repls.forget(kernel_id).await;
                Err(runner_failure(kernel_id, err))
            }
        }
    }

    /// One `execute` step: feeds the run (code, batch commands or input) and collects its
    /// output until the step ends, the flush timeout passes (`continued`) or the runner stops
    /// answering (`exec-timeout`).
    pub async fn execute(&self, kernel_id: &str, request: ExecRequest) -> Result<Value, KernelError> {
        let repl = self.repl(kernel_id).await?;
        let current = repl.current_run();
        let run_id = match request.mode {
            ExecMode::Query | ExecMode::Batch => {
                if let Some(current) = current {
                    return Err(KernelError::Arguments(format!(
                        "kernel `{kernel_id}` is still in run `{current}`; collect it with mode `continue`, answer \
                         it with mode `input`, or interrupt the kernel"
                    )));
                }
                let run_id = request.run_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                repl.client.begin_run();
                repl.set_current_run(Some(run_id.clone()));
                let sent = match request.mode {
                    ExecMode::Query => repl.client.send("code", request.code.clone()).await,
                    _ => feed_batch(&repl.client, &request.opts).await,
                };
                if let Err(err) = sent {
                    repl.set_current_run(None);
                    self.repls.forget(kernel_id).await;
                    return Err(runner_failure(kernel_id, err));
                }
                run_id
            }
            ExecMode::Continue | ExecMode::Input => {
                let Some(current) = current else {
                    return Err(KernelError::Arguments(format!(
                        "kernel `{kernel_id}` has no run in progress to {}",
                        if request.mode == ExecMode::Input { "send input to" } else { "continue" }
                    )));
                };
                if let Some(asked) = &request.run_id
                    && *asked != current
                {
                    return Err(KernelError::Arguments(format!(
                        "kernel `{kernel_id}` is in run `{current}`, not `{asked}`"
                    )));
                }
                if request.mode == ExecMode::Input {
                    repl.client.awaiting_reply();
                    repl.client
                        .send("input", request.code.clone())
                        .await
                        .map_err(|err| runner_failure(kernel_id, err))?;
                }
                current
            }
        };
        let collected = repl.client.collect(request.flush_timeout).await;
        if matches!(collected.end, Some((StepEnd::Finished, _))) {
            repl.set_current_run(None);
        }
        if collected.timed_out {
            tracing::warn!(kernel_id, run_id, addr = repl.client.addr(), "the kernel runner stopped answering");
        }
        Ok(step_result(&run_id, &collected, request.api_version))
    }

    /// Sends SIGINT to the running code; the kernel itself lives on. The interrupted run is
    /// over for `execute`: its remaining output is discarded.
    pub async fn interrupt(&self, kernel_id: &str) -> Result<Value, KernelError> {
        let repl = self.repl(kernel_id).await?;
        repl.client.send("interrupt", Bytes::new()).await.map_err(|err| runner_failure(kernel_id, err))?;
        if repl.current_run().is_some() {
            repl.client.abandon_run();
            repl.set_current_run(None);
        }
        Ok(Value::Map(vec![("status".into(), "finished".into())]))
    }

    /// Completion candidates for `text` from the kernel's runtime.
    pub async fn completions(&self, kernel_id: &str, text: &str, opts: &Value) -> Result<Value, KernelError> {
        let repl = self.repl(kernel_id).await?;
        let mut request = serde_json::Map::new();
        request.insert("code".into(), text.into());
        if let Some(opts) = to_json(opts).as_object() {
            request.extend(opts.clone());
        }
        let payload = serde_json::Value::Object(request).to_string();
        match repl.client.request("complete", payload, ReplyKind::Completion, COMPLETION_WAIT).await {
            Ok(reply) => {
                let completions = serde_json::from_slice::<serde_json::Value>(&reply)
                    .map(|v| from_json(&v))
                    .unwrap_or_else(|_| Value::Array(Vec::new()));
                Ok(Value::Map(vec![("status".into(), "finished".into()), ("completions".into(), completions)]))
            }
            Err(err) => {
                tracing::debug!(kernel_id, error = %err, "no completions");
                Ok(Value::Map(vec![("status".into(), "failed".into()), ("completions".into(), Value::Array(vec![]))]))
            }
        }
    }

    /// Starts one of the kernel's declared services; the runner's `service-result`.
    pub async fn start_service(&self, kernel_id: &str, service: &str, opts: &Value) -> Result<Value, KernelError> {
        let record = self.record(kernel_id).await?;
        let Some(port) = record.service_ports.iter().find(|p| p.name == service) else {
            let known: Vec<&str> = record.service_ports.iter().map(|p| p.name.as_str()).collect();
            return Err(KernelError::Arguments(format!(
                "kernel `{kernel_id}` has no service `{service}` (it has: {})",
                known.join(", ")
            )));
        };
        let payload = serde_json::json!({
            "name": service,
            "port": port.container_port,
            "ports": [port.container_port],
            "protocol": port.protocol,
            "options": to_json(opts),
        })
        .to_string();
        let repl = self.repl(kernel_id).await?;
        let reply = repl
            .client
            .request("start-service", payload, ReplyKind::ServiceResult, SERVICE_WAIT)
            .await
            .map_err(|err| runner_failure(kernel_id, err))?;
        let result = serde_json::from_slice::<serde_json::Value>(&reply)
            .map_err(|err| runner_failure(kernel_id, format!("the runner's service-result is not JSON: {err}")))?;
        if result.get("status").and_then(|s| s.as_str()) == Some("failed") {
            tracing::warn!(kernel_id, service, result = %result, "service did not start");
        }
        Ok(from_json(&result))
    }

    pub async fn shutdown_service(&self, kernel_id: &str, service: &str) -> Result<(), KernelError> {
        let repl = self.repl(kernel_id).await?;
        let payload = serde_json::Value::from(service).to_string();
        repl.client.send("shutdown-service", payload).await.map_err(|err| runner_failure(kernel_id, err))
    }

    /// Runs `code` as the batch job of a batch session and reports how it ended, as
    /// `session_success` or `session_failure`. `timeout` bounds the whole job.
    pub async fn run_batch_job(&self, session_id: &str, kernel_id: &str, code: &str, timeout: Option<Duration>) {
        let job = async {
            let mut request = ExecRequest {
                run_id: Some(BATCH_RUN_ID.to_owned()),
                mode: ExecMode::Batch,
                code: String::new(),
                opts: HashMap::from([("exec".to_owned(), code.to_owned())]),
                api_version: 2,
                flush_timeout: Some(BATCH_FLUSH),
            };
            loop {
                let result = self.execute(kernel_id, request.clone()).await?;
                match field(&result, "status").and_then(Value::as_str) {
                    Some("finished") => return Ok(field(&result, "exitCode").and_then(Value::as_i64).unwrap_or(-1)),
                    Some("exec-timeout") => return Err(KernelError::Arguments("exec-timeout".into())),
                    _ => request.mode = ExecMode::Continue,
                }
            }
        };
        let outcome = match timeout {
            Some(limit) => tokio::time::timeout(limit, job).await.ok(),
            None => Some(job.await),
        };
        let (name, reason, code) = match outcome {
            Some(Ok(0)) => ("session_success", "task-finished", 0),
            Some(Ok(code)) => ("session_failure", "task-failed", code),
            Some(Err(err)) => {
                tracing::warn!(kernel_id, error = %err, "batch job failed");
                ("session_failure", if err.to_string() == "exec-timeout" { "task-timeout" } else { "task-failed" }, -1)
            }
            None => {
                tracing::warn!(kernel_id, ?timeout, "batch job timed out; interrupting it");
                self.interrupt(kernel_id).await.ok();
                ("session_failure", "task-timeout", -2)
            }
        };
        tracing::info!(kernel_id, session_id, event = name, reason, exit_code = code, "batch job ended");
        self.emit(name, vec![session_id.into(), reason.into(), code.into()]);
    }
}

async fn feed_batch(client: &RunnerClient, opts: &HashMap<String, String>) -> Result<(), super::runner::RunnerError> {
    for step in ["clean", "build", "exec"] {
        client.send(step, opts.get(step).cloned().unwrap_or_default()).await?;
    }
    Ok(())
}

fn field<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    map.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

/// Text stays a msgpack string; bytes that are not UTF-8 go as binary, unchanged.
fn text_or_binary(data: &[u8]) -> Value {
    match std::str::from_utf8(data) {
        Ok(text) => text.into(),
        Err(_) => Value::Binary(data.to_vec()),
    }
}

fn concat(console: &Collected, kind: ConsoleKind) -> Vec<u8> {
    console.console.iter().filter(|(k, _)| *k == kind).flat_map(|(_, data)| data.iter().copied()).collect()
}

/// A `media` item's `(type, data)`.
fn media_item(data: &[u8]) -> Value {
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(object) => Value::Array(vec![
            object.get("type").and_then(|t| t.as_str()).unwrap_or("").into(),
            object.get("data").map(from_json).unwrap_or(Value::Nil),
        ]),
        Err(_) => Value::Array(vec!["".into(), text_or_binary(data)]),
    }
}

/// Backend.AI's `execute` result for one step.
pub fn step_result(run_id: &str, collected: &Collected, api_version: u32) -> Value {
    let (status, exit_code, options) = match (&collected.end, collected.timed_out) {
        (_, true) => ("exec-timeout", Value::Nil, Value::Nil),
        (None, false) => ("continued", Value::Nil, Value::Nil),
        (Some((StepEnd::WaitingInput, payload)), false) => {
            let options = serde_json::from_slice::<serde_json::Value>(payload)
                .map(|v| from_json(&v))
                .unwrap_or(Value::Map(vec![("is_password".into(), false.into())]));
            ("waiting-input", Value::Nil, options)
        }
        (Some((end, payload)), false) => {
            let code = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("exitCode").and_then(serde_json::Value::as_i64))
                .map(Value::from)
                .unwrap_or(Value::Nil);
            (end.as_str(), code, Value::Nil)
        }
    };
    let mut result = vec![
        ("runId".into(), run_id.into()),
        ("status".into(), status.into()),
        ("exitCode".into(), exit_code),
        ("options".into(), options),
        ("files".into(), Value::Array(Vec::new())),
    ];
    if api_version <= 1 {
        result.push(("stdout".into(), text_or_binary(&concat(collected, ConsoleKind::Stdout))));
        result.push(("stderr".into(), text_or_binary(&concat(collected, ConsoleKind::Stderr))));
        let media = collected.console.iter().filter(|(k, _)| *k == ConsoleKind::Media).map(|(_, d)| media_item(d));
        result.push(("media".into(), Value::Array(media.collect())));
        let html = collected.console.iter().filter(|(k, _)| *k == ConsoleKind::Html).map(|(_, d)| text_or_binary(d));
        result.push(("html".into(), Value::Array(html.collect())));
    } else {
        let console = collected
            .console
            .iter()
            .map(|(kind, data)| {
                let item = if *kind == ConsoleKind::Media { media_item(data) } else { text_or_binary(data) };
                Value::Array(vec![kind.as_str().into(), item])
            })
            .collect();
        result.push(("console".into(), Value::Array(console)));
    }
    Value::Map(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collected(console: Vec<(ConsoleKind, &[u8])>, end: Option<(StepEnd, &'static [u8])>) -> Collected {
        Collected {
            console: console.into_iter().map(|(k, d)| (k, Bytes::copy_from_slice(d))).collect(),
            end: end.map(|(e, p)| (e, Bytes::from_static(p))),
            timed_out: false,
        }
    }

    #[test]
    fn v2_keeps_order_and_v1_splits_streams() {
        let step = collected(
            vec![(ConsoleKind::Stdout, b"a\n"), (ConsoleKind::Stderr, b"oops\n"), (ConsoleKind::Stdout, b"\xff\n")],
            Some((StepEnd::Finished, b"{\"exitCode\": 3}")),
        );
        let v2 = step_result("r1", &step, 2);
        assert_eq!(field(&v2, "status").and_then(Value::as_str), Some("finished"));
        assert_eq!(field(&v2, "exitCode").and_then(Value::as_i64), Some(3));
        let console = field(&v2, "console").and_then(Value::as_array).expect("console");
        assert_eq!(console.len(), 3);
        assert_eq!(console[1], Value::Array(vec!["stderr".into(), "oops\n".into()]));
        assert_eq!(console[2], Value::Array(vec!["stdout".into(), Value::Binary(b"\xff\n".to_vec())]));
        let v1 = step_result("r1", &step, 1);
        assert_eq!(field(&v1, "stdout"), Some(&Value::Binary(b"a\n\xff\n".to_vec())));
        assert_eq!(field(&v1, "stderr").and_then(Value::as_str), Some("oops\n"));
        assert!(field(&v1, "console").is_none());
    }

    #[test]
    fn statuses_follow_the_step_end() {
        let running = step_result("r", &collected(vec![], None), 2);
        assert_eq!(field(&running, "status").and_then(Value::as_str), Some("continued"));
        assert_eq!(field(&running, "exitCode"), Some(&Value::Nil));
        let input = step_result("r", &collected(vec![], Some((StepEnd::WaitingInput, b"{\"is_password\": true}"))), 2);
        assert_eq!(field(&input, "status").and_then(Value::as_str), Some("waiting-input"));
        let options = field(&input, "options").expect("options");
        assert_eq!(field(options, "is_password"), Some(&Value::Boolean(true)));
        let mut silent = collected(vec![], None);
        silent.timed_out = true;
        assert_eq!(field(&step_result("r", &silent, 2), "status").and_then(Value::as_str), Some("exec-timeout"));
        assert_eq!(ExecMode::parse("batch"), Some(ExecMode::Batch));
        assert_eq!(ExecMode::parse("eval"), None);
    }
}
