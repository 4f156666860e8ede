//! `bai-watcher`, Backend.AI's side daemon on port 6009: the agent's status (its unit and its
//! `/health`), starting, stopping and resetting it through the service manager, the node's
//! fstab and the mounts under the mount root. Every request carries
//! `X-BackendAI-Watcher-Token` (compared in constant time) or gets 403.

pub mod mounts;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::WatcherSection;

/// The header the manager sends the token in.
pub const TOKEN_HEADER: &str = "X-BackendAI-Watcher-Token";
/// Backend.AI's token when none is configured anywhere.
pub const INSECURE_TOKEN: &str = "insecure";

/// What the handlers share.
pub struct Watcher {
    pub section: WatcherSection,
    pub token: String,
    /// Where mounts go (`container.mount-root`, etcd's `volumes/_mount`).
    pub mount_root: PathBuf,
    /// The agent's `/health` (its `agent.internal-addr`).
    pub agent_health: String,
    /// Cancelled by `POST /shutdown` once the node's shutdown command ran.
    pub shutdown: CancellationToken,
}

/// The watcher's routes (`/soft-reset` only when `soft-reset-available`).
pub fn router(watcher: Arc<Watcher>) -> Router {
    let mut routes = Router::new()
        .route("/", get(status))
        .route("/agent/start", post(|s: State<Arc<Watcher>>| unit_action(s, "start")))
        .route("/agent/stop", post(|s: State<Arc<Watcher>>| unit_action(s, "stop")))
        .route("/agent/restart", post(|s: State<Arc<Watcher>>| unit_action(s, "restart")))
        .route("/hard-reset", post(hard_reset))
        .route("/shutdown", post(shutdown))
        .route("/fstab", get(fstab))
        .route("/mounts", get(list_mounts).post(mount).delete(unmount));
    if watcher.section.soft_reset_available {
        routes = routes.route("/soft-reset", post(|s: State<Arc<Watcher>>| unit_action(s, "reload")));
    }
    routes
        .layer(middleware::from_fn_with_state(watcher.clone(), authorize))
        .layer(middleware::map_response(|mut response: Response| async move {
            response.headers_mut().insert(header::SERVER, HeaderValue::from_static("BackendAI-AgentWatcher"));
            response
        }))
        .with_state(watcher)
}

/// Serves until `shutdown` (a signal, or `POST /shutdown`).
pub async fn serve(listener: tokio::net::TcpListener, watcher: Arc<Watcher>) -> std::io::Result<()> {
    let shutdown = watcher.shutdown.clone();
    let app = router(watcher).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// `a == b` in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn authorize(State(watcher): State<Arc<Watcher>>, request: Request, next: Next) -> Response {
    let given = request.headers().get(TOKEN_HEADER).map(HeaderValue::as_bytes);
    if given.is_some_and(|token| same_secret(token, watcher.token.as_bytes())) {
        return next.run(request).await;
    }
    tracing::warn!(path = %request.uri().path(), "watcher request refused: missing or wrong token");
    failure(StatusCode::FORBIDDEN, "InvalidWatcherToken", format!("missing or wrong {TOKEN_HEADER}"))
}

fn failure(status: StatusCode, kind: &'static str, message: String) -> Response {
    Failure { status, kind, message }.into_response()
}

/// A refused or failed request: its status and what went wrong, as JSON.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = json!({"type": self.kind, "title": self.message, "message": self.message});
        (self.status, Json(body)).into_response()
    }
}

impl From<mounts::MountError> for Failure {
    fn from(err: mounts::MountError) -> Self {
        let status = match err {
            mounts::MountError::InvalidName { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure { status, kind: "MountFailed", message: err.to_string() }
    }
}

fn bad_fstab_path(asked: &str, configured: &std::path::Path) -> Failure {
    Failure {
        status: StatusCode::BAD_REQUEST,
        kind: "InvalidFstabPath",
        message: format!("fstab_path `{asked}` is not this node's fstab ({})", configured.display()),
    }
}

fn ok() -> Response {
    Json(json!({"result": "ok"})).into_response()
}

/// `systemctl <action> <unit>`.
async fn systemctl(watcher: &Watcher, action: &str, unit: &str) -> Result<String, mounts::MountError> {
    let mut argv = watcher.section.systemctl.clone();
    argv.extend([action.to_owned(), unit.to_owned()]);
    mounts::run(&argv).await
}

async fn status(State(watcher): State<Arc<Watcher>>) -> Response {
    let unit = systemctl(&watcher, "is-active", &watcher.section.target_service).await;
    // `is-active` exits non-zero for an inactive unit and still prints its state.
    let agent_status = match unit {
        Ok(out) => out.trim().to_owned(),
        Err(mounts::MountError::Command { output, .. }) => output.lines().last().unwrap_or("unknown").trim().to_owned(),
        Err(_) => "unknown".into(),
    };
    let health = agent_health(&watcher.agent_health).await;
    Json(json!({
        "agent-status": agent_status,
        "watcher-status": "active",
        "agent-health": health,
    }))
    .into_response()
}

/// The agent's `/health` report, or `null` when it does not answer.
async fn agent_health(url: &str) -> Value {
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build();
    let Ok(client) = client else { return Value::Null };
    match client.get(url).send().await {
        Ok(response) => {
            response.text().await.ok().and_then(|text| serde_json::from_str(&text).ok()).unwrap_or(Value::Null)
        }
        Err(_) => Value::Null,
    }
}

async fn unit_action(State(watcher): State<Arc<Watcher>>, action: &'static str) -> Response {
    match systemctl(&watcher, action, &watcher.section.target_service).await {
        Ok(_) => {
            tracing::info!(action, unit = %watcher.section.target_service, "agent unit changed by the watcher");
            ok()
        }
        Err(err) => failure(StatusCode::INTERNAL_SERVER_ERROR, "ServiceCommandFailed", err.to_string()),
    }
}

/// Stop the agent, restart the engine, start the agent.
async fn hard_reset(State(watcher): State<Arc<Watcher>>) -> Response {
    let unit = watcher.section.target_service.clone();
    for (action, target) in [("stop", &unit), ("restart", &watcher.section.docker_service), ("start", &unit)] {
        if let Err(err) = systemctl(&watcher, action, target).await {
            return failure(StatusCode::INTERNAL_SERVER_ERROR, "ServiceCommandFailed", err.to_string());
        }
    }
    tracing::warn!(unit = %unit, "hard reset: the agent was stopped, the engine restarted, the agent started");
    ok()
}

/// Stop the agent and shut the node down; the watcher ends after answering.
async fn shutdown(State(watcher): State<Arc<Watcher>>) -> Response {
    if let Err(err) = systemctl(&watcher, "stop", &watcher.section.target_service).await {
        return failure(StatusCode::INTERNAL_SERVER_ERROR, "ServiceCommandFailed", err.to_string());
    }
    tracing::warn!(command = ?watcher.section.shutdown_command, "shutting the node down on the manager's request");
    if let Err(err) = mounts::run(&watcher.section.shutdown_command).await {
        return failure(StatusCode::INTERNAL_SERVER_ERROR, "ShutdownFailed", err.to_string());
    }
    watcher.shutdown.cancel();
    ok()
}

/// The fstab; `fstab_path` may only name the configured one.
async fn fstab(State(watcher): State<Arc<Watcher>>, uri: Uri) -> Response {
    let asked = uri
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("fstab_path="))
        .map(percent_decode);
    let path = &watcher.section.fstab_path;
    if let Some(asked) = asked
        && std::path::Path::new(&asked) != path
    {
        return bad_fstab_path(&asked, path).into_response();
    }
    match std::fs::read_to_string(path) {
        Ok(text) => text.into_response(),
        Err(err) => failure(StatusCode::NOT_FOUND, "FstabNotFound", format!("{}: {err}", path.display())),
    }
}

/// A query value: `+` is a space, then percent-decoding.
fn percent_decode(text: &str) -> String {
    crate::etcd::percent_decode(&text.replace('+', " "))
}

async fn list_mounts(State(watcher): State<Arc<Watcher>>) -> Response {
    match mounts::list(&watcher.mount_root) {
        Ok(points) => Json(points).into_response(),
        Err(err) => failure(StatusCode::INTERNAL_SERVER_ERROR, "MountListFailed", err.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct MountRequest {
    name: String,
    #[serde(default)]
    fs_location: String,
    #[serde(default)]
    fs_type: String,
    #[serde(default)]
    options: Option<String>,
    #[serde(default)]
    edit_fstab: bool,
    #[serde(default)]
    fstab_path: Option<String>,
}

/// The request's JSON body, or a 400 naming what is wrong with it.
fn parse_request(body: &Bytes) -> Result<MountRequest, Failure> {
    serde_json::from_slice(body).map_err(|err| Failure {
        status: StatusCode::BAD_REQUEST,
        kind: "InvalidMountRequest",
        message: format!("the request body: {err}"),
    })
}

/// The fstab a mount request may edit: the configured one only.
fn fstab_for(watcher: &Watcher, request: &MountRequest) -> Result<PathBuf, Failure> {
    let configured = &watcher.section.fstab_path;
    match request.fstab_path.as_deref().filter(|p| !p.is_empty()) {
        Some(asked) if std::path::Path::new(asked) != configured => Err(bad_fstab_path(asked, configured)),
        _ => Ok(configured.clone()),
    }
}

async fn mount(State(watcher): State<Arc<Watcher>>, body: Bytes) -> Result<Response, Failure> {
    let request = parse_request(&body)?;
    let point = mounts::mount_point(&watcher.mount_root, &request.name)?;
    if request.fs_type.is_empty() || request.fs_location.is_empty() {
        return Err(Failure {
            status: StatusCode::BAD_REQUEST,
            kind: "InvalidMountRequest",
            message: "fs_type and fs_location are required".into(),
        });
    }
    let fstab = fstab_for(&watcher, &request)?;
    std::fs::create_dir_all(&point).map_err(|source| mounts::MountError::Io { path: point.clone(), source })?;
    let mut argv = vec!["mount".to_owned(), "-t".to_owned(), request.fs_type.clone()];
    if let Some(options) = request.options.as_deref().filter(|o| !o.trim().is_empty()) {
        argv.extend(["-o".to_owned(), options.to_owned()]);
    }
    argv.extend([request.fs_location.clone(), point.display().to_string()]);
    let out = mounts::run(&argv).await?;
    tracing::info!(name = %request.name, point = %point.display(), fs_type = %request.fs_type, "mounted by the watcher");
    if request.edit_fstab {
        let options = request.options.as_deref().unwrap_or("");
        mounts::fstab_add(&fstab, &request.fs_location, &point, &request.fs_type, options)?;
    }
    Ok(out.into_response())
}

async fn unmount(State(watcher): State<Arc<Watcher>>, body: Bytes) -> Result<Response, Failure> {
    let request = parse_request(&body)?;
    let point = mounts::mount_point(&watcher.mount_root, &request.name)?;
    let fstab = fstab_for(&watcher, &request)?;
    let out = mounts::run(&["umount".to_owned(), point.display().to_string()]).await?;
    // An empty directory goes with the mount; anything else stays.
    let _ = std::fs::remove_dir(&point);
    tracing::info!(name = %request.name, point = %point.display(), "unmounted by the watcher");
    if request.edit_fstab {
        mounts::fstab_remove(&fstab, &point)?;
    }
    Ok(out.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"tok", b"tok"));
        assert!(!same_secret(b"tok", b"tom"));
        assert!(!same_secret(b"tok", b"toke"));
        assert!(!same_secret(b"", b"x"));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("%2Fetc%2Ffstab"), "/etc/fstab");
        assert_eq!(percent_decode("a+b%"), "a b%");
    }
}
