//! Everything that talks to the Docker engine: finding this agent's kernel containers
//! by label, inspecting them, and turning the engine's event stream into [`ContainerEvent`]s.
//! Creating and removing containers lives in [`containers`], images in [`images`].

pub mod containers;
pub mod images;

use std::{collections::HashMap, time::Duration};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, ListContainersOptions},
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Labels on every kernel container (DESIGN.md); recovery and monitoring find kernels by them.
pub mod labels {
    pub const AGENT_ID: &str = "ai.backend.agent-id";
    pub const KERNEL_ID: &str = "ai.backend.kernel-id";
    pub const SESSION_ID: &str = "ai.backend.session-id";
    pub const OWNER_USER_ID: &str = "ai.backend.owner-user-id";
    pub const OWNER_PROJECT_ID: &str = "ai.backend.owner-project-id";
    /// The accelerator devices the kernel was given: `cuda=0,1` (plugin key, device ids;
    /// plugins separated by `;`).
    pub const ACCELERATOR_DEVICES: &str = "ai.backend.internal.accelerator-devices";

    /// [`ACCELERATOR_DEVICES`]' value for `(plugin key, device id)` pairs.
    pub fn accelerator_devices(devices: &[(String, String)]) -> String {
        let mut by_plugin: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
        for (plugin, device) in devices {
            by_plugin.entry(plugin.as_str()).or_default().push(device.as_str());
        }
        by_plugin.iter().map(|(plugin, ids)| format!("{plugin}={}", ids.join(","))).collect::<Vec<_>>().join(";")
    }

    /// The pairs of an [`ACCELERATOR_DEVICES`] value; malformed parts are skipped.
    pub fn parse_accelerator_devices(value: &str) -> Vec<(String, String)> {
        value
            .split(';')
            .filter_map(|part| part.split_once('='))
            .flat_map(|(plugin, ids)| {
                ids.split(',').filter(|id| !id.is_empty()).map(move |id| (plugin.to_owned(), id.to_owned()))
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine at {host}: {source}")]
    Connect { host: String, source: bollard::errors::Error },
    #[error("Docker engine request `{what}` failed: {source}")]
    Request { what: String, source: bollard::errors::Error },
    #[error("Docker engine refused `{what}`: {message}")]
    Refused { what: String, message: String },
}

/// A running container that carries this agent's kernel labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelContainer {
    pub container_id: String,
    pub kernel_id: String,
    pub session_id: String,
    pub owner_user_id: String,
    pub owner_project_id: String,
    pub image: String,
    /// The container's init process, whose cgroup is the container's.
    pub pid: u32,
    /// The accelerator devices it was given: (plugin key, device id).
    pub accelerator_devices: Vec<(String, String)>,
}

/// What the watcher tells the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerEvent {
    /// Every running kernel container after (re)connecting; any other is no longer running.
    Snapshot(Vec<KernelContainer>),
    Started(KernelContainer),
    Stopped {
        container_id: String,
    },
    Removed {
        container_id: String,
    },
}

/// A connection to the engine, scoped to one agent's containers.
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    agent_id: String,
}

impl DockerClient {
    /// Connects to `host` (or `DOCKER_HOST`, or the local socket) and agrees on an API version,
    /// so an older engine (API 1.41) is spoken to in its own version.
    pub async fn connect(host: Option<&str>, agent_id: &str) -> Result<Self, DockerError> {
        let shown = host.map(str::to_owned).unwrap_or_else(|| "the local socket".into());
        let docker = match host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|source| DockerError::Connect { host: shown.clone(), source })?;
        let docker = docker.negotiate_version().await.map_err(|source| DockerError::Connect { host: shown, source })?;
        Ok(Self { docker, agent_id: agent_id.to_owned() })
    }

    pub fn engine(&self) -> &Docker {
        &self.docker
    }

    pub(crate) fn label_filters(&self) -> Vec<String> {
        vec![labels::KERNEL_ID.to_owned(), format!("{}={}", labels::AGENT_ID, self.agent_id)]
    }

    /// Every running container of this agent that carries a kernel id.
    pub async fn running_kernels(&self) -> Result<Vec<KernelContainer>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), self.label_filters())]);
        let options = ListContainersOptions { filters: Some(filters), ..Default::default() };
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|source| DockerError::Request { what: "list containers".into(), source })?;
        let mut kernels = Vec::with_capacity(summaries.len());
        for id in summaries.into_iter().filter_map(|summary| summary.id) {
            // A container may stop between list and inspect; it is simply not running.
            if let Some(kernel) = self.inspect_kernel(&id).await? {
                kernels.push(kernel);
            }
        }
        Ok(kernels)
    }

    /// The container as a running kernel, or `None` if it is gone, stopped or not a kernel.
    pub async fn inspect_kernel(&self, container_id: &str) -> Result<Option<KernelContainer>, DockerError> {
        let inspected = match self.docker.inspect_container(container_id, None).await {
            Ok(inspected) => inspected,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(source) => {
                return Err(DockerError::Request { what: format!("inspect {container_id}"), source });
            }
        };
        let state = inspected.state.unwrap_or_default();
        let pid = state.pid.and_then(|pid| u32::try_from(pid).ok()).filter(|pid| *pid > 0);
        let (Some(pid), Some(true)) = (pid, state.running) else {
            return Ok(None);
        };
        let config = inspected.config.unwrap_or_default();
        let labels = config.labels.unwrap_or_default();
        let Some(kernel_id) = labels.get(labels::KERNEL_ID).cloned() else {
            return Ok(None);
        };
        let label = |name: &str| labels.get(name).cloned().unwrap_or_default();
        Ok(Some(KernelContainer {
            container_id: inspected.id.unwrap_or_else(|| container_id.to_owned()),
            kernel_id,
            session_id: label(labels::SESSION_ID),
            owner_user_id: label(labels::OWNER_USER_ID),
            owner_project_id: label(labels::OWNER_PROJECT_ID),
            image: config.image.unwrap_or_default(),
            pid,
            accelerator_devices: labels::parse_accelerator_devices(&label(labels::ACCELERATOR_DEVICES)),
        }))
    }
}

/// Follows the engine: a snapshot on every (re)connect, then start/die/destroy events.
/// `connected` tells readiness whether the engine is being followed right now.
pub async fn watch_containers(
    host: Option<String>,
    agent_id: String,
    events: Vec<mpsc::Sender<ContainerEvent>>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = follow_engine(host.as_deref(), &agent_id, &events, &connected) => outcome,
        };
        connected.send_replace(false);
        match outcome {
            Ok(()) => return, // the monitor is gone: nobody to tell
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "lost the Docker engine; reconnecting")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Hands an event to every follower; `false` once none is left.
async fn tell(followers: &[mpsc::Sender<ContainerEvent>], event: ContainerEvent) -> bool {
    let mut anyone = false;
    for follower in followers {
        anyone |= follower.send(event.clone()).await.is_ok();
    }
    anyone
}

/// One connection's life. Returns `Ok` only when every follower went away.
async fn follow_engine(
    host: Option<&str>,
    agent_id: &str,
    events: &[mpsc::Sender<ContainerEvent>],
    connected: &watch::Sender<bool>,
) -> Result<(), DockerError> {
    let client = DockerClient::connect(host, agent_id).await?;
    // Replay from a second before the listing so a container started in between is not missed;
    // a duplicate start is harmless.
    let since = (unix_now_secs() - 1).to_string();
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["start".to_owned(), "die".to_owned(), "destroy".to_owned()]),
        ("label".to_owned(), client.label_filters()),
    ]);
    let mut stream =
        client.engine().events(Some(EventsOptions { since: Some(since), until: None, filters: Some(filters) }));

    let running = client.running_kernels().await?;
    tracing::info!(kernels = running.len(), "following the Docker engine");
    if !tell(events, ContainerEvent::Snapshot(running)).await {
        return Ok(());
    }
    connected.send_replace(true);

    while let Some(message) = stream.next().await {
        let message = message.map_err(|source| DockerError::Request { what: "events stream".into(), source })?;
        let Some(container_id) = message.actor.and_then(|actor| actor.id) else {
            continue;
        };
        let event = match message.action.as_deref() {
            Some("start") => match client.inspect_kernel(&container_id).await? {
                Some(kernel) => ContainerEvent::Started(kernel),
                None => continue,
            },
            Some("die") => ContainerEvent::Stopped { container_id },
            Some("destroy") => ContainerEvent::Removed { container_id },
            _ => continue,
        };
        tracing::debug!(?event, "container event");
        if !tell(events, event).await {
            return Ok(());
        }
    }
    Err(DockerError::Request {
        what: "events stream".into(),
        source: bollard::errors::Error::IOError { err: std::io::Error::other("the engine closed the stream") },
    })
}

fn unix_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
