//! The code-execution methods of the RPC table: argument binding for `execute`,
//! `interrupt_kernel`, `get_completions`, `start_service`, `shutdown_service` and
//! `trigger_batch_execution`; the work itself is [`crate::kernel::execution`]'s.

use std::{collections::HashMap, time::Duration};

use rmpv::Value;

use super::{
    codec::type_name,
    kernel_methods::{id_arg, kernel_failure},
    methods::{Args, MethodError, Methods},
};
use crate::kernel::execution::{ExecMode, ExecRequest};

/// Seconds as a duration; nil, zero or negative mean "no limit".
fn optional_seconds(args: &Args, index: usize, name: &str) -> Result<Option<Duration>, MethodError> {
    match args.get(index, name) {
        None | Some(Value::Nil) => Ok(None),
        Some(_) => {
            let seconds = args.number(index, name)?;
            if !seconds.is_finite() {
                return Err(MethodError::Arguments(format!("{}: `{name}` must be a finite number", args.method())));
            }
            Ok((seconds > 0.0).then(|| Duration::from_secs_f64(seconds.min(1e9))))
        }
    }
}

/// `execute`'s `opts`: the batch commands (`clean`, `build`, `exec`); other keys are ignored.
fn batch_opts(args: &Args, index: usize) -> Result<HashMap<String, String>, MethodError> {
    let mut opts = HashMap::new();
    let entries = match args.get(index, "opts") {
        None | Some(Value::Nil) => return Ok(opts),
        Some(Value::Map(entries)) => entries,
        Some(other) => {
            return Err(MethodError::Arguments(format!(
                "{}: argument `opts` must be a map, got {}",
                args.method(),
                type_name(other)
            )));
        }
    };
    for (key, value) in entries {
        let Some(key @ ("clean" | "build" | "exec")) = key.as_str() else { continue };
        match value {
            Value::Nil => {}
            Value::String(command) => {
                opts.insert(key.to_owned(), command.as_str().unwrap_or_default().to_owned());
            }
            other => {
                return Err(MethodError::Arguments(format!(
                    "{}: `opts.{key}` must be a command string, got {}",
                    args.method(),
                    type_name(other)
                )));
            }
        }
    }
    Ok(opts)
}

impl Methods {
    pub(super) async fn execute(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "execute";
        args.expect(&["session_id", "kernel_id", "api_version", "run_id", "mode", "code", "opts", "flush_timeout"])?;
        let kernel_id = id_arg(&args, 1, "kernel_id", M)?;
        let api_version = args.integer(2, "api_version")?;
        let api_version = u32::try_from(api_version).ok().filter(|v| *v >= 1).ok_or_else(|| {
            MethodError::Arguments(format!("{M}: `api_version` must be 1 or more, got {api_version}"))
        })?;
        let run_id = args.optional_string(3, "run_id")?;
        let mode = args.string(4, "mode")?;
        let mode = ExecMode::parse(&mode).ok_or_else(|| {
            MethodError::Arguments(format!("{M}: `mode` must be query, batch, continue or input, got {mode:?}"))
        })?;
        let code = args.optional_string(5, "code")?.unwrap_or_default();
        let opts = batch_opts(&args, 6)?;
        let flush_timeout = optional_seconds(&args, 7, "flush_timeout")?;
        let request = ExecRequest { run_id, mode, code, opts, api_version, flush_timeout };
        self.kernels(M)?.execute(&kernel_id, request).await.map_err(|err| kernel_failure(M, err))
    }

    pub(super) async fn interrupt_kernel(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "interrupt_kernel";
        args.expect(&["kernel_id"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        self.kernels(M)?.interrupt(&kernel_id).await.map_err(|err| kernel_failure(M, err))
    }

    pub(super) async fn get_completions(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "get_completions";
        args.expect(&["kernel_id", "text", "opts"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let text = args.string(1, "text")?;
        let opts = args.get(2, "opts").cloned().unwrap_or(Value::Nil);
        self.kernels(M)?.completions(&kernel_id, &text, &opts).await.map_err(|err| kernel_failure(M, err))
    }

    pub(super) async fn start_service(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "start_service";
        args.expect(&["kernel_id", "service", "opts"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let service = args.string(1, "service")?;
        let opts = args.get(2, "opts").cloned().unwrap_or(Value::Nil);
        self.kernels(M)?.start_service(&kernel_id, &service, &opts).await.map_err(|err| kernel_failure(M, err))
    }

    pub(super) async fn shutdown_service(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "shutdown_service";
        args.expect(&["kernel_id", "service"])?;
        let kernel_id = id_arg(&args, 0, "kernel_id", M)?;
        let service = args.string(1, "service")?;
        self.kernels(M)?.shutdown_service(&kernel_id, &service).await.map_err(|err| kernel_failure(M, err))?;
        Ok(Value::Nil)
    }

    /// Starts a batch session's job and returns at once; its end is reported as
    /// `session_success` or `session_failure`.
    pub(super) async fn trigger_batch_execution(&self, args: Args) -> Result<Value, MethodError> {
        const M: &str = "trigger_batch_execution";
        args.expect(&["session_id", "kernel_id", "code", "timeout"])?;
        let session_id = id_arg(&args, 0, "session_id", M)?;
        let kernel_id = id_arg(&args, 1, "kernel_id", M)?;
        let code = args.string(2, "code")?;
        let timeout = optional_seconds(&args, 3, "timeout")?;
        let kernels = self.kernels(M)?.clone();
        kernels.record(&kernel_id).await.map_err(|err| kernel_failure(M, err))?;
        tokio::spawn(async move { kernels.run_batch_job(&session_id, &kernel_id, &code, timeout).await });
        Ok(Value::Nil)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_opts_take_commands_and_name_bad_ones() {
        let args = Args::new(
            "execute",
            vec![],
            vec![(
                "opts",
                Value::Map(vec![
                    ("exec".into(), "make run".into()),
                    ("clean".into(), Value::Nil),
                    ("other".into(), 1.into()),
                ]),
            )],
        );
        let opts = batch_opts(&args, 6).expect("opts");
        assert_eq!(opts.get("exec").map(String::as_str), Some("make run"));
        assert_eq!(opts.len(), 1);
        let bad = Args::new("execute", vec![], vec![("opts", Value::Map(vec![("build".into(), 3.into())]))]);
        assert!(batch_opts(&bad, 6).expect_err("bad").to_string().contains("opts.build"));
        let timeout = Args::new("x", vec![], vec![("flush_timeout", Value::F64(0.5))]);
        assert_eq!(optional_seconds(&timeout, 7, "flush_timeout").ok().flatten(), Some(Duration::from_millis(500)));
        let none = Args::new("x", vec![], vec![("flush_timeout", 0.into())]);
        assert_eq!(optional_seconds(&none, 7, "flush_timeout").ok().flatten(), None);
    }
}
