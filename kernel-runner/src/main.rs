//! `bai-krunner` entry point: CLI flags and env, config dir, tracing to stderr, signal handling
//! and the optional main command.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use kernel_runner::{
    config::{self, RunnerConfig, Runtime, RuntimeKind},
    main_command::MainCommand,
};

#[derive(Debug, Parser)]
#[command(name = "bai-krunner", version, about = "Backend.AI-compatible in-container kernel runner")]
struct Cli {
    /// Folder holding intrinsic-ports.json and environ.txt.
    #[arg(long, default_value = "/home/config")]
    config_dir: PathBuf,
    /// Address to bind the REPL sockets on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// REPL in (PULL) port; default from intrinsic-ports.json `replin`, else 2000.
    #[arg(long)]
    repl_in_port: Option<u16>,
    /// REPL out (PUSH) port; default from intrinsic-ports.json `replout`, else 2001.
    #[arg(long)]
    repl_out_port: Option<u16>,
    /// Query-mode profile (the image label `ai.backend.runtime-type`): shell or python.
    #[arg(long, env = "BACKENDAI_RUNTIME_TYPE", default_value = "shell")]
    runtime: String,
    /// Interpreter path (the image label `ai.backend.runtime-path`).
    #[arg(long, env = "BACKENDAI_RUNTIME_PATH")]
    runtime_path: Option<PathBuf>,
    /// Where code runs; defaults to /home/work if it exists, else the current dir.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Service definitions (`<name>.json`).
    #[arg(long, default_value = "/etc/backend.ai/service-defs")]
    service_defs_dir: PathBuf,
    /// The kernel's main command (after `--`): run next to the REPL; when it ends, the runner
    /// ends with its exit code.
    #[arg(last = true, value_name = "CMD")]
    main_command: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Its stderr is the container's log (`session logs`): plain text, even on the TTY
        // kernels get.
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let ports = config::read_intrinsic_ports(&cli.config_dir).context("reading intrinsic ports")?;
    let child_env = config::read_environ(&cli.config_dir).context("reading environ.txt")?;
    let kind = RuntimeKind::from_label(&cli.runtime);
    let runtime = Runtime {
        kind,
        path: cli.runtime_path.filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| kind.default_path()),
    };
    let work_dir = match cli.work_dir {
        Some(dir) => dir,
        None if std::path::Path::new("/home/work").is_dir() => PathBuf::from("/home/work"),
        None => std::env::current_dir().context("current dir")?,
    };
    let config = RunnerConfig {
        bind: cli.bind,
        repl_in_port: cli.repl_in_port.or(ports.get("replin").copied()).unwrap_or(config::DEFAULT_REPL_IN_PORT),
        repl_out_port: cli.repl_out_port.or(ports.get("replout").copied()).unwrap_or(config::DEFAULT_REPL_OUT_PORT),
        runtime,
        work_dir,
        child_env,
        service_defs_dir: cli.service_defs_dir,
    };
    let user = kernel_runner::user::KernelUser::from_env(&config.child_env);
    if let Err(err) = user.own(&config.work_dir) {
        tracing::warn!(work_dir = %config.work_dir.display(), ?user, %err, "cannot hand the work directory to the kernel's user");
    }
    kernel_runner::bootstrap::run_if_present(&config.work_dir, &config.child_env).await;
    let mut main_command = match cli.main_command.is_empty() {
        true => None,
        false => Some(
            MainCommand::start(&cli.main_command, &config.work_dir, &config.child_env)
                .with_context(|| format!("starting the main command {:?}", cli.main_command))?,
        ),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let code = tokio::select! {
            _ = tokio::signal::ctrl_c() => stop(main_command.as_mut()).await,
            _ = term.recv() => stop(main_command.as_mut()).await,
            code = wait(main_command.as_mut()) => {
                tracing::info!(code, "the main command ended; the kernel ends with it");
                Some(code)
            }
        };
        exit_tx.send(code).ok();
    };
    kernel_runner::runner::run(config, shutdown).await?;
    match exit_rx.await.ok().flatten() {
        Some(code) => std::process::exit(code),
        None => Ok(()),
    }
}

async fn stop(main: Option<&mut MainCommand>) -> Option<i32> {
    match main {
        Some(main) => Some(main.stop().await),
        None => None,
    }
}

/// The main command's exit code; never resolves when there is none.
async fn wait(main: Option<&mut MainCommand>) -> i32 {
    match main {
        Some(main) => main.wait().await,
        None => std::future::pending().await,
    }
}
