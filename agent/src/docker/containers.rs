//! Kernel containers on the engine: create and start one from a [`ContainerSpec`], stop,
//! kill and remove it, read its logs and exit state, make sure its image is present, and the
//! bridge networks of multi-container sessions.

use std::collections::HashMap;

use bollard::{
    models::{
        ContainerCreateBody, ContainerSummaryStateEnum, EndpointSettings, HostConfig, NetworkCreateRequest,
        NetworkingConfig, PortBinding,
    },
    query_parameters::{
        CreateContainerOptions, CreateImageOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions,
        StopContainerOptions,
    },
};
use futures_util::StreamExt;

use super::{DockerClient, DockerError};

/// Everything the engine needs to run one kernel.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Docker's `CpusetCpus` (`"0-1,3"`); empty means unpinned.
    pub cpuset: String,
    /// Memory limit; memory+swap gets the same value so a kernel cannot swap past it.
    pub memory_bytes: i64,
    pub shm_bytes: Option<i64>,
    pub pids_limit: i64,
    /// `host:container[:ro]` bind mounts.
    pub binds: Vec<String>,
    /// (container port, host port), published on `bind_host`.
    pub ports: Vec<(u16, u16)>,
    pub bind_host: String,
    pub working_dir: Option<String>,
    /// A user-defined network to join instead of the default bridge (a multi-container
    /// session's), where `hostname` is the container's alias.
    pub network: Option<String>,
    pub hostname: Option<String>,
}

/// The label Backend.AI puts on a session's cluster network.
const CLUSTER_NETWORK_LABEL: &str = "ai.backend.cluster-network";

/// An image as Backend.AI's `InstalledImageInfo` describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstalledImage {
    /// A repository tag (`e2e/python:3.11`).
    pub canonical: String,
    /// The image id (`sha256:…`).
    pub digest: String,
    pub architecture: String,
}

/// Backend.AI's name of an engine architecture (`amd64` → `x86_64`, `arm64` → `aarch64`).
fn backend_ai_arch(architecture: &str) -> String {
    match architecture {
        "amd64" | "x86-64" => "x86_64".to_owned(),
        "arm64" | "aarch64_be" => "aarch64".to_owned(),
        other => other.to_owned(),
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub exit_code: i64,
    pub oom_killed: bool,
    pub running: bool,
}

impl DockerClient {
    /// Whether `image` is present locally.
    pub async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        match self.engine().inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(source) => Err(DockerError::Request { what: format!("inspect image {image}"), source }),
        }
    }

    /// The image's labels (empty when it has none).
    pub async fn image_labels(&self, image: &str) -> Result<HashMap<String, String>, DockerError> {
        let inspected = self
            .engine()
            .inspect_image(image)
            .await
            .map_err(|source| DockerError::Request { what: format!("inspect image {image}"), source })?;
        Ok(inspected.config.and_then(|config| config.labels).unwrap_or_default())
    }

    /// Pulls `image` from its registry, calling `progress` with each status line.
    pub async fn pull_image(&self, image: &str, mut progress: impl FnMut(&str)) -> Result<(), DockerError> {
        let (name, tag) = split_image_tag(image);
        let options =
            CreateImageOptions { from_image: Some(name.to_owned()), tag: Some(tag.to_owned()), ..Default::default() };
        let mut stream = self.engine().create_image(Some(options), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|source| DockerError::Request { what: format!("pull {image}"), source })?;
            if let Some(status) = info.status.as_deref() {
                progress(status);
            }
        }
        Ok(())
    }

    /// Creates and starts the container; returns its id.
    pub async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let exposed: Vec<String> = spec.ports.iter().map(|(port, _)| format!("{port}/tcp")).collect();
        let bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .ports
            .iter()
            .map(|(port, host_port)| {
                let binding =
                    PortBinding { host_ip: Some(spec.bind_host.clone()), host_port: Some(host_port.to_string()) };
                (format!("{port}/tcp"), Some(vec![binding]))
            })
            .collect();
        let host_config = HostConfig {
            cpuset_cpus: (!spec.cpuset.is_empty()).then(|| spec.cpuset.clone()),
            memory: Some(spec.memory_bytes),
            memory_swap: Some(spec.memory_bytes),
            shm_size: spec.shm_bytes,
            pids_limit: Some(spec.pids_limit),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            binds: Some(spec.binds.clone()),
            port_bindings: Some(bindings),
            init: Some(true),
            network_mode: spec.network.clone(),
            ..Default::default()
        };
        let networking_config = spec.network.as_ref().map(|network| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.clone(),
                EndpointSettings { aliases: spec.hostname.clone().map(|h| vec![h]), ..Default::default() },
            )])),
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone()),
            env: Some(spec.env.clone()),
            entrypoint: spec.entrypoint.clone(),
            cmd: spec.cmd.clone(),
            working_dir: spec.working_dir.clone(),
            exposed_ports: Some(exposed),
            // A kernel's main process may be an interactive shell: keep its stdin open.
            tty: Some(true),
            open_stdin: Some(true),
            host_config: Some(host_config),
            hostname: spec.hostname.clone(),
            networking_config,
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        let created = self
            .engine()
            .create_container(Some(options), body)
            .await
            .map_err(|source| DockerError::Request { what: format!("create container {}", spec.name), source })?;
        if let Err(source) = self.engine().start_container(&created.id, None).await {
            let _ = self.remove_container(&created.id).await;
            return Err(DockerError::Request { what: format!("start container {}", spec.name), source });
        }
        Ok(created.id)
    }

    /// A bridge network named `name` with Backend.AI's cluster-network label, unless one exists.
    pub async fn create_network(&self, name: &str) -> Result<(), DockerError> {
        match self.engine().inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(source) => return Err(DockerError::Request { what: format!("inspect network {name}"), source }),
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".to_owned()),
            labels: Some(HashMap::from([(CLUSTER_NETWORK_LABEL.to_owned(), "1".to_owned())])),
            ..Default::default()
        };
        match self.engine().create_network(request).await {
            Ok(_) => Ok(()),
            // Created meanwhile by a concurrent call.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("create network {name}"), source }),
        }
    }

    /// The kernel images Backend.AI's agent reports as installed: every tag of an image that
    /// has labels and a kernelspec of 1 (the default), with its id and architecture. One list
    /// request; an image is inspected (for its architecture) only the first time its id is
    /// seen, `architectures` remembering it.
    pub async fn kernel_images(
        &self,
        architectures: &mut HashMap<String, String>,
    ) -> Result<Vec<InstalledImage>, DockerError> {
        let images = self
            .engine()
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(|source| DockerError::Request { what: "list images".into(), source })?;
        architectures.retain(|id, _| images.iter().any(|image| &image.id == id));
        let mut installed = Vec::new();
        for image in images {
            let kernelspec = image.labels.get("ai.backend.kernelspec").map_or("1", String::as_str);
            if image.labels.is_empty() || kernelspec.trim() != "1" {
                continue;
            }
            let architecture = match architectures.get(&image.id) {
                Some(architecture) => architecture.clone(),
                None => match self.engine().inspect_image(&image.id).await {
                    Ok(inspect) => {
                        let architecture = backend_ai_arch(inspect.architecture.as_deref().unwrap_or("x86_64"));
                        architectures.insert(image.id.clone(), architecture.clone());
                        architecture
                    }
                    // Removed meanwhile.
                    Err(_) => continue,
                },
            };
            for tag in image.repo_tags.iter().filter(|tag| !tag.ends_with("<none>")) {
                installed.push(InstalledImage {
                    canonical: tag.clone(),
                    digest: image.id.clone(),
                    architecture: architecture.clone(),
                });
            }
        }
        installed.sort_by(|a, b| a.canonical.cmp(&b.canonical));
        Ok(installed)
    }

    /// Removes the image `name` (`force`: even when containers use it; `noprune`: keeping its
    /// untagged parents).
    pub async fn remove_image(&self, name: &str, force: bool, noprune: bool) -> Result<(), DockerError> {
        let options = RemoveImageOptions { force, noprune, ..Default::default() };
        self.engine()
            .remove_image(name, Some(options), None)
            .await
            .map(drop)
            .map_err(|source| DockerError::Request { what: format!("remove image {name}"), source })
    }

    /// Removes the network `name`; one that is gone is fine.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.engine().remove_network(name).await {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("remove network {name}"), source }),
        }
    }

    /// Stops gracefully (SIGTERM, then SIGKILL after `grace_secs`); a gone container is fine.
    pub async fn stop_container(&self, id: &str, grace_secs: i32) -> Result<(), DockerError> {
        let options = StopContainerOptions { t: Some(grace_secs), signal: None };
        match self.engine().stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304 | 404, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("stop container {id}"), source }),
        }
    }

    /// Removes the container and its anonymous volumes; a gone container is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions { force: true, v: true, link: false };
        match self.engine().remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            // "removal already in progress"
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(source) => Err(DockerError::Request { what: format!("remove container {id}"), source }),
        }
    }

    /// Exit code and OOM flag, or `None` if the container is gone.
    pub async fn container_exit(&self, id: &str) -> Result<Option<ContainerExit>, DockerError> {
        match self.engine().inspect_container(id, None).await {
            Ok(inspected) => {
                let state = inspected.state.unwrap_or_default();
                Ok(Some(ContainerExit {
                    exit_code: state.exit_code.unwrap_or(0),
                    oom_killed: state.oom_killed.unwrap_or(false),
                    running: state.running.unwrap_or(false),
                }))
            }
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(source) => Err(DockerError::Request { what: format!("inspect {id}"), source }),
        }
    }

    /// The container's output so far (stdout and stderr), lossily decoded, at most `limit` bytes
    /// from the end.
    pub async fn container_logs(&self, id: &str, limit: usize) -> Result<String, DockerError> {
        let options = LogsOptions { stdout: true, stderr: true, tail: "all".into(), ..Default::default() };
        let mut stream = self.engine().logs(id, Some(options));
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| DockerError::Request { what: format!("logs of {id}"), source })?;
            bytes.extend_from_slice(&chunk.into_bytes());
            if bytes.len() > limit * 2 {
                bytes.drain(..bytes.len() - limit);
            }
        }
        if bytes.len() > limit {
            bytes.drain(..bytes.len() - limit);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every container (running or not) that carries this agent's kernel labels: id → kernel id.
    pub async fn all_kernel_containers(&self) -> Result<Vec<(String, HashMap<String, String>, bool)>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), self.label_filters())]);
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = self
            .engine()
            .list_containers(Some(options))
            .await
            .map_err(|source| DockerError::Request { what: "list containers".into(), source })?;
        Ok(summaries
            .into_iter()
            .filter_map(|s| {
                let running = s.state == Some(ContainerSummaryStateEnum::RUNNING);
                Some((s.id?, s.labels.unwrap_or_default(), running))
            })
            .collect())
    }
}

/// `repo/name:tag` → (`repo/name`, `tag`); no tag means `latest`. A registry port
/// (`host:5000/name`) is not a tag.
pub fn split_image_tag(image: &str) -> (&str, &str) {
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => (&image[..name_start + colon], &image[name_start + colon + 1..]),
        None => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_tags() {
        assert_eq!(split_image_tag("bai-test/busybox:latest"), ("bai-test/busybox", "latest"));
        assert_eq!(split_image_tag("python"), ("python", "latest"));
        assert_eq!(split_image_tag("127.0.0.1:5000/lablup/python:3.11"), ("127.0.0.1:5000/lablup/python", "3.11"));
        assert_eq!(split_image_tag("127.0.0.1:5000/lablup/python"), ("127.0.0.1:5000/lablup/python", "latest"));
    }
}
