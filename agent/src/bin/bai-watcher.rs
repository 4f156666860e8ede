//! `bai-watcher`: Backend.AI's watcher side daemon for a bai-agent node.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use bai_agent::{
    config::Config,
    etcd::Etcd,
    watcher::{self, INSECURE_TOKEN, Watcher},
};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Backend.AI's agent watcher (port 6009): the agent's status, starting, stopping and resetting
/// it through the service manager, the node's fstab and the mounts under the mount root. Reads
/// the agent's own agent.toml ([watcher], container.mount-root, etcd).
#[derive(Debug, Parser)]
#[command(name = "bai-watcher", version)]
struct Cli {
    /// Config file (as bai-agent's): ./agent.toml, ~/.config/backend.ai/agent.toml,
    /// /etc/backend.ai/agent.toml, then embedded defaults.
    #[arg(short = 'f', long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log at debug level (overrides logging.level).
    #[arg(long)]
    debug: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mut config, source) = match Config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("bai-watcher: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.debug {
        config.logging.level = "debug".into();
    }
    bai_agent::logging::init(&config.logging.level, config.logging.format);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %source, "starting bai-watcher");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bai-watcher: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("bai-watcher failed: {err:#}");
            eprintln!("bai-watcher: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut config: Config) -> anyhow::Result<()> {
    let etcd = Etcd::connect(&config).await.context("etcd")?;
    if let Some(etcd) = &etcd {
        etcd.apply_shared_config(&mut config).await.context("etcd's shared configuration")?;
    }
    let token = match (&config.watcher.token, &etcd) {
        (Some(token), Some(etcd)) => {
            // The manager reads the token there: written when etcd has none, never clobbered.
            let held = etcd.put_if_absent("config/watcher/token", token).await.context("registering the token")?;
            if held != *token {
                tracing::error!(
                    "etcd's config/watcher/token differs from watcher.token; the manager's requests will be refused"
                );
            }
            token.clone()
        }
        (Some(token), None) => token.clone(),
        (None, _) => {
            tracing::warn!("no watcher.token here or in etcd: using Backend.AI's default token `insecure`; set one");
            INSECURE_TOKEN.to_owned()
        }
    };
    let addr = config.watcher.service_addr;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding watcher.service-addr {addr}"))?;
    let shutdown = CancellationToken::new();
    let watcher = Arc::new(Watcher {
        section: config.watcher.clone(),
        token,
        mount_root: config.container.mount_root.clone(),
        agent_health: format!("http://{}/health", reachable(config.agent.internal_addr)),
        shutdown: shutdown.clone(),
    });
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    tracing::info!(%addr, unit = %config.watcher.target_service, mount_root = %config.container.mount_root.display(), "watching the agent");
    watcher::serve(listener, watcher).await.context("serving")?;
    tracing::info!("bai-watcher stopped");
    Ok(())
}

/// An address to reach a server bound at `addr` (an unspecified host is reached on loopback).
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}
