//! `bai-agent`: the node agent daemon.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use bai_agent::config::{Config, LogFormat};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Backend.AI-compatible node agent: runs kernels through Docker and accounts for
/// each one with eBPF (CPU time, network bytes), served at /metrics; answers the manager's
/// RPC (callosum over ZeroMQ) on agent.rpc-listen-addr.
#[derive(Debug, Parser)]
#[command(name = "bai-agent", version)]
struct Cli {
    /// Config file. Without it: ./agent.toml, ~/.config/backend.ai/agent.toml,
    /// /etc/backend.ai/agent.toml, then embedded defaults.
    #[arg(short = 'f', long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log at debug level (overrides logging.level).
    #[arg(long)]
    debug: bool,
    /// Log format (overrides logging.format).
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Agent id (overrides agent.id).
    #[arg(long, value_name = "ID")]
    agent_id: Option<String>,
    /// Address of /metrics and the health endpoints (overrides agent.internal-addr).
    #[arg(long, value_name = "HOST:PORT")]
    internal_addr: Option<SocketAddr>,
    /// Address of the manager-facing RPC server (overrides agent.rpc-listen-addr).
    #[arg(long, value_name = "HOST:PORT")]
    rpc_listen_addr: Option<SocketAddr>,
    /// Check the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    // The agent's start-up check of its CPU program runs this executable as its workload.
    if bai_agent::monitor::selfcheck::run_workload_if_asked() {
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let (mut config, source) = match Config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("bai-agent: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.debug {
        config.logging.level = "debug".into();
    }
    if let Some(format) = cli.log_format {
        config.logging.format = format;
    }
    if let Some(id) = cli.agent_id {
        config.agent.id = id;
    }
    if let Some(addr) = cli.internal_addr {
        config.agent.internal_addr = addr;
    }
    if let Some(addr) = cli.rpc_listen_addr {
        config.agent.rpc_listen_addr = addr;
    }
    if cli.check_config {
        println!("configuration from {source} is valid:\n{config:#?}");
        if !config.python_keys.is_empty() {
            println!(
                "ignored (keys of the Python agent that bai-agent does not use): {}",
                config.python_keys.join(", ")
            );
        }
        return ExitCode::SUCCESS;
    }
    bai_agent::logging::init(&config.logging.level, config.logging.format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %source, agent_id = %config.agent.id, "starting bai-agent");
    if !config.python_keys.is_empty() {
        tracing::warn!(
            keys = %config.python_keys.join(", "),
            "the configuration sets keys of the Python agent that bai-agent does not use; they are ignored"
        );
    }
    let reload_from = match source {
        bai_agent::config::ConfigSource::File(path) => Some(path),
        bai_agent::config::ConfigSource::EmbeddedDefaults => None,
    };
    match run(config, reload_from) {
        Ok(()) => {
            tracing::info!("bai-agent stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            let message = bai_agent::logging::one_line(&err);
            tracing::error!("{message}");
            eprintln!("bai-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config, reload_from: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
                _ = on_signal.cancelled() => return,
            }
            on_signal.cancel();
        });
        // SIGHUP re-reads the file's [policy] rules (see daemon::Reloads).
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
        let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                tracing::info!("SIGHUP: re-reading the configuration's [policy] rules");
                if reload_tx.send(()).await.is_err() {
                    return;
                }
            }
        });
        let reloads = bai_agent::daemon::Reloads { path: reload_from, signals: reloads };
        bai_agent::daemon::run(config, reloads, shutdown).await.context("bai-agent failed")
    })
}
