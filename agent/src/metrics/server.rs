//! The internal HTTP server (`agent.internal-addr`): `/metrics`, `/health`, `/livez`, `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::MetricsState;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for clients that do not ask for OpenMetrics.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// OpenMetrics for scrapers that accept it (Prometheus does), else the classic text format
/// (curl, promtool, older scrapers), as Prometheus' own client libraries negotiate.
async fn metrics(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> impl IntoResponse {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, &state.registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response();
    }
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, PROMETHEUS_TEXT)], openmetrics_to_text(&body)).into_response()
    }
}

/// Rewrites OpenMetrics text as the Prometheus 0.0.4 text format: a counter family is named
/// by its `_total` samples, `# UNIT` and `# EOF` go.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family =
                if kind == "counter" && !name.ends_with("_total") { format!("{name}_total") } else { name.to_owned() };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_the_classic_text_format() {
        let om = "# HELP cpu_usage_seconds CPU time.\n# TYPE cpu_usage_seconds counter\n# UNIT cpu_usage_seconds seconds\ncpu_usage_seconds_total{k=\"a\"} 1.5\n# HELP up Up.\n# TYPE up gauge\nup 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP cpu_usage_seconds_total CPU time.\n# TYPE cpu_usage_seconds_total counter\ncpu_usage_seconds_total{k=\"a\"} 1.5\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
