//! The internal HTTP server (`agent.internal-addr`): `/metrics`, `/health`, `/livez`, `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::MetricsState;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read.
pub struct ServerState {
    pub registry: Registry,
    pub metrics: Arc<MetricsState>,
    pub agent_id: String,
    pub docker_connected: watch::Receiver<bool>,
    pub monitor_synced: watch::Receiver<bool>,
    /// Kernel recovery done (the saved registry reconciled with the engine).
    pub kernels_ready: Option<std::sync::Arc<crate::kernel::KernelManager>>,
}

impl ServerState {
    fn ready(&self) -> Result<(), &'static str> {
        if !*self.docker_connected.borrow() {
            return Err("not connected to the Docker engine");
        }
        if !*self.monitor_synced.borrow() {
            return Err("kernel containers not yet synced");
        }
        if self.kernels_ready.as_ref().is_some_and(|kernels| !kernels.is_ready()) {
            return Err("kernels not yet recovered");
        }
        Ok(())
    }
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds first so a taken port is an error at startup, then serves until `shutdown`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn metrics(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response(),
    }
}

async fn readyz(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    match state.ready() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn health(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    let ready = state.ready();
    let body = serde_json::json!({
        "status": if ready.is_ok() { "ok" } else { "degraded" },
        "reason": ready.err(),
        "agent_id": state.agent_id,
        "version": env!("CARGO_PKG_VERSION"),
        "docker_connected": *state.docker_connected.borrow(),
        "tracked_containers": state.metrics.tracked_containers(),
        "attached_cgroups": state.metrics.attached_cgroups(),
    });
    let status = if ready.is_ok() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}
