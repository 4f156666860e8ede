//! The daemon's wiring: one task per job (Docker watcher, monitor, HTTP server), one
//! cancellation token to stop them, and an orderly shutdown that leaves containers running.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    docker,
    metrics::{self, MetricsState, server},
    monitor::{self, CgroupLayout, ContainerMonitor, EbpfMonitor},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] monitor::cgroup::CgroupError),
    #[error(transparent)]
    Ebpf(#[from] monitor::EbpfError),
    #[error("cannot listen on {addr} (agent.internal-addr): {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("the internal HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the agent until `shutdown` is cancelled, then detaches and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let layout = CgroupLayout::detect()?;
    tracing::info!(mode = ?layout.mode, unified_root = %layout.unified_root.display(), "cgroup layout");
    let ebpf = EbpfMonitor::load()?;
    tracing::info!("eBPF programs loaded; sched_switch attached");

    let listener = server::bind(config.agent.internal_addr)
        .await
        .map_err(|source| DaemonError::Bind { addr: config.agent.internal_addr, source })?;
    tracing::info!(addr = %config.agent.internal_addr, "serving /metrics, /health, /livez, /readyz");

    let metrics_state = Arc::new(MetricsState::default());
    let (events_tx, events_rx) = mpsc::channel(1024);
    let (connected_tx, connected_rx) = watch::channel(false);
    let (synced_tx, synced_rx) = watch::channel(false);

    let watcher = tokio::spawn(docker::watch_containers(
        config.docker.host.clone(),
        config.agent.id.clone(),
        events_tx,
        connected_tx,
        shutdown.clone(),
    ));
    let monitor = tokio::spawn(monitor::run_monitor(
        ContainerMonitor::new(ebpf, layout, config.monitor.gone_series_grace),
        events_rx,
        config.monitor.interval,
        metrics_state.clone(),
        synced_tx,
        shutdown.clone(),
    ));
    let server_state = Arc::new(server::ServerState {
        registry: metrics::registry(metrics_state.clone(), &config.agent.id),
        metrics: metrics_state,
        agent_id: config.agent.id.clone(),
        docker_connected: connected_rx,
        monitor_synced: synced_rx,
    });
    let server = tokio::spawn(server::serve(listener, server_state, shutdown.clone()));

    let served = server.await;
    // The server ends on shutdown, or early on failure: either way everything stops.
    shutdown.cancel();
    let _ = watcher.await;
    let _ = monitor.await;
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(DaemonError::Serve(err)),
        Err(join) => Err(DaemonError::Serve(std::io::Error::other(join.to_string()))),
    }
}
